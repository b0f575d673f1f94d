//! Hand-written prompt variants scored zero-shot on the frozen model (no adapter): the
//! "discrete prompt instability" measurement (P-tuning §1, LAMA P17: changing one word of a
//! prompt moves accuracy by tens of points). Each template is scored like `eval --template`;
//! the report gives each one's accuracy and their spread (min, max, mean, standard deviation).
//!
//! Template file format ([`read_templates`]): one template per line, in the template syntax of
//! [`crate::template`]; lines that are blank or whose first non-space character is `#` are
//! skipped. Templates may not hold `[soft:..]` tokens (there is no adapter to fill them).

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::Path;

use super::evaluate::Scorer;
use super::session::{self, ScoreOptions};
use crate::backbone::LoadedModel;
use crate::data::DataSet;
use crate::template::Template;

/// One template read from a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateLine {
    /// Where it was read: `FILE:LINE` (1-based), used in messages.
    pub origin: String,
    /// Its line number (1-based).
    pub line: usize,
    /// The template's text (surrounding spaces and tabs removed).
    pub template: String,
}

/// Parses a template file's text (see the module documentation); `source` names the file in
/// messages. A template that does not parse, or holds `[soft:..]` tokens, is an error naming
/// `FILE:LINE`; a file with no template is an error.
pub fn parse_templates(source: &Path, text: &str) -> Result<Vec<TemplateLine>> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let t = raw.trim_matches([' ', '\t', '\r']);
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let origin = format!("{}:{}", source.display(), i + 1);
        let parsed = Template::parse(t).with_context(|| format!("{origin}: template `{t}`"))?;
        if parsed.num_virtual_tokens() > 0 {
            bail!("{origin}: template `{t}` has [soft:..] tokens; hand-written templates are scored without an adapter, so they cannot hold virtual tokens");
        }
        out.push(TemplateLine {
            origin,
            line: i + 1,
            template: t.to_string(),
        });
    }
    if out.is_empty() {
        bail!(
            "{}: no templates (every line is blank or a # comment)",
            source.display()
        );
    }
    Ok(out)
}

/// Reads and parses a template file ([`parse_templates`]).
pub fn read_templates(path: &Path) -> Result<Vec<TemplateLine>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read the template file {}", path.display()))?;
    parse_templates(path, &text)
}

/// One template's result.
#[derive(Debug, Clone, Serialize)]
pub struct TemplateScore {
    /// Line of the template file.
    pub line: usize,
    /// The template.
    pub template: String,
    /// Rows scored.
    pub n: usize,
    /// Accuracy in [0, 1].
    pub accuracy: f64,
    /// Greedy exact match in [0, 1], when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exact_match: Option<f64>,
    /// Rows whose fields were truncated to fit the longest sequence.
    pub truncated: usize,
}

/// The spread of the templates' accuracies.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Spread {
    /// Lowest accuracy.
    pub min: f64,
    /// Highest accuracy.
    pub max: f64,
    /// Mean accuracy.
    pub mean: f64,
    /// Sample standard deviation (n − 1 denominator; 0 for one template), as in the sweep's
    /// tables.
    pub std: f64,
}

impl Spread {
    /// The spread of `values` (at least one).
    pub fn of(values: &[f64]) -> Result<Spread> {
        if values.is_empty() {
            bail!("no accuracies to summarise");
        }
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let std = if values.len() < 2 {
            0.0
        } else {
            (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
        };
        Ok(Spread {
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            mean,
            std,
        })
    }
}

/// Every template's result and the spread of their accuracies.
#[derive(Debug, Clone, Serialize)]
pub struct TemplatesReport {
    /// One entry per template, in file order.
    pub templates: Vec<TemplateScore>,
    /// Spread of the accuracies.
    pub spread: Spread,
}

/// Scores each template on `data` with no adapter (zero-shot on the frozen model), with `opts`
/// (target field, task kind, verbaliser, longest sequence, batch, exact match; its `template`
/// and `task_id` must be unset: the templates are the file's and there is no adapter), calling
/// `progress(template index, rows done)` after each batch. An error (a template whose fields
/// are not in the data, a target that is not last, …) names the template's `FILE:LINE`.
pub fn evaluate_templates(
    model: &LoadedModel,
    data: &DataSet,
    templates: &[TemplateLine],
    opts: &ScoreOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<TemplatesReport> {
    if templates.is_empty() {
        bail!("no templates to score");
    }
    if opts.template.is_some() || opts.task_id.is_some() {
        bail!("--templates scores hand-written templates one by one without an adapter: leave out --template and --task-id");
    }
    let mut scores = Vec::with_capacity(templates.len());
    for (k, t) in templates.iter().enumerate() {
        let task_opts = ScoreOptions {
            template: Some(t.template.clone()),
            force_template: false,
            ..opts.clone()
        };
        let mut one = || -> Result<TemplateScore> {
            let s = session::open(model, None, &task_opts, &[data])?;
            let examples = s.task.encode_set(data, &model.tokenizer)?;
            let scorer = Scorer::new(model, &s.task, None, None)?;
            let r = scorer.evaluate_with_progress(&examples.examples, opts.batch, opts.exact_match, &mut |done| {
                progress(k, done)
            })?;
            Ok(TemplateScore {
                line: t.line,
                template: t.template.clone(),
                n: r.n,
                accuracy: r.accuracy,
                exact_match: r.exact_match,
                truncated: examples.truncated,
            })
        };
        scores.push(one().with_context(|| format!("{}: template `{}`", t.origin, t.template))?);
    }
    let accs: Vec<f64> = scores.iter().map(|s| s.accuracy).collect();
    Ok(TemplatesReport {
        spread: Spread::of(&accs)?,
        templates: scores,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_and_blank_lines_are_skipped_and_lines_counted() {
        let text = "# capital prompts\n\nThe capital of {subject} is {target}\n   # indented comment\n\t{subject}'s capital is {target}  \n";
        let t = parse_templates(Path::new("t.txt"), text).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!((t[0].line, t[0].origin.as_str()), (3, "t.txt:3"));
        assert_eq!(t[1].template, "{subject}'s capital is {target}");
        assert_eq!(t[1].line, 5);
    }

    #[test]
    fn bad_templates_name_file_and_line() {
        let e = format!(
            "{:#}",
            parse_templates(Path::new("t.txt"), "ok {a}\n\nbad {unclosed\n").unwrap_err()
        );
        assert!(e.contains("t.txt:3"), "{e}");
        let e = format!(
            "{:#}",
            parse_templates(Path::new("t.txt"), "[soft:3] {a}\n").unwrap_err()
        );
        assert!(e.contains("t.txt:1") && e.contains("soft"), "{e}");
        let e = format!("{:#}", parse_templates(Path::new("t.txt"), "# only\n\n").unwrap_err());
        assert!(e.contains("t.txt") && e.contains("no templates"), "{e}");
    }

    #[test]
    fn spread_uses_the_sample_standard_deviation() {
        let s = Spread::of(&[0.2, 0.4, 0.6]).unwrap();
        assert_eq!((s.min, s.max), (0.2, 0.6));
        assert!((s.mean - 0.4).abs() < 1e-12 && (s.std - 0.2).abs() < 1e-12);
        assert_eq!(Spread::of(&[0.5]).unwrap().std, 0.0);
        assert!(Spread::of(&[]).is_err());
    }
}
