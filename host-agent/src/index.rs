//! The index: one watch on every host RuntimeClass feeds per-tenant views.
//!
//! ```text
//!  kube watcher(RuntimeClass) ──Init/InitApply/InitDone/Apply/Delete──► ClassIndex
//!  tenants.yaml (reload) ──────────────────────────────────────────────► ClassIndex::set_tenants
//!                                  │ per tenant: TenantView (send_if_modified: unchanged wakes nobody)
//!                                  ▼
//!                         Views ──ViewSource──► gRPC (Sync streams, CheckPod)
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use futures::StreamExt as _;
use k8s_openapi::api::node::v1::RuntimeClass;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt as _};
use rcsync_core::config::SELECTOR_CONFIG_PATH;
use rcsync_core::patches::TenantPatches;
use rcsync_core::version::content_version;
use rcsync_core::{TenantName, TenantsFile};
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::tenants::TenantTokens;
use crate::view::{ClassState, TenantView};
use rcsync_proto::convert::synced_form;

/// The tenants as loaded: their config, their tokens and their compiled patches.
#[derive(Clone, Debug, Default)]
pub struct TenantsState {
    /// The parsed tenants file.
    pub file: TenantsFile,
    /// Bearer tokens by value.
    pub tokens: TenantTokens,
    /// Compiled patches of the tenants that have any.
    pub patches: HashMap<TenantName, Arc<TenantPatches>>,
}

impl TenantsState {
    /// The compiled patches of a tenant, if it has any.
    pub fn patches_of(&self, tenant: &TenantName) -> Option<&TenantPatches> {
        self.patches.get(tenant).map(Arc::as_ref)
    }
}

/// Where the gRPC layer gets tenant views from: the seam between the Kubernetes cache and gRPC.
pub trait ViewSource: Send + Sync + 'static {
    /// Follows a tenant's view; `None` for an unknown tenant. The sender is dropped when the tenant
    /// is removed from the config.
    fn subscribe(&self, tenant: &TenantName) -> Option<watch::Receiver<Arc<TenantView>>>;

    /// Whether the host's RuntimeClasses have been listed once (views are complete).
    fn is_synced(&self) -> bool;
}

/// The per-tenant views the index publishes.
#[derive(Clone, Default)]
pub struct Views {
    senders: Arc<RwLock<HashMap<TenantName, watch::Sender<Arc<TenantView>>>>>,
    synced: Arc<std::sync::atomic::AtomicBool>,
}

impl Views {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<TenantName, watch::Sender<Arc<TenantView>>>> {
        self.senders.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<TenantName, watch::Sender<Arc<TenantView>>>> {
        self.senders.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The current view of a tenant.
    pub fn current(&self, tenant: &TenantName) -> Option<Arc<TenantView>> {
        self.read().get(tenant).map(|s| s.borrow().clone())
    }
}

impl ViewSource for Views {
    fn subscribe(&self, tenant: &TenantName) -> Option<watch::Receiver<Arc<TenantView>>> {
        self.read().get(tenant).map(watch::Sender::subscribe)
    }

