//! The learnable parts: a virtual-token embedding `[p, d]` and, for p-tuning, the encoder that
//! maps it to the prompt matrix. Layout and parameter names follow HF PEFT
//! (`peft/tuners/prompt_tuning/model.py`, `peft/tuners/p_tuning/model.py`):
//!
//! | method | parameters (names as in PEFT's state dict) | prompt `P` |
//! |---|---|---|
//! | prompt tuning | `prompt_embeddings` `[p, d]` | the embedding itself |
//! | p-tuning, MLP | `prompt_encoder.default.embedding.weight` `[p, d]`, `prompt_encoder.default.mlp_head.{0,2,4}.{weight,bias}` | `mlp_head(embedding)` |
//! | p-tuning, LSTM | `prompt_encoder.default.embedding.weight`, `prompt_encoder.default.lstm_head.{weight_ih,weight_hh,bias_ih,bias_hh}_l{k}[_reverse]`, `prompt_encoder.default.mlp_head.{0,2}.{weight,bias}` | `mlp_head(lstm_head(embedding))` |
//! | residual prompt tuning | `residual_prompt.embedding` `[p, d]`, `residual_prompt.{down,up,layer_norm}.{weight,bias}` (softprompt's names; PEFT has no such method) | `embedding + LN(up(relu(down(embedding))))`, saved as a prompt-tuning `prompt_embeddings` |
//! | multitask prompt tuning | `prompt_embeddings` `[p, d]`, `prefix_task_cols` `[T, p, r]`, `prefix_task_rows` `[T, r, d]` | every task's `embedding ⊙ (cols[t]·rows[t])`, stacked `[T·p, d]` |
//!
//! [`SoftPrompt::forward`] builds `P` as a candle graph over the parameters' [`Var`]s, so the
//! trainer can call `(P * dP).sum_all()?.backward()?` with `dP = d(loss)/dP` from the frozen
//! backbone and read the gradients of [`SoftPrompt::vars`].

pub mod cpt;
pub mod encoder;
pub mod init;
pub mod method;
pub mod multitask;
pub mod prefix;
pub mod residual;
pub mod similarity;

use anyhow::{bail, Context, Result};
use candle_core::{Tensor, Var};
use rand::rngs::StdRng;
use std::collections::HashMap;

pub use encoder::{EncoderKind, EncoderSpec, PromptEncoder};
pub use init::{
    common_token_ids, initial_prompt, sample_vocab_ids, seeded_rng, text_init_ids, InitSource, PromptInit,
    VOCAB_SAMPLE_POOL,
};
pub use method::Method;
pub use multitask::{SourceInit, TaskFactors, PREFIX_TASK_COLS, PREFIX_TASK_ROWS};
pub use prefix::{KvPrefix, PrefixShape, PrefixSpec};
pub use residual::{ResidualMlp, RESIDUAL_EMBEDDING};

/// PEFT's name of the prompt-tuning embedding (and of the saved prompt of every method).
pub const PROMPT_EMBEDDINGS: &str = "prompt_embeddings";
/// PEFT's name of p-tuning's virtual-token embedding.
pub const P_TUNING_EMBEDDING: &str = "prompt_encoder.default.embedding.weight";

/// A soft prompt: `num_virtual_tokens` × `token_dim` learnable embedding, optionally encoded
/// (p-tuning) or multiplied by per-task factors (multitask prompt tuning).
#[derive(Debug, Clone)]
pub struct SoftPrompt {
    num_virtual_tokens: usize,
    token_dim: usize,
    embedding: Var,
    encoder: Option<PromptEncoder>,
    tasks: Option<TaskFactors>,
    residual: Option<ResidualMlp>,
}

impl SoftPrompt {
    /// Prompt tuning: the prompt is the learnable matrix itself, starting at `init [p, d]`.
    pub fn prompt_tuning(init: &Tensor) -> Result<Self> {
        let (p, d) = dims_of(init)?;
        Ok(Self {
            num_virtual_tokens: p,
            token_dim: d,
            embedding: Var::from_tensor(&init.contiguous()?)?,
            encoder: None,
            tasks: None,
            residual: None,
        })
    }

