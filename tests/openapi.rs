//! The OpenAPI document: the committed `openapi.json` equals what the code generates (run with
//! `QUANTD_BLESS=1` to rewrite it after an API change), the server serves the same document,
//! every documented operation reaches a real route, and schemathesis (PyPI) fuzzing a live
//! server with a model, a dataset and a job in it finds no 5xx, no undocumented status and no
//! response that breaks the schema.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{tiny, TestApp};
use serde_json::{json, Value};

const KEY: &str = "sk-openapi-test";

#[test]
fn committed_openapi_json_matches_the_code() {
    let generated = quantd::http::openapi::document_json();
    let path = common::repo_root().join("openapi.json");
    if std::env::var_os("QUANTD_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "openapi.json differs from the API the code describes; rerun with QUANTD_BLESS=1 \
         and commit the file (first difference near byte {})",
        committed
            .bytes()
            .zip(generated.bytes())
            .position(|(a, b)| a != b)
            .unwrap_or(committed.len().min(generated.len()))
    );
    let doc: Value = serde_json::from_str(&generated).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
}

/// A server with an admin key, whose test client sends it on every request.
async fn spawn() -> TestApp {
    TestApp::spawn_with(|s| s.auth.admin_keys = vec![KEY.into()])
        .await
        .with_key(KEY)
}

#[tokio::test]
async fn the_server_serves_the_document_and_every_operation_reaches_a_route() {
    let app = spawn().await;
    let served: Value = reqwest::Client::new()
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let doc: Value = serde_json::from_str(&quantd::http::openapi::document_json()).unwrap();
    assert_eq!(
        served, doc,
        "served without a key, and equal to the generated one"
    );

    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 20, "{:?}", paths.keys());
    // Links name operations that exist, so a client can follow them.
    let ops: Vec<&Value> = paths
        .values()
        .flat_map(|item| item.as_object().unwrap().values())
        .collect();
    let ids: Vec<&str> = ops
        .iter()
        .filter_map(|op| op["operationId"].as_str())
        .collect();
    let mut links = 0;
    for op in &ops {
        for response in op["responses"].as_object().unwrap().values() {
            for link in response["links"]
                .as_object()
                .into_iter()
                .flat_map(|l| l.values())
            {
                let target = link["operationId"].as_str().unwrap();
                assert!(
                    ids.contains(&target),
                    "a link to unknown operation {target}"
                );
                links += 1;
            }
        }
    }
    assert!(links >= 10, "{links} links");
    for (template, ops) in paths {
        let path = template
            .replace("{digest}", &format!("sha256:{}", "0".repeat(64)))
            .replace(['{', '}'], "");
        for method in ops.as_object().unwrap().keys() {
            let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let resp = app
                .client
                .request(m.clone(), app.url(&path))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let body = resp.text().await.unwrap_or_default();
            assert!(
                !body.contains("no such route") && status != 405,
                "{method} {template} is documented but not routed: {status} {body}"
            );
            // Each documented operation declares the status it answered with.
            let declared = &ops[method]["responses"];
            assert!(
                declared.get(status.to_string()).is_some(),
                "{method} {template} answered {status}, not among {:?}",
                declared.as_object().unwrap().keys().collect::<Vec<_>>()
            );
        }
    }
    app.stop().await;
}

/// Which Python has schemathesis: the fixture venv, where scripts/test.sh installs it.
fn schemathesis() -> std::path::PathBuf {
    let python = common::python();
    let st = python.with_file_name("schemathesis");
    assert!(
        st.exists(),
        "schemathesis is missing beside {}: run scripts/test.sh (it installs it)",
        python.display()
    );
    st
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_errors_and_no_schema_violations() {
    let st = schemathesis();
    let app = spawn().await;
    // The examples in the document name model "smollm2": give the server one by that name (a
    // tiny random model), a dataset and a finished job, so requests reach the success paths
    // and their responses are checked too.
    tiny::upload(&app, "smollm2").await;
    let (status, job) = app
        .post_json(
            "/v1/jobs",
            &json!({"model": "smollm2", "method": "rtn", "params": {"bits": 4, "group_size": 32}}),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    let done = app
        .wait_job(job["id"].as_str().unwrap(), Duration::from_secs(60))
        .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    app.post_dataset(&common::corpus("calib-emma.txt", 2000))
        .await;

    let url = app.url("/openapi.json");
    // A fixed seed keeps CI repeatable; QUANTD_SCHEMATHESIS_SEED and _EXAMPLES explore more.
    let seed = std::env::var("QUANTD_SCHEMATHESIS_SEED").unwrap_or_else(|_| "1".into());
    let examples = std::env::var("QUANTD_SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "25".into());
    // Run from a scratch folder: schemathesis keeps a cache in `.schemathesis/` of its cwd.
    let scratch = tempfile::tempdir().unwrap();
    let cwd = scratch.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(st)
            .current_dir(cwd)
            .args([
                "run",
                &url,
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
                "--max-examples",
                &examples,
                "--seed",
                &seed,
                "--header",
                &format!("Authorization: Bearer {KEY}"),
                "--request-timeout",
                "30",
                "--no-color",
                // Nothing kept between runs (the default writes .schemathesis/ here).
                "--generation-database",
                "none",
            ])
            .env("SCHEMATHESIS_HOOKS", "")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schemathesis found problems:\n{text}");
    let summary = text.find("SUMMARY").map_or(text.as_str(), |i| &text[i..]);
    eprintln!("{summary}");
    // It did run the operations (a broken document would test nothing and still exit 0).
    assert!(
        text.contains("passed") && !text.contains("No operations"),
        "{text}"
    );
    // The document describes each method's params: schemathesis's bodies reach 202 for them
    // (its examples phase sends the documented per-method examples, and generated bodies whose
    // params fit their method get through too). Jobs it made, by method, besides the setup's.
    let (_, jobs) = app.get_json("/v1/jobs?limit=100").await;
    let mut accepted = std::collections::BTreeMap::<String, usize>::new();
    for job in jobs["data"].as_array().unwrap() {
        *accepted
            .entry(job["method"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    *accepted.get_mut("rtn").unwrap() -= 1;
    accepted.retain(|_, n| *n > 0);
    eprintln!("jobs schemathesis submitted (202), by method: {accepted:?}");
    // Which examples and bodies it sends varies with the seed; several methods must get in.
    assert!(
        accepted.len() >= 4,
        "too few methods reached 202: {accepted:?}"
    );
    app.stop().await;
}
