//! The bounded fuzz run of the test suite and the replay of every saved finding.
//!
//! Runs in this process: a case that crashes takes the test binary down, which fails the run.
//! The long, supervised run is `cargo run --release -p cluster-tests --bin hearth-fuzz`
//! (docs/security.md).

#![allow(clippy::unwrap_used)]

use cluster_tests::fuzz::{self, Target, targets};

/// Cases per target; `HEARTH_FUZZ_CASES` raises it, `HEARTH_FUZZ_SEED` picks another seed.
fn cases() -> u64 {
    std::env::var("HEARTH_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4_000)
}

fn seed() -> u64 {
    std::env::var("HEARTH_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_261_204)
}

fn bounded(target: Target) {
    let stats = match fuzz::run(target, seed(), 0, cases()) {
        Ok(s) => s,
        Err(f) => panic!(
            "{} case {} (seed {}) failed: {}; replay with `hearth-fuzz --target {} --seed {} --cases 1` from index {}",
            f.target.name(),
            f.index,
            f.seed,
            f.what,
            f.target.name(),
            f.seed,
            f.index
        ),
    };
    println!("{}: {stats:?}", target.name());
    assert_eq!(stats.cases, cases());
    // the generator must produce input the guards accept, or the run tests only the refusals
    assert!(stats.accepted > 0, "{}: nothing accepted", target.name());
    assert!(stats.refused > 0, "{}: nothing refused", target.name());
}

#[test]
fn updates() {
    bounded(Target::Updates);
}

#[test]
fn stored_rows() {
    bounded(Target::Stored);
}

#[test]
fn frames() {
    bounded(Target::Frames);
}

#[test]
fn awareness() {
    bounded(Target::Awareness);
}

#[test]
fn state_vectors() {
    bounded(Target::StateVectors);
}

#[test]
fn envelopes() {
    bounded(Target::Envelopes);
}

#[test]
fn admin() {
    bounded(Target::Admin);
}

#[test]
fn auth() {
    bounded(Target::Auth);
}

#[test]
fn import() {
    bounded(Target::Import);
}

#[test]
fn saved_findings_replay_cleanly() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz-regressions");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "fuzz") {
            continue;
        }
        let (target, input) = fuzz::read_case(&path).unwrap();
        let out = targets::feed(target, &input);
        assert!(out.violation.is_none(), "{}: {out:?}", path.display());
        n += 1;
    }
    assert!(n > 0, "no regression files in {}", dir.display());
}
