//! Compiling `[[apis]]` into the route table: one compiled [`Route`] per (route, stage), stage
//! variables substituted, path templates pre-split, mock responses pre-encoded, and conflicts
//! refused with the line that caused them.

use super::locate::key_part;
use super::raw::{RawApi, RawIntegration};
use super::{ConfigError, Source, UpstreamConfig};
use crate::http::encode;
use crate::policy::mapping;
use crate::router::{param_names, Match, Params, Router, ANY_METHODS};
use ahash::AHashMap;
use bytes::Bytes;
use std::fmt::Write as _;
use std::sync::Arc;

/// One part of a [`PathTemplate`].
#[derive(Debug, Clone)]
enum Part {
    Lit(Box<str>),
    /// Index of a capture in [`Params`].
    Param(usize),
    /// A capture placed after the template's `?`: its `&`, `=`, `+` and `;` (which the path's
    /// normal form holds decoded) are percent-encoded, so a client cannot add parameters.
    QueryParam(usize),
}

/// An integration path with `{param}` slots, stage variables already substituted.
#[derive(Debug, Clone)]
pub struct PathTemplate {
    parts: Vec<Part>,
    /// The template has its own query string.
    has_query: bool,
    /// As written, stage variables substituted (for `--check`).
    text: Box<str>,
}

impl PathTemplate {
    /// Appends the rendered path to `out`, taking captures from `path` via `params`.
    pub fn render(&self, path: &[u8], params: &Params, out: &mut Vec<u8>) {
        for part in &self.parts {
            match part {
                Part::Lit(s) => out.extend_from_slice(s.as_bytes()),
                Part::Param(i) => {
                    if let Some((a, b)) = params.get(*i) {
                        out.extend_from_slice(&path[a as usize..b as usize]);
                    }
                }
                Part::QueryParam(i) => {
                    if let Some((a, b)) = params.get(*i) {
                        for &c in &path[a as usize..b as usize] {
                            match c {
                                // `%26`, `%3D`, `%2B`, `%3B`.
                                b'&' | b'=' | b'+' | b';' => {
                                    const HEX: &[u8; 16] = b"0123456789ABCDEF";
                                    out.extend_from_slice(&[
                                        b'%',
                                        HEX[(c >> 4) as usize],
                                        HEX[(c & 15) as usize],
                                    ]);
                                }
                                _ => out.push(c),
                            }
                        }
                    }
                }
            }
        }
    }

    /// Whether the template carries its own `?query` (the client's is then appended with `&`).
    pub fn has_query(&self) -> bool {
        self.has_query
    }
}

/// A pre-encoded mock answer.
#[derive(Debug, Clone)]
pub struct MockResponse {
    pub status: u16,
    /// Status line and headers (content-length included), without the blank line.
    pub head: Bytes,
    pub body: Bytes,
}

/// What a route does with a request.
#[derive(Debug, Clone)]
pub enum Integration {
    /// Proxy to `upstreams[upstream]`; `path: None` forwards the request path without the
    /// base path and stage prefix.
    Http {
        upstream: usize,
        path: Option<PathTemplate>,
    },
    Mock(MockResponse),
    /// The handshake route of a WebSocket API stage.
    WebSocket(Arc<crate::ws::WsApi>),
}

/// One route of one stage, ready to serve.
#[derive(Debug)]
pub struct Route {
    pub api: Arc<str>,
    pub stage: Arc<str>,
    /// The route key as written (`GET /products/{id}`, `$default`).
    pub key: Arc<str>,
    /// Prometheus labels `api="..",stage="..",route=".."`.
    pub labels: Arc<str>,
    /// Length of base path + stage prefix, stripped when forwarding the path as is.
    pub prefix_len: usize,
    /// Where requests reach it: hosts (if any), then the full path pattern (for `--check`).
    pub served_at: Box<str>,
    pub integration: Integration,
    pub access_log: bool,
    /// Response caching for this route in this stage (`None`: not cached).
    pub cache: Option<Arc<crate::cache::CachePolicy>>,
    /// What the route requires (`auth`, `scopes`, `api_key_required`).
    pub auth: crate::policy::auth::RouteAuth,
    /// WebSocket limits and timeouts (pass-through on `http` APIs, or the WebSocket API's).
    pub ws: Arc<crate::ws::WsSettings>,
    /// `validate`: the JSON Schema the request body must satisfy.
    pub validate: Option<Arc<crate::policy::validate::BodySchema>>,
    /// `request_mapping` (`http` integrations only).
    pub request_mapping: Option<Box<crate::policy::mapping::RequestMapping>>,
    /// `response_mapping`: applied to proxied responses, cache hits and mock answers.
    pub response_mapping: Option<Box<crate::policy::mapping::HeaderMapping>>,
}

/// The result of routing a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteMatch {
    Found(u32),
    MethodNotAllowed,
    NotFound,
}

#[derive(Debug, Default)]
struct Table {
    trie: Router<u32>,
    /// `$default` routes: (prefix, route), longest prefix first.
    defaults: Vec<(String, u32)>,
    /// Each API stage's path prefix (base path + stage) with one of its routes, longest
    /// first: which API a request that matched no route addressed. `None` when two APIs
    /// share the prefix (it cannot be told which).
    scopes: Vec<(String, Arc<str>, Option<u32>)>,
    /// Whether a stage's prefix lies under another stage's of the same API here (a named
    /// stage beside `$default`): a match must then be checked against the stage the path
    /// names ([`Table::named_stage`]).
    nested_stages: bool,
}

impl Table {
    /// Records that `prefix` belongs to API `api` (route `id` is one of that stage's).
    fn add_scope(&mut self, prefix: &str, api: &Arc<str>, id: u32) {
        match self.scopes.iter_mut().find(|(p, _, _)| p == prefix) {
            Some((_, a, slot)) => {
                if a != api {
                    *slot = None;
                }
            }
            None => {
                self.scopes
                    .push((prefix.to_string(), api.clone(), Some(id)));
                self.scopes.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
            }
        }
    }

    /// API Gateway picks the stage by the path before it routes within the stage: a route
    /// found under a shorter prefix of its API (`$default`'s `/{proxy+}`) than the stage the
    /// path names (`/beta/...`) does not take the request. `None` when `r` is of that stage;
    /// else that stage's `$default` route, if it has one.
    fn named_stage(&self, path: &str, r: &Route) -> Option<Option<u32>> {
        let (prefix, _, _) = self
            .scopes
            .iter()
            .find(|(p, api, _)| *api == r.api && holds(p, path))?;
        (prefix.len() > r.prefix_len).then(|| {
            self.defaults
                .iter()
                .find(|(p, _)| p == prefix)
                .map(|(_, id)| *id)
        })
    }

    /// Sets [`Table::nested_stages`] once every scope is known.
    fn finish(&mut self) {
        self.nested_stages = self.scopes.iter().any(|(p, api, _)| {
            self.scopes
                .iter()
                .any(|(q, other, _)| other == api && q.len() > p.len() && holds(p, q))
        });
    }

    /// The scope (longest prefix) `path` falls in: `Some(None)` when its API is ambiguous.
    fn scope(&self, path: &str) -> Option<Option<u32>> {
        self.scopes
            .iter()
            .find_map(|(prefix, _, id)| holds(prefix, path).then_some(*id))
    }

    /// The `$default` route whose prefix holds `path`, the longest prefix first.
    fn default_for(&self, path: &str) -> Option<u32> {
        self.defaults.iter().find_map(|(prefix, id)| {
            let rest = path.strip_prefix(prefix.as_str())?;
            (rest.is_empty() || rest.starts_with('/') || prefix.is_empty()).then_some(*id)
        })
    }

    /// The methods `path`'s routes accept, `$default` routes included (see
    /// [`Router::allowed_methods`]).
    fn allowed_methods(&self, path: &str) -> Vec<&[u8]> {
        let mut m = self.trie.allowed_methods(path);
        if self.default_for(path).is_some() {
            m.extend(ANY_METHODS);
            m.sort_unstable();
            m.dedup();
        }
        m
    }

