//! The learnable state of a run (prompt, classification head, optimiser), how it starts, and
//! how it is saved as an adapter and restored from a checkpoint.

use anyhow::{Context, Result};
use candle_core::{DType, Tensor, Var};
use rand::SeedableRng;
use std::path::Path;

use super::checkpoint::{self, Checkpoint, Progress};
use super::cpt::CptPrompt;
use super::dept::DeptPrompt;
pub use super::learned::{Learned, LearnedPrompt};
use super::optim::{AdamW, AdamWConfig};
use super::{multitask, Prepared, TaskSplit};
use crate::adapter::run_files::{self, AdapterTask, TASK_FORMAT_VERSION};
use crate::adapter::{self, MethodConfig, TaskType};
use crate::config::{InitKind, Method, TrainConfig};
use crate::loss::ClassifierHead;
use crate::prompt::init::normal;
use crate::prompt::{initial_prompt, InitSource, PromptInit, SoftPrompt};
use crate::task::{Task, TaskKind};

/// PEFT's names of the sequence-classification head.
pub const HEAD_WEIGHT: &str = adapter::CLASSIFIER_WEIGHT;
/// See [`HEAD_WEIGHT`].
pub const HEAD_BIAS: &str = adapter::CLASSIFIER_BIAS;

/// The learnable state of a run.
pub struct Learner {
    /// The soft prompt or the key/value prefix.
    pub prompt: Learned,
    /// Classification head (SeqCls).
    pub head: Option<ClassifierHead>,
    /// Optimiser.
    pub optimizer: AdamW,
    /// How the prompt was initialised (recorded in the PEFT config).
    pub init: PromptInit,
}

impl Learner {
    /// Every trainable parameter with its saved name.
    pub fn params(&self) -> Vec<(String, Var)> {
        let mut v = self.prompt.vars();
        if let Some(h) = &self.head {
            v.push((HEAD_WEIGHT.into(), h.weight.clone()));
            v.push((HEAD_BIAS.into(), h.bias.clone()));
        }
        v
    }

    /// Copies of every parameter's current value, named as [`Learner::params`], plus a
    /// Cartridge's frozen tokens (saved, never trained).
    pub fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = self.prompt.tensors()?;
        if let Some(h) = &self.head {
            for (name, var) in [(HEAD_WEIGHT, &h.weight), (HEAD_BIAS, &h.bias)] {
                out.push((name.to_string(), var.as_detached_tensor().copy()?));
            }
        }
        Ok(out)
    }

    /// Restores parameters and optimiser state from a checkpoint; returns its progress.
    pub fn restore(&mut self, checkpoint: Checkpoint, dir: &Path) -> Result<Progress> {
        let device = self.prompt.device();
        let on_device = |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(&device)?) };
        self.prompt.set_from(&checkpoint.params)?;
        if let Some(h) = &self.head {
            for (name, var) in [(HEAD_WEIGHT, &h.weight), (HEAD_BIAS, &h.bias)] {
                let t = checkpoint
                    .params
                    .get(name)
                    .with_context(|| format!("{}: `{name}` is missing", dir.display()))?;
                var.set(&on_device(t)?)?;
            }
        }
        self.optimizer.moments = checkpoint
            .moments
            .iter()
            .map(|(k, (m, v))| Ok((k.clone(), (on_device(m)?, on_device(v)?))))
            .collect::<Result<_>>()?;
        self.optimizer.step = checkpoint.optimizer_step;
        Ok(checkpoint.progress)
    }
}

