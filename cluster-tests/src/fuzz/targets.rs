//! The fuzz targets: one per kind of outside input, each driving the server's own functions.

use std::panic::{AssertUnwindSafe, catch_unwind};

use bytes::Bytes;
use hearth::protocol::awareness;
use hearth::protocol::lib0::Writer;
use hearth::protocol::message::{decode_client_frame, decode_yws_frame};
use hearth::protocol::scan::{ScanLimits, scan_update};
use hearth::protocol::update::{
    contains_scanned, decode_guarded, decode_scanned, decode_state_vector, known_clocks,
};
use rand::Rng;
use rand::rngs::StdRng;
use yrs::updates::encoder::Encode;
use yrs::{Doc, ReadTxn, StateVector, Transact};

use super::{admin, auth, case_rng, envelope, import, mutate, traffic};

/// What a fuzz target feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// Yjs updates from clients, applied in order to a document with history, through the
    /// document task's path: scan, dependency check, guarded decode, apply, then the reads a
    /// sync answer and a compaction make.
    Updates,
    /// The stored snapshot and log of a document, through the load path.
    Stored,
    /// Hocuspocus and y-websocket frames from a socket, and the payloads they carry.
    Frames,
    /// Awareness updates.
    Awareness,
    /// State vectors of sync step1 against a document with history.
    StateVectors,
    /// Envelopes from peer nodes (or anyone publishing on the cluster's channels), signed and
    /// unsigned.
    Envelopes,
    /// The admin API's outside input: JSON operations applied to a document with history, type
    /// hints for reading it back as JSON, and request targets (path and query).
    Admin,
    /// Authentication input: JWTs, authentication webhook answers, revocation requests and
    /// revocation payloads from peer nodes.
    Auth,
    /// What `hearth import` reads: Yjs v1 and v2 updates of whole documents, and update file
    /// names.
    Import,
}

impl Target {
    /// Every target.
    pub const ALL: [Target; 9] = [
        Target::Updates,
        Target::Stored,
        Target::Frames,
        Target::Awareness,
        Target::StateVectors,
        Target::Envelopes,
        Target::Admin,
        Target::Auth,
        Target::Import,
    ];

    /// The target's name on the command line and in regression files.
    pub fn name(self) -> &'static str {
        match self {
            Target::Updates => "updates",
            Target::Stored => "stored",
            Target::Frames => "frames",
            Target::Awareness => "awareness",
            Target::StateVectors => "state-vectors",
            Target::Envelopes => "envelopes",
            Target::Admin => "admin",
            Target::Auth => "auth",
            Target::Import => "import",
        }
    }

    /// The target with this name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// The result of one case.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Inputs refused by a guard.
    pub refused: u64,
    /// Inputs accepted.
    pub accepted: u64,
    /// Panics the server's `catch_unwind` would have caught.
    pub caught_panics: u64,
    /// Accepted documents whose stored state reloads with another state vector.
    pub reload_mismatches: u64,
    /// A broken invariant (the case fails).
    pub violation: Option<String>,
}

/// Builds the input of case `index` and runs it.
pub fn run_case(target: Target, seed: u64, index: u64) -> Outcome {
    let mut rng = case_rng(target, seed, index);
    let input = build(target, &mut rng);
    feed(target, &input)
}

/// The input of case `index` (what a regression file stores).
pub fn case_input(target: Target, seed: u64, index: u64) -> Vec<Vec<u8>> {
    build(target, &mut case_rng(target, seed, index))
}

fn build(target: Target, rng: &mut StdRng) -> Vec<Vec<u8>> {
    match target {
        Target::Updates | Target::Stored => {
            let mut history = traffic::history(rng);
            if !history.is_empty() {
                let k = rng.random_range(0..history.len());
                let update = std::mem::take(&mut history[k]);
                history[k] = if rng.random_bool(0.5) {
                    mutate::flip_bit(rng, update)
                } else {
                    mutate::mutate(rng, update)
                };
            }
            history
        }
        Target::StateVectors => {
            let mut history = traffic::history(rng);
            let doc = Doc::new();
            for u in &history {
                apply_unchecked(&doc, u);
            }
            let sv = doc.transact().state_vector().encode_v1();
            history.push(mutate::mutate(rng, sv));
            history
        }
        Target::Frames => {
            let frame = valid_frame(rng);
            vec![mutate::mutate(rng, frame)]
        }
        Target::Awareness => {
            let body = valid_awareness(rng);
            vec![mutate::mutate(rng, body)]
        }
        Target::Envelopes => envelope::build(rng),
        Target::Admin => admin::build(rng),
        Target::Auth => auth::build(rng),
        Target::Import => import::build(rng),
    }
}

