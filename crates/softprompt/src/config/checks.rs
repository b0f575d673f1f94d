//! The checks of a configuration on its own: every option's range, the options that belong
//! together, and the run's templates. Pure functions of the options, but for one small file:
//! with `init = "from"`, the `adapter_config.json` of `init_from` (its kind of prompt and its
//! length must be this run's). Neither the data nor the model is read.

use anyhow::{bail, Context, Result};

use super::{option, spelling, InitKind, Method, TaskKind, TrainConfig};
use crate::adapter::{PeftConfig, ADAPTER_CONFIG};
use crate::template::Template;

/// Every whole-number option: its name, its least value and what it counts. The one table
/// behind the range checks of [`TrainConfig::validate`] and the messages of the flags' parser
/// (`--steps -1` is refused naming the same range as `steps = 0` in a file).
pub const WHOLE_NUMBER_OPTIONS: &[(&str, u64, &str)] = &[
    (
        "num_virtual_tokens",
        0,
        "virtual tokens prepended when the template has none; the prefix length of a key/value prefix",
    ),
    (
        "encoder_hidden",
        1,
        "the hidden size of the p-tuning encoder and of the prefix projection",
    ),
    (
        "num_frozen_tokens",
        0,
        "leading virtual tokens of a Cartridge kept frozen",
    ),
    ("encoder_layers", 1, "the p-tuning encoder's layers"),
    (
        "residual_bottleneck",
        1,
        "the width of residual prompt tuning's bottleneck MLP",
    ),
    ("dept_rank", 1, "the rank of DePT's update of the input embeddings"),
    (
        "insert_layer",
        0,
        "the decoder layer whose input late prompt tuning's prompt replaces",
    ),
    ("init_task", 0, "the source task of init \"exact-source-task\""),
    ("num_ranks", 1, "the rank of each task's factors"),
    ("warmup", 0, "linear warm-up steps"),
    ("steps", 1, "optimiser steps"),
    ("batch", 1, "rows per micro-batch"),
    ("accumulation", 1, "micro-batches per optimiser step"),
    ("eval_every", 0, "steps between dev evaluations; 0 = only at the end"),
    ("dev_rows", 1, "dev rows to score; leave it out to use them all"),
    ("test_rows", 1, "test rows to score; leave it out to use them all"),
    ("patience", 1, "evaluations without improvement before stopping"),
    ("seed", 0, "the seed of initialisation and data order"),
    ("max_len", 1, "the longest sequence, in tokens"),
    ("eval_batch", 1, "rows per evaluation batch"),
    ("cpt_examples", 1, "training rows in CPT's context"),
];

/// The least value of whole-number option `name` and what it counts (`(0, "")` for a name
/// the table does not hold).
pub fn whole_number_range(name: &str) -> (u64, &'static str) {
    WHOLE_NUMBER_OPTIONS
        .iter()
        .find(|(n, _, _)| *n == name)
        .map_or((0, ""), |&(_, least, what)| (least, what))
}

/// The message for whole-number option `name` given `shown` (a number below its least value,
/// e.g. `0` or `-1`): ``option `steps` (--steps) is -1; it must be at least 1 (optimiser steps)``.
pub fn below_least(name: &str, shown: &str) -> String {
    let (least, what) = whole_number_range(name);
    format!("{} is {shown}; it must be at least {least} ({what})", option(name))
}

/// Refuses whole-number option `name` holding `v` below its least value.
pub(super) fn check_least(name: &str, v: usize) -> Result<()> {
    if (v as u64) < whole_number_range(name).0 {
        bail!("{}", below_least(name, &v.to_string()));
    }
    Ok(())
}

