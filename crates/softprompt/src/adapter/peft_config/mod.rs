//! The typed `adapter_config.json` of a PEFT prompt-learning adapter, converted to and from
//! PEFT's JSON object.
//!
//! This file holds the types and what is derived from them (a config for a model, the saved
//! tensor's shape); `json` reads and writes PEFT's JSON object.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

use super::peft_types::{PeftType, TaskType};
use super::PEFT_FORMAT_VERSION;
use crate::backbone::ModelInfo;
use crate::prompt::cpt::CptConfig;
use crate::prompt::{EncoderKind, EncoderSpec, PromptInit, SoftPrompt};

mod json;

/// The fields specific to one prompt-learning method.
#[derive(Debug, Clone, PartialEq)]
pub enum MethodConfig {
    /// `PromptTuningConfig`.
    PromptTuning {
        /// `RANDOM`, `SAMPLE_VOCAB` or `TEXT`.
        prompt_tuning_init: String,
        /// The TEXT init's text.
        prompt_tuning_init_text: Option<String>,
        /// Tokenizer PEFT loads for the TEXT init (required by PEFT when the init is TEXT).
        tokenizer_name_or_path: Option<String>,
        /// Extra arguments for that tokenizer.
        tokenizer_kwargs: Option<Value>,
    },
    /// `PromptEncoderConfig`.
    PTuning {
        /// `MLP` or `LSTM`.
        encoder_reparameterization_type: EncoderKind,
        /// Hidden width of the encoder (PEFT uses `token_dim` when null).
        encoder_hidden_size: Option<usize>,
        /// LSTM layers (PEFT ignores it for the MLP, which always has 2 hidden layers).
        encoder_num_layers: usize,
        /// LSTM inter-layer dropout.
        encoder_dropout: f64,
    },
    /// `PrefixTuningConfig`.
    PrefixTuning {
        /// Hidden width of the projection MLP.
        encoder_hidden_size: Option<usize>,
        /// Whether the prefix went through the projection MLP.
        prefix_projection: bool,
        /// `"zero"` or null.
        init_weights: Option<String>,
    },
    /// `CartridgeConfig`.
    Cartridge {
        /// The first virtual tokens kept frozen during training.
        num_frozen_tokens: usize,
    },
    /// `MultitaskPromptTuningConfig`.
    MultitaskPromptTuning {
        /// The prompt-tuning fields (init, its text, the tokenizer), as for prompt tuning; the
        /// init is `RANDOM`, `TEXT`, `AVERAGE_SOURCE_TASKS`, `EXACT_SOURCE_TASK` or
        /// `ONLY_SOURCE_SHARED`.
        prompt: PromptTuningFields,
        /// The source state dict of the source-task inits (PEFT reads it again when it loads
        /// an adapter with such an init).
        prompt_tuning_init_state_dict_path: Option<String>,
        /// The source task of `EXACT_SOURCE_TASK`.
        prompt_tuning_init_task: Option<usize>,
        /// Rank `r` of each task's factors.
        num_ranks: usize,
        /// Number of tasks.
        num_tasks: usize,
    },
    /// `CPTConfig`: the context, its token types and how it learns.
    Cpt {
        /// `cpt_token_ids`, `cpt_mask`, `cpt_tokens_type_mask` and the `opt_*` fields.
        cpt: CptConfig,
        /// `tokenizer_name_or_path` (PEFT keeps it; it does not read it to load an adapter).
        tokenizer_name_or_path: Option<String>,
    },
}

/// The fields prompt tuning and multitask prompt tuning share.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptTuningFields {
    /// `prompt_tuning_init`.
    pub prompt_tuning_init: String,
    /// The TEXT init's text.
    pub prompt_tuning_init_text: Option<String>,
    /// Tokenizer PEFT loads for the TEXT init.
    pub tokenizer_name_or_path: Option<String>,
    /// Extra arguments for that tokenizer.
    pub tokenizer_kwargs: Option<Value>,
}

impl MethodConfig {
    /// The method's `peft_type`.
    pub fn peft_type(&self) -> PeftType {
        match self {
            MethodConfig::PromptTuning { .. } => PeftType::PromptTuning,
            MethodConfig::PTuning { .. } => PeftType::PTuning,
            MethodConfig::PrefixTuning { .. } => PeftType::PrefixTuning,
            MethodConfig::Cartridge { .. } => PeftType::Cartridge,
            MethodConfig::MultitaskPromptTuning { .. } => PeftType::MultitaskPromptTuning,
            MethodConfig::Cpt { .. } => PeftType::Cpt,
        }
    }

