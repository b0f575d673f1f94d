//! Frozen pretrained backbones with an embeddings entry point.
//!
//! A backbone maps input embeddings (not only ids) to the hidden states of **every** position.
//! The vocabulary head and the pooler are separate calls, so a task can apply the large head
//! only where a label is. Training a prompt needs d(loss)/d(input embeddings) and nothing else:
//! [`Backbone::forward_train`] keeps what the backward pass needs in a [`Tape`] and
//! [`Backbone::backward`] turns d(loss)/d(hidden) into d(loss)/d(embeddings). The first
//! implementation composes candle tensor ops; a fused kernel can replace it behind this trait.

pub mod bert;
pub mod bert_fused;
pub mod frozen_weight;
pub use frozen_weight::WeightStorage;
pub mod fused;
pub mod llama;
pub mod llama_fused;
pub mod ops;
pub mod profile;
pub mod random;
pub mod weights;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::any::Any;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::gguf::GgufFile;
use crate::model_source::ModelLocation;
use crate::tokenizer::TextTokenizer;

/// The architecture families softprompt runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama family: Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2 (causal decoder).
    Llama,
    /// BERT family: BERT, MiniLM (bidirectional encoder).
    Bert,
}

impl Arch {
    /// Whether the model is a causal language model.
    pub fn is_causal(self) -> bool {
        matches!(self, Arch::Llama)
    }
}

/// Shape and provenance of a loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Architecture family.
    pub arch: Arch,
    /// The `model_type` / `general.architecture` string the file declared.
    pub model_type: String,
    /// File or directory the weights came from.
    pub source: PathBuf,
    /// Number of transformer layers.
    pub layers: usize,
    /// Hidden size (embedding dimension).
    pub hidden: usize,
    /// Attention (query) heads.
    pub heads: usize,
    /// Key/value heads (fewer than `heads` with grouped-query attention).
    pub kv_heads: usize,
    /// Feed-forward inner size.
    pub intermediate: usize,
    /// Rows of the embedding table.
    pub vocab: usize,
    /// Longest sequence the position encoding supports.
    pub max_positions: usize,
    /// Total parameter count.
    pub params: usize,
    /// Number of tensors per storage type on disk (e.g. `Q4_1 → 210`).
    pub dtypes_on_disk: BTreeMap<String, usize>,
}

impl ModelInfo {
    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
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

/// Per-layer keys and values already computed (a generation cache, or a prompt's K/V reused
/// by many requests). Keys are stored after rotary encoding.
///
/// A new token's key slot is its column after the `len()` cached slots, which is also its
/// rotary position unless `next_pos` says otherwise: rows of different lengths padded to one
/// number of slots (mixed-request batches, [`KvCache::stack`]) each carry their own position.
#[derive(Clone, Default)]
pub struct KvCache {
    /// `(k, v)` per layer, each `[B, Hkv, S, head_dim]`.
    pub layers: Vec<(Tensor, Tensor)>,
    /// `[B, S]` key mask (f32) of the cached positions.
    pub mask: Option<Tensor>,
    /// `[B]` rotary position of each row's next token; `None`: `len()` for every row. Only the
    /// fused f32 CPU path runs a cache whose rows differ here.
    pub next_pos: Option<Vec<usize>>,
}

impl KvCache {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.mask.as_ref().map_or(0, |m| m.dim(1).unwrap_or(0))
    }
    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Number of rows (1 for an empty cache).
    pub fn rows(&self) -> usize {
        self.mask.as_ref().map_or(1, |m| m.dim(0).unwrap_or(1))
    }

    /// The rotary position of each row's next token (`[B]`).
    pub fn positions(&self) -> Vec<usize> {
        self.next_pos.clone().unwrap_or_else(|| vec![self.len(); self.rows()])
    }

    /// The same cache on `device`.
    pub fn to_device(&self, device: &Device) -> Result<KvCache> {
        Ok(KvCache {
            layers: self
                .layers
                .iter()
                .map(|(k, v)| Ok((k.to_device(device)?, v.to_device(device)?)))
                .collect::<Result<_>>()?,
            mask: self.mask.as_ref().map(|m| m.to_device(device)).transpose()?,
            next_pos: self.next_pos.clone(),
        })
    }

    /// The cache of a single sequence repeated for `n` sequences (a shared prompt's keys and
    /// values reused by a batch).
    pub fn repeat(&self, n: usize) -> Result<KvCache> {
        let grow = |t: &Tensor| -> Result<Tensor> {
            let mut dims = t.dims().to_vec();
            dims[0] = n;
            Ok(t.broadcast_as(dims)?.contiguous()?)
        };
        Ok(KvCache {
            layers: self
                .layers
                .iter()
                .map(|(k, v)| Ok((grow(k)?, grow(v)?)))
                .collect::<Result<_>>()?,
            mask: self.mask.as_ref().map(grow).transpose()?,
            next_pos: self.next_pos.as_ref().map(|p| vec![p[0]; n]),
        })
    }

