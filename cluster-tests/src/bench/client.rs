//! One simulated provider: a WebSocket, a `yrs::Doc`, the Hocuspocus handshake of a v4
//! provider (Auth, step1, awareness → Authenticated, step1/step2, SyncStatus), and the run loop
//! that inserts at a fixed rate and observes everybody else's inserts.
//!
//! The loop is one task per client with a single reused timer; received updates are applied to
//! the client's own document and turned into latencies through the state vector (see
//! [`super::stats`]).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{ClientID, Doc, GetString, ReadTxn, StateVector, Text, TextRef, Transact, Update};

use super::codec::{self, ServerFrame};
use super::stats::{ITEM_LEN, Path, PeerCursor, Recorder, SendLog, now_ns};

/// The client-side WebSocket.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Name of the shared text every bench insert goes into.
pub const TEXT: &str = "bench";

/// Awareness renewal period of a real provider (y-protocols: half the 30 s timeout).
pub const AWARENESS_RENEW: Duration = Duration::from_secs(15);

/// Sentinel in the ack queue for a step2 (not an insert).
const HANDSHAKE_ACK: u64 = u64::MAX;

/// Who a client is and where it connects.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `ws://host:port/path`.
    pub url: String,
    /// Document name (the Hocuspocus address).
    pub address: String,
    /// Auth token (may be empty).
    pub token: String,
    /// Yjs client id.
    pub client_id: u64,
    /// Publish an awareness state at connect.
    pub awareness: bool,
    /// Renew the awareness state every 15 s like a provider.
    pub renew_awareness: bool,
    /// Limit for connect + handshake.
    pub handshake_timeout: Duration,
    /// Local address to connect from (`None`: the kernel picks). One source address has at most
    /// one ephemeral port range of connections to one server address, about 28,000 by default;
    /// more connections to one loopback server come from several `127.0.0.x` sources.
    pub source: Option<std::net::IpAddr>,
}

/// Timings of one handshake (ns since the bench epoch), for cold-load measurements.
#[derive(Debug, Clone, Copy, Default)]
pub struct Handshake {
    /// Before the TCP connect.
    pub start: u64,
    /// WebSocket upgrade done.
    pub connected: u64,
    /// `Authenticated` received.
    pub authenticated: u64,
    /// Server step2 received (before applying it).
    pub step2: u64,
    /// Server step2 applied to the local document.
    pub applied: u64,
    /// Our step2 acknowledged (`SyncStatus`): the provider's `synced` + no unsynced changes.
    pub acked: u64,
    /// Size of the server's step2 payload.
    pub step2_bytes: usize,
}

/// A connected, synced client.
pub struct Client {
    /// Its configuration.
    pub cfg: ClientConfig,
    ws: Ws,
    /// Its document.
    pub doc: Doc,
    text: TextRef,
    acks: VecDeque<u64>,
    awareness_clock: u64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

fn ws_config() -> WebSocketConfig {
    // small read buffer: 10,000 idle clients must not cost the generator 128 KiB each
    WebSocketConfig::default()
        .read_buffer_size(8 << 10)
        .max_message_size(Some(256 << 20))
        .max_frame_size(Some(256 << 20))
}

fn awareness_json(client_id: u64) -> String {
    format!("{{\"user\":{{\"name\":\"bench-{client_id}\",\"color\":\"#30bced\"}}}}")
}

/// A TCP connection to the `ws://host:port` of `url` from the local address `source`.
async fn connect_from(source: std::net::IpAddr, url: &str) -> anyhow::Result<TcpStream> {
    let authority = url
        .strip_prefix("ws://")
        .and_then(|rest| rest.split('/').next())
        .with_context(|| format!("{url}: a source address needs a ws://host:port URL"))?;
    let server = tokio::net::lookup_host(authority)
        .await
        .with_context(|| format!("resolving {authority}"))?
        .find(|a| a.is_ipv4() == source.is_ipv4())
        .with_context(|| format!("{authority}: no address of the source's family"))?;
    let socket = if source.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket
        .bind(std::net::SocketAddr::new(source, 0))
        .with_context(|| format!("binding {source}"))?;
    socket
        .connect(server)
        .await
        .with_context(|| format!("connecting to {server} from {source}"))
}

impl Client {
    /// Connects and runs the provider handshake until the document is synced and our step2
    /// is acknowledged.
    pub async fn connect(cfg: ClientConfig) -> anyhow::Result<(Client, Handshake)> {
        let limit = cfg.handshake_timeout;
        let url = cfg.url.clone();
        timeout(limit, Self::connect_inner(cfg))
            .await
            .with_context(|| format!("handshake with {url} timed out after {limit:?}"))?
    }

