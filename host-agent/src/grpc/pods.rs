//! `rcsync.v1.PodSync`: the host agent writes a tenant's admitted Pods into its host namespace
//! (re-checking the decision first) and streams their status back.
//!
//! ```text
//!  ApplyPod(pod, configmaps, secrets) ──auth──► view.check_pod (again: the host is the policy point)
//!     ──► translate (references, downward API, scheduling) ──► unsupported fields? Pod Security? ──► refusal
//!     ──► copies: each referenced by the Pod? host names free? ──► create Pod (gated while copies are written)
//!     ──► copies owned by the host Pod (garbage-collected with their last Pod) ──► ungate
//!  DeletePod(ns, name, uid) ──► host Pod of that uid only ──► delete (grace, UID precondition)
//!  WatchPodStatus ──► watch host Pods labelled managed-by=<tenant> in <hostNamespace> ──► events (pod_status)
//!     (asked for: and the host events about them, host_events; both run by status_stream)
//!  Apply/Delete/ListDisruptionBudgets ──► the tenant's PodDisruptionBudgets held on the host (budgets)
//!  Apply/Delete/ListClaims ──► the tenant's PersistentVolumeClaims made on the host (claims)
//!  WatchClaimStatus ──► watch host claims labelled managed-by=<tenant> ──► events (claim_status)
//!     (asked for: and the host events about them, host_events)
//! ```
//!
//! Here: the service and ApplyPod's steps. `copies`: the referenced objects checked and written;
//! `placed`: the host Pod as a create answers it; `updates`: the patches of a Pod already on the
//! host; `host_errors`: what the host API server's answers mean to the caller; `budgets`,
//! `claims`: the other objects the host holds for a tenant.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::{Event as CoreEvent, PersistentVolumeClaim, Pod, PodSchedulingGate};
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt as _};
use rcsync_core::Tenant;
use rcsync_core::kube_client::RetryWithBackoff as _;
use rcsync_core::naming::LABEL_MANAGED_BY;
use rcsync_proto::v1::pod_sync_server::PodSync;
use rcsync_proto::v1::{
    ApplyClaimRequest, ApplyClaimResponse, ApplyDisruptionBudgetRequest, ApplyDisruptionBudgetResponse,
    ApplyPodRequest, ApplyPodResponse, ClaimStatusEvent, DeleteClaimRequest, DeleteClaimResponse,
    DeleteDisruptionBudgetRequest, DeleteDisruptionBudgetResponse, DeletePodRequest, DeletePodResponse,
    DisruptionBudgetEvent, HostEvents, ListClaimsRequest, ListClaimsResponse, ListDisruptionBudgetsRequest,
    ListDisruptionBudgetsResponse, PodRefusal, PodRefusalReason, PodStatusEvent, WatchClaimStatusRequest,
    WatchDisruptionBudgetsRequest, WatchPodStatusRequest,
};
use serde_json::json;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::grpc::auth::{Authenticator, Caller};
use crate::grpc::budget_status::{BudgetReporting, HostBudget};
use crate::grpc::claim_status::ClaimReporting;
use crate::grpc::host_events::{self, HostEventFeed};
use crate::grpc::limits::{StreamKind, StreamSlot, TenantLimiter};
use crate::grpc::lost_copies::{self, ANNOTATION_COPIES, RecordedCopy};
use crate::grpc::pod_status::{HostPodStatus, PodReporting};
use crate::grpc::status_stream::{self, EventWatch, ObjectWatch};
use crate::index::{TenantsState, ViewSource};
use crate::metrics::{DecisionLabels, Metrics};
use crate::translate::{VirtualPodRef, host_pod, managed_selector, recorded_ref, unsupported, virtual_ref};
use rcsync_core::naming::host_pod_name;

mod budgets;
mod claims;
mod copies;
mod host_errors;
mod placed;
mod updates;

use copies::{HostCopy, accepted_copies};
use host_errors::{EPHEMERAL_CONTAINERS, RESIZE, follows_the_host, kube_status, subresource_status};
use placed::{PlacedPod, create_pod, has_copies_gate, owner_reference};
use updates::{ephemeral_patch, resize_patch, update_patch};

/// The PodSync service.
pub struct PodSyncService<V> {
    views: Arc<V>,
    tenants: watch::Receiver<Arc<TenantsState>>,
    auth: Authenticator,
    client: Client,
    metrics: Metrics,
    shutdown: watch::Receiver<bool>,
    limiter: TenantLimiter,
    /// How long one ApplyPod/DeletePod may work (see [`PodSyncService::with_call_timeout`]).
    call_timeout: Duration,
}

