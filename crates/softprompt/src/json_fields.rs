//! Typed access to the fields of a JSON object (`config.json`, `adapter_config.json`) with
//! errors that name the field and, when given, the file.

use anyhow::{anyhow, Result};
use serde_json::{Map, Value};

/// A JSON object read field by field.
pub struct JsonFields<'a> {
    map: &'a Map<String, Value>,
    origin: Option<String>,
}

impl<'a> JsonFields<'a> {
    /// Fields of `map`; errors name only the field (the caller adds context).
    pub fn new(map: &'a Map<String, Value>) -> Self {
        Self { map, origin: None }
    }

    /// Fields of `map` read from `origin` (a file), which every error names.
    pub fn with_origin(map: &'a Map<String, Value>, origin: impl std::fmt::Display) -> Self {
        Self {
            map,
            origin: Some(origin.to_string()),
        }
    }

    fn error(&self, message: String) -> anyhow::Error {
        match &self.origin {
            Some(o) => anyhow!("{o}: {message}"),
            None => anyhow!("{message}"),
        }
    }

    fn present(&self, k: &str) -> Option<&'a Value> {
        self.map.get(k).filter(|v| !v.is_null())
    }

    /// The raw value, when present and not null.
    pub fn opt_value(&self, k: &str) -> Option<Value> {
        self.present(k).cloned()
    }

    /// A string field.
    pub fn opt_str(&self, k: &str) -> Result<Option<String>> {
        match self.present(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.error(format!("field `{k}` should be a string, found {v}"))),
        }
    }

    /// A required string field.
    pub fn req_str(&self, k: &str) -> Result<String> {
        self.opt_str(k)?.ok_or_else(|| self.missing(k))
    }

    /// A non-negative integer field.
    pub fn opt_usize(&self, k: &str) -> Result<Option<usize>> {
        match self.present(k) {
            None => Ok(None),
            Some(v) => match v.as_u64().and_then(|n| usize::try_from(n).ok()) {
                Some(n) => Ok(Some(n)),
                None => Err(self.error(format!("field `{k}` should be a non-negative integer, found {v}"))),
            },
        }
    }

    /// A required non-negative integer field.
    pub fn req_usize(&self, k: &str) -> Result<usize> {
        self.opt_usize(k)?.ok_or_else(|| self.missing(k))
    }

    /// A number field.
    pub fn opt_f64(&self, k: &str) -> Result<Option<f64>> {
        match self.present(k) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.error(format!("field `{k}` should be a number, found {v}"))),
        }
    }

    /// A boolean field.
    pub fn opt_bool(&self, k: &str) -> Result<Option<bool>> {
        match self.present(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.error(format!("field `{k}` should be true or false, found {v}"))),
        }
    }

    fn missing(&self, k: &str) -> anyhow::Error {
        self.error(format!("required field `{k}` is missing"))
    }
}
