//! The job lifecycle on a tiny generated model: plan, queue, run, events, artifacts,
//! idempotency, cancel, retry, and deletion rules.

mod common;

use std::time::Duration;

use common::{tiny, TestApp};
use serde_json::{json, Value};

#[tokio::test]
async fn a_gguf_job_plans_runs_and_produces_a_downloadable_model() {
    let app = TestApp::spawn().await;
    let model = tiny::upload(&app, "tiny").await;
    let req = json!({"model": model, "method": "gguf", "params": {"type": "Q8_0"}});

    let (status, dry) = app
        .post_json(
            "/v1/jobs",
            &json!({"model": model, "method": "gguf", "params": {"type": "Q8_0"}, "dry_run": true}),
        )
        .await;
    assert_eq!(status, 200, "{dry}");
    let plan = &dry["plan"];
    assert_eq!(plan["file_type"], 7);
    assert_eq!(plan["type_counts"]["Q8_0"], 15);
    assert!((plan["bits_per_weight"].as_f64().unwrap() - 8.5).abs() < 1e-9);
    assert!(plan["peak_memory_bytes"].as_u64().unwrap() > 0);
    let (_, jobs) = app.get_json("/v1/jobs").await;
    assert_eq!(jobs["data"], json!([]), "a dry run queues nothing");

    let (status, job) = app.post_json("/v1/jobs", &req).await;
    assert_eq!(status, 202, "{job}");
    assert_eq!(job["output_name"], "tiny:q8_0");
    let id = job["id"].as_str().unwrap().to_string();
    let done = app.wait_job(&id, Duration::from_secs(60)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempts"], 1);
    assert_eq!(done["progress"]["done"], done["progress"]["total"]);
    assert_eq!(done["metrics"]["tensors"].as_array().unwrap().len(), 20);
    let q = &done["metrics"]["tensors"].as_array().unwrap()[0];
    assert!(q["rel_rmse"].as_f64().unwrap() < 0.02, "{q}");

    let (status, m) = app.get_json("/v1/models/tiny:q8_0").await;
    assert_eq!(status, 200);
    assert_eq!(
        (
            m["kind"].as_str(),
            m["base_model"].as_str(),
            m["format"].as_str()
        ),
        (Some("quantized"), Some("tiny"), Some("gguf"))
    );
    assert!(m["metrics"]["bits_per_weight"].as_f64().is_some());
    let (_, variants) = app.get_json("/v1/models/tiny/variants").await;
    assert_eq!(variants["data"][0]["id"], "tiny:q8_0");

    let (_, arts) = app.get_json("/v1/models/tiny:q8_0/artifacts").await;
    let names: Vec<&str> = arts["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["manifest.json", "tiny-q8_0.gguf"]);
    let url = app.url("/v1/models/tiny:q8_0/artifacts/tiny-q8_0.gguf");
    let full = app
        .client
        .get(&url)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(&full[..4], b"GGUF");
    let part = app
        .client
        .get(&url)
        .header("range", "bytes=4-7")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(part.bytes().await.unwrap().as_ref(), &full[4..8]);
    let manifest: Value = app
        .client
        .get(app.url("/v1/models/tiny:q8_0/artifacts/manifest.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        manifest["files"][0]["size"].as_u64().unwrap(),
        full.len() as u64
    );

    // The SSE stream of a finished job replays its history and ends with `done`.
    let sse = String::from_utf8(
        app.get_bytes(&format!("/v1/jobs/{id}/events"))
            .await
            .to_vec(),
    )
    .unwrap();
    assert!(
        sse.contains("event: stage") && sse.contains("\"quantizing\""),
        "{sse}"
    );
    assert!(
        sse.trim_end().ends_with('}') && sse.contains("event: done"),
        "{sse}"
    );

    // The same output again conflicts.
    let (status, e) = app.post_json("/v1/jobs", &req).await;
    assert_eq!(
        (status, e["error"]["param"].as_str()),
        (409, Some("output_name"))
    );
    app.stop().await;
}

#[tokio::test]
async fn an_idempotency_key_returns_the_first_job_and_refuses_a_different_request() {
    let app = TestApp::spawn_with(|s| s.jobs.workers = 1).await;
    let model = tiny::upload(&app, "tiny").await;
    let req = json!({"model": model, "method": "gguf", "params": {"type": "Q4_0"}, "idempotency_key": "k-1"});
    let (s1, j1) = app.post_json("/v1/jobs", &req).await;
    let (s2, j2) = app.post_json("/v1/jobs", &req).await;
    assert_eq!((s1, s2), (202, 200));
    assert_eq!(j1["id"], j2["id"]);
    let other = json!({"model": model, "method": "gguf", "params": {"type": "Q8_0"}, "idempotency_key": "k-1"});
    let (s3, e) = app.post_json("/v1/jobs", &other).await;
    assert_eq!(
        (s3, e["error"]["param"].as_str()),
        (409, Some("idempotency_key"))
    );
    app.wait_job(j1["id"].as_str().unwrap(), Duration::from_secs(60))
        .await;
    app.stop().await;
}

#[tokio::test]
async fn deleting_variants_and_base_removes_every_file_and_keeps_job_history() {
    let app = TestApp::spawn().await;
    let model = tiny::upload(&app, "tiny").await;
    let mut ids = Vec::new();
    for t in ["Q2_K", "Q3_K_S"] {
        let (_, job) = app
            .post_json(
                "/v1/jobs",
                &json!({"model": model, "method": "gguf", "params": {"type": t}}),
            )
            .await;
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        assert_eq!(
            app.wait_job(id, Duration::from_secs(60)).await["status"],
            "succeeded"
        );
    }
    for v in ["tiny:q2_k", "tiny:q3_k_s", "tiny"] {
        let r = app
            .client
            .delete(app.url(&format!("/v1/models/{v}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "deleting {v}");
    }
    assert!(app.stored_files().is_empty(), "{:?}", app.stored_files());
    let (status, job) = app.get_json(&format!("/v1/jobs/{}", ids[0])).await;
    assert_eq!((status, job["status"].as_str()), (200, Some("succeeded")));
    app.stop().await;
}

#[tokio::test]
async fn a_model_with_a_nan_weight_fails_its_job_naming_the_tensor_and_keeps_nothing() {
    let app = TestApp::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    tiny::write_model(dir.path());
    // Poison one value of the first layer's q_proj (F32, little endian) in place.
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let start = header["model.layers.0.self_attn.q_proj.weight"]["data_offsets"][0]
        .as_u64()
        .unwrap() as usize;
    let at = 8 + header_len + start + 4 * 10;
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    let files: Vec<_> = ["config.json", "tokenizer.json", "model.safetensors"]
        .iter()
        .map(|f| dir.path().join(f))
        .collect();
    assert_eq!(app.upload(&files, Some("poisoned")).await.0, 201);
    let files_before = app.stored_files();
    let (_, job) = app
        .post_json(
            "/v1/jobs",
            &json!({"model": "poisoned", "method": "gguf", "params": {"type": "Q8_0"}}),
        )
        .await;
    let done = app
        .wait_job(job["id"].as_str().unwrap(), Duration::from_secs(60))
        .await;
    assert_eq!(done["status"], "failed", "{done}");
    let error = done["error"].as_str().unwrap();
    assert!(
        error.contains("blk.0.attn_q.weight") && error.contains("not finite"),
        "{error}"
    );
    let (status, _) = app.get_json("/v1/models/poisoned:q8_0").await;
    assert_eq!(status, 404);
    assert_eq!(app.stored_files(), files_before);
    let r = app.client.get(app.url("/health")).send().await.unwrap();
    assert!(
        r.headers().contains_key("x-request-id"),
        "responses carry a request id"
    );
    app.stop().await;
}
