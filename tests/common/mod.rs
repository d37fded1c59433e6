//! Shared helpers for the in-process integration tests: start a server on 127.0.0.1:0, talk to
//! it with a raw WebSocket client sending hand-built Hocuspocus frames, build real Yjs updates
//! with yrs, read the in-memory store, and poll HTTP endpoints. Every wait is bounded.

#![allow(dead_code, clippy::unwrap_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hearth::protocol::lib0::{Reader, Writer};
use hearth::server::ServerBuilder;
use hearth::storage::{DocumentStore, MemoryStore};
use hearth::{Config, Server, ServerError, ServerHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{GetString, ReadTxn, StateVector, Text, Transact, Update};

pub mod receiver;

/// Default bound for one expected event.
pub const T: Duration = Duration::from_secs(5);

/// Runs `f`, failing the test if it takes longer than `d`.
pub async fn with_timeout<F: Future>(d: Duration, what: &str, f: F) -> F::Output {
    match tokio::time::timeout(d, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {d:?}: {what}"),
    }
}

/// How often the `wait_*` helpers check their condition again.
pub const POLL: Duration = Duration::from_millis(10);

/// Polls `cond` every [`POLL`] until it holds; fails the test after `d`, naming `what`.
pub async fn wait_until(d: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    wait_until_async(d, what, || std::future::ready(cond())).await;
}

/// [`wait_until`] for a condition that awaits (an HTTP request, a store read, a connection).
pub async fn wait_until_async<F: Future<Output = bool>>(
    d: Duration,
    what: &str,
    mut cond: impl FnMut() -> F,
) {
    let deadline = tokio::time::Instant::now() + d;
    while !cond().await {
        if tokio::time::Instant::now() >= deadline {
            panic!("condition not reached within {d:?}: {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Retries `attempt` every [`POLL`] until it succeeds and returns its value; fails the test
/// after `d`, naming `what` and the last error.
pub async fn retry_until<T, E: std::fmt::Display, F: Future<Output = Result<T, E>>>(
    d: Duration,
    what: &str,
    mut attempt: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + d;
    loop {
        match attempt().await {
            Ok(v) => return v,
            Err(e) if tokio::time::Instant::now() >= deadline => {
                panic!("not reached within {d:?}: {what} (last error: {e})")
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// server
// ---------------------------------------------------------------------------------------------

/// A running in-process server.
pub struct TestServer {
    /// Bound address.
    pub addr: SocketAddr,
    /// The operator listener's address (`/metrics`, `/cluster/owned`), if enabled.
    pub operator: Option<SocketAddr>,
    /// Server-side API.
    pub handle: ServerHandle,
    /// `Server::run`, returns after a graceful shutdown.
    pub join: JoinHandle<Result<(), ServerError>>,
}

impl TestServer {
    /// The operator listener's address; panics when `operator_listen` was empty.
    pub fn operator_addr(&self) -> SocketAddr {
        self.operator.expect("the operator listener is enabled")
    }

    /// `ws://addr/` (the Hocuspocus endpoint).
    pub fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    /// True while `name` is loaded.
    pub fn is_loaded(&self, name: &str) -> bool {
        self.handle.documents().iter().any(|d| d == name)
    }

    /// Shuts down and waits for `run()` to return.
    pub async fn stop(self) {
        self.handle.shutdown();
        with_timeout(Duration::from_secs(10), "server run() returns", self.join)
            .await
            .unwrap()
            .unwrap();
    }
}

/// A configuration for tests: loopback, memory storage, short debounce, roomy timeouts.
pub fn test_config() -> Config {
    Config {
        debounce_ms: 50,
        max_debounce_ms: 200,
        shutdown_timeout_ms: 3000,
        ..Config::for_tests()
    }
}

/// Builds, binds and runs a server; `setup` adds extensions / a store to the builder.
pub async fn start_server(
    config: Config,
    setup: impl FnOnce(ServerBuilder) -> ServerBuilder,
) -> TestServer {
    let server = with_timeout(T, "bind", setup(Server::builder(config)).bind())
        .await
        .expect("server binds");
    let addr = server.local_addr();
    let operator = server.operator_addr();
    let handle = server.handle();
    let join = tokio::spawn(server.run());
    TestServer {
        addr,
        operator,
        handle,
        join,
    }
}

/// A server with no extensions and the default (memory) store.
pub async fn start(config: Config) -> TestServer {
    start_server(config, |b| b).await
}

/// A server with its own [`MemoryStore`] that the test can read.
pub async fn start_with_store(config: Config) -> (TestServer, Arc<MemoryStore>) {
    let store = Arc::new(MemoryStore::new());
    let s = store.clone();
    (start_server(config, move |b| b.store(s)).await, store)
}

// ---------------------------------------------------------------------------------------------
// frames
// ---------------------------------------------------------------------------------------------

fn addressed(address: &str, kind: u64) -> Vec<u8> {
    let mut b = Vec::new();
    b.write_var_string(address);
    b.write_var_uint(kind);
    b
}

/// `A 02 00 token "4.8.0"` (v4 provider Auth).
pub fn auth(address: &str, token: &str) -> Vec<u8> {
    let mut b = addressed(address, 2);
    b.write_var_uint(0);
    b.write_var_string(token);
    b.write_var_string("4.8.0");
    b
}

/// `A 02 00 token` (v3 provider Auth, no version).
pub fn auth_v3(address: &str, token: &str) -> Vec<u8> {
    let mut b = addressed(address, 2);
    b.write_var_uint(0);
    b.write_var_string(token);
    b
}

fn sync(address: &str, sub: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = addressed(address, 0);
    b.write_var_uint(sub);
    b.write_var_bytes(payload);
    b
}

/// Sync step1 with a state vector.
pub fn step1(address: &str, sv: &[u8]) -> Vec<u8> {
    sync(address, 0, sv)
}

/// Sync step1 with the empty state vector.
pub fn step1_empty(address: &str) -> Vec<u8> {
    step1(address, &[0])
}

/// Sync step2 with an update.
pub fn step2(address: &str, update: &[u8]) -> Vec<u8> {
    sync(address, 1, update)
}

/// Sync update.
pub fn update(address: &str, update: &[u8]) -> Vec<u8> {
    sync(address, 2, update)
}

/// The empty update `00 00`.
pub const EMPTY_UPDATE: &[u8] = &[0, 0];

/// Encodes awareness entries (`None` state = `null`).
pub fn awareness_body(entries: &[(u64, u64, Option<&str>)]) -> Vec<u8> {
    let mut b = Vec::new();
    b.write_var_uint(entries.len() as u64);
    for (client, clock, state) in entries {
        b.write_var_uint(*client);
        b.write_var_uint(*clock);
        b.write_var_string(state.unwrap_or("null"));
    }
    b
}

/// Awareness frame.
pub fn awareness(address: &str, entries: &[(u64, u64, Option<&str>)]) -> Vec<u8> {
    awareness_raw(address, &awareness_body(entries))
}

/// Awareness frame with raw body bytes.
pub fn awareness_raw(address: &str, body: &[u8]) -> Vec<u8> {
    let mut b = addressed(address, 1);
    b.write_var_bytes(body);
    b
}

/// QueryAwareness frame.
pub fn query_awareness(address: &str) -> Vec<u8> {
    addressed(address, 3)
}

/// Stateless frame.
pub fn stateless(address: &str, payload: &str) -> Vec<u8> {
    let mut b = addressed(address, 5);
    b.write_var_string(payload);
    b
}

/// Client CLOSE frame (`A 07`).
pub fn close(address: &str) -> Vec<u8> {
    addressed(address, 7)
}

/// Address + type + raw body.
pub fn raw(address: &str, kind: u64, body: &[u8]) -> Vec<u8> {
    let mut b = addressed(address, kind);
    b.extend_from_slice(body);
    b
}

/// A decoded server → client message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    Step1(Vec<u8>),
    Step2(Vec<u8>),
    Update(Vec<u8>),
    Awareness(Vec<u8>),
    AuthRequest,
    PermissionDenied(String),
    Authenticated(String),
    QueryAwareness,
    Stateless(String),
    Close(String),
    SyncStatus(u64),
    /// The one-byte v4 Ping (no address).
    Ping,
    /// Anything else (type, rest of the frame).
    Other(u64, Vec<u8>),
}

impl Msg {
    /// Short name, for assertions on sequences.
    pub fn name(&self) -> &'static str {
        match self {
            Msg::Step1(_) => "step1",
            Msg::Step2(_) => "step2",
            Msg::Update(_) => "update",
            Msg::Awareness(_) => "awareness",
            Msg::AuthRequest => "auth-request",
            Msg::PermissionDenied(_) => "permission-denied",
            Msg::Authenticated(_) => "authenticated",
            Msg::QueryAwareness => "query-awareness",
            Msg::Stateless(_) => "stateless",
            Msg::Close(_) => "close",
            Msg::SyncStatus(_) => "sync-status",
            Msg::Ping => "ping",
            Msg::Other(..) => "other",
        }
    }
}

/// A server frame: address and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub address: String,
    pub msg: Msg,
}

/// Parses a server frame (panics on bytes the server should never send).
pub fn parse(bytes: &[u8]) -> Frame {
    if bytes == [0x09] {
        return Frame {
            address: String::new(),
            msg: Msg::Ping,
        };
    }
    let mut r = Reader::new(Bytes::copy_from_slice(bytes));
    let address = r
        .read_var_string()
        .unwrap_or_else(|e| panic!("server frame without address ({e}): {bytes:02x?}"));
    let kind = r.read_var_uint().unwrap();
    let msg = match kind {
        0 => {
            let sub = r.read_var_uint().unwrap();
            let payload = r.read_var_bytes().unwrap().to_vec();
            match sub {
                0 => Msg::Step1(payload),
                1 => Msg::Step2(payload),
                2 => Msg::Update(payload),
                s => panic!("server sent sync sub-type {s}"),
            }
        }
        1 => Msg::Awareness(r.read_var_bytes().unwrap().to_vec()),
        2 => match r.read_var_uint().unwrap() {
            0 => Msg::AuthRequest,
            1 => Msg::PermissionDenied(r.read_var_string().unwrap()),
            2 => Msg::Authenticated(r.read_var_string().unwrap()),
            s => panic!("server sent auth sub-type {s}"),
        },
        3 => Msg::QueryAwareness,
        5 => Msg::Stateless(r.read_var_string().unwrap()),
        7 => Msg::Close(r.read_var_string().unwrap()),
        8 => Msg::SyncStatus(r.read_var_uint().unwrap()),
        k => Msg::Other(k, r.rest().to_vec()),
    };
    assert_eq!(
        r.remaining(),
        0,
        "trailing bytes in server frame {bytes:02x?}"
    );
    Frame { address, msg }
}

/// Decodes an awareness body into (client, clock, state JSON or "null").
pub fn parse_awareness(body: &[u8]) -> Vec<(u64, u64, String)> {
    let mut r = Reader::new(Bytes::copy_from_slice(body));
    let n = r.read_var_uint().unwrap();
    (0..n)
        .map(|_| {
            (
                r.read_var_uint().unwrap(),
                r.read_var_uint().unwrap(),
                r.read_var_string().unwrap(),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// raw client
// ---------------------------------------------------------------------------------------------

type Stream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What the client observed next.
#[derive(Debug)]
pub enum Event {
    /// A binary frame.
    Frame(Frame),
    /// A text frame (the server must never send one).
    Text(String),
    /// A close frame with code and reason.
    Closed(Option<u16>, String),
    /// The stream ended (or failed: reset) without a close frame.
    Gone(String),
    /// Nothing within the time limit.
    Timeout,
}

/// A raw WebSocket client speaking hand-built Hocuspocus frames.
pub struct RawClient {
    ws: Stream,
    /// Binary frames received, for debugging failures.
    pub seen: usize,
}

impl RawClient {
    /// Connects to `ws://addr/`.
    pub async fn connect(addr: SocketAddr) -> Self {
        Self::connect_path(addr, "/").await
    }

    /// Connects to `ws://addr{path}`.
    pub async fn connect_path(addr: SocketAddr, path: &str) -> Self {
        let url = format!("ws://{addr}{path}");
        let (ws, _) = with_timeout(T, "websocket connect", connect_async(url))
            .await
            .expect("websocket handshake");
        Self { ws, seen: 0 }
    }

    /// Connects to `ws://addr/` with a tiny, fixed TCP receive buffer (no autotuning), so a
    /// client that stops reading exerts back-pressure on the server quickly.
    pub async fn connect_small_rcvbuf(addr: SocketAddr) -> Self {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(8 * 1024).unwrap();
        let tcp = with_timeout(T, "tcp connect", sock.connect(addr))
            .await
            .unwrap();
        let (ws, _) = with_timeout(
            T,
            "websocket handshake",
            tokio_tungstenite::client_async(format!("ws://{addr}/"), MaybeTlsStream::Plain(tcp)),
        )
        .await
        .expect("websocket handshake");
        Self { ws, seen: 0 }
    }

    /// Sends a binary frame; panics if the transport fails.
    pub async fn send(&mut self, frame: impl Into<Vec<u8>>) {
        self.try_send(frame).await.expect("send");
    }

    /// Sends a binary frame.
    pub async fn try_send(
        &mut self,
        frame: impl Into<Vec<u8>>,
    ) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        with_timeout(
            T,
            "send",
            self.ws.send(Message::Binary(Bytes::from(frame.into()))),
        )
        .await
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, text: &str) {
        with_timeout(T, "send text", self.ws.send(Message::text(text)))
            .await
            .expect("send text");
    }

    /// The next event within `d` (pings and pongs are skipped).
    pub async fn next_event(&mut self, d: Duration) -> Event {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            let next = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Event::Timeout,
                Ok(n) => n,
            };
            match next {
                None => return Event::Gone("end of stream".into()),
                Some(Err(e)) => return Event::Gone(e.to_string()),
                Some(Ok(Message::Binary(b))) => {
                    self.seen += 1;
                    return Event::Frame(parse(&b));
                }
                Some(Ok(Message::Text(t))) => return Event::Text(t.to_string()),
                Some(Ok(Message::Close(c))) => {
                    return match c {
                        Some(c) => Event::Closed(Some(u16::from(c.code)), c.reason.to_string()),
                        None => Event::Closed(None, String::new()),
                    };
                }
                Some(Ok(_)) => {} // ping / pong / raw frame
            }
        }
    }

    /// The next frame within `d`; panics on anything else.
    pub async fn recv_frame(&mut self, d: Duration) -> Frame {
        match self.next_event(d).await {
            Event::Frame(f) => f,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// The next frame within [`T`].
    pub async fn recv(&mut self) -> Frame {
        self.recv_frame(T).await
    }

    /// The next message; asserts it is for `address`.
    pub async fn recv_for(&mut self, address: &str) -> Msg {
        let f = self.recv().await;
        assert_eq!(f.address, address, "frame for another address: {f:?}");
        f.msg
    }

    /// Asserts the next frame is exactly `msg` for `address`.
    pub async fn expect(&mut self, address: &str, msg: Msg) {
        let f = self.recv().await;
        assert_eq!(
            f,
            Frame {
                address: address.into(),
                msg
            }
        );
    }

    /// Reads frames until `pred` matches one (returned last); fails after [`T`].
    pub async fn recv_until(&mut self, mut pred: impl FnMut(&Frame) -> bool) -> Vec<Frame> {
        let deadline = tokio::time::Instant::now() + T;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let f = match self.next_event(left).await {
                Event::Frame(f) => f,
                other => panic!("while waiting (after {out:?}): got {other:?}"),
            };
            let done = pred(&f);
            out.push(f);
            if done {
                return out;
            }
        }
    }

    /// Asserts nothing arrives within `d`.
    pub async fn expect_silence(&mut self, d: Duration) {
        match self.next_event(d).await {
            Event::Timeout => {}
            other => panic!("expected silence, got {other:?}"),
        }
    }

    /// Reads frames until none arrives for `quiet`; returns them (bounded by [`T`]).
    pub async fn drain(&mut self, quiet: Duration) -> Vec<Frame> {
        let deadline = tokio::time::Instant::now() + T;
        let mut out = Vec::new();
        while tokio::time::Instant::now() < deadline {
            match self.next_event(quiet).await {
                Event::Frame(f) => out.push(f),
                Event::Timeout => return out,
                other => panic!("while draining (after {out:?}): {other:?}"),
            }
        }
        panic!("frames kept coming for {T:?}: {out:?}");
    }

    /// Reads until the socket is closed; asserts the close code. Returns the frames received
    /// before the close.
    pub async fn expect_close(&mut self, code: u16) -> Vec<Frame> {
        self.expect_close_within(code, T).await
    }

    /// [`RawClient::expect_close`] with an explicit bound.
    pub async fn expect_close_within(&mut self, code: u16, d: Duration) -> Vec<Frame> {
        let deadline = tokio::time::Instant::now() + d;
        let mut frames = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                Event::Frame(f) => frames.push(f),
                Event::Closed(c, reason) => {
                    assert_eq!(
                        c,
                        Some(code),
                        "close code (reason {reason:?}, frames before {frames:?})"
                    );
                    return frames;
                }
                other => panic!("expected close {code}, got {other:?} after {frames:?}"),
            }
        }
    }

    /// Reads until the connection ends in any way (close frame, EOF, reset) within `d`.
    /// Returns the close code, if a close frame came.
    pub async fn expect_end(&mut self, d: Duration) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                Event::Frame(_) | Event::Text(_) => {}
                Event::Closed(c, _) => return c,
                Event::Gone(_) => return None,
                Event::Timeout => panic!("connection still open after {d:?}"),
            }
        }
    }

    /// Sends Auth (and optionally more frames) and expects `Authenticated "read-write"`.
    pub async fn auth(&mut self, address: &str, token: &str) {
        self.send(auth(address, token)).await;
        self.expect(address, Msg::Authenticated("read-write".into()))
            .await;
    }

    /// Full provider handshake on a fresh address: Auth + step1(empty) → Authenticated,
    /// [awareness snapshot], step1, step2; then the client's empty step2 → SyncStatus(1) (other
    /// clients' awareness updates may come first).
    /// Returns the server's full state (the step2 payload).
    pub async fn join(&mut self, address: &str) -> Vec<u8> {
        self.send(auth(address, "")).await;
        self.send(step1_empty(address)).await;
        self.expect(address, Msg::Authenticated("read-write".into()))
            .await;
        let mut m = self.recv_for(address).await;
        if matches!(m, Msg::Awareness(_)) {
            m = self.recv_for(address).await;
        }
        assert!(matches!(m, Msg::Step1(_)), "expected step1, got {m:?}");
        let state = match self.recv_for(address).await {
            Msg::Step2(s) => s,
            other => panic!("expected step2, got {other:?}"),
        };
        self.send(step2(address, EMPTY_UPDATE)).await;
        // other clients' awareness may arrive before the acknowledgement
        let frames = self
            .recv_until(|f| !matches!(f.msg, Msg::Awareness(_)))
            .await;
        assert_eq!(
            frames.last(),
            Some(&Frame {
                address: address.into(),
                msg: Msg::SyncStatus(1)
            })
        );
        state
    }

    /// Sends an update and waits for its SyncStatus(1) and its echo (either order), skipping
    /// awareness frames and application pings. Returns the echoed update.
    pub async fn edit(&mut self, address: &str, u: &[u8]) -> Vec<u8> {
        self.send(update(address, u)).await;
        let mut acked = false;
        let mut echo = None;
        let deadline = tokio::time::Instant::now() + T;
        while !(acked && echo.is_some()) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let f = self.recv_frame(left).await;
            if f.msg == Msg::Ping {
                continue;
            }
            assert_eq!(f.address, address, "{f:?}");
            match f.msg {
                Msg::SyncStatus(1) if !acked => acked = true,
                Msg::Update(u) if echo.is_none() => echo = Some(u),
                Msg::Awareness(_) => {}
                other => panic!("unexpected while editing: {other:?}"),
            }
        }
        echo.unwrap()
    }

    /// Asks for the full state with a step1 and returns the step2 payload (skips other frames).
    pub async fn fetch_state(&mut self, address: &str) -> Vec<u8> {
        self.send(step1_empty(address)).await;
        let frames = self
            .recv_until(|f| f.address == address && matches!(f.msg, Msg::Step2(_)))
            .await;
        match frames.last().map(|f| &f.msg) {
            Some(Msg::Step2(s)) => s.clone(),
            _ => unreachable!(),
        }
    }

    /// Closes the socket politely.
    pub async fn close_socket(mut self) {
        let _ = tokio::time::timeout(T, self.ws.close(None)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// yrs
// ---------------------------------------------------------------------------------------------

/// A client-side Yjs document with one text `t`.
pub struct YDoc {
    pub doc: yrs::Doc,
}

impl YDoc {
    /// A document with a fixed client id (keep ids below 2^32).
    pub fn new(client_id: u64) -> Self {
        Self {
            doc: yrs::Doc::with_client_id(client_id),
        }
    }

    /// Appends `s` to text `t`; returns the v1 update of the change.
    pub fn insert(&self, s: &str) -> Vec<u8> {
        let t = self.doc.get_or_insert_text("t");
        let mut txn = self.doc.transact_mut();
        let len = t.len(&txn);
        t.insert(&mut txn, len, s);
        txn.encode_update_v1()
    }

    /// Applies a v1 update.
    pub fn apply(&self, update: &[u8]) {
        let u = Update::decode_v1(update).expect("valid update");
        self.doc.transact_mut().apply_update(u).expect("applies");
    }

    /// Text `t`.
    pub fn text(&self) -> String {
        let t = self.doc.get_or_insert_text("t");
        t.get_string(&self.doc.transact())
    }

    /// Encoded state vector.
    pub fn sv(&self) -> Vec<u8> {
        self.doc.transact().state_vector().encode_v1()
    }

    /// Full state as a v1 update.
    pub fn state(&self) -> Vec<u8> {
        self.doc
            .transact()
            .encode_state_as_update_v1(&StateVector::default())
    }
}

/// Text `t` of the document described by `updates` applied in order.
pub fn text_of<'a>(updates: impl IntoIterator<Item = &'a [u8]>) -> String {
    let d = YDoc::new(1);
    for u in updates {
        d.apply(u);
    }
    d.text()
}

/// Text `t` of what `store` holds for `name` (snapshot + log).
pub async fn store_text(store: &MemoryStore, name: &str) -> String {
    let stored = store.load(name).await.unwrap();
    text_of(
        stored
            .snapshot
            .iter()
            .chain(stored.updates.iter())
            .map(Vec::as_slice),
    )
}

// ---------------------------------------------------------------------------------------------
// liveness, HTTP
// ---------------------------------------------------------------------------------------------

/// A fresh client joins `doc`, edits it, gets its ack and echo, and sees its edit in a refetch.
pub async fn assert_syncs(addr: SocketAddr, doc: &str) {
    with_timeout(Duration::from_secs(10), "liveness check", async {
        let mut c = RawClient::connect(addr).await;
        let state = c.join(doc).await;
        let y = YDoc::new(u64::from(rand_u32()));
        y.apply(&state);
        let u = y.insert("x");
        c.edit(doc, &u).await;
        let state = c.fetch_state(doc).await;
        assert_eq!(text_of([state.as_slice()]), y.text());
        c.close_socket().await;
    })
    .await;
}

fn rand_u32() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(1000);
    N.fetch_add(1, Ordering::Relaxed)
}

/// `GET path` over a fresh TCP connection; returns (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    with_timeout(T, "http get", async {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        tcp.read_to_end(&mut buf).await.unwrap();
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad HTTP answer: {text:?}"));
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    })
    .await
}

