//! The node-wide group committer for durable appends.
//!
//! Document tasks submit [`AppendJob`]s (at most one in flight per document, so a document's
//! log order is its apply order). The committer gathers every job that arrives within
//! `commit_interval_ms` of the first, writes them in **one** transaction
//! ([`DocumentStore::append`]) and answers each job on its document's channel. A failed
//! transaction answers every job with the error; the documents keep their updates and retry.
//!
//! Two lanes, each a committer task of its own: jobs of more than [`BULK_JOB_BYTES`] go to the
//! bulk lane, all others to the fast lane. A document that receives megabytes of updates
//! therefore commits them in transactions of their own, concurrently with (and never in front
//! of) the small jobs of every other document, whose acknowledgements do not wait for them.
//! A document still has at most one job in flight, so it never has jobs in both lanes at once.

use std::sync::Arc;
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
    /// Updates in apply order.
    pub updates: Vec<Bytes>,
    /// Where the result goes.
    pub reply: mpsc::UnboundedSender<CommitResult>,
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
        let bytes: usize = job.updates.iter().map(Bytes::len).sum();
        let lane = if bytes > BULK_JOB_BYTES {
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
    let mut jobs: Vec<AppendJob> = Vec::new();
    while let Some(first) = rx.recv().await {
        jobs.push(first);
        // Jobs that arrive during the window wait in the channel and are taken together at its
        // end: the committer wakes once per commit, not once per job.
        if !interval.is_zero() {
            tokio::time::sleep(interval).await;
        }
        while let Ok(job) = rx.try_recv() {
            jobs.push(job);
        }
        create_rows(&*store, &mut jobs).await;
        if jobs.is_empty() {
            continue;
        }
        let batch: Vec<Append> = jobs
            .iter()
            .map(|j| Append {
                name: j.name.clone(),
                epoch: j.epoch,
                updates: j.updates.clone(),
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
                for (job, outcome) in jobs.drain(..).zip(outcomes) {
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
                for job in jobs.drain(..) {
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
async fn create_rows(store: &dyn DocumentStore, jobs: &mut Vec<AppendJob>) {
    if jobs.iter().all(|j| j.epoch != UNSTORED) {
        return;
    }
    let mut kept = Vec::with_capacity(jobs.len());
    for mut job in jobs.drain(..) {
        if job.epoch != UNSTORED {
            kept.push(job);
            continue;
        }
        let outcome = match store.create_epoch(&job.name).await {
            Ok(Some(epoch)) => {
                job.epoch = epoch;
                kept.push(job);
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
