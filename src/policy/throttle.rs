//! Token buckets as GCRA (generic cell rate algorithm) on one `AtomicU64` each.
//!
//! A bucket of `rate` tokens per second and capacity `burst` stores only its theoretical
//! arrival time (TAT, nanoseconds on the process clock [`now_ns`]). A request at `now` is
//! allowed when `max(TAT, now) + T - now <= burst * T` (T = 1/rate), and then moves TAT by T
//! with one compare-and-swap. Every worker shares the same atomic, so a limit holds across
//! cores exactly; a refused request writes nothing (no cache-line traffic from a flood that is
//! being refused).
//!
//! [`KeyedBuckets`] holds on-demand buckets (per client IP, per key) in a fixed-size,
//! set-associative table of atomics: no allocation, no lock, and memory that an attacker cannot
//! grow. A slot whose bucket has refilled completely is indistinguishable from a fresh bucket,
//! so it can be given to another key; when every slot of a set is busy, the one closest to full
//! is taken over (the least a takeover can forgive).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Nanoseconds since the first call in this process (monotonic; starts at 1 s so that a
/// TAT of 0 always means "full").
pub fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = BASE.get_or_init(Instant::now);
    base.elapsed().as_nanos() as u64 + 1_000_000_000
}

/// `rate` tokens per second, `burst` tokens of capacity (validated: both > 0).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub rate: f64,
    pub burst: u64,
}

impl Rate {
    /// Emission interval (ns per token) and tolerance (ns of burst).
    fn params(&self) -> (u64, u64) {
        let t = ((1e9 / self.rate).round() as u64).max(1);
        (t, t.saturating_mul(self.burst))
    }
}

/// Why a request was refused: the time in nanoseconds until it would pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait(pub u64);

impl Wait {
    /// Whole seconds for `Retry-After` (at least 1).
    pub fn retry_after_s(&self) -> u64 {
        self.0.div_ceil(1_000_000_000).max(1)
    }
}

/// GCRA step on one atomic TAT. Shared by [`Bucket`] and [`KeyedBuckets`].
#[inline]
fn gcra(tat: &AtomicU64, t: u64, tau: u64, now: u64) -> Result<(), Wait> {
    let mut cur = tat.load(Ordering::Relaxed);
    loop {
        let new = cur.max(now).saturating_add(t);
        let ahead = new - now;
        if ahead > tau {
            return Err(Wait(ahead - tau));
        }
        match tat.compare_exchange_weak(cur, new, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return Ok(()),
            Err(v) => cur = v,
        }
    }
}

/// One token bucket shared by all workers.
#[derive(Debug)]
pub struct Bucket {
    tat: AtomicU64,
    t: u64,
    tau: u64,
}

impl Bucket {
    /// A full bucket.
    pub fn new(r: Rate) -> Bucket {
        let (t, tau) = r.params();
        Bucket {
            tat: AtomicU64::new(0),
            t,
            tau,
        }
    }

    /// Gives back the token of a request that a later bucket refused (so a request refused
    /// by a route's bucket does not drain its stage's or the gateway's).
    #[inline]
    pub fn refund(&self) {
        self.tat.fetch_sub(self.t, Ordering::Relaxed);
    }

    /// Whether `o` has the same rate and burst (so its state can carry over a reload).
    pub fn same_rate(&self, o: &Bucket) -> bool {
        self.t == o.t && self.tau == o.tau
    }

    /// Takes one token at `now` (from [`now_ns`]) or says how long to wait.
    #[inline]
    pub fn check(&self, now: u64) -> Result<(), Wait> {
        gcra(&self.tat, self.t, self.tau, now)
    }
}

/// Ways per set of [`KeyedBuckets`].
const WAYS: usize = 4;

/// A bounded table of on-demand buckets, all with the same rate, keyed by a 64-bit hash.
pub struct KeyedBuckets {
    /// (tag, TAT) pairs; tag 0 = never used.
    slots: Box<[(AtomicU64, AtomicU64)]>,
    mask: usize,
    t: u64,
    tau: u64,
    hasher: ahash::RandomState,
}

impl std::fmt::Debug for KeyedBuckets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyedBuckets({} slots)", self.slots.len())
    }
}

impl KeyedBuckets {
    /// A table of at least `capacity` buckets (rounded up to a power of two, at least 64).
    /// The hash is seeded per process so clients cannot aim at one set.
    pub fn new(r: Rate, capacity: usize) -> KeyedBuckets {
        let n = capacity.max(64).next_power_of_two();
        let (t, tau) = r.params();
        KeyedBuckets {
            slots: (0..n)
                .map(|_| (AtomicU64::new(0), AtomicU64::new(0)))
                .collect(),
            mask: n - 1,
            t,
            tau,
            hasher: ahash::RandomState::new(),
        }
    }

