//! Parameter mapping, as in Amazon API Gateway HTTP APIs: a route's `request_mapping` sets,
//! overwrites or removes headers and query parameters of the request sent upstream, and its
//! `response_mapping` does the same to the headers of the response the client gets.
//!
//! ```toml
//! request_mapping = { "header.x-user" = "$context.principal", "query.debug" = "remove" }
//! response_mapping = { "header.x-served-by" = "ringgate" }
//! ```
//!
//! A value is `"remove"`, or text mixing literals and variables (`$context.requestId`,
//! `${request.header.x-tenant}`, `${stageVariables.version}`, ...). Everything is parsed and
//! checked when the config loads: stage variables and the API, stage and route names become
//! literals, path parameters become capture indexes; a request only copies bytes. A mapped
//! name is owned by its rule: the client's (or upstream's) fields of that name are dropped and
//! the rule's value sent instead, or nothing when the rule is `remove` or one of its variables
//! has no value for the request (no principal, an absent header, ...), or when the value would
//! hold a control character (nothing can inject CR/LF into a head). A path parameter the
//! client sent that decodes to a control character is not dropped silently: the request is
//! refused with 400 before its integration ([`RequestMapping::refusal`]).

use crate::http::{HeaderKind, RequestHead};
use crate::router::Params;
use std::collections::BTreeMap;
use std::net::IpAddr;

/// What a variable reads at run time.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Var {
    /// The authorizer's principal (sent as `x-principal-id`).
    Principal,
    RequestId,
    SourceIp,
    /// The name of the API key that passed the route's auth.
    ApiKeyName,
    HttpMethod,
    /// The request path as received (without the query).
    Path,
    /// The request path without the API's base path and stage prefix (the first N bytes).
    RequestPath(usize),
    /// The Host header.
    DomainName,
    /// Milliseconds since the Unix epoch.
    RequestTimeEpoch,
    /// A claim of the verified JWT.
    Claim(Box<str>),
    /// A field of the request authorizer's `context`.
    AuthorizerContext(Box<str>),
    /// A request header (lowercase name).
    Header(Box<str>),
    /// A query parameter (decoded name).
    Query(Box<[u8]>),
    /// A route path parameter, by capture index.
    PathParam(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Lit(Box<[u8]>),
    Var(Var),
}

/// A parsed mapping value: literals and variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    segs: Box<[Seg]>,
}

/// What a rule does with its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Remove,
    Set(Template),
}

/// What config-time names a value may use.
pub struct Env<'a> {
    pub stage_vars: &'a BTreeMap<String, String>,
    /// The route's path parameter names, in capture order.
    pub params: &'a [String],
    pub api: &'a str,
    pub stage: &'a str,
    pub route_key: &'a str,
    /// Length of the route's base path + stage prefix (`$request.path` leaves it out).
    pub prefix_len: usize,
}

/// What a request offers to the variables.
pub struct Ctx<'a> {
    pub head: &'a RequestHead,
    pub buf: &'a [u8],
    pub params: &'a Params,
    pub request_id: &'a [u8],
    pub peer: IpAddr,
    pub principal: Option<&'a str>,
    pub api_key: Option<&'a str>,
    /// JWT claims or the request authorizer's context (kept only for routes that map them).
    pub auth_context: Option<&'a serde_json::Value>,
}

/// Which authorizer data a mapping reads (the auth stage keeps it only when asked).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    pub claims: bool,
    pub authorizer_context: bool,
}

impl Needs {
    fn add(&mut self, t: &Template) {
        for s in t.segs.iter() {
            match s {
                Seg::Var(Var::Claim(_)) => self.claims = true,
                Seg::Var(Var::AuthorizerContext(_)) => self.authorizer_context = true,
                _ => {}
            }
        }
    }
}

fn is_name_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.')
}

/// Parses a value (not `remove`).
pub fn parse(s: &str, env: &Env) -> Result<Template, String> {
    let mut segs: Vec<Seg> = Vec::new();
    let mut lit: Vec<u8> = Vec::new();
    let b = s.as_bytes();
    if !header_safe(b) {
        return Err(format!("`{s}` holds a control character"));
    }
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c != b'$' {
            lit.push(c);
            i += 1;
            continue;
        }
        // `${expr}` or `$expr` (the name runs over letters, digits, `_`, `-` and `.`); a `$`
        // followed by anything else is a literal `$`.
        let (expr, next) = match b.get(i + 1) {
            Some(b'{') => {
                let end = s[i + 2..]
                    .find('}')
                    .ok_or_else(|| format!("unterminated `${{` in `{s}`"))?;
                (&s[i + 2..i + 2 + end], i + 3 + end)
            }
            Some(c) if c.is_ascii_alphabetic() => {
                let len = b[i + 1..].iter().take_while(|&&c| is_name_char(c)).count();
                (&s[i + 1..i + 1 + len], i + 1 + len)
            }
            _ => {
                lit.push(b'$');
                i += 1;
                continue;
            }
        };
        match variable(expr, env)? {
            Seg::Lit(l) => {
                if !header_safe(&l) {
                    return Err(format!("`${expr}` holds a control character"));
                }
                lit.extend_from_slice(&l)
            }
            v => {
                if !lit.is_empty() {
                    segs.push(Seg::Lit(std::mem::take(&mut lit).into()));
                }
                segs.push(v);
            }
        }
        i = next;
    }
    if !lit.is_empty() {
        segs.push(Seg::Lit(lit.into()));
    }
    Ok(Template { segs: segs.into() })
}

