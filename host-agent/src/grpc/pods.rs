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

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::{
    ConfigMap, Event as CoreEvent, PersistentVolumeClaim, Pod, PodCondition, PodSchedulingGate, Secret,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt as _};
use rcsync_core::Tenant;
use rcsync_core::gates;
use rcsync_core::kube_client::RetryWithBackoff as _;
use rcsync_core::naming::LABEL_MANAGED_BY;
use rcsync_core::pod_refs::{self, RefKind};
use rcsync_proto::v1::pod_sync_server::PodSync;
use rcsync_proto::v1::{
    ApplyClaimRequest, ApplyClaimResponse, ApplyDisruptionBudgetRequest, ApplyDisruptionBudgetResponse,
    ApplyPodRequest, ApplyPodResponse, ClaimStatusEvent, DeleteClaimRequest, DeleteClaimResponse,
    DeleteDisruptionBudgetRequest, DeleteDisruptionBudgetResponse, DeletePodRequest, DeletePodResponse,
    HostEvents, ListClaimsRequest, ListClaimsResponse, ListDisruptionBudgetsRequest,
    ListDisruptionBudgetsResponse, PodRefusal, PodRefusalReason, PodStatusEvent, WatchClaimStatusRequest,
    WatchPodStatusRequest,
};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

use crate::grpc::auth::{Authenticator, Caller};
use crate::grpc::claim_status::ClaimReporting;
use crate::grpc::host_events::{self, HostEventFeed};
use crate::grpc::limits::{StreamKind, TenantLimiter};
use crate::grpc::pod_status::{HostPodStatus, PodReporting};
use crate::grpc::status_stream::{self, EventWatch, ObjectWatch};
use crate::index::{TenantsState, ViewSource};
use crate::metrics::{DecisionLabels, Metrics};
use crate::translate::{
    VirtualPodRef, host_config_map, host_pod, host_secret, managed_selector, recorded_holder, recorded_ref,
    unsupported, virtual_ref,
};
use rcsync_core::naming::host_pod_name;

mod budgets;
mod claims;
mod updates;
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
        let desired = host_pod(&pod, &tenant, &decision.host_runtime_class_name)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let copies = accepted_copies(&pod, &id, &tenant, &request)?;
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

    /// A refusal when the host name of a copy is held by another virtual object or by a host
    /// object rcsync did not write for this tenant.
    async fn names_in_use(
        &self,
        tenant: &Tenant,
        id: &VirtualPodRef,
        copies: &[HostCopy],
    ) -> Result<Option<PodRefusal>, Status> {
        for copy in copies {
            let meta = match copy {
                HostCopy::ConfigMap { host, .. } => self
                    .config_maps(tenant)
                    .get_metadata_opt(&host.name_any())
                    .await
                    .map_err(|e| kube_status(&e, tenant))?
                    .map(|m| m.metadata),
                HostCopy::Secret { host, .. } => self
                    .secrets(tenant)
                    .get_metadata_opt(&host.name_any())
                    .await
                    .map_err(|e| kube_status(&e, tenant))?
                    .map(|m| m.metadata),
            };
            let Some(meta) = meta else { continue };
            let kind = copy.kind();
            let holder = match recorded_holder(&meta, tenant) {
                Some((ns, name)) if ns == id.namespace && name == copy.virtual_name() => continue,
                Some((ns, name)) => format!("{kind} {ns}/{name}"),
                None => format!("a {kind} rcsync does not manage"),
            };
            return Ok(Some(name_in_use(&meta.name.unwrap_or_default(), holder)));
        }
        Ok(None)
    }

    /// Creates or updates one copy so it holds the virtual data and lists `owner` among its owners.
    async fn write_copy(
        &self,
        tenant: &Tenant,
        copy: &HostCopy,
        owner: &OwnerReference,
    ) -> Result<(), Status> {
        match copy {
            HostCopy::ConfigMap { host, .. } => {
                write_owned(&self.config_maps(tenant), host.clone(), owner, tenant, |a, b| {
                    a.data == b.data && a.binary_data == b.binary_data
                })
                .await
            }
            HostCopy::Secret { host, .. } => {
                write_owned(&self.secrets(tenant), host.clone(), owner, tenant, |a, b| {
                    a.data == b.data && a.type_ == b.type_
                })
                .await
            }
        }
    }

    fn config_maps(&self, tenant: &Tenant) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), &tenant.host_namespace)
    }

    fn secrets(&self, tenant: &Tenant) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &tenant.host_namespace)
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

