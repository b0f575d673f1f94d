//! BERT-family encoder (BERT, MiniLM): word + position + token-type embeddings, post-LayerNorm
//! blocks with exact GELU, and the tanh pooler over position 0.
//!
//! ```text
//! x0 = LN(e + pos + type)
//! per layer: a = softmax(q·kᵀ/√d + mask)·v;  x1 = LN(x + a·Woᵀ + bo);  out = LN(x1 + gelu(x1·W1ᵀ + b1)·W2ᵀ + b2)
//! pooler: tanh(Wp·h[:, 0] + bp)
//! ```
//!
//! A key/value prefix (p-tuning v2, Liu et al. 2022) puts its `V` keys and values before the
//! input's in every layer, every real position attends to them, and the input's positions start
//! at `V`, as Hugging Face BERT does with `past_key_values` (`V + T ≤ max_position_embeddings`).
//!
//! A directory loads into one [`BertWeights`] (`bert/load.rs`); [`build`] turns it into a
//! [`Bert`] on the [`Stack`] the load chose: [`ComposedStack`] (candle ops written out layer by
//! layer, `bert/composed.rs`) or [`FusedStack`] (fused f32 CPU kernels, `bert/fused.rs`). The
//! word embeddings, the pooler and the [`Backbone`] plumbing are the same for both.

mod composed;
mod fused;
mod load;

pub use composed::ComposedStack;
pub use fused::FusedStack;

use anyhow::{bail, ensure, Context, Result};
use candle_core::Tensor;

use super::ops;
use super::weights::WeightSource;
use super::{Arch, Backbone, BackboneInput, Encoder, KernelPath, KvCache, ModelInfo, Shape, Tape};

/// Hyper-parameters of a BERT-family encoder: the one place its shape is held ([`ModelInfo`] is
/// derived from it at load).
#[derive(Debug, Clone)]
pub struct BertConfig {
    /// The sizes (`kv_heads` = `heads`; read through `Deref`: `cfg.hidden`).
    pub shape: Shape,
    /// Rows of the token-type table.
    pub types: usize,
    /// LayerNorm epsilon.
    pub eps: f64,
}

impl std::ops::Deref for BertConfig {
    type Target = Shape;
    fn deref(&self) -> &Shape {
        &self.shape
    }
}

impl BertConfig {
    /// The [`ModelInfo`] of an encoder of this shape.
    fn model_info(&self, params: usize, weights: &dyn WeightSource) -> ModelInfo {
        ModelInfo {
            features: vec![
                "bidirectional encoder".into(),
                "learned absolute and token-type positions".into(),
                "post-LayerNorm, GELU MLP, q/k/v/o biases".into(),
            ],
            arch: Arch::Bert,
            model_type: "bert".into(),
            source: weights.location().to_path_buf(),
            shape: self.shape,
            qk_norm: false,
            params,
            dtypes_on_disk: weights.dtype_counts(),
        }
    }
}

/// A dense layer `x·Wᵀ + b` (candle tensors).
pub struct Dense {
    /// Weight `[out, in]`.
    pub w: Tensor,
    /// Bias `[out]`.
    pub b: Tensor,
}

impl Dense {
    /// `x·Wᵀ + b`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(ops::linear(x, &self.w, Some(&self.b))?)
    }
    /// Input gradient of [`Dense::forward`]: `dy·W`.
    pub fn backward(&self, dy: &Tensor) -> Result<Tensor> {
        Ok(ops::linear_backward(dy, &self.w)?)
    }
    /// The output rows `start..start + len` (one of several projections stacked).
    pub fn rows(&self, start: usize, len: usize) -> Result<Dense> {
        Ok(Dense {
            w: self.w.narrow(0, start, len)?,
            b: self.b.narrow(0, start, len)?,
        })
    }
}

/// LayerNorm gain and bias (candle tensors).
pub struct Norm {
    /// Gain `[D]`.
    pub g: Tensor,
    /// Bias `[D]`.
    pub b: Tensor,
}