/// How long one ApplyPod/DeletePod may work unless told otherwise.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(60);

impl<V: ViewSource> PodSyncService<V> {
    /// Builds the service over the host cluster `client`.
    pub fn new(
        views: Arc<V>,
        tenants: watch::Receiver<Arc<TenantsState>>,
        auth: Authenticator,
        client: Client,
        metrics: Metrics,
        shutdown: watch::Receiver<bool>,
        limiter: TenantLimiter,
    ) -> Self {
        Self {
            views,
            tenants,
            auth,
            client,
            metrics,
            shutdown,
            limiter,
            call_timeout: DEFAULT_CALL_TIMEOUT,
        }
    }

    /// Ends an ApplyPod/DeletePod whose work (its host API calls) takes longer than `timeout`,
    /// with DEADLINE_EXCEEDED, whatever deadline its caller set (a caller's shorter `grpc-timeout`
    /// ends it sooner): a host API server that hangs does not hold a call, its tenant's
    /// `podSyncInFlight` place and its bytes of `--max-pod-sync-bytes` until the client's own
    /// read timeout, minutes later.
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// `work`, ended after the call timeout.
    async fn bounded<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let timeout = self.call_timeout;
        tokio::time::timeout(timeout, work).await.unwrap_or_else(|_| {
            Err(Status::deadline_exceeded(format!(
                "the host API server did not complete the call within {timeout:?} (--pod-sync-timeout)"
            )))
        })
    }

    /// The caller and its tenant's config.
    fn caller<T>(&self, request: &Request<T>) -> Result<(Caller, Tenant), Status> {
        let caller = self.auth.caller_ready(request, self.views.as_ref())?;
        let tenant = self.tenants.borrow().file.tenant(caller.tenant.as_str()).cloned();
        Ok((
            caller,
            tenant.ok_or_else(|| Status::permission_denied("unknown tenant"))?,
        ))
    }

    /// The watch of the host events about `tenant`'s host objects of `kind` that a status stream's
    /// client asked for (`asked`, a [`HostEvents`]), and the feed that addresses them; `None`
    /// when it asked for none.
    fn host_events(&self, tenant: &Tenant, kind: &str, asked: i32) -> Option<(EventWatch, HostEventFeed)> {
        let asked = HostEvents::try_from(asked).unwrap_or(HostEvents::Unspecified);
        let fields = host_events::field_selector(kind, asked)?;
        let watch = self
            .metrics
            .watches
            .follow(
                "events".into(),
                watcher::watcher(
                    Api::<CoreEvent>::namespaced(self.client.clone(), &tenant.host_namespace),
                    watcher::Config::default().fields(&fields),
                )
                .retry_with_backoff(),
            )
            .boxed();
        Some((watch, HostEventFeed::new(tenant.host_namespace.clone())))
    }

    /// The caller of a status stream (WatchPodStatus, WatchClaimStatus, WatchDisruptionBudgets),
    /// its tenant's config and its place under the tenant's `podStatusStreams`; the opening is
    /// recorded under `method`.
    fn open_status_stream<T>(
        &self,
        request: &Request<T>,
        method: &str,
    ) -> Result<(Caller, Tenant, StreamSlot), Status> {
        let started = Instant::now();
        let opened = self.caller(request).and_then(|(caller, tenant)| {
            let slot = self.limiter.open(&caller.tenant, StreamKind::PodStatus)?;
            Ok((caller, tenant, slot))
        });
        self.metrics.record(method, started, &opened);
        opened
    }

    /// The watch (`watch` in metrics) of `tenant`'s host objects of kind `K` (labelled as
    /// rcsync's) under a switch of the tenant's: where it is off (`on` false), no watch at all,
    /// but a stream that has listed nothing, so the feature costs the host nothing where it is
    /// off (the stream ends when the switch turns, and the caller opens it again).
    fn switched_watch<K>(&self, tenant: &Tenant, on: bool, watch: &str) -> ObjectWatch<K>
    where
        K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug
            + Send
            + 'static,
    {
        if !on {
            return futures::stream::iter([Ok(watcher::Event::Init), Ok(watcher::Event::InitDone)])
                .chain(futures::stream::pending())
                .boxed();
        }
        let config = watcher::Config::default().labels(&managed_selector(tenant));
        self.metrics
            .watches
            .follow(
                watch.into(),
                watcher::watcher(
                    Api::<K>::namespaced(self.client.clone(), &tenant.host_namespace),
                    config,
                )
                .retry_with_backoff(),
            )
            .boxed()
    }

    fn pods(&self, tenant: &Tenant) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &tenant.host_namespace)
    }

    async fn apply(&self, request: Request<ApplyPodRequest>) -> Result<ApplyPodResponse, Status> {
        let (caller, tenant) = self.caller(&request)?;
        let name = caller.tenant;
        self.limiter.take(&name)?;
        let request = request.into_inner();
        let pod: Pod = serde_json::from_slice(&request.pod_json)
            .map_err(|e| Status::invalid_argument(format!("pod_json is not a v1 Pod: {e}")))?;
        let id = virtual_ref(&pod).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let runtime_class = pod
            .spec
            .as_ref()
            .and_then(|s| s.runtime_class_name.clone())
            .unwrap_or_default();
        let decision = self
            .views
            .check_pod(&name, &id.name, &runtime_class)
            .ok_or_else(|| Status::permission_denied("unknown tenant"))?;
        let host_name = host_pod_name(&id.name, &id.namespace, name.as_str());
        let mut response = ApplyPodResponse {
            applied: false,
            decision: Some(decision.clone()),
            host_namespace: tenant.host_namespace.clone(),
            host_name: host_name.clone(),
            created: false,
            refusal: None,
        };
        if !decision.allowed {
            return Ok(response);
        }
        let mut desired = host_pod(&pod, &tenant, &decision.host_runtime_class_name)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let copies = accepted_copies(&pod, &id, &tenant, &request)?;
        if !copies.is_empty() {
            // What a status stream opened later checks against the copies it lists.
            let recorded: Vec<_> = copies.iter().map(HostCopy::recorded).collect();
            desired
                .annotations_mut()
                .insert(ANNOTATION_COPIES.to_string(), RecordedCopy::annotation(&recorded));
        }
        let refusal = match policy_refusal(&desired, &tenant) {
            Some(refusal) => Some(refusal),
            None => match self.names_in_use(&tenant, &id, &copies).await? {
                Some(refusal) => Some(refusal),
                None => self.claims_refusal(&tenant, &id, &pod).await?,
            },
        };
        if let Some(refusal) = refusal {
            let reason = PodRefusalReason::try_from(refusal.reason).unwrap_or(PodRefusalReason::Unspecified);
            tracing::info!(
                tenant = %name, namespace = %id.namespace, pod = %id.name, reason = reason.as_str_name(),
                "refused pod: {}", refusal.message
            );
            self.metrics
                .pods_refused_total
                .get_or_create(&DecisionLabels {
                    tenant: name.to_string(),
                    reason: crate::metrics::refusal_label(reason).to_string(),
                })
                .inc();
            response.refusal = Some(refusal);
            return Ok(response);
        }
        let api = self.pods(&tenant);
        let (placed, created) = match self
            .place(&api, &tenant, &id, &desired, !copies.is_empty(), request.on_host)
            .await?
        {
            Placement::Placed { pod, created } => (pod, created),
            Placement::NameInUse(refusal) => {
                response.refusal = Some(refusal);
                return Ok(response);
            }
        };
        response.created = created;
        if !copies.is_empty() {
            let owner = owner_reference(&placed)?;
            for copy in &copies {
                self.write_copy(&tenant, copy, &owner).await?;
            }
            self.metrics
                .copies_written_total
                .get_or_create(&Metrics::tenant(name.as_str()))
                .inc_by(copies.len() as u64);
        }
        if has_copies_gate(&placed) {
            // Every object the Pod references is in place: this gate goes. Any other stays: the
            // tenant's (while its virtual Pod is gated) and those the host's admission set.
            let patch = json!({"spec": {"schedulingGates": [{"name": COPIES_GATE, "$patch": "delete"}]}});
            api.patch(&host_name, &PatchParams::default(), &Patch::Strategic(patch))
                .await
                .map_err(|e| kube_status(&e, &tenant))?;
        }
        // The conditions of the Pod's readiness gates its controllers set in the virtual cluster:
        // the host's kubelet counts the host Pod Ready only once it carries them too.
        if let Some(patch) = placed.readiness_patch(&pod) {
            api.patch_status(&host_name, &PatchParams::default(), &Patch::Strategic(patch))
                .await
                .map_err(|e| kube_status(&e, &tenant))?;
        }
        response.applied = true;
        self.metrics
            .pods_applied_total
            .get_or_create(&Metrics::tenant(name.as_str()))
            .inc();
        Ok(response)
    }

    /// Creates the host Pod (gated until its copies exist when it has any), or brings an existing
    /// one of the same virtual Pod up to date. A host Pod of another virtual Pod is never touched.
    /// One round trip in the common case: a Pod the caller has seen on the host (`on_host`) is
    /// read first, another is created first.
    async fn place(
        &self,
        api: &Api<Pod>,
        tenant: &Tenant,
        id: &VirtualPodRef,
        desired: &Pod,
        gated: bool,
        on_host: bool,
    ) -> Result<Placement, Status> {
        let host_name = desired.name_any();
        let mut create = desired.clone();
        if let Some(spec) = &mut create.spec {
            // Added once the Pod exists (below): the API refuses them on create.
            spec.ephemeral_containers = None;
            if gated {
                spec.scheduling_gates
                    .get_or_insert_with(Vec::new)
                    .push(PodSchedulingGate {
                        name: COPIES_GATE.to_string(),
                    });
            }
        }
        let name = host_name.as_str();
        let read = move || async move { api.get_opt(name).await.map_err(|e| kube_status(&e, tenant)) };
        let existing = if on_host { read().await? } else { None };
        let current = match existing {
            Some(current) => current,
            None => match create_pod(&self.client, api, &create).await {
                Ok(pod) => {
                    // A Pod debugged in the virtual cluster before it reached the host (or
                    // recreated there) gets its ephemeral containers at once.
                    let pod = match ephemeral_patch(&create, desired) {
                        Some(patch) => add_ephemeral_containers(api, &host_name, patch, tenant).await?,
                        None => pod,
                    };
                    return Ok(Placement::Placed { pod, created: true });
                }
                // The name is taken (409), or the host's admission refused the create (403): it
                // runs before a taken name shows, so a namespace at its Pod quota refuses even a
                // create of a Pod that exists. Either way the Pod may be there to update.
                Err(kube::Error::Api(e)) if e.code == 409 || e.code == 403 => match read().await? {
                    Some(current) => current,
                    None if e.code == 409 => {
                        return Err(Status::aborted(format!(
                            "host pod {host_name} was deleted concurrently: retry"
                        )));
                    }
                    None => return Err(kube_status(&kube::Error::Api(e), tenant)),
                },
                Err(e) => return Err(kube_status(&e, tenant)),
            },
        };
        let holder = recorded_ref(&current.metadata).filter(|_| {
            current.labels().get(LABEL_MANAGED_BY).map(String::as_str) == Some(tenant.name.as_str())
        });
        let Some(holder) = holder else {
            return Ok(Placement::NameInUse(name_in_use(
                &host_name,
                "a pod rcsync does not manage".to_string(),
            )));
        };
        if (holder.namespace.as_str(), holder.name.as_str()) != (id.namespace.as_str(), id.name.as_str()) {
            return Ok(Placement::NameInUse(name_in_use(
                &host_name,
                format!("pod {}/{}", holder.namespace, holder.name),
            )));
        }
        if holder.uid != id.uid {
            // A host Pod of an earlier virtual Pod of the same name: remove it first.
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: current.metadata.uid.clone(),
                    resource_version: None,
                }),
                ..Default::default()
            };
            api.delete(&host_name, &params)
                .await
                .map_err(|e| kube_status(&e, tenant))?;
            return Err(Status::aborted(format!(
                "host pod {host_name} belonged to an earlier virtual pod of the same name; it is being deleted: retry"
            )));
        }
        let mut placed = PlacedPod::of(&current);
        if let Some(patch) = update_patch(&current, desired) {
            let pod = api
                .patch(&host_name, &PatchParams::default(), &Patch::Strategic(patch))
                .await
                .map_err(|e| kube_status(&e, tenant))?;
            placed = PlacedPod::of(&pod);
        }
        // Resources change through their own subresource, which the host checks against its
        // quotas and the Pod's QoS class.
        if let Some(patch) = resize_patch(&current, desired) {
            let pod = api
                .patch_subresource(
                    "resize",
                    &host_name,
                    &PatchParams::default(),
                    &Patch::Strategic(patch),
                )
                .await
                .map_err(|e| subresource_status(&e, tenant, RESIZE))?;
            placed = PlacedPod::of(&pod);
        }
        if let Some(patch) = ephemeral_patch(&current, desired) {
            placed = add_ephemeral_containers(api, &host_name, patch, tenant).await?;
        }
        Ok(Placement::Placed {
            pod: placed,
            created: false,
        })
    }

    async fn delete(&self, request: Request<DeletePodRequest>) -> Result<DeletePodResponse, Status> {
        let (caller, tenant) = self.caller(&request)?;
        let name = caller.tenant;
        self.limiter.take(&name)?;
        let req = request.into_inner();
        let host_name = host_pod_name(&req.pod_name, &req.pod_namespace, name.as_str());
        let api = self.pods(&tenant);
        let Some(current) = api
            .get_opt(&host_name)
            .await
            .map_err(|e| kube_status(&e, &tenant))?
        else {
            return Ok(DeletePodResponse { deleted: false });
        };
        if recorded_ref(&current.metadata).map(|r| r.uid) != Some(req.pod_uid.clone()) {
            return Ok(DeletePodResponse { deleted: false });
        }
        let params = DeleteParams {
            grace_period_seconds: req.grace_period_seconds.and_then(|g| u32::try_from(g).ok()),
            preconditions: Some(Preconditions {
                uid: current.metadata.uid.clone(),
                resource_version: None,
            }),
            ..Default::default()
        };
        match api.delete(&host_name, &params).await {
            Ok(_) => Ok(DeletePodResponse { deleted: true }),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(DeletePodResponse { deleted: false }),
            Err(e) => Err(kube_status(&e, &tenant)),
        }
    }
}

