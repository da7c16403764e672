//! GPTQ on a tiny generated model: the layer-by-layer calibration pass computes what the
//! decoder computes, GPTQ's blocks dequantize to exactly the weights the later layers were
//! calibrated with, a `gptq` job beats `rtn` on the same model and text, and every
//! calibration parameter is checked by name.

mod common;

use std::ops::ControlFlow;
use std::time::Duration;

use candle_core::quantized::GgmlDType;
use candle_core::Tensor;
use common::models::open_dir;
use common::{tiny, TestApp};
use quantd::formats::ggml_blocks::dequantize;
use quantd::formats::groups::GroupFormat;
use quantd::model::servable;
use quantd::nn::{KvCache, Logits, SeqStep};
use quantd::quant::data_free::generate_windows;
use quantd::quant::gptq::GptqConfig;
use quantd::quant::gptq_model::GptqModel;
use quantd::quant::layerwise::{self, LayerwiseError, StageInputs, StageQuantizer};
use serde_json::{json, Value};

fn windows() -> Vec<Vec<u32>> {
    (0..3u32)
        .map(|w| (0..48).map(|i| (i * 37 + w * 101) % 256).collect())
        .collect()
}

/// Returns every weight unchanged, so the pass must reproduce the unquantized model.
struct Unchanged;

impl StageQuantizer for Unchanged {
    fn quantize(&mut self, s: StageInputs<'_>) -> Result<Vec<Vec<f32>>, LayerwiseError> {
        for x in s.inputs {
            assert_eq!(x.dims(), &[48, s.linears[0].cols], "{:?}", s.stage);
        }
        Ok(s.linears.iter().map(|l| l.weight.clone()).collect())
    }
}

#[test]
fn the_layer_by_layer_pass_computes_what_the_decoder_computes() {
    let dir = tempfile::tempdir().unwrap();
    tiny::write_model(dir.path());
    let ckpt = open_dir(dir.path());
    let windows = windows();
    let finals = layerwise::run(&ckpt, &windows, true, &mut Unchanged, |_, _| {
        ControlFlow::Continue(())
    })
    .unwrap();
    let model = servable::load(&ckpt, 64).unwrap().llama;
    let eps = ckpt.config.rms_norm_eps as f32;
    for (w, hidden) in windows.iter().zip(finals) {
        let mut cache = KvCache::new();
        let mut normed: Option<Tensor> = None;
        let mut hook = |name: &str, t: &Tensor| {
            if name == "output" {
                normed = Some(t.clone());
            }
        };
        model
            .forward(
                &mut [SeqStep {
                    tokens: w,
                    cache: &mut cache,
                    logits: Logits::From(0),
                }],
                Some(&mut hook),
            )
            .unwrap();
        let want = normed.unwrap();
        let got = candle_nn::ops::rms_norm(&hidden, &model.output_norm, eps).unwrap();
        let diff = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "max abs diff {diff}");
    }
}

/// GPTQ, keeping the weights it hands back to the pass.
struct Recording(GptqModel, Vec<(String, Vec<f32>)>);

impl StageQuantizer for Recording {
    fn quantize(&mut self, s: StageInputs<'_>) -> Result<Vec<Vec<f32>>, LayerwiseError> {
        let names: Vec<String> = s.linears.iter().map(|l| l.name.clone()).collect();
        let out = self.0.quantize(s)?;
        self.1.extend(names.into_iter().zip(out.iter().cloned()));
        Ok(out)
    }
}

