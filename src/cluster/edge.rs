//! The edge side: clients connected here whose documents are served by another node.
//!
//! An [`EdgeClient`] lives from the client's `open` until it leaves or is closed, across
//! changes of owner. When its owner dies (or says it no longer owns the document) the client is
//! **re-homed** instead of closed: its socket stays open, its frames wait (parked, bounded), the
//! document is routed again (which takes it over early when the old owner's process has
//! exited), and a new session is opened on the new owner — possibly this node — replaying
//! what that owner needs to serve the client as if nothing happened:
//!
//! 1. the client's Auth frame (the new owner authenticates it again; its second
//!    `Authenticated` answer is not passed on: the client has been authenticated all along);
//! 2. the client's last sync step 1, so the new owner answers with whatever the client lacks
//!    and asks, with its own step 1, for whatever the client has that it lacks;
//! 3. every update the client sent that no owner has acknowledged yet, in order: each gets its
//!    one `SyncStatus` from the new owner, so the provider's count of unsynced changes ends
//!    where it would have without the failover;
//! 4. the client's last awareness update, so other clients see its presence again;
//! 5. the frames parked meanwhile.
//!
//! A client whose replay state overflowed its bounds, or whose re-homing fails, is reset
//! (closed with 4205) as before: the provider reconnects and resyncs.

use std::collections::VecDeque;
use std::sync::MutexGuard;

use super::*;
use crate::connection::placement::{Link, LinkClient, Placement, Route, RouteError};
use crate::doc::services::DocServices;
use crate::protocol::lib0::Reader;
use crate::protocol::message::kind;
use crate::request::RequestInfo;

/// How many times in a row one client may be re-homed without an owner answering it.
const MAX_REHOMES: u32 = 3;
/// Pause between routing attempts while re-homing.
const REROUTE_PAUSE: Duration = Duration::from_millis(100);
/// Routing attempts while re-homing (the lock may still be held by a dying owner).
const REROUTE_ATTEMPTS: u32 = 20;

/// A client here whose document another node serves.
pub(super) struct EdgeClient {
    pub(super) doc: String,
    pub(super) outbox: Outbox,
    authenticated: Arc<AtomicBool>,
    meta: OpenMeta,
    state: Mutex<EdgeState>,
}

/// The mutable part of an [`EdgeClient`].
struct EdgeState {
    owner: NodeAddr,
    session: Session,
    /// The client's frames in the transport (`edge_out`, see [`flow`]).
    backlog: hearth_proxy::Backlog,
    /// What a new owner needs (the module's list); `None` once it overflowed its bounds.
    replay: Option<Replay>,
    /// Frames that arrived while the client moves to a new owner.
    parked: Option<Parked>,
    /// The new owner's `Authenticated` answer is not passed on.
    swallow_authenticated: bool,
    /// Re-homings without an answer from the owner since.
    rehomes: u32,
    /// Removed from the table (left, closed or shed): nothing more is sent.
    closed: bool,
}

#[derive(Default)]
struct Replay {
    auth: Option<Bytes>,
    step1: Option<Bytes>,
    unacked: VecDeque<Bytes>,
    unacked_bytes: usize,
    awareness: Option<Bytes>,
}

#[derive(Default)]
struct Parked {
    frames: Vec<Bytes>,
    bytes: usize,
}

/// What the edge keeps track of in a client frame.
#[derive(Debug, PartialEq, Eq)]
enum Tracked {
    Auth,
    Step1,
    /// A step 2 or an update: one `SyncStatus` answers it.
    Update,
    Awareness,
    Other,
}

/// The message kind after a frame's address, and a reader positioned after it (the project's
/// lib0 reader: bounded, never panics; the payload is not decoded).
fn message_kind(frame: &Bytes) -> Option<(u64, Reader)> {
    let mut r = Reader::new(frame.clone());
    r.read_var_bytes().ok()?;
    let k = r.read_var_uint().ok()?;
    Some((k, r))
}

/// Classifies a client frame (Hocuspocus framing) without decoding its payload.
fn tracked(frame: &Bytes) -> Tracked {
    match message_kind(frame) {
        Some((kind::AUTH, _)) => Tracked::Auth,
        Some((kind::AWARENESS, _)) => Tracked::Awareness,
        Some((kind::SYNC | kind::SYNC_REPLY, mut rest)) => match rest.read_var_uint() {
            Ok(0) => Tracked::Step1,
            Ok(1 | 2) => Tracked::Update,
            _ => Tracked::Other,
        },
        _ => Tracked::Other,
    }
}