/// One variable (without `$` and braces); those known when the config loads become literals.
fn variable(expr: &str, env: &Env) -> Result<Seg, String> {
    let unknown = || {
        format!(
            "unknown variable `${expr}` (known: $context.principal, $context.requestId, \
             $context.identity.sourceIp, $context.identity.userAgent, $context.apiKeyName, \
             $context.authorizer.claims.NAME, $context.authorizer.NAME, $context.httpMethod, \
             $context.path, $context.domainName, $context.requestTimeEpoch, $context.stage, \
             $context.routeKey, $context.apiId, $request.header.NAME, \
             $request.querystring.NAME, $request.path.NAME, $stageVariables.NAME)"
        )
    };
    fn nonempty(name: &str, unknown: impl Fn() -> String) -> Result<&str, String> {
        if name.is_empty() {
            Err(unknown())
        } else {
            Ok(name)
        }
    }
    let lit = |s: &str| Ok(Seg::Lit(s.as_bytes().into()));
    if let Some(name) = expr.strip_prefix("stageVariables.") {
        return match env.stage_vars.get(name) {
            Some(v) => lit(v),
            None => Err(format!(
                "stage variable `{name}` is not defined for stage `{}`",
                env.stage
            )),
        };
    }
    if let Some(rest) = expr.strip_prefix("request.") {
        if rest == "path" {
            return Ok(Seg::Var(Var::RequestPath(env.prefix_len)));
        }
        if let Some(name) = rest.strip_prefix("header.") {
            let name = nonempty(name, unknown)?;
            if !name.bytes().all(crate::http::chunked::is_tchar) {
                return Err(format!("`{name}` is not a header name"));
            }
            return Ok(Seg::Var(Var::Header(name.to_ascii_lowercase().into())));
        }
        if let Some(name) = rest.strip_prefix("querystring.") {
            return Ok(Seg::Var(Var::Query(
                nonempty(name, unknown)?.as_bytes().into(),
            )));
        }
        if let Some(name) = rest.strip_prefix("path.") {
            let name = nonempty(name, unknown)?;
            return match env.params.iter().position(|p| p == name) {
                Some(i) => Ok(Seg::Var(Var::PathParam(i))),
                None => Err(format!(
                    "`$request.path.{name}`: `{name}` is not a parameter of the route"
                )),
            };
        }
        return Err(unknown());
    }
    let Some(rest) = expr.strip_prefix("context.") else {
        return Err(unknown());
    };
    Ok(Seg::Var(match rest {
        "principal" | "authorizer.principalId" => Var::Principal,
        "requestId" => Var::RequestId,
        "identity.sourceIp" => Var::SourceIp,
        "identity.userAgent" => Var::Header("user-agent".into()),
        "apiKeyName" | "identity.apiKeyId" => Var::ApiKeyName,
        "httpMethod" => Var::HttpMethod,
        "path" => Var::Path,
        "domainName" => Var::DomainName,
        "requestTimeEpoch" => Var::RequestTimeEpoch,
        "stage" => return lit(env.stage),
        "routeKey" => return lit(env.route_key),
        "apiId" => return lit(env.api),
        _ => {
            if let Some(claim) = rest.strip_prefix("authorizer.claims.") {
                Var::Claim(nonempty(claim, unknown)?.into())
            } else if let Some(field) = rest.strip_prefix("authorizer.") {
                Var::AuthorizerContext(nonempty(field, unknown)?.into())
            } else {
                return Err(unknown());
            }
        }
    }))
}

/// Parses a rule's value: `remove` or a template.
pub fn parse_action(s: &str, env: &Env) -> Result<Action, String> {
    if s == "remove" {
        Ok(Action::Remove)
    } else {
        parse(s, env).map(Action::Set)
    }
}

/// Where a rendered value goes, which decides how its bytes are written.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    /// As is; any control character but HTAB makes the value unusable.
    Header,
    /// Percent-encoded (everything but RFC 3986 unreserved characters).
    Query,
}

