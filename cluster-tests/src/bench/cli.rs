//! `hearth-bench` command line: one subcommand per scenario, JSON lines on stdout, progress on
//! stderr.

use std::time::Duration;

use anyhow::bail;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;

use super::fleet::{Target, Topology};
use super::scenarios::{self, ColdLoad, Conns, Out, Phase, Ramp, Timing};

/// Load generator speaking the Hocuspocus protocol (Hearth and Hocuspocus alike).
#[derive(Debug, Parser)]
#[command(name = "hearth-bench", version)]
pub struct Cli {
    /// Scenario.
    #[command(subcommand)]
    pub scenario: Scenario,
    /// Options shared by all scenarios.
    #[command(flatten)]
    pub common: Common,
}

/// Options shared by all scenarios.
#[derive(Debug, Args)]
pub struct Common {
    /// Target WebSocket URL(s), comma-separated or repeated; clients go round-robin.
    #[arg(long = "url", value_delimiter = ',', global = true)]
    pub urls: Vec<String>,
    /// Auth token every client sends.
    #[arg(long, default_value = "", global = true)]
    pub token: String,
    /// Server process id(s) whose CPU and RSS are measured (summed).
    #[arg(long = "server-pid", value_delimiter = ',', global = true)]
    pub server_pids: Vec<u32>,
    /// A Redis process whose CPU is also reported on its own (`redis_cpu_*`; include it in
    /// `--server-pid` too for the total).
    #[arg(long, global = true)]
    pub redis_pid: Option<u32>,
    /// Document name prefix (default: a random run id, so every run starts on fresh documents).
    #[arg(long, global = true)]
    pub prefix: Option<String>,
    /// Free text copied into every output line.
    #[arg(long, default_value = "", global = true)]
    pub label: String,
    /// Runtime worker threads (1 = a single-threaded runtime).
    #[arg(long, default_value_t = 1, global = true)]
    pub threads: usize,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 64, global = true)]
    pub connect_concurrency: usize,
    /// Limit for one client's connect + handshake, seconds.
    #[arg(long, default_value_t = 30.0, global = true)]
    pub handshake_timeout: f64,
    /// No progress lines on stderr.
    #[arg(long, global = true)]
    pub quiet: bool,
}

/// Fan-out shape and timing.
#[derive(Debug, Args, Clone)]
pub struct FanoutArgs {
    /// Documents.
    #[arg(long, default_value_t = 10)]
    pub docs: usize,
    /// Clients per document.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Inserts per second per client.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Inserts per second over all clients (overrides --rate).
    #[arg(long)]
    pub total_rate: Option<f64>,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of sending before measuring.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Longest wait for outstanding deliveries after sending stops, seconds.
    #[arg(long, default_value_t = 5.0)]
    pub drain: f64,
    /// Do not publish awareness states.
    #[arg(long)]
    pub no_awareness: bool,
}

impl FanoutArgs {
    fn topology(&self) -> Topology {
        Topology {
            docs: self.docs,
            clients_per_doc: self.clients,
            owners: None,
            awareness: !self.no_awareness,
        }
    }
    fn timing(&self) -> Timing {
        Timing {
            warmup: secs(self.warmup),
            duration: secs(self.duration),
            drain: secs(self.drain),
        }
    }
    fn total_rate(&self) -> f64 {
        self.total_rate
            .unwrap_or(self.rate * (self.docs * self.clients) as f64)
    }
}

/// `coldload` phase.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PhaseArg {
    /// Store the documents, then exit (restart the server before `measure`).
    Seed,
    /// Load the stored documents (cold: first load after a restart; then warm and hot).
    Measure,
    /// Seed and measure without a restart.
    All,
}

