//! The invariants. Continuously, from the harness's own watches: no host Pod carries a class its
//! tenant was not allowed when it was placed, no tenant sees another's classes or Pods, no agent
//! panics, memory stays bounded. At quiescence, from the API servers' ground truth: every virtual
//! cluster holds exactly its host-filtered set, every live allowed Pod has exactly one current host
//! Pod (its labels, its gating and the node selector a release added), no host Pod outlives its
//! virtual Pod, blocked Pods carry their SyncWarning, every host event about a live Pod's host Pod
//! is on the virtual Pod as the host counts it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Event as CoreEvent, Pod};
use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::runtime::watcher::{self, Event};
use rcsync_core::kube_client::RetryWithBackoff as _;
use rcsync_core::naming::{ANNOTATION_OBJECT_UID, LABEL_MANAGED_BY, LABEL_RCSYNC_MANAGED, host_pod_name};
use tokio::time::Instant;

use crate::timeline::{TenantConfig, Timeline};
use crate::world::{TENANTS, World, host_namespace};

/// Invariant names, as failures print them.
pub const CLASS_ALLOWED_AT_PLACEMENT: &str = "class-allowed-at-placement";
/// A tenant saw another tenant's data, or a class it was never offered.
pub const TENANT_ISOLATION: &str = "tenant-isolation";
/// An agent panicked.
pub const NO_PANIC: &str = "no-panic";
/// An agent's memory passed the ceiling.
pub const BOUNDED_MEMORY: &str = "bounded-memory";
/// A virtual cluster does not hold exactly its host-filtered classes.
pub const VIRTUAL_CLASSES_MATCH: &str = "virtual-classes-match-host";
/// A tenant-made RuntimeClass survived.
pub const NO_TENANT_CLASSES: &str = "no-tenant-made-classes";
/// A live allowed Pod lacks its host Pod, or it is not current.
pub const ALLOWED_PODS_ON_HOST: &str = "allowed-pods-on-host";
/// A host Pod outlived its virtual Pod.
pub const NO_STRAY_HOST_PODS: &str = "no-stray-host-pods";
/// A blocked Pod has no SyncWarning.
pub const BLOCKED_PODS_WARNED: &str = "blocked-pods-warned";
/// A host event about a live Pod's host Pod (or a live claim's host claim) is missing from the
/// virtual object, or differs.
pub const HOST_EVENTS_COPIED: &str = "host-events-copied";
/// A synced Pod with a token volume lacks a token on the host that authenticates to its virtual
/// cluster as its ServiceAccount.
pub const POD_TOKENS_VALID: &str = "pod-tokens-valid";

/// Every virtual PodDisruptionBudget is held on the host (its uid, asking for the healthy Pods the
/// virtual cluster counts) and no other budget of the tenant's is.
pub const BUDGETS_HELD: &str = "budgets-held-on-host";

/// Every virtual PersistentVolumeClaim is made on the host (its uid, its storage request) and
/// shows the host claim's phase; no other claim of the tenant's is on the host.
pub const CLAIMS_MADE: &str = "claims-made-on-host";

/// Every invariant.
pub const ALL: [&str; 13] = [
    CLASS_ALLOWED_AT_PLACEMENT,
    TENANT_ISOLATION,
    NO_PANIC,
    BOUNDED_MEMORY,
    VIRTUAL_CLASSES_MATCH,
    NO_TENANT_CLASSES,
    ALLOWED_PODS_ON_HOST,
    NO_STRAY_HOST_PODS,
    BLOCKED_PODS_WARNED,
    HOST_EVENTS_COPIED,
    POD_TOKENS_VALID,
    BUDGETS_HELD,
    CLAIMS_MADE,
];

/// How far back a placement may rely on an allowance: the longest a correct agent may act on a
/// view older than the API server's (API server restart + relist, stalled connections).
pub const SLACK: Duration = Duration::from_secs(20);

/// How long after an observation its check waits, so the harness's own watch of the host (which
/// feeds the timeline) has seen what the agents saw: an allowance recorded up to this much after
/// the observation still counts.
pub const LAG: Duration = Duration::from_secs(5);

/// Checks, after [`LAG`], that `class` was allowed for `tenant` around `at`; reports `what` if not.
fn check_allowed_later(
    timeline: &Timeline,
    violations: &Violations,
    tenant: &'static str,
    class: String,
    invariant: &'static str,
    what: String,
) {
    let at = Instant::now();
    let (timeline, violations) = (timeline.clone(), violations.clone());
    tokio::spawn(async move {
        tokio::time::sleep(LAG).await;
        let from = at.checked_sub(SLACK).unwrap_or(at);
        if !timeline.allowed_between(tenant, &class, from, at + LAG) {
            violations.add(invariant, what);
        }
    });
}

