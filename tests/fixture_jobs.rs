//! End to end on the real SmolLM2-135M fixture: a curl multipart upload becomes a model, gguf
//! jobs produce files the reference `gguf` Python reader opens with the expected tensor types
//! and metadata, and cancellation leaves nothing behind.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{fixture, python, repo_root, TestApp};
use serde_json::{json, Value};

/// Uploads the fixture's HF f16 folder with curl `-F`, as a user would.
fn curl_upload(app: &common::UrlOnly, name: &str) -> Value {
    let dir = fixture().join("hf-f16");
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "-X",
        "POST",
        &app.url("/v1/models"),
        "-F",
        &format!("name={name}"),
    ]);
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        cmd.args(["-F", &format!("{f}=@{}", dir.join(f).display())]);
    }
    let out = cmd.output().expect("curl runs");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&out.stdout)))
}

/// SHA-256 of every tensor's bytes, tensors in name order (independent of metadata and layout).
fn tensor_data_digest(path: &std::path::Path) -> String {
    use sha2::Digest;
    let file = quantd::formats::gguf::GgufFile::open(path).unwrap();
    let bytes = std::fs::read(path).unwrap();
    let mut tensors: Vec<_> = file.tensors.iter().collect();
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    let mut h = sha2::Sha256::new();
    for t in tensors {
        h.update(&bytes[t.offset as usize..(t.offset + t.size) as usize]);
    }
    hex::encode(h.finalize())
}

