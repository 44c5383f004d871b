//! The response cache: the stage stores shared by the workers, cache keys, the rules for
//! what is stored, stampede protection and invalidation.
//!
//! Design (see the README's "Response cache" section for the user's view):
//! - **One store per API stage for the whole gateway** ([`Caches`], [`StageCache`]), split in
//!   shards by key hash (one per worker, up to 16), each behind a mutex held only for one
//!   lookup or insert. Whichever worker a connection lands on, it sees what any worker stored:
//!   a response is fetched and held once.
//! - **Entries** are one [`bytes::Bytes`]: status line and headers ready to write, then the
//!   body. A hit writes those same bytes, with a small per-request block (`x-cache`, `Age`,
//!   `x-request-id`, connection) between head and body.
//! - **Eviction** is S3-FIFO ([`store`]): one-shot keys (a scan) churn a small FIFO and never
//!   push out the entries that get hits.
//! - **Stampede protection** is per worker: concurrent misses for one key on a worker send one
//!   upstream request; the others wait (bounded) and are served from the stored answer.
//! - **Invalidation** ([`Caches::invalidate`]) removes entries from the shared store at once;
//!   a fetch that began before an invalidation does not store its answer.

pub mod config;
pub mod control;
pub mod store;

use crate::http::RequestHead;
use crate::router::Params;
use ahash::AHashMap;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
pub use store::{Entry, Store};

/// Request headers that carry credentials on every route: requests with one are never served
/// from or stored in the cache unless the route's `key` contains that header (so each principal
/// has its own entries). A route's authorizer adds its own identity sources to these.
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
    /// Identifies the stage's store: `api` NUL `stage`.
    pub store_id: Arc<str>,
    /// The stage's `max_bytes`.
    pub max_bytes: u64,
    /// The stage's store, found in [`Caches`] on first use.
    pub stage: std::sync::OnceLock<Arc<StageCache>>,
    /// Longest time a response is served (upstream `max-age`/`s-maxage` may shorten it).
    pub ttl: Duration,
    /// The route's `key` parameters.
    pub key: Vec<KeyPart>,
    /// Some `query.X` is in the key: only those query parameters count. Otherwise the whole
    /// query string is part of the key.
    pub query_in_key: bool,
    /// Request fields that carry credentials on this route, or that its request mapping copies
    /// upstream, and are not part of the key: a request with one of them bypasses the cache.
    pub credentials: Box<[KeyPart]>,
    /// A client's `Cache-Control: max-age=0` refreshes the entry (`allow_client_invalidate`).
    pub allow_client_invalidate: bool,
}

impl CachePolicy {
    /// Adds request fields that a route's request mapping copies upstream to those a request
    /// may not carry to use the cache unless they are in the key (as credentials): else one
    /// client's value would shape the answer stored for every client.
    pub fn add_unkeyed_inputs(&mut self, inputs: &[crate::policy::mapping::ClientInput]) {
        use crate::policy::mapping::ClientInput;
        let mut all = self.credentials.to_vec();
        for i in inputs {
            let part = match i {
                ClientInput::Header(h) => KeyPart::Header(h.clone()),
                ClientInput::Query(q) => KeyPart::Query(String::from_utf8_lossy(q).into()),
                // The route is not cached at all (see config::routes).
                ClientInput::SourceIp => continue,
            };
            // A query parameter is in the key when the whole query string is.
            let keyed = self.key.contains(&part)
                || (matches!(part, KeyPart::Query(_)) && !self.query_in_key);
            if !keyed && !all.contains(&part) {
                all.push(part);
            }
        }
        self.credentials = all.into();
    }

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
        let query = head.query.map(|q| head.slice(buf, q)).unwrap_or(b"");
        !self.credentials.iter().any(|c| match c {
            KeyPart::Header(h) => head.header(buf, h).is_some(),
            KeyPart::Query(q) => crate::http::query_values(query, q.as_bytes())
                .next()
                .is_some(),
            KeyPart::Path(_) => false,
        })
    }
}

