//! CheckPod cost: the in-memory decision, and a full gRPC round trip over loopback, each as a
//! ratio against a floor measured in the same run (a map lookup; a gRPC health check on the same
//! server). CheckPod never calls the API server, so the round trip should sit near the floor.
//!
//! Run: `cargo bench -p host-agent --bench check_pod`

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use host_agent::grpc::auth::{Authenticated, Authenticator};
use host_agent::grpc::framing::SyncFraming;
use host_agent::grpc::sync::{RetryPolicy, RuntimeClassSyncService};
use host_agent::index::{ClassIndex, TenantsState, ViewSource, Views};
use host_agent::metrics::Metrics;
use k8s_openapi::api::node::v1::RuntimeClass;
use kube::runtime::watcher::Event;
use rcsync_core::{TenantName, TenantsFile};
use rcsync_proto::v1::CheckPodRequest;
use rcsync_proto::v1::runtime_class_sync_client::RuntimeClassSyncClient;

const CLASSES: usize = 200;

fn time<F: FnMut()>(n: u32, mut f: F) -> Duration {
    for _ in 0..n / 10 {
        f();
    }
    let started = Instant::now();
    for _ in 0..n {
        f();
    }
    started.elapsed() / n
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let yaml = "tenants:\n  - {name: team-a, hostNamespace: ns-a, sync: {fromHost: {runtimeClasses: {enabled: true, selector: {matchLabels: {environment: development}}}}}}\n";
        let file = TenantsFile::parse(Path::new("bench.yaml"), yaml).unwrap();
        let state = Arc::new(TenantsState { file, tokens: Default::default(), patches: Default::default() });
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Metrics::register(&mut registry);
        let views = Views::default();
        let mut index = ClassIndex::new(state.clone(), views.clone(), metrics.clone());
        index.handle(Event::Init);
        for i in 0..CLASSES {
            let env = if i % 2 == 0 { "development" } else { "production" };
            let rc: RuntimeClass = serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("class-{i}"), "labels": {"environment": env}}, "handler": "h"
            }))
            .unwrap();
            index.handle(Event::InitApply(rc));
        }
        index.handle(Event::InitDone);
        let tenant = TenantName::new("team-a").unwrap();

        // In memory.
        let map: BTreeMap<String, usize> = (0..CLASSES).map(|i| (format!("class-{i}"), i)).collect();
        let floor = time(200_000, || {
            black_box(map.get(black_box("class-100")));
        });
        let decide = time(200_000, || {
            black_box(views.check_pod(&tenant, black_box("my-pod"), black_box("class-101")));
        });
        println!("in memory: map lookup {floor:?}, CheckPod decision {decide:?} (ratio {:.1})", decide.as_secs_f64() / floor.as_secs_f64());

        // Identifying the caller (every call does, from its headers): the last of 1,000 tenants
        // against the only one of a single-tenant file.
        let identify = |tenants: usize| {
            let yaml: String = std::iter::once("tenants:\n".to_string())
                .chain((0..tenants).map(|t| format!("  - {{name: t{t}, hostNamespace: ns-{t}}}\n")))
                .collect();
            let file = TenantsFile::parse(Path::new("bench.yaml"), &yaml).unwrap();
            let state = Arc::new(TenantsState { file, tokens: Default::default(), patches: Default::default() });
            let (_config, rx) = tokio::sync::watch::channel(state);
            let auth = Authenticator::new(rx, true);
            let mut request = tonic::Request::new(());
            request.metadata_mut().insert("x-rcsync-tenant", format!("t{}", tenants - 1).parse().unwrap());
            time(200_000, || {
                black_box(auth.identify(black_box(&request)).unwrap());
            })
        };
        let (one, thousand) = (identify(1), identify(1_000));
        println!(
            "identifying the caller: among 1 tenant {one:?}, among 1,000 tenants {thousand:?} (ratio {:.2})",
            thousand.as_secs_f64() / one.as_secs_f64()
        );

        // Over gRPC on loopback.
        let (_tx, tenants_rx) = tokio::sync::watch::channel(state);
        let auth = Authenticator::new(tenants_rx.clone(), true);
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        let limiter = host_agent::grpc::limits::TenantLimiter::new(tenants_rx, metrics.clone());
        let service = RuntimeClassSyncService::new(Arc::new(views), auth.clone(), metrics.clone(), RetryPolicy::default(), shutdown, Default::default(), limiter);
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health)
                .add_service(Authenticated::new(SyncFraming::new(service), auth, metrics))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
        let mut client = RuntimeClassSyncClient::new(channel.clone());
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        const CALLS: u32 = 3_000;
        let started = Instant::now();
        for _ in 0..CALLS {
            health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
        }
        let floor = started.elapsed() / CALLS;
        let started = Instant::now();
        for _ in 0..CALLS {
            let mut request = tonic::Request::new(CheckPodRequest { pod_name: "my-pod".into(), runtime_class_name: "class-101".into(), ..Default::default() });
            request.metadata_mut().insert("x-rcsync-tenant", "team-a".parse().unwrap());
            black_box(client.check_pod(request).await.unwrap());
        }
        let call = started.elapsed() / CALLS;
        println!("gRPC round trip: health check {floor:?}, CheckPod {call:?} (ratio {:.2})", call.as_secs_f64() / floor.as_secs_f64());
    });
}
