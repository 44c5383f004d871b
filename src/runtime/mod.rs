//! The supervisor: starts the pinned worker threads (each with its own monoio runtime and its
//! own `SO_REUSEPORT` listeners), the admin listener and the health checker; turns signals into
//! reloads and a graceful drain.
//!
//! io_uring runs with the cooperative task-run flags (`IORING_SETUP_COOP_TASKRUN` and
//! `IORING_SETUP_TASKRUN_FLAG`): without them the kernel interrupts the worker for every
//! completion, which costs about 45% of throughput in a VM. epoll is used when chosen, or with
//! `io = "auto"` when the kernel refuses io_uring. Each worker logs the driver it runs on.

use crate::config::{Config, IoMode};
use crate::gateway::Shared;
use crate::server::LogLimit;
use crate::server::{serve, serve_tls, ConnGuard, Worker};
use monoio::net::{ListenerOpts, TcpListener};
use std::cell::RefCell;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Entries of each worker's io_uring submission queue.
const RING_ENTRIES: u32 = 1024;

/// Allocations of this many bytes or more get their own mapping (`M_MMAP_THRESHOLD`), so their
/// pages go back to the kernel when freed. Each then holds whole pages: see
/// [`crate::cache::store::resident_bytes`].
pub const MMAP_THRESHOLD: usize = 1000;

/// Runs the gateway until SIGTERM/SIGINT/SIGQUIT (SIGHUP reloads, SIGUSR1 reopens the access
/// log file, as nginx does after a rotation; SIGUSR2 is ignored); returns an error line when it
/// cannot start. This is the `ringgate` command: it also sets process-wide allocator tunables
/// ([`MMAP_THRESHOLD`]). An embedder that keeps its own signals uses [`start`].
pub fn run(config: Config) -> Result<(), String> {
    // Allocations of 2 KiB and more (connection buffers, the state of an active connection
    // task) are mapped on their own, so when a connection goes idle and gives them back the
    // pages return to the kernel at once instead of being pinned in the heap by the small
    // long-lived objects of parked connections. Steady traffic reuses pooled buffers and
    // never reaches the allocator.
    // SAFETY: mallopt only changes allocator tunables; called before any worker starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
    }
    // Signals first, so an early SIGTERM is not lost.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGHUP,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        // nginx's graceful stop: drains here too.
        signal_hook::consts::SIGQUIT,
        signal_hook::consts::SIGUSR1,
        // nginx's binary upgrade, which ringgate does not do: said and ignored, rather than
        // the default action (an exit with no drain, losing the last quota counts).
        signal_hook::consts::SIGUSR2,
    ])
    .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let gw = start(config)?;
    // Reloads run on their own thread, so a SIGTERM during a long one (a large config, a JWKS
    // that does not answer) starts the drain at once; the reload then sees the drain and is
    // dropped. SIGHUPs that come while one waits are one reload (it reads the latest file).
    let (reload_tx, reload_rx) = crossbeam_channel::bounded::<()>(1);
    {
        let shared = gw.shared.clone();
        std::thread::Builder::new()
            .name("ringgate-reload".into())
            .spawn(move || {
                for () in reload_rx {
                    let _ = reload_and_log(&shared, "");
                }
            })
            .map_err(|e| format!("cannot start the reload thread: {e}"))?;
    }
    for sig in signals.forever() {
        match sig {
            signal_hook::consts::SIGHUP => {
                let _ = reload_tx.try_send(());
            }
            signal_hook::consts::SIGUSR1 => gw.reopen_logs(),
            signal_hook::consts::SIGUSR2 => crate::elog!(
                "ringgate: SIGUSR2 ignored (no binary upgrade: start the new binary beside this one, then SIGTERM this one)"
            ),
            _ => {
                crate::elog!("ringgate: draining (signal {sig})");
                break;
            }
        }
    }
    // A reload under way is not waited for: it is refused once it sees the drain, and the
    // process exits after the drain.
    drop(reload_tx);
    gw.shutdown();
    Ok(())
}

