//! Each method's parameters as the API and the CLI take them (DESIGN §4): field by field, with
//! defaults and ranges, and the checks serde cannot express.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{param_error, ParamError};
use crate::formats::bnb4;
use crate::formats::groups::GroupFormat;
use crate::formats::int8_rows::WeightScale;
use crate::quant::mix::{parse_ggml_type, Override};
use crate::quant::GgufType;

/// How `int8-dynamic` quantizes activations at run time.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ActivationMode {
    /// One symmetric scale per token.
    #[default]
    PerToken,
    /// As PyTorch's fbgemm `quantize_dynamic`: one asymmetric 7-bit scale per call.
    Torch,
}

impl ActivationMode {
    pub fn name(self) -> &'static str {
        match self {
            Self::PerToken => "per_token",
            Self::Torch => "torch",
        }
    }
}

/// Whether `int8-dynamic` quantizes the LM head too.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HeadMode {
    /// The head stays as the checkpoint has it.
    Float,
    /// The head is int8 rows like the decoder's linears; a head tied to the embeddings gets its
    /// own int8 copy (the embeddings stay float), as PyTorch quantizes the `lm_head` module.
    Int8,
}

/// DESIGN §4 `int8-dynamic`: int8 weights, activations quantized on every call.
///
/// `activations: "torch"` alone is the course's recipe, PyTorch's default
/// `quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)`: per-tensor weights and every
/// linear, the head included. `weights: "per_channel"` with `head: "float"` is the better
/// variant (PyTorch's `per_channel_dynamic_qconfig` on the decoder layers), and the default
/// with `activations: "per_token"`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Int8DynamicParams {
    #[serde(default)]
    pub activations: ActivationMode,
    /// Default: `per_tensor` with `activations: "torch"`, else `per_channel`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, pattern = "^(per_channel|per_tensor)$", example = "per_channel")]
    pub weights: Option<WeightScale>,
    /// Default: `int8` with `activations: "torch"`, else `float`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<HeadMode>,
}

impl Int8DynamicParams {
    /// PyTorch's default recipe: what `activations: "torch"` means unless told otherwise.
    fn course_recipe(&self) -> bool {
        self.activations == ActivationMode::Torch
    }

    pub fn weight_scale(&self) -> WeightScale {
        self.weights.unwrap_or(if self.course_recipe() {
            WeightScale::PerTensor
        } else {
            WeightScale::PerChannel
        })
    }

    pub fn head_mode(&self) -> HeadMode {
        self.head.unwrap_or(if self.course_recipe() {
            HeadMode::Int8
        } else {
            HeadMode::Float
        })
    }

