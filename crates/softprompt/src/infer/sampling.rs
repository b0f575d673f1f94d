//! Choosing the next token from a row of logits: greedy at temperature 0, otherwise sampling
//! from the tempered distribution cut to the `top_k` most likely tokens and to the smallest set
//! whose probability reaches `top_p`. Each sequence owns its random generator (seeded), so a
//! sequence's tokens do not depend on the others in its batch.

use anyhow::{bail, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How a sequence picks its tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 is greedy.
    pub temperature: f32,
    /// Nucleus: keep the most likely tokens until their probability reaches `top_p` (1 = all).
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Seed of the sequence's random generator (`None`: from the operating system).
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Refuses values outside their ranges (a finite temperature ≥ 0, `0 < top_p ≤ 1`).
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            bail!("temperature must be a finite number ≥ 0, got {}", self.temperature);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("top_p must be in (0, 1], got {}", self.top_p);
        }
        Ok(())
    }
}

/// A sequence's token chooser.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// A sampler with its own generator.
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(|| rand::rng().random());
        Self {
            params,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// The next token and its log-probability under the model (temperature 1, no cut).
    pub fn next(&mut self, logits: &[f32]) -> (u32, f32) {
        let id = if self.params.temperature == 0.0 {
            argmax(logits)
        } else {
            self.sample(logits)
        };
        (id as u32, log_softmax_at(logits, id))
    }

    fn sample(&mut self, logits: &[f32]) -> usize {
        let t = self.params.temperature;
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if self.params.top_k > 0 {
            order.truncate(self.params.top_k);
        }
        let max = logits[order[0]];
        let mut probs: Vec<f64> = order.iter().map(|&i| (((logits[i] - max) / t) as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (n, p) in probs.iter_mut().enumerate() {
            *p /= total;
            cum += *p;
            if cum >= self.params.top_p as f64 {
                keep = n + 1;
                break;
            }
        }
        probs.truncate(keep);
        let kept: f64 = probs.iter().sum();
        let mut u = self.rng.random::<f64>() * kept;
        for (n, p) in probs.iter().enumerate() {
            if u < *p {
                return order[n];
            }
            u -= p;
        }
        order[keep - 1]
    }
}

/// Index of the largest value (the first one on ties).
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best
}

/// `log softmax(x)[i]`.
pub fn log_softmax_at(x: &[f32], i: usize) -> f32 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = x.iter().map(|v| ((v - max) as f64).exp()).sum();
    ((x[i] - max) as f64 - sum.ln()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.next(&[0.0, 2.0, 2.0, 1.0]).0, 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_seeds_repeat() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 7) % 13) as f32 * 0.3).collect();
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 1,
            ..Default::default()
        };
        assert_eq!(Sampler::new(p).next(&logits).0 as usize, argmax(&logits));
        let p = SamplingParams {
            temperature: 0.8,
            top_p: 0.9,
            seed: Some(7),
            ..Default::default()
        };
        let run = || {
            let mut s = Sampler::new(p);
            (0..20).map(|_| s.next(&logits).0).collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
        // top_p keeps only tokens inside the nucleus
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.01,
            seed: Some(1),
            ..Default::default()
        };
        let mut s = Sampler::new(p);
        assert!((0..20).all(|_| s.next(&logits).0 as usize == argmax(&logits)));
    }

    #[test]
    fn bad_parameters_are_refused() {
        for p in [
            SamplingParams {
                temperature: -1.0,
                ..Default::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            },
            SamplingParams {
                temperature: f32::NAN,
                ..Default::default()
            },
        ] {
            assert!(p.validate().is_err());
        }
    }
}
