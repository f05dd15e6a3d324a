//! The host-agent binary against a devcluster host, driven over real sockets with a tonic client.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use k8s_openapi::api::node::v1::RuntimeClass;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use rcsync_proto::v1::pod_sync_client::PodSyncClient;
use rcsync_proto::v1::runtime_class_sync_client::RuntimeClassSyncClient;
use rcsync_proto::v1::{
    ApplyPodRequest, CheckPodReason, CheckPodRequest, CheckPodResponse, DeletePodRequest, ErrorDetail,
    PodRefusalReason, PodStatusEvent, PodStatusEventType, SyncRequest, SyncResponse, WatchPodStatusRequest,
};
use rcsync_tests::proxy::{FaultyProxy, Mode};
use rcsync_tests::{Cluster, Process, eventually, free_port, http_get, spawn_listening};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Request, Status, Streaming};

const RC: &str = "kubernetes.io/runtime.class";

/// The host classes of the spec's use cases.
fn spec_classes() -> Vec<RuntimeClass> {
    let class = |name: &str, handler: &str, env: &str, rc: &str| -> RuntimeClass {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"environment": env, RC: rc}},
            "handler": handler,
        }))
        .unwrap()
    };
    vec![
        class("gvisor", "runsc", "development", "gvisor"),
        class("youki", "youki", "development", "youki"),
        class("kata", "kata", "development", "kata"),
        class("runc-debug", "runc", "production", "gvisor"),
    ]
}

const TENANTS: &str = r#"
tenants:
  - name: no-selector
    hostNamespace: vc-no-selector
    tokenFile: no-selector.token
    sync: {fromHost: {runtimeClasses: {enabled: true}}}
  - name: match-labels
    hostNamespace: vc-match-labels
    tokenFile: match-labels.token
    sync:
      fromHost:
        runtimeClasses:
          enabled: true
          selector: {matchLabels: {environment: development}}
  - name: match-expressions
    hostNamespace: vc-match-expressions
    tokenFile: match-expressions.token
    sync:
      fromHost:
        runtimeClasses:
          enabled: true
          selector:
            matchExpressions:
              - {key: kubernetes.io/runtime.class, operator: In, values: [gvisor, youki]}
  - name: combined
    hostNamespace: vc-combined
    tokenFile: combined.token
    sync:
      fromHost:
        runtimeClasses:
          enabled: true
          selector:
            matchLabels: {environment: development}
            matchExpressions:
              - {key: kubernetes.io/runtime.class, operator: In, values: [gvisor, youki]}
  - name: disabled
    hostNamespace: vc-disabled
    tokenFile: disabled.token
  - name: open
    hostNamespace: vc-open
    sync: {fromHost: {runtimeClasses: {enabled: true}}}
"#;

fn token(tenant: &str) -> String {
    format!("token-of-{tenant}")
}

struct Host {
    cluster: Cluster,
    agent: Process,
    grpc: String,
    admin: String,
    /// Last, so it outlives the agent whose log is printed on drop when a test fails.
    dir: tempfile::TempDir,
}

impl Host {
    async fn start(tenants: &str, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Cluster::start("host", "RCSYNC_HOST_KUBECONFIG", dir.path()).await;
        let classes: Api<RuntimeClass> = Api::all(cluster.client().await);
        for rc in spec_classes() {
            classes.create(&PostParams::default(), &rc).await.unwrap();
        }
        Self::start_agent(dir, cluster, tenants, extra).await
    }

    async fn start_agent(dir: tempfile::TempDir, cluster: Cluster, tenants: &str, extra: &[&str]) -> Self {
        let config = write_tenants(dir.path(), tenants);
        let program = Path::new(env!("CARGO_BIN_EXE_host-agent"));
        let (agent, addrs, _) = spawn_listening("host-agent", program, dir.path(), 2, "listening", |addrs| {
            let mut args: Vec<String> = vec![
                "--kubeconfig".into(),
                cluster.kubeconfig.display().to_string(),
                "--config".into(),
                config.display().to_string(),
                "--grpc-listen".into(),
                addrs[0].clone(),
                "--admin-listen".into(),
                addrs[1].clone(),
                "--log-level".into(),
                "info,host_agent=debug".into(),
            ];
            args.extend(extra.iter().map(|s| s.to_string()));
            args
        })
        .await;
        let (grpc, admin) = (addrs[0].clone(), addrs[1].clone());
        Self {
            dir,
            cluster,
            agent,
            grpc,
            admin,
        }
    }

    async fn ready(&self) {
        eventually("host-agent /readyz to answer 200", || async {
            http_get(&self.admin, "/readyz")
                .await
                .filter(|(code, _)| *code == 200)
        })
        .await;
    }

    async fn client(&self) -> RuntimeClassSyncClient<Channel> {
        RuntimeClassSyncClient::new(self.channel().await)
    }

    /// A connection to the gRPC port, once it accepts them.
    async fn channel(&self) -> Channel {
        let url = format!("http://{}", self.grpc);
        eventually("the gRPC port to accept connections", || {
            let url = url.clone();
            async move { Channel::from_shared(url).unwrap().connect().await.ok() }
        })
        .await
    }

    async fn classes(&self) -> Api<RuntimeClass> {
        Api::all(self.cluster.client().await)
    }
}

fn write_tenants(dir: &Path, tenants: &str) -> std::path::PathBuf {
    for line in tenants.lines() {
        if let Some(name) = line.trim().strip_prefix("- name: ") {
            std::fs::write(dir.join(format!("{name}.token")), format!("  {}\n", token(name))).unwrap();
        }
    }
    let path = dir.join("tenants.yaml");
    std::fs::write(&path, tenants).unwrap();
    path
}

/// `tenants` with `limits` (YAML flow) set on `tenant`.
fn with_limits(tenants: &str, tenant: &str, limits: &str) -> String {
    let token_line = format!("    tokenFile: {tenant}.token\n");
    assert!(tenants.contains(&token_line), "{tenant} has no token file line");
    tenants.replace(&token_line, &format!("{token_line}    limits: {limits}\n"))
}

/// Whether `tenant` may run a Pod with `runtime_class` (a CheckPod with its token).
async fn allowed_for(
    client: &mut RuntimeClassSyncClient<Channel>,
    tenant: &str,
    runtime_class: &str,
) -> bool {
    let request = CheckPodRequest {
        runtime_class_name: runtime_class.into(),
        ..Default::default()
    };
    client
        .check_pod(with_token(request, tenant))
        .await
        .unwrap()
        .into_inner()
        .allowed
}

fn with_token<T>(message: T, tenant: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", token(tenant)).parse().unwrap(),
    );
    request
}

/// One Sync stream as the virtual side holds it.
struct Stream {
    tx: mpsc::Sender<SyncRequest>,
    rx: Streaming<SyncResponse>,
}

impl Stream {
    /// The request side of a stream, its first request (what the client holds) sent.
    async fn requests(
        initial: HashMap<String, String>,
    ) -> (mpsc::Sender<SyncRequest>, ReceiverStream<SyncRequest>) {
        let (tx, requests) = mpsc::channel(8);
        tx.send(SyncRequest {
            initial_resource_versions: initial,
            ..Default::default()
        })
        .await
        .unwrap();
        (tx, ReceiverStream::new(requests))
    }

    /// A stream over `channel`, identified by the connection alone (its client certificate).
    async fn open_on(channel: Channel, initial: HashMap<String, String>) -> Self {
        let (tx, requests) = Self::requests(initial).await;
        let rx = RuntimeClassSyncClient::new(channel)
            .sync(requests)
            .await
            .unwrap()
            .into_inner();
        Self { tx, rx }
    }

    async fn open(
        client: &mut RuntimeClassSyncClient<Channel>,
        tenant: &str,
        initial: HashMap<String, String>,
    ) -> Self {
        let (tx, requests) = Self::requests(initial).await;
        let rx = client
            .sync(with_token(requests, tenant))
            .await
            .unwrap()
            .into_inner();
        Self { tx, rx }
    }

    async fn next(&mut self) -> SyncResponse {
        tokio::time::timeout(rcsync_tests::DEADLINE, self.rx.message())
            .await
            .expect("a response before the deadline")
            .expect("the stream is healthy")
            .expect("the stream is open")
    }

