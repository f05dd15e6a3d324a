//! RuntimeClasses in the virtual cluster: the Sync stream client that applies what the host
//! offers, and the enforcer that deletes classes tenants create themselves.
//!
//! ```text
//!  list managed copies (label rcsync.io/managed, annotation rcsync.io/source-version)
//!        └─► SyncRequest{initial_resource_versions} ──► host agent
//!  SyncResponse ──► apply upserts (create / replace / delete+create on a new handler) and removals
//!               ──► ACK, or NACK with per-resource errors ──► SyncState (watch) ──► enforcer, pod syncer
//!  watch virtual RuntimeClasses ──► unmanaged class while sync is enabled ──► delete at once
//! ```
//!
//! Nothing is deleted for lack of a connection: while the host agent is away, what was applied
//! stays, and the enforcer keeps the last known mode.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::node::v1::RuntimeClass;
use kube::api::{DeleteParams, ListParams, PostParams, Preconditions};
use kube::runtime::watcher::{self, Event};
use kube::{Api, ResourceExt as _};
use rcsync_core::admin::Readiness;
use rcsync_core::kube_client::RetryWithBackoff as _;
use rcsync_core::naming::{ANNOTATION_HOST_NAME, ANNOTATION_SOURCE_VERSION, LABEL_RCSYNC_MANAGED};
use rcsync_core::version::content_version;
use rcsync_proto::convert::{from_proto, synced_form};
use rcsync_proto::v1::{ErrorDetail, Resource, SyncRequest, SyncResponse};
use tokio::sync::{Notify, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::connect::{Backoff, HostAgentTarget};
use crate::metrics::Metrics;

/// Value of [`LABEL_RCSYNC_MANAGED`] on managed copies.
pub const MANAGED_VALUE: &str = "true";
/// Readiness check: the first `initial_state_complete` response was applied.
pub const INITIAL_STATE_APPLIED: &str = "initial-state-applied";
/// Readiness check: the virtual cluster's RuntimeClasses were listed.
pub const CLASSES_LISTED: &str = "virtual-runtimeclasses-listed";

/// What the virtual side knows about the sync; shared with the enforcer and the pod syncer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncState {
    /// A Sync stream is open.
    pub connected: bool,
    /// `sync_enabled` of the last response; `None` before the first one.
    pub enabled: Option<bool>,
    /// The first response (initial state) was applied.
    pub initial_applied: bool,
    /// Names of the classes held from the host.
    pub synced: BTreeSet<String>,
    /// The host agent's version of this tenant's Pod policy (Pods it refused are retried when it
    /// changes).
    pub pod_policy: String,
}

/// Whether a RuntimeClass is a copy rcsync manages.
pub fn is_managed(rc: &RuntimeClass) -> bool {
    rc.labels().get(LABEL_RCSYNC_MANAGED).map(String::as_str) == Some(MANAGED_VALUE)
}

/// The object the virtual cluster should hold for a Resource.
pub fn desired_object(resource: &Resource) -> Result<RuntimeClass, String> {
    let class = resource
        .runtime_class
        .as_ref()
        .ok_or("the resource carries no runtime_class")?;
    if class.name != resource.name {
        return Err(format!(
            "resource {:?} carries a class named {:?}",
            resource.name, class.name
        ));
    }
    let mut rc = from_proto(class);
    rc.labels_mut()
        .insert(LABEL_RCSYNC_MANAGED.into(), MANAGED_VALUE.into());
    rc.annotations_mut()
        .insert(ANNOTATION_SOURCE_VERSION.into(), resource.version.clone());
    rc.annotations_mut()
        .insert(ANNOTATION_HOST_NAME.into(), resource.host_name.clone());
    Ok(rc)
}

/// The version of what a managed copy actually holds: the content hash the host agent computes,
/// over the object without rcsync's own marks. A copy someone edited no longer matches its
/// `rcsync.io/source-version`, so declaring this version makes the host agent send it again.
pub fn held_version(rc: &RuntimeClass) -> String {
    let mut bare = rc.clone();
    bare.labels_mut().remove(LABEL_RCSYNC_MANAGED);
    bare.annotations_mut().remove(ANNOTATION_SOURCE_VERSION);
    bare.annotations_mut().remove(ANNOTATION_HOST_NAME);
    content_version(&synced_form(&bare))
}

/// Whether a managed copy differs from the version it was applied from.
pub fn is_tampered(rc: &RuntimeClass) -> bool {
    rc.annotations().get(ANNOTATION_SOURCE_VERSION) != Some(&held_version(rc))
}

