//! A cached `http` route: look the request up in the stage's store and answer a hit with the
//! stored bytes; on a miss, fetch once (concurrent misses for the key wait for that fetch) and
//! store the answer when the caching rules allow it.
//!
//! A hit costs a key build into a reused buffer, one hash lookup and one write: small entries
//! are copied with the per-request header block into the connection's reused output buffer
//! (one `write`); larger ones go out as one `writev` of the stored head, the per-request block
//! and the stored body, without copying them.

use super::{map_ctx, proxy, reject, write_out, ClientIo, Conn, Outcome, Worker};
use crate::cache::control::request_wants_refresh;
use crate::cache::{build_key, push_vary, CachePolicy, Capture, Entry, Invalidation, WorkerCache};
use crate::config::{PathTemplate, Route};
use crate::gateway::Gateway;
use crate::http::{encode, Method};
use bytes::Bytes;
use monoio::buf::IoVecBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

/// Entries up to this size are copied into the output buffer and written with one `write`;
/// larger ones are written with `writev` straight from the stored bytes. On loopback, copying
/// a few KB costs less than the kernel's per-iovec work.
const COPY_MAX: usize = 8 * 1024;

/// `Conn::cache_event` values, for the hit/miss counters.
pub(super) const EVENT_HIT: u8 = 1;
pub(super) const EVENT_MISS: u8 = 2;

/// A stored answer found for the request.
struct Hit {
    data: Bytes,
    head_len: usize,
    status: u16,
    stored_at: Instant,
}

/// Serves a request on a route with a cache policy.
#[allow(clippy::too_many_arguments, reason = "the request's whole context")]
pub(super) async fn serve<S: ClientIo>(
    w: &Rc<Worker>,
    gw: &Arc<Gateway>,
    c: &mut Conn<S>,
    route: &Route,
    pol: &CachePolicy,
    up: usize,
    tpl: Option<&PathTemplate>,
) -> Outcome {
    let head_req = c.b.head.method == Method::Head;
    if c.b.head.upgrade_websocket {
        // Not an HTTP response to label or keep.
        return proxy::proxy(w, gw, c, route, up, tpl, None).await;
    }
    if !pol.eligible(&c.b.head, &c.b.rbuf) {
        let mut cap = Capture::new(false, pol.ttl, 0, head_req);
        return proxy::proxy(w, gw, c, route, up, tpl, Some(&mut cap)).await;
    }
    let refresh = pol.allow_client_invalidate
        && c.b
            .head
            .header(&c.b.rbuf, "cache-control")
            .is_some_and(request_wants_refresh);
    if refresh {
        // The client asks for a fresh answer and the route allows it: drop the entry, then
        // fetch and store a new one.
        // A HEAD drops the GET answer too, as that one would serve the next HEAD.
        for as_get in [false, head_req] {
            let (_, _, key) = lookup(w, gw, c, route, pol, false, true, as_get);
            w.shared.caches.invalidate(Invalidation::Key {
                store_id: pol.store_id.clone(),
                key: key.into(),
            });
            if !head_req {
                break;
            }
        }
        return fetch(w, gw, c, route, pol, up, tpl, None).await;
    }
    if head_req {
        // A stored GET answer serves a HEAD too (as nginx's proxy_cache_convert_head): the
        // same head, without the body.
        let (_, hit, _) = lookup(w, gw, c, route, pol, true, false, true);
        if let Some(h) = hit {
            return write_hit(w, c, h, route).await;
        }
    }
    let (primary, hit, _) = lookup(w, gw, c, route, pol, true, false, false);
    if let Some(h) = hit {
        return write_hit(w, c, h, route).await;
    }
    let pending = w.cache.borrow_mut().pending(primary);
    if let Some(p) = pending {
        if p.waiters() < crate::cache::MAX_WAITERS {
            // Someone on this worker is fetching this key: wait for it, bounded by the
            // integration timeout, then serve what it stored.
            let by = Instant::now() + gw.upstreams[up].cfg.timeout;
            // Watching the client as a request waiting for its own upstream does: one that
            // goes away is logged 499 (a pipelined request behind keeps it there).
            let fetched = std::pin::pin!(p.wait());
            let mut watching = true;
            let pipelined = c.b.rbuf.len() > c.b.head.head_len;
            let client = c.stream.tcp();
            let waited =
                proxy::wait_watching_client(fetched, client, &mut watching, pipelined, by).await;
            if matches!(waited, proxy::Wait::ClientGone) {
                return Outcome {
                    status: 499,
                    keep_alive: false,
                    upstream: None,
                };
            }
            let (_, hit, _) = lookup(w, gw, c, route, pol, true, false, false);
            if let Some(h) = hit {
                return write_hit(w, c, h, route).await;
            }
            if p.timed_out() {
                // The upstream did not answer the fetch in time: so is this request answered,
                // rather than every waiter asking the same upstream again.
                return reject(w, c, 504, "Endpoint Request Timed Out", false).await;
            }
            // Nothing stored: what is left of this request's own `timeout_ms` goes upstream
            // (none left: 504), so a failed fetch does not double every waiter's wait.
            c.upstream_by = Some(by);
        }
        // Not stored (or waited too long): fetch without making others wait on us.
        return fetch(w, gw, c, route, pol, up, tpl, None).await;
    }
    let leader = WorkerCache::lead(&w.cache, primary);
    fetch(w, gw, c, route, pol, up, tpl, Some(leader)).await
}

