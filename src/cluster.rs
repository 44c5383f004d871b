//! `[cluster]`: several ringgate nodes share state through one Redis.
//!
//! What is shared, and how (every Redis call happens on this module's two threads per process,
//! never on a worker; workers and the admin listener talk to them through a channel):
//! - **API keys added at run time**: Redis hash `ringgate:apikeys` (name -> stored key, digest
//!   only). An admin change is written there and announced on channel `ringgate:events` (`ringgate:events:db{N}` for a database other than 0); every
//!   node then reloads the hash into its key set ([`crate::policy::auth::AuthState::replace_admin`]).
//!   Nodes also reload every [`KEYS_RELOAD_MS`] ms and on every reconnect, so a missed
//!   announcement costs at most that. Keys from the config file stay per node, as without
//!   `[cluster]`. The hash keeps a marker field holding an epoch (a random id made by the node
//!   that initialised the hash); each node remembers the epoch it last synced with, in memory
//!   and in `state_dir/cluster-epoch.json` ([`EPOCH_FILE`], loaded at start), so a restarted
//!   node knows it too. A missing marker, or another epoch, means Redis lost its data (or is
//!   new): the node then merges its keys back (`Worker::seed_keys`); only with its own epoch
//!   does a missing key mean a deletion. A node with no epoch file (a new one) adopts the hash
//!   it finds.
//! - **Usage-plan quota counts**: each request counts on the node's local counter (the hot
//!   path never waits for Redis). Every [`SYNC_MS`] ms this thread writes the node's own share
//!   of each counter to hash `ringgate:quota:{plan}:{period}:{index}:{key}` (field = node id,
//!   expiring a day after the period ends), reads the other nodes' shares back, and sets the
//!   local counter to the cluster-wide sum plus what was counted meanwhile. Each node writes an
//!   absolute value for its own field, so a resync after an outage or a Redis restart is
//!   idempotent. A node never lowers its count because Redis holds less: a hash that lost
//!   shares the node last read, or sums to less than its count, is repaired
//!   ([`REPAIR_SCRIPT`]: each share raised back to what the node read of it, then its own share
//!   raised by any remaining difference). A node that starts counting a key announces it on
//!   the events channel at that sync, so the other nodes sync that counter too before their
//!   own first request for it (after a connect they load every counter of the period:
//!   [`Worker::preload_quotas`]).
//!   Overshoot: between two syncs each node admits requests against the count it
//!   last read, so a quota can be exceeded by at most what the *other* nodes admit in one sync
//!   interval (bounded by their throttles).
//! - **WebSocket `@connections`**: hash `ringgate:conns` (connection id -> node id). A call
//!   for an id this node does not hold is published on the owning node's channel
//!   `ringgate:node:{node}`, which runs it and publishes the answer back; no answer within
//!   [`FORWARD_TIMEOUT`] is a 504. An id no live node holds is a 410 (nodes refresh a
//!   `ringgate:alive:{node}` key every [`HEARTBEAT_MS`] ms).
//! - **Cache invalidation**: `POST /cache/invalidate` on one node is published and applied by
//!   every node.
//!
//! Per node: throttles (token buckets), the response cache's entries, health checks, metrics.
//!
//! Redis down (at start or later), or refusing the first command of a connection (a password
//! missing or wrong: `NOAUTH`, `WRONGPASS`): the node serves with its local state, logs one line when
//! the outage starts and one when Redis is back, retries with backoff up to
//! [`BACKOFF_MAX_MS`] ms, and resyncs on reconnect (pending key changes written, keys reloaded,
//! connections registered again, quota shares rewritten).

use crate::config::{ConfigError, Source};
use crate::gateway::Shared;
use crate::policy::auth::{KeyChange, Reservation};
use crate::policy::plans::{rebase, unix_now, used_in, CounterId, Period};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use toml::Spanned;

/// How often quota counts are synced with Redis (and queued changes written).
pub const SYNC_MS: u64 = 100;
/// How often the API keys are reloaded even without an announcement.
pub const KEYS_RELOAD_MS: u64 = 5_000;
/// How often a node refreshes its liveness key.
pub const HEARTBEAT_MS: u64 = 1_000;
/// Lifetime of the liveness key.
const ALIVE_TTL_MS: u64 = 5_000;
/// How long a forwarded `@connections` call waits for the owning node.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait between two reconnection attempts.
pub const BACKOFF_MAX_MS: u64 = 5_000;
/// Connect, read and write timeout of a Redis call.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long [`Cluster::stop`] waits for the last sync and the threads' exit.
const STOP_WAIT: Duration = Duration::from_secs(1);
/// Most quota counters loaded from Redis at a (re)connect.
pub const MAX_PRELOAD: usize = 100_000;
/// Most key changes and registry updates queued while Redis is unreachable.
const MAX_QUEUED: usize = 100_000;

const KEYS_HASH: &str = "ringgate:apikeys";
/// Marker field of [`KEYS_HASH`] (not a valid key name, never parsed as a key).
const KEYS_MARKER: &str = ".";
const CONNS_HASH: &str = "ringgate:conns";
/// File in `state_dir` holding the epoch of the key hash this node last synced with.
pub const EPOCH_FILE: &str = "cluster-epoch.json";
/// Longest epoch kept in [`EPOCH_FILE`] (those made by [`new_epoch`] are about 30 bytes).
const MAX_EPOCH_LEN: usize = 256;

/// [`EPOCH_FILE`]'s content.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EpochFile {
    version: u32,
    epoch: String,
}

/// Whether `e` can be an epoch kept in [`EPOCH_FILE`].
fn valid_epoch(e: &str) -> bool {
    !e.is_empty() && e.len() <= MAX_EPOCH_LEN && e.bytes().all(|b| b.is_ascii_graphic())
}

/// The epoch kept in `path`; `None` when there is no such file (a node that never synced).
fn load_epoch(path: &Path) -> Result<Option<String>, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let bad = |why: String| {
        format!(
            "{}: not a valid cluster epoch file ({why}); fix or remove it (without it, this \
             node adopts the cluster's keys as a new node does, without merging its own back)",
            path.display()
        )
    };
    let f: EpochFile = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    if f.version != 1 {
        return Err(bad(format!("version {}, expected 1", f.version)));
    }
    if !valid_epoch(&f.epoch) {
        return Err(bad(format!(
            "`epoch` must be 1-{MAX_EPOCH_LEN} visible ASCII characters"
        )));
    }
    Ok(Some(f.epoch))
}

/// Writes `epoch` to `path` (see [`crate::statefile::write_atomic`]).
fn save_epoch(path: &Path, epoch: &str) -> std::io::Result<()> {
    let body = serde_json::to_vec(&EpochFile {
        version: 1,
        epoch: epoch.to_string(),
    })?;
    crate::statefile::write_atomic(path, &body)
}

/// Whether Redis refused this connection's credentials (a connection that cannot run any
/// command: treated as an unreachable Redis).
/// `e` for the log: a socket timeout says so (the OS's text for it is "Resource temporarily
/// unavailable").
fn describe(e: &redis::RedisError) -> String {
    if e.is_timeout() {
        format!("no answer within {} s", IO_TIMEOUT.as_secs())
    } else {
        e.to_string()
    }
}

