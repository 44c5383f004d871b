//! Upstreams: target health shared by all workers (active and passive checks), per-worker
//! keep-alive pools, balancing, and the active health checker.
//!
//! Health is the only upstream state shared across threads (atomics per target, kept across
//! reloads by address). Pools, round-robin cursors and in-flight counts are per worker:
//! nothing here takes a lock on the request path.

use crate::config::{Balance, PassiveConfig, UpstreamConfig};
use crate::http::client::{self, ResponseReader};
use crate::http::Method;
use crate::metrics::Labels;
use crate::policy::throttle::now_ns;
use ahash::AHashMap;
use monoio::buf::{IoBufMut, SliceMut};
use monoio::net::{DetachedRecv, RecvHeld, TcpStream};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Health of one target, shared by all workers and the checker.
#[derive(Debug)]
pub struct TargetHealth {
    healthy: AtomicBool,
    /// Consecutive probe failures (or successes while unhealthy).
    streak: AtomicU32,
    /// Passive checks: requests failed in a row (connect errors, timeouts, resets, invalid
    /// answers), by every worker.
    fails: AtomicU32,
    /// Passive checks: the target is out until this time ([`now_ns`]); 0 = never was, or back
    /// in since. Past it, one request tries the target ([`TargetHealth::admit`]).
    out_until: AtomicU64,
    /// Passive checks: a request is trying the target after its time out.
    trial: AtomicBool,
    /// Connections in use by requests now, by every worker: counted for an upstream with
    /// `max_connections` or a balance that compares loads (`least_conn`, `random2`).
    active: AtomicU32,
}

/// What a failed request did to a target's passive state ([`TargetHealth::failed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failed {
    /// Not enough failures in a row yet, or out already.
    Counted,
    /// The failure put the target out.
    WentOut,
    /// The request that tried the target after its time out failed: out again.
    TrialFailed,
}

impl TargetHealth {
    fn new() -> Self {
        TargetHealth {
            healthy: AtomicBool::new(true),
            streak: AtomicU32::new(0),
            fails: AtomicU32::new(0),
            out_until: AtomicU64::new(0),
            trial: AtomicBool::new(false),
            active: AtomicU32::new(0),
        }
    }

    /// Whether the active health checker lets requests go to this target.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Whether passive checks keep the target out now (its time out not over). Reads the
    /// clock only for a target that has been out.
    pub fn is_out(&self) -> bool {
        let until = self.out_until.load(Ordering::Relaxed);
        until != 0 && now_ns() < until
    }

    /// Whether passive checks put the target out and no answer has brought it back yet (its
    /// time out may be over, waiting for a request to try it).
    pub fn out_or_untried(&self) -> bool {
        self.out_until.load(Ordering::Relaxed) != 0
    }

    /// Whether a request may go to this target under passive checks: it is in, or its time
    /// out is over and this request is the one that tries it (nginx lets one request per
    /// `fail_timeout` try a failed server). Taking the trial starts a new time out, so the
    /// other requests keep away until the trial's answer brings the target back (or its
    /// failure keeps it out).
    pub fn admit(&self, p: &PassiveConfig) -> bool {
        let until = self.out_until.load(Ordering::Relaxed);
        if until == 0 {
            return true;
        }
        let now = now_ns();
        let taken = now >= until
            && self
                .out_until
                .compare_exchange(
                    until,
                    now.saturating_add(p.fail_timeout.as_nanos() as u64),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok();
        if taken {
            self.trial.store(true, Ordering::Relaxed);
        }
        taken
    }

    /// Counts a failed request (passive checks), and says what it did.
    pub fn failed(&self, p: &PassiveConfig) -> Failed {
        let n = self.fails.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        if n < p.max_fails {
            return Failed::Counted;
        }
        // Not past `max_fails` again and again: the count only needs to say "enough".
        self.fails.store(p.max_fails, Ordering::Relaxed);
        let now = now_ns();
        let until = self.out_until.load(Ordering::Relaxed);
        let next = now.saturating_add(p.fail_timeout.as_nanos() as u64);
        if until != 0 {
            // Out already (another worker's failure, one in flight, or a failed trial):
            // its time out runs from this failure.
            let _ = self.out_until.fetch_max(next, Ordering::Relaxed);
            return if self.trial.swap(false, Ordering::Relaxed) {
                Failed::TrialFailed
            } else {
                Failed::Counted
            };
        }
        match self
            .out_until
            .compare_exchange(0, next, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => Failed::WentOut,
            Err(_) => Failed::Counted,
        }
    }

    /// Counts an answered request (passive checks): the failure streak ends, and a target
    /// that was out is back (the trial after its time out, or a request sent to it when every
    /// target was out, or one that was in flight: it answers).
    pub fn succeeded(&self) {
        if self.out_until.load(Ordering::Relaxed) != 0 {
            self.out_until.store(0, Ordering::Relaxed);
            self.trial.store(false, Ordering::Relaxed);
        }
        if self.fails.load(Ordering::Relaxed) != 0 {
            self.fails.store(0, Ordering::Relaxed);
        }
    }

    /// Forgets passive failures (the active checker saw the target come back).
    fn reset_passive(&self) {
        self.fails.store(0, Ordering::Relaxed);
        self.out_until.store(0, Ordering::Relaxed);
        self.trial.store(false, Ordering::Relaxed);
    }
}

/// Keeps target health across reloads, keyed by upstream name and address.
#[derive(Default)]
pub struct HealthRegistry {
    map: Mutex<AHashMap<(String, SocketAddr), Arc<TargetHealth>>>,
    /// `ringgate_upstream_overflow_total` by upstream name.
    overflows: Mutex<AHashMap<String, Arc<AtomicU64>>>,
}

impl HealthRegistry {
    fn overflows(&self, name: &str) -> Arc<AtomicU64> {
        let mut m = self.overflows.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(name.to_string()).or_default().clone()
    }

