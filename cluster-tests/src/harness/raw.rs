//! [`RawSocket`]: one Hocuspocus WebSocket driven frame by frame, recording every frame the
//! server sends (a transcript), for tests that compare what two clients were told or that
//! multiplex several documents on one socket. It answers Ping with Pong and does nothing else
//! on its own.
//!
//! Frame builders for the client side: [`auth`](super::client::auth_frame), [`step1`],
//! [`step2`], [`update`], [`awareness`]; [`describe`] renders a server frame for a transcript.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use hearth::protocol::awareness as aw;
use hearth::protocol::message::{PONG_FRAME, ServerMessage};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use yrs::updates::encoder::Encode as _;
use yrs::{Array as _, Doc, ReadTxn as _, StateVector, Transact as _};

use super::client::{LOG, ServerFrame, ServerMsg, decode_server_frame};

#[derive(Debug, Default)]
struct State {
    frames: Vec<ServerFrame>,
    closed: Option<(u16, String)>,
    undecodable: Vec<String>,
}

#[derive(Debug, Default)]
struct Inner {
    state: Mutex<State>,
    changed: Notify,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A WebSocket upgrade request for `url`, with `X-Forwarded-For` if given.
fn request(
    url: &str,
    forwarded_for: Option<&str>,
) -> anyhow::Result<tokio_tungstenite::tungstenite::handshake::client::Request> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    use tokio_tungstenite::tungstenite::http::HeaderValue;
    let mut req = url.into_client_request()?;
    if let Some(ip) = forwarded_for {
        req.headers_mut()
            .insert("x-forwarded-for", HeaderValue::from_str(ip)?);
    }
    Ok(req)
}

/// The HTTP status a WebSocket upgrade of `url` gets (≤ 5 s): 101 when it is accepted (the
/// socket is closed again at once), else the refusal's status (429 for a banned address).
pub async fn upgrade_status(url: &str, forwarded_for: Option<&str>) -> anyhow::Result<u16> {
    use tokio_tungstenite::tungstenite::Error as WsError;
    match timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async(request(url, forwarded_for)?),
    )
    .await
    .with_context(|| format!("upgrading {url} timed out"))?
    {
        Ok((mut ws, _)) => {
            let _ = timeout(Duration::from_secs(2), ws.close(None)).await;
            Ok(101)
        }
        Err(WsError::Http(resp)) => Ok(resp.status().as_u16()),
        Err(e) => Err(anyhow::anyhow!("upgrading {url}: {e}")),
    }
}

/// A recording raw client socket (closed on drop).
#[derive(Debug)]
pub struct RawSocket {
    inner: Arc<Inner>,
    tx: mpsc::UnboundedSender<Message>,
    task: JoinHandle<()>,
}

impl RawSocket {
    /// Opens a WebSocket to `url` (≤ 5 s).
    pub async fn connect(url: &str) -> anyhow::Result<RawSocket> {
        Self::connect_as(url, None).await
    }

