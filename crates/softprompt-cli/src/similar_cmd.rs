//! `softprompt similar ADAPTER...`: how alike learned prompts are (SPoT's two similarities), to
//! choose the source prompt that starts a new task's (`train --init from --init-from DIR`).

use anyhow::{bail, Context, Result};
use clap::Args;
use softprompt::prompt::similarity::{prompt_similarity, PromptSimilarity};
use std::path::PathBuf;

/// Arguments of `similar`.
#[derive(Args)]
pub struct SimilarArgs {
    /// Adapter folders (two or more, of the same model and kind of prompt); the first is the
    /// target the others are ranked for.
    #[arg(required = true, num_args = 2..)]
    adapters: Vec<PathBuf>,
    /// Print one JSON object per pair (JSON lines) instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs `similar`: every pair's similarities, then the others ranked for the first.
pub fn similar_cmd(args: SimilarArgs) -> Result<()> {
    if args.adapters.len() < 2 {
        bail!("give two or more adapter folders to compare");
    }
    let adapters: Vec<_> = args
        .adapters
        .iter()
        .map(|dir| softprompt::adapter::load_peft(dir))
        .collect::<Result<_>>()?;
    let name = |i: usize| args.adapters[i].display().to_string();
    let layers = adapters
        .iter()
        .map(|a| a.late_prompt_layer())
        .collect::<Result<Vec<_>>>()?;
    same_entry_layer(&layers, name)?;
    let prompts: Vec<_> = adapters.into_iter().map(|a| a.prompt_embeddings).collect();
    let mut pairs: Vec<(usize, usize, PromptSimilarity)> = Vec::new();
    for i in 0..prompts.len() {
        for j in i + 1..prompts.len() {
            let s = prompt_similarity(&prompts[i], &prompts[j])
                .with_context(|| format!("comparing {} with {}", name(i), name(j)))?;
            pairs.push((i, j, s));
        }
    }
    if args.json {
        for (i, j, s) in &pairs {
            let line = serde_json::json!({"a": name(*i), "b": name(*j), "average_tokens": s.average_tokens,
                "best_matched_tokens": s.best_matched_tokens});
            println!("{line}");
        }
        return Ok(());
    }
    println!("{:>8}  {:>8}  pair", "average", "matched");
    for (i, j, s) in &pairs {
        println!(
            "{:>8.4}  {:>8.4}  {} ~ {}",
            s.average_tokens,
            s.best_matched_tokens,
            name(*i),
            name(*j)
        );
    }
    let mut ranked: Vec<_> = pairs.iter().filter(|(i, _, _)| *i == 0).collect();
    ranked.sort_by(|a, b| b.2.average_tokens.total_cmp(&a.2.average_tokens));
    println!(
        "\nsources for {}, most similar first (cosine of the average tokens):",
        name(0)
    );
    for (_, j, s) in ranked {
        println!("  {:.4}  {}", s.average_tokens, name(*j));
    }
    Ok(())
}

/// Refuses to compare prompts that enter the model at different layers: input embeddings
/// (`None`) with a late prompt's hidden states, or late prompts of two layers. `name` names the
/// adapter at an index.
fn same_entry_layer(layers: &[Option<usize>], name: impl Fn(usize) -> String) -> Result<()> {
    let entry = |layer: Option<usize>| match layer {
        None => "the input embeddings".to_string(),
        Some(l) => format!("layer {l} (late prompt tuning)"),
    };
    if let Some(i) = layers.iter().position(|l| *l != layers[0]) {
        bail!(
            "{} enters the model at {} and {} at {}: their prompts live in different spaces and \
             cannot be compared",
            name(0),
            entry(layers[0]),
            name(i),
            entry(layers[i])
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_entering_at_different_layers_are_not_compared() {
        let name = |i: usize| format!("a{i}");
        assert!(same_entry_layer(&[None, None], name).is_ok());
        assert!(same_entry_layer(&[Some(15), Some(15)], name).is_ok());
        let e = format!("{:#}", same_entry_layer(&[None, None, Some(15)], name).unwrap_err());
        assert!(
            e.contains("a0 enters the model at the input embeddings and a2 at layer 15"),
            "{e}"
        );
        let e = format!("{:#}", same_entry_layer(&[Some(3), Some(15)], name).unwrap_err());
        assert!(
            e.contains("layer 3 (late prompt tuning)") && e.contains("a1 at layer 15"),
            "{e}"
        );
    }
}
