//! devcluster driven by kube-rs, the client stack the agents use: watcher semantics, selectors,
//! 410 recovery and optimistic concurrency.

use std::collections::BTreeMap;
use std::time::Duration;

use devcluster::{DevCluster, ServerOptions};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::api::node::v1::RuntimeClass;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use serde_json::json;
use tokio::time::timeout;

const DEADLINE: Duration = Duration::from_secs(20);

async fn client_for(cluster: &DevCluster) -> Client {
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&cluster.kubeconfig("test")).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

fn runtime_class(name: &str, handler: &str, labels: &[(&str, &str)]) -> RuntimeClass {
    serde_json::from_value(json!({
        "apiVersion": "node.k8s.io/v1",
        "kind": "RuntimeClass",
        "metadata": {"name": name, "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()},
        "handler": handler,
    }))
    .unwrap()
}

/// The next watcher event, within the deadline.
async fn next_event(
    stream: &mut (impl futures::Stream<Item = Result<Event<RuntimeClass>, watcher::Error>> + Unpin),
) -> Event<RuntimeClass> {
    timeout(DEADLINE, stream.try_next())
        .await
        .expect("watch event before the deadline")
        .unwrap()
        .unwrap()
}

fn name(rc: &RuntimeClass) -> String {
    rc.metadata.name.clone().unwrap_or_default()
}

#[tokio::test]
async fn watcher_sees_init_changes_selector_exits_and_recovers_from_410() {
    let cluster = DevCluster::start(ServerOptions::default()).await.unwrap();
    let client = client_for(&cluster).await;
    let classes: Api<RuntimeClass> = Api::all(client.clone());
    classes
        .create(
            &PostParams::default(),
            &runtime_class("gvisor", "runsc", &[("env", "dev")]),
        )
        .await
        .unwrap();

    let config = watcher::Config::default().labels("env=dev");
    let mut stream = watcher::watcher(classes.clone(), config).boxed();
    assert!(matches!(next_event(&mut stream).await, Event::Init));
    assert!(matches!(next_event(&mut stream).await, Event::InitApply(rc) if name(&rc) == "gvisor"));
    assert!(matches!(next_event(&mut stream).await, Event::InitDone));

    // Created: seen.
    classes
        .create(
            &PostParams::default(),
            &runtime_class("youki", "youki", &[("env", "dev")]),
        )
        .await
        .unwrap();
    assert!(matches!(next_event(&mut stream).await, Event::Apply(rc) if name(&rc) == "youki"));

    // Relabelled out of the selector: arrives as a deletion.
    let relabel = json!({"metadata": {"labels": {"env": "prod"}}});
    classes
        .patch("youki", &PatchParams::default(), &Patch::Merge(&relabel))
        .await
        .unwrap();
    assert!(matches!(next_event(&mut stream).await, Event::Delete(rc) if name(&rc) == "youki"));

    // Deleted: seen.
    classes.delete("gvisor", &DeleteParams::default()).await.unwrap();
    assert!(matches!(next_event(&mut stream).await, Event::Delete(rc) if name(&rc) == "gvisor"));

    // Compaction past the watcher's last resourceVersion (a change it did not see, outside its
    // selector) ends the watch; the resume gets 410 Gone and the watcher relists.
    classes
        .create(
            &PostParams::default(),
            &runtime_class("kata", "kata", &[("env", "dev")]),
        )
        .await
        .unwrap();
    assert!(matches!(next_event(&mut stream).await, Event::Apply(rc) if name(&rc) == "kata"));
    classes
        .create(
            &PostParams::default(),
            &runtime_class("hidden", "runc", &[("env", "prod")]),
        )
        .await
        .unwrap();
    cluster.store().compact();
    let gone = timeout(DEADLINE, stream.try_next())
        .await
        .expect("an answer before the deadline");
    assert!(
        matches!(&gone, Err(watcher::Error::WatchError(status)) if status.code == 410),
        "the watcher reports 410 Gone: {gone:?}"
    );
    assert!(matches!(next_event(&mut stream).await, Event::Init));
    assert!(matches!(next_event(&mut stream).await, Event::InitApply(rc) if name(&rc) == "kata"));
    assert!(matches!(next_event(&mut stream).await, Event::InitDone));
    classes
        .create(
            &PostParams::default(),
            &runtime_class("crun", "crun", &[("env", "dev")]),
        )
        .await
        .unwrap();
    assert!(matches!(next_event(&mut stream).await, Event::Apply(rc) if name(&rc) == "crun"));
    cluster.shutdown().await;
}

#[tokio::test]
async fn concurrent_writers_get_conflicts_and_lose_no_update() {
    let cluster = DevCluster::start(ServerOptions::default()).await.unwrap();
    let client = client_for(&cluster).await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "counter"}, "data": {"n": "0"}})).unwrap();
    maps.create(&PostParams::default(), &cm).await.unwrap();

    const WRITERS: usize = 4;
    const INCREMENTS: usize = 10;
    let mut tasks = Vec::new();
    for _ in 0..WRITERS {
        let maps = maps.clone();
        tasks.push(tokio::spawn(async move {
            let mut conflicts = 0;
            for _ in 0..INCREMENTS {
                loop {
                    let mut cm = maps.get("counter").await.unwrap();
                    let n: usize = cm.data.as_ref().unwrap()["n"].parse().unwrap();
                    cm.data.as_mut().unwrap().insert("n".into(), (n + 1).to_string());
                    match maps.replace("counter", &PostParams::default(), &cm).await {
                        Ok(_) => break,
                        Err(kube::Error::Api(e)) if e.code == 409 => conflicts += 1,
                        Err(e) => panic!("unexpected error: {e}"),
                    }
                }
            }
            conflicts
        }));
    }
    let mut conflicts = 0;
    for t in tasks {
        conflicts += t.await.unwrap();
    }
    let final_value = maps.get("counter").await.unwrap().data.unwrap()["n"].clone();
    assert_eq!(
        final_value,
        (WRITERS * INCREMENTS).to_string(),
        "every increment survived ({conflicts} conflicts)"
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn pods_are_admitted_against_runtime_classes() {
    let cluster = DevCluster::start(ServerOptions::default()).await.unwrap();
    let client = client_for(&cluster).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let classes: Api<RuntimeClass> = Api::all(client.clone());
    let pod = |rc: &str| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "spec": {"runtimeClassName": rc, "containers": [{"name": "c", "image": "busybox"}]}
        }))
        .unwrap()
    };
    let err = pods
        .create(&PostParams::default(), &pod("gvisor"))
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(e) => {
            assert_eq!(e.code, 403);
            assert_eq!(
                e.message,
                "pods \"p\" is forbidden: pod rejected: RuntimeClass \"gvisor\" not found"
            );
        }
        other => panic!("{other}"),
    }
    let mut rc = runtime_class("gvisor", "runsc", &[]);
    rc.overhead = serde_json::from_value(json!({"podFixed": {"cpu": "100m"}})).unwrap();
    rc.scheduling = serde_json::from_value(json!({"nodeSelector": {"sandbox": "gvisor"}, "tolerations": [{"key": "sandbox", "operator": "Exists"}]})).unwrap();
    classes.create(&PostParams::default(), &rc).await.unwrap();
    let created = pods.create(&PostParams::default(), &pod("gvisor")).await.unwrap();
    let spec = created.spec.unwrap();
    assert_eq!(spec.overhead.unwrap()["cpu"].0, "100m");
    assert_eq!(spec.node_selector.unwrap()["sandbox"], "gvisor");
    assert_eq!(spec.tolerations.unwrap()[0].key.as_deref(), Some("sandbox"));

    // handler is immutable.
    let change = json!({"handler": "kata"});
    let err = classes
        .patch("gvisor", &PatchParams::default(), &Patch::Merge(&change))
        .await
        .unwrap_err();
    assert!(matches!(err, kube::Error::Api(e) if e.code == 422 && e.message.contains("field is immutable")));

    // Status subresource: only status changes; main writes keep status.
    let status = json!({"status": {"phase": "Running", "podIP": "10.1.2.3"}});
    pods.patch_status("p", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    let sneaky = json!({"metadata": {"labels": {"a": "b"}}, "status": {"phase": "Failed"}});
    let patched = pods
        .patch("p", &PatchParams::default(), &Patch::Merge(&sneaky))
        .await
        .unwrap();
    assert_eq!(patched.status.unwrap().phase.as_deref(), Some("Running"));

    // Field selectors.
    let running = pods
        .list(&ListParams::default().fields("status.phase=Running"))
        .await
        .unwrap();
    assert_eq!(running.items.len(), 1);
    let pending = pods
        .list(&ListParams::default().fields("status.phase=Pending"))
        .await
        .unwrap();
    assert!(pending.items.is_empty());

    // Delete with a UID precondition.
    let wrong = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: Some("nope".into()),
            resource_version: None,
        }),
        ..Default::default()
    };
    assert!(matches!(pods.delete("p", &wrong).await, Err(kube::Error::Api(e)) if e.code == 409));
    pods.delete("p", &DeleteParams::default()).await.unwrap();
    assert!(
        pods.get_opt("p").await.unwrap().is_none(),
        "a Pod without nodeName is removed at once"
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_pod_quota_refuses_creates_past_it_before_a_taken_name_is_noticed() {
    use k8s_openapi::api::core::v1::ResourceQuota;
    let cluster = DevCluster::start(ServerOptions::default()).await.unwrap();
    let client = client_for(&cluster).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let quotas: Api<ResourceQuota> = Api::namespaced(client.clone(), "default");
    let pod = |name: &str| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]}
        }))
        .unwrap()
    };
    let quota = |name: &str, hard: serde_json::Value| -> ResourceQuota {
        serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"hard": hard}})).unwrap()
    };
    let bad = quotas
        .create(&PostParams::default(), &quota("odd", json!({"pods": "1.5"})))
        .await
        .unwrap_err();
    assert!(
        matches!(&bad, kube::Error::Api(e) if e.code == 422 && e.message.contains("spec.hard[pods]")),
        "{bad}"
    );
    quotas
        .create(&PostParams::default(), &quota("compute", json!({"pods": "2"})))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &pod("a")).await.unwrap();
    pods.create(&PostParams::default(), &pod("b")).await.unwrap();
    let refused = |name: &'static str| {
        let pods = pods.clone();
        let pod = pod(name);
        async move {
            match pods.create(&PostParams::default(), &pod).await.unwrap_err() {
                kube::Error::Api(e) => (e.code, e.message),
                other => panic!("{other}"),
            }
        }
    };
    let over = (
        403,
        "pods \"c\" is forbidden: exceeded quota: compute, requested: pods=1, used: pods=2, limited: pods=2"
            .to_string(),
    );
    assert_eq!(refused("c").await, over);
    // Admission comes before storage: a taken name in a full namespace is refused for the quota,
    // as kube-apiserver refuses it, not reported as already existing.
    let (code, message) = refused("a").await;
    assert_eq!(
        (code, message.contains("exceeded quota: compute")),
        (403, true),
        "{message}"
    );
    // A Pod that ended no longer counts as a Pod, but is still an object in storage, which
    // `count/pods` counts.
    let done = json!({"status": {"phase": "Succeeded"}});
    pods.patch_status("b", &PatchParams::default(), &Patch::Merge(&done))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &pod("c")).await.unwrap();
    quotas.delete("compute", &DeleteParams::default()).await.unwrap();
    quotas
        .create(
            &PostParams::default(),
            &quota("objects", json!({"count/pods": "3"})),
        )
        .await
        .unwrap();
    let (code, message) = refused("d").await;
    assert_eq!(
        (code, message.as_str()),
        (
            403,
            "pods \"d\" is forbidden: exceeded quota: objects, requested: count/pods=1, used: count/pods=3, limited: count/pods=3"
        )
    );
    // Below the quota a taken name is AlreadyExists, as before.
    quotas.delete("objects", &DeleteParams::default()).await.unwrap();
    let (code, _) = refused("a").await;
    assert_eq!(code, 409);
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_quota_s_status_counts_the_pods_of_its_namespace_that_have_not_ended() {
    use k8s_openapi::api::core::v1::ResourceQuota;
    let cluster = DevCluster::start(ServerOptions::default()).await.unwrap();
    let client = client_for(&cluster).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let quotas: Api<ResourceQuota> = Api::namespaced(client.clone(), "default");
    let quota: ResourceQuota = serde_json::from_value(json!({
        "metadata": {"name": "compute"},
        "spec": {"hard": {"pods": "3", "requests.cpu": "2"}}
    }))
    .unwrap();
    quotas.create(&PostParams::default(), &quota).await.unwrap();
    // What the quota controller writes: `hard` as the spec has it, `used` as counted, changed by
    // every Pod create, end and delete in the namespace (not in another).
    let status_becomes = |used: &'static str, cpu: &'static str| {
        let quotas = quotas.clone();
        async move {
            let want = json!({
                "hard": {"pods": "3", "requests.cpu": "2"},
                "used": {"pods": used, "requests.cpu": cpu}
            });
            let current = quotas.get("compute").await.unwrap();
            if serde_json::to_value(&current.status).unwrap() == want {
                return;
            }
            let since = current.metadata.resource_version.unwrap();
            let mut watch = quotas.watch(&Default::default(), &since).await.unwrap().boxed();
            timeout(DEADLINE, async {
                while let Some(event) = watch.try_next().await.unwrap() {
                    if let kube::api::WatchEvent::Modified(q) | kube::api::WatchEvent::Added(q) = event
                        && serde_json::to_value(&q.status).unwrap() == want
                    {
                        return;
                    }
                }
            })
            .await
            .unwrap_or_else(|_| panic!("status.used pods {used}, requests.cpu {cpu} within {DEADLINE:?}"));
        }
    };
    status_becomes("0", "0").await;
    let pod = |name: &str| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"containers": [{"name": "c", "image": "busybox", "resources": {"requests": {"cpu": "500m"}}}]}
        }))
        .unwrap()
    };
    pods.create(&PostParams::default(), &pod("a")).await.unwrap();
    pods.create(&PostParams::default(), &pod("b")).await.unwrap();
    Api::<Pod>::namespaced(client.clone(), "kube-system")
        .create(&PostParams::default(), &pod("elsewhere"))
        .await
        .unwrap();
    status_becomes("2", "1").await;
    let done = json!({"status": {"phase": "Failed"}});
    pods.patch_status("b", &PatchParams::default(), &Patch::Merge(&done))
        .await
        .unwrap();
    status_becomes("1", "500m").await;
    pods.delete("a", &DeleteParams::default()).await.unwrap();
    status_becomes("0", "0").await;
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_compute_quota_refuses_pods_that_do_not_state_it_or_would_pass_it_as_upstream_words_it() {
    use k8s_openapi::api::core::v1::ResourceQuota;
    let cluster = DevCluster::start(ServerOptions::default()).await.unwrap();
    let client = client_for(&cluster).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let quotas: Api<ResourceQuota> = Api::namespaced(client.clone(), "default");
    let create_quota = |name: &str, hard: serde_json::Value| {
        let quotas = quotas.clone();
        let quota: ResourceQuota =
            serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"hard": hard}})).unwrap();
        async move { quotas.create(&PostParams::default(), &quota).await }
    };
    let create_pod = |name: &str, resources: serde_json::Value| {
        let pods = pods.clone();
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"containers": [
                {"name": "app", "image": "busybox", "resources": resources},
                {"name": "sidecar", "image": "busybox", "resources": {"limits": {"cpu": "100m", "memory": "16Mi"}}}
            ]}
        }))
        .unwrap();
        async move {
            match pods.create(&PostParams::default(), &pod).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(e)) => Err((e.code, e.message)),
                Err(other) => panic!("{other}"),
            }
        }
    };
    // A quota on a resource devcluster does not count would silently not be enforced: refused.
    let refused = create_quota("objects", json!({"services": "2"}))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, kube::Error::Api(e) if e.code == 422 && e.message.contains("spec.hard[services]")),
        "{refused}"
    );
    create_quota("compute", json!({"requests.cpu": "1", "limits.memory": "256Mi"}))
        .await
        .unwrap();
    // Each container must state what the quota limits (the sidecar's limits are its requests).
    assert_eq!(
        create_pod("bare", json!({})).await,
        Err((
            403,
            "pods \"bare\" is forbidden: failed quota: compute: must specify limits.memory for: app; must specify requests.cpu for: app".into()
        ))
    );
    create_pod(
        "a",
        json!({"requests": {"cpu": "400m"}, "limits": {"memory": "100Mi"}}),
    )
    .await
    .unwrap();
    // 400m + 100m + 600m > 1: refused, naming only what it passes.
    assert_eq!(
        create_pod("b", json!({"requests": {"cpu": "600m"}, "limits": {"memory": "64Mi"}})).await,
        Err((
            403,
            "pods \"b\" is forbidden: exceeded quota: compute, requested: requests.cpu=700m, used: requests.cpu=500m, limited: requests.cpu=1".into()
        ))
    );
    create_pod(
        "b",
        json!({"requests": {"cpu": "300m"}, "limits": {"memory": "64Mi"}}),
    )
    .await
    .unwrap();
    // Requests above limits, and what is not a quantity, are invalid, as upstream says.
    let (code, message) = create_pod(
        "c",
        json!({"requests": {"cpu": "2"}, "limits": {"cpu": "1", "memory": "1Gi"}}),
    )
    .await
    .unwrap_err();
    assert_eq!(code, 422);
    assert!(message.contains("spec.containers[0].resources.requests: Invalid value: \"2\": must be less than or equal to cpu limit of 1"), "{message}");
    let (code, message) = create_pod("c", json!({"requests": {"cpu": "lots"}}))
        .await
        .unwrap_err();
    assert_eq!(code, 422);
    assert!(
        message.contains("spec.containers[0].resources.requests[cpu]"),
        "{message}"
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_pod_takes_added_tolerations_and_no_other_toleration_change() {
    let cluster = DevCluster::start(ServerOptions::default()).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client_for(&cluster).await, "default");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}],
                 "tolerations": [{"key": "a", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let set = |tolerations: serde_json::Value| {
        let pods = pods.clone();
        async move {
            pods.patch(
                "p",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"tolerations": tolerations}})),
            )
            .await
        }
    };
    // An addition, and a changed tolerationSeconds: allowed.
    let added = set(json!([
        {"key": "a", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 60},
        {"key": "b", "operator": "Exists"}
    ]))
    .await
    .unwrap();
    assert_eq!(added.spec.unwrap().tolerations.unwrap().len(), 2);
    // Dropping one: refused with upstream's reason.
    match set(json!([{"key": "b", "operator": "Exists"}]))
        .await
        .unwrap_err()
    {
        kube::Error::Api(e) => {
            assert_eq!(e.code, 422);
            assert!(
                e.message.contains(
                    "spec.tolerations: Forbidden: existing toleration can not be modified except its tolerationSeconds"
                ),
                "{}",
                e.message
            );
        }
        other => panic!("{other}"),
    }
    cluster.shutdown().await;
}

