//! An adapter turned, once, into the keys and values every request starts from.
//!
//! For a causal model the keys and values of a prepended prompt do not depend on what follows,
//! so a prompt-tuning or p-tuning adapter (`[P; X]`, PEFT's layout for causal LMs) is run
//! through the model once when it is loaded; a prefix-tuning adapter already *is* per-layer keys
//! and values. Either way a request starts from the same [`KvCache`] and pays only for its
//! own tokens; the real tokens' positions start after the prompt, as in PEFT.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

use crate::adapter::PeftAdapter;
use crate::backbone::{BackboneInput, CausalLm, KvCache};

/// The keys and values a request starts from (one row), for one adapter or none.
#[derive(Clone, Default)]
pub struct PromptCache {
    /// The cache (empty for the plain model).
    pub cache: KvCache,
    /// A DePT adapter's update of the input embeddings `[rows, hidden]`: row `j` is added to
    /// the request's `j`-th token ([`PromptCache::input_embeds`]); `None` for the others.
    pub input_update: Option<Tensor>,
    /// The prompt `[p, hidden]` the cache was run from (prompt tuning, p-tuning, residual,
    /// multitask, DePT's prompt); `None` for a K/V prefix or the plain model. Kept so that a
    /// composition of adapters ([`super::compose`]) can run it after another adapter's prompt.
    pub source: Option<Tensor>,
    /// Embeddings `[n, hidden]` not run yet: a request's own soft prompt (the server's
    /// `prompt_embeds`), run at the request's prefill after [`PromptCache::cache`] and before
    /// its tokens, exactly as an adapter's prompt is run (see [`PromptCache::with_embeds`]).
    pub embeds: Option<Tensor>,
}

impl PromptCache {
    /// The plain model: nothing before the request's tokens.
    pub fn none() -> Self {
        Self::default()
    }

    /// Number of virtual positions before a request's tokens (the cached ones and the
    /// embeddings still to run).
    pub fn len(&self) -> usize {
        self.cache.len() + self.embeds_len()
    }

    /// Number of rows of [`PromptCache::embeds`] (0 without).
    pub fn embeds_len(&self) -> usize {
        self.embeds.as_ref().map_or(0, |e| e.dim(0).unwrap_or(0))
    }

    /// Whether this is the plain model.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// This prompt followed by the embeddings `embeds` `[n, hidden]` (`n > 0`), run at each
    /// request's prefill; refused when they do not fit the model, or when this prompt already
    /// has embeddings or adds a DePT update to the tokens that follow its own prompt.
    pub fn with_embeds(&self, lm: &dyn CausalLm, embeds: Tensor) -> Result<Self> {
        let (n, d) = embeds.dims2()?;
        if d != lm.info().hidden || n == 0 {
            bail!(
                "embeddings of shape [{n}, {d}] do not fit a model of hidden size {}",
                lm.info().hidden
            );
        }
        if self.embeds.is_some() {
            bail!("the prompt already has embeddings to run");
        }
        if self.input_update.is_some() {
            bail!(
                "a DePT adapter adds its update to the tokens right after its prompt; embeddings cannot come between"
            );
        }
        let table = lm.embedding_table();
        Ok(Self {
            embeds: Some(embeds.to_device(table.device())?.to_dtype(table.dtype())?),
            ..self.clone()
        })
    }

    /// The input embeddings `[1, n, hidden]` of a request's tokens `ids` after this prompt: the
    /// frozen word embeddings, plus a DePT adapter's update by position (row `j` to token `j`,
    /// as in training, where it reaches the real tokens after the prepended prompt; tokens past
    /// its rows get none).
    pub fn input_embeds(&self, lm: &dyn CausalLm, ids: &[u32]) -> Result<Tensor> {
        let device = lm.embedding_table().device();
        let embeds = lm.embed(&Tensor::new(ids, device)?.unsqueeze(0)?)?;
        let Some(update) = &self.input_update else {
            return Ok(embeds);
        };
        let n = ids.len().min(update.dim(0)?);
        if n == 0 {
            return Ok(embeds);
        }
        let rows = update.narrow(0, 0, n)?.to_dtype(embeds.dtype())?.unsqueeze(0)?;
        let head = (embeds.narrow(1, 0, n)? + rows)?;
        if n == ids.len() {
            return Ok(head);
        }
        Ok(Tensor::cat(&[&head, &embeds.narrow(1, n, ids.len() - n)?], 1)?)
    }

    /// A prompt `[p, hidden]` prepended to the input embeddings, run through the model once.
    pub fn from_prompt(lm: &dyn CausalLm, prompt: &Tensor) -> Result<Self> {
        let (p, d) = prompt.dims2()?;
        if d != lm.info().hidden || p == 0 {
            bail!(
                "a prompt of shape [{p}, {d}] does not fit a model of hidden size {}",
                lm.info().hidden
            );
        }
        let device = lm.embedding_table().device();
        let embeds = prompt
            .to_device(device)?
            .to_dtype(lm.embedding_table().dtype())?
            .unsqueeze(0)?;
        let mask = Tensor::ones((1, p), DType::U32, device)?;
        let mut cache = KvCache::default();
        lm.forward_cached(&BackboneInput::new(&embeds, &mask), &mut cache)?;
        Ok(Self {
            cache,
            source: Some(embeds.squeeze(0)?),
            ..Self::default()
        })
    }

    /// The cache of a PEFT adapter: prompt tuning and p-tuning (the prompt prepended), prefix
    /// tuning, Cartridges and late prompt tuning (the per-layer prefix,
    /// [`super::late_prompt::adapter_prefix`]). A multitask
    /// adapter needs a task id: see [`PromptCache::from_adapter_task`].
    pub fn from_adapter(lm: &dyn CausalLm, adapter: &PeftAdapter) -> Result<Self> {
        Self::from_adapter_task(lm, adapter, None)
    }

    /// [`PromptCache::from_adapter`] with the task id of a multitask adapter (its task's prompt
    /// prepended); a task id is refused for the other adapters.
    pub fn from_adapter_task(lm: &dyn CausalLm, adapter: &PeftAdapter, task: Option<usize>) -> Result<Self> {
        crate::adapter::check_compatible(&adapter.config, lm.info())?;
        match super::late_prompt::adapter_prefix(lm, adapter)? {
            Some(_) if task.is_some() => bail!(
                "a task id was given, but {} is a {} adapter (task ids are for MULTITASK_PROMPT_TUNING adapters)",
                adapter.dir.display(),
                adapter.config.peft_type().as_str()
            ),
            Some(cache) => {
                let device = lm.embedding_table().device();
                let dtype = lm.embedding_table().dtype();
                let layers = cache
                    .layers
                    .iter()
                    .map(|(k, v)| {
                        Ok((
                            k.to_device(device)?.to_dtype(dtype)?,
                            v.to_device(device)?.to_dtype(dtype)?,
                        ))
                    })
                    .collect::<Result<_>>()?;
                let mask = cache.mask.map(|m| m.to_device(device)).transpose()?;
                Ok(Self {
                    cache: KvCache {
                        layers,
                        mask,
                        next_pos: None,
                    },
                    ..Self::default()
                })
            }
            None => {
                let mut cache = Self::from_prompt(lm, &adapter.input_prompt_for(task)?)?;
                let table = lm.embedding_table();
                cache.input_update = adapter
                    .input_update()?
                    .map(|u| u.to_device(table.device())?.to_dtype(table.dtype()))
                    .transpose()?;
                Ok(cache)
            }
        }
    }
}
