//! `hearth-test-server`: the stock `hearth` command line plus the behaviours the interop and
//! cluster tests rely on ([`cluster_tests::test_extension`]). Never for production.

use std::sync::Arc;

use cluster_tests::test_extension::TestExtension;
use hearth::Extension;

#[global_allocator]
static ALLOCATOR: hearth::alloc::CappedAllocator = hearth::alloc::CappedAllocator::new();

fn main() -> std::process::ExitCode {
    hearth::cli::run(|server| vec![TestExtension::new(server.clone()) as Arc<dyn Extension>])
}
