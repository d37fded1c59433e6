//! [`Placement`]: the connection layer's view of where an authenticated document is served —
//! here, or on another node through a [`Link`]. A single node has no placement (everything is
//! local); in a cluster it is implemented by `cluster/`, so sockets never see Redis, locks or
//! envelopes.

use std::error::Error;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use async_trait::async_trait;
use bytes::Bytes;

use crate::outbox::Outbox;
use crate::request::RequestInfo;

/// Why a document could not be placed (the lock service or the owner is unreachable); the
/// client is reset and reconnects.
pub(crate) type RouteError = Box<dyn Error + Send + Sync>;

/// Where an authenticated document is served.
#[derive(Debug)]
pub(crate) enum Route {
    /// On this node: load and attach.
    Local,
    /// On another node: the client's frames for the address go through this link.
    Remote(Box<dyn Link>),
}

/// The client a remote link is opened for.
#[derive(Debug)]
pub(crate) struct LinkClient<'a> {
    /// The client's upgrade request (the owner's hooks see its path, query and headers).
    pub request: &'a RequestInfo,
    /// Where frames from the owner for the client go.
    pub outbox: &'a Outbox,
    /// Set once the owner answers `Authenticated` (the socket's auth deadline then ends).
    pub authenticated: &'a Arc<AtomicBool>,
}

/// Decides where documents are served.
#[async_trait]
pub(crate) trait Placement: Send + Sync + fmt::Debug {
    /// Where `doc` is served, asked once its client authenticated here (so an unauthenticated
    /// client never makes the node do placement work). When another node serves it, a link
    /// for `client` is opened to that node.
    async fn route(&self, doc: &str, client: LinkClient<'_>) -> Result<Route, RouteError>;

    /// A client of `doc` failed authentication or loading after `route`: give up a claim on
    /// `doc` that no loaded document uses.
    fn release_unused(&self, doc: &str);
}

/// One client address's link to the node that serves its document.
pub(crate) trait Link: Send + Sync + fmt::Debug {
    /// Sends one raw client frame to the owner. False when the link is broken: the caller
    /// resets the client.
    fn forward(&self, frame: Bytes) -> bool;

    /// The client left the document (or the socket closed): tell the owner.
    fn detach(&self);
}