    /// Single-row caches of different lengths as one batch: each row padded at its end to the
    /// longest with masked slots, each keeping its own next position. Every cache must be
    /// non-empty and of one row.
    pub fn stack(caches: &[&KvCache]) -> Result<KvCache> {
        let first = caches.first().context("no cache to stack")?;
        let layers = first.layers.len();
        let slots = caches.iter().map(|c| c.len()).max().unwrap_or(0);
        let mut out = KvCache {
            layers: Vec::with_capacity(layers),
            mask: None,
            next_pos: Some(Vec::with_capacity(caches.len())),
        };
        let mut masks = Vec::with_capacity(caches.len());
        for c in caches {
            if c.is_empty() || c.rows() != 1 || c.layers.len() != layers {
                bail!(
                    "cannot stack a cache of {} rows, {} positions and {} layers with one of 1 row and {layers} layers",
                    c.rows(),
                    c.len(),
                    c.layers.len()
                );
            }
            let mask = c.mask.as_ref().context("a non-empty cache has a mask")?;
            let pad = slots - c.len();
            masks.push(if pad == 0 {
                mask.clone()
            } else {
                mask.pad_with_zeros(1, 0, pad)?
            });
            out.next_pos.as_mut().expect("set above").push(c.positions()[0]);
        }
        for l in 0..layers {
            let mut ks = Vec::with_capacity(caches.len());
            let mut vs = Vec::with_capacity(caches.len());
            for c in caches {
                let pad = slots - c.len();
                let (k, v) = &c.layers[l];
                ks.push(if pad == 0 {
                    k.clone()
                } else {
                    k.pad_with_zeros(2, 0, pad)?
                });
                vs.push(if pad == 0 {
                    v.clone()
                } else {
                    v.pad_with_zeros(2, 0, pad)?
                });
            }
            out.layers.push((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?));
        }
        out.mask = Some(Tensor::cat(&masks, 0)?);
        Ok(out)
    }

    /// The rows of a batched cache as single-row caches holding only their real (unmasked)
    /// slots, each with its next position.
    pub fn unstack(&self) -> Result<Vec<KvCache>> {
        let mask = self.mask.as_ref().context("cannot split an empty cache")?;
        let masks: Vec<Vec<f32>> = mask.to_dtype(candle_core::DType::F32)?.to_vec2()?;
        let positions = self.positions();
        let device = mask.device();
        masks
            .iter()
            .enumerate()
            .map(|(r, m)| {
                let real: Vec<u32> = (0..m.len() as u32).filter(|&j| m[j as usize] != 0.0).collect();
                let n = real.len();
                let idx = Tensor::from_vec(real, n, device)?;
                let layers = self
                    .layers
                    .iter()
                    .map(|(k, v)| {
                        let take = |t: &Tensor| -> Result<Tensor> {
                            Ok(t.narrow(0, r, 1)?.index_select(&idx, 2)?.contiguous()?)
                        };
                        Ok((take(k)?, take(v)?))
                    })
                    .collect::<Result<_>>()?;
                Ok(KvCache {
                    layers,
                    mask: Some(Tensor::ones((1, n), candle_core::DType::F32, device)?),
                    next_pos: (positions[r] != n).then(|| vec![positions[r]]),
                })
            })
            .collect()
    }
}

/// Activations a forward pass kept for its backward pass (architecture-specific).
pub struct Tape(pub(crate) Box<dyn Any + Send + Sync>);

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

/// [`lm_logits`] for inference (scoring, generation): an f32 head on the CPU is read once for
/// a few rows by [`softprompt_kernels::head::logits`] instead of being packed for a general
/// product. The same values up to rounding; training keeps [`lm_logits`], whose rounding its
/// figures were measured with.
pub fn inference_logits(backbone: &dyn CausalLm, rows: &Tensor) -> Result<Tensor> {
    let table = backbone.lm_head();
    if !fused::applies(table.device(), table.dtype()) || !fused::applies(rows.device(), rows.dtype()) {
        return lm_logits(backbone, rows);
    }
    let ((m, d), (vocab, width)) = (rows.dims2()?, table.dims2()?);
    anyhow::ensure!(d == width, "hidden rows of width {d} for a head of width {width}");
    let x = fused::to_vec(rows)?;
    let mut out = vec![0f32; m * vocab];
    let (storage, layout) = table.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(all)), Some((start, end))) => {
            softprompt_kernels::head::logits(&x, &all[start..end], &mut out, m, d, vocab)
        }
        _ => return lm_logits(backbone, rows),
    }
    Ok(Tensor::from_vec(out, (m, vocab), rows.device())?)
}

