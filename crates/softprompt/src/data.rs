//! JSONL data sets.
//!
//! A data set is a text file with one JSON object per line (blank lines are skipped):
//!
//! ```text
//! {"text": "A gripping, funny film.", "label": "positive"}
//! {"text": "Two hours I will never get back.", "label": "negative"}
//! ```
//!
//! [`read_jsonl`] reads such a file into a [`DataSet`]: its source path plus one [`Record`] per
//! row, and every record remembers the (1-based) line it came from, so that later errors can name
//! the place as `FILE:LINE` ([`DataSet::origin`]). [`field_text`] turns a field of a row into the
//! text a template inserts.
//!
//! Nothing here panics on bad input; every error names the file and line, or the origin and field.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// One JSON object: field name → value (serde_json keeps the keys sorted by name).
pub type Row = serde_json::Map<String, Value>;

/// One row of a data set and the line of the file it was read from.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// 1-based line number in [`DataSet::source`].
    pub line: usize,
    /// The row's fields.
    pub row: Row,
}

/// The rows of one JSONL file, in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct DataSet {
    /// The file the rows were read from (used in messages).
    pub source: PathBuf,
    /// One record per non-blank line; never empty when built by [`read_jsonl`] or
    /// [`DataSet::parse`].
    pub records: Vec<Record>,
}

impl DataSet {
    /// Parses JSONL text that came from `source` (the path is only used in messages).
    ///
    /// Every non-blank line must be one JSON object. Errors: `FILE:LINE: invalid JSON: ...`,
    /// `FILE:LINE: expected a JSON object, found ...`, and `FILE: the data set is empty ...` when
    /// there is no row at all.
    pub fn parse(source: impl Into<PathBuf>, text: &str) -> Result<Self> {
        parse_lines(source.into(), text.as_bytes())
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether there is no row.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// `FILE:LINE` of a record, for messages (e.g. `data/train.jsonl:17`).
    pub fn origin(&self, record: &Record) -> String {
        origin(&self.source, record.line)
    }

    /// Every row with its `FILE:LINE` origin.
    pub fn rows(&self) -> impl Iterator<Item = (String, &Row)> + '_ {
        self.records.iter().map(|r| (self.origin(r), &r.row))
    }

    /// The names of the fields found in the rows, each once: those of the first row, then new
    /// ones of later rows (within a row in the map's key order, which serde_json sorts by name).
    pub fn field_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        for r in &self.records {
            for k in r.row.keys() {
                if !names.contains(&k.as_str()) {
                    names.push(k);
                }
            }
        }
        names
    }
}

/// `FILE:LINE`, the way messages name a row.
pub fn origin(source: &Path, line: usize) -> String {
    format!("{}:{line}", source.display())
}

/// Reads a JSONL file: one JSON object per non-blank line.
///
/// Errors name the file, and for a bad line the line: `FILE:LINE: invalid JSON: ...`,
/// `FILE:LINE: expected a JSON object, found an array`, `FILE:LINE: not valid UTF-8`; a file
/// without any row is an error too (`FILE: the data set is empty ...`).
pub fn read_jsonl(path: &Path) -> Result<DataSet> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read data set {}", path.display()))?;
    parse_lines(path.to_path_buf(), &bytes)
}

fn parse_lines(source: PathBuf, bytes: &[u8]) -> Result<DataSet> {
    let file = source.display().to_string();
    let mut records = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let Ok(mut text) = std::str::from_utf8(raw) else {
            bail!("{file}:{line}: not valid UTF-8");
        };
        if line == 1 {
            text = text.strip_prefix('\u{feff}').unwrap_or(text);
        }
        if text.trim().is_empty() {
            continue;
        }
        let value: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => bail!("{file}:{line}: invalid JSON: {}", json_error(&e)),
        };
        match value {
            Value::Object(row) => records.push(Record { line, row }),
            other => bail!("{file}:{line}: expected a JSON object, found {}", describe(&other)),
        }
    }
    if records.is_empty() {
        bail!("{file}: the data set is empty (expected one JSON object per line)");
    }
    Ok(DataSet { source, records })
}

/// serde_json's message with the column, without its "at line 1" (each line is parsed alone).
fn json_error(e: &serde_json::Error) -> String {
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    match full.strip_suffix(&suffix) {
        Some(msg) => format!("{msg} (column {})", e.column()),
        None => full,
    }
}

/// "a string", "an array", ... for messages.
fn describe(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The text of a row's field, as a template inserts it: strings as they are, numbers and bools
/// written out (`3`, `0.5`, `true`).
///
/// `origin` names the row in messages (e.g. `data/train.jsonl:17`). A missing field is an error
/// that lists the fields the row has; `null`, arrays and objects are errors too.
pub fn field_text(row: &Row, field: &str, origin: &str) -> Result<String> {
    match row.get(field) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(Value::Bool(b)) => Ok(b.to_string()),
        Some(other) => bail!(
            "{origin}: field `{field}` is {}; expected a string, number or bool",
            describe(other)
        ),
        None if row.is_empty() => bail!("{origin}: no field `{field}` (the row has no fields)"),
        None => {
            let have: Vec<String> = row.keys().map(|k| format!("`{k}`")).collect();
            bail!("{origin}: no field `{field}` (the row has fields {})", have.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rows_with_line_numbers() {
        let ds = DataSet::parse("t.jsonl", "\u{feff}{\"a\": 1}\r\n\n  \n{\"a\": \"x\"}\n").unwrap();
        assert_eq!(ds.len(), 2);
        assert_eq!(ds.records[0].line, 1);
        assert_eq!(ds.records[1].line, 4);
        assert_eq!(ds.origin(&ds.records[1]), "t.jsonl:4");
        assert_eq!(field_text(&ds.records[0].row, "a", "o").unwrap(), "1");
    }

    #[test]
    fn errors_name_the_line() {
        let e = DataSet::parse("t.jsonl", "{\"a\": 1}\n{\"a\": }\n").unwrap_err();
        assert!(e.to_string().starts_with("t.jsonl:2: invalid JSON: "), "{e}");
        let e = DataSet::parse("t.jsonl", "{}\n[1]\n").unwrap_err();
        assert_eq!(e.to_string(), "t.jsonl:2: expected a JSON object, found an array");
        let e = DataSet::parse("t.jsonl", "\n \n").unwrap_err();
        assert!(e.to_string().starts_with("t.jsonl: the data set is empty"), "{e}");
    }
}
