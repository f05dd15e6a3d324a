//! The tenant's host copies of the ConfigMaps and Secrets its Pods reference: the data and the
//! virtual identity, nothing of the virtual metadata.

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use rcsync_core::Tenant;

use super::{TranslateError, copy_metadata, object_identity};

/// The host copy of a virtual ConfigMap a Pod of `tenant` references.
pub fn host_config_map(virtual_cm: &ConfigMap, tenant: &Tenant) -> Result<ConfigMap, TranslateError> {
    let (name, namespace) = object_identity(&virtual_cm.metadata)?;
    Ok(ConfigMap {
        metadata: copy_metadata(&name, &namespace, tenant),
        data: virtual_cm.data.clone(),
        binary_data: virtual_cm.binary_data.clone(),
        immutable: None,
    })
}

/// The host copy of a virtual Secret a Pod of `tenant` references. A service-account token Secret
/// becomes `Opaque`: on the host its type would make the token controller fill in a host token.
pub fn host_secret(virtual_secret: &Secret, tenant: &Tenant) -> Result<Secret, TranslateError> {
    let (name, namespace) = object_identity(&virtual_secret.metadata)?;
    let type_ = match virtual_secret.type_.as_deref() {
        Some("kubernetes.io/service-account-token") | None => Some("Opaque".to_string()),
        other => other.map(str::to_string),
    };
    Ok(Secret {
        metadata: copy_metadata(&name, &namespace, tenant),
        data: virtual_secret.data.clone(),
        // stringData is write-only in the API; fold it in as the API server would.
        string_data: virtual_secret.string_data.clone(),
        type_,
        immutable: None,
    })
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{tenant, tenant_with};
    use super::super::recorded_holder;
    use super::*;

    #[test]
    fn copies_carry_the_data_and_the_identity_not_the_virtual_metadata() {
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "token", "namespace": "shop", "labels": {"app": "x"},
                "annotations": {"kubernetes.io/service-account.name": "default"}},
            "type": "kubernetes.io/service-account-token",
            "data": {"token": "dmlydHVhbA=="}
        }))
        .unwrap();
        let copy = host_secret(&secret, &tenant()).unwrap();
        assert_eq!(copy.metadata.name.as_deref(), Some("token-x-shop-x-team-a"));
        assert_eq!(copy.metadata.namespace.as_deref(), Some("vc-team-a"));
        assert_eq!(
            copy.type_.as_deref(),
            Some("Opaque"),
            "the host's token controller must never fill a copy with a host token"
        );
        let annotations = copy.metadata.annotations.clone().unwrap();
        assert!(!annotations.contains_key("kubernetes.io/service-account.name"));
        assert_eq!(copy.data, secret.data);
        assert_eq!(
            recorded_holder(&copy.metadata, &tenant()),
            Some(("shop".into(), "token".into()))
        );
        let other = tenant_with("").name.clone();
        assert_eq!(other.as_str(), "team-a");
        let mut foreign = copy.metadata.clone();
        foreign.labels = None;
        assert_eq!(
            recorded_holder(&foreign, &tenant()),
            None,
            "not written by rcsync for this tenant"
        );
        let cm: ConfigMap = serde_json::from_value(
            serde_json::json!({"metadata": {"name": "cfg", "namespace": "shop"}, "data": {"a": "1"}, "immutable": true}),
        )
        .unwrap();
        let copy = host_config_map(&cm, &tenant()).unwrap();
        assert_eq!(copy.data, cm.data);
        assert_eq!(copy.immutable, None, "copies stay updatable");
    }
}
