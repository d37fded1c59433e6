//! [`CappedAllocator`]: the process's allocator, with a ceiling on any *single* allocation.
//!
//! Why: yrs 0.28 pre-reserves collections from counts declared in client bytes
//! (`try_reserve(declared_len)`). With Linux overcommit a 5-byte update can reserve 21 GB and
//! touch ~0.5 GB. Refusing any single allocation above the cap makes
//! those `try_reserve` calls fail, so decoding returns an error instead of eating memory. A
//! legitimate allocation above the cap would abort the process, so the cap must exceed the
//! largest buffer Hearth ever needs (documents are bounded far below the default 1 GiB).
//! The binary installs it as the global allocator; [`set_cap`] changes the cap at start-up
//! ([`crate::cli::run`] sets it from `max_allocation_bytes`). An application embedding Hearth
//! installs it the same way in its own `main.rs`:
//!
//! ```no_run
//! #[global_allocator]
//! static ALLOCATOR: hearth::alloc::CappedAllocator = hearth::alloc::CappedAllocator::new();
//! ```
//!
//! Underneath, allocations go to jemalloc (the `jemalloc` feature, on by default) or, without
//! it, to the system allocator. jemalloc packs small objects in size-class slabs with no
//! per-object header, which is what an idle socket is made of: with it an idle connection holds
//! about 4 % less resident memory than with glibc's malloc, and a delivery spends a little less
//! time allocating (docs/benchmarks.md, "Allocating through jemalloc"). Its run-time settings
//! are read from `_RJEM_MALLOC_CONF` (jemalloc's `MALLOC_CONF` syntax).

#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};

#[cfg(not(feature = "jemalloc"))]
use std::alloc::System as Inner;
use std::sync::atomic::{AtomicUsize, Ordering};
#[cfg(feature = "jemalloc")]
use tikv_jemallocator::Jemalloc as Inner;

/// The default ceiling for one allocation: 1 GiB.
pub const DEFAULT_CAP: usize = 1 << 30;

/// The smallest cap [`set_cap`] accepts: 64 MiB.
pub const MIN_CAP: usize = 64 << 20;

/// The cap of every [`CappedAllocator`] in the process.
static CAP: AtomicUsize = AtomicUsize::new(DEFAULT_CAP);

/// Changes the cap of the process's [`CappedAllocator`] (call once at start-up; values below
/// [`MIN_CAP`] are raised to it). Has no effect on allocations when the binary installed another
/// global allocator.
pub fn set_cap(bytes: usize) {
    CAP.store(bytes.max(MIN_CAP), Ordering::Relaxed);
}

/// A [`GlobalAlloc`] that refuses single allocations larger than the cap ([`set_cap`]).
#[derive(Debug)]
pub struct CappedAllocator(());

impl CappedAllocator {
    /// The allocator; its cap is [`DEFAULT_CAP`] until [`set_cap`].
    pub const fn new() -> Self {
        Self(())
    }

    fn allowed(&self, size: usize) -> bool {
        size <= CAP.load(Ordering::Relaxed)
    }
}

impl Default for CappedAllocator {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: every method forwards to the underlying allocator (`Inner`) with the caller's layout
// unchanged, or returns null, which `GlobalAlloc` permits to signal allocation failure.
unsafe impl GlobalAlloc for CappedAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if self.allowed(layout.size()) {
            // SAFETY: forwarded contract.
            unsafe { Inner.alloc(layout) }
        } else {
            std::ptr::null_mut()
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if self.allowed(layout.size()) {
            // SAFETY: forwarded contract.
            unsafe { Inner.alloc_zeroed(layout) }
        } else {
            std::ptr::null_mut()
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { Inner.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if self.allowed(new_size) {
            // SAFETY: forwarded contract.
            unsafe { Inner.realloc(ptr, layout, new_size) }
        } else {
            std::ptr::null_mut()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_below_the_cap_and_refuses_above_it() {
        let allocator = CappedAllocator::new();
        let small = Layout::from_size_align(100, 8).unwrap_or_else(|e| panic!("{e}"));
        // SAFETY: `small` has a non-zero size; the pointer is freed with the same layout.
        unsafe {
            let ptr = allocator.alloc(small);
            assert!(!ptr.is_null());
            #[cfg(feature = "jemalloc")]
            assert!(
                tikv_jemallocator::usable_size(ptr) >= 100,
                "the block comes from jemalloc"
            );
            let grown = allocator.realloc(ptr, small, 4096);
            assert!(!grown.is_null());
            allocator.dealloc(grown, Layout::from_size_align_unchecked(4096, 8));
        }
        let too_big = Layout::from_size_align(CAP.load(Ordering::Relaxed) + 1, 8)
            .unwrap_or_else(|e| panic!("{e}"));
        // SAFETY: a refused allocation returns null and nothing is freed.
        unsafe {
            assert!(allocator.alloc(too_big).is_null());
            assert!(allocator.alloc_zeroed(too_big).is_null());
        }
    }
}
