//! ringgate: a thread-per-core API gateway on io_uring.
//!
//! The binary (`src/main.rs`) only parses the command line; everything lives here so tests,
//! benches and embedders can use it. Module map:
//! - [`config`]: TOML to validated runtime types and the compiled route table;
//! - [`runtime`]: the supervisor, pinned workers, io driver set-up, signals;
//! - [`server`]: the per-connection HTTP/1.1 loop and the `http`/`mock` integrations;
//! - [`http`]: our HTTP/1.1 codec (heads, chunked bodies, encoding);
//! - [`router`]: the path trie;
//! - [`upstream`]: pools, balancing, health;
//! - [`cache`]: the response cache (stores, keys, rules, invalidation);
//! - [`policy`]: pipeline stages: auth, throttles, usage plans, WAF, CORS;
//! - [`metrics`], [`accesslog`], [`admin`]: observability and management;
//! - [`gateway`]: the live state shared by all threads;
//! - [`cluster`]: state shared between nodes through Redis (`[cluster]`);
//! - [`statefile`]: durable replacement of the files in `server.state_dir`;
//! - [`ws`]: WebSocket codec, pass-through and WebSocket APIs;
//! - [`tls`]: HTTPS listeners (`[server.tls]`): certificates, SNI, mTLS, the TLS stream.

/// Writes one line to stderr in a single write (stderr is unbuffered: `eprintln!` writes each
/// formatted piece on its own, so lines of different threads could interleave).
#[macro_export]
macro_rules! elog {
    ($($t:tt)*) => {{
        let mut line = format!($($t)*);
        line.push('\n');
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    }};
}

pub mod accesslog;
pub mod admin;
pub mod cache;
pub mod cluster;
pub mod config;
pub mod gateway;
pub mod http;
pub mod metrics;
pub mod policy;
pub mod router;
pub mod runtime;
pub mod server;
pub mod statefile;
pub mod tls;
pub mod upstream;
pub mod ws;
