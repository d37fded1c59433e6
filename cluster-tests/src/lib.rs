//! Multi-process tests and the `hearth-bench` load generator.
//!
//! * [`bench`] — the load generator (library behind `src/bin/hearth-bench.rs`).
//! * [`fuzz`] — the mutational fuzzer (library behind `src/bin/hearth-fuzz.rs`).
//! * [`harness`] — starting the `hearth` binary for tests.

pub mod bench;
pub mod fuzz;
pub mod harness;

/// Process and fault harness for the persistence and cluster tests: nodes, Redis, PostgreSQL,
/// a TCP load balancer and a recording Hocuspocus client. Its files live in `src/harness/`
/// (the name `harness` is taken by `src/harness.rs`).
#[path = "harness/testbed.rs"]
pub mod testbed;
