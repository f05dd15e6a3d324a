//! A tenant's PersistentVolumeClaims are made on the host when the host's tenants file allows
//! (`sync.toHost.persistentVolumeClaims`), its Pods mount them there, and the host's status shows
//! on the virtual claims. One test per rule, against the real agents; the host provisions claims
//! as a default StorageClass does.

use k8s_openapi::api::core::v1::{Event as CoreEvent, PersistentVolumeClaim, Pod, ResourceQuota};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt as _};
use rcsync_tests::eventually;
use rcsync_tests::system::{System, TenantSpec, Transport, VirtualSide, runtime_class};
use serde_json::{Value, json};

const TENANT: &str = "team-a";

fn tenant(claims: bool) -> TenantSpec {
    TenantSpec::new(TENANT, "{enabled: true}").claims(claims)
}

/// A system whose host has a node (so Pods run) and a default StorageClass (so claims bind).
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

fn host_name(name: &str) -> String {
    format!("{name}-x-default-x-{TENANT}")
}

fn claim(name: &str, extra: Value) -> PersistentVolumeClaim {
    let mut spec = json!({"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}});
    if let (Value::Object(s), Value::Object(e)) = (&mut spec, extra) {
        s.extend(e);
    }
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap()
}

fn db_pod(name: &str, claim: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"runtimeClassName": "gvisor",
                 "containers": [{"name": "db", "image": "registry.example/db:1.0",
                                 "volumeMounts": [{"name": "data", "mountPath": "/var/lib/db"}]}],
                 "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}]},
    }))
    .unwrap()
}

async fn virtual_claims(side: &VirtualSide) -> Api<PersistentVolumeClaim> {
    Api::namespaced(side.cluster.client().await, "default")
}

async fn host_claims(system: &System) -> Api<PersistentVolumeClaim> {
    Api::namespaced(
        system.host.client().await,
        &system.virtual_side().tenant.host_namespace(),
    )
}

async fn create_claim(side: &VirtualSide, claim: &PersistentVolumeClaim) {
    virtual_claims(side)
        .await
        .create(&PostParams::default(), claim)
        .await
        .unwrap();
}

/// The message of the `SyncError` event about `kind` `name`, once there is one.
async fn sync_error(side: &VirtualSide, kind: &str, name: &str) -> String {
    event(side, kind, name, "SyncError")
        .await
        .message
        .unwrap_or_default()
}

/// The event for `reason` about `kind` `name` in the virtual cluster, once there is one.
async fn event(side: &VirtualSide, kind: &str, name: &str, reason: &str) -> CoreEvent {
    let events: Api<CoreEvent> = Api::namespaced(side.cluster.client().await, "default");
    let selector = format!("involvedObject.name={name},involvedObject.kind={kind}");
    eventually(&format!("a {reason} event on {kind} {name}"), || async {
        events
            .list(&ListParams::default().fields(&selector))
            .await
            .ok()?
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some(reason))
    })
    .await
}

/// The host Pod of virtual Pod `name` once it runs.
async fn running_on_host(system: &System, name: &str) -> Pod {
    let host = system.host_pods(&system.virtual_side().tenant).await;
    eventually(&format!("Pod {name} Running on the host"), || async {
        let pod = host.get_opt(&host_name(name)).await.ok()??;
        (pod.status.as_ref()?.phase.as_deref() == Some("Running")).then_some(pod)
    })
    .await
}

/// The virtual claim `name` once the host's status shows on it as Bound.
async fn bound(side: &VirtualSide, name: &str) -> PersistentVolumeClaim {
    let api = virtual_claims(side).await;
    eventually(&format!("virtual claim {name} Bound"), || async {
        let claim = api.get_opt(name).await.ok()??;
        (claim.status.as_ref()?.phase.as_deref() == Some("Bound")).then_some(claim)
    })
    .await
}

