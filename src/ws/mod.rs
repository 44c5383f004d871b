//! WebSocket: our RFC 6455 codec ([`frame`], [`handshake`]), pass-through proxying of
//! `Upgrade: websocket` requests on `http` APIs ([`relay`]), and WebSocket APIs with
//! `$connect`, `$disconnect`, `$default`, route selection and the `@connections` management
//! API ([`api`]).

pub mod api;
pub(crate) mod client;
pub mod frame;
pub mod handshake;
pub mod relay;

use crate::config::raw::{RawApi, RawWebSocket};
use ahash::AHashMap;
use bytes::Bytes;
use frame::SizeLimits;
use std::sync::Arc;
use std::time::Duration;

/// WebSocket settings of one API, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsSettings {
    /// Browser origins allowed to connect; empty = any.
    pub allowed_origins: Vec<String>,
    /// Frame and message size limits.
    pub limits: SizeLimits,
    /// Close after this long without a message either way.
    pub idle_timeout: Duration,
    /// Close after this long in any case.
    pub max_lifetime: Duration,
}

impl WsSettings {
    /// Defaults of a WebSocket API (as Amazon API Gateway: 128 KB messages, 32 KB frames,
    /// 10 minutes idle, 2 hours at most).
    pub fn api_defaults() -> WsSettings {
        WsSettings {
            allowed_origins: Vec::new(),
            limits: SizeLimits {
                max_frame: 32 * 1024,
                max_message: 128 * 1024,
            },
            idle_timeout: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(7200),
        }
    }

    /// Defaults of pass-through on an `http` API: 16 MB frames and messages, 10 minutes idle,
    /// 24 hours at most.
    pub fn passthrough_defaults() -> WsSettings {
        WsSettings {
            allowed_origins: Vec::new(),
            limits: SizeLimits {
                max_frame: 16 << 20,
                max_message: 16 << 20,
            },
            idle_timeout: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(86400),
        }
    }

    /// Applies the keys of a `websocket = {...}` table over `self`. An error names the key
    /// of the table at fault (`""`: the table as a whole) and what is wrong.
    pub fn apply(mut self, raw: &RawWebSocket) -> Result<WsSettings, (&'static str, String)> {
        self.allowed_origins = raw.allowed_origins.clone();
        if let Some(v) = raw.max_message_bytes {
            self.limits.max_message = v;
            // A frame is part of one message: an unset frame limit never exceeds the message
            // limit set here.
            self.limits.max_frame = self.limits.max_frame.min(v);
        }
        if let Some(v) = raw.max_frame_bytes {
            self.limits.max_frame = v;
        }
        if let Some(v) = raw.idle_timeout_ms {
            self.idle_timeout = Duration::from_millis(v);
        }
        if let Some(v) = raw.max_duration_ms {
            self.max_lifetime = Duration::from_millis(v);
        }
        for (key, v) in [
            ("max_frame_bytes", raw.max_frame_bytes),
            ("max_message_bytes", raw.max_message_bytes),
        ] {
            match v {
                Some(0) => return Err((key, "must be above 0".into())),
                Some(v) if v > 1 << 30 => {
                    return Err((
                        key,
                        format!("{v} is over the most allowed, 1 GiB (1073741824)"),
                    ))
                }
                _ => {}
            }
        }
        if self.limits.max_frame > self.limits.max_message {
            let default = if raw.max_message_bytes.is_none() {
                ", the default"
            } else {
                ""
            };
            return Err((
                "max_frame_bytes",
                format!(
                    "{} is larger than max_message_bytes ({}{default}): a frame is part of one \
                     message, so it can never be larger than the message",
                    self.limits.max_frame, self.limits.max_message
                ),
            ));
        }
        for (key, v) in [
            ("idle_timeout_ms", raw.idle_timeout_ms),
            ("max_duration_ms", raw.max_duration_ms),
        ] {
            if v == Some(0) {
                return Err((key, "must be above 0".into()));
            }
        }
        Ok(self)
    }
}

