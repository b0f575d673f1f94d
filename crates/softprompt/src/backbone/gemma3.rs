//! Gemma 3 text decoder (`model_type` `gemma3_text`, GGUF `gemma3`): Gemma's scaled embeddings
//! and `(1 + w)` RMSNorms, a norm before and after both attention and MLP, per-head q/k RMSNorm,
//! a GELU-tanh gated MLP, and attention layers of two kinds: sliding-window layers (keys within
//! `sliding_window` positions, rotary base `rope_local_base_freq`) and global layers (every
//! earlier key, rotary base `rope_theta`, scaled as `rope_scaling` says), in the order
//! `layer_types` gives. The head is tied to the embedding table unless the file says otherwise.
//!
//! Per layer, with `x` the residual stream (`[N, D]`), `H` query heads and `Hkv` key/value heads
//! of width `d` (queries `H·d` wide, keys and values `Hkv·d`), every norm
//! `rms(x)·g = x / sqrt(mean(x²) + eps) · g` with the gain `g = 1 + w` of the file's weight `w`
//! (computed in f32; a GGUF stores `1 + w` already):
//! ```text
//! n1 = rms(x)·g_in;               q, k, v = n1·Wq,k,vᵀ
//! q_h = rms(q_h)·g_q,  k_h = rms(k_h)·g_k        for every head h
//! q, k = rope_kind(q, k)                          kind: sliding (local base) or global
//! a = softmax(q·kᵀ / sqrt(query_pre_attn_scalar) + mask_kind)·v
//!     mask_kind: causal; on sliding layers also key position > query position − window
//! x2 = x + rms(a·Woᵀ)·g_post_attn
//! n2 = rms(x2)·g_pre_ffn;         y = (gelu_tanh(n2·Wgᵀ) ⊙ n2·Wuᵀ)·Wdᵀ
//! out = x2 + rms(y)·g_post_ffn
//! ```
//! and around the stack: `h0 = E[ids]·sqrt(D)` (the scale rounded to the table's dtype, as
//! transformers' `Gemma3TextScaledWordEmbedding` does), `hidden = rms(x_L)·g_final`,
//! `logits = hidden·Eᵀ`. [`Backbone::embed`] and [`Backbone::embedding_table`] give the scaled
//! rows (what PEFT's prompt initialisations read through the model's embedding module); the head
//! ([`CausalLm::lm_head`]) is the file's table.
//!
//! **Key/value prefixes on sliding layers** (prefix tuning, p-tuning v2, Cartridges; a
//! generation cache): the prefix's `V` entries are positions `0..V` and the input starts at
//! position `V`, as in transformers with `past_key_values`; a sliding layer's query at position
//! `p` sees the keys at positions `> p − window`, prefix entries included, so a prefix drops out
//! of the sliding layers' view once the input is longer than `window − V`; the global layers
//! always see it.
//!
//! Not implemented, so refused by name at load: attention or final logit soft-capping, q/k/v/o
//! biases, bidirectional attention, another activation, rotary types other than default and
//! linear.
//!
//! A file loads into one [`Gemma3Weights`] (`gemma3/load.rs`, its configuration read in
//! `gemma3/config.rs`); [`build`] turns it into a
//! [`Gemma3`] on the [`Gemma3Stack`] the load chose: [`ComposedStack`] (candle ops,
//! `gemma3/composed.rs`) or [`FusedStack`] (fused f32 CPU kernels, `gemma3/fused.rs`, its
//! sliding-window attention in `gemma3/fused/window.rs`).

mod composed;
mod config;
mod fused;
mod load;

pub use composed::ComposedStack;
pub use fused::FusedStack;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

use super::frozen_weight::Linear;
use super::llama::RopeScaling;
use super::weights::WeightSource;
use super::{pick_positions, Arch, Backbone, BackboneInput, CausalLm, KernelPath, KvCache, ModelInfo, Shape, Tape};

/// What an attention layer attends to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKind {
    /// Every earlier key (`full_attention`), rotary base `rope_theta`.
    Global,
    /// The keys within `sliding_window` positions (`sliding_attention`), rotary base
    /// `rope_local_base_freq`.
    Sliding,
}

