//! Model-level commands: fetch, info, tokenize, complete.

use anyhow::{bail, Result};
use candle_core::Device;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use softprompt::adapter;
use softprompt::backbone::{self, LoadedModel, WeightStorage};
use softprompt::infer::engine::{generate_with_progress, Event, GenRequest};
use softprompt::infer::prompt_cache::PromptCache;
use softprompt::infer::sampling::SamplingParams;
use softprompt::model_source;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// MODEL argument shared by the commands.
#[derive(Args)]
pub struct ModelArg {
    /// A GGUF file, a Hugging Face model directory, a fetched default model
    /// (`smollm2-135m`, `minilm-l6`) or `hf:org/name` (with the `hub` feature, online).
    pub model: String,
    /// How to hold the frozen linear weights: `f32` (converted on load, fastest), `file` (as
    /// the file stores them, e.g. GGUF Q4_1: the same numbers in less memory), or converted at
    /// load to `f16`, `bf16` or `q8_0`.
    #[arg(long, value_enum, default_value = "f32")]
    pub weights: WeightStorage,
}

impl ModelArg {
    /// Loads the model on the CPU.
    pub fn load(&self) -> Result<LoadedModel> {
        load_with(&self.model, self.weights)
    }
}

/// Arguments of `info`.
#[derive(Args)]
pub struct InfoArgs {
    #[command(flatten)]
    model: ModelArg,
}

/// Arguments of `tokenize`.
#[derive(Args)]
pub struct TokenizeArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Text to tokenize.
    text: String,
    /// Add the tokenizer's special tokens (BOS, [CLS]/[SEP]).
    #[arg(long)]
    special: bool,
}

/// Arguments of `complete`.
#[derive(Args)]
pub struct CompleteArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Text to continue (with --chat: the user's message).
    text: String,
    /// A PEFT adapter folder (prompt tuning, p-tuning, prefix tuning, Cartridge, multitask).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The task whose prompt a multitask adapter uses (0-based).
    #[arg(long)]
    task_id: Option<usize>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 32)]
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
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this total probability.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep only the K most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Random seed (default: from the operating system).
    #[arg(long)]
    seed: Option<u64>,
}

impl SamplingArgs {
    fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
        }
    }
}

/// Loads MODEL on the CPU with its linear weights held as `weights` says.
pub fn load_with(spec: &str, weights: WeightStorage) -> Result<LoadedModel> {
    let location = model_source::resolve(spec)?;
    backbone::load_with(&location, &Device::Cpu, weights)
}

pub fn fetch() -> Result<()> {
    model_source::fetch_default_models(&mut |line| println!("{line}"))?;
    println!("models are in {}", model_source::cache_dir().join("models").display());
    Ok(())
}

/// Resident and peak resident memory in MiB, from /proc (Linux).
pub fn memory_mib() -> Option<(f64, f64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

pub fn info(args: InfoArgs) -> Result<()> {
    let start = Instant::now();
    let model = args.model.load()?;
    let load_s = start.elapsed().as_secs_f64();
    let i = model.backbone.info();
    println!("model:          {}", i.source.display());
    println!("architecture:   {:?} ({})", i.arch, i.model_type);
    println!("layers:         {}", i.layers);
    println!("hidden:         {}", i.hidden);
    println!("heads:          {} (key/value heads {})", i.heads, i.kv_heads);
    println!("intermediate:   {}", i.intermediate);
    println!(
        "vocab:          {} (tokenizer {})",
        i.vocab,
        model.tokenizer.vocab_size()
    );
    println!("max positions:  {}", i.max_positions);
    println!("parameters:     {} ({:.1} M)", i.params, i.params as f64 / 1e6);
    let dtypes: Vec<String> = i.dtypes_on_disk.iter().map(|(k, v)| format!("{k}×{v}")).collect();
    println!("dtypes on disk: {}", dtypes.join(", "));
    println!("computed in:    f32 on CPU");
    println!("load time:      {load_s:.2} s");
    if let Some((rss, peak)) = memory_mib() {
        println!("memory:         {rss:.0} MiB resident, {peak:.0} MiB peak");
    }
    Ok(())
}

pub fn tokenize(args: TokenizeArgs) -> Result<()> {
    let model = args.model.load()?;
    let ids = model.tokenizer.encode(&args.text, args.special)?;
    let pieces: Vec<String> = ids
        .iter()
        .map(|&id| model.tokenizer.id_to_token(id).unwrap_or_default())
        .collect();
    println!("{}", serde_json::json!({ "ids": ids, "tokens": pieces }));
    Ok(())
}

/// Prompts longer than this are run through the model in chunks of this many tokens, with a
/// progress bar on stderr.
const PROMPT_CHUNK: usize = 512;

/// The bar of a long prompt's prefill (`None` for prompts of at most [`PROMPT_CHUNK`] tokens).
fn prefill_bar(tokens: usize) -> Option<ProgressBar> {
    (tokens > PROMPT_CHUNK).then(|| {
        let bar = ProgressBar::new(tokens as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "reading the prompt {bar:30} {pos}/{len} tokens  [{elapsed_precise} < {eta_precise}]",
            )
            .expect("valid template"),
        );
        bar
    })
}

pub fn complete(args: CompleteArgs) -> Result<()> {
    if args.text.is_empty() {
        bail!("nothing to complete: TEXT is empty (give the text to continue)");
    }
    if args.max_tokens == 0 {
        bail!("--max-tokens is 0; it must be at least 1 (the most tokens to generate)");
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
    let bar = prefill_bar(req.ids.len());
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