    fn is_synced(&self) -> bool {
        self.synced.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// The cache of host RuntimeClasses and the views derived from it.
pub struct ClassIndex {
    hosts: BTreeMap<String, RuntimeClass>,
    /// Classes of a relist in progress (between Init and InitDone).
    relist: Option<BTreeMap<String, RuntimeClass>>,
    tenants: Arc<TenantsState>,
    views: Views,
    /// (tenant, class) → content version last reported as filtered, so each change warns once.
    filtered_reported: HashMap<(TenantName, String), String>,
    metrics: Metrics,
}

impl ClassIndex {
    /// An index with no host classes yet.
    pub fn new(tenants: Arc<TenantsState>, views: Views, metrics: Metrics) -> Self {
        let mut index = Self {
            hosts: BTreeMap::new(),
            relist: None,
            tenants: Arc::new(TenantsState::default()),
            views,
            filtered_reported: HashMap::new(),
            metrics,
        };
        index.set_tenants(tenants);
        index
    }

    /// The views this index publishes.
    pub fn views(&self) -> &Views {
        &self.views
    }

    /// Applies one watcher event.
    pub fn handle(&mut self, event: Event<RuntimeClass>) {
        match event {
            Event::Init => self.relist = Some(BTreeMap::new()),
            Event::InitApply(rc) => {
                if let Some(relist) = &mut self.relist {
                    relist.insert(rc.name_any(), rc);
                }
            }
            Event::InitDone => {
                if let Some(relist) = self.relist.take() {
                    self.hosts = relist;
                }
                self.republish_all();
                self.views
                    .synced
                    .store(true, std::sync::atomic::Ordering::Release);
            }
            Event::Apply(rc) => self.apply(rc),
            Event::Delete(rc) => self.delete(&rc.name_any()),
        }
        self.metrics.host_classes.set(self.hosts.len() as i64);
    }

    fn apply(&mut self, rc: RuntimeClass) {
        let name = rc.name_any();
        let tenants = self.tenants.clone();
        for tenant in &tenants.file.tenants {
            let patches = tenants.patches_of(&tenant.name);
            self.publish(&tenant.name, |view| {
                view.upsert(&tenant.runtime_classes, patches, &rc)
            });
        }
        self.hosts.insert(name, rc);
        self.report_filtered();
    }

    fn delete(&mut self, name: &str) {
        self.hosts.remove(name);
        for tenant in self.tenants.file.tenants.clone() {
            self.publish(&tenant.name, |view| view.remove(name));
        }
        self.filtered_reported
            .retain(|(_, class), _| class != name && *class != format!("patch:{name}"));
    }

    /// Replaces the tenants (after a reload): changed tenants are re-evaluated over every class,
    /// removed tenants lose their view (their streams end), new ones get one.
    pub fn set_tenants(&mut self, tenants: Arc<TenantsState>) {
        let old = std::mem::replace(&mut self.tenants, tenants);
        {
            let mut senders = self.views.write();
            senders.retain(|name, _| self.tenants.file.tenant(name.as_str()).is_some());
            for tenant in &self.tenants.file.tenants {
                let fresh = Arc::new(tenant_view(&self.tenants, tenant, self.hosts.values()));
                match senders.get(&tenant.name) {
                    Some(sender) => {
                        if old.file.tenant(tenant.name.as_str()) != Some(tenant) {
                            sender.send_if_modified(|v| replace_if_changed(v, fresh));
                        }
                    }
                    None => {
                        senders.insert(tenant.name.clone(), watch::channel(fresh).0);
                    }
                }
            }
        }
        self.filtered_reported
            .retain(|(tenant, _), _| old.file.tenant(tenant.as_str()).is_some());
        self.report_filtered();
    }

    fn republish_all(&mut self) {
        let tenants = self.tenants.clone();
        for tenant in &tenants.file.tenants {
            let fresh = Arc::new(tenant_view(&tenants, tenant, self.hosts.values()));
            if let Some(sender) = self.views.read().get(&tenant.name) {
                sender.send_if_modified(|v| replace_if_changed(v, fresh));
            }
        }
        self.report_filtered();
    }

    fn publish(&self, tenant: &TenantName, change: impl FnOnce(&mut TenantView)) {
        if let Some(sender) = self.views.read().get(tenant) {
            sender.send_if_modified(|current| {
                let mut next = (**current).clone();
                change(&mut next);
                replace_if_changed(current, Arc::new(next))
            });
        }
    }

    /// Warns once per change about classes a tenant's selector filters out, and updates gauges.
    fn report_filtered(&mut self) {
        let senders = self.views.read();
        for tenant in &self.tenants.file.tenants {
            let Some(sender) = senders.get(&tenant.name) else {
                continue;
            };
            let view = sender.borrow().clone();
            let label = Metrics::tenant(tenant.name.as_str());
            let mut filtered = 0;
            for (class, state) in &view.host {
                if let ClassState::PatchFailed(why) = state {
                    let key = (tenant.name.clone(), format!("patch:{class}"));
                    if self.filtered_reported.get(&key) != Some(why) {
                        tracing::warn!(tenant = %tenant.name, runtime_class = %class, error = %why, "a patch failed: the runtime class is not synced");
                        self.metrics.patch_errors_total.get_or_create(&label).inc();
                        self.filtered_reported.insert(key, why.clone());
                    }
                    continue;
                }
                if *state != ClassState::DoesNotMatch || !view.sync_enabled {
                    continue;
                }
                filtered += 1;
                let Some(host) = self.hosts.get(class) else {
                    continue;
                };
                let version = content_version(&synced_form(host));
                let key = (tenant.name.clone(), class.clone());
                if self.filtered_reported.get(&key) == Some(&version) {
                    continue;
                }
                tracing::warn!(
                    tenant = %tenant.name,
                    runtime_class = %class,
                    selector = %tenant.runtime_classes.selector.as_ref().map(ToString::to_string).unwrap_or_default(),
                    "did not sync runtime class {class:?} because it does not match the selector under '{SELECTOR_CONFIG_PATH}'"
                );
                self.metrics.filtered_total.get_or_create(&label).inc();
                self.filtered_reported.insert(key, version);
            }
            self.metrics.tenant_filtered.get_or_create(&label).set(filtered);
            self.metrics
                .tenant_classes
                .get_or_create(&label)
                .set(view.classes.len() as i64);
        }
    }
}

/// A tenant's whole view over every host class, with its Pod policy's version.
fn tenant_view<'a>(
    tenants: &TenantsState,
    tenant: &rcsync_core::Tenant,
    hosts: impl IntoIterator<Item = &'a RuntimeClass>,
) -> TenantView {
    let mut view = TenantView::compute(&tenant.runtime_classes, tenants.patches_of(&tenant.name), hosts);
    view.pod_policy_version = crate::view::pod_policy_version(&tenant.pods);
    view
}

fn replace_if_changed(current: &mut Arc<TenantView>, next: Arc<TenantView>) -> bool {
    if **current == *next {
        return false;
    }
    *current = next;
    true
}

/// Feeds the index from a watch on every host RuntimeClass until `shutdown` fires. Watch errors
/// are retried with kube-runtime's default backoff; the last good state keeps being served.
pub async fn run(
    client: Client,
    mut index: ClassIndex,
    mut tenants: watch::Receiver<Arc<TenantsState>>,
    listed: impl Fn() + Send,
    mut shutdown: watch::Receiver<bool>,
) {
    let api: Api<RuntimeClass> = Api::all(client);
    let mut events = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut announced = false;
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            changed = tenants.changed() => {
                if changed.is_err() {
                    return;
                }
                let state = tenants.borrow_and_update().clone();
                index.set_tenants(state);
            }
            event = events.next() => match event {
                Some(Ok(event)) => {
                    let done = matches!(event, Event::InitDone);
                    index.handle(event);
                    if done && !announced {
                        announced = true;
                        tracing::info!(classes = index.hosts.len(), "listed host RuntimeClasses");
                        listed();
                    }
                }
                Some(Err(e)) => tracing::warn!(error = %e, "watching host RuntimeClasses failed; retrying with backoff"),
                None => return,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn class(name: &str, labels: &[(&str, &str)]) -> RuntimeClass {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()},
            "handler": "h",
        }))
        .unwrap()
    }

