//! `/v1/jobs`: submit (validated into a `JobSpec`, planned, queued), list, get, cancel, retry,
//! and the SSE event stream.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::Json;
use futures::Stream;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::json::ValidJson;
use super::wire::ServerSentEvent;
use super::AppState;
use crate::db::{self, jobs::JobRow};
use crate::formats::int8_rows::WeightScale;
use crate::jobs::spec::{
    CalibrationParams, EvalParams, ExportFormat, Gate, HeadMode, JobSpec, MethodSpec,
};
use crate::jobs::submit::{submit, Submitted};

/// A job to submit (DESIGN §4). Each method's `params`, and the `calibration`, `eval` and
/// `gate` blocks, are checked field by field; an error names the field (`params.bits`).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(
    json!({"model": "smollm2", "method": "gguf", "params": {"type": "Q8_0"}}),
    json!({"model": "smollm2", "method": "rtn", "params": {"bits": 8, "group_size": 64}}),
    json!({"model": "smollm2", "method": "gptq", "params": {"bits": 4, "group_size": 32},
           "calibration": {"samples": 2, "seq_len": 32}}),
    json!({"model": "smollm2", "method": "awq", "params": {"group_size": 32},
           "calibration": {"samples": 2, "seq_len": 32}}),
    json!({"model": "smollm2", "method": "int8-dynamic", "params": {"activations": "torch"}}),
    json!({"model": "smollm2", "method": "llm-int8", "params": {"threshold": 6.0}}),
    json!({"model": "smollm2", "method": "nf4", "params": {"block_size": 32}}),
    json!({"model": "smollm2", "method": "fp4", "params": {}, "dry_run": true}),
))]
pub struct JobRequest {
    /// The model to quantize or evaluate.
    #[schema(example = "smollm2")]
    model: String,
    /// gguf, rtn, gptq, awq, int8-dynamic, llm-int8, nf4, fp4 or eval.
    #[schema(schema_with = crate::jobs::spec::schema::method_name)]
    method: String,
    /// The new variant's id; by default `MODEL:VARIANT`.
    output_name: Option<String>,
    /// The method's parameters (`{"type": "Q4_K_M"}`, `{"bits": 4, "group_size": 128}`, ...).
    #[serde(default)]
    #[schema(schema_with = crate::jobs::spec::schema::method_params)]
    params: Value,
    /// `{"dataset": "ds_..."}`, or `{}` to calibrate on text the model generates.
    calibration: Option<CalibrationParams>,
    /// Evaluate the result: `{"dataset": "ds_...", "max_tokens": 4096, ...}`.
    eval: Option<EvalParams>,
    /// Fail the job when the evaluation misses these budgets.
    gate: Option<Gate>,
    /// Extra exports: gptq-safetensors, awq-safetensors, bnb-safetensors.
    outputs: Option<Vec<String>>,
    /// The same key returns the existing job instead of a second one.
    idempotency_key: Option<String>,
    /// Plan only: what would be made, and its size.
    #[serde(default)]
    dry_run: bool,
}

