//! The admin API's client, used by `hearth doc …`, `hearth event fire` and `hearth cluster
//! status|owner|drain`: one HTTP/1 request per command, JSON answers, and the exit status of
//! each answer.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Exit statuses of the admin commands (docs/admin-api.md, "Command line").
pub mod exit {
    /// The operation succeeded.
    pub const OK: u8 = 0;
    /// Any other failure (an unexpected answer).
    pub const OTHER: u8 = 1;
    /// The document, node, route or event handler does not exist.
    pub const NOT_FOUND: u8 = 3;
    /// The admin token was missing or refused.
    pub const FORBIDDEN: u8 = 4;
    /// The owner did not answer in time (the operation may still complete).
    pub const TIMEOUT: u8 = 5;
    /// The event's handler failed (its message is printed).
    pub const HANDLER_ERROR: u8 = 6;
    /// The request was refused as malformed or too large, or the command line is wrong.
    pub const BAD_INPUT: u8 = 64;
    /// The server, the cluster or the owner could not be reached; trying again may succeed.
    pub const UNAVAILABLE: u8 = 69;
}

/// Longest answer the client reads.
const MAX_ANSWER: usize = 256 << 20;

/// A failed admin command: its exit status and one line.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ClientError {
    /// The exit status.
    pub status: u8,
    /// One line saying why.
    pub message: String,
}

impl ClientError {
    fn new(status: u8, message: impl Into<String>) -> Self {
        ClientError {
            status,
            message: message.into(),
        }
    }
}

/// Where and as whom to send admin requests.
#[derive(Debug, Clone)]
pub struct Client {
    host: String,
    authority: String,
    token: String,
    timeout: Duration,
}

impl Client {
    /// A client of `server` (`http://host:port`, no path) with bearer `token`; every request
    /// gives up after `timeout`.
    pub fn new(server: &str, token: &str, timeout: Duration) -> Result<Client, ClientError> {
        let rest = server
            .trim_end_matches('/')
            .strip_prefix("http://")
            .ok_or_else(|| {
                ClientError::new(
                    exit::BAD_INPUT,
                    format!("--server {server:?}: expected http://host:port"),
                )
            })?;
        if rest.is_empty() || rest.contains('/') {
            return Err(ClientError::new(
                exit::BAD_INPUT,
                format!("--server {server:?}: expected http://host:port"),
            ));
        }
        if token.is_empty() {
            return Err(ClientError::new(
                exit::FORBIDDEN,
                "no admin token: set HEARTH_ADMIN_TOKEN or pass --token",
            ));
        }
        let host = if rest.contains(':') {
            rest.to_owned()
        } else {
            format!("{rest}:80")
        };
        Ok(Client {
            host,
            authority: rest.to_owned(),
            token: token.to_owned(),
            timeout,
        })
    }

    /// Sends one request and returns the JSON answer of a 2xx status, or the error's exit
    /// status and message.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        match tokio::time::timeout(self.timeout, self.send(method, path, body)).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::new(
                exit::TIMEOUT,
                format!(
                    "no answer from {} within {:?}",
                    self.authority, self.timeout
                ),
            )),
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let unreachable = |e: &dyn std::fmt::Display| {
            ClientError::new(
                exit::UNAVAILABLE,
                format!("cannot reach the admin API at {}: {e}", self.authority),
            )
        };
        let tcp = tokio::net::TcpStream::connect(&self.host)
            .await
            .map_err(|e| unreachable(&e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| unreachable(&e))?;
        tokio::spawn(conn);
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.authority)
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| ClientError::new(exit::BAD_INPUT, format!("request: {e}")))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| unreachable(&e))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| unreachable(&e))?
            .to_bytes();
        let value: Value = serde_json::from_slice(&body).map_err(|_| {
            ClientError::new(
                exit::OTHER,
                format!(
                    "HTTP {status} with a body that is not JSON: {}",
                    String::from_utf8_lossy(&body[..body.len().min(200)])
                ),
            )
        })?;
        if status.is_success() {
            return Ok(value);
        }
        let code = value
            .pointer("/error/code")
            .and_then(Value::as_str)
            .unwrap_or("");
        let message = value
            .pointer("/error/message")
            .and_then(Value::as_str)
            .unwrap_or("");
        Err(ClientError::new(
            status_of(status, code),
            format!("{code}: {message}"),
        ))
    }
}

/// The exit status of an error answer.
pub fn status_of(status: StatusCode, code: &str) -> u8 {
    match (status.as_u16(), code) {
        (_, "handler_error") => exit::HANDLER_ERROR,
        (404, _) => exit::NOT_FOUND,
        (401 | 403, _) => exit::FORBIDDEN,
        (504, _) => exit::TIMEOUT,
        (400 | 405 | 413 | 422, _) => exit::BAD_INPUT,
        (409 | 429 | 502 | 503, _) => exit::UNAVAILABLE,
        _ => exit::OTHER,
    }
}

/// Percent-encodes one path segment (a document or node name).
pub fn segment(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}
