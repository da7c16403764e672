//! Loading and unloading models by hand, and the engine's counters.

use axum::extract::{Path, State};
use axum::Json;
use serde_json::{json, Value};

use super::{model_for, InferenceError};
use crate::db;
use crate::http::error::ApiError;
use crate::http::AppState;

/// `POST /v1/models/{id}/load`
pub async fn load_model(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, InferenceError> {
    let m = model_for(&state, &id).await?;
    Ok(Json(json!({
        "id": m.id,
        "object": "model",
        "loaded": true,
        "weight_bytes": m.weight_bytes,
        "max_positions": m.max_positions(),
    })))
}

/// `POST /v1/models/{id}/unload`: running sequences finish first.
pub async fn unload_model(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if db::models::get(state.jobs.db(), &id).await?.is_none() {
        return Err(ApiError::not_found(
            "id",
            format!("model {id:?} does not exist"),
        ));
    }
    let was_loaded = state.engine.unload(&id);
    Ok(Json(
        json!({"id": id, "object": "model", "loaded": false, "was_loaded": was_loaded}),
    ))
}

/// `GET /v1/engine`: per loaded model, what its engine did so far.
pub async fn engine_stats(State(state): State<AppState>) -> Json<Value> {
    let s = state.engine.settings();
    Json(json!({
        "max_batch": s.max_batch,
        "queue_depth": s.queue_depth,
        "memory_budget_bytes": s.memory_budget_bytes,
        "models": state.engine.stats(),
    }))
}
