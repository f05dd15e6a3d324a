//! What a tenant's Pod may ask of the host's scheduler: tolerations (never a control plane's),
//! the node selector the host enforces, its scheduler; and its pod affinity, anti-affinity and
//! spread constraints scoped to the tenant's own Pods.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{PodAffinityTerm, PodSpec, Toleration, WeightedPodAffinityTerm};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use rcsync_core::naming::{LABEL_MANAGED_BY, LABEL_NAMESPACE, host_label_key};
use rcsync_core::{EnforcedToleration, PodPolicy};

/// Taint keys of control-plane nodes: tolerations for them never reach the host.
const CONTROL_PLANE_TAINTS: &[&str] = &[
    "node-role.kubernetes.io/control-plane",
    "node-role.kubernetes.io/master",
];

/// Tolerations, scheduler name: what the tenant may ask of the host's scheduler.
pub(super) fn apply_scheduling_policy(spec: &mut PodSpec, policy: &PodPolicy) {
    let mut tolerations: Vec<Toleration> = spec
        .tolerations
        .take()
        .unwrap_or_default()
        .into_iter()
        .filter(|t| {
            // An empty key with Exists tolerates every taint, control-plane ones included.
            let key = t.key.as_deref().unwrap_or_default();
            let wildcard = key.is_empty() && t.operator.as_deref() == Some("Exists");
            !wildcard && !CONTROL_PLANE_TAINTS.contains(&key)
        })
        .collect();
    for enforced in &policy.enforce_tolerations {
        let toleration = enforced_toleration(enforced);
        if !tolerations.contains(&toleration) {
            tolerations.push(toleration);
        }
    }
    spec.tolerations = Some(tolerations).filter(|t| !t.is_empty());
    // The tenant's pool of nodes: a different value the tenant chose stays, for
    // `node_selector_conflicts` to refuse (never silently moved to another node).
    if !policy.enforce_node_selector.is_empty() {
        let selector = spec.node_selector.get_or_insert_with(BTreeMap::new);
        for (key, value) in &policy.enforce_node_selector {
            selector.entry(key.clone()).or_insert_with(|| value.clone());
        }
    }
    if policy.always_pull_images {
        for container in spec
            .containers
            .iter_mut()
            .chain(spec.init_containers.iter_mut().flatten())
        {
            container.image_pull_policy = Some("Always".to_string());
        }
        for container in spec.ephemeral_containers.iter_mut().flatten() {
            container.image_pull_policy = Some("Always".to_string());
        }
    }
    if spec
        .scheduler_name
        .as_ref()
        .is_some_and(|name| !policy.host_schedulers.contains(name))
    {
        spec.scheduler_name = None;
    }
}

/// Rewrites the label selectors of a Pod's pod affinity and anti-affinity terms and topology
/// spread constraints so they select on the host what they select in the virtual cluster, and
/// nothing else: their keys become the hashed keys the host Pods carry the tenant's labels under
/// ([`host_label_key`]), and they are narrowed to the tenant's Pods (`vcluster.loft.sh/managed-by`)
/// of the virtual namespaces they select (`vcluster.loft.sh/namespace`: the Pod's own by default,
/// those of `namespaces`, all of the tenant's for an empty `namespaceSelector`). The host term
/// names no namespace, so it selects in the tenant's host namespace only: a tenant can neither
/// place its Pods by another tenant's Pods nor learn where those run. A term selecting namespaces
/// by their labels keeps its `namespaceSelector`, which [`super::unsupported`] refuses (the host cannot
/// see the virtual namespaces' labels). A null label selector selects no Pod and stays null.
pub(super) fn scope_pod_selectors(spec: &mut PodSpec, namespace: &str, tenant: &str) {
    if let Some(affinity) = spec.affinity.as_mut() {
        let mut terms: Vec<&mut PodAffinityTerm> = Vec::new();
        if let Some(a) = affinity.pod_affinity.as_mut() {
            terms.extend(terms_mut(
                &mut a.required_during_scheduling_ignored_during_execution,
                &mut a.preferred_during_scheduling_ignored_during_execution,
            ));
        }
        if let Some(a) = affinity.pod_anti_affinity.as_mut() {
            terms.extend(terms_mut(
                &mut a.required_during_scheduling_ignored_during_execution,
                &mut a.preferred_during_scheduling_ignored_during_execution,
            ));
        }
        for term in terms {
            let by_labels = term
                .namespace_selector
                .as_ref()
                .is_some_and(|s| !selects_everything(s));
            if by_labels {
                continue;
            }
            let namespaces = if term.namespace_selector.take().is_some() {
                None
            } else {
                match term.namespaces.take().unwrap_or_default() {
                    listed if listed.is_empty() => Some(vec![namespace.to_string()]),
                    listed => Some(listed),
                }
            };
            term.namespaces = None;
            if let Some(selector) = term.label_selector.as_mut() {
                scope_selector(selector, tenant, namespaces);
            }
            term.match_label_keys =
                host_label_keys(term.match_label_keys.take(), term.label_selector.as_ref());
            term.mismatch_label_keys =
                host_label_keys(term.mismatch_label_keys.take(), term.label_selector.as_ref());
        }
    }
    for constraint in spec.topology_spread_constraints.iter_mut().flatten() {
        // Skew is counted over the Pod's own namespace, as upstream counts it.
        if let Some(selector) = constraint.label_selector.as_mut() {
            scope_selector(selector, tenant, Some(vec![namespace.to_string()]));
        }
        constraint.match_label_keys = host_label_keys(
            constraint.match_label_keys.take(),
            constraint.label_selector.as_ref(),
        );
    }
}