/// How a host Pod's gating, readiness gate condition, node selector, container resources and
/// debug containers differ from its virtual Pod's, if they do: gated (by rcsync's gate, and no
/// other the harness knows) exactly while the virtual Pod is, carrying the readiness gate
/// condition the tenant's controller set, holding every node selector entry the virtual Pod has
/// (a released Pod's flavor), asking for the cpu the virtual Pod was last resized to, and
/// running the ephemeral containers it was debugged with.
fn placement_differs(pod: &Pod, host: &Pod) -> Option<String> {
    let cpu = |p: &Pod| {
        let container = p.spec.as_ref()?.containers.iter().find(|c| c.name == "app")?;
        Some(
            container
                .resources
                .as_ref()?
                .requests
                .as_ref()?
                .get("cpu")?
                .0
                .clone(),
        )
    };
    if cpu(pod) != cpu(host) {
        return Some(format!("requests cpu {:?}, not {:?}", cpu(host), cpu(pod)));
    }
    let debuggers = |p: &Pod| -> Vec<String> {
        let mut names: Vec<String> = p
            .spec
            .iter()
            .flat_map(|s| s.ephemeral_containers.iter().flatten())
            .map(|c| c.name.clone())
            .collect();
        names.sort();
        names
    };
    if debuggers(pod) != debuggers(host) {
        return Some(format!(
            "has the ephemeral containers {:?}, not {:?}",
            debuggers(host),
            debuggers(pod)
        ));
    }
    use rcsync_core::gates::scheduling_gates as gates;
    let want: Vec<&str> = if gates(pod).is_empty() {
        vec![]
    } else {
        vec!["rcsync.io/virtual-gates"]
    };
    let got = gates(host);
    if got != want {
        return Some(format!("has scheduling gates {got:?}, not {want:?}"));
    }
    let gate = |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == crate::READINESS_GATE))
            .map(|c| c.status.clone())
    };
    if let Some(want) = gate(pod)
        && gate(host).as_ref() != Some(&want)
    {
        return Some(format!(
            "has the readiness gate condition {:?}, not {want:?}",
            gate(host)
        ));
    }
    let selector = |p: &Pod| {
        p.spec
            .as_ref()
            .and_then(|s| s.node_selector.clone())
            .unwrap_or_default()
    };
    let host_selector = selector(host);
    let missing: Vec<_> = selector(pod)
        .into_iter()
        .filter(|(k, v)| host_selector.get(k) != Some(v))
        .collect();
    (!missing.is_empty()).then(|| format!("lacks the node selector entries {missing:?}"))
}

/// Resident memory an agent may reach (debug builds included).
pub const MEMORY_CEILING_KIB: u64 = 512 * 1024;

/// Violations found so far: (invariant, detail).
#[derive(Clone, Default)]
pub struct Violations(Arc<Mutex<Vec<(String, String)>>>);

impl Violations {
    /// Records one.
    pub fn add(&self, invariant: &str, detail: String) {
        tracing::error!(invariant, %detail, "invariant violated");
        self.0.lock().unwrap().push((invariant.to_string(), detail));
    }

    /// All so far.
    pub fn all(&self) -> Vec<(String, String)> {
        self.0.lock().unwrap().clone()
    }
}

fn tenant_of_namespace(ns: &str) -> Option<&'static str> {
    TENANTS.into_iter().find(|t| host_namespace(t) == ns)
}

/// Feeds the timeline from a watch of the host's RuntimeClasses.
pub fn follow_host_classes(client: kube::Client, timeline: Timeline) {
    tokio::spawn(async move {
        let api: Api<RuntimeClass> = Api::all(client);
        let mut events = watcher::watcher(api, watcher::Config::default())
            .retry_with_backoff()
            .boxed();
        let mut current: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        let mut relist: Option<BTreeMap<String, BTreeMap<String, String>>> = None;
        while let Some(event) = events.next().await {
            let name_labels = |rc: &RuntimeClass| {
                (
                    rc.metadata.name.clone().unwrap_or_default(),
                    rc.metadata.labels.clone().unwrap_or_default(),
                )
            };
            match event {
                Ok(Event::Init) => relist = Some(BTreeMap::new()),
                Ok(Event::InitApply(rc)) => {
                    let (n, l) = name_labels(&rc);
                    if let Some(r) = &mut relist {
                        r.insert(n, l);
                    }
                }
                Ok(Event::InitDone) => current = relist.take().unwrap_or_default(),
                Ok(Event::Apply(rc)) => {
                    let (n, l) = name_labels(&rc);
                    if rc.metadata.deletion_timestamp.is_some() {
                        current.remove(&n);
                    } else {
                        current.insert(n, l);
                    }
                }
                Ok(Event::Delete(rc)) => {
                    current.remove(&name_labels(&rc).0);
                }
                Err(_) => continue,
            }
            timeline.set_classes(current.clone());
        }
    });
}

