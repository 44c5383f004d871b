//! The response cache: per-worker stores of immutable responses, cache keys, the rules for
//! what is stored, stampede protection and invalidation.
//!
//! Design (see the README's "Response cache" section for the user's view):
//! - **Per worker.** Each worker owns its stores (one per API stage, each bounded by the
//!   stage's `max_bytes` divided by the number of workers), so a hit takes no lock and touches
//!   no shared cache line. A hot key is fetched once per worker rather than once per gateway;
//!   that is the price of never synchronising on the hit path.
//! - **Entries** are one [`bytes::Bytes`]: status line and headers ready to write, then the
//!   body. A hit writes those same bytes, with a small per-request block (`x-cache`, `Age`,
//!   `x-request-id`, connection) between head and body.
//! - **Eviction** is S3-FIFO ([`store`]): one-shot keys (a scan) churn a small FIFO and never
//!   push out the entries that get hits.
//! - **Stampede protection** is per worker: concurrent misses for one key on a worker send one
//!   upstream request; the others wait (bounded) and are served from the stored answer.
//! - **Invalidation** goes through [`InvalidationLog`] (shared, written rarely): every worker
//!   applies new records before its next cache lookup, so no later request sees an
//!   invalidated entry, whichever worker serves it.

pub mod config;
pub mod control;
pub mod store;

use crate::http::RequestHead;
use crate::router::Params;
use ahash::AHashMap;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
pub use store::{Entry, Store};

/// Request headers that carry credentials: requests with one are never served from or stored
/// in the cache unless the route's `key` contains that header (so each principal has its own
/// entries).
pub const CREDENTIAL_HEADERS: [&str; 3] = ["authorization", "x-api-key", "cookie"];

/// Concurrent requests that may wait for one in-flight miss; more go upstream themselves.
pub const MAX_WAITERS: usize = 1024;

/// One part of a route's cache key (`key = [...]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPart {
    /// `path.NAME`: the route parameter at this index.
    Path(usize),
    /// `query.NAME`.
    Query(Box<str>),
    /// `header.NAME` (lowercase).
    Header(Box<str>),
}

/// The compiled cache settings of one route in one stage.
#[derive(Debug)]
pub struct CachePolicy {
    /// Identifies the per-worker store: `api` NUL `stage`.
    pub store_id: Arc<str>,
    /// The stage's `max_bytes` (shared out among workers).
    pub max_bytes: u64,
    /// Longest time a response is served (upstream `max-age`/`s-maxage` may shorten it).
    pub ttl: Duration,
    /// The route's `key` parameters.
    pub key: Vec<KeyPart>,
    /// Some `query.X` is in the key: only those query parameters count. Otherwise the whole
    /// query string is part of the key.
    pub query_in_key: bool,
    /// For each of [`CREDENTIAL_HEADERS`], whether it is part of the key.
    pub credentials_in_key: [bool; 3],
    /// A client's `Cache-Control: max-age=0` refreshes the entry (`allow_client_invalidate`).
    pub allow_client_invalidate: bool,
}

impl CachePolicy {
    /// Whether this request may use the cache: GET or HEAD, no body, no WebSocket upgrade, and
    /// every credential header it carries is part of the key.
    pub fn eligible(&self, head: &RequestHead, buf: &[u8]) -> bool {
        use crate::http::{BodyKind, Method};
        if !matches!(head.method, Method::Get | Method::Head) || head.upgrade_websocket {
            return false;
        }
        if !matches!(head.body, BodyKind::None | BodyKind::Length(0)) {
            return false;
        }
        for (i, h) in CREDENTIAL_HEADERS.iter().enumerate() {
            if !self.credentials_in_key[i] && head.header(buf, h).is_some() {
                return false;
            }
        }
        true
    }
}

