//! The owner side: clients of other nodes attached to documents owned here, each served by
//! a stand-in socket.

use super::*;
use crate::connection::hocuspocus::serve_stand_in;
use crate::connection::stand_in::ToEdge;
use crate::request::RequestInfo;

impl Cluster {
    /// A client of `from` opens a document here. The session is registered at once, so the
    /// frames that follow the open queue behind it; whether this node owns the document (a
    /// Redis round trip away, or a claim) is decided in a task of its own, so one client's open
    /// never holds up the envelopes of every other session on the inbox.
    pub(super) fn on_open(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        from: NodeAddr,
        session: Session,
        meta: OpenMeta,
    ) {
        let (tx, rx) = flow::remote_inbox(self.limits);
        if !matches!(
            lock_map(&self.owner_sessions)
                .insert((from.clone(), session.conn), OwnerSession::Live(tx)),
            Some(OwnerSession::Live(_))
        ) {
            self.metrics.owner_sessions.inc();
        }
        let (me, shared) = (self.clone(), shared.clone());
        tokio::spawn(
            async move {
                let owns = match me.route(&shared.docs.registry, &session.doc).await {
                    Ok(Home::Here) => true,
                    Ok(Home::Node(_)) | Err(_) => false,
                };
                if !owns || shared.draining.load(Ordering::Acquire) {
                    debug!(doc = %session.doc, edge = %from, "refusing open: not the owner");
                    // the edge is told below: the client's frames on their way are dropped
                    me.remote_ended(&from, session.conn, true);
                    me.post(
                        &from,
                        Body::NotOwner {
                            session,
                            holder: None,
                        },
                    );
                    return;
                }
                me.spawn_stand_in(shared, from, session, meta, rx);
            }
            .in_current_span(),
        );
    }

    /// Serves a client of `edge` here: a stand-in socket fed by `rx`, answering through an
    /// [`OwnerEdge`], tracked with the node's sockets.
    fn spawn_stand_in(
        self: Arc<Self>,
        shared: Arc<Shared>,
        edge: NodeAddr,
        session: Session,
        meta: OpenMeta,
        rx: RemoteInboxRx,
    ) {
        let id: Arc<str> = Arc::from(session.conn.as_uuid().to_string());
        let span = info_span!("remote", socket = %id, doc = %session.doc, edge = %edge, node = %shared.config.node_id);
        let request = Arc::new(RequestInfo::new(
            &meta.path,
            &meta.query,
            meta.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            meta.remote.and_then(|r| r.parse().ok()),
        ));
        let to_edge = OwnerEdge {
            cluster: self,
            edge,
            session,
            backlog: hearth_proxy::Backlog::new(),
        };
        let tasks = shared.sockets.clone();
        tasks.spawn(serve_stand_in(shared, id, request, rx, to_edge).instrument(span));
    }

    /// True while a remote client's `owner_out` queue (`backlog`, see [`flow`]) is full: its
    /// stand-in socket sends nothing more until Redis has taken some of it.
    fn out_full(&self, backlog: &hearth_proxy::Backlog) -> bool {
        self.limits.full(backlog.bytes(), backlog.envelopes())
    }

    /// Resolves once a remote client's `owner_out` queue has room again.
    async fn out_room(&self, backlog: &hearth_proxy::Backlog) {
        backlog.below(self.limits.bytes, self.limits.frames).await;
    }

    /// Sends a frame to a remote client (owner side), charged to its `owner_out` queue. A frame
    /// never goes missing while the client stays: when it cannot be queued, the error is the
    /// close the client's stand-in socket must end with. A frame beyond
    /// `max_proxied_frame_bytes` cannot cross: the client is reset (it may reconnect to this
    /// node directly).
    fn send_out(
        &self,
        edge: &NodeAddr,
        session: &Session,
        backlog: &hearth_proxy::Backlog,
        frame: &Bytes,
    ) -> Result<(), Close> {
        match self.forward_out(edge, session, backlog, frame) {
            Ok(()) => Ok(()),
            Err(hearth_proxy::ProxyError::FrameTooLarge { size, max }) => {
                warn!(
                    edge = %edge,
                    doc = %session.doc,
                    size,
                    max,
                    "frame for a client on another node exceeds max_proxied_frame_bytes; \
                     resetting the client"
                );
                self.metrics
                    .resyncs
                    .with_label_values(&["frame_too_large"])
                    .inc();
                Err(Close::ResetConnection)
            }
            Err(hearth_proxy::ProxyError::Clogged) => {
                warn!(node = %self.me, to = %edge, doc = %session.doc, kind = "out", "outbound envelope queue is full; shedding the client");
                self.metrics.shed.with_label_values(&["owner_out"]).inc();
                Err(Close::TryAgainLater)
            }
            Err(e) => {
                warn!(to = %edge, doc = %session.doc, error = %e, kind = "out", "cannot queue envelope; resetting the client");
                Err(Close::ResetConnection)
            }
        }
    }

    /// Queues an `out` for a remote client, charged to its `owner_out` queue; no side effects
    /// when it fails.
    fn forward_out(
        &self,
        edge: &NodeAddr,
        session: &Session,
        backlog: &hearth_proxy::Backlog,
        frame: &Bytes,
    ) -> Result<(), hearth_proxy::ProxyError> {
        let body = Body::Out {
            session: session.clone(),
            data: frame.to_vec(),
        };
        self.transport.start_send_counted(edge, body, backlog)?;
        self.metrics.envelopes_out.with_label_values(&["out"]).inc();
        Ok(())
    }

