//! Serving SmolLM2-135M end to end: greedy answers on the base model and its Q8_0 and Q4_K_M
//! variants, prompt logprobs against the engine's own scoring, concurrent streams, a client
//! that disconnects, 429 beyond capacity, and bad requests that name their field.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::models::{logits, open_dir};
use futures::StreamExt;
use quantd::model::servable;
use quantd::nn::sampling::log_softmax;
use quantd::nn::KvCache;
use serde_json::{json, Value};

const FRANCE: &str = "The capital of France is";

async fn app_with_base(tweak: impl FnOnce(&mut quantd::config::Settings)) -> common::TestApp {
    let app = common::TestApp::spawn_with(tweak).await;
    let (status, body) = app
        .upload(&common::fixture_files("hf-f32"), Some("smol"))
        .await;
    assert_eq!(status, 201, "{body}");
    app
}

async fn complete(app: &common::TestApp, body: Value) -> (u16, Value) {
    app.post_json("/v1/completions", &body).await
}

async fn engine_stats(app: &common::TestApp, model: &str) -> Value {
    let (_, v) = app.get_json("/v1/engine").await;
    v["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == model)
        .cloned()
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_paris_on_the_base_model_its_q8_0_and_q4_k_m_variants_and_llama_cpps_q4_1_file() {
    let app = app_with_base(|_| {}).await;
    let mut models = vec!["smol".to_string()];
    for t in ["Q8_0", "Q4_K_M"] {
        let (status, job) = app
            .post_json(
                "/v1/jobs",
                &json!({"model": "smol", "method": "gguf", "params": {"type": t}}),
            )
            .await;
        assert_eq!(status, 202, "{job}");
        let job = app
            .wait_job(job["id"].as_str().unwrap(), Duration::from_secs(600))
            .await;
        assert_eq!(job["status"], "succeeded", "{job}");
        models.push(job["output_model"].as_str().unwrap().to_string());
    }
    // llama.cpp's own file (Q4_1, from the fixture) serves too, straight from its blocks.
    let gguf = common::fixture().join("gguf/SmolLM2-135M-Instruct.Q4_1.gguf");
    let (status, body) = app.upload(&[gguf], Some("smol-llama-cpp-q4_1")).await;
    assert_eq!(status, 201, "{body}");
    models.push("smol-llama-cpp-q4_1".to_string());
    for m in &models {
        let (status, r) = complete(
            &app,
            json!({"model": m, "prompt": FRANCE, "max_tokens": 4, "temperature": 0}),
        )
        .await;
        assert_eq!(status, 200, "{r}");
        let text = r["choices"][0]["text"].as_str().unwrap();
        assert!(text.starts_with(" Paris"), "{m}: {text:?}");
        assert_eq!(r["object"], "text_completion");
        assert_eq!(r["usage"]["prompt_tokens"], 5);
        assert_eq!(r["usage"]["completion_tokens"], 4);
        assert_eq!(r["choices"][0]["finish_reason"], "length");
    }
    // The listing says which are loaded; unloading frees the slot.
    let (_, list) = app.get_json("/v1/models").await;
    let data = list["data"].as_array().unwrap();
    assert_eq!(data.len(), 4);
    assert!(data.iter().all(|m| m["loaded"] == true), "{list}");
    let (status, r) = app.post_json("/v1/models/smol/unload", &json!({})).await;
    assert_eq!((status, &r["was_loaded"]), (200, &json!(true)), "{r}");
    assert!(engine_stats(&app, "smol").await.is_null());
}

/// The engine's own log-probabilities of each prompt token given its prefix, computed in one
/// forward pass of the same checkpoint (what perplexity uses).
fn reference_prompt_logprobs(ids: &[u32]) -> Vec<f32> {
    let ckpt = open_dir(&common::fixture().join("hf-f32"));
    let llama = servable::load_llama(&ckpt, 1024).unwrap();
    let lp: Vec<Vec<f32>> = logits(&llama, ids, &mut KvCache::new(), true)
        .iter()
        .map(|row| log_softmax(row))
        .collect();
    (1..ids.len()).map(|i| lp[i - 1][ids[i] as usize]).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_logprobs_with_max_tokens_0_equal_the_engines_own_scoring() {
    // A small prefill chunk so the HTTP path scores the prompt in several engine steps.
    let app = app_with_base(|s| s.engine.prefill_chunk = 16).await;
    let text = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife. However little known the feelings or views of such a man may be";
    let (status, r) = complete(
        &app,
        json!({"model": "smol", "prompt": text, "max_tokens": 0, "echo": true, "logprobs": 1}),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    let choice = &r["choices"][0];
    assert_eq!(choice["text"], text);
    assert_eq!(choice["finish_reason"], "length");
    let lp = &choice["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens.concat(), text);
    assert!(tokens.len() > 32, "prompt spans several 16-token chunks");
    let got = lp["token_logprobs"].as_array().unwrap();
    assert!(got[0].is_null(), "nothing predicts the first token");
    assert!(lp["top_logprobs"][0].is_null());
    // The most likely alternative, plus the actual token when it is not that one (OpenAI).
    let top1 = lp["top_logprobs"][1].as_object().unwrap();
    assert!((1..=2).contains(&top1.len()), "{top1:?}");
    assert_eq!(top1[tokens_at(lp, 1)], lp["token_logprobs"][1]);

    let tok =
        tokenizers::Tokenizer::from_file(common::fixture().join("hf-f32/tokenizer.json")).unwrap();
    let ids = tok.encode(text, true).unwrap().get_ids().to_vec();
    assert_eq!(ids.len(), tokens.len());
    let want = reference_prompt_logprobs(&ids);
    let mut max_diff = 0f32;
    for (g, w) in got[1..].iter().zip(&want) {
        max_diff = max_diff.max((g.as_f64().unwrap() as f32 - w).abs());
    }
    eprintln!("max |HTTP prompt logprob - engine scoring| = {max_diff:e}");
    assert!(max_diff <= 1e-4, "max diff {max_diff}");
    // Real numbers: the text is likely but not certain under the model.
    let mean = want.iter().sum::<f32>() / want.len() as f32;
    assert!((-6.0..-0.5).contains(&mean), "mean logprob {mean}");
}

fn tokens_at(lp: &Value, i: usize) -> &str {
    lp["tokens"][i].as_str().unwrap()
}

/// Reads an SSE response to its end: the concatenated `choices[].text` per index.
async fn read_stream(resp: reqwest::Response) -> (BTreeMap<u64, String>, Vec<Value>) {
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let mut texts = BTreeMap::new();
    let mut chunks = Vec::new();
    while let Some(part) = body.next().await {
        buf.push_str(std::str::from_utf8(&part.unwrap()).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let data = event.trim().strip_prefix("data: ").unwrap().to_string();
            if data == "[DONE]" {
                return (texts, chunks);
            }
            let v: Value = serde_json::from_str(&data).unwrap();
            for c in v["choices"].as_array().unwrap() {
                let t = c["text"].as_str().or(c["delta"]["content"].as_str());
                texts
                    .entry(c["index"].as_u64().unwrap())
                    .or_insert_with(String::new)
                    .push_str(t.unwrap_or(""));
            }
            chunks.push(v);
        }
    }
    panic!("stream ended without [DONE]");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_streams_complete_and_a_disconnected_one_stops() {
    let app = app_with_base(|_| {}).await;
    let body = json!({"model": "smol", "prompt": FRANCE, "max_tokens": 12, "temperature": 0,
                      "stream": true, "stream_options": {"include_usage": true}});
    let (status, single) = complete(
        &app,
        json!({"model": "smol", "prompt": FRANCE, "max_tokens": 12, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200);
    let want = single["choices"][0]["text"].as_str().unwrap().to_string();

    let requests = (0..8).map(|_| {
        let req = app.client.post(app.url("/v1/completions")).json(&body);
        async move {
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 200);
            assert!(resp.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream"));
            read_stream(resp).await
        }
    });
    for (texts, chunks) in futures::future::join_all(requests).await {
        assert_eq!(texts[&0], want);
        let last = chunks.last().unwrap();
        assert_eq!(last["choices"], json!([]));
        assert_eq!(last["usage"]["completion_tokens"], 12);
        let finish = &chunks[chunks.len() - 2]["choices"][0]["finish_reason"];
        assert_eq!(finish, "length");
        assert!(chunks[..chunks.len() - 1]
            .iter()
            .all(|c| c["usage"].is_null() && c["object"] == "text_completion"));
    }
    let stats = engine_stats(&app, "smol").await;
    assert!(stats["max_batch_seen"].as_u64().unwrap() > 1, "{stats}");

    // A client that goes away after a few tokens: its sequence is dropped long before
    // max_tokens.
    let before = engine_stats(&app, "smol").await;
    let resp = app
        .client
        .post(app.url("/v1/completions"))
        .json(
            &json!({"model": "smol", "prompt": "Once upon a time", "max_tokens": 3000,
                      "ignore_eos": true, "stream": true}),
        )
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    let mut seen = 0;
    while seen < 3 {
        let part = body.next().await.unwrap().unwrap();
        seen += std::str::from_utf8(&part)
            .unwrap()
            .matches("data: ")
            .count();
    }
    drop(body);
    let start = Instant::now();
    let stats = loop {
        let s = engine_stats(&app, "smol").await;
        if s["cancelled"].as_u64() > before["cancelled"].as_u64() && s["active"] == 0 {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "never cancelled: {s}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let generated =
        stats["generated_tokens"].as_u64().unwrap() - before["generated_tokens"].as_u64().unwrap();
    eprintln!("client read {seen} events; the engine generated {generated} tokens");
    // The server notices the closed connection at its next write: one token, maybe two in
    // flight, never the thousands still allowed by max_tokens.
    assert!(
        generated <= seen as u64 + 2,
        "generated {generated} tokens, the client read {seen}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = engine_stats(&app, "smol").await;
    assert_eq!(after["generated_tokens"], stats["generated_tokens"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_capacity_get_429_and_the_engine_keeps_serving() {
    let app = app_with_base(|s| {
        s.engine.max_batch = 1;
        s.engine.queue_depth = 1;
    })
    .await;
    let (status, r) = app.post_json("/v1/models/smol/load", &json!({})).await;
    assert_eq!(status, 200, "{r}");
    let long = json!({"model": "smol", "prompt": "Once", "max_tokens": 200, "ignore_eos": true});
    let requests = (0..4).map(|_| {
        let req = app.client.post(app.url("/v1/completions")).json(&long);
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            let retry = r.headers().get("retry-after").cloned();
            let body: Value = r.json().await.unwrap();
            (status, retry, body)
        }
    });
    let results = futures::future::join_all(requests).await;
    let rejected: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    let served: Vec<_> = results.iter().filter(|r| r.0 == 200).collect();
    assert_eq!(rejected.len() + served.len(), 4, "{results:?}");
    assert!(rejected.len() >= 2, "capacity is 2: {results:?}");
    for (_, retry, body) in &rejected {
        assert!(retry.is_some());
        assert_eq!(body["error"]["type"], "rate_limit_error");
    }
    for (_, _, body) in &served {
        assert_eq!(body["usage"]["completion_tokens"], 200);
    }
    let (status, _) = complete(
        &app,
        json!({"model": "smol", "prompt": "Hi", "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_name_the_field_and_the_engine_keeps_serving() {
    let app = app_with_base(|_| {}).await;
    let long_prompt: Vec<u32> = vec![100; 9000];
    let cases = vec![
        (
            json!({"model": "smol", "prompt": "Hi", "max_tokens": 5000}),
            400,
            "max_tokens",
            "4096",
        ),
        (
            json!({"model": "smol", "prompt": long_prompt, "max_tokens": 1}),
            400,
            "prompt",
            "8192",
        ),
        (
            json!({"model": "smol", "prompt": "Hi", "n": 5}),
            400,
            "n",
            "1..=4",
        ),
        (
            json!({"model": "smol", "prompt": "Hi", "stop": ["a", "b", "c", "d", "e"]}),
            400,
            "stop",
            "at most 4",
        ),
        (
            json!({"model": "nope", "prompt": "Hi"}),
            404,
            "model",
            "nope",
        ),
        (
            json!({"model": "smol", "prompt": "Hi", "temperature": "hot"}),
            400,
            "temperature",
            "invalid type",
        ),
        (
            json!({"model": "smol", "prompt": "Hi", "max_tokens": -1}),
            400,
            "max_tokens",
            "invalid value",
        ),
        (
            json!({"model": "smol", "prompt": {"a": 1}}),
            400,
            "prompt",
            "prompt",
        ),
        (
            json!({"model": "smol", "prompt": "Hi", "logprobs": 9}),
            400,
            "logprobs",
            "0..=5",
        ),
        (
            json!({"model": "smol", "prompt": "Hi", "temperature": 3}),
            400,
            "temperature",
            "[0, 2]",
        ),
        (
            json!({"model": "smol", "prompt": [999999]}),
            400,
            "prompt",
            "vocabulary",
        ),
        (json!({"prompt": "Hi"}), 400, "model", "missing"),
    ];
    for (body, status, param, needle) in cases {
        let (got, r) = complete(&app, body.clone()).await;
        assert_eq!(got, status, "{body} → {r}");
        assert_eq!(r["error"]["param"], param, "{body} → {r}");
        let msg = r["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{body}: {msg:?} lacks {needle:?}");
    }
    let chat_cases = vec![
        (json!({"model": "smol", "messages": "hi"}), "messages"),
        (json!({"model": "smol", "messages": []}), "messages"),
        (
            json!({"model": "smol", "messages": [{"role": "wizard", "content": "x"}]}),
            "messages[0].role",
        ),
        (
            json!({"model": "smol", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 99999}),
            "max_completion_tokens",
        ),
        (
            json!({"model": "smol", "messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 6}),
            "top_logprobs",
        ),
    ];
    for (body, param) in chat_cases {
        let (got, r) = app.post_json("/v1/chat/completions", &body).await;
        assert_eq!(got, 400, "{body} → {r}");
        assert_eq!(r["error"]["param"], param, "{body} → {r}");
    }
    let (status, r) = app
        .post_json(
            "/v1/chat/completions",
            &json!({"model": "smol", "messages": [{"role": "user", "content": "What is the capital of France?"}],
                    "max_tokens": 20, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["choices"][0]["message"]["role"], "assistant");
    let answer = r["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(answer.contains("Paris"), "{answer:?}");
}
