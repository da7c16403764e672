//! What every stage of a job shares: how a stage fails (`RunError`) and how its blocking work
//! runs off the async executor while its log lines keep the job's span (`job_id`).

use crate::catalog::CatalogError;

#[derive(Debug, thiserror::Error)]
pub(crate) enum RunError {
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Failed(String),
    /// The accuracy gate was missed: the job fails, keeping what was measured.
    #[error("{message}")]
    GateMissed {
        message: String,
        report: serde_json::Value,
    },
}

impl From<CatalogError> for RunError {
    fn from(e: CatalogError) -> Self {
        Self::Failed(e.to_string())
    }
}

impl From<sqlx::Error> for RunError {
    fn from(e: sqlx::Error) -> Self {
        Self::Failed(format!("database: {e}"))
    }
}

impl From<std::io::Error> for RunError {
    fn from(e: std::io::Error) -> Self {
        Self::Failed(format!("I/O: {e}"))
    }
}

/// `tokio::task::spawn_blocking` inside the caller's tracing span, so lines logged by the
/// blocking work still carry the job's `job_id`.
pub(crate) fn spawn_blocking_in_span<F, R>(work: F) -> tokio::task::JoinHandle<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(work))
}
