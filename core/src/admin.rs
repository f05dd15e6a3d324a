//! The admin HTTP server every agent runs: `/livez`, `/readyz` and `/metrics`.
//!
//! ```text
//!  tasks ──Readiness::set(check, ok)──► Readiness ──► GET /readyz (200 / 503 with the failing checks)
//!                                           └──────► subscribe(): gRPC health follows readiness
//!  metrics ──registered in──► Registry ──► GET /metrics (OpenMetrics text)
//!  GET /livez: 200 while the process serves HTTP; never depends on an API server.
//! ```
//!
//! With [`AdminAccess::token_file`], `/metrics` and an agent's own routes (the host agent's
//! `/tenants`) answer only requests carrying `Authorization: Bearer <the file's token>`; `/livez`
//! and `/readyz` stay open, since kubelet's probes carry no token. With a [`ServingTls`] the port
//! speaks HTTPS only (kubelet's `scheme: HTTPS` probes do not verify the certificate).

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;

use crate::tls::{HANDSHAKE_TIMEOUT, ServingTls};
use crate::token_file::{TokenFileError, read_token_file};

/// Named readiness checks; the process is ready when every check passed and it is not shutting down.
#[derive(Clone)]
pub struct Readiness {
    checks: Arc<Mutex<BTreeMap<&'static str, (bool, String)>>>,
    ready: watch::Sender<bool>,
}

/// Name of the check that fails once shutdown has begun.
const SHUTDOWN_CHECK: &str = "not-shutting-down";

impl Readiness {
    /// Creates readiness with the given checks, all failing.
    pub fn new(checks: &[&'static str]) -> Self {
        let mut map: BTreeMap<_, _> = checks.iter().map(|c| (*c, (false, String::new()))).collect();
        map.insert(SHUTDOWN_CHECK, (true, String::new()));
        let (ready, _) = watch::channel(false);
        Self {
            checks: Arc::new(Mutex::new(map)),
            ready,
        }
    }

    /// Sets one check. Unknown names are added (so a typo shows up in `/readyz`).
    pub fn set(&self, check: &'static str, ok: bool) {
        self.set_with_detail(check, ok, String::new());
    }

    /// Sets one check with a detail shown after its state in `/readyz` (e.g. who leads).
    pub fn set_with_detail(&self, check: &'static str, ok: bool, detail: String) {
        let mut checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        checks.insert(check, (ok, detail));
        self.publish(&checks);
    }

    /// Removes checks that no longer apply (e.g. a standby replica's work checks).
    pub fn remove(&self, names: &[&'static str]) {
        let mut checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        for name in names {
            checks.remove(name);
        }
        self.publish(&checks);
    }

    fn publish(&self, checks: &BTreeMap<&'static str, (bool, String)>) {
        let all = checks.values().all(|(ok, _)| *ok);
        self.ready.send_if_modified(|r| std::mem::replace(r, all) != all);
    }

    /// Marks the process as shutting down: never ready again.
    pub fn shutting_down(&self) {
        self.set(SHUTDOWN_CHECK, false);
    }

    /// Whether every check passes.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Follows readiness; wakes only when it changes.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// The state of every check, in kube-apiserver's `/readyz?verbose` style.
    pub fn report(&self) -> String {
        let checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        for (name, (ok, detail)) in checks.iter() {
            out.push_str(&format!(
                "[{}]{name} {}{}{detail}\n",
                if *ok { '+' } else { '-' },
                if *ok { "ok" } else { "failed" },
                if detail.is_empty() { "" } else { ": " },
            ));
        }
        out
    }
}

#[derive(Clone)]
struct AdminState {
    readiness: Readiness,
    registry: Arc<Registry>,
}

/// Registers `rcsync_ready` (1 while `/readyz` would answer 200, else 0) and keeps it current, so
/// alerts can tell "not ready" from "not scraped".
pub fn register_ready_gauge(registry: &mut prometheus_client::registry::Registry, readiness: &Readiness) {
    let gauge: prometheus_client::metrics::gauge::Gauge = Default::default();
    registry.sub_registry_with_prefix("rcsync").register(
        "ready",
        "1 while the agent is ready (its /readyz answers 200), 0 otherwise",
        gauge.clone(),
    );
    let mut ready = readiness.subscribe();
    tokio::spawn(async move {
        loop {
            gauge.set(i64::from(*ready.borrow_and_update()));
            if ready.changed().await.is_err() {
                return;
            }
        }
    });
}

/// The health of an agent's Kubernetes watches, for alerts: `rcsync_watch_errors_total{watch}`
/// counts failed attempts (each retried with backoff while the last good state is served), and
/// `rcsync_watch_failing{watch}` is 1 from a failed attempt until the watch delivers again. Readiness
/// deliberately does not follow a watch: serving the last good state beats taking every tenant
/// out of service while an API server or a permission is broken, but an operator must know.
#[derive(Clone)]
pub struct WatchHealth {
    errors: Family<WatchLabels, Counter>,
    failing: Family<WatchLabels, Gauge>,
}

/// The label of [`WatchHealth`]'s metrics: which watch (`runtimeclasses`, `pods`, ...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WatchLabels {
    /// The watched resource, as its plural name.
    pub watch: String,
}

impl WatchHealth {
    /// Registers the metrics with a series for each of `watches` from the start (at 0), so an
    /// alert on them has data before the first failure.
    pub fn register(registry: &mut Registry, watches: &[&str]) -> Self {
        let health = Self {
            errors: Family::default(),
            failing: Family::default(),
        };
        let registry = registry.sub_registry_with_prefix("rcsync");
        registry.register(
            "watch_errors",
            "Failed attempts of a Kubernetes watch (each retried with backoff; the last good state is served meanwhile)",
            health.errors.clone(),
        );
        registry.register(
            "watch_failing",
            "1 from a failed attempt of a Kubernetes watch until it delivers again, else 0",
            health.failing.clone(),
        );
        for watch in watches {
            let labels = WatchLabels {
                watch: (*watch).to_string(),
            };
            let _ = health.errors.get_or_create(&labels);
            let _ = health.failing.get_or_create(&labels);
        }
        health
    }

