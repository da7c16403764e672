//! Which field a JSON deserialization error is about, as a dotted path (`params.group_size`):
//! serde_path_to_error gives the path to the value that failed, and serde names an unknown or
//! missing field only in its message. The HTTP extractor and the job-method parser both answer
//! with this path, so the API and the CLI name a field the same way.

/// Deserializes `value`, or gives the failing field's path and serde's message.
pub fn deserialize<'de, T, D>(de: D) -> Result<T, (String, serde_path_to_error::Error<D::Error>)>
where
    T: serde::Deserialize<'de>,
    D: serde::Deserializer<'de>,
    D::Error: std::fmt::Display,
{
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        (field_path(&path, &message), e)
    })
}

/// The dotted path of the field at fault: the value's path, extended by the field an
/// "unknown field" or "missing field" message names.
pub fn field_path(path: &str, message: &str) -> String {
    match field_in_message(message) {
        Some(f) => match path {
            "." => f.to_string(),
            p if p == f || p.ends_with(&format!(".{f}")) => p.to_string(),
            p => format!("{p}.{f}"),
        },
        None => path.to_string(),
    }
}

/// serde names unknown and missing fields only in its message: "unknown field `x`".
fn field_in_message(message: &str) -> Option<&str> {
    let rest = message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("missing field `"))?;
    rest.split('`').next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_missing_fields_extend_the_path() {
        assert_eq!(field_path(".", "missing field `model`"), "model");
        assert_eq!(
            field_path("params", "unknown field `bitz`, expected"),
            "params.bitz"
        );
        assert_eq!(
            field_path("params.bits", "invalid type: string"),
            "params.bits"
        );
    }
}
