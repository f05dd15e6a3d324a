//! The host agent's Prometheus metrics (served on the admin port's `/metrics`).

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use rcsync_proto::v1::{CheckPodReason, PodRefusalReason};

/// Label set: one tenant.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabel {
    /// Tenant name.
    pub tenant: String,
}

/// The series of one tenant that change handling updates (handles sharing the registry's values).
#[derive(Clone, Debug)]
pub struct TenantSeries {
    /// `rcsync_tenant_runtime_classes`.
    pub classes: Gauge,
    /// `rcsync_tenant_filtered_runtime_classes`.
    pub filtered: Gauge,
    /// `rcsync_runtime_class_filtered_total`.
    pub filtered_total: Counter,
    /// `rcsync_patch_errors_total`.
    pub patch_errors_total: Counter,
}

/// The series one Sync stream updates, looked up once when the stream opens instead of by label
/// on every response and ACK (at 1,000 streams, 2,000 lookups per change).
#[derive(Clone, Debug)]
pub struct StreamSeries {
    /// Open Sync streams of the tenant.
    pub open: Gauge,
    /// Sync responses sent to the tenant.
    pub responses_total: Counter,
    /// ACKs from the tenant.
    pub acks_total: Counter,
    /// NACKs from the tenant.
    pub nacks_total: Counter,
}

/// Label set: a tenant and a CheckPod reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// Tenant name.
    pub tenant: String,
    /// The decision's reason, e.g. `MATCHES`.
    pub reason: String,
}

/// Label set: a tenant and one of its limits.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// Tenant name.
    pub tenant: String,
    /// The limit's key under `limits`, e.g. `syncStreams`.
    pub limit: String,
}

/// Label set: a tenant refused for want of Pod sync bytes, and which budget was spent: `tenant`
/// (the tenant's own share of `--max-pod-sync-bytes`) or `agent` (all of it, over all tenants).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BudgetRefusalLabels {
    /// Tenant name.
    pub tenant: String,
    /// `tenant` or `agent`.
    pub budget: String,
}

/// Which Pod sync budget a refused call found spent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodSyncBudget {
    /// The tenant's share of `--max-pod-sync-bytes`: this tenant's calls hold it.
    Tenant,
    /// `--max-pod-sync-bytes` itself: all tenants' calls together hold it.
    Agent,
}

impl PodSyncBudget {
    /// The value of the `budget` label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Tenant => "tenant",
            Self::Agent => "agent",
        }
    }
}

/// The limits whose refusals are counted per tenant (`rcsync_limit_rejections_total{limit}`).
const LIMITS: [&str; 3] = ["syncStreams", "podStatusStreams", "podSyncQps"];

/// The reasons a Pod can be refused for (not `UNSPECIFIED`).
fn refusal_reasons() -> impl Iterator<Item = PodRefusalReason> {
    (1..).map_while(|i| PodRefusalReason::try_from(i).ok())
}

/// The `reason` label of a Pod refusal, e.g. `POD_SECURITY`.
pub fn refusal_label(reason: PodRefusalReason) -> &'static str {
    reason.as_str_name().trim_start_matches("POD_REFUSAL_REASON_")
}

/// Label set: the result of a config reload (`applied`, `unchanged`, `failed`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// What came of it.
    pub result: String,
}

/// Label set: a gRPC method and its status code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcLabels {
    /// `/rcsync.v1.RuntimeClassSync/CheckPod` etc.
    pub method: String,
    /// gRPC status code name, e.g. `OK`.
    pub code: String,
}

/// Label set: a gRPC method.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    /// The full method path.
    pub method: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0,
    ])
}

/// Every metric of the host agent, shared: a clone is one reference count, so services tower
/// clones per request (each gRPC call) copy a pointer, not a handle per family.
#[derive(Clone)]
pub struct Metrics(Arc<MetricFamilies>);

impl std::ops::Deref for Metrics {
    type Target = MetricFamilies;

    fn deref(&self) -> &MetricFamilies {
        &self.0
    }
}