#[tokio::test]
async fn scheduling_gates_only_go_and_a_gated_pod_may_only_narrow_its_placement() {
    let cluster = DevCluster::start(ServerOptions::default()).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client_for(&cluster).await, "default");
    let term = |expressions: serde_json::Value| json!({"matchExpressions": expressions});
    let zone = json!({"key": "zone", "operator": "In", "values": ["a"]});
    let arch = json!({"key": "arch", "operator": "In", "values": ["arm64"]});
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}],
                 "schedulingGates": [{"name": "example.com/queue"}, {"name": "example.com/quota"}],
                 "nodeSelector": {"pool": "batch"},
                 "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
                     {"nodeSelectorTerms": [term(json!([zone]))]}}}}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let refused = |result: Result<Pod, kube::Error>| match result {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 422, "{}", e.message);
            e.message
        }
        other => panic!("expected a refusal, got {other:?}"),
    };
    let patch = |body: serde_json::Value| {
        let pods = pods.clone();
        async move {
            pods.patch("p", &PatchParams::default(), &Patch::Merge(body))
                .await
        }
    };
    // A gate cannot be added, even while others are there.
    let message = refused(
        patch(json!({"spec": {"schedulingGates": [{"name": "example.com/queue"}, {"name": "example.com/quota"}, {"name": "x"}]}}))
            .await,
    );
    assert!(
        message.contains("spec.schedulingGates[2].name: Forbidden: only deletion is allowed, but found new scheduling gate 'x'"),
        "{message}"
    );
    // While gated: node selector entries and affinity requirements may be added ...
    let narrowed = patch(json!({"spec": {
        "nodeSelector": {"pool": "batch", "flavor": "spot"},
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
            {"nodeSelectorTerms": [term(json!([zone, arch]))]}}},
        "schedulingGates": [{"name": "example.com/quota"}]}}))
    .await
    .unwrap();
    let spec = narrowed.spec.unwrap();
    assert_eq!(spec.node_selector.unwrap().len(), 2);
    assert_eq!(spec.scheduling_gates.unwrap().len(), 1);
    // ... but not changed or taken away.
    let message = refused(patch(json!({"spec": {"nodeSelector": {"pool": "interactive"}}})).await);
    assert!(
        message.contains("spec.nodeSelector: Invalid value: {\"flavor\":\"spot\",\"pool\":\"interactive\"}: only additions to spec.nodeSelector are allowed (no mutations or deletions)"),
        "{message}"
    );
    let message = refused(
        patch(
            json!({"spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
            {"nodeSelectorTerms": [term(json!([arch]))]}}}}}),
        )
        .await,
    );
    assert!(
        message.contains("nodeSelectorTerms[0]: Invalid value:")
            && message.contains("only additions are allowed"),
        "{message}"
    );
    // The last gate goes: from then on placement is fixed, as for any Pod.
    patch(json!({"spec": {"schedulingGates": null}})).await.unwrap();
    let message = refused(patch(json!({"spec": {"nodeSelector": {"extra": "1"}}})).await);
    assert!(message.contains("pod updates may not change fields"), "{message}");
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_pods_deadline_may_be_set_or_lowered_never_raised_or_removed() {
    let cluster = DevCluster::start(ServerOptions::default()).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client_for(&cluster).await, "default");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let set = |deadline: serde_json::Value| {
        let pods = pods.clone();
        async move {
            pods.patch(
                "p",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"activeDeadlineSeconds": deadline}})),
            )
            .await
        }
    };
    set(json!(60)).await.unwrap();
    set(json!(30)).await.unwrap();
    for (deadline, words) in [
        (
            json!(45),
            "spec.activeDeadlineSeconds: Invalid value: 45: must be less than or equal to previous value",
        ),
        (
            json!(null),
            "spec.activeDeadlineSeconds: Invalid value: null: must not update from a positive integer to nil value",
        ),
    ] {
        match set(deadline).await.unwrap_err() {
            kube::Error::Api(e) => {
                assert_eq!(e.code, 422);
                assert!(e.message.contains(words), "{}", e.message);
            }
            other => panic!("{other}"),
        }
    }
    cluster.shutdown().await;
}

