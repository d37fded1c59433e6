//! The import target: what `hearth import` reads from outside. A case is a document's state
//! from an editor history, encoded as a Yjs v1 or v2 update and then maybe mutated (as a row of
//! a Hocuspocus table or an update file holds it), and a file name to decode into a document
//! name; each goes through the function the import uses.

use rand::Rng;
use rand::rngs::StdRng;
use yrs::updates::decoder::Decode;
use yrs::{Doc, ReadTxn, StateVector, Transact, Update};

use super::targets::Outcome;
use super::{mutate, traffic};

/// Builds a case: the update bytes and a file stem.
pub fn build(rng: &mut StdRng) -> Vec<Vec<u8>> {
    let doc = Doc::new();
    for u in traffic::history(rng) {
        if let Ok(update) = Update::decode_v1(&u) {
            let _ = doc.transact_mut().apply_update(update);
        }
    }
    let txn = doc.transact();
    let mut state = if rng.random_bool(0.5) {
        txn.encode_state_as_update_v1(&StateVector::default())
    } else {
        txn.encode_state_as_update_v2(&StateVector::default())
    };
    drop(txn);
    if rng.random_bool(0.7) {
        state = mutate::mutate(rng, state);
    }
    let stems = [
        "plain",
        "a%2Fb",
        "%F0%9F%94%A5",
        "bad%2",
        "%zz",
        "%FF%FE",
        "%00",
    ];
    let mut stem = stems[rng.random_range(0..stems.len())].as_bytes().to_vec();
    if rng.random_bool(0.3) {
        stem = mutate::mutate(rng, stem);
    }
    vec![state, stem]
}

/// Runs a case: the update is checked as the import checks it, and an accepted one must
/// apply.
pub fn feed(input: &[Vec<u8>], out: &mut Outcome) {
    let [state, stem] = input else {
        return;
    };
    let limits = hearth::protocol::scan::ScanLimits::default();
    match hearth::transfer::check_update(state, &limits) {
        Ok(()) => {
            // an update that decodes may still not apply (a parent of the wrong kind): the
            // import reports that document as failed; what must not happen is a panic
            let doc = Doc::new();
            match hearth::protocol::update::apply_guarded(&doc, state, &limits) {
                Ok(()) => out.accepted += 1,
                Err(e) if e.contains("panic") => out.caught_panics += 1,
                Err(_) => out.refused += 1,
            }
            // what export writes back must be accepted again
            let again = doc
                .transact()
                .encode_state_as_update_v1(&StateVector::default());
            if !doc.transact().has_missing_updates()
                && hearth::transfer::check_update(&again, &limits).is_err()
            {
                out.violation = Some("an exported state is refused by import".into());
            }
        }
        Err(_) => out.refused += 1,
    }
    let stem = String::from_utf8_lossy(stem);
    if let Ok(name) = hearth::transfer::files::decode_name(&stem)
        && hearth::transfer::files::decode_name(&hearth::transfer::files::encode_name(&name))
            .as_deref()
            != Ok(name.as_str())
    {
        out.violation = Some(format!("file name of {name:?} does not round-trip"));
    }
}
