//! The Hocuspocus socket task: per-address authentication state machine,
//! multiplexing, keepalive and limits.
//!
//! State per address: **Pending** (frames queue, in order, until the first Auth frame has been
//! through `on_connect` → `on_authenticate` → load → attach, which runs in its own task so other
//! addresses on the socket keep flowing) → **Established** (frames go to the document task).
//! A rejection answers `PermissionDenied` and forgets the address, so a later Auth is evaluated
//! afresh; the socket stays open.
//!
//! Authentication comes first, everywhere: an Auth frame from a banned client address
//! (`crate::throttle`) is denied without running hooks; a token the hooks refuse is denied (and
//! counted by the throttle) before the cluster does any routing, so an unauthenticated client
//! never makes a node touch Redis or claim a document. Only then, in a cluster, is the document
//! routed: served here, or **Remote** (the queued frames and the Auth frame go to the owner,
//! which authenticates the client again and whose answer is the one the client gets).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{self, Message};
use tracing::{Instrument, debug, info, info_span, warn};

use super::addr_map::AddrMap;
use super::placement::{Link, LinkClient, Route};
use super::shared::Shared;
use super::signals::Signal;
use super::stand_in::{StandInInput, ToEdge};
use super::tasks::Tasks;
use super::traffic::TrafficLimit;
use super::{Stop, Write, Ws, close, flush_final, write_guarded};
use crate::doc::{
    Attach, ConnId, DocCommand, DocHandle, Framing, LoadError, WeakDocHandle, next_conn_id,
};
use crate::hooks::{
    AuthPayload, ConnectionOps, ConnectionRef, Context, DocumentPayload, HookError, MessagePayload,
};
use crate::outbox::{Outbox, OutboxReceiver, Outgoing, outbox, outbox_direct};
use crate::protocol::Close;
use crate::protocol::lib0::DecodeError;
use crate::protocol::message::{
    ClientFrame, ClientMessage, PING_FRAME, ServerMessage, decode_client_frame, kind, split_address,
};
use crate::request::RequestInfo;
use std::sync::atomic::{AtomicBool, Ordering};

struct Pending {
    queue: Vec<(Bytes, u64, Result<ClientMessage, DecodeError>)>,
    bytes: usize,
    establishing: bool,
    /// The Auth frame being evaluated, for the owner if the document turns out to be remote.
    auth: Option<PendingAuth>,
}

/// An Auth frame under evaluation.
struct PendingAuth {
    /// The raw frame.
    frame: Bytes,
    /// How many queued frames arrived before it.
    at: usize,
    /// A v4 provider (app pings), applied unless the document is served by another node.
    v4: bool,
}

/// Where an authenticated address is served.
enum Authed {
    /// Here: attached to the local document task.
    Here(Established),
    /// By another node: the address is proxied there through this link.
    Remote(Box<dyn Link>),
}

impl Authed {
    /// Undoes what the authentication set up, for a socket or an address that is gone.
    fn undo(self) {
        match self {
            Authed::Here(e) => e.doc.send_detached(DocCommand::Detach {
                conn: e.conn,
                reply: None,
            }),
            Authed::Remote(link) => link.detach(),
        }
    }
}

/// Why a document of this socket did not open.
#[derive(Debug)]
enum AuthFailure {
    /// The route look-up failed (Redis unavailable): the socket is reset, and the client
    /// reconnects and is routed afresh.
    RouteFailed,
    /// Refused before loading (a hook, a banned address, an invalid name): the client sees
    /// `PermissionDenied` with this reason.
    Denied(String),
    /// The document could not be loaded.
    Load(LoadError),
}

/// What the client is told when a document of its socket did not open.
#[derive(Debug, PartialEq, Eq)]
enum FailureAnswer<'a> {
    /// Not a refusal: the socket is reset, and the client reconnects and is routed afresh.
    Reset,
    /// `PermissionDenied` with this reason; the socket stays open.
    Denied(&'a str),
}

impl AuthFailure {
    /// The answer for this failure on a node that is (`clustered`) or is not in a cluster.
    fn answer(&self, clustered: bool) -> FailureAnswer<'_> {
        match self {
            AuthFailure::RouteFailed => FailureAnswer::Reset,
            // Ownership moved between routing and loading (e.g. this node just lost the lock)
            AuthFailure::Load(LoadError::NotOwner) if clustered => FailureAnswer::Reset,
            AuthFailure::Denied(reason) => FailureAnswer::Denied(reason),
            AuthFailure::Load(e) => FailureAnswer::Denied(e.client_reason()),
        }
    }
}

struct Established {
    doc: DocHandle,
    conn: ConnId,
    name: Arc<str>,
    context: Arc<Context>,
    read_only: bool,
    /// When the client's credentials end (refused with `PermissionDenied` then).
    expires: Option<Instant>,
    /// A token sync of this connection is running (later ones wait for it to end).
    syncing: bool,
}

/// The monotonic instant of a wall-clock `SystemTime` (now when it has passed).
fn instant_of(t: std::time::SystemTime) -> Instant {
    let now = Instant::now();
    match t.duration_since(std::time::SystemTime::now()) {
        Ok(ahead) => now
            .checked_add(ahead)
            .unwrap_or(now + Duration::from_secs(1 << 30)),
        Err(_) => now,
    }
}

enum Addr {
    Pending(Pending),
    Established(Established),
    /// Served by another node: frames are forwarded there.
    Remote(Box<dyn Link>),
}

struct AuthDone {
    address: String,
    result: Result<Authed, AuthFailure>,
}

/// What a background task of the socket finished.
enum Done {
    /// The authentication of an address.
    Auth(AuthDone),
    /// A token sync of an established document connection.
    Sync(SyncDone),
}

/// The outcome of a token sync ([`Socket::token_sync`]).
struct SyncDone {
    address: String,
    /// The document connection it was for (the address may have been reopened since).
    conn: ConnId,
    /// The new end of the credentials and the context the hooks left, or the refusal.
    result: Result<(Option<std::time::SystemTime>, Context), HookError>,
}

