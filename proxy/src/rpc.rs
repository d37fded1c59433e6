//! Custom events: request/reply over envelopes, with a deadline on every call.
//!
//! [`Rpc::call`] registers a pending entry keyed by a [`RequestId`] (this incarnation + a
//! counter), sends an `rpc` envelope and waits for the matching `rpc_reply` until the timeout.
//! The pending entry is removed when the reply arrives, when the call times out, and when the
//! calling future is dropped (a guard does it), so the map can't leak. Replies for unknown ids
//! (late, duplicated, or for a previous incarnation) are dropped.
//!
//! The receive loop owns dispatch: it passes every [`Body::RpcReply`] to [`Rpc::on_reply`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::envelope::{Body, Holder, RpcErrorCode, RpcFailure, RpcReply, RpcRequest};
use crate::error::ProxyError;
use crate::ids::{NodeAddr, RequestId};
use crate::transport::{EnvelopeSink, Transport};

/// Why a custom-event call failed.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// No reply within the timeout. The event may or may not have run.
    #[error("custom event timed out")]
    Timeout,
    /// The receiver doesn't own the document; re-resolve the owner and retry once.
    #[error("receiver is not the owner")]
    NotOwner {
        /// The current holder, if the receiver knew it.
        holder: Option<Holder>,
    },
    /// The handler (or the receiver) reported an error.
    #[error("custom event failed remotely: {code:?}: {msg}")]
    Remote {
        /// Error code.
        code: RpcErrorCode,
        /// Message.
        msg: String,
    },
    /// The publish reached no subscriber: the destination incarnation is gone. Invalidate its
    /// routes and re-resolve.
    #[error("destination is not subscribed")]
    Unreachable,
    /// Sending failed.
    #[error("transport: {0}")]
    Transport(#[from] ProxyError),
}

/// A custom-event call, with every option.
#[derive(Debug, Clone)]
pub struct Call {
    /// The document.
    pub doc: String,
    /// The owner epoch the caller routed by, if known (lets the owner refuse stale routes).
    pub epoch: Option<i64>,
    /// Event name.
    pub name: String,
    /// Opaque payload.
    pub payload: Vec<u8>,
    /// How long to wait for the reply (also sent as `deadline_ms`).
    pub timeout: Duration,
    /// Run only if the document is already open on the owner.
    pub only_if_open: bool,
}

type Pending = HashMap<RequestId, (NodeAddr, oneshot::Sender<Result<Vec<u8>, RpcError>>)>;

/// The request/reply helper. Share it behind an `Arc`.
#[derive(Debug)]
pub struct Rpc<S = Transport> {
    sink: S,
    // std Mutex: single map operations only, nothing awaits under it.
    pending: Mutex<Pending>,
    counter: AtomicU64,
}

/// Removes the pending entry when the call ends, whichever way it ends.
struct PendingGuard<'a> {
    pending: &'a Mutex<Pending>,
    id: RequestId,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        lock(self.pending).remove(&self.id);
    }
}

