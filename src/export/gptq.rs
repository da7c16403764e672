//! GPTQ and AWQ checkpoints from quantd's integer-group GGUFs (`rtn`, `gptq`, `awq` variants),
//! in the layouts transformers, GPTQModel, AutoAWQ and vLLM load:
//!
//! - **GPTQ** (AutoGPTQ/GPTQModel): per linear `qweight` int32 [in·bits/32, out] holding the
//!   levels of consecutive input rows as a little-endian bit stream (for 2/4/8 bits,
//!   32/bits levels per word, lowest bits first; 3-bit levels cross words), `qzeros` int32
//!   [groups, out·bits/32] the same way along outputs, `scales` f16 [groups, out], `g_idx`
//!   int32 [in] = column / group size; w = scales[g_idx[i], j] · (q[i, j] − zero[g_idx[i], j]).
//!   3- and 2-bit (and asymmetric 8-bit) variants are stored in this layout already
//!   (`formats::gptq_layout`) and export exactly. Symmetric variants use
//!   `checkpoint_format: "gptq"` (v1, what every loader reads), whose `qzeros` hold zero − 1.
//!   Asymmetric ones use `"gptq_v2"`, whose `qzeros` hold the zero itself: v1 cannot store a
//!   zero of 0 (loaders add 1 to every nibble of the word, so 0 − 1 = 0xF carries into its
//!   neighbour), and GPTQModel refuses asymmetric v1 files from other quantizers for that
//!   reason; transformers and GPTQModel load v2.
//! - **AWQ GEMM** (AutoAWQ `version: "gemm"`): `qweight` int32 [in, out/8] packing eight output
//!   columns per word in the order 0, 2, 4, 6, 1, 3, 5, 7; `qzeros` int32 [groups, out/8] the
//!   same way, zeros stored as they are; `scales` f16 [groups, out].
//!
//! Levels and scales come straight from the GGML blocks, so symmetric groups (Q4_0, Q8_0)
//! export exactly: d·(q − 8) is the served value. Asymmetric groups (Q4_1) are served as
//! d·q + m with m = f16(−d·z); these formats store the integer zero z = round(−m/d), so
//! s·(q − z) differs from the served value by the f16 rounding of d·z (at most 2⁻¹¹·d·z,
//! below 1% of one quantization step); the exporter reports the largest such difference.
//! Other tensors (embeddings, norms, the LM head) are written as F16, as these checkpoints are.

use std::io::Write;
use std::path::Path;

use candle_core::quantized::GgmlDType;
use half::f16;

use super::hf::{create_safetensors, write_side_files, HfExportError, StEntry};
use crate::formats::gptq_layout::{pack_stream, PackedLinear};
use crate::formats::groups::BLOCK;
use crate::model::checkpoint::{Checkpoint, SourceDtype};
use crate::model::names;
use crate::store::sync_dir;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Gptq,
    AwqGemm,
}