/// Hook-facing handle of one document connection.
#[derive(Debug)]
struct ConnHandle {
    outbox: Outbox,
    address: Arc<str>,
    doc: WeakDocHandle,
    conn: ConnId,
    read_only: bool,
}

impl ConnectionOps for ConnHandle {
    fn send_stateless(&self, payload: &str) {
        self.outbox
            .send(ServerMessage::Stateless(payload).frame(Some(&self.address)));
    }
    fn close(&self, reason: &str) {
        if let Some(doc) = self.doc.upgrade() {
            doc.send_detached(DocCommand::Detach {
                conn: self.conn,
                reply: Some(reason.to_owned()),
            });
        }
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
}

struct Socket {
    shared: Arc<Shared>,
    id: Arc<str>,
    request: Arc<RequestInfo>,
    outbox: Outbox,
    addrs: AddrMap<Addr>,
    pending_bytes: usize,
    pending_frames: usize,
    authenticated_once: bool,
    provider_v4: bool,
    opened: Instant,
    last_inbound: Instant,
    /// Results of the authentications and token syncs it started (boxed: they are large
    /// and rare).
    tasks: Tasks<Box<Done>>,
    /// Set by the cluster when an owner answered `Authenticated` for a proxied address. Only
    /// a socket whose documents may be routed to another node (an edge of a cluster, not a
    /// stand-in) has one: its presence is what marks such a socket.
    remote_authenticated: Option<Arc<AtomicBool>>,
    /// True for an owner-side socket standing in for a client of another node: never re-route.
    stand_in: bool,
}

/// Why the socket task ends.
enum End {
    /// The client went away (or the transport failed).
    Gone,
    /// Close the socket.
    Close(Close),
}

/// Runs one Hocuspocus socket until it closes.
///
/// Plain functions returning the socket's future, and the WebSocket boxed: an `async fn`
/// keeps its arguments beside the locals they move into, where an `async` block uses what it
/// captured in place, so nothing the socket keeps is held twice for its whole life. Rare,
/// large steps (revocation, credential expiry, rate limiting, closing) are boxed where they
/// are awaited for the same reason: the future is as large as its largest step.
pub(crate) fn serve(
    shared: Arc<Shared>,
    ws: Ws,
    request: Arc<RequestInfo>,
) -> impl std::future::Future<Output = ()> + Send {
    let id: Arc<str> = Arc::from(uuid::Uuid::now_v7().to_string());
    let span = info_span!("socket", socket = %id, node = %shared.config.node_id);
    let (outbox, out_rx) = outbox(shared.config.outbound_queue_bytes);
    let s = Socket::new(shared.clone(), id, request, outbox, false);
    run(shared, Box::new(ws), s, out_rx).instrument(span)
}

/// The socket's loop: the select decides what woke it, the match does the work.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would keep its arguments twice in the socket's future"
)]
fn run(
    shared: Arc<Shared>,
    mut ws: Box<Ws>,
    mut s: Socket,
    mut out_rx: OutboxReceiver,
) -> impl std::future::Future<Output = ()> + Send {
    async move {
        shared.metrics.sockets.inc();
        // watched from before any authentication, so a revocation made meanwhile is seen
        let mut signals = shared.signals.wait();
        let cfg = &shared.config;
        let mut next_ping = cfg.effective_ping_interval().map(|d| s.opened + d);
        let mut next_app_ping = app_ping_interval(cfg).map(|d| s.opened + d);
        // One timer per socket, armed for the earliest of its deadlines and re-armed only when it
        // fires: an idle socket wakes once per ping interval, not on a fixed tick.
        let mut timer = Box::pin(tokio::time::sleep_until(
            s.next_deadline(next_ping, next_app_ping),
        ));
        let mut traffic = TrafficLimit::new(cfg, s.opened);
        debug!(path = %s.request.path(), remote = ?s.request.remote_addr(), "socket open");

        let end = loop {
            // The select only decides what woke the socket; the work, and every await in it,
            // comes after. A frame or a message held in the select's output would otherwise stay
            // in the socket's future beside the locals of each step that awaits.
            let wake = tokio::select! {
                biased;
                signal = &mut signals => Wake::Signal(signal),
                ready = out_rx.ready() => Wake::Outbox(ready),
                done = s.tasks.next() => Wake::Done(done),
                inbound = ws.next() => Wake::Inbound(inbound_step(&mut s, &mut traffic, cfg, inbound)),
                () = &mut timer => Wake::Timer,
            };
            match wake {
                Wake::Signal(Signal::Stop) => {
                    break Box::pin(s.shut_down(&mut ws, &mut out_rx)).await;
                }
                Wake::Signal(Signal::Revoked) => Box::pin(s.refuse_revoked()).await,
                Wake::Outbox(ready) => {
                    if !ready {
                        break s.slow_reader(&out_rx);
                    }
                    match write_guarded(&mut ws, Write::Batch, &mut out_rx, &mut signals).await {
                        Ok(Err(e)) => {
                            debug!(error = %e, "write failed");
                            break End::Gone;
                        }
                        Ok(Ok(controls)) => {
                            if let Some(end) = s.on_controls(controls) {
                                break end;
                            }
                        }
                        Err(Stop::Overflow) => break s.slow_reader(&out_rx),
                        Err(Stop::Shutdown) => break End::Close(Close::ResetConnection),
                    }
                }
                Wake::Done(done) => {
                    let expiry = s.next_expiry();
                    let was_authenticated = s.authenticated();
                    if let Some(end) = Box::pin(s.on_done(*done)).await {
                        break end;
                    }
                    if (!was_authenticated && s.authenticated()) || s.next_expiry() != expiry {
                        // the authentication deadline no longer applies, or credentials now end
                        // earlier: re-arm for the earliest deadline
                        timer
                            .as_mut()
                            .reset(s.next_deadline(next_ping, next_app_ping));
                    }
                }
                Wake::Inbound(Inbound::End(end)) => break end,
                Wake::Inbound(Inbound::RateLimited) => break Box::pin(s.rate_limited()).await,
                Wake::Inbound(Inbound::Frame(bytes)) => {
                    let expiry = s.next_expiry();
                    if let Some(end) = Box::pin(s.on_frame(bytes)).await {
                        break end;
                    }
                    if s.next_expiry() != expiry {
                        // a token sync moved an expiry
                        timer
                            .as_mut()
                            .reset(s.next_deadline(next_ping, next_app_ping));
                    }
                }
                Wake::Inbound(Inbound::Nothing) => {}
                Wake::Timer => {
                    let now = Instant::now();
                    if s.next_expiry().is_some_and(|e| e <= now) {
                        Box::pin(s.expire(now)).await;
                    }
                    if !s.authenticated() && now >= s.auth_deadline() {
                        info!("no document authenticated before the deadline");
                        break End::Close(Close::ConnectionTimeout);
                    }
                    if now >= s.idle_deadline() {
                        info!("idle timeout");
                        break Box::pin(s.idle_timeout(&mut ws, &mut out_rx)).await;
                    }
                    if let (Some(at), Some(every)) = (next_ping, cfg.effective_ping_interval())
                        && now >= at
                    {
                        next_ping = Some(now + every);
                        match write_guarded(&mut ws, Write::Ping, &mut out_rx, &mut signals).await {
                            Ok(Ok(_)) => {}
                            Ok(Err(_)) => break End::Gone,
                            Err(Stop::Overflow) => break s.slow_reader(&out_rx),
                            Err(Stop::Shutdown) => break End::Close(Close::ResetConnection),
                        }
                    }
                    if let (Some(at), Some(every)) = (next_app_ping, app_ping_interval(cfg))
                        && now >= at
                    {
                        next_app_ping = Some(now + every);
                        if s.provider_v4 {
                            s.outbox.send(Bytes::from_static(&[PING_FRAME]));
                        }
                    }
                    timer
                        .as_mut()
                        .reset(s.next_deadline(next_ping, next_app_ping));
                }
            }
        };

        s.detach_all();
        shared.metrics.sockets.dec();
        if let End::Close(how) = end {
            shared
                .metrics
                .closes
                .with_label_values(&[&how.code().to_string()])
                .inc();
            debug!(code = how.code(), reason = how.reason(), "closing socket");
            Box::pin(close(*ws, how)).await;
        } else {
            debug!("socket gone");
        }
    }
}

