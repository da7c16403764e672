//! `/v1/models`: uploads (multipart files, or JSON naming blobs already PUT), the OpenAI-style
//! list with quantd's fields, one model with its files and metrics, deletion, variants, and
//! artifact download with Range support.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tower::ServiceExt;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::inference::engine_key;
use super::json::parse;
use super::wire::{list_type, Deleted};
use super::AppState;
use crate::catalog::{self, IncomingFile};
use crate::db::{self, models::ModelRow};
use crate::store::Digest;

/// The OpenAI model object, extended with quantd's fields.
#[derive(Serialize, ToSchema)]
pub struct Model {
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: i64,
    pub owned_by: &'static str,
    /// `base` (uploaded) or `quantized` (made by a job).
    pub kind: String,
    pub architecture: String,
    pub parameters: i64,
    pub size_bytes: i64,
    pub bits_per_weight: Option<f64>,
    /// `gguf`, `safetensors`, ...
    pub format: String,
    /// The base a variant was made from.
    pub base_model: Option<String>,
    /// The job that made a variant.
    pub job_id: Option<String>,
    /// Always `ready`: a model is listed once all its files are stored.
    pub status: &'static str,
    /// In the list only: whether the engine holds it in memory right now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loaded: Option<bool>,
}

impl Model {
    pub fn from_row(row: &ModelRow) -> Self {
        Self {
            id: row.id.clone(),
            object: "model",
            created: row.created_at,
            owned_by: "quantd",
            kind: row.kind.clone(),
            architecture: row.architecture.clone(),
            parameters: row.parameters,
            size_bytes: row.size_bytes,
            bits_per_weight: row.bits_per_weight,
            format: row.format.clone(),
            base_model: row.base_model.clone(),
            job_id: row.job_id.clone(),
            status: "ready",
            loaded: None,
        }
    }
}

/// One model with its files, its latest metrics and what they were measured against.
#[derive(Serialize, ToSchema)]
pub struct ModelDetail {
    #[serde(flatten)]
    pub model: Model,
    /// What the loader found (architecture, tensors, types); free-form.
    pub summary: Value,
    pub files: Vec<ModelFile>,
    /// The latest value of each model-level metric (perplexity, kld_mean, ...).
    pub metrics: BTreeMap<String, Option<f64>>,
    /// The latest evaluation's reference, dataset, ctx and job; null before any.
    pub evaluation: Value,
}

#[derive(Serialize, ToSchema)]
pub struct ModelFile {
    pub name: String,
    /// `sha256:<hex>`.
    pub digest: String,
    pub size: i64,
}

/// A variant of a base with what it trades (DESIGN §5).
#[derive(Serialize, ToSchema)]
pub struct Variant {
    pub id: String,
    /// Always `model.variant`.
    pub object: &'static str,
    pub method: Option<String>,
    /// The plan's GGUF type: the type asked for by a `gguf` job (`Q4_K_M`); for the other
    /// methods, the block type their groups are stored in (`Q4_0`), or `F16` where they keep
    /// their own tensors.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub size_bytes: i64,
    /// Over the quantized linears.
    pub bits_per_weight: Option<f64>,
    /// Over every weight, embeddings and norms included.
    pub bits_per_weight_total: Option<f64>,
    pub perplexity: Option<f64>,
    pub reference_perplexity: Option<f64>,
    pub delta_ppl_pct: Option<f64>,
    pub kld_mean: Option<f64>,
    pub kld_p99: Option<f64>,
    pub top1_agreement_pct: Option<f64>,
    pub prompt_tok_s: Option<f64>,
    pub decode_tok_s: Option<f64>,
    pub evaluation: Value,
}

#[derive(Serialize, ToSchema)]
pub struct Artifact {
    pub name: String,
    pub size: i64,
    pub digest: String,
    /// Where to download it (Range requests work).
    pub url: String,
}

list_type!(ModelList, Model);
list_type!(VariantList, Variant);
list_type!(ArtifactList, Artifact);

#[utoipa::path(get, path = "/v1/models", tag = "models",
    responses((status = 200, description = "every stored model", body = ModelList)))]
pub async fn list_models(State(state): State<AppState>) -> Result<Json<ModelList>, ApiError> {
    let rows = db::models::list(state.jobs.db()).await?;
    let data = rows
        .iter()
        .map(|row| Model {
            // Every stored model can be served; these are in memory right now.
            loaded: Some(state.engine.is_loaded(&engine_key(row))),
            ..Model::from_row(row)
        })
        .collect();
    Ok(Json(ModelList::new(data)))
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

#[utoipa::path(get, path = "/v1/models/{id}", tag = "models", params(("id" = String, Path)),
    responses((status = 200, body = ModelDetail), (status = 404, body = ErrorBody)))]
