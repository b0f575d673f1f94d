//! Losses with their gradients written out: one softmax cross-entropy, used by the causal-LM
//! loss on target tokens and by the classification head on an encoder's pooler.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};

use crate::backbone::{lm_logits, CausalLm, Encoder};
use crate::batch::Batch;

/// Mean softmax cross-entropy of `logits [N, C]` against the classes `targets` (N ids), and
/// d(loss)/d(logits) `= (softmax − onehot) / N`.
pub fn softmax_cross_entropy(logits: &Tensor, targets: &[u32]) -> Result<(f32, Tensor)> {
    let device = logits.device();
    let n = targets.len();
    if n == 0 {
        bail!("cross-entropy of an empty batch");
    }
    let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let targets = Tensor::new(targets, device)?.unsqueeze(1)?;
    let loss = -(log_probs.gather(&targets, 1)?.sum_all()?.to_scalar::<f32>()? / n as f32);
    let onehot = Tensor::zeros(logits.shape(), DType::F32, device)?.scatter_add(
        &targets,
        &Tensor::ones((n, 1), DType::F32, device)?,
        1,
    )?;
    let dlogits = ((log_probs.exp()? - onehot)? / n as f64)?;
    Ok((loss, dlogits))
}

/// [`softmax_cross_entropy`] with a weight per row: `Σ wᵢ·CEᵢ / N` (the mean over the rows,
/// not over the weights, as PEFT's CPT loss) and d(loss)/d(logits) `= wᵢ·(softmax − onehot) / N`.
pub fn weighted_softmax_cross_entropy(logits: &Tensor, targets: &[u32], weights: &[f32]) -> Result<(f32, Tensor)> {
    let n = targets.len();
    if weights.len() != n {
        bail!("{} loss weights for {n} targets", weights.len());
    }
    let (_, dlogits) = softmax_cross_entropy(logits, targets)?;
    let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let picked: Vec<f32> = log_probs
        .gather(&Tensor::new(targets, logits.device())?.unsqueeze(1)?, 1)?
        .flatten_all()?
        .to_vec1()?;
    let loss = -picked.iter().zip(weights).map(|(lp, w)| lp * w).sum::<f32>() / n as f32;
    let w = Tensor::new(weights, logits.device())?.unsqueeze(1)?;
    Ok((loss, dlogits.broadcast_mul(&w)?))
}

/// Causal-LM loss (mean cross-entropy over the target tokens) and d(loss)/d(hidden) `[B,T,D]`.
/// The vocabulary head runs only at the loss positions.
pub fn lm_loss(backbone: &dyn CausalLm, batch: &Batch, hidden: &Tensor) -> Result<(f32, Tensor)> {
    lm_loss_at(backbone, hidden, &batch.loss_positions, &batch.loss_targets, None)
}

/// [`lm_loss`] at the flat positions `positions` (`b·T + t`, each predicting the token of
/// `targets`), each cross-entropy weighted by `weights` when given
/// ([`weighted_softmax_cross_entropy`]).
pub fn lm_loss_at(
    backbone: &dyn CausalLm,
    hidden: &Tensor,
    positions: &[u32],
    targets: &[u32],
    weights: Option<&[f32]>,
) -> Result<(f32, Tensor)> {
    let (b, t, d) = hidden.dims3()?;
    let device = hidden.device();
    if positions.is_empty() {
        bail!("the batch has no target tokens");
    }
    let pos = Tensor::new(positions, device)?;
    let rows = hidden.reshape((b * t, d))?.index_select(&pos, 0)?;
    let logits = lm_logits(backbone, &rows)?;
    let (loss, dlogits) = match weights {
        None => softmax_cross_entropy(&logits, targets)?,
        Some(w) => weighted_softmax_cross_entropy(&logits, targets, w)?,
    };
    let d_rows = dlogits.matmul(backbone.lm_head())?;
    let d_hidden = Tensor::zeros((b * t, d), DType::F32, device)?.index_add(&pos, &d_rows, 0)?;
    Ok((loss, d_hidden.reshape((b, t, d))?))
}

/// A linear classification head `logits = pooled·Wᵀ + b` on an encoder's pooler.
pub struct ClassifierHead {
    /// `[classes, hidden]`.
    pub weight: candle_core::Var,
    /// `[classes]`.
    pub bias: candle_core::Var,
}

/// The loss of a classification head and its gradients.
pub struct HeadLoss {
    /// Mean cross-entropy over the batch.
    pub loss: f32,
    /// d(loss)/d(hidden) `[B, T, D]`.
    pub d_hidden: Tensor,
    /// d(loss)/d(weight).
    pub d_weight: Tensor,
    /// d(loss)/d(bias).
    pub d_bias: Tensor,
}

impl ClassifierHead {
    /// The head saved in a PEFT sequence-classification adapter, if it has one.
    pub fn from_adapter(adapter: &crate::adapter::PeftAdapter) -> Result<Option<Self>> {
        let Some((w, b)) = adapter.classifier() else {
            return Ok(None);
        };
        Ok(Some(Self {
            weight: candle_core::Var::from_tensor(w)?,
            bias: candle_core::Var::from_tensor(b)?,
        }))
    }

    fn logits_of_pooled(&self, pooled: &Tensor) -> Result<Tensor> {
        Ok(pooled
            .matmul(&self.weight.as_tensor().t()?)?
            .broadcast_add(self.bias.as_tensor())?)
    }

    /// Logits `[B, classes]` from hidden states `[B, T, D]`.
    pub fn logits(&self, encoder: &dyn Encoder, hidden: &Tensor) -> Result<Tensor> {
        self.logits_of_pooled(&encoder.pool(hidden)?)
    }