/// Builds the primary cache key into `out` (cleared first): method, host, API and stage, the
/// stage-relative path, then the route's key parameters (or the whole query string). Returns
/// the range of the stage-relative path within `out`.
pub fn build_key(
    out: &mut Vec<u8>,
    pol: &CachePolicy,
    head: &RequestHead,
    buf: &[u8],
    params: &Params,
    prefix_len: usize,
) -> (u32, u32) {
    out.clear();
    out.extend_from_slice(head.method_bytes(buf));
    out.push(0);
    if let Some(h) = head.host {
        for &b in head.slice(buf, h) {
            out.push(b.to_ascii_lowercase());
        }
    }
    out.push(0);
    out.extend_from_slice(pol.store_id.as_bytes());
    out.push(0);
    let path = head.slice(buf, head.path);
    let start = out.len() as u32;
    let rel = &path[prefix_len.min(path.len())..];
    if !rel.starts_with(b"/") {
        out.push(b'/');
    }
    out.extend_from_slice(rel);
    let end = out.len() as u32;
    let query = head.query.map(|q| head.slice(buf, q)).unwrap_or(b"");
    if !pol.query_in_key {
        out.push(0);
        out.extend_from_slice(query);
    }
    for part in &pol.key {
        out.push(0);
        match part {
            KeyPart::Path(i) => {
                if let Some((a, b)) = params.get(*i) {
                    out.extend_from_slice(&path[a as usize..b as usize]);
                }
            }
            KeyPart::Query(name) => {
                // Every value of the parameter, in order; absent and empty differ.
                for pair in query.split(|&b| b == b'&') {
                    let (k, v) = match pair.iter().position(|&b| b == b'=') {
                        Some(i) => (&pair[..i], &pair[i..]),
                        None => (pair, &b""[..]),
                    };
                    if k == name.as_bytes() {
                        out.push(1);
                        out.extend_from_slice(v);
                    }
                }
            }
            KeyPart::Header(name) => push_header_values(out, head, buf, name),
        }
    }
    (start, end)
}

/// Appends every value of request header `name` (absent and empty differ).
fn push_header_values(out: &mut Vec<u8>, head: &RequestHead, buf: &[u8], name: &str) {
    for h in &head.headers {
        if head
            .slice(buf, h.name)
            .eq_ignore_ascii_case(name.as_bytes())
        {
            out.push(1);
            out.extend_from_slice(head.slice(buf, h.value));
        }
    }
}

/// Appends the `Vary` part of a key: each named request header's values.
pub fn push_vary(out: &mut Vec<u8>, names: &[Box<str>], head: &RequestHead, buf: &[u8]) {
    out.push(2);
    for n in names {
        out.push(0);
        push_header_values(out, head, buf, n);
    }
}

/// An invalidation, as published to every worker.
#[derive(Debug, Clone)]
pub enum Invalidation {
    /// Every entry of a stage whose stage-relative path starts with `prefix`.
    Prefix {
        store_id: Arc<str>,
        prefix: Box<[u8]>,
    },
    /// One exact key (a client's `Cache-Control: max-age=0`).
    Key { store_id: Arc<str>, key: Box<[u8]> },
}

/// Invalidations waiting to be applied by the workers; shared, written only by admin calls
/// and client refreshes. Workers compare [`InvalidationLog::seq`] (one relaxed load) before
/// each cache lookup.
#[derive(Debug, Default)]
pub struct InvalidationLog {
    seq: AtomicU64,
    records: Mutex<VecDeque<(u64, Invalidation)>>,
}

/// Records kept; a worker further behind than this clears its stores.
const LOG_KEEP: usize = 1024;

impl InvalidationLog {
    /// Publishes an invalidation to every worker.
    pub fn publish(&self, inv: Invalidation) {
        let mut r = self.records.lock().unwrap_or_else(|e| e.into_inner());
        let seq = self.seq.load(Ordering::Relaxed) + 1;
        r.push_back((seq, inv));
        while r.len() > LOG_KEEP {
            r.pop_front();
        }
        self.seq.store(seq, Ordering::Release);
    }

    /// The sequence number of the newest record.
    pub fn seq(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }
}

