//! Guarded decoding of Yjs updates from untrusted clients and storage.
//!
//! Every update is first walked by the iterative [`scan`](super::scan) (depth, counts and
//! ranges bounded, nothing recursive), and only then handed to yrs. yrs 0.28 can accept a rare
//! bit-flipped update into its pending set in a form that makes every later
//! `encode_state_as_update` panic, so the guard also decodes, re-encodes and decodes again; an
//! update that does not survive the round trip is refused before it can touch a document. All
//! of it runs under `catch_unwind`, so a decoder panic is an error, not a crash.

use std::panic::{AssertUnwindSafe, catch_unwind};

use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{ClientID, ID, IdSet, ReadTxn, StateVector, Update};

use super::scan::{ScanError, ScanLimits, UpdateScan, scan_update};

/// Why an update was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpdateError {
    /// The structural scan refused it (malformed, too deep or too large).
    #[error(transparent)]
    Scan(#[from] ScanError),
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

/// Scans, then decodes a v1 update and checks it round-trips.
pub fn decode_guarded(bytes: &[u8], limits: &ScanLimits) -> Result<Update, UpdateError> {
    let scan = scan_update(bytes, limits)?;
    decode_scanned(bytes, &scan)
}

/// Decodes a v1 update that [`scan_update`] accepted (`scan` is its result) and checks it
/// round-trips.
pub fn decode_scanned(bytes: &[u8], scan: &UpdateScan) -> Result<Update, UpdateError> {
    if scan.len() != bytes.len() {
        return Err(UpdateError::Decode("scan of other bytes".into()));
    }
    catch_unwind(AssertUnwindSafe(|| {
        let update = Update::decode_v1(bytes).map_err(|e| UpdateError::Decode(e.to_string()))?;
        let again = update.encode_v1();
        Update::decode_v1(&again).map_err(|_| UpdateError::RoundTrip)?;
        Ok(update)
    }))
    .unwrap_or(Err(UpdateError::Panic))
}

/// Decodes `bytes` with [`decode_guarded`] and applies it to `doc`, with a panic in yrs turned
/// into an error: how stored state, and anything else read from outside, enters a document.
pub fn apply_guarded(doc: &yrs::Doc, bytes: &[u8], limits: &ScanLimits) -> Result<(), String> {
    use yrs::Transact;
    let update = decode_guarded(bytes, limits).map_err(|e| e.to_string())?;
    catch_unwind(AssertUnwindSafe(|| {
        doc.transact_mut()
            .apply_update(update)
            .map_err(|e| e.to_string())
    }))
    .unwrap_or_else(|_| Err("panic while applying".into()))
}

/// Decodes a state vector from a client's step1.
pub fn decode_state_vector(bytes: &[u8]) -> Result<StateVector, UpdateError> {
    catch_unwind(AssertUnwindSafe(|| {
        StateVector::decode_v1(bytes).map_err(|e| UpdateError::Decode(e.to_string()))
    }))
    .unwrap_or(Err(UpdateError::Panic))
}

/// The next clock the document behind `txn` expects from each client, as a lookup.
pub fn known_clocks<T: ReadTxn>(txn: &T) -> impl Fn(u64) -> u32 + '_ {
    let store = txn.store();
    move |c| store.get_clock(&ClientID::new(c))
}

/// Yjs's `snapshotContainsUpdate` from a scan alone: true when the document behind `txn`
/// already has every insertion and deletion of the update (answers a read-only client's
/// step2 without decoding it).
pub fn contains_scanned<T: ReadTxn>(txn: &T, scan: &UpdateScan) -> bool {
    if !scan.inserts_known(known_clocks(txn)) {
        return false;
    }
    let mut deletes = IdSet::new();
    let mut any = false;
    for (client, clock, len) in scan.deletes() {
        deletes.insert(ID::new(ClientID::new(client), clock), len);
        any = true;
    }
    if !any {
        return true;
    }
    let snapshot = txn.snapshot();
    deletes.diff(&snapshot.delete_set).is_empty()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use yrs::{Doc, GetString, Text, Transact};

    fn scan(bytes: &[u8]) -> UpdateScan {
        scan_update(bytes, &ScanLimits::default()).unwrap()
    }

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
        let l = ScanLimits::default();
        assert!(decode_guarded(&u, &l).is_ok());
        assert!(decode_guarded(&[0, 0], &l).is_ok(), "empty update");
        assert!(decode_guarded(&[0xff, 0xff, 0xff], &l).is_err());
        for cut in 1..u.len() {
            assert!(decode_guarded(&u[..cut], &l).is_err(), "truncated at {cut}");
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
        assert!(contains_scanned(&txn, &scan(&u1)));
        assert!(contains_scanned(&txn, &scan(&[0, 0])));
        drop(txn);
        let u2 = text_update(&client, "d");
        assert!(!contains_scanned(&server.transact(), &scan(&u2)));
        // a deletion the server lacks
        let t = client.get_or_insert_text("t");
        let del = {
            let mut txn = client.transact_mut();
            t.remove_range(&mut txn, 0, 1);
            txn.encode_update_v1()
        };
        assert!(!contains_scanned(&server.transact(), &scan(&del)));
        server
            .transact_mut()
            .apply_update(Update::decode_v1(&u2).unwrap())
            .unwrap();
        server
            .transact_mut()
            .apply_update(Update::decode_v1(&del).unwrap())
            .unwrap();
        assert!(contains_scanned(&server.transact(), &scan(&del)));
        assert_eq!(
            server
                .get_or_insert_text("t")
                .get_string(&server.transact()),
            "bcd"
        );
    }
}