/// Checks every host Pod when it first appears: its class was allowed for its tenant, and it is
/// that tenant's.
pub fn watch_host_pods(client: kube::Client, timeline: Timeline, violations: Violations) {
    tokio::spawn(async move {
        let api: Api<Pod> = Api::all(client);
        let mut events = watcher::watcher(api, watcher::Config::default())
            .retry_with_backoff()
            .boxed();
        let mut seen: BTreeSet<String> = BTreeSet::new();
        while let Some(event) = events.next().await {
            let pod = match event {
                Ok(Event::Apply(p) | Event::InitApply(p)) => p,
                _ => continue,
            };
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            if !seen.insert(uid) {
                continue;
            }
            let ns = pod.metadata.namespace.clone().unwrap_or_default();
            let name = pod.metadata.name.clone().unwrap_or_default();
            let Some(tenant) = tenant_of_namespace(&ns) else {
                continue;
            };
            let managed_by = pod
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_MANAGED_BY))
                .cloned();
            if managed_by.as_deref() != Some(tenant) || !name.ends_with(&format!("-x-{tenant}")) {
                violations.add(
                    TENANT_ISOLATION,
                    format!(
                        "host Pod {ns}/{name} in tenant {tenant}'s namespace is managed by {managed_by:?}"
                    ),
                );
            }
            if let Some(term) = selects_beyond(&pod, tenant) {
                violations.add(
                    TENANT_ISOLATION,
                    format!("host Pod {ns}/{name} of tenant {tenant} has a term that may select beyond its Pods: {term}"),
                );
            }
            let class = pod
                .spec
                .as_ref()
                .and_then(|s| s.runtime_class_name.clone())
                .unwrap_or_default();
            let what = format!(
                "host Pod {ns}/{name} runs class {class:?}, which tenant {tenant} was not allowed within {SLACK:?} before it appeared"
            );
            check_allowed_later(
                &timeline,
                &violations,
                tenant,
                class,
                CLASS_ALLOWED_AT_PLACEMENT,
                what,
            );
        }
    });
}

/// A pod (anti-)affinity term or topology spread constraint of a host Pod that could select Pods
/// other than its tenant's (it names namespaces, or its selector does not require the tenant's
/// `managed-by` label), as JSON; `None` when every one is scoped.
fn selects_beyond(pod: &Pod, tenant: &str) -> Option<String> {
    let spec = serde_json::to_value(pod.spec.as_ref()?).ok()?;
    let mut terms: Vec<serde_json::Value> = Vec::new();
    for kind in ["podAffinity", "podAntiAffinity"] {
        let of = &spec["affinity"][kind];
        terms.extend(
            of["requiredDuringSchedulingIgnoredDuringExecution"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
        );
        terms.extend(
            of["preferredDuringSchedulingIgnoredDuringExecution"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|w| w["podAffinityTerm"].clone()),
        );
    }
    terms.extend(
        spec["topologySpreadConstraints"]
            .as_array()
            .cloned()
            .unwrap_or_default(),
    );
    terms
        .into_iter()
        .find(|term| {
            let scoped = term["labelSelector"].is_null()
                || term["labelSelector"]["matchLabels"][LABEL_MANAGED_BY] == tenant;
            !scoped || !term["namespaces"].is_null() || !term["namespaceSelector"].is_null()
        })
        .map(|term| term.to_string())
}

/// Checks every managed class that appears in a virtual cluster: its tenant was offered it.
pub fn watch_virtual_classes(
    tenant: &'static str,
    client: kube::Client,
    timeline: Timeline,
    violations: Violations,
) {
    tokio::spawn(async move {
        let api: Api<RuntimeClass> = Api::all(client);
        let mut events = watcher::watcher(api, watcher::Config::default())
            .retry_with_backoff()
            .boxed();
        let mut seen: BTreeSet<String> = BTreeSet::new();
        while let Some(event) = events.next().await {
            let rc = match event {
                Ok(Event::Apply(rc) | Event::InitApply(rc)) => rc,
                _ => continue,
            };
            let managed = rc
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_RCSYNC_MANAGED))
                .is_some();
            let key = format!(
                "{}/{}",
                rc.metadata.uid.clone().unwrap_or_default(),
                rc.metadata.resource_version.clone().unwrap_or_default()
            );
            if !managed || !seen.insert(key) {
                continue;
            }
            let name = rc.metadata.name.clone().unwrap_or_default();
            // While a tenant's sync is disabled every class counts as allowed: this check is
            // lenient then (the quiescence check wants none at all).
            let what = format!(
                "virtual cluster {tenant} holds class {name:?}, which its selector did not offer within {SLACK:?}"
            );
            check_allowed_later(&timeline, &violations, tenant, name, TENANT_ISOLATION, what);
        }
    });
}

