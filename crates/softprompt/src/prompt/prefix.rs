//! Key/value prefixes: the learnable parts of prefix tuning (Li & Liang 2021, PEFT's
//! `PREFIX_TUNING`) and of Cartridges (Eyuboglu et al. 2025, PEFT's `CARTRIDGE`). Both produce
//! PEFT's flat prefix `[V, layers·2·kv_dim]` (viewed `[V, layers·2, kv_heads, head_dim]`, entry
//! `2l` = layer l's keys, `2l+1` its values), which every attention layer reads as a cache of `V`
//! positions before the input.
//!
//! | method | parameters (PEFT's state-dict names) | prefix |
//! |---|---|---|
//! | prefix tuning | `prompt_encoder.default.embedding.weight` `[V, layers·2·kv_dim]` | the embedding itself |
//! | prefix tuning, projection | `prompt_encoder.default.embedding.weight` `[V, kv_dim]`, `prompt_encoder.default.transform.{0,2}.{weight,bias}` | `Linear(kv_dim, hidden) → tanh → Linear(hidden, layers·2·kv_dim)` |
//! | Cartridge | `prompt_encoder.default.frozen_embedding` `[F, …]` (not trained), `prompt_encoder.default.trainable_embedding` `[V−F, …]` | the two stacked |
//!
//! [`KvPrefix::forward`] is a candle graph over [`KvPrefix::vars`]: the trainer chains the
//! backbone's per-layer `(dK, dV)` into `d_prefix` with [`flat_gradient`] and calls
//! `(prefix * d_prefix).sum_all()?.backward()?`, as for an input prompt.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use std::collections::HashMap;

use super::encoder::Linear;
use super::init::{normal, uniform};
use super::PromptInit;
use crate::backbone::KvCache;

/// PEFT's name of the prefix embedding (both prefix-tuning layouts).
pub const PREFIX_EMBEDDING: &str = "prompt_encoder.default.embedding.weight";
/// PEFT's name prefix of the projection MLP's linear layers (`.0` and `.2`).
pub const PREFIX_TRANSFORM: &str = "prompt_encoder.default.transform";
/// PEFT's name of a Cartridge's frozen first tokens.
pub const CARTRIDGE_FROZEN: &str = "prompt_encoder.default.frozen_embedding";
/// PEFT's name of a Cartridge's trainable tokens.
pub const CARTRIDGE_TRAINABLE: &str = "prompt_encoder.default.trainable_embedding";

/// The attention geometry a prefix is laid out for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixShape {
    /// Transformer layers.
    pub layers: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

impl PrefixShape {
    /// Key/value width `kv_heads × head_dim` (PEFT's `token_dim` of a prefix).
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    /// Columns of the flat prefix: `layers · 2 · kv_dim`.
    pub fn width(&self) -> usize {
        self.layers * 2 * self.kv_dim()
    }
}

/// Which key/value-prefix method, with its options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefixSpec {
    /// Prefix tuning; `projection: Some(hidden)` reparameterises the prefix through PEFT's MLP.
    PrefixTuning {
        /// Hidden width of the projection MLP, when there is one.
        projection: Option<usize>,
    },
    /// A Cartridge: the prefix itself, its first `num_frozen_tokens` never trained.
    Cartridge {
        /// Leading virtual tokens kept frozen.
        num_frozen_tokens: usize,
    },
}

/// A learnable key/value prefix.
#[derive(Debug, Clone)]
pub struct KvPrefix {
    spec: PrefixSpec,
    shape: PrefixShape,
    num_virtual_tokens: usize,
    /// Prefix tuning: the embedding; Cartridge: the trainable tokens.
    embedding: Var,
    /// Projection MLP (`transform.0`, `transform.2`).
    transform: Option<(Linear, Linear)>,
    /// Cartridge: the frozen tokens.
    frozen: Option<Tensor>,
    /// Whether PEFT's zero init was used (recorded as `init_weights: "zero"`).
    zero_init: bool,
}

