//! The web application firewall: client IP allow/deny lists (CIDRs, IPv4 and IPv6), a per-IP
//! token bucket, and regex rules on the path, the query, a header or the body.
//!
//! Rules are grouped by target and each group is compiled once into one
//! [`regex::bytes::RegexSet`]: a request is scanned once per target, whatever the number of
//! rules, and only a match asks which rules matched (for the per-rule metrics and the action).
//! The path and query are percent-decoded (and `+` read as a space in the query) before
//! matching, so an encoded attack is seen as the upstream will see it.

use super::throttle::{KeyedBuckets, Wait};
use regex::bytes::RegexSet;
use std::cell::RefCell;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// What a rule does when it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// 403 Forbidden.
    Block,
    /// Only counted (to try a rule before enforcing it).
    Count,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Block => "block",
            Action::Count => "count",
        }
    }
}

/// One rule, with its match counter.
#[derive(Debug)]
pub struct Rule {
    pub name: String,
    pub action: Action,
    /// Shared with the previous config's rule of the same name across a reload.
    pub matches: Arc<AtomicU64>,
}

/// Where a rule looks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Path,
    Query,
    /// A header (lowercase name); every value of it is scanned.
    Header(String),
    Body,
}

impl Target {
    /// Parses `path`, `query`, `header.NAME`, `body`.
    pub fn parse(s: &str) -> Option<Target> {
        Some(match s {
            "path" => Target::Path,
            "query" => Target::Query,
            "body" => Target::Body,
            _ => {
                let h = s.strip_prefix("header.")?;
                if h.is_empty()
                    || !h
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c))
                {
                    return None;
                }
                Target::Header(h.to_ascii_lowercase())
            }
        })
    }
}

/// All rules of one target compiled into one automaton.
#[derive(Debug)]
struct Group {
    set: RegexSet,
    /// Rule index of each pattern of `set`.
    rules: Vec<usize>,
}

/// An IPv4 or IPv6 network; IPv4 is held as IPv4-mapped IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: u128,
    mask: u128,
}

impl Cidr {
    /// Parses `a.b.c.d/n`, `v6::/n` or a bare address.
    pub fn parse(s: &str) -> Option<Cidr> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l.parse::<u32>().ok()?)),
            None => (s, None),
        };
        let ip: IpAddr = addr.trim().parse().ok()?;
        let (bits, len) = match ip {
            IpAddr::V4(_) => {
                let l = len.unwrap_or(32);
                if l > 32 {
                    return None;
                }
                (ip_bits(ip), 96 + l)
            }
            IpAddr::V6(_) => {
                let l = len.unwrap_or(128);
                if l > 128 {
                    return None;
                }
                (ip_bits(ip), l)
            }
        };
        let mask = if len == 0 {
            0
        } else {
            u128::MAX << (128 - len)
        };
        Some(Cidr {
            net: bits & mask,
            mask,
        })
    }

    /// Whether `ip` (as from [`ip_bits`]) is inside.
    #[inline]
    pub fn contains(&self, ip: u128) -> bool {
        ip & self.mask == self.net
    }
}

/// An address as 128 bits (IPv4 as IPv4-mapped IPv6, so one list serves both).
#[inline]
pub fn ip_bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => u128::from(v4.to_ipv6_mapped()),
            None => u128::from(v6),
        },
    }
}

/// The per-IP bucket key: the address for IPv4, its /64 for IPv6 (one host usually holds a
/// whole /64, so per-address buckets would let it rotate through 2^64 of them).
#[inline]
pub fn rate_key(ip: IpAddr) -> u128 {
    let bits = ip_bits(ip);
    if bits >> 32 == 0xffff {
        bits
    } else {
        bits & !(u64::MAX as u128)
    }
}

/// Why the WAF refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// 403: IP list or a blocking rule.
    Forbidden,
    /// 429: the client's IP went over `rate_per_ip`.
    Throttled(Wait),
}

/// The compiled `[waf]` table.
#[derive(Debug, Default)]
pub struct Waf {
    pub allow: Vec<Cidr>,
    pub deny: Vec<Cidr>,
    pub per_ip: Option<Arc<KeyedBuckets>>,
    pub rules: Vec<Rule>,
    path: Option<Group>,
    query: Option<Group>,
    headers: Vec<(String, Group)>,
    body: Option<Group>,
    /// Most body bytes the `body` rules look at.
    pub body_max_bytes: usize,
    /// Requests refused by `ip_deny` / not in `ip_allow`.
    pub ip_refused: Arc<AtomicU64>,
}

