//! A job's eval stage (DESIGN §5): the model the job made (or, for `method: "eval"`, a stored
//! model) scored beside its reference on the job's dataset, window by window, with progress
//! and cancellation between windows; then speed on this host. The reference's own results
//! (perplexity, speed) are cached per (model, dataset, ctx, max_tokens), so every variant of a
//! base is compared with the same base numbers and the base's speed is measured once. KL
//! divergence needs the reference's full distribution at every scored token, and keeping it
//! would be the logits file DESIGN §5 rules out, so the reference runs beside each variant.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::{info, warn};

use super::hooks::JobHooks;
use super::pipeline::Hooks;
use super::spec::{EvalParams, GateCheck, JobSpec};
use super::stage::RunError;
use super::JobSystem;
use crate::catalog;
use crate::db::evals::BaselineKey;
use crate::db::metrics::MetricRow;
use crate::db::{self};
use crate::eval::{eval_tokens, evaluate, speed, EvalError, EvalSpec, Speed, Summary};
use crate::model::checkpoint::Checkpoint;
use crate::model::servable::{self, Servable};
use crate::nn::llama::LayerOutliers;
use crate::store::Digest;

/// What is evaluated.
pub(super) enum Target {
    /// A stored model (eval jobs).
    Model(String),
    /// The file a job just wrote, not yet a model.
    File { name: String, path: PathBuf },
}

/// The reference's results, cached in `eval_baselines`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Baseline {
    perplexity: f64,
    scored_tokens: usize,
    speed: Option<Speed>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub reference: String,
    pub dataset: String,
    pub ctx: usize,
    pub max_tokens: usize,
    pub text_tokens: usize,
    pub windows: usize,
    #[serde(flatten)]
    pub summary: Summary,
    /// Bytes of the evaluated model's weights file(s).
    pub bytes: u64,
    /// Over the whole model: bytes · 8 / parameters.
    pub bits_per_weight_total: f64,
    pub speed: Option<Speed>,
    pub reference_speed: Option<Speed>,
    /// The reference's results were cached by an earlier job (its speed was not re-measured).
    pub reference_cached: bool,
    pub eval_seconds: f64,
    /// LLM.int8(): outlier columns per linear over the evaluation text.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub outliers: Vec<LayerOutliers>,
}

impl EvalReport {
    /// The gate's inputs, in its order: mean KL, Δppl %, top-1 %.
    pub fn gate_inputs(&self) -> (f64, f64, f64) {
        let s = &self.summary;
        (
            s.kld_mean.unwrap_or(0.0),
            s.delta_ppl_pct.unwrap_or(0.0),
            s.top1_agreement_pct.unwrap_or(100.0),
        )
    }

    /// Model-level metric rows; the label says what they were measured against.
    pub fn metric_rows(&self, job_id: &str) -> Vec<MetricRow> {
        let label = json!({"reference": self.reference, "dataset": self.dataset, "ctx": self.ctx,
                           "max_tokens": self.max_tokens, "job_id": job_id})
        .to_string();
        let s = &self.summary;
        let mut values: Vec<(&str, Option<f64>)> = vec![
            ("perplexity", Some(s.perplexity)),
            ("reference_perplexity", s.reference_perplexity),
            ("delta_ppl_pct", s.delta_ppl_pct),
            ("kld_mean", s.kld_mean),
            ("kld_median", s.kld_median),
            ("kld_p99", s.kld_p99),
            ("kld_max", s.kld_max),
            ("top1_agreement_pct", s.top1_agreement_pct),
            ("eval_scored_tokens", Some(s.scored_tokens as f64)),
        ];
        if let Some(sp) = &self.speed {
            values.extend([
                ("prompt_tok_s", Some(sp.prompt_tok_s)),
                ("decode_tok_s", Some(sp.decode_tok_s)),
                ("speed_threads", Some(sp.threads as f64)),
            ]);
        }
        values
            .into_iter()
            .map(|(name, value)| MetricRow {
                subject: "model".into(),
                name: name.into(),
                value,
                label: Some(label.clone()),
            })
            .collect()
    }
}

