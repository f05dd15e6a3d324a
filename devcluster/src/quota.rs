//! The part of kube-controller-manager's quota controller devcluster keeps: each ResourceQuota's
//! `status.hard` (a copy of its `spec.hard`) and `status.used` for the resources admission counts
//! (`pods`, `count/pods`), so `kubectl get quota` and `kubectl describe quota` show how full a
//! namespace is. Other resources have no `used` entry (devcluster neither counts nor enforces
//! them).
//!
//! ```text
//!  store changes (Pods, ResourceQuotas) ─► their namespace ─► each quota there:
//!                                                             status {hard, used} written when it differs
//! ```
//!
//! Admission does not read `status.used`: it counts the namespace's Pods inside the create's own
//! transaction, so the status lagging a change by one store event never lets a Pod past a quota.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde_json::{Map, Value, json};
use tokio::sync::{broadcast, watch};

use crate::admission::{POD_QUOTA_KEYS, counts_against_quota, name_of};
use crate::store::{Outcome, Store};

/// Keeps every quota's status until `stop`.
pub async fn run(store: Arc<Store>, mut stop: watch::Receiver<bool>) {
    let mut changes = store.changes();
    // Quotas restored from a state file, or created before this task subscribed.
    reconcile_all(&store);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            change = changes.recv() => match change {
                Ok(change) if matches!(change.storage, "pods" | "resourcequotas") => {
                    let namespace = change
                        .new
                        .pointer("/metadata/namespace")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    reconcile(&store, namespace);
                }
                Ok(_) => {}
                // Missed changes: any namespace may be off.
                Err(broadcast::error::RecvError::Lagged(_)) => reconcile_all(&store),
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

/// Every namespace that has a quota.
fn reconcile_all(store: &Store) {
    let (quotas, _) = store.list("resourcequotas", None);
    let namespaces: BTreeSet<String> = quotas
        .iter()
        .filter_map(|q| q.pointer("/metadata/namespace").and_then(Value::as_str))
        .map(str::to_string)
        .collect();
    for namespace in namespaces {
        reconcile(store, &namespace);
    }
}

/// Brings the status of `namespace`'s quotas up to date with its Pods.
fn reconcile(store: &Store, namespace: &str) {
    let (quotas, _) = store.list("resourcequotas", Some(namespace));
    if quotas.is_empty() {
        return;
    }
    let (pods, _) = store.list("pods", Some(namespace));
    let used = pods.iter().filter(|pod| counts_against_quota(pod)).count();
    for quota in quotas {
        let name = name_of(&quota).to_string();
        let _ = store.transact("resourcequotas", (namespace.to_string(), name), |_, current| {
            // Gone, or replaced since it was listed: its own change brings it here again.
            let Some(current) = current else {
                return Ok(Outcome::Unchanged);
            };
            let status = status_of(current, used);
            if current.get("status") == Some(&status) {
                return Ok(Outcome::Unchanged);
            }
            let mut updated = current.clone();
            updated["status"] = status;
            Ok(Outcome::Put(updated))
        });
    }
}

/// A quota's status with `pods` Pods counted in its namespace.
fn status_of(quota: &Value, pods: usize) -> Value {
    let hard = quota
        .pointer("/spec/hard")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let used: Map<String, Value> = POD_QUOTA_KEYS
        .into_iter()
        .filter(|key| hard.contains_key(*key))
        .map(|key| (key.to_string(), json!(pods.to_string())))
        .collect();
    json!({"hard": hard, "used": used})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_mirrors_hard_and_counts_only_the_pod_keys_it_names() {
        let quota = json!({"spec": {"hard": {"pods": "3", "requests.cpu": "2"}}});
        assert_eq!(
            status_of(&quota, 2),
            json!({"hard": {"pods": "3", "requests.cpu": "2"}, "used": {"pods": "2"}})
        );
        let both = json!({"spec": {"hard": {"pods": "3", "count/pods": "5"}}});
        assert_eq!(
            status_of(&both, 0)["used"],
            json!({"pods": "0", "count/pods": "0"})
        );
        assert_eq!(status_of(&json!({}), 4), json!({"hard": {}, "used": {}}));
    }
}