impl TrainConfig {
    /// Checks every option on its own (before the data is read or the model is loaded; with
    /// `init = "from"` the adapter config of `init_from` is read). Each message names the option
    /// as in the TOML file and as a flag, the value and what is allowed.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("batch", Some(self.batch)),
            ("accumulation", Some(self.accumulation)),
            ("eval_batch", Some(self.eval_batch)),
            ("max_len", Some(self.max_len)),
            ("steps", self.steps),
            ("dev_rows", self.dev_rows),
            ("test_rows", self.test_rows),
            ("patience", self.patience),
        ] {
            if let Some(v) = v {
                check_least(name, v)?;
            }
        }
        if let Some(n) = self.patience {
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
        if self.method == Method::PTuning || (self.method == Method::PrefixTuning && self.prefix_projection) {
            check_least("encoder_hidden", self.encoder_hidden)?;
        }
        if self.method == Method::PTuning {
            check_least("encoder_layers", self.encoder_layers)?;
            let p = self.encoder_dropout;
            in_range("encoder_dropout", p, (0.0..1.0).contains(&p), "in [0, 1)")?;
        }
        if self.method == Method::ResidualPromptTuning {
            check_least("residual_bottleneck", self.residual_bottleneck)?;
        }
        if self.method == Method::Dept {
            check_least("dept_rank", self.dept_rank)?;
            let dlr = self.dept_lr;
            in_range(
                "dept_lr",
                dlr,
                dlr.is_finite() && dlr > 0.0,
                "a finite number > 0 (the peak learning rate of DePT's A and B)",
            )?;
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
        self.check_prefix_init()?;
        self.check_multitask()?;
        self.check_cpt()?;
        self.check_verbalizer()?;
        run_template(self)?;
        self.check_init_from()?;
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
                spelling(&self.method)
            );
        }
        if !mpt && self.init.is_source_task() {
            bail!(
                "option `init` is \"{}\", a multitask source init; it needs method \
                 \"multitask-prompt-tuning\"",
                spelling(&self.init)
            );
        }
        if !mpt {
            return Ok(());
        }
        check_least("num_ranks", self.num_ranks)?;
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
                spelling(&self.init),
                option("init_from")
            );
        }
        if matches!(self.init, InitKind::AverageSourceTasks | InitKind::ExactSourceTask) && self.num_tasks() != 1 {
            bail!(
                "option `init` is \"{}\", which starts one target task (as in PEFT), but {} \
                 lists {} tasks; train one task, or use init \"only-source-shared\"",
                spelling(&self.init),
                option("tasks"),
                self.tasks.len()
            );
        }
        Ok(())
    }

    /// The inits of a key/value prefix: not the ones that fill input-embedding rows (vocab,
    /// labels), nor given keys and values (text, from) through PEFT's projection.
    fn check_prefix_init(&self) -> Result<()> {
        if !self.method.is_kv_prefix() {
            return Ok(());
        }
        let method = spelling(&self.method);
        if !self.init.applies_to_kv_prefix() {
            bail!(
                "option `init` is \"{}\", which does not apply to a key/value prefix: it fills \
                 input-embedding rows, and method `{method}` learns keys and values in every layer; \
                 use \"random-normal\" (the default of a key/value prefix when `init` is not given), \
                 \"random\", \"zero\", \"text\" (the keys and values of a prefill of `init_text`) \
                 or \"from\"",
                self.init.name()
            );
        }
        if self.method == Method::PrefixTuning
            && self.prefix_projection
            && matches!(self.init, InitKind::Text | InitKind::From)
        {
            bail!(
                "option `init` is \"{}\", but with {} the prefix passes through PEFT's projection \
                 MLP, and a projection cannot start from given keys and values (PEFT's cannot \
                 either); use init \"random-normal\" or \"zero\"",
                self.init.name(),
                option("prefix_projection")
            );
        }
        Ok(())
    }

    /// With `init = "from"`: the adapter of `init_from` must hold the kind of prompt this run
    /// learns (an input prompt, or a key/value prefix), with as many virtual tokens. Reads its
    /// `adapter_config.json`; the width is the model's, checked when the model is loaded.
    fn check_init_from(&self) -> Result<()> {
        let (InitKind::From, Some(dir)) = (self.init, &self.init_from) else {
            return Ok(());
        };
        let named = || format!("{} is {}", option("init_from"), dir.display());
        let path = dir.join(ADAPTER_CONFIG);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "{}: cannot read {} (init \"from\" starts from the prompt of an adapter folder, \
                 written by `softprompt train` or HF PEFT)",
                named(),
                path.display()
            )
        })?;
        let adapter = PeftConfig::from_json_str(&text)
            .with_context(|| format!("{}: {} is not a valid adapter config", named(), path.display()))?;
        let kind = adapter.peft_type().as_str();
        let method = spelling(&self.method);
        let holds = |prefix: bool| {
            if prefix {
                "keys and values for every layer"
            } else {
                "an input prompt"
            }
        };
        if adapter.peft_type().is_kv_prefix() != self.method.is_kv_prefix() {
            bail!(
                "{}: it holds a {kind} adapter ({}), but method `{method}` learns {}; start from an \
                 adapter of the same kind, or use another init",
                named(),
                holds(adapter.peft_type().is_kv_prefix()),
                holds(self.method.is_kv_prefix())
            );
        }
        let [rows, _] = adapter
            .prompt_embeddings_shape()
            .with_context(|| format!("{}: {}", named(), path.display()))?;
        let (want, from) = if self.method.is_kv_prefix() {
            (self.num_virtual_tokens, option("num_virtual_tokens"))
        } else {
            let t = run_template(self)?;
            let from = if Template::parse(&self.template)?.num_virtual_tokens() > 0 {
                "the template's [soft:N] tokens".to_string()
            } else {
                option("num_virtual_tokens")
            };
            (t.num_virtual_tokens(), from)
        };
        if rows != want {
            bail!(
                "{}: its {kind} prompt has {rows} virtual tokens (num_virtual_tokens {} in {}), but \
                 this run's has {want} ({from}); give the run {rows} virtual tokens, or start from \
                 an adapter with {want}",
                named(),
                adapter.num_virtual_tokens,
                path.display()
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
            spelling(&cfg.method)
        );
    }
    if cfg.num_virtual_tokens == 0 && t.num_virtual_tokens() == 0 {
        bail!(
            "{} is 0; it must be at least 1, since the template has no [soft:N] tokens and \
             the prompt (or prefix) is that many virtual tokens",
            option("num_virtual_tokens")
        );
    }
    if cfg.method == Method::LatePromptTuning && !virtual_tokens_lead(&t) {
        bail!(
            "option `template`: method `late-prompt-tuning` puts its prompt in front of the input \
             (its keys and values are computed once per adapter); write the virtual tokens as one \
             `[soft:N]` at the template's start and nowhere else, or leave them out \
             (`num_virtual_tokens` are then prepended)"
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

/// Whether the template's virtual tokens, if any, are one `[soft:N]` at its very start (the
/// layout late prompt tuning's readers rebuild: [`crate::template::Template::without_leading_soft`]).
fn virtual_tokens_lead(t: &Template) -> bool {
    let soft: Vec<usize> = t
        .segments()
        .iter()
        .enumerate()
        .filter(|(_, s)| matches!(s, crate::template::Segment::Soft { .. }))
        .map(|(i, _)| i)
        .collect();
    soft.is_empty() || (soft == [0] && t.without_leading_soft().is_some())
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
