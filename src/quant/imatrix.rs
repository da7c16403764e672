//! Importance matrices (llama.cpp's imatrix): for every linear layer, the sum of squared
//! activations each input column saw over a calibration text, and how many tokens that was.
//! Their mean is the weight `weighted_blocks` gives each column's quantization error.
//!
//! Files are llama.cpp's two formats. The GGUF one (what `llama-imatrix` writes by default):
//! `general.type = "imatrix"`, `imatrix.datasets`, `imatrix.chunk_count`, `imatrix.chunk_size`,
//! and per weight an F32 `<name>.in_sum2` [n_mat, n_cols] with an F32 `<name>.counts`
//! [n_mat, 1], tensors sorted by name. The legacy `.dat` one is read too: entries of (name,
//! ncall, values already divided by the count and multiplied by ncall), then optionally the
//! chunk count and the dataset name. Means follow llama-quantize's `load_imatrix`: sums over
//! counts, and 1 for a matrix that saw no tokens.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::ControlFlow;
use std::path::Path;

use candle_core::quantized::GgmlDType;

use crate::formats::gguf::{GgufError, GgufFile, GgufWriter, TensorDecl, Value, GGUF_MAGIC};
use crate::nn::{KvCache, Llama, Logits, SeqStep};

const KV_DATASETS: &str = "imatrix.datasets";
const KV_CHUNK_COUNT: &str = "imatrix.chunk_count";
const KV_CHUNK_SIZE: &str = "imatrix.chunk_size";
const SUMS_SUFFIX: &str = ".in_sum2";
const COUNTS_SUFFIX: &str = ".counts";
/// Most entries a legacy file may declare (a large MoE model has a few thousand).
const MAX_LEGACY_ENTRIES: usize = 1 << 20;

