//! Request routing and the answer of each route. Every answer is JSON; every failure is
//! `{"error": {"code", "message"}}` with the status code of its code.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use percent_encoding::percent_decode_str;
use serde_json::{Value, json};
use tracing::debug;

use super::{Admin, DrainError};
use crate::cluster::EmitError;
use crate::events::{self, BuiltinError};
use crate::revoke::{Revocation, RevokeError};

/// The OpenAPI description of this API (served at `/v1/openapi.json`).
pub(crate) const OPENAPI: &str = include_str!("openapi.json");

/// Every route this API serves, as (method, path template): what `/v1/openapi.json`
/// describes.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/openapi.json"),
    ("GET", "/v1/documents"),
    ("GET", "/v1/documents/{name}"),
    ("DELETE", "/v1/documents/{name}"),
    ("GET", "/v1/documents/{name}/owner"),
    ("POST", "/v1/documents/{name}/updates"),
    ("POST", "/v1/documents/{name}/ops"),
    ("POST", "/v1/documents/{name}/broadcast"),
    ("POST", "/v1/documents/{name}/close"),
    ("POST", "/v1/documents/{name}/events/{event}"),
    ("GET", "/v1/node"),
    ("GET", "/v1/nodes"),
    ("POST", "/v1/nodes/{id}/drain"),
    ("GET", "/v1/revocations"),
    ("POST", "/v1/revocations"),
    ("DELETE", "/v1/revocations/{kind}/{value}"),
];

/// How long a request body may take to arrive.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the node-wide routes (status, listing) may take.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest wait a caller may ask for (`timeout_ms`).
const MAX_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest document name (bytes, after percent-decoding).
const MAX_NAME_BYTES: usize = 1024;
/// Largest page of `GET /v1/documents`.
const MAX_PAGE: usize = 1000;

type Answer = Response<Full<Bytes>>;

