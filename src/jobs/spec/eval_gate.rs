//! The blocks a quantizing job may carry beside its method: `calibration` (which text, how many
//! windows), `eval` (what to score the result on) and `gate` (the budgets it must meet).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::ParamError;

/// DESIGN §2 `"calibration": {"dataset", "samples", "seq_len"}`, plus the seed of the window
/// offsets (or of the sampling, data-free).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CalibrationParams {
    /// None: data-free calibration on text the model generates itself (DESIGN §4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "ds_0123456789abcdef")]
    pub dataset: Option<String>,
    /// Calibration windows.
    #[serde(default = "CalibrationParams::default_samples")]
    #[schema(default = 128, minimum = 1, maximum = 4096)]
    pub samples: usize,
    /// Tokens per window.
    #[serde(default = "CalibrationParams::default_seq_len")]
    #[schema(default = 512, minimum = 16, maximum = 8192)]
    pub seq_len: usize,
    /// Seed of the window offsets (or of the sampling, data-free).
    #[serde(default)]
    #[schema(default = 0)]
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

/// DESIGN §2 `"eval": {"dataset", "max_tokens", "ctx"}`, plus whether to measure speed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EvalParams {
    /// The evaluation text (never the calibration text).
    #[schema(example = "ds_0123456789abcdef")]
    pub dataset: String,
    /// Tokens per window (even); the second half of each window is scored.
    #[serde(default = "EvalParams::default_ctx")]
    #[schema(default = 512, minimum = 16, maximum = 32768, multiple_of = 2)]
    pub ctx: usize,
    /// Scored tokens.
    #[serde(default = "EvalParams::default_max_tokens")]
    #[schema(default = 16384, minimum = 1, maximum = 1048576)]
    pub max_tokens: usize,
    /// Measure prompt and decode tokens/s of the model after scoring it.
    #[serde(default = "EvalParams::default_speed")]
    #[schema(default = true)]
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

/// DESIGN §5's accuracy gate: a job that misses any bound fails and keeps no model. Name at
/// least one bound.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Gate {
    /// Upper bound on the mean KL divergence from the reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0.0, example = 0.05)]
    pub max_kld: Option<f64>,
    /// Upper bound on Δppl % = 100 · (PPL / PPL_reference − 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = 5.0)]
    pub max_delta_ppl_pct: Option<f64>,
    /// Lower bound on top-1 agreement, in percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0.0, maximum = 100.0, example = 90.0)]
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
