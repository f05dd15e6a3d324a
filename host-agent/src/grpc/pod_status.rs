//! `WatchPodStatus`'s feed: a tenant's host Pods as the virtual side needs them, namely which
//! virtual Pod each was made for and its status.
//!
//! ```text
//!  watch host Pods labelled managed-by=<tenant> ──decoded as metadata + status (the spec is skipped)──►
//!     ├─ new Pod, new uid, a status other than the last one sent, or terminating ──► Updated
//!     ├─ deleted, or missing from a relist ──────────────────────────► Deleted
//!     └─ relist complete ────────────────────────────────────────────► InitialStateComplete
//!  then, when asked for: watch host events about Pods ──► HostEvent (see `host_events`)
//! ```
//!
//! Per host Pod the stream keeps what a later `Deleted` needs (the virtual identity) and a digest of
//! the status it last sent, not the Pod: metadata-only changes of host Pods (labels, the scheduling
//! gate rcsync lifts, controllers' annotations) cost a digest, not a message.

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash as _, Hasher as _};

use k8s_openapi::api::core::v1::{Pod, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::runtime::watcher::Event;
use rcsync_proto::v1::{PodStatusEvent, PodStatusEventType};
use serde::Deserialize;

use crate::grpc::host_events::{Addressed, ReportedObject};
use crate::grpc::lost_copies::{ANNOTATION_COPIES, LostCopy, RecordedCopy};
use crate::grpc::status_stream::Reporting;
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
pub struct ReportedPod {
    /// The event that reports the Pod gone.
    deleted: PodStatusEvent,
    /// Digest of the uid and status JSON last sent.
    digest: u64,
    /// The host Pod's uid (host events name their Pod by it).
    host_uid: String,
    /// The copies ApplyPod wrote for it (its `rcsync.io/copies`).
    copies: Vec<RecordedCopy>,
    /// Whether it ended (`Succeeded` or `Failed`): its containers never start again, so a copy
    /// deleted under it (a cleanup of finished Jobs' objects) is left deleted.
    ended: bool,
}

/// The `Updated` event for a host Pod and what to remember of it; `None` for a Pod without a
/// recorded virtual identity (not one rcsync wrote).
fn updated(pod: &HostPodStatus) -> Option<(PodStatusEvent, ReportedPod)> {
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
    let reported = ReportedPod {
        deleted,
        digest: hasher.finish(),
        host_uid: pod.metadata.uid.clone().unwrap_or_default(),
        copies: recorded_copies(&pod.metadata),
        ended: pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|phase| phase == "Succeeded" || phase == "Failed"),
    };
    Some((event, reported))
}

/// The copies a host Pod records; a value someone on the host garbled is logged and read as none.
fn recorded_copies(meta: &ObjectMeta) -> Vec<RecordedCopy> {
    let Some(value) = meta.annotations.as_ref().and_then(|a| a.get(ANNOTATION_COPIES)) else {
        return Vec::new();
    };
    RecordedCopy::parse(value).unwrap_or_else(|error| {
        tracing::warn!(
            pod = meta.name.as_deref().unwrap_or_default(),
            "annotation {ANNOTATION_COPIES} of host pod: {error}; its copies are checked only when deleted"
        );
        Vec::new()
    })
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
        lost_copy: String::new(),
    }
}

/// What `WatchPodStatus` reports: the tenant's host Pods (see the module docs).
pub struct PodReporting;

impl Reporting for PodReporting {
    type Object = HostPodStatus;
    type Reported = ReportedPod;
    type Message = PodStatusEvent;
    const WATCHED: &'static str = "host pods";

    fn events_for(
        event: Event<HostPodStatus>,
        known: &mut HashMap<String, ReportedPod>,
        relisted: &mut Option<HashMap<String, ReportedPod>>,
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

    fn listed(message: &PodStatusEvent) -> bool {
        message.r#type() == PodStatusEventType::InitialStateComplete
    }

    fn copy_lost(reported: &ReportedPod, copy: &LostCopy) -> Option<PodStatusEvent> {
        if reported.ended {
            return None;
        }
        Some(PodStatusEvent {
            r#type: PodStatusEventType::CopyLost as i32,
            lost_copy: copy.describe(),
            ..reported.deleted.clone()
        })
    }

    fn recorded_copies(reported: &ReportedPod) -> &[RecordedCopy] {
        &reported.copies
    }

    fn reported(reported: &ReportedPod) -> ReportedObject<'_> {
        ReportedObject {
            host_uid: &reported.host_uid,
            virtual_object: (
                &reported.deleted.pod_namespace,
                &reported.deleted.pod_name,
                &reported.deleted.pod_uid,
            ),
        }
    }

    fn host_event(addressed: Addressed) -> Option<PodStatusEvent> {
        Some(PodStatusEvent {
            r#type: PodStatusEventType::HostEvent as i32,
            pod_namespace: addressed.namespace,
            pod_name: addressed.name,
            pod_uid: addressed.uid,
            host_event: Some(addressed.event),
            ..Default::default()
        })
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
    fn a_copy_lost_under_a_running_pod_is_reported_and_under_an_ended_one_is_not() {
        let lost = LostCopy {
            kind: rcsync_core::pod_refs::RefKind::ConfigMap,
            virtual_name: "settings".into(),
            owners: vec![("web".into(), String::new())],
        };
        for (phase, reported) in [
            ("Running", true),
            ("Pending", true),
            ("Succeeded", false),
            ("Failed", false),
        ] {
            let (_, pod) = updated(&host_pod("web", "u1", phase)).unwrap();
            let event = PodReporting::copy_lost(&pod, &lost);
            assert_eq!(event.is_some(), reported, "{phase}");
            if let Some(event) = event {
                assert_eq!(event.r#type(), PodStatusEventType::CopyLost);
                assert_eq!(
                    (event.pod_name.as_str(), event.lost_copy.as_str()),
                    ("web", "configmap settings")
                );
            }
        }
    }

    #[test]
    fn a_host_pod_decodes_without_its_spec_and_reports_its_status() {
        let mut known = HashMap::new();
        let mut relisted = None;
        let out = PodReporting::events_for(
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
        let mut feed = |pod| PodReporting::events_for(Event::Apply(pod), &mut known, &mut relisted);
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
        let mut feed = |pod| PodReporting::events_for(Event::Apply(pod), &mut known, &mut relisted);
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
            PodReporting::events_for(Event::Apply(pod), &mut known, &mut relisted);
        }
        let mut out = PodReporting::events_for(Event::Init, &mut known, &mut relisted);
        out.extend(PodReporting::events_for(
            Event::InitApply(host_pod("a", "ua", "Running")),
            &mut known,
            &mut relisted,
        ));
        out.extend(PodReporting::events_for(
            Event::InitApply(host_pod("c", "uc", "Pending")),
            &mut known,
            &mut relisted,
        ));
        out.extend(PodReporting::events_for(
            Event::InitDone,
            &mut known,
            &mut relisted,
        ));
        assert_eq!(
            kinds(&out),
            [
                (PodStatusEventType::Updated, "c".to_string()),
                (PodStatusEventType::Deleted, "b".to_string()),
                (PodStatusEventType::InitialStateComplete, String::new()),
            ]
        );
        assert_eq!(out[1].pod_uid, "ub");
        let gone = PodReporting::events_for(
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
        assert!(PodReporting::events_for(Event::Apply(pod.clone()), &mut known, &mut relisted).is_empty());
        assert!(PodReporting::events_for(Event::Delete(pod), &mut known, &mut relisted).is_empty());
    }
}
