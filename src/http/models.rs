//! `/v1/models`: uploads (multipart files, or JSON naming blobs already PUT), the OpenAI-style
//! list with quantd's fields, one model with its files and metrics, deletion, variants, and
//! artifact download with Range support.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tower::ServiceExt;

use super::error::ApiError;
use super::json::parse;
use super::AppState;
use crate::catalog::{self, IncomingFile};
use crate::db::{self, models::ModelRow};
use crate::store::Digest;

/// The OpenAI model object, extended with quantd's fields.
pub fn model_json(row: &ModelRow) -> Value {
    json!({
        "id": row.id,
        "object": "model",
        "created": row.created_at,
        "owned_by": "quantd",
        "kind": row.kind,
        "architecture": row.architecture,
        "parameters": row.parameters,
        "size_bytes": row.size_bytes,
        "bits_per_weight": row.bits_per_weight,
        "format": row.format,
        "base_model": row.base_model,
        "job_id": row.job_id,
        "status": "ready",
    })
}

pub async fn list_models(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let rows = db::models::list(state.jobs.db()).await?;
    let data: Vec<Value> = rows
        .iter()
        .map(|row| {
            let mut v = model_json(row);
            // Every stored model can be served; these are in memory right now.
            v["loaded"] = json!(state.engine.is_loaded(&row.id));
            v
        })
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

async fn existing(state: &AppState, id: &str) -> Result<ModelRow, ApiError> {
    db::models::get(state.jobs.db(), id)
        .await?
        .ok_or_else(|| ApiError::not_found("id", format!("model {id:?} does not exist")))
}

/// A model's latest value of each model-level metric, and what its latest evaluation was
/// measured against (reference, dataset, ctx, max_tokens, job).
async fn model_metrics(
    db: &db::Db,
    id: &str,
) -> Result<(BTreeMap<String, Option<f64>>, Value), sqlx::Error> {
    let mut evaluation = Value::Null;
    let mut metrics = BTreeMap::new();
    for m in db::metrics::for_model(db, id).await? {
        if m.name == "perplexity" {
            evaluation = m
                .label
                .as_deref()
                .and_then(|l| serde_json::from_str(l).ok())
                .unwrap_or(Value::Null);
        }
        metrics.insert(m.name, m.value);
    }
    Ok((metrics, evaluation))
}

pub async fn get_model(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let row = existing(&state, &id).await?;
    let db = state.jobs.db();
    let files = db::models::files(db, &id).await?;
    let (metrics, evaluation) = model_metrics(db, &id).await?;
    let mut v = model_json(&row);
    v["summary"] = serde_json::from_str(&row.summary).unwrap_or(Value::Null);
    v["files"] = json!(files);
    v["metrics"] = json!(metrics);
    v["evaluation"] = evaluation;
    Ok(Json(v))
}

/// Every variant of a base with what it trades: type, size, bits per weight, and the latest
/// evaluation's Δppl, KL divergence, top-1 agreement and speed; smallest first.
pub async fn list_variants(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    existing(&state, &id).await?;
    let db = state.jobs.db();
    let mut data = Vec::new();
    for row in db::models::variants(db, &id).await? {
        let (m, evaluation) = model_metrics(db, &row.id).await?;
        let summary: Value = serde_json::from_str(&row.summary).unwrap_or(Value::Null);
        let get = |name: &str| m.get(name).copied().flatten();
        data.push(json!({
            "id": row.id,
            "object": "model.variant",
            "method": summary.get("method"),
            "type": summary.get("type"),
            "size_bytes": row.size_bytes,
            "bits_per_weight": row.bits_per_weight,
            "bits_per_weight_total": summary.get("bits_per_weight_total"),
            "perplexity": get("perplexity"),
            "reference_perplexity": get("reference_perplexity"),
            "delta_ppl_pct": get("delta_ppl_pct"),
            "kld_mean": get("kld_mean"),
            "kld_p99": get("kld_p99"),
            "top1_agreement_pct": get("top1_agreement_pct"),
            "prompt_tok_s": get("prompt_tok_s"),
            "decode_tok_s": get("decode_tok_s"),
            "evaluation": evaluation,
        }));
    }
    Ok(Json(json!({"object": "list", "data": data})))
}

pub async fn delete_model(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    catalog::delete_model(state.jobs.db(), state.jobs.store(), &id).await?;
    Ok(Json(json!({"id": id, "object": "model", "deleted": true})))
}

pub async fn list_artifacts(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    existing(&state, &id).await?;
    let files = db::models::files(state.jobs.db(), &id).await?;
    let data: Vec<Value> = files
        .iter()
        .map(|f| json!({"name": f.name, "size": f.size, "digest": f.digest, "url": format!("/v1/models/{id}/artifacts/{}", f.name)}))
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

/// Streams an artifact; Range, If-Range and HEAD are handled by tower-http's `ServeFile`.
pub async fn download_artifact(
    State(state): State<AppState>,
    Path((id, name)): Path<(String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    existing(&state, &id).await?;
    let files = db::models::files(state.jobs.db(), &id).await?;
    let file = files.into_iter().find(|f| f.name == name).ok_or_else(|| {
        ApiError::not_found("name", format!("model {id:?} has no artifact {name:?}"))
    })?;
    let digest =
        Digest::parse(&file.digest).map_err(|e| ApiError::internal("reading a file row", e))?;
    let path = state.jobs.store().path(&digest);
    let mut resp = tower_http::services::ServeFile::new(path)
        .oneshot(req)
        .await
        .map_err(|e| ApiError::internal("serving an artifact", e))?
        .map(Body::new);
    let disposition = format!(
        "attachment; filename=\"{}\"",
        name.replace(['"', '\\'], "_")
    );
    if let Ok(v) = HeaderValue::from_str(&disposition) {
        resp.headers_mut().insert(header::CONTENT_DISPOSITION, v);
    }
    resp.headers_mut().insert(
        "x-digest",
        HeaderValue::from_str(&file.digest).expect("digest is ASCII"),
    );
    Ok(resp)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateFromBlobs {
    name: Option<String>,
    files: BTreeMap<String, String>,
}

/// `POST /v1/models`: multipart files, or JSON `{name, files: {file name: digest}}`.
pub async fn create_model(
    State(state): State<AppState>,
    req: Request,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let (name, files) = if content_type.starts_with("multipart/form-data") {
        let multipart = Multipart::from_request(req, &state)
            .await
            .map_err(|e| ApiError::bad_request("body", e.body_text()))?;
        receive_multipart(&state, multipart).await?
    } else if content_type.starts_with("application/json") {
        let limit = state.settings().limits.max_json_bytes;
        let bytes = stalled(axum::body::to_bytes(req.into_body(), limit))
            .await?
            .map_err(|_| {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_request_error",
                    format!("JSON body exceeds {limit} bytes"),
                )
                .with_param("body")
            })?;
        let body: CreateFromBlobs = parse(&bytes)?;
        (body.name, files_from_blobs(&state, body.files).await?)
    } else {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            "send multipart/form-data files or application/json blob digests",
        )
        .with_param("content-type"));
    };
    let row = catalog::create_base_model(
        state.jobs.db(),
        state.jobs.store(),
        state.settings(),
        name,
        files,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(model_json(&row))))
}

