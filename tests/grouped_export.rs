//! GPTQ and AWQ (GEMM) checkpoints exported from integer-group GGUFs of a tiny generated model:
//! an independent Python reader (`scripts/interop/check_grouped_export.py`, `safetensors` and
//! numpy only) dequantizes every linear by the format's own definition and gets exactly the
//! weights the variant serves for symmetric groups, and within the f16 rounding of the zero
//! point (< 1% of a step) for asymmetric ones; 3-/2-bit and asymmetric 8-bit variants, stored
//! in the GPTQ layout already, export exactly. Files without integer groups are refused.

mod common;

use std::path::Path;
use std::process::Command;

use common::models::open_dir;
use common::{tiny, TestApp};
use quantd::export::gguf_meta;
use quantd::export::gptq::{write_grouped_folder, Layout};
use quantd::export::hf::{write_hf_folder, HfDtype};
use quantd::jobs::pipeline::{quantize_gguf, Hooks};
use quantd::jobs::spec::{GgufParams, MethodSpec, RtnParams};
use quantd::jobs::submit::quantization_plan;
use quantd::model::checkpoint::Checkpoint;
use quantd::quant::GgufType;
use serde_json::json;
use serde_json::Value;
use std::time::Duration;

struct Quiet;

impl Hooks for Quiet {
    fn progress(&self, _: &'static str, _: u64, _: u64, _: &'static str) {}
    fn cancelled(&self) -> bool {
        false
    }
}

/// Quantizes the tiny model in `base_dir` with `method` into `out` (a .gguf).
fn quantize(base_dir: &Path, method: &MethodSpec, out: &Path) {
    let base = open_dir(base_dir);
    let plan = quantization_plan(method, &base, 1).unwrap();
    let mut metadata = gguf_meta::model_metadata(&base, "tiny", plan.file_type, true).unwrap();
    metadata.extend(gguf_meta::provenance(
        method.name(),
        &method.params_json(),
        None,
        None,
    ));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    quantize_gguf(
        &base,
        &plan,
        Default::default(),
        &metadata,
        out,
        &pool,
        &Quiet,
    )
    .unwrap();
}

fn check(export: &Path, dense: &Path, exact: bool) -> Value {
    let script = common::repo_root().join("scripts/interop/check_grouped_export.py");
    let out = Command::new(common::python())
        .arg(script)
        .args([export, dense])
        .args(exact.then_some("--exact"))
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap()
}

#[test]
fn gptq_and_awq_exports_dequantize_in_python_to_the_served_weights() {
    let work = tempfile::tempdir().unwrap();
    let base_dir = work.path().join("base");
    tiny::write_model(&base_dir);
    let cases = [
        (4, 32, true, Layout::Gptq),
        (4, 32, false, Layout::Gptq),
        (8, -1, true, Layout::Gptq),
        (4, 32, false, Layout::AwqGemm),
        // Stored in the GPTQ layout already, integer zeros included: exact both ways.
        (3, 32, false, Layout::Gptq),
        (2, 64, true, Layout::Gptq),
        (8, -1, false, Layout::Gptq),
    ];
    for (i, (bits, group_size, sym, layout)) in cases.into_iter().enumerate() {
        let method = MethodSpec::Rtn(RtnParams {
            bits,
            group_size,
            sym,
        });
        let gguf = work.path().join(format!("case{i}.gguf"));
        quantize(&base_dir, &method, &gguf);
        let variant = Checkpoint::open_gguf(&gguf, "variant").unwrap();
        let dense = work.path().join(format!("case{i}-dense"));
        write_hf_folder(&variant, &dense, HfDtype::F32, &|_, _| {}).unwrap();
        let export = work.path().join(format!("case{i}-export"));
        let report = write_grouped_folder(&variant, &export, layout).unwrap();
        // 2 layers × 7 linears.
        assert_eq!(report.quantized_linears, 14);
        let layout_stored = !(bits == 4 || (bits == 8 && sym));
        let exact = sym || layout_stored;
        assert_eq!(report.max_zero_rounding == 0.0, exact, "{report:?}");
        assert!(report.max_zero_rounding < 0.01, "{report:?}");
        let got = check(&export, &dense, exact);
        assert_eq!(got["linears"], 14, "{got}");
        assert_eq!(got["sym"], sym, "{got}");
        if exact {
            assert_eq!(got["max_abs_diff"], 0.0, "{got}");
        }
        let config: Value =
            serde_json::from_slice(&std::fs::read(export.join("config.json")).unwrap()).unwrap();
        let qc = &config["quantization_config"];
        assert_eq!(qc["bits"], bits, "{qc}");
        assert_eq!(qc["group_size"], group_size, "{qc}");
        assert_eq!(
            qc["quant_method"],
            if layout == Layout::Gptq {
                "gptq"
            } else {
                "awq"
            }
        );
        if layout == Layout::Gptq {
            // v1 stores zero − 1 and cannot hold a zero of 0: asymmetric groups go to v2.
            let format = if sym { "gptq" } else { "gptq_v2" };
            assert_eq!(qc["checkpoint_format"], format, "{qc}");
        }
        assert_eq!(config["torch_dtype"], "float16");
        assert!(export.join("tokenizer.json").exists());
    }
}

