//! Bad uploads and requests: each gets a 4xx that names the problem, nothing is stored, and the
//! server keeps serving (DESIGN §8).

mod common;

use std::path::Path;

use common::{tiny, TestApp};
use serde_json::{json, Value};

/// Uploads every file of `dir` as multipart fields.
async fn upload_dir(app: &TestApp, dir: &Path) -> (u16, Value) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    app.upload(&entries, None).await
}

/// Asserts the rejection, that its message mentions `needle`, and that nothing was kept.
async fn assert_refused(app: &TestApp, (status, body): (u16, Value), want: u16, needle: &str) {
    assert_eq!(status, want, "{body}");
    let msg = body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase();
    assert!(
        msg.contains(&needle.to_lowercase()),
        "message {msg:?} should mention {needle:?}"
    );
    assert!(body["error"]["type"].is_string());
    let (_, models) = app.get_json("/v1/models").await;
    assert_eq!(models["data"], json!([]), "no model may be stored");
    assert!(
        app.stored_files().is_empty(),
        "no file may be kept: {:?}",
        app.stored_files()
    );
    let (h, _) = app.get_json("/health").await;
    assert_eq!(h, 200);
}

fn tiny_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    tiny::write_model(d.path());
    d
}

fn raw_safetensors(header: &str, data_len: usize, claimed_len: Option<u64>) -> Vec<u8> {
    let mut out = claimed_len
        .unwrap_or(header.len() as u64)
        .to_le_bytes()
        .to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend(std::iter::repeat_n(0u8, data_len));
    out
}

#[tokio::test]
async fn a_valid_tiny_model_is_accepted_then_deleted_without_leftovers() {
    let app = TestApp::spawn().await;
    let dir = tiny_dir();
    let (status, body) = upload_dir(&app, dir.path()).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["architecture"], "llama");
    let id = body["id"].as_str().unwrap().to_string();
    assert!(!app.stored_files().is_empty());
    let (_, list) = app.get_json("/v1/models").await;
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"][0]["id"], id.as_str());
    let r = app
        .client
        .delete(app.url(&format!("/v1/models/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(app.stored_files().is_empty(), "{:?}", app.stored_files());
    app.stop().await;
}

#[tokio::test]
async fn pickles_and_zips_are_refused_by_content_whatever_their_name() {
    let app = TestApp::spawn().await;
    let dir = tiny_dir();
    std::fs::write(
        dir.path().join("model.safetensors"),
        b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94.",
    )
    .unwrap();
    assert_refused(&app, upload_dir(&app, dir.path()).await, 415, "pickle").await;
    let dir = tiny_dir();
    std::fs::write(
        dir.path().join("pytorch_model.bin"),
        b"PK\x03\x04\x14\x00\x00\x00archive",
    )
    .unwrap();
    assert_refused(&app, upload_dir(&app, dir.path()).await, 415, "zip").await;
    app.stop().await;
}

#[tokio::test]
async fn malformed_safetensors_are_refused_with_the_reason() {
    let app = TestApp::spawn().await;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated file",
            {
                let mut b = std::fs::read(tiny_dir().path().join("model.safetensors")).unwrap();
                b.truncate(b.len() - 100);
                b
            },
            "truncated",
        ),
        (
            "header longer than the file",
            raw_safetensors(
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                4,
                Some(10_000),
            ),
            "only",
        ),
        (
            "overlapping offsets",
            raw_safetensors(
                r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#,
                24,
                None,
            ),
            "overlaps",
        ),
        (
            "dtype x shape != bytes",
            raw_safetensors(
                r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}}"#,
                16,
                None,
            ),
            "12 bytes",
        ),
        (
            "a 200 MB header",
            raw_safetensors(r#"{"a":1}"#, 0, Some(200_000_000)),
            "exceeds the limit",
        ),
    ];
    for (what, bytes, needle) in cases {
        let dir = tiny_dir();
        std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
        let res = upload_dir(&app, dir.path()).await;
        assert_eq!(
            res.1["error"]["param"], "model.safetensors",
            "{what}: {}",
            res.1
        );
        assert_refused(&app, res, 422, needle).await;
    }
    app.stop().await;
}

