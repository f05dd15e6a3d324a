//! What each tenant was allowed, over time: recomputed from the host's RuntimeClasses (as the
//! harness's own watch sees them) and the tenants config (as the harness wrote it), so an
//! invariant can ask "was class C allowed for tenant T at some moment in this window?".

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

/// A tenant's config, as far as the chaos run varies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantConfig {
    /// Tenant name.
    pub name: String,
    /// `sync.fromHost.runtimeClasses.enabled`.
    pub enabled: bool,
    /// `selector.matchLabels`.
    pub selector: BTreeMap<String, String>,
}

impl TenantConfig {
    /// Whether a class with `labels` is offered to this tenant (sync enabled).
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// What one tenant may use at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Allowed {
    /// Sync disabled: every class (the host agent does not gate Pods).
    Everything,
    /// These host classes.
    Classes(BTreeSet<String>),
}

#[derive(Default)]
struct Inner {
    classes: BTreeMap<String, BTreeMap<String, String>>,
    tenants: Vec<TenantConfig>,
    /// Per tenant: (since, what was allowed from then on).
    history: BTreeMap<String, Vec<(Instant, Allowed)>>,
}

/// The allowed-set history of every tenant.
#[derive(Clone, Default)]
pub struct Timeline(Arc<Mutex<Inner>>);

impl Timeline {
    /// Records the tenants config now in effect.
    pub fn set_tenants(&self, tenants: Vec<TenantConfig>) {
        let mut inner = self.0.lock().unwrap();
        inner.tenants = tenants;
        record(&mut inner);
    }

    /// Records one class as the harness just wrote it (`None`: deleted). With the watch as the
    /// other source, a lagging watch cannot hide an allowance the agents saw.
    pub fn class_written(&self, name: &str, labels: Option<BTreeMap<String, String>>) {
        let mut inner = self.0.lock().unwrap();
        match labels {
            Some(labels) => inner.classes.insert(name.to_string(), labels),
            None => inner.classes.remove(name),
        };
        record(&mut inner);
    }

    /// Records the host's classes (name → labels) as now seen.
    pub fn set_classes(&self, classes: BTreeMap<String, BTreeMap<String, String>>) {
        let mut inner = self.0.lock().unwrap();
        inner.classes = classes;
        record(&mut inner);
    }

    /// Whether `class` (empty: no runtimeClassName) was allowed for `tenant` at some moment in
    /// `[from, to]`.
    pub fn allowed_between(&self, tenant: &str, class: &str, from: Instant, to: Instant) -> bool {
        if class.is_empty() {
            return true;
        }
        let inner = self.0.lock().unwrap();
        let Some(history) = inner.history.get(tenant) else {
            return false;
        };
        history.iter().enumerate().any(|(i, (since, allowed))| {
            let until = history.get(i + 1).map(|(t, _)| *t);
            let overlaps = *since <= to && until.is_none_or(|u| u >= from);
            overlaps
                && match allowed {
                    Allowed::Everything => true,
                    Allowed::Classes(set) => set.contains(class),
                }
        })
    }
}

fn record(inner: &mut Inner) {
    let now = Instant::now();
    for tenant in inner.tenants.clone() {
        let allowed = if !tenant.enabled {
            Allowed::Everything
        } else {
            Allowed::Classes(
                inner
                    .classes
                    .iter()
                    .filter(|(_, labels)| tenant.selects(labels))
                    .map(|(name, _)| name.clone())
                    .collect(),
            )
        };
        let history = inner.history.entry(tenant.name.clone()).or_default();
        if history.last().map(|(_, a)| a) != Some(&allowed) {
            history.push((now, allowed));
        }
    }
}
