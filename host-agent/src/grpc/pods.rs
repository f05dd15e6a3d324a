//! `rcsync.v1.PodSync`: the host agent writes a tenant's admitted Pods into its host namespace
//! (re-checking the decision first) and streams their status back.
//!
//! ```text
//!  ApplyPod(pod) ──auth──► view.check_pod (again: the host is the policy point) ──► translate ──► create / patch
//!  DeletePod(ns, name, uid) ──► host Pod of that uid only ──► delete (grace, UID precondition)
//!  WatchPodStatus ──► watch host Pods labelled managed-by=<tenant> in <hostNamespace> ──► events
//! ```

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt as _};
use rcsync_core::{Tenant, TenantName};
use rcsync_proto::v1::pod_sync_server::PodSync;
use rcsync_proto::v1::{
    ApplyPodRequest, ApplyPodResponse, DeletePodRequest, DeletePodResponse, PodStatusEvent,
    PodStatusEventType, WatchPodStatusRequest,
};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::grpc::auth::Authenticator;
use crate::index::{TenantsState, ViewSource};
use crate::metrics::Metrics;
use crate::translate::{host_pod, managed_selector, recorded_ref, virtual_ref};
use rcsync_core::naming::host_pod_name;

/// The PodSync service.
pub struct PodSyncService<V> {
    views: Arc<V>,
    tenants: watch::Receiver<Arc<TenantsState>>,
    auth: Authenticator,
    client: Client,
    metrics: Metrics,
    shutdown: watch::Receiver<bool>,
}

