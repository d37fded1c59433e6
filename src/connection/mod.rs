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

/// The transport under a WebSocket: the raw TCP stream, preceded by whatever bytes hyper had
/// already read past the handshake (usually none).
#[derive(Debug)]
pub struct Io {
    prefix: bytes::Bytes,
    tcp: tokio::net::TcpStream,
}

/// The WebSocket type every connection task works on.
pub type Ws = WebSocketStream<Io>;

/// Unwraps hyper's upgraded connection to the raw TCP stream. Keeping `Upgraded` would keep
/// hyper's 8 KiB read buffer (and a boxed IO) alive for the socket's whole life.
pub(crate) fn into_io(upgraded: Upgraded) -> Option<Io> {
    let parts = upgraded.downcast::<TokioIo<tokio::net::TcpStream>>().ok()?;
    // copy the (rare) leftover so the shared read buffer can be freed
    let prefix = bytes::Bytes::copy_from_slice(&parts.read_buf);
    Some(Io {
        prefix,
        tcp: parts.io.into_inner(),
    })
}

impl tokio::io::AsyncRead for Io {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let chunk = self.prefix.split_to(n);
            buf.put_slice(&chunk);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Io {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

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

/// How a guarded write ended.
pub(crate) enum Written {
    /// The batch was written (controls to act on), or the transport failed.
    Done(Result<Vec<Outgoing>, tokio_tungstenite::tungstenite::Error>),
    /// The outbox overflowed while the write was blocked: a slow reader.
    Overflow,
    /// The server is shutting down while the write was blocked.
    Shutdown,
}

/// [`write_batch`], abandoned when the outbox overflows or the server shuts down meanwhile: a
/// client that stopped reading blocks the write forever, and must still be disconnected.
pub(crate) async fn write_guarded(
    ws: &mut Ws,
    first: Outgoing,
    rx: &mut OutboxReceiver,
    overflow: &outbox::OverflowSignal,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Written {
    tokio::select! {
        r = write_batch(ws, first, rx) => Written::Done(r),
        _ = overflow.wait() => Written::Overflow,
        _ = shutdown.cancelled() => Written::Shutdown,
    }
}

/// Completes a close handshake (bounded in time): sends the close frame, then reads and discards
/// until the client's close reply arrives, so the client sees our code rather than a reset.
pub(crate) async fn close(mut ws: Ws, code: u16, reason: &str) {
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_owned().into(),
    };
    let handshake = async {
        if ws.close(Some(frame)).await.is_err() {
            return;
        }
        while let Some(Ok(msg)) = futures_util::StreamExt::next(&mut ws).await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), handshake).await;
}
