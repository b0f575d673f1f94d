//! `softprompt eval`: a JSONL set scored with an adapter or a hand-written template (JSON), or
//! with `--templates FILE` every hand-written template of FILE zero-shot (a table or JSON).

use anyhow::{bail, Result};
use clap::Args;
use softprompt::infer::templates::{evaluate_templates, read_templates, TemplatesReport};
use std::path::{Path, PathBuf};

use crate::args::ScoreArgs;
use crate::progress::rows_bar;
use crate::scoring::score;

/// Arguments of `eval`.
#[derive(Args)]
pub struct EvalArgs {
    /// What to score and how.
    #[command(flatten)]
    score: ScoreArgs,
    /// Score each hand-written template of FILE zero-shot (no adapter) and report each one's
    /// accuracy and their spread: one template per line; blank lines and lines starting with
    /// `#` are skipped.
    #[arg(long, value_name = "FILE")]
    templates: Option<PathBuf>,
    /// With --templates: print JSON instead of a table (a single `eval` always prints JSON).
    #[arg(long)]
    json: bool,
}

/// Runs `eval`.
pub fn eval_cmd(args: EvalArgs) -> Result<()> {
    if let Some(file) = &args.templates {
        return eval_templates(&args.score, file, args.json);
    }
    let (r, _) = score(&args.score)?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    Ok(())
}

/// Scores every template of `file` on `args.data` with no adapter and prints the report.
fn eval_templates(args: &ScoreArgs, file: &Path, json: bool) -> Result<()> {
    args.check()?;
    if args.adapter.is_some() {
        bail!("--templates scores hand-written templates without an adapter (zero-shot); leave --adapter out");
    }
    if args.template.is_some() {
        bail!("--templates and --template both give templates; use one");
    }
    let templates = read_templates(file)?;
    let data = args.read_data()?;
    let model = args.model.load()?;
    let opts = args.options();
    let rows = data.records.len();
    let bar = rows_bar(rows * templates.len());
    let report = evaluate_templates(&model, &data, &templates, &opts, &mut |k, done| {
        bar.set_position((k * rows + done) as u64)
    })?;
    bar.finish_and_clear();
    for t in report.templates.iter().filter(|t| t.truncated > 0) {
        eprintln!(
            "warning: line {}: {} rows were longer than --max-len {} and had their fields truncated",
            t.line, t.truncated, args.max_len
        );
    }
    if json {
        let out = serde_json::json!({
            "model": args.model.model,
            "data": args.data,
            "templates_file": file,
            "rows": rows,
            "templates": report.templates,
            "spread": report.spread,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", table(&report));
    }
    Ok(())
}

/// The report as a text table: line, accuracy (and exact match) and template per row, then the
/// spread.
fn table(report: &TemplatesReport) -> String {
    let pct = |v: f64| format!("{:.1}%", 100.0 * v);
    let em = report.templates.iter().any(|t| t.exact_match.is_some());
    let mut out = String::new();
    out.push_str(if em {
        "line  accuracy  exact  template\n"
    } else {
        "line  accuracy  template\n"
    });
    for t in &report.templates {
        let exact = match t.exact_match {
            Some(e) => format!("{:>6}  ", pct(e)),
            None if em => format!("{:>6}  ", "-"),
            None => String::new(),
        };
        out.push_str(&format!(
            "{:>4}  {:>8}  {exact}{}\n",
            t.line,
            pct(t.accuracy),
            t.template
        ));
    }
    let s = report.spread;
    out.push_str(&format!(
        "spread over {} templates: min {}  max {}  mean {}  sd {}\n",
        report.templates.len(),
        pct(s.min),
        pct(s.max),
        pct(s.mean),
        pct(s.std)
    ));
    out
}
