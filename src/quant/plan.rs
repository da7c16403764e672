//! The plan of a `gguf` job, computed before any work: the type of every tensor, expected
//! bytes, bits per weight and a peak-memory estimate. Stored with the job at submit and returned
//! alone for `dry_run`.

use candle_core::quantized::GgmlDType;
use serde::Serialize;

use super::gguf_types::GgufType;
use super::mix::{choose, is_quantizable, MixContext, Override};
use crate::formats::bnb4;
use crate::formats::gguf::{ggml_type_name, tensor_bytes};
use crate::formats::gptq_layout::PackedLinear;
use crate::formats::groups::GroupFormat;
use crate::formats::int8_rows::{Int8Rows, WeightScale};
use crate::model::config::ModelConfig;

#[derive(Debug, Clone, Serialize)]
pub struct PlannedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    #[serde(rename = "type")]
    pub type_name: &'static str,
    /// The GGML type the tensor is stored as. GPTQ-layout tensors (`layout`) are stored as
    /// I32/F16 parts instead and carry F16 here, which nothing reads.
    #[serde(skip)]
    pub dtype: GgmlDType,
    pub bytes: u64,
    pub quantized: bool,
    /// The type the rules wanted when the row length forced a fallback.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback_from: Option<&'static str>,
    /// Integer groups (rtn, gptq, awq) packed into `dtype`'s blocks or, when the format has
    /// no block, into the GPTQ layout; None: GGML's own encoder.
    #[serde(skip)]
    pub groups: Option<GroupFormat>,
    /// One of quantd's own forms, stored as parts beside no GGML tensor.
    #[serde(skip)]
    pub own_form: Option<OwnForm>,
    /// A quantized copy of another tensor, read from it (an LM head tied to the embeddings,
    /// quantized on its own): its weights are not counted as parameters a second time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tied_to: Option<&'static str>,
}

/// Weight forms that only quantd's kernels run (besides the GPTQ layout, which `groups` says).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnForm {
    /// `int8_rows`: int8 levels and one f32 scale per output row (the same on every row for
    /// per-tensor weights).
    Int8Rows(WeightScale),
    /// `bnb4`: NF4/FP4 indices with a (double-quantized) absmax per block.
    Bnb4(bnb4::Format),
}

impl OwnForm {
    /// The type name plans and reports give it.
    pub fn type_name(self) -> &'static str {
        match self {
            Self::Int8Rows(_) => INT8_TYPE_NAME,
            Self::Bnb4(f) => match (f.kind, f.double_quant) {
                (bnb4::Kind::Nf4, false) => "NF4",
                (bnb4::Kind::Nf4, true) => "NF4_DQ",
                (bnb4::Kind::Fp4, false) => "FP4",
                (bnb4::Kind::Fp4, true) => "FP4_DQ",
            },
        }
    }

    /// Whether rows of `cols` weights fit the form.
    pub fn fits(self, cols: usize) -> bool {
        match self {
            Self::Int8Rows(_) => cols > 0,
            Self::Bnb4(f) => f.fits(cols),
        }
    }

    pub fn stored_bytes(self, rows: usize, cols: usize) -> usize {
        match self {
            Self::Int8Rows(_) => Int8Rows::stored_bytes(rows, cols),
            Self::Bnb4(f) => f.stored_bytes(rows, cols),
        }
    }
}

impl PlannedTensor {
    /// Whether the tensor is stored in the GPTQ layout (four GGUF tensors).
    pub fn is_layout(&self) -> bool {
        self.groups.is_some_and(|f| f.uses_layout())
    }
}

/// The type name plans and reports give an int8-rows tensor.
pub const INT8_TYPE_NAME: &str = "INT8";

/// GGUF names of the output layer and of the embeddings a tied one shares.
pub const HEAD: &str = "output.weight";
pub const EMBEDDINGS: &str = "token_embd.weight";