impl JobRequest {
    /// Parse, don't validate: the wire request becomes a typed spec or a 4xx naming the field.
    fn into_spec(self) -> Result<(JobSpec, Option<String>, bool), ApiError> {
        // The order of the checks decides which error a request with several gets: the method's
        // name, the blocks, the eval method's rules, the idempotency key, then the params.
        MethodSpec::check_name(&self.method)?;
        let (calibration, eval, gate) = (self.calibration, self.eval, self.gate);
        if let Some(c) = &calibration {
            c.validate()?;
        }
        if let Some(e) = &eval {
            e.validate()?;
        }
        if let Some(g) = &gate {
            g.validate()?;
            if eval.is_none() {
                return Err(ApiError::invalid(
                    "gate",
                    "a gate needs an eval block: its metrics come from the evaluation",
                ));
            }
        }
        if self.method == "eval" {
            if eval.is_none() {
                return Err(ApiError::invalid(
                    "eval",
                    "method \"eval\" needs an eval block naming a dataset",
                ));
            }
            for (field, present) in [
                ("output_name", self.output_name.is_some()),
                ("outputs", self.outputs.is_some()),
            ] {
                if present {
                    return Err(ApiError::invalid(
                        field,
                        format!("method \"eval\" makes no model, so it takes no {field}"),
                    ));
                }
            }
        }
        if let Some(key) = &self.idempotency_key {
            if key.is_empty() || key.len() > 256 {
                return Err(ApiError::invalid(
                    "idempotency_key",
                    format!("must be 1 to 256 bytes, got {}", key.len()),
                ));
            }
        }
        let method = MethodSpec::parse(&self.method, self.params)?;
        let gguf = matches!(method, MethodSpec::Gguf(_));
        match (method.calibrates(), calibration.is_some()) {
            (false, true) => {
                let hint = if gguf {
                    " (set params.imatrix: true to collect an importance matrix on it)"
                } else {
                    ""
                };
                return Err(ApiError::invalid(
                    "calibration",
                    format!("method {:?} does not calibrate{hint}", method.name()),
                ));
            }
            (true, false) => {
                let what = if gguf {
                    "params.imatrix".to_string()
                } else {
                    format!("method {:?}", method.name())
                };
                return Err(ApiError::invalid(
                    "calibration",
                    format!(
                        "{what} needs a calibration block: {{\"dataset\": \"ds_...\"}}, or {{}} \
                         to calibrate data-free on text the model generates itself"
                    ),
                ));
            }
            _ => {}
        }
        let mut outputs = Vec::new();
        for name in self.outputs.iter().flatten() {
            let invalid = |why: String| Err(ApiError::invalid("outputs", why));
            if name == "gguf" {
                continue;
            }
            let Some(format) = ExportFormat::parse(name) else {
                return invalid(format!(
                    "unknown output {name:?} (known: gguf, gptq-safetensors, awq-safetensors, \
                     bnb-safetensors)"
                ));
            };
            if format == ExportFormat::BnbSafetensors {
                let bnb = method.bnb4_kind().is_some() || method.int8_activations().is_some();
                if !bnb {
                    return invalid(format!(
                        "output {name:?} holds bitsandbytes weights: methods nf4, fp4, llm-int8 \
                         and int8-dynamic make them"
                    ));
                }
                if let MethodSpec::Int8Dynamic(p) = &method {
                    if p.weight_scale() != WeightScale::PerChannel
                        || p.head_mode() != HeadMode::Float
                    {
                        return invalid(format!(
                            "output {name:?} holds bitsandbytes' int8 rows, which have a scale per \
                             row and a float lm_head: use params weights \"per_channel\" and head \
                             \"float\""
                        ));
                    }
                }
                if !outputs.contains(&format) {
                    outputs.push(format);
                }
                continue;
            }
            let Some(bits) = method.group_format().map(|f| f.bits) else {
                return invalid(format!(
                    "output {name:?} needs integer groups: methods rtn, gptq and awq make them"
                ));
            };
            if format == ExportFormat::AwqSafetensors && bits != 4 {
                return invalid(format!(
                    "output {name:?} holds 4-bit groups; this job makes {bits}-bit ones"
                ));
            }
            if !outputs.contains(&format) {
                outputs.push(format);
            }
        }
        // An eval job's output name is its own id, filled in at submit.
        let output_name = match (self.output_name, method.default_variant()) {
            (Some(name), _) => name,
            (None, Some(variant)) => format!("{}:{variant}", self.model),
            (None, None) => String::new(),
        };
        Ok((
            JobSpec {
                model: self.model,
                output_name,
                method,
                calibration,
                eval,
                gate,
                outputs,
            },
            self.idempotency_key,
            self.dry_run,
        ))
    }
}