    fn find(&self, routes: &[Route], method: &str, path: &str, params: &mut Params) -> RouteMatch {
        params.clear();
        match self.trie.lookup(method, path, params) {
            Match::Found(&id) => {
                if !self.nested_stages {
                    return RouteMatch::Found(id);
                }
                match self.named_stage(path, &routes[id as usize]) {
                    None => RouteMatch::Found(id),
                    Some(d) => {
                        params.clear();
                        match d {
                            Some(_) if method == "TRACE" => RouteMatch::MethodNotAllowed,
                            Some(d) => RouteMatch::Found(d),
                            None => RouteMatch::NotFound,
                        }
                    }
                }
            }
            m => {
                if let Some(mut id) = self.default_for(path) {
                    if self.nested_stages {
                        match self.named_stage(path, &routes[id as usize]) {
                            None => {}
                            Some(Some(d)) => id = d,
                            Some(None) => return RouteMatch::NotFound,
                        }
                    }
                    params.clear();
                    // A `$default` route takes every method but TRACE, as ANY does.
                    if method == "TRACE" {
                        return RouteMatch::MethodNotAllowed;
                    }
                    return RouteMatch::Found(id);
                }
                if matches!(m, Match::MethodNotAllowed) {
                    RouteMatch::MethodNotAllowed
                } else {
                    RouteMatch::NotFound
                }
            }
        }
    }
}

/// Whether `path` lies under `prefix` (equal, or the prefix then `/`; every path lies under
/// the empty prefix).
fn holds(prefix: &str, path: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| prefix.is_empty() || rest.is_empty() || rest.starts_with('/'))
}

/// All routes of all APIs and stages, by host.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
    by_host: AHashMap<String, Table>,
    /// `*.example.com` patterns, keyed by `.example.com`.
    by_wildcard: AHashMap<String, Table>,
    any_host: Table,
}

impl RouteTable {
    /// The table of a `hosts` entry ([`host_pattern`] form), made when new.
    fn host_table(&mut self, pattern: &str) -> &mut Table {
        match pattern.strip_prefix('*') {
            Some(suffix) => self.by_wildcard.entry(suffix.to_string()).or_default(),
            None => self.by_host.entry(pattern.to_string()).or_default(),
        }
    }

    /// The tables for host `h` (lower case, no port, no trailing dot), most specific first:
    /// the exact name's, then the `*.` pattern's that covers its first label.
    fn tables_for<'a>(&'a self, h: &str) -> impl Iterator<Item = &'a Table> {
        let wild = h
            .find('.')
            .filter(|_| !self.by_wildcard.is_empty())
            .and_then(|i| self.by_wildcard.get(&h[i..]));
        self.by_host.get(h).into_iter().chain(wild)
    }

    /// Whether any API is bound to `hosts`.
    fn has_hosts(&self) -> bool {
        !self.by_host.is_empty() || !self.by_wildcard.is_empty()
    }

    /// Finds the route for a request. `host` is the Host header (a port is ignored).
    pub fn find(
        &self,
        host: Option<&[u8]>,
        method: &str,
        path: &str,
        params: &mut Params,
    ) -> RouteMatch {
        if self.has_hosts() {
            let mut buf = [0u8; 256];
            if let Some(h) = host.and_then(|h| host_key(h, &mut buf)) {
                // The most specific host's route wins; a path that one host tier has only
                // under other methods goes on to the next tier, as a path it does not have
                // at all does (405 only when none serves it).
                let mut not_allowed = false;
                for t in self.tables_for(h) {
                    match t.find(&self.routes, method, path, params) {
                        RouteMatch::NotFound => {}
                        RouteMatch::MethodNotAllowed => not_allowed = true,
                        m => return m,
                    }
                }
                return match self.any_host.find(&self.routes, method, path, params) {
                    RouteMatch::NotFound if not_allowed => RouteMatch::MethodNotAllowed,
                    m => m,
                };
            }
        }
        self.any_host.find(&self.routes, method, path, params)
    }

    /// For a [`RouteMatch::MethodNotAllowed`] from [`RouteTable::find`]: the methods the
    /// path's routes accept (the `Allow` of the 405), from every host table `find` tried.
    pub fn allowed_methods(&self, host: Option<&[u8]>, path: &str) -> Vec<&[u8]> {
        let mut m = self.any_host.allowed_methods(path);
        let mut buf = [0u8; 256];
        if let Some(h) = host.and_then(|h| host_key(h, &mut buf)) {
            for t in self.tables_for(h) {
                m.extend(t.allowed_methods(path));
            }
            m.sort_unstable();
            m.dedup();
        }
        m
    }

    /// For a [`RouteMatch::MethodNotAllowed`]: a route of the path in the most specific host
    /// tier that has the path under any method: the API the request addressed (its CORS and
    /// labels go on the 405 or the preflight's answer).
    pub fn path_route(&self, host: Option<&[u8]>, path: &str, params: &mut Params) -> Option<u32> {
        let of = |t: &Table, params: &mut Params| {
            t.allowed_methods(path)
                .iter()
                .filter_map(|m| std::str::from_utf8(m).ok())
                .find_map(|m| match t.find(&self.routes, m, path, params) {
                    RouteMatch::Found(id) => Some(id),
                    _ => None,
                })
        };
        let mut buf = [0u8; 256];
        if let Some(h) = host.and_then(|h| host_key(h, &mut buf)) {
            for t in self.tables_for(h) {
                if let Some(id) = of(t, params) {
                    return Some(id);
                }
            }
        }
        of(&self.any_host, params)
    }

    /// For a request that matched no route: a route of the API (and stage) its host and path
    /// prefix address, so its answer can carry that API's CORS headers; `None` when no API,
    /// or more than one, claims the prefix. Not on the path of a routed request.
    pub fn scope(&self, host: Option<&[u8]>, path: &str) -> Option<u32> {
        let mut buf = [0u8; 256];
        if let Some(h) = host.and_then(|h| host_key(h, &mut buf)) {
            if let Some(found) = self.tables_for(h).find_map(|t| t.scope(path)) {
                return found;
            }
        }
        self.any_host.scope(path).flatten()
    }

    /// The compiled route with this id.
    pub fn route(&self, id: u32) -> &Route {
        &self.routes[id as usize]
    }

    /// All routes, in id order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The route table as text, one line per route (for `--check`).
    pub fn describe(&self, upstreams: &[UpstreamConfig]) -> String {
        let mut s = String::new();
        for r in &self.routes {
            let mut target = match &r.integration {
                Integration::Mock(m) => format!("mock {}", m.status),
                Integration::Http {
                    upstream,
                    path: None,
                } => format!("http {}", upstreams[*upstream].name),
                Integration::Http {
                    upstream,
                    path: Some(t),
                } => format!("http {} {}", upstreams[*upstream].name, t.text),
                Integration::WebSocket(w) => format!("websocket ({} routes)", w.routes.len()),
            };
            // Only GET and HEAD use the cache: a route of another method shows none.
            let method = r.key.split(' ').next().unwrap_or("");
            if let Some(c) = r
                .cache
                .as_ref()
                .filter(|_| matches!(method, "GET" | "HEAD" | "ANY" | "$default"))
            {
                let _ = write!(target, " (cache {}s)", c.ttl.as_secs());
            }
            if let Some(v) = &r.validate {
                let _ = write!(target, " (validate {})", v.path);
            }
            if r.request_mapping.is_some() || r.response_mapping.is_some() {
                target.push_str(" (mapped)");
            }
            let _ = writeln!(
                s,
                "{:<12} {:<10} {:<28} {:<36} -> {}",
                r.api, r.stage, r.key, r.served_at, target
            );
        }
        s
    }
}

/// `--check`'s view of where a route is reached: `host/path`, `{a,b}/path`, or `/path`.
fn served_at(hosts: &[String], path: &str) -> Box<str> {
    match hosts {
        [] => path.into(),
        [h] => format!("{h}{path}").into(),
        hs => format!("{{{}}}{path}", hs.join(",")).into(),
    }
}