/// A referenced object to copy: its virtual name and its host form.
enum HostCopy {
    ConfigMap { virtual_name: String, host: ConfigMap },
    Secret { virtual_name: String, host: Secret },
}

impl HostCopy {
    fn kind(&self) -> RefKind {
        match self {
            Self::ConfigMap { .. } => RefKind::ConfigMap,
            Self::Secret { .. } => RefKind::Secret,
        }
    }

    fn virtual_name(&self) -> &str {
        match self {
            Self::ConfigMap { virtual_name, .. } | Self::Secret { virtual_name, .. } => virtual_name,
        }
    }
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

/// The objects sent with a Pod, each checked to be one the Pod references, from its namespace.
fn accepted_copies(
    pod: &Pod,
    id: &VirtualPodRef,
    tenant: &Tenant,
    request: &ApplyPodRequest,
) -> Result<Vec<HostCopy>, Status> {
    let references = pod.spec.as_ref().map(pod_refs::references).unwrap_or_default();
    let mut copies = Vec::new();
    let check = |kind: RefKind, meta: &kube::api::ObjectMeta| -> Result<String, Status> {
        let name = meta.name.clone().unwrap_or_default();
        let namespace = meta.namespace.clone().unwrap_or_default();
        if namespace != id.namespace {
            return Err(Status::invalid_argument(format!(
                "{kind} {namespace}/{name} is not in the pod's namespace {:?}",
                id.namespace
            )));
        }
        if !references.contains_key(&(kind, name.clone())) {
            return Err(Status::invalid_argument(format!(
                "{kind} {namespace}/{name} is not referenced by pod {}/{}",
                id.namespace, id.name
            )));
        }
        Ok(name)
    };
    let invalid = |kind: RefKind, e: &dyn std::fmt::Display| {
        Status::invalid_argument(format!("a sent {kind} is not valid: {e}"))
    };
    for json in &request.config_maps_json {
        let cm: ConfigMap = serde_json::from_slice(json).map_err(|e| invalid(RefKind::ConfigMap, &e))?;
        let virtual_name = check(RefKind::ConfigMap, &cm.metadata)?;
        let host = host_config_map(&cm, tenant).map_err(|e| invalid(RefKind::ConfigMap, &e))?;
        copies.push(HostCopy::ConfigMap { virtual_name, host });
    }
    for json in &request.secrets_json {
        let secret: Secret = serde_json::from_slice(json).map_err(|e| invalid(RefKind::Secret, &e))?;
        let virtual_name = check(RefKind::Secret, &secret.metadata)?;
        let host = host_secret(&secret, tenant).map_err(|e| invalid(RefKind::Secret, &e))?;
        copies.push(HostCopy::Secret { virtual_name, host });
    }
    Ok(copies)
}

/// What ApplyPod uses of the host Pod it wrote: the API server's answer to a create is decoded only
/// this far (a Pod's spec is most of its bytes, and all of it is what was just sent).
#[derive(Debug, Default, Deserialize)]
struct PlacedPod {
    #[serde(default)]
    metadata: PlacedMeta,
    #[serde(default)]
    spec: Option<PlacedSpec>,
    #[serde(default)]
    status: Option<PlacedStatus>,
}

#[derive(Debug, Default, Deserialize)]
struct PlacedStatus {
    #[serde(default)]
    conditions: Option<Vec<PodCondition>>,
}

#[derive(Debug, Default, Deserialize)]
struct PlacedMeta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    uid: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PlacedSpec {
    #[serde(default)]
    scheduling_gates: Option<Vec<PodSchedulingGate>>,
}

impl PlacedPod {
    /// The same view of a Pod already decoded whole.
    fn of(pod: &Pod) -> Self {
        Self {
            metadata: PlacedMeta {
                name: pod.name_any(),
                uid: pod.metadata.uid.clone(),
            },
            spec: pod.spec.as_ref().map(|s| PlacedSpec {
                scheduling_gates: s.scheduling_gates.clone(),
            }),
            status: pod.status.as_ref().map(|s| PlacedStatus {
                conditions: s.conditions.clone(),
            }),
        }
    }

