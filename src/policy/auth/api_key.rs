//! API keys: the live key set shared by every worker, and its persistence.
//!
//! Keys are held as SHA-256 digests only. A lookup hashes the presented value, finds the
//! candidates by the digest's first 8 bytes, and compares the full digest in constant time. The
//! set is an immutable [`KeySet`] behind an `ArcSwap`: a worker reads it with one atomic load,
//! and an admin change swaps in a new set that every worker sees on its next request.
//!
//! Keys added at run time (admin `POST /api-keys`) are written to `state_dir/api_keys.json`
//! (temporary file, fsync, rename, fsync of the directory), so they survive a restart or a
//! `kill -9`; the file holds digests, never key values.
//!
//! With `[cluster]`, every admin change is also handed to the cluster thread (through the hook
//! set by [`AuthState::on_change`]), which writes it to Redis; the admin-added keys of every
//! node are then replaced by the cluster's set ([`AuthState::replace_admin`]). A new key is
//! first reserved in the cluster's set (the hook set by [`AuthState::on_add`]): a name or value
//! another node holds is refused with 409, as on one node.

use super::RawApiKey;
use crate::config::{ConfigError, Source};
use ahash::AHashMap;
use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Shortest accepted key value (as API Gateway).
pub const MIN_KEY_LEN: usize = 20;
/// Longest accepted key value.
pub const MAX_KEY_LEN: usize = 256;
/// Most keys added at run time.
pub const MAX_ADMIN_KEYS: usize = 100_000;
/// The 409 message for a value another key has.
const IN_USE: &str = "this key value is in use";

/// Where a key comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeySource {
    /// `[[api_keys]]` in the config file.
    Config,
    /// Admin `POST /api-keys`, persisted in `state_dir`.
    Admin,
}

/// One API key (its value only as a digest).
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub name: Arc<str>,
    pub plans: Vec<Arc<str>>,
    pub enabled: bool,
    /// SHA-256 of the value.
    pub hash: [u8; 32],
    pub source: KeySource,
    /// What its quota counts are kept under: the name, or for a key added at run time the name
    /// and an id of that key (`name~id`), so a key deleted and created again starts afresh.
    pub usage_id: Arc<str>,
}

/// SHA-256 of a key value.
pub fn digest(value: &[u8]) -> [u8; 32] {
    Sha256::digest(value).into()
}

/// What a key (or usage plan) name may be: [`NAME_RULE`].
pub(crate) fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 128
        && n.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.@".contains(&c))
        // `.` and `..` could never be named in an admin path (`/api-keys/..`).
        && n.bytes().any(|c| c != b'.')
}

/// The key name rule, as error messages state it.
const NAME_RULE: &str = "a key name is 1-128 letters, digits, `-`, `_`, `.` or `@`, not dots only";

fn valid_value(v: &str) -> bool {
    (MIN_KEY_LEN..=MAX_KEY_LEN).contains(&v.len()) && v.bytes().all(|c| c.is_ascii_graphic())
}

pub(super) fn validate_config_key(
    src: &Source,
    i: usize,
    k: &RawApiKey,
) -> Result<ApiKey, ConfigError> {
    if !valid_name(k.name.get_ref()) {
        return Err(src.err(k.name.span(), &format!("api_keys[{i}].name"), NAME_RULE));
    }
    if !valid_value(k.value.get_ref()) {
        return Err(src.err(
            k.value.span(),
            &format!("api_keys[{i}].value"),
            format!("a key value is {MIN_KEY_LEN}-{MAX_KEY_LEN} visible ASCII characters"),
        ));
    }
    Ok(ApiKey {
        name: k.name.get_ref().as_str().into(),
        plans: k.plans.iter().map(|p| p.as_str().into()).collect(),
        enabled: k.enabled,
        hash: digest(k.value.get_ref().as_bytes()),
        source: KeySource::Config,
        usage_id: k.name.get_ref().as_str().into(),
    })
}

/// An immutable set of keys, indexed by digest prefix.
#[derive(Debug, Default)]
pub struct KeySet {
    keys: Vec<ApiKey>,
    by_prefix: AHashMap<u64, Vec<u32>>,
}

