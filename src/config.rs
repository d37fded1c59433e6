//! Configuration: CLI flags, `HEARTH_*` environment variables and an optional TOML file.
//!
//! Precedence: flag > environment variable > TOML file (`--config`) > default. [`Cli`] only
//! parses; [`Config::from_settings`] merges and validates into the plain [`Config`] the server uses,
//! so tests build a `Config` literally. Every setting is listed in `docs/configuration.md`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

mod secrets;

/// When a client's update is acknowledged (`SyncStatus(1)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// After the database transaction containing the update committed (default).
    #[default]
    Durable,
    /// As soon as the update is applied in memory (Hocuspocus behaviour); stored debounced.
    Memory,
}

/// Which Redis pub/sub commands the cluster uses (`redis_pubsub`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum RedisPubSub {
    /// Sharded on a Redis Cluster URL (`redis-cluster://`, `rediss-cluster://`), classic
    /// otherwise (default).
    #[default]
    Auto,
    /// `PUBLISH` / `SUBSCRIBE`.
    Classic,
    /// `SPUBLISH` / `SSUBSCRIBE` (Redis 7 or later).
    Sharded,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `hearth` command line.
///
/// The server's settings are flags of `hearth` itself (`hearth --listen … [serve]`) and of
/// `hearth serve`; every other subcommand accepts, after its name, only the settings it uses
/// (see [`SettingsGroup`]), so its `--help` lists those. Environment variables and the TOML
/// file apply to every command.
#[derive(Debug, Parser)]
#[command(
    name = "hearth",
    version,
    about = "A Hocuspocus-compatible Yjs collaboration server"
)]
pub struct Cli {
    /// What to do (default: serve).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Server settings.
    #[command(flatten)]
    pub settings: Flags<ServerSettings>,
}

impl Cli {
    /// The subcommand and the settings: those given after the subcommand's name win over
    /// those given before it (flags), then environment variables, then the TOML file.
    pub fn into_parts(self) -> (Option<Command>, Settings) {
        let top = self.settings.settings;
        // a subcommand's environment values are the same as the top level's: only its flags
        // can override what was given before it
        let sub = match &self.command {
            Some(Command::Serve(flags)) => Some(flags.flags.clone()),
            Some(Command::Health(flags)) => Some(flags.flags.clone()),
            Some(Command::Import { settings, .. } | Command::Export { settings, .. }) => {
                Some(settings.flags.clone())
            }
            Some(Command::Cluster(cmd)) => cmd.flags().cloned(),
            _ => None,
        };
        let settings = match sub {
            Some(sub) => sub.or(top),
            None => top,
        };
        (self.command, settings)
    }
}

/// Which settings a subcommand accepts as flags (the server accepts all).
pub trait SettingsGroup {
    /// Whether setting `name` (the flag's name with `_`) belongs to the group.
    fn includes(name: &str) -> bool;
}

/// Every setting: the server (`hearth`, `hearth serve`).
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerSettings;

impl SettingsGroup for ServerSettings {
    fn includes(_: &str) -> bool {
        true
    }
}

/// The settings of the `hearth cluster` commands that talk to Redis: the connection, the
/// secrets, and the limits of what they send.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClusterSettings;

impl SettingsGroup for ClusterSettings {
    fn includes(name: &str) -> bool {
        matches!(
            name,
            "config"
                | "redis_url"
                | "redis_prefix"
                | "redis_tls_ca_file"
                | "redis_tls_cert_file"
                | "redis_tls_key_file"
                | "redis_pubsub"
                | "cluster_secret"
                | "cluster_secret_file"
                | "cluster_secret_previous"
                | "cluster_secret_previous_file"
                | "cluster_batching"
                | "custom_event_ttl_ms"
                | "max_message_bytes"
                | "max_document_name_bytes"
                | "log_format"
        )
    }
}

/// The settings of `hearth health`: where the server listens.
#[derive(Debug, Clone, Copy, Default)]
pub struct HealthSettings;

impl SettingsGroup for HealthSettings {
    fn includes(name: &str) -> bool {
        matches!(name, "config" | "listen")
    }
}

/// The settings of `hearth import` and `hearth export`: Hearth's database and the bounds on
/// what they read.
#[derive(Debug, Clone, Copy, Default)]
pub struct TransferSettings;

impl SettingsGroup for TransferSettings {
    fn includes(name: &str) -> bool {
        matches!(
            name,
            "config"
                | "database_url"
                | "database_table_prefix"
                | "max_document_bytes"
                | "max_update_depth"
                | "log_format"
        )
    }
}

/// The setting flags of one command: those of group `G`, each with its default in its help
/// (`[default: …]`). The values stay unset when not given, so the defaults apply last
/// (flag > environment > TOML file > default).
#[derive(Debug, Clone, Default)]
pub struct Flags<G> {
    /// The settings given as flags or environment variables (those outside `G` are unset).
    pub settings: Settings,
    /// Those given as flags.
    pub flags: Settings,
    group: std::marker::PhantomData<G>,
}

impl<G: SettingsGroup> clap::FromArgMatches for Flags<G> {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        Ok(Flags {
            settings: Settings::from_matches_where(matches, G::includes, false),
            flags: Settings::from_matches_where(matches, G::includes, true),
            group: std::marker::PhantomData,
        })
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        let given = Self::from_arg_matches(matches)?;
        self.settings = given.settings.or(std::mem::take(&mut self.settings));
        self.flags = given.flags.or(std::mem::take(&mut self.flags));
        Ok(())
    }
}

