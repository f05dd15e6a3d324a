//! The Kubernetes API access the host agent needs, kept next to the code that uses it; the
//! deploy manifests' RBAC is checked against this list by a test.

/// `(API group, resource, verbs, scope)` the host agent uses.
/// Scope `cluster`: a ClusterRole; `tenant-namespace`: a Role in each tenant's hostNamespace.
pub const REQUIRED: &[(&str, &str, &[&str], &str)] = &[
    // index::run: one watcher (list + watch) on every RuntimeClass.
    ("node.k8s.io", "runtimeclasses", &["list", "watch"], "cluster"),
    // grpc::pods: get/create/patch/delete in ApplyPod and DeletePod; list + watch in WatchPodStatus.
    (
        "",
        "pods",
        &["create", "delete", "get", "list", "patch", "watch"],
        "tenant-namespace",
    ),
    // grpc::pods: the conditions of a Pod's readiness gates, set by the tenant's controllers.
    ("", "pods/status", &["patch"], "tenant-namespace"),
    // grpc::pods: a running Pod's containers resized in place, as the tenant resized them.
    ("", "pods/resize", &["patch"], "tenant-namespace"),
    // grpc::pods: debug containers (`kubectl debug`) added to a running Pod, as the tenant added them.
    ("", "pods/ephemeralcontainers", &["patch"], "tenant-namespace"),
    // grpc::host_events: the events the host records about the tenant's Pods and claims, for
    // WatchPodStatus and WatchClaimStatus.
    ("", "events", &["list", "watch"], "tenant-namespace"),
    // grpc::pods: copies of the ConfigMaps and Secrets a Pod references (get, create, replace;
    // delete only to replace a Secret whose type changed). The host's garbage collector removes
    // them with their last owning Pod. grpc::lost_copies: list + watch of their metadata in
    // WatchPodStatus, so a copy deleted under its Pod is written again.
    (
        "",
        "configmaps",
        &["create", "delete", "get", "list", "update", "watch"],
        "tenant-namespace",
    ),
    (
        "",
        "secrets",
        &["create", "delete", "get", "list", "update", "watch"],
        "tenant-namespace",
    ),
    // grpc::pods::budgets: the tenant's PodDisruptionBudgets held on the host (get, create,
    // replace and delete in Apply/DeleteDisruptionBudget; list in ListDisruptionBudgets; list and
    // watch of their metadata in WatchDisruptionBudgets).
    (
        "policy",
        "poddisruptionbudgets",
        &["create", "delete", "get", "list", "update", "watch"],
        "tenant-namespace",
    ),
    // The tenant's PersistentVolumeClaims made on the host (create, get, patch to grow and delete
    // in Apply/DeleteClaim and ApplyPod's check of a Pod's claims; list and watch in ListClaims and
    // WatchClaimStatus).
    (
        "",
        "persistentvolumeclaims",
        &["create", "delete", "get", "list", "patch", "watch"],
        "tenant-namespace",
    ),
];