/// The sub-type of an Auth message that says `Authenticated`.
const AUTHENTICATED: u64 = 2;

impl Replay {
    /// Records a client frame; false when the unacknowledged updates exceed `max_bytes`.
    fn record(&mut self, frame: &Bytes, max_bytes: usize) -> bool {
        match tracked(frame) {
            Tracked::Auth => self.auth = Some(frame.clone()),
            Tracked::Step1 => self.step1 = Some(frame.clone()),
            Tracked::Awareness => self.awareness = Some(frame.clone()),
            Tracked::Update => {
                self.unacked_bytes += frame.len();
                self.unacked.push_back(frame.clone());
                return self.unacked_bytes <= max_bytes;
            }
            Tracked::Other => {}
        }
        true
    }

    /// An owner acknowledged the oldest update.
    fn acked(&mut self) {
        if let Some(f) = self.unacked.pop_front() {
            self.unacked_bytes -= f.len();
        }
    }

    /// The frames a new owner gets, in order; `None` without an Auth frame to send.
    fn frames(&self) -> Option<Vec<Bytes>> {
        let mut v = vec![self.auth.clone()?];
        v.extend(self.step1.clone());
        v.extend(self.unacked.iter().cloned());
        v.extend(self.awareness.clone());
        Some(v)
    }
}

impl EdgeClient {
    fn state(&self) -> MutexGuard<'_, EdgeState> {
        // std Mutex: every critical section is bookkeeping and non-blocking sends
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The owner currently serving the client.
    pub(super) fn owner(&self) -> NodeAddr {
        self.state().owner.clone()
    }
}

impl Cluster {
    fn edge_client(&self, conn: &ConnId) -> Option<Arc<EdgeClient>> {
        lock_map(&self.edge_sessions).get(conn).cloned()
    }

    /// Attaches a client address to a remote owner: registers the client and sends `open`.
    /// Fails when the owner is gone (its routes are invalidated) or when the publish failed
    /// (nothing is known about the owner: only this client is given up, and the owner is told
    /// in case the `open` reached it).
    async fn open_remote(
        &self,
        owner: &NodeAddr,
        doc: &str,
        meta: OpenMeta,
        outbox: Outbox,
        authenticated: Arc<AtomicBool>,
    ) -> Result<Arc<EdgeClient>, RouteError> {
        let session = Session {
            conn: ConnId::generate(),
            doc: doc.to_owned(),
            epoch: 0,
        };
        let client = Arc::new(EdgeClient {
            doc: doc.to_owned(),
            outbox,
            authenticated,
            meta: meta.clone(),
            state: Mutex::new(EdgeState {
                owner: owner.clone(),
                session: session.clone(),
                backlog: hearth_proxy::Backlog::new(),
                replay: Some(Replay::default()),
                parked: None,
                swallow_authenticated: false,
                rehomes: 0,
                closed: false,
            }),
        });
        lock_map(&self.edge_sessions).insert(session.conn, client.clone());
        self.metrics.edge_sessions.inc();
        let open = Body::Open {
            session: session.clone(),
            meta,
        };
        match self.send(owner, open).await {
            Ok(0) => {
                warn!(doc, owner = %owner, "owner unreachable; forgetting its routes");
                self.routes.invalidate_node(owner);
                self.forget_edge(&session.conn);
                Err(format!("owner {owner} is unreachable").into())
            }
            Ok(_) => Ok(client),
            Err(e) => {
                // the open may have reached the owner: tell it the client is gone
                self.detach_remote(&client);
                Err(format!("cannot open a session on owner {owner}: {e}").into())
            }
        }
    }

