//! `nf4` and `fp4` jobs on a tiny generated model: bitsandbytes' 4-bit blocks stored as the
//! definition gives them (recomputed here from the source weights), served by the table-lookup
//! kernel with the dequantized weights' logits, exported in transformers' bitsandbytes layout
//! that decodes to the same weights, and parameters refused by name.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::models::{dense_twin, logits, open_dir};
use common::{tiny, TestApp};
use quantd::formats::gguf::{GgufFile, TensorType};
use quantd::nn::{KvCache, Llama};
use serde_json::json;

/// bitsandbytes' NF4 table.
const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// One block by the definition: absmax, then each x·(1/absmax) to the nearest NF4 value
/// (the lower one on a tie), times absmax.
fn nf4_block(w: &[f32]) -> Vec<f32> {
    let am = w.iter().fold(0f32, |m, v| m.max(v.abs()));
    w.iter()
        .map(|&x| {
            let s = (x * (1.0 / am)).clamp(-1.0, 1.0);
            // The first of the nearest values in ascending order: the lower one on a tie.
            let best = NF4
                .iter()
                .copied()
                .reduce(|b, v| if (v - s).abs() < (b - s).abs() { v } else { b })
                .unwrap();
            best * am
        })
        .collect()
}

async fn run_job(
    app: &TestApp,
    body: serde_json::Value,
    variant: &str,
    types: serde_json::Value,
) -> tempfile::TempDir {
    let (status, job) = app.post_json("/v1/jobs", &body).await;
    assert_eq!(status, 202, "{job}");
    assert_eq!(job["output_name"], format!("tiny:{variant}"));
    assert_eq!(job["plan"]["type_counts"], types);
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

/// The served model against its dense twin: prompts of 40 rows take dequantize + gemm and
/// must agree to rounding; 24 rows take the kernel's 8-bit loop (activations in blocks of 32,
/// the table in 8 bits), which the kernel's unit test bounds, and here stay within 2 % of the
/// logits' scale.
fn assert_same_logits(a: &Llama, b: &Llama) {
    let prompt: Vec<u32> = (0..24).map(|i| (i * 37 % 250) as u32).collect();
    for gemm in [true, false] {
        let p: Vec<u32> = if gemm {
            prompt.repeat(2)[..40].to_vec()
        } else {
            prompt.clone()
        };
        let x = logits(a, &p, &mut KvCache::new(), true);
        let y = logits(b, &p, &mut KvCache::new(), true);
        let worst = x
            .iter()
            .flatten()
            .zip(y.iter().flatten())
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        let scale = y.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
        let budget = if gemm { 1e-4 } else { 0.02 * scale };
        assert!(
            worst <= budget,
            "{} rows: max |Δlogit| {worst} of {scale}",
            p.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nf4_job_stores_bitsandbytes_blocks_and_serves_the_dequantized_logits() {
    let app = TestApp::spawn().await;
    tiny::upload(&app, "tiny").await;
    let body = json!({"model": "tiny", "method": "nf4"});
    let out = run_job(&app, body, "nf4", json!({"NF4": 14})).await;
    let gguf = GgufFile::open(&out.path().join("model.gguf")).unwrap();
    let packed = gguf
        .tensor("blk.0.ffn_down.bnb4_weight")
        .expect("bnb4 parts");
    assert_eq!(
        (packed.dtype, packed.shape.clone()),
        (TensorType::I8, vec![64, 64])
    );
    let absmax = gguf.tensor("blk.0.ffn_down.bnb4_absmax").unwrap();
    assert_eq!(absmax.shape, vec![64 * 128 / 64]);
    assert!(gguf.tensor("blk.0.ffn_down.weight").is_none());

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
        let expect: Vec<f32> = want.chunks(64).flat_map(nf4_block).collect();
        assert_eq!(got, expect, "{}", t.name);
        checked += 1;
    }
    assert_eq!(checked, 14);
    let served = quantd::model::servable::load(&stored, 64).unwrap().llama;
    assert_eq!(served.blocks[0].v.kind(), "nf4");
    assert_same_logits(&served, &dense_twin(&stored, out.path()));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fp4_with_double_quantization_is_served_and_exported_for_bitsandbytes() {
    let app = TestApp::spawn().await;
    tiny::upload(&app, "tiny").await;
    let body = json!({"model": "tiny", "method": "fp4", "params": {"double_quant": true},
                      "outputs": ["gguf", "bnb-safetensors"]});
    let out = run_job(&app, body, "fp4-dq", json!({"FP4_DQ": 14})).await;
    let gguf = GgufFile::open(&out.path().join("model.gguf")).unwrap();
    let codes = gguf.tensor("blk.1.attn_q.bnb4_absmax").unwrap();
    assert_eq!(codes.dtype, TensorType::I8, "8-bit absmax codes");
    assert!(gguf.tensor("blk.1.attn_q.bnb4_absmax_code").is_some());
    let stored = open_dir(out.path());
    let served = quantd::model::servable::load(&stored, 64).unwrap().llama;
    assert_eq!(served.blocks[1].q.kind(), "fp4-dq");
    assert_same_logits(&served, &dense_twin(&stored, out.path()));

    // The export: transformers' names and bitsandbytes' quant state.
    let tar = app
        .get_bytes("/v1/models/tiny:fp4-dq/artifacts/tiny-fp4-dq.bnb.tar")
        .await;
    let dir = tempfile::tempdir().unwrap();
    tar::Archive::new(&tar[..]).unpack(dir.path()).unwrap();
    let folder = dir.path().join("tiny-fp4-dq-bnb");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(folder.join("config.json")).unwrap()).unwrap();
    let qc = &config["quantization_config"];
    assert_eq!(qc["quant_method"], "bitsandbytes");
    assert_eq!(qc["bnb_4bit_quant_type"], "fp4");
    assert_eq!(qc["bnb_4bit_use_double_quant"], true);
    let st = std::fs::read(folder.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let header: HashMap<String, serde_json::Value> = serde_json::from_slice(&st[8..8 + n]).unwrap();
    let data = &st[8 + n..];
    let tensor = |name: &str| -> (&serde_json::Value, &[u8]) {
        let e = &header[name];
        let (a, b) = (
            e["data_offsets"][0].as_u64().unwrap() as usize,
            e["data_offsets"][1].as_u64().unwrap() as usize,
        );
        (e, &data[a..b])
    };
    let p = "model.layers.0.mlp.down_proj.weight";
    let (e, packed) = tensor(p);
    assert_eq!(
        (e["dtype"].as_str(), &e["shape"]),
        (Some("U8"), &json!([64 * 128 / 2, 1]))
    );
    let (e, _) = tensor(&format!("{p}.absmax"));
    assert_eq!(e["dtype"], "U8");
    for part in ["nested_absmax", "nested_quant_map", "quant_map"] {
        assert_eq!(tensor(&format!("{p}.{part}")).0["dtype"], "F32", "{part}");
    }
    let (_, state) = tensor(&format!("{p}.quant_state.bitsandbytes__fp4"));
    let state: serde_json::Value = serde_json::from_slice(state).unwrap();
    assert_eq!(state["quant_type"], "fp4");
    assert_eq!(state["blocksize"], 64);
    assert_eq!(state["shape"], json!([64, 128]));
    assert_eq!(state["nested_blocksize"], 256);
    // Decoding the export as bitsandbytes does gives the served weights (down_proj is not
    // permuted, so its bytes are exact).
    let f32s = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let quant_map = f32s(tensor(&format!("{p}.quant_map")).1);
    let nested_map = f32s(tensor(&format!("{p}.nested_quant_map")).1);
    let nested_absmax = f32s(tensor(&format!("{p}.nested_absmax")).1);
    let codes = tensor(&format!("{p}.absmax")).1;
    let offset = state["nested_offset"].as_f64().unwrap() as f32;
    let absmax: Vec<f32> = codes
        .iter()
        .enumerate()
        .map(|(b, &q)| nested_map[q as usize] * nested_absmax[b / 256] + offset)
        .collect();
    let decoded: Vec<f32> = packed
        .iter()
        .enumerate()
        .flat_map(|(i, &byte)| {
            let am = absmax[2 * i / 64];
            [
                quant_map[(byte >> 4) as usize] * am,
                quant_map[(byte & 15) as usize] * am,
            ]
        })
        .collect();
    let served_down = stored
        .read_f32(stored.tensor("blk.0.ffn_down.weight").unwrap())
        .unwrap();
    assert_eq!(decoded, served_down);
    // Non-quantized tensors keep their transformers names.
    assert!(header.contains_key("model.embed_tokens.weight"));
    app.stop().await;
}

#[tokio::test]
async fn nf4_parameters_and_outputs_are_checked_by_name() {
    let app = TestApp::spawn().await;
    tiny::upload(&app, "tiny").await;
    for (body, field) in [
        (
            json!({"method": "nf4", "params": {"block_size": 48}}),
            "params.block_size",
        ),
        (
            json!({"method": "fp4", "params": {"double_quant": "yes"}}),
            "params.double_quant",
        ),
        (
            json!({"method": "nf4", "params": {"bits": 4}}),
            "params.bits",
        ),
        (json!({"method": "nf4", "outputs": ["gptq"]}), "outputs"),
        (
            json!({"method": "rtn", "params": {"bits": 4}, "outputs": ["bnb"]}),
            "outputs",
        ),
    ] {
        let mut body = body;
        body["model"] = json!("tiny");
        let (status, r) = app.post_json("/v1/jobs", &body).await;
        assert_eq!(
            (status, r["error"]["param"].as_str()),
            (422, Some(field)),
            "{body} → {r}"
        );
    }
    app.stop().await;
}