/// Resident memory of a process in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Scans every log for panics and samples every agent's memory; returns the highest RSS seen per
/// process name.
pub fn scan_processes(
    world: &World,
    violations: &Violations,
    reported: &mut BTreeSet<String>,
    peak: &mut BTreeMap<String, u64>,
) {
    for p in world.processes() {
        for log in &p.logs {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains("panicked at")) {
                let key = format!("{}:{line}", log.display());
                if reported.insert(key) {
                    violations.add(NO_PANIC, format!("{}: {line}", log.display()));
                }
            }
        }
        if p.name.contains("agent")
            && let Some(kib) = p.pid().and_then(rss_kib)
        {
            let max = peak.entry(p.name.clone()).or_default();
            *max = (*max).max(kib);
            if kib > MEMORY_CEILING_KIB && reported.insert(format!("rss:{}", p.name)) {
                violations.add(BOUNDED_MEMORY, format!("{} uses {kib} KiB", p.name));
            }
        }
    }
}

/// What the quiescence checks found unmet (invariant, detail); empty when converged.
pub async fn quiescence(world: &World) -> Vec<(String, String)> {
    let mut unmet = Vec::new();
    let Ok(host) = world.host_client().await else {
        return vec![(VIRTUAL_CLASSES_MATCH.into(), "host API server unreachable".into())];
    };
    let host_classes: BTreeMap<String, RuntimeClass> = match Api::<RuntimeClass>::all(host.clone())
        .list(&Default::default())
        .await
    {
        Ok(list) => list
            .items
            .into_iter()
            .map(|rc| (rc.metadata.name.clone().unwrap_or_default(), rc))
            .collect(),
        Err(e) => return vec![(VIRTUAL_CLASSES_MATCH.into(), format!("listing host classes: {e}"))],
    };
    for (i, tenant) in TENANTS.iter().enumerate() {
        let config: &TenantConfig = &world.tenants[i];
        let Ok(virt) = world.virtual_client(i).await else {
            unmet.push((
                VIRTUAL_CLASSES_MATCH.into(),
                format!("virtual API server {tenant} unreachable"),
            ));
            continue;
        };
        // Classes: exactly the host-filtered set (none while sync is disabled), same handler and labels.
        let virtual_classes = match Api::<RuntimeClass>::all(virt.clone())
            .list(&Default::default())
            .await
        {
            Ok(list) => list.items,
            Err(e) => {
                unmet.push((
                    VIRTUAL_CLASSES_MATCH.into(),
                    format!("listing {tenant}'s classes: {e}"),
                ));
                continue;
            }
        };
        let expected: BTreeMap<&String, &RuntimeClass> = host_classes
            .iter()
            .filter(|(_, rc)| {
                config.enabled && config.selects(&rc.metadata.labels.clone().unwrap_or_default())
            })
            .collect();
        let mut held = BTreeSet::new();
        for rc in &virtual_classes {
            let name = rc.metadata.name.clone().unwrap_or_default();
            let labels = rc.metadata.labels.clone().unwrap_or_default();
            if !labels.contains_key(LABEL_RCSYNC_MANAGED) {
                // Only while sync is enabled may a tenant not keep classes of its own (the spec).
                if config.enabled {
                    unmet.push((
                        NO_TENANT_CLASSES.into(),
                        format!("{tenant} still holds its own class {name:?}"),
                    ));
                }
                continue;
            }
            held.insert(name.clone());
            match expected.get(&name) {
                None => unmet.push((
                    VIRTUAL_CLASSES_MATCH.into(),
                    format!("{tenant} holds {name:?}, which its selector does not offer"),
                )),
                Some(host_rc) => {
                    let host_labels = host_rc.metadata.labels.clone().unwrap_or_default();
                    if host_rc.handler != rc.handler
                        || !host_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
                    {
                        unmet.push((
                            VIRTUAL_CLASSES_MATCH.into(),
                            format!("{tenant}'s {name:?} differs from the host's"),
                        ));
                    }
                }
            }
        }
        for name in expected.keys() {
            if !held.contains(*name) {
                unmet.push((VIRTUAL_CLASSES_MATCH.into(), format!("{tenant} lacks {name:?}")));
            }
        }

        // Pods.
        let virtual_pods = match Api::<Pod>::all(virt.clone()).list(&Default::default()).await {
            Ok(list) => list.items,
            Err(e) => {
                unmet.push((
                    ALLOWED_PODS_ON_HOST.into(),
                    format!("listing {tenant}'s Pods: {e}"),
                ));
                continue;
            }
        };
        let host_pods: BTreeMap<String, Pod> =
            match Api::<Pod>::namespaced(host.clone(), &host_namespace(tenant))
                .list(&Default::default())
                .await
            {
                Ok(list) => list
                    .items
                    .into_iter()
                    .map(|p| (p.metadata.name.clone().unwrap_or_default(), p))
                    .collect(),
                Err(e) => {
                    unmet.push((
                        ALLOWED_PODS_ON_HOST.into(),
                        format!("listing {tenant}'s host Pods: {e}"),
                    ));
                    continue;
                }
            };
        let events = Api::<CoreEvent>::all(virt.clone())
            .list(&Default::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        let mut live_uids = BTreeSet::new();
        for pod in virtual_pods
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
        {
            let name = pod.metadata.name.clone().unwrap_or_default();
            let ns = pod.metadata.namespace.clone().unwrap_or_default();
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            live_uids.insert(uid.clone());
            let class = pod
                .spec
                .as_ref()
                .and_then(|s| s.runtime_class_name.clone())
                .unwrap_or_default();
            let allowed = class.is_empty() || !config.enabled || expected.contains_key(&class);
            let runnable = class.is_empty() || host_classes.contains_key(&class);
            let host_pod = host_pods.get(&host_pod_name(&name, &ns, tenant));
            let host_uid = host_pod
                .and_then(|p| p.metadata.annotations.as_ref())
                .and_then(|a| a.get(ANNOTATION_OBJECT_UID))
                .cloned();
            match (allowed && runnable, host_pod) {
                (true, None) => unmet.push((
                    ALLOWED_PODS_ON_HOST.into(),
                    format!("{tenant}: {ns}/{name} (class {class:?}) has no host Pod"),
                )),
                (true, Some(_)) if host_uid.as_deref() != Some(uid.as_str()) => unmet.push((
                    ALLOWED_PODS_ON_HOST.into(),
                    format!("{tenant}: the host Pod of {ns}/{name} belongs to another Pod ({host_uid:?})"),
                )),
                (true, Some(hp)) => {
                    let want = pod.metadata.labels.clone().unwrap_or_default();
                    let got: BTreeMap<String, String> = hp
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get("vcluster.loft.sh/labels"))
                        .and_then(|j| serde_json::from_str(j).ok())
                        .unwrap_or_default();
                    if want != got {
                        unmet.push((
                            ALLOWED_PODS_ON_HOST.into(),
                            format!("{tenant}: the host Pod of {ns}/{name} has labels {got:?}, not {want:?}"),
                        ));
                    }
                    // The same labels under the hashed keys its affinity and spread select on.
                    let hashed: BTreeMap<String, String> = hp
                        .metadata
                        .labels
                        .iter()
                        .flatten()
                        .filter(|(k, _)| k.starts_with(rcsync_core::naming::HOST_LABEL_PREFIX))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    let want_hashed: BTreeMap<String, String> = want
                        .iter()
                        .map(|(k, v)| (rcsync_core::naming::host_label_key(k), v.clone()))
                        .collect();
                    if hashed != want_hashed {
                        unmet.push((
                            ALLOWED_PODS_ON_HOST.into(),
                            format!("{tenant}: the host Pod of {ns}/{name} has hashed labels {hashed:?}, not {want_hashed:?}"),
                        ));
                    }
                    if let Some(why) = placement_differs(pod, hp) {
                        unmet.push((
                            ALLOWED_PODS_ON_HOST.into(),
                            format!("{tenant}: the host Pod of {ns}/{name} {why}"),
                        ));
                    }
                    if let Some(why) = copy_missing(&host, TENANTS[i], hp).await {
                        unmet.push((
                            ALLOWED_PODS_ON_HOST.into(),
                            format!("{tenant}: the host Pod of {ns}/{name} {why}"),
                        ));
                    }
                    if let Some(why) = token_differs(world, i, &host, pod, hp).await {
                        unmet.push((
                            POD_TOKENS_VALID.into(),
                            format!("{tenant}: the host Pod of {ns}/{name} {why}"),
                        ));
                    }
                }
                // Not allowed (or its class is gone from the host): an orphan keeps its host Pod
                // (the spec's orphans); a Pod never synced must say why.
                (false, Some(_)) => {}
                (false, None) if !allowed => {
                    let warned = events.iter().any(|e| {
                        e.involved_object.uid.as_deref() == Some(uid.as_str())
                            && e.reason.as_deref() == Some("SyncWarning")
                    });
                    if !warned {
                        unmet.push((
                            BLOCKED_PODS_WARNED.into(),
                            format!("{tenant}: blocked {ns}/{name} (class {class:?}) has no SyncWarning"),
                        ));
                    }
                }
                (false, None) => {}
            }
        }
        let pod_metas: BTreeMap<String, &ObjectMeta> = host_pods
            .iter()
            .map(|(name, p)| (name.clone(), &p.metadata))
            .collect();
        unmet.extend(host_events_differ(&host, tenant, "Pod", &pod_metas, &live_uids, &events).await);
        unmet.extend(budgets_differ(&host, &virt, tenant).await);
        unmet.extend(claims_differ(&host, &virt, tenant, &events).await);
        for (name, hp) in &host_pods {
            let uid = hp
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ANNOTATION_OBJECT_UID))
                .cloned()
                .unwrap_or_default();
            if hp.metadata.deletion_timestamp.is_none() && !live_uids.contains(&uid) {
                unmet.push((
                    NO_STRAY_HOST_PODS.into(),
                    format!("{tenant}: host Pod {name} has no virtual Pod"),
                ));
            }
        }
    }
    unmet
}

