//! A tenant's PodDisruptionBudgets hold the host's evictions (node drains) of its Pods, when the
//! host's tenants file allows (`sync.toHost.podDisruptionBudgets.enabled`). One test per rule,
//! against the real agents; the host evicts through `pods/eviction`, as `kubectl drain` does.

use k8s_openapi::api::core::v1::{Event as CoreEvent, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{DeleteParams, EvictParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt as _};
use rcsync_tests::system::{System, TenantSpec, Transport, VirtualSide, runtime_class};
use rcsync_tests::{eventually, http_get};
use serde_json::{Value, json};

const TENANT: &str = "team-a";

fn tenant(budgets: bool) -> TenantSpec {
    TenantSpec::new(TENANT, "{enabled: true}").disruption_budgets(budgets)
}

/// A system whose host has a node, so host Pods run and turn Ready.
async fn system(tenants: &[TenantSpec]) -> System {
    let system = System::start_with_nodes(
        tenants,
        &[runtime_class("gvisor", "runsc", &[])],
        Transport::Plaintext,
        1,
    )
    .await;
    for side in &system.virtuals {
        side.wait_classes(&["gvisor"]).await;
    }
    system
}

fn host_name(name: &str, namespace: &str) -> String {
    format!("{name}-x-{namespace}-x-{TENANT}")
}

fn web_pod(name: &str, app: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {"runtimeClassName": "gvisor",
                 "containers": [{"name": "app", "image": "registry.example/app:1.0"}]},
    }))
    .unwrap()
}

fn budget(name: &str, spec: Value) -> PodDisruptionBudget {
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap()
}

/// Creates the virtual budget `web` in `namespace` with `spec`.
async fn create_budget(side: &VirtualSide, namespace: &str, spec: Value) {
    let api: Api<PodDisruptionBudget> = Api::namespaced(side.cluster.client().await, namespace);
    api.create(&PostParams::default(), &budget("web", spec))
        .await
        .unwrap();
}

/// The `SyncError` event on the virtual budget `web` in `default`, once there is one.
async fn sync_error(side: &VirtualSide) -> CoreEvent {
    let events: Api<CoreEvent> = Api::namespaced(side.cluster.client().await, "default");
    let selector = "involvedObject.name=web,involvedObject.kind=PodDisruptionBudget";
    eventually("a SyncError event on the budget", || async {
        events
            .list(&ListParams::default().fields(selector))
            .await
            .ok()?
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("SyncError"))
    })
    .await
}

async fn virtual_budgets(side: &VirtualSide) -> Api<PodDisruptionBudget> {
    Api::namespaced(side.cluster.client().await, "default")
}

async fn host_budgets(system: &System) -> Api<PodDisruptionBudget> {
    Api::namespaced(
        system.host.client().await,
        &system.virtual_side().tenant.host_namespace(),
    )
}

/// Creates the Pods in the virtual cluster and waits until each host Pod is Ready.
async fn running(system: &System, pods: &[(&str, &str)]) {
    let side = system.virtual_side();
    for (name, app) in pods {
        side.create_pod(&web_pod(name, app)).await;
    }
    let host = system.host_pods(&side.tenant).await;
    for (name, _) in pods {
        let host_pod = host_name(name, "default");
        eventually(&format!("host pod {host_pod} Ready"), || async {
            let pod = host.get_opt(&host_pod).await.ok().flatten()?;
            let ready = pod
                .status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            ready.then_some(())
        })
        .await;
    }
}

/// The host's eviction of the host Pod of virtual Pod `name`: Ok, or the API server's refusal.
/// Asked once, as a drain's each try: kube-rs's client would retry a 429 on its own, for minutes.
async fn evict(system: &System, name: &str) -> Result<(), kube::core::Status> {
    let kubeconfig = kube::config::Kubeconfig::read_from(&system.host.kubeconfig).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    config.default_retry = false;
    let host: Api<Pod> = Api::namespaced(
        kube::Client::try_from(config).unwrap(),
        &system.virtual_side().tenant.host_namespace(),
    );
    match host
        .evict(&host_name(name, "default"), &EvictParams::default())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) => Err(*e),
        Err(e) => panic!("evicting {name}: {e}"),
    }
}

