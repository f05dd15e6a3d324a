//! Serving the gRPC port on two runtimes: one for connections that carry unary calls (CheckPod,
//! PodSync, health), one for the connections that carry Sync streams.
//!
//! ```text
//!   accept ──► connection task on the main runtime ──► CheckPod, PodSync, health ...
//!                        │
//!                        │ first Sync request on it
//!                        ▼
//!              connection task moved to the streams runtime ──► Sync fan-out, socket writes
//! ```
//!
//! hyper drives each HTTP/2 connection from one task, and that task writes every response on
//! it. When a class change fans out to 1,000 streams, 1,000 connection tasks are runnable at
//! once; on the runtime that also serves CheckPod, a CheckPod arriving mid-burst waits behind all
//! of them. So a connection starts on the main runtime and, the moment a Sync request arrives on
//! it, its task (the same pinned hyper connection) is handed to the streams runtime, with every
//! request task spawned from then on, and its socket re-registered with the streams runtime's
//! I/O driver ([`MovableTcp`]), so the main runtime does not even dispatch its readiness. Unary
//! calls then never queue behind a fan-out, unless a client multiplexes them onto the connection
//! of its Sync stream (the virtual agent does not).
//!
//! The rest is what `tonic::transport::Server` does per connection: HTTP/2 only, the peer's
//! connect info (address, TLS certificates) in every request's extensions, the client's
//! `grpc-timeout` honoured, and on shutdown a GOAWAY to every connection and a wait until they
//! have closed.
//!
//! A connection whose peer's credentials stop being accepted while it is open (its client
//! certificate expires, or a reloaded client CA refuses it: see [`PeerCheck`]) is closed the
//! same way: a GOAWAY, its open requests (refused or ended by the authenticator) given
//! [`REVOKED_CONNECTION_GRACE`] to finish, then the socket closed.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt as _};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::{Notify, OwnedSemaphorePermit, watch};
use tonic::Status;
use tonic::service::Routes;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::grpc::sync::SYNC as SYNC_PATH;

/// How long the accept loop pauses after a failed accept.
pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// How many requests a client may have open at once on one connection (HTTP/2
/// `SETTINGS_MAX_CONCURRENT_STREAMS`; clients queue the rest). Each open request holds a task and
/// up to a message of buffer, so one connection must not open them without end (hyper's default is
/// 200; a virtual agent needs a few dozen).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// How long a connection whose peer's credentials were revoked may take to close after its
/// GOAWAY before its socket is closed under it (its streams end at the revocation already; what
/// may still run is a unary call, which the authenticator refuses or lets finish).
pub const REVOKED_CONNECTION_GRACE: Duration = Duration::from_secs(10);

/// What a connection's peer presented at its handshake (read from the connection's connect
/// info, `C`, once, when it is accepted), and what ends the connection before its client does.
pub trait PeerCheck<C>: Send + Sync + 'static {
    /// What each request of the connection carries about its peer, in its extensions.
    type Peer: Clone + Send + Sync + 'static;

    /// The peer of a connection, from its connect info; `None` when it presented nothing.
    fn peer(&self, connection: &C) -> Option<Self::Peer>;

    /// A future that resolves, with the reason, once what `peer` presented is no longer
    /// accepted; `None` when nothing will end it.
    fn revoked(&self, peer: &Self::Peer) -> Option<Revoked>;
}

/// Resolves, with the reason, once a connection's peer is no longer accepted.
pub type Revoked = Pin<Box<dyn Future<Output = String> + Send>>;

/// Nothing ends a connection for its peer (plaintext: there is no handshake to revoke).
impl<C> PeerCheck<C> for () {
    type Peer = ();

    fn peer(&self, _connection: &C) -> Option<()> {
        None
    }

    fn revoked(&self, _peer: &()) -> Option<Revoked> {
        None
    }
}

/// How the server finds connections whose peer is gone without closing them (a node that lost
/// power, a partition that drops packets): an HTTP/2 PING after `interval` without hearing from
/// the peer, and the connection closed when no answer came within `timeout`. Until then such a
/// connection's Sync streams hold their tenant's `syncStreams` places, and nothing else would
/// notice while no class changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    /// Quiet time before a PING.
    pub interval: Duration,
    /// How long a PING may go unanswered.
    pub timeout: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(30),
            timeout: Duration::from_secs(10),
        }
    }
}

