//! Calls to the application's HTTP endpoints: authentication by webhook ([`auth`]) and event
//! notifications ([`events`]).
//!
//! Both send JSON in a `POST`, signed the same way:
//!
//! * `X-Hearth-Signature-256: sha256=<hex>`, the HMAC-SHA256 of the exact body bytes under the
//!   configured secret (the scheme GitHub and Hocuspocus's webhook extension use, so a receiver's
//!   existing check works; the same value is also sent as `X-Hocuspocus-Signature-256`);
//! * `X-Hearth-Timestamp: <unix milliseconds>`, also inside the signed body as `timestamp`, so a
//!   receiver can refuse replays;
//! * `X-Hearth-Delivery: <uuid>`, the same on every retry of one request, for de-duplication.
//!
//! **Invariants:** every call has a deadline; an answer body is read only up to
//! [`MAX_ANSWER_BYTES`] (a longer one is a failed call); redirects are not followed; the
//! secret never appears in logs or `Debug` output.

pub mod auth;
pub mod events;

use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::config::ConfigError;

/// Longest answer body read from an endpoint.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Shortest accepted signing secret.
pub const MIN_SECRET_BYTES: usize = 16;

/// Why one call to an endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No answer within the deadline.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The connection failed (refused, reset, TLS).
    #[error("connection failed: {0}")]
    Connect(String),
    /// The answer body is longer than [`MAX_ANSWER_BYTES`].
    #[error("answer longer than {MAX_ANSWER_BYTES} bytes")]
    TooLong,
}

/// An answer: status and (bounded) body.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status code.
    pub status: u16,
    /// The body, at most [`MAX_ANSWER_BYTES`].
    pub body: Vec<u8>,
}

/// A signed-`POST` client for one endpoint.
#[derive(Clone)]
pub struct Endpoint {
    http: reqwest::Client,
    url: reqwest::Url,
    key: Hmac<Sha256>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("url", &redacted(&self.url))
            .finish_non_exhaustive()
    }
}

/// The URL without user information or query (for logs).
fn redacted(url: &reqwest::Url) -> String {
    format!(
        "{}://{}{}",
        url.scheme(),
        url.host_str().unwrap_or_default(),
        url.port().map(|p| format!(":{p}")).unwrap_or_default()
    ) + url.path()
}

impl Endpoint {
    /// An endpoint at `url` (http or https) signing with `secret`; `names` are the settings'
    /// names, for errors.
    pub fn new(
        (url_name, url): (&'static str, &str),
        (secret_name, secret): (&'static str, &str),
    ) -> Result<Self, ConfigError> {
        let invalid = |name, message: String| ConfigError::Invalid { name, message };
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| invalid(url_name, format!("{e} (expected http://… or https://…)")))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(invalid(
                url_name,
                "must be an http:// or https:// URL with a host".into(),
            ));
        }
        if secret.len() < MIN_SECRET_BYTES {
            return Err(invalid(
                secret_name,
                format!(
                    "must be set, at least {MIN_SECRET_BYTES} characters, when {url_name} is set \
                     (every request is signed with it)"
                ),
            ));
        }
        let key = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
            .map_err(|e| invalid(secret_name, e.to_string()))?;
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!("hearth/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| invalid(url_name, format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            http,
            url: parsed,
            key,
        })
    }

    /// The endpoint's URL for logs (no credentials, no query).
    pub fn shown_url(&self) -> String {
        redacted(&self.url)
    }

    /// The signature header value of `body`: `sha256=<hex HMAC-SHA256>`.
    pub fn signature(&self, body: &[u8]) -> String {
        let mut mac = self.key.clone();
        mac.update(body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }

    /// One signed `POST` of `body` (JSON), answered within `timeout` (the body read included).
    pub async fn post(
        &self,
        body: Vec<u8>,
        timestamp_ms: u64,
        delivery: &str,
        event: &str,
        timeout: Duration,
    ) -> Result<Answer, CallError> {
        let signature = self.signature(&body);
        let call = async {
            let mut response = self
                .http
                .post(self.url.clone())
                .header("content-type", "application/json")
                .header("x-hearth-signature-256", &signature)
                .header("x-hocuspocus-signature-256", &signature)
                .header("x-hearth-timestamp", timestamp_ms.to_string())
                .header("x-hearth-delivery", delivery)
                .header("x-hearth-event", event)
                .body(body)
                .send()
                .await
                .map_err(|e| CallError::Connect(error_chain(&e.without_url())))?;
            let status = response.status().as_u16();
            let body = read_capped(&mut response, MAX_ANSWER_BYTES)
                .await
                .map_err(|e| CallError::Connect(error_chain(&e.without_url())))?
                .ok_or(CallError::TooLong)?;
            Ok(Answer { status, body })
        };
        tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| CallError::Timeout(timeout))?
    }
}

/// Reads `response`'s body, at most `max` bytes: `None` as soon as it is longer (its
/// `Content-Length` is checked before anything is read).
pub(crate) async fn read_capped(
    response: &mut reqwest::Response,
    max: usize,
) -> Result<Option<Vec<u8>>, reqwest::Error> {
    if response.content_length().is_some_and(|n| n > max as u64) {
        return Ok(None);
    }
    let mut out = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if out.len() + chunk.len() > max {
            return Ok(None);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(Some(out))
}

/// An error and its causes on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Splits a comma-separated setting into trimmed, non-empty, lower-cased names.
pub(crate) fn name_list(text: &str) -> Vec<String> {
    text.split(',')
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_the_hmac_of_the_body() {
        let e = Endpoint::new(("u", "http://127.0.0.1:1/hook"), ("s", "0123456789abcdef"))
            .unwrap_or_else(|e| panic!("{e}"));
        // HMAC-SHA256("0123456789abcdef", "{}"), computed independently
        let want = "sha256=f91e3e9f05cc2df64ac1c26f8adccdffda8d1e4a7a8c50a1a08eeadac6ddfec5";
        assert_eq!(e.signature(b"{}"), want);
    }

    #[test]
    fn settings_are_checked() {
        assert!(Endpoint::new(("u", "ftp://x/"), ("s", "0123456789abcdef")).is_err());
        assert!(Endpoint::new(("u", "not a url"), ("s", "0123456789abcdef")).is_err());
        let short = Endpoint::new(("u", "http://x/"), ("s", "short")).map(|_| ());
        assert!(short.is_err_and(|e| e.to_string().contains('s')));
    }
}