    /// Forwards a raw client frame to the owner, charging it to the client's `edge_out` queue
    /// (see [`flow`]), or parks it while the client moves to a new owner. True when the frame
    /// was handed on, or dropped because the client is being closed already: a client that has
    /// its limit of frames waiting is shed (its socket gets a close with
    /// [`Close::TryAgainLater`], the owner a `detach`). False when the transport refused the
    /// frame: the caller closes the socket.
    fn forward(&self, client: &EdgeClient, frame: Bytes) -> bool {
        let mut st = client.state();
        if st.closed {
            return true;
        }
        // what is waiting towards the owner: parked frames while moving, else the transport's
        let queued = match &mut st.parked {
            Some(parked) => {
                // recorded for a later move once it is sent (after the replay)
                parked.bytes += frame.len();
                parked.frames.push(frame);
                if !self.limits.full(parked.bytes, parked.frames.len()) {
                    return true;
                }
                (parked.bytes, parked.frames.len())
            }
            None => {
                let queued = (st.backlog.bytes(), st.backlog.envelopes());
                if !self.limits.full(queued.0, queued.1) {
                    self.record(&mut st, client, &frame);
                    return self.send_frame(&st, client, frame);
                }
                queued
            }
        };
        let (owner, session) = (st.owner.clone(), st.session.clone());
        drop(st);
        if self.forget_edge(&session.conn) {
            self.shed_edge_session(&owner, &session, client, queued);
        }
        true
    }

    /// Keeps what a later move would replay of a frame sent to the owner.
    fn record(&self, st: &mut EdgeState, client: &EdgeClient, frame: &Bytes) {
        if let Some(replay) = &mut st.replay
            && !replay.record(frame, self.limits.bytes)
        {
            debug!(doc = %client.doc, "unacknowledged updates beyond the replay bound; this client would be reset on a change of owner");
            st.replay = None;
        }
    }

    /// Queues one client frame to the client's current owner.
    fn send_frame(&self, st: &EdgeState, client: &EdgeClient, frame: Bytes) -> bool {
        let body = Body::Frame {
            session: st.session.clone(),
            data: frame.to_vec(),
        };
        match self
            .transport
            .start_send_counted(&st.owner, body, &st.backlog)
        {
            Ok(_) => {
                self.metrics
                    .envelopes_out
                    .with_label_values(&["frame"])
                    .inc();
                true
            }
            Err(e) => {
                warn!(to = %st.owner, doc = %client.doc, error = %e, kind = "frame", "cannot queue envelope");
                false
            }
        }
    }

    /// A frame from `from` for the client of `conn`: passed to its socket unless it comes from
    /// an owner that no longer serves it, or is a new owner's repeated `Authenticated`.
    pub(super) fn deliver_out(&self, from: &NodeAddr, conn: &ConnId, data: Bytes) {
        let Some(client) = self.edge_client(conn) else {
            return;
        };
        let mut st = client.state();
        if &st.owner != from {
            return;
        }
        st.rehomes = 0;
        match message_kind(&data) {
            Some((kind::SYNC_STATUS, _)) => {
                if let Some(replay) = &mut st.replay {
                    replay.acked();
                }
            }
            Some((kind::AUTH, mut rest)) => {
                // only the answer to a replayed Auth is swallowed, and only if it is positive
                let swallow = std::mem::take(&mut st.swallow_authenticated);
                if rest.read_var_uint() == Ok(AUTHENTICATED) {
                    client.authenticated.store(true, Ordering::Release);
                    if swallow {
                        return;
                    }
                }
            }
            _ => {}
        }
        client.outbox.send(data);
    }

    /// A client here filled a queue towards its owner: close it with [`Close::TryAgainLater`]
    /// and detach it from the owner. The caller removed it from the table.
    fn shed_edge_session(
        &self,
        owner: &NodeAddr,
        session: &Session,
        client: &EdgeClient,
        (bytes, frames): (usize, usize),
    ) {
        self.metrics.shed.with_label_values(&["edge_out"]).inc();
        warn!(
            node = %self.me,
            doc = %session.doc,
            owner = %owner,
            queued_bytes = bytes,
            queued_frames = frames,
            "client sends faster than its frames reach the owner; shedding it"
        );
        client
            .outbox
            .control(Outgoing::CloseSocket(Close::TryAgainLater));
        self.post(
            owner,
            Body::Detach {
                session: session.clone(),
                reason: "shed".into(),
            },
        );
    }

    /// The client left: tell the owner and forget it.
    fn detach_remote(&self, client: &EdgeClient) {
        let (owner, session) = {
            let st = client.state();
            (st.owner.clone(), st.session.clone())
        };
        if self.forget_edge(&session.conn) {
            self.post(
                &owner,
                Body::Detach {
                    session,
                    reason: "client gone".into(),
                },
            );
        }
    }

