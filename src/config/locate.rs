//! Key paths of config errors, and where a key stands in the file.
//!
//! Errors name keys as paths like `upstreams[0].health.path`. When an error comes without a
//! byte span (a value checked after deserializing, a required key that is missing), the line is
//! found here from the path: the file is parsed again with `toml_edit`, which keeps spans, and
//! the path is walked down to the key. A key that is absent takes the line of its nearest
//! enclosing key or table header.

use std::fmt::Write as _;

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    /// A key of a table.
    Key(String),
    /// An element of an array (or of an array of tables).
    Index(usize),
}

/// Whether a TOML key can be written bare (`A-Za-z0-9_-`), so needs no quotes in a path.
fn is_bare(key: &str) -> bool {
    !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// One key of a path as error messages write it: bare when it can be, else quoted as in TOML
/// (`"$default"`, `"a.b"`).
pub(crate) fn key_part(key: &str) -> String {
    join_key(&[Segment::Key(key.to_string())])
}

/// Writes a path the way error messages name keys: `apis[0].stages."$default".cache`.
pub(crate) fn join_key(path: &[Segment]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Segment::Index(i) => {
                let _ = write!(out, "[{i}]");
            }
            Segment::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                if is_bare(k) {
                    out.push_str(k);
                } else {
                    let _ = write!(out, "\"{}\"", k.replace('\\', "\\\\").replace('"', "\\\""));
                }
            }
        }
    }
    out
}

/// Reads a path written by [`join_key`] or by hand in a validation error
/// (`upstreams[0].targets`, `apis[0].stages.$default.cache`). Unquoted parts split at every dot;
/// [`offset_of`] joins them again where the file has a key holding dots.
pub(crate) fn split_key(key: &str) -> Vec<Segment> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = key.chars().peekable();
    let flush = |cur: &mut String, out: &mut Vec<Segment>| {
        if !cur.is_empty() {
            out.push(Segment::Key(std::mem::take(cur)));
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '.' => flush(&mut cur, &mut out),
            '"' => {
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => cur.extend(chars.next()),
                        c => cur.push(c),
                    }
                }
            }
            '[' => {
                let mut idx = String::new();
                for c in chars.by_ref() {
                    if c == ']' {
                        break;
                    }
                    idx.push(c);
                }
                flush(&mut cur, &mut out);
                match idx.parse() {
                    Ok(i) => out.push(Segment::Index(i)),
                    Err(_) => out.push(Segment::Key(idx)),
                }
            }
            c => cur.push(c),
        }
    }
    flush(&mut cur, &mut out);
    out
}

/// The path of a deserialization error, without serde's private `Spanned` wrapper fields.
pub(crate) fn serde_path(path: &serde_path_to_error::Path) -> Vec<Segment> {
    use serde_path_to_error::Segment as S;
    path.iter()
        .filter_map(|seg| match seg {
            S::Seq { index } => Some(Segment::Index(*index)),
            S::Map { key } | S::Enum { variant: key } => {
                (!key.starts_with("$__serde_spanned_private")).then(|| Segment::Key(key.clone()))
            }
            S::Unknown => None,
        })
        .collect()
}

/// A message about a key (`key `K`: ...`), made after the config was loaded (a path check at
/// start, a reload refused for the run-time keys), as config errors are: `FILE:LINE: key ...`,
/// the line found by reading the file again (`FILE: ...` when it cannot be).
pub fn locate_message(file: &std::path::Path, msg: &str) -> String {
    let line = msg
        .strip_prefix("key `")
        .and_then(|r| r.split_once('`'))
        .and_then(|(key, _)| {
            let text = std::fs::read_to_string(file).ok()?;
            offset_of(&text, &split_key(key)).map(|o| text[..o].matches('\n').count() + 1)
        });
    match line {
        Some(l) => format!("{}:{l}: {msg}", file.display()),
        None => format!("{}: {msg}", file.display()),
    }
}

