//! Options given a value that the run's configuration never reads (an encoder width without an
//! encoder, `init_text` with another init, `test_rows` without a test set, ...): each is said as
//! a warning before the run starts, so that no one believes a setting took effect when it did
//! not. Values equal to the default are not mentioned (they may only have been left alone).

use super::{spelling, EncoderKind, InitKind, Method, TrainConfig};
use crate::task::TaskKind;

impl TrainConfig {
    /// One sentence per option that has a non-default value but no effect on this run.
    pub fn options_without_effect(&self) -> Vec<String> {
        let d = TrainConfig::default();
        let method = spelling(&self.method);
        let init = spelling(&self.init);
        let p_tuning = self.method == Method::PTuning;
        let lstm = p_tuning && self.encoder == EncoderKind::Lstm;
        let has_dev = self.dev.is_some() || self.tasks.iter().any(|t| t.dev.is_some());
        let has_test = self.test.is_some() || self.tasks.iter().any(|t| t.test.is_some());
        let checks: [(bool, &str, String); 17] = [
            (
                self.encoder != d.encoder && !p_tuning,
                "encoder",
                format!("only p-tuning has a prompt encoder, and method is \"{method}\""),
            ),
            (
                self.encoder_hidden != d.encoder_hidden
                    && !(p_tuning || (self.method == Method::PrefixTuning && self.prefix_projection)),
                "encoder_hidden",
                "it sizes p-tuning's encoder and prefix tuning's projection (prefix_projection = true), \
                 neither of which this run has"
                    .into(),
            ),
            (
                self.encoder_layers != d.encoder_layers && !lstm,
                "encoder_layers",
                "it counts the layers of p-tuning's `lstm` encoder (PEFT's MLP always has two)".into(),
            ),
            (
                self.encoder_dropout != d.encoder_dropout && !lstm,
                "encoder_dropout",
                "it is the dropout between the layers of p-tuning's `lstm` encoder".into(),
            ),
            (
                self.prefix_projection && self.method != Method::PrefixTuning,
                "prefix_projection",
                format!("it belongs to method \"prefix-tuning\", and method is \"{method}\""),
            ),
            (
                self.num_frozen_tokens != d.num_frozen_tokens && self.method != Method::Cartridge,
                "num_frozen_tokens",
                format!("it belongs to method \"cartridge\", and method is \"{method}\""),
            ),
            (
                self.num_ranks != d.num_ranks && self.method != Method::MultitaskPromptTuning,
                "num_ranks",
                format!("it belongs to method \"multitask-prompt-tuning\", and method is \"{method}\""),
            ),
            (
                self.residual_bottleneck != d.residual_bottleneck && self.method != Method::ResidualPromptTuning,
                "residual_bottleneck",
                format!("it belongs to method \"residual-prompt-tuning\", and method is \"{method}\""),
            ),
            (
                self.dept_rank != d.dept_rank && self.method != Method::Dept,
                "dept_rank",
                format!("it belongs to method \"dept\", and method is \"{method}\""),
            ),
            (
                self.dept_lr != d.dept_lr && self.method != Method::Dept,
                "dept_lr",
                format!("it belongs to method \"dept\", and method is \"{method}\""),
            ),
            (
                self.insert_layer.is_some() && self.method != Method::LatePromptTuning,
                "insert_layer",
                format!("it belongs to method \"late-prompt-tuning\", and method is \"{method}\""),
            ),
            (
                self.cache_lower_layers.is_some() && self.method != Method::LatePromptTuning,
                "cache_lower_layers",
                format!("it belongs to method \"late-prompt-tuning\", and method is \"{method}\""),
            ),
            (
                self.init_text.is_some() && self.init != InitKind::Text,
                "init_text",
                format!("it is read by init \"text\", and init is \"{init}\""),
            ),
            (
                self.init_from.is_some() && self.init != InitKind::From,
                "init_from",
                format!("it is read by init \"from\", and init is \"{init}\""),
            ),
            (
                self.dev_rows.is_some() && !has_dev,
                "dev_rows",
                "no dev set is given (option `dev`)".into(),
            ),
            (
                self.test_rows.is_some() && !has_test,
                "test_rows",
                "no test set is given (option `test`)".into(),
            ),
            (
                !self.verbalizer.is_empty() && self.task != TaskKind::Classify,
                "verbalizer",
                "it maps labels to words for task \"classify\" only".into(),
            ),
        ];
        checks
            .into_iter()
            .filter(|(applies, _, _)| *applies)
            .map(|(_, name, why)| (name, why))
            .chain(self.cpt_options_without_effect())
            .map(|(name, why)| format!("{} is set but has no effect: {why}", super::option(name)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_the_run_never_reads_are_named_and_defaults_are_not() {
        assert!(TrainConfig::default().options_without_effect().is_empty());
        let cfg = TrainConfig {
            encoder_hidden: 64,
            init_text: Some("hello".into()),
            test_rows: Some(5),
            num_frozen_tokens: 3,
            ..TrainConfig::default()
        };
        let said = cfg.options_without_effect();
        assert_eq!(said.len(), 4, "{said:#?}");
        assert!(said[0].starts_with("option `encoder_hidden` (--encoder-hidden) is set but has no effect"));
        assert!(said
            .iter()
            .any(|s| s.contains("`init_text`") && s.contains("init is \"vocab\"")));
        assert!(said
            .iter()
            .any(|s| s.contains("`test_rows`") && s.contains("no test set")));
        assert!(said
            .iter()
            .any(|s| s.contains("`num_frozen_tokens`") && s.contains("\"cartridge\"")));
        let used = TrainConfig {
            method: Method::PTuning,
            encoder_hidden: 64,
            ..TrainConfig::default()
        };
        assert!(used.options_without_effect().is_empty());
    }
}
