//! A server without API keys (the default, on loopback) cannot be driven by a web page in the
//! user's browser: a request whose Host is a foreign name (DNS rebinding) gets 403, and so
//! does a request that would change something when its Origin is another site. The same
//! requests from curl on loopback, or from the server's own pages, go through. With keys the
//! key is the guard, and a foreign Origin with a key is served.

mod common;

use std::process::Command;

use common::TestApp;

/// `curl` with `headers`, returning (status, body).
fn curl(method: &str, url: &str, headers: &[&str], body: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-o", "-", "-w", "\n%{http_code}", "-X", method]);
    for h in headers {
        cmd.arg("-H").arg(h);
    }
    if let Some(b) = body {
        cmd.args(["-H", "content-type: text/plain", "--data-binary", b]);
    }
    let out = cmd.arg(url).output().expect("curl runs");
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_string())
}

#[tokio::test]
async fn foreign_hosts_and_cross_site_writes_are_refused_without_keys() {
    let app = TestApp::spawn().await;
    let datasets = app.url("/v1/datasets");
    let text = Some("Some text to keep.");
    tokio::task::spawn_blocking(move || {
        // DNS rebinding: the page's own name, resolved to 127.0.0.1.
        let (status, body) = curl("GET", &datasets, &["Host: evil.example"], None);
        assert_eq!(status, 403, "{body}");
        assert!(body.contains("\"param\":\"host\""), "{body}");
        // A cross-site form or fetch.
        let (status, body) = curl("POST", &datasets, &["Origin: https://evil.example"], text);
        assert_eq!(status, 403, "{body}");
        assert!(body.contains("\"param\":\"origin\""), "{body}");
        let (status, _) = curl("POST", &datasets, &["Sec-Fetch-Site: cross-site"], text);
        assert_eq!(status, 403);
        let (status, _) = curl("POST", &datasets, &["Origin: null"], text);
        assert_eq!(status, 403);
        // Reading with a foreign Origin is the browser's to block (no CORS headers are sent).
        let (status, _) = curl("GET", &datasets, &["Origin: https://evil.example"], None);
        assert_eq!(status, 200);
        // curl on loopback, and the server's own pages, go through.
        let (status, body) = curl("POST", &datasets, &[], text);
        assert_eq!(status, 201, "{body}");
        let own = format!("Origin: {}", datasets.trim_end_matches("/v1/datasets"));
        let (status, _) = curl("POST", &datasets, &[&own, "Host: localhost"], text);
        assert_eq!(status, 200, "the same text again: found, not created");
    })
    .await
    .unwrap();
    app.stop().await;
}

#[tokio::test]
async fn configured_names_are_served_and_keys_replace_the_guard() {
    let app =
        TestApp::spawn_with(|s| s.server.allowed_hosts = vec!["quantd.internal".into()]).await;
    let models = app.url("/v1/models");
    let m = models.clone();
    let (status, _) =
        tokio::task::spawn_blocking(move || curl("GET", &m, &["Host: quantd.internal:8080"], None))
            .await
            .unwrap();
    assert_eq!(status, 200);
    app.stop().await;

    let app = TestApp::spawn_with(|s| s.auth.admin_keys = vec!["admin-secret-key".into()]).await;
    let datasets = app.url("/v1/datasets");
    let (status, body) = tokio::task::spawn_blocking(move || {
        curl(
            "POST",
            &datasets,
            &[
                "Origin: https://evil.example",
                "Authorization: Bearer admin-secret-key",
            ],
            Some("Text sent with a key."),
        )
    })
    .await
    .unwrap();
    assert_eq!(status, 201, "{body}");
    app.stop().await;
}
