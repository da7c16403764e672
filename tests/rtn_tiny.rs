//! `rtn` jobs on a tiny generated model: integer groups by GPTQ's definition, stored as GGML
//! blocks (4-bit) or in the GPTQ layout (3-bit) that dequantize to exactly the values the
//! definition gives (recomputed here from the source weights), served, and refused by name
//! where a parameter is out of range.

mod common;

use std::time::Duration;

use common::models::{logits, open_dir};
use common::{tiny, TestApp};
use half::f16;
use quantd::nn::KvCache;
use serde_json::json;

/// GPTQ's `Quantizer.find_params` + quantize + dequantize for one asymmetric group, with the
/// scale and minimum rounded to f16 as a Q4_1 block stores them (DESIGN §4).
fn rtn_asym_group(w: &[f32], bits: u32) -> Vec<f32> {
    let maxq = ((1u32 << bits) - 1) as f32;
    let lo = w.iter().copied().fold(0f32, f32::min);
    let hi = w.iter().copied().fold(0f32, f32::max);
    let d = f16::from_f32((hi - lo) / maxq).to_f32();
    let zero = (-lo / d).round();
    let m = f16::from_f32(-d * zero).to_f32();
    w.iter()
        .map(|&x| ((x - m) / d).round().clamp(0.0, maxq) * d + m)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rtn_job_stores_groups_as_ggml_blocks_that_dequantize_to_the_definition() {
    let app = TestApp::spawn().await;
    tiny::upload(&app, "tiny").await;
    let (status, job) = app
        .post_json(
            "/v1/jobs",
            &json!({"model": "tiny", "method": "rtn", "params": {"bits": 4, "group_size": 32, "sym": false}}),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    assert_eq!(job["output_name"], "tiny:rtn-4bit-g32-asym");
    assert_eq!(job["plan"]["type_counts"], json!({"Q4_1": 14}));
    let done = app
        .wait_job(job["id"].as_str().unwrap(), Duration::from_secs(60))
        .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let (_, m) = app.get_json("/v1/models/tiny:rtn-4bit-g32-asym").await;
    assert_eq!(m["summary"]["method"], "rtn", "{m}");

    // The stored blocks against the definition, recomputed from the source weights.
    let out = tempfile::tempdir().unwrap();
    let bytes = app
        .get_bytes("/v1/models/tiny:rtn-4bit-g32-asym/artifacts/tiny-rtn-4bit-g32-asym.gguf")
        .await;
    std::fs::write(out.path().join("model.gguf"), &bytes).unwrap();
    let src_dir = tempfile::tempdir().unwrap();
    tiny::write_model(src_dir.path());
    let source = open_dir(src_dir.path());
    let stored = open_dir(out.path());
    let mut checked = 0;
    for t in &stored.tensors {
        let got = stored.read_f32(t).unwrap();
        let want = source.read_f32(source.tensor(&t.name).unwrap()).unwrap();
        if t.name.starts_with("blk.") && t.shape.len() == 2 {
            let expect: Vec<f32> = want.chunks(32).flat_map(|g| rtn_asym_group(g, 4)).collect();
            assert_eq!(got, expect, "{}", t.name);
            checked += 1;
        } else if t.shape.len() == 2 {
            let f16_round: Vec<f32> = want.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
            assert_eq!(got, f16_round, "{} stays F16", t.name);
        }
    }
    assert_eq!(checked, 14);

    let (status, r) = app
        .post_json(
            "/v1/completions",
            &json!({"model": "tiny:rtn-4bit-g32-asym", "prompt": "abc", "max_tokens": 4}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    app.stop().await;
}

/// The same definition with an integer zero point, as the GPTQ layout stores it:
/// s·(q − z) with s rounded to f16.
fn rtn_asym_group_integer_zero(w: &[f32], bits: u32) -> Vec<f32> {
    let maxq = ((1u32 << bits) - 1) as f32;
    let lo = w.iter().copied().fold(0f32, f32::min);
    let hi = w.iter().copied().fold(0f32, f32::max);
    let d = f16::from_f32((hi - lo) / maxq).to_f32();
    let zero = (-lo / d).round().clamp(0.0, maxq);
    w.iter()
        .map(|&x| d * (((x / d).round() + zero).clamp(0.0, maxq) - zero))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_3bit_job_is_stored_in_the_gptq_layout_and_served_with_the_dequantized_logits() {
    let app = TestApp::spawn().await;
    tiny::upload(&app, "tiny").await;
    let (status, job) = app
        .post_json(
            "/v1/jobs",
            &json!({"model": "tiny", "method": "rtn", "params": {"bits": 3, "group_size": 32, "sym": false}}),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    assert_eq!(job["plan"]["type_counts"], json!({"GPTQ_3": 14}));
    let bpw = job["plan"]["bits_per_weight"].as_f64().unwrap();
    // 3 bits + an f16 scale and a 3-bit zero per 32 weights + a 32-bit g_idx per column.
    assert!((3.5..4.2).contains(&bpw), "{bpw}");
    let done = app
        .wait_job(job["id"].as_str().unwrap(), Duration::from_secs(60))
        .await;
    assert_eq!(done["status"], "succeeded", "{done}");

    let out = tempfile::tempdir().unwrap();
    let bytes = app
        .get_bytes("/v1/models/tiny:rtn-3bit-g32-asym/artifacts/tiny-rtn-3bit-g32-asym.gguf")
        .await;
    std::fs::write(out.path().join("model.gguf"), &bytes).unwrap();
    let gguf = quantd::formats::gguf::GgufFile::open(&out.path().join("model.gguf")).unwrap();
    let qweight = gguf
        .tensor("blk.0.attn_q.qweight")
        .expect("layout parts in the GGUF");
    assert_eq!(qweight.dtype, quantd::formats::gguf::TensorType::I32);
    assert_eq!(qweight.shape, vec![64 * 3 / 32, 64]);
    assert!(gguf.tensor("blk.0.attn_q.weight").is_none());

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
        let expect: Vec<f32> = want
            .chunks(32)
            .flat_map(|g| rtn_asym_group_integer_zero(g, 3))
            .collect();
        let worst = got
            .iter()
            .zip(&expect)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert_eq!(worst, 0.0, "{}", t.name);
        checked += 1;
    }
    assert_eq!(checked, 14);

    // Served by the GPTQ-layout kernel, the logits are the dequantized weights' logits.
    let served = quantd::model::servable::load(&stored, 64).unwrap().llama;
    assert_eq!(served.blocks[0].down.kind(), "gptq-3bit");
    let dense_dir = out.path().join("dense");
    quantd::export::hf::write_hf_folder(
        &stored,
        &dense_dir,
        quantd::export::hf::HfDtype::F32,
        &|_, _| {},
    )
    .unwrap();
    let dense = quantd::model::servable::load(&open_dir(&dense_dir), 64)
        .unwrap()
        .llama;
    let prompt: Vec<u32> = (0..24).map(|i| (i * 37 % 250) as u32).collect();
    let a = logits(&served, &prompt, &mut KvCache::new(), true);
    let b = logits(&dense, &prompt, &mut KvCache::new(), true);
    let worst = a
        .iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(worst <= 1e-4, "max |Δlogit| {worst}");

    let (status, r) = app
        .post_json(
            "/v1/completions",
            &json!({"model": "tiny:rtn-3bit-g32-asym", "prompt": "abc", "max_tokens": 4}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    app.stop().await;
}

#[tokio::test]
async fn rtn_parameters_are_checked_by_name() {
    let app = TestApp::spawn().await;
    tiny::upload(&app, "tiny").await;
    for (params, field) in [
        (json!({"bits": 5}), "params.bits"),
        (json!({"bits": 1}), "params.bits"),
        (json!({"bits": 4, "group_size": 48}), "params.group_size"),
        (json!({"bits": 4, "act_order": true}), "params.act_order"),
    ] {
        let (status, r) = app
            .post_json(
                "/v1/jobs",
                &json!({"model": "tiny", "method": "rtn", "params": params}),
            )
            .await;
        assert_eq!(
            (status, r["error"]["param"].as_str()),
            (422, Some(field)),
            "{params} → {r}"
        );
    }
    app.stop().await;
}
