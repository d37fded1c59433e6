//! The export loop: every stored document written out as one v1 update of its whole state.

use yrs::{ReadTxn, StateVector, Transact};

use super::table::Table;
use super::{Location, Outcome, PAGE, Progress, TransferError, files, load};
use crate::protocol::scan::ScanLimits;
use crate::storage::{DocumentStore, ListQuery};

/// Writes every document of `store` whose name starts with `prefix` to `target`, each as one
/// v1 update of its whole state.
pub async fn export(
    store: &dyn DocumentStore,
    target: &Location,
    prefix: &str,
    limits: &ScanLimits,
    progress: &mut Progress<'_>,
) -> Result<(), TransferError> {
    let sink = match target {
        Location::Table { url, table } => Sink::Table(Table::open(url, table, true).await?),
        Location::Dir(dir) => {
            std::fs::create_dir_all(dir).map_err(|source| TransferError::Io {
                path: dir.display().to_string(),
                source,
            })?;
            Sink::Dir(dir)
        }
    };
    let result = export_to(store, &sink, prefix, limits, progress).await;
    if let Sink::Table(table) = sink {
        table.close().await;
    }
    result
}

/// An open export target.
enum Sink<'a> {
    Table(Table),
    Dir(&'a std::path::Path),
}

async fn export_to(
    store: &dyn DocumentStore,
    sink: &Sink<'_>,
    prefix: &str,
    limits: &ScanLimits,
    progress: &mut Progress<'_>,
) -> Result<(), TransferError> {
    let mut after: Option<String> = None;
    loop {
        let query = ListQuery {
            prefix: prefix.to_owned(),
            after: after.take(),
            limit: PAGE as usize,
        };
        let page = store.list(&query).await?;
        let Some(last) = page.last() else {
            return Ok(());
        };
        after = Some(last.name.clone());
        progress.total(progress.counts().total + page.len() as u64);
        for info in page {
            let stored = store.load(&info.name).await?;
            let state = load(&stored, limits).map(|doc| {
                doc.transact()
                    .encode_state_as_update_v1(&StateVector::default())
            });
            let outcome = match (state, sink) {
                (Err(reason), _) => Outcome::Failed(reason),
                (Ok(state), Sink::Table(table)) => {
                    table.write(&info.name, &state).await?;
                    Outcome::Written
                }
                (Ok(state), Sink::Dir(dir)) => match files::write(dir, &info.name, &state) {
                    Ok(()) => Outcome::Written,
                    Err(reason) => Outcome::Failed(reason),
                },
            };
            progress.record(&info.name, &outcome);
        }
    }
}