    async fn connect_inner(cfg: ClientConfig) -> anyhow::Result<(Client, Handshake)> {
        let mut hs = Handshake {
            start: now_ns(),
            ..Handshake::default()
        };
        let (ws, _) = match cfg.source {
            None => tokio_tungstenite::connect_async_with_config(
                cfg.url.as_str(),
                Some(ws_config()),
                true,
            )
            .await
            .with_context(|| format!("connecting to {}", cfg.url))?,
            Some(source) => {
                let stream = connect_from(source, &cfg.url).await?;
                tokio_tungstenite::client_async_with_config(
                    cfg.url.as_str(),
                    MaybeTlsStream::Plain(stream),
                    Some(ws_config()),
                )
                .await
                .with_context(|| format!("upgrading {} from {source}", cfg.url))?
            }
        };
        hs.connected = now_ns();
        let doc = Doc::with_client_id(cfg.client_id);
        let text = doc.get_or_insert_text(TEXT);
        let mut c = Client {
            cfg,
            ws,
            doc,
            text,
            acks: VecDeque::new(),
            awareness_clock: 0,
        };
        let sv = c.doc.transact().state_vector().encode_v1();
        let a = c.cfg.address.clone();
        c.ws.feed(Message::Binary(codec::auth(&a, &c.cfg.token)))
            .await?;
        c.ws.feed(Message::Binary(codec::sync(&a, 0, &sv))).await?;
        if c.cfg.awareness {
            c.awareness_clock = 1;
            let json = awareness_json(c.cfg.client_id);
            c.ws.feed(Message::Binary(codec::awareness(
                &a,
                c.cfg.client_id,
                c.awareness_clock,
                &json,
            )))
            .await?;
        }
        c.ws.flush().await?;
        let mut synced = false;
        let mut replied_step1 = false;
        loop {
            if synced && replied_step1 && c.acks.is_empty() {
                hs.acked = now_ns();
                return Ok((c, hs));
            }
            let msg = match c.ws.next().await {
                None => bail!("server closed the socket during the handshake"),
                Some(m) => m.context("reading during the handshake")?,
            };
            let at = now_ns();
            let Message::Binary(frame) = msg else {
                continue;
            };
            let (_, f) = codec::decode_server_frame(frame)?;
            match f {
                ServerFrame::Authenticated { .. } => hs.authenticated = at,
                ServerFrame::PermissionDenied(r) => bail!("permission denied: {r}"),
                ServerFrame::Close(r) => bail!("document closed by the server: {r}"),
                ServerFrame::Step1(sv) => {
                    c.reply_step1(&sv).await?;
                    replied_step1 = true;
                }
                ServerFrame::Step2(u) => {
                    hs.step2 = at;
                    hs.step2_bytes = u.len();
                    c.apply(&u)?;
                    hs.applied = now_ns();
                    synced = true;
                }
                ServerFrame::Update(u) => {
                    c.apply(&u)?;
                }
                ServerFrame::SyncStatus(_) => {
                    c.acks.pop_front();
                }
                ServerFrame::Ping => c.ws.send(Message::Binary(codec::pong())).await?,
                ServerFrame::AuthRequest => {
                    let f = codec::auth(&a, &c.cfg.token);
                    c.ws.send(Message::Binary(f)).await?
                }
                _ => {}
            }
        }
    }

