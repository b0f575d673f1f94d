//! Late prompt tuning (Liu et al. 2022): a prompt `P [p, d]` that enters at decoder layer
//! `insert_layer` instead of the input.
//!
//! Every row has `p` reserved positions in front (the template's leading `[soft:p]`). One
//! training step:
//! ```text
//! x_L = layers[0..L]( splice(embed(ids), E at the reserved positions) )   no tape
//! h   = layers[L..]( splice(x_L, P at the reserved positions) ), final norm             taped
//! dP  = Σ over the reserved positions of d loss / d x_L'   (the backward stops at layer L)
//! ```
//! `E` (the placeholder) is the initial prompt in word-embedding space and `P` starts as `E`'s
//! hidden states at `L`, so step 0 equals prompt tuning's with the same init. `x_L` does not
//! depend on `P`, so it is computed without a tape, and, with
//! `cache_lower_layers`, once per training row (kept by the row's token ids, on the device, for
//! the rest of the run): later epochs run only the layers from `L` on. For inference the adapter
//! is a per-layer key/value prefix (`crate::infer::late_prompt`).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use std::collections::HashMap;
use std::sync::Mutex;

use super::learned::LearnedPrompt;
use super::Prepared;
use crate::adapter::{PeftConfig, TaskType, LATE_PROMPT_LAYER, LATE_PROMPT_PLACEHOLDER};
use crate::backbone::{Backbone, BackboneInput, KvCache, Tape};
use crate::batch::{prompt_gradient, splice_embeddings, splice_rows, Batch};
use crate::config::{option, InitKind};
use crate::infer::late_prompt::late_prompt_cache;
use crate::prompt::{PromptInit, SoftPrompt};
use crate::task::Example;
use crate::template::Token;

/// The lower layers' outputs of the training rows are cached by default when they take at most
/// this many bytes.
pub const LOWER_CACHE_BUDGET: usize = 1 << 30;

/// A late prompt: the matrix, the layer it enters at, and the lower layers' outputs seen so far.
pub struct LatePrompt {
    prompt: SoftPrompt,
    /// The reserved positions' input embeddings `[p, d]` (fixed).
    placeholder: Tensor,
    layer: usize,
    /// Row token ids (virtual positions hold 0) → the residual stream entering `layer`
    /// `[len, d]`; `None` when caching is off.
    lower: Option<Mutex<HashMap<Vec<u32>, Tensor>>>,
}

impl std::fmt::Debug for LatePrompt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatePrompt")
            .field("prompt", &self.prompt.forward().map(|t| t.dims().to_vec()).ok())
            .field("layer", &self.layer)
            .field("cached_rows", &self.cached_rows())
            .finish()
    }
}

impl LatePrompt {
    /// The prompt over the placeholder `init [p, d]`, starting as its hidden states at the
    /// prompt's layer (`init = "from"` a late-prompt adapter: its prompt and placeholder), entering at option `insert_layer` (default: half
    /// the model's layers), the lower layers cached as option `cache_lower_layers` says (by
    /// default when the training rows' outputs fit [`LOWER_CACHE_BUDGET`]; said on stderr when
    /// not cached).
    pub fn new(p: &Prepared, init: &Tensor) -> Result<Self> {
        let info = p.model.backbone.info();
        let layer = p.cfg.insert_layer.unwrap_or(info.layers / 2);
        if layer >= info.layers {
            bail!(
                "{} is {layer}, but {} has {} layers: the prompt must enter at one of them (0..{})",
                option("insert_layer"),
                info.source.display(),
                info.layers,
                info.layers
            );
        }
        let bytes = lower_cache_bytes(&p.train, info.hidden, init.dtype().size_in_bytes());
        let cache = match p.cfg.cache_lower_layers {
            Some(on) => on,
            None => bytes <= LOWER_CACHE_BUDGET,
        };
        if !cache {
            let why = match p.cfg.cache_lower_layers {
                Some(_) => format!("{} is false", option("cache_lower_layers")),
                None => format!(
                    "the training rows' hidden states would take {:.2} GiB, more than the {} GiB \
                     default budget (set {} = true to cache them anyway)",
                    bytes as f64 / (1u64 << 30) as f64,
                    LOWER_CACHE_BUDGET >> 30,
                    option("cache_lower_layers")
                ),
            };
            eprintln!("late prompt tuning: the lower layers' outputs are not cached ({why}); every step runs layers 0..{layer} too");
        }
        // The reserved positions' input embeddings are the initial prompt (word-embedding
        // space), and the prompt starts as their hidden states at `layer`: step 0 is prompt
        // tuning's step 0 with the same init. `init = "from"` a late-prompt adapter continues it
        // as saved, placeholder and all.
        let saved = match (p.cfg.init, &p.cfg.init_from) {
            (InitKind::From, Some(dir)) => crate::adapter::load_peft(dir)?
                .tensors
                .get(LATE_PROMPT_PLACEHOLDER)
                .cloned(),
            _ => None,
        };
        let model = &*p.model.backbone;
        let (start, placeholder) = match saved {
            Some(placeholder) => (
                init.clone(),
                placeholder.to_dtype(init.dtype())?.to_device(init.device())?,
            ),
            None => {
                let mask = Tensor::ones((1, init.dim(0)?), DType::U32, init.device())?;
                let rows = init.unsqueeze(0)?;
                let lifted = model.forward_layers(&BackboneInput::new(&rows, &mask), 0..layer, None)?;
                (lifted.squeeze(0)?, init.clone())
            }
        };
        Self::with_layer(&start, &placeholder, layer, cache)
    }

