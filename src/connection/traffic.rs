//! Per-connection traffic limits: messages and bytes a second a client may send
//! (`max_messages_per_second`, `max_bytes_per_second`), each a token bucket holding two seconds'
//! worth (the byte bucket at least one message of `max_message_bytes`, so a large paste always
//! fits). A connection over either is closed with 1008 "Rate Limit Exceeded", and the close
//! counts as a failure of its client address towards `auth_failures_before_ban`, so an address
//! that keeps doing it is banned like one that keeps sending bad tokens.

use tokio::time::Instant;
use tracing::info;

use super::shared::Shared;
use crate::config::Config;
use crate::request::RequestInfo;

/// Records that a connection of `request` went over its limits and is being closed: the metric,
/// a log line, and one failure of its client address towards a ban.
pub(crate) async fn charge(shared: &Shared, request: &RequestInfo) {
    info!("traffic limit exceeded: closing");
    shared
        .metrics
        .connections_refused
        .with_label_values(&["rate_limit"])
        .inc();
    if let Some(ip) = shared.throttle.client_of(request) {
        shared.throttle.record_failure(ip).await;
    }
}

/// A token bucket.
#[derive(Debug, Clone)]
struct Bucket {
    tokens: f64,
    per_sec: f64,
    burst: f64,
    last: Instant,
}

impl Bucket {
    fn new(per_sec: f64, burst: f64, now: Instant) -> Self {
        Self {
            tokens: burst,
            per_sec,
            burst,
            last: now,
        }
    }

    fn take(&mut self, n: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// One connection's message and byte budgets (either may be off).
#[derive(Debug, Clone)]
pub(crate) struct TrafficLimit {
    messages: Option<Bucket>,
    bytes: Option<Bucket>,
}

impl TrafficLimit {
    /// The budgets `config` sets, full.
    pub(crate) fn new(config: &Config, now: Instant) -> Self {
        let messages = (config.max_messages_per_second > 0).then(|| {
            let rate = f64::from(config.max_messages_per_second);
            Bucket::new(rate, rate * 2.0, now)
        });
        let bytes = (config.max_bytes_per_second > 0).then(|| {
            let rate = config.max_bytes_per_second as f64;
            Bucket::new(rate, (rate * 2.0).max(config.max_message_bytes as f64), now)
        });
        Self { messages, bytes }
    }

    /// Counts one message of `len` bytes; false when it is over a budget.
    pub(crate) fn allow(&mut self, len: usize, now: Instant) -> bool {
        self.messages.as_mut().is_none_or(|b| b.take(1.0, now))
            && self.bytes.as_mut().is_none_or(|b| b.take(len as f64, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn budgets_refill_and_run_out() {
        let config = Config {
            max_messages_per_second: 10,
            max_bytes_per_second: 1000,
            max_message_bytes: 1500,
            ..Config::for_tests()
        };
        let t0 = Instant::now();
        let mut l = TrafficLimit::new(&config, t0);
        // two seconds' worth of messages at once
        for _ in 0..20 {
            assert!(l.allow(1, t0));
        }
        assert!(!l.allow(1, t0));
        // a tenth of a second gives one message back
        assert!(l.allow(1, t0 + Duration::from_millis(100)));
        // one message as large as max_message_bytes fits a full byte budget
        let mut l = TrafficLimit::new(&config, t0);
        assert!(l.allow(1500, t0));
        assert!(l.allow(500, t0));
        assert!(!l.allow(1, t0));
        // off
        let mut off = TrafficLimit::new(&Config::for_tests(), t0);
        assert!((0..100_000).all(|_| off.allow(1 << 20, t0)));
    }
}