/// A rule as written, before compiling.
pub struct RuleSpec {
    pub name: String,
    pub target: Target,
    pub pattern: String,
    pub action: Action,
}

/// The pieces of a request's head the path, query and header rules look at.
pub struct Input<'a> {
    pub path: &'a [u8],
    pub query: Option<&'a [u8]>,
    pub headers: &'a mut dyn Iterator<Item = (&'a [u8], &'a [u8])>,
}

/// A scan's result as a verdict.
fn verdict(blocked: bool) -> Verdict {
    if blocked {
        Verdict::Forbidden
    } else {
        Verdict::Pass
    }
}

/// Whether `body` is UTF-16 and, if so, whether big-endian: by a byte-order mark, else by the
/// `charset` of its `Content-Type` (plain `utf-16` is big-endian, RFC 2781), else by the NUL
/// pattern UTF-16 gives ASCII text such as JSON (RFC 4627 3: a NUL byte before or after the
/// first character).
fn utf16(content_type: &[u8], body: &[u8]) -> Option<bool> {
    let has = |t: &[u8]| {
        content_type
            .windows(t.len())
            .any(|w| w.eq_ignore_ascii_case(t))
    };
    match body {
        [0xFE, 0xFF, ..] => return Some(true),
        [0xFF, 0xFE, ..] => return Some(false),
        _ => {}
    }
    if has(b"utf-16le") {
        return Some(false);
    }
    if has(b"utf-16") {
        return Some(true);
    }
    match body {
        [0, b, ..] if *b != 0 => Some(true),
        [a, 0, ..] if *a != 0 => Some(false),
        _ => None,
    }
}

/// `body` read as UTF-16 (a byte-order mark skipped; unpaired surrogates and a trailing odd
/// byte become U+FFFD) written to `out` as UTF-8.
fn utf16_to_utf8(body: &[u8], big_endian: bool, out: &mut Vec<u8>) {
    let units = body.chunks(2).map(|p| match (p, big_endian) {
        ([a, b], true) => u16::from_be_bytes([*a, *b]),
        ([a, b], false) => u16::from_le_bytes([*a, *b]),
        _ => 0xFFFD,
    });
    let mut tmp = [0u8; 4];
    for c in char::decode_utf16(units) {
        let c = c.unwrap_or(char::REPLACEMENT_CHARACTER);
        if c != '\u{FEFF}' {
            out.extend_from_slice(c.encode_utf8(&mut tmp).as_bytes());
        }
    }
}

/// `body` with JSON string escapes undone (`\"`, `\\`, `\/`, `\n`..., `\uXXXX`, surrogate
/// pairs joined; an escape that is not valid is kept as it is), into `out`. Not a JSON
/// parser: it only makes what an escaped payload means visible to the body rules.
fn json_unescape(body: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let hex4 = |b: &[u8]| -> Option<u32> {
        let s = std::str::from_utf8(b.get(..4)?).ok()?;
        u32::from_str_radix(s, 16).ok()
    };
    let mut i = 0;
    while i < body.len() {
        let c = body[i];
        if c != b'\\' || i + 1 >= body.len() {
            out.push(c);
            i += 1;
            continue;
        }
        let simple = match body[i + 1] {
            b'"' => Some(b'"'),
            b'\\' => Some(b'\\'),
            b'/' => Some(b'/'),
            b'b' => Some(8),
            b'f' => Some(12),
            b'n' => Some(b'\n'),
            b'r' => Some(b'\r'),
            b't' => Some(b'\t'),
            _ => None,
        };
        if let Some(b) = simple {
            out.push(b);
            i += 2;
            continue;
        }
        if body[i + 1] == b'u' {
            if let Some(mut cp) = hex4(&body[i + 2..]) {
                let mut len = 6;
                if (0xD800..0xDC00).contains(&cp) && body.get(i + 6..i + 8) == Some(b"\\u") {
                    if let Some(lo) =
                        hex4(&body[i + 8..]).filter(|lo| (0xDC00..0xE000).contains(lo))
                    {
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                        len = 12;
                    }
                }
                if let Some(ch) = char::from_u32(cp) {
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                    i += len;
                    continue;
                }
            }
        }
        out.push(c);
        i += 1;
    }
}

