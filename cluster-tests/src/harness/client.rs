//! [`TestClient`]: a raw Hocuspocus-protocol client with a `yrs::Doc`, for checking what the
//! server acknowledged against what it stored.
//!
//! The client behaves like one `@hocuspocus/provider` v4 tab on one document:
//!
//! * on connect it sends `Auth(token, "4.8.0")`, `Sync step1(sv)` and (if set) its awareness
//!   state, without waiting; it answers every server step1 with a step2 of everything the server
//!   lacks, applies server step2s and updates, answers Ping with Pong;
//! * [`TestClient::insert`] pushes a unique string ("marker") into the `Y.Array` named
//!   [`LOG`] and sends the resulting update at once (while disconnected the edit stays in the
//!   local doc, like an offline tab);
//! * every `SyncStatus` is matched, in order, against a FIFO of the frames that elicit one on the
//!   current connection: each update (one marker) and each step2 we sent. A `SyncStatus(1)` for an
//!   update marks its marker acknowledged. A `SyncStatus(1)` for a step2 marks every marker that
//!   was unacknowledged when that step2 was sent: the step2 carried whatever of them the server
//!   lacked, and the server acknowledges a step2 only once everything it had applied before it is
//!   committed (architecture: "released once everything applied so far is committed");
//! * [`TestClient::reconnect`] opens a new socket and keeps the doc, so the sync exchange
//!   re-delivers whatever the server lost — what a browser tab does.
//!
//! Every wait is bounded. State is shared with the socket task behind one mutex, and all access
//! to the doc happens under it (so there is never more than one yrs transaction at a time).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use hearth::protocol::awareness;
use hearth::protocol::lib0::Writer as _;
use hearth::protocol::message::{PONG_FRAME, ServerMessage, frame, kind};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use yrs::updates::decoder::Decode as _;
use yrs::updates::encoder::Encode as _;
use yrs::{Any, Array as _, ArrayRef, Doc, Out, ReadTxn as _, StateVector, Transact as _, Update};

/// Name of the `Y.Array` the markers go into.
pub const LOG: &str = "log";

/// The provider version sent in Auth (a v4 provider).
pub const PROVIDER_VERSION: &str = "4.8.0";

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

// ---------------------------------------------------------------------------------------------
// Server → client frames
// ---------------------------------------------------------------------------------------------

pub use hearth::protocol::client::{ServerFrame, ServerMsg, decode_server_frame};

/// `A 02 00 token [version]` — the provider's Auth frame.
pub fn auth_frame(address: &str, token: &str, version: Option<&str>) -> Bytes {
    let mut body = Vec::new();
    body.write_var_uint(kind::AUTH);
    body.write_var_uint(0);
    body.write_var_string(token);
    if let Some(v) = version {
        body.write_var_string(v);
    }
    frame(Some(address), &body)
}

// ---------------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------------

/// How a [`TestClient`] connects.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Auth token (empty = none, as a provider without a token sends).
    pub token: String,
    /// Provider version sent in Auth (`None` = a v3 provider's Auth without a version).
    pub provider_version: Option<String>,
    /// Yjs client id (`None` = random).
    pub client_id: Option<u64>,
    /// Prefix of the markers [`TestClient::insert_next`] makes: `<label>:<n>`.
    pub label: String,
    /// Bound for the TCP + WebSocket connect.
    pub connect_timeout: Duration,
    /// Bound for [`TestClient::connect_with`]'s wait for `Authenticated` + the server's step2.
    pub sync_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        ClientOptions {
            token: String::new(),
            provider_version: Some(PROVIDER_VERSION.into()),
            client_id: None,
            label: format!("c{}", N.fetch_add(1, Ordering::Relaxed)),
            connect_timeout: Duration::from_secs(5),
            sync_timeout: Duration::from_secs(10),
        }
    }
}

impl ClientOptions {
    /// Options with this marker label.
    pub fn labelled(label: impl Into<String>) -> ClientOptions {
        ClientOptions {
            label: label.into(),
            ..Default::default()
        }
    }

    /// With this token.
    pub fn token(mut self, token: impl Into<String>) -> ClientOptions {
        self.token = token.into();
        self
    }
}