/// A failed request: status, code, message.
struct Failure(StatusCode, &'static str, String);

impl Failure {
    fn bad(msg: impl Into<String>) -> Self {
        Failure(StatusCode::BAD_REQUEST, "bad_request", msg.into())
    }
}

fn answer(status: StatusCode, body: &Value) -> Answer {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn failure(f: Failure) -> Answer {
    let Failure(status, code, message) = f;
    let mut r = answer(
        status,
        &json!({ "error": { "code": code, "message": message } }),
    );
    match status {
        StatusCode::UNAUTHORIZED => {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"hearth-admin\""),
            );
        }
        StatusCode::TOO_MANY_REQUESTS => {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        _ => {}
    }
    r
}

/// Handles one request.
pub(super) async fn handle(admin: &Admin, req: Request<Incoming>) -> Answer {
    let route = route_label(req.method(), req.uri().path());
    let result = handle_inner(admin, req).await;
    let status = match &result {
        Ok(r) => r.status(),
        Err(Failure(s, _, _)) => *s,
    };
    admin
        .metrics
        .admin_requests
        .with_label_values(&[route, status.as_str()])
        .inc();
    match result {
        Ok(r) => r,
        Err(f) => failure(f),
    }
}

async fn handle_inner(admin: &Admin, req: Request<Incoming>) -> Result<Answer, Failure> {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .map(|t| t.trim_ascii());
    if !token.is_some_and(|t| admin.settings.accepts(t)) {
        return Err(Failure(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid `Authorization: Bearer <admin token>` header is required".into(),
        ));
    }
    if !admin.rate.allow() {
        return Err(Failure(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many admin requests (admin_requests_per_second)".into(),
        ));
    }
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = Query::parse(req.uri().query().unwrap_or(""))?;
    let body = read_body(req, admin.settings.max_body_bytes).await?;
    let segments: Vec<&str> = path
        .strip_prefix("/v1/")
        .ok_or_else(|| not_found_route(&path))?
        .split('/')
        .collect();
    match (method, segments.as_slice()) {
        (Method::GET, ["openapi.json"]) => {
            let v: Value = serde_json::from_str(OPENAPI).map_err(|e| {
                Failure(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    format!("openapi: {e}"),
                )
            })?;
            Ok(answer(StatusCode::OK, &v))
        }
        (Method::GET, ["documents"]) => bounded(list(admin, &query)).await,
        (Method::GET, ["node"]) => {
            let node = bounded(async { Ok(admin.backend.node().await) }).await?;
            Ok(answer(
                StatusCode::OK,
                &serde_json::to_value(node).unwrap_or(Value::Null),
            ))
        }
        (Method::GET, ["nodes"]) => {
            let nodes =
                bounded(async { admin.backend.nodes().await.map_err(emit_failure) }).await?;
            Ok(answer(StatusCode::OK, &json!({ "nodes": nodes })))
        }
        (Method::POST, ["nodes", id, "drain"]) => {
            let id = decode_segment(id)?;
            match admin.backend.drain(&id).await {
                Ok(()) => Ok(answer(
                    StatusCode::ACCEPTED,
                    &json!({ "node": id, "draining": true }),
                )),
                Err(DrainError::NotFound(n)) => Err(Failure(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("no live node {n:?}"),
                )),
                Err(DrainError::Unavailable(e)) => Err(emit_failure(e)),
            }
        }
        (Method::GET, ["revocations"]) => Ok(answer(
            StatusCode::OK,
            &json!({ "revocations": admin.backend.revocations() }),
        )),
        (Method::POST, ["revocations"]) => revoke(admin, &body).await,
        (Method::DELETE, ["revocations", kind, value]) => {
            let (kind, value) = (decode_segment(kind)?, decode_segment(value)?);
            let what = Revocation::from_parts(&kind, &value).ok_or_else(|| {
                Failure::bad(format!("kind {kind:?}: expected user, token or document"))
            })?;
            let lifted = admin.backend.lift(what).await.map_err(revoke_failure)?;
            Ok(answer(StatusCode::OK, &json!({ "lifted": lifted })))
        }
        (method, ["documents", name, rest @ ..]) => {
            let name = decode_segment(name)?;
            document(admin, method, &name, rest, &query, body).await
        }
        (_, _) => Err(not_found_route(&path)),
    }
}

/// Longest revocation accepted (a year).
const MAX_REVOCATION_S: u64 = 366 * 24 * 3600;
/// A revocation's length when the request names none (a day).
const DEFAULT_REVOCATION_S: u64 = 24 * 3600;

/// Reads a `POST /v1/revocations` body, `{"user" | "token" | "document": value, "ttl_s"?:
/// seconds}`: what to revoke and for how many seconds, or the one-line reason it is refused.
pub fn parse_revocation(body: &[u8]) -> Result<(Revocation, u64), String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("body: {e}"))?;
    let Some(obj) = v.as_object() else {
        return Err("body: expected a JSON object".into());
    };
    let mut what = None;
    for (k, val) in obj {
        if k == "ttl_s" {
            continue;
        }
        let value = val
            .as_str()
            .ok_or_else(|| format!("{k}: expected a string"))?;
        let r = Revocation::from_parts(k, value).ok_or_else(|| {
            format!("unknown field {k:?} (expected user, token or document, and ttl_s)")
        })?;
        if what.replace(r).is_some() {
            return Err("name exactly one of user, token and document".into());
        }
    }
    let what = what.ok_or("name one of user, token and document")?;
    let ttl = match obj.get("ttl_s") {
        None => DEFAULT_REVOCATION_S,
        Some(t) => t
            .as_u64()
            .filter(|t| (1..=MAX_REVOCATION_S).contains(t))
            .ok_or_else(|| format!("ttl_s: expected 1 to {MAX_REVOCATION_S}"))?,
    };
    Ok((what, ttl))
}

