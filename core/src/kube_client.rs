//! Building a Kubernetes client the way both agents do (feature `kube`).

use std::path::Path;

use anyhow::Context as _;

/// A client from `kubeconfig`, or, when absent, from the environment: in-cluster config (or
/// `$KUBECONFIG` / `~/.kube/config` when run outside a cluster).
pub async fn kube_client(kubeconfig: Option<&Path>) -> anyhow::Result<kube::Client> {
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
    client_for(config)
}

/// A client for `config` whose connections set TCP_NODELAY: watch events and small requests go
/// out at once instead of waiting on Nagle's algorithm. Otherwise as kube-rs builds it: the
/// config's TLS (rustls), timeouts, retries, authentication and extra headers.
pub fn client_for(config: kube::Config) -> anyhow::Result<kube::Client> {
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
    let service = tower::ServiceBuilder::new()
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
