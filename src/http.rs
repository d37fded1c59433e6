//! The HTTP front: routes of the client port and of the operator listener.
//!
//! Client port (`handle`); every request first passes the per-address connection cap
//! (429 and close when over it, see `limits`):
//!
//! | path | answer |
//! |---|---|
//! | `/healthz` | 200 while the process runs |
//! | `/readyz` | 200 `ready` unless draining, storage never reached, or a dependency down for longer than `readiness_outage_ms` (`crate::health`); else 503 `not ready` (the reason is logged) |
//! | `/y/<document>` (upgrade) | y-websocket protocol |
//! | any other path (upgrade) | Hocuspocus protocol |
//! | `/` (plain) | `on_request` hooks, else 200 `Welcome to Hearth!` |
//! | any other path (plain) | `on_request` hooks, else 404 |
//!
//! Operator listener (`handle_operator`, `operator_listen`):
//!
//! | path | answer |
//! |---|---|
//! | `/healthz` | 200 while the process runs |
//! | `/readyz` | as on the client port, with the reason in the 503 body |
//! | `/metrics` | Prometheus text format |
//! | `/cluster/owned` | names of the documents loaded here, one per line (in a cluster: the ones this node owns) |
//! | anything else | 404 |

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tracing::{debug, info};

use crate::client_ip::TrustedProxies;
use crate::connection::shared::Shared;
use crate::connection::{hocuspocus, yws};
use crate::limits::{ConnectionSlot, IpAdmission};
use crate::request::RequestInfo;

/// Capacity of a WebSocket's read buffer: one allocation size class below 512 bytes, so an
/// idle socket holds 128 bytes less (docs/benchmarks.md, "An idle connection's last bytes").
const READ_BUFFER_BYTES: usize = 384;

/// Path prefix of the y-websocket endpoint.
pub const YWS_PREFIX: &str = "/y/";

type Body = Full<Bytes>;

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// What the hooks see of a request. A WebSocket keeps it for its whole life, so the header
/// list is allocated at its exact length (collecting from a filter grows it by doubling, to up
/// to twice the slots).
fn request_info(req: &Request<Incoming>, remote: SocketAddr) -> RequestInfo {
    RequestInfo::new(
        req.uri().path(),
        req.uri().query().unwrap_or_default(),
        req.headers()
            .iter()
            .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?))),
        Some(remote),
    )
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    let has = |name: header::HeaderName, token: &str| {
        req.headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case(token)))
    };
    has(header::CONNECTION, "upgrade") && has(header::UPGRADE, "websocket")
}

