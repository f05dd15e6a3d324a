//! Building a Kubernetes client the way both agents do (feature `kube`).

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;

use crate::api_transport::ApiTransportMetrics;

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
/// `$KUBECONFIG` / `~/.kube/config` when run outside a cluster), over
/// [`ApiTransport`](crate::api_transport::ApiTransport): HTTP/2 where the API server offers it
/// (watches share connections), HTTP/1.1 otherwise, its connections counted in `metrics` and
/// setting TCP_NODELAY (watch events and small requests go out at once instead of waiting on
/// Nagle's algorithm). Otherwise as kube-rs builds it: the config's TLS (rustls), timeouts,
/// retries, authentication and extra headers.
pub async fn kube_client(
    kubeconfig: Option<&Path>,
    metrics: &ApiTransportMetrics,
) -> anyhow::Result<kube::Client> {
    build(load_config(kubeconfig).await?, None, metrics)
}

/// Like [`kube_client`], but every write (anything but GET, HEAD and OPTIONS) is refused with
/// [`Fenced`] before it leaves the process while `fence` says no.
pub async fn fenced_kube_client(
    kubeconfig: Option<&Path>,
    fence: WriteFence,
    metrics: &ApiTransportMetrics,
) -> anyhow::Result<kube::Client> {
    build(load_config(kubeconfig).await?, Some(fence), metrics)
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

/// kube-rs's TLS for `config` (its CA, client certificate, server name and CA reloading), offering
/// HTTP/2 as well as HTTP/1.1.
fn https_connector<H>(config: &kube::Config, http: H) -> anyhow::Result<hyper_rustls::HttpsConnector<H>> {
    use kube::client::ConfigExt as _;
    let tls = config
        .rustls_client_config()
        .context("configuring TLS for the Kubernetes API")?;
    let mut builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    if let Some(name) = &config.tls_server_name {
        let name = rustls::pki_types::ServerName::try_from(name.clone())
            .with_context(|| format!("the kubeconfig's tls-server-name {name:?} is not a server name"))?;
        builder = builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name));
    }
    Ok(builder.enable_all_versions().wrap_connector(http))
}

/// How the agents dial an API server: TCP (no Nagle), TLS offering HTTP/2 and HTTP/1.1, the
/// config's connect, read and write timeouts.
pub type ApiConnector = hyper_timeout::TimeoutConnector<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
>;

/// A client for `config` as [`kube_client`] builds one, and its transport, which says how it is
/// connected (for tests and diagnostics).
pub fn client_and_transport(
    config: kube::Config,
    metrics: &ApiTransportMetrics,
) -> anyhow::Result<(kube::Client, crate::api_transport::ApiTransport<ApiConnector>)> {
    let transport = transport_for(&config, metrics)?;
    Ok((over(config, transport.clone(), None)?, transport))
}

fn build(
    config: kube::Config,
    fence: Option<WriteFence>,
    metrics: &ApiTransportMetrics,
) -> anyhow::Result<kube::Client> {
    let transport = transport_for(&config, metrics)?;
    over(config, transport, fence)
}

fn transport_for(
    config: &kube::Config,
    metrics: &ApiTransportMetrics,
) -> anyhow::Result<crate::api_transport::ApiTransport<ApiConnector>> {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    let https = https_connector(config, http)?;
    let mut connector = hyper_timeout::TimeoutConnector::new(https);
    connector.set_connect_timeout(config.connect_timeout);
    connector.set_read_timeout(config.read_timeout);
    connector.set_write_timeout(config.write_timeout);
    connector.set_reset_reader_on_write(config.reset_reader_on_write);
    Ok(crate::api_transport::ApiTransport::new(
        connector,
        config.read_timeout,
        metrics.clone(),
    ))
}

/// A client for `config` sending its requests over `transport`, writes held back while `fence`
/// says no.
fn over(
    config: kube::Config,
    transport: crate::api_transport::ApiTransport<ApiConnector>,
    fence: Option<WriteFence>,
) -> anyhow::Result<kube::Client> {
    use kube::client::ConfigExt as _;
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
        .service(transport);
    Ok(kube::Client::new(service, config.default_namespace))
}

/// The backoff of every watch of the agents: jittered exponential from 250 ms to 5 s, reset once
/// the API server answers again (see [`RetriedWatch`]). kube's default grows to 30 s and resets
/// only after two quiet minutes, so after a second API server restart within that time a watch
/// could stay down for half a minute; with this one the agents are back within seconds of the API
/// server, and an API server that stays away is asked every 5 s, not hammered.
#[derive(Clone, Debug)]
pub struct WatchBackoff {
    next: std::time::Duration,
}

