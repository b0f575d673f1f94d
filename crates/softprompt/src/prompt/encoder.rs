//! P-tuning's prompt encoders (HF PEFT `PromptEncoder`): an MLP, or a bidirectional LSTM
//! followed by an MLP head, applied to the virtual-token embedding `[p, d]`.
//!
//! Every operation is a plain candle op whose backward pass candle implements (matmul, add,
//! narrow, cat, relu, tanh, mul, affine), so `candle_core::backprop` reaches every parameter.
//! The LSTM's sigmoid is written as `0.5·(1 + tanh(x/2))`, which also keeps the backward pass
//! finite for large |x| (an `exp`/`recip` composition gives `0·∞` there).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::Rng;

use super::init::uniform;

/// P-tuning's encoder type (PEFT's `encoder_reparameterization_type`, written `MLP` / `LSTM`
/// there and `mlp` / `lstm` in softprompt's options).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum EncoderKind {
    /// Linear, ReLU, Linear, ReLU, Linear.
    Mlp,
    /// Bi-directional LSTM, then Linear, ReLU, Linear.
    Lstm,
}

impl EncoderKind {
    /// PEFT's spelling (`MLP` or `LSTM`).
    pub fn peft_name(self) -> &'static str {
        match self {
            EncoderKind::Mlp => "MLP",
            EncoderKind::Lstm => "LSTM",
        }
    }

    /// Parses PEFT's spelling.
    pub fn from_peft_name(name: &str) -> Result<Self> {
        match name {
            "MLP" => Ok(EncoderKind::Mlp),
            "LSTM" => Ok(EncoderKind::Lstm),
            other => bail!("unknown encoder `{other}` (expected MLP or LSTM)"),
        }
    }
}

/// Which encoder p-tuning uses, with its sizes (PEFT's `encoder_reparameterization_type`,
/// `encoder_hidden_size`, `encoder_num_layers`, `encoder_dropout`).
#[derive(Debug, Clone, PartialEq)]
pub enum EncoderSpec {
    /// `Linear(d,h) → ReLU → Linear(h,h) → ReLU → Linear(h,d)`.
    Mlp {
        /// Hidden width `h`.
        hidden: usize,
    },
    /// `LSTM(d, h, num_layers, bidirectional)` → `Linear(2h,2h) → ReLU → Linear(2h,d)`.
    Lstm {
        /// Hidden width `h` of each direction.
        hidden: usize,
        /// Stacked LSTM layers.
        num_layers: usize,
        /// Dropout between LSTM layers, applied only by [`PromptEncoder::forward_train`].
        dropout: f64,
    },
}

impl EncoderSpec {
    /// The encoder of `kind` with hidden width `hidden`; `num_layers` and `dropout` apply to
    /// the LSTM only (PEFT's MLP always has two hidden layers).
    pub fn new(kind: EncoderKind, hidden: usize, num_layers: usize, dropout: f64) -> Self {
        match kind {
            EncoderKind::Mlp => EncoderSpec::Mlp { hidden },
            EncoderKind::Lstm => EncoderSpec::Lstm {
                hidden,
                num_layers,
                dropout,
            },
        }
    }

    /// The encoder type.
    pub fn kind(&self) -> EncoderKind {
        match self {
            EncoderSpec::Mlp { .. } => EncoderKind::Mlp,
            EncoderSpec::Lstm { .. } => EncoderKind::Lstm,
        }
    }

    /// PEFT's `encoder_reparameterization_type` (`MLP` or `LSTM`).
    pub fn peft_name(&self) -> &'static str {
        self.kind().peft_name()
    }

    /// The hidden width `h`.
    pub fn hidden(&self) -> usize {
        match self {
            EncoderSpec::Mlp { hidden } | EncoderSpec::Lstm { hidden, .. } => *hidden,
        }
    }
}

/// A linear layer `y = x·Wᵀ + b` with torch's layout (`weight [out, in]`, `bias [out]`).
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Var,
    /// `[out]`.
    pub bias: Var,
}

impl Linear {
    /// torch's default init: weight and bias uniform in `±1/sqrt(in)`.
    pub(crate) fn new(input: usize, output: usize, dtype: DType, device: &Device, rng: &mut StdRng) -> Result<Self> {
        let bound = 1.0 / (input as f64).sqrt();
        Ok(Self {
            weight: var_uniform(rng, &[output, input], bound, dtype, device)?,
            bias: var_uniform(rng, &[output], bound, dtype, device)?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.weight.as_tensor().t()?)?
            .broadcast_add(self.bias.as_tensor())?)
    }

    pub(crate) fn push_vars(&self, prefix: &str, out: &mut Vec<(String, Var)>) {
        out.push((format!("{prefix}.weight"), self.weight.clone()));
        out.push((format!("{prefix}.bias"), self.bias.clone()));
    }
}