/// The terms of a pod affinity or anti-affinity: the required ones, then those of the preferred.
fn terms_mut<'a>(
    required: &'a mut Option<Vec<PodAffinityTerm>>,
    preferred: &'a mut Option<Vec<WeightedPodAffinityTerm>>,
) -> impl Iterator<Item = &'a mut PodAffinityTerm> {
    required
        .iter_mut()
        .flatten()
        .chain(preferred.iter_mut().flatten().map(|w| &mut w.pod_affinity_term))
}

/// Whether a label selector selects everything (no requirement at all).
fn selects_everything(selector: &LabelSelector) -> bool {
    selector.match_labels.as_ref().is_none_or(BTreeMap::is_empty)
        && selector.match_expressions.as_ref().is_none_or(Vec::is_empty)
}

/// A tenant's selector with its keys hashed, narrowed to the tenant's Pods of `namespaces`
/// (virtual names; `None`: all of them).
pub(super) fn scope_selector(selector: &mut LabelSelector, tenant: &str, namespaces: Option<Vec<String>>) {
    let labels = selector.match_labels.take().unwrap_or_default();
    let mut labels: BTreeMap<String, String> = labels
        .into_iter()
        .map(|(key, value)| (host_label_key(&key), value))
        .collect();
    labels.insert(LABEL_MANAGED_BY.to_string(), tenant.to_string());
    selector.match_labels = Some(labels);
    let mut expressions = selector.match_expressions.take().unwrap_or_default();
    for expression in expressions.iter_mut() {
        expression.key = host_label_key(&expression.key);
    }
    if let Some(namespaces) = namespaces {
        expressions.push(LabelSelectorRequirement {
            key: LABEL_NAMESPACE.to_string(),
            operator: "In".to_string(),
            values: Some(namespaces),
        });
    }
    selector.match_expressions = (!expressions.is_empty()).then_some(expressions);
}

/// `matchLabelKeys` / `mismatchLabelKeys` as the host Pod carries those labels; keys the virtual
/// API server already merged into `selector` (as it does on create) are left out, so the host's
/// does not merge them twice.
fn host_label_keys(keys: Option<Vec<String>>, selector: Option<&LabelSelector>) -> Option<Vec<String>> {
    let merged: BTreeSet<&str> = selector
        .and_then(|s| s.match_expressions.as_ref())
        .into_iter()
        .flatten()
        .map(|e| e.key.as_str())
        .collect();
    let keys: Vec<String> = keys?
        .iter()
        .map(|k| host_label_key(k))
        .filter(|k| !merged.contains(k.as_str()))
        .collect();
    (!keys.is_empty()).then_some(keys)
}