/// Every metric of the host agent (through [`Metrics`]).
pub struct MetricFamilies {
    /// RuntimeClasses on the host.
    pub host_classes: Gauge,
    /// Open connections on the gRPC port.
    pub grpc_connections: Gauge,
    /// Connections to the gRPC port closed at once because `--max-connections` were open.
    pub grpc_connections_refused_total: Counter,
    /// Connections to the gRPC port closed because their peer's client certificate expired or a
    /// reloaded client CA refused it.
    pub grpc_connections_revoked_total: Counter,
    /// Host class versions normalised and hashed (once per change of a host object).
    pub class_versions_total: Counter,
    /// Tenant view snapshots published because a change concerned them.
    pub view_updates_total: Counter,
    /// Tenant views computed over every class (start, relist, a tenant's config changed).
    pub view_rebuilds_total: Counter,
    /// Re-reads of the tenants file by result.
    pub config_reloads_total: Family<ResultLabel, Counter>,
    /// Reloads of the TLS files (gRPC and admin port) after they changed, by result.
    pub tls_reloads: rcsync_core::tls::TlsReloads,
    /// RuntimeClasses offered per tenant.
    pub tenant_classes: Family<TenantLabel, Gauge>,
    /// RuntimeClasses filtered out per tenant (currently).
    pub tenant_filtered: Family<TenantLabel, Gauge>,
    /// Times a class was found not to match a tenant's selector (once per change).
    pub filtered_total: Family<TenantLabel, Counter>,
    /// Open Sync streams per tenant.
    pub streams_open: Family<TenantLabel, Gauge>,
    /// Open WatchPodStatus streams per tenant.
    pub status_streams_open: Family<TenantLabel, Gauge>,
    /// Calls and streams refused by a tenant's limits, by tenant and limit.
    pub limit_rejections_total: Family<LimitLabels, Counter>,
    /// Bytes of PodSync requests held now (against `--max-pod-sync-bytes`).
    pub pod_sync_bytes_held: Gauge,
    /// PodSync calls refused because `--max-pod-sync-bytes` (or the tenant's share of it) were
    /// held, by tenant and budget.
    pub pod_sync_budget_refusals_total: Family<BudgetRefusalLabels, Counter>,
    /// Sync responses sent per tenant.
    pub responses_total: Family<TenantLabel, Counter>,
    /// ACKs received per tenant.
    pub acks_total: Family<TenantLabel, Counter>,
    /// NACKs received per tenant.
    pub nacks_total: Family<TenantLabel, Counter>,
    /// CheckPod decisions by tenant and reason.
    pub decisions_total: Family<DecisionLabels, Counter>,
    /// Pods written to the host per tenant.
    pub pods_applied_total: Family<TenantLabel, Counter>,
    /// Pods the host agent refused (Pod Security, unsupported fields, names in use), by tenant
    /// and refusal reason (e.g. `POD_SECURITY`).
    pub pods_refused_total: Family<DecisionLabels, Counter>,
    /// ConfigMap and Secret copies written (created or updated) per tenant.
    pub copies_written_total: Family<TenantLabel, Counter>,
    /// Patch evaluations that failed (once per class change) per tenant.
    pub patch_errors_total: Family<TenantLabel, Counter>,
    /// gRPC requests by method and code.
    pub grpc_requests_total: Family<GrpcLabels, Counter>,
    /// gRPC unary request latency by method.
    pub grpc_latency_seconds: Family<MethodLabel, Histogram>,
    /// Failures of the host watches (`runtimeclasses`, `pods`).
    pub watches: rcsync_core::admin::WatchHealth,
}