/// The host name of a `Host` value as routing compares it: without the port, and without the
/// trailing dot of a fully qualified name (`api.example.com.` is `api.example.com`, as nginx
/// takes it): otherwise that spelling would slip past an API bound to `hosts`. Also
/// `$context.domainName`, which in Amazon API Gateway carries neither.
pub(crate) fn strip_port(h: &[u8]) -> &[u8] {
    if h.first() == Some(&b'[') {
        // [v6]:port
        return match h.iter().position(|&c| c == b']') {
            Some(i) => &h[..=i],
            None => h,
        };
    }
    let h = match h.iter().rposition(|&c| c == b':') {
        Some(i) => &h[..i],
        None => h,
    };
    h.strip_suffix(b".").unwrap_or(h)
}

/// A `Host` value in the form routing compares (see [`host_pattern`]) written into `buf`:
/// without its port ([`strip_port`]), lower case, and a bracketed IPv6 address in its
/// canonical text (RFC 5952: `[0:0::1]` is `[::1]`). `None` when it is longer than `buf` or
/// not UTF-8 (no host table can match it then).
fn host_key<'a>(h: &[u8], buf: &'a mut [u8; 256]) -> Option<&'a str> {
    let h = strip_port(h);
    let mut n = h.len();
    if n > buf.len() {
        return None;
    }
    for (d, s) in buf.iter_mut().zip(h) {
        *d = s.to_ascii_lowercase();
    }
    if n > 2 && buf[0] == b'[' && buf[n - 1] == b']' {
        let v6 = std::str::from_utf8(&buf[1..n - 1])
            .ok()
            .and_then(|a| a.parse::<std::net::Ipv6Addr>().ok());
        if let Some(a) = v6 {
            let mut w: &mut [u8] = &mut buf[..];
            std::io::Write::write_fmt(&mut w, format_args!("[{a}]")).ok()?;
            n = 256 - w.len();
        }
    }
    std::str::from_utf8(&buf[..n]).ok()
}

/// A `hosts` entry in the form routing compares: lower case, without a trailing dot. A host
/// name (letters, digits, `-`, `_`, dots between labels), an IPv4 address, a bracketed IPv6
/// address, or `*.` and a host name (any name one label under it). Else why not.
fn host_pattern(h: &str) -> Result<String, String> {
    let p = h.strip_suffix('.').unwrap_or(h).to_ascii_lowercase();
    let bad = |why: &str| Err(format!("`{}` {why}", h.escape_debug()));
    if p.starts_with('[') {
        let inner = p.strip_prefix('[').and_then(|r| r.strip_suffix(']'));
        return match inner {
            // In canonical text, as [`host_key`] writes a request's.
            Some(a) => match a.parse::<std::net::Ipv6Addr>() {
                Ok(a) => Ok(format!("[{a}]")),
                Err(_) => bad("is not a bracketed IPv6 address"),
            },
            _ => bad("is not a bracketed IPv6 address"),
        };
    }
    let name = p.strip_prefix("*.").unwrap_or(&p);
    if name.contains(':') {
        return bad("holds a port: give the host alone (the Host header's port is ignored)");
    }
    if name.contains('*') {
        return bad("has a `*` that is not a leading `*.` (one label under a name)");
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return bad("is not a host name (letters, digits, `-` and `_`, with dots between labels)");
    }
    Ok(p)
}

/// Prometheus labels of a route: `api="..",stage="..",route=".."`.
pub(crate) fn route_labels(api: &str, stage: &str, key: &str) -> String {
    format!(
        "api=\"{}\",stage=\"{}\",route=\"{}\"",
        crate::metrics::escape_label(api),
        crate::metrics::escape_label(stage),
        crate::metrics::escape_label(key)
    )
}

/// Why no request could ever match route or base path `p`: requests arrive with their path in
/// normal form ([`crate::http::RequestHead::normalize_path`]), without `//`, spaces, raw
/// non-ASCII, or percent-encodings that have a raw form, and with upper-case hex digits; and a
/// request whose path holds a dot segment, an encoded `/`, `\\` or NUL, a raw `\\` or `;`, or
/// one of `"<>`` ` `` raw is refused before routing.
fn unmatchable(p: &str) -> Result<(), String> {
    if p.chars().any(|c| !c.is_ascii_graphic()) {
        return Err("holds a space, control or non-ASCII character: percent-encode it".into());
    }
    if p.contains("//") {
        return Err("holds `//`: requests are matched with empty segments merged".into());
    }
    if let Some(c) = p.chars().find(|c| matches!(c, '?' | '#')) {
        return Err(format!(
            "holds `{c}`, which ends a request's path (percent-encode it if it is data)"
        ));
    }
    if let Some(c) = p
        .chars()
        .find(|c| matches!(c, '\\' | ';' | '"' | '<' | '>' | '`'))
    {
        return Err(format!(
            "holds `{c}`: requests with it raw in their path are refused (400)"
        ));
    }
    let dot = |seg: &str| {
        let d = seg.replace("%2E", ".").replace("%2e", ".");
        d == "." || d == ".."
    };
    if p.split('/').any(dot) {
        return Err("holds a `.` or `..` segment: requests with one are refused (400)".into());
    }
    let b = p.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            i += 1;
            continue;
        }
        let hex = |c: Option<&u8>| c.and_then(|c| (*c as char).to_digit(16));
        let (Some(h), Some(l)) = (hex(b.get(i + 1)), hex(b.get(i + 2))) else {
            return Err("holds a `%` not followed by two hex digits".into());
        };
        let c = (h * 16 + l) as u8;
        let enc = &p[i..i + 3];
        if matches!(c, b'/' | b'\\' | 0) {
            return Err(format!(
                "holds `{enc}`: requests with an encoded `/`, `\\` or NUL in their path are refused (400)"
            ));
        }
        if crate::http::request::decoded_in_normal_form(c) {
            return Err(format!(
                "holds `{enc}`: requests are matched with it decoded, write `{}`",
                c as char
            ));
        }
        if enc.bytes().any(|x| x.is_ascii_lowercase()) {
            return Err(format!(
                "holds `{enc}`: requests are matched with upper-case hex digits, write `{}`",
                enc.to_ascii_uppercase()
            ));
        }
        i += 3;
    }
    Ok(())
}

/// Substitutes `${stageVariables.NAME}` in a mock's headers and body; other `${...}` text is
/// left as written (a mock body may well hold it), an unknown variable is an error.
fn subst_mock_vars(
    s: &str,
    vars: &std::collections::BTreeMap<String, String>,
) -> Result<String, String> {
    subst_vars(s, vars, true)
}

/// Substitutes `${stageVariables.NAME}`; unknown names, and any other `${...}`, are an error.
pub(crate) fn subst_stage_vars(
    s: &str,
    vars: &std::collections::BTreeMap<String, String>,
) -> Result<String, String> {
    subst_vars(s, vars, false)
}

