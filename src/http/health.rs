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
    /// `ok`.
    pub database: &'static str,
    /// Which engine: `sqlite` or `postgres`.
    pub database_backend: &'static str,
    /// `ok`: the blob store answers.
    pub store: &'static str,
    /// Where blobs live: `local` (data_dir) or the object store's URL.
    pub store_location: String,
    /// `running`, or `none` on an `api` replica.
    pub workers: &'static str,
    /// What this replica does: `all`, `api` or `worker`.
    pub role: &'static str,
    /// This replica's name, as job owners show it.
    pub replica: String,
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
    let db_ok = state.jobs.db().ping().await;
    let store_ok = state.jobs.store().ping().await;
    let workers = state.ready.load(Ordering::SeqCst);
    let role = state.settings().role;
    if db_ok && store_ok && workers {
        Ok(Json(Ready {
            status: "ready",
            database: "ok",
            database_backend: match state.jobs.db().backend() {
                crate::db::Backend::Sqlite => "sqlite",
                crate::db::Backend::Postgres => "postgres",
            },
            store: "ok",
            store_location: state
                .jobs
                .store()
                .remote_url()
                .unwrap_or("local")
                .to_string(),
            workers: if role.runs_jobs() { "running" } else { "none" },
            role: match role {
                crate::config::Role::All => "all",
                crate::config::Role::Api => "api",
                crate::config::Role::Worker => "worker",
            },
            replica: state.jobs.replica_id().to_string(),
        }))
    } else {
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            format!(
                "not ready: database {}, store {}, workers {}",
                if db_ok { "ok" } else { "unreachable" },
                if store_ok { "ok" } else { "unreachable" },
                if workers { "running" } else { "starting" }
            ),
        ))
    }
}

pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found_error", "no such route")
}
