//! A byte-bounded store of immutable responses with S3-FIFO eviction.
//!
//! S3-FIFO (Yang et al., SOSP 2023): new entries go into a small FIFO (10% of the bytes); an
//! entry that was hit while there moves to the main FIFO when it reaches the head, one that
//! was not is evicted and its key remembered in a ghost FIFO; a key found in the ghost goes
//! straight to main. The main FIFO gives entries with hits another round (their 2-bit
//! counter decremented) before evicting. A scan of one-shot keys therefore only churns the
//! small FIFO and never pushes hot entries out of main, which plain LRU does.
//!
//! Lookups touch one hash map slot and one counter: no allocation, no list surgery.
//! Removed entries leave stale references in the FIFOs (checked by slot generation) that are
//! skipped when popped and compacted away when they pile up.

use ahash::AHashMap;
use bytes::Bytes;
use std::collections::VecDeque;
use std::time::Instant;

/// Bytes charged per entry on top of its key and data (map slot, queue slots, struct).
pub const ENTRY_OVERHEAD: usize = 160;

/// What an allocation of `n` bytes holds in resident memory. At or above the allocator's mmap
/// threshold ([`crate::runtime::MMAP_THRESHOLD`]) every allocation is its own mapping: its size
/// plus the allocator's 16-byte chunk header, rounded up to whole 4 KiB pages. Charging that
/// keeps `max_bytes` a bound on memory (a 1.2 KB response holds a whole page).
pub fn resident_bytes(n: usize) -> usize {
    if n >= crate::runtime::MMAP_THRESHOLD {
        (n + 16).div_ceil(4096) * 4096
    } else {
        n
    }
}

/// One stored response.
#[derive(Debug)]
pub struct Entry {
    /// The full cache key (compared on every hit: hashes never decide alone).
    pub key: Box<[u8]>,
    /// Status line and headers (without the blank line), then the body.
    pub data: Bytes,
    /// Length of the head part of `data`.
    pub head_len: usize,
    /// Response status.
    pub status: u16,
    /// When it was stored (for `Age`).
    pub stored_at: Instant,
    /// When it stops being served.
    pub expires: Instant,
    /// The request path relative to the stage (for prefix invalidation), as a range of `key`.
    pub rel_path: (u32, u32),
    hash: u64,
    freq: u8,
    main: bool,
}

impl Entry {
    /// A new entry.
    pub fn new(
        key: Box<[u8]>,
        data: Bytes,
        head_len: usize,
        status: u16,
        stored_at: Instant,
        expires: Instant,
        rel_path: (u32, u32),
    ) -> Entry {
        Entry {
            key,
            data,
            head_len,
            status,
            stored_at,
            expires,
            rel_path,
            hash: 0,
            freq: 0,
            main: false,
        }
    }

    /// Bytes this entry counts against the store's bound: what its allocations hold in memory.
    pub fn charge(&self) -> usize {
        resident_bytes(self.data.len()) + resident_bytes(self.key.len()) + ENTRY_OVERHEAD
    }

    /// The stage-relative request path the entry was stored for.
    pub fn rel_path(&self) -> &[u8] {
        &self.key[self.rel_path.0 as usize..self.rel_path.1 as usize]
    }
}

/// An S3-FIFO store bounded by bytes.
#[derive(Debug)]
pub struct Store {
    cap: usize,
    used: usize,
    small_used: usize,
    slots: Vec<Option<Entry>>,
    gens: Vec<u32>,
    free: Vec<u32>,
    map: AHashMap<u64, u32>,
    small: VecDeque<(u32, u32)>,
    main: VecDeque<(u32, u32)>,
    ghost: VecDeque<u64>,
    ghost_set: AHashMap<u64, u32>,
}

impl Store {
    /// An empty store holding at most `cap` bytes (see [`Entry::charge`]).
    pub fn new(cap: usize) -> Store {
        Store {
            cap,
            used: 0,
            small_used: 0,
            slots: Vec::new(),
            gens: Vec::new(),
            free: Vec::new(),
            map: AHashMap::new(),
            small: VecDeque::new(),
            main: VecDeque::new(),
            ghost: VecDeque::new(),
            ghost_set: AHashMap::new(),
        }
    }