/// The scheduling gate a new host Pod carries until the objects it references are copied.
pub const COPIES_GATE: &str = "rcsync.io/copies";

/// What `place` did.
enum Placement {
    /// The host Pod as it now stands, and whether this call created it.
    Placed { pod: PlacedPod, created: bool },
    /// Its host name is held by something else: refused.
    NameInUse(PodRefusal),
}

fn name_in_use(host_name: &str, holder: String) -> PodRefusal {
    PodRefusal {
        reason: PodRefusalReason::NameInUse as i32,
        message: format!("host name {host_name:?} is already used by {holder}"),
    }
}

/// What the tenant's policy refuses in the host form of a Pod: what the host cannot honour
/// first, then Pod Security.
fn policy_refusal(desired: &Pod, tenant: &Tenant) -> Option<PodRefusal> {
    let spec = desired.spec.as_ref()?;
    let mut problems = unsupported(spec, &tenant.pods);
    problems.extend(crate::translate::node_selector_conflicts(spec, &tenant.pods));
    if !problems.is_empty() {
        return Some(PodRefusal {
            reason: PodRefusalReason::Unsupported as i32,
            message: format!("the host cannot honour {}", problems.join("; ")),
        });
    }
    crate::pod_security::evaluate(
        tenant.pods.pod_security,
        desired.metadata.annotations.as_ref(),
        spec,
    )
    .err()
    .map(|violations| PodRefusal {
        reason: PodRefusalReason::PodSecurity as i32,
        message: violations.to_string(),
    })
}

