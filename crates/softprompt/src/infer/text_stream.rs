//! Generated tokens → text released piece by piece, cut at the first stop string.
//!
//! Text is released only when it is final: not while the decoded tail is an incomplete UTF-8
//! sequence (shown by the tokenizer as U+FFFD), and not while it could still be the beginning of
//! a stop string. A stop string ends the sequence and is not part of the text.

use anyhow::Result;

use crate::tokenizer::TextTokenizer;

/// The text of one sequence as its tokens arrive.
pub struct TextStream {
    stops: Vec<String>,
    ids: Vec<u32>,
    /// Bytes of the decoded text already released.
    sent: usize,
}

impl TextStream {
    /// A stream that ends at any of `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            ids: Vec::new(),
            sent: 0,
        }
    }

    /// Adds a token; returns the newly final text and whether a stop string was reached.
    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> Result<(String, bool)> {
        self.ids.push(id);
        let text = tokenizer.decode(&self.ids, true)?;
        if let Some(cut) = self.first_stop(&text) {
            return Ok((self.release(&text, cut.max(self.sent)), true));
        }
        let mut end = text.len();
        if text.ends_with('\u{FFFD}') {
            end -= '\u{FFFD}'.len_utf8();
        }
        end -= self.partial_stop(&text[..end]);
        Ok((self.release(&text, end), false))
    }

    /// Whatever is left when the sequence ends without a stop string.
    pub fn finish(&mut self, tokenizer: &TextTokenizer) -> Result<String> {
        let text = tokenizer.decode(&self.ids, true)?;
        let end = text.len();
        Ok(self.release(&text, end))
    }

    fn release(&mut self, text: &str, end: usize) -> String {
        match text.get(self.sent..end) {
            Some(piece) if end >= self.sent => {
                self.sent = end;
                piece.to_string()
            }
            _ => String::new(),
        }
    }

    /// Byte offset of the earliest stop string in `text`.
    fn first_stop(&self, text: &str) -> Option<usize> {
        self.stops.iter().filter_map(|s| text.find(s.as_str())).min()
    }

    /// Length of the longest tail of `text` that is a proper beginning of a stop string.
    fn partial_stop(&self, text: &str) -> usize {
        let longest = self.stops.iter().map(|s| s.chars().count()).max().unwrap_or(0);
        let mut best = 0;
        for (at, _) in text.char_indices().rev().take(longest) {
            let tail = &text[at..];
            if self.stops.iter().any(|s| s.len() > tail.len() && s.starts_with(tail)) {
                best = tail.len();
            }
        }
        best
    }
}
