//! The typed `adapter_config.json` of a PEFT prompt-learning adapter, converted to and from
//! PEFT's JSON object.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

use super::peft_types::{PeftType, TaskType};
use super::python_json::write_python_json;
use super::PEFT_FORMAT_VERSION;
use crate::backbone::ModelInfo;
use crate::prompt::{EncoderKind, EncoderSpec, PromptInit, SoftPrompt};

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

impl PromptTuningFields {
    fn read(fields: &crate::json_fields::JsonFields) -> Result<Self> {
        Ok(Self {
            prompt_tuning_init: fields.opt_str("prompt_tuning_init")?.unwrap_or_else(|| "RANDOM".into()),
            prompt_tuning_init_text: fields.opt_str("prompt_tuning_init_text")?,
            tokenizer_name_or_path: fields.opt_str("tokenizer_name_or_path")?,
            tokenizer_kwargs: fields.opt_value("tokenizer_kwargs"),
        })
    }

    fn write(&self, m: &mut Map<String, Value>) {
        let opt_str = |s: &Option<String>| s.clone().map_or(Value::Null, Value::String);
        let [init, text, tokenizer, kwargs] = PROMPT_TUNING_FIELDS;
        m.insert(init.into(), Value::String(self.prompt_tuning_init.clone()));
        m.insert(text.into(), opt_str(&self.prompt_tuning_init_text));
        m.insert(tokenizer.into(), opt_str(&self.tokenizer_name_or_path));
        m.insert(kwargs.into(), self.tokenizer_kwargs.clone().unwrap_or(Value::Null));
    }
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

    /// The p-tuning encoder this config describes (`None` for the other methods).
    pub fn encoder_spec(&self) -> Result<Option<EncoderSpec>> {
        Ok(self.method.encoder_spec(self.token_dim))
    }

    /// Rows of the saved `prompt_embeddings`: `num_virtual_tokens × num_transformer_submodules`.
    pub fn total_virtual_tokens(&self) -> usize {
        self.num_virtual_tokens * self.num_transformer_submodules.unwrap_or(1)
    }

    /// Shape PEFT saves `prompt_embeddings` in: `[total, token_dim]`, or for prefix tuning
    /// `[total, num_layers·2·token_dim]`.
    pub fn prompt_embeddings_shape(&self) -> Result<[usize; 2]> {
        let cols = if self.peft_type().is_kv_prefix() {
            let layers = self
                .num_layers
                .context("field `num_layers` is needed by a key/value prefix but is null")?;
            layers * 2 * self.token_dim
        } else {
            self.token_dim
        };
        Ok([self.total_virtual_tokens(), cols])
    }

