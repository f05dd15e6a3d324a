//! Building a Kubernetes client the way both agents do (feature `kube`).

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;

/// Says whether this process may write now (leader fencing). Reads are never held back.
pub type WriteFence = Arc<dyn Fn() -> bool + Send + Sync>;

/// The error a fenced client returns for a write while the fence is closed.
#[derive(Debug, thiserror::Error)]
#[error("not written: this replica does not hold the leader lease (fenced {method} {path})")]
pub struct Fenced {
    method: http::Method,
    path: String,
}

/// A client from `kubeconfig`, or, when absent, from the environment: in-cluster config (or
/// `$KUBECONFIG` / `~/.kube/config` when run outside a cluster).
pub async fn kube_client(kubeconfig: Option<&Path>) -> anyhow::Result<kube::Client> {
    client_for(load_config(kubeconfig).await?)
}

/// Like [`kube_client`], but every write (anything but GET, HEAD and OPTIONS) is refused with
/// [`Fenced`] before it leaves the process while `fence` says no.
pub async fn fenced_kube_client(
    kubeconfig: Option<&Path>,
    fence: WriteFence,
) -> anyhow::Result<kube::Client> {
    build(load_config(kubeconfig).await?, Some(fence))
}

async fn load_config(kubeconfig: Option<&Path>) -> anyhow::Result<kube::Config> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no --kubeconfig and no in-cluster config")?,
    };
    Ok(config)
}

/// A client for `config` whose connections set TCP_NODELAY: watch events and small requests go
/// out at once instead of waiting on Nagle's algorithm. Otherwise as kube-rs builds it: the
/// config's TLS (rustls), timeouts, retries, authentication and extra headers.
pub fn client_for(config: kube::Config) -> anyhow::Result<kube::Client> {
    build(config, None)
}

fn build(config: kube::Config, fence: Option<WriteFence>) -> anyhow::Result<kube::Client> {
    use kube::client::ConfigExt as _;
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    let https = config
        .rustls_https_connector_with_connector(http)
        .context("configuring TLS for the Kubernetes API")?;
    let mut connector = hyper_timeout::TimeoutConnector::new(https);
    connector.set_connect_timeout(config.connect_timeout);
    connector.set_read_timeout(config.read_timeout);
    connector.set_write_timeout(config.write_timeout);
    connector.set_reset_reader_on_write(config.reset_reader_on_write);
    let http_client = hyper_util::client::legacy::Builder::new(hyper_util::rt::TokioExecutor::new())
        .build::<_, kube::client::Body>(connector);
    let retry = config
        .default_retry
        .then(|| tower::retry::RetryLayer::new(kube::client::retry::RetryPolicy::server_retry()));
    let fence = fence.map(|allows| {
        tower::filter::FilterLayer::new(move |request: http::Request<kube::client::Body>| {
            let reads = [http::Method::GET, http::Method::HEAD, http::Method::OPTIONS];
            if reads.contains(request.method()) || allows() {
                Ok(request)
            } else {
                Err(Fenced {
                    method: request.method().clone(),
                    path: request.uri().path().to_string(),
                })
            }
        })
    });
    let service = tower::ServiceBuilder::new()
        .option_layer(fence)
        .map_err(tower::BoxError::from)
        .layer(config.base_uri_layer())
        .option_layer(retry)
        .option_layer(
            config
                .auth_layer()
                .context("configuring Kubernetes API credentials")?,
        )
        .layer(
            config
                .extra_headers_layer()
                .context("configuring extra headers")?,
        )
        .map_err(tower::BoxError::from)
        .service(http_client);
    Ok(kube::Client::new(service, config.default_namespace))
}

/// The backoff of every watch of the agents: jittered exponential from 250 ms to 5 s, reset by
/// the first event after an error. kube's default grows to 30 s and resets only after two quiet
/// minutes, so after a second API server restart within that time a watch could stay down for
/// half a minute; with this one the agents are back within seconds of the API server.
#[derive(Clone, Debug)]
pub struct WatchBackoff {
    next: std::time::Duration,
}

impl WatchBackoff {
    const FIRST: std::time::Duration = std::time::Duration::from_millis(250);
    const MAX: std::time::Duration = std::time::Duration::from_secs(5);
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self { next: Self::FIRST }
    }
}

impl Iterator for WatchBackoff {
    type Item = std::time::Duration;

    fn next(&mut self) -> Option<Self::Item> {
        use rand::Rng as _;
        let base = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        Some(base.mul_f64(rand::rng().random_range(0.75..1.25)))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A closed fence refuses writes before they leave the process, naming the request; reads pass
    /// (here they fail to connect, as nothing listens).
    #[tokio::test]
    async fn a_closed_fence_refuses_writes_and_lets_reads_through() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        let client = build(config, Some(Arc::new(|| false))).unwrap();
        let write = http::Request::post("/api/v1/namespaces/default/pods")
            .body(Vec::new())
            .unwrap();
        let err = client.request::<serde_json::Value>(write).await.unwrap_err();
        let kube::Error::Service(inner) = &err else {
            panic!("not refused by the fence: {err:?}")
        };
        assert_eq!(
            inner.to_string(),
            "not written: this replica does not hold the leader lease (fenced POST /api/v1/namespaces/default/pods)"
        );
        let read = http::Request::get("/api/v1/namespaces/default/pods")
            .body(Vec::new())
            .unwrap();
        let err = client.request::<serde_json::Value>(read).await.unwrap_err();
        assert!(!format!("{err:?}").contains("fenced"), "{err:?}");
    }
}
