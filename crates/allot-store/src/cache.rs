//! A process's cache of catalogue documents (venues, resources, events): a hold, a seat map or
//! an availability read then parses no JSON and asks the database nothing about the catalogue.
//!
//! On SQLite this process makes every change, and drops the entry once the change commits. On
//! PostgreSQL, where other nodes change them too, every catalogue change sends `NOTIFY` with
//! the changed entry's key in its transaction; each node's listener drops that entry. A read that raced with an invalidation must not put the old
//! document back: entries are only stored if no invalidation happened since the read began
//! (the generation check). While the listener is not connected nothing is cached at all.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// Past this many entries the cache is emptied rather than grown.
pub const CACHE_ENTRIES_MAX: usize = 100_000;
/// The key of a notification that drops every entry.
pub const INVALIDATE_ALL: &str = "*";

type Entry = Arc<dyn Any + Send + Sync>;

#[derive(Default)]
struct Inner {
    generation: u64,
    enabled: bool,
    entries: HashMap<String, Entry>,
}

#[derive(Default)]
pub struct Cache {
    inner: RwLock<Inner>,
}

/// The key of a cached document: `kind:id`, also the payload of its notification.
pub fn key(kind: &str, id: impl std::fmt::Display) -> String {
    format!("{kind}:{id}")
}

impl Cache {
    /// Read before loading from the database; pass to [`Cache::put`].
    pub fn generation(&self) -> u64 {
        self.read().generation
    }

    pub fn get<T: Clone + Send + Sync + 'static>(&self, key: &str) -> Option<T> {
        self.read().entries.get(key).and_then(|e| e.downcast_ref::<T>()).cloned()
    }

    /// Stores `value` unless the cache was invalidated since `generation` was read.
    pub fn put<T: Send + Sync + 'static>(&self, generation: u64, key: String, value: T) {
        let mut inner = self.write();
        if !inner.enabled || inner.generation != generation {
            return;
        }
        if inner.entries.len() >= CACHE_ENTRIES_MAX {
            inner.entries.clear();
        }
        inner.entries.insert(key, Arc::new(value));
    }

    /// The cached values of `ids` (in order), and the ids not cached.
    pub fn get_many<T, I>(&self, ids: &[I], key: impl Fn(&I) -> String) -> (Vec<T>, Vec<I>)
    where
        T: Clone + Send + Sync + 'static,
        I: Clone,
    {
        let inner = self.read();
        let mut hits = Vec::with_capacity(ids.len());
        let mut missing = Vec::new();
        for id in ids {
            match inner.entries.get(&key(id)).and_then(|e| e.downcast_ref::<T>()) {
                Some(v) => hits.push(v.clone()),
                None => missing.push(id.clone()),
            }
        }
        (hits, missing)
    }

    /// The cached value at `key`, or `load`'s (stored if no invalidation raced with it).
    pub async fn get_or_load<T, E, F>(&self, key: String, load: F) -> Result<Option<T>, E>
    where
        T: Clone + Send + Sync + 'static,
        F: std::future::Future<Output = Result<Option<T>, E>>,
    {
        if let Some(hit) = self.get::<T>(&key) {
            return Ok(Some(hit));
        }
        let generation = self.generation();
        let Some(value) = load.await? else { return Ok(None) };
        self.put(generation, key, value.clone());
        Ok(Some(value))
    }

    /// Drops the entry named by a notification payload (or everything for [`INVALIDATE_ALL`]).
    pub fn invalidate(&self, key: &str) {
        let mut inner = self.write();
        inner.generation += 1;
        if key == INVALIDATE_ALL {
            inner.entries.clear();
        } else {
            inner.entries.remove(key);
        }
    }

    /// Turns caching on (listener connected) or off (listener lost: changes could be missed).
    /// Either way everything cached so far is dropped.
    pub fn set_enabled(&self, enabled: bool) {
        let mut inner = self.write();
        inner.generation += 1;
        inner.enabled = enabled;
        inner.entries.clear();
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Resources this process versioned at most; past it every version moves on at once.
pub const VERSIONED_RESOURCES_MAX: usize = 1_000_000;

/// Versions of resources' claims, bumped once a write to them commits (SQLite: this process
/// makes every write), for caches of what those claims show (seat maps).
#[derive(Default)]
pub struct ResourceVersions {
    inner: RwLock<VersionsInner>,
}

#[derive(Default)]
struct VersionsInner {
    last: u64,
    /// The version of every resource not in `versions`.
    floor: u64,
    versions: HashMap<allot_core::ids::ResourceId, u64>,
}

impl ResourceVersions {
    /// Gives `ids` a version above every version so far.
    pub fn bump(&self, ids: impl IntoIterator<Item = allot_core::ids::ResourceId>) {
        let mut inner = self.inner.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        inner.last += 1;
        let version = inner.last;
        if inner.versions.len() >= VERSIONED_RESOURCES_MAX {
            inner.versions.clear();
            inner.floor = version;
        }
        for id in ids {
            inner.versions.insert(id, version);
        }
    }

    /// The highest version among `ids`: it changes whenever any of them is bumped.
    pub fn max(&self, ids: &[allot_core::ids::ResourceId]) -> u64 {
        let inner = self.inner.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        ids.iter().map(|id| inner.versions.get(id).copied().unwrap_or(inner.floor)).max().unwrap_or(inner.floor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_that_raced_an_invalidation_is_not_stored() {
        let cache = Cache::default();
        cache.set_enabled(true);
        let generation = cache.generation();
        cache.invalidate("resource:a");
        cache.put(generation, "resource:a".into(), 1_u32);
        assert_eq!(cache.get::<u32>("resource:a"), None);
        cache.put(cache.generation(), "resource:a".into(), 2_u32);
        assert_eq!(cache.get::<u32>("resource:a"), Some(2));
        cache.invalidate("resource:a");
        assert_eq!(cache.get::<u32>("resource:a"), None);
    }

    #[test]
    fn a_bump_moves_the_version_of_every_set_holding_a_bumped_resource() {
        use allot_core::ids::ResourceId;
        let versions = ResourceVersions::default();
        let (a, b, c) = (ResourceId::new(), ResourceId::new(), ResourceId::new());
        let (ab, c_only) = (versions.max(&[a, b]), versions.max(&[c]));
        versions.bump([b]);
        assert_ne!(versions.max(&[a, b]), ab);
        assert_eq!(versions.max(&[c]), c_only);
        let ab = versions.max(&[a, b]);
        versions.bump([c]);
        assert_eq!(versions.max(&[a, b]), ab, "c is not among them");
    }

    #[test]
    fn nothing_is_cached_while_disabled() {
        let cache = Cache::default();
        cache.put(cache.generation(), "venue:v".into(), 1_u32);
        assert_eq!(cache.get::<u32>("venue:v"), None);
        cache.set_enabled(true);
        cache.put(cache.generation(), "venue:v".into(), 1_u32);
        cache.invalidate(INVALIDATE_ALL);
        assert_eq!(cache.get::<u32>("venue:v"), None);
    }
}