/// How tenant `tenant`'s budgets on the host differ from its virtual budgets (see [`BUDGETS_HELD`]).
/// A budget stated as `maxUnavailable` or a percentage whose status the virtual cluster has not
/// computed for its spec yet is not asked for.
async fn budgets_differ(host: &kube::Client, virt: &kube::Client, tenant: &str) -> Vec<(String, String)> {
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let failed = |what: String| vec![(BUDGETS_HELD.to_string(), what)];
    let virtual_budgets = match Api::<PodDisruptionBudget>::namespaced(virt.clone(), "default")
        .list(&Default::default())
        .await
    {
        Ok(list) => list.items,
        Err(e) => return failed(format!("listing {tenant}'s budgets: {e}")),
    };
    let selector = format!("{LABEL_MANAGED_BY}={tenant}");
    let mut host_budgets: BTreeMap<String, PodDisruptionBudget> =
        match Api::<PodDisruptionBudget>::namespaced(host.clone(), &host_namespace(tenant))
            .list(&kube::api::ListParams::default().labels(&selector))
            .await
        {
            Ok(list) => list
                .items
                .into_iter()
                .map(|b| (b.metadata.name.clone().unwrap_or_default(), b))
                .collect(),
            Err(e) => return failed(format!("listing {tenant}'s host budgets: {e}")),
        };
    let mut unmet = Vec::new();
    for budget in &virtual_budgets {
        let name = budget.metadata.name.clone().unwrap_or_default();
        let held = host_budgets.remove(&rcsync_core::naming::host_object_name(&name, "default", tenant));
        let spec = budget.spec.clone().unwrap_or_default();
        let want = match (&spec.min_available, &spec.max_unavailable) {
            (Some(IntOrString::Int(n)), None) => Some(*n),
            _ => budget
                .status
                .as_ref()
                .filter(|s| {
                    s.observed_generation.is_some() && s.observed_generation >= budget.metadata.generation
                })
                .and_then(|s| s.desired_healthy),
        };
        let Some(want) = want else { continue };
        let Some(held) = held else {
            unmet.push((
                BUDGETS_HELD.into(),
                format!("{tenant}: budget default/{name} is not held on the host"),
            ));
            continue;
        };
        let uid = held
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_OBJECT_UID));
        let asks = held.spec.as_ref().and_then(|s| s.min_available.clone());
        if uid != budget.metadata.uid.as_ref() || asks != Some(IntOrString::Int(want)) {
            unmet.push((
                BUDGETS_HELD.into(),
                format!("{tenant}: the host budget of default/{name} asks {asks:?} for uid {uid:?}, not {want} for {:?}", budget.metadata.uid),
            ));
        }
    }
    for stray in host_budgets.keys() {
        unmet.push((
            BUDGETS_HELD.into(),
            format!("{tenant}: host budget {stray} has no virtual budget"),
        ));
    }
    unmet
}

