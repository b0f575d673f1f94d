//! Scoring candidate continuations after one prompt, sharing the prompt's keys and values.

use anyhow::Result;
use candle_core::{DType, IndexOp, Tensor, D};

use crate::backbone::{inference_logits, BackboneInput, CausalLm, KvCache};

/// Log-probability of each candidate's tokens after one prompt (`[1, T, D]` embeddings). The
/// prompt's keys and values are computed once and shared by all candidates.
///
/// Exact branch and bound: a candidate's score is at most its first token's log-probability,
/// so candidates are scored fully in order of that bound and the search stops once no remaining
/// bound can beat the best full score. Candidates left unscored report their bound (they cannot
/// be the argmax).
pub fn score_candidates(backbone: &dyn CausalLm, prompt: &Tensor, candidates: &[Vec<u32>]) -> Result<Vec<f32>> {
    score_candidates_after(backbone, None, prompt, candidates)
}

/// [`score_candidates`] after a one-row key/value prefix (prefix tuning, Cartridges): the
/// prompt's positions follow the prefix's.
pub fn score_candidates_after(
    backbone: &dyn CausalLm,
    prefix: Option<&KvCache>,
    prompt: &Tensor,
    candidates: &[Vec<u32>],
) -> Result<Vec<f32>> {
    score_after(backbone, prefix, prompt, candidates, true)
}

/// [`score_candidates_after`] without branch and bound: every candidate's full log-probability
/// (what probabilities over the candidates need).
pub fn score_all_candidates_after(
    backbone: &dyn CausalLm,
    prefix: Option<&KvCache>,
    prompt: &Tensor,
    candidates: &[Vec<u32>],
) -> Result<Vec<f32>> {
    score_after(backbone, prefix, prompt, candidates, false)
}

/// The scoring loop; `prune` stops once no remaining candidate can beat the best.
fn score_after(
    backbone: &dyn CausalLm,
    prefix: Option<&KvCache>,
    prompt: &Tensor,
    candidates: &[Vec<u32>],
    prune: bool,
) -> Result<Vec<f32>> {
    let device = prompt.device();
    let t = prompt.dim(1)?;
    let mut cache = prefix.cloned().unwrap_or_default();
    let mask = Tensor::ones((1, t), DType::U32, device)?;
    let hidden = backbone.forward_cached(&BackboneInput::new(prompt, &mask), &mut cache)?;
    let first = candle_nn::ops::log_softmax(
        &inference_logits(backbone, &hidden.i((0, t - 1))?.unsqueeze(0)?)?,
        D::Minus1,
    )?
    .squeeze(0)?
    .to_vec1::<f32>()?;
    let mut scores: Vec<f32> = candidates
        .iter()
        .map(|c| c.first().map_or(f32::NEG_INFINITY, |&id| first[id as usize]))
        .collect();
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut best = f32::NEG_INFINITY;
    const CHUNK: usize = 8;
    let mut i = 0;
    while i < order.len() && (!prune || scores[order[i]] > best) {
        let chunk: Vec<usize> = order[i..(i + CHUNK).min(order.len())].to_vec();
        i += chunk.len();
        let multi: Vec<usize> = chunk.iter().copied().filter(|&c| candidates[c].len() > 1).collect();
        if !multi.is_empty() {
            let rest = continuation_log_probs(
                backbone,
                &cache,
                &multi.iter().map(|&c| &candidates[c][..]).collect::<Vec<_>>(),
            )?;
            for (&c, r) in multi.iter().zip(rest) {
                scores[c] += r;
            }
        }
        best = chunk.iter().map(|&c| scores[c]).fold(best, f32::max);
    }
    Ok(scores)
}

/// Sum of log p(c[1..] | prompt, c[0]) for each candidate, continuing a batch-1 prompt cache.
fn continuation_log_probs(backbone: &dyn CausalLm, cache: &KvCache, cands: &[&[u32]]) -> Result<Vec<f32>> {
    let device = backbone.embedding_table().device();
    let c = cands.len();
    let l = cands.iter().map(|x| x.len() - 1).max().unwrap_or(0);
    let mut ids = vec![0u32; c * l];
    let mut m = vec![0u32; c * l];
    for (r, cand) in cands.iter().enumerate() {
        for (j, &id) in cand[..cand.len() - 1].iter().enumerate() {
            ids[r * l + j] = id;
            m[r * l + j] = 1;
        }
    }
    let mut shared = cache.repeat(c)?;
    let ids_t = Tensor::from_vec(ids, (c, l), device)?;
    let mask_t = Tensor::from_vec(m, (c, l), device)?;
    let embeds = backbone.embed(&ids_t)?;
    let h = backbone.forward_cached(&BackboneInput::new(&embeds, &mask_t), &mut shared)?;
    let d = h.dim(2)?;
    let mut out = Vec::with_capacity(c);
    for (r, cand) in cands.iter().enumerate() {
        let rows = h.i(r)?.narrow(0, 0, cand.len() - 1)?.reshape((cand.len() - 1, d))?;
        let lp = candle_nn::ops::log_softmax(&inference_logits(backbone, &rows)?, D::Minus1)?;
        let next = Tensor::new(&cand[1..], device)?.unsqueeze(1)?;
        out.push(lp.gather(&next, 1)?.sum_all()?.to_scalar::<f32>()?);
    }
    Ok(out)
}

/// Index of the largest score.
pub fn argmax(scores: &[f32]) -> usize {
    scores
        .iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |(bi, bs), (i, &s)| if s > bs { (i, s) } else { (bi, bs) },
        )
        .0
}