/// Builds the primary cache key into `out` (cleared first): method, host, API and stage, the
/// stage-relative path, then the route's key parameters (or the whole query string), the
/// scheme, and the client's verified certificate (`x-forwarded-client-cert`'s value), if any.
/// Returns the range of the stage-relative path within `out`.
#[allow(
    clippy::too_many_arguments,
    reason = "the request's parts that make its key"
)]
pub fn build_key(
    out: &mut Vec<u8>,
    pol: &CachePolicy,
    head: &RequestHead,
    buf: &[u8],
    params: &Params,
    prefix_len: usize,
    https: bool,
    client_cert: Option<&[u8]>,
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
                // Every value of the parameter, in order, decoded as a backend reads it (so
                // `%6Cang=fr` is `lang=fr`, and `lang=%65n` is `lang=en`); absent and empty
                // differ.
                // Each value length-prefixed: a decoded one may hold any byte.
                for v in crate::http::query_values(query, name.as_bytes()) {
                    out.push(1);
                    if v.iter().any(|&c| c == b'%' || c == b'+') {
                        let mut d = Vec::with_capacity(v.len());
                        crate::http::percent_decode(v, true, &mut d);
                        out.extend_from_slice(&(d.len() as u32).to_le_bytes());
                        out.extend_from_slice(&d);
                    } else {
                        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
                        out.extend_from_slice(v);
                    }
                }
            }
            KeyPart::Header(name) => push_header_values(out, head, buf, name),
        }
    }
    // The upstream is told the scheme (`X-Forwarded-Proto`) and may answer each differently
    // (a redirect to https): nginx's default key has the scheme too.
    out.push(0);
    out.extend_from_slice(if https { b"https" } else { b"http" });
    // A verified client certificate is a credential the upstream reads
    // (`x-forwarded-client-cert`): each certificate has its own entries.
    if let Some(cert) = client_cert {
        out.push(0);
        out.extend_from_slice(cert);
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

/// The gateway's stores, one per API stage, shared by every worker (created on first use,
/// kept across reloads while the stage caches), and the invalidation sequence.
#[derive(Debug, Default)]
pub struct Caches {
    /// Bumped by every invalidation before it is applied: a fetch that began before one does
    /// not store its answer.
    seq: AtomicU64,
    stages: Mutex<AHashMap<Arc<str>, Arc<StageCache>>>,
}

impl Caches {
    /// The store of a policy's stage (one lookup of the registry per policy and config
    /// generation; afterwards a field read). `workers` sets the shard count of a new store.
    pub fn stage<'a>(&self, pol: &'a CachePolicy, workers: usize) -> &'a StageCache {
        pol.stage.get_or_init(|| {
            let mut m = self.stages.lock().unwrap_or_else(|e| e.into_inner());
            let sc = m
                .entry(pol.store_id.clone())
                .or_insert_with(|| Arc::new(StageCache::new(workers, pol.max_bytes)))
                .clone();
            sc.resize(pol.max_bytes);
            sc
        })
    }

    /// After a reload: drops the stores of stages that no longer cache anything, so a removed
    /// stage's entries do not stay in memory.
    pub fn prune(&self, routes: &crate::config::RouteTable) {
        let mut m = self.stages.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|id, _| {
            routes
                .routes()
                .iter()
                .any(|r| r.cache.as_ref().is_some_and(|c| c.store_id == *id))
        });
    }

    /// Applies an invalidation to the stage's store (every worker sees it at once).
    pub fn invalidate(&self, inv: Invalidation) {
        self.seq.fetch_add(1, Ordering::SeqCst);
        let id = match &inv {
            Invalidation::Prefix { store_id, .. } | Invalidation::Key { store_id, .. } => store_id,
        };
        let sc = self
            .stages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned();
        let Some(sc) = sc else { return };
        match inv {
            Invalidation::Prefix { prefix, .. } => {
                for sh in sc.shards.iter() {
                    let mut sh = lock(sh);
                    sh.store.remove_where(|e| e.rel_path().starts_with(&prefix));
                }
            }
            Invalidation::Key { key, .. } => {
                let h = sc.hash(&key);
                for sh in sc.shards.iter() {
                    lock(sh).store.remove(h, &key);
                }
            }
        }
    }

    /// The invalidation sequence: read when a fetch begins, compared (under the shard lock)
    /// before its answer is stored.
    pub fn seq(&self) -> u64 {
        self.seq.load(Ordering::SeqCst)
    }
}

