//! The `hearth` command line: what the `hearth` binary runs, and what an application embedding
//! Hearth runs with its own extensions. Parses flags, environment and the configuration file,
//! sets up logging, then serves until SIGTERM/SIGINT and shuts down gracefully (exit status 0),
//! or runs a `cluster` subcommand. Start-up errors exit with status 64 (configuration) or 1.
//!
//! A custom server is a `main.rs` of a few lines:
//!
//! ```no_run
//! use std::sync::Arc;
//! use hearth::{Extension, WeakServer};
//!
//! struct MyHooks {
//!     server: WeakServer,
//! }
//!
//! #[hearth::async_trait]
//! impl Extension for MyHooks {}
//!
//! #[global_allocator]
//! static ALLOCATOR: hearth::alloc::CappedAllocator = hearth::alloc::CappedAllocator::new();
//!
//! fn main() -> std::process::ExitCode {
//!     hearth::cli::run(|server: &WeakServer| {
//!         vec![Arc::new(MyHooks { server: server.clone() }) as Arc<dyn Extension>]
//!     })
//! }
//! ```

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser as _;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

use crate::config::{Cli, ClusterCommand, Command, Config, LogFormat};
use crate::hooks::Extension;
use crate::server::{Server, ServerHandle, WeakServer};

/// Builds the application's extensions, given a weak handle to the server they will run in.
type Extensions = Box<dyn FnOnce(&WeakServer) -> Vec<Arc<dyn Extension>>>;

/// Runs the `hearth` command line with the extensions `extensions` returns (called once, before
/// the server binds, with a handle that upgrades once it has). Returns the process's exit
/// status. Sets the [`crate::alloc`] cap from `max_allocation_bytes`; install
/// [`crate::alloc::CappedAllocator`] as the global allocator for it to take effect.
pub fn run<F>(extensions: F) -> ExitCode
where
    F: FnOnce(&WeakServer) -> Vec<Arc<dyn Extension>> + 'static,
{
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version: their text on stdout, success
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        // an unknown flag or a value that does not parse is a configuration error
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(64);
        }
    };
    let (command, settings) = cli.into_parts();
    let config = match Config::from_settings(settings) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hearth: {e}");
            return ExitCode::from(64);
        }
    };
    crate::alloc::set_cap(config.max_allocation_bytes);
    init_tracing(config.log_format);
    match command {
        Some(Command::Doc(cmd)) => {
            return admin_command(crate::admin::commands::doc(cmd));
        }
        Some(Command::Event(cmd)) => {
            return admin_command(crate::admin::commands::event(cmd));
        }
        Some(Command::Auth(cmd)) => {
            return admin_command(crate::admin::commands::auth(cmd));
        }
        Some(Command::Cluster(ClusterCommand::Drain { node, admin })) => {
            return admin_command(
                async move { crate::admin::commands::drain(&node, &admin).await },
            );
        }
        Some(Command::Cluster(ClusterCommand::Owner {
            document, admin, ..
        })) if !admin.token.is_empty() => {
            return admin_command(
                async move { crate::admin::commands::owner(&document, &admin).await },
            );
        }
        Some(Command::Cluster(ClusterCommand::Status { admin, .. })) if !admin.token.is_empty() => {
            return admin_command(async move { crate::admin::commands::status(&admin).await });
        }
        Some(Command::Cluster(cmd)) => return cluster_command(config, cmd),
        _ => {}
    }
    match command {
        Some(Command::Health(_)) => return health_command(config.listen),
        Some(Command::Import {
            source,
            table,
            dry_run,
            ..
        }) => {
            let source = crate::transfer::Location::parse(&source, &table);
            return transfer_command(&config, Transfer::Import { source, dry_run });
        }
        Some(Command::Export {
            target,
            prefix,
            table,
            ..
        }) => {
            let target = crate::transfer::Location::parse(&target, &table);
            return transfer_command(&config, Transfer::Export { target, prefix });
        }
        _ => {}
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hearth: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config, Box::new(extensions))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hearth: {}", one_line(e.as_ref()));
            let config = matches!(
                e.downcast_ref::<crate::server::ServerError>(),
                Some(crate::server::ServerError::Config(_))
            );
            ExitCode::from(if config { 64 } else { 1 })
        }
    }
}

/// An error and its causes in one line, `what: cause: cause…`, each cause named once: a cause
/// whose text the line already contains (an error that prints its source in its own message)
/// is skipped, and line breaks inside a message become spaces.
pub(crate) fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = s.source();
    }
    line.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `hearth cluster owner DOC` / `hearth cluster status` / `hearth cluster emit DOC EVENT`.
