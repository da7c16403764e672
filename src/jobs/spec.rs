//! A job as the rest of the system sees it once the HTTP layer has validated it: which model,
//! which method with typed parameters, the output name, and the optional evaluation and
//! accuracy gate. Stored as JSON in `jobs.spec`.

use serde::{Deserialize, Serialize};

use crate::formats::bnb4;
use crate::formats::gguf::Value;
use crate::formats::groups::GroupFormat;
use crate::formats::int8_rows::{self, WeightScale};
use crate::kernels::int8::Activations;
use crate::quant::mix::{parse_ggml_type, Override};
use crate::quant::GgufType;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobSpec {
    pub model: String,
    pub output_name: String,
    #[serde(flatten)]
    pub method: MethodSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<CalibrationParams>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalParams>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<Gate>,
    /// Checkpoints written beside the GGUF (DESIGN §2 `outputs`; the GGUF is always written).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<ExportFormat>,
}

/// A checkpoint format a job can export its integer groups to, as a tar of the folder that
/// transformers, GPTQModel or vLLM load.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ExportFormat {
    GptqSafetensors,
    AwqSafetensors,
    BnbSafetensors,
}

impl ExportFormat {
    /// DESIGN's names, and the short ones `quantd export --format` takes.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "gptq-safetensors" | "gptq" => Some(Self::GptqSafetensors),
            "awq-safetensors" | "awq" => Some(Self::AwqSafetensors),
            "bnb-safetensors" | "bnb" => Some(Self::BnbSafetensors),
            _ => None,
        }
    }

    /// The GPTQ/AWQ layout, for the integer-group formats.
    pub fn layout(self) -> Option<crate::export::gptq::Layout> {
        match self {
            Self::GptqSafetensors => Some(crate::export::gptq::Layout::Gptq),
            Self::AwqSafetensors => Some(crate::export::gptq::Layout::AwqGemm),
            Self::BnbSafetensors => None,
        }
    }

    /// The artifact's suffix: `<model>.gptq.tar`.
    pub fn short_name(self) -> &'static str {
        match self {
            Self::GptqSafetensors => "gptq",
            Self::AwqSafetensors => "awq",
            Self::BnbSafetensors => "bnb",
        }
    }
}