/// The entries of a host Pod's node selector that contradict the node selector the host enforces
/// for its tenant (`sync.toHost.pods.enforceNodeSelector`), each as `key=tenant's value (the host
/// enforces key=value)`.
pub fn node_selector_conflicts(spec: &PodSpec, policy: &PodPolicy) -> Vec<String> {
    let selector = spec.node_selector.as_ref();
    policy
        .enforce_node_selector
        .iter()
        .filter_map(|(key, value)| {
            let chosen = selector?.get(key)?;
            (chosen != value)
                .then(|| format!("nodeSelector {key}={chosen} (the host enforces {key}={value})"))
        })
        .collect()
}

fn enforced_toleration(t: &EnforcedToleration) -> Toleration {
    Toleration {
        key: Some(t.key.clone()),
        operator: Some(if t.value.is_some() { "Equal" } else { "Exists" }.to_string()),
        value: t.value.clone(),
        effect: t.effect.map(|e| e.as_str().to_string()),
        toleration_seconds: None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{pod, pod_with, tenant, tenant_with, with_spec};
    use super::super::{host_pod, unsupported};
    use super::*;

    #[test]
    fn affinity_and_spread_selectors_select_the_tenants_pods_of_the_namespaces_they_name_only() {
        let web = |extra: serde_json::Value| {
            let mut term = serde_json::json!({"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "kubernetes.io/hostname"});
            for (k, v) in extra.as_object().unwrap() {
                term[k] = v.clone();
            }
            term
        };
        let pod = with_spec(serde_json::json!({
            "affinity": {
                "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                    web(serde_json::json!({})),
                    web(serde_json::json!({"namespaces": ["shop", "db"]})),
                    web(serde_json::json!({"namespaceSelector": {}})),
                    {"topologyKey": "zone"},
                ]},
                "podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 10, "podAffinityTerm": {
                    "labelSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["cache"]}]},
                    "matchLabelKeys": ["version", "app"], "topologyKey": "zone"}}]},
            },
            "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule",
                "labelSelector": {"matchLabels": {"app": "web"}}}],
        }));
        let spec = host_pod(&pod, &tenant(), "").unwrap().spec.unwrap();
        let json = serde_json::to_value(&spec).unwrap();
        let scoped = |namespaces: Option<serde_json::Value>| {
            let mut selector = serde_json::json!({"matchLabels": {
                host_label_key("app"): "web", LABEL_MANAGED_BY: "team-a"}});
            if let Some(namespaces) = namespaces {
                selector["matchExpressions"] =
                    serde_json::json!([{"key": LABEL_NAMESPACE, "operator": "In", "values": namespaces}]);
            }
            serde_json::json!({"labelSelector": selector, "topologyKey": "kubernetes.io/hostname"})
        };
        let required = &json["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"];
        // The Pod's own namespace by default, the listed ones, all of the tenant's: never a host
        // namespace of anybody else (the host terms name none).
        assert_eq!(required[0], scoped(Some(serde_json::json!(["default"]))));
        assert_eq!(required[1], scoped(Some(serde_json::json!(["shop", "db"]))));
        assert_eq!(required[2], scoped(None));
        assert_eq!(
            required[3],
            serde_json::json!({"topologyKey": "zone"}),
            "a null selector selects nothing"
        );
        let preferred = &json["affinity"]["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
            [0]["podAffinityTerm"];
        assert_eq!(
            preferred["labelSelector"]["matchExpressions"][0]["key"],
            host_label_key("tier")
        );
        assert_eq!(
            preferred["matchLabelKeys"],
            serde_json::json!([host_label_key("version"), host_label_key("app")])
        );
        let spread = &json["topologySpreadConstraints"][0]["labelSelector"];
        assert_eq!(
            spread,
            &scoped(Some(serde_json::json!(["default"])))["labelSelector"]
        );
        assert!(unsupported(&spec, &PodPolicy::default()).is_empty());

        // Namespaces selected by their labels: the host cannot see them.
        let by_labels = with_spec(serde_json::json!({"affinity": {"podAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                web(serde_json::json!({"namespaceSelector": {"matchLabels": {"team": "x"}}}))]}}}));
        let spec = host_pod(&by_labels, &tenant(), "").unwrap().spec.unwrap();
        assert_eq!(
            unsupported(&spec, &PodPolicy::default()),
            [
                "affinity.podAffinity.requiredDuringSchedulingIgnoredDuringExecution[0].namespaceSelector: namespaces selected by their labels cannot be resolved on the host (list them in namespaces, or select all with an empty namespaceSelector)"
            ]
        );
    }

    #[test]
    fn with_always_pull_images_every_container_pulls_its_image() {
        let pod = with_spec(serde_json::json!({
            "containers": [{"name": "c", "image": "private.example/app:1", "imagePullPolicy": "IfNotPresent"}],
            "initContainers": [{"name": "i", "image": "private.example/init:1", "imagePullPolicy": "Never"}],
            "ephemeralContainers": [{"name": "e", "image": "private.example/debug:1", "imagePullPolicy": "IfNotPresent"}],
        }));
        let policies = |pull: bool| {
            let spec = host_pod(
                &pod,
                &tenant_with(&format!("    policies: {{alwaysPullImages: {pull}}}\n")),
                "",
            )
            .unwrap()
            .spec
            .unwrap();
            [
                spec.containers[0].image_pull_policy.clone(),
                spec.init_containers.unwrap()[0].image_pull_policy.clone(),
                spec.ephemeral_containers.unwrap()[0].image_pull_policy.clone(),
            ]
        };
        let all = |policy: &str| Some(policy.to_string());
        assert_eq!(policies(true), [all("Always"), all("Always"), all("Always")]);
        assert_eq!(
            policies(false),
            [all("IfNotPresent"), all("Never"), all("IfNotPresent")]
        );
    }

    #[test]
    fn the_enforced_node_selector_is_required_and_a_pod_choosing_otherwise_conflicts() {
        let tenant = tenant_with("    sync: {toHost: {pods: {enforceNodeSelector: {pool: team-a}}}}\n");
        let spec = host_pod(&pod(), &tenant, "").unwrap().spec.unwrap();
        assert_eq!(spec.node_selector.as_ref().unwrap()["pool"], "team-a");
        assert!(node_selector_conflicts(&spec, &tenant.pods).is_empty());
        let elsewhere = with_spec(serde_json::json!({"nodeSelector": {"pool": "team-b", "zone": "a"}}));
        let spec = host_pod(&elsewhere, &tenant, "").unwrap().spec.unwrap();
        assert_eq!(
            spec.node_selector.as_ref().unwrap()["pool"],
            "team-b",
            "never silently moved"
        );
        assert_eq!(
            node_selector_conflicts(&spec, &tenant.pods),
            ["nodeSelector pool=team-b (the host enforces pool=team-a)"]
        );
    }

    #[test]
    fn scheduling_fields_follow_the_tenant_policy() {
        let tenant = tenant_with(
            "    sync:\n      toHost:\n        pods:\n          enforceTolerations: [\"tenants=shared:NoSchedule\"]\n          hybridScheduling: {enabled: true, hostSchedulers: [batch]}\n",
        );
        let pod = |scheduler: &str| {
            pod_with(serde_json::json!({
                "containers": [{"name": "c"}],
                "priorityClassName": "system-node-critical", "priority": 2000001000,
                "preemptionPolicy": "PreemptLowerPriority", "overhead": {"cpu": "100m"},
                "schedulerName": scheduler,
                "tolerations": [
                    {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"},
                    {"key": "node-role.kubernetes.io/master", "operator": "Exists"},
                    {"operator": "Exists"},
                    {"key": "gpu", "operator": "Exists"}
                ]
            }))
        };
        let spec = host_pod(&pod("custom"), &tenant, "").unwrap().spec.unwrap();
        assert_eq!(spec.priority_class_name, None);
        assert_eq!(spec.priority, None);
        assert_eq!(spec.preemption_policy, None);
        assert_eq!(spec.overhead, None);
        assert_eq!(
            spec.scheduler_name, None,
            "a scheduler the tenant may not use is dropped"
        );
        let tolerations: Vec<(Option<String>, Option<String>)> = spec
            .tolerations
            .unwrap()
            .into_iter()
            .map(|t| (t.key, t.value))
            .collect();
        assert_eq!(
            tolerations,
            [
                (Some("gpu".into()), None),
                (Some("tenants".into()), Some("shared".into()))
            ]
        );
        let spec = host_pod(&pod("batch"), &tenant, "").unwrap().spec.unwrap();
        assert_eq!(
            spec.scheduler_name.as_deref(),
            Some("batch"),
            "a host scheduler is kept"
        );
    }
}