impl WatchBackoff {
    const FIRST: std::time::Duration = std::time::Duration::from_millis(250);
    const MAX: std::time::Duration = std::time::Duration::from_secs(5);

    /// The pause before the next attempt (and doubles the one after it, up to the maximum).
    pub fn next_pause(&mut self) -> std::time::Duration {
        use rand::Rng as _;
        let base = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        base.mul_f64(rand::rng().random_range(0.75..1.25))
    }

    /// Back to the first pause.
    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self { next: Self::FIRST }
    }
}

/// A kube watcher stream retried with [`WatchBackoff`]: after an error the next poll waits out the
/// pause first. Unlike kube's `StreamBackoff`, the backoff is reset only by an event that came
/// from the API server: the watcher announces each relist with `Event::Init` before it asks, and
/// resetting on that kept every retry at the first pause (four attempts a second, per watch, for as
/// long as an API server was down).
pub struct RetriedWatch<S> {
    watch: std::pin::Pin<Box<S>>,
    backoff: WatchBackoff,
    pause: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<S> RetriedWatch<S> {
    /// Retries `watch` (a `kube::runtime::watcher` stream, or one built on it) with backoff.
    pub fn new(watch: S) -> Self {
        Self {
            watch: Box::pin(watch),
            backoff: WatchBackoff::default(),
            pause: None,
        }
    }
}

/// `.retry_with_backoff()` on a watch stream: [`RetriedWatch::new`].
pub trait RetryWithBackoff: Sized {
    /// This watch, retried with [`WatchBackoff`].
    fn retry_with_backoff(self) -> RetriedWatch<Self> {
        RetriedWatch::new(self)
    }
}

impl<S: futures::Stream> RetryWithBackoff for S {}

impl<S, K> futures::Stream for RetriedWatch<S>
where
    S: futures::Stream<Item = Result<kube::runtime::watcher::Event<K>, kube::runtime::watcher::Error>>,
{
    type Item = S::Item;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::future::Future as _;
        use std::task::Poll;
        let this = &mut *self;
        if let Some(pause) = &mut this.pause {
            if pause.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.pause = None;
        }
        let item = match this.watch.as_mut().poll_next(cx) {
            Poll::Ready(item) => item,
            Poll::Pending => return Poll::Pending,
        };
        match &item {
            Some(Err(_)) => this.pause = Some(Box::pin(tokio::time::sleep(this.backoff.next_pause()))),
            Some(Ok(kube::runtime::watcher::Event::Init)) | None => {}
            Some(Ok(_)) => this.backoff.reset(),
        }
        Poll::Ready(item)
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
        let client = build(config, Some(Arc::new(|| false)), &ApiTransportMetrics::default()).unwrap();
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

    /// An API server that stays away is asked ever less often, up to every 5 s; one that answers
    /// again resets the pause. The watcher's `Init` before each relist resets nothing.
    #[tokio::test(start_paused = true)]
    async fn a_watch_backs_off_while_its_api_server_is_away_and_resets_once_it_answers() {
        use futures::StreamExt as _;
        use kube::runtime::watcher::{Error, Event};
        let failure = || -> Result<Event<()>, Error> { Err(Error::NoResourceVersion) };
        let mut items = Vec::new();
        for _ in 0..8 {
            items.push(Ok(Event::Init));
            items.push(failure());
        }
        items.extend([Ok(Event::Init), Ok(Event::InitDone), failure(), Ok(Event::Init)]);
        let mut watch = RetriedWatch::new(futures::stream::iter(items));
        let mut pauses = Vec::new();
        let mut last = tokio::time::Instant::now();
        while let Some(item) = watch.next().await {
            if matches!(item, Ok(Event::Init)) {
                pauses.push(last.elapsed());
            }
            last = tokio::time::Instant::now();
        }
        let ms: Vec<u128> = pauses.iter().map(|p| p.as_millis()).collect();
        // Before the first attempt none; then 250 ms doubling to 5 s (±25 % jitter; tokio's timer
        // rounds a sleep up to the next millisecond, so the top of each window is 1 ms wider).
        assert_eq!(ms[0], 0, "{ms:?}");
        for (i, expected) in [250, 500, 1000, 2000, 4000, 5000, 5000, 5000].iter().enumerate() {
            let got = ms[i + 1];
            assert!(
                got * 4 >= expected * 3 && got * 4 <= expected * 5 + 4,
                "pause {i}: {ms:?}"
            );
        }
        // InitDone proved the API server back: the next failure waits the first pause again.
        let after = ms[9];
        assert!((187..=313).contains(&after), "{ms:?}");
    }
}