impl KvPrefix {
    /// A new prefix of `num_virtual_tokens` positions on `device` (f32), starting from `init`:
    /// `RandomNormal` (PEFT's default, `nn.Embedding`'s N(0, 1)), `Random` (uniform ±0.5),
    /// `Zero` (PEFT's `init_weights="zero"`: the embedding, or with a projection its last
    /// layer, is zero) or `FromTensor` (a flat prefix `[V, layers·2·kv_dim]`, e.g. a text
    /// prefill's keys and values; not with a projection, which cannot be inverted). The
    /// projection's linear layers get torch's default init from `rng`.
    pub fn new(
        spec: PrefixSpec,
        shape: PrefixShape,
        num_virtual_tokens: usize,
        init: &PromptInit,
        device: &Device,
        rng: &mut StdRng,
    ) -> Result<Self> {
        let v = num_virtual_tokens;
        if v == 0 {
            bail!("num_virtual_tokens must be at least 1");
        }
        let width = shape.width();
        let rows_in = match spec {
            PrefixSpec::PrefixTuning { projection: Some(_) } => shape.kv_dim(),
            _ => width,
        };
        let start = match init {
            PromptInit::RandomNormal => values(normal(rng, v * rows_in), (v, rows_in), device)?,
            PromptInit::Random => values(uniform(rng, v * rows_in, -0.5, 0.5), (v, rows_in), device)?,
            PromptInit::Zero => {
                if matches!(spec, PrefixSpec::PrefixTuning { projection: Some(_) }) {
                    // PEFT zeroes only the projection's last layer; the embedding is N(0, 1).
                    values(normal(rng, v * rows_in), (v, rows_in), device)?
                } else {
                    Tensor::zeros((v, rows_in), DType::F32, device)?
                }
            }
            PromptInit::FromTensor(t) => {
                if rows_in != width {
                    bail!("a prefix with a projection cannot start from given keys and values (PEFT cannot either); use init `random-normal` or `zero`");
                }
                if t.dims() != [v, width] {
                    bail!(
                        "the key/value prefix to start from (an adapter's, option `init_from` \
                         (--init-from)) has shape {:?}, expected [{v}, {width}] \
                         (num_virtual_tokens × layers·2·kv_dim of this model){}",
                        t.dims(),
                        if t.dims().get(1) != Some(&width) {
                            ": its width is another model's; start from an adapter of this model"
                        } else {
                            ""
                        }
                    );
                }
                t.to_dtype(DType::F32)?.to_device(device)?
            }
            PromptInit::Text(_) => bail!(
                "a key/value prefix starts from a text as the keys and values of the text's prefill \
                 through the model: run the prefill and give them as `FromTensor`"
            ),
            PromptInit::Vocab | PromptInit::Labels(_) => bail!(
                "initialisation `{}` does not apply to a key/value prefix: use `random-normal` (PEFT's default), `random`, `zero`, `text` (the keys and values of a prefill of `init_text`) or `from`",
                if matches!(init, PromptInit::Vocab) { "vocab" } else { "labels" }
            ),
        };
        let transform = match spec {
            PrefixSpec::PrefixTuning {
                projection: Some(hidden),
            } => {
                if hidden == 0 {
                    bail!("the prefix projection's hidden size must be at least 1");
                }
                let first = Linear::new(shape.kv_dim(), hidden, DType::F32, device, rng)?;
                let last = Linear::new(hidden, width, DType::F32, device, rng)?;
                if matches!(init, PromptInit::Zero) {
                    last.weight.set(&last.weight.as_tensor().zeros_like()?)?;
                    last.bias.set(&last.bias.as_tensor().zeros_like()?)?;
                }
                Some((first, last))
            }
            _ => None,
        };
        let (embedding, frozen) = match spec {
            PrefixSpec::Cartridge { num_frozen_tokens: f } => {
                if f >= v {
                    bail!(
                        "num_frozen_tokens ({f}) must be below num_virtual_tokens ({v}): otherwise nothing is trained"
                    );
                }
                let frozen = (f > 0).then(|| start.narrow(0, 0, f)?.contiguous()).transpose()?;
                (Var::from_tensor(&start.narrow(0, f, v - f)?.contiguous()?)?, frozen)
            }
            PrefixSpec::PrefixTuning { .. } => (Var::from_tensor(&start.contiguous()?)?, None),
        };
        Ok(Self {
            spec,
            shape,
            num_virtual_tokens: v,
            embedding,
            transform,
            frozen,
            zero_init: matches!(init, PromptInit::Zero),
        })
    }

    /// The method and its options.
    pub fn spec(&self) -> PrefixSpec {
        self.spec
    }

    /// The geometry.
    pub fn shape(&self) -> PrefixShape {
        self.shape
    }

    /// Virtual tokens `V`.
    pub fn num_virtual_tokens(&self) -> usize {
        self.num_virtual_tokens
    }

    /// Whether PEFT's zero init was used.
    pub fn zero_init(&self) -> bool {
        self.zero_init
    }

    /// The device of the parameters.
    pub fn device(&self) -> Device {
        self.embedding.device().clone()
    }

    /// The flat prefix `[V, layers·2·kv_dim]` as a differentiable graph over
    /// [`KvPrefix::vars`] (what PEFT saves as `prompt_embeddings`).
    pub fn forward(&self) -> Result<Tensor> {
        let e = self.embedding.as_tensor();
        Ok(match (&self.transform, &self.frozen) {
            (Some((first, last)), _) => last.forward(&first.forward(e)?.tanh()?)?,
            (None, Some(frozen)) => Tensor::cat(&[frozen, e], 0)?,
            (None, None) => e.clone(),
        })
    }

