//! The index: one watch on every host RuntimeClass feeds per-tenant views.
//!
//! ```text
//!  kube watcher(RuntimeClass) ──events, in batches──► ClassIndex
//!        one HostClass per change (normalised + hashed once) ──► ClassTable (id → class) + ChangeLog
//!        per tenant: membership decision; a new TenantView snapshot only where it changed
//!  tenants.yaml (reload) ──► ClassIndex::set_tenants: only changed tenants are rebuilt
//!                                  ▼
//!                         Views ──ViewSource──► gRPC (Sync streams follow the ChangeLog, CheckPod)
//! ```

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};

use futures::StreamExt as _;
use k8s_openapi::api::node::v1::RuntimeClass;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt as _};
use rcsync_core::config::SELECTOR_CONFIG_PATH;
use rcsync_core::kube_client::RetryWithBackoff as _;
use rcsync_core::patches::TenantPatches;
use rcsync_core::{Tenant, TenantName, TenantsFile};
use rcsync_proto::v1::CheckPodResponse;
use tokio::sync::watch;

use crate::metrics::{Metrics, TenantSeries};
use crate::tenants::TenantTokens;
use crate::view::{ClassState, ClassTable, HostClass, TenantView};

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

    /// May a Pod of `tenant` with this runtimeClassName sync? `None` for an unknown tenant.
    /// Answered from memory.
    fn check_pod(
        &self,
        tenant: &TenantName,
        pod_name: &str,
        runtime_class_name: &str,
    ) -> Option<CheckPodResponse>;

    /// The host classes that changed between two table generations, as ids (`None` when the
    /// log no longer reaches back that far: diff the whole view instead).
    fn changed_between(&self, from: u64, to: u64) -> Option<Vec<u32>>;
}

/// How many changes the log keeps for streams that are behind.
const LOG_CAPACITY: usize = 1 << 16;

/// The ids of the host classes changed at each table generation, newest last.
#[derive(Debug, Default)]
pub struct ChangeLog {
    entries: VecDeque<(u64, u32)>,
}

impl ChangeLog {
    fn push(&mut self, generation: u64, id: u32) {
        if self.entries.len() == LOG_CAPACITY {
            self.entries.pop_front();
        }
        self.entries.push_back((generation, id));
    }

    /// Ids changed in generations `(from, to]`; `None` when entries after `from` were dropped.
    pub fn between(&self, from: u64, to: u64) -> Option<Vec<u32>> {
        if from >= to {
            return Some(Vec::new());
        }
        let oldest = self.entries.front().map(|(g, _)| *g)?;
        if oldest > from + 1 {
            return None;
        }
        let start = self.entries.partition_point(|(g, _)| *g <= from);
        Some(
            self.entries
                .range(start..)
                .take_while(|(g, _)| *g <= to)
                .map(|(_, id)| *id)
                .collect(),
        )
    }
}

type Senders = HashMap<TenantName, watch::Sender<Arc<TenantView>>>;

/// The per-tenant views the index publishes, the current host classes by name (for CheckPod's
/// reasons), and the change log. Cheap to clone.
#[derive(Clone, Default)]
pub struct Views {
    senders: Arc<RwLock<Senders>>,
    current: Arc<RwLock<HashMap<Arc<str>, Arc<HostClass>>>>,
    log: Arc<Mutex<ChangeLog>>,
    synced: Arc<std::sync::atomic::AtomicBool>,
}

impl Views {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Senders> {
        self.senders.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Senders> {
        self.senders.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The current view of a tenant.
    pub fn current(&self, tenant: &TenantName) -> Option<Arc<TenantView>> {
        self.read().get(tenant).map(|s| s.borrow().clone())
    }

    /// The current host class of that name.
    pub fn host_class(&self, name: &str) -> Option<Arc<HostClass>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Every current host class, by name.
    pub fn host_classes(&self) -> Vec<Arc<HostClass>> {
        let mut all: Vec<_> = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }
}

impl ViewSource for Views {
    fn subscribe(&self, tenant: &TenantName) -> Option<watch::Receiver<Arc<TenantView>>> {
        self.read().get(tenant).map(watch::Sender::subscribe)
    }

    fn is_synced(&self) -> bool {
        self.synced.load(std::sync::atomic::Ordering::Acquire)
    }