/// A gateway started by [`start`]: it serves until [`Running::shutdown`].
#[must_use = "dropping it leaves the gateway serving, with no way left to stop it"]
pub struct Running {
    shared: Arc<Shared>,
    workers: Vec<std::thread::JoinHandle<()>>,
    admin: Option<crate::admin::AdminHandle>,
    health: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    /// Reloads the config file, as SIGHUP does. `Ok` holds notes on settings that need a
    /// restart; the error says why the old config stays.
    pub fn reload(&self) -> Result<Vec<String>, String> {
        self.shared.reload().map_err(|e| e.0)
    }

    /// Opens the access log file again at its path (SIGUSR1): after `mv access.log
    /// access.log.1`, the lines handed to the writer from then on go to a new `access.log`.
    pub fn reopen_logs(&self) {
        if let Some(log) = &self.shared.access_log {
            log.reopen();
        }
    }

    /// The live state (config, metrics, keys) shared by every thread.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Drains as SIGTERM does: listeners close at once, in-flight requests finish (up to
    /// `server.shutdown_timeout_ms`), then the workers exit; then the health checker and the
    /// admin listener stop (`/healthz` says `draining` until then), the cluster link syncs a
    /// last time, and the usage counts and the access log's last lines are written. Every
    /// port is free when this returns, connections still open then are closed, and every
    /// thread and descriptor the gateway had is gone.
    pub fn shutdown(self) {
        self.shared.begin_shutdown();
        for h in self.workers {
            let _ = h.join();
        }
        if let Some(h) = self.health {
            let _ = h.join();
        }
        // Before the writers stop: nothing changes keys or counts after their last write.
        if let Some(a) = self.admin {
            a.stop();
        }
        stop_side_threads(&self.shared);
        if let Err(e) = self.shared.usage.flush() {
            crate::elog!("ringgate: cannot write usage counts: {e}");
        }
        crate::elog!("ringgate: stopped");
    }
}

/// Undoes a `start` that failed with `why` (returned): the workers started so far stop, then
/// the admin listener and the side threads; nothing stays behind for an embedder to retry.
fn abort_start(
    shared: &Shared,
    workers: Vec<std::thread::JoinHandle<()>>,
    admin: Option<crate::admin::AdminHandle>,
    why: String,
) -> String {
    shared.begin_shutdown();
    for h in workers {
        let _ = h.join();
    }
    if let Some(a) = admin {
        a.stop();
    }
    stop_side_threads(shared);
    why
}

/// Stops the threads beside the workers, once nothing feeds them any more: the cluster link
/// (its last sync), the usage writer, the access log writer (every line handed over is
/// written) and the JWKS refreshers.
fn stop_side_threads(shared: &Shared) {
    if let Some(c) = shared.cluster.get() {
        c.stop();
    }
    shared.usage.stop_writer();
    if let Some(log) = &shared.access_log {
        log.finish();
    }
    shared.current().config.auth.stop();
}

