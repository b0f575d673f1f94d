//! Parsing template text into segments, and marking the target slot.

use super::{Segment, Target, Template};
use anyhow::{bail, Result};
use std::collections::HashMap;
use std::ops::Range;

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
    /// Parses a template (syntax in the [module documentation](super)).
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

    /// Makes `target_field` the target (see the [module documentation](super)): a final
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
}
