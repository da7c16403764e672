//! `GET /metrics` (public, as /health is: Prometheus scrapes without keys) and the middleware
//! that counts and times every request by its route template, so `/v1/jobs/{id}` is one
//! series however many jobs there are.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AppState;
use crate::db;
use crate::metrics::Live;

/// Prometheus text exposition 0.0.4; every name starts with `quantd_`.
#[utoipa::path(get, path = "/metrics", tag = "service", security(()),
    responses((status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain", body = String)))]
pub async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let jobs = db::jobs::counts(state.jobs.db())
        .await
        .map_err(|e| ApiError::internal("reading job counts", e))?
        .into_iter()
        .map(|(m, s, n)| (m, s, n.max(0) as u64))
        .collect();
    let models = state.engine.stats();
    let body = state.jobs.metrics().render(&Live { jobs, models });
    Ok((
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        body,
    )
        .into_response())
}

/// Records each request's route, method, status and time to its response head.
pub async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let method = req.method().to_string();
    let response = next.run(req).await;
    state.jobs.metrics().http_request(
        &route,
        &method,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}
