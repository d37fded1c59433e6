//! Hearth: a Hocuspocus-compatible Yjs collaboration server.
//!
//! The public surface, for applications that embed Hearth or extend it:
//! * [`cli::run`] — the whole `hearth` command line with an application's extensions: a custom
//!   server is a `main.rs` of a few lines (see `examples/custom_server.rs`).
//! * [`Extension`] and the payloads in [`hooks`] — one async method per Hocuspocus hook.
//! * [`Server`], [`ServerHandle`], [`WeakServer`] — building a server by hand, and calling it
//!   from hooks: direct connections, [`ServerHandle::lock_document`], custom events.
//! * [`Config`] ([`config`]) — every setting; [`storage`] — the storage trait and its backends;
//!   [`metrics`]; [`request`] — what a hook learns about the HTTP request;
//!   [`alloc`] — the capped global allocator the binary installs.
//! * [`protocol`] — the wire formats, sans-IO, for tools and tests that speak them.
//!
//! Everything else (connections, document tasks, the cluster, the HTTP front, throttling) is
//! internal; ARCHITECTURE.md maps it.

pub mod admin;
pub mod alloc;
pub(crate) mod auth;
pub mod cli;
pub(crate) mod client_ip;
pub(crate) mod clock;
pub(crate) mod cluster;
pub mod config;
pub(crate) mod connection;
pub(crate) mod doc;
pub mod events;
pub(crate) mod fd_limit;
pub(crate) mod health;
pub mod hooks;
pub(crate) mod http;
pub mod jwt;
pub(crate) mod limits;
pub mod metrics;
pub(crate) mod outbox;
pub mod protocol;
pub mod request;
pub mod revoke;
pub mod server;
pub mod storage;
pub(crate) mod throttle;
pub(crate) mod tokens;
pub mod transfer;
pub mod webhook;

pub use async_trait::async_trait;
pub use cluster::EmitError;
pub use config::Config;
pub use doc::LoadError;
pub use doc::direct::DirectConnection;
pub use doc::{DocInfo, TransactError};
pub use hooks::{Context, Extension, HookError, HookResult};
pub use server::{EmitOptions, LockDocumentError, Server, ServerError, ServerHandle, WeakServer};
