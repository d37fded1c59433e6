//! The document task: the only code that touches a document's `yrs::Doc` and awareness.
//!
//! Data path of one client update: the socket task sends [`DocCommand::Sync`] → the actor
//! decodes it with the round-trip guard, applies it inside `catch_unwind`, collects the update
//! the transaction produced (update observer), broadcasts it to every connection (sender
//! included), queues the sender's `SyncStatus(1)` tagged with the update's log sequence number,
//! and hands the update to the node's group committer (durable mode). When the commit lands,
//! every acknowledgement whose sequence number is committed is released, in order per
//! connection. In memory mode the acknowledgement is released at once and the document is
//! stored by debounced compaction only.

use std::collections::{HashMap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until};
use tracing::{debug, error, info, warn};
use yrs::updates::encoder::Encode;
use yrs::{Doc, ReadTxn, Transact};

use super::committer::{AppendJob, CommitResult, OpenBatch};
use super::offload;
use super::ownership::Claim;
use super::services::DocServices;
use super::{
    Attach, ConnId, DocCommand, DocHandle, DocInfo, Framing, TransactError, Unloading,
    WeakDocHandle,
};
use crate::config::Durability;
use crate::hooks::{
    AwarenessPayload, ChangePayload, ConnectionRef, Context, DisconnectPayload, DocumentPayload,
    StatelessPayload, StorePayload,
};
use crate::outbox::{Outbox, Outgoing};
use crate::protocol::Close;
use crate::protocol::awareness::{self, Awareness, Change, RateLimit, Violation};
use crate::protocol::message::{ServerMessage, SyncMessage, frame};
use crate::protocol::scan::scan_update;
use crate::protocol::update::{
    UpdateError, contains_scanned, decode_scanned, decode_state_vector, known_clocks,
};
use crate::storage::{AppendOutcome, Epoch, LogSeq, StoreError, UNSTORED};

const AWARENESS_TICK: Duration = Duration::from_secs(3);
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// A freshly loaded document waits this long for its first connection before it may unload
/// (the opener's `Attach` is on its way; unloading first would make it load again).
const LOAD_GRACE: Duration = Duration::from_secs(2);

struct Conn {
    outbox: Outbox,
    framing: Framing,
    read_only: bool,
    context: Arc<Context>,
    socket_id: Arc<str>,
    conn_ref: Option<ConnectionRef>,
    /// Token bucket for this connection's awareness messages.
    awareness_rate: RateLimit,
    /// Acknowledgements waiting for their update's commit: (required lsn, frame, applied at).
    acks: VecDeque<(u64, Bytes, Instant)>,
}

/// A durable job at the committer: its batch, open until the committer takes it, and the same
/// updates with their LSNs (what is committed, or restored on failure, when the answer comes).
struct Inflight {
    batch: Arc<OpenBatch>,
    entries: Vec<(u64, Bytes)>,
}

/// What a loaded document starts with.
pub(crate) struct Loaded {
    pub doc: Doc,
    pub epoch: Epoch,
    pub db_seq: LogSeq,
    pub log_len: usize,
    /// True when `on_load_document` hooks changed the stored state (compact soon).
    pub dirty: bool,
    /// The ownership lock (cluster mode).
    pub lease: Option<Box<dyn Claim>>,
    /// Encoded size of the loaded state (snapshot and log), in bytes.
    pub size: usize,
}

enum Exit {
    Unloaded,
    Poisoned,
    Fenced,
    Shutdown(oneshot::Sender<()>),
}

/// The document task's state.
pub(crate) struct Actor {
    name: Arc<str>,
    svc: Arc<DocServices>,
    doc: Doc,
    changes: Arc<Mutex<Vec<Vec<u8>>>>,
    awareness: Awareness,
    conns: HashMap<ConnId, Conn>,
    direct: usize,
    epoch: Epoch,
    durable: bool,
    // persistence
    lsn: u64,
    committed_lsn: u64,
    unsent: Vec<(u64, Bytes)>,
    /// Bytes of applied updates not committed yet (`unsent` and the job in flight).
    uncommitted: usize,
    /// The job at the committer.
    inflight: Option<Inflight>,
    db_seq: LogSeq,
    log_len: usize,
    retry_at: Option<Instant>,
    backoff: Duration,
    dirty_since: Option<Instant>,
    last_change: Instant,
    last_context: Option<Arc<Context>>,
    idle_since: Option<Instant>,
    next_awareness_tick: Instant,
    internal_tx: mpsc::UnboundedSender<CommitResult>,
    internal_rx: mpsc::UnboundedReceiver<CommitResult>,
    me: WeakDocHandle,
    lease: Option<Box<dyn Claim>>,
    /// Whether this document is currently counted in `hearth_dirty_documents`.
    counted_dirty: bool,
    /// The awareness (states, bytes) this document counts in the node-wide gauges.
    counted_awareness: (i64, i64),
    /// After a failed compaction: (next attempt, current backoff).
    compact_retry: Option<(Instant, Duration)>,
    /// Encoded size of the document: the last stored state plus every update applied since
    /// (an over-estimate until the next compaction measures it again).
    size: usize,
    /// Server-side edits waiting for their commit: (required lsn, answer).
    durable_waiters: VecDeque<(u64, oneshot::Sender<Result<(), TransactError>>)>,
}

