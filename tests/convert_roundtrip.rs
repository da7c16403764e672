//! GGUF ⇄ HF: the fixture GGUF uploaded through the API becomes a base model; `quantd convert`
//! of it gives exactly the tensors of the fixture's hf-f32 folder (which the shared script made
//! independently with gguf-py), and its tokenizer encodes like the original.

mod common;

use std::process::Command;

use common::{fixture, TestApp};
use safetensors::SafeTensors;

fn f32s(view: &safetensors::tensor::TensorView<'_>) -> Vec<f32> {
    assert_eq!(view.dtype(), safetensors::Dtype::F32);
    view.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fixture_gguf_converts_back_to_exactly_the_reference_hf_tensors() {
    let gguf_path = fixture().join("gguf/SmolLM2-135M-Instruct.Q4_1.gguf");
    let app = TestApp::spawn().await;
    let (status, model) = app.upload(&[gguf_path], None).await;
    assert_eq!(status, 201, "{model}");
    assert_eq!(
        (model["format"].as_str(), model["kind"].as_str()),
        (Some("gguf"), Some("base")),
        "{model}"
    );
    assert_eq!(model["parameters"], 134_515_008);
    let id = model["id"].as_str().unwrap().to_string();
    let (_, arts) = app.get_json(&format!("/v1/models/{id}/artifacts")).await;
    let name = arts["data"][0]["name"].as_str().unwrap().to_string();
    let stored = app
        .get_bytes(&format!("/v1/models/{id}/artifacts/{name}"))
        .await;
    let work = tempfile::tempdir().unwrap();
    let downloaded = work.path().join("model.gguf");
    std::fs::write(&downloaded, &stored).unwrap();
    app.stop().await;

    let out = work.path().join("hf");
    let status = Command::new(env!("CARGO_BIN_EXE_quantd"))
        .args(["convert"])
        .arg(&downloaded)
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());

    let ours = std::fs::read(out.join("model.safetensors")).unwrap();
    let reference = std::fs::read(fixture().join("hf-f32/model.safetensors")).unwrap();
    let ours = SafeTensors::deserialize(&ours).unwrap();
    let reference = SafeTensors::deserialize(&reference).unwrap();
    let mut names: Vec<String> = reference.names().into_iter().map(str::to_string).collect();
    names.sort();
    let mut our_names: Vec<String> = ours.names().into_iter().map(str::to_string).collect();
    our_names.sort();
    assert_eq!(our_names, names);
    for name in &names {
        let (a, b) = (ours.tensor(name).unwrap(), reference.tensor(name).unwrap());
        assert_eq!(a.shape(), b.shape(), "{name}");
        let max_diff = f32s(&a)
            .iter()
            .zip(f32s(&b))
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert_eq!(max_diff, 0.0, "{name}: max abs diff {max_diff}");
    }

    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        (
            config["num_hidden_layers"].as_u64(),
            config["num_key_value_heads"].as_u64()
        ),
        (Some(30), Some(3))
    );

    let ours = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let reference =
        tokenizers::Tokenizer::from_file(fixture().join("hf-f32/tokenizer.json")).unwrap();
    for text in [
        "The capital of France is",
        "Hello world 12345!",
        "  leading spaces, ümlauts\tand tabs\n",
        "<|im_start|>user\nHi<|im_end|>",
    ] {
        let a = ours.encode(text, false).unwrap();
        let b = reference.encode(text, false).unwrap();
        assert_eq!(a.get_ids(), b.get_ids(), "{text:?}");
    }
}

#[test]
fn an_hf_folder_converts_to_a_gguf_that_opens_as_the_same_model() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("smol-f16.gguf");
    let status = Command::new(env!("CARGO_BIN_EXE_quantd"))
        .arg("convert")
        .arg(fixture().join("hf-f16"))
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let f = quantd::formats::gguf::GgufFile::open(&out).unwrap();
    assert_eq!(f.tensors.len(), 272);
    assert_eq!(
        f.tensors
            .iter()
            .filter(|t| t.dtype == candle_core::quantized::GgmlDType::F16.into())
            .count(),
        211
    );
    // Back to HF: the f16 values survive the GGUF round trip exactly (Q/K permutation undone).
    let back = work.path().join("back");
    let status = Command::new(env!("CARGO_BIN_EXE_quantd"))
        .args(["convert", "--dtype", "f16"])
        .arg(&out)
        .arg(&back)
        .status()
        .unwrap();
    assert!(status.success());
    let a = std::fs::read(back.join("model.safetensors")).unwrap();
    let b = std::fs::read(fixture().join("hf-f16/model.safetensors")).unwrap();
    let (a, b) = (
        SafeTensors::deserialize(&a).unwrap(),
        SafeTensors::deserialize(&b).unwrap(),
    );
    for name in [
        "model.layers.7.self_attn.q_proj.weight",
        "model.layers.7.self_attn.k_proj.weight",
        "model.embed_tokens.weight",
    ] {
        assert_eq!(
            a.tensor(name).unwrap().data(),
            b.tensor(name).unwrap().data(),
            "{name}"
        );
    }
}

#[test]
fn llama3_rope_scaling_becomes_a_rope_freqs_tensor_like_llama_cpp_writes() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("tiny");
    common::tiny::write_model(&dir);
    let mut cfg = common::tiny::config();
    cfg["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64});
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let out = work.path().join("tiny.gguf");
    let status = Command::new(env!("CARGO_BIN_EXE_quantd"))
        .arg("convert")
        .arg(&dir)
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let f = quantd::formats::gguf::GgufFile::open(&out).unwrap();
    let rope = f
        .tensor("rope_freqs.weight")
        .expect("rope_freqs.weight is written");
    assert_eq!(
        (rope.shape.clone(), rope.dtype),
        (vec![8], candle_core::quantized::GgmlDType::F32.into())
    );
    assert!(
        f.get("llama.rope.scaling.type").is_none(),
        "llama.cpp reads llama3 scaling from the tensor only"
    );
    // The GGUF opens again as a checkpoint (rope_freqs is an allowed extra) and converts back.
    let back = work.path().join("back");
    let status = Command::new(env!("CARGO_BIN_EXE_quantd"))
        .arg("convert")
        .arg(&out)
        .arg(&back)
        .status()
        .unwrap();
    assert!(status.success());
}
