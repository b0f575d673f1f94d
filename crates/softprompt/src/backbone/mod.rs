//! Frozen pretrained backbones with an embeddings entry point.
//!
//! A backbone maps input embeddings (not only ids) to the hidden states of **every** position.
//! The vocabulary head and the pooler are separate calls, so a task can apply the large head
//! only where a label is. Training a prompt needs d(loss)/d(input embeddings) and nothing else:
//! [`Backbone::forward_train`] keeps what the backward pass needs in a [`Tape`] and
//! [`Backbone::backward`] turns d(loss)/d(hidden) into d(loss)/d(embeddings).
//!
//! Each family (`llama`, `gemma3`, `bert`) loads into one weights struct and has two implementations
//! built from it: the fused f32 CPU kernels and the composed candle ops. Which one runs a model
//! is chosen once, at load ([`KernelPath`], [`LoadOptions`]). GPT-2 (`gpt2`) runs on the
//! composed ops only.

pub mod bert;
pub mod frozen_weight;
pub use frozen_weight::WeightStorage;
pub mod fused;
pub mod gemma3;
pub mod gpt2;
mod kv_cache;
pub use kv_cache::KvCache;
pub mod llama;
mod load;
pub use load::{config_fields, load, load_with, read_config, LoadOptions, LoadedModel};
pub mod ops;
pub mod path;
pub use path::KernelPath;
pub mod profile;
pub mod random;
pub mod weights;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use std::any::Any;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;

/// The architecture families softprompt runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama family: Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2, Qwen3 (causal decoder).
    Llama,
    /// Gemma 3 text models (causal decoder with sliding-window layers).
    Gemma3,
    /// GPT-2 (causal decoder with learned absolute positions and LayerNorm).
    Gpt2,
    /// BERT family: BERT, MiniLM (bidirectional encoder).
    Bert,
}

impl Arch {
    /// Whether the model is a causal language model.
    pub fn is_causal(self) -> bool {
        matches!(self, Arch::Llama | Arch::Gemma3 | Arch::Gpt2)
    }
}

/// Shape and provenance of a loaded model; the shape is derived at load from the family's
/// configuration ([`llama::LlamaConfig`], [`gemma3::Gemma3Config`], [`bert::BertConfig`]),
/// which holds it.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Architecture family.
    pub arch: Arch,
    /// The `model_type` / `general.architecture` string the file declared.
    pub model_type: String,
    /// File or directory the weights came from.
    pub source: PathBuf,
    /// The sizes (layers, widths, heads, vocabulary, positions); also read through `Deref`
    /// (`info.hidden`).
    pub shape: Shape,
    /// Whether each attention head's queries and keys are RMS-normed before the rotation
    /// (Qwen3's and Gemma 3's `q_norm`/`k_norm`).
    pub qk_norm: bool,
    /// Total parameter count.
    pub params: usize,
    /// What of the architecture applies to this model, in words (rotary scaling, sliding
    /// windows, q/k norms, a tied head, biases, ...), for `softprompt info`.
    pub features: Vec<String>,
    /// Number of tensors per storage type on disk (e.g. `Q4_1 → 210`).
    pub dtypes_on_disk: BTreeMap<String, usize>,
}

impl std::ops::Deref for ModelInfo {
    type Target = Shape;
    fn deref(&self) -> &Shape {
        &self.shape
    }
}

/// The sizes of a transformer: the one place they are held. A family's config
/// ([`llama::LlamaConfig`], [`bert::BertConfig`]) adds its own constants around it, and
/// [`ModelInfo`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Number of transformer layers.
    pub layers: usize,
    /// Hidden size (embedding dimension).
    pub hidden: usize,
    /// Attention (query) heads.
    pub heads: usize,
    /// Key/value heads (fewer than `heads` with grouped-query attention).
    pub kv_heads: usize,
    /// Width of one attention head: `hidden / heads` unless the model says otherwise (Qwen3's
    /// and Mistral Nemo's `head_dim`). Queries are `heads · head_dim` wide, keys and values
    /// `kv_heads · head_dim`, whatever `hidden` is.
    pub head_dim: usize,
    /// Feed-forward inner size.
    pub intermediate: usize,
    /// Rows of the embedding table.
    pub vocab: usize,
    /// Longest sequence the position encoding supports.
    pub max_positions: usize,
}