    async fn ack(&self, response: &SyncResponse) {
        self.tx
            .send(SyncRequest {
                response_nonce: response.nonce.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    async fn nack(&self, response: &SyncResponse, failed: &str) {
        let detail = ErrorDetail {
            message: "the API server refused it".into(),
            resource_errors: HashMap::from([(failed.to_string(), "denied".to_string())]),
        };
        self.tx
            .send(SyncRequest {
                response_nonce: response.nonce.clone(),
                error_detail: Some(detail),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

fn names(response: &SyncResponse) -> BTreeSet<String> {
    response.resources.iter().map(|r| r.name.clone()).collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn every_selector_example_of_the_spec_reaches_its_tenant() {
    let host = Host::start(TENANTS, &[]).await;
    host.ready().await;
    let mut client = host.client().await;
    let cases: &[(&str, &[&str], bool)] = &[
        ("no-selector", &["gvisor", "youki", "kata", "runc-debug"], true),
        ("match-labels", &["gvisor", "youki", "kata"], true),
        ("match-expressions", &["gvisor", "youki", "runc-debug"], true),
        ("combined", &["gvisor", "youki"], true),
        ("disabled", &[], false),
    ];
    for (tenant, want, enabled) in cases {
        let mut stream = Stream::open(&mut client, tenant, HashMap::new()).await;
        let first = stream.next().await;
        assert!(
            first.initial_state_complete,
            "{tenant}: the first response completes the initial state"
        );
        assert_eq!(first.sync_enabled, *enabled, "{tenant}");
        assert_eq!(names(&first), set(want), "{tenant}");
        assert!(first.removed_resources.is_empty());
        let gvisor = first.resources.iter().find(|r| r.name == "gvisor");
        if let Some(gvisor) = gvisor {
            let class = gvisor.runtime_class.as_ref().unwrap();
            assert_eq!(class.handler, "runsc");
            assert_eq!(class.labels["environment"], "development");
            assert_eq!(gvisor.version.len(), 16);
        }
    }
}

#[tokio::test]
async fn host_changes_stream_upserts_and_removals() {
    let host = Host::start(TENANTS, &[]).await;
    host.ready().await;
    let mut client = host.client().await;
    let mut stream = Stream::open(&mut client, "combined", HashMap::new()).await;
    let first = stream.next().await;
    assert_eq!(names(&first), set(&["gvisor", "youki"]));
    stream.ack(&first).await;
    let classes = host.classes().await;

    // A label added that makes kata match.
    let relabel = json!({"metadata": {"labels": {RC: "gvisor"}}});
    classes
        .patch("kata", &PatchParams::default(), &Patch::Merge(&relabel))
        .await
        .unwrap();
    let update = stream.next().await;
    assert!(!update.initial_state_complete);
    assert_eq!(names(&update), set(&["kata"]));
    assert!(update.removed_resources.is_empty());
    stream.ack(&update).await;

    // A label removed: youki stops matching.
    let unlabel = json!({"metadata": {"labels": {"environment": null}}});
    classes
        .patch("youki", &PatchParams::default(), &Patch::Merge(&unlabel))
        .await
        .unwrap();
    let update = stream.next().await;
    assert!(update.resources.is_empty());
    assert_eq!(update.removed_resources, ["youki"]);
    stream.ack(&update).await;

    // A class deleted on the host.
    classes.delete("gvisor", &DeleteParams::default()).await.unwrap();
    let update = stream.next().await;
    assert_eq!(update.removed_resources, ["gvisor"]);
    stream.ack(&update).await;

    // A content change of a synced class is an upsert with a new version.
    let change = json!({"metadata": {"annotations": {"note": "changed"}}});
    classes
        .patch("kata", &PatchParams::default(), &Patch::Merge(&change))
        .await
        .unwrap();
    let update = stream.next().await;
    assert_eq!(names(&update), set(&["kata"]));
    assert_eq!(
        update.resources[0].runtime_class.as_ref().unwrap().annotations["note"],
        "changed"
    );
}

#[tokio::test]
async fn reconnect_sends_only_the_differences() {
    let host = Host::start(TENANTS, &[]).await;
    host.ready().await;
    let mut client = host.client().await;
    let mut stream = Stream::open(&mut client, "match-labels", HashMap::new()).await;
    let first = stream.next().await;
    let versions: HashMap<String, String> = first
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();
    drop(stream);

    // Everything up to date: an empty, complete first response.
    let mut stream = Stream::open(&mut client, "match-labels", versions.clone()).await;
    let again = stream.next().await;
    assert!(again.initial_state_complete);
    assert!(
        again.resources.is_empty() && again.removed_resources.is_empty(),
        "{again:?}"
    );

    // Stale (gvisor), missing (kata) and extra (gone) declarations.
    let mut declared = versions.clone();
    declared.insert("gvisor".into(), "0000000000000000".into());
    declared.remove("kata");
    declared.insert("gone".into(), "1111111111111111".into());
    let mut stream = Stream::open(&mut client, "match-labels", declared).await;
    let diff = stream.next().await;
    assert_eq!(names(&diff), set(&["gvisor", "kata"]));
    assert_eq!(diff.removed_resources, ["gone"]);
    assert_eq!(
        diff.resources
            .iter()
            .find(|r| r.name == "gvisor")
            .unwrap()
            .version,
        versions["gvisor"]
    );
}

#[tokio::test]
async fn a_nacked_resource_is_resent_and_a_slow_client_converges() {
    let host = Host::start(TENANTS, &[]).await;
    host.ready().await;
    let mut client = host.client().await;
    let mut stream = Stream::open(&mut client, "combined", HashMap::new()).await;
    let first = stream.next().await;
    assert_eq!(names(&first), set(&["gvisor", "youki"]));
    stream.nack(&first, "youki").await;
    let retry = stream.next().await;
    // Operators see the tenant's last error and what it is (not) offered.
    let (code, status) = http_get(&host.admin, "/tenants").await.unwrap();
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let combined = status["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "combined")
        .unwrap()
        .clone();
    assert_eq!(combined["lastError"], "the API server refused it");
    assert_eq!(combined["offered"]["gvisor"], "gvisor");
    assert_eq!(combined["notOffered"]["kata"], "does not match the selector");
    assert_eq!(
        names(&retry),
        set(&["youki"]),
        "only the failed resource is resent"
    );
    stream.ack(&retry).await;

    // While a response is outstanding, changes coalesce into the next one.
    let classes = host.classes().await;
    classes
        .patch(
            "kata",
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"labels": {RC: "youki"}}})),
        )
        .await
        .unwrap();
    let outstanding = stream.next().await;
    assert_eq!(names(&outstanding), set(&["kata"]));
    for i in 0..3 {
        let change = json!({"metadata": {"annotations": {"rev": i.to_string()}}});
        classes
            .patch("kata", &PatchParams::default(), &Patch::Merge(&change))
            .await
            .unwrap();
    }
    classes.delete("gvisor", &DeleteParams::default()).await.unwrap();
    stream.ack(&outstanding).await;
    // The client converges to the latest state, however the changes were grouped.
    let mut held: HashMap<String, rcsync_proto::v1::Resource> = first
        .resources
        .iter()
        .chain(&retry.resources)
        .chain(&outstanding.resources)
        .map(|r| (r.name.clone(), r.clone()))
        .collect();
    loop {
        let update = stream.next().await;
        for r in &update.resources {
            held.insert(r.name.clone(), r.clone());
        }
        for name in &update.removed_resources {
            held.remove(name);
        }
        stream.ack(&update).await;
        let kata_rev = held
            .get("kata")
            .and_then(|r| r.runtime_class.as_ref())
            .and_then(|c| c.annotations.get("rev").cloned());
        if kata_rev.as_deref() == Some("2") && !held.contains_key("gvisor") {
            break;
        }
    }
    assert_eq!(
        held.keys().cloned().collect::<BTreeSet<_>>(),
        set(&["kata", "youki"])
    );
}

#[tokio::test]
async fn identities_are_enforced_and_tenants_are_isolated() {
    let host = Host::start(TENANTS, &[]).await;
    host.ready().await;
    let mut client = host.client().await;
    let check = |tenant_token: Option<&str>, header: Option<&str>| {
        let mut request = Request::new(CheckPodRequest {
            pod_namespace: "default".into(),
            pod_name: "p".into(),
            runtime_class_name: "kata".into(),
        });
        if let Some(t) = tenant_token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        if let Some(h) = header {
            request
                .metadata_mut()
                .insert("x-rcsync-tenant", h.parse().unwrap());
        }
        request
    };
    let code = |r: Result<tonic::Response<_>, tonic::Status>| r.err().map(|s| s.code());
    assert_eq!(
        code(client.check_pod(check(Some("wrong"), None)).await),
        Some(Code::Unauthenticated)
    );
    assert_eq!(
        code(client.check_pod(check(None, None)).await),
        Some(Code::Unauthenticated)
    );
    assert_eq!(
        code(client.check_pod(check(None, Some("open"))).await),
        Some(Code::Unauthenticated),
        "no --allow-unauthenticated"
    );
    assert_eq!(
        code(
            client
                .check_pod(check(Some(&token("combined")), Some("match-labels")))
                .await
        ),
        Some(Code::PermissionDenied),
        "the header must match the token's tenant"
    );
    // The same class gets different answers for different tenants.
    let allowed = |tenant: &str| {
        let mut client = client.clone();
        let tenant = tenant.to_string();
        async move {
            client
                .check_pod(check(Some(&token(&tenant)), Some(&tenant)))
                .await
                .unwrap()
                .into_inner()
        }
    };
    let combined = allowed("combined").await;
    assert!(!combined.allowed);
    assert_eq!(combined.reason, CheckPodReason::DoesNotMatch as i32);
    assert_eq!(
        combined.message,
        "did not sync pod \"p\" to host because it does not match the selector under 'sync.fromHost.runtimeClasses.selector'"
    );
    let labels = allowed("match-labels").await;
    assert!(labels.allowed);
    assert_eq!(labels.reason, CheckPodReason::Matches as i32);
}

#[tokio::test]
async fn unauthenticated_tenants_only_with_the_flag() {
    let host = Host::start(TENANTS, &["--allow-unauthenticated"]).await;
    host.ready().await;
    let mut client = host.client().await;
    let mut request = Request::new(CheckPodRequest {
        pod_name: "p".into(),
        runtime_class_name: "x".into(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("x-rcsync-tenant", "open".parse().unwrap());
    let answer = client.check_pod(request).await.unwrap().into_inner();
    assert_eq!(answer.reason, CheckPodReason::NoSelector as i32);
    // A tenant with a token still needs it; an unknown tenant is denied.
    let mut request = Request::new(CheckPodRequest::default());
    request
        .metadata_mut()
        .insert("x-rcsync-tenant", "combined".parse().unwrap());
    assert_eq!(
        client.check_pod(request).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let mut request = Request::new(CheckPodRequest::default());
    request
        .metadata_mut()
        .insert("x-rcsync-tenant", "nobody".parse().unwrap());
    assert_eq!(
        client.check_pod(request).await.unwrap_err().code(),
        Code::PermissionDenied
    );
}

#[tokio::test]
async fn check_pod_answers_every_reason() {
    let host = Host::start(TENANTS, &[]).await;
    host.ready().await;
    let classes = host.classes().await;
    // (Terminating classes are covered by the view's unit tests: devcluster has no finalizers yet.)
    let client = host.client().await;
    let ask = |tenant: &str, rc: &str| {
        let mut client = client.clone();
        let request = with_token(
            CheckPodRequest {
                pod_namespace: "ns".into(),
                pod_name: "my-pod".into(),
                runtime_class_name: rc.into(),
            },
            tenant,
        );
        async move { client.check_pod(request).await.unwrap().into_inner() }
    };
    let reason = |r: &rcsync_proto::v1::CheckPodResponse| CheckPodReason::try_from(r.reason).unwrap();
    assert_eq!(
        reason(&ask("disabled", "kata").await),
        CheckPodReason::SyncDisabled
    );
    assert_eq!(
        reason(&ask("no-selector", "anything").await),
        CheckPodReason::NoSelector
    );
    assert_eq!(
        reason(&ask("combined", "").await),
        CheckPodReason::EmptyRuntimeClassName
    );
    assert_eq!(reason(&ask("combined", "gvisor").await), CheckPodReason::Matches);
    assert_eq!(
        reason(&ask("combined", "kata").await),
        CheckPodReason::DoesNotMatch
    );
    let missing = ask("combined", "missing").await;
    assert_eq!(reason(&missing), CheckPodReason::NotFound);
    assert!(
        missing.message.contains("does not exist on the host"),
        "{}",
        missing.message
    );
    // A decision follows host changes.
    classes.delete("gvisor", &DeleteParams::default()).await.unwrap();
    eventually("CheckPod to see the deletion", || async {
        (reason(&ask("combined", "gvisor").await) == CheckPodReason::NotFound).then_some(())
    })
    .await;
}

#[tokio::test]
async fn readiness_health_and_metrics_follow_the_host_list() {
    // Start the agent against an API server that is not there yet.
    let dir = tempfile::tempdir().unwrap();
    // Known before its API server starts, so no other test's port or connection may take it.
    let port = rcsync_tests::reserved_port();
    let kubeconfig = dir.path().join("host.kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!("apiVersion: v1\nkind: Config\nclusters:\n- name: h\n  cluster:\n    server: http://127.0.0.1:{port}\nusers:\n- name: h\n  user: {{}}\ncontexts:\n- name: h\n  context: {{cluster: h, user: h}}\ncurrent-context: h\n"),
    )
    .unwrap();
    let cluster = Cluster {
        dev: None,
        kubeconfig,
    };
    let health_addr = format!("127.0.0.1:{}", free_port());
    let host = Host::start_agent(dir, cluster, TENANTS, &["--grpc-health-listen", &health_addr]).await;
    let (code, _) = eventually("the admin port", || http_get(&host.admin, "/livez")).await;
    assert_eq!(code, 200, "/livez never depends on the API server");
    let (code, body) = http_get(&host.admin, "/readyz").await.unwrap();
    assert_eq!(code, 503);
    assert!(body.contains("[-]host-runtimeclasses-listed failed"), "{body}");
    let mut client = host.client().await;
    let status = client
        .check_pod(with_token(CheckPodRequest::default(), "combined"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    let health = tonic_health::pb::health_client::HealthClient::new(
        Channel::from_shared(format!("http://{}", host.grpc))
            .unwrap()
            .connect_lazy(),
    );
    let serving = |service: &str| {
        let mut health = health.clone();
        let service = service.to_string();
        async move {
            health
                .check(tonic_health::pb::HealthCheckRequest { service })
                .await
                .map(|r| r.into_inner().status)
                .ok()
        }
    };
    assert_eq!(
        serving("").await,
        Some(tonic_health::pb::health_check_response::ServingStatus::NotServing as i32)
    );

    // The API server arrives: the agent lists and becomes ready.
    let dev = devcluster::DevCluster::start(devcluster::ServerOptions {
        listen: format!("127.0.0.1:{port}").parse().unwrap(),
        insecure_http: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let classes: Api<RuntimeClass> =
        Api::all(kube::Client::try_from(kube::Config::new(dev.url().parse().unwrap())).unwrap());
    classes
        .create(&PostParams::default(), &spec_classes()[0])
        .await
        .unwrap();
    host.ready().await;
    // The plaintext health port (for kubelet's gRPC probe) says the same.
    let probe = tonic_health::pb::health_client::HealthClient::new(
        Channel::from_shared(format!("http://{health_addr}"))
            .unwrap()
            .connect_lazy(),
    );
    eventually("the probe port to say SERVING", || {
        let mut probe = probe.clone();
        async move {
            let answer = probe
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .ok()?;
            (answer.into_inner().status
                == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
                .then_some(())
        }
    })
    .await;
    for service in ["", "rcsync.v1.RuntimeClassSync"] {
        eventually("gRPC health SERVING", || async {
            (serving(service).await
                == Some(tonic_health::pb::health_check_response::ServingStatus::Serving as i32))
            .then_some(())
        })
        .await;
    }
    assert!(allowed_for(&mut client, "combined", "gvisor").await);

    let (code, metrics) = http_get(&host.admin, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    for needle in [
        "rcsync_host_runtime_classes 1",
        "rcsync_tenant_runtime_classes{tenant=\"combined\"} 1",
        "rcsync_check_pod_decisions_total{tenant=\"combined\",reason=\"MATCHES\"} 1",
        "rcsync_grpc_requests_total{method=\"/rcsync.v1.RuntimeClassSync/CheckPod\",code=\"Unavailable\"} 1",
        "rcsync_grpc_request_duration_seconds_bucket",
    ] {
        assert!(metrics.contains(needle), "{needle} missing from:\n{metrics}");
    }
    drop(health);
    dev.shutdown().await;
}

#[tokio::test]
async fn filtered_classes_are_warned_about_once_per_change() {
    let host = Host::start(TENANTS, &[]).await;
    host.ready().await;
    let warning = "did not sync runtime class \"runc-debug\" because it does not match the selector under 'sync.fromHost.runtimeClasses.selector'";
    let count = |logs: &str| {
        logs.lines()
            .filter(|l| l.contains(warning) && l.contains("tenant=combined"))
            .count()
    };
    eventually("the filtered-class warning", || async {
        (count(&host.agent.logs()) == 1).then_some(())
    })
    .await;
    // An unrelated change does not repeat it; a change of the filtered class does.
    let classes = host.classes().await;
    classes
        .patch(
            "gvisor",
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"annotations": {"a": "b"}}})),
        )
        .await
        .unwrap();
    classes
        .patch(
            "runc-debug",
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"labels": {"x": "y"}}})),
        )
        .await
        .unwrap();
    eventually("a second warning after the class changed", || async {
        (count(&host.agent.logs()) == 2).then_some(())
    })
    .await;
    let (_, metrics) = http_get(&host.admin, "/metrics").await.unwrap();
    // kata and runc-debug when first seen, runc-debug again after its change.
    assert!(
        metrics.contains("rcsync_runtime_class_filtered_total{tenant=\"combined\"} 3"),
        "{metrics}"
    );
}

#[tokio::test]
async fn sighup_reloads_tenants_and_streams_the_difference() {
    let host = Host::start(TENANTS, &[]).await;
    host.ready().await;
    let mut client = host.client().await;
    let mut stream = Stream::open(&mut client, "combined", HashMap::new()).await;
    let first = stream.next().await;
    stream.ack(&first).await;
    let config = host.dir.path().join("tenants.yaml");
    std::fs::write(
        &config,
        TENANTS.replace(
            "values: [gvisor, youki]}\n  - name: disabled",
            "values: [kata]}\n  - name: disabled",
        ),
    )
    .unwrap();
    host.agent.signal("HUP");
    let update = stream.next().await;
    assert_eq!(names(&update), set(&["kata"]));
    let removed: BTreeSet<String> = update.removed_resources.iter().cloned().collect();
    assert_eq!(removed, set(&["gvisor", "youki"]));
}

#[tokio::test]
async fn sigterm_ends_streams_and_exits_zero() {
    let mut host = Host::start(TENANTS, &[]).await;
    host.ready().await;
    let mut client = host.client().await;
    let mut stream = Stream::open(&mut client, "combined", HashMap::new()).await;
    stream.next().await;
    let status = host.agent.terminate().await;
    assert!(status.success(), "exit status {status}");
    let end = tokio::time::timeout(Duration::from_secs(5), stream.rx.message())
        .await
        .expect("the stream ends");
    assert!(!matches!(end, Ok(Some(_))), "no more responses after shutdown");
    assert!(host.agent.logs().contains("shutting down"));
}

/// A host agent serving mutual TLS with its own test CA as the client CA (`--client-ca`).
struct MutualTls {
    host: Host,
    pki: devcluster::pki::Pki,
}

impl MutualTls {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = devcluster::pki::Pki::new("rcsync-test-ca").unwrap();
        let server = pki.server(&["localhost", "127.0.0.1"]).unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path.display().to_string()
        };
        let (cert, key, ca) = (
            write("tls.crt", &server.cert_pem),
            write("tls.key", &server.key_pem),
            write("ca.crt", &pki.ca_pem()),
        );
        let cluster = Cluster::start("host", "RCSYNC_HOST_KUBECONFIG", dir.path()).await;
        let classes: Api<RuntimeClass> = Api::all(cluster.client().await);
        for rc in spec_classes() {
            classes.create(&PostParams::default(), &rc).await.unwrap();
        }
        let host = Host::start_agent(
            dir,
            cluster,
            TENANTS,
            &["--tls-cert", &cert, "--tls-key", &key, "--client-ca", &ca],
        )
        .await;
        host.ready().await;
        Self { host, pki }
    }

    /// A connection to the agent, with `identity` (a client certificate of the test CA) when
    /// given; `None` when it cannot be made.
    async fn channel(&self, identity: Option<&devcluster::pki::CertPair>) -> Option<Channel> {
        let mut config = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(self.pki.ca_pem()))
            .domain_name("localhost");
        if let Some(identity) = identity {
            config = config.identity(tonic::transport::Identity::from_pem(
                &identity.cert_pem,
                &identity.key_pem,
            ));
        }
        Channel::from_shared(format!("https://{}", self.host.grpc))
            .unwrap()
            .tls_config(config)
            .unwrap()
            .connect()
            .await
            .ok()
    }

    /// How many gRPC connections the agent has open (`rcsync_grpc_connections`).
    async fn connections(&self) -> u64 {
        let (_, metrics) = http_get(&self.host.admin, "/metrics").await.unwrap();
        metrics
            .lines()
            .find_map(|line| line.strip_prefix("rcsync_grpc_connections "))
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no rcsync_grpc_connections in:\n{metrics}"))
    }

    /// Replaces the client CA file as a Secret volume update does, and waits until the agent
    /// has reloaded it (`applied` is the count of applied TLS reloads then).
    async fn replace_client_ca(&self, pem: &str, applied: u32) {
        let ca = self.host.dir.path().join("ca.crt");
        std::fs::write(ca.with_extension("next"), pem).unwrap();
        std::fs::rename(ca.with_extension("next"), &ca).unwrap();
        let line = format!("rcsync_tls_reloads_total{{result=\"applied\"}} {applied}\n");
        eventually("the client CA to be reloaded", || async {
            let (_, metrics) = http_get(&self.host.admin, "/metrics").await?;
            metrics.contains(&line).then_some(())
        })
        .await;
    }
}

#[tokio::test]
async fn mutual_tls_identifies_the_tenant_by_certificate() {
    let mtls = MutualTls::start().await;
    let client_cert = mtls.pki.client("combined").unwrap();
    let mut client = RuntimeClassSyncClient::new(mtls.channel(Some(&client_cert)).await.unwrap());
    let answer = client
        .check_pod(CheckPodRequest {
            runtime_class_name: "kata".into(),
            pod_name: "p".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        answer.reason,
        CheckPodReason::DoesNotMatch as i32,
        "the certificate's CN names tenant combined"
    );
    let (tx, requests) = mpsc::channel(1);
    tx.send(SyncRequest::default()).await.unwrap();
    let mut rx = client
        .sync(ReceiverStream::new(requests))
        .await
        .unwrap()
        .into_inner();
    let first = rx.message().await.unwrap().unwrap();
    assert_eq!(names(&first), set(&["gvisor", "youki"]));

    // Without a client certificate the handshake fails.
    let refused = async {
        RuntimeClassSyncClient::new(mtls.channel(None).await?)
            .check_pod(CheckPodRequest::default())
            .await
            .ok()
    };
    assert!(
        refused.await.is_none(),
        "mutual TLS requires a client certificate"
    );
}

#[tokio::test]
async fn a_client_certificate_the_reloaded_client_ca_refuses_loses_its_streams_and_connections() {
    let mtls = MutualTls::start().await;
    let client_cert = mtls.pki.client("combined").unwrap();
    let channel = mtls.channel(Some(&client_cert)).await.unwrap();
    let mut stream = Stream::open_on(channel.clone(), HashMap::new()).await;
    let first = stream.next().await;
    assert_eq!(names(&first), set(&["gvisor", "youki"]));
    stream.ack(&first).await;
    let mut statuses = status_stream(channel, Request::new(WatchPodStatusRequest::default())).await;
    // A CA rotation in two steps: the new CA beside the old one accepts the stream still...
    let next_ca = devcluster::pki::Pki::new("rcsync-test-next-ca").unwrap();
    mtls.replace_client_ca(&format!("{}{}", mtls.pki.ca_pem(), next_ca.ca_pem()), 1)
        .await;
    let relabel = json!({"metadata": {"labels": {RC: "gvisor"}}});
    mtls.host
        .classes()
        .await
        .patch("kata", &PatchParams::default(), &Patch::Merge(&relabel))
        .await
        .unwrap();
    let update = stream.next().await;
    assert_eq!(names(&update), set(&["kata"]), "the stream is still open");
    stream.ack(&update).await;
    let check = |mut client: RuntimeClassSyncClient<Channel>| async move {
        client
            .check_pod(CheckPodRequest {
                runtime_class_name: "gvisor".into(),
                pod_name: "p".into(),
                ..Default::default()
            })
            .await
    };
    let unary = RuntimeClassSyncClient::new(mtls.channel(Some(&client_cert)).await.unwrap());
    assert!(check(unary.clone()).await.is_ok());
    let open = mtls.connections().await;
    assert!(open >= 2, "the streams' and the unary calls' connections: {open}");
    // ...and without the old CA the certificate is refused: the streams end, both connections
    // the certificate opened are closed, and it cannot open another.
    mtls.replace_client_ca(&next_ca.ca_pem(), 2).await;
    both_end_unauthenticated(&mut stream, &mut statuses, "no longer accepted by the client CA").await;
    eventually("both connections of the refused certificate to close", || async {
        (mtls.connections().await == open - 2).then_some(())
    })
    .await;
    let (_, metrics) = http_get(&mtls.host.admin, "/metrics").await.unwrap();
    assert!(
        metrics.contains("\nrcsync_grpc_connections_revoked_total 2\n"),
        "{metrics}"
    );
    check(unary)
        .await
        .expect_err("the certificate cannot call any more");
    assert_eq!(
        mtls.connections().await,
        open - 2,
        "no connection was opened again"
    );
}

/// Over mutual TLS the client certificate opens the connection whatever identifies the caller:
/// a caller identified by its token loses its streams when the certificate is refused, with
/// UNAUTHENTICATED, not only when its connection is dropped after the GOAWAY's grace.
#[tokio::test]
async fn a_token_callers_streams_end_once_the_reloaded_client_ca_refuses_its_connections_certificate() {
    let mtls = MutualTls::start().await;
    // A certificate naming no tenant: the bearer token identifies the caller.
    let transport = mtls.pki.client("a-gateway").unwrap();
    let channel = mtls.channel(Some(&transport)).await.unwrap();
    let mut client = RuntimeClassSyncClient::new(channel.clone());
    let mut stream = Stream::open(&mut client, "combined", HashMap::new()).await;
    let first = stream.next().await;
    assert_eq!(names(&first), set(&["gvisor", "youki"]));
    stream.ack(&first).await;
    let mut statuses = status_stream(channel, with_token(WatchPodStatusRequest::default(), "combined")).await;
    let next_ca = devcluster::pki::Pki::new("rcsync-test-next-ca").unwrap();
    mtls.replace_client_ca(&next_ca.ca_pem(), 1).await;
    both_end_unauthenticated(&mut stream, &mut statuses, "no longer accepted by the client CA").await;
}

#[tokio::test]
async fn reflection_is_served_in_v1_and_v1alpha() {
    use tokio_stream::StreamExt as _;
    let host = Host::start(TENANTS, &[]).await;
    host.ready().await;
    let channel = Channel::from_shared(format!("http://{}", host.grpc))
        .unwrap()
        .connect_lazy();
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut v1 =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let mut responses = v1
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(tonic_reflection::pb::v1::server_reflection_response::MessageResponse::ListServicesResponse(
        list,
    )) = response.message_response
    else {
        panic!("unexpected reflection answer {response:?}");
    };
    let services: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in [
        "rcsync.v1.RuntimeClassSync",
        "rcsync.v1.PodSync",
        "grpc.health.v1.Health",
    ] {
        assert!(services.contains(service), "{service} missing from {services:?}");
    }
    let request = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "rcsync.v1.RuntimeClassSync".into(),
            ),
        ),
    };
    let mut v1alpha =
        tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let mut responses = v1alpha
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    assert!(
        matches!(response.message_response, Some(tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(_))),
        "{response:?}"
    );
}

#[tokio::test]
async fn a_changed_tenants_file_is_reloaded_without_a_signal() {
    let host = Host::start(TENANTS, &[]).await;
    host.ready().await;
    let mut client = host.client().await;
    let mut stream = Stream::open(&mut client, "combined", HashMap::new()).await;
    let first = stream.next().await;
    stream.ack(&first).await;
    // Replace the file atomically, as a ConfigMap volume update does.
    let narrowed = TENANTS.replace(
        "values: [gvisor, youki]}\n  - name: disabled",
        "values: [gvisor]}\n  - name: disabled",
    );
    replace_tenants(&host, &narrowed);
    let update = stream.next().await;
    assert_eq!(update.removed_resources, ["youki"]);
    // A broken file is reported and the running config is kept.
    std::fs::write(host.dir.path().join("tenants.yaml"), "tenants: [").unwrap();
    eventually("the reload error in the log", || async {
        host.agent
            .logs()
            .contains("reloading tenants failed; keeping the running config")
            .then_some(())
    })
    .await;
    assert!(allowed_for(&mut client, "combined", "gvisor").await);
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let host = Host::start(TENANTS, &["--log-format", "json"]).await;
    host.ready().await;
    let logs = host.agent.logs();
    let lines: Vec<&str> = logs.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    for line in &lines {
        let entry: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(
            entry["level"].is_string() && entry["timestamp"].is_string(),
            "{line}"
        );
    }
    assert!(
        lines.iter().any(|l| l.contains("listed host RuntimeClasses")),
        "{logs}"
    );
}

#[test]
fn help_documents_every_flag_with_its_env_var() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_host-agent"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for (flag, env) in [
        ("--kubeconfig", "HOST_AGENT_KUBECONFIG"),
        ("--config", "HOST_AGENT_CONFIG"),
        ("--grpc-listen", "HOST_AGENT_GRPC_LISTEN"),
        ("--admin-listen", "HOST_AGENT_ADMIN_LISTEN"),
        ("--tls-cert", "HOST_AGENT_TLS_CERT"),
        ("--client-ca", "HOST_AGENT_CLIENT_CA"),
        ("--allow-unauthenticated", "HOST_AGENT_ALLOW_UNAUTHENTICATED"),
        ("--log-format", "HOST_AGENT_LOG_FORMAT"),
    ] {
        assert!(
            help.contains(flag) && help.contains(env),
            "{flag} / {env} missing from --help:\n{help}"
        );
    }
    // Without --config the agent says what is missing and exits 2.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_host-agent"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config"));
}