    /// Per-tensor weights take PyTorch's level −128, which only the 7-bit unsigned
    /// activations of `torch` multiply exactly (the kernel's sign trick needs |w| ≤ 127).
    pub fn validate(&self) -> Result<(), ParamError> {
        if self.weight_scale() == WeightScale::PerTensor && !self.course_recipe() {
            return Err(param_error(
                "weights",
                "per_tensor weights are PyTorch's default recipe and run with activations \
                 \"torch\" only; use per_channel"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The variant part of the default output id: `int8-torch` for the course's recipe,
    /// `int8-per-token`, and a suffix for each choice that differs from its default.
    pub(super) fn variant(&self) -> String {
        let mut v = format!("int8-{}", self.activations.name().replace('_', "-"));
        let defaults = Self {
            activations: self.activations,
            ..Self::default()
        };
        if self.weight_scale() != defaults.weight_scale() {
            v.push_str(match self.weight_scale() {
                WeightScale::PerChannel => "-per-channel",
                WeightScale::PerTensor => "-per-tensor",
            });
        }
        if self.head_mode() != defaults.head_mode() {
            v.push_str(match self.head_mode() {
                HeadMode::Float => "-float-head",
                HeadMode::Int8 => "-int8-head",
            });
        }
        v
    }
}

/// DESIGN §4 `llm-int8` (Dettmers et al. 2022), as bitsandbytes' `Linear8bitLt` runs it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LlmInt8Params {
    /// Input columns with any |x| at or above this go through the float path.
    #[serde(default = "LlmInt8Params::default_threshold")]
    #[schema(default = 6.0, exclusive_minimum = 0.0, maximum = 10000.0)]
    pub threshold: f32,
}

impl LlmInt8Params {
    pub const DEFAULT_THRESHOLD: f32 = 6.0;
    pub const MAX_THRESHOLD: f32 = 1e4;

    fn default_threshold() -> f32 {
        Self::DEFAULT_THRESHOLD
    }

    pub fn validate(&self) -> Result<(), ParamError> {
        if !(self.threshold.is_finite()
            && self.threshold > 0.0
            && self.threshold <= Self::MAX_THRESHOLD)
        {
            return Err(param_error(
                "threshold",
                format!("{} is outside (0, {}]", self.threshold, Self::MAX_THRESHOLD),
            ));
        }
        Ok(())
    }
}

/// DESIGN §4 `nf4` / `fp4`: bitsandbytes' 4-bit blocks (QLoRA).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Bnb4Params {
    /// Weights per absmax, along each row.
    /// One of 32, 64, 128, 256, 512, 1024, 2048, 4096.
    #[serde(default = "Bnb4Params::default_block_size")]
    #[schema(default = 64, minimum = 32, maximum = 4096, example = 64)]
    pub block_size: usize,
    /// Store the absmax values in 8 bits (QLoRA's double quantization); off by default, as in
    /// bitsandbytes and transformers' `bnb_4bit_use_double_quant`.
    #[serde(default)]
    #[schema(default = false)]
    pub double_quant: bool,
}

impl Default for Bnb4Params {
    fn default() -> Self {
        Self {
            block_size: Self::default_block_size(),
            double_quant: false,
        }
    }
}

impl Bnb4Params {
    fn default_block_size() -> usize {
        64
    }

    pub fn format(&self, kind: bnb4::Kind) -> bnb4::Format {
        bnb4::Format {
            kind,
            block_size: self.block_size,
            double_quant: self.double_quant,
        }
    }

    /// `""` at the defaults, else `-b128`, `-dq`, `-b32-dq`.
    pub(super) fn variant(&self) -> String {
        let mut v = String::new();
        if self.block_size != Self::default_block_size() {
            v += &format!("-b{}", self.block_size);
        }
        if self.double_quant {
            v += "-dq";
        }
        v
    }

    pub fn validate(&self) -> Result<(), ParamError> {
        if !bnb4::BLOCK_SIZES.contains(&self.block_size) {
            return Err(param_error(
                "block_size",
                format!(
                    "{} is not one of {:?} (bitsandbytes' block sizes)",
                    self.block_size,
                    bnb4::BLOCK_SIZES
                ),
            ));
        }
        Ok(())
    }
}

/// DESIGN §4 `rtn`: round-to-nearest in integer groups, GPTQ's definition of the groups.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RtnParams {
    /// Bits per weight: 8, 4, 3 or 2.
    #[schema(minimum = 2, maximum = 8, example = 4)]
    pub bits: u8,
    /// Columns per group: 32, 64 or 128; −1 = one group per output channel (row).
    #[serde(default = "RtnParams::default_group_size")]
    #[schema(default = 128, minimum = -1, maximum = 128, example = 128)]
    pub group_size: i64,
    /// Symmetric groups (no zero point); false: a zero point per group.
    #[serde(default = "RtnParams::default_sym")]
    #[schema(default = true)]
    pub sym: bool,
}

impl RtnParams {
    pub const GROUP_SIZES: [i64; 4] = [-1, 32, 64, 128];

    fn default_group_size() -> i64 {
        128
    }

    fn default_sym() -> bool {
        true
    }

    pub fn format(&self) -> GroupFormat {
        GroupFormat {
            bits: self.bits,
            group_size: (self.group_size > 0).then_some(self.group_size as usize),
            sym: self.sym,
        }
    }

    pub(super) fn variant(&self) -> String {
        group_variant(&self.format())
    }

