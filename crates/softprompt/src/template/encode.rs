//! Rendering a row through a template and tokenizing it, with the truncation policy.

use super::{EncodedPrompt, FieldSpan, Piece, Segment, SpecialTokens, Template, TextRun, Token};
use crate::data::{field_text, Row};
use crate::tokenizer::TextTokenizer;
use anyhow::{bail, Result};

impl Template {
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

    /// Renders and tokenizes the prompt part of one row (see the [module documentation](super)
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
