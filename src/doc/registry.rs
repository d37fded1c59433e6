//! [`Registry`]: document name → running document task.
//!
//! **Invariant:** at most one task per document name. A document loads exactly once even when
//! many clients arrive together: the first opener starts the load (in its own task, so a
//! cancelled caller cannot orphan it) and every later opener waits for the same result. An
//! unloading document blocks new opens until its final store finished, so a load never reads
//! storage behind an unload that is still writing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};
use yrs::updates::encoder::Encode;
use yrs::{Doc, ReadTxn, StateVector, Transact};

use super::actor::{Actor, Loaded};
use super::services::DocServices;
use super::{DocHandle, LoadError};
use crate::hooks::{Context, DocumentPayload, LoadPayload};
use crate::protocol::update::apply_guarded;
use crate::storage::{Epoch, StoreError, StoredDocument, UNSTORED};

type LoadResult = Option<Result<DocHandle, LoadError>>;

enum Slot {
    Loading(watch::Receiver<LoadResult>),
    Ready(DocHandle),
    Unloading(watch::Sender<()>),
}

/// The set of loaded documents.
#[derive(Default)]
pub struct Registry {
    slots: Mutex<HashMap<Arc<str>, Slot>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("documents", &self.len())
            .finish()
    }
}

enum Next {
    Ready(DocHandle),
    Wait(watch::Receiver<LoadResult>),
    WaitUnload(watch::Receiver<()>),
    Load(watch::Sender<LoadResult>, watch::Receiver<LoadResult>),
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Slot>> {
        // std Mutex: critical sections are map operations only, never an await.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of documents loaded or loading.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// The running document, if loaded (does not load).
    pub fn get(&self, name: &str) -> Option<DocHandle> {
        match self.lock().get(name) {
            Some(Slot::Ready(h)) if !h.is_closed() => Some(h.clone()),
            _ => None,
        }
    }

    /// Every loaded document.
    pub fn handles(&self) -> Vec<DocHandle> {
        self.lock()
            .values()
            .filter_map(|s| match s {
                Slot::Ready(h) => Some(h.clone()),
                _ => None,
            })
            .collect()
    }

    /// Returns the document's task, loading it first if needed (single-flight).
    pub(crate) async fn open(
        &self,
        svc: &Arc<DocServices>,
        name: &str,
        context: &Context,
    ) -> Result<DocHandle, LoadError> {
        for _ in 0..1000 {
            let next = {
                let mut slots = self.lock();
                match slots.get(name) {
                    Some(Slot::Ready(h)) if !h.is_closed() => Next::Ready(h.clone()),
                    Some(Slot::Loading(rx)) => Next::Wait(rx.clone()),
                    Some(Slot::Unloading(tx)) => Next::WaitUnload(tx.subscribe()),
                    _ if slots.len() >= svc.config.max_documents => {
                        svc.metrics.loads.with_label_values(&["capacity"]).inc();
                        warn!(
                            doc = name,
                            loaded = slots.len(),
                            "document refused: node at max_documents"
                        );
                        return Err(LoadError::Capacity);
                    }
                    _ => {
                        let (tx, rx) = watch::channel(None);
                        slots.insert(Arc::from(name), Slot::Loading(rx.clone()));
                        Next::Load(tx, rx)
                    }
                }
            };
            let mut rx = match next {
                Next::Ready(h) => return Ok(h),
                Next::WaitUnload(mut rx) => {
                    let _ = rx.changed().await;
                    continue;
                }
                Next::Wait(rx) => rx,
                Next::Load(tx, rx) => {
                    let svc = svc.clone();
                    let name: Arc<str> = Arc::from(name);
                    let context = context.clone();
                    tokio::spawn(async move {
                        let result = load(&svc, name.clone(), &context).await;
                        {
                            let mut slots = svc.registry.lock();
                            match &result {
                                Ok(h) => {
                                    slots.insert(name, Slot::Ready(h.clone()));
                                }
                                Err(_) => {
                                    slots.remove(&name);
                                }
                            }
                        }
                        let _ = tx.send(Some(result));
                    });
                    rx
                }
            };
            match rx.wait_for(Option::is_some).await {
                Ok(result) => {
                    if let Some(r) = result.clone() {
                        return r;
                    }
                }
                Err(_) => continue, // the loader vanished; try again
            }
        }
        Err(LoadError::Unavailable("kept closing while being opened"))
    }

    /// Called by a task that decided to unload: marks the slot so new opens wait. Returns false
    /// if the slot is not this task's.
    pub(crate) fn begin_unload(&self, name: &str) -> bool {
        let mut slots = self.lock();
        match slots.get(name) {
            Some(Slot::Ready(_)) => {
                let (tx, _) = watch::channel(());
                slots.insert(Arc::from(name), Slot::Unloading(tx));
                true
            }
            _ => false,
        }
    }

    /// Called by a stopping task: frees the name (waking openers waiting on an unload).
    pub(crate) fn remove(&self, name: &str) {
        let mut slots = self.lock();
        if matches!(slots.get(name), Some(Slot::Ready(h)) if h.is_closed())
            || matches!(slots.get(name), Some(Slot::Unloading(_)))
        {
            slots.remove(name);
        }
    }
}

/// Loads a document: take the ownership epoch, read storage, apply, run the load hooks, start
/// the task. Nothing is written on failure (only the epoch advances).
async fn load(
    svc: &Arc<DocServices>,
    name: Arc<str>,
    context: &Context,
) -> Result<DocHandle, LoadError> {
    let started = Instant::now();
    let m = &svc.metrics;
    let fail = |what: &'static str, e: LoadError| {
        m.loads.with_label_values(&[what]).inc();
        e
    };
    // Cluster: the ownership lock first (the claim made when the client was routed here).
    let lease = match &svc.ownership {
        None => None,
        Some(o) => match o.claim(&name).await {
            Ok(Some(g)) => Some(g),
            Ok(None) => {
                info!(doc = %name, "another node owns the document; not loading it here");
                return Err(fail("not_owner", LoadError::NotOwner));
            }
            Err(e) => {
                warn!(doc = %name, error = %e, "cannot take the ownership lock");
                return Err(fail(
                    "lock_error",
                    LoadError::Unavailable("ownership lock failed"),
                ));
            }
        },
    };
    match load_state(svc, &name, context, started).await {
        Ok(mut loaded) => {
            loaded.lease = lease;
            Ok(Actor::spawn(name, svc.clone(), loaded))
        }
        Err(e) => {
            if let Some(claim) = lease {
                tokio::spawn(claim.abandon());
            }
            Err(e)
        }
    }
}

