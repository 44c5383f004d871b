//! Usage plans: per-key throttles and quotas per UTC day, week (Monday to Sunday) or month,
//! with the counts persisted in `state_dir`.
//!
//! A quota counter is one `AtomicU64` holding the period it counts and the count, so the
//! check-and-count is one compare-and-swap shared by all workers and a new period starts by
//! itself. The counters live in the [`UsageStore`] (not in the config), so a reload keeps them;
//! a background thread writes them to `state_dir/usage-plans.json` every [`FLUSH_MS`] ms when
//! they changed (write to a temp file, fsync, rename). A crash (even `kill -9`) therefore
//! loses at most the requests counted in the last [`FLUSH_MS`] ms, which is also bounded by
//! the plan's throttle: `burst + rate * FLUSH_MS / 1000` per key. A clean stop (SIGTERM)
//! writes the final counts.
//!
//! Per-key state is created on a key's first request: its bucket of each plan in a fixed-size
//! [`KeyedBuckets`] table per plan (bounded memory; only valid keys get there), its counter in
//! a copy-on-write map read with one atomic load.
//!
//! API keys: plans only need a key's *name* and plan names, through the [`KeyDirectory`] trait.
//! The auth feature's key store ([`crate::policy::auth::KeySet`]) implements it
//! (keys added at run time then get plan state on their first request, like any other).

use super::throttle::{KeyedBuckets, Rate, Wait};
use ahash::AHashMap;
use arc_swap::ArcSwap;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

/// How often changed counts are written to disk (the most a crash can lose).
pub const FLUSH_MS: u64 = 200;

/// A quota period (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Day,
    Week,
    Month,
}

impl Period {
    /// Parses `day`, `week`, `month`.
    pub fn parse(s: &str) -> Option<Period> {
        match s {
            "day" => Some(Period::Day),
            "week" => Some(Period::Week),
            "month" => Some(Period::Month),
            _ => None,
        }
    }

    /// The name as written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        }
    }

    /// The index of the period holding `unix_s` (days, weeks from a Monday, months since year 0).
    pub fn index(self, unix_s: u64) -> u32 {
        let days = (unix_s / 86_400) as i64;
        match self {
            Period::Day => days as u32,
            // 1970-01-01 was a Thursday: +3 puts Mondays on multiples of 7.
            Period::Week => ((days + 3) / 7) as u32,
            Period::Month => {
                let (y, m, _) = civil_from_days(days);
                (y * 12 + (m as i64 - 1)) as u32
            }
        }
    }

    /// First day and day after the last of period `idx`, as days since 1970-01-01.
    pub fn bounds(self, idx: u32) -> (i64, i64) {
        let i = idx as i64;
        match self {
            Period::Day => (i, i + 1),
            Period::Week => (i * 7 - 3, i * 7 + 4),
            Period::Month => {
                let (y, m) = (i / 12, (i % 12) as u32 + 1);
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                (days_from_civil(y, m, 1), days_from_civil(ny, nm, 1))
            }
        }
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// (year, month, day) to days since 1970-01-01.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DD` of a day number.
pub fn date_string(days: i64) -> String {
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}")
}

const USED_BITS: u32 = 40;
const USED_MASK: u64 = (1 << USED_BITS) - 1;

/// Packs (period index, used); the period is stored + 1 so 0 means "nothing counted".
fn pack(period: u32, used: u64) -> u64 {
    ((period as u64 + 1) << USED_BITS) | used.min(USED_MASK)
}

/// The count of `v` in period `period` (0 when `v` counts another period).
pub fn used_in(v: u64, period: u32) -> u64 {
    if v >> USED_BITS == period as u64 + 1 {
        v & USED_MASK
    } else {
        0
    }
}

