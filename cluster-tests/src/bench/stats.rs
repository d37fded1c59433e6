//! Latency and delivery bookkeeping.
//!
//! Every insert a bench client makes is one Yjs item of exactly [`ITEM_LEN`] clock units, so a
//! receiver learns how many of a sender's inserts it has integrated from the sender's clock in
//! its own state vector: `seq = clock / ITEM_LEN`. Yjs integrates a client's items strictly in
//! clock order, so this also holds when the server merges several updates into one broadcast
//! (Hocuspocus ≥ 4.5 does): every seq below the new clock was delivered at that moment. The send
//! time of each seq lives in the sender's [`SendLog`], shared in-process (all clients run in one
//! process, so one monotonic clock serves all of them). A seq that never shows up in a
//! receiver's state vector is a missing delivery.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Instant;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Clock units (UTF-16 code units of ASCII text) of one bench insert.
pub const ITEM_LEN: u32 = 16;

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since the process-wide bench epoch (monotonic).
pub fn now_ns() -> u64 {
    let e = *EPOCH.get_or_init(Instant::now);
    u64::try_from(e.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// How a delivery travelled in a cluster: was the sender / receiver on the document's owner?
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Path {
    /// Single node, or sender and receiver both on the owner.
    Local = 0,
    /// Sender on the owner, receiver on another node.
    ToProxied = 1,
    /// Sender on another node, receiver on the owner.
    FromProxied = 2,
    /// Both on non-owner nodes (two proxy hops).
    ProxiedBoth = 3,
}

impl Path {
    /// All paths, index order.
    pub const ALL: [Path; 4] = [
        Path::Local,
        Path::ToProxied,
        Path::FromProxied,
        Path::ProxiedBoth,
    ];

    /// The path between a sender and a receiver.
    pub fn between(sender_local: bool, receiver_local: bool) -> Path {
        match (sender_local, receiver_local) {
            (true, true) => Path::Local,
            (true, false) => Path::ToProxied,
            (false, true) => Path::FromProxied,
            (false, false) => Path::ProxiedBoth,
        }
    }

    /// Name in the JSON output.
    pub fn name(self) -> &'static str {
        match self {
            Path::Local => "local",
            Path::ToProxied => "owner_to_proxied",
            Path::FromProxied => "proxied_to_owner",
            Path::ProxiedBoth => "proxied_to_proxied",
        }
    }
}

/// Send times of one client's inserts, by seq. Written by the sender, read by every receiver.
#[derive(Debug)]
pub struct SendLog {
    /// The sender's Yjs client id.
    pub client_id: u64,
    /// Whether the sender is connected to the document's owner node.
    pub local: bool,
    /// The sender's clock before its first insert.
    pub base_clock: AtomicU64,
    times: Mutex<Vec<u64>>,
}

impl SendLog {
    /// An empty log.
    pub fn new(client_id: u64, local: bool) -> Self {
        Self {
            client_id,
            local,
            base_clock: AtomicU64::new(0),
            times: Mutex::new(Vec::new()),
        }
    }

    /// Records a send at `t` (ns); returns its seq.
    pub fn push(&self, t: u64) -> u64 {
        let mut v = self.times.lock().unwrap_or_else(PoisonError::into_inner);
        v.push(t);
        v.len() as u64 - 1
    }

    /// Inserts sent so far.
    pub fn sent(&self) -> u64 {
        self.times
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len() as u64
    }

    /// Calls `f(seq, sent_at)` for every seq in `from..to` that was sent.
    pub fn each(&self, from: u64, to: u64, mut f: impl FnMut(u64, u64)) {
        let v = self.times.lock().unwrap_or_else(PoisonError::into_inner);
        let to = to.min(v.len() as u64);
        for seq in from..to {
            f(seq, v[seq as usize]);
        }
    }
}

/// A receiver's progress through one sender's inserts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerCursor {
    /// Inserts of this sender the receiver has integrated.
    pub seen: u64,
}

