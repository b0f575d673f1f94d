//! GPT-2 (`model_type` `gpt2`, GGUF `gpt2`): a causal decoder with learned absolute position
//! embeddings, pre-LayerNorm blocks, one fused q/k/v projection (`c_attn`), biases on every
//! projection, a GELU-tanh (`gelu_new`) MLP, a final LayerNorm and the head tied to the token
//! embeddings.
//!
//! With `x` the residual stream (`[N, D]`), `H` heads of width `d = D / H`, every LayerNorm
//! `LN(x) = (x − mean(x)) / sqrt(var(x) + eps) · g + b`:
//! ```text
//! h0 = E[ids] + P[pos]                 pos: the input's positions, after any cached ones
//! per layer:
//!   q, k, v = LN1(x)·Wqkvᵀ + bqkv      (Wqkv [3D, D]: `c_attn`, stored [D, 3D] and transposed once)
//!   a = softmax(q·kᵀ·s + causal)·v     s = 1/sqrt(d) (1 when `scale_attn_weights` is false)
//!   x2 = x + a·Woᵀ + bo
//!   out = x2 + gelu_tanh(LN2(x2)·Wfcᵀ + bfc)·Wprojᵀ + bproj
//! hidden = LNf(x_L);  logits = hidden·Eᵀ (or the file's own head)
//! ```
//! The position table has `n_positions` rows: a forward whose positions (the cached ones, a
//! key/value prefix's included, then the input's) would run past it is refused. A key/value
//! prefix of `V` entries puts the input at positions `V..` (transformers with
//! `past_key_values`, as PEFT's prefix tuning runs it); rows of a stacked cache each continue
//! from their own position ([`KvCache::positions`]).
//!
//! Refused by name at load because they change the numbers and are not implemented:
//! `scale_attn_by_inverse_layer_idx`, `reorder_and_upcast_attn`, any activation but
//! `gelu_new` (and its equal `gelu_pytorch_tanh`).
//!
//! A file loads into one [`Gpt2Weights`] (`gpt2/load.rs`); [`build`] makes the [`Gpt2`] that
//! runs it on composed candle ops (`gpt2/composed.rs`; f32 on any device, f64 for the
//! finite-difference tests). There are no fused kernels for GPT-2 yet: it loads on the composed
//! path, and asking for the fused one is refused ([`kernel_path`]).

mod composed;
mod load;

use anyhow::{bail, Result};
use candle_core::Tensor;

use super::bert::{Dense, Norm};
use super::weights::WeightSource;
use super::{Arch, Backbone, BackboneInput, CausalLm, KernelPath, KvCache, ModelInfo, Shape, Tape, WeightStorage};

/// Hyper-parameters of a GPT-2: the one place its shape is held ([`ModelInfo`] is derived from
/// it at load). `kv_heads` = `heads`, `head_dim` = `hidden / heads`.
#[derive(Debug, Clone)]
pub struct Gpt2Config {
    /// The sizes (read through `Deref`: `cfg.hidden`); `max_positions` is `n_positions`.
    pub shape: Shape,
    /// LayerNorm epsilon (`layer_norm_epsilon`).
    pub eps: f64,
    /// Whether attention scores are divided by `sqrt(head_dim)` (`scale_attn_weights`).
    pub scale_attn_weights: bool,
}

impl std::ops::Deref for Gpt2Config {
    type Target = Shape;
    fn deref(&self) -> &Shape {
        &self.shape
    }
}