/// An in-flight miss other requests can wait for.
#[derive(Debug, Default)]
pub struct Pending {
    done: Cell<bool>,
    waiters: Cell<usize>,
    wakers: RefCell<Vec<Waker>>,
}

impl Pending {
    /// Marks the miss finished and wakes every waiter.
    fn finish(&self) {
        self.done.set(true);
        for w in self.wakers.borrow_mut().drain(..) {
            w.wake();
        }
    }

    /// Waits until the miss is finished.
    pub fn wait(self: &Rc<Self>) -> impl Future<Output = ()> {
        struct W(Rc<Pending>);
        impl Future for W {
            type Output = ();
            fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
                if self.0.done.get() {
                    return Poll::Ready(());
                }
                let mut ws = self.0.wakers.borrow_mut();
                if !ws.iter().any(|w| w.will_wake(cx.waker())) {
                    ws.push(cx.waker().clone());
                }
                Poll::Pending
            }
        }
        self.waiters.set(self.waiters.get() + 1);
        W(self.clone())
    }

    /// Requests waiting so far.
    pub fn waiters(&self) -> usize {
        self.waiters.get()
    }
}

/// One worker's cache: its stores, in-flight misses and reused key buffer.
#[derive(Debug)]
pub struct WorkerCache {
    hasher: ahash::RandomState,
    stores: AHashMap<Arc<str>, Store>,
    /// `Vary` names learned per primary key hash (bounded; forgetting only costs a miss).
    vary: AHashMap<u64, Box<[Box<str>]>>,
    pending: AHashMap<u64, Rc<Pending>>,
    /// Invalidation records applied so far.
    applied: u64,
    /// Config generation the stores were last checked against.
    generation: u64,
    /// The key of the current request (reused: no allocation per lookup).
    pub key: Vec<u8>,
}

impl Default for WorkerCache {
    fn default() -> Self {
        WorkerCache {
            hasher: ahash::RandomState::new(),
            stores: AHashMap::new(),
            vary: AHashMap::new(),
            pending: AHashMap::new(),
            applied: 0,
            generation: 0,
            key: Vec::with_capacity(256),
        }
    }
}

/// Marks an in-flight miss as finished when dropped (also when the request is abandoned), so
/// waiters never wait for a leader that is gone.
pub struct Leader {
    cache: Rc<RefCell<WorkerCache>>,
    hash: u64,
    p: Rc<Pending>,
}

impl Drop for Leader {
    fn drop(&mut self) {
        if let Ok(mut c) = self.cache.try_borrow_mut() {
            if c.pending
                .get(&self.hash)
                .is_some_and(|p| Rc::ptr_eq(p, &self.p))
            {
                c.pending.remove(&self.hash);
            }
        }
        self.p.finish();
    }
}

impl WorkerCache {
    /// Hash of a key.
    pub fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The store for a policy's stage, created on first use and resized after a reload.
    pub fn store(&mut self, pol: &CachePolicy, workers: usize) -> &mut Store {
        let cap = (pol.max_bytes / workers.max(1) as u64) as usize;
        // Look up by `&str` first: cloning the config's `Arc` on every hit would write a cache
        // line that every worker shares.
        if !self.stores.contains_key(&*pol.store_id) {
            self.stores.insert(pol.store_id.clone(), Store::new(cap));
        }
        let s = self.stores.get_mut(&*pol.store_id).expect("inserted above");
        if s.capacity() != cap {
            s.set_capacity(cap);
        }
        s
    }

    /// After a reload (`generation` changed), drops the stores of stages that no longer
    /// cache anything, so a removed stage's entries do not stay in memory.
    pub fn prune(&mut self, generation: u64, routes: &crate::config::RouteTable) {
        if generation == self.generation {
            return;
        }
        self.generation = generation;
        let live: Vec<&Arc<str>> = routes
            .routes()
            .iter()
            .filter_map(|r| r.cache.as_ref().map(|c| &c.store_id))
            .collect();
        self.stores.retain(|id, _| live.iter().any(|l| **l == *id));
        self.vary.clear();
    }

