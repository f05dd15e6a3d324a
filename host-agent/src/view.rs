//! A tenant's view of the host's RuntimeClasses: what it is offered, and why the others are not.
//! Pure data and pure functions; the index keeps views current, the gRPC layer reads them.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::node::v1::RuntimeClass;
use kube::ResourceExt as _;
use rcsync_core::RuntimeClassSync;
use rcsync_core::config::SELECTOR_CONFIG_PATH;
use rcsync_core::version::content_version;
use rcsync_proto::v1::{CheckPodReason, CheckPodResponse, Resource};

use rcsync_core::patches::TenantPatches;
use rcsync_proto::convert::{synced_form, to_proto};

/// Why a host RuntimeClass is, or is not, in a tenant's view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClassState {
    /// Offered to the tenant under this (virtual) name.
    Offered(String),
    /// Does not match the tenant's selector.
    DoesNotMatch,
    /// Being deleted on the host: never offered.
    Terminating,
    /// A patch of the tenant failed on this class: not offered (the message says which and why).
    PatchFailed(String),
}

/// What one tenant is offered. Views compare by content, so an unchanged view wakes nobody.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TenantView {
    /// `sync.fromHost.runtimeClasses.enabled`.
    pub sync_enabled: bool,
    /// Whether Pods are gated on their runtime class (enabled and a selector is set).
    pub gates_pods: bool,
    /// Offered classes by virtual name.
    pub classes: BTreeMap<String, Arc<Resource>>,
    /// Every host class by host name, with its state for this tenant.
    pub host: BTreeMap<String, ClassState>,
    /// Virtual name → host name of every host class whose patches applied (renamed or not), so a
    /// Pod naming a class that is not offered still gets the right reason.
    pub names: BTreeMap<String, String>,
    /// Content version of the tenant's Pod policy: a change tells the virtual side to retry the
    /// Pods the host refused.
    pub pod_policy_version: String,
}

/// The content version of a tenant's Pod policy.
pub fn pod_policy_version(policy: &rcsync_core::PodPolicy) -> String {
    let tolerations: Vec<(&str, Option<&str>, Option<&str>)> = policy
        .enforce_tolerations
        .iter()
        .map(|t| (t.key.as_str(), t.value.as_deref(), t.effect.map(|e| e.as_str())))
        .collect();
    content_version(&(policy.pod_security.as_str(), tolerations, &policy.host_schedulers))
}

/// How a host class stands for a tenant, the Resource to offer when it is offered, and the
/// virtual name it has (after patches) when the patches could be applied.
pub fn evaluate(
    config: &RuntimeClassSync,
    patches: Option<&TenantPatches>,
    host: &RuntimeClass,
) -> (ClassState, Option<Arc<Resource>>, Option<String>) {
    let synced = match patches.filter(|p| !p.is_empty()) {
        None => Ok(synced_form(host)),
        Some(patches) => patch(patches, host),
    };
    let (synced, virtual_name) = match synced {
        Ok(synced) => {
            let name = synced.name_any();
            (synced, name)
        }
        Err(message) => return (ClassState::PatchFailed(message), None, None),
    };
    if host.metadata.deletion_timestamp.is_some() {
        return (ClassState::Terminating, None, Some(virtual_name));
    }
    if !config.selects(host.labels()) {
        return (ClassState::DoesNotMatch, None, Some(virtual_name));
    }
    let version = content_version(&synced);
    let resource = Resource {
        name: virtual_name.clone(),
        version,
        runtime_class: Some(to_proto(&synced)),
        host_name: host.name_any(),
    };
    (
        ClassState::Offered(virtual_name.clone()),
        Some(Arc::new(resource)),
        Some(virtual_name),
    )
}