    /// Multitask prompt tuning: the shared prompt starts at `init [p, d]`, each task's prompt is
    /// it times the task's factors (see [`multitask`]).
    pub fn multitask(init: &Tensor, factors: TaskFactors) -> Result<Self> {
        let (p, d) = dims_of(init)?;
        let prompt = Self {
            num_virtual_tokens: p,
            token_dim: d,
            embedding: Var::from_tensor(&init.contiguous()?)?,
            encoder: None,
            tasks: Some(factors),
            residual: None,
        };
        prompt
            .forward()
            .context("the task factors do not fit the shared prompt")?;
        Ok(prompt)
    }

    /// P-tuning: the learnable embedding starts at `init [p, d]` and passes through a new
    /// encoder (torch's default initialisation drawn from `rng`, in `init`'s dtype and device).
    pub fn p_tuning(init: &Tensor, spec: &EncoderSpec, rng: &mut StdRng) -> Result<Self> {
        let (p, d) = dims_of(init)?;
        let encoder = PromptEncoder::new(spec, d, init.dtype(), init.device(), rng)?;
        Ok(Self {
            num_virtual_tokens: p,
            token_dim: d,
            embedding: Var::from_tensor(&init.contiguous()?)?,
            encoder: Some(encoder),
            tasks: None,
            residual: None,
        })
    }

    /// Residual prompt tuning: the raw prompt starts at `init [p, d]` and passes through a new
    /// shared bottleneck MLP of width `bottleneck` with LayerNorm and a skip connection
    /// (see [`residual`]; torch's default initialisation drawn from `rng`).
    pub fn residual(init: &Tensor, bottleneck: usize, rng: &mut StdRng) -> Result<Self> {
        let (p, d) = dims_of(init)?;
        let mlp = ResidualMlp::new(d, bottleneck, init.dtype(), init.device(), rng)?;
        Ok(Self {
            num_virtual_tokens: p,
            token_dim: d,
            embedding: Var::from_tensor(&init.contiguous()?)?,
            encoder: None,
            tasks: None,
            residual: Some(mlp),
        })
    }

    /// The residual reparameterisation, if any.
    pub fn residual_mlp(&self) -> Option<&ResidualMlp> {
        self.residual.as_ref()
    }

    /// Prompt tuning without an encoder, p-tuning with one.
    pub fn new(init: &Tensor, encoder: Option<&EncoderSpec>, rng: &mut StdRng) -> Result<Self> {
        match encoder {
            None => Self::prompt_tuning(init),
            Some(spec) => Self::p_tuning(init, spec, rng),
        }
    }

    /// Number of virtual tokens `p`.
    pub fn num_virtual_tokens(&self) -> usize {
        self.num_virtual_tokens
    }

    /// Embedding width `d` (the model's hidden size).
    pub fn token_dim(&self) -> usize {
        self.token_dim
    }

    /// The virtual-token embedding `[p, d]`.
    pub fn embedding(&self) -> &Var {
        &self.embedding
    }

    /// The p-tuning encoder, if any.
    pub fn encoder(&self) -> Option<&PromptEncoder> {
        self.encoder.as_ref()
    }

    /// Whether this is p-tuning (has an encoder).
    pub fn is_p_tuning(&self) -> bool {
        self.encoder.is_some()
    }

    /// The per-task factors of a multitask prompt.
    pub fn task_factors(&self) -> Option<&TaskFactors> {
        self.tasks.as_ref()
    }

    /// Number of tasks (1 unless multitask).
    pub fn num_tasks(&self) -> usize {
        self.tasks.as_ref().map_or(1, TaskFactors::num_tasks)
    }

    /// Rows of [`SoftPrompt::forward`]: `num_tasks · num_virtual_tokens`.
    pub fn num_prompt_rows(&self) -> usize {
        self.num_tasks() * self.num_virtual_tokens
    }

    /// The prompt matrix `P` as a differentiable graph over [`SoftPrompt::vars`] (no dropout):
    /// `[p, d]`, or for a multitask prompt every task's prompt stacked, `[tasks·p, d]`.
    pub fn forward(&self) -> Result<Tensor> {
        let e = self.embedding.as_tensor();
        match (&self.encoder, &self.tasks, &self.residual) {
            (Some(enc), _, _) => enc.forward(e),
            (None, Some(tasks), _) => tasks.apply(e),
            (None, None, Some(mlp)) => mlp.forward(e),
            (None, None, None) => Ok(e.clone()),
        }
    }

