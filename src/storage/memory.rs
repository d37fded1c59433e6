//! In-memory [`DocumentStore`]: for tests, benchmarks and `--database-url memory://`.
//! It keeps the same epoch and log semantics as the SQL backends.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;

use super::{
    Append, AppendOutcome, DocumentInfo, DocumentStore, Epoch, ListQuery, LogSeq, StoreError,
    StoredDocument, UNSTORED, check_name,
};

#[derive(Debug, Default)]
struct Row {
    epoch: Epoch,
    snapshot: Option<Vec<u8>>,
    log: Vec<(LogSeq, Vec<u8>)>,
    compacted_upto: LogSeq,
}

/// A process-local store. Contents vanish with the process.
#[derive(Debug, Default)]
pub struct MemoryStore {
    // std Mutex: every critical section is short and never awaits.
    inner: Mutex<(HashMap<String, Row>, LogSeq)>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, Row>, &mut LogSeq) -> T) -> T {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (rows, seq) = &mut *guard;
        f(rows, seq)
    }
}

#[async_trait]
impl DocumentStore for MemoryStore {
    async fn acquire_epoch(&self, name: &str) -> Result<Epoch, StoreError> {
        check_name(name)?;
        Ok(self.with(|rows, _| {
            let row = rows.entry(name.to_owned()).or_default();
            row.epoch += 1;
            row.epoch
        }))
    }

    async fn current_epoch(&self, name: &str) -> Result<Option<Epoch>, StoreError> {
        check_name(name)?;
        Ok(self.with(|rows, _| rows.get(name).map(|r| r.epoch)))
    }

    async fn create_epoch(&self, name: &str) -> Result<Option<Epoch>, StoreError> {
        check_name(name)?;
        Ok(self.with(|rows, _| {
            if rows.contains_key(name) {
                return None;
            }
            let row = rows.entry(name.to_owned()).or_default();
            row.epoch = 1;
            Some(row.epoch)
        }))
    }

    async fn load(&self, name: &str) -> Result<StoredDocument, StoreError> {
        check_name(name)?;
        Ok(self.with(|rows, _| match rows.get(name) {
            None => StoredDocument::default(),
            Some(row) => StoredDocument {
                snapshot: row.snapshot.clone(),
                updates: row.log.iter().map(|(_, u)| u.clone()).collect(),
                last_seq: row.log.last().map_or(row.compacted_upto, |(s, _)| *s),
            },
        }))
    }

    async fn append(&self, batch: &[Append]) -> Result<Vec<AppendOutcome>, StoreError> {
        for item in batch {
            check_name(&item.name)?;
        }
        Ok(self.with(|rows, seq| {
            batch
                .iter()
                .map(|item| {
                    // A document that was never acquired has no row and epoch 0, which is
                    // never issued: fenced, and nothing (not even the row) is created.
                    let Some(row) = rows.get_mut(&item.name) else {
                        return AppendOutcome::Fenced { current: 0 };
                    };
                    if row.epoch != item.epoch {
                        return AppendOutcome::Fenced { current: row.epoch };
                    }
                    for u in &item.updates {
                        *seq += 1;
                        row.log.push((*seq, u.to_vec()));
                    }
                    AppendOutcome::Committed(row.log.last().map_or(row.compacted_upto, |l| l.0))
                })
                .collect()
        }))
    }

    async fn compact(
        &self,
        name: &str,
        epoch: Epoch,
        state: &[u8],
        upto: LogSeq,
    ) -> Result<(), StoreError> {
        check_name(name)?;
        self.with(|rows, _| {
            let Some(row) = rows.get_mut(name) else {
                return Err(StoreError::Fenced {
                    current: 0,
                    mine: epoch,
                });
            };
            if row.epoch != epoch {
                return Err(StoreError::Fenced {
                    current: row.epoch,
                    mine: epoch,
                });
            }
            row.snapshot = Some(state.to_vec());
            row.log.retain(|(s, _)| *s > upto);
            row.compacted_upto = row.compacted_upto.max(upto);
            Ok(())
        })
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<DocumentInfo>, StoreError> {
        query.check()?;
        if query.limit == 0 {
            return Ok(Vec::new());
        }
        Ok(self.with(|rows, _| {
            let mut found: Vec<DocumentInfo> = rows
                .iter()
                .filter(|(name, row)| {
                    (row.snapshot.is_some() || !row.log.is_empty())
                        && name.starts_with(&query.prefix)
                        && query.after.as_ref().is_none_or(|after| *name > after)
                })
                .map(|(name, row)| DocumentInfo {
                    name: name.clone(),
                    epoch: row.epoch,
                })
                .collect();
            // String order is byte order
            found.sort_unstable_by(|a, b| a.name.cmp(&b.name));
            found.truncate(query.limit);
            found
        }))
    }

    async fn delete(&self, name: &str, epoch: Epoch) -> Result<bool, StoreError> {
        check_name(name)?;
        self.with(|rows, _| {
            let Some(row) = rows.get_mut(name) else {
                if epoch == UNSTORED {
                    return Ok(false);
                }
                return Err(StoreError::Fenced {
                    current: 0,
                    mine: epoch,
                });
            };
            if row.epoch != epoch {
                return Err(StoreError::Fenced {
                    current: row.epoch,
                    mine: epoch,
                });
            }
            let had_content = row.snapshot.is_some() || !row.log.is_empty();
            // Seqs stay global and increasing: whatever is appended later is above every
            // deleted entry, so the compaction point can start over like a new document's.
            row.snapshot = None;
            row.log.clear();
            row.compacted_upto = 0;
            row.epoch += 1;
            Ok(had_content)
        })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "memory"
    }
}