    fn tenants(yaml: &str) -> Arc<TenantsState> {
        Arc::new(TenantsState {
            file: TenantsFile::parse(Path::new("t.yaml"), yaml).unwrap(),
            tokens: Default::default(),
            patches: Default::default(),
        })
    }

    const TWO: &str = "tenants:\n  - {name: a, hostNamespace: ns-a, sync: {fromHost: {runtimeClasses: {enabled: true, selector: {matchLabels: {team: a}}}}}}\n  - {name: b, hostNamespace: ns-b, sync: {fromHost: {runtimeClasses: {enabled: true}}}}\n";

    #[test]
    fn unchanged_views_wake_nobody_and_tenants_see_only_their_classes() {
        let mut registry = prometheus_client::registry::Registry::default();
        let mut index = ClassIndex::new(tenants(TWO), Views::default(), Metrics::register(&mut registry));
        let a = TenantName::new("a").unwrap();
        let b = TenantName::new("b").unwrap();
        let mut rx_a = index.views().subscribe(&a).unwrap();
        index.handle(Event::Init);
        index.handle(Event::InitApply(class("gvisor", &[("team", "a")])));
        index.handle(Event::InitApply(class("kata", &[("team", "b")])));
        index.handle(Event::InitDone);
        assert!(index.views().is_synced());
        assert!(rx_a.has_changed().unwrap());
        assert_eq!(
            rx_a.borrow_and_update().classes.keys().collect::<Vec<_>>(),
            ["gvisor"]
        );
        assert_eq!(index.views().current(&b).unwrap().classes.len(), 2);

        // A change that does not concern tenant a does not wake it.
        index.handle(Event::Apply(class("kata", &[("team", "b"), ("x", "y")])));
        assert!(!rx_a.has_changed().unwrap());
        index.handle(Event::Apply(class("kata", &[("team", "a")])));
        assert!(rx_a.has_changed().unwrap());
        assert_eq!(rx_a.borrow_and_update().classes.len(), 2);
        index.handle(Event::Delete(class("gvisor", &[])));
        assert_eq!(
            rx_a.borrow_and_update().classes.keys().collect::<Vec<_>>(),
            ["kata"]
        );
    }

    #[test]
    fn reloads_reevaluate_changed_tenants_and_drop_removed_ones() {
        let mut registry = prometheus_client::registry::Registry::default();
        let mut index = ClassIndex::new(tenants(TWO), Views::default(), Metrics::register(&mut registry));
        index.handle(Event::Init);
        index.handle(Event::InitApply(class("gvisor", &[("team", "a")])));
        index.handle(Event::InitApply(class("kata", &[("team", "b")])));
        index.handle(Event::InitDone);
        let a = TenantName::new("a").unwrap();
        let b = TenantName::new("b").unwrap();
        let mut rx_b = index.views().subscribe(&b).unwrap();
        let changed = "tenants:\n  - {name: a, hostNamespace: ns-a, sync: {fromHost: {runtimeClasses: {enabled: true, selector: {matchLabels: {team: b}}}}}}\n";
        index.set_tenants(tenants(changed));
        assert_eq!(
            index
                .views()
                .current(&a)
                .unwrap()
                .classes
                .keys()
                .collect::<Vec<_>>(),
            ["kata"]
        );
        assert!(index.views().subscribe(&b).is_none());
        assert!(
            rx_b.changed().now_or_never_err(),
            "a removed tenant's stream learns it is gone"
        );
    }

    trait NowOrNeverErr {
        fn now_or_never_err(self) -> bool;
    }

    impl<F: std::future::Future<Output = Result<(), watch::error::RecvError>>> NowOrNeverErr for F {
        fn now_or_never_err(self) -> bool {
            matches!(futures::FutureExt::now_or_never(self), Some(Err(_)))
        }
    }
}