/// A job as the API shows it.
#[derive(Serialize, ToSchema)]
pub struct Job {
    pub id: String,
    /// Always `job`.
    pub object: &'static str,
    pub model: String,
    pub method: String,
    #[schema(value_type = Object)]
    pub params: Value,
    /// The variant it makes; null for an eval job, which makes no model.
    pub output_name: Option<String>,
    pub eval: Value,
    pub gate: Value,
    /// queued, running, succeeded, failed or cancelled.
    pub status: String,
    pub stage: Option<String>,
    pub progress: Progress,
    /// Estimated from the progress so far, while running.
    pub eta_seconds: Option<i64>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub attempts: i64,
    pub max_attempts: i64,
    /// The replica whose worker runs the job, or ran it last (`host-pid-random`); null while
    /// queued.
    pub worker: Option<String>,
    pub error: Option<String>,
    pub idempotency_key: Option<String>,
    /// What the job will make and how: tensors, types, sizes.
    pub plan: Value,
    /// The job's report: evaluation metrics, per-tensor errors, timings.
    pub metrics: Value,
    /// The model it made, once it succeeded.
    pub output_model: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct Progress {
    pub done: i64,
    pub total: i64,
    /// tensors, tokens, layers, ...
    pub unit: Option<String>,
}

impl Job {
    pub fn from_row(row: &JobRow) -> Self {
        let spec: Value = serde_json::from_str(&row.spec).unwrap_or(Value::Null);
        let field = |name: &str| spec.get(name).cloned().unwrap_or(Value::Null);
        let eta = match (
            row.status.as_str(),
            row.started_at,
            row.progress_done,
            row.progress_total,
        ) {
            ("running", Some(start), done, total) if done > 0 && total > done => {
                let elapsed = (db::now() - start).max(0) as f64;
                Some((elapsed / done as f64 * (total - done) as f64).round() as i64)
            }
            _ => None,
        };
        Self {
            id: row.id.clone(),
            object: "job",
            model: row.model_id.clone(),
            method: row.method.clone(),
            params: field("params"),
            // An eval job makes no model; its output name is only its id.
            output_name: (row.method != "eval").then(|| row.output_name.clone()),
            eval: field("eval"),
            gate: field("gate"),
            status: row.status.clone(),
            stage: row.stage.clone(),
            progress: Progress {
                done: row.progress_done,
                total: row.progress_total,
                unit: row.progress_unit.clone(),
            },
            eta_seconds: eta,
            created_at: row.created_at,
            started_at: row.started_at,
            finished_at: row.finished_at,
            attempts: row.attempts,
            worker: row.owner.clone(),
            max_attempts: row.max_attempts,
            error: row.error.clone(),
            idempotency_key: row.idempotency_key.clone(),
            plan: serde_json::from_str(&row.plan).unwrap_or(Value::Null),
            metrics: row
                .report
                .as_deref()
                .and_then(|r| serde_json::from_str(r).ok())
                .unwrap_or(Value::Null),
            output_model: row.output_model.clone(),
        }
    }
}

/// What `POST /v1/jobs` answers: the job, or with `dry_run` its plan.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum Submission {
    Job(Box<Job>),
    Plan(PlanOnly),
}

#[derive(Serialize, ToSchema)]
pub struct PlanOnly {
    /// Always `plan`.
    pub object: &'static str,
    pub dry_run: bool,
    #[schema(value_type = Object)]
    pub plan: Value,
}

#[derive(Serialize, ToSchema)]
pub struct JobList {
    /// Always `list`.
    pub object: &'static str,
    pub data: Vec<Job>,
    /// More jobs follow; ask again with `after` = the last id.
    pub has_more: bool,
}

#[utoipa::path(post, path = "/v1/jobs", tag = "jobs", request_body = JobRequest,
    responses(
        (status = 202, description = "queued", body = Job),
        (status = 200, description = "an existing job with this idempotency key, or a dry run's plan", body = Submission),
        (status = 400, description = "not JSON", body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 415, body = ErrorBody),
        (status = 422, description = "a field is invalid; `param` names it", body = ErrorBody)))]
pub async fn create_job(
    State(state): State<AppState>,
    ValidJson(req): ValidJson<JobRequest>,
) -> Result<(StatusCode, Json<Submission>), ApiError> {
    let (spec, key, dry_run) = req.into_spec()?;
    let job = |row: &JobRow| Submission::Job(Box::new(Job::from_row(row)));
    Ok(match submit(&state.jobs, spec, key, dry_run).await? {
        Submitted::Queued(row) => (StatusCode::ACCEPTED, Json(job(&row))),
        Submitted::Existing(row) => (StatusCode::OK, Json(job(&row))),
        Submitted::Plan(plan) => (
            StatusCode::OK,
            Json(Submission::Plan(PlanOnly {
                object: "plan",
                dry_run: true,
                plan: serde_json::to_value(plan).map_err(|e| ApiError::internal("planning", e))?,
            })),
        ),
    })
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// queued, running, succeeded, failed or cancelled.
    status: Option<String>,
    /// Only jobs on this model.
    model: Option<String>,
    /// 1..=100, default 20.
    limit: Option<u32>,
    /// The last id of the previous page.
    after: Option<String>,
}

