//! Conversions between the typed messages and node.k8s.io/v1 RuntimeClass (feature `k8s`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Toleration as K8sToleration;
use k8s_openapi::api::node::v1::{
    Overhead as K8sOverhead, RuntimeClass as K8sRuntimeClass, Scheduling as K8sScheduling,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::v1::{Overhead, RuntimeClass, Scheduling, Toleration};

fn map_or_empty(m: &Option<BTreeMap<String, String>>) -> std::collections::HashMap<String, String> {
    m.iter().flatten().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn to_btree(m: &std::collections::HashMap<String, String>) -> Option<BTreeMap<String, String>> {
    (!m.is_empty()).then(|| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

/// A Kubernetes RuntimeClass as the typed message (server-managed metadata is not carried).
pub fn to_proto(rc: &K8sRuntimeClass) -> RuntimeClass {
    RuntimeClass {
        name: rc.metadata.name.clone().unwrap_or_default(),
        handler: rc.handler.clone(),
        labels: map_or_empty(&rc.metadata.labels),
        annotations: map_or_empty(&rc.metadata.annotations),
        overhead: rc.overhead.as_ref().map(|o| Overhead {
            pod_fixed: o
                .pod_fixed
                .iter()
                .flatten()
                .map(|(k, q)| (k.clone(), q.0.clone()))
                .collect(),
        }),
        scheduling: rc.scheduling.as_ref().map(|s| Scheduling {
            node_selector: map_or_empty(&s.node_selector),
            tolerations: s
                .tolerations
                .iter()
                .flatten()
                .map(|t| Toleration {
                    key: t.key.clone().unwrap_or_default(),
                    operator: t.operator.clone().unwrap_or_default(),
                    value: t.value.clone().unwrap_or_default(),
                    effect: t.effect.clone().unwrap_or_default(),
                    toleration_seconds: t.toleration_seconds,
                })
                .collect(),
        }),
    }
}

/// Annotations never carried to the virtual cluster: they describe the host object's history.
pub const HOST_ONLY_ANNOTATIONS: &[&str] = &["kubectl.kubernetes.io/last-applied-configuration"];

/// The synced form of a RuntimeClass: name, labels, annotations (without host-only ones),
/// handler, overhead, scheduling. Server-managed metadata (uid, resourceVersion, timestamps) is
/// dropped, so a content hash of it depends only on what the virtual cluster holds, and both
/// agents compute the same version from the same content.
pub fn synced_form(rc: &K8sRuntimeClass) -> K8sRuntimeClass {
    let mut annotations = rc.metadata.annotations.clone().unwrap_or_default();
    annotations.retain(|k, _| !HOST_ONLY_ANNOTATIONS.contains(&k.as_str()));
    K8sRuntimeClass {
        metadata: ObjectMeta {
            name: rc.metadata.name.clone(),
            labels: rc.metadata.labels.clone().filter(|l| !l.is_empty()),
            annotations: Some(annotations).filter(|a| !a.is_empty()),
            ..Default::default()
        },
        handler: rc.handler.clone(),
        overhead: rc.overhead.clone(),
        scheduling: rc.scheduling.clone(),
    }
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

/// The typed message as a Kubernetes RuntimeClass (metadata: name, labels, annotations only).
pub fn from_proto(rc: &RuntimeClass) -> K8sRuntimeClass {
    K8sRuntimeClass {
        metadata: ObjectMeta {
            name: Some(rc.name.clone()),
            labels: to_btree(&rc.labels),
            annotations: to_btree(&rc.annotations),
            ..Default::default()
        },
        handler: rc.handler.clone(),
        overhead: rc.overhead.as_ref().map(|o| K8sOverhead {
            pod_fixed: (!o.pod_fixed.is_empty()).then(|| {
                o.pod_fixed
                    .iter()
                    .map(|(k, v)| (k.clone(), Quantity(v.clone())))
                    .collect()
            }),
        }),
        scheduling: rc.scheduling.as_ref().map(|s| K8sScheduling {
            node_selector: to_btree(&s.node_selector),
            tolerations: (!s.tolerations.is_empty()).then(|| {
                s.tolerations
                    .iter()
                    .map(|t| K8sToleration {
                        key: non_empty(&t.key),
                        operator: non_empty(&t.operator),
                        value: non_empty(&t.value),
                        effect: non_empty(&t.effect),
                        toleration_seconds: t.toleration_seconds,
                    })
                    .collect()
            }),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let rc: K8sRuntimeClass = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "gvisor", "labels": {"a": "b"}, "annotations": {"c": "d"}},
            "handler": "runsc",
            "overhead": {"podFixed": {"cpu": "250m", "memory": "64Mi"}},
            "scheduling": {"nodeSelector": {"sandbox": "gvisor"},
                "tolerations": [{"key": "k", "operator": "Equal", "value": "v", "effect": "NoExecute", "tolerationSeconds": 30}]}
        }))
        .unwrap();
        assert_eq!(from_proto(&to_proto(&rc)), rc);
        let bare: K8sRuntimeClass =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "x"}, "handler": "h"})).unwrap();
        assert_eq!(from_proto(&to_proto(&bare)), bare);
    }
}
