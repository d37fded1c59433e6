//! Background work of a member (the inbox dispatcher's task, keepalives, reaping of dead
//! peers) and leaving the cluster.

use super::*;

/// How often an edge checks that the owners of its proxied clients still run.
const OWNER_PROBE: Duration = Duration::from_millis(250);

impl Cluster {
    /// Starts the inbound dispatcher and the keepalive/reaper loop.
    pub(crate) fn spawn_tasks(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        mut inbound: hearth_proxy::InboundReceiver,
    ) {
        let (me, sh) = (self.clone(), shared.clone());
        tokio::spawn(async move {
            // The dispatcher never waits on a queue (module docs); it only lets the other tasks
            // of its worker run now and then, however fast envelopes arrive.
            let mut since_yield = 0;
            while let Some(ev) = inbound.recv().await {
                since_yield += me.dispatch(&sh, ev);
                if since_yield >= DISPATCH_YIELD_BYTES {
                    since_yield = 0;
                    tokio::task::yield_now().await;
                }
            }
        });
        let period = (self.lock_ttl.min(self.proxy_ttl) / 3).max(Duration::from_millis(100));
        self.spawn_every(shared, tokio::time::interval(period), |me, sh| async move {
            me.housekeeping(&sh).await
        });
        let mut probe = tokio::time::interval(OWNER_PROBE);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.spawn_every(
            shared,
            probe,
            |me, sh| async move { me.probe_owners(&sh).await },
        );
    }

    /// Runs `step` at every tick of `tick` until the server is gone or shutting down.
    fn spawn_every<F, Fut>(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        mut tick: tokio::time::Interval,
        step: F,
    ) where
        F: Fn(Arc<Cluster>, Arc<Shared>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let (me, sh) = (self.clone(), Arc::downgrade(shared));
        tokio::spawn(async move {
            loop {
                tick.tick().await;
                let shared = match sh.upgrade() {
                    Some(shared) if !shared.shutdown.is_cancelled() => shared,
                    _ => break,
                };
                step(me.clone(), shared).await;
            }
        });
    }

    /// Checks that the owners of this node's proxied clients still run (their inbox has a
    /// subscriber). The clients of one that exited are moved at once to a new owner (which
    /// takes the document over without waiting for the lock to expire), their sockets kept
    /// open, instead of waiting for the next keepalive. Costs one Redis call per period for
    /// all owners, and nothing while no client here is proxied.
    pub(super) async fn probe_owners(self: &Arc<Self>, shared: &Arc<Shared>) {
        let owners = self.owners_of_edge_sessions();
        let exited = self
            .presence
            .exited_of(self.transport.keys(), &owners, &self.me)
            .await;
        for owner in exited {
            warn!(node = %self.me, owner = %owner, "owner has exited; moving its clients here to the new owners");
            self.rehome_edges_of(shared, &owner);
        }
    }