fn var_uniform(rng: &mut StdRng, shape: &[usize], bound: f64, dtype: DType, device: &Device) -> Result<Var> {
    let n = shape.iter().product();
    let t = Tensor::from_vec(uniform(rng, n, -bound, bound), shape, device)?.to_dtype(dtype)?;
    Ok(Var::from_tensor(&t)?)
}

/// One direction of one LSTM layer (torch names `weight_ih_l{k}[_reverse]`, …).
#[derive(Debug, Clone)]
pub struct LstmDirection {
    /// `[4h, in]`, gate rows in torch's order i, f, g, o.
    pub weight_ih: Var,
    /// `[4h, h]`.
    pub weight_hh: Var,
    /// `[4h]`.
    pub bias_ih: Var,
    /// `[4h]`.
    pub bias_hh: Var,
}

impl LstmDirection {
    fn new(input: usize, hidden: usize, dtype: DType, device: &Device, rng: &mut StdRng) -> Result<Self> {
        let k = 1.0 / (hidden as f64).sqrt();
        Ok(Self {
            weight_ih: var_uniform(rng, &[4 * hidden, input], k, dtype, device)?,
            weight_hh: var_uniform(rng, &[4 * hidden, hidden], k, dtype, device)?,
            bias_ih: var_uniform(rng, &[4 * hidden], k, dtype, device)?,
            bias_hh: var_uniform(rng, &[4 * hidden], k, dtype, device)?,
        })
    }

    /// Runs over the sequence `x [p, in]` (backwards when `reverse`), h and c starting at zero;
    /// returns the hidden state of every position `[p, h]`.
    fn run(&self, x: &Tensor, hidden: usize, reverse: bool) -> Result<Tensor> {
        let p = x.dim(0)?;
        let w_hh_t = self.weight_hh.as_tensor().t()?;
        let bias = (self.bias_ih.as_tensor() + self.bias_hh.as_tensor())?;
        let pre = x.matmul(&self.weight_ih.as_tensor().t()?)?.broadcast_add(&bias)?;
        let mut outputs: Vec<Option<Tensor>> = vec![None; p];
        let mut state: Option<(Tensor, Tensor)> = None;
        for step in 0..p {
            let t = if reverse { p - 1 - step } else { step };
            let mut gates = pre.narrow(0, t, 1)?;
            if let Some((h, _)) = &state {
                gates = (gates + h.matmul(&w_hh_t)?)?;
            }
            let i = sigmoid(&gates.narrow(1, 0, hidden)?)?;
            let f = sigmoid(&gates.narrow(1, hidden, hidden)?)?;
            let g = gates.narrow(1, 2 * hidden, hidden)?.tanh()?;
            let o = sigmoid(&gates.narrow(1, 3 * hidden, hidden)?)?;
            let c = match &state {
                Some((_, c)) => ((f * c)? + (i * g)?)?,
                None => (i * g)?,
            };
            let h = (o * c.tanh()?)?;
            outputs[t] = Some(h.clone());
            state = Some((h, c));
        }
        let outputs: Vec<Tensor> = outputs.into_iter().flatten().collect();
        Ok(Tensor::cat(&outputs, 0)?)
    }

    fn push_vars(&self, layer: usize, suffix: &str, out: &mut Vec<(String, Var)>) {
        let p = "prompt_encoder.default.lstm_head";
        out.push((format!("{p}.weight_ih_l{layer}{suffix}"), self.weight_ih.clone()));
        out.push((format!("{p}.weight_hh_l{layer}{suffix}"), self.weight_hh.clone()));
        out.push((format!("{p}.bias_ih_l{layer}{suffix}"), self.bias_ih.clone()));
        out.push((format!("{p}.bias_hh_l{layer}{suffix}"), self.bias_hh.clone()));
    }
}

/// `σ(x) = 0.5·(1 + tanh(x/2))`, built from ops with a backward pass.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(x.affine(0.5, 0.0)?.tanh()?.affine(0.5, 0.5)?)
}

/// P-tuning's encoder with its parameters.
#[derive(Debug, Clone)]
pub enum PromptEncoder {
    /// MLP: `mlp_head.{0,2,4}`.
    Mlp {
        /// `mlp_head.0`, `mlp_head.2`, `mlp_head.4`.
        layers: [Linear; 3],
    },
    /// Bidirectional LSTM (`lstm_head`) then `mlp_head.{0,2}`.
    Lstm {
        /// Hidden width per direction.
        hidden: usize,
        /// `(forward, reverse)` per layer.
        layers: Vec<(LstmDirection, LstmDirection)>,
        /// Dropout between layers (training only).
        dropout: f64,
        /// `mlp_head.0` (2h→2h) and `mlp_head.2` (2h→d).
        head: [Linear; 2],
    },
}