/// What a frame that elicits a `SyncStatus` carried.
#[derive(Debug, Clone)]
enum Expect {
    /// An update with one marker (index into `sent`).
    Update(usize),
    /// A step2 sent while these markers were unacknowledged.
    Step2(Vec<usize>),
}

/// The client's state: its document, the current connection, and the history of markers.
/// Predicates of [`TestClient::wait_for`] and [`TestClient::view`] read it under the lock.
pub struct Snapshot {
    doc: Doc,
    log: ArrayRef,
    address: String,
    token: String,
    version: Option<String>,
    // the current connection (generation 0 = never connected)
    generation: u64,
    tx: Option<mpsc::UnboundedSender<Message>>,
    connected: bool,
    authenticated: Option<String>,
    denied: Vec<String>,
    doc_closed: Option<String>,
    socket_close: Option<(u16, String)>,
    server_step2: bool,
    handshake_acked: bool,
    fifo: VecDeque<Expect>,
    enqueued: u64,
    flushed: u64,
    // across connections
    connects: u32,
    sent: Vec<String>,
    acked: Vec<bool>,
    acked_count: usize,
    rejected: Vec<usize>,
    statuses: (u64, u64),
    anomalies: Vec<String>,
    awareness: HashMap<u64, (u64, Option<String>)>,
    local_awareness: Option<String>,
    local_clock: u64,
    stateless: Vec<String>,
    events: Vec<String>,
}

/// At most this many [`Snapshot::events`] are kept.
const MAX_EVENTS: usize = 1000;

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("address", &self.address)
            .field("generation", &self.generation)
            .field("connected", &self.connected)
            .field("authenticated", &self.authenticated)
            .field("denied", &self.denied)
            .field("doc_closed", &self.doc_closed)
            .field("socket_close", &self.socket_close)
            .field("server_step2", &self.server_step2)
            .field("handshake_acked", &self.handshake_acked)
            .field("awaiting_status", &self.fifo.len())
            .field("enqueued", &self.enqueued)
            .field("flushed", &self.flushed)
            .field("sent", &self.sent.len())
            .field("acked", &self.acked_count)
            .field("rejected", &self.rejected.len())
            .field("statuses(ok, rejected)", &self.statuses)
            .field("anomalies", &self.anomalies)
            .field("events", &self.events)
            .finish_non_exhaustive()
    }
}

