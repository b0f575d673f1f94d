//! Helpers shared by the integration tests: fixture paths, real-model paths, comparisons.
#![allow(dead_code)]

pub mod tiny;

use candle_core::{Device, Tensor};
use softprompt::backbone::{self, LoadedModel};
use softprompt::model_source;
use std::collections::HashMap;
use std::path::PathBuf;

/// `fixtures/peft/<name>` at the repository root.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/peft")
        .join(name)
}

/// `data/<name>` at the repository root.
pub fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data").join(name)
}

/// Loads a default model by short name; fails with instructions when it is not fetched.
pub fn load_model(name: &str) -> LoadedModel {
    let location = model_source::resolve(name)
        .unwrap_or_else(|e| panic!("{e:#}\n(run `cargo run -p softprompt-cli -- fetch` before the tests)"));
    backbone::load(&location, &Device::Cpu).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Tensors of a fixture's `expected.safetensors`.
pub fn expected(folder: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(folder).join("expected.safetensors"), &Device::Cpu).unwrap()
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// An i64 fixture tensor as u32.
pub fn as_u32(t: &Tensor) -> Tensor {
    t.to_dtype(candle_core::DType::U32).unwrap()
}

/// A file of the fetched default models (`$SOFTPROMPT_HOME/models/<rel>`); fails with
/// instructions when it is missing.
pub fn model_file(rel: &str) -> PathBuf {
    let path = model_source::cache_dir().join("models").join(rel);
    assert!(
        path.is_file(),
        "model file {} is missing: run `cargo run -p softprompt-cli -- fetch` first (or set SOFTPROMPT_HOME)",
        path.display()
    );
    path
}

/// SmolLM2's tokenizer, built from its GGUF metadata.
pub fn smollm2_tokenizer() -> softprompt::tokenizer::TextTokenizer {
    let gguf = softprompt::gguf::GgufFile::open(&model_file("smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    softprompt::tokenizer::TextTokenizer::from_gguf(&gguf).unwrap()
}

/// MiniLM's tokenizer (tokenizer.json).
pub fn minilm_tokenizer() -> softprompt::tokenizer::TextTokenizer {
    softprompt::tokenizer::TextTokenizer::from_json_file(&model_file("minilm-l6/tokenizer.json")).unwrap()
}

/// The training losses of a run, from its `metrics.jsonl`.
pub fn losses(out: &std::path::Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("loss")?.as_f64())
        .collect()
}
