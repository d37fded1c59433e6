//! The Redis pub/sub transport: per-process inbox channels plus one broadcast channel.
//!
//! Layout (one process):
//!
//! * a fred `SubscriberClient` subscribed to its inbox `<prefix>:inbox:<node>:<inc>` and to
//!   `<prefix>:bcast`, with `broadcast_channel_capacity` raised (fred's default of 32 drops
//!   messages in bursts) and an exponential reconnect policy;
//! * a separate fred `Client` for `PUBLISH` (a subscribed RESP2 connection can't publish);
//! * a **writer task** that owns the per-link sequence counters. It drains the bounded outbound
//!   queue in rounds, assigns `seq`, encodes and signs, and sends each round as one pipeline, so
//!   sequence order is publish order on one connection and Redis keeps that order per
//!   subscriber. It does not wait for a round's replies before sending the next (up to 8
//!   rounds await theirs in tasks of their own). Within a round, the envelopes for one peer that
//!   reads schema 3 go out as batch messages (one `PUBLISH` and one MAC each, `out`s of the same
//!   frame merged into a `fan`; see the crate docs). Nothing waits on a timer: the writer takes
//!   what is queued when it wakes, after letting the tasks woken with it queue theirs (a few
//!   scheduler passes while the queue still grows) and after the caller's [`Cork`], if one is
//!   held (a document broadcasting to many clients), is dropped. A `frame` or `out` whose
//!   envelope would exceed the cap is split into `part` envelopes ([`crate::chunk`]) with
//!   consecutive numbers, published back to back;
//! * the **receiver** ([`InboundReceiver`], returned by [`Transport::connect`]): in the caller's
//!   task, it verifies, decodes, checks the destination and the sequence number of every
//!   message and reassembles parts. If the caller is slow, fred's broadcast channel overflows
//!   and that surfaces as [`Inbound::Lagged`], never silently;
//! * a **resubscribe task**: after fred reconnects the subscriber it re-issues the
//!   subscriptions and only *then* emits [`Inbound::Resubscribed`]. (This replaces fred's
//!   `manage_subscriptions()`, which re-subscribes in a task of its own and can't say when it is
//!   done; a resync triggered before the subscription is back could lose its own replies.)
//! * with sharded pub/sub, a **subscription watchdog**: every
//!   [`TransportConfig::subscription_check`] it has the subscriber re-read the cluster's
//!   topology (on a Redis Cluster: a master promoted since is connected, which re-subscribes as
//!   above) and asks the master serving the inbox's slot whether the inbox still has a
//!   subscriber (`PUBSUB SHARDNUMSUB`, on a client of its own). A master that lost its slots
//!   (`CLUSTER FAILOVER`, a slot migration) drops its shard channels' subscribers without
//!   closing their connections, and a promoted replica starts with none, so without it a node
//!   could stay deaf. Two checks in a row finding none re-subscribe everything and report
//!   [`Inbound::Resubscribed`].
//!
//! Failure policy: the outbound queue is bounded, in envelopes and in bytes
//! ([`TransportConfig::max_outbound_bytes`], counting until Redis has answered a publish), and a
//! full queue fails fast with [`ProxyError::Clogged`]; a caller can also bound one flow of its
//! own (e.g. one client's frames) with a [`Backlog`]. Publishes are never retried by fred (a
//! retry could duplicate an envelope); every Redis command has a timeout. A lost envelope always
//! shows up at the receiver as a [`Inbound::Gap`] on the next envelope of that link, or as [`Inbound::Resubscribed`] /
//! [`Inbound::Lagged`] (tail losses), which mean "treat every link as having a gap".

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use fred::clients::SubscriberClient;
use fred::prelude::{
    Builder, Client, ClientLike, Config as RedisConfig, EventInterface, PubsubInterface,
    ReconnectPolicy,
};
use fred::types::Message;
use tokio::sync::{Notify, Semaphore, broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::auth::Auth;
use crate::chunk::{self, DropReason, Reassembler, Reassembly, ReassemblyLimits};
use crate::codec::{Codec, DEFAULT_MAX_ENVELOPE_BYTES, MAX_BATCH_ITEMS, RejectReason};
use crate::envelope::{Body, Envelope, Header, Kind, Part, Session};
use crate::error::ProxyError;
use crate::ids::{ConnId, NodeAddr};
use crate::keys::Keys;
use crate::seq::{LinkId, SeqCheck, SeqTracker};

/// Which Redis pub/sub commands to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PubSubMode {
    /// `PUBLISH` / `SUBSCRIBE`. Receiver counts are exact on a single Redis; in Redis Cluster
    /// they only count the node the command hit.
    #[default]
    Classic,
    /// `SPUBLISH` / `SSUBSCRIBE` (Redis 7+): messages stay on the channel's shard and receiver
    /// counts are exact in Redis Cluster too. Also works on a single Redis.
    Sharded,
}

/// Everything [`Transport::connect`] needs.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// `redis://host:port[/db]` (see fred's `Config::from_url`).
    pub redis_url: String,
    /// Key and channel prefix (see [`Keys::new`]).
    pub prefix: String,
    /// This process's address (node id plus a fresh incarnation).
    pub me: NodeAddr,
    /// Envelope authentication policy.
    pub auth: Auth,
    /// Cap on one encoded envelope, both directions. Default 8 MiB. A `frame` or `out` that
    /// doesn't fit travels in parts of about this size.
    pub max_envelope_bytes: usize,
    /// Bounds on frames sent in parts: the largest frame sent or reassembled, and what the
    /// receiver holds while reassembling. Give every process of a cluster the same limits.
    pub reassembly: ReassemblyLimits,
    /// Capacity of the inbound event channel handed to the caller. Default 16 384.
    pub inbound_capacity: usize,
    /// Capacity of the outbound queue; full → [`ProxyError::Clogged`]. Default 16 384.
    pub outbound_capacity: usize,
    /// Most payload bytes the transport holds for sending (queued, being published, or awaiting
    /// Redis's reply), over every destination; beyond it [`ProxyError::Clogged`]. One envelope
    /// is always accepted while nothing is held, however large. Default 256 MiB.
    pub max_outbound_bytes: usize,
    /// Most envelopes sent in one pipeline. Default 256.
    pub max_batch: usize,
    /// Whether envelopes queued for the same peer at the same time go out as one batch message
    /// (one `PUBLISH`, one MAC), with `out`s of the same frame for several of its clients
    /// merged into one `fan`. Only towards peers that read schema version 3. Default on.
    pub batching: bool,
    /// fred's message broadcast capacity for the subscriber. Default 65 536.
    pub broadcast_channel_capacity: usize,
    /// Timeout on every Redis command, publishes included. Default 5 s.
    pub command_timeout: Duration,
    /// First reconnect delay. Default 50 ms.
    pub reconnect_min: Duration,
    /// Largest reconnect delay. Default 2 s.
    pub reconnect_max: Duration,
    /// Classic or sharded pub/sub. Default classic.
    pub pubsub: PubSubMode,
    /// With sharded pub/sub, how often the subscription watchdog checks that the inbox is
    /// still subscribed on the master serving its slot (see the module docs). Default 1 s.
    pub subscription_check: Duration,
    /// TLS settings that replace those the URL implies (a private CA, a client certificate);
    /// `None` keeps the URL's (`rediss://` verifies the server against the system's roots).
    pub tls: Option<fred::types::config::TlsConfig>,
}

impl TransportConfig {
    /// A configuration with the defaults listed on each field and no cluster secret.
    pub fn new(redis_url: impl Into<String>, prefix: impl Into<String>, me: NodeAddr) -> Self {
        TransportConfig {
            redis_url: redis_url.into(),
            prefix: prefix.into(),
            me,
            auth: Auth::disabled(),
            max_envelope_bytes: DEFAULT_MAX_ENVELOPE_BYTES,
            reassembly: ReassemblyLimits::default(),
            inbound_capacity: 16_384,
            outbound_capacity: 16_384,
            max_outbound_bytes: 256 << 20,
            max_batch: 256,
            batching: true,
            broadcast_channel_capacity: 65_536,
            command_timeout: Duration::from_secs(5),
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_secs(2),
            pubsub: PubSubMode::Classic,
            subscription_check: Duration::from_secs(1),
            tls: None,
        }
    }