/// Scenarios.
#[derive(Debug, Subcommand)]
pub enum Scenario {
    /// D docs × C clients at a fixed per-client rate: delivery latency on every other client,
    /// missing deliveries, ack latency, server CPU per delivered update.
    Fanout(FanoutArgs),
    /// Raise the total rate until delivery p99 exceeds the limit or deliveries go missing.
    Maxrate {
        #[command(flatten)]
        fanout: FanoutArgs,
        /// First total rate (updates/s over all clients).
        #[arg(long, default_value_t = 500.0)]
        start_rate: f64,
        /// Rate multiplier between steps.
        #[arg(long, default_value_t = 1.5)]
        factor: f64,
        /// Most ramp steps.
        #[arg(long, default_value_t = 20)]
        max_steps: usize,
        /// Bisection steps after the first failure.
        #[arg(long, default_value_t = 3)]
        refine: usize,
        /// Delivery p99 limit, ms.
        #[arg(long, default_value_t = 100.0)]
        p99_limit_ms: f64,
    },
    /// Ack latency (send → SyncStatus) at several total rates, e.g. durable vs memory mode.
    Acklatency {
        #[command(flatten)]
        fanout: FanoutArgs,
        /// Total rates to step through.
        #[arg(long, value_delimiter = ',', default_value = "1,100,1000")]
        rates: Vec<f64>,
    },
    /// K idle providers: server RSS per connection.
    Conns {
        /// Connections.
        #[arg(long, default_value_t = 1000)]
        conns: usize,
        /// Documents they spread over.
        #[arg(long, default_value_t = 100)]
        docs: usize,
        /// Seconds to wait after the last connection before sampling RSS.
        #[arg(long, default_value_t = 3.0)]
        settle: f64,
        /// Seconds to hold the connections open (idle CPU is measured over this).
        #[arg(long, default_value_t = 10.0)]
        hold: f64,
        /// Do not publish awareness states.
        #[arg(long)]
        no_awareness: bool,
        /// Connect from this many loopback source addresses (127.0.0.1, 127.0.0.2, …) in
        /// turn: one source reaches one server address with at most one ephemeral port range
        /// of connections (about 28,000 by default). Loopback servers only.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..))]
        sources: u8,
    },
    /// Time for a new client to sync a stored document (seed, restart the server, measure).
    Coldload {
        /// Which part to run.
        #[arg(long, value_enum, default_value = "all")]
        phase: PhaseArg,
        /// Documents (one cold sample each).
        #[arg(long, default_value_t = 5)]
        docs: usize,
        /// Encoded size of each document, bytes.
        #[arg(long, default_value_t = 1_000_000)]
        bytes: usize,
        /// Document generator seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Pause after closing a client, seconds (lets the server unload the document).
        #[arg(long, default_value_t = 0.5)]
        unload_wait: f64,
    },
    /// Fan-out over a cluster (one URL per node): owner-local vs proxied latency.
    Proxied {
        #[command(flatten)]
        fanout: FanoutArgs,
        /// Command printing a document's owner (`{doc}` is replaced), e.g.
        /// `hearth cluster owner {doc}`; output: URL index or host:port.
        #[arg(long)]
        owner_cmd: Option<String>,
        /// Redis `host:port` whose PING round trip is reported as the floor.
        #[arg(long)]
        redis: Option<String>,
    },
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

impl Cli {
    /// Runs the chosen scenario, writing JSON lines to `out`.
    pub async fn run(self, out: &mut dyn Out) -> anyhow::Result<()> {
        let c = &self.common;
        if c.urls.is_empty() {
            bail!("at least one --url is required");
        }
        let prefix = c
            .prefix
            .clone()
            .unwrap_or_else(|| format!("bench-{:08x}", rand::random::<u32>()));
        let t = Target {
            urls: c.urls.clone(),
            token: c.token.clone(),
            pids: c.server_pids.clone(),
            redis_pid: c.redis_pid,
            prefix,
            connect_concurrency: c.connect_concurrency,
            handshake_timeout: secs(c.handshake_timeout),
            progress: !c.quiet,
            label: c.label.clone(),
        };
        match self.scenario {
            Scenario::Fanout(f) => {
                scenarios::fanout(&t, &f.topology(), f.total_rate(), f.timing(), out).await
            }
            Scenario::Maxrate {
                fanout,
                start_rate,
                factor,
                max_steps,
                refine,
                p99_limit_ms,
            } => {
                let ramp = Ramp {
                    start: start_rate,
                    factor: factor.max(1.01),
                    max_steps,
                    refine,
                    p99_limit_ms,
                };
                scenarios::maxrate(&t, &fanout.topology(), ramp, fanout.timing(), out).await
            }
            Scenario::Acklatency { fanout, rates } => {
                scenarios::acklatency(&t, &fanout.topology(), &rates, fanout.timing(), out).await
            }
            Scenario::Conns {
                conns,
                docs,
                settle,
                hold,
                no_awareness,
                sources,
            } => {
                let c = Conns {
                    conns,
                    docs,
                    settle: secs(settle),
                    hold: secs(hold),
                    awareness: !no_awareness,
                    sources,
                };
                scenarios::conns(&t, c, out).await
            }
            Scenario::Coldload {
                phase,
                docs,
                bytes,
                seed,
                unload_wait,
            } => {
                let c = ColdLoad {
                    phase: match phase {
                        PhaseArg::Seed => Phase::Seed,
                        PhaseArg::Measure => Phase::Measure,
                        PhaseArg::All => Phase::All,
                    },
                    docs,
                    bytes,
                    seed,
                    unload_wait: secs(unload_wait),
                };
                if c.phase != Phase::All && c.docs > 0 && self.common.prefix.is_none() {
                    bail!("coldload --phase seed/measure needs the same --prefix in both runs");
                }
                scenarios::coldload(&t, c, out).await
            }
            Scenario::Proxied {
                fanout,
                owner_cmd,
                redis,
            } => {
                scenarios::proxied(
                    &t,
                    fanout.topology(),
                    fanout.total_rate(),
                    fanout.timing(),
                    owner_cmd.as_deref(),
                    redis.as_deref(),
                    out,
                )
                .await
            }
        }
    }
}

/// The binary's entry point: parse, build the runtime, run, print errors as a JSON line.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let threads = cli.common.threads.max(1);
    let label = cli.common.label.clone();
    let rt = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hearth-bench: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let mut out = scenarios::Stdout;
    match rt.block_on(cli.run(&mut out)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            out.line(json!({"type": "error", "label": label, "message": format!("{e:#}")}));
            eprintln!("hearth-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