impl Actor {
    /// Starts the task for a loaded document and returns its handle.
    pub(crate) fn spawn(name: Arc<str>, svc: Arc<DocServices>, loaded: Loaded) -> DocHandle {
        let (tx, rx) = mpsc::channel(1024);
        let (internal_tx, internal_rx) = mpsc::unbounded_channel();
        let changes = Arc::new(Mutex::new(Vec::new()));
        let sink = changes.clone();
        let observed = loaded.doc.observe_update_v1("hearth", move |_, e| {
            sink.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(e.update.clone());
        });
        if let Err(e) = observed {
            error!(doc = %name, error = %e, "cannot observe document updates");
        }
        let now = Instant::now();
        let awareness = Awareness::with_limits(svc.config.awareness_limits());
        let handle = DocHandle {
            name: name.clone(),
            tx,
        };
        let actor = Actor {
            me: handle.downgrade(),
            lease: loaded.lease,
            counted_dirty: false,
            counted_awareness: (0, 0),
            compact_retry: None,
            size: loaded.size,
            durable_waiters: VecDeque::new(),
            name: name.clone(),
            durable: svc.config.durability == Durability::Durable,
            svc,
            doc: loaded.doc,
            changes,
            awareness,
            conns: HashMap::new(),
            direct: 0,
            epoch: loaded.epoch,
            lsn: 0,
            committed_lsn: 0,
            unsent: Vec::new(),
            uncommitted: 0,
            inflight: None,
            db_seq: loaded.db_seq,
            log_len: loaded.log_len,
            retry_at: None,
            backoff: RETRY_MIN,
            dirty_since: loaded.dirty.then_some(now),
            last_change: now,
            last_context: None,
            idle_since: Some(now + LOAD_GRACE),
            next_awareness_tick: now + AWARENESS_TICK,
            internal_tx,
            internal_rx,
        };
        tokio::spawn(actor.run(rx));
        handle
    }