/// The prompt initialisation option `init` asks for, resolved against the tasks (label texts,
/// of every task of a multitask run) and the files it names (`init_from`; a multitask source
/// adapter gives the shared prompt).
fn prompt_init(cfg: &TrainConfig, tasks: &[TaskSplit]) -> Result<PromptInit> {
    Ok(match cfg.init {
        InitKind::Random => PromptInit::Random,
        InitKind::RandomNormal => PromptInit::RandomNormal,
        InitKind::Zero => PromptInit::Zero,
        InitKind::Vocab => PromptInit::Vocab,
        InitKind::Labels => PromptInit::Labels(
            tasks
                .iter()
                .flat_map(|TaskSplit { task, .. }| {
                    let prefix = task.template.target().map(|t| t.prefix.clone()).unwrap_or_default();
                    (0..task.labels.len()).map(move |i| task.target_text(&prefix, i))
                })
                .collect(),
        ),
        InitKind::Text => PromptInit::Text(
            cfg.init_text
                .clone()
                .context("init = \"text\" needs option `init_text`")?,
        ),
        InitKind::From => {
            let dir = cfg
                .init_from
                .as_deref()
                .context("init = \"from\" needs option `init_from` (an adapter directory)")?;
            PromptInit::FromTensor(adapter::load_peft(dir)?.prompt_embeddings)
        }
        InitKind::AverageSourceTasks | InitKind::ExactSourceTask | InitKind::OnlySourceShared => {
            PromptInit::FromTensor(multitask::SourceStateDict::read(cfg)?.shared_prompt()?)
        }
    })
}

/// A fresh learner: initial prompt, encoder and head drawn from the seed.
pub fn new_learner(p: &Prepared) -> Result<Learner> {
    let cfg = &p.cfg;
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let bb = &p.model.backbone;
    let device = bb.device();
    let init = prompt_init(cfg, &p.tasks)?;
    let d = bb.info().hidden;
    // A start that does not fit this model is named by the folder it came from.
    let name_the_folder = |e: anyhow::Error| match (cfg.init, &cfg.init_from) {
        (InitKind::From, Some(dir)) => {
            e.context(format!("{} is {}", crate::config::option("init_from"), dir.display()))
        }
        _ => e,
    };
    let prompt: Learned = match (cfg.prefix_spec(), &p.cpt) {
        (None, Some(context)) => Box::new(CptPrompt::new(
            context.clone(),
            bb.embedding_table(),
            Some(cfg.model.clone()),
        )?),
        (Some(spec), _) => Box::new(super::prefix::new_prefix(p, spec, &init, &mut rng).map_err(name_the_folder)?),
        (None, None) => {
            let n = p.task().template.num_virtual_tokens();
            let start = initial_prompt(
                &init,
                n,
                d,
                InitSource::model(bb.embedding_table(), &p.model.tokenizer),
                &mut rng,
            )
            .map_err(name_the_folder)?
            .to_device(device)?;
            let mut prompt: Learned = match cfg.method {
                Method::MultitaskPromptTuning => Box::new(multitask::new_prompt(p, &start, &mut rng)?),
                Method::ResidualPromptTuning => {
                    Box::new(SoftPrompt::residual(&start, cfg.residual_bottleneck, &mut rng)?)
                }
                Method::Dept => Box::new(DeptPrompt::new(&start, cfg.max_len, cfg.dept_rank, &mut rng)?),
                Method::LatePromptTuning => Box::new(super::late_prompt::LatePrompt::new(p, &start)?),
                _ => Box::new(SoftPrompt::new(&start, cfg.encoder_spec().as_ref(), &mut rng)?),
            };
            if cfg.init == InitKind::From {
                continue_from_raw(cfg, &mut prompt)?;
            }
            prompt
        }
    };
    let head = if cfg.task == TaskKind::SeqCls {
        let c = p.task().labels.len();
        // transformers initialises classifier weights N(0, 0.02) and biases 0.
        let w: Vec<f32> = normal(&mut rng, c * d).into_iter().map(|x| (0.02 * x) as f32).collect();
        Some(ClassifierHead {
            weight: Var::from_tensor(&Tensor::from_vec(w, (c, d), device)?)?,
            bias: Var::zeros(c, DType::F32, device)?,
        })
    } else {
        None
    };
    let optimizer = AdamW::new(AdamWConfig {
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: cfg.adam_eps,
        weight_decay: cfg.weight_decay,
    });
    Ok(Learner {
        prompt,
        head,
        optimizer,
        init,
    })
}

