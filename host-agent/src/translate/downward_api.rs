//! Downward-API `fieldRef`s of a virtual Pod, pointed at what its host Pod carries: the virtual
//! identity in vCluster's annotations, one label or annotation in an annotation of its own.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{DownwardAPIVolumeFile, ObjectFieldSelector, PodSpec, Volume};
use kube::api::ObjectMeta;
use rcsync_core::naming::{ANNOTATION_OBJECT_NAME, ANNOTATION_OBJECT_NAMESPACE, ANNOTATION_OBJECT_UID};

/// Prefix of host Pod annotations holding the value of one virtual label a fieldRef reads.
pub const ANNOTATION_LABEL_PREFIX: &str = "rcsync.io/label-";
/// Prefix of host Pod annotations holding the value of one virtual annotation a fieldRef reads.
pub const ANNOTATION_ANNOTATION_PREFIX: &str = "rcsync.io/annotation-";

/// The host field a downward-API `fieldPath` of the virtual Pod reads from, when it differs, and
/// the annotation (key, virtual value) the host Pod must carry for it. The virtual Pod's identity
/// is in vCluster's annotations; one label or annotation (`metadata.labels['k']`) is copied into
/// an annotation of its own, named by a hash of `k` (label keys may hold characters annotation
/// names may not). Whole maps stay as they are and are refused by [`super::unsupported`].
fn host_field_path(path: &str, virtual_meta: &ObjectMeta) -> Option<(String, Option<(String, String)>)> {
    let identity = match path {
        "metadata.name" => Some(ANNOTATION_OBJECT_NAME),
        "metadata.namespace" => Some(ANNOTATION_OBJECT_NAMESPACE),
        "metadata.uid" => Some(ANNOTATION_OBJECT_UID),
        _ => None,
    };
    if let Some(annotation) = identity {
        return Some((format!("metadata.annotations['{annotation}']"), None));
    }
    let (map, key, prefix) = if let Some(key) = subscript(path, "metadata.labels") {
        (virtual_meta.labels.as_ref(), key, ANNOTATION_LABEL_PREFIX)
    } else if let Some(key) = subscript(path, "metadata.annotations") {
        (
            virtual_meta.annotations.as_ref(),
            key,
            ANNOTATION_ANNOTATION_PREFIX,
        )
    } else {
        return None;
    };
    let annotation = format!("{prefix}{}", rcsync_core::version::content_version(key));
    // A key the virtual Pod lacks reads as "" there, and so does a missing annotation here.
    let value = map
        .and_then(|m| m.get(key))
        .map(|v| (annotation.clone(), v.clone()));
    Some((format!("metadata.annotations['{annotation}']"), value))
}

/// `k` of `field['k']`, the downward API's subscript form.
fn subscript<'a>(path: &'a str, field: &str) -> Option<&'a str> {
    path.strip_prefix(field)?.strip_prefix("['")?.strip_suffix("']")
}

/// Points the Pod's downward-API `fieldRef`s (env and downwardAPI volumes, projected ones too) at
/// what the host Pod holds for them (see [`host_field_path`]), adding the annotations they read.
pub(super) fn rewrite_downward_api(
    spec: &mut PodSpec,
    virtual_meta: &ObjectMeta,
    annotations: &mut BTreeMap<String, String>,
) {
    let mut fix = |field: &mut Option<ObjectFieldSelector>| {
        if let Some(field) = field
            && let Some((path, annotation)) = host_field_path(&field.field_path, virtual_meta)
        {
            field.field_path = path;
            annotations.extend(annotation);
        }
    };
    for c in spec
        .containers
        .iter_mut()
        .chain(spec.init_containers.iter_mut().flatten())
    {
        for var in c.env.iter_mut().flatten() {
            if let Some(from) = &mut var.value_from {
                fix(&mut from.field_ref);
            }
        }
    }
    for c in spec.ephemeral_containers.iter_mut().flatten() {
        for var in c.env.iter_mut().flatten() {
            if let Some(from) = &mut var.value_from {
                fix(&mut from.field_ref);
            }
        }
    }
    for volume in spec.volumes.iter_mut().flatten() {
        for file in downward_api_files(volume) {
            fix(&mut file.field_ref);
        }
    }
}