const POD_TENANTS: &str = r#"
tenants:
  - name: team-a
    hostNamespace: vc-team-a
    tokenFile: team-a.token
    sync: {fromHost: {runtimeClasses: {enabled: true}}}
"#;

/// A host agent for `POD_TENANTS`, with the tenant's host namespace, and a PodSync client.
async fn pod_host() -> (Host, PodSyncClient<Channel>) {
    let host = Host::start(POD_TENANTS, &[]).await;
    let namespaces: Api<Namespace> = Api::all(host.cluster.client().await);
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "vc-team-a"}})).unwrap(),
        )
        .await
        .unwrap();
    host.ready().await;
    host.client().await;
    let pods = PodSyncClient::new(
        Channel::from_shared(format!("http://{}", host.grpc))
            .unwrap()
            .connect_lazy(),
    );
    (host, pods)
}

fn virtual_pod(namespace: &str, name: &str, uid: &str, spec: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "metadata": {"name": name, "namespace": namespace, "uid": uid},
        "spec": spec
    }))
    .unwrap()
}

fn apply(pod_json: Vec<u8>, config_maps: &[serde_json::Value]) -> Request<ApplyPodRequest> {
    with_token(
        ApplyPodRequest {
            pod_json,
            config_maps_json: config_maps
                .iter()
                .map(|c| serde_json::to_vec(c).unwrap())
                .collect(),
            secrets_json: Vec::new(),
            on_host: false,
        },
        "team-a",
    )
}