impl Snapshot {
    /// The socket is open (as far as the client knows).
    pub fn connected(&self) -> bool {
        self.connected
    }
    /// The scope of `Authenticated` on the current connection.
    pub fn authenticated(&self) -> Option<&str> {
        self.authenticated.as_deref()
    }
    /// `PermissionDenied` reasons received on the current connection.
    pub fn denied(&self) -> &[String] {
        &self.denied
    }
    /// The reason of a document-level `CLOSE` on the current connection.
    pub fn doc_closed(&self) -> Option<&str> {
        self.doc_closed.as_deref()
    }
    /// Close code and reason once the current socket ended (1006 = no close frame).
    pub fn socket_close(&self) -> Option<(u16, &str)> {
        self.socket_close.as_ref().map(|(c, r)| (*c, r.as_str()))
    }
    /// The server's step2 arrived on the current connection (the provider's `synced`).
    pub fn synced(&self) -> bool {
        self.server_step2
    }
    /// Our step2 on the current connection was acknowledged (`unsyncedChanges` reached 0).
    pub fn handshake_acked(&self) -> bool {
        self.handshake_acked
    }
    /// How many sockets this client opened.
    pub fn connects(&self) -> u32 {
        self.connects
    }
    /// Frames queued on the current connection but not yet written to the socket.
    pub fn unflushed(&self) -> u64 {
        self.enqueued - self.flushed
    }
    /// `SyncStatus` frames still expected on the current connection.
    pub fn awaiting_status(&self) -> usize {
        self.fifo.len()
    }
    /// Markers inserted so far (every connection), in order.
    pub fn sent(&self) -> &[String] {
        &self.sent
    }
    /// Number of acknowledged markers.
    pub fn acked_count(&self) -> usize {
        self.acked_count
    }
    /// True when every inserted marker is acknowledged.
    pub fn all_acked(&self) -> bool {
        self.acked_count == self.sent.len()
    }
    /// Acknowledged markers, in insertion order.
    pub fn acked(&self) -> Vec<String> {
        self.sent
            .iter()
            .zip(&self.acked)
            .filter(|(_, a)| **a)
            .map(|(m, _)| m.clone())
            .collect()
    }
    /// Markers not acknowledged (yet), in insertion order.
    pub fn unacked(&self) -> Vec<String> {
        self.sent
            .iter()
            .zip(&self.acked)
            .filter(|(_, a)| !**a)
            .map(|(m, _)| m.clone())
            .collect()
    }
    /// Markers whose update got `SyncStatus(0)`.
    pub fn rejected(&self) -> Vec<String> {
        self.rejected
            .iter()
            .map(|i| self.sent[*i].clone())
            .collect()
    }
    /// (`SyncStatus(1)`, `SyncStatus(0)`) received so far, every connection.
    pub fn statuses(&self) -> (u64, u64) {
        self.statuses
    }
    /// Protocol surprises (undecodable frames, a SyncStatus nobody waited for, …).
    pub fn anomalies(&self) -> &[String] {
        &self.anomalies
    }
    /// The markers in the local doc, in array order.
    pub fn contents(&self) -> Vec<String> {
        let txn = self.doc.transact();
        self.log
            .iter(&txn)
            .map(|v| match v {
                Out::Any(Any::String(s)) => s.to_string(),
                other => format!("<non-string {other:?}>"),
            })
            .collect()
    }
    /// The local doc's length.
    pub fn len(&self) -> u32 {
        self.log.len(&self.doc.transact())
    }
    /// True when the local doc's array is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Awareness states seen (client id → JSON), removed ones excluded.
    pub fn awareness(&self) -> HashMap<u64, String> {
        self.awareness
            .iter()
            .filter_map(|(id, (_, s))| s.clone().map(|s| (*id, s)))
            .collect()
    }
    /// Stateless payloads received.
    pub fn stateless(&self) -> &[String] {
        &self.stateless
    }
    /// Connection-level events in order, every connection: `connect`, `Authenticated(scope)`,
    /// `PermissionDenied(reason)`, `Close(reason)`, `step2`, `socket closed (code, reason)`
    /// (updates, awareness and SyncStatus are not listed).
    pub fn events(&self) -> &[String] {
        &self.events
    }

    fn event(&mut self, e: String) {
        if self.events.len() < MAX_EVENTS {
            self.events.push(e);
        }
    }

    /// The local doc's state vector (v1 encoding).
    pub fn state_vector(&self) -> Vec<u8> {
        self.doc.transact().state_vector().encode_v1()
    }

    fn send(&mut self, frame: Bytes) -> bool {
        if !self.connected {
            return false;
        }
        let Some(tx) = &self.tx else { return false };
        if tx.send(Message::Binary(frame)).is_err() {
            return false;
        }
        self.enqueued += 1;
        true
    }

    fn mark_acked(&mut self, i: usize) {
        if !self.acked[i] {
            self.acked[i] = true;
            self.acked_count += 1;
        }
    }

    fn awareness_frame(&self) -> Option<Bytes> {
        let state = self.local_awareness.as_deref()?;
        let body =
            awareness::encode_update([(self.doc.client_id().get(), self.local_clock, Some(state))]);
        Some(ServerMessage::Awareness(&body).frame(Some(&self.address)))
    }

    fn apply(&mut self, what: &str, update: &[u8]) {
        match Update::decode_v1(update) {
            Ok(u) => {
                let r = self.doc.transact_mut().apply_update(u);
                if let Err(e) = r {
                    self.anomalies.push(format!("{what} failed to apply: {e}"));
                }
            }
            Err(e) => self.anomalies.push(format!("{what} undecodable: {e}")),
        }
    }

