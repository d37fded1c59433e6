//! The `hearth` command line as a process (docs/configuration.md): exit statuses of a bad flag,
//! a bad value and `--help`, plain (uncoloured) log lines when stderr is not a terminal, and
//! `hearth health` against a running server and against nothing.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use cluster_tests::testbed::Scratch;
use cluster_tests::testbed::node::hearth_bin;

/// Runs `hearth args…` with no `HEARTH_*` variables from the test's environment (≤ 20 s).
fn hearth(args: &[&str]) -> anyhow::Result<Output> {
    let mut cmd = Command::new(hearth_bin()?);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("HEARTH_") || k == "NO_COLOR" {
            cmd.env_remove(&k);
        }
    }
    let child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(20);
    let waiter = std::thread::spawn(move || child.wait_with_output());
    while !waiter.is_finished() {
        if Instant::now() > deadline {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            anyhow::bail!("hearth {args:?} kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(waiter
        .join()
        .map_err(|_| anyhow::anyhow!("waiter panicked"))??)
}

#[test]
fn a_bad_flag_or_value_exits_64_and_help_exits_0() -> anyhow::Result<()> {
    let out = hearth(&["--no-such-flag"])?;
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--no-such-flag"), "names the flag: {err}");

    let out = hearth(&["--max-connections", "many"])?;
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("many"), "names the value: {err}");

    let out = hearth(&["--max-update-depth", "0"])?;
    assert_eq!(out.status.code(), Some(64), "{out:?}");

    let out = hearth(&["--help"])?;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("--listen"));
    Ok(())
}

#[test]
fn logs_are_plain_text_when_stderr_is_not_a_terminal() -> anyhow::Result<()> {
    let scratch = Scratch::new("command_line_logs")?;
    let ready = scratch.join("ready");
    let log = scratch.join("stderr.log");
    let mut cmd = Command::new(hearth_bin()?);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("HEARTH_") || k == "NO_COLOR" {
            cmd.env_remove(&k);
        }
    }
    let mut child = cmd
        .args(["--listen", "127.0.0.1:0", "--operator-listen", ""])
        .args(["--database-url", "memory://", "--ready-file"])
        .arg(&ready)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    let err = std::fs::read_to_string(&log)?;
    assert!(err.contains("listening"), "the start is logged: {err}");
    assert!(
        !err.contains('\u{1b}'),
        "no ANSI escape codes in a file: {err:?}"
    );
    Ok(())
}

#[test]
fn health_answers_0_for_a_running_server_and_1_for_none() -> anyhow::Result<()> {
    let scratch = Scratch::new("command_line_health")?;
    let ready = scratch.join("ready");
    let mut cmd = Command::new(hearth_bin()?);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("HEARTH_") {
            cmd.env_remove(&k);
        }
    }
    let mut child = cmd
        .args(["--listen", "127.0.0.1:0", "--operator-listen", ""])
        .args(["--database-url", "memory://", "--ready-file"])
        .arg(&ready)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let addr = std::fs::read_to_string(&ready)?;
    let up = hearth(&["--listen", addr.trim(), "health"]);
    let _ = child.kill();
    let _ = child.wait();
    let up = up?;
    assert_eq!(up.status.code(), Some(0), "{up:?}");
    assert_eq!(String::from_utf8_lossy(&up.stdout).trim(), "ok");

    // nothing listens there any more
    let down = hearth(&["--listen", addr.trim(), "health"])?;
    assert_eq!(down.status.code(), Some(1), "{down:?}");
    let err = String::from_utf8_lossy(&down.stderr);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains(addr.trim()), "names the address: {err}");
    Ok(())
}