/// `POST /v1/revocations`.
async fn revoke(admin: &Admin, body: &[u8]) -> Result<Answer, Failure> {
    let (what, ttl) = parse_revocation(body).map_err(Failure::bad)?;
    let until = std::time::SystemTime::now() + Duration::from_secs(ttl);
    let report = admin
        .backend
        .revoke(what.clone(), until)
        .await
        .map_err(revoke_failure)?;
    let until_ms = crate::clock::unix_ms(until);
    Ok(answer(
        StatusCode::OK,
        &json!({
            "revoked": crate::revoke::RevocationEntry { what, until_ms },
            "nodes": report.nodes,
            "unreachable": report.unreachable,
        }),
    ))
}

fn revoke_failure(e: RevokeError) -> Failure {
    match e {
        RevokeError::BadValue | RevokeError::Ended => Failure::bad(e.to_string()),
        RevokeError::Full | RevokeError::Store(_) => Failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        ),
    }
}

/// Parses a request target (path and query) as the router does, without running anything:
/// `Ok` with the decoded path segments, or the one-line reason it would be refused. For tools
/// and the fuzzer.
pub fn parse_target(path: &str, query: &str) -> Result<Vec<String>, String> {
    Query::parse(query).map_err(|Failure(_, _, m)| m)?;
    let rest = path
        .strip_prefix("/v1/")
        .ok_or_else(|| format!("no route {path}"))?;
    rest.split('/')
        .take(8)
        .map(|s| decode_segment(s).map_err(|Failure(_, _, m)| m))
        .collect()
}

/// A node-wide route's work, bounded by [`STATUS_TIMEOUT`].
async fn bounded<T>(
    work: impl std::future::Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    tokio::time::timeout(STATUS_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| {
            Err(Failure(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!("no answer within {STATUS_TIMEOUT:?}"),
            ))
        })
}

fn not_found_route(path: &str) -> Failure {
    Failure(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route {path} (see /v1/openapi.json)"),
    )
}

/// A low-cardinality label for the metrics: the route template.
fn route_label(method: &Method, path: &str) -> &'static str {
    let segs: Vec<&str> = path.trim_start_matches("/v1/").split('/').collect();
    match (method.as_str(), segs.as_slice()) {
        ("GET", ["openapi.json"]) => "openapi",
        ("GET", ["documents"]) => "list",
        ("GET", ["node"]) => "node",
        ("GET", ["nodes"]) => "nodes",
        ("POST", ["nodes", _, "drain"]) => "drain",
        ("GET", ["documents", _]) => "get",
        ("DELETE", ["documents", _]) => "delete",
        ("GET", ["documents", _, "owner"]) => "owner",
        ("POST", ["documents", _, "updates"]) => "updates",
        ("POST", ["documents", _, "ops"]) => "ops",
        ("POST", ["documents", _, "broadcast"]) => "broadcast",
        ("POST", ["documents", _, "close"]) => "close",
        ("POST", ["documents", _, "events", _]) => "event",
        ("GET", ["revocations"]) => "revocations",
        ("POST", ["revocations"]) => "revoke",
        ("DELETE", ["revocations", _, _]) => "lift",
        _ => "other",
    }
}

async fn read_body(req: Request<Incoming>, max: usize) -> Result<Bytes, Failure> {
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > max as u64
    {
        return Err(too_large(max));
    }
    let read = tokio::time::timeout(BODY_TIMEOUT, Limited::new(req.into_body(), max).collect());
    match read.await {
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large(max)),
        Ok(Err(e)) => Err(Failure::bad(format!("reading the body: {e}"))),
        Err(_) => Err(Failure(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!("the body did not arrive within {BODY_TIMEOUT:?}"),
        )),
    }
}

fn too_large(max: usize) -> Failure {
    Failure(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("the body is over {max} bytes (admin_max_body_bytes)"),
    )
}

fn decode_segment(s: &str) -> Result<String, Failure> {
    let name = percent_decode_str(s)
        .decode_utf8()
        .map_err(|_| Failure::bad("a path segment is not UTF-8 once percent-decoded"))?
        .into_owned();
    if name.is_empty() {
        return Err(Failure::bad("empty document or node name"));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(Failure::bad(format!(
            "name of {} bytes is over {MAX_NAME_BYTES}",
            name.len()
        )));
    }
    if name.contains('\0') {
        return Err(Failure::bad("name contains a NUL character"));
    }
    Ok(name)
}

