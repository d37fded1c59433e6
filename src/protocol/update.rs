//! Guarded decoding of Yjs updates from untrusted clients.
//!
//! yrs 0.28 (rust-stack.md §5) can accept a rare bit-flipped update into its pending set in a
//! form that makes every later `encode_state_as_update` panic. The guard decodes, re-encodes and
//! decodes again; an update that does not survive the round trip is refused before it can touch
//! a document. All of it runs under `catch_unwind`, so a decoder panic is an error, not a crash.

use std::panic::{AssertUnwindSafe, catch_unwind};

use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{ReadTxn, StateVector, Update};

/// Why a client update was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpdateError {
    /// yrs could not decode it.
    #[error("invalid update: {0}")]
    Decode(String),
    /// It decoded but did not survive a re-encode (would poison the document).
    #[error("update does not round-trip")]
    RoundTrip,
    /// yrs panicked while decoding it.
    #[error("decoder panicked")]
    Panic,
}

/// Decodes a v1 update and checks it round-trips.
pub fn decode_guarded(bytes: &[u8]) -> Result<Update, UpdateError> {
    catch_unwind(AssertUnwindSafe(|| {
        let update = Update::decode_v1(bytes).map_err(|e| UpdateError::Decode(e.to_string()))?;
        let again = update.encode_v1();
        Update::decode_v1(&again).map_err(|_| UpdateError::RoundTrip)?;
        Ok(update)
    }))
    .unwrap_or(Err(UpdateError::Panic))
}

/// Decodes a state vector from a client's step1.
pub fn decode_state_vector(bytes: &[u8]) -> Result<StateVector, UpdateError> {
    catch_unwind(AssertUnwindSafe(|| {
        StateVector::decode_v1(bytes).map_err(|e| UpdateError::Decode(e.to_string()))
    }))
    .unwrap_or(Err(UpdateError::Panic))
}

/// Yjs's `snapshotContainsUpdate`: true when the document behind `txn` already has every
/// insertion and deletion of `update` (used to answer a read-only client's step2).
pub fn contains_update<T: ReadTxn>(txn: &T, update: &Update) -> bool {
    let sv = txn.state_vector();
    let inserted_ok = update
        .insertions(true)
        .iter()
        .all(|(client, ranges)| ranges.iter().all(|r| r.end <= sv.get(client)));
    if !inserted_ok {
        return false;
    }
    if update.delete_set().is_empty() {
        return true;
    }
    let snapshot = txn.snapshot();
    update.delete_set().diff(&snapshot.delete_set).is_empty()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use yrs::{Doc, GetString, Text, Transact};

    fn text_update(doc: &Doc, s: &str) -> Vec<u8> {
        let t = doc.get_or_insert_text("t");
        let mut txn = doc.transact_mut();
        t.push(&mut txn, s);
        txn.encode_update_v1()
    }

    #[test]
    fn valid_updates_pass_and_garbage_fails() {
        let doc = Doc::new();
        let u = text_update(&doc, "hello");
        assert!(decode_guarded(&u).is_ok());
        assert!(decode_guarded(&[0, 0]).is_ok(), "empty update");
        assert!(decode_guarded(&[0xff, 0xff, 0xff]).is_err());
        for cut in 1..u.len() {
            assert!(decode_guarded(&u[..cut]).is_err(), "truncated at {cut}");
        }
    }

    #[test]
    fn contains_update_matches_yjs_semantics() {
        let server = Doc::new();
        let client = Doc::with_client_id(77);
        let u1 = text_update(&client, "abc");
        server
            .transact_mut()
            .apply_update(Update::decode_v1(&u1).unwrap())
            .unwrap();
        let txn = server.transact();
        assert!(contains_update(&txn, &Update::decode_v1(&u1).unwrap()));
        assert!(contains_update(&txn, &Update::decode_v1(&[0, 0]).unwrap()));
        drop(txn);
        let u2 = text_update(&client, "d");
        assert!(!contains_update(
            &server.transact(),
            &Update::decode_v1(&u2).unwrap()
        ));
        // a deletion the server lacks
        let t = client.get_or_insert_text("t");
        let del = {
            let mut txn = client.transact_mut();
            t.remove_range(&mut txn, 0, 1);
            txn.encode_update_v1()
        };
        assert!(!contains_update(
            &server.transact(),
            &Update::decode_v1(&del).unwrap()
        ));
        server
            .transact_mut()
            .apply_update(Update::decode_v1(&u2).unwrap())
            .unwrap();
        server
            .transact_mut()
            .apply_update(Update::decode_v1(&del).unwrap())
            .unwrap();
        assert!(contains_update(
            &server.transact(),
            &Update::decode_v1(&del).unwrap()
        ));
        assert_eq!(
            server
                .get_or_insert_text("t")
                .get_string(&server.transact()),
            "bcd"
        );
    }
}