    /// Records one item of the watch `watch`: an error counts and marks it failing, anything else
    /// marks it healthy.
    pub fn observe<T, E>(&self, watch: &str, item: &Result<T, E>) {
        self.record(
            &WatchLabels {
                watch: watch.to_string(),
            },
            item.is_ok(),
        );
    }

    fn record(&self, labels: &WatchLabels, ok: bool) {
        if ok {
            self.failing.get_or_create(labels).set(0);
        } else {
            self.errors.get_or_create(labels).inc();
            self.failing.get_or_create(labels).set(1);
        }
    }

    /// `events` with every item recorded under `watch`.
    pub fn follow<S, T, E>(
        &self,
        watch: String,
        events: S,
    ) -> impl futures::Stream<Item = Result<T, E>> + Send + use<S, T, E>
    where
        S: futures::Stream<Item = Result<T, E>> + Send,
    {
        let health = self.clone();
        let labels = WatchLabels { watch };
        futures::StreamExt::inspect(events, move |item| health.record(&labels, item.is_ok()))
    }
}

/// Who may read the admin port's data: `/metrics` and an agent's own routes (the host agent's
/// `/tenants` lists every tenant's classes and last error). `/livez` and `/readyz` are always open.
#[derive(Clone, Debug, Default)]
pub struct AdminAccess {
    token_file: Option<PathBuf>,
}

impl AdminAccess {
    /// Anyone who reaches the port (for a port that only the monitoring namespace can reach).
    pub fn open() -> Self {
        Self::default()
    }

    /// Callers presenting the token in `path` (surrounding whitespace ignored). The file is read
    /// now, so a missing or empty one stops the agent at start, and again at each request, so a
    /// rotated Secret applies at once.
    pub fn token_file(path: PathBuf) -> Result<Self, TokenFileError> {
        read_token(&path)?;
        Ok(Self {
            token_file: Some(path),
        })
    }
}

/// What the admin token file is called in errors.
const ADMIN_TOKEN_FILE: &str = "admin token file";

/// The admin token in `path`.
pub(crate) fn read_token(path: &Path) -> Result<String, TokenFileError> {
    read_token_file(path, ADMIN_TOKEN_FILE)
}

/// Equal, in a time that depends on the lengths only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

async fn require_token(State(access): State<AdminAccess>, request: Request, next: Next) -> Response {
    let Some(path) = &access.token_file else {
        return next.run(request).await;
    };
    let expected = match read_token(path) {
        Ok(token) => token,
        Err(e) => {
            tracing::warn!(error = %e, path = %request.uri().path(), "refusing an admin request: no usable token");
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "the admin token file cannot be used; see the agent's log\n",
            )
                .into_response();
        }
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(token) if constant_time_eq(token.trim().as_bytes(), expected.as_bytes()) => {
            next.run(request).await
        }
        _ => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "this admin route needs `Authorization: Bearer <token>` (the agent's --admin-token-file)\n",
        )
            .into_response(),
    }
}