impl Layout {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "gptq" => Some(Self::Gptq),
            "awq" => Some(Self::AwqGemm),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GroupExportError {
    #[error(transparent)]
    Hf(#[from] HfExportError),
    #[error("{0}")]
    NotGrouped(String),
    #[error("writing: {0}")]
    Io(#[from] std::io::Error),
}

/// What an export wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GroupExportReport {
    pub quantized_linears: usize,
    pub bits: u8,
    pub group_size: i64,
    pub sym: bool,
    /// The largest |s·(q − z) − served value| over all weights, in units of the group's scale
    /// (0 for symmetric groups).
    pub max_zero_rounding: f32,
}

/// One linear's groups in HF orientation (row = output channel), decoded from its blocks.
struct Groups {
    rows: usize,
    cols: usize,
    group_len: usize,
    /// [rows, cols] levels 0..2^bits.
    levels: Vec<u8>,
    /// [rows, groups].
    scales: Vec<f16>,
    /// [rows, groups] integer zero points.
    zeros: Vec<u8>,
}

impl Groups {
    fn n_groups(&self) -> usize {
        self.cols.div_ceil(self.group_len)
    }
}

/// The integer format the GGUF's method wrote: (bits, group size or −1, symmetric).
fn group_format(ckpt: &Checkpoint) -> Result<(u8, i64, bool), GroupExportError> {
    let meta = |key: &str| {
        ckpt.gguf_metadata
            .iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| match v {
                candle_core::quantized::gguf_file::Value::String(s) => Some(s.clone()),
                _ => None,
            })
    };
    let method = meta("quantize.method").unwrap_or_default();
    if !matches!(method.as_str(), "rtn" | "gptq" | "awq") {
        return Err(GroupExportError::NotGrouped(format!(
            "the file was made by method {method:?}; GPTQ/AWQ exports need integer groups \
             (a quantd rtn, gptq or awq variant)"
        )));
    }
    let params: serde_json::Value = meta("quantize.params")
        .and_then(|p| serde_json::from_str(&p).ok())
        .unwrap_or_default();
    let bits = params["bits"].as_u64().unwrap_or(4) as u8;
    let group_size = params["group_size"].as_i64().unwrap_or(128);
    let sym = match method.as_str() {
        "awq" => !params["zero_point"].as_bool().unwrap_or(true),
        _ => params["sym"].as_bool().unwrap_or(true),
    };
    Ok((bits, group_size, sym))
}

/// Decodes a Q4_0/Q4_1/Q8_0 tensor of `rows` × `cols` into groups of `group_len` columns,
/// checking every block of a group carries the same parameters; returns the groups and the
/// largest zero-point rounding (in scale units).
fn decode_groups(
    name: &str,
    bytes: &[u8],
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
    group_len: usize,
) -> Result<(Groups, f32), GroupExportError> {
    let block_bytes = dtype.type_size();
    let blocks_per_row = cols / BLOCK;
    let n_groups = cols.div_ceil(group_len);
    let mut g = Groups {
        rows,
        cols,
        group_len,
        levels: vec![0; rows * cols],
        scales: vec![f16::ZERO; rows * n_groups],
        zeros: vec![0; rows * n_groups],
    };
    let mut worst = 0f32;
    let half_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]);
    for r in 0..rows {
        let mut group_params: Vec<Option<(f16, f16)>> = vec![None; n_groups];
        for b in 0..blocks_per_row {
            let at = (r * blocks_per_row + b) * block_bytes;
            let block = &bytes[at..at + block_bytes];
            let d = half_at(block, 0);
            let (m, zero) = match dtype {
                GgmlDType::Q4_0 => (f16::ZERO, 8u8),
                GgmlDType::Q8_0 => (f16::ZERO, 128u8),
                _ => {
                    let m = half_at(block, 2);
                    let (df, mf) = (d.to_f32(), m.to_f32());
                    let z = if df > 0.0 { (-mf / df).round() } else { 0.0 };
                    if !(0.0..=15.0).contains(&z) {
                        return Err(GroupExportError::NotGrouped(format!(
                            "{name}: block min {mf} is not −scale·z for an integer z in 0..=15"
                        )));
                    }
                    if df > 0.0 {
                        worst = worst.max((mf + df * z).abs() / df);
                    }
                    (m, z as u8)
                }
            };
            let group = b * BLOCK / group_len;
            match group_params[group] {
                None => group_params[group] = Some((d, m)),
                Some(p) if p != (d, m) => {
                    return Err(GroupExportError::NotGrouped(format!(
                        "{name}: row {r} has blocks with different scales inside one group of \
                         {group_len} columns"
                    )))
                }
                Some(_) => {}
            }
            g.scales[r * n_groups + group] = d;
            g.zeros[r * n_groups + group] = zero;
            let levels = &mut g.levels[r * cols + b * BLOCK..r * cols + (b + 1) * BLOCK];
            match dtype {
                GgmlDType::Q8_0 => {
                    for (l, &q) in levels.iter_mut().zip(&block[2..]) {
                        *l = (q as i8 as i32 + 128) as u8;
                    }
                }
                _ => {
                    let qs = &block[block_bytes - BLOCK / 2..];
                    for j in 0..BLOCK / 2 {
                        levels[j] = qs[j] & 0xF;
                        levels[j + BLOCK / 2] = qs[j] >> 4;
                    }
                }
            }
        }
    }
    Ok((g, worst))
}

