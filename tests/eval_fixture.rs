//! Perplexity by llama-perplexity's method on the real eval text, against an independent
//! implementation (candle-transformers' `llama`, fed the same windows), and the evaluator's
//! memory staying flat as the text grows.

mod common;

use std::path::PathBuf;
use std::process::Command;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_transformers::models::llama as reference;
use common::models::{open_dir, reference_llama};
use quantd::eval::{evaluate, EvalSpec};
use quantd::model::servable;

fn eval_text() -> PathBuf {
    common::repo_root().join("tests/corpus/eval-pride-and-prejudice.txt")
}

fn tokens(n: usize) -> Vec<u32> {
    let dir = common::fixture().join("hf-f32");
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let text = std::fs::read_to_string(eval_text()).unwrap();
    let ids = tok.encode(text.as_str(), false).unwrap().get_ids().to_vec();
    ids[..n].to_vec()
}

fn log_softmax_at(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    logits[target as usize] as f64 - max - z.ln()
}

/// The same windows and scored positions, computed with candle-transformers: each window's
/// first half as one prompt, then one token at a time.
fn reference_perplexity(ids: &[u32], ctx: usize) -> f64 {
    let dev = Device::Cpu;
    let (model, cfg) = reference_llama(&common::fixture().join("hf-f32"));
    let first = ctx / 2;
    let (mut nll, mut n) = (0f64, 0usize);
    for window in ids.chunks_exact(ctx) {
        let mut cache = reference::Cache::new(true, DType::F32, &cfg, &dev).unwrap();
        let prompt = Tensor::new(&window[..=first], &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let mut logits = model.forward(&prompt, 0, &mut cache).unwrap();
        for j in first..ctx - 1 {
            let row = logits.i(0).unwrap().to_vec1::<f32>().unwrap();
            nll -= log_softmax_at(&row, window[j + 1]);
            n += 1;
            if j + 1 < ctx - 1 {
                let x = Tensor::new(&[window[j + 1]], &dev)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap();
                logits = model.forward(&x, j + 1, &mut cache).unwrap();
            }
        }
    }
    (nll / n as f64).exp()
}

#[test]
fn perplexity_matches_candle_transformers_on_the_eval_text() {
    let ctx = 512;
    let ids = tokens(2 * ctx);
    let ckpt = open_dir(&common::fixture().join("hf-f32"));
    let llama = servable::load_llama(&ckpt, ctx).unwrap();
    let spec = EvalSpec {
        ctx,
        max_scored: None,
        bos: None,
    };
    let ours = evaluate(&llama, Some(&llama), &ids, &spec, |_, _| {
        std::ops::ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(
        ours.scored_tokens,
        2 * 255,
        "llama-perplexity scores ctx/2 - 1 per window"
    );
    // Against itself: no divergence, full agreement.
    assert!(ours.kld_max.unwrap().abs() <= 1e-6, "{ours:?}");
    assert_eq!(ours.top1_agreement_pct, Some(100.0));
    let want = reference_perplexity(&ids, ctx);
    let rel = (ours.perplexity / want - 1.0).abs();
    eprintln!(
        "quantd PPL {:.4}, candle-transformers PPL {want:.4}, rel diff {rel:e}",
        ours.perplexity
    );
    assert!(
        rel < 0.005,
        "quantd {} vs reference {want}",
        ours.perplexity
    );
    assert!((5.0..60.0).contains(&ours.perplexity), "{ours:?}");
}

fn eval_json(tokens: usize) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_quantd"))
        .arg("eval")
        .arg(common::fixture().join("gguf/SmolLM2-135M-Instruct.Q4_1.gguf"))
        .arg("--text")
        .arg(eval_text())
        .args([
            "--ctx",
            "256",
            "--max-tokens",
            &tokens.to_string(),
            "--json",
        ])
        .output()
        .expect("quantd eval runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

#[test]
fn eval_memory_does_not_grow_with_the_tokens_scored() {
    // ctx 256 scores 127 tokens per window.
    let small = eval_json(2 * 127);
    let large = eval_json(16 * 127);
    assert_eq!(small["windows"], 2);
    assert_eq!(large["windows"], 16);
    assert_eq!(large["scored_tokens"], 16 * 127);
    let (a, b) = (
        small["peak_rss_bytes"].as_u64().unwrap(),
        large["peak_rss_bytes"].as_u64().unwrap(),
    );
    eprintln!(
        "peak RSS: 2 windows {} MiB, 16 windows {} MiB",
        a >> 20,
        b >> 20
    );
    // Eight times the tokens, the same memory (a little slack for the allocator).
    assert!(b <= a + (16 << 20), "2 windows {a} B, 16 windows {b} B");
}
