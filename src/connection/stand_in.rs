//! Stand-in sockets: on the node that serves a document, a client connected to another node
//! (its edge) is served by the same Hocuspocus state machine as a local socket
//! ([`serve_stand_in`](super::hocuspocus::serve_stand_in)), fed by [`StandInInput`] and
//! answering through a [`ToEdge`]. The cluster owns the session behind both; the connection
//! layer sees only these two.

use std::future::Future;

use bytes::Bytes;

use crate::protocol::Close;

/// Input to a stand-in socket from the client's edge.
#[derive(Debug)]
pub(crate) enum StandInInput {
    /// A raw client frame.
    Frame(Bytes),
    /// The client left (its edge detached).
    Detach,
    /// The link lost envelopes: reset the client.
    Reset,
    /// The client's frames piled up beyond its limits: end it with 1013 "Try Again Later".
    Shed,
}

/// The way from a stand-in socket back to its client's edge.
pub(crate) trait ToEdge: Send + Sync + 'static {
    /// True while the queue towards the edge is full: the stand-in sends nothing more until
    /// [`ToEdge::room`] resolves.
    fn is_full(&self) -> bool;

    /// Resolves once the queue towards the edge has room.
    fn room(&self) -> impl Future<Output = ()> + Send;

    /// Sends one frame for the client. A frame never goes missing while the client stays: the
    /// error is the close the stand-in must end with.
    fn send(&self, frame: &Bytes) -> Result<(), Close>;

    /// Sends one frame now if the queue towards the edge has room; false (with no side
    /// effects) otherwise, and the frame waits in the stand-in's outbox for [`ToEdge::send`].
    /// Called from the sender's task (typically the document's) with the outbox locked.
    fn try_forward(&self, frame: &Bytes) -> bool;

    /// The stand-in ended; with `Some(close)` the client's socket is to be closed that way.
    fn ended(&self, close: Option<Close>);
}