impl PromptEncoder {
    /// Builds an encoder for token dimension `d` with torch's default initialisation.
    pub fn new(spec: &EncoderSpec, d: usize, dtype: DType, device: &Device, rng: &mut StdRng) -> Result<Self> {
        match *spec {
            EncoderSpec::Mlp { hidden } => {
                if hidden == 0 {
                    bail!("encoder_hidden_size must be at least 1");
                }
                Ok(PromptEncoder::Mlp {
                    layers: [
                        Linear::new(d, hidden, dtype, device, rng)?,
                        Linear::new(hidden, hidden, dtype, device, rng)?,
                        Linear::new(hidden, d, dtype, device, rng)?,
                    ],
                })
            }
            EncoderSpec::Lstm {
                hidden,
                num_layers,
                dropout,
            } => {
                if hidden == 0 {
                    bail!("encoder_hidden_size must be at least 1");
                }
                if num_layers == 0 {
                    bail!("encoder_num_layers must be at least 1 for the LSTM encoder");
                }
                if !(0.0..1.0).contains(&dropout) {
                    bail!("encoder_dropout must be in [0, 1), got {dropout}");
                }
                // torch creates all LSTM parameters (layer by layer, forward then reverse)
                // before the MLP head.
                let mut layers = Vec::with_capacity(num_layers);
                for l in 0..num_layers {
                    let input = if l == 0 { d } else { 2 * hidden };
                    let fwd = LstmDirection::new(input, hidden, dtype, device, rng)?;
                    let rev = LstmDirection::new(input, hidden, dtype, device, rng)?;
                    layers.push((fwd, rev));
                }
                let head = [
                    Linear::new(2 * hidden, 2 * hidden, dtype, device, rng)?,
                    Linear::new(2 * hidden, d, dtype, device, rng)?,
                ];
                Ok(PromptEncoder::Lstm {
                    hidden,
                    layers,
                    dropout,
                    head,
                })
            }
        }
    }

    /// The spec this encoder was built from.
    pub fn spec(&self) -> EncoderSpec {
        match self {
            PromptEncoder::Mlp { layers } => EncoderSpec::Mlp {
                hidden: layers[0].weight.dim(0).unwrap_or(0),
            },
            PromptEncoder::Lstm {
                hidden,
                layers,
                dropout,
                ..
            } => EncoderSpec::Lstm {
                hidden: *hidden,
                num_layers: layers.len(),
                dropout: *dropout,
            },
        }
    }

    /// Encodes `x [p, d]` → `[p, d]` (inference: no dropout).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, None)
    }

    /// Like [`PromptEncoder::forward`], with dropout between LSTM layers as torch applies it in
    /// training mode (inverted dropout, mask drawn from `rng`). Same as `forward` when the
    /// dropout is 0 or the encoder is an MLP.
    pub fn forward_train(&self, x: &Tensor, rng: &mut StdRng) -> Result<Tensor> {
        self.run(x, Some(rng))
    }

    fn run(&self, x: &Tensor, mut rng: Option<&mut StdRng>) -> Result<Tensor> {
        match self {
            PromptEncoder::Mlp { layers } => {
                let h = layers[0].forward(x)?.relu()?;
                let h = layers[1].forward(&h)?.relu()?;
                layers[2].forward(&h)
            }
            PromptEncoder::Lstm {
                hidden,
                layers,
                dropout,
                head,
            } => {
                let mut h = x.clone();
                for (l, (fwd, rev)) in layers.iter().enumerate() {
                    if l > 0 && *dropout > 0.0 {
                        if let Some(rng) = rng.as_deref_mut() {
                            h = apply_dropout(&h, *dropout, rng)?;
                        }
                    }
                    let a = fwd.run(&h, *hidden, false)?;
                    let b = rev.run(&h, *hidden, true)?;
                    h = Tensor::cat(&[a, b], 1)?;
                }
                let h = head[0].forward(&h)?.relu()?;
                head[1].forward(&h)
            }
        }
    }

    /// Parameters with PEFT's state-dict names (`prompt_encoder.default.…`), in torch's order.
    pub fn vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        match self {
            PromptEncoder::Mlp { layers } => {
                for (i, layer) in layers.iter().enumerate() {
                    layer.push_vars(&format!("prompt_encoder.default.mlp_head.{}", 2 * i), &mut out);
                }
            }
            PromptEncoder::Lstm { layers, head, .. } => {
                for (l, (fwd, rev)) in layers.iter().enumerate() {
                    fwd.push_vars(l, "", &mut out);
                    rev.push_vars(l, "_reverse", &mut out);
                }
                for (i, layer) in head.iter().enumerate() {
                    layer.push_vars(&format!("prompt_encoder.default.mlp_head.{}", 2 * i), &mut out);
                }
            }
        }
        out
    }
}

fn apply_dropout(x: &Tensor, rate: f64, rng: &mut StdRng) -> Result<Tensor> {
    let keep = 1.0 - rate;
    let n = x.elem_count();
    let mask: Vec<f64> = (0..n)
        .map(|_| if rng.random::<f64>() < keep { 1.0 / keep } else { 0.0 })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())
        .context("cannot build the dropout mask")?
        .to_dtype(x.dtype())?;
    Ok((x * mask)?)
}
