//! Loading checkpoints straight from a folder and running the decoder in tests, plus the
//! independent reference (candle-transformers' `llama`) that accuracy tests compare against.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use candle_transformers::models::llama as reference;
use quantd::model::checkpoint::{CheckLimits, Checkpoint};
use quantd::nn::{KvCache, Llama, Logits, SeqStep};

/// Opens every file of `dir` as one checkpoint, with generous limits.
pub fn open_dir(dir: &Path) -> Checkpoint {
    let files: BTreeMap<String, PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (p.file_name().unwrap().to_string_lossy().into_owned(), p)
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

/// `stored` with every weight dequantized to f32 (written under `dir/dense`) and served densely:
/// what a quantized variant's kernels must agree with.
pub fn dense_twin(stored: &Checkpoint, dir: &Path) -> Llama {
    let dense_dir = dir.join("dense");
    quantd::export::hf::write_hf_folder(
        stored,
        &dense_dir,
        quantd::export::hf::HfDtype::F32,
        &|_, _| {},
    )
    .unwrap();
    quantd::model::servable::load(&open_dir(&dense_dir), 64)
        .unwrap()
        .llama
}

/// One sequence through the decoder: its logits rows (the last, or one per token).
pub fn logits(
    llama: &Llama,
    tokens: &[u32],
    cache: &mut KvCache,
    all_logits: bool,
) -> Vec<Vec<f32>> {
    llama
        .forward(
            &mut [SeqStep {
                tokens,
                cache,
                logits: if all_logits {
                    Logits::From(0)
                } else {
                    Logits::Last
                },
            }],
            None,
        )
        .unwrap()
        .remove(0)
        .to_vec2::<f32>()
        .unwrap()
}

/// candle-transformers' llama on an HF f32 folder, with its config.
pub fn reference_llama(dir: &Path) -> (reference::Llama, reference::Config) {
    let cfg: reference::LlamaConfig =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let cfg = cfg.into_config(false);
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    (reference::Llama::load(vb, &cfg).unwrap(), cfg)
}
