//! Llama-family decoder (Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2, Qwen3): RMSNorm, rotary
//! position encoding (`rope_theta`, scaled as `rope_scaling` says: `rope.rs`), grouped-query
//! attention with optional q/k/v bias (Qwen2) and optional per-head q/k RMSNorm (Qwen3), SwiGLU
//! MLP, tied or untied vocabulary head.
//!
//! Per layer, with `x` the residual stream (`[N, D]`), `H` query heads and `Hkv` key/value heads
//! of width `d` = [`Shape::head_dim`] (`D / H` unless the model sets it: Qwen3's 128 with
//! `D / H` = 64, 80 or 160), so that q is `H·d` wide and k, v are `Hkv·d`:
//! ```text
//! n1 = rms(x)·g1;  q,k,v = n1·Wq,k,vᵀ (+b)
//! q_h = rms(q_h)·gq,  k_h = rms(k_h)·gk   for every head h (Qwen3 only: q_norm, k_norm [d])
//! q,k = rope(q,k);  a = softmax(q·kᵀ/√d + mask)·v
//! x2 = x + a·Woᵀ (Wo: [D, H·d]);  n2 = rms(x2)·g2;  y = (silu(n2·Wgᵀ) ⊙ n2·Wuᵀ)·Wdᵀ;  out = x2 + y
//! ```
//! Qwen3 is this family with two options, not a file of its own: an explicit head width and the
//! per-head q/k norms (present in a layer or not: [`LlamaLayer::q_norm`]).
//!
//! A file loads into one [`LlamaWeights`] (`llama/load.rs`); [`build`] turns it into a
//! [`Llama`] on the [`Stack`] the load chose: [`ComposedStack`] (candle ops written out layer
//! by layer, `llama/composed.rs`) or [`FusedStack`] (fused f32 CPU kernels, `llama/fused.rs`).
//! The embedding table, the head and the [`Backbone`] plumbing are the same for both.

mod composed;
mod fused;
mod load;
mod rope;

pub use composed::ComposedStack;
pub use fused::FusedStack;
pub use rope::RopeScaling;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use std::ops::Range;
use std::path::Path;

use super::frozen_weight::{forward_on_pool, rounding, FrozenWeight, Linear, Rounding, QUANT_ROWS};
use super::weights::WeightSource;
use super::{pick_positions, Arch, Backbone, BackboneInput, CausalLm, KernelPath, KvCache, ModelInfo, Shape, Tape};

/// Hyper-parameters of a Llama-family model: the one place its shape is held ([`ModelInfo`] is
/// derived from it at load).
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    /// The sizes (read through `Deref`: `cfg.hidden`).
    pub shape: Shape,
    /// RMSNorm epsilon.
    pub eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// How the rotary frequencies are scaled (Llama 3's `llama3`, `linear`, a GGUF's
    /// `rope_freqs`).
    pub rope_scaling: RopeScaling,
}

impl std::ops::Deref for LlamaConfig {
    type Target = Shape;
    fn deref(&self) -> &Shape {
        &self.shape
    }
}

impl LlamaConfig {
    fn validate(&self, source: &Path) -> Result<()> {
        if self.heads == 0
            || self.kv_heads == 0
            || !self.heads.is_multiple_of(self.kv_heads)
            || self.head_dim == 0
            || !self.head_dim.is_multiple_of(2)
        {
            bail!(
                "{}: inconsistent attention shape (hidden {}, heads {}, kv heads {}, head_dim {}: \
                 kv heads must divide heads, head_dim must be even and positive)",
                source.display(),
                self.hidden,
                self.heads,
                self.kv_heads,
                self.head_dim
            );
        }
        Ok(())
    }