/// The downward-API items of a volume, projected ones too.
fn downward_api_files(volume: &mut Volume) -> Vec<&mut DownwardAPIVolumeFile> {
    let mut files = Vec::new();
    if let Some(d) = &mut volume.downward_api {
        files.extend(d.items.iter_mut().flatten());
    }
    if let Some(p) = &mut volume.projected {
        for source in p.sources.iter_mut().flatten() {
            if let Some(d) = &mut source.downward_api {
                files.extend(d.items.iter_mut().flatten());
            }
        }
    }
    files
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{pod_with, tenant};
    use super::super::{host_pod, unsupported};
    use rcsync_core::PodPolicy;
    use rcsync_core::naming::ANNOTATION_OBJECT_NAME;
    use std::collections::BTreeMap;

    #[test]
    fn downward_api_identity_reads_the_virtual_identity_annotations() {
        let pod = pod_with(serde_json::json!({
            "containers": [{"name": "c", "env": [
                {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]}],
            "volumes": [
                {"name": "d", "downwardAPI": {"items": [{"path": "uid", "fieldRef": {"fieldPath": "metadata.uid"}}]}},
                {"name": "p", "projected": {"sources": [{"downwardAPI": {"items": [{"path": "n", "fieldRef": {"fieldPath": "metadata.name"}}]}}]}}
            ]
        }));
        let host = serde_json::to_value(host_pod(&pod, &tenant(), "").unwrap()).unwrap();
        let env = &host["spec"]["containers"][0]["env"];
        assert_eq!(
            env[0]["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.annotations['vcluster.loft.sh/object-name']"
        );
        assert_eq!(
            env[1]["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.annotations['vcluster.loft.sh/object-namespace']"
        );
        assert_eq!(env[2]["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP");
        assert_eq!(
            host["spec"]["volumes"][0]["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"],
            "metadata.annotations['vcluster.loft.sh/object-uid']"
        );
        assert_eq!(
            host["spec"]["volumes"][1]["projected"]["sources"][0]["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"],
            "metadata.annotations['vcluster.loft.sh/object-name']"
        );
        assert_eq!(host["metadata"]["annotations"][ANNOTATION_OBJECT_NAME], "web");
    }

    #[test]
    fn a_label_or_annotation_a_field_ref_reads_is_carried_in_an_annotation_of_its_own() {
        let mut pod = pod_with(serde_json::json!({
            "containers": [{"name": "c", "env": [
                {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app.kubernetes.io/name']"}}},
                {"name": "OWNER", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['owner']"}}},
                {"name": "NONE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['absent']"}}}]}],
            "volumes": [{"name": "d", "downwardAPI": {"items": [
                {"path": "app", "fieldRef": {"fieldPath": "metadata.labels['app.kubernetes.io/name']"}}]}}]
        }));
        pod.metadata.labels = Some(BTreeMap::from([("app.kubernetes.io/name".into(), "shop".into())]));
        pod.metadata.annotations = Some(BTreeMap::from([("owner".into(), "team-a@example.com".into())]));
        let host = host_pod(&pod, &tenant(), "").unwrap();
        let spec = serde_json::to_value(host.spec.as_ref().unwrap()).unwrap();
        let annotations = host.metadata.annotations.unwrap();
        let read = |path: &serde_json::Value| -> Option<String> {
            let path = path.as_str().unwrap();
            let key = path.strip_prefix("metadata.annotations['")?.strip_suffix("']")?;
            Some(annotations.get(key).cloned().unwrap_or_default())
        };
        let env = &spec["containers"][0]["env"];
        assert_eq!(
            read(&env[0]["valueFrom"]["fieldRef"]["fieldPath"]).as_deref(),
            Some("shop")
        );
        assert_eq!(
            read(&env[1]["valueFrom"]["fieldRef"]["fieldPath"]).as_deref(),
            Some("team-a@example.com")
        );
        // A key the virtual Pod lacks reads as empty on both sides.
        assert_eq!(
            read(&env[2]["valueFrom"]["fieldRef"]["fieldPath"]).as_deref(),
            Some("")
        );
        assert_eq!(
            spec["volumes"][0]["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"],
            env[0]["valueFrom"]["fieldRef"]["fieldPath"]
        );
        // Only what a fieldRef reads is copied.
        assert!(
            annotations.keys().filter(|k| k.starts_with("rcsync.io/")).count() == 2,
            "{annotations:?}"
        );
        assert!(unsupported(host.spec.as_ref().unwrap(), &PodPolicy::default()).is_empty());
    }
}
