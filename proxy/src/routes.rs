//! A bounded cache of document owners: doc name → (owner process, epoch).
//!
//! Entries are invalidated, never trusted blindly: on `released{doc, epoch}`
//! ([`RouteCache::invalidate_epoch`]), on `not_owner` or a zero-receiver publish
//! ([`RouteCache::invalidate`]), and when an owner process dies or drains
//! ([`RouteCache::invalidate_node`]). Errors are never cached; an insert never replaces a newer
//! epoch with an older one. Single-flight look-ups are left to the caller.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::ids::NodeAddr;

/// Default maximum number of cached routes.
pub const DEFAULT_MAX_ROUTES: usize = 100_000;

/// Where a document lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The owning process.
    pub owner: NodeAddr,
    /// The owner's epoch (fencing token).
    pub epoch: i64,
}

/// Doc name → [`Route`], with hit/miss counters. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct RouteCache {
    // std Mutex: every critical section is a single HashMap operation, nothing awaits under it.
    routes: Mutex<HashMap<String, Route>>,
    max_entries: usize,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl Default for RouteCache {
    fn default() -> Self {
        RouteCache::new(DEFAULT_MAX_ROUTES)
    }
}

impl RouteCache {
    /// An empty cache holding at most `max_entries` routes (at least 1).
    pub fn new(max_entries: usize) -> Self {
        RouteCache {
            routes: Mutex::new(HashMap::new()),
            max_entries: max_entries.max(1),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Route>> {
        // A panic elsewhere can't leave the map half-updated (single operations), so a poisoned
        // lock is still usable.
        self.routes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The cached route for `doc`; counts a hit or a miss.
    pub fn get(&self, doc: &str) -> Option<Route> {
        let found = self.lock().get(doc).cloned();
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Caches `route` for `doc`, unless a route with a newer epoch is already cached. When the
    /// cache is full, an arbitrary entry is evicted first. Returns whether the route was stored.
    pub fn insert(&self, doc: &str, route: Route) -> bool {
        let mut routes = self.lock();
        if let Some(existing) = routes.get_mut(doc) {
            if existing.epoch > route.epoch {
                return false;
            }
            *existing = route;
            return true;
        }
        if routes.len() >= self.max_entries
            && let Some(victim) = routes.keys().next().cloned()
        {
            routes.remove(&victim);
        }
        routes.insert(doc.to_owned(), route);
        true
    }

    /// Drops the route for `doc` (after `not_owner`, or a publish that reached nobody).
    pub fn invalidate(&self, doc: &str) -> Option<Route> {
        self.lock().remove(doc)
    }

    /// Drops the route for `doc` if its epoch is at most `epoch` (on `released{doc, epoch}`,
    /// which must not wipe a newer owner learned meanwhile). Returns whether one was dropped.
    pub fn invalidate_epoch(&self, doc: &str, epoch: i64) -> bool {
        let mut routes = self.lock();
        if routes.get(doc).is_some_and(|r| r.epoch <= epoch) {
            routes.remove(doc);
            true
        } else {
            false
        }
    }

    /// Drops every route owned by `node` (it died, drained, or stopped receiving). Returns the
    /// number dropped.
    pub fn invalidate_node(&self, node: &NodeAddr) -> usize {
        let mut routes = self.lock();
        let before = routes.len();
        routes.retain(|_, r| &r.owner != node);
        before - routes.len()
    }

    /// Number of cached routes (a gauge).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Total hits so far.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Total misses so far.
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::ids::{Incarnation, NodeId};

    fn addr(name: &str, inc: u64) -> NodeAddr {
        NodeAddr::new(NodeId::new(name).unwrap(), Incarnation(inc))
    }

    fn route(name: &str, inc: u64, epoch: i64) -> Route {
        Route {
            owner: addr(name, inc),
            epoch,
        }
    }

    #[test]
    fn hit_miss_and_invalidate() {
        let cache = RouteCache::default();
        assert_eq!(cache.get("a"), None);
        assert!(cache.insert("a", route("n1", 1, 3)));
        assert_eq!(cache.get("a"), Some(route("n1", 1, 3)));
        assert_eq!((cache.hits(), cache.misses()), (1, 1));
        assert_eq!(cache.invalidate("a"), Some(route("n1", 1, 3)));
        assert_eq!(cache.get("a"), None);
        assert_eq!((cache.hits(), cache.misses()), (1, 2));
    }

    #[test]
    fn older_epoch_never_replaces_newer() {
        let cache = RouteCache::default();
        cache.insert("a", route("n2", 2, 7));
        assert!(!cache.insert("a", route("n1", 1, 6)));
        assert_eq!(cache.get("a").unwrap().epoch, 7);
        assert!(cache.insert("a", route("n3", 3, 8)));
        assert_eq!(cache.get("a").unwrap().owner, addr("n3", 3));
    }

    #[test]
    fn released_only_drops_that_epoch_or_older() {
        let cache = RouteCache::default();
        cache.insert("a", route("n1", 1, 5));
        assert!(!cache.invalidate_epoch("a", 4));
        assert!(cache.invalidate_epoch("a", 5));
        assert!(cache.is_empty());
    }

    #[test]
    fn invalidate_node_drops_only_that_incarnation() {
        let cache = RouteCache::default();
        cache.insert("a", route("n1", 1, 1));
        cache.insert("b", route("n1", 1, 1));
        cache.insert("c", route("n1", 2, 1));
        cache.insert("d", route("n2", 1, 1));
        assert_eq!(cache.invalidate_node(&addr("n1", 1)), 2);
        assert_eq!(cache.len(), 2);
        assert!(cache.get("c").is_some());
    }

    #[test]
    fn bounded() {
        let cache = RouteCache::new(3);
        for i in 0..10 {
            cache.insert(&format!("doc{i}"), route("n", 1, 1));
        }
        assert_eq!(cache.len(), 3);
        assert!(cache.get("doc9").is_some());
    }
}
