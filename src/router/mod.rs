//! Request routing: a segment trie mapping `(method, path)` to a route value.
//!
//! This module owns route pattern syntax and validation, conflict detection at
//! insert time, and the allocation-free lookup used on every request.
//!
//! # Pattern syntax
//!
//! A pattern starts with `/` and is split on `/` into segments, each of which is
//! one of:
//!
//! * a literal, matched byte for byte (case-sensitive, no percent-decoding);
//!   it may be empty, so `/a/` (segments `a`, ``) differs from `/a`;
//! * `{name}`: a parameter matching exactly one non-empty segment (no `/`);
//! * `{name+}`: a greedy parameter matching the rest of the path (one or more
//!   bytes, `/` included); only allowed as the last segment.
//!
//! Names are `[A-Za-z0-9_]+` and unique within a pattern; a pattern has at most
//! [`MAX_PARAMS`] parameters. Braces anywhere else (`/a{b}`, `/a}`) are errors.
//!
//! # Matching priority
//!
//! At each segment, a literal child is tried first, then the parameter child,
//! then the greedy parameter; if a branch dead-ends (no route for this path, or
//! none for this method) the lookup backtracks and tries the next one. At the
//! route reached, the exact method is tried first, then (for HEAD) the GET entry, then
//! the ANY entry. ANY does not take `TRACE` (which would echo the request, credentials
//! included, back to the caller; nginx refuses it too): only a `TRACE` route does. If some
//! route matched the path but no route matched the method, the
//! result is [`Match::MethodNotAllowed`]; if no route matched the path,
//! [`Match::NotFound`].
//!
//! # Conflicts
//!
//! Overlapping routes are allowed (priority resolves them), so `insert` only
//! refuses routes that would be ambiguous or unreachable:
//!
//! * the same method (or ANY twice) on the same pattern;
//! * two `{param}`s at the same position under the same parent with different
//!   names (`/a/{x}` vs `/a/{y}`), so a prefix always has one name per capture;
//! * likewise two `{greedy+}`s at the same position with different names.
//!
//! A `{x}` and a `{rest+}` at the same position may coexist (the single-segment
//! parameter is tried first) and their names are independent, as are the names
//! of parameters and literals at the same position.

use std::collections::HashMap;
use std::fmt;

/// Maximum number of parameters in one pattern (and captures in [`Params`]).
pub const MAX_PARAMS: usize = 16;

/// What a 405's `Allow` lists for an `ANY` route (every method but `TRACE` reaches it;
/// these are the ones API Gateway's `ANY` stands for).
pub const ANY_METHODS: [&[u8]; 7] = [
    b"DELETE", b"GET", b"HEAD", b"OPTIONS", b"PATCH", b"POST", b"PUT",
];

/// Literal children count above which a node switches from a vec to a hash map.
const WIDE: usize = 8;

/// Error returned for an invalid or conflicting route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteError(pub String);

impl fmt::Display for RouteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RouteError {}

/// Result of [`Router::lookup`].
#[derive(Debug, PartialEq, Eq)]
pub enum Match<'a, T> {
    /// A route matched path and method.
    Found(&'a T),
    /// Some route matched the path, but none accepts the method (HTTP 405).
    MethodNotAllowed,
    /// No route matched the path (HTTP 404).
    NotFound,
}

/// Captured parameters of a lookup, as `(start, end)` byte offsets into the
/// looked-up path, in pattern order. Inline storage, never allocates.
#[derive(Debug, Clone)]
pub struct Params {
    spans: [(u32, u32); MAX_PARAMS],
    len: u8,
}

impl Params {
    /// Creates an empty set of captures.
    pub fn new() -> Self {
        Params {
            spans: [(0, 0); MAX_PARAMS],
            len: 0,
        }
    }

    /// Removes all captures.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Number of captures.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// True if there are no captures.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The `i`th capture as `(start, end)` byte offsets into the path.
    pub fn get(&self, i: usize) -> Option<(u32, u32)> {
        self.as_slice().get(i).copied()
    }

    /// All captures, in pattern order.
    pub fn as_slice(&self) -> &[(u32, u32)] {
        &self.spans[..self.len()]
    }

    fn push(&mut self, start: usize, end: usize) {
        // Patterns are limited to MAX_PARAMS and paths to u32::MAX bytes at
        // insert/lookup, so the guard and casts never lose information.
        if self.len() < MAX_PARAMS {
            self.spans[self.len()] = (start as u32, end as u32);
            self.len += 1;
        }
    }

    fn truncate(&mut self, len: usize) {
        self.len = len as u8;
    }
}

impl Default for Params {
    fn default() -> Self {
        Self::new()
    }
}

/// A routing table from `(method, path pattern)` to values of type `T`.
#[derive(Clone)]
pub struct Router<T> {
    root: Node<T>,
    len: usize,
}