fn check_with_gguf_py(path: &std::path::Path, file_type: u32, types: Value) -> Value {
    let out = Command::new(python())
        .arg(repo_root().join("scripts/interop/check_gguf.py"))
        .arg(path)
        .args([
            "--file-type",
            &file_type.to_string(),
            "--types",
            &types.to_string(),
        ])
        .args([
            "--meta",
            "general.architecture=llama",
            "--meta",
            "tokenizer.ggml.pre=smollm",
            "--meta",
            "tokenizer.ggml.model=gpt2",
        ])
        .args([
            "--meta",
            "llama.block_count=30",
            "--meta",
            "quantize.method=gguf",
            "--meta",
            "tokenizer.ggml.bos_token_id=1",
        ])
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_uploaded_with_curl_quantizes_to_files_the_gguf_reader_accepts() {
    let app = TestApp::spawn().await;
    let model = tokio::task::spawn_blocking({
        let url = app.url("");
        move || {
            let app_ref = TestApp::url_only(&url);
            curl_upload(&app_ref, "smollm2-135m")
        }
    })
    .await
    .unwrap();
    assert_eq!(model["id"], "smollm2-135m", "{model}");
    assert_eq!(model["parameters"], 134_515_008);
    assert_eq!(model["architecture"], "llama");

    // The last column is the SHA-256 of all tensor data (tensors sorted by name) in llama.cpp's
    // own file for the same type, from `llama_model_quantize` (llama-cpp-python 0.3.36) on an
    // F16 GGUF of this model: quantd must write exactly llama.cpp's bytes.
    let expectations = [
        (
            "Q8_0",
            7,
            json!({"Q8_0": 211}),
            "5f009ec247233a58f62d23fd6e00b2d90531590e5c25fca86deb9dc9672ef91c",
        ),
        (
            "Q4_K_M",
            15,
            json!({"Q5_0": 166, "Q4_K": 16, "Q6_K": 14, "Q8_0": 15}),
            "24658f507c97d7e6125ba3edb0e0856940fc2f99061a17726e760049e90896a2",
        ),
        (
            "Q4_0",
            2,
            json!({"Q4_0": 210, "Q8_0": 1}),
            "bc5d5d574e5a330a711603563a2bfb39e48eef3c41be152766a29c055a8ca235",
        ),
    ];
    let mut ids = Vec::new();
    for (t, _, _, _) in &expectations {
        let (status, job) = app
            .post_json(
                "/v1/jobs",
                &json!({"model": "smollm2-135m", "method": "gguf", "params": {"type": t}}),
            )
            .await;
        assert_eq!(status, 202, "{job}");
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    let out_dir = tempfile::tempdir().unwrap();
    for ((t, ftype, types, llama_cpp_digest), id) in expectations.iter().zip(&ids) {
        let job = app.wait_job(id, Duration::from_secs(600)).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        let variant = t.to_ascii_lowercase();
        let name = format!("smollm2-135m-{variant}.gguf");
        let bytes = app
            .get_bytes(&format!(
                "/v1/models/smollm2-135m:{variant}/artifacts/{name}"
            ))
            .await;
        let path = out_dir.path().join(&name);
        std::fs::write(&path, &bytes).unwrap();
        let summary = check_with_gguf_py(&path, *ftype, types.clone());
        assert_eq!(summary["tokens"], 49152);
        assert_eq!(summary["merges"], 48900);
        assert_eq!(summary["has_chat_template"], true);
        assert_eq!(summary["tensor_types"]["F32"], 61, "norms stay F32");
        assert_eq!(
            tensor_data_digest(&path),
            *llama_cpp_digest,
            "{t}: tensor bytes differ from llama.cpp's"
        );
    }
    // Sizes follow the bits: Q8_0 > Q4_K_M > Q4_0.
    let (_, variants) = app.get_json("/v1/models/smollm2-135m/variants").await;
    let sizes: Vec<&str> = variants["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        sizes,
        vec![
            "smollm2-135m:q4_0",
            "smollm2-135m:q4_k_m",
            "smollm2-135m:q8_0"
        ]
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_jobs_running_or_queued_leave_no_model_and_no_files() {
    let app = TestApp::spawn_with(|s| {
        s.jobs.workers = 1;
        s.jobs.threads = 1;
    })
    .await;
    let url = app.url("");
    tokio::task::spawn_blocking(move || curl_upload(&TestApp::url_only(&url), "smol"))
        .await
        .unwrap();
    let files_before = app.stored_files();
    let (_, running) = app
        .post_json(
            "/v1/jobs",
            &json!({"model": "smol", "method": "gguf", "params": {"type": "Q3_K_M"}}),
        )
        .await;
    let (_, queued) = app
        .post_json(
            "/v1/jobs",
            &json!({"model": "smol", "method": "gguf", "params": {"type": "Q2_K"}}),
        )
        .await;
    let (running, queued) = (
        running["id"].as_str().unwrap().to_string(),
        queued["id"].as_str().unwrap().to_string(),
    );

    // The base cannot be deleted while jobs use it.
    let r = app
        .client
        .delete(app.url("/v1/models/smol"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);

    // Cancel the second while it waits behind the first.
    let (status, body) = app
        .post_json(&format!("/v1/jobs/{queued}/cancel"), &json!({}))
        .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (202, Some("cancelled")),
        "{body}"
    );

    // Cancel the first once it has made real progress.
    let start = std::time::Instant::now();
    loop {
        let (_, job) = app.get_json(&format!("/v1/jobs/{running}")).await;
        if job["status"] == "running" && job["progress"]["done"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "job never made progress: {job}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _) = app
        .post_json(&format!("/v1/jobs/{running}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 202);
    let job = app.wait_job(&running, Duration::from_secs(120)).await;
    assert_eq!(job["status"], "cancelled", "{job}");
    for variant in ["q3_k_m", "q2_k"] {
        let (status, _) = app.get_json(&format!("/v1/models/smol:{variant}")).await;
        assert_eq!(status, 404);
    }
    assert_eq!(
        app.stored_files(),
        files_before,
        "a cancelled job leaves no files"
    );
    let sse = String::from_utf8(
        app.get_bytes(&format!("/v1/jobs/{running}/events"))
            .await
            .to_vec(),
    )
    .unwrap();
    assert!(sse.contains("event: cancelled"), "{sse}");

    // A cancelled job can be retried and then succeeds.
    let (status, retried) = app
        .post_json(&format!("/v1/jobs/{queued}/retry"), &json!({}))
        .await;
    assert_eq!(
        (
            status,
            retried["status"].as_str(),
            retried["attempts"].as_i64()
        ),
        (202, Some("queued"), Some(0)),
        "{retried}"
    );
    let job = app.wait_job(&queued, Duration::from_secs(300)).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let (status, again) = app
        .post_json(&format!("/v1/jobs/{queued}/retry"), &json!({}))
        .await;
    assert_eq!(status, 409, "{again}");
    app.stop().await;
}
