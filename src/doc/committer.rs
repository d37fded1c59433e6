//! The node-wide group committer for durable appends.
//!
//! Document tasks submit [`AppendJob`]s (at most one in flight per document, so a document's
//! log order is its apply order). The committer gathers every job that arrives within
//! `commit_interval_ms` of the first, writes them in **one** transaction
//! ([`DocumentStore::append`]) and answers each job on its document's channel. A failed
//! transaction answers every job with the error; the documents keep their updates and retry.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::warn;

use crate::metrics::Metrics;
use crate::storage::{Append, AppendOutcome, DocumentStore, Epoch, StoreError};

/// One document's share of the next group commit.
#[derive(Debug)]
pub struct AppendJob {
    /// Document name.
    pub name: String,
    /// The writer's epoch.
    pub epoch: Epoch,
    /// Updates in apply order.
    pub updates: Vec<Bytes>,
    /// The actor's sequence number of the last update in the job.
    pub lsn: u64,
    /// Where the result goes.
    pub reply: mpsc::UnboundedSender<CommitResult>,
}

/// The answer to an [`AppendJob`].
#[derive(Debug)]
pub struct CommitResult {
    /// The job's `lsn`.
    pub lsn: u64,
    /// What the database said.
    pub outcome: Result<AppendOutcome, StoreError>,
}

/// Handle for submitting jobs.
#[derive(Debug, Clone)]
pub struct Committer {
    tx: mpsc::UnboundedSender<AppendJob>,
}

impl Committer {
    /// Starts the committer task.
    pub fn spawn(store: Arc<dyn DocumentStore>, interval: Duration, metrics: Metrics) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx, store, interval, metrics));
        Self { tx }
    }

    /// Queues a job (never blocks). If the committer is gone the job is answered with an error.
    pub fn submit(&self, job: AppendJob) {
        if let Err(mpsc::error::SendError(job)) = self.tx.send(job) {
            let _ = job.reply.send(CommitResult {
                lsn: job.lsn,
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
        let window_end = Instant::now() + interval;
        while let Ok(Some(job)) = tokio::time::timeout_at(window_end, rx.recv()).await {
            jobs.push(job);
        }
        while let Ok(job) = rx.try_recv() {
            jobs.push(job);
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
                        lsn: job.lsn,
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
                        lsn: job.lsn,
                        outcome: Err(StoreError::Database(message.clone().into())),
                    });
                }
            }
        }
    }
}
