//! The OpenAPI shapes of a job request's parts that the serde types do not give on their own:
//! the method name as an enum, `params` as one schema per method (`oneOf`; which one applies
//! is chosen by `method`), and the GGUF type names.

use std::borrow::Cow;

use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::openapi::{Ref, RefOr};
use utoipa::{PartialSchema, ToSchema};

use super::METHOD_NAMES;
use crate::quant::GgufType;

/// `method`: one of the names `MethodSpec::parse` takes.
pub fn method_name() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(METHOD_NAMES))
        .description(Some(
            "The method; it decides which schema `params` follows (see `params`).",
        ))
        .examples([serde_json::json!("rtn")])
}

/// Each method and the component that describes its `params`.
pub const PARAMS_BY_METHOD: [(&str, &str); 9] = [
    ("gguf", "GgufParams"),
    ("eval", "EvalMethodParams"),
    ("rtn", "RtnParams"),
    ("gptq", "GptqParams"),
    ("awq", "AwqParams"),
    ("int8-dynamic", "Int8DynamicParams"),
    ("llm-int8", "LlmInt8Params"),
    ("nf4", "Bnb4Params"),
    ("fp4", "Bnb4Params"),
];

/// `params`: the schema of the named method's parameters. OpenAPI's discriminator cannot name
/// a sibling field, so the choice is documented and `oneOf` lists each distinct schema once.
pub fn method_params() -> Schema {
    let mut one_of = OneOfBuilder::new().description(Some(format!(
        "The method's parameters, by `method`: {}. Omitted or null: `{{}}` (every field at its \
         default).",
        PARAMS_BY_METHOD
            .iter()
            .map(|(m, s)| format!("{m} → {s}"))
            .collect::<Vec<_>>()
            .join(", ")
    )));
    let mut seen = Vec::new();
    for (_, schema) in PARAMS_BY_METHOD {
        if !seen.contains(&schema) {
            seen.push(schema);
            one_of = one_of.item(Ref::from_schema_name(schema));
        }
    }
    Schema::OneOf(one_of.build())
}

impl PartialSchema for GgufType {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(GgufType::ALL.map(GgufType::name)))
            .description(Some(
                "A GGUF file type, spelled as llama-quantize spells it.",
            ))
            .into()
    }
}

impl ToSchema for GgufType {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("GgufType")
    }
}