    fn validate(&self) -> Result<(), ProxyError> {
        let positive = [
            ("inbound_capacity", self.inbound_capacity),
            ("outbound_capacity", self.outbound_capacity),
            ("max_outbound_bytes", self.max_outbound_bytes),
            ("max_batch", self.max_batch),
            (
                "broadcast_channel_capacity",
                self.broadcast_channel_capacity,
            ),
            (
                "reassembly.max_frame_bytes",
                self.reassembly.max_frame_bytes,
            ),
            ("reassembly.max_partials", self.reassembly.max_partials),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(ProxyError::Config(format!("{name} must be > 0")));
            }
        }
        if self.max_envelope_bytes < 1024 {
            return Err(ProxyError::Config(
                "max_envelope_bytes must be at least 1024".into(),
            ));
        }
        if self.reassembly.max_buffered_bytes < self.reassembly.max_frame_bytes {
            return Err(ProxyError::Config(
                "reassembly.max_buffered_bytes must be >= reassembly.max_frame_bytes".into(),
            ));
        }
        if self.command_timeout.is_zero()
            || self.reconnect_min.is_zero()
            || self.subscription_check.is_zero()
        {
            return Err(ProxyError::Config(
                "command_timeout, reconnect_min and subscription_check must be > 0".into(),
            ));
        }
        Ok(())
    }
}

/// What the transport hands to the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// A verified envelope for this process, in sequence (or right after a reported gap).
    Envelope(Envelope),
    /// Envelopes `expected..got` from `from` never arrived. The envelope numbered `got` follows
    /// as [`Inbound::Envelope`]. Resync every session that uses this link.
    Gap {
        /// The sender.
        from: NodeAddr,
        /// `true` on the sender's broadcast stream, `false` on its stream into our inbox.
        broadcast: bool,
        /// The number that was due.
        expected: u64,
        /// The number that arrived.
        got: u64,
    },
    /// An envelope repeated or arrived after a later one; it was dropped. If `duplicate` is
    /// false, its loss was already reported as a gap.
    OutOfOrder {
        /// The sender.
        from: NodeAddr,
        /// Broadcast stream or inbox stream.
        broadcast: bool,
        /// The number that was due.
        expected: u64,
        /// The number that arrived.
        got: u64,
        /// `true`: seen before; `false`: late.
        duplicate: bool,
    },
    /// The subscriber lost messages inside this process (fred's broadcast channel overflowed
    /// because the caller didn't keep up). Senders are unknown: treat every link as having a gap.
    Lagged {
        /// Messages lost.
        missed: u64,
    },
    /// The subscriber connection was re-established and re-subscribed. Anything published while
    /// it was down is gone: treat every link as having a gap.
    Resubscribed,
    /// A frame sent in parts was dropped before it was complete: a reassembly bound was hit,
    /// or its pieces didn't follow each other (see [`crate::chunk`]). The session missed a
    /// frame: reset it. (After an [`Inbound::Gap`], the rest of a frame cut by the gap shows up
    /// here too, with [`DropReason::Sequence`].)
    FrameDropped {
        /// The sender.
        from: NodeAddr,
        /// The session the frame belonged to.
        session: Session,
        /// Why (metric label [`DropReason::as_str`]).
        reason: DropReason,
    },
    /// An inbound message was rejected (count it as `envelopes_rejected{reason}`).
    Rejected {
        /// Metric reason.
        reason: RejectReason,
        /// Human-readable detail for debug logs: at most 256 bytes, may quote attacker-chosen
        /// text.
        detail: String,
    },
}

/// Something that can send a body to another process; implemented by [`Transport`], and by
/// fakes in tests of code built on top of it (such as [`crate::rpc::Rpc`]).
pub trait EnvelopeSink: Send + Sync + 'static {
    /// This process's address.
    fn local_addr(&self) -> &NodeAddr;

    /// Sends `body` to `to`; resolves to the number of subscribers that received it.
    fn send_to(
        &self,
        to: &NodeAddr,
        body: Body,
    ) -> impl Future<Output = Result<u64, ProxyError>> + Send;
}

/// The outcome of an envelope already queued with [`Transport::start_send`].
#[derive(Debug)]
pub struct SendReceipt(oneshot::Receiver<Result<u64, ProxyError>>);

impl SendReceipt {
    /// Waits for the publish; resolves to the number of subscribers that received the envelope
    /// (0 = the destination incarnation is gone or not subscribed right now).
    pub async fn receivers(self) -> Result<u64, ProxyError> {
        self.0.await.map_err(|_| ProxyError::Closed)?
    }
}

type Reply = oneshot::Sender<Result<u64, ProxyError>>;

struct Outgoing {
    to: Option<NodeAddr>,
    body: Body,
    reply: Reply,
    /// The envelope's share of the transport-wide and of its flow's [`Backlog`], released once
    /// Redis answered its publish (or it failed).
    held: [Option<Charge>; 2],
}

/// What the writer has published since the transport started (monotonic).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransportStats {
    /// Pub/sub messages published (one `PUBLISH` each).
    pub messages: u64,
    /// Envelopes (sequence numbers) those messages carried.
    pub envelopes: u64,
    /// Messages that were batches.
    pub batches: u64,
    /// `out`s that did not need an envelope of their own: merged into a `fan` with the same
    /// frame for another client of the same node.
    pub fanned: u64,
}

/// The longest the writer waits for a [`Cork`] to be dropped.
pub const MAX_CORK: Duration = Duration::from_millis(2);

#[derive(Debug, Default)]
struct Corks {
    held: AtomicUsize,
    released: Notify,
}

/// See [`Transport::cork`]. Dropping it lets the writer go on.
#[derive(Debug)]
pub struct Cork(Arc<Corks>);

impl Drop for Cork {
    fn drop(&mut self) {
        if self.0.held.fetch_sub(1, AtomicOrdering::AcqRel) == 1 {
            self.0.released.notify_waiters();
        }
    }
}

/// Reads a transport's [`TransportStats`]; see [`Transport::stats_handle`].
#[derive(Debug, Clone)]
pub struct StatsHandle(Arc<Counters>);

impl StatsHandle {
    /// The counters now.
    pub fn read(&self) -> TransportStats {
        let c = &self.0;
        TransportStats {
            messages: c.messages.load(AtomicOrdering::Relaxed),
            envelopes: c.envelopes.load(AtomicOrdering::Relaxed),
            batches: c.batches.load(AtomicOrdering::Relaxed),
            fanned: c.fanned.load(AtomicOrdering::Relaxed),
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    messages: AtomicU64,
    envelopes: AtomicU64,
    batches: AtomicU64,
    fanned: AtomicU64,
}

/// The highest schema version each peer said it reads (`mv`), learnt from its messages.
type PeerReads = Arc<Mutex<HashMap<NodeAddr, u8>>>;

/// The bytes and envelopes of one flow of envelopes that the transport holds: queued, being
/// published, or published and awaiting Redis's reply. The caller defines the flow (for
/// example every frame of one proxied client) and decides what to do when it grows too large;
/// [`Transport::start_send_counted`] charges it, and the transport releases each envelope's
/// share once Redis has answered its publish (or the publish failed).
///
/// Cheap to clone; clones share the counters.
#[derive(Debug, Clone, Default)]
pub struct Backlog(Arc<BacklogCounters>);

#[derive(Debug, Default)]
struct BacklogCounters {
    bytes: AtomicUsize,
    envelopes: AtomicUsize,
    /// Woken whenever an envelope's share is given back.
    released: Notify,
}

impl Backlog {
    /// An empty backlog.
    pub fn new() -> Self {
        Self::default()
    }

    /// Payload bytes of the flow's envelopes the transport holds now.
    pub fn bytes(&self) -> usize {
        self.0.bytes.load(Ordering::Acquire)
    }

    /// Envelopes of the flow the transport holds now.
    pub fn envelopes(&self) -> usize {
        self.0.envelopes.load(Ordering::Acquire)
    }

    /// Waits until the flow holds fewer than `bytes` bytes and fewer than `envelopes`
    /// envelopes (at once if it does). Cancel-safe.
    pub async fn below(&self, bytes: usize, envelopes: usize) {
        loop {
            let released = self.0.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if self.bytes() < bytes && self.envelopes() < envelopes {
                return;
            }
            released.await;
        }
    }

    fn charge(&self, bytes: usize) -> Charge {
        self.0.bytes.fetch_add(bytes, Ordering::AcqRel);
        self.0.envelopes.fetch_add(1, Ordering::AcqRel);
        Charge {
            backlog: self.clone(),
            bytes,
        }
    }
}

/// One envelope's share of a [`Backlog`]; given back when dropped.
#[derive(Debug)]
struct Charge {
    backlog: Backlog,
    bytes: usize,
}

impl Drop for Charge {
    fn drop(&mut self) {
        let c = &self.backlog.0;
        c.bytes.fetch_sub(self.bytes, Ordering::AcqRel);
        c.envelopes.fetch_sub(1, Ordering::AcqRel);
        c.released.notify_waiters();
    }
}

/// What an envelope's body counts against a [`Backlog`]: its opaque payload plus a fixed
/// allowance for the rest of the envelope.
fn charged_bytes(body: &Body) -> usize {
    const ENVELOPE: usize = 64;
    ENVELOPE
        + match body {
            Body::Frame { data, .. } | Body::Out { data, .. } => data.len(),
            Body::Rpc(req) => req.payload.len(),
            Body::RpcReply(reply) => reply.result.as_ref().map_or(0, Vec::len),
            _ => 0,
        }
}

type TxSeqs = Arc<Mutex<HashMap<Option<NodeAddr>, u64>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Critical sections are single map operations; a poisoned lock is still consistent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A connected transport. Cheap to clone; the background tasks stop and the Redis connections
/// close when the last clone is dropped (or on [`Transport::shutdown`]).
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

struct Inner {
    me: NodeAddr,
    keys: Keys,
    inbox: String,
    auth_enabled: bool,
    outbound: mpsc::Sender<Outgoing>,
    outbound_capacity: usize,
    /// Everything the transport holds for sending, over every flow.
    backlog: Backlog,
    max_outbound_bytes: usize,
    tx_seqs: TxSeqs,
    rx_seqs: Arc<Mutex<SeqTracker>>,
    parts: Arc<Mutex<Reassembler>>,
    peer_reads: PeerReads,
    stats: Arc<Counters>,
    corks: Arc<Corks>,
    max_frame_bytes: usize,
    sub: SubscriberClient,
    publisher: Client,
    /// The subscription watchdog's client (sharded pub/sub only).
    checker: Option<Client>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let sub = self.sub.clone();
            let publisher = self.publisher.clone();
            let checker = self.checker.clone();
            // after `shutdown` all are closed already; quitting again only makes fred warn
            handle.spawn(async move {
                if sub.is_connected() {
                    let _ = sub.quit().await;
                }
                if publisher.is_connected() {
                    let _ = publisher.quit().await;
                }
                if let Some(checker) = checker
                    && checker.is_connected()
                {
                    let _ = checker.quit().await;
                }
            });
        }
    }
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("me", &self.inner.me)
            .field("inbox", &self.inner.inbox)
            .field("auth_enabled", &self.inner.auth_enabled)
            .finish_non_exhaustive()
    }
}

