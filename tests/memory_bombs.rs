//! Length bombs must not amplify memory: a few bytes declaring 2^16 ..
//! 2^28 entries in a state vector, an update (client groups, blocks, delete set) or an awareness
//! update. yrs pre-reserves from such counts; the `hearth` binary defends with
//! [`hearth::alloc::CappedAllocator`], which this test binary installs too, so the numbers are
//! those of the shipped server.
//!
//! Measured as the process's peak RSS (`VmHWM`, reset through `/proc/self/clear_refs`), so this
//! file holds a single test: nothing else runs in this process meanwhile. Linux only; skipped
//! where `/proc/self/clear_refs` is not writable.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use hearth::protocol::lib0::Writer;

#[global_allocator]
static ALLOCATOR: hearth::alloc::CappedAllocator = hearth::alloc::CappedAllocator::new();

/// Largest acceptable transient peak-RSS growth caused by one bomb frame.
const LIMIT_MIB: u64 = 64;

fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Sends `frame` on an established connection; returns the peak RSS growth (MiB) it caused.
/// The caller's last round trip has finished the previous frame's work.
async fn growth_mib(c: &mut RawClient, doc: &str, frame: Vec<u8>) -> u64 {
    assert!(reset_peak(), "cannot reset VmHWM");
    let base = status_kib("VmRSS:").unwrap();
    c.send(frame).await;
    // a round trip after it: the bomb has been processed
    c.fetch_state(doc).await;
    status_kib("VmHWM:").unwrap().saturating_sub(base) / 1024
}

fn varint(v: u64) -> Vec<u8> {
    let mut b = Vec::new();
    b.write_var_uint(v);
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn length_bombs_do_not_amplify_memory() {
    if status_kib("VmHWM:").is_none() || !reset_peak() {
        eprintln!("no /proc/self/status or clear_refs: skipped");
        return;
    }
    let s = start(test_config()).await;
    let mut c = RawClient::connect(s.addr).await;
    c.join("mem-bomb").await;
    let doc = "mem-bomb";
    let mut report = Vec::new();
    for k in [16u32, 20, 22, 23, 24, 25, 26, 28] {
        let n = varint(1 << k);
        let cases = [
            ("sv", step1(doc, &n)),
            ("update-clients", update(doc, &n)),
            (
                "update-blocks",
                update(doc, &[&[0x01][..], &n, &[0x05, 0x00]].concat()),
            ),
            ("delete-set", update(doc, &[&[0x00][..], &n].concat())),
            ("awareness", awareness_raw(doc, &n)),
        ];
        for (what, frame) in cases {
            let mib = growth_mib(&mut c, doc, frame).await;
            report.push((what, k, mib));
        }
    }
    eprintln!("peak RSS growth (kind, log2 declared count, MiB): {report:?}");
    let worst = report.iter().max_by_key(|r| r.2).unwrap();
    assert!(
        worst.2 < LIMIT_MIB,
        "a {}-byte frame grew the peak RSS by {} MiB ({worst:?}); all: {report:?}",
        step1(doc, &varint(1 << worst.1)).len(),
        worst.2
    );
    // the document and the server survived
    c.edit(doc, &YDoc::new(1).insert("alive")).await;
    s.stop().await;
}
