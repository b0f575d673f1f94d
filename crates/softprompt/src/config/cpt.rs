//! The options of CPT (context-aware prompt tuning): their checks, and the warnings for those
//! set without effect.

use anyhow::{bail, Result};

use super::{option, spelling, CptLossWeighting, Method, TaskKind, TrainConfig};
use crate::template::Template;

impl TrainConfig {
    /// With method `cpt`: at least one context row, bounds and the decay factor finite and ≥ 0,
    /// a causal task, and a template without virtual tokens (the context is the prompt, put in
    /// front of the template).
    pub(super) fn check_cpt(&self) -> Result<()> {
        if self.method != Method::Cpt {
            return Ok(());
        }
        super::checks::check_least("cpt_examples", self.cpt_examples)?;
        for (name, v) in [
            ("cpt_loss_decay_factor", self.cpt_loss_decay_factor),
            ("cpt_projection_epsilon", self.cpt_projection_epsilon),
            ("cpt_projection_format_epsilon", self.cpt_projection_format_epsilon),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                bail!("{} is {v}; it must be a finite number ≥ 0", option(name));
            }
        }
        if self.task == TaskKind::SeqCls {
            bail!(
                "method \"cpt\" learns a context of examples for a causal language model (PEFT's CPT \
                 is CAUSAL_LM only); use task \"classify\" or \"generate\""
            );
        }
        if let Ok(t) = Template::parse(&self.template) {
            if t.num_virtual_tokens() > 0 {
                bail!(
                    "option `template`: method \"cpt\" puts its context of {} training rows in front of \
                     the template; remove the [soft:..] tokens",
                    self.cpt_examples
                );
            }
        }
        Ok(())
    }

    /// The CPT options set to a value this run never reads, and the options CPT does not read.
    pub(super) fn cpt_options_without_effect(&self) -> Vec<(&'static str, String)> {
        let d = TrainConfig::default();
        let cpt = self.method == Method::Cpt;
        let not_cpt = || {
            format!(
                "it belongs to method \"cpt\", and method is \"{}\"",
                spelling(&self.method)
            )
        };
        let mut out = Vec::new();
        for (set, name) in [
            (self.cpt_examples != d.cpt_examples, "cpt_examples"),
            (self.cpt_weighted_loss != d.cpt_weighted_loss, "cpt_weighted_loss"),
            (
                self.cpt_loss_decay_factor != d.cpt_loss_decay_factor,
                "cpt_loss_decay_factor",
            ),
            (
                self.cpt_projection_epsilon != d.cpt_projection_epsilon,
                "cpt_projection_epsilon",
            ),
            (
                self.cpt_projection_format_epsilon != d.cpt_projection_format_epsilon,
                "cpt_projection_format_epsilon",
            ),
        ] {
            if set && !cpt {
                out.push((name, not_cpt()));
            }
        }
        if cpt && self.init != d.init {
            out.push((
                "init",
                "method \"cpt\" starts from the embeddings of its context's tokens".to_string(),
            ));
        }
        if cpt && self.num_virtual_tokens != d.num_virtual_tokens {
            out.push((
                "num_virtual_tokens",
                "with method \"cpt\" the context's tokens are the virtual tokens (option `cpt_examples`)".to_string(),
            ));
        }
        if cpt
            && self.cpt_loss_decay_factor != d.cpt_loss_decay_factor
            && self.cpt_weighted_loss != CptLossWeighting::Decay
        {
            out.push((
                "cpt_loss_decay_factor",
                "it is read by cpt_weighted_loss \"decay\"".to_string(),
            ));
        }
        out
    }
}
