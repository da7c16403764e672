//! The engine on a tiny random-weight model (fast, no fixture): stop strings that span tokens,
//! batch-invariant greedy decoding, seeded sampling, streams that equal the non-streamed text,
//! context limits, and the decoder's capture hooks.

mod common;

use std::collections::BTreeMap;

use common::tiny;
use futures::StreamExt;
use quantd::model::servable;
use quantd::nn::{KvCache, SeqStep};
use serde_json::{json, Value};

async fn app_with_tiny() -> (common::TestApp, tempfile::TempDir) {
    let app = common::TestApp::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    tiny::write_model(dir.path());
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let (status, body) = app.upload(&files, Some("tiny")).await;
    assert_eq!(status, 201, "{body}");
    (app, dir)
}

async fn text_of(app: &common::TestApp, body: Value) -> (String, String) {
    let (status, r) = app.post_json("/v1/completions", &body).await;
    assert_eq!(status, 200, "{body} → {r}");
    (
        r["choices"][0]["text"].as_str().unwrap().to_string(),
        r["choices"][0]["finish_reason"]
            .as_str()
            .unwrap()
            .to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_spanning_tokens_cut_the_text_before_them() {
    let (app, _dir) = app_with_tiny().await;
    let base = json!({"model": "tiny", "prompt": "hello world", "max_tokens": 40,
                      "temperature": 0, "ignore_eos": true});
    let (full, reason) = text_of(&app, base.clone()).await;
    assert_eq!(reason, "length");
    // Two characters from the middle of the output: two byte-level tokens or more.
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 12, "{full:?}");
    let stop: String = chars[8..10].iter().collect();
    let expected = &full[..full.find(&stop).unwrap()];
    let mut body = base.clone();
    body["stop"] = json!(["never-there", stop]);
    let (cut, reason) = text_of(&app, body.clone()).await;
    assert_eq!((cut.as_str(), reason.as_str()), (expected, "stop"));

    // Streaming holds back a possible stop prefix and never sends the stop itself.
    body["stream"] = json!(true);
    let resp = app
        .client
        .post(app.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let raw = String::from_utf8(resp.bytes().await.unwrap().to_vec()).unwrap();
    let mut streamed = String::new();
    let mut finish = Value::Null;
    for line in raw.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(line).unwrap();
        streamed.push_str(v["choices"][0]["text"].as_str().unwrap());
        if !v["choices"][0]["finish_reason"].is_null() {
            finish = v["choices"][0]["finish_reason"].clone();
        }
    }
    assert_eq!(streamed, expected);
    assert_eq!(finish, "stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_is_batch_invariant_and_seeds_reproduce_samples() {
    let (app, _dir) = app_with_tiny().await;
    let (alone, _) = text_of(
        &app,
        json!({"model": "tiny", "prompt": "abc", "max_tokens": 24, "temperature": 0, "ignore_eos": true}),
    )
    .await;
    let (status, r) = app
        .post_json(
            "/v1/completions",
            &json!({"model": "tiny", "prompt": ["abc", "a longer prompt"], "n": 3, "max_tokens": 24,
                    "temperature": 0, "ignore_eos": true}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    let choices = r["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 6);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
    }
    for c in &choices[..3] {
        assert_eq!(c["text"], alone, "batched greedy differs from alone");
    }
    assert_eq!(r["usage"]["completion_tokens"], 6 * 24);

    let sampled = |seed: u64| {
        json!({"model": "tiny", "prompt": "abc", "max_tokens": 24, "temperature": 1.0,
               "top_k": 50, "top_p": 0.95, "seed": seed, "ignore_eos": true})
    };
    let (a, _) = text_of(&app, sampled(1)).await;
    let (b, _) = text_of(&app, sampled(1)).await;
    let (c, _) = text_of(&app, sampled(2)).await;
    assert_eq!(a, b);
    assert_ne!(a, c);

    // The stream of a seeded request carries the same text.
    let mut body = sampled(1);
    body["stream"] = json!(true);
    let resp = app
        .client
        .post(app.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut s = resp.bytes_stream();
    let mut raw = Vec::new();
    while let Some(part) = s.next().await {
        raw.extend_from_slice(&part.unwrap());
    }
    let streamed: String = String::from_utf8(raw)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|l| *l != "[DONE]")
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["choices"][0]["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(streamed, a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_context_length_bounds_prompt_plus_max_tokens() {
    let (app, _dir) = app_with_tiny().await;
    // The tiny model has 256 positions.
    let (status, r) = app
        .post_json(
            "/v1/completions",
            &json!({"model": "tiny", "prompt": "abcd", "max_tokens": 253}),
        )
        .await;
    assert_eq!(
        (status, &r["error"]["param"]),
        (400, &json!("max_tokens")),
        "{r}"
    );
    assert!(
        r["error"]["message"].as_str().unwrap().contains("256"),
        "{r}"
    );
    // More sequences than the model could ever hold at once is a 400, not an endless 429.
    let (status, r) = app
        .post_json(
            "/v1/completions",
            &json!({"model": "tiny", "prompt": vec!["a"; 16], "n": 4, "max_tokens": 1}),
        )
        .await;
    assert_eq!((status, &r["error"]["param"]), (400, &json!("n")), "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("capacity of 24"),
        "{r}"
    );
    // Scoring a prompt that fills the whole context is allowed with max_tokens 0.
    let (status, r) = app
        .post_json(
            "/v1/completions",
            &json!({"model": "tiny", "prompt": vec![65; 256], "max_tokens": 0, "echo": true, "logprobs": 0}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(
        r["choices"][0]["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap()
            .len(),
        256
    );
    // Without max_tokens, chat takes what the context leaves and stops at its end.
    let (status, r) = app
        .post_json(
            "/v1/chat/completions",
            &json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                    "temperature": 0, "ignore_eos": true}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    let used = r["usage"]["total_tokens"].as_u64().unwrap();
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    assert!(used <= 256, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_least_recently_used_model_is_unloaded_when_over_the_memory_budget() {
    let app = common::TestApp::spawn_with(|s| {
        // Room for one tiny model (about 360 KB of weights), not two.
        s.engine.memory_budget_bytes = 500_000;
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    tiny::write_model(dir.path());
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    for name in ["first", "second"] {
        let (status, body) = app.upload(&files, Some(name)).await;
        assert_eq!(status, 201, "{body}");
    }
    let loaded = |list: &Value| -> Vec<String> {
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["loaded"] == true)
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    let (status, r) = app.post_json("/v1/models/first/load", &json!({})).await;
    assert_eq!(status, 200, "{r}");
    let bytes = r["weight_bytes"].as_u64().unwrap();
    assert!(bytes < 500_000 && bytes * 2 > 500_000, "{r}");
    assert_eq!(loaded(&app.get_json("/v1/models").await.1), vec!["first"]);
    // A completion loads its model; the budget holds one, so the other is unloaded.
    for model in ["second", "first"] {
        let (status, _) = app
            .post_json(
                "/v1/completions",
                &json!({"model": model, "prompt": "a", "max_tokens": 2}),
            )
            .await;
        assert_eq!(status, 200);
        assert_eq!(loaded(&app.get_json("/v1/models").await.1), vec![model]);
    }
}

#[test]
fn capture_hooks_see_every_linear_input_once_per_forward() {
    let dir = tempfile::tempdir().unwrap();
    tiny::write_model(dir.path());
    let ckpt = common::models::open_dir(dir.path());
    let llama = servable::load_llama(&ckpt, 64).unwrap();
    let mut seen: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut hook = |name: &str, x: &candle_core::Tensor| {
        seen.insert(name.to_string(), x.dims().to_vec());
    };
    let mut cache = KvCache::new();
    llama
        .forward(
            &mut [SeqStep {
                tokens: &[1, 2, 3],
                cache: &mut cache,
                logits: quantd::nn::Logits::Last,
            }],
            Some(&mut hook),
        )
        .unwrap();
    // 7 linears per block, plus the output layer (last position only).
    assert_eq!(seen.len(), tiny::LAYERS * 7 + 1, "{seen:?}");
    assert_eq!(seen["blk.0.attn_q"], vec![3, tiny::HIDDEN]);
    assert_eq!(seen["blk.1.ffn_down"], vec![3, tiny::FFN]);
    assert_eq!(seen["output"], vec![1, tiny::HIDDEN]);
}
