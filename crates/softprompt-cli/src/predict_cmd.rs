//! `softprompt predict`: every row of a JSONL set with its prediction and scores, as JSONL.

use anyhow::Result;
use clap::Args;
use std::io::Write;
use std::path::PathBuf;

use crate::args::ScoreArgs;
use crate::scoring::score;

/// Arguments of `predict`.
#[derive(Args)]
pub struct PredictArgs {
    /// What to score and how.
    #[command(flatten)]
    score: ScoreArgs,
    /// Output JSONL (default: standard output).
    #[arg(long)]
    output: Option<PathBuf>,
}

/// Runs `predict`: each row gets `prediction`, `scores` and (with --exact-match) `generated`.
pub fn predict_cmd(args: PredictArgs) -> Result<()> {
    let (r, data) = score(&args.score)?;
    let mut out = Vec::new();
    for (rec, p) in data.records.iter().zip(&r.predictions) {
        let mut row = rec.row.clone();
        row.insert("prediction".into(), serde_json::json!(p.predicted));
        row.insert("scores".into(), serde_json::json!(p.scores));
        if let Some(g) = &p.generated {
            row.insert("generated".into(), serde_json::json!(g));
        }
        writeln!(out, "{}", serde_json::Value::Object(row))?;
    }
    match &args.output {
        Some(path) => softprompt::io::write_bytes(path, &out)?,
        None => std::io::stdout().write_all(&out)?,
    }
    Ok(())
}
