//! Training a key/value prefix (prefix tuning, Cartridges): the learner's two kinds of prompt,
//! a prefix's start (a text prefill through the frozen model), its PEFT config, and the
//! gradient of one micro-batch through `forward_train_prefixed` / `backward_prefixed`.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use std::collections::HashMap;

use super::Prepared;
use crate::adapter::{MethodConfig, PeftConfig, TaskType};
use crate::backbone::{BackboneInput, KvCache, ModelInfo};
use crate::batch::{make_batch, splice_embeddings};
use crate::loss::lm_loss;
use crate::prompt::prefix::{flat_gradient, flat_to_cache, layers_to_flat};
use crate::prompt::{KvPrefix, PrefixShape, PrefixSpec, PromptInit, SoftPrompt};
use crate::task::Example;

/// What a run learns: an input prompt (prompt tuning, p-tuning) or a per-layer key/value prefix
/// (prefix tuning, Cartridges).
#[derive(Debug, Clone)]
pub enum Learned {
    /// A prompt spliced into the input embeddings.
    Input(SoftPrompt),
    /// Keys and values every attention layer reads before the input.
    KvPrefix(KvPrefix),
}

impl Learned {
    /// The input prompt, if this is one.
    pub fn input(&self) -> Option<&SoftPrompt> {
        match self {
            Learned::Input(p) => Some(p),
            Learned::KvPrefix(_) => None,
        }
    }

    /// The key/value prefix, if this is one.
    pub fn kv_prefix(&self) -> Option<&KvPrefix> {
        match self {
            Learned::KvPrefix(p) => Some(p),
            Learned::Input(_) => None,
        }
    }

    /// What PEFT saves as `prompt_embeddings`: the prompt `[p, hidden]` or the flat prefix
    /// `[V, layers·2·kv_dim]`, as a differentiable graph over [`Learned::vars`].
    pub fn forward(&self) -> Result<Tensor> {
        match self {
            Learned::Input(p) => p.forward(),
            Learned::KvPrefix(p) => p.forward(),
        }
    }

    /// Trainable parameters with their saved names.
    pub fn vars(&self) -> Vec<(String, Var)> {
        match self {
            Learned::Input(p) => p.vars(),
            Learned::KvPrefix(p) => p.vars(),
        }
    }

    /// Copies of every parameter (a Cartridge's frozen tokens included).
    pub fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        match self {
            Learned::Input(p) => p.tensors(),
            Learned::KvPrefix(p) => p.tensors(),
        }
    }

    /// Restores the parameters from saved tensors.
    pub fn set_from(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        match self {
            Learned::Input(p) => p.set_from(tensors),
            Learned::KvPrefix(p) => p.set_from(tensors),
        }
    }

    /// Device of the parameters.
    pub fn device(&self) -> Device {
        match self {
            Learned::Input(p) => p.embedding().device().clone(),
            Learned::KvPrefix(p) => p.device(),
        }
    }

    /// What evaluation needs: the input prompt `[p, hidden]` or the prefix as a one-row cache.
    pub fn eval_parts(&self) -> Result<(Option<Tensor>, Option<KvCache>)> {
        Ok(match self {
            Learned::Input(p) => (Some(p.forward()?.detach()), None),
            Learned::KvPrefix(p) => (None, Some(flat_to_cache(&p.forward()?.detach(), p.shape())?)),
        })
    }
}

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
    let lm = p
        .model
        .backbone
        .require_causal("a key/value prefix (prefix tuning, Cartridge)")?;
    let shape = prefix_shape(lm.info());
    let start = match init {
        PromptInit::Text(text) => {
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
pub fn peft_config(prefix: &KvPrefix, info: &ModelInfo) -> PeftConfig {
    let method = match prefix.spec() {
        PrefixSpec::PrefixTuning { projection } => MethodConfig::PrefixTuning {
            encoder_hidden_size: Some(projection.unwrap_or(prefix.shape().kv_dim())),
            prefix_projection: projection.is_some(),
            init_weights: prefix.zero_init().then(|| "zero".to_string()),
        },
        PrefixSpec::Cartridge { num_frozen_tokens } => MethodConfig::Cartridge { num_frozen_tokens },
    };
    PeftConfig::new(method, TaskType::CausalLm, prefix.num_virtual_tokens(), info)
}

/// One micro-batch of a prefix: the loss and the gradient of every trainable parameter (the
/// backbone's per-layer `(dK, dV)` chained through the prefix's graph by candle's autograd).
pub fn micro_batch_gradients(
    p: &Prepared,
    prefix: &KvPrefix,
    rows: &[&Example],
) -> Result<(f32, Vec<(String, Tensor)>)> {
    let lm = p
        .model
        .backbone
        .require_causal("a key/value prefix (prefix tuning, Cartridge)")?;
    let flat = prefix.forward()?;
    let cache = flat_to_cache(&flat.detach(), prefix.shape())?;
    let batch = make_batch(rows, true, p.model.backbone.device())?;
    let embeds = splice_embeddings(lm, &batch, None)?;
    let (hidden, tape) = lm.forward_train_prefixed(&BackboneInput::new(&embeds, &batch.mask), &cache)?;
    let (loss, d_hidden) = lm_loss(lm, &batch, &hidden)?;
    let (_, d_layers) = lm.backward_prefixed(&tape, &d_hidden)?;
    let d_flat = flat_gradient(&d_layers, prefix.num_virtual_tokens())?;
    let store = (&flat * d_flat.detach())?.sum_all()?.backward()?;
    let mut out = Vec::new();
    for (name, var) in prefix.vars() {
        if let Some(g) = store.get(var.as_tensor()) {
            out.push((name, g.clone()));
        }
    }
    Ok((loss, out))
}
