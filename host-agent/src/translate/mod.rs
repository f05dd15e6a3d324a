//! Virtual Pod → host Pod, with vCluster's naming and metadata, and the host's rules for what a
//! tenant's Pod may carry. The host agent is the policy point for the whole Pod it writes.
//!
//! | virtual                               | host                                                     |
//! |---------------------------------------|----------------------------------------------------------|
//! | name, namespace                       | `<name>-x-<namespace>-x-<tenant>` in the tenant's hostNamespace |
//! | labels                                | not copied under their keys (they could match host selectors); kept as JSON in `vcluster.loft.sh/labels` and under hashed keys `rcsync.io/label-<hash of key>` |
//! | pod (anti-)affinity terms, topologySpreadConstraints | label selectors rewritten to the hashed keys and scoped to the tenant's Pods of the namespaces they select in the virtual cluster (`vcluster.loft.sh/namespace`); the host term's own namespace scope is the tenant's host namespace |
//! | annotations                           | only those the tenant's `sync.toHost.pods.copyAnnotations` names (listed in `rcsync.io/copied-annotations`); never rcsync's or vCluster's own |
//! | —                                     | labels `vcluster.loft.sh/managed-by`, `vcluster.loft.sh/namespace` |
//! | —                                     | annotations `vcluster.loft.sh/object-{name,namespace,uid}` |
//! | spec.runtimeClassName                 | the host class's name (after reverse patches)            |
//! | ConfigMap / Secret references         | the translated copies (`<name>-x-<namespace>-x-<tenant>`), never a host object of the original name |
//! | fieldRef metadata.name/namespace/uid  | `metadata.annotations['vcluster.loft.sh/object-…']`      |
//! | fieldRef metadata.labels['k'] / metadata.annotations['k'] | `metadata.annotations['rcsync.io/label-<hash of k>']` (`annotation-…`), holding the virtual value |
//! | downwardAPI of all metadata.labels / annotations | refused: the host Pod does not carry them       |
//! | ephemeral volumes' claim templates    | the spec as it is (one binding host storage, by `volumeName`, `selector` or a data source, is refused); the template's metadata stays virtual |
//! | spec.nodeName                         | dropped: the host scheduler places Pods                  |
//! | spec.serviceAccountName / token mounts| dropped; `automountServiceAccountToken: false` (virtual credentials mean nothing on the host, and host ones must not leak in) |
//! | priorityClassName, priority, preemptionPolicy, overhead | dropped (host admission sets them)     |
//! | tolerations                           | control-plane / master ones dropped; `enforceTolerations` added |
//! | schedulerName                         | kept only when in `hybridScheduling.hostSchedulers`       |
//! | schedulingGates                       | one gate of rcsync's, `rcsync.io/virtual-gates`, while the virtual Pod has any; the tenant's names never reach the host (a tenant could otherwise lift a gate the host's own admission set) |
//! | ephemeralContainers (`kubectl debug`) | never on create (the API forbids it): those the host Pod lacks are added through its `ephemeralcontainers` subresource, references translated and checked by Pod Security like every container |
//! | status                                | not copied (the host owns it)                            |
//!
//! By responsibility:
//!
//! ```text
//!  pod           virtual Pod ──► host Pod: identity, labels, annotations, references, gates
//!   ├─ downward_api  fieldRefs ──► what the host Pod carries for them
//!   ├─ scheduling    tolerations, node selector, scheduler; affinity and spread scoped to the tenant
//!   └─ unsupported   what the host cannot honour, named (the caller refuses the Pod)
//!  copies        ConfigMaps and Secrets a Pod references ──► the tenant's host copies
//!  budget        PodDisruptionBudget ──► the tenant's host budget (a whole number of healthy Pods)
//!  claim         PersistentVolumeClaim ──► the tenant's host claim (never host storage it does not own)
//! ```
//!
//! What every kind shares (the virtual identity, the host copies' metadata, who holds a host
//! name) is here.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kube::api::ObjectMeta;
use rcsync_core::Tenant;
use rcsync_core::naming::{
    ANNOTATION_OBJECT_NAME, ANNOTATION_OBJECT_NAMESPACE, ANNOTATION_OBJECT_UID, LABEL_MANAGED_BY,
    LABEL_NAMESPACE, host_object_name,
};

