//! Prometheus metrics, registered into a registry the server owns (never the global default,
//! so several servers can live in one test process). Document names are never labels.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// Every metric the server records.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// Open WebSocket connections.
    pub sockets: IntGauge,
    /// Open TCP connections on the client port (plain HTTP and upgraded).
    pub connections_open: IntGauge,
    /// Client-port connections refused, by reason (`node_limit`, `ip_limit`).
    pub connections_refused: IntCounterVec,
    /// Client-port connections closed because no complete request header arrived in time.
    pub http_header_timeouts: IntCounter,
    /// Admin API requests by route template and HTTP status.
    pub admin_requests: IntCounterVec,
    /// Established document connections (client attachments).
    pub doc_connections: IntGauge,
    /// Loaded documents.
    pub documents: IntGauge,
    /// Frames received, by message type.
    pub frames_in: IntCounterVec,
    /// Frames sent.
    pub frames_out: IntCounter,
    /// Bytes received in WebSocket messages.
    pub bytes_in: IntCounter,
    /// Authentication outcomes (`ok`, `denied`, `load_failed`).
    pub auth: IntCounterVec,
    /// Failed authentications counted by the throttle (tokens refused by `on_connect` or
    /// `on_authenticate`).
    pub auth_failures: IntCounter,
    /// Client addresses this node banned after repeated failed authentication.
    pub auth_bans: IntCounter,
    /// Client addresses this node currently refuses (its own bans and those seen in Redis).
    pub auth_banned: IntGauge,
    /// Upgrades and Auth frames refused because their address is banned, by `at`
    /// (`upgrade`, `auth`).
    pub auth_throttled: IntCounterVec,
    /// Client updates applied (changed the document).
    pub updates_applied: IntCounter,
    /// Client updates refused, by reason.
    pub updates_rejected: IntCounterVec,
    /// Sockets closed by the server, by close code.
    pub closes: IntCounterVec,
    /// Clients disconnected because their outbound queue overflowed.
    pub slow_readers: IntCounter,
    /// Panics caught while handling a document (document reset).
    pub panics: IntCounter,
    /// Document loads, by result.
    pub loads: IntCounterVec,
    /// Load latency.
    pub load_seconds: Histogram,
    /// Storage operations, by op and result.
    pub store_ops: IntCounterVec,
    /// Storage latency, by op (`append`, `compact`, `load`, `acquire_epoch`).
    pub store_seconds: HistogramVec,
    /// Items per group commit.
    pub commit_batch_items: Histogram,
    /// Updates per group commit.
    pub commit_batch_updates: Histogram,
    /// Client updates applied but not yet acknowledged (durable mode).
    pub pending_acks: IntGauge,
    /// Time from applying an update to sending its acknowledgement.
    pub ack_seconds: Histogram,
    /// Writes rejected because the writer's epoch is stale.
    pub fenced_writes: IntCounter,
    /// Failed storage writes (retried).
    pub failed_writes: IntCounter,
    /// Log entries folded by each compaction.
    pub compaction_log_len: Histogram,
    /// Documents with changes not yet committed.
    pub dirty_documents: IntGauge,
    /// 1 while the last storage write succeeded, 0 after a failure (counts as storage down for
    /// `/readyz`).
    pub storage_write_ok: IntGauge,
    /// 1 while the last check of a dependency (`storage`, `redis`) succeeded, by `dependency`.
    pub dependency_up: IntGaugeVec,
    /// Awareness states held, all documents together.
    pub awareness_states: IntGauge,
    /// Encoded size of the awareness states held, all documents together.
    pub awareness_bytes: IntGauge,
    /// Awareness states dropped and clients disconnected by an awareness limit, by reason.
    pub awareness_refused: IntCounterVec,
}

fn buckets_seconds() -> Vec<f64> {
    vec![
        0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ]
}

