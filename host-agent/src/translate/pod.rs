//! The host Pod of a virtual Pod: its name and namespace, labels (under hashed keys), the
//! annotations the tenant may copy and rcsync's own, references to the tenant's host copies, one
//! scheduling gate of rcsync's; what the host owns (status, priority, overhead) left out.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{PersistentVolumeClaimVolumeSource, Pod, PodSchedulingGate, PodSpec};
use kube::api::ObjectMeta;
use rcsync_core::naming::{
    LABEL_MANAGED_BY, LABEL_NAMESPACE, host_label_key, host_object_name, host_pod_name,
};
use rcsync_core::pod_refs;
use rcsync_core::{AnnotationPattern, Tenant};

use super::downward_api::rewrite_downward_api;
use super::scheduling::{apply_scheduling_policy, scope_pod_selectors};
use super::{TranslateError, identity_annotations, virtual_ref};

/// The scheduling gate a host Pod carries while its virtual Pod has scheduling gates (a queueing
/// controller of the tenant's has yet to release it). The tenant's own gate names stay in the
/// virtual cluster: named on the host, one could match a gate the host's admission sets, and
/// lifting it in the virtual cluster would lift the host's.
pub const VIRTUAL_GATES: &str = "rcsync.io/virtual-gates";

/// Annotation on host Pods holding the virtual Pod's labels (JSON), since they are not copied.
pub const ANNOTATION_VIRTUAL_LABELS: &str = "vcluster.loft.sh/labels";

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
    drop_token_volumes(&mut spec);
    keep_claim_template_metadata_virtual(&mut spec);
    // References resolve to the tenant's own translated copies, never to host objects.
    let tenant_name = tenant.name.as_str();
    pod_refs::rewrite(&mut spec, |_, name| {
        host_object_name(name, &id.namespace, tenant_name)
    });
    // So do claims, where the tenant's claims are made on the host (else they are refused below);
    // there an ephemeral volume's claim is the virtual cluster's too, and is mounted as one.
    if tenant.pods.claims {
        ephemeral_as_claims(&mut spec, &id.name);
        for claim in claim_volumes(&mut spec) {
            claim.claim_name = host_object_name(&claim.claim_name, &id.namespace, tenant_name);
        }
    }
    // The tenant's annotations the host allows first: rcsync's own (identity, fieldRef values)
    // are written over them, and the patterns never match those keys anyway.
    let mut annotations = copied_annotations(&virtual_pod.metadata, &tenant.pods.copy_annotations);
    annotations.extend(identity_annotations(&id.name, &id.namespace, Some(&id.uid)));
    rewrite_downward_api(&mut spec, &virtual_pod.metadata, &mut annotations);
    apply_scheduling_policy(&mut spec, &tenant.pods);
    scope_pod_selectors(&mut spec, &id.namespace, tenant_name);
    // Set by the host's own admission (priority from the class, overhead from the RuntimeClass);
    // values computed in the virtual cluster would be rejected or wrong there.
    spec.priority_class_name = None;
    spec.priority = None;
    spec.preemption_policy = None;
    spec.overhead = None;
    spec.scheduling_gates = spec
        .scheduling_gates
        .as_ref()
        .is_some_and(|gates| !gates.is_empty())
        .then(|| {
            vec![PodSchedulingGate {
                name: VIRTUAL_GATES.to_string(),
            }]
        });
    let mut labels = BTreeMap::from([
        (LABEL_MANAGED_BY.to_string(), tenant.name.to_string()),
        (LABEL_NAMESPACE.to_string(), id.namespace.clone()),
    ]);
    // Under hashed keys, for the selectors rewritten by `scope_pod_selectors`.
    for (key, value) in virtual_pod.metadata.labels.iter().flatten() {
        labels.insert(host_label_key(key), value.clone());
    }
    if let Some(virtual_labels) = virtual_pod.metadata.labels.as_ref().filter(|l| !l.is_empty()) {
        annotations.insert(
            ANNOTATION_VIRTUAL_LABELS.to_string(),
            serde_json::to_string(virtual_labels).expect("a string map serializes"),
        );
    }
    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(host_pod_name(&id.name, &id.namespace, tenant_name)),
            namespace: Some(tenant.host_namespace.clone()),
            labels: Some(labels),
            annotations: Some(annotations),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    })
}

/// Annotation on host Pods listing (comma-separated, sorted) the virtual annotations copied to it,
/// so that one the tenant removes is removed from the host Pod too, and nothing else is.
pub const ANNOTATION_COPIED: &str = "rcsync.io/copied-annotations";

