//! What a run learns, behind one trait: an input prompt spliced into the embeddings (prompt
//! tuning, p-tuning, multitask prompt tuning: [`SoftPrompt`]) or a key/value prefix every
//! attention layer reads (prefix tuning, p-tuning v2, Cartridges: [`KvPrefix`]). The training
//! step, the checkpoint and the adapter writer only speak to [`LearnedPrompt`].

use anyhow::Result;
use candle_core::{Device, Tensor, Var};
use rand::rngs::StdRng;
use std::collections::HashMap;

use super::Prepared;
use crate::adapter::{PeftConfig, TaskType};
use crate::backbone::{Backbone, BackboneInput, CausalLm, KvCache, Tape};
use crate::batch::{prompt_gradient, splice_embeddings, Batch};
use crate::prompt::prefix::{flat_gradient, flat_to_cache};
use crate::prompt::{KvPrefix, PromptInit, SoftPrompt};

/// The learned part of a run, whatever its kind.
pub trait LearnedPrompt: std::fmt::Debug + Send + Sync {
    /// What PEFT saves as `prompt_embeddings`: the prompt `[p, hidden]` or the flat prefix
    /// `[V, layers·2·kv_dim]`, as a differentiable graph over [`LearnedPrompt::vars`].
    fn forward(&self) -> Result<Tensor>;

    /// The same graph in training mode (an encoder's dropout drawn from `rng`).
    fn forward_train(&self, rng: &mut StdRng) -> Result<Tensor>;

    /// Trainable parameters with their saved names.
    fn vars(&self) -> Vec<(String, Var)>;

    /// Copies of every parameter (a Cartridge's frozen tokens included).
    fn tensors(&self) -> Result<Vec<(String, Tensor)>>;

    /// Restores the parameters from saved tensors.
    fn set_from(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()>;

    /// Device of the parameters.
    fn device(&self) -> Device;

    /// One micro-batch through the frozen model with `learned` (the value of
    /// [`LearnedPrompt::forward_train`], detached) entered where this kind enters: hidden states
    /// of every position and the tape for [`LearnedPrompt::gradient`].
    fn model_forward(&self, model: &dyn Backbone, batch: &Batch, learned: &Tensor) -> Result<(Tensor, Tape)>;

    /// d(loss)/d(learned) from d(loss)/d(hidden states), through the frozen model.
    fn gradient(&self, model: &dyn Backbone, batch: &Batch, tape: &Tape, d_hidden: &Tensor) -> Result<Tensor>;

    /// What evaluation on `model` needs: the input prompt `[p, hidden]` or the prefix as a
    /// one-row cache (late prompt tuning's computed by the model).
    fn eval_parts(&self, model: &dyn Backbone) -> Result<(Option<Tensor>, Option<KvCache>)>;

    /// DePT's position-wise update of the input embeddings `[rows, hidden]` (see
    /// [`crate::batch::add_input_update`]); `None` for the other kinds.
    fn input_update(&self) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// The factor on the learning rate of parameter `name` (DePT's `A` and `B` train at
    /// `dept_lr`, so theirs is `dept_lr / lr`); 1 for the others.
    fn lr_scale(&self, _name: &str, _cfg: &crate::config::TrainConfig) -> f64 {
        1.0
    }

    /// The causal-LM loss of a micro-batch and d(loss)/d(hidden states): the mean cross-entropy
    /// of the target tokens ([`crate::loss::lm_loss`]); CPT adds its context's labels.
    fn lm_loss(&self, lm: &dyn CausalLm, batch: &Batch, hidden: &Tensor) -> Result<(f32, Tensor)> {
        crate::loss::lm_loss(lm, batch, hidden)
    }

    /// Runs after every optimiser step (CPT projects its offset back within its bounds).
    fn after_step(&self) -> Result<()> {
        Ok(())
    }

    /// The PEFT `adapter_config.json` of this learned part (`init`: how it started).
    fn peft_config(&self, p: &Prepared, init: &PromptInit, task_type: TaskType) -> Result<PeftConfig>;

    /// What `adapter_model.safetensors` holds: `prompt_embeddings` and any other tensors.
    fn peft_tensors(&self) -> Result<(Tensor, Vec<(String, Tensor)>)>;
}

impl LearnedPrompt for SoftPrompt {
    fn forward(&self) -> Result<Tensor> {
        SoftPrompt::forward(self)
    }
    fn forward_train(&self, rng: &mut StdRng) -> Result<Tensor> {
        SoftPrompt::forward_train(self, rng)
    }
    fn vars(&self) -> Vec<(String, Var)> {
        SoftPrompt::vars(self)
    }
    fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        SoftPrompt::tensors(self)
    }
    fn set_from(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        SoftPrompt::set_from(self, tensors)
    }
    fn device(&self) -> Device {
        self.embedding().device().clone()
    }
    fn model_forward(&self, model: &dyn Backbone, batch: &Batch, learned: &Tensor) -> Result<(Tensor, Tape)> {
        let embeds = splice_embeddings(model, batch, Some(learned))?;
        model.forward_train(&BackboneInput::new(&embeds, &batch.mask))
    }
    fn gradient(&self, model: &dyn Backbone, batch: &Batch, tape: &Tape, d_hidden: &Tensor) -> Result<Tensor> {
        let d_embeds = model.backward(tape, d_hidden)?;
        prompt_gradient(batch, &d_embeds, self.num_prompt_rows())
    }
    fn eval_parts(&self, _model: &dyn Backbone) -> Result<(Option<Tensor>, Option<KvCache>)> {
        Ok((Some(SoftPrompt::forward(self)?.detach()), None))
    }
    fn peft_config(&self, p: &Prepared, init: &PromptInit, task_type: TaskType) -> Result<PeftConfig> {
        if self.task_factors().is_some() {
            return super::multitask::peft_config(p, self, task_type);
        }
        Ok(PeftConfig::for_prompt(self, init, task_type, p.model.backbone.info()))
    }
    fn peft_tensors(&self) -> Result<(Tensor, Vec<(String, Tensor)>)> {
        SoftPrompt::peft_tensors(self)
    }
}

