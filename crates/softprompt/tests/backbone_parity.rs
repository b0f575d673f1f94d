//! The frozen backbones reproduce transformers' numbers (fixtures written by transformers 5.24,
//! f32, CPU) on the real SmolLM2-135M-Instruct (GGUF) and all-MiniLM-L6-v2 (safetensors).

mod common;
use candle_core::{DType, IndexOp};
use common::*;
use softprompt::backbone::{lm_logits, BackboneInput};

const TOL: f32 = 2e-3;

#[test]
fn smollm2_matches_transformers() {
    let model = load_model("smollm2-135m");
    let exp = expected("smollm2_base");
    let ids = as_u32(&exp["input_ids"]);
    let mask = as_u32(&exp["attention_mask"]);
    let embeds = model.backbone.embed(&ids).unwrap();
    let hidden = model
        .backbone
        .forward(&BackboneInput {
            embeds: &embeds,
            mask: &mask,
            token_types: None,
        })
        .unwrap();
    let lens: Vec<u32> = mask.sum(1).unwrap().to_vec1().unwrap();
    // Hidden states at real positions (padded positions are not meaningful and transformers'
    // mask handling there is an implementation detail).
    let mut worst_hidden = 0f32;
    let mut worst_logits = 0f32;
    for (b, &len) in lens.iter().enumerate() {
        let len = len as usize;
        let ours = hidden.i((b, 0..len)).unwrap();
        let theirs = exp["last_hidden"].i((b, 0..len)).unwrap();
        worst_hidden = worst_hidden.max(max_abs_diff(&ours, &theirs));
        let last = hidden.i((b, len - 1)).unwrap().unsqueeze(0).unwrap();
        let logits = lm_logits(model.backbone.causal().unwrap(), &last)
            .unwrap()
            .squeeze(0)
            .unwrap();
        worst_logits = worst_logits.max(max_abs_diff(&logits, &exp["last_logits"].i(b).unwrap()));
    }
    println!("smollm2_base: max-abs last_hidden {worst_hidden:.2e}, last_logits {worst_logits:.2e}");
    assert!(worst_hidden < TOL, "last_hidden differs by {worst_hidden}");
    assert!(worst_logits < TOL, "last_logits differ by {worst_logits}");
}

#[test]
fn minilm_matches_transformers() {
    let model = load_model("minilm-l6");
    let exp = expected("minilm_base");
    let ids = as_u32(&exp["input_ids"]);
    let mask = as_u32(&exp["attention_mask"]);
    let types = as_u32(&exp["token_type_ids"]);
    let embeds = model.backbone.embed(&ids).unwrap();
    let hidden = model
        .backbone
        .forward(&BackboneInput {
            embeds: &embeds,
            mask: &mask,
            token_types: Some(&types),
        })
        .unwrap();
    let pooled = model.backbone.encoder().unwrap().pool(&hidden).unwrap();
    let dh = max_abs_diff(&hidden, &exp["last_hidden"]);
    let dp = max_abs_diff(&pooled, &exp["pooler_output"]);
    println!("minilm_base: max-abs last_hidden {dh:.2e}, pooler_output {dp:.2e}");
    assert!(dh < TOL, "last_hidden differs by {dh}");
    assert!(dp < TOL, "pooler_output differs by {dp}");
    assert_eq!(hidden.dtype(), DType::F32);
}

#[test]
fn greedy_with_kv_cache_equals_greedy_without() {
    let model = load_model("smollm2-135m");
    let bb = model.backbone.causal().unwrap();
    for text in ["The capital of France is", "1, 2, 3, 4,"] {
        let ids = model.tokenizer.encode(text, true).unwrap();
        let t = candle_core::Tensor::new(ids.as_slice(), &candle_core::Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let cached = softprompt::infer::generate::greedy(bb, &bb.embed(&t).unwrap(), 8, &[]).unwrap();
        // Recompute the whole sequence at every step.
        let mut seq = ids.clone();
        for _ in 0..8 {
            let t = candle_core::Tensor::new(seq.as_slice(), &candle_core::Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let mask = t.ones_like().unwrap();
            let h = bb
                .forward(&BackboneInput {
                    embeds: &bb.embed(&t).unwrap(),
                    mask: &mask,
                    token_types: None,
                })
                .unwrap();
            let last = h.i((0, seq.len() - 1)).unwrap().unsqueeze(0).unwrap();
            let next = lm_logits(bb, &last)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .argmax(0)
                .unwrap()
                .to_scalar::<u32>()
                .unwrap();
            seq.push(next);
        }
        assert_eq!(cached, seq[ids.len()..].to_vec(), "{text}");
        println!("{text:?} → {:?}", model.tokenizer.decode(&cached, true).unwrap());
    }
}