/// One segment position in the trie.
#[derive(Clone)]
struct Node<T> {
    statics: Statics<T>,
    param: Option<Box<Param<T>>>,
    greedy: Option<Box<Greedy<T>>>,
    /// Routes ending exactly at this node.
    methods: Methods<T>,
}

/// Literal children, keyed by the whole segment.
#[derive(Clone)]
enum Statics<T> {
    /// Narrow node: linear scan over the keys (kept apart from the nodes so
    /// the scan stays within a cache line or two); `nodes[i]` belongs to `keys[i]`.
    Few {
        keys: Vec<Box<[u8]>>,
        nodes: Vec<Node<T>>,
    },
    /// Wide node: hash lookup.
    Many(HashMap<Box<[u8]>, Node<T>, ahash::RandomState>),
}

/// A `{name}` child.
#[derive(Clone)]
struct Param<T> {
    name: Box<str>,
    /// The route that created this child, for conflict messages.
    origin: Box<str>,
    node: Node<T>,
}

/// A `{name+}` child; always a leaf.
#[derive(Clone)]
struct Greedy<T> {
    name: Box<str>,
    origin: Box<str>,
    methods: Methods<T>,
}

/// Per-route method table: exact methods, then ANY.
#[derive(Clone)]
struct Methods<T> {
    exact: Vec<(Box<[u8]>, T)>,
    any: Option<T>,
}

