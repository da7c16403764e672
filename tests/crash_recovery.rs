//! Durability: `kill -9` of the real binary while a job runs, then a restart. The job must be
//! re-queued (its attempt counted) and succeed, and no temp or orphan file may remain.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::cluster::{blob_files, referenced_digests};
use common::fixture;
use common::process::{self, free_port, ServerProcess as Server};
use serde_json::{json, Value};

fn start_server(data_dir: &std::path::Path, port: u16) -> Server {
    let env = [("QUANTD_JOBS__PROGRESS_INTERVAL_MS", "50")];
    process::start(data_dir, port, &env, Stdio::null(), Stdio::null())
}

fn get(s: &Server, path: &str) -> Value {
    reqwest::blocking::get(format!("{}{path}", s.base))
        .unwrap()
        .json()
        .unwrap()
}

#[test]
fn a_job_killed_with_sigkill_is_requeued_and_succeeds_without_orphans() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut server = start_server(data.path(), port);
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap();
    let dir = fixture().join("hf-f16");
    let mut form = reqwest::blocking::multipart::Form::new().text("name", "smol");
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        form = form.file(f, dir.join(f)).unwrap();
    }
    let r = client
        .post(format!("{}/v1/models", server.base))
        .multipart(form)
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    let job: Value = client
        .post(format!("{}/v1/jobs", server.base))
        .json(&json!({"model": "smol", "method": "gguf", "params": {"type": "Q3_K_M"}}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let id = job["id"].as_str().unwrap().to_string();

    // Kill once real work is under way.
    let start = Instant::now();
    loop {
        let j = get(&server, &format!("/v1/jobs/{id}"));
        if j["status"] == "running" && j["progress"]["done"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "job never ran: {j}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server.child.kill().unwrap(); // SIGKILL
    server.child.wait().unwrap();

    let mut server = start_server(data.path(), port);
    let start = Instant::now();
    let job = loop {
        let j = get(&server, &format!("/v1/jobs/{id}"));
        if matches!(
            j["status"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        ) {
            break j;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "job did not finish after restart: {j}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 2, "the killed run counts as an attempt");

    // Every stored file belongs to a model; nothing is left in tmp/.
    assert_eq!(blob_files(data.path()), referenced_digests(&server));
    let log = get(&server, &format!("/v1/jobs/{id}"));
    assert_eq!(log["output_model"], "smol:q3_k_m");
    server.child.kill().unwrap();
    server.child.wait().unwrap();
}