pub async fn get_model(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ModelDetail>, ApiError> {
    let row = existing(&state, &id).await?;
    let db = state.jobs.db();
    let files = db::models::files(db, &id).await?;
    let (metrics, evaluation) = model_metrics(db, &id).await?;
    Ok(Json(ModelDetail {
        model: Model::from_row(&row),
        summary: serde_json::from_str(&row.summary).unwrap_or(Value::Null),
        files: files
            .into_iter()
            .map(|f| ModelFile {
                name: f.name,
                digest: f.digest,
                size: f.size,
            })
            .collect(),
        metrics,
        evaluation,
    }))
}

/// Every variant of a base with what it trades: type, size, bits per weight, and the latest
/// evaluation's Δppl, KL divergence, top-1 agreement and speed; smallest first.
#[utoipa::path(get, path = "/v1/models/{id}/variants", tag = "models", params(("id" = String, Path)),
    responses((status = 200, body = VariantList), (status = 404, body = ErrorBody)))]
pub async fn list_variants(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<VariantList>, ApiError> {
    existing(&state, &id).await?;
    Ok(Json(VariantList::new(
        variants(state.jobs.db(), &id).await?,
    )))
}

/// The variants of base `id` (the dashboard draws them too).
pub async fn variants(db: &db::Db, id: &str) -> Result<Vec<Variant>, sqlx::Error> {
    let mut data = Vec::new();
    for row in db::models::variants(db, id).await? {
        let (m, evaluation) = model_metrics(db, &row.id).await?;
        let summary: Value = serde_json::from_str(&row.summary).unwrap_or(Value::Null);
        let get = |name: &str| m.get(name).copied().flatten();
        let text = |name: &str| {
            summary
                .get(name)
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        data.push(Variant {
            id: row.id,
            object: "model.variant",
            method: text("method"),
            kind: text("type"),
            size_bytes: row.size_bytes,
            bits_per_weight: row.bits_per_weight,
            bits_per_weight_total: summary.get("bits_per_weight_total").and_then(Value::as_f64),
            perplexity: get("perplexity"),
            reference_perplexity: get("reference_perplexity"),
            delta_ppl_pct: get("delta_ppl_pct"),
            kld_mean: get("kld_mean"),
            kld_p99: get("kld_p99"),
            top1_agreement_pct: get("top1_agreement_pct"),
            prompt_tok_s: get("prompt_tok_s"),
            decode_tok_s: get("decode_tok_s"),
            evaluation,
        });
    }
    Ok(data)
}

#[utoipa::path(delete, path = "/v1/models/{id}", tag = "models", params(("id" = String, Path)),
    responses((status = 200, body = Deleted), (status = 404, body = ErrorBody),
        (status = 409, description = "a job or a variant still needs it", body = ErrorBody)))]
pub async fn delete_model(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Deleted>, ApiError> {
    catalog::delete_model(state.jobs.db(), state.jobs.store(), &id).await?;
    // Streams of it end with an error event, queued requests get 404, and a load of it in
    // flight is discarded: nothing serves a model the catalog no longer has.
    state.engine.retire(&id);
    Ok(Json(Deleted::new(id, "model")))
}

#[utoipa::path(get, path = "/v1/models/{id}/artifacts", tag = "models", params(("id" = String, Path)),
    responses((status = 200, body = ArtifactList), (status = 404, body = ErrorBody)))]
pub async fn list_artifacts(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ArtifactList>, ApiError> {
    existing(&state, &id).await?;
    let files = db::models::files(state.jobs.db(), &id).await?;
    let data = files
        .into_iter()
        .map(|f| Artifact {
            url: format!("/v1/models/{id}/artifacts/{}", f.name),
            name: f.name,
            size: f.size,
            digest: f.digest,
        })
        .collect();
    Ok(Json(ArtifactList::new(data)))
}

/// Streams an artifact; Range, If-Range and HEAD are handled by tower-http's `ServeFile`.
#[utoipa::path(get, path = "/v1/models/{id}/artifacts/{name}", tag = "models",
    params(("id" = String, Path), ("name" = String, Path, description = "file name")),
    responses(
        (status = 200, description = "the file", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 206, description = "the requested range", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 404, body = ErrorBody),
        (status = 416, description = "the range lies outside the file")))]
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
    let path = state.jobs.store().local_path(&digest).await?;
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

/// A model made of blobs already uploaded with `PUT /v1/blobs/{digest}`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateFromBlobs {
    /// The model's id; by default taken from the checkpoint.
    name: Option<String>,
    /// File name → `sha256:<hex>` digest of its blob.
    files: BTreeMap<String, String>,
}

/// Multipart upload: the files of an HF folder (config.json, tokenizer.json, *.safetensors)
/// or one GGUF, each as a file part, plus an optional `name` text part.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct UploadForm {
    name: Option<String>,
    #[schema(value_type = Vec<String>, format = Binary)]
    files: Vec<Vec<u8>>,
}

/// `POST /v1/models`: multipart files, or JSON `{name, files: {file name: digest}}`.
#[utoipa::path(post, path = "/v1/models", tag = "models",
    request_body(description = "multipart files, or JSON naming uploaded blobs",
        content((CreateFromBlobs = "application/json"), (UploadForm = "multipart/form-data"))),
    responses((status = 201, description = "the new base model", body = Model),
        (status = 400, description = "a malformed body", body = ErrorBody),
        (status = 409, description = "a model with this id exists", body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 415, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
pub async fn create_model(
    State(state): State<AppState>,
    req: Request,
) -> Result<(StatusCode, Json<Model>), ApiError> {
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
    Ok((StatusCode::CREATED, Json(Model::from_row(&row))))
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