/// One weight's statistics: `sums` holds `counts.len()` matrices (experts) of equal width.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub sums: Vec<f32>,
    pub counts: Vec<f32>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImportanceMatrix {
    /// By weight name (`blk.0.attn_q.weight`).
    pub entries: BTreeMap<String, Entry>,
    pub datasets: Vec<String>,
    pub chunk_count: u32,
    pub chunk_size: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ImatrixError {
    #[error("imatrix: {0}")]
    Invalid(String),
    #[error("imatrix: {0}")]
    Gguf(#[from] GgufError),
    #[error("imatrix I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("imatrix: {0}")]
    Candle(#[from] candle_core::Error),
}

fn invalid<T>(msg: impl Into<String>) -> Result<T, ImatrixError> {
    Err(ImatrixError::Invalid(msg.into()))
}

impl ImportanceMatrix {
    /// The per-column mean square activation of `weight` (one matrix, `cols` wide), as
    /// llama-quantize feeds it to the encoders; None when the file has no entry for it.
    pub fn weights(&self, weight: &str, cols: usize) -> Result<Option<Vec<f32>>, ImatrixError> {
        let Some(e) = self.entries.get(weight) else {
            return Ok(None);
        };
        if e.counts.len() != 1 || e.sums.len() != cols {
            return invalid(format!(
                "{weight}: the entry has {} values in {} matrices; the tensor has {cols} columns",
                e.sums.len(),
                e.counts.len()
            ));
        }
        let count = e.counts[0];
        Ok(Some(if count > 0.0 {
            e.sums.iter().map(|s| s / count).collect()
        } else {
            vec![1.0; cols]
        }))
    }

    /// Accumulates the inputs of every decoder linear over `windows` (token ids, each run from
    /// position 0 as its own sequence). The LM head is left out, as llama-imatrix does unless
    /// asked. `progress(done, total)` may stop the pass.
    pub fn collect(
        llama: &Llama,
        windows: &[Vec<u32>],
        dataset: &str,
        mut progress: impl FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<Option<Self>, ImatrixError> {
        let mut sums: BTreeMap<String, (Vec<f64>, u64)> = BTreeMap::new();
        for (done, window) in windows.iter().enumerate() {
            if progress(done, windows.len()).is_break() {
                return Ok(None);
            }
            let mut failure = None;
            let mut hook = |name: &str, t: &candle_core::Tensor| {
                if name == "output" || failure.is_some() {
                    return;
                }
                let squares = t
                    .sqr()
                    .and_then(|s| s.sum(0))
                    .and_then(|s| s.to_vec1::<f32>());
                match squares {
                    Ok(col) => {
                        let (acc, count) = sums
                            .entry(format!("{name}.weight"))
                            .or_insert_with(|| (vec![0.0; col.len()], 0));
                        for (a, v) in acc.iter_mut().zip(col) {
                            *a += v as f64;
                        }
                        *count += t.dims()[0] as u64;
                    }
                    Err(e) => failure = Some(e),
                }
            };
            let mut cache = KvCache::new();
            llama.forward(
                &mut [SeqStep {
                    tokens: window,
                    cache: &mut cache,
                    logits: Logits::Last,
                }],
                Some(&mut hook),
            )?;
            if let Some(e) = failure {
                return Err(e.into());
            }
        }
        if progress(windows.len(), windows.len()).is_break() {
            return Ok(None);
        }
        let entries = sums
            .into_iter()
            .map(|(name, (acc, count))| {
                let entry = Entry {
                    sums: acc.into_iter().map(|v| v as f32).collect(),
                    counts: vec![count as f32],
                };
                (name, entry)
            })
            .collect();
        Ok(Some(Self {
            entries,
            datasets: vec![dataset.to_string()],
            chunk_count: windows.len() as u32,
            chunk_size: windows.first().map_or(0, |w| w.len() as u32),
        }))
    }

    /// The keys llama-quantize adds to a file it quantized with an importance matrix;
    /// `file_name` is where the matrix is stored, if it is (`quantize.imatrix.file`).
    pub fn provenance(&self, file_name: Option<&str>) -> Vec<(String, Value)> {
        let mut kv: Vec<(String, Value)> = file_name
            .map(|f| {
                (
                    "quantize.imatrix.file".to_string(),
                    Value::String(f.to_string()),
                )
            })
            .into_iter()
            .collect();
        if let Some(d) = self.datasets.first() {
            kv.push((
                "quantize.imatrix.dataset".to_string(),
                Value::String(d.clone()),
            ));
        }
        kv.push((
            "quantize.imatrix.entries_count".to_string(),
            Value::I32(self.entries.len() as i32),
        ));
        if self.chunk_count > 0 {
            kv.push((
                "quantize.imatrix.chunks_count".to_string(),
                Value::I32(self.chunk_count as i32),
            ));
        }
        kv
    }

    /// Writes llama.cpp's GGUF imatrix format.
    pub fn write_gguf<W: Write>(&self, out: W) -> Result<W, ImatrixError> {
        let metadata = vec![
            ("general.type".to_string(), Value::String("imatrix".into())),
            (
                KV_DATASETS.to_string(),
                Value::Array(
                    self.datasets
                        .iter()
                        .map(|d| Value::String(d.clone()))
                        .collect(),
                ),
            ),
            (KV_CHUNK_COUNT.to_string(), Value::U32(self.chunk_count)),
            (KV_CHUNK_SIZE.to_string(), Value::U32(self.chunk_size)),
        ];
        let mut names = Vec::new();
        let mut shapes = Vec::new();
        for (name, e) in &self.entries {
            let n_mat = e.counts.len();
            names.push(format!("{name}{SUMS_SUFFIX}"));
            shapes.push(vec![n_mat, e.sums.len() / n_mat]);
            names.push(format!("{name}{COUNTS_SUFFIX}"));
            shapes.push(vec![n_mat, 1]);
        }
        let decls: Vec<TensorDecl<'_>> = names
            .iter()
            .zip(&shapes)
            .map(|(name, shape)| TensorDecl {
                name,
                shape,
                dtype: GgmlDType::F32.into(),
            })
            .collect();
        let mut writer = GgufWriter::begin(out, &metadata, &decls)?;
        for (name, e) in &self.entries {
            let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
            writer.write_tensor(&format!("{name}{SUMS_SUFFIX}"), &bytes(&e.sums))?;
            writer.write_tensor(&format!("{name}{COUNTS_SUFFIX}"), &bytes(&e.counts))?;
        }
        Ok(writer.finish()?)
    }

    /// Reads either format, told apart by the GGUF magic.
    pub fn read(path: &Path) -> Result<Self, ImatrixError> {
        let mut file = std::fs::File::open(path)?;
        let mut magic = [0u8; 4];
        let is_gguf =
            file.read_exact(&mut magic).is_ok() && u32::from_le_bytes(magic) == GGUF_MAGIC;
        file.seek(SeekFrom::Start(0))?;
        let imatrix = if is_gguf {
            Self::read_gguf(path)?
        } else {
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes)?;
            Self::parse_legacy(&bytes)?
        };
        imatrix.check()?;
        Ok(imatrix)
    }

    fn read_gguf(path: &Path) -> Result<Self, ImatrixError> {
        let gguf = GgufFile::open(path)?;
        let mut file = std::fs::File::open(path)?;
        let mut read_f32 = |name: &str| -> Result<Option<Vec<f32>>, ImatrixError> {
            let Some(t) = gguf.tensor(name) else {
                return Ok(None);
            };
            if t.dtype != GgmlDType::F32.into() {
                return invalid(format!("{name} is {:?}; the format stores F32", t.dtype));
            }
            let mut bytes = vec![0u8; t.size as usize];
            file.seek(SeekFrom::Start(t.offset))?;
            file.read_exact(&mut bytes)?;
            Ok(Some(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            ))
        };
        let mut entries = BTreeMap::new();
        for t in &gguf.tensors {
            if let Some(base) = t.name.strip_suffix(SUMS_SUFFIX) {
                let sums = read_f32(&t.name)?.expect("listed tensor");
                let Some(counts) = read_f32(&format!("{base}{COUNTS_SUFFIX}"))? else {
                    return invalid(format!("{base} has sums but no {base}{COUNTS_SUFFIX}"));
                };
                entries.insert(base.to_string(), Entry { sums, counts });
            } else if let Some(base) = t.name.strip_suffix(COUNTS_SUFFIX) {
                if gguf.tensor(&format!("{base}{SUMS_SUFFIX}")).is_none() {
                    return invalid(format!("{base} has counts but no {base}{SUMS_SUFFIX}"));
                }
            }
        }
        let datasets = match gguf.get(KV_DATASETS) {
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|v| match v {
                    Value::String(s) => Some(s.clone()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        let u32_of = |key: &str| match gguf.get(key) {
            Some(Value::U32(v)) => *v,
            _ => 0,
        };
        Ok(Self {
            entries,
            datasets,
            chunk_count: u32_of(KV_CHUNK_COUNT),
            chunk_size: u32_of(KV_CHUNK_SIZE),
        })
    }

    /// The legacy format; every length is checked against the bytes left.
    fn parse_legacy(bytes: &[u8]) -> Result<Self, ImatrixError> {
        let mut r = Cursor { bytes, at: 0 };
        let n_entries = r.i32()?;
        if n_entries < 1 || n_entries as usize > MAX_LEGACY_ENTRIES {
            return invalid(format!(
                "not an imatrix file: {n_entries} entries (no GGUF magic, and the legacy \
                 header needs 1..={MAX_LEGACY_ENTRIES})"
            ));
        }
        let mut entries = BTreeMap::new();
        for i in 0..n_entries {
            let len = r.i32()?;
            if len < 0 {
                return invalid(format!("entry {i}: name length {len}"));
            }
            let name = std::str::from_utf8(r.take(len as usize)?)
                .map_err(|_| ImatrixError::Invalid(format!("entry {i}: name is not UTF-8")))?
                .to_string();
            let ncall = r.i32()?;
            let nval = r.i32()?;
            if nval < 1 {
                return invalid(format!("{name}: {nval} values"));
            }
            let sums = r
                .take(4 * nval as usize)?
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            // Values are mean × ncall; dividing by ncall gives the mean, as llama-quantize
            // does. With ncall 0 the values are used as they are.
            let counts = vec![if ncall > 0 { ncall as f32 } else { 1.0 }];
            entries.insert(name, Entry { sums, counts });
        }
        let mut imatrix = Self {
            entries,
            ..Self::default()
        };
        // The trailer (chunk count, dataset name) is optional.
        if let Ok(chunks) = r.i32() {
            imatrix.chunk_count = chunks.max(0) as u32;
            if let Ok(len @ 1..) = r.i32() {
                if let Ok(name) = r.take(len as usize) {
                    let name = String::from_utf8_lossy(name).into_owned();
                    imatrix.datasets.push(name);
                }
            }
        }
        Ok(imatrix)
    }

    /// Every entry has whole matrices and finite values (llama-quantize refuses NaN and inf).
    fn check(&self) -> Result<(), ImatrixError> {
        if self.entries.is_empty() {
            return invalid("the file holds no entries");
        }
        for (name, e) in &self.entries {
            if e.counts.is_empty() || e.sums.is_empty() || e.sums.len() % e.counts.len() != 0 {
                return invalid(format!(
                    "{name}: {} sums do not split into {} matrices",
                    e.sums.len(),
                    e.counts.len()
                ));
            }
            if let Some(v) = e.sums.iter().chain(&e.counts).find(|v| !v.is_finite()) {
                return invalid(format!("{name}: non-finite value {v}"));
            }
        }
        Ok(())
    }
}

/// Reads little-endian values off a byte slice, refusing to run past its end.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ImatrixError> {
        if self.bytes.len() - self.at < n {
            return invalid(format!(
                "legacy file ends at byte {} while {n} more were expected",
                self.bytes.len()
            ));
        }
        self.at += n;
        Ok(&self.bytes[self.at - n..self.at])
    }

    fn i32(&mut self) -> Result<i32, ImatrixError> {
        let b = self.take(4)?;
        Ok(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ImportanceMatrix {
        let mut entries = BTreeMap::new();
        entries.insert(
            "blk.0.attn_q.weight".to_string(),
            Entry {
                sums: vec![4.0, 8.0, 0.5, 2.0],
                counts: vec![4.0],
            },
        );
        entries.insert(
            "blk.0.ffn_down.weight".to_string(),
            Entry {
                sums: vec![1.0; 8],
                counts: vec![0.0],
            },
        );
        ImportanceMatrix {
            entries,
            datasets: vec!["calib.txt".into()],
            chunk_count: 2,
            chunk_size: 512,
        }
    }

    #[test]
    fn gguf_round_trips_and_means_follow_llama_quantize() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("imatrix.gguf");
        sample()
            .write_gguf(std::fs::File::create(&path).unwrap())
            .unwrap();
        let back = ImportanceMatrix::read(&path).unwrap();
        assert_eq!(back, sample());
        let gguf = GgufFile::open(&path).unwrap();
        assert!(matches!(gguf.get("general.type"), Some(Value::String(s)) if s == "imatrix"));
        let sums = gguf.tensor("blk.0.attn_q.weight.in_sum2").unwrap();
        assert_eq!(sums.shape, vec![1, 4]);
        assert_eq!(
            gguf.tensor("blk.0.attn_q.weight.counts").unwrap().shape,
            vec![1, 1]
        );
        assert_eq!(
            back.weights("blk.0.attn_q.weight", 4).unwrap().unwrap(),
            vec![1.0, 2.0, 0.125, 0.5]
        );
        assert_eq!(
            back.weights("blk.0.ffn_down.weight", 8).unwrap().unwrap(),
            vec![1.0; 8],
            "a matrix that saw no tokens weighs every column 1"
        );
        assert!(back.weights("blk.1.attn_q.weight", 4).unwrap().is_none());
        let e = back.weights("blk.0.attn_q.weight", 5).unwrap_err();
        assert!(e.to_string().contains("5 columns"), "{e}");
    }

    fn legacy_bytes(entries: &[(&str, i32, &[f32])], tail: Option<(i32, &str)>) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(entries.len() as i32).to_le_bytes());
        for (name, ncall, values) in entries {
            b.extend_from_slice(&(name.len() as i32).to_le_bytes());
            b.extend_from_slice(name.as_bytes());
            b.extend_from_slice(&ncall.to_le_bytes());
            b.extend_from_slice(&(values.len() as i32).to_le_bytes());
            for v in *values {
                b.extend_from_slice(&v.to_le_bytes());
            }
        }
        if let Some((chunks, dataset)) = tail {
            b.extend_from_slice(&chunks.to_le_bytes());
            b.extend_from_slice(&(dataset.len() as i32).to_le_bytes());
            b.extend_from_slice(dataset.as_bytes());
        }
        b
    }

    #[test]
    fn legacy_files_read_with_their_mean_and_trailer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("imatrix.dat");
        let bytes = legacy_bytes(
            &[("blk.0.attn_k.weight", 10, &[20.0, 5.0])],
            Some((10, "wiki.train.raw")),
        );
        std::fs::write(&path, bytes).unwrap();
        let m = ImportanceMatrix::read(&path).unwrap();
        assert_eq!(
            m.weights("blk.0.attn_k.weight", 2).unwrap().unwrap(),
            vec![2.0, 0.5]
        );
        assert_eq!(m.chunk_count, 10);
        assert_eq!(m.datasets, vec!["wiki.train.raw".to_string()]);
    }

    #[test]
    fn truncated_or_foreign_files_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad");
        let mut bytes = legacy_bytes(&[("blk.0.attn_k.weight", 1, &[1.0, 2.0])], None);
        bytes.truncate(bytes.len() - 2);
        std::fs::write(&path, &bytes).unwrap();
        let e = ImportanceMatrix::read(&path).unwrap_err().to_string();
        assert!(e.contains("ends at byte"), "{e}");
        std::fs::write(&path, b"hello world, not an imatrix").unwrap();
        let e = ImportanceMatrix::read(&path).unwrap_err().to_string();
        assert!(e.contains("entries"), "{e}");
        let nan = legacy_bytes(&[("w", 1, &[f32::NAN])], None);
        std::fs::write(&path, nan).unwrap();
        let e = ImportanceMatrix::read(&path).unwrap_err().to_string();
        assert!(e.contains("non-finite"), "{e}");
    }
}