fn cluster_command(config: Config, cmd: ClusterCommand) -> ExitCode {
    if let ClusterCommand::Decode {
        file,
        hex,
        listen: None,
        ..
    } = &cmd
    {
        return decode_command(&config, file.as_deref(), *hex);
    }
    if !config.is_cluster() {
        eprintln!("hearth: set HEARTH_REDIS_URL (or --redis-url) to inspect a cluster");
        return ExitCode::from(64);
    }
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return ExitCode::FAILURE;
    };
    if let ClusterCommand::Emit {
        document,
        event,
        payload,
        ..
    } = cmd
    {
        return runtime.block_on(emit_command(&config, &document, &event, payload.as_deref()));
    }
    let result = runtime.block_on(async {
        match cmd {
            ClusterCommand::Owner { document, .. } => crate::cluster::owner_of(&config, &document)
                .await
                .map(|owner| match owner {
                    Some(node) => {
                        println!("{node}");
                        true
                    }
                    None => false,
                }),
            ClusterCommand::Status { .. } => {
                crate::cluster::live_nodes(&config).await.map(|nodes| {
                    for (node, incarnation) in &nodes {
                        println!("{node} {incarnation}");
                    }
                    true
                })
            }
            ClusterCommand::Decode {
                listen: Some(n), ..
            } => crate::cluster::listen(&config, n, |line| println!("{line}"))
                .await
                .map(|()| true),
            // handled above: they have exit statuses of their own
            ClusterCommand::Emit { .. }
            | ClusterCommand::Decode { .. }
            | ClusterCommand::Drain { .. } => Ok(false),
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("hearth: {e}");
            ExitCode::from(e.exit_status())
        }
    }
}

/// Runs one admin API command: its output on stdout, one line on stderr when it fails, and
/// the exit status of [`crate::admin::client::exit`].
fn admin_command(
    f: impl std::future::Future<Output = Result<(), crate::admin::client::ClientError>>,
) -> ExitCode {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hearth: {}", e.message);
            ExitCode::from(e.status)
        }
    }
}

/// `hearth cluster decode [FILE] [--hex]`: one captured message, printed as JSON lines. Exit
/// status 0 when it decoded, 1 when it was rejected (the line says why), 64 for unreadable
/// input.
fn decode_command(config: &Config, file: Option<&std::path::Path>, hex: bool) -> ExitCode {
    let raw = match file {
        Some(path) => std::fs::read(path).map_err(|e| format!("{}: {e}", path.display())),
        None => {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
                .map(|_| buf)
                .map_err(|e| format!("standard input: {e}"))
        }
    };
    let bytes = match raw.and_then(|raw| if hex { from_hex(&raw) } else { Ok(raw) }) {
        Ok(bytes) => bytes,
        Err(e) => {
            eprintln!("hearth: cluster decode: {e}");
            return ExitCode::from(64);
        }
    };
    let described = crate::cluster::describe_message(config, &bytes);
    for line in &described.lines {
        println!("{line}");
    }
    if described.rejected {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Hex text (whitespace ignored) to bytes.
fn from_hex(text: &[u8]) -> Result<Vec<u8>, String> {
    let digits: Vec<u8> = text
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    if !digits.len().is_multiple_of(2) {
        return Err("hex input has an odd number of digits".into());
    }
    digits
        .chunks(2)
        .map(|pair| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|s| u8::from_str_radix(s, 16).ok())
                .ok_or_else(|| format!("not hex: {:?}", String::from_utf8_lossy(pair)))
        })
        .collect()
}

/// `hearth cluster emit DOC EVENT [--payload P|-]`: the reply on stdout, byte for byte. Exit
/// status 0 answered, 1 definitive failure (no owner, no handler, handler failed), 2 transient
/// failure (timeout, Redis or the owner unreachable), 64 a wrong command line or setting
/// (nothing was sent); docs/cluster.md.
async fn emit_command(
    config: &Config,
    document: &str,
    event: &str,
    payload: Option<&str>,
) -> ExitCode {
    let payload = match payload {
        None => Vec::new(),
        Some("-") => {
            let mut buf = Vec::new();
            if let Err(e) = std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf) {
                eprintln!("hearth: --payload -: cannot read standard input: {e}");
                return ExitCode::from(64);
            }
            buf
        }
        Some(p) => p.as_bytes().to_vec(),
    };
    match crate::cluster::emit_remote(config, document, event, payload).await {
        Ok(reply) => {
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            if let Err(e) = out.write_all(&reply).and_then(|()| out.flush()) {
                eprintln!("hearth: writing the reply: {e}");
                return ExitCode::from(1);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hearth: custom event {event:?} on {document:?}: {e}");
            ExitCode::from(e.exit_status())
        }
    }
}

async fn serve(config: Config, extensions: Extensions) -> anyhow::Result<()> {
    let ready_file = config.ready_file.clone();
    let operator_ready_file = config.operator_ready_file.clone();
    let admin_ready_file = config.admin_ready_file.clone();
    let mut builder = Server::builder(config);
    for e in extensions(&builder.weak_handle()) {
        builder = builder.extension_arc(e);
    }
    let server = builder.bind().await?;
    // the operator file first: whoever sees the ready file finds both
    if let Some(addr) = server.operator_addr() {
        write_ready_file(&operator_ready_file, addr)?;
    }
    if let Some(addr) = server.admin_addr() {
        write_ready_file(&admin_ready_file, addr)?;
    }
    write_ready_file(&ready_file, server.local_addr())?;
    tokio::spawn(on_signal(server.handle()));
    server.run().await?;
    Ok(())
}