/// Takes the document's epoch and reads it. A stored document's epoch is advanced before it
/// is read, which fences every earlier owner from that moment on. A document with no row is
/// read without writing anything: it stays out of the database until its first write creates
/// the row ([`UNSTORED`]); if another node creates it first, that write is fenced.
async fn epoch_and_state(
    svc: &DocServices,
    name: &str,
) -> Result<(Epoch, StoredDocument), StoreError> {
    if svc.store.current_epoch(name).await?.is_none() {
        let stored = svc.store.load(name).await?;
        if stored.is_empty() {
            return Ok((UNSTORED, stored));
        }
        // stored meanwhile by another node: take it over like any stored document
    }
    let epoch = svc.store.acquire_epoch(name).await?;
    Ok((epoch, svc.store.load(name).await?))
}

/// Epoch, storage, load hooks: everything of a load but the lease.
async fn load_state(
    svc: &Arc<DocServices>,
    name: &Arc<str>,
    context: &Context,
    started: Instant,
) -> Result<Loaded, LoadError> {
    let m = &svc.metrics;
    let fail = |what: &'static str, e: LoadError| {
        m.loads.with_label_values(&[what]).inc();
        e
    };
    let (epoch, stored) = match epoch_and_state(svc, name).await {
        Ok(r) => r,
        Err(e) => {
            warn!(doc = %name, error = %e, "cannot take the document's epoch or read it");
            return Err(fail(
                "store_error",
                LoadError::Unavailable("database failed"),
            ));
        }
    };
    m.store_seconds
        .with_label_values(&["load"])
        .observe(started.elapsed().as_secs_f64());
    let doc = Doc::with_client_id(u64::from(rand::random::<u32>()));
    let mut size: usize = stored.snapshot.as_ref().map_or(0, Vec::len)
        + stored.updates.iter().map(Vec::len).sum::<usize>();
    let limits = svc.config.storage_scan_limits();
    let parts = stored.snapshot.iter().chain(stored.updates.iter());
    for (i, bytes) in parts.enumerate() {
        if let Err(e) = apply_guarded(&doc, bytes, &limits) {
            warn!(doc = %name, part = i, error = %e, "stored state does not apply; refusing to serve it");
            return Err(fail(
                "corrupt",
                LoadError::Unavailable("stored state does not apply"),
            ));
        }
    }
    let mut dirty = false;
    if !svc.extensions.is_empty() {
        let state = if stored.is_empty() {
            None
        } else {
            Some(
                doc.transact()
                    .encode_state_as_update_v1(&StateVector::default()),
            )
        };
        let payload = LoadPayload {
            document_name: name,
            context,
            stored_state: state.as_deref(),
        };
        let updates = match svc.extensions.on_load_document(&payload).await {
            Ok(u) => u,
            Err(e) => {
                info!(doc = %name, reason = %e, "on_load_document rejected");
                return Err(fail("hook_rejected", LoadError::Refused(e.reason)));
            }
        };
        for update in updates {
            let before = doc.transact().state_vector().encode_v1();
            if let Err(e) = apply_guarded(&doc, &update, &limits) {
                warn!(doc = %name, error = %e, "update from on_load_document does not apply");
                return Err(fail(
                    "hook_invalid",
                    LoadError::Unavailable("an update from on_load_document does not apply"),
                ));
            }
            dirty |= doc.transact().state_vector().encode_v1() != before;
            size += update.len();
        }
        let payload = DocumentPayload {
            document_name: name,
            context: Some(context),
        };
        if let Err(e) = svc.extensions.after_load_document(&payload).await {
            return Err(fail("hook_rejected", LoadError::Refused(e.reason)));
        }
    }
    m.loads.with_label_values(&["ok"]).inc();
    m.load_seconds.observe(started.elapsed().as_secs_f64());
    debug!(doc = %name, epoch, log = stored.updates.len(), ms = started.elapsed().as_millis() as u64, "document loaded");
    Ok(Loaded {
        doc,
        epoch,
        db_seq: stored.last_seq,
        log_len: stored.updates.len(),
        dirty,
        lease: None,
        size,
    })
}