/// The virtual Pod's annotations that `patterns` let through, with [`ANNOTATION_COPIED`] naming
/// them (nothing when none is).
fn copied_annotations(virtual_meta: &ObjectMeta, patterns: &[AnnotationPattern]) -> BTreeMap<String, String> {
    let mut copied: BTreeMap<String, String> = virtual_meta
        .annotations
        .iter()
        .flatten()
        .filter(|(key, _)| patterns.iter().any(|p| p.matches(key)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !copied.is_empty() {
        let keys: Vec<&str> = copied.keys().map(String::as_str).collect();
        let keys = keys.join(",");
        copied.insert(ANNOTATION_COPIED.to_string(), keys);
    }
    copied
}

/// The keys [`ANNOTATION_COPIED`] lists on a host Pod.
pub fn copied_keys(host_meta: &ObjectMeta) -> BTreeSet<&str> {
    host_meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_COPIED))
        .map(|keys| keys.split(',').filter(|k| !k.is_empty()).collect())
        .unwrap_or_default()
}

/// Drops projected service-account token volumes (kube-api-access-*) and their mounts.
fn drop_token_volumes(spec: &mut PodSpec) {
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
}

/// Clears the metadata of the Pod's ephemeral volumes' claim templates. The host makes those
/// claims in the tenant's host namespace from the template: its labels could match host selectors
/// (a backup's, a policy's exemption) and its annotations set what host controllers set (the
/// selected node, the provisioner), as the virtual Pod's own labels and annotations could, which
/// reach the host only as rcsync writes them. The tenant never sees the host claims, so nothing it
/// can observe is lost.
fn keep_claim_template_metadata_virtual(spec: &mut PodSpec) {
    let templates = spec
        .volumes
        .iter_mut()
        .flatten()
        .filter_map(|v| v.ephemeral.as_mut()?.volume_claim_template.as_mut());
    for template in templates {
        template.metadata = None;
    }
}

/// Turns the Pod's ephemeral volumes into mounts of their claims, `<pod>-<volume>`, as a virtual
/// cluster's ephemeral-volume controller names the claim it makes from the template. Where the
/// tenant's claims are made on the host, that claim is copied to the host like any other, so the
/// host Pod mounts the copy; left ephemeral, the host's own controller would make a second claim,
/// and the host would provision the volume twice.
fn ephemeral_as_claims(spec: &mut PodSpec, pod_name: &str) {
    for volume in spec.volumes.iter_mut().flatten() {
        if volume.ephemeral.take().is_some() {
            volume.persistent_volume_claim = Some(PersistentVolumeClaimVolumeSource {
                claim_name: format!("{pod_name}-{}", volume.name),
                read_only: None,
            });
        }
    }
}

