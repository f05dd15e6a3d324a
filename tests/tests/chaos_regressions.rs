//! Regressions the chaos harness (`cargo run -p rcsync-tests --bin chaos`) found, each as a
//! plain end-to-end test with the real binaries.

use rcsync_tests::system::{System, TenantSpec, pod, runtime_class};
use rcsync_tests::{eventually, retry_delays};

const TENANT: &str = "team-a";

/// Rotates the tenant's token (one file is both the host's `tokenFile` and the agent's
/// `--token-file` here) and waits until the host agent has reloaded it.
async fn rotate_token_and_wait_for_the_host(system: &System) {
    let token_file = system.dir.path().join(format!("{TENANT}.token"));
    let next = token_file.with_extension("next");
    std::fs::write(&next, "a-rotated-token-of-team-a\n").unwrap();
    std::fs::rename(&next, &token_file).unwrap();
    // The host agent reloads on change.
    let host_admin = system.host_admin.clone();
    eventually("the host agent to reload the tenants", || {
        let host_admin = host_admin.clone();
        async move {
            let metrics = rcsync_tests::http_get(&host_admin, "/metrics").await?.1;
            metrics
                .lines()
                .any(|l| {
                    l.starts_with("rcsync_config_reloads_total{result=\"applied\"}") && !l.ends_with(" 0")
                })
                .then_some(())
        }
    })
    .await;
}

/// A rotated token: the Pod syncer's cached connection carried the old token and every ApplyPod
/// failed with UNAUTHENTICATED until the agent restarted. It must reconnect with the new token.
#[tokio::test]
async fn pods_sync_again_after_the_tenant_token_is_rotated() {
    let mut system = System::start(
        &[TenantSpec::new(TENANT, "{enabled: true}")],
        &[runtime_class("gvisor", "runsc", &[])],
    )
    .await;
    // One Pod worker: the Pod after the rotation goes through the connection the first one opened.
    system.virtuals[0].set_agent_flag("--pod-workers", "1");
    system.virtuals[0].restart_agent().await;
    let v = system.virtual_side();
    v.create_pod(&pod("before", Some("gvisor"))).await;
    system.wait_host_pod_count(1).await;

    rotate_token_and_wait_for_the_host(&system).await;
    v.create_pod(&pod("after", Some("gvisor"))).await;
    system.wait_host_pod_count(2).await;
    // The Sync stream opened with the old token was ended by the host agent; the one the agent
    // reopened with the new token brings a class created since.
    system
        .create_host_class(&runtime_class("kata", "kata", &[]))
        .await;
    v.wait_classes(&["gvisor", "kata"]).await;
    let logs = system.virtuals[0].agent.logs();
    assert!(
        logs.contains("open it again with the current token"),
        "the old stream was ended by the host agent:\n{logs}"
    );
}

/// A virtual Pod deleted just after its tenant's token was rotated: the agent's cached connection
/// still carried the old token, DeletePod failed with UNAUTHENTICATED, and that failure was taken
/// as final, so the host Pod stayed (found by chaos seed 261126). The delete must be retried over
/// a new connection with the new token.
#[tokio::test]
async fn a_pod_deleted_right_after_a_token_rotation_is_deleted_on_the_host() {
    let system = System::start(
        &[TenantSpec::new(TENANT, "{enabled: true}")],
        &[runtime_class("gvisor", "runsc", &[])],
    )
    .await;
    let v = system.virtual_side();
    v.create_pod(&pod("web", Some("gvisor"))).await;
    system.wait_host_pod_count(1).await;
    rotate_token_and_wait_for_the_host(&system).await;
    v.delete_pod_now("web").await;
    system.wait_host_pod_count(0).await;
}

/// A virtual Pod deleted while its agent was away, and a new Pod of the same name that may not
/// sync: the old host Pod outlived its virtual Pod, because only an ApplyPod of the new one would
/// have replaced it. The host Pod of an earlier Pod of that name must go whatever the new one's fate.
#[tokio::test]
async fn a_host_pod_goes_when_its_virtual_pod_is_replaced_by_one_that_may_not_sync() {
    let mut system = System::start(
        &[TenantSpec::new(
            TENANT,
            "{enabled: true, selector: {matchLabels: {env: dev}}}",
        )],
        &[runtime_class("gvisor", "runsc", &[("env", "dev")])],
    )
    .await;
    let v = system.virtual_side();
    v.create_pod(&pod("web", Some("gvisor"))).await;
    system.wait_host_pod_count(1).await;

    let v = &mut system.virtuals[0];
    v.stop_agent().await;
    v.delete_pod_now("web").await;
    // A class the tenant made (the virtual API server admits Pods only with existing classes);
    // the agent deletes it when it is back, and the host has no such class.
    v.create_class(&runtime_class("kata", "kata", &[])).await;
    v.create_pod(&pod("web", Some("kata"))).await;
    v.start_agent().await;

    system.wait_host_pod_count(0).await;
    system
        .virtual_side()
        .wait_event(
            "web",
            "did not sync pod \"web\" to host because its runtime class \"kata\" does not exist on the host",
        )
        .await;
}