/// How tenant `tenant`'s claims on the host differ from its virtual claims (see [`CLAIMS_MADE`]).
async fn claims_differ(
    host: &kube::Client,
    virt: &kube::Client,
    tenant: &str,
    events: &[CoreEvent],
) -> Vec<(String, String)> {
    use k8s_openapi::api::core::v1::PersistentVolumeClaim;
    let failed = |what: String| vec![(CLAIMS_MADE.to_string(), what)];
    let virtual_claims = match Api::<PersistentVolumeClaim>::namespaced(virt.clone(), "default")
        .list(&Default::default())
        .await
    {
        Ok(list) => list.items,
        Err(e) => return failed(format!("listing {tenant}'s claims: {e}")),
    };
    let selector = format!("{LABEL_MANAGED_BY}={tenant}");
    let mut host_claims: BTreeMap<String, PersistentVolumeClaim> =
        match Api::<PersistentVolumeClaim>::namespaced(host.clone(), &host_namespace(tenant))
            .list(&kube::api::ListParams::default().labels(&selector))
            .await
        {
            Ok(list) => list
                .items
                .into_iter()
                .map(|c| (c.metadata.name.clone().unwrap_or_default(), c))
                .collect(),
            Err(e) => return failed(format!("listing {tenant}'s host claims: {e}")),
        };
    let storage = |claim: &PersistentVolumeClaim| {
        claim
            .spec
            .as_ref()
            .and_then(|s| s.resources.as_ref()?.requests.as_ref()?.get("storage").cloned())
    };
    let phase = |claim: &PersistentVolumeClaim| claim.status.as_ref().and_then(|s| s.phase.clone());
    // The host's events about the claims are on the virtual claims, as about Pods.
    let live_uids: BTreeSet<String> = virtual_claims
        .iter()
        .filter(|c| c.metadata.deletion_timestamp.is_none())
        .filter_map(|c| c.metadata.uid.clone())
        .collect();
    let claim_metas: BTreeMap<String, &ObjectMeta> = host_claims
        .iter()
        .map(|(name, c)| (name.clone(), &c.metadata))
        .collect();
    let mut unmet = host_events_differ(
        host,
        tenant,
        "PersistentVolumeClaim",
        &claim_metas,
        &live_uids,
        events,
    )
    .await;
    drop(claim_metas);
    for claim in virtual_claims
        .iter()
        .filter(|c| c.metadata.deletion_timestamp.is_none())
    {
        let name = claim.metadata.name.clone().unwrap_or_default();
        let Some(made) = host_claims.remove(&rcsync_core::naming::host_object_name(&name, "default", tenant))
        else {
            unmet.push((
                CLAIMS_MADE.into(),
                format!("{tenant}: claim default/{name} is not made on the host"),
            ));
            continue;
        };
        let uid = made
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_OBJECT_UID));
        if uid != claim.metadata.uid.as_ref() || storage(&made) != storage(claim) {
            unmet.push((
                CLAIMS_MADE.into(),
                format!(
                    "{tenant}: the host claim of default/{name} asks {:?} for uid {uid:?}, not {:?} for {:?}",
                    storage(&made),
                    storage(claim),
                    claim.metadata.uid
                ),
            ));
        } else if phase(&made) != phase(claim) {
            unmet.push((
                CLAIMS_MADE.into(),
                format!(
                    "{tenant}: claim default/{name} shows {:?}, its host claim {:?}",
                    phase(claim),
                    phase(&made)
                ),
            ));
        }
    }
    for stray in host_claims.keys() {
        unmet.push((
            CLAIMS_MADE.into(),
            format!("{tenant}: host claim {stray} has no virtual claim"),
        ));
    }
    unmet
}

