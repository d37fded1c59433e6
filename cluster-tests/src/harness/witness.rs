//! Witnesses of an attack: an ordinary client that keeps editing and measures each edit's
//! round trip to its acknowledgement, and probes of a node process (CPU time, resident memory).

use std::time::Duration;

use tokio::time::{Instant, sleep};

use super::WAIT;
use super::client::TestClient;

/// Round trips of one witness.
#[derive(Debug, Default)]
pub struct Trips {
    /// (when the edit was made, edit → acknowledgement), in order.
    pub samples: Vec<(Instant, Duration)>,
    /// Why measuring stopped early (an edit not acknowledged within [`WAIT`], a disconnection).
    pub failure: Option<String>,
}

impl Trips {
    /// Every round trip.
    pub fn durations(&self) -> Vec<Duration> {
        self.samples.iter().map(|(_, d)| *d).collect()
    }

    /// The round trips of edits made in `[from, to)`.
    pub fn between(&self, from: Instant, to: Instant) -> Vec<Duration> {
        self.samples
            .iter()
            .filter(|(at, _)| *at >= from && *at < to)
            .map(|(_, d)| *d)
            .collect()
    }

    /// The `n` slowest round trips, as (time since `origin` of the edit, round trip).
    pub fn slowest(&self, n: usize, origin: Instant) -> Vec<(Duration, Duration)> {
        let mut v: Vec<(Duration, Duration)> = self
            .samples
            .iter()
            .map(|(at, d)| (at.saturating_duration_since(origin), *d))
            .collect();
        v.sort_by_key(|(_, d)| std::cmp::Reverse(*d));
        v.truncate(n);
        v
    }
}

/// Inserts a marker, waits for its acknowledgement and records the round trip, pausing `gap`
/// between edits, until `until` or until an edit is not acknowledged within [`WAIT`] or the
/// witness is disconnected.
pub async fn round_trips(c: &TestClient, until: Instant, gap: Duration) -> Trips {
    let mut out = Trips::default();
    while Instant::now() < until {
        let started = Instant::now();
        let marker = c.insert_next();
        let acked = c
            .wait_for(&format!("acknowledgement of {marker}"), WAIT, |s| {
                s.all_acked() || !s.connected()
            })
            .await;
        if let Err(e) = acked {
            out.failure = Some(e.to_string());
            break;
        }
        if !c.view(|s| s.all_acked()) {
            out.failure = Some(format!(
                "disconnected after {:?}: {:?}",
                started.elapsed(),
                c.view(|s| s.events().to_vec())
            ));
            break;
        }
        out.samples.push((started, started.elapsed()));
        sleep(gap).await;
    }
    out
}

/// Waits until every edit of `w` is acknowledged, then asserts that it was never disturbed:
/// still on its first connection, its document never closed, no protocol anomaly, no update
/// refused.
pub async fn assert_undisturbed(w: &TestClient, who: &str) -> anyhow::Result<()> {
    w.wait_all_acked(WAIT).await?;
    w.view(|s| {
        assert!(s.connected(), "{who} was disconnected: {:?}", s.events());
        assert_eq!(s.connects(), 1, "{who} reconnected: {:?}", s.events());
        assert!(s.doc_closed().is_none(), "{who}'s document was closed");
        assert!(s.anomalies().is_empty(), "{who}: {:?}", s.anomalies());
        assert_eq!(s.statuses().1, 0, "{who} got SyncStatus(0)");
    });
    Ok(())
}

/// The `p`th percentile (nearest rank; 100 = the maximum; zero for no samples).
pub fn percentile(samples: &[Duration], p: usize) -> Duration {
    let mut v = samples.to_vec();
    v.sort();
    if v.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p * v.len()).div_ceil(100).clamp(1, v.len());
    v[rank - 1]
}

/// User plus system CPU time of process `pid` so far (zero when it cannot be read).
pub fn cpu_time(pid: Option<u32>) -> Duration {
    let Some(stat) = pid.and_then(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
    else {
        return Duration::ZERO;
    };
    // fields after the parenthesised command name: state is field 3, utime 14, stime 15
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    // USER_HZ is 100 on Linux
    Duration::from_millis(ticks * 10)
}

/// Resident memory of process `pid` in bytes (`VmRSS`; zero when it cannot be read).
pub fn rss_bytes(pid: Option<u32>) -> u64 {
    let Some(status) = pid.and_then(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
    else {
        return 0;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Lowers the calling thread's scheduling priority (nice 10; on Linux a thread's own). An
/// attacker simulated on the test machine runs at this priority: a real one runs on its own
/// machine, and this one shares the cores with the nodes and the witnesses' measurement.
#[allow(unsafe_code)]
pub fn lower_priority() {
    // SAFETY: setpriority(2) takes plain integers and touches no memory of ours; `who` 0 is the
    // calling thread on Linux. Failing only leaves the priority as it was.
    let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
}
