//! Mixed-prompt continuous batching: many sequences, each with its own adapter (or none), its
//! own length and its own key/value cache, advanced together one token per step.
//!
//! A request joins with [`Engine::add`]: its tokens are run once after its adapter's
//! [`PromptCache`] (the prefill) and its first token is chosen. Each [`Engine::step`] then runs
//! one forward pass for every active sequence: their caches are stacked into one batch, padded
//! to the longest with masked key slots, each row keeping its own rotary position
//! ([`KvCache::stack`]), and split back afterwards. New requests join between steps; finished
//! or cancelled ones leave. A sequence's tokens do not depend on its neighbours: each has its
//! own cache, positions and random generator.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use std::sync::Arc;

use super::generate::prefill;
use super::prompt_cache::PromptCache;
use super::sampling::{Sampler, SamplingParams};
use super::text_stream::TextStream;
use crate::backbone::frozen_weight::{rounding_scope, Rounding};
use crate::backbone::{inference_logits, BackboneInput, CausalLm, KvCache};
use crate::tokenizer::TextTokenizer;

/// What a request asks for.
#[derive(Clone)]
pub struct GenRequest {
    /// Token ids after the adapter's prompt (at least one, unless the prompt has embeddings
    /// to run: [`PromptCache::embeds`]).
    pub ids: Vec<u32>,
    /// The adapter's keys and values ([`PromptCache::none`] for the plain model).
    pub prompt: Arc<PromptCache>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Token choice.
    pub sampling: SamplingParams,
    /// Strings that end the sequence (not included in its text).
    pub stop: Vec<String>,
    /// Token ids that end the sequence (EOS; not included).
    pub stop_ids: Vec<u32>,
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the model's context.
    Length,
}

impl FinishReason {
    /// OpenAI's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Something that happened to a sequence.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A token was chosen: its id, its log-probability, and the text it made final (may be
    /// empty while a stop string or a UTF-8 sequence is incomplete).
    Token {
        /// Token id.
        id: u32,
        /// log p(token) under the model.
        logprob: f32,
        /// Newly final text.
        text: String,
    },
    /// The sequence ended; `text` is the last piece of text (if any).
    Done {
        /// Why.
        reason: FinishReason,
        /// Last text released.
        text: String,
        /// Prompt tokens: the request's tokens and embeddings ([`PromptCache::embeds`]),
        /// without the adapter's virtual tokens.
        prompt_tokens: usize,
        /// Tokens generated (the end-of-sequence token not counted).
        completion_tokens: usize,
    },
}

struct Sequence<K> {
    key: K,
    cache: KvCache,
    /// The token chosen last, to be fed at the next step.
    pending: u32,
    generated: usize,
    prompt_tokens: usize,
    max_tokens: usize,
    sampler: Sampler,
    text: TextStream,
    stop_ids: Vec<u32>,
}

/// The continuous-batching scheduler over one frozen model. `K` names a sequence (e.g. a
/// request id).
pub struct Engine<'a, K> {
    lm: &'a dyn CausalLm,
    tokenizer: &'a TextTokenizer,
    active: Vec<Sequence<K>>,
}

impl<'a, K: Clone + PartialEq> Engine<'a, K> {
    /// An engine with no sequences.
    pub fn new(lm: &'a dyn CausalLm, tokenizer: &'a TextTokenizer) -> Self {
        Self {
            lm,
            tokenizer,
            active: Vec::new(),
        }
    }

    /// Number of sequences still generating.
    pub fn active(&self) -> usize {
        self.active.len()
    }

    /// Whether no sequence is generating.
    pub fn is_idle(&self) -> bool {
        self.active.is_empty()
    }

    /// Drops a sequence (a client went away). Returns whether it was active.
    pub fn cancel(&mut self, key: &K) -> bool {
        let before = self.active.len();
        self.active.retain(|s| &s.key != key);
        before != self.active.len()
    }