/// The host budget of virtual budget `name` once it asks for `min_available` healthy Pods.
async fn wait_host_budget(system: &System, name: &str, min_available: i32) -> PodDisruptionBudget {
    let api = host_budgets(system).await;
    let host = host_name(name, "default");
    eventually(
        &format!("host budget {host} asking for {min_available} healthy Pods"),
        || async {
            let budget = api.get_opt(&host).await.ok().flatten()?;
            let spec = budget.spec.as_ref()?;
            (spec.min_available == Some(IntOrString::Int(min_available))).then_some(budget)
        },
    )
    .await
}

/// Creates the virtual budget `web` (one healthy Pod of `app: web`) in `default` and returns its
/// host budget once held.
async fn held_web_budget(system: &System) -> PodDisruptionBudget {
    create_budget(
        system.virtual_side(),
        "default",
        json!({"minAvailable": 1, "selector": {"matchLabels": {"app": "web"}}}),
    )
    .await;
    wait_host_budget(system, "web", 1).await
}

/// The host budget of `web` once it is another object than `before` (made again).
async fn made_again(system: &System, before: &PodDisruptionBudget) -> PodDisruptionBudget {
    let api = host_budgets(system).await;
    eventually("the host budget made again", || async {
        let budget = api.get_opt(&host_name("web", "default")).await.ok().flatten()?;
        (budget.uid() != before.uid()).then_some(budget)
    })
    .await
}

#[tokio::test]
async fn a_disruption_budget_in_the_virtual_cluster_holds_a_host_eviction_of_its_pods() {
    let system = system(&[tenant(true)]).await;
    let side = system.virtual_side();
    running(&system, &[("web-0", "web"), ("web-1", "web"), ("db", "db")]).await;
    create_budget(
        side,
        "default",
        json!({"minAvailable": 2, "selector": {"matchLabels": {"app": "web"}}}),
    )
    .await;
    let held = wait_host_budget(&system, "web", 2).await;
    eventually("the host budget counting the two web Pods", || async {
        let budget = host_budgets(&system).await.get(&held.name_any()).await.ok()?;
        let status = budget.status?;
        (status.expected_pods == Some(2) && status.current_healthy == Some(2)).then_some(())
    })
    .await;

    // A drain of the host node may not take a web Pod: both must stay up.
    let refused = evict(&system, "web-0").await.unwrap_err();
    assert_eq!(refused.code, 429, "{refused:?}");
    assert_eq!(
        refused.message,
        "Cannot evict pod as it would violate the pod's disruption budget."
    );
    // Another app's Pod goes: the budget selects web only.
    evict(&system, "db").await.unwrap();

    // The tenant loosens its budget: one web Pod may go, not the second.
    virtual_budgets(side)
        .await
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"minAvailable": 1}})),
        )
        .await
        .unwrap();
    wait_host_budget(&system, "web", 1).await;
    evict(&system, "web-0").await.unwrap();
    let refused = evict(&system, "web-1").await.unwrap_err();
    assert_eq!(refused.code, 429, "{refused:?}");

    // Deleted in the virtual cluster, it is gone from the host.
    virtual_budgets(side)
        .await
        .delete("web", &DeleteParams::default())
        .await
        .unwrap();
    let api = host_budgets(&system).await;
    eventually("the host budget gone", || async {
        api.get_opt(&held.name_any()).await.ok()?.is_none().then_some(())
    })
    .await;
    evict(&system, "web-1").await.unwrap();
}

