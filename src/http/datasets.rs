//! `/v1/datasets`: texts for calibration and evaluation, as plain text or JSONL with a `text`
//! field per line. The normalized text (JSONL documents joined by a blank line) is stored
//! content-addressed; its id is `ds_` + the first 16 hex digits of its SHA-256, so the same
//! text uploaded twice is one dataset.

use std::io::Write;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use super::error::ApiError;
use super::AppState;
use crate::db::{self, datasets::DatasetRow};
use crate::store::Digest;

/// The dataset as the API shows it, with its token counts read from the database.
async fn shown(db: &db::Db, row: &DatasetRow) -> Result<Value, ApiError> {
    Ok(dataset_json(
        row,
        &db::evals::dataset_tokens(db, &row.id).await?,
    ))
}

fn dataset_json(row: &DatasetRow, tokens_by_model: &[(String, i64)]) -> Value {
    let tokens: serde_json::Map<String, Value> = tokens_by_model
        .iter()
        .map(|(model, n)| (model.clone(), json!(n)))
        .collect();
    json!({
        "id": row.id,
        "object": "dataset",
        "format": row.format,
        "bytes": row.bytes,
        "documents": row.documents,
        "digest": row.digest,
        "created": row.created_at,
        // Filled in as jobs tokenize the dataset with a model's tokenizer.
        "tokens_by_model": tokens,
    })
}

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
pub async fn create_dataset(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
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
    let owned = digest.clone();
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let temp = store.temp_file("dataset")?;
        let mut f = std::fs::File::create(temp.path())?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        store.commit(temp, &owned)?;
        Ok(())
    })
    .await
    .map_err(|e| ApiError::internal("storing the dataset", e))??;
    let bytes = std::fs::metadata(state.jobs.store().path(&digest))?.len();
    let format = if jsonl { "jsonl" } else { "text" };
    db::datasets::insert(db, &id, digest.as_str(), format, bytes, documents).await?;
    let row = db::datasets::get(db, &id)
        .await?
        .ok_or_else(|| ApiError::internal("storing the dataset", "row vanished"))?;
    Ok((StatusCode::CREATED, Json(dataset_json(&row, &[]))))
}

pub async fn list_datasets(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let db = state.jobs.db();
    let mut data = Vec::new();
    for row in db::datasets::list(db).await? {
        data.push(shown(db, &row).await?);
    }
    Ok(Json(json!({"object": "list", "data": data})))
}

pub async fn get_dataset(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let row = db::datasets::get(state.jobs.db(), &id)
        .await?
        .ok_or_else(|| ApiError::not_found("id", format!("dataset {id:?} does not exist")))?;
    Ok(Json(shown(state.jobs.db(), &row).await?))
}

pub async fn delete_dataset(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
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
            state.jobs.store().remove(&digest)?;
        }
    }
    Ok(Json(
        json!({"id": id, "object": "dataset", "deleted": true}),
    ))
}
