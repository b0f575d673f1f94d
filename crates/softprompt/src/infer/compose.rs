//! Several adapters applied together, in order: one [`PromptCache`] every request of the
//! composition starts from (as Cartridges' reference server composes several cartridges).
//!
//! Members are taken in order. Prompts that enter through the input (prompt tuning, p-tuning's
//! encoder output, residual prompt tuning, a multitask adapter's task prompt, DePT's prompt)
//! are concatenated, `[P_1; P_2; ..]`, and run through the model once, after whatever came
//! before them; per-layer key/value prefixes (prefix tuning, p-tuning v2, Cartridges) are
//! concatenated per layer after the keys and values before them, keys used as stored. So two
//! prompt-tuning adapters compose to the adapter whose prompt is their concatenation, two
//! prefixes to the prefix that is theirs, and a prefix followed by a prompt runs the prompt
//! after the prefix, as a request's tokens would. A DePT adapter adds its update to the
//! tokens right after its prompt, so it can only come last.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

use super::prompt_cache::PromptCache;
use crate::backbone::{BackboneInput, CausalLm, KvCache};

/// The prompt of `members` applied together, in order: `(name, the adapter's prompt)`, the
/// name only for errors. Refuses an empty list, a member without a prompt, a DePT adapter
/// anywhere but last, and a composition longer than the model's context, naming the member.
pub fn compose(lm: &dyn CausalLm, members: &[(&str, &PromptCache)]) -> Result<PromptCache> {
    if members.is_empty() {
        bail!("no adapter to compose: give at least one");
    }
    let mut cache = KvCache::default();
    let mut pending: Vec<Tensor> = Vec::new();
    let mut sources: Vec<Tensor> = Vec::new();
    let mut all_prompts = true;
    for (i, &(name, member)) in members.iter().enumerate() {
        if member.embeds.is_some() {
            bail!("`{name}` carries a request's embeddings; only adapters compose");
        }
        if member.input_update.is_some() && i + 1 != members.len() {
            bail!(
                "`{name}` is a DePT adapter: its update is added to the tokens right after its \
                 prompt, so it can only come last in a composition"
            );
        }
        match &member.source {
            Some(p) => {
                pending.push(p.clone());
                sources.push(p.clone());
            }
            None if member.cache.is_empty() => bail!("`{name}` has no prompt to compose (it does not generate)"),
            None => {
                if member.cache.next_pos.is_some() || member.cache.rows() != 1 {
                    bail!("`{name}`'s keys and values are not one plain row; it cannot be composed");
                }
                run_prompts(lm, &mut pending, &mut cache)?;
                cache = append(&cache, &member.cache)?;
                all_prompts = false;
            }
        }
    }
    run_prompts(lm, &mut pending, &mut cache)?;
    let context = lm.info().max_positions;
    if cache.len() >= context {
        let names: Vec<&str> = members.iter().map(|m| m.0).collect();
        bail!(
            "the composition {names:?} takes {} positions; the model's context is {context}",
            cache.len()
        );
    }
    let source = match all_prompts {
        true => Some(Tensor::cat(&sources, 0)?),
        false => None,
    };
    Ok(PromptCache {
        cache,
        input_update: members.last().and_then(|m| m.1.input_update.clone()),
        source,
        embeds: None,
    })
}

/// Runs the prompts `pending` (concatenated) through the model after `cache`, once, as
/// [`PromptCache::from_prompt`] runs one; empties `pending`.
fn run_prompts(lm: &dyn CausalLm, pending: &mut Vec<Tensor>, cache: &mut KvCache) -> Result<()> {
    if pending.is_empty() {
        return Ok(());
    }
    let prompt = Tensor::cat(pending, 0)?.unsqueeze(0)?;
    pending.clear();
    let mask = Tensor::ones((1, prompt.dim(1)?), DType::U32, prompt.device())?;
    lm.forward_cached(&BackboneInput::new(&prompt, &mask), cache)?;
    Ok(())
}

/// `after`'s keys and values placed after `before`'s, per layer (keys used as stored).
fn append(before: &KvCache, after: &KvCache) -> Result<KvCache> {
    if before.is_empty() {
        return Ok(after.clone());
    }
    if before.layers.len() != after.layers.len() {
        bail!(
            "caches of {} and {} layers cannot be joined",
            before.layers.len(),
            after.layers.len()
        );
    }
    let layers = before
        .layers
        .iter()
        .zip(&after.layers)
        .map(|((k0, v0), (k1, v1))| Ok((Tensor::cat(&[k0, k1], 2)?, Tensor::cat(&[v0, v1], 2)?)))
        .collect::<Result<_>>()?;
    let mask = match (&before.mask, &after.mask) {
        (Some(a), Some(b)) => Some(Tensor::cat(&[a, &b.to_dtype(a.dtype())?], 1)?),
        _ => bail!("a non-empty cache has a mask"),
    };
    Ok(KvCache {
        layers,
        mask,
        next_pos: None,
    })
}
