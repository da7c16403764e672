//! A JSON body extractor whose errors name the offending field (`params.type`), using
//! serde_path_to_error, and answer in the API's error envelope.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::error::ApiError;

pub struct ValidJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ValidJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if !is_json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                "expected Content-Type: application/json",
            )
            .with_param("content-type"));
        }
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(ApiError::body)?;
        parse(&bytes).map(ValidJson)
    }
}

/// Deserializes with the failing field's path in the error.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    crate::json_errors::deserialize(de).map_err(|(param, e)| {
        let inner = e.into_inner();
        let status = if inner.is_syntax() || inner.is_eof() {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::UNPROCESSABLE_ENTITY
        };
        ApiError::new(status, "invalid_request_error", format!("{param}: {inner}"))
            .with_param(param)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Req {
        model: String,
        inner: Inner,
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        bits: u8,
    }

    #[test]
    fn wrong_types_unknown_and_missing_fields_are_named() {
        let e = parse::<Req>(br#"{"model": "m", "inner": {"bits": "x"}}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("inner.bits"));
        let e = parse::<Req>(br#"{"model": "m", "inner": {"bits": 4}, "extra": 1}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("extra"));
        let e = parse::<Req>(br#"{"model": "m"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("inner"));
        let e = parse::<Req>(b"{not json").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }
}
