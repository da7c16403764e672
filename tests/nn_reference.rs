//! The decoder's logits against an independent implementation: candle-transformers' `llama`
//! (HF layout, rotate-half RoPE, its own attention and KV cache) on the SmolLM2 HF f32
//! fixture. quantd runs the GGUF layout (permuted Q/K, interleaved RoPE), so agreement also
//! checks the permutation.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_transformers::models::llama as reference;
use common::models::{logits, open_dir, reference_llama};
use quantd::model::servable;
use quantd::nn::KvCache;

const PROMPT_TEXT: &str = "The capital of France is Paris. The Eiffel Tower";

fn prompt(dir: &std::path::Path) -> Vec<u32> {
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    tok.encode(PROMPT_TEXT, true).unwrap().get_ids().to_vec()
}

/// Reference logits for every position, feeding one token at a time through its KV cache
/// (its forward returns only the last position).
fn reference_logits(dir: &std::path::Path, prompt: &[u32]) -> Vec<Vec<f32>> {
    let dev = Device::Cpu;
    let (model, cfg) = reference_llama(dir);
    let mut cache = reference::Cache::new(true, DType::F32, &cfg, &dev).unwrap();
    prompt
        .iter()
        .enumerate()
        .map(|(pos, &tok)| {
            let x = Tensor::new(&[tok], &dev).unwrap().unsqueeze(0).unwrap();
            let logits = model.forward(&x, pos, &mut cache).unwrap();
            logits.i(0).unwrap().to_vec1::<f32>().unwrap()
        })
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

#[test]
fn smollm2_f32_logits_match_candle_transformers_llama() {
    let dir = common::fixture().join("hf-f32");
    let ckpt = open_dir(&dir);
    let prompt = prompt(&dir);
    assert!(prompt.len() > 8);
    let llama = servable::load_llama(&ckpt, 512).unwrap();
    // The whole prompt in one prefill, all positions' logits.
    let ours = logits(&llama, &prompt, &mut KvCache::new(), true);
    let want = reference_logits(&dir, &prompt);
    assert_eq!(ours.len(), want.len());
    let max_diff = ours
        .iter()
        .zip(&want)
        .map(|(a, b)| max_abs_diff(a, b))
        .fold(0f32, f32::max);
    eprintln!(
        "max |quantd - candle-transformers| over {} positions: {max_diff:e}",
        prompt.len()
    );
    assert!(max_diff <= 1e-3, "max abs diff {max_diff}");
    // Sanity: the logits are real (not all zero) and differ between positions.
    assert!(ours[0].iter().any(|v| v.abs() > 1.0));
    assert_ne!(ours[0], ours[1]);

    // Decoding token by token after a shorter prefill gives the same last-position logits.
    let mut cache = KvCache::new();
    let mut last = Vec::new();
    for chunk in [&prompt[..5], &prompt[5..6], &prompt[6..]] {
        last = logits(&llama, chunk, &mut cache, false).remove(0);
    }
    let diff = max_abs_diff(&last, want.last().unwrap());
    assert!(diff <= 1e-3, "chunked prefill diff {diff}");

    // Pure decoding, one token per step (the engine's single-token attention path), matches
    // at every position.
    let mut cache = KvCache::new();
    let mut max_diff = 0f32;
    for (pos, tok) in prompt.iter().enumerate() {
        let row = logits(&llama, std::slice::from_ref(tok), &mut cache, false).remove(0);
        max_diff = max_diff.max(max_abs_diff(&row, &want[pos]));
    }
    eprintln!("token-by-token decoding: max diff {max_diff:e}");
    assert!(max_diff <= 1e-3, "token-by-token diff {max_diff}");
}
