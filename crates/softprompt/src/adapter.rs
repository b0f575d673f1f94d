//! HF PEFT adapter files, read and written exactly as PEFT 0.21 does:
//!
//! - `adapter_config.json`: the prompt-learning config, written like
//!   `json.dumps(config, indent=2, sort_keys=True)` (ASCII only, no trailing newline);
//! - `adapter_model.safetensors`: `prompt_embeddings` (f32 `[p·submodules, d]`; for p-tuning the
//!   encoder's **output**, for prefix tuning the `[p, layers·2·d_kv]` key/value prefix), plus
//!   `base_model.classifier.{weight,bias}` for sequence classification; metadata
//!   `{"format": "pt"}`.
//!
//! PEFT never saves a p-tuning encoder, so such an adapter is, for inference, a plain prompt;
//! training state (the encoder included) is [`crate::prompt::SoftPrompt::tensors`]' job.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::backbone::ModelInfo;
use crate::prompt::{EncoderSpec, PromptInit, SoftPrompt, PROMPT_EMBEDDINGS};

/// File name of the adapter configuration.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// File name of the adapter weights.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The PEFT release whose file format this module reads and writes (written as `peft_version`).
pub const PEFT_FORMAT_VERSION: &str = "0.21.2";
/// Tensor names of a sequence-classification head as PEFT saves it (`modules_to_save`).
pub const CLASSIFIER_WEIGHT: &str = "base_model.classifier.weight";
/// See [`CLASSIFIER_WEIGHT`].
pub const CLASSIFIER_BIAS: &str = "base_model.classifier.bias";

/// PEFT's `peft_type` values this crate understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeftType {
    /// `PROMPT_TUNING`.
    PromptTuning,
    /// `P_TUNING`.
    PTuning,
    /// `PREFIX_TUNING`.
    PrefixTuning,
}

impl PeftType {
    /// The string PEFT writes.
    pub fn as_str(self) -> &'static str {
        match self {
            PeftType::PromptTuning => "PROMPT_TUNING",
            PeftType::PTuning => "P_TUNING",
            PeftType::PrefixTuning => "PREFIX_TUNING",
        }
    }

    /// Parses PEFT's string.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "PROMPT_TUNING" => PeftType::PromptTuning,
            "P_TUNING" => PeftType::PTuning,
            "PREFIX_TUNING" => PeftType::PrefixTuning,
            other => bail!("unknown peft_type `{other}` (supported: PROMPT_TUNING, P_TUNING, PREFIX_TUNING)"),
        })
    }
}

/// PEFT's `task_type` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskType {
    /// `CAUSAL_LM`.
    CausalLm,
    /// `SEQ_CLS`.
    SeqCls,
    /// `SEQ_2_SEQ_LM`.
    Seq2SeqLm,
    /// `TOKEN_CLS`.
    TokenCls,
    /// `QUESTION_ANS`.
    QuestionAns,
    /// `FEATURE_EXTRACTION`.
    FeatureExtraction,
}

impl TaskType {
    /// The string PEFT writes.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskType::CausalLm => "CAUSAL_LM",
            TaskType::SeqCls => "SEQ_CLS",
            TaskType::Seq2SeqLm => "SEQ_2_SEQ_LM",
            TaskType::TokenCls => "TOKEN_CLS",
            TaskType::QuestionAns => "QUESTION_ANS",
            TaskType::FeatureExtraction => "FEATURE_EXTRACTION",
        }
    }

    /// Parses PEFT's string.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "CAUSAL_LM" => TaskType::CausalLm,
            "SEQ_CLS" => TaskType::SeqCls,
            "SEQ_2_SEQ_LM" => TaskType::Seq2SeqLm,
            "TOKEN_CLS" => TaskType::TokenCls,
            "QUESTION_ANS" => TaskType::QuestionAns,
            "FEATURE_EXTRACTION" => TaskType::FeatureExtraction,
            other => bail!(
                "unknown task_type `{other}` (PEFT's task types: CAUSAL_LM, SEQ_CLS, SEQ_2_SEQ_LM, TOKEN_CLS, \
                 QUESTION_ANS, FEATURE_EXTRACTION)"
            ),
        })
    }
}

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
        encoder_reparameterization_type: String,
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
}

impl MethodConfig {
    /// The method's `peft_type`.
    pub fn peft_type(&self) -> PeftType {
        match self {
            MethodConfig::PromptTuning { .. } => PeftType::PromptTuning,
            MethodConfig::PTuning { .. } => PeftType::PTuning,
            MethodConfig::PrefixTuning { .. } => PeftType::PrefixTuning,
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
            encoder_reparameterization_type: spec.peft_name().to_string(),
            encoder_hidden_size: Some(spec.hidden()),
            encoder_num_layers: layers,
            encoder_dropout: dropout,
        }
    }