/// One kind of layer's rotary encoding: its base and scaling.
#[derive(Debug, Clone, PartialEq)]
pub struct Rotary {
    /// Base frequency θ.
    pub theta: f64,
    /// How the frequencies are scaled.
    pub scaling: RopeScaling,
}

/// Hyper-parameters of a Gemma 3 model: the one place its shape is held ([`ModelInfo`] is
/// derived from it at load).
#[derive(Debug, Clone)]
pub struct Gemma3Config {
    /// The sizes (read through `Deref`: `cfg.hidden`).
    pub shape: Shape,
    /// RMSNorm epsilon.
    pub eps: f64,
    /// Attention scores are divided by `sqrt(query_pre_attn_scalar)`.
    pub query_pre_attn_scalar: f64,
    /// Key positions a sliding layer's query sees: its own and the `sliding_window − 1` before.
    pub sliding_window: usize,
    /// Each layer's kind, in order.
    pub layer_kinds: Vec<AttentionKind>,
    /// The global layers' rotary encoding.
    pub global_rope: Rotary,
    /// The sliding layers' rotary encoding.
    pub local_rope: Rotary,
}

impl std::ops::Deref for Gemma3Config {
    type Target = Shape;
    fn deref(&self) -> &Shape {
        &self.shape
    }
}

impl Gemma3Config {
    /// Refuses inconsistent sizes (`source` names the file).
    fn validate(&self, source: &Path) -> Result<()> {
        let shown = source.display();
        if self.heads == 0
            || self.kv_heads == 0
            || !self.heads.is_multiple_of(self.kv_heads)
            || self.head_dim == 0
            || !self.head_dim.is_multiple_of(2)
        {
            bail!(
                "{shown}: inconsistent attention shape (hidden {}, heads {}, kv heads {}, head_dim {}: \
                 kv heads must divide heads, head_dim must be even and positive)",
                self.hidden,
                self.heads,
                self.kv_heads,
                self.head_dim
            );
        }
        if self.layer_kinds.len() != self.layers {
            bail!(
                "{shown}: `layer_types` names {} layers, the model has {}",
                self.layer_kinds.len(),
                self.layers
            );
        }
        if self.sliding_window == 0 && self.layer_kinds.contains(&AttentionKind::Sliding) {
            bail!("{shown}: `sliding_window` is 0 but some layers are sliding-window layers");
        }
        if !(self.query_pre_attn_scalar.is_finite() && self.query_pre_attn_scalar > 0.0) {
            bail!(
                "{shown}: `query_pre_attn_scalar` is {}; it must be positive",
                self.query_pre_attn_scalar
            );
        }
        Ok(())
    }

    /// The factor the input embeddings are multiplied by: `sqrt(hidden)`.
    pub fn embed_scale(&self) -> f64 {
        (self.hidden as f64).sqrt()
    }

    /// The factor the rotated queries are multiplied by so that the attention's
    /// `1 / sqrt(head_dim)` becomes `1 / sqrt(query_pre_attn_scalar)`; `None` when they are equal.
    pub fn query_scale(&self) -> Option<f64> {
        let c = (self.head_dim as f64 / self.query_pre_attn_scalar).sqrt();
        (c != 1.0).then_some(c)
    }

    /// The rotary encoding of layers of `kind`.
    pub fn rotary(&self, kind: AttentionKind) -> &Rotary {
        match kind {
            AttentionKind::Global => &self.global_rope,
            AttentionKind::Sliding => &self.local_rope,
        }
    }

    /// The window of layers of `kind` (`None`: global).
    pub fn window(&self, kind: AttentionKind) -> Option<usize> {
        (kind == AttentionKind::Sliding).then_some(self.sliding_window)
    }
}