/// The type name plans and reports give a GPTQ-layout tensor.
pub fn layout_type_name(bits: u8) -> &'static str {
    match bits {
        2 => "GPTQ_2",
        3 => "GPTQ_3",
        4 => "GPTQ_4",
        _ => "GPTQ_8",
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub method: &'static str,
    #[serde(rename = "type")]
    pub gguf_type: GgufType,
    pub file_type: u32,
    pub parameters: u64,
    pub tensor_bytes: u64,
    /// Bits per weight over the quantized (2-D) tensors.
    pub bits_per_weight: f64,
    /// Bits per weight over every tensor of the model.
    pub bits_per_weight_total: f64,
    pub fallbacks: usize,
    pub type_counts: std::collections::BTreeMap<&'static str, usize>,
    pub peak_memory_bytes: u64,
    pub tensors: Vec<PlannedTensor>,
}

/// Baseline resident memory of the process while a job runs (binary, allocator, buffers).
const BASELINE_BYTES: u64 = 64 << 20;

impl Plan {
    /// `tensors` are (GGUF name, row-major shape) in write order. `imatrix`: an importance
    /// matrix will weight the encoders, which changes one of llama.cpp's mix rules.
    pub fn gguf(
        cfg: &ModelConfig,
        tensors: &[(String, Vec<usize>)],
        gguf_type: GgufType,
        overrides: &[Override],
        imatrix: bool,
        threads: usize,
    ) -> Self {
        let ctx = MixContext {
            has_imatrix: imatrix,
            ..MixContext::new(cfg)
        };
        let mut planned = Vec::with_capacity(tensors.len());
        for (name, shape) in tensors {
            let c = choose(&ctx, gguf_type, name, shape, overrides);
            let elems = shape.iter().map(|&d| d as u64).product();
            planned.push(PlannedTensor {
                name: name.clone(),
                shape: shape.clone(),
                type_name: ggml_type_name(c.dtype),
                dtype: c.dtype,
                bytes: tensor_bytes(c.dtype, elems)
                    .expect("choose only returns types whose blocks fit"),
                quantized: c.quantized,
                fallback_from: c.fallback_from.map(ggml_type_name),
                groups: None,
                own_form: None,
                tied_to: None,
            });
        }
        Self::summarize("gguf", gguf_type, planned, threads)
    }

    /// The plan of an integer-group method (`rtn`, `gptq`, `awq`): every decoder linear in
    /// `format`'s GGML blocks, or in the GPTQ layout when the format has no block;
    /// embeddings and the output layer in F16 (as GPTQ and AWQ leave them); norms F32. A
    /// linear whose shape does not split into blocks (or layout words) stays F16 and is listed
    /// as a fallback.
    pub fn grouped(
        method: &'static str,
        tensors: &[(String, Vec<usize>)],
        format: GroupFormat,
        threads: usize,
    ) -> Self {
        let wanted = match format.ggml_dtype() {
            Some(dtype) => ggml_type_name(dtype),
            None => layout_type_name(format.bits),
        };
        let planned: Vec<PlannedTensor> = tensors
            .iter()
            .map(|(name, shape)| {
                let elems = shape.iter().map(|&d| d as u64).product();
                let float = |fallback_from| float_tensor(name, shape, fallback_from);
                if !(name.starts_with("blk.") && is_quantizable(name, shape)) {
                    return float(None);
                }
                let (rows, cols) = (shape[0], shape[1]);
                match format.ggml_dtype() {
                    Some(dtype) if format.packs(cols) => PlannedTensor {
                        name: name.clone(),
                        shape: shape.clone(),
                        type_name: wanted,
                        dtype,
                        bytes: tensor_bytes(dtype, elems).expect("rows were checked"),
                        quantized: true,
                        fallback_from: None,
                        groups: Some(format),
                        own_form: None,
                        tied_to: None,
                    },
                    None if format.fits_layout(rows, cols) => {
                        let groups = cols.div_ceil(format.group_len(cols));
                        let parts = PackedLinear::part_lengths(format.bits, rows, cols, groups);
                        PlannedTensor {
                            name: name.clone(),
                            shape: shape.clone(),
                            type_name: wanted,
                            dtype: GgmlDType::F16,
                            bytes: parts.iter().sum::<usize>() as u64,
                            quantized: true,
                            fallback_from: None,
                            groups: Some(format),
                            own_form: None,
                            tied_to: None,
                        }
                    }
                    _ => float(Some(wanted)),
                }
            })
            .collect();
        // GPTQ-layout files have no llama.cpp file type; their GGML tensors are F16.
        let gguf_type = match format.ggml_dtype() {
            Some(GgmlDType::Q4_0) => GgufType::Q4_0,
            Some(GgmlDType::Q4_1) => GgufType::Q4_1,
            Some(_) => GgufType::Q8_0,
            None => GgufType::F16,
        };
        Self::summarize(method, gguf_type, planned, threads)
    }