/// 429 for a connection over its address's cap; the connection closes after it.
fn too_many_connections() -> Response<Body> {
    let mut r = text(
        StatusCode::TOO_MANY_REQUESTS,
        "too many connections from this address\n",
    );
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// Serves one HTTP request on the client port, arriving on connection `conn`.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    mut req: Request<Incoming>,
    conn: Arc<ConnectionSlot>,
    trusted: Arc<TrustedProxies>,
) -> Result<Response<Body>, Infallible> {
    let remote = conn.peer;
    let client = trusted.client_ip(
        remote.ip(),
        req.headers()
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok()),
    );
    if conn.assign(client) != IpAdmission::Within {
        conn.count_ip_refusal();
        debug!(client = %client, peer = %remote, "connection cap of the client address reached: 429");
        return Ok(too_many_connections());
    }
    let path = req.uri().path();
    if !is_upgrade(&req) {
        return Ok(match path {
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => match readiness(&shared) {
                Ok(()) => text(StatusCode::OK, "ready\n"),
                Err(reason) => {
                    info!(%reason, "/readyz: not ready");
                    text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            },
            _ => {
                let info = request_info(&req, remote);
                match shared.extensions.on_request(&info).await {
                    Ok(Some(answer)) => {
                        let mut r = text(
                            StatusCode::from_u16(answer.status).unwrap_or(StatusCode::OK),
                            answer.body,
                        );
                        if let Ok(ct) = HeaderValue::from_str(&answer.content_type) {
                            r.headers_mut().insert(header::CONTENT_TYPE, ct);
                        }
                        r
                    }
                    Ok(None) if path == "/" => text(StatusCode::OK, "Welcome to Hearth!"),
                    Ok(None) => text(StatusCode::NOT_FOUND, "Not Found\n"),
                    Err(e) => text(StatusCode::FORBIDDEN, e.reason),
                }
            }
        });
    }
    if shared.draining.load(Ordering::Acquire) {
        return Ok(text(StatusCode::SERVICE_UNAVAILABLE, "draining"));
    }
    let Some(key) = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| derive_accept_key(k.as_bytes()))
    else {
        return Ok(text(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key"));
    };
    if let Some(refusal) = crate::throttle::refuse_upgrade(&shared.throttle, client).await {
        return Ok(refusal); // banned after repeated failed authentication
    }
    let info = Arc::new(request_info(&req, remote));
    if let Err(e) = shared.extensions.on_upgrade(&info).await {
        return Ok(text(StatusCode::FORBIDDEN, e.reason));
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    let cfg = &shared.config;
    let ws_config = WebSocketConfig::default()
        // Every socket keeps this buffer for its life, and tungstenite reads at most this much
        // per call (a frame larger than it takes several reads, into a buffer grown to the
        // frame). Typing updates and awareness states are usually smaller than this.
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .max_write_buffer_size(usize::MAX) // bounded by the outbox instead; a frame may be any size
        .max_message_size(Some(cfg.max_message_bytes))
        .max_frame_size(Some(cfg.max_message_bytes));
    let task_shared = shared.clone();
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                debug!(error = %e, "upgrade failed");
                return;
            }
        };
        // the connection stays counted against the caps for as long as the socket lives
        let Some(io) = crate::connection::into_io(upgraded, conn) else {
            debug!("upgraded connection is not a TCP stream");
            return;
        };
        let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(ws_config)).await;
        // The socket lives in a task of its own: this task's state (the upgrade, the handshake)
        // would otherwise stay allocated beside it for the socket's whole life.
        match info.path().strip_prefix(YWS_PREFIX) {
            Some(name) => {
                let name = name.to_owned();
                let tasks = task_shared.sockets.clone();
                tasks.spawn(yws::serve(task_shared, ws, info, name));
            }
            None => {
                let tasks = task_shared.sockets.clone();
                tasks.spawn(hocuspocus::serve(task_shared, ws, info));
            }
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&key) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    Ok(r)
}

/// Serves one HTTP request on the operator listener.
pub(crate) async fn handle_operator(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    Ok(match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match readiness(&shared) {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
        },
        "/cluster/owned" => {
            // this node's own view: the documents it serves (and, in a cluster, holds the lock for)
            let mut names: Vec<String> = shared
                .docs
                .registry
                .handles()
                .iter()
                .map(|h| h.name().to_owned())
                .collect();
            names.sort();
            let mut body = names.join("\n");
            body.push('\n');
            text(StatusCode::OK, body)
        }
        "/metrics" => {
            let mut r = text(StatusCode::OK, shared.metrics.render());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        _ => text(StatusCode::NOT_FOUND, "Not Found\n"),
    })
}

/// Whether the node should receive clients, answered at once from the background checks
/// (`crate::health`): `Err(reason)` while draining or shutting down, before storage was reached
/// once, or after storage (or Redis) has been unreachable for longer than
/// `readiness_outage_ms`; with `readiness_outage_ms` 0 also as soon as a storage write failed
/// (until one succeeds).
fn readiness(shared: &Shared) -> Result<(), String> {
    if shared.draining.load(Ordering::Acquire) {
        return Err("draining".into());
    }
    if shared.config.readiness_outage_ms == 0 && shared.metrics.failed_writes_recent() {
        return Err("storage writes failing".into());
    }
    shared.readiness.verdict()
}

/// Accepts connections on `listener` until the task is aborted and serves each in a task of its
/// own with `serve`; at most `max` at once (one more is closed as soon as it is accepted).
/// `what` names the listener in logs.
pub(crate) async fn accept_bounded<F, Fut>(
    listener: tokio::net::TcpListener,
    max: usize,
    what: &'static str,
    serve: F,
) where
    F: Fn(tokio::net::TcpStream, std::net::SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(tokio::sync::Semaphore::new(max));
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, listener = what, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            debug!(peer = %remote, listener = what, "listener busy: closing");
            continue;
        };
        let conn = serve(tcp, remote);
        tokio::spawn(async move {
            conn.await;
            drop(permit);
        });
    }
}
