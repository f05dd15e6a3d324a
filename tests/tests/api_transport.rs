//! The agents' transport to an API server (`rcsync_core::api_transport`): watches share HTTP/2
//! connections within the API server's stream limit, and an API server without HTTP/2 is
//! still served, over HTTP/1.1.

use std::time::Duration;

use devcluster::server::ServerOptions;
use futures::TryStreamExt as _;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{ListParams, PostParams, WatchEvent, WatchParams};
use prometheus_client::registry::Registry;
use rcsync_core::api_transport::{ApiTransport, ApiTransportMetrics};
use rcsync_core::kube_client::ApiConnector;
use rcsync_tests::Cluster;
use serde_json::json;

/// Watches opened at once: more than the API server lets one connection carry (100).
const WATCHES: usize = 150;

/// A client of `cluster` as the agents build theirs, its transport, and the transport's metrics.
async fn client_and_transport(cluster: &Cluster) -> (kube::Client, ApiTransport<ApiConnector>, Metrics) {
    let kubeconfig = kube::config::Kubeconfig::read_from(&cluster.kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    let metrics = ApiTransportMetrics::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let (client, transport) = rcsync_core::kube_client::client_and_transport(config, &metrics).unwrap();
    (client, transport, Metrics(registry))
}

/// The transport's metrics as `/metrics` shows them.
struct Metrics(Registry);

impl Metrics {
    /// The value of the series `name`.
    fn value(&self, name: &str) -> i64 {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.0).unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no series {name} in:\n{text}"))
    }
}

/// Opens `n` watches of ConfigMaps in `default`, each once the API server answered it.
async fn open_watches(
    api: &Api<ConfigMap>,
    n: usize,
) -> Vec<impl futures::Stream<Item = kube::Result<WatchEvent<ConfigMap>>> + use<>> {
    let opening = futures::future::try_join_all((0..n).map(|_| {
        let api = api.clone();
        async move {
            api.watch(&WatchParams::default().timeout(290), "0")
                .await
                .map(Box::pin)
        }
    }));
    tokio::time::timeout(Duration::from_secs(60), opening)
        .await
        .expect("every watch is answered within 60 s (none waits for a stream beyond the connection's limit)")
        .expect("every watch opens")
}

async fn create_config_map(api: &Api<ConfigMap>, name: &str) {
    let config_map: ConfigMap = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    api.create(&PostParams::default(), &config_map).await.unwrap();
}

/// Waits (with a deadline) until every watch has delivered the ConfigMap `name`.
async fn all_see(
    watches: &mut [impl futures::Stream<Item = kube::Result<WatchEvent<ConfigMap>>> + Unpin],
    name: &str,
) {
    for watch in watches.iter_mut() {
        let seen = async {
            while let Some(event) = watch.try_next().await.expect("the watch goes on") {
                if let WatchEvent::Added(cm) = event
                    && cm.metadata.name.as_deref() == Some(name)
                {
                    return;
                }
            }
            panic!("the watch ended before {name} arrived");
        };
        tokio::time::timeout(Duration::from_secs(30), seen)
            .await
            .expect("the watch delivers the new ConfigMap within 30 s");
    }
}

#[tokio::test]
async fn watches_share_http2_connections_within_the_api_servers_stream_limit() {
    let dir = tempfile::tempdir().unwrap();
    // devcluster allows 100 concurrent streams per connection, as kube-apiserver does.
    let cluster =
        Cluster::start_with("host", "RCSYNC_TEST_UNUSED", dir.path(), ServerOptions::default()).await;
    let (client, transport, metrics) = client_and_transport(&cluster).await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let mut watches = open_watches(&api, WATCHES).await;
    let connections = transport.multiplexed_connections();
    assert!(!transport.http1_only());
    assert_eq!(
        connections,
        WATCHES.div_ceil(rcsync_core::api_transport::STREAMS_PER_CONNECTION),
        "{WATCHES} watches over as few connections as the per-connection limit allows"
    );
    assert_eq!(metrics.value("rcsync_api_http2_connections"), connections as i64);
    assert_eq!(metrics.value("rcsync_api_http2_requests"), WATCHES as i64);
    assert_eq!(metrics.value("rcsync_api_http1_only"), 0);
    // Every watch works, and requests still go through beside them.
    create_config_map(&api, "first").await;
    all_see(&mut watches, "first").await;
    assert_eq!(api.list(&ListParams::default()).await.unwrap().items.len(), 1);
    // A watch that ends gives its place back: as many watches again need no new connection.
    drop(watches);
    assert_eq!(metrics.value("rcsync_api_http2_requests"), 0);
    let mut watches = open_watches(&api, WATCHES).await;
    assert_eq!(transport.multiplexed_connections(), connections);
    create_config_map(&api, "second").await;
    all_see(&mut watches, "second").await;
}

#[tokio::test]
async fn an_api_server_without_http2_is_served_over_http1() {
    let dir = tempfile::tempdir().unwrap();
    let options = ServerOptions {
        http2: false,
        ..ServerOptions::default()
    };
    let cluster = Cluster::start_with("host", "RCSYNC_TEST_UNUSED", dir.path(), options).await;
    let (client, transport, metrics) = client_and_transport(&cluster).await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let mut watches = open_watches(&api, 3).await;
    create_config_map(&api, "first").await;
    all_see(&mut watches, "first").await;
    assert!(transport.http1_only());
    assert_eq!(transport.multiplexed_connections(), 0);
    assert_eq!(metrics.value("rcsync_api_http1_only"), 1);
    assert_eq!(metrics.value("rcsync_api_http2_connections"), 0);
    let names: Vec<_> = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|cm| cm.metadata.name)
        .collect();
    assert_eq!(names, ["first"]);
}