/// The `persistentVolumeClaim` sources of a Pod's volumes.
pub fn claim_volumes(spec: &mut PodSpec) -> impl Iterator<Item = &mut PersistentVolumeClaimVolumeSource> {
    spec.volumes
        .iter_mut()
        .flatten()
        .filter_map(|v| v.persistent_volume_claim.as_mut())
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{pod, pod_with, tenant, tenant_with};
    use super::super::{recorded_ref, unsupported};
    use super::*;
    use rcsync_core::naming::ANNOTATION_OBJECT_UID;

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
        assert_eq!(
            labels[&host_label_key("app")],
            "web",
            "they are carried under hashed keys"
        );
        assert_eq!(labels[&host_label_key(LABEL_MANAGED_BY)], "team-b");
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
            recorded_ref(&host_pod(&pod(), &tenant(), "").unwrap().metadata)
                .unwrap()
                .name,
            "my-pod"
        );
    }

    #[test]
    fn references_resolve_to_translated_copies_only() {
        let pod = pod_with(serde_json::json!({
            "containers": [{"name": "c", "envFrom": [{"secretRef": {"name": "creds"}}],
                "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "x"}}}]}],
            "volumes": [{"name": "v", "configMap": {"name": "cfg"}}],
            "imagePullSecrets": [{"name": "pull"}]
        }));
        let host = host_pod(&pod, &tenant(), "").unwrap();
        let refs = pod_refs::references(host.spec.as_ref().unwrap());
        let names: Vec<&str> = refs.keys().map(|(_, n)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "cfg-x-shop-x-team-a",
                "creds-x-shop-x-team-a",
                "pull-x-shop-x-team-a"
            ]
        );
    }

    #[test]
    fn the_tenants_scheduling_gates_are_one_gate_of_rcsyncs_on_the_host() {
        let tenant = tenant();
        let gated = pod_with(
            serde_json::json!({"containers": [{"name": "app", "image": "app:1"}],
            "schedulingGates": [{"name": "kueue.x-k8s.io/admission"}, {"name": "host.example/queue"}]}),
        );
        let host = host_pod(&gated, &tenant, "runsc").unwrap();
        let gates: Vec<_> = host
            .spec
            .unwrap()
            .scheduling_gates
            .unwrap()
            .into_iter()
            .map(|g| g.name)
            .collect();
        assert_eq!(gates, [VIRTUAL_GATES]);
        let released = pod_with(
            serde_json::json!({"containers": [{"name": "app", "image": "app:1"}], "schedulingGates": []}),
        );
        assert_eq!(
            host_pod(&released, &tenant, "runsc")
                .unwrap()
                .spec
                .unwrap()
                .scheduling_gates,
            None
        );
    }

    #[test]
    fn a_pods_claims_are_the_tenants_host_copies_where_claims_are_made_on_the_host() {
        let pod = pod_with(serde_json::json!({
            "containers": [{"name": "c"}],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data", "readOnly": true}}]
        }));
        let tenant = tenant_with("    sync: {toHost: {persistentVolumeClaims: {enabled: true}}}\n");
        let host = host_pod(&pod, &tenant, "").unwrap();
        let spec = host.spec.as_ref().unwrap();
        let claim = spec.volumes.as_ref().unwrap()[0]
            .persistent_volume_claim
            .as_ref()
            .unwrap();
        assert_eq!(claim.claim_name, "data-x-shop-x-team-a");
        assert_eq!(claim.read_only, Some(true));
        assert!(unsupported(spec, &tenant.pods).is_empty());

        // An ephemeral volume mounts the host copy of the claim the virtual cluster made for it.
        let scratch = pod_with(serde_json::json!({
            "containers": [{"name": "c"}],
            "volumes": [{"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": {
                "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}}}]
        }));
        let host = host_pod(&scratch, &tenant, "").unwrap();
        let volume = &host.spec.as_ref().unwrap().volumes.as_ref().unwrap()[0];
        assert_eq!(volume.ephemeral, None);
        assert_eq!(
            volume
                .persistent_volume_claim
                .as_ref()
                .map(|c| c.claim_name.as_str()),
            Some("web-scratch-x-shop-x-team-a")
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

    #[test]
    fn only_the_annotations_the_tenant_may_copy_reach_the_host_and_never_rcsyncs_own() {
        let mut tenant = tenant();
        tenant.pods.copy_annotations = vec![
            AnnotationPattern::parse("prometheus.io/*").unwrap(),
            AnnotationPattern::parse("cluster-autoscaler.kubernetes.io/safe-to-evict").unwrap(),
        ];
        let mut virtual_pod = pod();
        virtual_pod.metadata.annotations = Some(BTreeMap::from(
            [
                ("prometheus.io/scrape", "true"),
                ("cluster-autoscaler.kubernetes.io/safe-to-evict", "false"),
                ("iam.amazonaws.com/role", "host-admin"),
                ("vcluster.loft.sh/object-name", "someone-else"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string())),
        ));
        let host = host_pod(&virtual_pod, &tenant, "gvisor").unwrap();
        let annotations = host.metadata.annotations.as_ref().unwrap();
        assert_eq!(annotations["prometheus.io/scrape"], "true");
        assert_eq!(
            annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"],
            "false"
        );
        assert!(!annotations.contains_key("iam.amazonaws.com/role"));
        assert_eq!(annotations["vcluster.loft.sh/object-name"], "my-pod");
        assert_eq!(
            copied_keys(&host.metadata),
            BTreeSet::from([
                "cluster-autoscaler.kubernetes.io/safe-to-evict",
                "prometheus.io/scrape"
            ])
        );

        // `*` copies everything but rcsync's and vCluster's own.
        tenant.pods.copy_annotations = vec![AnnotationPattern::parse("*").unwrap()];
        let host = host_pod(&virtual_pod, &tenant, "gvisor").unwrap();
        let annotations = host.metadata.annotations.as_ref().unwrap();
        assert_eq!(annotations["iam.amazonaws.com/role"], "host-admin");
        assert_eq!(annotations["vcluster.loft.sh/object-name"], "my-pod");
        assert_eq!(copied_keys(&host.metadata).len(), 3);

        // By default nothing is copied.
        let host = host_pod(&virtual_pod, &super::super::fixtures::tenant(), "gvisor").unwrap();
        assert!(copied_keys(&host.metadata).is_empty());
        assert!(
            !host
                .metadata
                .annotations
                .unwrap()
                .contains_key("prometheus.io/scrape")
        );
    }
}