#[test]
fn files_without_integer_groups_are_refused_with_the_reason() {
    let work = tempfile::tempdir().unwrap();
    let base_dir = work.path().join("base");
    tiny::write_model(&base_dir);
    let gguf = work.path().join("q8.gguf");
    let method = MethodSpec::Gguf(GgufParams {
        gguf_type: GgufType::Q8_0,
        overrides: vec![],
        imatrix: false,
    });
    quantize(&base_dir, &method, &gguf);
    let open = |p: &Path| Checkpoint::open_gguf(p, "variant").unwrap();
    let e = write_grouped_folder(&open(&gguf), &work.path().join("x"), Layout::Gptq)
        .unwrap_err()
        .to_string();
    assert!(e.contains("integer groups"), "{e}");
    let rtn8 = work.path().join("rtn8.gguf");
    let method = MethodSpec::Rtn(RtnParams {
        bits: 8,
        group_size: 32,
        sym: true,
    });
    quantize(&base_dir, &method, &rtn8);
    let e = write_grouped_folder(&open(&rtn8), &work.path().join("y"), Layout::AwqGemm)
        .unwrap_err()
        .to_string();
    assert!(e.contains("4-bit"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_publishes_gptq_and_awq_folders_as_tars_that_read_back_to_the_served_weights() {
    let app = TestApp::spawn().await;
    tiny::upload(&app, "tiny").await;
    let (status, job) = app
        .post_json(
            "/v1/jobs",
            &json!({"model": "tiny", "method": "rtn", "params": {"bits": 4, "group_size": 32, "sym": false},
                    "outputs": ["gguf", "gptq-safetensors", "awq"]}),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    let done = app
        .wait_job(job["id"].as_str().unwrap(), Duration::from_secs(60))
        .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let (_, artifacts) = app
        .get_json("/v1/models/tiny:rtn-4bit-g32-asym/artifacts")
        .await;
    let names: Vec<&str> = artifacts["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    for want in [
        "tiny-rtn-4bit-g32-asym.gptq.tar",
        "tiny-rtn-4bit-g32-asym.awq.tar",
    ] {
        assert!(names.contains(&want), "{names:?}");
    }

    let work = tempfile::tempdir().unwrap();
    let base = "/v1/models/tiny:rtn-4bit-g32-asym/artifacts";
    let gguf = work.path().join("variant.gguf");
    std::fs::write(
        &gguf,
        app.get_bytes(&format!("{base}/tiny-rtn-4bit-g32-asym.gguf"))
            .await,
    )
    .unwrap();
    let dense = work.path().join("dense");
    write_hf_folder(
        &Checkpoint::open_gguf(&gguf, "variant").unwrap(),
        &dense,
        HfDtype::F32,
        &|_, _| {},
    )
    .unwrap();
    for (format, method) in [("gptq", "gptq"), ("awq", "awq")] {
        let tar_bytes = app
            .get_bytes(&format!("{base}/tiny-rtn-4bit-g32-asym.{format}.tar"))
            .await;
        tar::Archive::new(std::io::Cursor::new(tar_bytes.to_vec()))
            .unpack(work.path())
            .unwrap();
        let folder = work.path().join(format!("tiny-rtn-4bit-g32-asym-{format}"));
        let got = check(&folder, &dense, false);
        assert_eq!(got["format"], method, "{got}");
        assert_eq!(got["linears"], 14, "{got}");
    }

    // Outputs the job cannot make are refused by name before any work.
    for (body, why) in [
        (
            json!({"method": "gguf", "params": {"type": "Q8_0"}, "outputs": ["gptq"]}),
            "integer groups",
        ),
        (
            json!({"method": "rtn", "params": {"bits": 3}, "outputs": ["awq-safetensors"]}),
            "4-bit",
        ),
        (
            json!({"method": "rtn", "params": {"bits": 4}, "outputs": ["onnx"]}),
            "unknown output",
        ),
    ] {
        let mut body = body;
        body["model"] = json!("tiny");
        let (status, r) = app.post_json("/v1/jobs", &body).await;
        assert_eq!(
            (status, r["error"]["param"].as_str()),
            (422, Some("outputs")),
            "{r}"
        );
        let message = r["error"]["message"].as_str().unwrap();
        assert!(message.contains(why), "{message}");
    }
    app.stop().await;
}