impl KeySet {
    /// Builds the index.
    pub fn new(keys: Vec<ApiKey>) -> KeySet {
        let mut by_prefix: AHashMap<u64, Vec<u32>> = AHashMap::with_capacity(keys.len());
        for (i, k) in keys.iter().enumerate() {
            by_prefix.entry(prefix(&k.hash)).or_default().push(i as u32);
        }
        KeySet { keys, by_prefix }
    }

    /// The enabled key with this value, if any.
    pub fn check(&self, value: &[u8]) -> Option<&ApiKey> {
        if value.len() > MAX_KEY_LEN {
            return None;
        }
        let h = digest(value);
        let cands = self.by_prefix.get(&prefix(&h))?;
        let mut found = None;
        for &i in cands {
            let k = &self.keys[i as usize];
            if crate::admin::ct_eq(&k.hash, &h) {
                found = Some(k);
            }
        }
        found.filter(|k| k.enabled)
    }

    /// Every key, config keys first.
    pub fn keys(&self) -> &[ApiKey] {
        &self.keys
    }

    /// The key with this name.
    pub fn by_name(&self, name: &str) -> Option<&ApiKey> {
        self.keys.iter().find(|k| &*k.name == name)
    }
}

/// A fresh id for a new key's quota counts: 12 hex digits from its digest and the time.
fn usage_id(hash: &[u8; 32]) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut h = Sha256::new();
    h.update(hash);
    h.update(nanos.to_le_bytes());
    hex(&h.finalize()[..6])
}

fn prefix(h: &[u8; 32]) -> u64 {
    u64::from_le_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]])
}

/// A key as stored in `api_keys.json` (and, with `[cluster]`, in Redis).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StoredKey {
    name: String,
    #[serde(default)]
    plans: Vec<String>,
    enabled: bool,
    /// Hex SHA-256 of the value.
    sha256: String,
    #[serde(default)]
    created: u64,
    /// Id of this key for its quota counts (absent in files written before it existed: the
    /// counts are then kept under the bare name, as they were).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    usage: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StoredFile {
    version: u32,
    keys: Vec<StoredKey>,
}

/// Auth state shared by every thread and kept across reloads.
pub struct AuthState {
    keys: ArcSwap<KeySet>,
    /// Config keys of the live config and the admin-added keys; writers hold the lock.
    inner: Mutex<Inner>,
    /// Told of every admin change (set by the cluster).
    hook: std::sync::OnceLock<ChangeHook>,
    /// Reserves a new key in the cluster's set (set by the cluster).
    reserve: std::sync::OnceLock<ReserveHook>,
    /// Held by [`AuthState::add`] from its checks to its commit ([`AuthState::hold_adds`]).
    adding: Mutex<()>,
}

/// The cluster's answer to the reservation of a new key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// Written to the cluster's set: no key there has the name or the value.
    Done,
    /// A key of the cluster has the name.
    NameTaken,
    /// A key of the cluster has the value.
    ValueTaken,
    /// The cluster store could not be asked (unreachable, too slow, or this node still has to
    /// merge its keys): the key is added here and shared later, as during an outage.
    Unknown,
}

/// Called with a new key's name and stored form before it is added.
type ReserveHook = Box<dyn Fn(&str, &str) -> Reservation + Send + Sync>;

/// Whether the cluster's set `entries` (field name, stored form; other fields skipped) already
/// holds the name or the value of the new key `json` (stored form) named `name`.
pub fn clash<'a>(
    entries: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    name: &str,
    json: &str,
) -> Option<Reservation> {
    let sha = serde_json::from_str::<StoredKey>(json).ok()?.sha256;
    for (field, stored) in entries {
        if field == name {
            return Some(Reservation::NameTaken);
        }
        if serde_json::from_slice::<StoredKey>(stored).is_ok_and(|k| k.sha256 == sha) {
            return Some(Reservation::ValueTaken);
        }
    }
    None
}