    /// The [`ModelInfo`] of a model of this shape.
    /// The [`ModelInfo`] of a model of this configuration; `qk_norm`, `tied` (head = embedding
    /// table) and `biases` (q/k/v) as its weights have them.
    fn model_info(
        &self,
        model_type: String,
        layout: (bool, bool, bool),
        params: usize,
        weights: &dyn WeightSource,
    ) -> ModelInfo {
        let (qk_norm, tied, biases) = layout;
        let mut features = vec![format!("rotary base {}", self.rope_theta)];
        features.extend(self.rope_scaling.describe());
        if self.head_dim != self.hidden / self.heads.max(1) {
            features.push(format!(
                "head_dim {} (queries {} wide, hidden {})",
                self.head_dim,
                self.q_dim(),
                self.hidden
            ));
        }
        if self.kv_heads < self.heads {
            features.push(format!(
                "grouped-query attention ({} query heads per key/value head)",
                self.heads / self.kv_heads.max(1)
            ));
        }
        if qk_norm {
            features.push("per-head RMSNorm on queries and keys".into());
        }
        if biases {
            features.push("q/k/v biases".into());
        }
        features.push(
            if tied {
                "tied head (the embedding table)"
            } else {
                "untied head"
            }
            .into(),
        );
        ModelInfo {
            features,
            arch: Arch::Llama,
            model_type,
            source: weights.location().to_path_buf(),
            shape: self.shape,
            qk_norm,
            params,
            dtypes_on_disk: weights.dtype_counts(),
        }
    }
}

/// One decoder layer's frozen weights. `W` holds a linear weight (as loaded: [`Linear`]; the
/// composed stack: a `Tensor`; the fused stack: a [`super::frozen_weight::FrozenWeight`]), `V` a
/// gain or bias vector (a `Tensor`, or f32 rows for the fused kernels).
pub struct LlamaLayer<W = Linear, V = Tensor> {
    /// Attention RMSNorm gain `[D]`.
    pub attn_norm: V,
    /// q, k and v projections stacked: `[q_dim + 2·kv_dim, D]` (one product for all three;
    /// `q_dim = heads·head_dim`, `kv_dim = kv_heads·head_dim`).
    pub w_qkv: W,
    /// Their biases (Qwen2), stacked likewise.
    pub b_qkv: Option<V>,
    /// Per-head RMSNorm gain of the queries `[head_dim]`, applied to every head before the
    /// rotation (Qwen3's `q_norm`); `None` for the other models.
    pub q_norm: Option<V>,
    /// Per-head RMSNorm gain of the keys `[head_dim]` (Qwen3's `k_norm`); present exactly when
    /// [`LlamaLayer::q_norm`] is.
    pub k_norm: Option<V>,
    /// Output projection `[D, q_dim]`.
    pub wo: W,
    /// MLP RMSNorm gain `[D]`.
    pub ffn_norm: V,
    /// Gate and up projections stacked: `[2·I, D]`.
    pub w_gate_up: W,
    /// Down projection `[D, I]`.
    pub w_down: W,
}

impl<W, V> LlamaLayer<W, V> {
    /// The same layer with every linear weight converted by `w` and every vector by `v`.
    pub fn convert<W2, V2>(
        self,
        mut w: impl FnMut(W) -> Result<W2>,
        mut v: impl FnMut(V) -> Result<V2>,
    ) -> Result<LlamaLayer<W2, V2>> {
        Ok(LlamaLayer {
            attn_norm: v(self.attn_norm)?,
            w_qkv: w(self.w_qkv)?,
            b_qkv: self.b_qkv.map(&mut v).transpose()?,
            q_norm: self.q_norm.map(&mut v).transpose()?,
            k_norm: self.k_norm.map(&mut v).transpose()?,
            wo: w(self.wo)?,
            ffn_norm: v(self.ffn_norm)?,
            w_gate_up: w(self.w_gate_up)?,
            w_down: w(self.w_down)?,
        })
    }
}

/// A Llama-family model's weights as loaded, before either implementation takes them.
pub struct LlamaWeights {
    /// The shape.
    pub cfg: LlamaConfig,
    /// Shape (from `cfg`) and provenance.
    pub info: ModelInfo,
    /// Word embeddings `[vocab, D]`.
    pub embed: Tensor,
    /// Decoder layers.
    pub layers: Vec<LlamaLayer>,
    /// Final RMSNorm gain `[D]`.
    pub norm: Tensor,
    /// Vocabulary head `[vocab, D]` (the embedding table when tied).
    pub lm_head: Tensor,
}

impl LlamaWeights {
    /// The type the tensors were loaded in (f32 from model files).
    pub fn dtype(&self) -> DType {
        self.embed.dtype()
    }
}

