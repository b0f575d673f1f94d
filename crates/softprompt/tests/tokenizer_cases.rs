//! The tokenizers against the reference ids written by transformers (fixtures/peft/*_tokenizer_cases.json),
//! plus error cases for bad tokenizer files.

use softprompt::gguf::GgufFile;
use softprompt::tokenizer::TextTokenizer;
use std::path::{Path, PathBuf};

struct Case {
    text: String,
    ids: Vec<u32>,
    ids_with_special: Vec<u32>,
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/peft")
}

fn load_cases(name: &str) -> Vec<Case> {
    let path = fixture_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let ids = |c: &serde_json::Value, key: &str| -> Vec<u32> {
        c[key]
            .as_array()
            .unwrap_or_else(|| panic!("{}: case without `{key}`", path.display()))
            .iter()
            .map(|x| x.as_u64().expect("id is an unsigned integer") as u32)
            .collect()
    };
    v["cases"]
        .as_array()
        .unwrap_or_else(|| panic!("{}: no `cases` array", path.display()))
        .iter()
        .map(|c| Case {
            text: c["text"].as_str().expect("case text is a string").to_string(),
            ids: ids(c, "ids"),
            ids_with_special: ids(c, "ids_with_special"),
        })
        .collect()
}

mod common;

fn smollm2() -> TextTokenizer {
    common::smollm2_tokenizer()
}

fn minilm() -> TextTokenizer {
    common::minilm_tokenizer()
}

/// Checks ids with and without special tokens for every case; returns the failures, described.
fn id_failures(tok: &TextTokenizer, cases: &[Case]) -> Vec<String> {
    let mut bad = Vec::new();
    for c in cases {
        let ids = tok.encode(&c.text, false).unwrap();
        if ids != c.ids {
            bad.push(format!("{:?}: ids {ids:?}, expected {:?}", c.text, c.ids));
        }
        let ids = tok.encode(&c.text, true).unwrap();
        if ids != c.ids_with_special {
            bad.push(format!(
                "{:?}: ids_with_special {ids:?}, expected {:?}",
                c.text, c.ids_with_special
            ));
        }
    }
    bad
}

#[test]
fn smollm2_gguf_matches_reference_ids_and_round_trips() {
    let tok = smollm2();
    let cases = load_cases("smollm2_tokenizer_cases.json");
    assert_eq!(cases.len(), 273);
    let mut bad = id_failures(&tok, &cases);
    // Byte-level BPE loses nothing: decoding gives back the exact text, including "\r\n",
    // runs of spaces, non-Latin scripts, emoji and the chat special tokens.
    for c in &cases {
        let back = tok.decode(&c.ids, false).unwrap();
        if back != c.text {
            bad.push(format!("{:?}: decodes to {back:?}", c.text));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} SmolLM2 cases fail:\n{}",
        bad.len(),
        cases.len(),
        bad.join("\n")
    );
}

#[test]
fn smollm2_special_tokens() {
    let tok = smollm2();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), Some(2));
    assert_eq!(tok.pad_id(), Some(2));
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.id_to_token(2).as_deref(), Some("<|im_end|>"));
    assert_eq!(tok.token_to_id("Ġthe"), Some(260));
    // The GGUF says add_bos_token = false: nothing is added.
    assert_eq!(tok.encode("hi", true).unwrap(), tok.encode("hi", false).unwrap());
    // Special tokens can be skipped when decoding.
    let ids = tok.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap();
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nhi");
    // An id outside the vocabulary is an error, not a panic.
    let err = tok.decode(&[5, 49152], false).unwrap_err().to_string();
    assert!(err.contains("49152"), "{err}");
}

