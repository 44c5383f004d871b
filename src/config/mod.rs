//! Configuration: loading the TOML file, validating it into runtime types and compiling the
//! route table.
//!
//! [`load`] is the only entry point: it reads the file, deserializes the [`raw`] structs (unknown
//! keys are errors), checks every value, resolves upstream names and stage variables, and builds
//! the [`RouteTable`]. Every error names the file, the line and the key.

pub(crate) mod locate;
pub use locate::locate_message;
pub mod raw;
mod routes;
pub(crate) use routes::strip_port;

pub(crate) use routes::{route_labels, subst_stage_vars};
pub use routes::{Integration, MockResponse, PathTemplate, Route, RouteMatch, RouteTable};

use raw::{RawConfig, RawUpstream};
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A configuration error: one line naming the file, the line and the key.
#[derive(Debug, Clone)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Builds errors that point into the source file.
pub(crate) struct Source<'a> {
    pub path: &'a Path,
    pub text: &'a str,
}

impl<'a> Source<'a> {
    pub fn new(path: &'a Path, text: &'a str) -> Self {
        Source { path, text }
    }

    /// 1-based line of a byte offset.
    fn line(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .matches('\n')
            .count()
            + 1
    }

    /// An error about `key` (a path like `upstreams[0].targets`) at `span`. An empty span at 0
    /// ("a default value", or no span at hand) takes the line of the key in the file, or of its
    /// nearest enclosing key or table when the key itself is absent.
    pub fn err(&self, span: Range<usize>, key: &str, msg: impl fmt::Display) -> ConfigError {
        let at = if span == (0..0) {
            locate::offset_of(self.text, &locate::split_key(key))
        } else {
            Some(span.start)
        };
        self.err_at(at, key, msg)
    }

    /// The one format of every config error: `FILE:LINE: key `KEY`: MESSAGE`.
    fn err_at(&self, offset: Option<usize>, key: &str, msg: impl fmt::Display) -> ConfigError {
        let file = self.path.display();
        let msg = msg.to_string().replace('\n', " ");
        let msg = msg.trim();
        match (offset, key.is_empty()) {
            (Some(o), false) => ConfigError(format!("{file}:{}: key `{key}`: {msg}", self.line(o))),
            (Some(o), true) => ConfigError(format!("{file}:{}: {msg}", self.line(o))),
            (None, false) => ConfigError(format!("{file}: key `{key}`: {msg}")),
            (None, true) => ConfigError(format!("{file}: {msg}")),
        }
    }

    /// Deserializes the whole file into `T` (the [`raw`] structs of the config, or of a file
    /// it names, like a WAF rule file); errors name the key path and its line as
    /// [`Source::serde_err`] does.
    pub fn deserialize<T: serde::de::DeserializeOwned>(&self) -> Result<T, ConfigError> {
        serde_path_to_error::deserialize(toml::Deserializer::new(self.text))
            .map_err(|e| self.serde_err(e))
    }

    /// An error from deserializing the file into the [`raw`] structs: a syntax error (no key),
    /// a value of the wrong type, a missing or unknown key, an unknown variant.
    fn serde_err(&self, e: serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
        let mut path = locate::serde_path(e.path());
        let inner = e.inner();
        let mut msg = inner.message().to_string();
        if path.is_empty() {
            // Not a TOML document: no key to name, only the line (toml's message spans lines).
            let parts: Vec<&str> = msg
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            msg = format!("invalid TOML: {}", parts.join("; "));
        } else if let Some(field) = backticked_after(&msg, "missing field ") {
            // Name the missing key itself; its line is that of its table.
            path.push(locate::Segment::Key(field));
            msg = "required key is missing".to_string();
        } else if let Some(field) = backticked_after(&msg, "unknown field ") {
            let rest = &msg["unknown field ``".len() + field.len()..];
            msg = format!("unknown key{rest}");
            let field = locate::Segment::Key(field);
            if path.last() != Some(&field) {
                path.push(field);
            }
        }
        let key = locate::join_key(&path);
        // toml's span is the offending value, or for some errors (a missing key, a refused
        // integration key) the whole enclosing table. The key's own place in the file, or the
        // nearest enclosing one it has, never lies past the offending value: the later of the
        // two is the more precise.
        let at = match (
            inner.span().map(|s| s.start),
            locate::offset_of(self.text, &path),
        ) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.err_at(at, &key, msg)
    }
}

