//! The Pod path, end to end: the host agent decides the whole Pod it writes. References resolve
//! to translated copies of the tenant's own objects, Pod Security is enforced on the host, and a
//! host name held by another Pod is never taken over. One test per rule, against the real agents.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Event as CoreEvent, Namespace, Pod, ResourceQuota, Secret};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt as _};
use rcsync_core::pod_refs;
use rcsync_tests::proxy::Mode;
use rcsync_tests::system::{System, TenantSpec, VirtualSide, runtime_class};
use rcsync_tests::{eventually, http_get, retry_delays};
use serde_json::{Value, json};

const TENANT: &str = "team-a";

async fn system(tenant: TenantSpec) -> System {
    System::start(&[tenant], &[]).await
}

fn tenant() -> TenantSpec {
    TenantSpec::new(TENANT, "{enabled: true}")
}

fn pod(name: &str, spec: Value) -> Pod {
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap()
}

fn app(extra: Value) -> Value {
    let mut container = json!({"name": "app", "image": "registry.example/app:1.0"});
    if let (Value::Object(c), Value::Object(e)) = (&mut container, extra) {
        c.extend(e);
    }
    container
}

fn host_name(name: &str, namespace: &str) -> String {
    format!("{name}-x-{namespace}-x-{TENANT}")
}

async fn host_config_maps(system: &System) -> Api<ConfigMap> {
    Api::namespaced(
        system.host.client().await,
        &system.virtual_side().tenant.host_namespace(),
    )
}

async fn host_secrets(system: &System) -> Api<Secret> {
    Api::namespaced(
        system.host.client().await,
        &system.virtual_side().tenant.host_namespace(),
    )
}

/// The host Pod of a virtual Pod once it is placed: it exists, and the scheduling gate rcsync
/// holds while it writes the Pod's copies is lifted (so every copy is on the host).
async fn wait_host_pod(system: &System, name: &str, namespace: &str) -> Pod {
    let pods = system.host_pods(&system.virtual_side().tenant).await;
    let host = host_name(name, namespace);
    eventually(&format!("host pod {host}, its copies written"), || async {
        let pod = pods.get_opt(&host).await.ok().flatten()?;
        let gated = pod
            .spec
            .as_ref()
            .and_then(|s| s.scheduling_gates.as_ref())
            .is_some_and(|gates| {
                gates
                    .iter()
                    .any(|g| g.name == host_agent::grpc::pods::COPIES_GATE)
            });
        (!gated).then_some(pod)
    })
    .await
}

async fn no_host_pod(system: &System, name: &str) {
    let pods = system.host_pods(&system.virtual_side().tenant).await;
    assert!(
        pods.get_opt(&host_name(name, "default")).await.unwrap().is_none(),
        "pod {name} must not reach the host"
    );
}

fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn secret_data(pairs: &[(&str, &str)]) -> BTreeMap<String, ByteString> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
        .collect()
}

async fn create_config_map(v: &VirtualSide, name: &str, pairs: &[(&str, &str)]) {
    let cm = ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some(data(pairs)),
        ..Default::default()
    };
    Api::<ConfigMap>::namespaced(v.cluster.client().await, "default")
        .create(&PostParams::default(), &cm)
        .await
        .unwrap();
}

fn secret(name: &str, pairs: &[(&str, &str)]) -> Secret {
    Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some(secret_data(pairs)),
        ..Default::default()
    }
}

async fn events_in(v: &VirtualSide, namespace: &str, pod: &str) -> Vec<CoreEvent> {
    let events: Api<CoreEvent> = Api::namespaced(v.cluster.client().await, namespace);
    let selector = format!("involvedObject.name={pod},involvedObject.kind=Pod");
    events
        .list(&ListParams::default().fields(&selector))
        .await
        .unwrap()
        .items
}

/// Waits for the first event with `reason` on Pod `default/pod` and returns its message.
async fn first_event(v: &VirtualSide, pod: &str, reason: &str) -> String {
    let event = eventually(&format!("a {reason} event on pod {pod}"), || async {
        events_in(v, "default", pod)
            .await
            .into_iter()
            .find(|e| e.reason.as_deref() == Some(reason))
    })
    .await;
    event.message.unwrap_or_default()
}

/// Creates the Pod and waits for the `SyncError` event with exactly `message`; no host Pod.
async fn refused(system: &System, name: &str, spec: Value, message: &str) {
    let v = system.virtual_side();
    v.create_pod(&pod(name, spec)).await;
    let want = format!("did not sync pod \"{name}\" to host: {message}");
    let event = v.wait_event(name, &want).await;
    assert_eq!(event.reason.as_deref(), Some("SyncError"));
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    no_host_pod(system, name).await;
}

#[tokio::test]
async fn a_pod_runs_against_translated_copies_of_the_config_maps_and_secrets_it_references() {
    let system = system(tenant()).await;
    let v = system.virtual_side();
    create_config_map(v, "app-config", &[("greeting", "hello")]).await;
    create_config_map(v, "unused", &[("x", "y")]).await;
    let virtual_secrets: Api<Secret> = Api::namespaced(v.cluster.client().await, "default");
    virtual_secrets
        .create(
            &PostParams::default(),
            &secret("app-secret", &[("password", "virtual")]),
        )
        .await
        .unwrap();
    // The host namespace holds a Secret of the same name: it must never be read or changed.
    let host_own = host_secrets(&system)
        .await
        .create(
            &PostParams::default(),
            &secret("app-secret", &[("password", "host-only")]),
        )
        .await
        .unwrap();
    let every_form = json!({
        "containers": [app(json!({
            "env": [
                {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "app-config", "key": "greeting"}}},
                {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "app-secret", "key": "password"}}}
            ],
            "envFrom": [{"configMapRef": {"name": "app-config"}}, {"secretRef": {"name": "app-secret"}}],
            "volumeMounts": [{"name": "cfg", "mountPath": "/cfg"}, {"name": "sec", "mountPath": "/sec"}, {"name": "all", "mountPath": "/all"}]
        }))],
        "volumes": [
            {"name": "cfg", "configMap": {"name": "app-config"}},
            {"name": "sec", "secret": {"secretName": "app-secret"}},
            {"name": "all", "projected": {"sources": [{"configMap": {"name": "app-config"}}, {"secret": {"name": "app-secret"}}]}}
        ],
        "imagePullSecrets": [{"name": "app-secret"}]
    });
    v.create_pod(&pod("web", every_form)).await;
    let host_pod = wait_host_pod(&system, "web", "default").await;
    let references = pod_refs::references(host_pod.spec.as_ref().unwrap());
    let names: Vec<&str> = references.keys().map(|(_, n)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            host_name("app-config", "default"),
            host_name("app-secret", "default")
        ],
        "every reference form points at a translated copy"
    );
    let config_maps = host_config_maps(&system).await;
    let secrets = host_secrets(&system).await;
    let copy = config_maps
        .get(&host_name("app-config", "default"))
        .await
        .unwrap();
    assert_eq!(copy.data, Some(data(&[("greeting", "hello")])));
    let copy = secrets.get(&host_name("app-secret", "default")).await.unwrap();
    assert_eq!(copy.data, Some(secret_data(&[("password", "virtual")])));
    assert!(
        config_maps
            .get_opt(&host_name("unused", "default"))
            .await
            .unwrap()
            .is_none(),
        "objects no Pod references are not copied"
    );

    // An update reaches the copy.
    Api::<ConfigMap>::namespaced(v.cluster.client().await, "default")
        .patch(
            "app-config",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"greeting": "bonjour"}})),
        )
        .await
        .unwrap();
    eventually("the copy to hold the update", || async {
        let copy = config_maps.get(&host_name("app-config", "default")).await.ok()?;
        (copy.data == Some(data(&[("greeting", "bonjour")]))).then_some(())
    })
    .await;

    // A copy lives as long as the last Pod that uses it.
    let only_config =
        json!({"containers": [app(json!({"envFrom": [{"configMapRef": {"name": "app-config"}}]}))]});
    v.create_pod(&pod("web-2", only_config)).await;
    wait_host_pod(&system, "web-2", "default").await;
    v.pods()
        .await
        .delete("web", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the secret's copy to go with its last pod", || async {
        secrets
            .get_opt(&host_name("app-secret", "default"))
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    assert!(
        config_maps
            .get_opt(&host_name("app-config", "default"))
            .await
            .unwrap()
            .is_some(),
        "the config map's copy stays while web-2 uses it"
    );
    v.pods()
        .await
        .delete("web-2", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the config map's copy to go with the last pod", || async {
        config_maps
            .get_opt(&host_name("app-config", "default"))
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    let untouched = secrets.get("app-secret").await.unwrap();
    assert_eq!(untouched.data, Some(secret_data(&[("password", "host-only")])));
    assert_eq!(untouched.resource_version(), host_own.resource_version());
}

#[tokio::test]
async fn a_pod_naming_a_secret_that_exists_only_on_the_host_never_references_it() {
    let system = system(tenant()).await;
    let v = system.virtual_side();
    host_secrets(&system)
        .await
        .create(&PostParams::default(), &secret("host-only", &[("key", "host")]))
        .await
        .unwrap();
    let needs = json!({"containers": [app(json!({"envFrom": [{"secretRef": {"name": "host-only"}}]}))]});
    v.create_pod(&pod("needs-it", needs)).await;
    let waiting = v
        .wait_event(
            "needs-it",
            "did not sync pod \"needs-it\" to host yet: it references secret \"host-only\" which does not exist in namespace \"default\"; it syncs once it is created",
        )
        .await;
    assert_eq!(waiting.type_.as_deref(), Some("Warning"));
    no_host_pod(&system, "needs-it").await;

    // Optional: the Pod syncs, and its reference still names only a translated copy.
    let optional = json!({"containers": [app(json!({"envFrom": [{"secretRef": {"name": "host-only", "optional": true}}]}))]});
    v.create_pod(&pod("optional", optional)).await;
    let host_pod = wait_host_pod(&system, "optional", "default").await;
    let references = pod_refs::references(host_pod.spec.as_ref().unwrap());
    let names: Vec<&str> = references.keys().map(|(_, n)| n.as_str()).collect();
    assert_eq!(names, [host_name("host-only", "default")]);

    // The waiting Pod syncs once the tenant creates the Secret, against its own copy.
    Api::<Secret>::namespaced(v.cluster.client().await, "default")
        .create(&PostParams::default(), &secret("host-only", &[("key", "tenant")]))
        .await
        .unwrap();
    wait_host_pod(&system, "needs-it", "default").await;
    let copy = host_secrets(&system)
        .await
        .get(&host_name("host-only", "default"))
        .await
        .unwrap();
    assert_eq!(copy.data, Some(secret_data(&[("key", "tenant")])));
}

#[tokio::test]
async fn a_privileged_pod_is_refused_by_baseline() {
    let system = system(tenant()).await;
    refused(
        &system,
        "root",
        json!({"containers": [app(json!({"securityContext": {"privileged": true}}))]}),
        r#"violates PodSecurity "baseline:latest": privileged (container "app" must not set securityContext.privileged=true)"#,
    )
    .await;
}

#[tokio::test]
async fn a_host_path_volume_is_refused_by_baseline() {
    let system = system(tenant()).await;
    refused(
        &system,
        "reads-node",
        json!({"containers": [app(json!({}))], "volumes": [{"name": "h", "hostPath": {"path": "/etc"}}]}),
        r#"violates PodSecurity "baseline:latest": hostPath volumes (volume "h")"#,
    )
    .await;
}

#[tokio::test]
async fn host_network_is_refused_by_baseline() {
    let system = system(tenant()).await;
    refused(
        &system,
        "on-host-net",
        json!({"hostNetwork": true, "containers": [app(json!({}))]}),
        r#"violates PodSecurity "baseline:latest": host namespaces (hostNetwork=true)"#,
    )
    .await;
}

#[tokio::test]
async fn host_pid_is_refused_by_baseline() {
    let system = system(tenant()).await;
    refused(
        &system,
        "sees-host-pids",
        json!({"hostPID": true, "containers": [app(json!({}))]}),
        r#"violates PodSecurity "baseline:latest": host namespaces (hostPID=true)"#,
    )
    .await;
}

#[tokio::test]
async fn added_capabilities_are_refused_by_baseline() {
    let system = system(tenant()).await;
    refused(
        &system,
        "net-admin",
        json!({"containers": [app(json!({"securityContext": {"capabilities": {"add": ["NET_ADMIN"]}}}))]}),
        r#"violates PodSecurity "baseline:latest": non-default capabilities (container "app" must not include "NET_ADMIN" in securityContext.capabilities.add)"#,
    )
    .await;
}

#[tokio::test]
async fn run_as_non_root_is_required_by_restricted() {
    let system = system(tenant().pod_security("restricted")).await;
    let hardened_but_root = json!({
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [app(json!({"securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}}))]
    });
    refused(
        &system,
        "maybe-root",
        hardened_but_root,
        r#"violates PodSecurity "restricted:latest": runAsNonRoot != true (pod or container "app" must set securityContext.runAsNonRoot=true)"#,
    )
    .await;
    let hardened = json!({
        "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [app(json!({"securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}}))]
    });
    system.virtual_side().create_pod(&pod("non-root", hardened)).await;
    wait_host_pod(&system, "non-root", "default").await;
}