    /// True when the client of `conn` is here and served by `owner`.
    pub(super) fn edge_owned_by(&self, conn: &ConnId, owner: &NodeAddr) -> bool {
        self.edge_client(conn).is_some_and(|c| &c.owner() == owner)
    }

    /// Removes a client from the table; false when it was not there.
    ///
    /// Lock order: the table, then a client's state, never the other way round.
    pub(super) fn forget_edge(&self, conn: &ConnId) -> bool {
        self.remove_edge(conn).is_some()
    }

    fn remove_edge(&self, conn: &ConnId) -> Option<Arc<EdgeClient>> {
        let removed = lock_map(&self.edge_sessions).remove(conn)?;
        self.metrics.edge_sessions.dec();
        removed.state().closed = true;
        Some(removed)
    }

    /// Closes a client here with `close` (the caller says why in `reason`, a metric label).
    pub(super) fn close_edge(&self, conn: &ConnId, close: Close, reason: Option<&str>) {
        if let Some(client) = self.remove_edge(conn) {
            if let Some(reason) = reason {
                self.metrics.resyncs.with_label_values(&[reason]).inc();
                self.routes.invalidate(&client.doc);
            }
            client.outbox.control(Outgoing::CloseSocket(close));
        }
    }

    /// Resets (closes with 4205) every client here attached to a document owned by `owner`.
    pub(super) fn reset_edges_of(&self, owner: Option<&NodeAddr>, reason: &str) {
        for conn in self.edge_conns_of(owner) {
            self.close_edge(&conn, Close::ResetConnection, Some(reason));
        }
    }

    /// The clients here served by `owner` (every client here for `None`).
    fn edge_conns_of(&self, owner: Option<&NodeAddr>) -> Vec<ConnId> {
        lock_map(&self.edge_sessions)
            .iter()
            .filter(|(_, c)| owner.is_none_or(|o| &c.owner() == o))
            .map(|(k, _)| *k)
            .collect()
    }

    /// Moves every client here served by `owner` (which is gone) to the documents' new owners,
    /// keeping their sockets open (the module's description).
    pub(super) fn rehome_edges_of(self: &Arc<Self>, shared: &Arc<Shared>, owner: &NodeAddr) {
        self.routes.invalidate_node(owner);
        for conn in self.edge_conns_of(Some(owner)) {
            self.rehome(shared, conn, "owner_gone");
        }
    }

    /// Moves one client to its document's current owner in a task of its own; its frames park
    /// meanwhile. A client that cannot be moved is reset (`reason` labels the reset).
    pub(super) fn rehome(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        conn: ConnId,
        reason: &'static str,
    ) {
        let Some(client) = self.edge_client(&conn) else {
            return;
        };
        {
            let mut st = client.state();
            if st.parked.is_some() {
                return; // moving already
            }
            st.rehomes += 1;
            if st.replay.is_none() || st.rehomes > MAX_REHOMES {
                drop(st);
                self.metrics.rehomes.with_label_values(&["reset"]).inc();
                self.close_edge(&conn, Close::ResetConnection, Some(reason));
                return;
            }
            st.parked = Some(Parked::default());
        }
        self.routes.invalidate(&client.doc);
        let (me, shared) = (self.clone(), Arc::downgrade(shared));
        tokio::spawn(
            async move {
                let started = Instant::now();
                let moved = match shared.upgrade() {
                    Some(shared) => me.move_client(&shared, &client).await,
                    None => false,
                };
                if moved {
                    me.metrics.rehomes.with_label_values(&["moved"]).inc();
                    info!(doc = %client.doc, owner = %client.owner(), ms = started.elapsed().as_millis() as u64, "client moved to the document's new owner");
                } else {
                    me.metrics.rehomes.with_label_values(&["reset"]).inc();
                    let conn = client.state().session.conn;
                    me.close_edge(&conn, Close::ResetConnection, Some(reason));
                }
            }
            .in_current_span(),
        );
    }

