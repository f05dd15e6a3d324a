//! A tenant's view of the host's RuntimeClasses: what it is offered, and why the others are not.
//! Pure data and pure functions; the index keeps views current, the gRPC layer reads them.
//!
//! ```text
//!  host RuntimeClass ──once per change──► HostClass { labels, Resource + version }   (shared)
//!                                             │ stored by id in a ClassTable (copy-on-write chunks)
//!  TenantView = table snapshot + membership bits (tenants without patches share every Resource)
//!             | table snapshot + per-class Variants (tenants with patches)
//! ```
//!
//! A view is an immutable snapshot: cloning one costs a few reference counts, so the index
//! publishes a new one only to the tenants a change concerns, and a Sync stream can keep the
//! snapshot its client acknowledged to diff the next one against.

use std::collections::HashMap;
use std::hash::{Hash as _, Hasher as _};
use std::sync::Arc;

use k8s_openapi::api::node::v1::RuntimeClass;
use kube::ResourceExt as _;
use rcsync_core::RuntimeClassSync;
use rcsync_core::config::SELECTOR_CONFIG_PATH;
use rcsync_core::patches::TenantPatches;
use rcsync_core::version::content_version;
use rcsync_proto::convert::{synced_form, to_proto};
use rcsync_proto::v1::{CheckPodReason, CheckPodResponse, Resource};

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

/// Slots per chunk of a [`Slots`] array.
const CHUNK: usize = 64;

/// A copy-on-write array in chunks: a clone shares everything; setting a slot copies only the
/// chunk index and the one chunk still shared with older snapshots.
#[derive(Clone, Debug)]
pub struct Slots<T> {
    chunks: Arc<Vec<Arc<Vec<Option<T>>>>>,
}

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Self {
            chunks: Arc::new(Vec::new()),
        }
    }
}

impl<T: Clone> Slots<T> {
    /// The value in slot `i`.
    pub fn get(&self, i: u32) -> Option<&T> {
        let i = i as usize;
        self.chunks.get(i / CHUNK)?.get(i % CHUNK)?.as_ref()
    }

    /// Sets (or clears) slot `i`.
    pub fn set(&mut self, i: u32, value: Option<T>) {
        let i = i as usize;
        let chunks = Arc::make_mut(&mut self.chunks);
        while chunks.len() <= i / CHUNK {
            chunks.push(Arc::new(vec![None; CHUNK]));
        }
        Arc::make_mut(&mut chunks[i / CHUNK])[i % CHUNK] = value;
    }

    /// Every filled slot, in index order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &T)> {
        self.chunks.iter().enumerate().flat_map(|(c, chunk)| {
            chunk
                .iter()
                .enumerate()
                .filter_map(move |(i, v)| Some(((c * CHUNK + i) as u32, v.as_ref()?)))
        })
    }
}

/// A copy-on-write bit set over class ids.
#[derive(Clone, Debug, Default)]
pub struct Bits(Arc<Vec<u64>>);

impl Bits {
    /// Whether `i` is set.
    pub fn get(&self, i: u32) -> bool {
        let i = i as usize;
        self.0.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Sets or clears `i`.
    pub fn set(&mut self, i: u32, on: bool) {
        let i = i as usize;
        let words = Arc::make_mut(&mut self.0);
        if words.len() <= i / 64 {
            if !on {
                return;
            }
            words.resize(i / 64 + 1, 0);
        }
        if on {
            words[i / 64] |= 1 << (i % 64);
        } else {
            words[i / 64] &= !(1 << (i % 64));
        }
    }

    /// The set ids, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().enumerate().flat_map(|(w, word)| {
            (0..64)
                .filter(move |b| word & (1 << b) != 0)
                .map(move |b| (w * 64 + b) as u32)
        })
    }
}

/// A host RuntimeClass as every tenant shares it: normalised, converted and hashed once per
/// change of the host object.
#[derive(Debug)]
pub struct HostClass {
    /// Slot in the [`ClassTable`] (reused after the class is deleted).
    pub id: u32,
    /// The host name.
    pub name: Arc<str>,
    /// The host object's resourceVersion, to recognise an unchanged object on a relist.
    pub resource_version: Option<String>,
    /// The labels selectors match.
    pub labels: std::collections::BTreeMap<String, String>,
    /// What tenants without patches are offered; its version was computed once.
    pub resource: Arc<Resource>,
    /// Being deleted on the host.
    pub terminating: bool,
}

