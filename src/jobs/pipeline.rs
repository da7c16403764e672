//! The synchronous work of a `gguf` job, shared by the job worker and `quantd quantize` so both
//! run the same code: read tensors one by one from the checkpoint, quantize each one's rows in
//! parallel on a bounded rayon pool, stream them into a GGUF in order, check for cancellation
//! between tensors, and report per-tensor error and size.

use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use super::calibrate::{Calibrated, CalibrationReport};
use crate::formats::bnb4;
use crate::formats::gguf::TensorType;
use crate::formats::gguf::{GgufWriter, TensorDecl, Value};
use crate::formats::gptq_layout::{PackedLinear, PartType, PARTS};
use crate::formats::int8_rows::{self, Int8Rows};
use crate::model::checkpoint::Checkpoint;
use crate::quant::imatrix::ImatrixError;
use crate::quant::plan::OwnForm;
use crate::quant::tensor_quant::{
    quantize_bnb4, quantize_grouped, quantize_int8_rows, quantize_tensor, TensorQuantError,
};
use crate::quant::weighted_blocks::uses_importance;
use crate::quant::Plan;
use crate::store::{Digest, HashingWriter};

/// What the pipeline tells its caller while it runs.
pub trait Hooks: Sync {
    /// `done` of `total` units (tensors) finished in `stage`.
    fn progress(&self, stage: &'static str, done: u64, total: u64, unit: &'static str);
    /// Polled between tensors; true stops the work.
    fn cancelled(&self) -> bool;
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("cancelled")]
    Cancelled,
    #[error(transparent)]
    Tensor(#[from] TensorQuantError),
    #[error("reading tensor {name}: {source}")]
    Read {
        name: String,
        source: candle_core::Error,
    },
    #[error("calibrating: {0}")]
    Calibration(String),
    #[error(transparent)]
    Imatrix(#[from] ImatrixError),
    #[error("writing output: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone, Serialize)]
pub struct TensorReport {
    pub name: String,
    #[serde(rename = "type")]
    pub type_name: &'static str,
    pub bytes: u64,
    pub rel_rmse: f64,
    /// None when lossless (infinite SNR does not fit JSON).
    pub snr_db: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback_from: Option<&'static str>,
    /// Whether an importance matrix weighted the encoder.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub imatrix: bool,
}

/// What importance matrix a file was quantized with.
#[derive(Debug, Clone, Serialize)]
pub struct ImatrixReport {
    pub entries: usize,
    /// Tensors whose encoder it weighted (Q8_0 and float tensors ignore it, as in llama.cpp).
    pub weighted_tensors: usize,
    pub datasets: Vec<String>,
    pub chunk_count: u32,
    pub chunk_size: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct GgufReport {
    pub tensors: Vec<TensorReport>,
    pub file_bytes: u64,
    pub bits_per_weight: f64,
    pub bits_per_weight_total: f64,
    pub wall_seconds: f64,
    pub threads: usize,
    /// What a calibrated method was calibrated on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calibration: Option<CalibrationReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub imatrix: Option<ImatrixReport>,
}

/// Writes the GGUF for `plan` to `out_path`; returns its digest, size and the report.
/// Tensors a calibrated method quantized itself are written as they are; the others are
/// encoded with the importance matrix's weights where it has an entry for them.
pub fn quantize_gguf(
    ckpt: &Checkpoint,
    plan: &Plan,
    calibrated: Calibrated,
    metadata: &[(String, Value)],
    out_path: &Path,
    pool: &rayon::ThreadPool,
    hooks: &dyn Hooks,
) -> Result<(Digest, u64, GgufReport), PipelineError> {
    let start = Instant::now();
    let Calibrated {
        tensors: mut precomputed,
        imatrix,
    } = calibrated;
    let importance = imatrix.as_ref();
    let layout_parts = layout_part_decls(plan);
    let mut decls: Vec<TensorDecl<'_>> = Vec::with_capacity(plan.tensors.len());
    for (t, parts) in plan.tensors.iter().zip(&layout_parts) {
        match parts {
            Some(parts) => decls.extend(parts.iter().map(|(name, shape, dtype)| TensorDecl {
                name,
                shape,
                dtype: *dtype,
            })),
            None => decls.push(TensorDecl {
                name: &t.name,
                shape: &t.shape,
                dtype: t.dtype.into(),
            }),
        }
    }
    let mut writer = GgufWriter::begin(HashingWriter::create(out_path)?, metadata, &decls)?;
    let total = plan.tensors.len() as u64;
    hooks.progress("quantizing", 0, total, "tensors");
    let threads = pool.current_num_threads().max(1);
    let mut reports = Vec::with_capacity(plan.tensors.len());
    let mut weighted_tensors = 0;
    // One tensor at a time (memory holds one), its rows quantized in parallel on the pool.
    for (done, t) in plan.tensors.iter().enumerate() {
        if hooks.cancelled() {
            return Err(PipelineError::Cancelled);
        }
        let mut weighted = false;
        let (bytes, err) = match precomputed.remove(&t.name) {
            Some(done) => done,
            None => {
                let src = ckpt
                    .tensor(t.tied_to.unwrap_or(&t.name))
                    .expect("plan was made from this checkpoint");
                let data = ckpt.read_f32(src).map_err(|source| PipelineError::Read {
                    name: t.name.clone(),
                    source,
                })?;
                match (t.own_form, t.groups) {
                    (Some(OwnForm::Int8Rows(scale)), _) => {
                        quantize_int8_rows(&t.name, &data, t.shape[1], scale)?
                    }
                    (Some(OwnForm::Bnb4(format)), _) => {
                        quantize_bnb4(&t.name, &data, t.shape[1], format)?
                    }
                    (None, Some(format)) => {
                        let row_len = *t.shape.last().expect("grouped tensors are 2-D");
                        quantize_grouped(&t.name, &data, row_len, format, pool)?
                    }
                    (None, None) => {
                        let row_len = *t.shape.last().unwrap_or(&1);
                        let weights = match importance {
                            Some(m) if uses_importance(t.dtype) => m.weights(&t.name, row_len)?,
                            _ => None,
                        };
                        weighted = weights.is_some();
                        let w = weights.as_deref();
                        quantize_tensor(&t.name, &data, &t.shape, t.dtype, w, pool)?
                    }
                }
            }
        };
        match &layout_parts[done] {
            // The parts were encoded back to back, in declaration order.
            Some(parts) => {
                let mut at = 0;
                for (name, shape, dtype) in parts {
                    let elems = shape.iter().product::<usize>() as u64;
                    let len = dtype.bytes(elems).expect("parts are whole elements") as usize;
                    writer.write_tensor(name, &bytes[at..at + len])?;
                    at += len;
                }
            }
            None => writer.write_tensor(&t.name, &bytes)?,
        }
        reports.push(TensorReport {
            name: t.name.clone(),
            type_name: t.type_name,
            bytes: bytes.len() as u64,
            rel_rmse: err.rel_rmse,
            snr_db: err.snr_db.is_finite().then_some(err.snr_db),
            fallback_from: t.fallback_from,
            imatrix: weighted,
        });
        weighted_tensors += weighted as usize;
        hooks.progress("quantizing", done as u64 + 1, total, "tensors");
    }
    let (digest, size) = writer.finish()?.finish()?;
    Ok((
        digest,
        size,
        GgufReport {
            tensors: reports,
            file_bytes: size,
            bits_per_weight: plan.bits_per_weight,
            bits_per_weight_total: plan.bits_per_weight_total,
            wall_seconds: start.elapsed().as_secs_f64(),
            threads,
            calibration: None,
            imatrix: importance.map(|m| ImatrixReport {
                entries: m.entries.len(),
                weighted_tensors,
                datasets: m.datasets.clone(),
                chunk_count: m.chunk_count,
                chunk_size: m.chunk_size,
            }),
        },
    ))
}

/// For each planned tensor, the GGUF tensors of its parts (name, shape, type) when it is
/// stored in the GPTQ layout or one of quantd's own forms, or `None` when it is one GGML
/// tensor.
#[allow(clippy::type_complexity)]
fn layout_part_decls(plan: &Plan) -> Vec<Option<Vec<(String, Vec<usize>, TensorType)>>> {
    plan.tensors
        .iter()
        .map(|t| {
            let prefix = t.name.strip_suffix(".weight").unwrap_or(&t.name);
            let (rows, cols) = (*t.shape.first()?, *t.shape.get(1)?);
            let declare = |parts: &[(&str, PartType)], shapes: &[Vec<usize>]| {
                parts
                    .iter()
                    .zip(shapes)
                    .map(|((suffix, ty), shape)| {
                        (
                            format!("{prefix}.{suffix}"),
                            shape.clone(),
                            ty.tensor_type(),
                        )
                    })
                    .collect()
            };
            match t.own_form {
                Some(OwnForm::Int8Rows(_)) => {
                    return Some(declare(
                        &int8_rows::PARTS,
                        &Int8Rows::part_shapes(rows, cols),
                    ))
                }
                Some(OwnForm::Bnb4(f)) => {
                    let shapes =
                        bnb4::Format::part_shapes(f.double_quant, rows, cols, f.block_size);
                    return Some(declare(&bnb4::Format::parts(f.double_quant), &shapes));
                }
                None => {}
            }
            let format = t.groups.filter(|_| t.is_layout())?;
            let groups = cols.div_ceil(format.group_len(cols));
            let shapes = PackedLinear::part_shapes(format.bits, rows, cols, groups);
            Some(declare(&PARTS, &shapes))
        })
        .collect()
}