fn lock(m: &Mutex<Shard>) -> std::sync::MutexGuard<'_, Shard> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Most shards of a stage's store.
const MAX_SHARDS: usize = 16;

/// One API stage's store, split in shards by primary key hash (each behind its own mutex,
/// held only for a lookup or an insert), each bounded by an equal share of `max_bytes`.
#[derive(Debug)]
pub struct StageCache {
    hasher: ahash::RandomState,
    shards: Box<[Mutex<Shard>]>,
    max_bytes: AtomicU64,
    /// Bytes its captures under way hold, on every worker ([`Capture::with_budget`]).
    captures: CaptureBytes,
}

/// One shard: entries, and the `Vary` names learned for the primary keys that hash here (an
/// entry with `Vary` lives in the shard of its primary key, beside those names).
#[derive(Debug)]
pub struct Shard {
    pub store: Store,
    vary: AHashMap<u64, Box<[Box<str>]>>,
}

impl StageCache {
    /// A store of `max_bytes` in one shard per worker (a power of two, at most 16).
    pub fn new(workers: usize, max_bytes: u64) -> StageCache {
        let n = workers.clamp(1, MAX_SHARDS).next_power_of_two();
        let cap = (max_bytes / n as u64) as usize;
        StageCache {
            hasher: ahash::RandomState::new(),
            shards: (0..n)
                .map(|_| {
                    Mutex::new(Shard {
                        store: Store::new(cap),
                        vary: AHashMap::new(),
                    })
                })
                .collect(),
            max_bytes: AtomicU64::new(max_bytes),
            captures: CaptureBytes::default(),
        }
    }

    fn resize(&self, max_bytes: u64) {
        if self.max_bytes.swap(max_bytes, Ordering::Relaxed) == max_bytes {
            return;
        }
        let cap = (max_bytes / self.shards.len() as u64) as usize;
        for sh in self.shards.iter() {
            lock(sh).store.set_capacity(cap);
        }
    }

    /// Hash of a key.
    pub fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The shard of a primary key hash, locked.
    pub fn shard(&self, primary: u64) -> std::sync::MutexGuard<'_, Shard> {
        lock(&self.shards[(primary >> 32) as usize & (self.shards.len() - 1)])
    }

    /// A capture for a response of this stage, charged to its budget (see
    /// [`Capture::with_budget`]).
    pub fn capture(&self, ttl: Duration, head_request: bool) -> Capture {
        Capture::new(true, ttl, self.max_entry(), head_request).with_budget(
            self.captures.clone(),
            self.max_bytes.load(Ordering::Relaxed),
        )
    }

    /// The largest response an entry may hold.
    pub fn max_entry(&self) -> usize {
        lock(&self.shards[0]).store.max_entry()
    }

    /// Entries stored, over every shard.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).store.len()).sum()
    }

    /// No entry stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Shard {
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
        if self.vary.len() >= 65_536 / MAX_SHARDS {
            self.vary.clear();
        }
        self.vary.insert(primary, names.into());
    }
}

/// An in-flight miss other requests can wait for.
#[derive(Debug, Default)]
pub struct Pending {
    done: Cell<bool>,
    /// The upstream did not answer the fetch within its `timeout_ms`.
    timed_out: Cell<bool>,
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

    /// Whether the fetch ended because the upstream did not answer in time: its waiters
    /// get that answer too (504) rather than asking the same upstream again one by one.
    pub fn timed_out(&self) -> bool {
        self.timed_out.get()
    }
}

/// One worker's cache state: its in-flight misses and a reused key buffer.
#[derive(Debug)]
pub struct WorkerCache {
    pending: AHashMap<u64, Rc<Pending>>,
    /// The key of the current request (reused: no allocation per lookup).
    pub key: Vec<u8>,
}