/// The query parameters this API knows; unknown ones are refused.
#[derive(Debug, Default)]
struct Query {
    claim: Option<bool>,
    timeout_ms: Option<u64>,
    include: Option<String>,
    types: Option<String>,
    prefix: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

impl Query {
    fn parse(q: &str) -> Result<Query, Failure> {
        let mut out = Query::default();
        for (i, pair) in q.split('&').filter(|p| !p.is_empty()).enumerate() {
            if i >= 32 {
                return Err(Failure::bad("too many query parameters"));
            }
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode_str(&v.replace('+', " "))
                .decode_utf8()
                .map_err(|_| Failure::bad(format!("query parameter {k}: not UTF-8")))?
                .into_owned();
            let num = |v: &str| {
                v.parse::<u64>()
                    .map_err(|_| Failure::bad(format!("query parameter {k}: not a number")))
            };
            match k {
                "claim" => {
                    out.claim = Some(match v.as_str() {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        _ => return Err(Failure::bad("claim: expected true or false")),
                    })
                }
                "timeout_ms" => out.timeout_ms = Some(num(&v)?),
                "include" => out.include = Some(v),
                "types" => out.types = Some(v),
                "prefix" => out.prefix = Some(v),
                "after" => out.after = Some(v),
                "limit" => out.limit = Some(num(&v)? as usize),
                other => {
                    return Err(Failure::bad(format!("unknown query parameter {other:?}")));
                }
            }
        }
        Ok(out)
    }
}

fn emit_failure(e: EmitError) -> Failure {
    match e {
        EmitError::NoHandler => Failure(
            StatusCode::NOT_FOUND,
            "no_handler",
            "no handler answers this event".into(),
        ),
        EmitError::Handler(m) => Failure(StatusCode::UNPROCESSABLE_ENTITY, "handler_error", m),
        EmitError::Timeout => Failure(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            "the owner did not answer in time (the operation may still complete)".into(),
        ),
        EmitError::Unavailable(m) => Failure(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m),
        EmitError::NotOwned => Failure(
            StatusCode::CONFLICT,
            "not_owned",
            "no node owns the document and claim=false".into(),
        ),
    }
}

/// A built-in event's failure: its own code when it wrote one.
fn builtin_failure(e: EmitError) -> Failure {
    if let EmitError::Handler(m) = &e
        && let Some(b) = BuiltinError::parse(m)
    {
        return match b {
            BuiltinError::NotFound(m) => Failure(StatusCode::NOT_FOUND, "not_found", m),
            BuiltinError::BadRequest(m) => Failure::bad(m),
            BuiltinError::Unavailable(m) => {
                Failure(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m)
            }
        };
    }
    emit_failure(e)
}

fn json_body(body: &Bytes) -> Result<Value, Failure> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    let v: Value =
        serde_json::from_slice(body).map_err(|e| Failure::bad(format!("body is not JSON: {e}")))?;
    if !v.is_object() {
        return Err(Failure::bad("the body must be a JSON object"));
    }
    Ok(v)
}

fn timeout(admin: &Admin, query: &Query, body: Option<&Value>) -> Result<Duration, Failure> {
    let from_body = body
        .and_then(|b| b.get("timeout_ms"))
        .map(|v| {
            v.as_u64()
                .ok_or_else(|| Failure::bad("timeout_ms: expected a number"))
        })
        .transpose()?;
    match from_body.or(query.timeout_ms) {
        Some(ms) if ms == 0 || ms > MAX_TIMEOUT.as_millis() as u64 => Err(Failure::bad(format!(
            "timeout_ms must be 1..={}",
            MAX_TIMEOUT.as_millis()
        ))),
        Some(ms) => Ok(Duration::from_millis(ms)),
        None => Ok(admin.backend.default_timeout().min(MAX_TIMEOUT)),
    }
}

