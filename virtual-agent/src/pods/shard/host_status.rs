//! What the host says about a shard's Pods (the `WatchPodStatus` feed): each host
//! status copied onto its virtual Pod, host events queued for the writer (`crate::host_events`),
//! and a host Pod that terminates or goes taking its virtual Pod with it.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt as _};
use rcsync_proto::v1::{PodStatusEvent, PodStatusEventType};

use super::{EARLY_HOST_EVENTS_MAX, Shard};
use crate::host_events::HostEventCopy;
use crate::pods::{Key, Record, State};

impl Shard {
    pub(super) async fn on_status(&mut self, event: PodStatusEvent) {
        let key = (event.pod_namespace.clone(), event.pod_name.clone());
        match PodStatusEventType::try_from(event.r#type).unwrap_or(PodStatusEventType::Unspecified) {
            PodStatusEventType::Updated => {
                self.host.insert(key.clone(), event.pod_uid.clone());
                if let Some(staging) = &mut self.host_staging {
                    staging.insert(key.clone(), event.pod_uid.clone());
                }
                let terminating = event.deletion_grace_period_seconds.is_some();
                let uid = event.pod_uid.clone();
                if self.copy_status(&key, &event).await {
                    self.unsent_status.remove(&key);
                } else {
                    // Nothing is lost: the Pod is retried with backoff, and the retry writes the
                    // latest status the host sent.
                    self.unsent_status.insert(key.clone(), event);
                    self.retry_later(key.clone());
                }
                if terminating {
                    self.on_host_gone(&key, &uid, HostLoss::Terminating).await;
                }
            }
            PodStatusEventType::Deleted => {
                self.unsent_status.remove(&key);
                self.host.remove(&key);
                self.on_host_gone(&key, &event.pod_uid, HostLoss::Gone).await;
            }
            PodStatusEventType::InitialStateComplete => {
                // The host agent just listed the host Pods: the host API server answers.
                self.connection.host_path().reached();
                if let Some(staging) = self.host_staging.take() {
                    let vanished: Vec<(Key, String)> = self
                        .host
                        .iter()
                        .filter(|(k, _)| !staging.contains_key(*k))
                        .map(|(k, u)| (k.clone(), u.clone()))
                        .collect();
                    self.host = staging;
                    for (key, uid) in vanished {
                        self.on_host_gone(&key, &uid, HostLoss::Gone).await;
                    }
                }
                if !self.host_listed {
                    self.host_listed = true;
                    tracing::info!(host_pods = self.host.len(), "listed host Pods");
                }
                self.collect_garbage();
            }
            PodStatusEventType::HostEvent => self.copy_host_event(key, event),
            PodStatusEventType::CopyLost => self.on_copy_lost(key, &event),
            PodStatusEventType::Unspecified => {}
        }
    }

    /// Queues a host event for the virtual Pod it is about, if that Pod (that uid) is here; before
    /// the virtual Pods are listed, keeps it to look at then.
    pub(super) fn copy_host_event(&mut self, key: Key, event: PodStatusEvent) {
        if !self.pods_listed {
            if self.early_host_events.len() < EARLY_HOST_EVENTS_MAX {
                self.early_host_events.push(event);
            } else {
                self.metrics.host_events_failed_total.inc();
            }
            return;
        }
        let (Some(queue), Some(host_event)) = (&self.host_events, event.host_event) else {
            return;
        };
        if self.pods.get(&key).and_then(|pod| pod.uid()).as_deref() != Some(event.pod_uid.as_str()) {
            return;
        }
        queue.send(HostEventCopy {
            kind: "Pod",
            namespace: key.0,
            name: key.1,
            uid: event.pod_uid,
            event: host_event,
        });
    }

    /// A copy of a ConfigMap or Secret written for a synced Pod was deleted on the host (by hand,
    /// by a cleanup job): the Pod is applied again, which writes the copy anew, so its containers
    /// keep finding it when they restart.
    pub(super) fn on_copy_lost(&mut self, key: Key, event: &PodStatusEvent) {
        let synced = self
            .records
            .get(&key)
            .is_some_and(|r| r.uid == event.pod_uid && matches!(r.state, State::Synced(_)));
        if !synced {
            return;
        }
        tracing::info!(
            namespace = %key.0, pod = %key.1, copy = %event.lost_copy,
            "the host copy of an object the Pod references was deleted; applying the Pod again"
        );
        self.copies_lost.insert(key.clone());
        self.enqueue(key);
    }