impl MetricFamilies {
    fn register(registry: &mut Registry) -> Self {
        let watches = rcsync_core::admin::WatchHealth::register(
            registry,
            &["runtimeclasses", "pods", "events", "persistentvolumeclaims"],
        );
        let mut m = Self {
            watches,
            host_classes: Gauge::default(),
            grpc_connections: Gauge::default(),
            grpc_connections_refused_total: Counter::default(),
            grpc_connections_revoked_total: Counter::default(),
            class_versions_total: Counter::default(),
            view_updates_total: Counter::default(),
            view_rebuilds_total: Counter::default(),
            config_reloads_total: Family::default(),
            tls_reloads: Default::default(),
            tenant_classes: Family::default(),
            tenant_filtered: Family::default(),
            filtered_total: Family::default(),
            streams_open: Family::default(),
            status_streams_open: Family::default(),
            limit_rejections_total: Family::default(),
            pod_sync_bytes_held: Gauge::default(),
            pod_sync_budget_refusals_total: Family::default(),
            responses_total: Family::default(),
            acks_total: Family::default(),
            nacks_total: Family::default(),
            decisions_total: Family::default(),
            pods_applied_total: Family::default(),
            pods_refused_total: Family::default(),
            copies_written_total: Family::default(),
            patch_errors_total: Family::default(),
            grpc_requests_total: Family::default(),
            grpc_latency_seconds: Family::new_with_constructor(latency_histogram),
        };
        let r = registry.sub_registry_with_prefix("rcsync");
        r.register(
            "host_runtime_classes",
            "RuntimeClasses in the host cluster",
            m.host_classes.clone(),
        );
        r.register(
            "grpc_connections",
            "Open connections on the gRPC port",
            m.grpc_connections.clone(),
        );
        r.register(
            "grpc_connections_refused",
            "Connections to the gRPC port closed at once because --max-connections were open",
            m.grpc_connections_refused_total.clone(),
        );
        r.register(
            "grpc_connections_revoked",
            "Connections to the gRPC port closed because their client certificate expired or a reloaded client CA refused it",
            m.grpc_connections_revoked_total.clone(),
        );
        r.register(
            "class_versions",
            "Host RuntimeClass versions normalised and hashed (once per change)",
            m.class_versions_total.clone(),
        );
        r.register(
            "view_updates",
            "Tenant view snapshots published because a change concerned them",
            m.view_updates_total.clone(),
        );
        r.register(
            "view_rebuilds",
            "Tenant views computed over every host class (start, relist, config change)",
            m.view_rebuilds_total.clone(),
        );
        r.register(
            "config_reloads",
            "Re-reads of the tenants file, by result (applied, unchanged, failed)",
            m.config_reloads_total.clone(),
        );
        m.tls_reloads = rcsync_core::tls::TlsReloads::register(
            r,
            "Reloads of the TLS files (the gRPC port's certificate, key and client CA, the admin port's certificate and key) after they changed, by result (applied, failed)",
        );
        r.register(
            "tenant_runtime_classes",
            "RuntimeClasses offered to a tenant",
            m.tenant_classes.clone(),
        );
        r.register(
            "tenant_filtered_runtime_classes",
            "Host RuntimeClasses that do not match a tenant's selector",
            m.tenant_filtered.clone(),
        );
        r.register(
            "runtime_class_filtered",
            "Times a host RuntimeClass was found not to match a tenant's selector (once per change)",
            m.filtered_total.clone(),
        );
        r.register("sync_streams_open", "Open Sync streams", m.streams_open.clone());
        r.register(
            "pod_status_streams_open",
            "Open WatchPodStatus streams",
            m.status_streams_open.clone(),
        );
        r.register(
            "limit_rejections",
            "Streams and Pod sync calls refused by a tenant's limits",
            m.limit_rejections_total.clone(),
        );
        r.register(
            "pod_sync_bytes_held",
            "Bytes of ApplyPod/DeletePod requests held now, over all tenants (at most --max-pod-sync-bytes)",
            m.pod_sync_bytes_held.clone(),
        );
        r.register(
            "pod_sync_budget_refusals",
            "ApplyPod/DeletePod calls refused because --max-pod-sync-bytes were held, by the budget spent: the tenant's share of it (tenant) or all of it (agent)",
            m.pod_sync_budget_refusals_total.clone(),
        );
        r.register("sync_responses", "Sync responses sent", m.responses_total.clone());
        r.register("sync_acks", "Sync responses acknowledged", m.acks_total.clone());
        r.register(
            "sync_nacks",
            "Sync responses rejected by the virtual side",
            m.nacks_total.clone(),
        );
        r.register(
            "check_pod_decisions",
            "CheckPod decisions by reason",
            m.decisions_total.clone(),
        );
        r.register(
            "pods_applied",
            "Pods written to the host",
            m.pods_applied_total.clone(),
        );
        r.register(
            "patch_errors",
            "Patch evaluations that failed (once per class change)",
            m.patch_errors_total.clone(),
        );
        r.register(
            "pods_refused",
            "Pods the host agent refused to place, by refusal reason",
            m.pods_refused_total.clone(),
        );
        r.register(
            "object_copies_written",
            "ConfigMap and Secret copies written to tenant namespaces",
            m.copies_written_total.clone(),
        );
        r.register(
            "grpc_requests",
            "gRPC requests by method and status code",
            m.grpc_requests_total.clone(),
        );
        r.register(
            "grpc_request_duration_seconds",
            "gRPC unary request latency",
            m.grpc_latency_seconds.clone(),
        );
        m
    }
}

impl Metrics {
    /// Creates the metrics and registers them under the `rcsync` prefix.
    pub fn register(registry: &mut Registry) -> Self {
        Self(Arc::new(MetricFamilies::register(registry)))
    }

    /// Records one finished gRPC call.
    pub fn observe(&self, method: &str, code: tonic::Code, started: std::time::Instant) {
        self.grpc_requests_total
            .get_or_create(&GrpcLabels {
                method: method.to_string(),
                code: format!("{code:?}"),
            })
            .inc();
        self.grpc_latency_seconds
            .get_or_create(&MethodLabel {
                method: method.to_string(),
            })
            .observe(started.elapsed().as_secs_f64());
    }

    /// Records one finished gRPC call from its result.
    pub fn record<T>(&self, method: &str, started: std::time::Instant, result: &Result<T, tonic::Status>) {
        let code = result
            .as_ref()
            .map_or_else(tonic::Status::code, |_| tonic::Code::Ok);
        self.observe(method, code, started);
    }

