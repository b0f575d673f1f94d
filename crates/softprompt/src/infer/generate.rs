//! Greedy decoding with a key/value cache: the prompt (which may hold soft tokens) is run once,
//! then each new token costs one position.

use anyhow::{bail, Result};
use candle_core::{IndexOp, Tensor};

use crate::backbone::frozen_weight::{rounding_scope, Rounding};
use crate::backbone::{inference_logits, BackboneInput, CausalLm, KvCache};

/// Greedily extends the input embeddings `[1, T, hidden]` by up to `max_new` tokens, stopping
/// after any id in `stop`. Returns the generated ids (the stop id included when reached).
pub fn greedy(backbone: &dyn CausalLm, embeds: &Tensor, max_new: usize, stop: &[u32]) -> Result<Vec<u32>> {
    greedy_after(backbone, None, embeds, max_new, stop)
}

/// [`greedy`] after a one-row key/value prefix (prefix tuning, Cartridges).
pub fn greedy_after(
    backbone: &dyn CausalLm,
    prefix: Option<&KvCache>,
    embeds: &Tensor,
    max_new: usize,
    stop: &[u32],
) -> Result<Vec<u32>> {
    generate_greedy(backbone, prefix, embeds, max_new, stop, usize::MAX, &mut |_, _| {})
}

/// [`greedy`], running the prompt through the model `chunk` positions at a time and calling
/// `progress(done, total)` after each chunk (a long prompt's processing can then be shown).
pub fn greedy_with_progress(
    backbone: &dyn CausalLm,
    embeds: &Tensor,
    max_new: usize,
    stop: &[u32],
    chunk: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<u32>> {
    generate_greedy(backbone, None, embeds, max_new, stop, chunk, progress)
}

/// Runs the input embeddings `[1, T, hidden]` (`T > 0`) after `cache`, `chunk` positions at a
/// time, calling `progress(done, T)` after each chunk; returns the last chunk's hidden states.
pub fn prefill(
    backbone: &dyn CausalLm,
    embeds: &Tensor,
    cache: &mut KvCache,
    chunk: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Tensor> {
    let t = embeds.dim(1)?;
    if t == 0 {
        bail!("nothing to run: the input has no positions");
    }
    let device = embeds.device();
    let chunk = chunk.max(1);
    let mut start = 0;
    let mut hidden = None;
    while start < t {
        let len = chunk.min(t - start);
        let mask = Tensor::ones((1, len), candle_core::DType::U32, device)?;
        let part = embeds.narrow(1, start, len)?;
        hidden = Some(backbone.forward_cached(&BackboneInput::new(&part, &mask), cache)?);
        start += len;
        progress(start, t);
    }
    Ok(hidden.expect("t > 0"))
}

/// The greedy loop: the prompt (after `prefix`, if any) in chunks, then one token at a time;
/// quantized weights multiply 8-bit activations, as llama.cpp does (generation).
fn generate_greedy(
    backbone: &dyn CausalLm,
    prefix: Option<&KvCache>,
    embeds: &Tensor,
    max_new: usize,
    stop: &[u32],
    chunk: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<u32>> {
    rounding_scope(Rounding::Inference, || {
        greedy_loop(backbone, prefix, embeds, max_new, stop, chunk, progress)
    })
}

/// [`generate_greedy`]'s loop.
fn greedy_loop(
    backbone: &dyn CausalLm,
    prefix: Option<&KvCache>,
    embeds: &Tensor,
    max_new: usize,
    stop: &[u32],
    chunk: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<u32>> {
    let (b, t, _) = embeds.dims3()?;
    if b != 1 || t == 0 {
        bail!("greedy generation runs one non-empty sequence at a time (got batch {b}, length {t})");
    }
    let context = backbone.info().max_positions;
    if t > context {
        bail!("the prompt has {t} tokens, more than the model's context of {context}");
    }
    let device = embeds.device();
    let mut cache = prefix.cloned().unwrap_or_default();
    let mut hidden = prefill(backbone, embeds, &mut cache, chunk, progress)?;
    let mut out = Vec::new();
    for _ in 0..max_new {
        let last = hidden.i((0, hidden.dim(1)? - 1))?.unsqueeze(0)?;
        let next = inference_logits(backbone, &last)?
            .squeeze(0)?
            .argmax(0)?
            .to_scalar::<u32>()?;
        out.push(next);
        if stop.contains(&next) || cache.len() + 1 > backbone.info().max_positions {
            break;
        }
        let ids = Tensor::new(&[[next]], device)?;
        let e = backbone.embed(&ids)?;
        let one = Tensor::ones((1, 1), candle_core::DType::U32, device)?;
        hidden = backbone.forward_cached(&BackboneInput::new(&e, &one), &mut cache)?;
    }
    Ok(out)
}
