//! Generation with adapters: greedy tokens equal PEFT's forward recomputed token by token
//! (`smollm2_generate_cases.json`), an adapter's keys and values computed once equal the
//! uncached path, prefix tuning gives PEFT's logits, and a mixed batch (several adapters,
//! lengths, joining at different steps) gives each request what it gets alone.

mod common;
use candle_core::{DType, Device, IndexOp, Tensor};
use common::*;
use softprompt::adapter::load_peft;
use softprompt::backbone::{lm_logits, BackboneInput, CausalLm, KvCache, LoadedModel};
use softprompt::infer::engine::{generate, Completion, Engine, GenRequest};
use softprompt::infer::prompt_cache::PromptCache;
use softprompt::infer::sampling::SamplingParams;
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

fn model() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| load_model("smollm2-135m"))
}

fn lm() -> &'static dyn CausalLm {
    model().backbone.causal().unwrap()
}

fn adapter_cache(name: &str) -> Arc<PromptCache> {
    if name == "plain" {
        return Arc::new(PromptCache::none());
    }
    let a = load_peft(&fixture(name)).unwrap();
    Arc::new(PromptCache::from_adapter(lm(), &a).unwrap())
}

fn request(ids: &[u32], prompt: Arc<PromptCache>, max_tokens: usize, sampling: SamplingParams) -> GenRequest {
    GenRequest {
        ids: ids.to_vec(),
        prompt,
        max_tokens,
        sampling,
        stop: Vec::new(),
        stop_ids: Vec::new(),
    }
}

#[test]
fn greedy_tokens_equal_peft_forward() {
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("smollm2_generate_cases.json")).unwrap()).unwrap();
    let mut report = Vec::new();
    for (name, list) in cases["cases"].as_object().unwrap() {
        let prompt = adapter_cache(name);
        for case in list.as_array().unwrap() {
            let text = case["prompt"].as_str().unwrap();
            let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
            let want: Vec<u32> = serde_json::from_value(case["new_ids"].clone()).unwrap();
            assert_eq!(model().tokenizer.encode(text, true).unwrap(), ids, "{text}");
            let req = request(&ids, prompt.clone(), want.len(), SamplingParams::default());
            let got = generate(lm(), &model().tokenizer, req, |_| Ok(())).unwrap();
            report.push(format!(
                "{name} / {text}: {}",
                if got.ids == want { "equal" } else { "DIFFERENT" }
            ));
            assert_eq!(got.ids, want, "{name}: {text}");
            assert_eq!(got.text, model().tokenizer.decode(&want, true).unwrap());
        }
    }
    eprintln!("{}", report.join("\n"));
}

/// The adapter's keys and values computed once and then continued equal one forward over
/// `[P; X]` (prompt tuning), and PEFT's logits (prefix tuning).
#[test]
fn prompt_cache_equals_uncached_path() {
    let m = model();
    let adapter = load_peft(&fixture("smollm2_generate_prompt_tuning")).unwrap();
    let prompt = adapter.input_prompt().unwrap();
    let cache = PromptCache::from_adapter(lm(), &adapter).unwrap();
    assert_eq!(cache.len(), prompt.dim(0).unwrap());
    let ids = m.tokenizer.encode("The capital of Italy is", true).unwrap();
    let ids_t = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let x = m.backbone.embed(&ids_t).unwrap();
    let full = Tensor::cat(&[&prompt.unsqueeze(0).unwrap(), &x], 1).unwrap();
    let t = full.dim(1).unwrap();
    let ones = Tensor::ones((1, t), DType::U32, &Device::Cpu).unwrap();
    let uncached = m.backbone.forward(&BackboneInput::new(&full, &ones)).unwrap();
    let mut kv = cache.cache.clone();
    let ones = Tensor::ones((1, ids.len()), DType::U32, &Device::Cpu).unwrap();
    let cached = lm().forward_cached(&BackboneInput::new(&x, &ones), &mut kv).unwrap();
    let diff = max_abs_diff(&uncached.narrow(1, t - ids.len(), ids.len()).unwrap(), &cached);
    assert!(diff < 1e-4, "cached vs uncached hidden states differ by {diff}");

    // prefix tuning: each row of PEFT's batch after the prefix cache gives PEFT's logits
    for folder in ["smollm2_prefix_tuning", "smollm2_prefix_tuning_projection"] {
        let a = load_peft(&fixture(folder)).unwrap();
        let cache = PromptCache::from_adapter(lm(), &a).unwrap();
        let exp = expected(folder);
        let ids = as_u32(&exp["input_ids"]);
        let lens: Vec<u32> = as_u32(&exp["attention_mask"]).sum(1).unwrap().to_vec1().unwrap();
        for (b, &len) in lens.iter().enumerate() {
            let row = ids.i((b, ..len as usize)).unwrap().unsqueeze(0).unwrap();
            let x = m.backbone.embed(&row).unwrap();
            let ones = Tensor::ones((1, len as usize), DType::U32, &Device::Cpu).unwrap();
            let mut kv = cache.cache.clone();
            let h = lm().forward_cached(&BackboneInput::new(&x, &ones), &mut kv).unwrap();
            let logits = lm_logits(lm(), &h.i((0, len as usize - 1)).unwrap().unsqueeze(0).unwrap())
                .unwrap()
                .squeeze(0)
                .unwrap();
            let diff = max_abs_diff(&logits, &exp["last_logits"].i(b).unwrap());
            assert!(diff < 2e-3, "{folder} row {b}: logits differ from PEFT's by {diff}");
        }
    }
}