    /// Ends a remote client's session with a close (owner side).
    pub(super) fn close_remote(&self, edge: &NodeAddr, session: &Session, how: Close) {
        self.post(
            edge,
            Body::CloseDoc {
                session: session.clone(),
                close: CloseDoc {
                    code: how.code(),
                    reason: how.reason().to_owned(),
                    resync: true,
                },
            },
        );
    }

    /// A remote socket task ended. `told_edge`: it sent the edge a `close_doc`, so frames of
    /// the client still on their way are dropped quietly for a while.
    pub(super) fn remote_ended(&self, edge: &NodeAddr, conn: ConnId, told_edge: bool) {
        let key = (edge.clone(), conn);
        let mut map = lock_map(&self.owner_sessions);
        let was_live = matches!(map.get(&key), Some(OwnerSession::Live(_)));
        if told_edge {
            map.insert(key, OwnerSession::Ended(Instant::now()));
        } else if was_live {
            map.remove(&key);
        }
        drop(map);
        if was_live {
            self.metrics.owner_sessions.dec();
        }
    }

    /// The queue of a live remote client's stand-in socket.
    pub(super) fn owner_inbox(&self, edge: &NodeAddr, conn: ConnId) -> Option<RemoteInbox> {
        match lock_map(&self.owner_sessions).get(&(edge.clone(), conn)) {
            Some(OwnerSession::Live(tx)) => Some(tx.clone()),
            _ => None,
        }
    }

    /// A remote client filled its `owner_in` queue: shed it. Its stand-in socket ends with
    /// [`Close::TryAgainLater`] and tells the edge; frames of it still arriving are dropped quietly.
    pub(super) fn shed_owner_session(
        &self,
        edge: &NodeAddr,
        session: &Session,
        inbox: &RemoteInbox,
    ) {
        self.metrics.shed.with_label_values(&["owner_in"]).inc();
        warn!(
            node = %self.me,
            doc = %session.doc,
            edge = %edge,
            "client of another node sends faster than its document takes it; shedding it"
        );
        inbox.control(StandInInput::Shed);
        self.remote_ended(edge, session.conn, true);
    }

    pub(super) fn reset_owner_sessions_of(&self, edge: Option<&NodeAddr>, reason: &str) {
        let victims: Vec<RemoteInbox> = lock_map(&self.owner_sessions)
            .iter()
            .filter(|((e, _), _)| edge.is_none_or(|x| e == x))
            .filter_map(|(_, s)| match s {
                OwnerSession::Live(tx) => Some(tx.clone()),
                OwnerSession::Ended(_) => None,
            })
            .collect();
        for tx in victims {
            self.metrics.resyncs.with_label_values(&[reason]).inc();
            tx.control(StandInInput::Reset);
        }
    }

    /// Resets the one proxied client of `session` on the link with `peer`: here at the edge
    /// (close 4205), or its attachment here at the owner (ends with 4205). False when it is
    /// already gone.
    pub(super) fn reset_session(&self, peer: &NodeAddr, session: &Session, reason: &str) -> bool {
        if self.edge_owned_by(&session.conn, peer) {
            self.close_edge(&session.conn, Close::ResetConnection, Some(reason));
            return true;
        }
        match self.owner_inbox(peer, session.conn) {
            Some(tx) if tx.control(StandInInput::Reset) => {
                self.metrics.resyncs.with_label_values(&[reason]).inc();
                true
            }
            _ => false,
        }
    }
}

/// A stand-in socket's way back to its client's edge: `out` envelopes charged to the client's
/// `owner_out` queue (`backlog`, see [`flow`]).
struct OwnerEdge {
    cluster: Arc<Cluster>,
    edge: NodeAddr,
    session: Session,
    backlog: hearth_proxy::Backlog,
}

impl ToEdge for OwnerEdge {
    fn is_full(&self) -> bool {
        self.cluster.out_full(&self.backlog)
    }

    async fn room(&self) {
        self.cluster.out_room(&self.backlog).await;
    }

    fn send(&self, frame: &Bytes) -> Result<(), Close> {
        self.cluster
            .send_out(&self.edge, &self.session, &self.backlog, frame)
    }

    fn try_forward(&self, frame: &Bytes) -> bool {
        !self.cluster.out_full(&self.backlog)
            && self
                .cluster
                .forward_out(&self.edge, &self.session, &self.backlog, frame)
                .is_ok()
    }

    fn ended(&self, close: Option<Close>) {
        self.cluster
            .remote_ended(&self.edge, self.session.conn, close.is_some());
        if let Some(how) = close {
            self.cluster.close_remote(&self.edge, &self.session, how);
        }
    }
}

/// The document layer's [`Burst`](crate::doc::services::Burst) in a cluster: while a document
/// broadcasts, the transport's writer waits, so the `out`s for the clients of one node leave
/// together, as one `fan`.
#[derive(Debug)]
pub(crate) struct TransportBurst(pub(crate) Arc<Cluster>);

impl crate::doc::services::Burst for TransportBurst {
    fn begin(&self) -> crate::doc::services::BurstGuard {
        Box::new(self.0.transport.cork())
    }
}