/// Adds ephemeral containers to the host Pod `name` (its `ephemeralcontainers` subresource).
async fn add_ephemeral_containers(
    api: &Api<Pod>,
    name: &str,
    patch: serde_json::Value,
    tenant: &Tenant,
) -> Result<PlacedPod, Status> {
    api.patch_subresource(
        "ephemeralcontainers",
        name,
        &PatchParams::default(),
        &Patch::Strategic(patch),
    )
    .await
    .map(|pod| PlacedPod::of(&pod))
    .map_err(|e| subresource_status(&e, tenant, EPHEMERAL_CONTAINERS))
}

/// The path of `PodSync.ApplyPod`.
pub const APPLY_POD: &str = "/rcsync.v1.PodSync/ApplyPod";
/// The path of `PodSync.DeletePod`.
pub const DELETE_POD: &str = "/rcsync.v1.PodSync/DeletePod";
pub(crate) const WATCH: &str = "/rcsync.v1.PodSync/WatchPodStatus";
/// The path of `PodSync.ApplyDisruptionBudget`.
pub const APPLY_BUDGET: &str = "/rcsync.v1.PodSync/ApplyDisruptionBudget";
/// The path of `PodSync.DeleteDisruptionBudget`.
pub const DELETE_BUDGET: &str = "/rcsync.v1.PodSync/DeleteDisruptionBudget";
/// The path of `PodSync.ListDisruptionBudgets`.
pub const LIST_BUDGETS: &str = "/rcsync.v1.PodSync/ListDisruptionBudgets";
/// The path of `PodSync.ApplyClaim`.
pub const APPLY_CLAIM: &str = "/rcsync.v1.PodSync/ApplyClaim";
/// The path of `PodSync.DeleteClaim`.
pub const DELETE_CLAIM: &str = "/rcsync.v1.PodSync/DeleteClaim";
/// The path of `PodSync.ListClaims`.
pub const LIST_CLAIMS: &str = "/rcsync.v1.PodSync/ListClaims";
pub(crate) const WATCH_CLAIMS: &str = "/rcsync.v1.PodSync/WatchClaimStatus";
pub(crate) const WATCH_BUDGETS: &str = "/rcsync.v1.PodSync/WatchDisruptionBudgets";
/// PodSync's unary calls, which write to (or read from) the host API server: each is rate-limited
/// (`podSyncQps`), counted in `podSyncInFlight` and charged to `--max-pod-sync-bytes` while open.
pub const POD_SYNC_CALLS: [&str; 8] = [
    APPLY_POD,
    DELETE_POD,
    APPLY_BUDGET,
    DELETE_BUDGET,
    LIST_BUDGETS,
    APPLY_CLAIM,
    DELETE_CLAIM,
    LIST_CLAIMS,
];