impl Template {
    /// Appends the value for `ctx` to `out`; false (with `out` as it was) when a variable has
    /// no value or the value cannot be written to `target`.
    fn render(&self, ctx: &Ctx, target: Target, out: &mut Vec<u8>) -> bool {
        let start = out.len();
        let mut tmp: Vec<u8> = Vec::new();
        for seg in self.segs.iter() {
            let ok = match seg {
                Seg::Lit(l) => {
                    put(out, l, target);
                    true
                }
                Seg::Var(v) if target == Target::Header => {
                    // Literals were checked when the config loaded, and so were (by the
                    // parser) the request's head and what the auth stage sets; what is
                    // decoded or comes from a token is checked here.
                    let mark = out.len();
                    value_of(v, ctx, out) && (!v.untrusted() || header_safe(&out[mark..]))
                }
                Seg::Var(v) => {
                    tmp.clear();
                    value_of(v, ctx, &mut tmp) && {
                        percent_encode(&tmp, out);
                        true
                    }
                }
            };
            if !ok {
                out.truncate(start);
                return false;
            }
        }
        true
    }
}

impl Var {
    /// Whether the value may hold bytes a header value cannot (control characters): decoded
    /// query and path values, claims and authorizer context.
    fn untrusted(&self) -> bool {
        matches!(
            self,
            Var::Query(_) | Var::PathParam(_) | Var::Claim(_) | Var::AuthorizerContext(_)
        )
    }
}

/// No control character but HTAB (branch-free, so it runs as a vector loop).
fn header_safe(v: &[u8]) -> bool {
    !v.iter().fold(false, |bad, &c| {
        bad | ((c < 0x20) & (c != b'\t')) | (c == 0x7f)
    })
}

fn put(out: &mut Vec<u8>, v: &[u8], target: Target) {
    match target {
        Target::Header => out.extend_from_slice(v),
        Target::Query => percent_encode(v, out),
    }
}

/// Percent-encodes all but the RFC 3986 unreserved characters.
fn percent_encode(v: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &c in v {
        if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
            out.push(c);
        } else {
            out.extend_from_slice(&[b'%', HEX[(c >> 4) as usize], HEX[(c & 15) as usize]]);
        }
    }
}

/// The value of a query parameter of the client's request, decoded (`+` as space).
fn query_param(ctx: &Ctx, name: &[u8], out: &mut Vec<u8>) -> bool {
    let Some(q) = ctx.head.query.map(|q| ctx.head.slice(ctx.buf, q)) else {
        return false;
    };
    // A parameter given several times: its values joined with commas, as API Gateway does.
    let mut found = false;
    let mut d = Vec::new();
    for v in crate::http::query_values(q, name) {
        if found {
            out.push(b',');
        }
        d.clear();
        crate::http::percent_decode(v, true, &mut d);
        out.extend_from_slice(&d);
        found = true;
    }
    found
}

fn split_pair(pair: &[u8]) -> (&[u8], &[u8]) {
    match pair.iter().position(|&c| c == b'=') {
        Some(i) => (&pair[..i], &pair[i + 1..]),
        None => (pair, &b""[..]),
    }
}

/// Appends a variable's value; false when it has none for this request.
fn value_of(v: &Var, ctx: &Ctx, out: &mut Vec<u8>) -> bool {
    let h = ctx.head;
    match v {
        Var::Principal => match ctx.principal {
            Some(p) => out.extend_from_slice(p.as_bytes()),
            None => return false,
        },
        Var::RequestId => out.extend_from_slice(ctx.request_id),
        Var::SourceIp => crate::http::encode::push_ip(out, ctx.peer),
        Var::ApiKeyName => match ctx.api_key {
            Some(k) => out.extend_from_slice(k.as_bytes()),
            None => return false,
        },
        Var::HttpMethod => out.extend_from_slice(h.method_bytes(ctx.buf)),
        Var::Path => out.extend_from_slice(h.slice(ctx.buf, h.path)),
        Var::RequestPath(n) => {
            let p = h.slice(ctx.buf, h.path);
            match p.get(*n..) {
                Some(rest) if !rest.is_empty() => out.extend_from_slice(rest),
                _ => out.push(b'/'),
            }
        }
        Var::DomainName => match h.host {
            // The host name alone, as Amazon API Gateway gives it: no port, no trailing dot.
            Some(r) => out.extend_from_slice(crate::config::strip_port(h.slice(ctx.buf, r))),
            None => return false,
        },
        Var::RequestTimeEpoch => {
            let ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            crate::http::encode::push_u64(out, ms);
        }
        Var::Claim(name) | Var::AuthorizerContext(name) => {
            match ctx.auth_context.and_then(|c| c.get(&**name)) {
                None | Some(serde_json::Value::Null) => return false,
                Some(serde_json::Value::String(s)) => out.extend_from_slice(s.as_bytes()),
                Some(other) => out.extend_from_slice(other.to_string().as_bytes()),
            }
        }
        Var::Header(name) => match h.header(ctx.buf, name) {
            Some(v) => out.extend_from_slice(v),
            None => return false,
        },
        Var::Query(name) => return query_param(ctx, name, out),
        Var::PathParam(i) => return path_param(ctx, *i, out),
    }
    true
}

