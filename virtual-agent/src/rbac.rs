//! The Kubernetes API access the virtual agent needs in its virtual cluster, kept next to the code
//! that uses it; the deploy manifests' RBAC is checked against this list by a test.

/// `(API group, resource, verbs)` the virtual agent uses (cluster-wide: a ClusterRole).
pub const REQUIRED: &[(&str, &str, &[&str])] = &[
    // classes::Applier (get, create, update, delete, list of managed copies) and the enforcer (watch).
    (
        "node.k8s.io",
        "runtimeclasses",
        &["create", "delete", "get", "list", "update", "watch"],
    ),
    // pods::PodSyncer: watch every Pod; delete a virtual Pod whose host Pod is gone.
    ("", "pods", &["delete", "list", "watch"]),
    // pods::PodSyncer: watch the ConfigMaps and Secrets Pods reference, to copy them to the host.
    ("", "configmaps", &["list", "watch"]),
    ("", "secrets", &["list", "watch"]),
    // budgets::BudgetSyncer: watch the PodDisruptionBudgets to hold on the host.
    ("policy", "poddisruptionbudgets", &["list", "watch"]),
    // claims::ClaimSyncer: watch the PersistentVolumeClaims to make on the host, write their status.
    ("", "persistentvolumeclaims", &["list", "watch"]),
    ("", "persistentvolumeclaims/status", &["patch"]),
    // pods::tokens: service account tokens for Pods on the host (--pod-api-server).
    ("", "serviceaccounts/token", &["create"]),
    // pods::PodSyncer: copy host status.
    ("", "pods/status", &["patch"]),
    // kube-runtime's Recorder: SyncWarning / SyncError events (create, then patch for series).
    ("events.k8s.io", "events", &["create", "patch"]),
    // pods::host_events: copies of the host's events about synced Pods (create; patch a repeat;
    // list the copies in place at start).
    ("", "events", &["create", "list", "patch"]),
];

/// `(API group, resource, verbs, resource names)` in the agent's own namespace (a Role): the
/// leader Lease. Creating cannot be limited to a name (it does not exist yet); everything else is
/// limited to the one Lease. List and watch name it with a `metadata.name` field selector.
pub const LEASE: &[(&str, &str, &[&str], &[&str])] = &[
    ("coordination.k8s.io", "leases", &["create"], &[]),
    (
        "coordination.k8s.io",
        "leases",
        &["get", "list", "update", "watch"],
        &[crate::leader::LEASE_NAME],
    ),
];