#[tonic::async_trait]
impl<V: ViewSource> PodSync for PodSyncService<V> {
    async fn apply_pod(
        &self,
        request: Request<ApplyPodRequest>,
    ) -> Result<Response<ApplyPodResponse>, Status> {
        let started = Instant::now();
        let result = self.bounded(self.apply(request)).await;
        self.metrics.record(APPLY_POD, started, &result);
        result.map(Response::new)
    }

    async fn delete_pod(
        &self,
        request: Request<DeletePodRequest>,
    ) -> Result<Response<DeletePodResponse>, Status> {
        let started = Instant::now();
        let result = self.bounded(self.delete(request)).await;
        self.metrics.record(DELETE_POD, started, &result);
        result.map(Response::new)
    }

    async fn apply_disruption_budget(
        &self,
        request: Request<ApplyDisruptionBudgetRequest>,
    ) -> Result<Response<ApplyDisruptionBudgetResponse>, Status> {
        let started = Instant::now();
        let result = self.bounded(self.apply_budget(request)).await;
        self.metrics.record(APPLY_BUDGET, started, &result);
        result.map(Response::new)
    }

    async fn delete_disruption_budget(
        &self,
        request: Request<DeleteDisruptionBudgetRequest>,
    ) -> Result<Response<DeleteDisruptionBudgetResponse>, Status> {
        let started = Instant::now();
        let result = self.bounded(self.delete_budget(request)).await;
        self.metrics.record(DELETE_BUDGET, started, &result);
        result.map(Response::new)
    }