#[tokio::test]
async fn a_persistent_volume_claim_is_refused_where_the_host_does_not_make_the_tenants_claims() {
    let system = system(tenant()).await;
    refused(
        &system,
        "stateful",
        json!({"containers": [app(json!({}))], "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]}),
        r#"the host cannot honour volume "data": persistentVolumeClaim volumes are not synced to the host (sync.toHost.persistentVolumeClaims.enabled is not true in the host agent's tenants file)"#,
    )
    .await;
}

/// An ephemeral volume's claim is made by the host from the Pod's template, so the host
/// provisions its storage: a template naming a host PersistentVolume (`volumeName`) would bind
/// storage the tenant does not own, and the Pod is refused naming the field; a template's labels
/// and annotations (which host selectors could match, or which set what host controllers set)
/// stay in the virtual cluster.
#[tokio::test]
async fn an_ephemeral_volume_is_provisioned_by_the_host_never_bound_to_a_host_volume_the_tenant_names() {
    let system = system(tenant()).await;
    let with_scratch = |template: Value| {
        json!({"containers": [app(json!({"volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}))],
               "volumes": [{"name": "scratch", "ephemeral": {"volumeClaimTemplate": template}}]})
    };
    let claim = json!({"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}});
    let mut bound = claim.clone();
    bound["volumeName"] = json!("pv-of-team-b");
    refused(
        &system,
        "bound",
        with_scratch(json!({"spec": bound})),
        r#"the host cannot honour volume "scratch": its claim template's volumeName names host PersistentVolume "pv-of-team-b", which the tenant does not own: the host provisions an ephemeral volume"#,
    )
    .await;

    let v = system.virtual_side();
    v.create_pod(&pod(
        "scratch",
        with_scratch(json!({
            "metadata": {"labels": {"backup": "nightly"},
                         "annotations": {"volume.kubernetes.io/selected-node": "node-of-team-b"}},
            "spec": claim,
        })),
    ))
    .await;
    let on_host = wait_host_pod(&system, "scratch", "default").await;
    let volumes = on_host.spec.unwrap().volumes.unwrap();
    let template = volumes[0]
        .ephemeral
        .as_ref()
        .and_then(|e| e.volume_claim_template.as_ref())
        .expect("the ephemeral volume reaches the host");
    assert_eq!(template.metadata, None, "the template's metadata stays virtual");
    assert_eq!(
        serde_json::to_value(&template.spec).unwrap(),
        claim,
        "the claim asks for what the tenant asked"
    );
}

/// A volume that names its storage directly (an NFS export by its address, a cloud disk by its
/// id, an iSCSI target, ...) reaches it with the host node's access, not through a claim of the
/// tenant's: it is refused, naming the volume, unless the host's operator lists its type in the
/// tenant's `policies.inlineVolumes`.
#[tokio::test]
async fn a_volume_naming_host_storage_directly_is_refused_unless_the_tenants_policy_lists_its_type() {
    let system = system(tenant()).await;
    refused(
        &system,
        "datasets",
        json!({"containers": [app(json!({"volumeMounts": [{"name": "data", "mountPath": "/data"}]}))],
               "volumes": [{"name": "data", "nfs": {"server": "nfs.example", "path": "/exports/team-b"}}]}),
        r#"the host cannot honour volume "data": nfs volumes name their storage directly and reach it with the host node's access, not through a claim of the tenant's (policies.inlineVolumes in the host agent's tenants file does not list nfs)"#,
    )
    .await;
    system.rewrite_tenants(&[tenant().policy("inlineVolumes: [nfs]")]);
    let on_host = wait_host_pod(&system, "datasets", "default").await;
    let volumes = on_host.spec.unwrap().volumes.unwrap();
    assert_eq!(
        volumes[0].nfs.as_ref().map(|n| n.path.as_str()),
        Some("/exports/team-b")
    );
}

/// An inline CSI volume reaches what its driver resolves from its attributes (an NFS export by its
/// address, a certificate from a host issuer): it is refused, naming the driver, unless the host's
/// operator lists the driver in the tenant's `policies.inlineCsiDrivers`.
#[tokio::test]
async fn an_inline_csi_volume_is_refused_unless_the_tenants_policy_lists_its_driver() {
    let system = system(tenant()).await;
    let certs = json!({"containers": [app(json!({"volumeMounts": [{"name": "tls", "mountPath": "/tls"}]}))],
                       "volumes": [{"name": "tls", "csi": {"driver": "csi.cert-manager.io", "readOnly": true,
                           "volumeAttributes": {"csi.cert-manager.io/issuer-name": "host-ca",
                                                "csi.cert-manager.io/issuer-kind": "ClusterIssuer"}}}]});
    refused(
        &system,
        "web",
        certs,
        r#"the host cannot honour volume "tls": csi volumes of driver "csi.cert-manager.io" reach what the driver resolves from their attributes (storage by its address, a host issuer), not what the tenant owns (policies.inlineCsiDrivers in the host agent's tenants file does not list it)"#,
    )
    .await;
    system.rewrite_tenants(&[tenant().policy("inlineCsiDrivers: [csi.cert-manager.io]")]);
    let on_host = wait_host_pod(&system, "web", "default").await;
    let volumes = on_host.spec.unwrap().volumes.unwrap();
    assert_eq!(
        volumes[0].csi.as_ref().map(|c| c.driver.as_str()),
        Some("csi.cert-manager.io")
    );
}

#[tokio::test]
async fn a_refused_pod_syncs_once_the_tenant_policy_allows_it() {
    let system = system(tenant()).await;
    refused(
        &system,
        "root",
        json!({"containers": [app(json!({"securityContext": {"privileged": true}}))]}),
        r#"violates PodSecurity "baseline:latest": privileged (container "app" must not set securityContext.privileged=true)"#,
    )
    .await;
    system.rewrite_tenants(&[tenant().pod_security("privileged")]);
    wait_host_pod(&system, "root", "default").await;
}

#[tokio::test]
async fn a_host_name_held_by_another_pod_is_never_taken_over() {
    let system = system(tenant()).await;
    let v = system.virtual_side();
    let namespaces: Api<Namespace> = Api::all(v.cluster.client().await);
    for ns in ["c", "b-x-c"] {
        namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
            )
            .await
            .unwrap();
    }
    let spec = json!({"containers": [app(json!({}))]});
    let first: Api<Pod> = Api::namespaced(v.cluster.client().await, "c");
    first
        .create(&PostParams::default(), &pod("a-x-b", spec.clone()))
        .await
        .unwrap();
    let held = wait_host_pod(&system, "a-x-b", "c").await;
    // `b-x-c/a` translates to the same host name `a-x-b-x-c-x-team-a`.
    let second: Api<Pod> = Api::namespaced(v.cluster.client().await, "b-x-c");
    second
        .create(&PostParams::default(), &pod("a", spec))
        .await
        .unwrap();
    let want =
        "did not sync pod \"a\" to host: host name \"a-x-b-x-c-x-team-a\" is already used by pod c/a-x-b";
    eventually("the SyncError event on b-x-c/a", || async {
        events_in(v, "b-x-c", "a")
            .await
            .into_iter()
            .find(|e| e.message.as_deref() == Some(want) && e.reason.as_deref() == Some("SyncError"))
    })
    .await;
    let pods = system.host_pods(&v.tenant).await;
    let still = pods.get(&held.name_any()).await.unwrap();
    assert_eq!(
        still.metadata.uid, held.metadata.uid,
        "the first Pod's host Pod was not replaced"
    );
    assert!(
        first.get_opt("a-x-b").await.unwrap().is_some(),
        "the first virtual Pod keeps running"
    );
    // Once the name is free, the second Pod gets it.
    first.delete("a-x-b", &DeleteParams::default()).await.unwrap();
    eventually("b-x-c/a to take the freed host name", || async {
        let pod = pods.get_opt("a-x-b-x-c-x-team-a").await.ok()??;
        let annotations = pod.annotations();
        (annotations
            .get("vcluster.loft.sh/object-namespace")
            .map(String::as_str)
            == Some("b-x-c"))
        .then_some(())
    })
    .await;
}

#[tokio::test]
async fn pods_over_the_tenant_rate_limit_wait_and_all_reach_the_host() {
    let system = system(tenant().limits("{podSyncQps: 5, podSyncBurst: 2}")).await;
    let v = system.virtual_side();
    for i in 0..12 {
        v.create_pod(&pod(&format!("p{i}"), json!({"containers": [app(json!({}))]})))
            .await;
    }
    for i in 0..12 {
        wait_host_pod(&system, &format!("p{i}"), "default").await;
    }
    let metrics = v.metrics().await;
    let limited = metrics
        .lines()
        .find(|l| l.starts_with("rcsync_pod_sync_rate_limited_total "))
        .and_then(|l| l.split_whitespace().last()?.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(limited > 0, "the limit was hit and waited out:\n{metrics}");
}

#[tokio::test]
async fn a_running_pod_keeps_its_copy_when_the_virtual_object_is_deleted() {
    let system = system(tenant()).await;
    let v = system.virtual_side();
    create_config_map(v, "settings", &[("mode", "a")]).await;
    let uses = json!({"containers": [app(json!({"envFrom": [{"configMapRef": {"name": "settings"}}]}))]});
    v.create_pod(&pod("runs", uses)).await;
    wait_host_pod(&system, "runs", "default").await;
    Api::<ConfigMap>::namespaced(v.cluster.client().await, "default")
        .delete("settings", &DeleteParams::default())
        .await
        .unwrap();
    // The Pod still receives updates: a new label reaches its host Pod.
    v.pods()
        .await
        .patch(
            "runs",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"after": "delete"}}})),
        )
        .await
        .unwrap();
    let host_pods = system.host_pods(&v.tenant).await;
    eventually("the update on the host Pod", || async {
        let pod = host_pods.get(&host_name("runs", "default")).await.ok()?;
        pod.annotations()
            .get("vcluster.loft.sh/labels")?
            .contains("\"after\":\"delete\"")
            .then_some(())
    })
    .await;
    let copy = host_config_maps(&system)
        .await
        .get_opt(&host_name("settings", "default"))
        .await
        .unwrap();
    assert!(copy.is_some(), "the copy stays while the Pod using it runs");
    assert!(
        !v.events_of("runs")
            .await
            .iter()
            .any(|e| e.message.as_deref().is_some_and(|m| m.contains("yet"))),
        "a running Pod is never told it waits"
    );
}

#[tokio::test]
async fn a_copy_deleted_on_the_host_under_its_running_pod_is_written_again() {
    let system = system(tenant()).await;
    let v = system.virtual_side();
    create_config_map(v, "settings", &[("mode", "a")]).await;
    Api::<Secret>::namespaced(v.cluster.client().await, "default")
        .create(&PostParams::default(), &secret("creds", &[("token", "t0")]))
        .await
        .unwrap();
    let uses = json!({
        "containers": [app(json!({"envFrom": [{"configMapRef": {"name": "settings"}}]}))],
        "volumes": [{"name": "creds", "secret": {"secretName": "creds"}}],
    });
    v.create_pod(&pod("runs", uses)).await;
    let host_pod = wait_host_pod(&system, "runs", "default").await;
    let (config_maps, secrets) = (host_config_maps(&system).await, host_secrets(&system).await);
    let (settings, creds) = (host_name("settings", "default"), host_name("creds", "default"));
    // Someone on the host (a cleanup job, an operator) deletes both copies under the running Pod.
    config_maps
        .delete(&settings, &DeleteParams::default())
        .await
        .unwrap();
    secrets.delete(&creds, &DeleteParams::default()).await.unwrap();
    let owned_by_the_pod = |meta: &kube::api::ObjectMeta| {
        meta.owner_references
            .iter()
            .flatten()
            .any(|o| o.kind == "Pod" && Some(&o.uid) == host_pod.metadata.uid.as_ref())
    };
    let copy = eventually("the ConfigMap copy written again", || async {
        config_maps.get_opt(&settings).await.ok().flatten()
    })
    .await;
    assert_eq!(copy.data, Some(data(&[("mode", "a")])));
    assert!(owned_by_the_pod(&copy.metadata), "{copy:?}");
    let copy = eventually("the Secret copy written again", || async {
        secrets.get_opt(&creds).await.ok().flatten()
    })
    .await;
    assert_eq!(copy.data, Some(secret_data(&[("token", "t0")])));
    assert!(owned_by_the_pod(&copy.metadata), "{copy:?}");
}

#[tokio::test]
async fn a_copy_deleted_on_the_host_while_the_host_agent_was_down_is_written_again_once_it_is_back() {
    let mut system = system(tenant()).await;
    let v = system.virtual_side();
    create_config_map(v, "settings", &[("mode", "a")]).await;
    let uses = json!({"containers": [app(json!({"envFrom": [{"configMapRef": {"name": "settings"}}]}))]});
    v.create_pod(&pod("runs", uses)).await;
    let host_pod = wait_host_pod(&system, "runs", "default").await;
    let config_maps = host_config_maps(&system).await;
    let settings = host_name("settings", "default");
    eventually("the ConfigMap copy on the host", || async {
        config_maps.get_opt(&settings).await.ok().flatten()
    })
    .await;
    // No status stream is open while it goes: no watch reports it deleted.
    system.host_agent.signal("KILL");
    system.host_agent.wait_exit().await;
    config_maps
        .delete(&settings, &DeleteParams::default())
        .await
        .unwrap();
    system.restart_host_agent().await;
    let copy = eventually("the ConfigMap copy written again", || async {
        config_maps.get_opt(&settings).await.ok().flatten()
    })
    .await;
    assert_eq!(copy.data, Some(data(&[("mode", "a")])));
    assert!(
        copy.metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.kind == "Pod" && Some(&o.uid) == host_pod.metadata.uid.as_ref()),
        "owned by the running host Pod: {copy:?}"
    );
}

/// The tenant's system with one simulated node on the host (devcluster `--nodes 1`), so host
/// Pods are scheduled and run, and the class `gvisor` synced to the virtual cluster.
async fn system_with_a_host_node() -> System {
    use rcsync_tests::system::{Transport, runtime_class};
    let system = System::start_with_nodes(
        &[tenant()],
        &[runtime_class("gvisor", "runsc", &[])],
        Transport::Plaintext,
        1,
    )
    .await;
    system.virtual_side().wait_classes(&["gvisor"]).await;
    system
}

/// A system whose host has `nodes` nodes.
async fn system_with_host_nodes(nodes: usize) -> System {
    use rcsync_tests::system::{Transport, runtime_class};
    let system = System::start_with_nodes(
        &[tenant()],
        &[runtime_class("gvisor", "runsc", &[])],
        Transport::Plaintext,
        nodes,
    )
    .await;
    system.virtual_side().wait_classes(&["gvisor"]).await;
    system
}

/// The host node a synced Pod runs on.
async fn host_node_of(system: &System, name: &str) -> String {
    let host = system.host_pods(&system.virtual_side().tenant).await;
    let host_name = host_name(name, "default");
    eventually(&format!("{name} bound to a host node"), || {
        let (host, host_name) = (host.clone(), host_name.clone());
        async move { host.get(&host_name).await.ok()?.spec?.node_name }
    })
    .await
}

/// An affinity term selecting namespaces by their labels cannot be resolved on the host (it does
/// not see the virtual namespaces' labels): the Pod is refused with a `SyncError` naming the field.
#[tokio::test]
async fn a_pod_affinity_selecting_namespaces_by_their_labels_is_refused_naming_the_field() {
    let system = system(tenant()).await;
    let v = system.virtual_side();
    v.create_pod(&pod(
        "picky",
        json!({"containers": [app(json!({}))],
               "affinity": {"podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1, "podAffinityTerm":
                   {"labelSelector": {"matchLabels": {"app": "db"}}, "namespaceSelector": {"matchLabels": {"team": "data"}},
                    "topologyKey": "kubernetes.io/hostname"}}]}}}),
    ))
    .await;
    refused_with(&system, "picky", "affinity.podAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].podAffinityTerm.namespaceSelector: namespaces selected by their labels cannot be resolved on the host").await;
}