/// The admin routes (plus an agent's own `extra` routes), `/metrics` and `extra` behind `access`.
pub fn admin_router(
    readiness: Readiness,
    registry: Arc<Registry>,
    extra: Option<Router>,
    access: AdminAccess,
) -> Router {
    let state = AdminState { readiness, registry };
    let data = Router::new()
        .route("/metrics", get(metrics))
        .with_state(state.clone());
    let data = match extra {
        Some(extra) => data.merge(extra),
        None => data,
    };
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
        .merge(data.layer(axum::middleware::from_fn_with_state(access, require_token)))
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    let mut body = state.readiness.report();
    if state.readiness.is_ready() {
        body.push_str("readyz check passed\n");
        (StatusCode::OK, body)
    } else {
        body.push_str("readyz check failed\n");
        (StatusCode::SERVICE_UNAVAILABLE, body)
    }
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("encoding metrics failed: {e}\n"),
        ),
    }
}

/// How an agent serves its admin port: who may read its data, over what, and how many
/// connections at once.
pub struct AdminServing {
    /// Who may read `/metrics` and the agent's own routes.
    pub access: AdminAccess,
    /// HTTPS when set.
    pub tls: Option<ServingTls>,
    /// Connections open at once; past it a new one is closed at once (before any TLS handshake),
    /// so a client holding connections cannot take the file descriptors the gRPC port needs.
    pub max_connections: std::num::NonZeroUsize,
}

/// Serves the admin routes (plus an agent's own `extra` routes, behind `serving.access` with
/// `/metrics`) on `listener` until `shutdown` completes.
pub async fn serve_admin(
    listener: TcpListener,
    readiness: Readiness,
    registry: Arc<Registry>,
    extra: Option<Router>,
    serving: AdminServing,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = admin_router(readiness, registry, extra, serving.access);
    let places = Places::new(serving.max_connections);
    match serving.tls {
        Some(tls) => {
            axum::serve(TlsListener::new(listener, places, tls)?, router)
                .with_graceful_shutdown(shutdown)
                .await
        }
        None => {
            axum::serve(CappedListener { listener, places }, router)
                .with_graceful_shutdown(shutdown)
                .await
        }
    }
}

/// The admin port's connection places.
#[derive(Clone)]
struct Places {
    free: Arc<tokio::sync::Semaphore>,
    max: usize,
    last_warned: Arc<Mutex<Option<std::time::Instant>>>,
}

impl Places {
    fn new(max: std::num::NonZeroUsize) -> Self {
        Self {
            free: Arc::new(tokio::sync::Semaphore::new(max.get())),
            max: max.get(),
            last_warned: Arc::default(),
        }
    }

    /// Accepts the next connection that gets a place (TCP_NODELAY set); the others are closed at
    /// once, logged at most every 10 s. A failed accept (out of file descriptors) is retried after
    /// a pause, not in a busy loop.
    async fn accept(&self, listener: &TcpListener) -> (Placed, std::net::SocketAddr) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting an admin connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            match self.free.clone().try_acquire_owned() {
                Ok(place) => return (Placed::new(stream, place), peer),
                Err(_) => {
                    drop(stream);
                    let mut last = self.last_warned.lock().unwrap_or_else(|e| e.into_inner());
                    if last.is_none_or(|at| at.elapsed() >= std::time::Duration::from_secs(10)) {
                        *last = Some(std::time::Instant::now());
                        tracing::warn!(%peer, max = self.max, "admin port connections at their cap: closing new ones (--admin-max-connections)");
                    }
                }
            }
        }
    }
}

/// How long an admin connection may stay silent both ways before it is closed: an idle
/// keep-alive connection, or one that never sends its request, does not hold a place for ever
/// (axum's server sets no read timeout of its own). Longer than the usual scrape interval (one
/// minute), so a scraper's kept-alive connection is not closed just as it is reused.
pub const ADMIN_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// An admin connection holding its place until it closes, and closed (read as ended) after
/// [`ADMIN_IDLE_TIMEOUT`] without a byte read or written.
struct Placed {
    stream: TcpStream,
    _place: tokio::sync::OwnedSemaphorePermit,
    idle: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl Placed {
    fn new(stream: TcpStream, place: tokio::sync::OwnedSemaphorePermit) -> Self {
        Self {
            stream,
            _place: place,
            idle: Box::pin(tokio::time::sleep(ADMIN_IDLE_TIMEOUT)),
        }
    }

    fn active(&mut self) {
        self.idle
            .as_mut()
            .reset(tokio::time::Instant::now() + ADMIN_IDLE_TIMEOUT);
    }
}

impl tokio::io::AsyncRead for Placed {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match std::pin::Pin::new(&mut self.stream).poll_read(cx, buf) {
            std::task::Poll::Ready(Ok(())) if buf.filled().len() > before => {
                self.active();
                std::task::Poll::Ready(Ok(()))
            }
            std::task::Poll::Pending => match self.idle.as_mut().poll(cx) {
                // Silent too long: read as the end of the connection.
                std::task::Poll::Ready(()) => std::task::Poll::Ready(Ok(())),
                std::task::Poll::Pending => std::task::Poll::Pending,
            },
            other => other,
        }
    }
}