/// A parsed pattern segment.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Seg<'p> {
    Static(&'p str),
    Param(&'p str),
    Greedy(&'p str),
}

impl<T> Router<T> {
    /// Creates an empty router.
    pub fn new() -> Self {
        Router {
            root: Node::new(),
            len: 0,
        }
    }

    /// Number of routes (method/pattern pairs; ANY counts as one).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if no route has been inserted.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds a route. `method` is an HTTP method token such as `Some("GET")`
    /// (matched case-sensitively; `"ANY"` is just another token), or `None` for
    /// any method. `pattern` must start with `/`; see the module docs for syntax
    /// and conflict rules. On error the router is unchanged.
    pub fn insert(
        &mut self,
        method: Option<&str>,
        pattern: &str,
        value: T,
    ) -> Result<(), RouteError> {
        let route = format!("{} {}", method.unwrap_or("ANY"), pattern);
        if let Some(m) = method {
            if m.is_empty() || !m.bytes().all(is_tchar) {
                return Err(RouteError(format!(
                    "route `{route}`: invalid method `{m}`, expected an HTTP token such as GET"
                )));
            }
        }
        let segs = parse(pattern)?;
        self.check(&route, method, &segs)?;

        let mut node = &mut self.root;
        for seg in &segs {
            match *seg {
                Seg::Static(s) => node = node.statics.get_or_insert(s.as_bytes()),
                Seg::Param(name) => {
                    let p = node.param.get_or_insert_with(|| {
                        Box::new(Param {
                            name: name.into(),
                            origin: route.as_str().into(),
                            node: Node::new(),
                        })
                    });
                    node = &mut p.node;
                }
                Seg::Greedy(name) => {
                    let g = node.greedy.get_or_insert_with(|| {
                        Box::new(Greedy {
                            name: name.into(),
                            origin: route.as_str().into(),
                            methods: Methods::new(),
                        })
                    });
                    g.methods.add(method, value);
                    self.len += 1;
                    return Ok(());
                }
            }
        }
        node.methods.add(method, value);
        self.len += 1;
        Ok(())
    }

    /// Read-only pass refusing conflicting routes, so `insert` never half-applies.
    fn check(&self, route: &str, method: Option<&str>, segs: &[Seg<'_>]) -> Result<(), RouteError> {
        let conflict = |origin: &str, why: &str| {
            Err(RouteError(format!(
                "route `{route}` conflicts with `{origin}`: {why}"
            )))
        };
        let duplicate = || Err(RouteError(format!("route `{route}` is already defined")));
        let mut node = &self.root;
        for seg in segs {
            match *seg {
                Seg::Static(s) => match node.statics.get(s.as_bytes()) {
                    Some(child) => node = child,
                    None => return Ok(()),
                },
                Seg::Param(name) => match &node.param {
                    Some(p) if *p.name != *name => {
                        return conflict(
                            &p.origin,
                            "parameters at the same position must have the same name",
                        )
                    }
                    Some(p) => node = &p.node,
                    None => return Ok(()),
                },
                Seg::Greedy(name) => {
                    return match &node.greedy {
                        Some(g) if *g.name != *name => conflict(
                            &g.origin,
                            "greedy parameters at the same position must have the same name",
                        ),
                        Some(g) if g.methods.has(method) => duplicate(),
                        _ => Ok(()),
                    }
                }
            }
        }
        if node.methods.has(method) {
            return duplicate();
        }
        Ok(())
    }

    /// Finds the route for `method` and `path`. On [`Match::Found`], `params`
    /// holds the captures in pattern order (use [`param_names`] on the route's
    /// pattern to name them); otherwise it is left empty. Allocates nothing.
    pub fn lookup<'a>(&'a self, method: &str, path: &str, params: &mut Params) -> Match<'a, T> {
        params.clear();
        let path = path.as_bytes();
        if path.first() != Some(&b'/') || path.len() > u32::MAX as usize {
            return Match::NotFound;
        }
        let mut path_hit = false;
        match self
            .root
            .find(path, 1, method.as_bytes(), params, &mut path_hit)
        {
            Some(v) => Match::Found(v),
            None if path_hit => Match::MethodNotAllowed,
            None => Match::NotFound,
        }
    }

    /// The methods routes accept for `path` (for a 405's `Allow`): every method of every route
    /// whose pattern matches, plus HEAD where GET is (a GET route answers HEAD), sorted and
    /// without repeats; where an `ANY` route matches, the usual methods it stands for
    /// ([`ANY_METHODS`]). Off the hot path: it allocates.
    pub fn allowed_methods(&self, path: &str) -> Vec<&[u8]> {
        let path = path.as_bytes();
        let mut out = Vec::new();
        if path.first() == Some(&b'/') {
            let mut any = false;
            self.root.collect(path, 1, &mut out, &mut any);
            if any {
                out.extend(ANY_METHODS);
            }
        }
        if out.iter().any(|m| *m == b"GET") {
            out.push(b"HEAD");
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}

impl<T> fmt::Debug for Router<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl<T> Default for Router<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Node<T> {
    fn new() -> Self {
        Node {
            statics: Statics::Few {
                keys: Vec::new(),
                nodes: Vec::new(),
            },
            param: None,
            greedy: None,
            methods: Methods::new(),
        }
    }

    /// Matches `path[start..]` (the text after a `/`) against this node's
    /// children, in priority order, backtracking on failure.
    fn find<'a>(
        &'a self,
        path: &[u8],
        start: usize,
        method: &[u8],
        params: &mut Params,
        path_hit: &mut bool,
    ) -> Option<&'a T> {
        let rest = &path[start..];
        let seg_len = rest.iter().position(|&b| b == b'/').unwrap_or(rest.len());
        let end = start + seg_len;

        if let Some(child) = self.statics.get(&rest[..seg_len]) {
            if let Some(v) = child.descend(path, end, method, params, path_hit) {
                return Some(v);
            }
        }
        if seg_len > 0 {
            if let Some(p) = &self.param {
                let saved = params.len();
                params.push(start, end);
                if let Some(v) = p.node.descend(path, end, method, params, path_hit) {
                    return Some(v);
                }
                params.truncate(saved);
            }
        }
        if !rest.is_empty() {
            if let Some(g) = &self.greedy {
                if let Some(v) = g.methods.get(method, path_hit) {
                    params.push(start, path.len());
                    return Some(v);
                }
            }
        }
        None
    }

    /// Like [`Node::find`] for every branch at once: gathers the methods of all routes whose
    /// pattern matches `path` (`any` is set when one of them is `ANY`).
    fn collect<'a>(&'a self, path: &[u8], start: usize, out: &mut Vec<&'a [u8]>, any: &mut bool) {
        let rest = &path[start..];
        let seg_len = rest.iter().position(|&b| b == b'/').unwrap_or(rest.len());
        let end = start + seg_len;
        if let Some(child) = self.statics.get(&rest[..seg_len]) {
            child.collect_at(path, end, out, any);
        }
        if seg_len > 0 {
            if let Some(p) = &self.param {
                p.node.collect_at(path, end, out, any);
            }
        }
        if !rest.is_empty() {
            if let Some(g) = &self.greedy {
                g.methods.names(out, any);
            }
        }
    }

    fn collect_at<'a>(&'a self, path: &[u8], end: usize, out: &mut Vec<&'a [u8]>, any: &mut bool) {
        if end == path.len() {
            self.methods.names(out, any);
        } else {
            self.collect(path, end + 1, out, any);
        }
    }

    /// Continues a match whose current segment ended at `end` in this node.
    fn descend<'a>(
        &'a self,
        path: &[u8],
        end: usize,
        method: &[u8],
        params: &mut Params,
        path_hit: &mut bool,
    ) -> Option<&'a T> {
        if end == path.len() {
            self.methods.get(method, path_hit)
        } else {
            self.find(path, end + 1, method, params, path_hit)
        }
    }
}

impl<T> Statics<T> {
    fn get(&self, seg: &[u8]) -> Option<&Node<T>> {
        match self {
            Statics::Few { keys, nodes } => {
                let i = keys.iter().position(|k| **k == *seg)?;
                nodes.get(i)
            }
            Statics::Many(m) => m.get(seg),
        }
    }