    pub fn validate(&self) -> Result<(), ParamError> {
        validate_groups(self.bits, self.group_size)
    }
}

/// `4bit-g128-asym`, `8bit-pc-sym`.
pub(super) fn group_variant(f: &GroupFormat) -> String {
    let group = match f.group_size {
        Some(g) => format!("g{g}"),
        None => "pc".into(),
    };
    let sym = if f.sym { "sym" } else { "asym" };
    format!("{}bit-{group}-{sym}", f.bits)
}

/// The integer-group parameters `rtn` and `gptq` share.
fn validate_groups(bits: u8, group_size: i64) -> Result<(), ParamError> {
    if ![8, 4, 3, 2].contains(&bits) {
        return Err(param_error(
            "bits",
            format!("{bits} is not one of 8, 4, 3, 2"),
        ));
    }
    if !RtnParams::GROUP_SIZES.contains(&group_size) {
        return Err(param_error(
            "group_size",
            format!("{group_size} is not one of -1, 32, 64, 128"),
        ));
    }
    Ok(())
}

/// DESIGN §4 `gptq` (Frantar et al. 2022); the groups are `rtn`'s.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GptqParams {
    /// Bits per weight: 8, 4, 3 or 2.
    #[schema(minimum = 2, maximum = 8, example = 4)]
    pub bits: u8,
    /// Columns per group: 32, 64 or 128; −1 = one group per output channel (row).
    #[serde(default = "RtnParams::default_group_size")]
    #[schema(default = 128, minimum = -1, maximum = 128, example = 128)]
    pub group_size: i64,
    /// Symmetric groups (no zero point); false: a zero point per group.
    #[serde(default = "RtnParams::default_sym")]
    #[schema(default = true)]
    pub sym: bool,
    /// Quantize columns in order of decreasing Hessian diagonal ("desc_act"); on by default
    /// as in GPTQModel (on SmolLM2 it halves GPTQ's Δppl at 4 bits).
    #[serde(default = "GptqParams::default_true_sequential")]
    #[schema(default = true)]
    pub act_order: bool,
    /// Group parameters from the unquantized weights, groups in column order. Needed (and the
    /// default) with `act_order`, so that groups stay contiguous GGML blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub static_groups: Option<bool>,
    /// Fraction of the mean Hessian diagonal added to the diagonal.
    #[serde(default = "GptqParams::default_damp_percent")]
    #[schema(default = 0.01, exclusive_minimum = 0.0, maximum = 1.0)]
    pub damp_percent: f64,
    /// Quantize q/k/v, o, gate/up and down in turn, each on inputs computed with the ones
    /// before already quantized; off: every Hessian of a layer from unquantized inputs.
    #[serde(default = "GptqParams::default_true_sequential")]
    #[schema(default = true)]
    pub true_sequential: bool,
}

impl GptqParams {
    fn default_damp_percent() -> f64 {
        0.01
    }

    /// `true_sequential` and `act_order` are on unless turned off.
    fn default_true_sequential() -> bool {
        true
    }

    pub fn format(&self) -> GroupFormat {
        GroupFormat {
            bits: self.bits,
            group_size: (self.group_size > 0).then_some(self.group_size as usize),
            sym: self.sym,
        }
    }

    /// `4bit-g128-asym`, with `-act` when columns go in activation order.
    pub(super) fn variant(&self) -> String {
        let act = if self.act_order { "-act" } else { "" };
        format!("{}{act}", group_variant(&self.format()))
    }

