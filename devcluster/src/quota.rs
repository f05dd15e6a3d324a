//! ResourceQuota for Pods and PersistentVolumeClaims, as upstream's evaluators count them
//! ([`pod_usage`], [`claim_usage`]: `persistentvolumeclaims`, `count/persistentvolumeclaims`,
//! `requests.storage`; not the per-StorageClass keys, nor a claim's growth). For Pods: `count/pods`
//! (every Pod in storage), `pods` (those that have not ended) and, for those, the `cpu`, `memory`
//! and `ephemeral-storage` requests (also under their bare names) and limits, summed over the
//! containers, the larger of that and each init container (sidecars add up), plus the Pod's
//! overhead. A quota on any other resource is refused at its create (devcluster would not count
//! it). Admission ([`crate::admission`]) refuses a Pod past a quota, and one with a container
//! that does not state a cpu or memory request or limit a quota limits, with upstream's messages.
//!
//! The part of kube-controller-manager's quota controller devcluster keeps: each ResourceQuota's
//! `status.hard` (a copy of its `spec.hard`) and `status.used`, so `kubectl get quota` and
//! `kubectl describe quota` show how full a namespace is.
//!
//! ```text
//!  store changes (Pods, claims, ResourceQuotas) ─► their namespace ─► each quota there:
//!                                                             status {hard, used} written when it differs
//! ```
//!
//! Admission does not read `status.used`: it counts the namespace's Pods inside the create's own
//! transaction, so the status lagging a change by one store event never lets a Pod past a quota.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_json::{Map, Value, json};
use tokio::sync::watch;

use crate::admission::name_of;
use crate::quantity::{format_millis, parse_millis};
use crate::store::{Outcome, Store};

/// The quota resources devcluster counts for Pods.
pub const POD_QUOTA_KEYS: [&str; 11] = [
    "count/pods",
    "pods",
    "cpu",
    "memory",
    "ephemeral-storage",
    "requests.cpu",
    "requests.memory",
    "requests.ephemeral-storage",
    "limits.cpu",
    "limits.memory",
    "limits.ephemeral-storage",
];

/// The quota resources devcluster counts for PersistentVolumeClaims (upstream's claim evaluator,
/// without the per-StorageClass keys).
pub const CLAIM_QUOTA_KEYS: [&str; 3] = [
    "count/persistentvolumeclaims",
    "persistentvolumeclaims",
    "requests.storage",
];

/// Every quota resource devcluster counts.
fn counted() -> impl Iterator<Item = &'static str> {
    POD_QUOTA_KEYS.into_iter().chain(CLAIM_QUOTA_KEYS)
}

/// The compute resources a Pod's containers request and limit.
const COMPUTE: [&str; 3] = ["cpu", "memory", "ephemeral-storage"];

/// The resources each container must state when a quota limits them (upstream keeps this rule
/// for cpu and memory only, for backward compatibility).
const MUST_SPECIFY: [&str; 6] = [
    "cpu",
    "memory",
    "requests.cpu",
    "requests.memory",
    "limits.cpu",
    "limits.memory",
];

/// Quota resources and amounts in milli-units (a Pod is 1000).
pub type Usage = BTreeMap<&'static str, i128>;

/// Compute resources (`cpu`, `memory`, `ephemeral-storage`) and amounts in milli-units.
type Resources = BTreeMap<&'static str, i128>;

/// Whether a Pod's compute resources count: it has not ended (upstream: not `Succeeded` or
/// `Failed`).
pub fn is_running(pod: &Value) -> bool {
    !matches!(
        pod.pointer("/status/phase").and_then(Value::as_str),
        Some("Succeeded" | "Failed")
    )
}

/// Whether a quota resource's amounts are bytes (printed with binary suffixes).
pub fn is_bytes(key: &str) -> bool {
    key.ends_with("memory") || key.ends_with("storage")
}

/// What a PersistentVolumeClaim uses of each quota resource: one claim, and its storage request.
pub fn claim_usage(claim: &Value) -> Usage {
    let storage = claim
        .pointer("/spec/resources/requests/storage")
        .and_then(Value::as_str)
        .and_then(|q| parse_millis(q).ok())
        .unwrap_or_default();
    Usage::from([
        ("count/persistentvolumeclaims", 1000),
        ("persistentvolumeclaims", 1000),
        ("requests.storage", storage),
    ])
}