impl Shape {
    /// Size of one attention head (the field [`Shape::head_dim`]).
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Width of the queries (and of the attention's output) of one position: `heads · head_dim`
    /// (the hidden size unless the model sets `head_dim`).
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Width of the keys (and of the values) of one position: `kv_heads · head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// One forward call's inputs.
pub struct BackboneInput<'a> {
    /// Input embeddings `[B, T, hidden]` (the word embeddings, prompts spliced in).
    pub embeds: &'a Tensor,
    /// `[B, T]` with 1 for real positions and 0 for padding (u32 or f32).
    pub mask: &'a Tensor,
    /// BERT token types `[B, T]` (u32); zeros when absent.
    pub token_types: Option<&'a Tensor>,
}

impl<'a> BackboneInput<'a> {
    /// Embeddings and their mask, without token types.
    pub fn new(embeds: &'a Tensor, mask: &'a Tensor) -> Self {
        Self {
            embeds,
            mask,
            token_types: None,
        }
    }
}

/// Activations a forward pass kept for its backward pass (architecture-specific).
pub struct Tape(pub(crate) Box<dyn Any + Send + Sync>);

impl Tape {
    /// A tape holding `kept`.
    pub(crate) fn new<T: Any + Send + Sync>(kept: T) -> Tape {
        Tape(Box::new(kept))
    }

    /// What the tape holds, as the `T` its maker keeps; an error naming `maker` when another
    /// kind of model made it.
    pub(crate) fn get<T: Any>(&self, maker: &str) -> Result<&T> {
        self.0
            .downcast_ref::<T>()
            .with_context(|| format!("tape was not made by {maker}"))
    }
}

/// A frozen transformer that runs from input embeddings: what every model can do. What only
/// some models can do is a separate trait: [`CausalLm`] (key/value cache, vocabulary head) and
/// [`Encoder`] (pooler); [`Model`] holds a loaded model as one or the other.
pub trait Backbone: Send + Sync {
    /// Shape and provenance.
    fn info(&self) -> &ModelInfo;
    /// The input (word) embedding table `[vocab, hidden]`.
    fn embedding_table(&self) -> &Tensor;
    /// Word embeddings of `ids` (`[B, T]` u32) → `[B, T, hidden]`.
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let flat = self.embedding_table().index_select(&ids.flatten_all()?, 0)?;
        Ok(flat.reshape((b, t, self.info().hidden))?)
    }
    /// Hidden states of every position `[B, T, hidden]` (after the final norm for decoders).
    fn forward(&self, input: &BackboneInput) -> Result<Tensor>;
    /// Like [`Backbone::forward`], keeping the activations the backward pass needs.
    fn forward_train(&self, input: &BackboneInput) -> Result<(Tensor, Tape)>;
    /// d(loss)/d(input embeddings) `[B, T, hidden]` from d(loss)/d(hidden) of every position.
    ///
    /// A backbone may compute a prefix that is identical in every row (a prepended soft prompt)
    /// once per batch. The gradient of such a shared prefix is then the sum over the rows,
    /// reported at row 0 (the other rows get zero there): exactly what a prompt's gradient,
    /// summed over the rows, needs.
    fn backward(&self, tape: &Tape, d_hidden: &Tensor) -> Result<Tensor>;
    /// Hidden states `[B, T, hidden]` of rows that all follow the same key/value prefix
    /// (`prefix`: one row, per layer `[1, Hkv, V, head_dim]`, keys used as they are; prefix
    /// tuning, p-tuning v2, Cartridges): every attention layer sees the prefix's `V` keys and
    /// values before the input's, and every real position attends to them. The input's
    /// positions start after the prefix (PEFT on causal models; Hugging Face BERT with
    /// `past_key_values`).
    fn forward_prefixed(&self, input: &BackboneInput, prefix: &KvCache) -> Result<Tensor>;
    /// Like [`Backbone::forward_prefixed`], keeping the activations
    /// [`Backbone::backward_prefixed`] needs.
    fn forward_train_prefixed(&self, input: &BackboneInput, prefix: &KvCache) -> Result<(Tensor, Tape)>;
    /// From a [`Backbone::forward_train_prefixed`] tape: d(loss)/d(input embeddings) and the
    /// prefix's gradient per layer, `(dK, dV)` each `[1, Hkv, V, head_dim]`, summed over rows.
    fn backward_prefixed(&self, tape: &Tape, d_hidden: &Tensor) -> Result<(Tensor, Vec<(Tensor, Tensor)>)>;
    /// Late prompt tuning: the decoder layers `layers` run on `input`, whose embeddings are the
    /// residual stream `[B, T, hidden]` entering layer `layers.start` (the input embeddings for
    /// 0), after the positions in `cache` (one entry per layer of the range; extended in place).
    /// Returns the residual stream leaving the range, final-normed (as [`Backbone::forward`])
    /// when it ends at the last layer. Families that do not run a range of layers refuse by name.
    fn forward_layers(
        &self,
        input: &BackboneInput,
        layers: Range<usize>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let _ = (input, layers, cache);
        Err(no_layer_ranges(self.info()))
    }
    /// Late prompt tuning's training forward: the layers from `first` on and the final norm,
    /// run on the residual stream entering layer `first` (`input.embeds`), with the tape whose
    /// [`Backbone::backward`] gives d(loss)/d(that residual stream) and runs no layer below
    /// `first`.
    fn forward_train_from(&self, input: &BackboneInput, first: usize) -> Result<(Tensor, Tape)> {
        let _ = (input, first);
        Err(no_layer_ranges(self.info()))
    }
    /// Which implementation runs this model (chosen when it loaded). Backbones outside this
    /// module compose tensor ops: the default.
    fn kernel_path(&self) -> KernelPath {
        KernelPath::Composed
    }
}

/// The refusal of a family that cannot run a range of its layers (late prompt tuning).
fn no_layer_ranges(info: &ModelInfo) -> anyhow::Error {
    anyhow::anyhow!(
        "late prompt tuning runs on Llama-family models (Llama, SmolLM2, Mistral, Qwen2, Qwen3); \
         {} is a {:?} model (`{}`)",
        info.source.display(),
        info.arch,
        info.model_type
    )
}

/// A causal language model: a key/value cache and a vocabulary head.
pub trait CausalLm: Backbone {
    /// Forwards `input` after the positions already in `cache`, appending the new keys and
    /// values to it. Returns the new positions' hidden states.
    fn forward_cached(&self, input: &BackboneInput, cache: &mut KvCache) -> Result<Tensor>;
    /// The vocabulary head `[vocab, hidden]`.
    fn lm_head(&self) -> &Tensor;
    /// The hidden states `[R, hidden]` of the positions `at` (`(row, column)` of the batch, in
    /// row, then column order) run after `prefix` (one row every row continues from, left unchanged).
    /// For scoring: a backbone may skip the work that only the other positions need.
    fn hidden_at(&self, input: &BackboneInput, prefix: Option<&KvCache>, at: &[(usize, usize)]) -> Result<Tensor> {
        hidden_at_by_forward(self, input, prefix, at)
    }
    /// Logits of the vocabulary head for a few hidden rows `[N, hidden]` → `[N, vocab]`, for
    /// inference (scoring, generation): the values of [`lm_logits`] up to rounding; a backbone
    /// may read its head in a way suited to few rows.
    fn inference_logits(&self, rows: &Tensor) -> Result<Tensor> {
        Ok(rows.matmul(&self.lm_head().t()?)?)
    }
}

/// [`CausalLm::hidden_at`] by a full forward, then the positions picked out.
pub fn hidden_at_by_forward<M: CausalLm + ?Sized>(
    model: &M,
    input: &BackboneInput,
    prefix: Option<&KvCache>,
    at: &[(usize, usize)],
) -> Result<Tensor> {
    let hidden = match prefix {
        Some(p) => model.forward_prefixed(input, p)?,
        None => model.forward(input)?,
    };
    pick_positions(&hidden, at)
}

/// The rows `[R, hidden]` of `hidden` (`[B, T, hidden]`) at the positions `at` (`(row, column)`).
pub fn pick_positions(hidden: &Tensor, at: &[(usize, usize)]) -> Result<Tensor> {
    let rows = at
        .iter()
        .map(|&(r, c)| hidden.get(r)?.get(c))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::stack(&rows, 0)?)
}

/// A bidirectional encoder with a pooler.
pub trait Encoder: Backbone {
    /// Pooler: `tanh(W·h[:, 0] + b)` → `[B, hidden]`.
    fn pool(&self, hidden: &Tensor) -> Result<Tensor>;
    /// Input gradient of [`Encoder::pool`]: d(loss)/d(hidden) `[B, T, hidden]`.
    fn pool_backward(&self, hidden: &Tensor, d_pooled: &Tensor) -> Result<Tensor>;
}

/// Logits of the vocabulary head for hidden rows `[N, hidden]` → `[N, vocab]`, as training's
/// loss computes them (its backward multiplies by the same head).
pub fn lm_logits(backbone: &dyn CausalLm, rows: &Tensor) -> Result<Tensor> {
    Ok(rows.matmul(&backbone.lm_head().t()?)?)
}

/// [`lm_logits`] for inference (scoring, generation): [`CausalLm::inference_logits`]. The
/// fused path reads an f32 head once for a few rows instead of packing it for a general product:
/// the same values up to rounding; training keeps [`lm_logits`], whose rounding its figures were
/// measured with.
pub fn inference_logits(backbone: &dyn CausalLm, rows: &Tensor) -> Result<Tensor> {
    backbone.inference_logits(rows)
}

/// A loaded frozen model with its capabilities in its type.
pub enum Model {
    /// A causal language model (Llama family, Gemma 3).
    Causal(Box<dyn CausalLm>),
    /// An encoder (BERT family).
    Encoder(Box<dyn Encoder>),
}

impl Model {
    /// The causal language model, if this is one.
    pub fn causal(&self) -> Option<&dyn CausalLm> {
        match self {
            Model::Causal(m) => Some(m.as_ref()),
            Model::Encoder(_) => None,
        }
    }

    /// The encoder, if this is one.
    pub fn encoder(&self) -> Option<&dyn Encoder> {
        match self {
            Model::Encoder(m) => Some(m.as_ref()),
            Model::Causal(_) => None,
        }
    }

    /// The causal language model, or an error saying that `what` needs one.
    pub fn require_causal(&self, what: &str) -> Result<&dyn CausalLm> {
        self.causal().with_context(|| {
            format!(
                "{what} needs a causal language model, not a {:?} encoder",
                self.info().arch
            )
        })
    }

    /// The device the weights are on.
    pub fn device(&self) -> &Device {
        self.embedding_table().device()
    }
}

impl std::ops::Deref for Model {
    type Target = dyn Backbone;
    fn deref(&self) -> &Self::Target {
        match self {
            Model::Causal(m) => m.as_ref(),
            Model::Encoder(m) => m.as_ref(),
        }
    }
}

impl AsRef<dyn Backbone> for Model {
    fn as_ref(&self) -> &(dyn Backbone + 'static) {
        &**self
    }
}
