//! Messages past gRPC's default 4 MiB: a tenant's whole state arrives in one Sync response however
//! large it is, and a Pod too large for a PodSync call is reported on the Pod, not retried forever.

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use rcsync_tests::eventually;
use rcsync_tests::system::{System, TenantSpec, pod, runtime_class};
use serde_json::json;

/// Enough labeled classes that the tenant's initial state is well past 4 MiB (about 5 MiB).
#[tokio::test]
async fn a_tenant_state_larger_than_a_default_grpc_message_reaches_the_virtual_cluster() {
    const CLASSES: usize = 600;
    let names: Vec<String> = (0..CLASSES).map(|i| format!("class-{i:04}")).collect();
    // 40 labels of about 200 bytes each: keys with a long DNS prefix, values at their 63-byte limit.
    let labels: Vec<(String, String)> = (0..40)
        .map(|l| {
            (
                format!(
                    "{}.example.com/label-{l:02}",
                    "labels-of-a-large-runtime-class".repeat(4)
                ),
                "v".repeat(63),
            )
        })
        .collect();
    let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let classes: Vec<_> = names
        .iter()
        .map(|name| runtime_class(name, "runsc", &labels))
        .collect();
    let system = System::start(&[TenantSpec::new("team-a", "{enabled: true}")], &classes).await;
    let want: Vec<&str> = names.iter().map(String::as_str).collect();
    system.virtual_side().wait_classes(&want).await;
}

/// A Pod whose referenced Secrets take more than one PodSync call may carry.
#[tokio::test]
async fn a_pod_too_large_to_sync_gets_a_sync_error_event_naming_its_size() {
    let system = System::start(&[TenantSpec::new("team-a", "{enabled: true}")], &[]).await;
    let side = system.virtual_side();
    let secrets: kube::Api<Secret> = kube::Api::namespaced(side.cluster.client().await, "default");
    let mut volumes = Vec::new();
    let mut mounts = Vec::new();
    for i in 0..5 {
        let name = format!("blob-{i}");
        let secret: Secret = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        let secret = Secret {
            data: Some([("blob".to_string(), ByteString(vec![b'x'; 900 * 1024]))].into()),
            ..secret
        };
        secrets.create(&PostParams::default(), &secret).await.unwrap();
        volumes.push(json!({"name": name, "secret": {"secretName": name}}));
        mounts.push(json!({"name": name, "mountPath": format!("/blobs/{i}")}));
    }
    let mut large = pod("large", None);
    let spec = large.spec.as_mut().unwrap();
    spec.volumes = Some(serde_json::from_value(json!(volumes)).unwrap());
    spec.containers[0].volume_mounts = Some(serde_json::from_value(json!(mounts)).unwrap());
    side.pods()
        .await
        .create(&PostParams::default(), &large)
        .await
        .unwrap();
    let event = eventually("a SyncError event on pod \"large\" naming its size", || async {
        side.events_of("large").await.into_iter().find(|e| {
            e.message.as_deref().is_some_and(|m| {
                m.starts_with("did not sync pod \"large\" to host: the Pod and the 0 ConfigMaps and 5 Secrets it references take ")
                    && m.ends_with(" bytes, more than a Pod sync may carry (4194304 bytes)")
            })
        })
    })
    .await;
    assert_eq!(event.reason.as_deref(), Some("SyncError"), "{event:?}");
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    let host = system.host_pods(&side.tenant).await;
    assert!(host.list(&Default::default()).await.unwrap().items.is_empty());
}