    fn on_frame(&mut self, bytes: Bytes) {
        let f = match decode_server_frame(bytes.clone()) {
            Ok(f) => f,
            Err(e) => {
                self.anomalies.push(format!(
                    "undecodable frame {:02x?}: {e}",
                    &bytes[..bytes.len().min(32)]
                ));
                return;
            }
        };
        let msg = match f {
            ServerFrame::Ping => {
                self.send(Bytes::from_static(&[PONG_FRAME]));
                return;
            }
            ServerFrame::Addressed { address, msg } => {
                if address != self.address {
                    self.anomalies
                        .push(format!("frame for foreign address {address:?}: {msg:?}"));
                    return;
                }
                msg
            }
        };
        match msg {
            ServerMsg::Step1(sv) => match StateVector::decode_v1(&sv) {
                Ok(sv) => {
                    let diff = self.doc.transact().encode_state_as_update_v1(&sv);
                    let covers = (0..self.sent.len()).filter(|i| !self.acked[*i]).collect();
                    if self.send(ServerMessage::SyncStep2(&diff).frame(Some(&self.address))) {
                        self.fifo.push_back(Expect::Step2(covers));
                    }
                }
                Err(e) => self
                    .anomalies
                    .push(format!("server step1 undecodable: {e}")),
            },
            ServerMsg::Step2(u) => {
                self.apply("server step2", &u);
                if !self.server_step2 {
                    self.event("step2".into());
                }
                self.server_step2 = true;
            }
            ServerMsg::Update(u) => self.apply("server update", &u),
            ServerMsg::Awareness(b) => match awareness::decode_update(b, usize::MAX) {
                Ok(entries) => {
                    for e in entries {
                        let known = self.awareness.get(&e.client).map(|(c, _)| *c);
                        if known.is_none_or(|k| e.clock > k || (e.clock == k && e.state.is_none()))
                        {
                            self.awareness
                                .insert(e.client, (e.clock, e.state.map(|s| s.to_string())));
                        }
                    }
                }
                Err(e) => self.anomalies.push(format!("awareness undecodable: {e}")),
            },
            ServerMsg::AuthRequest => {
                let f = auth_frame(&self.address, &self.token, self.version.as_deref());
                self.send(f);
            }
            ServerMsg::PermissionDenied(r) => {
                self.event(format!("PermissionDenied({r})"));
                self.denied.push(r);
            }
            ServerMsg::Authenticated(scope) => {
                self.event(format!("Authenticated({scope})"));
                self.authenticated = Some(scope);
            }
            ServerMsg::QueryAwareness => {
                if let Some(f) = self.awareness_frame() {
                    self.send(f);
                }
            }
            ServerMsg::Stateless(s) => self.stateless.push(s),
            ServerMsg::Close(reason) => {
                self.event(format!("Close({reason})"));
                self.doc_closed = Some(reason);
            }
            ServerMsg::SyncStatus(ok) => {
                if ok {
                    self.statuses.0 += 1;
                } else {
                    self.statuses.1 += 1;
                }
                match self.fifo.pop_front() {
                    Some(Expect::Update(i)) if ok => self.mark_acked(i),
                    Some(Expect::Update(i)) => self.rejected.push(i),
                    Some(Expect::Step2(covers)) if ok => {
                        self.handshake_acked = true;
                        for i in covers {
                            self.mark_acked(i);
                        }
                    }
                    Some(Expect::Step2(_)) => {
                        self.anomalies.push("SyncStatus(0) for our step2".into());
                    }
                    None => self
                        .anomalies
                        .push(format!("SyncStatus({ok}) with nothing awaiting one")),
                }
            }
            ServerMsg::Other(k) => self.anomalies.push(format!("unexpected message type {k}")),
        }
    }
}

#[derive(Debug)]
struct Inner {
    state: Mutex<Snapshot>,
    changed: Notify,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Snapshot> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One simulated provider tab on one document. Cheap to share (`Arc<TestClient>`): every
/// method takes `&self`. Dropping it drops the socket.
#[derive(Debug)]
pub struct TestClient {
    inner: Arc<Inner>,
    url: Mutex<String>,
    opts: ClientOptions,
    task: Mutex<Option<JoinHandle<()>>>,
    next: AtomicU64,
}

impl TestClient {
    /// Connects to `url` for document `doc` with `token` and waits (bounded) until it is
    /// authenticated and has the server's step2.
    pub async fn connect(url: &str, doc: &str, token: &str) -> anyhow::Result<TestClient> {
        Self::connect_with(url, doc, ClientOptions::default().token(token)).await
    }