    /// The plan of a method with one of quantd's own forms (`int8-dynamic`, `llm-int8`: int8
    /// rows; `nf4`, `fp4`: bitsandbytes blocks): every decoder linear in that form (what
    /// PyTorch's `quantize_dynamic` and bitsandbytes replace), unless its rows do not split
    /// into the form's blocks (then F16, listed as a fallback); embeddings F16, norms F32. The
    /// output layer is F16 (bitsandbytes skips `lm_head`) unless `head` asks for it in the form
    /// too; a head tied to the embeddings then gets its own quantized copy, `tied_to` them.
    pub fn own_form(
        method: &'static str,
        tensors: &[(String, Vec<usize>)],
        form: OwnForm,
        head: bool,
        threads: usize,
    ) -> Self {
        let type_name = form.type_name();
        let in_form = |name: &str, shape: &[usize]| PlannedTensor {
            name: name.to_string(),
            shape: shape.to_vec(),
            type_name,
            dtype: GgmlDType::F16,
            bytes: form.stored_bytes(shape[0], shape[1]) as u64,
            quantized: true,
            fallback_from: None,
            groups: None,
            own_form: Some(form),
            tied_to: None,
        };
        let mut planned: Vec<PlannedTensor> = tensors
            .iter()
            .map(|(name, shape)| {
                let linear = (name.starts_with("blk.") || (head && name == HEAD))
                    && is_quantizable(name, shape);
                if linear && form.fits(shape[1]) {
                    return in_form(name, shape);
                }
                float_tensor(name, shape, linear.then_some(type_name))
            })
            .collect();
        let tied = tensors.iter().all(|(name, _)| name != HEAD);
        if let Some((_, shape)) = tensors.iter().find(|(n, _)| n == EMBEDDINGS) {
            if head && tied && form.fits(shape[1]) {
                planned.push(PlannedTensor {
                    tied_to: Some(EMBEDDINGS),
                    ..in_form(HEAD, shape)
                });
            }
        }
        Self::summarize(method, GgufType::F16, planned, threads)
    }

    fn summarize(
        method: &'static str,
        gguf_type: GgufType,
        planned: Vec<PlannedTensor>,
        threads: usize,
    ) -> Self {
        let parameters: u64 = planned
            .iter()
            .filter(|t| t.tied_to.is_none())
            .map(|t| t.shape.iter().product::<usize>() as u64)
            .sum();
        let (q_bytes, q_params) = planned
            .iter()
            .filter(|t| t.quantized)
            .fold((0u64, 0u64), |(b, p), t| {
                (b + t.bytes, p + t.shape.iter().product::<usize>() as u64)
            });
        let tensor_bytes: u64 = planned.iter().map(|t| t.bytes).sum();
        let mut type_counts = std::collections::BTreeMap::new();
        for t in planned.iter().filter(|t| t.quantized) {
            *type_counts.entry(t.type_name).or_insert(0) += 1;
        }
        Self {
            method,
            gguf_type,
            file_type: gguf_type.ftype(),
            parameters,
            tensor_bytes,
            bits_per_weight: ratio_bits(q_bytes, q_params),
            bits_per_weight_total: ratio_bits(tensor_bytes, parameters),
            fallbacks: planned.iter().filter(|t| t.fallback_from.is_some()).count(),
            type_counts,
            peak_memory_bytes: peak_memory(&planned, threads),
            tensors: planned,
        }
    }
}

