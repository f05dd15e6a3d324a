//! A tenant's PodDisruptionBudget held on the host: its selector scoped to the tenant's Pods of
//! its namespace, a whole number of healthy Pods asked for.

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use rcsync_core::Tenant;

use super::scheduling::scope_selector;
use super::{copy_metadata, held_identity, identity_annotations};

/// Why a virtual PodDisruptionBudget has no host budget.
#[derive(Debug, PartialEq, Eq)]
pub enum BudgetProblem {
    /// The request is malformed (no name, namespace or uid): the caller's bug.
    Invalid(String),
    /// The budget cannot be held on the host as it stands: a refusal the tenant sees.
    Unsupported(String),
}

/// The host PodDisruptionBudget of a virtual one of `tenant`: named, labelled and annotated as
/// the tenant's other host objects; its selector rewritten to the keys the host Pods carry the
/// virtual labels under ([`host_label_key`](rcsync_core::naming::host_label_key)) and narrowed to the tenant's host Pods of the
/// budget's own virtual namespace (an empty selector, all of that namespace's Pods; a null one,
/// none, as upstream). The host's disruption controller counts the replicas a `maxUnavailable` or
/// a percentage is taken of from the Pods' controllers, which live in the virtual cluster (host
/// Pods have none), so such a budget asks the host for the whole number of healthy Pods the
/// virtual cluster's disruption controller computed (`status.desiredHealthy`, once its
/// `observedGeneration` caught up with the spec); a whole `minAvailable` is sent as it is.
pub fn host_disruption_budget(
    virtual_budget: &PodDisruptionBudget,
    tenant: &Tenant,
) -> Result<PodDisruptionBudget, BudgetProblem> {
    let meta = &virtual_budget.metadata;
    let (name, namespace, uid) =
        held_identity(meta, "PodDisruptionBudget").map_err(BudgetProblem::Invalid)?;
    let spec = virtual_budget.spec.clone().unwrap_or_default();
    let whole = |v: &IntOrString| matches!(v, IntOrString::Int(_));
    let (min_available, max_unavailable) = match (&spec.min_available, &spec.max_unavailable) {
        (Some(min), None) if whole(min) => (Some(min.clone()), None),
        (None, None) => (None, None),
        (min, max) => {
            let stated = match (min, max) {
                (Some(IntOrString::String(p)), _) => format!("minAvailable: {p}"),
                (_, Some(IntOrString::Int(n))) => format!("maxUnavailable: {n}"),
                (_, Some(IntOrString::String(p))) => format!("maxUnavailable: {p}"),
                _ => "its spec".to_string(),
            };
            let desired_healthy = virtual_budget
                .status
                .as_ref()
                .filter(|s| s.observed_generation.is_some() && s.observed_generation >= meta.generation)
                .and_then(|s| s.desired_healthy);
            match desired_healthy {
                Some(healthy) => (Some(IntOrString::Int(healthy)), None),
                None => {
                    return Err(BudgetProblem::Unsupported(format!(
                        "{stated} is counted on the host as the healthy Pods the virtual cluster's disruption \
                         controller wants (status.desiredHealthy), which it has not computed for this spec yet"
                    )));
                }
            }
        }
    };
    let selector = spec.selector.map(|mut selector| {
        scope_selector(&mut selector, tenant.name.as_str(), Some(vec![namespace.clone()]));
        selector
    });
    let mut metadata = copy_metadata(&name, &namespace, tenant);
    metadata.annotations = Some(identity_annotations(&name, &namespace, Some(&uid)));
    Ok(PodDisruptionBudget {
        metadata,
        spec: Some(PodDisruptionBudgetSpec {
            min_available,
            max_unavailable,
            selector,
            unhealthy_pod_eviction_policy: spec.unhealthy_pod_eviction_policy,
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::tenant;
    use super::*;
    use rcsync_core::naming::{ANNOTATION_OBJECT_UID, LABEL_MANAGED_BY, LABEL_NAMESPACE, host_label_key};
    use std::collections::BTreeMap;

    fn budget(spec: serde_json::Value, status: serde_json::Value) -> PodDisruptionBudget {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": "b-1", "generation": 2,
                         "labels": {"team": "x"}, "annotations": {"note": "virtual only"}},
            "spec": spec,
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn a_disruption_budget_selects_the_tenants_pods_of_its_namespace_and_asks_a_whole_number_of_them() {
        let host = host_disruption_budget(
            &budget(
                serde_json::json!({"minAvailable": 2, "unhealthyPodEvictionPolicy": "AlwaysAllow",
                                   "selector": {"matchLabels": {"app": "web"},
                                                "matchExpressions": [{"key": "tier", "operator": "Exists"}]}}),
                serde_json::Value::Null,
            ),
            &tenant(),
        )
        .unwrap();
        assert_eq!(host.metadata.name.as_deref(), Some("web-x-shop-x-team-a"));
        assert_eq!(host.metadata.namespace.as_deref(), Some("vc-team-a"));
        let annotations = host.metadata.annotations.clone().unwrap();
        assert_eq!(
            annotations.get(ANNOTATION_OBJECT_UID).map(String::as_str),
            Some("b-1")
        );
        assert!(
            !annotations.contains_key("note"),
            "the virtual metadata stays virtual"
        );
        assert!(!host.metadata.labels.clone().unwrap().contains_key("team"));
        let spec = host.spec.unwrap();
        assert_eq!(spec.min_available, Some(IntOrString::Int(2)));
        assert_eq!(spec.unhealthy_pod_eviction_policy.as_deref(), Some("AlwaysAllow"));
        let selector = spec.selector.unwrap();
        assert_eq!(
            selector.match_labels.unwrap(),
            BTreeMap::from([
                (host_label_key("app"), "web".to_string()),
                (LABEL_MANAGED_BY.to_string(), "team-a".to_string()),
            ])
        );
        let expressions = selector.match_expressions.unwrap();
        assert_eq!(expressions[0].key, host_label_key("tier"));
        assert_eq!(
            (expressions[1].key.as_str(), expressions[1].values.clone()),
            (LABEL_NAMESPACE, Some(vec!["shop".to_string()]))
        );

        // An empty selector: every Pod of the tenant's in that namespace; a null one: none.
        let everything = host_disruption_budget(
            &budget(
                serde_json::json!({"minAvailable": 1, "selector": {}}),
                serde_json::Value::Null,
            ),
            &tenant(),
        )
        .unwrap();
        let selector = everything.spec.unwrap().selector.unwrap();
        assert_eq!(selector.match_labels.unwrap().len(), 1);
        assert_eq!(selector.match_expressions.unwrap().len(), 1);
        let nothing = host_disruption_budget(
            &budget(serde_json::json!({"minAvailable": 1}), serde_json::Value::Null),
            &tenant(),
        )
        .unwrap();
        assert_eq!(nothing.spec.unwrap().selector, None);

        // maxUnavailable and percentages: the whole number the virtual cluster computed, once it
        // computed it for this spec.
        for spec in [
            serde_json::json!({"maxUnavailable": 1}),
            serde_json::json!({"minAvailable": "50%"}),
        ] {
            let current = serde_json::json!({"observedGeneration": 2, "desiredHealthy": 3, "currentHealthy": 4,
                                             "disruptionsAllowed": 1, "expectedPods": 4});
            let host = host_disruption_budget(&budget(spec.clone(), current), &tenant()).unwrap();
            let host_spec = host.spec.unwrap();
            assert_eq!(
                (host_spec.min_available, host_spec.max_unavailable),
                (Some(IntOrString::Int(3)), None)
            );
            let stale = serde_json::json!({"observedGeneration": 1, "desiredHealthy": 5, "currentHealthy": 4,
                                           "disruptionsAllowed": 0, "expectedPods": 4});
            let Err(BudgetProblem::Unsupported(message)) =
                host_disruption_budget(&budget(spec, stale), &tenant())
            else {
                panic!("a stale status is not used");
            };
            assert!(message.contains("status.desiredHealthy"), "{message}");
        }
        let mut anonymous = budget(serde_json::json!({"minAvailable": 1}), serde_json::Value::Null);
        anonymous.metadata.uid = None;
        assert_eq!(
            host_disruption_budget(&anonymous, &tenant()),
            Err(BudgetProblem::Invalid(
                "the PodDisruptionBudget has no metadata.uid".into()
            ))
        );
    }
}
