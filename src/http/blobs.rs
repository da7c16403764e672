//! `PUT`/`HEAD /v1/blobs/sha256:{hex}`: content-addressed uploads, hashed while streaming; a
//! body whose hash differs from the URL is discarded.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use super::error::ApiError;
use super::AppState;
use crate::db;
use crate::store::{Digest, StoreError};

fn parse_digest(s: &str) -> Result<Digest, ApiError> {
    Digest::parse(s).map_err(|e| ApiError::bad_request("digest", e.to_string()))
}

pub async fn head_blob(
    State(state): State<AppState>,
    Path(digest): Path<String>,
) -> Result<StatusCode, ApiError> {
    let digest = parse_digest(&digest)?;
    Ok(
        match db::blobs::exists(state.jobs.db(), digest.as_str()).await? {
            Some(_) => StatusCode::OK,
            None => StatusCode::NOT_FOUND,
        },
    )
}

pub async fn put_blob(
    State(state): State<AppState>,
    Path(digest): Path<String>,
    body: Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let digest = parse_digest(&digest)?;
    let db = state.jobs.db();
    if let Some(size) = db::blobs::exists(db, digest.as_str()).await? {
        return Ok((
            StatusCode::OK,
            Json(json!({"digest": digest.as_str(), "size": size})),
        ));
    }
    let store = state.jobs.store();
    let limit = state.settings().limits.max_upload_bytes;
    let (temp, actual, size) = store
        .receive(body.into_data_stream(), limit, "limits.max_upload_bytes")
        .await?;
    if actual != digest {
        return Err(StoreError::DigestMismatch {
            expected: digest.to_string(),
            actual: actual.to_string(),
        }
        .into());
    }
    store.commit(temp, &digest)?;
    db::blobs::insert(db, digest.as_str(), size).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"digest": digest.as_str(), "size": size})),
    ))
}
