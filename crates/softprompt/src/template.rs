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
use std::collections::HashMap;
use std::ops::Range;

/// One item of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Literal text (escapes already resolved).
    Text(String),
    /// `{name}`; `column` is the 1-based template column of its `{`.
    Field { name: String, column: usize },
    /// `[soft:N]`, `[soft:N@name]` or `[soft@name]`: the virtual tokens `tokens`.
    Soft {
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
    Text(TextRun),
    Soft(Range<usize>),
}

fn is_name_char(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '_' | '-' | '.')
}

/// The directive inside `[...]`.
enum Directive {
    Allocate { n: usize, name: Option<String> },
    Reuse { name: String },
}

fn parse_directive(body: &str, column: usize) -> Result<Directive> {
    let unknown = || {
        anyhow::anyhow!(
            "template column {column}: unknown directive `[{body}]`; expected `[soft:N]`, \
             `[soft:N@name]` or `[soft@name]` (write `[[` for a literal `[`)"
        )
    };
    let Some(rest) = body.strip_prefix("soft") else {
        return Err(unknown());
    };
    let check_name = |name: &str| -> Result<String> {
        if name.is_empty() {
            bail!("template column {column}: `[{body}]` has an empty soft-token name after `@`");
        }
        if !name.chars().all(is_name_char) {
            bail!(
                "template column {column}: soft-token name `{name}` may only use letters, \
                 digits, `_`, `-` and `.`"
            );
        }
        Ok(name.to_string())
    };
    if rest.is_empty() {
        bail!("template column {column}: `[soft]` needs a count: write `[soft:N]`");
    }
    if let Some(name) = rest.strip_prefix('@') {
        return Ok(Directive::Reuse {
            name: check_name(name)?,
        });
    }
    let Some(spec) = rest.strip_prefix(':') else {
        return Err(unknown());
    };
    let (count, name) = match spec.split_once('@') {
        Some((c, n)) => (c, Some(check_name(n)?)),
        None => (spec, None),
    };
    if count.is_empty() || !count.chars().all(|c| c.is_ascii_digit()) {
        bail!("template column {column}: in `[{body}]`, N must be a positive whole number");
    }
    let Ok(n) = count.parse::<usize>() else {
        bail!("template column {column}: in `[{body}]`, N = {count} is too large");
    };
    if n == 0 {
        bail!("template column {column}: `[{body}]` allocates no tokens; N must be at least 1");
    }
    Ok(Directive::Allocate { n, name })
}

