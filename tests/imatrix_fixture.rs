//! Importance matrices on the SmolLM2 fixture: a `gguf` job with `imatrix: true` collects one on
//! its calibration windows, weights the block encoders with it, and publishes it beside the
//! model in llama.cpp's GGUF format. llama.cpp itself (llama-cpp-python's
//! `llama_model_quantize`), given that file through an independent reader, writes exactly the
//! same tensor bytes from the same f32 weights; and `quantd quantize --imatrix` reads the file
//! back to the same bytes again.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::TestApp;
use quantd::formats::gguf::{GgufFile, Value as GgufValue};
use serde_json::{json, Value};

fn run(program: &Path, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().expect("runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{program:?} {args:?} failed:\n{text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imatrix_job_writes_llama_cpp_bytes_and_publishes_its_importance_matrix() {
    let app = TestApp::spawn().await;
    let (status, body) = app
        .upload(&common::fixture_files("hf-f32"), Some("smol"))
        .await;
    assert_eq!(status, 201, "{body}");
    let calib = app
        .post_dataset(&common::corpus("calib-emma.txt", 20_000))
        .await;
    let (status, job) = app
        .post_json(
            "/v1/jobs",
            &json!({"model": "smol", "method": "gguf",
                    "params": {"type": "Q4_K_M", "imatrix": true},
                    "calibration": {"dataset": calib, "samples": 4, "seq_len": 128}}),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    let job = app
        .wait_job(job["id"].as_str().unwrap(), Duration::from_secs(900))
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["output_model"], "smol:q4_k_m-imat");
    // 30 layers × 7 linears have an entry; 196 of them are Q4_K/Q5_0/Q6_K, whose encoders
    // read it (the 14 Q8_0 ones ignore it, as in llama.cpp).
    let imatrix = &job["metrics"]["imatrix"];
    assert_eq!(imatrix["entries"], 210, "{job}");
    assert_eq!(imatrix["weighted_tensors"], 196, "{job}");
    assert_eq!(
        (&imatrix["chunk_count"], &imatrix["chunk_size"]),
        (&json!(4), &json!(128))
    );
    assert_eq!(job["metrics"]["calibration"]["tokens"], 512, "{job}");

    let (_, artifacts) = app.get_json("/v1/models/smol:q4_k_m-imat/artifacts").await;
    let mut names: Vec<&str> = artifacts["data"]
        .as_array()
        .unwrap_or_else(|| panic!("{artifacts}"))
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            "manifest.json",
            "smol-q4_k_m-imat.gguf",
            "smol-q4_k_m-imat.imatrix.gguf"
        ]
    );
    let work = tempfile::tempdir().unwrap();
    let fetch = |name: &'static str| {
        let app = &app;
        let path = work.path().join(name);
        async move {
            let bytes = app
                .get_bytes(&format!("/v1/models/smol:q4_k_m-imat/artifacts/{name}"))
                .await;
            std::fs::write(&path, &bytes).unwrap();
            path
        }
    };
    let ours = fetch("smol-q4_k_m-imat.gguf").await;
    let imatrix_file = fetch("smol-q4_k_m-imat.imatrix.gguf").await;
    app.stop().await;

    // The file records its importance matrix the way llama-quantize does.
    let gguf = GgufFile::open(&ours).unwrap();
    assert!(
        matches!(
            gguf.get("quantize.imatrix.entries_count"),
            Some(GgufValue::I32(210))
        ),
        "{:?}",
        gguf.get("quantize.imatrix.entries_count")
    );
    assert!(matches!(
        gguf.get("quantize.imatrix.chunks_count"),
        Some(GgufValue::I32(4))
    ));

    // llama.cpp from the same f32 weights with our importance matrix: the same bytes.
    let quantd = Path::new(env!("CARGO_BIN_EXE_quantd"));
    let hf = common::fixture().join("hf-f32");
    let f32_gguf = work.path().join("smol-f32.gguf");
    run(
        quantd,
        &[
            "convert",
            hf.to_str().unwrap(),
            f32_gguf.to_str().unwrap(),
            "--dtype",
            "f32",
        ],
    );
    let interop = common::repo_root().join("scripts/interop");
    let reference = work.path().join("llama-cpp-q4_k_m-imat.gguf");
    let peer = common::peer_python();
    run(
        &peer,
        &[
            interop.join("llama_cpp_quantize.py").to_str().unwrap(),
            f32_gguf.to_str().unwrap(),
            reference.to_str().unwrap(),
            "Q4_K_M",
            "--imatrix",
            imatrix_file.to_str().unwrap(),
        ],
    );
    let compare = interop.join("compare_gguf_tensors.py");
    let same = run(
        &peer,
        &[
            compare.to_str().unwrap(),
            ours.to_str().unwrap(),
            reference.to_str().unwrap(),
        ],
    );
    assert!(same.contains("272 tensors: 272 byte-identical"), "{same}");

    // The CLI reads the published file back and writes the same bytes again.
    let again = work.path().join("cli.gguf");
    run(
        quantd,
        &[
            "quantize",
            hf.to_str().unwrap(),
            "--type",
            "Q4_K_M",
            "--imatrix",
            imatrix_file.to_str().unwrap(),
            "--out",
            again.to_str().unwrap(),
        ],
    );
    run(
        &peer,
        &[
            compare.to_str().unwrap(),
            again.to_str().unwrap(),
            ours.to_str().unwrap(),
        ],
    );
}

#[tokio::test]
async fn imatrix_requests_are_checked_by_name() {
    let app = TestApp::spawn().await;
    common::tiny::upload(&app, "tiny").await;
    let ds = app
        .post_dataset(&common::corpus("calib-emma.txt", 2000))
        .await;
    let calibration = json!({"dataset": ds, "samples": 2, "seq_len": 32});
    let cases: [(Value, &str, &str); 3] = [
        (
            json!({"model": "tiny", "method": "gguf", "params": {"type": "Q4_K_M", "imatrix": true}}),
            "calibration",
            "params.imatrix needs a calibration block",
        ),
        (
            json!({"model": "tiny", "method": "gguf", "params": {"type": "Q8_0", "imatrix": true},
                   "calibration": calibration}),
            "params.imatrix",
            "Q8_0 has no block encoder",
        ),
        (
            json!({"model": "tiny", "method": "gguf", "params": {"type": "Q4_K_M"},
                   "calibration": calibration}),
            "calibration",
            "set params.imatrix: true",
        ),
    ];
    for (body, field, message) in cases {
        let (status, r) = app.post_json("/v1/jobs", &body).await;
        assert_eq!(
            (status, r["error"]["param"].as_str()),
            (422, Some(field)),
            "{body} → {r}"
        );
        let text = r["error"]["message"].as_str().unwrap_or_default();
        assert!(text.contains(message), "{body} → {r}");
    }
    let (_, jobs) = app.get_json("/v1/jobs").await;
    assert_eq!(jobs["data"].as_array().map(Vec::len), Some(0), "{jobs}");
    app.stop().await;
}