#[tokio::test]
async fn configs_with_absurd_dimensions_or_unknown_architectures_are_refused() {
    let app = TestApp::spawn().await;
    let dir = tiny_dir();
    let mut cfg = tiny::config();
    cfg["hidden_size"] = json!(1u64 << 40);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    assert_refused(&app, upload_dir(&app, dir.path()).await, 422, "hidden_size").await;

    let dir = tiny_dir();
    let mut cfg = tiny::config();
    cfg["model_type"] = json!("gpt_neox");
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    assert_refused(&app, upload_dir(&app, dir.path()).await, 422, "gpt_neox").await;

    // Shapes must agree with the config.
    let dir = tiny_dir();
    let mut cfg = tiny::config();
    cfg["intermediate_size"] = json!(256);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    assert_refused(
        &app,
        upload_dir(&app, dir.path()).await,
        422,
        "config.json implies",
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn an_index_naming_a_shard_outside_the_upload_is_refused() {
    let app = TestApp::spawn().await;
    let dir = tiny_dir();
    let index = json!({"metadata": {}, "weight_map": {"model.embed_tokens.weight": "../../etc/passwd.safetensors"}});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    assert_refused(&app, upload_dir(&app, dir.path()).await, 422, "plain").await;
    app.stop().await;
}

#[tokio::test]
async fn a_malformed_gguf_is_refused() {
    let app = TestApp::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    // Valid magic and version, then a tensor count far larger than the file.
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(1u64 << 40).to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    std::fs::write(dir.path().join("model.gguf"), b).unwrap();
    assert_refused(&app, upload_dir(&app, dir.path()).await, 422, "cannot fit").await;
    app.stop().await;
}

#[tokio::test]
async fn a_blob_whose_hash_does_not_match_is_discarded() {
    let app = TestApp::spawn().await;
    let wrong = format!("sha256:{}", "0".repeat(64));
    let res = app.put_blob(&wrong, "hello").await;
    assert_refused(&app, res, 400, "mismatch").await;
    let r = app
        .client
        .head(app.url(&format!("/v1/blobs/{wrong}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = app
        .client
        .put(app.url("/v1/blobs/sha256:abc"))
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    app.stop().await;
}

#[tokio::test]
async fn bodies_over_the_limit_get_413_and_leave_nothing() {
    let app = TestApp::spawn_with(|s| s.limits.max_upload_bytes = 10_000).await;
    let digest = format!("sha256:{}", "1".repeat(64));
    let res = app.put_blob(&digest, vec![0u8; 20_000]).await;
    assert_refused(&app, res, 413, "limit").await;
    let res = upload_dir(&app, tiny_dir().path()).await;
    assert_refused(&app, res, 413, "max_upload_bytes").await;
    app.stop().await;
}

#[tokio::test]
async fn models_can_be_made_from_blobs_put_beforehand() {
    let app = TestApp::spawn().await;
    let dir = tiny_dir();
    let mut files = serde_json::Map::new();
    for name in ["config.json", "tokenizer.json", "model.safetensors"] {
        let bytes = std::fs::read(dir.path().join(name)).unwrap();
        let digest = format!(
            "sha256:{}",
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes))
        );
        let r = app
            .client
            .put(app.url(&format!("/v1/blobs/{digest}")))
            .body(bytes.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let again = app
            .client
            .put(app.url(&format!("/v1/blobs/{digest}")))
            .body(bytes)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 200, "re-PUT is idempotent");
        files.insert(name.into(), json!(digest));
    }
    let (status, body) = app
        .post_json("/v1/models", &json!({"name": "tiny", "files": files}))
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = app
        .post_json("/v1/models", &json!({"name": "tiny", "files": files}))
        .await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (409, Some("name"))
    );
    let (status, body) = app
        .post_json("/v1/models", &json!({"name": "Bad Name", "files": files}))
        .await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (422, Some("name")),
        "{body}"
    );
    app.stop().await;
}

#[tokio::test]
async fn job_requests_with_bad_fields_name_the_field() {
    let app = TestApp::spawn().await;
    let (status, _) = upload_dir(&app, tiny_dir().path()).await;
    assert_eq!(status, 201);
    let (_, models) = app.get_json("/v1/models").await;
    let model = models["data"][0]["id"].as_str().unwrap().to_string();
    let cases = [
        (
            json!({"model": model, "method": "gguf", "params": {"type": "Q4_K_X"}}),
            422,
            "params.type",
        ),
        (
            json!({"model": model, "method": "gguf", "params": {"type": "Q8_0", "bits": 4}}),
            422,
            "params.bits",
        ),
        (
            json!({"model": model, "method": "gguf", "params": {"type": "Q8_0"}, "colour": 1}),
            422,
            "colour",
        ),
        (
            json!({"model": model, "method": "magic", "params": {}}),
            422,
            "method",
        ),
        (
            json!({"model": "nope", "method": "gguf", "params": {"type": "Q8_0"}}),
            404,
            "model",
        ),
        (
            json!({"model": model, "method": "gguf", "params": {"type": "Q8_0", "overrides": [{"pattern": "(", "type": "Q8_0"}]}}),
            422,
            "params.overrides[0].pattern",
        ),
        (
            json!({"model": model, "method": "gguf", "params": {"type": "Q8_0"}, "output_name": "../x"}),
            422,
            "output_name",
        ),
        (
            json!({"model": model, "method": "gguf", "params": {"type": "Q8_0"}, "eval": {}}),
            422,
            "eval.dataset",
        ),
    ];
    for (body, want, param) in cases {
        let (status, resp) = app.post_json("/v1/jobs", &body).await;
        assert_eq!(status, want, "{body} → {resp}");
        assert_eq!(resp["error"]["param"], param, "{body} → {resp}");
    }
    let (_, jobs) = app.get_json("/v1/jobs").await;
    assert_eq!(jobs["data"], json!([]));
    let (status, _) = app.get_json("/v1/jobs?limit=1000").await;
    assert_eq!(status, 422);
    app.stop().await;
}

#[tokio::test]
async fn file_names_with_paths_and_shards_outside_the_index_are_refused() {
    let app = TestApp::spawn().await;
    let dir = tiny_dir();
    let bytes = std::fs::read(dir.path().join("config.json")).unwrap();
    let digest = format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes))
    );
    assert_eq!(app.put_blob(&digest, bytes).await.0, 201);
    let (status, body) = app
        .post_json(
            "/v1/models",
            &json!({"files": {"../config.json": digest, "x\r\n.gguf": digest}}),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("plain"),
        "{body}"
    );

    // An index that names one shard, and a second shard it does not name.
    let dir = tiny_dir();
    std::fs::copy(
        dir.path().join("model.safetensors"),
        dir.path().join("extra.safetensors"),
    )
    .unwrap();
    let index = json!({"weight_map": {"model.embed_tokens.weight": "model.safetensors"}});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let res = upload_dir(&app, dir.path()).await;
    assert_eq!(res.1["error"]["param"], "extra.safetensors", "{}", res.1);
    let (_, models) = app.get_json("/v1/models").await;
    assert_eq!(models["data"], json!([]));
    app.stop().await;
}