impl<V: ViewSource> PodSyncService<V> {
    /// Builds the service over the host cluster `client`.
    pub fn new(
        views: Arc<V>,
        tenants: watch::Receiver<Arc<TenantsState>>,
        auth: Authenticator,
        client: Client,
        metrics: Metrics,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            views,
            tenants,
            auth,
            client,
            metrics,
            shutdown,
        }
    }

    fn caller<T>(&self, request: &Request<T>) -> Result<(TenantName, Tenant), Status> {
        let name = self.auth.identify_ready(request, self.views.as_ref())?;
        let tenant = self.tenants.borrow().file.tenant(name.as_str()).cloned();
        Ok((
            name,
            tenant.ok_or_else(|| Status::permission_denied("unknown tenant"))?,
        ))
    }

    fn pods(&self, tenant: &Tenant) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &tenant.host_namespace)
    }

    async fn apply(&self, request: Request<ApplyPodRequest>) -> Result<ApplyPodResponse, Status> {
        let (name, tenant) = self.caller(&request)?;
        let pod: Pod = serde_json::from_slice(&request.get_ref().pod_json)
            .map_err(|e| Status::invalid_argument(format!("pod_json is not a v1 Pod: {e}")))?;
        let id = virtual_ref(&pod).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let runtime_class = pod
            .spec
            .as_ref()
            .and_then(|s| s.runtime_class_name.clone())
            .unwrap_or_default();
        let view = self
            .views
            .subscribe(&name)
            .ok_or_else(|| Status::permission_denied("unknown tenant"))?;
        let decision = view.borrow().check_pod(&id.name, &runtime_class);
        let host_name = host_pod_name(&id.name, &id.namespace, name.as_str());
        let mut response = ApplyPodResponse {
            applied: false,
            decision: Some(decision.clone()),
            host_namespace: tenant.host_namespace.clone(),
            host_name: host_name.clone(),
            created: false,
        };
        if !decision.allowed {
            return Ok(response);
        }
        let desired = host_pod(&pod, &tenant, &decision.host_runtime_class_name)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let api = self.pods(&tenant);
        let existing = api
            .get_opt(&host_name)
            .await
            .map_err(|e| kube_status(&e, &tenant))?;
        match existing {
            None => match api.create(&PostParams::default(), &desired).await {
                Ok(_) => response.created = true,
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    return Err(Status::aborted(format!(
                        "host pod {host_name} was created concurrently: retry"
                    )));
                }
                Err(e) => return Err(kube_status(&e, &tenant)),
            },
            Some(current) => {
                let owner = recorded_ref(&current);
                if owner.as_ref().map(|o| o.uid.as_str()) != Some(id.uid.as_str()) {
                    // A host Pod of an earlier virtual Pod of the same name: remove it first.
                    let uid = current.metadata.uid.clone();
                    let params = DeleteParams {
                        preconditions: Some(Preconditions {
                            uid,
                            resource_version: None,
                        }),
                        ..Default::default()
                    };
                    api.delete(&host_name, &params)
                        .await
                        .map_err(|e| kube_status(&e, &tenant))?;
                    return Err(Status::aborted(format!(
                        "host pod {host_name} belonged to an earlier virtual pod of the same name; it is being deleted: retry"
                    )));
                }
                if let Some(patch) = update_patch(&current, &desired) {
                    api.patch(&host_name, &PatchParams::default(), &Patch::Strategic(patch))
                        .await
                        .map_err(|e| kube_status(&e, &tenant))?;
                }
            }
        }
        response.applied = true;
        self.metrics
            .pods_applied_total
            .get_or_create(&Metrics::tenant(name.as_str()))
            .inc();
        Ok(response)
    }

    async fn delete(&self, request: Request<DeletePodRequest>) -> Result<DeletePodResponse, Status> {
        let (name, tenant) = self.caller(&request)?;
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
        if recorded_ref(&current).map(|r| r.uid) != Some(req.pod_uid.clone()) {
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

/// The strategic merge patch that brings a host Pod's mutable parts (labels, annotations,
/// container images) to the desired state; `None` when nothing differs.
fn update_patch(current: &Pod, desired: &Pod) -> Option<serde_json::Value> {
    let mut changed = false;
    let mut patch = json!({"metadata": {}});
    for (field, want, have) in [
        (
            "labels",
            desired.metadata.labels.as_ref(),
            current.metadata.labels.as_ref(),
        ),
        (
            "annotations",
            desired.metadata.annotations.as_ref(),
            current.metadata.annotations.as_ref(),
        ),
    ] {
        let want = want.cloned().unwrap_or_default();
        if want.iter().any(|(k, v)| have.and_then(|h| h.get(k)) != Some(v)) {
            patch["metadata"][field] = json!(want);
            changed = true;
        }
    }
    let images = |pod: &Pod, init: bool| -> Vec<(String, Option<String>)> {
        let spec = pod.spec.as_ref();
        let list = if init {
            spec.and_then(|s| s.init_containers.as_ref())
        } else {
            spec.map(|s| &s.containers)
        };
        list.into_iter()
            .flatten()
            .map(|c| (c.name.clone(), c.image.clone()))
            .collect()
    };
    for (init, field) in [(false, "containers"), (true, "initContainers")] {
        let want = images(desired, init);
        if want != images(current, init) {
            let items: Vec<_> = want
                .iter()
                .map(|(name, image)| json!({"name": name, "image": image}))
                .collect();
            patch["spec"][field] = json!(items);
            changed = true;
        }
    }
    changed.then_some(patch)
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
        kube::Error::Api(e) if matches!(e.code, 400 | 403 | 422) => {
            Status::failed_precondition(format!("the host API server refused the pod: {}", e.message))
        }
        other => Status::unavailable(format!("the host API server failed: {other}")),
    }
}

const APPLY: &str = "/rcsync.v1.PodSync/ApplyPod";
const DELETE: &str = "/rcsync.v1.PodSync/DeletePod";
const WATCH: &str = "/rcsync.v1.PodSync/WatchPodStatus";

#[tonic::async_trait]
impl<V: ViewSource> PodSync for PodSyncService<V> {
    async fn apply_pod(
        &self,
        request: Request<ApplyPodRequest>,
    ) -> Result<Response<ApplyPodResponse>, Status> {
        let started = Instant::now();
        let result = self.apply(request).await;
        self.metrics.record(APPLY, started, &result);
        result.map(Response::new)
    }

    async fn delete_pod(
        &self,
        request: Request<DeletePodRequest>,
    ) -> Result<Response<DeletePodResponse>, Status> {
        let started = Instant::now();
        let result = self.delete(request).await;
        self.metrics.record(DELETE, started, &result);
        result.map(Response::new)
    }

    type WatchPodStatusStream = Pin<Box<dyn Stream<Item = Result<PodStatusEvent, Status>> + Send>>;

    async fn watch_pod_status(
        &self,
        request: Request<WatchPodStatusRequest>,
    ) -> Result<Response<Self::WatchPodStatusStream>, Status> {
        let started = Instant::now();
        let caller = self.caller(&request);
        self.metrics.record(WATCH, started, &caller);
        let (name, tenant) = caller?;
        let config = watcher::Config::default().labels(&managed_selector(&tenant));
        let events = watcher::watcher(self.pods(&tenant), config)
            .default_backoff()
            .boxed();
        let (tx, rx) = mpsc::channel(64);
        let span = tracing::info_span!("pod_status", tenant = %name);
        tokio::spawn(tracing::Instrument::instrument(
            stream_status(events, tx, self.shutdown.clone()),
            span,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn status_event(kind: PodStatusEventType, pod: &Pod) -> Option<PodStatusEvent> {
    let id = recorded_ref(pod)?;
    let status_json = match kind {
        PodStatusEventType::Updated => serde_json::to_vec(&pod.status).unwrap_or_default(),
        _ => Vec::new(),
    };
    Some(PodStatusEvent {
        r#type: kind as i32,
        pod_namespace: id.namespace,
        pod_name: id.name,
        pod_uid: id.uid,
        status_json,
    })
}

async fn stream_status(
    mut events: Pin<Box<dyn Stream<Item = Result<Event<Pod>, watcher::Error>> + Send>>,
    tx: mpsc::Sender<Result<PodStatusEvent, Status>>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Host Pods the client knows about (host name → last pod), to report deletions that happened
    // while the watch was relisting.
    let mut known: HashMap<String, Pod> = HashMap::new();
    let mut relisted: Option<HashMap<String, Pod>> = None;
    loop {
        let event = tokio::select! {
            _ = shutdown.changed() => return,
            _ = tx.closed() => return,
            event = events.next() => event,
        };
        let mut out = Vec::new();
        match event {
            None => return,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "watching host pods failed; retrying with backoff");
                continue;
            }
            Some(Ok(Event::Init)) => relisted = Some(HashMap::new()),
            Some(Ok(Event::InitApply(pod))) => {
                out.extend(status_event(PodStatusEventType::Updated, &pod));
                if let Some(r) = &mut relisted {
                    r.insert(pod.name_any(), pod);
                }
            }
            Some(Ok(Event::InitDone)) => {
                let fresh = relisted.take().unwrap_or_default();
                for (name, pod) in &known {
                    if !fresh.contains_key(name) {
                        out.extend(status_event(PodStatusEventType::Deleted, pod));
                    }
                }
                known = fresh;
                out.push(PodStatusEvent {
                    r#type: PodStatusEventType::InitialStateComplete as i32,
                    ..Default::default()
                });
            }
            Some(Ok(Event::Apply(pod))) => {
                out.extend(status_event(PodStatusEventType::Updated, &pod));
                known.insert(pod.name_any(), pod);
            }
            Some(Ok(Event::Delete(pod))) => {
                out.extend(status_event(PodStatusEventType::Deleted, &pod));
                known.remove(&pod.name_any());
            }
        }
        for event in out {
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
        }
    }
}
