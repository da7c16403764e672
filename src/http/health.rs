//! Liveness and readiness (public), and the JSON 404 for unknown routes.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::AppState;

#[derive(Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: &'static str,
}

#[derive(Serialize, ToSchema)]
pub struct Ready {
    /// Always `ready`.
    pub status: &'static str,
    pub database: &'static str,
    pub workers: &'static str,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/health", tag = "service", security(()),
    responses((status = 200, body = Health)))]
pub async fn health() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Ready when start-up recovery is done, workers run and the database answers.
#[utoipa::path(get, path = "/ready", tag = "service", security(()),
    responses((status = 200, body = Ready), (status = 503, body = ErrorBody)))]
pub async fn ready(State(state): State<AppState>) -> Result<Json<Ready>, ApiError> {
    let db_ok = sqlx::query("SELECT 1")
        .execute(state.jobs.db())
        .await
        .is_ok();
    let workers = state.ready.load(Ordering::SeqCst);
    if db_ok && workers {
        Ok(Json(Ready {
            status: "ready",
            database: "ok",
            workers: "running",
        }))
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