impl Default for WorkerCache {
    fn default() -> Self {
        WorkerCache {
            pending: AHashMap::new(),
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

impl Leader {
    /// The fetch ended with the upstream's timeout (see [`Pending::timed_out`]).
    pub fn set_timed_out(&self) {
        self.p.timed_out.set(true);
    }
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
    /// The upstream's `Age` of the response (see [`control::Decision::Store`]).
    pub age: Duration,
    /// Vary names of the response.
    pub vary: Vec<Box<str>>,
    /// Status of the response.
    pub status: u16,
    /// The gateway answers CORS for this route: the upstream's `access-control-*` headers are
    /// not stored (a hit gets the gateway's, for its own request's origin).
    pub strip_cors: bool,
    /// The worker's captures under way, in bytes, and what they may hold in all
    /// ([`Capture::with_budget`]); what this one is charged for.
    budget: Option<(CaptureBytes, u64)>,
    charged: u64,
}

/// The bytes a stage's captures under way hold (see [`Capture::with_budget`]).
pub type CaptureBytes = Arc<AtomicU64>;

impl Drop for Capture {
    fn drop(&mut self) {
        self.uncharge();
    }
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
            age: Duration::ZERO,
            vary: Vec::new(),
            status: 0,
            strip_cors: false,
            budget: None,
            charged: 0,
        }
    }

    /// Charges what this capture holds to `budget`, the bytes all captures under way for its
    /// stage hold, which may reach `limit` (the stage's `max_bytes`) in all. Past it the
    /// capture gives up (the answer still goes to its client): a capture lives as long as its
    /// client takes to read the answer, so slow clients would otherwise make captures hold
    /// memory that `max_bytes` does not count.
    pub fn with_budget(mut self, budget: CaptureBytes, limit: u64) -> Capture {
        self.budget = Some((budget, limit));
        self
    }

    /// Raises the charge to `total` bytes; false (nothing changes) past the budget.
    fn charge(&mut self, total: usize) -> bool {
        let Some((held, limit)) = &self.budget else {
            return true;
        };
        let total = total as u64;
        if total <= self.charged {
            return true;
        }
        let more = total - self.charged;
        let raised = held.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| {
            (h + more <= *limit).then_some(h + more)
        });
        if raised.is_err() {
            return false;
        }
        self.charged = total;
        true
    }

    fn uncharge(&mut self) {
        if let Some((held, _)) = &self.budget {
            held.fetch_sub(self.charged, Ordering::Relaxed);
        }
        self.charged = 0;
    }

