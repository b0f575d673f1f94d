//! How alike two learned prompts are, as SPoT (Vu et al. 2022, "SPoT: Better Frozen Model
//! Adaptation through Soft Prompt Transfer") measures it to pick a source task whose prompt
//! starts a target task's (`init = "from"`): the cosine of the prompts' average tokens, and the
//! average over each prompt's tokens of the cosine with its best-matching token in the other
//! prompt (taken both ways and averaged, so the measure is symmetric and allows prompts of
//! different lengths).

use anyhow::{bail, Result};
use candle_core::Tensor;

/// The two SPoT similarities of a pair of prompts.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct PromptSimilarity {
    /// Cosine of the two prompts' mean tokens.
    pub average_tokens: f64,
    /// Mean over every token of either prompt of its best cosine with a token of the other.
    pub best_matched_tokens: f64,
}

/// Cosine of two vectors (0 when either is zero).
fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (*x as f64, *y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        ab / (aa.sqrt() * bb.sqrt())
    }
}

/// The rows of a `[tokens, width]` prompt.
fn rows(prompt: &Tensor) -> Result<Vec<Vec<f32>>> {
    let rows = prompt.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
    if rows.is_empty() {
        bail!("the prompt has no tokens");
    }
    Ok(rows)
}

/// The mean of `rows`.
fn mean(rows: &[Vec<f32>]) -> Vec<f32> {
    let mut m = vec![0f32; rows[0].len()];
    for r in rows {
        for (a, x) in m.iter_mut().zip(r) {
            *a += x / rows.len() as f32;
        }
    }
    m
}

/// Mean over the rows of `a` of each one's best cosine with a row of `b`.
fn best_matched(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    let total: f64 = a
        .iter()
        .map(|x| b.iter().map(|y| cosine(x, y)).fold(f64::NEG_INFINITY, f64::max))
        .sum();
    total / a.len() as f64
}

/// The SPoT similarities of prompts `a` and `b` (`[tokens, width]` each, any token counts, the
/// same width).
pub fn prompt_similarity(a: &Tensor, b: &Tensor) -> Result<PromptSimilarity> {
    let (ra, rb) = (rows(a)?, rows(b)?);
    if ra[0].len() != rb[0].len() {
        bail!(
            "the prompts have different widths ({} and {}): they were trained for different models \
             or are different kinds of prompt",
            ra[0].len(),
            rb[0].len()
        );
    }
    Ok(PromptSimilarity {
        average_tokens: cosine(&mean(&ra), &mean(&rb)),
        best_matched_tokens: 0.5 * (best_matched(&ra, &rb) + best_matched(&rb, &ra)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[[f32; 2]]) -> Tensor {
        let flat: Vec<f32> = v.iter().flatten().copied().collect();
        Tensor::from_vec(flat, (v.len(), 2), &Device::Cpu).unwrap()
    }

    #[test]
    fn spot_similarities_by_hand() {
        let a = t(&[[1.0, 0.0], [0.0, 1.0]]);
        // The same tokens in another order: identical by both measures.
        let s = prompt_similarity(&a, &t(&[[0.0, 1.0], [1.0, 0.0]])).unwrap();
        assert!((s.average_tokens - 1.0).abs() < 1e-9 && (s.best_matched_tokens - 1.0).abs() < 1e-9);
        // One token [1, 0] against [1,0],[0,1]: means (1,0)·(0.5,0.5) → 1/√2; best matches: a's
        // rows score 1 and 0 (mean 0.5), b's one row scores 1: (0.5 + 1) / 2.
        let s = prompt_similarity(&a, &t(&[[2.0, 0.0]])).unwrap();
        assert!((s.average_tokens - 0.5f64.sqrt()).abs() < 1e-6, "{s:?}");
        assert!((s.best_matched_tokens - 0.75).abs() < 1e-9, "{s:?}");
        // Opposite prompts.
        let s = prompt_similarity(&a, &t(&[[-1.0, 0.0], [0.0, -1.0]])).unwrap();
        assert!((s.average_tokens + 1.0).abs() < 1e-6);
        let e = prompt_similarity(&a, &Tensor::new(&[[1f32, 0.0, 0.0]], &Device::Cpu).unwrap()).unwrap_err();
        assert!(e.to_string().contains("different widths (2 and 3)"));
    }
}
