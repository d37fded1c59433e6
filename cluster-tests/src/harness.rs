//! Starting the `hearth` binary as a child process for tests: find it, give it a scratch
//! directory and ready files (client port and operator listener), wait until it listens, stop
//! it with SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// The `hearth` binary: `$HEARTH_BIN`, else `target/<profile>/hearth` of this workspace
/// (`$CARGO_TARGET_DIR` respected). Errors say how to build it.
pub fn hearth_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("HEARTH_BIN") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!("HEARTH_BIN={} does not exist", p.display());
    }
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let p = target.join(profile).join("hearth");
    if p.is_file() {
        return Ok(p);
    }
    bail!(
        "the hearth binary was not found at {} — build it first (`cargo build{} -p hearth`) or set HEARTH_BIN",
        p.display(),
        if profile == "release" {
            " --release"
        } else {
            ""
        }
    )
}

/// A scratch directory removed on drop.
#[derive(Debug)]
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// Creates a fresh directory under the system temp dir.
    pub fn new(tag: &str) -> anyhow::Result<Scratch> {
        let p = std::env::temp_dir().join(format!(
            "{tag}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(Scratch(p))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `hearth` process (killed on drop).
#[derive(Debug)]
pub struct Hearth {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its operator listener (`/metrics`, `/cluster/owned`).
    pub operator: SocketAddr,
    /// Its stderr log file.
    pub log: PathBuf,
}

impl Hearth {
    /// Starts `hearth --listen 127.0.0.1:0 --ready-file … --operator-listen 127.0.0.1:0
    /// --operator-ready-file … <args>` and waits (≤ 30 s) until it listens. `dir` holds the
    /// ready files and the log.
    pub fn start(dir: &Path, args: &[&str]) -> anyhow::Result<Hearth> {
        let bin = hearth_bin()?;
        let ready = dir.join(format!("ready-{:08x}", rand::random::<u32>()));
        let log = ready.with_extension("log");
        let operator_ready = ready.with_extension("operator");
        let err = std::fs::File::create(&log)?;
        let mut child = Command::new(&bin)
            .args(["--listen", "127.0.0.1:0", "--ready-file"])
            .arg(&ready)
            .args(["--operator-listen", "127.0.0.1:0", "--operator-ready-file"])
            .arg(&operator_ready)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // hearth writes the operator file first
            if let Ok(text) = std::fs::read_to_string(&ready)
                && let Ok(addr) = text.trim().parse()
            {
                let text = std::fs::read_to_string(&operator_ready).unwrap_or_default();
                let Ok(operator) = text.trim().parse() else {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("hearth wrote no valid operator ready file: {text:?}");
                };
                return Ok(Hearth {
                    child,
                    addr,
                    operator,
                    log,
                });
            }
            if let Some(status) = child.try_wait()? {
                let log_text = std::fs::read_to_string(&log).unwrap_or_default();
                bail!("hearth exited with {status} before listening:\n{log_text}");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("hearth did not write its ready file within 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `ws://ip:port/`.
    pub fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    /// SIGTERM, then wait up to 15 s (SIGKILL after that).
    pub fn stop(mut self) -> anyhow::Result<()> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        bail!("hearth did not stop within 15 s of SIGTERM")
    }
}

impl Drop for Hearth {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
