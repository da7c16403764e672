//! A job's `outputs` besides the GGUF: its integer groups exported to GPTQ or AWQ checkpoint
//! folders (`export::gptq`), or its NF4/FP4/int8 weights to a bitsandbytes one
//! (`export::bnb`), each published as one tar of the folder, so `tar xf` gives a directory
//! transformers, GPTQModel or vLLM load. Entries carry fixed modes and times, so the
//! same variant always gives the same bytes (and digest).

use std::io::Write;
use std::path::{Path, PathBuf};

use super::publish::ExtraFile;
use super::spec::ExportFormat;
use crate::export::bnb::write_bnb_folder;
use crate::export::gptq::write_grouped_folder;
use crate::model::checkpoint::Checkpoint;
use crate::store::{BlobStore, HashingWriter};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("exporting {format}: {message}")]
    Export {
        format: &'static str,
        message: String,
    },
    #[error("writing an export: {0}")]
    Io(#[from] std::io::Error),
}

/// Removes the scratch folder however the export ends.
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes each of `outputs` for the variant in `gguf` as `<stem>.<format>.tar` temp files.
pub(super) fn write_exports(
    store: &BlobStore,
    gguf: &Path,
    stem: &str,
    outputs: &[ExportFormat],
) -> Result<Vec<ExtraFile>, ExportError> {
    if outputs.is_empty() {
        return Ok(Vec::new());
    }
    let ckpt = Checkpoint::open_gguf(gguf, "model.gguf").map_err(|e| ExportError::Export {
        format: "the variant",
        message: e.to_string(),
    })?;
    let mut files = Vec::with_capacity(outputs.len());
    for &format in outputs {
        let folder = format!("{stem}-{}", format.short_name());
        let temp = store.temp_file("export")?;
        let scratch = ScratchDir(temp.path().with_extension("d"));
        let written = match format.layout() {
            Some(layout) => write_grouped_folder(&ckpt, &scratch.0, layout)
                .map(drop)
                .map_err(|e| e.to_string()),
            None => write_bnb_folder(&ckpt, &scratch.0)
                .map(drop)
                .map_err(|e| e.to_string()),
        };
        written.map_err(|message| ExportError::Export {
            format: format.short_name(),
            message,
        })?;
        let mut tar = tar::Builder::new(HashingWriter::create(temp.path())?);
        let mut names: Vec<String> = std::fs::read_dir(&scratch.0)?
            .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
            .collect::<std::io::Result<_>>()?;
        names.sort();
        for name in names {
            let path = scratch.0.join(&name);
            let mut header = tar::Header::new_ustar();
            header.set_size(std::fs::metadata(&path)?.len());
            header.set_mode(0o644);
            header.set_mtime(0);
            header.set_entry_type(tar::EntryType::Regular);
            tar.append_data(
                &mut header,
                format!("{folder}/{name}"),
                std::fs::File::open(&path)?,
            )?;
        }
        let mut writer = tar.into_inner()?;
        writer.flush()?;
        let (digest, size) = writer.finish()?;
        files.push(ExtraFile {
            name: format!("{stem}.{}.tar", format.short_name()),
            temp,
            digest,
            size,
        });
    }
    Ok(files)
}
