//! The agents run under exactly the RBAC of `deploy/` in every end-to-end test (see
//! `rcsync_tests::rbac`). These tests show the other half: a copy of `deploy/` missing one rule
//! makes the agent fail with the API server's 403, naming what is missing.

use kube::Api;
use kube::api::{Patch, PatchParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use rcsync_tests::rbac::{deploy_manifest, documents};
use rcsync_tests::system::{System, TenantSpec, pod, runtime_class};
use rcsync_tests::{Process, binary, eventually, http_get};
use serde_json::Value;

const TENANT: &str = "team-a";

/// `deploy/`'s ClusterRole `name` from `manifest`, with `verb` removed from the rule on `resource`.
fn cluster_role_without(manifest: &str, name: &str, resource: &str, verb: &str) -> Value {
    let mut role = documents(&deploy_manifest(manifest))
        .into_iter()
        .find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{manifest} has ClusterRole {name}"));
    let rules = role["rules"].as_array_mut().unwrap();
    let rule = rules
        .iter_mut()
        .find(|r| r["resources"].as_array().unwrap().iter().any(|x| x == resource))
        .unwrap_or_else(|| panic!("a rule on {resource}"));
    let verbs = rule["verbs"].as_array_mut().unwrap();
    let before = verbs.len();
    verbs.retain(|v| v != verb);
    assert_eq!(verbs.len(), before - 1, "{manifest} grants {verb} on {resource}");
    role
}

/// Applies `role` (the edited copy) over the live one.
async fn apply_cluster_role(client: kube::Client, role: &Value) {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("rbac.authorization.k8s.io", "v1", "ClusterRole"),
        "clusterroles",
    );
    let api: Api<DynamicObject> = Api::all_with(client, &resource);
    api.patch(
        role["metadata"]["name"].as_str().unwrap(),
        &PatchParams::apply("rcsync-e2e").force(),
        &Patch::Apply(role),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_host_agent_without_list_on_runtime_classes_fails_with_the_403() {
    let system = System::start(
        &[TenantSpec::new(TENANT, "{enabled: true}")],
        &[runtime_class("gvisor", "runsc", &[])],
    )
    .await;
    let role = cluster_role_without("host-agent.yaml", "rcsync-host-agent", "runtimeclasses", "list");
    apply_cluster_role(system.host.client().await, &role).await;
    // A second host agent with the same flags (and so the same service account) starts under the
    // reduced role: it never gets ready, and says why.
    let replica = spawn_host_agent(&system);
    let log = eventually("the 403 in the host agent's log", || {
        let logs = replica.0.logs();
        async move {
            logs.contains(
                r#"runtimeclasses.node.k8s.io is forbidden: User \"system:serviceaccount:rcsync-system:host-agent\" cannot list resource \"runtimeclasses\" in API group \"node.k8s.io\" at the cluster scope"#,
            )
            .then_some(logs)
        }
    })
    .await;
    assert!(!log.is_empty());
    let ready = http_get(&replica.1, "/readyz").await.map(|(code, _)| code);
    assert_ne!(
        ready,
        Some(200),
        "a host agent that cannot list classes is not ready"
    );
    // And the RcsyncWatchFailing alert has its data.
    let metrics = http_get(&replica.1, "/metrics").await.unwrap().1;
    assert!(
        metrics.contains(r#"rcsync_watch_failing{watch="runtimeclasses"} 1"#),
        "{metrics}"
    );
    assert!(
        !metrics.contains(r#"rcsync_watch_errors_total{watch="runtimeclasses"} 0"#),
        "{metrics}"
    );
}

/// Starts another host agent with the system's flags on fresh ports (no readiness wait).
fn spawn_host_agent(system: &System) -> (Process, String) {
    let grpc = format!("127.0.0.1:{}", rcsync_tests::free_port());
    let admin = format!("127.0.0.1:{}", rcsync_tests::free_port());
    let args: Vec<String> = vec![
        "--kubeconfig".into(),
        system
            .dir
            .path()
            .join("host-agent.kubeconfig")
            .display()
            .to_string(),
        "--config".into(),
        system.dir.path().join("tenants.yaml").display().to_string(),
        "--grpc-listen".into(),
        grpc,
        "--admin-listen".into(),
        admin.clone(),
    ];
    (
        Process::spawn(
            "host-agent-reduced-rbac",
            &binary("host-agent"),
            &args,
            system.dir.path(),
        ),
        admin,
    )
}

#[tokio::test]
async fn a_virtual_agent_without_create_on_events_fails_with_the_403() {
    let mut system = System::start(
        &[TenantSpec::new(
            TENANT,
            "{enabled: true, selector: {matchLabels: {env: dev}}}",
        )],
        &[runtime_class("gvisor", "runsc", &[("env", "dev")])],
    )
    .await;
    let role = cluster_role_without("virtual-agent.yaml", "rcsync-virtual-agent", "events", "create");
    apply_cluster_role(system.virtual_side().cluster.client().await, &role).await;
    // A Pod with a class the selector does not allow: its SyncWarning cannot be recorded.
    system.virtuals[0]
        .create_pod_with_homemade_class(&pod("blocked", Some("kata")), "kata")
        .await;
    let v = system.virtual_side();
    eventually("the 403 in the virtual agent's log", || {
        let logs = v.agent.logs();
        async move {
            logs.contains(
                r#"events.events.k8s.io is forbidden: User \"system:serviceaccount:rcsync-system:virtual-agent\" cannot create resource \"events\" in API group \"events.k8s.io\" in the namespace \"default\""#,
            )
            .then_some(())
        }
    })
    .await;
    assert!(v.events_of("blocked").await.is_empty());
}
