//! The host Pod as ApplyPod reads it back: the API server's answer to a create decoded only as
//! far as ApplyPod needs it (its name, uid, scheduling gates and conditions), and what follows
//! from it (the owner reference of its copies, the readiness conditions it lacks).

use k8s_openapi::api::core::v1::{Pod, PodCondition, PodSchedulingGate};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::PostParams;
use kube::{Api, Client, ResourceExt as _};
use rcsync_core::gates;
use serde::Deserialize;
use serde_json::json;
use tonic::Status;

use super::COPIES_GATE;

/// What ApplyPod uses of the host Pod it wrote: the API server's answer to a create is decoded only
/// this far (a Pod's spec is most of its bytes, and all of it is what was just sent).
#[derive(Debug, Default, Deserialize)]
pub(super) struct PlacedPod {
    #[serde(default)]
    pub(super) metadata: PlacedMeta,
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
pub(super) struct PlacedMeta {
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
    pub(super) fn of(pod: &Pod) -> Self {
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
    pub(super) fn readiness_patch(&self, virtual_pod: &Pod) -> Option<serde_json::Value> {
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
pub(super) async fn create_pod(client: &Client, api: &Api<Pod>, pod: &Pod) -> kube::Result<PlacedPod> {
    let body = serde_json::to_vec(pod).map_err(kube::Error::SerdeError)?;
    let mut request = kube::core::Request::new(api.resource_url())
        .create(&PostParams::default(), body)
        .map_err(kube::Error::BuildRequest)?;
    request.extensions_mut().insert("create");
    client.request::<PlacedPod>(request).await
}

pub(super) fn owner_reference(pod: &PlacedPod) -> Result<OwnerReference, Status> {
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

pub(super) fn has_copies_gate(pod: &PlacedPod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.scheduling_gates.as_ref())
        .is_some_and(|g| g.iter().any(|g| g.name == COPIES_GATE))
}

#[cfg(test)]
mod tests {
    use super::*;

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