fn refused_auth(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("NOAUTH" | "WRONGPASS"))
}

/// A new epoch for the key hash's marker: unique per node and time.
fn new_epoch(node: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{node}-{nanos:x}")
}

/// The channel every node of a cluster listens on. Redis channels are global to the server,
/// not per database: clusters on different databases of one Redis get their own channel.
fn events_channel(client: &redis::Client) -> String {
    match client.get_connection_info().redis_settings().db() {
        0 => "ringgate:events".to_string(),
        db => format!("ringgate:events:db{db}"),
    }
}

/// `[cluster]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    /// `redis://[user:password@]host[:port][/db]` or `unix:///path/to/socket`.
    pub redis: Spanned<String>,
}

/// `[cluster]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    pub redis: String,
}

/// The URL with any password replaced (for errors and logs).
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

pub(crate) fn validate(src: &Source, raw: &RawCluster) -> Result<ClusterConfig, ConfigError> {
    let url = raw.redis.get_ref();
    let bad = |m: String| src.err(raw.redis.span(), "cluster.redis", m);
    if !["redis://", "unix://", "redis+unix://"]
        .iter()
        .any(|p| url.starts_with(p))
    {
        return Err(bad(format!(
            "`{}` is not a Redis URL: expected redis://[user:password@]host[:port][/db] or unix:///path",
            redact(url)
        )));
    }
    match redis::Client::open(url.as_str()) {
        Ok(_) => Ok(ClusterConfig { redis: url.clone() }),
        Err(e) => Err(bad(format!(
            "`{}` is not a valid Redis URL: {e}",
            redact(url)
        ))),
    }
}

/// What the cluster thread is asked to do.
enum Msg {
    /// A local admin change and the key generation it made.
    Key(KeyChange, u64),
    /// Reserve a new key (name, stored form) in the cluster's set, then answer.
    Reserve(String, String, Sender<Reservation>),
    ConnOpened(u64),
    ConnClosed(u64),
    Forward {
        method: String,
        id: String,
        body: Vec<u8>,
        reply: Sender<(u16, String)>,
    },
    Invalidate(Vec<u8>),
    /// Sync the quota counts now, then answer.
    SyncNow(Sender<()>),
    /// A message from the subscriber thread.
    Inbound(Vec<u8>),
    /// The subscriber (re)subscribed: something may have been missed.
    Resubscribed,
    /// The gateway stops: sync the quota counts a last time, leave, and exit.
    Stop,
}

/// This node's link to the cluster (in [`Shared::cluster`]).
pub struct Cluster {
    node: String,
    tx: Sender<Msg>,
    /// Tells the subscriber thread to exit.
    stopping: Arc<AtomicBool>,
    /// The cluster thread and the subscriber thread, joined by [`Cluster::stop`].
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Cluster {
    /// This node's id (random per process).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// A WebSocket API connection opened on this node.
    pub fn conn_opened(&self, id: u64) {
        let _ = self.tx.send(Msg::ConnOpened(id));
    }

    /// A WebSocket API connection of this node closed.
    pub fn conn_closed(&self, id: u64) {
        let _ = self.tx.send(Msg::ConnClosed(id));
    }

    /// Publishes a cache invalidation (already applied here) to the other nodes.
    pub fn invalidate(&self, body: &[u8]) {
        let _ = self.tx.send(Msg::Invalidate(body.to_vec()));
    }

    /// Syncs the quota counts with Redis now (for the usage endpoint: its counter may have
    /// just been made); waits at most a Redis timeout.
    pub fn sync_now(&self) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let _ = self.tx.send(Msg::SyncNow(tx));
        let _ = rx.recv_timeout(IO_TIMEOUT);
    }

    /// Stops the cluster threads (the gateway stops): the quota counts are synced a last
    /// time and the node leaves; then the subscriber, woken by a message on this node's
    /// channel, exits. Waits for both at most [`STOP_WAIT`] (a Redis that does not answer
    /// must not hold the exit past the drain): they are then left to end on their own.
    pub fn stop(&self) {
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        if threads.is_empty() {
            return;
        }
        self.stopping.store(true, Ordering::Release);
        let _ = self.tx.send(Msg::Stop);
        let until = Instant::now() + STOP_WAIT;
        for t in threads {
            while !t.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                crate::elog!(
                    "ringgate: cluster: redis did not answer the last sync in time; not waiting for it"
                );
                return;
            }
        }
    }

    /// Runs `@connections/{id}` on the node holding `id` (blocks the admin thread for at most
    /// [`FORWARD_TIMEOUT`] and a little more).
    pub fn forward(&self, method: &str, id: &str, body: &[u8]) -> (u16, String) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let _ = self.tx.send(Msg::Forward {
            method: method.to_string(),
            id: id.to_string(),
            body: body.to_vec(),
            reply: tx,
        });
        rx.recv_timeout(FORWARD_TIMEOUT + IO_TIMEOUT * 2)
            .unwrap_or_else(|_| timed_out())
    }
}

fn message(m: &str) -> String {
    serde_json::json!({ "message": m }).to_string()
}

fn gone() -> (u16, String) {
    (410, message("Gone: no such connection"))
}

fn timed_out() -> (u16, String) {
    (
        504,
        message("the node holding the connection did not answer in time"),
    )
}

/// Starts the cluster threads of this process and sets [`Shared::cluster`].
pub fn start(cfg: &ClusterConfig, shared: &Arc<Shared>) -> Result<(), String> {
    let client =
        redis::Client::open(cfg.redis.as_str()).map_err(|e| format!("cluster.redis: {e}"))?;
    let epoch_file = shared.current().config.server.state_dir.join(EPOCH_FILE);
    let epoch = load_epoch(&epoch_file)?;
    let mut b = [0u8; 8];
    getrandom::getrandom(&mut b).map_err(|e| format!("cluster: no random node id: {e}"))?;
    let node = format!("{:016x}", u64::from_le_bytes(b));
    let (tx, rx) = crossbeam_channel::unbounded();
    let stopping = Arc::new(AtomicBool::new(false));
    let cluster = Cluster {
        node: node.clone(),
        tx: tx.clone(),
        stopping: stopping.clone(),
        threads: Mutex::new(Vec::new()),
    };
    if shared.cluster.set(cluster).is_err() {
        return Err("cluster: started twice".into());
    }
    let keys_tx = tx.clone();
    shared.auth.on_change(Box::new(move |k, generation| {
        let _ = keys_tx.send(Msg::Key(k, generation));
    }));
    let reserve_tx = tx.clone();
    shared.auth.on_add(Box::new(move |name, json| {
        let (reply, answer) = crossbeam_channel::bounded(1);
        let _ = reserve_tx.send(Msg::Reserve(name.to_string(), json.to_string(), reply));
        // Too slow: added here, and written with the queued change (as during an outage).
        answer
            .recv_timeout(IO_TIMEOUT * 2)
            .unwrap_or(Reservation::Unknown)
    }));
    let sub = {
        let client = client.clone();
        let node = node.clone();
        let weak = Arc::downgrade(shared);
        std::thread::Builder::new()
            .name("ringgate-cluster-sub".into())
            .spawn(move || subscriber(client, node, tx, weak, &stopping))
            .map_err(|e| format!("cannot start the cluster subscriber: {e}"))?
    };
    let url = redact(&cfg.redis);
    let weak = Arc::downgrade(shared);
    let worker = std::thread::Builder::new()
        .name("ringgate-cluster".into())
        .spawn(move || {
            let mut w = Worker::new(client, url, node, weak, epoch_file, epoch);
            w.anchor_loaded_counts();
            w.run(rx)
        })
        .map_err(|e| format!("cannot start the cluster thread: {e}"))?;
    if let Some(c) = shared.cluster.get() {
        *c.threads.lock().unwrap_or_else(|e| e.into_inner()) = vec![worker, sub];
    }
    Ok(())
}

