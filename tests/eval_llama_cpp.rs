//! quantd's perplexity against llama.cpp's (through llama-cpp-python, which scripts/test.sh
//! installs) on the same token ids and windows (scripts/eval/llama_cpp_perplexity.py): the
//! base SmolLM2 on the first 16,384 scored tokens of the eval text, and every GGUF type quantd
//! makes scored by both tools on the very same file, with KL divergence ordering the types.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn eval_text() -> PathBuf {
    common::repo_root().join("tests/corpus/eval-pride-and-prejudice.txt")
}

/// The eval text's token ids from the model's own tokenizer.json, written for the script, so
/// both tools score the same ids.
fn token_ids_file(dir: &Path) -> PathBuf {
    let tok =
        tokenizers::Tokenizer::from_file(common::fixture().join("hf-f32/tokenizer.json")).unwrap();
    let text = std::fs::read_to_string(eval_text()).unwrap();
    let ids = tok.encode(text.as_str(), false).unwrap().get_ids().to_vec();
    let path = dir.join("ids.json");
    std::fs::write(&path, serde_json::to_vec(&ids).unwrap()).unwrap();
    path
}

fn json_of(out: std::process::Output, what: &str) -> Value {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

fn quantize(gguf_type: &str, out: &Path) {
    let status = Command::new(env!("CARGO_BIN_EXE_quantd"))
        .arg("quantize")
        .arg(common::fixture().join("hf-f32"))
        .args(["--type", gguf_type, "--out"])
        .arg(out)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
}

fn quantd_eval(model: &Path, reference: Option<&Path>, max_tokens: usize) -> Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_quantd"));
    cmd.arg("eval").arg(model).arg("--text").arg(eval_text());
    if let Some(r) = reference {
        cmd.arg("--reference").arg(r);
    }
    cmd.args(["--max-tokens", &max_tokens.to_string(), "--json"]);
    json_of(cmd.output().unwrap(), "quantd eval")
}

fn llama_cpp_eval(model: &Path, ids: &Path, max_tokens: usize) -> Value {
    let out = Command::new(common::peer_python())
        .arg(common::repo_root().join("scripts/eval/llama_cpp_perplexity.py"))
        .arg(model)
        .arg("--text")
        .arg(eval_text())
        .arg("--token-ids")
        .arg(ids)
        .args(["--max-tokens", &max_tokens.to_string()])
        .output()
        .unwrap();
    json_of(out, "llama_cpp_perplexity.py")
}

fn ppl(v: &Value) -> f64 {
    v["perplexity"].as_f64().unwrap()
}

#[test]
fn base_perplexity_matches_llama_cpp_on_16384_scored_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let f32_gguf = dir.path().join("smollm2-f32.gguf");
    quantize("F32", &f32_gguf);
    let ids = token_ids_file(dir.path());
    let ours = quantd_eval(&common::fixture().join("hf-f32"), None, 16_384);
    let theirs = llama_cpp_eval(&f32_gguf, &ids, 16_384);
    assert_eq!(ours["scored_tokens"], 16_384);
    assert_eq!(theirs["scored_tokens"], 16_384);
    let rel = (ppl(&ours) / ppl(&theirs) - 1.0).abs();
    eprintln!(
        "base PPL on 16,384 scored tokens: quantd {:.4} ({:.0} s), llama.cpp {:.4} ({:.0} s), rel diff {rel:.2e}",
        ppl(&ours),
        ours["seconds"].as_f64().unwrap(),
        ppl(&theirs),
        theirs["seconds"].as_f64().unwrap()
    );
    assert!(rel < 0.005, "quantd {ours} vs llama.cpp {theirs}");
}

#[test]
fn each_type_scores_as_llama_cpp_scores_the_same_file_and_kl_orders_them() {
    // Four windows of 512: 1,020 scored tokens per file (the orders of magnitude between the
    // types' KL divergences show on this many; CI time is the limit).
    const SCORED: usize = 4 * 255;
    let dir = tempfile::tempdir().unwrap();
    let ids = token_ids_file(dir.path());
    let base = common::fixture().join("hf-f32");
    let mut klds = Vec::new();
    for t in ["Q8_0", "Q6_K", "Q4_K_M", "Q4_0", "Q2_K"] {
        let file = dir.path().join(format!("smollm2-{t}.gguf"));
        quantize(t, &file);
        let ours = quantd_eval(&file, Some(&base), SCORED);
        let theirs = llama_cpp_eval(&file, &ids, SCORED);
        let rel = ppl(&ours) / ppl(&theirs) - 1.0;
        let kld = ours["kld_mean"].as_f64().unwrap();
        eprintln!(
            "{t}: quantd PPL {:.4}, llama.cpp PPL {:.4} ({:+.2}%), KLD {kld:.5}, top-1 {:.2}%",
            ppl(&ours),
            ppl(&theirs),
            100.0 * rel,
            ours["top1_agreement_pct"].as_f64().unwrap()
        );
        assert!(rel.abs() < 0.01, "{t}: quantd {ours} vs llama.cpp {theirs}");
        klds.push((t, kld));
    }
    for pair in klds.windows(2) {
        assert!(
            pair[0].1 < pair[1].1,
            "KL divergence must order the types: {klds:?}"
        );
    }
}
