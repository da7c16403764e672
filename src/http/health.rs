//! Liveness and readiness (public), and the JSON 404 for unknown routes.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use super::error::ApiError;
use super::AppState;

pub async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Ready when start-up recovery is done, workers run and the database answers.
pub async fn ready(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let db_ok = sqlx::query("SELECT 1")
        .execute(state.jobs.db())
        .await
        .is_ok();
    let workers = state.ready.load(Ordering::SeqCst);
    if db_ok && workers {
        Ok(Json(
            json!({"status": "ready", "database": "ok", "workers": "running"}),
        ))
    } else {
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            format!(
                "not ready: database {}, workers {}",
                if db_ok { "ok" } else { "unreachable" },
                if workers { "running" } else { "starting" }
            ),
        ))
    }
}

pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found_error", "no such route")
}