/// What a WebSocket API route calls.
#[derive(Debug, Clone)]
pub enum WsTarget {
    /// `POST` to `path` on `upstreams[upstream]`.
    Http { upstream: usize, path: String },
    /// Answer from the config (`$connect`: the status decides; messages: the body is sent).
    Mock { status: u16, body: Bytes },
}

/// One route of a WebSocket API: its integration and its Prometheus labels (made once, so each
/// message is counted without an allocation).
#[derive(Debug)]
pub struct WsRoute {
    /// Where the route's calls go.
    pub target: WsTarget,
    /// `api="..",stage="..",route="KEY"`.
    pub labels: Arc<str>,
}

/// One stage of a WebSocket API, compiled.
#[derive(Debug)]
pub struct WsApi {
    /// API name.
    pub api: Arc<str>,
    /// Stage name.
    pub stage: Arc<str>,
    /// Route key (`$connect`, `$disconnect`, `$default`, or a selected key) to its target.
    pub routes: AHashMap<String, WsRoute>,
    /// `api="..",stage="..",route=""`: messages that no route takes (no `$default`).
    pub unrouted: Arc<str>,
    /// Whether the stage's events (messages, disconnects) go to the access log.
    pub access_log: bool,
    /// The compiled `route_selection` expression.
    pub selection: Selection,
    /// Limits and timeouts.
    pub settings: WsSettings,
}

/// What route selection makes of a message.
#[derive(Debug, Clone, Copy)]
pub struct Selected<'a> {
    /// The route key (`None`: no route takes it, not even `$default`).
    pub key: Option<&'a str>,
    /// A text message that is valid JSON: sent to the integration as `application/json`;
    /// other text as `text/plain; charset=utf-8`.
    pub json: bool,
}

impl WsApi {
    /// The route key for a message: the selected field when it names a route, else `$default`
    /// (`None` when there is no `$default` either). A message never selects `$connect` or
    /// `$disconnect`: those run on the handshake and the close only.
    pub fn select<'a>(&'a self, text: bool, data: &[u8], scratch: &mut Vec<u8>) -> Selected<'a> {
        let (json, k) = if text {
            selection_key(data, &self.selection, scratch)
        } else {
            (false, self.selection.constant())
        };
        if let Some(k) = k {
            if let Some((key, _)) = self
                .routes
                .get_key_value(k.as_str())
                .filter(|(key, _)| !key.starts_with('$'))
            {
                return Selected {
                    key: Some(key.as_str()),
                    json,
                };
            }
        }
        Selected {
            key: self
                .routes
                .get_key_value("$default")
                .map(|(k, _)| k.as_str()),
            json,
        }
    }
}

/// Parses a text message with simd-json: whether it is JSON, and the route key that `sel`
/// makes of it. A field's value counts as a string as it is, a number or boolean as its JSON
/// text (`123`, `true`, as API Gateway selects them); a field that is missing, named twice on
/// the way or of another type gives no key. A message nested deeper than [`MAX_JSON_DEPTH`] is
/// not parsed (and counts as not JSON): the parser recurses per level, so a few thousand
/// levels would exhaust the worker's stack. Text that is not JSON gets the key of an expression
/// without fields, and no key otherwise.
fn selection_key(data: &[u8], sel: &Selection, scratch: &mut Vec<u8>) -> (bool, Option<String>) {
    use simd_json::prelude::*;
    if crate::policy::validate::max_depth(data) > MAX_JSON_DEPTH {
        return (false, sel.constant());
    }
    scratch.clear();
    scratch.extend_from_slice(data);
    let Ok(v) = simd_json::to_borrowed_value(scratch) else {
        return (false, sel.constant());
    };
    let mut key = String::new();
    for part in &sel.0 {
        let path = match part {
            SelPart::Text(t) => {
                key.push_str(t);
                continue;
            }
            SelPart::Field(path) => path,
        };
        let mut cur = &v;
        for p in path {
            // A field named twice on the way is ambiguous (backends disagree on which one
            // counts: most parsers keep the last): the message selects nothing.
            let Some(obj) = cur.as_object() else {
                return (true, None);
            };
            let mut found = obj.iter().filter(|(k, _)| *k == p.as_str()).map(|(_, v)| v);
            match (found.next(), found.next()) {
                (Some(c), None) => cur = c,
                _ => return (true, None),
            }
        }
        match cur.as_str() {
            Some(s) => key.push_str(s),
            None if cur.is_number() || cur.is_bool() => key.push_str(&cur.encode()),
            None => return (true, None),
        }
    }
    (true, Some(key))
}