const STATUSES: &[&str] = &["queued", "running", "succeeded", "failed", "cancelled"];

#[utoipa::path(get, path = "/v1/jobs", tag = "jobs", params(ListQuery),
    responses((status = 200, body = JobList), (status = 422, body = ErrorBody)))]
pub async fn list_jobs(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<JobList>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    if let Some(s) = &q.status {
        if !STATUSES.contains(&s.as_str()) {
            return Err(ApiError::invalid(
                "status",
                format!("{s:?} is not one of {}", STATUSES.join(", ")),
            ));
        }
    }
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("{limit} is outside 1..=100"),
        ));
    }
    let rows = db::jobs::list(
        state.jobs.db(),
        &db::jobs::ListFilter {
            status: q.status.as_deref(),
            model: q.model.as_deref(),
            after: q.after.as_deref(),
            limit: limit + 1,
        },
    )
    .await?;
    let has_more = rows.len() > limit as usize;
    Ok(Json(JobList {
        object: "list",
        data: rows
            .iter()
            .take(limit as usize)
            .map(Job::from_row)
            .collect(),
        has_more,
    }))
}

async fn existing(state: &AppState, id: &str) -> Result<JobRow, ApiError> {
    db::jobs::get(state.jobs.db(), id)
        .await?
        .ok_or_else(|| ApiError::not_found("id", format!("job {id:?} does not exist")))
}

#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs", params(("id" = String, Path)),
    responses((status = 200, body = Job), (status = 404, body = ErrorBody)))]
pub async fn get_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Job>, ApiError> {
    Ok(Json(Job::from_row(&existing(&state, &id).await?)))
}

#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", tag = "jobs", params(("id" = String, Path)),
    responses((status = 202, description = "cancelled, or cancelling at its next checkpoint", body = Job),
        (status = 404, body = ErrorBody),
        (status = 409, description = "the job has finished", body = ErrorBody)))]
pub async fn cancel_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    let db = state.jobs.db();
    match db::jobs::request_cancel(db, &id).await?.as_deref() {
        None => {
            return Err(ApiError::not_found(
                "id",
                format!("job {id:?} does not exist"),
            ))
        }
        Some("queued") => {
            let data = json!({"status": "cancelled", "error": null});
            db::jobs::add_event(db, &id, "cancelled", &data).await?;
            state.jobs.events().publish(crate::jobs::JobEvent {
                job_id: id.clone(),
                kind: "cancelled",
                data,
            });
        }
        Some("running") => state.jobs.signal_cancel(&id),
        Some(other) => {
            return Err(ApiError::conflict(
                "id",
                format!("job {id:?} is {other}; only queued or running jobs can be cancelled"),
            ))
        }
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(Job::from_row(&existing(&state, &id).await?)),
    ))
}

#[utoipa::path(post, path = "/v1/jobs/{id}/retry", tag = "jobs", params(("id" = String, Path)),
    responses((status = 202, description = "queued again", body = Job),
        (status = 404, body = ErrorBody),
        (status = 409, description = "the job is not failed or cancelled, its output exists, or its model was deleted or replaced", body = ErrorBody)))]
pub async fn retry_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    let job = existing(&state, &id).await?;
    if let Some(planned) = &job.model_revision {
        let current = db::models::get(state.jobs.db(), &job.model_id).await?;
        if current.is_none_or(|m| m.revision != *planned) {
            return Err(ApiError::conflict(
                "model",
                format!(
                    "model {:?} was deleted or replaced since this job was planned; submit a new job",
                    job.model_id
                ),
            ));
        }
    }
    if db::models::get(state.jobs.db(), &job.output_name)
        .await?
        .is_some()
    {
        return Err(ApiError::conflict(
            "output_name",
            format!(
                "model {:?} exists now; delete it before retrying",
                job.output_name
            ),
        ));
    }
    let retried = match db::jobs::retry(state.jobs.db(), &id).await {
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            return Err(ApiError::conflict(
                "output_name",
                format!("another job is already producing {:?}", job.output_name),
            ));
        }
        other => other?,
    };
    match retried.as_deref() {
        Some("failed") | Some("cancelled") => {}
        Some(other) => {
            return Err(ApiError::conflict(
                "id",
                format!("job {id:?} is {other}; only failed or cancelled jobs can be retried"),
            ))
        }
        None => {
            return Err(ApiError::not_found(
                "id",
                format!("job {id:?} does not exist"),
            ))
        }
    }
    // The answer is the job as the retry left it, read before a worker is woken to claim it
    // (as submit does), so it says `queued` and not whatever a fast worker made of it.
    let queued = existing(&state, &id).await?;
    state.jobs.wake();
    Ok((StatusCode::ACCEPTED, Json(Job::from_row(&queued))))
}