/// Nor can a tenant's anti-affinity keep anybody else's Pods away: on a host of one node, a Pod
/// of the tenant repelling `app=db` in every namespace does not stop another team's `app=db` Pod
/// from running there (the host scheduler honours a placed Pod's anti-affinity for new Pods).
#[tokio::test]
async fn a_tenants_pod_anti_affinity_never_repels_pods_outside_its_own() {
    let system = system_with_host_nodes(1).await;
    let v = system.virtual_side();
    v.create_pod(&pod(
        "hog",
        json!({"runtimeClassName": "gvisor", "containers": [app(json!({}))],
               "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                   {"labelSelector": {"matchLabels": {"app": "db"}}, "namespaceSelector": {},
                    "topologyKey": "kubernetes.io/hostname"}]}}}),
    ))
    .await;
    host_node_of(&system, "hog").await;
    let others = another_teams_db(&system, json!({"app": "db"})).await;
    eventually("the other team's db placed on the host's node", || {
        let others = others.clone();
        async move { others.get("db").await.ok()?.spec?.node_name }
    })
    .await;
}

/// Waits for the `SyncError` on virtual Pod `name` and checks it says `why`, and that no host Pod
/// was made for it.
async fn refused_with(system: &System, name: &str, why: &str) {
    let message = first_event(system.virtual_side(), name, "SyncError").await;
    assert!(message.contains(why), "{message}");
    no_host_pod(system, name).await;
}

/// Another team's Pod `db` labelled `labels`, on the host in a namespace of its own
/// (`other-team`), outside the tenant's; the Pods of that namespace.
async fn another_teams_db(system: &System, labels: Value) -> Api<Pod> {
    let host_client = system.host.client().await;
    Api::<k8s_openapi::api::core::v1::Namespace>::all(host_client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "other-team"}})).unwrap(),
        )
        .await
        .unwrap();
    let db: Pod = serde_json::from_value(json!({
        "metadata": {"name": "db", "labels": labels},
        "spec": {"containers": [app(json!({}))]}}))
    .unwrap();
    let others = Api::<Pod>::namespaced(host_client, "other-team");
    others.create(&PostParams::default(), &db).await.unwrap();
    others
}

/// A tenant given its own pool of host nodes (`sync.toHost.pods.enforceNodeSelector`) has its
/// Pods placed there only: the host Pod's node selector requires the pool, and a Pod choosing
/// another value of the pool's label is refused with a `SyncError` naming both, never moved.
#[tokio::test]
async fn a_tenants_pods_run_on_its_own_pool_of_host_nodes_only() {
    use rcsync_tests::system::{Transport, runtime_class};
    let pool = "{enforceNodeSelector: {kubernetes.io/hostname: devcluster-node-1}}";
    let system = System::start_with_nodes(
        &[tenant().host_pods(pool)],
        &[runtime_class("gvisor", "runsc", &[])],
        Transport::Plaintext,
        2,
    )
    .await;
    let v = system.virtual_side();
    v.wait_classes(&["gvisor"]).await;
    v.create_pod(&pod(
        "web",
        json!({"runtimeClassName": "gvisor", "containers": [app(json!({}))]}),
    ))
    .await;
    assert_eq!(host_node_of(&system, "web").await, "devcluster-node-1");
    v.create_pod(&pod(
        "escape",
        json!({"runtimeClassName": "gvisor", "containers": [app(json!({}))],
               "nodeSelector": {"kubernetes.io/hostname": "devcluster-node-0"}}),
    ))
    .await;
    refused_with(&system, "escape", "nodeSelector kubernetes.io/hostname=devcluster-node-0 (the host enforces kubernetes.io/hostname=devcluster-node-1)").await;
}

/// A tenant's Pods that repel each other (required pod anti-affinity on their own labels, one per
/// node) run on different host nodes: the host scheduler sees their labels and selector as the
/// virtual cluster's would.
#[tokio::test]
async fn pods_that_repel_each_other_run_on_different_host_nodes() {
    let system = system_with_host_nodes(2).await;
    let v = system.virtual_side();
    let replica = |name: &str| {
        let mut p = pod(
            name,
            json!({"runtimeClassName": "gvisor", "containers": [app(json!({}))],
                   "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                       {"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "kubernetes.io/hostname"}]}}}),
        );
        p.metadata.labels = Some([("app".to_string(), "web".to_string())].into());
        p
    };
    v.create_pod(&replica("web-0")).await;
    let first = host_node_of(&system, "web-0").await;
    v.create_pod(&replica("web-1")).await;
    let second = host_node_of(&system, "web-1").await;
    assert_ne!(first, second, "both replicas on {first}");
}

/// A tenant's affinity selects only its own Pods on the host: a term reaching for Pods of every
/// namespace (`namespaceSelector: {}`) with a host label (`vcluster.loft.sh/managed-by`) or the
/// labels of another team's Pod finds none there, so the Pod is not placed next to them (nor
/// learns where they run): it stays unschedulable with the host scheduler's reason.
#[tokio::test]
async fn a_tenants_pod_affinity_never_selects_pods_outside_its_own() {
    let system = system_with_host_nodes(2).await;
    let v = system.virtual_side();
    another_teams_db(
        &system,
        json!({"app": "db", "vcluster.loft.sh/managed-by": "other"}),
    )
    .await;
    let near = |labels: Value| {
        json!({"runtimeClassName": "gvisor", "containers": [app(json!({}))],
               "affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                   {"labelSelector": {"matchLabels": labels}, "namespaceSelector": {},
                    "topologyKey": "kubernetes.io/hostname"}]}}})
    };
    v.create_pod(&pod("spy", near(json!({"app": "db"})))).await;
    v.create_pod(&pod(
        "spy-2",
        near(json!({"vcluster.loft.sh/managed-by": "other"})),
    ))
    .await;
    let host = system.host_pods(&v.tenant).await;
    for name in ["spy", "spy-2"] {
        let host_name = host_name(name, "default");
        let condition = eventually(&format!("{name} unschedulable on the host"), || {
            let (host, host_name) = (host.clone(), host_name.clone());
            async move {
                let p = host.get(&host_name).await.ok()?;
                p.status?
                    .conditions?
                    .into_iter()
                    .find(|c| c.type_ == "PodScheduled" && c.status == "False")
            }
        })
        .await;
        let message = condition.message.unwrap_or_default();
        assert!(
            message.contains("2 node(s) didn't match pod affinity rules"),
            "{message}"
        );
        let spec = host.get(&host_name).await.unwrap().spec.unwrap();
        assert_eq!(spec.node_name, None);
    }
}