/// The first ConfigMap or Secret host Pod `host_pod` of `tenant` needs (references without
/// `optional: true`) that its host namespace lacks: every copy a Pod that has not ended uses stays
/// there, and one deleted under it (the churn's cleanup step) is written again. A Pod that ended
/// (`Succeeded`, `Failed`) never starts a container again: its copies may stay deleted.
async fn copy_missing(host: &kube::Client, tenant: &str, host_pod: &Pod) -> Option<String> {
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    use rcsync_core::pod_refs::{RefKind, references};
    let phase = host_pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    let namespace = host_namespace(tenant);
    for ((kind, name), required) in references(host_pod.spec.as_ref()?) {
        if !required {
            continue;
        }
        let found = match kind {
            RefKind::ConfigMap => Api::<ConfigMap>::namespaced(host.clone(), &namespace)
                .get_metadata_opt(&name)
                .await
                .map(|m| m.is_some()),
            RefKind::Secret => Api::<Secret>::namespaced(host.clone(), &namespace)
                .get_metadata_opt(&name)
                .await
                .map(|m| m.is_some()),
        };
        match found {
            Ok(true) => {}
            Ok(false) => return Some(format!("uses {kind} {name}, which is not on the host")),
            Err(e) => return Some(format!("uses {kind} {name}, unreadable: {e}")),
        }
    }
    None
}

/// How the host Pod `host_pod` of tenant `tenant`'s (index) `pod` falls short of a Pod with a token
/// volume, if it has one: it mounts the Pod's token Secret, which exists on the host and holds a
/// token that authenticates to the virtual API server as the Pod's ServiceAccount.
async fn token_differs(
    world: &World,
    tenant: usize,
    host: &kube::Client,
    pod: &Pod,
    host_pod: &Pod,
) -> Option<String> {
    use k8s_openapi::api::core::v1::Secret;
    let projected_sources = |p: &Pod| -> Vec<k8s_openapi::api::core::v1::VolumeProjection> {
        p.spec
            .iter()
            .flat_map(|s| s.volumes.iter().flatten())
            .flat_map(|v| v.projected.iter().flat_map(|p| p.sources.iter().flatten()))
            .cloned()
            .collect()
    };
    if !projected_sources(pod)
        .iter()
        .any(|s| s.service_account_token.is_some())
    {
        return None;
    }
    let name = pod.metadata.name.clone().unwrap_or_default();
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let secret = rcsync_core::naming::host_object_name(&format!("{name}.rcsync-token"), &ns, TENANTS[tenant]);
    if !projected_sources(host_pod)
        .iter()
        .any(|s| s.secret.as_ref().is_some_and(|s| s.name == secret))
    {
        return Some(format!("does not mount its token Secret {secret}"));
    }
    let token = match Api::<Secret>::namespaced(host.clone(), &host_namespace(TENANTS[tenant]))
        .get_opt(&secret)
        .await
    {
        Ok(found) => found.and_then(|s| s.data).and_then(|d| {
            d.get("token-0")
                .map(|t| String::from_utf8_lossy(&t.0).into_owned())
        }),
        Err(e) => return Some(format!("has its token Secret unreadable: {e}")),
    };
    let Some(token) = token else {
        return Some(format!("has no token in {secret}"));
    };
    let account = format!(
        "system:serviceaccount:{ns}:{}",
        crate::world::TOKEN_SERVICE_ACCOUNT
    );
    let client = match world.virtual_client_with_token(tenant, &token).await {
        Ok(client) => client,
        Err(e) => return Some(format!("has a token no client takes: {e}")),
    };
    // The ServiceAccount may not list Pods: the refusal names who the token is.
    match Api::<Pod>::namespaced(client, &ns)
        .list(&Default::default())
        .await
    {
        Err(kube::Error::Api(e)) if e.code == 403 && e.message.contains(&account) => None,
        Ok(_) => Some(format!("has a token with more rights than {account}")),
        Err(e) => Some(format!(
            "has a token that does not authenticate as {account}: {e}"
        )),
    }
}