/// What woke a socket's loop.
enum Wake {
    /// A server-wide event: stop, or a grown revocation list.
    Signal(Signal),
    /// The outbox has frames to write (`false`: it overflowed).
    Outbox(bool),
    /// An authentication finished.
    Done(Box<Done>),
    /// The client sent something, already classified.
    Inbound(Inbound),
    /// The socket's timer fired.
    Timer,
}

/// What a message read from the client asks of its socket.
enum Inbound {
    /// Close, or stop: the client went away or broke the protocol.
    End(End),
    /// Over the traffic limit.
    RateLimited,
    /// A Hocuspocus frame to handle.
    Frame(Bytes),
    /// Liveness only (a ping, auto-ponged, or a pong).
    Nothing,
}

/// Classifies what `ws.next()` returned. A plain function: the message it matches lives on
/// its stack, not in the socket's future.
fn inbound_step(
    s: &mut Socket,
    traffic: &mut TrafficLimit,
    cfg: &crate::config::Config,
    inbound: Option<Result<Message, tungstenite::Error>>,
) -> Inbound {
    match inbound {
        None => Inbound::End(End::Gone),
        Some(Err(tungstenite::Error::Capacity(e))) => {
            info!(error = %e, "message too big");
            Inbound::End(End::Close(Close::MessageTooBig))
        }
        Some(Err(e)) => {
            debug!(error = %e, "read failed");
            Inbound::End(End::Gone)
        }
        Some(Ok(msg)) => {
            s.last_inbound = Instant::now();
            match msg {
                // every message counts, pings included
                msg if !traffic.allow(cfg, msg.len(), s.last_inbound) => Inbound::RateLimited,
                Message::Binary(bytes) => Inbound::Frame(bytes),
                Message::Text(_) => {
                    info!("text frame refused");
                    Inbound::End(End::Close(Close::UnsupportedData))
                }
                Message::Close(_) => Inbound::End(End::Gone),
                _ => Inbound::Nothing, // ping (auto-ponged) / pong: liveness only
            }
        }
    }
}

/// How often a Hocuspocus-level ping goes to v4 providers, if at all.
fn app_ping_interval(cfg: &crate::config::Config) -> Option<Duration> {
    (cfg.app_ping_interval_ms > 0).then(|| Duration::from_millis(cfg.app_ping_interval_ms))
}

impl Socket {
    /// When the socket times out without inbound traffic.
    fn idle_deadline(&self) -> Instant {
        self.last_inbound + Duration::from_millis(self.shared.config.idle_timeout_ms)
    }

    /// When the socket closes unless a document has authenticated.
    fn auth_deadline(&self) -> Instant {
        self.opened + Duration::from_millis(self.shared.config.auth_timeout_ms)
    }

    /// The earliest of the socket's deadlines: idle, authentication (until a document
    /// authenticated), credential expiry and the two pings.
    fn next_deadline(&self, next_ping: Option<Instant>, next_app_ping: Option<Instant>) -> Instant {
        let mut at = self.idle_deadline();
        if !self.authenticated() {
            at = at.min(self.auth_deadline());
        }
        if let Some(e) = self.next_expiry() {
            at = at.min(e);
        }
        next_ping
            .into_iter()
            .chain(next_app_ping)
            .fold(at, Instant::min)
    }

    /// The outbox overflowed: the client does not read fast enough.
    fn slow_reader(&self, out_rx: &OutboxReceiver) -> End {
        warn!(
            queued = out_rx.queued_bytes(),
            "slow reader: outbound queue full, disconnecting"
        );
        self.shared.metrics.slow_readers.inc();
        End::Close(Close::SlowReader)
    }

    /// The client sent more than `max_messages_per_second` / `max_bytes_per_second`: the
    /// socket closes, and its address is charged one failure towards a ban.
    async fn rate_limited(&self) -> End {
        super::traffic::charge(&self.shared, &self.request).await;
        End::Close(Close::RateLimited)
    }