    async fn list_disruption_budgets(
        &self,
        request: Request<ListDisruptionBudgetsRequest>,
    ) -> Result<Response<ListDisruptionBudgetsResponse>, Status> {
        let started = Instant::now();
        let result = self.bounded(self.list_budgets(request)).await;
        self.metrics.record(LIST_BUDGETS, started, &result);
        result.map(Response::new)
    }

    async fn apply_claim(
        &self,
        request: Request<ApplyClaimRequest>,
    ) -> Result<Response<ApplyClaimResponse>, Status> {
        let started = Instant::now();
        let result = self.bounded(self.apply_host_claim(request)).await;
        self.metrics.record(APPLY_CLAIM, started, &result);
        result.map(Response::new)
    }

    async fn delete_claim(
        &self,
        request: Request<DeleteClaimRequest>,
    ) -> Result<Response<DeleteClaimResponse>, Status> {
        let started = Instant::now();
        let result = self.bounded(self.delete_host_claim(request)).await;
        self.metrics.record(DELETE_CLAIM, started, &result);
        result.map(Response::new)
    }

    async fn list_claims(
        &self,
        request: Request<ListClaimsRequest>,
    ) -> Result<Response<ListClaimsResponse>, Status> {
        let started = Instant::now();
        let result = self.bounded(self.list_host_claims(request)).await;
        self.metrics.record(LIST_CLAIMS, started, &result);
        result.map(Response::new)
    }

