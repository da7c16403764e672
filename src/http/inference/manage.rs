//! Loading and unloading models by hand, and the engine's counters.

use axum::extract::{Path, State};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::{model_for, InferenceError};
use crate::db;
use crate::engine::{ModelStats, Unloading};
use crate::http::error::{ApiError, ErrorBody};
use crate::http::AppState;

#[derive(Serialize, ToSchema)]
pub struct Loaded {
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    pub loaded: bool,
    pub weight_bytes: usize,
    /// The context the engine serves it with.
    pub max_positions: usize,
}

#[derive(Serialize, ToSchema)]
pub struct Unloaded {
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    pub loaded: bool,
    pub was_loaded: bool,
}

#[derive(Serialize, ToSchema)]
pub struct EngineStats {
    pub max_batch: usize,
    pub queue_depth: usize,
    pub memory_budget_bytes: u64,
    pub models: Vec<ModelStats>,
    /// Models unloaded or deleted whose weights are still in memory: sequences still finishing
    /// after an unload, or an engine thread stopping after a delete.
    pub unloading: Vec<Unloading>,
}

/// `POST /v1/models/{id}/load`
#[utoipa::path(post, path = "/v1/models/{id}/load", tag = "inference", params(("id" = String, Path)),
    responses((status = 200, body = Loaded), (status = 404, body = ErrorBody),
        (status = 400, description = "the model cannot be served", body = ErrorBody),
        (status = 429, description = "the engine is full", body = ErrorBody)))]
pub async fn load_model(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Loaded>, InferenceError> {
    let m = model_for(&state, &id).await?;
    Ok(Json(Loaded {
        id: m.key.id.clone(),
        object: "model",
        loaded: true,
        weight_bytes: m.weight_bytes,
        max_positions: m.max_positions(),
    }))
}

/// `POST /v1/models/{id}/unload`: running sequences finish first.
#[utoipa::path(post, path = "/v1/models/{id}/unload", tag = "inference", params(("id" = String, Path)),
    responses((status = 200, body = Unloaded), (status = 404, body = ErrorBody)))]
pub async fn unload_model(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Unloaded>, ApiError> {
    if db::models::get(state.jobs.db(), &id).await?.is_none() {
        return Err(ApiError::not_found(
            "id",
            format!("model {id:?} does not exist"),
        ));
    }
    let was_loaded = state.engine.unload(&id);
    Ok(Json(Unloaded {
        id,
        object: "model",
        loaded: false,
        was_loaded,
    }))
}

/// `GET /v1/engine`: per loaded model, what its engine did so far.
#[utoipa::path(get, path = "/v1/engine", tag = "inference",
    responses((status = 200, body = EngineStats)))]
pub async fn engine_stats(State(state): State<AppState>) -> Json<EngineStats> {
    let s = state.engine.settings();
    Json(EngineStats {
        max_batch: s.max_batch,
        queue_depth: s.queue_depth,
        memory_budget_bytes: s.memory_budget_bytes,
        models: state.engine.stats(),
        unloading: state.engine.unloading(),
    })
}