/// What the server counts of its connections.
#[derive(Clone, Debug, Default)]
pub struct ConnectionMetrics {
    /// Connections open now.
    pub open: Gauge,
    /// Connections closed because their peer was revoked (see [`PeerCheck`]).
    pub revoked: Counter,
}

/// Serves `routes` on the connections of `incoming` until `shutdown` turns true, then sends each
/// connection a GOAWAY and returns once all of them have closed. A connection `peers` finds
/// revoked is closed the same way.
pub async fn serve<I, IO, E>(
    routes: Routes,
    incoming: I,
    streams: Handle,
    keepalive: Keepalive,
    connections: ConnectionMetrics,
    peers: impl PeerCheck<IO::ConnectInfo>,
    mut shutdown: watch::Receiver<bool>,
) where
    I: Stream<Item = Result<IO, E>>,
    IO: AsyncRead + AsyncWrite + Connected + Movable + Unpin + Send + 'static,
    E: std::fmt::Display,
{
    let main = Handle::current();
    // Every connection task holds a receiver; the sender's `closed` is the drain.
    let (drain_tx, drain_rx) = watch::channel(());
    let mut incoming = Box::pin(incoming);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => break,
            accepted = incoming.next() => accepted,
        };
        let io = match accepted {
            Some(Ok(io)) => io,
            Some(Err(e)) => {
                // Out of file descriptors, every accept fails until one is freed: pause rather
                // than spin (the TLS acceptor does the same).
                tracing::warn!(error = %e, "accepting a gRPC connection failed");
                tokio::select! {
                    _ = shutdown.wait_for(|stop| *stop) => break,
                    () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                }
            }
            None => break,
        };
        let home = Arc::new(Home {
            main: main.clone(),
            streams: streams.clone(),
            streaming: AtomicBool::new(false),
            moved: Notify::new(),
        });
        let rehome = io.rehome_signal();
        let connect_info = io.connect_info();
        let peer = peers.peer(&connect_info);
        let revoked = peer.as_ref().and_then(|peer| peers.revoked(peer));
        let service = ConnectionService {
            routes: routes.clone(),
            connect_info,
            peer,
            home: home.clone(),
        };
        let connection = http2::Builder::new(HomeExecutor(home.clone()))
            .timer(TokioTimer::new())
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .keep_alive_interval(keepalive.interval)
            .keep_alive_timeout(keepalive.timeout)
            .serve_connection(TokioIo::new(io), service);
        let driver = Driver {
            connection: Box::pin(connection),
            home,
            rehome,
            shutdown: shutdown.clone(),
            closing: false,
            revoked,
            grace: None,
            _open: Open::counted(&connections.open),
            revoked_total: connections.revoked.clone(),
            _drain: drain_rx.clone(),
        };
        tokio::spawn(driver.on_main());
    }
    // Stop accepting (the listener closes with `incoming`), then drain.
    drop(incoming);
    drop(drain_rx);
    drain_tx.closed().await;
}

/// Where a connection's tasks run, and whether it has moved to the streams runtime.
struct Home {
    main: Handle,
    streams: Handle,
    streaming: AtomicBool,
    moved: Notify,
}

impl Home {
    /// Called for every request before hyper spawns its task (see [`ConnectionService`]'s
    /// `call`): a Sync request moves the connection.
    fn saw(&self, path: &str) {
        if path == SYNC_PATH && !self.streaming.swap(true, Ordering::AcqRel) {
            self.moved.notify_one();
        }
    }
}

/// Spawns hyper's per-request tasks on the connection's current runtime.
#[derive(Clone)]
struct HomeExecutor(Arc<Home>);

impl<F> hyper::rt::Executor<F> for HomeExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        if self.0.streaming.load(Ordering::Acquire) {
            self.0.streams.spawn(future);
        } else {
            self.0.main.spawn(future);
        }
    }
}