impl tokio::io::AsyncWrite for Placed {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let written = std::pin::Pin::new(&mut self.stream).poll_write(cx, buf);
        if matches!(written, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.active();
        }
        written
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let written = std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if matches!(written, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.active();
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The admin port's plaintext connections, each with a place.
struct CappedListener {
    listener: TcpListener,
    places: Places,
}

impl axum::serve::Listener for CappedListener {
    type Io = Placed;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        self.places.accept(&self.listener).await
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// The admin port's connections, TLS done. Each takes a place first, then runs its handshake in a
/// task of its own (with a deadline), so a slow or silent client holds up no probe.
struct TlsListener {
    local: std::net::SocketAddr,
    handshaken: tokio::sync::mpsc::Receiver<(TlsStream<Placed>, std::net::SocketAddr)>,
    accepting: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    fn new(listener: TcpListener, places: Places, tls: ServingTls) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, handshaken) = tokio::sync::mpsc::channel(16);
        let accepting = tokio::spawn(async move {
            loop {
                let (stream, peer) = places.accept(&listener).await;
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "admin TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "admin TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self {
            local,
            handshaken,
            accepting,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<Placed>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.handshaken.recv().await {
            Some(accepted) => accepted,
            // The accepting task ends only with this listener.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get_status(router: &Router, path: &str, bearer: Option<&str>) -> StatusCode {
        use tower::ServiceExt as _;
        let mut request = axum::http::Request::get(path);
        if let Some(token) = bearer {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        router
            .clone()
            .oneshot(request.body(axum::body::Body::empty()).unwrap())
            .await
            .unwrap()
            .status()
    }

    #[tokio::test]
    async fn with_a_token_file_only_the_probes_answer_without_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        let readiness = Readiness::new(&[]);
        let extra = Router::new().route("/tenants", get(|| async { "every tenant\n" }));
        let router = admin_router(
            readiness,
            Arc::new(Registry::default()),
            Some(extra),
            AdminAccess::token_file(file.clone()).unwrap(),
        );
        assert_eq!(get_status(&router, "/livez", None).await, StatusCode::OK);
        assert_ne!(
            get_status(&router, "/readyz", None).await,
            StatusCode::UNAUTHORIZED,
            "the readiness probe carries no token"
        );
        for path in ["/metrics", "/tenants"] {
            assert_eq!(
                get_status(&router, path, None).await,
                StatusCode::UNAUTHORIZED,
                "{path}"
            );
            assert_eq!(
                get_status(&router, path, Some("s3cre")).await,
                StatusCode::UNAUTHORIZED,
                "{path}"
            );
            assert_eq!(
                get_status(&router, path, Some("s3cret")).await,
                StatusCode::OK,
                "{path}"
            );
        }
        // A rotated token applies at the next request.
        std::fs::write(&file, "rotated").unwrap();
        assert_eq!(
            get_status(&router, "/tenants", Some("s3cret")).await,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            get_status(&router, "/tenants", Some("rotated")).await,
            StatusCode::OK
        );
        // Without a token file, everything is open.
        let open = admin_router(
            Readiness::new(&[]),
            Arc::new(Registry::default()),
            None,
            AdminAccess::open(),
        );
        assert_eq!(get_status(&open, "/metrics", None).await, StatusCode::OK);
    }

    /// An open admin port on loopback keeping at most `max` connections, until `shutdown`.
    async fn open_admin_port(
        max: usize,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let serving = tokio::spawn(serve_admin(
            listener,
            Readiness::new(&[]),
            Arc::new(Registry::default()),
            None,
            AdminServing {
                access: AdminAccess::open(),
                tls: None,
                max_connections: std::num::NonZeroUsize::new(max).unwrap(),
            },
            shutdown,
        ));
        (address, serving)
    }

    #[tokio::test]
    async fn connections_past_the_cap_are_closed_at_once_and_a_closed_one_frees_its_place() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (address, serving) = open_admin_port(2, async {
            let _ = stopped.await;
        })
        .await;
        let livez = || async move {
            let mut stream = TcpStream::connect(address).await.ok()?;
            stream.write_all(b"GET /livez HTTP/1.0\r\n\r\n").await.ok()?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.ok()?;
            answer.starts_with("HTTP/1.0 200").then_some(())
        };
        assert!(livez().await.is_some());
        // Two idle connections hold both places (each answered once it is accepted).
        let first = TcpStream::connect(address).await.unwrap();
        let _second = TcpStream::connect(address).await.unwrap();
        // The third is closed at once: EOF, no answer.
        let mut third = TcpStream::connect(address).await.unwrap();
        let _ = third.write_all(b"GET /livez HTTP/1.0\r\n\r\n").await;
        let mut answer = Vec::new();
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), third.read_to_end(&mut answer))
            .await
            .expect("a connection past the cap is closed, not left waiting");
        assert!(
            read.is_err() || answer.is_empty(),
            "{:?}",
            String::from_utf8_lossy(&answer)
        );
        drop(first);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while livez().await.is_none() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "a freed place is never given again"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let _ = stop.send(());
        serving.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_silent_past_the_idle_timeout_is_closed() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (address, _serving) = open_admin_port(4, std::future::pending()).await;
        // One that never sends its request, and one idle after an answer (HTTP/1.1 keep-alive).
        let mut silent = TcpStream::connect(address).await.unwrap();
        let mut kept = TcpStream::connect(address).await.unwrap();
        kept.write_all(b"GET /livez HTTP/1.1\r\nHost: admin\r\n\r\n")
            .await
            .unwrap();
        let mut answer = [0u8; 256];
        let n = kept.read(&mut answer).await.unwrap();
        assert!(
            answer[..n].starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&answer[..n])
        );
        for stream in [&mut silent, &mut kept] {
            let mut rest = Vec::new();
            let ended = tokio::time::timeout(ADMIN_IDLE_TIMEOUT * 2, stream.read_to_end(&mut rest)).await;
            assert!(
                ended.is_ok(),
                "a silent connection is still open after twice the idle timeout"
            );
        }
    }

    #[test]
    fn an_unusable_token_file_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let e = AdminAccess::token_file(missing.clone()).unwrap_err().to_string();
        assert!(e.contains(&missing.display().to_string()), "{e}");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, " \n").unwrap();
        let e = AdminAccess::token_file(empty.clone()).unwrap_err().to_string();
        assert_eq!(e, format!("the admin token file {} is empty", empty.display()));
    }

