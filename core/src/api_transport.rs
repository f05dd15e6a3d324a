//! The agents' transport to a Kubernetes API server: HTTP/2 where the API server offers it,
//! HTTP/1.1 otherwise (feature `kube`).
//!
//! ```text
//!  kube::Client ─► auth, retry, … layers ─► ApiTransport ─┬─ https, ALPN h2 ─► a few HTTP/2
//!                                                         │   connections, at most 64 requests
//!                                                         │   (watches included) on each
//!                                                         └─ otherwise ─► hyper's HTTP/1.1 pool,
//!                                                             one connection per request in flight
//! ```
//!
//! kube-rs speaks HTTP/1.1 only, where every watch holds a connection of its own: a host agent
//! serving 1,000 tenants' Pod status streams held 4,000 TLS connections to the API server and
//! about 145 KiB of buffers per tenant. Over HTTP/2, as client-go does by default, watches are
//! streams of shared connections.
//!
//! What HTTP/2 changes, and how it is handled:
//! - The API server allows a number of concurrent streams per connection (kube-apiserver: 100;
//!   hyper's default: 200). A request past that limit waits for a stream to end, and a watch
//!   never ends: so each connection carries at most [`STREAMS_PER_CONNECTION`] requests, and
//!   another connection is dialled when all are full.
//! - One stalled reader must not stall the others: the connection's flow-control window is 1 GiB
//!   (client-go's), each stream's 4 MiB, so a watch nobody reads holds at most its own window.
//! - A dead connection ends all its streams at once: PINGs every 30 s (an answer within 20 s)
//!   find it, its watches fail and start again on a new one. A connection that is closing
//!   (GOAWAY) takes no new requests; a request it refused unsent goes to another.
//! - The socket's read timeout no longer bounds a request (the PINGs keep the socket busy): the
//!   response head must come within the config's read timeout instead.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::client::legacy::connect::Connection;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use kube::client::Body;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Requests one HTTP/2 connection carries at a time: under kube-apiserver's limit of 100
/// concurrent streams (with room for streams the server has not yet seen end).
pub const STREAMS_PER_CONNECTION: usize = 64;

const PING_INTERVAL: Duration = Duration::from_secs(30);
const PING_TIMEOUT: Duration = Duration::from_secs(20);
const CONNECTION_WINDOW: u32 = 1 << 30;
const STREAM_WINDOW: u32 = 4 << 20;

/// Errors of the transport.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What dials the API server: a connector (TCP, TLS, timeouts) whose connections say which
/// protocol TLS negotiated.
pub trait Dial:
    tower::Service<Uri, Response = Self::Io, Error: Into<BoxError>, Future: Unpin + Send>
    + Clone
    + Send
    + Sync
    + 'static
{
    /// A connection.
    type Io: hyper::rt::Read + hyper::rt::Write + Connection + Unpin + Send + 'static;
}

impl<C, T> Dial for C
where
    C: tower::Service<Uri, Response = T> + Clone + Send + Sync + 'static,
    C::Error: Into<BoxError>,
    C::Future: Unpin + Send,
    T: hyper::rt::Read + hyper::rt::Write + Connection + Unpin + Send + 'static,
{
    type Io = T;
}

/// How an agent is connected to its API servers, on `/metrics` (shared by every client the
/// metrics are given to; counting whether registered or not).
#[derive(Clone, Debug, Default)]
pub struct ApiTransportMetrics {
    connections: Gauge,
    requests: Gauge,
    http1_only: Gauge,
}

impl ApiTransportMetrics {
    /// Registers `rcsync_api_http2_connections`, `rcsync_api_http2_requests` and
    /// `rcsync_api_http1_only`.
    pub fn register(&self, registry: &mut Registry) {
        let registry = registry.sub_registry_with_prefix("rcsync_api");
        registry.register(
            "http2_connections",
            "HTTP/2 connections open to the Kubernetes API server",
            self.connections.clone(),
        );
        registry.register(
            "http2_requests",
            "Requests in flight over HTTP/2 connections to the Kubernetes API server, watches included (at most 64 per connection)",
            self.requests.clone(),
        );
        registry.register(
            "http1_only",
            "1 when the Kubernetes API server offered no HTTP/2, so every request, every watch included, holds a connection of its own",
            self.http1_only.clone(),
        );
    }
}

