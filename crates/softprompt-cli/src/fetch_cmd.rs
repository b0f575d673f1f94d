//! `softprompt fetch`: the default models downloaded into the cache.

use anyhow::Result;
use softprompt::model_source;

/// Runs `fetch` (idempotent), printing each step and where the models are.
pub fn fetch() -> Result<()> {
    model_source::fetch_default_models(&mut |line| println!("{line}"))?;
    println!("models are in {}", model_source::cache_dir().join("models").display());
    Ok(())
}
