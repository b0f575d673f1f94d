//! Late prompt tuning (Liu et al. 2022, "Late Prompt Tuning") at inference: the adapter as
//! the per-layer keys and values of its `p` positions, computed once.
//!
//! In training the prompt occupies `p` reserved positions in front of every row. Their input
//! embeddings are a fixed placeholder, [`placeholder`] (zeros), so the layers below
//! `insert_layer` see the same thing in every row and at every step; at `insert_layer` the
//! positions' hidden states are replaced by the learned prompt `P [p, d]`. The model is
//! causal and the `p` positions come first, so their keys and values in every layer depend on
//! `P` alone: layers `0..L` on the placeholder, layers `L..` on `P`. That is a one-row
//! [`KvCache`] of `p` positions, exactly what a prefix-tuning adapter is, and every reader
//! (scoring, generation, the server) runs the request's tokens after it, their positions
//! starting at `p` as in training.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

use crate::adapter::PeftAdapter;
use crate::backbone::{Backbone, BackboneInput, KvCache};

/// The input embeddings `[1, p, d]` of late prompt tuning's reserved positions: zeros. (A zero
/// row stays zero through every RMSNorm, so the placeholder adds only its attention outputs to
/// the residual stream below the prompt's layer; any fixed rows would do, zeros need no token.)
pub fn placeholder(p: usize, d: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(Tensor::zeros((1, p, d), dtype, device)?)
}

/// The keys and values of every layer for a late prompt `prompt [p, d]` entered at decoder
/// layer `layer`, as a one-row cache of `p` positions: layers `0..layer` run on the
/// [`placeholder`], layers `layer..` on the prompt.
pub fn late_prompt_cache<M: Backbone + ?Sized>(model: &M, prompt: &Tensor, layer: usize) -> Result<KvCache> {
    let info = model.info();
    let (p, d) = prompt.dims2()?;
    if d != info.hidden || p == 0 {
        bail!(
            "a late prompt of shape [{p}, {d}] does not fit a model of hidden size {}",
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
    let zeros = placeholder(p, d, table.dtype(), table.device())?;
    let mut lower = KvCache::default();
    model.forward_layers(&BackboneInput::new(&zeros, &mask), 0..layer, Some(&mut lower))?;
    let prompt = prompt
        .to_device(table.device())?
        .to_dtype(table.dtype())?
        .unsqueeze(0)?;
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
        let cache = late_prompt_cache(model, &adapter.prompt_embeddings, layer)
            .map_err(|e| e.context(format!("late-prompt-tuning adapter {}", adapter.dir.display())))?;
        return Ok(Some(cache));
    }
    adapter.prefix_cache(model.info())
}
