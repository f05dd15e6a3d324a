//! The spec ("Runtime classes", vCluster docs), one test per rule, against real agent processes
//! and two API servers (devclusters, or real clusters via RCSYNC_HOST_KUBECONFIG and
//! RCSYNC_VIRTUAL_KUBECONFIG).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt as _;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use rcsync_tests::eventually;
use rcsync_tests::system::{System, TenantSpec, Transport, pod, runtime_class};
use serde_json::json;

const RC: &str = "kubernetes.io/runtime.class";
const DENIED: &str = "does not match the selector under 'sync.fromHost.runtimeClasses.selector'";

/// The classes of the spec's use cases.
fn use_case_classes() -> Vec<k8s_openapi::api::node::v1::RuntimeClass> {
    vec![
        runtime_class(
            "gvisor",
            "runsc",
            &[("environment", "development"), (RC, "gvisor")],
        ),
        runtime_class("youki", "youki", &[("environment", "development"), (RC, "youki")]),
        runtime_class("kata", "kata", &[("environment", "development"), (RC, "kata")]),
        runtime_class(
            "runc-debug",
            "runc",
            &[("environment", "production"), (RC, "gvisor")],
        ),
    ]
}

const MATCH_LABELS: &str = "{enabled: true, selector: {matchLabels: {environment: development}}}";
const COMBINED: &str = "{enabled: true, selector: {matchLabels: {environment: development}, matchExpressions: [{key: kubernetes.io/runtime.class, operator: In, values: [gvisor, youki]}]}}";

async fn system(runtime_classes: &str) -> System {
    System::start(&[TenantSpec::new("team-a", runtime_classes)], &use_case_classes()).await
}

fn expression(op: &str, values: &[&str]) -> String {
    format!(
        "{{enabled: true, selector: {{matchExpressions: [{{key: kubernetes.io/runtime.class, operator: {op}, values: [{}]}}]}}}}",
        values.join(", ")
    )
}

fn denied_message(pod: &str) -> String {
    format!("did not sync pod \"{pod}\" to host because it {DENIED}")
}

async fn host_pod(system: &System, virtual_name: &str) -> Option<Pod> {
    let tenant = &system.virtual_side().tenant;
    let name = format!("{virtual_name}-x-default-x-{}", tenant.name);
    system.host_pods(tenant).await.get_opt(&name).await.unwrap()
}

async fn wait_host_pod(system: &System, virtual_name: &str) -> Pod {
    eventually(&format!("host pod of {virtual_name}"), || {
        host_pod(system, virtual_name)
    })
    .await
}

#[tokio::test]
async fn enabled_syncs_host_classes_into_the_virtual_cluster() {
    let system = system("{enabled: true}").await;
    system
        .virtual_side()
        .wait_classes(&["gvisor", "youki", "kata", "runc-debug"])
        .await;
    let synced = system.virtual_side().classes().await.get("gvisor").await.unwrap();
    assert_eq!(synced.handler, "runsc");
    assert_eq!(synced.labels()["environment"], "development");
}

#[tokio::test]
async fn disabled_syncs_nothing_gates_no_pod_and_leaves_tenant_classes_alone() {
    // Disabled (the default), even with a selector that kata would not match.
    let system = system("{selector: {matchLabels: {environment: production}}}").await;
    let v = system.virtual_side();
    // A tenant's own class stays, and a Pod naming it is not gated (kata exists on the host).
    v.create_class(&runtime_class("kata", "kata", &[])).await;
    v.create_pod(&pod("free", Some("kata"))).await;
    wait_host_pod(&system, "free").await;
    assert_eq!(
        v.class_names().await,
        ["kata"].iter().map(|s| s.to_string()).collect()
    );
}

#[tokio::test]
async fn a_pod_the_host_refuses_gets_a_sync_error_event() {
    let system = system("{}").await;
    let v = system.virtual_side();
    v.create_class(&runtime_class("local", "runc", &[])).await;
    v.create_pod(&pod("refused", Some("local"))).await;
    let event = eventually("a SyncError event", || async {
        v.events_of("refused")
            .await
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("SyncError"))
    })
    .await;
    assert!(
        event
            .message
            .unwrap()
            .contains("RuntimeClass \"local\" not found")
    );
}

#[tokio::test]
async fn no_selector_syncs_every_class_and_every_pod() {
    let system = system("{enabled: true}").await;
    let v = system.virtual_side();
    v.wait_classes(&["gvisor", "youki", "kata", "runc-debug"]).await;
    v.create_pod(&pod("any", Some("runc-debug"))).await;
    let host = wait_host_pod(&system, "any").await;
    assert_eq!(
        host.spec.unwrap().runtime_class_name.as_deref(),
        Some("runc-debug")
    );
}

