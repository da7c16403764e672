//! Strict GGUF reader: header, metadata and tensor infos, each count and length checked
//! against what is left of the file before anything is allocated from it.

use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use super::dtype::TensorType;
use super::{Value, GGUF_MAGIC};

/// Most metadata entries or tensors a file may declare; real models stay far below.
const MAX_COUNT: u64 = 1 << 20;
const MAX_DIMS: u32 = 4;
/// Arrays nest at most this deep (llama.cpp itself writes no nested arrays).
const MAX_ARRAY_DEPTH: usize = 2;
/// Memory the parsed metadata may take (values plus string bytes). A 150k-token vocabulary with
/// merges needs about 20 MiB; this leaves room while refusing files built to exhaust memory.
const MAX_METADATA_MEMORY: u64 = 512 << 20;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("GGUF: {0}")]
    Invalid(String),
    #[error("GGUF: unsupported {0}")]
    Unsupported(String),
    #[error("GGUF I/O: {0}")]
    Io(#[from] std::io::Error),
}

fn invalid<T>(msg: impl Into<String>) -> Result<T, GgufError> {
    Err(GgufError::Invalid(msg.into()))
}

#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    pub name: String,
    /// Row-major shape (GGUF's `ne` reversed), as candle and HF write it.
    pub shape: Vec<usize>,
    pub dtype: TensorType,
    /// Absolute offset of the data in the file.
    pub offset: u64,
    pub size: u64,
}

impl GgufTensorInfo {
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }
}

#[derive(Debug, Clone)]
pub struct GgufFile {
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<GgufTensorInfo>,
    pub alignment: u64,
    pub data_offset: u64,
    pub file_len: u64,
}

/// A reader that knows how many bytes remain, so every length can be checked before use.
struct Bounded<R> {
    inner: R,
    pos: u64,
    len: u64,
    /// What is left of `MAX_METADATA_MEMORY`.
    budget: u64,
}

impl<R: Read> Bounded<R> {
    /// Charges `bytes` of parsed metadata against the budget.
    fn charge(&mut self, bytes: u64) -> Result<(), GgufError> {
        self.budget = self.budget.checked_sub(bytes).ok_or_else(|| {
            GgufError::Invalid(format!(
                "metadata would need more than {MAX_METADATA_MEMORY} bytes of memory"
            ))
        })?;
        Ok(())
    }

    fn remaining(&self) -> u64 {
        self.len - self.pos
    }

    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        if self.remaining() < N as u64 {
            return invalid(format!("unexpected end of file at byte {}", self.pos));
        }
        let mut b = [0u8; N];
        self.inner.read_exact(&mut b)?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    /// A count, checked so that `count * min_each` bytes could still follow.
    fn count(&mut self, what: &str, min_each: u64) -> Result<u64, GgufError> {
        let n = self.u64()?;
        if n > MAX_COUNT || n.saturating_mul(min_each) > self.remaining() {
            return invalid(format!(
                "{what} count {n} cannot fit in the {} bytes left in the file",
                self.remaining()
            ));
        }
        Ok(n)
    }

    fn string(&mut self) -> Result<String, GgufError> {
        let n = self.u64()?;
        self.charge(n)?;
        if n > self.remaining() {
            return invalid(format!(
                "string of {n} bytes at byte {} runs past the end of the file",
                self.pos
            ));
        }
        let mut buf = vec![0u8; n as usize];
        self.inner.read_exact(&mut buf)?;
        self.pos += n;
        String::from_utf8(buf).or_else(|_| invalid("string is not UTF-8"))
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<Value, GgufError> {
        self.charge(std::mem::size_of::<Value>() as u64)?;
        Ok(match ty {
            0 => Value::U8(self.bytes::<1>()?[0]),
            1 => Value::I8(self.bytes::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.bytes()?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.bytes()?)),
            6 => Value::F32(f32::from_le_bytes(self.bytes()?)),
            7 => match self.bytes::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return invalid(format!("bool value {b} is neither 0 nor 1")),
            },
            8 => Value::String(self.string()?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return invalid("arrays nested too deeply");
                }
                let elem_ty = self.u32()?;
                let n = self.count("array element", min_value_size(elem_ty)?)?;
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem_ty, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.bytes()?)),
            12 => Value::F64(f64::from_le_bytes(self.bytes()?)),
            t => return invalid(format!("unknown metadata value type {t}")),
        })
    }
}