/// Builds the key (with the learned `Vary` part) and looks it up. Returns the primary key
/// hash, the hit, and, when `want_key`, a copy of the full key. `as_get` builds a HEAD
/// request's key as its GET's.
#[allow(clippy::too_many_arguments, reason = "the request's whole context")]
fn lookup<S: ClientIo>(
    w: &Worker,
    gw: &Gateway,
    c: &mut Conn<S>,
    route: &Route,
    pol: &CachePolicy,
    get: bool,
    want_key: bool,
    as_get: bool,
) -> (u64, Option<Hit>, Vec<u8>) {
    let sc = w.shared.caches.stage(pol, gw.config.server.workers);
    let mut wc = w.cache.borrow_mut();
    let mut key = std::mem::take(&mut wc.key);
    build_key(
        &mut key,
        pol,
        &c.b.head,
        &c.b.rbuf,
        &c.params,
        route.prefix_len,
        S::TLS,
        c.stream.xfcc(),
    );
    if as_get && key.starts_with(b"HEAD\0") {
        key.splice(0..4, *b"GET");
    }
    let primary = sc.hash(&key);
    let mut hit = None;
    {
        let mut shard = sc.shard(primary);
        let h = match shard.vary_names(primary) {
            Some(names) => {
                push_vary(&mut key, names, &c.b.head, &c.b.rbuf);
                sc.hash(&key)
            }
            None => primary,
        };
        if get {
            if let Some(e) = shard.store.get(h, &key, Instant::now()) {
                hit = Some(Hit {
                    data: e.data.clone(),
                    head_len: e.head_len,
                    status: e.status,
                    stored_at: e.stored_at,
                });
            }
        }
    }
    if get {
        c.cache_event = if hit.is_some() {
            super::cached::EVENT_HIT
        } else {
            super::cached::EVENT_MISS
        };
    }
    let copy = if want_key { key.clone() } else { Vec::new() };
    wc.key = key;
    (primary, hit, copy)
}

/// Sends the request upstream and stores the answer when the rules allow.
#[allow(clippy::too_many_arguments, reason = "the request's whole context")]
async fn fetch<S: ClientIo>(
    w: &Rc<Worker>,
    gw: &Arc<Gateway>,
    c: &mut Conn<S>,
    route: &Route,
    pol: &CachePolicy,
    up: usize,
    tpl: Option<&PathTemplate>,
    leader: Option<crate::cache::Leader>,
) -> Outcome {
    c.cache_event = EVENT_MISS;
    let head_req = c.b.head.method == Method::Head;
    // An invalidation made while we fetch must not be undone by storing the answer.
    let seq0 = w.shared.caches.seq();
    let sc = w.shared.caches.stage(pol, gw.config.server.workers);
    let mut cap = sc.capture(pol.ttl, head_req);
    cap.strip_cors = c.gateway_cors;
    let out = proxy::proxy(w, gw, c, route, up, tpl, Some(&mut cap)).await;
    if let Some((data, head_len)) = cap.finish() {
        let mut wc = w.cache.borrow_mut();
        let mut key = std::mem::take(&mut wc.key);
        let rel = build_key(
            &mut key,
            pol,
            &c.b.head,
            &c.b.rbuf,
            &c.params,
            route.prefix_len,
            S::TLS,
            c.stream.xfcc(),
        );
        let primary = sc.hash(&key);
        let mut shard = sc.shard(primary);
        // Checked under the shard lock: an invalidation bumps the sequence before it takes
        // the lock to remove entries, so it either sees this entry or stops it here.
        if w.shared.caches.seq() == seq0 {
            shard.set_vary(primary, &cap.vary);
            let h = if cap.vary.is_empty() {
                primary
            } else {
                push_vary(&mut key, &cap.vary, &c.b.head, &c.b.rbuf);
                sc.hash(&key)
            };
            let now = Instant::now();
            let entry = Entry::new(
                key.as_slice().into(),
                data,
                head_len,
                cap.status,
                // Backdated by the upstream's `Age`, so hits count it.
                now.checked_sub(cap.age).unwrap_or(now),
                now + cap.ttl_final,
                rel,
            );
            shard.store.insert(h, entry);
        }
        drop(shard);
        wc.key = key;
    }
    if let Some(l) = &leader {
        if out.status == 504 {
            l.set_timed_out();
        }
    }
    drop(leader);
    out
}