impl Transport {
    /// Connects both Redis clients, subscribes to this process's inbox and the broadcast
    /// channel, and starts the background tasks. Returns once the subscriptions are active, so
    /// anything published to the inbox after this returns is delivered (or reported lost).
    pub async fn connect(
        config: TransportConfig,
    ) -> Result<(Transport, InboundReceiver), ProxyError> {
        config.validate()?;
        let keys = Keys::new(config.prefix.clone())?;
        let inbox = keys.inbox(&config.me);
        let bcast = keys.bcast();
        let mut redis_config = RedisConfig::from_url(&config.redis_url)?;
        if let Some(tls) = &config.tls {
            redis_config.tls = Some(tls.clone());
        }
        let policy = ReconnectPolicy::new_exponential(
            0,
            millis_u32(config.reconnect_min),
            millis_u32(config.reconnect_max),
            2,
        );

        let mut builder = Builder::from_config(redis_config);
        builder.set_policy(policy);
        let command_timeout = config.command_timeout;
        builder.with_performance_config(|p| {
            p.default_command_timeout = command_timeout;
        });
        builder.with_connection_config(|c| {
            c.internal_command_timeout = command_timeout;
        });
        let publisher = {
            let mut b = builder.clone();
            let buffer = config.outbound_capacity.max(config.max_batch) * 2;
            b.with_connection_config(|c| {
                // Never re-send a publish after a connection drop: that could duplicate it.
                c.max_command_attempts = 1;
                // No unbounded offline queue while Redis is down.
                c.max_command_buffer_len = buffer;
            });
            b.build()?
        };
        let sub = {
            let mut b = builder.clone();
            let capacity = config.broadcast_channel_capacity;
            b.with_performance_config(|p| p.broadcast_channel_capacity = capacity);
            b.build_subscriber_client()?
        };
        // the watchdog's own client: a subscribed connection cannot ask PUBSUB questions, and
        // the publisher must not follow redirections (one attempt per publish)
        let checker = match config.pubsub {
            PubSubMode::Sharded => Some(builder.build()?),
            PubSubMode::Classic => None,
        };

        sub.init().await?;
        let messages = sub.message_rx();
        let reconnects = sub.reconnect_rx();
        let subscribed = subscribe(&sub, config.pubsub, [inbox.clone(), bcast.clone()]).await;
        let published = match subscribed {
            Ok(()) => publisher.init().await.map(drop),
            Err(e) => Err(e),
        };
        let published = match (&checker, published) {
            (Some(checker), Ok(())) => checker.init().await.map(drop),
            (_, other) => other,
        };
        if let Err(e) = published {
            let _ = sub.quit().await;
            let _ = publisher.quit().await;
            return Err(e.into());
        }

        let (out_tx, out_rx) = mpsc::channel(config.outbound_capacity);
        let (in_tx, in_rx) = mpsc::channel(config.inbound_capacity);
        let tx_seqs: TxSeqs = Arc::default();
        let rx_seqs = Arc::new(Mutex::new(SeqTracker::new()));
        let parts = Arc::new(Mutex::new(Reassembler::new(config.reassembly)));
        let codec = Codec::new(config.auth.clone(), config.max_envelope_bytes);
        let peer_reads: PeerReads = Arc::default();
        let stats = Arc::new(Counters::default());
        let corks = Arc::new(Corks::default());

        let writer = Writer {
            rx: out_rx,
            publisher: publisher.clone(),
            codec: codec.clone(),
            me: config.me.clone(),
            keys: keys.clone(),
            bcast: bcast.clone(),
            seqs: tx_seqs.clone(),
            max_batch: config.max_batch,
            batching: config.batching,
            peer_reads: peer_reads.clone(),
            stats: stats.clone(),
            corks: corks.clone(),
            mode: config.pubsub,
            timeout: config.command_timeout + Duration::from_secs(1),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        };
        let filter = InboundFilter {
            codec,
            me: config.me.clone(),
            inbox: inbox.clone(),
            bcast: bcast.clone(),
            seqs: rx_seqs.clone(),
            parts: parts.clone(),
            peer_reads: peer_reads.clone(),
        };
        let mut tasks = vec![tokio::spawn(writer.run())];
        if let Some(checker) = checker.clone() {
            tasks.push(tokio::spawn(
                Watchdog {
                    sub: sub.clone(),
                    checker,
                    channels: [inbox.clone(), bcast.clone()],
                    inbox: inbox.clone(),
                    parts: parts.clone(),
                    out: in_tx.clone(),
                    every: config.subscription_check,
                }
                .run(),
            ));
        }
        tasks.push(tokio::spawn(resubscribe_loop(
            sub.clone(),
            (config.pubsub, [inbox.clone(), bcast.clone()]),
            reconnects,
            parts.clone(),
            in_tx,
            config.reconnect_min,
            config.reconnect_max,
        )));

        let transport = Transport {
            inner: Arc::new(Inner {
                me: config.me,
                keys,
                inbox,
                auth_enabled: config.auth.is_enabled(),
                outbound: out_tx,
                outbound_capacity: config.outbound_capacity,
                backlog: Backlog::new(),
                max_outbound_bytes: config.max_outbound_bytes,
                tx_seqs,
                rx_seqs,
                parts,
                peer_reads,
                stats,
                corks,
                max_frame_bytes: config.reassembly.max_frame_bytes,
                sub,
                publisher,
                checker,
                tasks,
            }),
        };
        let inbound = InboundReceiver {
            messages,
            filter,
            control: in_rx,
            pending: VecDeque::new(),
        };
        Ok((transport, inbound))
    }

    /// This process's address.
    pub fn me(&self) -> &NodeAddr {
        &self.inner.me
    }

    /// The key/channel builder.
    pub fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    /// This process's inbox channel.
    pub fn inbox_channel(&self) -> &str {
        &self.inner.inbox
    }

    /// Whether envelopes are signed and MACs required.
    pub fn auth_enabled(&self) -> bool {
        self.inner.auth_enabled
    }

    /// Sends `body` to one process and waits for the publish. Returns the number of subscribers
    /// that received it: **0 means the destination incarnation is gone** (or is reconnecting);
    /// invalidate its routes and reset its sessions.
    pub async fn send(&self, to: &NodeAddr, body: Body) -> Result<u64, ProxyError> {
        self.start_send(to, body)?.receivers().await
    }

    /// Broadcasts `body` to every process (including, on the wire, this one: the transport
    /// drops its own broadcasts on receipt). Returns the receiver count.
    pub async fn broadcast(&self, body: Body) -> Result<u64, ProxyError> {
        self.enqueue(None, body, None)?.receivers().await
    }