/// `NAME` when `msg` starts with `prefix` followed by `` `NAME` ``.
fn backticked_after(msg: &str, prefix: &str) -> Option<String> {
    let rest = msg.strip_prefix(prefix)?.strip_prefix('`')?;
    rest.find('`').map(|end| rest[..end].to_string())
}

/// The io driver a worker runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoMode {
    /// io_uring when the kernel allows it, epoll otherwise.
    Auto,
    /// io_uring or fail.
    IoUring,
    /// epoll.
    Epoll,
}

/// `[server.limits]`, validated.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_body_bytes: u64,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    /// Request bodies held whole at once (WAF body rules, SigV4, `validate`), all workers
    /// together: each worker gets its share.
    pub max_held_body_bytes: u64,
}

/// `[server]`, validated.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: Vec<SocketAddr>,
    /// Resolved worker count (never 0).
    pub workers: usize,
    pub io: IoMode,
    /// Pin each worker to one core (worker i to core i mod cores).
    pub pin_workers: bool,
    pub shutdown_timeout: Duration,
    /// Run-time API keys and quota counts; a relative `state_dir` is relative to the config
    /// file's directory.
    pub state_dir: PathBuf,
    pub limits: Limits,
    /// `[server.tls]`: HTTPS listeners and their certificates.
    pub tls: Option<crate::tls::TlsSettings>,
}

/// `[admin]`, validated.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub token: Option<String>,
}

/// How an upstream picks a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    LeastConn,
    /// Power of two random choices, by in-flight requests.
    Random2,
    /// Hash of a request header (lowercase name); round robin when the header is absent.
    HashHeader(String),
}

/// Active health checking of an upstream's targets.
#[derive(Debug, Clone)]
pub struct HealthConfig {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_after: u32,
    pub healthy_after: u32,
}

/// Passive health checking: a target that fails `max_fails` requests in a row (connect
/// errors, timeouts, resets or invalid answers) gets no traffic for `fail_timeout`.
#[derive(Debug, Clone, Copy)]
pub struct PassiveConfig {
    pub max_fails: u32,
    pub fail_timeout: Duration,
}

/// `[[upstreams]]`, validated.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: String,
    pub targets: Vec<SocketAddr>,
    pub balance: Balance,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub retries: u32,
    pub keepalive: usize,
    /// Connections in use at once to each target, across the workers (`None`: no cap).
    pub max_connections: Option<u32>,
    pub health: Option<HealthConfig>,
    pub passive: Option<PassiveConfig>,
}

/// The whole validated configuration.
#[derive(Debug)]
pub struct Config {
    /// The file it came from (reloads read it again).
    pub path: PathBuf,
    pub server: ServerConfig,
    pub admin: Option<AdminConfig>,
    /// `None` = off; `Some(None)` = stdout; `Some(Some(path))` = a file (a relative path in the
    /// file is relative to the config file's directory).
    pub access_log: Option<Option<PathBuf>>,
    pub upstreams: Vec<UpstreamConfig>,
    pub routes: RouteTable,
    /// Throttles, WAF, CORS and usage plans (indexed by route id where per route).
    pub traffic: crate::policy::Traffic,
    /// `[[authorizers]]`, `[[sigv4_credentials]]`, `[[api_keys]]`.
    pub auth: crate::policy::auth::AuthConfig,
    /// `[cluster]`: state shared with other nodes through Redis.
    pub cluster: Option<crate::cluster::ClusterConfig>,
}