    /// [`connect`](Self::connect) with options.
    pub async fn connect_with(
        url: &str,
        doc: &str,
        opts: ClientOptions,
    ) -> anyhow::Result<TestClient> {
        let limit = opts.sync_timeout;
        let c = Self::start(url, doc, opts).await?;
        c.wait_synced(limit).await?;
        Ok(c)
    }

    /// Opens the socket and sends Auth + step1 (+ awareness) without waiting for answers.
    pub async fn start(url: &str, doc: &str, opts: ClientOptions) -> anyhow::Result<TestClient> {
        let ydoc = match opts.client_id {
            Some(id) => Doc::with_client_id(id),
            None => Doc::new(),
        };
        let log = ydoc.get_or_insert_array(LOG);
        let state = Snapshot {
            doc: ydoc,
            log,
            address: doc.to_string(),
            token: opts.token.clone(),
            version: opts.provider_version.clone(),
            generation: 0,
            tx: None,
            connected: false,
            authenticated: None,
            denied: Vec::new(),
            doc_closed: None,
            socket_close: None,
            server_step2: false,
            handshake_acked: false,
            fifo: VecDeque::new(),
            enqueued: 0,
            flushed: 0,
            connects: 0,
            sent: Vec::new(),
            acked: Vec::new(),
            acked_count: 0,
            rejected: Vec::new(),
            statuses: (0, 0),
            anomalies: Vec::new(),
            awareness: HashMap::new(),
            local_awareness: None,
            local_clock: 0,
            stateless: Vec::new(),
            events: Vec::new(),
        };
        let c = TestClient {
            inner: Arc::new(Inner {
                state: Mutex::new(state),
                changed: Notify::new(),
            }),
            url: Mutex::new(url.to_string()),
            opts,
            task: Mutex::new(None),
            next: AtomicU64::new(0),
        };
        c.open().await?;
        Ok(c)
    }

    async fn open(&self) -> anyhow::Result<()> {
        let url = self.url();
        let (ws, _) = timeout(
            self.opts.connect_timeout,
            tokio_tungstenite::connect_async(url.as_str()),
        )
        .await
        .with_context(|| format!("connecting to {url} timed out"))?
        .with_context(|| format!("connecting to {url}"))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let generation = {
            let mut st = self.inner.lock();
            st.generation += 1;
            st.connects += 1;
            st.tx = Some(tx);
            st.connected = true;
            st.authenticated = None;
            st.denied.clear();
            st.doc_closed = None;
            st.socket_close = None;
            st.server_step2 = false;
            st.handshake_acked = false;
            st.fifo.clear();
            st.enqueued = 0;
            st.flushed = 0;
            st.event("connect".into());
            let auth = auth_frame(&st.address, &st.token, st.version.as_deref());
            st.send(auth);
            let sv = st.doc.transact().state_vector().encode_v1();
            let step1 = ServerMessage::SyncStep1(&sv).frame(Some(&st.address));
            st.send(step1);
            if let Some(f) = st.awareness_frame() {
                st.send(f);
            }
            st.generation
        };
        let task = tokio::spawn(run(self.inner.clone(), ws, rx, generation));
        if let Some(old) = self.lock_task().replace(task) {
            old.abort();
        }
        self.inner.changed.notify_waiters();
        Ok(())
    }