    /// The byte bound.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Changes the byte bound (a reload), evicting as needed.
    pub fn set_capacity(&mut self, cap: usize) {
        self.cap = cap;
        self.evict_for(0);
    }

    /// Bytes charged now.
    pub fn used(&self) -> usize {
        self.used
    }

    /// Entries stored.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the store holds nothing.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The largest entry accepted: a quarter of the bound, so one entry never flushes the rest.
    pub fn max_entry(&self) -> usize {
        self.cap / 4
    }

    /// The fresh entry for `hash` whose key is `key`; counts a hit. Expired entries are
    /// removed and reported as absent.
    pub fn get(&mut self, hash: u64, key: &[u8], now: Instant) -> Option<&Entry> {
        let slot = *self.map.get(&hash)? as usize;
        let e = self.slots[slot].as_mut()?;
        if &*e.key != key {
            return None;
        }
        if now >= e.expires {
            self.remove_slot(hash, slot);
            return None;
        }
        e.freq = (e.freq + 1).min(3);
        self.slots[slot].as_ref()
    }

    /// Whether a (possibly expired) entry for this exact key is present.
    pub fn contains(&self, hash: u64, key: &[u8]) -> bool {
        self.map
            .get(&hash)
            .and_then(|&s| self.slots[s as usize].as_ref())
            .is_some_and(|e| &*e.key == key)
    }

    /// Stores `e` under `hash`, replacing what was there; returns false when it is too big.
    pub fn insert(&mut self, hash: u64, mut e: Entry) -> bool {
        let charge = e.charge();
        if charge > self.max_entry() {
            return false;
        }
        if let Some(&slot) = self.map.get(&hash) {
            self.remove_slot(hash, slot as usize);
        }
        self.evict_for(charge);
        let to_main = self.ghost_remove(hash);
        e.main = to_main;
        e.freq = 0;
        e.hash = hash;
        let slot = match self.free.pop() {
            Some(s) => s as usize,
            None => {
                self.slots.push(None);
                self.gens.push(0);
                self.slots.len() - 1
            }
        };
        self.slots[slot] = Some(e);
        let r = (slot as u32, self.gens[slot]);
        if to_main {
            self.main.push_back(r);
        } else {
            self.small.push_back(r);
            self.small_used += charge;
        }
        self.used += charge;
        self.map.insert(hash, slot as u32);
        self.compact();
        true
    }

    /// Removes the entry for `hash` if its key is `key`.
    pub fn remove(&mut self, hash: u64, key: &[u8]) -> bool {
        match self.map.get(&hash) {
            Some(&s)
                if self.slots[s as usize]
                    .as_ref()
                    .is_some_and(|e| &*e.key == key) =>
            {
                self.remove_slot(hash, s as usize);
                true
            }
            _ => false,
        }
    }

    /// Removes every entry for which `f` is true; returns how many.
    pub fn remove_where(&mut self, mut f: impl FnMut(&Entry) -> bool) -> usize {
        let doomed: Vec<(u64, u32)> = self
            .map
            .iter()
            .filter(|(_, &s)| self.slots[s as usize].as_ref().is_some_and(&mut f))
            .map(|(&h, &s)| (h, s))
            .collect();
        for &(h, s) in &doomed {
            self.remove_slot(h, s as usize);
        }
        self.compact();
        doomed.len()
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        let cap = self.cap;
        *self = Store::new(cap);
    }

    fn remove_slot(&mut self, hash: u64, slot: usize) {
        if let Some(e) = self.slots[slot].take() {
            let c = e.charge();
            self.used -= c;
            if !e.main {
                self.small_used -= c;
            }
            self.gens[slot] = self.gens[slot].wrapping_add(1);
            self.free.push(slot as u32);
            self.map.remove(&hash);
        }
    }

