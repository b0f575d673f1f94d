//! The checks of a configuration on its own: every option's range, the options that belong
//! together, and the run's templates. Pure functions of the options: no file is read.

use anyhow::{bail, Context, Result};

use super::{option, InitKind, Method, TaskKind, TrainConfig};
use crate::template::Template;

impl TrainConfig {
    /// Checks every option on its own (before any file is read or the model is loaded). Each
    /// message names the option as in the TOML file and as a flag, the value and what is allowed.
    pub fn validate(&self) -> Result<()> {
        let at_least_1 = |name: &str, v: usize, what: &str| -> Result<()> {
            if v == 0 {
                bail!("{} is 0; it must be at least 1 ({what})", option(name));
            }
            Ok(())
        };
        at_least_1("batch", self.batch, "rows per micro-batch")?;
        at_least_1("accumulation", self.accumulation, "micro-batches per optimiser step")?;
        at_least_1("eval_batch", self.eval_batch, "rows per evaluation batch")?;
        at_least_1("max_len", self.max_len, "the longest sequence, in tokens")?;
        if let Some(s) = self.steps {
            at_least_1("steps", s, "optimiser steps")?;
        }
        if let Some(n) = self.dev_rows {
            at_least_1("dev_rows", n, "dev rows to score; leave it out to use them all")?;
        }
        if let Some(n) = self.test_rows {
            at_least_1("test_rows", n, "test rows to score; leave it out to use them all")?;
        }
        if let Some(n) = self.patience {
            at_least_1("patience", n, "evaluations without improvement before stopping")?;
            if self.dev.is_none() && self.tasks.iter().all(|t| t.dev.is_none()) {
                bail!(
                    "{} is {n}, but no dev set is given ({}): early stopping counts dev \
                     evaluations without improvement",
                    option("patience"),
                    option("dev")
                );
            }
        }
        if let Some(e) = self.epochs {
            if !(e.is_finite() && e > 0.0) {
                bail!(
                    "{} is {e}; it must be a finite number > 0 (passes over the training set)",
                    option("epochs")
                );
            }
        }
        let in_range = |name: &str, v: f64, ok: bool, range: &str| -> Result<()> {
            if !ok {
                bail!("{} is {v}; it must be {range}", option(name));
            }
            Ok(())
        };
        let (lr, wd, eps, clip) = (self.lr, self.weight_decay, self.adam_eps, self.clip);
        in_range(
            "lr",
            lr,
            lr.is_finite() && lr > 0.0,
            "a finite number > 0 (the peak learning rate)",
        )?;
        in_range("weight_decay", wd, wd.is_finite() && wd >= 0.0, "a finite number ≥ 0")?;
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            in_range(name, b, (0.0..1.0).contains(&b), "in [0, 1)")?;
        }
        in_range("adam_eps", eps, eps.is_finite() && eps > 0.0, "a finite number > 0")?;
        in_range(
            "clip",
            clip,
            clip.is_finite() && clip >= 0.0,
            "a finite number ≥ 0 (0 = off)",
        )?;
        if self.method == Method::PTuning {
            at_least_1(
                "encoder_hidden",
                self.encoder_hidden,
                "the p-tuning encoder's hidden size",
            )?;
            at_least_1("encoder_layers", self.encoder_layers, "the p-tuning encoder's layers")?;
            let p = self.encoder_dropout;
            in_range("encoder_dropout", p, (0.0..1.0).contains(&p), "in [0, 1)")?;
        }
        if self.resume && self.overwrite {
            bail!(
                "options `resume` (--resume) and `overwrite` (--overwrite) exclude each other: \
                 --resume continues the run in {0}, --overwrite replaces it",
                self.output.display()
            );
        }
        match self.init {
            InitKind::Text if self.init_text.as_deref().is_none_or(|t| t.trim().is_empty()) => bail!(
                "option `init` is \"text\" but {} is not given (or empty): give the text whose \
                 tokens start the prompt",
                option("init_text")
            ),
            InitKind::From if self.init_from.is_none() => bail!(
                "option `init` is \"from\" but {} is not given: give the adapter directory whose \
                 prompt starts this one",
                option("init_from")
            ),
            _ => {}
        }
        self.check_multitask()?;
        self.check_verbalizer()?;
        run_template(self)?;
        if let Some(src) = &self.baseline_template {
            check_baseline_template(src, &self.target_field)?;
        }
        Ok(())
    }

    /// The options of multitask prompt tuning: `tasks` and the source inits belong to it, its
    /// sets replace `train`/`dev`/`test`, and PEFT's AVERAGE/EXACT source inits start one task.
    fn check_multitask(&self) -> Result<()> {
        let mpt = self.method == Method::MultitaskPromptTuning;
        if !mpt && !self.tasks.is_empty() {
            bail!(
                "{} lists {} task sets, but method is `{}`; the task sets are for method \
                 \"multitask-prompt-tuning\" (--method multitask-prompt-tuning)",
                option("tasks"),
                self.tasks.len(),
                serde_json::to_value(self.method)?.as_str().unwrap_or_default()
            );
        }
        if !mpt && self.init.is_source_task() {
            bail!(
                "option `init` is \"{}\", a multitask source init; it needs method \
                 \"multitask-prompt-tuning\"",
                serde_json::to_value(self.init)?.as_str().unwrap_or_default()
            );
        }
        if !mpt {
            return Ok(());
        }
        if self.num_ranks == 0 {
            bail!(
                "{} is 0; it must be at least 1 (the rank of each task's factors)",
                option("num_ranks")
            );
        }
        if self.task == TaskKind::SeqCls {
            bail!(
                "method \"multitask-prompt-tuning\" runs on causal models here (task \"generate\" or \
                 \"classify\"); task \"seq-cls\" would share one classifier head between tasks"
            );
        }
        let given_split = self.dev.is_some() || self.test.is_some() || self.train != Self::default().train;
        if !self.tasks.is_empty() && given_split {
            bail!(
                "{} lists the data sets of every task; leave out options `train`, `dev` and `test` \
                 (each [[tasks]] table has its own train, dev and test)",
                option("tasks")
            );
        }
        if self.init.is_source_task() && self.init_from.is_none() {
            bail!(
                "option `init` is \"{}\" but {} is not given: give the source multitask adapter \
                 (its directory or its adapter_model.safetensors)",
                serde_json::to_value(self.init)?.as_str().unwrap_or_default(),
                option("init_from")
            );
        }
        if matches!(self.init, InitKind::AverageSourceTasks | InitKind::ExactSourceTask) && self.num_tasks() != 1 {
            bail!(
                "option `init` is \"{}\", which starts one target task (as in PEFT), but {} \
                 lists {} tasks; train one task, or use init \"only-source-shared\"",
                serde_json::to_value(self.init)?.as_str().unwrap_or_default(),
                option("tasks"),
                self.tasks.len()
            );
        }
        Ok(())
    }

    /// Verbaliser words must be non-empty and distinct (the one check, shared with scoring).
    fn check_verbalizer(&self) -> Result<()> {
        crate::task::check_verbalizer(&self.verbalizer, &option("verbalizer"))
    }
}

