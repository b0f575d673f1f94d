//! `softprompt tokenize`: a text's token ids and pieces, as JSON.

use anyhow::Result;
use clap::Args;

use crate::args::ModelArg;

/// Arguments of `tokenize`.
#[derive(Args)]
pub struct TokenizeArgs {
    /// The model whose tokenizer to use.
    #[command(flatten)]
    model: ModelArg,
    /// Text to tokenize.
    text: String,
    /// Add the tokenizer's special tokens (BOS, [CLS]/[SEP]).
    #[arg(long)]
    special: bool,
}

/// Runs `tokenize`.
pub fn tokenize(args: TokenizeArgs) -> Result<()> {
    let model = args.model.load()?;
    let ids = model.tokenizer.encode(&args.text, args.special)?;
    let pieces: Vec<String> = ids
        .iter()
        .map(|&id| model.tokenizer.id_to_token(id).unwrap_or_default())
        .collect();
    println!("{}", serde_json::json!({ "ids": ids, "tokens": pieces }));
    Ok(())
}