    /// The prompt starting at `init [p, d]` over the reserved positions' input embeddings
    /// `placeholder [p, d]`, entering at decoder layer `layer`; with `cache`, each training row's
    /// lower layers run once.
    pub fn with_layer(init: &Tensor, placeholder: &Tensor, layer: usize, cache: bool) -> Result<Self> {
        if placeholder.dims() != init.dims() {
            bail!(
                "a late prompt of shape {:?} over a placeholder of shape {:?}",
                init.dims(),
                placeholder.dims()
            );
        }
        Ok(Self {
            prompt: SoftPrompt::prompt_tuning(init)?,
            placeholder: placeholder.detach(),
            layer,
            lower: cache.then(|| Mutex::new(HashMap::new())),
        })
    }

    /// The decoder layer the prompt enters at.
    pub fn layer(&self) -> usize {
        self.layer
    }

    /// Training rows whose lower layers' outputs are cached.
    pub fn cached_rows(&self) -> usize {
        self.lower
            .as_ref()
            .and_then(|m| m.lock().ok().map(|c| c.len()))
            .unwrap_or(0)
    }

    /// The residual stream `[B, T, d]` entering the prompt's layer for the batch's rows (zeros
    /// at padding), with the placeholder at the reserved positions: from the cache where a row
    /// is in it, the others run through layers `0..layer` together (and cached).
    fn lower_hidden(&self, model: &dyn Backbone, batch: &Batch) -> Result<Tensor> {
        let embeds = splice_embeddings(model, batch, Some(&self.placeholder))?;
        let run = |rows: &[usize]| -> Result<Tensor> {
            let index = Tensor::new(
                rows.iter().map(|&r| r as u32).collect::<Vec<_>>().as_slice(),
                embeds.device(),
            )?;
            let (e, m) = (embeds.index_select(&index, 0)?, batch.mask.index_select(&index, 0)?);
            model.forward_layers(&BackboneInput::new(&e, &m), 0..self.layer, None)
        };
        let Some(lower) = &self.lower else {
            return run(&(0..batch.shape.0).collect::<Vec<_>>());
        };
        let (b, t) = batch.shape;
        let ids = batch.ids.to_vec2::<u32>()?;
        let mask = batch.mask.to_vec2::<u32>()?;
        let keys: Vec<Vec<u32>> = ids
            .iter()
            .zip(&mask)
            .map(|(i, m)| i[..m.iter().filter(|&&x| x != 0).count()].to_vec())
            .collect();
        let mut cache = lower
            .lock()
            .map_err(|_| anyhow::anyhow!("the lower-layer cache was poisoned by a panic"))?;
        let mut missing: Vec<usize> = (0..b).filter(|&r| !cache.contains_key(&keys[r])).collect();
        missing.dedup_by(|x, y| keys[*x] == keys[*y]);
        if !missing.is_empty() {
            let hidden = run(&missing)?;
            for (i, &r) in missing.iter().enumerate() {
                let row = hidden.get(i)?.narrow(0, 0, keys[r].len())?.copy()?;
                cache.insert(keys[r].clone(), row);
            }
        }
        let d = model.info().hidden;
        let rows = keys
            .iter()
            .map(|k| {
                let row = &cache[k];
                match t - k.len() {
                    0 => Ok(row.clone()),
                    pad => Ok(Tensor::cat(
                        &[row, &Tensor::zeros((pad, d), row.dtype(), row.device())?],
                        0,
                    )?),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&rows, 0)?)
    }
}

/// Bytes the residual streams of every training row take (prompt and target positions).
fn lower_cache_bytes(rows: &[Example], hidden: usize, dtype_bytes: usize) -> usize {
    rows.iter()
        .map(|e| (e.prompt.len() + e.target.len()) * hidden * dtype_bytes)
        .sum()
}

/// `rows` without their virtual tokens: what is scored after a key/value prefix standing for
/// them (late prompt tuning's leading `[soft:p]`).
pub fn without_virtual_tokens(rows: &[Example]) -> Vec<Example> {
    rows.iter()
        .map(|e| Example {
            prompt: e.prompt.iter().copied().filter(|t| matches!(t, Token::Id(_))).collect(),
            ..e.clone()
        })
        .collect()
}

impl LearnedPrompt for LatePrompt {
    fn forward(&self) -> Result<Tensor> {
        self.prompt.forward()
    }
    fn forward_train(&self, _rng: &mut StdRng) -> Result<Tensor> {
        self.prompt.forward()
    }
    fn vars(&self) -> Vec<(String, Var)> {
        self.prompt.vars()
    }
    fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = self.prompt.tensors()?;
        out.push((LATE_PROMPT_PLACEHOLDER.to_string(), self.placeholder.copy()?));
        Ok(out)
    }
    fn set_from(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let t = tensors.get(LATE_PROMPT_PLACEHOLDER).with_context(|| {
            format!("tensor `{LATE_PROMPT_PLACEHOLDER}` is missing (needed to restore a late prompt)")
        })?;
        if t.dims() != self.placeholder.dims() {
            bail!(
                "tensor `{LATE_PROMPT_PLACEHOLDER}` has shape {:?}, expected {:?}",
                t.dims(),
                self.placeholder.dims()
            );
        }
        self.prompt.set_from(tensors)?;
        self.placeholder = t
            .to_dtype(self.placeholder.dtype())?
            .to_device(self.placeholder.device())?;
        Ok(())
    }
    fn device(&self) -> Device {
        self.prompt.embedding().device().clone()
    }
    fn model_forward(&self, model: &dyn Backbone, batch: &Batch, learned: &Tensor) -> Result<(Tensor, Tape)> {
        let lower = self.lower_hidden(model, batch)?;
        let hidden = splice_rows(batch, &lower, learned)?;
        model.forward_train_from(&BackboneInput::new(&hidden, &batch.mask), self.layer)
    }
    fn gradient(&self, model: &dyn Backbone, batch: &Batch, tape: &Tape, d_hidden: &Tensor) -> Result<Tensor> {
        let d_layer = model.backward(tape, d_hidden)?;
        prompt_gradient(batch, &d_layer, self.prompt.num_virtual_tokens())
    }
    fn eval_parts(&self, model: &dyn Backbone) -> Result<(Option<Tensor>, Option<KvCache>)> {
        let cache = late_prompt_cache(model, &self.prompt.forward()?.detach(), &self.placeholder, self.layer)
            .context("the late prompt's keys and values")?;
        Ok((None, Some(cache)))
    }
    fn peft_config(&self, p: &Prepared, init: &PromptInit, task_type: TaskType) -> Result<PeftConfig> {
        Ok(PeftConfig::for_prompt(
            &self.prompt,
            init,
            task_type,
            p.model.backbone.info(),
        ))
    }
    fn peft_tensors(&self) -> Result<(Tensor, Vec<(String, Tensor)>)> {
        let prompt = self.prompt.forward()?.detach();
        let layer = Tensor::new(&[self.layer as f32], prompt.device())?;
        Ok((
            prompt,
            vec![
                (LATE_PROMPT_LAYER.to_string(), layer),
                (LATE_PROMPT_PLACEHOLDER.to_string(), self.placeholder.copy()?),
            ],
        ))
    }
}
