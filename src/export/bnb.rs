//! bitsandbytes checkpoints from quantd's `nf4`/`fp4` and `llm-int8`/`int8-dynamic` GGUFs, in
//! the layout transformers writes with `save_pretrained` and loads back with bitsandbytes
//! (DESIGN §6):
//!
//! - **4-bit** (`Linear4bit`): per linear `weight` uint8 `[rows·cols/2, 1]` (the packed
//!   indices, row-major, first weight in the high nibble), `weight.absmax` f32 `[blocks]` (or
//!   uint8 with double quantization, plus `weight.nested_absmax` f32, `weight.nested_quant_map`
//!   f32 `[256]`), `weight.quant_map` f32 `[16]`, and `weight.quant_state.bitsandbytes__nf4`
//!   (or `__fp4`): uint8 bytes of the JSON bitsandbytes' `QuantState.as_dict(packed=True)`
//!   writes (quant_type, blocksize, dtype, shape, and the nested block size, dtype and offset).
//! - **8-bit** (`Linear8bitLt`): `weight` int8 `[rows, cols]` and `SCB` f32 `[rows]`, each row's
//!   absmax (127 × quantd's scale).
//!
//! Rows come in HF order: GGUF stores Q/K rows permuted for llama.cpp's rotation, and since
//! blocks and int8 scales belong to rows, un-permuting moves whole rows. The one exception is
//! double quantization of Q/K: its 8-bit absmax codes share scales in runs of 256 that cross
//! rows, so un-permuted they would need new codes. Those weights are written with their absmax
//! decoded to f32 instead (bitsandbytes keeps the quant state per weight, so a checkpoint may
//! mix both; the report counts them): every weight is written exactly as served. Other tensors (embeddings, norms) are written as F16, as
//! quantd stores them; `quantization_config` records the method.

use std::io::Write;
use std::path::Path;

use half::f16;

use super::hf::{create_safetensors, write_side_files, HfExportError, StEntry};
use crate::formats::bnb4::{self, Absmax, Bnb4Weight};
use crate::formats::int8_rows::Int8Rows;
use crate::model::checkpoint::{Checkpoint, SourceDtype, TensorRef};
use crate::model::names;
use crate::store::sync_dir;