/// Deepest nesting of a message whose JSON route selection reads (as request validation).
pub const MAX_JSON_DEPTH: usize = crate::policy::validate::MAX_DEPTH;

/// The check the `ws_select` fuzz target runs: route selection on arbitrary message bytes (the
/// first byte picks text or binary) must never panic or exhaust the stack, and must only name a
/// route of the API that a message may reach: never `$connect` or `$disconnect`. Returns the
/// selected key.
#[doc(hidden)]
pub fn fuzz_select(data: &[u8]) -> Option<String> {
    thread_local! {
        static API: WsApi = {
            let mut routes = AHashMap::new();
            for k in ["$connect", "$disconnect", "$default", "join", "7", "true", "a.b"] {
                routes.insert(
                    k.to_string(),
                    WsRoute {
                        target: WsTarget::Mock { status: 200, body: Bytes::new() },
                        labels: Arc::from(""),
                    },
                );
            }
            WsApi {
                api: "fuzz".into(),
                stage: "s".into(),
                routes,
                unrouted: Arc::from(""),
                access_log: false,
                selection: parse_selection("$request.body.meta.action").expect("valid"),
                settings: WsSettings::api_defaults(),
            }
        };
    }
    let (text, msg) = match data.split_first() {
        Some((b, rest)) => (b & 1 == 1, rest),
        None => (true, data),
    };
    let mut scratch = Vec::new();
    API.with(|api| {
        let key = api.select(text, msg, &mut scratch).key.map(str::to_string);
        if let Some(k) = &key {
            assert!(
                api.routes.contains_key(k.as_str()),
                "selected an unknown route {k}"
            );
            assert!(
                k != "$connect" && k != "$disconnect",
                "a message selected {k}"
            );
        }
        key
    })
}

/// A compiled `route_selection` expression: text and message fields, in order. The route key
/// of a message is the expression with each field replaced by its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection(Vec<SelPart>);

#[derive(Debug, Clone, PartialEq)]
enum SelPart {
    /// Text as written (`\$` unescaped).
    Text(String),
    /// A field path in the JSON message (`$request.body.a.b` -> `["a", "b"]`).
    Field(Vec<String>),
}

impl Selection {
    /// The key of an expression without fields (the same for every message).
    fn constant(&self) -> Option<String> {
        let mut key = String::new();
        for part in &self.0 {
            match part {
                SelPart::Text(t) => key.push_str(t),
                SelPart::Field(_) => return None,
            }
        }
        Some(key)
    }
}

