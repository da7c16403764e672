//! `quantd bench`: inference speed of one checkpoint, measured the way llama-bench does, so
//! `scripts/bench/serve_vs_llama_cpp.py` can put it beside llama.cpp in the same run:
//! pp = one prompt of N tokens from an empty cache, tg = M tokens decoded one at a time at
//! batch 1, plus the aggregate rate of K concurrent greedy streams through the engine's own
//! scheduler (continuous batching) against one stream through the same path.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use serde_json::json;

use super::offline::open_path;
use crate::config::Settings;
use crate::engine::{Engine, GenerateRequest, LoadedModel, ModelKey, SamplingParams, SeqEvent};
use crate::eval::speed::{median, samples, synthetic_tokens};
use crate::model::servable;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// An HF folder or a .gguf file.
    pub input: PathBuf,
    /// Prompt-processing length (pp).
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Tokens decoded at batch 1 (tg).
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: usize,
    /// Repetitions of each measurement; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Concurrent streams for the aggregate measurement (0 skips it).
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Tokens/s of `streams` greedy sequences of `n` tokens each, all through the scheduler.
async fn through_engine(model: &LoadedModel, streams: usize, n: usize) -> anyhow::Result<f64> {
    let vocab = model.servable.llama.vocab_size();
    let start = Instant::now();
    let mut receivers = Vec::new();
    for s in 0..streams {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        model.submit(GenerateRequest {
            prompt: synthetic_tokens(8, vocab, s + 1),
            sampling: SamplingParams {
                temperature: 0.0,
                ..Default::default()
            },
            max_tokens: n,
            stop: Vec::new(),
            logprobs: None,
            prompt_logprobs: false,
            ignore_eos: true,
            events: tx,
        })?;
        receivers.push(rx);
    }
    let mut generated = 0;
    for mut rx in receivers {
        while let Some(e) = rx.recv().await {
            match e {
                SeqEvent::Done {
                    completion_tokens, ..
                } => {
                    generated += completion_tokens;
                    break;
                }
                SeqEvent::Error(m) => anyhow::bail!(m),
                _ => {}
            }
        }
    }
    Ok(generated as f64 / start.elapsed().as_secs_f64())
}

pub fn bench(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.repeat > 0, "--repeat must be at least 1");
    let ckpt = open_path(&args.input)?;
    let started = Instant::now();
    let max_positions = args.prompt_tokens.max(args.gen_tokens + 16) + 1;
    let model = servable::load(&ckpt, max_positions)?;
    let load_secs = started.elapsed().as_secs_f64();
    let weight_bytes = model.llama.weight_bytes();

    let (pp, tg) = samples(
        &model.llama,
        args.prompt_tokens,
        args.gen_tokens,
        args.repeat,
    )?;

    let mut single = Vec::new();
    let mut multi = Vec::new();
    if args.concurrency > 0 {
        let mut settings = Settings::defaults().engine;
        settings.max_batch = settings.max_batch.max(args.concurrency);
        settings.max_context = max_positions;
        let engine = Engine::new(settings);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let key = ModelKey {
            id: "bench".into(),
            revision: "bench".into(),
        };
        let loaded = rt
            .block_on(engine.get_or_load(engine.ticket(&key.id), &key, || async move { Ok(model) }))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        for _ in 0..args.repeat {
            single.push(rt.block_on(through_engine(&loaded, 1, args.gen_tokens))?);
            multi.push(rt.block_on(through_engine(&loaded, args.concurrency, args.gen_tokens))?);
        }
    }

    let report = json!({
        "input": args.input,
        "weight_bytes": weight_bytes,
        "load_secs": load_secs,
        "threads": candle_core::utils::get_num_threads(),
        "simd": crate::telemetry::SimdReport::detect(),
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "pp_tok_s": pp,
        "tg_tok_s": tg,
        "pp_median": median(pp.clone()),
        "tg_median": median(tg.clone()),
        "concurrency": args.concurrency,
        "engine_single_tok_s": single,
        "engine_concurrent_tok_s": multi,
        "engine_single_median": if single.is_empty() { None } else { Some(median(single.clone())) },
        "engine_concurrent_median": if multi.is_empty() { None } else { Some(median(multi.clone())) },
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "{}: {:.1} MiB of weights, loaded in {:.2} s",
            args.input.display(),
            weight_bytes as f64 / (1 << 20) as f64,
            load_secs
        );
        println!(
            "pp{}: {:.1} tok/s   tg{}: {:.1} tok/s   (medians of {})",
            args.prompt_tokens,
            median(pp),
            args.gen_tokens,
            median(tg),
            args.repeat
        );
        if !single.is_empty() {
            let (s, m) = (median(single), median(multi));
            println!(
                "engine: 1 stream {s:.1} tok/s, {} streams {m:.1} tok/s aggregate ({:.2}x)",
                args.concurrency,
                m / s
            );
        }
    }
    Ok(())
}
