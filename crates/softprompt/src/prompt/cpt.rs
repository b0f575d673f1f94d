//! Context-aware prompt tuning (Blau et al. 2024, "Context-aware Prompt Tuning: Advancing
//! In-Context Learning with Adversarial Methods"; PEFT's `CPT`): the prompt is a context of real
//! examples (`cpt_token_ids`), prepended like prompt tuning. Its embeddings start as the
//! tokens' word embeddings `E` (frozen) and a learned `Δ` (zero at first) is added, `P = E + Δ`.
//!
//! Every context token has a type (`cpt_tokens_type_mask`, PEFT's convention for example `i`,
//! 0-based: `4i+1` input template, `4i+2` input, `4i+3` output template, `4i+4` label, `0`
//! separators). This module is PEFT's arithmetic on those types:
//! - only template and input tokens learn (`type mod 4 ∈ {1, 2, 3}`), [`CptConfig::trainable`];
//! - after each optimiser step every row of `Δ` is projected into a ball:
//!   `Δ_j ← Δ_j · ε_j / max(‖Δ_j‖, ε_j)` with `ε_j = opt_projection_format_epsilon·√(d/2048)`
//!   for template tokens, `opt_projection_epsilon·√(d/2048)` for input tokens and `1e-10` for the
//!   others ([`CptConfig::epsilon`], [`CptConfig::project`]);
//! - the loss also covers the context's label tokens (predicted from the previous position),
//!   weighted per example: with `decay` the query's labels weigh 1, the last context example's
//!   `f`, the one before `f²`, … ([`CptConfig::loss_weights`]); the mean is over the positions,
//!   not the weights, as PEFT computes it.

use anyhow::{bail, Result};
use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

/// The frozen context embeddings `E` in `softprompt_prompt.safetensors` and checkpoints.
pub const CPT_EMBEDDING: &str = "cpt.embedding";
/// The learned offset `Δ` (PEFT's `delta_embedding`), kept projected.
pub const CPT_DELTA: &str = "cpt.delta_embedding";

/// PEFT's floor for the bound of tokens that do not learn (labels, separators).
const MIN_EPSILON: f32 = 1e-10;

/// How the loss weighs the query's and the context examples' labels (PEFT's
/// `opt_weighted_loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum CptLossWeighting {
    /// Every label token weighs 1.
    None,
    /// The query's labels weigh 1, each earlier example's `opt_loss_decay_factor` times the next.
    Decay,
}

impl CptLossWeighting {
    /// PEFT's spelling.
    pub fn peft_name(self) -> &'static str {
        match self {
            CptLossWeighting::None => "none",
            CptLossWeighting::Decay => "decay",
        }
    }

    /// Parses PEFT's spelling.
    pub fn from_peft_name(s: &str) -> Result<Self> {
        Ok(match s {
            "none" => CptLossWeighting::None,
            "decay" => CptLossWeighting::Decay,
            other => bail!("unknown opt_weighted_loss_type `{other}` (PEFT's: none, decay)"),
        })
    }
}

/// PEFT's CPT fields: the context and how it learns.
#[derive(Debug, Clone, PartialEq)]
pub struct CptConfig {
    /// `cpt_token_ids`: the context's tokens (one virtual token each).
    pub token_ids: Vec<u32>,
    /// `cpt_mask`: PEFT keeps it and never reads it (the context is attended as a whole).
    pub mask: Vec<i64>,
    /// `cpt_tokens_type_mask`: each token's type (see the module documentation).
    pub types: Vec<u32>,
    /// `opt_weighted_loss_type`.
    pub weighted_loss: CptLossWeighting,
    /// `opt_loss_decay_factor`.
    pub decay_factor: f64,
    /// `opt_projection_epsilon`: the bound of input tokens (before the `√(d/2048)` scaling).
    pub projection_epsilon: f64,
    /// `opt_projection_format_epsilon`: the bound of template tokens.
    pub projection_format_epsilon: f64,
}

impl CptConfig {
    /// Number of context tokens (PEFT's `num_virtual_tokens`).
    pub fn len(&self) -> usize {
        self.token_ids.len()
    }

    /// Whether the context is empty (never for a checked config).
    pub fn is_empty(&self) -> bool {
        self.token_ids.is_empty()
    }