    fn get(&self, name: &str, addr: SocketAddr) -> Arc<TargetHealth> {
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        m.entry((name.to_string(), addr))
            .or_insert_with(|| Arc::new(TargetHealth::new()))
            .clone()
    }
}

/// A request's hold on one of a target's `max_connections`, from before its connection is
/// taken or opened until that connection is pooled or closed (a WebSocket tunnel holds it
/// while it lasts). Given back when dropped. Empty for an upstream without a cap.
pub struct Slot(Option<Arc<TargetHealth>>);

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(h) = &self.0 {
            h.active.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// An upstream ready to serve: its config, its targets' health and its metric labels.
pub struct Upstream {
    pub cfg: UpstreamConfig,
    pub health: Vec<Arc<TargetHealth>>,
    pub labels: Labels,
    /// Requests refused because every target was at `max_connections` (kept across reloads).
    overflows: Arc<AtomicU64>,
}

impl Upstream {
    /// Builds the runtime upstreams of a config, reusing the active checker's view of known
    /// targets. Passive checks start afresh: the new config may count failures otherwise.
    pub fn build_all(cfgs: &[UpstreamConfig], reg: &HealthRegistry) -> Vec<Upstream> {
        cfgs.iter()
            .map(|c| Upstream {
                health: c
                    .targets
                    .iter()
                    .map(|a| {
                        let h = reg.get(&c.name, *a);
                        h.reset_passive();
                        h
                    })
                    .collect(),
                labels: Labels(Arc::from(c.name.as_str())),
                overflows: reg.overflows(&c.name),
                cfg: c.clone(),
            })
            .collect()
    }

    /// Whether target `i` gets traffic: the active checker passes it and passive checks do
    /// not keep it out (the tests' view; requests go through [`Upstream::admits`]).
    #[cfg(test)]
    fn available(&self, i: usize) -> bool {
        self.health[i].is_healthy() && !(self.cfg.passive.is_some() && self.health[i].is_out())
    }

    /// Whether a request may go to target `i` now: the active checker passes it and passive
    /// checks admit it ([`TargetHealth::admit`]: taking the trial of a target whose time out
    /// is over).
    pub fn admits(&self, i: usize) -> bool {
        self.health[i].is_healthy()
            && self
                .cfg
                .passive
                .as_ref()
                .is_none_or(|p| self.health[i].admit(p))
    }

    /// Whether target `i` is below its `max_connections` (always, without a cap).
    pub fn has_room(&self, i: usize) -> bool {
        self.cfg
            .max_connections
            .is_none_or(|m| self.health[i].active.load(Ordering::Relaxed) < m)
    }

    /// Whether requests to this upstream hold counted slots ([`Upstream::occupy`]): with a
    /// `max_connections`, or a balance that compares the targets' loads.
    fn counted(&self) -> bool {
        self.cfg.max_connections.is_some()
            || matches!(self.cfg.balance, Balance::LeastConn | Balance::Random2)
    }

    /// Connections to target `i` in use by requests now, by every worker (0 when not
    /// [`Upstream::counted`]).
    pub fn load(&self, i: usize) -> u32 {
        self.health[i].active.load(Ordering::Relaxed)
    }

    /// Takes one of target `i`'s `max_connections`, or `None` when it has none left (another
    /// worker may have taken the last one since [`Upstream::has_room`]). Touches nothing
    /// shared for an upstream without a cap or a load-comparing balance.
    pub fn occupy(&self, i: usize) -> Option<Slot> {
        if !self.counted() {
            return Some(Slot(None));
        }
        let max = self.cfg.max_connections.unwrap_or(u32::MAX);
        let h = &self.health[i];
        h.active
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(Some(h.clone())))
    }

    /// Counts a request refused because every target was full.
    pub fn overflowed(&self) {
        self.overflows.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a failed request to target `i` when passive checks are on, and says so on
    /// stderr when that puts the target out.
    pub fn failed(&self, i: usize) {
        let Some(p) = &self.cfg.passive else { return };
        match self.health[i].failed(p) {
            Failed::Counted => {}
            Failed::WentOut => crate::elog!(
                "ringgate: upstream {} target {} is out for {} ms after {} failed request(s) in a row (passive)",
                self.cfg.name,
                self.cfg.targets[i],
                p.fail_timeout.as_millis(),
                p.max_fails
            ),
            Failed::TrialFailed => crate::elog!(
                "ringgate: upstream {} target {} failed the request that tried it again: out for another {} ms (passive)",
                self.cfg.name,
                self.cfg.targets[i],
                p.fail_timeout.as_millis()
            ),
        }
    }

    /// Counts an answered request from target `i` when passive checks are on.
    pub fn succeeded(&self, i: usize) {
        if self.cfg.passive.is_some() {
            self.health[i].succeeded();
        }
    }
}

/// Writes `ringgate_upstream_target_up` (Prometheus text): 1 for a target that gets traffic,
/// 0 for one the active checker holds unhealthy or passive checks keep out (until a request
/// it gets after its time out is answered).
pub fn render_metrics(ups: &[Upstream], o: &mut String) {
    use std::fmt::Write as _;
    o.push_str("# HELP ringgate_upstream_target_up Whether a target gets traffic (0: failing its health check, or out after failed requests).\n# TYPE ringgate_upstream_target_up gauge\n");
    for up in ups {
        for (t, h) in up.cfg.targets.iter().zip(&up.health) {
            let _ = writeln!(
                o,
                "ringgate_upstream_target_up{{upstream=\"{}\",target=\"{t}\"}} {}",
                crate::metrics::escape_label(&up.cfg.name),
                u8::from(h.is_healthy() && !(up.cfg.passive.is_some() && h.out_or_untried()))
            );
        }
    }
    let capped = || ups.iter().filter(|u| u.cfg.max_connections.is_some());
    if !ups.iter().any(|u| u.counted()) {
        return;
    }
    o.push_str("# HELP ringgate_upstream_target_active_connections Connections in use by requests to a target of an upstream with max_connections, least_conn or random2.\n# TYPE ringgate_upstream_target_active_connections gauge\n");
    for up in ups.iter().filter(|u| u.counted()) {
        for (t, h) in up.cfg.targets.iter().zip(&up.health) {
            let _ = writeln!(
                o,
                "ringgate_upstream_target_active_connections{{upstream=\"{}\",target=\"{t}\"}} {}",
                crate::metrics::escape_label(&up.cfg.name),
                h.active.load(Ordering::Relaxed)
            );
        }
    }
    o.push_str("# HELP ringgate_upstream_overflow_total Requests refused with 503 because every target the health checks pass was at max_connections.\n# TYPE ringgate_upstream_overflow_total counter\n");
    for up in capped() {
        let _ = writeln!(
            o,
            "ringgate_upstream_overflow_total{{upstream=\"{}\"}} {}",
            crate::metrics::escape_label(&up.cfg.name),
            up.overflows.load(Ordering::Relaxed)
        );
    }
}

/// The read of an upstream connection's next answer, started before the request is sent.
pub type NextRead = DetachedRecv<SliceMut<Vec<u8>>>;

/// An idle pooled upstream connection and the read of its next answer, started when it was
/// pooled. Whatever arrives while it idles (a stray answer, the upstream closing it) ends
/// that read, which [`WorkerPools::take`] sees without a system call; the answer to the next
/// request lands in it otherwise.
pub struct Pooled {
    /// The connection.
    pub stream: TcpStream,
    /// Its next read, into the buffer it was pooled with; `None` when the connection reads
    /// through a multishot receive (io_uring), which stays armed while it idles and holds
    /// what arrives (see `TcpStream::recv_held`).
    pub next: Option<NextRead>,
    /// The pool's sweep count when it was pooled (its age, without a clock read).
    swept: u32,
}

impl Pooled {
    /// Whether nothing arrived while it idled (no stray bytes, no close): its read is still
    /// pending, or its multishot receive runs and holds nothing. A pending read's poll here
    /// has a no-op waker; the next poll, with the request's waker, replaces it.
    fn idle_and_clean(&mut self) -> bool {
        match &mut self.next {
            Some(next) => {
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                std::pin::Pin::new(next).poll(&mut cx).is_pending()
            }
            None => match self.stream.recv_held() {
                RecvHeld::Bytes | RecvHeld::End => false,
                RecvHeld::Nothing if self.stream.multishot_running() => true,
                // Its receive ended without bytes (the ring ran dry): the socket tells, and
                // the receive starts again.
                RecvHeld::Nothing => {
                    matches!(peek(&self.stream), Peek::Nothing) && {
                        self.stream.arm_multishot_recv();
                        true
                    }
                }
            },
        }
    }
}

/// Idle pooled connections older than this many sweeps (one a second) are closed, as nginx's
/// upstream `keepalive_timeout` (60 s) does.
const POOL_IDLE_SWEEPS: u32 = 60;

/// The smallest buffer an idle pooled connection's read is given.
const POOLED_READ_BUF: usize = 4096;

/// One worker's view of the upstreams: idle pooled connections and balancing state.
#[derive(Default)]
pub struct WorkerPools {
    idle: AHashMap<SocketAddr, Vec<Pooled>>,
    rr: usize,
    rng: u64,
    /// Sweeps so far ([`WorkerPools::sweep`]).
    sweeps: u32,
}

impl WorkerPools {
    /// A new, empty set of pools with its own random seed.
    pub fn new(seed: u64) -> Self {
        WorkerPools {
            rng: seed | 1,
            ..Default::default()
        }
    }

    fn next_rand(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Picks a healthy target index below its `max_connections`, avoiding `tried` (a bit set
    /// of indexes already tried). `hash` is the hash of the header value named by
    /// `hash:header.NAME` ([`hash_key`]), if present. Targets that passive checks keep out are
    /// avoided too (one whose time out is over is picked by one request at a time: see
    /// [`TargetHealth::admit`]), unless every target the active checker passes is out: then
    /// they are all tried (as Envoy's panic threshold), since refusing every request would be
    /// a worse outage than trying a target that failed. A target that is in but full is not
    /// such an outage: then `None` (the caller's 503), never a target that is out.
    pub fn pick(&mut self, up: &Upstream, hash: Option<u64>, tried: u64) -> Option<usize> {
        let n = up.cfg.targets.len().min(64);
        let mut live = 0u64;
        let mut room = 0u64;
        for i in 0..n {
            if tried & (1 << i) == 0 && up.health[i].is_healthy() {
                live |= 1 << i;
                if up.has_room(i) {
                    room |= 1 << i;
                }
            }
        }
        if room == 0 {
            return None;
        }
        let Some(p) = &up.cfg.passive else {
            return self.choose(up, hash, room);
        };
        if n == 1 {
            // Passive checks never refuse the last target.
            return Some(0);
        }
        let mut cands = room;
        for i in 0..n {
            if cands & (1 << i) != 0 && up.health[i].is_out() {
                cands &= !(1 << i);
            }
        }
        while cands != 0 {
            let i = self.choose(up, hash, cands)?;
            if up.health[i].admit(p) {
                return Some(i);
            }
            // Another request took the trial of this target (or it just went out).
            cands &= !(1 << i);
        }
        let full_but_in = (0..n).any(|i| live & !room & (1 << i) != 0 && !up.health[i].is_out());
        if full_but_in {
            return None;
        }
        self.choose(up, hash, room)
    }

    /// One of the targets in `mask` (a bit set, not empty) by the upstream's balance mode.
    fn choose(&mut self, up: &Upstream, hash: Option<u64>, mask: u64) -> Option<usize> {
        let count = mask.count_ones() as usize;
        let in_mask = move |i: usize| i < 64 && mask & (1 << i) != 0;
        let nth = |k: usize| -> Option<usize> {
            let mut m = mask;
            for _ in 0..k % count {
                m &= m - 1;
            }
            (m != 0).then(|| m.trailing_zeros() as usize)
        };
        let n = up.cfg.targets.len();
        match &up.cfg.balance {
            Balance::RoundRobin => {
                self.rr = self.rr.wrapping_add(1);
                nth(self.rr)
            }
            // Rendezvous hashing: the value goes to the healthy target with the highest score
            // for it, so a target going down moves only its own values (as nginx's
            // `hash ... consistent`), and every worker and node agrees on the choice.
            Balance::HashHeader(_) => match hash {
                Some(h) => (0..n)
                    .filter(|&i| in_mask(i))
                    .max_by_key(|&i| mix(h ^ mix(addr_key(&up.cfg.targets[i])))),
                None => {
                    self.rr = self.rr.wrapping_add(1);
                    nth(self.rr)
                }
            },
            Balance::LeastConn => {
                self.rr = self.rr.wrapping_add(1);
                // Ties broken round-robin so equal targets share the load.
                let start = self.rr;
                (0..n)
                    .map(|k| (start + k) % n)
                    .filter(|&i| in_mask(i))
                    .min_by_key(|&i| up.load(i))
            }
            Balance::Random2 => {
                let a = nth(self.next_rand() as usize)?;
                let b = nth(self.next_rand() as usize)?;
                if up.load(b) < up.load(a) {
                    Some(b)
                } else {
                    Some(a)
                }
            }
        }
    }

    /// An idle pooled connection to `addr`, most recently used first, with nothing waiting on
    /// it. One that the upstream closed, or that holds bytes nobody asked for (a stray answer,
    /// or one to a request smuggled in a body the upstream did not read), is dropped: its
    /// bytes would be read as the next client's answer. nginx closes such connections as soon
    /// as they turn readable; here the read each one keeps in flight while it idles has
    /// ended then, which one poll shows without a system call.
    pub fn take(&mut self, addr: SocketAddr) -> Option<Pooled> {
        let v = self.idle.get_mut(&addr)?;
        while let Some(mut p) = v.pop() {
            if p.idle_and_clean() {
                return Some(p);
            }
        }
        None
    }

    /// Drops every idle pooled connection to `addr`.
    pub fn clear(&mut self, addr: SocketAddr) {
        if let Some(v) = self.idle.get_mut(&addr) {
            v.clear();
        }
    }

    /// Returns a connection to the pool, unless the pool already holds `max`, and starts the
    /// read of its next answer: its multishot receive (io_uring), else a read into `buf`
    /// (taken, emptied; at least 4 KiB).
    pub fn put(&mut self, addr: SocketAddr, mut stream: TcpStream, buf: &mut Vec<u8>, max: usize) {
        if stream.recv_held() != RecvHeld::Nothing {
            // Bytes after the answer, already received (nobody asked for them), or the
            // upstream closed the connection.
            return;
        }
        let v = self.idle.entry(addr).or_default();
        if v.len() < max {
            let next = if stream.arm_multishot_recv() {
                None
            } else {
                let mut buf = std::mem::take(buf);
                buf.clear();
                buf.reserve(POOLED_READ_BUF);
                let cap = buf.capacity();
                Some(stream.recv_detached(buf.slice_mut(0..cap), true))
            };
            v.push(Pooled {
                stream,
                next,
                swept: self.sweeps,
            });
        }
    }

    /// Closes the idle connections the upstream has closed (or sent stray bytes on) since
    /// they were pooled, so none waits in CLOSE_WAIT for a request to find it, and those idle
    /// for [`POOL_IDLE_SWEEPS`] sweeps. Called once a second, off the request path.
    pub fn sweep(&mut self) {
        self.sweeps = self.sweeps.wrapping_add(1);
        let now = self.sweeps;
        for v in self.idle.values_mut() {
            v.retain_mut(|p| now.wrapping_sub(p.swept) < POOL_IDLE_SWEEPS && p.idle_and_clean());
        }
    }

    /// Closes every idle pooled connection (the worker stops).
    pub fn close_all(&mut self) {
        self.idle.clear();
    }
}

/// What a socket holds, looked at without taking anything.
pub enum Peek {
    /// Bytes (from a client: a pipelined request, or TLS records).
    Data,
    /// End of stream or an error: the peer closed or reset the connection.
    Gone,
    /// Nothing yet.
    Nothing,
}

pub fn peek(sock: &TcpStream) -> Peek {
    use std::os::fd::AsRawFd;
    let mut b = [0u8; 1];
    // SAFETY: `b` is a valid, writable one-byte buffer for the duration of the call, and the
    // descriptor belongs to `sock`, which is borrowed (open) across it. MSG_PEEK leaves the
    // byte in the socket; MSG_DONTWAIT keeps the call from blocking.
    let n = unsafe {
        libc::recv(
            sock.as_raw_fd(),
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => Peek::Gone,
        n if n > 0 => Peek::Data,
        _ => match std::io::Error::last_os_error().kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Peek::Nothing,
            _ => Peek::Gone,
        },
    }
}

/// `TCP_CLOSE` of the kernel's `tcp_states.h` (not in the libc crate).
const TCP_CLOSE: u8 = 7;

/// Whether the peer reset the connection (or it is otherwise closed both ways): TCP's state
/// is CLOSE. A peer that only half-closed leaves it in CLOSE_WAIT.
pub fn reset_by_peer(sock: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: `tcp_info` is plain integers, for which all-zero bytes are a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is a writable `tcp_info` and `len` its size, both outliving the call;
    // the descriptor belongs to `sock`, which is borrowed (open) across it.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    r != 0 || info.tcpi_state == TCP_CLOSE
}

/// One probe: GET `path`, healthy on a 2xx or 3xx status (the body is not read).
fn probe(addr: SocketAddr, path: &str, timeout: Duration) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    let host = addr.to_string();
    let req = client::build_request(
        b"GET",
        path.as_bytes(),
        &[
            (b"Host", host.as_bytes()),
            (b"User-Agent", b"ringgate-health"),
            (b"Connection", b"close"),
        ],
        b"",
        None,
    );
    let mut rd = ResponseReader::new(Method::Get, 0).head_only();
    client::exchange_blocking(&mut s, &req, &mut rd, Instant::now() + timeout).is_ok()
        && rd.status().is_some_and(|s| (200..400).contains(&s))
}

/// Runs the health checker until `stop` is set: probes every target of every upstream that has
/// a `health` section in the current config, and flips target health after the configured
/// streaks. `current` returns the upstreams of the live config.
pub fn run_health_checker(current: impl Fn() -> Arc<crate::gateway::Gateway>, stop: &AtomicBool) {
    let mut next_due: AHashMap<(String, SocketAddr), Instant> = AHashMap::new();
    while !stop.load(Ordering::Relaxed) {
        let gw = current();
        let now = Instant::now();
        for up in &gw.upstreams {
            let Some(h) = &up.cfg.health else { continue };
            for (i, addr) in up.cfg.targets.iter().enumerate() {
                // A drain waits for this thread: at most the probe under way, not a round.
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let key = (up.cfg.name.clone(), *addr);
                let due = next_due.entry(key).or_insert(now);
                if *due > now {
                    continue;
                }
                *due = now + h.interval;
                let ok = probe(*addr, &h.path, h.timeout);
                let t = &up.health[i];
                let healthy = t.is_healthy();
                if ok == healthy {
                    t.streak.store(0, Ordering::Relaxed);
                    continue;
                }
                let streak = t.streak.fetch_add(1, Ordering::Relaxed) + 1;
                let needed = if healthy {
                    h.unhealthy_after
                } else {
                    h.healthy_after
                };
                if streak >= needed {
                    t.healthy.store(!healthy, Ordering::Relaxed);
                    t.streak.store(0, Ordering::Relaxed);
                    if !healthy {
                        // Back: what passive checks saw before it went down is stale.
                        t.reset_passive();
                    }
                    crate::elog!(
                        "ringgate: upstream {} target {addr} is now {}",
                        up.cfg.name,
                        if healthy { "unhealthy" } else { "healthy" }
                    );
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// FNV-1a: the same on every machine and build, so nodes of a cluster pick alike.
/// The hash `hash:header.NAME` balances by: of the whole header value.
pub fn hash_key(v: &[u8]) -> u64 {
    fnv1a(v)
}

fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &c| {
        (h ^ c as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// splitmix64's finalizer: spreads the bits of a key over the whole word.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A target's identity for rendezvous hashing: its address, so the order of `targets` does
/// not matter.
fn addr_key(a: &SocketAddr) -> u64 {
    let ip = match a.ip() {
        std::net::IpAddr::V4(v4) => u32::from(v4) as u64,
        std::net::IpAddr::V6(v6) => {
            let b = u128::from(v6);
            (b as u64) ^ ((b >> 64) as u64).rotate_left(17)
        }
    };
    ip ^ ((a.port() as u64) << 40)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(balance: Balance, n: usize) -> Upstream {
        let cfg = UpstreamConfig {
            name: "u".into(),
            targets: (0..n)
                .map(|i| format!("127.0.0.1:{}", 1000 + i).parse().unwrap())
                .collect(),
            balance,
            connect_timeout: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            retries: 1,
            keepalive: 4,
            health: None,
            passive: None,
            max_connections: None,
        };
        Upstream::build_all(&[cfg], &HealthRegistry::default())
            .pop()
            .unwrap()
    }

    #[test]
    fn round_robin_skips_unhealthy_and_tried() {
        let u = up(Balance::RoundRobin, 3);
        let mut p = WorkerPools::new(7);
        let picks: Vec<_> = (0..6).map(|_| p.pick(&u, None, 0).unwrap()).collect();
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 2);
        u.health[1].healthy.store(false, Ordering::Relaxed);
        for _ in 0..10 {
            let i = p.pick(&u, None, 0b100).unwrap();
            assert_eq!(i, 0);
        }
        u.health[0].healthy.store(false, Ordering::Relaxed);
        assert_eq!(p.pick(&u, None, 0b100), None);
    }

    #[test]
    fn passive_checks_take_a_failing_target_out_for_its_time() {
        let mut u = up(Balance::RoundRobin, 2);
        let p = PassiveConfig {
            max_fails: 2,
            fail_timeout: Duration::from_millis(200),
        };
        u.cfg.passive = Some(p);
        let mut pools = WorkerPools::new(7);
        // One failure is not enough; a success ends the streak.
        assert_eq!(u.health[0].failed(&p), Failed::Counted);
        u.succeeded(0);
        assert_eq!(u.health[0].failed(&p), Failed::Counted);
        assert!(u.available(0));
        // Two in a row: out, and every pick avoids it.
        assert_eq!(u.health[0].failed(&p), Failed::WentOut);
        assert!(!u.available(0));
        assert!((0..10).all(|_| pools.pick(&u, None, 0) == Some(1)));
        // Further failures while out do not say it went out again (nor log).
        assert_eq!(u.health[0].failed(&p), Failed::Counted);
        // Both out: both are tried anyway rather than refusing every request...
        u.health[1].failed(&p);
        assert_eq!(u.health[1].failed(&p), Failed::WentOut);
        let both: std::collections::HashSet<_> = (0..10).map(|_| pools.pick(&u, None, 0)).collect();
        assert_eq!(both.len(), 2);
        // ...and one that answers is back at once.
        u.succeeded(1);
        assert!(u.available(1));
        assert!((0..10).all(|_| pools.pick(&u, None, 0) == Some(1)));
        // The active checker still decides alone: an unhealthy target is never picked.
        u.health[1].healthy.store(false, Ordering::Relaxed);
        assert!((0..10).all(|_| pools.pick(&u, None, 0) == Some(0)));
        u.health[1].healthy.store(true, Ordering::Relaxed);
        // Its time over, one request at a time tries it: the trial starts a new time out.
        std::thread::sleep(Duration::from_millis(250));
        assert!(u.available(0));
        // Not back until an answer says so (the gauge stays 0).
        assert!(u.health[0].out_or_untried());
        let picks: Vec<_> = (0..10).map(|_| pools.pick(&u, None, 0).unwrap()).collect();
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 1, "{picks:?}");
        assert!(!u.available(0));
        // The trial fails: out again, said as such.
        assert_eq!(u.health[0].failed(&p), Failed::TrialFailed);
        assert!(!u.available(0));
        // Next time the trial answers: back for good, and a new streak is needed.
        std::thread::sleep(Duration::from_millis(250));
        assert!(u.admits(0));
        u.succeeded(0);
        assert!(u.available(0) && u.admits(0) && u.admits(0));
        assert!(!u.health[0].out_or_untried());
        assert_eq!(u.health[0].failed(&p), Failed::Counted);
        assert!(u.available(0));
        // A reload starts afresh.
        u.health[0].failed(&p);
        assert!(!u.available(0));
        let reg = HealthRegistry::default();
        let h = reg.get("u", u.cfg.targets[0]);
        h.failed(&PassiveConfig { max_fails: 1, ..p });
        assert!(h.is_out());
        let rebuilt = Upstream::build_all(std::slice::from_ref(&u.cfg), &reg);
        assert!(rebuilt[0].available(0));
        // Without `passive`, what was recorded is ignored.
        u.cfg.passive = None;
        assert!(u.available(0));
        let set: std::collections::HashSet<_> = (0..10).map(|_| pools.pick(&u, None, 0)).collect();
        assert_eq!(set.len(), 2);
    }

    #[test]
    fn a_single_target_is_picked_unless_tried_or_unhealthy() {
        let mut u = up(Balance::LeastConn, 1);
        u.cfg.passive = Some(PassiveConfig {
            max_fails: 1,
            fail_timeout: Duration::from_secs(60),
        });
        let mut p = WorkerPools::new(7);
        assert_eq!(p.pick(&u, None, 0), Some(0));
        assert_eq!(p.pick(&u, None, 1), None);
        // Out after a failure, but the only one: still tried.
        u.failed(0);
        assert!(!u.available(0));
        assert_eq!(p.pick(&u, None, 0), Some(0));
        u.health[0].healthy.store(false, Ordering::Relaxed);
        assert_eq!(p.pick(&u, None, 0), None);
    }

    #[test]
    fn max_connections_slots_are_taken_passed_over_and_given_back() {
        let mut u = up(Balance::RoundRobin, 2);
        u.cfg.max_connections = Some(2);
        let mut p = WorkerPools::new(7);
        let a = [u.occupy(0).unwrap(), u.occupy(0).unwrap()];
        assert!(u.occupy(0).is_none(), "a third slot past the cap");
        assert!(!u.has_room(0) && u.has_room(1));
        // Every pick goes to the target with room, whatever the round-robin cursor says.
        for _ in 0..4 {
            assert_eq!(p.pick(&u, None, 0), Some(1));
        }
        let b = [u.occupy(1).unwrap(), u.occupy(1).unwrap()];
        assert_eq!(p.pick(&u, None, 0), None, "every target is full");
        drop(a);
        assert_eq!(u.health[0].active.load(Ordering::Relaxed), 0);
        assert_eq!(p.pick(&u, None, 0), Some(0));
        drop(b);
        // Without a cap nothing shared is counted.
        let n = up(Balance::RoundRobin, 1);
        let s = n.occupy(0).unwrap();
        assert!(s.0.is_none());
        assert_eq!(n.health[0].active.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn least_conn_prefers_idle_target() {
        let u = up(Balance::LeastConn, 2);
        let mut p = WorkerPools::new(7);
        // A slot held (by any worker: the count is the gateway's) is a connection in use.
        let busy = u.occupy(0).unwrap();
        for _ in 0..5 {
            assert_eq!(p.pick(&u, None, 0), Some(1));
        }
        drop(busy);
        assert_eq!(u.load(0), 0);
    }

    #[test]
    fn hash_header_hashes_the_whole_value() {
        let u = up(Balance::HashHeader("authorization".into()), 4);
        let mut p = WorkerPools::new(7);
        let prefix = "Bearer ".to_string() + &"x".repeat(100);
        let spread: std::collections::HashSet<_> = (0..24)
            .map(|i| p.pick(&u, Some(hash_key(format!("{prefix}{i}").as_bytes())), 0))
            .collect();
        assert!(
            spread.len() > 1,
            "values past 64 bytes all went to {spread:?}"
        );
    }

    #[test]
    fn hash_is_sticky() {
        let u = up(Balance::HashHeader("x-user".into()), 4);
        let mut p = WorkerPools::new(7);
        let a = p.pick(&u, Some(hash_key(b"alice")), 0);
        for _ in 0..10 {
            assert_eq!(p.pick(&u, Some(hash_key(b"alice")), 0), a);
        }
        let spread: std::collections::HashSet<_> = (0..50)
            .map(|i| p.pick(&u, Some(hash_key(format!("user{i}").as_bytes())), 0))
            .collect();
        assert!(spread.len() > 1);
    }

    #[test]
    fn hash_moves_only_the_values_of_a_target_that_goes_down() {
        let u = up(Balance::HashHeader("x-user".into()), 3);
        let mut p = WorkerPools::new(7);
        let keys: Vec<String> = (0..300).map(|i| format!("user{i}")).collect();
        let pick_all = |p: &mut WorkerPools| -> Vec<usize> {
            keys.iter()
                .map(|k| p.pick(&u, Some(hash_key(k.as_bytes())), 0).unwrap())
                .collect()
        };
        let before = pick_all(&mut p);
        for t in 0..3 {
            let share = before.iter().filter(|&&i| i == t).count();
            assert!((60..=140).contains(&share), "target {t} has {share} of 300");
        }
        u.health[1].healthy.store(false, Ordering::Relaxed);
        let after = pick_all(&mut p);
        for (b, a) in before.iter().zip(&after) {
            assert_ne!(*a, 1);
            if *b != 1 {
                assert_eq!(a, b, "a value of a healthy target moved");
            }
        }
        // Back up: every value returns where it was.
        u.health[1].healthy.store(true, Ordering::Relaxed);
        assert_eq!(pick_all(&mut p), before);
        // The order of the targets does not matter.
        let mut cfg = u.cfg.clone();
        cfg.targets.reverse();
        let r = Upstream::build_all(&[cfg], &HealthRegistry::default())
            .pop()
            .unwrap();
        let reversed: Vec<usize> = keys
            .iter()
            .map(|k| 2 - p.pick(&r, Some(hash_key(k.as_bytes())), 0).unwrap())
            .collect();
        assert_eq!(reversed, before);
    }

    #[test]
    fn random2_spreads() {
        let u = up(Balance::Random2, 3);
        let mut p = WorkerPools::new(99);
        let set: std::collections::HashSet<_> = (0..50).map(|_| p.pick(&u, None, 0)).collect();
        assert_eq!(set.len(), 3);
    }
}
