//! The import loop: every source document merged into Hearth's database and verified.

use std::panic::{AssertUnwindSafe, catch_unwind};

use bytes::Bytes;
use yrs::updates::decoder::Decode;
use yrs::{Doc, ReadTxn, StateVector, Transact, Update};

use super::table::Table;
use super::{Location, Outcome, PAGE, Progress, TransferError, files, load};
use crate::protocol::scan::ScanLimits;
use crate::protocol::update::{apply_guarded, decode_guarded};
use crate::storage::{Append, AppendOutcome, DocumentStore, StoredDocument};

/// How often an import appends again when another writer took the document's epoch between
/// its epoch and its append.
const FENCED_RETRIES: u32 = 3;

/// An import into Hearth's database.
pub struct Import<'s> {
    /// Hearth's storage.
    pub store: &'s dyn DocumentStore,
    /// Bounds on the structure of every update read (`max_update_depth`).
    pub limits: ScanLimits,
    /// The largest document accepted, in bytes (`max_document_bytes`).
    pub max_bytes: usize,
    /// Count what would be written, write nothing.
    pub dry_run: bool,
}

impl Import<'_> {
    /// Imports every document of `source`, reporting to `progress`. Fails only when the source
    /// or Hearth's database cannot be used at all; documents that fail are counted.
    pub async fn run(
        &self,
        source: &Location,
        progress: &mut Progress<'_>,
    ) -> Result<(), TransferError> {
        match source {
            Location::Table { url, table } => {
                let table = Table::open(url, table, false).await?;
                let result = self.rows_of(&table, progress).await;
                table.close().await;
                result
            }
            Location::Dir(dir) => {
                if !dir.is_dir() {
                    return Err(TransferError::Invalid(format!(
                        "{}: not a directory, sqlite://PATH or postgres://…",
                        dir.display()
                    )));
                }
                let paths = files::list(dir)?;
                progress.total(paths.len() as u64);
                for path in paths {
                    let name = match files::document_name(&path) {
                        Ok(name) => name,
                        Err(reason) => {
                            progress.record(&path.display().to_string(), &Outcome::Failed(reason));
                            continue;
                        }
                    };
                    let bytes = files::read(&path, self.max_bytes);
                    let outcome = self.one(&name, bytes).await?;
                    progress.record(&name, &outcome);
                }
                Ok(())
            }
        }
    }

    async fn rows_of(
        &self,
        table: &Table,
        progress: &mut Progress<'_>,
    ) -> Result<(), TransferError> {
        progress.total(table.count().await?);
        let mut after: Option<String> = None;
        loop {
            let page = table.page(after.as_deref(), PAGE).await?;
            let Some((last, _)) = page.last() else {
                return Ok(());
            };
            after = Some(last.clone());
            for (name, size) in page {
                let bytes = if usize::try_from(size).map_or(true, |s| s > self.max_bytes) {
                    Err(format!(
                        "{size} bytes, more than max_document_bytes ({})",
                        self.max_bytes
                    ))
                } else {
                    match table.read(&name).await? {
                        Some(data) => Ok(data),
                        None => Err("the row disappeared while importing".to_owned()),
                    }
                };
                let outcome = self.one(&name, bytes).await?;
                progress.record(&name, &outcome);
            }
        }
    }

    /// Imports one document from its source bytes (or the reason they could not be read).
    /// Errors only when Hearth's database fails.
    async fn one(
        &self,
        name: &str,
        bytes: Result<Vec<u8>, String>,
    ) -> Result<Outcome, TransferError> {
        let update = match bytes.and_then(|b| check_update(&b, &self.limits).map(|()| b)) {
            Ok(u) => u,
            Err(reason) => return Ok(Outcome::Failed(reason)),
        };
        if let Err(e) = crate::storage::check_name(name) {
            return Ok(Outcome::Failed(e.to_string()));
        }
        for _ in 0..=FENCED_RETRIES {
            let stored = self.store.load(name).await?;
            match self.contains(&stored, &update) {
                Ok(true) => return Ok(Outcome::Unchanged),
                Ok(false) => {}
                Err(reason) => return Ok(Outcome::Failed(reason)),
            }
            if self.dry_run {
                return Ok(Outcome::Written);
            }
            let epoch = self.store.acquire_epoch(name).await?;
            let append = Append {
                name: name.to_owned(),
                epoch,
                updates: vec![Bytes::from(update.clone())],
            };
            match self.store.append(&[append]).await?.first() {
                Some(AppendOutcome::Committed(_)) => {
                    // verification: what a node would load now contains the source
                    let stored = self.store.load(name).await?;
                    return Ok(match self.contains(&stored, &update) {
                        Ok(true) => Outcome::Written,
                        Ok(false) => Outcome::Failed(
                            "written, but the stored document does not contain it".into(),
                        ),
                        Err(reason) => Outcome::Failed(format!("written, but {reason}")),
                    });
                }
                Some(AppendOutcome::Fenced { .. }) => continue,
                None => break,
            }
        }
        Ok(Outcome::Failed(
            "another writer kept taking the document over".into(),
        ))
    }

    /// Whether `stored`, loaded as a node loads it, already contains `update`: applying the
    /// update to it changes nothing (same encoded state before and after) and leaves nothing
    /// pending.
    fn contains(&self, stored: &StoredDocument, update: &[u8]) -> Result<bool, String> {
        let doc = load(stored, &self.limits)?;
        let state = |doc: &Doc| {
            doc.transact()
                .encode_state_as_update_v1(&StateVector::default())
        };
        let before = state(&doc);
        apply_guarded(&doc, update, &self.limits)?;
        if doc.transact().has_missing_updates() {
            return Ok(false);
        }
        Ok(state(&doc) == before)
    }
}

/// Checks `bytes` as a Yjs v1 update (what `Y.encodeStateAsUpdate` writes) with the guarded
/// decoder; the import stores them as they are. A v2 update is refused with the way to convert
/// it: yrs's v2 decoder does not round-trip every state Yjs encodes, and an import must never
/// store a lossy copy.
pub fn check_update(bytes: &[u8], limits: &ScanLimits) -> Result<(), String> {
    // A v2 update starts with a zero byte (its feature flags), which a v1 decoder reads as "no
    // blocks" and may then accept as a bare delete set: a whole document's v1 state with no
    // blocks is at most the two bytes of an empty update, so anything longer that starts with
    // zero and decodes as v2 is v2.
    let v2 = bytes.len() > 2
        && bytes.first() == Some(&0)
        && catch_unwind(AssertUnwindSafe(|| Update::decode_v2(bytes).is_ok())).unwrap_or(false);
    if v2 {
        return Err("a Yjs v2 update: convert it to v1 first \
                    (Y.convertUpdateFormatV2ToV1 or Y.encodeStateAsUpdate)"
            .into());
    }
    match decode_guarded(bytes, limits) {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("not a Yjs update: {e}")),
    }
}
