//! PodDisruptionBudgets, as upstream's disruption controller computes their status and the
//! `pods/eviction` subresource honours them (what `kubectl drain` calls).
//!
//! ```text
//!  store changes (Pods, PodDisruptionBudgets) ─► their namespace ─► each budget there:
//!      the Pods it selects ─► status {expectedPods, currentHealthy, desiredHealthy,
//!                                     disruptionsAllowed, observedGeneration, DisruptionAllowed}
//!  POST pods/<name>/eviction ─► Pod ended, Pending or terminating? ─► deleted
//!      ─► budgets selecting it: none ─► deleted; more than one ─► 500 (upstream's words)
//!      ─► one: healthy Pods left above what it wants? ─► deleted, else 429 TooManyRequests
//! ```
//!
//! Upstream takes the expected Pods of a `maxUnavailable` or a percentage from the scale of the
//! Pods' controllers; devcluster serves no workload controllers, so it counts the Pods the budget
//! selects (as upstream does for a whole `minAvailable`). An eviction is decided on the budget's
//! status computed at that moment, one eviction at a time, so two evictions never both take the
//! last allowed disruption (upstream decrements `disruptionsAllowed` in the same write).

use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::watch;

use crate::status::{ApiError, Cause};
use crate::store::{Outcome, Store};

/// The storage of PodDisruptionBudgets.
const BUDGETS: &str = "poddisruptionbudgets";

/// What a budget computes over the Pods it selects.
#[derive(Debug, PartialEq, Eq)]
pub struct Disruptions {
    /// Pods the budget selects.
    pub expected_pods: i64,
    /// Of those, the Ready ones not being deleted.
    pub current_healthy: i64,
    /// How many must stay healthy.
    pub desired_healthy: i64,
    /// How many may be evicted now.
    pub disruptions_allowed: i64,
}

/// Whether the budget `budget` selects `pod` (same namespace; a null selector selects nothing,
/// an empty one every Pod, as policy/v1 says).
pub fn selects(budget: &Value, pod: &Value) -> bool {
    if budget.pointer("/metadata/namespace") != pod.pointer("/metadata/namespace") {
        return false;
    }
    let Some(selector) = crate::affinity::selector(&budget["spec"]["selector"]) else {
        return false;
    };
    selector.matches(&crate::affinity::strings(&pod["metadata"]["labels"]))
}

/// Whether `pod` counts as healthy: Ready and not being deleted.
fn healthy(pod: &Value) -> bool {
    pod.pointer("/metadata/deletionTimestamp")
        .is_none_or(Value::is_null)
        && pod["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// `value` (a whole number or a percentage of `total`, rounded up), as upstream's
/// `GetScaledValueFromIntOrPercent(value, total, true)`.
fn scaled(value: &Value, total: i64) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => {
            let percent: i64 = s.strip_suffix('%')?.parse().ok()?;
            Some((percent * total + 99) / 100)
        }
        _ => None,
    }
}

/// The budget's numbers over `pods` (those of its namespace).
pub fn disruptions<'a>(budget: &Value, pods: impl IntoIterator<Item = &'a Value>) -> Disruptions {
    let selected: Vec<&Value> = pods.into_iter().filter(|p| selects(budget, p)).collect();
    let expected_pods = selected.len() as i64;
    let current_healthy = selected.iter().filter(|p| healthy(p)).count() as i64;
    let spec = &budget["spec"];
    let desired_healthy = if let Some(max) = spec.get("maxUnavailable").filter(|v| !v.is_null()) {
        (expected_pods - scaled(max, expected_pods).unwrap_or(0)).max(0)
    } else if let Some(min) = spec.get("minAvailable").filter(|v| !v.is_null()) {
        scaled(min, expected_pods).unwrap_or(0)
    } else {
        0
    };
    // Upstream allows nothing while a budget selects no Pod, so its first Pods are safe before
    // it is computed again.
    let disruptions_allowed = if expected_pods > 0 {
        (current_healthy - desired_healthy).max(0)
    } else {
        0
    };
    Disruptions {
        expected_pods,
        current_healthy,
        desired_healthy,
        disruptions_allowed,
    }
}