    /// Writes a host status into the virtual Pod it was made for; false when that write failed
    /// (true when there was nothing to write).
    pub(super) async fn copy_status(&mut self, key: &Key, event: &PodStatusEvent) -> bool {
        let Some(pod) = self.pods.get(key).cloned() else {
            return true;
        };
        if pod.uid().as_deref() != Some(event.pod_uid.as_str()) || pod.metadata.deletion_timestamp.is_some() {
            return true;
        }
        if self.records.get(key).is_some_and(|r| r.state == State::Orphaned) {
            return true;
        }
        let Ok(mut status) = serde_json::from_slice::<serde_json::Value>(&event.status_json) else {
            tracing::warn!(namespace = %key.0, pod = %key.1, "the host agent sent a status that is not JSON");
            return true;
        };
        keep_gate_conditions(&pod, &mut status);
        if status.is_null() || serde_json::to_value(&pod.status).ok().as_ref() == Some(&status) {
            return true;
        }
        // A Pod that ended no longer counts against its namespace's quota (its name stays taken).
        let ended = |phase: Option<&str>| matches!(phase, Some("Succeeded" | "Failed"));
        if ended(status.get("phase").and_then(serde_json::Value::as_str))
            && !ended(pod.status.as_ref().and_then(|s| s.phase.as_deref()))
            && let Some(room_made) = &self.room_made
        {
            let _ = room_made.send(());
        }
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &key.0);
        let patch = serde_json::json!({"status": status});
        match api
            .patch_status(&key.1, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                self.metrics.statuses_copied_total.inc();
                true
            }
            Err(e) => {
                tracing::warn!(namespace = %key.0, pod = %key.1, error = %e, "copying the host status failed; retrying");
                self.failed(format!("copying the host pod's status failed: {e}"));
                false
            }
        }
    }

    /// A synced Pod's host Pod terminates or is gone (evicted by a drain, preempted, deleted on
    /// the host): the virtual Pod is deleted too, as vCluster does, so its controller replaces it
    /// (at once, not after the host Pod's grace period). Orphans stay, as the spec wants, and one
    /// whose host Pod is gone is looked at again. A virtual Pod already deleting is finished once
    /// its host Pod is gone.
    pub(super) async fn on_host_gone(&mut self, key: &Key, uid: &str, loss: HostLoss) {
        let Some(pod) = self.pods.get(key).cloned() else {
            return;
        };
        if pod.uid().as_deref() != Some(uid) {
            return;
        }
        if pod.metadata.deletion_timestamp.is_some() {
            if loss == HostLoss::Gone {
                self.delete_virtual(key, &pod, VirtualDelete::Finish).await;
            }
            return;
        }
        // An orphan stays in both clusters while both copies are there (the spec); once the host
        // deleted its copy, it runs nowhere: a Pod that may not sync, looked at again as any
        // other, so its SyncWarning says why.
        if loss == HostLoss::Gone && self.records.get(key).is_some_and(|r| r.state == State::Orphaned) {
            self.records.remove(key);
            self.enqueue(key.clone());
            return;
        }
        if !self
            .records
            .get(key)
            .is_some_and(|r| matches!(r.state, State::Synced(_)))
        {
            return;
        }
        let note = match loss {
            HostLoss::Terminating => format!(
                "the host pod of {:?} is being deleted (evicted, preempted or deleted on the host); deleting the virtual pod",
                key.1
            ),
            HostLoss::Gone => format!(
                "the host pod of {:?} was deleted; deleting the virtual pod",
                key.1
            ),
        };
        tracing::warn!(namespace = %key.0, pod = %key.1, "{note}");
        self.publish(&pod, EventType::Warning, "SyncWarning", "Delete", note)
            .await;
        self.records.insert(
            key.clone(),
            Record {
                uid: uid.to_string(),
                state: State::HostGone,
            },
        );
        // The status feed is not a retry of its own: a delete that fails is retried with the
        // Pod's backoff (and reported as failing until it succeeds).
        self.failure = None;
        self.host_refused = false;
        if self.delete_virtual(key, &pod, VirtualDelete::HostGone).await {
            self.failing.remove(key);
        } else {
            if let Some(why) = self.failure.take() {
                self.failing.insert(key.clone(), why);
            }
            self.retry_later(key.clone());
        }
        self.report(key);
    }

    /// Deletes virtual Pod `pod` (its uid as a precondition: a new Pod of the name stays), for
    /// `why`; false when the virtual API server did not take the delete (the Pod is retried).
    pub(super) async fn delete_virtual(&mut self, key: &Key, pod: &Pod, why: VirtualDelete) -> bool {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &key.0);
        let params = DeleteParams {
            grace_period_seconds: (why == VirtualDelete::Finish).then_some(0),
            preconditions: Some(Preconditions {
                uid: pod.uid(),
                resource_version: None,
            }),
            ..Default::default()
        };
        match api.delete(&key.1, &params).await {
            Ok(_) => true,
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => true,
            Err(e) => {
                let attempt = match why {
                    VirtualDelete::HostGone => "deleting the pod, whose host pod was deleted,",
                    VirtualDelete::Finish => "finishing the pod's deletion",
                };
                tracing::warn!(namespace = %key.0, pod = %key.1, error = %e, "{attempt} failed; retrying");
                self.failed(format!("{attempt} failed: {e}"));
                false
            }
        }
    }
}

/// Why a virtual Pod is deleted (see [`Shard::delete_virtual`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum VirtualDelete {
    /// Its host Pod terminates or went (evicted, preempted, deleted on the host).
    HostGone,
    /// It is being deleted and its host Pod is gone: the deletion is completed (no grace left).
    Finish,
}

/// How a synced Pod's host Pod is lost (see [`Shard::on_host_gone`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum HostLoss {
    /// It terminates: it has a deletionTimestamp.
    Terminating,
    /// It is gone from the host.
    Gone,
}

/// Keeps in a host status about to be copied the virtual Pod's own readiness gate conditions: the
/// tenant's controllers own them (the host Pod carries copies), so an older host copy never
/// overwrites a newer virtual value.
pub(in crate::pods) fn keep_gate_conditions(pod: &Pod, status: &mut serde_json::Value) {
    let types = rcsync_core::gates::readiness_types(pod);
    if types.is_empty() || !status.is_object() {
        return;
    }
    let mut conditions: Vec<serde_json::Value> = status["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| !c["type"].as_str().is_some_and(|t| types.contains(&t)))
        .cloned()
        .collect();
    for condition in rcsync_core::gates::readiness_conditions(pod) {
        conditions.push(serde_json::to_value(condition).expect("a condition serializes"));
    }
    status["conditions"] = serde_json::Value::Array(conditions);
}