    /// Server shutdown: apply what the client already sent (kernel or WebSocket buffers) before
    /// the documents store, then CLOSE every document and reset the socket.
    async fn shut_down(&mut self, ws: &mut Ws, out_rx: &mut OutboxReceiver) -> End {
        // read until the socket is quiet for a moment
        let drain_until = Instant::now() + Duration::from_millis(1000);
        loop {
            let quiet = (Instant::now() + Duration::from_millis(50)).min(drain_until);
            match tokio::time::timeout_at(quiet, ws.next()).await {
                Ok(Some(Ok(Message::Binary(bytes)))) => {
                    if Box::pin(self.on_frame(bytes)).await.is_some() {
                        break;
                    }
                }
                Ok(Some(Ok(Message::Close(_)) | Err(_)) | None) | Err(_) => break,
                Ok(Some(Ok(_))) => {}
            }
        }
        self.close_all_docs(Close::ResetConnection.reason());
        flush_final(ws, out_rx).await;
        End::Close(Close::ResetConnection)
    }

    /// Idle timeout: CLOSE every document, then the socket.
    async fn idle_timeout(&mut self, ws: &mut Ws, out_rx: &mut OutboxReceiver) -> End {
        self.close_all_docs(Close::ConnectionTimeout.reason());
        flush_final(ws, out_rx).await;
        End::Close(Close::ConnectionTimeout)
    }

    /// Queues CLOSE for every established document and detaches from it.
    fn close_all_docs(&mut self, reason: &'static str) {
        for (address, addr) in self.addrs.drain() {
            if let Addr::Established(e) = addr {
                self.outbox
                    .send(ServerMessage::Close(reason).frame(Some(&address)));
                e.doc.send_detached(DocCommand::Detach {
                    conn: e.conn,
                    reply: None,
                });
            }
        }
    }

    fn new(
        shared: Arc<Shared>,
        id: Arc<str>,
        request: Arc<RequestInfo>,
        outbox: Outbox,
        stand_in: bool,
    ) -> Self {
        let now = Instant::now();
        let remote_authenticated =
            (!stand_in && shared.placement.is_some()).then(|| Arc::new(AtomicBool::new(false)));
        Socket {
            shared,
            id,
            request,
            outbox,
            addrs: AddrMap::default(),
            pending_bytes: 0,
            pending_frames: 0,
            authenticated_once: false,
            provider_v4: false,
            opened: now,
            last_inbound: now,
            tasks: Tasks::default(),
            remote_authenticated,
            stand_in,
        }
    }

    fn authenticated(&self) -> bool {
        self.authenticated_once
            || self
                .remote_authenticated
                .as_ref()
                .is_some_and(|a| a.load(Ordering::Acquire))
    }

    /// Leaves every document (local: detach; remote: tell the owner).
    fn detach_all(&mut self) {
        for (_, addr) in self.addrs.drain() {
            match addr {
                Addr::Established(e) => e.doc.send_detached(DocCommand::Detach {
                    conn: e.conn,
                    reply: None,
                }),
                Addr::Remote(link) => link.detach(),
                Addr::Pending(_) => {}
            }
        }
    }

    /// Moves an address authenticated here, whose document another node owns, to that owner
    /// through `link`: the queued frames and the Auth frame, in arrival order (`p` is already
    /// out of the pending tables).
    fn go_remote(&mut self, address: String, link: Box<dyn Link>, p: Pending) -> Option<End> {
        let Some(auth) = p.auth else {
            link.detach();
            return Some(End::Close(Close::ResetConnection));
        };
        debug!(address, "proxying to the owner");
        let mut queue = p.queue;
        let after = queue.split_off(auth.at.min(queue.len()));
        let mut sent = true;
        for (raw, _, _) in queue {
            sent &= link.forward(raw);
        }
        sent &= link.forward(auth.frame);
        for (raw, _, _) in after {
            sent &= link.forward(raw);
        }
        if !sent {
            link.detach();
            return Some(End::Close(Close::ResetConnection));
        }
        self.addrs.insert(address, Addr::Remote(link));
        None
    }

    fn on_controls(&mut self, controls: Vec<Outgoing>) -> Option<End> {
        for c in controls {
            match c {
                Outgoing::DocClosed { address, conn } => {
                    if matches!(self.addrs.get(&address), Some(Addr::Established(e)) if e.conn == conn)
                    {
                        self.addrs.remove(&address);
                    }
                }
                Outgoing::CloseSocket(how) => return Some(End::Close(how)),
                Outgoing::Frame(_) => {}
            }
        }
        None
    }

    async fn on_frame(&mut self, bytes: Bytes) -> Option<End> {
        self.shared.metrics.bytes_in.inc_by(bytes.len() as u64);
        let parsed = match decode_client_frame(bytes.clone()) {
            Ok(p) => p,
            Err(e) => {
                info!(error = %e, "unparsable frame");
                return Some(End::Close(Close::Unauthorized));
            }
        };
        let ClientFrame::Addressed {
            address,
            kind,
            body,
        } = parsed
        else {
            return None;
        };
        self.shared
            .metrics
            .frames_in
            .with_label_values(&[kind_label(kind)])
            .inc();
        match self.addrs.get_mut(&address) {
            Some(Addr::Established(_)) => self.on_established(&address, bytes, body).await,
            Some(Addr::Pending(_)) => self.on_pending(address, bytes, kind, body).await,
            Some(Addr::Remote(link)) => {
                (!link.forward(bytes)).then_some(End::Close(Close::ResetConnection))
            }
            None => {
                let cap = self.shared.config.max_documents_per_connection;
                if self.addrs.len() >= cap {
                    // the socket stays; this document is refused (only its Auth is answered)
                    if kind == kind::AUTH {
                        info!(
                            documents = self.addrs.len(),
                            cap, "document refused: max_documents_per_connection"
                        );
                        self.outbox.send(
                            ServerMessage::PermissionDenied(TOO_MANY_DOCUMENTS)
                                .frame(Some(&address)),
                        );
                    }
                    return None;
                }
                let pending_docs = self
                    .addrs
                    .values()
                    .filter(|a| matches!(a, Addr::Pending(_)))
                    .count();
                if pending_docs >= self.shared.config.preauth_max_documents {
                    info!(pending_docs, "too many documents pending authentication");
                    return Some(End::Close(Close::ResetConnection));
                }
                self.addrs.insert(
                    address.clone(),
                    Addr::Pending(Pending {
                        queue: Vec::new(),
                        bytes: 0,
                        establishing: false,
                        auth: None,
                    }),
                );
                self.on_pending(address, bytes, kind, body).await
            }
        }
    }

