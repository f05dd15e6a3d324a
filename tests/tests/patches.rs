//! Patches end to end: a host class renamed and relabelled for the virtual cluster; Pods using the
//! virtual name run on the host with the host name; a failing patch is shown where the user looks.

use kube::ResourceExt as _;
use rcsync_tests::eventually;
use rcsync_tests::system::{System, TenantSpec, pod, runtime_class};

const RC: &str = "kubernetes.io/runtime.class";

const PATCHED: &str = r#"{enabled: true, selector: {matchLabels: {environment: development}, matchExpressions: [{key: kubernetes.io/runtime.class, operator: In, values: [gvisor, youki]}]}, patches: [{path: metadata.name, expression: 'value === "gvisor" ? "sandboxed" : value', reverseExpression: 'value === "sandboxed" ? "gvisor" : value'}, {path: metadata.labels.environment, expression: '"tenant-" + value'}, {path: handler, expression: 'value === "youki" ? (() => { throw new Error("youki is not allowed here") })() : value'}]}"#;

async fn system() -> System {
    System::start(
        &[TenantSpec::new("team-a", PATCHED)],
        &[
            runtime_class(
                "gvisor",
                "runsc",
                &[("environment", "development"), (RC, "gvisor")],
            ),
            runtime_class("youki", "youki", &[("environment", "development"), (RC, "youki")]),
        ],
    )
    .await
}

#[tokio::test]
async fn a_patch_renames_a_class_and_pods_run_on_the_host_under_its_host_name() {
    let system = system().await;
    let v = system.virtual_side();
    v.wait_classes(&["sandboxed"]).await;
    let sandboxed = v.classes().await.get("sandboxed").await.unwrap();
    assert_eq!(sandboxed.handler, "runsc");
    assert_eq!(sandboxed.labels()["environment"], "tenant-development");
    assert_eq!(sandboxed.annotations()["rcsync.io/host-name"], "gvisor");

    v.create_pod(&pod("web", Some("sandboxed"))).await;
    let host_pods = system.host_pods(&v.tenant).await;
    let host = eventually("the host Pod", || async {
        host_pods.get_opt("web-x-default-x-team-a").await.unwrap()
    })
    .await;
    assert_eq!(host.spec.unwrap().runtime_class_name.as_deref(), Some("gvisor"));
}

#[tokio::test]
async fn a_failing_patch_keeps_the_class_away_and_tells_the_pod_why() {
    let mut system = system().await;
    system.virtuals[0].wait_classes(&["sandboxed"]).await;
    system.virtuals[0]
        .create_pod_with_homemade_class(&pod("fast", Some("youki")), "youki")
        .await;
    let v = system.virtual_side();
    let event = eventually("a SyncWarning about the failed patch", || async {
        v.events_of("fast").await.into_iter().find(|e| {
            e.reason.as_deref() == Some("SyncWarning")
                && e.message.as_deref().is_some_and(|m| {
                    m.contains("a patch of its runtime class \"youki\" failed")
                        && m.contains("youki is not allowed here")
                })
        })
    })
    .await;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    let logs = system.host_agent.logs();
    assert!(
        logs.contains("a patch failed") && logs.contains("youki is not allowed here"),
        "{logs}"
    );
}
