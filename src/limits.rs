//! Connection caps of the client port: at most `max_connections` TCP connections per node and
//! `max_connections_per_ip` per client address (see [`crate::client_ip`]), each counted from
//! accept until the TCP connection closes — an upgraded WebSocket keeps its connection's
//! [`ConnectionSlot`].
//!
//! Over the node cap a connection is closed as soon as it is accepted. Over the per-address cap
//! it is answered 429 (before any upgrade); up to [`REFUSAL_ALLOWANCE`] such connections of one
//! address are held for that answer (each at most `http_header_timeout_ms`), any beyond are
//! closed at once, so one address can never hold more than the cap plus the allowance.
//!
//! **Bookkeeping:** O(1) per connection (an atomic for the node, one hash-map entry per address
//! under a short lock). Every count is undone by dropping the slot, and an address's entry is
//! removed when its count reaches zero, so the map holds only addresses with open connections.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use prometheus::{IntCounter, IntGauge};

use crate::metrics::Metrics;

/// Connections of one address beyond its cap that are still held to be answered 429.
pub(crate) const REFUSAL_ALLOWANCE: usize = 32;

/// Node-wide connection counts and caps.
#[derive(Debug)]
pub(crate) struct ConnectionLimits {
    max_total: usize,
    max_per_ip: usize,
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    open: IntGauge,
    refused_node: IntCounter,
    refused_ip: IntCounter,
}

/// Where a connection stands against its address's cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IpAdmission {
    /// Within the cap: serve it.
    Within,
    /// Over the cap but within the allowance: answer 429 and close.
    Over,
    /// Over the cap and the allowance: not counted; close without an answer (or 429 if a
    /// request is already being answered).
    Refused,
}

/// The counted life of one accepted connection; dropping it gives the counts back.
#[derive(Debug)]
pub(crate) struct ConnectionSlot {
    limits: Arc<ConnectionLimits>,
    /// The TCP peer.
    pub peer: SocketAddr,
    /// The client address this connection is counted for, and whether it is within the cap.
    client: Mutex<Option<(IpAddr, bool)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // nothing panics while holding these locks; a poisoned one still holds consistent counts
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ConnectionLimits {
    /// Caps of `max_total` connections per node and `max_per_ip` per address, reported in
    /// `metrics` (`hearth_connections_open`, `hearth_connections_refused_total`).
    pub(crate) fn new(max_total: usize, max_per_ip: usize, metrics: &Metrics) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_ip,
            total: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            open: metrics.connections_open.clone(),
            refused_node: metrics
                .connections_refused
                .with_label_values(&["node_limit"]),
            refused_ip: metrics.connections_refused.with_label_values(&["ip_limit"]),
        })
    }

    /// The node cap in force.
    pub(crate) fn max_total(&self) -> usize {
        self.max_total
    }

    /// Counts a connection just accepted from `peer`; `None` (counted as refused) when the node
    /// is at its cap. Its client address is assigned separately ([`ConnectionSlot::assign`]).
    pub(crate) fn admit(self: &Arc<Self>, peer: SocketAddr) -> Option<ConnectionSlot> {
        let admitted = self
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_total).then_some(n + 1)
            })
            .is_ok();
        if !admitted {
            self.refused_node.inc();
            return None;
        }
        self.open.inc();
        Some(ConnectionSlot {
            limits: self.clone(),
            peer,
            client: Mutex::new(None),
        })
    }

    fn acquire_ip(&self, ip: IpAddr) -> IpAdmission {
        let mut map = lock(&self.per_ip);
        let n = map.entry(ip).or_insert(0);
        if *n >= self.max_per_ip.saturating_add(REFUSAL_ALLOWANCE) {
            return IpAdmission::Refused; // n > 0 here: the entry is not left at zero
        }
        *n += 1;
        if *n <= self.max_per_ip {
            IpAdmission::Within
        } else {
            IpAdmission::Over
        }
    }

    fn release_ip(&self, ip: IpAddr) {
        if let Entry::Occupied(mut e) = lock(&self.per_ip).entry(ip) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }

    /// Open connections counted for `ip`.
    #[cfg(test)]
    fn count(&self, ip: IpAddr) -> usize {
        lock(&self.per_ip).get(&ip).copied().unwrap_or(0)
    }

    /// Addresses with open connections.
    #[cfg(test)]
    fn addresses(&self) -> usize {
        lock(&self.per_ip).len()
    }
}

