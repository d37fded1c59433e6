//! The edge side: clients connected here whose documents are owned by another node.

use super::*;
use crate::connection::placement::{Link, LinkClient, Placement, Route, RouteError};
use crate::doc::services::DocServices;
use crate::request::RequestInfo;

impl Cluster {
    /// Attaches a client address to a remote owner: registers the session and sends `open`.
    /// Returns the session, or `None` when the owner is unreachable (route invalidated).
    async fn open_remote(
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
    fn forward(&self, owner: &NodeAddr, session: &Session, frame: Bytes) -> bool {
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
    fn detach_remote(&self, owner: &NodeAddr, session: &Session) {
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
            path: request.path.clone(),
            query: request.query.clone(),
            headers: forwarded_headers(request),
            remote: request.remote_addr.map(|a| a.to_string()),
            provider_version: None,
        };
        let session = self
            .cluster
            .open_remote(
                &owner,
                doc,
                meta,
                client.outbox.clone(),
                client.authenticated.clone(),
            )
            .await
            .ok_or_else(|| format!("owner {owner} is unreachable"))?;
        Ok(Route::Remote(Box::new(EdgeLink {
            cluster: self.cluster.clone(),
            owner,
            session,
        })))
    }

    fn release_unused(&self, doc: &str) {
        self.cluster.drop_unused_claim(&self.docs.registry, doc);
    }
}

/// One client address proxied from this node (its edge) to the document's owner.
#[derive(Debug)]
struct EdgeLink {
    cluster: Arc<Cluster>,
    owner: NodeAddr,
    session: Session,
}

impl Link for EdgeLink {
    fn forward(&self, frame: Bytes) -> bool {
        self.cluster.forward(&self.owner, &self.session, frame)
    }

    fn detach(&self) {
        self.cluster.detach_remote(&self.owner, &self.session);
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
    req.headers
        .iter()
        .filter(|(k, _)| !SKIP.contains(&k.as_str()))
        .cloned()
        .collect()
}