/// A GPTQ-layout tensor's groups (stored exactly; no rounding to report).
fn layout_groups(name: &str, packed: &PackedLinear) -> Result<Groups, GroupExportError> {
    let group_len = packed.contiguous_group_len().ok_or_else(|| {
        GroupExportError::NotGrouped(format!("{name}: groups are not contiguous columns"))
    })?;
    let (rows, cols, ng) = (packed.rows, packed.cols, packed.groups());
    let mut g = Groups {
        rows,
        cols,
        group_len,
        levels: Vec::with_capacity(rows * cols),
        scales: Vec::with_capacity(rows * ng),
        zeros: Vec::with_capacity(rows * ng),
    };
    for r in 0..rows {
        g.levels.extend((0..cols).map(|c| packed.level(r, c) as u8));
        g.scales
            .extend((0..ng).map(|gi| packed.scales[gi * rows + r]));
        g.zeros.extend((0..ng).map(|gi| packed.zero(gi, r) as u8));
    }
    Ok(g)
}

/// Reorders rows (output channels) of per-row data from GGUF to HF order (Q/K only).
fn hf_rows<T: Copy>(ckpt: &Checkpoint, gguf_name: &str, data: Vec<T>, row_len: usize) -> Vec<T> {
    match names::qk_permute_heads(&ckpt.config, gguf_name) {
        Some(heads) => names::unpermute_qk(&data, heads, row_len),
        None => data,
    }
}

fn push_i32s(out: &mut Vec<u8>, words: impl Iterator<Item = u32>) {
    for w in words {
        out.extend_from_slice(&w.to_le_bytes());
    }
}

/// AWQ's packing order of eight 4-bit values in a word.
const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// The tensors (name suffix, dtype, shape, bytes) a linear becomes.
fn pack(layout: Layout, g: &Groups, bits: u8) -> Vec<(&'static str, &'static str, Vec<usize>)> {
    let b = bits as usize;
    let ng = g.n_groups();
    match layout {
        Layout::Gptq => vec![
            ("qweight", "I32", vec![g.cols * b / 32, g.rows]),
            ("qzeros", "I32", vec![ng, g.rows * b / 32]),
            ("scales", "F16", vec![ng, g.rows]),
            ("g_idx", "I32", vec![g.cols]),
        ],
        Layout::AwqGemm => vec![
            ("qweight", "I32", vec![g.cols, g.rows / 8]),
            ("qzeros", "I32", vec![ng, g.rows / 8]),
            ("scales", "F16", vec![ng, g.rows]),
        ],
    }
}

/// The bytes of `pack`'s tensors, in the same order. `v1`: GPTQ's zero − 1 convention.
fn packed_bytes(layout: Layout, g: &Groups, bits: u8, v1: bool) -> Vec<Vec<u8>> {
    let mask = (1u32 << bits) - 1;
    let ng = g.n_groups();
    let level = |row: usize, col: usize| g.levels[row * g.cols + col] as u32;
    let zero = |row: usize, group: usize| g.zeros[row * ng + group] as u32;
    let mut scales = Vec::with_capacity(ng * g.rows * 2);
    for group in 0..ng {
        for row in 0..g.rows {
            scales.extend_from_slice(&g.scales[row * ng + group].to_le_bytes());
        }
    }
    match layout {
        Layout::Gptq => {
            // One bit stream per output along the inputs, stored word row by word row.
            let words_per_row = g.cols * bits as usize / 32;
            let mut streams = vec![0u32; words_per_row * g.rows];
            let mut stream = Vec::with_capacity(words_per_row);
            for row in 0..g.rows {
                stream.clear();
                pack_stream((0..g.cols).map(|c| level(row, c)), bits, &mut stream);
                for (k, &w) in stream.iter().enumerate() {
                    streams[k * g.rows + row] = w;
                }
            }
            let mut qweight = Vec::with_capacity(streams.len() * 4);
            push_i32s(&mut qweight, streams.into_iter());
            let mut zero_words = Vec::new();
            for group in 0..ng {
                // v1 stores zero − 1 (loaders add the 1 back); v2 the zero.
                let stored = (0..g.rows).map(|row| {
                    let z = zero(row, group);
                    if v1 {
                        z.wrapping_sub(1) & mask
                    } else {
                        z
                    }
                });
                pack_stream(stored, bits, &mut zero_words);
            }
            let mut qzeros = Vec::with_capacity(zero_words.len() * 4);
            push_i32s(&mut qzeros, zero_words.into_iter());
            let mut g_idx = Vec::with_capacity(g.cols * 4);
            push_i32s(&mut g_idx, (0..g.cols).map(|c| (c / g.group_len) as u32));
            vec![qweight, qzeros, scales, g_idx]
        }
        Layout::AwqGemm => {
            let word = |f: &dyn Fn(usize) -> u32| {
                AWQ_ORDER
                    .iter()
                    .enumerate()
                    .fold(0u32, |w, (k, &o)| w | (f(o) << (4 * k)))
            };
            let mut qweight = Vec::with_capacity(g.cols * g.rows / 2);
            for col in 0..g.cols {
                push_i32s(
                    &mut qweight,
                    (0..g.rows / 8).map(|w| word(&|o| level(w * 8 + o, col))),
                );
            }
            let mut qzeros = Vec::new();
            for group in 0..ng {
                push_i32s(
                    &mut qzeros,
                    (0..g.rows / 8).map(|w| word(&|o| zero(w * 8 + o, group))),
                );
            }
            vec![qweight, qzeros, scales]
        }
    }
}

