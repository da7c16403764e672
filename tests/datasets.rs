//! `/v1/datasets`: plain text and JSONL uploads become content-addressed datasets; the same
//! text is one dataset; bad bodies are refused naming the line; deletion removes the file only
//! when no model shares it.

mod common;

use serde_json::{json, Value};

async fn post(app: &common::TestApp, content_type: &str, body: Vec<u8>) -> (u16, Value) {
    app.post_body("/v1/datasets", content_type, body).await
}

#[tokio::test]
async fn text_and_jsonl_uploads_are_content_addressed_datasets() {
    let app = common::TestApp::spawn().await;
    let text = "It is a truth universally acknowledged.\n";
    let (status, ds) = post(&app, "text/plain; charset=utf-8", text.as_bytes().to_vec()).await;
    assert_eq!(status, 201, "{ds}");
    let id = ds["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("ds_") && id.len() == 19, "{id}");
    assert_eq!(ds["bytes"], text.len());
    assert_eq!(
        (ds["format"].as_str(), ds["documents"].as_u64()),
        (Some("text"), Some(1))
    );
    // The same text again is the same dataset.
    let (status, again) = post(&app, "text/plain", text.as_bytes().to_vec()).await;
    assert_eq!((status, &again["id"]), (200, &json!(id)));

    let jsonl = "{\"text\": \"first\"}\n\n{\"text\": \"second\", \"meta\": 1}\n";
    let (status, j) = post(&app, "application/jsonl", jsonl.as_bytes().to_vec()).await;
    assert_eq!(status, 201, "{j}");
    assert_eq!(
        (j["documents"].as_u64(), j["bytes"].as_u64()),
        (Some(2), Some(13))
    );
    // The stored text is the documents joined by a blank line, under its digest.
    let digest = j["digest"]
        .as_str()
        .unwrap()
        .strip_prefix("sha256:")
        .unwrap()
        .to_string();
    let stored = app
        .stored_files()
        .into_iter()
        .find(|p| p.ends_with(&digest))
        .expect("blob on disk");
    assert_eq!(std::fs::read_to_string(&stored).unwrap(), "first\n\nsecond");

    let (_, list) = app.get_json("/v1/datasets").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 2);
    let (status, one) = app.get_json(&format!("/v1/datasets/{id}")).await;
    assert_eq!((status, &one["id"]), (200, &json!(id)));

    let r = app
        .client
        .delete(app.url(&format!("/v1/datasets/{}", j["id"].as_str().unwrap())))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(!stored.exists(), "the blob goes with its last user");
    let (status, _) = app
        .get_json(&format!("/v1/datasets/{}", j["id"].as_str().unwrap()))
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn bad_dataset_bodies_are_refused_naming_the_problem() {
    let app = common::TestApp::spawn_with(|s| s.limits.max_dataset_bytes = 1024).await;
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "application/jsonl",
            b"{\"text\": \"ok\"}\nnot json\n".to_vec(),
            400,
            "line 2",
        ),
        (
            "application/jsonl",
            b"{\"body\": \"x\"}\n".to_vec(),
            400,
            "line 1",
        ),
        ("text/plain", vec![0x66, 0xff, 0xfe], 400, "body"),
        ("text/plain", b"   \n".to_vec(), 400, "body"),
        (
            "application/octet-stream",
            b"x".to_vec(),
            415,
            "content-type",
        ),
        ("text/plain", vec![b'a'; 2048], 413, "body"),
    ];
    for (ct, body, status, param) in cases {
        let (got, r) = post(&app, ct, body).await;
        assert_eq!(got, status, "{ct}: {r}");
        assert_eq!(r["error"]["param"], param, "{ct}: {r}");
    }
    let (_, list) = app.get_json("/v1/datasets").await;
    assert_eq!(list["data"], json!([]));
    assert!(app.stored_files().is_empty());
}
