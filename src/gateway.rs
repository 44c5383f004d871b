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

/// One compiled config with its runtime upstreams.
pub struct Gateway {
    pub config: Config,
    pub upstreams: Vec<Upstream>,
}

/// State shared by the supervisor, the workers and the admin listener.
pub struct Shared {
    current: ArcSwap<Gateway>,
    generation: AtomicU64,
    /// Set on SIGTERM/SIGINT: stop accepting, drain, exit.
    pub shutdown: AtomicBool,
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
    reload_lock: Mutex<()>,
}

impl Shared {
    /// Builds the shared state around a first, already validated config.
    pub fn new(mut config: Config, access_log: Option<AccessLog>) -> Result<Arc<Shared>, String> {
        // With `[cluster]` the counts live in Redis (see `crate::cluster`).
        let usage = if config.cluster.is_some() {
            crate::policy::plans::UsageStore::in_memory()
        } else {
            crate::policy::plans::UsageStore::open(&config.server.state_dir).unwrap_or_else(|e| {
                eprintln!("ringgate: usage counts will not persist: {e}");
                crate::policy::plans::UsageStore::in_memory()
            })
        };
        config.traffic.plans.bind(&usage);
        let auth =
            crate::policy::auth::AuthState::new(&config.server.state_dir, &config.auth.api_keys)?;
        config.auth.start();
        let health = HealthRegistry::default();
        let upstreams = Upstream::build_all(&config.upstreams, &health);
        let config_path = config.path.clone();
        let cluster = config.cluster.clone();
        let shared = Arc::new(Shared {
            current: ArcSwap::from_pointee(Gateway { config, upstreams }),
            generation: AtomicU64::new(1),
            shutdown: AtomicBool::new(false),
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
            reload_lock: Mutex::new(()),
        });
        if let Some(c) = cluster {
            crate::cluster::start(&c, &shared)?;
        }
        Ok(shared)
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
    /// Settings bound at start (listeners, workers, io, admin, access log) need a restart; a
    /// change to them is reported in the returned notes and otherwise ignored.
    pub fn reload(&self) -> Result<Vec<String>, ConfigError> {
        let _g = self.reload_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut new = config::load(&self.config_path)?;
        new.traffic.plans.bind(&self.usage);
        new.traffic.inherit(&self.current().config.traffic);
        let old = self.current();
        let mut notes = Vec::new();
        let o = &old.config.server;
        let n = &new.server;
        if o.listen != n.listen || o.workers != n.workers || o.io != n.io {
            notes.push(
                "server.listen, server.workers and server.io take effect at the next restart"
                    .to_string(),
            );
        }
        let tls_listen = |c: &crate::config::ServerConfig| c.tls.as_ref().map(|t| t.listen.clone());
        if tls_listen(o) != tls_listen(n) {
            notes.push(
                "server.tls.listen takes effect at the next restart (certificates apply now)"
                    .to_string(),
            );
        }
        if n.tls.is_none() && o.tls.is_some() {
            // The TLS listeners stay bound until a restart: they keep the certificates they had.
            notes.push(
                "[server.tls] was removed: its listeners keep serving with the previous certificates until the next restart"
                    .to_string(),
            );
            new.server.tls = o.tls.clone();
        }
        if old.config.admin.as_ref().map(|a| a.listen) != new.admin.as_ref().map(|a| a.listen) {
            notes.push("admin.listen takes effect at the next restart".to_string());
        }
        if old.config.cluster != new.cluster {
            notes.push("cluster.redis takes effect at the next restart".to_string());
        }
        if old.config.access_log != new.access_log {
            notes.push("access_log.path takes effect at the next restart".to_string());
        }
        // Last check, and the first change: the config's keys may not shadow run-time keys.
        self.auth
            .set_config_keys(&new.auth.api_keys)
            .map_err(|e| ConfigError(format!("{}: {e}", self.config_path.display())))?;
        let upstreams = Upstream::build_all(&new.upstreams, &self.health);
        new.auth.start();
        self.caches.prune(&new.routes);
        self.current.store(Arc::new(Gateway {
            config: new,
            upstreams,
        }));
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(notes)
    }
}