impl HostClass {
    /// Normalises and hashes a host object (the only per-change content hash of the index).
    pub fn new(id: u32, host: &RuntimeClass) -> Self {
        let synced = synced_form(host);
        let name = host.name_any();
        let resource = Resource {
            name: name.clone(),
            version: content_version(&synced),
            runtime_class: Some(to_proto(&synced)),
            host_name: name.clone(),
        };
        Self {
            id,
            name: name.into(),
            resource_version: host.metadata.resource_version.clone(),
            labels: synced.metadata.labels.clone().unwrap_or_default(),
            resource: Arc::new(resource),
            terminating: host.metadata.deletion_timestamp.is_some(),
        }
    }
}

/// Every host class by id, with the generation of the last change.
#[derive(Clone, Debug, Default)]
pub struct ClassTable {
    /// Classes by id.
    pub slots: Slots<Arc<HostClass>>,
    /// Bumped on every change; a view records the generation it was made at.
    pub generation: u64,
}

/// How a class stands for a tenant with patches.
#[derive(Clone, Debug, PartialEq)]
pub struct Variant {
    /// Offered or why not.
    pub state: ClassState,
    /// The patched Resource, when offered.
    pub resource: Option<Arc<Resource>>,
    /// The virtual name, when the patches applied.
    pub virtual_name: Option<Arc<str>>,
}

/// The per-class results of a tenant with patches.
#[derive(Clone, Debug, Default)]
pub struct Patched {
    variants: Slots<Arc<Variant>>,
    by_virtual: Arc<HashMap<Arc<str>, u32>>,
}

/// What one tenant is offered: an immutable snapshot.
#[derive(Clone, Debug, Default)]
pub struct TenantView {
    /// `sync.fromHost.runtimeClasses.enabled`.
    pub sync_enabled: bool,
    /// Whether Pods are gated on their runtime class (enabled and a selector is set).
    pub gates_pods: bool,
    /// Content version of the tenant's Pod policy: a change tells the virtual side to retry the
    /// Pods the host refused.
    pub pod_policy_version: String,
    /// Bumped when the tenant's config changed or the host was relisted: a stream then diffs its
    /// client's state against the whole view instead of following the change log.
    pub epoch: u64,
    table: ClassTable,
    offered: Bits,
    patched: Option<Patched>,
    count: usize,
    digest: u64,
}

/// The content version of a tenant's Pod policy: of every field of it, so a field added to the
/// policy changes the version too (the virtual agent re-applies its Pods when it changes).
pub fn pod_policy_version(policy: &rcsync_core::PodPolicy) -> String {
    content_version(policy)
}

/// A stable 64-bit hash of an offered (name, version), for the order-independent view digest.
fn entry_hash(resource: &Resource) -> u64 {
    // DefaultHasher::new() uses fixed keys: equal input, equal hash, in every process.
    let mut h = std::hash::DefaultHasher::new();
    resource.name.hash(&mut h);
    resource.version.hash(&mut h);
    h.finish()
}

/// How a host class stands for a tenant with patches.
pub fn evaluate(config: &RuntimeClassSync, patches: &TenantPatches, host: &HostClass) -> Variant {
    // The synced form, from the shared Resource (it carries exactly the synced fields).
    let host_form = host
        .resource
        .runtime_class
        .as_ref()
        .map(rcsync_proto::convert::from_proto)
        .unwrap_or_default();
    let synced = match patch(patches, &host_form) {
        Ok(synced) => synced,
        Err(message) => {
            return Variant {
                state: ClassState::PatchFailed(message),
                resource: None,
                virtual_name: None,
            };
        }
    };
    let virtual_name: Arc<str> = synced.name_any().into();
    let state = if host.terminating {
        ClassState::Terminating
    } else if !config.selects(&host.labels) {
        ClassState::DoesNotMatch
    } else {
        ClassState::Offered(virtual_name.to_string())
    };
    let resource = matches!(state, ClassState::Offered(_)).then(|| {
        Arc::new(Resource {
            name: virtual_name.to_string(),
            version: content_version(&synced),
            runtime_class: Some(to_proto(&synced)),
            host_name: host.name.to_string(),
        })
    });
    Variant {
        state,
        resource,
        virtual_name: Some(virtual_name),
    }
}