/// Rows with caches of different lengths in one batch, each with its own rotary position,
/// give the hidden states each gets alone.
#[test]
fn stacked_caches_with_own_positions_equal_single_rows() {
    let m = model();
    let texts = ["Hello", "The capital of France is", "Once upon a time there"];
    let caches = [
        adapter_cache("plain"),
        adapter_cache("smollm2_generate_prefix_tuning"),
        adapter_cache("smollm2_generate_prompt_tuning"),
    ];
    let mut rows = Vec::new();
    for (text, c) in texts.iter().zip(&caches) {
        let ids = m.tokenizer.encode(text, true).unwrap();
        let ids_t = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let ones = Tensor::ones((1, ids.len()), DType::U32, &Device::Cpu).unwrap();
        let mut kv = c.cache.clone();
        lm().forward_cached(&BackboneInput::new(&m.backbone.embed(&ids_t).unwrap(), &ones), &mut kv)
            .unwrap();
        rows.push(kv);
    }
    let next = Tensor::new(&[[28u32], [30], [260]], &Device::Cpu).unwrap();
    let x = m.backbone.embed(&next).unwrap();
    let ones = Tensor::ones((3, 1), DType::U32, &Device::Cpu).unwrap();
    let mut batch = KvCache::stack(&rows.iter().collect::<Vec<_>>()).unwrap();
    let h = lm().forward_cached(&BackboneInput::new(&x, &ones), &mut batch).unwrap();
    let split = batch.unstack().unwrap();
    for (r, single) in rows.iter().enumerate() {
        let mut kv = single.clone();
        let one = Tensor::ones((1, 1), DType::U32, &Device::Cpu).unwrap();
        let alone = lm()
            .forward_cached(&BackboneInput::new(&x.narrow(0, r, 1).unwrap(), &one), &mut kv)
            .unwrap();
        let diff = max_abs_diff(&alone, &h.narrow(0, r, 1).unwrap());
        assert!(diff < 1e-4, "row {r}: {diff}");
        assert_eq!(split[r].len(), kv.len());
        assert_eq!(split[r].positions(), kv.positions());
        let d = max_abs_diff(&split[r].layers[5].0, &kv.layers[5].0);
        assert!(d < 1e-4, "row {r} cache: {d}");
    }
}