/// Runs an input (also the replay of a regression file).
pub fn feed(target: Target, input: &[Vec<u8>]) -> Outcome {
    let mut out = Outcome::default();
    match target {
        Target::Updates => feed_updates(input, &mut out),
        Target::Stored => feed_stored(input, &mut out),
        Target::StateVectors => feed_state_vector(input, &mut out),
        Target::Frames => {
            for frame in input {
                feed_frame(frame, &mut out);
            }
        }
        Target::Awareness => {
            for body in input {
                feed_awareness(body, &mut out);
            }
        }
        Target::Envelopes => envelope::feed(input, &mut out),
        Target::Admin => admin::feed(input, &mut out),
        Target::Auth => auth::feed(input, &mut out),
        Target::Import => import::feed(input, &mut out),
    }
    out
}

/// The document task's path for client updates.
fn feed_updates(input: &[Vec<u8>], out: &mut Outcome) {
    let limits = ScanLimits::default();
    let doc = Doc::new();
    for bytes in input {
        let Ok(scan) = scan_update(bytes, &limits) else {
            out.refused += 1;
            continue;
        };
        // the read-only answer is computed from the scan alone
        let _ = catch_unwind(AssertUnwindSafe(|| {
            contains_scanned(&doc.transact(), &scan)
        }));
        if scan.missing(known_clocks(&doc.transact())).is_some() {
            out.refused += 1;
            continue;
        }
        let Ok(update) = decode_scanned(bytes, &scan) else {
            out.refused += 1;
            continue;
        };
        match catch_unwind(AssertUnwindSafe(|| doc.transact_mut().apply_update(update))) {
            Ok(Ok(())) => out.accepted += 1,
            Ok(Err(_)) => out.refused += 1,
            Err(_) => {
                // the server drops the document and reloads it from storage
                out.caught_panics += 1;
                return;
            }
        }
    }
    check_reloadable(&doc, out);
}

/// The load path: snapshot and log rows from the database.
fn feed_stored(input: &[Vec<u8>], out: &mut Outcome) {
    let limits = ScanLimits {
        max_structs: u32::MAX,
        max_delete_ranges: u32::MAX,
        ..ScanLimits::default()
    };
    let doc = Doc::new();
    for bytes in input {
        let applied = decode_guarded(bytes, &limits)
            .map(|u| catch_unwind(AssertUnwindSafe(|| doc.transact_mut().apply_update(u))));
        match applied {
            Err(_) | Ok(Ok(Err(_))) => {
                // the server refuses to serve a document whose stored state does not apply
                out.refused += 1;
                return;
            }
            Ok(Err(_)) => {
                out.caught_panics += 1;
                return;
            }
            Ok(Ok(Ok(()))) => out.accepted += 1,
        }
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        let txn = doc.transact();
        (
            txn.state_vector(),
            txn.encode_state_as_update_v1(&StateVector::default()),
        )
    }));
}

fn feed_state_vector(input: &[Vec<u8>], out: &mut Outcome) {
    let Some((sv, history)) = input.split_last() else {
        return;
    };
    let doc = Doc::new();
    for u in history {
        apply_unchecked(&doc, u);
    }
    match decode_state_vector(sv) {
        Err(_) => out.refused += 1,
        Ok(sv) => {
            out.accepted += 1;
            if catch_unwind(AssertUnwindSafe(|| {
                doc.transact().encode_state_as_update_v1(&sv)
            }))
            .is_err()
            {
                out.caught_panics += 1;
            }
        }
    }
}

fn feed_frame(frame: &[u8], out: &mut Outcome) {
    let bytes = Bytes::copy_from_slice(frame);
    match decode_client_frame(bytes.clone()) {
        Ok(_) => out.accepted += 1,
        Err(_) => out.refused += 1,
    }
    match decode_yws_frame(bytes) {
        Ok(_) => out.accepted += 1,
        Err(_) => out.refused += 1,
    }
}

