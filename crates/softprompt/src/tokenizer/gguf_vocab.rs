//! Building a [`TextTokenizer`] from the `tokenizer.ggml.*` metadata of a GGUF file.

use super::TextTokenizer;
use crate::gguf::{GgufFile, MetaValue};
use anyhow::{anyhow, bail, Result};
use std::collections::HashMap;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip as DecoderStrip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::{SpecialToken, Template, TemplateProcessing};
use tokenizers::{AddedToken, NormalizerWrapper, SplitDelimiterBehavior, Tokenizer};

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The SentencePiece word-boundary marker.
const SPM_SPACE: &str = "\u{2581}";

/// Qwen2's pre-tokenizer split (llama.cpp `LLAMA_VOCAB_PRE_TYPE_QWEN2`, HF Qwen2 tokenizer.json).
const QWEN2_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Llama 3's pre-tokenizer split (llama.cpp `LLAMA_VOCAB_PRE_TYPE_LLAMA3`): digits in groups of 3.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizer.ggml.*` metadata of a GGUF file, read into plain values.
#[derive(Debug, Clone, Default)]
pub(super) struct GgufVocab {
    /// `general.architecture`, if present (Gemma files need their own builder).
    arch: Option<String>,
    /// `tokenizer.ggml.model`.
    model: String,
    /// `tokenizer.ggml.pre`, if present.
    pre: Option<String>,
    tokens: Vec<String>,
    /// One per token, when `tokenizer.ggml.scores` is present.
    scores: Option<Vec<f64>>,
    /// One per token, when `tokenizer.ggml.token_type` is present.
    token_types: Option<Vec<i64>>,
    /// `tokenizer.ggml.merges` as given ("left right").
    merges: Option<Vec<String>>,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
    add_bos: Option<bool>,
    add_eos: Option<bool>,
    add_space_prefix: Option<bool>,
}

impl GgufVocab {
    pub(super) fn read(gguf: &GgufFile) -> Result<Self> {
        let file = gguf.path().display();
        let model = gguf.get_str("tokenizer.ggml.model")?.to_string();
        let pre = match gguf.metadata.get("tokenizer.ggml.pre") {
            None => None,
            Some(_) => Some(gguf.get_str("tokenizer.ggml.pre")?.to_string()),
        };
        let tokens: Vec<String> = gguf
            .get_str_array("tokenizer.ggml.tokens")?
            .into_iter()
            .map(str::to_string)
            .collect();
        if tokens.is_empty() {
            bail!("{file}: metadata `tokenizer.ggml.tokens` is empty");
        }
        if u32::try_from(tokens.len()).is_err() {
            bail!(
                "{file}: metadata `tokenizer.ggml.tokens` has {} entries, too many for u32 ids",
                tokens.len()
            );
        }
        let n = tokens.len();
        let per_token_len = |key: &str, len: usize| -> Result<()> {
            if len != n {
                bail!("{file}: metadata `{key}` has {len} entries but `tokenizer.ggml.tokens` has {n}");
            }
            Ok(())
        };
        let scores = match gguf.metadata.get("tokenizer.ggml.scores") {
            None => None,
            Some(_) => {
                let key = "tokenizer.ggml.scores";
                let v = gguf
                    .get_array(key)?
                    .iter()
                    .enumerate()
                    .map(|(i, v)| match v {
                        MetaValue::F64(x) => Ok(*x),
                        MetaValue::I64(x) => Ok(*x as f64),
                        MetaValue::U64(x) => Ok(*x as f64),
                        _ => bail!("{file}: metadata `{key}`[{i}] should be a number"),
                    })
                    .collect::<Result<Vec<_>>>()?;
                per_token_len(key, v.len())?;
                Some(v)
            }
        };
        let token_types = match gguf.metadata.get("tokenizer.ggml.token_type") {
            None => None,
            Some(_) => {
                let key = "tokenizer.ggml.token_type";
                let v = gguf
                    .get_array(key)?
                    .iter()
                    .enumerate()
                    .map(|(i, v)| match v {
                        MetaValue::I64(x) => Ok(*x),
                        MetaValue::U64(x) => Ok(i64::try_from(*x).unwrap_or(i64::MAX)),
                        _ => bail!("{file}: metadata `{key}`[{i}] should be an integer"),
                    })
                    .collect::<Result<Vec<_>>>()?;
                per_token_len(key, v.len())?;
                Some(v)
            }
        };
        let merges = match gguf.metadata.get("tokenizer.ggml.merges") {
            None => None,
            Some(_) => Some(
                gguf.get_str_array("tokenizer.ggml.merges")?
                    .into_iter()
                    .map(str::to_string)
                    .collect(),
            ),
        };
        let id = |key: &str| -> Result<Option<u32>> {
            if !gguf.metadata.contains_key(key) {
                return Ok(None);
            }
            let v = gguf.get_usize(key)?;
            if v >= n {
                bail!("{file}: metadata `{key}` = {v} is outside the vocabulary of {n} tokens");
            }
            Ok(Some(v as u32))
        };
        let flag = |key: &str| -> Result<Option<bool>> {
            if gguf.metadata.contains_key(key) {
                Ok(Some(gguf.get_bool_or(key, false)?))
            } else {
                Ok(None)
            }
        };
        let arch = match gguf.metadata.get("general.architecture") {
            None => None,
            Some(_) => Some(gguf.get_str("general.architecture")?.to_string()),
        };
        Ok(Self {
            arch,
            model,
            pre,
            tokens,
            scores,
            token_types,
            merges,
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            unk: id("tokenizer.ggml.unknown_token_id")?,
            pad: id("tokenizer.ggml.padding_token_id")?,
            add_bos: flag("tokenizer.ggml.add_bos_token")?,
            add_eos: flag("tokenizer.ggml.add_eos_token")?,
            add_space_prefix: flag("tokenizer.ggml.add_space_prefix")?,
        })
    }

