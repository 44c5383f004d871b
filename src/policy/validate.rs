//! Request validation: a route's `validate = { schema = "FILE" }` checks the request body
//! against a JSON Schema before the integration runs (after auth and throttles), as an Amazon
//! API Gateway request validator checks a body against its model.
//!
//! The schema is read and compiled when the config loads (`jsonschema`, drafts 4 to 2020-12,
//! chosen by the schema's `$schema`, 2020-12 when absent), with no reference resolution over
//! the network or from files: a `$ref` must point inside the schema itself. Bodies are parsed
//! with `serde_json` (nesting bounded at 128 levels) and checked against the compiled
//! validator; the client gets the first few failures, each with the JSON pointer of the value
//! that failed.

use crate::config::{ConfigError, Source};
use serde::Deserialize;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use toml::Spanned;

/// `validate = { ... }` on a route.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawValidate {
    /// JSON Schema file, relative to the config file's directory.
    pub schema: Spanned<String>,
}

/// Failures reported in one answer at most.
const MAX_REPORTED: usize = 3;
/// Characters of one failure's text at most (the text may quote the offending value).
const MAX_ERROR_CHARS: usize = 200;
/// Characters of one failure's JSON pointer at most (property names come from the client).
const MAX_POINTER_CHARS: usize = 64;
/// Bytes of the whole message at most (before JSON escaping).
const MAX_MESSAGE_BYTES: usize = 2048;
/// Nesting levels a body may have (arrays and objects); one more is not JSON.
pub const MAX_DEPTH: usize = 128;

/// A compiled request-body schema.
pub struct BodySchema {
    /// The file it came from (for `--check` and logs).
    pub path: Box<str>,
    validator: jsonschema::Validator,
}

impl std::fmt::Debug for BodySchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodySchema")
            .field("path", &self.path)
            .finish()
    }
}

/// Reads and compiles the schema of a route's `validate`; `key` is the route's config key
/// (`apis[0].routes[1]`).
pub(crate) fn compile(
    src: &Source,
    raw: &Spanned<RawValidate>,
    key: &str,
) -> Result<Arc<BodySchema>, ConfigError> {
    let file = raw.get_ref().schema.get_ref();
    let span = raw.get_ref().schema.span();
    let key = format!("{key}.validate.schema");
    let err = |msg: String| src.err(span.clone(), &key, msg);
    if file.is_empty() {
        return Err(err("the schema file name is empty".into()));
    }
    let base = src.path.parent().unwrap_or(Path::new("."));
    let path = base.join(file);
    let text = std::fs::read(&path)
        .map_err(|e| err(format!("cannot read schema `{}`: {e}", path.display())))?;
    let schema: serde_json::Value = serde_json::from_slice(&text).map_err(|e| {
        err(format!(
            "schema `{}` is not JSON: line {}, column {}: {e}",
            path.display(),
            e.line(),
            e.column()
        ))
    })?;
    if !(schema.is_object() || schema.is_boolean()) {
        return Err(err(format!(
            "schema `{}` must be a JSON object (or true/false)",
            path.display()
        )));
    }
    let validator = jsonschema::validator_for(&schema).map_err(|e| {
        err(format!(
            "schema `{}` is not a valid JSON Schema: {e}",
            path.display()
        ))
    })?;
    Ok(Arc::new(BodySchema {
        path: file.as_str().into(),
        validator,
    }))
}

impl BodySchema {
    /// Checks a whole request body; `Err` holds the client's message
    /// (`Invalid request body: ...`).
    pub fn check(&self, body: &[u8]) -> Result<(), String> {
        if body.iter().all(|b| b.is_ascii_whitespace()) {
            return Err("Invalid request body: the body is empty; a JSON body is required".into());
        }
        let value =
            parse(body).map_err(|e| format!("Invalid request body: not valid JSON ({e})"))?;
        // The schema sees the last of a repeated member; a backend may read the first.
        if !json_without_duplicate_keys(body) {
            return Err("Invalid request body: an object names a member twice (which value counts differs between parsers)".into());
        }
        let mut errors = self.validator.iter_errors(&value);
        let Some(first) = errors.next() else {
            return Ok(());
        };
        let mut msg = String::from("Invalid request body: ");
        push_error(&mut msg, &first);
        let mut reported = 1;
        let mut more = 0usize;
        for e in errors {
            if reported < MAX_REPORTED {
                msg.push_str("; ");
                push_error(&mut msg, &e);
                reported += 1;
            } else {
                more += 1;
            }
        }
        if more > 0 {
            let _ = write!(msg, " (and {more} more)");
        }
        if msg.len() > MAX_MESSAGE_BYTES {
            let mut cut = MAX_MESSAGE_BYTES;
            while !msg.is_char_boundary(cut) {
                cut -= 1;
            }
            msg.truncate(cut);
            msg.push_str("...");
        }
        Err(msg)
    }
}