    fn lock_task(&self) -> MutexGuard<'_, Option<JoinHandle<()>>> {
        self.task.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The URL the next (re)connect uses.
    pub fn url(&self) -> String {
        self.url.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The document name.
    pub fn doc_name(&self) -> String {
        self.inner.lock().address.clone()
    }

    /// The Yjs client id.
    pub fn client_id(&self) -> u64 {
        self.inner.lock().doc.client_id().get()
    }

    /// Reads the state under the lock.
    pub fn view<R>(&self, f: impl FnOnce(&Snapshot) -> R) -> R {
        f(&self.inner.lock())
    }

    /// Inserts `marker` into the array and sends the update if connected (else it stays local
    /// until the next connect's sync exchange).
    pub fn insert(&self, marker: &str) {
        {
            let mut st = self.inner.lock();
            let sv = st.doc.transact().state_vector();
            {
                let mut txn = st.doc.transact_mut();
                st.log.push_back(&mut txn, marker);
            }
            let update = st.doc.transact().encode_state_as_update_v1(&sv);
            let i = st.sent.len();
            st.sent.push(marker.to_string());
            st.acked.push(false);
            let f = ServerMessage::SyncUpdate(&update).frame(Some(&st.address));
            if st.send(f) {
                st.fifo.push_back(Expect::Update(i));
            }
        }
        self.inner.changed.notify_waiters();
    }

    /// Inserts the next marker `<label>:<n>` and returns it.
    pub fn insert_next(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let m = format!("{}:{n}", self.opts.label);
        self.insert(&m);
        m
    }

    /// Markers inserted so far, in order.
    pub fn sent(&self) -> Vec<String> {
        self.view(|s| s.sent.clone())
    }

    /// Acknowledged markers, in insertion order.
    pub fn acked(&self) -> Vec<String> {
        self.view(Snapshot::acked)
    }

    /// Unacknowledged markers, in insertion order.
    pub fn unacked(&self) -> Vec<String> {
        self.view(Snapshot::unacked)
    }

    /// Markers present in the local doc.
    pub fn contents(&self) -> Vec<String> {
        self.view(Snapshot::contents)
    }

    /// Waits (≤ `limit`) until `pred` holds; the error describes the client's state.
    pub async fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&Snapshot) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let notified = self.inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = self.inner.lock();
                if pred(&st) {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    bail!(
                        "client {:?} on {:?}: {what} did not happen within {limit:?}; state: {:?}",
                        self.opts.label,
                        st.address,
                        *st
                    );
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let _ = timeout(left.min(Duration::from_millis(100)), notified).await;
        }
    }

    /// Waits until authenticated and synced (server step2 applied). Fails at once on
    /// `PermissionDenied` or a closed socket.
    pub async fn wait_synced(&self, limit: Duration) -> anyhow::Result<()> {
        self.wait_for("Authenticated + server step2", limit, |s| {
            (s.authenticated.is_some() && s.server_step2)
                || !s.denied.is_empty()
                || !s.connected
                || s.doc_closed.is_some()
        })
        .await?;
        self.view(|s| {
            if s.authenticated.is_some() && s.server_step2 && s.denied.is_empty() {
                Ok(())
            } else {
                Err(anyhow::anyhow!("handshake failed: {s:?}"))
            }
        })
    }

    /// Waits until every inserted marker is acknowledged.
    pub async fn wait_all_acked(&self, limit: Duration) -> anyhow::Result<()> {
        self.wait_for("every marker acknowledged", limit, Snapshot::all_acked)
            .await
    }

    /// Waits until everything queued on the current connection was written to the socket
    /// (handed to the kernel: on loopback the server's kernel then holds the bytes).
    pub async fn wait_flushed(&self, limit: Duration) -> anyhow::Result<()> {
        self.wait_for("every frame written to the socket", limit, |s| {
            s.enqueued == s.flushed
        })
        .await
    }

    /// Closes the current socket with a WebSocket close handshake (bounded), keeping the doc.
    pub async fn close(&self) {
        {
            let mut st = self.inner.lock();
            st.tx = None;
        }
        let task = self.lock_task().take();
        if let Some(mut t) = task
            && timeout(Duration::from_secs(2), &mut t).await.is_err()
        {
            t.abort();
        }
        self.mark_gone((1000, "closed by the test".into()));
    }

    /// Drops the current socket without a close handshake (a crashed tab or a cut network),
    /// keeping the doc.
    pub fn drop_connection(&self) {
        if let Some(t) = self.lock_task().take() {
            t.abort();
        }
        self.mark_gone((1006, "dropped by the test".into()));
    }