    /// The trainable parameters with PEFT's names (a Cartridge's frozen tokens are not among
    /// them).
    pub fn vars(&self) -> Vec<(String, Var)> {
        let name = match self.spec {
            PrefixSpec::Cartridge { .. } => CARTRIDGE_TRAINABLE,
            PrefixSpec::PrefixTuning { .. } => PREFIX_EMBEDDING,
        };
        let mut out = vec![(name.to_string(), self.embedding.clone())];
        if let Some((first, last)) = &self.transform {
            first.push_vars(&format!("{PREFIX_TRANSFORM}.0"), &mut out);
            last.push_vars(&format!("{PREFIX_TRANSFORM}.2"), &mut out);
        }
        out
    }

    /// Copies of every parameter (the trainable ones, then a Cartridge's frozen tokens).
    pub fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out: Vec<(String, Tensor)> = self
            .vars()
            .into_iter()
            .map(|(n, v)| Ok((n, v.as_detached_tensor().copy()?)))
            .collect::<Result<_>>()?;
        if let Some(f) = &self.frozen {
            out.push((CARTRIDGE_FROZEN.to_string(), f.copy()?));
        }
        Ok(out)
    }

    /// Total number of trainable scalars.
    pub fn num_parameters(&self) -> usize {
        self.vars().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Restores every parameter from `tensors` (names as [`KvPrefix::tensors`]; other entries
    /// are ignored). The [`Var`]s keep their identity. Nothing changes on an error.
    pub fn set_from(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let get = |name: &str, dims: &[usize]| -> Result<Tensor> {
            let t = tensors
                .get(name)
                .with_context(|| format!("tensor `{name}` is missing (needed to restore the prefix)"))?;
            if t.dims() != dims {
                bail!("tensor `{name}` has shape {:?}, expected {dims:?}", t.dims());
            }
            Ok(t.to_dtype(DType::F32)?.to_device(self.embedding.device())?)
        };
        let vars = self.vars();
        let values = vars.iter().map(|(n, v)| get(n, v.dims())).collect::<Result<Vec<_>>>()?;
        let frozen = match &self.frozen {
            Some(f) => Some(get(CARTRIDGE_FROZEN, f.dims())?),
            None => None,
        };
        for ((_, var), t) in vars.iter().zip(values) {
            var.set(&t)?;
        }
        if frozen.is_some() {
            self.frozen = frozen;
        }
        Ok(())
    }
}

fn values(v: Vec<f64>, shape: (usize, usize), device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(v, shape, device)?.to_dtype(DType::F32)?)
}

/// PEFT's flat prefix `[V, layers·2·kv_dim]` as a one-row cache: per layer `(k, v)` each
/// `[1, kv_heads, V, head_dim]`, the mask ones `[1, V]` (f32).
pub fn flat_to_cache(flat: &Tensor, shape: PrefixShape) -> Result<KvCache> {
    let (v, width) = flat.dims2()?;
    if width != shape.width() {
        bail!(
            "a prefix of width {width} does not fit {} layers × 2 × {} key/value heads × {}",
            shape.layers,
            shape.kv_heads,
            shape.head_dim
        );
    }
    // [V, L·2, Hkv, hd] → [L·2, Hkv, V, hd]
    let kv = flat
        .reshape((v, shape.layers * 2, shape.kv_heads, shape.head_dim))?
        .permute((1, 2, 0, 3))?
        .contiguous()?;
    let layers = (0..shape.layers)
        .map(|l| -> Result<_> { Ok((kv.get(2 * l)?.unsqueeze(0)?, kv.get(2 * l + 1)?.unsqueeze(0)?)) })
        .collect::<Result<_>>()?;
    let mask = Tensor::ones((1, v), DType::F32, flat.device())?;
    Ok(KvCache {
        layers,
        mask: Some(mask),
        next_pos: None,
    })
}

/// The inverse of [`flat_to_cache`] for the first `v` positions of a one-row cache (or of
/// per-layer gradients shaped like one): `[v, layers·2·kv_dim]`.
pub fn layers_to_flat(layers: &[(Tensor, Tensor)], v: usize) -> Result<Tensor> {
    if layers.is_empty() {
        bail!("no layers");
    }
    let mut parts = Vec::with_capacity(2 * layers.len());
    for (k, val) in layers {
        for t in [k, val] {
            let (b, _, s, _) = t.dims4()?;
            if b != 1 || s < v {
                bail!("expected one row of at least {v} positions, got shape {:?}", t.dims());
            }
            parts.push(t.squeeze(0)?.narrow(1, 0, v)?);
        }
    }
    // [L·2, Hkv, v, hd] → [v, L·2, Hkv, hd] → [v, width]
    let all = Tensor::stack(&parts, 0)?.permute((2, 0, 1, 3))?.contiguous()?;
    Ok(all.flatten_from(1)?)
}

/// The flat prefix's gradient `[V, layers·2·kv_dim]` from the backbone's per-layer `(dK, dV)`.
pub fn flat_gradient(d_layers: &[(Tensor, Tensor)], v: usize) -> Result<Tensor> {
    layers_to_flat(d_layers, v)
}