/// One decoder layer's frozen weights. `W` holds a linear weight (as loaded: [`Linear`]; the
/// composed stack: a `Tensor`; the fused stack: a [`super::frozen_weight::FrozenWeight`]), `V` a
/// gain vector (a `Tensor`, or f32 rows for the fused kernels). Every gain is the effective one,
/// `1 + w`.
pub struct Gemma3Layer<W = Linear, V = Tensor> {
    /// Global or sliding-window attention.
    pub kind: AttentionKind,
    /// `input_layernorm` gain `[D]`.
    pub attn_norm: V,
    /// q, k and v projections stacked: `[q_dim + 2·kv_dim, D]`.
    pub w_qkv: W,
    /// Per-head RMSNorm gain of the queries `[head_dim]`.
    pub q_norm: V,
    /// Per-head RMSNorm gain of the keys `[head_dim]`.
    pub k_norm: V,
    /// Output projection `[D, q_dim]`.
    pub wo: W,
    /// `post_attention_layernorm` gain `[D]` (on the attention's output, before the residual).
    pub post_attn_norm: V,
    /// `pre_feedforward_layernorm` gain `[D]`.
    pub pre_ffn_norm: V,
    /// Gate and up projections stacked: `[2·I, D]`.
    pub w_gate_up: W,
    /// Down projection `[D, I]`.
    pub w_down: W,
    /// `post_feedforward_layernorm` gain `[D]` (on the MLP's output, before the residual).
    pub post_ffn_norm: V,
}

impl<W, V> Gemma3Layer<W, V> {
    /// The same layer with every linear weight converted by `w` and every gain by `v`.
    pub fn convert<W2, V2>(
        self,
        mut w: impl FnMut(W) -> Result<W2>,
        mut v: impl FnMut(V) -> Result<V2>,
    ) -> Result<Gemma3Layer<W2, V2>> {
        Ok(Gemma3Layer {
            kind: self.kind,
            attn_norm: v(self.attn_norm)?,
            w_qkv: w(self.w_qkv)?,
            q_norm: v(self.q_norm)?,
            k_norm: v(self.k_norm)?,
            wo: w(self.wo)?,
            post_attn_norm: v(self.post_attn_norm)?,
            pre_ffn_norm: v(self.pre_ffn_norm)?,
            w_gate_up: w(self.w_gate_up)?,
            w_down: w(self.w_down)?,
            post_ffn_norm: v(self.post_ffn_norm)?,
        })
    }
}

/// A Gemma 3 model's weights as loaded, before either implementation takes them.
pub struct Gemma3Weights {
    /// The shape and constants.
    pub cfg: Gemma3Config,
    /// Shape (from `cfg`) and provenance.
    pub info: ModelInfo,
    /// Word embeddings `[vocab, D]` as the file stores them (not scaled).
    pub embed: Tensor,
    /// Decoder layers.
    pub layers: Vec<Gemma3Layer>,
    /// Final norm gain `[D]` (`1 + w`).
    pub norm: Tensor,
    /// Vocabulary head `[vocab, D]` (the embedding table when tied).
    pub lm_head: Tensor,
}

/// A Gemma 3's layers and final norm on one implementation.
pub trait Gemma3Stack: Sized + Send + Sync + 'static {
    /// Which implementation this is.
    const PATH: KernelPath;
    /// Takes the loaded layers and final norm (an error where this implementation cannot run
    /// them).
    fn new(cfg: Gemma3Config, layers: Vec<Gemma3Layer>, norm: Tensor) -> Result<Self>;
    /// Final-normed hidden states `[B, T, D]` of `input` (its embeddings, already scaled, and
    /// mask) after the positions in `cache`, whose keys and values are then replaced by the
    /// extended ones; with `keep`, the tape for [`Gemma3Stack::backward`].
    fn forward(&self, input: &BackboneInput, cache: Option<&mut KvCache>, keep: bool)
        -> Result<(Tensor, Option<Tape>)>;
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

/// A frozen Gemma 3 run by the stack `S`.
pub struct Gemma3<S> {
    info: ModelInfo,
    /// The embedding table times `sqrt(D)` (in its own dtype): what [`Backbone::embed`] gives.
    scaled_embed: Tensor,
    lm_head: Tensor,
    stack: S,
}

/// A Gemma 3 on the composed candle ops.
pub type ComposedGemma3 = Gemma3<ComposedStack>;
/// A Gemma 3 on the fused f32 CPU kernels.
pub type FusedGemma3 = Gemma3<FusedStack>;