/// Appends path parameter `i` of the request, percent-decoded; false when it has none.
fn path_param(ctx: &Ctx, i: usize, out: &mut Vec<u8>) -> bool {
    let Some((a, b)) = ctx.params.get(i) else {
        return false;
    };
    let h = ctx.head;
    let raw = &h.slice(ctx.buf, h.path)[a as usize..b as usize];
    let mut d = Vec::new();
    crate::http::percent_decode(raw, false, &mut d);
    out.extend_from_slice(&d);
    true
}

/// Header rules of a mapping (lowercase names, one rule per name).
#[derive(Debug, Clone, Default)]
pub struct HeaderMapping {
    rules: Box<[(Box<str>, Action)]>,
}

impl HeaderMapping {
    /// Whether `name` (any case) has a rule: its incoming fields are not passed on.
    #[inline]
    pub fn covers(&self, name: &[u8]) -> bool {
        self.rules
            .iter()
            .any(|(n, _)| n.as_bytes().eq_ignore_ascii_case(name))
    }

    /// Appends `name: value` lines of the rules that set a value for this request.
    pub fn push(&self, ctx: &Ctx, out: &mut Vec<u8>) {
        for (name, action) in self.rules.iter() {
            let Action::Set(t) = action else { continue };
            let start = out.len();
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            if t.render(ctx, Target::Header, out) {
                out.extend_from_slice(b"\r\n");
            } else {
                out.truncate(start);
            }
        }
    }

    /// Whether no rule is set.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rules' names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|(n, _)| &**n)
    }
}

/// A route's `request_mapping`.
#[derive(Debug, Clone, Default)]
pub struct RequestMapping {
    pub headers: HeaderMapping,
    query: Box<[QueryRule]>,
    /// The path parameters header rules read.
    header_params: Box<[HeaderParam]>,
}

/// A path parameter a header rule reads: `(capture index, parameter name, header name)`.
type HeaderParam = (usize, Box<str>, Box<str>);

/// A rule for one query parameter.
#[derive(Debug, Clone)]
struct QueryRule {
    /// The name as written in the config (compared with the client's names decoded).
    name: Box<[u8]>,
    /// The name percent-encoded, as it is written upstream.
    encoded: Box<[u8]>,
    action: Action,
}

/// A request field a mapping copies from the client: what the response may then depend on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientInput {
    /// `$request.header.NAME` (lowercase).
    Header(Box<str>),
    /// `$request.querystring.NAME` (decoded name).
    Query(Box<[u8]>),
    /// `$context.identity.sourceIp`: no cache key holds it.
    SourceIp,
}

impl RequestMapping {
    /// The client's headers and query parameters this mapping copies upstream (a response
    /// cache must key on them or not serve requests that carry them).
    pub fn client_inputs(&self) -> Vec<ClientInput> {
        let templates = self
            .headers
            .rules
            .iter()
            .map(|(_, a)| a)
            .chain(self.query.iter().map(|q| &q.action));
        let mut out = Vec::new();
        for a in templates {
            let Action::Set(t) = a else { continue };
            for s in t.segs.iter() {
                let input = match s {
                    Seg::Var(Var::Header(h)) => ClientInput::Header(h.clone()),
                    Seg::Var(Var::Query(q)) => ClientInput::Query(q.clone()),
                    Seg::Var(Var::SourceIp) => ClientInput::SourceIp,
                    _ => continue,
                };
                if !out.contains(&input) {
                    out.push(input);
                }
            }
        }
        out
    }

    /// Why the request cannot be mapped, as the message of a 400: a path parameter that a
    /// header rule reads decodes to a control character, which no header value may hold.
    /// Dropping the header instead would lose the client's value without a word. `None`:
    /// every rule can be written.
    pub fn refusal(&self, ctx: &Ctx) -> Option<String> {
        let mut d = Vec::new();
        for (i, param, header) in self.header_params.iter() {
            d.clear();
            if path_param(ctx, *i, &mut d) && !header_safe(&d) {
                return Some(format!(
                    "Path parameter `{param}` cannot be put in header `{header}`: \
                     it decodes to a control character"
                ));
            }
        }
        None
    }

    /// Whether the mapping changes the query string.
    pub fn maps_query(&self) -> bool {
        !self.query.is_empty()
    }

