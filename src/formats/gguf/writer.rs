//! Streaming GGUF v3 writer. The header (metadata and every tensor's offset) is written first,
//! from shapes and types known in advance; tensor data then follows in declaration order, one
//! tensor at a time, each padded to the alignment.

use std::io::{self, Write};

use super::dtype::TensorType;
use super::{Value, ALIGNMENT, GGUF_MAGIC};

pub struct GgufWriter<W: Write> {
    out: W,
    pending: std::collections::VecDeque<(String, u64)>,
}

fn write_str<W: Write>(w: &mut W, s: &str) -> io::Result<u64> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())?;
    Ok(8 + s.len() as u64)
}

fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn write_value<W: Write>(w: &mut W, v: &Value) -> io::Result<u64> {
    Ok(match v {
        Value::U8(x) => w.write_all(&[*x]).map(|_| 1)?,
        Value::I8(x) => w.write_all(&x.to_le_bytes()).map(|_| 1)?,
        Value::U16(x) => w.write_all(&x.to_le_bytes()).map(|_| 2)?,
        Value::I16(x) => w.write_all(&x.to_le_bytes()).map(|_| 2)?,
        Value::U32(x) => w.write_all(&x.to_le_bytes()).map(|_| 4)?,
        Value::I32(x) => w.write_all(&x.to_le_bytes()).map(|_| 4)?,
        Value::F32(x) => w.write_all(&x.to_le_bytes()).map(|_| 4)?,
        Value::Bool(x) => w.write_all(&[*x as u8]).map(|_| 1)?,
        Value::U64(x) => w.write_all(&x.to_le_bytes()).map(|_| 8)?,
        Value::I64(x) => w.write_all(&x.to_le_bytes()).map(|_| 8)?,
        Value::F64(x) => w.write_all(&x.to_le_bytes()).map(|_| 8)?,
        Value::String(s) => write_str(w, s)?,
        Value::Array(items) => {
            // An empty array still needs an element type; GGUF readers accept any.
            let elem_ty = items.first().map_or(4, value_type);
            if items.iter().any(|i| value_type(i) != elem_ty) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "GGUF arrays must be homogeneous",
                ));
            }
            w.write_all(&elem_ty.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            let mut n = 12;
            for item in items {
                n += write_value(w, item)?;
            }
            n
        }
    })
}

fn padding(pos: u64) -> u64 {
    pos.div_ceil(ALIGNMENT) * ALIGNMENT - pos
}

/// A tensor to be declared in the header: name, row-major shape, type.
pub struct TensorDecl<'a> {
    pub name: &'a str,
    pub shape: &'a [usize],
    pub dtype: TensorType,
}

impl<W: Write> GgufWriter<W> {
    /// Writes magic, version, metadata and tensor infos; afterwards call `write_tensor` once
    /// per declared tensor, in order, then `finish`.
    pub fn begin(
        mut out: W,
        metadata: &[(String, Value)],
        tensors: &[TensorDecl<'_>],
    ) -> io::Result<Self> {
        let mut pos = 0u64;
        out.write_all(&GGUF_MAGIC.to_le_bytes())?;
        out.write_all(&3u32.to_le_bytes())?;
        out.write_all(&(tensors.len() as u64).to_le_bytes())?;
        out.write_all(&(metadata.len() as u64).to_le_bytes())?;
        pos += 24;
        for (key, value) in metadata {
            pos += write_str(&mut out, key)?;
            out.write_all(&value_type(value).to_le_bytes())?;
            pos += 4 + write_value(&mut out, value)?;
        }
        let mut rel = 0u64;
        let mut pending = std::collections::VecDeque::with_capacity(tensors.len());
        for t in tensors {
            let elems = t.shape.iter().map(|&d| d as u64).product();
            let size = t.dtype.bytes(elems).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{}: not whole blocks", t.name),
                )
            })?;
            pos += write_str(&mut out, t.name)?;
            out.write_all(&(t.shape.len() as u32).to_le_bytes())?;
            for &d in t.shape.iter().rev() {
                out.write_all(&(d as u64).to_le_bytes())?;
            }
            out.write_all(&t.dtype.to_u32().to_le_bytes())?;
            out.write_all(&rel.to_le_bytes())?;
            pos += 4 + 8 * t.shape.len() as u64 + 4 + 8;
            pending.push_back((t.name.to_string(), size));
            rel += size + padding(size);
        }
        let pad = padding(pos);
        out.write_all(&vec![0u8; pad as usize])?;
        Ok(Self { out, pending })
    }

    /// Writes the next tensor's bytes; its name and size must match the declaration.
    pub fn write_tensor(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        let (expected_name, size) = self.pending.front().cloned().ok_or_else(|| {
            io::Error::other(format!("{name}: more tensors written than declared"))
        })?;
        if expected_name != name || size != data.len() as u64 {
            return Err(io::Error::other(format!(
                "tensor {name} ({} bytes) written where {expected_name} ({size} bytes) was declared",
                data.len()
            )));
        }
        self.pending.pop_front();
        self.out.write_all(data)?;
        let pad = padding(size);
        self.out.write_all(&vec![0u8; pad as usize])?;
        Ok(())
    }

    /// Checks every declared tensor was written and returns the inner writer.
    pub fn finish(self) -> io::Result<W> {
        if let Some((name, _)) = self.pending.front() {
            return Err(io::Error::other(format!(
                "tensor {name} was declared but never written"
            )));
        }
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::super::reader::GgufFile;
    use super::*;
    use candle_core::quantized::GgmlDType;

    #[test]
    fn written_file_reads_back_with_metadata_and_aligned_tensors() {
        let meta = vec![
            (
                "general.architecture".to_string(),
                Value::String("llama".into()),
            ),
            ("general.alignment".to_string(), Value::U32(32)),
            (
                "tokenizer.ggml.tokens".to_string(),
                Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
            ),
        ];
        let shape = [2usize, 32];
        let decl = [
            TensorDecl {
                name: "a.weight",
                shape: &shape,
                dtype: GgmlDType::Q8_0.into(),
            },
            TensorDecl {
                name: "b.weight",
                shape: &[3],
                dtype: TensorType::I32,
            },
        ];
        let mut w = GgufWriter::begin(std::io::Cursor::new(Vec::new()), &meta, &decl).unwrap();
        w.write_tensor("a.weight", &[7u8; 68]).unwrap();
        assert!(w.write_tensor("a.weight", &[0u8; 12]).is_err());
        w.write_tensor("b.weight", &[1u8; 12]).unwrap();
        let bytes = w.finish().unwrap().into_inner();
        let f = GgufFile::read(std::io::Cursor::new(&bytes), bytes.len() as u64).unwrap();
        assert_eq!(f.version, 3);
        assert_eq!(f.tensors[0].shape, vec![2, 32]);
        assert_eq!(f.tensors[0].dtype, GgmlDType::Q8_0.into());
        assert_eq!(f.tensors[1].dtype, TensorType::I32);
        assert_eq!(f.tensors[1].offset % 32, 0);
        assert_eq!(&bytes[f.tensors[1].offset as usize..][..12], &[1u8; 12]);
    }
}
