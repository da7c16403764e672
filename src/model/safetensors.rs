//! Strict reading of a safetensors header (DESIGN §8): the header length is capped and inside
//! the file, the JSON is an object of tensors with known dtypes, `dtype x shape` equals the byte
//! length with checked arithmetic, and the data ranges are sorted, contiguous, start at 0 and
//! end exactly at the end of the file. Nothing is allocated from an unchecked size.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum StDtype {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl StDtype {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "F32" => Self::F32,
            "F16" => Self::F16,
            "BF16" => Self::BF16,
            "F64" => Self::F64,
            "I64" => Self::I64,
            "I32" => Self::I32,
            "I16" => Self::I16,
            "I8" => Self::I8,
            "U8" => Self::U8,
            "BOOL" => Self::Bool,
            _ => return None,
        })
    }

    pub fn size(self) -> u64 {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, Self::F32 | Self::F16 | Self::BF16)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::F64 => "F64",
            Self::I64 => "I64",
            Self::I32 => "I32",
            Self::I16 => "I16",
            Self::I8 => "I8",
            Self::U8 => "U8",
            Self::Bool => "BOOL",
        }
    }
}

/// One tensor of a validated file; `offset` is absolute within the file.
#[derive(Debug, Clone)]
pub struct StTensor {
    pub name: String,
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    pub offset: u64,
    pub len: u64,
}

#[derive(Debug, Clone)]
pub struct StHeader {
    pub tensors: Vec<StTensor>,
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StError {
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
    #[error("{file}: {source}")]
    Io {
        file: String,
        source: std::io::Error,
    },
}

#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// Reads and validates the header of the safetensors file at `path`.
pub fn read_header(path: &Path, file_name: &str, max_header: u64) -> Result<StHeader, StError> {
    let invalid = |message: String| StError::Invalid {
        file: file_name.to_string(),
        message,
    };
    let io = |source| StError::Io {
        file: file_name.to_string(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    if file_len < 8 {
        return Err(invalid(format!(
            "file is {file_len} bytes, shorter than the 8-byte header length"
        )));
    }
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes).map_err(io)?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > max_header {
        return Err(invalid(format!(
            "header length {header_len} exceeds the limit of {max_header} bytes"
        )));
    }
    if header_len > file_len - 8 {
        return Err(invalid(format!(
            "header claims {header_len} bytes but the file has only {} after the length",
            file_len - 8
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(io)?;
    let data_len = file_len - 8 - header_len;
    parse_header(&header, header_len + 8, data_len).map_err(invalid)
}

/// Validates header JSON given where the data starts and how long it is.
pub fn parse_header(header: &[u8], data_start: u64, data_len: u64) -> Result<StHeader, String> {
    let json: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| format!("header is not a JSON object: {e}"))?;
    let mut tensors = Vec::with_capacity(json.len());
    let mut metadata = BTreeMap::new();
    for (name, value) in json {
        if name == "__metadata__" {
            metadata = serde_json::from_value(value)
                .map_err(|e| format!("__metadata__ must map strings to strings: {e}"))?;
            continue;
        }
        let raw: RawEntry =
            serde_json::from_value(value).map_err(|e| format!("tensor {name:?}: {e}"))?;
        let dtype = StDtype::parse(&raw.dtype)
            .ok_or_else(|| format!("tensor {name:?}: unsupported dtype {:?}", raw.dtype))?;
        let [begin, end] = raw.data_offsets;
        if end < begin {
            return Err(format!(
                "tensor {name:?}: data_offsets [{begin}, {end}] run backwards"
            ));
        }
        let expected = raw
            .shape
            .iter()
            .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| format!("tensor {name:?}: shape {:?} overflows", raw.shape))?;
        if expected != end - begin {
            return Err(format!(
                "tensor {name:?}: dtype {} x shape {:?} = {expected} bytes, but data_offsets span {}",
                raw.dtype,
                raw.shape,
                end - begin
            ));
        }
        let shape = raw
            .shape
            .iter()
            .map(|&d| {
                usize::try_from(d).map_err(|_| format!("tensor {name:?}: dimension {d} too large"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        tensors.push(StTensor {
            name,
            dtype,
            shape,
            offset: begin,
            len: end - begin,
        });
    }
    tensors.sort_by_key(|t| (t.offset, t.len));
    let mut cursor = 0u64;
    for t in &tensors {
        if t.offset != cursor {
            let what = if t.offset < cursor {
                "overlaps the previous tensor"
            } else {
                "leaves a gap before it"
            };
            return Err(format!(
                "tensor {:?} at offset {} {what} (expected offset {cursor})",
                t.name, t.offset
            ));
        }
        cursor = t.offset + t.len;
    }
    if cursor != data_len {
        return Err(format!(
            "tensors end at byte {cursor} of the data section but the file holds {data_len} bytes (truncated or padded)"
        ));
    }
    for t in &mut tensors {
        t.offset += data_start;
    }
    Ok(StHeader { tensors, metadata })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(entries: &str) -> Vec<u8> {
        format!("{{{entries}}}").into_bytes()
    }

    #[test]
    fn a_well_formed_header_is_accepted_with_absolute_offsets() {
        let h = header(
            r#""a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"F16","shape":[4],"data_offsets":[16,24]}"#,
        );
        let parsed = parse_header(&h, 100, 24).unwrap();
        assert_eq!(parsed.tensors.len(), 2);
        assert_eq!(parsed.tensors[1].offset, 116);
    }

    #[test]
    fn overlapping_offsets_are_refused() {
        let h = header(
            r#""a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}"#,
        );
        assert!(parse_header(&h, 8, 24).unwrap_err().contains("overlaps"));
    }

    #[test]
    fn dtype_times_shape_must_equal_the_byte_length() {
        let h = header(r#""a":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}"#);
        assert!(parse_header(&h, 8, 16).unwrap_err().contains("= 12 bytes"));
    }

    #[test]
    fn shapes_that_overflow_are_refused_not_wrapped() {
        let h =
            header(r#""a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,16]}"#);
        assert!(parse_header(&h, 8, 16).unwrap_err().contains("overflows"));
    }

    #[test]
    fn truncated_data_is_refused() {
        let h = header(r#""a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}"#);
        assert!(parse_header(&h, 8, 10).unwrap_err().contains("truncated"));
    }
}
