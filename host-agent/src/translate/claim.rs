//! A tenant's PersistentVolumeClaim made on the host: what it asks for, under the tenant's name;
//! never bound to host storage the tenant does not own.

use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimSpec, TypedLocalObjectReference,
};
use rcsync_core::Tenant;
use rcsync_core::naming::host_object_name;

use super::{copy_metadata, held_identity, identity_annotations};

/// Why a virtual PersistentVolumeClaim has no host claim.
#[derive(Debug, PartialEq, Eq)]
pub enum ClaimProblem {
    /// The request is malformed (no name, namespace or uid): the caller's bug.
    Invalid(String),
    /// The claim cannot be made on the host as it stands: a refusal the tenant sees.
    Unsupported(String),
}

/// The host PersistentVolumeClaim of a virtual one of `tenant`: named, labelled and annotated as
/// the tenant's other host objects, with the access modes, storage request, class, volume mode
/// and volume attributes class it asks for. A claim binding host storage the tenant does not own
/// is refused: one naming a volume (`volumeName`), selecting volumes by their labels
/// (`selector`), or cloned from anything but another claim of its own namespace, whose host
/// claim (the tenant's own copy) is the host clone's source. Returns the host claim and the
/// virtual name of the claim it clones, if any (the caller checks that host claim is the
/// tenant's).
pub fn host_claim(
    virtual_claim: &PersistentVolumeClaim,
    tenant: &Tenant,
) -> Result<(PersistentVolumeClaim, Option<String>), ClaimProblem> {
    let meta = &virtual_claim.metadata;
    let (name, namespace, uid) =
        held_identity(meta, "PersistentVolumeClaim").map_err(ClaimProblem::Invalid)?;
    let spec = virtual_claim.spec.clone().unwrap_or_default();
    if spec.volume_name.as_deref().is_some_and(|v| !v.is_empty()) {
        return Err(ClaimProblem::Unsupported(
            "spec.volumeName names a host PersistentVolume, which the tenant does not own: the host provisions the \
             claim's volume"
                .into(),
        ));
    }
    if spec.selector.is_some() {
        return Err(ClaimProblem::Unsupported(
            "spec.selector selects host PersistentVolumes by their labels, which the tenant does not own: the host \
             provisions the claim's volume"
                .into(),
        ));
    }
    // A clone of another claim of the same namespace only (dataSource, or dataSourceRef without a
    // namespace): its source becomes that claim's host copy.
    let mut source = None;
    let data_source = match (&spec.data_source, &spec.data_source_ref) {
        (None, None) => None,
        (from, from_ref) => {
            let (kind, group, source_name, source_namespace) = match (from, from_ref) {
                (_, Some(r)) => (&r.kind, &r.api_group, &r.name, r.namespace.as_deref()),
                (Some(d), None) => (&d.kind, &d.api_group, &d.name, None),
                (None, None) => unreachable!("matched above"),
            };
            let core = group.as_deref().is_none_or(str::is_empty);
            if kind != "PersistentVolumeClaim" || !core || source_namespace.is_some_and(|ns| ns != namespace)
            {
                return Err(ClaimProblem::Unsupported(format!(
                    "its data source ({kind} {source_name}) would name a host object: only a clone of another \
                     PersistentVolumeClaim of its namespace is synced"
                )));
            }
            source = Some(source_name.clone());
            Some(TypedLocalObjectReference {
                api_group: None,
                kind: kind.clone(),
                name: host_object_name(source_name, &namespace, tenant.name.as_str()),
            })
        }
    };
    let mut metadata = copy_metadata(&name, &namespace, tenant);
    metadata.annotations = Some(identity_annotations(&name, &namespace, Some(&uid)));
    let claim = PersistentVolumeClaim {
        metadata,
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: spec.access_modes,
            resources: spec.resources,
            storage_class_name: spec.storage_class_name,
            volume_mode: spec.volume_mode,
            volume_attributes_class_name: spec.volume_attributes_class_name,
            data_source,
            ..Default::default()
        }),
        status: None,
    };
    Ok((claim, source))
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::tenant;
    use super::*;
    use rcsync_core::naming::{ANNOTATION_OBJECT_UID, LABEL_MANAGED_BY};

    fn claim(spec: serde_json::Value) -> PersistentVolumeClaim {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "data", "namespace": "shop", "uid": "c-1", "labels": {"app": "db"}},
            "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn a_host_claim_asks_for_what_the_virtual_one_does_under_the_tenants_name() {
        let spec = serde_json::json!({
            "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}},
            "storageClassName": "fast", "volumeMode": "Filesystem",
        });
        let (host, source) = host_claim(&claim(spec), &tenant()).unwrap();
        assert_eq!(source, None);
        assert_eq!(host.metadata.name.as_deref(), Some("data-x-shop-x-team-a"));
        assert_eq!(host.metadata.namespace.as_deref(), Some("vc-team-a"));
        assert_eq!(host.metadata.labels.as_ref().unwrap()[LABEL_MANAGED_BY], "team-a");
        assert!(
            !host.metadata.labels.as_ref().unwrap().contains_key("app"),
            "virtual labels stay"
        );
        assert_eq!(
            host.metadata.annotations.as_ref().unwrap()[ANNOTATION_OBJECT_UID],
            "c-1"
        );
        let host_spec = host.spec.unwrap();
        assert_eq!(host_spec.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(host_spec.access_modes, Some(vec!["ReadWriteOnce".to_string()]));

        // A clone of another claim of its namespace: the source is that claim's host copy.
        let clone = serde_json::json!({
            "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}},
            "dataSourceRef": {"kind": "PersistentVolumeClaim", "name": "seed"},
        });
        let (host, source) = host_claim(&claim(clone), &tenant()).unwrap();
        assert_eq!(source.as_deref(), Some("seed"));
        let from = host.spec.unwrap().data_source.unwrap();
        assert_eq!(
            (from.kind.as_str(), from.name.as_str()),
            ("PersistentVolumeClaim", "seed-x-shop-x-team-a")
        );
    }

    #[test]
    fn a_claim_that_would_bind_host_storage_the_tenant_does_not_own_is_refused_naming_why() {
        let refused = |spec: serde_json::Value| match host_claim(&claim(spec), &tenant()) {
            Err(ClaimProblem::Unsupported(message)) => message,
            other => panic!("not refused: {other:?}"),
        };
        assert!(
            refused(serde_json::json!({"volumeName": "pv-of-team-b"}))
                .starts_with("spec.volumeName names a host")
        );
        assert!(
            refused(serde_json::json!({"selector": {"matchLabels": {"team": "b"}}}))
                .starts_with("spec.selector")
        );
        assert!(
            refused(serde_json::json!({"dataSource": {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "snap"}}))
                .contains("(VolumeSnapshot snap) would name a host object")
        );
        assert!(
            refused(serde_json::json!({"dataSourceRef": {"kind": "PersistentVolumeClaim", "name": "db", "namespace": "other"}}))
                .contains("only a clone of another PersistentVolumeClaim of its namespace")
        );
        let mut nameless = claim(serde_json::json!({}));
        nameless.metadata.uid = None;
        assert!(matches!(
            host_claim(&nameless, &tenant()),
            Err(ClaimProblem::Invalid(_))
        ));
    }
}
