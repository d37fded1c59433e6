//! A deterministic, realistically fragmented Yjs document of a given encoded size, for the
//! cold-load scenario: three authors typing words at cursor positions in a shared text, with
//! some deletions, plus a comments array and a metadata map. The result is one v1 update.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use yrs::updates::decoder::Decode;
use yrs::{Array, Doc, Map, ReadTxn, StateVector, Text, Transact, Update};

const WORDS: &[&str] = &[
    "the",
    "server",
    "document",
    "update",
    "awareness",
    "client",
    "sync",
    "latency",
    "owner",
    "replica",
    "cursor",
    "paragraph",
    "review",
    "merge",
    "offline",
    "collaborate",
    "note",
    "draft",
    "table",
    "heading",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
];

/// A generated document.
#[derive(Debug, Clone)]
pub struct Generated {
    /// The whole document as one v1 update.
    pub update: Vec<u8>,
    /// Length of the text `"content"` (ASCII, so bytes = clock units).
    pub text_len: u32,
    /// Number of separate edits made.
    pub edits: usize,
}

/// Builds a document whose v1 encoding is at least `target_bytes`.
pub fn generate(target_bytes: usize, seed: u64) -> Generated {
    let mut rng = StdRng::seed_from_u64(seed);
    let authors: Vec<Doc> = (0..3u64).map(|i| Doc::with_client_id(1000 + i)).collect();
    // root types must be fetched outside a transaction (yrs would deadlock)
    let roots: Vec<_> = authors
        .iter()
        .map(|d| {
            (
                d.get_or_insert_text("content"),
                d.get_or_insert_array("comments"),
                d.get_or_insert_map("meta"),
            )
        })
        .collect();
    let mut edits = 0usize;
    let mut cursor = [0u32; 3];
    loop {
        for _ in 0..300 {
            let a = rng.random_range(0..authors.len());
            let doc = &authors[a];
            let (text, comments, meta) = &roots[a];
            let mut txn = doc.transact_mut();
            let len = text.len(&txn);
            if rng.random_bool(0.1) && len > 64 {
                // delete a short range somewhere
                let at = rng.random_range(0..len - 32);
                text.remove_range(&mut txn, at, rng.random_range(1..32));
            } else if rng.random_bool(0.02) {
                let n = comments.len(&txn);
                comments.insert(&mut txn, n, format!("comment {edits} by author {a}"));
            } else if rng.random_bool(0.01) {
                meta.insert(&mut txn, format!("k{}", edits % 50), edits as f64);
            } else {
                // type a sentence at this author's cursor (moved at random now and then)
                if rng.random_bool(0.2) || cursor[a] > len {
                    cursor[a] = rng.random_range(0..=len);
                }
                let mut s = String::new();
                for _ in 0..rng.random_range(3..14) {
                    s.push_str(WORDS[rng.random_range(0..WORDS.len())]);
                    s.push(' ');
                }
                text.insert(&mut txn, cursor[a], &s);
                cursor[a] += s.len() as u32;
            }
            edits += 1;
        }
        // exchange updates between the authors (they collaborate)
        for i in 0..authors.len() {
            for j in 0..authors.len() {
                if i == j {
                    continue;
                }
                let sv = authors[j].transact().state_vector();
                let diff = authors[i].transact().encode_state_as_update_v1(&sv);
                if let Ok(u) = Update::decode_v1(&diff) {
                    let _ = authors[j].transact_mut().apply_update(u);
                }
            }
        }
        let update = authors[0]
            .transact()
            .encode_state_as_update_v1(&StateVector::default());
        if update.len() >= target_bytes {
            let text_len = roots[0].0.len(&authors[0].transact());
            return Generated {
                update,
                text_len,
                edits,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_at_least_the_target_and_is_deterministic() {
        let a = generate(20_000, 7);
        let b = generate(20_000, 7);
        assert!(a.update.len() >= 20_000);
        assert_eq!(a.update, b.update);
        assert!(a.text_len > 0 && a.edits > 100);
        let doc = Doc::new();
        let u = Update::decode_v1(&a.update).expect("decodes");
        doc.transact_mut().apply_update(u).expect("applies");
        let text = doc.get_or_insert_text("content");
        assert_eq!(text.len(&doc.transact()), a.text_len);
    }
}