impl LearnedPrompt for KvPrefix {
    fn forward(&self) -> Result<Tensor> {
        KvPrefix::forward(self)
    }
    fn forward_train(&self, _rng: &mut StdRng) -> Result<Tensor> {
        KvPrefix::forward(self)
    }
    fn vars(&self) -> Vec<(String, Var)> {
        KvPrefix::vars(self)
    }
    fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        KvPrefix::tensors(self)
    }
    fn set_from(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        KvPrefix::set_from(self, tensors)
    }
    fn device(&self) -> Device {
        KvPrefix::device(self)
    }
    fn model_forward(&self, model: &dyn Backbone, batch: &Batch, learned: &Tensor) -> Result<(Tensor, Tape)> {
        let embeds = splice_embeddings(model, batch, None)?;
        let cache = flat_to_cache(learned, self.shape())?;
        model.forward_train_prefixed(&BackboneInput::new(&embeds, &batch.mask), &cache)
    }
    fn gradient(&self, model: &dyn Backbone, _batch: &Batch, tape: &Tape, d_hidden: &Tensor) -> Result<Tensor> {
        let (_, d_layers) = model.backward_prefixed(tape, d_hidden)?;
        flat_gradient(&d_layers, self.num_virtual_tokens())
    }
    fn eval_parts(&self, _model: &dyn Backbone) -> Result<(Option<Tensor>, Option<KvCache>)> {
        Ok((
            None,
            Some(flat_to_cache(&KvPrefix::forward(self)?.detach(), self.shape())?),
        ))
    }
    fn peft_config(&self, p: &Prepared, _init: &PromptInit, task_type: TaskType) -> Result<PeftConfig> {
        Ok(super::prefix::peft_config(self, task_type, p.model.backbone.info()))
    }
    fn peft_tensors(&self) -> Result<(Tensor, Vec<(String, Tensor)>)> {
        Ok((KvPrefix::forward(self)?.detach(), Vec::new()))
    }
}

/// What a run learns (see [`LearnedPrompt`]).
pub type Learned = Box<dyn LearnedPrompt>;