#[tokio::test]
async fn a_claim_in_the_virtual_cluster_is_made_on_the_host_and_shows_its_hosts_status() {
    let system = system(&[tenant(true)]).await;
    let side = system.virtual_side();
    create_claim(side, &claim("data", json!({}))).await;
    let virtual_claim = bound(side, "data").await;
    let status = virtual_claim.status.unwrap();
    assert_eq!(status.capacity.unwrap()["storage"].0, "1Gi");
    assert_eq!(status.access_modes.unwrap(), ["ReadWriteOnce"]);

    let host = host_claims(&system).await.get(&host_name("data")).await.unwrap();
    assert_eq!(host.labels()["vcluster.loft.sh/managed-by"], TENANT);
    assert_eq!(
        host.annotations()["vcluster.loft.sh/object-uid"],
        virtual_claim.metadata.uid.unwrap()
    );
    // The host's default StorageClass provisioned it.
    assert_eq!(host.spec.unwrap().storage_class_name.as_deref(), Some("standard"));

    // Grown in the virtual cluster: grown on the host, and the new capacity shows.
    virtual_claims(side)
        .await
        .patch(
            "data",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"resources": {"requests": {"storage": "2Gi"}}}})),
        )
        .await
        .unwrap();
    let api = virtual_claims(side).await;
    eventually("the virtual claim's capacity grown to 2Gi", || async {
        let claim = api.get("data").await.ok()?;
        (claim.status?.capacity?.get("storage")?.0 == "2Gi").then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_pod_mounting_a_claim_runs_on_the_host_against_the_tenants_host_claim() {
    let system = system(&[tenant(true)]).await;
    let side = system.virtual_side();
    // The Pod first, as a StatefulSet's Pod may come before its claim reached the host: it waits.
    side.create_pod(&db_pod("db-0", "data-db-0")).await;
    create_claim(side, &claim("data-db-0", json!({}))).await;
    let pod = running_on_host(&system, "db-0").await;
    let volume = &pod.spec.unwrap().volumes.unwrap()[0];
    assert_eq!(
        volume.persistent_volume_claim.as_ref().unwrap().claim_name,
        host_name("data-db-0")
    );
}

#[tokio::test]
async fn a_claim_of_a_host_class_that_waits_for_its_first_consumer_is_bound_once_its_pod_runs_on_the_host() {
    let system = system(&[tenant(true)]).await;
    // As on most clouds' and kind's default classes: a volume is made where its first Pod runs.
    let class: StorageClass = serde_json::from_value(json!({
        "metadata": {"name": "local"},
        "provisioner": "devcluster.local/hostpath",
        "volumeBindingMode": "WaitForFirstConsumer",
    }))
    .unwrap();
    Api::<StorageClass>::all(system.host.client().await)
        .create(&PostParams::default(), &class)
        .await
        .unwrap();
    let side = system.virtual_side();
    create_claim(side, &claim("data-db-0", json!({"storageClassName": "local"}))).await;
    // Made on the host, where it waits for a Pod; the virtual claim says so (the host's event).
    let waiting = event(side, "PersistentVolumeClaim", "data-db-0", "WaitForFirstConsumer").await;
    assert_eq!(
        waiting.message.as_deref(),
        Some("waiting for first consumer to be created before binding")
    );
    // Its Pod is synced while the claim is unbound (waiting for it would wait forever), runs on
    // the host, and the claim is bound there, and so in the virtual cluster.
    side.create_pod(&db_pod("db-0", "data-db-0")).await;
    running_on_host(&system, "db-0").await;
    bound(side, "data-db-0").await;
}

#[tokio::test]
async fn a_claim_the_host_does_not_make_for_the_tenant_shows_a_sync_error_and_so_do_its_pods() {
    let system = system(&[tenant(false)]).await;
    let side = system.virtual_side();
    create_claim(side, &claim("data", json!({}))).await;
    assert_eq!(
        sync_error(side, "PersistentVolumeClaim", "data").await,
        "the host does not make PersistentVolumeClaims of tenant team-a (sync.toHost.persistentVolumeClaims.enabled \
         is not true in the host agent's tenants file), so pods cannot mount this one"
    );
    side.create_pod(&db_pod("db-0", "data")).await;
    let message = sync_error(side, "Pod", "db-0").await;
    assert!(
        message.contains("volume \"data\": persistentVolumeClaim volumes are not synced to the host"),
        "{message}"
    );
    assert!(
        host_claims(&system)
            .await
            .get_opt(&host_name("data"))
            .await
            .unwrap()
            .is_none()
    );

    // Allowed by the host's operator: the claim is made, and the Pod runs.
    system.rewrite_tenants(&[tenant(true)]);
    bound(side, "data").await;
    let host = system.host_pods(&side.tenant).await;
    eventually("the Pod on the host", || async {
        host.get_opt(&host_name("db-0")).await.ok()?.map(|_| ())
    })
    .await;
}

#[tokio::test]
async fn a_claim_that_would_bind_host_storage_the_tenant_does_not_own_is_refused_with_a_reason() {
    let system = system(&[tenant(true)]).await;
    let side = system.virtual_side();
    create_claim(side, &claim("grab", json!({"volumeName": "pvc-of-another-team"}))).await;
    let message = sync_error(side, "PersistentVolumeClaim", "grab").await;
    assert!(
        message.starts_with("spec.volumeName names a host PersistentVolume, which the tenant does not own"),
        "{message}"
    );
    create_claim(
        side,
        &claim(
            "restore",
            json!({"dataSource": {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "nightly"}}),
        ),
    )
    .await;
    let message = sync_error(side, "PersistentVolumeClaim", "restore").await;
    assert!(
        message.contains("its data source (VolumeSnapshot nightly) would name a host object"),
        "{message}"
    );
    let host = host_claims(&system).await;
    for name in ["grab", "restore"] {
        assert!(host.get_opt(&host_name(name)).await.unwrap().is_none());
    }
}

#[tokio::test]
async fn a_host_claim_rcsync_does_not_manage_is_never_taken_over_nor_mounted() {
    let system = system(&[tenant(true)]).await;
    let side = system.virtual_side();
    // The host's operator made a claim under the host name of the tenant's claim "data".
    let mut theirs = claim(&host_name("data"), json!({}));
    theirs.metadata.labels = Some([("team".to_string(), "platform".to_string())].into());
    host_claims(&system)
        .await
        .create(&PostParams::default(), &theirs)
        .await
        .unwrap();
    create_claim(side, &claim("data", json!({}))).await;
    assert_eq!(
        sync_error(side, "PersistentVolumeClaim", "data").await,
        format!(
            "the host name {:?} is held by a PersistentVolumeClaim rcsync does not manage",
            host_name("data")
        )
    );
    side.create_pod(&db_pod("db-0", "data")).await;
    assert_eq!(
        sync_error(side, "Pod", "db-0").await,
        format!(
            "did not sync pod \"db-0\" to host: host name {:?} is already used by a PersistentVolumeClaim rcsync \
             does not manage",
            host_name("data")
        )
    );
    let host = system.host_pods(&side.tenant).await;
    assert!(host.get_opt(&host_name("db-0")).await.unwrap().is_none());
    let kept = host_claims(&system).await.get(&host_name("data")).await.unwrap();
    assert_eq!(kept.labels().get("team").map(String::as_str), Some("platform"));
}

#[tokio::test]
async fn a_claim_deleted_in_the_virtual_cluster_is_deleted_on_the_host_and_one_deleted_there_is_made_again() {
    let system = system(&[tenant(true)]).await;
    let side = system.virtual_side();
    create_claim(side, &claim("scratch", json!({}))).await;
    create_claim(side, &claim("data", json!({}))).await;
    bound(side, "scratch").await;
    bound(side, "data").await;
    let host = host_claims(&system).await;

    // Deleted on the host by hand while the tenant still has it: made again.
    let first = host.get(&host_name("data")).await.unwrap().metadata.uid;
    host.delete(&host_name("data"), &DeleteParams::default())
        .await
        .unwrap();
    eventually("the host claim made again", || async {
        let again = host.get_opt(&host_name("data")).await.ok()??;
        (again.metadata.uid != first).then_some(())
    })
    .await;

    virtual_claims(side)
        .await
        .delete("scratch", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the host claim gone", || async {
        host.get_opt(&host_name("scratch"))
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
}

/// An ephemeral volume's claim is made in the virtual cluster from the Pod's template (as its
/// controller manager does) and, like every claim of a tenant whose claims the host makes, on the
/// host as its copy: the host Pod mounts that copy, and the host provisions the volume once (left
/// ephemeral on the host, its own controller would make a second claim).
#[tokio::test]
async fn an_ephemeral_volume_mounts_the_host_copy_of_its_virtual_claim_and_is_provisioned_once() {
    let system = system(&[tenant(true)]).await;
    let side = system.virtual_side();
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "job"},
        "spec": {"runtimeClassName": "gvisor",
                 "containers": [{"name": "job", "image": "registry.example/job:1.0",
                                 "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}],
                 "volumes": [{"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec":
                     {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}}}]},
    }))
    .unwrap();
    side.create_pod(&pod).await;
    bound(side, "job-scratch").await;
    let running = running_on_host(&system, "job").await;
    let volume = &running.spec.unwrap().volumes.unwrap()[0];
    assert_eq!(
        volume
            .persistent_volume_claim
            .as_ref()
            .map(|c| c.claim_name.clone()),
        Some(host_name("job-scratch"))
    );
    let made: Vec<String> = host_claims(&system)
        .await
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|c| c.name_any())
        .collect();
    assert_eq!(made, [host_name("job-scratch")], "one claim, one volume");
}