/// Called with each change and the [`AuthState::admin_generation`] it made.
type ChangeHook = Box<dyn Fn(KeyChange, u64) + Send + Sync>;

/// An admin change to the key set, for the cluster to share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyChange {
    /// A key was added: its name and its stored form (JSON with the digest, never the value).
    Put { name: String, json: String },
    /// The admin-added key of this name was deleted.
    Delete(String),
}

struct Inner {
    config_keys: Vec<ApiKey>,
    admin: Vec<StoredKey>,
    file: PathBuf,
    /// Bumped by every admin change made on this node.
    generation: u64,
}

/// Why an admin change was refused.
#[derive(Debug)]
pub enum KeyError {
    /// 400: bad input.
    Invalid(String),
    /// 404.
    NotFound,
    /// 409.
    Conflict(String),
    /// 500: the state file could not be written (the change was not made).
    Io(String),
}

impl AuthState {
    /// Loads the persisted keys from `state_dir` and merges them with the config's.
    pub fn new(state_dir: &Path, config_keys: &[ApiKey]) -> Result<AuthState, String> {
        let file = state_dir.join("api_keys.json");
        let admin = match std::fs::read(&file) {
            Ok(b) => {
                let f: StoredFile = serde_json::from_slice(&b)
                    .map_err(|e| format!("{}: not a valid key file: {e}", file.display()))?;
                // An entry that cannot be used would make its key vanish without a word.
                let bad = |why: String| {
                    format!(
                        "{}: not a valid key file ({why}); fix or remove it",
                        file.display()
                    )
                };
                if f.version != 1 {
                    return Err(bad(format!(
                        "version {} (this gateway writes 1)",
                        f.version
                    )));
                }
                for (i, k) in f.keys.iter().enumerate() {
                    if unhex32(&k.sha256).is_none() {
                        return Err(bad(format!("keys[{i}].sha256 is not a hex SHA-256 digest")));
                    }
                    if !valid_name(&k.name) {
                        return Err(bad(format!("keys[{i}].name: {NAME_RULE}")));
                    }
                }
                f.keys
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(format!("cannot read {}: {e}", file.display())),
        };
        // As a reload would be: a config key may not shadow a run-time one.
        if let Some(e) = shadowing(&admin, config_keys) {
            return Err(format!("{e} (run-time keys are in {})", file.display()));
        }
        let inner = Inner {
            config_keys: config_keys.to_vec(),
            admin,
            file,
            generation: 0,
        };
        let set = build(&inner);
        Ok(AuthState {
            keys: ArcSwap::from_pointee(set),
            inner: Mutex::new(inner),
            hook: std::sync::OnceLock::new(),
            reserve: std::sync::OnceLock::new(),
            adding: Mutex::new(()),
        })
    }

    /// Calls `f` after every admin change from now on (once; later calls are ignored).
    pub fn on_change(&self, f: ChangeHook) {
        let _ = self.hook.set(f);
    }

    /// Calls `f` before every admin addition from now on (once; later calls are ignored): a
    /// name or value it reports taken is refused with 409.
    pub fn on_add(&self, f: ReserveHook) {
        let _ = self.reserve.set(f);
    }

    /// Holds off admin additions; `None` while one is under way. The cluster reloads the key
    /// set only while holding this: a key reserved in the cluster's set but not yet added here
    /// would otherwise come in by the reload, and its own addition then find its name taken.
    pub fn hold_adds(&self) -> Option<std::sync::MutexGuard<'_, ()>> {
        match self.adding.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    fn changed(&self, c: KeyChange, generation: u64) {
        if let Some(f) = self.hook.get() {
            f(c, generation);
        }
    }

    /// Changes with every admin change made on this node (see [`AuthState::replace_admin`]).
    pub fn admin_generation(&self) -> u64 {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .generation
    }

    /// The admin-added keys in their stored form (JSON holding the digest, never the value).
    pub fn admin_entries(&self) -> Vec<(String, String)> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.admin
            .iter()
            .filter_map(|k| Some((k.name.clone(), serde_json::to_string(k).ok()?)))
            .collect()
    }