#[tokio::test]
async fn wrong_token_is_unauthorized() {
    let cluster = DevCluster::start(ServerOptions::default()).await.unwrap();
    let kubeconfig = cluster
        .kubeconfig("test")
        .replace(cluster.token().unwrap(), "wrong");
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(Client::try_from(config).unwrap(), "default");
    assert!(matches!(pods.list(&ListParams::default()).await, Err(kube::Error::Api(e)) if e.code == 401));
    cluster.shutdown().await;
}

#[tokio::test]
async fn server_side_apply_creates_then_merges() {
    let cluster = DevCluster::start(ServerOptions::default()).await.unwrap();
    let client = client_for(&cluster).await;
    let classes: Api<RuntimeClass> = Api::all(client);
    let params = PatchParams::apply("rcsync-test").force();
    let first = json!({"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": "gvisor", "labels": {"a": "1"}}, "handler": "runsc"});
    let created = classes
        .patch("gvisor", &params, &Patch::Apply(&first))
        .await
        .unwrap();
    assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());
    let second = json!({"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": "gvisor", "labels": {"b": "2"}}, "handler": "runsc"});
    let merged = classes
        .patch("gvisor", &params, &Patch::Apply(&second))
        .await
        .unwrap();
    assert_eq!(merged.metadata.uid, created.metadata.uid);
    assert_eq!(
        merged.metadata.labels.unwrap().get("b").map(String::as_str),
        Some("2")
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn watch_list_streams_the_initial_events_then_a_bookmark() {
    let cluster = DevCluster::start(ServerOptions::default()).await.unwrap();
    let client = client_for(&cluster).await;
    let classes: Api<RuntimeClass> = Api::all(client);
    for name in ["a", "b", "c"] {
        classes
            .create(&PostParams::default(), &runtime_class(name, "h", &[]))
            .await
            .unwrap();
    }
    let mut stream = watcher::watcher(classes.clone(), watcher::Config::default().streaming_lists()).boxed();
    assert!(matches!(next_event(&mut stream).await, Event::Init));
    let mut seen = Vec::new();
    loop {
        match next_event(&mut stream).await {
            Event::InitApply(rc) => seen.push(name(&rc)),
            Event::InitDone => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, ["a", "b", "c"]);
    classes
        .create(&PostParams::default(), &runtime_class("d", "h", &[]))
        .await
        .unwrap();
    assert!(matches!(next_event(&mut stream).await, Event::Apply(rc) if name(&rc) == "d"));
    cluster.shutdown().await;
}

#[tokio::test]
async fn watch_events_carry_their_type_before_their_object() {
    use futures::AsyncBufReadExt;
    let cluster = DevCluster::start(ServerOptions::default()).await.unwrap();
    let client = client_for(&cluster).await;
    let classes: Api<RuntimeClass> = Api::all(client.clone());
    classes
        .create(&PostParams::default(), &runtime_class("a", "h", &[]))
        .await
        .unwrap();
    let request = http::Request::get("/apis/node.k8s.io/v1/runtimeclasses?watch=true&resourceVersion=0")
        .body(Vec::new())
        .unwrap();
    let mut events = Box::pin(client.request_stream(request).await.unwrap());
    let mut line = String::new();
    timeout(DEADLINE, events.read_line(&mut line))
        .await
        .expect("a watch event within the deadline")
        .unwrap();
    // As the API server writes it: clients decoding in one pass need the type first.
    assert!(line.starts_with(r#"{"type":"ADDED","object":{"#), "{line}");
    let event: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["object"]["metadata"]["name"], "a", "{line}");
    cluster.shutdown().await;
}

fn config_map(name: &str, extra: serde_json::Value) -> ConfigMap {
    let mut value = json!({"metadata": {"name": name}, "data": {"k": "v"}});
    if let Some(meta) = extra.get("metadata") {
        for (k, v) in meta.as_object().unwrap() {
            value["metadata"][k] = v.clone();
        }
    }
    serde_json::from_value(value).unwrap()
}

#[tokio::test]
async fn metadata_requests_get_partial_object_metadata_without_the_data() {
    let cluster = DevCluster::start(ServerOptions::default()).await.unwrap();
    let client = client_for(&cluster).await;
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let cm = config_map("settings", json!({"metadata": {"labels": {"app": "web"}}}));
    config_maps.create(&PostParams::default(), &cm).await.unwrap();
    // Raw, so the answer is checked as the API server sent it (kube-rs would drop unknown fields).
    let metadata_of = |url: &str, accept: &str| {
        http::Request::get(url)
            .header(http::header::ACCEPT, accept)
            .body(Vec::new())
            .unwrap()
    };
    let one: serde_json::Value = client
        .request(metadata_of(
            "/api/v1/namespaces/default/configmaps/settings",
            "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1",
        ))
        .await
        .unwrap();
    assert_eq!(one["kind"], "PartialObjectMetadata");
    assert_eq!(one["apiVersion"], "meta.k8s.io/v1");
    assert_eq!(one["metadata"]["labels"]["app"], "web");
    assert!(one.get("data").is_none(), "{one}");
    let list: serde_json::Value = client
        .request(metadata_of(
            "/api/v1/namespaces/default/configmaps",
            "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1",
        ))
        .await
        .unwrap();
    assert_eq!(list["kind"], "PartialObjectMetadataList");
    assert!(list["metadata"]["resourceVersion"].is_string(), "{list}");
    let items = list["items"].as_array().unwrap();
    assert!(
        items
            .iter()
            .all(|i| i["kind"] == "PartialObjectMetadata" && i.get("data").is_none()),
        "{list}"
    );
    // A metadata watch (kube-rs's watcher over PartialObjectMeta) sees changes without the data.
    let metadata_api: Api<kube::core::PartialObjectMeta<ConfigMap>> =
        Api::namespaced(client.clone(), "default");
    let mut watch = watcher::watcher(metadata_api, watcher::Config::default().labels("app=web")).boxed();
    loop {
        if let Event::InitDone = next_meta(&mut watch).await {
            break;
        }
    }
    config_maps
        .patch(
            "settings",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"seen": "yes"}}})),
        )
        .await
        .unwrap();
    let Event::Apply(changed) = next_meta(&mut watch).await else {
        panic!("the change is an Apply");
    };
    assert_eq!(changed.metadata.annotations.unwrap()["seen"], "yes");
    assert_eq!(
        changed.types.map(|t| t.kind).as_deref(),
        Some("PartialObjectMetadata")
    );
}