fn api_error(e: kube::Error) -> String {
    match e {
        kube::Error::Api(status) => status.message,
        other => other.to_string(),
    }
}

/// Applies responses to the virtual cluster.
pub struct Applier {
    api: Api<RuntimeClass>,
    metrics: Metrics,
}

impl Applier {
    /// An applier writing through `api`.
    pub fn new(api: Api<RuntimeClass>, metrics: Metrics) -> Self {
        Self { api, metrics }
    }

    /// The managed copies the virtual cluster holds: name → source version.
    pub async fn held(&self) -> Result<HashMap<String, String>, kube::Error> {
        let list = self
            .api
            .list(&ListParams::default().labels(&format!("{LABEL_RCSYNC_MANAGED}={MANAGED_VALUE}")))
            .await?;
        Ok(list
            .items
            .iter()
            .map(|rc| (rc.name_any(), held_version(rc)))
            .collect())
    }

    /// Creates or updates one class. A changed handler (immutable) or a same-named class the
    /// tenant made is replaced by delete + create: a name taken by the host wins.
    pub async fn upsert(&self, resource: &Resource) -> Result<(), String> {
        let desired = desired_object(resource)?;
        let name = resource.name.clone();
        let result = match self.api.get_opt(&name).await.map_err(api_error)? {
            None => self
                .api
                .create(&PostParams::default(), &desired)
                .await
                .map(|_| "created"),
            Some(existing) if !is_managed(&existing) || existing.handler != desired.handler => {
                let why = if is_managed(&existing) {
                    "its handler changed"
                } else {
                    "the host offers this name"
                };
                tracing::info!(runtime_class = %name, why, "replacing RuntimeClass");
                let params = DeleteParams {
                    preconditions: Some(Preconditions {
                        uid: existing.metadata.uid.clone(),
                        resource_version: None,
                    }),
                    ..Default::default()
                };
                match self.api.delete(&name, &params).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(api_error(e)),
                }
                self.api
                    .create(&PostParams::default(), &desired)
                    .await
                    .map(|_| "recreated")
            }
            Some(existing) if synced_form(&existing) == synced_form(&desired) => Ok("unchanged"),
            Some(existing) => {
                let mut replacement = desired.clone();
                replacement.metadata.resource_version = existing.metadata.resource_version.clone();
                self.api
                    .replace(&name, &PostParams::default(), &replacement)
                    .await
                    .map(|_| "updated")
            }
        };
        match result {
            Ok(outcome) => {
                self.metrics.applied(outcome);
                tracing::debug!(runtime_class = %name, outcome, version = %resource.version, "applied");
                Ok(())
            }
            Err(e) => {
                self.metrics.applied("failed");
                Err(api_error(e))
            }
        }
    }

    /// Deletes a managed copy (a class the tenant made is never touched here).
    pub async fn remove(&self, name: &str) -> Result<(), String> {
        match self.api.get_opt(name).await.map_err(api_error)? {
            Some(existing) if is_managed(&existing) => {
                let params = DeleteParams {
                    preconditions: Some(Preconditions {
                        uid: existing.metadata.uid.clone(),
                        resource_version: None,
                    }),
                    ..Default::default()
                };
                match self.api.delete(name, &params).await {
                    Ok(_) => {
                        self.metrics.applied("deleted");
                        tracing::info!(runtime_class = %name, "removed RuntimeClass no longer offered by the host");
                        Ok(())
                    }
                    Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
                    Err(e) => {
                        self.metrics.applied("failed");
                        Err(api_error(e))
                    }
                }
            }
            _ => Ok(()),
        }
    }

    /// Applies a whole response; returns the per-resource errors.
    pub async fn apply(&self, response: &SyncResponse) -> BTreeMap<String, String> {
        let mut errors = BTreeMap::new();
        for resource in &response.resources {
            if let Err(e) = self.upsert(resource).await {
                tracing::warn!(runtime_class = %resource.name, error = %e, "could not apply RuntimeClass");
                errors.insert(resource.name.clone(), e);
            }
        }
        for name in &response.removed_resources {
            if let Err(e) = self.remove(name).await {
                tracing::warn!(runtime_class = %name, error = %e, "could not remove RuntimeClass");
                errors.insert(name.clone(), e);
            }
        }
        errors
    }
}

