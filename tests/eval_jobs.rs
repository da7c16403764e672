//! The eval stage of jobs on a tiny generated model: metrics in the job, the model and the
//! variants list; the base's results cached and reused; `method: "eval"` against any
//! reference (itself: KL 0, top-1 100%); a missed gate failing the job with the numbers and
//! leaving no model; and every bad eval or gate field refused by name.

mod common;

use std::time::Duration;

use common::{tiny, TestApp};
use serde_json::{json, Value};

/// Real English text; the tiny model's tokenizer makes one token per byte.
fn text() -> String {
    let path = common::repo_root().join("tests/corpus/calib-emma.txt");
    let text = std::fs::read_to_string(path).unwrap();
    text.chars().take(4000).collect()
}

/// ctx 64 scores 31 tokens per window: 124 tokens are 4 windows.
fn eval_block(dataset: &str) -> Value {
    json!({"dataset": dataset, "ctx": 64, "max_tokens": 124, "speed": false})
}

async fn run(app: &TestApp, body: Value) -> Value {
    app.run_job(&body, Duration::from_secs(120)).await
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("{v} is not a number"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_with_eval_reports_accuracy_in_the_job_the_model_and_the_variants() {
    let app = TestApp::spawn().await;
    tiny::upload(&app, "tiny").await;
    let ds = app.post_dataset(&text()).await;

    let mut eval = eval_block(&ds);
    eval["speed"] = json!(true);
    let q8 = run(
        &app,
        json!({"model": "tiny", "method": "gguf", "params": {"type": "Q8_0"}, "eval": eval}),
    )
    .await;
    assert_eq!(q8["status"], "succeeded", "{q8}");
    let e8 = &q8["metrics"]["eval"];
    assert_eq!(e8["scored_tokens"], 124, "{e8}");
    assert_eq!(e8["windows"], 4);
    assert_eq!(e8["reference"], "tiny");
    assert_eq!(e8["reference_cached"], false);
    assert!(f(&e8["perplexity"]) > 1.0);
    let kld8 = f(&e8["kld_mean"]);
    assert!(kld8 > 0.0 && kld8 < 0.01, "{e8}");
    assert!(f(&e8["top1_agreement_pct"]) > 90.0, "{e8}");
    assert!(f(&e8["speed"]["prompt_tok_s"]) > 0.0);
    assert!(f(&e8["speed"]["decode_tok_s"]) > 0.0);
    assert!(f(&e8["reference_speed"]["decode_tok_s"]) > 0.0);
    assert!(f(&e8["bits_per_weight_total"]) > 8.0);
    let events = app
        .get_bytes(&format!("/v1/jobs/{}/events", q8["id"].as_str().unwrap()))
        .await;
    let events = String::from_utf8_lossy(&events);
    assert!(
        events.contains("\"evaluating\"") && events.contains("event: metric"),
        "{events}"
    );

    // The second variant of the same base on the same text reuses the base's results.
    let q4 = run(
        &app,
        json!({"model": "tiny", "method": "gguf", "params": {"type": "Q4_0"}, "eval": eval_block(&ds)}),
    )
    .await;
    assert_eq!(q4["status"], "succeeded", "{q4}");
    let e4 = &q4["metrics"]["eval"];
    assert_eq!(e4["reference_cached"], true, "{e4}");
    assert_eq!(e4["reference_perplexity"], e8["reference_perplexity"]);
    assert!(f(&e4["kld_mean"]) > kld8, "Q4_0 loses more than Q8_0: {e4}");
    assert!(e4["speed"].is_null(), "speed: false skips the measurement");

    let (_, m) = app.get_json("/v1/models/tiny:q8_0").await;
    assert_eq!(m["metrics"]["kld_mean"], e8["kld_mean"], "{m}");
    assert_eq!(m["metrics"]["delta_ppl_pct"], e8["delta_ppl_pct"]);
    assert_eq!(m["evaluation"]["reference"], "tiny");
    assert_eq!(m["evaluation"]["dataset"], json!(ds));

    let (_, variants) = app.get_json("/v1/models/tiny/variants").await;
    let rows = variants["data"].as_array().unwrap();
    let ids: Vec<&str> = rows.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["tiny:q4_0", "tiny:q8_0"], "smallest first");
    assert_eq!(rows[1]["type"], "Q8_0");
    assert_eq!(rows[1]["kld_mean"], e8["kld_mean"]);
    assert_eq!(rows[1]["top1_agreement_pct"], e8["top1_agreement_pct"]);
    assert!(rows[1]["decode_tok_s"].as_f64().is_some());
    assert!(rows[0]["decode_tok_s"].is_null());

    let (_, d) = app.get_json(&format!("/v1/datasets/{ds}")).await;
    assert_eq!(
        d["tokens_by_model"]["tiny"],
        json!(text().len()),
        "byte-level tokens: {d}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eval_jobs_compare_any_model_with_a_reference_and_make_no_model() {
    let app = TestApp::spawn().await;
    tiny::upload(&app, "tiny").await;
    let ds = app.post_dataset(&text()).await;

    let own = run(
        &app,
        json!({"model": "tiny", "method": "eval", "params": {"reference": "tiny"}, "eval": eval_block(&ds)}),
    )
    .await;
    assert_eq!(own["status"], "succeeded", "{own}");
    assert!(own["output_model"].is_null() && own["output_name"].is_null());
    let e = &own["metrics"]["eval"];
    assert!(f(&e["kld_max"]).abs() <= 1e-6, "{e}");
    assert_eq!(e["top1_agreement_pct"], 100.0);
    assert_eq!(e["delta_ppl_pct"], 0.0);

    // A variant against its base, the default reference.
    let made = run(
        &app,
        json!({"model": "tiny", "method": "gguf", "params": {"type": "Q4_K_M"}}),
    )
    .await;
    assert_eq!(made["status"], "succeeded", "{made}");
    let scored = run(
        &app,
        json!({"model": "tiny:q4_k_m", "method": "eval", "eval": eval_block(&ds)}),
    )
    .await;
    assert_eq!(scored["status"], "succeeded", "{scored}");
    let e = &scored["metrics"]["eval"];
    assert_eq!(e["reference"], "tiny");
    assert!(f(&e["kld_mean"]) > 0.0);
    let (_, models) = app.get_json("/v1/models").await;
    assert_eq!(
        models["data"].as_array().unwrap().len(),
        2,
        "eval jobs add no model"
    );
    let (_, m) = app.get_json("/v1/models/tiny:q4_k_m").await;
    assert_eq!(m["metrics"]["kld_mean"], e["kld_mean"], "{m}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missed_gate_fails_the_job_with_the_numbers_and_keeps_no_model() {
    let app = TestApp::spawn().await;
    tiny::upload(&app, "tiny").await;
    let ds = app.post_dataset(&text()).await;
    let before = app.stored_files();
    let job = run(
        &app,
        json!({"model": "tiny", "method": "gguf", "params": {"type": "Q4_0"}, "eval": eval_block(&ds),
               "gate": {"max_kld": 1e-9, "max_delta_ppl_pct": 1000.0}}),
    )
    .await;
    assert_eq!(job["status"], "failed", "{job}");
    let error = job["error"].as_str().unwrap();
    assert!(
        error.contains("kld_mean") && error.contains("max_kld"),
        "{error}"
    );
    assert!(
        !error.contains("delta_ppl_pct"),
        "only the missed bound is named: {error}"
    );
    let measured = f(&job["metrics"]["eval"]["kld_mean"]);
    assert!(
        error.contains(&format!("{measured:.6}")),
        "{error} names {measured}"
    );
    assert_eq!(job["metrics"]["gate"]["passed"], false);
    assert!(job["output_model"].is_null());
    let (status, _) = app.get_json("/v1/models/tiny:q4_0").await;
    assert_eq!(status, 404);
    assert_eq!(app.stored_files(), before, "no file was kept");

    // A gate the variant meets lets it through.
    let ok = run(
        &app,
        json!({"model": "tiny", "method": "gguf", "params": {"type": "Q8_0"}, "eval": eval_block(&ds),
               "gate": {"max_kld": 0.05, "min_top1_pct": 50.0}}),
    )
    .await;
    assert_eq!(ok["status"], "succeeded", "{ok}");
    assert_eq!(ok["metrics"]["gate"]["passed"], true);
    app.stop().await;
}

#[tokio::test]
async fn bad_eval_and_gate_fields_are_refused_by_name() {
    let app = TestApp::spawn().await;
    tiny::upload(&app, "tiny").await;
    let ds = app.post_dataset(&text()).await;
    let gguf = |extra: Value| {
        let mut b = json!({"model": "tiny", "method": "gguf", "params": {"type": "Q8_0"}});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let cases = [
        (gguf(json!({"gate": {"max_kld": 0.1}})), 422, "gate"),
        (
            gguf(json!({"eval": {"dataset": ds, "ctx": 7}})),
            422,
            "eval.ctx",
        ),
        (
            gguf(json!({"eval": {"dataset": ds, "ctx": 512}})),
            422,
            "eval.ctx",
        ),
        (
            gguf(json!({"eval": {"dataset": ds, "max_tokens": 0}})),
            422,
            "eval.max_tokens",
        ),
        (
            gguf(json!({"eval": {"dataset": ds, "windows": 3}})),
            422,
            "eval.windows",
        ),
        (
            gguf(json!({"eval": {"dataset": "ds_0000000000000000"}})),
            404,
            "eval.dataset",
        ),
        (
            gguf(json!({"eval": {"dataset": ds}, "gate": {"max_kld": -1.0}})),
            422,
            "gate.max_kld",
        ),
        (
            gguf(json!({"eval": {"dataset": ds}, "gate": {}})),
            422,
            "gate",
        ),
        (json!({"model": "tiny", "method": "eval"}), 422, "eval"),
        (
            json!({"model": "tiny", "method": "eval", "eval": {"dataset": ds}}),
            422,
            "params.reference",
        ),
        (
            json!({"model": "tiny", "method": "eval", "params": {"reference": "nope"}, "eval": {"dataset": ds}}),
            404,
            "params.reference",
        ),
        (
            json!({"model": "tiny", "method": "eval", "output_name": "x", "eval": {"dataset": ds}}),
            422,
            "output_name",
        ),
    ];
    for (body, status, param) in cases {
        let (got, r) = app.post_json("/v1/jobs", &body).await;
        assert_eq!(
            (got, r["error"]["param"].as_str()),
            (status, Some(param)),
            "{body} → {r}"
        );
    }
    let (_, jobs) = app.get_json("/v1/jobs").await;
    assert_eq!(jobs["data"], json!([]), "nothing was queued");
    app.stop().await;
}