/// How often an SSE follower reads the job's new events from the database. Events of a job
/// this replica runs wake it at once; a job on another replica's worker is seen this late.
const EVENTS_TAIL_POLL: Duration = Duration::from_millis(500);

/// SSE: the stored history first (stages, logs, the outcome), then live events, ending after
/// `done`, `failed` or `cancelled`. Durable events come from the `job_events` table, followed
/// with a cursor, so a subscriber on any replica sees every event of a job whichever worker
/// runs it; progress comes from this replica's workers at once, and from the job row (written
/// every `progress_interval_ms`) for jobs elsewhere.
#[utoipa::path(get, path = "/v1/jobs/{id}/events", tag = "jobs", params(("id" = String, Path)),
    responses((status = 200, description = "Server-sent events: progress, stage, log, metric, \
        then done, failed or cancelled; each data line is JSON", content_type = "text/event-stream", body = ServerSentEvent),
        (status = 404, body = ErrorBody)))]
pub async fn job_events(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let mut live = state.jobs.events().subscribe();
    let job = existing(&state, &id).await?;
    let history = db::jobs::events(state.jobs.db(), &id).await?;
    let snapshot = |job: &JobRow| json!({"stage": job.stage, "done": job.progress_done, "total": job.progress_total, "unit": job.progress_unit});
    let stream = async_stream::stream! {
        let mut progress = snapshot(&job);
        yield Ok(Event::default().event("progress").data(progress.to_string()));
        // Whether the current run's final event was sent (a retry starts a new run).
        let mut final_sent = false;
        let mut cursor = 0;
        for e in history {
            final_sent = is_final_kind(&e.kind) || (final_sent && e.kind != "retried");
            cursor = e.id;
            yield Ok(Event::default().event(e.kind).id(e.id.to_string()).data(e.data));
        }
        let db = state.jobs.db();
        let shutdown = state.jobs.shutdown_token().clone();
        let mut job = job;
        loop {
            if is_terminal(&job.status) {
                if !final_sent {
                    // Ended without a final event in the table (the lease reaper writes the
                    // status first): say how from the row.
                    let kind = if job.status == "succeeded" { "done".to_string() } else { job.status.clone() };
                    let data = json!({"status": job.status, "error": job.error, "output_model": job.output_model});
                    yield Ok(Event::default().event(kind).data(data.to_string()));
                }
                break;
            }
            let woken = tokio::select! {
                r = live.recv() => Some(r),
                _ = tokio::time::sleep(EVENTS_TAIL_POLL) => None,
                _ = shutdown.cancelled() => break,
            };
            match woken {
                Some(Ok(ev)) if ev.job_id != id => continue,
                Some(Ok(ev)) if ev.kind == "progress" => {
                    yield Ok(Event::default().event("progress").data(ev.data.to_string()));
                    continue;
                }
                Some(Err(tokio::sync::broadcast::error::RecvError::Closed)) => break,
                // A durable event of this job, dropped events (lagged), or the poll: read the
                // table. The row first: an outcome it shows is already among the events.
                _ => {}
            }
            let row = db::jobs::get(db, &id).await;
            let events = db::jobs::events_after(db, &id, cursor).await;
            let (Ok(Some(row)), Ok(events)) = (row, events) else {
                continue;
            };
            job = row;
            for e in events {
                final_sent = is_final_kind(&e.kind) || (final_sent && e.kind != "retried");
                cursor = e.id;
                yield Ok(Event::default().event(e.kind).id(e.id.to_string()).data(e.data));
            }
            if woken.is_none() && job.status == "running" {
                let now = snapshot(&job);
                if now != progress {
                    progress = now;
                    yield Ok(Event::default().event("progress").data(progress.to_string()));
                }
            }
        }
    };
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

fn is_terminal(status: &str) -> bool {
    matches!(status, "succeeded" | "failed" | "cancelled")
}

fn is_final_kind(kind: &str) -> bool {
    matches!(kind, "done" | "failed" | "cancelled")
}