/// Why AWQ's GEMM layout cannot hold groups of `group_size` (`None`: per channel) for these
/// tensors' decoder linears, if it cannot: AutoAWQ's `WQLinear_GEMM` asserts
/// in_features % group_size == 0, and GPTQModel's AWQ kernels refuse such layers too.
pub fn awq_group_problem(ckpt: &Checkpoint, group_size: Option<usize>) -> Option<String> {
    let g = group_size?;
    let t = ckpt.tensors.iter().find(|t| {
        t.shape.len() == 2 && t.name.starts_with("blk.") && !t.shape[1].is_multiple_of(g)
    })?;
    Some(format!(
        "{}: {} columns do not split into groups of {g}, which AWQ loaders require; quantize \
         with a group size that divides every linear's columns (here {})",
        t.name,
        t.shape[1],
        dividing_group_sizes(ckpt)
    ))
}

/// The supported group sizes that divide the column count of every quantized linear.
fn dividing_group_sizes(ckpt: &Checkpoint) -> String {
    let fits: Vec<String> = [32usize, 64, 128]
        .into_iter()
        .filter(|g| {
            ckpt.tensors.iter().all(|t| {
                t.shape.len() != 2 || !t.name.starts_with("blk.") || t.shape[1].is_multiple_of(*g)
            })
        })
        .map(|g| g.to_string())
        .collect();
    if fits.is_empty() {
        "none of 32, 64, 128 does".into()
    } else {
        fits.join(" or ")
    }
}

