//! Residual prompt tuning (Razdaibiedina et al. 2023, "Residual Prompt Tuning"): every virtual
//! token of the raw prompt `P [p, d]` passes through one shared bottleneck MLP with a skip
//! connection, `P' = P + LN(W_up · ReLU(W_down · P))`, LayerNorm with its learnable scale and
//! shift as in the paper. Only `P'` is needed at inference, so the adapter holds it as a plain
//! prompt-tuning prompt; the raw parameters (named [`RESIDUAL_EMBEDDING`] and
//! `residual_prompt.{down,up,layer_norm}.{weight,bias}`) are kept to continue training.
//!
//! Every operation is a candle op with a backward pass (matmul, relu, mean, sqr, sqrt,
//! broadcast arithmetic), so the trainer's `sum(P' ⊙ dP')` reaches every parameter.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use rand::rngs::StdRng;

use super::encoder::Linear;

/// Name of the raw prompt `P` of a residual prompt (in `softprompt_prompt.safetensors` and
/// checkpoints; the adapter's `prompt_embeddings` is `P'`).
pub const RESIDUAL_EMBEDDING: &str = "residual_prompt.embedding";

/// LayerNorm's ε (torch's default, as in the paper's code).
pub const LAYER_NORM_EPS: f64 = 1e-5;

/// The shared bottleneck MLP with LayerNorm and the skip connection.
#[derive(Debug, Clone)]
pub struct ResidualMlp {
    /// `W_down`: `Linear(d, bottleneck)`.
    pub down: Linear,
    /// `W_up`: `Linear(bottleneck, d)`.
    pub up: Linear,
    /// LayerNorm scale `[d]` (starts at 1).
    pub ln_weight: Var,
    /// LayerNorm shift `[d]` (starts at 0).
    pub ln_bias: Var,
}

impl ResidualMlp {
    /// A new MLP for width `d` with `bottleneck` hidden units: torch's default initialisation of
    /// the linear layers drawn from `rng`, LayerNorm's scale 1 and shift 0.
    pub fn new(d: usize, bottleneck: usize, dtype: DType, device: &Device, rng: &mut StdRng) -> Result<Self> {
        if bottleneck == 0 {
            bail!("residual_bottleneck must be at least 1");
        }
        Ok(Self {
            down: Linear::new(d, bottleneck, dtype, device, rng)?,
            up: Linear::new(bottleneck, d, dtype, device, rng)?,
            ln_weight: Var::from_tensor(&Tensor::ones(d, dtype, device)?)?,
            ln_bias: Var::from_tensor(&Tensor::zeros(d, dtype, device)?)?,
        })
    }

    /// The bottleneck width.
    pub fn bottleneck(&self) -> usize {
        self.down.weight.dim(0).unwrap_or(0)
    }

    /// `x + LN(up(relu(down(x))))` for `x [p, d]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.down.forward(x)?.relu()?;
        let y = self.up.forward(&h)?;
        let mean = y.mean_keepdim(D::Minus1)?;
        let centred = y.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + LAYER_NORM_EPS)?.sqrt()?)?;
        let ln = normed
            .broadcast_mul(self.ln_weight.as_tensor())?
            .broadcast_add(self.ln_bias.as_tensor())?;
        Ok((x + ln)?)
    }

    /// The parameters with their saved names, after the raw prompt's.
    pub fn vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        self.down.push_vars("residual_prompt.down", &mut out);
        self.up.push_vars("residual_prompt.up", &mut out);
        out.push(("residual_prompt.layer_norm.weight".into(), self.ln_weight.clone()));
        out.push(("residual_prompt.layer_norm.bias".into(), self.ln_bias.clone()));
        out
    }
}