#[tokio::test]
async fn match_labels_syncs_only_matching_classes() {
    let system = system(MATCH_LABELS).await;
    system
        .virtual_side()
        .wait_classes(&["gvisor", "youki", "kata"])
        .await;
}

#[tokio::test]
async fn match_expressions_in() {
    let system = system(&expression("In", &["gvisor", "youki"])).await;
    system
        .virtual_side()
        .wait_classes(&["gvisor", "youki", "runc-debug"])
        .await;
}

#[tokio::test]
async fn match_expressions_not_in() {
    let system = system(&expression("NotIn", &["gvisor", "youki"])).await;
    system.virtual_side().wait_classes(&["kata"]).await;
}

#[tokio::test]
async fn match_expressions_exists() {
    let classes = "{enabled: true, selector: {matchExpressions: [{key: environment, operator: Exists}]}}";
    let system = System::start(
        &[TenantSpec::new("team-a", classes)],
        &[
            runtime_class("gvisor", "runsc", &[("environment", "x")]),
            runtime_class("bare", "runc", &[]),
        ],
    )
    .await;
    system.virtual_side().wait_classes(&["gvisor"]).await;
}

#[tokio::test]
async fn match_expressions_does_not_exist() {
    let classes =
        "{enabled: true, selector: {matchExpressions: [{key: environment, operator: DoesNotExist}]}}";
    let system = System::start(
        &[TenantSpec::new("team-a", classes)],
        &[
            runtime_class("gvisor", "runsc", &[("environment", "x")]),
            runtime_class("bare", "runc", &[]),
        ],
    )
    .await;
    system.virtual_side().wait_classes(&["bare"]).await;
}

#[tokio::test]
async fn combined_criteria_must_all_match() {
    let system = system(COMBINED).await;
    system.virtual_side().wait_classes(&["gvisor", "youki"]).await;
}