    /// The JSON object PEFT writes (keys sorted when serialised by [`PeftConfig::to_json_string`]).
    pub fn to_value(&self) -> Value {
        let mut m = Map::new();
        let opt_str = |s: &Option<String>| s.clone().map_or(Value::Null, Value::String);
        let opt_usize = |n: Option<usize>| n.map_or(Value::Null, |n| Value::from(n as u64));
        for (k, v) in &self.extra {
            m.insert(k.clone(), v.clone());
        }
        m.insert("auto_mapping".into(), self.auto_mapping.clone().unwrap_or(Value::Null));
        m.insert("base_model_name_or_path".into(), opt_str(&self.base_model_name_or_path));
        m.insert("inference_mode".into(), Value::Bool(self.inference_mode));
        m.insert(
            "modules_to_save".into(),
            self.modules_to_save.as_ref().map_or(Value::Null, |v| {
                Value::Array(v.iter().cloned().map(Value::String).collect())
            }),
        );
        m.insert("num_attention_heads".into(), opt_usize(self.num_attention_heads));
        m.insert("num_layers".into(), opt_usize(self.num_layers));
        m.insert(
            "num_transformer_submodules".into(),
            opt_usize(self.num_transformer_submodules),
        );
        m.insert("num_virtual_tokens".into(), Value::from(self.num_virtual_tokens as u64));
        m.insert("peft_type".into(), Value::String(self.peft_type().as_str().into()));
        m.insert("peft_version".into(), opt_str(&self.peft_version));
        m.insert("revision".into(), opt_str(&self.revision));
        m.insert(
            "task_type".into(),
            self.task_type.map_or(Value::Null, |t| Value::String(t.as_str().into())),
        );
        m.insert("token_dim".into(), Value::from(self.token_dim as u64));
        match &self.method {
            MethodConfig::PromptTuning {
                prompt_tuning_init,
                prompt_tuning_init_text,
                tokenizer_name_or_path,
                tokenizer_kwargs,
            } => PromptTuningFields {
                prompt_tuning_init: prompt_tuning_init.clone(),
                prompt_tuning_init_text: prompt_tuning_init_text.clone(),
                tokenizer_name_or_path: tokenizer_name_or_path.clone(),
                tokenizer_kwargs: tokenizer_kwargs.clone(),
            }
            .write(&mut m),
            MethodConfig::PTuning {
                encoder_reparameterization_type,
                encoder_hidden_size,
                encoder_num_layers,
                encoder_dropout,
            } => {
                m.insert(
                    "encoder_reparameterization_type".into(),
                    Value::String(encoder_reparameterization_type.peft_name().into()),
                );
                m.insert("encoder_hidden_size".into(), opt_usize(*encoder_hidden_size));
                m.insert("encoder_num_layers".into(), Value::from(*encoder_num_layers as u64));
                m.insert(
                    "encoder_dropout".into(),
                    serde_json::Number::from_f64(*encoder_dropout).map_or(Value::Null, Value::Number),
                );
            }
            MethodConfig::PrefixTuning {
                encoder_hidden_size,
                prefix_projection,
                init_weights,
            } => {
                m.insert("encoder_hidden_size".into(), opt_usize(*encoder_hidden_size));
                m.insert("prefix_projection".into(), Value::Bool(*prefix_projection));
                m.insert("init_weights".into(), opt_str(init_weights));
            }
            MethodConfig::Cartridge { num_frozen_tokens } => {
                m.insert("num_frozen_tokens".into(), Value::from(*num_frozen_tokens as u64));
            }
            MethodConfig::MultitaskPromptTuning {
                prompt,
                prompt_tuning_init_state_dict_path,
                prompt_tuning_init_task,
                num_ranks,
                num_tasks,
            } => {
                prompt.write(&mut m);
                m.insert(
                    "prompt_tuning_init_state_dict_path".into(),
                    opt_str(prompt_tuning_init_state_dict_path),
                );
                m.insert("prompt_tuning_init_task".into(), opt_usize(*prompt_tuning_init_task));
                m.insert("num_ranks".into(), Value::from(*num_ranks as u64));
                m.insert("num_tasks".into(), Value::from(*num_tasks as u64));
            }
        }
        Value::Object(m)
    }