    /// Applies invalidations published since the last call.
    pub fn sync(&mut self, log: &InvalidationLog) {
        let seq = log.seq();
        if seq == self.applied {
            return;
        }
        let recs = log.records.lock().unwrap_or_else(|e| e.into_inner());
        let oldest = recs.front().map_or(seq + 1, |r| r.0);
        if self.applied + 1 < oldest {
            // Fell too far behind: forget everything rather than serve something stale.
            for s in self.stores.values_mut() {
                s.clear();
            }
        } else {
            for (n, inv) in recs.iter() {
                if *n <= self.applied {
                    continue;
                }
                match inv {
                    Invalidation::Prefix { store_id, prefix } => {
                        if let Some(s) = self.stores.get_mut(store_id) {
                            s.remove_where(|e| e.rel_path().starts_with(prefix));
                        }
                    }
                    Invalidation::Key { store_id, key } => {
                        let h = self.hasher.hash_one(&**key);
                        if let Some(s) = self.stores.get_mut(store_id) {
                            s.remove(h, key);
                        }
                    }
                }
            }
        }
        self.applied = seq;
    }

    /// The invalidation sequence this worker has applied.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// `Vary` names learned for a primary key.
    pub fn vary_names(&self, primary: u64) -> Option<&[Box<str>]> {
        self.vary.get(&primary).map(|v| &v[..])
    }

    /// Remembers the `Vary` names of a primary key (an empty list forgets them).
    pub fn set_vary(&mut self, primary: u64, names: &[Box<str>]) {
        if names.is_empty() {
            self.vary.remove(&primary);
            return;
        }
        if self.vary.len() >= 65_536 {
            self.vary.clear();
        }
        self.vary.insert(primary, names.into());
    }

    /// The in-flight miss for a primary key, if any (a finished one left behind is dropped).
    pub fn pending(&mut self, primary: u64) -> Option<Rc<Pending>> {
        let p = self.pending.get(&primary)?;
        if p.done.get() {
            self.pending.remove(&primary);
            return None;
        }
        Some(p.clone())
    }

    /// Registers the current request as the one fetching `primary`.
    pub fn lead(this: &Rc<RefCell<WorkerCache>>, primary: u64) -> Leader {
        let p = Rc::new(Pending::default());
        this.borrow_mut().pending.insert(primary, p.clone());
        Leader {
            cache: this.clone(),
            hash: primary,
            p,
        }
    }
}

/// What the proxy collects from an upstream response on a cached route.
#[derive(Debug)]
pub struct Capture {
    /// Try to store the response (the request was eligible).
    pub store: bool,
    /// The route's TTL.
    pub ttl: Duration,
    /// Largest entry the store accepts.
    pub max_entry: usize,
    /// The request was HEAD.
    pub head_request: bool,
    /// Set by [`Capture::begin`]: the response may be stored.
    pub active: bool,
    /// Status line and headers to store (without framing and blank line).
    pub head: Vec<u8>,
    /// Decoded body.
    pub body: Vec<u8>,
    /// Content-Length of a stored HEAD response.
    pub head_length: Option<Vec<u8>>,
    /// TTL and vary names decided for the response.
    pub ttl_final: Duration,
    /// Vary names of the response.
    pub vary: Vec<Box<str>>,
    /// Status of the response.
    pub status: u16,
    /// The gateway answers CORS for this route: the upstream's `access-control-*` headers are
    /// not stored (a hit gets the gateway's, for its own request's origin).
    pub strip_cors: bool,
}

impl Capture {
    /// A capture for a route whose responses get `x-cache: miss` and, when `store`, are kept.
    pub fn new(store: bool, ttl: Duration, max_entry: usize, head_request: bool) -> Capture {
        Capture {
            store,
            ttl,
            max_entry,
            head_request,
            active: false,
            head: Vec::new(),
            body: Vec::new(),
            head_length: None,
            ttl_final: Duration::ZERO,
            vary: Vec::new(),
            status: 0,
            strip_cors: false,
        }
    }