/// Keeps a Sync stream to the host agent open, reconnecting with jittered exponential backoff.
/// `resync` reopens the stream at once, so the host agent diffs against what the virtual cluster
/// really holds (after someone deleted or edited a managed copy).
pub async fn run_sync(
    target: HostAgentTarget,
    applier: Applier,
    state: watch::Sender<SyncState>,
    readiness: Readiness,
    metrics: Metrics,
    resync: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(250), crate::connect::RECONNECT_MAX);
    loop {
        let session = session(&target, &applier, &state, &readiness, &metrics, &mut backoff);
        tokio::select! {
            result = session => match result {
                Ok(()) => tracing::info!("the host agent ended the Sync stream"),
                Err(e) => tracing::warn!(error = format!("{e:#}"), "Sync stream to the host agent failed"),
            },
            _ = resync.notified() => {
                tracing::info!("a managed RuntimeClass was changed or deleted in the virtual cluster: resyncing");
                continue;
            }
            _ = shutdown.changed() => return,
        }
        metrics.host_connected.set(0);
        state.send_if_modified(|s| std::mem::replace(&mut s.connected, false));
        let delay = backoff.next_delay();
        tracing::info!(retry_in = ?delay, "reconnecting to the host agent; applied RuntimeClasses are kept meanwhile");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn session(
    target: &HostAgentTarget,
    applier: &Applier,
    state: &watch::Sender<SyncState>,
    readiness: &Readiness,
    metrics: &Metrics,
    backoff: &mut Backoff,
) -> anyhow::Result<()> {
    let (mut client, _) = target.connect().await?;
    let mut held = applier
        .held()
        .await
        .map_err(|e| anyhow::anyhow!("listing managed RuntimeClasses: {e}"))?;
    let (tx, rx) = mpsc::channel(4);
    tx.send(SyncRequest {
        initial_resource_versions: held.clone(),
        ..Default::default()
    })
    .await?;
    let mut responses = client.sync(ReceiverStream::new(rx)).await?.into_inner();
    tracing::info!(declared = held.len(), "Sync stream open");
    while let Some(response) = responses.message().await? {
        metrics.host_connected.set(1);
        backoff.reset();
        let errors = applier.apply(&response).await;
        for r in &response.resources {
            if !errors.contains_key(&r.name) {
                held.insert(r.name.clone(), r.version.clone());
            }
        }
        for name in &response.removed_resources {
            if !errors.contains_key(name) {
                held.remove(name);
            }
        }
        let reply = if errors.is_empty() {
            SyncRequest {
                response_nonce: response.nonce.clone(),
                ..Default::default()
            }
        } else {
            let message = errors
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join("; ");
            SyncRequest {
                response_nonce: response.nonce.clone(),
                error_detail: Some(ErrorDetail {
                    message,
                    resource_errors: errors.into_iter().collect(),
                }),
                ..Default::default()
            }
        };
        tx.send(reply).await?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        metrics.last_sync_timestamp_seconds.set(now.as_secs_f64());
        metrics.synced_classes.set(held.len() as i64);
        if let Some(sent) = response
            .sent_at
            .and_then(|t| std::time::SystemTime::try_from(t).ok())
        {
            // Host send → applied here; a negative value (clock skew) counts as zero.
            let took = std::time::SystemTime::now()
                .duration_since(sent)
                .unwrap_or_default();
            metrics.propagation_seconds.observe(took.as_secs_f64());
        }
        let initial = response.initial_state_complete;
        state.send_if_modified(|s| {
            let next = SyncState {
                connected: true,
                enabled: Some(response.sync_enabled),
                initial_applied: s.initial_applied || initial,
                synced: held.keys().cloned().collect(),
                pod_policy: response.pod_policy_version.clone(),
            };
            std::mem::replace(s, next.clone()) != next
        });
        if initial {
            readiness.set(INITIAL_STATE_APPLIED, true);
        }
    }
    Ok(())
}

/// Deletes RuntimeClasses created directly in the virtual cluster while sync is enabled, and asks
/// for a resync when a managed copy is edited or deleted by someone else.
pub async fn run_enforcer(
    api: Api<RuntimeClass>,
    mut state: watch::Receiver<SyncState>,
    readiness: Readiness,
    metrics: Metrics,
    resync: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut events = metrics
        .watches
        .follow(
            "runtimeclasses".into(),
            watcher::watcher(api.clone(), watcher::Config::default()).retry_with_backoff(),
        )
        .boxed();
    let mut classes: BTreeMap<String, RuntimeClass> = BTreeMap::new();
    let mut relist: Option<BTreeMap<String, RuntimeClass>> = None;
    loop {
        let mut sweep = Vec::new();
        tokio::select! {
            _ = shutdown.changed() => return,
            changed = state.changed() => {
                if changed.is_err() {
                    return;
                }
                sweep.extend(classes.values().cloned());
            }
            event = events.next() => match event {
                None => return,
                Some(Err(e)) => tracing::warn!(error = %e, "watching virtual RuntimeClasses failed; retrying with backoff"),
                Some(Ok(Event::Init)) => relist = Some(BTreeMap::new()),
                Some(Ok(Event::InitApply(rc))) => {
                    if let Some(r) = &mut relist {
                        r.insert(rc.name_any(), rc);
                    }
                }
                Some(Ok(Event::InitDone)) => {
                    classes = relist.take().unwrap_or_default();
                    readiness.set(CLASSES_LISTED, true);
                    sweep.extend(classes.values().cloned());
                }
                Some(Ok(Event::Apply(rc))) => {
                    if is_managed(&rc) && is_tampered(&rc) {
                        tracing::warn!(runtime_class = %rc.name_any(), "a managed RuntimeClass was edited in the virtual cluster: restoring it");
                        resync.notify_one();
                    }
                    classes.insert(rc.name_any(), rc.clone());
                    sweep.push(rc);
                }
                Some(Ok(Event::Delete(rc))) => {
                    classes.remove(&rc.name_any());
                    if is_managed(&rc) && state.borrow().synced.contains(&rc.name_any()) {
                        resync.notify_one();
                    }
                }
            },
        }
        if state.borrow().enabled != Some(true) {
            continue;
        }
        for rc in sweep
            .into_iter()
            .filter(|rc| !is_managed(rc) && rc.metadata.deletion_timestamp.is_none())
        {
            let name = rc.name_any();
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: rc.metadata.uid.clone(),
                    resource_version: None,
                }),
                ..Default::default()
            };
            match api.delete(&name, &params).await {
                Ok(_) => {
                    metrics.local_classes_deleted_total.inc();
                    tracing::warn!(
                        runtime_class = %name,
                        "deleted RuntimeClass created in the virtual cluster: with sync.fromHost.runtimeClasses enabled, only RuntimeClasses from the host may exist"
                    );
                }
                // Gone already, or replaced by the host's copy: nothing to do.
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
                Err(e) => {
                    tracing::warn!(runtime_class = %name, error = %e, "could not delete a RuntimeClass created in the virtual cluster")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcsync_proto::convert::to_proto;
    use rcsync_proto::v1::RuntimeClass as ProtoClass;

    /// The version the virtual side computes from an untouched copy equals the host's version, so
    /// a restarted agent declares exactly what it holds; an edited copy declares something else.
    #[test]
    fn held_versions_match_host_versions_until_edited() {
        for host in [
            serde_json::json!({"metadata": {"name": "gvisor", "uid": "x", "resourceVersion": "9"}, "handler": "runsc"}),
            serde_json::json!({
                "metadata": {"name": "kata", "labels": {"a": "b"}, "annotations": {"c": "d", "kubectl.kubernetes.io/last-applied-configuration": "{}"}},
                "handler": "kata",
                "overhead": {"podFixed": {"cpu": "250m"}},
                "scheduling": {"nodeSelector": {"x": "y"}, "tolerations": [{"key": "k", "operator": "Exists"}]}
            }),
        ] {
            let host: RuntimeClass = serde_json::from_value(host).unwrap();
            let synced = synced_form(&host);
            let resource = Resource {
                name: host.name_any(),
                version: content_version(&synced),
                host_name: host.name_any(),
                runtime_class: Some(to_proto(&synced)),
            };
            let copy = desired_object(&resource).unwrap();
            assert_eq!(held_version(&copy), resource.version, "{}", host.name_any());
            assert!(!is_tampered(&copy));
            let mut edited = copy.clone();
            edited.labels_mut().insert("sneaky".into(), "yes".into());
            assert!(is_tampered(&edited));
        }
    }

    #[test]
    fn desired_objects_are_marked_as_managed_copies() {
        let resource = Resource {
            name: "gvisor".into(),
            version: "0123456789abcdef".into(),
            host_name: "gvisor".into(),
            runtime_class: Some(ProtoClass {
                name: "gvisor".into(),
                handler: "runsc".into(),
                ..Default::default()
            }),
        };
        let rc = desired_object(&resource).unwrap();
        assert!(is_managed(&rc));
        assert_eq!(rc.annotations()[ANNOTATION_SOURCE_VERSION], "0123456789abcdef");
        assert_eq!(rc.handler, "runsc");
        let mut bad = resource.clone();
        bad.runtime_class.as_mut().unwrap().name = "other".into();
        assert!(desired_object(&bad).is_err());
    }
}
