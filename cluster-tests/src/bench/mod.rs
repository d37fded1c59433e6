//! `hearth-bench`: a load generator that speaks the Hocuspocus protocol with real yrs
//! documents, so the same run drives Hearth and Hocuspocus alike (see docs/benchmarks.md).
//!
//! * [`codec`] — client-side frames (encode what a provider sends, decode what servers send).
//! * [`client`] — one provider: handshake, insert/observe loop, idle loop.
//! * [`stats`] — latency histograms, send logs, delivery cursors (missing-delivery detection).
//! * [`fleet`] — many clients, topology, measurement windows.
//! * [`scenarios`] — fanout, maxrate, acklatency, conns, coldload, proxied.
//! * [`docgen`] — a realistic document of a given size for cold loads.
//! * [`procfs`] — CPU and RSS of server processes.
//! * [`cli`] — the command line.

pub mod cli;
pub mod client;
pub mod codec;
pub mod docgen;
pub mod fleet;
pub mod procfs;
pub mod scenarios;
pub mod stats;
