//! HF PEFT adapter files, read and written exactly as PEFT 0.21 does:
//!
//! - `adapter_config.json`: the prompt-learning config, written like
//!   `json.dumps(config, indent=2, sort_keys=True)` (ASCII only, no trailing newline);
//! - `adapter_model.safetensors`: `prompt_embeddings` (f32 `[p·submodules, d]`; for p-tuning the
//!   encoder's **output**, for prefix tuning the `[p, layers·2·d_kv]` key/value prefix, for
//!   multitask prompt tuning the shared prompt, with `prefix_task_cols [T, p, r]` and
//!   `prefix_task_rows [T, r, d]` beside it), plus `base_model.classifier.{weight,bias}` for
//!   sequence classification; metadata `{"format": "pt"}`.
//!
//! PEFT never saves a p-tuning encoder, so such an adapter is, for inference, a plain prompt;
//! training state (the encoder included) is [`crate::prompt::SoftPrompt::tensors`]' job.
//!
//! The folder's files: [`peft_types`] (PEFT's enums), [`peft_config`] (the typed
//! `adapter_config.json`), `python_json` (Python's `json.dumps` spelling), [`compat`] (does an
//! adapter fit a model), [`run_files`] (softprompt's own files beside the adapter:
//! `softprompt.json`, the raw prompt parameters). The resumable training state is
//! [`crate::train::checkpoint`](mod@crate::train::checkpoint)'s.

pub mod compat;
pub mod peft_config;
pub mod peft_types;
mod python_json;
pub mod run_files;
pub mod run_folder;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::prompt::{SoftPrompt, TaskFactors, PREFIX_TASK_COLS, PREFIX_TASK_ROWS, PROMPT_EMBEDDINGS};
pub use compat::check_compatible;
pub use peft_config::{MethodConfig, PeftConfig};
pub use peft_types::{PeftType, TaskType};

/// File name of the adapter configuration.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// File name of the adapter weights.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The PEFT release whose file format this module reads and writes (written as `peft_version`).
pub const PEFT_FORMAT_VERSION: &str = "0.21.2";
/// DePT's `A [max_len, r]` in `adapter_model.safetensors` (see [`DEPT_B`]).
pub const DEPT_A: &str = "dept_update_a";
/// DePT's `B [r, d]` in `adapter_model.safetensors` (softprompt's name; PEFT has no DePT): the
/// update of the input embeddings is `A·B`, row `j` added to the `j`-th real prompt token.
pub const DEPT_B: &str = "dept_update_b";
/// Late prompt tuning's layer in `adapter_model.safetensors` (softprompt's name; PEFT has no
/// LPT): a one-element f32 tensor holding the decoder layer whose input the prompt
/// (`prompt_embeddings`) replaces. An adapter holding it is read by
/// [`crate::infer::late_prompt`], never as an input prompt.
pub const LATE_PROMPT_LAYER: &str = "late_prompt_insert_layer";
/// Late prompt tuning's placeholder `[p, d]` in `adapter_model.safetensors` (softprompt's name):
/// the input embeddings of the prompt's reserved positions, which the layers below
/// [`LATE_PROMPT_LAYER`] run on.
pub const LATE_PROMPT_PLACEHOLDER: &str = "late_prompt_placeholder";
/// Tensor names of a sequence-classification head as PEFT saves it (`modules_to_save`).
pub const CLASSIFIER_WEIGHT: &str = "base_model.classifier.weight";
/// See [`CLASSIFIER_WEIGHT`].
pub const CLASSIFIER_BIAS: &str = "base_model.classifier.bias";

/// A loaded PEFT adapter.
#[derive(Debug, Clone)]
pub struct PeftAdapter {
    /// Folder it was read from.
    pub dir: PathBuf,
    /// `adapter_config.json`.
    pub config: PeftConfig,
    /// `prompt_embeddings` as f32 (shape [`PeftConfig::prompt_embeddings_shape`]).
    pub prompt_embeddings: Tensor,
    /// Every other tensor of `adapter_model.safetensors`, by name (e.g. the classifier head).
    pub tensors: BTreeMap<String, Tensor>,
}