#[tokio::test]
async fn a_budget_stated_as_max_unavailable_asks_the_host_for_the_healthy_pods_the_virtual_cluster_counts() {
    let system = system(&[tenant(true)]).await;
    let side = system.virtual_side();
    running(&system, &[("web-0", "web"), ("web-1", "web"), ("web-2", "web")]).await;
    create_budget(
        side,
        "default",
        json!({"maxUnavailable": 1, "selector": {"matchLabels": {"app": "web"}}}),
    )
    .await;
    // Three web Pods, one of which may be unavailable: two healthy, as a whole number the host's
    // disruption controller can hold host Pods (which have no controller there) to.
    let held = wait_host_budget(&system, "web", 2).await;
    let spec = held.spec.unwrap();
    assert_eq!(spec.max_unavailable, None);
    let selector = spec.selector.unwrap();
    assert_eq!(
        selector
            .match_labels
            .unwrap()
            .get("vcluster.loft.sh/managed-by")
            .map(String::as_str),
        Some(TENANT),
        "only the tenant's Pods"
    );
    evict(&system, "web-0").await.unwrap();
}

#[tokio::test]
async fn a_budget_selects_only_its_own_namespaces_pods_on_the_host() {
    let system = system(&[tenant(true)]).await;
    let side = system.virtual_side();
    running(&system, &[("web-0", "web")]).await;
    rcsync_tests::system::create_namespace(&side.cluster, "other").await;
    create_budget(side, "other", json!({"minAvailable": 5, "selector": {}})).await;
    let api = host_budgets(&system).await;
    let host = host_name("web", "other");
    let held = eventually("the other namespace's budget on the host", || async {
        api.get_opt(&host).await.ok().flatten()
    })
    .await;
    eventually(
        "the host budget computed, selecting no Pod of default",
        || async {
            let status = api.get(&held.name_any()).await.ok()?.status?;
            (status.observed_generation.is_some() && status.expected_pods == Some(0)).then_some(())
        },
    )
    .await;
    evict(&system, "web-0").await.unwrap();
}

