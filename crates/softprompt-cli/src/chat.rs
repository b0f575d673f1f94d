//! Chat messages → prompt text with the model's own Jinja chat template (GGUF
//! `tokenizer.chat_template`), rendered by minijinja as transformers' `apply_chat_template` does
//! (`messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`).

use anyhow::{bail, Context, Result};
use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};
use softprompt::backbone::LoadedModel;

/// One chat message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, …
    pub role: String,
    /// The text.
    pub content: String,
}

/// Renders `messages` with the model's chat template, ending with the assistant's turn.
pub fn render(model: &LoadedModel, messages: &[ChatMessage]) -> Result<String> {
    let template = model
        .chat_template
        .as_deref()
        .context("the model has no chat template (GGUF tokenizer.chat_template)")?;
    if messages.is_empty() {
        bail!("`messages` is empty");
    }
    let mut env = Environment::new();
    env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_template("chat", template)
        .context("the model's chat template is not valid Jinja")?;
    let token = |id: Option<u32>| id.and_then(|i| model.tokenizer.id_to_token(i)).unwrap_or_default();
    let ctx = minijinja::context! {
        messages => messages,
        add_generation_prompt => true,
        bos_token => token(model.tokenizer.bos_id()),
        eos_token => token(model.tokenizer.eos_id()),
    };
    env.get_template("chat")?
        .render(ctx)
        .context("cannot render the chat template")
}