    /// Looks at the upstream response head and, when it may be stored, copies its head
    /// (without the names a response mapping owns).
    pub fn begin(
        &mut self,
        resp: &crate::http::ResponseHead,
        buf: &[u8],
        mapped: Option<&crate::policy::mapping::HeaderMapping>,
    ) {
        use crate::http::{encode, RespBody};
        if !self.store {
            return;
        }
        let control::Decision::Store { ttl, vary } =
            control::decide(resp, buf, self.ttl, self.head_request)
        else {
            return;
        };
        if let RespBody::Length(n) = resp.body {
            if n as usize > self.max_entry {
                return;
            }
            self.body.reserve_exact(n as usize);
        }
        self.head.clear();
        encode::push_status_line(&mut self.head, resp.status);
        for (name, value) in resp.forwardable(buf) {
            if name.eq_ignore_ascii_case(b"x-request-id")
                || name.eq_ignore_ascii_case(b"x-cache")
                || name.eq_ignore_ascii_case(b"age")
                || (self.strip_cors
                    && name.len() > 15
                    && name[..15].eq_ignore_ascii_case(b"access-control-"))
                || mapped.is_some_and(|m| m.covers(name))
            {
                continue;
            }
            encode::push_header(&mut self.head, name, value);
        }
        if self.head_request {
            self.head_length = resp.header(buf, "content-length").map(|v| v.to_vec());
        }
        self.ttl_final = ttl;
        self.vary = vary;
        self.status = resp.status;
        self.active = true;
    }

    /// Adds body bytes; gives up when the entry grows past the bound.
    pub fn body(&mut self, b: &[u8]) {
        if !self.active {
            return;
        }
        if self.head.len() + self.body.len() + b.len() > self.max_entry {
            self.active = false;
            self.body = Vec::new();
            return;
        }
        self.body.extend_from_slice(b);
    }

    /// The stored bytes (head with Content-Length, then body) and the head's length.
    pub fn finish(&mut self) -> Option<(bytes::Bytes, usize)> {
        if !self.active {
            return None;
        }
        // Exact capacity: the store charges `data.len()`, so no hidden slack may hide behind it.
        let mut data = Vec::with_capacity(self.head.len() + 40 + self.body.len());
        data.extend_from_slice(&self.head);
        self.head = Vec::new();
        match (&self.head_length, self.head_request) {
            (Some(v), true) => crate::http::encode::push_header(&mut data, b"content-length", v),
            (None, true) => {}
            (_, false) => {
                data.extend_from_slice(b"content-length: ");
                crate::http::encode::push_u64(&mut data, self.body.len() as u64);
                data.extend_from_slice(b"\r\n");
            }
        }
        let head_len = data.len();
        data.extend_from_slice(&self.body);
        self.body = Vec::new();
        data.shrink_to_fit();
        Some((bytes::Bytes::from(data), head_len))
    }
}