    /// Prompt tuning started from `init`. A TEXT init records the text and `tokenizer` (PEFT
    /// refuses a TEXT config whose `tokenizer_name_or_path` is empty, so pass one; PEFT does not
    /// read it when loading for inference); inits PEFT has no name for are recorded as RANDOM.
    pub fn prompt_tuning(init: &PromptInit, tokenizer: Option<&str>) -> Self {
        let (text, tok) = match init {
            PromptInit::Text(t) => (Some(t.clone()), tokenizer.map(str::to_string)),
            _ => (None, None),
        };
        MethodConfig::PromptTuning {
            prompt_tuning_init: init.peft_name().to_string(),
            prompt_tuning_init_text: text,
            tokenizer_name_or_path: tok,
            tokenizer_kwargs: None,
        }
    }

    /// P-tuning with the given encoder.
    pub fn p_tuning(spec: &EncoderSpec) -> Self {
        let (layers, dropout) = match spec {
            EncoderSpec::Mlp { .. } => (2, 0.0),
            EncoderSpec::Lstm {
                num_layers, dropout, ..
            } => (*num_layers, *dropout),
        };
        MethodConfig::PTuning {
            encoder_reparameterization_type: spec.kind(),
            encoder_hidden_size: Some(spec.hidden()),
            encoder_num_layers: layers,
            encoder_dropout: dropout,
        }
    }

    /// The p-tuning encoder this config describes (`token_dim` stands in for a null hidden size).
    pub fn encoder_spec(&self, token_dim: usize) -> Option<EncoderSpec> {
        match self {
            MethodConfig::PTuning {
                encoder_reparameterization_type,
                encoder_hidden_size,
                encoder_num_layers,
                encoder_dropout,
            } => Some(EncoderSpec::new(
                *encoder_reparameterization_type,
                encoder_hidden_size.unwrap_or(token_dim),
                *encoder_num_layers,
                *encoder_dropout,
            )),
            _ => None,
        }
    }
}

/// A PEFT prompt-learning `adapter_config.json`.
///
/// Serialises (serde) to and from PEFT's JSON object; fields this crate does not know are kept
/// in `extra` and written back unchanged. Use [`PeftConfig::to_json_string`] for PEFT's exact
/// text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Value", into = "Value")]
pub struct PeftConfig {
    /// Method-specific fields (decides `peft_type`).
    pub method: MethodConfig,
    /// `task_type`.
    pub task_type: Option<TaskType>,
    /// `num_virtual_tokens` (p).
    pub num_virtual_tokens: usize,
    /// `token_dim`: the hidden size (prefix tuning: key/value width `kv_heads × head_dim`).
    pub token_dim: usize,
    /// `num_transformer_submodules` (1 for decoders and encoders, 2 for encoder-decoders).
    pub num_transformer_submodules: Option<usize>,
    /// `num_attention_heads` (prefix tuning: key/value heads).
    pub num_attention_heads: Option<usize>,
    /// `num_layers`.
    pub num_layers: Option<usize>,
    /// `base_model_name_or_path`.
    pub base_model_name_or_path: Option<String>,
    /// `revision`.
    pub revision: Option<String>,
    /// `inference_mode` (PEFT saves `true`).
    pub inference_mode: bool,
    /// `modules_to_save` (PEFT 0.21 writes `["classifier", "score", "classifier", "score"]` for
    /// SEQ_CLS).
    pub modules_to_save: Option<Vec<String>>,
    /// `auto_mapping`.
    pub auto_mapping: Option<Value>,
    /// `peft_version`.
    pub peft_version: Option<String>,
    /// Fields not listed above, kept verbatim.
    pub extra: BTreeMap<String, Value>,
}