async fn next_meta<S>(watch: &mut S) -> Event<kube::core::PartialObjectMeta<ConfigMap>>
where
    S: futures::Stream<Item = Result<Event<kube::core::PartialObjectMeta<ConfigMap>>, watcher::Error>>
        + Unpin,
{
    timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("a watch event within 10 s")
        .expect("the watch goes on")
        .expect("no watch error")
}

#[tokio::test]
async fn a_finalizer_holds_a_deletion_until_it_is_removed() {
    let cluster = DevCluster::start(ServerOptions::default()).await.unwrap();
    let client = client_for(&cluster).await;
    let maps: Api<ConfigMap> = Api::namespaced(client, "default");
    let held = config_map("held", json!({"metadata": {"finalizers": ["example.com/hold"]}}));
    let created = maps.create(&PostParams::default(), &held).await.unwrap();
    maps.delete("held", &DeleteParams::default()).await.unwrap();
    let terminating = maps.get("held").await.unwrap();
    assert!(
        terminating.metadata.deletion_timestamp.is_some(),
        "the object is Terminating"
    );
    // Removing the finalizer completes the deletion.
    let uid = created.metadata.uid.clone().unwrap();
    let release = json!({"metadata": {"finalizers": null}});
    maps.patch("held", &PatchParams::default(), &Patch::Merge(&release))
        .await
        .unwrap();
    let deleted = kube::runtime::wait::await_condition(
        maps.clone(),
        "held",
        kube::runtime::conditions::is_deleted(&uid),
    );
    timeout(DEADLINE, deleted)
        .await
        .expect("deleted before the deadline")
        .unwrap();
    cluster.shutdown().await;
}