/// The one substitution of both: `keep_other` leaves `${...}` that is not a stage variable as
/// written instead of refusing it.
fn subst_vars(
    s: &str,
    vars: &std::collections::BTreeMap<String, String>,
    keep_other: bool,
) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let Some(name) = after.strip_prefix("stageVariables.") else {
            if keep_other {
                out.push_str("${");
                rest = after;
                continue;
            }
            let expr = after.split('}').next().unwrap_or(after);
            return Err(format!(
                "`${{{expr}}}`: only ${{stageVariables.NAME}} is supported here"
            ));
        };
        let end = name
            .find('}')
            .ok_or_else(|| format!("unterminated `${{stageVariables.` in `{s}`"))?;
        let v = vars.get(&name[..end]).ok_or_else(|| {
            format!(
                "stage variable `{}` is not defined for this stage",
                &name[..end]
            )
        })?;
        out.push_str(v);
        rest = &name[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Compiles an integration path as written: `{param}` become the request's captures and
/// `${stageVariables.NAME}` the stage's value, as literal text (a `{id}` in a value is no
/// parameter).
fn compile_template(
    raw: &str,
    names: &[String],
    vars: &std::collections::BTreeMap<String, String>,
) -> Result<PathTemplate, String> {
    let full = subst_stage_vars(raw, vars)?;
    let s = full.as_str();
    if !s.starts_with('/') {
        return Err(format!("integration path `{s}` must start with `/`"));
    }
    // Stage variables are substituted by now: what is left goes on the request line as is.
    if let Some(c) = s.chars().find(|&c| !c.is_ascii_graphic() || c == '#') {
        return Err(format!(
            "integration path `{}` holds {}: percent-encode it (in the stage variable too)",
            s.escape_debug(),
            if c == ' ' {
                "a space".to_string()
            } else {
                format!("`{}`", c.escape_debug())
            }
        ));
    }
    let mut parts = Vec::new();
    let mut lit = String::new();
    // Past the template's `?` (literal or from a stage variable).
    let mut in_query = false;
    let mut rest = raw;
    while let Some(i) = rest.find('{') {
        let after = &rest[i + 1..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unterminated `{{` in `{raw}`"))?;
        let name = &after[..end];
        if i > 0 && rest.as_bytes()[i - 1] == b'$' {
            // `${stageVariables.NAME}` (checked by the substitution above).
            lit.push_str(&rest[..i - 1]);
            let var = name.strip_prefix("stageVariables.").unwrap_or(name);
            lit.push_str(vars.get(var).map_or("", |v| v.as_str()));
        } else {
            lit.push_str(&rest[..i]);
            if !lit.is_empty() {
                in_query |= lit.contains('?');
                parts.push(Part::Lit(std::mem::take(&mut lit).into()));
            }
            let name = name.trim_end_matches('+');
            let idx = names
                .iter()
                .position(|n| n == name)
                .ok_or_else(|| format!("`{{{name}}}` is not a parameter of the route"))?;
            parts.push(if in_query {
                Part::QueryParam(idx)
            } else {
                Part::Param(idx)
            });
        }
        rest = &after[end + 1..];
    }
    lit.push_str(rest);
    if !lit.is_empty() {
        parts.push(Part::Lit(lit.into()));
    }
    Ok(PathTemplate {
        parts,
        has_query: s.contains('?'),
        text: s.into(),
    })
}

/// A mock's response, encoded once. Its headers may not be ones the gateway writes itself
/// (framing, hop-by-hop, `x-request-id`, `date`, `x-cache`, ...: they would be sent twice), nor
/// `access-control-*` on an API with `cors` (the gateway's CORS answer is the only one then).
fn encode_mock(
    status: u16,
    headers: &std::collections::BTreeMap<String, String>,
    body: &str,
    cors: bool,
) -> Result<MockResponse, String> {
    if !(200..=599).contains(&status) {
        return Err(format!("mock status {status} must be between 200 and 599"));
    }
    // RFC 9110 8.6 and 15.4.5: a 204 never has a body nor Content-Length; a 304 has no body
    // (and its Content-Length would describe the unsent representation, so none is sent).
    let bodiless = status == 204 || status == 304;
    // RFC 9110 15.3.6: a 205 has no content either (it is sent with `content-length: 0`).
    if (bodiless || status == 205) && !body.is_empty() {
        return Err(format!("a mock with status {status} cannot have a body"));
    }
    let mut head = Vec::new();
    encode::push_status_line(&mut head, status);
    let mut seen = std::collections::BTreeSet::new();
    for (k, v) in headers {
        let lk = k.to_ascii_lowercase();
        if !seen.insert(lk.clone()) {
            return Err(format!(
                "mock header `{k}` is given twice (names are case-insensitive)"
            ));
        }
        // On a CORS API the gateway writes `Vary: Origin` itself: the mock's `vary` keeps its
        // other names, so `Origin` is listed once.
        let v = if cors && lk == "vary" {
            let rest: Vec<&str> = v
                .split(',')
                .map(str::trim)
                .filter(|t| !t.eq_ignore_ascii_case("origin"))
                .collect();
            if rest.iter().all(|t| t.is_empty()) {
                continue;
            }
            rest.join(", ")
        } else {
            v.clone()
        };
        let v = &v;
        match crate::http::HeaderKind::of(lk.as_bytes()) {
            crate::http::HeaderKind::AccessControl if cors => {
                return Err(format!(
                    "mock header `{k}`: the API has `cors`, which writes the access-control-* headers"
                ));
            }
            crate::http::HeaderKind::AccessControl => {}
            _ if crate::policy::mapping::gateway_response_header(&lk) => {
                return Err(format!(
                    "mock header `{k}` is set by the gateway (framing, hop-by-hop or its own)"
                ));
            }
            _ => {}
        }
        if !k
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c))
            || k.is_empty()
        {
            return Err(format!("mock header name `{k}` is not a valid token"));
        }
        if v.bytes().any(|c| (c < 0x20 && c != b'\t') || c == 0x7f) {
            return Err(format!("mock header `{k}` has a control character"));
        }
        encode::push_header(&mut head, k.as_bytes(), v.as_bytes());
    }
    if !bodiless {
        head.extend_from_slice(b"content-length: ");
        encode::push_u64(&mut head, body.len() as u64);
        head.extend_from_slice(b"\r\n");
    }
    Ok(MockResponse {
        status,
        head: Bytes::from(head),
        body: Bytes::from(body.to_string()),
    })
}

type RawMapping = toml::Spanned<std::collections::BTreeMap<String, toml::Spanned<String>>>;

/// A mapping table without its spans.
fn plain(m: &RawMapping) -> std::collections::BTreeMap<String, String> {
    m.get_ref()
        .iter()
        .map(|(k, v)| (k.clone(), v.get_ref().clone()))
        .collect()
}

/// A mapping error at the line of the key's value.
fn map_err(
    src: &Source,
    m: &RawMapping,
    route_key: &str,
    what: &str,
    (key, msg): mapping::MapError,
) -> ConfigError {
    let span = m.get_ref().get(&key).map(|v| v.span()).unwrap_or(m.span());
    src.err(span, &format!("{route_key}.{what}.\"{key}\""), msg)
}