    /// Distinct owners of the documents this node's clients are proxied to.
    pub(super) fn owners_of_edge_sessions(&self) -> Vec<NodeAddr> {
        let mut v: Vec<NodeAddr> = lock_map(&self.edge_sessions)
            .values()
            .map(|c| c.owner())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Distinct edges whose clients are attached to documents owned here.
    pub(super) fn edges_of_owner_sessions(&self) -> Vec<NodeAddr> {
        let mut v: Vec<NodeAddr> = lock_map(&self.owner_sessions)
            .iter()
            .filter(|(_, s)| matches!(s, OwnerSession::Live(_)))
            .map(|((e, _), _)| e.clone())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Forgets ended remote clients after a lock TTL: by then no frame of theirs is on its way
    /// (a later one is answered with a `close_doc` of its own).
    pub(super) fn forget_ended_owner_sessions(&self) {
        let ttl = self.lock_ttl;
        lock_map(&self.owner_sessions).retain(|_, s| match s {
            OwnerSession::Live(_) => true,
            OwnerSession::Ended(at) => at.elapsed() < ttl,
        });
    }

    pub(super) async fn housekeeping(self: &Arc<Self>, shared: &Arc<Shared>) {
        self.refresh_node_key().await;
        self.forget_ended_owner_sessions();
        for owner in self.owners_of_edge_sessions() {
            // edge → owner keepalive: no receiver means the owner is gone; a failed publish
            // says nothing about it (the silence check below still applies)
            let sent = self.send(&owner, Body::Keepalive { session: None }).await;
            if matches!(sent, Ok(0)) {
                warn!(owner = %owner, "owner unreachable; moving its clients here to the new owners");
                self.rehome_edges_of(shared, &owner);
            } else if !self.heard_from_within(&owner, self.lock_ttl) {
                // an owner silent for longer than its lock could live (frozen, partitioned) no
                // longer owns anything it had; its clients here follow the documents' new owners
                warn!(owner = %owner, "owner silent for longer than the lock TTL; moving its clients here to the new owners");
                self.rehome_edges_of(shared, &owner);
            }
        }
        self.forget_dead_peers();
        let now = Instant::now();
        for edge in self.edges_of_owner_sessions() {
            // owner → edge keepalive, so edges can tell a live owner from a frozen one
            self.post(&edge, Body::Keepalive { session: None });
            let seen = lock_map(&self.peers_seen).get(&edge).copied();
            if seen.is_none_or(|t| now.duration_since(t) > self.proxy_ttl) {
                info!(edge = %edge, "edge silent past proxy_socket_ttl; dropping its attachments");
                self.reset_owner_sessions_of(Some(&edge), "edge_silent");
            }
        }
    }

    /// Drops the per-peer state (`peers_seen`, the transport's sequence and reassembly maps) of
    /// peers that can never send again, so it does not accumulate:
    ///
    /// * a `hearth cluster emit` caller (a fresh identity per run) silent for twice the custom
    ///   event TTL: it gave up waiting for its reply long ago;
    /// * an earlier incarnation of a node we have heard from since under a newer one, silent
    ///   for longer than a lock TTL (a node id runs in one process at a time: the collision
    ///   check).
    ///
    /// A live peer is never forgotten: its next envelope would restart the link's numbering.
    pub(super) fn forget_dead_peers(&self) {
        let dead: Vec<NodeAddr> = {
            let mut seen = lock_map(&self.peers_seen);
            let latest: HashMap<NodeId, (Incarnation, Instant)> =
                seen.iter().fold(HashMap::new(), |mut m, (addr, t)| {
                    let e = m.entry(addr.id.clone()).or_insert((addr.inc, *t));
                    if *t > e.1 {
                        *e = (addr.inc, *t);
                    }
                    m
                });
            let dead: Vec<NodeAddr> = seen
                .iter()
                .filter(|(addr, t)| {
                    let silent = t.elapsed();
                    if addr.id.as_str() == EMITTER_NODE_ID {
                        silent > 2 * self.event_ttl
                    } else {
                        silent > self.lock_ttl
                            && latest.get(&addr.id).is_some_and(|l| l.0 != addr.inc)
                    }
                })
                .map(|(addr, _)| addr.clone())
                .collect();
            for addr in &dead {
                seen.remove(addr);
            }
            self.metrics.peers.set(seen.len() as i64);
            dead
        };
        for addr in dead {
            debug!(peer = %addr, "forgetting a peer that cannot send again");
            self.transport.forget_peer(&addr);
        }
    }

    /// Graceful leave: tell peers, reset proxied clients, stop the node key.
    pub(crate) async fn drain(&self) {
        self.send_broadcast(Body::Draining {
            node: self.me.clone(),
        })
        .await;
    }

    /// Final step of a shutdown: release unused claims, remove the node key, close Redis links.
    pub(crate) async fn leave(&self) {
        let claims: Vec<LockGuard> = lock_map(&self.claims).drain().map(|(_, g)| g).collect();
        for g in claims {
            let _ = g.release().await;
        }
        self.presence.release().await;
        self.transport.shutdown().await;
    }
}