/// A tensor the methods with their own formats leave in float: F16 when 2-D (embeddings, the
/// output layer, linears that do not fit), F32 otherwise (norms).
fn float_tensor(name: &str, shape: &[usize], fallback_from: Option<&'static str>) -> PlannedTensor {
    let dtype = if shape.len() >= 2 {
        GgmlDType::F16
    } else {
        GgmlDType::F32
    };
    let elems = shape.iter().map(|&d| d as u64).product();
    PlannedTensor {
        name: name.to_string(),
        shape: shape.to_vec(),
        type_name: ggml_type_name(dtype),
        dtype,
        bytes: tensor_bytes(dtype, elems).expect("float types have no blocks"),
        quantized: false,
        fallback_from,
        groups: None,
        own_form: None,
        tied_to: None,
    }
}

fn ratio_bits(bytes: u64, params: u64) -> f64 {
    if params == 0 {
        0.0
    } else {
        bytes as f64 * 8.0 / params as f64
    }
}

/// Tensors are quantized one at a time: the largest one's f32 values, its output bytes (held
/// twice while slices are joined), plus per-thread slice buffers.
fn peak_memory(tensors: &[PlannedTensor], threads: usize) -> u64 {
    let largest = tensors
        .iter()
        .map(|t| t.shape.iter().product::<usize>() as u64 * 4 + 2 * t.bytes)
        .max()
        .unwrap_or(0);
    let slice = 256
        * tensors
            .iter()
            .map(|t| *t.shape.last().unwrap_or(&1) as u64)
            .max()
            .unwrap_or(0)
        * 8;
    BASELINE_BYTES + largest + threads.max(1) as u64 * slice
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tied_model() -> Vec<(String, Vec<usize>)> {
        vec![
            (EMBEDDINGS.to_string(), vec![100, 64]),
            ("blk.0.attn_q.weight".into(), vec![64, 64]),
            ("blk.0.attn_norm.weight".into(), vec![64]),
            ("output_norm.weight".into(), vec![64]),
        ]
    }

    #[test]
    fn a_quantized_head_of_tied_embeddings_is_a_copy_read_from_them() {
        let form = OwnForm::Int8Rows(WeightScale::PerTensor);
        let float_head = Plan::own_form("int8-dynamic", &tied_model(), form, false, 1);
        let plan = Plan::own_form("int8-dynamic", &tied_model(), form, true, 1);
        let head = plan.tensors.iter().find(|t| t.name == HEAD).unwrap();
        assert_eq!(head.tied_to, Some(EMBEDDINGS));
        assert_eq!(
            (head.shape.as_slice(), head.quantized),
            (&[100, 64][..], true)
        );
        let embd = plan.tensors.iter().find(|t| t.name == EMBEDDINGS).unwrap();
        assert!(!embd.quantized, "the embeddings stay float");
        assert_eq!(plan.parameters, float_head.parameters, "no parameter twice");
        assert_eq!(
            plan.tensor_bytes,
            float_head.tensor_bytes + Int8Rows::stored_bytes(100, 64) as u64
        );
        assert!(float_head.tensors.iter().all(|t| t.name != HEAD));
    }

    #[test]
    fn a_separate_head_is_quantized_in_place() {
        let mut tensors = tied_model();
        tensors.push((HEAD.to_string(), vec![100, 64]));
        let form = OwnForm::Int8Rows(WeightScale::PerChannel);
        let plan = Plan::own_form("int8-dynamic", &tensors, form, true, 1);
        let heads: Vec<_> = plan.tensors.iter().filter(|t| t.name == HEAD).collect();
        assert_eq!(heads.len(), 1);
        assert!(heads[0].quantized && heads[0].tied_to.is_none());
    }
}