/// Parses a body as JSON with nesting up to [`MAX_DEPTH`] levels. `serde_json` refuses the
/// 128th level already; only a body it refused for depth is measured and, when it is exactly
/// [`MAX_DEPTH`] deep, parsed again without its limit (the depth is known to be bounded).
fn parse(body: &[u8]) -> Result<serde_json::Value, serde_json::Error> {
    use serde::Deserialize as _;
    match serde_json::from_slice(body) {
        Err(e) if e.to_string().starts_with("recursion limit exceeded") => {
            if max_depth(body) > MAX_DEPTH {
                return Err(e);
            }
            let mut de = serde_json::Deserializer::from_slice(body);
            de.disable_recursion_limit();
            let v = serde_json::Value::deserialize(&mut de)?;
            de.end()?;
            Ok(v)
        }
        r => r,
    }
}

/// Whether `json` is one JSON value in which no object names a member twice (at any depth;
/// names compared after unescaping, so `"a"` and `"\u0061"` are the same). Parsers disagree on
/// a repeated member (most keep the last), so a credential or a decision that repeats one is
/// refused rather than read either way.
pub fn json_without_duplicate_keys(json: &[u8]) -> bool {
    use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
    struct Unique;
    impl<'de> DeserializeSeed<'de> for Unique {
        type Value = ();
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Unique {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON value")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<(), A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(k) = m.next_key::<String>()? {
                if !seen.insert(k) {
                    return Err(serde::de::Error::custom("a member named twice"));
                }
                m.next_value_seed(Unique)?;
            }
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<(), A::Error> {
            while s.next_element_seed(Unique)?.is_some() {}
            Ok(())
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
    }
    // Nesting up to MAX_DEPTH, as bodies are validated with (serde_json alone stops at 127).
    if max_depth(json) > MAX_DEPTH {
        return false;
    }
    let mut de = serde_json::Deserializer::from_slice(json);
    de.disable_recursion_limit();
    Unique.deserialize(&mut de).is_ok() && de.end().is_ok()
}

/// The deepest nesting of arrays and objects in `body` (strings skipped). For a body that is
/// not JSON this is at least the depth a parser reaches before its first error.
pub fn max_depth(body: &[u8]) -> usize {
    let (mut depth, mut max, mut in_str, mut esc) = (0usize, 0usize, false, false);
    for &b in body {
        if in_str {
            if esc {
                esc = false;
            } else if b == b'\\' {
                esc = true;
            } else if b == b'"' {
                in_str = false;
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// `text` cut to `max` characters, `...` marking a cut.
fn push_cut(out: &mut String, text: &str, max: usize) {
    match text.char_indices().nth(max) {
        Some((cut, _)) => {
            out.push_str(&text[..cut]);
            out.push_str("...");
        }
        None => out.push_str(text),
    }
}

/// `POINTER: reason`, the pointer `/` standing for the whole body; long texts (pointers with
/// long property names included) are cut.
fn push_error(out: &mut String, e: &jsonschema::ValidationError<'_>) {
    let ptr = e.instance_path().to_string();
    push_cut(
        out,
        if ptr.is_empty() { "/" } else { &ptr },
        MAX_POINTER_CHARS,
    );
    out.push_str(": ");
    push_cut(out, &e.to_string(), MAX_ERROR_CHARS);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(s: serde_json::Value) -> BodySchema {
        BodySchema {
            path: "t.json".into(),
            validator: jsonschema::validator_for(&s).unwrap(),
        }
    }

    fn order() -> BodySchema {
        schema(serde_json::json!({
            "type": "object",
            "required": ["id", "qty"],
            "properties": {
                "id": {"type": "string"},
                "qty": {"type": "integer", "minimum": 1},
                "tags": {"type": "array", "items": {"type": "string"}}
            },
            "additionalProperties": false
        }))
    }

    #[test]
    fn valid_body_passes() {
        assert_eq!(order().check(br#"{"id":"a","qty":2}"#), Ok(()));
    }

    #[test]
    fn failures_name_pointer_and_reason() {
        let e = order().check(br#"{"id":"a","qty":0}"#).unwrap_err();
        assert!(e.starts_with("Invalid request body: /qty: "), "{e}");
        assert!(e.contains("minimum of 1"), "{e}");
        let e = order().check(br#"{"qty":1}"#).unwrap_err();
        assert!(e.contains("/: \"id\" is a required property"), "{e}");
        let e = order()
            .check(br#"{"id":"a","qty":1,"tags":["x",3]}"#)
            .unwrap_err();
        assert!(e.contains("/tags/1: 3 is not of type \"string\""), "{e}");
    }

    #[test]
    fn a_member_named_twice_is_refused_whichever_value_is_valid() {
        for body in [
            &br#"{"id":5,"id":"a","qty":2}"#[..],
            br#"{"id":"a","id":5,"qty":2}"#,
            br#"{"id":"a","qty":2,"tags":[{"k":1,"\u006b":2}]}"#,
        ] {
            let e = order().check(body).unwrap_err();
            assert!(e.contains("names a member twice"), "{e}");
        }
        // The same name in different objects is fine.
        let s = schema(serde_json::json!({}));
        assert_eq!(s.check(br#"{"a":{"a":1},"b":[{"a":1},{"a":2}]}"#), Ok(()));
    }

    #[test]
    fn not_json_and_empty() {
        let e = order().check(b"{\"id\":").unwrap_err();
        assert!(e.starts_with("Invalid request body: not valid JSON"), "{e}");
        let e = order().check(b"  \r\n").unwrap_err();
        assert!(e.contains("empty"), "{e}");
        let deep = "[".repeat(100_000);
        let e = order().check(deep.as_bytes()).unwrap_err();
        assert!(e.contains("not valid JSON"), "{e}");
    }

    #[test]
    fn format_asserts_by_draft() {
        let s = |draft: &str| {
            schema(serde_json::json!({"$schema": draft, "type": "string", "format": "email"}))
        };
        let e = s("http://json-schema.org/draft-04/schema#")
            .check(br#""not an email""#)
            .unwrap_err();
        assert!(e.contains("is not a \"email\""), "{e}");
        assert!(s("http://json-schema.org/draft-07/schema#")
            .check(br#""nope""#)
            .is_err());
        assert_eq!(
            s("https://json-schema.org/draft/2020-12/schema").check(br#""nope""#),
            Ok(())
        );
    }

    #[test]
    fn many_failures_are_bounded() {
        let s = schema(serde_json::json!({"type":"array","items":{"type":"string"}}));
        let body = format!("[{}]", vec!["1"; 50].join(","));
        let e = s.check(body.as_bytes()).unwrap_err();
        assert!(e.contains("(and 47 more)"), "{e}");
        let long = format!("{{\"id\":\"{}\",\"qty\":1,\"x\":1}}", "y".repeat(10_000));
        let s = schema(serde_json::json!({"type":"object","properties":{"id":{"maxLength":3}}}));
        let e = s.check(long.as_bytes()).unwrap_err();
        assert!(e.len() < 400, "{}", e.len());
        // A long property name: the pointer is cut too.
        let s = schema(serde_json::json!({"additionalProperties":{"type":"string"}}));
        let body = format!(
            "{{\"{}\":1,\"{}\":2}}",
            "n".repeat(100_000),
            "m".repeat(100_000)
        );
        let e = s.check(body.as_bytes()).unwrap_err();
        assert!(e.len() < 1000, "{}", e.len());
        assert!(e.contains(&format!("/{}...: ", "n".repeat(63))), "{e}");
    }

    #[test]
    fn nesting_limit_is_128_levels() {
        let s = schema(serde_json::json!({}));
        let deep = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
        assert_eq!(s.check(deep(128).as_bytes()), Ok(()));
        let e = s.check(deep(129).as_bytes()).unwrap_err();
        assert!(e.contains("recursion limit exceeded"), "{e}");
        let obj = |n: usize| format!("{}1{}", "{\"a\":".repeat(n), "}".repeat(n));
        assert_eq!(s.check(obj(128).as_bytes()), Ok(()));
        assert!(s.check(obj(129).as_bytes()).is_err());
        // Brackets inside strings do not count; trailing garbage is still refused.
        let strs = format!("{}\"[[[{{\\\"\"{}", "[".repeat(128), "]".repeat(128));
        assert_eq!(s.check(strs.as_bytes()), Ok(()));
        assert!(s.check(format!("{} x", deep(128)).as_bytes()).is_err());
    }
}
