//! The `hearth` command line as a process (docs/configuration.md): exit statuses of a bad flag,
//! a bad value and `--help`, plain (uncoloured) log lines when stderr is not a terminal,
//! `hearth health` against a running server and against nothing, the exit statuses of
//! `hearth cluster emit` for usage errors, start-up errors as one line naming the setting, the
//! defaults in `--help`, each subcommand's own settings, and the settings' precedence.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use cluster_tests::testbed::node::hearth_bin;
use cluster_tests::testbed::{Scratch, lease_port};

/// A strong cluster secret (only its shape matters here).
const SECRET: &str = "Wq5Xm1Lr9Kz3Tb7Vn2Hc6Pd4Jf8Gs0Ya-tests";

/// Runs `hearth args…` with no `HEARTH_*` variables from the test's environment (≤ 20 s).
fn hearth(args: &[&str]) -> anyhow::Result<Output> {
    hearth_with(args, &[], Stdio::null())
}

/// [`hearth`] with environment variables `env` and standard input `stdin`.
fn hearth_with(args: &[&str], env: &[(&str, &str)], stdin: Stdio) -> anyhow::Result<Output> {
    let mut cmd = Command::new(hearth_bin()?);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("HEARTH_") || k == "NO_COLOR" {
            cmd.env_remove(&k);
        }
    }
    let child = cmd
        .args(args)
        .envs(env.iter().copied())
        .stdin(stdin)
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

/// Runs the server on a loopback port with `database_url` = `url` (it is expected to fail).
fn serve_with_database(url: &str) -> anyhow::Result<Output> {
    hearth(&[
        "--listen",
        "127.0.0.1:0",
        "--operator-listen",
        "",
        "--database-url",
        url,
    ])
}

/// stderr as text, asserting it is one line.
fn one_line(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    assert_eq!(err.lines().count(), 1, "one line: {out:?}");
    err
}

#[test]
fn cluster_emit_usage_errors_exit_64_never_2() -> anyhow::Result<()> {
    // Redis is never reached: every one of these is refused first
    let closed = lease_port()?;
    let unreachable = format!("redis://127.0.0.1:{}", closed.port());
    let env = [
        ("HEARTH_REDIS_URL", unreachable.as_str()),
        ("HEARTH_CLUSTER_SECRET", SECRET),
    ];
    for (what, args) in [
        (
            "unknown flag",
            vec!["cluster", "emit", "--no-such-flag", "d", "e"],
        ),
        ("missing event", vec!["cluster", "emit", "d"]),
        ("misspelt subcommand", vec!["cluster", "emti", "d", "e"]),
        ("blank document", vec!["cluster", "emit", "", "e"]),
        ("blank event", vec!["cluster", "emit", "d", " "]),
        ("control character", vec!["cluster", "emit", "a\nb", "e"]),
        (
            "malformed redis_url",
            vec!["cluster", "emit", "d", "e", "--redis-url", "nonsense"],
        ),
        (
            "weak secret",
            vec!["cluster", "emit", "d", "e", "--cluster-secret", "change-me"],
        ),
    ] {
        let out = hearth_with(&args, &env, Stdio::null())?;
        assert_eq!(out.status.code(), Some(64), "{what}: {out:?}");
    }
    let out = hearth_with(&["cluster", "emit", "", "e"], &env, Stdio::null())?;
    assert!(one_line(&out).contains("document name"), "{out:?}");
    let out = hearth_with(
        &["cluster", "emit", "d", "e", "--redis-url", "nonsense"],
        &env,
        Stdio::null(),
    )?;
    assert!(one_line(&out).contains("redis_url"), "{out:?}");

    // an unreadable payload: standard input is a directory
    let scratch = Scratch::new("command_line_emit_usage")?;
    let dir = std::fs::File::open(scratch.join(""))?;
    let out = hearth_with(
        &["cluster", "emit", "d", "e", "--payload", "-"],
        &env,
        Stdio::from(dir),
    )?;
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(one_line(&out).contains("--payload -"), "{out:?}");

    // a well-formed command with Redis down is worth retrying
    for args in [&["cluster", "emit", "d", "e"][..], &["cluster", "status"]] {
        let out = hearth_with(args, &env, Stdio::null())?;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
    }
    Ok(())
}

#[test]
fn an_unopenable_sqlite_file_is_one_line_naming_the_setting_and_the_path() -> anyhow::Result<()> {
    let scratch = Scratch::new("command_line_sqlite_path")?;
    let path = scratch.join("no-such-dir").join("h.db");
    let url = format!("sqlite://{}", path.display());
    let out = serve_with_database(&url)?;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = one_line(&out);
    assert!(err.contains("database_url"), "{err}");
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert_eq!(
        err.matches("unable to open database file").count(),
        1,
        "the cause once: {err}"
    );
    assert!(err.contains("does not exist"), "says why: {err}");
    Ok(())
}