    fn live(&self, r: (u32, u32)) -> bool {
        self.gens[r.0 as usize] == r.1 && self.slots[r.0 as usize].is_some()
    }

    /// Evicts until `need` more bytes fit.
    fn evict_for(&mut self, need: usize) {
        while self.used + need > self.cap && !self.map.is_empty() {
            let small_over = self.small_used > self.cap / 10;
            let from_small_first = small_over || self.main.is_empty();
            let mut progressed = if from_small_first {
                self.evict_small()
            } else {
                self.evict_main()
            };
            if !progressed {
                progressed = if from_small_first {
                    self.evict_main()
                } else {
                    self.evict_small()
                };
            }
            if !progressed {
                break;
            }
        }
    }

    /// Pops the small FIFO's head: to main when it was hit, else out (key to the ghost).
    fn evict_small(&mut self) -> bool {
        while let Some(r) = self.small.pop_front() {
            if !self.live(r) {
                continue;
            }
            let slot = r.0 as usize;
            let e = self.slots[slot].as_mut().expect("live");
            if e.freq > 0 {
                e.freq = 0;
                e.main = true;
                let c = e.charge();
                self.small_used -= c;
                self.main.push_back(r);
                return true;
            }
            let h = self.hash_key(slot);
            self.remove_slot(h, slot);
            self.ghost_push(h);
            return true;
        }
        false
    }

    /// Pops the main FIFO's head: another round when it was hit, else out.
    fn evict_main(&mut self) -> bool {
        let mut rounds = self.main.len();
        while let Some(r) = self.main.pop_front() {
            if !self.live(r) {
                continue;
            }
            let slot = r.0 as usize;
            let e = self.slots[slot].as_mut().expect("live");
            if e.freq > 0 && rounds > 0 {
                e.freq -= 1;
                rounds -= 1;
                self.main.push_back(r);
                continue;
            }
            let h = self.hash_key(slot);
            self.remove_slot(h, slot);
            return true;
        }
        false
    }

    fn hash_key(&self, slot: usize) -> u64 {
        self.slots[slot].as_ref().map_or(0, |e| e.hash)
    }

    fn ghost_push(&mut self, h: u64) {
        self.ghost.push_back(h);
        *self.ghost_set.entry(h).or_insert(0) += 1;
        let bound = self.map.len().max(64);
        while self.ghost.len() > bound {
            if let Some(old) = self.ghost.pop_front() {
                self.ghost_dec(old);
            }
        }
    }

    fn ghost_dec(&mut self, h: u64) {
        if let Some(n) = self.ghost_set.get_mut(&h) {
            *n -= 1;
            if *n == 0 {
                self.ghost_set.remove(&h);
            }
        }
    }

    /// Whether `h` was in the ghost (and forgets it).
    fn ghost_remove(&mut self, h: u64) -> bool {
        self.ghost_set.remove(&h).is_some()
        // Its copies in the ghost FIFO age out on their own (ghost_dec ignores missing keys).
    }