/// Writes `addr` to `path` (unless empty) atomically: a reader sees the whole address or no file.
/// What `hearth import` / `hearth export` were asked to do.
enum Transfer {
    Import {
        source: crate::transfer::Location,
        dry_run: bool,
    },
    Export {
        target: crate::transfer::Location,
        prefix: String,
    },
}

/// `hearth import` / `hearth export`: opens this server's database, runs the transfer with
/// progress on stderr (one line per failed document, the totals once a second) and the
/// totals on stdout. Exit status 0 when no document failed, 1 when some did or a database
/// failed, 64 when the source, target or settings cannot work.
fn transfer_command(config: &Config, transfer: Transfer) -> ExitCode {
    use crate::transfer::{Counts, Outcome, Progress, TransferError};
    let verb = match transfer {
        Transfer::Import { dry_run: true, .. } => "import (dry run)",
        Transfer::Import { .. } => "import",
        Transfer::Export { .. } => "export",
    };
    if config.database_url.starts_with("memory:") {
        eprintln!("hearth {verb}: database_url: memory:// holds nothing to transfer");
        return ExitCode::from(64);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hearth {verb}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let line = |c: &Counts| {
        let done = if verb == "export" {
            "exported"
        } else {
            "imported"
        };
        format!(
            "{}/{} documents, {} {done}, {} unchanged, {} failed",
            c.done(),
            c.total,
            c.written,
            c.unchanged,
            c.failed
        )
    };
    let mut progress = Progress::new(
        std::time::Duration::from_secs(1),
        |name, outcome| {
            if let Outcome::Failed(reason) = outcome {
                tracing::warn!(doc = %name, %reason, "{verb} failed");
                eprintln!("hearth {verb}: {name:?} failed: {reason}");
            }
        },
        |c| eprintln!("hearth {verb}: {}", line(c)),
    );
    let result = runtime.block_on(async {
        let opts = crate::storage::SqlOptions {
            table_prefix: config.database_table_prefix.clone(),
            ..crate::storage::SqlOptions::default()
        };
        let store = crate::storage::open_store(&config.database_url, opts)
            .await
            .map_err(TransferError::Store)?;
        let limits = config.storage_scan_limits();
        match &transfer {
            Transfer::Import { source, dry_run } => {
                let import = crate::transfer::Import {
                    store: store.as_ref(),
                    limits,
                    max_bytes: config.max_document_bytes,
                    dry_run: *dry_run,
                };
                import.run(source, &mut progress).await
            }
            Transfer::Export { target, prefix } => {
                crate::transfer::export(store.as_ref(), target, prefix, &limits, &mut progress)
                    .await
            }
        }
    });
    let counts = progress.counts().clone();
    match result {
        Ok(()) => {
            println!("{verb}: {}", line(&counts));
            if counts.failed > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e @ TransferError::Invalid(_)) => {
            eprintln!("hearth {verb}: {e}");
            ExitCode::from(64)
        }
        Err(e) => {
            eprintln!("hearth {verb}: {e} (after {})", line(&counts));
            ExitCode::FAILURE
        }
    }
}

/// `hearth health`: `GET /healthz` on `listen` (see [`Command::Health`]).
fn health_command(listen: std::net::SocketAddr) -> ExitCode {
    match check_health(listen) {
        Ok(()) => {
            println!("ok");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hearth: health: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check_health(listen: std::net::SocketAddr) -> Result<(), String> {
    use std::io::{Read as _, Write as _};
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
    const LIMIT: std::time::Duration = std::time::Duration::from_secs(2);
    let ip = match listen.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let addr = SocketAddr::new(ip, listen.port());
    let mut stream = TcpStream::connect_timeout(&addr, LIMIT)
        .map_err(|e| format!("cannot connect to {addr} (listen = {listen}): {e}"))?;
    stream
        .set_read_timeout(Some(LIMIT))
        .and_then(|()| stream.set_write_timeout(Some(LIMIT)))
        .map_err(|e| format!("{addr}: {e}"))?;
    stream
        .write_all(
            format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .map_err(|e| format!("sending the request to {addr}: {e}"))?;
    let mut head = [0u8; 64];
    let mut got = 0;
    while got < head.len() {
        match stream.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => return Err(format!("reading the answer from {addr}: {e}")),
        }
        if head[..got].contains(&b'\n') {
            break;
        }
    }
    let status_line = String::from_utf8_lossy(&head[..got]);
    let status_line = status_line.lines().next().unwrap_or("").trim();
    match status_line.split_whitespace().nth(1) {
        Some("200") => Ok(()),
        Some(code) => Err(format!("{addr} answered {code} to GET /healthz")),
        None => Err(format!("{addr} gave no HTTP answer to GET /healthz")),
    }
}

fn write_ready_file(path: &std::path::Path, addr: std::net::SocketAddr) -> anyhow::Result<()> {
    if path.as_os_str().is_empty() {
        return Ok(());
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, addr.to_string())
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("writing {}", path.display()))
}

async fn on_signal(handle: ServerHandle) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("cannot install signal handlers; graceful shutdown only via the API");
        return;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
    handle.shutdown();
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // colour only for a person at a terminal, and never when NO_COLOR is set (no-color.org)
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