type Connection<IO, C, P> = http2::Connection<TokioIo<IO>, ConnectionService<C, P>, HomeExecutor>;

/// One connection's task: drives hyper's connection, sends a GOAWAY on shutdown, and moves to
/// the streams runtime when its first Sync request arrives.
struct Driver<IO, C, P>
where
    IO: AsyncRead + AsyncWrite + Connected<ConnectInfo = C> + Unpin + Send + 'static,
    C: Clone + Send + Sync + 'static,
    P: Clone + Send + Sync + 'static,
{
    connection: Pin<Box<Connection<IO, C, P>>>,
    home: Arc<Home>,
    rehome: Arc<AtomicBool>,
    shutdown: watch::Receiver<bool>,
    closing: bool,
    /// Resolves once the peer's credentials are revoked (see [`PeerCheck`]).
    revoked: Option<Revoked>,
    /// From a revocation's GOAWAY: its reason, and the grace that, when over, drops the
    /// connection.
    grace: Option<(String, Pin<Box<tokio::time::Sleep>>)>,
    /// Counts the connections closed for a revoked peer.
    revoked_total: Counter,
    _open: Open,
    _drain: watch::Receiver<()>,
}

/// Counts a connection in the open-connections gauge for as long as it lives.
struct Open(Gauge);

impl Open {
    fn counted(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl<IO, C, P> Driver<IO, C, P>
where
    IO: AsyncRead + AsyncWrite + Connected<ConnectInfo = C> + Unpin + Send + 'static,
    C: Clone + Send + Sync + 'static,
    P: Clone + Send + Sync + 'static,
{
    /// Runs the connection on the main runtime until it closes or carries a Sync stream.
    async fn on_main(mut self) {
        loop {
            tokio::select! {
                closed = self.connection.as_mut() => return log_closed(closed),
                () = stopping(&mut self.shutdown), if !self.closing => self.close(),
                reason = revocation(&mut self.revoked) => self.refuse(reason),
                () = grace_over(&mut self.grace) => return self.abandon(),
                _ = self.home.moved.notified() => {
                    tracing::debug!("a gRPC connection carries a Sync stream: serving it on the streams runtime");
                    let streams = self.home.streams.clone();
                    streams.spawn(self.on_streams());
                    return;
                }
            }
        }
    }

    /// Runs the connection on the streams runtime until it closes.
    async fn on_streams(mut self) {
        // From here on the socket is only polled on this runtime: move its registration here.
        self.rehome.store(true, Ordering::Release);
        loop {
            tokio::select! {
                closed = self.connection.as_mut() => return log_closed(closed),
                () = stopping(&mut self.shutdown), if !self.closing => self.close(),
                reason = revocation(&mut self.revoked) => self.refuse(reason),
                () = grace_over(&mut self.grace) => return self.abandon(),
            }
        }
    }

    fn close(&mut self) {
        if !self.closing {
            self.closing = true;
            self.connection.as_mut().graceful_shutdown();
        }
    }

    /// The peer was revoked: a GOAWAY now, and the socket closed if the connection is still open
    /// after the grace.
    fn refuse(&mut self, reason: String) {
        tracing::info!(%reason, "closing a gRPC connection: its peer's credentials were revoked");
        self.revoked_total.inc();
        self.close();
        self.grace = Some((reason, Box::pin(tokio::time::sleep(REVOKED_CONNECTION_GRACE))));
    }

    /// Gives up on a revoked connection that did not close within the grace (returning drops it,
    /// and its socket with it).
    fn abandon(&self) {
        let reason = self.grace.as_ref().map(|(reason, _)| reason.as_str());
        tracing::warn!(
            reason = reason.unwrap_or_default(),
            grace = ?REVOKED_CONNECTION_GRACE,
            "a revoked gRPC connection still had open requests after its GOAWAY: closing its socket"
        );
    }
}

/// Resolves, with the reason, once the peer is revoked; never when nothing will revoke it, or
/// once it was (the future is done).
async fn revocation(revoked: &mut Option<Revoked>) -> String {
    let Some(future) = revoked.as_mut() else {
        return std::future::pending().await;
    };
    let reason = future.await;
    *revoked = None;
    reason
}

/// Resolves when a revoked connection's grace is over; never before a revocation.
async fn grace_over(grace: &mut Option<(String, Pin<Box<tokio::time::Sleep>>)>) {
    match grace {
        Some((_, sleep)) => sleep.await,
        None => std::future::pending().await,
    }
}

/// Resolves once shutdown begins (or its sender is gone).
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

fn log_closed(closed: Result<(), hyper::Error>) {
    if let Err(e) = closed {
        tracing::debug!(error = %e, "gRPC connection ended with an error");
    }
}

/// A connection whose socket can be re-registered with another runtime's I/O driver.
pub trait Movable {
    /// Set once the connection is polled only on its new runtime: its next I/O re-registers
    /// the socket there.
    fn rehome_signal(&self) -> Arc<AtomicBool>;
}

/// An accepted TCP connection that, when told to, re-registers its socket with the I/O driver
/// of the runtime polling it (tokio registers a socket with the runtime it was created on, and
/// that runtime's driver keeps dispatching its readiness however far the task moved).
#[derive(Debug)]
pub struct MovableTcp {
    stream: Option<TcpStream>,
    rehome: Arc<AtomicBool>,
    rehomed: bool,
    /// The connection's place under `--max-connections`, freed when the socket is dropped.
    _place: Option<OwnedSemaphorePermit>,
}

impl MovableTcp {
    /// Wraps an accepted connection that takes no place under `--max-connections`.
    pub fn new(stream: TcpStream) -> Self {
        Self {
            stream: Some(stream),
            rehome: Arc::new(AtomicBool::new(false)),
            rehomed: false,
            _place: None,
        }
    }

    /// Wraps an accepted connection holding `place` until it is dropped (see
    /// [`ConnectionLimit`](crate::grpc::connection_limit::ConnectionLimit)).
    pub fn holding(stream: TcpStream, place: OwnedSemaphorePermit) -> Self {
        Self {
            _place: Some(place),
            ..Self::new(stream)
        }
    }

    /// The socket, re-registered first if it was told to move.
    fn stream(&mut self) -> io::Result<Pin<&mut TcpStream>> {
        if !self.rehomed && self.rehome.load(Ordering::Acquire) {
            self.rehomed = true;
            let moved = self.stream.take().ok_or_else(gone)?.into_std()?;
            self.stream = Some(TcpStream::from_std(moved)?);
        }
        Ok(Pin::new(self.stream.as_mut().ok_or_else(gone)?))
    }
}

/// A re-registration failed half-way; the connection is unusable.
fn gone() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "the connection's socket was lost moving it to the streams runtime",
    )
}