    fn token_type(&self, id: usize) -> i64 {
        self.token_types.as_ref().map_or(1, |t| t[id])
    }

    /// Token → id; for a token listed twice the last id wins (as in transformers' converter).
    fn bpe_vocab(&self) -> Vocab {
        self.tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect()
    }

    /// `tokenizer.ggml.merges` split into pairs.
    fn explicit_merges(&self, file: &str) -> Result<Option<Vec<(String, String)>>> {
        let Some(merges) = &self.merges else {
            return Ok(None);
        };
        merges
            .iter()
            .enumerate()
            .map(|(i, m)| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| {
                        anyhow!("{file}: metadata `tokenizer.ggml.merges`[{i}] = {m:?} is not two tokens separated by a space")
                    })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    pub(super) fn build(&self, file: &str) -> Result<TextTokenizer> {
        match self.model.as_str() {
            "gpt2" => self.build_byte_level(file),
            "llama" if gemma::is_gemma(self.arch.as_deref()) => self.build_gemma(file),
            "llama" => self.build_sentencepiece(file),
            other => bail!(
                "{file}: tokenizer model `{other}` (metadata `tokenizer.ggml.model`) is not supported; softprompt supports `gpt2` (byte-level BPE) and `llama` (SentencePiece BPE)"
            ),
        }
    }

    fn build_byte_level(&self, file: &str) -> Result<TextTokenizer> {
        let merges = self.explicit_merges(file)?.ok_or_else(|| {
            anyhow!("{file}: metadata key `tokenizer.ggml.merges` is missing (required for a `gpt2` tokenizer)")
        })?;
        let pre = byte_level_pre_tokenizer(self.pre.as_deref(), file)?;
        let mut builder = BPE::builder().vocab_and_merges(self.bpe_vocab(), merges);
        if let Some(unk) = self.unk {
            builder = builder.unk_token(self.tokens[unk as usize].clone());
        }
        let bpe = builder
            .build()
            .map_err(|e| anyhow!("{file}: cannot build the BPE tokenizer from its vocabulary and merges: {e}"))?;
        let mut tok = Tokenizer::new(bpe);
        tok.with_pre_tokenizer(Some(pre));
        tok.with_decoder(Some(ByteLevel::new(false, true, true)));
        let specials: Vec<AddedToken> = (0..self.tokens.len())
            .filter(|&i| matches!(self.token_type(i), TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
            .map(|i| AddedToken::from(self.tokens[i].clone(), true).normalized(false))
            .collect();
        tok.add_special_tokens(&specials);
        self.finish(tok, self.add_bos.unwrap_or(false), self.add_eos.unwrap_or(false), file)
    }

    fn build_sentencepiece(&self, file: &str) -> Result<TextTokenizer> {
        let merges = match self.explicit_merges(file)? {
            Some(m) => m,
            None => {
                let scores = self.scores.as_ref().ok_or_else(|| {
                    anyhow!("{file}: a `llama` tokenizer needs `tokenizer.ggml.scores` or `tokenizer.ggml.merges`, and neither is present")
                })?;
                spm_merges_from_scores(&self.tokens, scores)
            }
        };
        let mut builder = BPE::builder()
            .vocab_and_merges(self.bpe_vocab(), merges)
            .fuse_unk(true)
            .byte_fallback(true);
        if let Some(unk) = self.unk {
            builder = builder.unk_token(self.tokens[unk as usize].clone());
        }
        let bpe = builder
            .build()
            .map_err(|e| anyhow!("{file}: cannot build the SentencePiece BPE tokenizer from its vocabulary: {e}"))?;
        let mut tok = Tokenizer::new(bpe);

        let add_space_prefix = self.add_space_prefix.unwrap_or(true);
        let mut norm: Vec<NormalizerWrapper> = Vec::new();
        if add_space_prefix {
            norm.push(Prepend::new(SPM_SPACE.to_string()).into());
        }
        norm.push(Replace::new(" ", SPM_SPACE).map_err(|e| anyhow!("{file}: {e}"))?.into());
        tok.with_normalizer(Some(NormalizerSequence::new(norm)));

        let mut dec: Vec<DecoderWrapper> = vec![
            ByteFallback::new().into(),
            Fuse::new().into(),
            Replace::new(SPM_SPACE, " ").map_err(|e| anyhow!("{file}: {e}"))?.into(),
        ];
        if add_space_prefix {
            dec.push(DecoderStrip::new(' ', 1, 0).into());
        }
        tok.with_decoder(Some(DecoderSequence::new(dec)));

        // As transformers' GGUF converter: control tokens are special; with no token types,
        // unk/bos/eos are.
        let specials: Vec<AddedToken> = match &self.token_types {
            Some(types) => types
                .iter()
                .enumerate()
                .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL)
                .map(|(i, _)| AddedToken::from(self.tokens[i].clone(), true).normalized(false))
                .collect(),
            None => [self.unk, self.bos, self.eos]
                .into_iter()
                .flatten()
                .map(|i| AddedToken::from(self.tokens[i as usize].clone(), true).normalized(false))
                .collect(),
        };
        tok.add_special_tokens(&specials);
        self.finish(tok, self.add_bos.unwrap_or(true), self.add_eos.unwrap_or(false), file)
    }

    /// Adds the post-processor for `add_bos` / `add_eos` and wraps the tokenizer.
    fn finish(&self, mut tok: Tokenizer, add_bos: bool, add_eos: bool, file: &str) -> Result<TextTokenizer> {
        let bos = if add_bos {
            Some(self.bos.ok_or_else(|| {
                anyhow!("{file}: `tokenizer.ggml.add_bos_token` is set but `tokenizer.ggml.bos_token_id` is missing")
            })?)
        } else {
            None
        };
        let eos = if add_eos {
            Some(self.eos.ok_or_else(|| {
                anyhow!("{file}: `tokenizer.ggml.add_eos_token` is set but `tokenizer.ggml.eos_token_id` is missing")
            })?)
        } else {
            None
        };
        if let Some(pp) = template_processor(
            bos.map(|i| (i, &self.tokens[i as usize])),
            eos.map(|i| (i, &self.tokens[i as usize])),
        )
        .map_err(|e| anyhow!("{file}: cannot build the special-token template: {e}"))?
        {
            tok.with_post_processor(Some(pp));
        }
        Ok(TextTokenizer {
            inner: tok,
            bos: self.bos,
            eos: self.eos,
            pad: self.pad,
        })
    }
}

/// The pre-tokenizer llama.cpp uses for a byte-level BPE with pre-tokenizer name `pre`.
fn byte_level_pre_tokenizer(pre: Option<&str>, file: &str) -> Result<PreTokenizerWrapper> {
    let byte_level = |use_regex: bool| PreTokenizerWrapper::from(ByteLevel::new(false, true, use_regex));
    let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
        let s = Split::new(
            SplitPattern::Regex(pattern.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| anyhow!("{file}: cannot compile the pre-tokenizer regex: {e}"))?;
        Ok(PreSequence::new(vec![s.into(), byte_level(false)]).into())
    };
    Ok(match pre {
        None | Some("gpt2") | Some("gpt-2") | Some("default") => byte_level(true),
        // GPT-2's split with every digit on its own (SmolLM's HF tokenizer.json does the same).
        Some("smollm") | Some("starcoder") | Some("refact") => {
            PreSequence::new(vec![Digits::new(true).into(), byte_level(true)]).into()
        }
        Some("qwen2") => split(QWEN2_PATTERN)?,
        Some("llama-bpe") | Some("llama3") | Some("llama-v3") => split(LLAMA3_PATTERN)?,
        Some(other) => bail!(
            "{file}: pre-tokenizer `{other}` (metadata `tokenizer.ggml.pre`) is not supported; supported: gpt2, gpt-2, default, smollm, starcoder, refact, qwen2, llama-bpe"
        ),
    })
}

/// A template post-processor adding BOS before and/or EOS after each sequence; `None` when neither.
fn template_processor(
    bos: Option<(u32, &String)>,
    eos: Option<(u32, &String)>,
) -> std::result::Result<Option<TemplateProcessing>, String> {
    if bos.is_none() && eos.is_none() {
        return Ok(None);
    }
    // Template keys are our own names, so token text with spaces or ':' cannot confuse the parser.
    let mut specials = Vec::new();
    let mut single = Vec::new();
    let mut pair = Vec::new();
    if let Some((id, tok)) = bos {
        specials.push(SpecialToken::new("BOS".into(), vec![id], vec![tok.clone()]).map_err(|e| e.to_string())?);
        single.push("BOS");
    }
    single.push("$A");
    if let Some((id, tok)) = eos {
        specials.push(SpecialToken::new("EOS".into(), vec![id], vec![tok.clone()]).map_err(|e| e.to_string())?);
        single.push("EOS");
    }
    pair.extend(single.iter().copied());
    pair.extend(single.iter().map(|p| match *p {
        "$A" => "$B:1",
        "BOS" => "BOS:1",
        _ => "EOS:1",
    }));
    let pp = TemplateProcessing::builder()
        .single(Template::try_from(single)?)
        .pair(Template::try_from(pair)?)
        .special_tokens(specials)
        .build()
        .map_err(|e| e.to_string())?;
    Ok(Some(pp))
}

/// Merges for a SentencePiece vocabulary, derived from the scores exactly as transformers'
/// `GGUFTokenizerSkeleton` does: every split of a token into two tokens is a merge; merges are
/// ordered by the merged token's score (higher first), ties by the pieces' scores (higher first),
/// then by vocabulary order.
fn spm_merges_from_scores(tokens: &[String], scores: &[f64]) -> Vec<(String, String)> {
    // token → score of its last occurrence; iteration in order of first occurrence.
    let mut score: HashMap<&str, f64> = HashMap::with_capacity(tokens.len());
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    for (t, &s) in tokens.iter().zip(scores) {
        if score.insert(t.as_str(), s).is_none() {
            order.push(t.as_str());
        }
    }
    let mut merges: Vec<(&str, &str, f64)> = Vec::new();
    for merged in order {
        let piece_score = score[merged];
        let mut local: Vec<(&str, &str, f64)> = merged
            .char_indices()
            .skip(1)
            .map(|(i, _)| merged.split_at(i))
            .filter(|(l, r)| score.contains_key(l) && score.contains_key(r))
            .map(|(l, r)| (l, r, piece_score))
            .collect();
        local.sort_by(|a, b| {
            let ka = (score[a.0], score[a.1]);
            let kb = (score[b.0], score[b.1]);
            kb.0.total_cmp(&ka.0).then(kb.1.total_cmp(&ka.1))
        });
        merges.extend(local);
    }
    merges.sort_by(|a, b| b.2.total_cmp(&a.2));
    merges
        .into_iter()
        .map(|(l, r, _)| (l.to_string(), r.to_string()))
        .collect()
}

mod gemma;
#[cfg(test)]
mod tests;