    /// Mean cross-entropy over the batch against the classes `gold`, with its gradients.
    pub fn loss(&self, encoder: &dyn Encoder, hidden: &Tensor, gold: &[u32]) -> Result<HeadLoss> {
        let pooled = encoder.pool(hidden)?;
        let (loss, dlogits) = softmax_cross_entropy(&self.logits_of_pooled(&pooled)?, gold)?;
        let d_weight = dlogits.t()?.matmul(&pooled)?;
        let d_bias = dlogits.sum(0)?;
        let d_pooled = dlogits.matmul(self.weight.as_tensor())?;
        let d_hidden = encoder.pool_backward(hidden, &d_pooled)?;
        Ok(HeadLoss {
            loss,
            d_hidden,
            d_weight,
            d_bias,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cross_entropy_matches_hand_computed_numbers() {
        // Row 0: logits [0, ln 3] → p = [1/4, 3/4], target 1: −ln(3/4).
        // Row 1: logits [0, 0]    → p = [1/2, 1/2], target 0: −ln(1/2).
        let logits = Tensor::new(&[[0f32, 3f32.ln()], [0.0, 0.0]], &Device::Cpu).unwrap();
        let (loss, d) = softmax_cross_entropy(&logits, &[1, 0]).unwrap();
        let want = (-(0.75f32).ln() - (0.5f32).ln()) / 2.0;
        assert!((loss - want).abs() < 1e-6, "{loss} vs {want}");
        // (softmax − onehot) / 2
        let want_d = [[0.125f32, -0.125], [-0.25, 0.25]];
        let got: Vec<Vec<f32>> = d.to_vec2().unwrap();
        for (g, w) in got.iter().flatten().zip(want_d.iter().flatten()) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
        assert!(softmax_cross_entropy(&logits, &[]).is_err());
    }

    /// A causal LM whose vocabulary head is the identity: the logits are the hidden rows.
    struct IdentityHead {
        info: crate::backbone::ModelInfo,
        head: Tensor,
    }

    impl crate::backbone::Backbone for IdentityHead {
        fn info(&self) -> &crate::backbone::ModelInfo {
            &self.info
        }
        fn embedding_table(&self) -> &Tensor {
            &self.head
        }
        fn forward(&self, input: &crate::backbone::BackboneInput) -> Result<Tensor> {
            Ok(input.embeds.clone())
        }
        fn forward_train(&self, _: &crate::backbone::BackboneInput) -> Result<(Tensor, crate::backbone::Tape)> {
            bail!("not needed")
        }
        fn backward(&self, _: &crate::backbone::Tape, d_hidden: &Tensor) -> Result<Tensor> {
            Ok(d_hidden.clone())
        }
        fn forward_prefixed(&self, _: &crate::backbone::BackboneInput, _: &crate::backbone::KvCache) -> Result<Tensor> {
            bail!("not needed")
        }
        fn forward_train_prefixed(
            &self,
            _: &crate::backbone::BackboneInput,
            _: &crate::backbone::KvCache,
        ) -> Result<(Tensor, crate::backbone::Tape)> {
            bail!("not needed")
        }
        fn backward_prefixed(&self, _: &crate::backbone::Tape, _: &Tensor) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
            bail!("not needed")
        }
    }

    impl CausalLm for IdentityHead {
        fn forward_cached(
            &self,
            _: &crate::backbone::BackboneInput,
            _: &mut crate::backbone::KvCache,
        ) -> Result<Tensor> {
            bail!("not needed")
        }
        fn lm_head(&self) -> &Tensor {
            &self.head
        }
    }

    #[test]
    fn lm_loss_covers_only_target_tokens() {
        let lm = IdentityHead {
            info: crate::backbone::ModelInfo {
                arch: crate::backbone::Arch::Llama,
                model_type: "test".into(),
                source: "test".into(),
                shape: crate::backbone::Shape {
                    layers: 1,
                    hidden: 2,
                    heads: 1,
                    kv_heads: 1,
                    head_dim: 2,
                    intermediate: 1,
                    vocab: 2,
                    max_positions: 8,
                },
                qk_norm: false,
                params: 0,
                features: Vec::new(),
                dtypes_on_disk: Default::default(),
            },
            head: Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &Device::Cpu).unwrap(),
        };
        use crate::template::Token;
        // Prompt [0, 1], target [1]: only position 1 (predicting the target) has a loss.
        let e = crate::task::Example {
            origin: "t:1".into(),
            prompt: vec![Token::Id(0), Token::Id(1)],
            target: vec![1],
            gold: 0,
            truncated: false,
        };
        let batch = crate::batch::make_batch(&[&e], true, &Device::Cpu).unwrap();
        // Position 1's logits are [0, ln 3]: p = [1/4, 3/4], loss −ln(3/4).
        let hidden = Tensor::new(&[[[5f32, -5.0], [0.0, 3f32.ln()], [7.0, 7.0]]], &Device::Cpu).unwrap();
        let (loss, d) = lm_loss(&lm, &batch, &hidden).unwrap();
        assert!((loss + 0.75f32.ln()).abs() < 1e-6, "{loss}");
        let d: Vec<Vec<Vec<f32>>> = d.to_vec3().unwrap();
        let want = [[0f32, 0.0], [0.25, -0.25], [0.0, 0.0]];
        for (g, w) in d[0].iter().flatten().zip(want.iter().flatten()) {
            assert!((g - w).abs() < 1e-6, "{d:?}");
        }
    }
}