/// The subscriber thread: `ringgate:events` and this node's channel, handed to the cluster
/// thread. Reconnects on its own (the cluster thread logs the outage).
fn subscriber(
    client: redis::Client,
    node: String,
    tx: Sender<Msg>,
    shared: Weak<Shared>,
    stopping: &AtomicBool,
) {
    let mine = format!("ringgate:node:{node}");
    let events = events_channel(&client);
    let mut backoff = 100u64;
    loop {
        if shared.strong_count() == 0 || stopping.load(Ordering::Acquire) {
            return;
        }
        let mut subscribed = false;
        let mut run = || -> redis::RedisResult<()> {
            let mut con = client.get_connection_with_timeout(IO_TIMEOUT)?;
            con.set_write_timeout(Some(IO_TIMEOUT))?;
            let mut ps = con.as_pubsub();
            ps.subscribe(&[events.as_str(), mine.as_str()])?;
            subscribed = true;
            let _ = tx.send(Msg::Resubscribed);
            ps.set_read_timeout(Some(Duration::from_secs(1)))?;
            loop {
                match ps.get_message() {
                    // The cluster thread's last message wakes this thread to exit.
                    Ok(_) if stopping.load(Ordering::Acquire) => return Ok(()),
                    Ok(m) => {
                        if tx
                            .send(Msg::Inbound(m.get_payload_bytes().to_vec()))
                            .is_err()
                        {
                            return Ok(());
                        }
                    }
                    Err(e) if e.is_timeout() => {
                        if shared.strong_count() == 0 || stopping.load(Ordering::Acquire) {
                            return Ok(());
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        if run().is_ok() {
            return;
        }
        if subscribed {
            // It worked until now: retry soon.
            backoff = 100;
        }
        std::thread::sleep(Duration::from_millis(backoff));
        backoff = (backoff * 2).min(BACKOFF_MAX_MS);
    }
}

/// The sync state of one quota counter.
#[derive(Default)]
struct QuotaSync {
    idx: u32,
    /// This node's share, as last written.
    own: u64,
    /// The local count that the last sync accounted for (own + others then).
    anchor: u64,
    /// Whether `own` was written since the last (re)connect.
    written: bool,
    /// Whether the other nodes were told of this counter in this period.
    announced: bool,
    /// The other nodes' shares (field -> count) as last read: written back when Redis loses
    /// them ([`REPAIR_SCRIPT`]).
    others: HashMap<String, u64>,
}

/// The cluster thread's state.
struct Worker {
    client: redis::Client,
    url: String,
    node: String,
    /// [`events_channel`].
    events: String,
    shared: Weak<Shared>,
    con: Option<redis::Connection>,
    /// An outage was logged and not yet its end.
    outage: bool,
    /// In this outage, Redis refusing the node's credentials was logged.
    refusal_logged: bool,
    connected_once: bool,
    next_try: Instant,
    backoff_ms: u64,
    /// Local key changes not yet in Redis, with their generations.
    keys: VecDeque<(KeyChange, u64)>,
    /// Generation of the last local key change written to Redis.
    flushed: u64,
    conn_ops: VecDeque<(u64, bool)>,
    reregister: bool,
    /// Check, after a (re)connect or when the marker changed, whether Redis lost the keys
    /// ([`Worker::seed_keys`]).
    seed: bool,
    /// The key hash's marker (its epoch) this node last synced with; `None` before the first
    /// sync of a node that never synced (no [`EPOCH_FILE`]).
    epoch: Option<String>,
    /// [`EPOCH_FILE`] in `state_dir`.
    epoch_file: PathBuf,
    /// The epoch last written to (or read from) [`EPOCH_FILE`].
    saved_epoch: Option<String>,
    /// Writing [`EPOCH_FILE`] failed and was logged (once until it works again).
    epoch_unsaved: bool,
    /// Load, after a (re)connect, the counters of this period that other nodes made.
    preload: bool,
    keys_dirty: bool,
    last_keys: Instant,
    last_beat: Option<Instant>,
    quota: HashMap<CounterId, QuotaSync>,
    forwards: HashMap<u64, (Sender<(u16, String)>, Instant)>,
    next_req: u64,
    last_error_log: Option<Instant>,
    /// The process is stopping (its liveness key was deleted).
    leaving: bool,
    /// [`Msg::Stop`] came: exit after a last sync.
    stop: bool,
}

impl Worker {
    fn new(
        client: redis::Client,
        url: String,
        node: String,
        shared: Weak<Shared>,
        epoch_file: PathBuf,
        epoch: Option<String>,
    ) -> Worker {
        Worker {
            events: events_channel(&client),
            client,
            url,
            node,
            shared,
            con: None,
            outage: false,
            refusal_logged: false,
            connected_once: false,
            next_try: Instant::now(),
            backoff_ms: 100,
            keys: VecDeque::new(),
            flushed: 0,
            conn_ops: VecDeque::new(),
            reregister: true,
            seed: true,
            saved_epoch: epoch.clone(),
            epoch_unsaved: false,
            epoch,
            epoch_file,
            preload: true,
            keys_dirty: true,
            last_keys: Instant::now(),
            last_beat: None,
            quota: HashMap::new(),
            forwards: HashMap::new(),
            next_req: 1,
            last_error_log: None,
            leaving: false,
            stop: false,
        }
    }

    /// The counts loaded from `state_dir` at start are cluster-wide counts a sync read
    /// (this node's earlier process wrote them; its share is in Redis under its old node id):
    /// they count as already synced, so only what this process counts is written as its share.
    /// If Redis no longer holds them (it lost its data), the first sync writes the difference
    /// as this node's share ([`REPAIR_SCRIPT`]).
    fn anchor_loaded_counts(&mut self) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let now = unix_now();
        for (id, c) in shared.usage.snapshot() {
            let Some(period) = Period::parse(id.2) else {
                continue;
            };
            let idx = period.index(now);
            let anchor = used_in(c.load(Ordering::Relaxed), idx);
            self.quota.insert(
                id,
                QuotaSync {
                    idx,
                    anchor,
                    ..Default::default()
                },
            );
        }
    }

    fn run(mut self, rx: Receiver<Msg>) {
        let tick = Duration::from_millis(SYNC_MS);
        let mut next_tick = Instant::now();
        loop {
            let Some(shared) = self.shared.upgrade() else {
                return;
            };
            let wait = next_tick.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(m) => {
                    self.handle(&shared, m);
                    while let Ok(m) = rx.try_recv() {
                        self.handle(&shared, m);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if self.stop {
                // The last counts of this node, then leave; the message on this node's
                // channel wakes the subscriber, which sees it is stopping.
                self.tick(&shared);
                if !self.leaving {
                    self.leaving = true;
                    let key = format!("ringgate:alive:{}", self.node);
                    let _ = self.call(|con| redis::cmd("DEL").arg(key).query::<i64>(con));
                }
                let mine = format!("ringgate:node:{}", self.node);
                let _ = self.call(|con| {
                    redis::cmd("PUBLISH")
                        .arg(mine)
                        .arg("stop")
                        .query::<i64>(con)
                });
                return;
            }
            if Instant::now() >= next_tick {
                self.tick(&shared);
                next_tick = Instant::now() + tick;
            }
            if shared.shutdown.load(Ordering::Relaxed) && !self.leaving {
                // Stopping: other nodes answer 410 for our connections at once.
                self.leaving = true;
                let key = format!("ringgate:alive:{}", self.node);
                let _ = self.call(|con| redis::cmd("DEL").arg(key).query::<i64>(con));
            }
        }
    }

    fn handle(&mut self, shared: &Shared, m: Msg) {
        match m {
            Msg::Key(k, generation) => {
                if self.keys.len() < MAX_QUEUED {
                    self.keys.push_back((k, generation));
                } else {
                    // Stays a local change only.
                    crate::elog!("ringgate: cluster: too many key changes waiting for redis; one kept on this node only");
                    self.flushed = self.flushed.max(generation);
                }
                self.flush_keys();
            }
            Msg::Reserve(name, json, reply) => {
                let _ = reply.send(self.reserve(&name, &json));
            }
            Msg::ConnOpened(id) => self.conn_op(id, true),
            Msg::ConnClosed(id) => self.conn_op(id, false),
            Msg::Forward {
                method,
                id,
                body,
                reply,
            } => {
                let r = self.forward(&method, &id, &body, &reply);
                if let Some(r) = r {
                    let _ = reply.send(r);
                }
            }
            Msg::Invalidate(body) => {
                let mut p = serde_json::json!({ "t": "cache", "from": self.node })
                    .to_string()
                    .into_bytes();
                p.push(b'\n');
                p.extend_from_slice(&body);
                let events = self.events.clone();
                self.call(|con| redis::cmd("PUBLISH").arg(events).arg(p).query::<i64>(con));
            }
            Msg::SyncNow(done) => {
                self.sync_quotas(shared);
                let _ = done.send(());
            }
            Msg::Inbound(p) => self.inbound(shared, &p),
            Msg::Resubscribed => self.keys_dirty = true,
            Msg::Stop => self.stop = true,
        }
    }

    /// Runs `f` on the connection; an error drops it (logged once per outage).
    fn call<T>(
        &mut self,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Option<T> {
        let con = self.con.as_mut()?;
        match f(con) {
            Ok(v) => Some(v),
            Err(e) => {
                self.failed(e);
                None
            }
        }
    }

    fn failed(&mut self, e: redis::RedisError) {
        if e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_unrecoverable_error()
            || refused_auth(&e)
        {
            self.con = None;
            self.next_try = Instant::now() + Duration::from_millis(self.backoff_ms);
            if !self.outage {
                crate::elog!(
                    "ringgate: cluster: lost redis at {} ({}); serving with local state, reconnecting",
                    self.url,
                    describe(&e)
                );
                self.outage = true;
            }
        } else if self
            .last_error_log
            .is_none_or(|t| t.elapsed() > Duration::from_secs(60))
        {
            crate::elog!("ringgate: cluster: redis error: {e}");
            self.last_error_log = Some(Instant::now());
        }
    }

    fn connect(&mut self) {
        // A Redis that answers the first command with an error (a password missing from the
        // URL or wrong, a user without rights) is as unusable as an unreachable one.
        let con = self
            .client
            .get_connection_with_timeout(IO_TIMEOUT)
            .and_then(|mut c| {
                c.set_read_timeout(Some(IO_TIMEOUT))?;
                c.set_write_timeout(Some(IO_TIMEOUT))?;
                redis::cmd("PING").query::<String>(&mut c)?;
                Ok(c)
            });
        match con {
            Ok(c) => {
                self.con = Some(c);
                self.backoff_ms = 100;
                if self.outage {
                    crate::elog!(
                        "ringgate: cluster: redis at {} is back; resyncing",
                        self.url
                    );
                } else if !self.connected_once {
                    crate::elog!(
                        "ringgate: cluster: node {} joined through redis at {}",
                        self.node,
                        self.url
                    );
                }
                self.outage = false;
                self.refusal_logged = false;
                self.connected_once = true;
                // Resync: keys reloaded (and written back if Redis lost them), connections
                // registered again, every quota share written again.
                self.keys_dirty = true;
                self.reregister = true;
                self.seed = true;
                self.preload = true;
                self.last_beat = None;
                for q in self.quota.values_mut() {
                    q.written = false;
                }
            }
            Err(e) => {
                let refused = refused_auth(&e);
                let hint = if refused {
                    " (check the user and password in cluster.redis)"
                } else {
                    ""
                };
                if !self.outage {
                    crate::elog!(
                        "ringgate: cluster: redis at {} unreachable ({}){hint}; serving with local state, retrying",
                        self.url,
                        describe(&e)
                    );
                    self.outage = true;
                    self.refusal_logged = refused;
                } else if refused && !self.refusal_logged {
                    // An outage that began as a lost connection (Redis restarted with a new
                    // password): say once why the node still cannot get back.
                    crate::elog!(
                        "ringgate: cluster: redis at {} refuses this node ({}){hint}; still retrying",
                        self.url,
                        describe(&e)
                    );
                    self.refusal_logged = true;
                }
                self.next_try = Instant::now() + Duration::from_millis(self.backoff_ms);
                self.backoff_ms = (self.backoff_ms * 2).min(BACKOFF_MAX_MS);
            }
        }
    }

    fn tick(&mut self, shared: &Shared) {
        let now = Instant::now();
        self.forwards.retain(|_, (tx, deadline)| {
            if now >= *deadline {
                let _ = tx.send(timed_out());
                false
            } else {
                true
            }
        });
        if self.con.is_none() && now >= self.next_try {
            self.connect();
        }
        if self.con.is_none() {
            return;
        }
        if !self.leaving
            && self
                .last_beat
                .is_none_or(|t| t.elapsed() >= Duration::from_millis(HEARTBEAT_MS))
        {
            let key = format!("ringgate:alive:{}", self.node);
            // With it, the key hash's marker: a Redis that lost its data without dropping the
            // connection (`FLUSHALL`) is noticed within a heartbeat.
            let marker = self.call(|con| {
                let ((), marker): ((), Option<String>) = redis::pipe()
                    .cmd("SET")
                    .arg(&key)
                    .arg(1)
                    .arg("PX")
                    .arg(ALIVE_TTL_MS)
                    .cmd("HGET")
                    .arg(KEYS_HASH)
                    .arg(KEYS_MARKER)
                    .query(con)?;
                Ok(marker)
            });
            if let Some(marker) = marker {
                self.last_beat = Some(Instant::now());
                // A write of the epoch file that failed is retried once a heartbeat.
                self.save_epoch();
                if self.epoch.is_some() && marker != self.epoch {
                    self.seed = true;
                }
            }
        }
        if self.seed {
            self.seed_keys(shared);
        }
        self.flush_keys();
        if self.reregister {
            self.register_all(shared);
        }
        self.flush_conn_ops();
        if self.keys_dirty || self.last_keys.elapsed() >= Duration::from_millis(KEYS_RELOAD_MS) {
            self.reload_keys(shared);
        }
        if self.preload {
            self.preload_quotas(shared);
        }
        self.sync_quotas(shared);
    }

    /// After a (re)connect: makes a local counter for every quota counter of the current
    /// period in Redis, so this node knows keys it has not served yet before their first
    /// request here (at most [`MAX_PRELOAD`] counters).
    fn preload_quotas(&mut self, shared: &Shared) {
        let gw = shared.current();
        let plans = &gw.config.traffic.plans.plans;
        if !plans.iter().any(|p| p.quota.is_some()) {
            self.preload = false;
            return;
        }
        let now = unix_now();
        let mut cursor = 0u64;
        let mut seen = 0usize;
        loop {
            let Some((next, keys)) = self.call(|con| {
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg("ringgate:quota:*")
                    .arg("COUNT")
                    .arg(1000)
                    .query::<(u64, Vec<String>)>(con)
            }) else {
                return;
            };
            for k in keys {
                // ringgate:quota:{plan}:{period}:{index}:{key}; key names hold no `:`.
                let Some(rest) = k.strip_prefix("ringgate:quota:") else {
                    continue;
                };
                let mut it = rest.rsplitn(4, ':');
                let (Some(key), Some(idx), Some(period), Some(plan)) =
                    (it.next(), it.next(), it.next(), it.next())
                else {
                    continue;
                };
                let Some(period) = Period::parse(period) else {
                    continue;
                };
                let known = plans
                    .iter()
                    .any(|p| &*p.name == plan && p.quota.is_some_and(|q| q.period == period));
                if known && idx.parse::<u32>().ok() == Some(period.index(now)) {
                    shared.usage.counter(plan, key, period);
                    seen += 1;
                }
            }
            cursor = next;
            if cursor == 0 || seen >= MAX_PRELOAD {
                break;
            }
        }
        self.preload = false;
    }

    /// After a (re)connect, and whenever the key hash's marker is not the epoch this node last
    /// synced with: decides whether the hash still holds what this node synced with.
    ///
    /// The marker field holds an epoch, a random id made by the node that initialised the
    /// hash. Same epoch: the hash is the one this node knows, and a key missing from it was
    /// deleted. No marker (a new cluster, or a Redis that lost its data) or another epoch than
    /// this node's (Redis lost its data and another node initialised the hash again meanwhile):
    /// this node writes its known keys back without overwriting any field (a merge), then
    /// adopts the hash's epoch. The epoch is kept in [`EPOCH_FILE`] too, so a node restarted
    /// meanwhile merges the keys of its `state_dir` alike. A node that never synced (no epoch
    /// file) just adopts the epoch it finds. Done before the queued changes are written.
    fn seed_keys(&mut self, shared: &Shared) {
        let entries = shared.auth.admin_entries();
        let mine = self.epoch.clone();
        let fresh = new_epoch(&self.node);
        let events = self.events.clone();
        let ev = serde_json::json!({ "t": "keys", "from": self.node }).to_string();
        let res = self.call(|con| {
            let cur: Option<String> = redis::cmd("HGET")
                .arg(KEYS_HASH)
                .arg(KEYS_MARKER)
                .query(con)?;
            let write_back = match (&cur, &mine) {
                (None, _) => true,
                (Some(c), Some(m)) => c != m,
                (Some(_), None) => false,
            };
            if !write_back {
                return Ok((cur, false));
            }
            let mut p = redis::pipe();
            // Two nodes initialising at once: the first marker stays, both merge their keys.
            p.cmd("HSETNX")
                .arg(KEYS_HASH)
                .arg(KEYS_MARKER)
                .arg(&fresh)
                .ignore();
            for (name, json) in &entries {
                p.cmd("HSETNX").arg(KEYS_HASH).arg(name).arg(json).ignore();
            }
            if !entries.is_empty() {
                // The other nodes reload at once rather than at their next periodic reload.
                p.cmd("PUBLISH").arg(&events).arg(&ev).ignore();
            }
            p.cmd("HGET").arg(KEYS_HASH).arg(KEYS_MARKER);
            let (now,): (Option<String>,) = p.query(con)?;
            Ok((now, true))
        });
        // Unreachable, or emptied again in between: checked again on the next tick.
        let Some((Some(epoch), wrote)) = res else {
            return;
        };
        if wrote && mine.is_some() {
            // Redis lost its data since this node last synced: everything else is written
            // again too (connections, quota shares, counters of other nodes).
            crate::elog!(
                "ringgate: cluster: redis at {} lost the cluster's data; merged this node's {} admin-added keys back into it",
                self.url,
                entries.len()
            );
            self.reregister = true;
            self.preload = true;
            for q in self.quota.values_mut() {
                q.written = false;
            }
        }
        self.epoch = Some(epoch);
        self.seed = false;
        self.keys_dirty = true;
        self.save_epoch();
    }

    /// Keeps the epoch this node synced with in [`EPOCH_FILE`] (when it changed). A failure is
    /// logged once and retried every heartbeat; the node carries on with the epoch in memory.
    fn save_epoch(&mut self) {
        let Some(epoch) = self.epoch.clone() else {
            return;
        };
        if self.saved_epoch.as_ref() == Some(&epoch) || !valid_epoch(&epoch) {
            return;
        }
        match save_epoch(&self.epoch_file, &epoch) {
            Ok(()) => {
                if self.epoch_unsaved {
                    crate::elog!("ringgate: cluster: wrote {}", self.epoch_file.display());
                }
                self.saved_epoch = Some(epoch);
                self.epoch_unsaved = false;
            }
            Err(e) => {
                if !self.epoch_unsaved {
                    crate::elog!(
                        "ringgate: cluster: cannot write {}: {e}; retrying (until it is written, a restart of this node forgets the epoch it synced with)",
                        self.epoch_file.display()
                    );
                }
                self.epoch_unsaved = true;
            }
        }
    }

    /// Writes a key added on this node (its stored form `json`) to the cluster's set, unless a
    /// key there has its name or value: read, checked and written in one transaction (`WATCH`,
    /// so two nodes adding at once cannot both succeed). The queued change that follows the
    /// addition then finds it written.
    fn reserve(&mut self, name: &str, json: &str) -> Reservation {
        // Earlier changes first. With some still waiting, or the keys not merged since a
        // reconnect, what the cluster holds is not known yet.
        self.flush_keys();
        if self.con.is_none() || self.seed || !self.keys.is_empty() {
            return Reservation::Unknown;
        }
        self.call(|con| {
            redis::transaction(con, &[KEYS_HASH], |con, pipe| {
                let all: HashMap<String, Vec<u8>> =
                    redis::cmd("HGETALL").arg(KEYS_HASH).query(con)?;
                let entries = all.iter().map(|(k, v)| (k.as_str(), v.as_slice()));
                if let Some(taken) = crate::policy::auth::clash(entries, name, json) {
                    return Ok(Some(taken));
                }
                // `None` when another node changed the set meanwhile: read and check again.
                let written: Option<(i64,)> = pipe.hset(KEYS_HASH, name, json).query(con)?;
                Ok(written.map(|_| Reservation::Done))
            })
        })
        .unwrap_or(Reservation::Unknown)
    }

    /// Writes the queued key changes, oldest first.
    fn flush_keys(&mut self) {
        while let Some((k, generation)) = self.keys.front().cloned() {
            if self.con.is_none() || self.seed {
                return;
            }
            let node = self.node.clone();
            let ev = serde_json::json!({ "t": "keys", "from": node }).to_string();
            let events = self.events.clone();
            let done = match &k {
                KeyChange::Put { name, json } => self.call(|con| {
                    // The marker is left alone: a hash emptied meanwhile gets no marker
                    // here, so every node sees it was emptied and writes its keys back.
                    let (added, cur): (i64, Option<String>) = redis::pipe()
                        .cmd("HSETNX")
                        .arg(KEYS_HASH)
                        .arg(name)
                        .arg(json)
                        .cmd("HGET")
                        .arg(KEYS_HASH)
                        .arg(name)
                        .query(con)?;
                    if added == 0 && cur.as_deref() != Some(json.as_str()) {
                        crate::elog!(
                            "ringgate: cluster: key `{name}` was also added on another node; the cluster keeps that one"
                        );
                    }
                    redis::cmd("PUBLISH").arg(&events).arg(&ev).query::<i64>(con)
                }),
                KeyChange::Delete(name) => self.call(|con| {
                    redis::cmd("HDEL").arg(KEYS_HASH).arg(name).query::<i64>(con)?;
                    redis::cmd("PUBLISH").arg(&events).arg(&ev).query::<i64>(con)
                }),
            };
            if done.is_none() {
                return;
            }
            self.keys.pop_front();
            self.flushed = self.flushed.max(generation);
            self.keys_dirty = true;
        }
    }

    /// Loads the cluster's keys into this node's key set.
    fn reload_keys(&mut self, shared: &Shared) {
        if !self.keys.is_empty() || self.seed {
            return;
        }
        // Not while a key is being added: it may be in Redis and not yet here.
        let Some(_adds) = shared.auth.hold_adds() else {
            return;
        };
        // Only once every local change is in Redis (else the set read could undo one).
        let generation = shared.auth.admin_generation();
        if generation != self.flushed {
            return;
        }
        let all = self.call(|con| {
            redis::cmd("HGETALL")
                .arg(KEYS_HASH)
                .query::<HashMap<String, Vec<u8>>>(con)
        });
        let Some(all) = all else { return };
        // Only a hash of the epoch this node synced with tells deletions by missing keys.
        let marker = all
            .get(KEYS_MARKER)
            .map(|v| String::from_utf8_lossy(v).into_owned());
        if marker.is_none() || marker != self.epoch {
            self.seed = true;
            self.seed_keys(shared);
            return;
        }
        let values: Vec<Vec<u8>> = all
            .into_iter()
            .filter(|(k, _)| k != KEYS_MARKER)
            .map(|(_, v)| v)
            .collect();
        // A local change made meanwhile is on its way to Redis: read again after it.
        if shared.auth.replace_admin(&values, generation) {
            self.keys_dirty = false;
            self.last_keys = Instant::now();
        }
    }

    fn conn_op(&mut self, id: u64, open: bool) {
        if self.conn_ops.len() < MAX_QUEUED {
            self.conn_ops.push_back((id, open));
        } else {
            self.reregister = true;
        }
        self.flush_conn_ops();
    }

    fn flush_conn_ops(&mut self) {
        if self.con.is_none() || self.conn_ops.is_empty() {
            return;
        }
        let ops: Vec<(u64, bool)> = self.conn_ops.iter().copied().collect();
        let node = self.node.clone();
        let ok = self.call(|con| {
            let mut p = redis::pipe();
            for (id, open) in &ops {
                let id = crate::ws::api::id_string(*id);
                if *open {
                    p.cmd("HSET").arg(CONNS_HASH).arg(id).arg(&node).ignore();
                } else {
                    p.cmd("HDEL").arg(CONNS_HASH).arg(id).ignore();
                }
            }
            p.query::<()>(con)
        });
        if ok.is_some() {
            self.conn_ops.clear();
        }
    }

    fn register_all(&mut self, shared: &Shared) {
        let ids = shared.ws.ids();
        let node = self.node.clone();
        let ok = self.call(|con| {
            if ids.is_empty() {
                return Ok(());
            }
            let mut p = redis::pipe();
            for id in &ids {
                p.cmd("HSET")
                    .arg(CONNS_HASH)
                    .arg(crate::ws::api::id_string(*id))
                    .arg(&node)
                    .ignore();
            }
            p.query::<()>(con)
        });
        if ok.is_some() {
            self.reregister = false;
        }
    }

    /// Sends a `@connections` call to the node holding `id`; `None` when the answer will come
    /// later (from that node).
    fn forward(
        &mut self,
        method: &str,
        id: &str,
        body: &[u8],
        reply: &Sender<(u16, String)>,
    ) -> Option<(u16, String)> {
        if self.con.is_none() {
            return Some((
                503,
                message("the cluster store is unreachable: cannot find the connection's node"),
            ));
        }
        let owner = self.call(|con| {
            redis::cmd("HGET")
                .arg(CONNS_HASH)
                .arg(id)
                .query::<Option<String>>(con)
        });
        let Some(owner) = owner else {
            return Some((503, message("the cluster store is unreachable")));
        };
        let Some(owner) = owner else {
            return Some(gone());
        };
        let alive = owner != self.node
            && self
                .call(|con| {
                    redis::cmd("EXISTS")
                        .arg(format!("ringgate:alive:{owner}"))
                        .query::<i64>(con)
                })
                .unwrap_or(0)
                == 1;
        if !alive {
            // A connection of a node that is gone (or a stale entry of ours).
            let _ = self.call(|con| redis::cmd("HDEL").arg(CONNS_HASH).arg(id).query::<i64>(con));
            return Some(gone());
        }
        let req = self.next_req;
        self.next_req += 1;
        let mut p = serde_json::json!({
            "t": "req", "from": self.node, "req": req, "method": method, "id": id,
        })
        .to_string()
        .into_bytes();
        p.push(b'\n');
        p.extend_from_slice(body);
        let heard = self.call(|con| {
            redis::cmd("PUBLISH")
                .arg(format!("ringgate:node:{owner}"))
                .arg(p)
                .query::<i64>(con)
        });
        match heard {
            Some(n) if n > 0 => {
                self.forwards
                    .insert(req, (reply.clone(), Instant::now() + FORWARD_TIMEOUT));
                None
            }
            _ => Some((
                503,
                message("the node holding the connection is not reachable"),
            )),
        }
    }

    fn inbound(&mut self, shared: &Shared, p: &[u8]) {
        let nl = p.iter().position(|&b| b == b'\n').unwrap_or(p.len());
        let Ok(head) = serde_json::from_slice::<serde_json::Value>(&p[..nl]) else {
            return;
        };
        let body = p.get(nl + 1..).unwrap_or(&[]);
        let from = head["from"].as_str().unwrap_or("");
        match head["t"].as_str() {
            Some("keys") if from != self.node => self.keys_dirty = true,
            Some("cache") if from != self.node => {
                let _ = crate::cache::admin_invalidate(shared, body);
            }
            Some("quota") if from != self.node => {
                // Another node counts a key this node may not have served yet: sync it from
                // now on (as [`Worker::preload_quotas`] does after a connect).
                let (Some(plan), Some(key), Some(period)) = (
                    head["plan"].as_str(),
                    head["key"].as_str(),
                    head["period"].as_str().and_then(Period::parse),
                ) else {
                    return;
                };
                let gw = shared.current();
                let known = gw
                    .config
                    .traffic
                    .plans
                    .plans
                    .iter()
                    .any(|p| &*p.name == plan && p.quota.is_some_and(|q| q.period == period));
                if known && shared.usage.len() < MAX_PRELOAD {
                    shared.usage.counter(plan, key, period);
                }
            }
            Some("req") => {
                let (Some(req), Some(method), Some(id)) = (
                    head["req"].as_u64(),
                    head["method"].as_str(),
                    head["id"].as_str(),
                ) else {
                    return;
                };
                let (status, answer) = crate::ws::api::admin_local(shared, method, id, body);
                if status == 410 {
                    let node = self.node.clone();
                    let _ = self.call(|con| {
                        // Drop the entry only if it still names this node.
                        let cur: Option<String> =
                            redis::cmd("HGET").arg(CONNS_HASH).arg(id).query(con)?;
                        if cur.as_deref() == Some(node.as_str()) {
                            redis::cmd("HDEL")
                                .arg(CONNS_HASH)
                                .arg(id)
                                .query::<i64>(con)?;
                        }
                        Ok(())
                    });
                }
                let rep = serde_json::json!({
                    "t": "rep", "from": self.node, "req": req, "status": status, "body": answer,
                })
                .to_string();
                let ch = format!("ringgate:node:{from}");
                let _ = self.call(|con| redis::cmd("PUBLISH").arg(ch).arg(rep).query::<i64>(con));
            }
            Some("rep") => {
                let (Some(req), Some(status)) = (head["req"].as_u64(), head["status"].as_u64())
                else {
                    return;
                };
                if let Some((tx, _)) = self.forwards.remove(&req) {
                    let body = head["body"].as_str().unwrap_or("").to_string();
                    let _ = tx.send((status.min(599) as u16, body));
                }
            }
            _ => {}
        }
    }

    /// Writes this node's share of every quota counter and reads the cluster-wide counts.
    ///
    /// A counter whose hash holds less than this node knows (a share it last read is lower or
    /// gone, or the sum is below the node's count: Redis lost its data) is repaired with
    /// [`REPAIR_SCRIPT`] before its local count is set: the local count never goes down
    /// because Redis says less.
    fn sync_quotas(&mut self, shared: &Shared) {
        let snap = shared.usage.snapshot();
        if snap.is_empty() || self.con.is_none() {
            return;
        }
        let now = unix_now();
        let mut p = redis::pipe();
        let mut items = Vec::with_capacity(snap.len());
        for (id, c) in snap {
            let Some(period) = Period::parse(id.2) else {
                continue;
            };
            let idx = period.index(now);
            let seen = used_in(c.load(Ordering::Relaxed), idx);
            let st = self.quota.entry(id.clone()).or_default();
            if st.idx != idx {
                *st = QuotaSync {
                    idx,
                    ..Default::default()
                };
            }
            let own = st.own + seen.saturating_sub(st.anchor);
            let rkey = format!("ringgate:quota:{}:{}:{idx}:{}", id.0, id.2, id.1);
            let end = (period.bounds(idx).1.max(0) as u64) * 86_400 + 86_400;
            if own != st.own || (!st.written && own > 0) {
                p.cmd("HSET").arg(&rkey).arg(&self.node).arg(own).ignore();
                p.cmd("EXPIREAT").arg(&rkey).arg(end).ignore();
            }
            if own > 0 && !st.announced {
                // The other nodes start syncing this counter now, before their own first
                // request for the key: else they would admit against a count of 0.
                st.announced = true;
                let msg = serde_json::json!({
                    "t": "quota", "from": self.node, "plan": &*id.0, "key": &*id.1, "period": id.2,
                })
                .to_string();
                p.cmd("PUBLISH").arg(&self.events).arg(msg).ignore();
            }
            p.cmd("HGETALL").arg(&rkey);
            items.push(SyncItem {
                id,
                c,
                idx,
                seen,
                own,
                rkey,
                end,
            });
        }
        let Some(res) = self.call(|con| p.query::<Vec<HashMap<String, String>>>(con)) else {
            return;
        };
        let mut repairs = Vec::new();
        for (item, fields) in items.into_iter().zip(res) {
            let (mine, others) = self.split_shares(fields);
            let Some(st) = self.quota.get_mut(&item.id) else {
                continue;
            };
            let total = item.own.saturating_add(sum(&others));
            let lost = mine < item.own
                || total < item.seen
                || st
                    .others
                    .iter()
                    .any(|(k, v)| others.get(k).is_none_or(|now| now < v));
            if lost {
                repairs.push((item, others));
            } else {
                settle(st, &item, item.own, others);
            }
        }
        if !repairs.is_empty() {
            self.repair_quotas(repairs);
        }
    }

    /// This node's share and the other nodes' shares in a counter's hash.
    fn split_shares(&self, fields: HashMap<String, String>) -> (u64, HashMap<String, u64>) {
        let mut mine = 0;
        let mut others = HashMap::with_capacity(fields.len());
        for (k, v) in fields {
            let Ok(v) = v.parse::<u64>() else { continue };
            if k == self.node {
                mine = v;
            } else {
                others.insert(k, v);
            }
        }
        (mine, others)
    }

    /// Writes back what Redis lost of these counters ([`REPAIR_SCRIPT`], one atomic call per
    /// counter) and sets their local counts from the repaired hashes. `items` come with the
    /// other shares just read. A Redis that refuses the script (an ACL without scripting):
    /// the counts are set from what was read and what this node knew, never lower, and the
    /// repair is tried again at the next sync.
    fn repair_quotas(&mut self, items: Vec<(SyncItem, HashMap<String, u64>)>) {
        let sha = self.call(|con| {
            redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(REPAIR_SCRIPT)
                .query::<String>(con)
        });
        let res = sha.and_then(|sha| self.run_repairs(&sha, &items));
        match res {
            Some(res) => {
                for ((item, _), fields) in items.into_iter().zip(res) {
                    let (mine, others) = self.split_shares(fields);
                    if let Some(st) = self.quota.get_mut(&item.id) {
                        settle(st, &item, item.own.max(mine), others);
                    }
                }
            }
            // Lost the connection: everything is synced again after the reconnect.
            None if self.con.is_none() => {}
            None => {
                for (item, mut others) in items {
                    if let Some(st) = self.quota.get_mut(&item.id) {
                        for (k, v) in &st.others {
                            let cur = others.entry(k.clone()).or_default();
                            *cur = (*cur).max(*v);
                        }
                        settle(st, &item, item.own, others);
                    }
                }
            }
        }
    }

    /// [`REPAIR_SCRIPT`] (loaded as `sha`) for every item, in one pipeline: the repaired hashes.
    fn run_repairs(
        &mut self,
        sha: &str,
        items: &[(SyncItem, HashMap<String, u64>)],
    ) -> Option<Vec<HashMap<String, String>>> {
        let mut p = redis::pipe();
        for (it, _) in items {
            p.cmd("EVALSHA")
                .arg(sha)
                .arg(1)
                .arg(&it.rkey)
                .arg(&self.node)
                .arg(it.own)
                .arg(it.seen)
                .arg(it.end);
            if let Some(st) = self.quota.get(&it.id) {
                for (k, v) in &st.others {
                    p.arg(k).arg(*v);
                }
            }
        }
        self.call(|con| p.query::<Vec<HashMap<String, String>>>(con))
    }
}

/// Repairs one quota counter's hash after Redis lost data (atomic, so nodes repairing at once
/// see each other's writes). `KEYS[1]`: the hash. `ARGV`: this node's id, its share, the count
/// it knows, the expiry (unix seconds), then field/value pairs: the other shares it last read.
/// Every share is raised to at least what this node knows of it (lost shares of live nodes,
/// and of earlier runs of restarted ones, come back once, not once per node); then, if the sum
/// is still below the node's count (counts it loaded from `state_dir`, whose split it never
/// read), its own share is raised by the difference. Returns the hash.
const REPAIR_SCRIPT: &str = r"
local h = KEYS[1]
local function num(v) return tonumber(v) or 0 end
local function at_least(f, v)
  if num(redis.call('HGET', h, f)) < tonumber(v) then redis.call('HSET', h, f, v) end
end
for i = 5, #ARGV, 2 do at_least(ARGV[i], ARGV[i + 1]) end
at_least(ARGV[1], ARGV[2])
local all = redis.call('HGETALL', h)
local sum = 0
for i = 2, #all, 2 do sum = sum + num(all[i]) end
local short = tonumber(ARGV[3]) - sum
if short > 0 then
  local mine = num(redis.call('HGET', h, ARGV[1])) + short
  redis.call('HSET', h, ARGV[1], string.format('%d', mine))
  all = redis.call('HGETALL', h)
end
redis.call('EXPIREAT', h, ARGV[4])
return all
";

/// One counter in a sync.
struct SyncItem {
    id: CounterId,
    c: Arc<std::sync::atomic::AtomicU64>,
    idx: u32,
    /// The local count when the sync began.
    seen: u64,
    /// This node's share as written.
    own: u64,
    /// Its hash in Redis, and when that expires (unix seconds).
    rkey: String,
    end: u64,
}

fn sum(shares: &HashMap<String, u64>) -> u64 {
    shares.values().fold(0u64, |a, b| a.saturating_add(*b))
}

/// Sets a counter's local count from a sync (never below what it was) and records the shares.
fn settle(st: &mut QuotaSync, it: &SyncItem, own: u64, others: HashMap<String, u64>) {
    let global = own.saturating_add(sum(&others)).max(it.seen);
    rebase(&it.c, it.idx, it.seen, global);
    st.own = own;
    st.anchor = global;
    st.written = true;
    st.others = others;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact("redis://u:secret@h:1/0"), "redis://***@h:1/0");
        assert_eq!(redact("redis://h:6379"), "redis://h:6379");
    }

    fn check(url: &str) -> Result<ClusterConfig, ConfigError> {
        let text = format!("[cluster]\nredis = \"{url}\"\n");
        let raw: crate::config::raw::RawConfig = toml::from_str(&text).unwrap();
        let src = Source {
            path: std::path::Path::new("c.toml"),
            text: &text,
        };
        validate(&src, raw.cluster.as_ref().unwrap())
    }

    #[test]
    fn epoch_file_round_trip_and_bad_files() {
        let dir = std::env::temp_dir().join(format!(
            "ringgate-epoch-unit-{}-{:x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let path = dir.join(EPOCH_FILE);
        assert_eq!(load_epoch(&path).unwrap(), None, "no file: a new node");
        let e = new_epoch("0123456789abcdef");
        save_epoch(&path, &e).unwrap();
        assert_eq!(load_epoch(&path).unwrap(), Some(e.clone()));
        assert!(!dir.join("cluster-epoch.json.tmp").exists());
        save_epoch(&path, "other-epoch").unwrap();
        assert_eq!(load_epoch(&path).unwrap().as_deref(), Some("other-epoch"));
        for bad in [
            "{ not json",
            "",
            r#"{"version":2,"epoch":"x"}"#,
            r#"{"version":1,"epoch":""}"#,
            r#"{"version":1,"epoch":"a b"}"#,
            r#"{"version":1}"#,
            r#"{"version":1,"epoch":"x","more":1}"#,
        ] {
            std::fs::write(&path, bad).unwrap();
            let err = load_epoch(&path).unwrap_err();
            assert!(
                err.contains(&path.display().to_string()) && err.contains("epoch"),
                "{bad}: {err}"
            );
        }
        let long = format!(
            r#"{{"version":1,"epoch":"{}"}}"#,
            "x".repeat(MAX_EPOCH_LEN + 1)
        );
        std::fs::write(&path, long).unwrap();
        assert!(load_epoch(&path).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn urls_validated() {
        assert!(check("redis://127.0.0.1:6379").is_ok());
        assert!(check("redis://127.0.0.1:6379/2").is_ok());
        assert!(check("unix:///run/redis.sock").is_ok());
        let e = check("http://x").unwrap_err().to_string();
        assert!(e.starts_with("c.toml:2: key `cluster.redis`"), "{e}");
        let e = check("redis://:pw@host:notaport").unwrap_err().to_string();
        assert!(e.contains("cluster.redis") && !e.contains("pw"), "{e}");
    }
}
