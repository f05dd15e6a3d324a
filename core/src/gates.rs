//! A Pod's gates across the two clusters: its scheduling gates (which the host agent folds into
//! one gate of its own on the host Pod) and its readiness gates.
//!
//! Readiness gates: a controller of the tenant's (a load balancer's,
//! say) sets a gate's condition on the virtual Pod; the host's kubelet counts the Pod Ready only
//! when the host Pod carries it too. So those conditions travel virtual → host, while the rest of
//! the status travels host → virtual:
//!
//! ```text
//!  virtual Pod status.conditions[type ∈ readinessGates] ──ApplyPod──► host Pod status (patch)
//!  host Pod status (phase, Ready, IPs, …)  ──WatchPodStatus──► virtual Pod status, gate conditions kept
//! ```
//!
//! Condition types the kubelet and scheduler own (`Ready`, `PodScheduled`, …) are never a gate's:
//! a Pod naming one as its gate cannot write it on the host.

use k8s_openapi::api::core::v1::{Pod, PodCondition};

/// Condition types the kubelet, the scheduler and the API server write; a readiness gate naming
/// one is not the tenant's to set on the host.
pub const SYSTEM_CONDITION_TYPES: &[&str] = &[
    "PodScheduled",
    "PodReadyToStartContainers",
    "Initialized",
    "ContainersReady",
    "Ready",
    "DisruptionTarget",
    "PodResizePending",
    "PodResizeInProgress",
];

/// The names of `pod`'s scheduling gates, in order.
pub fn scheduling_gates(pod: &Pod) -> Vec<&str> {
    pod.spec
        .as_ref()
        .and_then(|s| s.scheduling_gates.as_ref())
        .into_iter()
        .flatten()
        .map(|g| g.name.as_str())
        .collect()
}

/// The condition types of `pod`'s readiness gates that its controllers set (system types left
/// out), sorted.
pub fn readiness_types(pod: &Pod) -> Vec<&str> {
    let mut types: Vec<&str> = pod
        .spec
        .as_ref()
        .and_then(|s| s.readiness_gates.as_ref())
        .into_iter()
        .flatten()
        .map(|g| g.condition_type.as_str())
        .filter(|t| !SYSTEM_CONDITION_TYPES.contains(t))
        .collect();
    types.sort_unstable();
    types.dedup();
    types
}

/// The conditions of `pod`'s readiness gates it carries, by type.
pub fn readiness_conditions(pod: &Pod) -> Vec<PodCondition> {
    let types = readiness_types(pod);
    if types.is_empty() {
        return Vec::new();
    }
    let mut conditions: Vec<PodCondition> = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .filter(|c| types.contains(&c.type_.as_str()))
        .cloned()
        .collect();
    conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
    conditions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_conditions_of_the_pods_own_gates_are_the_tenants() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "spec": {"containers": [], "readinessGates": [
                {"conditionType": "example.com/lb-ready"}, {"conditionType": "Ready"}]},
            "status": {"conditions": [
                {"type": "Ready", "status": "True"},
                {"type": "example.com/lb-ready", "status": "True"},
                {"type": "example.com/other", "status": "True"}]},
        }))
        .unwrap();
        assert_eq!(readiness_types(&pod), ["example.com/lb-ready"]);
        let types: Vec<String> = readiness_conditions(&pod).into_iter().map(|c| c.type_).collect();
        assert_eq!(types, ["example.com/lb-ready"]);
    }
}
