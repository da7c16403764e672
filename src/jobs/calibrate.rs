//! The calibrating stage, shared by the job worker and `quantd quantize`: the calibration text
//! tokenized with the model's own tokenizer, seeded windows cut from it (DESIGN §4), or, with
//! no text, windows the model writes itself (`quant::data_free`); then the
//! method's layer-by-layer pass over them. What it quantized goes to the writer as finished
//! tensors (gptq, awq), or the importance matrix collected on the windows weights the block
//! encoders (gguf with `imatrix`); the report says what the method was calibrated on.

use std::collections::HashSet;
use std::ops::ControlFlow;
use std::time::Instant;

use serde::Serialize;

use super::pipeline::{Hooks, PipelineError};
use super::spec::{CalibrationParams, MethodSpec};
use crate::eval::eval_tokens;
use crate::model::checkpoint::Checkpoint;
use crate::model::servable;
use crate::quant::awq::{self, AwqConfig};
use crate::quant::calibration;
use crate::quant::data_free::{self, Generation};
use crate::quant::gptq::GptqConfig;
use crate::quant::gptq_model::{GptqModel, QuantizedTensors};
use crate::quant::imatrix::ImportanceMatrix;
use crate::quant::layerwise::{self, LayerwiseError};
use crate::quant::Plan;

#[derive(Debug, Clone, Serialize)]
pub struct CalibrationReport {
    /// Where the text came from: a dataset id, a file name for the CLI, or "data-free".
    pub source: String,
    /// True when the model generated its own calibration text.
    pub data_free: bool,
    /// How the data-free windows were generated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<Generation>,
    pub text_tokens: usize,
    pub samples: usize,
    pub seq_len: usize,
    pub seed: u64,
    pub tokens: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub true_sequential: Option<bool>,
    /// What the method chose (AWQ: α per layer and scaling group).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
    pub wall_seconds: f64,
}

/// The calibration windows `params` cut from `text` (token ids of the model's tokenizer).
pub fn calibration_windows(
    ckpt: &Checkpoint,
    text: &str,
    params: &CalibrationParams,
) -> Result<Vec<Vec<u32>>, PipelineError> {
    Ok(tokenize_and_cut(ckpt, text, params)?.1)
}

/// The text's token count and the windows.
fn tokenize_and_cut(
    ckpt: &Checkpoint,
    text: &str,
    params: &CalibrationParams,
) -> Result<(usize, Vec<Vec<u32>>), PipelineError> {
    let failed = |e: String| PipelineError::Calibration(e);
    let tokenizer = servable::load_tokenizer(ckpt).map_err(|e| failed(e.to_string()))?;
    let ids = eval_tokens(&tokenizer, text).map_err(failed)?.ids;
    let windows = calibration::windows(&ids, params.samples, params.seq_len, params.seed)
        .map_err(|e| failed(e.to_string()))?
        .into_iter()
        .map(<[u32]>::to_vec)
        .collect();
    Ok((ids.len(), windows))
}

/// Where calibration windows come from.
#[derive(Debug, Clone, Copy)]
pub enum CalibrationSource<'a> {
    /// Text (a dataset's, or a file's for the CLI) and the name reports give it.
    Text { text: &'a str, name: &'a str },
    /// Text the model generates itself from its BOS token.
    DataFree,
}