/// The patched virtual form of a host class, checked to still be a valid RuntimeClass.
fn patch(patches: &TenantPatches, host: &RuntimeClass) -> Result<RuntimeClass, String> {
    let json = serde_json::to_value(synced_form(host)).expect("a RuntimeClass serializes");
    let patched = patches.to_virtual(&json).map_err(|e| e.to_string())?;
    let typed: RuntimeClass = serde_json::from_value(patched)
        .map_err(|e| format!("the patched object is not a valid RuntimeClass: {e}"))?;
    let name = typed.metadata.name.clone().unwrap_or_default();
    rcsync_core::labels::validate_dns1123_subdomain(&name)
        .map_err(|e| format!("the patched name {name:?} is not a valid RuntimeClass name: {e}"))?;
    if typed.handler.is_empty() {
        return Err("the patched object has no handler".into());
    }
    // Normalise as the host form is, so versions only depend on content.
    Ok(synced_form(&typed))
}

impl TenantView {
    /// An empty view for a tenant's config (before any host class is known).
    pub fn empty(config: &RuntimeClassSync) -> Self {
        Self {
            sync_enabled: config.enabled,
            gates_pods: config.gates_pods(),
            ..Self::default()
        }
    }

    /// The whole view of a tenant over every host class.
    pub fn compute<'a>(
        config: &RuntimeClassSync,
        patches: Option<&TenantPatches>,
        hosts: impl IntoIterator<Item = &'a RuntimeClass>,
    ) -> Self {
        let mut view = Self::empty(config);
        for host in hosts {
            view.upsert(config, patches, host);
        }
        view
    }

    /// Re-evaluates one host class (added or changed).
    pub fn upsert(
        &mut self,
        config: &RuntimeClassSync,
        patches: Option<&TenantPatches>,
        host: &RuntimeClass,
    ) {
        let host_name = host.name_any();
        self.remove(&host_name);
        let (state, resource, virtual_name) = evaluate(config, patches, host);
        if let Some(resource) = resource {
            self.classes.insert(resource.name.clone(), resource);
        }
        if let Some(virtual_name) = virtual_name {
            self.names.insert(virtual_name, host_name.clone());
        }
        self.host.insert(host_name, state);
    }

    /// Forgets a host class (deleted).
    pub fn remove(&mut self, host_name: &str) {
        if let Some(ClassState::Offered(virtual_name)) = self.host.remove(host_name) {
            self.classes.remove(&virtual_name);
        }
        self.names.retain(|_, host| host != host_name);
    }

    /// Whether a Pod with this runtimeClassName may sync, and why. Never touches the API server.
    pub fn check_pod(&self, pod_name: &str, runtime_class_name: &str) -> CheckPodResponse {
        let allow = |reason: CheckPodReason, message: String, host_name: &str| CheckPodResponse {
            allowed: true,
            reason: reason as i32,
            message,
            host_runtime_class_name: host_name.to_string(),
        };
        let deny = |reason: CheckPodReason, message: String| CheckPodResponse {
            allowed: false,
            reason: reason as i32,
            message,
            host_runtime_class_name: String::new(),
        };
        if !self.sync_enabled {
            return allow(
                CheckPodReason::SyncDisabled,
                format!("pod {pod_name:?} may sync: runtime class sync is disabled"),
                runtime_class_name,
            );
        }
        if !self.gates_pods {
            return allow(
                CheckPodReason::NoSelector,
                format!("pod {pod_name:?} may sync: no selector is set under '{SELECTOR_CONFIG_PATH}'"),
                runtime_class_name,
            );
        }
        if runtime_class_name.is_empty() {
            return allow(
                CheckPodReason::EmptyRuntimeClassName,
                format!("pod {pod_name:?} may sync: it has no runtimeClassName"),
                "",
            );
        }
        if let Some(resource) = self.classes.get(runtime_class_name) {
            return allow(
                CheckPodReason::Matches,
                format!("pod {pod_name:?} may sync: runtime class {runtime_class_name:?} is synced"),
                &resource.host_name,
            );
        }
        // The host class behind the virtual name; a class whose patches failed has no virtual
        // name, so it is found under its host name.
        let state = match self.names.get(runtime_class_name) {
            Some(host_name) => self.host.get(host_name),
            None => self
                .host
                .get(runtime_class_name)
                .filter(|s| matches!(s, ClassState::PatchFailed(_))),
        };
        match state {
            Some(ClassState::PatchFailed(why)) => deny(
                CheckPodReason::PatchFailed,
                format!(
                    "did not sync pod {pod_name:?} to host because a patch of its runtime class {runtime_class_name:?} failed: {why}"
                ),
            ),
            Some(ClassState::Terminating) => deny(
                CheckPodReason::Terminating,
                format!(
                    "did not sync pod {pod_name:?} to host because its runtime class {runtime_class_name:?} is being deleted on the host"
                ),
            ),
            Some(_) => deny(
                CheckPodReason::DoesNotMatch,
                format!(
                    "did not sync pod {pod_name:?} to host because it does not match the selector under '{SELECTOR_CONFIG_PATH}'"
                ),
            ),
            None => deny(
                CheckPodReason::NotFound,
                format!(
                    "did not sync pod {pod_name:?} to host because its runtime class {runtime_class_name:?} does not exist on the host"
                ),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn class(name: &str, handler: &str, labels: &[(&str, &str)]) -> RuntimeClass {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "uid": format!("uid-{name}"), "resourceVersion": "7",
                "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()},
            "handler": handler,
        }))
        .unwrap()
    }

    fn config(yaml: &str) -> RuntimeClassSync {
        RuntimeClassSync::parse_vcluster_yaml(Path::new("v.yaml"), yaml).unwrap()
    }

    const SELECTOR: &str = "sync: {fromHost: {runtimeClasses: {enabled: true, selector: {matchLabels: {environment: development}}}}}";

    #[test]
    fn selector_filters_and_versions_are_content_hashes() {
        let cfg = config(SELECTOR);
        let gvisor = class("gvisor", "runsc", &[("environment", "development")]);
        let kata = class("kata", "kata", &[("environment", "production")]);
        let view = TenantView::compute(&cfg, None, [&gvisor, &kata]);
        assert_eq!(view.classes.keys().collect::<Vec<_>>(), ["gvisor"]);
        assert_eq!(view.host["kata"], ClassState::DoesNotMatch);

        // Server-managed metadata does not change the version; content does.
        let mut moved = gvisor.clone();
        moved.metadata.resource_version = Some("99".into());
        moved.metadata.uid = Some("other".into());
        assert_eq!(
            TenantView::compute(&cfg, None, [&moved]),
            TenantView::compute(&cfg, None, [&gvisor])
        );
        let mut changed = gvisor.clone();
        changed.handler = "runsc-debug".into();
        let v1 = &view.classes["gvisor"].version;
        let v2 = &TenantView::compute(&cfg, None, [&changed]).classes["gvisor"].version;
        assert_ne!(v1, v2);
    }

    #[test]
    fn check_pod_follows_the_spec() {
        let cfg = config(SELECTOR);
        let mut terminating = class("old", "x", &[("environment", "development")]);
        terminating.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            Default::default(),
        ));
        let view = TenantView::compute(
            &cfg,
            None,
            [
                &class("gvisor", "runsc", &[("environment", "development")]),
                &class("youki", "youki", &[]),
                &terminating,
            ],
        );
        let reason = |rc: &str| CheckPodReason::try_from(view.check_pod("my-pod", rc).reason).unwrap();
        assert_eq!(reason(""), CheckPodReason::EmptyRuntimeClassName);
        assert_eq!(reason("gvisor"), CheckPodReason::Matches);
        assert_eq!(reason("youki"), CheckPodReason::DoesNotMatch);
        assert_eq!(reason("nope"), CheckPodReason::NotFound);
        assert_eq!(reason("old"), CheckPodReason::Terminating);
        assert_eq!(
            view.check_pod("my-pod", "youki").message,
            "did not sync pod \"my-pod\" to host because it does not match the selector under 'sync.fromHost.runtimeClasses.selector'"
        );
        assert!(!view.check_pod("my-pod", "youki").allowed);
        assert!(view.check_pod("my-pod", "gvisor").allowed);
        assert_eq!(
            view.check_pod("my-pod", "gvisor").host_runtime_class_name,
            "gvisor"
        );

        let no_selector = TenantView::compute(
            &config("sync: {fromHost: {runtimeClasses: {enabled: true}}}"),
            None,
            [&class("x", "x", &[])],
        );
        assert!(no_selector.check_pod("p", "anything").allowed);
        assert_eq!(no_selector.classes.len(), 1, "no selector: every class is synced");
        let disabled = TenantView::compute(&config(""), None, [&class("x", "x", &[])]);
        assert!(disabled.check_pod("p", "anything").allowed);
        assert!(disabled.classes.is_empty(), "disabled: nothing is synced");
    }

    #[test]
    fn upsert_and_remove_keep_the_view_consistent() {
        let cfg = config(SELECTOR);
        let mut view = TenantView::empty(&cfg);
        view.upsert(
            &cfg,
            None,
            &class("gvisor", "runsc", &[("environment", "development")]),
        );
        assert!(view.classes.contains_key("gvisor"));
        view.upsert(
            &cfg,
            None,
            &class("gvisor", "runsc", &[("environment", "production")]),
        );
        assert!(view.classes.is_empty(), "relabelled out of the selector");
        view.remove("gvisor");
        assert!(view.host.is_empty());
    }

    #[test]
    fn patches_rename_classes_and_check_pod_follows_the_names() {
        let cfg = config(
            r#"sync: {fromHost: {runtimeClasses: {enabled: true, selector: {matchLabels: {environment: development}}, patches: [
                {path: metadata.name, expression: 'value === "gvisor" ? "sandboxed" : value === "kata" ? "vm" : value'},
                {path: metadata.labels.environment, expression: '"tenant-" + value'},
                {path: handler, expression: 'value === "broken" ? 42 : value'}]}}}"#,
        );
        let patches = rcsync_core::patches::TenantPatches::compile(
            "team-a",
            "ns",
            &cfg.patches,
            rcsync_core::script::ScriptLimits::default(),
        )
        .unwrap();
        let view = TenantView::compute(
            &cfg,
            Some(&patches),
            [
                &class("gvisor", "runsc", &[("environment", "development")]),
                &class("kata", "kata", &[("environment", "production")]),
                &class("bad", "broken", &[("environment", "development")]),
            ],
        );
        let sandboxed = &view.classes["sandboxed"];
        assert_eq!(sandboxed.host_name, "gvisor");
        assert_eq!(
            sandboxed.runtime_class.as_ref().unwrap().labels["environment"],
            "tenant-development"
        );
        assert_eq!(view.classes.len(), 1);
        let allowed = view.check_pod("p", "sandboxed");
        assert!(allowed.allowed);
        assert_eq!(
            allowed.host_runtime_class_name, "gvisor",
            "a renamed class is translated back for the host"
        );
        let reason = |rc: &str| CheckPodReason::try_from(view.check_pod("p", rc).reason).unwrap();
        assert_eq!(
            reason("vm"),
            CheckPodReason::DoesNotMatch,
            "a renamed class that does not match"
        );
        assert_eq!(
            reason("gvisor"),
            CheckPodReason::NotFound,
            "the host name is not a virtual name"
        );
        assert_eq!(reason("bad"), CheckPodReason::PatchFailed);
        assert!(
            view.check_pod("p", "bad")
                .message
                .contains("not a valid RuntimeClass"),
            "{}",
            view.check_pod("p", "bad").message
        );
    }

    #[test]
    fn host_only_annotations_are_not_synced() {
        let mut host = class("gvisor", "runsc", &[]);
        host.metadata.annotations = Some(BTreeMap::from([
            (
                "kubectl.kubernetes.io/last-applied-configuration".to_string(),
                "{}".to_string(),
            ),
            ("team".to_string(), "a".to_string()),
        ]));
        let synced = synced_form(&host);
        assert_eq!(synced.annotations().keys().collect::<Vec<_>>(), ["team"]);
        assert!(synced.metadata.uid.is_none() && synced.metadata.resource_version.is_none());
    }
}