/// A Pod the host kept refusing backed off to 30 s, and a new Pod under the same name inherited
/// that backoff: after churn, the system took half a minute to converge. A Pod's retries now
/// wait at most 5 s, and a new Pod starts its backoff afresh.
#[tokio::test]
async fn a_refused_pod_is_retried_within_seconds_and_a_new_pod_starts_afresh() {
    // Sync disabled: the tenant may keep its own classes, and every class is allowed, so the
    // host API server itself refuses a Pod whose class the host lacks.
    let system = System::start(&[TenantSpec::new(TENANT, "{enabled: false}")], &[]).await;
    let v = system.virtual_side();
    v.create_class(&runtime_class("kata", "kata", &[])).await;
    v.create_pod(&pod("web", Some("kata"))).await;
    let delays = eventually("seven refusals of the Pod", || {
        let logs = v.agent.logs();
        async move {
            let d = retry_delays(&logs, "web");
            (d.len() >= 7).then_some(d)
        }
    })
    .await;
    // 200 ms doubling, capped at 5 s (±25% jitter): never the 12.8 s the seventh used to wait.
    assert!(delays.iter().all(|ms| *ms <= 6_250), "{delays:?}");
    // A new Pod of the same name starts from the first step.
    let before = delays.len();
    v.delete_pod_now("web").await;
    eventually("the old Pod to be gone", || async {
        v.pods().await.get_opt("web").await.ok()?.is_none().then_some(())
    })
    .await;
    v.create_pod(&pod("web", Some("kata"))).await;
    let after = eventually("a refusal of the new Pod", || {
        let logs = v.agent.logs();
        async move {
            let d = retry_delays(&logs, "web");
            (d.len() > before).then_some(d)
        }
    })
    .await;
    assert!(
        after[before] <= 250,
        "the new Pod inherited the old backoff: {after:?}"
    );
}

/// A Pod denied while the tenant's class sync offered no class at all, then the sync turned off:
/// the virtual agent looked at denied Pods again only when the set of synced classes changed, and
/// here it stayed empty, so the Pod stayed denied although every Pod may sync once the sync is
/// off (a restarted agent synced it at once). Turning the sync on or off re-evaluates them too.
#[tokio::test]
async fn a_denied_pod_syncs_once_class_sync_is_turned_off_while_no_class_was_synced() {
    let mut system = System::start(
        &[TenantSpec::new(
            TENANT,
            "{enabled: true, selector: {matchLabels: {env: dev}}}",
        )],
        &[runtime_class("gvisor", "runsc", &[("env", "prod")])],
    )
    .await;
    // The virtual API server admits Pods only with existing classes: one made by the tenant while
    // the agent is away, which the agent deletes when it is back.
    let v = &mut system.virtuals[0];
    v.stop_agent().await;
    v.create_class(&runtime_class("gvisor", "runsc", &[])).await;
    v.create_pod(&pod("web", Some("gvisor"))).await;
    v.start_agent().await;
    system
        .virtual_side()
        .wait_event(
            "web",
            "did not sync pod \"web\" to host because it does not match the selector under 'sync.fromHost.runtimeClasses.selector'",
        )
        .await;
    system.rewrite_tenants(&[TenantSpec::new(TENANT, "{enabled: false}")]);
    system.wait_host_pod_count(1).await;
}

