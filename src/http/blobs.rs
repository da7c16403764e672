//! `PUT`/`HEAD /v1/blobs/sha256:{hex}`: content-addressed uploads, hashed while streaming; a
//! body whose hash differs from the URL is discarded.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::AppState;
use crate::db;
use crate::store::{Digest, StoreError};

fn parse_digest(s: &str) -> Result<Digest, ApiError> {
    Digest::parse(s).map_err(|e| ApiError::bad_request("digest", e.to_string()))
}

/// A stored blob.
#[derive(Serialize, ToSchema)]
pub struct Blob {
    /// `sha256:<hex>`.
    pub digest: String,
    pub size: i64,
}

#[utoipa::path(head, path = "/v1/blobs/{digest}", tag = "models",
    params(("digest" = String, Path, description = "sha256:<64 hex digits>")),
    responses((status = 200, description = "stored"), (status = 404, description = "not stored"),
        (status = 400, description = "not a sha256 digest")))]
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

#[utoipa::path(put, path = "/v1/blobs/{digest}", tag = "models",
    params(("digest" = String, Path, description = "sha256:<64 hex digits> of the body")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, description = "stored", body = Blob),
        (status = 200, description = "already stored; nothing was read", body = Blob),
        (status = 400, description = "not a sha256 digest, or the body hashes to another", body = ErrorBody),
        (status = 413, body = ErrorBody)))]
pub async fn put_blob(
    State(state): State<AppState>,
    Path(digest): Path<String>,
    body: Body,
) -> Result<(StatusCode, Json<Blob>), ApiError> {
    let digest = parse_digest(&digest)?;
    let db = state.jobs.db();
    if let Some(size) = db::blobs::exists(db, digest.as_str()).await? {
        return Ok((
            StatusCode::OK,
            Json(Blob {
                digest: digest.to_string(),
                size,
            }),
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
    store.commit(temp, &digest).await?;
    db::blobs::insert(db, digest.as_str(), size).await?;
    Ok((
        StatusCode::CREATED,
        Json(Blob {
            digest: digest.to_string(),
            size: size as i64,
        }),
    ))
}