impl JobSpec {
    /// The model evaluations compare with: an eval job's reference, otherwise the model the
    /// job starts from.
    pub fn reference(&self) -> &str {
        match &self.method {
            MethodSpec::Eval(EvalMethodParams { reference: Some(r) }) => r,
            _ => &self.model,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "method", content = "params", rename_all = "kebab-case")]
pub enum MethodSpec {
    Gguf(GgufParams),
    Rtn(RtnParams),
    Gptq(GptqParams),
    Awq(AwqParams),
    Int8Dynamic(Int8DynamicParams),
    LlmInt8(LlmInt8Params),
    Nf4(Bnb4Params),
    Fp4(Bnb4Params),
    /// Scores an existing model against a reference; makes no model.
    Eval(EvalMethodParams),
}

impl MethodSpec {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Gguf(_) => "gguf",
            Self::Rtn(_) => "rtn",
            Self::Gptq(_) => "gptq",
            Self::Awq(_) => "awq",
            Self::Int8Dynamic(_) => "int8-dynamic",
            Self::LlmInt8(_) => "llm-int8",
            Self::Nf4(_) => "nf4",
            Self::Fp4(_) => "fp4",
            Self::Eval(_) => "eval",
        }
    }

    /// Whether the method runs calibration windows through the model.
    pub fn calibrates(&self) -> bool {
        match self {
            Self::Gguf(p) => p.imatrix,
            other => matches!(other, Self::Gptq(_) | Self::Awq(_)),
        }
    }

    /// Whether the job produces a model (everything but `eval`).
    pub fn makes_model(&self) -> bool {
        !matches!(self, Self::Eval(_))
    }

    /// The variant part of the default output id (`base:variant`), for methods that make one.
    pub fn default_variant(&self) -> Option<String> {
        match self {
            Self::Gguf(p) if p.imatrix => Some(format!("{}-imat", p.gguf_type.variant())),
            Self::Gguf(p) => Some(p.gguf_type.variant()),
            Self::Rtn(p) => Some(format!("rtn-{}", p.variant())),
            Self::Gptq(p) => Some(format!("gptq-{}", p.variant())),
            Self::Awq(p) => Some(format!("awq-{}", group_variant(&p.format()))),
            Self::Int8Dynamic(p) => Some(p.variant()),
            Self::LlmInt8(p) if p.threshold == LlmInt8Params::DEFAULT_THRESHOLD => {
                Some("llm-int8".into())
            }
            Self::LlmInt8(p) => Some(format!("llm-int8-t{}", p.threshold)),
            Self::Nf4(p) => Some(format!("nf4{}", p.variant())),
            Self::Fp4(p) => Some(format!("fp4{}", p.variant())),
            Self::Eval(_) => None,
        }
    }

    /// The integer groups of rtn, gptq and awq; `None` for methods without them.
    pub fn group_format(&self) -> Option<GroupFormat> {
        match self {
            Self::Rtn(p) => Some(p.format()),
            Self::Gptq(p) => Some(p.format()),
            Self::Awq(p) => Some(p.format()),
            Self::Gguf(_)
            | Self::Int8Dynamic(_)
            | Self::LlmInt8(_)
            | Self::Nf4(_)
            | Self::Fp4(_)
            | Self::Eval(_) => None,
        }
    }

    /// The 4-bit table of `nf4` and `fp4`.
    pub fn bnb4_kind(&self) -> Option<bnb4::Kind> {
        match self {
            Self::Nf4(_) => Some(bnb4::Kind::Nf4),
            Self::Fp4(_) => Some(bnb4::Kind::Fp4),
            _ => None,
        }
    }

    /// How the int8 kernel quantizes activations, for methods that store int8 rows.
    pub fn int8_activations(&self) -> Option<Activations> {
        match self {
            Self::Int8Dynamic(p) => Some(match p.activations {
                ActivationMode::PerToken => Activations::PerToken,
                ActivationMode::Torch => Activations::Torch,
            }),
            Self::LlmInt8(p) => Some(Activations::Outliers {
                threshold: p.threshold,
            }),
            _ => None,
        }
    }

    /// GGUF metadata that tells quantd how to serve the file (beyond its tensors).
    pub fn serving_metadata(&self) -> Vec<(String, Value)> {
        let Some(act) = self.int8_activations() else {
            return Vec::new();
        };
        let mut kv = vec![(
            int8_rows::ACTIVATIONS_KEY.to_string(),
            Value::String(act.name().into()),
        )];
        if let Activations::Outliers { threshold } = act {
            kv.push((int8_rows::THRESHOLD_KEY.to_string(), Value::F32(threshold)));
        }
        kv
    }

    /// The method's parameters as recorded in the GGUF and the manifest.
    pub fn params_json(&self) -> serde_json::Value {
        match self {
            Self::Gguf(p) => serde_json::to_value(p),
            Self::Rtn(p) => serde_json::to_value(p),
            Self::Gptq(p) => serde_json::to_value(p),
            Self::Awq(p) => serde_json::to_value(p),
            Self::Int8Dynamic(p) => serde_json::to_value(p),
            Self::LlmInt8(p) => serde_json::to_value(p),
            Self::Nf4(p) | Self::Fp4(p) => serde_json::to_value(p),
            Self::Eval(p) => serde_json::to_value(p),
        }
        .expect("params serialize")
    }
}