    /// Opens a WebSocket to `url` (≤ 5 s), sending `X-Forwarded-For: forwarded_for` if given
    /// (the client address when the node trusts 127.0.0.1 as a proxy).
    pub async fn connect_as(url: &str, forwarded_for: Option<&str>) -> anyhow::Result<RawSocket> {
        let (ws, _) = timeout(
            Duration::from_secs(5),
            tokio_tungstenite::connect_async(request(url, forwarded_for)?),
        )
        .await
        .with_context(|| format!("connecting to {url} timed out"))?
        .with_context(|| format!("connecting to {url}"))?;
        let inner = Arc::new(Inner::default());
        let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
        let (i2, pong) = (inner.clone(), tx.clone());
        let task = tokio::spawn(async move {
            let mut ws = ws;
            let end = loop {
                tokio::select! {
                    m = rx.recv() => match m {
                        Some(m) => {
                            if let Err(e) = ws.send(m).await {
                                break (1006, format!("send failed: {e}"));
                            }
                        }
                        None => {
                            let _ = timeout(Duration::from_secs(2), ws.close(None)).await;
                            break (1000, "closed by the client".into());
                        }
                    },
                    f = ws.next() => match f {
                        Some(Ok(Message::Binary(b))) => {
                            match decode_server_frame(b.clone()) {
                                Ok(ServerFrame::Ping) => {
                                    let _ = pong.send(Message::Binary(Bytes::from_static(&[PONG_FRAME])));
                                }
                                Ok(f) => i2.lock().frames.push(f),
                                Err(e) => i2.lock().undecodable.push(format!("{e}: {:02x?}", &b[..b.len().min(32)])),
                            }
                            i2.changed.notify_waiters();
                        }
                        Some(Ok(Message::Close(c))) => {
                            break match c {
                                Some(c) => (u16::from(c.code), c.reason.to_string()),
                                None => (1005, String::new()),
                            };
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => break (1006, e.to_string()),
                        None => break (1006, "end of stream".into()),
                    },
                }
            };
            i2.lock().closed = Some(end);
            i2.changed.notify_waiters();
        });
        Ok(RawSocket { inner, tx, task })
    }

    /// Sends one binary frame.
    pub fn send(&self, frame: Bytes) {
        let _ = self.tx.send(Message::Binary(frame));
    }

    /// Every frame received so far (Pings excluded), in order.
    pub fn frames(&self) -> Vec<ServerFrame> {
        self.inner.lock().frames.clone()
    }

    /// The frames received so far for `address`, rendered with [`describe`].
    pub fn transcript(&self, address: &str) -> Vec<String> {
        self.inner
            .lock()
            .frames
            .iter()
            .filter_map(|f| match f {
                ServerFrame::Addressed { address: a, msg } if a == address => Some(describe(msg)),
                _ => None,
            })
            .collect()
    }

    /// Close code and reason once the socket ended.
    pub fn closed(&self) -> Option<(u16, String)> {
        self.inner.lock().closed.clone()
    }

    /// Frames that did not decode.
    pub fn undecodable(&self) -> Vec<String> {
        self.inner.lock().undecodable.clone()
    }

    /// Waits (≤ `limit`) until `pred` holds over the frames received so far.
    pub async fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&[ServerFrame]) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let notified = self.inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = self.inner.lock();
                if pred(&st.frames) {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    bail!(
                        "{what} did not happen within {limit:?}; frames {:?}, closed {:?}",
                        st.frames,
                        st.closed
                    );
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let _ = timeout(left.min(Duration::from_millis(50)), notified).await;
        }
    }

    /// Waits until `n` frames for `address` match `pred` (e.g. two `SyncStatus`).
    pub async fn wait_count(
        &self,
        address: &str,
        n: usize,
        limit: Duration,
        pred: impl Fn(&ServerMsg) -> bool,
    ) -> anyhow::Result<()> {
        self.wait_for(&format!("{n} matching frames for {address:?}"), limit, |fs| {
            fs.iter()
                .filter(|f| matches!(f, ServerFrame::Addressed { address: a, msg } if a == address && pred(msg)))
                .count()
                >= n
        })
        .await
    }

    /// Waits until no frame arrived for `quiet` (at most `limit`).
    pub async fn settle(&self, quiet: Duration, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut seen = self.inner.lock().frames.len();
        let mut since = Instant::now();
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = self.inner.lock().frames.len();
            if now != seen {
                seen = now;
                since = Instant::now();
            } else if since.elapsed() >= quiet {
                return;
            }
        }
    }
}

impl Drop for RawSocket {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A server message rendered for a transcript: kind plus the parts that must agree between two
/// clients in the same situation (scope, reason, status); document payloads as their length
/// class only (`empty` or `data`).
pub fn describe(msg: &ServerMsg) -> String {
    let size = |b: &Bytes| if b.len() <= 2 { "empty" } else { "data" };
    match msg {
        ServerMsg::Step1(_) => "Step1".into(),
        ServerMsg::Step2(u) => format!("Step2({})", size(u)),
        ServerMsg::Update(_) => "Update".into(),
        ServerMsg::Awareness(_) => "Awareness".into(),
        ServerMsg::AuthRequest => "AuthRequest".into(),
        ServerMsg::PermissionDenied(r) => format!("PermissionDenied({r})"),
        ServerMsg::Authenticated(s) => format!("Authenticated({s})"),
        ServerMsg::QueryAwareness => "QueryAwareness".into(),
        ServerMsg::Stateless(s) => format!("Stateless({s})"),
        ServerMsg::Close(r) => format!("Close({r})"),
        ServerMsg::SyncStatus(ok) => format!("SyncStatus({})", u8::from(*ok)),
        ServerMsg::Other(k) => format!("Other({k})"),
    }
}

/// `A 00 00 sv` for an empty document (a fresh provider's step1).
pub fn step1(address: &str) -> Bytes {
    let sv = StateVector::default().encode_v1();
    ServerMessage::SyncStep1(&sv).frame(Some(address))
}

/// `A 00 01 update`.
pub fn step2(address: &str, update: &[u8]) -> Bytes {
    ServerMessage::SyncStep2(update).frame(Some(address))
}

/// `A 00 02 update`.
pub fn update(address: &str, update: &[u8]) -> Bytes {
    ServerMessage::SyncUpdate(update).frame(Some(address))
}

/// `A 01 awareness-update` with one client's state.
pub fn awareness(address: &str, client: u64, clock: u64, state: Option<&str>) -> Bytes {
    let body = aw::encode_update([(client, clock, state)]);
    ServerMessage::Awareness(&body).frame(Some(address))
}

/// A Yjs v1 update, from a fresh document with client id `client`, that pushes `marker` into
/// the [`LOG`] array (it depends on nothing, so it applies to any document).
pub fn marker_update(client: u64, marker: &str) -> Vec<u8> {
    let doc = Doc::with_client_id(client);
    let log = doc.get_or_insert_array(LOG);
    {
        let mut txn = doc.transact_mut();
        log.push_back(&mut txn, marker);
    }
    doc.transact()
        .encode_state_as_update_v1(&StateVector::default())
}
