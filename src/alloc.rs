//! [`CappedAllocator`]: the system allocator with a ceiling on any *single* allocation.
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

#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

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

// SAFETY: every method forwards to `System` with the caller's layout unchanged, or returns null,
// which `GlobalAlloc` permits to signal allocation failure.
unsafe impl GlobalAlloc for CappedAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if self.allowed(layout.size()) {
            // SAFETY: forwarded contract.
            unsafe { System.alloc(layout) }
        } else {
            std::ptr::null_mut()
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if self.allowed(layout.size()) {
            // SAFETY: forwarded contract.
            unsafe { System.alloc_zeroed(layout) }
        } else {
            std::ptr::null_mut()
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if self.allowed(new_size) {
            // SAFETY: forwarded contract.
            unsafe { System.realloc(ptr, layout, new_size) }
        } else {
            std::ptr::null_mut()
        }
    }
}
