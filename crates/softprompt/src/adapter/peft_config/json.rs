//! PEFT's JSON object ↔ the typed config: the fields each method knows, reading them with
//! errors that name the field, writing them as PEFT does, and PEFT's exact text.

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

use super::{MethodConfig, PeftConfig, PromptTuningFields};
use crate::adapter::peft_types::{PeftType, TaskType};
use crate::adapter::python_json::write_python_json;
use crate::prompt::cpt::{CptConfig, CptLossWeighting};
use crate::prompt::EncoderKind;

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

impl PeftConfig {
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
            MethodConfig::Cpt {
                cpt,
                tokenizer_name_or_path,
            } => write_cpt(cpt, tokenizer_name_or_path, &mut m),
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
            PeftType::Cpt => read_cpt(&fields)?,
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
        let config = PeftConfig {
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
        };
        // Sizes whose products do not fit are refused here, not met as an overflow later (a
        // key/value prefix without `num_layers` is refused where its shape is needed).
        if config.num_layers.is_some() || !peft_type.is_kv_prefix() {
            config.prompt_embeddings_shape()?;
        }
        Ok(config)
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
        PeftType::Cpt => &CPT_FIELDS[..],
    });
    v
}

/// The JSON fields of a CPT config beside the common ones.
const CPT_FIELDS: [&str; 8] = [
    "cpt_token_ids",
    "cpt_mask",
    "cpt_tokens_type_mask",
    "opt_weighted_loss_type",
    "opt_loss_decay_factor",
    "opt_projection_epsilon",
    "opt_projection_format_epsilon",
    "tokenizer_name_or_path",
];

/// A list of integers, field `name` (null or missing: `None`).
fn int_list(fields: &crate::json_fields::JsonFields, name: &str) -> Result<Option<Vec<i64>>> {
    match fields.opt_value(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_i64()
                    .with_context(|| format!("field `{name}` should hold integers, found {v}"))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some),
        Some(v) => bail!("field `{name}` should be a list of integers, found {v}"),
    }
}

/// A CPT config as PEFT's `CPTConfig.__post_init__` completes it: no token ids means `[0]`,
/// no masks mean ones; the lists must have one length, which is `num_virtual_tokens`.
fn read_cpt(fields: &crate::json_fields::JsonFields) -> Result<MethodConfig> {
    let non_negative = |name: &str, list: Vec<i64>| -> Result<Vec<u32>> {
        list.into_iter()
            .map(|x| {
                u32::try_from(x).with_context(|| format!("field `{name}` holds {x}; its entries must be in 0..2³²"))
            })
            .collect()
    };
    let token_ids = non_negative("cpt_token_ids", int_list(fields, "cpt_token_ids")?.unwrap_or(vec![0]))?;
    let n = token_ids.len();
    let types = non_negative(
        "cpt_tokens_type_mask",
        int_list(fields, "cpt_tokens_type_mask")?.unwrap_or(vec![1; n]),
    )?;
    let weighted_loss = match fields.opt_str("opt_weighted_loss_type")? {
        None => CptLossWeighting::None,
        Some(s) => CptLossWeighting::from_peft_name(&s).context("field `opt_weighted_loss_type`")?,
    };
    let cpt = CptConfig {
        mask: int_list(fields, "cpt_mask")?.unwrap_or(vec![1; n]),
        token_ids,
        types,
        weighted_loss,
        decay_factor: fields.opt_f64("opt_loss_decay_factor")?.unwrap_or(1.0),
        projection_epsilon: fields.opt_f64("opt_projection_epsilon")?.unwrap_or(0.1),
        projection_format_epsilon: fields.opt_f64("opt_projection_format_epsilon")?.unwrap_or(0.1),
    };
    cpt.check()?;
    if let Some(v) = fields.opt_usize("num_virtual_tokens")? {
        if v != n {
            bail!("field `num_virtual_tokens` is {v}, but `cpt_token_ids` holds {n} tokens (PEFT sets it to their number)");
        }
    }
    Ok(MethodConfig::Cpt {
        cpt,
        tokenizer_name_or_path: fields.opt_str("tokenizer_name_or_path")?,
    })
}

fn write_cpt(cpt: &CptConfig, tokenizer: &Option<String>, m: &mut Map<String, Value>) {
    let ints = |v: Vec<i64>| Value::Array(v.into_iter().map(Value::from).collect());
    let float = |x: f64| serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number);
    let [ids, mask, types, loss, decay, eps, format_eps, tok] = CPT_FIELDS;
    m.insert(ids.into(), ints(cpt.token_ids.iter().map(|&x| x as i64).collect()));
    m.insert(mask.into(), ints(cpt.mask.clone()));
    m.insert(types.into(), ints(cpt.types.iter().map(|&x| x as i64).collect()));
    m.insert(loss.into(), Value::String(cpt.weighted_loss.peft_name().into()));
    m.insert(decay.into(), float(cpt.decay_factor));
    m.insert(eps.into(), float(cpt.projection_epsilon));
    m.insert(format_eps.into(), float(cpt.projection_format_epsilon));
    m.insert(tok.into(), tokenizer.clone().map_or(Value::Null, Value::String));
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