/// With a node on the host (devcluster `--nodes 1`), a synced Pod runs there and the virtual Pod
/// shows it Running through the status copied back; deleting it takes its grace period on the
/// host, then it is gone from both clusters.
#[tokio::test]
async fn a_synced_pod_runs_on_a_host_node_and_its_deletion_takes_its_grace_period() {
    let system = system_with_a_host_node().await;
    let v = system.virtual_side();
    // The host Pod keeps the Pod's grace period (the virtual cluster, without nodes, deletes the
    // virtual Pod at once).
    let spec = json!({"runtimeClassName": "gvisor", "terminationGracePeriodSeconds": 2, "containers": [app(json!({}))]});
    v.create_pod(&pod("web", spec)).await;
    let host = system.host_pods(&v.tenant).await;
    let pods = v.pods().await;
    eventually("the Pod Running on the host and in the virtual cluster", || {
        let (host, pods) = (host.clone(), pods.clone());
        async move {
            let host_pod = host.get_opt("web-x-default-x-team-a").await.ok()??;
            let virtual_pod = pods.get("web").await.ok()?;
            let phase = |p: &Pod| p.status.as_ref().and_then(|s| s.phase.clone());
            (phase(&host_pod).as_deref() == Some("Running")
                && phase(&virtual_pod).as_deref() == Some("Running"))
            .then_some(())
        }
    })
    .await;
    pods.delete("web", &DeleteParams::default()).await.unwrap();
    eventually("the host Pod to terminate", || {
        let host = host.clone();
        async move {
            let host_pod = host.get_opt("web-x-default-x-team-a").await.ok()??;
            host_pod.metadata.deletion_timestamp.is_some().then_some(())
        }
    })
    .await;
    eventually("the Pod gone from both clusters", || {
        let (host, pods) = (host.clone(), pods.clone());
        async move {
            let gone_host = host.get_opt("web-x-default-x-team-a").await.ok()?.is_none();
            let gone_virtual = pods.get_opt("web").await.ok()?.is_none();
            (gone_host && gone_virtual).then_some(())
        }
    })
    .await;
}

/// A host Pod evicted (a drain of its host node) takes its virtual Pod with it as it starts to
/// terminate, as vCluster does, and the virtual Pod's events say why: the tenant's controller
/// makes its replacement at once, not after the host Pod's grace period, and the replacement runs
/// on the host while the evicted Pod stops. Left in place, the virtual Pod would show its last
/// status forever.
#[tokio::test]
async fn a_pod_whose_host_pod_is_evicted_is_deleted_in_the_virtual_cluster_and_says_why() {
    let system = system_with_a_host_node().await;
    let v = system.virtual_side();
    let spec = json!({"runtimeClassName": "gvisor", "terminationGracePeriodSeconds": 600, "containers": [app(json!({}))]});
    v.create_pod(&pod("web-1", spec.clone())).await;
    let host = system.host_pods(&v.tenant).await;
    let pods = v.pods().await;
    let running = |name: &'static str| {
        let host = host.clone();
        async move {
            let host_pod = host.get_opt(&host_name(name, "default")).await.ok()??;
            let phase = host_pod.status.as_ref()?.phase.clone();
            (phase.as_deref() == Some("Running")).then_some(host_pod)
        }
    };
    eventually("the Pod Running on the host", || running("web-1")).await;

    host.evict(&host_name("web-1", "default"), &Default::default())
        .await
        .unwrap();
    eventually("the virtual Pod gone", || async {
        pods.get_opt("web-1").await.ok()?.is_none().then_some(())
    })
    .await;
    v.wait_event(
        "web-1",
        "the host pod of \"web-1\" is being deleted (evicted, preempted or deleted on the host); deleting the virtual pod",
    )
    .await;

    // What a ReplicaSet does next: its new Pod runs on the host while the evicted one, given ten
    // minutes to stop, still terminates.
    v.create_pod(&pod("web-2", spec)).await;
    let uid = pods.get("web-2").await.unwrap().uid().unwrap();
    let replacement = eventually("the replacement Running on the host", || running("web-2")).await;
    assert_eq!(
        replacement.annotations().get("vcluster.loft.sh/object-uid"),
        Some(&uid)
    );
    let evicted = host.get(&host_name("web-1", "default")).await.unwrap();
    assert!(evicted.metadata.deletion_timestamp.is_some());
}

/// What the host records about a synced Pod shows on the virtual Pod, in the virtual cluster's
/// names: the scheduler's FailedScheduling for a Pod no host node fits, and its Scheduled (the
/// host namespace and host Pod name replaced) for one that runs.
#[tokio::test]
async fn the_hosts_events_about_a_pod_show_on_the_virtual_pod_in_its_own_names() {
    let system = system_with_a_host_node().await;
    let v = system.virtual_side();
    let nowhere = json!({"runtimeClassName": "gvisor", "nodeSelector": {"disktype": "ssd"}, "containers": [app(json!({}))]});
    v.create_pod(&pod("stuck", nowhere)).await;
    v.create_pod(&pod(
        "web",
        json!({"runtimeClassName": "gvisor", "containers": [app(json!({}))]}),
    ))
    .await;
    let pods = v.pods().await;
    let uid = |name: &'static str| {
        let pods = pods.clone();
        async move { pods.get(name).await.unwrap().metadata.uid.unwrap() }
    };
    async fn copied(v: &VirtualSide, name: &str, reason: &str) -> CoreEvent {
        let what = format!("the host's {reason} event on the virtual Pod {name}");
        eventually(&what, || async {
            v.events_of(name)
                .await
                .into_iter()
                .find(|e| e.reason.as_deref() == Some(reason))
        })
        .await
    }

    let failed = copied(v, "stuck", "FailedScheduling").await;
    assert_eq!(failed.type_.as_deref(), Some("Warning"));
    assert_eq!(failed.involved_object.uid, Some(uid("stuck").await));
    assert_eq!(
        failed.source.as_ref().and_then(|s| s.component.as_deref()),
        Some("default-scheduler")
    );
    assert!(
        failed
            .message
            .as_deref()
            .is_some_and(|m| m.contains("didn't match Pod's node affinity/selector")),
        "{failed:?}"
    );

    let scheduled = copied(v, "web", "Scheduled").await;
    assert_eq!(scheduled.involved_object.uid, Some(uid("web").await));
    assert_eq!(
        scheduled.message.as_deref(),
        Some("Successfully assigned default/web to devcluster-node-0")
    );
    let started = copied(v, "web", "Started").await;
    assert_eq!(started.type_.as_deref(), Some("Normal"));
    let host_namespace = v.tenant.host_namespace();
    for event in v
        .events_of("web")
        .await
        .into_iter()
        .chain(v.events_of("stuck").await)
    {
        let message = event.message.unwrap_or_default();
        assert!(
            !message.contains(&host_namespace) && !message.contains(&host_name("web", "default")),
            "a copied event names the Pod as the tenant knows it: {message:?}"
        );
    }
}

/// A virtual agent that starts again (a rollout, a new leader) gets every host event once more
/// from a fresh WatchPodStatus stream, and writes none whose copy is already in place (it lists
/// them at start): only a new Pod's events are written.
#[tokio::test]
async fn host_events_already_copied_are_not_written_again_by_a_restarted_agent() {
    let mut system = system_with_a_host_node().await;
    let spec = || json!({"runtimeClassName": "gvisor", "containers": [app(json!({}))]});
    let v = &mut system.virtuals[0];
    v.create_pod(&pod("web", spec())).await;
    /// The copies of `name`'s Scheduled and Started events: name and resource version.
    async fn copies_of(v: &VirtualSide, name: &str) -> Vec<(String, String)> {
        let mut copies: Vec<(String, String)> = v
            .events_of(name)
            .await
            .into_iter()
            .filter(|e| matches!(e.reason.as_deref(), Some("Scheduled" | "Started")))
            .map(|e| (e.metadata.name.unwrap(), e.metadata.resource_version.unwrap()))
            .collect();
        copies.sort();
        copies
    }
    let before = eventually("both events of web copied", || async {
        let copies = copies_of(v, "web").await;
        (copies.len() == 2).then_some(copies)
    })
    .await;

    v.roll_agent().await;
    v.create_pod(&pod("later", spec())).await;
    // The restarted agent's stream carries web's events before later's, and one writer writes
    // them in order: once later's are copied, web's have been looked at.
    eventually("both events of later copied", || async {
        (copies_of(v, "later").await.len() == 2).then_some(())
    })
    .await;
    assert_eq!(
        copies_of(v, "web").await,
        before,
        "web's copies are the same objects"
    );
    let metrics = v.metrics().await;
    assert!(
        metrics.contains("\nrcsync_host_events_copied_total 2\n"),
        "the restarted agent wrote later's two events and none of web's:\n{metrics}"
    );
}

/// A Pod that talks to its Kubernetes API (an operator, anything with in-cluster config) gets,
/// with `--pod-api-server`, a token of the virtual cluster for its ServiceAccount where its token
/// volume mounts it, and the virtual API server's address in its environment: on the host it
/// authenticates to the virtual cluster as itself, and never holds a host credential. Its token
/// is renewed before it expires.
#[tokio::test]
async fn a_pods_service_account_token_on_the_host_is_the_virtual_clusters_and_is_renewed() {
    let mut system = System::start(&[tenant()], &[]).await;
    let v = &mut system.virtuals[0];
    let virtual_config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&v.cluster.kubeconfig).unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    let url = &virtual_config.cluster_url;
    let api_server = format!("{}:{}", url.host().unwrap(), url.port_u16().unwrap());
    v.set_agent_flag("--pod-api-server", &api_server);
    v.roll_agent().await;
    let client = v.cluster.client().await;
    Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), "default")
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "operator"}})).unwrap(),
        )
        .await
        .unwrap();
    // What the root CA publisher puts in every namespace.
    Api::<ConfigMap>::namespaced(client, "default")
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "kube-root-ca.crt"},
                                           "data": {"ca.crt": "-----BEGIN CERTIFICATE-----"}}))
            .unwrap(),
        )
        .await
        .unwrap();
    // The volume the virtual API server's ServiceAccount admission adds. (Upstream asks for at
    // least 600 s; devcluster takes 4 s, so the renewal shows within the test.)
    let access = |lifetime: i64| {
        json!({"name": "kube-api-access-x", "projected": {"sources": [
            {"serviceAccountToken": {"path": "token", "expirationSeconds": lifetime}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}},
        ]}})
    };
    let mount =
        json!([{"name": "kube-api-access-x", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}]);
    let spec = json!({"serviceAccountName": "operator", "volumes": [access(4)],
                      "containers": [app(json!({"volumeMounts": mount}))]});
    v.create_pod(&pod("operator", spec)).await;

    let host_pod = wait_host_pod(&system, "operator", "default").await;
    let v = system.virtual_side();
    let host_spec = host_pod.spec.unwrap();
    assert_eq!(
        host_spec.automount_service_account_token,
        Some(false),
        "no host credential"
    );
    let sources = host_spec.volumes.unwrap()[0]
        .projected
        .clone()
        .unwrap()
        .sources
        .unwrap();
    let secret_name = host_name("operator.rcsync-token", "default");
    let projected = sources[0].secret.clone().expect("the token comes from a Secret");
    assert_eq!(projected.name, secret_name);
    assert_eq!(projected.items.unwrap()[0].path, "token");
    let env: BTreeMap<String, String> = host_spec.containers[0]
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
        .collect();
    assert_eq!(
        format!(
            "{}:{}",
            env["KUBERNETES_SERVICE_HOST"], env["KUBERNETES_SERVICE_PORT"]
        ),
        api_server
    );

    let host_secrets: Api<Secret> = Api::namespaced(system.host.client().await, &v.tenant.host_namespace());
    let token_on_host = || {
        let (host_secrets, secret_name) = (host_secrets.clone(), secret_name.clone());
        async move {
            let secret = host_secrets.get_opt(&secret_name).await.ok()??;
            let token = secret.data?.get("token-0")?.0.clone();
            Some(String::from_utf8(token).unwrap())
        }
    };
    let first = eventually("the token Secret on the host", token_on_host).await;
    // The token authenticates to the virtual API server as the Pod's ServiceAccount.
    let mut as_pod = virtual_config.clone();
    as_pod.auth_info = kube::config::AuthInfo {
        token: Some(first.clone().into()),
        ..Default::default()
    };
    let denied = Api::<Pod>::namespaced(kube::Client::try_from(as_pod).unwrap(), "default")
        .list(&ListParams::default())
        .await
        .expect_err("the ServiceAccount may not list Pods");
    assert!(
        denied
            .to_string()
            .contains("system:serviceaccount:default:operator"),
        "{denied}"
    );
    eventually("the token renewed before it expires", || {
        let first = first.clone();
        async move { token_on_host().await.filter(|t| *t != first).map(drop) }
    })
    .await;
    let metrics = v.metrics().await;
    let issued = metrics
        .lines()
        .find_map(|l| l.strip_prefix("rcsync_pod_tokens_issued_total "))
        .and_then(|n| n.parse::<u64>().ok());
    assert!(
        issued.is_some_and(|n| n >= 2),
        "a token and its renewal counted:\n{metrics}"
    );

    // The Secret that carries a Pod's tokens never stands in for one of the tenant's: a Secret of
    // the namespace under its name holds the Pod back, with a SyncError, until it goes.
    let secrets: Api<Secret> = Api::namespaced(v.cluster.client().await, "default");
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": "clash.rcsync-token"}, "stringData": {"k": "v"}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    let spec = json!({"serviceAccountName": "operator", "volumes": [access(600)],
                      "containers": [app(json!({"volumeMounts": mount}))]});
    v.create_pod(&pod("clash", spec)).await;
    v.wait_event(
        "clash",
        "did not sync pod \"clash\" to host: the Secret \"clash.rcsync-token\" that carries the pod's service \
         account token is taken by a Secret of namespace \"default\": rename that Secret, or run the pod without a \
         token volume",
    )
    .await;
    secrets
        .delete("clash.rcsync-token", &Default::default())
        .await
        .unwrap();
    wait_host_pod(&system, "clash", "default").await;
}