/// A Llama's layers and final norm on one implementation.
pub trait Stack: Sized + Send + Sync + 'static {
    /// Which implementation this is.
    const PATH: KernelPath;
    /// Takes the loaded layers and final norm (an error where this implementation cannot run
    /// them).
    fn new(cfg: LlamaConfig, layers: Vec<LlamaLayer>, norm: Tensor) -> Result<Self>;
    /// Number of decoder layers.
    fn layer_count(&self) -> usize;
    /// The decoder layers `layers` (a range of `0..layer_count()`) run on `input`, whose
    /// "embeddings" are the residual stream entering layer `layers.start`, after the positions
    /// in `cache` (one entry per layer of the range), whose keys and values are then replaced by
    /// the extended ones. Returns the residual stream leaving the range `[B, T, D]`, final-normed
    /// when the range ends at the last layer; with `keep` (only for such a range), the tape for
    /// [`Stack::backward`], which then stops at layer `layers.start`.
    fn forward_layers(
        &self,
        input: &BackboneInput,
        cache: Option<&mut KvCache>,
        keep: bool,
        layers: Range<usize>,
    ) -> Result<(Tensor, Option<Tape>)>;
    /// Final-normed hidden states `[B, T, D]` of `input` (its embeddings and mask) after the
    /// positions in `cache`, whose keys and values are then replaced by the extended ones; with
    /// `keep`, the tape for [`Stack::backward`]: every layer ([`Stack::forward_layers`]).
    fn forward(
        &self,
        input: &BackboneInput,
        cache: Option<&mut KvCache>,
        keep: bool,
    ) -> Result<(Tensor, Option<Tape>)> {
        self.forward_layers(input, cache, keep, 0..self.layer_count())
    }
    /// d(loss)/d(input embeddings) and, after cached positions (a key/value prefix), their
    /// gradient per layer `(dK, dV)`, each `[1, Hkv, past, hd]`, summed over the rows.
    fn backward(&self, tape: &Tape, d_hidden: &Tensor) -> Result<(Tensor, Vec<(Tensor, Tensor)>)>;
    /// [`CausalLm::hidden_at`]: by default a full forward, then the positions picked out.
    fn hidden_at(&self, input: &BackboneInput, prefix: Option<&KvCache>, at: &[(usize, usize)]) -> Result<Tensor> {
        let mut cache = match prefix {
            Some(p) => Some(p.repeat(input.embeds.dim(0)?)?),
            None => None,
        };
        let hidden = self.forward(input, cache.as_mut(), false)?.0;
        pick_positions(&hidden, at)
    }
    /// [`CausalLm::inference_logits`] with the vocabulary head `head` `[vocab, D]`.
    fn head_logits(&self, head: &Tensor, rows: &Tensor) -> Result<Tensor> {
        Ok(rows.matmul(&head.t()?)?)
    }
}

/// A frozen Llama-family model run by the stack `S`.
pub struct Llama<S> {
    info: ModelInfo,
    embed: Tensor,
    lm_head: Tensor,
    /// The head as Q8_0 for generation's logits, when the fused layers are held in quantized
    /// blocks.
    quant_head: Option<FrozenWeight>,
    stack: S,
}

/// A Llama on the composed candle ops.
pub type ComposedLlama = Llama<ComposedStack>;
/// A Llama on the fused f32 CPU kernels.
pub type FusedLlama = Llama<FusedStack>;

impl<S: Stack> Llama<S> {
    /// The model on stack `S`, built from (and consuming) the loaded weights.
    pub fn new(w: LlamaWeights) -> Result<Self> {
        let quantized = S::PATH == KernelPath::Fused && w.layers.iter().all(|l| l.w_qkv.quantized());
        Ok(Self {
            quant_head: quantized
                .then(|| FrozenWeight::quantized_head(&w.lm_head))
                .transpose()?,
            stack: S::new(w.cfg, w.layers, w.norm)?,
            info: w.info,
            embed: w.embed,
            lm_head: w.lm_head,
        })
    }

    fn check_width(&self, input: &BackboneInput) -> Result<()> {
        let d = input.embeds.dim(2)?;
        if d != self.info.hidden {
            bail!(
                "input embeddings have width {d}, the model's hidden size is {}",
                self.info.hidden
            );
        }
        Ok(())
    }

    /// The forward pass after the positions in `cache` (extended in place), with the tape when
    /// `keep`, on rayon's pool ([`forward_on_pool`]: generation's rounding, exact with a tape).
    fn run(&self, input: &BackboneInput, cache: Option<&mut KvCache>, keep: bool) -> Result<(Tensor, Option<Tape>)> {
        self.check_width(input)?;
        forward_on_pool(keep, || self.stack.forward(input, cache, keep))
    }

