//! A small HTTP endpoint for webhook tests: records every request (headers and JSON body),
//! checks its signature, and answers as the test's function says (status, body, delay).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;

/// One request as received.
#[derive(Debug, Clone)]
pub struct Received {
    /// Header (lower-case name, value) pairs.
    pub headers: Vec<(String, String)>,
    /// The body as JSON (`Null` when it is not JSON).
    pub body: Value,
    /// True when `x-hearth-signature-256` is the HMAC-SHA256 of the body under the secret.
    pub signed: bool,
}

impl Received {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What the endpoint answers: status, JSON body text, delay before answering.
pub type Answer = (u16, String, Duration);

/// A running endpoint.
pub struct Receiver {
    /// `http://addr/hook`.
    pub url: String,
    /// Every request so far, in arrival order.
    pub received: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    /// Starts an endpoint that checks signatures with `secret` and answers with `answer`.
    pub async fn start(
        secret: &str,
        answer: impl Fn(&Received) -> Answer + Send + Sync + 'static,
    ) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let answer = Arc::new(answer);
        let secret = secret.as_bytes().to_vec();
        let log = received.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (log, answer, secret) = (log.clone(), answer.clone(), secret.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (log, answer, secret) = (log.clone(), answer.clone(), secret.clone());
                        async move {
                            let headers: Vec<(String, String)> = req
                                .headers()
                                .iter()
                                .filter_map(|(k, v)| {
                                    Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned()))
                                })
                                .collect();
                            let bytes = req.into_body().collect().await?.to_bytes();
                            let signed = headers
                                .iter()
                                .find(|(k, _)| k == "x-hearth-signature-256")
                                .is_some_and(|(_, v)| *v == sign(&secret, &bytes));
                            let r = Received {
                                headers,
                                body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
                                signed,
                            };
                            log.lock().unwrap().push(r.clone());
                            let (status, body, delay) = answer(&r);
                            tokio::time::sleep(delay).await;
                            Ok::<_, hyper::Error>(
                                Response::builder()
                                    .status(status)
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(body)))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Receiver {
            url: format!("http://{addr}/hook"),
            received,
        }
    }

    /// A copy of what arrived so far.
    pub fn all(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// How many requests arrived so far.
    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }
}

/// `sha256=<hex HMAC-SHA256(secret, body)>`, computed here independently of the server.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    use hmac::{Hmac, KeyInit, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}