    /// The p-tuning encoder this config describes (`token_dim` stands in for a null hidden size).
    pub fn encoder_spec(&self, token_dim: usize) -> Result<Option<EncoderSpec>> {
        match self {
            MethodConfig::PTuning {
                encoder_reparameterization_type,
                encoder_hidden_size,
                encoder_num_layers,
                encoder_dropout,
            } => {
                let hidden = encoder_hidden_size.unwrap_or(token_dim);
                match encoder_reparameterization_type.as_str() {
                    "MLP" => Ok(Some(EncoderSpec::Mlp { hidden })),
                    "LSTM" => Ok(Some(EncoderSpec::Lstm {
                        hidden,
                        num_layers: *encoder_num_layers,
                        dropout: *encoder_dropout,
                    })),
                    other => bail!(
                        "field `encoder_reparameterization_type`: unknown encoder `{other}` (expected MLP or LSTM)"
                    ),
                }
            }
            _ => Ok(None),
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
        let (token_dim, heads) = match method {
            MethodConfig::PrefixTuning { .. } => (info.head_dim() * info.kv_heads, info.kv_heads),
            _ => (info.hidden, info.heads),
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

    /// The p-tuning encoder this config describes (`None` for the other methods).
    pub fn encoder_spec(&self) -> Result<Option<EncoderSpec>> {
        self.method.encoder_spec(self.token_dim)
    }

    /// Rows of the saved `prompt_embeddings`: `num_virtual_tokens × num_transformer_submodules`.
    pub fn total_virtual_tokens(&self) -> usize {
        self.num_virtual_tokens * self.num_transformer_submodules.unwrap_or(1)
    }

    /// Shape PEFT saves `prompt_embeddings` in: `[total, token_dim]`, or for prefix tuning
    /// `[total, num_layers·2·token_dim]`.
    pub fn prompt_embeddings_shape(&self) -> Result<[usize; 2]> {
        let cols = match self.method {
            MethodConfig::PrefixTuning { .. } => {
                let layers = self
                    .num_layers
                    .context("field `num_layers` is needed by prefix tuning but is null")?;
                layers * 2 * self.token_dim
            }
            _ => self.token_dim,
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
            } => {
                m.insert("prompt_tuning_init".into(), Value::String(prompt_tuning_init.clone()));
                m.insert("prompt_tuning_init_text".into(), opt_str(prompt_tuning_init_text));
                m.insert("tokenizer_name_or_path".into(), opt_str(tokenizer_name_or_path));
                m.insert(
                    "tokenizer_kwargs".into(),
                    tokenizer_kwargs.clone().unwrap_or(Value::Null),
                );
            }
            MethodConfig::PTuning {
                encoder_reparameterization_type,
                encoder_hidden_size,
                encoder_num_layers,
                encoder_dropout,
            } => {
                m.insert(
                    "encoder_reparameterization_type".into(),
                    Value::String(encoder_reparameterization_type.clone()),
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
        }
        Value::Object(m)
    }

    /// Parses PEFT's JSON object; errors name the field.
    pub fn from_value(value: &Value) -> Result<Self> {
        let obj = value
            .as_object()
            .with_context(|| format!("expected a JSON object, found {}", kind_of(value)))?;
        let f = crate::json_fields::JsonFields::new(obj);
        let peft_type = PeftType::parse(&f.req_str("peft_type")?).context("field `peft_type`")?;
        let method = match peft_type {
            PeftType::PromptTuning => MethodConfig::PromptTuning {
                prompt_tuning_init: f.opt_str("prompt_tuning_init")?.unwrap_or_else(|| "RANDOM".into()),
                prompt_tuning_init_text: f.opt_str("prompt_tuning_init_text")?,
                tokenizer_name_or_path: f.opt_str("tokenizer_name_or_path")?,
                tokenizer_kwargs: f.opt_value("tokenizer_kwargs"),
            },
            PeftType::PTuning => {
                let kind = f
                    .opt_str("encoder_reparameterization_type")?
                    .unwrap_or_else(|| "MLP".into());
                if kind != "MLP" && kind != "LSTM" {
                    bail!("field `encoder_reparameterization_type`: unknown encoder `{kind}` (expected MLP or LSTM)");
                }
                MethodConfig::PTuning {
                    encoder_reparameterization_type: kind,
                    encoder_hidden_size: f.opt_usize("encoder_hidden_size")?,
                    encoder_num_layers: f.opt_usize("encoder_num_layers")?.unwrap_or(2),
                    encoder_dropout: f.opt_f64("encoder_dropout")?.unwrap_or(0.0),
                }
            }
            PeftType::PrefixTuning => MethodConfig::PrefixTuning {
                encoder_hidden_size: f.opt_usize("encoder_hidden_size")?,
                prefix_projection: f.opt_bool("prefix_projection")?.unwrap_or(false),
                init_weights: f.opt_str("init_weights")?,
            },
        };
        let task_type = match f.opt_str("task_type")? {
            None => None,
            Some(s) => Some(TaskType::parse(&s).context("field `task_type`")?),
        };
        let modules_to_save = match f.opt_value("modules_to_save") {
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
        let num_virtual_tokens = f.req_usize("num_virtual_tokens")?;
        if num_virtual_tokens == 0 {
            bail!("field `num_virtual_tokens` must be at least 1");
        }
        let token_dim = f.req_usize("token_dim")?;
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
            num_transformer_submodules: f.opt_usize("num_transformer_submodules")?,
            num_attention_heads: f.opt_usize("num_attention_heads")?,
            num_layers: f.opt_usize("num_layers")?,
            base_model_name_or_path: f.opt_str("base_model_name_or_path")?,
            revision: f.opt_str("revision")?,
            inference_mode: f.opt_bool("inference_mode")?.unwrap_or(false),
            modules_to_save,
            auto_mapping: f.opt_value("auto_mapping"),
            peft_version: f.opt_str("peft_version")?,
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
        PeftType::PromptTuning => &[
            "prompt_tuning_init",
            "prompt_tuning_init_text",
            "tokenizer_name_or_path",
            "tokenizer_kwargs",
        ][..],
        PeftType::PTuning => &[
            "encoder_reparameterization_type",
            "encoder_hidden_size",
            "encoder_num_layers",
            "encoder_dropout",
        ][..],
        PeftType::PrefixTuning => &["encoder_hidden_size", "prefix_projection", "init_weights"][..],
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

/// Python's `json.dumps(v, indent=2, sort_keys=True)` (with the default `ensure_ascii=True`).
fn write_python_json(v: &Value, level: usize, out: &mut String) {
    let pad = |out: &mut String, level: usize| out.extend(std::iter::repeat_n(' ', 2 * level));
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                let _ = write!(out, "{i}");
            } else if let Some(u) = n.as_u64() {
                let _ = write!(out, "{u}");
            } else {
                out.push_str(&python_float(n.as_f64().unwrap_or(f64::NAN)));
            }
        }
        Value::String(s) => write_python_str(s, out),
        Value::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push_str("[\n");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(",\n");
                }
                pad(out, level + 1);
                write_python_json(item, level + 1, out);
            }
            out.push('\n');
            pad(out, level);
            out.push(']');
        }
        Value::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            let mut keys: Vec<&String> = map.keys().collect();
            // Python sorts str keys by code point; Rust's str order (UTF-8 bytes) is the same.
            keys.sort();
            out.push_str("{\n");
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(",\n");
                }
                pad(out, level + 1);
                write_python_str(k, out);
                out.push_str(": ");
                write_python_json(&map[*k], level + 1, out);
            }
            out.push('\n');
            pad(out, level);
            out.push('}');
        }
    }
}

