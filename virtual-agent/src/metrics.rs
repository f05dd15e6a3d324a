//! The virtual agent's Prometheus metrics (served on the admin port's `/metrics`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Label set: the result of an apply.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `created`, `updated`, `recreated`, `deleted`, `unchanged` or `failed`.
    pub result: String,
}

/// Every metric of the virtual agent. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    /// 1 while a Sync stream to the host agent is open.
    pub host_connected: Gauge,
    /// RuntimeClasses the virtual cluster holds from the host, as the leader applied them (0 on a
    /// standby).
    pub synced_classes: Gauge,
    /// RuntimeClass applies by result.
    pub applies_total: Family<ResultLabel, Counter>,
    /// RuntimeClasses created directly in the virtual cluster and deleted.
    pub local_classes_deleted_total: Counter,
    /// Pods written to the host.
    pub pods_synced_total: Counter,
    /// Pods denied (SyncWarning recorded).
    pub pods_denied_total: Counter,
    /// Host send → applied here, per Sync response (seconds; from the response's send timestamp).
    pub propagation_seconds: prometheus_client::metrics::histogram::Histogram,
    /// Pods the host agent refused (Pod Security, unsupported fields, a host name in use).
    pub pods_refused_total: Counter,
    /// PodSync calls the host agent turned away over the tenant's rate limit (retried).
    pub pods_rate_limited_total: Counter,
    /// Pods left as orphans because their class stopped being synced.
    pub pods_orphaned: Gauge,
    /// Pods whose last try failed (retried): `failing` in `virtual-agent status`.
    pub pods_failing: Gauge,
    /// Pod operations that failed and are retried.
    pub pod_errors_total: Counter,
    /// Host Pod statuses copied to virtual Pods.
    pub statuses_copied_total: Counter,
    /// Host events about synced Pods written into the virtual cluster (created or updated).
    pub host_events_copied_total: Counter,
    /// Service account tokens issued for Pods on the host (`--pod-api-server`), renewals included.
    pub pod_tokens_issued_total: Counter,
    /// Host events not written (refused by the virtual cluster, failed every try, or dropped
    /// from a full queue).
    pub host_events_failed_total: Counter,
    /// PodDisruptionBudgets held on the host as this replica last applied them (0 on a standby).
    pub budgets_synced: Gauge,
    /// PodDisruptionBudgets the host agent refused to hold (SyncError on the budget).
    pub budgets_refused: Gauge,
    /// PodDisruptionBudget operations that failed and are retried.
    pub budget_errors_total: Counter,
    /// PersistentVolumeClaims made on the host as this replica last applied them (0 on a standby).
    pub claims_synced: Gauge,
    /// PersistentVolumeClaims the host agent refused to make (SyncError on the claim).
    pub claims_refused: Gauge,
    /// PersistentVolumeClaim operations (and status copies) that failed and are retried.
    pub claim_errors_total: Counter,
    /// Unix time of the last Sync response applied.
    pub last_sync_timestamp_seconds: Gauge<f64, AtomicU64>,
    /// 1 while this replica holds the leader Lease (and writes), 0 on standby.
    pub leader: Gauge,
    /// Times this replica started leading.
    pub leader_terms_total: Counter,
    /// Reloads of the admin port's certificate and key after their files changed, by result.
    pub tls_reloads: rcsync_core::tls::TlsReloads,
    /// Failures of the virtual cluster's watches (`pods`, `runtimeclasses`, `configmaps`,
    /// `secrets`).
    pub watches: rcsync_core::admin::WatchHealth,
}

