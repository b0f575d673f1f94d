//! Prompt templates: literal text, data fields and soft (virtual) tokens anywhere.
//!
//! # Syntax
//!
//! | written | meaning |
//! |---|---|
//! | plain text | itself, every character (spaces and newlines included) |
//! | `{field}` | the text of the row's field `field` (see [`crate::data::field_text`]) |
//! | `[soft:N]` | N fresh virtual tokens |
//! | `[soft:N@name]` | N fresh virtual tokens, remembered under `name` |
//! | `[soft@name]` | the same virtual tokens as `[soft:N@name]` earlier in the template (shared) |
//! | `\n`, `\t`, `\\` | newline, tab, backslash (so a command-line user can type them) |
//! | `{{`, `}}`, `[[`, `]]` | a literal `{`, `}`, `[`, `]` |
//!
//! A backslash followed by anything else stays a backslash. Field names are taken verbatim
//! (`{ text }` names the field `" text "`). Soft-token names use letters, digits, `_`, `-`, `.`.
//!
//! Virtual tokens are numbered left to right in allocation order: in
//! `[soft:4] Review: {text} [soft:2] Sentiment: {label}` the first `[soft:4]` is virtual tokens
//! 0..4 and `[soft:2]` is 4..6, so the prompt has 6 learnable vectors. With names,
//! `[soft:3@q] Question: {q} [soft@q] Answer:` uses virtual tokens 0..3 twice (3 vectors).
//! Prompt tuning (Lester et al.) is the template with every soft token first:
//! `[soft:20]Review: {text}\nSentiment:`.
//!
//! All text is literal: `[soft:4] Review:` renders the text ` Review:` (with its leading space)
//! after the four virtual tokens; nothing is trimmed or inserted, except for the target below.
//!
//! # The target
//!
//! [`Template::with_target`] marks the field the model learns to produce (a causal LM's
//! continuation). If the template ends with `{target}`, that slot becomes the target; if the
//! template has no `{target}`, the target follows the template's end directly; `{target}`
//! anywhere else is an error. Trailing spaces and tabs (not newlines) of the literal text right
//! before the target move to the start of the target text: with `Sentiment: {label}` the prompt
//! ends in `Sentiment:` and the target is ` positive`, which byte-level BPE and SentencePiece
//! tokenizers merge into one ` positive` token, just as in ordinary text.
//!
//! # Encoding
//!
//! [`Template::encode`] renders a row ([`Template::render`], pure, no tokenizer) and tokenizes
//! it. Each maximal stretch of text between soft tokens (literal text and field values together)
//! is tokenized as one string without special tokens, so a template without soft tokens in the
//! middle tokenizes exactly like its whole rendered text. The tokenizer's own special tokens
//! ([`SpecialTokens`], e.g. BERT's `[CLS]`/`[SEP]`) are placed right before the first text token
//! (i.e. after leading soft tokens, as HF PEFT places prompts before `[CLS]`) and right after
//! the last text token; without any text token they follow all soft tokens.
//!
//! # Truncation
//!
//! `encode` takes `max_len` (positions available for the prompt and the target) and `reserve`
//! (positions kept free for the target). When the prompt is longer than `max_len - reserve`,
//! field values are cut from their end, longest value (in characters) first: the value is cut,
//! on a character boundary, to the longest prefix for which the prompt fits (found by bisection,
//! re-tokenizing its text stretch each time); if even the empty value is too long, the next
//! longest value is cut too. Soft tokens, special tokens and the template's literal text are
//! never dropped, and literal text after a cut value (e.g. `\nSentiment:`) stays. The result has
//! `truncated == true`. If the prompt cannot fit even with every field emptied, `encode` fails
//! naming the row's origin.
//!
//! # Errors
//!
//! Parse errors name the 1-based character column of the template:
//! ``template column 12: unclosed `{` ``. Row errors name the row's origin (`FILE:LINE`) and field.

use crate::data::{field_text, Row};
use crate::tokenizer::TextTokenizer;
use anyhow::{bail, Result};

use std::ops::Range;

mod encode;
mod parse;

/// One item of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Literal text (escapes already resolved).
    Text(String),
    /// `{name}`.
    Field {
        /// The field's name.
        name: String,
        /// 1-based template column of its `{`.
        column: usize,
    },
    /// `[soft:N]`, `[soft:N@name]` or `[soft@name]`.
    Soft {
        /// The virtual tokens (indices into the prompt).
        tokens: Range<usize>,
        /// The name given with `@name`, if any.
        name: Option<String>,
        /// Whether this reuses (`[soft@name]`) rather than allocates.
        shared: bool,
        /// 1-based template column of the `[`.
        column: usize,
    },
}

/// The target slot set by [`Template::with_target`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The row field holding the target text.
    pub field: String,
    /// Whitespace moved from the end of the prompt to the start of the target text.
    pub prefix: String,
}