impl<G: SettingsGroup> Args for Flags<G> {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        let defaults = Config::reference();
        let all = <Settings as Args>::augment_args(clap::Command::new("settings"));
        let mut cmd = cmd;
        for arg in all.get_arguments() {
            let id = arg.get_id().as_str();
            if !G::includes(id) {
                continue;
            }
            let default = defaults
                .iter()
                .find(|(name, _, _)| *name == id)
                .and_then(|(_, _, d)| shown_default(d));
            cmd = cmd.arg(match default {
                Some(d) => with_default(arg.clone(), &d),
                None => arg.clone(),
            });
        }
        cmd
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

/// A setting's default as `--help` shows it, from its `Debug` text: strings unquoted, enum
/// values in lower case; `None` for an empty default (the setting is off unless given).
fn shown_default(debug: &str) -> Option<String> {
    let text = debug
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .map_or_else(|| debug.to_owned(), |t| t.replace("\\\\", "\\"));
    if text.is_empty() {
        return None;
    }
    if text.chars().next().is_some_and(char::is_uppercase) && text.chars().all(char::is_alphabetic)
    {
        return Some(text.to_lowercase());
    }
    Some(text)
}

/// `arg` with `[default: D]` appended to its help texts.
fn with_default(arg: clap::Arg, default: &str) -> clap::Arg {
    let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
    let long = arg.get_long_help().map(ToString::to_string);
    let arg = arg.help(format!("{help} [default: {default}]"));
    match long {
        Some(long) => arg.long_help(format!("{long}\n\n[default: {default}]")),
        None => arg,
    }
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (the default).
    Serve(Flags<ServerSettings>),
    /// Inspect a cluster or send it a custom event (needs `HEARTH_REDIS_URL`).
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Read, edit, message, close, delete or list documents through any node's admin API.
    #[command(subcommand)]
    Doc(DocCommand),
    /// Custom events through any node's admin API.
    #[command(subcommand)]
    Event(EventCommand),
    /// Revoke users, token ids or documents on every node through any node's admin API.
    #[command(subcommand)]
    Auth(AuthCommand),
    /// Ask the server on this machine whether it is up: `GET /healthz` on the configured
    /// `listen` address (a wildcard address is asked on loopback), 2 s at most. Exit status 0
    /// when it answers 200, 1 otherwise (one line on stderr says why). For container health
    /// checks: it reads `listen` from the same flag, environment variable or file as the server.
    Health(Flags<HealthSettings>),
    /// Copy documents into this server's database (`database_url`, `database_table_prefix`)
    /// from SOURCE: a Hocuspocus `documents(name, data)` table in `sqlite://PATH` or
    /// `postgres://…`, or a directory of `.bin`/`.ystate` files (one Yjs update per document,
    /// the file name its percent-encoded name). A merge: documents that already hold the
    /// source are left unchanged, so running it again is safe. Every written document is read
    /// back and checked. Progress on stderr once a second. Exit status 0 when every document
    /// was imported or unchanged, 1 when some failed (each is named), 64 for bad usage.
    Import {
        /// `sqlite://PATH`, `postgres://…` or a directory.
        source: String,
        /// The source table (`schema.table` allowed on PostgreSQL).
        #[arg(long, default_value = "documents")]
        table: String,
        /// Count what would be imported; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Hearth's database and the bounds on what is read.
        #[command(flatten)]
        settings: Flags<TransferSettings>,
    },
    /// Copy this server's documents out as plain Yjs updates (each document's whole state, one
    /// v1 update), to TARGET: a directory (`<percent-encoded name>.bin`) or a Hocuspocus
    /// `documents(name, data)` table in `sqlite://PATH` or `postgres://…` (created when
    /// missing; existing rows of the same names are replaced). Exit statuses as for `import`.
    Export {
        /// A directory, `sqlite://PATH` or `postgres://…`.
        target: String,
        /// Only documents whose name starts with this.
        #[arg(long, default_value = "")]
        prefix: String,
        /// The target table.
        #[arg(long, default_value = "documents")]
        table: String,
        /// Hearth's database and the bounds on what is read.
        #[command(flatten)]
        settings: Flags<TransferSettings>,
    },
}

/// `hearth cluster …`
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Print the id of the node that owns DOCUMENT (nothing and exit status 1 when nobody does;
    /// 3 through the admin API). Reads the lock in Redis, or asks the admin API when an admin
    /// token is given.
    Owner {
        /// Document name.
        document: String,
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        cluster: Flags<ClusterSettings>,
    },
    /// List the live nodes (from Redis, or with their documents and connections from the
    /// admin API when an admin token is given).
    Status {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        cluster: Flags<ClusterSettings>,
    },
    /// Drain node NODE through the admin API: it stops taking clients and documents, closes
    /// its sockets (providers reconnect elsewhere) and hands its documents over; the process
    /// keeps running until it is stopped.
    Drain {
        /// The node id.
        node: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Run custom event EVENT on the node that owns DOCUMENT and write its reply payload to
    /// stdout as is. Exit status: 0 answered; 1 nobody owns DOCUMENT, no handler for EVENT, the
    /// handler failed, or the payload is too large; 2 (try again) no reply within
    /// `custom_event_ttl_ms`, or Redis or the owner unreachable; 64 a wrong command line or
    /// setting (nothing was sent). Uses the same Redis URL, prefix and cluster secret as the
    /// nodes.
    Emit {
        /// Document name.
        document: String,
        /// Event name (what `on_custom_event` hooks see as `name`).
        event: String,
        /// Payload sent with the event (default: empty); `-` reads it from standard input.
        #[arg(long, allow_hyphen_values = true)]
        payload: Option<String>,
        #[command(flatten)]
        cluster: Flags<ClusterSettings>,
    },
    /// Print cross-node messages as JSON, one line per envelope (a batch gives several): a
    /// captured message from FILE (or standard input; raw bytes, or hex with `--hex`), or, with
    /// `--listen N`, the next N messages on the cluster's Redis (every channel under
    /// `redis_prefix`). MACs are verified when a cluster secret is configured.
    Decode {
        /// File holding one captured message (default: standard input).
        file: Option<PathBuf>,
        /// The input is hex text (whitespace ignored).
        #[arg(long)]
        hex: bool,
        /// Subscribe and print the next N messages instead of reading one.
        #[arg(long, value_name = "N")]
        listen: Option<usize>,
        #[command(flatten)]
        cluster: Flags<ClusterSettings>,
    },
}

impl ClusterCommand {
    /// The settings given as flags after the subcommand's name (none for `drain`, which uses
    /// the admin API only).
    fn flags(&self) -> Option<&Settings> {
        match self {
            ClusterCommand::Owner { cluster, .. }
            | ClusterCommand::Status { cluster, .. }
            | ClusterCommand::Emit { cluster, .. }
            | ClusterCommand::Decode { cluster, .. } => Some(&cluster.flags),
            ClusterCommand::Drain { .. } => None,
        }
    }
}

/// How `hearth doc|event|cluster` reach the admin API.
#[derive(Debug, Clone, Args)]
pub struct AdminArgs {
    /// The admin API of any node (`http://host:port`).
    #[arg(
        long,
        env = "HEARTH_ADMIN_URL",
        default_value = "http://127.0.0.1:9465"
    )]
    pub server: String,
    /// An admin bearer token (one of the nodes' `admin_tokens`).
    #[arg(
        long,
        env = "HEARTH_ADMIN_TOKEN",
        hide_env_values = true,
        default_value = ""
    )]
    pub token: String,
    /// Print the API's JSON answer as is.
    #[arg(long)]
    pub json: bool,
    /// Wait at most this long for the answer, in milliseconds (also the owner's deadline).
    #[arg(long, default_value_t = 30_000)]
    pub timeout_ms: u64,
    /// Do not load a document that no node owns: fail (exit status 69) instead.
    #[arg(long)]
    pub no_claim: bool,
}