impl Metrics {
    /// Creates and registers every metric in a fresh registry.
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let gauge = |n: &str, h: &str| -> prometheus::Result<IntGauge> {
            let g = IntGauge::new(n, h)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let counter = |n: &str, h: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::new(n, h)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let counter_vec = |n: &str, h: &str, l: &[&str]| -> prometheus::Result<IntCounterVec> {
            let c = IntCounterVec::new(Opts::new(n, h), l)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let histogram = |n: &str, h: &str, b: Vec<f64>| -> prometheus::Result<Histogram> {
            let x = Histogram::with_opts(HistogramOpts::new(n, h).buckets(b))?;
            registry.register(Box::new(x.clone()))?;
            Ok(x)
        };
        let counts = vec![
            1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0,
        ];
        let store_seconds = HistogramVec::new(
            HistogramOpts::new("hearth_store_seconds", "Storage operation latency")
                .buckets(buckets_seconds()),
            &["op"],
        )?;
        registry.register(Box::new(store_seconds.clone()))?;
        // which build runs, and the process's own CPU, memory and descriptors (`process_*`)
        let build = IntGaugeVec::new(
            Opts::new(
                "hearth_build_info",
                "Always 1; the labels say which build of Hearth runs",
            ),
            &["version"],
        )?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        registry.register(Box::new(build))?;
        let dependency_up = IntGaugeVec::new(
            Opts::new(
                "hearth_dependency_up",
                "1 while the last background check of the dependency succeeded, else 0",
            ),
            &["dependency"],
        )?;
        registry.register(Box::new(dependency_up.clone()))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let m = Self {
            sockets: gauge("hearth_sockets", "Open WebSocket connections")?,
            connections_open: gauge(
                "hearth_connections_open",
                "Open TCP connections on the client port",
            )?,
            connections_refused: counter_vec(
                "hearth_connections_refused_total",
                "Client-port connections refused by a connection cap",
                &["reason"],
            )?,
            http_header_timeouts: counter(
                "hearth_http_header_timeouts_total",
                "Connections closed for not sending a complete request header in time",
            )?,
            admin_requests: counter_vec(
                "hearth_admin_requests_total",
                "Admin API requests by route and HTTP status",
                &["route", "status"],
            )?,
            doc_connections: gauge(
                "hearth_document_connections",
                "Established document connections",
            )?,
            documents: gauge("hearth_documents_loaded", "Loaded documents")?,
            frames_in: counter_vec(
                "hearth_frames_in_total",
                "Frames received by type",
                &["type"],
            )?,
            frames_out: counter("hearth_frames_out_total", "Frames sent")?,
            bytes_in: counter("hearth_bytes_in_total", "Bytes received")?,
            auth: counter_vec("hearth_auth_total", "Authentication outcomes", &["result"])?,
            auth_failures: counter(
                "hearth_auth_failures_total",
                "Failed authentications counted by the throttle",
            )?,
            auth_bans: counter(
                "hearth_auth_bans_total",
                "Client addresses banned by this node after repeated failed authentication",
            )?,
            auth_banned: gauge(
                "hearth_auth_banned_addresses",
                "Client addresses this node currently refuses",
            )?,
            auth_throttled: counter_vec(
                "hearth_auth_throttled_total",
                "Upgrades and Auth frames refused because their client address is banned",
                &["at"],
            )?,
            updates_applied: counter(
                "hearth_updates_applied_total",
                "Updates that changed a document",
            )?,
            updates_rejected: counter_vec(
                "hearth_updates_rejected_total",
                "Updates refused",
                &["reason"],
            )?,
            closes: counter_vec(
                "hearth_socket_closes_total",
                "Sockets closed by the server",
                &["code"],
            )?,
            slow_readers: counter(
                "hearth_slow_reader_disconnects_total",
                "Clients disconnected as slow readers",
            )?,
            panics: counter(
                "hearth_panics_caught_total",
                "Panics caught in document handling",
            )?,
            loads: counter_vec(
                "hearth_document_loads_total",
                "Document loads by result",
                &["result"],
            )?,
            load_seconds: histogram(
                "hearth_document_load_seconds",
                "Document load latency",
                buckets_seconds(),
            )?,
            store_ops: counter_vec(
                "hearth_store_ops_total",
                "Storage operations",
                &["op", "result"],
            )?,
            store_seconds,
            commit_batch_items: histogram(
                "hearth_commit_batch_documents",
                "Documents per group commit",
                counts.clone(),
            )?,
            commit_batch_updates: histogram(
                "hearth_commit_batch_updates",
                "Updates per group commit",
                counts.clone(),
            )?,
            pending_acks: gauge(
                "hearth_pending_acks",
                "Applied updates awaiting their durable acknowledgement",
            )?,
            ack_seconds: histogram(
                "hearth_ack_seconds",
                "Apply-to-acknowledgement latency",
                buckets_seconds(),
            )?,
            fenced_writes: counter(
                "hearth_fenced_writes_total",
                "Writes rejected by epoch fencing",
            )?,
            failed_writes: counter(
                "hearth_failed_writes_total",
                "Storage writes that failed (retried)",
            )?,
            compaction_log_len: histogram(
                "hearth_compaction_log_entries",
                "Log entries folded per compaction",
                counts,
            )?,
            dirty_documents: gauge(
                "hearth_dirty_documents",
                "Documents with uncommitted changes",
            )?,
            storage_write_ok: gauge(
                "hearth_storage_write_ok",
                "1 while storage writes succeed, 0 after a failure",
            )?,
            awareness_states: gauge(
                "hearth_awareness_states",
                "Awareness states held (all documents)",
            )?,
            awareness_bytes: gauge(
                "hearth_awareness_bytes",
                "Encoded size of the awareness states held (all documents)",
            )?,
            dependency_up,
            awareness_refused: counter_vec(
                "hearth_awareness_refused_total",
                "Awareness states dropped or clients disconnected by an awareness limit",
                &["reason"],
            )?,
            registry,
        };
        m.storage_write_ok.set(1);
        // at 0 from the start, so `increase()` in an alert sees the first refusal
        for reason in ["node_limit", "ip_limit", "rate_limit"] {
            m.connections_refused.with_label_values(&[reason]);
        }
        for reason in [
            "invalid",
            "apply_failed",
            "invalid_state_vector",
            "read_only",
        ] {
            m.updates_rejected.with_label_values(&[reason]);
        }
        Ok(m)
    }

    /// True when the last storage write failed (and nothing succeeded since).
    pub fn failed_writes_recent(&self) -> bool {
        self.storage_write_ok.get() == 0
    }

    /// Records the outcome of a storage write.
    pub fn write_outcome(&self, ok: bool) {
        self.storage_write_ok.set(i64::from(ok));
        if !ok {
            self.failed_writes.inc();
        }
    }

    /// Renders the text exposition format.
    pub fn render(&self) -> String {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