mod budget;
mod claim;
mod copies;
mod downward_api;
mod pod;
mod scheduling;
mod unsupported;

pub use budget::{BudgetProblem, host_disruption_budget};
pub use claim::{ClaimProblem, host_claim};
pub use copies::{host_config_map, host_secret};
pub use downward_api::{ANNOTATION_ANNOTATION_PREFIX, ANNOTATION_LABEL_PREFIX};
pub use pod::{
    ANNOTATION_COPIED, ANNOTATION_VIRTUAL_LABELS, VIRTUAL_GATES, claim_volumes, copied_keys, host_pod,
};
pub use scheduling::node_selector_conflicts;
pub use unsupported::unsupported;

/// Why a virtual Pod cannot be translated.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TranslateError {
    /// A required field is missing.
    #[error("the Pod has no {0}")]
    Missing(&'static str),
}

/// The identity of a virtual Pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtualPodRef {
    /// Namespace in the virtual cluster.
    pub namespace: String,
    /// Name in the virtual cluster.
    pub name: String,
    /// UID in the virtual cluster.
    pub uid: String,
}

/// Reads the identity of a virtual Pod.
pub fn virtual_ref(pod: &Pod) -> Result<VirtualPodRef, TranslateError> {
    let m = &pod.metadata;
    Ok(VirtualPodRef {
        namespace: m
            .namespace
            .clone()
            .filter(|s| !s.is_empty())
            .ok_or(TranslateError::Missing("metadata.namespace"))?,
        name: m
            .name
            .clone()
            .filter(|s| !s.is_empty())
            .ok_or(TranslateError::Missing("metadata.name"))?,
        uid: m
            .uid
            .clone()
            .filter(|s| !s.is_empty())
            .ok_or(TranslateError::Missing("metadata.uid"))?,
    })
}

/// Labels that select a tenant's host Pods.
pub fn managed_selector(tenant: &Tenant) -> String {
    format!("{LABEL_MANAGED_BY}={}", tenant.name)
}

fn identity_annotations(name: &str, namespace: &str, uid: Option<&str>) -> BTreeMap<String, String> {
    let mut annotations = BTreeMap::from([
        (ANNOTATION_OBJECT_NAME.to_string(), name.to_string()),
        (ANNOTATION_OBJECT_NAMESPACE.to_string(), namespace.to_string()),
    ]);
    if let Some(uid) = uid {
        annotations.insert(ANNOTATION_OBJECT_UID.to_string(), uid.to_string());
    }
    annotations
}

fn object_identity(meta: &ObjectMeta) -> Result<(String, String), TranslateError> {
    let name = meta
        .name
        .clone()
        .filter(|s| !s.is_empty())
        .ok_or(TranslateError::Missing("metadata.name"))?;
    let namespace = meta
        .namespace
        .clone()
        .filter(|s| !s.is_empty())
        .ok_or(TranslateError::Missing("metadata.namespace"))?;
    Ok((name, namespace))
}

/// Metadata of a host copy: translated name, the tenant's labels, the virtual identity; nothing
/// of the virtual object's own labels and annotations.
fn copy_metadata(name: &str, namespace: &str, tenant: &Tenant) -> ObjectMeta {
    ObjectMeta {
        name: Some(host_object_name(name, namespace, tenant.name.as_str())),
        namespace: Some(tenant.host_namespace.clone()),
        labels: Some(BTreeMap::from([
            (LABEL_MANAGED_BY.to_string(), tenant.name.to_string()),
            (LABEL_NAMESPACE.to_string(), namespace.to_string()),
        ])),
        annotations: Some(identity_annotations(name, namespace, None)),
        ..Default::default()
    }
}