/// What `obj` uses of the quota resources, by its kind (`None`: a kind no quota counts).
pub fn usage_of(kind: &str, obj: &Value) -> Option<Usage> {
    match kind {
        "Pod" => Some(pod_usage(obj)),
        "PersistentVolumeClaim" => Some(claim_usage(obj)),
        _ => None,
    }
}

/// What `pod` uses of each quota resource it counts against.
pub fn pod_usage(pod: &Value) -> Usage {
    let mut usage = Usage::from([("count/pods", 1000)]);
    if !is_running(pod) {
        return usage;
    }
    usage.insert("pods", 1000);
    let (requests, limits) = pod_resources(pod);
    usage.extend(compute_usage(&requests, &limits));
    usage
}

/// The quota resources that `requests` and `limits` use (upstream's `podComputeUsageHelper`).
fn compute_usage(requests: &Resources, limits: &Resources) -> Usage {
    let mut usage = Usage::new();
    for (resource, requests_key, limits_key) in [
        ("cpu", "requests.cpu", "limits.cpu"),
        ("memory", "requests.memory", "limits.memory"),
        (
            "ephemeral-storage",
            "requests.ephemeral-storage",
            "limits.ephemeral-storage",
        ),
    ] {
        if let Some(&amount) = requests.get(resource) {
            usage.insert(resource, amount);
            usage.insert(requests_key, amount);
        }
        if let Some(&amount) = limits.get(resource) {
            usage.insert(limits_key, amount);
        }
    }
    usage
}

/// A container's compute requests and limits; a resource limited but not requested is requested
/// at its limit (as the API server defaults it). Quantities were validated at the Pod's create.
fn container_resources(container: &Value) -> (Resources, Resources) {
    let read = |what: &str| -> Resources {
        COMPUTE
            .into_iter()
            .filter_map(|resource| {
                let text = container
                    .pointer(&format!("/resources/{what}/{resource}"))?
                    .as_str()?;
                Some((resource, parse_millis(text).ok()?))
            })
            .collect()
    };
    let limits = read("limits");
    let mut requests = read("requests");
    for (resource, amount) in &limits {
        requests.entry(resource).or_insert(*amount);
    }
    (requests, limits)
}

/// A Pod's requests and limits (upstream's `PodRequests` and `PodLimits`): the containers' sum,
/// or more when an init container needs more (a restartable init container, a sidecar, runs
/// beside what follows it, so it adds to both), plus the Pod's overhead.
pub(crate) fn pod_resources(pod: &Value) -> (Resources, Resources) {
    let add = |to: &mut Resources, from: &Resources| {
        for (resource, amount) in from {
            *to.entry(resource).or_default() += amount;
        }
    };
    let max = |to: &mut Resources, from: &Resources| {
        for (resource, amount) in from {
            let current = to.entry(resource).or_default();
            *current = (*current).max(*amount);
        }
    };
    let list = |field: &str| pod.pointer(&format!("/spec/{field}")).and_then(Value::as_array);
    let (mut requests, mut limits) = (Resources::new(), Resources::new());
    for container in list("containers").into_iter().flatten() {
        let (r, l) = container_resources(container);
        add(&mut requests, &r);
        add(&mut limits, &l);
    }
    let (mut sidecars_requests, mut sidecars_limits) = (Resources::new(), Resources::new());
    let (mut init_requests, mut init_limits) = (Resources::new(), Resources::new());
    for container in list("initContainers").into_iter().flatten() {
        let (mut r, mut l) = container_resources(container);
        if container.get("restartPolicy").and_then(Value::as_str) == Some("Always") {
            add(&mut requests, &r);
            add(&mut limits, &l);
            add(&mut sidecars_requests, &r);
            add(&mut sidecars_limits, &l);
            r = sidecars_requests.clone();
            l = sidecars_limits.clone();
        } else {
            add(&mut r, &sidecars_requests);
            add(&mut l, &sidecars_limits);
        }
        max(&mut init_requests, &r);
        max(&mut init_limits, &l);
    }
    max(&mut requests, &init_requests);
    max(&mut limits, &init_limits);
    let overhead: Resources = COMPUTE
        .into_iter()
        .filter_map(|resource| {
            let text = pod.pointer(&format!("/spec/overhead/{resource}"))?.as_str()?;
            Some((resource, parse_millis(text).ok()?))
        })
        .collect();
    add(&mut requests, &overhead);
    add(&mut limits, &overhead);
    (requests, limits)
}