const MAX_NAME_FIELD: usize = 256;

async fn receive_multipart(
    state: &AppState,
    mut multipart: Multipart,
) -> Result<(Option<String>, Vec<IncomingFile>), ApiError> {
    let store = state.jobs.store();
    let mut budget = state.settings().limits.max_upload_bytes;
    let mut name = None;
    let mut files = Vec::new();
    while let Some(field) = stalled(multipart.next_field())
        .await?
        .map_err(|e| multipart_error(&e))?
    {
        let field_name = field.name().unwrap_or("").to_string();
        let file_name = field.file_name().map(str::to_string);
        if field_name == "name" && file_name.is_none() {
            let text = stalled(field.text())
                .await?
                .map_err(|e| multipart_error(&e))?;
            if text.len() > MAX_NAME_FIELD {
                return Err(ApiError::invalid(
                    "name",
                    format!("at most {MAX_NAME_FIELD} bytes"),
                ));
            }
            name = Some(text.trim().to_string());
            continue;
        }
        let file_name = file_name.unwrap_or(field_name);
        if file_name.is_empty()
            || file_name.contains(['/', '\\'])
            || file_name == ".."
            || file_name == "."
        {
            return Err(ApiError::invalid(
                "files",
                format!("file name {file_name:?} must be a plain name without directories"),
            ));
        }
        let (temp, digest, size) = store
            .receive(Box::pin(field), budget, "limits.max_upload_bytes")
            .await?;
        budget -= size;
        files.push(IncomingFile {
            name: file_name,
            digest,
            size,
            temp: Some(temp),
        });
    }
    Ok((name, files))
}

/// Cuts off a client that stops sending (DESIGN §8: slow clients time out).
async fn stalled<T>(fut: impl std::future::Future<Output = T>) -> Result<T, ApiError> {
    tokio::time::timeout(crate::store::UPLOAD_IDLE_TIMEOUT, fut)
        .await
        .map_err(|_| {
            crate::store::StoreError::Stalled(crate::store::UPLOAD_IDLE_TIMEOUT.as_secs()).into()
        })
}

fn multipart_error(e: &axum::extract::multipart::MultipartError) -> ApiError {
    let status = e.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::new(
            status,
            "invalid_request_error",
            format!("upload exceeds limits.max_upload_bytes: {}", e.body_text()),
        )
        .with_param("body");
    }
    ApiError::bad_request(
        "body",
        format!("malformed multipart body: {}", e.body_text()),
    )
}

async fn files_from_blobs(
    state: &AppState,
    files: BTreeMap<String, String>,
) -> Result<Vec<IncomingFile>, ApiError> {
    let mut out = Vec::with_capacity(files.len());
    for (name, digest) in files {
        let param = format!("files.{name}");
        let digest =
            Digest::parse(&digest).map_err(|e| ApiError::invalid(param.clone(), e.to_string()))?;
        let size = db::blobs::exists(state.jobs.db(), digest.as_str())
            .await?
            .ok_or_else(|| {
                ApiError::invalid(
                    param.clone(),
                    format!("blob {digest} has not been uploaded (PUT /v1/blobs/{digest})"),
                )
            })?;
        out.push(IncomingFile {
            name,
            digest,
            size: size as u64,
            temp: None,
        });
    }
    Ok(out)
}