    type WatchDisruptionBudgetsStream =
        Pin<Box<dyn Stream<Item = Result<DisruptionBudgetEvent, Status>> + Send>>;

    async fn watch_disruption_budgets(
        &self,
        request: Request<WatchDisruptionBudgetsRequest>,
    ) -> Result<Response<Self::WatchDisruptionBudgetsStream>, Status> {
        let (caller, tenant, slot) = self.open_status_stream(&request, WATCH_BUDGETS)?;
        let budgets: ObjectWatch<HostBudget> =
            self.switched_watch(&tenant, tenant.pods.disruption_budgets, "poddisruptionbudgets");
        let (tx, rx) = status_stream::outbox();
        let span = tracing::info_span!("budget_status", tenant = %caller.tenant);
        let shutdown = self.shutdown.clone();
        let ended = switch_turned(
            &self.auth,
            caller,
            tenant.host_namespace.clone(),
            tenant.pods.disruption_budgets,
            |t| t.pods.disruption_budgets,
            "sync.toHost.podDisruptionBudgets.enabled",
        );
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                status_stream::stream::<BudgetReporting>(budgets, None, None, tx, shutdown, ended).await;
                drop(slot);
            },
            span,
        ));
        Ok(Response::new(rx))
    }

    type WatchClaimStatusStream = Pin<Box<dyn Stream<Item = Result<ClaimStatusEvent, Status>> + Send>>;

    async fn watch_claim_status(
        &self,
        request: Request<WatchClaimStatusRequest>,
    ) -> Result<Response<Self::WatchClaimStatusStream>, Status> {
        let (caller, tenant, slot) = self.open_status_stream(&request, WATCH_CLAIMS)?;
        let host_events = tenant
            .pods
            .claims
            .then(|| self.host_events(&tenant, "PersistentVolumeClaim", request.get_ref().host_events))
            .flatten();
        let claims: ObjectWatch<PersistentVolumeClaim> =
            self.switched_watch(&tenant, tenant.pods.claims, "persistentvolumeclaims");
        let (tx, rx) = status_stream::outbox();
        let span = tracing::info_span!("claim_status", tenant = %caller.tenant);
        let shutdown = self.shutdown.clone();
        let ended = switch_turned(
            &self.auth,
            caller,
            tenant.host_namespace.clone(),
            tenant.pods.claims,
            |t| t.pods.claims,
            "sync.toHost.persistentVolumeClaims.enabled",
        );
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                status_stream::stream::<ClaimReporting>(claims, host_events, None, tx, shutdown, ended).await;
                drop(slot);
            },
            span,
        ));
        Ok(Response::new(rx))
    }

    type WatchPodStatusStream = Pin<Box<dyn Stream<Item = Result<PodStatusEvent, Status>> + Send>>;

    async fn watch_pod_status(
        &self,
        request: Request<WatchPodStatusRequest>,
    ) -> Result<Response<Self::WatchPodStatusStream>, Status> {
        let (caller, tenant, slot) = self.open_status_stream(&request, WATCH)?;
        let name = caller.tenant.clone();
        let config = watcher::Config::default().labels(&managed_selector(&tenant));
        let pods = self
            .metrics
            .watches
            .follow(
                "pods".into(),
                watcher::watcher(
                    Api::<HostPodStatus>::namespaced(self.client.clone(), &tenant.host_namespace),
                    config,
                )
                .retry_with_backoff(),
            )
            .boxed();
        let host_events = self.host_events(&tenant, "Pod", request.get_ref().host_events);
        let copies = lost_copies::watch(&self.client, &tenant, &self.metrics);
        let (tx, rx) = status_stream::outbox();
        let span = tracing::info_span!("pod_status", tenant = %name);
        let gauge = self
            .metrics
            .status_streams_open
            .get_or_create(&Metrics::tenant(name.as_str()))
            .clone();
        let shutdown = self.shutdown.clone();
        let ended = tenant_left(&self.auth, caller, tenant.host_namespace.clone());
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                gauge.inc();
                status_stream::stream::<PodReporting>(pods, host_events, Some(copies), tx, shutdown, ended)
                    .await;
                gauge.dec();
                drop(slot);
            },
            span,
        ));
        Ok(Response::new(rx))
    }
}

