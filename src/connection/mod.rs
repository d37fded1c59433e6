//! Client sockets: one task per WebSocket owns it, reads frames in order and writes what the
//! document tasks queue in its [`outbox::Outbox`].
//!
//! * [`hocuspocus`] — the Hocuspocus protocol: per-address auth state machine, multiplexing.
//! * [`yws`] — the plain y-websocket protocol on `/y/<document>`.
//!
//! **Invariant:** a socket task never blocks a document task: documents write into a
//! byte-bounded outbox and a client that cannot keep up is disconnected.

pub mod hocuspocus;
pub mod outbox;
pub mod yws;

use std::time::Duration;

use futures_util::SinkExt;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use self::outbox::{OutboxReceiver, Outgoing};

/// The WebSocket type every connection task works on.
pub type Ws = WebSocketStream<TokioIo<Upgraded>>;

/// How many queued frames are written before one flush.
const WRITE_BATCH: usize = 64;

/// Writes `first` and whatever else is ready in the outbox, then flushes once. Control
/// messages are returned for the caller to act on (in order after the frames before them).
pub(crate) async fn write_batch(
    ws: &mut Ws,
    first: Outgoing,
    rx: &mut OutboxReceiver,
) -> Result<Vec<Outgoing>, tokio_tungstenite::tungstenite::Error> {
    let mut controls = Vec::new();
    let mut next = Some(first);
    let mut n = 0;
    while let Some(msg) = next.take() {
        match msg {
            Outgoing::Frame(f) => ws.feed(Message::Binary(f)).await?,
            other => controls.push(other),
        }
        n += 1;
        if n < WRITE_BATCH {
            next = rx.try_recv();
        }
    }
    ws.flush().await?;
    Ok(controls)
}

/// Sends a close frame (bounded in time) and drops the socket.
pub(crate) async fn close(mut ws: Ws, code: u16, reason: &str) {
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_owned().into(),
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(Some(frame))).await;
}
