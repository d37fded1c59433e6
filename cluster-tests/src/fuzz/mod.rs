//! In-process mutational fuzzer over every decoder and apply path a client, a peer node or the
//! database reaches.
//!
//! Each case is a pure function of `(target, seed, index)`: it builds realistic input (editor
//! traffic from [`traffic`], valid frames and envelopes), mutates it (bit flips, byte edits,
//! splices, truncation, length-prefix bombs) and pushes it through the same functions the
//! server uses, in the same order. A case that panics outside `catch_unwind`, aborts or
//! segfaults takes the process down; one that runs longer than [`SLOW_CASE`] is reported as a
//! hang. Because cases are reproducible, a crash found by a long run is replayed and saved as
//! a regression file (`hearth-fuzz`'s supervisor does that), and
//! `cluster-tests/fuzz-regressions/` is replayed by the test suite.

pub mod admin;
pub mod auth;
pub mod envelope;
pub mod import;
pub mod mutate;
pub mod targets;
pub mod traffic;

use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::StdRng;

pub use targets::Target;

/// A case slower than this is reported as a hang.
pub const SLOW_CASE: Duration = Duration::from_secs(2);

/// What one bounded run saw.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    /// Cases run.
    pub cases: u64,
    /// Inputs the server's guards refused (scan, decode, limits): the expected outcome for most
    /// mutations.
    pub refused: u64,
    /// Inputs accepted and applied.
    pub accepted: u64,
    /// Panics caught by the server's own `catch_unwind` (survivable, counted for information).
    pub caught_panics: u64,
    /// Accepted documents whose stored state reloaded with a different state vector.
    pub reload_mismatches: u64,
}

/// A case that misbehaved without crashing the process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Target.
    pub target: Target,
    /// Seed of the run.
    pub seed: u64,
    /// Index of the case.
    pub index: u64,
    /// What went wrong.
    pub what: String,
}

/// The random source of case `index` of a run with `seed` (independent of every other case).
pub fn case_rng(target: Target, seed: u64, index: u64) -> StdRng {
    let mix = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(index.wrapping_mul(0xD1B5_4A32_D192_ED03))
        .wrapping_add(target as u64);
    StdRng::seed_from_u64(mix)
}

/// Runs cases `from..from + count` of `target` with `seed`.
pub fn run(target: Target, seed: u64, from: u64, count: u64) -> Result<Stats, Finding> {
    let mut stats = Stats::default();
    for index in from..from + count {
        let started = Instant::now();
        let outcome = targets::run_case(target, seed, index);
        if started.elapsed() > SLOW_CASE {
            return Err(Finding {
                target,
                seed,
                index,
                what: format!("case took {:?}", started.elapsed()),
            });
        }
        stats.cases += 1;
        stats.refused += outcome.refused;
        stats.accepted += outcome.accepted;
        stats.caught_panics += outcome.caught_panics;
        stats.reload_mismatches += outcome.reload_mismatches;
        if let Some(what) = outcome.violation {
            return Err(Finding {
                target,
                seed,
                index,
                what,
            });
        }
    }
    Ok(stats)
}

/// Writes a case as a regression file: a `target <name>` line, then one hex line per input
/// (an update, a frame, a stored row…).
pub fn write_case(
    path: &std::path::Path,
    target: Target,
    input: &[Vec<u8>],
) -> std::io::Result<()> {
    let mut text = format!("target {}\n", target.name());
    for part in input {
        for b in part {
            text.push_str(&format!("{b:02x}"));
        }
        text.push('\n');
    }
    std::fs::write(path, text)
}

/// Reads a regression file written by [`write_case`].
pub fn read_case(path: &std::path::Path) -> Result<(Target, Vec<Vec<u8>>), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut lines = text.lines();
    let target = lines
        .next()
        .and_then(|l| l.strip_prefix("target "))
        .and_then(|n| Target::from_name(n.trim()))
        .ok_or_else(|| format!("{}: first line must be `target <name>`", path.display()))?;
    let mut input = Vec::new();
    for line in lines {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        if line.len() % 2 != 0 {
            return Err(format!("{}: odd-length hex line", path.display()));
        }
        let bytes = (0..line.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&line[i..i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        input.push(bytes);
    }
    Ok((target, input))
}
