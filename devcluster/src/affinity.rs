//! The scheduler's inter-pod affinity, as upstream's `InterPodAffinity` filter: a Pod's required
//! `podAffinity` terms want a node in the same topology domain (the node label `topologyKey`) as
//! a Pod the term selects, its required `podAntiAffinity` terms a domain holding none.
//!
//! ```text
//!  term ──► namespaces it looks in: those listed, those its namespaceSelector selects ({} = all),
//!           or the Pod's own when it has neither
//!       ──► Pods there its labelSelector selects (null: none), placed on nodes
//!       ──► affinity: one of them in the node's domain (or none anywhere and the Pod matches its
//!           own term: the first of a group); anti-affinity: none in the node's domain
//! ```
//!
//! Upstream's symmetry holds too: a node in the domain of a placed Pod whose required
//! anti-affinity selects the incoming Pod does not take it. Not simulated: preferred terms
//! (scoring).

use std::collections::BTreeMap;

use rcsync_core::selector::{LabelSelector, MatchExpression};
use serde_json::Value;

use crate::store::Store;

/// A Pod already placed: its namespace, labels, node's labels and required anti-affinity.
pub struct Placed {
    /// Its namespace.
    pub namespace: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// The labels of the node it is on.
    pub node_labels: BTreeMap<String, String>,
    /// Its required pod anti-affinity terms, which keep matching Pods out of its domain.
    anti: Vec<Term>,
}

impl Placed {
    /// `pod` (a Pod object) on a node with `node_labels`.
    pub fn new(pod: &Value, node_labels: BTreeMap<String, String>) -> Self {
        let namespace = pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        Self {
            anti: required(pod, "podAntiAffinity")
                .map(|t| Term::of(t, &namespace))
                .collect(),
            labels: strings(&pod["metadata"]["labels"]),
            namespace,
            node_labels,
        }
    }
}

/// Why a node does not take a Pod, in upstream's words.
pub const AFFINITY_MISMATCH: &str = "node(s) didn't match pod affinity rules";
/// Why a node does not take a Pod, in upstream's words.
pub const ANTI_AFFINITY_MISMATCH: &str = "node(s) didn't match pod anti-affinity rules";
/// Why a node does not take a Pod, in upstream's words.
pub const EXISTING_ANTI_AFFINITY: &str = "node(s) didn't satisfy existing pods anti-affinity rules";

/// The string entries of a JSON object (labels, a selector's `matchLabels`).
pub(crate) fn strings(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
        .collect()
}

/// The strings of a JSON list (none when it is not one).
fn string_list(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(String::from))
        .collect()
}

/// A `metav1.LabelSelector` as JSON; `None` for null or an invalid one (which selects nothing).
pub(crate) fn selector(v: &Value) -> Option<LabelSelector> {
    if !v.is_object() {
        return None;
    }
    let expressions: Vec<MatchExpression> = v["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| MatchExpression {
            key: e["key"].as_str().unwrap_or_default().to_string(),
            operator: e["operator"].as_str().unwrap_or_default().to_string(),
            values: string_list(&e["values"]),
        })
        .collect();
    LabelSelector::from_parts(&strings(&v["matchLabels"]), &expressions).ok()
}

/// One required term of a Pod in namespace `own`.
struct Term {
    selector: Option<LabelSelector>,
    topology_key: String,
    namespaces: Vec<String>,
    namespace_selector: Option<LabelSelector>,
    own: String,
}

impl Term {
    fn of(term: &Value, own: &str) -> Self {
        Self {
            selector: selector(&term["labelSelector"]),
            topology_key: term["topologyKey"].as_str().unwrap_or_default().to_string(),
            namespaces: string_list(&term["namespaces"]),
            // `{}` selects every namespace; validation refused an invalid one at the Pod's create.
            namespace_selector: selector(&term["namespaceSelector"]),
            own: own.to_string(),
        }
    }

    fn looks_in(&self, store: &Store, namespace: &str) -> bool {
        if self.namespaces.iter().any(|n| n == namespace) {
            return true;
        }
        match &self.namespace_selector {
            Some(s) if s.is_empty() => true,
            Some(s) => store
                .get("namespaces", "", namespace)
                .is_some_and(|ns| s.matches(&strings(&ns["metadata"]["labels"]))),
            None => self.namespaces.is_empty() && namespace == self.own,
        }
    }

    fn selects(&self, store: &Store, pod: &Placed) -> bool {
        self.selector.as_ref().is_some_and(|s| s.matches(&pod.labels)) && self.looks_in(store, &pod.namespace)
    }
}

fn required<'a>(pod: &'a Value, kind: &str) -> impl Iterator<Item = &'a Value> {
    pod.pointer(&format!(
        "/spec/affinity/{kind}/requiredDuringSchedulingIgnoredDuringExecution"
    ))
    .and_then(Value::as_array)
    .into_iter()
    .flatten()
}