/// Upstream's validation of a budget's spec: one of `minAvailable` and `maxUnavailable`, each a
/// non-negative whole number or a percentage up to 100%, and a known unhealthy Pod policy.
pub fn validate_budget(obj: &Value, causes: &mut Vec<Cause>) {
    let spec = &obj["spec"];
    let stated = |field: &str| spec.get(field).filter(|v| !v.is_null());
    if stated("minAvailable").is_some() && stated("maxUnavailable").is_some() {
        causes.push(Cause::invalid(
            "spec",
            spec,
            "minAvailable and maxUnavailable cannot be both set",
        ));
    }
    for field in ["minAvailable", "maxUnavailable"] {
        let Some(value) = stated(field) else { continue };
        let at = format!("spec.{field}");
        match value {
            Value::Number(n) if n.as_i64().is_some_and(|n| n >= 0) => {}
            Value::Number(_) => causes.push(Cause::invalid(at, value, "must be greater than or equal to 0")),
            Value::String(s) => match s.strip_suffix('%').map(str::parse::<i64>) {
                Some(Ok(p)) if (0..=100).contains(&p) => {}
                Some(Ok(_)) => causes.push(Cause::invalid(at, value, "must not be greater than 100%")),
                _ => causes.push(Cause::invalid(at, value, "a valid percent string must be a numeric string followed by an ending '%' (e.g. '1%',  or '93%', regex used for validation is '[0-9]+%')")),
            },
            _ => causes.push(Cause::invalid(at, value, "must be an integer or percentage (e.g '5%')")),
        }
    }
    if let Some(policy) = spec.get("unhealthyPodEvictionPolicy").filter(|v| !v.is_null())
        && !matches!(policy.as_str(), Some("IfHealthyBudget" | "AlwaysAllow"))
    {
        causes.push(Cause::not_supported(
            "spec.unhealthyPodEvictionPolicy",
            policy,
            &["AlwaysAllow", "IfHealthyBudget"],
        ));
    }
    if spec.get("selector").is_some_and(|s| !s.is_null())
        && crate::affinity::selector(&spec["selector"]).is_none()
    {
        causes.push(Cause::invalid(
            "spec.selector",
            &spec["selector"],
            "invalid label selector",
        ));
    }
}

/// The status the disruption controller writes for `budget`, keeping a condition's transition
/// time while its status holds.
fn status_of(budget: &Value, numbers: &Disruptions) -> Value {
    let allowed = numbers.disruptions_allowed > 0;
    let (status, reason) = if allowed {
        ("True", "SufficientPods")
    } else {
        ("False", "InsufficientPods")
    };
    let previous = budget["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "DisruptionAllowed"))
        .filter(|c| c["status"] == status)
        .and_then(|c| c.get("lastTransitionTime").cloned());
    let since = previous
        .unwrap_or_else(|| json!(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)));
    json!({
        "observedGeneration": budget.pointer("/metadata/generation").cloned().unwrap_or(json!(1)),
        "expectedPods": numbers.expected_pods,
        "currentHealthy": numbers.current_healthy,
        "desiredHealthy": numbers.desired_healthy,
        "disruptionsAllowed": numbers.disruptions_allowed,
        "conditions": [{
            "type": "DisruptionAllowed", "status": status, "reason": reason, "message": "",
            "observedGeneration": budget.pointer("/metadata/generation").cloned().unwrap_or(json!(1)),
            "lastTransitionTime": since,
        }],
    })
}

/// Keeps every budget's status current until `stop`.
pub async fn run(store: Arc<Store>, stop: watch::Receiver<bool>) {
    crate::store::reconcile_namespaces(store, &["pods", BUDGETS], BUDGETS, reconcile, stop).await;
}