#[tokio::test]
async fn propagation_policies_follow_owner_references() {
    let cluster = DevCluster::start(ServerOptions::default()).await.unwrap();
    let client = client_for(&cluster).await;
    let maps: Api<ConfigMap> = Api::namespaced(client, "default");
    let owned_by = |owner: &ConfigMap| {
        json!({"metadata": {"ownerReferences": [{
            "apiVersion": "v1", "kind": "ConfigMap", "name": owner.metadata.name, "uid": owner.metadata.uid
        }]}})
    };
    for (policy, params) in [
        ("background", DeleteParams::background()),
        ("foreground", DeleteParams::foreground()),
        ("orphan", DeleteParams::orphan()),
    ] {
        let owner = maps
            .create(
                &PostParams::default(),
                &config_map(&format!("{policy}-owner"), json!({})),
            )
            .await
            .unwrap();
        let dependent = config_map(&format!("{policy}-dependent"), owned_by(&owner));
        maps.create(&PostParams::default(), &dependent).await.unwrap();
        maps.delete(&format!("{policy}-owner"), &params).await.unwrap();
        let owner_uid = owner.metadata.uid.clone().unwrap();
        let owner_name = format!("{policy}-owner");
        let gone = kube::runtime::wait::await_condition(
            maps.clone(),
            &owner_name,
            kube::runtime::conditions::is_deleted(&owner_uid),
        );
        timeout(DEADLINE, gone).await.expect("the owner goes").unwrap();
        let left = maps.get_opt(&format!("{policy}-dependent")).await.unwrap();
        if policy == "orphan" {
            let left = left.expect("an orphaned dependent stays");
            assert!(
                left.metadata.owner_references.unwrap_or_default().is_empty(),
                "and loses its owner reference"
            );
        } else {
            assert!(left.is_none(), "{policy}: the dependent is deleted");
        }
    }
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_dependent_stays_until_its_last_owner_is_gone() {
    let cluster = DevCluster::start(ServerOptions::default()).await.unwrap();
    let client = client_for(&cluster).await;
    let maps: Api<ConfigMap> = Api::namespaced(client, "default");
    let mut owners = Vec::new();
    for name in ["first-owner", "second-owner"] {
        owners.push(
            maps.create(&PostParams::default(), &config_map(name, json!({})))
                .await
                .unwrap(),
        );
    }
    let refs: Vec<_> = owners
        .iter()
        .map(|o| json!({"apiVersion": "v1", "kind": "ConfigMap", "name": o.metadata.name, "uid": o.metadata.uid}))
        .collect();
    maps.create(
        &PostParams::default(),
        &config_map("shared", json!({"metadata": {"ownerReferences": refs}})),
    )
    .await
    .unwrap();
    let delete_and_wait = |owner: ConfigMap| {
        let maps = maps.clone();
        async move {
            let name = owner.metadata.name.clone().unwrap();
            maps.delete(&name, &DeleteParams::background()).await.unwrap();
            let uid = owner.metadata.uid.clone().unwrap();
            let gone = kube::runtime::wait::await_condition(
                maps.clone(),
                &name,
                kube::runtime::conditions::is_deleted(&uid),
            );
            timeout(DEADLINE, gone).await.expect("the owner goes").unwrap();
        }
    };
    delete_and_wait(owners[0].clone()).await;
    let shared = maps
        .get_opt("shared")
        .await
        .unwrap()
        .expect("an object with another live owner is kept");
    let left: Vec<_> = shared
        .metadata
        .owner_references
        .unwrap_or_default()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(
        left,
        ["second-owner"],
        "it loses the reference to the deleted owner"
    );
    delete_and_wait(owners[1].clone()).await;
    let uid = shared.metadata.uid.clone().unwrap();
    let gone = kube::runtime::wait::await_condition(
        maps.clone(),
        "shared",
        kube::runtime::conditions::is_deleted(&uid),
    );
    timeout(DEADLINE, gone)
        .await
        .expect("deleted with its last owner")
        .unwrap();
    cluster.shutdown().await;
}

#[tokio::test]
async fn dry_runs_return_what_would_be_stored_and_change_nothing() {
    let cluster = DevCluster::start(ServerOptions::default()).await.unwrap();
    let client = client_for(&cluster).await;
    let maps: Api<ConfigMap> = Api::namespaced(client, "default");
    let created = maps
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "dry"}, "data": {"v": "1"}})).unwrap(),
        )
        .await
        .unwrap();
    let rv = created.metadata.resource_version.clone().unwrap();
    let dry = PatchParams {
        dry_run: true,
        ..Default::default()
    };
    // The write paths: merge and strategic patches, server-side apply, update (JSON patches share
    // the patch path).
    let merged = maps
        .patch("dry", &dry, &Patch::Merge(json!({"data": {"v": "2"}})))
        .await
        .unwrap();
    assert_eq!(merged.data.unwrap()["v"], "2", "the would-be object");
    assert_eq!(merged.metadata.resource_version.as_deref(), Some(rv.as_str()));
    let strategic = maps
        .patch("dry", &dry, &Patch::Strategic(json!({"data": {"w": "x"}})))
        .await
        .unwrap();
    assert_eq!(strategic.data.unwrap()["w"], "x");
    let body = json!({"apiVersion": "v1", "kind": "ConfigMap", "data": {"v": "4"}});
    let apply = PatchParams {
        dry_run: true,
        ..PatchParams::apply("tester")
    };
    let conflict = maps
        .patch("dry", &apply, &Patch::Apply(body.clone()))
        .await
        .unwrap_err();
    assert!(
        matches!(&conflict, kube::Error::Api(e) if e.code == 409),
        "a dry run checks conflicts too: {conflict}"
    );
    let applied = maps
        .patch("dry", &apply.clone().force(), &Patch::Apply(body))
        .await
        .unwrap();
    assert!(
        applied
            .metadata
            .managed_fields
            .unwrap_or_default()
            .iter()
            .any(|m| m.manager.as_deref() == Some("tester")),
        "field management ran"
    );
    let mut replacement = maps.get("dry").await.unwrap();
    replacement.data = Some([("v".to_string(), "5".to_string())].into());
    let replaced = maps
        .replace(
            "dry",
            &PostParams {
                dry_run: true,
                ..Default::default()
            },
            &replacement,
        )
        .await
        .unwrap();
    assert_eq!(replaced.data.unwrap()["v"], "5");
    // Nothing was stored, and no watch event was sent for any of them.
    let stored = maps.get("dry").await.unwrap();
    assert_eq!(stored.data.unwrap()["v"], "1");
    assert_eq!(stored.metadata.resource_version.as_deref(), Some(rv.as_str()));
    let mut events = maps
        .watch(&kube::api::WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    maps.patch(
        "dry",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"v": "real"}})),
    )
    .await
    .unwrap();
    let first = timeout(DEADLINE, events.next()).await.unwrap().unwrap().unwrap();
    match first {
        kube::api::WatchEvent::Modified(cm) => assert_eq!(cm.data.unwrap()["v"], "real"),
        other => panic!("the first event after the dry runs must be the real change: {other:?}"),
    }
    cluster.shutdown().await;
}