/// Runs a built-in event on the document's owner and returns its JSON reply.
async fn builtin(
    admin: &Admin,
    name: &str,
    event: &str,
    payload: Value,
    query: &Query,
    wait: Duration,
) -> Result<Value, Failure> {
    let payload = payload.to_string().into_bytes();
    let reply = call(
        admin,
        name,
        event,
        payload,
        wait,
        query.claim.unwrap_or(true),
    )
    .await
    .map_err(builtin_failure)?;
    serde_json::from_slice(&reply).map_err(|e| {
        Failure(
            StatusCode::BAD_GATEWAY,
            "unavailable",
            format!("the owner's reply is not JSON: {e}"),
        )
    })
}

/// The backend's emit, bounded by `wait` even where the backend has no deadline of its own
/// (an event run on this node).
async fn call(
    admin: &Admin,
    name: &str,
    event: &str,
    payload: Vec<u8>,
    wait: Duration,
    claim: bool,
) -> Result<Vec<u8>, EmitError> {
    match tokio::time::timeout(
        wait + Duration::from_millis(250),
        admin.backend.emit(name, event, payload, wait, claim),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(EmitError::Timeout),
    }
}

async fn document(
    admin: &Admin,
    method: Method,
    name: &str,
    rest: &[&str],
    query: &Query,
    body: Bytes,
) -> Result<Answer, Failure> {
    match (method, rest) {
        (Method::GET, []) => {
            let include: Option<Vec<String>> = query
                .include
                .as_ref()
                .map(|s| s.split(',').map(|p| p.trim().to_owned()).collect());
            let payload = json!({ "include": include, "types": query.types });
            let wait = timeout(admin, query, None)?;
            let v = builtin(admin, name, events::GET, payload, query, wait).await?;
            Ok(answer(StatusCode::OK, &v))
        }
        (Method::DELETE, []) => {
            let wait = timeout(admin, query, None)?;
            let v = builtin(admin, name, events::DELETE, json!({}), query, wait).await?;
            Ok(answer(StatusCode::OK, &v))
        }
        (Method::GET, ["owner"]) => {
            let owner = admin.backend.owner(name).await.map_err(emit_failure)?;
            Ok(answer(
                StatusCode::OK,
                &json!({ "name": name, "owner": owner }),
            ))
        }
        (Method::POST, ["updates"]) => {
            let b = json_body(&body)?;
            let wait = timeout(admin, query, Some(&b))?;
            let update = b
                .get("update")
                .and_then(Value::as_str)
                .ok_or_else(|| Failure::bad("`update` (a base64 Yjs update) is required"))?;
            if update.len() / 4 * 3 > admin.settings.max_payload_bytes {
                return Err(Failure(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!(
                        "the update is over max_message_bytes ({})",
                        admin.settings.max_payload_bytes
                    ),
                ));
            }
            only_fields(&b, &["update", "timeout_ms"])?;
            let v = builtin(
                admin,
                name,
                events::APPLY,
                json!({ "update": update }),
                query,
                wait,
            )
            .await?;
            Ok(answer(StatusCode::OK, &v))
        }
        (Method::POST, ["ops"]) => {
            let b = json_body(&body)?;
            let wait = timeout(admin, query, Some(&b))?;
            only_fields(&b, &["ops", "timeout_ms"])?;
            if body.len() > admin.settings.max_payload_bytes {
                return Err(Failure(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!(
                        "operations of {} bytes are over max_message_bytes ({})",
                        body.len(),
                        admin.settings.max_payload_bytes
                    ),
                ));
            }
            let ops = b
                .get("ops")
                .filter(|o| o.is_array())
                .ok_or_else(|| Failure::bad("`ops` (an array of operations) is required"))?;
            let v = builtin(
                admin,
                name,
                events::APPLY,
                json!({ "ops": ops }),
                query,
                wait,
            )
            .await?;
            Ok(answer(StatusCode::OK, &v))
        }
        (Method::POST, ["broadcast"]) => {
            let b = json_body(&body)?;
            let wait = timeout(admin, query, Some(&b))?;
            only_fields(&b, &["message", "timeout_ms"])?;
            let message = b
                .get("message")
                .and_then(Value::as_str)
                .ok_or_else(|| Failure::bad("`message` (a string) is required"))?;
            let v = builtin(
                admin,
                name,
                events::BROADCAST,
                json!({ "message": message }),
                query,
                wait,
            )
            .await?;
            Ok(answer(StatusCode::OK, &v))
        }
        (Method::POST, ["close"]) => {
            let b = json_body(&body)?;
            let wait = timeout(admin, query, Some(&b))?;
            only_fields(&b, &["timeout_ms"])?;
            let v = builtin(admin, name, events::CLOSE, json!({}), query, wait).await?;
            Ok(answer(StatusCode::OK, &v))
        }
        (Method::POST, ["events", event]) => {
            let event = decode_segment(event)?;
            let b = json_body(&body)?;
            let wait = timeout(admin, query, Some(&b))?;
            only_fields(&b, &["payload", "payload_base64", "timeout_ms"])?;
            let payload = match (b.get("payload"), b.get("payload_base64")) {
                (Some(_), Some(_)) => {
                    return Err(Failure::bad("give `payload` or `payload_base64`, not both"));
                }
                (Some(p), None) => p.to_string().into_bytes(),
                (None, Some(p)) => {
                    let s = p
                        .as_str()
                        .ok_or_else(|| Failure::bad("payload_base64: expected a string"))?;
                    B64.decode(s)
                        .map_err(|e| Failure::bad(format!("payload_base64: {e}")))?
                }
                (None, None) => Vec::new(),
            };
            if payload.len() > admin.settings.max_payload_bytes {
                return Err(Failure(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!(
                        "the payload is over max_message_bytes ({})",
                        admin.settings.max_payload_bytes
                    ),
                ));
            }
            let claim = query.claim.unwrap_or(true);
            let reply = call(admin, name, &event, payload, wait, claim).await;
            let reply = if events::is_builtin(&event) {
                reply.map_err(builtin_failure)?
            } else {
                reply.map_err(emit_failure)?
            };
            debug!(
                doc = name,
                event,
                bytes = reply.len(),
                "admin event answered"
            );
            let v = if reply.is_empty() {
                json!({ "reply": null })
            } else {
                match serde_json::from_slice::<Value>(&reply) {
                    Ok(v) => json!({ "reply": v }),
                    Err(_) => json!({ "reply_base64": B64.encode(&reply) }),
                }
            };
            Ok(answer(StatusCode::OK, &v))
        }
        (m, r) => Err(Failure(
            if r.is_empty() || matches!(r, ["owner" | "updates" | "ops" | "broadcast" | "close"]) {
                StatusCode::METHOD_NOT_ALLOWED
            } else {
                StatusCode::NOT_FOUND
            },
            if r.is_empty() || matches!(r, ["owner" | "updates" | "ops" | "broadcast" | "close"]) {
                "method_not_allowed"
            } else {
                "not_found"
            },
            format!(
                "{m} is not served for /v1/documents/{{name}}/{}",
                r.join("/")
            ),
        )),
    }
}

fn only_fields(b: &Value, allowed: &[&str]) -> Result<(), Failure> {
    if let Some(obj) = b.as_object()
        && let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str()))
    {
        return Err(Failure::bad(format!(
            "unknown field {k:?} (expected {})",
            allowed.join(", ")
        )));
    }
    Ok(())
}

async fn list(admin: &Admin, query: &Query) -> Result<Answer, Failure> {
    let limit = query.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PAGE {
        return Err(Failure::bad(format!("limit must be 1..={MAX_PAGE}")));
    }
    let page = admin
        .backend
        .list(
            query.prefix.as_deref().unwrap_or(""),
            query.after.as_deref(),
            limit,
        )
        .await
        .map_err(emit_failure)?;
    Ok(answer(
        StatusCode::OK,
        &serde_json::to_value(page).unwrap_or(Value::Null),
    ))
}