fn min_value_size(ty: u32) -> Result<u64, GgufError> {
    Ok(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        t => return invalid(format!("unknown array element type {t}")),
    })
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        Self::read(BufReader::with_capacity(1 << 16, file), len)
    }

    pub fn read<R: Read + Seek>(mut inner: R, len: u64) -> Result<Self, GgufError> {
        inner.seek(SeekFrom::Start(0))?;
        let mut r = Bounded {
            inner,
            pos: 0,
            len,
            budget: MAX_METADATA_MEMORY,
        };
        if r.u32()? != GGUF_MAGIC {
            return invalid("not a GGUF file (bad magic)");
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Unsupported(format!(
                "version {version} (2 and 3 are read)"
            )));
        }
        // Minimum sizes: a tensor info is name length + n_dims + type + offset; a kv is key
        // length + type + one byte.
        let n_tensors = r.count("tensor", 8 + 4 + 4 + 8)?;
        let n_kv = r.count("metadata", 8 + 4 + 1)?;
        let mut metadata = Vec::with_capacity(n_kv as usize);
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let value = r.value(ty, 0).map_err(|e| match e {
                GgufError::Invalid(m) => GgufError::Invalid(format!("metadata {key:?}: {m}")),
                other => other,
            })?;
            metadata.push((key, value));
        }
        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => super::ALIGNMENT,
            Some((_, Value::U32(a))) if *a > 0 && a.is_power_of_two() => *a as u64,
            Some((_, v)) => {
                return invalid(format!(
                    "general.alignment {v:?} must be a positive power of two (u32)"
                ))
            }
        };
        let mut infos = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return invalid(format!(
                    "tensor {name:?} has {n_dims} dimensions (1..={MAX_DIMS})"
                ));
            }
            let mut ne = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                ne.push(r.u64()?);
            }
            let type_id = r.u32()?;
            let rel_offset = r.u64()?;
            infos.push((name, ne, type_id, rel_offset));
        }
        let data_offset = r.pos.div_ceil(alignment) * alignment;
        let mut tensors = Vec::with_capacity(infos.len());
        for (name, ne, type_id, rel_offset) in infos {
            tensors.push(check_tensor(
                name,
                &ne,
                type_id,
                rel_offset,
                data_offset,
                alignment,
                len,
            )?);
        }
        check_disjoint(&mut tensors.iter().collect::<Vec<_>>())?;
        Ok(Self {
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
            file_len: len,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

fn check_tensor(
    name: String,
    ne: &[u64],
    type_id: u32,
    rel_offset: u64,
    data_offset: u64,
    alignment: u64,
    file_len: u64,
) -> Result<GgufTensorInfo, GgufError> {
    let dtype = TensorType::from_u32(type_id)
        .ok_or_else(|| GgufError::Unsupported(format!("tensor type {type_id} of {name:?}")))?;
    if ne.contains(&0) {
        return invalid(format!("tensor {name:?} has a zero dimension {ne:?}"));
    }
    let elems = ne
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| GgufError::Invalid(format!("tensor {name:?} shape {ne:?} overflows")))?;
    if !ne[0].is_multiple_of(dtype.block_size() as u64) {
        return invalid(format!(
            "tensor {name:?}: row length {} is not a multiple of the block size {}",
            ne[0],
            dtype.block_size()
        ));
    }
    let size = dtype
        .bytes(elems)
        .ok_or_else(|| GgufError::Invalid(format!("tensor {name:?} size overflows")))?;
    if !rel_offset.is_multiple_of(alignment) {
        return invalid(format!(
            "tensor {name:?} offset {rel_offset} is not aligned to {alignment}"
        ));
    }
    let end = data_offset
        .checked_add(rel_offset)
        .and_then(|o| o.checked_add(size))
        .filter(|&end| end <= file_len);
    if end.is_none() {
        return invalid(format!(
            "tensor {name:?} ({size} bytes at data offset {rel_offset}) runs past the end of the {file_len}-byte file"
        ));
    }
    let shape = ne.iter().rev().map(|&d| d as usize).collect();
    Ok(GgufTensorInfo {
        name,
        shape,
        dtype,
        offset: data_offset + rel_offset,
        size,
    })
}

fn check_disjoint(tensors: &mut [&GgufTensorInfo]) -> Result<(), GgufError> {
    tensors.sort_by_key(|t| t.offset);
    for pair in tensors.windows(2) {
        if pair[0].offset + pair[0].size > pair[1].offset {
            return invalid(format!(
                "tensors {:?} and {:?} overlap",
                pair[0].name, pair[1].name
            ));
        }
    }
    let mut names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return invalid(format!("tensor {:?} appears twice", w[0]));
    }
    Ok(())
}
