//! Hearth: a Hocuspocus-compatible Yjs collaboration server.
//!
//! Layout (see ARCHITECTURE.md):
//! * [`protocol`] — wire formats, sans-IO.
//! * [`connection`] — one task per WebSocket (Hocuspocus and y-websocket).
//! * [`doc`] — one task per document, the registry, group commit, direct connections.
//! * [`storage`] — the storage trait and its backends.
//! * [`hooks`] — the extension API.
//! * [`server`], [`http`], [`config`], [`metrics`], [`auth`].
//! * [`cli`] — the `hearth` command line, for the binary and for applications embedding Hearth.
//! * [`client_ip`], [`fd_limit`], `limits` — who a connection is from, descriptor headroom,
//!   connection caps.
//! * [`throttle`] — bans of client addresses after repeated failed authentication.

pub mod alloc;
pub mod auth;
pub mod cli;
pub mod client_ip;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod doc;
pub mod fd_limit;
pub mod hooks;
pub mod http;
pub(crate) mod limits;
pub mod metrics;
pub mod protocol;
pub mod request;
pub mod server;
mod shared;
pub mod storage;
pub mod throttle;

pub use async_trait::async_trait;
pub use cluster::EmitError;
pub use config::Config;
pub use doc::direct::DirectConnection;
pub use hooks::{Context, Extension, HookError, HookResult};
pub use server::{LockDocumentError, Server, ServerError, ServerHandle, WeakServer};