/// Starts the gateway on `config` and returns once every worker listens: for embedding (no
/// signal handlers are installed, no process-wide setting is changed). The workers, the
/// admin listener and the health checker stop in [`Running::shutdown`]; dropping the
/// [`Running`] handle without it leaves the gateway serving.
pub fn start(config: Config) -> Result<Running, String> {
    config.check_paths()?;
    let access_log = match &config.access_log {
        None => None,
        Some(p) => Some(crate::accesslog::AccessLog::open(p.as_deref())?),
    };
    let workers = config.server.workers;
    let io = config.server.io;
    let pin = config.server.pin_workers;
    let listen = config.server.listen.clone();
    let tls_listen = config
        .server
        .tls
        .as_ref()
        .map(|t| t.listen.clone())
        .unwrap_or_default();
    let admin_cfg = config.admin.clone();
    let shared = Shared::new(config, access_log)?;

    // Workers bind with SO_REUSEPORT, which would let a second gateway (or anything else
    // listening with it) share the port silently. A plain bind first fails as nginx's does
    // when the address is taken.
    for a in listen.iter().chain(&tls_listen) {
        std::net::TcpListener::bind(a).map_err(|e| {
            abort_start(
                &shared,
                Vec::new(),
                None,
                format!("cannot bind listener {a}: {e}"),
            )
        })?;
    }

    let admin = match &admin_cfg {
        Some(a) => Some(crate::admin::start(a, shared.clone()).map_err(|e| {
            let why = format!("cannot bind admin listener {}: {e}", a.listen);
            abort_start(&shared, Vec::new(), None, why)
        })?),
        None => None,
    };

    let (ready_tx, ready_rx) = mpsc::channel::<Result<String, String>>();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut handles = Vec::new();
    for id in 0..workers {
        let worker_shared = shared.clone();
        let listen = Listen {
            plain: listen.clone(),
            tls: tls_listen.clone(),
        };
        let tx = ready_tx.clone();
        let h = std::thread::Builder::new()
            .name(format!("ringgate-w{id}"))
            .spawn(move || {
                worker_thread(id, pin.then_some(id % cores), worker_shared, listen, io, tx)
            });
        match h {
            Ok(h) => handles.push(h),
            Err(e) => {
                let why = format!("cannot start worker thread: {e}");
                return Err(abort_start(&shared, handles, admin, why));
            }
        }
    }
    drop(ready_tx);
    for _ in 0..workers {
        let why = match ready_rx.recv() {
            Ok(Ok(msg)) => {
                crate::elog!("ringgate: {msg}");
                continue;
            }
            Ok(Err(e)) => e,
            Err(_) => "a worker thread died while starting".to_string(),
        };
        // Nothing started stays behind: the workers that listen already stop, and so does
        // the admin listener (an embedder may try again on the same ports).
        return Err(abort_start(&shared, handles, admin, why));
    }
    shared.ready.store(true, Ordering::Release);
    let addrs: Vec<String> = listen
        .iter()
        .map(|a| a.to_string())
        .chain(tls_listen.iter().map(|a| format!("https://{a}")))
        .collect();
    crate::elog!(
        "ringgate: listening on {} with {workers} worker(s)",
        addrs.join(", ")
    );

    let health = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("ringgate-health".into())
            .spawn(move || {
                crate::upstream::run_health_checker(|| shared.current(), &shared.shutdown)
            })
    };
    let health = match health {
        Ok(h) => h,
        Err(e) => {
            let why = format!("cannot start health checker: {e}");
            return Err(abort_start(&shared, handles, admin, why));
        }
    };
    Ok(Running {
        shared,
        workers: handles,
        admin,
        health: Some(health),
    })
}

/// Reloads the config and logs the outcome with its notes; `by` names who asked (SIGHUP: "",
/// the admin API: " (admin)").
pub fn reload_and_log(
    shared: &Shared,
    by: &str,
) -> Result<Vec<String>, crate::config::ConfigError> {
    let r = shared.reload();
    match &r {
        Ok(notes) => {
            crate::elog!("ringgate: config reloaded{by}");
            for n in notes {
                crate::elog!("ringgate: note: {n}");
            }
        }
        Err(e) => crate::elog!("ringgate: reload refused{by}, keeping the old config: {e}"),
    }
    r
}

fn uring_builder() -> io_uring::Builder {
    let mut b = io_uring::IoUring::builder();
    b.setup_coop_taskrun().setup_taskrun_flag();
    b
}

/// The addresses a worker binds.
struct Listen {
    plain: Vec<SocketAddr>,
    /// `server.tls.listen`: HTTPS.
    tls: Vec<SocketAddr>,
}

fn worker_thread(
    id: usize,
    cpu: Option<usize>,
    shared: Arc<Shared>,
    listen: Listen,
    io: IoMode,
    ready: mpsc::Sender<Result<String, String>>,
) {
    if let Some(cpu) = cpu {
        let _ = monoio::utils::bind_to_cpu_set([cpu]);
    }
    if io != IoMode::Epoll {
        let rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .with_entries(RING_ENTRIES)
            .uring_builder(uring_builder())
            .enable_timer()
            .build();
        match rt {
            Ok(mut rt) => {
                rt.block_on(worker_main(id, shared, listen, "io_uring", ready));
                return;
            }
            Err(e) if io == IoMode::IoUring => {
                let _ = ready.send(Err(format!(
                    "io_uring was asked for (server.io) but the kernel refused it: {e}"
                )));
                return;
            }
            Err(e) => {
                crate::elog!("ringgate: worker {id}: io_uring unavailable ({e}), using epoll")
            }
        }
    }
    match monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()
    {
        Ok(mut rt) => rt.block_on(worker_main(id, shared, listen, "epoll", ready)),
        Err(e) => {
            let _ = ready.send(Err(format!("cannot start an epoll runtime: {e}")));
        }
    }
}

