//! What kind of file an upload is, decided by its first bytes, never by its name. Pickle-based
//! checkpoints (`.bin`, `.pt`, `.pth`) and archives are refused outright: quantd never unpickles.

use std::io::Read;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Gguf,
    Safetensors,
    Json,
    Pickle,
    Zip,
    SevenZip,
    Gzip,
    Unknown,
}

impl FileKind {
    /// Formats quantd refuses with 415 whatever the file is called.
    pub fn is_refused_archive_or_pickle(self) -> bool {
        matches!(self, Self::Pickle | Self::Zip | Self::SevenZip | Self::Gzip)
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::Gguf => "GGUF",
            Self::Safetensors => "safetensors",
            Self::Json => "JSON",
            Self::Pickle => "a Python pickle (PyTorch .bin/.pt); quantd never unpickles, convert to safetensors",
            Self::Zip => "a zip archive (PyTorch .pt/.bin checkpoints are zipped pickles); upload safetensors or GGUF",
            Self::SevenZip => "a 7z archive",
            Self::Gzip => "a gzip archive",
            Self::Unknown => "an unrecognised format",
        }
    }
}

/// Classifies by magic bytes.
pub fn sniff_bytes(head: &[u8]) -> FileKind {
    match head {
        [b'G', b'G', b'U', b'F', ..] => FileKind::Gguf,
        [b'P', b'K', 3, 4, ..] | [b'P', b'K', 5, 6, ..] => FileKind::Zip,
        [b'7', b'z', 0xBC, 0xAF, 0x27, 0x1C, ..] => FileKind::SevenZip,
        [0x1F, 0x8B, ..] => FileKind::Gzip,
        // Pickle protocol 2-5 starts with PROTO; protocols 0/1 typically start with '(' or ']' or '}'
        // followed by opcodes, which no JSON or safetensors file does.
        [0x80, 2..=5, ..] => FileKind::Pickle,
        _ if looks_like_safetensors(head) => FileKind::Safetensors,
        _ if head.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') => FileKind::Json,
        _ => FileKind::Unknown,
    }
}

/// safetensors: an 8-byte little-endian header length, then a JSON object.
fn looks_like_safetensors(head: &[u8]) -> bool {
    head.len() >= 9 && head[8] == b'{' && u64::from_le_bytes(head[..8].try_into().unwrap()) > 1
}

pub fn sniff_file(path: &Path) -> std::io::Result<FileKind> {
    let mut head = [0u8; 16];
    let mut file = std::fs::File::open(path)?;
    let mut n = 0;
    while n < head.len() {
        let r = file.read(&mut head[n..])?;
        if r == 0 {
            break;
        }
        n += r;
    }
    Ok(sniff_bytes(&head[..n]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pickles_and_archives_are_recognised_by_content() {
        assert_eq!(sniff_bytes(&[0x80, 0x04, 0x95, 0, 0]), FileKind::Pickle);
        assert_eq!(sniff_bytes(b"PK\x03\x04rest"), FileKind::Zip);
        assert_eq!(
            sniff_bytes(&[b'7', b'z', 0xBC, 0xAF, 0x27, 0x1C, 0]),
            FileKind::SevenZip
        );
        assert!(FileKind::Pickle.is_refused_archive_or_pickle());
    }

    #[test]
    fn model_formats_are_recognised() {
        assert_eq!(sniff_bytes(b"GGUF\x03\0\0\0"), FileKind::Gguf);
        let mut st = 2u64.to_le_bytes().to_vec();
        st.extend_from_slice(b"{}");
        assert_eq!(sniff_bytes(&st), FileKind::Safetensors);
        assert_eq!(sniff_bytes(b"  {\"a\": 1}"), FileKind::Json);
    }
}