    /// The counters labelled by tenant alone.
    fn tenant_counters(&self) -> [&Family<TenantLabel, Counter>; 7] {
        [
            &self.filtered_total,
            &self.responses_total,
            &self.acks_total,
            &self.nacks_total,
            &self.pods_applied_total,
            &self.copies_written_total,
            &self.patch_errors_total,
        ]
    }

    /// Creates every per-tenant series at 0 (an idempotent touch of each family).
    pub fn init_tenant(&self, tenant: &str) {
        let label = Self::tenant(tenant);
        let _ = self.streams_open.get_or_create(&label);
        let _ = self.status_streams_open.get_or_create(&label);
        for counter in self.tenant_counters() {
            let _ = counter.get_or_create(&label);
        }
        for budget in [PodSyncBudget::Tenant, PodSyncBudget::Agent] {
            let _ = self.pod_sync_budget_refusals(tenant, budget);
        }
        for reason in refusal_reasons() {
            let _ = self.pods_refused_total.get_or_create(&DecisionLabels {
                tenant: tenant.to_string(),
                reason: refusal_label(reason).to_string(),
            });
        }
        for limit in LIMITS {
            let _ = self.limit_rejections_total.get_or_create(&LimitLabels {
                tenant: tenant.to_string(),
                limit: limit.to_string(),
            });
        }
    }

    /// Drops every series of a tenant that left the tenants file (its streams were ended, its
    /// calls are refused). Kept, a removed tenant's `rcsync_sync_streams_open` of 0 would raise
    /// RcsyncTenantNotConnected until the agent restarts, and its other series would stay on
    /// dashboards.
    pub fn forget_tenant(&self, tenant: &str) {
        let label = Self::tenant(tenant);
        for gauges in [
            &self.tenant_classes,
            &self.tenant_filtered,
            &self.streams_open,
            &self.status_streams_open,
        ] {
            gauges.remove(&label);
        }
        for counter in self.tenant_counters() {
            counter.remove(&label);
        }
        let decision = |reason: &str| DecisionLabels {
            tenant: tenant.to_string(),
            reason: reason.to_string(),
        };
        for reason in (0..).map_while(|i| CheckPodReason::try_from(i).ok()) {
            self.decisions_total
                .remove(&decision(crate::grpc::sync::reason_name(reason)));
        }
        for reason in refusal_reasons() {
            self.pods_refused_total.remove(&decision(refusal_label(reason)));
        }
        for limit in LIMITS {
            self.limit_rejections_total.remove(&LimitLabels {
                tenant: tenant.to_string(),
                limit: limit.to_string(),
            });
        }
        for budget in [PodSyncBudget::Tenant, PodSyncBudget::Agent] {
            self.pod_sync_budget_refusals_total.remove(&BudgetRefusalLabels {
                tenant: tenant.to_string(),
                budget: budget.label().to_string(),
            });
        }
    }

    /// The series a Sync stream of `tenant` updates.
    pub fn stream_series(&self, tenant: &str) -> StreamSeries {
        let label = Self::tenant(tenant);
        StreamSeries {
            open: self.streams_open.get_or_create(&label).clone(),
            responses_total: self.responses_total.get_or_create(&label).clone(),
            acks_total: self.acks_total.get_or_create(&label).clone(),
            nacks_total: self.nacks_total.get_or_create(&label).clone(),
        }
    }

    /// Exports every series of `tenant` and returns the ones the class index updates on each
    /// change, looked up once instead of by label per change.
    pub fn tenant_series(&self, tenant: &str) -> TenantSeries {
        self.init_tenant(tenant);
        let label = Self::tenant(tenant);
        TenantSeries {
            classes: self.tenant_classes.get_or_create(&label).clone(),
            filtered: self.tenant_filtered.get_or_create(&label).clone(),
            filtered_total: self.filtered_total.get_or_create(&label).clone(),
            patch_errors_total: self.patch_errors_total.get_or_create(&label).clone(),
        }
    }

    /// The counter of `tenant`'s calls refused because `budget` was spent.
    pub fn pod_sync_budget_refusals(&self, tenant: &str, budget: PodSyncBudget) -> Counter {
        self.pod_sync_budget_refusals_total
            .get_or_create(&BudgetRefusalLabels {
                tenant: tenant.to_string(),
                budget: budget.label().to_string(),
            })
            .clone()
    }

    /// The label set of a tenant.
    pub fn tenant(name: &str) -> TenantLabel {
        TenantLabel {
            tenant: name.to_string(),
        }
    }
}