    /// Looks at the upstream response head and, when it may be stored, copies its head
    /// (without the names a response mapping owns). `date`: the `Date` the gateway added
    /// because the upstream sent none (RFC 9110 6.6.1: it is kept with a stored response).
    pub fn begin(
        &mut self,
        resp: &crate::http::ResponseHead,
        buf: &[u8],
        mapped: Option<&crate::policy::mapping::HeaderMapping>,
        date: Option<&[u8]>,
    ) {
        use crate::http::{encode, RespBody};
        if !self.store {
            return;
        }
        let control::Decision::Store { ttl, vary, age } =
            control::decide(resp, buf, self.ttl, self.head_request)
        else {
            return;
        };
        if let RespBody::Length(n) = resp.body {
            if n as usize > self.max_entry || !self.charge(n as usize) {
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
        if let Some(d) = date {
            encode::push_header(&mut self.head, b"date", d);
        }
        if self.head_request {
            self.head_length = resp.header(buf, "content-length").map(|v| v.to_vec());
        }
        self.ttl_final = ttl;
        self.age = age;
        self.vary = vary;
        self.status = resp.status;
        self.active = true;
    }

    /// Gives up storing this response (it has parts a stored entry cannot replay).
    pub fn abandon(&mut self) {
        self.active = false;
        self.body = Vec::new();
        self.uncharge();
    }

    /// Adds body bytes; gives up when the entry grows past the bound.
    pub fn body(&mut self, b: &[u8]) {
        if !self.active {
            return;
        }
        let total = self.head.len() + self.body.len() + b.len();
        if total > self.max_entry || !self.charge(total) {
            self.abandon();
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
        // The store counts it from here.
        self.uncharge();
        data.shrink_to_fit();
        Some((bytes::Bytes::from(data), head_len))
    }
}

/// `POST /cache/invalidate` with `{"api","stage","path_prefix"?}`: drops the stage's entries
/// under the prefix. Returns the status and the JSON answer.
pub fn admin_invalidate(shared: &crate::gateway::Shared, body: &[u8]) -> (u16, String) {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Req {
        api: String,
        stage: String,
        path_prefix: Option<String>,
    }
    let msg = |m: &str| serde_json::json!({ "message": m }).to_string();
    if !crate::admin::is_json_object(body) {
        return (
            400,
            msg("the body must be a JSON object {\"api\",\"stage\",\"path_prefix\"?}"),
        );
    }
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
    // Entries are keyed by the normal form of their path: `/c/a%3Ab` and `//c/a:b` purge what
    // `/c/a:b` does.
    let prefix = if prefix.is_empty() {
        prefix
    } else {
        match crate::http::request::normal_form(&prefix) {
            Ok(p) => p,
            Err(why) => {
                return (
                    400,
                    msg(&format!(
                        "path_prefix `{prefix}`: requests with it are refused ({why})"
                    )),
                )
            }
        }
    };
    let gw = shared.current();
    let known = gw
        .config
        .routes
        .routes()
        .iter()
        .any(|rt| *rt.api == *r.api && *rt.stage == *r.stage);
    if !known {
        let api_known = gw.config.routes.routes().iter().any(|rt| *rt.api == *r.api);
        let m = if api_known {
            format!("no stage `{}` in API `{}`", r.stage, r.api)
        } else {
            format!("no API `{}`", r.api)
        };
        return (404, msg(&m));
    }
    shared.caches.invalidate(Invalidation::Prefix {
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

    #[test]
    fn captures_under_way_share_their_stage_budget() {
        let budget = CaptureBytes::default();
        let ttl = Duration::from_secs(60);
        let capture = || {
            let mut c = Capture::new(true, ttl, 1000, false).with_budget(budget.clone(), 1500);
            c.active = true;
            c
        };
        let mut a = capture();
        a.body(&[b'a'; 500]);
        a.body(&[b'a'; 300]);
        assert!(a.active);
        assert_eq!(budget.load(Ordering::Relaxed), 800);
        // A second one would pass the budget: it gives up (and holds nothing).
        let mut b = capture();
        b.body(&[b'b'; 800]);
        assert!(!b.active && b.body.is_empty());
        assert_eq!(budget.load(Ordering::Relaxed), 800);
        // Stored (the store counts it then), given up, or dropped: the charge goes back.
        assert!(a.finish().is_some());
        assert_eq!(budget.load(Ordering::Relaxed), 0);
        let mut c = capture();
        c.body(&[b'c'; 900]);
        assert_eq!(budget.load(Ordering::Relaxed), 900);
        c.abandon();
        assert_eq!(budget.load(Ordering::Relaxed), 0);
        let mut d = capture();
        d.body(&[b'd'; 700]);
        drop(d);
        assert_eq!(budget.load(Ordering::Relaxed), 0);
    }
    use crate::http::{Limits, Status};

    fn pol(key: Vec<KeyPart>) -> CachePolicy {
        let query_in_key = key.iter().any(|k| matches!(k, KeyPart::Query(_)));
        CachePolicy {
            store_id: "a\0s".into(),
            max_bytes: 1 << 20,
            ttl: Duration::from_secs(1),
            key,
            query_in_key,
            credentials: Box::new([]),
            allow_client_invalidate: false,
            stage: Default::default(),
        }
    }

    fn key(p: &CachePolicy, req: &str) -> Vec<u8> {
        key_as(p, req, false, None)
    }

    /// The key of `req` over https or not, with a client certificate or not.
    fn key_as(p: &CachePolicy, req: &str, https: bool, cert: Option<&[u8]>) -> Vec<u8> {
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
        let params = Params::new();
        let r = build_key(&mut out, p, &h, req.as_bytes(), &params, 5, https, cert);
        assert_eq!(&out[r.0 as usize..r.1 as usize], b"/x");
        out
    }

    #[test]
    fn scheme_and_client_certificate_are_in_the_key() {
        let p = pol(vec![]);
        let k = |https, cert| key_as(&p, "GET /prod/x HTTP/1.1\r\nHost: h\r\n\r\n", https, cert);
        // A plain request's answer (a redirect to https, say) is never an https one's.
        assert_ne!(k(false, None), k(true, None));
        // Each verified certificate has its own entries, apart from requests without one.
        let alice: &[u8] = b"Hash=aa;Subject=\"CN=alice\"";
        let bob: &[u8] = b"Hash=bb;Subject=\"CN=bob\"";
        assert_ne!(k(true, Some(alice)), k(true, Some(bob)));
        assert_ne!(k(true, Some(alice)), k(true, None));
        assert_eq!(k(true, Some(alice)), k(true, Some(alice)));
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
        // Names and values as a backend decodes them: no poisoning of the `lang`-less entry
        // with `%6Cang=fr`, and one entry for two spellings of `en`.
        let none = key(&p, "GET /prod/x?u=1 HTTP/1.1\r\nHost: h\r\n\r\n");
        let spelled = key(&p, "GET /prod/x?%6Cang=fr HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_ne!(spelled, none);
        assert_eq!(
            spelled,
            key(&p, "GET /prod/x?lang=fr HTTP/1.1\r\nHost: h\r\n\r\n")
        );
        assert_eq!(
            a,
            key(&p, "GET /prod/x?lang=%65n HTTP/1.1\r\nHost: h\r\n\r\n")
        );
        assert_ne!(
            key(&p, "GET /prod/x?lang=a%01b HTTP/1.1\r\nHost: h\r\n\r\n"),
            key(&p, "GET /prod/x?lang=a&lang=b HTTP/1.1\r\nHost: h\r\n\r\n")
        );
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
    fn stage_store_is_shared_and_invalidated() {
        let caches = Caches::default();
        let p = pol(vec![]);
        let sc = caches.stage(&p, 2);
        let now = std::time::Instant::now();
        for path in ["/a/1", "/b/1"] {
            let k: Box<[u8]> = path.as_bytes().into();
            let h = sc.hash(&k);
            let e = Entry::new(
                k,
                bytes::Bytes::from_static(b"x"),
                0,
                200,
                now,
                now + Duration::from_secs(60),
                (0, path.len() as u32),
            );
            assert!(sc.shard(h).store.insert(h, e));
        }
        // Another policy of the same stage (another route, or the same after a reload) finds
        // the same store.
        let q = pol(vec![]);
        assert!(std::ptr::eq(caches.stage(&q, 2), sc));
        assert_eq!(sc.len(), 2);
        let seq = caches.seq();
        caches.invalidate(Invalidation::Prefix {
            store_id: p.store_id.clone(),
            prefix: b"/a/".as_slice().into(),
        });
        assert_eq!(sc.len(), 1);
        assert!(
            caches.seq() > seq,
            "a fetch that began before must not store"
        );
        caches.invalidate(Invalidation::Key {
            store_id: p.store_id.clone(),
            key: b"/b/1".as_slice().into(),
        });
        assert!(sc.is_empty());
    }

    #[test]
    fn stage_store_is_split_and_resized() {
        let sc = StageCache::new(3, 4 << 20);
        assert_eq!(sc.shards.len(), 4);
        assert_eq!(sc.max_entry(), (1 << 20) / 4);
        sc.resize(8 << 20);
        assert_eq!(sc.max_entry(), (2 << 20) / 4);
        assert_eq!(StageCache::new(64, 1 << 20).shards.len(), MAX_SHARDS);
    }
}