/// A queueing controller in the virtual cluster (Kueue, say) creates its Pods gated, narrows
/// where they may run while they wait, and lifts its gate when it admits them. The host Pod waits
/// gated with rcsync's own gate (the tenant's gate names stay in the virtual cluster), then takes
/// the node selector the controller added and is scheduled with it once the virtual Pod has no
/// gate left.
#[tokio::test]
async fn a_gated_pod_waits_on_the_host_and_runs_where_its_queue_placed_it_once_released() {
    let system = system_with_a_host_node().await;
    let v = system.virtual_side();
    let gated = json!({"runtimeClassName": "gvisor", "containers": [app(json!({}))],
                       "schedulingGates": [{"name": "kueue.x-k8s.io/admission"}]});
    v.create_pod(&pod("job", gated)).await;
    let host = system.host_pods(&v.tenant).await;
    let host_name = host_name("job", "default");
    use rcsync_core::gates::scheduling_gates as gates;
    let waiting = eventually("the host Pod, gated", || {
        let host = host.clone();
        let name = host_name.clone();
        async move { host.get_opt(&name).await.ok()? }
    })
    .await;
    assert_eq!(gates(&waiting), ["rcsync.io/virtual-gates"]);
    assert_eq!(
        waiting.spec.as_ref().unwrap().node_name,
        None,
        "a gated Pod is not scheduled"
    );

    // The controller admits the Pod to a flavor: a node selector added, then its gate lifted.
    let flavor = json!({"spec": {"nodeSelector": {"node.kubernetes.io/instance-type": "devcluster"}}});
    let pods = v.pods().await;
    pods.patch("job", &PatchParams::default(), &Patch::Merge(&flavor))
        .await
        .unwrap();
    let released = json!({"spec": {"schedulingGates": null}});
    pods.patch("job", &PatchParams::default(), &Patch::Merge(&released))
        .await
        .unwrap();
    let running = eventually("the host Pod Running, released", || {
        let host = host.clone();
        let name = host_name.clone();
        async move {
            let p = host.get_opt(&name).await.ok()??;
            let phase = p.status.as_ref().and_then(|s| s.phase.clone());
            (phase.as_deref() == Some("Running")).then_some(p)
        }
    })
    .await;
    assert!(gates(&running).is_empty(), "{:?}", gates(&running));
    let selector = running.spec.unwrap().node_selector.unwrap_or_default();
    assert_eq!(
        selector
            .get("node.kubernetes.io/instance-type")
            .map(String::as_str),
        Some("devcluster"),
        "the flavor's node selector did not reach the host: {selector:?}"
    );
}

/// A readiness gate (a load balancer controller's, say) is set by a controller of the tenant's on
/// the virtual Pod; the host's kubelet counts the Pod Ready only once the host Pod carries it. The
/// condition reaches the host Pod, the host Pod turns Ready, and its status, copied back, keeps
/// the virtual Pod's condition.
#[tokio::test]
async fn a_readiness_gate_the_tenants_controller_sets_makes_the_pod_ready_in_both_clusters() {
    let system = system_with_a_host_node().await;
    let v = system.virtual_side();
    let gate = "example.com/lb-ready";
    v.create_pod(&pod(
        "web",
        json!({"runtimeClassName": "gvisor", "containers": [app(json!({}))],
               "readinessGates": [{"conditionType": gate}]}),
    ))
    .await;
    let host = system.host_pods(&v.tenant).await;
    let pods = v.pods().await;
    let condition = |p: &Pod, kind: &str| -> Option<String> {
        p.status
            .as_ref()?
            .conditions
            .as_ref()?
            .iter()
            .find(|c| c.type_ == kind)
            .map(|c| c.status.clone())
    };
    let host_name = host_name("web", "default");
    eventually("the Pod Running in both clusters, not Ready for its gate", || {
        let (host, pods, name) = (host.clone(), pods.clone(), host_name.clone());
        async move {
            let (h, p) = (host.get(&name).await.ok()?, pods.get("web").await.ok()?);
            let running = |p: &Pod| p.status.as_ref()?.phase.clone();
            (running(&h).as_deref() == Some("Running")
                && condition(&h, "Ready").as_deref() == Some("False")
                && condition(&p, "Ready").as_deref() == Some("False"))
            .then_some(())
        }
    })
    .await;

    // The tenant's controller sets the gate's condition on the virtual Pod.
    let set = json!({"status": {"conditions": [{"type": gate, "status": "True"}]}});
    pods.patch_status("web", &PatchParams::default(), &Patch::Strategic(set))
        .await
        .unwrap();
    eventually(
        "the Pod Ready in both clusters, the gate's condition kept",
        || {
            let (host, pods, name) = (host.clone(), pods.clone(), host_name.clone());
            async move {
                let (h, p) = (host.get(&name).await.ok()?, pods.get("web").await.ok()?);
                (condition(&h, gate).as_deref() == Some("True")
                    && condition(&h, "Ready").as_deref() == Some("True")
                    && condition(&p, "Ready").as_deref() == Some("True")
                    && condition(&p, gate).as_deref() == Some("True"))
                .then_some(())
            }
        },
    )
    .await;
}

/// A deadline set on a running Pod (`activeDeadlineSeconds`, as a batch controller sets it)
/// reaches its host Pod, whose kubelet ends it when the deadline passes; the virtual Pod shows it
/// Failed with the kubelet's reason.
#[tokio::test]
async fn a_deadline_set_on_a_running_pod_ends_it_on_the_host() {
    let system = system_with_a_host_node().await;
    let v = system.virtual_side();
    v.create_pod(&pod(
        "batch",
        json!({"runtimeClassName": "gvisor", "containers": [app(json!({}))]}),
    ))
    .await;
    let host = system.host_pods(&v.tenant).await;
    let pods = v.pods().await;
    let phase = |p: &Pod| p.status.as_ref().and_then(|s| s.phase.clone());
    let host_name = host_name("batch", "default");
    eventually("the host Pod Running", || {
        let (host, name) = (host.clone(), host_name.clone());
        async move { (phase(&host.get(&name).await.ok()?).as_deref() == Some("Running")).then_some(()) }
    })
    .await;
    let deadline = json!({"spec": {"activeDeadlineSeconds": 1}});
    pods.patch("batch", &PatchParams::default(), &Patch::Merge(&deadline))
        .await
        .unwrap();
    let ended = eventually("the virtual Pod Failed for its deadline", || {
        let pods = pods.clone();
        async move {
            let p = pods.get("batch").await.ok()?;
            (phase(&p).as_deref() == Some("Failed")).then_some(p)
        }
    })
    .await;
    assert_eq!(ended.status.unwrap().reason.as_deref(), Some("DeadlineExceeded"));
    let on_host = host.get(&host_name).await.unwrap();
    assert_eq!(on_host.spec.unwrap().active_deadline_seconds, Some(1));
}

