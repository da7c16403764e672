//! The models quantd holds: turning uploaded files into a validated model (nothing is kept
//! unless every check passes), opening a stored model's checkpoint, and deleting a model with
//! the blobs only it used. Shared by the HTTP layer and the job runner.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use serde_json::json;

use crate::config::Settings;
use crate::db::models::{Deletion, ModelFileRow, ModelRow};
use crate::db::{self, Db};
use crate::model::checkpoint::{is_weights_file, CheckLimits, Checkpoint, CheckpointError};
use crate::store::{BlobStore, Digest, TempFile};

/// Model ids: `[a-z0-9][a-z0-9._:-]{0,127}` (DESIGN §2). Ids are never used as paths.
pub fn is_valid_model_id(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._:-".contains(c))
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("model {0:?} not found")]
    NotFound(String),
    #[error("{param}: {message}")]
    Invalid { param: String, message: String },
    #[error("{param}: {message}")]
    Conflict { param: String, message: String },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("storage: {0}")]
    Io(#[from] std::io::Error),
}

/// A file of a model being created: freshly uploaded (a temp file) or an existing blob.
pub struct IncomingFile {
    pub name: String,
    pub digest: Digest,
    pub size: u64,
    pub temp: Option<TempFile>,
}

pub fn check_limits(settings: &Settings) -> CheckLimits {
    CheckLimits {
        max_safetensors_header: settings.limits.max_safetensors_header_bytes,
        max_tokenizer: settings.limits.max_tokenizer_bytes,
        max_small_json: settings.limits.max_small_json_bytes,
    }
}

impl IncomingFile {
    /// A local file with its bytes (an existing blob is fetched into the cache if need be).
    async fn local_path(&self, store: &BlobStore) -> std::io::Result<PathBuf> {
        match &self.temp {
            Some(t) => Ok(t.path().to_path_buf()),
            None => store.local_path(&self.digest).await,
        }
    }
}

/// Validates `files` as one checkpoint and records it as a base model. On any error nothing
/// is stored: temp files delete themselves when dropped.
pub async fn create_base_model(
    db: &Db,
    store: &BlobStore,
    settings: &Settings,
    name: Option<String>,
    files: Vec<IncomingFile>,
) -> Result<ModelRow, CatalogError> {
    if files.is_empty() {
        return Err(CatalogError::Invalid {
            param: "files".into(),
            message: "no files were uploaded".into(),
        });
    }
    let mut by_name = BTreeMap::new();
    for f in &files {
        if by_name
            .insert(f.name.clone(), f.local_path(store).await?)
            .is_some()
        {
            return Err(CatalogError::Invalid {
                param: "files".into(),
                message: format!("file {:?} was given twice", f.name),
            });
        }
    }
    let limits = check_limits(settings);
    let ckpt = tokio::task::spawn_blocking(move || Checkpoint::open(&by_name, limits))
        .await
        .map_err(|e| {
            CatalogError::Io(std::io::Error::other(format!(
                "checkpoint validation panicked: {e}"
            )))
        })??;
    let id = match name {
        Some(n) => n,
        None => default_id(&ckpt, &files),
    };
    if !is_valid_model_id(&id) {
        return Err(CatalogError::Invalid {
            param: "name".into(),
            message: format!("{id:?} is not a valid model id ([a-z0-9][a-z0-9._:-]{{0,127}})"),
        });
    }
    if db::models::get(db, &id).await?.is_some() {
        return Err(CatalogError::Conflict {
            param: "name".into(),
            message: format!("a model named {id:?} already exists"),
        });
    }
    let row = base_row(&id, &ckpt, &files);
    drop(ckpt);
    let mut file_rows = Vec::with_capacity(files.len());
    let mut committed = Vec::new();
    for f in files {
        file_rows.push(ModelFileRow {
            name: f.name.clone(),
            digest: f.digest.to_string(),
            size: f.size as i64,
        });
        if let Some(temp) = f.temp {
            if !store.contains(&f.digest).await? {
                committed.push(f.digest.clone());
            }
            store.commit(temp, &f.digest).await?;
        }
    }
    let result = async {
        let mut tx = db.begin().await?;
        for f in &file_rows {
            db::blobs::insert_in(&mut tx, &f.digest, f.size as u64).await?;
        }
        db::models::insert(&mut tx, &row, &file_rows).await?;
        tx.commit().await
    }
    .await;
    if let Err(e) = result {
        for d in committed {
            // Only if no row refers to it: an identical upload may have committed meanwhile.
            if matches!(db::blobs::exists(db, d.as_str()).await, Ok(None)) {
                let _ = store.remove(&d).await;
            }
        }
        if let sqlx::Error::Database(d) = &e {
            if d.is_unique_violation() {
                return Err(CatalogError::Conflict {
                    param: "name".into(),
                    message: format!("a model named {id:?} already exists"),
                });
            }
        }
        return Err(e.into());
    }
    Ok(row)
}

