//! Text ↔ token ids.
//!
//! [`TextTokenizer`] wraps a Hugging Face [`tokenizers::Tokenizer`] and can be built either from a
//! `tokenizer.json` file or from the `tokenizer.ggml.*` metadata of a GGUF model file:
//!
//! - `tokenizer.ggml.model == "gpt2"`: byte-level BPE with the merges stored in the file; the
//!   pre-tokenizer is chosen by `tokenizer.ggml.pre` (the same splits llama.cpp uses);
//! - `tokenizer.ggml.model == "llama"`: SentencePiece-style BPE with byte fallback, merges derived
//!   from `tokenizer.ggml.scores`, the same tokenizer transformers' GGUF converter builds.
//!
//! Every error names the file it came from and what is wrong; malformed input never panics.

use crate::gguf::GgufFile;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;
use std::path::Path;
use tokenizers::Tokenizer;

mod gguf_vocab;
use gguf_vocab::GgufVocab;

/// A text tokenizer: text → token ids and back, plus the special token ids a model needs.
pub struct TextTokenizer {
    inner: Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
}

/// Reads `path` as JSON, if the file exists.
fn read_optional_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let v = serde_json::from_slice(&bytes).with_context(|| format!("{} is not valid JSON", path.display()))?;
    Ok(Some(v))
}

impl TextTokenizer {
    /// Builds the tokenizer stored in a GGUF file's `tokenizer.ggml.*` metadata.
    ///
    /// Supports `tokenizer.ggml.model` `gpt2` (byte-level BPE; pre-tokenizer from
    /// `tokenizer.ggml.pre`) and `llama` (SentencePiece BPE with byte fallback). Control and
    /// user-defined tokens of a `gpt2` vocabulary, and control tokens of a `llama` one, become
    /// special tokens that are matched whole in the text. `encode(.., true)` adds BOS/EOS as
    /// `tokenizer.ggml.add_bos_token` / `add_eos_token` say (defaults: gpt2 none, llama BOS).
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let file = gguf.path().display().to_string();
        let vocab = GgufVocab::read(gguf).with_context(|| format!("cannot read the tokenizer of {file}"))?;
        vocab.build(&file)
    }

    /// Loads a Hugging Face `tokenizer.json`.
    ///
    /// Padding and truncation settings stored in the file are dropped, so `encode` returns every
    /// token of the text. BOS/EOS/PAD ids come from `special_tokens_map.json` or
    /// `tokenizer_config.json` next to the file when present (`bos_token`, else `cls_token`;
    /// `eos_token`, else `sep_token`; `pad_token`), then from the file's padding settings, then
    /// from well-known token names (`<s>`, `</s>`, `<pad>`, `[CLS]`, `[SEP]`, `[PAD]`, …).
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read tokenizer file {}", path.display()))?;
        let mut inner = Tokenizer::from_bytes(&bytes)
            .map_err(|e| anyhow!("{} is not a valid tokenizer.json: {e}", path.display()))?;
        let padding_id = inner.get_padding().map(|p| p.pad_id);
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| anyhow!("{}: cannot disable truncation: {e}", path.display()))?;

        let dir = path.parent().unwrap_or(Path::new("."));
        let mut named: HashMap<String, String> = HashMap::new();
        for name in ["tokenizer_config.json", "special_tokens_map.json"] {
            let Some(serde_json::Value::Object(map)) = read_optional_json(&dir.join(name))? else {
                continue;
            };
            for (k, v) in map {
                let content = match &v {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
                    _ => None,
                };
                if let Some(c) = content {
                    named.insert(k, c);
                }
            }
        }
        let lookup = |keys: &[&str], fallbacks: &[&str]| -> Option<u32> {
            keys.iter()
                .filter_map(|k| named.get(*k))
                .find_map(|t| inner.token_to_id(t))
                .or_else(|| fallbacks.iter().find_map(|t| inner.token_to_id(t)))
        };
        let bos = lookup(
            &["bos_token", "cls_token"],
            &["<|begin_of_text|>", "<s>", "<bos>", "[CLS]"],
        );
        let eos = lookup(
            &["eos_token", "sep_token"],
            &["<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>", "[SEP]"],
        );
        let pad = lookup(&["pad_token"], &[])
            .or(padding_id)
            .or_else(|| lookup(&[], &["<pad>", "[PAD]", "<|pad|>"]));
        Ok(Self { inner, bos, eos, pad })
    }

    /// Text → token ids; with `add_special`, also the BOS/EOS (or `[CLS]`/`[SEP]`) the tokenizer
    /// adds around a sequence. Special tokens written in the text (e.g. `<|im_start|>`) are
    /// always recognised as single ids.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| anyhow!("cannot tokenize text of {} bytes: {e}", text.len()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids → text; with `skip_special`, special tokens are left out. An id outside the
    /// vocabulary is an error.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        if let Some(&bad) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            bail!(
                "cannot decode token id {bad}: the vocabulary has {} tokens",
                self.vocab_size()
            );
        }
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| anyhow!("cannot decode {} token ids: {e}", ids.len()))
    }

    /// Number of token ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Beginning-of-sequence id (for BERT-style tokenizers from tokenizer.json, `[CLS]`).
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// End-of-sequence id (for BERT-style tokenizers from tokenizer.json, `[SEP]`).
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Padding id, if the tokenizer defines one.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad
    }

    /// The id of a token given in the vocabulary's own spelling (e.g. `Ġthe`, `▁the`, `##s`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary's spelling of a token id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The wrapped Hugging Face tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}
