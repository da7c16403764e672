//! `int8-dynamic` and `llm-int8` jobs on a tiny generated model: int8 rows stored as the
//! definition gives them (recomputed here from the source weights), the activation scheme
//! recorded in the GGUF and used by the served kernel, LLM.int8()'s float path equal to the
//! dense weights when every column is an outlier, and parameters refused by name.

mod common;

use std::time::Duration;

use common::models::{dense_twin, logits, open_dir};
use common::{tiny, TestApp};
use quantd::formats::gguf::{GgufFile, TensorType, Value};
use quantd::nn::{KvCache, Llama};
use serde_json::json;

/// absmax / 127 per row, levels rounded half to even: the rows' dequantized values.
fn int8_row(w: &[f32]) -> Vec<f32> {
    let s = w.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
    w.iter()
        .map(|&x| (x * (1.0 / s)).round_ties_even().clamp(-127.0, 127.0) * s)
        .collect()
}

/// Runs a job on the tiny model and returns the stored GGUF's folder.
async fn run_job(
    app: &TestApp,
    method: &str,
    params: serde_json::Value,
    variant: &str,
    int8_tensors: usize,
) -> tempfile::TempDir {
    let (status, job) = app
        .post_json(
            "/v1/jobs",
            &json!({"model": "tiny", "method": method, "params": params}),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    assert_eq!(job["output_name"], format!("tiny:{variant}"));
    assert_eq!(job["plan"]["type_counts"], json!({"INT8": int8_tensors}));
    let done = app
        .wait_job(job["id"].as_str().unwrap(), Duration::from_secs(60))
        .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let out = tempfile::tempdir().unwrap();
    let bytes = app
        .get_bytes(&format!(
            "/v1/models/tiny:{variant}/artifacts/tiny-{variant}.gguf"
        ))
        .await;
    std::fs::write(out.path().join("model.gguf"), &bytes).unwrap();
    out
}

fn max_logit_diff(a: &Llama, b: &Llama) -> (f32, f32) {
    let prompt: Vec<u32> = (0..24).map(|i| (i * 37 % 250) as u32).collect();
    let x = logits(a, &prompt, &mut KvCache::new(), true);
    let y = logits(b, &prompt, &mut KvCache::new(), true);
    let worst = x
        .iter()
        .flatten()
        .zip(y.iter().flatten())
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max);
    let scale = y.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    (worst, scale)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_int8_dynamic_job_stores_int8_rows_and_serves_them_with_per_token_activations() {
    let app = TestApp::spawn().await;
    tiny::upload(&app, "tiny").await;
    let out = run_job(&app, "int8-dynamic", json!({}), "int8-per-token", 14).await;

    let gguf = GgufFile::open(&out.path().join("model.gguf")).unwrap();
    let levels = gguf.tensor("blk.0.attn_q.int8_weight").expect("int8 parts");
    assert_eq!(levels.dtype, TensorType::I8);
    assert_eq!(levels.shape, vec![64, 64]);
    let scales = gguf.tensor("blk.0.attn_q.int8_scale").unwrap();
    assert_eq!(scales.shape, vec![64]);
    assert!(gguf.tensor("blk.0.attn_q.weight").is_none());
    assert!(matches!(
        gguf.get("quantd.int8.activations"),
        Some(Value::String(s)) if s == "per_token"
    ));

    let src_dir = tempfile::tempdir().unwrap();
    tiny::write_model(src_dir.path());
    let source = open_dir(src_dir.path());
    let stored = open_dir(out.path());
    let mut checked = 0;
    for t in stored
        .tensors
        .iter()
        .filter(|t| t.name.starts_with("blk.") && t.shape.len() == 2)
    {
        let got = stored.read_f32(t).unwrap();
        let want = source.read_f32(source.tensor(&t.name).unwrap()).unwrap();
        let expect: Vec<f32> = want.chunks(t.shape[1]).flat_map(int8_row).collect();
        assert_eq!(got, expect, "{}", t.name);
        checked += 1;
    }
    assert_eq!(checked, 14);

    // Served by the int8 kernel: only the activations' rounding separates it from the dense
    // dequantized weights.
    let served = quantd::model::servable::load(&stored, 64).unwrap().llama;
    assert_eq!(served.blocks[0].down.kind(), "int8-per_token");
    assert!(served.outlier_report().is_empty());
    let (worst, scale) = max_logit_diff(&served, &dense_twin(&stored, out.path()));
    assert!(worst > 0.0, "activations are quantized");
    assert!(worst <= 0.02 * scale, "max |Δlogit| {worst} of {scale}");

    let (status, r) = app
        .post_json(
            "/v1/completions",
            &json!({"model": "tiny:int8-per-token", "prompt": "abc", "max_tokens": 4}),
        )
        .await;
    assert_eq!(status, 200, "{r}");

    // `activations: "torch"` alone is PyTorch's default recipe: per-tensor weights on every
    // linear, the tied head included (its own int8 copy; the embeddings stay float).
    let out = run_job(
        &app,
        "int8-dynamic",
        json!({"activations": "torch"}),
        "int8-torch",
        15,
    )
    .await;
    let stored = open_dir(out.path());
    let gguf = GgufFile::open(&out.path().join("model.gguf")).unwrap();
    assert!(
        gguf.tensor("output.int8_weight").is_some(),
        "the head is int8"
    );
    assert!(
        gguf.tensor("token_embd.weight").is_some(),
        "the embeddings stay float"
    );
    let mut minus_128 = 0;
    for t in stored.tensors.iter().filter(|t| t.shape.len() == 2) {
        if t.name == "token_embd.weight" {
            continue;
        }
        let got = stored.read_f32(t).unwrap();
        let want = match t.name.as_str() {
            "output.weight" => source.read_f32(source.tensor("token_embd.weight").unwrap()),
            name => source.read_f32(source.tensor(name).unwrap()),
        }
        .unwrap();
        // One scale for the tensor, absmax / 127.5, levels in [−128, 127].
        let s = want.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.5;
        let expect: Vec<f32> = want
            .iter()
            .map(|&x| (x / s).round_ties_even().clamp(-128.0, 127.0) * s)
            .collect();
        assert_eq!(got, expect, "{}", t.name);
        minus_128 += expect.iter().filter(|&&v| v == -128.0 * s).count();
    }
    assert!(minus_128 > 0, "PyTorch's level −128 is used");
    let served = quantd::model::servable::load(&stored, 64).unwrap().llama;
    assert_eq!(served.blocks[1].q.kind(), "int8-torch");
    assert_eq!(served.output.kind(), "int8-torch");
    assert!(!served.tied_output);
    let (worst, scale) = max_logit_diff(&served, &dense_twin(&stored, out.path()));
    assert!(
        worst > 0.0 && worst <= 0.05 * scale,
        "max |Δlogit| {worst} of {scale}"
    );
    // The head's one activation scale spans its call, so evaluation gives it the whole window
    // (as transformers does): the scored half's logits are those of a full-window call, and
    // not those of a call holding only that half.
    assert!(served.output.scale_spans_call());
    let window: Vec<u32> = (0..64).map(|i| (i * 53 % 250) as u32).collect();
    let scored = quantd::eval::perplexity::half_window_logits(&served, &window).unwrap();
    let full = logits(&served, &window, &mut KvCache::new(), true);
    assert_eq!(scored, full[32..].to_vec());
    let alone = served
        .forward(
            &mut [quantd::nn::SeqStep {
                tokens: &window,
                cache: &mut KvCache::new(),
                logits: quantd::nn::Logits::From(32),
            }],
            None,
        )
        .unwrap()
        .remove(0)
        .to_vec2::<f32>()
        .unwrap();
    assert_ne!(scored, alone, "half the rows give the head another scale");

    // The per-channel variant with a float head is asked for by name.
    let out = run_job(
        &app,
        "int8-dynamic",
        json!({"activations": "torch", "weights": "per_channel", "head": "float"}),
        "int8-torch-per-channel-float-head",
        14,
    )
    .await;
    let stored = open_dir(out.path());
    let served = quantd::model::servable::load(&stored, 64).unwrap().llama;
    assert_eq!(served.blocks[1].q.kind(), "int8-torch");
    assert!(served.tied_output);
    let t = stored.tensor("blk.0.attn_q.weight").unwrap();
    let want = source
        .read_f32(source.tensor("blk.0.attn_q.weight").unwrap())
        .unwrap();
    let expect: Vec<f32> = want.chunks(64).flat_map(int8_row).collect();
    assert_eq!(stored.read_f32(t).unwrap(), expect);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_int8_sends_outlier_columns_through_float_and_counts_them() {
    let app = TestApp::spawn().await;
    tiny::upload(&app, "tiny").await;
    // A threshold below every activation: every column is an outlier, so the layer is the
    // dequantized weights times unrounded activations.
    let out = run_job(
        &app,
        "llm-int8",
        json!({"threshold": 1e-9}),
        "llm-int8-t0.000000001",
        14,
    )
    .await;
    let gguf = GgufFile::open(&out.path().join("model.gguf")).unwrap();
    assert!(matches!(gguf.get("quantd.int8.threshold"), Some(Value::F32(t)) if *t == 1e-9));
    let stored = open_dir(out.path());
    let served = quantd::model::servable::load(&stored, 64).unwrap().llama;
    assert_eq!(served.blocks[0].q.kind(), "int8-llm-int8");
    let (worst, scale) = max_logit_diff(&served, &dense_twin(&stored, out.path()));
    assert!(worst <= 1e-4 * scale.max(1.0), "max |Δlogit| {worst}");
    let report = served.outlier_report();
    assert_eq!(report.len(), 14);
    let q = &report[0];
    assert_eq!(q.tensor, "blk.0.attn_q");
    assert_eq!(q.counts.max_columns, 64, "{q:?}");

    // The default threshold: the tiny model's activations stay below 6, nothing is split off.
    let out = run_job(&app, "llm-int8", json!({}), "llm-int8", 14).await;
    let served = quantd::model::servable::load(&open_dir(out.path()), 64)
        .unwrap()
        .llama;
    let prompt: Vec<u32> = (0..8).collect();
    logits(&served, &prompt, &mut KvCache::new(), true);
    let report = served.outlier_report();
    assert!(
        report
            .iter()
            .all(|l| l.counts.calls > 0 && l.counts.max_columns == 0),
        "{report:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn int8_parameters_are_checked_by_name() {
    let app = TestApp::spawn().await;
    tiny::upload(&app, "tiny").await;
    for (method, params, field) in [
        (
            "int8-dynamic",
            json!({"activations": "fp8"}),
            "params.activations",
        ),
        ("int8-dynamic", json!({"bits": 4}), "params.bits"),
        (
            "int8-dynamic",
            json!({"weights": "per_tensor"}),
            "params.weights",
        ),
        ("int8-dynamic", json!({"head": "fp8"}), "params.head"),
        ("llm-int8", json!({"threshold": -1.0}), "params.threshold"),
        ("llm-int8", json!({"threshold": 1e9}), "params.threshold"),
        ("llm-int8", json!({"threshold": "six"}), "params.threshold"),
    ] {
        let (status, r) = app
            .post_json(
                "/v1/jobs",
                &json!({"model": "tiny", "method": method, "params": params}),
            )
            .await;
        assert_eq!(
            (status, r["error"]["param"].as_str()),
            (422, Some(field)),
            "{method} {params} → {r}"
        );
    }
    // bitsandbytes' int8 rows have a scale per row and leave lm_head float.
    let (status, r) = app
        .post_json(
            "/v1/jobs",
            &json!({"model": "tiny", "method": "int8-dynamic", "params": {"activations": "torch"},
                    "outputs": ["bnb-safetensors"]}),
        )
        .await;
    assert_eq!(
        (status, r["error"]["param"].as_str()),
        (422, Some("outputs")),
        "{r}"
    );
    // No calibration: these methods quantize the weights alone.
    let (status, r) = app
        .post_json(
            "/v1/jobs",
            &json!({"model": "tiny", "method": "int8-dynamic", "calibration": {}}),
        )
        .await;
    assert_eq!(
        (status, r["error"]["param"].as_str()),
        (422, Some("calibration")),
        "{r}"
    );
    app.stop().await;
}