    async fn on_pending(
        &mut self,
        address: String,
        raw: Bytes,
        kind: u64,
        body: Result<ClientMessage, DecodeError>,
    ) -> Option<End> {
        let Some(Addr::Pending(p)) = self.addrs.get_mut(&address) else {
            return None;
        };
        if kind == kind::AUTH && !p.establishing {
            let (token, version) = match body {
                Ok(ClientMessage::Auth { token, version }) => (token, version),
                _ => {
                    info!("undecodable auth frame");
                    return Some(End::Close(Close::ResetConnection));
                }
            };
            p.establishing = true;
            let v4 = version
                .as_deref()
                .and_then(|v| v.split('.').next())
                .and_then(|m| m.parse::<u32>().ok())
                .is_some_and(|m| m >= 4);
            // An edge in a cluster learns only after authentication whether the document is
            // served here (then the client is a v4 provider of this socket) or proxied.
            let routed = self.remote_authenticated.is_some();
            if v4 && !routed {
                self.provider_v4 = true;
            }
            p.auth = Some(PendingAuth {
                frame: raw,
                at: p.queue.len(),
                v4,
            });
            let task = authenticate(
                self.shared.clone(),
                self.id.clone(),
                self.request.clone(),
                self.outbox.clone(),
                self.remote_authenticated.clone(),
                address.clone(),
                token,
                version,
                self.stand_in,
            );
            let tx = self.tasks.sender();
            tokio::spawn(
                async move {
                    let result = task.await;
                    if let Err(done) = tx.send(Box::new(Done::Auth(AuthDone { address, result })))
                        && let Done::Auth(AuthDone {
                            result: Ok(authed), ..
                        }) = *done
                    {
                        // the socket closed while this was running: undo the attach
                        authed.undo();
                    }
                }
                .in_current_span(),
            );
            return None;
        }
        p.bytes += raw.len();
        p.queue.push((raw.clone(), kind, body));
        self.pending_bytes += raw.len();
        self.pending_frames += 1;
        let cfg = &self.shared.config;
        if self.pending_bytes > cfg.preauth_max_bytes
            || self.pending_frames > cfg.preauth_max_messages
        {
            info!(
                bytes = self.pending_bytes,
                frames = self.pending_frames,
                "pre-auth queue limit"
            );
            return Some(End::Close(Close::ResetConnection));
        }
        None
    }

    /// A background task finished.
    async fn on_done(&mut self, done: Done) -> Option<End> {
        match done {
            Done::Auth(a) => Box::pin(self.on_auth_done(a)).await,
            Done::Sync(sync) => {
                self.on_sync_done(sync).await;
                None
            }
        }
    }

    async fn on_auth_done(&mut self, done: AuthDone) -> Option<End> {
        if done.result.is_err()
            && let Some(placement) = &self.shared.placement
        {
            placement.release_unused(split_address(&done.address).0);
        }
        let Some(Addr::Pending(p)) = self.addrs.remove(&done.address) else {
            // the address vanished meanwhile (cannot happen while pending); undo an attach
            if let Ok(authed) = done.result {
                authed.undo();
            }
            return None;
        };
        self.pending_bytes -= p.bytes;
        self.pending_frames -= p.queue.len();
        if p.auth.as_ref().is_some_and(|a| a.v4) && !matches!(done.result, Ok(Authed::Remote(_))) {
            self.provider_v4 = true;
        }
        match done.result {
            Ok(Authed::Remote(link)) => self.go_remote(done.address, link, p),
            Err(failure) => {
                let reason = match failure.answer(self.shared.placement.is_some()) {
                    FailureAnswer::Reset => {
                        info!(address = %done.address, ?failure, "routing failed or ownership moved; resetting");
                        // A provider counts a connection that received no message as a failed
                        // attempt and backs off further on each; one message first (a harmless
                        // QueryAwareness for the address) makes it reconnect at its first step.
                        // The close follows the frame through the outbox, so it is written after.
                        self.outbox
                            .send(ServerMessage::QueryAwareness.frame(Some(&done.address)));
                        self.outbox
                            .control(Outgoing::CloseSocket(Close::ResetConnection));
                        return None;
                    }
                    FailureAnswer::Denied(reason) => reason,
                };
                self.shared
                    .metrics
                    .auth
                    .with_label_values(&["denied"])
                    .inc();
                debug!(address = %done.address, %reason, "permission denied");
                self.outbox
                    .send(ServerMessage::PermissionDenied(reason).frame(Some(&done.address)));
                None
            }
            Ok(Authed::Here(established))
                if self
                    .shared
                    .revocations
                    .denies(&established.name, &established.context) =>
            {
                // revoked while it was being set up
                Authed::Here(established).undo();
                self.outbox.send(
                    ServerMessage::PermissionDenied("permission-denied").frame(Some(&done.address)),
                );
                None
            }
            Ok(Authed::Here(established)) => {
                self.shared.metrics.auth.with_label_values(&["ok"]).inc();
                self.authenticated_once = true;
                let name = established.name.clone();
                let context = established.context.clone();
                self.addrs
                    .insert(done.address.clone(), Addr::Established(established));
                for (raw, _, body) in p.queue {
                    if !matches!(self.addrs.get(&done.address), Some(Addr::Established(_))) {
                        break; // closed by a hook or a CLOSE frame: the rest is dropped
                    }
                    if let Some(end) = self.on_established(&done.address, raw, body).await {
                        return Some(end);
                    }
                }
                let payload = DocumentPayload {
                    document_name: &name,
                    context: Some(&context),
                };
                if let Err(e) = self.shared.extensions.connected(&payload).await {
                    // Reference quirk: a rejection from `connected` yields PermissionDenied.
                    if let Some(Addr::Established(e2)) = self.addrs.remove(&done.address) {
                        e2.doc.send_detached(DocCommand::Detach {
                            conn: e2.conn,
                            reply: None,
                        });
                    }
                    self.outbox.send(
                        ServerMessage::PermissionDenied(reason_or(&e.reason, "permission-denied"))
                            .frame(Some(&done.address)),
                    );
                }
                None
            }
        }
    }