async fn worker_main(
    id: usize,
    shared: Arc<Shared>,
    listen: Listen,
    driver: &'static str,
    ready: mpsc::Sender<Result<String, String>>,
) {
    let mut listeners = Vec::new();
    let opts = ListenerOpts::default()
        .reuse_port(true)
        .reuse_addr(true)
        .backlog(4096);
    let all = listen
        .plain
        .iter()
        .map(|a| (a, false))
        .chain(listen.tls.iter().map(|a| (a, true)));
    for (a, tls) in all {
        match TcpListener::bind_with_config(a, &opts) {
            Ok(l) => listeners.push((l, tls)),
            Err(e) => {
                let _ = ready.send(Err(format!("cannot listen on {a}: {e}")));
                return;
            }
        }
    }
    let _ = ready.send(Ok(format!("worker {id}: io driver: {driver}")));
    let w = Rc::new(Worker::new(id, shared.clone()));
    let refusals = Rc::new(RefCell::new(RefusalLog::default()));
    let mut accept_tasks = Vec::new();
    for (l, tls) in listeners {
        accept_tasks.push(monoio::spawn(accept_loop(
            w.clone(),
            l,
            tls,
            refusals.clone(),
        )));
    }
    {
        // Housekeeping off the request path: access-log flushes and heap trimming.
        let w2 = w.clone();
        w.tasks.spawn(async move {
            let w = w2;
            let mut tick = 0u32;
            loop {
                monoio::time::sleep(Duration::from_millis(200)).await;
                refusals.borrow_mut().report_held(id, Instant::now());
                w.flush_log();
                // An idle worker lets go of a replaced config too (its JWKS refreshers, its
                // upstream pools' targets): requests pick up a reload by themselves.
                drop(w.gateway());
                w.parker.sweep();
                tick = tick.wrapping_add(1);
                if tick.is_multiple_of(5) {
                    w.trim_heap();
                    w.sweep_pools();
                }
            }
        });
    }
    w.tasks.spawn(crate::server::run_parker(w.clone()));
    crate::ws::api::set_worker(id);
    w.tasks
        .spawn(crate::ws::api::run_mailbox(id, shared.clone()));
    for t in accept_tasks {
        t.await;
    }
    w.parker.close_all();
    // Drain: wait for in-flight requests, up to the shutdown timeout.
    let limit = shared
        .drain_deadline()
        .unwrap_or_else(|| Instant::now() + shared.current().config.server.shutdown_timeout);
    w.drain_until.set(Some(limit));
    while w.inflight.get() > 0 && Instant::now() < limit {
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
    w.flush_log();
    w.stop_tasks().await;
}

async fn wait_shutdown(shared: &Shared) {
    while !shared.shutdown.load(Ordering::Relaxed) {
        monoio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One worker's rate-limited log of refused connections (shared by its accept loops).
#[derive(Default)]
struct RefusalLog {
    accept: LogLimit,
    /// The errno of the last failed accept, for the report of the held-back ones.
    accept_errno: Option<i32>,
    max_conns: LogLimit,
}

impl RefusalLog {
    fn accept_failed(&mut self, worker: usize, e: &std::io::Error, now: Instant) {
        self.accept_errno = e.raw_os_error();
        if let Some(held) = self.accept.allow(now) {
            if held > 0 {
                crate::elog!(
                    "ringgate: worker {worker}: accept failed: {e} (and {held} more times since the last report)"
                );
            } else {
                crate::elog!("ringgate: worker {worker}: accept failed: {e}");
            }
        }
    }

    fn max_connections(&mut self, worker: usize, max: i64, now: Instant) {
        if let Some(held) = self.max_conns.allow(now) {
            let more = if held > 0 {
                format!(" (and {held} more since the last report)")
            } else {
                String::new()
            };
            crate::elog!(
                "ringgate: worker {worker}: connection refused: max_connections ({max}) are open{more}"
            );
        }
    }

    /// Reports the counts of lines held back once their period is over.
    fn report_held(&mut self, worker: usize, now: Instant) {
        if let Some(n) = self.accept.due(now) {
            let last = self
                .accept_errno
                .map(|c| std::io::Error::from_raw_os_error(c).to_string())
                .unwrap_or_else(|| "unknown error".to_string());
            crate::elog!("ringgate: worker {worker}: accept failed {n} more times (last: {last})");
        }
        if let Some(n) = self.max_conns.due(now) {
            crate::elog!(
                "ringgate: worker {worker}: {n} more connections refused: max_connections are open"
            );
        }
    }
}

/// Whether a failed accept means the process or system is out of descriptors or memory: the
/// next accept would fail the same way, so the loop backs off.
fn accept_exhausted(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Accepts on one listener; `tls`: an HTTPS listener (the handshake runs in the connection's
/// task). TLS connections count toward `max_connections` like any other. Refused connections
/// (over `max_connections`, failed accepts) are counted in
/// `ringgate_connections_refused_total` and logged at most once a second per worker.
async fn accept_loop(w: Rc<Worker>, l: TcpListener, tls: bool, refusals: Rc<RefCell<RefusalLog>>) {
    let shared = w.shared.clone();
    let mut stop = std::pin::pin!(wait_shutdown(&shared));
    loop {
        let canceller = monoio::io::Canceller::new();
        let mut accept = std::pin::pin!(l.cancelable_accept(canceller.handle()));
        monoio::select! {
            _ = &mut stop => {
                // Stop accepting at once: shutdown() takes a listening socket out of the
                // kernel's tables (new connections are refused, or go to another process
                // on the port), whenever the runtime gets to closing its descriptor; then
                // the pending accept is cancelled.
                // SAFETY: shutdown() on the listener's own open descriptor; no memory is
                // passed.
                unsafe {
                    libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR);
                }
                canceller.cancel();
                drop(accept.await);
                return;
            }
            r = &mut accept => match r {
                Ok((stream, peer)) => {
                    let max = shared.current().config.server.limits.max_connections as i64;
                    let active = shared.metrics.connections_active.fetch_add(1, Ordering::Relaxed);
                    if active >= max {
                        shared.metrics.connections_active.fetch_sub(1, Ordering::Relaxed);
                        drop(stream);
                        w.count_refused(false);
                        refusals.borrow_mut().max_connections(w.id, max, Instant::now());
                        continue;
                    }
                    let guard = ConnGuard(shared.clone());
                    if tls {
                        w.tasks.spawn(serve_tls(w.clone(), stream, peer, guard));
                    } else {
                        w.tasks.spawn(serve(w.clone(), stream, peer, guard));
                    }
                }
                Err(e) => {
                    w.count_refused(true);
                    refusals.borrow_mut().accept_failed(w.id, &e, Instant::now());
                    // EMFILE and friends: back off instead of spinning (the connection waits
                    // in the backlog); other errors concern one connection.
                    let pause = if accept_exhausted(&e) { 100 } else { 10 };
                    monoio::time::sleep(Duration::from_millis(pause)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_limit_writes_one_line_a_second_and_counts_the_rest() {
        let t0 = Instant::now();
        let mut l = LogLimit::default();
        assert_eq!(l.allow(t0), Some(0));
        for i in 1..=100u64 {
            assert_eq!(l.allow(t0 + Duration::from_millis(i * 5)), None);
        }
        // Nothing is due before the period is over.
        assert_eq!(l.due(t0 + Duration::from_millis(900)), None);
        // The next line after the period carries the count of those held back.
        assert_eq!(l.allow(t0 + Duration::from_millis(1000)), Some(100));
        assert_eq!(l.allow(t0 + Duration::from_millis(1100)), None);
        assert_eq!(l.allow(t0 + Duration::from_millis(1200)), None);
        // No further line: the count is reported on its own once due, then reset.
        assert_eq!(l.due(t0 + Duration::from_millis(1500)), None);
        assert_eq!(l.due(t0 + Duration::from_millis(2000)), Some(2));
        assert_eq!(l.due(t0 + Duration::from_millis(3500)), None);
    }
}
