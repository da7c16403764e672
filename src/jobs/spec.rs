//! A job as the rest of the system sees it once the HTTP layer has validated it: which model,
//! which method with typed parameters, and the output name. Stored as JSON in `jobs.spec`.

use serde::{Deserialize, Serialize};

use crate::quant::mix::{parse_ggml_type, Override};
use crate::quant::GgufType;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobSpec {
    pub model: String,
    pub output_name: String,
    #[serde(flatten)]
    pub method: MethodSpec,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "method", content = "params", rename_all = "kebab-case")]
pub enum MethodSpec {
    Gguf(GgufParams),
}

impl MethodSpec {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Gguf(_) => "gguf",
        }
    }

    /// The variant part of the default output id (`base:variant`).
    pub fn default_variant(&self) -> String {
        match self {
            Self::Gguf(p) => p.gguf_type.variant(),
        }
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

/// Model ids: `[a-z0-9][a-z0-9._:-]{0,127}` (DESIGN §2). Ids are never used as paths.
pub fn is_valid_model_id(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._:-".contains(c))
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
            }),
        };
        let j = serde_json::to_value(&spec).unwrap();
        assert_eq!(j["method"], "gguf");
        assert_eq!(j["params"]["type"], "Q4_K_M");
        assert_eq!(serde_json::from_value::<JobSpec>(j).unwrap(), spec);
    }

    #[test]
    fn model_ids_follow_the_design_pattern() {
        assert!(is_valid_model_id("smollm2-135m:q4_k_m"));
        assert!(!is_valid_model_id("Smol"));
        assert!(!is_valid_model_id("../etc"));
        assert!(!is_valid_model_id(""));
        assert!(!is_valid_model_id(&"a".repeat(129)));
    }
}
