//! API keys with two scopes: `admin` (uploads, jobs, deletes, and everything `infer` may do)
//! and `infer` (list and read models, inference). Keys are compared in constant time on their
//! SHA-256, so neither content nor length leaks through timing.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::AppState;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Admin,
    Infer,
}

pub struct Keys {
    keys: Vec<([u8; 32], Scope)>,
}

impl Keys {
    pub fn new(admin: &[String], infer: &[String]) -> Self {
        let hash = |k: &String| -> [u8; 32] { Sha256::digest(k.as_bytes()).into() };
        let keys = admin
            .iter()
            .map(|k| (hash(k), Scope::Admin))
            .chain(infer.iter().map(|k| (hash(k), Scope::Infer)))
            .collect();
        Self { keys }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The scope of `presented`, checking every key so the time taken does not depend on which
    /// (if any) matched.
    pub fn scope_of(&self, presented: &str) -> Option<Scope> {
        let h: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for (k, scope) in &self.keys {
            if bool::from(k.ct_eq(&h)) {
                found = Some(*scope);
            }
        }
        found
    }
}

/// The scope a route needs: reading models (GET) is open to `infer` keys; everything else
/// (uploads, jobs, deletes) needs `admin`.
fn required_scope(method: &Method, path: &str) -> Scope {
    let model_read =
        path.starts_with("/v1/models") && (method == Method::GET || method == Method::HEAD);
    let inference =
        method == Method::POST && (path == "/v1/completions" || path == "/v1/chat/completions");
    if model_read || inference {
        Scope::Infer
    } else {
        Scope::Admin
    }
}

/// The dashboard's cookie: the key, hex-encoded so any key is a valid cookie value.
pub const COOKIE: &str = "quantd_key";

/// The key a request presents: `Authorization: Bearer`, `x-api-key`, or (only when
/// `allow_cookie`, which callers grant to GET and HEAD) the dashboard's cookie. A cookie is sent
/// by the browser on its own, so it may read but never change anything; that, and
/// SameSite=Strict, keeps other sites from acting with it.
pub fn key_from_headers(headers: &HeaderMap, allow_cookie: bool) -> Option<String> {
    if let Some(v) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        return v.strip_prefix("Bearer ").map(|k| k.trim().to_string());
    }
    if let Some(v) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(v.to_string());
    }
    if !allow_cookie {
        return None;
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
        .find_map(|hex_key| String::from_utf8(hex::decode(hex_key).ok()?).ok())
}

pub async fn require_key(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if state.keys.is_empty() {
        return Ok(next.run(req).await);
    }
    let reading = req.method() == Method::GET || req.method() == Method::HEAD;
    let Some(key) = key_from_headers(req.headers(), reading) else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "missing API key: send 'Authorization: Bearer <key>'",
        )
        .with_param("authorization"));
    };
    let Some(scope) = state.keys.scope_of(&key) else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid API key",
        )
        .with_param("authorization"));
    };
    let needed = required_scope(req.method(), req.uri().path());
    if needed == Scope::Admin && scope != Scope::Admin {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            "this API key has the 'infer' scope; this route needs 'admin'",
        )
        .with_param("authorization"));
    }
    Ok(next.run(req).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_resolve_to_their_scope_and_unknown_keys_to_none() {
        let keys = Keys::new(&["admin-key-123".into()], &["infer-key-456".into()]);
        assert_eq!(keys.scope_of("admin-key-123"), Some(Scope::Admin));
        assert_eq!(keys.scope_of("infer-key-456"), Some(Scope::Infer));
        assert_eq!(keys.scope_of("admin-key-12"), None);
    }

    #[test]
    fn the_cookie_counts_only_where_reading_is_allowed() {
        let mut h = HeaderMap::new();
        let cookie = format!("other=1; {COOKIE}={}", hex::encode("k-1"));
        h.insert(header::COOKIE, cookie.parse().unwrap());
        assert_eq!(key_from_headers(&h, true).as_deref(), Some("k-1"));
        assert_eq!(key_from_headers(&h, false), None);
        h.insert("authorization", "Bearer k-2".parse().unwrap());
        assert_eq!(key_from_headers(&h, true).as_deref(), Some("k-2"));
    }

    #[test]
    fn only_model_reads_are_open_to_infer_keys() {
        assert_eq!(
            required_scope(&Method::GET, "/v1/models/x/artifacts"),
            Scope::Infer
        );
        assert_eq!(required_scope(&Method::POST, "/v1/models"), Scope::Admin);
        assert_eq!(required_scope(&Method::GET, "/v1/jobs"), Scope::Admin);
        assert_eq!(
            required_scope(&Method::DELETE, "/v1/models/x"),
            Scope::Admin
        );
    }
}