/// A Pod resized in place in the virtual cluster (`pods/resize`: its containers' cpu and memory)
/// is resized on the host, where its containers then run with the new resources, which the
/// virtual Pod's status shows.
#[tokio::test]
async fn a_pod_resized_in_the_virtual_cluster_is_resized_on_the_host() {
    let system = system_with_a_host_node().await;
    let v = system.virtual_side();
    let resources =
        json!({"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"cpu": "200m", "memory": "128Mi"}});
    v.create_pod(&pod(
        "web",
        json!({"runtimeClassName": "gvisor", "containers": [app(json!({"resources": resources}))]}),
    ))
    .await;
    let host = system.host_pods(&v.tenant).await;
    let pods = v.pods().await;
    let host_name = host_name("web", "default");
    let running_cpu = |p: &Pod| -> Option<String> {
        let status = p.status.as_ref()?.container_statuses.as_ref()?.first()?;
        Some(
            status
                .resources
                .as_ref()?
                .requests
                .as_ref()?
                .get("cpu")?
                .0
                .clone(),
        )
    };
    let before = eventually("the host Pod running with 100m", || {
        let (host, name) = (host.clone(), host_name.clone());
        async move {
            let p = host.get(&name).await.ok()?;
            (running_cpu(&p).as_deref() == Some("100m")).then_some(p)
        }
    })
    .await;
    resize(
        &pods,
        "web",
        json!({"requests": {"cpu": "150m"}, "limits": {"cpu": "300m"}}),
    )
    .await;
    eventually("the virtual Pod's containers running with 150m", || {
        let pods = pods.clone();
        async move { (running_cpu(&pods.get("web").await.ok()?).as_deref() == Some("150m")).then_some(()) }
    })
    .await;
    let on_host = host.get(&host_name).await.unwrap();
    let spec = &on_host.spec.unwrap().containers[0];
    let limits = spec.resources.as_ref().unwrap().limits.as_ref().unwrap();
    assert_eq!(limits.get("cpu").map(|q| q.0.as_str()), Some("300m"));
    assert_eq!(limits.get("memory").map(|q| q.0.as_str()), Some("128Mi"));
    // Resized in place: the same host Pod, its containers not restarted.
    assert_eq!(on_host.metadata.uid, before.metadata.uid);
    let restarts = on_host.status.unwrap().container_statuses.unwrap()[0].restart_count;
    assert_eq!(restarts, 0);
}

/// `kubectl debug`: an ephemeral container added to a running virtual Pod is added to its host
/// Pod (its references translated to the tenant's copies, as every container's) and runs there;
/// the virtual Pod shows it running.
#[tokio::test]
async fn a_debug_container_added_in_the_virtual_cluster_runs_in_the_host_pod() {
    let system = system_with_a_host_node().await;
    let v = system.virtual_side();
    create_config_map(v, "debug-conf", &[("level", "trace")]).await;
    v.create_pod(&pod(
        "web",
        json!({"runtimeClassName": "gvisor", "containers": [app(json!({}))]}),
    ))
    .await;
    let host = system.host_pods(&v.tenant).await;
    let host_name = host_name("web", "default");
    eventually("the host Pod running", || {
        let (host, name) = (host.clone(), host_name.clone());
        async move {
            let p = host.get(&name).await.ok()?;
            (p.status?.phase.as_deref() == Some("Running")).then_some(())
        }
    })
    .await;
    let debugger = json!({"name": "debugger", "image": "busybox:1.36", "targetContainerName": "app",
        "env": [{"name": "LEVEL", "valueFrom": {"configMapKeyRef": {"name": "debug-conf", "key": "level"}}}]});
    debug(v, "web", debugger).await;
    let pods = v.pods().await;
    eventually("the virtual Pod's debug container running", || {
        let pods = pods.clone();
        async move { debugger_running(&pods.get("web").await.ok()?).then_some(()) }
    })
    .await;
    let on_host = host.get(&host_name).await.unwrap();
    assert!(debugger_running(&on_host));
    let added = &on_host.spec.unwrap().ephemeral_containers.unwrap()[0];
    assert_eq!(
        (added.name.as_str(), added.target_container_name.as_deref()),
        ("debugger", Some("app"))
    );
    let reference = added.env.as_ref().unwrap()[0]
        .value_from
        .as_ref()
        .unwrap()
        .config_map_key_ref
        .as_ref()
        .unwrap();
    let copy = host_config_maps(&system)
        .await
        .get(&reference.name)
        .await
        .unwrap();
    assert_eq!(reference.name, "debug-conf-x-default-x-team-a");
    assert_eq!(copy.data.unwrap()["level"], "trace");
}

/// A Pod debugged before it reached the host (it waited for a ConfigMap) runs its debug container
/// there from the start: the host Pod is created, then given its ephemeral containers at once.
#[tokio::test]
async fn a_pod_debugged_before_it_reached_the_host_runs_its_debug_container_there() {
    let system = system_with_a_host_node().await;
    let v = system.virtual_side();
    let env =
        json!([{"name": "LEVEL", "valueFrom": {"configMapKeyRef": {"name": "late-conf", "key": "level"}}}]);
    v.create_pod(&pod(
        "web",
        json!({"runtimeClassName": "gvisor", "containers": [app(json!({"env": env}))]}),
    ))
    .await;
    let waiting = first_event(v, "web", "SyncWarning").await;
    assert!(waiting.contains("late-conf"), "{waiting}");
    debug(
        v,
        "web",
        json!({"name": "debugger", "image": "busybox:1.36", "targetContainerName": "app"}),
    )
    .await;
    create_config_map(v, "late-conf", &[("level", "trace")]).await;
    let pods = v.pods().await;
    eventually("the virtual Pod's debug container running", || {
        let pods = pods.clone();
        async move { debugger_running(&pods.get("web").await.ok()?).then_some(()) }
    })
    .await;
    let on_host = system
        .host_pods(&v.tenant)
        .await
        .get(&host_name("web", "default"))
        .await
        .unwrap();
    let names: Vec<String> = on_host
        .spec
        .unwrap()
        .ephemeral_containers
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, ["debugger"]);
}

/// A debug container the tenant's Pod Security level forbids never reaches the host: the Pod runs
/// on as it was, and the virtual Pod says why.
#[tokio::test]
async fn a_debug_container_the_tenants_pod_security_forbids_is_refused_and_the_pod_runs_on() {
    let system = system(tenant()).await;
    let v = system.virtual_side();
    v.create_pod(&pod("web", json!({"containers": [app(json!({}))]})))
        .await;
    wait_host_pod(&system, "web", "default").await;
    let debugger = json!({"name": "debugger", "image": "busybox:1.36",
        "securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}});
    debug(v, "web", debugger).await;
    let message = first_event(v, "web", "SyncError").await;
    assert!(
        message.contains(r#"pod "web" keeps running on the host, but its changes are not synced"#)
            && message
                .contains(r#"non-default capabilities (container "debugger" must not include "SYS_ADMIN""#),
        "{message}"
    );
    let on_host = system
        .host_pods(&v.tenant)
        .await
        .get(&host_name("web", "default"))
        .await
        .unwrap();
    assert_eq!(on_host.spec.unwrap().ephemeral_containers, None);
}

/// A resize the host's node cannot hold is not applied there, and the virtual Pod says why: the
/// host kubelet's `PodResizePending` condition (`Infeasible`) is copied back with the status.
#[tokio::test]
async fn a_resize_the_hosts_node_cannot_hold_shows_as_pending_on_the_virtual_pod() {
    let system = system_with_a_host_node().await;
    let v = system.virtual_side();
    let resources = json!({"requests": {"cpu": "100m"}, "limits": {"cpu": "200m"}});
    v.create_pod(&pod(
        "web",
        json!({"runtimeClassName": "gvisor", "containers": [app(json!({"resources": resources}))]}),
    ))
    .await;
    let pods = v.pods().await;
    let phase = |p: &Pod| p.status.as_ref().and_then(|s| s.phase.clone());
    eventually("the virtual Pod Running", || {
        let pods = pods.clone();
        async move { (phase(&pods.get("web").await.ok()?).as_deref() == Some("Running")).then_some(()) }
    })
    .await;
    resize(
        &pods,
        "web",
        json!({"requests": {"cpu": "16"}, "limits": {"cpu": "32"}}),
    )
    .await;
    let pending = eventually("PodResizePending on the virtual Pod", || {
        let pods = pods.clone();
        async move {
            let conditions = pods.get("web").await.ok()?.status?.conditions?;
            conditions.into_iter().find(|c| c.type_ == "PodResizePending")
        }
    })
    .await;
    assert_eq!(pending.reason.as_deref(), Some("Infeasible"));
    assert_eq!(
        pending.message.as_deref(),
        Some("Node didn't have enough capacity: cpu, requested: 16000, capacity: 8000")
    );
}

/// A host status the virtual cluster refuses to store (the agent's role lacks `pods/status` for a
/// while) is not lost: it is written once the role allows it, although the host Pod no longer
/// changes.
#[tokio::test]
async fn a_host_status_the_virtual_cluster_refused_to_store_arrives_once_it_is_allowed() {
    use k8s_openapi::api::rbac::v1::ClusterRole;
    let system = system_with_a_host_node().await;
    let v = system.virtual_side();
    // The virtual agent may not write Pod status for a while (deploy/'s role, minus pods/status).
    let roles: Api<ClusterRole> = Api::all(v.cluster.client().await);
    let role = roles.get("rcsync-virtual-agent").await.unwrap();
    let mut without_status = role.clone();
    without_status
        .rules
        .as_mut()
        .unwrap()
        .retain(|r| !r.resources.iter().flatten().any(|x| x == "pods/status"));
    roles
        .replace("rcsync-virtual-agent", &PostParams::default(), &without_status)
        .await
        .unwrap();
    v.create_pod(&pod(
        "web",
        json!({"runtimeClassName": "gvisor", "containers": [app(json!({}))]}),
    ))
    .await;
    let host = system.host_pods(&v.tenant).await;
    let pods = v.pods().await;
    let phase = |p: &Pod| p.status.as_ref().and_then(|s| s.phase.clone());
    eventually(
        "the Pod Running on the host, and the virtual agent's status write refused",
        || {
            let host = host.clone();
            let logs = v.agent.logs();
            async move {
                let host_pod = host.get_opt("web-x-default-x-team-a").await.ok()??;
                let refused = logs.contains("copying the host status failed");
                (phase(&host_pod).as_deref() == Some("Running") && refused).then_some(())
            }
        },
    )
    .await;
    assert_ne!(
        phase(&pods.get("web").await.unwrap()).as_deref(),
        Some("Running"),
        "the virtual Pod's status was written although the agent may not write it"
    );
    // Allowed again: the host status does not change any more, and still reaches the virtual Pod.
    let mut restored = roles.get("rcsync-virtual-agent").await.unwrap();
    restored.rules = role.rules.clone();
    roles
        .replace("rcsync-virtual-agent", &PostParams::default(), &restored)
        .await
        .unwrap();
    eventually("the virtual Pod Running", || {
        let pods = pods.clone();
        async move { (phase(&pods.get("web").await.ok()?).as_deref() == Some("Running")).then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn the_secrets_of_a_pod_whose_class_is_denied_never_leave_the_virtual_cluster() {
    let mut system = System::start(
        &[TenantSpec::new(
            TENANT,
            "{enabled: true, selector: {matchLabels: {env: dev}}}",
        )],
        &[
            runtime_class("gvisor", "runsc", &[("env", "dev")]),
            runtime_class("kata", "kata", &[]),
        ],
    )
    .await;
    Api::<Secret>::namespaced(system.virtual_side().cluster.client().await, "default")
        .create(&PostParams::default(), &secret("db", &[("password", "s3cret")]))
        .await
        .unwrap();
    let uses_db = |class: &str| {
        json!({"runtimeClassName": class,
               "containers": [app(json!({"envFrom": [{"secretRef": {"name": "db"}}]}))]})
    };
    system.virtuals[0]
        .create_pod_with_homemade_class(&pod("denied", uses_db("kata")), "kata")
        .await;
    let v = system.virtual_side();
    assert_eq!(
        first_event(v, "denied", "SyncWarning").await,
        "did not sync pod \"denied\" to host because it does not match the selector under 'sync.fromHost.runtimeClasses.selector'"
    );
    // The host agent was asked (CheckPod) and got no ApplyPod, the call that carries Secrets.
    let metrics = http_get(&system.host_admin, "/metrics").await.unwrap().1;
    assert!(
        metrics.contains(
            r#"rcsync_grpc_requests_total{method="/rcsync.v1.RuntimeClassSync/CheckPod",code="Ok"}"#
        ),
        "{metrics}"
    );
    assert!(
        !metrics.contains(r#"method="/rcsync.v1.PodSync/ApplyPod""#),
        "{metrics}"
    );
    assert!(
        host_secrets(&system)
            .await
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    // An allowed Pod with the same Secret syncs, with its copy.
    v.create_pod(&pod("allowed", uses_db("gvisor"))).await;
    wait_host_pod(&system, "allowed", "default").await;
    let copy = host_secrets(&system)
        .await
        .get(&host_name("db", "default"))
        .await
        .unwrap();
    assert_eq!(copy.data, Some(secret_data(&[("password", "s3cret")])));
}

#[tokio::test]
async fn a_label_a_field_ref_reads_keeps_its_virtual_value_on_the_host_and_follows_changes() {
    let system = system(tenant()).await;
    let v = system.virtual_side();
    let mut p = pod(
        "labelled",
        json!({"containers": [app(json!({"env": [
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}}]}))]}),
    );
    p.metadata.labels = Some(BTreeMap::from([("app".to_string(), "shop".to_string())]));
    v.create_pod(&p).await;
    let host = wait_host_pod(&system, "labelled", "default").await;
    let path = host.spec.as_ref().unwrap().containers[0].env.as_ref().unwrap()[0]
        .value_from
        .as_ref()
        .unwrap()
        .field_ref
        .as_ref()
        .unwrap()
        .field_path
        .clone();
    let key = path
        .strip_prefix("metadata.annotations['")
        .and_then(|p| p.strip_suffix("']"))
        .unwrap_or_else(|| panic!("the fieldRef reads an annotation: {path}"))
        .to_string();
    assert_eq!(host.annotations().get(&key).map(String::as_str), Some("shop"));
    assert!(
        !host.labels().contains_key("app"),
        "virtual labels are not copied"
    );
    // The label changes in the virtual cluster: the host Pod's annotation follows.
    Api::<Pod>::namespaced(v.cluster.client().await, "default")
        .patch(
            "labelled",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"app": "shop-v2"}}})),
        )
        .await
        .unwrap();
    let pods = system.host_pods(&v.tenant).await;
    eventually("the host annotation to follow the label", || async {
        let host = pods.get(&host_name("labelled", "default")).await.ok()?;
        (host.annotations().get(&key).map(String::as_str) == Some("shop-v2")).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_downward_api_volume_of_all_labels_is_refused_with_a_reason() {
    let system = system(tenant()).await;
    refused(
        &system,
        "all-labels",
        json!({"containers": [app(json!({}))],
               "volumes": [{"name": "info", "downwardAPI": {"items": [
                   {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}}]}),
        "the host cannot honour volume \"info\": downwardAPI item \"labels\" reads all of metadata.labels, which the host Pod does not carry (single keys, metadata.labels['key'], are mapped)",
    )
    .await;
}

#[tokio::test]
async fn a_virtual_agent_syncs_its_pods_over_one_connection_whatever_its_shards() {
    let system = system(tenant()).await;
    let side = system.virtual_side();
    // 40 Pods land on (nearly) every one of the agent's 16 shards.
    let pods = side.pods().await;
    for i in 0..40 {
        pods.create(
            &PostParams::default(),
            &pod(&format!("web-{i}"), json!({"containers": [app(json!({}))]})),
        )
        .await
        .unwrap();
    }
    system.wait_host_pod_count(40).await;
    // One connection for the Sync stream, one for the status feed, one for every Pod call (and
    // the budgets' and claims' calls and claim status stream).
    let (_, metrics) = http_get(&system.host_admin, "/metrics").await.unwrap();
    let open: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("rcsync_grpc_connections "))
        .expect("rcsync_grpc_connections in the host agent's metrics")
        .parse()
        .unwrap();
    assert!(
        open <= 3.0,
        "the virtual agent holds {open} connections to the host agent"
    );
}

#[tokio::test]
async fn only_the_annotations_the_tenant_may_copy_reach_the_host_and_follow_changes() {
    let system = system(tenant().host_pods(
        r#"{copyAnnotations: ["prometheus.io/*", "container.apparmor.security.beta.kubernetes.io/*"]}"#,
    ))
    .await;
    let v = system.virtual_side();
    let mut p = pod("scraped", json!({"containers": [app(json!({}))]}));
    p.metadata.annotations = Some(BTreeMap::from(
        [
            ("prometheus.io/scrape", "true"),
            ("prometheus.io/port", "8080"),
            ("iam.amazonaws.com/role", "host-admin"),
            ("vcluster.loft.sh/object-name", "someone-else"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    ));
    v.create_pod(&p).await;
    let host = wait_host_pod(&system, "scraped", "default").await;
    let annotations = host.annotations();
    assert_eq!(
        annotations.get("prometheus.io/scrape").map(String::as_str),
        Some("true")
    );
    assert_eq!(
        annotations.get("prometheus.io/port").map(String::as_str),
        Some("8080")
    );
    assert!(
        !annotations.contains_key("iam.amazonaws.com/role"),
        "{annotations:?}"
    );
    assert_eq!(
        annotations
            .get("vcluster.loft.sh/object-name")
            .map(String::as_str),
        Some("scraped"),
        "a tenant's annotation never stands in for rcsync's own"
    );

    // The tenant drops one annotation: the host Pod drops it too.
    Api::<Pod>::namespaced(v.cluster.client().await, "default")
        .patch(
            "scraped",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"prometheus.io/port": null}}})),
        )
        .await
        .unwrap();
    let pods = system.host_pods(&v.tenant).await;
    eventually("the host Pod to drop the removed annotation", || async {
        let host = pods.get(&host_name("scraped", "default")).await.ok()?;
        let annotations = host.annotations();
        (!annotations.contains_key("prometheus.io/port") && annotations.contains_key("prometheus.io/scrape"))
            .then_some(())
    })
    .await;

    // A copied annotation is part of the Pod the host checks: an unconfined AppArmor profile is
    // refused by baseline, as it would be set on the host directly.
    let mut unconfined = pod("unconfined", json!({"containers": [app(json!({}))]}));
    unconfined.metadata.annotations = Some(BTreeMap::from([(
        "container.apparmor.security.beta.kubernetes.io/app".to_string(),
        "unconfined".to_string(),
    )]));
    v.create_pod(&unconfined).await;
    eventually("the unconfined Pod to be refused with a reason", || async {
        events_in(v, "default", "unconfined")
            .await
            .into_iter()
            .find(|e| e.message.as_deref().is_some_and(|m| m.contains("AppArmor")))
    })
    .await;
    no_host_pod(&system, "unconfined").await;

    // The platform team stops copying AppArmor annotations: the refused Pod is tried again and
    // reaches the host without it.
    system.rewrite_tenants(&[tenant().host_pods(r#"{copyAnnotations: ["prometheus.io/*"]}"#)]);
    let host = wait_host_pod(&system, "unconfined", "default").await;
    assert!(
        !host
            .annotations()
            .contains_key("container.apparmor.security.beta.kubernetes.io/app"),
        "{:?}",
        host.annotations()
    );
}

/// A changed Pod policy reaches Pods already on the host, not only new ones: annotations the
/// tenant may now copy are added to the running Pod's host copy. A Pod Security level tightened
/// under a running Pod leaves it running (as a namespace's level does) and says on the Pod that
/// its changes no longer reach the host.
#[tokio::test]
async fn a_changed_pod_policy_reaches_pods_already_on_the_host() {
    let system = system(tenant()).await;
    let v = system.virtual_side();
    let mut p = pod("scraped", json!({"containers": [app(json!({}))]}));
    p.metadata.annotations = Some(BTreeMap::from([(
        "prometheus.io/scrape".to_string(),
        "true".to_string(),
    )]));
    v.create_pod(&p).await;
    let host = wait_host_pod(&system, "scraped", "default").await;
    assert!(
        !host.annotations().contains_key("prometheus.io/scrape"),
        "nothing is copied by default: {:?}",
        host.annotations()
    );
    let host_uid = host.metadata.uid.clone();

    let copying = tenant().host_pods(r#"{copyAnnotations: ["prometheus.io/*"]}"#);
    system.rewrite_tenants(std::slice::from_ref(&copying));
    let pods = system.host_pods(&v.tenant).await;
    let name = host_name("scraped", "default");
    eventually("the running Pod's host copy to carry the annotation", || async {
        let host = pods.get(&name).await.ok()?;
        (host.annotations().get("prometheus.io/scrape").map(String::as_str) == Some("true")).then_some(host)
    })
    .await;

    // `restricted` refuses this Pod (it may run as root): it keeps running on the host, and the
    // virtual Pod says its changes stay behind.
    system.rewrite_tenants(&[copying.pod_security("restricted")]);
    let message = first_event(v, "scraped", "SyncError").await;
    assert!(
        message.starts_with(r#"pod "scraped" keeps running on the host, but its changes are not synced: "#)
            && message.contains(r#"violates PodSecurity "restricted:latest""#),
        "{message}"
    );
    let host = pods.get(&name).await.unwrap();
    assert_eq!(host.metadata.uid, host_uid, "the running host Pod is left alone");
    assert!(host.metadata.deletion_timestamp.is_none());
}

/// A toleration the platform team adds to `enforceTolerations` reaches the Pods already running:
/// a running Pod takes added tolerations (and no other change of them), so the host copy gains it
/// in place.
#[tokio::test]
async fn an_enforced_toleration_added_later_reaches_the_running_pods() {
    let system = system(tenant()).await;
    let v = system.virtual_side();
    v.create_pod(&pod("worker", json!({"containers": [app(json!({}))]})))
        .await;
    let before = wait_host_pod(&system, "worker", "default").await;
    system.rewrite_tenants(&[tenant().host_pods(r#"{enforceTolerations: ["dedicated=tenants:NoExecute"]}"#)]);
    let pods = system.host_pods(&v.tenant).await;
    let name = host_name("worker", "default");
    let after = eventually("the running host Pod to tolerate dedicated=tenants", || async {
        let host = pods.get(&name).await.ok()?;
        let tolerates = host.spec.as_ref()?.tolerations.as_ref()?.iter().any(|t| {
            (t.key.as_deref(), t.value.as_deref(), t.effect.as_deref())
                == (Some("dedicated"), Some("tenants"), Some("NoExecute"))
        });
        tolerates.then_some(host)
    })
    .await;
    assert_eq!(after.metadata.uid, before.metadata.uid, "updated in place");
}

/// A tenant's host namespace at its Pod quota still takes the changes of the Pods it holds: the
/// host agent reads a Pod the virtual side has seen on the host instead of trying to create it
/// (the host's admission, quota included, runs before a taken name shows, so that create would be
/// refused). A Pod past the quota is refused with the host's reason, and retried as soon as a
/// host Pod goes, not when its backoff next comes up.
#[tokio::test]
async fn a_host_namespace_at_its_pod_quota_still_takes_changes_of_its_pods() {
    let system = system(tenant()).await;
    let v = system.virtual_side();
    let quota: ResourceQuota =
        serde_json::from_value(json!({"metadata": {"name": "pods"}, "spec": {"hard": {"pods": "1"}}}))
            .unwrap();
    Api::<ResourceQuota>::namespaced(system.host.client().await, &v.tenant.host_namespace())
        .create(&PostParams::default(), &quota)
        .await
        .unwrap();
    v.create_pod(&pod("web", json!({"containers": [app(json!({}))]})))
        .await;
    wait_host_pod(&system, "web", "default").await;

    Api::<Pod>::namespaced(v.cluster.client().await, "default")
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"tier": "frontend"}}})),
        )
        .await
        .unwrap();
    let pods = system.host_pods(&v.tenant).await;
    let name = host_name("web", "default");
    eventually("the host Pod to carry the changed labels", || async {
        let host = pods.get(&name).await.ok()?;
        let labels = host.annotations().get("vcluster.loft.sh/labels")?.clone();
        labels.contains("frontend").then_some(())
    })
    .await;

    v.create_pod(&pod("api", json!({"containers": [app(json!({}))]})))
        .await;
    let message = first_event(v, "api", "SyncError").await;
    assert!(
        message.contains("exceeded quota: pods, requested: pods=1, used: pods=1, limited: pods=1"),
        "{message}"
    );
    no_host_pod(&system, "api").await;
    // Operators see it too: failing, with the host's reason, while it is retried.
    let reason = failing_in_status(v, "api").await;
    assert!(reason.contains("exceeded quota: pods"), "{reason}");
    let metrics = v.metrics().await;
    assert!(metrics.contains("\nrcsync_pods_failing 1\n"), "{metrics}");

    // Its retries back off to seconds apart (the fifth waits 2.4 s at least)...
    eventually("api's retries to be seconds apart", || {
        let logs = v.agent.logs();
        async move { (retry_delays(&logs, "api").last()? >= &2_000).then_some(()) }
    })
    .await;
    // ...but room on the host sends it there at once: a host Pod going retries the Pod the
    // quota refused the longest. Nothing is failing any more.
    Api::<Pod>::namespaced(v.cluster.client().await, "default")
        .delete("web", &Default::default())
        .await
        .unwrap();
    hastened_quota_retry(v, "api", "as the host Pod of web went").await;
    wait_host_pod(&system, "api", "default").await;
    none_failing_in_status(v, 1).await;
    let metrics = v.metrics().await;
    assert!(metrics.contains("\nrcsync_pods_failing 0\n"), "{metrics}");
}

/// A host namespace's compute quota (what a tenant's Pods may request in all) holds for Pods
/// synced through rcsync as for Pods created there: a Pod past it, or one that does not state
/// what it limits, is refused with the host's reason, and a refused Pod is retried as soon as a
/// host Pod ends (an ended Pod no longer counts), not when its backoff next comes up.
#[tokio::test]
async fn a_host_namespace_s_compute_quota_refuses_pods_with_its_reason_until_room_is_made() {
    let system = system(tenant()).await;
    let v = system.virtual_side();
    compute_quota(&system).await;
    let requesting = |cpu: &str| app(json!({"resources": {"requests": {"cpu": cpu}}}));
    v.create_pod(&pod("web", json!({"containers": [requesting("600m")]})))
        .await;
    wait_host_pod(&system, "web", "default").await;

    v.create_pod(&pod("api", json!({"containers": [requesting("600m")]})))
        .await;
    let message = first_event(v, "api", "SyncError").await;
    assert!(
        message.contains(
            "exceeded quota: compute, requested: requests.cpu=600m, used: requests.cpu=600m, limited: requests.cpu=1"
        ),
        "{message}"
    );
    v.create_pod(&pod("bare", json!({"containers": [app(json!({}))]})))
        .await;
    let message = first_event(v, "bare", "SyncError").await;
    assert!(
        message.contains("failed quota: compute: must specify requests.cpu for: app"),
        "{message}"
    );
    no_host_pod(&system, "api").await;
    no_host_pod(&system, "bare").await;

    // web's containers exit: its host Pod ends (the kubelet's status write).
    let succeeded = json!({"status": {"phase": "Succeeded"}});
    system
        .host_pods(&v.tenant)
        .await
        .patch_status(
            &host_name("web", "default"),
            &PatchParams::default(),
            &Patch::Merge(&succeeded),
        )
        .await
        .unwrap();
    hastened_quota_retry(v, "api", "as the host Pod of web ended").await;
    wait_host_pod(&system, "api", "default").await;
    no_host_pod(&system, "bare").await;
}

/// A Pod the host refuses as it stands (here: its namespace's compute quota wants requests the
/// Pod does not set) gets the same answer at every try: its retries back off past the 5 s of
/// other failures, so a thousand such Pods do not load the host API server with refused creates.
/// An edit of the Pod tries it again at once and starts its backoff afresh.
#[tokio::test]
async fn a_pod_the_host_refuses_as_it_stands_is_retried_rarely_and_at_once_when_edited() {
    let system = system(tenant()).await;
    let v = system.virtual_side();
    let quotas = compute_quota(&system).await;
    v.create_pod(&pod("bare", json!({"containers": [app(json!({}))]})))
        .await;
    // 200 ms doubling (±25% jitter): the seventh wait is past any 5 s cap.
    let delays = eventually("seven refusals of the Pod", || {
        let logs = v.agent.logs();
        async move {
            let d = rcsync_tests::retry_delays(&logs, "bare");
            (d.len() >= 7).then_some(d)
        }
    })
    .await;
    assert!(
        delays[6] > 6_250,
        "the refused Pod's retries stop at 5 s: {delays:?}"
    );
    let message = first_event(v, "bare", "SyncError").await;
    assert!(
        message.contains("must specify requests.cpu for: app"),
        "{message}"
    );

    // The tenant labels the Pod (its resources cannot change in place): tried at once, afresh.
    let before = delays.len();
    let labelled = json!({"metadata": {"labels": {"tier": "batch"}}});
    v.pods()
        .await
        .patch("bare", &PatchParams::default(), &Patch::Merge(&labelled))
        .await
        .unwrap();
    let after = eventually("a refusal of the edited Pod", || {
        let logs = v.agent.logs();
        async move {
            let d = rcsync_tests::retry_delays(&logs, "bare");
            (d.len() > before).then_some(d)
        }
    })
    .await;
    assert!(after[before] <= 250, "the edited Pod kept its backoff: {after:?}");

    // The host's quota goes: the Pod syncs on its fresh backoff, nothing lost.
    quotas.delete("compute", &Default::default()).await.unwrap();
    wait_host_pod(&system, "bare", "default").await;
}

/// Real host namespaces pair a compute quota with a LimitRange whose defaults fill in what the
/// quota asks: a tenant's Pod that states no requests is admitted there with the host's defaults,
/// and the host agent's later updates of it (a new image) leave what the host filled in alone.
#[tokio::test]
async fn a_host_limit_range_fills_in_what_its_quota_asks_and_updates_leave_it_alone() {
    use k8s_openapi::api::core::v1::LimitRange;
    let system = system(tenant()).await;
    let v = system.virtual_side();
    let limits: LimitRange = serde_json::from_value(json!({"metadata": {"name": "defaults"}, "spec": {"limits": [
        {"type": "Container", "defaultRequest": {"cpu": "100m"}, "default": {"cpu": "200m"}, "max": {"cpu": "1"}}]}}))
    .unwrap();
    Api::<LimitRange>::namespaced(system.host.client().await, &v.tenant.host_namespace())
        .create(&PostParams::default(), &limits)
        .await
        .unwrap();
    compute_quota(&system).await;
    v.create_pod(&pod("bare", json!({"containers": [app(json!({}))]})))
        .await;
    let placed = wait_host_pod(&system, "bare", "default").await;
    let resources =
        |p: &Pod| serde_json::to_value(&p.spec.as_ref().unwrap().containers[0].resources).unwrap();
    assert_eq!(
        resources(&placed),
        json!({"requests": {"cpu": "100m"}, "limits": {"cpu": "200m"}})
    );
    // Past the LimitRange's max: the host's refusal reaches the tenant.
    v.create_pod(&pod(
        "greedy",
        json!({"containers": [app(json!({"resources": {"limits": {"cpu": "2"}}}))]}),
    ))
    .await;
    let message = first_event(v, "greedy", "SyncError").await;
    assert!(
        message.contains("maximum cpu usage per Container is 1, but limit is 2"),
        "{message}"
    );

    let image = json!({"spec": {"containers": [{"name": "app", "image": "registry.example/app:2.0"}]}});
    v.pods()
        .await
        .patch("bare", &PatchParams::default(), &Patch::Strategic(image))
        .await
        .unwrap();
    let updated = eventually("the new image on the host Pod", || async {
        let p = system
            .host_pods(&v.tenant)
            .await
            .get(&host_name("bare", "default"))
            .await
            .ok()?;
        (p.spec.as_ref()?.containers[0].image.as_deref() == Some("registry.example/app:2.0")).then_some(p)
    })
    .await;
    assert_eq!(resources(&updated), resources(&placed));
    no_host_pod(&system, "greedy").await;
}

/// A resize is checked against the host namespace's quota like a create: one that would pass it
/// is refused with the host's reason (a `SyncError` on the virtual Pod), and the host Pod keeps
/// what it had.
#[tokio::test]
async fn a_resize_past_the_host_namespace_s_quota_is_refused_with_its_reason() {
    let system = system(tenant()).await;
    let v = system.virtual_side();
    compute_quota(&system).await;
    let requesting = |cpu: &str| json!({"requests": {"cpu": cpu}});
    v.create_pod(&pod(
        "web",
        json!({"containers": [app(json!({"resources": requesting("600m")}))]}),
    ))
    .await;
    wait_host_pod(&system, "web", "default").await;
    resize(&v.pods().await, "web", requesting("1200m")).await;
    let message = first_event(v, "web", "SyncError").await;
    assert!(
        message.contains(
            "exceeded quota: compute, requested: requests.cpu=600m, used: requests.cpu=600m, limited: requests.cpu=1"
        ),
        "{message}"
    );
    assert_eq!(host_cpu_request(&system, "web").await, "600m");
}

/// On a host whose API server predates in-place resize (no `pods/resize`, before Kubernetes
/// 1.33), a Pod resized in the virtual cluster keeps its resources on the host, and the virtual
/// Pod says why, rather than the agents retrying as if the host were down.
#[tokio::test]
async fn a_resize_a_host_without_in_place_resize_cannot_make_is_reported_on_the_virtual_pod() {
    use rcsync_tests::system::Transport;
    let older_host = devcluster::ServerOptions {
        pod_resize: false,
        ..Default::default()
    };
    let system = System::start_with_host(&[tenant()], &[], Transport::Plaintext, older_host).await;
    let v = system.virtual_side();
    let requesting = |cpu: &str| json!({"requests": {"cpu": cpu}});
    v.create_pod(&pod(
        "web",
        json!({"containers": [app(json!({"resources": requesting("100m")}))]}),
    ))
    .await;
    wait_host_pod(&system, "web", "default").await;
    resize(&v.pods().await, "web", requesting("200m")).await;
    let message = first_event(v, "web", "SyncError").await;
    assert!(
        message.contains("cannot resize a running pod in place (no pods/resize subresource"),
        "{message}"
    );
    assert_eq!(host_cpu_request(&system, "web").await, "100m");
}

/// Adds the ephemeral container `container` to the virtual Pod `default/name`, as `kubectl debug`
/// does (its `ephemeralcontainers` subresource).
async fn debug(v: &VirtualSide, name: &str, container: Value) {
    v.pods()
        .await
        .patch_subresource(
            "ephemeralcontainers",
            name,
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"ephemeralContainers": [container]}})),
        )
        .await
        .unwrap();
}

/// Whether the Pod's ephemeral container `debugger` is running.
fn debugger_running(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.ephemeral_container_statuses.as_ref())
        .is_some_and(|l| {
            l.iter()
                .any(|c| c.name == "debugger" && c.state.as_ref().is_some_and(|s| s.running.is_some()))
        })
}

/// The cpu the container `app` of the host Pod of `default/name` requests.
async fn host_cpu_request(system: &System, name: &str) -> String {
    let on_host = system
        .host_pods(&system.virtual_side().tenant)
        .await
        .get(&host_name(name, "default"))
        .await
        .unwrap();
    let resources = on_host.spec.unwrap().containers[0].resources.clone().unwrap();
    resources.requests.unwrap()["cpu"].0.clone()
}

/// Resizes the container `app` of Pod `name` in place (`pods/resize`) to `resources`.
async fn resize(pods: &Api<Pod>, name: &str, resources: Value) {
    let patch = json!({"spec": {"containers": [{"name": "app", "resources": resources}]}});
    pods.patch_subresource("resize", name, &PatchParams::default(), &Patch::Strategic(&patch))
        .await
        .unwrap();
}

/// Creates the ResourceQuota `compute` (`requests.cpu: 1`) in the tenant's host namespace; the
/// namespace's quotas.
async fn compute_quota(system: &System) -> Api<ResourceQuota> {
    let quota: ResourceQuota = serde_json::from_value(
        json!({"metadata": {"name": "compute"}, "spec": {"hard": {"requests.cpu": "1"}}}),
    )
    .unwrap();
    let quotas = Api::<ResourceQuota>::namespaced(
        system.host.client().await,
        &system.virtual_side().tenant.host_namespace(),
    );
    quotas.create(&PostParams::default(), &quota).await.unwrap();
    quotas
}

/// Waits until the virtual agent retried `pod`, refused by the host's quota, ahead of its backoff
/// (`when`: what made room, for the failure message).
async fn hastened_quota_retry(v: &VirtualSide, pod: &str, when: &str) {
    let field = format!("pod={pod}");
    eventually(&format!("{pod} retried {when}"), || async {
        v.agent
            .logs()
            .lines()
            .any(|l| {
                l.contains("retrying the Pod the host's quota refused the longest") && l.contains(&field)
            })
            .then_some(())
    })
    .await;
}

/// The virtual agent's `/status` document.
async fn status_of(v: &VirtualSide) -> Option<Value> {
    let admin = format!("http://{}", v.admin);
    let (_, doc) = rcsync_tests::admin_get(&admin, "/status", None, None)
        .await
        .ok()?;
    serde_json::from_str(&doc).ok()
}

/// Waits until the virtual agent's status has `pod` failing (and only it); its reason.
async fn failing_in_status(v: &VirtualSide, pod: &str) -> String {
    eventually(
        &format!("{pod} failing in the virtual agent's status"),
        || async {
            let doc = status_of(v).await?;
            let entry = doc["pods"]["notSynced"]
                .as_array()?
                .iter()
                .find(|p| p["name"] == pod && p["state"] == "failing")?
                .clone();
            (doc["pods"]["failing"] == 1).then(|| entry["reason"].as_str().map(str::to_string))?
        },
    )
    .await
}

/// Waits until no Pod is failing in the virtual agent's status and `synced` are synced.
async fn none_failing_in_status(v: &VirtualSide, synced: u64) {
    eventually("no Pod failing in the virtual agent's status", || async {
        let doc = status_of(v).await?;
        (doc["pods"]["failing"] == 0 && doc["pods"]["synced"] == synced).then_some(())
    })
    .await;
}

/// Nothing is synced before the host agent has listed the tenant's host Pods (a Pod could be
/// created twice otherwise): a Pod made meanwhile says so in the virtual agent's status rather
/// than being absent from it, and syncs once the host agent is back.
#[tokio::test]
async fn a_pod_waiting_for_the_host_agents_list_of_host_pods_says_so_in_the_status() {
    let mut system = system(tenant()).await;
    system.host_agent.signal("KILL");
    system.host_agent.wait_exit().await;
    system.virtuals[0].stop_agent().await;
    system.virtuals[0].spawn_agent();
    let v = system.virtual_side();
    v.create_pod(&pod("early", json!({"containers": [app(json!({}))]})))
        .await;
    let reason = eventually("early waiting in the virtual agent's status", || async {
        let doc = status_of(v).await?;
        let entry = doc["pods"]["notSynced"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == "early")?
            .clone();
        (entry["state"] == "waiting").then(|| entry["reason"].as_str().unwrap_or_default().to_string())
    })
    .await;
    assert!(
        reason.contains("the host agent has not listed the tenant's host Pods yet"),
        "{reason}"
    );
    system.restart_host_agent().await;
    wait_host_pod(&system, "early", "default").await;
    none_failing_in_status(system.virtual_side(), 1).await;
}

#[tokio::test]
async fn a_pod_sync_the_host_api_server_never_answers_ends_after_the_call_timeout_and_is_retried() {
    let mut system = system(tenant()).await;
    system.virtuals[0].set_agent_flag("--host-call-timeout-seconds", "1");
    system.virtuals[0].restart_agent().await;
    // The host API server stops answering the host agent (its connections held open, silent).
    let proxy = system.reroute_host_agent().await;
    let v = system.virtual_side();
    // The restarted host agent has listed the tenant's host Pods (without that list the virtual
    // agent syncs no Pod, and would report none failing): a first Pod reaches the host.
    v.create_pod(&pod("first", json!({"containers": [app(json!({}))]})))
        .await;
    wait_host_pod(&system, "first", "default").await;
    proxy.set(Mode::Stall);
    v.create_pod(&pod("patient", json!({"containers": [app(json!({}))]})))
        .await;
    // Without a deadline the call would wait on the host agent's client (minutes), and the Pods
    // of its shard behind it.
    let reason = failing_in_status(v, "patient").await;
    assert!(
        reason.starts_with("the host agent did not sync the pod to the host (DeadlineExceeded)"),
        "{reason}"
    );
    proxy.set(Mode::Pass);
    wait_host_pod(&system, "patient", "default").await;
    none_failing_in_status(v, 2).await;
}
