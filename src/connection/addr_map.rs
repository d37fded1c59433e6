//! [`AddrMap`]: a socket's documents by address, sized for the common case of one.
//!
//! Most sockets carry one document, some a few, a few many (up to
//! `max_documents_per_connection`). A `HashMap` allocates four buckets for its first entry
//! (about 450 bytes per idle socket here); this map keeps up to [`SMALL`] entries in a vector
//! grown one slot at a time, searched linearly, and moves them into a `HashMap` past that, so
//! a socket with many documents still finds each frame's document in constant time.

use std::collections::HashMap;

/// Entries kept in the vector before the map becomes a `HashMap`.
pub(super) const SMALL: usize = 8;

/// String-keyed map; see the module documentation.
#[derive(Debug)]
pub(super) enum AddrMap<V> {
    /// Up to [`SMALL`] entries, in insertion order.
    Small(Vec<(String, V)>),
    /// More than [`SMALL`] entries at some point.
    Large(HashMap<String, V>),
}

impl<V> Default for AddrMap<V> {
    fn default() -> Self {
        AddrMap::Small(Vec::new())
    }
}

impl<V> AddrMap<V> {
    /// The value at `key`.
    pub(super) fn get(&self, key: &str) -> Option<&V> {
        match self {
            AddrMap::Small(v) => v.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            AddrMap::Large(m) => m.get(key),
        }
    }

    /// The value at `key`, mutably.
    pub(super) fn get_mut(&mut self, key: &str) -> Option<&mut V> {
        match self {
            AddrMap::Small(v) => v.iter_mut().find(|(k, _)| k == key).map(|(_, v)| v),
            AddrMap::Large(m) => m.get_mut(key),
        }
    }

    /// Sets `key` to `value`, returning the value it replaced.
    pub(super) fn insert(&mut self, key: String, value: V) -> Option<V> {
        match self {
            AddrMap::Small(v) => {
                if let Some((_, old)) = v.iter_mut().find(|(k, _)| *k == key) {
                    return Some(std::mem::replace(old, value));
                }
                if v.len() < SMALL {
                    v.reserve_exact(1); // one slot at a time: most sockets never get a second
                    v.push((key, value));
                    return None;
                }
                let mut m: HashMap<String, V> = std::mem::take(v).into_iter().collect();
                m.insert(key, value);
                *self = AddrMap::Large(m);
                None
            }
            AddrMap::Large(m) => m.insert(key, value),
        }
    }

    /// Removes `key`, returning its value.
    pub(super) fn remove(&mut self, key: &str) -> Option<V> {
        match self {
            AddrMap::Small(v) => {
                let i = v.iter().position(|(k, _)| k == key)?;
                Some(v.swap_remove(i).1)
            }
            AddrMap::Large(m) => m.remove(key),
        }
    }

    /// The number of entries.
    pub(super) fn len(&self) -> usize {
        match self {
            AddrMap::Small(v) => v.len(),
            AddrMap::Large(m) => m.len(),
        }
    }

    /// Every entry, in no particular order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&String, &V)> {
        let (small, large) = match self {
            AddrMap::Small(v) => (Some(v.iter().map(|(k, v)| (k, v))), None),
            AddrMap::Large(m) => (None, Some(m.iter())),
        };
        small
            .into_iter()
            .flatten()
            .chain(large.into_iter().flatten())
    }

    /// Every value, in no particular order.
    pub(super) fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, v)| v)
    }

    /// Takes every entry out, leaving the map empty (and unallocated).
    pub(super) fn drain(&mut self) -> Vec<(String, V)> {
        match std::mem::take(self) {
            AddrMap::Small(v) => v,
            AddrMap::Large(m) => m.into_iter().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(m: &AddrMap<u32>) -> Vec<String> {
        let mut k: Vec<String> = m.iter().map(|(k, _)| k.clone()).collect();
        k.sort();
        k
    }

    #[test]
    fn one_entry_takes_one_slot() {
        let mut m = AddrMap::default();
        assert_eq!(m.insert("a".into(), 1), None);
        let AddrMap::Small(v) = &m else {
            panic!("one entry is small")
        };
        assert_eq!(v.capacity(), 1);
        assert_eq!(m.get("a"), Some(&1));
        assert_eq!(m.insert("a".into(), 2), Some(1));
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn behaves_as_a_map_across_the_switch() {
        let mut m = AddrMap::default();
        for i in 0..(3 * SMALL as u32) {
            assert_eq!(m.insert(format!("d{i}"), i), None);
            assert_eq!(m.len(), i as usize + 1);
            for j in 0..=i {
                assert_eq!(m.get(&format!("d{j}")), Some(&j));
            }
        }
        assert!(matches!(m, AddrMap::Large(_)));
        *m.get_mut("d3").expect("present") = 100;
        assert_eq!(m.remove("d3"), Some(100));
        assert_eq!(m.remove("d3"), None);
        assert_eq!(m.get("missing"), None);
        assert_eq!(m.values().count(), 3 * SMALL - 1);
        let drained = m.drain();
        assert_eq!(drained.len(), 3 * SMALL - 1);
        assert_eq!(m.len(), 0);
        assert!(keys(&m).is_empty());
    }

    #[test]
    fn small_removal_keeps_the_rest() {
        let mut m = AddrMap::default();
        for (i, k) in ["a", "b", "c"].into_iter().enumerate() {
            m.insert(k.into(), i as u32);
        }
        assert_eq!(m.remove("a"), Some(0));
        assert_eq!(keys(&m), ["b", "c"]);
        assert_eq!(m.get("c"), Some(&2));
        assert_eq!(m.drain().len(), 2);
    }
}
