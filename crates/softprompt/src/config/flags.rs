//! The value parser of whole-number flags (with the `cli` feature): a value that is not a whole
//! number in range (`--steps -1`, `--batch 2.5`, `--max-tokens -5`) is refused before anything
//! runs, naming the option and its range (for the training options, in the words of
//! [`TrainConfig::validate`](super::TrainConfig::validate), from the same table) instead of
//! clap's "invalid digit found in string".

use std::ffi::OsStr;
use std::marker::PhantomData;

use super::checks::{below_least, whole_number_range};
use super::option;

/// The parser of one whole-number flag, for `#[arg(value_parser = ...)]`: its values are `T`
/// (`usize` or `u64`).
#[derive(Debug)]
pub struct WholeNumber<T> {
    /// How messages name the option: ``option `steps` (--steps)`` or `--max-tokens`.
    label: String,
    /// The training option's name, whose message [`below_least`] words (`None` for a flag of
    /// one command).
    option: Option<&'static str>,
    /// The least value.
    least: u64,
    /// What the option counts, said in messages.
    what: &'static str,
    /// Whether a whole number below `least` is refused here. A training option leaves it to
    /// [`TrainConfig::validate`](super::TrainConfig::validate), which says the same of a TOML
    /// file's value.
    refuse_below: bool,
    /// The value type.
    value: PhantomData<fn() -> T>,
}

impl<T> Clone for WholeNumber<T> {
    fn clone(&self) -> Self {
        Self {
            label: self.label.clone(),
            option: self.option,
            least: self.least,
            what: self.what,
            refuse_below: self.refuse_below,
            value: PhantomData,
        }
    }
}

impl<T> WholeNumber<T> {
    /// The parser of training option `name` (a field of
    /// [`TrainConfig`](super::TrainConfig)): refuses what is not a whole number (a negative
    /// number, a fraction, a word, a number too large), naming the option's range.
    pub fn option(name: &'static str) -> Self {
        let (least, what) = whole_number_range(name);
        Self {
            label: option(name),
            option: Some(name),
            least,
            what,
            refuse_below: false,
            value: PhantomData,
        }
    }

    /// The parser of `flag` (as written, `--max-tokens`), a flag of one command: refuses what
    /// is not a whole number of at least `least`; `what` says what it counts.
    pub fn flag(flag: &'static str, least: u64, what: &'static str) -> Self {
        Self {
            label: flag.to_string(),
            option: None,
            least,
            what,
            refuse_below: true,
            value: PhantomData,
        }
    }

    /// Leaves a whole number below the least to the command's own check (which words it for
    /// its command); negative numbers and what is not a whole number are still refused here.
    pub fn least_checked_later(mut self) -> Self {
        self.refuse_below = false;
        self
    }

    /// The message for a value below the least.
    fn below(&self, shown: &str) -> String {
        match self.option {
            Some(name) => below_least(name, shown),
            None => format!(
                "{} is {shown}; it must be at least {} ({})",
                self.label, self.least, self.what
            ),
        }
    }
}

impl<T: TryFrom<u64>> WholeNumber<T> {
    /// Parses `text`; the error is the message.
    pub fn parse_text(&self, text: &str) -> Result<T, String> {
        let not_whole = || {
            format!(
                "{} is `{text}`; it must be a whole number, at least {} ({})",
                self.label, self.least, self.what
            )
        };
        let n: i128 = match text.trim().parse() {
            Ok(n) => n,
            // A negative number too long for i128 is still below the least.
            Err(_)
                if text
                    .trim()
                    .strip_prefix('-')
                    .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit())) =>
            {
                return Err(self.below(text.trim()))
            }
            Err(_) if !text.trim().is_empty() && text.trim().bytes().all(|b| b.is_ascii_digit()) => {
                return Err(format!("{} is {text}, too large a number ({})", self.label, self.what))
            }
            Err(_) => return Err(not_whole()),
        };
        if n < 0 || (self.refuse_below && n < i128::from(self.least)) {
            return Err(self.below(text.trim()));
        }
        u64::try_from(n)
            .ok()
            .and_then(|n| T::try_from(n).ok())
            .ok_or_else(|| format!("{} is {text}, too large a number ({})", self.label, self.what))
    }
}

impl<T: TryFrom<u64> + Clone + Send + Sync + 'static> clap::builder::TypedValueParser for WholeNumber<T> {
    type Value = T;

    fn parse_ref(&self, _cmd: &clap::Command, _arg: Option<&clap::Arg>, value: &OsStr) -> Result<T, clap::Error> {
        let text = value.to_string_lossy();
        self.parse_text(&text)
            .map_err(|message| clap::Error::raw(clap::error::ErrorKind::ValueValidation, format!("{message}\n")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_fractional_and_huge_values_name_the_option_and_its_range() {
        let steps = WholeNumber::<usize>::option("steps");
        assert_eq!(steps.parse_text("7"), Ok(7));
        // Zero is left to validate (the same words as for a file's `steps = 0`).
        assert_eq!(steps.parse_text("0"), Ok(0));
        assert_eq!(
            steps.parse_text("-1").unwrap_err(),
            "option `steps` (--steps) is -1; it must be at least 1 (optimiser steps)"
        );
        assert!(steps
            .parse_text("2.5")
            .unwrap_err()
            .contains("must be a whole number, at least 1"));
        assert!(steps
            .parse_text("-99999999999999999999999999999999999999999")
            .unwrap_err()
            .contains("at least 1"));
        assert!(steps
            .parse_text("99999999999999999999999")
            .unwrap_err()
            .contains("too large"));
        let seed = WholeNumber::<u64>::option("seed");
        assert_eq!(seed.parse_text("18446744073709551615"), Ok(u64::MAX));
        assert!(seed.parse_text("-3").unwrap_err().contains("it must be at least 0"));
        let flag = WholeNumber::<usize>::flag("--max-tokens", 1, "the most tokens to generate");
        assert_eq!(
            flag.parse_text("0").unwrap_err(),
            "--max-tokens is 0; it must be at least 1 (the most tokens to generate)"
        );
        assert_eq!(
            flag.parse_text("-5").unwrap_err(),
            "--max-tokens is -5; it must be at least 1 (the most tokens to generate)"
        );
        assert_eq!(flag.parse_text("3"), Ok(3));
    }

    /// Every whole-number field of the configuration has a row in the table.
    #[test]
    fn every_whole_number_option_has_a_range() {
        for (name, _, what) in super::super::checks::WHOLE_NUMBER_OPTIONS {
            assert!(!what.is_empty(), "{name}");
        }
        let full = serde_json::to_value(super::super::TrainConfig {
            steps: Some(1),
            dev_rows: Some(1),
            test_rows: Some(1),
            patience: Some(1),
            ..Default::default()
        })
        .unwrap();
        for (name, value) in full.as_object().unwrap() {
            if value.is_u64() {
                assert!(
                    !whole_number_range(name).1.is_empty(),
                    "option `{name}` is missing from WHOLE_NUMBER_OPTIONS"
                );
            }
        }
    }
}