    /// Drops stale queue references once they outnumber live entries.
    fn compact(&mut self) {
        let live = self.map.len();
        if self.small.len() + self.main.len() > 2 * live + 64 {
            let gens = &self.gens;
            let slots = &self.slots;
            let ok = |r: &(u32, u32)| gens[r.0 as usize] == r.1 && slots[r.0 as usize].is_some();
            self.small.retain(ok);
            self.main.retain(ok);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_bytes_counts_whole_pages_for_mapped_allocations() {
        assert_eq!(resident_bytes(0), 0);
        assert_eq!(resident_bytes(999), 999);
        assert_eq!(resident_bytes(1000), 4096);
        assert_eq!(resident_bytes(4080), 4096);
        assert_eq!(resident_bytes(4081), 8192);
        assert_eq!(resident_bytes(100_000), 102_400);
    }
    use std::time::Duration;

    fn entry(key: &str, size: usize, now: Instant) -> Entry {
        Entry::new(
            key.as_bytes().into(),
            Bytes::from(vec![b'x'; size]),
            0,
            200,
            now,
            now + Duration::from_secs(60),
            (0, key.len() as u32),
        )
    }

    fn h(k: &str) -> u64 {
        ahash::RandomState::with_seeds(1, 2, 3, 4).hash_one(k)
    }

    #[test]
    fn get_checks_key_and_expiry() {
        let now = Instant::now();
        let mut s = Store::new(1 << 20);
        assert!(s.insert(h("a"), entry("a", 10, now)));
        assert!(s.get(h("a"), b"a", now).is_some());
        // Same hash, other key: a miss, never the wrong entry.
        assert!(s.get(h("a"), b"b", now).is_none());
        assert!(s.get(h("a"), b"a", now + Duration::from_secs(61)).is_none());
        assert_eq!(s.len(), 0);
        assert_eq!(s.used(), 0);
    }

    #[test]
    fn bound_is_never_exceeded() {
        let now = Instant::now();
        let cap = 64 * 1024;
        let mut s = Store::new(cap);
        for i in 0..10_000 {
            let k = format!("k{i}");
            s.insert(h(&k), entry(&k, 100 + i % 900, now));
            assert!(s.used() <= cap, "used {} > cap {cap}", s.used());
        }
        assert!(s.len() > 10);
        // Too big for one entry.
        assert!(!s.insert(h("big"), entry("big", cap / 2, now)));
    }

    #[test]
    fn hot_entries_survive_a_scan() {
        let now = Instant::now();
        let cap = 100 * (1000 + 2 + ENTRY_OVERHEAD);
        let mut s = Store::new(cap);
        let hot: Vec<String> = (0..20).map(|i| format!("hot{i}")).collect();
        for k in &hot {
            s.insert(h(k), entry(k, 1000, now));
        }
        // Hits while they are young promote them to main.
        for _ in 0..3 {
            for k in &hot {
                assert!(s.get(h(k), k.as_bytes(), now).is_some());
            }
        }
        // A scan of 5,000 one-shot keys, with the hot set still being used.
        for i in 0..5000 {
            let k = format!("scan{i}");
            s.insert(h(&k), entry(&k, 1000, now));
            if i % 50 == 0 {
                for k in &hot {
                    s.get(h(k), k.as_bytes(), now);
                }
            }
        }
        let alive = hot
            .iter()
            .filter(|k| s.get(h(k), k.as_bytes(), now).is_some())
            .count();
        assert_eq!(alive, hot.len(), "hot entries evicted by a scan");
        assert!(s.used() <= cap);
    }

    #[test]
    fn ghost_hit_goes_to_main() {
        let now = Instant::now();
        let cap = 20 * (100 + 2 + ENTRY_OVERHEAD);
        let mut s = Store::new(cap);
        for i in 0..40 {
            let k = format!("k{i}");
            s.insert(h(&k), entry(&k, 100, now));
        }
        // k0 was evicted from small into the ghost: re-inserting it lands in main.
        assert!(s.get(h("k0"), b"k0", now).is_none());
        s.insert(h("k0"), entry("k0", 100, now));
        let slot = s.map[&h("k0")] as usize;
        assert!(s.slots[slot].as_ref().unwrap().main);
    }

    #[test]
    fn remove_where_and_stale_refs() {
        let now = Instant::now();
        let mut s = Store::new(1 << 20);
        for i in 0..1000 {
            let k = format!("/p/{i}");
            s.insert(h(&k), entry(&k, 10, now));
        }
        let n = s.remove_where(|e| e.rel_path().starts_with(b"/p/1"));
        assert_eq!(n, 111);
        assert_eq!(s.len(), 889);
        // Re-inserting the same keys many times keeps the queues bounded.
        for _ in 0..50 {
            for i in 0..100 {
                let k = format!("/q/{i}");
                s.insert(h(&k), entry(&k, 10, now));
            }
        }
        assert!(s.small.len() + s.main.len() <= 2 * s.len() + 64 + 1);
    }
}