/// Windows the model writes from its BOS token (see `quant::data_free`).
fn data_free_windows(
    ckpt: &Checkpoint,
    params: &CalibrationParams,
    hooks: &dyn Hooks,
) -> Result<(Vec<Vec<u32>>, Generation), PipelineError> {
    let failed = |e: String| PipelineError::Calibration(e);
    let model = servable::load(ckpt, params.seq_len)
        .map_err(|e| failed(format!("loading the model: {e}")))?;
    let start = ckpt
        .config
        .bos_token_id
        .or_else(|| {
            let bos = model.bos_token.as_deref()?;
            model.tokenizer.token_to_id(bos)
        })
        .ok_or_else(|| {
            failed(
                "data-free calibration starts from the model's BOS token, and this model \
                 declares none; give a calibration dataset"
                    .into(),
            )
        })?;
    let progress = |done: usize, total: usize| {
        hooks.progress(
            "calibrating",
            done as u64,
            total as u64,
            "windows generated",
        );
        if hooks.cancelled() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    data_free::generate_windows(
        &model.llama,
        start,
        &model.stop_token_ids,
        params.samples,
        params.seq_len,
        params.seed,
        progress,
    )
    .map_err(|e| failed(format!("generating calibration text: {e}")))?
    .ok_or(PipelineError::Cancelled)
}

/// What calibration produced: tensors a method quantized itself (GGUF names), or an importance
/// matrix for the block encoders.
#[derive(Debug, Default)]
pub struct Calibrated {
    pub tensors: QuantizedTensors,
    pub imatrix: Option<ImportanceMatrix>,
}

/// Runs `method`'s calibration on windows from `from`.
pub fn calibrate(
    ckpt: &Checkpoint,
    method: &MethodSpec,
    plan: &Plan,
    from: CalibrationSource<'_>,
    params: &CalibrationParams,
    hooks: &dyn Hooks,
) -> Result<(Calibrated, CalibrationReport), PipelineError> {
    let started = Instant::now();
    let failed = |e: String| PipelineError::Calibration(e);
    let (source, text_tokens, windows, generation) = match from {
        CalibrationSource::Text { text, name } => {
            let (text_tokens, windows) = tokenize_and_cut(ckpt, text, params)?;
            (name, text_tokens, windows, None)
        }
        CalibrationSource::DataFree => {
            let (windows, generation) = data_free_windows(ckpt, params, hooks)?;
            ("data-free", 0, windows, Some(generation))
        }
    };
    let wanted: HashSet<String> = plan
        .tensors
        .iter()
        .filter(|t| t.groups.is_some())
        .map(|t| t.name.clone())
        .collect();
    // Progress in `unit`s; a cancelled job stops the pass at the next report.
    let progress_in = |unit: &'static str| {
        move |done: usize, total: usize| {
            hooks.progress("calibrating", done as u64, total as u64, unit);
            if hooks.cancelled() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        }
    };
    let progress = progress_in("layers");
    let layerwise_error = |e: LayerwiseError| match e {
        LayerwiseError::Cancelled => PipelineError::Cancelled,
        other => failed(other.to_string()),
    };
    let mut imatrix = None;
    let (tensors, true_sequential, details) = match method {
        MethodSpec::Gguf(_) => {
            let llama = servable::load_llama(ckpt, params.seq_len)
                .map_err(|e| failed(format!("loading the model: {e}")))?;
            let m = ImportanceMatrix::collect(&llama, &windows, source, progress_in("windows"))?
                .ok_or(PipelineError::Cancelled)?;
            let details = serde_json::json!({"imatrix_entries": m.entries.len()});
            imatrix = Some(m);
            (QuantizedTensors::default(), None, Some(details))
        }
        MethodSpec::Gptq(p) => {
            let config = GptqConfig {
                format: p.format(),
                damp_percent: p.damp_percent,
                act_order: p.act_order,
            };
            let mut gptq = GptqModel::new(config, wanted);
            layerwise::run(ckpt, &windows, p.true_sequential, &mut gptq, progress)
                .map_err(layerwise_error)?;
            (gptq.tensors, Some(p.true_sequential), None)
        }
        MethodSpec::Awq(p) => {
            let config = AwqConfig {
                format: p.format(),
                grid: p.grid,
                duo_scaling: p.duo_scaling,
                clip: p.clip,
            };
            let (tensors, choices) =
                awq::run(ckpt, &windows, &wanted, &config, progress).map_err(layerwise_error)?;
            let details =
                serde_json::json!({"alpha": choices, "search_tokens": awq::SEARCH_TOKENS});
            (tensors, None, Some(details))
        }
        other => {
            return Err(failed(format!(
                "method {} does not calibrate",
                other.name()
            )))
        }
    };
    let report = CalibrationReport {
        source: source.to_string(),
        data_free: generation.is_some(),
        generation,
        text_tokens,
        samples: params.samples,
        seq_len: params.seq_len,
        seed: params.seed,
        tokens: params.samples * params.seq_len,
        true_sequential,
        details,
        wall_seconds: started.elapsed().as_secs_f64(),
    };
    Ok((Calibrated { tensors, imatrix }, report))
}
