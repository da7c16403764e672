//! `/v1/datasets`: texts for calibration and evaluation, as plain text or JSONL with a `text`
//! field per line. The normalized text (JSONL documents joined by a blank line) is stored
//! content-addressed; its id is `ds_` + the first 16 hex digits of its SHA-256, so the same
//! text uploaded twice is one dataset.

use std::collections::BTreeMap;
use std::io::Write;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::wire::{list_type, Deleted};
use super::AppState;
use crate::db::{self, datasets::DatasetRow};
use crate::store::{Digest, TempFile};

/// The dataset as the API shows it, with its token counts read from the database.
async fn shown(db: &db::Db, row: &DatasetRow) -> Result<Dataset, ApiError> {
    Ok(Dataset::new(
        row,
        &db::evals::dataset_tokens(db, &row.id).await?,
    ))
}

#[derive(Serialize, ToSchema)]
pub struct Dataset {
    /// `ds_` + the first 16 hex digits of the text's SHA-256.
    pub id: String,
    /// Always `dataset`.
    pub object: &'static str,
    /// `text` or `jsonl`.
    pub format: String,
    pub bytes: i64,
    pub documents: i64,
    pub digest: String,
    pub created: i64,
    /// Model id → tokens, filled in as jobs tokenize the dataset with a model's tokenizer.
    pub tokens_by_model: BTreeMap<String, i64>,
}

impl Dataset {
    fn new(row: &DatasetRow, tokens_by_model: &[(String, i64)]) -> Self {
        Self {
            id: row.id.clone(),
            object: "dataset",
            format: row.format.clone(),
            bytes: row.bytes,
            documents: row.documents,
            digest: row.digest.clone(),
            created: row.created_at,
            tokens_by_model: tokens_by_model.iter().cloned().collect(),
        }
    }
}

list_type!(DatasetList, Dataset);

/// The text to store and its document count, from a text/plain or JSONL body.
fn normalize(body: &[u8], jsonl: bool) -> Result<(String, u64), ApiError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::bad_request(
            "body",
            format!(
                "the dataset must be UTF-8; invalid byte at offset {}",
                e.valid_up_to()
            ),
        )
    })?;
    if !jsonl {
        if text.trim().is_empty() {
            return Err(ApiError::bad_request("body", "the dataset is empty"));
        }
        return Ok((text.to_string(), 1));
    }
    let mut docs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let field = format!("line {}", i + 1);
        let v: Value = serde_json::from_str(line)
            .map_err(|e| ApiError::bad_request(&field, format!("{field}: invalid JSON: {e}")))?;
        match v.get("text") {
            Some(Value::String(t)) => docs.push(t.as_str().to_owned()),
            _ => {
                return Err(ApiError::bad_request(
                    &field,
                    format!("{field}: expected an object with a string field \"text\""),
                ))
            }
        }
    }
    if docs.iter().all(|d| d.trim().is_empty()) {
        return Err(ApiError::bad_request("body", "the dataset has no text"));
    }
    Ok((docs.join("\n\n"), docs.len() as u64))
}

/// `POST /v1/datasets`: 201 with the new dataset, 200 when the same text already exists.
#[utoipa::path(post, path = "/v1/datasets", tag = "datasets",
    request_body(description = "plain text, or JSONL with a string field `text` per line",
        content((String = "text/plain"), (String = "application/jsonl"))),
    responses((status = 201, description = "stored", body = Dataset),
        (status = 200, description = "the same text was stored before", body = Dataset),
        (status = 400, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 415, body = ErrorBody)))]
pub async fn create_dataset(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Dataset>), ApiError> {
    let limit = state.settings().limits.max_dataset_bytes;
    let body = body.map_err(|e| {
        let mut err = ApiError::body(e);
        err.message
            .push_str(&format!(" (limits.max_dataset_bytes = {limit})"));
        err
    })?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let jsonl = if content_type.starts_with("text/plain") {
        false
    } else if [
        "application/jsonl",
        "application/x-ndjson",
        "application/json-lines",
    ]
    .iter()
    .any(|t| content_type.starts_with(t))
    {
        true
    } else {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            "send text/plain, or application/jsonl with a \"text\" field per line",
        )
        .with_param("content-type"));
    };
    let (text, documents) = normalize(&body, jsonl)?;
    let hex = hex::encode(Sha256::digest(text.as_bytes()));
    let digest = Digest::parse(&format!("sha256:{hex}"))
        .map_err(|e| ApiError::internal("naming the dataset", e))?;
    let id = format!("ds_{}", &hex[..16]);
    let db = state.jobs.db();
    if let Some(row) = db::datasets::get(db, &id).await? {
        return Ok((StatusCode::OK, Json(shown(db, &row).await?)));
    }
    let store = state.jobs.store().clone();
    let bytes = text.len() as u64;
    let temp = tokio::task::spawn_blocking(move || -> std::io::Result<TempFile> {
        let temp = store.temp_file("dataset")?;
        let mut f = std::fs::File::create(temp.path())?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        Ok(temp)
    })
    .await
    .map_err(|e| ApiError::internal("storing the dataset", e))??;
    state.jobs.store().commit(temp, &digest).await?;
    let format = if jsonl { "jsonl" } else { "text" };
    db::datasets::insert(db, &id, digest.as_str(), format, bytes, documents).await?;
    let row = db::datasets::get(db, &id)
        .await?
        .ok_or_else(|| ApiError::internal("storing the dataset", "row vanished"))?;
    Ok((StatusCode::CREATED, Json(Dataset::new(&row, &[]))))
}

#[utoipa::path(get, path = "/v1/datasets", tag = "datasets",
    responses((status = 200, body = DatasetList)))]
pub async fn list_datasets(State(state): State<AppState>) -> Result<Json<DatasetList>, ApiError> {
    let db = state.jobs.db();
    let mut data = Vec::new();
    for row in db::datasets::list(db).await? {
        data.push(shown(db, &row).await?);
    }
    Ok(Json(DatasetList::new(data)))
}

#[utoipa::path(get, path = "/v1/datasets/{id}", tag = "datasets", params(("id" = String, Path)),
    responses((status = 200, body = Dataset), (status = 404, body = ErrorBody)))]
pub async fn get_dataset(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Dataset>, ApiError> {
    let row = db::datasets::get(state.jobs.db(), &id)
        .await?
        .ok_or_else(|| ApiError::not_found("id", format!("dataset {id:?} does not exist")))?;
    Ok(Json(shown(state.jobs.db(), &row).await?))
}

#[utoipa::path(delete, path = "/v1/datasets/{id}", tag = "datasets", params(("id" = String, Path)),
    responses((status = 200, body = Deleted), (status = 404, body = ErrorBody),
        (status = 409, description = "a queued or running job uses it", body = ErrorBody)))]
pub async fn delete_dataset(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Deleted>, ApiError> {
    if db::datasets::in_use_by_job(state.jobs.db(), &id).await? {
        return Err(ApiError::conflict(
            "id",
            format!("dataset {id:?} is used by a queued or running job"),
        ));
    }
    let orphan = db::datasets::delete(state.jobs.db(), &id)
        .await?
        .ok_or_else(|| ApiError::not_found("id", format!("dataset {id:?} does not exist")))?;
    if let Some(d) = orphan {
        if let Ok(digest) = Digest::parse(&d) {
            state.jobs.store().remove(&digest).await?;
        }
    }
    Ok(Json(Deleted::new(id, "dataset")))
}
