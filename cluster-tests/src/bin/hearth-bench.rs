//! `hearth-bench`: see `cluster_tests::bench` and docs/benchmarks.md.

fn main() -> std::process::ExitCode {
    cluster_tests::bench::cli::main()
}