    async fn run(mut self, mut rx: mpsc::Receiver<DocCommand>) {
        self.svc.metrics.documents.inc();
        debug!(doc = %self.name, epoch = self.epoch, "document task started");
        let lost = self.lease.as_ref().map(|l| l.lost());
        let lost = async move {
            match lost {
                Some(lost) => lost.await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(lost);
        let exit = loop {
            let deadline = self.next_deadline();
            let step = tokio::select! {
                biased;
                reason = &mut lost => {
                    warn!(doc = %self.name, reason, "ownership lock lost: stop writing");
                    Some(self.fence())
                }
                Some(result) = self.internal_rx.recv() => self.on_commit_result(result),
                // the queue to the committer is bounded: a document whose applied updates are
                // this far ahead of the database takes nothing new until a commit returns
                cmd = rx.recv(), if self.uncommitted < self.svc.config.max_message_bytes => match cmd {
                    Some(cmd) => self.handle(cmd).await,
                    None => Some(Exit::Unloaded),
                },
                _ = sleep_until(deadline) => self.on_timer(&rx).await,
            };
            self.sync_dirty_gauge();
            self.sync_awareness_gauges();
            if let Some(exit) = step {
                break exit;
            }
        };
        self.finish(exit, rx).await;
    }

    async fn finish(mut self, exit: Exit, mut rx: mpsc::Receiver<DocCommand>) {
        // From here on nobody new can reach us: the registry entry is gone or marked unloading.
        rx.close();
        while let Ok(cmd) = rx.try_recv() {
            match cmd {
                DocCommand::Attach(_, reply) | DocCommand::DirectOpen(reply) => {
                    let _ = reply.send(Err(Unloading));
                }
                DocCommand::Transact { done, .. } => {
                    let _ = done.send(Err(TransactError::Closed));
                }
                DocCommand::DirectClose(done) => {
                    let _ = done.send(());
                }
                DocCommand::Shutdown(done) => {
                    let _ = done.send(());
                }
                _ => {}
            }
        }
        let conns: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in conns {
            if let Some(c) = self.conns.remove(&id) {
                self.svc.metrics.pending_acks.sub(c.acks.len() as i64);
                self.svc.metrics.doc_connections.dec();
            }
        }
        if self.counted_dirty {
            self.svc.metrics.dirty_documents.dec();
        }
        self.svc
            .metrics
            .awareness_states
            .sub(self.counted_awareness.0);
        self.svc
            .metrics
            .awareness_bytes
            .sub(self.counted_awareness.1);
        if let Some(lease) = self.lease.take() {
            lease.release(self.epoch).await;
        }
        self.svc.registry.remove(&self.name);
        self.svc.metrics.documents.dec();
        let payload = DocumentPayload {
            document_name: &self.name,
            context: None,
        };
        if matches!(exit, Exit::Unloaded | Exit::Shutdown(_))
            && let Err(e) = self.svc.extensions.after_unload_document(&payload).await
        {
            warn!(doc = %self.name, reason = %e, "after_unload_document failed");
        }
        debug!(doc = %self.name, "document task stopped");
        if let Exit::Shutdown(done) = exit {
            let _ = done.send(());
        }
    }

    fn next_deadline(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        let mut d = far;
        if !self.awareness.is_empty() || !self.conns.is_empty() {
            // awareness expiry, and reaping connections whose socket vanished without a detach
            d = d.min(self.next_awareness_tick);
        }
        if let Some(due) = self.compaction_due() {
            d = d.min(due);
        }
        if let Some(idle) = self.idle_since {
            d = d.min(idle + Duration::from_millis(self.svc.config.unload_delay_ms));
        }
        if let Some(r) = self.retry_at {
            d = d.min(r);
        }
        d
    }

    async fn handle(&mut self, cmd: DocCommand) -> Option<Exit> {
        match cmd {
            DocCommand::Attach(a, reply) => {
                self.attach(a);
                let _ = reply.send(Ok(()));
            }
            DocCommand::Sync { conn, msg } => return self.on_sync(conn, msg).await,
            DocCommand::Awareness { conn, update } => self.on_awareness(conn, update).await,
            DocCommand::Stateless { conn, payload } => self.on_stateless(conn, payload).await,
            DocCommand::QueryAwareness { conn } => self.on_query_awareness(conn).await,
            DocCommand::Detach { conn, reply } => self.detach(conn, reply).await,
            DocCommand::BroadcastStateless(payload) => {
                self.broadcast(&ServerMessage::Stateless(&payload).encode_body(), None);
            }
            DocCommand::CloseConnections(reason) => {
                let ids: Vec<ConnId> = self.conns.keys().copied().collect();
                for id in ids {
                    self.detach(id, Some(reason.clone())).await;
                }
            }
            DocCommand::DirectOpen(reply) => {
                // an opener that gave up before the answer holds no connection to close
                if reply.send(Ok(())).is_ok() {
                    self.direct += 1;
                    self.idle_since = None;
                }
            }
            DocCommand::DirectClose(done) => {
                self.direct = self.direct.saturating_sub(1);
                let stored = self.flush().await;
                let _ = done.send(());
                if let Err(e) = stored {
                    warn!(doc = %self.name, error = %e, "store after direct connection failed");
                    if e.is_fenced() {
                        return Some(self.fence());
                    }
                }
                let payload = DisconnectPayload {
                    document_name: &self.name,
                    context: &Context::new(),
                    socket_id: "server",
                    clients_count: self.clients_count(),
                };
                let _ = self.svc.extensions.on_disconnect(&payload).await;
                if self.clients_count() == 0 {
                    // unloadImmediately: unload now rather than after the delay
                    self.idle_since = Some(
                        Instant::now() - Duration::from_millis(self.svc.config.unload_delay_ms),
                    );
                }
            }
            DocCommand::Transact {
                f,
                context,
                done,
                durable,
            } => {
                if !self.lease_valid() {
                    let _ = done.send(Err(TransactError::Closed));
                    return Some(self.fence());
                }
                if self.size >= self.svc.config.max_document_bytes {
                    let _ = done.send(Err(TransactError::Refused(format!(
                        "the document is at max_document_bytes ({})",
                        self.svc.config.max_document_bytes
                    ))));
                    return None;
                }
                // on the blocking pool: a direct transaction may do any amount of work (the
                // admin API's JSON operations and reads of large documents among them)
                let doc = self.doc.clone();
                let result =
                    tokio::task::spawn_blocking(move || catch_unwind(AssertUnwindSafe(|| f(&doc))))
                        .await;
                if !matches!(result, Ok(Ok(()))) {
                    let _ = done.send(Err(TransactError::Panicked));
                    return Some(self.poison("direct transaction panicked"));
                }
                let produced: usize = self
                    .changes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .map(Vec::len)
                    .sum();
                self.size += produced;
                self.changes_applied(None, Some(context)).await;
                if durable {
                    self.answer_when_durable(done);
                } else {
                    let _ = done.send(Ok(()));
                }
            }
            DocCommand::ApplyUpdate {
                update,
                context,
                done,
            } => return self.apply_server_update(update, context, done).await,
            DocCommand::Info(reply) => {
                let _ = reply.send(DocInfo {
                    connections: self.conns.len(),
                    direct: self.direct,
                    epoch: self.epoch,
                    size: self.size,
                });
            }
            DocCommand::Delete(done) => {
                let ids: Vec<ConnId> = self.conns.keys().copied().collect();
                for id in ids {
                    self.detach(id, Some(Close::ResetConnection.reason().into()))
                        .await;
                }
                let result = match self.flush_commits().await {
                    Ok(()) => self.svc.store.delete(&self.name, self.epoch).await,
                    Err(e) => Err(e),
                };
                info!(doc = %self.name, epoch = self.epoch, ok = result.is_ok(), "document deleted");
                let _ = done.send(result);
                // whatever the outcome, this task no longer holds the document's content: the
                // next open loads it again under a new epoch
                return Some(self.fence());
            }
            DocCommand::Shutdown(done) => {
                let ids: Vec<ConnId> = self.conns.keys().copied().collect();
                for id in ids {
                    self.detach(id, Some(Close::ResetConnection.reason().into()))
                        .await;
                }
                if let Err(e) = self.flush().await {
                    error!(doc = %self.name, error = %e, "final store at shutdown failed");
                }
                return Some(Exit::Shutdown(done));
            }
        }
        None
    }

    fn attach(&mut self, a: Attach) {
        let yws = matches!(a.framing, Framing::YWebsocket);
        let conn = Conn {
            outbox: a.outbox,
            framing: a.framing,
            read_only: a.read_only,
            context: a.context,
            socket_id: a.socket_id,
            conn_ref: a.conn_ref,
            awareness_rate: RateLimit::new(
                self.svc.config.max_awareness_updates_per_sec,
                Instant::now(),
            ),
            acks: VecDeque::new(),
        };
        if yws {
            // y-websocket: the server opens with its step1
            let sv = self.doc.transact().state_vector().encode_v1();
            conn.outbox.send(ServerMessage::SyncStep1(&sv).frame(None));
        }
        if let Some(bytes) = self.awareness.encode_all() {
            conn.outbox
                .send(ServerMessage::Awareness(&bytes).frame(conn.framing.address()));
        }
        self.conns.insert(a.conn, conn);
        self.svc.metrics.doc_connections.inc();
        self.idle_since = None;
    }

    fn clients_count(&self) -> usize {
        self.conns.len() + self.direct
    }

    async fn detach(&mut self, id: ConnId, reply: Option<String>) {
        let Some(conn) = self.conns.remove(&id) else {
            return;
        };
        self.svc.metrics.doc_connections.dec();
        self.svc.metrics.pending_acks.sub(conn.acks.len() as i64);
        match (&reply, &conn.framing) {
            (Some(reason), Framing::Hocuspocus(address)) => {
                conn.outbox
                    .send(ServerMessage::Close(reason).frame(Some(address)));
                if reason != "provider_initiated" {
                    conn.outbox.control(Outgoing::DocClosed {
                        address: address.clone(),
                        conn: id,
                    });
                }
            }
            // y-websocket has no per-document close: the socket goes, the client reconnects
            (Some(_), Framing::YWebsocket) => {
                conn.outbox
                    .control(Outgoing::CloseSocket(Close::ResetConnection));
            }
            (None, _) => {}
        }
        let change = self.awareness.remove_owner(id, Instant::now());
        if !change.is_empty() {
            self.broadcast_awareness(&change, None).await;
        }
        let payload = DisconnectPayload {
            document_name: &self.name,
            context: &conn.context,
            socket_id: &conn.socket_id,
            clients_count: self.clients_count(),
        };
        if let Err(e) = self.svc.extensions.on_disconnect(&payload).await {
            debug!(doc = %self.name, reason = %e, "on_disconnect rejected");
        }
        if self.clients_count() == 0 {
            self.idle_since = Some(Instant::now());
        }
    }

    async fn on_sync(&mut self, id: ConnId, msg: SyncMessage) -> Option<Exit> {
        let conn = self.conns.get(&id)?;
        let address = conn.framing.address().map(|a| a.to_owned());
        let yws = address.is_none();
        match msg {
            SyncMessage::Step1(sv) => {
                let sv = match decode_state_vector(&sv) {
                    Ok(sv) => sv,
                    Err(e) => {
                        debug!(doc = %self.name, conn = id, error = %e, "invalid state vector");
                        self.svc
                            .metrics
                            .updates_rejected
                            .with_label_values(&["invalid_state_vector"])
                            .inc();
                        return None;
                    }
                };
                // a large document's answer is encoded off the async workers
                let encoded = offload::sync_answer(&self.doc, sv, self.size).await;
                let Ok((server_sv, diff)) = encoded else {
                    return Some(self.poison("encoding a sync step2 panicked"));
                };
                if !yws {
                    self.send_to(id, ServerMessage::SyncStep1(&server_sv));
                }
                self.send_to(id, ServerMessage::SyncStep2(&diff));
            }
            SyncMessage::Step2(update) => return self.on_update(id, update, yws, true).await,
            SyncMessage::Update(update) => return self.on_update(id, update, yws, false).await,
        }
        None
    }

    async fn on_update(
        &mut self,
        id: ConnId,
        update: Bytes,
        yws: bool,
        step2: bool,
    ) -> Option<Exit> {
        let read_only = self.conns.get(&id).is_some_and(|c| c.read_only);
        // Iterative and bounded: nothing recursive has seen the bytes yet.
        let scanned = scan_update(&update, &self.svc.config.scan_limits());
        if read_only {
            // A read-only connection never decodes or applies: its step2 is acknowledged when
            // the server already has all of it (decided from the scan), an update never is.
            self.svc
                .metrics
                .updates_rejected
                .with_label_values(&["read_only"])
                .inc();
            if !yws {
                let contained = step2
                    && scanned
                        .as_ref()
                        .is_ok_and(|s| contains_scanned(&self.doc.transact(), s));
                self.queue_ack(id, contained, 0);
            }
            return None;
        }
        if !self.lease_valid() {
            return Some(self.fence());
        }
        let scan = match scanned {
            Ok(scan) => scan,
            Err(e) => return self.refuse_update(id, yws, "invalid", &e.into()),
        };
        let missing = scan.missing(known_clocks(&self.doc.transact()));
        if let Some((client, clock)) = missing {
            // Never park an update whose dependencies are missing: yrs's pending set is where
            // crafted updates do harm, and parked updates pile up unacknowledgeable. Refuse it
            // and ask the client for everything it has that the document lacks (a client that
            // holds the dependencies sends them in its step2; a refused step2 is not asked again).
            debug!(doc = %self.name, conn = id, client, clock, "update depends on unknown content");
            self.reject(id, yws, "missing_dependency");
            if !step2 {
                let sv = self.doc.transact().state_vector().encode_v1();
                self.send_to(id, ServerMessage::SyncStep1(&sv));
            }
            return None;
        }
        let max_size = self.svc.config.max_document_bytes;
        if self.size.saturating_add(update.len()) > max_size {
            warn!(doc = %self.name, conn = id, size = self.size, update = update.len(), max_size, "update refused: document at its size limit");
            self.reject(id, yws, "document_too_large");
            return None;
        }
        let update_len = update.len();
        let update = match decode_scanned(&update, &scan) {
            Ok(u) => u,
            Err(e) => return self.refuse_update(id, yws, "invalid", &e),
        };
        // a large update is applied off the async workers (this task waits for it)
        let applied = offload::apply_update(&self.doc, update, update_len).await;
        match applied {
            Err(_) => return Some(self.poison("applying a client update panicked")),
            Ok(Err(e)) => {
                warn!(doc = %self.name, conn = id, error = %e, "update failed to apply");
                self.reject(id, yws, "apply_failed");
                return None;
            }
            Ok(Ok(())) => {}
        }
        self.size += update_len;
        let context = self.conns.get(&id).map(|c| c.context.clone());
        self.changes_applied(Some(id), context).await;
        if !yws {
            // Exactly one SyncStatus per update, released once everything applied so far is
            // committed (which includes this update, if it changed anything).
            self.queue_ack(id, true, self.lsn);
        }
        None
    }

    /// Answers `done` once everything applied so far is committed (at once in memory mode or
    /// when nothing is pending).
    fn answer_when_durable(&mut self, done: oneshot::Sender<Result<(), TransactError>>) {
        if self.committed_lsn >= self.lsn {
            let _ = done.send(Ok(()));
        } else {
            self.durable_waiters.push_back((self.lsn, done));
        }
    }

    fn release_durable_waiters(&mut self) {
        while self
            .durable_waiters
            .front()
            .is_some_and(|(lsn, _)| *lsn <= self.committed_lsn)
        {
            if let Some((_, done)) = self.durable_waiters.pop_front() {
                let _ = done.send(Ok(()));
            }
        }
    }

    /// A server-side update (the admin API): the same scan, dependency, size and decode checks
    /// as a client's update, applied as the server's own change and answered once durable.
    async fn apply_server_update(
        &mut self,
        update: Bytes,
        context: Arc<Context>,
        done: oneshot::Sender<Result<(), TransactError>>,
    ) -> Option<Exit> {
        if !self.lease_valid() {
            let _ = done.send(Err(TransactError::Closed));
            return Some(self.fence());
        }
        let refuse = |done: oneshot::Sender<Result<(), TransactError>>, why: String| {
            let _ = done.send(Err(TransactError::Refused(why)));
        };
        let scan = match scan_update(&update, &self.svc.config.scan_limits()) {
            Ok(scan) => scan,
            Err(e) => {
                refuse(done, UpdateError::from(e).to_string());
                return None;
            }
        };
        if let Some((client, clock)) = scan.missing(known_clocks(&self.doc.transact())) {
            refuse(
                done,
                format!("depends on content the document lacks (client {client}, clock {clock})"),
            );
            return None;
        }
        let max_size = self.svc.config.max_document_bytes;
        if self.size.saturating_add(update.len()) > max_size {
            refuse(
                done,
                format!("the document would exceed max_document_bytes ({max_size})"),
            );
            return None;
        }
        let update_len = update.len();
        let decoded = match decode_scanned(&update, &scan) {
            Ok(u) => u,
            Err(e) => {
                refuse(done, e.to_string());
                return None;
            }
        };
        match offload::apply_update(&self.doc, decoded, update_len).await {
            Err(_) => {
                let _ = done.send(Err(TransactError::Panicked));
                return Some(self.poison("applying a server update panicked"));
            }
            Ok(Err(e)) => {
                refuse(done, e.to_string());
                return None;
            }
            Ok(Ok(())) => {}
        }
        self.size += update_len;
        self.changes_applied(None, Some(context)).await;
        self.answer_when_durable(done);
        None
    }

    /// Collects what the last transaction changed: log, broadcast, hooks.
    async fn changes_applied(&mut self, origin: Option<ConnId>, context: Option<Arc<Context>>) {
        let changes = std::mem::take(&mut *self.changes.lock().unwrap_or_else(|p| p.into_inner()));
        if changes.is_empty() {
            return;
        }
        let now = Instant::now();
        self.dirty_since.get_or_insert(now);
        self.last_change = now;
        self.last_context = context.clone();
        let socket_id = match origin {
            Some(id) => self.conns.get(&id).map(|c| c.socket_id.clone()),
            None => Some(Arc::from("server")),
        };
        for change in changes {
            self.svc.metrics.updates_applied.inc();
            self.lsn += 1;
            let bytes = Bytes::from(change);
            if self.durable {
                self.uncommitted += bytes.len();
                // Joins the job still waiting at the committer if it can (nothing unsent may
                // go before it), else waits for the next job.
                match &mut self.inflight {
                    Some(job) if self.unsent.is_empty() && job.batch.add(&bytes) => {
                        job.entries.push((self.lsn, bytes.clone()));
                    }
                    _ => self.unsent.push((self.lsn, bytes.clone())),
                }
            } else {
                self.committed_lsn = self.lsn;
            }
            self.broadcast(&ServerMessage::SyncUpdate(&bytes).encode_body(), None);
            let payload = ChangePayload {
                document_name: &self.name,
                update: &bytes,
                context: context.as_deref(),
                socket_id: socket_id.as_deref(),
            };
            if let Err(e) = self.svc.extensions.on_change(&payload).await {
                debug!(doc = %self.name, reason = %e, "on_change rejected");
            }
        }
        self.maybe_commit();
    }

    /// Refuses a client update that could not be scanned or decoded: `SyncStatus(0)`, a metric
    /// and a log line; the connection stays open.
    fn refuse_update(
        &mut self,
        id: ConnId,
        yws: bool,
        label: &str,
        error: &UpdateError,
    ) -> Option<Exit> {
        warn!(doc = %self.name, conn = id, error = %error, "refused client update");
        self.reject(id, yws, label);
        None
    }

    /// Counts a refused update (`updates_rejected{reason=label}`) and answers it with
    /// `SyncStatus 0` (a Hocuspocus client; y-websocket has no answer), in order with the
    /// connection's other acknowledgements.
    fn reject(&mut self, id: ConnId, yws: bool, label: &str) {
        self.svc
            .metrics
            .updates_rejected
            .with_label_values(&[label])
            .inc();
        if !yws {
            self.queue_ack(id, false, 0);
        }
    }

    fn queue_ack(&mut self, id: ConnId, ok: bool, lsn: u64) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let frame = ServerMessage::SyncStatus(ok).frame(conn.framing.address());
        conn.acks.push_back((lsn, frame, Instant::now()));
        self.svc.metrics.pending_acks.inc();
        self.release_acks_of(id);
    }

    fn release_acks_of(&mut self, id: ConnId) {
        let committed = self.committed_lsn;
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        while conn
            .acks
            .front()
            .is_some_and(|(lsn, _, _)| *lsn <= committed)
        {
            if let Some((_, frame, at)) = conn.acks.pop_front() {
                self.svc.metrics.pending_acks.dec();
                self.svc
                    .metrics
                    .ack_seconds
                    .observe(at.elapsed().as_secs_f64());
                conn.outbox.send(frame);
            }
        }
        if conn.acks.is_empty() {
            // an idle connection keeps no ack queue (a few hundred bytes each, for as long as
            // it stays open)
            conn.acks = VecDeque::new();
        }
    }

    fn release_acks(&mut self) {
        let ids: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.acks.is_empty())
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.release_acks_of(id);
        }
    }

    fn maybe_commit(&mut self) {
        if !self.durable || self.inflight.is_some() || self.unsent.is_empty() {
            return;
        }
        if self.retry_at.is_some_and(|r| r > Instant::now()) {
            return;
        }
        self.retry_at = None;
        let entries = std::mem::take(&mut self.unsent);
        let batch = OpenBatch::new(entries.iter().map(|(_, b)| b.clone()).collect());
        let job = AppendJob {
            name: self.name.to_string(),
            epoch: self.epoch,
            batch: batch.clone(),
            reply: self.internal_tx.clone(),
        };
        self.inflight = Some(Inflight { batch, entries });
        self.svc.committer.submit(job);
    }

    fn on_commit_result(&mut self, result: CommitResult) -> Option<Exit> {
        let batch = self.inflight.take()?.entries;
        let upto = batch.last().map_or(self.committed_lsn, |(lsn, _)| *lsn);
        match result.outcome {
            Ok(AppendOutcome::Committed(seq)) => {
                let bytes: usize = batch.iter().map(|(_, b)| b.len()).sum();
                self.uncommitted = self.uncommitted.saturating_sub(bytes);
                // the first write of a document loaded empty created its row
                self.epoch = result.epoch;
                self.committed_lsn = upto.max(self.committed_lsn);
                self.db_seq = seq;
                self.log_len += batch.len();
                self.backoff = RETRY_MIN;
                self.release_acks();
                self.release_durable_waiters();
                self.maybe_commit();
                None
            }
            Ok(AppendOutcome::Fenced { current }) => {
                warn!(doc = %self.name, epoch = self.epoch, current, "append fenced: another owner holds the document");
                Some(self.fence())
            }
            Err(e) => {
                // Keep everything, withhold the acks, retry with backoff.
                warn!(doc = %self.name, error = %e, retry_in_ms = self.backoff.as_millis() as u64, "append failed; will retry");
                // The first write of a document loaded empty may have created its row before
                // the append failed: retry under that epoch, or the retry would find the row
                // taken and fence this, its rightful owner.
                if result.epoch != UNSTORED {
                    self.epoch = result.epoch;
                }
                let mut restored = batch;
                restored.append(&mut self.unsent);
                self.unsent = restored;
                self.retry_at = Some(Instant::now() + self.backoff);
                self.backoff = (self.backoff * 2).min(RETRY_MAX);
                None
            }
        }
    }

    /// Waits until every applied update is committed (durable), then compacts.
    async fn flush(&mut self) -> Result<(), StoreError> {
        self.flush_commits().await?;
        if self.dirty_since.is_some() {
            self.compact().await
        } else {
            Ok(())
        }
    }

    /// Waits until every applied update is committed (durable mode; nothing to do otherwise).
    async fn flush_commits(&mut self) -> Result<(), StoreError> {
        let deadline =
            Instant::now() + Duration::from_millis(self.svc.config.shutdown_timeout_ms.max(1000));
        while self.durable && (self.inflight.is_some() || !self.unsent.is_empty()) {
            if Instant::now() >= deadline {
                return Err(StoreError::Database(
                    "timed out waiting for the commit of pending updates".into(),
                ));
            }
            self.maybe_commit();
            if self.inflight.is_none() {
                if let Some(r) = self.retry_at {
                    sleep_until(r.min(deadline)).await;
                    self.retry_at = None;
                }
                continue;
            }
            let Ok(Some(result)) = tokio::time::timeout_at(deadline, self.internal_rx.recv()).await
            else {
                continue;
            };
            if let Some(Exit::Fenced) = self.on_commit_result(result) {
                return Err(StoreError::Fenced {
                    current: self.epoch + 1,
                    mine: self.epoch,
                });
            }
        }
        Ok(())
    }

    /// Folds the log into a new snapshot (fenced), running the store hooks.
    async fn compact(&mut self) -> Result<(), StoreError> {
        let encoded = offload::encode_state(&self.doc, self.size).await;
        let Ok(state) = encoded else {
            self.svc.metrics.panics.inc();
            return Err(StoreError::Corrupt("encoding the document panicked".into()));
        };
        let payload = StorePayload {
            document_name: &self.name,
            state: &state,
            last_context: self.last_context.as_deref(),
            clients_count: self.clients_count(),
        };
        if let Err(e) = self.svc.extensions.on_store_document(&payload).await {
            self.svc.metrics.failed_writes.inc();
            return Err(StoreError::Database(
                format!("on_store_document rejected: {e}").into(),
            ));
        }
        let started = Instant::now();
        if self.epoch == UNSTORED {
            // a document loaded empty is stored for the first time: create its row, unless
            // someone else did first (then this node is fenced)
            match self.svc.store.create_epoch(&self.name).await {
                Ok(Some(epoch)) => self.epoch = epoch,
                Ok(None) => {
                    self.svc.metrics.fenced_writes.inc();
                    return Err(StoreError::Fenced {
                        current: 1,
                        mine: UNSTORED,
                    });
                }
                Err(e) => {
                    self.svc.metrics.failed_writes.inc();
                    return Err(e);
                }
            }
        }
        let result = self
            .svc
            .store
            .compact(&self.name, self.epoch, &state, self.db_seq)
            .await;
        let m = &self.svc.metrics;
        m.store_seconds
            .with_label_values(&["compact"])
            .observe(started.elapsed().as_secs_f64());
        match &result {
            Ok(()) => {
                m.store_ops.with_label_values(&["compact", "ok"]).inc();
                m.storage_write_ok.set(1);
                m.compaction_log_len.observe(self.log_len as f64);
                self.log_len = 0;
                self.dirty_since = None;
                self.size = state.len();
                debug!(doc = %self.name, bytes = state.len(), "document stored");
                if let Err(e) = self.svc.extensions.after_store_document(&payload).await {
                    debug!(doc = %self.name, reason = %e, "after_store_document rejected");
                }
            }
            Err(e) if e.is_fenced() => {
                m.store_ops.with_label_values(&["compact", "fenced"]).inc();
                m.fenced_writes.inc();
            }
            Err(_) => {
                m.store_ops.with_label_values(&["compact", "error"]).inc();
                m.write_outcome(false);
            }
        }
        result
    }

    async fn on_timer(&mut self, rx: &mpsc::Receiver<DocCommand>) -> Option<Exit> {
        let now = Instant::now();
        if now >= self.next_awareness_tick {
            self.next_awareness_tick = now + AWARENESS_TICK;
            let timeout = Duration::from_millis(self.svc.config.awareness_timeout_ms);
            let change = self.awareness.expire(now, timeout);
            if !change.is_empty() {
                self.broadcast_awareness(&change, None).await;
            }
            self.awareness.gc(now, timeout * 4);
            self.reap_closed();
        }
        if self.retry_at.is_some_and(|r| r <= now) {
            self.retry_at = None;
            self.maybe_commit();
        }
        if self.compaction_due().is_some_and(|due| now >= due) {
            match self.compact().await {
                Ok(()) => {
                    self.compact_retry = None;
                }
                Err(e) if e.is_fenced() => return Some(self.fence()),
                Err(e) => {
                    // back off: the next attempt waits, however overdue the debounce is
                    let delay = self
                        .compact_retry
                        .map_or(RETRY_MIN, |(_, d)| (d * 2).min(RETRY_MAX));
                    warn!(doc = %self.name, error = %e, retry_in_ms = delay.as_millis() as u64, "compaction failed; will retry");
                    self.compact_retry = Some((Instant::now() + delay, delay));
                }
            }
        }
        if let Some(idle) = self.idle_since
            && now >= idle + Duration::from_millis(self.svc.config.unload_delay_ms)
            && self.clients_count() == 0
        {
            return self.try_unload(rx).await;
        }
        None
    }

    /// Drops connections whose socket task is gone without a detach.
    fn reap_closed(&mut self) {
        let dead: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.outbox.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in dead {
            self.send_detached_self(id);
        }
    }

    fn send_detached_self(&mut self, id: ConnId) {
        if let Some(conn) = self.conns.remove(&id) {
            self.svc.metrics.doc_connections.dec();
            self.svc.metrics.pending_acks.sub(conn.acks.len() as i64);
            let change = self.awareness.remove_owner(id, Instant::now());
            if !change.is_empty() {
                let bytes = self.awareness.encode(change.all());
                self.broadcast(&ServerMessage::Awareness(&bytes).encode_body(), None);
            }
            if self.clients_count() == 0 {
                self.idle_since = Some(Instant::now());
            }
        }
    }

    async fn try_unload(&mut self, rx: &mpsc::Receiver<DocCommand>) -> Option<Exit> {
        if let Err(e) = self.flush().await {
            if e.is_fenced() {
                return Some(self.fence());
            }
            // Never unload with uncommitted changes: keep the document and retry later.
            warn!(doc = %self.name, error = %e, "store before unload failed; keeping the document loaded");
            self.idle_since = Some(Instant::now() + self.backoff);
            self.backoff = (self.backoff * 2).min(RETRY_MAX);
            return None;
        }
        let payload = DocumentPayload {
            document_name: &self.name,
            context: None,
        };
        if let Err(e) = self.svc.extensions.before_unload_document(&payload).await {
            debug!(doc = %self.name, reason = %e, "before_unload_document cancelled the unload");
            self.idle_since = None;
            return None;
        }
        // Commands that arrived meanwhile (a new attach) cancel the unload.
        if !rx.is_empty() || self.clients_count() > 0 {
            self.idle_since = None;
            return None;
        }
        if !self.svc.registry.begin_unload(&self.name) {
            return None;
        }
        debug!(doc = %self.name, "unloading");
        Some(Exit::Unloaded)
    }

    /// When the next compaction is due: debounce after the last change, at the latest
    /// max-debounce after the first uncompacted one, never before a pending retry time.
    fn compaction_due(&self) -> Option<Instant> {
        let since = self.dirty_since?;
        let due = (self.last_change + self.svc.config.debounce())
            .min(since + self.svc.config.max_debounce());
        Some(match self.compact_retry {
            Some((at, _)) => due.max(at),
            None => due,
        })
    }

    /// Keeps `hearth_dirty_documents` equal to the number of documents with uncommitted or
    /// uncompacted changes.
    fn sync_dirty_gauge(&mut self) {
        let dirty =
            self.dirty_since.is_some() || !self.unsent.is_empty() || self.inflight.is_some();
        if dirty != self.counted_dirty {
            if dirty {
                self.svc.metrics.dirty_documents.inc();
            } else {
                self.svc.metrics.dirty_documents.dec();
            }
            self.counted_dirty = dirty;
        }
    }

    /// False once the ownership lock can no longer be trusted (checked before every write; the
    /// database epoch still fences anything that slips between this check and the commit).
    fn lease_valid(&self) -> bool {
        self.lease.as_ref().is_none_or(|l| l.is_valid())
    }

    fn fence(&mut self) -> Exit {
        self.svc.metrics.fenced_writes.inc();
        warn!(doc = %self.name, epoch = self.epoch, "ownership lost (fenced): dropping the document without storing");
        self.reset_clients();
        Exit::Fenced
    }

    fn poison(&mut self, what: &str) -> Exit {
        self.svc.metrics.panics.inc();
        error!(doc = %self.name, "{what}; dropping in-memory state, clients will reload from storage");
        self.reset_clients();
        Exit::Poisoned
    }

    /// Closes the sockets of every client so they reconnect and resync (after a fence or poison).
    fn reset_clients(&mut self) {
        for conn in self.conns.values() {
            if let Framing::Hocuspocus(address) = &conn.framing {
                conn.outbox.send(
                    ServerMessage::Close(Close::ResetConnection.reason()).frame(Some(address)),
                );
            }
            conn.outbox
                .control(Outgoing::CloseSocket(Close::ResetConnection));
        }
    }

    async fn on_stateless(&mut self, id: ConnId, payload: String) {
        let Some(conn) = self.conns.get(&id) else {
            return;
        };
        let (Some(connection), Some(me)) = (conn.conn_ref.clone(), self.me.upgrade()) else {
            return;
        };
        let context = conn.context.clone();
        let document = me.as_ref_for_hooks();
        let p = StatelessPayload {
            document_name: &self.name,
            payload: &payload,
            connection: &connection,
            document: &document,
            context: &context,
        };
        if let Err(e) = self.svc.extensions.on_stateless(&p).await {
            debug!(doc = %self.name, conn = id, reason = %e, "on_stateless rejected");
        }
    }

    /// An awareness update. Only messages that change something (or are refused) count
    /// against the connection's rate: providers re-send every change they receive, and those
    /// repeats change nothing here.
    async fn on_awareness(&mut self, id: ConnId, update: Bytes) {
        let now = Instant::now();
        // frames of a connection closed meanwhile are dropped
        if !self.conns.contains_key(&id) {
            return;
        }
        let max = self.svc.config.max_awareness_state_bytes;
        let update = match awareness::Update::parse(update, max) {
            Ok(u) => u,
            Err(e) => {
                debug!(doc = %self.name, conn = id, error = %e, "refused awareness update");
                self.svc
                    .metrics
                    .awareness_refused
                    .with_label_values(&[e.label()])
                    .inc();
                self.charge_awareness(id, now).await;
                return;
            }
        };
        let applied = self.awareness.apply(id, &update, now);
        for (reason, n) in applied.refused.iter() {
            debug!(doc = %self.name, conn = id, reason = reason.label(), states = n, "document awareness full; states ignored");
            self.svc
                .metrics
                .awareness_refused
                .with_label_values(&[reason.label()])
                .inc_by(n as u64);
        }
        if !applied.change.is_empty() {
            let context = self.conns.get(&id).map(|c| c.context.clone());
            self.broadcast_awareness(&applied.change, context).await;
        }
        if let Some(v) = applied.violation {
            self.close_for_violation(id, v).await;
        } else if !applied.change.is_empty() || !applied.refused.is_empty() {
            self.charge_awareness(id, now).await;
        }
    }

    /// Takes one token from the connection's awareness rate; closes it when none is left.
    /// False when the connection was closed.
    async fn charge_awareness(&mut self, id: ConnId, now: Instant) -> bool {
        let Some(conn) = self.conns.get_mut(&id) else {
            return false;
        };
        if conn.awareness_rate.take(now) {
            return true;
        }
        self.close_for_violation(id, Violation::Rate).await;
        false
    }

    /// QueryAwareness: the snapshot of every present state (at most
    /// `max_awareness_document_bytes`); counts against the connection's awareness rate.
    async fn on_query_awareness(&mut self, id: ConnId) {
        if !self.charge_awareness(id, Instant::now()).await {
            return;
        }
        if let Some(bytes) = self.awareness.encode_all() {
            self.send_to(id, ServerMessage::Awareness(&bytes));
        }
    }

    /// A connection broke a per-connection awareness limit: it gets `CLOSE(reason)` on this
    /// document (Hocuspocus), its states are removed, and its whole socket is closed with
    /// 1008 and the same reason. Everyone else keeps working.
    async fn close_for_violation(&mut self, id: ConnId, v: Violation) {
        let Some(outbox) = self.conns.get(&id).map(|c| c.outbox.clone()) else {
            return;
        };
        warn!(doc = %self.name, conn = id, limit = v.label(), "awareness limit exceeded; closing the client's socket");
        self.svc
            .metrics
            .awareness_refused
            .with_label_values(&[v.label()])
            .inc();
        let yws = self
            .conns
            .get(&id)
            .is_some_and(|c| matches!(c.framing, Framing::YWebsocket));
        if yws {
            // the socket's close carries the reason; no reset close of the document first
            outbox.control(Outgoing::CloseSocket(Close::Awareness(v)));
            self.detach(id, None).await;
        } else {
            self.detach(id, Some(v.reason().to_owned())).await;
            outbox.control(Outgoing::CloseSocket(Close::Awareness(v)));
        }
    }

    /// Keeps `hearth_awareness_states` / `hearth_awareness_bytes` equal to the sums over
    /// loaded documents.
    fn sync_awareness_gauges(&mut self) {
        let now = (
            self.awareness.len() as i64,
            self.awareness.encoded_len() as i64,
        );
        if now != self.counted_awareness {
            let m = &self.svc.metrics;
            m.awareness_states.add(now.0 - self.counted_awareness.0);
            m.awareness_bytes.add(now.1 - self.counted_awareness.1);
            self.counted_awareness = now;
        }
    }

    async fn broadcast_awareness(&mut self, change: &Change, context: Option<Arc<Context>>) {
        let bytes = self.awareness.encode(change.all());
        self.broadcast(&ServerMessage::Awareness(&bytes).encode_body(), None);
        let payload = AwarenessPayload {
            document_name: &self.name,
            added: &change.added,
            updated: &change.updated,
            removed: &change.removed,
            context: context.as_deref(),
        };
        if let Err(e) = self.svc.extensions.on_awareness_update(&payload).await {
            debug!(doc = %self.name, reason = %e, "on_awareness_update rejected");
        }
    }

    fn send_to(&mut self, id: ConnId, msg: ServerMessage<'_>) {
        if let Some(conn) = self.conns.get(&id) {
            if !conn.outbox.send(msg.frame(conn.framing.address())) {
                self.send_detached_self(id);
            } else {
                self.svc.metrics.frames_out.inc();
            }
        }
    }

    /// Sends `body` to every connection (framed per address, each distinct frame built once).
    fn broadcast(&mut self, body: &[u8], except: Option<ConnId>) {
        let _burst = (self.conns.len() > 1)
            .then(|| self.svc.burst.as_ref().map(|b| b.begin()))
            .flatten();
        let mut cache: Vec<(Option<Arc<str>>, Bytes)> = Vec::with_capacity(2);
        let mut dead = Vec::new();
        for (id, conn) in &self.conns {
            if Some(*id) == except {
                continue;
            }
            let key = match &conn.framing {
                Framing::Hocuspocus(a) => Some(a.clone()),
                Framing::YWebsocket => None,
            };
            let framed = match cache.iter().find(|(k, _)| k.as_deref() == key.as_deref()) {
                Some((_, f)) => f.clone(),
                None => {
                    let f = frame(key.as_deref(), body);
                    cache.push((key, f.clone()));
                    f
                }
            };
            if conn.outbox.send(framed) {
                self.svc.metrics.frames_out.inc();
            } else {
                dead.push(*id);
            }
        }
        for id in dead {
            self.send_detached_self(id);
        }
    }
}

impl std::fmt::Debug for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Actor")
            .field("name", &self.name)
            .field("conns", &self.conns.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_connection_entry_stays_small() {
        // A document's map holds one entry per connection inline, in a table up to half
        // empty, so each byte here costs an idle connection up to two. 128 with the outbox
        // handle one pointer and the awareness rate 24 bytes.
        let size = std::mem::size_of::<super::Conn>();
        assert!(size <= 128, "a document's connection entry: {size} bytes");
    }
}