/// How the host events about `tenant`'s live host objects of `kind` (`host_objects`, their
/// metadata by host name; `live_uids`, the uids of their virtual objects still there) differ
/// from their copies among the virtual cluster's `events`: each must be there, named after the
/// host event, about the virtual object's uid, with the host's count and the message in the
/// virtual object's names.
async fn host_events_differ(
    host: &kube::Client,
    tenant: &str,
    kind: &str,
    host_objects: &BTreeMap<String, &ObjectMeta>,
    live_uids: &BTreeSet<String>,
    events: &[CoreEvent],
) -> Vec<(String, String)> {
    use rcsync_core::naming::{
        ANNOTATION_OBJECT_NAME, ANNOTATION_OBJECT_NAMESPACE, host_event_id, virtual_event_name,
    };
    let host_namespace = host_namespace(tenant);
    let about = kube::api::ListParams::default().fields(&format!("involvedObject.kind={kind}"));
    let host_events = match Api::<CoreEvent>::namespaced(host.clone(), &host_namespace)
        .list(&about)
        .await
    {
        Ok(list) => list.items,
        Err(e) => {
            return vec![(
                HOST_EVENTS_COPIED.into(),
                format!("listing {tenant}'s host events: {e}"),
            )];
        }
    };
    let mut unmet = Vec::new();
    for event in host_events {
        let host_name = event.involved_object.name.clone().unwrap_or_default();
        let Some(host_object) = host_objects.get(&host_name) else {
            continue;
        };
        let annotation = |key: &str| {
            host_object
                .annotations
                .as_ref()
                .and_then(|a| a.get(key))
                .cloned()
                .unwrap_or_default()
        };
        let (namespace, name, uid) = (
            annotation(ANNOTATION_OBJECT_NAMESPACE),
            annotation(ANNOTATION_OBJECT_NAME),
            annotation(ANNOTATION_OBJECT_UID),
        );
        if host_object.uid != event.involved_object.uid
            || host_object.deletion_timestamp.is_some()
            || !live_uids.contains(&uid)
        {
            continue;
        }
        let copy_name = virtual_event_name(
            &name,
            &host_event_id(event.metadata.uid.as_deref().unwrap_or_default()),
        );
        let Some(copy) = events.iter().find(|e| {
            e.metadata.namespace.as_deref() == Some(namespace.as_str())
                && e.metadata.name.as_deref() == Some(copy_name.as_str())
        }) else {
            unmet.push((
                HOST_EVENTS_COPIED.into(),
                format!(
                    "{tenant}: host event {:?} about {host_name} is not on {namespace}/{name}",
                    event.metadata.name
                ),
            ));
            continue;
        };
        let message = event
            .message
            .clone()
            .unwrap_or_default()
            .replace(
                &format!("{host_namespace}/{host_name}"),
                &format!("{namespace}/{name}"),
            )
            .replace(&host_name, &name);
        if copy.involved_object.uid.as_deref() != Some(uid.as_str())
            || copy.count != event.count
            || copy.message.as_deref() != Some(message.as_str())
        {
            unmet.push((
                HOST_EVENTS_COPIED.into(),
                format!(
                    "{tenant}: the copy {namespace}/{copy_name} has count {:?} and message {:?}, the host event count {:?} and {message:?}",
                    copy.count, copy.message, event.count
                ),
            ));
        }
    }
    unmet
}

/// Whether some running agent uses more than `ceiling_kib` (the self-test lowers the ceiling to
/// show the memory check can fail).
pub fn memory_check_fails_below(world: &World, ceiling_kib: u64) -> bool {
    world
        .processes()
        .iter()
        .filter(|p| p.name.contains("agent"))
        .filter_map(|p| p.pid().and_then(rss_kib))
        .any(|kib| kib > ceiling_kib)
}