thread_local! {
    /// Scratch space for percent-decoding (one per worker thread, reused).
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl Waf {
    /// The header names (lowercase) the rules look at.
    pub fn header_targets(&self) -> impl Iterator<Item = &str> {
        self.headers.iter().map(|(h, _)| h.as_str())
    }

    /// Compiles the rules (an error names the rule whose pattern is bad).
    pub fn build(
        allow: Vec<Cidr>,
        deny: Vec<Cidr>,
        per_ip: Option<KeyedBuckets>,
        specs: Vec<RuleSpec>,
        body_max_bytes: usize,
    ) -> Result<Waf, String> {
        let mut w = Waf {
            allow,
            deny,
            per_ip: per_ip.map(Arc::new),
            body_max_bytes,
            ..Waf::default()
        };
        for s in &specs {
            regex::bytes::Regex::new(&s.pattern)
                .map_err(|e| format!("rule `{}`: bad pattern: {e}", s.name))?;
        }
        let group = |t: &Target| -> Result<Option<Group>, String> {
            let idx: Vec<usize> = (0..specs.len())
                .filter(|&i| specs[i].target == *t)
                .collect();
            if idx.is_empty() {
                return Ok(None);
            }
            let set = regex::bytes::RegexSetBuilder::new(idx.iter().map(|&i| &specs[i].pattern))
                .size_limit(32 << 20)
                .build()
                .map_err(|e| format!("rules on `{t:?}`: {e}"))?;
            Ok(Some(Group { set, rules: idx }))
        };
        w.path = group(&Target::Path)?;
        w.query = group(&Target::Query)?;
        w.body = group(&Target::Body)?;
        let mut names: Vec<String> = Vec::new();
        for s in &specs {
            if let Target::Header(h) = &s.target {
                if !names.contains(h) {
                    names.push(h.clone());
                }
            }
        }
        for h in names {
            if let Some(g) = group(&Target::Header(h.clone()))? {
                w.headers.push((h, g));
            }
        }
        w.rules = specs
            .into_iter()
            .map(|s| Rule {
                name: s.name,
                action: s.action,
                matches: Arc::new(AtomicU64::new(0)),
            })
            .collect();
        Ok(w)
    }

    /// Whether any body rule exists (the caller then buffers up to `body_max_bytes`).
    pub fn wants_body(&self) -> bool {
        self.body.is_some()
    }

    /// Whether the request must be inspected at all.
    pub fn active(&self) -> bool {
        !self.allow.is_empty()
            || !self.deny.is_empty()
            || self.per_ip.is_some()
            || !self.rules.is_empty()
    }

    /// IP lists and the per-IP bucket.
    #[inline]
    pub fn check_ip(&self, ip: IpAddr, now: u64) -> Verdict {
        if !self.allow.is_empty() || !self.deny.is_empty() {
            let bits = ip_bits(ip);
            if (!self.allow.is_empty() && !self.allow.iter().any(|c| c.contains(bits)))
                || self.deny.iter().any(|c| c.contains(bits))
            {
                self.ip_refused.fetch_add(1, Ordering::Relaxed);
                return Verdict::Forbidden;
            }
        }
        if let Some(b) = &self.per_ip {
            if let Err(w) = b.check(rate_key(ip), now) {
                return Verdict::Throttled(w);
            }
        }
        Verdict::Pass
    }

    /// The path, query and header rules: counts every matching rule, refuses when one of
    /// them blocks. These run before the body is read, so a request they refuse is answered
    /// without waiting for (or inviting, with `100 Continue`) its body; its body rules are not
    /// evaluated.
    pub fn check_rules(&self, inp: Input<'_>) -> Verdict {
        if self.rules.is_empty() {
            return Verdict::Pass;
        }
        let mut blocked = false;
        if let Some(g) = &self.path {
            blocked |= SCRATCH.with_borrow_mut(|s| {
                percent_decode(inp.path, false, s);
                self.scan(g, s)
            });
        }
        if let Some(g) = &self.query {
            // A request without a query is scanned as an empty one (as its missing body is):
            // `^$` matches both.
            blocked |= SCRATCH.with_borrow_mut(|s| {
                percent_decode(inp.query.unwrap_or(b""), true, s);
                self.scan(g, s)
            });
        }
        if !self.headers.is_empty() {
            for (name, value) in inp.headers {
                for (h, g) in &self.headers {
                    if name.eq_ignore_ascii_case(h.as_bytes()) {
                        blocked |= self.scan(g, value);
                    }
                }
            }
        }
        verdict(blocked)
    }

    /// The `body` rules, on the first `body_max_bytes` of the body (`content_type` is the
    /// request's): counts every matching rule, refuses when one of them blocks.
    ///
    /// The body is scanned as it is and in every decoded form a backend might read it in,
    /// whatever its `Content-Type` claims (many backends parse JSON or a form regardless, and
    /// the client chooses the type): percent-decoded as a form, with JSON string escapes undone
    /// (`%27` and `\u0027` are both `'`), and, when the type's charset or a byte-order mark or
    /// the NUL pattern of JSON in UTF-16 says so, transcoded from UTF-16 to UTF-8 (and unescaped
    /// again).
    pub fn check_body(&self, body: &[u8], content_type: Option<&[u8]>) -> Verdict {
        let Some(g) = &self.body else {
            return Verdict::Pass;
        };
        let n = body.len().min(self.body_max_bytes);
        let mut blocked = self.scan_decoded(g, &body[..n]);
        if let Some(big_endian) = utf16(content_type.unwrap_or_default(), &body[..n]) {
            let mut utf8 = Vec::with_capacity(n);
            utf16_to_utf8(&body[..n], big_endian, &mut utf8);
            blocked |= self.scan_decoded(g, &utf8);
        }
        verdict(blocked)
    }

    /// Scans `body` as it is, percent-decoded and JSON-unescaped (each only when there is
    /// something to undo: otherwise the bytes were just scanned).
    fn scan_decoded(&self, g: &Group, body: &[u8]) -> bool {
        let mut blocked = self.scan(g, body);
        if body.iter().any(|&b| b == b'%' || b == b'+') {
            blocked |= SCRATCH.with_borrow_mut(|s| {
                percent_decode(body, true, s);
                self.scan(g, s)
            });
        }
        if body.contains(&b'\\') {
            blocked |= SCRATCH.with_borrow_mut(|s| {
                json_unescape(body, s);
                self.scan(g, s)
            });
        }
        blocked
    }

    /// One pass of a group's automaton; on a match, counts the rules and says whether one blocks.
    #[inline]
    fn scan(&self, g: &Group, hay: &[u8]) -> bool {
        if !g.set.is_match(hay) {
            return false;
        }
        let mut block = false;
        for i in g.set.matches(hay).iter() {
            let r = &self.rules[g.rules[i]];
            r.matches.fetch_add(1, Ordering::Relaxed);
            block |= r.action == Action::Block;
        }
        block
    }

    /// Prometheus lines for the rules and IP lists.
    pub fn render_metrics(&self, o: &mut String) {
        use std::fmt::Write as _;
        o.push_str("# HELP ringgate_waf_rule_matches_total Requests matched by a WAF rule.\n# TYPE ringgate_waf_rule_matches_total counter\n");
        for r in &self.rules {
            let _ = writeln!(
                o,
                "ringgate_waf_rule_matches_total{{rule=\"{}\",action=\"{}\"}} {}",
                crate::metrics::escape_label(&r.name),
                r.action.as_str(),
                r.matches.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            o,
            "# HELP ringgate_waf_ip_refused_total Requests refused by ip_allow/ip_deny.\n# TYPE ringgate_waf_ip_refused_total counter\nringgate_waf_ip_refused_total {}",
            self.ip_refused.load(Ordering::Relaxed)
        );
    }
}

use crate::http::percent_decode;

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, target: &str, pattern: &str, action: Action) -> RuleSpec {
        RuleSpec {
            name: name.into(),
            target: Target::parse(target).unwrap(),
            pattern: pattern.into(),
            action,
        }
    }

    fn check(
        w: &Waf,
        path: &str,
        query: Option<&str>,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Verdict {
        // As the gateway runs them: the body rules only when the head's rules pass.
        let mut it = headers.iter().map(|(a, b)| (a.as_bytes(), b.as_bytes()));
        let head = w.check_rules(Input {
            path: path.as_bytes(),
            query: query.map(|q| q.as_bytes()),
            headers: &mut it,
        });
        if head != Verdict::Pass {
            return head;
        }
        let ct = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-type"))
            .map(|(_, v)| v.as_bytes());
        w.check_body(body.as_bytes(), ct)
    }

    #[test]
    fn cidrs_v4_v6() {
        let c = Cidr::parse("10.66.0.0/16").unwrap();
        assert!(c.contains(ip_bits("10.66.3.4".parse().unwrap())));
        assert!(!c.contains(ip_bits("10.67.0.1".parse().unwrap())));
        // An IPv4-mapped IPv6 peer is the same client.
        assert!(c.contains(ip_bits("::ffff:10.66.0.9".parse().unwrap())));
        let c6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(c6.contains(ip_bits("2001:db8:1::5".parse().unwrap())));
        assert!(!c6.contains(ip_bits("2001:db9::5".parse().unwrap())));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains(ip_bits("1.2.3.4".parse().unwrap())));
        assert!(Cidr::parse("10.0.0.0/33").is_none());
        assert!(Cidr::parse("nonsense").is_none());
        let one = Cidr::parse("127.0.0.1").unwrap();
        assert!(one.contains(ip_bits("127.0.0.1".parse().unwrap())));
        assert!(!one.contains(ip_bits("127.0.0.2".parse().unwrap())));
    }

    #[test]
    fn per_ip_key_is_v4_address_or_v6_slash_64() {
        let k = |s: &str| rate_key(s.parse().unwrap());
        assert_ne!(k("10.0.0.1"), k("10.0.0.2"));
        assert_eq!(k("10.0.0.1"), k("::ffff:10.0.0.1"));
        assert_eq!(k("2001:db8:1:2::1"), k("2001:db8:1:2:ffff::9"));
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
    }

    #[test]
    fn allow_and_deny_lists() {
        let w = Waf::build(
            vec![Cidr::parse("127.0.0.0/8").unwrap()],
            vec![Cidr::parse("127.0.0.66").unwrap()],
            None,
            vec![],
            0,
        )
        .unwrap();
        assert_eq!(w.check_ip("127.0.0.1".parse().unwrap(), 0), Verdict::Pass);
        assert_eq!(
            w.check_ip("127.0.0.66".parse().unwrap(), 0),
            Verdict::Forbidden
        );
        assert_eq!(
            w.check_ip("192.168.0.1".parse().unwrap(), 0),
            Verdict::Forbidden
        );
    }

    #[test]
    fn rules_by_target_count_and_block() {
        let w = Waf::build(
            vec![],
            vec![],
            None,
            vec![
                rule("sqli", "query", r"(?i)union\s+select", Action::Block),
                rule("probe", "path", r"^/admin", Action::Count),
                rule("ua", "header.User-Agent", r"(?i)sqlmap", Action::Block),
                rule("xss", "body", r"(?i)<script", Action::Block),
            ],
            16,
        )
        .unwrap();
        assert_eq!(check(&w, "/x", Some("q=1"), &[], ""), Verdict::Pass);
        // Encoded and plus-separated: decoded before matching.
        assert_eq!(
            check(&w, "/x", Some("q=1%20UNION+SELECT+pw"), &[], ""),
            Verdict::Forbidden
        );
        assert_eq!(check(&w, "/admin/x", None, &[], ""), Verdict::Pass);
        // A missing query or body is scanned as an empty one.
        let empty = Waf::build(
            vec![],
            vec![],
            None,
            vec![
                rule("no-query", "query", r"^$", Action::Block),
                rule("no-body", "body", r"^$", Action::Count),
            ],
            16,
        )
        .unwrap();
        assert_eq!(check(&empty, "/", None, &[], ""), Verdict::Forbidden);
        assert_eq!(check(&empty, "/", Some(""), &[], ""), Verdict::Forbidden);
        assert_eq!(check(&empty, "/", Some("a=1"), &[], ""), Verdict::Pass);
        // The body rule ran only for the request the query rule let through.
        assert_eq!(empty.rules[1].matches.load(Ordering::Relaxed), 1);
        assert_eq!(w.rules[1].matches.load(Ordering::Relaxed), 1);
        assert_eq!(
            check(&w, "/", None, &[("user-agent", "sqlmap/1.0")], ""),
            Verdict::Forbidden
        );
        assert_eq!(
            check(&w, "/", None, &[("x-other", "sqlmap")], ""),
            Verdict::Pass
        );
        assert_eq!(check(&w, "/", None, &[], "hi <SCRIPT>"), Verdict::Forbidden);
        // Past body_max_bytes the body is not looked at.
        assert_eq!(
            check(&w, "/", None, &[], "0123456789abcdef<script>"),
            Verdict::Pass
        );
        assert_eq!(w.rules[0].matches.load(Ordering::Relaxed), 1);
        let mut m = String::new();
        w.render_metrics(&mut m);
        assert!(
            m.contains("ringgate_waf_rule_matches_total{rule=\"probe\",action=\"count\"} 1"),
            "{m}"
        );
    }

    #[test]
    fn encoded_bodies_are_scanned_decoded_too() {
        let w = Waf::build(
            vec![],
            vec![],
            None,
            vec![
                rule(
                    "sqli",
                    "body",
                    r"(?i)union\s+select|'\s*or\s*'",
                    Action::Block,
                ),
                rule("xss", "body", r"(?i)<script", Action::Block),
            ],
            1 << 16,
        )
        .unwrap();
        let form = [(
            "Content-Type",
            "application/x-www-form-urlencoded; charset=utf-8",
        )];
        let json = [("content-type", "application/json")];
        for (headers, body) in [
            (&form[..], "user=1+union+select+password"),
            (&form[..], "u=admin%27+or+%271%27%3D%271"),
            (&form[..], "c=%3Cscript%3Ealert(1)%3C%2Fscript%3E"),
            (&json[..], r#"{"u":"admin\u0027 or \u00271\u0027=\u00271"}"#),
            (&json[..], r#"{"c":"\u003cscript\u003e"}"#),
            (&json[..], r#"{"c":"\u003CSCRIPT>"}"#),
        ] {
            assert_eq!(
                check(&w, "/", None, headers, body),
                Verdict::Forbidden,
                "{body}"
            );
        }
        // Whatever the Content-Type claims, or none: a backend may parse it as JSON or a form.
        let text = [("content-type", "text/plain")];
        for (headers, body) in [
            (&[][..], "c=%3Cscript%3E"),
            (&text[..], r#"{"c":"\u003cscript>"}"#),
            (&json[..], "c=%3Cscript%3E"),
        ] {
            assert_eq!(
                check(&w, "/", None, headers, body),
                Verdict::Forbidden,
                "{body}"
            );
        }
        // UTF-16, by charset, byte-order mark or NUL pattern, either byte order.
        let payload = r#"{"c":"<script>"}"#;
        let le: Vec<u8> = payload.encode_utf16().flat_map(u16::to_le_bytes).collect();
        let be: Vec<u8> = payload.encode_utf16().flat_map(u16::to_be_bytes).collect();
        let mut bom_be = vec![0xFE, 0xFF];
        bom_be.extend_from_slice(&be);
        let utf16le = [("content-type", "application/json; charset=UTF-16LE")];
        for (headers, body) in [
            (&utf16le[..], &le),
            (&json[..], &le),
            (&json[..], &be),
            (&text[..], &bom_be),
        ] {
            let mut it = headers.iter().map(|(a, b)| (a.as_bytes(), b.as_bytes()));
            assert_eq!(
                w.check_rules(Input {
                    path: b"/",
                    query: None,
                    headers: &mut it
                }),
                Verdict::Pass
            );
            let ct = Some(headers[0].1.as_bytes());
            assert_eq!(w.check_body(body, ct), Verdict::Forbidden, "{headers:?}");
        }
        let mut out = Vec::new();
        utf16_to_utf8(
            &[0xFF, 0xFE, b'a', 0, 0x3D, 0xD8, 0, 0xDE, b'b'],
            false,
            &mut out,
        );
        assert_eq!(out, "a\u{1F600}\u{FFFD}".as_bytes());
        // Harmless bodies stay harmless once decoded.
        for (headers, body) in [
            (&form[..], "q=union%2Bselected"),
            (&json[..], r#"{"a":"\\u0027","b":"\"quoted\""}"#),
            (&text[..], "100% sure"),
        ] {
            assert_eq!(check(&w, "/", None, headers, body), Verdict::Pass, "{body}");
        }
        let mut out = Vec::new();
        json_unescape(br#"a\"b\\c\/d\n\ud83d\ude00\u00e9\uzzzz\"#, &mut out);
        assert_eq!(out, "a\"b\\c/d\n\u{1F600}\u{e9}\\uzzzz\\".as_bytes());
    }

    #[test]
    fn bad_pattern_names_rule() {
        let e = Waf::build(
            vec![],
            vec![],
            None,
            vec![rule("bad", "path", "(", Action::Block)],
            0,
        )
        .unwrap_err();
        assert!(e.contains("`bad`"), "{e}");
    }

    #[test]
    fn decode() {
        let mut o = Vec::new();
        percent_decode(b"a%41%zz+%4", true, &mut o);
        assert_eq!(o, b"aA%zz %4");
        percent_decode(b"a+b%2", false, &mut o);
        assert_eq!(o, b"a+b%2");
    }

    #[test]
    fn targets() {
        assert_eq!(
            Target::parse("header.X-Api"),
            Some(Target::Header("x-api".into()))
        );
        assert_eq!(Target::parse("header."), None);
        assert_eq!(Target::parse("cookie"), None);
    }
}