#[test]
fn gptq_blocks_dequantize_to_exactly_the_weights_later_layers_were_calibrated_with() {
    let dir = tempfile::tempdir().unwrap();
    tiny::write_model(dir.path());
    let ckpt = open_dir(dir.path());
    let format = GroupFormat {
        bits: 4,
        group_size: Some(32),
        sym: false,
    };
    let wanted = ckpt
        .tensor_shapes()
        .into_iter()
        .filter(|(n, s)| n.starts_with("blk.") && s.len() == 2)
        .map(|(n, _)| n)
        .collect();
    let config = GptqConfig {
        format,
        damp_percent: 0.01,
        act_order: true,
    };
    let mut rec = Recording(GptqModel::new(config, wanted), Vec::new());
    layerwise::run(&ckpt, &windows(), true, &mut rec, |_, _| {
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(rec.1.len(), 7 * tiny::LAYERS);
    for (name, weights) in &rec.1 {
        let (bytes, err) = &rec.0.tensors[&format!("{name}.weight")];
        let t = ckpt.tensor(&format!("{name}.weight")).unwrap();
        let (rows, cols) = (t.shape[0], t.shape[1]);
        let stored = dequantize(bytes, rows, cols, GgmlDType::Q4_1).unwrap();
        assert_eq!(&stored, weights, "{name}");
        assert!(err.rel_rmse > 0.0 && err.rel_rmse < 0.3, "{name}: {err:?}");
    }
}

/// Real English text; the tiny model's tokenizer makes one token per byte.
fn text(chars: usize) -> String {
    let path = common::repo_root().join("tests/corpus/calib-emma.txt");
    std::fs::read_to_string(path)
        .unwrap()
        .chars()
        .take(chars)
        .collect()
}

async fn run(app: &TestApp, body: Value) -> Value {
    app.run_job(&body, Duration::from_secs(120)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gptq_job_calibrates_layer_by_layer_and_loses_less_than_rtn() {
    let app = TestApp::spawn().await;
    tiny::upload(&app, "tiny").await;
    let calib = app.post_dataset(&text(6000)).await;
    let eval_text = {
        let path = common::repo_root().join("tests/corpus/eval-pride-and-prejudice.txt");
        let t = std::fs::read_to_string(path).unwrap();
        t.chars().take(4000).collect::<String>()
    };
    let eval_ds = app.post_dataset(&eval_text).await;
    let eval = json!({"dataset": eval_ds, "ctx": 64, "max_tokens": 992, "speed": false});
    let params = json!({"bits": 4, "group_size": 32, "sym": false});

    let (status, answer) = app
        .post_json(
            "/v1/jobs",
            &json!({"model": "tiny", "method": "gptq", "params": params, "dry_run": true,
                    "calibration": {"dataset": calib, "samples": 16, "seq_len": 64}}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let plan = &answer["plan"];
    assert_eq!(plan["method"], "gptq");
    assert_eq!(plan["type_counts"], json!({"Q4_1": 14}));
    assert_eq!(plan["calibration"]["tokens"], 1024);

    let gptq = run(
        &app,
        json!({"model": "tiny", "method": "gptq", "params": params, "eval": eval,
               "calibration": {"dataset": calib, "samples": 16, "seq_len": 64, "seed": 7}}),
    )
    .await;
    assert_eq!(gptq["status"], "succeeded", "{gptq}");
    assert_eq!(gptq["output_model"], "tiny:gptq-4bit-g32-asym-act");
    let cal = &gptq["metrics"]["calibration"];
    assert_eq!(
        (
            &cal["samples"],
            &cal["seq_len"],
            &cal["seed"],
            &cal["tokens"]
        ),
        (&json!(16), &json!(64), &json!(7), &json!(1024)),
        "{gptq}"
    );
    assert_eq!(cal["source"], calib);
    let (_, events) = app
        .get_json(&format!("/v1/jobs/{}", gptq["id"].as_str().unwrap()))
        .await;
    assert_eq!(events["status"], "succeeded");

    let rtn = run(
        &app,
        json!({"model": "tiny", "method": "rtn", "params": params, "eval": eval}),
    )
    .await;
    assert_eq!(rtn["status"], "succeeded", "{rtn}");
    let kld = |j: &Value| j["metrics"]["eval"]["kld_mean"].as_f64().unwrap();
    let (g, r) = (kld(&gptq), kld(&rtn));
    eprintln!("tiny model, KLD vs base: gptq {g:e}, rtn {r:e}");
    assert!(
        g < 0.8 * r,
        "GPTQ {g} should lose clearly less than RTN {r}"
    );

    let (status, out) = app
        .post_json(
            "/v1/completions",
            &json!({"model": "tiny:gptq-4bit-g32-asym-act", "prompt": "abc", "max_tokens": 4}),
        )
        .await;
    assert_eq!(status, 200, "{out}");

    // Too little text for even one window fails the job with the counts.
    let short = app.post_dataset(&text(100)).await;
    let failed = run(
        &app,
        json!({"model": "tiny", "method": "gptq", "params": params, "output_name": "tiny:short",
               "calibration": {"dataset": short, "samples": 4, "seq_len": 512}}),
    )
    .await;
    assert_eq!(failed["status"], "failed");
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains("100 tokens") && error.contains("512"),
        "{error}"
    );
    let (status, _) = app.get_json("/v1/models/tiny:short").await;
    assert_eq!(status, 404);
    app.stop().await;
}

#[test]
fn data_free_windows_are_seeded_full_length_and_start_from_bos() {
    let dir = tempfile::tempdir().unwrap();
    tiny::write_model(dir.path());
    let ckpt = open_dir(dir.path());
    let llama = servable::load(&ckpt, 64).unwrap().llama;
    let run = |samples: usize, seed: u64| {
        generate_windows(&llama, 256, &[256], samples, 40, seed, |_, _| {
            ControlFlow::Continue(())
        })
        .unwrap()
        .unwrap()
        .0
    };
    let a = run(20, 3);
    assert_eq!(a.len(), 20);
    for w in &a {
        assert_eq!(w.len(), 40);
        assert_eq!(w[0], 256, "starts from BOS");
        assert!(!w[1..].contains(&256), "never samples end-of-sequence");
    }
    // Sampled, not greedy: the windows differ from each other.
    assert!(a.windows(2).any(|p| p[0] != p[1]));
    // Each window has its own seeded stream, whatever the batch it ran in.
    assert_eq!(run(3, 3), a[..3].to_vec());
    assert_ne!(run(3, 4), a[..3].to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gptq_job_without_a_dataset_calibrates_data_free_and_says_so() {
    let app = TestApp::spawn().await;
    tiny::upload(&app, "tiny").await;
    let params = json!({"bits": 4, "group_size": 32, "sym": false});
    let body = json!({"model": "tiny", "method": "gptq", "params": params,
                      "calibration": {"samples": 8, "seq_len": 32, "seed": 1}});
    let mut dry = body.clone();
    dry["dry_run"] = json!(true);
    let (status, plan) = app.post_json("/v1/jobs", &dry).await;
    assert_eq!(status, 200, "{plan}");
    assert_eq!(plan["plan"]["calibration"]["data_free"], true, "{plan}");
    let done = run(&app, body).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let cal = &done["metrics"]["calibration"];
    assert_eq!(cal["data_free"], true, "{cal}");
    assert_eq!(cal["source"], "data-free");
    assert_eq!(cal["tokens"], 256);
    assert_eq!(cal["generation"]["start_token"], 256, "{cal}");
    let (status, out) = app
        .post_json(
            "/v1/completions",
            &json!({"model": done["output_model"], "prompt": "abc", "max_tokens": 4}),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    app.stop().await;
}

#[tokio::test]
async fn gptq_and_calibration_parameters_are_checked_by_name() {
    let app = TestApp::spawn().await;
    tiny::upload(&app, "tiny").await;
    let ds = app.post_dataset(&text(2000)).await;
    let cal = json!({"dataset": ds});
    let cases = [
        (
            json!({"method": "gptq", "params": {"bits": 4}}),
            422,
            "calibration",
        ),
        (
            json!({"method": "rtn", "params": {"bits": 4}, "calibration": cal}),
            422,
            "calibration",
        ),
        (
            json!({"method": "gptq", "params": {"bits": 4}, "calibration": {"dataset": "ds_nope"}}),
            404,
            "calibration.dataset",
        ),
        (
            json!({"method": "gptq", "params": {"bits": 4}, "calibration": {"dataset": ds, "samples": 0}}),
            422,
            "calibration.samples",
        ),
        (
            json!({"method": "gptq", "params": {"bits": 4}, "calibration": {"dataset": ds, "seq_len": 8}}),
            422,
            "calibration.seq_len",
        ),
        (
            json!({"method": "gptq", "params": {"bits": 4, "damp_percent": 1.5}, "calibration": cal}),
            422,
            "params.damp_percent",
        ),
        (
            json!({"method": "gptq", "params": {"bits": 4, "act_order": true, "static_groups": false},
                   "calibration": cal}),
            422,
            "params.static_groups",
        ),
        (
            json!({"method": "gptq", "params": {"bits": 5}, "calibration": cal}),
            422,
            "params.bits",
        ),
        (
            json!({"method": "gptq", "params": {"bits": 4, "group_size": 100}, "calibration": cal}),
            422,
            "params.group_size",
        ),
    ];
    for (mut body, status, field) in cases {
        body["model"] = json!("tiny");
        let (got, r) = app.post_json("/v1/jobs", &body).await;
        assert_eq!(
            (got, r["error"]["param"].as_str()),
            (status, Some(field)),
            "{body} → {r}"
        );
    }
    let (_, jobs) = app.get_json("/v1/jobs").await;
    assert_eq!(jobs["data"].as_array().map(Vec::len), Some(0), "{jobs}");
    app.stop().await;
}