    /// The status patch that gives this host Pod the conditions of `virtual_pod`'s readiness
    /// gates as the tenant's controllers set them (type, status, reason and message), and removes
    /// those they removed; `None` when it carries them already.
    fn readiness_patch(&self, virtual_pod: &Pod) -> Option<serde_json::Value> {
        let types = gates::readiness_types(virtual_pod);
        if types.is_empty() {
            return None;
        }
        let wanted = gates::readiness_conditions(virtual_pod);
        let have = self
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_deref())
            .unwrap_or_default();
        let carried = |want: &PodCondition| {
            have.iter().any(|c| {
                c.type_ == want.type_
                    && c.status == want.status
                    && c.reason == want.reason
                    && c.message == want.message
            })
        };
        let removed: Vec<serde_json::Value> = have
            .iter()
            .filter(|c| types.contains(&c.type_.as_str()) && !wanted.iter().any(|w| w.type_ == c.type_))
            .map(|c| json!({"type": c.type_, "$patch": "delete"}))
            .collect();
        if wanted.iter().all(carried) && removed.is_empty() {
            return None;
        }
        let mut conditions: Vec<serde_json::Value> = wanted
            .into_iter()
            .map(|c| serde_json::to_value(c).expect("a condition serializes"))
            .collect();
        conditions.extend(removed);
        Some(json!({"status": {"conditions": conditions}}))
    }
}

/// `POST` of a Pod into `api`'s namespace, its answer decoded as a [`PlacedPod`].
async fn create_pod(client: &Client, api: &Api<Pod>, pod: &Pod) -> kube::Result<PlacedPod> {
    let body = serde_json::to_vec(pod).map_err(kube::Error::SerdeError)?;
    let mut request = kube::core::Request::new(api.resource_url())
        .create(&PostParams::default(), body)
        .map_err(kube::Error::BuildRequest)?;
    request.extensions_mut().insert("create");
    client.request::<PlacedPod>(request).await
}

fn owner_reference(pod: &PlacedPod) -> Result<OwnerReference, Status> {
    Ok(OwnerReference {
        api_version: "v1".into(),
        kind: "Pod".into(),
        name: pod.metadata.name.clone(),
        uid: pod
            .metadata
            .uid
            .clone()
            .ok_or_else(|| Status::internal("the host API server returned a pod without a uid"))?,
        controller: None,
        block_owner_deletion: None,
    })
}

fn has_copies_gate(pod: &PlacedPod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.scheduling_gates.as_ref())
        .is_some_and(|g| g.iter().any(|g| g.name == COPIES_GATE))
}

/// Creates `desired` owned by `owner`, or updates the existing copy: its data and its owners
/// (the host Pods using it; the host's garbage collector removes it with the last of them).
/// Optimistic concurrency: a conflict is returned as ABORTED and the caller retries.
async fn write_owned<K>(
    api: &Api<K>,
    mut desired: K,
    owner: &OwnerReference,
    tenant: &Tenant,
    same_content: impl Fn(&K, &K) -> bool,
) -> Result<(), Status>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let name = desired.name_any();
    let Some(current) = api.get_opt(&name).await.map_err(|e| kube_status(&e, tenant))? else {
        desired.meta_mut().owner_references = Some(vec![owner.clone()]);
        return match api.create(&PostParams::default(), &desired).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Err(Status::aborted(format!(
                "copy {name} was created concurrently: retry"
            ))),
            Err(e) => Err(kube_status(&e, tenant)),
        };
    };
    let mut owners = current.meta().owner_references.clone().unwrap_or_default();
    let owned = owners.iter().any(|o| o.uid == owner.uid);
    if owned && same_content(&current, &desired) {
        return Ok(());
    }
    if !owned {
        owners.push(owner.clone());
    }
    let meta = desired.meta_mut();
    meta.owner_references = Some(owners);
    meta.resource_version = current.meta().resource_version.clone();
    match api.replace(&name, &PostParams::default(), &desired).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Err(Status::aborted(format!(
            "copy {name} changed concurrently: retry"
        ))),
        // A Secret's type cannot change: replace the copy (its owners come back on the retry).
        Err(kube::Error::Api(e)) if e.code == 422 && e.message.contains("type") => {
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: current.meta().uid.clone(),
                    resource_version: None,
                }),
                ..Default::default()
            };
            api.delete(&name, &params)
                .await
                .map_err(|e| kube_status(&e, tenant))?;
            Err(Status::aborted(format!(
                "copy {name} changed its type and is being replaced: retry"
            )))
        }
        Err(e) => Err(kube_status(&e, tenant)),
    }
}