    /// Routes the client's document again and opens a session for it on the owner (possibly
    /// this node), then replays and un-parks. False when it could not be done.
    async fn move_client(&self, shared: &Shared, client: &Arc<EdgeClient>) -> bool {
        let mut owner = None;
        for _ in 0..REROUTE_ATTEMPTS {
            match self.route(&shared.docs.registry, &client.doc).await {
                Ok(Home::Here) => owner = Some(self.me.clone()),
                Ok(Home::Node(o)) if o != client.owner() => owner = Some(o),
                // the lock still names the old owner: wait for the take-over or the expiry
                Ok(Home::Node(_)) => {
                    self.routes.invalidate(&client.doc);
                }
                Err(e) => {
                    debug!(doc = %client.doc, error = %e, "cannot route while moving a client")
                }
            }
            if owner.is_some() || shared.shutdown.is_cancelled() {
                break;
            }
            tokio::time::sleep(REROUTE_PAUSE).await;
        }
        let Some(owner) = owner else {
            return false;
        };
        let session = Session {
            conn: ConnId::generate(),
            doc: client.doc.clone(),
            epoch: 0,
        };
        {
            let mut map = lock_map(&self.edge_sessions);
            let old = client.state().session.conn;
            if map.remove(&old).is_none() {
                return true; // the client left meanwhile
            }
            map.insert(session.conn, client.clone());
            let mut st = client.state();
            st.owner = owner.clone();
            st.session = session.clone();
            st.backlog = hearth_proxy::Backlog::new();
        }
        let open = Body::Open {
            session: session.clone(),
            meta: client.meta.clone(),
        };
        match self.send(&owner, open).await {
            Ok(0) => return false,
            Ok(_) => {}
            Err(_) => {
                // the open may have reached the owner: tell it the client is gone
                self.post(
                    &owner,
                    Body::Detach {
                        session,
                        reason: "open failed".into(),
                    },
                );
                return false;
            }
        }
        let mut st = client.state();
        if st.closed {
            // the client left meanwhile; its detach may have overtaken the open
            self.post(
                &owner,
                Body::Detach {
                    session,
                    reason: "client gone".into(),
                },
            );
            return true;
        }
        let Some(frames) = st.replay.as_ref().and_then(Replay::frames) else {
            return false;
        };
        let parked = st.parked.take().map(|p| p.frames).unwrap_or_default();
        // a client that was answered already gets no second answer; one that was not (its
        // old owner refused the open) gets the new owner's
        st.swallow_authenticated = client.authenticated.load(Ordering::Acquire);
        if !frames.into_iter().all(|f| self.send_frame(&st, client, f)) {
            return false;
        }
        parked.into_iter().all(|f| {
            self.record(&mut st, client, &f);
            self.send_frame(&st, client, f)
        })
    }
}

/// The cluster as the connection layer's [`Placement`]: routing through the lock and the route
/// cache, remote documents reached through [`EdgeLink`]s.
#[derive(Debug)]
pub(crate) struct ClusterPlacement {
    cluster: Arc<Cluster>,
    docs: Arc<DocServices>,
}

impl ClusterPlacement {
    /// Placement through `cluster`, for the documents of `docs`.
    pub(crate) fn new(cluster: Arc<Cluster>, docs: Arc<DocServices>) -> Self {
        ClusterPlacement { cluster, docs }
    }
}

#[async_trait::async_trait]
impl Placement for ClusterPlacement {
    async fn route(&self, doc: &str, client: LinkClient<'_>) -> Result<Route, RouteError> {
        let owner = match Box::pin(self.cluster.route(&self.docs.registry, doc)).await? {
            Home::Here => return Ok(Route::Local),
            Home::Node(owner) => owner,
        };
        let request = client.request;
        let meta = OpenMeta {
            path: request.path().to_owned(),
            query: request.query().to_owned(),
            headers: forwarded_headers(request),
            remote: request.remote_addr().map(|a| a.to_string()),
            provider_version: None,
        };
        let edge = self
            .cluster
            .open_remote(
                &owner,
                doc,
                meta,
                client.outbox.clone(),
                client.authenticated.clone(),
            )
            .await?;
        Ok(Route::Remote(Box::new(EdgeLink {
            cluster: self.cluster.clone(),
            client: edge,
        })))
    }

    fn release_unused(&self, doc: &str) {
        self.cluster.drop_unused_claim(&self.docs.registry, doc);
    }
}

/// One client address proxied from this node (its edge) to the document's owner.
struct EdgeLink {
    cluster: Arc<Cluster>,
    client: Arc<EdgeClient>,
}

impl std::fmt::Debug for EdgeLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeLink")
            .field("doc", &self.client.doc)
            .finish_non_exhaustive()
    }
}