/// Sum of every sample of metric `name` in `/metrics` (0 if absent) on the operator listener
/// at `operator` ([`TestServer::operator_addr`]).
pub async fn metric(operator: SocketAddr, name: &str) -> f64 {
    let (status, body) = http_get(operator, "/metrics").await;
    assert_eq!(status, 200);
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A small deterministic PRNG (xorshift64*), for seeded fuzzing without extra dependencies.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform-ish in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// a store with injectable faults
// ---------------------------------------------------------------------------------------------

/// One write the server attempted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteAttempt {
    /// `append` or `compact`.
    pub op: &'static str,
    pub name: String,
    pub epoch: hearth::storage::Epoch,
    /// Failed by injection, fenced, or committed.
    pub outcome: &'static str,
}

/// Wraps a [`MemoryStore`]: appends can be made to fail or to be slow; every write attempt is
/// recorded with its epoch.
#[derive(Debug, Default)]
pub struct FlakyStore {
    pub inner: MemoryStore,
    pub fail_appends: std::sync::atomic::AtomicBool,
    pub append_delay_ms: std::sync::atomic::AtomicU64,
    pub writes: std::sync::Mutex<Vec<WriteAttempt>>,
}

impl FlakyStore {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn set_failing(&self, on: bool) {
        self.fail_appends
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn set_append_delay(&self, d: Duration) {
        self.append_delay_ms
            .store(d.as_millis() as u64, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn writes(&self) -> Vec<WriteAttempt> {
        self.writes.lock().unwrap().clone()
    }

    fn record(&self, op: &'static str, name: &str, epoch: i64, outcome: &'static str) {
        self.writes.lock().unwrap().push(WriteAttempt {
            op,
            name: name.to_owned(),
            epoch,
            outcome,
        });
    }
}

#[async_trait::async_trait]
impl DocumentStore for FlakyStore {
    async fn acquire_epoch(&self, name: &str) -> Result<i64, hearth::storage::StoreError> {
        self.inner.acquire_epoch(name).await
    }

    async fn current_epoch(&self, name: &str) -> Result<Option<i64>, hearth::storage::StoreError> {
        self.inner.current_epoch(name).await
    }

    async fn create_epoch(&self, name: &str) -> Result<Option<i64>, hearth::storage::StoreError> {
        self.inner.create_epoch(name).await
    }

    async fn load(
        &self,
        name: &str,
    ) -> Result<hearth::storage::StoredDocument, hearth::storage::StoreError> {
        self.inner.load(name).await
    }

    async fn append(
        &self,
        batch: &[hearth::storage::Append],
    ) -> Result<Vec<hearth::storage::AppendOutcome>, hearth::storage::StoreError> {
        let delay = self
            .append_delay_ms
            .load(std::sync::atomic::Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if self.fail_appends.load(std::sync::atomic::Ordering::SeqCst) {
            for a in batch {
                self.record("append", &a.name, a.epoch, "injected-failure");
            }
            return Err(hearth::storage::StoreError::Database(
                "injected append failure".into(),
            ));
        }
        let out = self.inner.append(batch).await?;
        for (a, o) in batch.iter().zip(&out) {
            let outcome = match o {
                hearth::storage::AppendOutcome::Committed(_) => "committed",
                hearth::storage::AppendOutcome::Fenced { .. } => "fenced",
            };
            self.record("append", &a.name, a.epoch, outcome);
        }
        Ok(out)
    }

    async fn compact(
        &self,
        name: &str,
        epoch: i64,
        state: &[u8],
        upto: i64,
    ) -> Result<(), hearth::storage::StoreError> {
        let r = self.inner.compact(name, epoch, state, upto).await;
        let outcome = match &r {
            Ok(()) => "committed",
            Err(e) if e.is_fenced() => "fenced",
            Err(_) => "error",
        };
        self.record("compact", name, epoch, outcome);
        r
    }

    async fn list(
        &self,
        query: &hearth::storage::ListQuery,
    ) -> Result<Vec<hearth::storage::DocumentInfo>, hearth::storage::StoreError> {
        self.inner.list(query).await
    }

    async fn delete(&self, name: &str, epoch: i64) -> Result<bool, hearth::storage::StoreError> {
        let r = self.inner.delete(name, epoch).await;
        let outcome = match &r {
            Ok(_) => "committed",
            Err(e) if e.is_fenced() => "fenced",
            Err(_) => "error",
        };
        self.record("delete", name, epoch, outcome);
        r
    }

    async fn ping(&self) -> Result<(), hearth::storage::StoreError> {
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "flaky-memory"
    }
}

/// A server using `store`.
pub async fn start_with(
    config: Config,
    store: Arc<FlakyStore>,
    setup: impl FnOnce(ServerBuilder) -> ServerBuilder,
) -> TestServer {
    start_server(config, move |b| setup(b.store(store))).await
}

// ---------------------------------------------------------------------------------------------
// clients behind a trusted proxy
// ---------------------------------------------------------------------------------------------

impl RawClient {
    /// Connects to `ws://addr{path}` with `X-Forwarded-For: forwarded_for` (the client address
    /// when the server trusts 127.0.0.1 as a proxy); `Err(status)` when the server answers the
    /// upgrade with anything other than 101.
    pub async fn try_connect_forwarded(
        addr: SocketAddr,
        path: &str,
        forwarded_for: &str,
    ) -> Result<Self, u16> {
        use tokio_tungstenite::tungstenite::Error as WsError;
        use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
        use tokio_tungstenite::tungstenite::http::HeaderValue;
        let mut req = format!("ws://{addr}{path}").into_client_request().unwrap();
        req.headers_mut().insert(
            "x-forwarded-for",
            HeaderValue::from_str(forwarded_for).unwrap(),
        );
        match with_timeout(T, "websocket connect", connect_async(req)).await {
            Ok((ws, _)) => Ok(Self { ws, seen: 0 }),
            Err(WsError::Http(resp)) => Err(resp.status().as_u16()),
            Err(e) => panic!("upgrade failed without an HTTP answer: {e}"),
        }
    }

    /// Reads without parsing (e.g. a y-websocket socket) until the connection ends; the close
    /// code, if a close frame came. Fails the test if it is still open after `d`.
    pub async fn close_code_unparsed(&mut self, d: Duration) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => panic!("connection still open after {d:?}"),
                Ok(None | Some(Err(_))) => return None,
                Ok(Some(Ok(Message::Close(c)))) => return c.map(|c| u16::from(c.code)),
                Ok(Some(Ok(_))) => {}
            }
        }
    }
}
