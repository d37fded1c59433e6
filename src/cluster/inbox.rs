//! The inbox dispatcher: the one consumer of this node's Redis subscription.

use super::*;

/// Approximate bytes the inbox dispatcher handles before it lets other tasks of its worker run.
pub(super) const DISPATCH_YIELD_BYTES: usize = 4 << 20;
/// What one event counts towards [`DISPATCH_YIELD_BYTES`] besides its payload.
const DISPATCH_EVENT_BYTES: usize = 1024;

impl Cluster {
    /// Handles one inbound event. Never waits (the module's invariant): it is the only consumer
    /// of the node's subscription. Returns roughly how many bytes it handled.
    pub(super) fn dispatch(self: &Arc<Self>, shared: &Arc<Shared>, ev: Inbound) -> usize {
        let mut weight = DISPATCH_EVENT_BYTES;
        match ev {
            Inbound::Envelope(env) => {
                if let Body::Frame { data, .. } | Body::Out { data, .. } | Body::Fan { data, .. } =
                    &env.body
                {
                    weight += data.len();
                }
                let from = env.header.from.clone();
                self.metrics
                    .envelopes_in
                    .with_label_values(&[kind_of(&env.body)])
                    .inc();
                if lock_map(&self.peers_seen)
                    .insert(from.clone(), Instant::now())
                    .is_none()
                {
                    self.metrics.peers.inc();
                }
                match env.body {
                    Body::Open { session, meta } => self.on_open(shared, from, session, meta),
                    Body::Frame { session, data } => {
                        let key = (from.clone(), session.conn);
                        let inbox = match lock_map(&self.owner_sessions).get(&key) {
                            Some(OwnerSession::Live(tx)) => Some(Some(tx.clone())),
                            Some(OwnerSession::Ended(_)) => Some(None),
                            None => None,
                        };
                        match inbox {
                            // never waits: a client whose queue is full is shed
                            Some(Some(tx)) => match tx.frame(data) {
                                Ok(()) | Err(Refused::Gone) => {}
                                Err(Refused::Full) => self.shed_owner_session(&from, &session, &tx),
                            },
                            // ended, and the edge was told
                            Some(None) => {}
                            None => self.close_remote(&from, &session, Close::ResetConnection),
                        }
                    }
                    Body::Detach { session, .. } => {
                        let key = (from, session.conn);
                        let mut map = lock_map(&self.owner_sessions);
                        match map.get(&key) {
                            Some(OwnerSession::Live(tx)) => {
                                tx.control(StandInInput::Detach);
                            }
                            Some(OwnerSession::Ended(_)) => {
                                map.remove(&key);
                            }
                            None => {}
                        }
                    }
                    Body::Out { session, data } => {
                        self.deliver_out(&from, &session.conn, Bytes::from(data));
                    }
                    Body::Fan { conns, data, .. } => {
                        // one frame for several clients here: each gets it as if sent alone
                        let data = Bytes::from(data);
                        for conn in &conns {
                            self.deliver_out(&from, conn, data.clone());
                        }
                    }
                    Body::CloseDoc { session, close } => {
                        if self.edge_owned_by(&session.conn, &from) {
                            let close = Close::from_wire(close.code, &close.reason);
                            self.close_edge(&session.conn, close, None);
                        }
                    }
                    Body::NotOwner { session, .. } => {
                        self.routes.invalidate(&session.doc);
                        if self.edge_owned_by(&session.conn, &from) {
                            // ownership moved: follow it instead of closing the client
                            self.rehome(shared, session.conn, "not_owner");
                        }
                    }
                    Body::Released { doc, .. } => {
                        self.routes.invalidate(&doc);
                    }
                    Body::Draining { node } | Body::NodeDown { node } => {
                        self.routes.invalidate_node(&node);
                    }
                    Body::Rpc(req) => {
                        tokio::spawn(self.clone().on_rpc(shared.clone(), from, req));
                    }
                    Body::RpcReply(reply) => {
                        self.rpc.on_reply(reply);
                    }
                    // the transport reassembles parts; it never delivers one
                    Body::Keepalive { .. } | Body::Part { .. } => {}
                }
            }
            Inbound::FrameDropped {
                from,
                session,
                reason,
            } => {
                if self.reset_session(&from, &session, reason.as_str()) {
                    warn!(
                        from = %from,
                        doc = %session.doc,
                        reason = reason.as_str(),
                        "a frame sent in parts was dropped before it was complete; resetting its client"
                    );
                } else {
                    debug!(from = %from, reason = reason.as_str(), "dropped part of a frame for a session already gone");
                }
            }
            Inbound::Gap { from, .. } => {
                warn!(from = %from, "envelopes lost on the link; resetting affected clients");
                self.reset_edges_of(Some(&from), "gap");
                self.reset_owner_sessions_of(Some(&from), "gap");
            }
            Inbound::Lagged { missed } => {
                warn!(
                    missed,
                    "inbound envelopes dropped; resetting every proxied client"
                );
                self.reset_edges_of(None, "lagged");
                self.reset_owner_sessions_of(None, "lagged");
            }
            Inbound::Resubscribed => {
                warn!("resubscribed after a Redis reconnect; resetting every proxied client");
                self.reset_edges_of(None, "resubscribed");
                self.reset_owner_sessions_of(None, "resubscribed");
            }
            Inbound::OutOfOrder { .. } => {
                self.metrics
                    .rejected
                    .with_label_values(&["out_of_order"])
                    .inc();
            }
            Inbound::Rejected { reason, detail } => {
                debug!(reason = reason.as_str(), %detail, "envelope rejected");
                self.metrics
                    .rejected
                    .with_label_values(&[reason.as_str()])
                    .inc();
            }
        }
        weight
    }
}
