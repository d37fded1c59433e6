//! Workload and checker for set-style tests (Jepsen's set workload):
//! clients insert unique markers; afterwards the final contents are compared with what was sent
//! and what was acknowledged.
//!
//! * **lost** = acknowledged but absent — must be empty under durable acks;
//! * **phantom** = present but never sent by anyone — must always be empty;
//! * **duplicates** = a marker present more than once — must always be empty (every marker is
//!   inserted exactly once; re-delivery is idempotent).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::task::JoinHandle;

use super::client::TestClient;

/// Tasks inserting markers at a jittered rate until stopped.
#[derive(Debug)]
pub struct Writers {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Writers {
    /// One task per client: insert the next marker, sleep a uniformly random time in
    /// `[min, max]`, repeat. The jitter is seeded (`seed` + the client's position).
    pub fn start(clients: &[Arc<TestClient>], min: Duration, max: Duration, seed: u64) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = clients
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let c = c.clone();
                let stop = stop.clone();
                let mut rng = StdRng::seed_from_u64(seed.wrapping_add(i as u64 * 7919));
                tokio::spawn(async move {
                    // bounded: at most one insert per millisecond for at most 10 minutes
                    for _ in 0..600_000u32 {
                        if stop.load(Ordering::Acquire) {
                            break;
                        }
                        c.insert_next();
                        let pause = rng.random_range(min..=max).max(Duration::from_millis(1));
                        tokio::time::sleep(pause).await;
                    }
                })
            })
            .collect();
        Writers { stop, tasks }
    }

    /// Stops every writer and waits for them (bounded).
    pub async fn stop(self) {
        self.stop.store(true, Ordering::Release);
        for t in self.tasks {
            let abort = t.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

/// What a set check found for one document.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Acknowledged but missing.
    pub lost: Vec<String>,
    /// Present but never sent.
    pub phantom: Vec<String>,
    /// Present more than once.
    pub duplicates: Vec<String>,
    /// Sent but neither acknowledged nor present (allowed: unacknowledged edits may be lost).
    pub unacked_missing: usize,
    /// How many markers were acknowledged / sent / present.
    pub counts: (usize, usize, usize),
}

impl Verdict {
    /// No loss, no phantom, no duplicate.
    pub fn ok(&self) -> bool {
        self.lost.is_empty() && self.phantom.is_empty() && self.duplicates.is_empty()
    }
}

/// Sent and acknowledged markers per document, accumulated over clients (and rounds).
#[derive(Debug, Default, Clone)]
pub struct History {
    sent: BTreeMap<String, BTreeSet<String>>,
    acked: BTreeMap<String, BTreeSet<String>>,
}

impl History {
    /// Adds everything `client` sent and got acknowledged (on every connection so far).
    pub fn record(&mut self, client: &TestClient) {
        let doc = client.doc_name();
        let (sent, acked) = client.view(|s| (s.sent().to_vec(), s.acked()));
        self.sent.entry(doc.clone()).or_default().extend(sent);
        self.acked.entry(doc).or_default().extend(acked);
    }

    /// Markers sent to `doc`.
    pub fn sent(&self, doc: &str) -> usize {
        self.sent.get(doc).map_or(0, BTreeSet::len)
    }

    /// The markers sent to `doc`, sorted.
    pub fn sent_markers<'a>(&'a self, doc: &str) -> impl Iterator<Item = &'a String> + 'a {
        self.sent.get(doc).into_iter().flatten()
    }

    /// The markers acknowledged on `doc`, sorted.
    pub fn acked_markers<'a>(&'a self, doc: &str) -> impl Iterator<Item = &'a String> + 'a {
        self.acked.get(doc).into_iter().flatten()
    }

    /// Markers acknowledged on `doc`.
    pub fn acked(&self, doc: &str) -> usize {
        self.acked.get(doc).map_or(0, BTreeSet::len)
    }

    /// Total acknowledged markers over all documents.
    pub fn total_acked(&self) -> usize {
        self.acked.values().map(BTreeSet::len).sum()
    }

    /// Total sent markers over all documents.
    pub fn total_sent(&self) -> usize {
        self.sent.values().map(BTreeSet::len).sum()
    }

    /// Compares the final `contents` of `doc` with the history.
    pub fn check(&self, doc: &str, contents: &[String]) -> Verdict {
        let empty = BTreeSet::new();
        let sent = self.sent.get(doc).unwrap_or(&empty);
        let acked = self.acked.get(doc).unwrap_or(&empty);
        let mut present = BTreeSet::new();
        let mut duplicates = Vec::new();
        for m in contents {
            if !present.insert(m.clone()) {
                duplicates.push(m.clone());
            }
        }
        Verdict {
            lost: acked.difference(&present).cloned().collect(),
            phantom: present.difference(sent).cloned().collect(),
            duplicates,
            unacked_missing: sent
                .iter()
                .filter(|m| !acked.contains(*m) && !present.contains(*m))
                .count(),
            counts: (acked.len(), sent.len(), present.len()),
        }
    }
}
