//! The HTTP API (DESIGN §2): routes, wire types, validation into domain types, auth, and the
//! mapping of errors to statuses. Handlers are thin: they parse, call catalog/jobs, and shape
//! the response.

mod auth;
mod blobs;
mod dashboard;
mod datasets;
pub mod error;
mod health;
mod inference;
mod jobs;
pub mod json;
mod metrics;
mod models;
pub mod openapi;
mod origin_guard;
mod wire;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post, put};
use axum::Router;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultOnResponse, TraceLayer};

use crate::config::Settings;
use crate::engine::Engine;
use crate::jobs::JobSystem;

pub use auth::{Keys, Scope};

/// Everything a handler needs.
#[derive(Clone)]
pub struct AppState {
    pub jobs: JobSystem,
    pub engine: Engine,
    pub keys: Arc<Keys>,
    /// Set once recovery finished and workers run.
    pub ready: Arc<AtomicBool>,
}

impl AppState {
    pub fn settings(&self) -> &Settings {
        self.jobs.settings()
    }
}

/// The whole API as a router, so tests can call it in memory.
pub fn router(state: AppState) -> Router {
    let settings = state.settings().clone();
    let upload_limit =
        DefaultBodyLimit::max(settings.limits.max_upload_bytes.min(usize::MAX as u64) as usize);
    let json_limit = DefaultBodyLimit::max(settings.limits.max_json_bytes);
    let timeout = TimeoutLayer::with_status_code(
        axum::http::StatusCode::REQUEST_TIMEOUT,
        Duration::from_secs(settings.server.request_timeout_secs),
    );

    // Uploads and downloads stream for as long as the data flows; the rest are bounded.
    let transfer = Router::new()
        .route(
            "/v1/blobs/{digest}",
            put(blobs::put_blob).head(blobs::head_blob),
        )
        .route("/v1/models", post(models::create_model))
        .layer(upload_limit)
        .route(
            "/v1/models/{id}/artifacts/{name}",
            get(models::download_artifact),
        );

    let api = Router::new()
        .route("/v1/models", get(models::list_models))
        .route(
            "/v1/models/{id}",
            get(models::get_model).delete(models::delete_model),
        )
        .route("/v1/models/{id}/artifacts", get(models::list_artifacts))
        .route("/v1/models/{id}/variants", get(models::list_variants))
        .route("/v1/jobs", post(jobs::create_job).get(jobs::list_jobs))
        .route("/v1/jobs/{id}", get(jobs::get_job))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel_job))
        .route("/v1/jobs/{id}/retry", post(jobs::retry_job))
        .layer(json_limit)
        .layer(timeout);

    let events = Router::new().route("/v1/jobs/{id}/events", get(jobs::job_events));

    let datasets = Router::new()
        .route(
            "/v1/datasets",
            post(datasets::create_dataset).get(datasets::list_datasets),
        )
        .route(
            "/v1/datasets/{id}",
            get(datasets::get_dataset).delete(datasets::delete_dataset),
        )
        .layer(DefaultBodyLimit::max(settings.limits.max_dataset_bytes));

    // Generations stream for as long as they run, so no request timeout here.
    let inference = Router::new()
        .route("/v1/completions", post(inference::completions::completions))
        .route(
            "/v1/chat/completions",
            post(inference::chat::chat_completions),
        )
        .route("/v1/models/{id}/load", post(inference::load_model))
        .route("/v1/models/{id}/unload", post(inference::unload_model))
        .route("/v1/engine", get(inference::engine_stats))
        .layer(DefaultBodyLimit::max(settings.limits.max_json_bytes));

    let protected = transfer
        .merge(api)
        .merge(events)
        .merge(inference)
        .merge(datasets)
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ));

    let service = Router::new()
        .route("/health", get(health::health))
        .route("/ready", get(health::ready))
        .route("/metrics", get(metrics::metrics));
    // A worker replica answers only what its orchestrator probes.
    let routes = if settings.role.serves_api() {
        service
            .route("/openapi.json", get(openapi::serve_openapi))
            .merge(dashboard::router())
            .merge(protected)
    } else {
        service
    };
    routes
        .fallback(health::not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            origin_guard::guard,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        // Every request gets an `x-request-id` (kept if the client sent one), logged in the
        // trace span and echoed in the response, so a user's report can be found in the log.
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(TraceLayer::new_for_http().make_span_with(|req: &axum::http::Request<_>| {
            let id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("-");
            tracing::info_span!("request", method = %req.method(), uri = %req.uri(), request_id = %id)
        })
        // One access line per response (status, latency), inside the request's span.
        .on_response(DefaultOnResponse::new().level(tracing::Level::INFO)))
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .with_state(state)
}