/// A tower service sending requests to an API server (see the module docs). Cheap to clone:
/// clones share the connections.
pub struct ApiTransport<C> {
    shared: Arc<Shared<C>>,
}

impl<C> Clone for ApiTransport<C> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

struct Shared<C> {
    connector: C,
    http1: hyper_util::client::legacy::Client<C, Body>,
    connections: Mutex<Vec<Multiplexed>>,
    /// One dial at a time: a burst of requests finding every connection full opens one more, not
    /// one each.
    dialing: tokio::sync::Mutex<()>,
    /// The API server did not offer HTTP/2 (ALPN): every request goes over HTTP/1.1.
    http1_only: AtomicBool,
    head_timeout: Option<Duration>,
    metrics: ApiTransportMetrics,
}

/// One HTTP/2 connection and the requests it carries.
struct Multiplexed {
    origin: String,
    sender: SendRequest<Body>,
    streams: Arc<AtomicUsize>,
}

impl<C> ApiTransport<C>
where
    C: Dial,
{
    /// A transport dialling with `connector` (whose TLS offers `h2` where HTTP/2 is wanted); a
    /// response head must come within `head_timeout` (none: no limit); counted in `metrics`.
    pub fn new(connector: C, head_timeout: Option<Duration>, metrics: ApiTransportMetrics) -> Self {
        let http1 = hyper_util::client::legacy::Builder::new(TokioExecutor::new())
            .build::<_, Body>(connector.clone());
        Self {
            shared: Arc::new(Shared {
                connector,
                http1,
                connections: Mutex::new(Vec::new()),
                dialing: tokio::sync::Mutex::new(()),
                http1_only: AtomicBool::new(false),
                head_timeout,
                metrics,
            }),
        }
    }
}

impl<C> ApiTransport<C> {
    /// The HTTP/2 connections open now.
    pub fn multiplexed_connections(&self) -> usize {
        let connections = self.shared.connections.lock().expect("not poisoned");
        connections.iter().filter(|c| !c.sender.is_closed()).count()
    }

    /// Whether the API server turned out not to offer HTTP/2 (every request goes over HTTP/1.1).
    pub fn http1_only(&self) -> bool {
        self.shared.http1_only.load(Ordering::Relaxed)
    }
}

impl<C> tower::Service<Request<Body>> for ApiTransport<C>
where
    C: Dial,
{
    type Response = Response<ApiBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        Box::pin(self.shared.clone().send(request))
    }
}

