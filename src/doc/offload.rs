//! CPU-heavy yrs work of a document task, run where it cannot starve the async workers.
//!
//! Applying a large client update, or encoding a large state (the step2 answering a sync
//! request, a snapshot), takes long enough to hold up everything else scheduled on the same
//! tokio worker: other documents and sockets, the cluster's inbox dispatcher, lock refreshes and
//! keepalives. Work over [`INLINE_MAX`] bytes therefore runs on tokio's blocking pool, on a clone
//! of the `yrs::Doc` (a handle to the same document). The document task awaits it before it
//! handles anything else, so it stays the only writer of its document, and no transaction lives
//! across an `.await`: the blocking closure opens and drops its own. Smaller work stays inline,
//! where it costs less than the hop. Either way the yrs call runs under `catch_unwind`.
//!
//! At most [`heavy_permits`] such jobs run at once in the process (half the cores, at least
//! one), so large documents cannot occupy every core either; a document task waits for a permit
//! like for any other resource.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::LazyLock;

use tokio::sync::Semaphore;
use yrs::updates::encoder::Encode;
use yrs::{Doc, ReadTxn, StateVector, Transact, Update};

/// Work on more bytes than this (an update's encoded size, a document's size) leaves the async
/// workers.
pub(crate) const INLINE_MAX: usize = 64 << 10;

/// Permits for heavy jobs running at once.
static HEAVY: LazyLock<Semaphore> = LazyLock::new(|| Semaphore::new(heavy_permits()));

/// How many heavy jobs may run at once: half the available cores, at least one.
pub(crate) fn heavy_permits() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// A yrs call panicked (or its blocking task was cancelled by a runtime shutdown): the document's
/// in-memory state can no longer be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Panicked;

/// Runs `f` under `catch_unwind`: inline, or when `heavy` on the blocking pool.
async fn run<T, F>(heavy: bool, f: F) -> Result<T, Panicked>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    if !heavy {
        return catch_unwind(AssertUnwindSafe(f)).map_err(|_| Panicked);
    }
    // The semaphore is never closed; a failed acquire would only mean running unthrottled.
    let _permit = HEAVY.acquire().await.ok();
    match tokio::task::spawn_blocking(move || catch_unwind(AssertUnwindSafe(f))).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(_)) | Err(_) => Err(Panicked),
    }
}

/// Applies a decoded client update of `encoded_len` bytes to `doc` in a transaction of its own.
pub(crate) async fn apply_update(
    doc: &Doc,
    update: Update,
    encoded_len: usize,
) -> Result<Result<(), yrs::error::UpdateError>, Panicked> {
    let doc = doc.clone();
    run(encoded_len > INLINE_MAX, move || {
        doc.transact_mut().apply_update(update)
    })
    .await
}

/// The answer to a sync step1 carrying `sv`, from a document of about `doc_size` bytes: the
/// document's state vector and everything it has that `sv` lacks (v1 encodings).
pub(crate) async fn sync_answer(
    doc: &Doc,
    sv: StateVector,
    doc_size: usize,
) -> Result<(Vec<u8>, Vec<u8>), Panicked> {
    let doc = doc.clone();
    run(doc_size > INLINE_MAX, move || {
        let txn = doc.transact();
        (
            txn.state_vector().encode_v1(),
            txn.encode_state_as_update_v1(&sv),
        )
    })
    .await
}

/// The whole state of a document of about `doc_size` bytes, as one v1 update (a snapshot).
pub(crate) async fn encode_state(doc: &Doc, doc_size: usize) -> Result<Vec<u8>, Panicked> {
    let doc = doc.clone();
    run(doc_size > INLINE_MAX, move || {
        doc.transact()
            .encode_state_as_update_v1(&StateVector::default())
    })
    .await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use yrs::updates::decoder::Decode;
    use yrs::{GetString, Text};

    fn text_update(client: u64, s: &str) -> Vec<u8> {
        let d = Doc::with_client_id(client);
        let t = d.get_or_insert_text("t");
        t.insert(&mut d.transact_mut(), 0, s);
        d.transact()
            .encode_state_as_update_v1(&StateVector::default())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_and_small_work_reach_the_same_document() {
        let doc = Doc::with_client_id(1);
        let text = doc.get_or_insert_text("t");
        let big = "x".repeat(INLINE_MAX * 2);
        for (client, s) in [(2, "small"), (3, big.as_str())] {
            let bytes = text_update(client, s);
            let update = Update::decode_v1(&bytes).unwrap();
            apply_update(&doc, update, bytes.len())
                .await
                .unwrap()
                .unwrap();
        }
        assert_eq!(text.get_string(&doc.transact()).len(), big.len() + 5);
        let (sv, diff) = sync_answer(&doc, StateVector::default(), INLINE_MAX + 1)
            .await
            .unwrap();
        assert_eq!(sv, doc.transact().state_vector().encode_v1());
        let state = encode_state(&doc, 0).await.unwrap();
        assert_eq!(diff, state);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_is_reported_not_propagated() {
        assert_eq!(run(true, || panic!("boom")).await, Err::<(), _>(Panicked));
        assert_eq!(run(false, || panic!("boom")).await, Err::<(), _>(Panicked));
        assert_eq!(run(true, || 7).await, Ok(7));
    }
}