impl PeftAdapter {
    /// DePT's position-wise update of the input embeddings, `A·B` `[max_len, d]` (row `j` is
    /// added to the `j`-th real prompt token); `None` when the adapter holds no DePT pair.
    /// Both tensors or neither: one alone is refused.
    pub fn input_update(&self) -> Result<Option<Tensor>> {
        match (self.tensors.get(DEPT_A), self.tensors.get(DEPT_B)) {
            (None, None) => Ok(None),
            (Some(a), Some(b)) => Ok(Some(a.matmul(b).with_context(|| {
                format!(
                    "{}: DePT's `{DEPT_A}` {:?} and `{DEPT_B}` {:?} do not multiply",
                    self.dir.display(),
                    a.dims(),
                    b.dims()
                )
            })?)),
            _ => bail!(
                "{}: {ADAPTER_WEIGHTS} holds only one of DePT's `{DEPT_A}` and `{DEPT_B}`",
                self.dir.display()
            ),
        }
    }

    /// Late prompt tuning's layer: the decoder layer whose input the prompt replaces; `None` for
    /// an adapter without [`LATE_PROMPT_LAYER`]. A value that is not one whole number is refused.
    pub fn late_prompt_layer(&self) -> Result<Option<usize>> {
        let Some(t) = self.tensors.get(LATE_PROMPT_LAYER) else {
            return Ok(None);
        };
        let values = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        match values.as_slice() {
            [v] if *v >= 0.0 && v.fract() == 0.0 && *v < 1e6 => Ok(Some(*v as usize)),
            _ => bail!(
                "{}: tensor `{LATE_PROMPT_LAYER}` must hold one whole number (the layer), not {values:?}",
                self.dir.display()
            ),
        }
    }

    /// The prompt matrix `[p, d]` to prepend to the input embeddings (prompt tuning and
    /// p-tuning); an error for prefix tuning, whose prompt enters every attention layer, for
    /// late prompt tuning, whose prompt enters at a later layer ([`crate::infer::late_prompt`]),
    /// and for multitask prompt tuning, whose prompt depends on the task
    /// ([`PeftAdapter::input_prompt_for`]).
    pub fn input_prompt(&self) -> Result<&Tensor> {
        if let Some(layer) = self.late_prompt_layer()? {
            bail!(
                "{}: a late-prompt-tuning adapter's prompt replaces the hidden states at layer {layer}, \
                 not input embeddings (it is read as per-layer keys and values)",
                self.dir.display()
            );
        }
        match self.config.peft_type() {
            t if t.is_kv_prefix() => bail!(
                "{}: a {} adapter holds per-layer key/value prefixes, not an input prompt (use its prefix cache)",
                self.dir.display(),
                t.as_str()
            ),
            PeftType::MultitaskPromptTuning => bail!(
                "{}: a MULTITASK_PROMPT_TUNING adapter has one prompt per task ({} tasks); give the task id (--task-id N, N in 0..{})",
                self.dir.display(),
                self.num_tasks(),
                self.num_tasks()
            ),
            _ => Ok(&self.prompt_embeddings),
        }
    }

    /// Number of tasks: a multitask adapter's `num_tasks`, 1 for the other methods.
    pub fn num_tasks(&self) -> usize {
        self.config.multitask_shape().map_or(1, |(t, _)| t)
    }

    /// Whether the adapter is a multitask prompt (its prompt depends on a task id).
    pub fn is_multitask(&self) -> bool {
        self.config.peft_type() == PeftType::MultitaskPromptTuning
    }

    /// The input prompt `[p, d]` for rows of task `task`: a multitask adapter needs the task id
    /// (in range), the other input-prompt adapters refuse one (they have a single prompt).
    pub fn input_prompt_for(&self, task: Option<usize>) -> Result<Tensor> {
        match (self.is_multitask(), task) {
            (true, Some(t)) => self.to_soft_prompt()?.task_prompt(t).with_context(|| format!("{}", self.dir.display())),
            (false, Some(t)) => bail!(
                "task id {t} was given, but {} is a {} adapter with one prompt for every row (task ids are for MULTITASK_PROMPT_TUNING adapters)",
                self.dir.display(),
                self.config.peft_type().as_str()
            ),
            (_, None) => Ok(self.input_prompt()?.clone()),
        }
    }