    async fn reply_step1(&mut self, sv: &[u8]) -> anyhow::Result<()> {
        let sv = StateVector::decode_v1(sv).context("server step1")?;
        let diff = self.doc.transact().encode_state_as_update_v1(&sv);
        let f = codec::sync(&self.cfg.address, 1, &diff);
        self.acks.push_back(HANDSHAKE_ACK);
        self.ws.send(Message::Binary(f)).await?;
        Ok(())
    }

    fn apply(&mut self, update: &[u8]) -> anyhow::Result<()> {
        let u = Update::decode_v1(update).context("decoding an update from the server")?;
        self.doc
            .transact_mut()
            .apply_update(u)
            .context("applying an update from the server")?;
        Ok(())
    }

    /// Sends a whole update (`A 00 02`) and waits for its `SyncStatus`; returns whether it was
    /// accepted. Used to seed stored documents.
    pub async fn send_update_and_wait(&mut self, update: &[u8]) -> anyhow::Result<bool> {
        let f = codec::sync(&self.cfg.address, 2, update);
        self.ws.send(Message::Binary(f)).await?;
        loop {
            let msg = match self.ws.next().await {
                None => bail!("server closed the socket"),
                Some(m) => m?,
            };
            let Message::Binary(frame) = msg else {
                continue;
            };
            match codec::decode_server_frame(frame)?.1 {
                ServerFrame::SyncStatus(ok) => return Ok(ok),
                ServerFrame::Update(u) => self.apply(&u)?,
                ServerFrame::Ping => self.ws.send(Message::Binary(codec::pong())).await?,
                ServerFrame::PermissionDenied(r) | ServerFrame::Close(r) => {
                    bail!("document closed: {r}")
                }
                _ => {}
            }
        }
    }

    /// Length of a shared text of the document (bytes of its UTF-8 string).
    pub fn text_len(&self, name: &str) -> usize {
        let text = self.doc.get_or_insert_text(name);
        text.get_string(&self.doc.transact()).len()
    }

    /// Detaches (CLOSE) and closes the socket, bounded in time.
    pub async fn close(mut self) {
        let f = codec::close(&self.cfg.address);
        let _ = timeout(Duration::from_secs(2), async {
            let _ = self.ws.send(Message::Binary(f)).await;
            let _ = self.ws.close(None).await;
        })
        .await;
    }

