//! Generated tokens → text released piece by piece, cut at the first stop string.
//!
//! Text is released only when it is final: not while the decoded tail is an incomplete UTF-8
//! sequence (shown by the tokenizer as U+FFFD), and not while it could still be the beginning of
//! a stop string. A stop string ends the sequence and is not part of the text.
//!
//! Decoding is incremental (as Hugging Face's text-generation-inference does it): each new token
//! is decoded together with the few tokens before it, and the text they add over those tokens
//! alone is appended, so a token costs the same at the end of a long sequence as at its start
//! (a tokenizer may spell a token differently at the start of a text, hence the context).

use anyhow::Result;

use crate::tokenizer::TextTokenizer;

/// The text of one sequence as its tokens arrive.
pub struct TextStream {
    stops: Vec<String>,
    /// Characters of the longest stop string.
    longest: usize,
    ids: Vec<u32>,
    /// Tokens before `prefix` are decoded for good; `prefix..read` give the context.
    prefix: usize,
    read: usize,
    /// The text decoded for good so far.
    text: String,
    /// Bytes of `text` already released.
    sent: usize,
}

impl TextStream {
    /// A stream that ends at any of `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        let stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
        let longest = stops.iter().map(|s| s.chars().count()).max().unwrap_or(0);
        Self {
            stops,
            longest,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
            text: String::new(),
            sent: 0,
        }
    }

    /// Adds a token; returns the newly final text and whether a stop string was reached.
    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> Result<(String, bool)> {
        self.ids.push(id);
        self.decode_new(tokenizer, false)?;
        if let Some(cut) = self.first_stop() {
            return Ok((self.release(cut.max(self.sent)), true));
        }
        let end = self.text.len() - self.partial_stop();
        Ok((self.release(end), false))
    }

    /// Whatever is left when the sequence ends without a stop string.
    pub fn finish(&mut self, tokenizer: &TextTokenizer) -> Result<String> {
        self.decode_new(tokenizer, true)?;
        Ok(self.release(self.text.len()))
    }

    /// Appends the text the tokens after `read` add (unless it ends in an incomplete UTF-8
    /// sequence, and `force` is false).
    fn decode_new(&mut self, tokenizer: &TextTokenizer, force: bool) -> Result<()> {
        if self.read == self.ids.len() {
            return Ok(());
        }
        let before = tokenizer.decode(&self.ids[self.prefix..self.read], true)?;
        let after = tokenizer.decode(&self.ids[self.prefix..], true)?;
        if after.ends_with('\u{FFFD}') && !force {
            return Ok(());
        }
        // Normally `after` extends `before`; if the context decodes differently once extended,
        // what follows their common beginning is taken.
        let common = before
            .char_indices()
            .zip(after.chars())
            .find(|((_, a), b)| a != b)
            .map_or(before.len().min(after.len()), |((i, _), _)| i);
        self.text.push_str(&after[common..]);
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(())
    }

    fn release(&mut self, end: usize) -> String {
        match self.text.get(self.sent..end) {
            Some(piece) if end >= self.sent => {
                let piece = piece.to_string();
                self.sent = end;
                piece
            }
            _ => String::new(),
        }
    }

    /// Byte offset of the earliest stop string in the text (only the part a new token can
    /// have completed is searched).
    fn first_stop(&self) -> Option<usize> {
        let mut from = self.sent.saturating_sub(4 * self.longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let tail = &self.text[from..];
        self.stops
            .iter()
            .filter_map(|s| tail.find(s.as_str()))
            .min()
            .map(|i| from + i)
    }

    /// Length of the longest tail of the text that is a proper beginning of a stop string.
    fn partial_stop(&self) -> usize {
        let text = &self.text;
        let mut best = 0;
        for (at, _) in text.char_indices().rev().take(self.longest) {
            let tail = &text[at..];
            if self.stops.iter().any(|s| s.len() > tail.len() && s.starts_with(tail)) {
                best = tail.len();
            }
        }
        best
    }
}