    async fn on_established(
        &mut self,
        address: &str,
        raw: Bytes,
        body: Result<ClientMessage, DecodeError>,
    ) -> Option<End> {
        let Some(Addr::Established(e)) = self.addrs.get(address) else {
            return None;
        };
        let (doc, conn) = (e.doc.clone(), e.conn);
        if !self.shared.extensions.is_empty() {
            let payload = MessagePayload {
                document_name: &e.name,
                frame: &raw,
                context: &e.context,
                socket_id: &self.id,
            };
            if let Err(err) = self.shared.extensions.before_handle_message(&payload).await {
                self.close_doc(
                    address,
                    reason_or(&err.reason, Close::ResetConnection.reason()),
                )
                .await;
                return None;
            }
        }
        let msg = match body {
            Ok(m) => m,
            Err(err) => {
                debug!(address, error = %err, "undecodable frame body");
                self.close_doc(address, Close::ResetConnection.reason())
                    .await;
                return None;
            }
        };
        let delivered = match msg {
            ClientMessage::Sync(msg) => doc.send(DocCommand::Sync { conn, msg }).await,
            ClientMessage::Awareness(update) => {
                doc.send(DocCommand::Awareness { conn, update }).await
            }
            ClientMessage::QueryAwareness => doc.send(DocCommand::QueryAwareness { conn }).await,
            ClientMessage::Auth { token, version } => {
                self.token_sync(address, token, version);
                true
            }
            ClientMessage::Stateless(payload) => {
                doc.send(DocCommand::Stateless { conn, payload }).await
            }
            ClientMessage::BroadcastStateless => {
                info!(
                    address,
                    "client sent BroadcastStateless; resetting the document connection"
                );
                self.close_doc(address, Close::ResetConnection.reason())
                    .await;
                true
            }
            ClientMessage::Close => {
                self.addrs.remove(address);
                doc.send(DocCommand::Detach {
                    conn,
                    reply: Some("provider_initiated".into()),
                })
                .await
            }
            ClientMessage::Ignored(_) => true,
        };
        if !delivered {
            // the document task is gone (fenced, poisoned): reset so the client resyncs
            self.addrs.remove(address);
            return Some(End::Close(Close::ResetConnection));
        }
        None
    }

    /// A new token for an established document connection: the `on_token_sync` hooks decide,
    /// in a task of their own (they may ask a webhook or fetch keys), so the socket keeps
    /// serving meanwhile; [`Self::on_sync_done`] applies the outcome. One sync per connection
    /// runs at a time: a token sent while one runs is ignored (the provider sends its current
    /// token again on its next refresh).
    fn token_sync(&mut self, address: &str, token: String, version: Option<String>) {
        let Some(Addr::Established(e)) = self.addrs.get_mut(address) else {
            return;
        };
        if e.syncing {
            debug!(address, "token sync already running: this token is ignored");
            return;
        }
        e.syncing = true;
        let (shared, request, socket_id) =
            (self.shared.clone(), self.request.clone(), self.id.clone());
        let (name, context, read_only, conn) =
            (e.name.clone(), e.context.clone(), e.read_only, e.conn);
        let address = address.to_owned();
        let tx = self.tasks.sender();
        tokio::spawn(
            async move {
                let mut payload = AuthPayload {
                    document_name: &name,
                    token: &token,
                    provider_version: version.as_deref(),
                    request: &request,
                    socket_id: &socket_id,
                    read_only,
                    context: (*context).clone(),
                    valid_until: None,
                };
                let result = shared.extensions.on_token_sync(&mut payload).await;
                let result = result.map(|()| (payload.valid_until, payload.context));
                let _ = tx.send(Box::new(Done::Sync(SyncDone {
                    address,
                    conn,
                    result,
                })));
            }
            .in_current_span(),
        );
    }

    /// Applies a token sync's outcome: success sends nothing and may move the connection's
    /// expiry (and refresh its identity, which a revocation may then match); a refusal closes
    /// the document connection with `CLOSE "Unauthorized"` (or the hook's reason).
    async fn on_sync_done(&mut self, done: SyncDone) {
        let SyncDone {
            address,
            conn,
            result,
        } = done;
        let Some(Addr::Established(e)) = self.addrs.get_mut(&address) else {
            return;
        };
        if e.conn != conn {
            return; // the address was closed and opened again meanwhile
        }
        e.syncing = false;
        let result = result.and_then(|(valid_until, context)| {
            if self.shared.revocations.denies(&e.name, &context) {
                return Err(HookError::reject("Unauthorized"));
            }
            Ok((valid_until, context))
        });
        match result {
            Ok((valid_until, context)) => {
                self.shared
                    .metrics
                    .auth
                    .with_label_values(&["token_sync"])
                    .inc();
                if let Some(t) = valid_until {
                    e.expires = Some(instant_of(t));
                }
                e.context = Arc::new(context);
                debug!(address, "token sync accepted");
            }
            Err(err) => {
                self.shared
                    .metrics
                    .auth
                    .with_label_values(&["token_sync_refused"])
                    .inc();
                debug!(address, reason = %err.reason, "token sync refused: closing the document connection");
                self.close_doc(&address, reason_or(&err.reason, "Unauthorized"))
                    .await;
            }
        }
    }

    /// The earliest credential expiry of the established document connections.
    fn next_expiry(&self) -> Option<Instant> {
        self.addrs
            .values()
            .filter_map(|a| match a {
                Addr::Established(e) => e.expires,
                _ => None,
            })
            .min()
    }