    #[test]
    fn watch_health_counts_failures_and_clears_on_the_next_event() {
        let mut registry = Registry::default();
        let health = WatchHealth::register(&mut registry, &["pods"]);
        let encode = |registry: &Registry| {
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
            out
        };
        let text = encode(&registry);
        assert!(
            text.contains("rcsync_watch_errors_total{watch=\"pods\"} 0"),
            "{text}"
        );
        assert!(text.contains("rcsync_watch_failing{watch=\"pods\"} 0"), "{text}");
        health.observe::<(), &str>("pods", &Err("403 Forbidden"));
        health.observe::<(), &str>("pods", &Err("403 Forbidden"));
        let text = encode(&registry);
        assert!(
            text.contains("rcsync_watch_errors_total{watch=\"pods\"} 2"),
            "{text}"
        );
        assert!(text.contains("rcsync_watch_failing{watch=\"pods\"} 1"), "{text}");
        health.observe::<(), &str>("pods", &Ok(()));
        let text = encode(&registry);
        assert!(text.contains("rcsync_watch_failing{watch=\"pods\"} 0"), "{text}");
        assert!(
            text.contains("rcsync_watch_errors_total{watch=\"pods\"} 2"),
            "{text}"
        );
    }

    #[test]
    fn ready_only_when_every_check_passes() {
        let r = Readiness::new(&["a", "b"]);
        let mut rx = r.subscribe();
        assert!(!r.is_ready());
        r.set("a", true);
        assert!(!r.is_ready());
        assert!(!rx.has_changed().unwrap(), "unchanged readiness wakes nobody");
        r.set("b", true);
        assert!(r.is_ready());
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        r.set("b", true);
        assert!(!rx.has_changed().unwrap());
        r.shutting_down();
        assert!(!r.is_ready());
        assert!(
            r.report().contains("[-]not-shutting-down failed"),
            "{}",
            r.report()
        );
    }
}
