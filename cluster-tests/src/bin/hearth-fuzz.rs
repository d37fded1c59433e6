//! `hearth-fuzz`: long fuzzing runs with crash containment.
//!
//! The supervisor runs batches of cases in child processes (this same binary with `--child`).
//! A child that dies (a signal, an abort), reports a finding, or exceeds its time budget is
//! narrowed down to the single failing case by re-running halves of its batch, and that
//! case's input is written to `--out` as a regression file that the test suite replays.
//!
//! ```text
//! hearth-fuzz --seconds 3600                 # every target, an hour, new seed
//! hearth-fuzz --target updates --cases 1000000 --seed 7
//! hearth-fuzz --replay cluster-tests/fuzz-regressions/updates-1.fuzz
//! ```

use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use cluster_tests::fuzz::{self, Target, targets};

#[derive(Debug, Parser)]
#[command(
    name = "hearth-fuzz",
    about = "Mutational fuzzer over Hearth's decoders and apply paths"
)]
struct Args {
    /// Target name (`updates`, `stored`, `frames`, `awareness`, `state-vectors`, `envelopes`, `admin`, `auth`) or
    /// `all`.
    #[arg(long, default_value = "all")]
    target: String,
    /// Seed (default: from the clock); a case is reproducible from target, seed and index.
    #[arg(long)]
    seed: Option<u64>,
    /// Cases per target (default: unbounded, until --seconds).
    #[arg(long)]
    cases: Option<u64>,
    /// Stop after this many seconds (default 60).
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Cases per child process.
    #[arg(long, default_value_t = 20_000)]
    batch: u64,
    /// Where failing cases are written.
    #[arg(long, default_value = "fuzz-findings")]
    out: PathBuf,
    /// Replay one regression file in this process and report.
    #[arg(long)]
    replay: Option<PathBuf>,
    /// Internal: run cases `from..from+count` in this process.
    #[arg(long, hide = true)]
    child: bool,
    #[arg(long, hide = true, default_value_t = 0)]
    from: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(path) = &args.replay {
        return replay(path);
    }
    let targets: Vec<Target> = if args.target == "all" {
        Target::ALL.to_vec()
    } else {
        match Target::from_name(&args.target) {
            Some(t) => vec![t],
            None => {
                eprintln!("hearth-fuzz: unknown target {:?}", args.target);
                return ExitCode::from(64);
            }
        }
    };
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    if args.child {
        let count = args.cases.unwrap_or(args.batch);
        return match fuzz::run(targets[0], seed, args.from, count) {
            Ok(s) => {
                println!(
                    "stats {} {} {} {}",
                    s.cases, s.refused, s.accepted, s.caught_panics
                );
                ExitCode::SUCCESS
            }
            Err(f) => {
                println!("finding {} {}", f.index, f.what);
                ExitCode::from(70)
            }
        };
    }
    supervise(&args, &targets, seed)
}