impl<C> Shared<C>
where
    C: Dial,
{
    async fn send(self: Arc<Self>, mut request: Request<Body>) -> Result<Response<ApiBody>, BoxError> {
        let multiplexed = request.uri().scheme() == Some(&http::uri::Scheme::HTTPS)
            && !self.http1_only.load(Ordering::Relaxed);
        if !multiplexed {
            return self.send_http1(request).await;
        }
        let origin = origin(request.uri());
        // A connection that closed under the request before sending it gets it back: it goes to
        // another (once; a second such failure is the error).
        let mut retried = false;
        loop {
            let Some((mut sender, slot)) = self.checkout(&origin, request.uri()).await? else {
                return self.send_http1(request).await;
            };
            let sent = sender.try_send_request(request);
            let answer = match self.head_timeout {
                Some(limit) => tokio::time::timeout(limit, sent)
                    .await
                    .map_err(|_| format!("the API server sent no response within {limit:?}"))?,
                None => sent.await,
            };
            match answer {
                Ok(response) => return Ok(response.map(|body| ApiBody::new(body, Some(slot)))),
                Err(mut error) => match error.take_message() {
                    Some(unsent) if !retried => {
                        retried = true;
                        request = unsent;
                    }
                    _ => return Err(error.into_error().into()),
                },
            }
        }
    }

    async fn send_http1(&self, request: Request<Body>) -> Result<Response<ApiBody>, BoxError> {
        let response = self.http1.request(request).await?;
        Ok(response.map(|body| ApiBody::new(body, None)))
    }

    /// A connection to `origin` with room for one more request and that request's place on it;
    /// `None` when the API server speaks HTTP/1.1 only.
    async fn checkout(
        &self,
        origin: &str,
        uri: &Uri,
    ) -> Result<Option<(SendRequest<Body>, StreamSlot)>, BoxError> {
        if let Some(found) = self.with_room(origin) {
            return Ok(Some(found));
        }
        let _dialing = self.dialing.lock().await;
        if let Some(found) = self.with_room(origin) {
            return Ok(Some(found));
        }
        if self.http1_only.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let io = tower::ServiceExt::oneshot(self.connector.clone(), uri.clone())
            .await
            .map_err(|e| format!("connecting to the API server {origin}: {}", e.into()))?;
        if !io.connected().is_negotiated_h2() {
            tracing::info!(api_server = %origin, "the API server does not offer HTTP/2: one connection per request in flight (every watch holds one)");
            self.http1_only.store(true, Ordering::Relaxed);
            self.metrics.http1_only.set(1);
            return Ok(None);
        }
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(PING_INTERVAL)
            .keep_alive_timeout(PING_TIMEOUT)
            .keep_alive_while_idle(true)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .initial_stream_window_size(STREAM_WINDOW)
            .handshake(io)
            .await?;
        let label = origin.to_string();
        let open = self.metrics.connections.clone();
        open.inc();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(api_server = %label, error = %e, "an HTTP/2 connection to the API server ended");
            }
            open.dec();
        });
        let mut connections = self.connections.lock().expect("not poisoned");
        connections.push(Multiplexed {
            origin: origin.to_string(),
            sender,
            streams: Arc::new(AtomicUsize::new(0)),
        });
        Ok(Some(self.take_room(connections.last().expect("just pushed"))))
    }

    /// The first open connection to `origin` with room for a request (forgetting closed ones).
    fn with_room(&self, origin: &str) -> Option<(SendRequest<Body>, StreamSlot)> {
        let mut connections = self.connections.lock().expect("not poisoned");
        connections.retain(|c| !c.sender.is_closed());
        connections
            .iter()
            .find(|c| c.origin == origin && c.streams.load(Ordering::Relaxed) < STREAMS_PER_CONNECTION)
            .map(|c| self.take_room(c))
    }

    /// A place for one request on `connection`.
    fn take_room(&self, connection: &Multiplexed) -> (SendRequest<Body>, StreamSlot) {
        connection.streams.fetch_add(1, Ordering::Relaxed);
        self.metrics.requests.inc();
        let slot = StreamSlot {
            on_connection: connection.streams.clone(),
            in_flight: self.metrics.requests.clone(),
        };
        (connection.sender.clone(), slot)
    }
}

/// `scheme://authority` of `uri`.
fn origin(uri: &Uri) -> String {
    format!(
        "{}://{}",
        uri.scheme_str().unwrap_or("https"),
        uri.authority().map_or("", |a| a.as_str())
    )
}

/// A request's place on an HTTP/2 connection, given back when its response ends or is dropped.
struct StreamSlot {
    on_connection: Arc<AtomicUsize>,
    in_flight: Gauge,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.on_connection.fetch_sub(1, Ordering::Relaxed);
        self.in_flight.dec();
    }
}

/// A response body from the API server; over HTTP/2 it holds the request's place on its
/// connection until it ends.
pub struct ApiBody {
    body: Incoming,
    slot: Option<StreamSlot>,
}

impl ApiBody {
    fn new(body: Incoming, slot: Option<StreamSlot>) -> Self {
        Self { body, slot }
    }
}

impl hyper::body::Body for ApiBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let frame = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(frame, Poll::Ready(None | Some(Err(_)))) {
            self.slot = None;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}
