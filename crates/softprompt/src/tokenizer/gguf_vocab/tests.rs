//! Unit tests of the GGUF tokenizer builders on tiny hand-made vocabularies.

use super::*;

/// A tiny SentencePiece vocabulary: <unk>, <s>, </s>, the 256 byte tokens, then pieces whose
/// scores make "▁hello" and "▁world" whole tokens.
fn spm_vocab(add_space_prefix: bool) -> GgufVocab {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut scores = vec![0.0, 0.0, 0.0];
    let mut types = vec![2, 3, 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        scores.push(0.0);
        types.push(6);
    }
    for c in ["▁", "h", "e", "l", "o", "w", "r", "d"] {
        tokens.push(c.into());
        scores.push(-100.0);
        types.push(1);
    }
    let pieces = ["▁h", "ll", "▁he", "llo", "▁hello", "▁w", "or", "▁wor", "ld", "▁world"];
    for (i, p) in pieces.iter().enumerate() {
        tokens.push((*p).into());
        scores.push(-(i as f64) - 1.0);
        types.push(1);
    }
    GgufVocab {
        model: "llama".into(),
        tokens,
        scores: Some(scores),
        token_types: Some(types),
        bos: Some(1),
        eos: Some(2),
        unk: Some(0),
        add_space_prefix: Some(add_space_prefix),
        ..Default::default()
    }
}

fn ids(tok: &TextTokenizer, pieces: &[&str]) -> Vec<u32> {
    pieces
        .iter()
        .map(|p| tok.token_to_id(p).unwrap_or_else(|| panic!("{p} not in vocab")))
        .collect()
}

#[test]
fn merges_follow_scores() {
    let v = spm_vocab(true);
    let merges = spm_merges_from_scores(&v.tokens, v.scores.as_ref().unwrap());
    let m: Vec<(&str, &str)> = merges.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    assert_eq!(
        m,
        [
            ("▁", "h"),
            ("l", "l"),
            ("▁h", "e"),
            ("ll", "o"),
            ("▁he", "llo"),
            ("▁", "w"),
            ("o", "r"),
            ("▁w", "or"),
            ("l", "d"),
            ("▁wor", "ld")
        ]
    );
}

#[test]
fn sentencepiece_encodes_and_round_trips() {
    let tok = spm_vocab(true).build("synthetic.gguf").unwrap();
    assert_eq!(tok.vocab_size(), 3 + 256 + 8 + 10);
    assert_eq!(
        tok.encode("hello world", false).unwrap(),
        ids(&tok, &["▁hello", "▁world"])
    );
    // add_bos_token defaults to true for SentencePiece.
    assert_eq!(
        tok.encode("hello world", true).unwrap(),
        ids(&tok, &["<s>", "▁hello", "▁world"])
    );
    // "é" is not in the vocabulary: byte fallback to its two UTF-8 bytes.
    let he = tok.encode("hé", false).unwrap();
    assert_eq!(he, ids(&tok, &["▁h", "<0xC3>", "<0xA9>"]));
    // Control tokens in the text are single ids.
    assert_eq!(
        tok.encode("<s>hello</s>", false).unwrap(),
        ids(&tok, &["<s>", "▁hello", "</s>"])
    );
    for text in ["hello world", "hé", "world hello  hello", "wörld\n"] {
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(tok.decode(&ids, true).unwrap(), text, "{ids:?}");
    }
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), Some(2));
    assert_eq!(tok.pad_id(), None);
}

#[test]
fn sentencepiece_without_space_prefix() {
    let tok = spm_vocab(false).build("synthetic.gguf").unwrap();
    assert_eq!(
        tok.encode("hello world", false).unwrap(),
        ids(&tok, &["h", "e", "llo", "▁world"])
    );
    assert_eq!(
        tok.decode(&tok.encode("hello world", false).unwrap(), false).unwrap(),
        "hello world"
    );
}

#[test]
fn bad_vocabularies_are_errors() {
    let mut v = spm_vocab(true);
    v.scores = None;
    let err = v.build("x.gguf").err().unwrap().to_string();
    assert!(err.contains("x.gguf") && err.contains("scores"), "{err}");

    let mut v = spm_vocab(true);
    v.model = "bert".into();
    let err = v.build("x.gguf").err().unwrap().to_string();
    assert!(err.contains("x.gguf") && err.contains("`bert`"), "{err}");

    let mut v = spm_vocab(true);
    v.model = "gpt2".into();
    v.merges = Some(vec!["nospace".into()]);
    let err = v.build("x.gguf").err().unwrap().to_string();
    assert!(err.contains("nospace"), "{err}");

    v.merges = Some(vec!["zz q".into()]);
    let err = v.build("x.gguf").err().unwrap().to_string();
    assert!(err.contains("x.gguf"), "{err}");
}

#[test]
fn pre_tokenizer_regexes_compile() {
    for pre in ["gpt2", "smollm", "qwen2", "llama-bpe"] {
        byte_level_pre_tokenizer(Some(pre), "x.gguf").unwrap();
    }
    assert!(byte_level_pre_tokenizer(Some("nope"), "x.gguf").is_err());
}