/// How `int8-dynamic` quantizes activations at run time.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
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
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
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
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Int8DynamicParams {
    #[serde(default)]
    pub activations: ActivationMode,
    /// Default: `per_tensor` with `activations: "torch"`, else `per_channel`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
    fn variant(&self) -> String {
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LlmInt8Params {
    /// Input columns with any |x| at or above this go through the float path.
    #[serde(default = "LlmInt8Params::default_threshold")]
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Bnb4Params {
    /// Weights per absmax, along each row.
    #[serde(default = "Bnb4Params::default_block_size")]
    pub block_size: usize,
    /// Store the absmax values in 8 bits (QLoRA's double quantization); off by default, as in
    /// bitsandbytes and transformers' `bnb_4bit_use_double_quant`.
    #[serde(default)]
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
    fn variant(&self) -> String {
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RtnParams {
    pub bits: u8,
    /// Columns per group; −1 = one group per output channel (row).
    #[serde(default = "RtnParams::default_group_size")]
    pub group_size: i64,
    #[serde(default = "RtnParams::default_sym")]
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

    fn variant(&self) -> String {
        group_variant(&self.format())
    }

    pub fn validate(&self) -> Result<(), ParamError> {
        validate_groups(self.bits, self.group_size)
    }
}

/// `4bit-g128-asym`, `8bit-pc-sym`.
fn group_variant(f: &GroupFormat) -> String {
    let group = match f.group_size {
        Some(g) => format!("g{g}"),
        None => "pc".into(),
    };
    let sym = if f.sym { "sym" } else { "asym" };
    format!("{}bit-{group}-{sym}", f.bits)
}

fn param_error(param: &str, message: String) -> ParamError {
    ParamError {
        param: format!("params.{param}"),
        message,
    }
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GptqParams {
    pub bits: u8,
    #[serde(default = "RtnParams::default_group_size")]
    pub group_size: i64,
    #[serde(default = "RtnParams::default_sym")]
    pub sym: bool,
    /// Quantize columns in order of decreasing Hessian diagonal ("desc_act"); on by default
    /// as in GPTQModel (on SmolLM2 it halves GPTQ's Δppl at 4 bits).
    #[serde(default = "GptqParams::default_true_sequential")]
    pub act_order: bool,
    /// Group parameters from the unquantized weights, groups in column order. Needed (and the
    /// default) with `act_order`, so that groups stay contiguous GGML blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub static_groups: Option<bool>,
    /// Fraction of the mean Hessian diagonal added to the diagonal.
    #[serde(default = "GptqParams::default_damp_percent")]
    pub damp_percent: f64,
    /// Quantize q/k/v, o, gate/up and down in turn, each on inputs computed with the ones
    /// before already quantized; off: every Hessian of a layer from unquantized inputs.
    #[serde(default = "GptqParams::default_true_sequential")]
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
    fn variant(&self) -> String {
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AwqParams {
    #[serde(default = "AwqParams::default_bits")]
    pub bits: u8,
    #[serde(default = "RtnParams::default_group_size")]
    pub group_size: i64,
    /// Asymmetric groups (Q4_1); false: symmetric (Q4_0).
    #[serde(default = "AwqParams::default_true")]
    pub zero_point: bool,
    /// Points of the α grid in [0, 1).
    #[serde(default = "AwqParams::default_grid")]
    pub grid: usize,
    /// AutoAWQ's s = mean|x|^α / mean_w^(1−α); false: the paper's s = mean|x|^α.
    #[serde(default)]
    pub duo_scaling: bool,
    /// Search a clipping range per group after scaling.
    #[serde(default = "AwqParams::default_true")]
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

/// DESIGN §2 `"calibration": {"dataset", "samples", "seq_len"}`, plus the seed of the window
/// offsets (or of the sampling, data-free).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CalibrationParams {
    /// None: data-free calibration on text the model generates itself (DESIGN §4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    #[serde(default = "CalibrationParams::default_samples")]
    pub samples: usize,
    #[serde(default = "CalibrationParams::default_seq_len")]
    pub seq_len: usize,
    #[serde(default)]
    pub seed: u64,
}

impl CalibrationParams {
    pub const SAMPLES_RANGE: std::ops::RangeInclusive<usize> = 1..=4096;
    pub const SEQ_LEN_RANGE: std::ops::RangeInclusive<usize> = 16..=8192;

    fn default_samples() -> usize {
        128
    }

    fn default_seq_len() -> usize {
        512
    }

    pub fn validate(&self) -> Result<(), ParamError> {
        let err = |param: &str, value: usize, range: &std::ops::RangeInclusive<usize>| ParamError {
            param: format!("calibration.{param}"),
            message: format!("{value} is outside {range:?}"),
        };
        if !Self::SAMPLES_RANGE.contains(&self.samples) {
            return Err(err("samples", self.samples, &Self::SAMPLES_RANGE));
        }
        if !Self::SEQ_LEN_RANGE.contains(&self.seq_len) {
            return Err(err("seq_len", self.seq_len, &Self::SEQ_LEN_RANGE));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalMethodParams {
    /// The model to compare against (same tokenizer); by default (None at the wire) the
    /// model's base, resolved at submit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

/// DESIGN §2 `"eval": {"dataset", "max_tokens", "ctx"}`, plus whether to measure speed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalParams {
    pub dataset: String,
    #[serde(default = "EvalParams::default_ctx")]
    pub ctx: usize,
    /// Scored tokens.
    #[serde(default = "EvalParams::default_max_tokens")]
    pub max_tokens: usize,
    /// Measure prompt and decode tokens/s of the model after scoring it.
    #[serde(default = "EvalParams::default_speed")]
    pub speed: bool,
}

impl EvalParams {
    pub const CTX_RANGE: std::ops::RangeInclusive<usize> = 16..=32_768;
    pub const MAX_TOKENS_RANGE: std::ops::RangeInclusive<usize> = 1..=1_048_576;

    fn default_ctx() -> usize {
        512
    }

    fn default_max_tokens() -> usize {
        16_384
    }

    fn default_speed() -> bool {
        true
    }

    pub fn validate(&self) -> Result<(), ParamError> {
        let err = |param: &str, message: String| ParamError {
            param: format!("eval.{param}"),
            message,
        };
        if !Self::CTX_RANGE.contains(&self.ctx) || !self.ctx.is_multiple_of(2) {
            return Err(err(
                "ctx",
                format!("{} must be even and within {:?}", self.ctx, Self::CTX_RANGE),
            ));
        }
        if !Self::MAX_TOKENS_RANGE.contains(&self.max_tokens) {
            return Err(err(
                "max_tokens",
                format!(
                    "{} is outside {:?}",
                    self.max_tokens,
                    Self::MAX_TOKENS_RANGE
                ),
            ));
        }
        Ok(())
    }
}

/// DESIGN §5's accuracy gate: a job that misses any bound fails and keeps no model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Gate {
    /// Upper bound on the mean KL divergence from the reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_kld: Option<f64>,
    /// Upper bound on Δppl % = 100 · (PPL / PPL_reference − 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delta_ppl_pct: Option<f64>,
    /// Lower bound on top-1 agreement, in percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_top1_pct: Option<f64>,
}

/// One bound of a gate against the measured value.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GateCheck {
    pub metric: &'static str,
    pub bound: &'static str,
    pub limit: f64,
    pub value: f64,
    pub passed: bool,
}

impl Gate {
    pub fn validate(&self) -> Result<(), ParamError> {
        let bounds = [
            ("max_kld", self.max_kld),
            ("max_delta_ppl_pct", self.max_delta_ppl_pct),
            ("min_top1_pct", self.min_top1_pct),
        ];
        if bounds.iter().all(|(_, v)| v.is_none()) {
            return Err(ParamError {
                param: "gate".into(),
                message: "name at least one of max_kld, max_delta_ppl_pct, min_top1_pct".into(),
            });
        }
        for (name, v) in bounds {
            if let Some(v) = v {
                let ok = match name {
                    "max_kld" => v.is_finite() && v >= 0.0,
                    "min_top1_pct" => (0.0..=100.0).contains(&v),
                    _ => v.is_finite(),
                };
                if !ok {
                    return Err(ParamError {
                        param: format!("gate.{name}"),
                        message: format!("{v} is not a valid bound"),
                    });
                }
            }
        }
        Ok(())
    }

    /// Each named bound against `kld_mean`, `delta_ppl_pct` and `top1_pct`.
    pub fn check(&self, kld_mean: f64, delta_ppl_pct: f64, top1_pct: f64) -> Vec<GateCheck> {
        let mut out = Vec::new();
        if let Some(limit) = self.max_kld {
            out.push(GateCheck {
                metric: "kld_mean",
                bound: "max_kld",
                limit,
                value: kld_mean,
                passed: kld_mean <= limit,
            });
        }
        if let Some(limit) = self.max_delta_ppl_pct {
            out.push(GateCheck {
                metric: "delta_ppl_pct",
                bound: "max_delta_ppl_pct",
                limit,
                value: delta_ppl_pct,
                passed: delta_ppl_pct <= limit,
            });
        }
        if let Some(limit) = self.min_top1_pct {
            out.push(GateCheck {
                metric: "top1_agreement_pct",
                bound: "min_top1_pct",
                limit,
                value: top1_pct,
                passed: top1_pct >= limit,
            });
        }
        out
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GgufParams {
    #[serde(rename = "type")]
    pub gguf_type: GgufType,
    /// Per-tensor type overrides by regex, applied in order; the last match wins.
    #[serde(default)]
    pub overrides: Vec<OverrideSpec>,
    /// Collect an importance matrix on the job's calibration windows and weight the block
    /// encoders with it (llama-quantize's `--imatrix`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub imatrix: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OverrideSpec {
    pub pattern: String,
    #[serde(rename = "type")]
    pub type_name: String,
}

#[derive(Debug, thiserror::Error)]
#[error("{param}: {message}")]
pub struct ParamError {
    pub param: String,
    pub message: String,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_round_trips_through_json_with_method_and_params() {
        let spec = JobSpec {
            model: "smol".into(),
            output_name: "smol:q4_k_m".into(),
            method: MethodSpec::Gguf(GgufParams {
                gguf_type: GgufType::Q4_K_M,
                overrides: vec![],
                imatrix: false,
            }),
            calibration: None,
            eval: None,
            gate: None,
            outputs: vec![],
        };
        let j = serde_json::to_value(&spec).unwrap();
        assert_eq!(j["method"], "gguf");
        assert_eq!(j["params"]["type"], "Q4_K_M");
        assert_eq!(serde_json::from_value::<JobSpec>(j).unwrap(), spec);
    }

    #[test]
    fn a_gate_fails_on_any_missed_bound_and_names_it() {
        let gate = Gate {
            max_kld: Some(0.05),
            max_delta_ppl_pct: Some(2.0),
            min_top1_pct: None,
        };
        assert!(gate.check(0.01, 1.0, 90.0).iter().all(|c| c.passed));
        let checks = gate.check(0.06, 1.0, 90.0);
        let missed: Vec<_> = checks.iter().filter(|c| !c.passed).collect();
        assert_eq!(missed.len(), 1);
        assert_eq!(missed[0].metric, "kld_mean");
        assert!(Gate {
            max_kld: None,
            max_delta_ppl_pct: None,
            min_top1_pct: None
        }
        .validate()
        .is_err());
    }

    #[test]
    fn torch_activations_alone_mean_pytorchs_default_recipe() {
        let parse = |v: serde_json::Value| serde_json::from_value::<Int8DynamicParams>(v).unwrap();
        let course = parse(serde_json::json!({"activations": "torch"}));
        assert_eq!(course.weight_scale(), WeightScale::PerTensor);
        assert_eq!(course.head_mode(), HeadMode::Int8);
        assert_eq!(course.variant(), "int8-torch");
        let per_channel = parse(
            serde_json::json!({"activations": "torch", "weights": "per_channel", "head": "float"}),
        );
        assert_eq!(per_channel.variant(), "int8-torch-per-channel-float-head");
        assert!(per_channel.validate().is_ok());
        let per_token = parse(serde_json::json!({}));
        assert_eq!(
            (per_token.weight_scale(), per_token.head_mode()),
            (WeightScale::PerChannel, HeadMode::Float)
        );
        assert_eq!(per_token.variant(), "int8-per-token");
        let head = parse(serde_json::json!({"head": "int8"}));
        assert_eq!(head.variant(), "int8-per-token-int8-head");
        let e = parse(serde_json::json!({"weights": "per_tensor"}))
            .validate()
            .unwrap_err();
        assert_eq!(e.param, "params.weights");
        // The stored spec keeps what was asked, so its hash is the request's.
        assert_eq!(
            serde_json::to_value(&course).unwrap(),
            serde_json::json!({"activations": "torch"})
        );
    }
}