    /// Queues `body` for `to` without waiting for the publish. Envelopes queued one after the
    /// other are published in that order. Fails at once with [`ProxyError::Clogged`] when the
    /// outbound queue is full, and with [`ProxyError::FrameTooLarge`] for a `frame` or `out`
    /// beyond the reassembly limit.
    pub fn start_send(&self, to: &NodeAddr, body: Body) -> Result<SendReceipt, ProxyError> {
        self.enqueue(Some(to.clone()), body, None)
    }

    /// [`start_send`](Self::start_send), charging the envelope to `flow` until Redis has
    /// answered its publish, so the caller can bound what one flow (e.g. one client) has in the
    /// transport: check [`Backlog::bytes`] / [`Backlog::envelopes`] before sending.
    pub fn start_send_counted(
        &self,
        to: &NodeAddr,
        body: Body,
        flow: &Backlog,
    ) -> Result<SendReceipt, ProxyError> {
        self.enqueue(Some(to.clone()), body, Some(flow))
    }

    fn enqueue(
        &self,
        to: Option<NodeAddr>,
        body: Body,
        flow: Option<&Backlog>,
    ) -> Result<SendReceipt, ProxyError> {
        if let Body::Frame { data, .. } | Body::Out { data, .. } = &body
            && data.len() > self.inner.max_frame_bytes
        {
            return Err(ProxyError::FrameTooLarge {
                size: data.len(),
                max: self.inner.max_frame_bytes,
            });
        }
        let bytes = charged_bytes(&body);
        let held = self.inner.backlog.bytes();
        if held > 0 && held.saturating_add(bytes) > self.inner.max_outbound_bytes {
            return Err(ProxyError::Clogged);
        }
        let held = [
            Some(self.inner.backlog.charge(bytes)),
            flow.map(|f| f.charge(bytes)),
        ];
        let (reply, rx) = oneshot::channel();
        self.inner
            .outbound
            .try_send(Outgoing {
                to,
                body,
                reply,
                held,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => ProxyError::Clogged,
                mpsc::error::TrySendError::Closed(_) => ProxyError::Closed,
            })?;
        Ok(SendReceipt(rx))
    }

    /// Forgets the sequence state of both directions for `peer`. Only call this once `peer` is
    /// known to be dead (its node key expired, or `node_down`): if it is still alive, its next
    /// envelopes would be judged from scratch, and ours to it would restart at 1 and be dropped.
    pub fn forget_peer(&self, peer: &NodeAddr) {
        lock(&self.inner.tx_seqs).remove(&Some(peer.clone()));
        lock(&self.inner.rx_seqs).forget_node(peer);
        lock(&self.inner.parts).forget_node(peer);
        lock(&self.inner.peer_reads).remove(peer);
    }

    /// What the writer has published so far (monotonic counters, for metrics).
    pub fn stats(&self) -> TransportStats {
        self.stats_handle().read()
    }

    /// Holds back the writer while the returned guard lives, so that what the caller queues in
    /// one go (a frame for many clients, say) leaves in the same messages. For a synchronous
    /// burst of sends only: never hold it across an `.await`. The writer waits at most
    /// [`MAX_CORK`] for it.
    pub fn cork(&self) -> Cork {
        self.inner.corks.held.fetch_add(1, AtomicOrdering::AcqRel);
        Cork(self.inner.corks.clone())
    }

    /// A handle that reads [`Transport::stats`] without keeping the transport alive (for a
    /// metrics collector).
    pub fn stats_handle(&self) -> StatsHandle {
        StatsHandle(self.inner.stats.clone())
    }

    /// Frames being reassembled from parts right now (a gauge).
    pub fn partial_frames(&self) -> usize {
        lock(&self.inner.parts).len()
    }

    /// Bytes held by frames being reassembled (a gauge).
    pub fn partial_frame_bytes(&self) -> usize {
        lock(&self.inner.parts).buffered_bytes()
    }

    /// Number of inbound links tracked (a gauge).
    pub fn inbound_links(&self) -> usize {
        lock(&self.inner.rx_seqs).len()
    }

    /// Number of outbound links with a sequence counter (a gauge).
    pub fn outbound_links(&self) -> usize {
        lock(&self.inner.tx_seqs).len()
    }

    /// Envelopes waiting in the outbound queue (a gauge).
    pub fn outbound_queue_len(&self) -> usize {
        self.inner.outbound_capacity - self.inner.outbound.capacity()
    }

    /// Payload bytes the transport holds for sending: queued, being published, or awaiting
    /// Redis's reply (a gauge; bounded by [`TransportConfig::max_outbound_bytes`]).
    pub fn outbound_bytes(&self) -> usize {
        self.inner.backlog.bytes()
    }

    /// Closes both Redis connections and stops the background tasks. The inbound channel
    /// closes; later sends fail with [`ProxyError::Closed`].
    pub async fn shutdown(&self) {
        for task in &self.inner.tasks {
            task.abort();
        }
        let _ = self.inner.sub.quit().await;
        let _ = self.inner.publisher.quit().await;
        if let Some(checker) = &self.inner.checker {
            let _ = checker.quit().await;
        }
    }
}

impl EnvelopeSink for Transport {
    fn local_addr(&self) -> &NodeAddr {
        self.me()
    }

    fn send_to(
        &self,
        to: &NodeAddr,
        body: Body,
    ) -> impl Future<Output = Result<u64, ProxyError>> + Send {
        let receipt = self.start_send(to, body);
        async move { receipt?.receivers().await }
    }
}