    /// Like [`SoftPrompt::forward`], with the LSTM encoder's inter-layer dropout (training mode).
    pub fn forward_train(&self, rng: &mut StdRng) -> Result<Tensor> {
        match &self.encoder {
            Some(enc) => enc.forward_train(self.embedding.as_tensor(), rng),
            None => self.forward(),
        }
    }

    /// The prompt `[p, d]` of task `task` (the only prompt unless multitask; then `task` must be
    /// below [`SoftPrompt::num_tasks`]).
    pub fn task_prompt(&self, task: usize) -> Result<Tensor> {
        if task >= self.num_tasks() {
            bail!(
                "task id {task} is out of range: the prompt has {} tasks (0..{})",
                self.num_tasks(),
                self.num_tasks()
            );
        }
        Ok(self
            .forward()?
            .narrow(0, task * self.num_virtual_tokens, self.num_virtual_tokens)?)
    }

    /// What PEFT saves: `prompt_embeddings` (the prompt `[p, d]`; for p-tuning the encoder's
    /// output, for residual prompt tuning `P'`, for a multitask prompt the shared prompt) and
    /// the other tensors of the file (a multitask prompt's factors), detached copies.
    pub fn peft_tensors(&self) -> Result<(Tensor, Vec<(String, Tensor)>)> {
        match &self.tasks {
            None => Ok((self.forward()?.detach(), Vec::new())),
            Some(tasks) => {
                let extra = tasks
                    .vars()
                    .into_iter()
                    .map(|(n, v)| Ok((n, v.as_detached_tensor().copy()?)))
                    .collect::<Result<_>>()?;
                Ok((self.embedding.as_detached_tensor().copy()?, extra))
            }
        }
    }

    /// Every learnable parameter with PEFT's name, embedding first, then the encoder in torch's
    /// parameter order (or a multitask prompt's factors).
    pub fn vars(&self) -> Vec<(String, Var)> {
        match (&self.encoder, &self.tasks) {
            (Some(enc), _) => {
                let mut out = vec![(P_TUNING_EMBEDDING.to_string(), self.embedding.clone())];
                out.extend(enc.vars());
                out
            }
            (None, tasks) => {
                let name = match &self.residual {
                    Some(_) => RESIDUAL_EMBEDDING,
                    None => PROMPT_EMBEDDINGS,
                };
                let mut out = vec![(name.to_string(), self.embedding.clone())];
                out.extend(tasks.iter().flat_map(TaskFactors::vars));
                out.extend(self.residual.iter().flat_map(ResidualMlp::vars));
                out
            }
        }
    }

    /// Copies of every parameter's current value, named as [`SoftPrompt::vars`].
    /// (Copies: later training steps do not change them.)
    pub fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        self.vars()
            .into_iter()
            .map(|(n, v)| Ok((n, v.as_detached_tensor().copy()?)))
            .collect()
    }

    /// Total number of learnable scalars.
    pub fn num_parameters(&self) -> usize {
        self.vars().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Restores every parameter from `tensors` (names as [`SoftPrompt::vars`]; other entries are
    /// ignored). The [`Var`]s keep their identity, so an optimiser holding them sees the new
    /// values. Nothing changes when a name is missing or a shape differs.
    pub fn set_from(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let vars = self.vars();
        let mut values = Vec::with_capacity(vars.len());
        for (name, var) in &vars {
            let t = tensors
                .get(name)
                .with_context(|| format!("tensor `{name}` is missing (needed to restore the prompt)"))?;
            if t.dims() != var.dims() {
                bail!("tensor `{name}` has shape {:?}, expected {:?}", t.dims(), var.dims());
            }
            let t = t.to_dtype(var.dtype())?.to_device(var.device())?;
            values.push(t);
        }
        for ((_, var), t) in vars.iter().zip(values) {
            var.set(&t)?;
        }
        Ok(())
    }
}

fn dims_of(init: &Tensor) -> Result<(usize, usize)> {
    let (p, d) = init.dims2().with_context(|| {
        format!(
            "the initial prompt should be a matrix [p, d], got shape {:?}",
            init.dims()
        )
    })?;
    if p == 0 || d == 0 {
        bail!("the initial prompt has shape [{p}, {d}]; both sizes must be at least 1");
    }
    Ok((p, d))
}
