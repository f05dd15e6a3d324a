//! `WatchPodStatus`'s feed: a tenant's host Pods as the virtual side needs them, namely which
//! virtual Pod each was made for and its status.
//!
//! ```text
//!  watch host Pods labelled managed-by=<tenant> ──decoded as metadata + status (the spec is skipped)──►
//!     ├─ new Pod, new uid, a status other than the last one sent, or terminating ──► Updated
//!     ├─ deleted, or missing from a relist ──────────────────────────► Deleted
//!     └─ relist complete ────────────────────────────────────────────► InitialStateComplete
//!  then, when asked for: watch host events about Pods ──► HostEvent (see `pod_events`)
//! ```
//!
//! Per host Pod the stream keeps what a later `Deleted` needs (the virtual identity) and a digest of
//! the status it last sent, not the Pod: metadata-only changes of host Pods (labels, the scheduling
//! gate rcsync lifts, controllers' annotations) cost a digest, not a message.

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash as _, Hasher as _};
use std::pin::Pin;

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::{Event as CoreEvent, Pod, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::runtime::watcher::{self, Event};
use rcsync_proto::v1::{PodStatusEvent, PodStatusEventType};
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tonic::Status;

use crate::grpc::pod_events::{PodEvents, ReportedPod};
use crate::translate::{VirtualPodRef, recorded_ref};

/// A host Pod as the status feed reads it: metadata and status. Decoding skips the spec, the
/// largest part of a Pod, which the feed never reads.
#[derive(Clone, Debug, Deserialize)]
pub struct HostPodStatus {
    /// The Pod's metadata (the virtual identity is in its annotations).
    pub metadata: ObjectMeta,
    /// The Pod's status.
    #[serde(default)]
    pub status: Option<PodStatus>,
}

impl Resource for HostPodStatus {
    type DynamicType = ();
    type Scope = <Pod as Resource>::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        Pod::kind(dt)
    }

    fn group(dt: &()) -> Cow<'_, str> {
        Pod::group(dt)
    }

    fn version(dt: &()) -> Cow<'_, str> {
        Pod::version(dt)
    }

    fn plural(dt: &()) -> Cow<'_, str> {
        Pod::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// What the feed remembers of a host Pod it reported.
struct Reported {
    /// The event that reports the Pod gone.
    deleted: PodStatusEvent,
    /// Digest of the uid and status JSON last sent.
    digest: u64,
    /// The host Pod's uid (host events name their Pod by it).
    host_uid: String,
}

impl Reported {
    fn as_reported_pod(&self) -> ReportedPod<'_> {
        ReportedPod {
            host_uid: &self.host_uid,
            virtual_pod: (
                &self.deleted.pod_namespace,
                &self.deleted.pod_name,
                &self.deleted.pod_uid,
            ),
        }
    }
}

/// The `Updated` event for a host Pod and what to remember of it; `None` for a Pod without a
/// recorded virtual identity (not one rcsync wrote).
fn updated(pod: &HostPodStatus) -> Option<(PodStatusEvent, Reported)> {
    let id = recorded_ref(&pod.metadata)?;
    let status_json = serde_json::to_vec(&pod.status).unwrap_or_default();
    let terminating = pod
        .metadata
        .deletion_timestamp
        .as_ref()
        .map(|_| pod.metadata.deletion_grace_period_seconds.unwrap_or(0));
    let mut hasher = DefaultHasher::new();
    id.uid.hash(&mut hasher);
    status_json.hash(&mut hasher);
    terminating.hash(&mut hasher);
    let deleted = deleted(id);
    let event = PodStatusEvent {
        r#type: PodStatusEventType::Updated as i32,
        status_json,
        deletion_grace_period_seconds: terminating,
        ..deleted.clone()
    };
    let reported = Reported {
        deleted,
        digest: hasher.finish(),
        host_uid: pod.metadata.uid.clone().unwrap_or_default(),
    };
    Some((event, reported))
}

/// The event that reports the host Pod made for virtual Pod `id` gone.
fn deleted(id: VirtualPodRef) -> PodStatusEvent {
    PodStatusEvent {
        r#type: PodStatusEventType::Deleted as i32,
        pod_namespace: id.namespace,
        pod_name: id.name,
        pod_uid: id.uid,
        status_json: Vec::new(),
        host_event: None,
        deletion_grace_period_seconds: None,
    }
}

