//! What in a host Pod the host cannot honour: each problem names the field and why, for the
//! caller to refuse the Pod with (never a silent drop). Among them, whatever would reach a host
//! object or storage the tenant does not own: volumes naming a Secret the host would resolve,
//! claims or claim templates binding host storage, and volumes naming storage directly (an NFS
//! export, a cloud disk by its id) or inline CSI volumes unless the tenant's `policies.inlineVolumes`
//! lists the type, or `policies.inlineCsiDrivers` the driver.

use k8s_openapi::api::core::v1::PodSpec;
use rcsync_core::PodPolicy;

/// What in a host Pod the host cannot honour under the tenant's `policy`; each entry names the
/// field and why. Checked on the host form (service-account token volumes already dropped),
/// before Pod Security.
pub fn unsupported(spec: &PodSpec, policy: &PodPolicy) -> Vec<String> {
    let mut problems = Vec::new();
    for v in spec.volumes.iter().flatten() {
        let name = &v.name;
        let why = if v.persistent_volume_claim.is_some() {
            (!policy.claims).then(|| {
                "persistentVolumeClaim volumes are not synced to the host (sync.toHost.persistentVolumeClaims.enabled \
                 is not true in the host agent's tenants file)"
                    .to_string()
            })
        } else if let Some(e) = &v.ephemeral {
            // The host makes the claim: as for the tenant's own claims, one binding host storage
            // the tenant does not own is refused (`translate::claim`).
            let template = e.volume_claim_template.as_ref().map(|t| &t.spec);
            template.and_then(|s| {
                if let Some(volume) = s.volume_name.as_deref().filter(|v| !v.is_empty()) {
                    Some(format!(
                        "its claim template's volumeName names host PersistentVolume {volume:?}, which the tenant does \
                         not own: the host provisions an ephemeral volume"
                    ))
                } else if s.selector.is_some() {
                    Some(
                        "its claim template's selector selects host PersistentVolumes by their labels, which the \
                         tenant does not own: the host provisions an ephemeral volume"
                            .to_string(),
                    )
                } else if s.data_source.is_some() || s.data_source_ref.is_some() {
                    Some("an ephemeral volume's dataSource would name a host object".to_string())
                } else {
                    None
                }
            })
        } else if v
            .csi
            .as_ref()
            .is_some_and(|c| c.node_publish_secret_ref.is_some())
            || v.cephfs.as_ref().is_some_and(|c| c.secret_ref.is_some())
            || v.rbd.as_ref().is_some_and(|c| c.secret_ref.is_some())
            || v.iscsi.as_ref().is_some_and(|c| c.secret_ref.is_some())
            || v.flex_volume.as_ref().is_some_and(|c| c.secret_ref.is_some())
            || v.scale_io.is_some()
            || v.storageos.as_ref().is_some_and(|c| c.secret_ref.is_some())
            || v.azure_file.is_some()
            || v.cinder.as_ref().is_some_and(|c| c.secret_ref.is_some())
        {
            Some(format!(
                "{} volumes name a Secret that would resolve on the host",
                crate::pod_security::volume_type(v)
            ))
        } else if let Some(csi) = v
            .csi
            .as_ref()
            .filter(|c| !policy.allows_inline_csi_driver(&c.driver))
        {
            Some(format!(
                "csi volumes of driver {:?} reach what the driver resolves from their attributes (storage by its \
                 address, a host issuer), not what the tenant owns (policies.inlineCsiDrivers in the host agent's \
                 tenants file does not list it)",
                csi.driver
            ))
        } else if !policy.allows_inline_volume(crate::pod_security::volume_type(v)) {
            let kind = crate::pod_security::volume_type(v);
            Some(format!(
                "{kind} volumes name their storage directly and reach it with the host node's access, not through a \
                 claim of the tenant's (policies.inlineVolumes in the host agent's tenants file does not list {kind})"
            ))
        } else if v.git_repo.is_some() {
            Some("gitRepo volumes are deprecated and disabled upstream".to_string())
        } else if let Some(p) = &v.projected {
            p.sources.iter().flatten().find_map(|s| {
                if s.cluster_trust_bundle.is_some() {
                    Some("projected clusterTrustBundle sources read host objects".to_string())
                } else if s.pod_certificate.is_some() {
                    Some("projected podCertificate sources are issued by the host".to_string())
                } else {
                    None
                }
            })
        } else if crate::pod_security::volume_type(v) == "unknown" {
            Some("its volume type is not known to rcsync".to_string())
        } else {
            None
        };
        if let Some(why) = why {
            problems.push(format!("volume {name:?}: {why}"));
        }
    }
    for v in spec.volumes.iter().flatten() {
        let projected = v.projected.iter().flat_map(|p| p.sources.iter().flatten());
        let files = v
            .downward_api
            .iter()
            .flat_map(|d| d.items.iter().flatten())
            .chain(
                projected
                    .filter_map(|s| s.downward_api.as_ref())
                    .flat_map(|d| d.items.iter().flatten()),
            );
        for file in files {
            let path = file.field_ref.as_ref().map(|f| f.field_path.as_str());
            if let Some(whole @ ("metadata.labels" | "metadata.annotations")) = path {
                problems.push(format!(
                    "volume {:?}: downwardAPI item {:?} reads all of {whole}, which the host Pod does not carry (single keys, {whole}['key'], are mapped)",
                    v.name, file.path
                ));
            }
        }
    }
    if spec.resource_claims.as_ref().is_some_and(|c| !c.is_empty()) {
        problems.push("resourceClaims: resource claims are not synced to the host".to_string());
    }
    if spec.scheduling_group.is_some() {
        problems.push("schedulingGroup: scheduling groups are not synced to the host".to_string());
    }
    // What `scope_pod_selectors` left as it was: a term selecting namespaces by their labels.
    let affinity = spec.affinity.as_ref();
    let kinds = [
        (
            "podAffinity",
            affinity.and_then(|a| a.pod_affinity.as_ref()).map(|a| {
                (
                    &a.required_during_scheduling_ignored_during_execution,
                    &a.preferred_during_scheduling_ignored_during_execution,
                )
            }),
        ),
        (
            "podAntiAffinity",
            affinity.and_then(|a| a.pod_anti_affinity.as_ref()).map(|a| {
                (
                    &a.required_during_scheduling_ignored_during_execution,
                    &a.preferred_during_scheduling_ignored_during_execution,
                )
            }),
        ),
    ];
    for (kind, terms) in kinds {
        let Some((required, preferred)) = terms else {
            continue;
        };
        let named = required
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, t)| (format!("requiredDuringSchedulingIgnoredDuringExecution[{i}]"), t))
            .chain(preferred.iter().flatten().enumerate().map(|(i, w)| {
                (
                    format!("preferredDuringSchedulingIgnoredDuringExecution[{i}].podAffinityTerm"),
                    &w.pod_affinity_term,
                )
            }));
        for (field, term) in named {
            if term.namespace_selector.is_some() {
                problems.push(format!(
                    "affinity.{kind}.{field}.namespaceSelector: namespaces selected by their labels cannot be resolved on the host (list them in namespaces, or select all with an empty namespaceSelector)"
                ));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{pod_with, tenant};
    use super::super::host_pod;
    use super::*;

    /// Each type `policies.inlineVolumes` may list is a volume source the host agent tells apart,
    /// refused at baseline and allowed once listed: a misspelt entry would grant nothing.
    #[test]
    fn every_inline_volume_type_is_refused_until_listed() {
        for kind in rcsync_core::InlineVolumeType::ALL {
            // The fields each source requires, as the API does.
            let source = match kind {
                "awsElasticBlockStore" | "cinder" | "portworxVolume" => serde_json::json!({"volumeID": "v"}),
                "azureDisk" => serde_json::json!({"diskName": "d", "diskURI": "u"}),
                "cephfs" => serde_json::json!({"monitors": ["m"]}),
                "flexVolume" => serde_json::json!({"driver": "d"}),
                "gcePersistentDisk" => serde_json::json!({"pdName": "p"}),
                "glusterfs" => serde_json::json!({"endpoints": "e", "path": "p"}),
                "iscsi" => serde_json::json!({"targetPortal": "t", "iqn": "q", "lun": 0}),
                "nfs" => serde_json::json!({"server": "s", "path": "/p"}),
                "photonPersistentDisk" => serde_json::json!({"pdID": "p"}),
                "quobyte" => serde_json::json!({"registry": "r", "volume": "v"}),
                "rbd" => serde_json::json!({"monitors": ["m"], "image": "i"}),
                "vsphereVolume" => serde_json::json!({"volumePath": "p"}),
                _ => serde_json::json!({}),
            };
            let volume: k8s_openapi::api::core::v1::Volume =
                serde_json::from_value(serde_json::json!({"name": "v", kind: source})).unwrap();
            assert_eq!(crate::pod_security::volume_type(&volume), kind);
            let spec = PodSpec {
                volumes: Some(vec![volume]),
                ..PodSpec::default()
            };
            let problems = unsupported(&spec, &PodPolicy::default());
            assert!(
                problems
                    .iter()
                    .any(|p| p.contains("policies.inlineVolumes") || p.contains("name a Secret")),
                "{kind}: {problems:?}"
            );
            let mut granted = PodPolicy::default();
            granted
                .inline_volumes
                .insert(rcsync_core::InlineVolumeType::parse(kind).unwrap());
            assert!(
                !unsupported(&spec, &granted)
                    .iter()
                    .any(|p| p.contains("policies.inlineVolumes")),
                "{kind} once listed"
            );
        }
    }

    #[test]
    fn a_downward_api_volume_of_all_labels_or_annotations_is_refused_with_the_item_named() {
        let pod = pod_with(serde_json::json!({
            "containers": [{"name": "c"}],
            "volumes": [
                {"name": "info", "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
                {"name": "p", "projected": {"sources": [{"downwardAPI": {"items": [
                    {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}]}}]}}]
        }));
        let host = host_pod(&pod, &tenant(), "").unwrap();
        assert_eq!(
            unsupported(host.spec.as_ref().unwrap(), &PodPolicy::default()),
            [
                "volume \"info\": downwardAPI item \"labels\" reads all of metadata.labels, which the host Pod does not carry (single keys, metadata.labels['key'], are mapped)",
                "volume \"p\": downwardAPI item \"annotations\" reads all of metadata.annotations, which the host Pod does not carry (single keys, metadata.annotations['key'], are mapped)",
            ]
        );
    }

    #[test]
    fn what_the_host_cannot_honour_is_named() {
        let pod = pod_with(serde_json::json!({
            "containers": [{"name": "c"}],
            "volumes": [
                {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
                {"name": "ceph", "cephfs": {"monitors": ["m"], "secretRef": {"name": "host-secret"}}},
                {"name": "csi", "csi": {"driver": "d", "nodePublishSecretRef": {"name": "s"}}},
                {"name": "clone", "ephemeral": {"volumeClaimTemplate": {"spec": {"dataSource": {"kind": "PersistentVolumeClaim", "name": "x"}}}}},
                {"name": "bound", "ephemeral": {"volumeClaimTemplate": {"spec": {"volumeName": "pv-of-team-b"}}}},
                {"name": "picked", "ephemeral": {"volumeClaimTemplate": {"spec": {"selector": {"matchLabels": {"team": "b"}}}}}},
                {"name": "bundle", "projected": {"sources": [{"clusterTrustBundle": {"name": "b", "path": "p"}}]}},
                {"name": "fine", "emptyDir": {}},
                {"name": "mystery"}
            ],
            "resourceClaims": [{"name": "gpu", "resourceClaimName": "host-claim"}]
        }));
        let host = host_pod(&pod, &tenant(), "").unwrap();
        let problems = unsupported(host.spec.as_ref().unwrap(), &PodPolicy::default());
        let named: Vec<&str> = problems.iter().map(|p| p.split(':').next().unwrap()).collect();
        assert_eq!(
            named,
            [
                "volume \"data\"",
                "volume \"ceph\"",
                "volume \"csi\"",
                "volume \"clone\"",
                "volume \"bound\"",
                "volume \"picked\"",
                "volume \"bundle\"",
                "volume \"mystery\"",
                "resourceClaims"
            ],
            "{problems:#?}"
        );
        assert!(problems[0].contains("persistentVolumeClaim volumes are not synced"));
        assert!(problems[1].contains("cephfs volumes name a Secret"));
        assert_eq!(
            problems[4],
            "volume \"bound\": its claim template's volumeName names host PersistentVolume \"pv-of-team-b\", which the \
             tenant does not own: the host provisions an ephemeral volume"
        );
        assert!(problems[5].starts_with("volume \"picked\": its claim template's selector selects host"));
    }
}
