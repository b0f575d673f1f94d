//! `softprompt complete`: a text continued by a causal model (greedy or sampled, with an
//! adapter, optionally through the model's chat template), streamed to stdout.

use anyhow::{bail, Result};
use clap::Args;
use softprompt::adapter;
use softprompt::infer::engine::{generate_with_progress, Event, GenRequest};
use softprompt::infer::prompt_cache::PromptCache;
use softprompt::infer::sampling::SamplingParams;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use crate::args::{real, whole, ModelArg};
use crate::progress::prefill_bar;

/// Arguments of `complete`.
#[derive(Args)]
pub struct CompleteArgs {
    /// The causal model to generate with.
    #[command(flatten)]
    model: ModelArg,
    /// Text to continue (with --chat: the user's message).
    text: String,
    /// A PEFT adapter folder (prompt tuning, p-tuning, prefix tuning, Cartridge, multitask).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The task whose prompt a multitask adapter uses (0-based).
    #[arg(long, value_parser = whole("--task-id", 0, "a task id of the multitask adapter"))]
    task_id: Option<usize>,
    /// Most tokens to generate (at most what the model's context leaves after the prompt).
    #[arg(long, default_value_t = 32, value_parser = whole("--max-tokens", 1, "the most tokens to generate"))]
    max_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// A string that ends the completion (not printed); may be repeated.
    #[arg(long)]
    stop: Vec<String>,
    /// Apply the model's chat template (GGUF tokenizer.chat_template) to TEXT as a user message.
    #[arg(long)]
    chat: bool,
}

/// How tokens are chosen (`complete`).
#[derive(Args)]
pub struct SamplingArgs {
    /// Softmax temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, value_parser = real("--temperature", |t| t.is_finite() && t >= 0.0, "a finite number ≥ 0 (0: greedy)"))]
    temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this total probability (1: all).
    #[arg(long, default_value_t = 1.0, value_parser = real("--top-p", |p| p > 0.0 && p <= 1.0, "in (0, 1] (1: all tokens)"))]
    top_p: f32,
    /// Keep only the K most likely tokens (0: all).
    #[arg(long, default_value_t = 0, value_parser = whole("--top-k", 0, "the most likely tokens kept; 0: all"))]
    top_k: usize,
    /// Random seed (default: from the operating system).
    #[arg(long, value_parser = softprompt::config::flags::WholeNumber::<u64>::flag("--seed", 0, "the random seed"))]
    seed: Option<u64>,
}

impl SamplingArgs {
    /// The sampling parameters of the flags.
    fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
        }
    }
}

/// Refuses `--max-tokens` beyond what the model's context of `context` positions leaves after
/// the prompt (`adapter` positions of the adapter, `text` of the text), as the server refuses
/// such a `max_tokens` with 400, before any token is generated. A prompt that fills the context
/// is left to the engine, which says so.
fn check_max_tokens(max_tokens: usize, context: usize, adapter: usize, text: usize) -> Result<()> {
    let prompt = adapter + text;
    let room = context.saturating_sub(prompt);
    if prompt < context && max_tokens > room {
        bail!(
            "--max-tokens is {max_tokens}, more than the model's context leaves: the context is \
             {context} positions and the prompt takes {prompt} (adapter {adapter} + text {text}), so \
             at most {room} tokens can be generated; give --max-tokens {room} or less"
        );
    }
    Ok(())
}

/// Prompts longer than this are run through the model in chunks of this many tokens, with a
/// progress bar on stderr.
const PROMPT_CHUNK: usize = 512;

/// Runs `complete`.
pub fn complete(args: CompleteArgs) -> Result<()> {
    if args.text.is_empty() {
        bail!("nothing to complete: TEXT is empty (give the text to continue)");
    }
    let model = args.model.load()?;
    let lm = model.backbone.require_causal("completion")?;
    let prompt = match &args.adapter {
        Some(dir) => PromptCache::from_adapter_task(lm, &adapter::load_peft(dir)?, args.task_id)?,
        None if args.task_id.is_some() => {
            bail!("--task-id selects a multitask adapter's prompt; give the adapter (--adapter DIR)")
        }
        None => PromptCache::none(),
    };
    let (text, ids) = if args.chat {
        let messages = [crate::chat::ChatMessage {
            role: "user".into(),
            content: args.text.clone(),
        }];
        let text = crate::chat::render(&model, &messages)?;
        let ids = model.tokenizer.encode(&text, false)?;
        (text, ids)
    } else {
        (args.text.clone(), model.tokenizer.encode(&args.text, true)?)
    };
    check_max_tokens(args.max_tokens, lm.info().max_positions, prompt.len(), ids.len())?;
    let req = GenRequest {
        ids,
        prompt: Arc::new(prompt),
        max_tokens: args.max_tokens,
        sampling: args.sampling.params(),
        stop: args.stop.clone(),
        stop_ids: model.tokenizer.eos_id().into_iter().collect(),
    };
    let start = Instant::now();
    let mut out = std::io::stdout().lock();
    if !args.chat {
        write!(out, "{text}")?;
        out.flush()?;
    }
    let bar = prefill_bar(req.ids.len(), PROMPT_CHUNK);
    let mut progress = |done: usize, _total: usize| {
        if let Some(b) = &bar {
            b.set_position(done as u64);
            if done as u64 == b.length().unwrap_or(0) {
                b.finish_and_clear();
            }
        }
    };
    let done = generate_with_progress(lm, &model.tokenizer, req, PROMPT_CHUNK, &mut progress, |e| {
        let piece = match e {
            Event::Token { text, .. } | Event::Done { text, .. } => text,
        };
        write!(out, "{piece}")?;
        out.flush()?;
        Ok(())
    })?;
    writeln!(out)?;
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "[{} tokens in {secs:.2} s, {:.1} tokens/s, finish: {}]",
        done.ids.len(),
        done.ids.len() as f64 / secs.max(1e-9),
        done.finish.map_or("?", |f| f.as_str())
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_max_tokens;

    #[test]
    fn max_tokens_beyond_the_context_left_is_refused_naming_the_limit() {
        check_max_tokens(32, 8192, 20, 10).unwrap();
        check_max_tokens(8162, 8192, 20, 10).unwrap();
        let e = check_max_tokens(8163, 8192, 20, 10).unwrap_err().to_string();
        assert!(e.contains("--max-tokens is 8163") && e.contains("at most 8162"), "{e}");
        // A prompt that fills the context is the engine's to refuse.
        check_max_tokens(1, 8192, 8000, 192).unwrap();
    }
}
