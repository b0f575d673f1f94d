//! An adapter turned, once, into the keys and values every request starts from.
//!
//! For a causal model the keys and values of a prepended prompt do not depend on what follows,
//! so a prompt-tuning or p-tuning adapter (`[P; X]`, PEFT's layout for causal LMs) is run
//! through the model once when it is loaded; a prefix-tuning adapter already *is* per-layer keys
//! and values. Either way a request starts from the same [`KvCache`] and pays only for its
//! own tokens; the real tokens' positions start after the prompt, as in PEFT.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

use crate::adapter::{PeftAdapter, PeftType};
use crate::backbone::{BackboneInput, CausalLm, KvCache};

/// The keys and values a request starts from (one row), for one adapter or none.
#[derive(Clone, Default)]
pub struct PromptCache {
    /// The cache (empty for the plain model).
    pub cache: KvCache,
}

impl PromptCache {
    /// The plain model: nothing before the request's tokens.
    pub fn none() -> Self {
        Self::default()
    }

    /// Number of virtual positions before a request's tokens.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    /// Whether this is the plain model.
    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// A prompt `[p, hidden]` prepended to the input embeddings, run through the model once.
    pub fn from_prompt(lm: &dyn CausalLm, prompt: &Tensor) -> Result<Self> {
        let (p, d) = prompt.dims2()?;
        if d != lm.info().hidden || p == 0 {
            bail!(
                "a prompt of shape [{p}, {d}] does not fit a model of hidden size {}",
                lm.info().hidden
            );
        }
        let device = lm.embedding_table().device();
        let embeds = prompt
            .to_device(device)?
            .to_dtype(lm.embedding_table().dtype())?
            .unsqueeze(0)?;
        let mask = Tensor::ones((1, p), DType::U32, device)?;
        let mut cache = KvCache::default();
        lm.forward_cached(&BackboneInput::new(&embeds, &mask), &mut cache)?;
        Ok(Self { cache })
    }

    /// Prefix-tuning `prompt_embeddings` `[p, layers·2·kv_dim]` as PEFT reads them: viewed as
    /// `[p, layers·2, kv_heads, head_dim]`, entry `2l` is layer `l`'s keys and `2l + 1` its
    /// values, handed to attention as they are (no rotary encoding).
    pub fn from_prefix(lm: &dyn CausalLm, prefix: &Tensor) -> Result<Self> {
        let info = lm.info();
        let (hkv, hd, layers) = (info.kv_heads, info.head_dim(), info.layers);
        let (p, width) = prefix.dims2()?;
        if width != layers * 2 * hkv * hd || p == 0 {
            bail!(
                "a prefix of shape [{p}, {width}] does not fit a model of {layers} layers × 2 × {hkv} key/value heads × {hd}"
            );
        }
        let device = lm.embedding_table().device();
        let dtype = lm.embedding_table().dtype();
        let x = prefix
            .to_device(device)?
            .to_dtype(dtype)?
            .reshape((p, layers * 2, hkv, hd))?;
        let take = |i: usize| -> Result<Tensor> {
            // [p, hkv, hd] → [1, hkv, p, hd]
            Ok(x.narrow(1, i, 1)?
                .squeeze(1)?
                .transpose(0, 1)?
                .contiguous()?
                .unsqueeze(0)?)
        };
        let layers = (0..layers)
            .map(|l| Ok((take(2 * l)?, take(2 * l + 1)?)))
            .collect::<Result<_>>()?;
        Ok(Self {
            cache: KvCache {
                layers,
                mask: Some(Tensor::ones((1, p), DType::F32, device)?),
                next_pos: None,
            },
        })
    }

    /// The cache of a PEFT adapter: prompt tuning and p-tuning (the prompt prepended), prefix
    /// tuning (the per-layer prefix).
    pub fn from_adapter(lm: &dyn CausalLm, adapter: &PeftAdapter) -> Result<Self> {
        crate::adapter::check_compatible(&adapter.config, lm.info())?;
        match adapter.config.peft_type() {
            PeftType::PrefixTuning => Self::from_prefix(lm, &adapter.prompt_embeddings),
            PeftType::PromptTuning | PeftType::PTuning => Self::from_prompt(lm, &adapter.prompt_embeddings),
        }
    }
}