/// A quota's `spec.hard`, in milli-units, for the resources devcluster counts (the only ones a
/// quota may name: see [`validate_hard`]).
pub fn hard_of(quota: &Value) -> BTreeMap<&'static str, i128> {
    let Some(hard) = quota.pointer("/spec/hard").and_then(Value::as_object) else {
        return BTreeMap::new();
    };
    counted()
        .filter_map(|key| {
            let amount = match hard.get(key)? {
                Value::String(s) => parse_millis(s).ok()?,
                other => i128::from(other.as_u64()?) * 1000,
            };
            Some((key, amount))
        })
        .collect()
}

/// What is wrong with a quota's `spec.hard` entry `key` (`None`: nothing).
pub fn validate_hard(key: &str, value: &Value) -> Option<String> {
    if !counted().any(|k| k == key) {
        return Some(format!(
            "devcluster counts only {} (of Pods) and {} (of PersistentVolumeClaims): a quota on {key} would not \
             be enforced",
            POD_QUOTA_KEYS.join(", "),
            CLAIM_QUOTA_KEYS.join(", ")
        ));
    }
    let millis = match value {
        Value::String(s) => match parse_millis(s) {
            Ok(millis) => millis,
            Err(why) => return Some(why),
        },
        other => match other.as_u64() {
            Some(n) => i128::from(n) * 1000,
            None => return Some("must be a quantity".into()),
        },
    };
    (key.ends_with("pods") && millis % 1000 != 0).then(|| "must be a whole number of Pods".into())
}

