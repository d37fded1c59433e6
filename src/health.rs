//! Readiness: the node's dependencies (storage; Redis in a cluster) are checked by background
//! tasks every [`CHECK_INTERVAL`], and `/readyz` answers from what they recorded, at once.
//!
//! A dependency makes the node not ready only when it has not been reached since the start, or
//! when it has been failing for longer than `readiness_outage_ms` without a break. A shorter
//! outage leaves the node in the balancer: every node shares the same database and Redis, so
//! an instant 503 would take every node out together and leave the service with no endpoints
//! for the length of a blip. Each dependency's last result is the gauge
//! `hearth_dependency_up{dependency}`.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::IntGauge;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How often each dependency is checked.
pub(crate) const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// How long one check may take before it counts as failed.
pub(crate) const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// One check of a dependency: `Err` carries the reason in one line.
pub(crate) type Probe =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// A [`Probe`] from an async closure.
pub(crate) fn probe<F, Fut>(f: F) -> Probe
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    Arc::new(move || -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> { Box::pin(f()) })
}

/// What the checks of one dependency found.
#[derive(Debug, Default)]
struct State {
    /// A check has succeeded since the start.
    reached: bool,
    /// Since when every check failed; `None` while the last one succeeded.
    down_since: Option<Instant>,
    /// The last failure's reason.
    error: Option<String>,
}

/// One dependency: its name, its gauge, and what its checks found.
#[derive(Debug)]
struct Dependency {
    name: &'static str,
    up: IntGauge,
    state: Mutex<State>,
}

impl Dependency {
    /// Records the outcome of a check started at `now`; logs when the dependency goes down or
    /// comes back.
    fn record(&self, result: Result<(), String>, now: Instant) {
        let Ok(mut s) = self.state.lock() else {
            return;
        };
        match result {
            Ok(()) => {
                if let Some(since) = s.down_since.take() {
                    info!(
                        dependency = self.name,
                        down_ms = now.duration_since(since).as_millis() as u64,
                        "dependency reachable again"
                    );
                }
                s.reached = true;
                s.error = None;
                self.up.set(1);
            }
            Err(reason) => {
                if s.down_since.is_none() {
                    warn!(dependency = self.name, %reason, "dependency check failed");
                    s.down_since = Some(now);
                }
                s.error = Some(reason);
                self.up.set(0);
            }
        }
    }

    /// `Err(reason)` when this dependency makes the node not ready.
    fn verdict(&self, outage: Duration, now: Instant) -> Result<(), String> {
        let Ok(s) = self.state.lock() else {
            return Err(format!("{}: state unavailable", self.name));
        };
        let error = s.error.as_deref().unwrap_or("not checked yet");
        if !s.reached {
            return Err(format!("{} not reached since start: {error}", self.name));
        }
        match s.down_since {
            Some(since) if now.duration_since(since) >= outage => Err(format!(
                "{} unreachable for {} ms (readiness_outage_ms {}): {error}",
                self.name,
                now.duration_since(since).as_millis(),
                outage.as_millis()
            )),
            _ => Ok(()),
        }
    }
}

/// The node's dependencies and the rule that turns their state into readiness.
#[derive(Debug)]
pub(crate) struct Readiness {
    dependencies: Vec<Arc<Dependency>>,
    outage: Duration,
    /// Stops the check tasks when this is dropped (a server bound but never run).
    _checks: tokio_util::sync::DropGuard,
}

impl Readiness {
    /// Checks each `(name, gauge, probe)` once (all together, each bounded by
    /// [`CHECK_TIMEOUT`]), then keeps checking each in a task of its own every
    /// [`CHECK_INTERVAL`] until `stop` is cancelled or this is dropped. `outage` is
    /// `readiness_outage_ms`.
    pub(crate) async fn start(
        checks: Vec<(&'static str, IntGauge, Probe)>,
        outage: Duration,
        stop: &CancellationToken,
    ) -> Self {
        let mut dependencies = Vec::new();
        let mut first = Vec::new();
        for (name, up, probe) in checks {
            up.set(0);
            let dep = Arc::new(Dependency {
                name,
                up,
                state: Mutex::default(),
            });
            first.push((dep.clone(), probe));
            dependencies.push(dep);
        }
        futures_util::future::join_all(first.iter().map(|(dep, probe)| async move {
            let started = Instant::now();
            dep.record(check(probe).await, started);
        }))
        .await;
        let stop = stop.child_token();
        for (dep, probe) in first {
            tokio::spawn(keep_checking(dep, probe, stop.clone()));
        }
        Readiness {
            dependencies,
            outage,
            _checks: stop.drop_guard(),
        }
    }

    /// `Err(reason)` when a dependency makes the node not ready (see the module docs); never
    /// waits for anything.
    pub(crate) fn verdict(&self) -> Result<(), String> {
        let now = Instant::now();
        self.dependencies
            .iter()
            .try_for_each(|d| d.verdict(self.outage, now))
    }
}

async fn check(probe: &Probe) -> Result<(), String> {
    match tokio::time::timeout(CHECK_TIMEOUT, probe()).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {} ms", CHECK_TIMEOUT.as_millis())),
    }
}

async fn keep_checking(dep: Arc<Dependency>, probe: Probe, stop: CancellationToken) {
    let mut tick = tokio::time::interval(CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate: `start` has just checked
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // an outage is dated from the start of the first check that failed, not from its
        // timeout
        let started = Instant::now();
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = check(&probe) => r,
        };
        dep.record(result, started);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn dep() -> Dependency {
        Dependency {
            name: "storage",
            up: IntGauge::new("up", "up").unwrap(),
            state: Mutex::default(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_outage_keeps_the_node_ready_and_a_long_one_does_not() {
        let d = dep();
        let outage = Duration::from_secs(30);
        let t0 = Instant::now();
        assert!(d.verdict(outage, t0).is_err(), "never reached");
        d.record(Err("refused".into()), t0);
        let e = d.verdict(outage, t0).unwrap_err();
        assert!(e.contains("not reached since start: refused"), "{e}");
        d.record(Ok(()), t0);
        assert_eq!(d.up.get(), 1);
        assert!(d.verdict(outage, t0).is_ok());

        let down = t0 + Duration::from_secs(1);
        d.record(Err("refused".into()), down);
        d.record(Err("timeout".into()), down + Duration::from_secs(20));
        assert_eq!(d.up.get(), 0);
        assert!(d.verdict(outage, down + Duration::from_secs(29)).is_ok());
        let e = d.verdict(outage, down + outage).unwrap_err();
        assert!(
            e.contains("unreachable for 30000 ms") && e.ends_with("timeout"),
            "{e}"
        );

        d.record(Ok(()), down + Duration::from_secs(31));
        assert!(d.verdict(outage, down + Duration::from_secs(31)).is_ok());
        // 0 = not ready at the first failed check
        d.record(Err("refused".into()), down + Duration::from_secs(32));
        assert!(
            d.verdict(Duration::ZERO, down + Duration::from_secs(32))
                .is_err()
        );
    }
}