    /// Refuses every document connection whose credentials ended by `now`: `PermissionDenied`
    /// (the provider's `onAuthenticationFailed`), and the connection leaves its document. A
    /// later Auth on the address (a fresh token) is evaluated from scratch.
    async fn expire(&mut self, now: Instant) {
        self.refuse_where("expired", |e| e.expires.is_some_and(|t| t <= now))
            .await;
    }

    /// Refuses every document connection that a revocation now matches, as [`Self::expire`].
    async fn refuse_revoked(&mut self) {
        let revocations = self.shared.revocations.clone();
        self.refuse_where("revoked", |e| revocations.denies(&e.name, &e.context))
            .await;
    }

    /// Refuses the established document connections `which` selects with `PermissionDenied`;
    /// `why` labels the metric and the log.
    async fn refuse_where(&mut self, why: &'static str, which: impl Fn(&Established) -> bool) {
        let ended: Vec<String> = self
            .addrs
            .iter()
            .filter(|(_, a)| matches!(a, Addr::Established(e) if which(e)))
            .map(|(k, _)| k.clone())
            .collect();
        for address in ended {
            if let Some(Addr::Established(e)) = self.addrs.remove(&address) {
                info!(doc = %e.name, address, why, "refusing the document connection");
                self.shared.metrics.auth.with_label_values(&[why]).inc();
                e.doc
                    .send(DocCommand::Detach {
                        conn: e.conn,
                        reply: None,
                    })
                    .await;
                self.outbox.send(
                    ServerMessage::PermissionDenied("permission-denied").frame(Some(&address)),
                );
            }
        }
    }

    /// Server-side close of one document connection: forget the route now, the document
    /// task answers `CLOSE(reason)`.
    async fn close_doc(&mut self, address: &str, reason: &str) {
        if let Some(Addr::Established(e)) = self.addrs.remove(address) {
            e.doc
                .send(DocCommand::Detach {
                    conn: e.conn,
                    reply: Some(reason.to_owned()),
                })
                .await;
        }
    }
}

/// Sleeps until `at`, or forever when there is none.
async fn sleep_until_or_never(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The PermissionDenied reason for a document over `max_documents_per_connection`.
const TOO_MANY_DOCUMENTS: &str = "too many documents on this connection";

fn reason_or<'a>(reason: &'a str, default: &'a str) -> &'a str {
    if reason.is_empty() { default } else { reason }
}

fn kind_label(kind: u64) -> &'static str {
    match kind {
        0 => "sync",
        1 => "awareness",
        2 => "auth",
        3 => "query_awareness",
        4 => "sync_reply",
        5 => "stateless",
        6 => "broadcast_stateless",
        7 => "close",
        _ => "other",
    }
}

/// Checks a document name: not empty or blank, no control characters, within the size limit.
pub(crate) fn valid_document_name(name: &str, max: usize) -> bool {
    !name.trim().is_empty() && name.len() <= max && !name.chars().any(char::is_control)
}

/// Auth for one address: the ban check, the hooks, then (on an edge of a cluster) the route,
/// then `Authenticated`, load, attach. `stand_in`: an owner-side socket of a client on another
/// node, whose edge checked the ban and routed already. `remote_authenticated`: the socket's
/// flag, present exactly on an edge's socket, whose documents are routed.
#[allow(clippy::too_many_arguments)]
async fn authenticate(
    shared: Arc<Shared>,
    socket_id: Arc<str>,
    request: Arc<RequestInfo>,
    outbox: Outbox,
    remote_authenticated: Option<Arc<AtomicBool>>,
    address: String,
    token: String,
    version: Option<String>,
    stand_in: bool,
) -> Result<Authed, AuthFailure> {
    let (name, _session) = split_address(&address);
    let throttle = &shared.throttle;
    let client = throttle.client_of(&request);
    if !stand_in
        && let Some(ip) = client
        && throttle.is_banned(ip).await
    {
        throttle.count_refusal("auth");
        debug!(address, client = %ip, "Auth from a banned address: denied, no hook ran");
        return Err(AuthFailure::Denied("permission-denied".into()));
    }
    let mut payload = AuthPayload {
        document_name: name,
        token: &token,
        provider_version: version.as_deref(),
        request: &request,
        socket_id: &socket_id,
        read_only: false,
        context: Context::new(),
        valid_until: None,
    };
    let ext = &shared.extensions;
    let mut refused = ext.on_connect(&mut payload).await.err();
    if refused.is_none() {
        refused = ext.on_authenticate(&mut payload).await.err();
    }
    if refused.is_none() && shared.revocations.denies(name, &payload.context) {
        debug!(address, "revoked: denied");
        // not counted towards a ban: a provider retries on every reconnect
        refused = Some(HookError::unavailable("permission-denied"));
    }
    if let Some(e) = refused {
        if let Some(ip) = client
            && !e.unavailable
        {
            throttle.record_failure(ip).await;
        }
        return Err(AuthFailure::Denied(
            reason_or(&e.reason, "Forbidden").to_owned(),
        ));
    }
    // Authenticated: only now may the cluster do work for this document (Redis, a claim).
    if let Some(remote_authenticated) = &remote_authenticated
        && let Some(placement) = &shared.placement
        && valid_document_name(name, shared.config.max_document_name_bytes)
    {
        let client = LinkClient {
            request: &request,
            outbox: &outbox,
            authenticated: remote_authenticated,
        };
        match placement.route(name, client).await {
            Ok(Route::Local) => {}
            Ok(Route::Remote(link)) => return Ok(Authed::Remote(link)),
            Err(e) => {
                warn!(doc = name, error = %e, "cannot route the document (Redis unavailable?)");
                return Err(AuthFailure::RouteFailed);
            }
        }
    }
    let read_only = payload.read_only;
    let expires = payload.valid_until.map(instant_of);
    let context = Arc::new(payload.context);
    outbox.send(ServerMessage::Authenticated { read_only }.frame(Some(&address)));
    if !valid_document_name(name, shared.config.max_document_name_bytes) {
        shared
            .metrics
            .auth
            .with_label_values(&["load_failed"])
            .inc();
        return Err(AuthFailure::Denied("permission-denied".into()));
    }
    let address: Arc<str> = Arc::from(address.as_str());
    for _ in 0..10 {
        let doc = match shared.docs.open(name, &context).await {
            Ok(d) => d,
            Err(e) => {
                shared
                    .metrics
                    .auth
                    .with_label_values(&["load_failed"])
                    .inc();
                return Err(AuthFailure::Load(e));
            }
        };
        let conn = next_conn_id();
        let (tx, rx) = oneshot::channel();
        let conn_ref = ConnectionRef {
            inner: Arc::new(ConnHandle {
                outbox: outbox.clone(),
                address: address.clone(),
                doc: doc.downgrade(),
                conn,
                read_only,
            }),
        };
        let attach = Attach {
            conn,
            outbox: outbox.clone(),
            framing: Framing::Hocuspocus(address.clone()),
            read_only,
            context: context.clone(),
            socket_id: socket_id.clone(),
            conn_ref: Some(conn_ref),
        };
        if !doc.send(DocCommand::Attach(attach, tx)).await {
            continue;
        }
        if let Ok(Ok(())) = rx.await {
            return Ok(Authed::Here(Established {
                doc,
                conn,
                name: Arc::from(name),
                context,
                read_only,
                expires,
                syncing: false,
            }));
        }
    }
    Err(AuthFailure::Load(LoadError::Unavailable(
        "kept closing while being attached",
    )))
}

