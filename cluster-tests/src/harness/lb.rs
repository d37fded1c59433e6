//! A round-robin TCP load balancer on `127.0.0.1:0` (L4, like a Kubernetes Service).
//!
//! Each accepted connection goes to the next backend in the list; a backend that refuses the
//! connection (or does not accept within 1 s) is skipped for that connection. The list can be
//! changed at any time; [`Lb::reset_all`] cuts every proxied connection (RST), e.g. to force
//! clients to reconnect through the new list. Runs on the test's tokio runtime; everything stops
//! when the handle drops.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::timeout;

#[derive(Debug)]
struct Conn {
    backend: Option<SocketAddr>,
    kill: Arc<Notify>,
}

#[derive(Debug, Default)]
struct Shared {
    backends: Mutex<Vec<SocketAddr>>,
    next: AtomicUsize,
    conns: Mutex<HashMap<u64, Conn>>,
    accepted: AtomicU64,
    refused: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The balancer (stopped on drop).
#[derive(Debug)]
pub struct Lb {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl Lb {
    /// Listens on `127.0.0.1:0` and balances over `backends`.
    pub async fn start(backends: Vec<SocketAddr>) -> anyhow::Result<Lb> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            backends: Mutex::new(backends),
            ..Default::default()
        });
        let s = shared.clone();
        let accept = tokio::spawn(async move {
            let mut ids = 0u64;
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                ids += 1;
                let id = ids;
                let kill = Arc::new(Notify::new());
                lock(&s.conns).insert(
                    id,
                    Conn {
                        backend: None,
                        kill: kill.clone(),
                    },
                );
                tokio::spawn(serve(s.clone(), id, client, kill));
            }
        });
        Ok(Lb {
            addr,
            shared,
            accept,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `ws://ip:port/`.
    pub fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    /// Replaces the backend list (existing connections stay where they are).
    pub fn set_backends(&self, backends: Vec<SocketAddr>) {
        *lock(&self.shared.backends) = backends;
    }

    /// Adds a backend.
    pub fn add_backend(&self, backend: SocketAddr) {
        lock(&self.shared.backends).push(backend);
    }

    /// Removes a backend (existing connections to it stay up; see [`reset_to`](Self::reset_to)).
    pub fn remove_backend(&self, backend: SocketAddr) {
        lock(&self.shared.backends).retain(|b| *b != backend);
    }

    /// The current backend list.
    pub fn backends(&self) -> Vec<SocketAddr> {
        lock(&self.shared.backends).clone()
    }

    /// Proxied connections open now, per backend.
    pub fn open_connections(&self) -> Vec<(SocketAddr, usize)> {
        let mut out: Vec<(SocketAddr, usize)> = Vec::new();
        for c in lock(&self.shared.conns).values() {
            let Some(b) = c.backend else { continue };
            match out.iter_mut().find(|(a, _)| *a == b) {
                Some((_, n)) => *n += 1,
                None => out.push((b, 1)),
            }
        }
        out
    }

    /// (connections proxied, connections dropped because no backend accepted) so far.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.shared.accepted.load(Ordering::Relaxed),
            self.shared.refused.load(Ordering::Relaxed),
        )
    }

    /// Cuts every proxied connection at once: both sockets are reset (RST), so client and
    /// backend see the connection die without a close handshake.
    pub fn reset_all(&self) {
        for (_, c) in lock(&self.shared.conns).drain() {
            c.kill.notify_one();
        }
    }

    /// Cuts every proxied connection to `backend` (RST).
    pub fn reset_to(&self, backend: SocketAddr) {
        lock(&self.shared.conns).retain(|_, c| {
            if c.backend == Some(backend) {
                c.kill.notify_one();
                false
            } else {
                true
            }
        });
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        self.accept.abort();
        self.reset_all();
    }
}

async fn serve(s: Arc<Shared>, id: u64, mut client: TcpStream, kill: Arc<Notify>) {
    let _ = client.set_nodelay(true);
    let connected = tokio::select! {
        c = connect_next(&s) => c,
        _ = kill.notified() => None,
    };
    match connected {
        Some((backend, mut upstream)) => {
            s.accepted.fetch_add(1, Ordering::Relaxed);
            if let Some(c) = lock(&s.conns).get_mut(&id) {
                c.backend = Some(backend);
            }
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                _ = kill.notified() => {
                    let _ = client.set_zero_linger();
                    let _ = upstream.set_zero_linger();
                }
            }
        }
        None => {
            s.refused.fetch_add(1, Ordering::Relaxed);
            let _ = client.set_zero_linger();
        }
    }
    lock(&s.conns).remove(&id);
}

async fn connect_next(s: &Shared) -> Option<(SocketAddr, TcpStream)> {
    let backends = lock(&s.backends).clone();
    if backends.is_empty() {
        return None;
    }
    let start = s.next.fetch_add(1, Ordering::Relaxed);
    for i in 0..backends.len() {
        let b = backends[(start + i) % backends.len()];
        if let Ok(Ok(up)) = timeout(Duration::from_secs(1), TcpStream::connect(b)).await {
            let _ = up.set_nodelay(true);
            return Some((b, up));
        }
    }
    None
}