/// Writes a stored answer with its per-request headers (the response mapping's among them).
async fn write_hit<S: ClientIo>(w: &Worker, c: &mut Conn<S>, h: Hit, route: &Route) -> Outcome {
    let keep = w.keep_alive(&c.b.head);
    let small = h.data.len() <= COPY_MAX;
    c.b.out.clear();
    if small {
        c.b.out.extend_from_slice(&h.data[..h.head_len]);
    }
    c.b.out.extend_from_slice(b"x-cache: hit\r\nage: ");
    encode::push_u64(&mut c.b.out, h.stored_at.elapsed().as_secs());
    c.b.out.extend_from_slice(b"\r\n");
    encode::push_header(&mut c.b.out, b"x-request-id", &c.reqid[..c.reqid_len]);
    // Per-request headers of earlier stages (CORS for this request's origin), with one
    // `Vary: Origin` when the stored answer lists it already.
    let dup = c.gateway_cors && crate::policy::cors::head_varies_on_origin(&h.data[..h.head_len]);
    crate::policy::cors::push_extra(&mut c.b.out, &c.b.extra, dup);
    if let Some(m) = &route.response_mapping {
        // Stored without the mapped names; their values are this request's.
        m.push(&map_ctx!(c), &mut c.b.out);
    }
    if !keep {
        c.b.out.extend_from_slice(b"connection: close\r\n");
    } else if c.b.head.minor_version == 0 {
        c.b.out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    c.b.out.extend_from_slice(b"\r\n");
    let ok = if small {
        if c.b.head.method != Method::Head {
            c.b.out.extend_from_slice(&h.data[h.head_len..]);
        }
        write_out(c).await
    } else {
        write_vectored(w, c, h.data, h.head_len).await
    };
    Outcome {
        status: h.status,
        keep_alive: keep && ok,
        upstream: None,
    }
}

/// Three iovecs (stored head, per-request block in the output buffer, stored body) in a
/// reused heap array, so their address stays put while the kernel reads them.
struct HitIov {
    iov: Box<[libc::iovec; 3]>,
    first: usize,
    data: Bytes,
    mid: Vec<u8>,
}

// SAFETY: `iov` points into `data` and `mid`, both owned by this value and never changed
// while it is handed to the runtime; the array lives in its own heap allocation, so moving
// the value does not move it; entries `first..3` are valid iovecs.
unsafe impl IoVecBuf for HitIov {
    fn read_iovec_ptr(&self) -> *const libc::iovec {
        self.iov[self.first..].as_ptr()
    }
    fn read_iovec_len(&self) -> usize {
        3 - self.first
    }
}

/// Writes stored head, `c.b.out` and stored body with `writev`, continuing after short writes.
async fn write_vectored<S: ClientIo>(
    w: &Worker,
    c: &mut Conn<S>,
    data: Bytes,
    head_len: usize,
) -> bool {
    let iov = w.cache_iov.take().unwrap_or_else(|| {
        Box::new(
            [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; 3],
        )
    });
    let mid = std::mem::take(&mut c.b.out);
    let mut buf = HitIov {
        iov,
        first: 0,
        data,
        mid,
    };
    let body_len = if c.b.head.method == Method::Head {
        0
    } else {
        buf.data.len() - head_len
    };
    buf.iov[0] = libc::iovec {
        iov_base: buf.data.as_ptr() as *mut libc::c_void,
        iov_len: head_len,
    };
    buf.iov[1] = libc::iovec {
        iov_base: buf.mid.as_ptr() as *mut libc::c_void,
        iov_len: buf.mid.len(),
    };
    buf.iov[2] = libc::iovec {
        // SAFETY: head_len <= data.len(), so the pointer stays within (or one past) `data`.
        iov_base: unsafe { buf.data.as_ptr().add(head_len) } as *mut libc::c_void,
        iov_len: body_len,
    };
    let mut ok = true;
    loop {
        let (res, b) = c.stream.writev(buf).await;
        buf = b;
        let mut n = match res {
            Ok(0) | Err(_) => {
                ok = false;
                break;
            }
            Ok(n) => n,
        };
        while buf.first < 3 && n >= buf.iov[buf.first].iov_len {
            n -= buf.iov[buf.first].iov_len;
            buf.first += 1;
        }
        while buf.first < 3 && buf.iov[buf.first].iov_len == 0 {
            buf.first += 1;
        }
        if buf.first == 3 {
            break;
        }
        let v = &mut buf.iov[buf.first];
        // SAFETY: n < iov_len here, so the advanced pointer stays inside the same buffer.
        v.iov_base = unsafe { (v.iov_base as *mut u8).add(n) } as *mut libc::c_void;
        v.iov_len -= n;
    }
    let HitIov { iov, mut mid, .. } = buf;
    mid.clear();
    c.b.out = mid;
    w.cache_iov.set(Some(iov));
    ok
}