impl Movable for MovableTcp {
    fn rehome_signal(&self) -> Arc<AtomicBool> {
        self.rehome.clone()
    }
}

impl Movable for tokio_rustls::server::TlsStream<MovableTcp> {
    fn rehome_signal(&self) -> Arc<AtomicBool> {
        self.get_ref().0.rehome_signal()
    }
}

impl Connected for MovableTcp {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        match &self.stream {
            Some(stream) => stream.connect_info(),
            None => TcpConnectInfo {
                local_addr: None,
                remote_addr: None,
            },
        }
    }
}

impl AsyncRead for MovableTcp {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.stream()?.poll_read(cx, buf)
    }
}

impl AsyncWrite for MovableTcp {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.stream()?.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.stream()?.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream()?.poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream()?.poll_shutdown(cx)
    }
}

/// The service of one connection: the routes, with the peer's connect info (for
/// `Request::remote_addr` and `Request::peer_certs`) and what [`PeerCheck::peer`] read from it
/// in each request, and the client's deadline applied.
#[derive(Clone)]
struct ConnectionService<C, P> {
    routes: Routes,
    connect_info: C,
    peer: Option<P>,
    home: Arc<Home>,
}

/// hyper calls this when a request arrives, before it spawns the request's task (through
/// [`HomeExecutor`]), so a Sync request moves its connection in time for its own task to start on
/// the streams runtime. (hyper-util's `TowerToHyperService` would call the routes only from inside
/// that task, after it was spawned: each connection's first Sync stream was then served, and its
/// responses encoded, on the main runtime for the stream's whole life.)
impl<C, P> hyper::service::Service<http::Request<Incoming>> for ConnectionService<C, P>
where
    C: Clone + Send + Sync + 'static,
    P: Clone + Send + Sync + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, request: http::Request<Incoming>) -> Self::Future {
        self.home.saw(request.uri().path());
        let deadline = request
            .headers()
            .get("grpc-timeout")
            .map(|v| grpc_timeout(v.as_bytes()));
        let mut request = request.map(tonic::body::Body::new);
        request.extensions_mut().insert(self.connect_info.clone());
        if let Some(peer) = &self.peer {
            request.extensions_mut().insert(peer.clone());
        }
        // The routes are always ready (tonic's `Routes::poll_ready` is), so one clone per request
        // is all `&self` costs, as with hyper-util's adapter.
        let response = tower::Service::call(&mut self.routes.clone(), request);
        Box::pin(async move {
            match deadline {
                None => response.await,
                Some(Err(status)) => Ok(status.into_http()),
                Some(Ok(deadline)) => match tokio::time::timeout(deadline, response).await {
                    Ok(response) => response,
                    // DEADLINE_EXCEEDED, as the gRPC spec has it for an expired deadline (tonic's
                    // own server says CANCELLED).
                    Err(_) => Ok(Status::deadline_exceeded(format!(
                        "no answer within the caller's grpc-timeout ({deadline:?})"
                    ))
                    .into_http()),
                },
            }
        })
    }
}