/// Byte offset in `text` of the key at `path`, or of the nearest enclosing key or table that
/// the file has. `None` when the file does not parse or holds none of the path.
pub(crate) fn offset_of(text: &str, path: &[Segment]) -> Option<usize> {
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    let mut item = doc.as_item();
    let mut best = None;
    let mut i = 0;
    while i < path.len() {
        let (next, span, used) = match &path[i] {
            Segment::Index(n) => match item.get(*n) {
                Some(next) => (next, next.span(), 1),
                None => break,
            },
            Segment::Key(_) => {
                let Some(table) = item.as_table_like() else {
                    break;
                };
                // A key holding dots (`"header.x-user"`) may have been split: try the key
                // alone first, then joined with the following keys.
                let mut joined = String::new();
                let mut found = None;
                for (j, seg) in path[i..].iter().enumerate() {
                    let Segment::Key(k) = seg else { break };
                    if j > 0 {
                        joined.push('.');
                    }
                    joined.push_str(k);
                    if let Some((key, value)) = table.get_key_value(&joined) {
                        found = Some((value, key.span().or_else(|| value.span()), j + 1));
                        break;
                    }
                }
                match found {
                    Some(f) => f,
                    None => break,
                }
            }
        };
        if let Some(s) = span {
            best = Some(s.start);
        }
        item = next;
        i += used;
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line_of(text: &str, key: &str) -> Option<usize> {
        offset_of(text, &split_key(key)).map(|o| text[..o].matches('\n').count() + 1)
    }

    #[test]
    fn paths_round_trip() {
        for k in [
            "server.limits.max_header_bytes",
            "upstreams[0].targets[1]",
            "apis[0].stages.\"$default\".cache",
            "apis[2].routes[0].request_mapping.\"header.x-user\"",
        ] {
            assert_eq!(join_key(&split_key(k)), k);
        }
        assert_eq!(
            split_key("apis[0].stages.$default.throttle"),
            vec![
                Segment::Key("apis".into()),
                Segment::Index(0),
                Segment::Key("stages".into()),
                Segment::Key("$default".into()),
                Segment::Key("throttle".into()),
            ]
        );
    }

    #[test]
    fn finds_keys_and_falls_back_to_the_enclosing_table() {
        let text = "[server]\nworkers = 2\n\n[server.limits]\nmax_headers = 0\n\n\
                    [[upstreams]]\nname = \"a\"\n[[upstreams]]\nname = \"b\"\ntargets = [\n\"x\",\n\"y\"]\n\n\
                    [[apis]]\nname = \"s\"\n[apis.stages.\"$default\"]\nvariables = {}\n\
                    [[apis.routes]]\nroute = \"GET /\"\nrequest_mapping = { \"header.x-a\" = \"1\" }\n";
        assert_eq!(line_of(text, "server.workers"), Some(2));
        assert_eq!(line_of(text, "server.limits.max_headers"), Some(5));
        // Absent: the table header.
        assert_eq!(line_of(text, "server.limits.max_body_bytes"), Some(4));
        assert_eq!(line_of(text, "server.listen"), Some(1));
        assert_eq!(line_of(text, "upstreams[0].targets"), Some(7));
        assert_eq!(line_of(text, "upstreams[1].targets"), Some(11));
        assert_eq!(line_of(text, "upstreams[1].targets[1]"), Some(13));
        assert_eq!(line_of(text, "apis[0].stages.$default.variables"), Some(18));
        assert_eq!(line_of(text, "apis[0].stages.$default.cache"), Some(17));
        assert_eq!(
            line_of(text, "apis[0].routes[0].request_mapping.header.x-a"),
            Some(21)
        );
        assert_eq!(line_of(text, "apis[0].routes[3].route"), Some(19));
        assert_eq!(line_of(text, "cluster.redis"), None);
        assert_eq!(line_of("[server\n", "server"), None);
    }
}
