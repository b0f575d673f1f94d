//! AdamW (decoupled weight decay, as `torch.optim.AdamW`) and learning-rate schedules, with
//! state that can be saved and restored exactly.

pub use crate::config::Schedule;
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
        self.update_scaled(params, grads, lr, &|_| 1.0)
    }

    /// [`AdamW::update`] with each parameter's learning rate `lr · scale(name)` (DePT's `A` and
    /// `B` train at their own rate; the weight decay is scaled alike, as torch's per-group `lr`).
    pub fn update_scaled(
        &mut self,
        params: &[(String, Var)],
        grads: &BTreeMap<String, Tensor>,
        base_lr: f64,
        scale: &dyn Fn(&str) -> f64,
    ) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        for (name, var) in params {
            let Some(g) = grads.get(name) else { continue };
            let lr = base_lr * scale(name);
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two AdamW steps on two scalars against PyTorch's `AdamW` update written out by hand:
    /// `p ← p·(1 − lr·wd)`, `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
    /// `p ← p − lr·(m/(1−β₁ᵗ)) / (sqrt(v/(1−β₂ᵗ)) + ε)`.
    #[test]
    fn adamw_matches_pytorch_formula() {
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        };
        let var = Var::from_tensor(&Tensor::new(&[1.0f64, -2.0], &Device::Cpu).unwrap()).unwrap();
        let params = vec![("x".to_string(), var.clone())];
        let mut opt = AdamW::new(cfg);
        let (lr, grads) = (0.1, [[0.5f64, 0.25], [-1.0, 0.75]]);
        let (mut p, mut m, mut v) = ([1.0f64, -2.0], [0.0f64; 2], [0.0f64; 2]);
        for (t, g) in grads.iter().enumerate() {
            let step = (t + 1) as i32;
            let mut map = BTreeMap::new();
            map.insert("x".to_string(), Tensor::new(g, &Device::Cpu).unwrap());
            opt.update(&params, &map, lr).unwrap();
            for i in 0..2 {
                p[i] *= 1.0 - lr * cfg.weight_decay;
                m[i] = cfg.beta1 * m[i] + (1.0 - cfg.beta1) * g[i];
                v[i] = cfg.beta2 * v[i] + (1.0 - cfg.beta2) * g[i] * g[i];
                let m_hat = m[i] / (1.0 - cfg.beta1.powi(step));
                let v_hat = v[i] / (1.0 - cfg.beta2.powi(step));
                p[i] -= lr * m_hat / (v_hat.sqrt() + cfg.eps);
            }
            let got: Vec<f64> = var.as_tensor().to_vec1().unwrap();
            for i in 0..2 {
                assert!((got[i] - p[i]).abs() < 1e-12, "step {step}: {got:?} vs {p:?}");
            }
        }
        assert_eq!(opt.step, 2);
        // Step 1 by hand for x: m̂ = 0.5, v̂ = 0.25, so x = 1·(1 − 0.001) − 0.1·0.5/(0.5 + 1e-8).
        let expected_first = 0.999 - 0.1 * 0.5 / (0.5 + 1e-8);
        let mut fresh = AdamW::new(cfg);
        let var1 = Var::from_tensor(&Tensor::new(&[1.0f64], &Device::Cpu).unwrap()).unwrap();
        let mut map = BTreeMap::new();
        map.insert("x".to_string(), Tensor::new(&[0.5f64], &Device::Cpu).unwrap());
        fresh.update(&[("x".to_string(), var1.clone())], &map, lr).unwrap();
        let x: Vec<f64> = var1.as_tensor().to_vec1().unwrap();
        assert!((x[0] - expected_first).abs() < 1e-12, "{x:?} vs {expected_first}");
    }
}
