//! The tokenizer of a Gemma GGUF (`general.architecture` gemma, gemma2 or gemma3 with
//! `tokenizer.ggml.model` `llama`), built as transformers 5 builds it (`gemma_tokenizer` in its
//! GGUF integration, then `GemmaTokenizer`):
//!
//! - tokens made only of two or more spaces are respelled with `▁` (the file stores real
//!   spaces; the normalizer turns spaces into `▁` before the lookup);
//! - the file has no merges, and Gemma's scores do not follow its merge order, so merges are
//!   rebuilt from the vocabulary with the order of the tokens in the file as their rank: every
//!   split of a token into two tokens, tokens in file order, a token's splits longest left piece
//!   first (transformers' `generate_merges` with the scores `-index`);
//! - BPE with byte fallback; normalizer: spaces → `▁` (no prefix space); decoder: `▁` → space,
//!   byte fallback, fuse;
//! - control tokens special; user-defined tokens (`\n`, `\n\n`, …, HTML tags) matched whole as
//!   plain added tokens when their spelling is in the vocabulary; BOS added as the file says.

use super::{GgufVocab, SPM_SPACE, TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED};
use crate::tokenizer::TextTokenizer;
use anyhow::{anyhow, Result};
use std::collections::HashMap;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::Replace;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// Whether a file of this `general.architecture` takes the Gemma builder.
pub(super) fn is_gemma(arch: Option<&str>) -> bool {
    matches!(arch, Some("gemma" | "gemma2" | "gemma3"))
}

/// A token of two or more spaces (nothing else) respelled with `▁`, as transformers does.
fn respell(token: &str) -> String {
    if token.chars().count() >= 2 && token.chars().all(|c| c == ' ') {
        SPM_SPACE.repeat(token.chars().count())
    } else {
        token.to_string()
    }
}

/// transformers' `generate_merges(vocab, {token: -index})`: for every token (in order of first
/// appearance, ranked by its last index), each split into two tokens of the vocabulary; ranked
/// best first by the token's index, then the longer left piece (the sort is stable).
fn merges_by_position(tokens: &[String]) -> Vec<(String, String)> {
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        if index.insert(t.as_str(), i).is_none() {
            order.push(t.as_str());
        }
    }
    let mut merges: Vec<(&str, &str, usize, usize, usize)> = Vec::new();
    for merged in order {
        let rank = index[merged];
        let mut local: Vec<(&str, &str, usize, usize, usize)> = merged
            .char_indices()
            .skip(1)
            .map(|(at, _)| merged.split_at(at))
            .filter(|(l, r)| index.contains_key(l) && index.contains_key(r))
            .map(|(l, r)| (l, r, rank, l.chars().count(), r.chars().count()))
            .collect();
        local.sort_by_key(|&(l, r, ..)| (index[l], index[r]));
        merges.extend(local);
    }
    // Python: sorted(key=(-index, len(l), len(r)), reverse=True): index ascending, then the
    // longer pieces first; stable.
    merges.sort_by(|a, b| a.2.cmp(&b.2).then(b.3.cmp(&a.3)).then(b.4.cmp(&a.4)));
    merges
        .into_iter()
        .map(|(l, r, ..)| (l.to_string(), r.to_string()))
        .collect()
}

impl GgufVocab {
    pub(super) fn build_gemma(&self, file: &str) -> Result<TextTokenizer> {
        let tokens: Vec<String> = self.tokens.iter().map(|t| respell(t)).collect();
        let merges = match self.explicit_merges(file)? {
            Some(m) => m,
            None => merges_by_position(&tokens),
        };
        let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let mut builder = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .fuse_unk(true)
            .byte_fallback(true);
        if let Some(unk) = self.unk {
            builder = builder.unk_token(tokens[unk as usize].clone());
        }
        let bpe = builder
            .build()
            .map_err(|e| anyhow!("{file}: cannot build the Gemma BPE tokenizer from its vocabulary: {e}"))?;
        let mut tok = Tokenizer::new(bpe);
        tok.with_normalizer(Some(Replace::new(" ", SPM_SPACE).map_err(|e| anyhow!("{file}: {e}"))?));
        let split = Split::new(
            SplitPattern::String(" ".into()),
            SplitDelimiterBehavior::MergedWithPrevious,
            false,
        )
        .map_err(|e| anyhow!("{file}: {e}"))?;
        tok.with_pre_tokenizer(Some(split));
        let dec: Vec<DecoderWrapper> = vec![
            Replace::new(SPM_SPACE, " ").map_err(|e| anyhow!("{file}: {e}"))?.into(),
            ByteFallback::new().into(),
            Fuse::new().into(),
        ];
        tok.with_decoder(Some(DecoderSequence::new(dec)));
        let of_type =
            |kind: i64| -> Vec<usize> { (0..self.tokens.len()).filter(|&i| self.token_type(i) == kind).collect() };
        let specials: Vec<AddedToken> = of_type(TOKEN_TYPE_CONTROL)
            .into_iter()
            .map(|i| AddedToken::from(self.tokens[i].clone(), true).normalized(false))
            .collect();
        tok.add_special_tokens(&specials);
        // As spelled in the file: a respelled space token is no longer in the vocabulary.
        let user: Vec<AddedToken> = of_type(TOKEN_TYPE_USER_DEFINED)
            .into_iter()
            .filter(|&i| tok.token_to_id(&self.tokens[i]).is_some())
            .map(|i| AddedToken::from(self.tokens[i].clone(), false).normalized(false))
            .collect();
        tok.add_tokens(&user);
        self.finish(tok, self.add_bos.unwrap_or(true), self.add_eos.unwrap_or(false), file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_follow_the_file_order_and_longer_left_pieces_first() {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "bc", "abc", "  "]
            .iter()
            .map(|t| respell(t))
            .collect();
        assert_eq!(tokens[6], "\u{2581}\u{2581}");
        let m = merges_by_position(&tokens);
        let pairs: Vec<(&str, &str)> = m.iter().map(|(l, r)| (l.as_str(), r.as_str())).collect();
        assert_eq!(pairs, vec![("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]);
    }
}