/// The message a missed gate fails the job with: every missed bound with its value.
pub fn gate_failure(checks: &[GateCheck]) -> Option<String> {
    let missed: Vec<String> = checks
        .iter()
        .filter(|c| !c.passed)
        .map(|c| {
            let op = if c.bound.starts_with("max") { ">" } else { "<" };
            format!("{} {:.6} {op} {} {}", c.metric, c.value, c.bound, c.limit)
        })
        .collect();
    (!missed.is_empty()).then(|| format!("accuracy gate missed: {}", missed.join("; ")))
}

fn failed(context: &str) -> impl Fn(String) -> RunError + '_ {
    move |e| RunError::Failed(format!("{context}: {e}"))
}

/// Runs the eval stage of `spec` on `target`.
pub(super) async fn run(
    js: &JobSystem,
    lease: &db::jobs::Lease,
    spec: &JobSpec,
    params: &EvalParams,
    target: Target,
    cancel: Arc<AtomicBool>,
) -> Result<EvalReport, RunError> {
    let db = js.db();
    let job_id = lease.job_id.as_str();
    let reference_id = spec.reference().to_string();
    let dataset = db::datasets::get(db, &params.dataset)
        .await?
        .ok_or_else(|| RunError::Failed(format!("dataset {:?} was deleted", params.dataset)))?;
    let text_path = js
        .store()
        .local_path(&Digest::parse(&dataset.digest).map_err(|e| RunError::Failed(e.to_string()))?)
        .await?;
    let reference_ckpt =
        catalog::open_checkpoint(db, js.store(), js.settings(), &reference_id).await?;
    let (target_ckpt, target_id, bytes) = match &target {
        Target::Model(id) if *id == reference_id => (None, Some(id.clone()), None),
        Target::Model(id) => (
            Some(catalog::open_checkpoint(db, js.store(), js.settings(), id).await?),
            Some(id.clone()),
            None,
        ),
        Target::File { name, path } => {
            let files = BTreeMap::from([(name.clone(), path.clone())]);
            let limits = catalog::check_limits(js.settings());
            let ckpt =
                Checkpoint::open(&files, limits).map_err(|e| RunError::Failed(e.to_string()))?;
            (Some(ckpt), None, Some(std::fs::metadata(path)?.len()))
        }
    };
    let bytes = match (bytes, &target_id) {
        (Some(b), _) => b,
        (None, Some(id)) => db::models::get(db, id)
            .await?
            .map_or(0, |m| m.size_bytes as u64),
        (None, None) => 0,
    };
    let key = BaselineKey {
        model_id: &reference_id,
        dataset_id: &params.dataset,
        ctx: params.ctx,
        max_tokens: params.max_tokens,
    };
    let cached: Option<Baseline> = db::evals::baseline(db, &key)
        .await?
        .and_then(|r| serde_json::from_str(&r).ok());

    let hooks = JobHooks::new(js, lease, cancel);
    let params_run = params.clone();
    let cached_speed = cached.as_ref().and_then(|b| b.speed.clone());
    let scored = super::stage::spawn_blocking_in_span(move || {
        score(
            &reference_ckpt,
            target_ckpt.as_ref(),
            &text_path,
            &params_run,
            cached_speed,
            &hooks,
        )
    })
    .await
    .map_err(|e| RunError::Failed(format!("evaluation thread panicked: {e}")))??;

    let parameters = scored.parameters.max(1);
    let report = EvalReport {
        reference: reference_id.clone(),
        dataset: params.dataset.clone(),
        ctx: params.ctx,
        max_tokens: params.max_tokens,
        text_tokens: scored.text_tokens,
        windows: scored.windows,
        bits_per_weight_total: bytes as f64 * 8.0 / parameters as f64,
        bytes,
        speed: scored.speed,
        reference_cached: cached.is_some(),
        reference_speed: scored.reference_speed.clone(),
        eval_seconds: scored.seconds,
        summary: scored.summary,
        outliers: scored.outliers,
    };
    let reference_ppl = report.summary.reference_perplexity.unwrap_or(f64::NAN);
    if let Some(c) = &cached {
        if (c.perplexity / reference_ppl - 1.0).abs() > 1e-9 {
            warn!(cached = c.perplexity, now = reference_ppl, reference = %reference_id,
                  "the reference scored differently than when it was cached");
        }
    }
    let baseline = Baseline {
        perplexity: reference_ppl,
        scored_tokens: report.summary.scored_tokens,
        speed: scored.reference_speed,
    };
    db::evals::put_baseline(db, &key, &json!(baseline), job_id).await?;
    for id in [Some(reference_id.as_str()), target_id.as_deref()]
        .into_iter()
        .flatten()
    {
        db::evals::put_dataset_tokens(db, &params.dataset, id, scored.text_tokens).await?;
    }
    info!(ppl = report.summary.perplexity, reference_ppl, kld = ?report.summary.kld_mean,
          seconds = report.eval_seconds, "evaluated");
    Ok(report)
}