    /// Appends the query string sent upstream: the client's `query` minus the mapped names
    /// (others kept as they came, in order), then the rules that set a value. `sep` (`?` or
    /// `&`) goes before the first parameter written; nothing is written when none is left.
    pub fn push_query(&self, query: Option<&[u8]>, sep: u8, ctx: &Ctx, out: &mut Vec<u8>) {
        let start = out.len();
        let lead = |out: &mut Vec<u8>| out.push(if out.len() == start { sep } else { b'&' });
        for pair in query.unwrap_or(b"").split(|&c| c == b'&') {
            if pair.is_empty() {
                continue;
            }
            let (k, _) = split_pair(pair);
            if self
                .query
                .iter()
                .any(|q| crate::http::query_name_is(k, &q.name))
            {
                continue;
            }
            lead(out);
            out.extend_from_slice(pair);
        }
        for q in self.query.iter() {
            let Action::Set(t) = &q.action else { continue };
            let mark = out.len();
            lead(out);
            out.extend_from_slice(&q.encoded);
            out.push(b'=');
            if !t.render(ctx, Target::Query, out) {
                out.truncate(mark);
            }
        }
    }
}

/// Why a mapping key or value was refused (the message names the key).
pub type MapError = (String, String);

/// Compiles a route's `request_mapping` table. Errors are `(key, message)`, the key being
/// the mapping's key (`header.x-user`).
pub fn compile_request(
    table: &BTreeMap<String, String>,
    env: &Env,
) -> Result<(RequestMapping, Needs), MapError> {
    let mut headers: Vec<(Box<str>, Action)> = Vec::new();
    let mut query: Vec<QueryRule> = Vec::new();
    let mut header_params = Vec::new();
    let mut needs = Needs::default();
    for (k, v) in table {
        let e = |m: String| (k.clone(), m);
        let action = parse_action(v, env).map_err(e)?;
        if let Action::Set(t) = &action {
            needs.add(t);
        }
        if let Some(name) = k.strip_prefix("header.") {
            let name = header_name(name, false).map_err(e)?;
            if headers.iter().any(|(n, _)| *n == name) {
                return Err(e(format!("header `{name}` is mapped twice")));
            }
            if let Action::Set(t) = &action {
                for seg in t.segs.iter() {
                    if let Seg::Var(Var::PathParam(i)) = seg {
                        let param = env.params.get(*i).map_or("", String::as_str);
                        header_params.push((*i, param.into(), name.clone()));
                    }
                }
            }
            headers.push((name, action));
        } else if let Some(name) = k.strip_prefix("query.") {
            if name.is_empty() {
                return Err(e("the query parameter name is empty".into()));
            }
            if name.bytes().any(|c| c < 0x21 || c == 0x7f) {
                return Err(e(format!(
                    "query parameter name `{name}` holds a space or control character"
                )));
            }
            let mut enc = Vec::new();
            percent_encode(name.as_bytes(), &mut enc);
            query.push(QueryRule {
                name: name.as_bytes().into(),
                encoded: enc.into(),
                action,
            });
        } else {
            return Err(e(format!(
                "`{k}` is not `header.NAME` or `query.NAME` (the integration's `path` maps the path)"
            )));
        }
    }
    Ok((
        RequestMapping {
            headers: HeaderMapping {
                rules: headers.into(),
            },
            query: query.into(),
            header_params: header_params.into(),
        },
        needs,
    ))
}

/// Compiles a route's `response_mapping` table (`header.NAME` keys only).
pub fn compile_response(
    table: &BTreeMap<String, String>,
    env: &Env,
) -> Result<(HeaderMapping, Needs), MapError> {
    let mut rules: Vec<(Box<str>, Action)> = Vec::new();
    let mut needs = Needs::default();
    for (k, v) in table {
        let e = |m: String| (k.clone(), m);
        let Some(name) = k.strip_prefix("header.") else {
            return Err(e(format!(
                "`{k}` is not `header.NAME` (a response mapping sets headers)"
            )));
        };
        let name = header_name(name, true).map_err(e)?;
        if rules.iter().any(|(n, _)| *n == name) {
            return Err(e(format!("header `{name}` is mapped twice")));
        }
        let action = parse_action(v, env).map_err(e)?;
        if let Action::Set(t) = &action {
            needs.add(t);
        }
        rules.push((name, action));
    }
    Ok((
        HeaderMapping {
            rules: rules.into(),
        },
        needs,
    ))
}

/// Whether a response header (lowercase name) is one the gateway writes or frames with:
/// framing, hop-by-hop, `x-request-id`, `x-cache`, `access-control-*`, `date`, `age`, ...
/// Neither a response mapping nor a mock may set one.
pub(crate) fn gateway_response_header(lower: &str) -> bool {
    HeaderKind::of(lower.as_bytes()) != HeaderKind::Other
        || matches!(lower, "age" | "date" | "forwarded")
}