/// `hearth doc …`
#[derive(Debug, Subcommand)]
pub enum DocCommand {
    /// Print DOCUMENT's content as JSON (every root type; XML fragments as ProseMirror JSON).
    Get {
        /// Document name.
        document: String,
        /// Parts to return, comma-separated: json, state, state_vector (default: json; all
        /// three with --json).
        #[arg(long)]
        include: Option<String>,
        /// Type hints `name:kind,…` (kind: text, map, array, xml).
        #[arg(long)]
        types: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Apply an edit to DOCUMENT under its owner's lock; returns once it is durable.
    Apply {
        /// Document name.
        document: String,
        /// A binary Yjs v1 update to apply (`-` reads standard input).
        #[arg(long, value_name = "FILE")]
        update_file: Option<PathBuf>,
        /// JSON operations, an array (see docs/admin-api.md); `@FILE` reads them from a file.
        #[arg(long, value_name = "JSON")]
        ops: Option<String>,
        /// Append TEXT to the Y.Text root TYPE.
        #[arg(long, num_args = 2, value_names = ["TYPE", "TEXT"])]
        append_text: Option<Vec<String>>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Send a stateless message to every client of DOCUMENT, on every node.
    Broadcast {
        /// Document name.
        document: String,
        /// The message (any string; clients get it as a stateless payload).
        message: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Close every connection of DOCUMENT, on every node (clients reconnect and resync).
    Close {
        /// Document name.
        document: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Delete DOCUMENT's stored content (its connections are closed first).
    Delete {
        /// Document name.
        document: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List stored and loaded documents with their owner and connections.
    List {
        /// Only names starting with this.
        #[arg(long, default_value = "")]
        prefix: String,
        /// Start after this name (the `next` of the previous page).
        #[arg(long)]
        after: Option<String>,
        /// Page size (1 to 1000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// `hearth event …`
#[derive(Debug, Subcommand)]
pub enum EventCommand {
    /// Run custom event EVENT on the node that owns DOCUMENT and print its reply.
    Fire {
        /// Document name.
        document: String,
        /// Event name.
        event: String,
        /// JSON payload (default: none); `-` reads it from standard input.
        #[arg(allow_hyphen_values = true)]
        payload: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// `hearth auth …`
#[derive(Debug, Subcommand)]
pub enum AuthCommand {
    /// Revoke a user, a token id or a document: every matching document connection on every
    /// node is refused at once, and matching clients are refused until the revocation ends.
    Revoke {
        /// What to revoke.
        #[command(flatten)]
        what: RevocationArgs,
        /// How long the revocation lasts, in seconds (default: a day).
        #[arg(long)]
        ttl_s: Option<u64>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Lift a revocation on every node.
    Lift {
        /// What to lift.
        #[command(flatten)]
        what: RevocationArgs,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List the revocations in force.
    Revocations {
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// Exactly one of a user id, a token id (`jti`) and a document name.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct RevocationArgs {
    /// A user id (`context.user.id`, or the JWT's `sub`).
    #[arg(long)]
    pub user: Option<String>,
    /// A token id (the JWT's `jti`).
    #[arg(long)]
    pub token_id: Option<String>,
    /// A document name.
    #[arg(long)]
    pub document: Option<String>,
}

macro_rules! settings {
    ($( $(#[$doc:meta])* $name:ident : $ty:ty = $default:expr, env = $env:literal ;)*) => {
        /// Every setting, as parsed from flags and environment (all optional).
        #[derive(Debug, Clone, Default, Args)]
        pub struct Settings {
            /// Read settings from this TOML file (keys are the long flag names with `_`).
            #[arg(long, env = "HEARTH_CONFIG")]
            pub config: Option<PathBuf>,
            $( $(#[$doc])* #[arg(long, env = $env)] pub $name: Option<$ty>, )*
        }

        impl Settings {
            /// The settings `keep` selects, read from `matches` (which must define them); only
            /// those given as flags when `flags_only`.
            fn from_matches_where(
                matches: &clap::ArgMatches,
                keep: fn(&str) -> bool,
                flags_only: bool,
            ) -> Settings {
                let take = |id: &str| {
                    keep(id)
                        && (!flags_only
                            || matches.value_source(id)
                                == Some(clap::parser::ValueSource::CommandLine))
                };
                let mut s = Settings::default();
                if take("config") {
                    s.config = matches.get_one::<PathBuf>("config").cloned();
                }
                $( if take(stringify!($name)) {
                    s.$name = matches.get_one::<$ty>(stringify!($name)).cloned();
                } )*
                s
            }

            /// Each setting from `self`, or from `other` where `self` lacks it.
            pub fn or(self, other: Settings) -> Settings {
                Settings {
                    config: self.config.or(other.config),
                    $( $name: self.$name.or(other.$name), )*
                }
            }
        }

        /// The TOML file's shape (same keys, all optional).
        #[derive(Debug, Clone, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct FileSettings {
            $( $name: Option<$ty>, )*
        }

        /// Validated configuration. Its `Debug` output hides secrets: the cluster secrets and the
        /// token table print as `<redacted>`, passwords in URLs as `***`.
        #[derive(Clone)]
        pub struct Config {
            $( $(#[$doc])* pub $name: $ty, )*
        }

        impl Default for Config {
            fn default() -> Self {
                Self { $( $name: $default, )* }
            }
        }

        impl std::fmt::Debug for Config {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let mut d = f.debug_struct("Config");
                $( d.field(stringify!($name), &Shown(redacted(stringify!($name), format!("{:?}", self.$name)))); )*
                d.finish()
            }
        }

        impl Config {
            fn merge(cli: Settings, file: FileSettings) -> Self {
                let d = Config::default();
                Self {
                    $( $name: cli.$name.or(file.$name).unwrap_or(d.$name), )*
                }
            }

            /// `(flag, env, default)` for every setting, for docs and `--help` checks.
            pub fn reference() -> Vec<(&'static str, &'static str, String)> {
                let d = Config::default();
                vec![ $( (stringify!($name), $env, format!("{:?}", d.$name)), )* ]
            }
        }
    };
}

/// Settings whose values never appear in `Debug` output.
const SECRET_SETTINGS: [&str; 7] = [
    "cluster_secret",
    "cluster_secret_previous",
    "auth_tokens",
    "admin_tokens",
    "jwt_secret",
    "auth_webhook_secret",
    "webhook_secret",
];

/// A setting's `Debug` text with secrets hidden: the whole value of a [`SECRET_SETTINGS`] entry
/// that is set, and the password of any `scheme://user:password@host` URL.
fn redacted(name: &str, text: String) -> String {
    if SECRET_SETTINGS.contains(&name) {
        return if text == "\"\"" {
            text
        } else {
            "<redacted>".into()
        };
    }
    let Some(scheme_end) = text.find("://") else {
        return text;
    };
    let rest = &text[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#', '"']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return text;
    };
    let Some(colon) = rest[..at].find(':') else {
        return text;
    };
    let start = scheme_end + 3 + colon + 1;
    format!("{}***{}", &text[..start], &text[scheme_end + 3 + at..])
}

/// `url` with the password of a `scheme://user:password@host` authority replaced by `***`, for
/// error messages and logs.
pub(crate) fn redact_url(url: &str) -> String {
    redacted("", url.to_owned())
}

/// Prints a prepared `Debug` text as is.
struct Shown(String);

impl std::fmt::Debug for Shown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

settings! {
    /// Address and port to listen on.
    listen: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 1234)), env = "HEARTH_LISTEN";
    /// Address and port of the operator listener (`/metrics`, `/cluster/owned`, `/healthz`,
    /// `/readyz` with reasons); empty = no operator listener.
    operator_listen: String = "127.0.0.1:9464".into(), env = "HEARTH_OPERATOR_LISTEN";
    /// Address and port of the admin API (documents, custom events, nodes; docs/admin-api.md).
    /// It serves only when `admin_tokens` is set.
    admin_listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 9465)), env = "HEARTH_ADMIN_LISTEN";
    /// Bearer tokens the admin API accepts, comma-separated (list several to rotate); each at
    /// least 16 characters. Empty: no admin API.
    admin_tokens: String = String::new(), env = "HEARTH_ADMIN_TOKENS";
    /// Largest admin API request body, in bytes (413 beyond).
    admin_max_body_bytes: usize = 8 << 20, env = "HEARTH_ADMIN_MAX_BODY_BYTES";
    /// Admin API requests accepted per second on this node (bursts of twice as many; 429 beyond).
    admin_requests_per_second: u32 = 500, env = "HEARTH_ADMIN_REQUESTS_PER_SECOND";
    /// Write the admin listener's bound `ip:port` to this file (before the ready file).
    admin_ready_file: PathBuf = PathBuf::new(), env = "HEARTH_ADMIN_READY_FILE";
    /// This node's id (logs, metrics, cluster ownership). Default: host name.
    node_id: String = default_node_id(), env = "HEARTH_NODE_ID";
    /// Storage: `sqlite://PATH`, `postgres://…` or `memory://` (nothing persisted).
    database_url: String = "sqlite://hearth.db".into(), env = "HEARTH_DATABASE_URL";
    /// Prefix of Hearth's table names in `database_url` (`<prefix>documents`,
    /// `<prefix>document_updates`, `<prefix>_sqlx_migrations`): lets Hearth share a database
    /// with tables of the same names, such as Hocuspocus's `documents`. Empty: no prefix.
    database_table_prefix: String = String::new(), env = "HEARTH_DATABASE_TABLE_PREFIX";
    /// Static token table `token=scope,…` (scope: read-write | read-only | deny; `*` = any other
    /// token). Unset: every client is read-write.
    auth_tokens: String = String::new(), env = "HEARTH_AUTH_TOKENS";
    /// HMAC secret for JWT authentication (HS256/384/512; at least 32 bytes). Set exactly one of
    /// `jwt_secret`, `jwt_public_key_file` and `jwt_jwks_file` to turn JWT authentication on.
    jwt_secret: String = String::new(), env = "HEARTH_JWT_SECRET";
    /// PEM public key (RSA, EC P-256/P-384 or Ed25519) that verifies JWTs, given inline (an
    /// environment variable from a secret; `\n` may stand for the line breaks).
    jwt_public_key: String = String::new(), env = "HEARTH_JWT_PUBLIC_KEY";
    /// PEM public key (RSA, EC P-256/P-384 or Ed25519) that verifies JWTs.
    jwt_public_key_file: PathBuf = PathBuf::new(), env = "HEARTH_JWT_PUBLIC_KEY_FILE";
    /// JWKS file (`{"keys": [...]}`) whose keys verify JWTs by `kid`; re-read when it changes.
    jwt_jwks_file: PathBuf = PathBuf::new(), env = "HEARTH_JWT_JWKS_FILE";
    /// URL (http or https) of a JWKS whose keys verify JWTs by `kid` (an identity provider's
    /// `jwks_uri`); fetched before the node listens, every `jwt_jwks_refresh_s`, and when a
    /// token names an unknown `kid` (at most every 10 s).
    jwt_jwks_url: String = String::new(), env = "HEARTH_JWT_JWKS_URL";
    /// How often the JWKS URL is fetched again, in seconds.
    jwt_jwks_refresh_s: u64 = 300, env = "HEARTH_JWT_JWKS_REFRESH_S";
    /// Accepted JWT algorithms, comma-separated (default: every algorithm of the key's family).
    jwt_algorithms: String = String::new(), env = "HEARTH_JWT_ALGORITHMS";
    /// Required JWT audience(s), comma-separated (empty: `aud` not checked).
    jwt_audience: String = String::new(), env = "HEARTH_JWT_AUDIENCE";
    /// Required JWT issuer(s), comma-separated (empty: `iss` not checked).
    jwt_issuer: String = String::new(), env = "HEARTH_JWT_ISSUER";
    /// Clock skew allowed on `exp`, `nbf` and `iat`, in seconds.
    jwt_leeway_s: u64 = 5, env = "HEARTH_JWT_LEEWAY_S";
    /// Claim holding the document names or patterns the token may open.
    jwt_documents_claim: String = "docs".into(), env = "HEARTH_JWT_DOCUMENTS_CLAIM";
    /// Boolean claim that makes every document of the token read-only.
    jwt_read_only_claim: String = "read_only".into(), env = "HEARTH_JWT_READ_ONLY_CLAIM";
    /// Claim holding document names or patterns the token may open read-only.
    jwt_read_only_documents_claim: String = "docs_ro".into(), env = "HEARTH_JWT_READ_ONLY_DOCUMENTS_CLAIM";
    /// Claim holding the user object hooks see as `context.user` (`sub` is added as `id`).
    jwt_user_claim: String = "user".into(), env = "HEARTH_JWT_USER_CLAIM";
    /// Endpoint asked whether a token may open a document (`POST`, JSON; see docs/auth.md).
    /// Empty: no authentication webhook.
    auth_webhook_url: String = String::new(), env = "HEARTH_AUTH_WEBHOOK_URL";
    /// Secret that signs every authentication webhook request (HMAC-SHA256; at least 16
    /// characters); required with `auth_webhook_url`.
    auth_webhook_secret: String = String::new(), env = "HEARTH_AUTH_WEBHOOK_SECRET";
    /// Longest wait for one authentication webhook answer, in milliseconds.
    auth_webhook_timeout_ms: u64 = 2000, env = "HEARTH_AUTH_WEBHOOK_TIMEOUT_MS";
    /// Further attempts after a failed authentication webhook call (timeout, 5xx, 429,
    /// connection error); then the client is refused.
    auth_webhook_retries: u32 = 1, env = "HEARTH_AUTH_WEBHOOK_RETRIES";
    /// How long an authentication webhook answer is reused for the same token, document and
    /// forwarded request parts, in milliseconds (0: never).
    auth_webhook_cache_ms: u64 = 10000, env = "HEARTH_AUTH_WEBHOOK_CACHE_MS";
    /// Request headers passed to the authentication webhook, comma-separated names.
    auth_webhook_headers: String = String::new(), env = "HEARTH_AUTH_WEBHOOK_HEADERS";
    /// Query parameters passed to the authentication webhook, comma-separated names.
    auth_webhook_query: String = String::new(), env = "HEARTH_AUTH_WEBHOOK_QUERY";
    /// Endpoint that receives event webhooks (`POST`, JSON, signed). Empty: none are sent.
    webhook_url: String = String::new(), env = "HEARTH_WEBHOOK_URL";
    /// Secret that signs every event webhook (HMAC-SHA256; at least 16 characters); required
    /// with `webhook_url`.
    webhook_secret: String = String::new(), env = "HEARTH_WEBHOOK_SECRET";
    /// Events sent, comma-separated: change, connect, disconnect, create, store, or all.
    webhook_events: String = "change".into(), env = "HEARTH_WEBHOOK_EVENTS";
    /// A `change` event is sent this long after the last change of a burst, in milliseconds.
    webhook_debounce_ms: u64 = 2000, env = "HEARTH_WEBHOOK_DEBOUNCE_MS";
    /// ... and at the latest this long after the burst's first change, in milliseconds.
    webhook_max_debounce_ms: u64 = 10000, env = "HEARTH_WEBHOOK_MAX_DEBOUNCE_MS";
    /// Longest wait for the endpoint to answer one event, in milliseconds.
    webhook_timeout_ms: u64 = 5000, env = "HEARTH_WEBHOOK_TIMEOUT_MS";
    /// Further attempts for an event that was not delivered (exponential backoff from 250 ms).
    webhook_retries: u32 = 5, env = "HEARTH_WEBHOOK_RETRIES";
    /// Most events waiting for delivery; beyond it new events are dropped (and counted).
    webhook_queue_size: usize = 10000, env = "HEARTH_WEBHOOK_QUEUE_SIZE";
    /// Write the bound `ip:port` to this file once listening (for scripts and tests).
    ready_file: PathBuf = PathBuf::new(), env = "HEARTH_READY_FILE";
    /// Write the operator listener's bound `ip:port` to this file (before the ready file).
    operator_ready_file: PathBuf = PathBuf::new(), env = "HEARTH_OPERATOR_READY_FILE";
    /// When updates are acknowledged: `durable` (after commit) or `memory` (on apply).
    durability: Durability = Durability::Durable, env = "HEARTH_DURABILITY";
    /// Least time between the starts of two group commits of durable appends, in
    /// milliseconds (an update arriving at an idle committer is committed at once).
    commit_interval_ms: u64 = 10, env = "HEARTH_COMMIT_INTERVAL_MS";
    /// Compaction debounce after the last change, in milliseconds.
    debounce_ms: u64 = 2000, env = "HEARTH_DEBOUNCE_MS";
    /// Longest time changes wait for compaction, in milliseconds.
    max_debounce_ms: u64 = 10000, env = "HEARTH_MAX_DEBOUNCE_MS";
    /// Keep an unused document loaded this long before storing and unloading it (ms).
    unload_delay_ms: u64 = 0, env = "HEARTH_UNLOAD_DELAY_MS";
    /// Close a socket (4408) after this long without any inbound frame (ms).
    idle_timeout_ms: u64 = 60000, env = "HEARTH_IDLE_TIMEOUT_MS";
    /// Close a socket (4408) that authenticated no document within this time (ms).
    auth_timeout_ms: u64 = 10000, env = "HEARTH_AUTH_TIMEOUT_MS";
    /// Failed authentications from one client address within `auth_failure_window_ms` that get
    /// it banned for `auth_ban_ms` (0 = never ban).
    auth_failures_before_ban: u32 = 10, env = "HEARTH_AUTH_FAILURES_BEFORE_BAN";
    /// Window in which failed authentications of one address are counted (ms).
    auth_failure_window_ms: u64 = 60000, env = "HEARTH_AUTH_FAILURE_WINDOW_MS";
    /// How long a banned address is refused (ms): upgrades get HTTP 429, Auth frames on open
    /// sockets are denied without running hooks.
    auth_ban_ms: u64 = 300000, env = "HEARTH_AUTH_BAN_MS";
    /// Most client addresses the in-memory failure and ban table of one node holds.
    auth_throttle_max_addresses: usize = 100_000, env = "HEARTH_AUTH_THROTTLE_MAX_ADDRESSES";
    /// Longest wait for Redis when counting a failure or checking a ban in a cluster (ms); the
    /// node's own table decides when Redis is slower or down.
    auth_throttle_redis_timeout_ms: u64 = 100, env = "HEARTH_AUTH_THROTTLE_REDIS_TIMEOUT_MS";
    /// WebSocket upgrades one client address may make within `connection_attempt_window_ms`
    /// (cluster-wide with Redis); one more bans the address for `auth_ban_ms`. 0: no limit.
    max_connection_attempts_per_ip: u32 = 0, env = "HEARTH_MAX_CONNECTION_ATTEMPTS_PER_IP";
    /// The window `max_connection_attempts_per_ip` counts in, in milliseconds.
    connection_attempt_window_ms: u64 = 60000, env = "HEARTH_CONNECTION_ATTEMPT_WINDOW_MS";
    /// Messages a second one connection may send (bursts of twice as many); more close it with
    /// 1008. 0: no limit.
    max_messages_per_second: u32 = 0, env = "HEARTH_MAX_MESSAGES_PER_SECOND";
    /// Bytes a second one connection may send (bursts of twice as many, at least one
    /// `max_message_bytes` message); more close it with 1008. 0: no limit.
    max_bytes_per_second: usize = 0, env = "HEARTH_MAX_BYTES_PER_SECOND";
    /// Close a client-port connection that has not sent a complete HTTP request header within
    /// this time of opening, or of its previous response (ms).
    http_header_timeout_ms: u64 = 10000, env = "HEARTH_HTTP_HEADER_TIMEOUT_MS";
    /// Most TCP connections open on the client port (lowered to fit the open-file limit).
    max_connections: usize = 10000, env = "HEARTH_MAX_CONNECTIONS";
    /// Most TCP connections open from one client address; more are answered 429.
    max_connections_per_ip: usize = 200, env = "HEARTH_MAX_CONNECTIONS_PER_IP";
    /// Proxies whose `X-Forwarded-For` names the client: comma-separated IPs and CIDR networks.
    trusted_proxies: String = String::new(), env = "HEARTH_TRUSTED_PROXIES";
    /// Send a WebSocket ping frame this often (ms; 0 = never); capped at a third of
    /// `idle_timeout_ms` so answering clients never time out.
    ping_interval_ms: u64 = 30000, env = "HEARTH_PING_INTERVAL_MS";
    /// Send the v4 application Ping (`09`) to v4 providers this often (ms; 0 = never).
    app_ping_interval_ms: u64 = 0, env = "HEARTH_APP_PING_INTERVAL_MS";
    /// Largest accepted WebSocket message (bytes); larger closes the socket with 1009.
    max_message_bytes: usize = 8 << 20, env = "HEARTH_MAX_MESSAGE_BYTES";
    /// Deepest nesting of arrays/maps inside one block of a client update (values and JSON
    /// attributes); deeper updates are refused before they are decoded.
    max_update_depth: u32 = 64, env = "HEARTH_MAX_UPDATE_DEPTH";
    /// Most blocks (structs) in one client update; larger updates are refused.
    max_update_structs: u32 = 250_000, env = "HEARTH_MAX_UPDATE_STRUCTS";
    /// Largest awareness state of one client (bytes); a larger update is ignored.
    max_awareness_state_bytes: usize = 16 << 10, env = "HEARTH_MAX_AWARENESS_STATE_BYTES";
    /// Awareness client ids one document connection may publish states for; one more closes
    /// the socket (1008).
    max_awareness_clients_per_connection: usize = 8, env = "HEARTH_MAX_AWARENESS_CLIENTS_PER_CONNECTION";
    /// Awareness client ids one document remembers (present or removed); a full document
    /// ignores new ones.
    max_awareness_clients_per_document: usize = 1000, env = "HEARTH_MAX_AWARENESS_CLIENTS_PER_DOCUMENT";
    /// Encoded size of all awareness states of one document (bytes): the largest snapshot a
    /// joiner receives; a state that would exceed it is ignored.
    max_awareness_document_bytes: usize = 4 << 20, env = "HEARTH_MAX_AWARENESS_DOCUMENT_BYTES";
    /// Awareness messages per second per document connection (updates that change something
    /// or are ignored, and queries), with a burst of two seconds' worth; faster closes the
    /// socket (1008).
    max_awareness_updates_per_sec: u32 = 30, env = "HEARTH_MAX_AWARENESS_UPDATES_PER_SEC";
    /// Bytes queued for unauthenticated addresses per socket before closing it (4205).
    preauth_max_bytes: usize = 5 << 20, env = "HEARTH_PREAUTH_MAX_BYTES";
    /// Frames queued for unauthenticated addresses per socket before closing it (4205).
    preauth_max_messages: usize = 1000, env = "HEARTH_PREAUTH_MAX_MESSAGES";
    /// Addresses pending authentication per socket before closing it (4205).
    preauth_max_documents: usize = 100, env = "HEARTH_PREAUTH_MAX_DOCUMENTS";
    /// Bytes queued towards one client before it is disconnected as a slow reader.
    outbound_queue_bytes: usize = 16 << 20, env = "HEARTH_OUTBOUND_QUEUE_BYTES";
    /// Remove awareness states not renewed within this time (ms).
    awareness_timeout_ms: u64 = 30000, env = "HEARTH_AWARENESS_TIMEOUT_MS";
    /// Most documents loaded on this node at once; opening one more is refused.
    max_documents: usize = 10_000, env = "HEARTH_MAX_DOCUMENTS";
    /// Most documents one Hocuspocus connection (socket) may open at once.
    max_documents_per_connection: usize = 256, env = "HEARTH_MAX_DOCUMENTS_PER_CONNECTION";
    /// Largest document (encoded state, bytes); updates that would grow it further are refused.
    max_document_bytes: usize = 32 << 20, env = "HEARTH_MAX_DOCUMENT_BYTES";
    /// Longest accepted document name (bytes).
    max_document_name_bytes: usize = 1024, env = "HEARTH_MAX_DOCUMENT_NAME_BYTES";
    /// How long a graceful shutdown may take before the process exits anyway (ms).
    shutdown_timeout_ms: u64 = 10000, env = "HEARTH_SHUTDOWN_TIMEOUT_MS";
    /// How long storage (or, in a cluster, Redis) may stay unreachable before `/readyz` answers
    /// 503 (ms). Shorter outages leave the node ready: every node sees the same database, so
    /// taking them all out of the balancer at once would only turn a blip into an outage. 0: not
    /// ready as soon as a check fails.
    readiness_outage_ms: u64 = 30000, env = "HEARTH_READINESS_OUTAGE_MS";
    /// Largest single memory allocation the process makes (bytes); bigger requests fail
    /// (defends against length-prefix memory bombs in client updates).
    max_allocation_bytes: usize = crate::alloc::DEFAULT_CAP, env = "HEARTH_MAX_ALLOCATION_BYTES";
    /// Redis URL; setting it turns on the cluster (one owner per document, proxying).
    redis_url: String = String::new(), env = "HEARTH_REDIS_URL";
    /// Prefix of every Redis key and channel of this cluster.
    redis_prefix: String = "hearth".into(), env = "HEARTH_REDIS_PREFIX";
    /// PEM file of the CA(s) that verify Redis's TLS certificate (`rediss://`), instead of the
    /// system's roots.
    redis_tls_ca_file: PathBuf = PathBuf::new(), env = "HEARTH_REDIS_TLS_CA_FILE";
    /// PEM client certificate (chain) presented to Redis over TLS; with `redis_tls_key_file`.
    redis_tls_cert_file: PathBuf = PathBuf::new(), env = "HEARTH_REDIS_TLS_CERT_FILE";
    /// PEM private key of `redis_tls_cert_file`.
    redis_tls_key_file: PathBuf = PathBuf::new(), env = "HEARTH_REDIS_TLS_KEY_FILE";
    /// Pub/sub between nodes: `auto` (sharded on a `redis-cluster://` URL, else classic),
    /// `classic` (`PUBLISH`/`SUBSCRIBE`) or `sharded` (`SPUBLISH`/`SSUBSCRIBE`, Redis 7+).
    redis_pubsub: RedisPubSub = RedisPubSub::Auto, env = "HEARTH_REDIS_PUBSUB";
    /// Ownership lock time-to-live (ms); refreshed every third of it.
    lock_ttl_ms: u64 = 10000, env = "HEARTH_LOCK_TTL_MS";
    /// An owner drops a proxied attachment whose edge node was silent this long (ms).
    proxy_socket_ttl_ms: u64 = 30000, env = "HEARTH_PROXY_SOCKET_TTL_MS";
    /// Largest frame proxied between nodes (bytes; at least `max_message_bytes`): bounds the
    /// owner's sync answer to a client on another node and the memory reassembling it there.
    max_proxied_frame_bytes: usize = 64 << 20, env = "HEARTH_MAX_PROXIED_FRAME_BYTES";
    /// How long a custom event waits for the owner's reply (ms).
    custom_event_ttl_ms: u64 = 30000, env = "HEARTH_CUSTOM_EVENT_TTL_MS";
    /// Send envelopes queued for the same node at the same time as one Redis message, with a
    /// frame for several clients of that node sent once (only to nodes that read batches).
    cluster_batching: bool = true, env = "HEARTH_CLUSTER_BATCHING";
    /// Shared secret authenticating cross-node envelopes (HMAC-SHA256); required in a cluster:
    /// at least 32 bytes, no placeholder, e.g. `openssl rand -base64 48`.
    cluster_secret: String = String::new(), env = "HEARTH_CLUSTER_SECRET";
    /// File holding the cluster secret (instead of `cluster_secret`; trailing whitespace and
    /// newlines are ignored), e.g. a mounted Kubernetes Secret.
    cluster_secret_file: PathBuf = PathBuf::new(), env = "HEARTH_CLUSTER_SECRET_FILE";
    /// The previous cluster secret, still accepted (never used to sign) while a new one rolls
    /// out (docs/cluster.md, "Rotating the cluster secret").
    cluster_secret_previous: String = String::new(), env = "HEARTH_CLUSTER_SECRET_PREVIOUS";
    /// File holding the previous cluster secret (instead of `cluster_secret_previous`).
    cluster_secret_previous_file: PathBuf = PathBuf::new(), env = "HEARTH_CLUSTER_SECRET_PREVIOUS_FILE";
    /// Log format: `text` or `json` (level via `RUST_LOG`, default info).
    log_format: LogFormat = LogFormat::Text, env = "HEARTH_LOG_FORMAT";
}

/// A configuration problem found at start-up.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The TOML file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The TOML file is malformed or has unknown keys.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// File path.
        path: PathBuf,
        /// Parser message.
        message: String,
    },
    /// A value is out of range or inconsistent with another.
    #[error("invalid setting {name}: {message}")]
    Invalid {
        /// Setting name.
        name: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// One secret given inline or as a file (not both), checked; `None` when neither is set.
fn secret_setting(
    (name, inline): (&'static str, &str),
    (file_name, file): (&'static str, &std::path::Path),
) -> Result<Option<hearth_proxy::Secret>, ConfigError> {
    let (name, bytes) = match (inline.is_empty(), file.as_os_str().is_empty()) {
        (true, true) => return Ok(None),
        (false, false) => {
            return Err(ConfigError::Invalid {
                name: file_name,
                message: format!("cannot be combined with {name}: set one of them"),
            });
        }
        (false, true) => (name, inline.as_bytes().to_vec()),
        (true, false) => {
            let mut bytes = std::fs::read(file).map_err(|e| ConfigError::Invalid {
                name: file_name,
                message: format!("cannot read {}: {e}", file.display()),
            })?;
            while bytes.last().is_some_and(u8::is_ascii_whitespace) {
                bytes.pop();
            }
            (file_name, bytes)
        }
    };
    hearth_proxy::Secret::new(bytes)
        .map(Some)
        .map_err(|e| ConfigError::Invalid {
            name,
            message: format!("the secret {e}; generate one with `openssl rand -base64 48`"),
        })
}

fn default_node_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "hearth".into())
}

impl Config {
    /// Merges flags/env with the optional TOML file and validates.
    pub fn from_settings(settings: Settings) -> Result<Self, ConfigError> {
        let file = match &settings.config {
            None => FileSettings::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: path.clone(),
                    message: e.to_string(),
                })?
            }
        };
        let config = Self::merge(settings, file);
        config.validate()?;
        Ok(config)
    }

    /// A configuration for tests: loopback port 0 (client and operator listeners), in-memory
    /// storage, short timers.
    pub fn for_tests() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            operator_listen: "127.0.0.1:0".into(),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            node_id: "test".into(),
            database_url: "memory://".into(),
            ..Self::default()
        }
    }

    /// Checks ranges and cross-field rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |name, message: &str| {
            Err(ConfigError::Invalid {
                name,
                message: message.into(),
            })
        };
        if self.max_debounce_ms < self.debounce_ms {
            return invalid("max_debounce_ms", "must be >= debounce_ms");
        }
        if self.max_message_bytes < 1024 {
            return invalid("max_message_bytes", "must be at least 1024");
        }
        if self.outbound_queue_bytes < self.max_message_bytes {
            return invalid("outbound_queue_bytes", "must be >= max_message_bytes");
        }
        if !(1..=1024).contains(&self.max_update_depth) {
            return invalid("max_update_depth", "must be between 1 and 1024");
        }
        if self.max_documents == 0 || self.max_documents_per_connection == 0 {
            return invalid("max_documents", "document limits must be > 0");
        }
        if self.max_document_bytes < 1024 {
            return invalid("max_document_bytes", "must be at least 1024");
        }
        if self.max_update_structs == 0 {
            return invalid("max_update_structs", "must be > 0");
        }
        if self.max_awareness_clients_per_connection == 0 {
            return invalid("max_awareness_clients_per_connection", "must be > 0");
        }
        if self.max_awareness_clients_per_document == 0 {
            return invalid("max_awareness_clients_per_document", "must be > 0");
        }
        if self.max_awareness_updates_per_sec == 0 {
            return invalid("max_awareness_updates_per_sec", "must be > 0");
        }
        if self.max_awareness_document_bytes < self.max_awareness_state_bytes.saturating_add(64) {
            return invalid(
                "max_awareness_document_bytes",
                "must be at least max_awareness_state_bytes + 64",
            );
        }
        if self.idle_timeout_ms == 0 || self.auth_timeout_ms == 0 {
            return invalid("idle_timeout_ms", "timeouts must be > 0");
        }
        if self.http_header_timeout_ms == 0 {
            return invalid("http_header_timeout_ms", "must be > 0");
        }
        if self.max_connections == 0 {
            return invalid("max_connections", "must be > 0");
        }
        if self.max_connections_per_ip == 0 {
            return invalid("max_connections_per_ip", "must be > 0");
        }
        if let Err(e) = crate::client_ip::TrustedProxies::parse(&self.trusted_proxies) {
            return invalid("trusted_proxies", &e.to_string());
        }
        if self.admin_requests_per_second == 0 {
            return invalid("admin_requests_per_second", "must be > 0");
        }
        if self.admin_max_body_bytes < 1024 {
            return invalid("admin_max_body_bytes", "must be >= 1024");
        }
        if self.operator_addr().is_err() {
            return invalid(
                "operator_listen",
                "expected ip:port (e.g. 127.0.0.1:9464), or empty to disable",
            );
        }
        if self.node_id.is_empty()
            || self.node_id.len() > hearth_proxy::MAX_NODE_ID_LEN
            || !self
                .node_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return invalid(
                "node_id",
                "use 1 to 64 ASCII letters, digits, '-', '_' or '.'",
            );
        }
        if !(self.database_url.starts_with("sqlite:")
            || self.database_url.starts_with("postgres://")
            || self.database_url.starts_with("postgresql://")
            || self.database_url.starts_with("memory:"))
        {
            return invalid(
                "database_url",
                "expected sqlite://PATH, postgres://… or memory://",
            );
        }
        if let Err(e) = crate::storage::sql::check_table_prefix(&self.database_table_prefix) {
            return invalid("database_table_prefix", &e);
        }
        if self.is_cluster() {
            if self.lock_ttl_ms < 300 {
                return invalid("lock_ttl_ms", "must be at least 300");
            }
            if self.proxy_socket_ttl_ms < 300 {
                return invalid("proxy_socket_ttl_ms", "must be at least 300");
            }
            self.cluster_secrets()?;
            if self.database_url.starts_with("memory:") {
                return invalid(
                    "database_url",
                    "a cluster needs a shared database (postgres:// or a shared sqlite file)",
                );
            }
        }
        if self.auth_failures_before_ban > 0 {
            if self.auth_failure_window_ms == 0 || self.auth_ban_ms == 0 {
                return invalid(
                    "auth_ban_ms",
                    "auth_failure_window_ms and auth_ban_ms must be > 0",
                );
            }
            if self.auth_throttle_max_addresses == 0 {
                return invalid("auth_throttle_max_addresses", "must be > 0");
            }
            if !(1..=10_000).contains(&self.auth_throttle_redis_timeout_ms) {
                return invalid(
                    "auth_throttle_redis_timeout_ms",
                    "must be between 1 and 10000",
                );
            }
        }
        if self.redis_is_cluster() && self.redis_pubsub == RedisPubSub::Classic {
            return invalid(
                "redis_pubsub",
                "classic pub/sub cannot count a message's receivers on a Redis Cluster \
                 (redis_url is redis-cluster://): use auto or sharded",
            );
        }
        secrets::check(self)?;
        crate::tokens::TokenTable::parse(&self.auth_tokens).map_err(|message| {
            ConfigError::Invalid {
                name: "auth_tokens",
                message,
            }
        })?;
        Ok(())
    }

    /// The cluster secrets, from `cluster_secret` or `cluster_secret_file` and (optionally)
    /// `cluster_secret_previous` or `cluster_secret_previous_file`, checked against the
    /// strength policy (`hearth_proxy::Secret`). Files are read on every call.
    pub fn cluster_secrets(&self) -> Result<hearth_proxy::Secrets, ConfigError> {
        let current = secret_setting(
            ("cluster_secret", &self.cluster_secret),
            ("cluster_secret_file", &self.cluster_secret_file),
        )?
        .ok_or_else(|| ConfigError::Invalid {
            name: "cluster_secret",
            message: "is required in a cluster (redis_url is set): set HEARTH_CLUSTER_SECRET or \
                      HEARTH_CLUSTER_SECRET_FILE to 32+ random bytes, e.g. `openssl rand -base64 48`"
                .into(),
        })?;
        let previous = secret_setting(
            ("cluster_secret_previous", &self.cluster_secret_previous),
            (
                "cluster_secret_previous_file",
                &self.cluster_secret_previous_file,
            ),
        )?;
        let secrets = hearth_proxy::Secrets::new(current);
        Ok(match previous {
            Some(p) => secrets.with_previous(p),
            None => secrets,
        })
    }

    /// How often sockets are pinged: `ping_interval_ms`, but at least three times per idle
    /// timeout, so a client that answers pings is never closed as idle. `None` = never.
    pub fn effective_ping_interval(&self) -> Option<Duration> {
        (self.ping_interval_ms > 0).then(|| {
            Duration::from_millis(self.ping_interval_ms.min(self.idle_timeout_ms / 3).max(10))
        })
    }

    /// Bounds for scanning client updates.
    pub fn scan_limits(&self) -> crate::protocol::scan::ScanLimits {
        crate::protocol::scan::ScanLimits {
            max_depth: self.max_update_depth,
            max_structs: self.max_update_structs,
            max_delete_ranges: self.max_update_structs,
        }
    }

    /// Bounds on one document's awareness.
    pub fn awareness_limits(&self) -> crate::protocol::awareness::Limits {
        crate::protocol::awareness::Limits {
            per_owner: self.max_awareness_clients_per_connection,
            clients: self.max_awareness_clients_per_document,
            bytes: self.max_awareness_document_bytes,
        }
    }

    /// Bounds for scanning stored state: the same depth, no count limit (a stored snapshot
    /// holds a whole document).
    pub fn storage_scan_limits(&self) -> crate::protocol::scan::ScanLimits {
        crate::protocol::scan::ScanLimits {
            max_depth: self.max_update_depth,
            max_structs: u32::MAX,
            max_delete_ranges: u32::MAX,
        }
    }

    /// The operator listener's address; `None` when `operator_listen` is empty (disabled).
    pub fn operator_addr(&self) -> Result<Option<SocketAddr>, std::net::AddrParseError> {
        let s = self.operator_listen.trim();
        if s.is_empty() {
            Ok(None)
        } else {
            s.parse().map(Some)
        }
    }

    /// The admin API's bearer tokens (empty: the admin API is off). Each must be at least 16
    /// characters, printable ASCII without spaces, and pass the secret strength policy (no
    /// placeholder).
    pub fn admin_token_list(&self) -> Result<Vec<String>, String> {
        let mut out = Vec::new();
        for (i, t) in self.admin_tokens.split(',').map(str::trim).enumerate() {
            if t.is_empty() {
                continue;
            }
            if t.len() < secrets::MIN_TOKEN_LEN {
                return Err(format!(
                    "token {} is {} characters long; at least {} are required",
                    i + 1,
                    t.len(),
                    secrets::MIN_TOKEN_LEN
                ));
            }
            if !t.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!(
                    "token {} contains a space or a non-ASCII character",
                    i + 1
                ));
            }
            hearth_proxy::check_secret(t.as_bytes(), secrets::MIN_TOKEN_LEN).map_err(|e| {
                format!(
                    "token {} {e}; generate one with `openssl rand -base64 48`",
                    i + 1
                )
            })?;
            out.push(t.to_owned());
        }
        Ok(out)
    }

    /// Whether `redis_url` names a Redis Cluster (`redis-cluster://`, `rediss-cluster://`,
    /// and the `valkey` spellings).
    pub fn redis_is_cluster(&self) -> bool {
        self.redis_url
            .split_once("://")
            .is_some_and(|(scheme, _)| scheme.ends_with("-cluster"))
    }

    /// Whether the cluster's pub/sub is sharded: `redis_pubsub`, with `auto` resolved by
    /// [`Config::redis_is_cluster`].
    pub fn redis_pubsub_sharded(&self) -> bool {
        match self.redis_pubsub {
            RedisPubSub::Auto => self.redis_is_cluster(),
            RedisPubSub::Classic => false,
            RedisPubSub::Sharded => true,
        }
    }

    /// True when `redis_url` is set.
    pub fn is_cluster(&self) -> bool {
        !self.redis_url.is_empty()
    }

    /// `debounce_ms` as a duration.
    pub fn debounce(&self) -> Duration {
        Duration::from_millis(self.debounce_ms)
    }
    /// `max_debounce_ms` as a duration.
    pub fn max_debounce(&self) -> Duration {
        Duration::from_millis(self.max_debounce_ms)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn defaults_and_precedence() {
        let d = Config::default();
        assert_eq!(d.listen.port(), 1234);
        assert_eq!(d.database_url, "sqlite://hearth.db");
        let dir = std::env::temp_dir().join(format!("hearth-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("h.toml");
        std::fs::write(
            &file,
            "debounce_ms = 500\nmax_debounce_ms = 900\nlisten = \"127.0.0.1:9\"\n",
        )
        .unwrap();
        let cli = Cli::try_parse_from([
            "hearth",
            "--config",
            file.to_str().unwrap(),
            "--listen",
            "127.0.0.1:7",
        ])
        .unwrap();
        let c = Config::from_settings(cli.into_parts().1).unwrap();
        assert_eq!(c.listen.port(), 7, "flag beats file");
        assert_eq!(c.debounce_ms, 500, "file beats default");
        std::fs::write(&file, "no_such_key = 1\n").unwrap();
        let cli = Cli::try_parse_from(["hearth", "--config", file.to_str().unwrap()]).unwrap();
        assert!(matches!(
            Config::from_settings(cli.into_parts().1),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn serve_subcommand_takes_the_same_flags() {
        let cli = Cli::try_parse_from([
            "hearth",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--durability",
            "memory",
        ])
        .unwrap();
        assert!(matches!(cli.command, Some(Command::Serve(_))));
        let c = Config::from_settings(cli.into_parts().1).unwrap();
        assert_eq!(c.durability, Durability::Memory);
        assert_eq!(c.listen.port(), 0);
    }

    #[test]
    fn subcommands_take_their_own_settings_and_the_servers_before_them() {
        // after the subcommand: only its own settings
        assert!(Cli::try_parse_from(["hearth", "health", "--max-connections", "5"]).is_err());
        assert!(
            Cli::try_parse_from(["hearth", "cluster", "status", "--listen", "127.0.0.1:1"])
                .is_err()
        );
        let cli = Cli::try_parse_from([
            "hearth",
            "--redis-prefix",
            "before",
            "--custom-event-ttl-ms",
            "7",
            "cluster",
            "emit",
            "d",
            "e",
            "--redis-prefix",
            "after",
        ])
        .unwrap();
        let (command, settings) = cli.into_parts();
        assert!(matches!(
            command,
            Some(Command::Cluster(ClusterCommand::Emit { .. }))
        ));
        assert_eq!(
            settings.redis_prefix.as_deref(),
            Some("after"),
            "after wins"
        );
        assert_eq!(
            settings.custom_event_ttl_ms,
            Some(7),
            "before still applies"
        );
        let cli = Cli::try_parse_from(["hearth", "health", "--listen", "127.0.0.1:9"]).unwrap();
        assert_eq!(
            cli.into_parts().1.listen,
            Some(SocketAddr::from(([127, 0, 0, 1], 9)))
        );
    }

    #[test]
    fn help_shows_defaults_and_subcommand_help_only_its_settings() {
        use clap::CommandFactory as _;
        let mut cmd = Cli::command();
        let help = cmd.render_help().to_string();
        assert!(help.contains("[default: 30000]"), "{help}");
        assert!(help.contains("[default: sqlite://hearth.db]"), "{help}");
        assert!(help.contains("[default: durable]"), "{help}");
        assert!(!help.contains("[default: ]"), "{help}");
        let cluster = cmd.find_subcommand_mut("cluster").unwrap();
        let emit = cluster
            .find_subcommand_mut("emit")
            .unwrap()
            .render_help()
            .to_string();
        assert!(emit.contains("--redis-url"), "{emit}");
        assert!(emit.contains("--cluster-secret"), "{emit}");
        assert!(!emit.contains("--max-connections"), "{emit}");
        assert!(!emit.contains("--database-url"), "{emit}");
        let health = cmd
            .find_subcommand_mut("health")
            .unwrap()
            .render_help()
            .to_string();
        assert!(health.contains("--listen"), "{health}");
        assert!(!health.contains("--redis-url"), "{health}");
        for name in ["doc", "event", "auth"] {
            let text = cmd
                .find_subcommand_mut(name)
                .unwrap()
                .render_help()
                .to_string();
            assert!(!text.contains("--listen"), "{name}: {text}");
        }
    }

    #[test]
    fn debug_output_hides_secrets() {
        let c = Config {
            cluster_secret: "k3Jd9Qm2Vx7Lp4Rt8Wn1Zc6Hf0Bs5Yg2Ue7Ia4Oq9Mv3Xb".into(),
            cluster_secret_previous: "Zq8Wm1Xr4Tb7Yn2Kc5Hv9Js3Ld6Fg0Pa".into(),
            auth_tokens: "tok-abc=read-write".into(),
            database_url: "postgres://app:pg-pass@db.internal:5432/hearth?sslmode=require".into(),
            redis_url: "redis://:redis-pass@cache:6379/0".into(),
            ..Config::default()
        };
        let text = format!("{c:?}");
        for secret in ["k3Jd9Qm2", "Zq8Wm1Xr", "tok-abc", "pg-pass", "redis-pass"] {
            assert!(!text.contains(secret), "{secret} printed: {text}");
        }
        assert!(text.contains("postgres://app:***@db.internal:5432/hearth"));
        assert!(text.contains("redis://:***@cache:6379/0"));
        assert!(text.contains("cluster_secret: <redacted>"));
        // unset secrets and URLs without passwords print as they are
        let text = format!("{:?}", Config::default());
        assert!(text.contains("cluster_secret: \"\""));
        assert!(text.contains("sqlite://hearth.db"));
    }

    #[test]
    fn validation_rejects_bad_values() {
        let c = Config {
            max_debounce_ms: 1,
            ..Config::default()
        };
        assert!(c.validate().is_err());
        let c = Config {
            auth_tokens: "a=superuser".into(),
            ..Config::default()
        };
        assert!(c.validate().is_err());
        let c = Config {
            database_url: "mysql://x".into(),
            ..Config::default()
        };
        assert!(c.validate().is_err());
        let c = Config {
            max_awareness_document_bytes: 1 << 10,
            ..Config::default()
        };
        assert!(
            c.validate().is_err(),
            "one largest state must fit a document"
        );
    }
}

#[cfg(test)]
mod secret_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const STRONG: &str = "Wq5Xm1Lr9Kz3Tb7Vn2Hc6Pd4Jf8Gs0Ya";
    const OTHER: &str = "Lk8Wq2Xz6Rm4Tv0Bn9Hc3Pd7Jf1Gs5Ye";

    fn cluster(f: impl FnOnce(&mut Config)) -> Config {
        let mut c = Config {
            redis_url: "redis://127.0.0.1:6379".into(),
            database_url: "sqlite://x.db".into(),
            ..Config::default()
        };
        f(&mut c);
        c
    }

    fn refusal(c: &Config) -> (&'static str, String) {
        match c.validate() {
            Err(ConfigError::Invalid { name, message }) => (name, message),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn redis_pubsub_follows_the_url_and_refuses_classic_on_a_redis_cluster() {
        let on = |url: &str, mode: RedisPubSub| {
            cluster(|c| {
                c.redis_url = url.into();
                c.redis_pubsub = mode;
                c.cluster_secret = STRONG.into();
            })
        };
        let standalone = on("redis://127.0.0.1:6379", RedisPubSub::Auto);
        assert!(standalone.validate().is_ok());
        assert!(!standalone.redis_pubsub_sharded());
        assert!(
            on("redis://127.0.0.1:6379", RedisPubSub::Sharded).redis_pubsub_sharded(),
            "sharded may be chosen on a standalone Redis 7"
        );
        for url in [
            "redis-cluster://127.0.0.1:7000?node=127.0.0.1:7001",
            "rediss-cluster://127.0.0.1:7000",
        ] {
            let auto = on(url, RedisPubSub::Auto);
            assert!(auto.validate().is_ok(), "{url}");
            assert!(auto.redis_pubsub_sharded(), "{url}");
            let (name, message) = refusal(&on(url, RedisPubSub::Classic));
            assert_eq!(name, "redis_pubsub");
            assert!(message.contains("Redis Cluster"), "{message}");
        }
    }

    #[test]
    fn a_cluster_needs_a_strong_secret() {
        let (name, message) = refusal(&cluster(|_| {}));
        assert_eq!(name, "cluster_secret");
        assert!(message.contains("required"), "{message}");
        for weak in [
            "change-me",
            "change-me-1234567890123456789012",
            "CHANGEME-changeme-1234567890-!!!!",
            "my-hearth-cluster-secret-password",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        ] {
            let (name, message) = refusal(&cluster(|c| c.cluster_secret = weak.into()));
            assert_eq!(name, "cluster_secret", "{weak}");
            assert!(
                !message.contains(weak),
                "the message quotes the secret: {message}"
            );
            assert!(!message.contains('\n'), "one line: {message}");
        }
        assert!(
            cluster(|c| c.cluster_secret = STRONG.into())
                .validate()
                .is_ok()
        );
        // a single node needs none
        assert!(Config::default().validate().is_ok());
        // the previous secret is checked too
        let (name, _) = refusal(&cluster(|c| {
            c.cluster_secret = STRONG.into();
            c.cluster_secret_previous = "old-secret".into();
        }));
        assert_eq!(name, "cluster_secret_previous");
        let c = cluster(|c| {
            c.cluster_secret = STRONG.into();
            c.cluster_secret_previous = OTHER.into();
        });
        let secrets = c.cluster_secrets().unwrap();
        assert_eq!(secrets.current.expose(), STRONG.as_bytes());
        assert_eq!(secrets.previous.unwrap().expose(), OTHER.as_bytes());
    }

    #[test]
    fn secrets_from_files() {
        let dir = std::env::temp_dir().join(format!("hearth-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secret");
        std::fs::write(&file, format!("{STRONG}\n")).unwrap();
        let c = cluster(|c| c.cluster_secret_file = file.clone());
        assert_eq!(
            c.cluster_secrets().unwrap().current.expose(),
            STRONG.as_bytes(),
            "the trailing newline is not part of the secret"
        );
        let (name, message) = refusal(&cluster(|c| {
            c.cluster_secret_file = file.clone();
            c.cluster_secret = STRONG.into();
        }));
        assert_eq!(name, "cluster_secret_file");
        assert!(message.contains("cannot be combined"), "{message}");
        let (name, message) = refusal(&cluster(|c| c.cluster_secret_file = dir.join("missing")));
        assert_eq!(name, "cluster_secret_file");
        assert!(message.contains("cannot read"), "{message}");
        std::fs::write(&file, "change-me-1234567890123456789012\n").unwrap();
        let (name, message) = refusal(&cluster(|c| c.cluster_secret_file = file.clone()));
        assert_eq!(name, "cluster_secret_file");
        assert!(message.contains("placeholder"), "{message}");
        let previous = dir.join("previous");
        std::fs::write(&file, STRONG).unwrap();
        std::fs::write(&previous, OTHER).unwrap();
        let c = cluster(|c| {
            c.cluster_secret_file = file.clone();
            c.cluster_secret_previous_file = previous.clone();
        });
        assert_eq!(
            c.cluster_secrets().unwrap().previous.unwrap().expose(),
            OTHER.as_bytes()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn throttle_settings_are_checked() {
        let c = Config {
            auth_ban_ms: 0,
            ..Config::default()
        };
        assert!(c.validate().is_err());
        let c = Config {
            auth_ban_ms: 0,
            auth_failures_before_ban: 0,
            ..Config::default()
        };
        assert!(c.validate().is_ok(), "no ban, nothing to check");
    }
}

#[cfg(test)]
mod docs_tests {
    #![allow(clippy::unwrap_used)]

    /// docs/configuration.md must list every setting's environment variable.
    #[test]
    fn configuration_reference_lists_every_setting() {
        let doc = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/docs/configuration.md"
        ))
        .unwrap();
        for (name, env, _) in super::Config::reference() {
            assert!(
                doc.contains(&format!("`{env}`")),
                "docs/configuration.md lacks {env} ({name})"
            );
            assert!(
                doc.contains(&format!("`--{}`", name.replace('_', "-"))),
                "docs/configuration.md lacks --{name}"
            );
        }
    }
}
