//! The plain y-websocket protocol on `/y/<document>`: the document name is the
//! raw path after the prefix (not percent-decoded), the server opens with its step1, no
//! SyncStatus, no address prefix. Auth: the `token` query parameter goes through the same
//! `on_connect`/`on_authenticate` hooks; a rejection sends `02 00 reason` and closes with 4403
//! (y-websocket ≥ 3.1 then stops reconnecting), and counts as a failure of the client address
//! (`crate::throttle`; a banned address never gets this far: its upgrade is answered 429).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{self, Message};
use tracing::{Instrument, debug, info, info_span};

use super::hocuspocus::valid_document_name;
use super::shared::Shared;
use super::signals::Signal;
use super::{Stop, Write, Ws, close, write_guarded};
use crate::doc::{Attach, DocCommand, Framing, next_conn_id};
use crate::hooks::{AuthPayload, Context};
use crate::outbox::{Outgoing, outbox};
use crate::protocol::Close;
use crate::protocol::message::{ServerMessage, YwsMessage, decode_yws_frame};
use crate::request::RequestInfo;

/// Runs one y-websocket connection for document `name`.
///
/// A plain function returning the socket's future, and the WebSocket boxed: an `async fn`
/// keeps its arguments beside the locals they move into, so an inline WebSocket would be
/// held twice (or three times) for the socket's whole life.
pub(crate) fn serve(
    shared: Arc<Shared>,
    ws: Ws,
    request: Arc<RequestInfo>,
    name: String,
) -> impl std::future::Future<Output = ()> + Send {
    let id: Arc<str> = Arc::from(uuid::Uuid::now_v7().to_string());
    let span = info_span!("yws", socket = %id, doc = %name, node = %shared.config.node_id);
    run(shared, Box::new(ws), request, name, id).instrument(span)
}

