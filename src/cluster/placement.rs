//! Placement: where a document is served (here, or by which node), the claims and leases of
//! the documents served here.

use super::*;
use crate::doc::ownership::{Claim, ClaimError, Lost, Ownership};
use crate::doc::registry::Registry;

/// A cached route's owner heard from within this is trusted without asking Redis.
const QUIET: Duration = Duration::from_millis(500);

impl Cluster {
    /// Decides where `doc` is served, claiming its lock when nobody holds it.
    pub(crate) async fn route(&self, registry: &Registry, doc: &str) -> Result<Home, ClusterError> {
        if registry.get(doc).is_some() || lock_map(&self.claims).contains_key(doc) {
            self.metrics.routes.with_label_values(&["local"]).inc();
            return Ok(Home::Here);
        }
        if let Some(r) = self.routes.get(doc)
            && r.owner != self.me
        {
            // Trust a cached route only while the owner is heard from (owners keepalive their
            // edges); a frozen or partitioned owner's routes are re-resolved through the lock.
            // An owner quiet for a moment may have exited: sending its client there would only
            // end in a reset, so ask Redis first.
            if self.heard_from_within(&r.owner, QUIET)
                || (self.heard_from_within(&r.owner, self.lock_ttl)
                    && !self
                        .presence
                        .has_exited(self.transport.keys(), &r.owner, &self.me)
                        .await)
            {
                self.metrics.routes.with_label_values(&["cached"]).inc();
                return Ok(Home::Node(r.owner));
            }
            self.routes.invalidate_node(&r.owner);
        }
        match self.acquire(doc).await? {
            Acquire::Acquired(guard) => {
                self.metrics.routes.with_label_values(&["claimed"]).inc();
                debug!(doc, "claimed ownership");
                lock_map(&self.claims).insert(doc.to_owned(), guard);
                Ok(Home::Here)
            }
            Acquire::HeldBy(h) if h == self.holder => Ok(Home::Here),
            Acquire::HeldBy(h) => {
                self.metrics.routes.with_label_values(&["remote"]).inc();
                let owner = holder_addr(&h)?;
                self.routes.insert(
                    doc,
                    Route {
                        owner: owner.clone(),
                        epoch: 0,
                    },
                );
                Ok(Home::Node(owner))
            }
        }
    }

    /// The lease for a document about to load here: the claim made by [`Cluster::route`], or a
    /// fresh acquisition. `None` when another node owns it.
    async fn lease_for_load(&self, doc: &str) -> Result<Option<LockGuard>, ClusterError> {
        if let Some(g) = lock_map(&self.claims).remove(doc) {
            return Ok(Some(g));
        }
        match self.acquire(doc).await? {
            Acquire::Acquired(g) => Ok(Some(g)),
            Acquire::HeldBy(_) => Ok(None),
        }
    }

    /// Takes the lock on `doc` if it is free, or if its holder's process has exited (its
    /// lease would otherwise block the document until it expires, a whole lock TTL).
    async fn acquire(&self, doc: &str) -> Result<Acquire, ClusterError> {
        if self.draining.load(std::sync::atomic::Ordering::Acquire) {
            return match self.lock.holder(doc).await? {
                Some(h) if h != self.holder => Ok(Acquire::HeldBy(h)),
                _ => Err(ClusterError::Draining),
            };
        }
        let found = self.lock.try_acquire(doc).await?;
        let Acquire::HeldBy(holder) = &found else {
            return Ok(found);
        };
        if *holder == self.holder || !self.has_exited(holder).await {
            return Ok(found);
        }
        let taken = self.lock.try_take_over(doc, holder).await?;
        if matches!(taken, Acquire::Acquired(_)) {
            self.metrics.routes.with_label_values(&["taken_over"]).inc();
            info!(
                node = %self.me,
                doc,
                from = %holder,
                "took over a document whose owner has exited (its inbox has no subscriber)"
            );
        }
        Ok(taken)
    }

    /// True when there is evidence that `holder`'s process has exited: no subscriber on its
    /// inbox. This node's own earlier incarnation, after a restart, is the common case besides
    /// a killed node. (Having heard from it a moment ago proves nothing: it may have died since.)
    async fn has_exited(&self, holder: &HolderId) -> bool {
        let Ok(addr) = holder_addr(holder) else {
            return false;
        };
        self.presence
            .has_exited(self.transport.keys(), &addr, &self.me)
            .await
    }

    /// Releases a claim that no document task took (e.g. the client failed to authenticate).
    pub(super) fn drop_unused_claim(&self, registry: &Registry, doc: &str) {
        if registry.get(doc).is_some() {
            return;
        }
        if let Some(g) = lock_map(&self.claims).remove(doc) {
            tokio::spawn(async move {
                let _ = g.release().await;
            });
        }
    }

    /// Called by a document task that took a lease.
    /// Called by a stopping document task: release the lease (compare-and-delete) and tell
    /// every node to forget the route.
    async fn release(&self, doc: &str, epoch: i64, lease: LockGuard) {
        self.metrics.owned.dec();
        match lease.release().await {
            Ok(_) => self
                .metrics
                .lock_ops
                .with_label_values(&["release", "ok"])
                .inc(),
            Err(e) => {
                self.metrics
                    .lock_ops
                    .with_label_values(&["release", "error"])
                    .inc();
                debug!(doc, error = %e, "lock release failed (it will expire)");
            }
        }
        self.send_broadcast(Body::Released {
            doc: doc.to_owned(),
            epoch,
        })
        .await;
    }
}

/// The cluster as the document layer's [`Ownership`]: a document's claim is its Redis lock.
#[derive(Debug)]
pub(crate) struct LockOwnership(pub Arc<Cluster>);

#[async_trait::async_trait]
impl Ownership for LockOwnership {
    async fn claim(&self, doc: &str) -> Result<Option<Box<dyn Claim>>, ClaimError> {
        let Some(guard) = self.0.lease_for_load(doc).await? else {
            return Ok(None);
        };
        self.0.metrics.owned.inc();
        Ok(Some(Box::new(DocLease {
            doc: doc.to_owned(),
            guard,
            cluster: self.0.clone(),
        })))
    }
}

/// A loaded document's lease, counted in `hearth_cluster_owned_documents` while held.
#[derive(Debug)]
struct DocLease {
    doc: String,
    guard: LockGuard,
    cluster: Arc<Cluster>,
}

#[async_trait::async_trait]
impl Claim for DocLease {
    fn is_valid(&self) -> bool {
        self.guard.is_valid()
    }

    fn lost(&self) -> Lost {
        let status = self.guard.status();
        Box::pin(async move { status.lost().await.as_str() })
    }

    async fn release(self: Box<Self>, epoch: i64) {
        let DocLease {
            doc,
            guard,
            cluster,
        } = *self;
        // compare-and-delete: a lease that is no longer ours is left alone
        cluster.release(&doc, epoch, guard).await;
    }

    async fn abandon(self: Box<Self>) {
        self.cluster.metrics.owned.dec();
        let _ = self.guard.release().await;
    }
}
