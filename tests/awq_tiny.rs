//! AWQ jobs on a tiny generated model: activation-aware scales searched per layer and folded
//! into the norms, clipping, exact GGML packing; the variant loses less than round-to-nearest
//! on the same model, and AWQ's parameters are checked by name.

mod common;

use std::time::Duration;

use common::models::open_dir;
use common::{tiny, TestApp};
use serde_json::{json, Value};

async fn run(app: &TestApp, body: Value) -> Value {
    app.run_job(&body, Duration::from_secs(120)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_awq_job_folds_searched_scales_and_loses_less_than_rtn() {
    let app = TestApp::spawn().await;
    tiny::upload(&app, "tiny").await;
    let calib = app
        .post_dataset(&common::corpus("calib-emma.txt", 6000))
        .await;
    let eval_ds = app
        .post_dataset(&common::corpus("eval-pride-and-prejudice.txt", 4000))
        .await;
    let eval = json!({"dataset": eval_ds, "ctx": 64, "max_tokens": 992, "speed": false});

    let awq = run(
        &app,
        json!({"model": "tiny", "method": "awq", "params": {"group_size": 32}, "eval": eval,
               "calibration": {"dataset": calib, "samples": 16, "seq_len": 64}}),
    )
    .await;
    assert_eq!(awq["status"], "succeeded", "{awq}");
    assert_eq!(awq["output_model"], "tiny:awq-4bit-g32-asym");
    let alphas = awq["metrics"]["calibration"]["details"]["alpha"]
        .as_array()
        .unwrap();
    assert_eq!(alphas.len(), tiny::LAYERS, "{awq}");
    for a in alphas {
        // Grouped-query attention: o is not scaled (AutoAWQ skips it when v and o differ).
        assert!(
            a["qkv"].is_number() && a["o"].is_null() && a["down"].is_number(),
            "{a}"
        );
    }
    // Where α > 0 the scales were folded into the norm before the group: the stored norm
    // differs from the source's by a per-channel factor.
    let dir = tempfile::tempdir().unwrap();
    let bytes = app
        .get_bytes("/v1/models/tiny:awq-4bit-g32-asym/artifacts/tiny-awq-4bit-g32-asym.gguf")
        .await;
    std::fs::write(dir.path().join("model.gguf"), &bytes).unwrap();
    let stored = open_dir(dir.path());
    let src_dir = tempfile::tempdir().unwrap();
    tiny::write_model(src_dir.path());
    let source = open_dir(src_dir.path());
    for (layer, a) in alphas.iter().enumerate() {
        for (norm, alpha) in [("attn_norm", &a["qkv"]), ("ffn_norm", &a["gate_up"])] {
            let name = format!("blk.{layer}.{norm}.weight");
            let got = stored.read_f32(stored.tensor(&name).unwrap()).unwrap();
            let want = source.read_f32(source.tensor(&name).unwrap()).unwrap();
            assert_eq!(
                got != want,
                alpha.as_f64().unwrap() > 0.0,
                "{name}: α {alpha}"
            );
        }
    }

    let rtn = run(
        &app,
        json!({"model": "tiny", "method": "rtn", "params": {"bits": 4, "group_size": 32, "sym": false},
               "eval": eval}),
    )
    .await;
    assert_eq!(rtn["status"], "succeeded", "{rtn}");
    let kld = |j: &Value| j["metrics"]["eval"]["kld_mean"].as_f64().unwrap();
    let (a, r) = (kld(&awq), kld(&rtn));
    eprintln!("tiny model, KLD vs base: awq {a:e}, rtn {r:e}; α {alphas:?}");
    assert!(a < r, "AWQ {a} should lose less than RTN {r}");

    let (status, out) = app
        .post_json(
            "/v1/completions",
            &json!({"model": "tiny:awq-4bit-g32-asym", "prompt": "abc", "max_tokens": 4}),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    app.stop().await;
}

#[tokio::test]
async fn awq_parameters_are_checked_by_name() {
    let app = TestApp::spawn().await;
    tiny::upload(&app, "tiny").await;
    let ds = app
        .post_dataset(&common::corpus("calib-emma.txt", 2000))
        .await;
    for (params, field) in [
        (json!({"bits": 8}), "params.bits"),
        (json!({"grid": 0}), "params.grid"),
        (json!({"group_size": 100}), "params.group_size"),
        (json!({"alpha": 0.5}), "params.alpha"),
    ] {
        let (status, r) = app
            .post_json(
                "/v1/jobs",
                &json!({"model": "tiny", "method": "awq", "params": params,
                        "calibration": {"dataset": ds}}),
            )
            .await;
        assert_eq!(
            (status, r["error"]["param"].as_str()),
            (422, Some(field)),
            "{params} → {r}"
        );
    }
    let (status, r) = app
        .post_json("/v1/jobs", &json!({"model": "tiny", "method": "awq"}))
        .await;
    assert_eq!(
        (status, r["error"]["param"].as_str()),
        (422, Some("calibration")),
        "{r}"
    );
    app.stop().await;
}
