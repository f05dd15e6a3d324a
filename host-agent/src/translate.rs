//! Virtual Pod → host Pod, with vCluster's naming and metadata and safe defaults for what a host
//! must not take from a tenant.
//!
//! | virtual                               | host                                                     |
//! |---------------------------------------|----------------------------------------------------------|
//! | name, namespace                       | `<name>-x-<namespace>-x-<tenant>` in the tenant's hostNamespace |
//! | labels                                | not copied (they could match host selectors); kept as JSON in `vcluster.loft.sh/labels` |
//! | —                                     | labels `vcluster.loft.sh/managed-by`, `vcluster.loft.sh/namespace` |
//! | —                                     | annotations `vcluster.loft.sh/object-{name,namespace,uid}` |
//! | spec.runtimeClassName                 | the host class's name (after reverse patches)            |
//! | spec.nodeName                         | dropped: the host scheduler places Pods                  |
//! | spec.serviceAccountName / token mounts| dropped; `automountServiceAccountToken: false` (virtual credentials mean nothing on the host, and host ones must not leak in) |
//! | status                                | not copied (the host owns it)                            |

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Pod;
use rcsync_core::Tenant;
use rcsync_core::naming::{
    ANNOTATION_OBJECT_NAME, ANNOTATION_OBJECT_NAMESPACE, ANNOTATION_OBJECT_UID, LABEL_MANAGED_BY,
    LABEL_NAMESPACE, host_pod_name,
};

/// Annotation on host Pods holding the virtual Pod's labels (JSON), since they are not copied.
pub const ANNOTATION_VIRTUAL_LABELS: &str = "vcluster.loft.sh/labels";

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

/// The host Pod for a virtual Pod of `tenant`, running `host_runtime_class` (empty: none).
pub fn host_pod(virtual_pod: &Pod, tenant: &Tenant, host_runtime_class: &str) -> Result<Pod, TranslateError> {
    let id = virtual_ref(virtual_pod)?;
    let mut spec = virtual_pod.spec.clone().ok_or(TranslateError::Missing("spec"))?;
    spec.node_name = None;
    spec.service_account_name = None;
    #[allow(deprecated)]
    {
        spec.service_account = None;
    }
    spec.automount_service_account_token = Some(false);
    spec.runtime_class_name = Some(host_runtime_class.to_string()).filter(|s| !s.is_empty());
    // Drop projected service-account token volumes (kube-api-access-*) and their mounts.
    let dropped: BTreeSet<String> = spec
        .volumes
        .iter()
        .flatten()
        .filter(|v| {
            v.projected.as_ref().is_some_and(|p| {
                p.sources
                    .iter()
                    .flatten()
                    .any(|s| s.service_account_token.is_some())
            })
        })
        .map(|v| v.name.clone())
        .collect();
    if let Some(volumes) = &mut spec.volumes {
        volumes.retain(|v| !dropped.contains(&v.name));
    }
    for container in spec
        .containers
        .iter_mut()
        .chain(spec.init_containers.iter_mut().flatten())
    {
        if let Some(mounts) = &mut container.volume_mounts {
            mounts.retain(|m| !dropped.contains(&m.name));
        }
    }
    let labels = BTreeMap::from([
        (LABEL_MANAGED_BY.to_string(), tenant.name.to_string()),
        (LABEL_NAMESPACE.to_string(), id.namespace.clone()),
    ]);
    let mut annotations = BTreeMap::from([
        (ANNOTATION_OBJECT_NAME.to_string(), id.name.clone()),
        (ANNOTATION_OBJECT_NAMESPACE.to_string(), id.namespace.clone()),
        (ANNOTATION_OBJECT_UID.to_string(), id.uid.clone()),
    ]);
    if let Some(virtual_labels) = virtual_pod.metadata.labels.as_ref().filter(|l| !l.is_empty()) {
        annotations.insert(
            ANNOTATION_VIRTUAL_LABELS.to_string(),
            serde_json::to_string(virtual_labels).expect("a string map serializes"),
        );
    }
    Ok(Pod {
        metadata: kube::api::ObjectMeta {
            name: Some(host_pod_name(&id.name, &id.namespace, tenant.name.as_str())),
            namespace: Some(tenant.host_namespace.clone()),
            labels: Some(labels),
            annotations: Some(annotations),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    })
}

/// The virtual identity recorded on a host Pod, if it is one of ours.
pub fn recorded_ref(host: &Pod) -> Option<VirtualPodRef> {
    let a = host.metadata.annotations.as_ref()?;
    Some(VirtualPodRef {
        namespace: a.get(ANNOTATION_OBJECT_NAMESPACE)?.clone(),
        name: a.get(ANNOTATION_OBJECT_NAME)?.clone(),
        uid: a.get(ANNOTATION_OBJECT_UID)?.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn tenant() -> Tenant {
        rcsync_core::TenantsFile::parse(
            Path::new("t.yaml"),
            "tenants:\n  - {name: team-a, hostNamespace: vc-team-a}\n",
        )
        .unwrap()
        .tenants
        .remove(0)
    }

    fn pod() -> Pod {
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

    #[test]
    fn translates_names_metadata_and_safe_defaults() {
        let host = host_pod(&pod(), &tenant(), "gvisor").unwrap();
        assert_eq!(host.metadata.name.as_deref(), Some("my-pod-x-default-x-team-a"));
        assert_eq!(host.metadata.namespace.as_deref(), Some("vc-team-a"));
        let labels = host.metadata.labels.as_ref().unwrap();
        assert_eq!(
            labels[LABEL_MANAGED_BY], "team-a",
            "a tenant cannot claim another tenant's label"
        );
        assert_eq!(labels[LABEL_NAMESPACE], "default");
        assert!(!labels.contains_key("app"), "virtual labels are not copied");
        let annotations = host.metadata.annotations.as_ref().unwrap();
        assert_eq!(annotations[ANNOTATION_OBJECT_UID], "u-1");
        assert!(annotations[ANNOTATION_VIRTUAL_LABELS].contains("\"app\":\"web\""));
        let spec = host.spec.unwrap();
        assert_eq!(spec.runtime_class_name.as_deref(), Some("gvisor"));
        assert_eq!(spec.node_name, None);
        assert_eq!(spec.service_account_name, None);
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(
            spec.volumes
                .unwrap()
                .iter()
                .map(|v| v.name.as_str())
                .collect::<Vec<_>>(),
            ["data"]
        );
        assert_eq!(spec.containers[0].volume_mounts.as_ref().unwrap().len(), 1);
        assert!(host.status.is_none());
        assert_eq!(
            recorded_ref(&host_pod(&pod(), &tenant(), "").unwrap())
                .unwrap()
                .name,
            "my-pod"
        );
    }

    #[test]
    fn missing_identity_is_an_error() {
        let mut p = pod();
        p.metadata.uid = None;
        assert_eq!(
            host_pod(&p, &tenant(), "").unwrap_err(),
            TranslateError::Missing("metadata.uid")
        );
    }
}
