//! The one place errors become HTTP responses: every error below the HTTP layer maps to a
//! status and the OpenAI-style envelope `{"error": {message, type, param, code}}`. Internal
//! details are logged, not sent.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::catalog::CatalogError;
use crate::jobs::spec::ParamError;
use crate::jobs::submit::SubmitError;
use crate::model::checkpoint::CheckpointError;
use crate::model::config::ConfigError;
use crate::store::StoreError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            param: None,
        }
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request_error",
            message,
        )
        .with_param(param)
    }

    pub fn bad_request(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message).with_param(param)
    }

    pub fn not_found(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found_error", message).with_param(param)
    }

    pub fn conflict(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict_error", message).with_param(param)
    }

    /// A request body that could not be read (too large, cut off), as param `body`.
    pub fn body(e: axum::extract::rejection::BytesRejection) -> Self {
        Self::new(
            e.status(),
            "invalid_request_error",
            format!("request body: {}", e.body_text()),
        )
        .with_param("body")
    }

    pub fn internal(context: &str, e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "{context}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            format!("internal error while {context}; see the server log"),
        )
    }
}

/// The error envelope every 4xx and 5xx carries, as OpenAI sends it.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// What went wrong, for a person to read.
    pub message: String,
    /// `invalid_request_error`, `not_found_error`, `conflict_error`, `authentication_error`,
    /// `permission_error`, `server_error`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// The field or header at fault (`params.bits`, `authorization`), when there is one.
    pub param: Option<String>,
    /// Always null; kept for OpenAI clients that read it.
    pub code: Option<String>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                message: self.message,
                kind: self.kind.to_string(),
                param: self.param,
                code: None,
            },
        };
        (self.status, axum::Json(body)).into_response()
    }
}

/// A job field that fails its check: 422 naming it.
impl From<ParamError> for ApiError {
    fn from(e: ParamError) -> Self {
        Self::invalid(e.param, e.message)
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        Self::internal("accessing the database", e)
    }
}

impl From<std::io::Error> for ApiError {
    fn from(e: std::io::Error) -> Self {
        Self::internal("accessing storage", e)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::TooLarge { .. } => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                e.to_string(),
            )
            .with_param("body"),
            StoreError::DigestMismatch { .. } => Self::bad_request("digest", e.to_string()),
            StoreError::Body(_) => Self::bad_request("body", e.to_string()),
            StoreError::Stalled(_) => Self::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                e.to_string(),
            )
            .with_param("body"),
            StoreError::Io(io) => io.into(),
        }
    }
}

impl From<CheckpointError> for ApiError {
    fn from(e: CheckpointError) -> Self {
        match e {
            CheckpointError::Refused { ref file, .. } => {
                let file = file.clone();
                Self::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "invalid_request_error",
                    e.to_string(),
                )
                .with_param(file)
            }
            CheckpointError::Invalid { ref file, .. } => {
                let file = file.clone();
                Self::invalid(file, e.to_string())
            }
            CheckpointError::Config(ConfigError::UnsupportedArchitecture(_)) => {
                Self::invalid("config.json", e.to_string())
            }
            CheckpointError::Config(ConfigError::Invalid { ref field, .. }) => {
                let field = field.clone();
                Self::invalid(field, e.to_string())
            }
            CheckpointError::Io { .. } => Self::internal("reading an uploaded file", e),
        }
    }
}

impl From<CatalogError> for ApiError {
    fn from(e: CatalogError) -> Self {
        match e {
            CatalogError::NotFound(_) => Self::not_found("model", e.to_string()),
            CatalogError::Invalid { param, message } => Self::invalid(param, message),
            CatalogError::Conflict { param, message } => Self::conflict(param, message),
            CatalogError::Checkpoint(c) => c.into(),
            CatalogError::Db(d) => d.into(),
            CatalogError::Io(io) => io.into(),
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Invalid { param, message } => Self::invalid(param, message),
            SubmitError::NotFound { param, message } => Self::not_found(param, message),
            SubmitError::Conflict { param, message } => Self::conflict(param, message),
            SubmitError::Catalog(c) => c.into(),
            SubmitError::Db(d) => d.into(),
        }
    }
}
