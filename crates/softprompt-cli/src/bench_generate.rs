//! `softprompt bench --generate`: generation throughput with prompt-tuning adapters, the
//! workload of `scripts/reference/peft_generate_speed.py` (same three prompts, greedy, exactly
//! `--max-tokens` new tokens, a `--virtual`-token prompt initialised from the embeddings of
//! "Answer briefly and in English:"), prompt processing (52 and 512 tokens, up to the first
//! token), then continuous batching: `--clients` requests over
//! `--adapters` different prompts in one engine, against the same requests one at a time.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use serde_json::json;
use softprompt::backbone::{CausalLm, LoadedModel, WeightStorage};
use softprompt::infer::engine::{generate, Engine, GenRequest};
use softprompt::infer::prompt_cache::PromptCache;
use softprompt::infer::sampling::SamplingParams;
use std::sync::Arc;
use std::time::Instant;

/// The reference script's prompts.
const PROMPTS: [&str; 3] = [
    "The capital of Italy is",
    "Once upon a time",
    "Review: a gentle, funny film.\nSentiment:",
];

/// Init texts of the adapters (the first is the reference script's).
const INIT_TEXTS: [&str; 4] = [
    "Answer briefly and in English:",
    "Classify the sentiment of the review:",
    "Continue the story in a few words:",
    "Complete the fact about geography:",
];

/// What `--generate` measures.
pub struct GenerateBench {
    /// New tokens per request.
    pub max_tokens: usize,
    /// Virtual tokens per adapter.
    pub virtual_tokens: usize,
    /// Concurrent requests.
    pub clients: usize,
    /// Distinct adapters among them.
    pub adapters: usize,
    /// Repetitions of the single-stream measurement (median reported).
    pub reps: usize,
}

/// A prompt-tuning adapter as PEFT's TEXT init builds it: the text's token embeddings,
/// repeated to `virtual_tokens` rows.
fn text_init_prompt(model: &LoadedModel, lm: &dyn CausalLm, text: &str, virtual_tokens: usize) -> Result<PromptCache> {
    let ids = model.tokenizer.encode(text, false)?;
    if ids.is_empty() {
        bail!("the init text `{text}` has no tokens");
    }
    let ids: Vec<u32> = ids.iter().copied().cycle().take(virtual_tokens).collect();
    let embeds = lm.embed(&Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?)?;
    PromptCache::from_prompt(lm, &embeds.squeeze(0)?)
}