#[tokio::test]
async fn lists_paginate_with_limit_and_continue() {
    let cluster = DevCluster::start(ServerOptions::default()).await.unwrap();
    let client = client_for(&cluster).await;
    let maps: Api<ConfigMap> = Api::namespaced(client, "default");
    for i in 0..5 {
        maps.create(&PostParams::default(), &config_map(&format!("cm-{i}"), json!({})))
            .await
            .unwrap();
    }
    let mut names = Vec::new();
    let mut params = ListParams::default().limit(2);
    let mut pages = 0;
    loop {
        let page = maps.list(&params).await.unwrap();
        pages += 1;
        assert!(page.items.len() <= 2);
        names.extend(page.items.iter().map(|c| c.metadata.name.clone().unwrap()));
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(names, ["cm-0", "cm-1", "cm-2", "cm-3", "cm-4"]);
    cluster.shutdown().await;
}

#[tokio::test]
async fn scheduled_pods_terminate_for_their_grace_period() {
    let cluster = DevCluster::start(ServerOptions::default()).await.unwrap();
    let client = client_for(&cluster).await;
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "scheduled"},
        "spec": {"nodeName": "node-1", "terminationGracePeriodSeconds": 1, "containers": [{"name": "c", "image": "busybox"}]}
    }))
    .unwrap();
    let created = pods.create(&PostParams::default(), &pod).await.unwrap();
    pods.delete("scheduled", &DeleteParams::default()).await.unwrap();
    let terminating = pods.get("scheduled").await.unwrap();
    assert!(
        terminating.metadata.deletion_timestamp.is_some(),
        "a scheduled Pod waits for its grace period"
    );
    let uid = created.metadata.uid.unwrap();
    let gone = kube::runtime::wait::await_condition(
        pods.clone(),
        "scheduled",
        kube::runtime::conditions::is_deleted(&uid),
    );
    timeout(DEADLINE, gone)
        .await
        .expect("removed after the grace period")
        .unwrap();
    cluster.shutdown().await;
}

/// Options of a server that keeps its state in `dir`.
fn with_state(dir: &std::path::Path) -> ServerOptions {
    ServerOptions {
        state: Some(dir.join("state.json")),
        ..ServerOptions::default()
    }
}