async fn run(
    shared: Arc<Shared>,
    mut ws: Box<Ws>,
    request: Arc<RequestInfo>,
    name: String,
    id: Arc<str>,
) {
    let token = request
        .query_pairs()
        .into_iter()
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v)
        .unwrap_or_default();
    // watched from before the check below, so a revocation made while the document loads
    // is seen by the loop
    let mut signals = shared.signals.wait();
    let mut payload = AuthPayload {
        document_name: &name,
        token: &token,
        provider_version: None,
        request: &request,
        socket_id: &id,
        read_only: false,
        context: Context::new(),
        valid_until: None,
    };
    let mut denied = shared.extensions.on_connect(&mut payload).await.err();
    if denied.is_none() {
        denied = shared.extensions.on_authenticate(&mut payload).await.err();
    }
    if denied.is_none() && shared.revocations.denies(&name, &payload.context) {
        // not counted towards a ban: the client's reconnects are not an attack
        denied = Some(crate::hooks::HookError::unavailable("permission denied"));
    }
    if let Some(e) = denied {
        shared.metrics.auth.with_label_values(&["denied"]).inc();
        if let Some(ip) = shared.throttle.client_of(&request)
            && !e.unavailable
        {
            shared.throttle.record_failure(ip).await;
        }
        let reason = if e.reason.is_empty() {
            "permission denied".to_owned()
        } else {
            e.reason
        };
        let _ = futures_util::SinkExt::send(
            &mut ws,
            Message::Binary(ServerMessage::YwsPermissionDenied(&reason).frame(None)),
        )
        .await;
        Box::pin(close(*ws, Close::Forbidden)).await;
        return;
    }
    if !valid_document_name(&name, shared.config.max_document_name_bytes) {
        Box::pin(close(*ws, Close::BadDocumentName)).await;
        return;
    }
    let read_only = payload.read_only;
    let context = Arc::new(payload.context);
    let (outbox, mut out_rx) = outbox(shared.config.outbound_queue_bytes);
    let conn = next_conn_id();
    let mut doc = None;
    for _ in 0..10 {
        let Ok(handle) = shared.docs.open(&name, &context).await else {
            break;
        };
        let (tx, rx) = oneshot::channel();
        let attach = Attach {
            conn,
            outbox: outbox.clone(),
            framing: Framing::YWebsocket,
            read_only,
            context: context.clone(),
            socket_id: id.clone(),
            conn_ref: None,
        };
        if handle.send(DocCommand::Attach(attach, tx)).await && matches!(rx.await, Ok(Ok(()))) {
            doc = Some(handle);
            break;
        }
    }
    let Some(doc) = doc else {
        shared
            .metrics
            .auth
            .with_label_values(&["load_failed"])
            .inc();
        Box::pin(close(*ws, Close::LoadFailed)).await;
        return;
    };
    shared.metrics.auth.with_label_values(&["ok"]).inc();
    shared.metrics.sockets.inc();
    let cfg = &shared.config;
    let idle = Duration::from_millis(cfg.idle_timeout_ms);
    let ping_every = cfg.effective_ping_interval();
    let mut last_inbound = Instant::now();
    let mut next_ping = ping_every.map(|d| Instant::now() + d);
    // one timer, armed for the earliest deadline and re-armed when it fires
    let next_deadline = |last_inbound: Instant, next_ping: Option<Instant>| {
        next_ping.map_or(last_inbound + idle, |p| p.min(last_inbound + idle))
    };
    let mut timer = Box::pin(tokio::time::sleep_until(next_deadline(
        last_inbound,
        next_ping,
    )));
    let mut traffic = super::traffic::TrafficLimit::new(cfg, Instant::now());
    let end: Option<Close> = loop {
        tokio::select! {
            biased;
            signal = &mut signals => match signal {
                Signal::Stop => break Some(Close::ServiceRestart),
                Signal::Revoked => {
                    if shared.revocations.denies(&name, &context) {
                        info!("revoked: closing");
                        shared.metrics.auth.with_label_values(&["revoked"]).inc();
                        break Some(Close::Forbidden);
                    }
                }
            },
            ready = out_rx.ready() => {
                if !ready {
                    shared.metrics.slow_readers.inc();
                    break Some(Close::SlowReader);
                }
                match write_guarded(&mut ws, Write::Batch, &mut out_rx, &mut signals).await {
                    Ok(Err(_)) => break None,
                    Err(Stop::Overflow) => {
                        shared.metrics.slow_readers.inc();
                        break Some(Close::SlowReader);
                    }
                    Err(Stop::Shutdown) => break Some(Close::ServiceRestart),
                    Ok(Ok(controls)) => {
                        if let Some(how) = controls.into_iter().find_map(|c| match c {
                            Outgoing::CloseSocket(how) => Some(how),
                            _ => None,
                        }) {
                            break Some(how);
                        }
                    }
                }
            }
            inbound = ws.next() => match inbound {
                None => break None,
                Some(Err(tungstenite::Error::Capacity(_))) => break Some(Close::MessageTooBig),
                Some(Err(_)) => break None,
                // every message counts, pings included
                Some(Ok(msg)) if !traffic.allow(cfg, msg.len(), Instant::now()) => {
                    super::traffic::charge(&shared, &request).await;
                    break Some(Close::RateLimited);
                }
                Some(Ok(Message::Binary(bytes))) => {
                    last_inbound = Instant::now();
                    shared.metrics.bytes_in.inc_by(bytes.len() as u64);
                    match decode_yws_frame(bytes) {
                        Ok(YwsMessage::Sync(msg)) => { doc.send(DocCommand::Sync { conn, msg }).await; }
                        Ok(YwsMessage::Awareness(update)) => { doc.send(DocCommand::Awareness { conn, update }).await; }
                        Ok(YwsMessage::QueryAwareness) => { doc.send(DocCommand::QueryAwareness { conn }).await; }
                        Ok(YwsMessage::Ignored(_)) => {}
                        Err(e) => debug!(error = %e, "undecodable y-websocket frame (ignored)"),
                    }
                }
                Some(Ok(Message::Close(_))) => break None,
                Some(Ok(Message::Text(_))) => break Some(Close::UnsupportedData),
                Some(Ok(_)) => last_inbound = Instant::now(),
            },
            () = &mut timer => {
                let now = Instant::now();
                if now.duration_since(last_inbound) >= idle {
                    info!("idle timeout");
                    break Some(Close::ConnectionTimeout);
                }
                if let (Some(at), Some(every)) = (next_ping, ping_every) && now >= at {
                    next_ping = Some(now + every);
                    match write_guarded(&mut ws, Write::Ping, &mut out_rx, &mut signals).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(_)) => break None,
                        Err(Stop::Overflow) => {
                            shared.metrics.slow_readers.inc();
                            break Some(Close::SlowReader);
                        }
                        Err(Stop::Shutdown) => break Some(Close::ServiceRestart),
                    }
                }
                timer.as_mut().reset(next_deadline(last_inbound, next_ping));
            }
        }
    };
    doc.send_detached(DocCommand::Detach { conn, reply: None });
    shared.metrics.sockets.dec();
    if let Some(how) = end {
        shared
            .metrics
            .closes
            .with_label_values(&[&how.code().to_string()])
            .inc();
        Box::pin(close(*ws, how)).await;
    }
}