fn replay(path: &std::path::Path) -> ExitCode {
    match fuzz::read_case(path) {
        Err(e) => {
            eprintln!("hearth-fuzz: {e}");
            ExitCode::from(64)
        }
        Ok((target, input)) => {
            let out = targets::feed(target, &input);
            println!("{}: {out:?}", path.display());
            if out.violation.is_some() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
    }
}

/// How a child run ended.
enum ChildEnd {
    Ok([u64; 4]),
    Failed(String),
}

fn run_child(target: Target, seed: u64, from: u64, count: u64) -> ChildEnd {
    let Ok(exe) = std::env::current_exe() else {
        return ChildEnd::Failed("cannot find own executable".into());
    };
    let child = Command::new(exe)
        .args(["--child", "--target", target.name()])
        .args(["--seed", &seed.to_string(), "--from", &from.to_string()])
        .args(["--cases", &count.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return ChildEnd::Failed(format!("spawn: {e}")),
    };
    // a budget far above a healthy batch's run time: anything slower is a hang
    let budget = fuzz::SLOW_CASE + Duration::from_millis(count.saturating_mul(20));
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if started.elapsed() > budget => {
                let _ = child.kill();
                let _ = child.wait();
                return ChildEnd::Failed(format!("no result within {budget:?} (hang)"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return ChildEnd::Failed(format!("wait: {e}")),
        }
    }
    let Ok(output) = child.wait_with_output() else {
        return ChildEnd::Failed("no output".into());
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    if output.status.success()
        && let Some(line) = stdout.lines().find(|l| l.starts_with("stats "))
    {
        let n: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        if n.len() == 4 {
            return ChildEnd::Ok([n[0], n[1], n[2], n[3]]);
        }
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    ChildEnd::Failed(format!(
        "{} {} {}",
        output.status,
        stdout
            .lines()
            .find(|l| l.starts_with("finding "))
            .unwrap_or(""),
        last
    ))
}

/// Narrows a failing batch down to one case by re-running halves in children.
fn narrow(target: Target, seed: u64, mut from: u64, mut count: u64) -> (u64, String) {
    let mut why = String::new();
    while count > 1 {
        let half = count / 2;
        match run_child(target, seed, from, half) {
            ChildEnd::Failed(w) => {
                why = w;
                count = half;
            }
            ChildEnd::Ok(_) => {
                from += half;
                count -= half;
            }
        }
    }
    if let ChildEnd::Failed(w) = run_child(target, seed, from, 1) {
        why = w;
    }
    (from, why)
}

fn supervise(args: &Args, targets: &[Target], seed: u64) -> ExitCode {
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let mut findings = 0;
    println!(
        "hearth-fuzz: seed {seed}, targets {:?}, up to {} s",
        targets.iter().map(|t| t.name()).collect::<Vec<_>>(),
        args.seconds
    );
    let mut totals = vec![[0u64; 4]; targets.len()];
    let mut next = vec![0u64; targets.len()];
    let mut last_report = Instant::now();
    'outer: while Instant::now() < deadline {
        let mut progressed = false;
        for (i, &target) in targets.iter().enumerate() {
            let limit = args.cases.unwrap_or(u64::MAX);
            if next[i] >= limit || Instant::now() >= deadline {
                continue;
            }
            let count = args.batch.min(limit - next[i]);
            progressed = true;
            match run_child(target, seed, next[i], count) {
                ChildEnd::Ok(s) => {
                    for k in 0..4 {
                        totals[i][k] += s[k];
                    }
                }
                ChildEnd::Failed(first) => {
                    let (index, why) = narrow(target, seed, next[i], count);
                    findings += 1;
                    let input = targets::case_input(target, seed, index);
                    let _ = std::fs::create_dir_all(&args.out);
                    let path = args
                        .out
                        .join(format!("{}-{seed}-{index}.fuzz", target.name()));
                    match fuzz::write_case(&path, target, &input) {
                        Ok(()) => println!(
                            "FINDING {} seed {seed} case {index}: {why} (batch: {first}); input in {}",
                            target.name(),
                            path.display()
                        ),
                        Err(e) => println!(
                            "FINDING {} seed {seed} case {index}: {why}; cannot write it: {e}",
                            target.name()
                        ),
                    }
                    totals[i][0] += count;
                }
            }
            next[i] += count;
            if last_report.elapsed() > Duration::from_secs(10) {
                last_report = Instant::now();
                report(targets, &totals);
            }
        }
        if !progressed {
            break 'outer;
        }
    }
    report(targets, &totals);
    println!("hearth-fuzz: {findings} finding(s)");
    if findings == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn report(targets: &[Target], totals: &[[u64; 4]]) {
    for (t, s) in targets.iter().zip(totals) {
        println!(
            "  {:<14} cases {:>10}  refused {:>10}  accepted {:>10}  caught panics {}",
            t.name(),
            s[0],
            s[1],
            s[2],
            s[3]
        );
    }
}