    pub fn validate(&self) -> Result<(), ParamError> {
        validate_groups(self.bits, self.group_size)?;
        if !(self.damp_percent.is_finite() && (0.0..1.0).contains(&self.damp_percent)) {
            return Err(param_error(
                "damp_percent",
                format!("{} is outside [0, 1)", self.damp_percent),
            ));
        }
        if self.act_order && self.static_groups == Some(false) {
            return Err(param_error(
                "static_groups",
                "act_order without static groups needs the GPTQ layout (g_idx), which this \
                 version does not serve; leave static_groups true"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// DESIGN §4 `awq` (Lin et al. 2023), as AutoAWQ implements it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AwqParams {
    /// Bits per weight: 4 (the GGML blocks AWQ's groups are served as).
    #[serde(default = "AwqParams::default_bits")]
    #[schema(default = 4, minimum = 4, maximum = 4)]
    pub bits: u8,
    /// Columns per group: 32, 64 or 128; −1 = one group per output channel (row).
    #[serde(default = "RtnParams::default_group_size")]
    #[schema(default = 128, minimum = -1, maximum = 128, example = 128)]
    pub group_size: i64,
    /// Asymmetric groups (Q4_1); false: symmetric (Q4_0).
    #[serde(default = "AwqParams::default_true")]
    #[schema(default = true)]
    pub zero_point: bool,
    /// Points of the α grid in [0, 1).
    #[serde(default = "AwqParams::default_grid")]
    #[schema(default = 20, minimum = 1, maximum = 100)]
    pub grid: usize,
    /// AutoAWQ's s = mean|x|^α / mean_w^(1−α); false: the paper's s = mean|x|^α.
    #[serde(default)]
    #[schema(default = false)]
    pub duo_scaling: bool,
    /// Search a clipping range per group after scaling.
    #[serde(default = "AwqParams::default_true")]
    #[schema(default = true)]
    pub clip: bool,
}

impl AwqParams {
    pub const GRID_RANGE: std::ops::RangeInclusive<usize> = 1..=100;

    fn default_bits() -> u8 {
        4
    }

    fn default_true() -> bool {
        true
    }

    fn default_grid() -> usize {
        20
    }

    pub fn format(&self) -> GroupFormat {
        GroupFormat {
            bits: self.bits,
            group_size: (self.group_size > 0).then_some(self.group_size as usize),
            sym: !self.zero_point,
        }
    }

    pub fn validate(&self) -> Result<(), ParamError> {
        if self.bits != 4 {
            return Err(param_error(
                "bits",
                format!("{} is not available: AWQ here is 4-bit", self.bits),
            ));
        }
        validate_groups(self.bits, self.group_size)?;
        if !Self::GRID_RANGE.contains(&self.grid) {
            return Err(param_error(
                "grid",
                format!("{} is outside {:?}", self.grid, Self::GRID_RANGE),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EvalMethodParams {
    /// The model to compare against (same tokenizer); by default (None at the wire) the
    /// model's base, resolved at submit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GgufParams {
    /// The GGUF file type, as llama-quantize names it.
    #[serde(rename = "type")]
    pub gguf_type: GgufType,
    /// Per-tensor type overrides by regex, applied in order; the last match wins.
    #[serde(default)]
    pub overrides: Vec<OverrideSpec>,
    /// Collect an importance matrix on the job's calibration windows and weight the block
    /// encoders with it (llama-quantize's `--imatrix`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    #[schema(default = false)]
    pub imatrix: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OverrideSpec {
    /// A regular expression over GGUF tensor names (`ffn_down`, `blk\\.0\\.`).
    #[schema(example = "ffn_down")]
    pub pattern: String,
    /// The GGML type those tensors get (`Q8_0`, `Q6_K`, `F16`, ...).
    #[serde(rename = "type")]
    #[schema(example = "Q8_0")]
    pub type_name: String,
}

impl GgufParams {
    /// An importance matrix only changes types whose encoders read one.
    pub fn validate(&self) -> Result<(), ParamError> {
        if self.imatrix && !self.gguf_type.reads_importance() {
            return Err(param_error(
                "imatrix",
                format!(
                    "{} has no block encoder that reads an importance matrix (llama.cpp ignores \
                     it for F32, F16, BF16 and Q8_0)",
                    self.gguf_type.name()
                ),
            ));
        }
        Ok(())
    }

    /// Compiled overrides; the patterns were checked at submit, so this only fails on
    /// tampered rows.
    pub fn compiled_overrides(&self) -> Result<Vec<Override>, ParamError> {
        self.overrides
            .iter()
            .enumerate()
            .map(|(i, o)| {
                let pattern = regex::RegexBuilder::new(&o.pattern)
                    .size_limit(1 << 20)
                    .build()
                    .map_err(|e| ParamError { param: format!("params.overrides[{i}].pattern"), message: e.to_string() })?;
                let dtype = parse_ggml_type(&o.type_name).ok_or_else(|| ParamError {
                    param: format!("params.overrides[{i}].type"),
                    message: format!(
                        "unknown type {:?} (one of F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)",
                        o.type_name
                    ),
                })?;
                Ok(Override { pattern, dtype })
            })
            .collect()
    }
}
