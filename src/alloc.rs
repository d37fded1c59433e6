//! [`CappedAllocator`]: the system allocator with a ceiling on any *single* allocation.
//!
//! Why: yrs 0.28 pre-reserves collections from counts declared in client bytes
//! (`try_reserve(declared_len)`). With Linux overcommit a 5-byte update can reserve 21 GB and
//! touch ~0.5 GB (rust-stack.md §5, finding B). Refusing any single allocation above the cap makes
//! those `try_reserve` calls fail, so decoding returns an error instead of eating memory. A
//! legitimate allocation above the cap would abort the process, so the cap must exceed the
//! largest buffer Hearth ever needs (documents are bounded far below the default 1 GiB).
//! The binary installs it as the global allocator; the cap can be changed at start-up.

#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The default ceiling for one allocation: 1 GiB.
pub const DEFAULT_CAP: usize = 1 << 30;

/// A [`GlobalAlloc`] that refuses single allocations larger than its cap.
#[derive(Debug)]
pub struct CappedAllocator {
    cap: AtomicUsize,
}

impl CappedAllocator {
    /// An allocator with the default cap.
    pub const fn new() -> Self {
        Self {
            cap: AtomicUsize::new(DEFAULT_CAP),
        }
    }

    /// Changes the cap (call once at start-up).
    pub fn set_cap(&self, bytes: usize) {
        self.cap.store(bytes.max(64 << 20), Ordering::Relaxed);
    }

    fn allowed(&self, size: usize) -> bool {
        size <= self.cap.load(Ordering::Relaxed)
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