    /// Parses PEFT's JSON object; errors name the field.
    pub fn from_value(value: &Value) -> Result<Self> {
        let obj = value
            .as_object()
            .with_context(|| format!("expected a JSON object, found {}", kind_of(value)))?;
        let fields = crate::json_fields::JsonFields::new(obj);
        let peft_type = PeftType::parse(&fields.req_str("peft_type")?).context("field `peft_type`")?;
        let method = match peft_type {
            PeftType::PromptTuning => {
                let f = PromptTuningFields::read(&fields)?;
                MethodConfig::PromptTuning {
                    prompt_tuning_init: f.prompt_tuning_init,
                    prompt_tuning_init_text: f.prompt_tuning_init_text,
                    tokenizer_name_or_path: f.tokenizer_name_or_path,
                    tokenizer_kwargs: f.tokenizer_kwargs,
                }
            }
            PeftType::PTuning => {
                let kind = match fields.opt_str("encoder_reparameterization_type")? {
                    None => EncoderKind::Mlp,
                    Some(name) => {
                        EncoderKind::from_peft_name(&name).context("field `encoder_reparameterization_type`")?
                    }
                };
                MethodConfig::PTuning {
                    encoder_reparameterization_type: kind,
                    encoder_hidden_size: fields.opt_usize("encoder_hidden_size")?,
                    encoder_num_layers: fields.opt_usize("encoder_num_layers")?.unwrap_or(2),
                    encoder_dropout: fields.opt_f64("encoder_dropout")?.unwrap_or(0.0),
                }
            }
            PeftType::PrefixTuning => MethodConfig::PrefixTuning {
                encoder_hidden_size: fields.opt_usize("encoder_hidden_size")?,
                prefix_projection: fields.opt_bool("prefix_projection")?.unwrap_or(false),
                init_weights: fields.opt_str("init_weights")?,
            },
            PeftType::Cartridge => MethodConfig::Cartridge {
                num_frozen_tokens: fields.opt_usize("num_frozen_tokens")?.unwrap_or(1),
            },
            PeftType::MultitaskPromptTuning => {
                let at_least_1 = |name: &str| -> Result<usize> {
                    let n = fields.opt_usize(name)?.unwrap_or(1);
                    if n == 0 {
                        bail!("field `{name}` must be at least 1");
                    }
                    Ok(n)
                };
                MethodConfig::MultitaskPromptTuning {
                    prompt: PromptTuningFields::read(&fields)?,
                    prompt_tuning_init_state_dict_path: fields.opt_str("prompt_tuning_init_state_dict_path")?,
                    prompt_tuning_init_task: fields.opt_usize("prompt_tuning_init_task")?,
                    num_ranks: at_least_1("num_ranks")?,
                    num_tasks: at_least_1("num_tasks")?,
                }
            }
        };
        let task_type = match fields.opt_str("task_type")? {
            None => None,
            Some(s) => Some(TaskType::parse(&s).context("field `task_type`")?),
        };
        let modules_to_save = match fields.opt_value("modules_to_save") {
            None => None,
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_string)
                            .with_context(|| format!("field `modules_to_save` should hold strings, found {v}"))
                    })
                    .collect::<Result<Vec<_>>>()?,
            ),
            Some(v) => bail!("field `modules_to_save` should be a list of strings, found {v}"),
        };
        let num_virtual_tokens = fields.req_usize("num_virtual_tokens")?;
        if num_virtual_tokens == 0 {
            bail!("field `num_virtual_tokens` must be at least 1");
        }
        let token_dim = fields.req_usize("token_dim")?;
        if token_dim == 0 {
            bail!("field `token_dim` must be at least 1");
        }
        let known = known_fields(peft_type);
        let extra = obj
            .iter()
            .filter(|(k, _)| !known.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(PeftConfig {
            method,
            task_type,
            num_virtual_tokens,
            token_dim,
            num_transformer_submodules: fields.opt_usize("num_transformer_submodules")?,
            num_attention_heads: fields.opt_usize("num_attention_heads")?,
            num_layers: fields.opt_usize("num_layers")?,
            base_model_name_or_path: fields.opt_str("base_model_name_or_path")?,
            revision: fields.opt_str("revision")?,
            inference_mode: fields.opt_bool("inference_mode")?.unwrap_or(false),
            modules_to_save,
            auto_mapping: fields.opt_value("auto_mapping"),
            peft_version: fields.opt_str("peft_version")?,
            extra,
        })
    }

    /// PEFT's exact text: `json.dumps(config, indent=2, sort_keys=True)` (ASCII, Python's float
    /// spelling, no trailing newline).
    pub fn to_json_string(&self) -> String {
        let mut out = String::new();
        write_python_json(&self.to_value(), 0, &mut out);
        out
    }

    /// Parses the text of an `adapter_config.json`.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).context("not valid JSON")?;
        Self::from_value(&value)
    }
}

/// The model file's (or folder's) name, as `base_model_name_or_path`.
fn model_name(info: &ModelInfo) -> String {
    info.source
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| info.source.display().to_string())
}

impl TryFrom<Value> for PeftConfig {
    type Error = String;
    fn try_from(value: Value) -> std::result::Result<Self, String> {
        PeftConfig::from_value(&value).map_err(|e| format!("{e:#}"))
    }
}

impl From<PeftConfig> for Value {
    fn from(c: PeftConfig) -> Value {
        c.to_value()
    }
}

/// The JSON fields of [`PromptTuningFields`].
const PROMPT_TUNING_FIELDS: [&str; 4] = [
    "prompt_tuning_init",
    "prompt_tuning_init_text",
    "tokenizer_name_or_path",
    "tokenizer_kwargs",
];

fn known_fields(t: PeftType) -> Vec<&'static str> {
    let mut v = vec![
        "auto_mapping",
        "base_model_name_or_path",
        "inference_mode",
        "modules_to_save",
        "num_attention_heads",
        "num_layers",
        "num_transformer_submodules",
        "num_virtual_tokens",
        "peft_type",
        "peft_version",
        "revision",
        "task_type",
        "token_dim",
    ];
    v.extend_from_slice(match t {
        PeftType::PromptTuning => &PROMPT_TUNING_FIELDS[..],
        PeftType::PTuning => &[
            "encoder_reparameterization_type",
            "encoder_hidden_size",
            "encoder_num_layers",
            "encoder_dropout",
        ][..],
        PeftType::PrefixTuning => &["encoder_hidden_size", "prefix_projection", "init_weights"][..],
        PeftType::Cartridge => &["num_frozen_tokens"][..],
        PeftType::MultitaskPromptTuning => &[
            PROMPT_TUNING_FIELDS[0],
            PROMPT_TUNING_FIELDS[1],
            PROMPT_TUNING_FIELDS[2],
            PROMPT_TUNING_FIELDS[3],
            "prompt_tuning_init_state_dict_path",
            "prompt_tuning_init_task",
            "num_ranks",
            "num_tasks",
        ][..],
    });
    v
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}
