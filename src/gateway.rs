//! The live gateway state shared by every thread: the current compiled config (swapped
//! atomically on reload), the shutdown flag, metrics and upstream health.
//!
//! Workers read the config through a generation counter: one relaxed atomic load per request,
//! and a fresh `Arc` only after a reload.

use crate::accesslog::AccessLog;
use crate::config::{self, Config, ConfigError};
use crate::metrics::Registry;
use crate::upstream::{HealthRegistry, Upstream};
use arc_swap::ArcSwap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Why a reload asked for during the drain is refused.
pub const DRAINING: &str = "the gateway is draining (stopping): the config is not reloaded";

/// One compiled config with its runtime upstreams.
pub struct Gateway {
    pub config: Config,
    pub upstreams: Vec<Upstream>,
}

/// State shared by the supervisor, the workers and the admin listener.
pub struct Shared {
    current: ArcSwap<Gateway>,
    generation: AtomicU64,
    /// Set on SIGTERM/SIGINT: stop accepting, drain, exit (see [`Shared::begin_shutdown`]).
    pub shutdown: AtomicBool,
    /// When the drain ends: set just before `shutdown` is raised.
    drain_deadline: std::sync::OnceLock<std::time::Instant>,
    pub metrics: Registry,
    pub health: HealthRegistry,
    /// Set once every listener is bound.
    pub ready: AtomicBool,
    pub access_log: Option<AccessLog>,
    /// The response cache's stores (one per API stage, shared by the workers).
    pub caches: crate::cache::Caches,
    /// Usage-plan quota counters, persisted in `state_dir` (survive reloads and restarts).
    pub usage: Arc<crate::policy::plans::UsageStore>,
    /// API keys (config and admin-added), kept across reloads.
    pub auth: crate::policy::auth::AuthState,
    /// Open WebSocket API connections, for `@connections`.
    pub ws: crate::ws::api::Registry,
    /// `[cluster]`: the link to the other nodes (set once at start).
    pub cluster: std::sync::OnceLock<crate::cluster::Cluster>,
    config_path: PathBuf,
    /// The settings bound at start, which a reload cannot change.
    started: StartSettings,
    reload_lock: Mutex<()>,
    /// Held by a reload from its last drain check through the swap, and by the start of the
    /// drain: a reload either swaps before the drain begins or is refused.
    swap_lock: Mutex<()>,
}

/// The settings read at start only. A reload compares the new config with these (not with the
/// previous config): a note says which ones differ from what the process runs with.
#[derive(Debug, PartialEq)]
struct StartSettings {
    listen: Vec<std::net::SocketAddr>,
    workers: usize,
    io: config::IoMode,
    tls_listen: Option<Vec<std::net::SocketAddr>>,
    admin_listen: Option<std::net::SocketAddr>,
    cluster: Option<crate::cluster::ClusterConfig>,
    access_log: Option<Option<PathBuf>>,
    state_dir: PathBuf,
}

impl StartSettings {
    fn of(c: &Config) -> StartSettings {
        StartSettings {
            listen: c.server.listen.clone(),
            workers: c.server.workers,
            io: c.server.io,
            tls_listen: c.server.tls.as_ref().map(|t| t.listen.clone()),
            admin_listen: c.admin.as_ref().map(|a| a.listen),
            cluster: c.cluster.clone(),
            access_log: c.access_log.clone(),
            state_dir: c.server.state_dir.clone(),
        }
    }
}

/// Why `config` cannot serve the keys added at run time: a key's plan is not defined (the key
/// would be refused everywhere, still listing it), or two of its plans cover one API stage.
fn runtime_key_plans_error(
    auth: &crate::policy::auth::AuthState,
    config: &Config,
) -> Option<String> {
    for k in auth.keys().keys() {
        if k.source != crate::policy::auth::api_key::KeySource::Admin {
            continue;
        }
        if let Some(e) = config.traffic.plans.key_plans_error(&k.plans) {
            return Some(format!(
                "{}: key `{}` added at run time: {e} (adjust the plans, or delete the key first with DELETE /api-keys/{})",
                config.path.display(),
                k.name,
                k.name
            ));
        }
    }
    None
}

