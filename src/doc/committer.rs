//! The node-wide group committer for durable appends.
//!
//! Document tasks submit [`AppendJob`]s (at most one in flight per document, so a document's
//! log order is its apply order). The committer takes every job waiting when a commit is due,
//! writes them in **one** transaction ([`DocumentStore::append`]) and answers each job on its
//! document's channel. A failed transaction answers every job with the error; the documents
//! keep their updates and retry.
//!
//! `commit_interval_ms` is the least time between the starts of two commits, not a delay before
//! each: a job that finds the committer idle for that long is committed at once (an idle
//! node acknowledges in one sync), and under load the commits come every interval, each
//! carrying what arrived since the last. A job stays open while it waits ([`OpenBatch`]): the
//! document adds the updates it applies meanwhile, so they go out with the next commit instead
//! of waiting for the job's answer and then for the commit after. An update therefore waits
//! at most one interval plus one commit, and a lane commits at most once per interval however
//! many documents write.
//!
//! Two lanes, each a committer task of its own: jobs of more than [`BULK_JOB_BYTES`] go to the
//! bulk lane, all others to the fast lane. A document that receives megabytes of updates
//! therefore commits them in transactions of their own, concurrently with (and never in front
//! of) the small jobs of every other document, whose acknowledgements do not wait for them.
//! A document still has at most one job in flight, so it never has jobs in both lanes at once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::warn;

use crate::metrics::Metrics;
use crate::storage::{Append, AppendOutcome, DocumentStore, Epoch, StoreError, UNSTORED};

/// One document's share of the next group commit.
#[derive(Debug)]
pub struct AppendJob {
    /// Document name.
    pub name: String,
    /// The writer's epoch.
    pub epoch: Epoch,
    /// Updates in apply order; the document may add to them until the committer takes them.
    pub batch: Arc<OpenBatch>,
    /// Where the result goes.
    pub reply: mpsc::UnboundedSender<CommitResult>,
}

/// A job's updates, open to more until the committer seals them as it takes the job.
///
/// Invariant: an update [`OpenBatch::add`] accepted is in the commit that answers the job, and
/// one it refused is not (the mutex orders every add against the seal). A batch never grows
/// past [`BULK_JOB_BYTES`], so a job stays in the lane it was submitted to.
#[derive(Debug)]
pub struct OpenBatch(Mutex<Batch>);

#[derive(Debug)]
struct Batch {
    updates: Vec<Bytes>,
    bytes: usize,
    sealed: bool,
}

impl OpenBatch {
    /// A batch holding `updates`, open to more.
    pub fn new(updates: Vec<Bytes>) -> Arc<Self> {
        let bytes = updates.iter().map(Bytes::len).sum();
        Arc::new(Self(Mutex::new(Batch {
            updates,
            bytes,
            sealed: false,
        })))
    }

    /// Adds `update` unless the committer has taken the batch or it would pass
    /// [`BULK_JOB_BYTES`]; true when added.
    pub fn add(&self, update: &Bytes) -> bool {
        let mut batch = self.lock();
        if batch.sealed || batch.bytes + update.len() > BULK_JOB_BYTES {
            return false;
        }
        batch.bytes += update.len();
        batch.updates.push(update.clone());
        true
    }

    fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Closes the batch to additions and takes its updates.
    fn seal(&self) -> Vec<Bytes> {
        let mut batch = self.lock();
        batch.sealed = true;
        std::mem::take(&mut batch.updates)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Batch> {
        // every critical section is a few field updates: a poisoned lock holds consistent data
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The answer to an [`AppendJob`].
#[derive(Debug)]
pub struct CommitResult {
    /// The epoch the job was written under: the job's own, or, for a job of a document not
    /// stored yet ([`UNSTORED`]), the epoch its row was created with.
    pub epoch: Epoch,
    /// What the database said.
    pub outcome: Result<AppendOutcome, StoreError>,
}

/// A job carrying more update bytes than this is committed in the bulk lane.
pub const BULK_JOB_BYTES: usize = 256 << 10;

/// Handle for submitting jobs.
#[derive(Debug, Clone)]
pub struct Committer {
    tx: mpsc::UnboundedSender<AppendJob>,
    bulk: mpsc::UnboundedSender<AppendJob>,
}

impl Committer {
    /// Starts the committer tasks (the fast and the bulk lane).
    pub fn spawn(store: Arc<dyn DocumentStore>, interval: Duration, metrics: Metrics) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let (bulk, bulk_rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx, store.clone(), interval, metrics.clone()));
        tokio::spawn(run(bulk_rx, store, interval, metrics));
        Self { tx, bulk }
    }

    /// Queues a job (never blocks) in its lane. If the committer is gone the job is answered
    /// with an error.
    pub fn submit(&self, job: AppendJob) {
        let lane = if job.batch.bytes() > BULK_JOB_BYTES {
            &self.bulk
        } else {
            &self.tx
        };
        if let Err(mpsc::error::SendError(job)) = lane.send(job) {
            let _ = job.reply.send(CommitResult {
                epoch: job.epoch,
                outcome: Err(StoreError::Database("committer stopped".into())),
            });
        }
    }
}

async fn run(
    mut rx: mpsc::UnboundedReceiver<AppendJob>,
    store: Arc<dyn DocumentStore>,
    interval: Duration,
    metrics: Metrics,
) {
    let mut jobs: Vec<(AppendJob, Vec<Bytes>)> = Vec::new();
    let mut last_start: Option<Instant> = None;
    while let Some(first) = rx.recv().await {
        // Jobs that arrive before the commit is due wait in the channel and are taken together:
        // the committer wakes once per commit, not once per job.
        match last_start.map(|at| at + interval) {
            Some(due) if due > Instant::now() => tokio::time::sleep_until(due).await,
            // Due now: let the tasks woken in the same tick hand in their jobs first.
            _ => tokio::task::yield_now().await,
        }
        last_start = Some(Instant::now());
        for job in std::iter::once(first).chain(std::iter::from_fn(|| rx.try_recv().ok())) {
            let updates = job.batch.seal();
            jobs.push((job, updates));
        }
        create_rows(&*store, &mut jobs).await;
        if jobs.is_empty() {
            continue;
        }
        let batch: Vec<Append> = jobs
            .iter_mut()
            .map(|(j, updates)| Append {
                name: j.name.clone(),
                epoch: j.epoch,
                updates: std::mem::take(updates),
            })
            .collect();
        metrics.commit_batch_items.observe(batch.len() as f64);
        metrics
            .commit_batch_updates
            .observe(batch.iter().map(|a| a.updates.len()).sum::<usize>() as f64);
        let started = Instant::now();
        let result = store.append(&batch).await;
        metrics
            .store_seconds
            .with_label_values(&["append"])
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(outcomes) if outcomes.len() == jobs.len() => {
                metrics.store_ops.with_label_values(&["append", "ok"]).inc();
                metrics.storage_write_ok.set(1);
                for ((job, _), outcome) in jobs.drain(..).zip(outcomes) {
                    if matches!(outcome, AppendOutcome::Fenced { .. }) {
                        metrics.fenced_writes.inc();
                    }
                    let _ = job.reply.send(CommitResult {
                        epoch: job.epoch,
                        outcome: Ok(outcome),
                    });
                }
            }
            other => {
                metrics
                    .store_ops
                    .with_label_values(&["append", "error"])
                    .inc();
                metrics.write_outcome(false);
                let message = match other {
                    Err(e) => e.to_string(),
                    Ok(o) => format!(
                        "backend returned {} outcomes for {} items",
                        o.len(),
                        jobs.len()
                    ),
                };
                warn!(error = %message, documents = jobs.len(), "group commit failed");
                for (job, _) in jobs.drain(..) {
                    let _ = job.reply.send(CommitResult {
                        epoch: job.epoch,
                        outcome: Err(StoreError::Database(message.clone().into())),
                    });
                }
            }
        }
    }
}