    fn check_pod(
        &self,
        tenant: &TenantName,
        pod_name: &str,
        runtime_class_name: &str,
    ) -> Option<CheckPodResponse> {
        let view = self.read().get(tenant)?.borrow().clone();
        Some(view.check_pod(pod_name, runtime_class_name, |name| self.host_class(name)))
    }

    fn changed_between(&self, from: u64, to: u64) -> Option<Vec<u32>> {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .between(from, to)
    }
}

/// The cache of host RuntimeClasses and the views derived from it. Work per host change: one
/// normalisation and hash of the class, one membership decision per tenant, and a new snapshot
/// only for the tenants whose view changed.
pub struct ClassIndex {
    table: ClassTable,
    ids: HashMap<Arc<str>, u32>,
    free_ids: Vec<u32>,
    next_id: u32,
    /// Classes of a relist in progress (between Init and InitDone): name, and the new form
    /// unless the stored one is of the same resourceVersion.
    relist: Option<Vec<(Arc<str>, Option<HostClass>)>>,
    tenants: Arc<TenantsState>,
    /// The last view published to each tenant.
    published: HashMap<TenantName, Arc<TenantView>>,
    /// Each tenant's metric series, looked up once when the tenant appears.
    series: HashMap<TenantName, TenantSeries>,
    views: Views,
    metrics: Metrics,
}

impl ClassIndex {
    /// An index with no host classes yet.
    pub fn new(tenants: Arc<TenantsState>, views: Views, metrics: Metrics) -> Self {
        let mut index = Self {
            table: ClassTable::default(),
            ids: HashMap::new(),
            free_ids: Vec::new(),
            next_id: 0,
            relist: None,
            tenants: Arc::new(TenantsState::default()),
            published: HashMap::new(),
            series: HashMap::new(),
            views,
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
        self.handle_batch(vec![event]);
    }

    /// Applies watcher events in order; the changes of consecutive Apply/Delete events reach each
    /// tenant as one new view.
    pub fn handle_batch(&mut self, events: Vec<Event<RuntimeClass>>) {
        let mut changed: Vec<u32> = Vec::new();
        for event in events {
            match event {
                Event::Apply(rc) => changed.push(self.upsert(&rc)),
                Event::Delete(rc) => changed.extend(self.remove(&rc.name_any())),
                other => {
                    self.publish_changes(&std::mem::take(&mut changed));
                    self.handle_list(other);
                }
            }
        }
        self.publish_changes(&changed);
        self.metrics.host_classes.set(self.ids.len() as i64);
    }

    fn handle_list(&mut self, event: Event<RuntimeClass>) {
        match event {
            Event::Init => self.relist = Some(Vec::new()),
            Event::InitApply(rc) => {
                let name: Arc<str> = rc.name_any().into();
                let unchanged = self
                    .ids
                    .get(&name)
                    .and_then(|id| self.table.slots.get(*id))
                    .is_some_and(|h| {
                        h.resource_version.is_some() && h.resource_version == rc.metadata.resource_version
                    });
                // Normalised at once: the full object (managedFields and all) is not kept.
                let fresh = (!unchanged).then(|| HostClass::new(u32::MAX, &rc));
                if let Some(relist) = &mut self.relist {
                    relist.push((name, fresh));
                }
            }
            Event::InitDone => {
                if let Some(relist) = self.relist.take() {
                    self.replace_all(relist);
                }
                self.views
                    .synced
                    .store(true, std::sync::atomic::Ordering::Release);
            }
            Event::Apply(_) | Event::Delete(_) => unreachable!("handled by handle_batch"),
        }
    }

    /// Stores a new version of a class; returns its id. The only content hash per change.
    fn upsert(&mut self, rc: &RuntimeClass) -> u32 {
        self.store(HostClass::new(u32::MAX, rc))
    }

    /// Stores a normalised class under its id (a new one for a new name); returns the id.
    fn store(&mut self, mut host: HostClass) -> u32 {
        let name = host.name.clone();
        let id = match self.ids.get(&name) {
            Some(id) => *id,
            None => {
                let id = self.free_ids.pop().unwrap_or_else(|| {
                    self.next_id += 1;
                    self.next_id - 1
                });
                self.ids.insert(name.clone(), id);
                id
            }
        };
        host.id = id;
        let host = Arc::new(host);
        self.metrics.class_versions_total.inc();
        self.table.generation += 1;
        self.table.slots.set(id, Some(host.clone()));
        self.log_change(id);
        self.views
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name, host);
        id
    }