/// A name when the upload gives none: the GGUF's `general.name`, else a digest prefix.
fn default_id(ckpt: &Checkpoint, files: &[IncomingFile]) -> String {
    let from_gguf = ckpt
        .gguf_metadata
        .iter()
        .find(|(k, _)| k == "general.name")
        .and_then(|(_, v)| match v {
            crate::formats::gguf::Value::String(s) => Some(s.clone()),
            _ => None,
        });
    if let Some(n) = from_gguf {
        let slug: String = n
            .to_ascii_lowercase()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._-".contains(c) {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        let slug = slug.trim_matches('-').chars().take(100).collect::<String>();
        if is_valid_model_id(&slug) {
            return slug;
        }
    }
    let weights = files
        .iter()
        .find(|f| is_weights_file(&f.name))
        .unwrap_or(&files[0]);
    format!("model-{}", &weights.digest.hex()[..12])
}

fn base_row(id: &str, ckpt: &Checkpoint, files: &[IncomingFile]) -> ModelRow {
    let params = ckpt.parameter_count();
    let weight_bytes: u64 = files
        .iter()
        .filter(|f| is_weights_file(&f.name))
        .map(|f| f.size)
        .sum();
    let dtypes: HashSet<String> = ckpt
        .tensors
        .iter()
        .map(|t| format!("{:?}", t.dtype))
        .collect();
    let mut dtypes: Vec<String> = dtypes.into_iter().collect();
    dtypes.sort();
    ModelRow {
        id: id.to_string(),
        kind: "base".into(),
        format: ckpt.format.as_str().into(),
        architecture: ckpt.config.architecture.name().into(),
        parameters: params as i64,
        size_bytes: files.iter().map(|f| f.size as i64).sum(),
        bits_per_weight: Some(weight_bytes as f64 * 8.0 / params.max(1) as f64),
        base_model: None,
        job_id: None,
        summary:
            json!({"config": ckpt.config, "tensors": ckpt.tensors.len(), "source_dtypes": dtypes})
                .to_string(),
        created_at: db::now(),
        revision: db::models::new_revision(),
    }
}

/// The on-disk paths of a stored model's files, by file name.
pub async fn model_paths(
    db: &Db,
    store: &BlobStore,
    id: &str,
) -> Result<BTreeMap<String, PathBuf>, CatalogError> {
    let files = db::models::files(db, id).await?;
    let mut out = BTreeMap::new();
    for f in files {
        let digest = Digest::parse(&f.digest).map_err(|e| CatalogError::Invalid {
            param: "digest".into(),
            message: e.to_string(),
        })?;
        out.insert(f.name, store.local_path(&digest).await?);
    }
    Ok(out)
}

/// Opens a stored model (on a blocking thread: validation reads headers and the tokenizer).
pub async fn open_checkpoint(
    db: &Db,
    store: &BlobStore,
    settings: &Settings,
    id: &str,
) -> Result<Checkpoint, CatalogError> {
    if db::models::get(db, id).await?.is_none() {
        return Err(CatalogError::NotFound(id.to_string()));
    }
    let mut paths = model_paths(db, store, id).await?;
    // A quantized variant stores its GGUF next to a manifest and other artifacts; the GGUF
    // alone is the model. (Uploads never mix a GGUF with other files: that is refused.)
    if paths.keys().filter(|n| n.ends_with(".gguf")).count() == 1 {
        paths.retain(|n, _| n.ends_with(".gguf"));
    }
    let limits = check_limits(settings);
    Ok(
        tokio::task::spawn_blocking(move || Checkpoint::open(&paths, limits))
            .await
            .map_err(|e| {
                CatalogError::Io(std::io::Error::other(format!(
                    "opening the checkpoint panicked: {e}"
                )))
            })??,
    )
}

/// Deletes a model unless a queued or running job needs it; removes blobs no model uses.
/// Whoever serves the model must drop it afterwards (`Engine::retire`).
pub async fn delete_model(db: &Db, store: &BlobStore, id: &str) -> Result<(), CatalogError> {
    match db::models::delete(db, id).await? {
        Deletion::NotFound => Err(CatalogError::NotFound(id.to_string())),
        Deletion::InUse => Err(CatalogError::Conflict {
            param: "id".into(),
            message: format!("model {id:?} is used by a queued or running job"),
        }),
        Deletion::Deleted { orphans } => {
            for d in orphans {
                if let Ok(d) = Digest::parse(&d) {
                    store.remove(&d).await?;
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_ids_follow_the_design_pattern() {
        assert!(is_valid_model_id("smollm2-135m:q4_k_m"));
        assert!(!is_valid_model_id("Smol"));
        assert!(!is_valid_model_id("../etc"));
        assert!(!is_valid_model_id(""));
        assert!(!is_valid_model_id(&"a".repeat(129)));
    }
}