    /// Refuses lists of different lengths, an empty context and bounds or factors that are not
    /// finite numbers ≥ 0; messages name PEFT's fields.
    pub fn check(&self) -> Result<()> {
        let n = self.token_ids.len();
        if n == 0 {
            bail!("field `cpt_token_ids` is empty: the CPT context needs at least one token");
        }
        if self.mask.len() != n || self.types.len() != n {
            bail!(
                "fields `cpt_token_ids` ({n}), `cpt_mask` ({}) and `cpt_tokens_type_mask` ({}) must \
                 have the same length",
                self.mask.len(),
                self.types.len()
            );
        }
        for (name, v) in [
            ("opt_loss_decay_factor", self.decay_factor),
            ("opt_projection_epsilon", self.projection_epsilon),
            ("opt_projection_format_epsilon", self.projection_format_epsilon),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                bail!("field `{name}` is {v}; it must be a finite number ≥ 0");
            }
        }
        Ok(())
    }

    /// Whether context token `j` learns (template and input tokens; PEFT masks the others'
    /// gradient).
    pub fn trainable(&self) -> Vec<bool> {
        self.types.iter().map(|&t| matches!(t % 4, 1..=3)).collect()
    }

    /// The projection bound of every context token for hidden size `token_dim`.
    pub fn epsilon(&self, token_dim: usize) -> Vec<f32> {
        let scale = (token_dim as f32 / 2048.0).sqrt();
        let format = self.projection_format_epsilon as f32 * scale;
        let input = self.projection_epsilon as f32 * scale;
        self.types
            .iter()
            .map(|&t| match t % 4 {
                _ if t == 0 => MIN_EPSILON,
                1 | 3 => format,
                2 => input,
                _ => MIN_EPSILON,
            })
            .collect()
    }

    /// `Δ [p, d]` with every row of norm above its bound scaled back onto it (rows of norm 0 kept).
    pub fn project(&self, delta: &Tensor) -> Result<Tensor> {
        let (p, d) = delta.dims2()?;
        if p != self.len() {
            bail!("CPT offset has {p} rows for a context of {} tokens", self.len());
        }
        let norms: Vec<f32> = delta.sqr()?.sum(D::Minus1)?.sqrt()?.to_vec1()?;
        let factors: Vec<f32> = norms
            .iter()
            .zip(self.epsilon(d))
            .map(|(&n, eps)| if n > 0.0 { eps / n.max(eps) } else { 1.0 })
            .collect();
        let factors = Tensor::from_vec(factors, (p, 1), delta.device())?.to_dtype(delta.dtype())?;
        Ok(delta.broadcast_mul(&factors)?)
    }

    /// The context positions whose token is a label (`type > 0`, `type mod 4 = 0`), from 1 on
    /// (position 0 has no previous position to predict it), with their token and loss weight;
    /// and the weight of the query's label tokens, `None` when PEFT gives them none (the query's
    /// type, the context's largest plus 4, is not a multiple of 4).
    pub fn loss_weights(&self) -> (Vec<(usize, u32, f32)>, Option<f32>) {
        let is_label = |t: u32| t > 0 && t.is_multiple_of(4);
        let query = self.types.iter().copied().max().unwrap_or(0) + 4;
        let mut ids: Vec<u32> = self.types.iter().skip(1).copied().filter(|&t| is_label(t)).collect();
        if is_label(query) {
            ids.push(query);
        }
        ids.sort_unstable_by(|a, b| b.cmp(a));
        ids.dedup();
        let weight = |t: u32| -> f32 {
            match self.weighted_loss {
                CptLossWeighting::None => 1.0,
                CptLossWeighting::Decay => {
                    let rank = ids.iter().position(|&x| x == t).unwrap_or(0);
                    self.decay_factor.powi(rank as i32) as f32
                }
            }
        };
        let context = (1..self.len())
            .filter(|&j| is_label(self.types[j]))
            .map(|j| (j, self.token_ids[j], weight(self.types[j])))
            .collect();
        (context, is_label(query).then(|| weight(query)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn config(types: Vec<u32>, weighted_loss: CptLossWeighting) -> CptConfig {
        CptConfig {
            token_ids: (10..10 + types.len() as u32).collect(),
            mask: vec![1; types.len()],
            types,
            weighted_loss,
            decay_factor: 0.5,
            projection_epsilon: 0.2,
            projection_format_epsilon: 0.1,
        }
    }

    #[test]
    fn types_decide_what_learns_and_its_bound() {
        let c = config(vec![1, 2, 3, 4, 0, 5, 6, 7, 8], CptLossWeighting::None);
        assert_eq!(c.trainable(), [true, true, true, false, false, true, true, true, false]);
        // d = 2048: the bounds are the options themselves.
        let eps = c.epsilon(2048);
        assert_eq!(eps[..4], [0.1, 0.2, 0.1, MIN_EPSILON]);
        assert_eq!(eps[4], MIN_EPSILON);
        // d = 512: scaled by √(1/4).
        assert!((c.epsilon(512)[1] - 0.1).abs() < 1e-7);
    }

    #[test]
    fn projection_scales_long_rows_onto_their_bound() {
        let c = config(vec![1, 2, 4], CptLossWeighting::None);
        let delta = Tensor::new(&[[0.0f32, 0.05], [3.0, 4.0], [0.0, 0.0]], &Device::Cpu).unwrap();
        let p: Vec<Vec<f32>> = c.project(&delta).unwrap().to_vec2().unwrap();
        // Row 0 is within 0.1·√(2/2048): kept. Row 1 (norm 5) is scaled to norm 0.2·√(2/2048).
        let eps_in = 0.2 * (2.0f32 / 2048.0).sqrt();
        assert!((p[0][1] - 0.05f32.min(0.1 * (2.0f32 / 2048.0).sqrt())).abs() < 1e-7);
        let norm = (p[1][0].powi(2) + p[1][1].powi(2)).sqrt();
        assert!((norm - eps_in).abs() < 1e-6, "{norm} vs {eps_in}");
        assert_eq!(p[2], [0.0, 0.0]);
    }

    #[test]
    fn decay_weighs_later_examples_more() {
        // Two context examples (labels 4 and 8) and the query (12).
        let c = config(vec![1, 2, 3, 4, 0, 5, 6, 7, 8, 0], CptLossWeighting::Decay);
        let (ctx, query) = c.loss_weights();
        assert_eq!(ctx, vec![(3, 13, 0.25), (8, 18, 0.5)]);
        assert_eq!(query, Some(1.0));
        let (ctx, query) = config(c.types.clone(), CptLossWeighting::None).loss_weights();
        assert!(ctx.iter().all(|&(_, _, w)| w == 1.0) && query == Some(1.0));
        // A context ending on a template type leaves the query without labels, as in PEFT.
        assert_eq!(config(vec![1, 2, 3], CptLossWeighting::None).loss_weights().1, None);
    }
}