impl Template {
    /// Parses a template (syntax in the [module documentation](self)).
    pub fn parse(src: &str) -> Result<Template> {
        let chars: Vec<char> = src.chars().collect();
        let mut segments = Vec::new();
        let mut text = String::new();
        let mut named: HashMap<String, (Range<usize>, usize)> = HashMap::new();
        let mut next_virtual = 0usize;
        let flush = |text: &mut String, segments: &mut Vec<Segment>| {
            if !text.is_empty() {
                segments.push(Segment::Text(std::mem::take(text)));
            }
        };
        let mut i = 0;
        while i < chars.len() {
            let column = i + 1;
            let c = chars[i];
            let next = chars.get(i + 1).copied();
            match c {
                '\\' => {
                    match next {
                        Some('n') => text.push('\n'),
                        Some('t') => text.push('\t'),
                        Some('\\') => text.push('\\'),
                        _ => {
                            text.push('\\');
                            i += 1;
                            continue;
                        }
                    }
                    i += 2;
                }
                '{' | '}' | '[' | ']' if next == Some(c) => {
                    text.push(c);
                    i += 2;
                }
                '}' => bail!("template column {column}: unmatched `}}` (write `}}}}` for a literal `}}`)"),
                ']' => {
                    bail!("template column {column}: unmatched `]` (write `]]` for a literal `]`)")
                }
                '{' => {
                    let mut j = i + 1;
                    while j < chars.len() && chars[j] != '}' {
                        if chars[j] == '{' {
                            bail!(
                                "template column {column}: unclosed `{{` (another `{{` follows \
                                 at column {})",
                                j + 1
                            );
                        }
                        j += 1;
                    }
                    if j == chars.len() {
                        bail!("template column {column}: unclosed `{{`");
                    }
                    let name: String = chars[i + 1..j].iter().collect();
                    if name.is_empty() {
                        bail!(
                            "template column {column}: empty field name `{{}}` (write `{{{{}}}}` \
                             for literal braces)"
                        );
                    }
                    flush(&mut text, &mut segments);
                    segments.push(Segment::Field { name, column });
                    i = j + 1;
                }
                '[' => {
                    let Some(len) = chars[i + 1..].iter().position(|&c| c == ']') else {
                        bail!("template column {column}: unclosed `[`");
                    };
                    let j = i + 1 + len;
                    let body: String = chars[i + 1..j].iter().collect();
                    let segment = match parse_directive(&body, column)? {
                        Directive::Allocate { n, name } => {
                            let Some(end) = next_virtual.checked_add(n) else {
                                bail!("template column {column}: too many virtual tokens");
                            };
                            let tokens = next_virtual..end;
                            next_virtual = end;
                            if let Some(name) = &name {
                                if let Some((_, first)) = named.get(name) {
                                    bail!(
                                        "template column {column}: soft-token name `{name}` is \
                                         already allocated at column {first}; write \
                                         `[soft@{name}]` to reuse it"
                                    );
                                }
                                named.insert(name.clone(), (tokens.clone(), column));
                            }
                            Segment::Soft {
                                tokens,
                                name,
                                shared: false,
                                column,
                            }
                        }
                        Directive::Reuse { name } => {
                            let Some((tokens, _)) = named.get(&name) else {
                                bail!(
                                    "template column {column}: `[soft@{name}]` reuses `{name}`, \
                                     which no earlier `[soft:N@{name}]` allocates"
                                );
                            };
                            Segment::Soft {
                                tokens: tokens.clone(),
                                name: Some(name),
                                shared: true,
                                column,
                            }
                        }
                    };
                    flush(&mut text, &mut segments);
                    segments.push(segment);
                    i = j + 1;
                }
                _ => {
                    text.push(c);
                    i += 1;
                }
            }
        }
        flush(&mut text, &mut segments);
        Ok(Template {
            source: src.to_string(),
            segments,
            num_virtual_tokens: next_virtual,
            target: None,
        })
    }

    /// Makes `target_field` the target (see the [module documentation](self)): a final
    /// `{target_field}` becomes the target slot, an absent one is appended; anywhere else it is
    /// an error naming its column.
    pub fn with_target(mut self, target_field: &str) -> Result<Template> {
        if target_field.is_empty() {
            bail!("the target field name is empty");
        }
        if let Some(t) = &self.target {
            bail!("the template already has the target field `{}`", t.field);
        }
        let is_target = |s: &Segment| matches!(s, Segment::Field { name, .. } if name == target_field);
        let last = self.segments.len().checked_sub(1);
        if let Some((_, Segment::Field { column, .. })) = self
            .segments
            .iter()
            .enumerate()
            .find(|(k, s)| is_target(s) && Some(*k) != last)
        {
            bail!(
                "template column {column}: the target field `{{{target_field}}}` must be the \
                 last item of the template (it is the text the model learns to produce)"
            );
        }
        if self.segments.last().is_some_and(is_target) {
            self.segments.pop();
        }
        let mut prefix = String::new();
        if let Some(Segment::Text(text)) = self.segments.last_mut() {
            let kept = text.trim_end_matches([' ', '\t']).len();
            prefix = text.split_off(kept);
            if text.is_empty() {
                self.segments.pop();
            }
        }
        self.target = Some(Target {
            field: target_field.to_string(),
            prefix,
        });
        Ok(self)
    }