impl Link for EdgeLink {
    fn forward(&self, frame: Bytes) -> bool {
        self.cluster.forward(&self.client, frame)
    }

    fn detach(&self) {
        self.cluster.detach_remote(&self.client);
    }
}

/// Request headers worth forwarding to an owner (hooks may read them); cookies and
/// authorization are included because `on_authenticate` may need them, but hop-by-hop and
/// WebSocket handshake headers are not.
fn forwarded_headers(req: &RequestInfo) -> Vec<(String, String)> {
    const SKIP: [&str; 8] = [
        "connection",
        "upgrade",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "host",
        "content-length",
        "transfer-encoding",
    ];
    req.headers()
        .filter(|(k, _)| !SKIP.contains(k))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::protocol::message::ServerMessage;

    fn client_frame(kind: u64, rest: &[u8]) -> Bytes {
        let mut v = vec![3, b'd', b'o', b'c'];
        v.push(kind as u8);
        v.extend_from_slice(rest);
        Bytes::from(v)
    }

    #[test]
    fn client_frames_are_classified_without_decoding() {
        assert_eq!(tracked(&client_frame(kind::AUTH, &[0, 0])), Tracked::Auth);
        assert_eq!(
            tracked(&client_frame(kind::SYNC, &[0, 1, 0])),
            Tracked::Step1
        );
        assert_eq!(tracked(&client_frame(kind::SYNC, &[1, 0])), Tracked::Update);
        assert_eq!(tracked(&client_frame(kind::SYNC, &[2, 0])), Tracked::Update);
        assert_eq!(
            tracked(&client_frame(kind::SYNC_REPLY, &[1, 0])),
            Tracked::Update
        );
        assert_eq!(
            tracked(&client_frame(kind::AWARENESS, &[0])),
            Tracked::Awareness
        );
        assert_eq!(
            tracked(&client_frame(kind::STATELESS, &[0])),
            Tracked::Other
        );
        // truncated or hostile frames are never tracked and never panic
        for hostile in [&[][..], &[200], &[0xff; 12], &[3, b'd']] {
            assert_eq!(tracked(&Bytes::copy_from_slice(hostile)), Tracked::Other);
        }
    }

    #[test]
    fn server_frames_are_recognised() {
        let status = ServerMessage::SyncStatus(true).frame(Some("doc"));
        assert!(matches!(
            message_kind(&status),
            Some((kind::SYNC_STATUS, _))
        ));
        let authed = ServerMessage::Authenticated { read_only: false }.frame(Some("doc"));
        let (k, mut rest) = message_kind(&authed).unwrap();
        assert_eq!((k, rest.read_var_uint()), (kind::AUTH, Ok(AUTHENTICATED)));
        let denied = ServerMessage::PermissionDenied("no").frame(Some("doc"));
        let (k, mut rest) = message_kind(&denied).unwrap();
        assert_eq!(k, kind::AUTH);
        assert_ne!(rest.read_var_uint(), Ok(AUTHENTICATED));
    }

    #[test]
    fn replay_keeps_auth_step1_unacknowledged_updates_and_awareness_in_order() {
        let mut r = Replay::default();
        assert!(
            r.frames().is_none(),
            "nothing to replay without an Auth frame"
        );
        let auth = client_frame(kind::AUTH, &[0, 0]);
        let step1 = client_frame(kind::SYNC, &[0, 1, 0]);
        let u1 = client_frame(kind::SYNC, &[2, 1, 1]);
        let u2 = client_frame(kind::SYNC, &[2, 1, 2]);
        let u3 = client_frame(kind::SYNC, &[2, 1, 3]);
        let aw1 = client_frame(kind::AWARENESS, &[1]);
        let aw2 = client_frame(kind::AWARENESS, &[2]);
        for f in [&auth, &step1, &u1, &aw1, &u2, &aw2, &u3] {
            assert!(r.record(f, 1 << 20));
        }
        r.acked();
        assert_eq!(
            r.frames().unwrap(),
            vec![auth, step1, u2.clone(), u3.clone(), aw2]
        );
        assert_eq!(r.unacked_bytes, u2.len() + u3.len());
        r.acked();
        r.acked();
        r.acked(); // more acknowledgements than updates change nothing
        assert_eq!(r.unacked_bytes, 0);
        assert!(!r.record(&client_frame(kind::SYNC, &[2, 3, 0, 0, 0]), 4));
    }
}