impl PeerCursor {
    /// The sender's clock in the receiver's document is now `clock` (its first insert started
    /// at `base`); returns the range of seqs newly delivered.
    pub fn advance(&mut self, base: u64, clock: u64) -> std::ops::Range<u64> {
        let seen_now = clock.saturating_sub(base) / u64::from(ITEM_LEN);
        let from = self.seen;
        if seen_now > from {
            self.seen = seen_now;
            from..seen_now
        } else {
            from..from
        }
    }

    /// Deliveries still missing when the sender has sent `sent` inserts.
    pub fn missing(&self, sent: u64) -> u64 {
        sent.saturating_sub(self.seen)
    }
}

/// A latency histogram in microseconds (1 µs … 10 min, 3 significant digits).
#[derive(Debug, Clone)]
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    /// An empty histogram.
    pub fn new() -> Self {
        let h = Histogram::new_with_bounds(1, 600_000_000, 3).expect("static histogram bounds");
        Self(h)
    }

    /// Records a latency in nanoseconds (clamped to the histogram's range).
    pub fn record_ns(&mut self, ns: u64) {
        self.0.saturating_record((ns / 1000).max(1));
    }

    /// Adds another histogram's samples.
    pub fn add(&mut self, other: &Latency) {
        // same bounds: cannot fail
        let _ = self.0.add(&other.0);
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// Forgets every sample.
    pub fn clear(&mut self) {
        self.0.reset();
    }

    /// Percentiles in milliseconds.
    pub fn summary(&self) -> LatencySummary {
        let ms = |us: u64| us as f64 / 1000.0;
        if self.0.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: self.0.len(),
            mean_ms: self.0.mean().round() / 1000.0,
            p50_ms: ms(self.0.value_at_quantile(0.50)),
            p95_ms: ms(self.0.value_at_quantile(0.95)),
            p99_ms: ms(self.0.value_at_quantile(0.99)),
            p999_ms: ms(self.0.value_at_quantile(0.999)),
            max_ms: ms(self.0.max()),
        }
    }
}

/// Latency percentiles, as printed.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest sample.
    pub max_ms: f64,
}

/// Everything the clients record, shared by all of them (one lock per received frame).
#[derive(Debug, Default)]
pub struct Recorded {
    /// Insert → observation on another client, by [`Path`].
    pub delivery: [Latency; 4],
    /// Insert → `SyncStatus(1)` on the sender, by whether the sender is on the owner.
    pub ack: [Latency; 2],
}

/// Process-wide counters and histograms for one run.
#[derive(Debug, Default)]
pub struct Recorder {
    /// Histograms of the current window.
    pub hist: Mutex<Recorded>,
    /// Inserts sent (cumulative).
    pub sent: AtomicU64,
    /// Deliveries expected (one per sent insert per other client of its document), by path.
    pub expected: [AtomicU64; 4],
    /// Deliveries observed, by path (cumulative).
    pub delivered: [AtomicU64; 4],
    /// Deliveries of inserts sent before the current window (not in the histograms).
    pub late: AtomicU64,
    /// `SyncStatus(1)` for inserts (cumulative).
    pub acked: AtomicU64,
    /// `SyncStatus(0)` received.
    pub rejected: AtomicU64,
    /// Frames received.
    pub frames_in: AtomicU64,
    /// Protocol anomalies (unexpected close, permission denied, decode or apply errors).
    pub errors: AtomicU64,
    /// Start of the current measurement window (ns): earlier sends are `late`.
    pub window_start: AtomicU64,
    /// Longest delay between an insert's schedule and its send (generator lag), ns.
    pub lag_max_ns: AtomicU64,
    /// Inserts sent more than 5 ms after their schedule.
    pub lagged: AtomicU64,
}

impl Recorder {
    /// Sum of a per-path counter.
    pub fn total(c: &[AtomicU64; 4]) -> u64 {
        c.iter().map(|a| a.load(Ordering::Relaxed)).sum()
    }

    /// Deliveries still missing, cumulative over the run.
    pub fn missing(&self) -> u64 {
        Self::total(&self.expected).saturating_sub(Self::total(&self.delivered))
    }