    /// Replaces the admin-added keys by `entries` (the cluster's set, in stored form; entries
    /// that do not parse are skipped) and persists them, unless an admin change was made here
    /// since [`AuthState::admin_generation`] answered `generation` (the set read from the
    /// cluster may predate it). Returns whether the set was replaced or already equal.
    pub fn replace_admin(&self, entries: &[Vec<u8>], generation: u64) -> bool {
        let mut next: Vec<StoredKey> = entries
            .iter()
            .filter_map(|e| serde_json::from_slice::<StoredKey>(e).ok())
            .filter(|k| {
                valid_name(&k.name)
                    && unhex32(&k.sha256).is_some()
                    && k.usage.len() <= 32
                    && k.usage.bytes().all(|c| c.is_ascii_hexdigit())
            })
            .take(MAX_ADMIN_KEYS)
            .collect();
        let order = |a: &StoredKey, b: &StoredKey| (a.created, &a.name).cmp(&(b.created, &b.name));
        next.sort_by(order);
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.generation != generation {
            return false;
        }
        let mut cur = g.admin.clone();
        cur.sort_by(order);
        if cur == next {
            return true;
        }
        g.admin = next;
        if let Err(e) = persist(&g) {
            crate::elog!("ringgate: cluster keys: {e}");
        }
        self.keys.store(Arc::new(build(&g)));
        true
    }

    /// The live key set (one atomic load).
    #[inline]
    pub fn keys(&self) -> arc_swap::Guard<Arc<KeySet>> {
        self.keys.load()
    }

    /// A new config goes live: its `[[api_keys]]` replace the old config's. Refused (nothing
    /// changes) when one has the name or the value of a key added at run time, which it would
    /// shadow, as `POST /api-keys` refuses a duplicate; the error says which (`api_keys[i]`).
    pub fn set_config_keys(&self, keys: &[ApiKey]) -> Result<(), String> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = shadowing(&g.admin, keys) {
            return Err(e);
        }
        g.config_keys = keys.to_vec();
        self.keys.store(Arc::new(build(&g)));
        Ok(())
    }

    /// Adds a key (`value` generated when absent); returns the value.
    pub fn add(
        &self,
        name: &str,
        plans: Vec<String>,
        value: Option<String>,
        enabled: bool,
    ) -> Result<String, KeyError> {
        if !valid_name(name) {
            return Err(KeyError::Invalid(format!("name: {NAME_RULE}")));
        }
        if plans.iter().any(|p| p.is_empty() || p.len() > 128) || plans.len() > 64 {
            return Err(KeyError::Invalid(
                "plans: at most 64 non-empty names".into(),
            ));
        }
        let value = match value {
            Some(v) => {
                if !valid_value(&v) {
                    return Err(KeyError::Invalid(format!(
                        "value: {MIN_KEY_LEN}-{MAX_KEY_LEN} visible ASCII characters"
                    )));
                }
                v
            }
            None => generate_value().map_err(|e| KeyError::Io(e.to_string()))?,
        };
        let hash = digest(value.as_bytes());
        let _adding = self.adding.lock().unwrap_or_else(|e| e.into_inner());
        let stored = {
            let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            self.addable(&g, name, &hash)?;
            StoredKey {
                name: name.to_string(),
                plans,
                enabled,
                sha256: hex(&hash),
                created: super::now_unix(),
                usage: usage_id(&hash),
            }
        };
        let json = serde_json::to_string(&stored).map_err(|e| KeyError::Io(e.to_string()))?;
        // Not under the lock: the cluster thread takes it, and this waits for that thread.
        let reserved = self
            .reserve
            .get()
            .map_or(Reservation::Unknown, |f| f(name, &json));
        match reserved {
            Reservation::NameTaken => {
                return Err(KeyError::Conflict(format!("a key named `{name}` exists")))
            }
            Reservation::ValueTaken => return Err(KeyError::Conflict(IN_USE.into())),
            Reservation::Done | Reservation::Unknown => {}
        }
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        // Again: a config reload does not wait for `adding`.
        let added = self.addable(&g, name, &hash).and_then(|()| {
            g.admin.push(stored);
            persist(&g).map_err(|e| {
                g.admin.pop();
                KeyError::Io(e)
            })
        });
        if let Err(e) = added {
            if reserved == Reservation::Done {
                // Taken back from the cluster's set.
                g.generation += 1;
                let generation = g.generation;
                drop(g);
                self.changed(KeyChange::Delete(name.to_string()), generation);
            }
            return Err(e);
        }
        self.keys.store(Arc::new(build(&g)));
        g.generation += 1;
        let generation = g.generation;
        drop(g);
        self.changed(
            KeyChange::Put {
                name: name.to_string(),
                json,
            },
            generation,
        );
        Ok(value)
    }

    /// Whether a key named `name` with the value digest `hash` can be added to this node's set.
    fn addable(&self, g: &Inner, name: &str, hash: &[u8; 32]) -> Result<(), KeyError> {
        let cur = self.keys.load();
        if cur.by_name(name).is_some() {
            return Err(KeyError::Conflict(format!("a key named `{name}` exists")));
        }
        if cur.keys().iter().any(|k| k.hash == *hash) {
            return Err(KeyError::Conflict(IN_USE.into()));
        }
        if g.admin.len() >= MAX_ADMIN_KEYS {
            return Err(KeyError::Conflict("too many keys".into()));
        }
        Ok(())
    }

    /// Deletes an admin-added key.
    pub fn delete(&self, name: &str) -> Result<(), KeyError> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Some(pos) = g.admin.iter().position(|k| k.name == name) else {
            if g.config_keys.iter().any(|k| &*k.name == name) {
                return Err(KeyError::Conflict(format!(
                    "key `{name}` is defined in the config file; remove it there and reload"
                )));
            }
            return Err(KeyError::NotFound);
        };
        let removed = g.admin.remove(pos);
        if let Err(e) = persist(&g) {
            g.admin.insert(pos, removed);
            return Err(KeyError::Io(e));
        }
        self.keys.store(Arc::new(build(&g)));
        g.generation += 1;
        let generation = g.generation;
        drop(g);
        self.changed(KeyChange::Delete(name.to_string()), generation);
        Ok(())
    }
}