impl Shared {
    /// Builds the shared state around a first, already validated config.
    pub fn new(mut config: Config, access_log: Option<AccessLog>) -> Result<Arc<Shared>, String> {
        let dir = &config.server.state_dir;
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create state_dir {}: {e}", dir.display()))?;
        if !dir.is_dir() {
            return Err(format!("state_dir {} is not a directory", dir.display()));
        }
        // A usage file that cannot be read stops the start, as a bad key file does: starting
        // would set every quota back to 0. With `[cluster]` the counts live in Redis (see
        // `crate::cluster`) and the file keeps the cluster-wide counts last synced, which a
        // node started while Redis is down goes on from.
        let usage = crate::policy::plans::UsageStore::open(dir)?;
        config.traffic.plans.bind(&usage);
        let auth =
            crate::policy::auth::AuthState::new(&config.server.state_dir, &config.auth.api_keys)
                .map_err(|e| {
                    // A config key that would shadow a run-time one: named as a config error.
                    if e.starts_with("key `") {
                        crate::config::locate_message(&config.path, &e)
                    } else {
                        e
                    }
                })?;
        // As a reload would be: a run-time key's plans must all exist, one per API stage.
        if let Some(e) = runtime_key_plans_error(&auth, &config) {
            return Err(e);
        }
        config.auth.start();
        let health = HealthRegistry::default();
        let upstreams = Upstream::build_all(&config.upstreams, &health);
        let config_path = config.path.clone();
        let cluster = config.cluster.clone();
        let started = StartSettings::of(&config);
        let shared = Arc::new(Shared {
            current: ArcSwap::from_pointee(Gateway { config, upstreams }),
            generation: AtomicU64::new(1),
            shutdown: AtomicBool::new(false),
            drain_deadline: std::sync::OnceLock::new(),
            metrics: Registry::default(),
            health,
            ready: AtomicBool::new(false),
            access_log,
            caches: Default::default(),
            usage,
            auth,
            ws: Default::default(),
            cluster: std::sync::OnceLock::new(),
            config_path,
            started,
            reload_lock: Mutex::new(()),
            swap_lock: Mutex::new(()),
        });
        if let Some(c) = cluster {
            crate::cluster::start(&c, &shared)?;
        }
        Ok(shared)
    }

    /// Starts the drain (SIGTERM): it ends `server.shutdown_timeout_ms` from now, then
    /// raises `shutdown`.
    pub fn begin_shutdown(&self) {
        let swap = self.swap_lock.lock().unwrap_or_else(|e| e.into_inner());
        let t = self.current().config.server.shutdown_timeout;
        let _ = self.drain_deadline.set(std::time::Instant::now() + t);
        self.shutdown.store(true, Ordering::Release);
        drop(swap);
        self.ws.ring_all();
    }

    /// A reload is refused once the drain began (SIGHUP then is not a reload): the gateway
    /// is stopping with the config it had.
    fn refuse_when_draining(&self) -> Result<(), ConfigError> {
        if self.shutdown.load(Ordering::Acquire) {
            return Err(ConfigError(DRAINING.to_string()));
        }
        Ok(())
    }

    /// When the drain ends (the workers stop waiting for in-flight work), once it began.
    pub fn drain_deadline(&self) -> Option<std::time::Instant> {
        self.drain_deadline.get().copied()
    }

    /// The live gateway.
    pub fn current(&self) -> Arc<Gateway> {
        self.current.load_full()
    }

