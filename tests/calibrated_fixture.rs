//! GPTQ and AWQ on the real SmolLM2-135M fixture, calibrated on `calib-emma.txt` and scored on
//! the eval text against the f32 model, beside round-to-nearest with the same groups: both
//! must lose clearly less than RTN. Settings are far smaller than the measurement (4
//! windows of 256 tokens to calibrate, an AWQ grid of 10, 4 windows of 512 to score) so it runs in
//! the default suite: about 5 minutes in the dev profile on two vCPUs (RTN 22 s, GPTQ 83 s, AWQ
//! 204 s; measured GPTQ 0.35× and AWQ 0.37× of RTN's Δppl). The closing notes hold the full-size
//! numbers (128 × 512, 16,384 scored tokens).
//!
//! Also: a GPTQ file served from its GGML blocks computes the same logits as the same model with
//! the blocks dequantized to f32.

mod common;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use common::models::open_dir;
use quantd::eval::{eval_tokens, evaluate, EvalSpec, Summary};
use quantd::export::gguf_meta;
use quantd::export::hf::{write_hf_folder, HfDtype};
use quantd::jobs::calibrate::{calibrate, Calibrated, CalibrationSource};
use quantd::jobs::pipeline::{quantize_gguf, Hooks};
use quantd::jobs::spec::{AwqParams, CalibrationParams, GptqParams, MethodSpec, RtnParams};
use quantd::jobs::submit::quantization_plan;
use quantd::model::checkpoint::Checkpoint;
use quantd::model::servable;
use quantd::nn::{KvCache, Llama, Logits, SeqStep};

/// Calibration windows of 256 tokens. AWQ's scale search costs samples × grid forward passes of
/// each block, so these two set the test's time.
const CALIBRATION_SAMPLES: usize = 4;
/// Points of AWQ's scale grid (AutoAWQ's default is 20).
const AWQ_GRID: usize = 10;

struct Quiet;

impl Hooks for Quiet {
    fn progress(&self, _: &'static str, _: u64, _: u64, _: &'static str) {}
    fn cancelled(&self) -> bool {
        false
    }
}

/// Quantizes the fixture with `method` (calibrating when it does) into `dir/model.gguf`.
fn quantize(base: &Checkpoint, method: &MethodSpec, dir: &Path) -> PathBuf {
    let plan = quantization_plan(method, base, 2).unwrap();
    let calibrated = if method.calibrates() {
        let params = CalibrationParams {
            dataset: Some("calib-emma.txt".into()),
            samples: CALIBRATION_SAMPLES,
            seq_len: 256,
            seed: 0,
        };
        let text = common::corpus("calib-emma.txt", usize::MAX);
        let from = CalibrationSource::Text {
            text: &text,
            name: "calib-emma.txt",
        };
        calibrate(base, method, &plan, from, &params, &Quiet)
            .unwrap()
            .0
    } else {
        Calibrated::default()
    };
    let metadata = gguf_meta::model_metadata(base, "smollm2", plan.file_type, true).unwrap();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("model.gguf");
    quantize_gguf(base, &plan, calibrated, &metadata, &path, &pool, &Quiet).unwrap();
    path
}

fn score(model: &Llama, reference: &Llama, tokens: &[u32]) -> Summary {
    let spec = EvalSpec {
        ctx: 512,
        max_scored: Some(4 * 255),
        bos: None,
    };
    evaluate(model, Some(reference), tokens, &spec, |_, _| {
        ControlFlow::Continue(())
    })
    .unwrap()
}

#[test]
fn gptq_and_awq_lose_clearly_less_than_round_to_nearest() {
    let base_dir = common::fixture().join("hf-f32");
    let base = open_dir(&base_dir);
    let reference = servable::load(&base, 512).unwrap();
    let tokens = eval_tokens(
        &reference.tokenizer,
        &common::corpus("eval-pride-and-prejudice.txt", usize::MAX),
    )
    .unwrap()
    .ids;
    // 4-bit, groups of 128, asymmetric: the comparison.
    let (bits, group_size, sym) = (4, 128, false);
    let methods = [
        MethodSpec::Rtn(RtnParams {
            bits,
            group_size,
            sym,
        }),
        MethodSpec::Gptq(GptqParams {
            bits,
            group_size,
            sym,
            act_order: true,
            static_groups: None,
            damp_percent: 0.01,
            true_sequential: true,
        }),
        MethodSpec::Awq(AwqParams {
            bits,
            group_size,
            zero_point: !sym,
            grid: AWQ_GRID,
            duo_scaling: false,
            clip: true,
        }),
    ];
    let work = tempfile::tempdir().unwrap();
    let mut delta = Vec::new();
    for method in &methods {
        let started = std::time::Instant::now();
        let dir = work.path().join(method.name());
        let path = quantize(&base, method, &dir);
        let ckpt = open_dir(path.parent().unwrap());
        let model = servable::load(&ckpt, 512).unwrap();
        let s = score(&model.llama, &reference.llama, &tokens);
        eprintln!(
            "{} ({:.0}s): PPL {:.4} (base {:.4}), Δppl {:+.2}%, KLD {:.4}, top-1 {:.2}%",
            method.name(),
            started.elapsed().as_secs_f64(),
            s.perplexity,
            s.reference_perplexity.unwrap(),
            s.delta_ppl_pct.unwrap(),
            s.kld_mean.unwrap(),
            s.top1_agreement_pct.unwrap()
        );
        delta.push(s.delta_ppl_pct.unwrap());
        if method.name() == "gptq" {
            served_blocks_match_dequantized_weights(&ckpt, &model.llama, &tokens, work.path());
        }
    }
    let (rtn, gptq, awq) = (delta[0], delta[1], delta[2]);
    assert!(rtn > 5.0, "RTN 4-bit should lose visibly: Δppl {rtn}");
    // The budgets (measured here: GPTQ 0.34×, AWQ 0.39× of RTN's Δppl).
    assert!(gptq <= 0.6 * rtn, "GPTQ Δppl {gptq} vs RTN {rtn}");
    assert!(awq <= 0.7 * rtn, "AWQ Δppl {awq} vs RTN {rtn}");
}

/// A prompt through the GGML blocks against the same weights dequantized into an f32 HF
/// folder: the blocks hold exactly the values GPTQ chose, and prompt rows run on them as f32.
fn served_blocks_match_dequantized_weights(
    ckpt: &Checkpoint,
    served: &Llama,
    tokens: &[u32],
    work: &Path,
) {
    let dense_dir = work.join("gptq-f32");
    write_hf_folder(ckpt, &dense_dir, HfDtype::F32, &|_, _| {}).unwrap();
    let dense = servable::load(&open_dir(&dense_dir), 512).unwrap().llama;
    let prompt = &tokens[..64];
    let logits = |m: &Llama| -> Vec<f32> {
        let mut cache = KvCache::new();
        m.forward(
            &mut [SeqStep {
                tokens: prompt,
                cache: &mut cache,
                logits: Logits::From(0),
            }],
            None,
        )
        .unwrap()[0]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let (a, b) = (logits(served), logits(&dense));
    let max = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    eprintln!("GPTQ blocks vs dequantized f32, 64-token prompt: max |Δlogit| {max:e}");
    assert!(max <= 1e-4, "max |Δlogit| {max}");
}