impl Gpt2Config {
    /// Refuses inconsistent sizes (`source` names the file).
    fn validate(&self, source: &std::path::Path) -> Result<()> {
        let s = &self.shape;
        if s.heads == 0 || s.hidden == 0 || !s.hidden.is_multiple_of(s.heads) || s.head_dim * s.heads != s.hidden {
            bail!(
                "{}: hidden size {} is not divisible by the {} attention heads",
                source.display(),
                s.hidden,
                s.heads
            );
        }
        if s.kv_heads != s.heads {
            bail!(
                "{}: {} key/value heads for {} heads; GPT-2 has one key/value head per head",
                source.display(),
                s.kv_heads,
                s.heads
            );
        }
        if s.max_positions == 0 || s.layers == 0 || s.intermediate == 0 || s.vocab == 0 {
            bail!("{}: a size is 0 ({s:?})", source.display());
        }
        Ok(())
    }

    /// The factor the queries are multiplied by so that the attention's `1/sqrt(head_dim)`
    /// becomes GPT-2's scale: `sqrt(head_dim)` when `scale_attn_weights` is false.
    fn query_scale(&self) -> Option<f64> {
        (!self.scale_attn_weights).then(|| (self.head_dim as f64).sqrt())
    }
}

/// One GPT-2 block's frozen weights (candle tensors; linear weights `[out, in]`).
pub struct Gpt2Layer {
    /// `ln_1`, before attention.
    pub ln_1: Norm,
    /// `c_attn`: q, k and v stacked, `[3·D, D]`.
    pub qkv: Dense,
    /// The attention's output projection (`attn.c_proj`) `[D, D]`.
    pub proj: Dense,
    /// `ln_2`, before the MLP.
    pub ln_2: Norm,
    /// `mlp.c_fc` `[I, D]`.
    pub fc: Dense,
    /// `mlp.c_proj` `[D, I]`.
    pub fc_proj: Dense,
}

/// A GPT-2's weights as loaded.
pub struct Gpt2Weights {
    /// The shape and constants.
    pub cfg: Gpt2Config,
    /// Shape (from `cfg`) and provenance.
    pub info: ModelInfo,
    /// Token embeddings `wte` `[vocab, D]`.
    pub wte: Tensor,
    /// Position embeddings `wpe` `[n_positions, D]`.
    pub wpe: Tensor,
    /// The blocks.
    pub layers: Vec<Gpt2Layer>,
    /// The final LayerNorm `ln_f`.
    pub ln_f: Norm,
    /// Vocabulary head `[vocab, D]` (`wte` when tied).
    pub lm_head: Tensor,
}

/// A frozen GPT-2 on composed candle ops.
pub struct Gpt2 {
    w: Gpt2Weights,
}

/// The implementation a GPT-2 loads on: the composed candle ops. The fused kernels (asked by
/// `asked`) and weights kept in another storage than f32 (which only they read) are refused.
pub fn kernel_path(asked: Option<KernelPath>, storage: WeightStorage) -> Result<KernelPath> {
    if asked == Some(KernelPath::Fused) {
        bail!(
            "GPT-2 runs on the composed candle ops only (there are no fused kernels for it yet); \
             use kernels = composed, or leave the option unset"
        );
    }
    if storage != WeightStorage::F32 {
        bail!(
            "weights = \"{}\" keeps the weights for the fused CPU kernels, which GPT-2 does not run on; \
             use weights = \"f32\"",
            storage.name()
        );
    }
    Ok(KernelPath::Composed)
}

/// The model `weights` hold on the implementation `path` (composed only: see [`kernel_path`]).
pub fn build(weights: Gpt2Weights, path: KernelPath) -> Result<Box<dyn CausalLm>> {
    if path != KernelPath::Composed {
        kernel_path(Some(path), WeightStorage::F32)?;
    }
    Ok(Box::new(Gpt2 { w: weights }))
}

impl Gpt2 {
    fn check_width(&self, input: &BackboneInput) -> Result<()> {
        let d = input.embeds.dim(2)?;
        if d != self.w.cfg.hidden {
            bail!(
                "input embeddings have width {d}, the model's hidden size is {}",
                self.w.cfg.hidden
            );
        }
        Ok(())
    }

