//! The wire protocols, sans-IO: no tokio tasks, no sockets, no clock reads.
//!
//! * [`lib0`] — varUint / varString / varUint8Array.
//! * [`client`] — decoding server frames, as a provider does (tests and the load generator).
//! * [`message`] — Hocuspocus frames (address + type + body) and y-websocket frames.
//! * [`awareness`] — y-protocols awareness rules.
//! * [`close`] — [`Close`]: every socket close code and reason.
//! * [`scan`] — iterative structural pre-scan of Yjs updates (depth, counts, dependencies).
//! * [`update`] — guarded decoding of Yjs updates (scan first, round-trip check).

pub mod awareness;
pub mod client;
pub mod close;
pub mod lib0;
pub mod message;
pub mod scan;
pub mod update;

pub use close::Close;