/// Why a config key would shadow a key added at run time (same name or same value), if one does.
fn shadowing(admin: &[StoredKey], keys: &[ApiKey]) -> Option<String> {
    for (i, k) in keys.iter().enumerate() {
        for a in admin {
            if *a.name == *k.name {
                return Some(format!(
                    "key `api_keys[{i}].name`: `{}` is the name of a key added at run time (admin); delete that one (DELETE /api-keys/{}) or rename this one",
                    k.name, k.name
                ));
            }
            if unhex32(&a.sha256) == Some(k.hash) {
                return Some(format!(
                    "key `api_keys[{i}].value`: the value of key `{}` is that of the key `{}` added at run time (admin); a value belongs to one key",
                    k.name, a.name
                ));
            }
        }
    }
    None
}

fn build(inner: &Inner) -> KeySet {
    let mut keys = inner.config_keys.clone();
    for s in &inner.admin {
        // A config key of the same name wins (the admin refuses such a name anyway).
        if keys.iter().any(|k| *k.name == *s.name) {
            continue;
        }
        let Some(hash) = unhex32(&s.sha256) else {
            continue;
        };
        keys.push(ApiKey {
            usage_id: if s.usage.is_empty() {
                s.name.as_str().into()
            } else {
                format!("{}~{}", s.name, s.usage).into()
            },
            name: s.name.as_str().into(),
            plans: s.plans.iter().map(|p| p.as_str().into()).collect(),
            enabled: s.enabled,
            hash,
            source: KeySource::Admin,
        });
    }
    KeySet::new(keys)
}

/// Writes the admin keys (see [`crate::statefile::write_atomic`]).
fn persist(inner: &Inner) -> Result<(), String> {
    let body = serde_json::to_vec_pretty(&StoredFile {
        version: 1,
        keys: inner.admin.clone(),
    })
    .map_err(|e| e.to_string())?;
    crate::statefile::write_atomic(&inner.file, &body)
        .map_err(|e| format!("cannot write {}: {e}", inner.file.display()))
}

