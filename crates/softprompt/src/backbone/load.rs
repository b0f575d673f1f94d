//! Loading a model file (GGUF or a Hugging Face directory) and its tokenizer, with the
//! implementation that runs it chosen once here ([`LoadOptions`]).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use std::path::Path;

use super::bert::{self, BertWeights};
use super::gemma3::{self, Gemma3Weights};
use super::gpt2::{self, Gpt2Weights};
use super::llama::{self, LlamaWeights};
use super::weights::SafetensorsWeights;
use super::{KernelPath, Model, ModelInfo, WeightStorage};
use crate::gguf::GgufFile;
use crate::model_source::ModelLocation;
use crate::tokenizer::TextTokenizer;

/// How a model loads: how its linear weights are kept and which implementation runs it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// How the fused path keeps the linear layers' weights (Llama family; BERT encoders hold
    /// f32, as their files do, and refuse a conversion). Anything but f32 needs the fused path.
    pub storage: WeightStorage,
    /// The implementation that runs the model; `None`: [`KernelPath::default_for`] (fused for
    /// f32 on the CPU unless `SOFTPROMPT_COMPOSED` is set, else composed).
    pub path: Option<KernelPath>,
}

impl From<WeightStorage> for LoadOptions {
    fn from(storage: WeightStorage) -> Self {
        Self { storage, path: None }
    }
}

impl From<KernelPath> for LoadOptions {
    fn from(path: KernelPath) -> Self {
        Self {
            storage: WeightStorage::F32,
            path: Some(path),
        }
    }
}

/// A model and its tokenizer, loaded together.
pub struct LoadedModel {
    /// The frozen network.
    pub backbone: Model,
    /// Its tokenizer.
    pub tokenizer: TextTokenizer,
    /// The Jinja chat template the model came with (GGUF `tokenizer.chat_template`, or
    /// `chat_template` of a Hugging Face `tokenizer_config.json`), if any.
    pub chat_template: Option<String>,
}

/// Loads a model (GGUF file or Hugging Face directory) and its tokenizer on `device`, its
/// weights converted to f32, on the default path.
pub fn load(location: &ModelLocation, device: &Device) -> Result<LoadedModel> {
    load_with(location, device, LoadOptions::default())
}

