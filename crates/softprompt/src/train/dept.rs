//! DePT (Shi & Lipani 2024, "DePT: Decomposed Prompt Tuning"): a shorter prompt `P [p', d]`
//! prepended (or placed) as in prompt tuning, plus a low-rank update `A·B` (`A [max_len, r]`,
//! `B [r, d]`) added to the embeddings of the input: row `j` of `A·B` to the `j`-th real
//! (not virtual) prompt token of every row ([`crate::batch::add_input_update`]). The frozen
//! word embeddings stay frozen; targets and generated tokens get no update.
//!
//! `A` starts small and random (N(0, 1/r), see [`DeptPrompt::new`]) and `B` at zero, so the
//! update starts at 0 and training starts from plain prompt tuning. The trainer sees one
//! learned tensor, `[P; A·B]` (`[p' + max_len, d]`): the model forward splits it, the gradient
//! is the prompt's splice gradient stacked on the input positions' gradient, and candle's
//! autograd through `sum([P; A·B] ⊙ d)` gives `dA`, `dB`.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use rand::rngs::StdRng;
use std::collections::HashMap;

use super::learned::LearnedPrompt;
use super::Prepared;
use crate::adapter::{PeftConfig, TaskType, DEPT_A, DEPT_B};
use crate::backbone::{Backbone, BackboneInput, KvCache, Tape};
use crate::batch::{add_input_update, input_update_gradient, prompt_gradient, splice_embeddings, Batch};
use crate::prompt::init::normal;
use crate::prompt::{PromptInit, SoftPrompt};

/// The prompt and the low-rank pair of a DePT run.
#[derive(Debug, Clone)]
pub struct DeptPrompt {
    prompt: SoftPrompt,
    a: Var,
    b: Var,
}

impl DeptPrompt {
    /// The prompt starting at `init [p', d]`; `A [max_len, rank]` drawn from N(0, 1/rank) with
    /// `rng`, `B [rank, d]` zero, so `A·B` starts at 0 (the LoRA convention: one factor small
    /// and random, the other zero).
    pub fn new(init: &Tensor, max_len: usize, rank: usize, rng: &mut StdRng) -> Result<Self> {
        if rank == 0 || max_len == 0 {
            bail!("DePT needs dept_rank ≥ 1 and max_len ≥ 1 (got {rank} and {max_len})");
        }
        let prompt = SoftPrompt::prompt_tuning(init)?;
        let d = prompt.token_dim();
        let scale = 1.0 / (rank as f64).sqrt();
        let a: Vec<f64> = normal(rng, max_len * rank).into_iter().map(|x| x * scale).collect();
        let a = Tensor::from_vec(a, (max_len, rank), init.device())?.to_dtype(init.dtype())?;
        let b = Tensor::zeros((rank, d), init.dtype(), init.device())?;
        Ok(Self {
            prompt,
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
        })
    }

    /// The prompt part.
    pub fn prompt(&self) -> &SoftPrompt {
        &self.prompt
    }

    /// `A·B` `[max_len, d]`, a graph over `A` and `B`.
    pub fn update(&self) -> Result<Tensor> {
        Ok(self.a.as_tensor().matmul(self.b.as_tensor())?)
    }

    fn rows(&self) -> usize {
        self.a.dims()[0]
    }
}

impl LearnedPrompt for DeptPrompt {
    fn forward(&self) -> Result<Tensor> {
        Ok(Tensor::cat(&[&self.prompt.forward()?, &self.update()?], 0)?)
    }
    fn forward_train(&self, _rng: &mut StdRng) -> Result<Tensor> {
        LearnedPrompt::forward(self)
    }
    fn vars(&self) -> Vec<(String, Var)> {
        let mut out = self.prompt.vars();
        out.push((DEPT_A.to_string(), self.a.clone()));
        out.push((DEPT_B.to_string(), self.b.clone()));
        out
    }
    fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        LearnedPrompt::vars(self)
            .into_iter()
            .map(|(n, v)| Ok((n, v.as_detached_tensor().copy()?)))
            .collect()
    }
    fn set_from(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let mut values = Vec::new();
        for (name, var) in [(DEPT_A, &self.a), (DEPT_B, &self.b)] {
            let t = tensors
                .get(name)
                .with_context(|| format!("tensor `{name}` is missing (needed to restore DePT's update)"))?;
            if t.dims() != var.dims() {
                bail!("tensor `{name}` has shape {:?}, expected {:?}", t.dims(), var.dims());
            }
            values.push(t.to_dtype(var.dtype())?.to_device(var.device())?);
        }
        self.prompt.set_from(tensors)?;
        self.a.set(&values[0])?;
        self.b.set(&values[1])?;
        Ok(())
    }
    fn device(&self) -> Device {
        self.prompt.embedding().device().clone()
    }
    fn model_forward(&self, model: &dyn Backbone, batch: &Batch, learned: &Tensor) -> Result<(Tensor, Tape)> {
        let p = self.prompt.num_virtual_tokens();
        let prompt = learned.narrow(0, 0, p)?;
        let update = learned.narrow(0, p, self.rows())?;
        let embeds = splice_embeddings(model, batch, Some(&prompt))?;
        let embeds = add_input_update(batch, &embeds, &update)?;
        model.forward_train(&BackboneInput::new(&embeds, &batch.mask))
    }
    fn gradient(&self, model: &dyn Backbone, batch: &Batch, tape: &Tape, d_hidden: &Tensor) -> Result<Tensor> {
        let d_embeds = model.backward(tape, d_hidden)?;
        let d_prompt = prompt_gradient(batch, &d_embeds, self.prompt.num_virtual_tokens())?;
        let d_update = input_update_gradient(batch, &d_embeds, self.rows())?;
        Ok(Tensor::cat(&[&d_prompt, &d_update], 0)?)
    }
    fn eval_parts(&self, _model: &dyn Backbone) -> Result<(Option<Tensor>, Option<KvCache>)> {
        Ok((Some(self.prompt.forward()?.detach()), None))
    }
    fn input_update(&self) -> Result<Option<Tensor>> {
        Ok(Some(self.update()?.detach()))
    }
    fn lr_scale(&self, name: &str, cfg: &crate::config::TrainConfig) -> f64 {
        if name == DEPT_A || name == DEPT_B {
            cfg.dept_lr / cfg.lr
        } else {
            1.0
        }
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
        Ok((
            self.prompt.forward()?.detach(),
            vec![
                (DEPT_A.to_string(), self.a.as_detached_tensor().copy()?),
                (DEPT_B.to_string(), self.b.as_detached_tensor().copy()?),
            ],
        ))
    }
}