    /// Changes each time a new config goes live.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Reads the config file again and swaps it in; on any error the old config stays.
    /// Settings bound at start (listeners, workers, io, admin, cluster, access log, state_dir)
    /// need a restart; a value that differs from the one the process started with is reported
    /// in the returned notes and otherwise ignored.
    pub fn reload(&self) -> Result<Vec<String>, ConfigError> {
        let _g = self.reload_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.refuse_when_draining()?;
        let mut new = config::reload(&self.config_path)?;
        new.traffic.plans.bind(&self.usage);
        new.traffic.inherit(&self.current().config.traffic);
        let old = self.current();
        let mut notes = Vec::new();
        let run = &self.started;
        let now = StartSettings::of(&new);
        let changed: Vec<&str> = [
            ("server.listen", run.listen != now.listen),
            ("server.workers", run.workers != now.workers),
            ("server.io", run.io != now.io),
        ]
        .into_iter()
        .filter_map(|(k, differs)| differs.then_some(k))
        .collect();
        match changed[..] {
            [] => {}
            [k] => notes.push(format!("{k} takes effect at the next restart")),
            ref ks => notes.push(format!(
                "{} and {} take effect at the next restart",
                ks[..ks.len() - 1].join(", "),
                ks[ks.len() - 1]
            )),
        }
        if run.tls_listen != now.tls_listen {
            notes.push(if run.tls_listen.is_some() {
                "server.tls.listen takes effect at the next restart (certificates apply now)"
                    .to_string()
            } else {
                // Started without TLS: there is no listener for the certificates yet.
                "[server.tls] takes effect at the next restart (no TLS listener runs)".to_string()
            });
        }
        let o = &old.config.server;
        if new.server.tls.is_none() && o.tls.is_some() && run.tls_listen.is_some() {
            // The TLS listeners stay bound until a restart: they keep the certificates they had.
            notes.push(
                "[server.tls] was removed: its listeners keep serving with the previous certificates until the next restart"
                    .to_string(),
            );
            new.server.tls = o.tls.clone();
        }
        if new.admin.is_none() && run.admin_listen.is_some() {
            // The listener stays bound until a restart: it keeps the token it had (without
            // one it would be open to anyone who reaches it).
            notes.push(
                "[admin] was removed: its listener keeps serving, with the previous token, until the next restart"
                    .to_string(),
            );
            new.admin = old.config.admin.clone();
        } else if run.admin_listen != now.admin_listen {
            notes.push("admin.listen takes effect at the next restart".to_string());
        }
        if run.cluster != now.cluster {
            notes.push("cluster.redis takes effect at the next restart".to_string());
        }
        if run.access_log != now.access_log {
            notes.push("access_log.path takes effect at the next restart".to_string());
            new.access_log = run.access_log.clone();
        }
        if run.state_dir != now.state_dir {
            notes.push(format!(
                "server.state_dir takes effect at the next restart (keys and quota counts stay in {})",
                run.state_dir.display()
            ));
            new.server.state_dir = run.state_dir.clone();
        }
        // A run-time key may not lose a plan, nor end up in two plans of one stage (as a
        // config key may not).
        if let Some(e) = runtime_key_plans_error(&self.auth, &new) {
            return Err(ConfigError(e));
        }
        // The JWKS fetches (blocking, up to their timeout each) before the last checks: a
        // refused reload drops `new`, and with it the refreshers just started.
        new.auth.start();
        // A drain that began while the new config was read, compiled and its keys fetched;
        // from here to the swap nothing blocks, and the drain cannot begin meanwhile.
        let _swap = self.swap_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.refuse_when_draining()?;
        // Last check, and the first change: the config's keys may not shadow run-time keys.
        self.auth
            .set_config_keys(&new.auth.api_keys)
            .map_err(|e| ConfigError(crate::config::locate_message(&self.config_path, &e)))?;
        let upstreams = Upstream::build_all(&new.upstreams, &self.health);
        self.caches.prune(&new.routes);
        self.current.store(Arc::new(Gateway {
            config: new,
            upstreams,
        }));
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(notes)
    }
}