/// One encoder layer's frozen weights; `D` holds a dense layer, `N` a LayerNorm (candle
/// tensors as loaded and on the composed stack, f32 rows on the fused one).
pub struct BertLayer<D = Dense, N = Norm> {
    /// q, k, v stacked: `[3·D, D]`.
    pub qkv: D,
    /// Attention output projection `[D, D]`.
    pub o: D,
    /// LayerNorm after attention.
    pub attn_norm: N,
    /// MLP up projection `[I, D]`.
    pub inner: D,
    /// MLP down projection `[D, I]`.
    pub out: D,
    /// LayerNorm after the MLP.
    pub out_norm: N,
}

impl<D, N> BertLayer<D, N> {
    /// The same layer with every dense layer converted by `d` and every norm by `n`.
    pub fn convert<D2, N2>(
        self,
        mut d: impl FnMut(D) -> Result<D2>,
        mut n: impl FnMut(N) -> Result<N2>,
    ) -> Result<BertLayer<D2, N2>> {
        Ok(BertLayer {
            qkv: d(self.qkv)?,
            o: d(self.o)?,
            attn_norm: n(self.attn_norm)?,
            inner: d(self.inner)?,
            out: d(self.out)?,
            out_norm: n(self.out_norm)?,
        })
    }
}

/// The embedding sum's position and token-type tables and its LayerNorm.
pub struct Embeddings {
    /// Position embeddings `[max_positions, D]`.
    pub position: Tensor,
    /// Token-type embeddings `[types, D]`.
    pub token_type: Tensor,
    /// LayerNorm of the sum.
    pub norm: Norm,
}

/// A BERT-family encoder's weights as loaded, before either implementation takes them.
pub struct BertWeights {
    /// The shape.
    pub cfg: BertConfig,
    /// Shape (from `cfg`) and provenance.
    pub info: ModelInfo,
    /// Word embeddings `[vocab, D]`.
    pub word: Tensor,
    /// Position and token-type embeddings and their LayerNorm.
    pub embeddings: Embeddings,
    /// Encoder layers.
    pub layers: Vec<BertLayer>,
    /// The pooler, when the checkpoint has one.
    pub pooler: Option<Dense>,
}

/// A BERT encoder's embedding sum and layers on one implementation.
pub trait Stack: Sized + Send + Sync + 'static {
    /// Which implementation this is.
    const PATH: KernelPath;
    /// Takes the loaded tables and layers (an error where this implementation cannot run them).
    fn new(cfg: BertConfig, embeddings: Embeddings, layers: Vec<BertLayer>) -> Result<Self>;
    /// Hidden states `[B, T, D]` of `input`, after a checked one-row key/value `prefix` when
    /// given; with `keep`, the tape for [`Stack::backward`].
    fn forward(&self, input: &BackboneInput, prefix: Option<&KvCache>, keep: bool) -> Result<(Tensor, Option<Tape>)>;
    /// d(loss)/d(input embeddings) and, after a prefix, its gradient per layer `(dK, dV)`, each
    /// `[1, H, V, hd]`, summed over the rows.
    fn backward(&self, tape: &Tape, d_hidden: &Tensor) -> Result<(Tensor, Vec<(Tensor, Tensor)>)>;
}

/// A frozen BERT-family encoder run by the stack `S`.
pub struct Bert<S> {
    info: ModelInfo,
    word: Tensor,
    pooler: Option<Dense>,
    stack: S,
}

/// A BERT encoder on the composed candle ops.
pub type ComposedBert = Bert<ComposedStack>;
/// A BERT encoder on the fused f32 CPU kernels.
pub type FusedBert = Bert<FusedStack>;

impl<S: Stack> Bert<S> {
    /// The encoder on stack `S`, built from (and consuming) the loaded weights.
    pub fn new(w: BertWeights) -> Result<Self> {
        Ok(Self {
            stack: S::new(w.cfg, w.embeddings, w.layers)?,
            info: w.info,
            word: w.word,
            pooler: w.pooler,
        })
    }

