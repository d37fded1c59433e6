//! The `hearth` binary: the stock server, with no extensions of its own (see [`hearth::cli`]).

/// Refuses single allocations above a cap, so crafted length prefixes cannot make yrs reserve
/// gigabytes (see `hearth::alloc`).
#[global_allocator]
static ALLOCATOR: hearth::alloc::CappedAllocator = hearth::alloc::CappedAllocator::new();

fn main() -> std::process::ExitCode {
    hearth::cli::run(|_| Vec::new())
}