/// A loaded frozen model with its capabilities in its type.
pub enum Model {
    /// A causal language model (Llama family).
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

/// A model and its tokenizer, loaded together.
pub struct LoadedModel {
    /// The frozen network.
    pub backbone: Model,
    /// Its tokenizer.
    pub tokenizer: TextTokenizer,
    /// The Jinja chat template the model came with (GGUF `tokenizer.chat_template`, or
    /// `chat_template` of a Hugging Face `tokenizer_config.json`), if any.
    pub chat_template: Option<String>,
}

/// Loads a model (GGUF file or Hugging Face directory) and its tokenizer on `device`, its
/// weights converted to f32.
pub fn load(location: &ModelLocation, device: &Device) -> Result<LoadedModel> {
    load_with(location, device, WeightStorage::F32)
}

/// [`load`] with the linear layers' weights kept as `storage` says (Llama family; BERT
/// encoders hold f32, as their files do, and refuse a conversion).
pub fn load_with(location: &ModelLocation, device: &Device, storage: WeightStorage) -> Result<LoadedModel> {
    let (backbone, tokenizer, chat_template): (Model, TextTokenizer, Option<String>) = match location {
        ModelLocation::Gguf(path) => {
            let file = GgufFile::open(path)?;
            let arch = file.get_str("general.architecture")?.to_string();
            let backbone = match arch.as_str() {
                "llama" | "qwen2" | "mistral" | "smollm" => {
                    Model::Causal(Box::new(llama::Llama::from_gguf(&file, device, storage)?))
                }
                other => bail!(
                    "{}: architecture `{other}` is not supported (supported in GGUF: llama, qwen2, mistral)",
                    path.display()
                ),
            };
            let tokenizer = TextTokenizer::from_gguf(&file)?;
            let template = file.get_str("tokenizer.chat_template").ok().map(str::to_string);
            (backbone, tokenizer, template)
        }
        ModelLocation::HfDir(dir) => {
            let config = read_config(dir)?;
            let model_type = config
                .get("model_type")
                .and_then(|v| v.as_str())
                .with_context(|| format!("{}: field `model_type` is missing", dir.join("config.json").display()))?
                .to_string();
            let weights = weights::SafetensorsWeights::open(dir)?;
            let backbone = match model_type.as_str() {
                "llama" | "mistral" | "qwen2" => Model::Causal(Box::new(llama::Llama::from_hf(
                    dir, &config, &weights, device, storage,
                )?)),
                "bert" if storage.converted_to().is_some() => bail!(
                    "{}: weights = {} converts the linear weights of Llama-family models; BERT \
                     encoders hold f32 (use weights = f32 or file)",
                    dir.display(),
                    storage.name()
                ),
                "bert" => Model::Encoder(Box::new(bert::Bert::from_hf(dir, &config, &weights, device)?)),
                other => bail!(
                    "{}: model_type `{other}` is not supported (supported: llama, mistral, qwen2, bert)",
                    dir.join("config.json").display()
                ),
            };
            let tokenizer = TextTokenizer::from_json_file(&dir.join("tokenizer.json"))?;
            let template = std::fs::read_to_string(dir.join("tokenizer_config.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|v| v.get("chat_template")?.as_str().map(str::to_string));
            (backbone, tokenizer, template)
        }
    };
    check_vocab(backbone.info(), &tokenizer)?;
    Ok(LoadedModel {
        backbone,
        tokenizer,
        chat_template,
    })
}

/// Refuses a tokenizer that can produce ids the embedding table does not have.
fn check_vocab(info: &ModelInfo, tokenizer: &TextTokenizer) -> Result<()> {
    let n = tokenizer.vocab_size();
    if n > info.vocab {
        bail!(
            "{}: the tokenizer has {n} tokens but the model's embedding table has only {} rows; \
             the tokenizer does not belong to this model",
            info.source.display(),
            info.vocab
        );
    }
    Ok(())
}

/// Reads `config.json` of a Hugging Face model directory.
pub fn read_config(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// Typed access to the fields of a model directory's parsed `config.json`; errors name the
/// file and the field.
pub fn config_fields<'a>(dir: &Path, config: &'a serde_json::Value) -> Result<crate::json_fields::JsonFields<'a>> {
    let path = dir.join("config.json");
    let map = config
        .as_object()
        .with_context(|| format!("{}: expected a JSON object", path.display()))?;
    Ok(crate::json_fields::JsonFields::with_origin(map, path.display()))
}
