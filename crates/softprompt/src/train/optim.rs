//! AdamW (decoupled weight decay, as `torch.optim.AdamW`) and learning-rate schedules, with
//! state that can be saved and restored exactly.

use anyhow::{bail, Result};
use candle_core::{Tensor, Var};
use std::collections::BTreeMap;

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

/// AdamW over named parameters; moments are kept per name.
pub struct AdamW {
    cfg: AdamWConfig,
    /// First and second moments per parameter name.
    pub moments: BTreeMap<String, (Tensor, Tensor)>,
    /// Number of updates taken.
    pub step: usize,
}

impl AdamW {
    /// A fresh optimiser.
    pub fn new(cfg: AdamWConfig) -> Self {
        Self {
            cfg,
            moments: BTreeMap::new(),
            step: 0,
        }
    }

    /// One update of every parameter that has a gradient in `grads`.
    pub fn update(&mut self, params: &[(String, Var)], grads: &BTreeMap<String, Tensor>, lr: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        for (name, var) in params {
            let Some(g) = grads.get(name) else { continue };
            let (m, v) = match self.moments.get(name) {
                Some((m, v)) => (m.clone(), v.clone()),
                None => (g.zeros_like()?, g.zeros_like()?),
            };
            let m = ((m * b1)? + (g * (1.0 - b1))?)?;
            let v = ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let denom = ((&v / bc2)?.sqrt()? + self.cfg.eps)?;
            let update = ((&m / bc1)? / denom)?;
            let decayed = (var.as_tensor() * (1.0 - lr * self.cfg.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
            self.moments.insert(name.clone(), (m, v));
        }
        Ok(())
    }
}

/// Learning-rate schedule after the linear warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Constant after warm-up.
    Constant,
    /// Linear decay to zero at the last step (transformers' `linear`).
    Linear,
    /// Cosine decay to zero at the last step.
    Cosine,
}

/// Learning rate at `step` (1-based) of `total`, with `warmup` linear warm-up steps.
pub fn learning_rate(base: f64, schedule: Schedule, step: usize, warmup: usize, total: usize) -> f64 {
    // transformers' schedules evaluate the multiplier at the 0-based step count.
    let s = step.saturating_sub(1) as f64;
    if (step.saturating_sub(1)) < warmup {
        return base * s / warmup.max(1) as f64;
    }
    let span = (total.saturating_sub(warmup)).max(1) as f64;
    let progress = ((s - warmup as f64) / span).clamp(0.0, 1.0);
    match schedule {
        Schedule::Constant => base,
        Schedule::Linear => base * (1.0 - progress),
        Schedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

/// Scales gradients so their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(grads: &mut BTreeMap<String, Tensor>, max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.values() {
        sq += g
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = sq.sqrt();
    if !norm.is_finite() {
        bail!("gradient norm is not finite ({norm})");
    }
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.values_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}