#[tokio::test]
async fn a_budget_the_host_does_not_hold_for_the_tenant_shows_a_sync_error_and_is_held_once_allowed() {
    let system = system(&[tenant(false)]).await;
    let side = system.virtual_side();
    running(&system, &[("web-0", "web")]).await;
    create_budget(
        side,
        "default",
        json!({"minAvailable": 1, "selector": {"matchLabels": {"app": "web"}}}),
    )
    .await;
    let event = sync_error(side).await;
    assert_eq!(
        event.message.as_deref(),
        Some(
            "the host does not hold PodDisruptionBudgets of tenant team-a (sync.toHost.podDisruptionBudgets.enabled \
             is not true in the host agent's tenants file), so host node drains do not respect this one"
        )
    );
    assert!(
        host_budgets(&system)
            .await
            .get_opt(&host_name("web", "default"))
            .await
            .unwrap()
            .is_none()
    );
    evict(&system, "web-0").await.unwrap();
    // The virtual agent's status lists it as refused, with the reason.
    let table = side
        .status_table("the budget refused in the status", |t| {
            t.lines()
                .any(|l| l.starts_with("default ") && l.contains(" refused "))
        })
        .await;
    let row = table.lines().find(|l| l.contains(" refused ")).unwrap();
    assert!(row.contains(" web "), "{table}");
    assert!(
        row.contains("the host does not hold PodDisruptionBudgets of tenant team-a"),
        "{table}"
    );

    // The host's operator allows it: the budget is held without being touched again.
    system.rewrite_tenants(&[tenant(true)]);
    wait_host_budget(&system, "web", 1).await;
    side.status_table("the budget held in the status", |t| {
        t.contains("disruption budgets held on the host: 1") && !t.contains(" refused ")
    })
    .await;
    // And switched off again, the host lets it go.
    system.rewrite_tenants(&[tenant(false)]);
    let api = host_budgets(&system).await;
    eventually("the host budget gone once the switch is off", || async {
        api.get_opt(&host_name("web", "default"))
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_host_budget_deleted_on_the_host_is_made_again_while_its_virtual_budget_stays() {
    let system = system(&[tenant(true)]).await;
    let first = held_web_budget(&system).await;
    // Someone on the host (an operator clearing what blocks a drain, a cleanup tool) deletes it.
    host_budgets(&system)
        .await
        .delete(&host_name("web", "default"), &DeleteParams::default())
        .await
        .unwrap();
    let again = made_again(&system, &first).await;
    assert_eq!(
        again.spec.as_ref().and_then(|s| s.min_available.clone()),
        Some(IntOrString::Int(1))
    );
    assert_eq!(
        again.annotations().get("vcluster.loft.sh/object-uid"),
        virtual_budgets(system.virtual_side())
            .await
            .get("web")
            .await
            .unwrap()
            .uid()
            .as_ref(),
        "made again for the same virtual budget"
    );
}

#[tokio::test]
async fn a_host_budget_deleted_while_the_host_agent_was_down_is_made_again_once_it_is_back() {
    let mut system = system(&[tenant(true)]).await;
    let first = held_web_budget(&system).await;
    // No stream is open while it goes: nothing reports it deleted.
    system.host_agent.signal("KILL");
    system.host_agent.wait_exit().await;
    host_budgets(&system)
        .await
        .delete(&host_name("web", "default"), &DeleteParams::default())
        .await
        .unwrap();
    system.restart_host_agent().await;
    made_again(&system, &first).await;
}

#[tokio::test]
async fn a_budget_deleted_while_the_virtual_agent_was_down_is_deleted_on_the_host_when_it_returns() {
    let mut system = system(&[tenant(true)]).await;
    held_web_budget(&system).await;
    let side = &mut system.virtuals[0];
    side.stop_agent().await;
    virtual_budgets(side)
        .await
        .delete("web", &DeleteParams::default())
        .await
        .unwrap();
    side.start_agent().await;
    let api = host_budgets(&system).await;
    eventually("the host budget gone", || async {
        api.get_opt(&host_name("web", "default"))
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_host_budget_rcsync_does_not_manage_is_never_taken_over_and_the_budget_is_held_once_it_goes() {
    let system = system(&[tenant(true)]).await;
    let host_name = host_name("web", "default");
    let theirs = budget(
        &host_name,
        json!({"minAvailable": 0, "selector": {"matchLabels": {"app": "host"}}}),
    );
    let host = host_budgets(&system).await;
    host.create(&PostParams::default(), &theirs).await.unwrap();
    let side = system.virtual_side();
    create_budget(side, "default", json!({"minAvailable": 1, "selector": {}})).await;
    let event = sync_error(side).await;
    assert_eq!(
        event.message.as_deref(),
        Some(
            "the host name \"web-x-default-x-team-a\" is held by a PodDisruptionBudget rcsync does not manage"
        )
    );
    // Asked again once the virtual disruption controller wrote its status (what the host agent
    // reads of the budget changed), and refused again: from here on nothing in the virtual
    // cluster changes, the host's budget going is all.
    let applied =
        r#"rcsync_grpc_requests_total{method="/rcsync.v1.PodSync/ApplyDisruptionBudget",code="Ok"} "#;
    eventually("the budget asked for again after its status", || async {
        let metrics = http_get(&system.host_admin, "/metrics").await?.1;
        let calls: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(applied))?
            .parse()
            .ok()?;
        (calls >= 2).then_some(())
    })
    .await;
    let observed = virtual_budgets(side).await.get("web").await.unwrap();
    assert_eq!(observed.status.unwrap().observed_generation, Some(1));
    let kept = host.get(&host_name).await.unwrap();
    assert_eq!(
        kept.spec.unwrap().min_available,
        Some(IntOrString::Int(0)),
        "the host's budget stays as it was"
    );
    host.delete(&host_name, &DeleteParams::default()).await.unwrap();
    wait_host_budget(&system, "web", 1).await;
    side.status_table("the budget held in the status", |t| {
        t.contains("disruption budgets held on the host: 1") && !t.contains(" refused ")
    })
    .await;
}
