//! Reading a request body: JSON, an object, then the route's type, with errors that name the
//! field at fault by its path (`max_tokens`, `messages[1].content`, `stop[1]`).

use serde::de::{self, DeserializeOwned, SeqAccess, Visitor};
use serde_json::Value;
use std::fmt;

use super::api::ApiError;

/// A request body read from a JSON object; an error is a 400 that names the field at fault.
pub trait JsonBody: Sized {
    /// Reads the body from `object` (a JSON object).
    fn from_object(object: &Value) -> Result<Self, ApiError>;
}

/// Longest error detail quoted back to the client: serde quotes a wrong string in full, and a
/// body may hold a megabyte of it.
const MAX_DETAIL: usize = 300;

/// Parses a JSON body into `T`: 400 when it is not JSON, not an object, or does not fit `T`,
/// naming the field at fault by its path (`max_tokens`, `messages[1].content`).
pub fn parse<T: JsonBody>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad(format!("the body is not valid JSON: {}", shorten(e.to_string()))))?;
    if !value.is_object() {
        return Err(ApiError::bad("the body must be a JSON object"));
    }
    T::from_object(&value)
}

/// Reads `T` from `object`, naming the path of the field at fault; the root (a missing field)
/// is no path.
pub(super) fn typed<T: DeserializeOwned>(object: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(object).map_err(|e| {
        let at_root = e.path().iter().next().is_none();
        let path = e.path().to_string();
        let detail = shorten(e.into_inner().to_string());
        match at_root {
            true => ApiError::bad(format!("invalid request: {detail}")),
            false => ApiError::bad(format!("field `{path}`: {detail}")),
        }
    })
}

/// `text` cut to [`MAX_DETAIL`] bytes (at a character boundary), with `…` where it was cut.
fn shorten(mut text: String) -> String {
    if text.len() > MAX_DETAIL {
        let mut end = MAX_DETAIL;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// What [`TextOrList`] reads.
pub(super) enum Texts {
    /// `null`.
    Null,
    /// One string.
    One(String),
    /// A list of strings.
    Many(Vec<String>),
}

/// Reads a field that is one string or a list of strings (or `null`, if `nullable`). Unlike an
/// untagged enum it says what it expected, and a wrong element is named by its index
/// (`stop[1]`).
pub(super) struct TextOrList {
    /// Whether `null` is accepted.
    pub nullable: bool,
}

impl<'de> Visitor<'de> for TextOrList {
    type Value = Texts;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.nullable {
            true => "a string, a list of strings or null",
            false => "a string or a list of strings",
        })
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Texts, E> {
        Ok(Texts::One(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Texts, E> {
        Ok(Texts::One(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Texts, E> {
        match self.nullable {
            true => Ok(Texts::Null),
            false => Err(E::invalid_type(de::Unexpected::Unit, &self)),
        }
    }
    fn visit_none<E: de::Error>(self) -> Result<Texts, E> {
        self.visit_unit()
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Texts, A::Error> {
        let mut texts = Vec::new();
        while let Some(t) = seq.next_element::<String>()? {
            texts.push(t);
        }
        Ok(Texts::Many(texts))
    }
}