fn write_python_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: shortest round-trip digits, fixed notation for exponents −4..15,
/// otherwise `d.ddde±XX`.
fn python_float(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    if (-4..16).contains(&exp) {
        let n = digits.len() as i32;
        let point = exp + 1; // digits before the decimal point
        let body = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else if point >= n {
            format!("{}{}.0", digits, "0".repeat((point - n) as usize))
        } else {
            format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
        };
        format!("{sign}{body}")
    } else {
        let m = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits
        };
        let es = if exp < 0 { '-' } else { '+' };
        format!("{sign}{m}e{es}{:02}", exp.abs())
    }
}

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
    /// The prompt matrix `[p, d]` to prepend to the input embeddings (prompt tuning and
    /// p-tuning); an error for prefix tuning, whose prompt enters every attention layer.
    pub fn input_prompt(&self) -> Result<&Tensor> {
        match self.config.peft_type() {
            PeftType::PrefixTuning => bail!(
                "{}: prefix tuning inference is not supported yet (the adapter holds per-layer key/value prefixes)",
                self.dir.display()
            ),
            _ => Ok(&self.prompt_embeddings),
        }
    }

    /// The sequence-classification head `(weight [labels, hidden], bias [labels])`, if saved.
    pub fn classifier(&self) -> Option<(&Tensor, &Tensor)> {
        Some((self.tensors.get(CLASSIFIER_WEIGHT)?, self.tensors.get(CLASSIFIER_BIAS)?))
    }

    /// The adapter's prompt as a learnable prompt-tuning [`SoftPrompt`] (for a p-tuning adapter
    /// this is the encoder's output: PEFT does not save the encoder).
    pub fn to_soft_prompt(&self) -> Result<SoftPrompt> {
        SoftPrompt::prompt_tuning(self.input_prompt()?)
    }

    /// The extra tensors as `(name, tensor)` pairs, ready for [`save_peft`].
    pub fn extra(&self) -> Vec<(String, Tensor)> {
        self.tensors.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// Reads `dir/adapter_config.json` and `dir/adapter_model.safetensors`. Errors name the file
/// and what is wrong: a missing file, bad JSON, a missing field, an unknown `peft_type`, a
/// missing `prompt_embeddings` or one whose shape disagrees with the config.
pub fn load_peft(dir: &Path) -> Result<PeftAdapter> {
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
            match config.peft_type() {
                PeftType::PrefixTuning => "num_virtual_tokens × (num_layers·2·token_dim)",
                _ => "num_virtual_tokens × token_dim",
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

/// Refuses an adapter made for a different model: `token_dim` ≠ the hidden size (prefix
/// tuning: ≠ key/value width), `num_layers` ≠ the model's layers, a different attention-head
/// count, more than one transformer submodule, or a task the model cannot run (SEQ_CLS on a
/// causal model, CAUSAL_LM on an encoder, SEQ_2_SEQ_LM on either).
pub fn check_compatible(config: &PeftConfig, info: &ModelInfo) -> Result<()> {
    let model = info.source.display();
    let (dim, dim_what, heads, heads_what) = match config.peft_type() {
        PeftType::PrefixTuning => (
            info.head_dim() * info.kv_heads,
            "key/value width (kv_heads × head_dim)",
            info.kv_heads,
            "key/value heads",
        ),
        _ => (info.hidden, "hidden size", info.heads, "attention heads"),
    };
    if config.token_dim != dim {
        bail!(
            "the adapter does not fit model {model}: adapter token_dim is {} but the model's {dim_what} is {dim}",
            config.token_dim
        );
    }
    if let Some(layers) = config.num_layers {
        if layers != info.layers {
            bail!(
                "the adapter does not fit model {model}: adapter num_layers is {layers} but the model has {} layers",
                info.layers
            );
        }
    }
    if let Some(h) = config.num_attention_heads {
        if h != heads {
            bail!(
                "the adapter does not fit model {model}: adapter num_attention_heads is {h} but the model has {heads} {heads_what}"
            );
        }
    }
    if let Some(n) = config.num_transformer_submodules {
        if n != 1 {
            bail!(
                "the adapter does not fit model {model}: adapter num_transformer_submodules is {n} (an encoder-decoder \
                 adapter) but the model has 1"
            );
        }
    }
    let kind = if info.arch.is_causal() {
        "a causal language model"
    } else {
        "an encoder"
    };
    match config.task_type {
        Some(TaskType::SeqCls) if info.arch.is_causal() => {
            bail!(
                "the adapter's task_type is SEQ_CLS but model {model} ({:?}) is {kind}",
                info.arch
            )
        }
        Some(TaskType::CausalLm) if !info.arch.is_causal() => {
            bail!(
                "the adapter's task_type is CAUSAL_LM but model {model} ({:?}) is {kind}",
                info.arch
            )
        }
        Some(TaskType::Seq2SeqLm) => {
            bail!(
                "the adapter's task_type is SEQ_2_SEQ_LM but model {model} ({:?}) is {kind}",
                info.arch
            )
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_float_spelling() {
        for (x, s) in [
            (0.0, "0.0"),
            (0.1, "0.1"),
            (1.0, "1.0"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (-2.5e-7, "-2.5e-07"),
            (123.456, "123.456"),
            (1.5e300, "1.5e+300"),
        ] {
            assert_eq!(python_float(x), s, "{x}");
        }
    }

    #[test]
    fn python_string_escapes() {
        let mut s = String::new();
        write_python_str("a\"b\\c\n\u{e9}\u{1f600}\u{7f}", &mut s);
        assert_eq!(s, r#""a\"b\\c\n\u00e9\ud83d\ude00\u007f""#);
    }
}