    /// Starts a sequence: runs its tokens after its adapter's cache and chooses its first token.
    /// Returns the events of that first token (and the end, if it ends at once).
    pub fn add(&mut self, key: K, req: GenRequest) -> Result<Vec<(K, Event)>> {
        self.add_with_progress(key, req, usize::MAX, &mut |_, _| {})
    }

    /// [`Engine::add`], running the request's tokens `chunk` at a time and calling
    /// `progress(done, total)` after each chunk (a long prompt's prefill can then be shown).
    pub fn add_with_progress(
        &mut self,
        key: K,
        req: GenRequest,
        chunk: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<(K, Event)>> {
        req.sampling.validate()?;
        if req.ids.is_empty() && req.prompt.embeds.is_none() {
            bail!("the prompt is empty: at least one token or embedding is needed");
        }
        let max_pos = self.lm.info().max_positions;
        let total = req.prompt.len() + req.ids.len();
        if total >= max_pos {
            bail!(
                "the prompt takes {total} positions (adapter {} + text {}); the model's context is {max_pos}",
                req.prompt.len(),
                req.ids.len()
            );
        }
        let mut cache = req.prompt.cache.clone();
        // the request's own embeddings run as an adapter's prompt is (once, exact products)
        let after_embeds = match &req.prompt.embeds {
            Some(e) => {
                let mask = Tensor::ones((1, e.dim(0)?), DType::U32, e.device())?;
                Some(
                    self.lm
                        .forward_cached(&BackboneInput::new(&e.unsqueeze(0)?, &mask), &mut cache)?,
                )
            }
            None => None,
        };
        // generation: quantized weights multiply 8-bit activations, as llama.cpp does
        let logits: Vec<f32> = rounding_scope(Rounding::Inference, || -> Result<Vec<f32>> {
            let hidden = match after_embeds {
                Some(h) if req.ids.is_empty() => h,
                _ => {
                    let embeds = req.prompt.input_embeds(self.lm, &req.ids)?;
                    prefill(self.lm, &embeds, &mut cache, chunk, progress)?
                }
            };
            let last = hidden.narrow(1, hidden.dim(1)? - 1, 1)?.squeeze(1)?;
            Ok(inference_logits(self.lm, &last)?
                .squeeze(0)?
                .to_dtype(DType::F32)?
                .to_vec1()?)
        })?;
        let seq = Sequence {
            key,
            cache,
            pending: 0,
            generated: 0,
            prompt_tokens: req.ids.len() + req.prompt.embeds_len(),
            max_tokens: req.max_tokens,
            sampler: Sampler::new(req.sampling),
            text: TextStream::new(req.stop),
            stop_ids: req.stop_ids,
        };
        let mut events = Vec::new();
        if req.max_tokens == 0 {
            let mut seq = seq;
            events.push((seq.key.clone(), self.done(&mut seq, FinishReason::Length)?));
            return Ok(events);
        }
        let mut seq = seq;
        if self.advance(&mut seq, &logits, &mut events)? {
            self.active.push(seq);
        }
        Ok(events)
    }

    /// One decode step for every active sequence; returns what happened to each.
    pub fn step(&mut self) -> Result<Vec<(K, Event)>> {
        if self.active.is_empty() {
            return Ok(Vec::new());
        }
        let device = self.lm.embedding_table().device();
        let n = self.active.len();
        let mut batch = if n == 1 {
            self.active[0].cache.clone()
        } else {
            KvCache::stack(&self.active.iter().map(|s| &s.cache).collect::<Vec<_>>())?
        };
        let pending: Vec<u32> = self.active.iter().map(|s| s.pending).collect();
        let ids = Tensor::from_vec(pending, (n, 1), device)?;
        let embeds = self.lm.embed(&ids)?;
        let mask = Tensor::ones((n, 1), DType::U32, device)?;
        let logits: Vec<Vec<f32>> = rounding_scope(Rounding::Inference, || -> Result<Vec<Vec<f32>>> {
            let hidden = self
                .lm
                .forward_cached(&BackboneInput::new(&embeds, &mask), &mut batch)?;
            let d = hidden.dim(2)?;
            Ok(inference_logits(self.lm, &hidden.reshape((n, d))?)?
                .to_dtype(DType::F32)?
                .to_vec2()?)
        })?;
        let caches = if n == 1 { vec![batch] } else { batch.unstack()? };
        let mut events = Vec::new();
        let mut keep = Vec::with_capacity(n);
        for ((mut seq, cache), logits) in std::mem::take(&mut self.active).into_iter().zip(caches).zip(logits) {
            seq.cache = cache;
            if self.advance(&mut seq, &logits, &mut events)? {
                keep.push(seq);
            }
        }
        self.active = keep;
        Ok(events)
    }

    /// Chooses the next token from `logits`; returns whether the sequence goes on.
    fn advance(&self, seq: &mut Sequence<K>, logits: &[f32], events: &mut Vec<(K, Event)>) -> Result<bool> {
        let (id, logprob) = seq.sampler.next(logits);
        if seq.stop_ids.contains(&id) {
            events.push((seq.key.clone(), self.done(seq, FinishReason::Stop)?));
            return Ok(false);
        }
        seq.generated += 1;
        seq.pending = id;
        let (text, stopped) = seq.text.push(self.tokenizer, id)?;
        events.push((seq.key.clone(), Event::Token { id, logprob, text }));
        let full = seq.cache.positions()[0] + 1 >= self.lm.info().max_positions;
        if stopped {
            let done = Event::Done {
                reason: FinishReason::Stop,
                text: String::new(),
                prompt_tokens: seq.prompt_tokens,
                completion_tokens: seq.generated,
            };
            events.push((seq.key.clone(), done));
            return Ok(false);
        }
        if seq.generated >= seq.max_tokens || full {
            events.push((seq.key.clone(), self.done(seq, FinishReason::Length)?));
            return Ok(false);
        }
        Ok(true)
    }

    fn done(&self, seq: &mut Sequence<K>, reason: FinishReason) -> Result<Event> {
        Ok(Event::Done {
            reason,
            text: seq.text.finish(self.tokenizer)?,
            prompt_tokens: seq.prompt_tokens,
            completion_tokens: seq.generated,
        })
    }
}

/// What one sequence produced, collected from its events.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Completion {
    /// Generated token ids (end-of-sequence not included).
    pub ids: Vec<u32>,
    /// Their log-probabilities.
    pub logprobs: Vec<f32>,
    /// The text (cut before a stop string).
    pub text: String,
    /// Why it ended.
    pub finish: Option<FinishReason>,
}

