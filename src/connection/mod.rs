//! Client sockets: one task per WebSocket owns it, reads frames in order and writes what the
//! document tasks queue in its [`Outbox`](crate::outbox::Outbox).
//!
//! * [`hocuspocus`] — the Hocuspocus protocol: per-address auth state machine, multiplexing.
//! * [`yws`] — the plain y-websocket protocol on `/y/<document>`.
//!
//! **Invariant:** a socket task never blocks a document task: documents write into a
//! byte-bounded outbox and a client that cannot keep up is disconnected.

mod addr_map;
pub mod hocuspocus;
pub(crate) mod node;
pub(crate) mod placement;
pub(crate) mod shared;
pub(crate) mod signals;
pub(crate) mod stand_in;
pub(crate) mod tasks;
pub(crate) mod traffic;
pub mod yws;

use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};

use self::signals::SignalWait;
use crate::limits::ConnectionSlot;
use crate::outbox::{OutboxReceiver, Outgoing};
use crate::protocol::Close;
use tracing::debug;

/// The transport under a WebSocket: the raw TCP stream, preceded by whatever bytes hyper had
/// already read past the handshake (usually none).
///
/// Outgoing data frames bypass tungstenite's write buffer: `write_batch` formats a whole batch
/// into [`Io`]'s own out buffer (one `send` per batch) and the buffer is freed once written, so
/// an idle socket holds no write buffer however large its last frame was. Anything tungstenite
/// writes (pongs, close frames) drains the out buffer first, so frames never interleave.
#[derive(Debug)]
pub struct Io {
    prefix: bytes::Bytes,
    tcp: tokio::net::TcpStream,
    /// Formatted frames not yet written, from `out_pos` on.
    out: Vec<u8>,
    out_pos: usize,
    /// Keeps the connection counted against the connection caps until the socket is dropped.
    _slot: Arc<ConnectionSlot>,
}

/// The WebSocket type every connection task works on.
pub type Ws = WebSocketStream<Io>;

/// Unwraps hyper's upgraded connection to the raw TCP stream. Keeping `Upgraded` would keep
/// hyper's 8 KiB read buffer (and a boxed IO) alive for the socket's whole life.
/// `slot` is the connection's place under the connection caps, given back when the socket is.
pub(crate) fn into_io(upgraded: Upgraded, slot: Arc<ConnectionSlot>) -> Option<Io> {
    let parts = upgraded.downcast::<TokioIo<tokio::net::TcpStream>>().ok()?;
    // copy the (rare) leftover so the shared read buffer can be freed
    let prefix = bytes::Bytes::copy_from_slice(&parts.read_buf);
    Some(Io {
        prefix,
        tcp: parts.io.into_inner(),
        out: Vec::new(),
        out_pos: 0,
        _slot: slot,
    })
}

/// Out buffers up to this capacity are kept for the next batch; larger ones are freed.
const KEEP_OUT_CAPACITY: usize = 0;

impl Io {
    /// Appends one unmasked, unfragmented server frame to the out buffer.
    fn queue(&mut self, opcode: OpCode, payload: &[u8]) {
        let header = FrameHeader {
            opcode,
            ..FrameHeader::default()
        };
        self.out
            .reserve(header.len(payload.len() as u64) + payload.len());
        // writing into a Vec cannot fail
        let _ = header.format(payload.len() as u64, &mut self.out);
        self.out.extend_from_slice(payload);
    }

    /// Bytes queued and not yet written.
    fn queued(&self) -> usize {
        self.out.len() - self.out_pos
    }