/// Resolves, with the status to end a WatchPodStatus stream with, once its `caller` is no
/// longer accepted (its access is revoked, as its Sync streams are: see
/// [`Authenticator::revoked`]) or the tenants file moves its tenant to another host namespace than
/// `host_namespace` (ABORTED: the caller reopens the stream and watches the new one). Never
/// resolves while the config keeps both.
fn tenant_left(
    auth: &Authenticator,
    caller: Caller,
    host_namespace: String,
) -> impl std::future::Future<Output = Status> + Send + use<> {
    tenant_changed(auth, caller, host_namespace, |_| None)
}

/// [`tenant_left`] for a stream opened under a switch of the tenant's (WatchClaimStatus,
/// WatchDisruptionBudgets), which also ends (ABORTED: open it again) when the tenants file turns
/// the switch (`read` from the tenant, named `field`) away from `opened_with`.
fn switch_turned(
    auth: &Authenticator,
    caller: Caller,
    host_namespace: String,
    opened_with: bool,
    read: fn(&Tenant) -> bool,
    field: &'static str,
) -> impl std::future::Future<Output = Status> + Send + use<> {
    tenant_changed(auth, caller, host_namespace, move |now| {
        (read(now) != opened_with)
            .then(|| Status::aborted(format!("the tenant's {field} changed: open the stream again")))
    })
}

/// Resolves once `caller` is no longer accepted, its tenant moves away from `host_namespace`, or
/// `also` finds a reason in the tenant's new config.
fn tenant_changed<A>(
    auth: &Authenticator,
    caller: Caller,
    host_namespace: String,
    also: A,
) -> impl std::future::Future<Output = Status> + Send + use<A>
where
    A: Fn(&Tenant) -> Option<Status> + Send + 'static,
{
    auth.stream_ended(caller, move |state, caller| {
        match state.file.tenant(caller.tenant.as_str()) {
            Some(now) if now.host_namespace != host_namespace => Err(Status::aborted(format!(
                "the tenant's host namespace changed from {host_namespace:?} to {:?}: open the stream again",
                now.host_namespace
            ))),
            Some(now) => also(now).map_or(Ok(()), Err),
            None => Ok(()),
        }
    })
}

#[cfg(test)]
mod policy_properties;

#[cfg(test)]
mod tests {
    use super::*;

    fn tenants_state(yaml: &str) -> Arc<TenantsState> {
        Arc::new(TenantsState {
            file: rcsync_core::TenantsFile::parse(std::path::Path::new("t.yaml"), yaml).unwrap(),
            tokens: Default::default(),
            patches: Default::default(),
        })
    }

    #[tokio::test]
    async fn a_status_stream_ends_when_its_tenant_moves_namespace_or_leaves_the_config() {
        use futures::FutureExt as _;
        let both = "tenants:\n  - {name: a, hostNamespace: ns-a}\n  - {name: b, hostNamespace: ns-b}\n";
        let (config, rx) = watch::channel(tenants_state(both));
        // A caller without credentials (the config has no tokens).
        let mut request = Request::new(());
        request
            .metadata_mut()
            .insert(crate::grpc::auth::TENANT_HEADER, "a".parse().unwrap());
        let auth = Authenticator::new(rx, true);
        let a = auth.identify(&request).unwrap();
        let mut left = Box::pin(tenant_left(&auth, a.clone(), "ns-a".into()));
        assert!((&mut left).now_or_never().is_none(), "nothing changed for a");
        // Another tenant's change, or a reload that keeps a as it is, goes on.
        config.send_replace(tenants_state("tenants:\n  - {name: a, hostNamespace: ns-a}\n"));
        for _ in 0..8 {
            // The reload follower runs in turn with this test.
            tokio::task::yield_now().await;
        }
        assert!((&mut left).now_or_never().is_none(), "b left, not a");
        config.send_replace(tenants_state("tenants:\n  - {name: a, hostNamespace: ns-a2}\n"));
        let moved = left.await;
        assert_eq!(moved.code(), tonic::Code::Aborted);
        assert_eq!(
            moved.message(),
            "the tenant's host namespace changed from \"ns-a\" to \"ns-a2\": open the stream again"
        );
        config.send_replace(tenants_state(
            both.replace("{name: a, hostNamespace: ns-a}", "{name: c, hostNamespace: ns-c}")
                .as_str(),
        ));
        let removed = tenant_left(&auth, a, "ns-a2".into()).await;
        assert_eq!(removed.code(), tonic::Code::PermissionDenied);
    }
}