/// A claim deleted while a Pod mounts it is held (`kubernetes.io/pvc-protection`) until no Pod
/// does, in the virtual cluster and on the host alike: the Pod runs on against its host claim, and
/// once it is deleted both claims go, nothing left behind.
#[tokio::test]
async fn a_claim_deleted_while_its_pod_runs_is_kept_until_the_pod_is_gone_and_then_goes_on_both_sides() {
    let system = system(&[tenant(true)]).await;
    let side = system.virtual_side();
    create_claim(side, &claim("data", json!({}))).await;
    let mut pod = db_pod("db", "data");
    // Ends within a second of its deletion on the host (the simulated kubelet takes the whole grace).
    pod.spec.as_mut().unwrap().termination_grace_period_seconds = Some(1);
    side.create_pod(&pod).await;
    running_on_host(&system, "db").await;

    virtual_claims(side)
        .await
        .delete("data", &DeleteParams::default())
        .await
        .unwrap();
    let claims = virtual_claims(side).await;
    eventually("the virtual claim Terminating", || async {
        claims
            .get_opt("data")
            .await
            .ok()??
            .metadata
            .deletion_timestamp
            .map(|_| ())
    })
    .await;
    let host = host_claims(&system).await;
    assert!(
        host.get_opt(&host_name("data")).await.unwrap().is_some(),
        "the host claim stays while the Pod mounts it"
    );
    running_on_host(&system, "db").await;

    side.delete_pod_now("db").await;
    eventually("both claims gone", || async {
        let virtual_gone = claims.get_opt("data").await.ok()?.is_none();
        let host_gone = host.get_opt(&host_name("data")).await.ok()?.is_none();
        (virtual_gone && host_gone).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_claim_past_the_host_namespaces_storage_quota_shows_its_reason_and_is_made_once_there_is_room() {
    let system = system(&[tenant(true)]).await;
    let side = system.virtual_side();
    let quota: ResourceQuota = serde_json::from_value(
        json!({"metadata": {"name": "storage"}, "spec": {"hard": {"requests.storage": "2Gi"}}}),
    )
    .unwrap();
    Api::<ResourceQuota>::namespaced(system.host.client().await, &side.tenant.host_namespace())
        .create(&PostParams::default(), &quota)
        .await
        .unwrap();
    create_claim(side, &claim("first", json!({}))).await;
    bound(side, "first").await;
    create_claim(
        side,
        &claim(
            "second",
            json!({"resources": {"requests": {"storage": "1536Mi"}}}),
        ),
    )
    .await;
    let message = sync_error(side, "PersistentVolumeClaim", "second").await;
    assert!(
        message.starts_with("the host API server refused the PersistentVolumeClaim:")
            && message.contains("exceeded quota: storage, requested: requests.storage=1536Mi, used: requests.storage=1Gi, limited: requests.storage=2Gi"),
        "{message}"
    );
    // The virtual agent's status says which claim is not made, and why.
    let table = side
        .status_table("the claim refused in the status", |t| {
            t.lines()
                .any(|l| l.starts_with("default ") && l.contains(" second ") && l.contains(" refused "))
        })
        .await;
    assert!(
        table.contains("persistent volume claims made on the host: 1"),
        "{table}"
    );
    assert!(table.contains("exceeded quota: storage"), "{table}");
    // Room made on the host: the refused claim is tried again and made, nothing lost.
    virtual_claims(side)
        .await
        .delete("first", &DeleteParams::default())
        .await
        .unwrap();
    bound(side, "second").await;
    side.status_table("only the second claim, made, in the status", |t| {
        t.contains("persistent volume claims made on the host: 1") && !t.contains(" refused ")
    })
    .await;
}

#[tokio::test]
async fn a_claim_the_host_cannot_provision_shows_the_hosts_event_saying_why() {
    let system = system(&[tenant(true)]).await;
    let side = system.virtual_side();
    create_claim(side, &claim("data", json!({"storageClassName": "fast"}))).await;
    // The host's volume controller knows no class "fast": its event reaches the virtual claim,
    // where `kubectl describe pvc` shows it.
    let failed = event(side, "PersistentVolumeClaim", "data", "ProvisioningFailed").await;
    assert_eq!(failed.type_.as_deref(), Some("Warning"));
    assert_eq!(
        failed.message.as_deref(),
        Some("storageclass.storage.k8s.io \"fast\" not found")
    );
    let about = failed.involved_object;
    let virtual_claim = virtual_claims(side).await.get("data").await.unwrap();
    assert_eq!(about.uid, virtual_claim.metadata.uid, "about the virtual claim");
    assert_eq!(
        failed.source.and_then(|s| s.component).as_deref(),
        Some("persistentvolume-controller")
    );
    let host = host_claims(&system).await.get(&host_name("data")).await.unwrap();
    assert_eq!(host.status.and_then(|s| s.phase).as_deref(), Some("Pending"));
}
