//! The crate's error type for everything except inbound decoding (see
//! [`crate::codec::DecodeError`]) and custom-event calls (see [`crate::rpc::RpcError`]).

/// Errors from configuration, encoding and the Redis transport.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A node id that isn't 1-64 chars of `[A-Za-z0-9_-]`.
    #[error("invalid node id {0:?}: use 1-64 chars of [A-Za-z0-9_-]")]
    InvalidNodeId(String),
    /// Bad configuration (prefix, limits).
    #[error("invalid proxy configuration: {0}")]
    Config(String),
    /// A cluster secret that does not meet the strength policy.
    #[error("cluster secret {0}")]
    WeakSecret(#[from] crate::auth::WeakSecret),
    /// The encoded envelope would exceed the configured cap, and it is not a `frame` or `out`
    /// (those are sent in parts), or even an empty part would exceed it.
    #[error("envelope of {size} bytes exceeds the {max}-byte cap")]
    Oversize {
        /// Encoded size.
        size: usize,
        /// Configured cap.
        max: usize,
    },
    /// A `frame` or `out` larger than the largest frame peers reassemble
    /// ([`crate::chunk::ReassemblyLimits::max_frame_bytes`]); nothing was sent.
    #[error("frame of {size} bytes exceeds the {max}-byte limit of proxied frames")]
    FrameTooLarge {
        /// Frame size.
        size: usize,
        /// Configured limit.
        max: usize,
    },
    /// msgpack serialization failed (should not happen for well-formed values).
    #[error("envelope encoding failed: {0}")]
    Encode(String),
    /// The outbound queue is full (Redis is slow or down). The envelope was not sent; treat it
    /// as lost (resync the affected sessions).
    #[error("outbound envelope queue is full")]
    Clogged,
    /// The transport has shut down.
    #[error("transport is closed")]
    Closed,
    /// A Redis command failed or timed out. The envelope may or may not have been delivered.
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
}
