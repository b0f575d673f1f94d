//! `softprompt predict`: every row of a JSONL set with its prediction and scores, as JSONL.

use anyhow::{bail, Result};
use clap::Args;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::args::ScoreArgs;
use crate::scoring::score;
use softprompt::adapter::run_folder;
use softprompt::lock::ProcessLock;

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
    // One predict writes a file at a time; held until the file is in place.
    let _lock = match &args.output {
        Some(out) => {
            refuse_overwriting_an_input(out, &args.score)?;
            Some(lock_output(out)?)
        }
        None => None,
    };
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

/// Refuses `--output` naming one of the command's inputs (the `--data` file, the model file or a
/// file inside the model or adapter folder): the predictions would replace what they are made
/// from.
fn refuse_overwriting_an_input(output: &Path, score: &ScoreArgs) -> Result<()> {
    let resolved = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    // The output file may not exist yet: resolve its folder.
    let out = match (output.parent(), output.file_name()) {
        (Some(dir), Some(name)) if !dir.as_os_str().is_empty() => resolved(dir).join(name),
        _ => resolved(output),
    };
    let model = Path::new(&score.model.model);
    let inputs = [
        ("--data file", Some(score.data.as_path()), false),
        ("model", model.exists().then_some(model), model.is_dir()),
        ("--adapter folder", score.adapter.as_deref(), true),
    ];
    for (what, input, is_folder) in inputs {
        let Some(input) = input else { continue };
        let input = resolved(input);
        if out == input || (is_folder && out.starts_with(&input)) {
            bail!(
                "--output {} is {}the {what}; the predictions would replace what they are made \
                 from. Write them to another file",
                output.display(),
                if is_folder { "inside " } else { "" }
            );
        }
    }
    Ok(())
}

/// Takes the lock of the output file (`.NAME.softprompt-lock` beside it, as a run folder's).
fn lock_output(output: &Path) -> Result<ProcessLock> {
    let dir = run_folder::parent_of(output);
    if !dir.is_dir() {
        bail!(
            "--output {}: the folder {} does not exist",
            output.display(),
            dir.display()
        );
    }
    run_folder::lock_run_folder(output, "another predict")
}
