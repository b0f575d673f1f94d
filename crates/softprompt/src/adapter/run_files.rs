//! softprompt's own files beside the PEFT adapter, so that `eval`/`predict`, the server and
//! prompt transfer need nothing else:
//! - `softprompt.json`: an [`AdapterTask`], the small versioned record of what inference needs
//!   (template, task, labels, verbaliser, method, shapes) plus an opaque record of the training
//!   options;
//! - `softprompt_prompt.safetensors`: the prompt's raw parameters (the p-tuning encoder too,
//!   which PEFT never saves).
//!
//! ## Versions of `softprompt.json`
//! `format_version` is [`TASK_FORMAT_VERSION`]. A reader takes a file of any version:
//! - a field it does not know is read past with a warning ([`AdapterTask::warnings`]), unless
//!   the file lists it in `critical` (a newer writer's promise that the field changes how the
//!   adapter scores, in the spirit of JOSE's `crit` header): then the file is refused, naming
//!   the field. A newer writer that changes the meaning of an existing field lists it there too.
//! - a file without `format_version` was written before the format had one: its options sit in
//!   `config`, from which the method and the prompt length are taken.
//! - `training` is never interpreted here: it records the options the run was trained with.

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::Path;

use crate::io::{write_bytes, write_safetensors};
use crate::prompt::Method;
use crate::task::TaskKind;

/// Name of the task file in an adapter directory.
pub const TASK_FILE: &str = "softprompt.json";
/// Name of the raw prompt parameters file in an adapter directory.
pub const PROMPT_FILE: &str = "softprompt_prompt.safetensors";
/// The version of `softprompt.json` this build writes.
pub const TASK_FORMAT_VERSION: u32 = 1;

/// The fields of format 1, in the order they are written.
const KNOWN_FIELDS: &[&str] = &[
    "format_version",
    "critical",
    "template",
    "target_field",
    "task",
    "labels",
    "task_labels",
    "verbalizer",
    "method",
    "num_virtual_tokens",
    "model",
    "training",
];

/// What `softprompt.json` holds: what inference needs to score with the adapter, and a record
/// of how it was trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterTask {
    /// The format's version ([`TASK_FORMAT_VERSION`] when written by this build).
    pub format_version: u32,
    /// Fields a reader must understand to score correctly (empty in format 1: every field of
    /// format 1 is known to its readers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub critical: Vec<String>,
    /// Template source (with its soft tokens).
    pub template: String,
    /// Target field.
    pub target_field: String,
    /// Task kind.
    pub task: TaskKind,
    /// Labels or candidate targets (of task 0 for a multitask adapter).
    pub labels: Vec<String>,
    /// A multitask adapter's labels of every task, by task id (empty otherwise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub task_labels: Vec<Vec<String>>,
    /// Label → verbaliser word.
    #[serde(default)]
    pub verbalizer: BTreeMap<String, String>,
    /// The method that learned the prompt.
    pub method: Method,
    /// Virtual tokens of one task's prompt (of the key/value prefix for prefix methods).
    pub num_virtual_tokens: usize,
    /// Model the adapter was trained on.
    pub model: String,
    /// The training options as the run recorded them; never read back by inference.
    #[serde(default)]
    pub training: Value,
    /// What reading the file found worth a warning (fields of a newer version); not written.
    #[serde(skip)]
    pub warnings: Vec<String>,
}

impl AdapterTask {
    /// The file's text: pretty JSON with the fields in format order.
    pub fn to_json(&self) -> Result<String> {
        Ok(serde_json::to_string_pretty(self)?)
    }

    /// Reads the text of a `softprompt.json`; `path` names the file in errors and warnings.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let shown = path.display();
        let value: Value = serde_json::from_str(text).with_context(|| format!("{shown} is not valid JSON"))?;
        let Value::Object(mut fields) = value else {
            bail!("{shown}: expected a JSON object");
        };
        if !fields.contains_key("format_version") {
            upgrade_unversioned(&mut fields, path)?;
        }
        let critical: Vec<String> = match fields.get("critical") {
            None => Vec::new(),
            Some(v) => serde_json::from_value(v.clone())
                .with_context(|| format!("{shown}: field `critical` must be a list of field names"))?,
        };
        let version = fields.get("format_version").and_then(Value::as_u64).unwrap_or(0);
        let mut warnings = Vec::new();
        for name in fields.keys().filter(|k| !KNOWN_FIELDS.contains(&k.as_str())) {
            if critical.iter().any(|c| c == name) {
                bail!(
                    "{shown}: field `{name}` (format version {version}) changes how the adapter \
                     scores, and this softprompt reads format {TASK_FORMAT_VERSION}, which does \
                     not know it; use a softprompt that reads format {version}"
                );
            }
            warnings.push(format!(
                "{shown}: field `{name}` is not part of format {TASK_FORMAT_VERSION} (the file is \
                 format {version}); it does not change the scores and is ignored"
            ));
        }
        let mut task: AdapterTask = serde_json::from_value(Value::Object(fields))
            .with_context(|| format!("{shown} is not a valid softprompt task file"))?;
        task.warnings = warnings;
        Ok(task)
    }

    /// Reads `softprompt.json` of the adapter in `dir`; the warnings are in
    /// [`AdapterTask::warnings`].
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(TASK_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_json(&text, &path)
    }

    /// Writes `softprompt.json` into `dir` (atomically).
    pub fn write(&self, dir: &Path) -> Result<()> {
        write_bytes(&dir.join(TASK_FILE), self.to_json()?.as_bytes())
    }
}

/// A file written before `format_version` existed holds the whole training configuration in
/// `config`: the method and prompt length come from there, the rest becomes `training`.
fn upgrade_unversioned(fields: &mut Map<String, Value>, path: &Path) -> Result<()> {
    let config = fields
        .remove("config")
        .with_context(|| format!("{}: neither `format_version` nor `config` is present", path.display()))?;
    let template_tokens = fields
        .get("template")
        .and_then(Value::as_str)
        .and_then(|t| crate::template::Template::parse(t).ok())
        .map_or(0, |t| t.num_virtual_tokens());
    let method = config.get("method").cloned().unwrap_or(Value::from("prompt-tuning"));
    let virtual_tokens = match template_tokens {
        0 => config.get("num_virtual_tokens").cloned().unwrap_or(Value::from(0)),
        n => Value::from(n),
    };
    fields.insert("format_version".into(), Value::from(0));
    fields.insert("method".into(), method);
    fields.insert("num_virtual_tokens".into(), virtual_tokens);
    fields.insert("training".into(), config);
    Ok(())
}

/// Reads `softprompt.json` of an adapter directory and prints its warnings on stderr.
pub fn load_task_file(dir: &Path) -> Result<AdapterTask> {
    let task = AdapterTask::read(dir)?;
    for w in &task.warnings {
        eprintln!("warning: {w}");
    }
    Ok(task)
}

/// Saves the raw prompt parameters (encoder and classification head included) next to an
/// adapter.
pub fn save_prompt_params(dir: &Path, params: &[(String, Tensor)]) -> Result<()> {
    write_safetensors(&dir.join(PROMPT_FILE), params, None)
}