    /// Whether `o` has the same rate, burst and size (so its state can carry over a reload).
    pub fn same_shape(&self, o: &KeyedBuckets) -> bool {
        self.t == o.t && self.tau == o.tau && self.slots.len() == o.slots.len()
    }

    /// Gives back a token taken from `key`'s bucket (when a later check refused the request).
    pub fn refund<K: std::hash::Hash>(&self, key: K) {
        let h = self.hasher.hash_one(key) | 1;
        let set = (h as usize >> 8) & self.mask & !(WAYS - 1);
        for (tag, tat) in &self.slots[set..set + WAYS] {
            if tag.load(Ordering::Acquire) == h {
                tat.fetch_sub(self.t, Ordering::Relaxed);
                return;
            }
        }
    }

    /// Number of slots (the bound on distinct keys tracked at once).
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Takes one token from the bucket of `key` at `now`.
    #[inline]
    pub fn check<K: std::hash::Hash>(&self, key: K, now: u64) -> Result<(), Wait> {
        let h = self.hasher.hash_one(key) | 1;
        let set = (h as usize >> 8) & self.mask & !(WAYS - 1);
        let ways = &self.slots[set..set + WAYS];
        for (tag, tat) in ways {
            if tag.load(Ordering::Acquire) == h {
                return gcra(tat, self.t, self.tau, now);
            }
        }
        // Not present: take an unused or fully refilled slot, else the one closest to full.
        let mut victim = 0;
        let mut oldest = u64::MAX;
        for (i, (tag, tat)) in ways.iter().enumerate() {
            let v = tat.load(Ordering::Relaxed);
            let old_tag = tag.load(Ordering::Relaxed);
            if old_tag == 0 || v <= now {
                if tag
                    .compare_exchange(old_tag, h, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    tat.store(0, Ordering::Relaxed);
                    return gcra(tat, self.t, self.tau, now);
                }
                continue;
            }
            if v < oldest {
                oldest = v;
                victim = i;
            }
        }
        let (tag, tat) = &ways[victim];
        tag.store(h, Ordering::Release);
        tat.store(0, Ordering::Relaxed);
        gcra(tat, self.t, self.tau, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn burst_then_rate() {
        let b = Bucket::new(Rate {
            rate: 10.0,
            burst: 5,
        });
        let now = 10 * S;
        for _ in 0..5 {
            assert!(b.check(now).is_ok());
        }
        let w = b.check(now).unwrap_err();
        assert_eq!(w.0, S / 10);
        assert_eq!(w.retry_after_s(), 1);
        // 100 ms later, exactly one more token.
        assert!(b.check(now + S / 10).is_ok());
        assert!(b.check(now + S / 10).is_err());
        // Over 2 s, 20 tokens.
        let mut n = 0;
        for ms in 0..2000u64 {
            if b.check(now + S / 10 + ms * 1_000_000 + 1_000_000).is_ok() {
                n += 1;
            }
        }
        assert_eq!(n, 20);
    }

    #[test]
    fn shared_across_threads_exact() {
        let b = std::sync::Arc::new(Bucket::new(Rate {
            rate: 1000.0,
            burst: 100,
        }));
        let now = 5 * S;
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || (0..10_000).filter(|_| b.check(now).is_ok()).count())
            })
            .collect();
        let total: usize = hs.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(total, 100);
    }

    #[test]
    fn keyed_isolated_and_bounded() {
        let k = KeyedBuckets::new(
            Rate {
                rate: 1.0,
                burst: 2,
            },
            64,
        );
        let now = 3 * S;
        assert!(k.check(1u32, now).is_ok());
        assert!(k.check(1u32, now).is_ok());
        assert!(k.check(1u32, now).is_err());
        assert!(k.check(2u32, now).is_ok());
        // A flood of distinct keys never grows the table.
        for i in 0..100_000u32 {
            let _ = k.check(i + 10, now);
        }
        assert_eq!(k.capacity(), 64);
        // After a full refill, key 1 is fresh again (wherever its slot went).
        assert!(k.check(1u32, now + 3 * S).is_ok());
    }

    #[test]
    fn refund_gives_the_token_back() {
        let b = Bucket::new(Rate {
            rate: 1.0,
            burst: 1,
        });
        assert!(b.check(5 * S).is_ok());
        assert!(b.check(5 * S).is_err());
        b.refund();
        assert!(b.check(5 * S).is_ok());
        let k = KeyedBuckets::new(
            Rate {
                rate: 1.0,
                burst: 1,
            },
            64,
        );
        assert!(k.check("a", 5 * S).is_ok());
        k.refund("a");
        assert!(k.check("a", 5 * S).is_ok());
        assert!(k.check("a", 5 * S).is_err());
    }

    #[test]
    fn wait_rounds_up() {
        assert_eq!(Wait(1).retry_after_s(), 1);
        assert_eq!(Wait(S + 1).retry_after_s(), 2);
    }
}