#[tokio::test]
async fn a_state_file_keeps_objects_and_resource_versions_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let options = || with_state(dir.path());
    let cluster = DevCluster::start(options()).await.unwrap();
    let classes: Api<RuntimeClass> = Api::all(client_for(&cluster).await);
    let created = classes
        .create(
            &PostParams::default(),
            &runtime_class("gvisor", "runsc", &[("a", "b")]),
        )
        .await
        .unwrap();
    let before = created.metadata.resource_version.clone().unwrap();
    cluster.shutdown().await;

    let cluster = DevCluster::start(options()).await.unwrap();
    let classes: Api<RuntimeClass> = Api::all(client_for(&cluster).await);
    let restored = classes.get("gvisor").await.unwrap();
    assert_eq!(
        restored.metadata.resource_version.as_deref(),
        Some(before.as_str())
    );
    assert_eq!(restored.metadata.uid, created.metadata.uid);
    // A watch from before the restart gets 410 Gone; new writes continue the sequence.
    let old: u64 = before.parse().unwrap();
    let params = kube::api::WatchParams::default();
    let mut events = classes
        .watch(&params, &(old - 1).to_string())
        .await
        .unwrap()
        .boxed();
    let first = timeout(DEADLINE, events.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(&first, kube::api::WatchEvent::Error(e) if e.code == 410),
        "{first:?}"
    );
    let updated = classes
        .patch(
            "gvisor",
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"labels": {"c": "d"}}})),
        )
        .await
        .unwrap();
    assert!(updated.metadata.resource_version.unwrap().parse::<u64>().unwrap() > old);
    cluster.shutdown().await;
}

#[tokio::test]
async fn every_write_answered_before_a_shutdown_is_there_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = DevCluster::start(with_state(dir.path())).await.unwrap();
    let client = client_for(&cluster).await;
    // Writers keep creating while the server shuts down: each create answered with success must
    // be in the state the next server starts from (the rest fail, as against any API server
    // going away).
    let answered = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (first, mut created) = tokio::sync::mpsc::channel::<()>(64);
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (api, answered, first) = (
                Api::<ConfigMap>::namespaced(client.clone(), "default"),
                answered.clone(),
                first.clone(),
            );
            tokio::spawn(async move {
                for i in 0.. {
                    let name = format!("w{w}-{i}");
                    let map: ConfigMap = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
                    match api.create(&PostParams::default(), &map).await {
                        Ok(_) => {
                            answered.lock().unwrap().push(name);
                            let _ = first.try_send(());
                        }
                        Err(_) => return,
                    }
                }
            })
        })
        .collect();
    drop(first);
    for _ in 0..32 {
        created.recv().await.expect("the writers create");
    }
    cluster.shutdown().await;
    for writer in writers {
        timeout(DEADLINE, writer)
            .await
            .expect("a writer stops once the server is gone")
            .unwrap();
    }

    let cluster = DevCluster::start(with_state(dir.path())).await.unwrap();
    let maps: Api<ConfigMap> = Api::namespaced(client_for(&cluster).await, "default");
    let kept: std::collections::BTreeSet<String> = maps
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|m| m.metadata.name)
        .collect();
    let answered = answered.lock().unwrap().clone();
    let lost: Vec<&String> = answered.iter().filter(|n| !kept.contains(*n)).collect();
    assert!(
        lost.is_empty(),
        "answered but lost in the restart: {lost:?} (of {})",
        answered.len()
    );
    cluster.shutdown().await;
}

/// A server restarted from its state keeps its service account signing key (beside the state,
/// as upstream keeps its key file): a token issued before the restart still authenticates.
#[tokio::test]
async fn a_service_account_token_issued_before_a_restart_from_state_still_authenticates() {
    use k8s_openapi::api::authentication::v1::TokenRequest;
    use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
    let dir = tempfile::tempdir().unwrap();
    let options = || with_state(dir.path());
    let cluster = DevCluster::start(options()).await.unwrap();
    let accounts: Api<ServiceAccount> = Api::namespaced(client_for(&cluster).await, "default");
    accounts
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "runner"}})).unwrap(),
        )
        .await
        .unwrap();
    let issued = accounts
        .create_token_request("runner", &PostParams::default(), &TokenRequest::default())
        .await
        .unwrap();
    let token = issued.status.unwrap().token.unwrap();
    cluster.shutdown().await;

    let cluster = DevCluster::start(options()).await.unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::from_yaml(&cluster.kubeconfig("test")).unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    config.auth_info = kube::config::AuthInfo {
        token: Some(token.into()),
        ..Default::default()
    };
    let pods: Api<Pod> = Api::namespaced(Client::try_from(config).unwrap(), "default");
    match pods.list(&Default::default()).await {
        // Authenticated as the ServiceAccount, which may not list Pods.
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 403, "{e:?}");
            assert!(
                e.message.contains("system:serviceaccount:default:runner"),
                "{e:?}"
            );
        }
        other => panic!("expected a 403 for the ServiceAccount, got {other:?}"),
    }
    cluster.shutdown().await;
}

fn widget_crd(
    scope: &str,
) -> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    serde_json::from_value(json!({
        "metadata": {"name": "widgets.example.com"},
        "spec": {
            "group": "example.com",
            "scope": scope,
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wd"]},
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "properties": {"size": {"type": "integer"}}}
                }}},
                "subresources": {"status": {}},
            }],
        },
    }))
    .unwrap()
}

#[tokio::test]
async fn a_custom_resource_definition_serves_its_kind_until_it_is_deleted() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
    let dir = tempfile::tempdir().unwrap();
    let options = || ServerOptions {
        state: Some(dir.path().join("state.json")),
        ..ServerOptions::default()
    };
    let cluster = DevCluster::start(options()).await.unwrap();
    let client = client_for(&cluster).await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());

    // A CRD named other than plural.group is refused with upstream's reason.
    let mut misnamed = widget_crd("Namespaced");
    misnamed.metadata.name = Some("widgets".into());
    let err = crds.create(&PostParams::default(), &misnamed).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("must be spec.names.plural+\".\"+spec.group"),
        "{err}"
    );

    let created = crds
        .create(&PostParams::default(), &widget_crd("Namespaced"))
        .await
        .unwrap();
    let conditions = created.status.unwrap().conditions.unwrap();
    assert!(
        conditions
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
    );

    let resource =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("example.com", "v1", "Widget"), "widgets");
    let widgets: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &resource);
    let widget: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "example.com/v1", "kind": "Widget",
        "metadata": {"name": "w1"}, "spec": {"size": 3},
    }))
    .unwrap();
    widgets.create(&PostParams::default(), &widget).await.unwrap();
    // The CRD's schema decides which fields are kept: unknown ones are pruned (strict validation,
    // kubectl's default, refuses them; the monitoring test shows that through kubectl).
    let mut typo = widget.clone();
    typo.metadata.name = Some("w2".into());
    typo.data["spec"] = json!({"sise": 3});
    widgets.create(&PostParams::default(), &typo).await.unwrap();
    assert_eq!(widgets.get("w2").await.unwrap().data["spec"], json!({}));

    // The kind survives a restart (state file), then goes with its CRD, objects included.
    cluster.shutdown().await;
    let cluster = DevCluster::start(options()).await.unwrap();
    let client = client_for(&cluster).await;
    let widgets: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &resource);
    assert_eq!(widgets.get("w1").await.unwrap().data["spec"]["size"], 3);
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.delete("widgets.example.com", &DeleteParams::default())
        .await
        .unwrap();
    let gone = widgets.list(&ListParams::default()).await.unwrap_err();
    assert!(
        matches!(gone, kube::Error::Api(ref e) if e.code == 404),
        "{gone:?}"
    );
    crds.create(&PostParams::default(), &widget_crd("Namespaced"))
        .await
        .unwrap();
    assert!(
        widgets
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    cluster.shutdown().await;
}