#[test]
fn minilm_json_matches_reference_ids_and_round_trips() {
    let tok = minilm();
    let cases = load_cases("minilm_tokenizer_cases.json");
    assert_eq!(cases.len(), 273);
    let mut bad = id_failures(&tok, &cases);
    // BERT's tokenizer is lossy, so decode(encode(text)) is compared with the text as BERT's own
    // normalizer sees it (lower-cased, accents stripped, control characters removed, CJK
    // characters spaced out), with all whitespace removed: WordPiece decoding puts spaces between
    // word pieces ("( a )") and its clean-up removes some (" ," → ","), so only the spacing may
    // differ. The clean-up also rewrites " do not" as " don't", which is undone before comparing.
    // A word with no WordPiece ([UNK], e.g. emoji) cannot come back; those cases are checked
    // against the decoded form with "[UNK]" in place of the word.
    let normalizer = tok
        .inner()
        .get_normalizer()
        .expect("MiniLM's tokenizer.json has a normalizer");
    let squash = |s: &str| s.chars().filter(|c| !c.is_whitespace()).collect::<String>();
    let unk = tok.token_to_id("[UNK]").expect("[UNK] in the vocabulary");
    for c in &cases {
        let back = tok.decode(&c.ids, false).unwrap();
        if c.ids.contains(&unk) {
            if c.text == "emoji 🙂🚀 mixed" {
                if back != "emoji [UNK] mixed" {
                    bad.push(format!("{:?}: decodes to {back:?}", c.text));
                }
            } else {
                bad.push(format!(
                    "{:?}: unexpected [UNK] case, add its decoded form to the test",
                    c.text
                ));
            }
            continue;
        }
        let mut norm = tokenizers::NormalizedString::from(c.text.as_str());
        tokenizers::Normalizer::normalize(normalizer, &mut norm).unwrap();
        let expected = squash(norm.get());
        let got = squash(&back.replace(" don't", " do not"));
        if got != expected {
            bad.push(format!("{:?}: decodes to {back:?}", c.text));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} MiniLM cases fail:\n{}",
        bad.len(),
        cases.len(),
        bad.join("\n")
    );
}

#[test]
fn minilm_special_tokens() {
    let tok = minilm();
    assert_eq!(tok.vocab_size(), 30522);
    assert_eq!(tok.bos_id(), Some(101)); // [CLS]
    assert_eq!(tok.eos_id(), Some(102)); // [SEP]
    assert_eq!(tok.pad_id(), Some(0)); // [PAD]
    assert_eq!(tok.id_to_token(2003).as_deref(), Some("is"));
    // tokenizer.json asks for padding to 128 and truncation at 128; both are dropped.
    let long = "word ".repeat(300);
    assert_eq!(tok.encode(&long, false).unwrap().len(), 300);
    assert_eq!(tok.encode("hello", true).unwrap().len(), 3);
    assert_eq!(
        tok.decode(&tok.encode("Hello, World!", true).unwrap(), true).unwrap(),
        "hello, world!"
    );
}

/// Metadata values for the hand-written GGUF files.
enum Val<'a> {
    Str(&'a str),
    StrArray(&'a [&'a str]),
    I32Array(&'a [i32]),
    U32(u32),
    Bool(bool),
}

/// A GGUF v3 file with the given metadata and no tensors.
fn gguf_bytes(kvs: &[(&str, Val)]) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend(0u64.to_le_bytes()); // tensors
    out.extend((kvs.len() as u64).to_le_bytes());
    for (key, v) in kvs {
        string(&mut out, key);
        match v {
            Val::Str(s) => {
                out.extend(8u32.to_le_bytes());
                string(&mut out, s);
            }
            Val::StrArray(a) => {
                out.extend(9u32.to_le_bytes());
                out.extend(8u32.to_le_bytes());
                out.extend((a.len() as u64).to_le_bytes());
                for s in *a {
                    string(&mut out, s);
                }
            }
            Val::I32Array(a) => {
                out.extend(9u32.to_le_bytes());
                out.extend(5u32.to_le_bytes());
                out.extend((a.len() as u64).to_le_bytes());
                for x in *a {
                    out.extend(x.to_le_bytes());
                }
            }
            Val::U32(x) => {
                out.extend(4u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Val::Bool(b) => {
                out.extend(7u32.to_le_bytes());
                out.push(u8::from(*b));
            }
        }
    }
    out
}

/// A GGUF file holding only the metadata `kvs`, written as `dir/name`.
fn write_gguf(dir: &Path, name: &str, kvs: &[(&str, Val)]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, gguf_bytes(kvs)).unwrap();
    path
}