/// The virtual name, namespace and uid of an object of `kind` the tenant asks the host to hold
/// (a budget, a claim), or why the request is malformed (`the PersistentVolumeClaim has no
/// metadata.uid`).
fn held_identity(meta: &ObjectMeta, kind: &str) -> Result<(String, String, String), String> {
    let (name, namespace) = object_identity(meta)
        .map_err(|TranslateError::Missing(field)| format!("the {kind} has no {field}"))?;
    let uid = meta
        .uid
        .clone()
        .filter(|u| !u.is_empty())
        .ok_or_else(|| format!("the {kind} has no metadata.uid"))?;
    Ok((name, namespace, uid))
}

/// Who holds a host object's name: the virtual `namespace/name` recorded on it, when it is a copy
/// of `tenant`'s; `None` for objects rcsync did not write for that tenant.
pub fn recorded_holder(meta: &ObjectMeta, tenant: &Tenant) -> Option<(String, String)> {
    let managed = meta.labels.as_ref()?.get(LABEL_MANAGED_BY)? == tenant.name.as_str();
    let a = meta.annotations.as_ref()?;
    managed.then(|| {
        Some((
            a.get(ANNOTATION_OBJECT_NAMESPACE)?.clone(),
            a.get(ANNOTATION_OBJECT_NAME)?.clone(),
        ))
    })?
}

/// The virtual identity recorded on a host Pod, if it is one of ours.
pub fn recorded_ref(host: &ObjectMeta) -> Option<VirtualPodRef> {
    let a = host.annotations.as_ref()?;
    Some(VirtualPodRef {
        namespace: a.get(ANNOTATION_OBJECT_NAMESPACE)?.clone(),
        name: a.get(ANNOTATION_OBJECT_NAME)?.clone(),
        uid: a.get(ANNOTATION_OBJECT_UID)?.clone(),
    })
}

#[cfg(test)]
mod fixtures {
    //! Tenants and virtual Pods the translation tests start from.

    use std::path::Path;

    use k8s_openapi::api::core::v1::Pod;
    use rcsync_core::Tenant;

    /// Tenant `team-a` with host namespace `vc-team-a`, nothing else set.
    pub(super) fn tenant() -> Tenant {
        rcsync_core::TenantsFile::parse(
            Path::new("t.yaml"),
            "tenants:\n  - {name: team-a, hostNamespace: vc-team-a}\n",
        )
        .unwrap()
        .tenants()[0]
            .clone()
    }

    /// Tenant `team-a` with `extra` (YAML, indented as its fields) added.
    pub(super) fn tenant_with(extra: &str) -> Tenant {
        rcsync_core::TenantsFile::parse(
            Path::new("t.yaml"),
            &format!("tenants:\n  - name: team-a\n    hostNamespace: vc-team-a\n{extra}"),
        )
        .unwrap()
        .tenants()[0]
            .clone()
    }

    /// A running Pod `default/my-pod` with a service-account token volume, a label claiming another tenant's, a node and a class.
    pub(super) fn pod() -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "my-pod", "namespace": "default", "uid": "u-1", "labels": {"app": "web", "vcluster.loft.sh/managed-by": "team-b"}},
            "spec": {
                "nodeName": "virtual-node", "serviceAccountName": "builder", "runtimeClassName": "sandboxed",
                "containers": [{"name": "c", "image": "nginx", "volumeMounts": [
                    {"name": "kube-api-access-abc", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"},
                    {"name": "data", "mountPath": "/data"}]}],
                "volumes": [
                    {"name": "kube-api-access-abc", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}},
                    {"name": "data", "emptyDir": {}}]
            },
            "status": {"phase": "Running"}
        }))
        .unwrap()
    }

    /// [`pod`] with the fields of `extra` set in its spec.
    pub(super) fn with_spec(extra: serde_json::Value) -> Pod {
        let mut pod = serde_json::to_value(pod()).unwrap();
        for (k, v) in extra.as_object().unwrap() {
            pod["spec"][k] = v.clone();
        }
        serde_json::from_value(pod).unwrap()
    }

    /// Pod `shop/web` with `spec`.
    pub(super) fn pod_with(spec: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": "u-9"},
            "spec": spec
        }))
        .unwrap()
    }
}