/// Why `node` (its labels) cannot take `pod` under its required inter-pod affinity and
/// anti-affinity, given the Pods already `placed`; `None` when it can.
pub fn mismatch(
    store: &Store,
    pod: &Value,
    node: &BTreeMap<String, String>,
    placed: &[Placed],
) -> Option<&'static str> {
    let own = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let me = Placed::new(pod, node.clone());
    // Placed Pods that keep Pods like this one out of their domain.
    let repelled = placed.iter().any(|p| {
        p.anti.iter().any(|term| {
            p.node_labels
                .get(&term.topology_key)
                .is_some_and(|domain| node.get(&term.topology_key) == Some(domain))
                && term.selects(store, &me)
        })
    });
    if repelled {
        return Some(EXISTING_ANTI_AFFINITY);
    }
    for term in required(pod, "podAffinity").map(|t| Term::of(t, own)) {
        let Some(domain) = node.get(&term.topology_key) else {
            return Some(AFFINITY_MISMATCH);
        };
        let selected: Vec<&Placed> = placed.iter().filter(|p| term.selects(store, p)).collect();
        let near = selected
            .iter()
            .any(|p| p.node_labels.get(&term.topology_key) == Some(domain));
        // The first Pod of a group that wants to be near its own kind goes anywhere.
        let first = selected.is_empty() && term.selects(store, &me);
        if !near && !first {
            return Some(AFFINITY_MISMATCH);
        }
    }
    for term in required(pod, "podAntiAffinity").map(|t| Term::of(t, own)) {
        let Some(domain) = node.get(&term.topology_key) else {
            continue;
        };
        if placed
            .iter()
            .any(|p| p.node_labels.get(&term.topology_key) == Some(domain) && term.selects(store, p))
        {
            return Some(ANTI_AFFINITY_MISMATCH);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn placed(namespace: &str, app: &str, node: &str) -> Placed {
        Placed::new(
            &json!({"metadata": {"namespace": namespace, "labels": {"app": app}}}),
            BTreeMap::from([("kubernetes.io/hostname".into(), node.into())]),
        )
    }

    fn node(name: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("kubernetes.io/hostname".into(), name.into())])
    }

    fn pod(kind: &str, term: Value) -> Value {
        let mut term = term;
        term["topologyKey"] = json!("kubernetes.io/hostname");
        json!({"metadata": {"namespace": "shop", "labels": {"app": "web"}},
               "spec": {"affinity": {kind: {"requiredDuringSchedulingIgnoredDuringExecution": [term]}}}})
    }

    #[test]
    fn terms_look_in_their_own_namespace_unless_they_name_others() {
        let store = Store::new(10);
        let db_elsewhere = [placed("billing", "db", "n1")];
        let near_db = |extra: Value| {
            let mut term = json!({"labelSelector": {"matchLabels": {"app": "db"}}});
            for (k, v) in extra.as_object().unwrap() {
                term[k] = v.clone();
            }
            pod("podAffinity", term)
        };
        // The Pod's own namespace only: billing's db is not seen.
        assert_eq!(
            mismatch(&store, &near_db(json!({})), &node("n1"), &db_elsewhere),
            Some(AFFINITY_MISMATCH)
        );
        // Named, or every namespace: it is, on n1 only.
        for scope in [
            json!({"namespaces": ["billing"]}),
            json!({"namespaceSelector": {}}),
        ] {
            assert_eq!(
                mismatch(&store, &near_db(scope.clone()), &node("n1"), &db_elsewhere),
                None
            );
            assert_eq!(
                mismatch(&store, &near_db(scope), &node("n2"), &db_elsewhere),
                Some(AFFINITY_MISMATCH)
            );
        }
        // A null selector selects nothing.
        assert_eq!(
            mismatch(
                &store,
                &pod("podAntiAffinity", json!({})),
                &node("n1"),
                &[placed("shop", "web", "n1")]
            ),
            None
        );
    }

    #[test]
    fn a_placed_pods_anti_affinity_keeps_the_pods_it_selects_out_of_its_domain() {
        let store = Store::new(10);
        let mut loner = pod(
            "podAntiAffinity",
            json!({"labelSelector": {"matchLabels": {"app": "web"}}}),
        );
        loner["metadata"]["labels"] = json!({"app": "loner"});
        let placed = [Placed::new(&loner, node("n1"))];
        let web = json!({"metadata": {"namespace": "shop", "labels": {"app": "web"}}});
        assert_eq!(
            mismatch(&store, &web, &node("n1"), &placed),
            Some(EXISTING_ANTI_AFFINITY)
        );
        assert_eq!(mismatch(&store, &web, &node("n2"), &placed), None);
        // Its term looks in its own namespace only.
        let elsewhere = json!({"metadata": {"namespace": "billing", "labels": {"app": "web"}}});
        assert_eq!(mismatch(&store, &elsewhere, &node("n1"), &placed), None);
    }

    #[test]
    fn anti_affinity_keeps_a_domain_free_and_the_first_of_a_group_goes_anywhere() {
        let store = Store::new(10);
        let apart = pod(
            "podAntiAffinity",
            json!({"labelSelector": {"matchLabels": {"app": "web"}}}),
        );
        let web_on_n1 = [placed("shop", "web", "n1")];
        assert_eq!(
            mismatch(&store, &apart, &node("n1"), &web_on_n1),
            Some(ANTI_AFFINITY_MISMATCH)
        );
        assert_eq!(mismatch(&store, &apart, &node("n2"), &web_on_n1), None);
        let together = pod(
            "podAffinity",
            json!({"labelSelector": {"matchLabels": {"app": "web"}}}),
        );
        assert_eq!(
            mismatch(&store, &together, &node("n2"), &[]),
            None,
            "the first web Pod"
        );
        assert_eq!(
            mismatch(&store, &together, &node("n2"), &web_on_n1),
            Some(AFFINITY_MISMATCH)
        );
    }
}
