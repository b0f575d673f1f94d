//! The real Gemma 3 270M (base, Q4_K_M GGUF, `softprompt fetch gemma3-270m`) against
//! transformers 5.24 loading the same file with `gguf_file=` (dequantized to f32):
//! `fixtures/transformers/gemma3_270m/greedy.json`, written by
//! `scripts/fixtures/make_transformers_fixtures.py --gemma3-270m GGUF`. The tokenizer built from
//! the GGUF metadata gives transformers' ids; six prompts (one of 704 tokens, past the sliding
//! window of 512) give its last-position logits and its 8 greedy tokens, on the fused path
//! (weights as f32 and kept in the file's blocks) and on the composed one.
//!
//! The model is not one of the defaults `softprompt fetch` installs: without it these tests
//! say so and pass.

mod common;

use candle_core::{DType, Device, Tensor};
use softprompt::backbone::{self, inference_logits, Arch, BackboneInput, CausalLm, KernelPath, LoadOptions};
use softprompt::backbone::{LoadedModel, WeightStorage};
use softprompt::infer::generate::greedy;
use softprompt::model_source;
use std::path::PathBuf;

/// Logits may differ from transformers' by this much (f32 through 18 layers; |logit| ≈ 20).
const TOLERANCE: f32 = 1e-3;

/// The fetched model on `path` with its weights kept as `storage`, or `None` (said) when it is
/// not installed.
fn model(path: KernelPath, storage: WeightStorage) -> Option<LoadedModel> {
    let Ok(location) = model_source::resolve("gemma3-270m") else {
        println!("gemma3-270m is not installed (`softprompt fetch gemma3-270m`): nothing to check");
        return None;
    };
    let options = LoadOptions {
        storage,
        path: Some(path),
    };
    Some(backbone::load_with(&location, &Device::Cpu, options).unwrap_or_else(|e| panic!("{e:#}")))
}

fn fixture() -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/transformers/gemma3_270m/greedy.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn the_tokenizer_gives_transformers_ids() {
    let Some(model) = model(KernelPath::Fused, WeightStorage::F32) else {
        return;
    };
    let info = model.backbone.info();
    assert_eq!(info.arch, Arch::Gemma3);
    assert_eq!(
        (info.layers, info.hidden, info.heads, info.kv_heads, info.head_dim),
        (18, 640, 4, 1, 256)
    );
    for case in fixture()["tokenizer"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let got = model.tokenizer.encode(text, true).unwrap();
        assert_eq!(got, ids_of(&case["ids"]), "{text:?}");
    }
}

/// One prompt's last-position logits (the fixture's top 10 ids) and greedy continuation.
fn run(lm: &dyn CausalLm, model: &LoadedModel, prompt: &serde_json::Value) -> (f32, Vec<u32>) {
    let text = prompt["text"].as_str().unwrap();
    let ids = model.tokenizer.encode(text, true).unwrap();
    assert_eq!(ids, ids_of(&prompt["ids"]), "{text:?}");
    let ids = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let embeds = lm.embed(&ids).unwrap();
    let mask = Tensor::ones(ids.dims(), DType::U32, &Device::Cpu).unwrap();
    let hidden = lm.forward(&BackboneInput::new(&embeds, &mask)).unwrap();
    let t = hidden.dim(1).unwrap();
    let last = hidden.narrow(1, t - 1, 1).unwrap().squeeze(0).unwrap();
    let logits: Vec<f32> = inference_logits(lm, &last)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap();
    let want: Vec<f32> = prompt["top_logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let diff = ids_of(&prompt["top_ids"])
        .iter()
        .zip(&want)
        .map(|(&id, w)| (logits[id as usize] - w).abs())
        .fold(0f32, f32::max);
    (diff, greedy(lm, &embeds, 8, &[]).unwrap())
}

/// Runs every prompt (or the first `limit`) on one way of holding and running the model.
fn check(path: KernelPath, storage: WeightStorage, limit: usize) {
    let Some(model) = model(path, storage) else {
        return;
    };
    let lm = model.backbone.require_causal("greedy").unwrap();
    for prompt in fixture()["prompts"].as_array().unwrap().iter().take(limit) {
        let (diff, got) = run(lm, &model, prompt);
        let text = prompt["text"].as_str().unwrap();
        let shown: String = text.chars().take(40).collect();
        println!(
            "gemma3-270m {path:?} {storage:?} {shown:?}…: top-10 logits max abs diff vs transformers {diff:.2e}; \
             greedy {:?}",
            model.tokenizer.decode(&got, false).unwrap()
        );
        assert!(diff <= TOLERANCE, "{text:?}: logits differ by {diff}");
        assert_eq!(got, ids_of(&prompt["greedy"]), "{text:?}");
    }
}

#[test]
fn greedy_completions_match_transformers_on_the_fused_path() {
    check(KernelPath::Fused, WeightStorage::F32, usize::MAX);
}

#[test]
fn greedy_completions_match_transformers_with_the_file_storage() {
    check(KernelPath::Fused, WeightStorage::File, usize::MAX);
}

#[test]
fn greedy_completions_match_transformers_on_the_composed_path() {
    check(KernelPath::Composed, WeightStorage::F32, usize::MAX);
}