fn feed_awareness(body: &[u8], out: &mut Outcome) {
    match awareness::decode_update(Bytes::copy_from_slice(body), 64 << 10) {
        Ok(entries) => {
            out.accepted += 1;
            for e in entries {
                if let Some(state) = e.state
                    && serde_json::from_str::<serde::de::IgnoredAny>(&state).is_err()
                {
                    out.violation = Some(format!("accepted a state that is not JSON: {state:?}"));
                }
            }
        }
        Err(_) => out.refused += 1,
    }
}

/// A document the server accepted updates into must store a state that loads again: the
/// compaction writes `encode_state_as_update_v1` and the next load reads it back through the
/// same guard.
pub(super) fn check_reloadable(doc: &Doc, out: &mut Outcome) {
    let encoded = catch_unwind(AssertUnwindSafe(|| {
        doc.transact()
            .encode_state_as_update_v1(&StateVector::default())
    }));
    let Ok(state) = encoded else {
        out.caught_panics += 1;
        return;
    };
    let limits = ScanLimits {
        max_structs: u32::MAX,
        max_delete_ranges: u32::MAX,
        ..ScanLimits::default()
    };
    let fresh = Doc::new();
    let reloaded = decode_guarded(&state, &limits)
        .map(|u| catch_unwind(AssertUnwindSafe(|| fresh.transact_mut().apply_update(u))));
    match reloaded {
        Ok(Ok(Ok(()))) => {
            let (a, b) = (
                doc.transact().state_vector(),
                fresh.transact().state_vector(),
            );
            if a != b {
                // yrs can integrate a crafted block differently from how it re-encodes it;
                // counted, not failed: the reloaded state is what the server serves from then on
                out.reload_mismatches += 1;
            }
        }
        other => {
            out.violation = Some(format!(
                "the stored state of an accepted document does not reload: {:?}",
                other.map(|r| r.map(|r| r.map_err(|e| e.to_string())))
            ));
        }
    }
}

pub(super) fn apply_unchecked(doc: &Doc, bytes: &[u8]) {
    if let Ok(u) = decode_guarded(bytes, &ScanLimits::default()) {
        let _ = catch_unwind(AssertUnwindSafe(|| doc.transact_mut().apply_update(u)));
    }
}

fn valid_frame(rng: &mut StdRng) -> Vec<u8> {
    let mut f = Vec::new();
    let names = ["doc", "org/1/page", "a:b", "émoji-😀"];
    f.write_var_string(names[rng.random_range(0..names.len())]);
    let history = traffic::history(rng);
    let update = history.first().cloned().unwrap_or_else(|| vec![0, 0]);
    match rng.random_range(0..7) {
        // Auth: type, token, version? (v2: no version)
        0 => {
            f.write_var_uint(2);
            f.write_var_uint(0);
            f.write_var_string("token-abc");
            if rng.random_bool(0.5) {
                f.write_var_string("4.0.0");
            }
        }
        // Sync step1 / step2 / update
        1 => {
            f.write_var_uint(0);
            f.write_var_uint(0);
            f.write_var_bytes(&[1, 7, 3]);
        }
        2 | 3 => {
            f.write_var_uint(0);
            f.write_var_uint(rng.random_range(1..=2));
            f.write_var_bytes(&update);
        }
        4 => {
            f.write_var_uint(1);
            f.write_var_bytes(&valid_awareness(rng));
        }
        5 => {
            f.write_var_uint(5);
            f.write_var_string(r#"{"type":"ping","n":1}"#);
        }
        _ => {
            f.write_var_uint(rng.random_range(3..=9));
        }
    }
    f
}

fn valid_awareness(rng: &mut StdRng) -> Vec<u8> {
    let n = rng.random_range(1..4);
    let mut b = Vec::new();
    b.write_var_uint(n);
    for i in 0..n {
        b.write_var_uint(rng.random_range(1..1u64 << 32));
        b.write_var_uint(i + 1);
        let state = match rng.random_range(0..3) {
            0 => "null".to_owned(),
            1 => {
                r##"{"user":{"name":"Ada","color":"#ff0"},"cursor":{"anchor":3,"head":5}}"##.into()
            }
            _ => format!(r#"{{"n":{},"list":[1,2,[3,[4]]]}}"#, rng.random::<u16>()),
        };
        b.write_var_string(&state);
    }
    b
}