    fn run(&self, input: &BackboneInput, cache: Option<&mut KvCache>, keep: bool) -> Result<(Tensor, Option<Tape>)> {
        self.check_width(input)?;
        self.forward_stack(input, cache, keep)
    }

    fn train(&self, input: &BackboneInput, prefix: Option<&KvCache>) -> Result<(Tensor, Tape)> {
        let mut cache = match prefix {
            Some(p) => Some(self.repeat_prefix(p, input.embeds.dim(0)?)?),
            None => None,
        };
        let (h, tape) = self.run(input, cache.as_mut(), true)?;
        Ok((h, tape.expect("keep=true yields a tape")))
    }

    /// A one-row key/value prefix, checked, repeated for `rows` rows.
    fn repeat_prefix(&self, prefix: &KvCache, rows: usize) -> Result<KvCache> {
        let cfg = &self.w.cfg;
        super::bert::check_prefix(prefix, cfg.layers, cfg.heads, cfg.head_dim)?;
        prefix.repeat(rows)
    }
}

impl Backbone for Gpt2 {
    fn info(&self) -> &ModelInfo {
        &self.w.info
    }
    fn embedding_table(&self) -> &Tensor {
        &self.w.wte
    }
    fn forward(&self, input: &BackboneInput) -> Result<Tensor> {
        Ok(self.run(input, None, false)?.0)
    }
    fn forward_train(&self, input: &BackboneInput) -> Result<(Tensor, Tape)> {
        self.train(input, None)
    }
    fn backward(&self, tape: &Tape, d_hidden: &Tensor) -> Result<Tensor> {
        Ok(self.backward_stack(tape, d_hidden)?.0)
    }
    fn forward_prefixed(&self, input: &BackboneInput, prefix: &KvCache) -> Result<Tensor> {
        let mut cache = self.repeat_prefix(prefix, input.embeds.dim(0)?)?;
        Ok(self.run(input, Some(&mut cache), false)?.0)
    }
    fn forward_train_prefixed(&self, input: &BackboneInput, prefix: &KvCache) -> Result<(Tensor, Tape)> {
        self.train(input, Some(prefix))
    }
    fn backward_prefixed(&self, tape: &Tape, d_hidden: &Tensor) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
        self.backward_stack(tape, d_hidden)
    }
    fn kernel_path(&self) -> KernelPath {
        KernelPath::Composed
    }
}

impl CausalLm for Gpt2 {
    fn forward_cached(&self, input: &BackboneInput, cache: &mut KvCache) -> Result<Tensor> {
        Ok(self.run(input, Some(cache), false)?.0)
    }
    fn lm_head(&self) -> &Tensor {
        &self.w.lm_head
    }
}

/// The [`ModelInfo`] of a GPT-2 of this shape.
fn model_info(cfg: &Gpt2Config, model_type: String, tied: bool, params: usize, w: &dyn WeightSource) -> ModelInfo {
    let scale = if cfg.scale_attn_weights {
        format!(
            "attention scale 1/sqrt(head_dim) = {:.4}",
            (cfg.head_dim as f64).powf(-0.5)
        )
    } else {
        "unscaled attention scores (scale_attn_weights false)".to_string()
    };
    let features = vec![
        format!(
            "learned absolute positions ({} rows; positions past them refused)",
            cfg.max_positions
        ),
        "pre-LayerNorm blocks and a final LayerNorm".into(),
        "fused q/k/v projection (Conv1D c_attn, transposed at load); biases on q/k/v/o and the MLP".into(),
        format!("GELU-tanh (gelu_new) MLP, inner size {}", cfg.intermediate),
        scale,
        if tied {
            "tied head (the token embedding table)"
        } else {
            "untied head"
        }
        .into(),
    ];
    ModelInfo {
        features,
        arch: Arch::Gpt2,
        model_type,
        source: w.location().to_path_buf(),
        shape: cfg.shape,
        qk_norm: false,
        params,
        dtypes_on_disk: w.dtype_counts(),
    }
}