/// The events for one watch event, updating what was reported: `known` holds the Pods the client
/// knows about; `relisted` the Pods seen since a relist began (to report those it no longer has).
fn events_for(
    event: Event<HostPodStatus>,
    known: &mut HashMap<String, Reported>,
    relisted: &mut Option<HashMap<String, Reported>>,
) -> Vec<PodStatusEvent> {
    let mut out = Vec::new();
    match event {
        Event::Init => *relisted = Some(HashMap::new()),
        Event::InitApply(pod) => {
            let name = pod.metadata.name.clone().unwrap_or_default();
            if let Some((event, reported)) = updated(&pod) {
                if known.get(&name).is_none_or(|k| k.digest != reported.digest) {
                    out.push(event);
                }
                if let Some(r) = relisted {
                    r.insert(name, reported);
                }
            }
        }
        Event::InitDone => {
            let fresh = relisted.take().unwrap_or_default();
            for (name, reported) in known.drain() {
                if !fresh.contains_key(&name) {
                    out.push(reported.deleted);
                }
            }
            *known = fresh;
            out.push(PodStatusEvent {
                r#type: PodStatusEventType::InitialStateComplete as i32,
                ..Default::default()
            });
        }
        Event::Apply(pod) => {
            let name = pod.metadata.name.clone().unwrap_or_default();
            match updated(&pod) {
                Some((event, reported)) => {
                    if known.get(&name).is_none_or(|k| k.digest != reported.digest) {
                        out.push(event);
                    }
                    known.insert(name, reported);
                }
                None => {
                    known.remove(&name);
                }
            }
        }
        Event::Delete(pod) => {
            let name = pod.metadata.name.clone().unwrap_or_default();
            known.remove(&name);
            out.extend(recorded_ref(&pod.metadata).map(deleted));
        }
    }
    out
}

/// A watch of host Pods (metadata and status).
pub type PodWatch = Pin<Box<dyn Stream<Item = Result<Event<HostPodStatus>, watcher::Error>> + Send>>;

/// A watch of the host events about Pods in the tenant's host namespace.
pub type EventWatch = Pin<Box<dyn Stream<Item = Result<Event<CoreEvent>, watcher::Error>> + Send>>;

/// Feeds `tx` from the watch of host Pods `pods` and, when asked for, the watch of host events
/// `host_events` (read once the Pods' initial state was sent, so events find their Pods), until
/// the client goes, a watch ends, `shutdown`, or `ended` says why the stream may not go on (its
/// tenant removed from the config, or moved to another host namespace): then that status ends it.
pub async fn stream_status(
    mut pods: PodWatch,
    host_events: Option<(EventWatch, PodEvents)>,
    tx: mpsc::Sender<Result<PodStatusEvent, Status>>,
    mut shutdown: watch::Receiver<bool>,
    ended: impl std::future::Future<Output = Status>,
) {
    let mut known: HashMap<String, Reported> = HashMap::new();
    let mut relisted: Option<HashMap<String, Reported>> = None;
    let mut pods_listed = false;
    let (mut event_watch, mut feed) =
        host_events.map_or((None, None), |(watch, feed)| (Some(watch), Some(feed)));
    let mut ended = std::pin::pin!(ended);
    loop {
        let out = tokio::select! {
            _ = shutdown.changed() => return,
            _ = tx.closed() => return,
            status = &mut ended => {
                let _ = tx.send(Err(status)).await;
                return;
            }
            event = pods.next() => match event {
                None => return,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "watching host pods failed; retrying with backoff");
                    continue;
                }
                Some(Ok(event)) => {
                    let mut out = events_for(event, &mut known, &mut relisted);
                    pods_listed |= out.iter().any(|e| e.r#type() == PodStatusEventType::InitialStateComplete);
                    if let Some(feed) = &mut feed && !out.is_empty() {
                        out.extend(feed.on_pods_reported(|name| known.get(name).map(Reported::as_reported_pod)));
                    }
                    out
                }
            },
            event = next_or_never(&mut event_watch), if pods_listed => match (event, &mut feed) {
                (None, _) => return,
                (Some(Err(e)), _) => {
                    tracing::warn!(error = %e, "watching host events failed; retrying with backoff");
                    continue;
                }
                (Some(Ok(event)), Some(feed)) => {
                    feed.on_watch_event(event, |name| known.get(name).map(Reported::as_reported_pod))
                }
                (Some(Ok(_)), None) => Vec::new(),
            },
        };
        for event in out {
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
        }
    }
}