/// Parses `route_selection` in API Gateway's selection-expression syntax: text with variables
/// `$request.body.FIELD` or `${request.body.FIELD}` (a dotted path into the JSON message);
/// braces end a field name where text follows (`${request.body.version}-beta`), and `\$` is a
/// literal `$` (`\$default`). A bare variable running straight into other text is refused rather
/// than guessed at (`$request.body.my-field`: `my` then `-field`, or `my-field`?).
pub fn parse_selection(s: &str) -> Result<Selection, String> {
    let mut parts = Vec::new();
    let mut text = String::new();
    let mut rest = s;
    while let Some(c) = rest.chars().next() {
        if let Some(r) = rest.strip_prefix("\\$") {
            text.push('$');
            rest = r;
            continue;
        }
        if c != '$' {
            text.push(c);
            rest = &rest[c.len_utf8()..];
            continue;
        }
        let (var, after, braced) = match rest.strip_prefix("${") {
            Some(r) => {
                let end = r
                    .find('}')
                    .ok_or_else(|| format!("`{s}`: `${{` without its closing `}}`"))?;
                (&r[..end], &r[end + 1..], true)
            }
            None => {
                let r = &rest[1..];
                let end = r
                    .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.'))
                    .unwrap_or(r.len());
                (&r[..end], &r[end..], false)
            }
        };
        let field = var.strip_prefix("request.body.").ok_or_else(|| {
            format!(
                "`{s}`: variables must be `$request.body.FIELD` or `${{request.body.FIELD}}` \
                 (route selection reads the JSON message; `\\$` is a literal `$`)"
            )
        })?;
        let path: Vec<String> = field.split('.').map(str::to_string).collect();
        if path.iter().any(|p| p.is_empty()) {
            return Err(format!("`{s}` has an empty field name"));
        }
        if let Some(next) = after
            .chars()
            .next()
            .filter(|c| !braced && *c != '$' && *c != '\\')
        {
            return Err(format!(
                "`{s}`: where does the field name end? Write `${{request.body.{field}}}{next}...` \
                 for the field `{field}`, or put the whole name in braces"
            ));
        }
        if !text.is_empty() {
            parts.push(SelPart::Text(std::mem::take(&mut text)));
        }
        parts.push(SelPart::Field(path));
        rest = after;
    }
    if !text.is_empty() {
        parts.push(SelPart::Text(text));
    }
    if parts.is_empty() {
        return Err("the expression is empty".to_string());
    }
    // Route keys that start with `$` are the reserved three: an expression that always makes
    // such a key could only select `$default`.
    if let Some(SelPart::Text(t)) = parts.first() {
        if t.starts_with('$') && !(parts.len() == 1 && t == "$default") {
            return Err(format!(
                "`{s}` makes keys that start with `$`, which only the reserved routes have"
            ));
        }
    }
    Ok(Selection(parts))
}

/// The WebSocket settings of an API: the `websocket` table over the protocol's defaults.
/// An error names the key of the `websocket` table at fault (`""`: the table) and what is wrong.
pub fn settings_for(
    api: &RawApi,
    websocket_api: bool,
) -> Result<Arc<WsSettings>, (&'static str, String)> {
    let base = if websocket_api {
        WsSettings::api_defaults()
    } else {
        WsSettings::passthrough_defaults()
    };
    match &api.websocket {
        None => Ok(Arc::new(base)),
        Some(raw) => base.apply(raw.get_ref()).map(Arc::new),
    }
}

/// The longest a connection's watchdog sleeps (a shutdown is noticed within it).
const WATCH_MAX: Duration = Duration::from_secs(1);

/// How long a connection's watchdog sleeps: until a read holding a buffer has waited
/// [`relay::GRACE`] (it then gives the buffer back), the idle deadline or the end of the
/// lifetime, whichever comes first, and at most [`WATCH_MAX`]. An idle connection wakes about
/// once a second, not on a fixed short tick.
pub(crate) fn watch_interval(
    now: std::time::Instant,
    reading_since: Option<std::time::Instant>,
    last_activity: std::time::Instant,
    started: std::time::Instant,
    s: &WsSettings,
) -> Duration {
    let mut d = WATCH_MAX;
    if let Some(t) = reading_since {
        d = d.min((t + relay::GRACE).saturating_duration_since(now));
    }
    d = d.min((last_activity + s.idle_timeout).saturating_duration_since(now));
    d = d.min((started + s.max_lifetime).saturating_duration_since(now));
    d.max(Duration::from_millis(10))
}