/// An orphan (a Pod whose class stopped being synced) whose host Pod the host then deleted (a
/// drain's eviction, seed 77 of the chaos run with drains) runs nowhere: it stayed an orphan in
/// the virtual cluster with no word of why it has no host Pod. It is a Pod that may not sync now,
/// and says so with a SyncWarning, as any other; the spec's orphan rule (both copies stay) holds
/// while the host copy is there.
#[tokio::test]
async fn an_orphan_whose_host_pod_is_deleted_says_it_may_not_sync() {
    use k8s_openapi::api::core::v1::Pod;
    use kube::Api;
    use kube::api::{DeleteParams, Patch, PatchParams};
    use serde_json::json;
    let system = System::start(
        &[TenantSpec::new(
            TENANT,
            "{enabled: true, selector: {matchLabels: {env: dev}}}",
        )],
        &[
            runtime_class("gvisor", "runsc", &[("env", "dev")]),
            runtime_class("kata", "kata", &[("env", "dev")]),
        ],
    )
    .await;
    let v = system.virtual_side();
    v.wait_classes(&["gvisor", "kata"]).await;
    v.create_pod(&pod("web", Some("kata"))).await;
    let host: Api<Pod> = system.host_pods(&v.tenant).await;
    let host_name = rcsync_core::naming::host_pod_name("web", "default", TENANT);
    eventually("the host Pod", || async { host.get_opt(&host_name).await.ok()? }).await;
    // The class stops matching the tenant's selector: the Pod is an orphan, kept in both clusters.
    system
        .host_classes()
        .await
        .patch(
            "kata",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"env": "prod"}}})),
        )
        .await
        .unwrap();
    v.wait_classes(&["gvisor"]).await;
    // A change of the Pod finds it an orphan (it does not reach the host).
    v.pods()
        .await
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"rev": "2"}}})),
        )
        .await
        .unwrap();
    eventually("the Pod counted as orphaned", || async {
        v.metrics()
            .await
            .lines()
            .any(|l| l == "rcsync_pods_orphaned 1")
            .then_some(())
    })
    .await;
    // The host deletes its host Pod.
    host.delete(&host_name, &DeleteParams::default()).await.unwrap();
    v.wait_event(
        "web",
        "did not sync pod \"web\" to host because it does not match the selector under 'sync.fromHost.runtimeClasses.selector'",
    )
    .await;
    assert!(
        v.pods().await.get_opt("web").await.unwrap().is_some(),
        "the virtual Pod stays"
    );
    eventually("no orphan counted any more", || async {
        v.metrics()
            .await
            .lines()
            .any(|l| l == "rcsync_pods_orphaned 0")
            .then_some(())
    })
    .await;
}

/// A virtual agent that starts while its connection to the host agent is slow: the budget and
/// claim syncers polled their status stream inside their own loop, and the stream, connecting,
/// held the shared connection's lock while its loop awaited a call that waited for that lock. Every
/// call over the shared connection (Pods, budgets, claims) then waited for ever, with nothing in
/// the logs (chaos seed 1128). Budgets, claims and Pods created while the agent was down must all
/// reach the host.
#[tokio::test]
async fn an_agent_starting_over_a_slow_connection_to_the_host_agent_syncs_budgets_claims_and_pods() {
    use k8s_openapi::api::core::v1::PersistentVolumeClaim;
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    use kube::Api;
    use kube::api::PostParams;
    use rcsync_tests::proxy::{FaultyProxy, Mode};
    use rcsync_tests::system::Transport;

    let tenant = TenantSpec::new(TENANT, "{enabled: false}")
        .disruption_budgets(true)
        .claims(true);
    // Over TLS, as in the chaos run: connecting takes round trips, each delayed by the proxy.
    let mut system = System::start_with(&[tenant], &[], Transport::MutualTls).await;
    let proxy = FaultyProxy::start(system.grpc.parse().unwrap()).await.unwrap();
    proxy.set(Mode::Delay(std::time::Duration::from_millis(300)));
    let side = &mut system.virtuals[0];
    side.stop_agent().await;
    side.set_agent_flag("--host-agent", &format!("https://{}", proxy.addr));
    let client = side.cluster.client().await;
    Api::<PodDisruptionBudget>::namespaced(client.clone(), "default")
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                serde_json::json!({"metadata": {"name": "web"}, "spec": {"minAvailable": 1, "selector": {}}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), "default")
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": "data"}, "spec": {
                "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}))
            .unwrap(),
        )
        .await
        .unwrap();
    side.create_pod(&pod("web", None)).await;
    side.start_agent().await;
    let host = system.host.client().await;
    let namespace = system.virtual_side().tenant.host_namespace();
    let host_name = |name: &str| format!("{name}-x-default-x-{TENANT}");
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(host.clone(), &namespace);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(host.clone(), &namespace);
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(host, &namespace);
    eventually("the budget, the claim and the Pod on the host", || async {
        budgets.get_opt(&host_name("web")).await.ok().flatten()?;
        claims.get_opt(&host_name("data")).await.ok().flatten()?;
        pods.get_opt(&host_name("web")).await.ok().flatten()
    })
    .await;
}
