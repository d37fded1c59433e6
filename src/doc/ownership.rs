//! [`Ownership`]: how the document layer claims a document before it loads and gives the claim
//! back when it unloads. A single node has none (every document is its own); in a cluster it is
//! the per-document Redis lock, implemented by `cluster/` — the document layer never sees Redis.
//!
//! **Invariant:** a document task holds its [`Claim`] from load to unload and stops writing the
//! moment the claim is lost or may have lapsed (the database epoch fences it anyway).

use std::error::Error;
use std::fmt;
use std::future::Future;
use std::pin::Pin;

use async_trait::async_trait;

/// Why a claim could not be decided (the lock service is unreachable, …); only logged.
pub(crate) type ClaimError = Box<dyn Error + Send + Sync>;

/// A future resolving to why a claim was lost (a short, fixed label such as `expired`).
pub(crate) type Lost = Pin<Box<dyn Future<Output = &'static str> + Send>>;

/// The node's side of document ownership.
#[async_trait]
pub(crate) trait Ownership: Send + Sync + fmt::Debug {
    /// Takes this node's claim on `doc` for a load. `Ok(None)`: another node holds it.
    async fn claim(&self, doc: &str) -> Result<Option<Box<dyn Claim>>, ClaimError>;
}

/// One document's ownership, held by its task.
#[async_trait]
pub(crate) trait Claim: Send + Sync + fmt::Debug {
    /// False once the claim is lost or may have lapsed: the task must not write.
    fn is_valid(&self) -> bool;
    /// Resolves when the claim is lost, with the reason.
    fn lost(&self) -> Lost;
    /// The document unloads at `epoch`: give the claim up and let other nodes know.
    async fn release(self: Box<Self>, epoch: i64);
    /// The load failed: give the claim up (nothing was ever served under it).
    async fn abandon(self: Box<Self>);
}