/// Writes `ckpt` (a quantd rtn/gptq/awq GGUF) as a `layout` checkpoint folder in `dir`.
pub fn write_grouped_folder(
    ckpt: &Checkpoint,
    dir: &Path,
    layout: Layout,
) -> Result<GroupExportReport, GroupExportError> {
    let (bits, group_size, sym) = group_format(ckpt)?;
    if layout == Layout::AwqGemm && bits != 4 {
        return Err(GroupExportError::NotGrouped(format!(
            "AWQ's GEMM layout holds 4-bit weights; this file has {bits}-bit groups"
        )));
    }
    std::fs::create_dir_all(dir)?;
    // Plan every tensor first (the header precedes the data), then decode and write one at a
    // time, so memory holds one tensor.
    enum Source<'a> {
        Grouped(&'a crate::model::checkpoint::TensorRef),
        Float(&'a crate::model::checkpoint::TensorRef),
    }
    let mut plan = Vec::new();
    let mut entries = Vec::new();
    for t in &ckpt.tensors {
        if names::OPTIONAL_TENSORS.contains(&t.name.as_str()) {
            continue;
        }
        let hf =
            names::gguf_to_hf(&t.name).ok_or_else(|| HfExportError::Unnamed(t.name.clone()))?;
        match t.dtype {
            SourceDtype::Ggml(GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q8_0)
            | SourceDtype::GptqLayout { .. }
                if t.shape.len() == 2 =>
            {
                let (rows, cols) = (t.shape[0], t.shape[1]);
                let group_len = if group_size < 0 {
                    cols
                } else {
                    (group_size as usize).min(cols)
                };
                if layout == Layout::AwqGemm && !cols.is_multiple_of(group_len) {
                    let problem = awq_group_problem(ckpt, Some(group_len));
                    return Err(GroupExportError::NotGrouped(problem.unwrap_or_default()));
                }
                let b = bits as usize;
                let fits = match layout {
                    Layout::AwqGemm => rows.is_multiple_of(8),
                    Layout::Gptq => (rows * b).is_multiple_of(32) && (cols * b).is_multiple_of(32),
                };
                if !fits {
                    return Err(GroupExportError::NotGrouped(format!(
                        "{}: {rows}×{cols} does not pack {bits}-bit levels into whole words",
                        t.name
                    )));
                }
                let shape_only = Groups {
                    rows,
                    cols,
                    group_len,
                    levels: Vec::new(),
                    scales: Vec::new(),
                    zeros: Vec::new(),
                };
                let prefix = hf.trim_end_matches(".weight").to_string();
                for (suffix, st_dtype, shape) in pack(layout, &shape_only, bits) {
                    let elems: usize = shape.iter().product();
                    entries.push(StEntry {
                        name: format!("{prefix}.{suffix}"),
                        dtype: st_dtype,
                        shape,
                        bytes: elems * if st_dtype == "F16" { 2 } else { 4 },
                    });
                }
                plan.push(Source::Grouped(t));
            }
            _ => {
                entries.push(StEntry {
                    name: hf,
                    dtype: "F16",
                    shape: t.shape.clone(),
                    bytes: t.elem_count() * 2,
                });
                plan.push(Source::Float(t));
            }
        }
    }
    let mut out = create_safetensors(&dir.join("model.safetensors"), &entries)?;
    let mut report = GroupExportReport {
        quantized_linears: 0,
        bits,
        group_size,
        sym,
        max_zero_rounding: 0.0,
    };
    for source in plan {
        match source {
            Source::Grouped(t) => {
                let (rows, cols) = (t.shape[0], t.shape[1]);
                let group_len = if group_size < 0 {
                    cols
                } else {
                    (group_size as usize).min(cols)
                };
                let (g, worst) = match (t.dtype, ckpt.packed_linear(t)) {
                    (_, Some(packed)) => {
                        let packed =
                            packed.map_err(|e| GroupExportError::NotGrouped(e.to_string()))?;
                        if packed.bits != bits {
                            return Err(GroupExportError::NotGrouped(format!(
                                "{}: {}-bit groups in a {bits}-bit file",
                                t.name, packed.bits
                            )));
                        }
                        (layout_groups(&t.name, &packed)?, 0.0)
                    }
                    (SourceDtype::Ggml(dtype), None) => {
                        decode_groups(&t.name, ckpt.raw_bytes(t), dtype, rows, cols, group_len)?
                    }
                    _ => unreachable!("planned tensors are blocks or GPTQ layout"),
                };
                let ng = g.n_groups();
                let g = Groups {
                    levels: hf_rows(ckpt, &t.name, g.levels, cols),
                    scales: hf_rows(ckpt, &t.name, g.scales, ng),
                    zeros: hf_rows(ckpt, &t.name, g.zeros, ng),
                    ..g
                };
                for bytes in packed_bytes(layout, &g, bits, sym) {
                    out.write_all(&bytes)?;
                }
                report.quantized_linears += 1;
                report.max_zero_rounding = report.max_zero_rounding.max(worst);
            }
            Source::Float(t) => {
                let values = ckpt.read_f32_hf_layout(t).map_err(HfExportError::Candle)?;
                let mut buf = Vec::with_capacity(values.len() * 2);
                for v in values {
                    buf.extend_from_slice(&f16::from_f32(v).to_le_bytes());
                }
                out.write_all(&buf)?;
            }
        }
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    let quantization_config = match layout {
        Layout::Gptq => serde_json::json!({
            "quant_method": "gptq", "bits": bits, "group_size": group_size,
            // Groups are contiguous columns (g_idx = column / group size) even when quantd's
            // GPTQ ran with act_order: static groups, so loaders may take the plain path.
            "desc_act": false, "static_groups": true, "sym": sym, "true_sequential": true,
            "checkpoint_format": if sym { "gptq" } else { "gptq_v2" }, "pack_dtype": "int32", "lm_head": false,
            "meta": {"quantizer": [format!("quantd:{}", env!("CARGO_PKG_VERSION"))]},
        }),
        Layout::AwqGemm => serde_json::json!({
            "quant_method": "awq", "bits": bits, "group_size": group_size,
            "zero_point": !sym, "version": "gemm",
        }),
    };
    write_side_files(ckpt, dir, "float16", Some(quantization_config))?;
    sync_dir(dir)?;
    Ok(report)
}