    fn mark_gone(&self, end: (u16, String)) {
        let mut st = self.inner.lock();
        st.tx = None;
        if st.connected {
            st.connected = false;
            st.event(format!("socket closed {end:?}"));
            st.socket_close.get_or_insert(end);
        }
        drop(st);
        self.inner.changed.notify_waiters();
    }

    /// Drops the current socket, connects again (to `url`, or the last URL) with the same doc
    /// and waits until synced. Unacknowledged edits reach the server through the sync exchange.
    pub async fn reconnect(&self, url: Option<&str>) -> anyhow::Result<()> {
        self.drop_connection();
        if let Some(u) = url {
            *self.url.lock().unwrap_or_else(|p| p.into_inner()) = u.to_string();
        }
        self.open().await?;
        self.wait_synced(self.opts.sync_timeout).await
    }

    /// [`reconnect`](Self::reconnect), retrying failed connects until `limit` passes (for a
    /// server that is restarting).
    pub async fn reconnect_within(&self, url: Option<&str>, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            match self.reconnect(url).await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Sets (or with `None` removes) this client's awareness state and sends it.
    pub fn set_awareness(&self, state_json: Option<&str>) {
        {
            let mut st = self.inner.lock();
            st.local_clock += 1;
            let id = st.doc.client_id().get();
            let body = awareness::encode_update([(id, st.local_clock, state_json)]);
            st.local_awareness = state_json.map(str::to_string);
            let f = ServerMessage::Awareness(&body).frame(Some(&st.address));
            st.send(f);
        }
        self.inner.changed.notify_waiters();
    }

    /// Awareness states this client has seen (client id → JSON).
    pub fn awareness_states(&self) -> HashMap<u64, String> {
        self.view(Snapshot::awareness)
    }

    /// Sends a Stateless message.
    pub fn send_stateless(&self, payload: &str) {
        let mut st = self.inner.lock();
        let f = ServerMessage::Stateless(payload).frame(Some(&st.address));
        st.send(f);
    }

    /// Sends raw bytes as one binary frame (for bad-input tests).
    pub fn send_raw(&self, bytes: Vec<u8>) -> bool {
        self.inner.lock().send(Bytes::from(bytes))
    }
}

impl Drop for TestClient {
    fn drop(&mut self) {
        if let Some(t) = self.lock_task().take() {
            t.abort();
        }
    }
}

async fn run(
    inner: Arc<Inner>,
    mut ws: Ws,
    mut rx: mpsc::UnboundedReceiver<Message>,
    generation: u64,
) {
    let end: (u16, String) = loop {
        tokio::select! {
            m = rx.recv() => match m {
                Some(m) => {
                    if let Err(e) = ws.send(m).await {
                        break (1006, format!("send failed: {e}"));
                    }
                    let mut st = inner.lock();
                    if st.generation == generation {
                        st.flushed += 1;
                    }
                    drop(st);
                    inner.changed.notify_waiters();
                }
                None => {
                    let _ = timeout(Duration::from_secs(2), ws.close(None)).await;
                    break (1000, "closed by the client".into());
                }
            },
            f = ws.next() => match f {
                Some(Ok(Message::Binary(b))) => {
                    let mut st = inner.lock();
                    if st.generation == generation {
                        st.on_frame(b);
                    }
                    drop(st);
                    inner.changed.notify_waiters();
                }
                Some(Ok(Message::Close(c))) => {
                    break match c {
                        Some(c) => (u16::from(c.code), c.reason.to_string()),
                        None => (1005, String::new()),
                    };
                }
                Some(Ok(Message::Text(t))) => {
                    let mut st = inner.lock();
                    if st.generation == generation {
                        st.anomalies.push(format!("text frame {t:?}"));
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => break (1006, e.to_string()),
                None => break (1006, "end of stream".into()),
            },
        }
    };
    let mut st = inner.lock();
    if st.generation == generation && st.connected {
        st.connected = false;
        st.tx = None;
        st.event(format!("socket closed {end:?}"));
        st.socket_close.get_or_insert(end);
    }
    drop(st);
    inner.changed.notify_waiters();
}