fn generate_value() -> Result<String, getrandom::Error> {
    let mut b = [0u8; 24];
    getrandom::getrandom(&mut b)?;
    Ok(hex(&b))
}

/// Lowercase hex.
pub(crate) fn hex(b: &[u8]) -> String {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(H[(x >> 4) as usize] as char);
        s.push(H[(x & 15) as usize] as char);
    }
    s
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        let d = |c: u8| (c as char).to_digit(16).map(|v| v as u8);
        *o = d(b[2 * i])? << 4 | d(b[2 * i + 1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn clash_finds_a_name_or_a_value_in_the_cluster_set() {
        let stored = |name: &str, value: &str| {
            serde_json::to_string(&StoredKey {
                name: name.into(),
                plans: vec![],
                enabled: true,
                sha256: hex(&digest(value.as_bytes())),
                created: 1,
                usage: String::new(),
            })
            .unwrap()
        };
        let set = [
            (".".to_string(), "epoch-1".to_string()),
            (
                "bob".to_string(),
                stored("bob", "bob-value-0123456789abcdef"),
            ),
        ];
        let entries = || set.iter().map(|(k, v)| (k.as_str(), v.as_bytes()));
        let new = stored("carol", "carol-value-0123456789abcdef");
        assert_eq!(clash(entries(), "carol", &new), None);
        assert_eq!(clash(entries(), "bob", &new), Some(Reservation::NameTaken));
        let same_value = stored("carol", "bob-value-0123456789abcdef");
        assert_eq!(
            clash(entries(), "carol", &same_value),
            Some(Reservation::ValueTaken)
        );
    }

    fn key(name: &str, value: &str, enabled: bool) -> ApiKey {
        ApiKey {
            name: name.into(),
            plans: vec![],
            enabled,
            hash: digest(value.as_bytes()),
            source: KeySource::Config,
            usage_id: name.into(),
        }
    }

    #[test]
    fn check_finds_enabled_keys_only() {
        let s = KeySet::new(vec![
            key("a", "aaaaaaaaaaaaaaaaaaaaaaaa", true),
            key("b", "bbbbbbbbbbbbbbbbbbbbbbbb", false),
        ]);
        assert_eq!(&*s.check(b"aaaaaaaaaaaaaaaaaaaaaaaa").unwrap().name, "a");
        assert!(s.check(b"bbbbbbbbbbbbbbbbbbbbbbbb").is_none());
        assert!(s.check(b"aaaaaaaaaaaaaaaaaaaaaaab").is_none());
        assert!(s.check(b"").is_none());
    }

    #[test]
    fn admin_keys_persist_and_reload() {
        let dir = std::env::temp_dir().join(format!("rg-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let st = AuthState::new(&dir, &[key("cfg", "cccccccccccccccccccccccc", true)]).unwrap();
        let v = st.add("bob", vec!["basic".into()], None, true).unwrap();
        assert_eq!(v.len(), 48);
        assert!(matches!(
            st.add("cfg", vec![], None, true),
            Err(KeyError::Conflict(_))
        ));
        assert!(matches!(
            st.add("x", vec![], Some("short".into()), true),
            Err(KeyError::Invalid(_))
        ));
        assert!(st.keys().check(v.as_bytes()).is_some());
        let text = std::fs::read_to_string(dir.join("api_keys.json")).unwrap();
        assert!(!text.contains(&v), "the value must not be stored");
        let st2 = AuthState::new(&dir, &[]).unwrap();
        let bob = st2.keys().check(v.as_bytes()).unwrap().clone();
        assert_eq!(&*bob.name, "bob");
        // The quota identity of a run-time key is its own, and survives the restart.
        let id = st.keys().check(v.as_bytes()).unwrap().usage_id.clone();
        assert!(id.starts_with("bob~") && id.len() == 16, "{id}");
        assert_eq!(bob.usage_id, id);
        assert_eq!(&*st.keys().by_name("cfg").unwrap().usage_id, "cfg");
        st2.delete("bob").unwrap();
        assert!(st2.keys().check(v.as_bytes()).is_none());
        assert!(matches!(st2.delete("bob"), Err(KeyError::NotFound)));
        // A start whose config key would shadow a run-time key is refused, as a reload is.
        let v2 = st2.add("eve", vec![], None, true).unwrap();
        let e = AuthState::new(&dir, &[key("eve", "some-other-value-000000001", true)])
            .err()
            .unwrap();
        assert!(
            e.contains("api_keys[0].name") && e.contains("api_keys.json"),
            "{e}"
        );
        let e = AuthState::new(&dir, &[key("zed", &v2, true)])
            .err()
            .unwrap();
        assert!(e.contains("api_keys[0].value") && e.contains("eve"), "{e}");
        st2.delete("eve").unwrap();
        let st3 = AuthState::new(&dir, &[]).unwrap();
        assert!(st3.keys().keys().is_empty());
        // A key file from before usage ids: the counts stay under the bare name.
        let old = format!(
            r#"{{"version":1,"keys":[{{"name":"old","enabled":true,"sha256":"{}"}}]}}"#,
            hex(&digest(b"old-key-value-0123456789"))
        );
        std::fs::write(dir.join("api_keys.json"), old).unwrap();
        let st4 = AuthState::new(&dir, &[]).unwrap();
        assert_eq!(&*st4.keys().by_name("old").unwrap().usage_id, "old");
        // An entry that cannot be used stops the start rather than vanishing quietly.
        for (file, want) in [
            (
                r#"{"version":1,"keys":[{"name":"x","enabled":true,"sha256":"not-a-digest"}]}"#,
                "keys[0].sha256",
            ),
            (r#"{"version":99,"keys":[]}"#, "version 99"),
        ] {
            std::fs::write(dir.join("api_keys.json"), file).unwrap();
            let e = AuthState::new(&dir, &[]).err().unwrap();
            assert!(e.contains(want) && e.contains("fix or remove it"), "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn dot_only_names_are_refused() {
        let dir = std::env::temp_dir().join(format!("rg-keys-dots-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let st = AuthState::new(&dir, &[]).unwrap();
        for n in [".", "..", "..."] {
            assert!(
                matches!(st.add(n, vec![], None, true), Err(KeyError::Invalid(_))),
                "{n}"
            );
        }
        assert!(st.add("a.b", vec![], None, true).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn cluster_set_replaces_admin_keys_unless_a_local_change_came_since() {
        let dir = std::env::temp_dir().join(format!("rg-keys-cl-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let st = AuthState::new(&dir, &[]).unwrap();
        let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        st.on_change(Box::new(move |c, g| s2.lock().unwrap().push((c, g))));
        let g0 = st.admin_generation();
        st.add("bob", vec![], Some("b".repeat(24)), true).unwrap();
        let (json, g1) = match &seen.lock().unwrap()[0] {
            (KeyChange::Put { name, json }, g) if name == "bob" => (json.clone(), *g),
            other => panic!("{other:?}"),
        };
        assert_eq!(g1, st.admin_generation());
        // A set read before the add must not undo it.
        assert!(!st.replace_admin(&[], g0));
        assert!(st.keys().check("b".repeat(24).as_bytes()).is_some());
        // The cluster's set (another node's key plus ours) replaces ours, and persists.
        let other = json.replace("bob", "carol");
        assert!(st.replace_admin(&[json.into_bytes(), other.into_bytes()], g1));
        assert_eq!(st.keys().keys().len(), 2);
        st.delete("bob").unwrap();
        assert!(matches!(
            seen.lock().unwrap().last(),
            Some((KeyChange::Delete(n), _)) if n == "bob"
        ));
        let st2 = AuthState::new(&dir, &[]).unwrap();
        assert!(st2.keys().by_name("carol").is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn hex_roundtrip() {
        let h = digest(b"x");
        assert_eq!(unhex32(&hex(&h)), Some(h));
        assert_eq!(unhex32("zz"), None);
    }
}