impl Metrics {
    /// Creates and registers the metrics under the `rcsync` prefix.
    pub fn register(registry: &mut Registry) -> Self {
        let watches = rcsync_core::admin::WatchHealth::register(
            registry,
            &[
                "pods",
                "runtimeclasses",
                "configmaps",
                "secrets",
                "poddisruptionbudgets",
                "persistentvolumeclaims",
            ],
        );
        let mut m = Self {
            watches,
            host_connected: Gauge::default(),
            synced_classes: Gauge::default(),
            applies_total: Family::default(),
            local_classes_deleted_total: Counter::default(),
            pods_synced_total: Counter::default(),
            pods_denied_total: Counter::default(),
            pods_refused_total: Counter::default(),
            propagation_seconds: prometheus_client::metrics::histogram::Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            pods_rate_limited_total: Counter::default(),
            pods_orphaned: Gauge::default(),
            pods_failing: Gauge::default(),
            pod_errors_total: Counter::default(),
            statuses_copied_total: Counter::default(),
            host_events_copied_total: Counter::default(),
            pod_tokens_issued_total: Counter::default(),
            host_events_failed_total: Counter::default(),
            last_sync_timestamp_seconds: Gauge::default(),
            leader: Gauge::default(),
            leader_terms_total: Counter::default(),
            budgets_synced: Gauge::default(),
            budgets_refused: Gauge::default(),
            budget_errors_total: Counter::default(),
            claims_synced: Gauge::default(),
            claims_refused: Gauge::default(),
            claim_errors_total: Counter::default(),
            tls_reloads: Default::default(),
        };
        let r = registry.sub_registry_with_prefix("rcsync");
        r.register(
            "host_connected",
            "1 while the Sync stream to the host agent is open",
            m.host_connected.clone(),
        );
        r.register(
            "synced_runtime_classes",
            "RuntimeClasses held from the host, as this replica applied them while leading (0 on a standby)",
            m.synced_classes.clone(),
        );
        r.register(
            "runtime_class_applies",
            "RuntimeClass applies by result",
            m.applies_total.clone(),
        );
        r.register(
            "local_runtime_classes_deleted",
            "RuntimeClasses created in the virtual cluster and deleted",
            m.local_classes_deleted_total.clone(),
        );
        r.register(
            "pods_synced",
            "Pods written to the host",
            m.pods_synced_total.clone(),
        );
        r.register(
            "pods_denied",
            "Pods denied by the host agent (SyncWarning)",
            m.pods_denied_total.clone(),
        );
        r.register(
            "sync_propagation_seconds",
            "From the host agent sending a Sync response to this agent having applied it",
            m.propagation_seconds.clone(),
        );
        r.register(
            "pods_refused_by_host",
            "Pods the host agent refused to place (SyncError)",
            m.pods_refused_total.clone(),
        );
        r.register(
            "pod_sync_rate_limited",
            "PodSync calls turned away over the tenant's rate limit (retried after the delay asked for)",
            m.pods_rate_limited_total.clone(),
        );
        r.register(
            "pods_orphaned",
            "Pods whose runtime class stopped being synced",
            m.pods_orphaned.clone(),
        );
        r.register(
            "pods_failing",
            "Pods whose last sync try failed and is retried (the host refusing them, or unreachable)",
            m.pods_failing.clone(),
        );
        r.register(
            "pod_sync_errors",
            "Pod operations that failed and are retried",
            m.pod_errors_total.clone(),
        );
        r.register(
            "pod_statuses_copied",
            "Host Pod statuses copied to virtual Pods",
            m.statuses_copied_total.clone(),
        );
        r.register(
            "host_events_copied",
            "Host events about synced Pods written into the virtual cluster",
            m.host_events_copied_total.clone(),
        );
        r.register(
            "disruption_budgets_synced",
            "PodDisruptionBudgets held on the host as this replica applied them while leading",
            m.budgets_synced.clone(),
        );
        r.register(
            "disruption_budgets_refused",
            "PodDisruptionBudgets the host agent refused to hold (SyncError on the budget)",
            m.budgets_refused.clone(),
        );
        r.register(
            "disruption_budget_errors",
            "PodDisruptionBudget operations that failed and are retried",
            m.budget_errors_total.clone(),
        );
        r.register(
            "persistent_volume_claims_synced",
            "PersistentVolumeClaims made on the host as this replica applied them while leading",
            m.claims_synced.clone(),
        );
        r.register(
            "persistent_volume_claims_refused",
            "PersistentVolumeClaims the host agent refused to make (SyncError on the claim)",
            m.claims_refused.clone(),
        );
        r.register(
            "persistent_volume_claim_errors",
            "PersistentVolumeClaim operations and status copies that failed and are retried",
            m.claim_errors_total.clone(),
        );
        r.register(
            "pod_tokens_issued",
            "Service account tokens of the virtual cluster issued for Pods on the host, renewals included",
            m.pod_tokens_issued_total.clone(),
        );
        r.register(
            "host_events_failed",
            "Host events not written into the virtual cluster (refused, failed every try, or dropped from a full queue)",
            m.host_events_failed_total.clone(),
        );
        r.register(
            "last_sync_timestamp_seconds",
            "Unix time of the last Sync response applied",
            m.last_sync_timestamp_seconds.clone(),
        );
        r.register(
            "leader",
            "1 while this replica holds the leader Lease and writes, 0 on standby",
            m.leader.clone(),
        );
        r.register(
            "leader_terms",
            "Times this replica started leading",
            m.leader_terms_total.clone(),
        );
        m.tls_reloads = rcsync_core::tls::TlsReloads::register(
            r,
            "Reloads of the admin port's certificate and key after their files changed, by result (applied, failed)",
        );
        m
    }

    /// Counts one apply.
    pub fn applied(&self, result: &str) {
        self.applies_total
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
    }
}