#[tokio::test]
async fn host_update_is_reevaluated_and_applied() {
    let system = system(COMBINED).await;
    let v = system.virtual_side();
    v.wait_classes(&["gvisor", "youki"]).await;
    let host = system.host_classes().await;
    let change = json!({"metadata": {"annotations": {"owner": "platform"}, "labels": {"tier": "gold"}}});
    host.patch("gvisor", &PatchParams::default(), &Patch::Merge(&change))
        .await
        .unwrap();
    let classes = v.classes().await;
    eventually("the host change to reach the virtual copy", || async {
        let rc = classes.get("gvisor").await.ok()?;
        (rc.annotations().get("owner").map(String::as_str) == Some("platform")
            && rc.labels().get("tier").map(String::as_str) == Some("gold"))
        .then_some(())
    })
    .await;
    // The handler is immutable: a changed handler is applied as delete and create.
    host.delete("youki", &DeleteParams::default()).await.unwrap();
    v.wait_classes(&["gvisor"]).await;
    host.create(
        &PostParams::default(),
        &runtime_class(
            "youki",
            "youki-v2",
            &[("environment", "development"), (RC, "youki")],
        ),
    )
    .await
    .unwrap();
    eventually("the new handler in the virtual cluster", || async {
        (classes.get("youki").await.ok()?.handler == "youki-v2").then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_class_that_stops_matching_is_removed() {
    let system = system(COMBINED).await;
    let v = system.virtual_side();
    v.wait_classes(&["gvisor", "youki"]).await;
    let relabel = json!({"metadata": {"labels": {"environment": "production"}}});
    system
        .host_classes()
        .await
        .patch("youki", &PatchParams::default(), &Patch::Merge(&relabel))
        .await
        .unwrap();
    v.wait_classes(&["gvisor"]).await;
}

#[tokio::test]
async fn a_class_deleted_on_the_host_is_removed() {
    let system = system(COMBINED).await;
    let v = system.virtual_side();
    v.wait_classes(&["gvisor", "youki"]).await;
    system
        .host_classes()
        .await
        .delete("gvisor", &DeleteParams::default())
        .await
        .unwrap();
    v.wait_classes(&["youki"]).await;
}

#[tokio::test]
async fn a_class_created_in_the_virtual_cluster_is_deleted() {
    let system = system(COMBINED).await;
    let v = system.virtual_side();
    v.wait_classes(&["gvisor", "youki"]).await;
    v.create_class(&runtime_class("homemade", "runc", &[])).await;
    v.wait_classes(&["gvisor", "youki"]).await;
    // A name the host offers wins over a tenant's class of the same name.
    v.classes()
        .await
        .delete("gvisor", &DeleteParams::default())
        .await
        .unwrap();
    let impostor = runtime_class("gvisor", "impostor", &[]);
    let _ = v.classes().await.create(&PostParams::default(), &impostor).await;
    let classes = v.classes().await;
    eventually("the host's gvisor back in place", || async {
        let rc = classes.get("gvisor").await.ok()?;
        (rc.handler == "runsc").then_some(())
    })
    .await;
    assert!(
        v.metrics()
            .await
            .contains("rcsync_local_runtime_classes_deleted_total")
    );
}

#[tokio::test]
async fn a_pod_with_a_synced_class_is_synced_to_the_host() {
    let system = system(COMBINED).await;
    let v = system.virtual_side();
    v.wait_classes(&["gvisor", "youki"]).await;
    let created = v.create_pod(&pod("my-pod", Some("gvisor"))).await;
    let host = wait_host_pod(&system, "my-pod").await;
    assert_eq!(host.metadata.namespace.as_deref(), Some("vcluster-team-a"));
    let labels = host.labels();
    assert_eq!(labels["vcluster.loft.sh/managed-by"], "team-a");
    assert_eq!(labels["vcluster.loft.sh/namespace"], "default");
    let annotations = host.annotations();
    assert_eq!(annotations["vcluster.loft.sh/object-name"], "my-pod");
    assert_eq!(annotations["vcluster.loft.sh/object-namespace"], "default");
    assert_eq!(annotations["vcluster.loft.sh/object-uid"], created.uid().unwrap());
    assert_eq!(host.spec.unwrap().runtime_class_name.as_deref(), Some("gvisor"));
}

#[tokio::test]
async fn a_pod_with_an_empty_runtime_class_name_is_synced() {
    let system = system(COMBINED).await;
    system.virtual_side().create_pod(&pod("plain", None)).await;
    let host = wait_host_pod(&system, "plain").await;
    assert_eq!(host.spec.unwrap().runtime_class_name, None);
}

#[tokio::test]
async fn a_pod_with_a_non_matching_class_gets_a_sync_warning_and_is_not_synced() {
    let mut system = system(COMBINED).await;
    system.virtuals[0].wait_classes(&["gvisor", "youki"]).await;
    // kata exists on the host but does not match the selector.
    let created = system.virtuals[0]
        .create_pod_with_homemade_class(&pod("my-pod", Some("kata")), "kata")
        .await;
    let v = system.virtual_side();
    let event = v.wait_event("my-pod", &denied_message("my-pod")).await;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(event.reason.as_deref(), Some("SyncWarning"));
    assert_eq!(event.reporting_component.as_deref(), Some("pod-syncer"));
    assert_eq!(event.involved_object.uid, created.uid());
    v.wait_classes(&["gvisor", "youki"]).await;
    assert!(
        host_pod(&system, "my-pod").await.is_none(),
        "a denied Pod is not synced"
    );
}

#[tokio::test]
async fn a_pod_with_a_class_missing_on_the_host_gets_a_sync_warning() {
    let mut system = system(COMBINED).await;
    system.virtuals[0].wait_classes(&["gvisor", "youki"]).await;
    system.virtuals[0]
        .create_pod_with_homemade_class(&pod("lost", Some("nowhere")), "nowhere")
        .await;
    let v = system.virtual_side();
    let message =
        "did not sync pod \"lost\" to host because its runtime class \"nowhere\" does not exist on the host";
    let event = v.wait_event("lost", message).await;
    assert_eq!(event.reason.as_deref(), Some("SyncWarning"));
    assert!(host_pod(&system, "lost").await.is_none());
}

#[tokio::test]
async fn a_blocked_pod_syncs_once_its_class_is_allowed() {
    let mut system = system(COMBINED).await;
    system.virtuals[0].wait_classes(&["gvisor", "youki"]).await;
    system.virtuals[0]
        .create_pod_with_homemade_class(&pod("waiting", Some("kata")), "kata")
        .await;
    let v = system.virtual_side();
    v.wait_event("waiting", &denied_message("waiting")).await;
    let relabel = json!({"metadata": {"labels": {RC: "gvisor"}}});
    system
        .host_classes()
        .await
        .patch("kata", &PatchParams::default(), &Patch::Merge(&relabel))
        .await
        .unwrap();
    let host = wait_host_pod(&system, "waiting").await;
    assert_eq!(host.spec.unwrap().runtime_class_name.as_deref(), Some("kata"));
}

#[tokio::test]
async fn orphaned_pods_remain_in_both_clusters_and_stop_receiving_updates() {
    let system = system(COMBINED).await;
    let v = system.virtual_side();
    v.wait_classes(&["gvisor", "youki"]).await;
    v.create_pod(&pod("orphan", Some("youki"))).await;
    wait_host_pod(&system, "orphan").await;
    // The class goes away on the host.
    system
        .host_classes()
        .await
        .delete("youki", &DeleteParams::default())
        .await
        .unwrap();
    v.wait_classes(&["gvisor"]).await;
    // Updates to the virtual Pod no longer reach the host.
    let change = json!({"spec": {"containers": [{"name": "app", "image": "registry.example/app:2.0"}]}});
    v.pods()
        .await
        .patch("orphan", &PatchParams::default(), &Patch::Strategic(change))
        .await
        .unwrap();
    let metrics_say_orphaned = || async {
        v.metrics()
            .await
            .lines()
            .any(|l| l == "rcsync_pods_orphaned 1")
            .then_some(())
    };
    eventually("the Pod to be counted as orphaned", metrics_say_orphaned).await;
    let host = host_pod(&system, "orphan").await.expect("the host Pod stays");
    assert_eq!(
        host.spec.unwrap().containers[0].image.as_deref(),
        Some("registry.example/app:1.0")
    );
    assert!(
        v.pods().await.get_opt("orphan").await.unwrap().is_some(),
        "the virtual Pod stays"
    );
    // An explicit delete of the virtual Pod still removes its host Pod.
    v.pods()
        .await
        .delete("orphan", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the host Pod to be deleted", || async {
        host_pod(&system, "orphan").await.is_none().then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_warning_is_logged_for_a_filtered_class() {
    let system = system(COMBINED).await;
    system.virtual_side().wait_classes(&["gvisor", "youki"]).await;
    let warning = "did not sync runtime class \"kata\" because it does not match the selector under 'sync.fromHost.runtimeClasses.selector'";
    eventually("the warning in the host agent's log", || async {
        system
            .host_agent
            .logs()
            .lines()
            .any(|l| l.contains("WARN") && l.contains(warning))
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn two_tenants_are_isolated() {
    if std::env::var_os("RCSYNC_VIRTUAL_KUBECONFIG").is_some() {
        eprintln!("two_tenants_are_isolated needs two virtual clusters: run it against devclusters");
        return;
    }
    let system = System::start(
        &[
            TenantSpec::new("team-a", COMBINED),
            TenantSpec::new("team-b", &expression("In", &["kata"])),
        ],
        &use_case_classes(),
    )
    .await;
    let (a, b) = (&system.virtuals[0], &system.virtuals[1]);
    a.wait_classes(&["gvisor", "youki"]).await;
    b.wait_classes(&["kata"]).await;
    b.create_pod(&pod("b-pod", Some("kata"))).await;
    let b_ns = system.host_pods(&b.tenant).await;
    eventually("team-b's host pod", || async {
        b_ns.get_opt("b-pod-x-default-x-team-b").await.unwrap()
    })
    .await;
    let a_ns = system.host_pods(&a.tenant).await;
    assert!(
        a_ns.list(&Default::default()).await.unwrap().items.is_empty(),
        "nothing of team-b lands in team-a's namespace"
    );
}

#[tokio::test]
async fn host_status_reaches_the_virtual_pod() {
    let system = system(COMBINED).await;
    let v = system.virtual_side();
    v.create_pod(&pod("web", Some("gvisor"))).await;
    let host = wait_host_pod(&system, "web").await;
    let status = json!({"status": {"phase": "Running", "podIP": "10.4.0.7", "conditions": [{"type": "Ready", "status": "True"}]}});
    system
        .host_pods(&v.tenant)
        .await
        .patch_status(&host.name_any(), &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    let pods = v.pods().await;
    eventually("the host status on the virtual Pod", || async {
        let s = pods.get("web").await.ok()?.status?;
        (s.phase.as_deref() == Some("Running") && s.pod_ip.as_deref() == Some("10.4.0.7")).then_some(())
    })
    .await;
    // A deleted host Pod: the virtual Pod is deleted too, with an event.
    system
        .host_pods(&v.tenant)
        .await
        .delete(&host.name_any(), &DeleteParams::default())
        .await
        .unwrap();
    eventually("the virtual Pod to be deleted", || async {
        pods.get_opt("web").await.unwrap().is_none().then_some(())
    })
    .await;
}

#[tokio::test]
async fn restarting_both_agents_mid_way_converges_to_the_same_state() {
    let mut system = system(COMBINED).await;
    system.virtuals[0].wait_classes(&["gvisor", "youki"]).await;
    system.virtuals[0]
        .create_pod(&pod("before", Some("gvisor")))
        .await;
    wait_host_pod(&system, "before").await;
    // Changes while the virtual agent is down and the host agent restarts.
    system.virtuals[0].stop_agent().await;
    let host_classes = system.host_classes().await;
    host_classes
        .delete("youki", &DeleteParams::default())
        .await
        .unwrap();
    host_classes
        .patch(
            "kata",
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"labels": {RC: "gvisor"}}})),
        )
        .await
        .unwrap();
    system.virtuals[0]
        .pods()
        .await
        .delete("before", &DeleteParams::default())
        .await
        .unwrap();
    system.restart_host_agent().await;
    system.virtuals[0].start_agent().await;
    let v = system.virtual_side();
    v.wait_classes(&["gvisor", "kata"]).await;
    eventually("the host Pod of the Pod deleted meanwhile to be gone", || async {
        host_pod(&system, "before").await.is_none().then_some(())
    })
    .await;
    v.create_pod(&pod("after", Some("kata"))).await;
    wait_host_pod(&system, "after").await;
    let managed: BTreeMap<String, String> = v
        .classes()
        .await
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|rc| {
            (
                rc.name_any(),
                rc.annotations()
                    .get("rcsync.io/source-version")
                    .cloned()
                    .unwrap_or_default(),
            )
        })
        .collect();
    assert!(
        managed.values().all(|v| v.len() == 16),
        "every class is a managed copy: {managed:?}"
    );
}

#[tokio::test]
async fn the_agents_work_over_mutual_tls() {
    let system = System::start_with(
        &[TenantSpec::new("team-a", COMBINED)],
        &use_case_classes(),
        Transport::MutualTls,
    )
    .await;
    let v = system.virtual_side();
    v.wait_classes(&["gvisor", "youki"]).await;
    v.create_pod(&pod("secure", Some("gvisor"))).await;
    wait_host_pod(&system, "secure").await;
    assert!(system.host_agent.logs().contains("serving gRPC over TLS"));
}

#[tokio::test]
async fn the_virtual_agent_stays_ready_and_keeps_its_classes_while_the_host_agent_is_away() {
    let mut system = system(COMBINED).await;
    system.virtuals[0].wait_classes(&["gvisor", "youki"]).await;
    system.host_agent.signal("KILL");
    system.host_agent.wait_exit().await;
    let v = system.virtual_side();
    eventually("host_connected 0", || async {
        v.metrics()
            .await
            .lines()
            .any(|l| l == "rcsync_host_connected 0")
            .then_some(())
    })
    .await;
    let (code, _) = rcsync_tests::http_get(&v.admin, "/readyz").await.unwrap();
    assert_eq!(code, 200, "ready through a host agent outage");
    assert_eq!(
        v.class_names().await.len(),
        2,
        "nothing is deleted for lack of a connection"
    );
    // A Pod created meanwhile is not synced (fail closed), and syncs once the host agent is back.
    v.create_pod(&pod("patient", Some("gvisor"))).await;
    system.restart_host_agent().await;
    wait_host_pod(&system, "patient").await;
}

#[tokio::test]
async fn updates_to_a_synced_pod_reach_its_host_pod() {
    let system = system(COMBINED).await;
    let v = system.virtual_side();
    v.wait_classes(&["gvisor", "youki"]).await;
    v.create_pod(&pod("web", Some("gvisor"))).await;
    wait_host_pod(&system, "web").await;
    let change = json!({
        "metadata": {"labels": {"version": "2"}},
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:2.0"}]}
    });
    v.pods()
        .await
        .patch("web", &PatchParams::default(), &Patch::Strategic(change))
        .await
        .unwrap();
    eventually("the new image and labels on the host Pod", || async {
        let host = host_pod(&system, "web").await?;
        let image = host.spec.as_ref()?.containers[0].image.clone()?;
        let labels = host.annotations().get("vcluster.loft.sh/labels").cloned()?;
        (image == "registry.example/app:2.0" && labels.contains("\"version\":\"2\"")).then_some(())
    })
    .await;
}