    /// Notes how late an insert was sent relative to its schedule.
    pub fn note_lag(&self, lag: std::time::Duration) {
        let ns = u64::try_from(lag.as_nanos()).unwrap_or(u64::MAX);
        self.lag_max_ns.fetch_max(ns, Ordering::Relaxed);
        if ns > 5_000_000 {
            self.lagged.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Takes the current window's histograms and starts a new window at `now`.
    pub fn take_window(&self, now: u64) -> Recorded {
        self.window_start.store(now, Ordering::Relaxed);
        std::mem::take(&mut *self.hist.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn cursor_turns_clocks_into_seqs() {
        let mut c = PeerCursor::default();
        assert_eq!(c.advance(0, 0), 0..0);
        assert_eq!(c.advance(0, u64::from(ITEM_LEN)), 0..1);
        // two inserts merged into one broadcast: both delivered now
        assert_eq!(c.advance(0, 3 * u64::from(ITEM_LEN)), 1..3);
        // a stale or repeated clock (echo, step2 replay) delivers nothing
        assert_eq!(c.advance(0, 2 * u64::from(ITEM_LEN)), 3..3);
        assert_eq!(c.advance(0, 3 * u64::from(ITEM_LEN)), 3..3);
        assert_eq!(c.seen, 3);
    }

    #[test]
    fn cursor_respects_base_clock() {
        let mut c = PeerCursor::default();
        let base = 5 * u64::from(ITEM_LEN) + 3;
        assert_eq!(c.advance(base, base), 0..0);
        assert_eq!(c.advance(base, base + u64::from(ITEM_LEN)), 0..1);
    }

    #[test]
    fn missing_deliveries_are_sent_minus_seen() {
        let log = SendLog::new(7, true);
        for t in [100, 200, 300, 400] {
            log.push(t);
        }
        let mut c = PeerCursor::default();
        c.advance(0, 2 * u64::from(ITEM_LEN));
        assert_eq!(c.missing(log.sent()), 2);
        c.advance(0, 4 * u64::from(ITEM_LEN));
        assert_eq!(c.missing(log.sent()), 0);
    }

    #[test]
    fn latency_uses_each_seqs_own_send_time() {
        let log = SendLog::new(1, true);
        log.push(1_000_000); // seq 0 at 1 ms
        log.push(3_000_000); // seq 1 at 3 ms
        let mut c = PeerCursor::default();
        let mut h = Latency::new();
        let seqs = c.advance(0, 2 * u64::from(ITEM_LEN));
        let observed_at = 5_000_000; // 5 ms
        log.each(seqs.start, seqs.end, |_, sent| {
            h.record_ns(observed_at - sent)
        });
        let s = h.summary();
        assert_eq!(s.count, 2);
        assert!((s.max_ms - 4.0).abs() < 0.01, "{s:?}");
        assert!((s.p50_ms - 2.0).abs() < 0.01, "{s:?}");
    }

    #[test]
    fn each_ignores_unsent_seqs() {
        let log = SendLog::new(1, true);
        log.push(10);
        let mut n = 0;
        log.each(0, 5, |_, _| n += 1);
        assert_eq!(n, 1);
    }

    #[test]
    fn recorder_counts_missing_and_windows() {
        let r = Recorder::default();
        r.expected[0].fetch_add(6, Ordering::Relaxed);
        r.expected[1].fetch_add(3, Ordering::Relaxed);
        r.delivered[0].fetch_add(6, Ordering::Relaxed);
        r.delivered[1].fetch_add(1, Ordering::Relaxed);
        assert_eq!(r.missing(), 2);
        r.hist.lock().unwrap().delivery[0].record_ns(2_000_000);
        let w = r.take_window(42);
        assert_eq!(w.delivery[0].count(), 1);
        assert_eq!(r.hist.lock().unwrap().delivery[0].count(), 0);
        assert_eq!(r.window_start.load(Ordering::Relaxed), 42);
    }

    #[test]
    fn summary_of_empty_histogram_is_zero() {
        assert_eq!(Latency::new().summary(), LatencySummary::default());
        assert_eq!(Path::between(false, true), Path::FromProxied);
    }
}