/// Brings the status of `namespace`'s budgets up to date with its Pods.
fn reconcile(store: &Store, namespace: &str) {
    let (budgets, _) = store.list(BUDGETS, Some(namespace));
    if budgets.is_empty() {
        return;
    }
    let (pods, _) = store.list("pods", Some(namespace));
    for budget in budgets {
        let name = budget["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let numbers = disruptions(&budget, pods.iter().map(AsRef::as_ref));
        let _ = store.transact(BUDGETS, (namespace.to_string(), name), |_, current| {
            let Some(current) = current else {
                return Ok(Outcome::Unchanged);
            };
            let status = status_of(current, &numbers);
            if current["status"] == status {
                return Ok(Outcome::Unchanged);
            }
            let mut next = current.clone();
            next["status"] = status;
            Ok(Outcome::Put(next))
        });
    }
}

/// Whether an eviction of `pod` is allowed now, as upstream's eviction subresource decides: a Pod
/// that ended, is Pending or is being deleted goes whatever the budgets; else the one budget
/// selecting it must allow a disruption (or, for an unhealthy Pod, already have the healthy
/// Pods it wants, or say `AlwaysAllow`).
pub fn eviction_allowed(pod: &Value, pods: &[Arc<Value>], budgets: &[Arc<Value>]) -> Result<(), ApiError> {
    let phase = pod["status"]["phase"].as_str().unwrap_or("Pending");
    let terminating = pod
        .pointer("/metadata/deletionTimestamp")
        .is_some_and(|t| !t.is_null());
    if matches!(phase, "Succeeded" | "Failed" | "Pending") || terminating {
        return Ok(());
    }
    let mut selecting = budgets.iter().filter(|b| selects(b, pod));
    let Some(budget) = selecting.next() else {
        return Ok(());
    };
    if selecting.next().is_some() {
        return Err(ApiError::internal(
            "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.",
        ));
    }
    let numbers = disruptions(budget, pods.iter().map(AsRef::as_ref));
    if !healthy(pod) {
        let policy = budget["spec"]["unhealthyPodEvictionPolicy"]
            .as_str()
            .unwrap_or("IfHealthyBudget");
        if policy == "AlwaysAllow"
            || numbers.current_healthy >= numbers.desired_healthy && numbers.desired_healthy > 0
        {
            return Ok(());
        }
    }
    if numbers.disruptions_allowed > 0 {
        return Ok(());
    }
    Err(ApiError::disruption_budget(
        pod["metadata"]["name"].as_str().unwrap_or_default(),
        budget["metadata"]["name"].as_str().unwrap_or_default(),
        numbers.desired_healthy,
        numbers.current_healthy,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, labels: Value, ready: bool) -> Arc<Value> {
        Arc::new(json!({
            "metadata": {"name": name, "namespace": "ns", "labels": labels},
            "status": {"phase": "Running",
                       "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
        }))
    }

    fn budget(spec: Value) -> Arc<Value> {
        Arc::new(json!({"metadata": {"name": "web", "namespace": "ns", "generation": 3}, "spec": spec}))
    }

    #[test]
    fn a_budget_counts_the_pods_it_selects_as_upstream() {
        let pods = [
            pod("a", json!({"app": "web"}), true),
            pod("b", json!({"app": "web"}), true),
            pod("c", json!({"app": "web"}), false),
            pod("d", json!({"app": "db"}), true),
        ];
        let count = |spec: Value| disruptions(&budget(spec), pods.iter().map(AsRef::as_ref));
        let selector = json!({"matchLabels": {"app": "web"}});
        assert_eq!(
            count(json!({"minAvailable": 1, "selector": selector})),
            Disruptions {
                expected_pods: 3,
                current_healthy: 2,
                desired_healthy: 1,
                disruptions_allowed: 1
            }
        );
        assert_eq!(
            count(json!({"minAvailable": "50%", "selector": selector})).desired_healthy,
            2,
            "rounded up"
        );
        assert_eq!(
            count(json!({"maxUnavailable": 1, "selector": selector})).desired_healthy,
            2
        );
        assert_eq!(
            count(json!({"maxUnavailable": "10%", "selector": selector})).desired_healthy,
            2
        );
        assert_eq!(
            count(json!({"minAvailable": 1})).expected_pods,
            0,
            "a null selector selects nothing"
        );
        assert_eq!(
            count(json!({"minAvailable": 1, "selector": {}})).expected_pods,
            4,
            "an empty one everything"
        );
        let status = status_of(
            &budget(json!({"minAvailable": 2, "selector": selector})),
            &count(json!({"minAvailable": 2, "selector": selector})),
        );
        assert_eq!(status["observedGeneration"], 3);
        assert_eq!(status["disruptionsAllowed"], 0);
        assert_eq!(status["conditions"][0]["reason"], "InsufficientPods");
    }

    #[test]
    fn an_eviction_keeps_what_the_budget_wants_healthy() {
        let pods = vec![
            pod("a", json!({"app": "web"}), true),
            pod("b", json!({"app": "web"}), true),
            pod("c", json!({"app": "web"}), false),
        ];
        let strict = vec![budget(
            json!({"minAvailable": 2, "selector": {"matchLabels": {"app": "web"}}}),
        )];
        let refused = eviction_allowed(&pods[0], &pods, &strict).unwrap_err();
        assert_eq!(refused.code, 429);
        assert_eq!(
            refused.message,
            "Cannot evict pod as it would violate the pod's disruption budget."
        );
        assert_eq!(
            refused.details.unwrap()["causes"][0]["message"],
            "The disruption budget web needs 2 healthy pods and has 2 currently"
        );
        // The unhealthy Pod goes: the budget has the healthy Pods it wants.
        eviction_allowed(&pods[2], &pods, &strict).unwrap();
        let loose = vec![budget(
            json!({"minAvailable": 1, "selector": {"matchLabels": {"app": "web"}}}),
        )];
        eviction_allowed(&pods[0], &pods, &loose).unwrap();
        // Not selected, or not running yet: no budget applies.
        eviction_allowed(&pod("x", json!({"app": "db"}), true), &pods, &strict).unwrap();
        let mut pending = (*pods[0]).clone();
        pending["status"]["phase"] = json!("Pending");
        eviction_allowed(&pending, &pods, &strict).unwrap();
        let two = vec![
            strict[0].clone(),
            budget(json!({"maxUnavailable": 1, "selector": {}})),
        ];
        assert_eq!(eviction_allowed(&pods[0], &pods, &two).unwrap_err().code, 500);
    }
}