    fn remove(&mut self, name: &str) -> Option<u32> {
        let id = self.ids.remove(name)?;
        self.free_ids.push(id);
        self.table.generation += 1;
        self.table.slots.set(id, None);
        self.log_change(id);
        self.views
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        Some(id)
    }

    fn log_change(&self, id: u32) {
        self.views
            .log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(self.table.generation, id);
    }

    /// Re-evaluates changed classes for every tenant; publishes one new view to each tenant
    /// whose view changed, none to the others.
    fn publish_changes(&mut self, ids: &[u32]) {
        if ids.is_empty() {
            return;
        }
        // Each class once, in its final state: applying one twice against the view's previous
        // table would count it twice in the view's digest.
        let mut seen = std::collections::HashSet::new();
        let hosts: Vec<(u32, Option<Arc<HostClass>>)> = ids
            .iter()
            .filter(|id| seen.insert(**id))
            .map(|id| (*id, self.table.slots.get(*id).cloned()))
            .collect();
        let tenants = self.tenants.clone();
        for tenant in tenants.file.tenants() {
            let Some(current) = self.published.get(&tenant.name) else {
                continue;
            };
            let mut next = (**current).clone();
            let patches = tenants.patches_of(&tenant.name);
            let mut changed = false;
            for (id, host) in &hosts {
                changed |= next.apply(&tenant.runtime_classes, patches, *id, host.as_ref());
            }
            if changed {
                next.set_table(&self.table);
            }
            // Judged on the view with its table current, so a new offered class is not
            // mistaken for a filtered one.
            for host in hosts.iter().filter_map(|(_, h)| h.as_ref()) {
                self.warn_if_filtered(tenant, &next, host);
            }
            if changed {
                self.publish(tenant, next);
            }
        }
    }

    /// Logs once per change of a class that a tenant does not get, and why.
    fn warn_if_filtered(&self, tenant: &Tenant, view: &TenantView, host: &HostClass) {
        if !view.sync_enabled {
            return;
        }
        let series = self.series.get(&tenant.name);
        match view.state_of(host) {
            ClassState::DoesNotMatch => {
                let class = &host.name;
                tracing::warn!(
                    tenant = %tenant.name,
                    runtime_class = %class,
                    selector = %tenant.runtime_classes.selector.as_ref().map(ToString::to_string).unwrap_or_default(),
                    "did not sync runtime class {class:?} because it does not match the selector under '{SELECTOR_CONFIG_PATH}'"
                );
                if let Some(series) = series {
                    series.filtered_total.inc();
                }
            }
            ClassState::PatchFailed(why) => {
                tracing::warn!(tenant = %tenant.name, runtime_class = %host.name, error = %why, "a patch failed: the runtime class is not synced");
                if let Some(series) = series {
                    series.patch_errors_total.inc();
                }
            }
            ClassState::Offered(_) | ClassState::Terminating => {}
        }
    }

    fn publish(&mut self, tenant: &Tenant, view: TenantView) {
        if let Some(series) = self.series.get(&tenant.name) {
            series.classes.set(view.offered_count() as i64);
            let filtered = if view.sync_enabled {
                self.ids.len().saturating_sub(view.offered_count())
            } else {
                0
            };
            series.filtered.set(filtered as i64);
        }
        self.metrics.view_updates_total.inc();
        let view = Arc::new(view);
        self.published.insert(tenant.name.clone(), view.clone());
        if let Some(sender) = self.views.read().get(&tenant.name) {
            sender.send_replace(view);
        }
    }

    /// Replaces every class after a (re)list: unchanged objects keep their normalised form;
    /// every tenant's view is rebuilt (its streams diff in full once).
    fn replace_all(&mut self, listed: Vec<(Arc<str>, Option<HostClass>)>) {
        let mut seen: HashMap<Arc<str>, ()> = HashMap::new();
        let mut changed: Vec<u32> = Vec::new();
        for (name, fresh) in listed {
            seen.insert(name, ());
            if let Some(host) = fresh {
                changed.push(self.store(host));
            }
        }
        let gone: Vec<Arc<str>> = self
            .ids
            .keys()
            .filter(|n| !seen.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            self.remove(&name);
        }
        let tenants = self.tenants.clone();
        for tenant in tenants.file.tenants() {
            let epoch = self.published.get(&tenant.name).map_or(0, |v| v.epoch) + 1;
            let mut view = self.rebuild(tenant);
            view.epoch = epoch;
            for id in &changed {
                if let Some(host) = self.table.slots.get(*id) {
                    self.warn_if_filtered(tenant, &view, host);
                }
            }
            self.publish(tenant, view);
        }
    }

