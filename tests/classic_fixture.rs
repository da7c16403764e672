//! The classic methods on the real model (SmolLM2-135M f32), scored against it on 2,048 tokens
//! of the eval text by `quantd eval`: the accuracy budgets of issue 6 that need no peer.
//! (The peers' numbers, PyTorch `quantize_dynamic` and bitsandbytes, come from
//! `scripts/peers/int8_reference.py` and `bnb_reference.py`, which need torch; see
//! scripts/peers/README.md.)
//!
//! - LLM.int8() stays within 2 % of the base perplexity.
//! - int8 with per-token activations loses a tenth or less of what PyTorch's per-call scale
//!   loses (the LLM.int8() paper's point), and stays within 4 %.
//! - NF4 (block 64) is no worse than round-to-nearest 4-bit symmetric with blocks of 64
//!   (QLoRA's finding); double quantization moves perplexity by at most 0.5 %.

mod common;

use std::path::Path;
use std::process::Command;

fn quantd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_quantd"))
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("quantd runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Quantizes the f32 fixture with `args` into `dir/name.gguf` and scores it: (PPL, Δppl %).
fn quantize_and_score(dir: &Path, name: &str, args: &[&str]) -> (f64, f64) {
    let model = common::fixture().join("hf-f32");
    let file = dir.join(format!("{name}.gguf"));
    run(quantd()
        .arg("quantize")
        .arg(&model)
        .args(args)
        .arg("--out")
        .arg(&file));
    let out = run(quantd()
        .arg("eval")
        .arg(&file)
        .arg("--reference")
        .arg(&model)
        .arg("--text")
        .arg(common::repo_root().join("tests/corpus/eval-pride-and-prejudice.txt"))
        .args(["--max-tokens", "2048", "--json"]));
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let ppl = v["perplexity"].as_f64().unwrap();
    let delta = v["delta_ppl_pct"].as_f64().unwrap();
    eprintln!(
        "{name}: PPL {ppl:.4} Δppl {delta:+.3}% KLD {}",
        v["kld_mean"]
    );
    if name == "llm-int8" {
        let outliers = v["outliers"].as_array().expect("an outlier report");
        assert_eq!(outliers.len(), 30 * 7, "one entry per linear");
        assert!(outliers.iter().any(|l| l["max_columns"].as_u64() > Some(0)));
    }
    std::fs::remove_file(&file).unwrap();
    (ppl, delta)
}

#[test]
fn int8_methods_meet_their_budgets() {
    let dir = tempfile::tempdir().unwrap();
    let (_, llm_int8) = quantize_and_score(dir.path(), "llm-int8", &["--method", "llm-int8"]);
    assert!(llm_int8.abs() <= 2.0, "LLM.int8() Δppl {llm_int8}%");
    let int8 = |act: &str| {
        quantize_and_score(
            dir.path(),
            &format!("int8-{act}"),
            &["--method", "int8-dynamic", "--activations", act],
        )
        .1
    };
    let (per_token, torch) = (int8("per_token"), int8("torch"));
    assert!(per_token <= 4.0, "per-token Δppl {per_token}%");
    assert!(
        per_token * 10.0 <= torch,
        "per-token {per_token}% vs per-call {torch}%"
    );
}

#[test]
fn nf4_is_no_worse_than_rtn_at_the_same_block_and_double_quant_costs_little() {
    let dir = tempfile::tempdir().unwrap();
    let (nf4, _) = quantize_and_score(dir.path(), "nf4", &["--method", "nf4"]);
    let (rtn, _) = quantize_and_score(
        dir.path(),
        "rtn",
        &["--method", "rtn", "--bits", "4", "--group-size", "64"],
    );
    assert!(nf4 <= rtn, "NF4 PPL {nf4} vs RTN 4-bit sym g64 {rtn}");
    let (dq, _) = quantize_and_score(dir.path(), "nf4-dq", &["--method", "nf4", "--double-quant"]);
    let moved = 100.0 * (dq / nf4 - 1.0);
    assert!(
        moved.abs() <= 0.5,
        "double quantization moved PPL by {moved}%"
    );
}