/// Counts one request against `limit` in `period` and returns what remains; `None` when the
/// quota is used up (nothing is counted then).
#[inline]
pub fn consume(c: &AtomicU64, period: u32, limit: u64) -> Option<u64> {
    let mut cur = c.load(Ordering::Relaxed);
    loop {
        let used = used_in(cur, period);
        if used >= limit {
            return None;
        }
        match c.compare_exchange_weak(
            cur,
            pack(period, used + 1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        ) {
            Ok(_) => return Some(limit - used - 1),
            Err(v) => cur = v,
        }
    }
}

/// Identifies one persisted counter: plan, key and period name.
pub type CounterId = (String, String, &'static str);

/// With `[cluster]`: sets counter `c` to the cluster-wide count `global` for period `idx`, plus
/// what this node counted since the sync read it at `seen`. Returns that extra count, or `None`
/// when the counter moved on to a later period meanwhile (nothing is changed then).
pub fn rebase(c: &AtomicU64, idx: u32, seen: u64, global: u64) -> Option<u64> {
    let mut cur = c.load(Ordering::Relaxed);
    loop {
        if cur >> USED_BITS > idx as u64 + 1 {
            return None;
        }
        let extra = used_in(cur, idx).saturating_sub(seen);
        match c.compare_exchange_weak(
            cur,
            pack(idx, global.saturating_add(extra)),
            Ordering::Relaxed,
            Ordering::Relaxed,
        ) {
            Ok(_) => return Some(extra),
            Err(v) => cur = v,
        }
    }
}

/// Quota counters shared by every config generation, persisted in `state_dir`.
#[derive(Debug)]
pub struct UsageStore {
    path: Option<PathBuf>,
    counters: Mutex<BTreeMap<CounterId, Arc<AtomicU64>>>,
    /// The file's content as last written (or read).
    last_written: Mutex<String>,
    /// The writer thread and its stop flag, taken by [`UsageStore::stop_writer`].
    writer: Mutex<Option<(StopFlag, std::thread::JoinHandle<()>)>>,
}

/// A flag that a sleeping thread wakes up for.
type StopFlag = Arc<(Mutex<bool>, Condvar)>;

impl UsageStore {
    /// A store without a file (tests).
    pub fn in_memory() -> Arc<UsageStore> {
        Arc::new(UsageStore {
            path: None,
            counters: Mutex::new(BTreeMap::new()),
            last_written: Mutex::new(String::new()),
            writer: Mutex::new(None),
        })
    }

    /// Opens `state_dir/usage-plans.json` (created when missing) and starts the writer thread.
    pub fn open(state_dir: &Path) -> Result<Arc<UsageStore>, String> {
        std::fs::create_dir_all(state_dir)
            .map_err(|e| format!("cannot create state_dir {}: {e}", state_dir.display()))?;
        let path = state_dir.join("usage-plans.json");
        let mut map = BTreeMap::new();
        match std::fs::read(&path) {
            Ok(bytes) => {
                // A file that cannot be read stops the start (fix or remove it): going on
                // would set every quota back to 0 and overwrite the counts.
                let bad = |why: String| {
                    format!(
                        "{}: not a valid usage counts file ({why}); fix or remove it",
                        path.display()
                    )
                };
                let v: serde_json::Value =
                    serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
                if v.get("version").and_then(|v| v.as_u64()) != Some(1) {
                    return Err(bad("`version` is not 1".to_string()));
                }
                let Some(counters) = v.get("counters").and_then(|c| c.as_array()) else {
                    return Err(bad("no `counters` array".to_string()));
                };
                for (i, e) in counters.iter().enumerate() {
                    // An entry that cannot be read would set its key's quota back to 0.
                    let (Some(plan), Some(key), Some(period), Some(idx), Some(used)) = (
                        e["plan"].as_str(),
                        e["key"].as_str(),
                        e["period"].as_str().and_then(Period::parse),
                        e["index"]
                            .as_u64()
                            .filter(|&i| i < (1 << (64 - USED_BITS)) - 1),
                        e["used"].as_u64().filter(|&u| u <= USED_MASK),
                    ) else {
                        return Err(bad(format!(
                            "counters[{i}] needs `plan` and `key` (strings), `period` (day, week or month), and `index` and `used` (whole numbers)"
                        )));
                    };
                    map.insert(
                        (plan.to_string(), key.to_string(), period.as_str()),
                        Arc::new(AtomicU64::new(pack(idx as u32, used))),
                    );
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        }
        let text = render(&map);
        let store = Arc::new(UsageStore {
            path: Some(path),
            counters: Mutex::new(map),
            last_written: Mutex::new(text),
            writer: Mutex::new(None),
        });
        let weak: Weak<UsageStore> = Arc::downgrade(&store);
        let stop: StopFlag = Arc::new((Mutex::new(false), Condvar::new()));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("ringgate-usage".into())
            .spawn(move || loop {
                let (flag, cv) = &*stopped;
                let g = flag.lock().unwrap_or_else(|e| e.into_inner());
                let (g, _) = cv
                    .wait_timeout_while(g, Duration::from_millis(FLUSH_MS), |stop| !*stop)
                    .unwrap_or_else(|e| e.into_inner());
                if *g {
                    return;
                }
                drop(g);
                let Some(s) = weak.upgrade() else { return };
                if let Err(e) = s.flush() {
                    crate::elog!("ringgate: cannot write usage counts: {e}");
                }
            })
            .map_err(|e| format!("cannot start the usage writer: {e}"))?;
        *store.writer.lock().unwrap_or_else(|e| e.into_inner()) = Some((stop, thread));
        Ok(store)
    }

    /// Stops the writer thread and waits for it (the gateway stops; a last [`UsageStore::flush`]
    /// follows).
    pub fn stop_writer(&self) {
        let w = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((stop, thread)) = w {
            *stop.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
            stop.1.notify_all();
            let _ = thread.join();
        }
    }

    /// Writes `text` as the counts file in `dir`, then opens it (tests).
    #[cfg(test)]
    fn open_file_for_test(dir: &Path, text: &str) -> Result<Arc<UsageStore>, String> {
        std::fs::write(dir.join("usage-plans.json"), text).unwrap();
        UsageStore::open(dir)
    }

    /// The counter of `key` in `plan` (created at 0 when new).
    pub fn counter(&self, plan: &str, key: &str, period: Period) -> Arc<AtomicU64> {
        let mut m = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        m.entry((plan.to_string(), key.to_string(), period.as_str()))
            .or_insert_with(|| Arc::new(AtomicU64::new(0)))
            .clone()
    }

    /// Number of counters.
    pub fn len(&self) -> usize {
        self.counters.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Whether there is no counter.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every counter with its plan, key and period (for the cluster's sync).
    pub fn snapshot(&self) -> Vec<(CounterId, Arc<AtomicU64>)> {
        let m = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Writes the counts when they changed since the last write.
    pub fn flush(&self) -> std::io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let text = render(&self.counters.lock().unwrap_or_else(|e| e.into_inner()));
        let mut last = self.last_written.lock().unwrap_or_else(|e| e.into_inner());
        if *last == text {
            return Ok(());
        }
        // Replaced whole and durably: a machine crash leaves either the old counts or the new
        // ones, never an empty file (which stops the next start).
        crate::statefile::write_atomic(path, text.as_bytes())?;
        *last = text;
        Ok(())
    }
}

/// The file content for `map` (counters at 0 left out).
fn render(map: &BTreeMap<CounterId, Arc<AtomicU64>>) -> String {
    let mut items = Vec::with_capacity(map.len());
    for ((plan, key, period), c) in map {
        let v = c.load(Ordering::Relaxed);
        if v == 0 {
            continue;
        }
        items.push(serde_json::json!({
            "plan": plan, "key": key, "period": period,
            "index": (v >> USED_BITS) - 1, "used": v & USED_MASK,
        }));
    }
    serde_json::json!({ "version": 1, "counters": items }).to_string()
}

/// A plan's quota.
#[derive(Debug, Clone, Copy)]
pub struct Quota {
    pub limit: u64,
    pub period: Period,
}

/// Per-key plan buckets tracked at once per plan (a fixed table: see [`KeyedBuckets`]).
pub const KEY_BUCKETS: usize = 65_536;

/// One `[[usage_plans]]`, with the state of the keys that use it (created on demand).
pub struct Plan {
    pub name: Arc<str>,
    /// `(api, stage)` pairs it covers.
    pub stages: Vec<(String, String)>,
    pub throttle: Option<Rate>,
    pub quota: Option<Quota>,
    /// Per-key buckets, keyed by key name.
    buckets: Option<Arc<KeyedBuckets>>,
    /// Per-key quota counters (from the [`UsageStore`]), copied on write: a request reads the
    /// map with one atomic load; a key's first request inserts under `insert`.
    counters: ArcSwap<AHashMap<Arc<str>, Arc<AtomicU64>>>,
    insert: Mutex<()>,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("name", &self.name)
            .field("stages", &self.stages)
            .field("throttle", &self.throttle)
            .field("quota", &self.quota)
            .finish()
    }
}

impl Plan {
    /// A plan with no key state yet.
    pub fn new(
        name: &str,
        stages: Vec<(String, String)>,
        throttle: Option<Rate>,
        quota: Option<Quota>,
    ) -> Plan {
        Plan {
            name: name.into(),
            stages,
            throttle,
            quota,
            buckets: throttle.map(|r| Arc::new(KeyedBuckets::new(r, KEY_BUCKETS))),
            counters: ArcSwap::from_pointee(AHashMap::new()),
            insert: Mutex::new(()),
        }
    }

    /// Takes over the per-key buckets of the previous config's plan when they have the same
    /// rate (a reload must not hand every key a fresh burst).
    pub fn inherit(&mut self, old: &Plan) {
        if let (Some(n), Some(o)) = (&self.buckets, &old.buckets) {
            if n.same_shape(o) {
                self.buckets = Some(o.clone());
            }
        }
    }

    fn period(&self) -> Period {
        self.quota.map(|q| q.period).unwrap_or(Period::Day)
    }

    /// The quota counter of `key` (created from the store on the key's first request).
    fn counter(&self, key: &str, store: &UsageStore) -> Arc<AtomicU64> {
        if let Some(c) = self.counters.load().get(key) {
            return c.clone();
        }
        let _g = self.insert.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.counters.load_full();
        if let Some(c) = cur.get(key) {
            return c.clone();
        }
        let c = store.counter(&self.name, key, self.period());
        let mut next = (*cur).clone();
        next.insert(key.into(), c.clone());
        self.counters.store(Arc::new(next));
        c
    }
}

/// A key as usage plans see it: its name and the names of its plans.
#[derive(Debug, Clone, Copy)]
pub struct KeyRef<'a> {
    pub name: &'a str,
    pub plans: &'a [Arc<str>],
    /// What its quota counts are kept under (see [`crate::policy::auth::ApiKey::usage_id`]).
    pub usage_id: &'a str,
}

/// Maps an `x-api-key` value to an enabled key. The one seam between usage plans and the API
/// key store ([`crate::policy::auth::KeySet`]).
pub trait KeyDirectory {
    /// The enabled key with this value (compared in constant time).
    fn find(&self, value: &[u8]) -> Option<KeyRef<'_>>;
}

impl KeyDirectory for crate::policy::auth::KeySet {
    fn find(&self, value: &[u8]) -> Option<KeyRef<'_>> {
        self.check(value).map(|k| KeyRef {
            name: &k.name,
            plans: &k.plans,
            usage_id: &k.usage_id,
        })
    }
}

/// Why a plan refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Throttled(Wait),
    /// Past the quota; it is renewed in `retry_after_s` seconds (the end of the UTC period).
    QuotaExceeded {
        retry_after_s: u64,
    },
}

/// All usage plans of a config and the store their counts live in.
#[derive(Debug, Default)]
pub struct Plans {
    pub plans: Vec<Plan>,
    store: Option<Arc<UsageStore>>,
}

impl Plans {
    /// Plans and keys, counting in memory until [`Plans::bind`].
    pub fn new(plans: Vec<Plan>) -> Plans {
        Plans { plans, store: None }
    }

    /// Counts go to `store` (persisted, shared across config generations).
    pub fn bind(&mut self, store: &Arc<UsageStore>) {
        self.store = Some(store.clone());
    }

    fn store(&self) -> &UsageStore {
        static MEM: std::sync::OnceLock<Arc<UsageStore>> = std::sync::OnceLock::new();
        self.store
            .as_deref()
            .unwrap_or_else(|| MEM.get_or_init(UsageStore::in_memory))
    }

    /// Applies the plan of `key` that covers a route (whose covering plans are `route_plans`):
    /// the key's bucket of that plan, then its quota. `Ok` when no plan of the key covers it.
    #[inline]
    pub fn check(
        &self,
        key: KeyRef<'_>,
        route_plans: &[u16],
        now_ns: u64,
        unix_s: u64,
    ) -> Result<(), Refusal> {
        for &pi in route_plans {
            let p = &self.plans[pi as usize];
            if !key.plans.iter().any(|n| **n == *p.name) {
                continue;
            }
            if let Some(b) = &p.buckets {
                b.check(key.name, now_ns).map_err(Refusal::Throttled)?;
            }
            if let Some(q) = p.quota {
                let c = p.counter(key.usage_id, self.store());
                let idx = q.period.index(unix_s);
                if consume(&c, idx, q.limit).is_none() {
                    if let Some(b) = &p.buckets {
                        b.refund(key.name);
                    }
                    let end = (q.period.bounds(idx).1.max(0) as u64) * 86_400;
                    return Err(Refusal::QuotaExceeded {
                        retry_after_s: end.saturating_sub(unix_s).max(1),
                    });
                }
            }
            return Ok(());
        }
        Ok(())
    }

    /// Whether a key of the plans `key_plans` belongs to one of `route_plans` (the plans
    /// covering a route: [`Plans::covering`]). What `api_key_required` asks of a key, as Amazon
    /// API Gateway does: a key outside every plan of the stage is refused.
    #[inline]
    pub fn covers(&self, key_plans: &[Arc<str>], route_plans: &[u16]) -> bool {
        route_plans.iter().any(|&pi| {
            let name = &*self.plans[pi as usize].name;
            key_plans.iter().any(|n| **n == *name)
        })
    }

    /// Why a key being defined (in the config or by `POST /api-keys`) may not have the plans
    /// `names`: one is listed twice, or [`Plans::key_plans_error`].
    pub fn new_key_plans_error(&self, names: &[impl AsRef<str>]) -> Option<String> {
        let twice = names
            .iter()
            .enumerate()
            .find(|(i, p)| names[..*i].iter().any(|q| q.as_ref() == p.as_ref()));
        if let Some((_, p)) = twice {
            return Some(format!("usage plan `{}` is listed twice", p.as_ref()));
        }
        self.key_plans_error(names)
    }

    /// Why a key in `names` could not be metered: a plan not defined, or two plans that cover
    /// one API stage. Keys already stored are checked with this on reload (a name listed twice
    /// there stays harmless: the key is metered once).
    pub fn key_plans_error(&self, names: &[impl AsRef<str>]) -> Option<String> {
        if let Some(p) = names
            .iter()
            .find(|p| !self.plans.iter().any(|x| *x.name == *p.as_ref()))
        {
            return Some(format!("usage plan `{}` is not defined", p.as_ref()));
        }
        self.overlap_error(names)
    }

    /// [`Plans::overlap`] as a message.
    pub fn overlap_error(&self, names: &[impl AsRef<str>]) -> Option<String> {
        self.overlap(names).map(|(a, b, stage)| {
            format!("usage plans `{a}` and `{b}` both cover `{stage}`: a key may be in one plan per API stage")
        })
    }

    /// The first two of `names` that cover one API stage: `(plan, plan, "api/stage")`. A key
    /// may be in at most one plan per stage (as in Amazon API Gateway).
    pub fn overlap<'a>(&self, names: &'a [impl AsRef<str>]) -> Option<(&'a str, &'a str, String)> {
        let find = |n: &str| self.plans.iter().find(|p| &*p.name == n);
        for (i, a) in names.iter().enumerate() {
            let Some(pa) = find(a.as_ref()) else { continue };
            for b in &names[i + 1..] {
                if a.as_ref() == b.as_ref() {
                    continue;
                }
                let Some(pb) = find(b.as_ref()) else { continue };
                if let Some((api, stage)) = pa.stages.iter().find(|s| pb.stages.contains(s)) {
                    return Some((a.as_ref(), b.as_ref(), format!("{api}/{stage}")));
                }
            }
        }
        None
    }

    /// Indices of the plans covering `api`/`stage`.
    pub fn covering(&self, api: &str, stage: &str) -> Vec<u16> {
        (0..self.plans.len())
            .filter(|&i| {
                self.plans[i]
                    .stages
                    .iter()
                    .any(|(a, s)| a == api && s == stage)
            })
            .map(|i| i as u16)
            .collect()
    }

    /// `GET /usage-plans/{plan}/usage?key=NAME` for a key of the plan (the caller checked
    /// that): used and remaining in the current period. `usage_id`: the key's
    /// [`KeyRef::usage_id`].
    pub fn usage(
        &self,
        plan: &str,
        key: &str,
        usage_id: &str,
        unix_s: u64,
    ) -> Option<serde_json::Value> {
        let p = self.plans.iter().find(|p| &*p.name == plan)?;
        if p.quota.is_none() {
            // Only quotas count requests: say so rather than report a made-up 0.
            return Some(serde_json::json!({
                "usagePlanId": plan,
                "key": key,
                "period": null,
                "used": null,
                "remaining": null,
                "limit": null,
                "message": "this usage plan has no quota: its requests are not counted",
            }));
        }
        let v = self
            .store()
            .counter(plan, usage_id, p.period())
            .load(Ordering::Relaxed);
        let limit = p.quota.map(|q| q.limit);
        let period = p.period();
        let idx = period.index(unix_s);
        let used = used_in(v, idx);
        let (start, end) = period.bounds(idx);
        let remaining = limit.map(|l| l.saturating_sub(used));
        Some(serde_json::json!({
            "usagePlanId": plan,
            "key": key,
            "period": period.as_str(),
            "startDate": date_string(start),
            "endDate": date_string(end - 1),
            "used": used,
            "remaining": remaining,
            "limit": limit,
            "items": { key: [[used, remaining]] },
        }))
    }
}

/// Seconds since the Unix epoch for a reading of [`super::throttle::now_ns`]: the wall clock
/// at the first call plus the monotonic time since, so a request reads one clock, not two.
/// (A wall-clock step after start shifts period boundaries by that much until a restart.)
pub fn unix_at(now_ns: u64) -> u64 {
    use std::sync::OnceLock;
    static BASE: OnceLock<(u64, u64)> = OnceLock::new();
    let &(wall_ns, mono_ns) = BASE.get_or_init(|| {
        let mono = super::throttle::now_ns();
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        (wall, mono)
    });
    (wall_ns + now_ns.saturating_sub(mono_ns)) / 1_000_000_000
}

/// Seconds since the Unix epoch (UTC wall clock).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_periods() {
        // 2026-11-25 is a Wednesday.
        let d = days_from_civil(2026, 11, 25);
        assert_eq!(civil_from_days(d), (2026, 11, 25));
        assert_eq!(date_string(0), "1970-01-01");
        let s = d as u64 * 86_400 + 3600;
        let w = Period::Week.index(s);
        let (ws, we) = Period::Week.bounds(w);
        assert_eq!(date_string(ws), "2026-11-23"); // Monday
        assert_eq!(date_string(we - 1), "2026-11-29"); // Sunday
        let m = Period::Month.index(s);
        let (ms, me) = Period::Month.bounds(m);
        assert_eq!(date_string(ms), "2026-11-01");
        assert_eq!(date_string(me - 1), "2026-11-30");
        let dec = days_from_civil(2026, 12, 31) as u64 * 86_400;
        let (_, me) = Period::Month.bounds(Period::Month.index(dec));
        assert_eq!(date_string(me), "2027-01-01");
        assert_eq!(Period::Day.index(s), d as u32);
    }

    #[test]
    fn unix_from_monotonic_matches_wall_clock() {
        let a = unix_at(crate::policy::throttle::now_ns());
        let b = unix_now();
        assert!(a.abs_diff(b) <= 1, "{a} vs {b}");
    }

    #[test]
    fn quota_counts_and_resets_with_period() {
        let c = AtomicU64::new(0);
        assert_eq!(consume(&c, 7, 3), Some(2));
        assert_eq!(consume(&c, 7, 3), Some(1));
        assert_eq!(consume(&c, 7, 3), Some(0));
        assert_eq!(consume(&c, 7, 3), None);
        assert_eq!(used_in(c.load(Ordering::Relaxed), 7), 3);
        // The next period starts from 0.
        assert_eq!(consume(&c, 8, 3), Some(2));
        assert_eq!(used_in(c.load(Ordering::Relaxed), 7), 0);
    }

    #[test]
    fn rebase_keeps_what_was_counted_since_the_read() {
        let c = AtomicU64::new(0);
        consume(&c, 5, 100);
        consume(&c, 5, 100);
        let seen = used_in(c.load(Ordering::Relaxed), 5);
        // One more request between the read and the answer from Redis.
        consume(&c, 5, 100);
        assert_eq!(rebase(&c, 5, seen, 10), Some(1));
        assert_eq!(used_in(c.load(Ordering::Relaxed), 5), 11);
        // A counter that moved to a later period is left alone.
        consume(&c, 6, 100);
        assert_eq!(rebase(&c, 5, 0, 50), None);
        assert_eq!(used_in(c.load(Ordering::Relaxed), 6), 1);
        // An empty counter takes the cluster's count.
        let e = AtomicU64::new(0);
        assert_eq!(rebase(&e, 5, 0, 7), Some(0));
        assert_eq!(consume(&e, 5, 8), Some(0));
        assert_eq!(consume(&e, 5, 8), None);
    }

    #[test]
    fn quota_exact_across_threads() {
        let c = Arc::new(AtomicU64::new(0));
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || {
                    (0..5000).filter(|_| consume(&c, 1, 1234).is_some()).count()
                })
            })
            .collect();
        let n: usize = hs.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(n, 1234);
    }

    #[test]
    fn plan_state_on_demand_for_any_key_directory() {
        // A key that only a key store knows (say, added at run time): plans need only its
        // name and plan names.
        let plan = Plan::new(
            "basic",
            vec![("shop".into(), "prod".into())],
            Some(Rate {
                rate: 1.0,
                burst: 2,
            }),
            Some(Quota {
                limit: 3,
                period: Period::Day,
            }),
        );
        let plans = Plans::new(vec![plan]);
        let route = plans.covering("shop", "prod");
        assert_eq!(route, vec![0]);
        let names: Vec<Arc<str>> = vec!["basic".into()];
        let k = |name| KeyRef {
            name,
            plans: &names,
            usage_id: name,
        };
        let s = 1_000_000_000u64;
        assert_eq!(plans.check(k("carol"), &route, 10 * s, 0), Ok(()));
        assert_eq!(plans.check(k("carol"), &route, 10 * s, 0), Ok(()));
        assert!(matches!(
            plans.check(k("carol"), &route, 10 * s, 0),
            Err(Refusal::Throttled(_))
        ));
        // Another key: its own bucket and counter.
        assert_eq!(plans.check(k("dave"), &route, 10 * s, 0), Ok(()));
        assert_eq!(plans.check(k("carol"), &route, 11 * s, 0), Ok(()));
        assert_eq!(
            plans.check(k("carol"), &route, 20 * s, 0),
            Err(Refusal::QuotaExceeded {
                retry_after_s: 86_400
            })
        );
        let u = plans.usage("basic", "carol", "carol", 0).unwrap();
        assert_eq!(
            (u["used"].as_u64(), u["remaining"].as_u64()),
            (Some(3), Some(0))
        );
        // A key whose plans do not cover the route is not metered.
        let other: Vec<Arc<str>> = vec!["gold".into()];
        let eve = KeyRef {
            name: "eve",
            plans: &other,
            usage_id: "eve",
        };
        for _ in 0..5 {
            assert_eq!(plans.check(eve, &route, 20 * s, 0), Ok(()));
        }
    }

    #[test]
    fn store_round_trip() {
        let dir = std::env::temp_dir().join(format!("rg-usage-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let s = UsageStore::open(&dir).unwrap();
            let c = s.counter("basic", "alice", Period::Day);
            for _ in 0..5 {
                consume(&c, 100, 10).expect("under the limit");
            }
            s.flush().unwrap();
        }
        let s = UsageStore::open(&dir).unwrap();
        let c = s.counter("basic", "alice", Period::Day);
        assert_eq!(used_in(c.load(Ordering::Relaxed), 100), 5);
        drop(s);
        // An entry that cannot be read stops the start: skipping it would reset that quota.
        let entry = |used: &str| {
            format!(
                r#"{{"version":1,"counters":[{{"plan":"basic","key":"alice","period":"day","index":100,"used":{used}}}]}}"#
            )
        };
        assert!(UsageStore::open_file_for_test(&dir, &entry("7")).is_ok());
        for bad in [
            entry("\"90\""),
            entry("-90"),
            entry("9e1"),
            r#"{"version":1,"counters":[{"bogus":1}]}"#.to_string(),
            r#"{"version":99,"counters":[]}"#.to_string(),
        ] {
            let e = UsageStore::open_file_for_test(&dir, &bad).err().unwrap();
            assert!(e.contains("fix or remove it"), "{bad}: {e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
