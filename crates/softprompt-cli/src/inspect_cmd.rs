//! `inspect ADAPTER`: each virtual token's norm and nearest vocabulary tokens.

use anyhow::{bail, Result};
use candle_core::Device;
use clap::Args;
use softprompt::backbone::{self, WeightStorage};
use softprompt::inspect::{inspect_adapter, resolve_base_model, VirtualToken};
use std::path::PathBuf;

/// Arguments of `inspect`.
#[derive(Args)]
pub struct InspectArgs {
    /// Adapter directory (prompt tuning or p-tuning; written by `softprompt train` or HF PEFT).
    adapter: PathBuf,
    /// MODEL whose vocabulary to compare with (default: the adapter's base_model_name_or_path).
    #[arg(long)]
    model: Option<String>,
    /// Nearest vocabulary tokens to list per virtual token.
    #[arg(
        long,
        default_value_t = 5,
        value_parser = crate::args::whole("--top", 1, "nearest tokens to list per virtual token").least_checked_later()
    )]
    top: usize,
    /// Print one JSON object per virtual token (JSON lines) instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs `inspect`.
pub fn inspect_cmd(args: InspectArgs) -> Result<()> {
    if args.top == 0 {
        bail!("--top 0: list at least one nearest token (--top N with N ≥ 1)");
    }
    let adapter = softprompt::adapter::load_peft(&args.adapter)?;
    let location = match &args.model {
        Some(spec) => softprompt::model_source::resolve(spec)?,
        None => resolve_base_model(&adapter)?,
    };
    let model = backbone::load_with(&location, &Device::Cpu, WeightStorage::File)?;
    let tokens = inspect_adapter(&adapter, &model, args.top)?;
    if args.json {
        for t in &tokens {
            println!("{}", serde_json::to_string(t)?);
        }
    } else {
        print!("{}", table(&tokens));
    }
    Ok(())
}

/// One line per virtual token: index, norm, then `token (cosine)` for each neighbour.
fn table(tokens: &[VirtualToken]) -> String {
    let mut out = String::from("token    norm  nearest vocabulary tokens (cosine)\n");
    for t in tokens {
        let near: Vec<String> = t
            .nearest
            .iter()
            .map(|n| format!("{:?} ({:.3})", n.token, n.cosine))
            .collect();
        out.push_str(&format!("{:>5}  {:>6.3}  {}\n", t.index, t.norm, near.join("  ")));
    }
    out
}