    /// Keeps the connection open without sending anything but Pong (idle provider), answering
    /// what the server asks, until `quit` turns true.
    pub async fn idle(mut self, mut quit: watch::Receiver<bool>, rec: Arc<Recorder>) {
        loop {
            tokio::select! {
                r = quit.changed() => {
                    if r.is_err() || *quit.borrow() { break; }
                }
                msg = self.ws.next() => {
                    let Some(Ok(msg)) = msg else {
                        rec.errors.fetch_add(1, Ordering::Relaxed);
                        return;
                    };
                    rec.frames_in.fetch_add(1, Ordering::Relaxed);
                    if let Message::Binary(frame) = msg {
                        match codec::decode_server_frame(frame) {
                            Ok((_, ServerFrame::Ping)) => {
                                let _ = self.ws.send(Message::Binary(codec::pong())).await;
                            }
                            Ok((_, ServerFrame::Close(_) | ServerFrame::PermissionDenied(_))) | Err(_) => {
                                rec.errors.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(_) => {}
                        }
                    }
                }
            }
        }
        self.close().await;
    }
}

/// What the coordinator tells every client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Connected, not inserting.
    Idle,
    /// Insert once per this many nanoseconds.
    Send {
        /// Interval between inserts of one client.
        interval_ns: u64,
    },
    /// Close and end the task.
    Quit,
}

/// One sender a client observes.
#[derive(Debug)]
pub struct Peer {
    /// The sender's log.
    pub log: Arc<SendLog>,
    /// How far this client has seen it.
    pub cursor: PeerCursor,
    /// Path class of deliveries from it to this client.
    pub path: Path,
}

/// A client's role in a run.
#[derive(Debug)]
pub struct Role {
    /// Its own send log.
    pub me: Arc<SendLog>,
    /// Everybody else on its document.
    pub peers: Vec<Peer>,
    /// Deliveries expected per insert, by path (receivers on its document by path).
    pub fanout: [u64; 4],
}

impl Client {
    /// Runs the insert/observe loop until [`Plan::Quit`].
    pub async fn run(
        mut self,
        mut role: Role,
        mut plan_rx: watch::Receiver<Plan>,
        rec: Arc<Recorder>,
    ) {
        let base = self
            .doc
            .transact()
            .state_vector()
            .get(&ClientID::new(self.cfg.client_id));
        role.me.base_clock.store(u64::from(base), Ordering::Relaxed);
        let far = || Instant::now() + Duration::from_secs(3600);
        let mut plan = *plan_rx.borrow();
        let mut next_send = far();
        let mut next_awareness = if self.cfg.renew_awareness && self.cfg.awareness {
            Instant::now() + AWARENESS_RENEW
        } else {
            far()
        };
        let mut interval = Duration::ZERO;
        let timer = tokio::time::sleep_until(next_awareness);
        tokio::pin!(timer);
        let mut seq_in_doc = 0u64;
        let mut latencies: Vec<(usize, u64)> = Vec::with_capacity(16);
        let mut ack_lat: Vec<u64> = Vec::with_capacity(4);
        let ack_idx = usize::from(!role.me.local);
        loop {
            let deadline = next_send.min(next_awareness);
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
            tokio::select! {
                biased;
                changed = plan_rx.changed() => {
                    if changed.is_err() { break; }
                    plan = *plan_rx.borrow_and_update();
                    match plan {
                        Plan::Quit => break,
                        Plan::Idle => next_send = far(),
                        Plan::Send { interval_ns } => {
                            interval = Duration::from_nanos(interval_ns.max(1));
                            let phase = rand::random::<u64>() % interval_ns.max(1);
                            next_send = Instant::now() + Duration::from_nanos(phase);
                        }
                    }
                }
                msg = self.ws.next() => {
                    let at = now_ns();
                    let frame = match msg {
                        Some(Ok(Message::Binary(f))) => f,
                        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                            rec.errors.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        Some(Ok(_)) => continue,
                    };
                    rec.frames_in.fetch_add(1, Ordering::Relaxed);
                    let Ok((_, f)) = codec::decode_server_frame(frame) else {
                        rec.errors.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    match f {
                        ServerFrame::Update(u) | ServerFrame::Step2(u) => {
                            if self.apply(&u).is_err() {
                                rec.errors.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            self.observe(&mut role, at, &mut latencies, &rec);
                        }
                        ServerFrame::SyncStatus(ok) => {
                            match self.acks.pop_front() {
                                Some(HANDSHAKE_ACK) => {}
                                Some(sent) if ok => {
                                    rec.acked.fetch_add(1, Ordering::Relaxed);
                                    if sent >= rec.window_start.load(Ordering::Relaxed) {
                                        ack_lat.push(at.saturating_sub(sent));
                                    }
                                }
                                Some(_) => { rec.rejected.fetch_add(1, Ordering::Relaxed); }
                                None => { rec.errors.fetch_add(1, Ordering::Relaxed); }
                            }
                            if !ack_lat.is_empty() {
                                let mut h = rec.hist.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                                for l in ack_lat.drain(..) { h.ack[ack_idx].record_ns(l); }
                            }
                        }
                        ServerFrame::Step1(sv) => {
                            let sent = self.reply_step1(&sv).await;
                            if sent.is_err() { break; }
                        }
                        ServerFrame::Ping => {
                            let sent = self.ws.send(Message::Binary(codec::pong())).await;
                            if sent.is_err() { break; }
                        }
                        ServerFrame::AuthRequest => {
                            let f = codec::auth(&self.cfg.address, &self.cfg.token);
                            let sent = self.ws.send(Message::Binary(f)).await;
                            if sent.is_err() { break; }
                        }
                        ServerFrame::Close(_) | ServerFrame::PermissionDenied(_) => {
                            rec.errors.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        _ => {}
                    }
                }
                () = &mut timer => {
                    let now = Instant::now();
                    if now >= next_awareness {
                        self.awareness_clock += 1;
                        let json = awareness_json(self.cfg.client_id);
                        let f = codec::awareness(&self.cfg.address, self.cfg.client_id, self.awareness_clock, &json);
                        if self.ws.feed(Message::Binary(f)).await.is_err() { break; }
                        next_awareness = now + AWARENESS_RENEW;
                    }
                    if matches!(plan, Plan::Send { .. }) {
                        let mut n = 0;
                        while next_send <= now && n < 64 {
                            let lag = now.duration_since(next_send);
                            rec.note_lag(lag);
                            if self.insert(&mut role, seq_in_doc, &rec).await.is_err() {
                                rec.errors.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                            seq_in_doc += 1;
                            next_send += interval;
                            n += 1;
                        }
                        if next_send <= now {
                            // more than 64 behind: the generator cannot keep up; skip ahead
                            next_send = now + interval;
                        }
                    }
                    if self.ws.flush().await.is_err() { break; }
                }
            }
        }
        self.close().await;
    }

    async fn insert(&mut self, role: &mut Role, seq: u64, rec: &Recorder) -> anyhow::Result<()> {
        let stamp = now_ns() / 1000;
        // 16 ASCII chars = ITEM_LEN clock units: the seq and a µs timestamp, as a typist's
        // insert at the start of the text (O(1) for yrs, unlike appending)
        let content = format!("{:08x}{:08x}", seq as u32, stamp as u32);
        debug_assert_eq!(content.len(), ITEM_LEN as usize);
        let update = {
            let mut txn = self.doc.transact_mut();
            self.text.insert(&mut txn, 0, &content);
            txn.encode_update_v1()
        };
        let f = codec::sync(&self.cfg.address, 2, &update);
        let t = now_ns();
        role.me.push(t);
        self.acks.push_back(t);
        rec.sent.fetch_add(1, Ordering::Relaxed);
        for (i, n) in role.fanout.iter().enumerate() {
            if *n > 0 {
                rec.expected[i].fetch_add(*n, Ordering::Relaxed);
            }
        }
        self.ws.feed(Message::Binary(f)).await?;
        Ok(())
    }

    fn observe(&self, role: &mut Role, at: u64, buf: &mut Vec<(usize, u64)>, rec: &Recorder) {
        let sv = self.doc.transact().state_vector();
        let window = rec.window_start.load(Ordering::Relaxed);
        let mut late = 0;
        let mut counts = [0u64; 4];
        for p in &mut role.peers {
            let clock = u64::from(sv.get(&ClientID::new(p.log.client_id)));
            let base = p.log.base_clock.load(Ordering::Relaxed);
            let seqs = p.cursor.advance(base, clock);
            if seqs.is_empty() {
                continue;
            }
            counts[p.path as usize] += seqs.end - seqs.start;
            let path = p.path as usize;
            p.log.each(seqs.start, seqs.end, |_, sent| {
                if sent >= window {
                    buf.push((path, at.saturating_sub(sent)));
                } else {
                    late += 1;
                }
            });
        }
        for (i, n) in counts.iter().enumerate() {
            if *n > 0 {
                rec.delivered[i].fetch_add(*n, Ordering::Relaxed);
            }
        }
        if late > 0 {
            rec.late.fetch_add(late, Ordering::Relaxed);
        }
        if !buf.is_empty() {
            let mut h = rec
                .hist
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for (path, l) in buf.drain(..) {
                h.delivery[path].record_ns(l);
            }
        }
    }
}
