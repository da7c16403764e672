//! `quantd eval`: perplexity of a checkpoint on a text file by llama-perplexity's method, and,
//! with `--reference`, KL divergence from that model, top-1 agreement and Δppl (DESIGN §5),
//! with a progress bar.

use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::offline::open_path;
use crate::eval::{eval_tokens, evaluate, EvalSpec, EvalTokens};
use crate::model::servable;

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The model to score: an HF folder or a .gguf file.
    pub model: PathBuf,
    /// A UTF-8 text file (e.g. tests/corpus/eval-pride-and-prejudice.txt).
    #[arg(long)]
    pub text: PathBuf,
    /// A model with the same tokenizer to compare against (KL divergence, top-1, Δppl).
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Window length in tokens; the second half of each window is scored.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Score at most N tokens (DESIGN §5 `max_tokens`; e.g. 16384 takes 65 windows of 512).
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn eval(args: EvalArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.text)
        .with_context(|| format!("reading {}", args.text.display()))?;
    let model = servable::load(&open_path(&args.model)?, args.ctx)?;
    let reference = match &args.reference {
        Some(p) => {
            let r = servable::load(&open_path(p)?, args.ctx)?;
            anyhow::ensure!(
                r.llama.vocab_size() == model.llama.vocab_size(),
                "the reference has a vocabulary of {}, the model {}: they must share a tokenizer",
                r.llama.vocab_size(),
                model.llama.vocab_size()
            );
            Some(r)
        }
        None => None,
    };
    let EvalTokens { ids: tokens, bos } =
        eval_tokens(&model.tokenizer, &text).map_err(anyhow::Error::msg)?;
    let spec = EvalSpec {
        ctx: args.ctx,
        max_scored: args.max_tokens,
        bos,
    };
    let windows = spec.windows(tokens.len());
    let bar = ProgressBar::new(windows as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} windows {elapsed_precise} eta {eta}")
            .expect("static template"),
    );
    let started = std::time::Instant::now();
    let summary = evaluate(
        &model.llama,
        reference.as_ref().map(|r| &r.llama),
        &tokens,
        &spec,
        |done, _| {
            bar.set_position(done as u64);
            ControlFlow::Continue(())
        },
    )?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let outliers = model.llama.outlier_report();
    if args.json {
        let mut v = serde_json::to_value(&summary)?;
        v["ctx"] = serde_json::json!(args.ctx);
        v["windows"] = serde_json::json!(windows);
        v["text_tokens"] = serde_json::json!(tokens.len());
        v["seconds"] = serde_json::json!(secs);
        v["peak_rss_bytes"] = serde_json::json!(peak_rss_bytes());
        if !outliers.is_empty() {
            v["outliers"] = serde_json::to_value(&outliers)?;
        }
        println!("{v}");
        return Ok(());
    }
    println!(
        "{}: PPL {:.4} over {} scored tokens ({} windows of {}), {:.1} s",
        args.model.display(),
        summary.perplexity,
        summary.scored_tokens,
        windows,
        args.ctx,
        secs
    );
    if let (Some(r), Some(d)) = (summary.reference_perplexity, summary.delta_ppl_pct) {
        println!(
            "reference PPL {r:.4}  Δppl {d:+.3}%  KLD mean {:.6} median {:.6} p99 {:.6} max {:.6}  top-1 {:.2}%",
            summary.kld_mean.unwrap_or(0.0),
            summary.kld_median.unwrap_or(0.0),
            summary.kld_p99.unwrap_or(0.0),
            summary.kld_max.unwrap_or(0.0),
            summary.top1_agreement_pct.unwrap_or(0.0)
        );
    }
    if let Some(top) = outliers
        .iter()
        .max_by(|a, b| a.counts.mean_columns.total_cmp(&b.counts.mean_columns))
    {
        let with = outliers.iter().filter(|l| l.counts.max_columns > 0).count();
        println!(
            "LLM.int8() outlier columns: in {with} of {} linears; most in {} ({:.1} per call, max {})",
            outliers.len(),
            top.tensor,
            top.counts.mean_columns,
            top.counts.max_columns
        );
    }
    Ok(())
}

/// The process's peak resident set (Linux `VmHWM`), so runs of different lengths can show that
/// memory does not grow with the tokens scored.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
