//! Late prompt tuning (Liu et al. 2022, "Late Prompt Tuning") at inference: the adapter as
//! the per-layer keys and values of its `p` positions, computed once.
//!
//! In training the prompt occupies `p` reserved positions in front of every row. Their input
//! embeddings are a fixed placeholder `E [p, d]`: the run's initial prompt in word-embedding
//! space (the `init_text` tokens' embeddings, sampled vocabulary, ...), saved with the adapter
//! ([`LATE_PROMPT_PLACEHOLDER`]). The layers below `insert_layer` see `E` in every row and at
//! every step; at `insert_layer` the positions' hidden states are replaced by the learned
//! prompt `P [p, d]`, which starts as `E`'s own hidden states there, so that step 0 is
//! exactly prompt tuning's step 0 with the same init. The model is causal and the `p` positions
//! come first, so their keys and values in every layer depend on `E` and `P` alone: layers
//! `0..L` on `E`, layers `L..` on `P`. That is a one-row [`KvCache`] of `p` positions, exactly
//! what a prefix-tuning adapter is, and every reader (scoring, generation, the server) runs the
//! request's tokens after it, their positions starting at `p` as in training.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};

use crate::adapter::{PeftAdapter, LATE_PROMPT_LAYER, LATE_PROMPT_PLACEHOLDER};
use crate::backbone::{Backbone, BackboneInput, KvCache};

/// The keys and values of every layer for a late prompt `prompt [p, d]` entered at decoder
/// layer `layer` over the input embeddings `placeholder [p, d]`, as a one-row cache of `p`
/// positions: layers `0..layer` run on the placeholder, layers `layer..` on the prompt.
pub fn late_prompt_cache<M: Backbone + ?Sized>(
    model: &M,
    prompt: &Tensor,
    placeholder: &Tensor,
    layer: usize,
) -> Result<KvCache> {
    let info = model.info();
    let (p, d) = prompt.dims2()?;
    if d != info.hidden || p == 0 || placeholder.dims() != prompt.dims() {
        bail!(
            "a late prompt of shape [{p}, {d}] over a placeholder of shape {:?} does not fit a model of \
             hidden size {} (both must be [p, hidden])",
            placeholder.dims(),
            info.hidden
        );
    }
    if layer >= info.layers {
        bail!(
            "a late prompt enters at layer {layer}, but the model has {} layers (0..{})",
            info.layers,
            info.layers
        );
    }
    let table = model.embedding_table();
    let mask = Tensor::ones((1, p), DType::U32, table.device())?;
    let row =
        |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(table.device())?.to_dtype(table.dtype())?.unsqueeze(0)?) };
    let mut lower = KvCache::default();
    model.forward_layers(
        &BackboneInput::new(&row(placeholder)?, &mask),
        0..layer,
        Some(&mut lower),
    )?;
    let prompt = row(prompt)?;
    let mut upper = KvCache::default();
    model.forward_layers(
        &BackboneInput::new(&prompt, &mask),
        layer..info.layers,
        Some(&mut upper),
    )?;
    let mut layers = lower.layers;
    layers.extend(upper.layers);
    Ok(KvCache {
        layers,
        mask: upper.mask,
        next_pos: None,
    })
}

/// The one-row key/value prefix an adapter enters the model as: a prefix-tuning or Cartridge
/// adapter's stored keys and values ([`PeftAdapter::prefix_cache`]), or a late-prompt-tuning
/// adapter's, computed once ([`late_prompt_cache`]); `None` for an input prompt.
pub fn adapter_prefix<M: Backbone + ?Sized>(model: &M, adapter: &PeftAdapter) -> Result<Option<KvCache>> {
    if let Some(layer) = adapter.late_prompt_layer()? {
        let placeholder = adapter.tensors.get(LATE_PROMPT_PLACEHOLDER).with_context(|| {
            format!(
                "{}: a late-prompt-tuning adapter (it has `{LATE_PROMPT_LAYER}`) needs the tensor \
                 `{LATE_PROMPT_PLACEHOLDER}` too (the reserved positions' input embeddings)",
                adapter.dir.display()
            )
        })?;
        let cache = late_prompt_cache(model, &adapter.prompt_embeddings, placeholder, layer)
            .map_err(|e| e.context(format!("late-prompt-tuning adapter {}", adapter.dir.display())))?;
        return Ok(Some(cache));
    }
    adapter.prefix_cache(model.info())
}