/// Requests over three adapters (and none), of different lengths, joining the batch at
/// different steps, greedy and sampled: each gets exactly the tokens it gets alone, and
/// log-probabilities within 1e-4.
#[test]
fn mixed_batch_equals_requests_alone() {
    let m = model();
    let names = [
        "plain",
        "smollm2_generate_prompt_tuning",
        "smollm2_generate_prefix_tuning",
        "smollm2_prompt_tuning_text",
    ];
    let caches: BTreeMap<&str, Arc<PromptCache>> = names.iter().map(|n| (*n, adapter_cache(n))).collect();
    let texts = [
        "The capital of Italy is",
        "def fibonacci(n):",
        "Once upon a time",
        "Water boils at",
        "A list of fruits: apple,",
        "Hi",
    ];
    let mut reqs = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        let ids = m.tokenizer.encode(text, true).unwrap();
        let sampling = if i % 3 == 2 {
            SamplingParams {
                temperature: 0.8,
                top_p: 0.95,
                top_k: 40,
                seed: Some(i as u64),
            }
        } else {
            SamplingParams::default()
        };
        reqs.push(request(&ids, caches[names[i % names.len()]].clone(), 6 + i, sampling));
    }
    let alone: Vec<Completion> = reqs
        .iter()
        .map(|r| generate(lm(), &m.tokenizer, r.clone(), |_| Ok(())).unwrap())
        .collect();
    let mut engine = Engine::new(lm(), &m.tokenizer);
    let mut got = vec![Completion::default(); reqs.len()];
    let mut pending: Vec<(usize, GenRequest)> = reqs.into_iter().enumerate().collect();
    let mut steps = 0;
    while !pending.is_empty() || !engine.is_idle() {
        // two requests join before the first step, then one more every other step
        let join = if steps == 0 { 2 } else { usize::from(steps % 2 == 1) };
        for (i, r) in pending.drain(..join.min(pending.len())).collect::<Vec<_>>() {
            for (k, e) in engine.add(i, r).unwrap() {
                got[k].push(&e);
            }
        }
        for (k, e) in engine.step().unwrap() {
            got[k].push(&e);
        }
        steps += 1;
        assert!(steps < 100);
    }
    for (i, (a, b)) in alone.iter().zip(&got).enumerate() {
        assert_eq!(a.ids, b.ids, "request {i}");
        assert_eq!(a.text, b.text, "request {i}");
        assert_eq!(a.finish, b.finish, "request {i}");
        for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
            assert!((x - y).abs() < 1e-4, "request {i}: log-prob {x} alone vs {y} batched");
        }
    }
}

#[test]
fn stop_strings_and_eos_end_a_sequence() {
    let m = model();
    let ids = m.tokenizer.encode("The capital of Italy is", true).unwrap();
    let base = generate(
        lm(),
        &m.tokenizer,
        request(&ids, adapter_cache("plain"), 12, SamplingParams::default()),
        |_| Ok(()),
    )
    .unwrap();
    // the plain model says " Rome.\n\nThe ..." (fixture); stop at the full stop
    assert!(base.text.starts_with(" Rome."), "{:?}", base.text);
    let mut req = request(&ids, adapter_cache("plain"), 12, SamplingParams::default());
    req.stop = vec![".".into()];
    let mut streamed = String::new();
    let got = generate(lm(), &m.tokenizer, req.clone(), |e| {
        if let softprompt::infer::engine::Event::Token { text, .. } = e {
            streamed.push_str(text);
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(got.text, " Rome");
    assert_eq!(streamed, " Rome");
    assert_eq!(got.finish, Some(softprompt::infer::engine::FinishReason::Stop));
    // a stop string over two tokens ("\n", "\n"): the first "\n" is held back, then dropped
    let mut two = req.clone();
    two.stop = vec!["\n\n".into()];
    let mut streamed = String::new();
    let got = generate(lm(), &m.tokenizer, two, |e| {
        if let softprompt::infer::engine::Event::Token { text, .. } = e {
            streamed.push_str(text);
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(got.text, " Rome.");
    assert_eq!(streamed, " Rome.");
    assert_eq!(got.ids.len(), 4);
    // the second token is an end-of-sequence id here
    req.stop = Vec::new();
    req.stop_ids = vec![base.ids[1]];
    let got = generate(lm(), &m.tokenizer, req, |_| Ok(())).unwrap();
    assert_eq!(got.ids, base.ids[..1]);
    assert_eq!(got.finish, Some(softprompt::infer::engine::FinishReason::Stop));
}