    /// The training forward, after a key/value prefix (one row) when given.
    fn train(&self, input: &BackboneInput, prefix: Option<&KvCache>) -> Result<(Tensor, Tape)> {
        let mut cache = match prefix {
            Some(p) => Some(p.repeat(input.embeds.dim(0)?)?),
            None => None,
        };
        let (h, tape) = self.run(input, cache.as_mut(), true)?;
        Ok((h, tape.expect("keep=true yields a tape")))
    }
}

/// The model `weights` hold on the implementation `path`.
pub fn build(weights: LlamaWeights, path: KernelPath) -> Result<Box<dyn CausalLm>> {
    Ok(match path {
        KernelPath::Fused => Box::new(FusedLlama::new(weights)?),
        KernelPath::Composed => Box::new(ComposedLlama::new(weights)?),
    })
}

impl<S: Stack> Backbone for Llama<S> {
    fn info(&self) -> &ModelInfo {
        &self.info
    }
    fn embedding_table(&self) -> &Tensor {
        &self.embed
    }
    fn forward(&self, input: &BackboneInput) -> Result<Tensor> {
        Ok(self.run(input, None, false)?.0)
    }
    fn forward_train(&self, input: &BackboneInput) -> Result<(Tensor, Tape)> {
        self.train(input, None)
    }
    fn backward(&self, tape: &Tape, d_hidden: &Tensor) -> Result<Tensor> {
        Ok(self.stack.backward(tape, d_hidden)?.0)
    }
    fn forward_prefixed(&self, input: &BackboneInput, prefix: &KvCache) -> Result<Tensor> {
        let mut cache = prefix.repeat(input.embeds.dim(0)?)?;
        Ok(self.run(input, Some(&mut cache), false)?.0)
    }
    fn forward_train_prefixed(&self, input: &BackboneInput, prefix: &KvCache) -> Result<(Tensor, Tape)> {
        self.train(input, Some(prefix))
    }
    fn backward_prefixed(&self, tape: &Tape, d_hidden: &Tensor) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
        self.stack.backward(tape, d_hidden)
    }
    fn forward_layers(
        &self,
        input: &BackboneInput,
        layers: Range<usize>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        self.check_width(input)?;
        Ok(forward_on_pool(false, || self.stack.forward_layers(input, cache, false, layers))?.0)
    }
    fn forward_train_from(&self, input: &BackboneInput, first: usize) -> Result<(Tensor, Tape)> {
        self.check_width(input)?;
        let all = self.stack.layer_count();
        if first >= all {
            bail!("layer {first} is not a layer of this model (it has {all}: 0..{all})");
        }
        let (h, tape) = forward_on_pool(true, || self.stack.forward_layers(input, None, true, first..all))?;
        Ok((h, tape.expect("keep=true yields a tape")))
    }
    fn kernel_path(&self) -> KernelPath {
        S::PATH
    }
}

impl<S: Stack> CausalLm for Llama<S> {
    fn forward_cached(&self, input: &BackboneInput, cache: &mut KvCache) -> Result<Tensor> {
        Ok(self.run(input, Some(cache), false)?.0)
    }
    fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }
    fn hidden_at(&self, input: &BackboneInput, prefix: Option<&KvCache>, at: &[(usize, usize)]) -> Result<Tensor> {
        self.check_width(input)?;
        forward_on_pool(false, || self.stack.hidden_at(input, prefix, at))
    }
    fn inference_logits(&self, rows: &Tensor) -> Result<Tensor> {
        match &self.quant_head {
            Some(head) if rounding() == Rounding::Inference && rows.dim(0)? <= QUANT_ROWS => head.logits(rows),
            _ => self.stack.head_logits(&self.lm_head, rows),
        }
    }
}

/// RoPE tables `cos`, `sin` of shape `[max_positions, head_dim/2]`, the frequencies scaled as
/// the model asks ([`RopeScaling`]).
fn rope_tables(cfg: &LlamaConfig, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
    let hd = cfg.head_dim();
    let inv = cfg.rope_scaling.frequencies(cfg.rope_theta, hd)?;
    let n = cfg.max_positions;
    let mut angles = Vec::with_capacity(n * hd / 2);
    for p in 0..n {
        angles.extend(inv.iter().map(|f| p as f32 * f));
    }
    let a = Tensor::from_vec(angles, (n, hd / 2), device)?.to_dtype(dtype)?;
    Ok((a.cos()?, a.sin()?))
}