    /// A tenant's whole view over every class, with its Pod policy's version.
    fn rebuild(&self, tenant: &Tenant) -> TenantView {
        self.metrics.view_rebuilds_total.inc();
        let mut view = TenantView::compute(
            &tenant.runtime_classes,
            self.tenants.patches_of(&tenant.name),
            &self.table,
        );
        view.pod_policy_version = crate::view::pod_policy_version(&tenant.pods);
        view
    }

    /// Replaces the tenants (after a reload): only tenants whose config changed are rebuilt,
    /// removed tenants lose their view (their streams end), new ones get one. The views lock is
    /// held only to swap senders, never while views are computed.
    pub fn set_tenants(&mut self, tenants: Arc<TenantsState>) {
        let old = std::mem::replace(&mut self.tenants, tenants);
        let tenants = self.tenants.clone();
        let mut fresh: Vec<(&Tenant, TenantView)> = Vec::new();
        for tenant in tenants.file.tenants() {
            let unchanged = old.file.tenant(tenant.name.as_str()) == Some(tenant)
                && self.published.contains_key(&tenant.name);
            if unchanged {
                continue;
            }
            let mut view = self.rebuild(tenant);
            view.epoch = self.published.get(&tenant.name).map_or(0, |v| v.epoch) + 1;
            fresh.push((tenant, view));
        }
        self.published
            .retain(|name, _| tenants.file.tenant(name.as_str()).is_some());
        // Every series of a tenant exported from the start (as 0), so "never connected" shows as
        // well as "disconnected" and rate() works from the first scrape.
        let metrics = &self.metrics;
        self.series.retain(|name, _| {
            let kept = tenants.file.tenant(name.as_str()).is_some();
            if !kept {
                metrics.forget_tenant(name.as_str());
            }
            kept
        });
        for tenant in tenants.file.tenants() {
            self.series
                .entry(tenant.name.clone())
                .or_insert_with(|| self.metrics.tenant_series(tenant.name.as_str()));
        }
        {
            let mut senders = self.views.write();
            senders.retain(|name, _| tenants.file.tenant(name.as_str()).is_some());
            for (tenant, _) in &fresh {
                senders
                    .entry(tenant.name.clone())
                    .or_insert_with(|| watch::channel(Arc::new(TenantView::default())).0);
            }
        }
        for (tenant, view) in fresh {
            self.publish(tenant, view);
        }
    }
}

/// Takes every event the stream has ready (at most `max`) after the first, so a burst is applied
/// in one go.
async fn next_batch<S>(events: &mut S, max: usize) -> Option<Vec<S::Item>>
where
    S: futures::Stream + Unpin,
{
    let first = events.next().await?;
    let mut batch = vec![first];
    while batch.len() < max {
        match futures::FutureExt::now_or_never(events.next()) {
            Some(Some(event)) => batch.push(event),
            _ => break,
        }
    }
    Some(batch)
}

/// Feeds the index from a watch on every host RuntimeClass until `shutdown` fires. Watch errors
/// are retried with [`rcsync_core::kube_client::RetriedWatch`] (250 ms up to 5 s); the last good
/// state keeps being served meanwhile.
pub async fn run(
    client: Client,
    mut index: ClassIndex,
    mut tenants: watch::Receiver<Arc<TenantsState>>,
    listed: impl Fn() + Send,
    mut shutdown: watch::Receiver<bool>,
) {
    let api: Api<RuntimeClass> = Api::all(client);
    let mut events = index
        .metrics
        .watches
        .follow(
            "runtimeclasses".into(),
            watcher::watcher(api, watcher::Config::default()).retry_with_backoff(),
        )
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
            batch = next_batch(&mut events, 256) => {
                let Some(batch) = batch else { return };
                let mut events = Vec::with_capacity(batch.len());
                for event in batch {
                    match event {
                        Ok(event) => events.push(event),
                        Err(e) => tracing::warn!(error = %e, "watching host RuntimeClasses failed; retrying with backoff"),
                    }
                }
                let done = events.iter().any(|e| matches!(e, Event::InitDone));
                index.handle_batch(events);
                if done && !announced {
                    announced = true;
                    tracing::info!(classes = index.ids.len(), "listed host RuntimeClasses");
                    listed();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
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

    fn index(yaml: &str) -> (ClassIndex, Metrics) {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Metrics::register(&mut registry);
        (
            ClassIndex::new(tenants(yaml), Views::default(), metrics.clone()),
            metrics,
        )
    }

    const TWO: &str = "tenants:\n  - {name: a, hostNamespace: ns-a, sync: {fromHost: {runtimeClasses: {enabled: true, selector: {matchLabels: {team: a}}}}}}\n  - {name: b, hostNamespace: ns-b, sync: {fromHost: {runtimeClasses: {enabled: true}}}}\n";

    #[test]
    fn unchanged_views_wake_nobody_and_tenants_see_only_their_classes() {
        let (mut index, _) = index(TWO);
        let a = TenantName::new("a").unwrap();
        let b = TenantName::new("b").unwrap();
        let mut rx_a = index.views().subscribe(&a).unwrap();
        index.handle(Event::Init);
        index.handle(Event::InitApply(class("gvisor", &[("team", "a")])));
        index.handle(Event::InitApply(class("kata", &[("team", "b")])));
        index.handle(Event::InitDone);
        assert!(index.views().is_synced());
        assert!(rx_a.has_changed().unwrap());
        assert_eq!(rx_a.borrow_and_update().offered_names(), ["gvisor"]);
        assert_eq!(index.views().current(&b).unwrap().offered_count(), 2);

        // A change that does not concern tenant a does not wake it.
        index.handle(Event::Apply(class("kata", &[("team", "b"), ("x", "y")])));
        assert!(!rx_a.has_changed().unwrap());
        index.handle(Event::Apply(class("kata", &[("team", "a")])));
        assert!(rx_a.has_changed().unwrap());
        assert_eq!(rx_a.borrow_and_update().offered_count(), 2);
        index.handle(Event::Delete(class("gvisor", &[])));
        assert_eq!(rx_a.borrow_and_update().offered_names(), ["kata"]);
        // CheckPod reasons follow the current host classes even for views not republished.
        index.handle(Event::Apply(class("new", &[("team", "b")])));
        let reason = index.views().check_pod(&a, "p", "new").unwrap().reason;
        assert_eq!(reason, rcsync_proto::v1::CheckPodReason::DoesNotMatch as i32);
    }

    #[test]
    fn a_change_costs_one_hash_and_touches_only_the_views_it_concerns() {
        let mut yaml = String::from("tenants:\n");
        for t in 0..100 {
            let selector = if t % 2 == 0 {
                "{matchLabels: {team: even}}"
            } else {
                "{matchLabels: {team: odd}}"
            };
            yaml.push_str(&format!(
                "  - {{name: t{t}, hostNamespace: ns-{t}, sync: {{fromHost: {{runtimeClasses: {{enabled: true, selector: {selector}}}}}}}}}\n"
            ));
        }
        let (mut index, metrics) = index(&yaml);
        index.handle(Event::Init);
        for i in 0..1000 {
            let team = if i % 2 == 0 { "even" } else { "odd" };
            index.handle(Event::InitApply(class(&format!("c{i}"), &[("team", team)])));
        }
        index.handle(Event::InitDone);
        let hashes = metrics.class_versions_total.get();
        let updates = metrics.view_updates_total.get();
        let rebuilds = metrics.view_rebuilds_total.get();
        let before = index.views().current(&TenantName::new("t0").unwrap()).unwrap();
        let untouched = index.views().current(&TenantName::new("t1").unwrap()).unwrap();
        // One class of the even tenants changes.
        index.handle(Event::Apply(class("c10", &[("team", "even"), ("tier", "gold")])));
        assert_eq!(
            metrics.class_versions_total.get() - hashes,
            1,
            "one object hashed"
        );
        assert_eq!(
            metrics.view_updates_total.get() - updates,
            50,
            "only the 50 views it belongs to"
        );
        assert_eq!(metrics.view_rebuilds_total.get(), rebuilds, "nothing rebuilt");
        let after = index.views().current(&TenantName::new("t0").unwrap()).unwrap();
        let changed = index
            .views()
            .changed_between(before.generation(), after.generation())
            .unwrap();
        assert_eq!(changed.len(), 1, "streams diff one class");
        assert!(Arc::ptr_eq(
            &untouched,
            &index.views().current(&TenantName::new("t1").unwrap()).unwrap()
        ));
        // Filtered once per change for each tenant it does not match, and only those.
        let label = Metrics::tenant("t1");
        assert_eq!(
            metrics.filtered_total.get_or_create(&label).get(),
            501,
            "500 at the list, 1 now"
        );
        let label = Metrics::tenant("t0");
        assert_eq!(
            metrics.filtered_total.get_or_create(&label).get(),
            500,
            "a class t0 gets is never reported"
        );
        index.handle(Event::Apply(class("brand-new", &[("team", "even")])));
        assert_eq!(
            metrics.filtered_total.get_or_create(&label).get(),
            500,
            "nor a new one it gets"
        );
    }

    #[test]
    fn a_burst_gives_the_same_view_as_one_change_at_a_time() {
        let (mut batched, _) = index(TWO);
        let (mut single, _) = index(TWO);
        let events = || {
            vec![
                Event::Apply(class("gvisor", &[("team", "a")])),
                Event::Apply(class("gvisor", &[("team", "a"), ("v", "2")])),
                Event::Delete(class("gvisor", &[])),
                Event::Apply(class("kata", &[("team", "a")])),
                Event::Apply(class("gvisor", &[("team", "a"), ("v", "3")])),
            ]
        };
        for index in [&mut batched, &mut single] {
            index.handle(Event::Init);
            index.handle(Event::InitDone);
        }
        batched.handle_batch(events());
        for event in events() {
            single.handle(event);
        }
        for tenant in ["a", "b"] {
            let name = TenantName::new(tenant).unwrap();
            let (a, b) = (
                batched.views().current(&name).unwrap(),
                single.views().current(&name).unwrap(),
            );
            assert_eq!(a.offered_names(), b.offered_names());
            assert_eq!(a.digest(), b.digest(), "tenant {tenant}");
        }
    }

    #[test]
    fn reloads_rebuild_only_changed_tenants_and_drop_removed_ones() {
        let (mut index, metrics) = index(TWO);
        index.handle(Event::Init);
        index.handle(Event::InitApply(class("gvisor", &[("team", "a")])));
        index.handle(Event::InitApply(class("kata", &[("team", "b")])));
        index.handle(Event::InitDone);
        let a = TenantName::new("a").unwrap();
        let b = TenantName::new("b").unwrap();
        let rebuilds = metrics.view_rebuilds_total.get();
        index.set_tenants(tenants(TWO));
        assert_eq!(
            metrics.view_rebuilds_total.get(),
            rebuilds,
            "an unchanged config rebuilds nothing"
        );
        let mut rx_b = index.views().subscribe(&b).unwrap();
        let changed = "tenants:\n  - {name: a, hostNamespace: ns-a, sync: {fromHost: {runtimeClasses: {enabled: true, selector: {matchLabels: {team: b}}}}}}\n";
        index.set_tenants(tenants(changed));
        assert_eq!(
            metrics.view_rebuilds_total.get(),
            rebuilds + 1,
            "only the changed tenant"
        );
        assert_eq!(index.views().current(&a).unwrap().offered_names(), ["kata"]);
        assert!(index.views().subscribe(&b).is_none());
        assert!(
            rx_b.changed().now_or_never_err(),
            "a removed tenant's stream learns it is gone"
        );
    }

    #[test]
    fn the_change_log_says_when_it_no_longer_reaches_back() {
        let mut log = ChangeLog::default();
        for g in 1..=(LOG_CAPACITY as u64 + 10) {
            log.push(g, g as u32);
        }
        assert_eq!(log.between(5, 9), None, "dropped");
        let last = LOG_CAPACITY as u64 + 10;
        assert_eq!(
            log.between(last - 2, last),
            Some(vec![last as u32 - 1, last as u32])
        );
        assert_eq!(log.between(last, last), Some(vec![]));
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