/// Parses a `grpc-timeout` header: up to 8 digits and a unit (H, M, S, m, u, n).
fn grpc_timeout(value: &[u8]) -> Result<Duration, Status> {
    let invalid = || {
        Status::invalid_argument(format!(
            "invalid grpc-timeout header {:?}",
            String::from_utf8_lossy(value)
        ))
    };
    let (digits, unit) = value
        .split_at_checked(value.len().wrapping_sub(1))
        .ok_or_else(invalid)?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(invalid());
    }
    let amount: u64 = std::str::from_utf8(digits)
        .map_err(|_| invalid())?
        .parse()
        .map_err(|_| invalid())?;
    Ok(match unit {
        b"H" => Duration::from_secs(amount * 3600),
        b"M" => Duration::from_secs(amount * 60),
        b"S" => Duration::from_secs(amount),
        b"m" => Duration::from_millis(amount),
        b"u" => Duration::from_micros(amount),
        b"n" => Duration::from_nanos(amount),
        _ => return Err(invalid()),
    })
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    /// A connection accepted on one runtime, used there, then (told to move or not) used on
    /// another runtime after the first one is gone; returns what the second round trip gave.
    fn round_trip_after_the_accepting_runtime_is_gone(moved: bool) -> io::Result<Vec<u8>> {
        let accepting = runtime();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        accepted.set_nonblocking(true).unwrap();
        let mut connection = accepting.block_on(async {
            let mut connection = MovableTcp::new(TcpStream::from_std(accepted).unwrap());
            client.write_all(b"before").unwrap();
            let mut got = [0; 6];
            connection.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"before");
            connection
        });
        if moved {
            connection.rehome_signal().store(true, Ordering::Release);
        }
        drop(accepting);
        runtime().block_on(async {
            client.write_all(b"after").unwrap();
            let mut got = [0; 5];
            connection.read_exact(&mut got).await?;
            connection.write_all(&got).await?;
            Ok::<_, io::Error>(())
        })?;
        let mut echoed = vec![0; 5];
        client.read_exact(&mut echoed).unwrap();
        Ok(echoed)
    }

    #[test]
    fn a_moved_connection_keeps_working_once_the_runtime_it_was_accepted_on_is_gone() {
        assert_eq!(
            round_trip_after_the_accepting_runtime_is_gone(true).unwrap(),
            b"after"
        );
        // What moving prevents: the socket stays with the first runtime's I/O driver.
        assert!(round_trip_after_the_accepting_runtime_is_gone(false).is_err());
    }

    #[test]
    fn a_sync_request_and_every_request_after_it_on_its_connection_run_on_the_streams_runtime() {
        let named = |name: &'static str| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name(name)
                .enable_all()
                .build()
                .unwrap()
        };
        let (main, streams, client) = (named("test-main"), named("test-streams"), named("test-client"));
        // Each route answers with the name of the thread its request's task ran on.
        let thread_name = || async { std::thread::current().name().unwrap_or_default().to_string() };
        const CHECK_POD: &str = "/rcsync.v1.RuntimeClassSync/CheckPod";
        let routes = Routes::from(
            axum::Router::new()
                .route(SYNC_PATH, axum::routing::post(thread_name))
                .route(CHECK_POD, axum::routing::post(thread_name)),
        );
        let listener = main
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let address = listener.local_addr().unwrap();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener)
            .map(|accepted| accepted.map(MovableTcp::new));
        let (_stop, shutdown) = watch::channel(false);
        main.spawn(serve(
            routes,
            incoming,
            streams.handle().clone(),
            Keepalive::default(),
            ConnectionMetrics::default(),
            (),
            shutdown,
        ));
        let ran_on = client.block_on(async {
            // One connection for all three requests.
            let channel = tonic::transport::Channel::from_shared(format!("http://{address}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut ran_on = Vec::new();
            for path in [CHECK_POD, SYNC_PATH, CHECK_POD] {
                let request = http::Request::post(format!("http://{address}{path}"))
                    .body(tonic::body::Body::empty())
                    .unwrap();
                let response = tower::ServiceExt::oneshot(channel.clone(), request)
                    .await
                    .unwrap();
                let body = http_body_util::BodyExt::collect(response.into_body())
                    .await
                    .unwrap()
                    .to_bytes();
                ran_on.push(String::from_utf8(body.to_vec()).unwrap());
            }
            ran_on
        });
        assert_eq!(ran_on, ["test-main", "test-streams", "test-streams"]);
    }

    /// Revokes the peer of every connection once its sender says so.
    struct RevokedWhenTold(watch::Receiver<bool>);

    impl PeerCheck<TcpConnectInfo> for RevokedWhenTold {
        type Peer = ();

        fn peer(&self, _connection: &TcpConnectInfo) -> Option<()> {
            Some(())
        }

        fn revoked(&self, _peer: &()) -> Option<Revoked> {
            let mut told = self.0.clone();
            Some(Box::pin(async move {
                let _ = told.wait_for(|revoked| *revoked).await;
                "the test revoked it".to_string()
            }))
        }
    }

    /// A revoked connection gets a GOAWAY; one a request keeps open (here one that is never
    /// answered) is closed when the grace is over, and leaves the open-connections gauge.
    #[tokio::test(start_paused = true)]
    async fn a_revoked_connection_is_closed_even_while_a_request_holds_it_open() {
        const HANG: &str = "/test/Hang";
        let routes = Routes::from(
            axum::Router::new().route(HANG, axum::routing::post(std::future::pending::<String>)),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener)
            .map(|accepted| accepted.map(MovableTcp::new));
        let (revoke, told) = watch::channel(false);
        let (_stop, shutdown) = watch::channel(false);
        let connections = ConnectionMetrics::default();
        let open = connections.open.clone();
        tokio::spawn(serve(
            routes,
            incoming,
            Handle::current(),
            Keepalive::default(),
            connections.clone(),
            RevokedWhenTold(told),
            shutdown,
        ));
        let tcp = TcpStream::connect(address).await.unwrap();
        let (mut client, connection) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        let connection = tokio::spawn(connection);
        let hanging = client.send_request(
            http::Request::post(format!("http://{address}{HANG}"))
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap(),
        );
        let hanging = tokio::spawn(hanging);
        tokio::time::timeout(Duration::from_secs(10), async {
            while open.get() != 1 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the server counts the connection");
        revoke.send(true).unwrap();
        let ended = tokio::time::timeout(REVOKED_CONNECTION_GRACE * 3, hanging)
            .await
            .expect("the connection is closed once the grace is over")
            .unwrap();
        assert!(
            ended.is_err(),
            "the hanging request was never answered: {ended:?}"
        );
        connection.await.unwrap().ok();
        assert_eq!((open.get(), connections.revoked.get()), (0, 1));
    }

    /// Serves no routes on `incoming`, with the default settings, on the current runtime.
    async fn serve_nothing<I, E>(incoming: I, shutdown: watch::Receiver<bool>)
    where
        I: Stream<Item = Result<MovableTcp, E>>,
        E: std::fmt::Display,
    {
        serve(
            Routes::from(axum::Router::new()),
            incoming,
            Handle::current(),
            Keepalive::default(),
            ConnectionMetrics::default(),
            (),
            shutdown,
        )
        .await;
    }

    /// A listener whose every accept fails (out of file descriptors) is asked again after a
    /// pause, not in a busy loop.
    #[tokio::test(start_paused = true)]
    async fn failing_accepts_are_retried_after_a_pause_not_in_a_busy_loop() {
        let accepts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let incoming = futures::stream::repeat_with({
            let accepts = accepts.clone();
            move || {
                accepts.fetch_add(1, Ordering::Relaxed);
                Err::<MovableTcp, _>(io::Error::from_raw_os_error(24))
            }
        });
        let (stop, shutdown) = watch::channel(false);
        let serving = tokio::spawn(serve_nothing(incoming, shutdown));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let tried = accepts.load(Ordering::Relaxed);
        let most = (Duration::from_secs(1).as_millis() / ACCEPT_ERROR_PAUSE.as_millis()) as usize + 1;
        assert!((1..=most).contains(&tried), "{tried} accepts in 1 s");
        stop.send(true).unwrap();
        serving.await.unwrap();
    }

    /// What a client learns from the server's first SETTINGS frame: how many requests it may
    /// have open at once on the connection.
    #[tokio::test]
    async fn a_connection_is_told_how_many_requests_it_may_have_open_at_once() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener)
            .map(|accepted| accepted.map(MovableTcp::new));
        let (_stop, shutdown) = watch::channel(false);
        tokio::spawn(serve_nothing(incoming, shutdown));
        let mut client = TcpStream::connect(address).await.unwrap();
        // The client preface and an empty SETTINGS frame.
        client
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .unwrap();
        let mut header = [0; 9];
        client.read_exact(&mut header).await.unwrap();
        assert_eq!(header[3], 0x4, "the server speaks first with SETTINGS");
        let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0; length];
        client.read_exact(&mut payload).await.unwrap();
        let settings: Vec<(u16, u32)> = payload
            .chunks_exact(6)
            .map(|s| {
                (
                    u16::from_be_bytes([s[0], s[1]]),
                    u32::from_be_bytes([s[2], s[3], s[4], s[5]]),
                )
            })
            .collect();
        const MAX_CONCURRENT_STREAMS: u16 = 0x3;
        assert!(
            settings.contains(&(MAX_CONCURRENT_STREAMS, MAX_STREAMS_PER_CONNECTION)),
            "{settings:?}"
        );
    }

    #[test]
    fn grpc_timeouts_parse_with_every_unit_and_bad_ones_name_the_header() {
        assert_eq!(grpc_timeout(b"2H").unwrap(), Duration::from_secs(7200));
        assert_eq!(grpc_timeout(b"3M").unwrap(), Duration::from_secs(180));
        assert_eq!(grpc_timeout(b"5S").unwrap(), Duration::from_secs(5));
        assert_eq!(grpc_timeout(b"250m").unwrap(), Duration::from_millis(250));
        assert_eq!(grpc_timeout(b"7u").unwrap(), Duration::from_micros(7));
        assert_eq!(
            grpc_timeout(b"99999999n").unwrap(),
            Duration::from_nanos(99_999_999)
        );
        for bad in [&b""[..], b"S", b"5", b"5s", b"123456789S", b"-1S", b"1.5S"] {
            let status = grpc_timeout(bad).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(status.message().contains("grpc-timeout"), "{}", status.message());
        }
    }
}