fn lock(m: &Mutex<Pending>) -> MutexGuard<'_, Pending> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<S: EnvelopeSink> Rpc<S> {
    /// A helper sending through `sink`.
    pub fn new(sink: S) -> Self {
        Rpc {
            sink,
            pending: Mutex::new(HashMap::new()),
            counter: AtomicU64::new(0),
        }
    }

    /// The sink (usually the [`Transport`]).
    pub fn sink(&self) -> &S {
        &self.sink
    }

    /// Calls event `name` on `to` (the owner of `doc`) and waits at most `timeout` for the
    /// result.
    pub async fn call(
        &self,
        to: &NodeAddr,
        doc: &str,
        name: &str,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, RpcError> {
        let call = Call {
            doc: doc.to_owned(),
            epoch: None,
            name: name.to_owned(),
            payload,
            timeout,
            only_if_open: false,
        };
        self.call_with(to, call).await
    }

    /// Like [`Rpc::call`], with every option.
    pub async fn call_with(&self, to: &NodeAddr, call: Call) -> Result<Vec<u8>, RpcError> {
        let id = RequestId {
            inc: self.sink.local_addr().inc,
            n: self.counter.fetch_add(1, Ordering::Relaxed) + 1,
        };
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, (to.clone(), tx));
        let _guard = PendingGuard {
            pending: &self.pending,
            id,
        };
        let request = RpcRequest {
            id,
            doc: call.doc,
            epoch: call.epoch,
            name: call.name,
            payload: call.payload,
            deadline_ms: u64::try_from(call.timeout.as_millis()).unwrap_or(u64::MAX),
            only_if_open: call.only_if_open,
        };
        let exchange = async {
            let receivers = self.sink.send_to(to, Body::Rpc(request)).await?;
            if receivers == 0 {
                return Err(RpcError::Unreachable);
            }
            rx.await
                .unwrap_or(Err(RpcError::Transport(ProxyError::Closed)))
        };
        match tokio::time::timeout(call.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(RpcError::Timeout),
        }
    }

    /// Resolves the pending call `reply.id`. Returns `false` (and drops the reply) when no call
    /// with that id is pending.
    pub fn on_reply(&self, reply: RpcReply) -> bool {
        let Some((_, tx)) = lock(&self.pending).remove(&reply.id) else {
            return false;
        };
        let result = reply.result.map_err(|failure| match failure.code {
            RpcErrorCode::NotOwner => RpcError::NotOwner {
                holder: failure.holder,
            },
            code => RpcError::Remote {
                code,
                msg: failure.msg,
            },
        });
        // The caller may have given up in the meantime; nothing to do then.
        let _ = tx.send(result);
        true
    }

    /// Fails every call pending on `node` with [`RpcError::Unreachable`] (call when it dies).
    /// Returns how many were failed.
    pub fn fail_node(&self, node: &NodeAddr) -> usize {
        let failed: Vec<_> = {
            let mut pending = lock(&self.pending);
            let ids: Vec<RequestId> = pending
                .iter()
                .filter(|(_, (to, _))| to == node)
                .map(|(id, _)| *id)
                .collect();
            ids.into_iter()
                .filter_map(|id| pending.remove(&id))
                .collect()
        };
        let count = failed.len();
        for (_, tx) in failed {
            let _ = tx.send(Err(RpcError::Unreachable));
        }
        count
    }

    /// Sends the reply to `request` back to `caller` (the request envelope's `from`).
    pub async fn reply(
        &self,
        caller: &NodeAddr,
        request: &RpcRequest,
        result: Result<Vec<u8>, RpcFailure>,
    ) -> Result<u64, ProxyError> {
        let body = Body::RpcReply(RpcReply {
            id: request.id,
            result,
        });
        self.sink.send_to(caller, body).await
    }

    /// Number of calls waiting for a reply (a gauge).
    pub fn pending_len(&self) -> usize {
        lock(&self.pending).len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Arc;

    use tokio::sync::mpsc;

    use super::*;
    use crate::ids::{Incarnation, NodeId};

    /// A sink that hands sent bodies to the test, and answers with a fixed receiver count.
    struct FakeSink {
        me: NodeAddr,
        receivers: u64,
        sent: mpsc::UnboundedSender<(NodeAddr, Body)>,
    }

    impl EnvelopeSink for FakeSink {
        fn local_addr(&self) -> &NodeAddr {
            &self.me
        }

        fn send_to(
            &self,
            to: &NodeAddr,
            body: Body,
        ) -> impl std::future::Future<Output = Result<u64, ProxyError>> + Send {
            let _ = self.sent.send((to.clone(), body));
            let n = self.receivers;
            async move { Ok(n) }
        }
    }

    fn addr(name: &str, inc: u64) -> NodeAddr {
        NodeAddr::new(NodeId::new(name).unwrap(), Incarnation(inc))
    }

    fn rpc(
        receivers: u64,
    ) -> (
        Arc<Rpc<FakeSink>>,
        mpsc::UnboundedReceiver<(NodeAddr, Body)>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let sink = FakeSink {
            me: addr("caller", 7),
            receivers,
            sent: tx,
        };
        (Arc::new(Rpc::new(sink)), rx)
    }

    #[tokio::test(start_paused = true)]
    async fn timeout_removes_the_pending_entry() {
        let (rpc, mut sent) = rpc(1);
        let owner = addr("owner", 1);
        let call = {
            let rpc = rpc.clone();
            let owner = owner.clone();
            tokio::spawn(async move {
                rpc.call(&owner, "doc", "ev", vec![1], Duration::from_millis(500))
                    .await
            })
        };
        let (to, body) = sent.recv().await.unwrap();
        assert_eq!(to, owner);
        let Body::Rpc(req) = body else {
            panic!("expected an rpc body")
        };
        assert_eq!(req.deadline_ms, 500);
        assert_eq!(req.id.inc, Incarnation(7));
        assert_eq!(rpc.pending_len(), 1);
        let result = call.await.unwrap();
        assert!(matches!(result, Err(RpcError::Timeout)));
        assert_eq!(rpc.pending_len(), 0);
        // A reply arriving after the timeout is dropped.
        assert!(!rpc.on_reply(RpcReply {
            id: req.id,
            result: Ok(vec![])
        }));
    }

    #[tokio::test]
    async fn reply_resolves_and_removes() {
        let (rpc, mut sent) = rpc(1);
        let owner = addr("owner", 1);
        let call = {
            let rpc = rpc.clone();
            tokio::spawn(async move {
                rpc.call(&owner, "doc", "ev", vec![1], Duration::from_secs(5))
                    .await
            })
        };
        let (_, Body::Rpc(req)) = sent.recv().await.unwrap() else {
            panic!("expected an rpc body")
        };
        // An unknown id is dropped and doesn't disturb the pending call.
        let mut other = req.id;
        other.n += 1000;
        assert!(!rpc.on_reply(RpcReply {
            id: other,
            result: Ok(vec![9])
        }));
        // Same counter, different (previous) incarnation: also unknown.
        let mut old_inc = req.id;
        old_inc.inc = Incarnation(6);
        assert!(!rpc.on_reply(RpcReply {
            id: old_inc,
            result: Ok(vec![9])
        }));
        assert!(rpc.on_reply(RpcReply {
            id: req.id,
            result: Ok(b"ok".to_vec())
        }));
        assert_eq!(call.await.unwrap().unwrap(), b"ok");
        assert_eq!(rpc.pending_len(), 0);
    }

    #[tokio::test]
    async fn remote_errors_map_to_variants() {
        let (rpc, mut sent) = rpc(1);
        for (code, holder) in [
            (RpcErrorCode::NotOwner, Some(addr("other", 2))),
            (RpcErrorCode::HandlerError, None),
        ] {
            let call = {
                let rpc = rpc.clone();
                tokio::spawn(async move {
                    rpc.call(
                        &addr("owner", 1),
                        "doc",
                        "ev",
                        vec![],
                        Duration::from_secs(5),
                    )
                    .await
                })
            };
            let (_, Body::Rpc(req)) = sent.recv().await.unwrap() else {
                panic!("expected an rpc body")
            };
            rpc.on_reply(RpcReply {
                id: req.id,
                result: Err(RpcFailure {
                    code: code.clone(),
                    msg: "boom".into(),
                    holder: holder.clone().map(|node| Holder { node, epoch: 4 }),
                }),
            });
            match (code, call.await.unwrap()) {
                (RpcErrorCode::NotOwner, Err(RpcError::NotOwner { holder: Some(h) })) => {
                    assert_eq!(h.epoch, 4)
                }
                (RpcErrorCode::HandlerError, Err(RpcError::Remote { code, msg })) => {
                    assert_eq!(code, RpcErrorCode::HandlerError);
                    assert_eq!(msg, "boom");
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(rpc.pending_len(), 0);
    }

    #[tokio::test]
    async fn zero_receivers_fails_fast() {
        let (rpc, _sent) = rpc(0);
        let result = rpc
            .call(
                &addr("gone", 1),
                "doc",
                "ev",
                vec![],
                Duration::from_secs(30),
            )
            .await;
        assert!(matches!(result, Err(RpcError::Unreachable)));
        assert_eq!(rpc.pending_len(), 0);
    }

    #[tokio::test]
    async fn dropped_call_and_fail_node_leave_no_entries() {
        let (rpc, mut sent) = rpc(1);
        let owner = addr("owner", 1);
        // A call whose future is dropped mid-flight.
        let call = {
            let rpc = rpc.clone();
            let owner = owner.clone();
            tokio::spawn(async move {
                rpc.call(&owner, "doc", "ev", vec![], Duration::from_secs(30))
                    .await
            })
        };
        sent.recv().await.unwrap();
        assert_eq!(rpc.pending_len(), 1);
        call.abort();
        let _ = call.await;
        assert_eq!(rpc.pending_len(), 0);

        // fail_node resolves calls to that node at once.
        let call = {
            let rpc = rpc.clone();
            let owner = owner.clone();
            tokio::spawn(async move {
                rpc.call(&owner, "doc", "ev", vec![], Duration::from_secs(30))
                    .await
            })
        };
        sent.recv().await.unwrap();
        assert_eq!(rpc.fail_node(&addr("owner", 2)), 0);
        assert_eq!(rpc.fail_node(&owner), 1);
        assert!(matches!(call.await.unwrap(), Err(RpcError::Unreachable)));
        assert_eq!(rpc.pending_len(), 0);
    }
}