/// The patched virtual form of a host class, checked to still be a valid RuntimeClass.
fn patch(patches: &TenantPatches, synced: &RuntimeClass) -> Result<RuntimeClass, String> {
    let json = serde_json::to_value(synced).expect("a RuntimeClass serializes");
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
    pub fn empty(config: &RuntimeClassSync, has_patches: bool) -> Self {
        Self {
            sync_enabled: config.enabled,
            gates_pods: config.gates_pods(),
            patched: has_patches.then(Patched::default),
            ..Self::default()
        }
    }

    /// The whole view of a tenant over `table`.
    pub fn compute(config: &RuntimeClassSync, patches: Option<&TenantPatches>, table: &ClassTable) -> Self {
        let patches = patches.filter(|p| !p.is_empty());
        let mut view = Self::empty(config, patches.is_some());
        view.table = table.clone();
        for (_, host) in table.slots.iter() {
            view.apply(config, patches, host.id, Some(host));
        }
        view
    }

    /// Brings one class (by id) up to date: `host` is its current state, `None` when deleted.
    /// Returns whether the view changed; the caller then records the table the change came from.
    pub fn apply(
        &mut self,
        config: &RuntimeClassSync,
        patches: Option<&TenantPatches>,
        id: u32,
        host: Option<&Arc<HostClass>>,
    ) -> bool {
        match (&mut self.patched, patches.filter(|p| !p.is_empty())) {
            (Some(patched), Some(patches)) => {
                let old = patched.variants.get(id).cloned();
                let new = host.map(|h| Arc::new(evaluate(config, patches, h)));
                if old.as_deref() == new.as_deref() {
                    return false;
                }
                let by_virtual = Arc::make_mut(&mut patched.by_virtual);
                if let Some(old) = &old {
                    if let Some(name) = &old.virtual_name
                        && by_virtual.get(name) == Some(&id)
                    {
                        by_virtual.remove(name);
                    }
                    if let Some(r) = &old.resource {
                        self.digest ^= entry_hash(r);
                        self.count -= 1;
                    }
                }
                if let Some(new) = &new {
                    if let Some(name) = &new.virtual_name {
                        by_virtual.insert(name.clone(), id);
                    }
                    if let Some(r) = &new.resource {
                        self.digest ^= entry_hash(r);
                        self.count += 1;
                    }
                }
                patched.variants.set(id, new);
                true
            }
            _ => {
                let was = self
                    .offered
                    .get(id)
                    .then(|| self.table.slots.get(id))
                    .flatten()
                    .cloned();
                let now = host.filter(|h| !h.terminating && config.selects(&h.labels));
                match (&was, now) {
                    (None, None) => return false,
                    (Some(a), Some(b)) if a.resource.version == b.resource.version && a.name == b.name => {
                        return false;
                    }
                    _ => {}
                }
                if let Some(old) = was {
                    self.digest ^= entry_hash(&old.resource);
                    self.count -= 1;
                }
                if let Some(new) = now {
                    self.digest ^= entry_hash(&new.resource);
                    self.count += 1;
                }
                self.offered.set(id, now.is_some());
                true
            }
        }
    }

    /// Records that this view was made from `table` (after [`TenantView::apply`] changed it).
    pub fn set_table(&mut self, table: &ClassTable) {
        self.table = table.clone();
    }

    /// The generation of the table this view was made from.
    pub fn generation(&self) -> u64 {
        self.table.generation
    }

    /// The Resource offered for host class `id`, if any.
    pub fn offered(&self, id: u32) -> Option<&Arc<Resource>> {
        match &self.patched {
            Some(patched) => patched.variants.get(id)?.resource.as_ref(),
            None => self
                .offered
                .get(id)
                .then(|| self.table.slots.get(id).map(|h| &h.resource))
                .flatten(),
        }
    }

    /// Every offered Resource with its host class id.
    pub fn iter_offered(&self) -> Box<dyn Iterator<Item = (u32, &Arc<Resource>)> + '_> {
        match &self.patched {
            Some(patched) => Box::new(
                patched
                    .variants
                    .iter()
                    .filter_map(|(id, v)| Some((id, v.resource.as_ref()?))),
            ),
            None => Box::new(
                self.offered
                    .iter()
                    .filter_map(|id| Some((id, &self.table.slots.get(id)?.resource))),
            ),
        }
    }

    /// The names of the offered classes, sorted.
    pub fn offered_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.iter_offered().map(|(_, r)| r.name.as_str()).collect();
        names.sort_unstable();
        names
    }

    /// How many classes are offered.
    pub fn offered_count(&self) -> usize {
        self.count
    }

    /// An order-independent digest of the offered (name, version) pairs, kept current per change.
    pub fn digest(&self) -> String {
        format!("{:016x}", self.digest)
    }

    /// How `host` (the current host class) stands for this tenant.
    pub fn state_of(&self, host: &HostClass) -> ClassState {
        if let Some(patched) = &self.patched {
            return match patched.variants.get(host.id) {
                Some(v) => v.state.clone(),
                None => ClassState::DoesNotMatch,
            };
        }
        let offered = self.offered(host.id).is_some_and(|r| r.host_name == *host.name);
        if offered {
            ClassState::Offered(host.name.to_string())
        } else if host.terminating {
            ClassState::Terminating
        } else {
            ClassState::DoesNotMatch
        }
    }

    /// Whether a Pod with this runtimeClassName may sync, and why; `current` finds a host class
    /// by its name now (for the reason a class is not offered). Never touches the API server.
    pub fn check_pod(
        &self,
        pod_name: &str,
        runtime_class_name: &str,
        current: impl Fn(&str) -> Option<Arc<HostClass>>,
    ) -> CheckPodResponse {
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
        let state = match &self.patched {
            Some(patched) => {
                // By virtual name; a class whose patches failed has none and is found by its host name.
                let by_virtual = patched
                    .by_virtual
                    .get(runtime_class_name)
                    .and_then(|id| patched.variants.get(*id));
                let failed = || {
                    let host = current(runtime_class_name)?;
                    patched
                        .variants
                        .get(host.id)
                        .filter(|v| matches!(v.state, ClassState::PatchFailed(_)))
                };
                by_virtual
                    .or_else(failed)
                    .map(|v| (v.state.clone(), v.resource.clone()))
            }
            None => current(runtime_class_name).map(|host| {
                let state = self.state_of(&host);
                (state, Some(host.resource.clone()))
            }),
        };
        match state {
            Some((ClassState::Offered(_), Some(resource))) => allow(
                CheckPodReason::Matches,
                format!("pod {pod_name:?} may sync: runtime class {runtime_class_name:?} is synced"),
                &resource.host_name,
            ),
            Some((ClassState::PatchFailed(why), _)) => deny(
                CheckPodReason::PatchFailed,
                format!(
                    "did not sync pod {pod_name:?} to host because a patch of its runtime class {runtime_class_name:?} failed: {why}"
                ),
            ),
            Some((ClassState::Terminating, _)) => deny(
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
    use std::collections::BTreeMap;
    use std::path::Path;

    #[test]
    fn the_pod_policy_version_follows_every_field_of_the_policy() {
        use rcsync_core::{AnnotationPattern, InlineVolumeType, PodPolicy, PodSecurityLevel};
        let base = PodPolicy::default();
        let changes: Vec<fn(&mut PodPolicy)> = vec![
            |p| p.pod_security = PodSecurityLevel::Restricted,
            |p| p.always_pull_images = true,
            |p| {
                p.inline_volumes.insert(InlineVolumeType::parse("nfs").unwrap());
            },
            |p| p.enforce_node_selector = BTreeMap::from([("pool".into(), "a".into())]),
            |p| p.host_schedulers = vec!["batch".into()],
            |p| p.copy_annotations = vec![AnnotationPattern::parse("prometheus.io/*").unwrap()],
            |p| p.disruption_budgets = true,
            |p| p.claims = true,
        ];
        let mut versions = std::collections::BTreeSet::from([pod_policy_version(&base)]);
        for change in changes {
            let mut policy = base.clone();
            change(&mut policy);
            assert!(
                versions.insert(pod_policy_version(&policy)),
                "{policy:?} has a version of its own"
            );
        }
        assert_eq!(
            pod_policy_version(&base),
            pod_policy_version(&PodPolicy::default())
        );
    }

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

    /// A table of these classes (ids in order) and a lookup of the current class by name.
    fn table(
        classes: &[RuntimeClass],
    ) -> (
        ClassTable,
        impl Fn(&str) -> Option<Arc<HostClass>> + Clone + use<>,
    ) {
        let mut table = ClassTable::default();
        for (i, rc) in classes.iter().enumerate() {
            table
                .slots
                .set(i as u32, Some(Arc::new(HostClass::new(i as u32, rc))));
            table.generation += 1;
        }
        let lookup = {
            let table = table.clone();
            move |name: &str| {
                table
                    .slots
                    .iter()
                    .find(|(_, h)| &*h.name == name)
                    .map(|(_, h)| h.clone())
            }
        };
        (table, lookup)
    }

    const SELECTOR: &str = "sync: {fromHost: {runtimeClasses: {enabled: true, selector: {matchLabels: {environment: development}}}}}";

    #[test]
    fn selector_filters_and_versions_are_content_hashes() {
        let cfg = config(SELECTOR);
        let gvisor = class("gvisor", "runsc", &[("environment", "development")]);
        let kata = class("kata", "kata", &[("environment", "production")]);
        let (t, current) = table(&[gvisor.clone(), kata]);
        let view = TenantView::compute(&cfg, None, &t);
        assert_eq!(view.offered_names(), ["gvisor"]);
        assert_eq!(view.state_of(&current("kata").unwrap()), ClassState::DoesNotMatch);

        // Server-managed metadata does not change the version; content does.
        let mut moved = gvisor.clone();
        moved.metadata.resource_version = Some("99".into());
        moved.metadata.uid = Some("other".into());
        assert_eq!(
            HostClass::new(0, &moved).resource.version,
            HostClass::new(0, &gvisor).resource.version
        );
        let mut changed = gvisor.clone();
        changed.handler = "runsc-debug".into();
        assert_ne!(
            HostClass::new(0, &changed).resource.version,
            HostClass::new(0, &gvisor).resource.version
        );
    }

    #[test]
    fn check_pod_follows_the_spec() {
        let cfg = config(SELECTOR);
        let mut terminating = class("old", "x", &[("environment", "development")]);
        terminating.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            Default::default(),
        ));
        let (t, current) = table(&[
            class("gvisor", "runsc", &[("environment", "development")]),
            class("youki", "youki", &[]),
            terminating,
        ]);
        let view = TenantView::compute(&cfg, None, &t);
        let ask = |rc: &str| view.check_pod("my-pod", rc, current.clone());
        let reason = |rc: &str| CheckPodReason::try_from(ask(rc).reason).unwrap();
        assert_eq!(reason(""), CheckPodReason::EmptyRuntimeClassName);
        assert_eq!(reason("gvisor"), CheckPodReason::Matches);
        assert_eq!(reason("youki"), CheckPodReason::DoesNotMatch);
        assert_eq!(reason("nope"), CheckPodReason::NotFound);
        assert_eq!(reason("old"), CheckPodReason::Terminating);
        assert_eq!(
            ask("youki").message,
            "did not sync pod \"my-pod\" to host because it does not match the selector under 'sync.fromHost.runtimeClasses.selector'"
        );
        assert!(!ask("youki").allowed);
        assert!(ask("gvisor").allowed);
        assert_eq!(ask("gvisor").host_runtime_class_name, "gvisor");

        let (t, current) = table(&[class("x", "x", &[])]);
        let no_selector = TenantView::compute(
            &config("sync: {fromHost: {runtimeClasses: {enabled: true}}}"),
            None,
            &t,
        );
        assert!(no_selector.check_pod("p", "anything", current.clone()).allowed);
        assert_eq!(
            no_selector.offered_count(),
            1,
            "no selector: every class is synced"
        );
        let disabled = TenantView::compute(&config(""), None, &t);
        assert!(disabled.check_pod("p", "anything", current).allowed);
        assert_eq!(disabled.offered_count(), 0, "disabled: nothing is synced");
    }

    #[test]
    fn apply_keeps_the_view_consistent_and_reports_only_real_changes() {
        let cfg = config(SELECTOR);
        let mut view = TenantView::empty(&cfg, false);
        let dev = Arc::new(HostClass::new(
            3,
            &class("gvisor", "runsc", &[("environment", "development")]),
        ));
        assert!(view.apply(&cfg, None, 3, Some(&dev)));
        let mut t = ClassTable::default();
        t.slots.set(3, Some(dev.clone()));
        view.set_table(&t);
        assert_eq!(view.offered_names(), ["gvisor"]);
        let digest = view.digest();
        // The same content again (a new resourceVersion) changes nothing.
        let mut again = class("gvisor", "runsc", &[("environment", "development")]);
        again.metadata.resource_version = Some("8".into());
        assert!(!view.apply(&cfg, None, 3, Some(&Arc::new(HostClass::new(3, &again)))));
        let prod = Arc::new(HostClass::new(
            3,
            &class("gvisor", "runsc", &[("environment", "production")]),
        ));
        assert!(
            view.apply(&cfg, None, 3, Some(&prod)),
            "relabelled out of the selector"
        );
        assert_eq!(view.offered_count(), 0);
        assert_ne!(view.digest(), digest);
        assert!(
            !view.apply(&cfg, None, 3, None),
            "deleting a class it did not offer changes nothing"
        );
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
        let (t, current) = table(&[
            class("gvisor", "runsc", &[("environment", "development")]),
            class("kata", "kata", &[("environment", "production")]),
            class("bad", "broken", &[("environment", "development")]),
        ]);
        let view = TenantView::compute(&cfg, Some(&patches), &t);
        assert_eq!(view.offered_names(), ["sandboxed"]);
        let sandboxed = view.offered(0).unwrap();
        assert_eq!(sandboxed.host_name, "gvisor");
        assert_eq!(
            sandboxed.runtime_class.as_ref().unwrap().labels["environment"],
            "tenant-development"
        );
        let ask = |rc: &str| view.check_pod("p", rc, current.clone());
        let allowed = ask("sandboxed");
        assert!(allowed.allowed);
        assert_eq!(
            allowed.host_runtime_class_name, "gvisor",
            "a renamed class is translated back for the host"
        );
        let reason = |rc: &str| CheckPodReason::try_from(ask(rc).reason).unwrap();
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
            ask("bad").message.contains("not a valid RuntimeClass"),
            "{}",
            ask("bad").message
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
        let resource = HostClass::new(0, &host).resource.clone();
        let annotations = &resource.runtime_class.as_ref().unwrap().annotations;
        assert!(!annotations.contains_key("kubectl.kubernetes.io/last-applied-configuration"));
        assert_eq!(annotations["team"], "a");
    }

    #[test]
    fn slots_and_bits_are_copy_on_write() {
        let mut a: Slots<u32> = Slots::default();
        a.set(3, Some(3));
        a.set(200, Some(200));
        let snapshot = a.clone();
        a.set(3, None);
        assert_eq!(snapshot.get(3), Some(&3));
        assert_eq!(a.get(3), None);
        assert_eq!(a.iter().map(|(i, _)| i).collect::<Vec<_>>(), [200]);
        let mut bits = Bits::default();
        bits.set(70, true);
        let before = bits.clone();
        bits.set(70, false);
        bits.set(1, true);
        assert!(before.get(70) && !bits.get(70));
        assert_eq!(bits.iter().collect::<Vec<_>>(), [1]);
    }
}