/// Why `pod` may not be created in a namespace whose quota limits `hard`, without counting
/// anything: each container (init containers too) must state the cpu and memory requests and
/// limits the quota limits (`must specify requests.cpu for: app,sidecar; ...`).
pub fn missing_resources(pod: &Value, hard: &BTreeMap<&'static str, i128>) -> Option<String> {
    let required: Vec<&str> = MUST_SPECIFY
        .into_iter()
        .filter(|k| hard.contains_key(k))
        .collect();
    if required.is_empty() {
        return None;
    }
    let mut missing: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for field in ["containers", "initContainers"] {
        let containers = pod.pointer(&format!("/spec/{field}")).and_then(Value::as_array);
        for container in containers.into_iter().flatten() {
            let (requests, limits) = container_resources(container);
            let stated = compute_usage(&requests, &limits);
            for key in &required {
                if !stated.contains_key(key) {
                    let name = container.get("name").and_then(Value::as_str).unwrap_or_default();
                    missing.entry(key).or_default().insert(name);
                }
            }
        }
    }
    (!missing.is_empty()).then(|| {
        missing
            .into_iter()
            .map(|(key, names)| {
                format!(
                    "must specify {key} for: {}",
                    names.into_iter().collect::<Vec<_>>().join(",")
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    })
}

/// `key=amount` pairs for `keys`, as upstream prints resource lists in quota messages.
pub fn print_amounts(amounts: &BTreeMap<&'static str, i128>, keys: &[&str]) -> String {
    keys.iter()
        .map(|key| {
            let amount = amounts.get(key).copied().unwrap_or_default();
            format!("{key}={}", format_millis(amount, is_bytes(key)))
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Keeps every quota's status until `stop`.
pub async fn run(store: Arc<Store>, stop: watch::Receiver<bool>) {
    crate::store::reconcile_namespaces(
        store,
        &["pods", "persistentvolumeclaims", "resourcequotas"],
        "resourcequotas",
        reconcile,
        stop,
    )
    .await;
}

/// Brings the status of `namespace`'s quotas up to date with its Pods.
fn reconcile(store: &Store, namespace: &str) {
    let (quotas, _) = store.list("resourcequotas", Some(namespace));
    if quotas.is_empty() {
        return;
    }
    let (pods, _) = store.list("pods", Some(namespace));
    let (claims, _) = store.list("persistentvolumeclaims", Some(namespace));
    let mut used = Usage::new();
    let usages = pods
        .iter()
        .map(|p| pod_usage(p))
        .chain(claims.iter().map(|c| claim_usage(c)));
    for usage in usages {
        for (key, amount) in usage {
            *used.entry(key).or_default() += amount;
        }
    }
    for quota in quotas {
        let name = name_of(&quota).to_string();
        let _ = store.transact("resourcequotas", (namespace.to_string(), name), |_, current| {
            // Gone, or replaced since it was listed: its own change brings it here again.
            let Some(current) = current else {
                return Ok(Outcome::Unchanged);
            };
            let status = status_of(current, &used);
            if current.get("status") == Some(&status) {
                return Ok(Outcome::Unchanged);
            }
            let mut updated = current.clone();
            updated["status"] = status;
            Ok(Outcome::Put(updated))
        });
    }
}

/// A quota's status with `used` counted in its namespace.
fn status_of(quota: &Value, used: &Usage) -> Value {
    let hard = quota
        .pointer("/spec/hard")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let used: Map<String, Value> = counted()
        .filter(|key| hard.contains_key(*key))
        .map(|key| {
            let amount = used.get(key).copied().unwrap_or_default();
            (key.to_string(), json!(format_millis(amount, is_bytes(key))))
        })
        .collect();
    json!({"hard": hard, "used": used})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(name: &str, resources: Value) -> Value {
        json!({"name": name, "image": "busybox", "resources": resources})
    }

    #[test]
    fn status_mirrors_hard_and_counts_what_it_names() {
        let quota = json!({"spec": {"hard": {"pods": "3", "requests.cpu": "2", "limits.memory": "1Gi"}}});
        let used = Usage::from([("pods", 2000), ("count/pods", 3000), ("requests.cpu", 1500)]);
        assert_eq!(
            status_of(&quota, &used),
            json!({
                "hard": {"pods": "3", "requests.cpu": "2", "limits.memory": "1Gi"},
                "used": {"pods": "2", "requests.cpu": "1500m", "limits.memory": "0"}
            })
        );
        assert_eq!(status_of(&json!({}), &used), json!({"hard": {}, "used": {}}));
    }

    #[test]
    fn a_pod_uses_its_containers_sum_or_its_largest_init_step_plus_overhead() {
        let pod = json!({"spec": {
            "containers": [
                container("app", json!({"requests": {"cpu": "250m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}})),
                // Limited only: requested at its limit.
                container("proxy", json!({"limits": {"cpu": "100m", "memory": "32Mi"}})),
            ],
            "initContainers": [
                // A sidecar: runs beside everything after it.
                {"name": "log", "image": "busybox", "restartPolicy": "Always",
                 "resources": {"requests": {"cpu": "50m"}}},
                // Runs alone (beside the sidecar): its 1 cpu + 50m is more than the containers'.
                container("migrate", json!({"requests": {"cpu": "1"}})),
            ],
            "overhead": {"cpu": "10m"}
        }});
        let usage = pod_usage(&pod);
        assert_eq!(usage["count/pods"], 1000);
        assert_eq!(usage["pods"], 1000);
        assert_eq!((usage["cpu"], usage["requests.cpu"]), (1060, 1060));
        assert_eq!(usage["requests.memory"], (96_i128 << 20) * 1000);
        assert_eq!(usage["limits.memory"], (160_i128 << 20) * 1000);
        assert_eq!(usage["limits.cpu"], 110);
        let ended = json!({"spec": pod["spec"], "status": {"phase": "Succeeded"}});
        assert_eq!(pod_usage(&ended), Usage::from([("count/pods", 1000)]));
    }

    #[test]
    fn a_quota_on_cpu_or_memory_needs_every_container_to_state_it() {
        let hard = BTreeMap::from([("limits.cpu", 2000), ("requests.memory", 1000), ("pods", 5000)]);
        let pod = json!({"spec": {
            "containers": [
                container("app", json!({"limits": {"cpu": "1", "memory": "1Gi"}})),
                container("sidecar", json!({})),
            ],
            "initContainers": [container("init", json!({"requests": {"memory": "1Mi"}}))]
        }});
        assert_eq!(
            missing_resources(&pod, &hard).as_deref(),
            Some("must specify limits.cpu for: init,sidecar; must specify requests.memory for: sidecar")
        );
        let counted_only = BTreeMap::from([("pods", 5000), ("limits.ephemeral-storage", 1000)]);
        assert_eq!(missing_resources(&pod, &counted_only), None);
    }

    #[test]
    fn a_quota_may_name_only_what_devcluster_counts() {
        assert_eq!(validate_hard("requests.cpu", &json!("1500m")), None);
        assert_eq!(validate_hard("pods", &json!(3)), None);
        assert_eq!(
            validate_hard("pods", &json!("1.5")).as_deref(),
            Some("must be a whole number of Pods")
        );
        assert!(
            validate_hard("memory", &json!("lots"))
                .unwrap()
                .contains("regular expression")
        );
        assert!(
            validate_hard("services", &json!("2"))
                .unwrap()
                .contains("a quota on services would not be enforced")
        );
    }
}