    /// For prefix tuning and Cartridges: the per-layer keys and values every input attends to, as a one-row
    /// cache (`KvCache::repeat` makes it a batch's). PEFT's layout: `prompt_embeddings`
    /// `[V, layers·2·kv_dim]` viewed as `[V, layers·2, kv_heads, head_dim]`; entry `2l` is layer
    /// l's keys, `2l+1` its values; the keys are used as they are (no rotary encoding), and the
    /// input's positions start after the `V` prefix positions. None for other methods.
    pub fn prefix_cache(&self, info: &crate::backbone::ModelInfo) -> Result<Option<crate::backbone::KvCache>> {
        if !self.config.peft_type().is_kv_prefix() {
            return Ok(None);
        }
        let shape = crate::prompt::PrefixShape {
            layers: info.layers,
            kv_heads: info.kv_heads,
            head_dim: info.head_dim(),
        };
        let cache = crate::prompt::prefix::flat_to_cache(&self.prompt_embeddings, shape)
            .with_context(|| format!("{}", self.dir.display()))?;
        Ok(Some(cache))
    }

    /// The sequence-classification head `(weight [labels, hidden], bias [labels])`, if saved.
    pub fn classifier(&self) -> Option<(&Tensor, &Tensor)> {
        Some((self.tensors.get(CLASSIFIER_WEIGHT)?, self.tensors.get(CLASSIFIER_BIAS)?))
    }

    /// The adapter's prompt as a learnable prompt-tuning [`SoftPrompt`] (for a p-tuning adapter
    /// this is the encoder's output: PEFT does not save the encoder; a multitask adapter gives
    /// its shared prompt and task factors).
    pub fn to_soft_prompt(&self) -> Result<SoftPrompt> {
        if self.is_multitask() {
            let factors = TaskFactors::new(&self.tensors[PREFIX_TASK_COLS], &self.tensors[PREFIX_TASK_ROWS])?;
            return SoftPrompt::multitask(&self.prompt_embeddings, factors);
        }
        SoftPrompt::prompt_tuning(self.input_prompt()?)
    }

