//! The dashboard at `/`: server-rendered HTML with no build step and nothing fetched from
//! elsewhere. The overview lists base models with their variants, a trade-off chart per base
//! (bits per weight against KL divergence and Δppl), and recent jobs with live progress; a
//! job page shows its plan, metrics, per-tensor error chart and log.
//!
//! With API keys configured the pages need an admin key: `POST /ui/login` checks one and keeps
//! it in an HttpOnly, SameSite=Strict cookie, which `auth` accepts for GET requests only (so
//! the cookie can read, as the page's event streams need, but never change anything).

pub mod charts;
mod page;

use std::fmt::Write;

use axum::extract::{Form, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;

use self::charts::{Bar, Point, Scale};
use self::page::{escape, page, progress};
use super::auth::{self, Scope};
use super::error::ApiError;
use super::inference::engine_key;
use super::jobs::Job;
use super::models::{variants, Variant};
use super::AppState;
use crate::db;

/// How many jobs the overview lists.
const RECENT_JOBS: u32 = 50;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(overview))
        .route("/ui/jobs/{id}", get(job_page))
        .route("/ui/login", post(login))
}

/// The login page when keys are configured and the request carries no admin key.
fn gate(state: &AppState, headers: &HeaderMap) -> Option<Response> {
    if state.keys.is_empty() {
        return None;
    }
    let scope = auth::key_from_headers(headers, true).and_then(|k| state.keys.scope_of(&k));
    if scope == Some(Scope::Admin) {
        return None;
    }
    let body = page(
        "sign in",
        r#"<h1>Sign in</h1><section class="card"><form method="post" action="/ui/login">
<label>Admin API key <input type="password" name="key" autocomplete="current-password" required></label>
<button type="submit">Sign in</button></form>
<p class="muted">The key is kept in a cookie for this site only.</p></section>"#,
    );
    Some((StatusCode::UNAUTHORIZED, Html(body)).into_response())
}

#[derive(Deserialize)]
struct LoginForm {
    key: String,
}