/// Compiles every API's routes for every stage.
pub(super) fn compile(
    src: &Source,
    apis: &[RawApi],
    upstreams: &[UpstreamConfig],
    auth: &crate::policy::auth::AuthConfig,
) -> Result<RouteTable, ConfigError> {
    let mut table = RouteTable::default();
    let mut names_seen: Vec<&str> = Vec::new();
    for (ai, api) in apis.iter().enumerate() {
        let akey = |k: &str| format!("apis[{ai}].{k}");
        let name = api.name.get_ref().as_str();
        if name.is_empty() || names_seen.contains(&name) {
            return Err(src.err(
                api.name.span(),
                &akey("name"),
                format!("API name `{name}` is empty or used twice"),
            ));
        }
        names_seen.push(name);
        let websocket_api = match api.protocol.get_ref().as_str() {
            "http" => false,
            "websocket" => true,
            p => {
                return Err(src.err(
                    api.protocol.span(),
                    &akey("protocol"),
                    format!("`{p}` is not one of http, websocket"),
                ))
            }
        };
        let ws_settings = crate::ws::settings_for(api, websocket_api).map_err(|(k, m)| {
            if k.is_empty() {
                let span = api.websocket.as_ref().map(|w| w.span()).unwrap_or(0..0);
                src.err(span, &akey("websocket"), m)
            } else {
                // No span of its own: the key's line is found in the file.
                src.err(0..0, &akey(&format!("websocket.{k}")), m)
            }
        })?;
        if let (false, Some(rs)) = (websocket_api, &api.route_selection) {
            return Err(src.err(
                rs.span(),
                &akey("route_selection"),
                "only WebSocket APIs (protocol = \"websocket\") select routes from messages",
            ));
        }
        if let (true, Some(cors)) = (websocket_api, &api.cors) {
            return Err(src.err(
                cors.span(),
                &akey("cors"),
                "`cors` is for HTTP APIs; a WebSocket API restricts the handshake's Origin with \
                 [apis.websocket] allowed_origins",
            ));
        }
        let base = api.base_path.get_ref().as_str();
        if let Err(e) = unmatchable(base) {
            return Err(src.err(
                api.base_path.span(),
                &akey("base_path"),
                format!("`{base}` {e}"),
            ));
        }
        if !base.is_empty()
            && (!base.starts_with('/')
                || base.ends_with('/')
                || base.contains(['{', '}', '?', '#']))
        {
            return Err(src.err(
                api.base_path.span(),
                &akey("base_path"),
                "must be empty or start with `/`, without a trailing `/` or `{`, `?`",
            ));
        }
        let default_stage = std::collections::BTreeMap::from([(
            "$default".to_string(),
            super::raw::RawStage {
                variables: Default::default(),
                access_log: true,
                cache: None,
                throttle: None,
            },
        )]);
        let stages = if api.stages.is_empty() {
            &default_stage
        } else {
            &api.stages
        };
        let api_name: Arc<str> = name.into();
        let hosts: &[String] = match &api.hosts {
            None => &[],
            Some(h) if h.get_ref().is_empty() => {
                return Err(src.err(
                    h.span(),
                    &akey("hosts"),
                    "is empty: list the host names, or leave `hosts` out to serve every host",
                ))
            }
            Some(h) => h.get_ref(),
        };
        let hosts = hosts
            .iter()
            .enumerate()
            .map(|(hi, h)| {
                host_pattern(h).map_err(|m| {
                    let span = api.hosts.as_ref().map_or(api.name.span(), |s| s.span());
                    src.err(span, &akey(&format!("hosts[{hi}]")), m)
                })
            })
            .collect::<Result<Vec<String>, ConfigError>>()?;
        // Schemas are read and compiled once per route, whatever the number of stages.
        let mut schemas = Vec::with_capacity(api.routes.len());
        for (ri, r) in api.routes.iter().enumerate() {
            schemas.push(match (&r.validate, websocket_api) {
                (Some(v), false) => Some(crate::policy::validate::compile(
                    src,
                    v,
                    &format!("apis[{ai}].routes[{ri}]"),
                )?),
                _ => None,
            });
        }
        for (stage_name, stage) in stages {
            if let Some(c) = &stage.cache {
                crate::cache::config::check_stage(
                    src,
                    c,
                    &akey(&format!("stages.{}.cache", key_part(stage_name))),
                )?;
            }
            if stage_name != "$default"
                && (stage_name.is_empty()
                    || !stage_name
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'))
            {
                return Err(src.err(
                    0..0,
                    &akey(&format!("stages.{}", key_part(stage_name))),
                    "stage names are letters, digits, `-` and `_` (or `$default`)",
                ));
            }
            let prefix = if stage_name == "$default" {
                base.to_string()
            } else {
                format!("{base}/{stage_name}")
            };
            let stage_arc: Arc<str> = stage_name.as_str().into();
            if websocket_api {
                if let Some(cache) = &stage.cache {
                    return Err(src.err(
                        cache.span(),
                        &akey(&format!("stages.{}.cache", key_part(stage_name))),
                        "WebSocket API stages are not cached",
                    ));
                }
                let wsapi = crate::ws::api::compile(
                    src,
                    ai,
                    api,
                    &api_name,
                    &stage_arc,
                    stage,
                    upstreams,
                    ws_settings.clone(),
                )?;
                // Auth guards the handshake: it is read from the `$connect` route; on the
                // per-message routes it (and a cache) would mean nothing, so it is refused.
                let mut connect_auth = crate::policy::auth::RouteAuth::default();
                for (ri, r) in api.routes.iter().enumerate() {
                    let rkey = format!("apis[{ai}].routes[{ri}]");
                    if r.route.get_ref().trim() == "$connect" {
                        connect_auth = crate::policy::auth::resolve_route(
                            src,
                            &rkey,
                            r.auth.as_ref(),
                            &r.scopes,
                            r.api_key_required,
                            auth,
                        )?;
                    } else {
                        // The key at fault, at its own line where the TOML keeps a span.
                        let set = [
                            ("auth", r.auth.as_ref().map(|a| a.span())),
                            ("scopes", (!r.scopes.is_empty()).then_some(0..0)),
                            ("api_key_required", r.api_key_required.then_some(0..0)),
                            ("throttle", r.throttle.as_ref().map(|t| t.span())),
                        ];
                        if let Some((k, span)) =
                            set.into_iter().find_map(|(k, s)| s.map(|s| (k, s)))
                        {
                            return Err(src.err(
                                span,
                                &format!("{rkey}.{k}"),
                                "on a WebSocket API, auth, scopes, api_key_required and throttle apply to the handshake: set them on the `$connect` route",
                            ));
                        }
                    }
                    if let Some(c) = &r.cache {
                        return Err(src.err(
                            c.span(),
                            &format!("{rkey}.cache"),
                            "WebSocket API routes are not cached",
                        ));
                    }
                    for (k, span) in [
                        ("validate", r.validate.as_ref().map(|v| v.span())),
                        (
                            "request_mapping",
                            r.request_mapping.as_ref().map(|m| m.span()),
                        ),
                        (
                            "response_mapping",
                            r.response_mapping.as_ref().map(|m| m.span()),
                        ),
                    ] {
                        if let Some(span) = span {
                            return Err(src.err(
                                span,
                                &format!("{rkey}.{k}"),
                                "WebSocket API routes do not validate or map messages",
                            ));
                        }
                    }
                }
                let id = table.routes.len() as u32;
                let labels = route_labels(name, stage_name, "$connect");
                table.routes.push(Route {
                    api: api_name.clone(),
                    stage: stage_arc.clone(),
                    key: "$connect".into(),
                    labels: labels.into(),
                    prefix_len: prefix.len(),
                    served_at: served_at(&hosts, if prefix.is_empty() { "/" } else { &prefix }),
                    integration: Integration::WebSocket(wsapi),
                    access_log: stage.access_log,
                    cache: None,
                    auth: connect_auth,
                    ws: ws_settings.clone(),
                    validate: None,
                    request_mapping: None,
                    response_mapping: None,
                });
                let full = if prefix.is_empty() { "/" } else { &prefix };
                // With and without the trailing slash, as a stage root of an HTTP API.
                let slash = format!("{prefix}/");
                let insert = |t: &mut Table| {
                    t.add_scope(&prefix, &api_name, id);
                    for p in [full, &slash[..]]
                        .iter()
                        .take(if prefix.is_empty() { 1 } else { 2 })
                    {
                        t.trie
                            .insert(Some("GET"), p, id)
                            .map_err(|e| src.err(api.name.span(), &akey("name"), e.0))?;
                    }
                    Ok::<(), ConfigError>(())
                };
                if hosts.is_empty() {
                    insert(&mut table.any_host)?;
                } else {
                    for h in &hosts {
                        insert(table.host_table(h))?;
                    }
                }
                continue;
            }
            for (ri, r) in api.routes.iter().enumerate() {
                let rkey = format!("apis[{ai}].routes[{ri}].route");
                let ikey = format!("apis[{ai}].routes[{ri}].integration");
                let key_str = r.route.get_ref().trim();
                let rerr = |msg: String| src.err(r.route.span(), &rkey, msg);
                let ierr = |msg: String| src.err(r.integration.span(), &ikey, msg);
                let (method, path): (Option<&str>, Option<&str>) = if key_str == "$default" {
                    (None, None)
                } else {
                    let (m, p) = key_str.split_once(' ').ok_or_else(|| {
                        rerr(format!(
                            "`{key_str}` is not `METHOD /path`, `ANY /path` or `$default`"
                        ))
                    })?;
                    let p = p.trim();
                    if m.is_empty() || !m.bytes().all(|c| c.is_ascii_uppercase()) {
                        return Err(rerr(format!("`{m}` is not an uppercase method or ANY")));
                    }
                    if !p.starts_with('/') {
                        return Err(rerr(format!("path `{p}` must start with `/`")));
                    }
                    unmatchable(p).map_err(|e| rerr(format!("path `{p}` {e}")))?;
                    // A path under a named stage's prefix belongs to that stage: in the
                    // `$default` stage this route could never be reached.
                    let first = p[1..].split('/').next().unwrap_or_default();
                    if stage_name == "$default" && first != "$default" && stages.contains_key(first)
                    {
                        return Err(rerr(format!(
                            "path `{p}` starts with `/{first}`, the prefix of stage `{first}`: \
                             requests there go to that stage, never to this route in stage \
                             `$default`"
                        )));
                    }
                    (if m == "ANY" { None } else { Some(m) }, Some(p))
                };
                let names = match path {
                    Some(p) => param_names(p).map_err(|e| rerr(e.0))?,
                    None => Vec::new(),
                };
                // The key as it is named from now on (metric labels, the access log, `--check`,
                // `$context.routeKey`): one space between method and path, whatever spacing
                // the file has, so `GET  /a` and `GET /a` are one route by one name.
                let normal_key;
                let key_str: &str = match path {
                    Some(p) => {
                        normal_key = format!("{} {p}", method.unwrap_or("ANY"));
                        &normal_key
                    }
                    None => key_str,
                };
                let integration = match r.integration.get_ref() {
                    RawIntegration::Http {
                        upstream,
                        path: ipath,
                    } => {
                        let up = subst_stage_vars(upstream, &stage.variables).map_err(&ierr)?;
                        let idx = upstreams.iter().position(|u| u.name == up).ok_or_else(|| {
                            ierr(format!("upstream `{up}` is not defined in [[upstreams]]"))
                        })?;
                        let tpl = match ipath {
                            None => None,
                            Some(p) => {
                                Some(compile_template(p, &names, &stage.variables).map_err(&ierr)?)
                            }
                        };
                        Integration::Http {
                            upstream: idx,
                            path: tpl,
                        }
                    }
                    RawIntegration::Mock {
                        status,
                        headers,
                        body,
                    } => {
                        // Mock headers that the response mapping owns are left out here; the
                        // mapping writes them per request.
                        let mut headers = headers.clone();
                        for v in headers.values_mut() {
                            *v = subst_mock_vars(v, &stage.variables).map_err(&ierr)?;
                        }
                        let body = subst_mock_vars(body, &stage.variables).map_err(&ierr)?;
                        let body = &body;
                        if let Some(m) = &r.response_mapping {
                            headers.retain(|k, _| {
                                !m.get_ref().keys().any(|mk| {
                                    mk.strip_prefix("header.")
                                        .is_some_and(|n| n.eq_ignore_ascii_case(k))
                                })
                            });
                        }
                        Integration::Mock(
                            encode_mock(*status, &headers, body, api.cors.is_some())
                                .map_err(&ierr)?,
                        )
                    }
                };
                let mut route_auth = crate::policy::auth::resolve_route(
                    src,
                    &format!("apis[{ai}].routes[{ri}]"),
                    r.auth.as_ref(),
                    &r.scopes,
                    r.api_key_required,
                    auth,
                )?;
                let mut cache = crate::cache::config::compile(
                    src,
                    stage.cache.as_ref(),
                    r.cache.as_ref(),
                    &format!("apis[{ai}].routes[{ri}]"),
                    matches!(integration, Integration::Http { .. }),
                    &names,
                    name,
                    stage_name,
                    &route_auth.credential_fields(auth),
                )?;
                let env = mapping::Env {
                    stage_vars: &stage.variables,
                    params: &names,
                    api: name,
                    stage: stage_name,
                    route_key: key_str,
                    prefix_len: prefix.len(),
                };
                let rbase = format!("apis[{ai}].routes[{ri}]");
                let mut needs = Vec::new();
                let request_mapping = match &r.request_mapping {
                    None => None,
                    Some(m) => {
                        if !matches!(integration, Integration::Http { .. }) {
                            return Err(src.err(
                                m.span(),
                                &format!("{rbase}.request_mapping"),
                                "a request mapping needs an `http` integration",
                            ));
                        }
                        let (rm, n) = mapping::compile_request(&plain(m), &env)
                            .map_err(|e| map_err(src, m, &rbase, "request_mapping", e))?;
                        needs.push((m, "request_mapping", n));
                        let inputs = rm.client_inputs();
                        if inputs.contains(&mapping::ClientInput::SourceIp) {
                            // The answer may depend on the caller's address, which no key
                            // holds: one caller's answer would be served to every other.
                            cache = None;
                        } else if let Some(pol) = cache.as_mut().and_then(Arc::get_mut) {
                            pol.add_unkeyed_inputs(&inputs);
                        }
                        Some(Box::new(rm))
                    }
                };
                let response_mapping = match &r.response_mapping {
                    None => None,
                    Some(m) => {
                        let (hm, n) = mapping::compile_response(&plain(m), &env)
                            .map_err(|e| map_err(src, m, &rbase, "response_mapping", e))?;
                        needs.push((m, "response_mapping", n));
                        Some(Box::new(hm))
                    }
                };
                for (m, what, n) in needs {
                    let jwt = matches!(route_auth.kind, crate::policy::auth::AuthKind::Jwt(_));
                    let authorizer = matches!(
                        route_auth.kind,
                        crate::policy::auth::AuthKind::Authorizer(_)
                    );
                    let refuse =
                        |msg: &str| Err(src.err(m.span(), &format!("{rbase}.{what}"), msg));
                    if n.claims && !jwt {
                        return refuse("`$context.authorizer.claims.NAME` needs `auth = \"jwt:NAME\"` on the route");
                    }
                    if n.authorizer_context && !authorizer {
                        return refuse("`$context.authorizer.NAME` reads a request authorizer's context: it needs `auth = \"authorizer:NAME\"` on the route (JWT claims are `$context.authorizer.claims.NAME`)");
                    }
                    route_auth.keep_context |= n.claims || n.authorizer_context;
                }
                let id = table.routes.len() as u32;
                let labels = route_labels(name, stage_name, key_str);
                table.routes.push(Route {
                    api: api_name.clone(),
                    stage: stage_arc.clone(),
                    key: key_str.into(),
                    labels: labels.into(),
                    prefix_len: prefix.len(),
                    served_at: served_at(
                        &hosts,
                        &match path {
                            None => format!("{prefix}/*"),
                            Some("/") if !prefix.is_empty() => prefix.clone(),
                            Some(p) => format!("{prefix}{p}"),
                        },
                    ),
                    integration,
                    access_log: stage.access_log,
                    cache,
                    auth: route_auth,
                    ws: ws_settings.clone(),
                    validate: schemas[ri].clone(),
                    request_mapping,
                    response_mapping,
                });
                let none = [String::new()];
                for h in if hosts.is_empty() { &none[..] } else { &hosts } {
                    let t = if h.is_empty() {
                        &mut table.any_host
                    } else {
                        table.host_table(h)
                    };
                    t.add_scope(&prefix, &api_name, id);
                    match path {
                        None => {
                            if t.defaults.iter().any(|(p, _)| *p == prefix) {
                                return Err(rerr(format!(
                                    "a second `$default` route for the prefix `{prefix}`"
                                )));
                            }
                            t.defaults.push((prefix.clone(), id));
                            t.defaults.sort_by_key(|d| std::cmp::Reverse(d.0.len()));
                        }
                        Some(p) => {
                            let full = if p == "/" && !prefix.is_empty() {
                                prefix.clone()
                            } else {
                                format!("{prefix}{p}")
                            };
                            if let Err(e) = t.trie.insert(method, &full, id) {
                                // Name the route already there (often another API's, through
                                // its base path, stage or hosts).
                                let mut ps = crate::router::Params::default();
                                let other =
                                    match t.trie.lookup(method.unwrap_or("ANY"), &full, &mut ps) {
                                        crate::router::Match::Found(&o)
                                            if e.0.ends_with("already defined") =>
                                        {
                                            let o = &table.routes[o as usize];
                                            format!(
                                                " by API `{}`, stage `{}`, route `{}`",
                                                o.api, o.stage, o.key
                                            )
                                        }
                                        _ => String::new(),
                                    };
                                return Err(rerr(format!("{}{other}", e.0)));
                            }
                            if p == "/" && !prefix.is_empty() {
                                // The stage's root answers with and without the trailing
                                // slash (`/prod` and `/prod/`), as API Gateway's invoke URL.
                                let slash = format!("{prefix}/");
                                t.trie.insert(method, &slash, id).map_err(|e| rerr(e.0))?;
                            }
                        }
                    }
                }
            }
        }
    }
    for t in table
        .by_host
        .values_mut()
        .chain(table.by_wildcard.values_mut())
        .chain([&mut table.any_host])
    {
        t.finish();
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use crate::config::parse;
    use crate::router::Params;
    use std::path::Path;

    use super::RouteMatch;

    const BASE: &str = r#"
[[upstreams]]
name = "orders"
targets = ["127.0.0.1:9001"]
[[apis]]
name = "shop"
[apis.stages.prod]
variables = { backend = "orders", version = "v1" }
[apis.stages."$default"]
variables = { backend = "orders", version = "v0" }
[[apis.routes]]
route = "GET /products/{id}"
integration = { type = "http", upstream = "${stageVariables.backend}", path = "/${stageVariables.version}/items/{id}" }
[[apis.routes]]
route = "$default"
integration = { type = "mock", status = 200, body = "fallback" }
"#;

    #[test]
    fn stage_prefix_and_variables() {
        let c = parse(Path::new("t.toml"), BASE).unwrap();
        let mut params = Params::new();
        let path = "/prod/products/42";
        let RouteMatch::Found(id) = c.routes.find(None, "GET", path, &mut params) else {
            panic!("not found")
        };
        let r = c.routes.route(id);
        assert_eq!(&*r.stage, "prod");
        let crate::config::Integration::Http { path: Some(t), .. } = &r.integration else {
            panic!()
        };
        let mut out = Vec::new();
        t.render(path.as_bytes(), &params, &mut out);
        assert_eq!(out, b"/v1/items/42");
        // $default stage at "/"
        let RouteMatch::Found(id) = c.routes.find(None, "GET", "/products/7", &mut params) else {
            panic!()
        };
        assert_eq!(&*c.routes.route(id).stage, "$default");
        // $default route catches the rest, 405 never happens with a $default route
        let RouteMatch::Found(id) = c.routes.find(None, "POST", "/prod/products/7", &mut params)
        else {
            panic!()
        };
        assert_eq!(&*c.routes.route(id).key, "$default");
    }

    #[test]
    fn parameters_in_the_template_query_cannot_add_parameters() {
        let cfg = r#"
[[upstreams]]
name = "u"
targets = ["127.0.0.1:9"]
[[apis]]
name = "q"
[apis.stages."$default"]
variables = { q = "/v?u=" }
[[apis.routes]]
route = "GET /q/{id}"
integration = { type = "http", upstream = "u", path = "/l/{id}?user={id}&role=reader" }
[[apis.routes]]
route = "GET /v/{id+}"
integration = { type = "http", upstream = "u", path = "${stageVariables.q}{id}" }
"#;
        let c = parse(Path::new("t.toml"), cfg).unwrap();
        let render = |path: &str| {
            let mut params = Params::new();
            let RouteMatch::Found(id) = c.routes.find(None, "GET", path, &mut params) else {
                panic!("{path}: not found")
            };
            let crate::config::Integration::Http { path: Some(t), .. } =
                &c.routes.route(id).integration
            else {
                panic!()
            };
            let mut out = Vec::new();
            t.render(path.as_bytes(), &params, &mut out);
            String::from_utf8(out).unwrap()
        };
        // In the path part the value goes as it is; after `?` its separators are encoded.
        assert_eq!(
            render("/q/bob&role=admin"),
            "/l/bob&role=admin?user=bob%26role%3Dadmin&role=reader"
        );
        assert_eq!(
            render("/q/a+b;c%20d"),
            "/l/a+b;c%20d?user=a%2Bb%3Bc%20d&role=reader"
        );
        // A `?` from a stage variable counts too; a greedy value keeps its `/`.
        assert_eq!(render("/v/x/y&z=1"), "/v?u=x/y%26z%3D1");
    }

    #[test]
    fn the_path_names_the_stage_before_routes_compete() {
        // As API Gateway: `/beta/...` belongs to stage `beta` even where a `$default`-stage
        // route (a parameter, a greedy one, `$default`) would match it too.
        let cfg = |routes: &str| {
            format!(
                r#"
[[apis]]
name = "st"
[apis.stages."$default"]
[apis.stages.beta]
{routes}
[[apis]]
name = "other"
base_path = "/other"
[[apis.routes]]
route = "GET /x"
integration = {{ type = "mock" }}
"#
            )
        };
        let route = |k: &str| {
            format!("[[apis.routes]]\nroute = \"{k}\"\nintegration = {{ type = \"mock\" }}\n")
        };
        let with_default =
            cfg(&[route("GET /{p}/y"), route("GET /items"), route("$default")].concat());
        let without = cfg(&[route("GET /{p}/y"), route("ANY /{p+}"), route("GET /items")].concat());
        let c = parse(Path::new("t.toml"), &with_default).unwrap();
        let mut params = Params::new();
        let mut at = |c: &crate::config::Config, m: &str, path: &str| match c.routes.find(
            None,
            m,
            path,
            &mut params,
        ) {
            RouteMatch::Found(id) => {
                let r = c.routes.route(id);
                format!("{} {}", r.stage, r.key)
            }
            other => format!("{other:?}"),
        };
        assert_eq!(at(&c, "GET", "/beta/items"), "beta GET /items");
        assert_eq!(at(&c, "GET", "/beta/y"), "beta $default");
        assert_eq!(at(&c, "GET", "/beta/x/y"), "beta GET /{p}/y");
        assert_eq!(at(&c, "GET", "/x/y"), "$default GET /{p}/y");
        assert_eq!(at(&c, "GET", "/nothing"), "$default $default");
        assert_eq!(at(&c, "TRACE", "/beta/y"), "MethodNotAllowed");
        assert_eq!(at(&c, "GET", "/other/x"), "$default GET /x");
        let c = parse(Path::new("t.toml"), &without).unwrap();
        assert_eq!(at(&c, "GET", "/beta/y"), "beta ANY /{p+}");
        assert_eq!(at(&c, "GET", "/beta/zz"), "beta ANY /{p+}");
        assert_eq!(at(&c, "GET", "/beta"), "NotFound");
        assert_eq!(at(&c, "GET", "/zz"), "$default ANY /{p+}");
        // A `$default`-stage route under a stage's prefix could never be reached: refused.
        let e = parse(Path::new("t.toml"), &cfg(&route("GET /beta/x"))).unwrap_err();
        assert!(e.to_string().contains("prefix of stage `beta`"), "{e}");
    }

    #[test]
    fn stage_root_with_and_without_trailing_slash() {
        let cfg = r#"
[[apis]]
name = "b"
base_path = "/base"
[apis.stages.prod]
[[apis.routes]]
route = "GET /"
integration = { type = "mock", body = "root" }
[[apis.routes]]
route = "GET /a/"
integration = { type = "mock", body = "a-slash" }
[[apis.routes]]
route = "$default"
integration = { type = "mock", body = "default" }
"#;
        let c = parse(Path::new("t.toml"), cfg).unwrap();
        let mut params = Params::new();
        let key = |path: &str, params: &mut Params| match c.routes.find(None, "GET", path, params) {
            RouteMatch::Found(id) => c.routes.route(id).key.to_string(),
            _ => "none".into(),
        };
        assert_eq!(key("/base/prod", &mut params), "GET /");
        assert_eq!(key("/base/prod/", &mut params), "GET /");
        // Elsewhere the trailing slash still makes another path.
        assert_eq!(key("/base/prod/a/", &mut params), "GET /a/");
        assert_eq!(key("/base/prod/a", &mut params), "$default");
    }

    #[test]
    fn unknown_stage_variable_names_line() {
        let bad = BASE.replace("version = \"v1\"", "versio = \"v1\"");
        let e = parse(Path::new("t.toml"), &bad).unwrap_err().0;
        assert!(e.contains("t.toml:13:") && e.contains("version"), "{e}");
    }

    #[test]
    fn conflicting_routes_refused() {
        let text = r#"
[[apis]]
name = "a"
[[apis.routes]]
route = "GET /x/{a}"
integration = { type = "mock" }
[[apis.routes]]
route = "GET /x/{b}"
integration = { type = "mock" }
"#;
        let e = parse(Path::new("t.toml"), text).unwrap_err().0;
        assert!(
            e.contains("t.toml:8:") && e.contains("routes[1].route"),
            "{e}"
        );
    }

    #[test]
    fn mappings_compile_onto_the_route() {
        let text = r#"
[[authorizers]]
name = "users"
type = "jwt"
secret = "0123456789abcdef0123456789abcdef"
[[upstreams]]
name = "o"
targets = ["127.0.0.1:9001"]
[[apis]]
name = "a"
[[apis.routes]]
route = "GET /claims"
integration = { type = "http", upstream = "o" }
auth = "jwt:users"
request_mapping = { "header.x-mail" = "$context.authorizer.claims.email" }
[[apis.routes]]
route = "GET /principal"
integration = { type = "http", upstream = "o" }
auth = "jwt:users"
request_mapping = { "header.x-user" = "$context.principal" }
[[apis.routes]]
route = "GET /mock"
integration = { type = "mock", headers = { "X-Drop" = "1", "x-keep" = "2" } }
response_mapping = { "header.x-drop" = "remove" }
[[apis.routes]]
route = "GET /plain"
integration = { type = "http", upstream = "o" }
"#;
        let c = parse(Path::new("t.toml"), text).unwrap();
        let r = c.routes.routes();
        // Claims are kept per request only where a mapping reads them.
        assert!(r[0].auth.keep_context && r[0].request_mapping.is_some());
        assert!(!r[1].auth.keep_context);
        let crate::config::Integration::Mock(m) = &r[2].integration else {
            panic!()
        };
        let head = String::from_utf8_lossy(&m.head).to_ascii_lowercase();
        assert!(
            !head.contains("x-drop") && head.contains("x-keep: 2"),
            "{head}"
        );
        assert!(r[2].response_mapping.is_some());
        assert!(r[3].request_mapping.is_none() && r[3].response_mapping.is_none());
        assert!(r[3].validate.is_none());
    }

    #[test]
    fn hosts_and_405() {
        let text = r#"
[[apis]]
name = "a"
hosts = ["A.example.com"]
[[apis.routes]]
route = "GET /x"
integration = { type = "mock", body = "a" }
[[apis]]
name = "b"
[[apis.routes]]
route = "GET /y"
integration = { type = "mock", body = "b" }
"#;
        let c = parse(Path::new("t.toml"), text).unwrap();
        let mut p = Params::new();
        assert!(matches!(
            c.routes
                .find(Some(b"a.example.com:8080"), "GET", "/x", &mut p),
            RouteMatch::Found(_)
        ));
        assert_eq!(
            c.routes.find(Some(b"other"), "GET", "/x", &mut p),
            RouteMatch::NotFound
        );
        assert!(matches!(
            c.routes.find(Some(b"a.example.com"), "GET", "/y", &mut p),
            RouteMatch::Found(_)
        ));
        assert_eq!(
            c.routes.find(None, "POST", "/y", &mut p),
            RouteMatch::MethodNotAllowed
        );
        // The fully qualified spelling (trailing dot) is the same host, port or not.
        for h in [&b"a.example.com."[..], b"A.EXAMPLE.COM.:443"] {
            assert!(finds(&c, h, "/x"), "{}", String::from_utf8_lossy(h));
        }
    }

    /// Whether `GET path` with `Host: host` finds a route.
    fn finds(c: &crate::config::Config, host: &[u8], path: &str) -> bool {
        let r = c.routes.find(Some(host), "GET", path, &mut Params::new());
        matches!(r, RouteMatch::Found(_))
    }

    #[test]
    fn ipv6_hosts_match_whatever_their_spelling() {
        let text = r#"
[[apis]]
name = "v6"
hosts = ["[0:0::1]", "[2001:DB8::0:1]"]
[[apis.routes]]
route = "GET /x"
integration = { type = "mock", body = "v6" }
"#;
        let c = parse(Path::new("t.toml"), text).unwrap();
        for h in [
            &b"[::1]"[..],
            b"[0::1]:8080",
            b"[0000:0000:0000:0000:0000:0000:0000:0001]",
            b"[2001:db8::1]",
            b"[2001:DB8:0:0:0:0:0:1]:443",
        ] {
            assert!(finds(&c, h, "/x"), "{}", String::from_utf8_lossy(h));
        }
        for h in [&b"[::2]"[..], b"[::1"] {
            assert!(!finds(&c, h, "/x"), "{}", String::from_utf8_lossy(h));
        }
    }

    #[test]
    fn wildcard_hosts_cover_one_label_and_exact_names_win() {
        let text = r#"
[[apis]]
name = "wild"
hosts = ["*.Example.com", "[::1]", "10.0.0.1"]
[[apis.routes]]
route = "GET /x"
integration = { type = "mock", body = "wild" }
[[apis]]
name = "exact"
hosts = ["api.example.com"]
[[apis.routes]]
route = "GET /x"
integration = { type = "mock", body = "exact" }
[[apis]]
name = "any"
[[apis.routes]]
route = "GET /x"
integration = { type = "mock", body = "any" }
"#;
        let c = parse(Path::new("t.toml"), text).unwrap();
        let api_of = |host: &[u8]| {
            let mut p = Params::new();
            match c.routes.find(Some(host), "GET", "/x", &mut p) {
                RouteMatch::Found(id) => c.routes.route(id).api.to_string(),
                m => panic!("{m:?}"),
            }
        };
        assert_eq!(api_of(b"api.example.com"), "exact");
        for h in [
            &b"www.example.com"[..],
            b"SHOP.example.com.:8080",
            b"[::1]:80",
            b"10.0.0.1",
        ] {
            assert_eq!(api_of(h), "wild", "{}", String::from_utf8_lossy(h));
        }
        // Not the bare name, not two labels under it.
        for h in [&b"example.com"[..], b"a.b.example.com", b"xexample.com"] {
            assert_eq!(api_of(h), "any", "{}", String::from_utf8_lossy(h));
        }
    }

    #[test]
    fn hosts_that_are_not_host_names_are_refused() {
        for (bad, why) in [
            ("not a host!", "is not a host name"),
            ("a.*.example.com", "leading `*.`"),
            ("*", "leading `*.`"),
            ("api.example.com:8080", "holds a port"),
            ("[::zz]", "IPv6"),
            ("a..b", "is not a host name"),
            ("", "is not a host name"),
        ] {
            let text = format!(
                "[[apis]]\nname = \"a\"\nhosts = [\"ok.example\", \"{bad}\"]\n[[apis.routes]]\nroute = \"GET /x\"\nintegration = {{ type = \"mock\" }}\n"
            );
            let e = parse(Path::new("t.toml"), &text).unwrap_err().to_string();
            assert!(
                e.contains("t.toml:3") && e.contains("apis[0].hosts[1]") && e.contains(why),
                "{bad}: {e}"
            );
        }
        // An empty list would serve every host, as no `hosts` does: refused as a likely slip.
        let text = "[[apis]]\nname = \"a\"\nhosts = []\n[[apis.routes]]\nroute = \"GET /x\"\nintegration = { type = \"mock\" }\n";
        let e = parse(Path::new("t.toml"), text).unwrap_err().to_string();
        assert!(
            e.contains("t.toml:3") && e.contains("apis[0].hosts") && e.contains("is empty"),
            "{e}"
        );
    }
}