impl<S: Gemma3Stack> Gemma3<S> {
    /// The model on stack `S`, built from (and consuming) the loaded weights.
    pub fn new(w: Gemma3Weights) -> Result<Self> {
        // transformers: `embed(ids) * embed_scale.to(weight.dtype)`: the scale rounded to the
        // table's dtype, then the product in it.
        let scale = Tensor::new(w.cfg.embed_scale() as f32, w.embed.device())?.to_dtype(w.embed.dtype())?;
        let scaled_embed = w.embed.broadcast_mul(&scale)?;
        Ok(Self {
            stack: S::new(w.cfg, w.layers, w.norm)?,
            info: w.info,
            scaled_embed,
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

    fn run(&self, input: &BackboneInput, cache: Option<&mut KvCache>, keep: bool) -> Result<(Tensor, Option<Tape>)> {
        self.check_width(input)?;
        self.stack.forward(input, cache, keep)
    }

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
pub fn build(weights: Gemma3Weights, path: KernelPath) -> Result<Box<dyn CausalLm>> {
    Ok(match path {
        KernelPath::Fused => Box::new(FusedGemma3::new(weights)?),
        KernelPath::Composed => Box::new(ComposedGemma3::new(weights)?),
    })
}

impl<S: Gemma3Stack> Backbone for Gemma3<S> {
    fn info(&self) -> &ModelInfo {
        &self.info
    }
    /// The scaled table: row `i` is what [`Backbone::embed`] gives for token `i`.
    fn embedding_table(&self) -> &Tensor {
        &self.scaled_embed
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
    fn kernel_path(&self) -> KernelPath {
        S::PATH
    }
}

impl<S: Gemma3Stack> CausalLm for Gemma3<S> {
    fn forward_cached(&self, input: &BackboneInput, cache: &mut KvCache) -> Result<Tensor> {
        Ok(self.run(input, Some(cache), false)?.0)
    }
    fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }
    fn hidden_at(&self, input: &BackboneInput, prefix: Option<&KvCache>, at: &[(usize, usize)]) -> Result<Tensor> {
        self.check_width(input)?;
        self.stack.hidden_at(input, prefix, at)
    }
    fn inference_logits(&self, rows: &Tensor) -> Result<Tensor> {
        self.stack.head_logits(&self.lm_head, rows)
    }
}

/// RoPE tables `cos`, `sin` of shape `[max_positions, head_dim/2]` for layers with the rotary
/// encoding `rope`.
fn rope_tables(cfg: &Gemma3Config, rope: &Rotary, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
    let hd = cfg.head_dim;
    let inv = rope.scaling.frequencies(rope.theta, hd)?;
    let n = cfg.max_positions;
    let mut angles = Vec::with_capacity(n * hd / 2);
    for p in 0..n {
        angles.extend(inv.iter().map(|f| p as f32 * f));
    }
    let a = Tensor::from_vec(angles, (n, hd / 2), device)?.to_dtype(dtype)?;
    Ok((a.cos()?, a.sin()?))
}

/// The [`ModelInfo`] of a model of this shape.
fn model_info(
    cfg: &Gemma3Config,
    model_type: String,
    tied: bool,
    params: usize,
    weights: &dyn WeightSource,
) -> ModelInfo {
    let sliding = cfg
        .layer_kinds
        .iter()
        .filter(|k| matches!(k, AttentionKind::Sliding))
        .count();
    let mut features = vec![
        format!(
            "sliding window {} on {sliding} of {} layers (rotary base {}), global layers rotary base {}",
            cfg.sliding_window,
            cfg.layer_kinds.len(),
            cfg.local_rope.theta,
            cfg.global_rope.theta
        ),
        format!(
            "head_dim {} (queries {} wide, hidden {})",
            cfg.head_dim,
            cfg.q_dim(),
            cfg.hidden
        ),
        "embeddings scaled by √hidden".into(),
        "(1 + w) RMSNorms before and after attention and MLP; per-head RMSNorm on queries and keys".into(),
        "GELU-tanh gated MLP".into(),
        format!(
            "attention scale query_pre_attn_scalar^-1/2 = {:.4}",
            cfg.query_pre_attn_scalar.powf(-0.5)
        ),
    ];
    features.extend(
        cfg.global_rope
            .scaling
            .describe()
            .map(|d| format!("global layers: {d}")),
    );
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
        arch: Arch::Gemma3,
        model_type,
        source: weights.location().to_path_buf(),
        shape: cfg.shape,
        qk_norm: true,
        params,
        dtypes_on_disk: weights.dtype_counts(),
    }
}
