//! A model's life seen from everything derived from it: deleting a model (or a variant)
//! unloads it from the engine, ends its open streams and queued requests, discards a load in
//! flight, and frees its weights; a model uploaded again under a deleted id is served, scored
//! and planned from the new upload, never from what the old one left behind.

mod common;

use std::time::{Duration, Instant};

use common::{tiny, TestApp};
use futures::StreamExt;
use quantd::config::Settings;
use quantd::engine::{Engine, EngineError, ModelKey};
use quantd::model::servable;
use serde_json::{json, Value};

const PROMPT: &str = "def add(a, b):";

fn completion(model: &str) -> Value {
    json!({"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0})
}

/// What `/v1/engine` says of `id`: weight bytes while loaded, and while unloading.
async fn engine_weights(app: &TestApp, id: &str) -> (Option<u64>, Option<u64>) {
    let (status, stats) = app.get_json("/v1/engine").await;
    assert_eq!(status, 200, "{stats}");
    let find = |list: &str| {
        stats[list]
            .as_array()
            .unwrap_or_else(|| panic!("{list} in {stats}"))
            .iter()
            .find(|m| m["id"] == id)
            .map(|m| m["weight_bytes"].as_u64().unwrap())
    };
    (find("models"), find("unloading"))
}

/// Waits until the engine holds no weights of `id` at all (loaded or unloading).
async fn wait_weights_released(app: &TestApp, id: &str) {
    let start = Instant::now();
    loop {
        match engine_weights(app, id).await {
            (None, None) => return,
            held => assert!(
                start.elapsed() < Duration::from_secs(20),
                "{id}'s weights still held after 20 s: {held:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn smollm2_f16() -> Vec<std::path::PathBuf> {
    common::fixture_files("hf-f16")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_uploaded_again_under_a_deleted_id_is_served_from_the_new_upload() {
    let app = TestApp::spawn().await;
    let (status, body) = app.upload(&smollm2_f16(), Some("m1")).await;
    assert_eq!(status, 201, "{body}");
    let (status, first) = app.post_json("/v1/completions", &completion("m1")).await;
    assert_eq!(status, 200, "{first}");
    // SmolLM2's tokenizer makes 7 tokens of the prompt.
    assert_eq!(first["usage"]["prompt_tokens"], 7, "{first}");
    let (smol_bytes, _) = engine_weights(&app, "m1").await;
    let smol_bytes = smol_bytes.expect("m1 is loaded");
    assert!(smol_bytes > 200_000_000, "SmolLM2 f16: {smol_bytes}");

    assert_eq!(app.delete("/v1/models/m1").await, 200);
    wait_weights_released(&app, "m1").await;
    let (status, gone) = app.post_json("/v1/completions", &completion("m1")).await;
    assert_eq!((status, &gone["error"]["param"]), (404, &json!("model")));

    // A different model under the same id: its byte-level tokenizer makes one token a byte.
    tiny::upload(&app, "m1").await;
    let (status, second) = app.post_json("/v1/completions", &completion("m1")).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["usage"]["prompt_tokens"], PROMPT.len(), "{second}");
    let (tiny_bytes, unloading) = engine_weights(&app, "m1").await;
    let tiny_bytes = tiny_bytes.expect("the new m1 is loaded");
    assert!(tiny_bytes < 1_000_000, "tiny model: {tiny_bytes}");
    assert_eq!(unloading, None);
    let (_, listed) = app.get_json("/v1/models").await;
    let m1 = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "m1")
        .unwrap()
        .clone();
    let tiny_params: usize = tiny::tensor_shapes()
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    assert_eq!(m1["loaded"], true, "{m1}");
    assert_eq!(m1["parameters"], tiny_params, "{m1}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_model_ends_its_stream_refuses_its_queue_and_frees_its_weights() {
    // One running sequence at a time, so a second request waits in the queue.
    let app = TestApp::spawn_with(|s| s.engine.max_batch = 1).await;
    let (status, body) = app.upload(&smollm2_f16(), Some("m1")).await;
    assert_eq!(status, 201, "{body}");

    let stream = app
        .client
        .post(app.url("/v1/completions"))
        .json(
            &json!({"model": "m1", "prompt": PROMPT, "max_tokens": 1000, "temperature": 0,
                      "ignore_eos": true, "stream": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let mut bytes = stream.bytes_stream();
    let mut raw = String::new();
    while !raw.contains("\"text\"") {
        let chunk = bytes.next().await.expect("a first chunk").unwrap();
        raw.push_str(&String::from_utf8_lossy(&chunk));
    }

    let queued = {
        let client = app.client.clone();
        let url = app.url("/v1/completions");
        tokio::spawn(async move {
            let r = client
                .post(url)
                .json(&completion("m1"))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        })
    };
    let start = Instant::now();
    loop {
        let (_, stats) = app.get_json("/v1/engine").await;
        if stats["models"][0]["queued"] == 1 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{stats}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    assert_eq!(app.delete("/v1/models/m1").await, 200);

    // The stream ends with an error event naming the deleted model, not with [DONE].
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(chunk) = bytes.next().await {
            raw.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        }
    })
    .await
    .expect("the stream ends once its model is deleted");
    let last = raw
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .next_back()
        .unwrap();
    let last: Value = serde_json::from_str(last).unwrap();
    assert_eq!(last["error"]["type"], "not_found_error", "{last}");
    assert_eq!(last["error"]["param"], "model");
    assert!(!raw.contains("[DONE]"));
    let generated = raw.matches("\"text\"").count();
    assert!(generated < 1000, "it stopped early: {generated} chunks");
    println!("stream ended after {generated} chunks: {last}");

    let (status, answer) = queued.await.unwrap();
    assert_eq!(status, 404, "the queued request: {answer}");
    assert_eq!(answer["error"]["param"], "model");

    wait_weights_released(&app, "m1").await;
    let (status, _) = app.post_json("/v1/completions", &completion("m1")).await;
    assert_eq!(status, 404);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_variant_deleted_while_loaded_is_no_longer_served_and_its_successor_is() {
    let app = TestApp::spawn().await;
    tiny::upload(&app, "tiny").await;
    let make = |ty: &str| {
        json!({"model": "tiny", "method": "gguf", "params": {"type": ty},
                                 "output_name": "tiny:v"})
    };
    let job = app.run_job(&make("Q8_0"), Duration::from_secs(60)).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let (status, _) = app
        .post_json("/v1/completions", &completion("tiny:v"))
        .await;
    assert_eq!(status, 200);
    let (q8_bytes, _) = engine_weights(&app, "tiny:v").await;
    let q8_bytes = q8_bytes.expect("the variant is loaded");

    assert_eq!(app.delete("/v1/models/tiny:v").await, 200);
    let (status, _) = app
        .post_json("/v1/completions", &completion("tiny:v"))
        .await;
    assert_eq!(status, 404);
    wait_weights_released(&app, "tiny:v").await;

    // Made again under the same name, smaller: the engine loads the new file.
    let job = app.run_job(&make("Q4_0"), Duration::from_secs(60)).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let (status, _) = app
        .post_json("/v1/completions", &completion("tiny:v"))
        .await;
    assert_eq!(status, 200);
    let (q4_bytes, _) = engine_weights(&app, "tiny:v").await;
    let q4_bytes = q4_bytes.expect("the new variant is loaded");
    assert!(q4_bytes < q8_bytes, "Q4_0 {q4_bytes} vs Q8_0 {q8_bytes}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_in_flight_when_its_model_is_deleted_is_discarded_not_installed() {
    let dir = tempfile::tempdir().unwrap();
    tiny::write_model(dir.path());
    let open = || servable::load(&common::models::open_dir(dir.path()), 64).unwrap();
    let engine = Engine::new(Settings::defaults().engine);
    let key = |revision: &str| ModelKey {
        id: "m".into(),
        revision: revision.into(),
    };

    // The load starts, the model is deleted, then the load finishes.
    let ticket = engine.ticket("m");
    let (started, started_rx) = tokio::sync::oneshot::channel();
    let (finish, finish_rx) = tokio::sync::oneshot::channel::<()>();
    let model = open();
    let loading = {
        let engine = engine.clone();
        let key = key("r1");
        tokio::spawn(async move {
            engine
                .get_or_load(ticket, &key, move || async move {
                    started.send(()).unwrap();
                    finish_rx.await.unwrap();
                    Ok(model)
                })
                .await
                .map(|_| ())
        })
    };
    started_rx.await.unwrap();
    assert!(!engine.retire("m"), "nothing was loaded yet");
    finish.send(()).unwrap();
    let outcome = loading.await.unwrap();
    assert!(
        matches!(outcome, Err(EngineError::NotFound(ref id)) if id == "m"),
        "{outcome:?}"
    );
    assert!(engine.stats().is_empty() && !engine.is_loaded(&key("r1")));
    assert!(
        engine.unloading().is_empty(),
        "the discarded weights are dropped"
    );

    // A ticket taken after the delete loads; another revision of the id replaces it.
    let model = open();
    let r1 = engine
        .get_or_load(engine.ticket("m"), &key("r1"), || async move { Ok(model) })
        .await
        .unwrap();
    assert!(engine.is_loaded(&key("r1")));
    assert!(engine.get(&key("r2")).is_none(), "r2 is not r1");
    let model = open();
    let r2 = engine
        .get_or_load(engine.ticket("m"), &key("r2"), || async move { Ok(model) })
        .await
        .unwrap();
    assert_eq!(r2.key, key("r2"));
    assert!(!engine.is_loaded(&key("r1")) && engine.is_loaded(&key("r2")));
    assert_eq!(engine.stats().len(), 1);
    // r1 is still referenced here, so its weights are reported as unloading until dropped.
    assert_eq!(engine.unloading().len(), 1);
    drop(r1);
    let start = Instant::now();
    while !engine.unloading().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(10), "r1 never went");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Real English text; the tiny model's tokenizer makes one token per byte.
fn text() -> String {
    common::corpus("calib-emma.txt", 4000)
}

async fn run(app: &TestApp, body: Value) -> Value {
    app.run_job(&body, Duration::from_secs(120)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_base_deleted_and_created_again_is_scored_anew_not_from_its_predecessors_cache() {
    let app = TestApp::spawn().await;
    tiny::upload(&app, "base").await;
    let ds = app.post_dataset(&text()).await;
    let eval = json!({"dataset": ds, "ctx": 64, "max_tokens": 124, "speed": false});
    let made = run(
        &app,
        json!({"model": "base", "method": "gguf", "params": {"type": "Q8_0"}, "eval": eval}),
    )
    .await;
    assert_eq!(made["status"], "succeeded", "{made}");
    let old = &made["metrics"]["eval"];
    assert_eq!(old["reference_cached"], false, "{old}");
    let score_variant = json!({"model": "base:q8_0", "method": "eval",
                               "params": {"reference": "base"}, "eval": eval});
    let again = run(&app, score_variant.clone()).await;
    assert_eq!(
        again["metrics"]["eval"]["reference_cached"], true,
        "the base's results are cached: {again}"
    );

    assert_eq!(app.delete("/v1/models/base").await, 200);
    tiny::upload_seeded(&app, "base", 1).await;
    let own = run(
        &app,
        json!({"model": "base", "method": "eval", "params": {"reference": "base"}, "eval": eval}),
    )
    .await;
    assert_eq!(own["status"], "succeeded", "{own}");
    let new_ppl = own["metrics"]["eval"]["perplexity"].clone();

    let scored = run(&app, score_variant).await;
    assert_eq!(scored["status"], "succeeded", "{scored}");
    let e = &scored["metrics"]["eval"];
    assert_eq!(e["reference_perplexity"], new_ppl, "{e}");
    assert_ne!(e["reference_perplexity"], old["reference_perplexity"]);
    // The old variant against other weights: far apart, where Q8_0 against its own base is not.
    assert!(
        e["kld_mean"].as_f64().unwrap() > 100.0 * old["kld_mean"].as_f64().unwrap(),
        "{e} vs {old}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_planned_for_a_deleted_model_is_not_retried_on_its_successor() {
    let app = TestApp::spawn().await;
    tiny::upload(&app, "m").await;
    let ds = app.post_dataset(&text()).await;
    let failed = run(
        &app,
        json!({"model": "m", "method": "gguf", "params": {"type": "Q4_0"},
               "eval": {"dataset": ds, "ctx": 64, "max_tokens": 124, "speed": false},
               "gate": {"max_kld": 1e-9}}),
    )
    .await;
    assert_eq!(failed["status"], "failed", "{failed}");
    let id = failed["id"].as_str().unwrap();
    let retry = format!("/v1/jobs/{id}/retry");

    // While m is the model it was planned for, a retry runs (and misses its gate again).
    let (status, body) = app.post_json(&retry, &json!({})).await;
    assert_eq!(status, 202, "{body}");
    let rerun = app.wait_job(id, Duration::from_secs(120)).await;
    assert_eq!(rerun["status"], "failed", "{rerun}");

    assert_eq!(app.delete("/v1/models/m").await, 200);
    tiny::upload_seeded(&app, "m", 1).await;
    let (status, body) = app.post_json(&retry, &json!({})).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["param"], "model", "{body}");
    let (_, job) = app.get_json(&format!("/v1/jobs/{id}")).await;
    assert_eq!(job["status"], "failed", "left as it was: {job}");
    app.stop().await;
}