#[tokio::test]
async fn apply_pod_re_checks_pod_security_and_names_the_violation() {
    let (host, mut pods) = pod_host().await;
    let privileged =
        json!({"containers": [{"name": "app", "image": "app", "securityContext": {"privileged": true}}]});
    let answer = pods
        .apply_pod(apply(virtual_pod("default", "root", "u-1", privileged), &[]))
        .await
        .unwrap()
        .into_inner();
    assert!(!answer.applied);
    let refusal = answer.refusal.expect("a refusal");
    assert_eq!(refusal.reason, PodRefusalReason::PodSecurity as i32);
    assert_eq!(
        refusal.message,
        r#"violates PodSecurity "baseline:latest": privileged (container "app" must not set securityContext.privileged=true)"#
    );
    let host_pods: Api<Pod> = Api::namespaced(host.cluster.client().await, "vc-team-a");
    assert!(
        host_pods
            .get_opt("root-x-default-x-team-a")
            .await
            .unwrap()
            .is_none()
    );
    let plain = json!({"containers": [{"name": "app", "image": "app"}]});
    let answer = pods
        .apply_pod(apply(virtual_pod("default", "root", "u-1", plain), &[]))
        .await
        .unwrap()
        .into_inner();
    assert!(answer.applied && answer.created && answer.refusal.is_none());
    assert!(
        host_pods
            .get_opt("root-x-default-x-team-a")
            .await
            .unwrap()
            .is_some()
    );
    let metrics = http_get(&host.admin, "/metrics").await.unwrap().1;
    assert!(
        metrics.contains(r#"rcsync_pods_refused_total{tenant="team-a",reason="POD_SECURITY"} 1"#),
        "{metrics}"
    );
}

/// `on_host` is a hint: a Pod said to be on the host but not there is created, and one not said
/// to be there but present is updated (from the create's AlreadyExists).
#[tokio::test]
async fn apply_pod_creates_or_updates_whatever_on_host_says() {
    let (host, mut pods) = pod_host().await;
    let host_pods: Api<Pod> = Api::namespaced(host.cluster.client().await, "vc-team-a");
    let spec = json!({"containers": [{"name": "app", "image": "app:1"}]});
    let mut request = apply(virtual_pod("default", "web", "u-1", spec), &[]);
    request.get_mut().on_host = true;
    let answer = pods.apply_pod(request).await.unwrap().into_inner();
    assert!(answer.applied && answer.created, "{answer:?}");
    let created = host_pods.get("web-x-default-x-team-a").await.unwrap();

    let spec = json!({"containers": [{"name": "app", "image": "app:2"}]});
    let answer = pods
        .apply_pod(apply(virtual_pod("default", "web", "u-1", spec), &[]))
        .await
        .unwrap()
        .into_inner();
    assert!(answer.applied && !answer.created, "{answer:?}");
    let updated = host_pods.get("web-x-default-x-team-a").await.unwrap();
    assert_eq!(updated.metadata.uid, created.metadata.uid);
    assert_eq!(
        updated.spec.unwrap().containers[0].image.as_deref(),
        Some("app:2")
    );
}

#[tokio::test]
async fn apply_pod_copies_only_referenced_objects_owned_by_the_host_pod() {
    let (host, mut pods) = pod_host().await;
    let spec = json!({"containers": [{"name": "app", "image": "app",
        "env": [{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "a"}}}]}]});
    let cfg = json!({"metadata": {"name": "cfg", "namespace": "shop", "labels": {"team": "x"}}, "data": {"a": "1"}});
    let status = pods
        .apply_pod(apply(
            virtual_pod("shop", "web", "u-1", spec.clone()),
            &[json!({"metadata": {"name": "other", "namespace": "shop"}, "data": {}})],
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status
            .message()
            .contains("configmap shop/other is not referenced by pod shop/web"),
        "{status}"
    );
    let status = pods
        .apply_pod(apply(
            virtual_pod("shop", "web", "u-1", spec.clone()),
            &[json!({"metadata": {"name": "cfg", "namespace": "kube-system"}, "data": {}})],
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("not in the pod's namespace"),
        "{status}"
    );

    let answer = pods
        .apply_pod(apply(virtual_pod("shop", "web", "u-1", spec), &[cfg]))
        .await
        .unwrap()
        .into_inner();
    assert!(answer.applied, "{answer:?}");
    let client = host.cluster.client().await;
    let host_pod = Api::<Pod>::namespaced(client.clone(), "vc-team-a")
        .get("web-x-shop-x-team-a")
        .await
        .unwrap();
    let spec = host_pod.spec.clone().unwrap();
    assert_eq!(
        spec.containers[0].env.as_ref().unwrap()[0]
            .value_from
            .as_ref()
            .unwrap()
            .config_map_key_ref
            .as_ref()
            .unwrap()
            .name,
        "cfg-x-shop-x-team-a"
    );
    assert!(
        spec.scheduling_gates.unwrap_or_default().is_empty(),
        "the gate is lifted once the copies exist"
    );
    let copy = Api::<ConfigMap>::namespaced(client, "vc-team-a")
        .get("cfg-x-shop-x-team-a")
        .await
        .unwrap();
    assert_eq!(copy.data.unwrap()["a"], "1");
    assert!(!copy.metadata.labels.unwrap().contains_key("team"));
    let owners = copy.metadata.owner_references.unwrap();
    assert_eq!(owners.len(), 1);
    assert_eq!(Some(&owners[0].uid), host_pod.metadata.uid.as_ref());
}

#[tokio::test]
async fn a_host_name_held_by_another_pod_is_never_taken_over() {
    let (host, mut pods) = pod_host().await;
    let spec = json!({"containers": [{"name": "app", "image": "app"}]});
    // `c/a-x-b` and `b-x-c/a` both translate to `a-x-b-x-c-x-team-a`.
    let first = pods
        .apply_pod(apply(virtual_pod("c", "a-x-b", "u-1", spec.clone()), &[]))
        .await
        .unwrap()
        .into_inner();
    assert!(first.applied && first.host_name == "a-x-b-x-c-x-team-a");
    let host_pods: Api<Pod> = Api::namespaced(host.cluster.client().await, "vc-team-a");
    let before = host_pods.get("a-x-b-x-c-x-team-a").await.unwrap().metadata.uid;
    let second = pods
        .apply_pod(apply(virtual_pod("b-x-c", "a", "u-2", spec), &[]))
        .await
        .unwrap()
        .into_inner();
    assert!(!second.applied);
    let refusal = second.refusal.expect("refused");
    assert_eq!(refusal.reason, PodRefusalReason::NameInUse as i32);
    assert_eq!(
        refusal.message,
        r#"host name "a-x-b-x-c-x-team-a" is already used by pod c/a-x-b"#
    );
    let after = host_pods.get("a-x-b-x-c-x-team-a").await.unwrap().metadata.uid;
    assert_eq!(before, after, "the first Pod's host Pod is untouched");
    // Deleting as the second Pod does not touch the first one's host Pod either.
    let deleted = pods
        .delete_pod(with_token(
            DeletePodRequest {
                pod_namespace: "b-x-c".into(),
                pod_name: "a".into(),
                pod_uid: "u-2".into(),
                grace_period_seconds: None,
            },
            "team-a",
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!deleted.deleted);
    assert!(host_pods.get_opt("a-x-b-x-c-x-team-a").await.unwrap().is_some());
}

#[tokio::test]
async fn a_copy_name_held_by_another_object_is_never_taken_over() {
    let (host, mut pods) = pod_host().await;
    let client = host.cluster.client().await;
    let host_maps: Api<ConfigMap> = Api::namespaced(client.clone(), "vc-team-a");
    // An object of the host's own under a translated name: never read, never changed.
    host_maps
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": "cfg-x-shop-x-team-a"}, "data": {"owner": "host"}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    let uses = |name: &str| {
        json!({"containers": [{"name": "app", "image": "app",
            "envFrom": [{"configMapRef": {"name": name}}]}]})
    };
    let answer = pods
        .apply_pod(apply(
            virtual_pod("shop", "web", "u-1", uses("cfg")),
            &[json!({"metadata": {"name": "cfg", "namespace": "shop"}, "data": {"owner": "tenant"}})],
        ))
        .await
        .unwrap()
        .into_inner();
    let refusal = answer.refusal.expect("refused");
    assert_eq!(refusal.reason, PodRefusalReason::NameInUse as i32);
    assert_eq!(
        refusal.message,
        r#"host name "cfg-x-shop-x-team-a" is already used by a configmap rcsync does not manage"#
    );
    let kept = host_maps.get("cfg-x-shop-x-team-a").await.unwrap();
    assert_eq!(kept.data.unwrap()["owner"], "host");
    let host_pods: Api<Pod> = Api::namespaced(client, "vc-team-a");
    assert!(host_pods.get_opt("web-x-shop-x-team-a").await.unwrap().is_none());

    // Two virtual ConfigMaps whose names translate alike: the first keeps its copy.
    let first = pods
        .apply_pod(apply(
            virtual_pod("c", "one", "u-2", uses("a-x-b")),
            &[json!({"metadata": {"name": "a-x-b", "namespace": "c"}, "data": {"v": "1"}})],
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(first.applied, "{first:?}");
    let second = pods
        .apply_pod(apply(
            virtual_pod("b-x-c", "two", "u-3", uses("a")),
            &[json!({"metadata": {"name": "a", "namespace": "b-x-c"}, "data": {"v": "2"}})],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        second.refusal.expect("refused").message,
        r#"host name "a-x-b-x-c-x-team-a" is already used by configmap c/a-x-b"#
    );
    assert_eq!(
        host_maps.get("a-x-b-x-c-x-team-a").await.unwrap().data.unwrap()["v"],
        "1"
    );
}

#[tokio::test]
async fn an_unchanged_reload_rebuilds_no_view() {
    let host = Host::start(TENANTS, &[]).await;
    host.ready().await;
    let rebuilds = || async {
        let (_, metrics) = http_get(&host.admin, "/metrics").await.unwrap();
        metrics
            .lines()
            .find(|l| l.starts_with("rcsync_view_rebuilds_total "))
            .and_then(|l| l.split_whitespace().last()?.parse::<u64>().ok())
            .expect("rcsync_view_rebuilds_total is exported")
    };
    let before = rebuilds().await;
    host.agent.signal("HUP");
    eventually("the re-read to be logged", || async {
        host.agent
            .logs()
            .contains("tenants file re-read: nothing changed")
            .then_some(())
    })
    .await;
    assert_eq!(rebuilds().await, before, "no view was rebuilt");
    // A one-tenant change rebuilds that tenant's view only.
    let config = host.dir.path().join("tenants.yaml");
    std::fs::write(
        &config,
        TENANTS.replace(
            "values: [gvisor, youki]}\n  - name: disabled",
            "values: [kata]}\n  - name: disabled",
        ),
    )
    .unwrap();
    eventually("one rebuild for the changed tenant", || async {
        (rebuilds().await == before + 1).then_some(())
    })
    .await;
}

#[tokio::test]
async fn tenant_limits_refuse_extra_streams_and_pod_sync_bursts_but_never_check_pod() {
    let tenants = with_limits(
        POD_TENANTS,
        "team-a",
        "{syncStreams: 1, podStatusStreams: 1, podSyncQps: 1, podSyncBurst: 2}",
    );
    let host = Host::start(&tenants, &[]).await;
    host.ready().await;
    let mut client = host.client().await;
    let _first = Stream::open(&mut client, "team-a", HashMap::new()).await;
    let (_tx, rx) = mpsc::channel::<SyncRequest>(1);
    let refused = client
        .sync(with_token(ReceiverStream::new(rx), "team-a"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert_eq!(
        refused.message(),
        "tenant team-a already has 1 Sync streams open (limits.syncStreams: 1)"
    );
    // CheckPod is answered from memory and never limited.
    for _ in 0..50 {
        assert!(allowed_for(&mut client, "team-a", "gvisor").await);
    }
    let mut pods = PodSyncClient::new(
        Channel::from_shared(format!("http://{}", host.grpc))
            .unwrap()
            .connect_lazy(),
    );
    let delete = |name: &str| {
        with_token(
            DeletePodRequest {
                pod_namespace: "default".into(),
                pod_name: name.into(),
                pod_uid: "u".into(),
                grace_period_seconds: None,
            },
            "team-a",
        )
    };
    pods.delete_pod(delete("a")).await.unwrap();
    pods.delete_pod(delete("b")).await.unwrap();
    let limited = pods.delete_pod(delete("c")).await.unwrap_err();
    assert_eq!(limited.code(), Code::ResourceExhausted);
    assert!(
        limited.message().contains("limits.podSyncQps: 1"),
        "{}",
        limited.message()
    );
    let retry = host_agent::grpc::limits::retry_delay(&limited).expect("RetryInfo");
    assert!(retry <= Duration::from_secs(1), "{retry:?}");
    let (_, metrics) = http_get(&host.admin, "/metrics").await.unwrap();
    for limit in ["syncStreams", "podSyncQps"] {
        assert!(
            metrics.contains(&format!(
                "rcsync_limit_rejections_total{{tenant=\"team-a\",limit=\"{limit}\"}} 1"
            )),
            "{metrics}"
        );
    }
}

fn status_command(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_host-agent"))
        .arg("status")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test]
async fn the_status_command_prints_tenants_and_classes_and_exits_by_readiness() {
    let host = Host::start(TENANTS, &[]).await;
    host.ready().await;
    let mut client = host.client().await;
    let mut stream = Stream::open(&mut client, "combined", HashMap::new()).await;
    let first = stream.next().await;
    stream.ack(&first).await;
    let admin = format!("http://{}", host.admin);
    let (code, stdout, stderr) = eventually("the ACK to show in status", || {
        let admin = admin.clone();
        async move {
            let result = status_command(&["--admin", &admin]);
            result
                .1
                .lines()
                .any(|l| l.starts_with("combined ") && l.contains(" 1 ") && !l.contains("<never>"))
                .then_some(result)
        }
    })
    .await;
    assert_eq!(code, 0, "{stderr}");
    let header = stdout.lines().next().unwrap();
    for column in [
        "TENANT",
        "SYNC",
        "SELECTOR",
        "OFFERED",
        "FILTERED",
        "STREAMS",
        "LAST-ACK",
        "LAST-NACK",
    ] {
        assert!(header.contains(column), "{header}");
    }
    let combined = stdout.lines().find(|l| l.starts_with("combined ")).unwrap();
    let cells: Vec<&str> = combined.split_whitespace().collect();
    assert_eq!(cells[1], "enabled");
    assert!(
        combined.contains("environment=development,kubernetes.io/runtime.class in (gvisor,youki)"),
        "{combined}"
    );
    let disabled = stdout.lines().find(|l| l.starts_with("disabled ")).unwrap();
    assert!(
        disabled.contains("disabled") && disabled.contains("<never>"),
        "{disabled}"
    );

    let (code, stdout, _) = status_command(&["--admin", &admin, "--tenant", "combined"]);
    assert_eq!(code, 0);
    let gvisor = stdout.lines().find(|l| l.starts_with("gvisor ")).unwrap();
    assert!(
        gvisor.contains("offered") && gvisor.contains("as gvisor"),
        "{stdout}"
    );
    let kata = stdout.lines().find(|l| l.starts_with("kata ")).unwrap();
    assert!(
        kata.contains("not offered") && kata.contains("does not match the selector"),
        "{stdout}"
    );

    let (code, stdout, _) = status_command(&["--admin", &admin, "-o", "json"]);
    assert_eq!(code, 0);
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(doc["synced"], true);
    let (code, stdout, _) = status_command(&["--admin", &admin, "--tenant", "combined", "-o", "yaml"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("name: combined"), "{stdout}");
    let (code, _, stderr) = status_command(&["--admin", &admin, "--tenant", "nobody"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("no tenant \"nobody\""), "{stderr}");

    // Unreachable: exit 2.
    let (code, _, stderr) = status_command(&["--admin", &format!("http://127.0.0.1:{}", free_port())]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("unreachable"), "{stderr}");

    // Not ready (its API server is gone): exit 1, with the failing check.
    drop(stream);
    let config = write_tenants(host.dir.path(), TENANTS);
    let mut dead = std::fs::read_to_string(&host.cluster.kubeconfig).unwrap();
    let port = host
        .cluster
        .dev
        .as_ref()
        .unwrap()
        .url()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    dead = dead.replace(&format!(":{port}"), &format!(":{}", free_port()));
    let kubeconfig = host.dir.path().join("dead.kubeconfig");
    std::fs::write(&kubeconfig, dead).unwrap();
    let (_agent, addrs, _) = spawn_listening(
        "host-agent-not-ready",
        Path::new(env!("CARGO_BIN_EXE_host-agent")),
        host.dir.path(),
        2,
        "listening",
        |addrs| {
            vec![
                "--kubeconfig".into(),
                kubeconfig.display().to_string(),
                "--config".into(),
                config.display().to_string(),
                "--grpc-listen".into(),
                addrs[0].clone(),
                "--admin-listen".into(),
                addrs[1].clone(),
            ]
        },
    )
    .await;
    let (code, _, stderr) = status_command(&["--admin", &format!("http://{}", addrs[1])]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("not ready"), "{stderr}");
}

/// A port already in use is a clear error and exit code 1, never a panic (the Sync streams'
/// runtime used to be dropped inside async code on this path, and the process aborted).
#[tokio::test]
async fn a_grpc_port_in_use_is_a_clear_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start("host", "RCSYNC_HOST_KUBECONFIG", dir.path()).await;
    let config = write_tenants(dir.path(), "tenants: []\n");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_host-agent"))
        .args(["--kubeconfig", &cluster.kubeconfig.display().to_string()])
        .args(["--config", &config.display().to_string()])
        .args(["--grpc-listen", &port, "--admin-listen", "127.0.0.1:0"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!("binding the gRPC address {port}")),
        "{stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stdout.contains("panicked"),
        "{stdout}{stderr}"
    );
}

/// A tenant's Sync stream (its initial state acknowledged) and WatchPodStatus stream (at its
/// initial state), both opened with its token.
async fn open_streams(host: &Host, tenant: &str) -> (Stream, Streaming<PodStatusEvent>) {
    let mut client = host.client().await;
    let mut stream = Stream::open(&mut client, tenant, HashMap::new()).await;
    let first = stream.next().await;
    assert!(first.initial_state_complete);
    stream.ack(&first).await;
    let statuses = status_stream(
        host.channel().await,
        with_token(WatchPodStatusRequest::default(), tenant),
    )
    .await;
    (stream, statuses)
}

/// A WatchPodStatus stream over `channel`, at its initial state.
async fn status_stream(
    channel: Channel,
    request: Request<WatchPodStatusRequest>,
) -> Streaming<PodStatusEvent> {
    let mut statuses = PodSyncClient::new(channel)
        .watch_pod_status(request)
        .await
        .unwrap()
        .into_inner();
    let complete = tokio::time::timeout(rcsync_tests::DEADLINE, statuses.message())
        .await
        .expect("the status stream's initial state")
        .unwrap()
        .unwrap();
    assert_eq!(complete.r#type(), PodStatusEventType::InitialStateComplete);
    statuses
}

/// The status a stream ends with (in its trailers, not a transport error), before the deadline.
async fn end_of<T: std::fmt::Debug>(stream: &mut Streaming<T>, what: &str) -> Status {
    tokio::time::timeout(rcsync_tests::DEADLINE, stream.message())
        .await
        .unwrap_or_else(|_| panic!("the {what} stream ends before the deadline"))
        .expect_err("the stream ends with a status")
}

/// Waits for a tenant's Sync and WatchPodStatus streams both to end with UNAUTHENTICATED, each
/// saying `why`.
async fn both_end_unauthenticated(stream: &mut Stream, statuses: &mut Streaming<PodStatusEvent>, why: &str) {
    for (ended, what) in [
        (end_of(&mut stream.rx, "sync").await, "sync"),
        (end_of(statuses, "status").await, "status"),
    ] {
        assert_eq!(ended.code(), Code::Unauthenticated, "{what}: {ended:?}");
        assert!(ended.message().contains(why), "{what}: {ended:?}");
    }
}

/// Replaces the host agent's tenants file the way an editor or a ConfigMap update does.
fn replace_tenants(host: &Host, tenants: &str) {
    let staged = host.dir.path().join("tenants.yaml.new");
    std::fs::write(&staged, tenants).unwrap();
    std::fs::rename(&staged, host.dir.path().join("tenants.yaml")).unwrap();
}

#[tokio::test]
async fn a_tenant_removed_from_the_config_has_its_open_streams_ended_with_permission_denied() {
    let host = Host::start(TENANTS, &[]).await;
    host.ready().await;
    let mut client = host.client().await;
    // Its Pod status stream too (it watches the tenant's host namespace).
    let (mut stream, mut statuses) = open_streams(&host, "no-selector").await;
    let without = TENANTS.replace(
        "  - name: no-selector\n    hostNamespace: vc-no-selector\n    tokenFile: no-selector.token\n    sync: {fromHost: {runtimeClasses: {enabled: true}}}\n",
        "",
    );
    assert_ne!(without, TENANTS);
    replace_tenants(&host, &without);
    let ended = end_of(&mut stream.rx, "sync").await;
    assert_eq!(ended.code(), Code::PermissionDenied, "{ended:?}");
    assert!(ended.message().contains("removed"), "{ended:?}");
    // Its access is revoked: the status stream of its host namespace ends the same way.
    let ended = end_of(&mut statuses, "status").await;
    assert_eq!(ended.code(), Code::PermissionDenied, "{ended:?}");
    assert_eq!(
        ended.message(),
        "the tenant was removed from the host agent's config"
    );
    // A new stream for the removed tenant is refused too.
    let (_tx, requests) = mpsc::channel::<SyncRequest>(1);
    let refused = client
        .sync(with_token(ReceiverStream::new(requests), "no-selector"))
        .await
        .expect_err("a removed tenant cannot open a stream");
    assert!(
        matches!(refused.code(), Code::PermissionDenied | Code::Unauthenticated),
        "{refused:?}"
    );
    // Its series are gone from /metrics (a stream gauge at 0 would keep its not-connected alert
    // firing); the other tenants' stay.
    let metrics = eventually("the removed tenant's series to go", || async {
        let (_, metrics) = http_get(&host.admin, "/metrics").await?;
        (!metrics.contains("tenant=\"no-selector\"")).then_some(metrics)
    })
    .await;
    assert!(
        metrics.contains("rcsync_sync_streams_open{tenant=\"combined\"} 0"),
        "{metrics}"
    );
}

/// Whether `token` is accepted (a CheckPod with it succeeds).
async fn accepted(client: &mut RuntimeClassSyncClient<Channel>, token: &str) -> bool {
    let mut request = Request::new(CheckPodRequest {
        pod_name: "web".into(),
        runtime_class_name: "gvisor".into(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    client.check_pod(request).await.is_ok()
}

#[tokio::test]
async fn a_token_rotates_without_an_outage_and_streams_of_a_removed_token_end() {
    let host = Host::start(TENANTS, &[]).await;
    host.ready().await;
    let mut client = host.client().await;
    let (mut stream, mut statuses) = open_streams(&host, "no-selector").await;
    let (mut other, _other_statuses) = open_streams(&host, "combined").await;
    // The token file is replaced as a Secret volume update does.
    let token_file = host.dir.path().join("no-selector.token");
    let replace_token = |text: &str| {
        std::fs::write(token_file.with_extension("next"), text).unwrap();
        std::fs::rename(token_file.with_extension("next"), &token_file).unwrap();
    };
    // The new token as a second line: both are accepted, and the open streams go on.
    replace_token(&format!("{}\na-rotated-token\n", token("no-selector")));
    eventually("the new token to be accepted", || {
        let mut client = client.clone();
        async move { accepted(&mut client, "a-rotated-token").await.then_some(()) }
    })
    .await;
    assert!(accepted(&mut client, &token("no-selector")).await);
    let classes = host.classes().await;
    let mut late = spec_classes().remove(0);
    late.metadata.name = Some("late".into());
    classes.create(&PostParams::default(), &late).await.unwrap();
    assert_eq!(
        names(&stream.next().await),
        set(&["late"]),
        "the stream is still open"
    );
    let update = other.next().await;
    assert_eq!(names(&update), set(&["late"]));
    other.ack(&update).await;
    // The old line removed: what was opened with it ends; the other tenant's stream stays.
    replace_token("a-rotated-token\n");
    both_end_unauthenticated(&mut stream, &mut statuses, "open it again with the current token").await;
    assert!(!accepted(&mut client, &token("no-selector")).await);
    let (_tx, requests) = mpsc::channel::<SyncRequest>(1);
    let refused = client
        .sync(with_token(ReceiverStream::new(requests), "no-selector"))
        .await
        .expect_err("the old token is refused");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(accepted(&mut client, "a-rotated-token").await);
    classes.delete("late", &DeleteParams::default()).await.unwrap();
    assert_eq!(other.next().await.removed_resources, ["late"]);
}

#[tokio::test]
async fn a_compressed_sync_stream_is_refused_naming_the_encoding() {
    let host = Host::start(TENANTS, &[]).await;
    host.ready().await;
    let mut client = host.client().await;
    let (_tx, requests) = mpsc::channel::<SyncRequest>(1);
    let mut request = with_token(ReceiverStream::new(requests), "no-selector");
    request
        .metadata_mut()
        .insert("grpc-encoding", "gzip".parse().unwrap());
    let refused = client
        .sync(request)
        .await
        .expect_err("the server accepts only uncompressed messages");
    assert_eq!(refused.code(), Code::Unimplemented, "{refused:?}");
    assert_eq!(
        refused.message(),
        "grpc-encoding gzip is not supported by this server (it accepts identity)"
    );
}

#[tokio::test]
async fn a_call_with_a_malformed_deadline_is_refused_naming_the_header() {
    let host = Host::start(TENANTS, &[]).await;
    host.ready().await;
    let mut client = host.client().await;
    let mut request = with_token(
        CheckPodRequest {
            pod_name: "p".into(),
            runtime_class_name: "gvisor".into(),
            ..Default::default()
        },
        "no-selector",
    );
    // The unit must be one of H, M, S, m, u, n: "5s" is not a gRPC deadline.
    request
        .metadata_mut()
        .insert("grpc-timeout", "5s".parse().unwrap());
    let refused = client
        .check_pod(request)
        .await
        .expect_err("a deadline that does not parse is refused");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert_eq!(refused.message(), "invalid grpc-timeout header \"5s\"");
}

#[tokio::test]
async fn a_caller_without_valid_credentials_is_refused_before_its_message_arrives() {
    let host = Host::start(TENANTS, &[]).await;
    host.ready().await;
    let channel = host.channel().await;
    // Each call sends its headers and then nothing: a server that read the body before checking
    // the credentials would wait for a message (up to 4 MiB of it) that never comes.
    let paths = [
        "/rcsync.v1.RuntimeClassSync/CheckPod",
        "/rcsync.v1.RuntimeClassSync/Sync",
        "/rcsync.v1.PodSync/ApplyPod",
        "/rcsync.v1.PodSync/DeletePod",
        "/rcsync.v1.PodSync/WatchPodStatus",
    ];
    for path in paths {
        for credentials in [Some("Bearer not-a-token"), None] {
            let mut grpc = tonic::client::Grpc::new(channel.clone());
            grpc.ready().await.unwrap();
            let mut request = Request::new(futures::stream::pending::<CheckPodRequest>());
            if let Some(value) = credentials {
                request
                    .metadata_mut()
                    .insert("authorization", value.parse().unwrap());
            }
            let codec = tonic_prost::ProstCodec::<CheckPodRequest, CheckPodResponse>::default();
            let call = grpc.streaming(request, http::uri::PathAndQuery::from_static(path), codec);
            let refused = tokio::time::timeout(rcsync_tests::DEADLINE, call)
                .await
                .unwrap_or_else(|_| panic!("{path} ({credentials:?}): no answer before the deadline; the server waited for the message"))
                .expect_err("a caller without valid credentials is refused");
            assert_eq!(refused.code(), Code::Unauthenticated, "{path}: {refused:?}");
            let message = match credentials {
                Some(_) => "invalid bearer token",
                None => "missing credentials: send `authorization: Bearer <token>` or a client certificate",
            };
            assert_eq!(refused.message(), message, "{path}");
        }
    }
    // Refused before their handlers ran, and counted as the handlers count calls.
    let (_, metrics) = http_get(&host.admin, "/metrics").await.unwrap();
    for path in paths {
        let series = format!("rcsync_grpc_requests_total{{method=\"{path}\",code=\"Unauthenticated\"}} 2");
        assert!(metrics.contains(&series), "{series} in {metrics}");
    }
}

/// A DeletePod of `tenant` for a Pod that was never there (it succeeds, deleting nothing).
fn delete_gone_pod(tenant: &str) -> Request<DeletePodRequest> {
    with_token(
        DeletePodRequest {
            pod_namespace: "default".into(),
            pod_name: "gone".into(),
            pod_uid: "u".into(),
            grace_period_seconds: None,
        },
        tenant,
    )
}

/// Starts an ApplyPod of `tenant` that sends its headers and never its message; answers what the
/// server said before `within`, or None while it waits for the message.
async fn stalled_apply_pod(channel: &Channel, tenant: &str, within: Duration) -> Option<tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let request = with_token(futures::stream::pending::<ApplyPodRequest>(), tenant);
    let codec = tonic_prost::ProstCodec::<ApplyPodRequest, CheckPodResponse>::default();
    let path = http::uri::PathAndQuery::from_static("/rcsync.v1.PodSync/ApplyPod");
    match tokio::time::timeout(within, grpc.streaming(request, path, codec)).await {
        Ok(answer) => Some(answer.expect_err("a call without its message is not answered with one")),
        Err(_) => None,
    }
}

#[tokio::test]
async fn a_tenants_open_pod_sync_calls_are_limited_before_their_messages_arrive() {
    let tenants = with_limits(POD_TENANTS, "team-a", "{podSyncInFlight: 2}");
    let host = Host::start(&tenants, &[]).await;
    host.ready().await;
    let channel = host.channel().await;
    // Two calls hold the tenant's places while their messages never come (each tries again when
    // the probe below took its place first; the probe's calls give theirs back after a second).
    let held: Vec<_> = (0..2)
        .map(|_| {
            let channel = channel.clone();
            tokio::spawn(async move {
                while stalled_apply_pod(&channel, "team-a", Duration::from_secs(3600))
                    .await
                    .is_some()
                {}
            })
        })
        .collect();
    let refused = eventually("a third open ApplyPod to be refused", || async {
        stalled_apply_pod(&channel, "team-a", Duration::from_secs(1)).await
    })
    .await;
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(
        refused.message(),
        "tenant team-a already has 2 ApplyPod/DeletePod calls open (limits.podSyncInFlight: 2)"
    );
    let (_, metrics) = http_get(&host.admin, "/metrics").await.unwrap();
    assert!(
        metrics.contains("rcsync_limit_rejections_total{tenant=\"team-a\",limit=\"podSyncInFlight\"}"),
        "{metrics}"
    );
    // A call that ends (here: cancelled) gives its place back.
    held[0].abort();
    let pods = PodSyncClient::new(channel);
    eventually("a DeletePod once a place is free", || {
        let mut pods = pods.clone();
        async move { pods.delete_pod(delete_gone_pod("team-a")).await.ok() }
    })
    .await;
    held[1].abort();
}

/// An ApplyPod that sends part of its message and then nothing: the call lasts until `task` is
/// aborted (its connection closes with it); `answer` gets the agent's `grpc-status` and
/// `grpc-message` if it answers first.
struct PartialCall {
    task: tokio::task::JoinHandle<()>,
    answer: tokio::sync::oneshot::Receiver<(String, String)>,
}

impl PartialCall {
    /// The call's `grpc-status` and decoded `grpc-message`, once the agent answers (within the
    /// test deadline).
    async fn answered(&mut self) -> (String, String) {
        let (status, message) = tokio::time::timeout(rcsync_tests::DEADLINE, &mut self.answer)
            .await
            .expect("the agent answers the call before the deadline")
            .expect("an answer");
        (status, percent_decoded(&message))
    }
}

/// Starts an ApplyPod of `tenant` over its own HTTP/2 connection that announces a message of
/// `declared` bytes, sends `sent` of them and then nothing more, so the agent holds what arrived.
async fn partial_apply_pod(addr: &str, tenant: &str, declared: u32, sent: usize) -> PartialCall {
    partial_apply_pod_with(addr, tenant, declared, sent, &[]).await
}

/// [`partial_apply_pod`] with further request headers.
async fn partial_apply_pod_with(
    addr: &str,
    tenant: &str,
    declared: u32,
    sent: usize,
    headers: &[(&str, &str)],
) -> PartialCall {
    use futures::StreamExt as _;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    // The gRPC frame header (uncompressed, `declared` bytes), then part of the message.
    let mut frame = vec![0u8];
    frame.extend_from_slice(&declared.to_be_bytes());
    frame.resize(5 + sent, 0);
    let body = http_body_util::StreamBody::new(
        futures::stream::iter([Ok::<_, std::convert::Infallible>(http_body::Frame::data(
            bytes::Bytes::from(frame),
        ))])
        .chain(futures::stream::pending()),
    );
    let mut request = http::Request::post(format!("http://{addr}/rcsync.v1.PodSync/ApplyPod"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {}", token(tenant)));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(body).unwrap();
    let (answered, answer) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let call = async move {
            if let Ok(response) = sender.send_request(request).await {
                let header = |name: &str| {
                    response
                        .headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string()
                };
                let _ = answered.send((header("grpc-status"), header("grpc-message")));
            }
            std::future::pending::<()>().await;
        };
        let _ = futures::future::join(connection, call).await;
    });
    PartialCall { task, answer }
}

#[tokio::test]
async fn a_pod_sync_whose_message_stalls_is_ended_and_gives_back_its_bytes_and_its_place() {
    let tenants = with_limits(POD_TENANTS, "team-a", "{podSyncInFlight: 1}");
    let host = Host::start(&tenants, &["--pod-sync-read-timeout", "1s"]).await;
    host.ready().await;
    // Half a Pod, then nothing: the agent ends the call rather than hold it.
    let mut stalled = partial_apply_pod(&host.grpc, "team-a", 64 << 10, 32 << 10).await;
    let (status, message) = stalled.answered().await;
    assert_eq!(status, (Code::DeadlineExceeded as i32).to_string(), "{message}");
    assert_eq!(
        message,
        "the request's message did not arrive within 1s of its headers (--pod-sync-read-timeout)"
    );
    eventually("the stalled call's bytes back", || async {
        let (_, metrics) = http_get(&host.admin, "/metrics").await?;
        (series_value(&metrics, "rcsync_pod_sync_bytes_held")? == 0.0).then_some(())
    })
    .await;
    // Its podSyncInFlight place is free again, though its connection is still open.
    let mut pods = PodSyncClient::new(host.channel().await);
    pods.delete_pod(delete_gone_pod("team-a"))
        .await
        .expect("a place is free");
    stalled.task.abort();
}

#[tokio::test]
async fn a_pod_sync_the_host_api_server_never_answers_ends_after_the_pod_sync_timeout() {
    use rcsync_tests::proxy::{Mode, reroute_kubeconfig};
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start("host", "RCSYNC_HOST_KUBECONFIG", dir.path()).await;
    let proxied = dir.path().join("proxied.kubeconfig");
    std::fs::copy(&cluster.kubeconfig, &proxied).unwrap();
    let proxy = reroute_kubeconfig(&proxied).await;
    let cluster = Cluster {
        dev: cluster.dev,
        kubeconfig: proxied,
    };
    let host = Host::start_agent(dir, cluster, POD_TENANTS, &["--pod-sync-timeout", "1s"]).await;
    host.ready().await;
    // The host API server goes silent (connections held open): the call is ended, with its
    // podSyncInFlight place and bytes, instead of waiting minutes on the agent's client.
    proxy.set(Mode::Stall);
    let mut pods = PodSyncClient::new(host.channel().await);
    let request = with_token(
        ApplyPodRequest {
            pod_json: virtual_pod(
                "default",
                "p",
                "uid-p",
                json!({"containers": [{"name": "app", "image": "app"}]}),
            ),
            ..Default::default()
        },
        "team-a",
    );
    let refused = tokio::time::timeout(rcsync_tests::DEADLINE, pods.apply_pod(request))
        .await
        .expect("an answer within the pod sync timeout")
        .expect_err("no Pod placed");
    assert_eq!(refused.code(), Code::DeadlineExceeded, "{refused:?}");
    assert_eq!(
        refused.message(),
        "the host API server did not complete the call within 1s (--pod-sync-timeout)"
    );
    proxy.set(Mode::Pass);
}

#[tokio::test]
async fn a_call_past_its_grpc_timeout_ends_with_deadline_exceeded() {
    let host = Host::start(POD_TENANTS, &[]).await;
    host.ready().await;
    // The message never completes; the caller's deadline (1 s), not the read timeout (10 s),
    // ends the call, with the code the gRPC spec gives an expired deadline.
    let mut call =
        partial_apply_pod_with(&host.grpc, "team-a", 64 << 10, 1 << 10, &[("grpc-timeout", "1S")]).await;
    let (status, message) = call.answered().await;
    assert_eq!(status, (Code::DeadlineExceeded as i32).to_string(), "{message}");
    assert_eq!(message, "no answer within the caller's grpc-timeout (1s)");
    call.task.abort();
}

/// A `grpc-message` as sent (percent-encoded), decoded.
fn percent_decoded(message: &str) -> String {
    let bytes = message.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(byte) = message
                .get(i + 1..i + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

/// The value of an unlabelled series in a Prometheus text page.
fn series_value(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A tenant's `limits.podSyncBytes` sets its share of `--max-pod-sync-bytes` (a quarter by
/// default): an operator with few tenants lets one hold more, and takes effect at a reload.
#[tokio::test]
async fn a_tenants_pod_sync_bytes_sets_its_share_of_the_budget() {
    let tenants = "tenants:\n  - name: team-a\n    hostNamespace: vc-team-a\n    tokenFile: team-a.token\n    limits: {podSyncBytes: 8Mi}\n  - name: team-b\n    hostNamespace: vc-team-b\n    tokenFile: team-b.token\n";
    let host = Host::start(tenants, &["--max-pod-sync-bytes", "16Mi"]).await;
    host.ready().await;
    let held_bytes = || async {
        let (_, metrics) = http_get(&host.admin, "/metrics").await?;
        series_value(&metrics, "rcsync_pod_sync_bytes_held")
    };
    const STALLED: usize = 3840 << 10;
    // team-a's two stalled calls fit in its 8 MiB; a third does not.
    let mut stalled = Vec::new();
    for held in [1, 2] {
        stalled.push(partial_apply_pod(&host.grpc, "team-a", 4 << 20, STALLED).await);
        eventually("the agent to hold team-a's stalled calls", || async {
            held_bytes()
                .await
                .filter(|bytes| *bytes >= (held * STALLED) as f64)
        })
        .await;
    }
    let mut third = partial_apply_pod(&host.grpc, "team-a", 4 << 20, 512 << 10).await;
    let (status, message) = third.answered().await;
    assert_eq!(status, (Code::ResourceExhausted as i32).to_string());
    assert!(message.contains("(8388608 of 16777216 bytes"), "{message}");
    third.task.abort();
    // team-b has the default, a quarter: its second stalled call is refused.
    stalled.push(partial_apply_pod(&host.grpc, "team-b", 4 << 20, STALLED).await);
    eventually("the agent to hold team-b's stalled call", || async {
        held_bytes().await.filter(|bytes| *bytes >= (3 * STALLED) as f64)
    })
    .await;
    let mut second = partial_apply_pod(&host.grpc, "team-b", 4 << 20, 512 << 10).await;
    let (_, message) = second.answered().await;
    assert!(message.contains("(4194304 of 16777216 bytes"), "{message}");
    second.task.abort();
    // Raised at a reload, team-b's next call fits.
    replace_tenants(
        &host,
        &tenants.replace(
            "tokenFile: team-b.token\n",
            "tokenFile: team-b.token\n    limits: {podSyncBytes: 8Mi}\n",
        ),
    );
    let after = eventually("team-b's raised share to apply", || async {
        let mut call = partial_apply_pod(&host.grpc, "team-b", 4 << 20, 512 << 10).await;
        let held = async {
            while !held_bytes()
                .await
                .is_some_and(|b| b >= (3 * STALLED + (512 << 10)) as f64)
            {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        };
        tokio::select! {
            // Refused: the reload has not applied yet.
            _ = call.answered() => {
                call.task.abort();
                None
            }
            // Held: it fit.
            () = held => Some(call),
        }
    })
    .await;
    after.task.abort();
    for call in stalled {
        call.task.abort();
    }
}

#[tokio::test]
async fn the_pod_syncs_of_all_tenants_together_hold_at_most_max_pod_sync_bytes_and_each_a_quarter() {
    let names = ["team-a", "team-b", "team-c", "team-d", "team-e"];
    let tenants: String = std::iter::once("tenants:\n".to_string())
        .chain(names.iter().map(|name| {
            format!(
                "  - name: {name}\n    hostNamespace: vc-{name}\n    tokenFile: {name}.token\n    \
                 sync: {{fromHost: {{runtimeClasses: {{enabled: true}}}}}}\n"
            )
        }))
        .collect();
    let host = Host::start(&tenants, &["--max-pod-sync-bytes", "16Mi"]).await;
    let namespaces: Api<Namespace> = Api::all(host.cluster.client().await);
    for name in names {
        let namespace = serde_json::from_value(json!({"metadata": {"name": format!("vc-{name}")}})).unwrap();
        namespaces
            .create(&PostParams::default(), &namespace)
            .await
            .unwrap();
    }
    host.ready().await;
    let held_bytes = || async {
        let (_, metrics) = http_get(&host.admin, "/metrics").await?;
        series_value(&metrics, "rcsync_pod_sync_bytes_held")
    };
    use tonic_types::StatusExt as _;
    let retry_delay =
        |status: &tonic::Status| status.get_details_retry_info().and_then(|info| info.retry_delay);

    // team-a's call has sent 3.75 MiB of a 4 MiB Pod and stalls: the agent holds those bytes. A
    // second call of team-a does not fit in its quarter of the budget (4 MiB).
    const STALLED: u32 = 3840 << 10;
    let mut stalled = vec![partial_apply_pod(&host.grpc, "team-a", 4 << 20, STALLED as usize).await];
    eventually("the agent to hold team-a's 3.75 MiB", || async {
        held_bytes().await.filter(|held| *held >= f64::from(STALLED))
    })
    .await;
    let mut over_share = partial_apply_pod(&host.grpc, "team-a", 4 << 20, 512 << 10).await;
    let (status, message) = over_share.answered().await;
    assert_eq!(status, (Code::ResourceExhausted as i32).to_string());
    assert_eq!(
        message,
        "tenant team-a holds its share of the Pod sync bytes the host agent holds at once \
         (4194304 of 16777216 bytes: limits.podSyncBytes, by default a quarter of \
         --max-pod-sync-bytes): retry"
    );
    over_share.task.abort();

    // Three more tenants hold as much: team-e's Pod of 1 MiB no longer fits beside them, though it
    // holds nothing yet: refused with retry info, before the agent reads all of it.
    for name in ["team-b", "team-c", "team-d"] {
        stalled.push(partial_apply_pod(&host.grpc, name, 4 << 20, STALLED as usize).await);
    }
    eventually("the agent to hold 4 × 3.75 MiB", || async {
        held_bytes().await.filter(|held| *held >= f64::from(4 * STALLED))
    })
    .await;
    let big = json!({"containers": [{"name": "app", "image": "app", "env": [{"name": "BLOB", "value": "x".repeat(1 << 20)}]}]});
    let request = || {
        with_token(
            ApplyPodRequest {
                pod_json: virtual_pod("default", "big", "uid-big", big.clone()),
                ..Default::default()
            },
            "team-e",
        )
    };
    let mut pods = PodSyncClient::new(host.channel().await);
    let refused = pods
        .apply_pod(request())
        .await
        .expect_err("over the agent-wide budget");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(
        refused.message(),
        "the host agent holds as many Pod sync bytes as it may at once, over all tenants \
         (16777216 bytes, --max-pod-sync-bytes): retry"
    );
    assert_eq!(retry_delay(&refused), Some(Duration::from_secs(1)));
    let (_, metrics) = http_get(&host.admin, "/metrics").await.unwrap();
    // Each refusal counted under the budget it found spent: team-a's share, all of it for team-e.
    for (name, budget, count) in [
        ("team-a", "tenant", 1),
        ("team-a", "agent", 0),
        ("team-e", "tenant", 0),
        ("team-e", "agent", 1),
    ] {
        let series = format!(
            "rcsync_pod_sync_budget_refusals_total{{tenant=\"{name}\",budget=\"{budget}\"}} {count}\n"
        );
        assert!(metrics.contains(&series), "{series} in {metrics}");
    }

    // One stalled call ends: its bytes go back, and team-e's Pod goes through.
    stalled.remove(1).task.abort();
    let applied = eventually("team-e's Pod once team-b's bytes are back", || {
        let mut pods = pods.clone();
        async move { pods.apply_pod(request()).await.ok() }
    })
    .await;
    assert!(applied.into_inner().applied);
    for call in stalled {
        call.task.abort();
    }
    eventually("every byte back once the calls are answered or gone", || async {
        held_bytes().await.filter(|held| *held == 0.0)
    })
    .await;
}

#[tokio::test]
async fn a_client_gone_without_closing_its_connection_gives_its_stream_back_after_the_keepalive() {
    let tenants = with_limits(TENANTS, "no-selector", "{syncStreams: 1}");
    let host = Host::start(
        &tenants,
        &["--keepalive-interval", "1s", "--keepalive-timeout", "1s"],
    )
    .await;
    host.ready().await;
    let direct = host.client().await;
    let proxy = FaultyProxy::start(host.grpc.parse().unwrap()).await.unwrap();
    let mut via_proxy = RuntimeClassSyncClient::new(
        Channel::from_shared(format!("http://{}", proxy.addr))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let mut held = Stream::open(&mut via_proxy, "no-selector", HashMap::new()).await;
    held.next().await;
    let open_directly = || {
        let mut direct = direct.clone();
        async move {
            let (_tx, rx) = mpsc::channel::<SyncRequest>(1);
            direct
                .sync(with_token(ReceiverStream::new(rx), "no-selector"))
                .await
        }
    };
    let refused = open_directly().await.unwrap_err();
    assert_eq!(
        refused.code(),
        Code::ResourceExhausted,
        "the tenant's one place is taken"
    );
    // The client vanishes: no byte gets through any more, and no socket closes.
    proxy.set(Mode::Stall);
    eventually("the vanished client's place to be given back", || async {
        open_directly().await.ok()
    })
    .await;
}

#[tokio::test]
async fn connections_past_max_connections_are_closed_and_counted_until_one_closes() {
    let health_addr = format!("127.0.0.1:{}", free_port());
    let host = Host::start(
        TENANTS,
        &["--max-connections", "2", "--grpc-health-listen", &health_addr],
    )
    .await;
    host.ready().await;
    let health_check = |url: String| async move {
        let channel = Channel::from_shared(url).unwrap().connect().await.ok()?;
        tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .ok()
    };
    let health_url = format!("http://{health_addr}");
    let check = |channel: Channel| async move {
        RuntimeClassSyncClient::new(channel)
            .check_pod(with_token(
                CheckPodRequest {
                    pod_name: "p".into(),
                    ..Default::default()
                },
                "no-selector",
            ))
            .await
    };
    let first = host.channel().await;
    check(first.clone())
        .await
        .expect("the first connection is served");
    let second = host.channel().await;
    check(second.clone())
        .await
        .expect("the second connection is served");

    let url = format!("http://{}", host.grpc);
    let third = match Channel::from_shared(url.clone()).unwrap().connect().await {
        Ok(channel) => check(channel).await.map(drop).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    assert!(third.is_err(), "a third connection is refused, got {third:?}");
    let (_, metrics) = http_get(&host.admin, "/metrics").await.unwrap();
    let value = |name: &str| {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} in {metrics}"))
    };
    // The client may have tried more than once.
    assert!(value("rcsync_grpc_connections_refused_total") >= 1.0, "{metrics}");
    assert_eq!(value("rcsync_grpc_connections"), 2.0, "{metrics}");
    check(second.clone())
        .await
        .expect("the open connections are still served");
    assert!(
        health_check(health_url.clone()).await.is_none(),
        "the health port shares the gRPC port's places"
    );

    drop(first);
    eventually("a new connection once one has closed", || {
        let url = url.clone();
        async move {
            let channel = Channel::from_shared(url).unwrap().connect().await.ok()?;
            check(channel).await.ok()
        }
    })
    .await;
    drop(second);
    eventually("a health check once another has closed", || {
        health_check(health_url.clone())
    })
    .await;
}

#[tokio::test]
async fn with_an_admin_token_file_metrics_and_tenants_need_the_token_and_the_probes_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, "admin-s3cret\n").unwrap();
    let token_arg = token_file.display().to_string();
    let host = Host::start(TENANTS, &["--admin-token-file", &token_arg]).await;
    host.ready().await;
    assert_eq!(http_get(&host.admin, "/livez").await.unwrap().0, 200);
    let admin = format!("http://{}", host.admin);
    let get = |path: &'static str, token: Option<&'static str>| {
        let admin = admin.clone();
        async move { rcsync_tests::admin_get(&admin, path, token, None).await.unwrap() }
    };
    for path in ["/metrics", "/tenants"] {
        let (code, body) = get(path, None).await;
        assert_eq!(code, 401, "{path}: {body}");
        assert!(body.contains("--admin-token-file"), "{body}");
        assert_eq!(get(path, Some("admin-s3cre")).await.0, 401, "{path}");
        assert_eq!(get(path, Some("admin-s3cret")).await.0, 200, "{path}");
    }

    let (code, _, stderr) = status_command(&["--admin", &admin]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("answered 401") && stderr.contains("--admin-token-file"),
        "{stderr}"
    );
    let (code, stdout, stderr) = status_command(&["--admin", &admin, "--admin-token-file", &token_arg]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with("TENANT"), "{stdout}");

    // A missing token file stops the agent at start, naming it.
    let config = write_tenants(dir.path(), "tenants: []\n");
    let missing = dir.path().join("no-such-token").display().to_string();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_host-agent"))
        .args(["--kubeconfig", &host.cluster.kubeconfig.display().to_string()])
        .args(["--config", &config.display().to_string()])
        .args(["--grpc-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--admin-token-file", &missing])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("reading the admin token file {missing}")),
        "{stderr}"
    );
}

#[tokio::test]
async fn with_admin_tls_the_admin_port_speaks_https_only_and_picks_up_a_rotated_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let first = devcluster::pki::Pki::new("rcsync-admin-ca-1").unwrap();
    let pair = first.server(&["localhost", "127.0.0.1"]).unwrap();
    let cert = write("admin.crt", &pair.cert_pem);
    let key = write("admin.key", &pair.key_pem);
    let ca1 = write("ca1.crt", &first.ca_pem());
    let (cert_arg, key_arg) = (cert.display().to_string(), key.display().to_string());
    let host = Host::start(
        TENANTS,
        &["--admin-tls-cert", &cert_arg, "--admin-tls-key", &key_arg],
    )
    .await;
    let https = format!("https://{}", host.admin);
    let get = |path: &'static str, ca: Option<std::path::PathBuf>| {
        let https = https.clone();
        async move { rcsync_tests::admin_get(&https, path, None, ca.as_deref()).await }
    };
    eventually("/readyz over HTTPS to answer 200", || {
        let ca1 = ca1.clone();
        async move {
            get("/readyz", Some(ca1))
                .await
                .ok()
                .filter(|(code, _)| *code == 200)
        }
    })
    .await;
    assert_eq!(get("/metrics", Some(ca1.clone())).await.unwrap().0, 200);
    // Plain HTTP gets no answer, and a client that does not trust the CA stops at the handshake.
    assert_eq!(http_get(&host.admin, "/livez").await, None);
    let other = devcluster::pki::Pki::new("rcsync-other-ca").unwrap();
    let untrusted = write("other.crt", &other.ca_pem());
    let err = get("/livez", Some(untrusted)).await.unwrap_err();
    assert!(err.contains(&https), "{err}");
    let err = get("/livez", None).await.unwrap_err();
    assert!(err.contains("--admin-ca"), "{err}");

    let (code, stdout, stderr) =
        status_command(&["--admin", &https, "--admin-ca", &ca1.display().to_string()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with("TENANT"), "{stdout}");

    // cert-manager rotates the Secret to a certificate of another CA: new connections get it.
    let second = devcluster::pki::Pki::new("rcsync-admin-ca-2").unwrap();
    let pair = second.server(&["localhost", "127.0.0.1"]).unwrap();
    let ca2 = write("ca2.crt", &second.ca_pem());
    write("admin.key.next", &pair.key_pem);
    write("admin.crt.next", &pair.cert_pem);
    std::fs::rename(dir.path().join("admin.key.next"), &key).unwrap();
    std::fs::rename(dir.path().join("admin.crt.next"), &cert).unwrap();
    eventually("the rotated certificate to be served", || {
        let ca2 = ca2.clone();
        async move {
            get("/livez", Some(ca2))
                .await
                .ok()
                .filter(|(code, _)| *code == 200)
        }
    })
    .await;
    assert!(get("/livez", Some(ca1)).await.is_err());
    let (_, metrics) = get("/metrics", Some(ca2)).await.unwrap();
    assert!(
        metrics.contains("rcsync_tls_reloads_total{result=\"applied\"} 1")
            || metrics.contains("rcsync_tls_reloads_total{result=\"applied\"} 2"),
        "{metrics}"
    );

    // Half a TLS configuration is refused at start, naming the flags.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_host-agent"))
        .args(["--kubeconfig", &host.cluster.kubeconfig.display().to_string()])
        .args([
            "--config",
            &write_tenants(dir.path(), "tenants: []\n").display().to_string(),
        ])
        .args(["--grpc-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--admin-tls-cert", &cert_arg])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--admin-tls-cert and --admin-tls-key must be given together"),
        "{stderr}"
    );
}