impl PeftConfig {
    /// A config for `method` on the model `info`, filled in as PEFT fills it: `token_dim` and
    /// `num_attention_heads` from the model (for prefix tuning the key/value width and heads),
    /// `num_layers`, one transformer submodule, `inference_mode: true`, PEFT's `modules_to_save`
    /// for SEQ_CLS, and the model file's name as `base_model_name_or_path`.
    pub fn new(method: MethodConfig, task_type: TaskType, num_virtual_tokens: usize, info: &ModelInfo) -> Self {
        let (token_dim, heads) = if method.peft_type().is_kv_prefix() {
            (info.head_dim() * info.kv_heads, info.kv_heads)
        } else {
            (info.hidden, info.heads)
        };
        let name = model_name(info);
        let modules_to_save = (task_type == TaskType::SeqCls).then(|| {
            ["classifier", "score", "classifier", "score"]
                .iter()
                .map(|s| s.to_string())
                .collect()
        });
        PeftConfig {
            method,
            task_type: Some(task_type),
            num_virtual_tokens,
            token_dim,
            num_transformer_submodules: Some(1),
            num_attention_heads: Some(heads),
            num_layers: Some(info.layers),
            base_model_name_or_path: Some(name),
            revision: None,
            inference_mode: true,
            modules_to_save,
            auto_mapping: None,
            peft_version: Some(PEFT_FORMAT_VERSION.to_string()),
            extra: BTreeMap::new(),
        }
    }

    /// The config describing `prompt` (prompt tuning or p-tuning) trained from `init` (a TEXT
    /// init names the model as its tokenizer).
    pub fn for_prompt(prompt: &SoftPrompt, init: &PromptInit, task_type: TaskType, info: &ModelInfo) -> Self {
        let name = model_name(info);
        let method = match prompt.encoder() {
            Some(enc) => MethodConfig::p_tuning(&enc.spec()),
            None => MethodConfig::prompt_tuning(init, Some(&name)),
        };
        Self::new(method, task_type, prompt.num_virtual_tokens(), info)
    }

    /// `peft_type`.
    pub fn peft_type(&self) -> PeftType {
        self.method.peft_type()
    }

    /// A multitask prompt's `(num_tasks, num_ranks)`; `None` for the other methods.
    pub fn multitask_shape(&self) -> Option<(usize, usize)> {
        match &self.method {
            MethodConfig::MultitaskPromptTuning {
                num_tasks, num_ranks, ..
            } => Some((*num_tasks, *num_ranks)),
            _ => None,
        }
    }

    /// A CPT adapter's context and options; `None` for the other methods.
    pub fn cpt(&self) -> Option<&CptConfig> {
        match &self.method {
            MethodConfig::Cpt { cpt, .. } => Some(cpt),
            _ => None,
        }
    }

    /// The p-tuning encoder this config describes (`None` for the other methods).
    pub fn encoder_spec(&self) -> Result<Option<EncoderSpec>> {
        Ok(self.method.encoder_spec(self.token_dim))
    }

    /// Rows of the saved `prompt_embeddings`: `num_virtual_tokens × num_transformer_submodules`
    /// (`usize::MAX` when the product does not fit, which
    /// [`PeftConfig::prompt_embeddings_shape`] refuses).
    pub fn total_virtual_tokens(&self) -> usize {
        self.num_virtual_tokens
            .saturating_mul(self.num_transformer_submodules.unwrap_or(1))
    }

    /// Shape PEFT saves `prompt_embeddings` in: `[total, token_dim]`, or for prefix tuning
    /// `[total, num_layers·2·token_dim]`. An error names the fields whose product is too large.
    pub fn prompt_embeddings_shape(&self) -> Result<[usize; 2]> {
        let rows = self
            .num_virtual_tokens
            .checked_mul(self.num_transformer_submodules.unwrap_or(1))
            .with_context(|| {
                format!(
                    "fields `num_virtual_tokens` ({}) × `num_transformer_submodules` ({}) are too large \
                     a number of rows",
                    self.num_virtual_tokens,
                    self.num_transformer_submodules.unwrap_or(1)
                )
            })?;
        let cols = if self.peft_type().is_kv_prefix() {
            let layers = self
                .num_layers
                .context("field `num_layers` is needed by a key/value prefix but is null")?;
            layers
                .checked_mul(2)
                .and_then(|n| n.checked_mul(self.token_dim))
                .with_context(|| {
                    format!(
                        "fields `num_layers` ({layers}) × 2 × `token_dim` ({}) are too large a width",
                        self.token_dim
                    )
                })?
        } else {
            self.token_dim
        };
        Ok([rows, cols])
    }
}

/// The model file's (or folder's) name, as `base_model_name_or_path`.
fn model_name(info: &ModelInfo) -> String {
    info.source
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| info.source.display().to_string())
}