fn millis_u32(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

async fn subscribe<const N: usize>(
    sub: &SubscriberClient,
    mode: PubSubMode,
    channels: [String; N],
) -> Result<(), fred::error::Error> {
    for channel in channels {
        match mode {
            PubSubMode::Classic => sub.subscribe(channel).await?,
            PubSubMode::Sharded => sub.ssubscribe(channel).await?,
        }
    }
    Ok(())
}

// === writer ===

/// How many published batches may await their Redis replies at once.
const MAX_IN_FLIGHT: usize = 8;

/// How many times the writer lets other tasks run while its queue keeps growing, before it
/// takes what is queued.
const GATHER_YIELDS: usize = 4;

/// The schema version that reads batch messages.
const BATCH_SCHEMA: u8 = 3;

/// The largest batch message (bounded further by half the envelope cap).
const MAX_BATCH_BYTES: usize = 256 << 10;

/// Reports each body's publish outcome: a body sent in parts reached the destination only if
/// every part did, so it gets the smallest receiver count, or the first error. `results` are
/// the pipeline's replies in order; each waiting body names the range of them it depends on
/// (the envelopes of one batch share one).
fn deliver_replies(
    results: Vec<Result<i64, fred::error::Error>>,
    waiting: Vec<(Option<Reply>, Range<usize>)>,
) {
    for (reply, range) in waiting {
        let mut outcome: Result<u64, ProxyError> = Ok(u64::MAX);
        for i in range {
            let one = match results.get(i) {
                Some(Ok(n)) => Ok(u64::try_from(*n).unwrap_or(0)),
                Some(Err(e)) => Err(ProxyError::Redis(e.clone())),
                None => Err(ProxyError::Redis(fred::error::Error::new(
                    fred::error::ErrorKind::Timeout,
                    "publish pipeline timed out",
                ))),
            };
            outcome = match (outcome, one) {
                (Ok(a), Ok(b)) => Ok(a.min(b)),
                (Err(e), _) | (Ok(_), Err(e)) => Err(e),
            };
        }
        if let Some(reply) = reply {
            let _ = reply.send(outcome.map(|n| if n == u64::MAX { 0 } else { n }));
        }
    }
}

/// The longest run of queued envelopes searched for an `out` of the same frame to merge with.
const FAN_LOOKBACK: usize = 64;

struct Writer {
    rx: mpsc::Receiver<Outgoing>,
    publisher: Client,
    codec: Codec,
    me: NodeAddr,
    keys: Keys,
    bcast: String,
    seqs: TxSeqs,
    max_batch: usize,
    batching: bool,
    peer_reads: PeerReads,
    stats: Arc<Counters>,
    corks: Arc<Corks>,
    mode: PubSubMode,
    timeout: Duration,
    in_flight: Arc<Semaphore>,
}

/// One pipeline being filled: the publishes queued in it and who waits for which.
struct Flush {
    pipeline: fred::clients::Pipeline<Client>,
    /// Publishes queued so far (the index of the next one).
    published: usize,
    /// Per outgoing body: where its result goes (`None` once an error was sent) and which
    /// publishes it depends on.
    waiting: Vec<(Option<Reply>, Range<usize>)>,
    /// The backlog charges of the envelopes in this pipeline, given back once Redis has
    /// answered (or the pipeline timed out).
    held: Vec<Charge>,
}

/// Envelopes for one peer gathered into the next batch message.
#[derive(Default)]
struct Gathered {
    bodies: Vec<Body>,
    members: Vec<(Reply, [Option<Charge>; 2])>,
    bytes: usize,
    /// Per connection, the index of its latest body in `bodies`: an `out` may join an earlier
    /// `fan` only if its connection has nothing after that position.
    last: HashMap<ConnId, usize>,
}

impl Gathered {
    /// Adds `out`, merging an `out` into an earlier one (or `fan`) of the same frame for the
    /// same document when that keeps every connection's order. True if it was merged.
    fn push(&mut self, out: Outgoing) -> bool {
        let Outgoing {
            body, reply, held, ..
        } = out;
        self.members.push((reply, held));
        if let (Body::Out { session, .. }, Some(key)) = (&body, fan_key(&body)) {
            let floor = self.last.get(&session.conn).map_or(0, |i| i + 1);
            let from = self.bodies.len().saturating_sub(FAN_LOOKBACK).max(floor);
            if let Some(i) = (from..self.bodies.len())
                .rev()
                .find(|&i| fan_key(&self.bodies[i]) == Some(key))
            {
                let conn = session.conn;
                let slot = &mut self.bodies[i];
                match slot {
                    Body::Fan { conns, .. } => conns.push(conn),
                    _ => {
                        if let Body::Out { session: s, data } =
                            std::mem::replace(slot, Body::Keepalive { session: None })
                        {
                            *slot = Body::Fan {
                                doc: s.doc,
                                epoch: s.epoch,
                                conns: vec![s.conn, conn],
                                data,
                            };
                        }
                    }
                }
                // one more connection id in the fan
                self.bytes += 18;
                self.last.insert(conn, i);
                return true;
            }
        }
        self.bytes += 48 + body.payload_len();
        if let Some(session) = body.session() {
            self.last.insert(session.conn, self.bodies.len());
        }
        self.bodies.push(body);
        false
    }
}

/// What an `out` or a `fan` must share with another to be merged: document, epoch, frame.
fn fan_key(body: &Body) -> Option<(&str, i64, &[u8])> {
    match body {
        Body::Out { session, data } => Some((&session.doc, session.epoch, data)),
        Body::Fan {
            doc, epoch, data, ..
        } => Some((doc, *epoch, data)),
        _ => None,
    }
}

impl Writer {
    async fn run(mut self) {
        let mut batch = Vec::with_capacity(self.max_batch);
        while let Some(first) = self.rx.recv().await {
            batch.push(first);
            self.uncorked().await;
            // Let the tasks woken together with this one (other clients' sockets answering the
            // same broadcast) queue their envelopes first: they then share this round's
            // messages. Costs a few passes of the scheduler while the queue still grows, never
            // a timer.
            for _ in 0..GATHER_YIELDS {
                let queued = self.rx.len();
                tokio::task::yield_now().await;
                if self.rx.len() == queued {
                    break;
                }
            }
            while batch.len() < self.max_batch {
                match self.rx.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            self.flush(&mut batch).await;
        }
    }

    /// Waits (at most [`MAX_CORK`]) for the next moment no [`Cork`] is held. Only that once:
    /// bursts that begin after it do not hold the writer any further.
    async fn uncorked(&self) {
        let corks = &self.corks;
        let released = corks.released.notified();
        if corks.held.load(AtomicOrdering::Acquire) == 0 {
            return;
        }
        let _ = tokio::time::timeout(MAX_CORK, released).await;
    }

    /// Whether envelopes for `to` may be batched: batching is on and the peer reads batches.
    fn batches_to(&self, to: Option<&NodeAddr>) -> bool {
        self.batching
            && to.is_some_and(|peer| {
                lock(&self.peer_reads)
                    .get(peer)
                    .is_some_and(|&v| v >= BATCH_SCHEMA)
            })
    }

    /// The largest batch message, and the largest body that joins one.
    fn batch_limits(&self) -> (usize, usize) {
        let max = (self.codec.max_envelope_bytes() / 2).min(MAX_BATCH_BYTES);
        (max, max / 4)
    }

    async fn flush(&mut self, batch: &mut Vec<Outgoing>) {
        let mut flush = Flush {
            pipeline: self.publisher.pipeline(),
            published: 0,
            waiting: Vec::with_capacity(batch.len()),
            held: Vec::with_capacity(batch.len()),
        };
        // Per destination, in queue order (different links have no order between them).
        let mut groups: Vec<(Option<NodeAddr>, Vec<Outgoing>)> = Vec::new();
        for out in batch.drain(..) {
            match groups.iter_mut().find(|(to, _)| *to == out.to) {
                Some((_, group)) => group.push(out),
                None => groups.push((out.to.clone(), vec![out])),
            }
        }
        let (max_bytes, max_item) = self.batch_limits();
        for (to, group) in groups {
            if group.len() < 2 || !self.batches_to(to.as_ref()) {
                for out in group {
                    self.publish_one(&mut flush, out).await;
                }
                continue;
            }
            let mut gathered = Gathered::default();
            for out in group {
                if out.body.payload_len() > max_item {
                    self.publish_gathered(&mut flush, to.as_ref(), &mut gathered)
                        .await;
                    self.publish_one(&mut flush, out).await;
                    continue;
                }
                if gathered.push(out) {
                    self.stats.fanned.fetch_add(1, AtomicOrdering::Relaxed);
                }
                if gathered.bytes >= max_bytes || gathered.bodies.len() >= MAX_BATCH_ITEMS {
                    self.publish_gathered(&mut flush, to.as_ref(), &mut gathered)
                        .await;
                }
            }
            self.publish_gathered(&mut flush, to.as_ref(), &mut gathered)
                .await;
        }
        self.send(flush).await;
    }

    /// Queues one publish of `bytes` on `to`'s channel.
    async fn publish(
        &self,
        flush: &mut Flush,
        to: Option<&NodeAddr>,
        bytes: Bytes,
    ) -> Result<(), fred::error::Error> {
        let channel = match to {
            Some(addr) => self.keys.inbox(addr),
            None => self.bcast.clone(),
        };
        match self.mode {
            PubSubMode::Classic => flush.pipeline.publish(channel, bytes).await?,
            PubSubMode::Sharded => flush.pipeline.spublish(channel, bytes).await?,
        }
        flush.published += 1;
        self.stats.messages.fetch_add(1, AtomicOrdering::Relaxed);
        Ok(())
    }

    /// The next sequence number on the link to `to`.
    fn next_seq(&self, to: &Option<NodeAddr>) -> u64 {
        lock(&self.seqs).get(to).copied().unwrap_or(0) + 1
    }

    /// Queues `gathered` as one message (a single envelope if it holds just one body that was
    /// never merged) and empties it.
    async fn publish_gathered(
        &self,
        flush: &mut Flush,
        to: Option<&NodeAddr>,
        gathered: &mut Gathered,
    ) {
        let Gathered {
            mut bodies,
            mut members,
            ..
        } = std::mem::take(gathered);
        if bodies.is_empty() {
            return;
        }
        let link = to.cloned();
        if bodies.len() == 1 && members.len() == 1 && !matches!(bodies[0], Body::Fan { .. }) {
            if let (Some(body), Some((reply, held))) = (bodies.pop(), members.pop()) {
                let out = Outgoing {
                    to: link,
                    body,
                    reply,
                    held,
                };
                self.publish_one(flush, out).await;
            }
            return;
        }
        let first = self.next_seq(&link);
        let encoded = self
            .codec
            .encode_batch(&self.me, to, first, &bodies)
            .map(Bytes::from);
        let outcome = match encoded {
            Ok(bytes) => self
                .publish(flush, to, bytes)
                .await
                .map_err(ProxyError::from),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => {
                let n = u64::try_from(bodies.len()).unwrap_or(u64::MAX);
                lock(&self.seqs).insert(link, first.saturating_add(n - 1));
                self.stats.envelopes.fetch_add(n, AtomicOrdering::Relaxed);
                self.stats.batches.fetch_add(1, AtomicOrdering::Relaxed);
                let at = flush.published - 1;
                for (reply, held) in members {
                    flush.waiting.push((Some(reply), at..at + 1));
                    flush.held.extend(held.into_iter().flatten());
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, envelopes = bodies.len(), "cannot publish a batch");
                for (reply, _) in members {
                    let _ = reply.send(Err(ProxyError::Encode(e.to_string())));
                }
            }
        }
    }

    /// Queues one envelope (or its parts) as messages of its own.
    async fn publish_one(&self, flush: &mut Flush, out: Outgoing) {
        let first = self.next_seq(&out.to);
        // Encode before committing the numbers, so a refused envelope leaves no gap.
        let encoded = match self.encode(out.to.clone(), first, out.body) {
            Ok(encoded) => encoded,
            Err(e) => {
                let _ = out.reply.send(Err(e));
                return;
            }
        };
        let start = flush.published;
        let mut failed = None;
        for bytes in encoded {
            if let Err(e) = self.publish(flush, out.to.as_ref(), bytes).await {
                failed = Some(e);
                break;
            }
        }
        let queued = flush.published - start;
        if queued > 0 {
            let last = first.saturating_add(u64::try_from(queued - 1).unwrap_or(u64::MAX));
            lock(&self.seqs).insert(out.to, last);
            self.stats
                .envelopes
                .fetch_add(queued as u64, AtomicOrdering::Relaxed);
            flush.held.extend(out.held.into_iter().flatten());
        }
        match failed {
            None => flush
                .waiting
                .push((Some(out.reply), start..flush.published)),
            Some(e) => {
                // Parts already queued still go out (the receiver drops the unfinished frame
                // when the next envelope on the link doesn't continue it).
                let _ = out.reply.send(Err(e.into()));
                flush.waiting.push((None, start..flush.published));
            }
        }
    }

    /// Hands the pipeline to Redis and collects its replies.
    async fn send(&self, flush: Flush) {
        let Flush {
            pipeline,
            published,
            waiting,
            held,
        } = flush;
        if published == 0 {
            return;
        }
        // Hand the pipeline to fred's router now, then collect the replies in a task of their
        // own, so the next batch goes out without waiting a Redis round trip for this one
        // (under CPU contention that wait is what grows, and every queued envelope waited it
        // too). fred passes a pipeline to its router on the first poll of `try_all`, which
        // keeps batches in writer order on the one publishing connection; at most
        // `MAX_IN_FLIGHT` batches await their replies.
        let timeout = self.timeout;
        let mut replies = Box::pin(async move {
            let results: Vec<Result<i64, fred::error::Error>> =
                tokio::time::timeout(timeout, pipeline.try_all::<i64>())
                    .await
                    .unwrap_or_default();
            deliver_replies(results, waiting);
            drop(held);
        });
        let sent_now =
            std::future::poll_fn(|cx| Poll::Ready(replies.as_mut().poll(cx).is_ready())).await;
        if sent_now {
            return;
        }
        let Ok(permit) = self.in_flight.clone().acquire_owned().await else {
            return;
        };
        tokio::spawn(async move {
            replies.await;
            drop(permit);
        });
    }

    /// Encodes `body` as the envelope numbered `first` on the link to `to`, or, for a `frame` or
    /// `out` too large for one envelope, as parts numbered `first`, `first + 1`, ….
    fn encode(
        &self,
        to: Option<NodeAddr>,
        first: u64,
        body: Body,
    ) -> Result<Vec<Bytes>, ProxyError> {
        let header = |version: u8, seq: u64| Header {
            version,
            from: self.me.clone(),
            to: to.clone(),
            seq,
        };
        let env = Envelope {
            header: header(body.kind().since(), first),
            body,
        };
        let cap = self.codec.max_envelope_bytes();
        let split_kind = match &env.body {
            Body::Frame { session, data } => Some((session, Kind::Frame, data)),
            Body::Out { session, data } => Some((session, Kind::Out, data)),
            _ => None,
        };
        // Data alone at or over the cap cannot fit: skip encoding it whole.
        let too_big = match split_kind {
            Some((_, _, data)) if data.len() >= cap => ProxyError::Oversize {
                size: data.len(),
                max: cap,
            },
            _ => match self.codec.encode(&env) {
                Ok(bytes) => return Ok(vec![Bytes::from(bytes)]),
                Err(e @ ProxyError::Oversize { .. }) => e,
                Err(e) => return Err(e),
            },
        };
        let Some((session, of, data)) = split_kind else {
            return Err(too_big);
        };
        let part_len = self.part_len(&env.header, session, of)?;
        let Some(parts) = chunk::split(session, of, data, part_len) else {
            return Err(too_big);
        };
        let mut out = Vec::with_capacity(parts.len());
        for (seq, body) in (first..).zip(parts) {
            let part = Envelope {
                header: header(Kind::Part.since(), seq),
                body,
            };
            out.push(Bytes::from(self.codec.encode(&part)?));
        }
        Ok(out)
    }

    /// The most frame bytes one `part` envelope of `session` can carry under the cap: the cap
    /// minus the encoded size of an empty part with the largest index and sequence number, minus
    /// the growth of the `bin` length prefix (2 bytes empty, 5 bytes at most).
    fn part_len(&self, header: &Header, session: &Session, of: Kind) -> Result<usize, ProxyError> {
        let probe = Envelope {
            header: Header {
                version: Kind::Part.since(),
                seq: u64::MAX,
                ..header.clone()
            },
            body: Body::Part {
                session: session.clone(),
                part: Part {
                    of,
                    index: u32::MAX,
                    last: false,
                    data: Vec::new(),
                },
            },
        };
        let overhead = self.codec.encode(&probe)?.len() + 3;
        let room = self.codec.max_envelope_bytes().saturating_sub(overhead);
        if room < MIN_PART_BYTES {
            return Err(ProxyError::Oversize {
                size: overhead + MIN_PART_BYTES,
                max: self.codec.max_envelope_bytes(),
            });
        }
        Ok(room)
    }
}

/// Smallest useful piece of a frame per `part` envelope; a session whose envelope overhead
/// leaves less room than this under the cap cannot send large frames.
const MIN_PART_BYTES: usize = 256;

// === reader ===

/// The per-message receive logic, separated from the Redis plumbing so it can be unit-tested.
struct InboundFilter {
    codec: Codec,
    me: NodeAddr,
    inbox: String,
    bcast: String,
    seqs: Arc<Mutex<SeqTracker>>,
    parts: Arc<Mutex<Reassembler>>,
    peer_reads: PeerReads,
}

/// Longest `detail` kept in [`Inbound::Rejected`] (error texts can quote attacker input).
const MAX_DETAIL: usize = 256;

fn rejected(reason: RejectReason, detail: impl Into<String>) -> Inbound {
    let mut detail = detail.into();
    if detail.len() > MAX_DETAIL {
        let mut cut = MAX_DETAIL;
        while !detail.is_char_boundary(cut) {
            cut -= 1;
        }
        detail.truncate(cut);
        detail.push('…');
    }
    Inbound::Rejected { reason, detail }
}

impl InboundFilter {
    /// The events of one message, appended to `events`: per envelope it carries (one, or the
    /// envelopes of a batch, in link order), a gap report and/or the envelope (whole, or the
    /// frame its last part completes) or a dropped partial frame; or one rejection.
    fn process(&self, channel: &str, bytes: &[u8], events: &mut VecDeque<Inbound>) {
        let on_broadcast = if channel == self.inbox {
            false
        } else if channel == self.bcast {
            true
        } else {
            events.push_back(rejected(
                RejectReason::WrongDestination,
                format!("message on unexpected channel {channel:?}"),
            ));
            return;
        };
        let message = match self.codec.decode_message(bytes) {
            Ok(message) => message,
            Err(e) => {
                events.push_back(rejected(e.reason(), e.to_string()));
                return;
            }
        };
        let mut noted = false;
        for item in message.envelopes {
            let (header, envelope, error) = match item {
                Ok(env) => (env.header.clone(), Some(env), None),
                Err(e) => match e.header().cloned() {
                    Some(header) => (header, None, Some(e)),
                    None => {
                        events.push_back(rejected(e.reason(), e.to_string()));
                        return;
                    }
                },
            };
            if let Some(problem) = self.destination_problem(&header, on_broadcast) {
                events.push_back(rejected(RejectReason::WrongDestination, problem));
                return;
            }
            if on_broadcast && header.from == self.me {
                return;
            }
            if !noted {
                noted = true;
                let mut reads = lock(&self.peer_reads);
                if reads.get(&header.from) != Some(&message.sender_reads) {
                    reads.insert(header.from.clone(), message.sender_reads);
                }
            }
            self.accept(header, envelope, error, on_broadcast, events);
        }
    }

    /// Sequence-checks one authentic envelope of the link it arrived on and queues its events.
    fn accept(
        &self,
        header: Header,
        envelope: Option<Envelope>,
        error: Option<crate::codec::DecodeError>,
        on_broadcast: bool,
        events: &mut VecDeque<Inbound>,
    ) {
        let link = LinkId {
            from: header.from.clone(),
            broadcast: on_broadcast,
        };
        let check = lock(&self.seqs).observe(&link, header.seq);
        match check {
            SeqCheck::InOrder => {}
            SeqCheck::Gap { expected, got } => {
                // A frame cut by the gap must never be delivered with a hole in it.
                lock(&self.parts).drop_link(&link);
                events.push_back(Inbound::Gap {
                    from: header.from,
                    broadcast: on_broadcast,
                    expected,
                    got,
                });
            }
            SeqCheck::Duplicate { got } => {
                events.push_back(Inbound::OutOfOrder {
                    from: header.from,
                    broadcast: on_broadcast,
                    expected: got.saturating_add(1),
                    got,
                    duplicate: true,
                });
                return;
            }
            SeqCheck::Late { expected, got } => {
                events.push_back(Inbound::OutOfOrder {
                    from: header.from,
                    broadcast: on_broadcast,
                    expected,
                    got,
                    duplicate: false,
                });
                return;
            }
        }
        let event = match (envelope, error) {
            (
                Some(Envelope {
                    header,
                    body: Body::Part { session, part },
                }),
                _,
            ) => match lock(&self.parts).push(&link, session, part) {
                Reassembly::Pending => None,
                Reassembly::Complete(body) => Some(Inbound::Envelope(Envelope { header, body })),
                Reassembly::Dropped { session, reason } => Some(Inbound::FrameDropped {
                    from: link.from,
                    session,
                    reason,
                }),
            },
            (Some(env), _) => Some(Inbound::Envelope(env)),
            (None, Some(e)) => Some(rejected(e.reason(), e.to_string())),
            (None, None) => None,
        };
        events.extend(event);
    }

    /// [`process`](Self::process) for a single envelope: `[gap report, its event]`.
    #[cfg(test)]
    fn process_pair(&self, channel: &str, bytes: &[u8]) -> [Option<Inbound>; 2] {
        let mut events = VecDeque::new();
        self.process(channel, bytes, &mut events);
        assert!(events.len() <= 2, "{events:?}");
        if events.len() == 2 {
            return [events.pop_front(), events.pop_front()];
        }
        // one event: in the second slot if it is about the envelope's body
        match events.pop_front() {
            Some(
                e @ (Inbound::Envelope(_)
                | Inbound::FrameDropped { .. }
                | Inbound::Rejected {
                    reason: RejectReason::UnknownKind | RejectReason::UnsupportedVersion,
                    ..
                }),
            ) => [None, Some(e)],
            other => [other, None],
        }
    }

    fn destination_problem(&self, header: &Header, on_broadcast: bool) -> Option<String> {
        match (&header.to, on_broadcast) {
            (None, true) => None,
            (Some(to), false) if to == &self.me => None,
            (Some(to), false) => Some(format!("addressed to {to}, this is {}", self.me)),
            (Some(to), true) => Some(format!("unicast to {to} on the broadcast channel")),
            (None, false) => Some("broadcast envelope on an inbox channel".to_owned()),
        }
    }
}

/// The receiving end of a [`Transport`]: every verified, in-order [`Inbound`] event.
///
/// Each pub/sub message is verified, decoded, sequence-checked and reassembled inside
/// [`recv`](Self::recv), in the caller's task: no task of its own and no channel between the
/// Redis reader and the consumer, so an envelope costs one wake-up less. A slow caller makes
/// fred's broadcast channel overflow, which surfaces as [`Inbound::Lagged`], never silently.
pub struct InboundReceiver {
    messages: broadcast::Receiver<Message>,
    filter: InboundFilter,
    /// Events of the resubscribe task ([`Inbound::Resubscribed`]); closed when the transport
    /// is shut down or dropped.
    control: mpsc::Receiver<Inbound>,
    /// Events of the last message not handed out yet (a batch yields several).
    pending: VecDeque<Inbound>,
}

impl std::fmt::Debug for InboundReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundReceiver")
            .field("inbox", &self.filter.inbox)
            .finish_non_exhaustive()
    }
}

