//! `softprompt info`: a model's architecture, sizes, storage types, load time and memory.

use anyhow::Result;
use clap::Args;
use softprompt::backbone::KernelPath;
use std::time::Instant;

use crate::args::ModelArg;
use crate::memory::memory_mib;

/// Arguments of `info`.
#[derive(Args)]
pub struct InfoArgs {
    /// The model to describe.
    #[command(flatten)]
    model: ModelArg,
}

/// Runs `info`.
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
    for (n, f) in i.features.iter().enumerate() {
        println!("{}{f}", if n == 0 { "features:       " } else { "                " });
    }
    println!("parameters:     {} ({:.1} M)", i.params, i.params as f64 / 1e6);
    let dtypes: Vec<String> = i.dtypes_on_disk.iter().map(|(k, v)| format!("{k}×{v}")).collect();
    println!("dtypes on disk: {}", dtypes.join(", "));
    let kernels = match model.backbone.kernel_path() {
        KernelPath::Fused => "fused f32 CPU kernels",
        KernelPath::Composed => "composed candle ops",
    };
    println!("computed in:    f32 on CPU, {kernels}");
    println!("load time:      {load_s:.2} s");
    if let Some((rss, peak)) = memory_mib() {
        println!("memory:         {rss:.0} MiB resident, {peak:.0} MiB peak");
    }
    Ok(())
}