/// With `--nodes`, Pods are scheduled and run: bound to a node, Running with an IP; a Pod that fits
/// no node is Unschedulable with the scheduler's event; a class whose handler no node runs leaves
/// the Pod ContainerCreating with the kubelet's event; a deleted Pod terminates within its grace
/// period and is removed.
#[tokio::test]
async fn simulated_nodes_schedule_run_refuse_and_terminate_pods() {
    use k8s_openapi::api::core::v1::{Event as CoreEvent, Node};
    let cluster = DevCluster::start(ServerOptions {
        nodes: devcluster::nodes::NodeOptions {
            count: 1,
            handlers: Some(vec!["runc".into(), "runsc".into()]),
        },
        ..ServerOptions::default()
    })
    .await
    .unwrap();
    let client = client_for(&cluster).await;
    let nodes: Api<Node> = Api::all(client.clone());
    let node = nodes.get("devcluster-node-0").await.unwrap();
    let ready = node.status.unwrap().conditions.unwrap();
    assert!(ready.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let classes: Api<RuntimeClass> = Api::all(client.clone());
    for (name, handler) in [("gvisor", "runsc"), ("kata", "kata")] {
        classes
            .create(&PostParams::default(), &runtime_class(name, handler, &[]))
            .await
            .unwrap();
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod = |name: &str, spec: serde_json::Value| -> Pod {
        let mut spec = spec;
        spec["containers"] = json!([{"name": "app", "image": "registry.example/app:1"}]);
        serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap()
    };
    pods.create(
        &PostParams::default(),
        &pod("runs", json!({"runtimeClassName": "gvisor"})),
    )
    .await
    .unwrap();
    pods.create(
        &PostParams::default(),
        &pod("nowhere", json!({"nodeSelector": {"disk": "ssd"}})),
    )
    .await
    .unwrap();
    pods.create(
        &PostParams::default(),
        &pod("unhandled", json!({"runtimeClassName": "kata"})),
    )
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let events: Api<CoreEvent> = Api::namespaced(client.clone(), "default");
    let event_of = |pod: &'static str, reason: &'static str| {
        let events = events.clone();
        async move {
            events
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .into_iter()
                .find(|e| {
                    e.involved_object.name.as_deref() == Some(pod) && e.reason.as_deref() == Some(reason)
                })
        }
    };
    loop {
        let running = pods.get("runs").await.unwrap();
        let status = running.status.clone().unwrap_or_default();
        let unschedulable = event_of("nowhere", "FailedScheduling").await;
        let sandbox = event_of("unhandled", "FailedCreatePodSandBox").await;
        if let (Some("Running"), Some(unschedulable), Some(sandbox)) =
            (status.phase.as_deref(), unschedulable, sandbox)
        {
            assert_eq!(
                running.spec.unwrap().node_name.as_deref(),
                Some("devcluster-node-0")
            );
            assert!(status.pod_ip.is_some() && status.start_time.is_some());
            assert_eq!(
                unschedulable.message.unwrap(),
                "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector. preemption: 0/1 nodes are available: 1 Preemption is not helpful for scheduling."
            );
            assert!(
                sandbox
                    .message
                    .unwrap()
                    .contains("no runtime for \"kata\" is configured")
            );
            let unhandled = pods.get("unhandled").await.unwrap().status.unwrap();
            assert_eq!(unhandled.phase.as_deref(), Some("Pending"));
            let waiting = &unhandled.container_statuses.unwrap()[0];
            assert_eq!(
                waiting
                    .state
                    .as_ref()
                    .unwrap()
                    .waiting
                    .as_ref()
                    .unwrap()
                    .reason
                    .as_deref(),
                Some("ContainerCreating")
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pods did not reach their states: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Deletion: Terminating for the grace period, then gone.
    pods.delete(
        "runs",
        &DeleteParams {
            grace_period_seconds: Some(1),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(
        pods.get("runs")
            .await
            .unwrap()
            .metadata
            .deletion_timestamp
            .is_some()
    );
    loop {
        if pods.get_opt("runs").await.unwrap().is_none() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the Pod was not removed after its grace period"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Without `pod_resize` (`--no-pod-resize`) the API is that of servers before Kubernetes 1.33:
/// discovery lists no `pods/resize` and a resize is a 404 for the route, not for the Pod.
#[tokio::test]
async fn without_pod_resize_a_resize_is_not_found_as_on_older_api_servers() {
    for pod_resize in [true, false] {
        let cluster = DevCluster::start(ServerOptions {
            pod_resize,
            ..ServerOptions::default()
        })
        .await
        .unwrap();
        let client = client_for(&cluster).await;
        let core = client.list_core_api_resources("v1").await.unwrap();
        let listed = core.resources.iter().any(|r| r.name == "pods/resize");
        assert_eq!(listed, pod_resize, "discovery lists pods/resize: {listed}");
        let pods: Api<Pod> = Api::namespaced(client, "default");
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "web"}, "spec": {"containers": [
            {"name": "app", "image": "registry.example/app:1",
             "resources": {"requests": {"cpu": "100m"}}}]}}))
        .unwrap();
        pods.create(&PostParams::default(), &pod).await.unwrap();
        let patch =
            json!({"spec": {"containers": [{"name": "app", "resources": {"requests": {"cpu": "200m"}}}]}});
        let resized = pods
            .patch_subresource(
                "resize",
                "web",
                &PatchParams::default(),
                &Patch::Strategic(&patch),
            )
            .await;
        match (pod_resize, resized) {
            (true, Ok(pod)) => {
                let requests = pod.spec.unwrap().containers[0]
                    .resources
                    .clone()
                    .unwrap()
                    .requests
                    .unwrap();
                assert_eq!(requests["cpu"].0, "200m");
            }
            (false, Err(kube::Error::Api(e))) => {
                assert_eq!(e.code, 404);
                assert!(
                    e.message
                        .contains("the server could not find the requested resource"),
                    "{}",
                    e.message
                );
            }
            (_, other) => panic!("pod_resize {pod_resize}: {other:?}"),
        }
        cluster.shutdown().await;
    }
}