/// Owner side: runs the Hocuspocus state machine for a client attached to another node (its
/// edge), fed by `input` and answering through `edge`, until the client detaches, the link
/// fails or the node shuts down. `id` names the stand-in socket; `request` is the client's
/// upgrade request as its edge saw it.
pub(crate) async fn serve_stand_in<E: ToEdge>(
    shared: Arc<Shared>,
    id: Arc<str>,
    request: Arc<RequestInfo>,
    mut input: tokio::sync::mpsc::UnboundedReceiver<StandInInput>,
    edge: E,
) {
    // frames with nothing queued ahead of them go to the edge from the sender's task (the
    // document's broadcast reaches the transport for every remote client at once)
    let edge = Arc::new(edge);
    let direct: crate::outbox::Direct = {
        let edge = edge.clone();
        Arc::new(move |frame: &Bytes| edge.try_forward(frame))
    };
    let (outbox, mut out_rx) = outbox_direct(shared.config.outbound_queue_bytes, direct);
    let mut signals = shared.signals.wait();
    let mut s = Socket::new(shared.clone(), id, request, outbox, true);
    debug!("proxied attachment open");
    let end = loop {
        // while the queue to the edge is full the outbox is not drained, so a client that
        // cannot take its frames fast enough ends as a slow reader, like a local one
        let out_full = edge.is_full();
        tokio::select! {
            biased;
            signal = &mut signals => {
                if signal == Signal::Revoked {
                    Box::pin(s.refuse_revoked()).await;
                    continue;
                }
                // frames the edge already forwarded are applied before the documents store
                while let Ok(StandInInput::Frame(bytes)) = input.try_recv() {
                    if Box::pin(s.on_frame(bytes)).await.is_some() {
                        break;
                    }
                }
                break Some(End::Close(Close::ResetConnection));
            }
            msg = out_rx.next(!out_full) => {
                let Some(mut msg) = msg else {
                    shared.metrics.slow_readers.inc();
                    break Some(End::Close(Close::SlowReader));
                };
                let mut controls = Vec::new();
                let mut failed = None;
                loop {
                    match msg {
                        Outgoing::Frame(f) => {
                            if let Err(how) = edge.send(&f) {
                                failed = Some(how);
                                break;
                            }
                        }
                        other => controls.push(other),
                    }
                    if edge.is_full() {
                        break;
                    }
                    match out_rx.try_recv() {
                        Some(m) => msg = m,
                        None => break,
                    }
                }
                out_rx.idle();
                if let Some(how) = failed { break Some(End::Close(how)); }
                if let Some(end) = s.on_controls(controls) { break Some(end); }
            }
            () = edge.room(), if out_full => {}
            () = sleep_until_or_never(s.next_expiry()) => {
                Box::pin(s.expire(Instant::now())).await;
            }
            done = s.tasks.next() => {
                if let Some(end) = Box::pin(s.on_done(*done)).await { break Some(end); }
            }
            next = input.recv() => match next {
                None | Some(StandInInput::Detach) => break None,
                Some(StandInInput::Reset) => break Some(End::Close(Close::ResetConnection)),
                Some(StandInInput::Shed) => break Some(End::Close(Close::TryAgainLater)),
                Some(StandInInput::Frame(bytes)) => {
                    s.last_inbound = Instant::now();
                    if let Some(end) = Box::pin(s.on_frame(bytes)).await { break Some(end); }
                }
            },
        }
    };
    // deliver what is queued (e.g. CLOSE frames) before ending the session
    while let Some(msg) = out_rx.try_recv() {
        if let Outgoing::Frame(f) = msg
            && edge.send(&f).is_err()
        {
            break;
        }
    }
    s.detach_all();
    let close = match end {
        Some(End::Close(how)) => {
            debug!(
                code = how.code(),
                reason = how.reason(),
                "ending proxied attachment"
            );
            Some(how)
        }
        Some(End::Gone) | None => None,
    };
    edge.ended(close);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_resets_only_when_routing_is_at_fault() {
        let route = AuthFailure::RouteFailed;
        assert_eq!(route.answer(true), FailureAnswer::Reset);
        let moved = AuthFailure::Load(LoadError::NotOwner);
        assert_eq!(moved.answer(true), FailureAnswer::Reset);
        assert_eq!(
            moved.answer(false),
            FailureAnswer::Denied(LoadError::NotOwner.client_reason())
        );
        let denied = AuthFailure::Denied("permission-denied".into());
        assert_eq!(
            denied.answer(true),
            FailureAnswer::Denied("permission-denied")
        );
        let full = AuthFailure::Load(LoadError::Capacity);
        assert_eq!(
            full.answer(true),
            FailureAnswer::Denied(LoadError::Capacity.client_reason())
        );
    }
}