/// The template of a run: without any virtual token, `[soft:N]` is prepended (prompt tuning).
/// Refuses a template that reads no field of the rows (every row would look the same).
/// A key/value prefix (prefix tuning, Cartridges) enters every attention layer instead, so its
/// template must have no virtual tokens.
pub fn run_template(cfg: &TrainConfig) -> Result<Template> {
    let what = || option("template");
    let t = Template::parse(&cfg.template).with_context(what)?;
    if cfg.method.is_kv_prefix() && t.num_virtual_tokens() > 0 {
        bail!(
            "option `template`: method `{}` learns keys and values before the input in every layer; remove the [soft:..] tokens (`num_virtual_tokens` sets the prefix length)",
            serde_json::to_value(cfg.method)?.as_str().unwrap_or_default()
        );
    }
    if cfg.num_virtual_tokens == 0 && t.num_virtual_tokens() == 0 {
        bail!(
            "{} is 0; it must be at least 1, since the template has no [soft:N] tokens and \
             the prompt (or prefix) is that many virtual tokens",
            option("num_virtual_tokens")
        );
    }
    let t = if t.num_virtual_tokens() == 0 && !cfg.method.is_kv_prefix() {
        Template::parse(&format!("[soft:{}]{}", cfg.num_virtual_tokens, cfg.template)).with_context(what)?
    } else {
        t
    };
    let t = t.with_target(&cfg.target_field).with_context(what)?;
    check_reads_a_field(&t, "template", &cfg.target_field)?;
    Ok(t)
}

/// Refuses a template without any input field (only soft tokens and text).
fn check_reads_a_field(t: &Template, name: &str, target_field: &str) -> Result<()> {
    if t.fields().is_empty() {
        bail!(
            "{} `{}` reads no field of the rows (only the target `{target_field}`), so every row \
             would give the model the same input; add the input field, e.g. `{{text}}`",
            option(name),
            t.source()
        );
    }
    Ok(())
}

/// Checks option `baseline_template`: hand-written (no soft tokens) and reading a field.
pub fn check_baseline_template(src: &str, target_field: &str) -> Result<Template> {
    let t = Template::parse(src)
        .with_context(|| option("baseline_template"))?
        .with_target(target_field)
        .with_context(|| option("baseline_template"))?;
    if t.num_virtual_tokens() > 0 {
        bail!(
            "{} must be hand-written (no [soft:..] tokens)",
            option("baseline_template")
        );
    }
    check_reads_a_field(&t, "baseline_template", target_field)?;
    Ok(t)
}