    /// The forward pass after a one-row key/value `prefix` when given, its inputs checked.
    fn run(&self, input: &BackboneInput, prefix: Option<&KvCache>, keep: bool) -> Result<(Tensor, Option<Tape>)> {
        let (_, t, d) = input.embeds.dims3()?;
        if d != self.info.hidden {
            bail!(
                "input embeddings have width {d}, the model's hidden size is {}",
                self.info.hidden
            );
        }
        let past = match prefix {
            Some(p) => {
                check_prefix(p, self.info.layers, self.info.heads, self.info.head_dim())?;
                p.len()
            }
            None => 0,
        };
        check_positions(past, t, self.info.max_positions)?;
        self.stack.forward(input, prefix, keep)
    }

    /// The training forward, after a key/value prefix when given.
    fn train(&self, input: &BackboneInput, prefix: Option<&KvCache>) -> Result<(Tensor, Tape)> {
        let (h, tape) = self.run(input, prefix, true)?;
        Ok((h, tape.expect("keep=true yields a tape")))
    }

    fn pooler(&self) -> Result<&Dense> {
        self.pooler.as_ref().with_context(|| {
            format!(
                "{}: this BERT checkpoint has no pooler weights",
                self.info.source.display()
            )
        })
    }
}

/// The encoder `weights` hold on the implementation `path`.
pub fn build(weights: BertWeights, path: KernelPath) -> Result<Box<dyn Encoder>> {
    Ok(match path {
        KernelPath::Fused => Box::new(FusedBert::new(weights)?),
        KernelPath::Composed => Box::new(ComposedBert::new(weights)?),
    })
}

impl<S: Stack> Backbone for Bert<S> {
    fn info(&self) -> &ModelInfo {
        &self.info
    }
    fn embedding_table(&self) -> &Tensor {
        &self.word
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
        Ok(self.run(input, Some(prefix), false)?.0)
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

impl<S: Stack> Encoder for Bert<S> {
    fn pool(&self, hidden: &Tensor) -> Result<Tensor> {
        let first = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        Ok(self.pooler()?.forward(&first)?.tanh()?)
    }
    fn pool_backward(&self, hidden: &Tensor, d_pooled: &Tensor) -> Result<Tensor> {
        let (b, t, d) = hidden.dims3()?;
        let pooled = self.pool(hidden)?;
        let dz = (d_pooled * pooled.sqr()?.affine(-1.0, 1.0)?)?;
        let d_first = self.pooler()?.backward(&dz)?.unsqueeze(1)?;
        if t == 1 {
            return Ok(d_first);
        }
        let rest = Tensor::zeros((b, t - 1, d), hidden.dtype(), hidden.device())?;
        Ok(Tensor::cat(&[&d_first, &rest], 1)?)
    }
}

/// Refuses a key/value prefix that is not one row with a key mask and, for each of the model's
/// `layers`, keys and values of shape `[1, heads, V, head_dim]`.
pub(super) fn check_prefix(prefix: &KvCache, layers: usize, heads: usize, head_dim: usize) -> Result<()> {
    ensure!(
        prefix.mask.is_some() && prefix.rows() == 1 && prefix.layers.len() == layers,
        "a key/value prefix must be one row with a mask and keys/values for each of the model's {layers} layers; \
         got {} rows, {} layers",
        prefix.rows(),
        prefix.layers.len()
    );
    let want = [1, heads, prefix.len(), head_dim];
    for (l, (k, v)) in prefix.layers.iter().enumerate() {
        for t in [k, v] {
            ensure!(
                t.dims() == want,
                "layer {l} of the key/value prefix has shape {:?}, expected {want:?}",
                t.dims()
            );
        }
    }
    Ok(())
}

/// Refuses inputs whose positions, after a prefix of `past` positions, run past the model's
/// `max_positions` (absolute position embeddings: Hugging Face BERT offsets the input's
/// positions by the prefix length).
fn check_positions(past: usize, cols: usize, max_positions: usize) -> Result<()> {
    if past + cols > max_positions {
        if past > 0 {
            bail!(
                "the key/value prefix's {past} positions and the input's {cols} positions exceed the model's \
                 {max_positions} positions (max_position_embeddings): the input's positions start after the \
                 prefix; lower num_virtual_tokens or max_len"
            );
        }
        bail!("sequence of {cols} positions exceeds the model's {max_positions} positions");
    }
    Ok(())
}