/// [`load`] with `options`: a [`WeightStorage`] (the path by default), a [`KernelPath`] (f32
/// weights) or both ([`LoadOptions`]).
pub fn load_with(location: &ModelLocation, device: &Device, options: impl Into<LoadOptions>) -> Result<LoadedModel> {
    let LoadOptions { storage, path: asked } = options.into();
    // The weights of model files load as f32 (or in their own storage for the fused path):
    // the path is settled before anything is read.
    let choose = |storage| KernelPath::choose(asked, device, DType::F32, storage);
    let (backbone, tokenizer, chat_template): (Model, TextTokenizer, Option<String>) = match location {
        ModelLocation::Gguf(path) => {
            let file = GgufFile::open(path)?;
            let arch = file.get_str("general.architecture")?.to_string();
            let backbone = match arch.as_str() {
                "llama" | "qwen2" | "qwen3" | "mistral" | "smollm" => {
                    let kernels = choose(storage)?;
                    Model::Causal(llama::build(LlamaWeights::from_gguf(&file, device, storage)?, kernels)?)
                }
                "gemma3" => {
                    let kernels = choose(storage)?;
                    Model::Causal(gemma3::build(Gemma3Weights::from_gguf(&file, device, storage)?, kernels)?)
                }
                "gpt2" => {
                    let kernels = gpt2::kernel_path(asked, storage)?;
                    Model::Causal(gpt2::build(Gpt2Weights::from_gguf(&file, device)?, kernels)?)
                }
                other => bail!(
                    "{}: architecture `{other}` is not supported (supported in GGUF: llama, qwen2, qwen3, mistral, gemma3, gpt2)",
                    path.display()
                ),
            };
            let tokenizer = TextTokenizer::from_gguf(&file)?;
            let template = file.get_str("tokenizer.chat_template").ok().map(str::to_string);
            (backbone, tokenizer, template)
        }
        ModelLocation::HfDir(dir) => {
            let config = read_config(dir)?;
            let model_type = config
                .get("model_type")
                .and_then(|v| v.as_str())
                .with_context(|| format!("{}: field `model_type` is missing", dir.join("config.json").display()))?
                .to_string();
            let weights = SafetensorsWeights::open(dir)?;
            let backbone = match model_type.as_str() {
                "llama" | "mistral" | "qwen2" | "qwen3" => {
                    let kernels = choose(storage)?;
                    let w = LlamaWeights::from_hf(dir, &config, &weights, device, storage)?;
                    Model::Causal(llama::build(w, kernels)?)
                }
                "gemma3_text" => {
                    let kernels = choose(storage)?;
                    let w = Gemma3Weights::from_hf(dir, &config, &weights, device, storage)?;
                    Model::Causal(gemma3::build(w, kernels)?)
                }
                "gemma3" => bail!(
                    "{}: model_type `gemma3` is the multimodal Gemma 3 (text_config inside, weights \
                     under `language_model.`); softprompt runs the text model: model_type \
                     `gemma3_text` (Gemma3ForCausalLM, e.g. gemma-3-270m and gemma-3-1b)",
                    dir.join("config.json").display()
                ),
                "bert" if storage.converted_to().is_some() => bail!(
                    "{}: weights = {} converts the linear weights of Llama-family models; BERT \
                     encoders hold f32 (use weights = f32 or file)",
                    dir.display(),
                    storage.name()
                ),
                "bert" => {
                    // A BERT encoder's weights are f32 whatever `storage` says.
                    let kernels = choose(WeightStorage::F32)?;
                    let w = BertWeights::from_hf(dir, &config, &weights, device)?;
                    Model::Encoder(bert::build(w, kernels)?)
                }
                "gpt2" => {
                    let kernels = gpt2::kernel_path(asked, storage)?;
                    Model::Causal(gpt2::build(Gpt2Weights::from_hf(dir, &config, &weights, device)?, kernels)?)
                }
                other => bail!(
                    "{}: model_type `{other}` is not supported (supported: llama, mistral, qwen2, qwen3, gemma3_text, gpt2, bert)",
                    dir.join("config.json").display()
                ),
            };
            let tokenizer = TextTokenizer::from_json_file(&dir.join("tokenizer.json"))?;
            let template = std::fs::read_to_string(dir.join("tokenizer_config.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|v| v.get("chat_template")?.as_str().map(str::to_string));
            (backbone, tokenizer, template)
        }
    };
    check_vocab(backbone.info(), &tokenizer)?;
    Ok(LoadedModel {
        backbone,
        tokenizer,
        chat_template,
    })
}

/// Refuses a tokenizer that can produce ids the embedding table does not have.
fn check_vocab(info: &ModelInfo, tokenizer: &TextTokenizer) -> Result<()> {
    let n = tokenizer.vocab_size();
    if n > info.vocab {
        bail!(
            "{}: the tokenizer has {n} tokens but the model's embedding table has only {} rows; \
             the tokenizer does not belong to this model",
            info.source.display(),
            info.vocab
        );
    }
    Ok(())
}

/// Reads `config.json` of a Hugging Face model directory.
pub fn read_config(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// Typed access to the fields of a model directory's parsed `config.json`; errors name the
/// file and the field.
pub fn config_fields<'a>(dir: &Path, config: &'a serde_json::Value) -> Result<crate::json_fields::JsonFields<'a>> {
    let path = dir.join("config.json");
    let map = config
        .as_object()
        .with_context(|| format!("{}: expected a JSON object", path.display()))?;
    Ok(crate::json_fields::JsonFields::with_origin(map, path.display()))
}