#[test]
fn unreachable_postgres_and_redis_fail_fast_with_the_cause() -> anyhow::Result<()> {
    let scratch = Scratch::new("command_line_unreachable")?;
    // nothing listens on leased ports until their leases drop
    let (pg_closed, redis_closed) = (lease_port()?, lease_port()?);
    let pg = format!(
        "postgres://hearth:pg-password@127.0.0.1:{}/test",
        pg_closed.port()
    );
    let started = Instant::now();
    let out = serve_with_database(&pg)?;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = one_line(&out);
    assert!(
        err.contains("database_url") && err.contains("refused"),
        "{err}"
    );
    assert!(!err.contains("pg-password") && err.contains("***"), "{err}");
    assert!(!err.contains("pool timed out"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(7),
        "{:?}",
        started.elapsed()
    );

    let redis = format!("redis://:redis-password@127.0.0.1:{}", redis_closed.port());
    let db = format!("sqlite://{}", scratch.join("h.db").display());
    let started = Instant::now();
    let out = hearth_with(
        &[
            "--listen",
            "127.0.0.1:0",
            "--operator-listen",
            "",
            "--database-url",
            &db,
        ],
        &[
            ("HEARTH_REDIS_URL", &redis),
            ("HEARTH_CLUSTER_SECRET", SECRET),
        ],
        Stdio::null(),
    )?;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = one_line(&out);
    assert!(
        err.contains("redis_url") && err.contains("refused"),
        "{err}"
    );
    assert!(!err.contains("redis-password"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(7),
        "{:?}",
        started.elapsed()
    );

    // the same from the cluster subcommands (exit 2: worth retrying)
    let env = [
        ("HEARTH_REDIS_URL", redis.as_str()),
        ("HEARTH_CLUSTER_SECRET", SECRET),
    ];
    for args in [&["cluster", "emit", "d", "e"][..], &["cluster", "status"]] {
        let started = Instant::now();
        let out = hearth_with(args, &env, Stdio::null())?;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let err = one_line(&out);
        assert!(
            err.contains("redis_url") && err.contains("refused"),
            "{err}"
        );
        assert!(
            !err.contains("redis-password") && err.contains("***"),
            "{err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(7),
            "{args:?}: {:?}",
            started.elapsed()
        );
    }
    Ok(())
}

#[test]
fn help_shows_defaults_and_each_subcommand_its_own_settings() -> anyhow::Result<()> {
    let help = |args: &[&str]| -> anyhow::Result<String> {
        let out = hearth(args)?;
        assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let server = help(&["--help"])?;
    for shown in [
        "[default: 30000]",
        "[default: 0.0.0.0:1234]",
        "[default: sqlite://hearth.db]",
    ] {
        assert!(server.contains(shown), "{shown}: {server}");
    }
    assert!(server.contains("--max-connections"), "{server}");
    // a server setting after a subcommand that does not use it is a usage error
    let out = hearth(&["cluster", "emit", "d", "e", "--max-connections", "5"])?;
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let out = hearth(&["health", "--database-url", "memory://"])?;
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let emit = help(&["cluster", "emit", "--help"])?;
    assert!(
        emit.contains("--redis-url") && emit.contains("--cluster-secret"),
        "{emit}"
    );
    assert!(
        emit.contains("[default: hearth]"),
        "the prefix's default: {emit}"
    );
    for absent in ["--max-connections", "--database-url", "--jwt-secret"] {
        assert!(!emit.contains(absent), "{absent}: {emit}");
    }
    let health = help(&["health", "--help"])?;
    assert!(health.contains("--listen"), "{health}");
    assert!(!health.contains("--redis-url"), "{health}");
    for sub in [
        &["cluster", "--help"][..],
        &["doc", "get", "--help"],
        &["event", "fire", "--help"],
        &["auth", "revoke", "--help"],
    ] {
        let text = help(sub)?;
        assert!(!text.contains("--max-connections"), "{sub:?}: {text}");
    }
    Ok(())
}

#[test]
fn flags_beat_environment_beat_file_beat_defaults() -> anyhow::Result<()> {
    // `hearth health` names the address it asked; nothing listens on these ports
    let scratch = Scratch::new("command_line_precedence")?;
    let leases = [lease_port()?, lease_port()?, lease_port()?];
    let [file_port, env_port, flag_port] = leases.each_ref().map(|l| l.port());
    let toml = scratch.join("hearth.toml");
    std::fs::write(&toml, format!("listen = \"127.0.0.1:{file_port}\"\n"))?;
    let toml = toml.display().to_string();
    let env_listen = format!("127.0.0.1:{env_port}");
    let flag_listen = format!("127.0.0.1:{flag_port}");
    let asked = |args: &[&str], env: &[(&str, &str)]| -> anyhow::Result<String> {
        let out = hearth_with(args, env, Stdio::null())?;
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        Ok(one_line(&out))
    };
    let with_env = [("HEARTH_LISTEN", env_listen.as_str())];
    let err = asked(
        &["--config", &toml, "health", "--listen", &flag_listen],
        &with_env,
    )?;
    assert!(err.contains(&flag_listen), "flag > env > file: {err}");
    let err = asked(
        &["--config", &toml, "--listen", &flag_listen, "health"],
        &with_env,
    )?;
    assert!(
        err.contains(&flag_listen),
        "a flag before the subcommand too: {err}"
    );
    let err = asked(&["--config", &toml, "health"], &with_env)?;
    assert!(err.contains(&env_listen), "env > file: {err}");
    let err = asked(&["health", "--config", &toml], &[])?;
    assert!(
        err.contains(&format!("127.0.0.1:{file_port}")),
        "file > default: {err}"
    );
    let err = asked(&["health"], &[])?;
    assert!(err.contains("listen = 0.0.0.0:1234"), "the default: {err}");
    Ok(())
}