/// Maps a host API error to the gRPC status the virtual side acts on: configuration problems are
/// FAILED_PRECONDITION (not retried blindly), the rest UNAVAILABLE (retried).
fn kube_status(error: &kube::Error, tenant: &Tenant) -> Status {
    match error {
        kube::Error::Api(e) if e.code == 404 && e.message.contains("namespaces") => {
            Status::failed_precondition(format!(
                "the host namespace {:?} of tenant {} does not exist: {}",
                tenant.host_namespace, tenant.name, e.message
            ))
        }
        // Upstream's quota admission says so only in its message (`... is forbidden: exceeded
        // quota: <name>, requested: ..., used: ..., limited: ...`): a reason the caller can act on.
        kube::Error::Api(e) if e.code == 403 && e.message.contains("exceeded quota") => {
            refused(&e.message, Some(rcsync_proto::HOST_QUOTA_EXCEEDED))
        }
        // What the host may change any moment (a RuntimeClass created or fixed, the host agent's
        // RBAC granted): retried on the caller's usual backoff.
        kube::Error::Api(e) if e.code == 403 && follows_the_host(&e.message) => refused(&e.message, None),
        // The host refuses the Pod as it stands (validation, an admission webhook, a quota that
        // wants requests set, the host's own Pod Security): the same Pod gets the same answer
        // until it or the host's policy changes.
        kube::Error::Api(e) if matches!(e.code, 400 | 403 | 422) => {
            refused(&e.message, Some(rcsync_proto::HOST_POD_REFUSED))
        }
        other => Status::unavailable(format!("the host API server failed: {other}")),
    }
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

/// A Pod subresource the host agent writes that older API servers lack: what the host Pod cannot
/// do without it, and the Kubernetes release that serves it.
struct Subresource {
    name: &'static str,
    what: &'static str,
    since: &'static str,
    otherwise: &'static str,
}

/// `pods/resize`: resources changed in place.
const RESIZE: Subresource = Subresource {
    name: "pods/resize",
    what: "resize a running pod in place",
    since: "1.33",
    otherwise: "the host pod keeps its cpu and memory until the pod is recreated",
};

/// `pods/ephemeralcontainers`: debug containers added.
const EPHEMERAL_CONTAINERS: Subresource = Subresource {
    name: "pods/ephemeralcontainers",
    what: "add debug containers to a running pod",
    since: "1.25",
    otherwise: "the host pod runs without them",
};

/// What a failed write of a host Pod's `subresource` tells the caller: as [`kube_status`], except
/// that a host API server without the subresource (the route itself is not found, where a Pod
/// gone since it was read would be named) refuses the Pod as it stands, saying so, rather than
/// failing as if it were down: the tenant sees why the host Pod does not follow.
fn subresource_status(error: &kube::Error, tenant: &Tenant, subresource: Subresource) -> Status {
    match error {
        kube::Error::Api(e)
            if e.code == 404 && e.message.contains("could not find the requested resource") =>
        {
            let Subresource {
                name,
                what,
                since,
                otherwise,
            } = subresource;
            refused(
                &format!(
                    "it cannot {what} (no {name} subresource: Kubernetes {since} and later serve it); {otherwise}"
                ),
                Some(rcsync_proto::HOST_POD_REFUSED),
            )
        }
        other => kube_status(other, tenant),
    }
}

/// The host API server's refusal as FAILED_PRECONDITION, with a `google.rpc.ErrorInfo` of
/// `reason` (domain `rcsync.io`) when it has one.
fn refused(message: &str, reason: Option<&str>) -> Status {
    let message = format!("the host API server refused the pod: {message}");
    match reason {
        Some(reason) => Status::with_error_details(
            tonic::Code::FailedPrecondition,
            message,
            ErrorDetails::with_error_info(reason, rcsync_proto::ERROR_DOMAIN, HashMap::new()),
        ),
        None => Status::failed_precondition(message),
    }
}

/// Whether a 403 of the host API server is about something of the host's rather than the Pod:
/// the host agent's own RBAC (`... cannot create resource "pods" ...`), the host namespace being
/// deleted, or the Pod's RuntimeClass (upstream's RuntimeClass admission: `pod rejected:
/// RuntimeClass "x" not found`, an overhead or node selector at odds with the class), which an
/// operator or a class change cures.
fn follows_the_host(message: &str) -> bool {
    (message.contains(" cannot ") && message.contains(" resource "))
        || message.contains("because it is being terminated")
        || (message.contains("pod rejected:") && message.to_ascii_lowercase().contains("runtimeclass"))
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

    type WatchClaimStatusStream = Pin<Box<dyn Stream<Item = Result<ClaimStatusEvent, Status>> + Send>>;

    async fn watch_claim_status(
        &self,
        request: Request<WatchClaimStatusRequest>,
    ) -> Result<Response<Self::WatchClaimStatusStream>, Status> {
        let started = Instant::now();
        let opened = self.caller(&request).and_then(|(caller, tenant)| {
            let slot = self.limiter.open(&caller.tenant, StreamKind::PodStatus)?;
            Ok((caller, tenant, slot))
        });
        self.metrics.record(WATCH_CLAIMS, started, &opened);
        let (caller, tenant, slot) = opened?;
        // A tenant whose claims the host does not make costs no watch: its stream says it has
        // listed (nothing) and ends when the switch turns, so the caller opens it again.
        let host_events = tenant
            .pods
            .claims
            .then(|| self.host_events(&tenant, "PersistentVolumeClaim", request.get_ref().host_events))
            .flatten();
        let claims: ObjectWatch<PersistentVolumeClaim> = if tenant.pods.claims {
            let config = watcher::Config::default().labels(&managed_selector(&tenant));
            self.metrics
                .watches
                .follow(
                    "persistentvolumeclaims".into(),
                    watcher::watcher(
                        Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), &tenant.host_namespace),
                        config,
                    )
                    .retry_with_backoff(),
                )
                .boxed()
        } else {
            futures::stream::iter([Ok(watcher::Event::Init), Ok(watcher::Event::InitDone)])
                .chain(futures::stream::pending())
                .boxed()
        };
        let (tx, rx) = mpsc::channel(64);
        let span = tracing::info_span!("claim_status", tenant = %caller.tenant);
        let shutdown = self.shutdown.clone();
        let ended = claims_switched(
            &self.auth,
            caller,
            tenant.host_namespace.clone(),
            tenant.pods.claims,
        );
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                status_stream::stream::<ClaimReporting>(claims, host_events, tx, shutdown, ended).await;
                drop(slot);
            },
            span,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type WatchPodStatusStream = Pin<Box<dyn Stream<Item = Result<PodStatusEvent, Status>> + Send>>;

    async fn watch_pod_status(
        &self,
        request: Request<WatchPodStatusRequest>,
    ) -> Result<Response<Self::WatchPodStatusStream>, Status> {
        let started = Instant::now();
        let opened = self.caller(&request).and_then(|(caller, tenant)| {
            let slot = self.limiter.open(&caller.tenant, StreamKind::PodStatus)?;
            Ok((caller, tenant, slot))
        });
        self.metrics.record(WATCH, started, &opened);
        let (caller, tenant, slot) = opened?;
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
        let (tx, rx) = mpsc::channel(64);
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
                status_stream::stream::<PodReporting>(pods, host_events, tx, shutdown, ended).await;
                gauge.dec();
                drop(slot);
            },
            span,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
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

