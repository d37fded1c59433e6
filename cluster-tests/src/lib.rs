//! Multi-process tests and the `hearth-bench` load generator.
//!
//! * [`bench`](mod@bench) — the load generator (library behind `src/bin/hearth-bench.rs`).
//! * [`fuzz`] — the mutational fuzzer (library behind `src/bin/hearth-fuzz.rs`).
//! * [`test_extension`] — the behaviours the tests rely on, served by the `hearth-test-server`
//!   binary (the stock command line plus that extension).
//! * [`testbed`] — the process and fault harness of the persistence and cluster tests: nodes,
//!   Redis, PostgreSQL, a TCP load balancer and a recording Hocuspocus client.

pub mod bench;
pub mod fuzz;
pub mod test_extension;

// The process and fault harness (documented in the file); its files live in `src/harness/`.
#[path = "harness/testbed.rs"]
pub mod testbed;
