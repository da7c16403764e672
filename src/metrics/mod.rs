//! Prometheus metrics (`GET /metrics`, names prefixed `quantd_`): what the HTTP layer, the job
//! runner and the inference endpoints observe as they go, plus gauges the scrape reads from
//! the database and the engine (jobs by method and status, queue depth, loaded models).

pub mod registry;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use crate::engine::ModelStats;
use registry::{render_gauge, CounterFamily, HistogramFamily, LATENCY_BUCKETS, STAGE_BUCKETS};

/// Token-latency buckets in seconds: a decode step to a long prompt's first token.
const TOKEN_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5.0, 10.0, 30.0,
];

pub struct Metrics {
    http_requests: CounterFamily,
    http_seconds: HistogramFamily,
    stage_seconds: HistogramFamily,
    jobs_finished: CounterFamily,
    tokens: CounterFamily,
    ttft: HistogramFamily,
    itl: HistogramFamily,
    /// The stage each running job is in, and since when.
    stages: Mutex<HashMap<String, (String, &'static str, Instant)>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// What a scrape reads from live state.
#[derive(Default)]
pub struct Live {
    /// (method, status, jobs) from the database.
    pub jobs: Vec<(String, String, u64)>,
    /// The engine's loaded models.
    pub models: Vec<ModelStats>,
}

impl Metrics {
    pub fn new() -> Self {
        Self {
            http_requests: CounterFamily::new(
                "quantd_http_requests_total",
                "HTTP requests answered, by route template, method and status.",
                &["route", "method", "status"],
            ),
            http_seconds: HistogramFamily::new(
                "quantd_http_request_duration_seconds",
                "Time to the response head (streams keep going after it), by route and method.",
                &["route", "method"],
                LATENCY_BUCKETS,
            ),
            stage_seconds: HistogramFamily::new(
                "quantd_job_stage_duration_seconds",
                "Time jobs spent in each stage (loading, calibrating, quantizing, writing, evaluating), by method.",
                &["method", "stage"],
                STAGE_BUCKETS,
            ),
            jobs_finished: CounterFamily::new(
                "quantd_jobs_finished_total",
                "Job runs this process finished, by method and outcome.",
                &["method", "status"],
            ),
            tokens: CounterFamily::new(
                "quantd_tokens_total",
                "Tokens through the inference endpoints, per sequence: direction in (prompt) or out (generated).",
                &["model", "direction"],
            ),
            ttft: HistogramFamily::new(
                "quantd_time_to_first_token_seconds",
                "From a sequence's submission to the engine to its first generated token.",
                &["model"],
                TOKEN_BUCKETS,
            ),
            itl: HistogramFamily::new(
                "quantd_inter_token_latency_seconds",
                "Between consecutive generated tokens of one sequence.",
                &["model"],
                TOKEN_BUCKETS,
            ),
            stages: Mutex::new(HashMap::new()),
        }
    }

    pub fn http_request(&self, route: &str, method: &str, status: u16, seconds: f64) {
        self.http_requests
            .add(&[route, method, &status.to_string()], 1.0);
        self.http_seconds.observe(&[route, method], seconds);
    }

    /// Job `id` entered `stage`; the stage it was in (if any) is observed as finished.
    pub fn job_stage(&self, id: &str, method: &str, stage: &'static str) {
        let previous = self
            .stages
            .lock()
            .unwrap()
            .insert(id.to_string(), (method.to_string(), stage, Instant::now()));
        if let Some((method, stage, since)) = previous {
            self.stage_seconds
                .observe(&[&method, stage], since.elapsed().as_secs_f64());
        }
    }

    /// Job `id` ended its run with `status` (succeeded, failed, cancelled, requeued).
    pub fn job_ended(&self, id: &str, method: &str, status: &str) {
        if let Some((method, stage, since)) = self.stages.lock().unwrap().remove(id) {
            self.stage_seconds
                .observe(&[&method, stage], since.elapsed().as_secs_f64());
        }
        self.jobs_finished.add(&[method, status], 1.0);
    }

    pub fn tokens(&self, model: &str, prompt: usize, generated: usize) {
        self.tokens.add(&[model, "in"], prompt as f64);
        self.tokens.add(&[model, "out"], generated as f64);
    }

    pub fn first_token(&self, model: &str, seconds: f64) {
        self.ttft.observe(&[model], seconds);
    }

    pub fn next_token(&self, model: &str, seconds: f64) {
        self.itl.observe(&[model], seconds);
    }

    /// The whole exposition: observed families, then the live gauges.
    pub fn render(&self, live: &Live) -> String {
        let mut out = String::new();
        render_gauge(
            &mut out,
            "quantd_build_info",
            "The running quantd's version.",
            &["version"],
            &[(vec![env!("CARGO_PKG_VERSION").to_string()], 1.0)],
        );
        self.http_requests.render(&mut out);
        self.http_seconds.render(&mut out);
        let jobs: Vec<_> = live
            .jobs
            .iter()
            .map(|(m, s, n)| (vec![m.clone(), s.clone()], *n as f64))
            .collect();
        render_gauge(
            &mut out,
            "quantd_jobs",
            "Jobs in the database, by method and status.",
            &["method", "status"],
            &jobs,
        );
        let queued = live
            .jobs
            .iter()
            .filter(|(_, s, _)| s == "queued")
            .map(|(_, _, n)| *n)
            .sum::<u64>();
        render_gauge(
            &mut out,
            "quantd_job_queue_depth",
            "Jobs waiting for a worker.",
            &[],
            &[(vec![], queued as f64)],
        );
        self.stage_seconds.render(&mut out);
        self.jobs_finished.render(&mut out);
        self.tokens.render(&mut out);
        self.ttft.render(&mut out);
        self.itl.render(&mut out);
        render_gauge(
            &mut out,
            "quantd_models_loaded",
            "Models loaded for inference.",
            &[],
            &[(vec![], live.models.len() as f64)],
        );
        let per_model = |f: fn(&ModelStats) -> usize| -> Vec<(Vec<String>, f64)> {
            live.models
                .iter()
                .map(|m| (vec![m.id.clone()], f(m) as f64))
                .collect()
        };
        render_gauge(
            &mut out,
            "quantd_model_weight_bytes",
            "Bytes of weights each loaded model holds in memory.",
            &["model"],
            &per_model(|m| m.weight_bytes),
        );
        render_gauge(
            &mut out,
            "quantd_model_running_sequences",
            "Sequences each loaded model is generating.",
            &["model"],
            &per_model(|m| m.active),
        );
        render_gauge(
            &mut out,
            "quantd_model_queued_sequences",
            "Sequences waiting for a model's batch.",
            &["model"],
            &per_model(|m| m.queued),
        );
        out
    }
}
