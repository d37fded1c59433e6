//! Flow control for proxied clients: what one client behind an edge may have queued between its
//! edge and its document's owner, and what happens when it has more.
//!
//! Three queues carry a proxied client's frames, and each is bounded per client by
//! [`SessionLimits`] (bytes and frames; one frame larger than the byte limit still passes while
//! nothing else is held, so a client that may send a `max_message_bytes` frame can always send
//! one):
//!
//! | queue | side | holds | when full |
//! |---|---|---|---|
//! | `edge_out` | edge | the client's frames in the transport, until Redis answered their publish | the client is **shed** |
//! | `owner_in` | owner | the client's frames from the inbox dispatcher until the document task is done with them | the client is **shed** |
//! | `owner_out` | owner | frames for the client in the transport, until Redis answered their publish | the stand-in socket stops draining its outbox, whose byte bound then disconnects the client (1013 "Slow Reader") |
//!
//! Shedding closes that one client's socket with 1013 "Try Again Later" ([`Close::TryAgainLater`](crate::protocol::Close::TryAgainLater); providers
//! reconnect), detaches it from the owner and counts `hearth_cluster_sessions_shed_total`; an
//! owner that sheds tells the edge with `close_doc`. Nobody else's frames wait behind a shed
//! client: the owner's inbox dispatcher only ever offers a frame to a client's queue
//! ([`RemoteInbox::frame`]) and never waits for room, so one document or one client cannot stall
//! the consumer of the node's Redis subscription.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::connection::stand_in::StandInInput;

/// The most frames one proxied client may have in one of its queues.
const MAX_FRAMES: usize = 256;
/// The least byte limit of one proxied client's queue.
const MIN_BYTES: usize = 4 << 20;

/// Per-client bounds of the queues between an edge and an owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SessionLimits {
    /// Bytes held before the queue counts as full (one frame may cross it).
    pub bytes: usize,
    /// Frames held before the queue counts as full.
    pub frames: usize,
}

impl SessionLimits {
    /// Twice the largest client message, and [`MAX_FRAMES`] frames, but always room for what a
    /// client may queue before it is authenticated plus one message (those frames travel to the
    /// owner at once when its document turns out to be remote); at least 4 MiB.
    pub(crate) fn from_config(config: &Config) -> Self {
        let preauth = config
            .preauth_max_bytes
            .saturating_add(config.max_message_bytes);
        SessionLimits {
            bytes: config
                .max_message_bytes
                .saturating_mul(2)
                .max(preauth)
                .max(MIN_BYTES),
            frames: MAX_FRAMES.max(config.preauth_max_messages.saturating_add(2)),
        }
    }

    /// True when a queue holding `bytes` in `frames` frames takes no further frame.
    pub(crate) fn full(&self, bytes: usize, frames: usize) -> bool {
        bytes >= self.bytes || frames >= self.frames
    }
}

/// Bytes and frames of one client held on the owner.
#[derive(Debug, Default)]
struct Held {
    bytes: AtomicUsize,
    frames: AtomicUsize,
}

/// A frame's bytes, which give their share of the client's `owner_in` queue back once the last
/// reference to them (a slice the document task still decodes, say) is gone.
struct Charged {
    data: Vec<u8>,
    held: Arc<Held>,
}

impl AsRef<[u8]> for Charged {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Charged {
    fn drop(&mut self) {
        self.held.bytes.fetch_sub(self.data.len(), Ordering::AcqRel);
        self.held.frames.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why [`RemoteInbox::frame`] refused a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The client has its limit of frames or bytes on this node: shed it.
    Full,
    /// The stand-in socket has ended.
    Gone,
}

/// The inbox dispatcher's end of the queue into one stand-in socket (`owner_in`). Cheap to
/// clone.
#[derive(Debug, Clone)]
pub(crate) struct RemoteInbox {
    tx: mpsc::UnboundedSender<StandInInput>,
    held: Arc<Held>,
    limits: SessionLimits,
}

/// The stand-in socket's end.
pub(crate) type RemoteInboxRx = mpsc::UnboundedReceiver<StandInInput>;

/// A queue into one stand-in socket, bounded by `limits`.
pub(crate) fn remote_inbox(limits: SessionLimits) -> (RemoteInbox, RemoteInboxRx) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        RemoteInbox {
            tx,
            held: Arc::default(),
            limits,
        },
        rx,
    )
}

impl RemoteInbox {
    /// Queues a client frame, or refuses it (queueing nothing) when the client already holds
    /// its limit here. Never waits.
    pub(crate) fn frame(&self, data: Vec<u8>) -> Result<(), Refused> {
        let bytes = self.held.bytes.load(Ordering::Acquire);
        let frames = self.held.frames.load(Ordering::Acquire);
        if self.limits.full(bytes, frames) {
            return Err(Refused::Full);
        }
        self.held.bytes.fetch_add(data.len(), Ordering::AcqRel);
        self.held.frames.fetch_add(1, Ordering::AcqRel);
        let frame = Bytes::from_owner(Charged {
            data,
            held: self.held.clone(),
        });
        self.tx
            .send(StandInInput::Frame(frame))
            .map_err(|_| Refused::Gone)
    }

    /// Queues a control message (not bounded: a session gets at most a few). False when the
    /// stand-in socket has ended.
    pub(crate) fn control(&self, msg: StandInInput) -> bool {
        self.tx.send(msg).is_ok()
    }

    /// Bytes of the client's frames held on this node now.
    #[cfg(test)]
    fn held_bytes(&self) -> usize {
        self.held.bytes.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn limits() -> SessionLimits {
        SessionLimits {
            bytes: 100,
            frames: 3,
        }
    }

    #[test]
    fn a_frame_holds_its_bytes_until_every_slice_is_gone() {
        let (inbox, mut rx) = remote_inbox(limits());
        inbox.frame(vec![1; 60]).unwrap();
        assert_eq!(inbox.held_bytes(), 60);
        let Some(StandInInput::Frame(f)) = rx.try_recv().ok() else {
            panic!("no frame")
        };
        let tail = f.slice(10..);
        drop(f);
        assert_eq!(inbox.held_bytes(), 60, "a slice still holds the frame");
        drop(tail);
        assert_eq!(inbox.held_bytes(), 0);
    }

    #[test]
    fn a_full_queue_refuses_and_one_large_frame_passes_alone() {
        let (inbox, mut rx) = remote_inbox(limits());
        inbox.frame(vec![0; 500]).unwrap();
        assert_eq!(inbox.frame(vec![0; 1]), Err(Refused::Full));
        drop(rx.try_recv().unwrap());
        for _ in 0..3 {
            inbox.frame(vec![0; 1]).unwrap();
        }
        assert_eq!(inbox.frame(vec![0; 1]), Err(Refused::Full), "frame limit");
        assert!(
            inbox.control(StandInInput::Shed),
            "control messages are not bounded"
        );
        drop(rx);
        assert_eq!(inbox.held_bytes(), 0, "a closed queue frees what it held");
        assert_eq!(inbox.frame(vec![0; 1]), Err(Refused::Gone));
    }
}