/// A connection handed over by the HTTP loop once its handshake is done.
pub enum Takeover {
    /// Pass-through: relay bytes between the client and `upstream`.
    Relay {
        /// The upstream connection that answered 101.
        upstream: monoio::net::TcpStream,
        /// Bytes the upstream sent after its 101 head (the start of its first frames).
        from_upstream: Vec<u8>,
        /// The route's limits and timeouts.
        settings: Arc<WsSettings>,
        /// The upstream target's `max_connections` slot, held while the tunnel lasts.
        slot: crate::upstream::Slot,
    },
    /// A WebSocket API connection that passed `$connect`.
    Api(api::Accepted),
}

/// Runs a connection after its handshake until it closes. `pending` holds bytes the client
/// sent after its upgrade request.
pub async fn run_takeover<S: crate::server::ClientIo>(
    t: Takeover,
    client: S,
    pending: Vec<u8>,
    w: &crate::server::Worker,
) {
    let shared = &w.shared;
    /// Counts the connection in the gauge while it lives (also when a stopping worker drops
    /// it mid-await).
    struct Active<'a>(&'a std::sync::atomic::AtomicI64);
    impl Drop for Active<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let m = &shared.metrics.ws_connections_active;
    m.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let _active = Active(m);
    // Each kind boxed on its own: a connection's memory is the size of its own state machine,
    // not of the larger of the two.
    match t {
        Takeover::Relay {
            upstream,
            from_upstream,
            settings,
            slot,
        } => {
            let _slot = slot;
            let first = relay::First {
                from_client: pending,
                from_upstream,
            };
            Box::pin(relay::run(client, upstream, first, &settings, shared)).await
        }
        Takeover::Api(a) => Box::pin(api::run(a, client, pending, shared, w)).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn frame_limit_never_above_message_limit() {
        let raw = |frame: Option<usize>, message: Option<usize>| RawWebSocket {
            max_frame_bytes: frame,
            max_message_bytes: message,
            ..RawWebSocket::default()
        };
        // A message limit set alone lowers the default frame limit to it, never raises it.
        let s = WsSettings::api_defaults()
            .apply(&raw(None, Some(100)))
            .unwrap();
        assert_eq!((s.limits.max_frame, s.limits.max_message), (100, 100));
        let s = WsSettings::api_defaults()
            .apply(&raw(None, Some(1 << 20)))
            .unwrap();
        assert_eq!(
            (s.limits.max_frame, s.limits.max_message),
            (32 << 10, 1 << 20)
        );
        let s = WsSettings::passthrough_defaults()
            .apply(&raw(Some(10), Some(10)))
            .unwrap();
        assert_eq!((s.limits.max_frame, s.limits.max_message), (10, 10));
        // A frame limit above the message limit, set or default, names max_frame_bytes.
        let (key, msg) = WsSettings::api_defaults()
            .apply(&raw(Some(11), Some(10)))
            .unwrap_err();
        assert_eq!(key, "max_frame_bytes");
        assert!(
            msg.starts_with("11 is larger than max_message_bytes (10):"),
            "{msg}"
        );
        let (key, msg) = WsSettings::api_defaults()
            .apply(&raw(Some(200_000), None))
            .unwrap_err();
        assert_eq!(key, "max_frame_bytes");
        assert!(msg.contains("(131072, the default)"), "{msg}");
        // The range checks name their own key.
        let (key, msg) = WsSettings::api_defaults()
            .apply(&raw(Some(0), None))
            .unwrap_err();
        assert_eq!((key, msg.as_str()), ("max_frame_bytes", "must be above 0"));
    }

    #[test]
    fn watchdog_sleeps_until_the_nearest_deadline() {
        let s = WsSettings {
            idle_timeout: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(7200),
            ..WsSettings::api_defaults()
        };
        let now = Instant::now();
        // Idle without a buffer: the cap.
        assert_eq!(watch_interval(now, None, now, now, &s), WATCH_MAX);
        // A read holding a buffer since 200 ms: 300 ms to the end of the grace period.
        let t = now - Duration::from_millis(200);
        assert_eq!(
            watch_interval(now, Some(t), now, now, &s),
            Duration::from_millis(300)
        );
        // Idle deadline in 50 ms.
        let last = now - (s.idle_timeout - Duration::from_millis(50));
        assert_eq!(
            watch_interval(now, None, last, now, &s),
            Duration::from_millis(50)
        );
        // Past a deadline: the floor, never zero (no busy loop).
        let started = now - s.max_lifetime - Duration::from_secs(1);
        assert_eq!(
            watch_interval(now, None, now, started, &s),
            Duration::from_millis(10)
        );
    }

    #[test]
    fn fuzz_select_holds_on_shaped_inputs() {
        let deep = format!("\x01{}", "{\"a\":".repeat(50_000));
        let cases: [&[u8]; 7] = [
            b"\x01{\"meta\":{\"action\":\"join\"}}",
            b"\x01{\"meta\":{\"action\":\"$disconnect\"}}",
            b"\x01{\"meta\":{\"action\":7}}",
            b"\x00{\"meta\":{\"action\":\"join\"}}",
            b"\x01not json",
            b"",
            deep.as_bytes(),
        ];
        let got: Vec<_> = cases.iter().map(|c| fuzz_select(c)).collect();
        let want = [
            "join", "$default", "7", "$default", "$default", "$default", "$default",
        ];
        assert_eq!(got, want.map(|k| Some(k.to_string())));
    }

    #[test]
    fn route_selection_reads_json_field() {
        let mut routes = AHashMap::new();
        for k in [
            "$default",
            "$connect",
            "$disconnect",
            "sendmessage",
            "join",
            "7",
            "true",
        ] {
            routes.insert(
                k.to_string(),
                WsRoute {
                    target: WsTarget::Mock {
                        status: 200,
                        body: Bytes::new(),
                    },
                    labels: Arc::from(""),
                },
            );
        }
        let api = WsApi {
            api: "a".into(),
            stage: "s".into(),
            routes,
            unrouted: Arc::from(""),
            access_log: false,
            selection: parse_selection("$request.body.action").unwrap(),
            settings: WsSettings::api_defaults(),
        };
        let mut s = Vec::new();
        let sel = |d: &[u8], s: &mut Vec<u8>| api.select(true, d, s).key.map(str::to_string);
        // Whether a text message is JSON decides its content type toward the integration.
        for (m, json) in [
            (&br#"{"action":"join"}"#[..], true),
            (b"[1,2]", true),
            (b"\"just a string\"", true),
            (b"not json", false),
            (b"{\"action\":", false),
            (b"", false),
        ] {
            assert_eq!(api.select(true, m, &mut s).json, json, "{m:?}");
        }
        assert!(!api.select(false, b"{}", &mut s).json);
        assert_eq!(
            sel(br#"{"action":"join","x":1}"#, &mut s).as_deref(),
            Some("join")
        );
        assert_eq!(
            sel(br#"{"action":"nope"}"#, &mut s).as_deref(),
            Some("$default")
        );
        assert_eq!(sel(br#"not json"#, &mut s).as_deref(), Some("$default"));
        // A selection field given twice is ambiguous, in small and large objects alike.
        assert_eq!(
            sel(br#"{"action":"join","action":"7"}"#, &mut s).as_deref(),
            Some("$default")
        );
        let many: String = (0..100).map(|i| format!(r#""k{i}":{i},"#)).collect();
        for m in [
            format!(r#"{{{many}"action":"join","action":"7"}}"#),
            format!(r#"{{"action":"join",{many}"action":"join"}}"#),
        ] {
            assert_eq!(
                sel(m.as_bytes(), &mut s).as_deref(),
                Some("$default"),
                "{m}"
            );
        }
        let one = format!(r#"{{{many}"action":"join"}}"#);
        assert_eq!(sel(one.as_bytes(), &mut s).as_deref(), Some("join"));
        // Numbers and booleans select by their JSON text, as in API Gateway.
        assert_eq!(sel(br#"{"action":3}"#, &mut s).as_deref(), Some("$default"));
        assert_eq!(sel(br#"{"action":7}"#, &mut s).as_deref(), Some("7"));
        assert_eq!(sel(br#"{"action":true}"#, &mut s).as_deref(), Some("true"));
        assert_eq!(
            sel(br#"{"action":null}"#, &mut s).as_deref(),
            Some("$default")
        );
        // A reserved key is never selected by a message.
        for k in ["$connect", "$disconnect", "$default"] {
            let m = format!(r#"{{"action":"{k}"}}"#);
            assert_eq!(
                sel(m.as_bytes(), &mut s).as_deref(),
                Some("$default"),
                "{k}"
            );
        }
        // Nesting past the limit selects nothing (and must not exhaust the stack).
        let top = |n: usize| {
            format!(
                r#"{{"action":"join","x":{}1{}}}"#,
                "[".repeat(n),
                "]".repeat(n)
            )
        };
        assert_eq!(
            sel(top(MAX_JSON_DEPTH - 1).as_bytes(), &mut s).as_deref(),
            Some("join")
        );
        assert_eq!(
            sel(top(MAX_JSON_DEPTH).as_bytes(), &mut s).as_deref(),
            Some("$default")
        );
        assert_eq!(
            sel(top(100_000).as_bytes(), &mut s).as_deref(),
            Some("$default")
        );
        let open = "[".repeat(200_000);
        assert_eq!(sel(open.as_bytes(), &mut s).as_deref(), Some("$default"));
        assert_eq!(
            api.select(false, br#"{"action":"join"}"#, &mut s).key,
            Some("$default")
        );
        assert!(parse_selection("$request.header.x").is_err());
        let nested = parse_selection("$request.body.meta.kind").unwrap();
        assert_eq!(
            selection_key(br#"{"meta":{"kind":"join"}}"#, &nested, &mut s),
            (true, Some("join".to_string()))
        );
    }

    #[test]
    fn route_selection_expressions_combine_fields_and_text() {
        let mut s = Vec::new();
        let key = |expr: &str, msg: &[u8], s: &mut Vec<u8>| {
            selection_key(msg, &parse_selection(expr).unwrap(), s).1
        };
        let m = br#"{"service":"chat","action":"join","v":2,"odd-name":"x"}"#;
        for (expr, want) in [
            ("${request.body.action}", Some("join")),
            ("$request.body.action", Some("join")),
            (
                "${request.body.service}/${request.body.action}",
                Some("chat/join"),
            ),
            (
                "$request.body.service$request.body.action",
                Some("chatjoin"),
            ),
            ("${request.body.action}-beta", Some("join-beta")),
            ("v${request.body.v}:$request.body.action", Some("v2:join")),
            ("${request.body.odd-name}", Some("x")),
            ("\\$default", Some("$default")),
            ("x\\$${request.body.action}", Some("x$join")),
            ("fixed", Some("fixed")),
            // One missing field: the message selects nothing (it goes to `$default`).
            ("${request.body.service}/${request.body.missing}", None),
        ] {
            assert_eq!(key(expr, m, &mut s).as_deref(), want, "{expr}");
        }
        // Without fields the key is the same for every message, JSON or not.
        assert_eq!(key("fixed", b"not json", &mut s).as_deref(), Some("fixed"));
        assert_eq!(key("${request.body.action}", b"not json", &mut s), None);
        for bad in [
            "",
            "$request.body.",
            "${request.body.a..b}",
            "${request.body.action",
            "$request.header.x",
            "${request.querystring.x}",
            "$context.routeKey",
            "$request.body.my-field",
            "$request.body.action}",
            "$",
            "\\$v/${request.body.action}",
            "\\$defaults",
        ] {
            let e = parse_selection(bad).unwrap_err();
            assert!(!e.is_empty(), "{bad}");
        }
        let e = parse_selection("$request.body.my-field").unwrap_err();
        assert!(e.contains("${request.body.my}-"), "{e}");
    }
}
