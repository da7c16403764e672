//! The official `openai` Python client (PyPI) against a running quantd serving SmolLM2:
//! completions, chat, streaming, logprobs, seeds and errors, through
//! `scripts/interop/openai_client_check.py`. An infer-scope key is enough for all of it.

mod common;

use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_client_works_against_the_server() {
    let app = common::TestApp::spawn_with(|s| {
        s.auth.admin_keys = vec!["admin-key-0001".into()];
        s.auth.infer_keys = vec!["infer-key-0001".into()];
    })
    .await;
    let dir = common::fixture().join("hf-f32");
    let form = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .fold(
            reqwest::multipart::Form::new().text("name", "smol"),
            |f, (name, bytes)| {
                f.part(
                    name.clone(),
                    reqwest::multipart::Part::bytes(bytes).file_name(name),
                )
            },
        );
    let r = app
        .client
        .post(app.url("/v1/models"))
        .bearer_auth("admin-key-0001")
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    let base = app.url("/v1");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(common::python())
            .arg(common::repo_root().join("scripts/interop/openai_client_check.py"))
            .args([
                "--base-url",
                &base,
                "--api-key",
                "infer-key-0001",
                "--model",
                "smol",
            ])
            .output()
            .expect("python runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("all checks passed"), "{stdout}");
}
