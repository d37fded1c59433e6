//! Cluster test harness.
