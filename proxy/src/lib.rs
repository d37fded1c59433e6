//! Cross-node envelopes for Hearth: msgpack encoding, HMAC authentication, per-link sequence
//! numbers and the Redis pub/sub transport that carries them between processes.
//!
//! **API boundary.** This crate knows nothing about Yjs or the Hocuspocus protocol: client frames
//! and event payloads are opaque bytes. It doesn't decide ownership either; it carries the
//! owner epoch the caller gives it.
//!
//! # Layout
//!
//! | module | owns |
//! |---|---|
//! | [`ids`] | [`NodeId`], [`Incarnation`], [`NodeAddr`], [`ConnId`], [`RequestId`] |
//! | [`envelope`] | the data model: [`Envelope`] = [`Header`] + [`Body`] |
//! | [`codec`] | the wire format, size cap, [`DecodeError`] / [`RejectReason`] |
//! | [`auth`] | the secret strength policy ([`Secret`]), rotation ([`Secrets`]), HMAC-SHA256 ([`Auth`]) |
//! | [`seq`] | [`SeqTracker`]: gap/duplicate detection per link (pure) |
//! | [`chunk`] | frames larger than one envelope: [`split`], [`Reassembler`] (pure) |
//! | [`keys`] | [`doc_tag`] and Redis key/channel names ([`Keys`]) |
//! | [`transport`] | [`Transport`] over fred pub/sub, [`Inbound`] events |
//! | [`rpc`] | [`Rpc`]: custom events with reply timeouts |
//! | [`routes`] | [`RouteCache`]: doc → (owner, epoch) |
//!
//! # Usage
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use hearth_proxy::{
//!     Auth, Body, ConnId, Inbound, NodeAddr, NodeId, Rpc, Secret, Secrets, Session, Transport,
//!     TransportConfig,
//! };
//!
//! # async fn run(owner: NodeAddr) -> Result<(), Box<dyn std::error::Error>> {
//! let me = NodeAddr::fresh(NodeId::new("node0")?);
//! let mut config = TransportConfig::new("redis://127.0.0.1:6379", "hearth", me);
//! // 32+ bytes, no placeholder (`openssl rand -base64 48`); during a rotation, the other
//! // secret goes into `previous`.
//! let current = Secret::new(std::env::var("CLUSTER_SECRET")?)?;
//! config.auth = Auth::new(&Secrets::new(current));
//! let (transport, mut inbound) = Transport::connect(config).await?;
//! let rpc = Arc::new(Rpc::new(transport.clone()));
//!
//! // Receive loop: dispatch envelopes, resync on loss, count rejections.
//! let dispatcher = rpc.clone();
//! tokio::spawn(async move {
//!     while let Some(event) = inbound.recv().await {
//!         match event {
//!             Inbound::Envelope(env) => match env.body {
//!                 Body::RpcReply(reply) => {
//!                     dispatcher.on_reply(reply);
//!                 }
//!                 _other => { /* route to sessions / document actors */ }
//!             },
//!             Inbound::Gap { from, .. } => { /* resync sessions on the link from `from` */ }
//!             Inbound::FrameDropped { session, .. } => { /* resync that session */ }
//!             Inbound::Resubscribed | Inbound::Lagged { .. } => { /* resync everything */ }
//!             Inbound::OutOfOrder { .. } => { /* dropped; count it */ }
//!             Inbound::Rejected { reason, .. } => { /* envelopes_rejected{reason} += 1 */ }
//!         }
//!     }
//! });
//!
//! // Forward a client frame to the owner of "doc-1".
//! let session = Session { conn: ConnId::generate(), doc: "doc-1".into(), epoch: 7 };
//! let receivers = transport
//!     .send(&owner, Body::Frame { session, data: vec![0, 1, 2] })
//!     .await?;
//! if receivers == 0 {
//!     // The owner incarnation is gone: invalidate its routes, reset its sessions.
//! }
//!
//! // A custom event with a deadline.
//! let reply = rpc.call(&owner, "doc-1", "rename", b"{}".to_vec(), Duration::from_secs(5)).await;
//! # let _ = reply;
//! # Ok(())
//! # }
//! ```
//!
//! # Wire format
//!
//! One Redis pub/sub message is one envelope:
//!
//! ```text
//! unsigned:  0x01 | body
//! signed:    0x02 | key_id: u8 | mac: 32 bytes | body
//!            mac = HMAC-SHA256(secret, 0x02 | key_id | body), key_id = 0
//! ```
//!
//! With a cluster secret configured, only signed envelopes whose MAC verifies under the current
//! or the previous secret ([`Secrets`]) are accepted (constant-time checks); envelopes go out
//! signed with the current one. Key ids other than 0 are reserved and rejected. Without a
//! secret, envelopes go out unsigned and anything well-formed is accepted;
//! [`Auth::startup_warning`] returns the warning to log (Hearth itself refuses to run a cluster
//! without a secret).
//!
//! `body` is one msgpack **map with string keys** (named fields, for debuggability; byte
//! fields are msgpack `bin` via `serde_bytes`):
//!
//! | key | type | meaning |
//! |---|---|---|
//! | `v` | u8 | schema version that defines the kind ([`Kind::since`]): 1, 2 for `part`, 3 for `fan` and batches; this build reads up to [`SCHEMA_VERSION`] = 3 |
//! | `t` | str | kind tag (table below) |
//! | `from` | `{id: str, inc: u64}` | sending process ([`NodeAddr`]) |
//! | `to` | `{id, inc}` or nil | destination process; nil on broadcasts |
//! | `seq` | u64 | per-link sequence number, from 1 |
//! | `mv` | u8 | the highest schema version the sender reads (since 3; absent = 2) |
//! | `s` | `{conn: bin16, doc: str, epoch: i64}` | session, on session kinds only |
//! | `b` | map | kind-specific body (must come after `v` and `t`) |
//!
//! | `t` | direction | `s` | `b` fields |
//! |---|---|---|---|
//! | `open` | edge → owner | yes | `path`, `query`, `headers` [[k, v]…], `remote`?, `provider_version`? |
//! | `frame` | edge → owner | yes | `data` bin (one raw client frame) |
//! | `out` | owner → edge | yes | `data` bin (one frame for the client) |
//! | `detach` | edge → owner | yes | `reason` |
//! | `close_doc` | owner → edge | yes | `code` u16, `reason`, `resync` bool |
//! | `not_owner` | owner → edge | yes | `holder` {`node`, `epoch`}? |
//! | `released` | broadcast | no | `doc`, `epoch` |
//! | `draining` | broadcast | no | `node` |
//! | `node_down` | broadcast | no | `node` |
//! | `rpc` | caller → owner | no | `id` {`inc`, `n`}, `doc`, `epoch`?, `name`, `payload` bin, `deadline_ms`, `only_if_open` |
//! | `rpc_reply` | owner → caller | no | `id`, `ok`, `payload` bin (if ok), `err` {`code`, `msg`, `holder`?} (if not) |
//! | `keepalive` | either | optional | empty (per attachment with `s`, per node pair without) |
//! | `part` (v2) | either | yes | `k` (`frame` or `out`), `n` u32 (piece index from 0), `last` bool, `data` bin (a piece of the frame) |
//! | `fan` (v3) | owner → edge | no | `doc`, `epoch`, `conns` [bin16…], `data` bin (one frame for each of these clients of the receiver) |
//!
//! ## Batches (schema 3)
//!
//! Envelopes queued for the same destination at the same time travel as **one** message, signed
//! once: a map `{v: 3, t: "batch", from, to, seq, mv, n, items}`, where `seq` is the number of
//! the first of the `n` envelopes it carries (they are numbered `seq`, `seq + 1`, … on the
//! link, exactly as if sent one by one) and `items` their compact forms, msgpack arrays:
//!
//! | item | form |
//! |---|---|
//! | `frame`, `out` | `[t, [conn, doc, epoch], data]` |
//! | `fan` | `["fan", [doc, epoch], [conn…], data]` |
//! | any other kind except `part` | `[t, [conn, doc, epoch] or nil, b]`, `b` as above |
//!
//! While gathering a batch, the writer merges an `out` into an earlier `out` (or `fan`) of the
//! same bytes for the same document and epoch, as long as its connection has nothing queued
//! between the two, so one frame for several clients of the receiving node crosses Redis once;
//! the receiver hands it to each listed connection in order, as if each had its own `out`.
//! Per-connection order is never changed; sync replies and acknowledgements stay per session.
//!
//! A batch goes only to a peer whose messages said `mv` ≥ 3: a node of version 2 never receives
//! one (and every message it sends lacks `mv`, so it keeps receiving single envelopes). Batching
//! can be turned off ([`TransportConfig::batching`]). A receiver that meets a batch of a version
//! it doesn't read skips all `n` numbers (counted as `unsupported_version`), keeping its
//! sequence tracking right.
//!
//! # Compatibility rules
//!
//! * The header keys (`v`, `t`, `from`, `to`, `seq`) keep their meaning in every version; a
//!   change there needs a new format tag. So a receiver can always read the header of an
//!   authentic envelope, even of a newer version or an unknown kind, and keep its sequence
//!   tracking right.
//! * Unknown `t`, or `v` above [`SCHEMA_VERSION`]: the body is skipped and decoding fails with
//!   [`DecodeError::UnknownKind`] / [`DecodeError::UnsupportedVersion`], which the caller counts
//!   and ignores. Decoding never fails the stream.
//! * Unknown keys, in the header map or in a body, are ignored; missing optional fields decode
//!   as absent; extra trailing elements of a batch item are ignored. Adding an optional field is
//!   a compatible change; anything else bumps `v`.
//! * A writer stamps each envelope with the version that introduced its kind, not with its own
//!   [`SCHEMA_VERSION`]: a version-1 node keeps reading every v1 kind from a version-2 node and
//!   only skips (and counts) `part`s, so a rolling upgrade loses nothing that used to work.
//!
//! # Large frames
//!
//! A `frame` or `out` whose envelope would exceed the cap is sent as `part` envelopes of about
//! the cap's size, consecutive on its link, each numbered and (with a secret) signed like any
//! other envelope. The receiving transport reassembles them per (link, connection id) and
//! delivers the whole frame as the original kind; callers never see a part. A gap on the link
//! discards the unfinished frame (its session is reset because of the gap anyway). Frames above
//! [`ReassemblyLimits::max_frame_bytes`] are refused when sent ([`ProxyError::FrameTooLarge`]);
//! on the receiving side that bound, the number of unfinished frames and the bytes they hold are
//! enforced, and whatever is dropped is reported as [`Inbound::FrameDropped`] so the caller can
//! reset the session. See [`chunk`].
//!
//! # Delivery
//!
//! Redis pub/sub is at-most-once. Every link (sender incarnation → receiver incarnation, and
//! sender → broadcast) is numbered, and the receiver reports [`Inbound::Gap`],
//! [`Inbound::OutOfOrder`] (dropped), [`Inbound::Lagged`] and [`Inbound::Resubscribed`] so the
//! caller can resync the affected sessions. `send` returns the receiver count; 0 means the
//! destination incarnation is gone.
//!
//! # Not done yet
//!
//! * **Flow control for parts.** The parts of one frame are published back to back. For a
//!   subscriber that reads slower than they are published, Redis buffers them up to
//!   `client-output-buffer-limit pubsub` (32 MiB hard by default) and then drops the subscriber,
//!   which surfaces as [`Inbound::Resubscribed`]. Frames close to that size need the Redis limit
//!   raised where edges can fall behind.
//! * **Other large kinds.** Only `frame` and `out` are split; an `rpc` or `rpc_reply` over the
//!   cap (default 8 MiB, [`DEFAULT_MAX_ENVELOPE_BYTES`]) is refused with
//!   [`ProxyError::Oversize`].
//! * **Replay outside the sequence window.** A captured authentic envelope replayed later is
//!   dropped by sequence checking on an existing link; there is no timestamp check (we don't
//!   compare clocks across machines), so a replay to a *fresh* receiver of a broadcast is
//!   accepted. Broadcasts only carry cache invalidations.
//! * Confidentiality: the HMAC authenticates, it doesn't encrypt. Anyone who can `SUBSCRIBE`
//!   can read frames.

#![warn(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod auth;
pub mod chunk;
pub mod codec;
pub mod envelope;
pub mod error;
pub mod ids;
pub mod keys;
pub mod routes;
pub mod rpc;
pub mod seq;
pub mod transport;

pub use auth::{
    Auth, FINGERPRINT_LABEL, FINGERPRINT_LEN, KEY_ID, MIN_SECRET_LEN, Secret, Secrets, WeakSecret,
    check_secret,
};
pub use chunk::{DropReason, Reassembler, Reassembly, ReassemblyLimits, split};
pub use codec::{
    Codec, DEFAULT_MAX_ENVELOPE_BYTES, DecodeError, MAX_BATCH_ITEMS, Message, RejectReason,
};
pub use envelope::{
    Body, CloseDoc, Envelope, Header, Holder, Kind, OpenMeta, Part, RpcErrorCode, RpcFailure,
    RpcReply, RpcRequest, SCHEMA_VERSION, Session,
};
pub use error::ProxyError;
pub use ids::{ConnId, Incarnation, MAX_NODE_ID_LEN, NodeAddr, NodeId, RequestId};
pub use keys::{Keys, doc_tag};
pub use routes::{Route, RouteCache};
pub use rpc::{Call, Rpc, RpcError};
pub use seq::{LinkId, SeqCheck, SeqTracker};
pub use transport::{
    Backlog, Cork, EnvelopeSink, Inbound, InboundReceiver, MAX_CORK, PubSubMode, SendReceipt,
    StatsHandle, Transport, TransportConfig, TransportStats,
};