async fn login(State(state): State<AppState>, Form(form): Form<LoginForm>) -> Response {
    if state.keys.scope_of(&form.key) != Some(Scope::Admin) {
        let body = page(
            "sign in",
            r#"<h1>Sign in</h1><section class="card"><p class="status failed">That is not an admin key.</p><a href="/">try again</a></section>"#,
        );
        return (StatusCode::UNAUTHORIZED, Html(body)).into_response();
    }
    let cookie = format!(
        "{}={}; Path=/; HttpOnly; SameSite=Strict",
        auth::COOKIE,
        hex::encode(form.key.as_bytes())
    );
    let mut resp = Redirect::to("/").into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

fn mb(bytes: i64) -> String {
    format!("{:.1}", bytes as f64 / 1e6)
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map(f).unwrap_or_else(|| "–".into())
}

/// What a job made, or for an unfinished one what it will make (nothing for an eval job).
fn made(job: &Job) -> &str {
    job.output_model
        .as_deref()
        .or(job.output_name.as_deref())
        .unwrap_or("")
}

fn status(s: &str) -> String {
    format!(r#"<span class="status {0}">{0}</span>"#, escape(s))
}

async fn overview(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(login) = gate(&state, &headers) {
        return login;
    }
    match render_overview(&state).await {
        Ok(html) => Html(html).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn render_overview(state: &AppState) -> Result<String, ApiError> {
    let db = state.jobs.db();
    let models = db::models::list(db).await?;
    let mut body = String::from("<h1>Models</h1>");
    let bases: Vec<_> = models.iter().filter(|m| m.base_model.is_none()).collect();
    if bases.is_empty() {
        body.push_str(
            r#"<section class="card muted">No models yet. Upload one with <code>quantd upload DIR_OR_GGUF</code> or <code>POST /v1/models</code>.</section>"#,
        );
    }
    for base in bases {
        let vs = variants(db, &base.id).await?;
        let _ = write!(
            body,
            r#"<section class="card base" data-base="{id}"><h2>{id} <span class="muted">{arch}, {params:.0} M parameters, {size} MB, {loaded}</span></h2>"#,
            id = escape(&base.id),
            arch = escape(&base.architecture),
            params = base.parameters as f64 / 1e6,
            size = mb(base.size_bytes),
            loaded = if state.engine.is_loaded(&engine_key(base)) {
                "loaded"
            } else {
                "not loaded"
            },
        );
        body.push_str(&tradeoff_charts(&vs));
        body.push_str(&variant_table(&vs));
        body.push_str("</section>");
    }
    body.push_str("<h1>Jobs</h1><section class=\"card\">");
    let jobs = db::jobs::recent(db, RECENT_JOBS).await?;
    if jobs.is_empty() {
        body.push_str(r#"<p class="muted">No jobs yet.</p>"#);
    } else {
        body.push_str(
            "<table class=\"jobs\"><tr><th>job</th><th>model</th><th>method</th><th>output</th><th>status</th><th>stage</th><th>progress</th></tr>",
        );
        for row in &jobs {
            let job = Job::from_row(row);
            let live = matches!(job.status.as_str(), "queued" | "running");
            let _ = write!(
                body,
                r#"<tr class="job" data-job="{id}"{live}><td><a href="/ui/jobs/{id}">{id}</a></td><td>{model}</td><td>{method}</td><td>{out}</td><td>{status}</td><td class="stage">{stage}</td><td>{progress}</td></tr>"#,
                id = escape(&job.id),
                live = if live {
                    format!(r#" data-live-job="{}""#, escape(&job.id))
                } else {
                    String::new()
                },
                model = escape(&job.model),
                method = escape(&job.method),
                out = escape(made(&job)),
                status = status(&job.status),
                stage = escape(job.stage.as_deref().unwrap_or("")),
                progress = progress(&job),
            );
        }
        body.push_str("</table>");
    }
    body.push_str("</section>");
    Ok(page("dashboard", &body))
}

/// The two trade-off charts of one base: KLD (log scale) and Δppl against bits per weight,
/// one point per evaluated variant.
fn tradeoff_charts(vs: &[Variant]) -> String {
    let evaluated: Vec<&Variant> = vs
        .iter()
        .filter(|v| {
            v.bits_per_weight.is_some() && (v.kld_mean.is_some() || v.delta_ppl_pct.is_some())
        })
        .collect();
    if evaluated.is_empty() {
        return r#"<p class="muted">No evaluated variants yet: submit a job with an <code>eval</code> block to see the trade-off here.</p>"#.into();
    }
    let labels: Vec<String> = evaluated.iter().map(|v| short_name(v)).collect();
    let points = |y: fn(&Variant) -> Option<f64>| -> Vec<Point> {
        evaluated
            .iter()
            .zip(&labels)
            .filter_map(|(v, l)| {
                Some(Point {
                    id: &v.id,
                    label: l,
                    x: v.bits_per_weight?,
                    y: y(v)?,
                })
            })
            .collect()
    };
    let kld = points(|v| v.kld_mean);
    let ppl = points(|v| v.delta_ppl_pct);
    let mut s = String::from(r#"<div class="charts">"#);
    s.push_str(&charts::scatter(
        "KL divergence vs bits per weight",
        "bits per weight",
        "mean KLD (log)",
        Scale::Log,
        &kld,
    ));
    s.push_str(&charts::scatter(
        "Δ perplexity vs bits per weight",
        "bits per weight",
        "Δppl %",
        Scale::Linear,
        &ppl,
    ));
    s.push_str("</div>");
    let hidden = kld.iter().filter(|p| p.y <= 0.0).count();
    if hidden > 0 {
        let _ = write!(
            s,
            r#"<p class="muted">{hidden} variant(s) with KLD 0 cannot sit on the log axis.</p>"#
        );
    }
    s
}

/// What tells a variant apart beside its siblings: the GGUF type for `gguf` variants (the
/// stored `type` of the others is only their file's dominant tensor type), otherwise the
/// variant part of the id (`rtn-4bit-g128-sym`, `nf4`, `int8-per-token`).
fn short_name(v: &Variant) -> String {
    match (v.method.as_deref(), &v.kind) {
        (Some("gguf"), Some(t)) => t.clone(),
        _ => v.id.rsplit(':').next().unwrap_or(&v.id).to_string(),
    }
}

fn variant_table(vs: &[Variant]) -> String {
    if vs.is_empty() {
        return r#"<p class="muted">No variants yet.</p>"#.into();
    }
    let mut s = String::from(
        "<table class=\"variants\"><tr><th>variant</th><th>method</th><th>type</th><th class=\"num\">MB</th><th class=\"num\">bits/weight</th><th class=\"num\">Δppl</th><th class=\"num\">KLD</th><th class=\"num\">top-1</th><th class=\"num\">prompt tok/s</th><th class=\"num\">decode tok/s</th></tr>",
    );
    for v in vs {
        let _ = write!(
            s,
            r#"<tr class="variant" data-variant="{id}"><td>{id}</td><td>{m}</td><td>{t}</td><td class="num">{mb}</td><td class="num">{bpw}</td><td class="num">{dppl}</td><td class="num">{kld}</td><td class="num">{top1}</td><td class="num">{pp}</td><td class="num">{tg}</td></tr>"#,
            id = escape(&v.id),
            m = escape(v.method.as_deref().unwrap_or("")),
            t = escape(&short_name(v)),
            mb = mb(v.size_bytes),
            bpw = opt(v.bits_per_weight, |x| format!("{x:.2}")),
            dppl = opt(v.delta_ppl_pct, |x| format!("{x:+.2}%")),
            kld = opt(v.kld_mean, |x| format!("{x:.4}")),
            top1 = opt(v.top1_agreement_pct, |x| format!("{x:.1}%")),
            pp = opt(v.prompt_tok_s, |x| format!("{x:.0}")),
            tg = opt(v.decode_tok_s, |x| format!("{x:.1}")),
        );
    }
    s.push_str("</table>");
    s
}

async fn job_page(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(login) = gate(&state, &headers) {
        return login;
    }
    match render_job(&state, &id).await {
        Ok(html) => Html(html).into_response(),
        Err(e) if e.status == StatusCode::NOT_FOUND => {
            let body = format!(
                r#"<h1>No such job</h1><section class="card"><p>{}</p><a href="/">back</a></section>"#,
                escape(&e.message)
            );
            (StatusCode::NOT_FOUND, Html(page("no such job", &body))).into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn render_job(state: &AppState, id: &str) -> Result<String, ApiError> {
    let db = state.jobs.db();
    let row = db::jobs::get(db, id)
        .await?
        .ok_or_else(|| ApiError::not_found("id", format!("job {id:?} does not exist")))?;
    let job = Job::from_row(&row);
    let live = matches!(job.status.as_str(), "queued" | "running");
    let mut body = String::new();
    let _ = write!(
        body,
        r#"<h1>Job {id}</h1><section class="card job" data-job="{id}"{live}><table>
<tr><th>model</th><td>{model}</td></tr><tr><th>method</th><td>{method}</td></tr>
<tr><th>params</th><td><code>{params}</code></td></tr><tr><th>output</th><td>{out}</td></tr>
<tr><th>status</th><td>{status}</td></tr><tr><th>stage</th><td class="stage">{stage}</td></tr>
<tr><th>progress</th><td>{progress}</td></tr><tr><th>attempts</th><td>{attempts}/{max}</td></tr>{error}</table></section>"#,
        id = escape(&job.id),
        live = if live {
            format!(r#" data-live-job="{0}" data-live-log"#, escape(&job.id))
        } else {
            String::new()
        },
        model = escape(&job.model),
        method = escape(&job.method),
        params = escape(&job.params.to_string()),
        out = escape(made(&job)),
        status = status(&job.status),
        stage = escape(job.stage.as_deref().unwrap_or("")),
        progress = progress(&job),
        attempts = job.attempts,
        max = job.max_attempts,
        error = job
            .error
            .as_deref()
            .map(|e| format!(
                r#"<tr><th>error</th><td class="status failed">{}</td></tr>"#,
                escape(e)
            ))
            .unwrap_or_default(),
    );

    let metrics = db::metrics::for_job(db, id).await?;
    let summary: Vec<_> = metrics.iter().filter(|m| m.subject == "model").collect();
    if !summary.is_empty() {
        body.push_str(r#"<h2>Metrics</h2><section class="card"><table class="metrics">"#);
        for m in summary {
            let _ = write!(
                body,
                r#"<tr><th>{}</th><td class="num">{}</td></tr>"#,
                escape(&m.name),
                opt(m.value, |v| format!("{v:.6}")
                    .trim_end_matches('0')
                    .trim_end_matches('.')
                    .to_string())
            );
        }
        body.push_str("</table></section>");
    }
    let errors: Vec<Bar> = metrics
        .iter()
        .filter(|m| m.name == "rel_rmse")
        .filter_map(|m| {
            Some(Bar {
                name: &m.subject,
                group: m.label.as_deref().unwrap_or("?"),
                value: m.value?,
            })
        })
        .collect();
    body.push_str(r#"<h2>Per-tensor error</h2><section class="card">"#);
    if errors.is_empty() {
        body.push_str(r#"<p class="muted">No per-tensor errors (yet): they are recorded when the weights are quantized.</p>"#);
    } else {
        body.push_str(&charts::bars(
            "relative RMSE of each quantized tensor",
            "relative RMSE",
            &errors,
        ));
    }
    body.push_str("</section>");

    // A live job's log comes whole from its event stream (stored history first), so it is
    // only written here once the job has finished.
    let _ = write!(
        body,
        r#"<h2>Log</h2><pre class="log" data-job="{}">"#,
        escape(id)
    );
    if !live {
        for e in db::jobs::events(db, id).await? {
            let _ = writeln!(body, "{} {}", escape(&e.kind), escape(&e.data));
        }
    }
    body.push_str("</pre>");
    Ok(page(&format!("job {id}"), &body))
}