    /// Writes the out buffer. Cancel-safe: progress is recorded after every write.
    fn poll_drain(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        while self.out_pos < self.out.len() {
            let n = std::task::ready!(tokio::io::AsyncWrite::poll_write(
                std::pin::Pin::new(&mut self.tcp),
                cx,
                &self.out[self.out_pos..]
            ))?;
            if n == 0 {
                return std::task::Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n;
        }
        if self.out.capacity() > KEEP_OUT_CAPACITY {
            self.out = Vec::new();
        } else {
            self.out.clear();
        }
        self.out_pos = 0;
        std::task::Poll::Ready(Ok(()))
    }
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
        std::task::ready!(self.poll_drain(cx))?;
        std::pin::Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::ready!(self.poll_drain(cx))?;
        std::pin::Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::ready!(self.poll_drain(cx))?;
        std::pin::Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::ready!(self.poll_drain(cx))?;
        std::pin::Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// How many queued frames are written with one `send` at most.
const WRITE_BATCH: usize = 64;
/// How many bytes are formatted for one `send` before more frames are taken from the outbox.
const WRITE_BATCH_BYTES: usize = 64 << 10;

/// Writes `first` and whatever else is ready in the outbox with one `send`. Control messages
/// are returned for the caller to act on (in order after the frames before them).
pub(crate) async fn write_batch(
    ws: &mut Ws,
    first: Outgoing,
    rx: &mut OutboxReceiver,
) -> Result<Vec<Outgoing>, tokio_tungstenite::tungstenite::Error> {
    // tungstenite's own buffer (a pong) goes first; after this, it is empty
    flush(ws).await?;
    let controls = queue_batch(ws.get_mut(), first, rx);
    flush(ws).await?;
    Ok(controls)
}

/// What a guarded write formats once tungstenite's own buffer is empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Write {
    /// What the outbox holds, up to one batch.
    Batch,
    /// A WebSocket ping.
    Ping,
}

/// Writes `what` with one `send`, abandoned when the socket must stop meanwhile: sockets are
/// stopping (`signals`) or the outbox `rx` overflowed. A client that stopped reading blocks a
/// write forever, and must still be disconnected. Returns the control messages met in the
/// outbox (in order after the frames before them). A revocation seen meanwhile is left for
/// `signals` to report.
///
/// One hand-written poll instead of nested `async fn`s, returned by a plain function: what
/// the socket's future keeps while a write waits is three references and the controls met,
/// not the batch's state (or the arguments) twice over.
pub(crate) fn write_guarded<'a>(
    ws: &'a mut Ws,
    what: Write,
    rx: &'a mut OutboxReceiver,
    signals: &'a mut SignalWait<'_>,
) -> impl std::future::Future<
    Output = Result<Result<Vec<Outgoing>, tokio_tungstenite::tungstenite::Error>, Stop>,
> + 'a {
    // `None` until tungstenite's own buffer (a pong) is written and the batch formatted
    let mut controls: Option<Vec<Outgoing>> = None;
    std::future::poll_fn(move |cx| {
        loop {
            match poll_flush(ws, cx) {
                Poll::Ready(Err(e)) => return Poll::Ready(Ok(Err(e))),
                Poll::Ready(Ok(())) => match controls.take() {
                    Some(done) => return Poll::Ready(Ok(Ok(done))),
                    None => {
                        let io = ws.get_mut();
                        controls = Some(match what {
                            Write::Batch => match rx.try_recv() {
                                Some(first) => queue_batch(io, first, rx),
                                None => Vec::new(),
                            },
                            Write::Ping => {
                                io.queue(OpCode::Control(Control::Ping), &[]);
                                Vec::new()
                            }
                        });
                        continue; // flush what was formatted
                    }
                },
                Poll::Pending => {}
            }
            if signals.poll_stop(cx).is_ready() {
                return Poll::Ready(Err(Stop::Shutdown));
            }
            if rx.poll_overflowed(cx).is_ready() {
                return Poll::Ready(Err(Stop::Overflow));
            }
            return Poll::Pending;
        }
    })
}

/// Formats `first` and what else is ready (up to one batch) into the out buffer; returns the
/// control messages met on the way.
fn queue_batch(io: &mut Io, first: Outgoing, rx: &mut OutboxReceiver) -> Vec<Outgoing> {
    let mut controls = Vec::new();
    let mut next = Some(first);
    let mut n = 0;
    while let Some(msg) = next.take() {
        match msg {
            Outgoing::Frame(f) => io.queue(OpCode::Data(Data::Binary), &f),
            other => controls.push(other),
        }
        n += 1;
        if n < WRITE_BATCH && io.queued() < WRITE_BATCH_BYTES {
            next = rx.try_recv();
        }
    }
    controls
}

/// Flushes tungstenite's buffer, then the out buffer.
fn flush(
    ws: &mut Ws,
) -> impl std::future::Future<Output = Result<(), tokio_tungstenite::tungstenite::Error>> + '_ {
    std::future::poll_fn(move |cx| poll_flush(ws, cx))
}