/// A greedy request for exactly `max_tokens` new tokens (no end-of-sequence stop, as
/// `min_new_tokens` in the reference).
fn request(model: &LoadedModel, prompt: &Arc<PromptCache>, text: &str, max_tokens: usize) -> Result<GenRequest> {
    Ok(GenRequest {
        ids: model.tokenizer.encode(text, true)?,
        prompt: prompt.clone(),
        max_tokens,
        sampling: SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
        },
        stop: Vec::new(),
        stop_ids: Vec::new(),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the requests one after another; returns (new tokens, seconds).
fn one_at_a_time(lm: &dyn CausalLm, model: &LoadedModel, reqs: &[GenRequest]) -> Result<(usize, f64)> {
    let start = Instant::now();
    let mut tokens = 0;
    for r in reqs {
        tokens += generate(lm, &model.tokenizer, r.clone(), |_| Ok(()))?.ids.len();
    }
    Ok((tokens, start.elapsed().as_secs_f64()))
}

/// Runs the requests together in one engine (all join, then steps until every one is done);
/// returns (new tokens, seconds).
fn batched(lm: &dyn CausalLm, model: &LoadedModel, reqs: &[GenRequest]) -> Result<(usize, f64)> {
    let start = Instant::now();
    let mut engine: Engine<usize> = Engine::new(lm, &model.tokenizer);
    let mut tokens = 0;
    let is_token = |e: &softprompt::infer::engine::Event| matches!(e, softprompt::infer::engine::Event::Token { .. });
    for (i, r) in reqs.iter().enumerate() {
        tokens += engine.add(i, r.clone())?.iter().filter(|(_, e)| is_token(e)).count();
    }
    while !engine.is_idle() {
        tokens += engine.step()?.iter().filter(|(_, e)| is_token(e)).count();
    }
    Ok((tokens, start.elapsed().as_secs_f64()))
}

/// Prompt lengths whose processing is timed (llama-bench's pp52 and pp512).
const PREFILL_TOKENS: [usize; 2] = [52, 512];

/// Tokens per second of a generation's prompt processing: a `tokens`-long prompt (the first
/// prompt's tokens repeated, no adapter) run through an engine up to its first token's
/// logits, median of `reps`.
fn prefill_rate(lm: &dyn CausalLm, model: &LoadedModel, tokens: usize, reps: usize) -> Result<f64> {
    let ids: Vec<u32> = model
        .tokenizer
        .encode(PROMPTS[0], true)?
        .into_iter()
        .cycle()
        .take(tokens)
        .collect();
    let mut req = request(model, &Arc::new(PromptCache::none()), PROMPTS[0], 1)?;
    req.ids = ids;
    let mut rates = Vec::new();
    for _ in 0..reps {
        let start = Instant::now();
        Engine::<()>::new(lm, &model.tokenizer).add((), req.clone())?;
        rates.push(tokens as f64 / start.elapsed().as_secs_f64());
    }
    Ok(median(rates))
}

/// Runs the workload on `model_spec` with its weights held as `weights`; prints JSON lines
/// (`json`) or text.
pub fn run(model_spec: &str, weights: WeightStorage, b: &GenerateBench, json_out: bool) -> Result<()> {
    if b.max_tokens == 0 || b.virtual_tokens == 0 || b.clients == 0 || b.adapters == 0 || b.reps == 0 {
        bail!("--max-tokens, --virtual, --clients, --adapters and --reps must be at least 1");
    }
    let model = crate::args::load_with(model_spec, weights)?;
    let lm = model.backbone.require_causal("bench --generate")?;
    let adapters: Vec<Arc<PromptCache>> = (0..b.adapters)
        .map(|i| {
            let text = INIT_TEXTS[i % INIT_TEXTS.len()];
            text_init_prompt(&model, lm, text, b.virtual_tokens).map(Arc::new)
        })
        .collect::<Result<_>>()?;
    let threads = rayon::current_num_threads();

    // single stream: the reference script's loop (three prompts, one adapter), median of reps
    let single: Vec<GenRequest> = PROMPTS
        .iter()
        .map(|p| request(&model, &adapters[0], p, b.max_tokens))
        .collect::<Result<_>>()?;
    one_at_a_time(lm, &model, &single[..1])?; // warm-up
    let mut rates = Vec::new();
    for _ in 0..b.reps {
        let (n, secs) = one_at_a_time(lm, &model, &single)?;
        rates.push(n as f64 / secs);
    }
    let single_rate = median(rates.clone());
    let line = json!({
        "workload": "generate_single", "model": model_spec, "virtual": b.virtual_tokens,
        "new_tokens": b.max_tokens, "prompts": PROMPTS.len(), "reps": rates.len(),
        "tokens_per_s": single_rate, "tokens_per_s_all": rates, "threads": threads,
    });
    if json_out {
        println!("{line}");
    } else {
        println!(
            "single stream: {single_rate:.1} tokens/s (median of {}; {} prompts × {} new tokens, {}-token prompt-tuning adapter, {threads} threads)",
            rates.len(), PROMPTS.len(), b.max_tokens, b.virtual_tokens
        );
    }

    // prompt processing, as generation runs it
    for tokens in PREFILL_TOKENS {
        let rate = prefill_rate(lm, &model, tokens, b.reps)?;
        let line = json!({
            "workload": "generate_prefill", "model": model_spec, "prompt_tokens": tokens,
            "reps": b.reps, "tokens_per_s": rate, "threads": threads,
        });
        if json_out {
            println!("{line}");
        } else {
            println!(
                "prompt processing, {tokens} tokens: {rate:.1} tokens/s (median of {})",
                b.reps
            );
        }
    }

    // concurrent clients over several adapters, against the same requests one at a time
    let reqs: Vec<GenRequest> = (0..b.clients)
        .map(|i| {
            request(
                &model,
                &adapters[i % b.adapters],
                PROMPTS[i % PROMPTS.len()],
                b.max_tokens,
            )
        })
        .collect::<Result<_>>()?;
    let (n1, s1) = one_at_a_time(lm, &model, &reqs)?;
    let (nb, sb) = batched(lm, &model, &reqs)?;
    let (one, many) = (n1 as f64 / s1, nb as f64 / sb);
    let line = json!({
        "workload": "generate_concurrent", "model": model_spec, "clients": b.clients,
        "adapters": b.adapters, "virtual": b.virtual_tokens, "new_tokens": b.max_tokens,
        "one_client_tokens_per_s": one, "concurrent_tokens_per_s": many, "ratio": many / one,
        "tokens": nb, "threads": threads,
        "peak_rss_mb": crate::memory::memory_mib().map(|(_, peak)| peak),
    });
    if json_out {
        println!("{line}");
    } else {
        println!(
            "{} clients over {} adapters: {many:.1} tokens/s in one batch vs {one:.1} tokens/s one at a time = {:.2}×",
            b.clients,
            b.adapters,
            many / one
        );
    }
    Ok(())
}
