//! The cluster's Prometheus metrics and the lock observer that feeds them.

use super::*;

/// Cluster metrics, registered into the server's registry.
#[derive(Debug, Clone)]
pub(crate) struct ClusterMetrics {
    pub(super) owned: IntGauge,
    pub(super) owner_sessions: IntGauge,
    pub(super) edge_sessions: IntGauge,
    pub(super) peers: IntGauge,
    pub(super) events_waiting: IntGauge,
    pub(super) envelopes_in: IntCounterVec,
    pub(super) envelopes_out: IntCounterVec,
    pub(super) rejected: IntCounterVec,
    pub(super) resyncs: IntCounterVec,
    pub(super) rehomes: IntCounterVec,
    pub(super) routes: IntCounterVec,
    pub(super) lock_ops: IntCounterVec,
    pub(super) lock_losses: IntCounterVec,
    pub(super) shed: IntCounterVec,
}

impl ClusterMetrics {
    pub(super) fn register(r: &prometheus::Registry) -> prometheus::Result<Self> {
        let g = |n: &str, h: &str| -> prometheus::Result<IntGauge> {
            let x = IntGauge::new(n, h)?;
            r.register(Box::new(x.clone()))?;
            Ok(x)
        };
        let c = |n: &str, h: &str, l: &[&str]| -> prometheus::Result<IntCounterVec> {
            let x = IntCounterVec::new(Opts::new(n, h), l)?;
            r.register(Box::new(x.clone()))?;
            Ok(x)
        };
        let m = Self {
            owned: g(
                "hearth_cluster_owned_documents",
                "Documents this node holds the ownership lock for",
            )?,
            owner_sessions: g(
                "hearth_cluster_proxied_attachments",
                "Clients of other nodes attached to documents owned here",
            )?,
            edge_sessions: g(
                "hearth_cluster_remote_attachments",
                "Clients here attached to documents owned elsewhere",
            )?,
            peers: g(
                "hearth_cluster_known_peers",
                "Processes (nodes, emit callers) this node keeps link state for",
            )?,
            events_waiting: g(
                "hearth_cluster_events_waiting",
                "Custom events this node sent to another node and awaits the reply of",
            )?,
            envelopes_in: c(
                "hearth_cluster_envelopes_in_total",
                "Envelopes received by kind",
                &["kind"],
            )?,
            envelopes_out: c(
                "hearth_cluster_envelopes_out_total",
                "Envelopes sent by kind",
                &["kind"],
            )?,
            rejected: c(
                "hearth_cluster_envelopes_rejected_total",
                "Envelopes rejected by reason",
                &["reason"],
            )?,
            resyncs: c(
                "hearth_cluster_resyncs_total",
                "Client resets forced by link problems",
                &["reason"],
            )?,
            rehomes: c(
                "hearth_cluster_client_moves_total",
                "Clients here whose owner went away, by outcome: moved to the new owner with their socket kept open, or reset",
                &["outcome"],
            )?,
            routes: c(
                "hearth_cluster_route_lookups_total",
                "Route look-ups by outcome",
                &["outcome"],
            )?,
            lock_ops: c(
                "hearth_cluster_lock_ops_total",
                "Lock operations by op and result",
                &["op", "result"],
            )?,
            lock_losses: c(
                "hearth_cluster_lock_losses_total",
                "Ownership locks lost, by reason",
                &["reason"],
            )?,
            shed: c(
                "hearth_cluster_sessions_shed_total",
                "Proxied clients closed (1013) because one of their queues between edge and \
                 owner was full, by queue",
                &["queue"],
            )?,
        };
        m.zero_alerted_series();
        Ok(m)
    }

    /// Creates at 0 the series that the shipped alerts (deploy/prometheus/alerts.yml) and dashboard watch
    /// with `increase()`/`rate()`: a series that first appears at 1 has no increase to show, so
    /// the first lock loss or forged envelope would never fire an alert.
    fn zero_alerted_series(&self) {
        for reason in ["expired", "missing", "taken"] {
            self.lock_losses.with_label_values(&[reason]);
        }
        for queue in ["edge_out", "owner_in", "owner_out"] {
            self.shed.with_label_values(&[queue]);
        }
        for reason in ["unsigned", "unknown_key", "bad_mac"] {
            self.rejected.with_label_values(&[reason]);
        }
        for reason in ["gap", "lagged", "owner_gone", "owner_silent", "edge_silent"] {
            self.resyncs.with_label_values(&[reason]);
        }
        for outcome in ["moved", "reset"] {
            self.rehomes.with_label_values(&[outcome]);
        }
    }
}

/// The transport's publishing counters, read when Prometheus scrapes.
pub(super) struct PublishCollector {
    stats: hearth_proxy::StatsHandle,
    messages: prometheus::IntCounter,
    envelopes: prometheus::IntCounter,
    batches: prometheus::IntCounter,
    fanned: prometheus::IntCounter,
}

impl PublishCollector {
    /// Registers the counters of `stats` into `r`.
    pub(super) fn register(
        r: &prometheus::Registry,
        stats: hearth_proxy::StatsHandle,
    ) -> prometheus::Result<()> {
        let c = prometheus::IntCounter::new;
        r.register(Box::new(PublishCollector {
            stats,
            messages: c(
                "hearth_cluster_messages_published_total",
                "Redis pub/sub messages published to other nodes (one PUBLISH each)",
            )?,
            envelopes: c(
                "hearth_cluster_envelopes_published_total",
                "Envelopes those messages carried (a batch carries several)",
            )?,
            batches: c(
                "hearth_cluster_batches_published_total",
                "Messages that were batches of envelopes for one node",
            )?,
            fanned: c(
                "hearth_cluster_fanned_frames_total",
                "Frames for a client on another node that travelled inside one message with the \
                 same frame for another client of that node, instead of on their own",
            )?,
        }))
    }
}

impl prometheus::core::Collector for PublishCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        [&self.messages, &self.envelopes, &self.batches, &self.fanned]
            .into_iter()
            .flat_map(|c| c.desc())
            .collect()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let now = self.stats.read();
        let pairs = [
            (&self.messages, now.messages),
            (&self.envelopes, now.envelopes),
            (&self.batches, now.batches),
            (&self.fanned, now.fanned),
        ];
        let mut families = Vec::with_capacity(pairs.len());
        for (counter, value) in pairs {
            // the transport's counters only grow; catch up to them
            counter.inc_by(value.saturating_sub(counter.get()));
            families.extend(counter.collect());
        }
        families
    }
}

pub(super) struct Observer(pub(super) ClusterMetrics);

impl hearth_lock::LockObserver for Observer {
    fn on_acquire(&self, _latency: Duration, outcome: hearth_lock::AcquireOutcome) {
        self.0
            .lock_ops
            .with_label_values(&["acquire", &format!("{outcome:?}").to_lowercase()])
            .inc();
    }
    fn on_refresh(&self, _latency: Duration, outcome: hearth_lock::RefreshOutcome) {
        self.0
            .lock_ops
            .with_label_values(&["refresh", &format!("{outcome:?}").to_lowercase()])
            .inc();
    }
    fn on_lost(&self, resource: &str, reason: &hearth_lock::LossReason) {
        warn!(
            doc = resource,
            reason = reason.as_str(),
            "ownership lock lost"
        );
        self.0
            .lock_losses
            .with_label_values(&[reason.as_str()])
            .inc();
    }
}