    /// The template as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The parsed items of the prompt part (the target slot excluded).
    pub fn segments(&self) -> &[Segment] {
        &self.segments
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

    /// Renders the prompt part for one row, without tokenizing: text stretches between soft
    /// tokens (empty ones left out) and soft-token ranges, in order.
    pub fn render(&self, row: &Row, origin: &str) -> Result<Vec<Piece>> {
        let mut pieces = Vec::new();
        let mut run = TextRun::default();
        let mut has_text = false;
        for s in &self.segments {
            match s {
                Segment::Text(t) => {
                    run.text.push_str(t);
                    has_text = true;
                }
                Segment::Field { name, .. } => {
                    let value = field_text(row, name, origin)?;
                    let start = run.text.len();
                    run.text.push_str(&value);
                    run.fields.push(FieldSpan {
                        name: name.clone(),
                        range: start..run.text.len(),
                    });
                    has_text = true;
                }
                Segment::Soft { tokens, .. } => {
                    if has_text {
                        pieces.push(Piece::Text(std::mem::take(&mut run)));
                        has_text = false;
                    }
                    pieces.push(Piece::Soft(tokens.clone()));
                }
            }
        }
        if has_text {
            pieces.push(Piece::Text(run));
        }
        Ok(pieces)
    }

    /// Renders and tokenizes the prompt part of one row (see the [module documentation](self)
    /// for the token layout and the truncation policy).
    ///
    /// `origin` names the row in messages (`FILE:LINE`); `max_len` is the number of positions
    /// for prompt and target together (`usize::MAX` for no limit) and `reserve` the number kept
    /// free for the target.
    pub fn encode(
        &self,
        row: &Row,
        origin: &str,
        tokenizer: &TextTokenizer,
        special: &SpecialTokens,
        max_len: usize,
        reserve: usize,
    ) -> Result<EncodedPrompt> {
        let Some(budget) = max_len.checked_sub(reserve) else {
            bail!("{origin}: {reserve} tokens reserved for the target exceed max_len {max_len}");
        };
        let mut pieces = self.render(row, origin)?;
        let tokenize = |text: &str| -> Result<Vec<u32>> {
            tokenizer.encode(text, false).map_err(|e| e.context(origin.to_string()))
        };
        let mut ids: Vec<Vec<u32>> = Vec::with_capacity(pieces.len());
        for p in &pieces {
            ids.push(match p {
                Piece::Text(run) => tokenize(&run.text)?,
                Piece::Soft(_) => Vec::new(),
            });
        }
        let fixed: usize = special.len()
            + pieces
                .iter()
                .map(|p| match p {
                    Piece::Soft(r) => r.len(),
                    Piece::Text(_) => 0,
                })
                .sum::<usize>();
        let text_len = |ids: &[Vec<u32>]| ids.iter().map(Vec::len).sum::<usize>();
        let mut total = fixed + text_len(&ids);
        let mut truncated = false;
        if total > budget {
            truncated = true;
            // Field occurrences, longest value first (stable: earlier first among equals).
            let mut candidates: Vec<(usize, usize, usize)> = Vec::new();
            for (pi, p) in pieces.iter().enumerate() {
                if let Piece::Text(run) = p {
                    for (si, f) in run.fields.iter().enumerate() {
                        let chars = run.text[f.range.clone()].chars().count();
                        if chars > 0 {
                            candidates.push((chars, pi, si));
                        }
                    }
                }
            }
            candidates.sort_by_key(|c| std::cmp::Reverse(c.0));
            for &(_, pi, si) in &candidates {
                if total <= budget {
                    break;
                }
                let Piece::Text(run) = &mut pieces[pi] else {
                    continue;
                };
                let others = total - ids[pi].len();
                let fits = |n: usize| others + n <= budget;
                let range = run.fields[si].range.clone();
                let value = &run.text[range.clone()];
                // Candidate cut points: byte lengths of every character prefix of the value.
                let cuts: Vec<usize> = value.char_indices().map(|(b, _)| b).collect();
                let render_cut = |keep: usize| -> String {
                    let mut s = String::with_capacity(run.text.len());
                    s.push_str(&run.text[..range.start + keep]);
                    s.push_str(&run.text[range.end..]);
                    s
                };
                let empty = tokenize(&render_cut(0))?;
                let (keep, new_ids) = if !fits(empty.len()) {
                    (0, empty)
                } else {
                    // cuts[lo] fits, the full value (index cuts.len()) does not.
                    let (mut lo, mut hi) = (0usize, cuts.len());
                    let mut best = empty;
                    while hi - lo > 1 {
                        let mid = lo + (hi - lo) / 2;
                        let t = tokenize(&render_cut(cuts[mid]))?;
                        if fits(t.len()) {
                            lo = mid;
                            best = t;
                        } else {
                            hi = mid;
                        }
                    }
                    (cuts[lo], best)
                };
                cut_field(run, si, keep);
                total = others + new_ids.len();
                ids[pi] = new_ids;
            }
            if total > budget {
                let text = text_len(&ids);
                bail!(
                    "{origin}: the prompt does not fit in max_len {max_len} even with every field \
                     value emptied: it needs {total} tokens ({} soft, {} special, {text} of \
                     template text) plus {reserve} reserved for the target",
                    fixed - special.len(),
                    special.len(),
                );
            }
        }

        // Assemble: specials around the text tokens.
        let first_text = ids.iter().position(|v| !v.is_empty());
        let last_text = ids.iter().rposition(|v| !v.is_empty());
        let mut tokens = Vec::with_capacity(total);
        for (pi, p) in pieces.iter().enumerate() {
            if Some(pi) == first_text {
                tokens.extend(special.prefix.iter().map(|&id| Token::Id(id)));
            }
            match p {
                Piece::Soft(r) => tokens.extend(r.clone().map(Token::Soft)),
                Piece::Text(_) => tokens.extend(ids[pi].iter().map(|&id| Token::Id(id))),
            }
            if Some(pi) == last_text {
                tokens.extend(special.suffix.iter().map(|&id| Token::Id(id)));
            }
        }
        if first_text.is_none() {
            tokens.extend(special.prefix.iter().map(|&id| Token::Id(id)));
            tokens.extend(special.suffix.iter().map(|&id| Token::Id(id)));
        }
        debug_assert_eq!(tokens.len(), total);
        Ok(EncodedPrompt {
            tokens,
            target_prefix: self.target.as_ref().map(|t| t.prefix.clone()).unwrap_or_default(),
            truncated,
        })
    }
}

/// Cuts field `si` of `run` to its first `keep` bytes, shifting the later fields.
fn cut_field(run: &mut TextRun, si: usize, keep: usize) {
    let range = run.fields[si].range.clone();
    let removed = range.len() - keep;
    if removed == 0 {
        return;
    }
    run.text.replace_range(range.start + keep..range.end, "");
    run.fields[si].range = range.start..range.start + keep;
    for f in &mut run.fields[si + 1..] {
        f.range = f.range.start - removed..f.range.end - removed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_segments() {
        let t = Template::parse("[soft:2]a\\n{x}[[[soft@s]").unwrap_err();
        assert!(t.to_string().starts_with("template column 17: "), "{t}");
        let t = Template::parse("[soft:2@s]a\\n{x}[[]][soft@s]{{}}").unwrap();
        assert_eq!(
            t.segments(),
            &[
                Segment::Soft {
                    tokens: 0..2,
                    name: Some("s".into()),
                    shared: false,
                    column: 1
                },
                Segment::Text("a\n".into()),
                Segment::Field {
                    name: "x".into(),
                    column: 14
                },
                Segment::Text("[]".into()),
                Segment::Soft {
                    tokens: 0..2,
                    name: Some("s".into()),
                    shared: true,
                    column: 21
                },
                Segment::Text("{}".into()),
            ]
        );
        assert_eq!(t.num_virtual_tokens(), 2);
        assert_eq!(t.num_soft_positions(), 4);
    }

    #[test]
    fn cut_field_shifts_later_fields() {
        let mut run = TextRun {
            text: "abcdefXY".into(),
            fields: vec![
                FieldSpan {
                    name: "a".into(),
                    range: 1..4,
                },
                FieldSpan {
                    name: "b".into(),
                    range: 6..8,
                },
            ],
        };
        cut_field(&mut run, 0, 1);
        assert_eq!(run.text, "abefXY");
        assert_eq!(run.fields[1].range, 4..6);
    }
}