impl Config {
    /// Read-only checks of what the gateway creates or opens at start (`--check` runs them;
    /// so does the start, before anything else): `server.state_dir` is a directory or can be
    /// made one, and the access log file can be opened or made. The error is one line naming
    /// the config file, the key and the path.
    pub fn check_paths(&self) -> Result<(), String> {
        let err =
            |key: &str, msg: String| locate_message(&self.path, &format!("key `{key}`: {msg}"));
        let dir = &self.server.state_dir;
        match std::fs::metadata(dir) {
            Ok(m) if !m.is_dir() => {
                return Err(err(
                    "server.state_dir",
                    format!("{} is not a directory", dir.display()),
                ))
            }
            Ok(_) => {
                // The gateway makes its state files in it.
                if let Err(e) = may_create_in(dir) {
                    return Err(err(
                        "server.state_dir",
                        format!("cannot write in {}: {e}", dir.display()),
                    ));
                }
            }
            Err(_) => {
                // Made at start with its missing parents: the nearest existing one must be a
                // directory the gateway may create entries in.
                if let Some(a) = dir.ancestors().skip(1).find(|a| a.exists()) {
                    let why = if a.is_dir() {
                        may_create_in(a).err().map(|e| e.to_string())
                    } else {
                        Some(format!("{} is not a directory", a.display()))
                    };
                    if let Some(why) = why {
                        return Err(err(
                            "server.state_dir",
                            format!("cannot create {}: {why}", dir.display()),
                        ));
                    }
                }
            }
        }
        if let Some(Some(p)) = &self.access_log {
            let key = "access_log.path";
            match std::fs::metadata(p) {
                Ok(m) if m.is_dir() => {
                    return Err(err(key, format!("{} is a directory", p.display())))
                }
                Ok(_) => {
                    // Opening an existing file for appending changes nothing in it.
                    std::fs::OpenOptions::new()
                        .append(true)
                        .open(p)
                        .map_err(|e| err(key, format!("cannot open {}: {e}", p.display())))?;
                }
                Err(_) => {
                    let parent = match p.parent() {
                        Some(d) if !d.as_os_str().is_empty() => d,
                        _ => Path::new("."),
                    };
                    if !parent.is_dir() {
                        return Err(err(
                            key,
                            format!(
                                "cannot create {}: {} is not an existing directory",
                                p.display(),
                                parent.display()
                            ),
                        ));
                    }
                    if let Err(e) = may_create_in(parent) {
                        return Err(err(key, format!("cannot create {}: {e}", p.display())));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Whether listeners on `a` and `b` would take each other's connections: one port, and the
/// same address or a wildcard on either side.
fn overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Whether this process may create entries in directory `dir` (write and search permission,
/// as `access(2)` judges them for the real user), without creating anything.
fn may_create_in(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in path"))?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call; `access` only
    // reads it.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Reads, validates and compiles the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    parse(path, &read(path)?)
}

/// As [`load`], for a reload: an empty file is refused. It is most likely one caught while a
/// tool rewrites it in place, and it would take every route away.
pub fn reload(path: &Path) -> Result<Config, ConfigError> {
    let text = read(path)?;
    if text.trim().is_empty() {
        return Err(ConfigError(format!(
            "{}: the file is empty (keeping the running config)",
            path.display()
        )));
    }
    parse(path, &text)
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("{}: cannot read config: {e}", path.display())))
}

/// Validates and compiles config `text` (which came from `path`).
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let src = Source::new(path, text);
    let raw: RawConfig = src.deserialize()?;

    let mut server = validate_server(&src, &raw)?;
    let admin = match &raw.admin {
        None => None,
        Some(a) => {
            let listen = parse_addr(&src, &a.listen, "admin.listen")?;
            // Both would bind the port: the start would fail with "address in use".
            if let Some(s) = server.listen.iter().find(|s| overlap(**s, listen)) {
                return Err(src.err(
                    a.listen.span(),
                    "admin.listen",
                    format!("{listen} is already used by server.listen ({s})"),
                ));
            }
            let token =
                match &a.token {
                    // An unset template variable must not open the admin API.
                    Some(t) if t.get_ref().is_empty() => return Err(src.err(
                        t.span(),
                        "admin.token",
                        "is empty: set a token, or remove the key to run the admin API without one",
                    )),
                    // A header value is trimmed and has no control characters: a token with
                    // spaces around it (a template's trailing newline) could never match.
                    Some(t) if !t.get_ref().bytes().all(|b| b.is_ascii_graphic()) => return Err(src.err(
                        t.span(),
                        "admin.token",
                        "must be visible ASCII characters only (no spaces, newlines or control characters): no Authorization header could carry it",
                    )),
                    Some(t) => Some(t.get_ref().clone()),
                    None => None,
                };
            Some(AdminConfig { listen, token })
        }
    };
    if let Some(t) = &raw.server.tls {
        let mut listen: Vec<SocketAddr> = Vec::new();
        let addrs = match &t.get_ref().listen {
            Some(l) if !l.get_ref().is_empty() => l.get_ref(),
            other => {
                let span = other.as_ref().map(|l| l.span()).unwrap_or(t.span());
                return Err(src.err(span, "server.tls.listen", "at least one address is needed"));
            }
        };
        for a in addrs {
            let addr = parse_addr(&src, a, "server.tls.listen")?;
            // The same address twice would share one SO_REUSEPORT group: connections would
            // land on either protocol at random. A wildcard address overlaps every address of
            // its port: clients of one would reach the other.
            let taken = server
                .listen
                .iter()
                .chain(&listen)
                .chain(admin.as_ref().map(|a| &a.listen))
                .any(|l| overlap(*l, addr));
            if taken {
                return Err(src.err(
                    a.span(),
                    "server.tls.listen",
                    format!("{addr} is already used by another listener"),
                ));
            }
            listen.push(addr);
        }
        server.tls = Some(crate::tls::build(&src, t, listen)?);
    }
    let access_log = match raw.access_log.as_ref() {
        None => None,
        Some(a) if a.path == "-" => Some(None),
        Some(a) if a.path.is_empty() => {
            return Err(src.err(
                0..0,
                "access_log.path",
                "must be \"-\" (stdout) or a file path",
            ))
        }
        Some(a) => Some(Some(relative_to_config(path, &a.path))),
    };
    let mut upstreams: Vec<UpstreamConfig> = Vec::with_capacity(raw.upstreams.len());
    for (i, u) in raw.upstreams.iter().enumerate() {
        let up = validate_upstream(&src, i, u)?;
        if upstreams.iter().any(|o| o.name == up.name) {
            return Err(src.err(
                u.name.span(),
                &format!("upstreams[{i}].name"),
                format!("duplicate upstream name `{}`", up.name),
            ));
        }
        upstreams.push(up);
    }
    let auth = crate::policy::auth::validate(
        &src,
        &raw.authorizers,
        &raw.sigv4_credentials,
        &raw.api_keys,
        &upstreams,
    )?;
    let routes = routes::compile(&src, &raw.apis, &upstreams, &auth)?;
    let traffic = crate::policy::build(&src, &raw, &routes)?;
    let cluster = match &raw.cluster {
        Some(c) => Some(crate::cluster::validate(&src, c)?),
        None => None,
    };
    Ok(Config {
        path: path.to_path_buf(),
        server,
        admin,
        access_log,
        upstreams,
        routes,
        traffic,
        auth,
        cluster,
    })
}

/// `p` as written in the config file at `config`: a relative path is relative to the file's
/// directory (as TLS files, WAF rule files and schemas are), not to the working directory.
fn relative_to_config(config: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    config.parent().unwrap_or(Path::new("")).join(p)
}

fn validate_server(src: &Source, raw: &RawConfig) -> Result<ServerConfig, ConfigError> {
    let s = &raw.server;
    if s.listen.is_empty() {
        return Err(src.err(0..0, "server.listen", "at least one address is needed"));
    }
    let mut listen = Vec::new();
    for a in &s.listen {
        let addr = parse_addr(src, a, "server.listen")?;
        if listen.contains(&addr) {
            return Err(src.err(a.span(), "server.listen", format!("{addr} is listed twice")));
        }
        listen.push(addr);
    }
    let io = match s.io.get_ref().as_str() {
        "auto" => IoMode::Auto,
        "io_uring" => IoMode::IoUring,
        "epoll" => IoMode::Epoll,
        other => {
            return Err(src.err(
                s.io.span(),
                "server.io",
                format!("`{other}` is not one of auto, io_uring, epoll"),
            ))
        }
    };
    let workers = if s.workers == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    } else {
        s.workers
    };
    if workers > 1024 {
        return Err(src.err(0..0, "server.workers", "at most 1024 workers"));
    }
    if s.state_dir.is_empty() {
        return Err(src.err(0..0, "server.state_dir", "must be a directory path"));
    }
    let l = &s.limits;
    let checks: [(&str, bool); 7] = [
        (
            "server.limits.max_header_bytes",
            (256..=1 << 20).contains(&l.max_header_bytes),
        ),
        (
            "server.limits.max_headers",
            (1..=256).contains(&l.max_headers),
        ),
        ("server.limits.max_body_bytes", true),
        ("server.limits.header_timeout_ms", l.header_timeout_ms > 0),
        ("server.limits.idle_timeout_ms", l.idle_timeout_ms > 0),
        ("server.limits.max_connections", l.max_connections > 0),
        (
            "server.limits.max_held_body_bytes",
            l.max_held_body_bytes > 0,
        ),
    ];
    for (key, ok) in checks {
        if !ok {
            let hint = match key {
                "server.limits.max_header_bytes" => "must be between 256 and 1048576",
                "server.limits.max_headers" => "must be between 1 and 256",
                _ => "must be greater than 0",
            };
            return Err(src.err(0..0, key, hint));
        }
    }
    Ok(ServerConfig {
        listen,
        workers,
        io,
        pin_workers: s.pin_workers,
        shutdown_timeout: Duration::from_millis(s.shutdown_timeout_ms),
        state_dir: relative_to_config(src.path, &s.state_dir),
        limits: Limits {
            max_header_bytes: l.max_header_bytes,
            max_headers: l.max_headers,
            max_body_bytes: l.max_body_bytes,
            header_timeout: Duration::from_millis(l.header_timeout_ms),
            idle_timeout: Duration::from_millis(l.idle_timeout_ms),
            max_connections: l.max_connections,
            max_held_body_bytes: l.max_held_body_bytes,
        },
        tls: None,
    })
}

fn parse_addr(
    src: &Source,
    a: &toml::Spanned<String>,
    key: &str,
) -> Result<SocketAddr, ConfigError> {
    let s = a.get_ref();
    let addr = match s.parse::<SocketAddr>() {
        Ok(addr) => addr,
        Err(_) => match s.to_socket_addrs() {
            Ok(mut it) => it
                .next()
                .ok_or_else(|| src.err(a.span(), key, format!("`{s}` resolves to no address")))?,
            Err(e) => {
                return Err(src.err(
                    a.span(),
                    key,
                    format!("`{s}` is not a host:port address ({e})"),
                ))
            }
        },
    };
    if addr.port() == 0 {
        // A listener on port 0 would get a kernel-chosen port per worker (each binds its own
        // SO_REUSEPORT socket), none of them known to clients; nothing answers on port 0.
        let why = if key.ends_with("listen") {
            "each worker binds its own listener, so a port the kernel chooses would differ per worker"
        } else {
            "nothing can be reached on port 0"
        };
        return Err(src.err(
            a.span(),
            key,
            format!("`{s}`: port 0 is not allowed ({why})"),
        ));
    }
    Ok(addr)
}

fn validate_upstream(
    src: &Source,
    i: usize,
    u: &RawUpstream,
) -> Result<UpstreamConfig, ConfigError> {
    let key = |k: &str| format!("upstreams[{i}].{k}");
    let name = u.name.get_ref().clone();
    if name.is_empty() || name.contains("${") {
        return Err(src.err(
            u.name.span(),
            &key("name"),
            "must be a plain non-empty name",
        ));
    }
    if u.targets.is_empty() {
        return Err(src.err(0..0, &key("targets"), "at least one target is needed"));
    }
    let mut targets = Vec::new();
    for t in &u.targets {
        targets.push(parse_addr(src, t, &key("targets"))?);
    }
    let balance = match u.balance.get_ref().as_str() {
        "round_robin" => Balance::RoundRobin,
        "least_conn" => Balance::LeastConn,
        "random2" => Balance::Random2,
        b => match b.strip_prefix("hash:header.") {
            Some(h)
                if !h.is_empty()
                    && h.bytes().all(|c| {
                        c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
                    }) =>
            {
                Balance::HashHeader(h.to_ascii_lowercase())
            }
            _ => {
                return Err(src.err(
                    u.balance.span(),
                    &key("balance"),
                    format!(
                        "`{b}` is not one of round_robin, least_conn, random2, hash:header.NAME (NAME a header field name)"
                    ),
                ))
            }
        },
    };
    if u.connect_timeout_ms == 0 || u.timeout_ms == 0 {
        return Err(src.err(
            0..0,
            &key(if u.timeout_ms == 0 {
                "timeout_ms"
            } else {
                "connect_timeout_ms"
            }),
            "timeouts must be greater than 0",
        ));
    }
    if u.max_connections == Some(0) {
        return Err(src.err(
            0..0,
            &key("max_connections"),
            "must be greater than 0 (leave it out for no cap)",
        ));
    }
    let health = match &u.health {
        None => None,
        Some(h) => {
            if !h.path.starts_with('/') {
                return Err(src.err(0..0, &key("health.path"), "must start with `/`"));
            }
            // It goes on the probe's request line as written.
            if !h.path.bytes().all(|b| b.is_ascii_graphic() && b != b'#') {
                return Err(src.err(
                    0..0,
                    &key("health.path"),
                    "must be visible ASCII without `#` (percent-encode spaces and control characters)",
                ));
            }
            if h.interval_ms == 0
                || h.unhealthy_after == 0
                || h.healthy_after == 0
                || h.timeout_ms == Some(0)
            {
                return Err(src.err(
                    0..0,
                    &key("health"),
                    "interval_ms, timeout_ms, unhealthy_after and healthy_after must be greater than 0",
                ));
            }
            Some(HealthConfig {
                path: h.path.clone(),
                interval: Duration::from_millis(h.interval_ms),
                timeout: Duration::from_millis(h.timeout_ms.unwrap_or(h.interval_ms.min(1000))),
                unhealthy_after: h.unhealthy_after,
                healthy_after: h.healthy_after,
            })
        }
    };
    let passive = match &u.passive {
        None => None,
        Some(p) => {
            if p.max_fails == 0 {
                return Err(src.err(
                    0..0,
                    &key("passive.max_fails"),
                    "must be greater than 0 (leave `passive` out to turn passive checks off)",
                ));
            }
            if !(1..=3_600_000).contains(&p.fail_timeout_ms) {
                return Err(src.err(
                    0..0,
                    &key("passive.fail_timeout_ms"),
                    "must be between 1 and 3600000 (an hour)",
                ));
            }
            Some(PassiveConfig {
                max_fails: p.max_fails,
                fail_timeout: Duration::from_millis(p.fail_timeout_ms),
            })
        }
    };
    Ok(UpstreamConfig {
        name,
        targets,
        balance,
        connect_timeout: Duration::from_millis(u.connect_timeout_ms),
        timeout: Duration::from_millis(u.timeout_ms),
        retries: u.retries,
        keepalive: u.keepalive,
        max_connections: u.max_connections,
        health,
        passive,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_toml_example_of_the_readme_is_valid_toml() {
        let readme = include_str!("../../README.md");
        let mut n = 0;
        for (i, block) in readme.split("```toml\n").skip(1).enumerate() {
            let body = block.split("```").next().unwrap_or("");
            if let Err(e) = toml::from_str::<toml::Value>(body) {
                panic!("README toml example {i} is not valid TOML: {e}\n{body}");
            }
            n += 1;
        }
        assert!(n > 10, "only {n} examples found");
    }

    fn p(text: &str) -> Result<Config, ConfigError> {
        parse(Path::new("t.toml"), text)
    }

    #[test]
    fn defaults_apply() {
        let c = p("").unwrap();
        assert_eq!(c.server.listen, vec!["127.0.0.1:8080".parse().unwrap()]);
        assert_eq!(c.server.limits.max_headers, 100);
        assert!(c.server.workers >= 1);
    }

    #[test]
    fn unknown_key_names_line() {
        let e = p("[server]\nworkers = 1\nbogus = 2\n").unwrap_err().0;
        assert!(
            e.starts_with("t.toml:3: key `server.bogus`: unknown key"),
            "{e}"
        );
    }

    #[test]
    fn bad_io_names_key_and_line() {
        let e = p("[server]\n\nio = \"kqueue\"\n").unwrap_err().0;
        assert!(e.starts_with("t.toml:3: key `server.io`"), "{e}");
    }

    #[test]
    fn duplicate_upstream_refused() {
        let e = p("[[upstreams]]\nname=\"a\"\ntargets=[\"127.0.0.1:1\"]\n[[upstreams]]\nname=\"a\"\ntargets=[\"127.0.0.1:2\"]\n")
            .unwrap_err()
            .0;
        assert!(
            e.contains("t.toml:5") && e.contains("duplicate upstream"),
            "{e}"
        );
    }

    #[test]
    fn listener_clashes_and_an_empty_admin_token_are_refused() {
        refused(
            "[server]\nlisten = [\"127.0.0.1:9000\", \"127.0.0.1:9000\"]\n",
            "t.toml:2: key `server.listen`: 127.0.0.1:9000 is listed twice",
        );
        refused(
            "[server]\nlisten = [\"127.0.0.1:9000\"]\n[admin]\nlisten = \"127.0.0.1:9000\"\n",
            "t.toml:4: key `admin.listen`: 127.0.0.1:9000 is already used by server.listen",
        );
        refused(
            "[server]\nlisten = [\"0.0.0.0:9000\"]\n[admin]\nlisten = \"127.0.0.1:9000\"\n",
            "t.toml:4: key `admin.listen`",
        );
        refused(
            "[admin]\nlisten = \"127.0.0.1:9901\"\ntoken = \"\"\n",
            "t.toml:3: key `admin.token`: is empty",
        );
        for bad in ["t\\n", " t", "t ", "a b", "x\\u0001y", "caf\\u00e9"] {
            refused(
                &format!("[admin]\nlisten = \"127.0.0.1:9901\"\ntoken = \"{bad}\"\n"),
                "t.toml:3: key `admin.token`: must be visible ASCII characters only",
            );
        }
        for (text, key) in [
            ("[server]\nlisten = [\"127.0.0.1:0\"]\n", "t.toml:2: key `server.listen`: `127.0.0.1:0`: port 0 is not allowed (each worker"),
            ("[admin]\nlisten = \"127.0.0.1:0\"\n", "t.toml:2: key `admin.listen`: `127.0.0.1:0`: port 0 is not allowed"),
            ("[[upstreams]]\nname = \"u\"\ntargets = [\"127.0.0.1:0\"]\n", "t.toml:3: key `upstreams[0].targets`: `127.0.0.1:0`: port 0 is not allowed (nothing"),
        ] {
            refused(text, key);
        }
        assert!(p("[server]\nlisten = [\"127.0.0.1:9000\"]\n[admin]\nlisten = \"127.0.0.1:9001\"\ntoken = \"t+&=%#/~!\"\n").is_ok());
        // A plan's usage is read at `/usage-plans/{plan}/usage`: its name is a path segment.
        for name in ["a/b", "..", ""] {
            refused(
                &format!("[[usage_plans]]\nname = \"{name}\"\n"),
                "t.toml:2: key `usage_plans[0].name`",
            );
        }
    }

    /// Asserts that config `text` is refused with an error starting with `want`.
    fn refused(text: &str, want: &str) {
        let e = p(text).unwrap_err().0;
        assert!(e.starts_with(want), "got:  {e}\nwant: {want}");
        assert!(!e.contains('\n'), "{e}");
    }

    /// A value of the wrong type.
    #[test]
    fn type_error_names_key_and_line() {
        refused(
            "[server]\nworkers = 1\nshutdown_timeout_ms = \"ten\"\n",
            "t.toml:3: key `server.shutdown_timeout_ms`: invalid type: string \"ten\", expected u64",
        );
    }

    /// A required key that is missing: the line of its table.
    #[test]
    fn missing_key_names_key_and_table_line() {
        refused(
            "[server]\nworkers = 1\n\n[[upstreams]]\nname = \"u\"\n",
            "t.toml:4: key `upstreams[0].targets`: required key is missing",
        );
    }

    /// An unknown variant, inside `[[apis.routes]]`.
    #[test]
    fn unknown_variant_in_routes_names_key_and_line() {
        refused(
            "[[apis]]\nname = \"a\"\n[[apis.routes]]\nroute = \"GET /\"\n\
             integration = { type = \"mock\" }\n[[apis.routes]]\nroute = \"GET /b\"\n\
             integration = { type = \"mocky\", status = 200 }\n",
            "t.toml:8: key `apis[0].routes[1].integration.type`: unknown variant `mocky`, expected `http` or `mock`",
        );
    }

    /// An unknown nested key: the whole path, not only its last name.
    #[test]
    fn unknown_nested_key_names_full_path() {
        refused(
            "[server]\nworkers = 1\n[server.limits]\nmax_headers = 10\nbogus_key = 2\n",
            "t.toml:5: key `server.limits.bogus_key`: unknown key, expected one of",
        );
    }

    /// Inside an integration table: the key itself, and its own line.
    #[test]
    fn bad_integration_value_names_its_key_and_line() {
        refused(
            "[[apis]]\nname = \"a\"\n[[apis.routes]]\nroute = \"GET /\"\n\
             [apis.routes.integration]\ntype = \"mock\"\n\nstatus = \"x\"\n",
            "t.toml:8: key `apis[0].routes[0].integration.status`: invalid type: string \"x\", expected u16",
        );
    }

    /// Values checked after deserializing: the line of the key, not of its table's first key.
    #[test]
    fn checked_values_name_their_own_line() {
        let up = "[[upstreams]]\nname = \"u\"\ntargets = [\"127.0.0.1:9\"]\n";
        refused(
            &format!("{up}[[authorizers]]\nname = \"z\"\ntype = \"request\"\nupstream = \"u\"\nidentity_sources = [\"header.a\"]\npath = \"a\"\n"),
            "t.toml:9: key `authorizers[0].path`: must start with `/`",
        );
        refused(
            "[[sigv4_credentials]]\naccess_key = \"AK\"\nregion = \"r\"\nservice = \"s\"\nprincipal = \"p\"\nsecret_key = \"x\"\n",
            "t.toml:6: key `sigv4_credentials[0].secret_key`: at least 16 characters",
        );
        refused(
            "[waf]\nip_allow = []\nip_deny = [\"10.0.0.0/33\"]\n",
            "t.toml:3: key `waf.ip_deny`: `10.0.0.0/33` is not",
        );
    }

    #[test]
    fn integration_key_of_other_type_names_key_and_line() {
        refused(
            "[[apis]]\nname = \"a\"\n[[apis.routes]]\nroute = \"GET /\"\n\
             [apis.routes.integration]\ntype = \"http\"\nupstream = \"u\"\nbody = \"\"\n",
            "t.toml:8: key `apis[0].routes[0].integration.body`: unknown key for type `http`",
        );
    }

    #[test]
    fn missing_integration_key_names_key() {
        refused(
            "[[apis]]\nname = \"a\"\n[[apis.routes]]\nroute = \"GET /\"\n\
             integration = { type = \"http\" }\n",
            "t.toml:5: key `apis[0].routes[0].integration.upstream`: required key is missing",
        );
    }

    /// Keys that are not bare are quoted as in TOML.
    #[test]
    fn quoted_keys_in_paths() {
        refused(
            "[[apis]]\nname = \"a\"\n[apis.stages.\"$default\"]\ncache = { ttl_s = \"x\" }\n",
            "t.toml:4: key `apis[0].stages.\"$default\".cache.ttl_s`: invalid type",
        );
        // Also in the checks made after parsing: `a.b` is one stage, not two tables.
        refused(
            "[[apis]]\nname = \"a\"\n[apis.stages.\"a.b\"]\n[[apis.routes]]\nroute = \"GET /\"\nintegration = { type = \"mock\" }\n",
            "t.toml:3: key `apis[0].stages.\"a.b\"`: stage names are",
        );
    }

    #[test]
    fn validation_errors_without_span_find_the_line() {
        let e = p(
            "[server]\nworkers = 1\n\n[server.limits]\nmax_headers = 10\nmax_header_bytes = 0\n",
        )
        .unwrap_err()
        .0;
        assert_eq!(
            e,
            "t.toml:6: key `server.limits.max_header_bytes`: must be between 256 and 1048576"
        );
        let e = p("[admin]\nlisten = \"127.0.0.1:1\"\n[server]\nlisten = []\n")
            .unwrap_err()
            .0;
        assert_eq!(
            e,
            "t.toml:4: key `server.listen`: at least one address is needed"
        );
        let e = p("server.workers = 5000\n").unwrap_err().0;
        assert_eq!(e, "t.toml:1: key `server.workers`: at most 1024 workers");
    }

    #[test]
    fn syntax_errors_are_one_line() {
        let e = p("[server]\nworkers = \n").unwrap_err().0;
        assert!(e.starts_with("t.toml:2: invalid TOML: "), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn bad_balance_refused() {
        let e = p("[[upstreams]]\nname=\"a\"\ntargets=[\"127.0.0.1:1\"]\nbalance=\"hash:\"\n")
            .unwrap_err()
            .0;
        assert!(e.contains("upstreams[0].balance"), "{e}");
    }
}