/// A parsed template. See the [module documentation](self) for the syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    segments: Vec<Segment>,
    num_virtual_tokens: usize,
    target: Option<Target>,
}

/// One token of an encoded prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Token {
    /// A vocabulary token id.
    Id(u32),
    /// Virtual token number `i` (0-based, `< Template::num_virtual_tokens()`).
    Soft(usize),
}

/// A row encoded by [`Template::encode`]: the prompt part (no target).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedPrompt {
    /// Token ids and virtual tokens in sequence order, special tokens included.
    pub tokens: Vec<Token>,
    /// Whitespace that belongs in front of the target text (see [`Target::prefix`]).
    pub target_prefix: String,
    /// Whether field values were cut to fit `max_len`.
    pub truncated: bool,
}

impl EncodedPrompt {
    /// Number of positions.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether there is no token at all.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// The special tokens a tokenizer adds around a sequence (`encode(text, true)`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Added before the text (BERT: `[CLS]`; a Llama tokenizer: BOS).
    pub prefix: Vec<u32>,
    /// Added after the text (BERT: `[SEP]`).
    pub suffix: Vec<u32>,
}

impl SpecialTokens {
    /// No special tokens.
    pub fn none() -> Self {
        Self::default()
    }

    /// Finds what `tokenizer.encode(_, true)` adds by comparing `encode("a", true)` with
    /// `encode("a", false)`.
    pub fn of(tokenizer: &TextTokenizer) -> Result<Self> {
        let with = tokenizer.encode("a", true)?;
        let without = tokenizer.encode("a", false)?;
        if !without.is_empty() {
            if let Some(p) = with.windows(without.len()).position(|w| w == without.as_slice()) {
                return Ok(Self {
                    prefix: with[..p].to_vec(),
                    suffix: with[p + without.len()..].to_vec(),
                });
            }
        }
        bail!(
            "cannot find the tokenizer's special tokens: \"a\" encodes to {without:?} without \
             and {with:?} with special tokens"
        )
    }

    /// Number of special tokens added to a sequence.
    pub fn len(&self) -> usize {
        self.prefix.len() + self.suffix.len()
    }

    /// Whether the tokenizer adds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A field value inside a [`TextRun`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldSpan {
    /// The field's name.
    pub name: String,
    /// Byte range of the value in [`TextRun::text`].
    pub range: Range<usize>,
}

/// A maximal stretch of text between soft tokens, rendered for one row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TextRun {
    /// Literal text and field values, concatenated.
    pub text: String,
    /// Where the field values are in `text`, in order.
    pub fields: Vec<FieldSpan>,
}

/// A rendered template item: text to tokenize, or virtual tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// A stretch of text to tokenize as one string.
    Text(TextRun),
    /// Virtual tokens (their indices in the prompt).
    Soft(Range<usize>),
}

impl Template {
    /// The template as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The parsed items of the prompt part (the target slot excluded).
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The template's source without its leading `[soft:N]` (written so, unnamed), when its only
    /// virtual tokens are those `N` at its very start; `None` otherwise. Late prompt tuning's
    /// readers score with this template after the adapter's keys and values of the `N` positions.
    pub fn without_leading_soft(&self) -> Option<String> {
        let n = self.num_virtual_tokens;
        let lead = format!("[soft:{n}]");
        let only_lead = self.num_soft_positions() == n
            && matches!(self.segments.first(), Some(Segment::Soft { tokens, name: None, shared: false, .. }) if *tokens == (0..n));
        let rest = self.source.strip_prefix(&lead)?;
        (n > 0 && only_lead).then(|| rest.to_string())
    }

    /// Number of distinct virtual tokens (learnable vectors) the template uses.
    pub fn num_virtual_tokens(&self) -> usize {
        self.num_virtual_tokens
    }

    /// Number of soft-token positions in an encoded prompt (shared tokens counted each time).
    pub fn num_soft_positions(&self) -> usize {
        self.segments
            .iter()
            .map(|s| match s {
                Segment::Soft { tokens, .. } => tokens.len(),
                _ => 0,
            })
            .sum()
    }

    /// Input field names in order of first appearance, each once (the target excluded).
    pub fn fields(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for s in &self.segments {
            if let Segment::Field { name, .. } = s {
                if !out.contains(&name.as_str()) {
                    out.push(name);
                }
            }
        }
        out
    }

    /// The target, if [`with_target`](Self::with_target) set one.
    pub fn target(&self) -> Option<&Target> {
        self.target.as_ref()
    }

    /// The full target text of a row: the moved whitespace plus the target field's text.
    pub fn target_text(&self, row: &Row, origin: &str) -> Result<String> {
        let Some(t) = &self.target else {
            bail!("the template `{}` has no target field", self.source);
        };
        Ok(format!("{}{}", t.prefix, field_text(row, &t.field, origin)?))
    }
}
