//! Training a key/value prefix (prefix tuning, p-tuning v2 on encoders, Cartridges): a
//! prefix's start (a text prefill through the frozen model) and
//! its PEFT config. One micro-batch's gradient (`forward_train_prefixed` / `backward_prefixed`)
//! is its [`super::learned::LearnedPrompt`] implementation.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use rand::rngs::StdRng;

use super::Prepared;
use crate::adapter::{MethodConfig, PeftConfig, TaskType};
use crate::backbone::{BackboneInput, KvCache, ModelInfo};
use crate::prompt::prefix::layers_to_flat;
use crate::prompt::{KvPrefix, PrefixShape, PrefixSpec, PromptInit};

/// The prefix geometry of a model.
pub fn prefix_shape(info: &ModelInfo) -> PrefixShape {
    PrefixShape {
        layers: info.layers,
        kv_heads: info.kv_heads,
        head_dim: info.head_dim(),
    }
}

/// A new prefix for the run: `init` as [`KvPrefix::new`] takes it, a `Text` init resolved into
/// the keys and values of the text's first `num_virtual_tokens` tokens (tokenized with the
/// special tokens the tokenizer adds, no chat template) run through the frozen model.
pub fn new_prefix(p: &Prepared, spec: PrefixSpec, init: &PromptInit, rng: &mut StdRng) -> Result<KvPrefix> {
    let v = p.cfg.num_virtual_tokens;
    let shape = prefix_shape(p.model.backbone.info());
    let start = match init {
        PromptInit::Text(text) => {
            let lm = p.model.backbone.require_causal(
                "a key/value prefix started from a text prefill (init = \"text\"; on an encoder use \
                 `random-normal`, `random` or `zero`)",
            )?;
            let ids = p
                .model
                .tokenizer
                .encode(text, true)
                .context("cannot tokenize `init_text`")?;
            if ids.len() < v {
                bail!(
                    "`init_text` has {} tokens but the prefix has num_virtual_tokens = {v}: the prefill needs at least as many",
                    ids.len()
                );
            }
            let device = p.model.backbone.device();
            let ids = Tensor::new(&ids[..v], device)?.unsqueeze(0)?;
            let embeds = lm.embed(&ids)?;
            let mask = Tensor::ones((1, v), DType::U32, device)?;
            let mut cache = KvCache::default();
            lm.forward_cached(&BackboneInput::new(&embeds, &mask), &mut cache)?;
            PromptInit::FromTensor(layers_to_flat(&cache.layers, v)?)
        }
        other => other.clone(),
    };
    KvPrefix::new(spec, shape, v, &start, p.model.backbone.device(), rng)
}

/// The PEFT `adapter_config.json` of a trained prefix, with the fields PEFT writes
/// (`encoder_hidden_size` is the key/value width without a projection, as PEFT fills it).
/// `task_type` is SEQ_CLS for p-tuning v2 on an encoder: PEFT's layout, although PEFT itself
/// refuses prefix tuning on BERT ("Model does not support past key values") and cannot load it.
pub fn peft_config(prefix: &KvPrefix, task_type: TaskType, info: &ModelInfo) -> PeftConfig {
    let method = match prefix.spec() {
        PrefixSpec::PrefixTuning { projection } => MethodConfig::PrefixTuning {
            encoder_hidden_size: Some(projection.unwrap_or(prefix.shape().kv_dim())),
            prefix_projection: projection.is_some(),
            init_weights: prefix.zero_init().then(|| "zero".to_string()),
        },
        PrefixSpec::Cartridge { num_frozen_tokens } => MethodConfig::Cartridge { num_frozen_tokens },
    };
    PeftConfig::new(method, task_type, prefix.num_virtual_tokens(), info)
}