/// First writes of documents that are not stored yet: create each one's row (epoch 1) before
/// the batch. A job whose row someone else created first is answered as fenced, one whose
/// creation failed with the error; both leave the batch.
async fn create_rows(store: &dyn DocumentStore, jobs: &mut Vec<(AppendJob, Vec<Bytes>)>) {
    if jobs.iter().all(|(j, _)| j.epoch != UNSTORED) {
        return;
    }
    let mut kept = Vec::with_capacity(jobs.len());
    for (mut job, updates) in jobs.drain(..) {
        if job.epoch != UNSTORED {
            kept.push((job, updates));
            continue;
        }
        let outcome = match store.create_epoch(&job.name).await {
            Ok(Some(epoch)) => {
                job.epoch = epoch;
                kept.push((job, updates));
                continue;
            }
            Ok(None) => {
                let current = store.current_epoch(&job.name).await.ok().flatten();
                Ok(AppendOutcome::Fenced {
                    current: current.unwrap_or(UNSTORED),
                })
            }
            Err(e) => Err(e),
        };
        let _ = job.reply.send(CommitResult {
            epoch: job.epoch,
            outcome,
        });
    }
    *jobs = kept;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStore;

    fn job(name: &str, reply: &mpsc::UnboundedSender<CommitResult>) -> AppendJob {
        AppendJob {
            name: name.to_owned(),
            epoch: UNSTORED,
            batch: OpenBatch::new(vec![Bytes::from_static(b"update")]),
            reply: reply.clone(),
        }
    }

    async fn committed(rx: &mut mpsc::UnboundedReceiver<CommitResult>) {
        let result = rx.recv().await.expect("the committer answers");
        assert!(
            matches!(result.outcome, Ok(AppendOutcome::Committed(_))),
            "{:?}",
            result.outcome
        );
    }

    /// The interval spaces commits; it never delays a job that finds the committer idle.
    #[tokio::test(start_paused = true)]
    async fn idle_commits_at_once_busy_commits_once_per_interval() {
        let metrics = Metrics::new().expect("metrics");
        let interval = Duration::from_millis(50);
        let committer = Committer::spawn(Arc::new(MemoryStore::new()), interval, metrics.clone());
        let (tx, mut rx) = mpsc::unbounded_channel();

        let first = Instant::now();
        committer.submit(job("a", &tx));
        committed(&mut rx).await;
        assert_eq!(
            first.elapsed(),
            Duration::ZERO,
            "an idle committer waits for nothing"
        );

        // Three documents write right after: one commit, due an interval after the first.
        for name in ["b", "c", "d"] {
            committer.submit(job(name, &tx));
        }
        for _ in 0..3 {
            committed(&mut rx).await;
            assert_eq!(first.elapsed(), interval);
        }
        let items = &metrics.commit_batch_items;
        assert_eq!(items.get_sample_count(), 2, "two commits");
        assert_eq!(items.get_sample_sum(), 4.0, "one, then three documents");

        // A write after a quiet interval is committed at once again.
        tokio::time::sleep(interval * 3).await;
        let later = Instant::now();
        committer.submit(job("e", &tx));
        committed(&mut rx).await;
        assert_eq!(later.elapsed(), Duration::ZERO);
        assert_eq!(items.get_sample_count(), 3);
    }

    /// Updates added while the job waits go out with it; once taken, the batch refuses more.
    #[tokio::test(start_paused = true)]
    async fn a_waiting_job_takes_updates_until_the_commit_takes_it() {
        let metrics = Metrics::new().expect("metrics");
        let store = Arc::new(MemoryStore::new());
        let committer = Committer::spawn(store.clone(), Duration::from_millis(50), metrics.clone());
        let (tx, mut rx) = mpsc::unbounded_channel();
        committer.submit(job("warm", &tx));
        committed(&mut rx).await;

        let waiting = job("doc", &tx);
        let batch = waiting.batch.clone();
        committer.submit(waiting);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(batch.add(&Bytes::from_static(b"second")));
        assert!(batch.add(&Bytes::from_static(b"third")));
        committed(&mut rx).await;
        assert!(!batch.add(&Bytes::from_static(b"late")), "taken: refuses");

        let updates = &metrics.commit_batch_updates;
        assert_eq!(updates.get_sample_count(), 2);
        assert_eq!(updates.get_sample_sum(), 4.0, "1 + 3 updates");
        let stored = store.load("doc").await.expect("stored");
        assert_eq!(stored.updates.len(), 3);
    }

    /// A batch never grows out of its lane.
    #[test]
    fn an_open_batch_stays_within_the_fast_lane() {
        let batch = OpenBatch::new(vec![Bytes::from(vec![0u8; BULK_JOB_BYTES - 10])]);
        assert!(batch.add(&Bytes::from(vec![0u8; 10])));
        assert!(!batch.add(&Bytes::from_static(b"x")));
        assert_eq!(batch.bytes(), BULK_JOB_BYTES);
    }
}