    fn get_or_insert(&mut self, seg: &[u8]) -> &mut Node<T> {
        if let Statics::Few { keys, nodes } = self {
            if keys.len() >= WIDE && !keys.iter().any(|k| **k == *seg) {
                let map = std::mem::take(keys)
                    .into_iter()
                    .zip(std::mem::take(nodes))
                    .collect();
                *self = Statics::Many(map);
            }
        }
        match self {
            Statics::Few { keys, nodes } => {
                let i = match keys.iter().position(|k| **k == *seg) {
                    Some(i) => i,
                    None => {
                        keys.push(seg.into());
                        nodes.push(Node::new());
                        nodes.len() - 1
                    }
                };
                &mut nodes[i]
            }
            Statics::Many(m) => m.entry(seg.into()).or_insert_with(Node::new),
        }
    }
}

impl<T> Methods<T> {
    fn new() -> Self {
        Methods {
            exact: Vec::new(),
            any: None,
        }
    }

    fn has(&self, method: Option<&str>) -> bool {
        match method {
            None => self.any.is_some(),
            Some(m) => self.exact.iter().any(|(k, _)| **k == *m.as_bytes()),
        }
    }

    fn names<'a>(&'a self, out: &mut Vec<&'a [u8]>, any: &mut bool) {
        out.extend(self.exact.iter().map(|(k, _)| &**k));
        *any |= self.any.is_some();
    }

    fn add(&mut self, method: Option<&str>, value: T) {
        match method {
            None => self.any = Some(value),
            Some(m) => self.exact.push((m.as_bytes().into(), value)),
        }
    }

    /// Exact method, then (for HEAD) the GET route, then ANY; records in `path_hit` that a
    /// route ended here.
    fn get(&self, method: &[u8], path_hit: &mut bool) -> Option<&T> {
        if let Some((_, v)) = self.exact.iter().find(|(k, _)| **k == *method) {
            return Some(v);
        }
        // HEAD is GET without the body (RFC 9110 9.3.2): a GET route answers it, as in nginx.
        if method == b"HEAD" {
            if let Some((_, v)) = self.exact.iter().find(|(k, _)| **k == *b"GET") {
                return Some(v);
            }
        }
        if self.any.is_some() && method != b"TRACE" {
            return self.any.as_ref();
        }
        if !self.exact.is_empty() || self.any.is_some() {
            *path_hit = true;
        }
        None
    }
}

/// Parses a pattern into its parameter names in order, validating it exactly
/// as [`Router::insert`] does: `"/a/{id}/{rest+}"` gives `["id", "rest"]`.
pub fn param_names(pattern: &str) -> Result<Vec<String>, RouteError> {
    Ok(parse(pattern)?
        .into_iter()
        .filter_map(|s| match s {
            Seg::Static(_) => None,
            Seg::Param(n) | Seg::Greedy(n) => Some(n.to_owned()),
        })
        .collect())
}

fn parse(pattern: &str) -> Result<Vec<Seg<'_>>, RouteError> {
    let bad = |why: &str| {
        Err(RouteError(format!(
            "invalid route pattern `{pattern}`: {why}"
        )))
    };
    if pattern.is_empty() {
        return Err(RouteError("invalid route pattern: it is empty".into()));
    }
    let Some(body) = pattern.strip_prefix('/') else {
        return bad("it must start with '/'");
    };
    let raw: Vec<&str> = body.split('/').collect();
    let mut segs = Vec::with_capacity(raw.len());
    let mut names: Vec<&str> = Vec::new();
    for (i, s) in raw.iter().enumerate() {
        let seg = match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            None if s.contains(['{', '}']) => {
                return bad("a parameter must be a whole segment, `{name}` or `{name+}`")
            }
            None => Seg::Static(s),
            Some(inner) => {
                let (name, greedy) = match inner.strip_suffix('+') {
                    Some(n) => (n, true),
                    None => (inner, false),
                };
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                {
                    return bad(&format!(
                        "parameter name `{name}` must be non-empty and match [A-Za-z0-9_]+"
                    ));
                }
                if names.contains(&name) {
                    return bad(&format!("parameter `{name}` appears more than once"));
                }
                names.push(name);
                if names.len() > MAX_PARAMS {
                    return bad(&format!("more than {MAX_PARAMS} parameters"));
                }
                if greedy {
                    if i + 1 != raw.len() {
                        return bad(&format!(
                            "greedy parameter `{{{name}+}}` must be the last segment"
                        ));
                    }
                    Seg::Greedy(name)
                } else {
                    Seg::Param(name)
                }
            }
        };
        segs.push(seg);
    }
    Ok(segs)
}

/// RFC 9110 `tchar`, the bytes allowed in a method token.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests;