#[test]
fn gguf_with_unknown_tokenizer_model_is_an_error() {
    let tmp = common::scratch("tokenizer");
    let path = write_gguf(
        tmp.path(),
        "unknown-model.gguf",
        &[
            ("general.architecture", Val::Str("llama")),
            ("tokenizer.ggml.model", Val::Str("rwkv")),
            ("tokenizer.ggml.tokens", Val::StrArray(&["a", "b"])),
        ],
    );
    let gguf = GgufFile::open(&path).unwrap();
    let err = format!(
        "{:#}",
        TextTokenizer::from_gguf(&gguf).err().expect("unknown model must fail")
    );
    assert!(err.contains("rwkv"), "{err}");
    assert!(err.contains(&path.display().to_string()), "{err}");
}

#[test]
fn gguf_with_unknown_pre_tokenizer_or_bad_ids_is_an_error() {
    fn base(pre: &'static str, bos: u32) -> Vec<(&'static str, Val<'static>)> {
        vec![
            ("tokenizer.ggml.model", Val::Str("gpt2")),
            (
                "tokenizer.ggml.pre",
                Val::Str(if pre.is_empty() { "gpt2" } else { pre }),
            ),
            ("tokenizer.ggml.tokens", Val::StrArray(&["a", "b", "ab", "<|end|>"])),
            ("tokenizer.ggml.token_type", Val::I32Array(&[1, 1, 1, 3])),
            ("tokenizer.ggml.merges", Val::StrArray(&["a b"])),
            ("tokenizer.ggml.bos_token_id", Val::U32(bos)),
            ("tokenizer.ggml.add_bos_token", Val::Bool(true)),
        ]
    }
    let tmp = common::scratch("tokenizer");
    let path = write_gguf(tmp.path(), "unknown-pre.gguf", &base("martian", 3));
    let err = format!(
        "{:#}",
        TextTokenizer::from_gguf(&GgufFile::open(&path).unwrap()).err().unwrap()
    );
    assert!(
        err.contains("martian") && err.contains(&path.display().to_string()),
        "{err}"
    );

    let path = write_gguf(tmp.path(), "bad-bos.gguf", &base("", 99));
    let err = format!(
        "{:#}",
        TextTokenizer::from_gguf(&GgufFile::open(&path).unwrap()).err().unwrap()
    );
    assert!(
        err.contains("bos_token_id") && err.contains(&path.display().to_string()),
        "{err}"
    );

    // The same file with a valid BOS works: add_bos_token puts it first; "<|end|>" is one token.
    let path = write_gguf(tmp.path(), "tiny-gpt2.gguf", &base("", 3));
    let tok = TextTokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    assert_eq!(tok.encode("abab<|end|>", false).unwrap(), vec![2, 2, 3]);
    assert_eq!(tok.encode("ab", true).unwrap(), vec![3, 2]);
    assert_eq!(tok.decode(&[2, 0, 3], false).unwrap(), "aba<|end|>");
}

#[test]
fn tokenizer_json_that_is_not_json_is_an_error_naming_the_file() {
    let tmp = common::scratch("tokenizer");
    let path = tmp.path().join("tokenizer.json");
    std::fs::write(&path, "this is { not json").unwrap();
    let err = format!("{:#}", TextTokenizer::from_json_file(&path).err().expect("must fail"));
    assert!(err.contains(&path.display().to_string()), "{err}");

    let missing = tmp.path().join("no-such-dir/tokenizer.json");
    let err = format!(
        "{:#}",
        TextTokenizer::from_json_file(&missing).err().expect("must fail")
    );
    assert!(err.contains(&missing.display().to_string()), "{err}");
}
