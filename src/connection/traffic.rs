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

/// One connection's message and byte budgets (either may be off): two token buckets whose
/// rates and sizes are read from the configuration on each message, so a socket keeps only
/// their levels and one clock.
#[derive(Debug, Clone)]
pub(crate) struct TrafficLimit {
    messages: f64,
    bytes: f64,
    last: Instant,
}

/// A bucket's refill rate a second and its size, or `None` when the budget is off.
fn message_budget(config: &Config) -> Option<(f64, f64)> {
    (config.max_messages_per_second > 0).then(|| {
        let rate = f64::from(config.max_messages_per_second);
        (rate, rate * 2.0)
    })
}

fn byte_budget(config: &Config) -> Option<(f64, f64)> {
    (config.max_bytes_per_second > 0).then(|| {
        let rate = config.max_bytes_per_second as f64;
        (rate, (rate * 2.0).max(config.max_message_bytes as f64))
    })
}

/// Refills `tokens` for `elapsed` seconds and takes `n`; false (nothing taken) when short.
fn take(tokens: &mut f64, budget: Option<(f64, f64)>, elapsed: f64, n: f64) -> bool {
    let Some((per_sec, burst)) = budget else {
        return true;
    };
    *tokens = (*tokens + elapsed * per_sec).min(burst);
    if *tokens >= n {
        *tokens -= n;
        true
    } else {
        false
    }
}

impl TrafficLimit {
    /// The budgets `config` sets, full.
    pub(crate) fn new(config: &Config, now: Instant) -> Self {
        Self {
            messages: message_budget(config).map_or(0.0, |(_, burst)| burst),
            bytes: byte_budget(config).map_or(0.0, |(_, burst)| burst),
            last: now,
        }
    }

    /// Counts one message of `len` bytes under `config`'s budgets (the same configuration
    /// as at [`new`](Self::new)); false when it is over a budget.
    pub(crate) fn allow(&mut self, config: &Config, len: usize, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        take(&mut self.messages, message_budget(config), elapsed, 1.0)
            && take(&mut self.bytes, byte_budget(config), elapsed, len as f64)
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
            assert!(l.allow(&config, 1, t0));
        }
        assert!(!l.allow(&config, 1, t0));
        // a tenth of a second gives one message back
        assert!(l.allow(&config, 1, t0 + Duration::from_millis(100)));
        // one message as large as max_message_bytes fits a full byte budget
        let mut l = TrafficLimit::new(&config, t0);
        assert!(l.allow(&config, 1500, t0));
        assert!(l.allow(&config, 500, t0));
        assert!(!l.allow(&config, 1, t0));
        // off
        let off_config = Config::for_tests();
        let mut off = TrafficLimit::new(&off_config, t0);
        assert!((0..100_000).all(|_| off.allow(&off_config, 1 << 20, t0)));
    }
}
