//! PostgreSQL for tests, through the `psql`, `initdb` and `pg_ctl` command-line tools.
//!
//! * [`PgDatabase`]: a fresh database `hearth_ct_<random>` on the server named by
//!   `$HEARTH_TEST_PG_URL` (default `postgres://postgres@127.0.0.1:5432/test`), dropped (after
//!   terminating its connections) when the handle drops.
//! * [`PgCluster`]: a private cluster (initdb with trust auth into the scratch directory, a leased
//!   port) that the test may stop with `pg_ctl stop -m immediate` and start again. Binaries come
//!   from `$HEARTH_TEST_PG_BIN`, else the newest `/usr/lib/postgresql/*/bin`. As root the cluster
//!   runs as the `postgres` user (PostgreSQL refuses to run as root).

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{Context as _, bail};

use super::{BIND_ATTEMPTS, PortLease, Scratch, is_root, lease_port, tail};

/// The default shared server for [`PgDatabase`].
pub const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// `$HEARTH_TEST_PG_URL` or [`DEFAULT_PG_URL`].
pub fn admin_url() -> String {
    std::env::var("HEARTH_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_PG_URL.to_string())
}

/// `url` with its database name replaced by `db` (query string kept).
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let authority_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    let mut out = format!("{}/{db}", &base[..authority_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// Runs `psql` on `url` with `sql` (≤ 10 s to connect); returns stdout (unaligned, tuples only).
pub fn psql(url: &str, sql: &str) -> anyhow::Result<String> {
    let out = Command::new("psql")
        .args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-c",
            sql,
        ])
        .env("PGCONNECT_TIMEOUT", "10")
        .env("PGOPTIONS", "-c statement_timeout=60000")
        .stdin(Stdio::null())
        .output()
        .context("running psql (is the PostgreSQL client installed?)")?;
    check(&out, &format!("psql {url} -c {sql:?}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn check(out: &Output, what: &str) -> anyhow::Result<()> {
    if out.status.success() {
        return Ok(());
    }
    bail!(
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    )
}

/// A fresh database on the shared test server, dropped on drop.
#[derive(Debug)]
pub struct PgDatabase {
    admin: String,
    name: String,
    url: String,
}

impl PgDatabase {
    /// Creates `hearth_ct_<random>` on `$HEARTH_TEST_PG_URL`'s server.
    pub fn create() -> anyhow::Result<PgDatabase> {
        Self::create_on(&admin_url())
    }

    /// Creates `hearth_ct_<random>` on the server of `admin` (a URL of any existing database).
    pub fn create_on(admin: &str) -> anyhow::Result<PgDatabase> {
        let name = format!("hearth_ct_{:016x}", rand::random::<u64>());
        psql(admin, &format!("CREATE DATABASE {name}")).with_context(|| {
            format!(
                "creating a test database on {admin} (set HEARTH_TEST_PG_URL to a server this \
                 test may create databases on)"
            )
        })?;
        Ok(PgDatabase {
            admin: admin.to_string(),
            url: with_database(admin, &name),
            name,
        })
    }

    /// The database's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs SQL in this database through `psql`.
    pub fn psql(&self, sql: &str) -> anyhow::Result<String> {
        psql(&self.url, sql)
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("[testbed] PostgreSQL test database: {}", self.url);
        }
        let _ = psql(
            &self.admin,
            &format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = '{}' AND pid <> pg_backend_pid()",
                self.name
            ),
        );
        if let Err(e) = psql(
            &self.admin,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        ) {
            eprintln!("[testbed] could not drop {}: {e:#}", self.name);
        }
    }
}

/// The directory with `initdb`, `pg_ctl`, `postgres`.
pub fn pg_bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("HEARTH_TEST_PG_BIN") {
        return Ok(PathBuf::from(p));
    }
    let mut best: Option<(u32, PathBuf)> = None;
    for e in std::fs::read_dir("/usr/lib/postgresql").context("reading /usr/lib/postgresql")? {
        let e = e?;
        let Ok(v) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let bin = e.path().join("bin");
        if bin.join("pg_ctl").is_file() && best.as_ref().is_none_or(|(b, _)| v > *b) {
            best = Some((v, bin));
        }
    }
    best.map(|(_, p)| p)
        .context("no /usr/lib/postgresql/*/bin/pg_ctl (set HEARTH_TEST_PG_BIN)")
}

fn postgres_ids() -> anyhow::Result<(u32, u32)> {
    let id = |flag: &str| -> anyhow::Result<u32> {
        let out = Command::new("id").args([flag, "postgres"]).output()?;
        check(&out, "id postgres")?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    };
    Ok((id("-u")?, id("-g")?))
}

/// A private PostgreSQL cluster in the scratch directory (stopped immediately on drop).
#[derive(Debug)]
pub struct PgCluster {
    bin: PathBuf,
    root: PathBuf,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    owner: Option<(u32, u32)>,
    running: bool,
    /// Further server options (`-c name=value`), e.g. TLS.
    extra: String,
    /// The port's lease; dropped after the server is stopped.
    _lease: PortLease,
}

