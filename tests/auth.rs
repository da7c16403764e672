//! With API keys configured, every route but `/health` and `/ready` answers 401 without a key
//! (or with an unknown one), and admin routes answer 403 to an `infer` key.

mod common;

use common::TestApp;
use reqwest::Method;

const ADMIN: &str = "admin-secret-key";
const INFER: &str = "infer-secret-key";

/// (method, path, needs admin)
fn routes() -> Vec<(Method, &'static str, bool)> {
    let digest =
        "/v1/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000";
    vec![
        (Method::GET, "/v1/models", false),
        (Method::POST, "/v1/models", true),
        (Method::GET, "/v1/models/m", false),
        (Method::DELETE, "/v1/models/m", true),
        (Method::GET, "/v1/models/m/artifacts", false),
        (Method::GET, "/v1/models/m/artifacts/x.gguf", false),
        (Method::GET, "/v1/models/m/variants", false),
        (Method::POST, "/v1/completions", false),
        (Method::POST, "/v1/chat/completions", false),
        (Method::POST, "/v1/models/m/load", true),
        (Method::POST, "/v1/models/m/unload", true),
        (Method::GET, "/v1/engine", true),
        (Method::POST, "/v1/datasets", true),
        (Method::GET, "/v1/datasets", true),
        (Method::GET, "/v1/datasets/d", true),
        (Method::DELETE, "/v1/datasets/d", true),
        (Method::PUT, digest, true),
        (Method::HEAD, digest, true),
        (Method::POST, "/v1/jobs", true),
        (Method::GET, "/v1/jobs", true),
        (Method::GET, "/v1/jobs/j", true),
        (Method::GET, "/v1/jobs/j/events", true),
        (Method::POST, "/v1/jobs/j/cancel", true),
        (Method::POST, "/v1/jobs/j/retry", true),
    ]
}

#[tokio::test]
async fn every_route_but_health_and_ready_needs_a_key_with_the_right_scope() {
    let app = TestApp::spawn_with(|s| {
        s.auth.admin_keys = vec![ADMIN.into()];
        s.auth.infer_keys = vec![INFER.into()];
    })
    .await;
    for path in ["/health", "/ready"] {
        assert_eq!(
            app.client.get(app.url(path)).send().await.unwrap().status(),
            200,
            "{path}"
        );
    }
    for (method, path, admin) in routes() {
        let req = || app.client.request(method.clone(), app.url(path));
        let none = req().send().await.unwrap();
        assert_eq!(none.status(), 401, "{method} {path} without a key");
        let wrong = req().bearer_auth("not-a-real-key").send().await.unwrap();
        assert_eq!(wrong.status(), 401, "{method} {path} with an unknown key");
        let infer = req().bearer_auth(INFER).send().await.unwrap().status();
        if admin {
            assert_eq!(infer, 403, "{method} {path} with an infer key");
        } else {
            assert!(
                infer != 401 && infer != 403,
                "{method} {path}: infer key refused ({infer})"
            );
        }
        let with_admin = req()
            .header("x-api-key", ADMIN)
            .send()
            .await
            .unwrap()
            .status();
        assert!(
            with_admin != 401 && with_admin != 403,
            "{method} {path}: admin key refused ({with_admin})"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn binding_a_public_address_without_keys_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = quantd::config::Settings::defaults();
    s.data_dir = dir.path().to_path_buf();
    s.server.host = "0.0.0.0".parse().unwrap();
    s.server.port = 0;
    let err = quantd::startup::Application::build(s.clone())
        .await
        .err()
        .expect("must refuse");
    assert!(err.to_string().contains("--allow-unauthenticated"), "{err}");
    s.server.allow_unauthenticated = true;
    let app = quantd::startup::Application::build(s)
        .await
        .expect("explicitly allowed");
    drop(app);
}