/// A mappable header name, lowercased: a token, and not one the gateway writes or frames
/// with (hop-by-hop, framing, Host, `x-forwarded-*`, `x-request-id`, `x-principal-id`,
/// `x-cache`, `access-control-*`, ...).
fn header_name(name: &str, response: bool) -> Result<Box<str>, String> {
    if name.is_empty() || !name.bytes().all(crate::http::chunked::is_tchar) {
        return Err(format!("`{name}` is not a valid header name"));
    }
    let lower = name.to_ascii_lowercase();
    let reserved = if response {
        gateway_response_header(&lower)
    } else {
        HeaderKind::of(lower.as_bytes()) != HeaderKind::Other || lower == "forwarded"
    };
    if reserved {
        return Err(format!(
            "header `{lower}` is set by the gateway (framing, hop-by-hop or its own) and cannot be mapped"
        ));
    }
    Ok(lower.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{Limits, Status};

    fn env<'a>(vars: &'a BTreeMap<String, String>, params: &'a [String]) -> Env<'a> {
        Env {
            stage_vars: vars,
            params,
            api: "shop",
            stage: "prod",
            route_key: "GET /items/{id}",
            prefix_len: "/prod".len(),
        }
    }

    fn vars() -> BTreeMap<String, String> {
        BTreeMap::from([
            ("backend".to_string(), "orders-$x".to_string()),
            ("bad".to_string(), "a\r\nb".to_string()),
        ])
    }

    fn p(s: &str) -> Result<Template, String> {
        parse(s, &env(&vars(), &["id".to_string()]))
    }

    fn lit(s: &str) -> Seg {
        Seg::Lit(s.as_bytes().into())
    }

    #[test]
    fn literals_and_variables() {
        assert_eq!(&*p("ringgate").unwrap().segs, &[lit("ringgate")]);
        assert_eq!(
            &*p("$context.principal").unwrap().segs,
            &[Seg::Var(Var::Principal)]
        );
        assert_eq!(
            &*p("user=${context.principal};id=$context.requestId")
                .unwrap()
                .segs,
            &[
                lit("user="),
                Seg::Var(Var::Principal),
                lit(";id="),
                Seg::Var(Var::RequestId)
            ]
        );
        // Unbraced names run over letters, digits, `_`, `-` and `.`.
        assert_eq!(
            &*p("$request.header.X-Tenant/x").unwrap().segs,
            &[Seg::Var(Var::Header("x-tenant".into())), lit("/x")]
        );
        assert_eq!(
            &*p("${request.querystring.a b}").unwrap().segs,
            &[Seg::Var(Var::Query(b"a b"[..].into()))]
        );
        assert_eq!(
            &*p("$request.path.id").unwrap().segs,
            &[Seg::Var(Var::PathParam(0))]
        );
        assert_eq!(
            &*p("${context.authorizer.claims.https://x/roles}")
                .unwrap()
                .segs,
            &[Seg::Var(Var::Claim("https://x/roles".into()))]
        );
        assert_eq!(
            &*p("$context.authorizer.tenant").unwrap().segs,
            &[Seg::Var(Var::AuthorizerContext("tenant".into()))]
        );
        // A `$` that starts no variable is a literal.
        assert_eq!(&*p("costs $5 $").unwrap().segs, &[lit("costs $5 $")]);
    }

    #[test]
    fn config_time_values_become_literals() {
        // Stage variables are substituted once, and not read again as expressions.
        assert_eq!(
            &*p("${stageVariables.backend}/$context.stage/$context.routeKey/$context.apiId")
                .unwrap()
                .segs,
            &[lit("orders-$x/prod/GET /items/{id}/shop")]
        );
        assert_eq!(
            &*p("$stageVariables.backend").unwrap().segs,
            &[lit("orders-$x")]
        );
    }

    #[test]
    fn refusals() {
        for (bad, why) in [
            ("$context.nope", "unknown variable `$context.nope`"),
            ("$request.cookie.a", "unknown variable"),
            ("$foo", "unknown variable `$foo`"),
            ("${context.principal", "unterminated"),
            (
                "${stageVariables.missing}",
                "stage variable `missing` is not defined",
            ),
            (
                "$request.path.nope",
                "`nope` is not a parameter of the route",
            ),
            ("$request.header.", "unknown variable"),
            ("${request.header.a:b}", "is not a header name"),
            ("$context.authorizer.claims.", "unknown variable"),
            ("a\r\nb", "control character"),
            ("${stageVariables.bad}", "control character"),
        ] {
            let e = p(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn keys_refused() {
        let v = vars();
        let params: [String; 0] = [];
        let env = env(&v, &params);
        let one = |k: &str, val: &str| BTreeMap::from([(k.to_string(), val.to_string())]);
        for (k, why) in [
            ("path", "not `header.NAME` or `query.NAME`"),
            ("body.x", "not `header.NAME` or `query.NAME`"),
            ("header.", "not a valid header name"),
            ("header.a b", "not a valid header name"),
            ("header.Content-Length", "cannot be mapped"),
            ("header.transfer-encoding", "cannot be mapped"),
            ("header.host", "cannot be mapped"),
            ("header.connection", "cannot be mapped"),
            ("header.keep-alive", "cannot be mapped"),
            ("header.x-principal-id", "cannot be mapped"),
            ("header.x-forwarded-for", "cannot be mapped"),
            ("query.", "empty"),
            ("query.a b", "space"),
        ] {
            let e = compile_request(&one(k, "x"), &env).unwrap_err();
            assert_eq!(e.0, k);
            assert!(e.1.contains(why), "{k}: {}", e.1);
        }
        let e = compile_response(&one("query.a", "x"), &env).unwrap_err();
        assert!(e.1.contains("not `header.NAME`"), "{}", e.1);
        let e = compile_response(&one("header.content-type", "$nope"), &env).unwrap_err();
        assert!(e.1.contains("unknown variable"), "{}", e.1);
        let two = BTreeMap::from([
            ("header.X-A".to_string(), "1".to_string()),
            ("header.x-a".to_string(), "2".to_string()),
        ]);
        let e = compile_response(&two, &env).unwrap_err();
        assert!(e.1.contains("mapped twice"), "{}", e.1);
    }

    struct Req {
        buf: Vec<u8>,
        head: RequestHead,
        params: Params,
    }

    fn req(raw: &str) -> Req {
        let buf = raw.as_bytes().to_vec();
        let mut head = RequestHead::new(32);
        let lim = Limits {
            max_header_bytes: 8192,
            max_headers: 32,
        };
        assert!(matches!(head.parse(&buf, &lim), Ok(Status::Complete(_))));
        Req {
            buf,
            head,
            params: Params::new(),
        }
    }

    fn ctx<'a>(r: &'a Req, principal: Option<&'a str>) -> Ctx<'a> {
        Ctx {
            head: &r.head,
            buf: &r.buf,
            params: &r.params,
            request_id: b"rid-1",
            peer: "10.1.2.3".parse().unwrap(),
            principal,
            api_key: None,
            auth_context: None,
        }
    }

    #[test]
    fn headers_render_and_unset_without_value() {
        let v = vars();
        let env = env(&v, &[]);
        let table = BTreeMap::from([
            (
                "header.x-user".to_string(),
                "$context.principal".to_string(),
            ),
            (
                "header.x-ip".to_string(),
                "ip=$context.identity.sourceIp".to_string(),
            ),
            (
                "header.x-copy".to_string(),
                "$request.querystring.q".to_string(),
            ),
            ("header.cookie".to_string(), "remove".to_string()),
        ]);
        let (m, needs) = compile_request(&table, &env).unwrap();
        assert_eq!(needs, Needs::default());
        assert!(m.headers.covers(b"X-User") && m.headers.covers(b"COOKIE"));
        assert!(!m.headers.covers(b"accept"));
        let r = req("GET /x?q=a%20b+c HTTP/1.1\r\nHost: h\r\n\r\n");
        let mut out = Vec::new();
        m.headers.push(&ctx(&r, Some("alice")), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "x-copy: a b c\r\nx-ip: ip=10.1.2.3\r\nx-user: alice\r\n"
        );
        // No principal: x-user is not sent at all.
        let mut out = Vec::new();
        m.headers.push(&ctx(&r, None), &mut out);
        assert!(!String::from_utf8(out).unwrap().contains("x-user"));
    }

    #[test]
    fn request_path_and_repeated_query_values_as_api_gateway() {
        // `$request.path` leaves the stage out (`$context.path` keeps it); a query parameter
        // given several times maps to its values joined with commas.
        let v = vars();
        let env = env(&v, &[]);
        let table = BTreeMap::from([
            ("header.x-p".to_string(), "$request.path".to_string()),
            ("header.x-c".to_string(), "$context.path".to_string()),
            (
                "header.x-q".to_string(),
                "$request.querystring.q".to_string(),
            ),
        ]);
        let (m, _) = compile_request(&table, &env).unwrap();
        for (line, want) in [
            (
                "GET /prod/items/7?q=a&x=1&q=b%2Cc HTTP/1.1",
                "x-c: /prod/items/7\r\nx-p: /items/7\r\nx-q: a,b,c\r\n",
            ),
            ("GET /prod?q= HTTP/1.1", "x-c: /prod\r\nx-p: /\r\nx-q: \r\n"),
        ] {
            let r = req(&format!("{line}\r\nHost: h\r\n\r\n"));
            let mut out = Vec::new();
            m.headers.push(&ctx(&r, None), &mut out);
            assert_eq!(String::from_utf8(out).unwrap(), want, "{line}");
        }
    }

    #[test]
    fn domain_name_is_the_host_name_alone() {
        let v = vars();
        let env = env(&v, &[]);
        let table = BTreeMap::from([("header.x-d".to_string(), "$context.domainName".to_string())]);
        let (m, _) = compile_request(&table, &env).unwrap();
        for (host, want) in [
            ("api.example.com", "api.example.com"),
            ("api.example.com:8443", "api.example.com"),
            ("api.example.com.", "api.example.com"),
            ("api.example.com.:80", "api.example.com"),
            ("[::1]:8080", "[::1]"),
        ] {
            let r = req(&format!("GET /x HTTP/1.1\r\nHost: {host}\r\n\r\n"));
            let mut out = Vec::new();
            m.headers.push(&ctx(&r, None), &mut out);
            assert_eq!(String::from_utf8(out).unwrap(), format!("x-d: {want}\r\n"));
        }
    }

    #[test]
    fn no_crlf_from_values() {
        let v = vars();
        let env = env(&v, &[]);
        let table = BTreeMap::from([
            (
                "header.x-q".to_string(),
                "$request.querystring.q".to_string(),
            ),
            (
                "header.x-c".to_string(),
                "$context.authorizer.claims.c".to_string(),
            ),
        ]);
        let (m, needs) = compile_request(&table, &env).unwrap();
        assert!(needs.claims);
        let r = req("GET /x?q=a%0D%0AX-Evil:%201 HTTP/1.1\r\nHost: h\r\n\r\n");
        let claims = serde_json::json!({"c": "v\r\nx-evil: 1"});
        let mut c = ctx(&r, None);
        c.auth_context = Some(&claims);
        let mut out = Vec::new();
        m.headers.push(&c, &mut out);
        assert!(out.is_empty(), "{:?}", String::from_utf8_lossy(&out));
        // Into a query string the same bytes are percent-encoded.
        let table = BTreeMap::from([("query.c".to_string(), "$request.querystring.q".to_string())]);
        let (m, _) = compile_request(&table, &env).unwrap();
        let mut out = Vec::new();
        m.push_query(None, b'?', &ctx(&r, None), &mut out);
        assert_eq!(out, b"?c=a%0D%0AX-Evil%3A%201");
    }

    #[test]
    fn claims_of_every_kind() {
        let v = vars();
        let env = env(&v, &[]);
        let table = BTreeMap::from([
            (
                "header.a".to_string(),
                "$context.authorizer.claims.s".to_string(),
            ),
            (
                "header.b".to_string(),
                "$context.authorizer.claims.n".to_string(),
            ),
            (
                "header.c".to_string(),
                "${context.authorizer.claims.arr}".to_string(),
            ),
            (
                "header.d".to_string(),
                "$context.authorizer.claims.null".to_string(),
            ),
        ]);
        let (m, _) = compile_response(&table, &env).unwrap();
        let claims = serde_json::json!({"s": "x", "n": 7, "arr": ["g1", "g2"], "null": null});
        let r = req("GET / HTTP/1.1\r\nHost: h\r\n\r\n");
        let mut c = ctx(&r, None);
        c.auth_context = Some(&claims);
        let mut out = Vec::new();
        m.push(&c, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "a: x\r\nb: 7\r\nc: [\"g1\",\"g2\"]\r\n"
        );
    }

    #[test]
    fn query_set_remove_keep_others() {
        let v = vars();
        let params = ["id".to_string()];
        let env = env(&v, &params);
        let table = BTreeMap::from([
            ("query.debug".to_string(), "remove".to_string()),
            ("query.user".to_string(), "$context.principal".to_string()),
            ("query.id".to_string(), "$request.path.id".to_string()),
            ("query.v".to_string(), "a b&c".to_string()),
        ]);
        let (m, _) = compile_request(&table, &env).unwrap();
        assert!(m.maps_query());
        let mut r = req(
            "GET /items/x%20y?a=1&debug=1&b&user=evil&%64ebug=2&&c=3 HTTP/1.1\r\nHost: h\r\n\r\n",
        );
        r.params = {
            // `{id}` captured `x%20y` at offsets 7..12 of the path.
            let mut router = crate::router::Router::new();
            router.insert(Some("GET"), "/items/{id}", 0u32).unwrap();
            let mut p = Params::new();
            let _ = router.lookup("GET", "/items/x%20y", &mut p);
            p
        };
        let q = r.head.query.map(|q| r.head.slice(&r.buf, q));
        let mut out = Vec::new();
        m.push_query(q, b'?', &ctx(&r, Some("al ice")), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "?a=1&b&c=3&id=x%20y&user=al%20ice&v=a%20b%26c"
        );
        // No principal: `user` is dropped (the client's too), others stay; `&` after a
        // template's own query.
        let mut out = Vec::new();
        m.push_query(q, b'&', &ctx(&r, None), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "&a=1&b&c=3&id=x%20y&v=a%20b%26c"
        );
        // Only removals and nothing left: no `?` at all.
        let table = BTreeMap::from([("query.debug".to_string(), "remove".to_string())]);
        let (m, _) = compile_request(&table, &env).unwrap();
        let r = req("GET /x?debug=1 HTTP/1.1\r\nHost: h\r\n\r\n");
        let q = r.head.query.map(|q| r.head.slice(&r.buf, q));
        let mut out = Vec::new();
        m.push_query(q, b'?', &ctx(&r, None), &mut out);
        assert!(out.is_empty());
    }
}
