//! Property tests: the template parser and the JSONL reader return an error, never panic, on
//! any input (arbitrary text, text made of the characters their syntax gives meaning to, and
//! arbitrary bytes).

mod common;
use proptest::prelude::*;
use softprompt::data::DataSet;
use softprompt::template::Template;

/// Text drawn from the characters the template syntax gives meaning to, plus a few others.
fn template_like() -> impl Strategy<Value = String> {
    let chars = vec![
        '{', '}', '[', ']', '\\', 's', 'o', 'f', 't', ':', '@', '0', '1', '9', 'n', 'x', ' ', '\n', 'é', '—',
    ];
    prop::collection::vec(prop::sample::select(chars), 0..64).prop_map(String::from_iter)
}

/// Text drawn from the characters JSON gives meaning to.
fn jsonl_like() -> impl Strategy<Value = String> {
    let chars = vec![
        '{', '}', '[', ']', '"', ':', ',', '\\', 'u', '0', '1', 'e', '-', '.', 'a', 't', 'n', 'l', ' ', '\n', '\r',
        '\u{feff}',
    ];
    prop::collection::vec(prop::sample::select(chars), 0..96).prop_map(String::from_iter)
}

fn parse_template(src: &str) {
    if let Ok(t) = Template::parse(src) {
        let _ = t.num_virtual_tokens();
        let _ = t.fields();
        if let Ok(t) = t.with_target("label") {
            let _ = t.target();
        }
    }
}

fn read_rows(bytes: &[u8]) {
    let dir = common::scratch("never-panics");
    let path = dir.path().join("rows.jsonl");
    std::fs::write(&path, bytes).unwrap();
    if let Ok(ds) = softprompt::data::read_jsonl(&path) {
        assert!(!ds.is_empty());
        for (origin, row) in ds.rows() {
            let _ = softprompt::data::field_text(row, "text", &origin);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn template_parser_never_panics_on_any_text(src in any::<String>()) {
        parse_template(&src);
    }

    #[test]
    fn template_parser_never_panics_on_template_like_text(src in template_like()) {
        parse_template(&src);
    }

    #[test]
    fn jsonl_reader_never_panics_on_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        read_rows(&bytes);
        let _ = DataSet::parse("rows.jsonl", &String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn jsonl_reader_never_panics_on_json_like_text(text in jsonl_like()) {
        let _ = DataSet::parse("rows.jsonl", &text);
        read_rows(text.as_bytes());
    }
}