/// [`tenant_left`] for a WatchClaimStatus stream, which also ends (ABORTED: open it again) when the
/// tenants file turns the tenant's `sync.toHost.persistentVolumeClaims.enabled` away from `claims`,
/// what the stream was opened with.
fn claims_switched(
    auth: &Authenticator,
    caller: Caller,
    host_namespace: String,
    claims: bool,
) -> impl std::future::Future<Output = Status> + Send + use<> {
    tenant_changed(auth, caller, host_namespace, move |now| {
        (now.pods.claims != claims).then(|| {
            Status::aborted(
                "the tenant's sync.toHost.persistentVolumeClaims.enabled changed: open the stream again",
            )
        })
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

    #[test]
    fn a_subresource_the_host_api_server_lacks_refuses_the_pod_saying_which_and_since_when() {
        let tenant = rcsync_core::TenantsFile::parse(
            std::path::Path::new("t.yaml"),
            "tenants:\n  - name: team-a\n    hostNamespace: team-a\n",
        )
        .unwrap()
        .tenant("team-a")
        .cloned()
        .unwrap();
        let not_found = |message: &str| {
            kube::Error::Api(Box::new(kube::core::Status {
                code: 404,
                message: message.into(),
                reason: "NotFound".into(),
                ..Default::default()
            }))
        };
        let route = not_found("the server could not find the requested resource");
        let status = subresource_status(&route, &tenant, EPHEMERAL_CONTAINERS);
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            status.message(),
            "the host API server refused the pod: it cannot add debug containers to a running pod \
             (no pods/ephemeralcontainers subresource: Kubernetes 1.25 and later serve it); the host pod runs without them"
        );
        assert_eq!(
            status.get_error_details().error_info().map(|i| i.reason.as_str()),
            Some(rcsync_proto::HOST_POD_REFUSED)
        );
        // The Pod itself gone since it was read: retried, as any other failure of the host.
        let pod_gone = not_found(r#"pods "web-x-default-x-team-a" not found"#);
        assert_eq!(
            subresource_status(&pod_gone, &tenant, RESIZE).code(),
            tonic::Code::Unavailable
        );
    }

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

    #[test]
    fn a_host_refusal_says_whether_room_a_change_of_the_pod_or_nothing_of_the_pod_cures_it() {
        let state = tenants_state("tenants:\n  - {name: a, hostNamespace: ns-a}\n");
        let tenant = state.file.tenant("a").unwrap();
        let refused = |message: &str| {
            let status: kube::core::Status =
                serde_json::from_value(json!({"code": 403, "reason": "Forbidden", "message": message}))
                    .unwrap();
            kube_status(&kube::Error::Api(Box::new(status)), tenant)
        };
        let full = refused(
            "pods \"web-x-default-x-a\" is forbidden: exceeded quota: pods, requested: pods=1, used: pods=1, limited: pods=1",
        );
        assert_eq!(full.code(), tonic::Code::FailedPrecondition);
        assert!(full.message().contains("exceeded quota: pods"), "{full:?}");
        let info = full.get_details_error_info().expect("an ErrorInfo");
        assert_eq!(
            (info.reason.as_str(), info.domain.as_str()),
            (rcsync_proto::HOST_QUOTA_EXCEEDED, rcsync_proto::ERROR_DOMAIN)
        );
        let reason = |status: &Status| {
            assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
            status.get_details_error_info().map(|info| {
                assert_eq!(info.domain, rcsync_proto::ERROR_DOMAIN);
                info.reason
            })
        };
        // The Pod as it stands is refused: a webhook, a quota that wants requests, validation.
        for message in [
            "admission webhook \"policy.example\" denied the request: no",
            "pods \"web-x-default-x-a\" is forbidden: failed quota: compute: must specify requests.cpu for: app",
            "pods \"web-x-default-x-a\" is forbidden: violates PodSecurity \"restricted:latest\": runAsNonRoot != true",
        ] {
            assert_eq!(
                reason(&refused(message)).as_deref(),
                Some(rcsync_proto::HOST_POD_REFUSED),
                "{message}"
            );
        }
        let invalid: kube::core::Status = serde_json::from_value(json!({
            "code": 422, "reason": "Invalid",
            "message": "Pod \"web-x-default-x-a\" is invalid: spec.containers[0].resources.requests: Invalid value: \"2\": must be less than or equal to cpu limit of 1",
        }))
        .unwrap();
        let invalid = kube_status(&kube::Error::Api(Box::new(invalid)), tenant);
        assert_eq!(reason(&invalid).as_deref(), Some(rcsync_proto::HOST_POD_REFUSED));
        // What the host may cure any moment carries no reason: retried on the usual backoff.
        for message in [
            "pod rejected: RuntimeClass \"kata\" not found",
            "pod rejected: conflict: runtimeClass.scheduling.nodeSelector[pool] = kata; pod.spec.nodeSelector[pool] = gvisor",
            "pods \"web-x-default-x-a\" is forbidden: User \"system:serviceaccount:rcsync:host-agent\" cannot create resource \"pods\" in API group \"\" in the namespace \"ns-a\"",
            "pods \"web-x-default-x-a\" is forbidden: unable to create new content in namespace ns-a because it is being terminated",
        ] {
            assert_eq!(reason(&refused(message)), None, "{message}");
        }
    }

    #[test]
    fn a_created_pod_is_read_as_its_name_uid_and_scheduling_gates_only() {
        let answer = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-x-default-x-team-a", "namespace": "team-a", "uid": "u-1",
                         "labels": {"rcsync.io/managed-by": "team-a"}},
            "spec": {"containers": [{"name": "app", "image": "registry.example/app:1.0"}],
                     "schedulingGates": [{"name": COPIES_GATE}]},
            "status": {"phase": "Pending"},
        });
        let placed: PlacedPod = serde_json::from_value(answer.clone()).unwrap();
        assert_eq!(placed.metadata.name, "web-x-default-x-team-a");
        assert!(has_copies_gate(&placed));
        assert_eq!(owner_reference(&placed).unwrap().uid, "u-1");
        // The same as reading the whole Pod.
        let whole: Pod = serde_json::from_value(answer).unwrap();
        let of = PlacedPod::of(&whole);
        assert_eq!(of.metadata.name, placed.metadata.name);
        assert_eq!(of.metadata.uid, placed.metadata.uid);
        assert!(has_copies_gate(&of));
        // Without gates, or without a uid (an API server bug), it says so.
        let plain: PlacedPod =
            serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {}})).unwrap();
        assert!(!has_copies_gate(&plain));
        assert!(owner_reference(&plain).is_err());
    }

    #[test]
    fn a_host_pod_takes_its_readiness_gates_conditions_as_the_tenant_sets_and_removes_them() {
        let virtual_pod = |conditions: serde_json::Value| -> Pod {
            serde_json::from_value(json!({
                "metadata": {"name": "web"},
                "spec": {"containers": [], "readinessGates": [
                    {"conditionType": "example.com/lb-ready"}, {"conditionType": "example.com/dns"}]},
                "status": {"conditions": conditions},
            }))
            .unwrap()
        };
        let placed = |conditions: serde_json::Value| -> PlacedPod {
            serde_json::from_value(json!({"metadata": {"name": "h"}, "status": {"conditions": conditions}}))
                .unwrap()
        };
        let lb = json!({"type": "example.com/lb-ready", "status": "True"});
        let dns = json!({"type": "example.com/dns", "status": "True"});
        let ready = json!({"type": "Ready", "status": "False"});
        // Set on the virtual Pod, missing on the host: written.
        let patch = placed(json!([ready]))
            .readiness_patch(&virtual_pod(json!([lb, ready])))
            .unwrap();
        assert_eq!(patch, json!({"status": {"conditions": [lb]}}));
        // Carried already: nothing to write.
        assert_eq!(
            placed(json!([lb, ready])).readiness_patch(&virtual_pod(json!([lb]))),
            None
        );
        // Removed by the tenant's controller: removed on the host; the kubelet's own stay.
        let patch = placed(json!([lb, dns, ready]))
            .readiness_patch(&virtual_pod(json!([lb])))
            .unwrap();
        assert_eq!(
            patch,
            json!({"status": {"conditions": [lb, {"type": "example.com/dns", "$patch": "delete"}]}})
        );
    }
}
