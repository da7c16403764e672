//! The decoder's logits against an independent implementation: candle-transformers' `llama`
//! (HF layout, rotate-half RoPE, its own attention and KV cache) on the SmolLM2 HF f32
//! fixture. quantd runs the GGUF layout (permuted Q/K, interleaved RoPE), so agreement also
//! checks the permutation.

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::llama as reference;
use quantd::model::checkpoint::{CheckLimits, Checkpoint};
use quantd::model::servable;
use quantd::nn::{KvCache, SeqStep};

const PROMPT_TEXT: &str = "The capital of France is Paris. The Eiffel Tower";

fn prompt(dir: &std::path::Path) -> Vec<u32> {
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    tok.encode(PROMPT_TEXT, true).unwrap().get_ids().to_vec()
}

fn open(dir: &std::path::Path) -> Checkpoint {
    let files: BTreeMap<String, std::path::PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().to_string_lossy().into_owned(), e.path())
        })
        .collect();
    Checkpoint::open(
        &files,
        CheckLimits {
            max_safetensors_header: 100_000_000,
            max_tokenizer: 64 << 20,
            max_small_json: 4 << 20,
        },
    )
    .unwrap()
}

/// Reference logits for every position, feeding one token at a time through its KV cache
/// (its forward returns only the last position).
fn reference_logits(dir: &std::path::Path, prompt: &[u32]) -> Vec<Vec<f32>> {
    let dev = Device::Cpu;
    let cfg: reference::LlamaConfig =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let cfg = cfg.into_config(false);
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &dev)
            .unwrap()
    };
    let model = reference::Llama::load(vb, &cfg).unwrap();
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

#[test]
fn smollm2_f32_logits_match_candle_transformers_llama() {
    let dir = common::fixture().join("hf-f32");
    let ckpt = open(&dir);
    let prompt = prompt(&dir);
    assert!(prompt.len() > 8);
    let llama = servable::load_llama(&ckpt, 512).unwrap();
    let mut cache = KvCache::new();
    // The whole prompt in one prefill, all positions' logits.
    let ours = llama
        .forward(
            &mut [SeqStep {
                tokens: &prompt,
                cache: &mut cache,
                all_logits: true,
            }],
            None,
        )
        .unwrap()
        .remove(0)
        .to_vec2::<f32>()
        .unwrap();
    let want = reference_logits(&dir, &prompt);
    let mut max_diff = 0f32;
    for (a, b) in ours.iter().zip(&want) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            max_diff = max_diff.max((x - y).abs());
        }
    }
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
        last = llama
            .forward(
                &mut [SeqStep {
                    tokens: chunk,
                    cache: &mut cache,
                    all_logits: false,
                }],
                None,
            )
            .unwrap()
            .remove(0)
            .to_vec2::<f32>()
            .unwrap()
            .remove(0);
    }
    let diff = last
        .iter()
        .zip(want.last().unwrap())
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(diff <= 1e-3, "chunked prefill diff {diff}");

    // Pure decoding, one token per step (the engine's single-token attention path), matches
    // at every position.
    let mut cache = KvCache::new();
    let mut max_diff = 0f32;
    for (pos, tok) in prompt.iter().enumerate() {
        let row = llama
            .forward(
                &mut [SeqStep {
                    tokens: std::slice::from_ref(tok),
                    cache: &mut cache,
                    all_logits: false,
                }],
                None,
            )
            .unwrap()
            .remove(0)
            .to_vec2::<f32>()
            .unwrap()
            .remove(0);
        for (x, y) in row.iter().zip(&want[pos]) {
            max_diff = max_diff.max((x - y).abs());
        }
    }
    eprintln!("token-by-token decoding: max diff {max_diff:e}");
    assert!(max_diff <= 1e-3, "token-by-token diff {max_diff}");
}