impl PgCluster {
    /// initdb (trust auth, superuser `postgres`) into `<scratch>/pg/data` and start it on a
    /// leased port (again on a fresh one, ≤ [`BIND_ATTEMPTS`] times, while that port is taken).
    pub fn start(scratch: &Scratch) -> anyhow::Result<PgCluster> {
        PgCluster::start_with(scratch, None)
    }

    /// [`PgCluster::start`] with TLS on (`ssl=on`, `pki`'s server certificate); clients may
    /// still connect without TLS.
    pub fn start_tls(scratch: &Scratch, pki: &super::tls::TestPki) -> anyhow::Result<PgCluster> {
        PgCluster::start_with(scratch, Some(pki))
    }

    fn start_with(
        scratch: &Scratch,
        pki: Option<&super::tls::TestPki>,
    ) -> anyhow::Result<PgCluster> {
        let bin = pg_bin_dir()?;
        let root = scratch.join("pg");
        std::fs::create_dir_all(&root)?;
        let owner = if is_root() {
            let (u, g) =
                postgres_ids().context("PostgreSQL cannot run as root; need a postgres user")?;
            std::os::unix::fs::chown(&root, Some(u), Some(g))?;
            Some((u, g))
        } else {
            None
        };
        let lease = lease_port()?;
        let mut c = PgCluster {
            data: root.join("data"),
            log: root.join("postgres.log"),
            root,
            bin,
            port: lease.port(),
            owner,
            running: false,
            extra: String::new(),
            _lease: lease,
        };
        let out = c
            .tool("initdb")
            .arg("-D")
            .arg(&c.data)
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"])
            .output()
            .context("running initdb")?;
        check(&out, "initdb")?;
        if let Some(pki) = pki {
            // the server reads its key as its own user, and only from a private file
            let (cert, key) = (c.root.join("server.pem"), c.root.join("server.key"));
            std::fs::copy(&pki.server_cert, &cert)?;
            std::fs::copy(&pki.server_key, &key)?;
            std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            if let Some((u, g)) = c.owner {
                std::os::unix::fs::chown(&cert, Some(u), Some(g))?;
                std::os::unix::fs::chown(&key, Some(u), Some(g))?;
            }
            c.extra = format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                cert.display(),
                key.display()
            );
        }
        let mut attempt = 1;
        loop {
            let logged = std::fs::metadata(&c.log).map_or(0, |m| m.len());
            match c.start_again() {
                Ok(()) => return Ok(c),
                Err(e)
                    if attempt < BIND_ATTEMPTS
                        && std::fs::read(&c.log).is_ok_and(|log| {
                            let new = log.get(usize::try_from(logged).unwrap_or(0)..);
                            String::from_utf8_lossy(new.unwrap_or_default())
                                .contains("could not bind")
                        }) =>
                {
                    eprintln!(
                        "[testbed] PostgreSQL: port {} taken, again on a fresh one: {e:#}",
                        c.port
                    );
                    let lease = lease_port()?;
                    c.port = lease.port();
                    c._lease = lease;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn tool(&self, name: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(name));
        cmd.stdin(Stdio::null()).current_dir(&self.root);
        if let Some((u, g)) = self.owner {
            cmd.uid(u).gid(g);
        }
        cmd
    }

    /// Starts the (stopped) cluster on its port and waits (≤ 30 s) until it accepts connections.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200{}",
            self.port,
            self.root.display(),
            self.extra
        );
        let out = self
            .tool("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", "30", "-o", &opts, "start"])
            .output()
            .context("running pg_ctl start")?;
        if let Err(e) = check(&out, "pg_ctl start") {
            bail!("{e:#}\n{}", tail(&self.log, 20));
        }
        self.running = true;
        Ok(())
    }

    /// `pg_ctl stop -m immediate`: the server dies without a checkpoint; connections drop.
    pub fn stop_immediate(&mut self) -> anyhow::Result<()> {
        self.stop_mode("immediate")
    }

    /// `pg_ctl stop -m fast`.
    pub fn stop_fast(&mut self) -> anyhow::Result<()> {
        self.stop_mode("fast")
    }

    fn stop_mode(&mut self, mode: &str) -> anyhow::Result<()> {
        let out = self
            .tool("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", "30", "-m", mode, "stop"])
            .output()
            .context("running pg_ctl stop")?;
        check(&out, "pg_ctl stop")?;
        self.running = false;
        Ok(())
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:P/<db>`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates database `db`.
    pub fn create_database(&self, db: &str) -> anyhow::Result<String> {
        psql(&self.url("postgres"), &format!("CREATE DATABASE {db}"))?;
        Ok(self.url(db))
    }

    /// The server log.
    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.running {
            let _ = self.stop_mode("immediate");
        }
        if std::thread::panicking() {
            eprintln!("[testbed] private PostgreSQL log: {}", self.log.display());
        }
    }
}