impl Completion {
    /// Adds one event.
    pub fn push(&mut self, event: &Event) {
        match event {
            Event::Token { id, logprob, text } => {
                self.ids.push(*id);
                self.logprobs.push(*logprob);
                self.text.push_str(text);
            }
            Event::Done { reason, text, .. } => {
                self.text.push_str(text);
                self.finish = Some(*reason);
            }
        }
    }
}

/// Runs one request alone to its end, calling `on_event` as events come (streaming).
pub fn generate(
    lm: &dyn CausalLm,
    tokenizer: &TextTokenizer,
    req: GenRequest,
    on_event: impl FnMut(&Event) -> Result<()>,
) -> Result<Completion> {
    generate_with_progress(lm, tokenizer, req, usize::MAX, &mut |_, _| {}, on_event)
}

/// [`generate`], prefilling the request's tokens `chunk` at a time with `progress(done, total)`
/// after each chunk (see [`Engine::add_with_progress`]).
pub fn generate_with_progress(
    lm: &dyn CausalLm,
    tokenizer: &TextTokenizer,
    req: GenRequest,
    chunk: usize,
    progress: &mut dyn FnMut(usize, usize),
    mut on_event: impl FnMut(&Event) -> Result<()>,
) -> Result<Completion> {
    let mut engine = Engine::new(lm, tokenizer);
    let mut out = Completion::default();
    let mut events = engine.add_with_progress((), req, chunk, progress)?;
    loop {
        for (_, e) in &events {
            on_event(e)?;
            out.push(e);
        }
        if engine.is_idle() {
            return Ok(out);
        }
        events = engine.step()?;
    }
}