    /// The extra tensors as `(name, tensor)` pairs, ready for [`save_peft`].
    pub fn extra(&self) -> Vec<(String, Tensor)> {
        self.tensors.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// Refuses a tensor holding NaN or an infinity (a prompt that overflowed in training): it would
/// score every row alike, silently.
fn check_finite(t: &Tensor, name: &str, path: &Path) -> Result<()> {
    let values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    if let Some(i) = values.iter().position(|x| !x.is_finite()) {
        bail!(
            "{}: tensor `{name}` holds {} at flat index {i} (of {}); the adapter is broken \
             (did its training diverge?)",
            path.display(),
            values[i],
            values.len()
        );
    }
    Ok(())
}

/// Reads `dir/adapter_config.json` and `dir/adapter_model.safetensors`. Errors name the file
/// and what is wrong: a missing file, bad JSON, a missing field, an unknown `peft_type`, a
/// missing `prompt_embeddings` or one whose shape disagrees with the config, a
/// tensor that is not finite. First completes or removes what an interrupted replacement of
/// `dir` left beside it ([`run_folder::recover_run_folder`]).
pub fn load_peft(dir: &Path) -> Result<PeftAdapter> {
    run_folder::recover_run_folder(dir)?;
    let cfg_path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&cfg_path).with_context(|| format!("cannot read {}", cfg_path.display()))?;
    let value: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", cfg_path.display()))?;
    let config =
        PeftConfig::from_value(&value).with_context(|| format!("{}: invalid adapter config", cfg_path.display()))?;

    let w_path = dir.join(ADAPTER_WEIGHTS);
    let mut tensors = crate::io::read_safetensors(&w_path)?;
    let pe = tensors
        .remove(PROMPT_EMBEDDINGS)
        .with_context(|| format!("{}: tensor `{PROMPT_EMBEDDINGS}` is missing", w_path.display()))?;
    let want = config
        .prompt_embeddings_shape()
        .with_context(|| format!("{}", cfg_path.display()))?;
    if pe.dims() != want {
        bail!(
            "{}: tensor `{PROMPT_EMBEDDINGS}` has shape {:?} but {} says {} ({}) — expected {:?}",
            w_path.display(),
            pe.dims(),
            cfg_path.display(),
            if config.peft_type().is_kv_prefix() {
                "num_virtual_tokens × (num_layers·2·token_dim)"
            } else {
                "num_virtual_tokens × token_dim"
            },
            format_args!(
                "num_virtual_tokens {}, token_dim {}{}",
                config.num_virtual_tokens,
                config.token_dim,
                config
                    .num_layers
                    .map(|l| format!(", num_layers {l}"))
                    .unwrap_or_default()
            ),
            want
        );
    }
    let prompt_embeddings = pe.to_dtype(DType::F32)?;
    check_finite(&prompt_embeddings, PROMPT_EMBEDDINGS, &w_path)?;
    for (name, t) in &tensors {
        check_finite(t, name, &w_path)?;
    }
    if let Some((tasks, ranks)) = config.multitask_shape() {
        let (p, d) = (config.total_virtual_tokens(), config.token_dim);
        for (name, want) in [
            (PREFIX_TASK_COLS, [tasks, p, ranks]),
            (PREFIX_TASK_ROWS, [tasks, ranks, d]),
        ] {
            let t = tensors.get_mut(name).with_context(|| {
                format!(
                    "{}: tensor `{name}` is missing (a MULTITASK_PROMPT_TUNING adapter has it)",
                    w_path.display()
                )
            })?;
            if t.dims() != want {
                bail!(
                    "{}: tensor `{name}` has shape {:?} but {} says {want:?} (num_tasks {tasks}, num_virtual_tokens {p}, num_ranks {ranks}, token_dim {d})",
                    w_path.display(),
                    t.dims(),
                    cfg_path.display()
                );
            }
            *t = t.to_dtype(DType::F32)?;
        }
    }
    Ok(PeftAdapter {
        dir: dir.to_path_buf(),
        config,
        prompt_embeddings,
        tensors,
    })
}

/// Writes a PEFT adapter folder: `adapter_model.safetensors` (`prompt_embeddings` as f32 plus
/// `extra`, e.g. `base_model.classifier.{weight,bias}` for SEQ_CLS, all f32, metadata
/// `{"format": "pt"}`) and `adapter_config.json` (with `inference_mode: true`, as PEFT's
/// `save_pretrained` writes it). For p-tuning pass the encoder's output. Both files are written
/// atomically; the folder is created if needed.
pub fn save_peft(
    dir: &Path,
    config: &PeftConfig,
    prompt_embeddings: &Tensor,
    extra: &[(String, Tensor)],
) -> Result<()> {
    let want = config.prompt_embeddings_shape()?;
    if prompt_embeddings.dims() != want {
        bail!(
            "cannot save the adapter to {}: prompt_embeddings has shape {:?} but the config says {:?}",
            dir.display(),
            prompt_embeddings.dims(),
            want
        );
    }
    let mut tensors: Vec<(String, Tensor)> =
        vec![(PROMPT_EMBEDDINGS.to_string(), prompt_embeddings.to_dtype(DType::F32)?)];
    for (name, t) in extra {
        if tensors.iter().any(|(n, _)| n == name) {
            bail!("cannot save the adapter: tensor `{name}` is given twice");
        }
        tensors.push((name.clone(), t.to_dtype(DType::F32)?));
    }
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    crate::io::write_safetensors(&dir.join(ADAPTER_WEIGHTS), &tensors, Some(metadata))?;
    let mut config = config.clone();
    config.inference_mode = true;
    crate::io::write_bytes(&dir.join(ADAPTER_CONFIG), config.to_json_string().as_bytes())?;
    Ok(())
}
