//! The edge side: clients connected here whose documents are owned by another node.

use super::*;

impl Cluster {
    /// Attaches a client address to a remote owner: registers the session and sends `open`.
    /// Returns the session, or `None` when the owner is unreachable (route invalidated).
    pub(crate) async fn open_remote(
        &self,
        owner: &NodeAddr,
        doc: &str,
        meta: OpenMeta,
        outbox: Outbox,
        authenticated: Arc<AtomicBool>,
    ) -> Option<Session> {
        let session = Session {
            conn: ConnId::generate(),
            doc: doc.to_owned(),
            epoch: 0,
        };
        lock_map(&self.edge_sessions).insert(
            session.conn,
            EdgeSession {
                owner: owner.clone(),
                doc: doc.to_owned(),
                outbox,
                authenticated,
                backlog: hearth_proxy::Backlog::new(),
            },
        );
        self.metrics.edge_sessions.inc();
        if self
            .send(
                owner,
                Body::Open {
                    session: session.clone(),
                    meta,
                },
            )
            .await
            == 0
        {
            warn!(doc, owner = %owner, "owner unreachable; forgetting its routes");
            self.routes.invalidate_node(owner);
            self.forget_edge(&session.conn);
            return None;
        }
        Some(session)
    }

    /// Forwards a raw client frame to the owner, charging it to the client's `edge_out` queue
    /// (see [`flow`]). True when the frame was handed on, or dropped because the client is
    /// being closed already: a client that has its limit of frames waiting there is shed (its
    /// socket gets a close with [`Close::TryAgainLater`], the owner a `detach`), and a client whose session
    /// was reset has a close queued. False when the transport refused the frame: the caller
    /// closes the socket.
    pub(crate) fn forward(&self, owner: &NodeAddr, session: &Session, frame: Bytes) -> bool {
        let backlog = {
            let mut map = lock_map(&self.edge_sessions);
            let Some(s) = map.get(&session.conn) else {
                return true;
            };
            if !self.limits.full(s.backlog.bytes(), s.backlog.envelopes()) {
                s.backlog.clone()
            } else {
                let queued = (s.backlog.bytes(), s.backlog.envelopes());
                let shed = map.remove(&session.conn);
                drop(map);
                if let Some(shed) = shed {
                    self.shed_edge_session(owner, session, shed, queued);
                }
                return true;
            }
        };
        let body = Body::Frame {
            session: session.clone(),
            data: frame.to_vec(),
        };
        match self.transport.start_send_counted(owner, body, &backlog) {
            Ok(_) => {
                self.metrics
                    .envelopes_out
                    .with_label_values(&["frame"])
                    .inc();
                true
            }
            Err(e) => {
                warn!(to = %owner, doc = %session.doc, error = %e, kind = "frame", "cannot queue envelope");
                false
            }
        }
    }

    /// A client here filled its `edge_out` queue: close it with [`Close::TryAgainLater`] and detach it
    /// from the owner.
    pub(super) fn shed_edge_session(
        &self,
        owner: &NodeAddr,
        session: &Session,
        shed: EdgeSession,
        (bytes, frames): (usize, usize),
    ) {
        self.metrics.edge_sessions.dec();
        self.metrics.shed.with_label_values(&["edge_out"]).inc();
        warn!(
            node = %self.me,
            doc = %session.doc,
            owner = %owner,
            queued_bytes = bytes,
            queued_frames = frames,
            "client sends faster than its frames reach the owner; shedding it"
        );
        shed.outbox
            .control(Outgoing::CloseSocket(Close::TryAgainLater));
        self.post(
            owner,
            Body::Detach {
                session: session.clone(),
                reason: "shed".into(),
            },
        );
    }

    /// The client left: tell the owner and forget the session.
    pub(crate) fn detach_remote(&self, owner: &NodeAddr, session: &Session) {
        if self.forget_edge(&session.conn) {
            self.post(
                owner,
                Body::Detach {
                    session: session.clone(),
                    reason: "client gone".into(),
                },
            );
        }
    }

    pub(super) fn forget_edge(&self, conn: &ConnId) -> bool {
        let removed = lock_map(&self.edge_sessions).remove(conn).is_some();
        if removed {
            self.metrics.edge_sessions.dec();
        }
        removed
    }

    /// Resets (closes with 4205) every client here attached to a document owned by `owner`.
    pub(super) fn reset_edges_of(&self, owner: Option<&NodeAddr>, reason: &str) {
        let victims: Vec<EdgeSession> = {
            let mut map = lock_map(&self.edge_sessions);
            let keys: Vec<ConnId> = map
                .iter()
                .filter(|(_, s)| owner.is_none_or(|o| &s.owner == o))
                .map(|(k, _)| *k)
                .collect();
            keys.into_iter().filter_map(|k| map.remove(&k)).collect()
        };
        for s in victims {
            self.metrics.edge_sessions.dec();
            self.metrics.resyncs.with_label_values(&[reason]).inc();
            self.routes.invalidate(&s.doc);
            s.outbox
                .control(Outgoing::CloseSocket(Close::ResetConnection));
        }
    }
}
