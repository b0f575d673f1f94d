//! Templates and JSONL data sets, with the real MiniLM (BERT WordPiece) and SmolLM2 (byte-level
//! BPE) tokenizers.

use softprompt::data::{field_text, read_jsonl, DataSet, Row};
use softprompt::template::{Segment, SpecialTokens, Template, Token};
use softprompt::tokenizer::TextTokenizer;
use std::path::{Path, PathBuf};

mod common;

fn smollm2() -> TextTokenizer {
    common::smollm2_tokenizer()
}

fn minilm() -> TextTokenizer {
    common::minilm_tokenizer()
}

/// The file `dir/name` with the given contents.
fn write_file(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

fn row(json: &str) -> Row {
    match serde_json::from_str(json).unwrap() {
        serde_json::Value::Object(m) => m,
        _ => panic!("not an object: {json}"),
    }
}

fn soft(tokens: std::ops::Range<usize>, name: Option<&str>, shared: bool, column: usize) -> Segment {
    Segment::Soft {
        tokens,
        name: name.map(str::to_string),
        shared,
        column,
    }
}

fn text(s: &str) -> Segment {
    Segment::Text(s.to_string())
}

fn field(name: &str, column: usize) -> Segment {
    Segment::Field {
        name: name.to_string(),
        column,
    }
}

fn ids(v: &[u32]) -> Vec<Token> {
    v.iter().map(|&i| Token::Id(i)).collect()
}

fn softs(r: std::ops::Range<usize>) -> Vec<Token> {
    r.map(Token::Soft).collect()
}

fn cat(parts: &[Vec<Token>]) -> Vec<Token> {
    parts.concat()
}

// ---------------------------------------------------------------- parsing

#[test]
fn parses_the_example_template() {
    let t = Template::parse("[soft:4] Review: {text} [soft:2] Sentiment: {label}").unwrap();
    assert_eq!(
        t.segments(),
        &[
            soft(0..4, None, false, 1),
            text(" Review: "),
            field("text", 18),
            text(" "),
            soft(4..6, None, false, 25),
            text(" Sentiment: "),
            field("label", 45),
        ]
    );
    assert_eq!(t.num_virtual_tokens(), 6);
    assert_eq!(t.num_soft_positions(), 6);
    assert_eq!(t.fields(), ["text", "label"]);
    assert!(t.target().is_none());
}

#[test]
fn parses_prompt_tuning_template_with_escapes() {
    let t = Template::parse(r"[soft:20]Review: {text}\nSentiment:").unwrap();
    assert_eq!(
        t.segments(),
        &[
            soft(0..20, None, false, 1),
            text("Review: "),
            field("text", 18),
            text("\nSentiment:"),
        ]
    );
    assert_eq!(t.num_virtual_tokens(), 20);

    let t = Template::parse(r"a\tb\\n{{x}} [[y]] c\d").unwrap();
    assert_eq!(t.segments(), &[text("a\tb\\n{x} [y] c\\d")]);
    assert_eq!(t.num_virtual_tokens(), 0);
    assert!(t.fields().is_empty());

    // Real newlines and spaces are literal too; repeated fields are listed once.
    let t = Template::parse("{a}\n {b} {a}").unwrap();
    assert_eq!(t.fields(), ["a", "b"]);
}

#[test]
fn shared_soft_tokens_reuse_indices() {
    let t = Template::parse("[soft:3@q] Q: {q} [soft@q] A: [soft:2] {a} [soft:1@end][soft@end]").unwrap();
    assert_eq!(
        t.segments(),
        &[
            soft(0..3, Some("q"), false, 1),
            text(" Q: "),
            field("q", 15),
            text(" "),
            soft(0..3, Some("q"), true, 19),
            text(" A: "),
            soft(3..5, None, false, 31),
            text(" "),
            field("a", 40),
            text(" "),
            soft(5..6, Some("end"), false, 44),
            soft(5..6, Some("end"), true, 56),
        ]
    );
    assert_eq!(t.num_virtual_tokens(), 6);
    assert_eq!(t.num_soft_positions(), 10);
}

#[test]
fn template_errors_name_the_column() {
    let cases: &[(&str, usize, &str)] = &[
        ("Review: {text", 9, "unclosed `{`"),
        ("{a{b}", 1, "unclosed `{`"),
        ("ab}", 3, "unmatched `}`"),
        ("a]", 2, "unmatched `]`"),
        ("x [soft:4", 3, "unclosed `[`"),
        ("[hard:4] x", 1, "unknown directive `[hard:4]`"),
        ("[softer] x", 1, "unknown directive"),
        ("ab[soft:0]", 3, "N must be at least 1"),
        ("[soft:x]", 1, "N must be a positive whole number"),
        ("[soft:-2]", 1, "N must be a positive whole number"),
        ("[soft:]", 1, "N must be a positive whole number"),
        ("[soft:99999999999999999999999]", 1, "too large"),
        ("[soft]", 1, "needs a count"),
        ("a [soft@x] [soft:2@x]", 3, "no earlier `[soft:N@x]`"),
        ("[soft:2@x] [soft:3@x]", 12, "already allocated at column 1"),
        ("[soft:2@]", 1, "empty soft-token name"),
        ("[soft:2@a b]", 1, "may only use"),
        ("a {}", 3, "empty field name"),
        ("é{x", 2, "unclosed `{`"),
        (r"\n[x]", 3, "unknown directive"),
    ];
    for (src, column, what) in cases {
        let err = Template::parse(src).expect_err(src).to_string();
        let prefix = format!("template column {column}: ");
        assert!(err.starts_with(&prefix), "{src:?}: {err}");
        assert!(err.contains(what), "{src:?}: {err}");
    }
}

// ---------------------------------------------------------------- targets

#[test]
fn final_target_slot_moves_trailing_spaces() {
    let t = Template::parse(r"[soft:4]Review: {text}\nSentiment: {label}")
        .unwrap()
        .with_target("label")
        .unwrap();
    assert_eq!(
        t.segments(),
        &[
            soft(0..4, None, false, 1),
            text("Review: "),
            field("text", 17),
            text("\nSentiment:"),
        ]
    );
    assert_eq!(t.fields(), ["text"]);
    let target = t.target().unwrap();
    assert_eq!(target.field, "label");
    assert_eq!(target.prefix, " ");
    let r = row(r#"{"text": "fun", "label": "positive"}"#);
    assert_eq!(t.target_text(&r, "x:1").unwrap(), " positive");

    // Tabs move, newlines stay in the prompt.
    let t = Template::parse("Q: {q}\nA:\t {a}").unwrap().with_target("a").unwrap();
    assert_eq!(t.segments().last(), Some(&text("\nA:")));
    assert_eq!(t.target().unwrap().prefix, "\t ");
    let t = Template::parse("Q: {q}\nA:\n{a}").unwrap().with_target("a").unwrap();
    assert_eq!(t.segments().last(), Some(&text("\nA:\n")));
    assert_eq!(t.target().unwrap().prefix, "");

    // Only whitespace between the last field and the target: the text segment disappears.
    let t = Template::parse("{text} {target}")
        .unwrap()
        .with_target("target")
        .unwrap();
    assert_eq!(t.segments(), &[field("text", 1)]);
    assert_eq!(t.target().unwrap().prefix, " ");

    // Directly after a soft token: nothing to move.
    let t = Template::parse("{x}[soft:2]{y}").unwrap().with_target("y").unwrap();
    assert_eq!(t.segments().last(), Some(&soft(0..2, None, false, 4)));
    assert_eq!(t.target().unwrap().prefix, "");
}

#[test]
fn absent_target_is_appended() {
    let t = Template::parse("[soft:20]Review: {text}\nSentiment:").unwrap();
    let before = t.segments().to_vec();
    let t = t.with_target("label").unwrap();
    assert_eq!(t.segments(), before.as_slice());
    assert_eq!(t.target().unwrap().prefix, "");
    assert_eq!(t.fields(), ["text"]);
    let r = row(r#"{"text": "fun", "label": "positive"}"#);
    assert_eq!(t.target_text(&r, "x:1").unwrap(), "positive");

    // Trailing spaces move in this case too.
    let t = Template::parse("Sentiment: ").unwrap().with_target("label").unwrap();
    assert_eq!(t.segments(), &[text("Sentiment:")]);
    assert_eq!(t.target().unwrap().prefix, " ");
}

#[test]
fn target_elsewhere_is_an_error() {
    for (src, column) in [("{label} {text}", 1), ("a {label} b {label}", 3), ("{label}{label}", 1)] {
        let err = Template::parse(src)
            .unwrap()
            .with_target("label")
            .expect_err(src)
            .to_string();
        assert!(err.starts_with(&format!("template column {column}: ")), "{src}: {err}");
        assert!(err.contains("must be the last item"), "{src}: {err}");
    }
    let err = Template::parse("{a} {b}")
        .unwrap()
        .with_target("b")
        .unwrap()
        .with_target("a")
        .unwrap_err();
    assert!(err.to_string().contains("already has the target field `b`"), "{err}");
    assert!(Template::parse("{a}").unwrap().with_target("").is_err());
    let t = Template::parse("{a}").unwrap();
    let err = t.target_text(&row(r#"{"a": "x"}"#), "f:1").unwrap_err();
    assert!(err.to_string().contains("no target field"), "{err}");
}

// ---------------------------------------------------------------- encoding

#[test]
fn special_tokens_of_real_tokenizers() {
    let bert = minilm();
    let s = SpecialTokens::of(&bert).unwrap();
    assert_eq!(s.prefix, [bert.token_to_id("[CLS]").unwrap()]);
    assert_eq!(s.suffix, [bert.token_to_id("[SEP]").unwrap()]);
    let s = SpecialTokens::of(&smollm2()).unwrap();
    assert!(s.is_empty(), "{s:?}");
}

#[test]
fn encode_places_soft_tokens_and_specials_bert() {
    let tok = minilm();
    let sp = SpecialTokens::of(&tok).unwrap();
    let (cls, sep) = (sp.prefix.clone(), sp.suffix.clone());
    let r = row(r#"{"text": "A gripping, funny film.", "label": "positive"}"#);
    let enc = |t: &str| tok.encode(t, false).unwrap();

    // Soft tokens in the middle split the text into separately tokenized stretches.
    let t = Template::parse("[soft:3] Review: {text} [soft:2] Sentiment: {label}")
        .unwrap()
        .with_target("label")
        .unwrap();
    let e = t.encode(&r, "r:1", &tok, &sp, 512, 4).unwrap();
    assert_eq!(
        e.tokens,
        cat(&[
            softs(0..3),
            ids(&cls),
            ids(&enc(" Review: A gripping, funny film. ")),
            softs(3..5),
            ids(&enc(" Sentiment:")),
            ids(&sep),
        ])
    );
    assert_eq!(e.target_prefix, " ");
    assert!(!e.truncated);

    // Leading soft tokens only: the rest equals tokenizing the whole rendered text.
    let t = Template::parse(r"[soft:4]Review: {text}\nSentiment:").unwrap();
    let e = t.encode(&r, "r:1", &tok, &sp, 512, 0).unwrap();
    let whole = tok.encode("Review: A gripping, funny film.\nSentiment:", true).unwrap();
    assert_eq!(e.tokens, cat(&[softs(0..4), ids(&whole)]));
    assert_eq!(e.len(), 4 + whole.len());

    // No soft token at all: exactly `encode(text, true)`.
    let t = Template::parse("Review: {text}").unwrap();
    let e = t.encode(&r, "r:1", &tok, &sp, 512, 0).unwrap();
    assert_eq!(
        e.tokens,
        ids(&tok.encode("Review: A gripping, funny film.", true).unwrap())
    );

    // Trailing soft tokens come after [SEP]; shared ones repeat the same indices.
    let t = Template::parse("[soft:2@p]{text}[soft@p][soft:1]").unwrap();
    let e = t.encode(&r, "r:1", &tok, &sp, 512, 0).unwrap();
    assert_eq!(
        e.tokens,
        cat(&[
            softs(0..2),
            ids(&tok.encode("A gripping, funny film.", true).unwrap()),
            softs(0..2),
            softs(2..3),
        ])
    );

    // No text at all (only soft tokens, or an empty field): specials follow the soft tokens.
    let t = Template::parse("[soft:2]{empty}[soft:1]").unwrap();
    let e = t.encode(&row(r#"{"empty": ""}"#), "r:1", &tok, &sp, 512, 0).unwrap();
    assert_eq!(e.tokens, cat(&[softs(0..3), ids(&cls), ids(&sep)]));
}

#[test]
fn encode_smollm2_prompt_and_target_join_like_plain_text() {
    let tok = smollm2();
    let sp = SpecialTokens::of(&tok).unwrap();
    let t = Template::parse(r"[soft:8]Review: {text}\nSentiment: {label}")
        .unwrap()
        .with_target("label")
        .unwrap();
    let r = row(r#"{"text": "A gripping, funny film.", "label": "positive"}"#);
    let e = t.encode(&r, "r:1", &tok, &sp, 2048, 8).unwrap();
    let prompt = tok
        .encode("Review: A gripping, funny film.\nSentiment:", false)
        .unwrap();
    assert_eq!(e.tokens, cat(&[softs(0..8), ids(&prompt)]));
    let target = t.target_text(&r, "r:1").unwrap();
    assert_eq!(target, " positive");
    let target_ids = tok.encode(&target, false).unwrap();
    assert_eq!(target_ids.len(), 1, "` positive` should be one token");
    let whole = tok
        .encode("Review: A gripping, funny film.\nSentiment: positive", false)
        .unwrap();
    assert_eq!([prompt, target_ids].concat(), whole);

    // Soft tokens in the middle.
    let t = Template::parse("[soft:2]Q: {text}[soft:3]\nA:").unwrap();
    let e = t.encode(&r, "r:1", &tok, &sp, 2048, 0).unwrap();
    assert_eq!(
        e.tokens,
        cat(&[
            softs(0..2),
            ids(&tok.encode("Q: A gripping, funny film.", false).unwrap()),
            softs(2..5),
            ids(&tok.encode("\nA:", false).unwrap()),
        ])
    );
}

#[test]
fn facts_targets_tokenize_like_the_whole_sentence_smollm2() {
    let tok = smollm2();
    let sp = SpecialTokens::of(&tok).unwrap();
    let t = Template::parse("[soft:10]{text} {target}")
        .unwrap()
        .with_target("target")
        .unwrap();
    for rel in [
        "facts-countries/capital/train.jsonl",
        "facts-countries/continent/dev.jsonl",
    ] {
        let ds = read_jsonl(&common::data(rel)).unwrap();
        assert!(ds.len() >= 25, "{rel}: {} rows", ds.len());
        for (origin, r) in ds.rows() {
            let e = t.encode(r, &origin, &tok, &sp, 256, 16).unwrap();
            assert_eq!(e.tokens[..10], softs(0..10)[..], "{origin}");
            let prompt: Vec<u32> = e.tokens[10..]
                .iter()
                .map(|t| match t {
                    Token::Id(i) => *i,
                    Token::Soft(_) => panic!("{origin}: soft token after the prefix"),
                })
                .collect();
            let target = t.target_text(r, &origin).unwrap();
            assert!(target.starts_with(' '), "{origin}: {target:?}");
            let sentence = format!("{}{target}", field_text(r, "text", &origin).unwrap());
            let whole = tok.encode(&sentence, false).unwrap();
            let split = [prompt, tok.encode(&target, false).unwrap()].concat();
            assert_eq!(split, whole, "{origin}: {sentence:?}");
        }
    }
}

#[test]
fn encode_reports_missing_fields_with_origin() {
    let tok = minilm();
    let sp = SpecialTokens::of(&tok).unwrap();
    let t = Template::parse("[soft:2]{text} {title}").unwrap();
    let err = t
        .encode(
            &row(r#"{"text": "x", "label": 1}"#),
            "data/train.jsonl:17",
            &tok,
            &sp,
            64,
            0,
        )
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("data/train.jsonl:17: no field `title`"), "{err}");
    assert!(err.contains("(the row has fields "), "{err}");
    assert!(err.contains("`text`") && err.contains("`label`"), "{err}");
}

// ---------------------------------------------------------------- truncation

#[test]
fn truncation_cuts_the_field_value_and_keeps_the_rest() {
    let tok = minilm();
    let sp = SpecialTokens::of(&tok).unwrap();
    let t = Template::parse(r"[soft:5]Review: {text}\nSentiment: {label}")
        .unwrap()
        .with_target("label")
        .unwrap();
    let long = "an utterly wonderful film with a cast that never misses a beat ".repeat(20);
    let r = row(&serde_json::json!({"text": long, "label": "positive"}).to_string());
    let (max_len, reserve) = (40, 3);
    let e = t.encode(&r, "r:1", &tok, &sp, max_len, reserve).unwrap();
    assert!(e.truncated);
    assert!(e.len() <= max_len - reserve, "{} tokens", e.len());
    assert!(e.len() >= max_len - reserve - 2, "cut too much: {} tokens", e.len());
    let cls = tok.token_to_id("[CLS]").unwrap();
    let sep = tok.token_to_id("[SEP]").unwrap();
    let head = cat(&[
        softs(0..5),
        ids(&[cls]),
        ids(&tok.encode("Review: an utterly", false).unwrap()),
    ]);
    assert_eq!(e.tokens[..head.len()], head[..]);
    let tail = cat(&[ids(&tok.encode("\nSentiment:", false).unwrap()), ids(&[sep])]);
    assert_eq!(e.tokens[e.len() - tail.len()..], tail[..]);

    // Enough room: nothing is cut.
    let e = t.encode(&r, "r:1", &tok, &sp, 512, reserve).unwrap();
    assert!(!e.truncated);
    assert_eq!(
        e.len(),
        5 + tok.encode(&format!("Review: {long}\nSentiment:"), true).unwrap().len()
    );
}

#[test]
fn truncation_takes_the_longest_field_first() {
    let tok = smollm2();
    let sp = SpecialTokens::none();
    let t = Template::parse("[soft:2]{premise} [soft:1] Question: {hypothesis}? Answer:").unwrap();
    let premise = "The quick brown fox jumps over the lazy dog near the river bank. ".repeat(6);
    let r = row(&serde_json::json!({"premise": premise, "hypothesis": "A fox jumps"}).to_string());
    let tail = tok.encode(" Question: A fox jumps? Answer:", false).unwrap();
    let e = t.encode(&r, "r:1", &tok, &sp, 30, 0).unwrap();
    assert!(e.truncated);
    assert!(e.len() <= 30 && e.len() >= 27, "{} tokens", e.len());
    assert_eq!(
        e.tokens[e.len() - tail.len() - 1..],
        cat(&[softs(2..3), ids(&tail)])[..]
    );

    // So short that the premise goes entirely and the hypothesis is cut too.
    let e = t.encode(&r, "r:1", &tok, &sp, 10, 0).unwrap();
    assert!(e.truncated);
    assert!(e.len() <= 10, "{} tokens", e.len());
    let space = tok.encode(" ", false).unwrap();
    let head = cat(&[softs(0..2), ids(&space), softs(2..3)]);
    assert_eq!(e.tokens[..head.len()], head[..]);
    let rest: Vec<u32> = e.tokens[head.len()..]
        .iter()
        .map(|t| match t {
            Token::Id(i) => *i,
            Token::Soft(_) => panic!("soft token in the last text stretch"),
        })
        .collect();
    let rest = tok.decode(&rest, false).unwrap();
    assert!(rest.starts_with(" Question: "), "{rest:?}");
    assert!(rest.ends_with("? Answer:"), "{rest:?}");
    assert!(!rest.contains("fox jumps"), "{rest:?}");
}

#[test]
fn truncation_fails_when_literal_text_does_not_fit() {
    let tok = minilm();
    let sp = SpecialTokens::of(&tok).unwrap();
    let t = Template::parse("[soft:20]Here is a fairly long instruction for the model: {text}").unwrap();
    let r = row(r#"{"text": "short"}"#);
    let err = t
        .encode(&r, "data/x.jsonl:3", &tok, &sp, 24, 2)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("data/x.jsonl:3: the prompt does not fit in max_len 24"),
        "{err}"
    );
    assert!(err.contains("20 soft, 2 special"), "{err}");
    let err = t.encode(&r, "data/x.jsonl:3", &tok, &sp, 4, 5).unwrap_err().to_string();
    assert!(err.starts_with("data/x.jsonl:3: 5 tokens reserved"), "{err}");
}

#[test]
fn whole_sentiment_dev_set_encodes_within_max_len() {
    let tok = minilm();
    let sp = SpecialTokens::of(&tok).unwrap();
    let ds = read_jsonl(&common::data("sentiment-movies/dev.jsonl")).unwrap();
    assert_eq!(ds.len(), 1000);
    let mut names = ds.field_names();
    names.sort();
    assert_eq!(names, ["label", "text"]);
    let t = Template::parse(r"[soft:8]{text}[soft:2]\nSentiment: {label}")
        .unwrap()
        .with_target("label")
        .unwrap();
    let mut truncated = 0;
    for (origin, r) in ds.rows() {
        let e = t.encode(r, &origin, &tok, &sp, 40, 2).unwrap();
        assert!(e.len() <= 38, "{origin}: {} tokens", e.len());
        assert_eq!(e.tokens.iter().filter(|t| matches!(t, Token::Soft(_))).count(), 10);
        assert_eq!(e.target_prefix, " ");
        truncated += e.truncated as usize;
        let label = t.target_text(r, &origin).unwrap();
        assert!(label == " positive" || label == " negative", "{origin}: {label:?}");
    }
    assert!(truncated > 0 && truncated < 1000, "{truncated} truncated");
}

// ---------------------------------------------------------------- JSONL

#[test]
fn reads_real_data_sets() {
    for split in ["train", "dev", "test"] {
        let path = common::data(&format!("sentiment-movies/{split}.jsonl"));
        let ds = read_jsonl(&path).unwrap();
        assert!(ds.len() >= 1000, "{split}: {}", ds.len());
        assert_eq!(ds.source, path);
        let first = &ds.records[0];
        assert_eq!(first.line, 1);
        assert!(!field_text(&first.row, "text", &ds.origin(first)).unwrap().is_empty());
    }
    for task in ["capital", "continent"] {
        let ds = read_jsonl(&common::data(&format!("facts-countries/{task}/train.jsonl"))).unwrap();
        for (origin, r) in ds.rows() {
            field_text(r, "text", &origin).unwrap();
            field_text(r, "target", &origin).unwrap();
        }
    }
}

#[test]
fn jsonl_errors_name_file_and_line() {
    let tmp = common::scratch("template-data");
    let path = write_file(tmp.path(), "bad.jsonl", "{\"text\": \"a\"}\n\n{\"text\": \"b\",}\n");
    let err = read_jsonl(&path).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("{}:3: invalid JSON: ", path.display())),
        "{err}"
    );

    let path = write_file(tmp.path(), "array.jsonl", "{\"text\": \"a\"}\n[\"text\"]\n");
    let err = read_jsonl(&path).unwrap_err().to_string();
    assert_eq!(
        err,
        format!("{}:2: expected a JSON object, found an array", path.display())
    );
    let path = write_file(tmp.path(), "string.jsonl", "\"text\"\n");
    let err = read_jsonl(&path).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("{}:1: expected a JSON object", path.display())),
        "{err}"
    );

    let path = write_file(tmp.path(), "empty.jsonl", "");
    let err = read_jsonl(&path).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("{}: the data set is empty", path.display())),
        "{err}"
    );
    let path = write_file(tmp.path(), "blank.jsonl", "\n  \n\r\n");
    let err = read_jsonl(&path).unwrap_err().to_string();
    assert!(err.contains("empty"), "{err}");

    let path = write_file(tmp.path(), "latin1.jsonl", "{\"a\": 1}\n");
    std::fs::write(&path, b"{\"a\": 1}\n{\"a\": \"caf\xe9\"}\n").unwrap();
    let err = read_jsonl(&path).unwrap_err().to_string();
    assert_eq!(err, format!("{}:2: not valid UTF-8", path.display()));

    let missing = Path::new("/nonexistent/softprompt/data.jsonl");
    let err = format!("{:#}", read_jsonl(missing).unwrap_err());
    assert!(err.contains("/nonexistent/softprompt/data.jsonl"), "{err}");
}

#[test]
fn jsonl_lines_and_values() {
    let tmp = common::scratch("template-data");
    let path = write_file(
        tmp.path(),
        "ok.jsonl",
        "\n{\"text\": \"a\", \"n\": 3, \"x\": 0.5, \"b\": true}\r\n\n{\"text\": \"b\"}",
    );
    let ds = read_jsonl(&path).unwrap();
    assert_eq!(ds.len(), 2);
    assert_eq!(ds.records[0].line, 2);
    assert_eq!(ds.records[1].line, 4);
    assert_eq!(ds.origin(&ds.records[1]), format!("{}:4", path.display()));
    let r = &ds.records[0].row;
    assert_eq!(field_text(r, "text", "o").unwrap(), "a");
    assert_eq!(field_text(r, "n", "o").unwrap(), "3");
    assert_eq!(field_text(r, "x", "o").unwrap(), "0.5");
    assert_eq!(field_text(r, "b", "o").unwrap(), "true");

    let same = DataSet::parse(&path, &std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(same, ds);
}

#[test]
fn field_text_errors_name_origin_and_field() {
    let r = row(r#"{"text": "a", "label": null, "tags": ["x"]}"#);
    let err = field_text(&r, "title", "data/train.jsonl:17").unwrap_err().to_string();
    // serde_json maps list keys sorted by name (unless its `preserve_order` feature is on).
    let listed = ["`label`, `tags`, `text`", "`text`, `label`, `tags`"]
        .map(|f| format!("data/train.jsonl:17: no field `title` (the row has fields {f})"));
    assert!(listed.contains(&err), "{err}");
    let err = field_text(&r, "label", "data/train.jsonl:17").unwrap_err().to_string();
    assert!(err.starts_with("data/train.jsonl:17: field `label` is null"), "{err}");
    let err = field_text(&r, "tags", "f:2").unwrap_err().to_string();
    assert!(err.contains("field `tags` is an array"), "{err}");
    let err = field_text(&Row::new(), "text", "f:1").unwrap_err().to_string();
    assert_eq!(err, "f:1: no field `text` (the row has no fields)");
}