impl ConnectionSlot {
    /// Counts this connection for client address `ip` (moving it off the address it was counted
    /// for, if another: a proxy's keep-alive connection may carry several clients in turn).
    pub(crate) fn assign(&self, ip: IpAddr) -> IpAdmission {
        let mut client = lock(&self.client);
        match *client {
            Some((current, within)) if current == ip => {
                if within {
                    IpAdmission::Within
                } else {
                    IpAdmission::Over
                }
            }
            previous => {
                if let Some((old, _)) = previous {
                    self.limits.release_ip(old);
                }
                let admission = self.limits.acquire_ip(ip);
                *client = match admission {
                    IpAdmission::Within => Some((ip, true)),
                    IpAdmission::Over => Some((ip, false)),
                    IpAdmission::Refused => None,
                };
                admission
            }
        }
    }

    /// Counts one `ip_limit` refusal (a 429 answered, or a connection closed over the
    /// allowance).
    pub(crate) fn count_ip_refusal(&self) {
        self.limits.refused_ip.inc();
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let client = self
            .client
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some((ip, _)) = client {
            self.limits.release_ip(ip);
        }
        self.limits.total.fetch_sub(1, Ordering::AcqRel);
        self.limits.open.dec();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn peer(last: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, last], 4000))
    }

    #[test]
    fn node_cap_admits_up_to_the_cap_and_frees_on_drop() {
        let m = Metrics::new().unwrap();
        let l = ConnectionLimits::new(2, 10, &m);
        let a = l.admit(peer(1)).unwrap();
        let b = l.admit(peer(2)).unwrap();
        assert!(l.admit(peer(3)).is_none());
        assert_eq!(m.connections_open.get(), 2);
        drop(a);
        let c = l.admit(peer(3)).unwrap();
        drop((b, c));
        assert_eq!(m.connections_open.get(), 0);
        assert_eq!(l.total.load(Ordering::Acquire), 0);
        assert_eq!(
            m.connections_refused
                .with_label_values(&["node_limit"])
                .get(),
            1
        );
    }

    #[test]
    fn per_address_cap_allowance_and_cleanup() {
        let m = Metrics::new().unwrap();
        let l = ConnectionLimits::new(1000, 2, &m);
        let ip = peer(1).ip();
        let slots: Vec<_> = (0..2 + REFUSAL_ALLOWANCE + 3)
            .map(|_| {
                let s = l.admit(peer(1)).unwrap();
                let a = s.assign(ip);
                (s, a)
            })
            .collect();
        let count = |want: IpAdmission| slots.iter().filter(|(_, a)| *a == want).count();
        assert_eq!(count(IpAdmission::Within), 2);
        assert_eq!(count(IpAdmission::Over), REFUSAL_ALLOWANCE);
        assert_eq!(count(IpAdmission::Refused), 3);
        assert_eq!(l.count(ip), 2 + REFUSAL_ALLOWANCE);
        // asking again does not count twice
        assert_eq!(slots[0].0.assign(ip), IpAdmission::Within);
        assert_eq!(l.count(ip), 2 + REFUSAL_ALLOWANCE);
        drop(slots);
        assert_eq!(l.addresses(), 0, "entries are removed at zero");
        assert_eq!(m.connections_open.get(), 0);
    }

    #[test]
    fn reassigning_moves_the_count() {
        let m = Metrics::new().unwrap();
        let l = ConnectionLimits::new(10, 1, &m);
        let (x, y) = (peer(1).ip(), peer(2).ip());
        let s = l.admit(peer(9)).unwrap();
        assert_eq!(s.assign(x), IpAdmission::Within);
        let t = l.admit(peer(9)).unwrap();
        assert_eq!(t.assign(x), IpAdmission::Over);
        assert_eq!(s.assign(y), IpAdmission::Within, "s moves from x to y");
        assert_eq!((l.count(x), l.count(y)), (1, 1));
        drop(t);
        assert_eq!(l.count(x), 0);
        let u = l.admit(peer(9)).unwrap();
        assert_eq!(u.assign(x), IpAdmission::Within);
        drop((s, u));
        assert_eq!(l.addresses(), 0);
    }
}
