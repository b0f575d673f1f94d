//! `softprompt predict`: every row of a JSONL set with its prediction and scores, as JSONL.

use anyhow::{bail, Result};
use clap::Args;
use std::io::Write;
use std::path::{Path, PathBuf};

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
    if let Some(out) = &args.output {
        refuse_overwriting_the_data(out, &args.score.data)?;
    }
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

/// Refuses `--output` naming the `--data` file: the predictions would replace the rows they are
/// made from.
fn refuse_overwriting_the_data(output: &Path, data: &Path) -> Result<()> {
    let same = match (output.canonicalize(), data.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => output == data,
    };
    if same {
        bail!(
            "--output {} is the --data file; the predictions would replace the rows they are made \
             from. Write them to another file",
            output.display()
        );
    }
    Ok(())
}