/// The next item of `watch`; never resolves without one.
async fn next_or_never<S: Stream + Unpin>(watch: &mut Option<S>) -> Option<S::Item> {
    match watch {
        Some(watch) => watch.next().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn host_pod(name: &str, uid: &str, phase: &str) -> HostPodStatus {
        serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "vc-team-a", "annotations": {
                "vcluster.loft.sh/object-namespace": "default",
                "vcluster.loft.sh/object-name": name,
                "vcluster.loft.sh/object-uid": uid,
            }},
            "spec": {"containers": [{"name": "app", "image": "registry.example/app:1.0"}]},
            "status": {"phase": phase},
        }))
        .unwrap()
    }

    fn kinds(events: &[PodStatusEvent]) -> Vec<(PodStatusEventType, String)> {
        events.iter().map(|e| (e.r#type(), e.pod_name.clone())).collect()
    }

    #[test]
    fn a_host_pod_decodes_without_its_spec_and_reports_its_status() {
        let mut known = HashMap::new();
        let mut relisted = None;
        let out = events_for(
            Event::Apply(host_pod("web", "u1", "Running")),
            &mut known,
            &mut relisted,
        );
        assert_eq!(kinds(&out), [(PodStatusEventType::Updated, "web".to_string())]);
        let status: serde_json::Value = serde_json::from_slice(&out[0].status_json).unwrap();
        assert_eq!(status, json!({"phase": "Running"}));
        assert_eq!(out[0].pod_uid, "u1");
    }

    #[test]
    fn an_unchanged_status_is_not_sent_again_but_a_new_status_or_uid_is() {
        let mut known = HashMap::new();
        let mut relisted = None;
        let mut feed = |pod| events_for(Event::Apply(pod), &mut known, &mut relisted);
        assert_eq!(feed(host_pod("web", "u1", "Pending")).len(), 1);
        let mut relabelled = host_pod("web", "u1", "Pending");
        relabelled.metadata.labels = Some([("tier".to_string(), "a".to_string())].into());
        assert!(
            feed(relabelled).is_empty(),
            "a metadata-only change sends nothing"
        );
        assert_eq!(feed(host_pod("web", "u1", "Running")).len(), 1);
        assert_eq!(
            feed(host_pod("web", "u2", "Running")).len(),
            1,
            "a new Pod under the name is reported even with the same status"
        );
    }

    #[test]
    fn a_host_pod_that_starts_terminating_is_reported_with_its_grace_period_once() {
        let mut known = HashMap::new();
        let mut relisted = None;
        let mut feed = |pod| events_for(Event::Apply(pod), &mut known, &mut relisted);
        let running = feed(host_pod("web", "u1", "Running"));
        assert_eq!(running[0].deletion_grace_period_seconds, None);
        let mut evicted = host_pod("web", "u1", "Running");
        evicted.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ));
        evicted.metadata.deletion_grace_period_seconds = Some(30);
        let out = feed(evicted.clone());
        assert_eq!(
            kinds(&out),
            [(PodStatusEventType::Updated, "web".to_string())],
            "the same status, terminating now"
        );
        assert_eq!(out[0].deletion_grace_period_seconds, Some(30));
        assert!(feed(evicted).is_empty(), "said once");
    }

    #[test]
    fn a_relist_reports_pods_gone_meanwhile_and_only_changed_statuses() {
        let mut known = HashMap::new();
        let mut relisted = None;
        for pod in [host_pod("a", "ua", "Running"), host_pod("b", "ub", "Running")] {
            events_for(Event::Apply(pod), &mut known, &mut relisted);
        }
        let mut out = events_for(Event::Init, &mut known, &mut relisted);
        out.extend(events_for(
            Event::InitApply(host_pod("a", "ua", "Running")),
            &mut known,
            &mut relisted,
        ));
        out.extend(events_for(
            Event::InitApply(host_pod("c", "uc", "Pending")),
            &mut known,
            &mut relisted,
        ));
        out.extend(events_for(Event::InitDone, &mut known, &mut relisted));
        assert_eq!(
            kinds(&out),
            [
                (PodStatusEventType::Updated, "c".to_string()),
                (PodStatusEventType::Deleted, "b".to_string()),
                (PodStatusEventType::InitialStateComplete, String::new()),
            ]
        );
        assert_eq!(out[1].pod_uid, "ub");
        let gone = events_for(
            Event::Delete(host_pod("a", "ua", "Running")),
            &mut known,
            &mut relisted,
        );
        assert_eq!(kinds(&gone), [(PodStatusEventType::Deleted, "a".to_string())]);
        assert!(!known.contains_key("a"));
    }

    #[test]
    fn a_pod_rcsync_did_not_write_is_not_reported() {
        let mut known = HashMap::new();
        let mut relisted = None;
        let mut pod = host_pod("x", "ux", "Running");
        pod.metadata.annotations = None;
        assert!(events_for(Event::Apply(pod.clone()), &mut known, &mut relisted).is_empty());
        assert!(events_for(Event::Delete(pod), &mut known, &mut relisted).is_empty());
    }
}