#[derive(Debug, thiserror::Error)]
pub enum BnbExportError {
    #[error(transparent)]
    Hf(#[from] HfExportError),
    #[error("{0}")]
    NotBnb(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BnbExportReport {
    /// `nf4`, `fp4` or `int8`.
    pub quant_type: String,
    pub quantized_linears: usize,
    /// Q/K weights whose double-quantized absmax is written decoded, as f32 (see the header).
    pub float_absmax: usize,
}

/// What the linears of `ckpt` are, checked to be all one kind.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Bnb4(bnb4::Format),
    Int8,
}

fn linear_kind(ckpt: &Checkpoint) -> Result<Kind, BnbExportError> {
    let mut kind = None;
    for t in &ckpt.tensors {
        let k = match t.dtype {
            SourceDtype::Int8Rows => Kind::Int8,
            SourceDtype::Bnb4 => {
                let w = bnb4_of(ckpt, t)?;
                Kind::Bnb4(w.format().ok_or_else(|| {
                    BnbExportError::NotBnb(format!(
                        "{}: its 4-bit table is neither NF4 nor FP4",
                        t.name
                    ))
                })?)
            }
            _ => continue,
        };
        match kind {
            None => kind = Some(k),
            Some(prev) if prev != k => {
                return Err(BnbExportError::NotBnb(format!(
                "{} is stored as {k:?}, other linears as {prev:?}; one checkpoint holds one kind",
                t.name
            )))
            }
            Some(_) => {}
        }
    }
    kind.ok_or_else(|| {
        BnbExportError::NotBnb(
            "the file has no bitsandbytes weights: export variants made by nf4, fp4, llm-int8 or \
             int8-dynamic"
                .into(),
        )
    })
}

fn bnb4_of(ckpt: &Checkpoint, t: &TensorRef) -> Result<Bnb4Weight, BnbExportError> {
    ckpt.bnb4_weight(t)
        .expect("a bnb4 tensor")
        .map_err(|e| BnbExportError::NotBnb(e.to_string()))
}

/// Rows of `data` (`row_len` values each) in HF order.
fn hf_rows<T: Copy>(ckpt: &Checkpoint, gguf_name: &str, data: Vec<T>, row_len: usize) -> Vec<T> {
    match names::qk_permute_heads(&ckpt.config, gguf_name) {
        Some(heads) => names::unpermute_qk(&data, heads, row_len),
        None => data,
    }
}

/// One safetensors entry with its bytes: (name, dtype, shape, data).
type Entry = (String, &'static str, Vec<usize>, Vec<u8>);

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The safetensors entries (name, dtype, shape) and bytes of one 4-bit linear in HF order.
fn bnb4_tensors(
    ckpt: &Checkpoint,
    t: &TensorRef,
    prefix: &str,
    report: &mut BnbExportReport,
) -> Result<Vec<Entry>, BnbExportError> {
    let w = bnb4_of(ckpt, t)?;
    let format = w.format().expect("checked by linear_kind");
    let (rows, cols) = (w.rows, w.cols);
    let permuted = names::qk_permute_heads(&ckpt.config, &t.name).is_some();
    let packed = hf_rows(ckpt, &t.name, w.packed.clone(), cols / 2);
    let blocks_per_row = cols / w.block_size;
    let absmax = match &w.absmax {
        Absmax::Double { .. } if permuted => {
            // The nested runs of 256 would regroup in HF row order; the decoded values (as
            // bitsandbytes decodes them: code · scale + offset in f32) keep the weights exact.
            report.float_absmax += 1;
            Absmax::F32(hf_rows(ckpt, &t.name, w.absmax.values(), blocks_per_row))
        }
        Absmax::Double { .. } => w.absmax.clone(),
        Absmax::F32(v) => Absmax::F32(hf_rows(ckpt, &t.name, v.clone(), blocks_per_row)),
    };
    let blocks = rows * blocks_per_row;
    let mut state = serde_json::json!({
        "quant_type": format.kind.name(), "blocksize": w.block_size, "dtype": "float32",
        "shape": [rows, cols],
    });
    let mut out = vec![(
        format!("{prefix}.weight"),
        "U8",
        vec![rows * cols / 2, 1],
        packed,
    )];
    match absmax {
        Absmax::F32(v) => out.push((
            format!("{prefix}.weight.absmax"),
            "F32",
            vec![blocks],
            f32_bytes(&v),
        )),
        Absmax::Double {
            q,
            scale,
            offset,
            code,
        } => {
            state["nested_blocksize"] = bnb4::NESTED_BLOCK.into();
            state["nested_dtype"] = "float32".into();
            state["nested_offset"] = offset.into();
            out.push((format!("{prefix}.weight.absmax"), "U8", vec![blocks], q));
            out.push((
                format!("{prefix}.weight.nested_absmax"),
                "F32",
                vec![scale.len()],
                f32_bytes(&scale),
            ));
            out.push((
                format!("{prefix}.weight.nested_quant_map"),
                "F32",
                vec![code.len()],
                f32_bytes(&code),
            ));
        }
    }
    out.push((
        format!("{prefix}.weight.quant_map"),
        "F32",
        vec![16],
        f32_bytes(&w.code),
    ));
    let json = state.to_string().into_bytes();
    out.push((
        format!(
            "{prefix}.weight.quant_state.bitsandbytes__{}",
            format.kind.name()
        ),
        "U8",
        vec![json.len()],
        json,
    ));
    Ok(out)
}

/// The entries of one int8 linear in HF order: `weight` and `SCB` (row absmax).
fn int8_tensors(
    ckpt: &Checkpoint,
    t: &TensorRef,
    prefix: &str,
) -> Result<Vec<Entry>, BnbExportError> {
    let w: Int8Rows = ckpt
        .int8_rows(t)
        .expect("an int8 tensor")
        .map_err(|e| BnbExportError::NotBnb(e.to_string()))?;
    let levels = hf_rows(ckpt, &t.name, w.levels.clone(), w.cols);
    let scb: Vec<f32> = hf_rows(
        ckpt,
        &t.name,
        w.scales.iter().map(|s| s * 127.0).collect(),
        1,
    );
    Ok(vec![
        (
            format!("{prefix}.weight"),
            "I8",
            vec![w.rows, w.cols],
            levels.iter().map(|&q| q as u8).collect(),
        ),
        (
            format!("{prefix}.SCB"),
            "F32",
            vec![w.rows],
            f32_bytes(&scb),
        ),
    ])
}

/// Writes `dir` (config.json with `quantization_config`, tokenizer files, model.safetensors)
/// for the bitsandbytes variant in `ckpt`.
pub fn write_bnb_folder(ckpt: &Checkpoint, dir: &Path) -> Result<BnbExportReport, BnbExportError> {
    let kind = linear_kind(ckpt)?;
    std::fs::create_dir_all(dir)?;
    let mut report = BnbExportReport {
        quant_type: match kind {
            Kind::Bnb4(f) => f.kind.name().into(),
            Kind::Int8 => "int8".into(),
        },
        quantized_linears: 0,
        float_absmax: 0,
    };
    // The header needs every shape first; the quantized tensors are small (≈ 4–8 bits a
    // weight), so they are built up front and the float ones streamed after.
    let mut tensors = Vec::new();
    let mut floats = Vec::new();
    for t in &ckpt.tensors {
        if names::OPTIONAL_TENSORS.contains(&t.name.as_str()) {
            continue;
        }
        let hf =
            names::gguf_to_hf(&t.name).ok_or_else(|| HfExportError::Unnamed(t.name.clone()))?;
        let prefix = hf.trim_end_matches(".weight").to_string();
        match t.dtype {
            SourceDtype::Bnb4 => {
                tensors.extend(bnb4_tensors(ckpt, t, &prefix, &mut report)?);
                report.quantized_linears += 1;
            }
            SourceDtype::Int8Rows => {
                tensors.extend(int8_tensors(ckpt, t, &prefix)?);
                report.quantized_linears += 1;
            }
            _ => floats.push((hf, t)),
        }
    }
    let mut entries: Vec<StEntry> = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| StEntry {
            name: name.clone(),
            dtype,
            shape: shape.clone(),
            bytes: bytes.len(),
        })
        .collect();
    entries.extend(floats.iter().map(|(hf, t)| StEntry {
        name: hf.clone(),
        dtype: "F16",
        shape: t.shape.clone(),
        bytes: t.elem_count() * 2,
    }));
    let mut out = create_safetensors(&dir.join("model.safetensors"), &entries)?;
    for (_, _, _, bytes) in &tensors {
        out.write_all(bytes)?;
    }
    for (_, t) in floats {
        let values = ckpt.read_f32_hf_layout(t).map_err(HfExportError::Candle)?;
        let buf: Vec<u8> = values
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect();
        out.write_all(&buf)?;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    let quantization_config = match kind {
        Kind::Bnb4(f) => serde_json::json!({
            "quant_method": "bitsandbytes", "load_in_4bit": true, "load_in_8bit": false,
            "bnb_4bit_quant_type": f.kind.name(), "bnb_4bit_use_double_quant": f.double_quant,
            "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": ["lm_head"],
        }),
        Kind::Int8 => serde_json::json!({
            "quant_method": "bitsandbytes", "load_in_4bit": false, "load_in_8bit": true,
            "llm_int8_threshold": int8_threshold(ckpt), "llm_int8_has_fp16_weight": false,
            "llm_int8_skip_modules": ["lm_head"],
        }),
    };
    write_side_files(ckpt, dir, "float16", Some(quantization_config))?;
    sync_dir(dir)?;
    Ok(report)
}

/// LLM.int8()'s threshold as the file records it; 0 (no outlier path) for `int8-dynamic`.
fn int8_threshold(ckpt: &Checkpoint) -> f32 {
    use crate::formats::int8_rows::THRESHOLD_KEY;
    ckpt.gguf_metadata
        .iter()
        .find(|(k, _)| k == THRESHOLD_KEY)
        .and_then(|(_, v)| v.to_f32().ok())
        .unwrap_or(0.0)
}