/// What the blocking part measured.
struct Scored {
    summary: Summary,
    text_tokens: usize,
    windows: usize,
    parameters: u64,
    speed: Option<Speed>,
    reference_speed: Option<Speed>,
    seconds: f64,
    outliers: Vec<LayerOutliers>,
}

impl From<EvalError> for RunError {
    fn from(e: EvalError) -> Self {
        match e {
            EvalError::Cancelled => RunError::Cancelled,
            other => RunError::Failed(format!("evaluating: {other}")),
        }
    }
}

/// Loads both models, checks they tokenize the text the same way, scores, and measures speed.
fn score(
    reference_ckpt: &Checkpoint,
    target_ckpt: Option<&Checkpoint>,
    text_path: &std::path::Path,
    params: &EvalParams,
    cached_reference_speed: Option<Speed>,
    hooks: &JobHooks,
) -> Result<Scored, RunError> {
    let text = std::fs::read_to_string(text_path)?;
    let load = |ckpt: &Checkpoint| -> Result<Servable, RunError> {
        // Room for the speed measurement's 512-token prompt and 128 decoded tokens.
        servable::load(ckpt, params.ctx.max(640))
            .map_err(|e| RunError::Failed(format!("loading: {e}")))
    };
    let reference = load(reference_ckpt)?;
    let target = target_ckpt.map(load).transpose()?;
    let model = target.as_ref().unwrap_or(&reference);
    if model.llama.vocab_size() != reference.llama.vocab_size() {
        return Err(RunError::Failed(format!(
            "the model's vocabulary has {} tokens, the reference's {}: KL divergence needs one tokenizer",
            model.llama.vocab_size(),
            reference.llama.vocab_size()
        )));
    }
    let tokens = eval_tokens(&model.tokenizer, &text).map_err(failed("dataset"))?;
    if target.is_some() {
        let theirs = eval_tokens(&reference.tokenizer, &text).map_err(failed("dataset"))?;
        if let Some(i) = (0..tokens.ids.len().max(theirs.ids.len()))
            .find(|&i| tokens.ids.get(i) != theirs.ids.get(i))
        {
            return Err(RunError::Failed(format!(
                "the model and the reference tokenize the dataset differently (first at token {i}); \
                 KL divergence needs one tokenizer"
            )));
        }
    }
    let spec = EvalSpec {
        ctx: params.ctx,
        max_scored: Some(params.max_tokens),
        bos: tokens.bos,
    };
    let started = Instant::now();
    let summary = evaluate(
        &model.llama,
        Some(&reference.llama),
        &tokens.ids,
        &spec,
        |done, total| {
            hooks.progress("evaluating", done as u64, total as u64, "windows");
            if hooks.cancelled() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        },
    )?;
    let seconds = started.elapsed().as_secs_f64();
    // Read before the speed runs add their calls.
    let outliers = model.llama.outlier_report();
    let windows = spec.windows(tokens.ids.len());
    let measure = |s: &Servable| -> Result<Option<Speed>, RunError> {
        if !params.speed || hooks.cancelled() {
            return Ok(None);
        }
        speed::measure(&s.llama, 512, 128, 3)
            .map(Some)
            .map_err(|e| RunError::Failed(format!("measuring speed: {e}")))
    };
    let speed = measure(model)?;
    let reference_speed = match cached_reference_speed {
        Some(s) => Some(s),
        None if target.is_none() => speed.clone(),
        None => measure(&reference)?,
    };
    if hooks.cancelled() {
        return Err(RunError::Cancelled);
    }
    Ok(Scored {
        summary,
        text_tokens: tokens.ids.len(),
        windows,
        parameters: reference_ckpt
            .tensors
            .iter()
            .map(|t| t.shape.iter().product::<usize>() as u64)
            .sum(),
        speed,
        reference_speed,
        seconds,
        outliers,
    })
}
