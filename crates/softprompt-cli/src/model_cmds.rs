//! Model-level commands: fetch, info, tokenize, complete.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use softprompt::backbone::{self, LoadedModel};
use softprompt::model_source;
use std::time::Instant;

/// MODEL argument shared by the commands.
#[derive(Args)]
pub struct ModelArg {
    /// A GGUF file, a Hugging Face model directory, a fetched default model
    /// (`smollm2-135m`, `minilm-l6`) or `hf:org/name` (with the `hub` feature, online).
    pub model: String,
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
    /// Text to continue.
    text: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
}

/// Loads MODEL on the CPU.
pub fn load(spec: &str) -> Result<LoadedModel> {
    let location = model_source::resolve(spec)?;
    backbone::load(&location, &Device::Cpu)
}

pub fn fetch() -> Result<()> {
    model_source::fetch_default_models(&mut |line| println!("{line}"))?;
    println!("models are in {}", model_source::cache_dir().join("models").display());
    Ok(())
}

/// Resident and peak resident memory in MiB, from /proc (Linux).
fn memory_mib() -> Option<(f64, f64)> {
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
    let model = load(&args.model.model)?;
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
    let model = load(&args.model.model)?;
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

pub fn complete(args: CompleteArgs) -> Result<()> {
    if args.text.is_empty() {
        bail!("nothing to complete: TEXT is empty (give the text to continue)");
    }
    if args.max_tokens == 0 {
        bail!("--max-tokens is 0; it must be at least 1 (the most tokens to generate)");
    }
    let model = load(&args.model.model)?;
    let ids = model.tokenizer.encode(&args.text, true)?;
    if ids.is_empty() {
        bail!("nothing to complete: TEXT has no tokens");
    }
    let ids_t = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let embeds = model.backbone.embed(&ids_t)?;
    let stop: Vec<u32> = model.tokenizer.eos_id().into_iter().collect();
    let start = Instant::now();
    let bar = (ids.len() > PROMPT_CHUNK).then(|| {
        let bar = ProgressBar::new(ids.len() as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "reading the prompt {bar:30} {pos}/{len} tokens  [{elapsed_precise} < {eta_precise}]",
            )
            .expect("valid template"),
        );
        bar
    });
    let out = softprompt::infer::generate::greedy_with_progress(
        model.backbone.require_causal("completion")?,
        &embeds,
        args.max_tokens,
        &stop,
        PROMPT_CHUNK,
        &mut |done, _| {
            if let Some(b) = &bar {
                b.set_position(done as u64);
            }
        },
    )?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let secs = start.elapsed().as_secs_f64();
    println!("{}{}", args.text, model.tokenizer.decode(&out, true)?);
    eprintln!(
        "[{} tokens in {secs:.2} s, {:.1} tokens/s]",
        out.len(),
        out.len() as f64 / secs.max(1e-9)
    );
    Ok(())
}
