//! Decoding owned strings through a borrowed `&str`.
//!
//! bincode decodes a `String` field by filling a zeroed buffer of its
//! length and reading into it, while a `&str` it lends from the input. A
//! message's records are decoded several times on its way (its envelope,
//! its status, its inbox record, its receipt), some twenty strings in all,
//! and the zero-filling showed in profiles. These helpers, used with
//! `#[serde(deserialize_with = ...)]`, ask for a `&str` and copy it once;
//! formats that cannot lend one (JSON with escapes) hand over a temporary
//! or an owned string as usual.

use std::fmt;

use serde::Deserializer;
use serde::de::{self, Visitor};

struct Str;

impl<'de> Visitor<'de> for Str {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_owned())
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<String, E> {
        Ok(v)
    }
}

struct OptStr;

impl<'de> Visitor<'de> for OptStr {
    type Value = Option<String>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an optional string")
    }
    fn visit_none<E: de::Error>(self) -> Result<Option<String>, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Option<String>, E> {
        Ok(None)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<String>, D::Error> {
        string(d).map(Some)
    }
}

/// A `String`, decoded from a borrowed `&str` where the format has one.
pub fn string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    d.deserialize_str(Str)
}

/// An `Option<String>`, likewise.
pub fn opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    d.deserialize_option(OptStr)
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Plain {
        a: String,
        b: Option<String>,
        c: Option<String>,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Helped {
        #[serde(deserialize_with = "super::string")]
        a: String,
        #[serde(deserialize_with = "super::opt_string")]
        b: Option<String>,
        #[serde(deserialize_with = "super::opt_string")]
        c: Option<String>,
    }

    #[test]
    fn the_helpers_decode_what_plain_fields_encode_in_bincode_and_json() {
        let plain = Plain {
            a: "héllo".into(),
            b: Some("x\"y".into()),
            c: None,
        };
        let bytes = crate::wire::encode(&plain);
        let got: Helped = crate::wire::decode(&bytes, 1 << 20).unwrap();
        assert_eq!(
            (got.a.as_str(), got.b.as_deref(), got.c),
            ("héllo", Some("x\"y"), None)
        );
        let json = serde_json::to_string(&plain).unwrap();
        let got: Helped = serde_json::from_str(&json).unwrap();
        assert_eq!(
            (got.a.as_str(), got.b.as_deref(), got.c),
            ("héllo", Some("x\"y"), None)
        );
        // Wrong shapes are errors, not panics.
        assert!(serde_json::from_str::<Helped>(r#"{"a":1,"b":null,"c":null}"#).is_err());
        assert!(crate::wire::decode::<Helped>(&bytes[..bytes.len() - 3], 1 << 20).is_err());
    }
}