/// One poll of [`flush`].
fn poll_flush(
    ws: &mut Ws,
    cx: &mut std::task::Context<'_>,
) -> Poll<Result<(), tokio_tungstenite::tungstenite::Error>> {
    futures_util::Sink::<Message>::poll_flush(Pin::new(ws), cx)
}

/// Why a socket must drop whatever it is waiting for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stop {
    /// The server is shutting down (or the node drains).
    Shutdown,
    /// The outbox overflowed: a slow reader.
    Overflow,
}

/// Writes what is still queued before a socket closes, bounded in time (the client may have
/// stopped reading).
pub(crate) async fn flush_final(ws: &mut Ws, rx: &mut OutboxReceiver) {
    let flush = async {
        while let Some(msg) = rx.try_recv() {
            if let Err(e) = write_batch(ws, msg, rx).await {
                debug!(error = %e, "final write failed");
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), flush).await;
}

/// How long [`close`] may take in all: writing the close frame, then draining the client.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// How many inbound bytes [`close`] reads and discards at most while waiting for the client to
/// close (a client may be in the middle of sending a message far over `max_message_bytes`).
const CLOSE_DRAIN_BYTES: usize = 128 << 20;

/// Closes a socket so the client sees `how` (every server-side close goes through here), all
/// within [`CLOSE_LINGER`]: sends the close frame, shuts the write side down, then reads and
/// discards whatever the client still sends (its close reply, or the rest of a message too big
/// to accept; at most [`CLOSE_DRAIN_BYTES`]) until it closes its side.
///
/// Draining is what makes the code arrive: closing a TCP socket with unread input makes the
/// kernel send a reset, and a client that is still sending (say, a 64 MiB message refused with
/// 1009) would see the reset (1006) instead of the close frame waiting in its receive buffer.
/// The raw stream is read, not WebSocket frames: after a refused message the frame parser is
/// out of step with the stream.
pub(crate) async fn close(mut ws: Ws, how: Close) {
    let frame = CloseFrame {
        code: CloseCode::from(how.code()),
        reason: how.reason().into(),
    };
    let linger = async {
        if let Err(e) = ws.close(Some(frame)).await {
            debug!(error = %e, "close frame not sent");
        }
        let io = ws.get_mut();
        if tokio::io::AsyncWriteExt::shutdown(io).await.is_err() {
            return;
        }
        drain(&mut io.tcp).await;
    };
    let _ = tokio::time::timeout(CLOSE_LINGER, linger).await;
}

/// Reads and discards until end of stream, an error, or [`CLOSE_DRAIN_BYTES`].
async fn drain(tcp: &mut tokio::net::TcpStream) {
    let mut buf = vec![0u8; 16 << 10];
    let mut total = 0usize;
    while total < CLOSE_DRAIN_BYTES {
        match tokio::io::AsyncReadExt::read(tcp, &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => total += n,
        }
    }
    debug!(
        bytes = total,
        "client kept sending after the close; giving up"
    );
}

#[cfg(test)]
mod tests {
    /// The size of the future a socket task runs, from the function that makes it.
    macro_rules! future_size {
        ($f:path, $($arg:ident),+) => {{
            fn size<$($arg,)+ R>(_: fn($($arg),+) -> R) -> usize {
                std::mem::size_of::<R>()
            }
            size($f)
        }};
    }

    #[test]
    fn socket_tasks_stay_small() {
        // Every open socket holds its task's future for its whole life. Hocuspocus sockets:
        // 3,000 bytes in a release build with the WebSocket inline and every step awaited in
        // place, 1,288 with rare steps boxed; with one waiter for stop and revocation and a
        // hand-written write, 720 in a debug build and about 880 in a release build; with the
        // select only picking the wake-up and the loop an `async` block, 512 in a release
        // build. The runtime rounds a task's allocation up to a multiple of 128 bytes, and
        // at most 520 here keeps it at 640.
        let hocuspocus = future_size!(super::hocuspocus::serve, A, B, C);
        let bound = if cfg!(debug_assertions) { 800 } else { 520 };
        assert!(hocuspocus <= bound, "Hocuspocus socket: {hocuspocus} bytes");
        let yws = future_size!(super::yws::serve, A, B, C, D);
        assert!(yws <= 1_500, "y-websocket socket: {yws} bytes");
    }
}