impl InboundReceiver {
    /// The next event; `None` once the transport is shut down or dropped. Cancel-safe.
    pub async fn recv(&mut self) -> Option<Inbound> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            tokio::select! {
                biased;
                control = self.control.recv() => return control,
                message = self.messages.recv() => match message {
                    Ok(message) => {
                        let channel: &str = &message.channel;
                        match message.value.as_bytes() {
                            Some(bytes) => self.filter.process(channel, bytes, &mut self.pending),
                            None => self.pending.push_back(rejected(
                                RejectReason::Malformed,
                                "pub/sub message is not a byte string",
                            )),
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        lock(&self.filter.parts).clear();
                        tracing::warn!(
                            missed,
                            "pub/sub receiver lagged; reporting a gap on every link"
                        );
                        return Some(Inbound::Lagged { missed });
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
            }
        }
    }
}

async fn resubscribe_loop(
    sub: SubscriberClient,
    (mode, channels): (PubSubMode, [String; 2]),
    mut reconnects: broadcast::Receiver<fred::types::config::Server>,
    parts: Arc<Mutex<Reassembler>>,
    out: mpsc::Sender<Inbound>,
    min_delay: Duration,
    max_delay: Duration,
) {
    loop {
        match reconnects.recv().await {
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return,
        }
        let mut delay = min_delay;
        // our own channels, not fred's `resubscribe_all`: that sends a `SUBSCRIBE` without
        // arguments (an error) when only shard channels are subscribed
        while let Err(error) = subscribe(&sub, mode, channels.clone()).await {
            tracing::warn!(%error, "re-subscribe after reconnect failed; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(max_delay);
        }
        lock(&parts).clear();
        tracing::info!("pub/sub re-subscribed after reconnect; reporting a gap on every link");
        if out.send(Inbound::Resubscribed).await.is_err() {
            return;
        }
    }
}

/// The subscription watchdog of sharded pub/sub (see the module docs).
struct Watchdog {
    sub: SubscriberClient,
    checker: Client,
    /// The inbox and the broadcast channel.
    channels: [String; 2],
    inbox: String,
    parts: Arc<Mutex<Reassembler>>,
    out: mpsc::Sender<Inbound>,
    every: Duration,
}

impl Watchdog {
    async fn run(self) {
        use fred::interfaces::ClusterInterface as _;
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut missing = 0u32;
        loop {
            tick.tick().await;
            if self.sub.is_clustered() {
                // a master promoted since the last look is connected now, which fires the
                // reconnect event the resubscribe task answers
                if let Err(error) = self.sub.sync_cluster().await {
                    tracing::debug!(%error, "cluster topology refresh failed");
                }
            }
            let reply: Result<Vec<fred::types::Value>, _> =
                self.checker.pubsub_shardnumsub(self.inbox.clone()).await;
            let subscribers = match reply {
                Ok(reply) => reply.get(1).and_then(fred::types::Value::as_i64),
                Err(error) => {
                    tracing::debug!(%error, "inbox subscription check failed");
                    None
                }
            };
            match subscribers {
                Some(0) => missing += 1,
                Some(_) => missing = 0,
                None => {}
            }
            if missing < 2 {
                continue;
            }
            tracing::warn!(
                inbox = %self.inbox,
                "the inbox has no subscriber on the master serving its slot; re-subscribing"
            );
            if let Err(error) =
                subscribe(&self.sub, PubSubMode::Sharded, self.channels.clone()).await
            {
                tracing::warn!(%error, "re-subscribe failed; trying again at the next check");
                continue;
            }
            missing = 0;
            lock(&self.parts).clear();
            if self.out.send(Inbound::Resubscribed).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::envelope::{SCHEMA_VERSION, Session};
    use crate::ids::{ConnId, Incarnation, NodeId};

    fn addr(name: &str, inc: u64) -> NodeAddr {
        NodeAddr::new(NodeId::new(name).unwrap(), Incarnation(inc))
    }

    fn filter(auth: Auth) -> InboundFilter {
        let keys = Keys::new("t").unwrap();
        let me = addr("me", 1);
        InboundFilter {
            codec: Codec::new(auth, DEFAULT_MAX_ENVELOPE_BYTES),
            inbox: keys.inbox(&me),
            bcast: keys.bcast(),
            me,
            seqs: Arc::default(),
            parts: Arc::default(),
            peer_reads: Arc::default(),
        }
    }

    fn frame(from: NodeAddr, to: Option<NodeAddr>, seq: u64) -> Envelope {
        Envelope {
            header: Header {
                version: SCHEMA_VERSION,
                from,
                to,
                seq,
            },
            body: Body::Frame {
                session: Session {
                    conn: ConnId::generate(),
                    doc: "d".into(),
                    epoch: 1,
                },
                data: vec![seq as u8],
            },
        }
    }

    #[tokio::test]
    async fn a_backlog_holds_each_share_until_it_is_given_back() {
        let backlog = Backlog::new();
        let first = backlog.charge(100);
        let second = backlog.charge(50);
        assert_eq!((backlog.bytes(), backlog.envelopes()), (150, 2));
        let waiter = {
            let b = backlog.clone();
            tokio::spawn(async move { b.below(100, 2).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "150 bytes held: not below 100");
        drop(first);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((backlog.bytes(), backlog.envelopes()), (50, 1));
        drop(second);
        assert_eq!((backlog.bytes(), backlog.envelopes()), (0, 0));
        backlog.below(1, 1).await;
    }

    #[test]
    fn charged_bytes_count_payloads() {
        let s = Session {
            conn: ConnId::generate(),
            doc: "d".into(),
            epoch: 0,
        };
        let frame = Body::Frame {
            session: s,
            data: vec![0; 1000],
        };
        assert_eq!(charged_bytes(&frame), 1064);
        assert_eq!(charged_bytes(&Body::Keepalive { session: None }), 64);
    }

    #[test]
    fn in_order_gap_and_duplicate() {
        let f = filter(Auth::disabled());
        let codec = f.codec.clone();
        let peer = addr("peer", 9);
        let me = Some(f.me.clone());
        let inbox = f.inbox.clone();
        let enc = |seq| codec.encode(&frame(peer.clone(), me.clone(), seq)).unwrap();

        let [a, b] = f.process_pair(&inbox, &enc(1));
        assert!(a.is_none());
        assert!(matches!(b, Some(Inbound::Envelope(ref e)) if e.header.seq == 1));

        let [a, b] = f.process_pair(&inbox, &enc(3));
        assert_eq!(
            a,
            Some(Inbound::Gap {
                from: peer.clone(),
                broadcast: false,
                expected: 2,
                got: 3
            })
        );
        assert!(matches!(b, Some(Inbound::Envelope(ref e)) if e.header.seq == 3));

        let [a, b] = f.process_pair(&inbox, &enc(3));
        assert!(matches!(
            a,
            Some(Inbound::OutOfOrder {
                duplicate: true,
                got: 3,
                ..
            })
        ));
        assert!(b.is_none());
    }

    fn part_envelopes(
        from: &NodeAddr,
        to: &NodeAddr,
        first_seq: u64,
        session: &Session,
        data: &[u8],
        part_len: usize,
    ) -> Vec<Envelope> {
        chunk::split(session, Kind::Out, data, part_len)
            .unwrap()
            .zip(first_seq..)
            .map(|(body, seq)| Envelope {
                header: Header {
                    version: Kind::Part.since(),
                    from: from.clone(),
                    to: Some(to.clone()),
                    seq,
                },
                body,
            })
            .collect()
    }

    #[test]
    fn parts_are_reassembled_and_a_gap_mid_frame_drops_the_rest() {
        let f = filter(Auth::with_secret(b"Tq6Wm2Xr8Lk4Vb1Zn7Hc3Pd9Jf5Gs0Ya").unwrap());
        let peer = addr("owner", 4);
        let s = Session {
            conn: ConnId::generate(),
            doc: "big".into(),
            epoch: 2,
        };
        let data: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let enc = |env: &Envelope| f.codec.encode(env).unwrap();

        // Five parts, numbered 1..=5: nothing until the last, then the whole frame.
        let parts = part_envelopes(&peer, &f.me, 1, &s, &data, 200);
        assert_eq!(parts.len(), 5);
        for p in &parts[..4] {
            assert_eq!(f.process_pair(&f.inbox, &enc(p)), [None, None]);
        }
        let [a, b] = f.process_pair(&f.inbox, &enc(&parts[4]));
        assert!(a.is_none());
        let Some(Inbound::Envelope(env)) = b else {
            panic!("{b:?}")
        };
        assert_eq!(env.header.seq, 5);
        assert_eq!(
            env.body,
            Body::Out {
                session: s.clone(),
                data: data.clone()
            }
        );
        assert_eq!(lock(&f.parts).len(), 0);

        // The next frame, numbered 6..=10, loses number 8: a gap, and its tail is dropped.
        let parts = part_envelopes(&peer, &f.me, 6, &s, &data, 200);
        for p in &parts[..2] {
            assert_eq!(f.process_pair(&f.inbox, &enc(p)), [None, None]);
        }
        assert_eq!(lock(&f.parts).len(), 1);
        let dropped = Some(Inbound::FrameDropped {
            from: peer.clone(),
            session: s.clone(),
            reason: DropReason::Sequence,
        });
        let [a, b] = f.process_pair(&f.inbox, &enc(&parts[3]));
        assert!(matches!(
            a,
            Some(Inbound::Gap {
                expected: 8,
                got: 9,
                ..
            })
        ));
        assert_eq!(b, dropped);
        assert_eq!(f.process_pair(&f.inbox, &enc(&parts[4])), [None, dropped]);
        assert_eq!(lock(&f.parts).len(), 0);

        // A duplicate part is dropped by the sequence check before reassembly.
        let parts = part_envelopes(&peer, &f.me, 11, &s, &data, 600);
        assert_eq!(f.process_pair(&f.inbox, &enc(&parts[0])), [None, None]);
        let [a, b] = f.process_pair(&f.inbox, &enc(&parts[0]));
        assert!(matches!(
            a,
            Some(Inbound::OutOfOrder {
                duplicate: true,
                ..
            })
        ));
        assert!(b.is_none());
        let [_, b] = f.process_pair(&f.inbox, &enc(&parts[1]));
        assert!(matches!(b, Some(Inbound::Envelope(_))));
    }

    #[test]
    fn wrong_incarnation_and_wrong_channel_are_rejected() {
        let f = filter(Auth::disabled());
        let peer = addr("peer", 9);
        let stale_me = addr("me", 2);
        let bytes = f
            .codec
            .encode(&frame(peer.clone(), Some(stale_me), 1))
            .unwrap();
        let [a, _] = f.process_pair(&f.inbox, &bytes);
        assert!(matches!(
            a,
            Some(Inbound::Rejected {
                reason: RejectReason::WrongDestination,
                ..
            })
        ));
        // A unicast replayed onto the broadcast channel.
        let bytes = f
            .codec
            .encode(&frame(peer.clone(), Some(f.me.clone()), 1))
            .unwrap();
        let [a, _] = f.process_pair(&f.bcast, &bytes);
        assert!(matches!(
            a,
            Some(Inbound::Rejected {
                reason: RejectReason::WrongDestination,
                ..
            })
        ));
        // A broadcast published into an inbox.
        let bytes = f.codec.encode(&frame(peer, None, 1)).unwrap();
        let [a, _] = f.process_pair(&f.inbox, &bytes);
        assert!(matches!(
            a,
            Some(Inbound::Rejected {
                reason: RejectReason::WrongDestination,
                ..
            })
        ));
        // Nothing was tracked for rejected envelopes.
        assert_eq!(lock(&f.seqs).len(), 0);
    }

    #[test]
    fn rejection_detail_is_bounded() {
        let Inbound::Rejected { detail, .. } = rejected(RejectReason::Malformed, "é".repeat(1000))
        else {
            panic!("not a rejection")
        };
        assert!(detail.len() <= MAX_DETAIL + '…'.len_utf8());
        assert!(detail.ends_with('…'));
    }

    #[test]
    fn own_broadcasts_are_skipped() {
        let f = filter(Auth::disabled());
        let bytes = f.codec.encode(&frame(f.me.clone(), None, 1)).unwrap();
        assert_eq!(f.process_pair(&f.bcast, &bytes), [None, None]);
        let other = f.codec.encode(&frame(addr("x", 1), None, 50)).unwrap();
        let [a, b] = f.process_pair(&f.bcast, &other);
        assert!(a.is_none(), "first broadcast number is accepted as is");
        assert!(matches!(b, Some(Inbound::Envelope(_))));
    }

    #[test]
    fn garbage_and_unsigned_are_rejected_with_reasons() {
        let f = filter(Auth::with_secret(b"Tq6Wm2Xr8Lk4Vb1Zn7Hc3Pd9Jf5Gs0Ya").unwrap());
        let [a, b] = f.process_pair(&f.inbox, b"\x02garbage");
        assert!(matches!(
            a,
            Some(Inbound::Rejected {
                reason: RejectReason::Malformed,
                ..
            })
        ));
        assert!(b.is_none());
        let plain = Codec::new(Auth::disabled(), DEFAULT_MAX_ENVELOPE_BYTES)
            .encode(&frame(addr("x", 1), Some(f.me.clone()), 1))
            .unwrap();
        let [a, _] = f.process_pair(&f.inbox, &plain);
        assert!(matches!(
            a,
            Some(Inbound::Rejected {
                reason: RejectReason::Unsigned,
                ..
            })
        ));
        assert_eq!(lock(&f.seqs).len(), 0);
    }
}