/// `POST /cache/invalidate` with `{"api","stage","path_prefix"?}`: publishes a prefix
/// invalidation to every worker. Returns the status and the JSON answer.
pub fn admin_invalidate(shared: &crate::gateway::Shared, body: &[u8]) -> (u16, String) {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Req {
        api: String,
        stage: String,
        path_prefix: Option<String>,
    }
    let msg = |m: &str| serde_json::json!({ "message": m }).to_string();
    let r: Req = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return (
                400,
                msg(&format!(
                    "body must be {{\"api\",\"stage\",\"path_prefix\"?}}: {e}"
                )),
            )
        }
    };
    let prefix = r.path_prefix.unwrap_or_default();
    if !prefix.is_empty() && !prefix.starts_with('/') {
        return (400, msg("path_prefix must start with `/`"));
    }
    let gw = shared.current();
    let known = gw
        .config
        .routes
        .routes()
        .iter()
        .any(|rt| *rt.api == *r.api && *rt.stage == *r.stage);
    if !known {
        return (
            404,
            msg(&format!("no stage `{}` in API `{}`", r.stage, r.api)),
        );
    }
    shared.cache_inval.publish(Invalidation::Prefix {
        store_id: format!("{}\0{}", r.api, r.stage).into(),
        prefix: prefix.as_bytes().into(),
    });
    (
        200,
        serde_json::json!({
            "message": "invalidated",
            "api": r.api,
            "stage": r.stage,
            "path_prefix": prefix,
        })
        .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{Limits, Status};

    fn pol(key: Vec<KeyPart>) -> CachePolicy {
        let query_in_key = key.iter().any(|k| matches!(k, KeyPart::Query(_)));
        CachePolicy {
            store_id: "a\0s".into(),
            max_bytes: 1 << 20,
            ttl: Duration::from_secs(1),
            key,
            query_in_key,
            credentials_in_key: [false; 3],
            allow_client_invalidate: false,
        }
    }

    fn key(p: &CachePolicy, req: &str) -> Vec<u8> {
        let mut h = RequestHead::new(32);
        let lim = Limits {
            max_header_bytes: 8192,
            max_headers: 32,
        };
        assert!(matches!(
            h.parse(req.as_bytes(), &lim),
            Ok(Status::Complete(_))
        ));
        let mut out = Vec::new();
        let r = build_key(&mut out, p, &h, req.as_bytes(), &Params::new(), 5);
        assert_eq!(&out[r.0 as usize..r.1 as usize], b"/x");
        out
    }

    #[test]
    fn query_and_header_parts() {
        let p = pol(vec![
            KeyPart::Query("lang".into()),
            KeyPart::Header("x-t".into()),
        ]);
        let a = key(&p, "GET /prod/x?lang=en&u=1 HTTP/1.1\r\nHost: H\r\n\r\n");
        let b = key(&p, "GET /prod/x?u=2&lang=en HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!(a, b);
        let c = key(&p, "GET /prod/x?lang=fr HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_ne!(a, c);
        let d = key(
            &p,
            "GET /prod/x?lang=en HTTP/1.1\r\nHost: h\r\nX-T: 1\r\n\r\n",
        );
        assert_ne!(a, d);
        // Absent and empty differ.
        let e = key(&p, "GET /prod/x?lang= HTTP/1.1\r\nHost: h\r\n\r\n");
        let f = key(&p, "GET /prod/x?lang HTTP/1.1\r\nHost: h\r\n\r\n");
        let g = key(&p, "GET /prod/x HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_ne!(e, g);
        assert_ne!(f, g);
        // Method counts.
        let h = key(&p, "HEAD /prod/x?lang=en HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_ne!(a, h);
    }

    #[test]
    fn whole_query_without_query_parts() {
        let p = pol(vec![]);
        let a = key(&p, "GET /prod/x?a=1 HTTP/1.1\r\nHost: h\r\n\r\n");
        let b = key(&p, "GET /prod/x?a=2 HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_ne!(a, b);
    }

    #[test]
    fn invalidation_log_applies_and_falls_back_to_clear() {
        let log = InvalidationLog::default();
        let mut wc = WorkerCache::default();
        let p = pol(vec![]);
        let now = std::time::Instant::now();
        for path in ["/a/1", "/b/1"] {
            let k: Box<[u8]> = path.as_bytes().into();
            let h = wc.hash(&k);
            let e = Entry::new(
                k,
                bytes::Bytes::from_static(b"x"),
                0,
                200,
                now,
                now + Duration::from_secs(60),
                (0, path.len() as u32),
            );
            assert!(wc.store(&p, 1).insert(h, e));
        }
        log.publish(Invalidation::Prefix {
            store_id: p.store_id.clone(),
            prefix: b"/a/".as_slice().into(),
        });
        wc.sync(&log);
        assert_eq!(wc.store(&p, 1).len(), 1);
        // A worker that missed more records than are kept clears everything.
        for _ in 0..LOG_KEEP + 1 {
            log.publish(Invalidation::Prefix {
                store_id: "other".into(),
                prefix: b"/".as_slice().into(),
            });
        }
        wc.sync(&log);
        assert_eq!(wc.store(&p, 1).len(), 0);
    }
}