/// With `init = "from"`: when `init_from` keeps the raw parameters of this run's kind
/// (`softprompt_prompt.safetensors` of a residual prompt or a DePT run, every name this prompt
/// has), training continues from them rather than from the saved prompt alone (a residual
/// prompt's `P'` would otherwise become its raw `P` under a new MLP; DePT's `A·B` would be
/// lost). Other adapters start the prompt from their `prompt_embeddings`, as before.
fn continue_from_raw(cfg: &TrainConfig, prompt: &mut Learned) -> Result<()> {
    if !matches!(cfg.method, Method::ResidualPromptTuning | Method::Dept) {
        return Ok(());
    }
    let Some(dir) = cfg.init_from.as_deref() else {
        return Ok(());
    };
    let file = dir.join(run_files::PROMPT_FILE);
    if !file.is_file() {
        return Ok(());
    }
    let saved: std::collections::HashMap<String, Tensor> = crate::io::read_safetensors(&file)?.into_iter().collect();
    if prompt.vars().iter().all(|(name, _)| saved.contains_key(name)) {
        prompt
            .set_from(&saved)
            .with_context(|| format!("option `init_from`: {}", file.display()))?;
    }
    Ok(())
}

/// Writes the learner as a PEFT adapter into `dir`, with softprompt's own files beside it.
pub fn save_adapter(p: &Prepared, learner: &Learner, dir: &Path) -> Result<()> {
    let task_type = if p.cfg.task == TaskKind::SeqCls {
        TaskType::SeqCls
    } else {
        TaskType::CausalLm
    };
    let mut config = learner.prompt.peft_config(p, &learner.init, task_type)?;
    config.base_model_name_or_path = Some(p.cfg.model.clone());
    if let MethodConfig::PromptTuning {
        tokenizer_name_or_path: Some(t),
        ..
    } = &mut config.method
    {
        *t = p.cfg.model.clone();
    }
    let (saved, mut extra) = learner.prompt.peft_tensors()?;
    if let Some(h) = &learner.head {
        extra.push((HEAD_WEIGHT.into(), h.weight.as_tensor().clone()));
        extra.push((HEAD_BIAS.into(), h.bias.as_tensor().clone()));
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    adapter::save_peft(dir, &config, &saved, &extra)?;
    adapter_task(p)?.write(dir)?;
    run_files::save_prompt_params(dir, &learner.tensors()?)
}

/// What `softprompt.json` records of a run: what inference needs, and the options as a record.
fn adapter_task(p: &Prepared) -> Result<AdapterTask> {
    let tasks: Vec<&Task> = p.tasks.iter().map(|t| &t.task).collect();
    let Some(task) = tasks.first() else {
        anyhow::bail!("cannot write the adapter: the run has no task");
    };
    let cfg = &p.cfg;
    Ok(AdapterTask {
        format_version: TASK_FORMAT_VERSION,
        critical: Vec::new(),
        template: task.template.source().to_string(),
        target_field: cfg.target_field.clone(),
        task: cfg.task,
        labels: task.labels.clone(),
        task_labels: if tasks.len() > 1 {
            tasks.iter().map(|t| t.labels.clone()).collect()
        } else {
            Vec::new()
        },
        verbalizer: cfg.verbalizer.clone(),
        method: cfg.method,
        num_virtual_tokens: if cfg.method.is_kv_prefix() {
            cfg.num_virtual_tokens
        } else {
            task.template.num_virtual_tokens()
        },
        model: cfg.model.clone(),
        training: serde_json::to_value(cfg)?,
        warnings: Vec::new(),
    })
}

/// Saves the full training state into `dir`.
pub fn save_checkpoint(p: &Prepared, learner: &Learner, progress: &Progress, dir: &Path) -> Result<()> {
    checkpoint::save_checkpoint(
        dir,
        learner.tensors()?,
        &learner.optimizer.moments,
        learner.optimizer.step,
        progress,
        &p.cfg,
    )
}
