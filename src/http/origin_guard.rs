//! Without API keys, the server trusts whoever can reach it, which on the default loopback
//! bind means programs on this machine. A web page in the user's browser can reach it too: by
//! DNS rebinding (a name the page controls resolves to 127.0.0.1, so requests carry that name
//! as `Host`) or by cross-site requests (a form POSTing to 127.0.0.1:8080). So a keyless
//! server answers only requests whose `Host` is a loopback name, the address it is bound to or
//! a name in `server.allowed_hosts`, and refuses state-changing requests whose `Origin` (or
//! `Sec-Fetch-Site`) says another site sent them. With keys, the key is the guard: a page
//! cannot read it, and cross-origin reads stay blocked by the browser (no CORS headers).

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

use super::error::ApiError;
use super::AppState;

pub async fn guard(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if !state.keys.is_empty() {
        return Ok(next.run(req).await);
    }
    let settings = state.settings();
    let allowed = |host: &str| {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        host.eq_ignore_ascii_case("localhost")
            || host.to_ascii_lowercase().ends_with(".localhost")
            || host.parse::<std::net::IpAddr>().is_ok_and(|ip| {
                ip.is_loopback() || (ip == settings.server.host && !ip.is_unspecified())
            })
            || settings
                .server
                .allowed_hosts
                .iter()
                .any(|h| h.eq_ignore_ascii_case(host))
    };
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(host_of);
    if let Some(host) = host {
        if !allowed(host) {
            return Err(refused(
                "host",
                format!(
                    "Host {host:?} is not a name of this server: without API keys only loopback \
                     names and server.allowed_hosts are served (a guard against DNS rebinding)"
                ),
            ));
        }
    }
    let changes_state = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if changes_state {
        if let Some(origin) = req.headers().get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("");
            let origin_host = origin.split_once("://").map(|(_, rest)| host_of(rest));
            if !origin_host.is_some_and(allowed) {
                return Err(refused(
                    "origin",
                    format!(
                        "a request from origin {origin:?} may not change anything on a server \
                         without API keys (a guard against cross-site requests)"
                    ),
                ));
            }
        } else if req
            .headers()
            .get("sec-fetch-site")
            .is_some_and(|v| v.as_bytes() == b"cross-site")
        {
            return Err(refused(
                "origin",
                "a cross-site request may not change anything on a server without API keys",
            ));
        }
    }
    Ok(next.run(req).await)
}

/// The host part of `host[:port]` (or of `[v6]:port`).
fn host_of(authority: &str) -> &str {
    let authority = authority.split('/').next().unwrap_or(authority);
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    authority.rsplit_once(':').map_or(authority, |(h, _)| h)
}

fn refused(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "permission_error", message).with_param(param)
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn hosts_are_read_without_their_port() {
        assert_eq!(host_of("127.0.0.1:8080"), "127.0.0.1");
        assert_eq!(host_of("localhost"), "localhost");
        assert_eq!(host_of("[::1]:8080"), "::1");
        assert_eq!(host_of("evil.example:80/path"), "evil.example");
    }
}
