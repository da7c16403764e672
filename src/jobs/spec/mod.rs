//! A job as the rest of the system sees it once the HTTP layer has validated it: which model,
//! which method with typed parameters, the output name, and the optional evaluation and
//! accuracy gate. Stored as JSON in `jobs.spec`.

mod eval_gate;
mod methods;
pub mod schema;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::formats::bnb4;
use crate::formats::gguf::Value;
use crate::formats::groups::GroupFormat;
use crate::formats::int8_rows;
use crate::kernels::int8::Activations;

pub use eval_gate::{CalibrationParams, EvalParams, Gate, GateCheck};
use methods::group_variant;
pub use methods::{
    ActivationMode, AwqParams, Bnb4Params, EvalMethodParams, GgufParams, GptqParams, HeadMode,
    Int8DynamicParams, LlmInt8Params, OverrideSpec, RtnParams,
};

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

/// Every method a job may name, as the API documents them.
pub const METHOD_NAMES: [&str; 9] = [
    "gguf",
    "eval",
    "rtn",
    "gptq",
    "awq",
    "int8-dynamic",
    "llm-int8",
    "nf4",
    "fp4",
];

impl MethodSpec {
    /// The one place a method's name and parameters become a typed, checked method, for the
    /// API (`POST /v1/jobs`) and the command line alike. Null `params` mean `{}`. An error names
    /// the field: `method` for an unknown method, `params.<field>` for a parameter.
    pub fn parse(method: &str, params: serde_json::Value) -> Result<Self, ParamError> {
        let params = if params.is_null() {
            serde_json::json!({})
        } else {
            params
        };
        let spec = match method {
            "gguf" => Self::Gguf(params_of(params)?),
            "rtn" => Self::Rtn(params_of(params)?),
            "gptq" => Self::Gptq(params_of(params)?),
            "awq" => Self::Awq(params_of(params)?),
            "int8-dynamic" => Self::Int8Dynamic(params_of(params)?),
            "llm-int8" => Self::LlmInt8(params_of(params)?),
            "nf4" => Self::Nf4(params_of(params)?),
            "fp4" => Self::Fp4(params_of(params)?),
            "eval" => Self::Eval(params_of(params)?),
            other => return Err(Self::unknown(other)),
        };
        spec.validate()?;
        Ok(spec)
    }

    /// Whether `method` names a method, before its parameters are read (so an unknown method is
    /// the error a request gets first).
    pub fn check_name(method: &str) -> Result<(), ParamError> {
        if METHOD_NAMES.contains(&method) {
            Ok(())
        } else {
            Err(Self::unknown(method))
        }
    }

    fn unknown(method: &str) -> ParamError {
        ParamError {
            param: "method".into(),
            message: format!(
                "unknown method {method:?} (known: {})",
                METHOD_NAMES.join(", ")
            ),
        }
    }

    /// The checks of each method's parameters that serde cannot express.
    fn validate(&self) -> Result<(), ParamError> {
        match self {
            Self::Gguf(p) => p.validate(),
            Self::Rtn(p) => p.validate(),
            Self::Gptq(p) => p.validate(),
            Self::Awq(p) => p.validate(),
            Self::Int8Dynamic(p) => p.validate(),
            Self::LlmInt8(p) => p.validate(),
            Self::Nf4(p) | Self::Fp4(p) => p.validate(),
            Self::Eval(_) => Ok(()),
        }
    }

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

#[derive(Debug, thiserror::Error)]
#[error("{param}: {message}")]
pub struct ParamError {
    pub param: String,
    pub message: String,
}

/// A method's parameters from JSON; a failing field is named `params.<path>`.
fn params_of<T: DeserializeOwned>(params: serde_json::Value) -> Result<T, ParamError> {
    crate::json_errors::deserialize(params).map_err(|(path, e)| {
        let param = match path.as_str() {
            "." | "" => "params".to_string(),
            p => format!("params.{p}"),
        };
        ParamError {
            message: format!("{param}: {}", e.into_inner()),
            param,
        }
    })
}

pub(super) fn param_error(param: &str, message: String) -> ParamError {
    ParamError {
        param: format!("params.{param}"),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::int8_rows::WeightScale;
    use crate::quant::GgufType;

    /// The smallest valid `params` of each method.
    fn minimal_params(method: &str) -> serde_json::Value {
        match method {
            "gguf" => serde_json::json!({"type": "Q4_K_M"}),
            "rtn" | "gptq" => serde_json::json!({"bits": 4}),
            _ => serde_json::Value::Null,
        }
    }

    #[test]
    fn every_method_name_parses_to_the_method_of_that_name() {
        for name in METHOD_NAMES {
            let spec = MethodSpec::parse(name, minimal_params(name)).unwrap();
            assert_eq!(spec.name(), name);
        }
        let names: Vec<&str> = schema::PARAMS_BY_METHOD.iter().map(|(m, _)| *m).collect();
        assert_eq!(
            names, METHOD_NAMES,
            "the document lists each method's params"
        );
    }

    #[test]
    fn an_unknown_method_or_a_bad_parameter_is_named() {
        let e = MethodSpec::parse("gptq2", serde_json::json!({})).unwrap_err();
        assert_eq!(e.param, "method");
        assert!(e.message.contains("gguf, eval, rtn, gptq"), "{}", e.message);
        assert_eq!(MethodSpec::check_name("gptq2").unwrap_err().param, "method");
        assert!(MethodSpec::check_name("nf4").is_ok());
        let e = MethodSpec::parse("rtn", serde_json::json!({"bits": 5})).unwrap_err();
        assert_eq!(e.param, "params.bits");
        let e = MethodSpec::parse("rtn", serde_json::json!({"bits": 4, "grup": 1})).unwrap_err();
        assert_eq!(e.param, "params.grup");
        let e = MethodSpec::parse("gguf", serde_json::json!({})).unwrap_err();
        assert_eq!(e.param, "params.type");
    }

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
