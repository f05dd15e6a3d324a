//! The connection to the host agent: endpoints, TLS/mTLS, and the credentials every call carries
//! (`authorization: Bearer <token>` and `x-rcsync-tenant`).
//!
//! ```text
//!  --host-agent a:9443,b:9443 ──► each URL's host resolved (a DNS name with several addresses
//!                                 is several endpoints) ──► tried in turn from a rotating start
//!  every connect (Sync stream, status feed, Pod calls) starts one further along: the agent's
//!  connections spread over the replicas, and a replica that refuses or is gone is skipped (failover)
//!  Pod shards ──► one SharedClients connection for all their CheckPod and PodSync calls
//!     calls failing for want of the host, then the host reached ──► a recovery: the shards
//!     retry the Pods that failed meanwhile at once, not at the end of their backoff
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use rcsync_proto::v1::pod_sync_client::PodSyncClient;
use rcsync_proto::v1::runtime_class_sync_client::RuntimeClassSyncClient;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::leader::Fence;
use crate::whole_request::WholeRequests;

/// How long a unary call to the host agent may take unless told otherwise.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How to reach and authenticate to the host agent.
#[derive(Clone, Debug)]
pub struct HostAgentTarget {
    /// One or more `http://host:port` or `https://host:port` (replicas of the host agent).
    pub urls: Vec<String>,
    /// The tenant this virtual cluster is.
    pub tenant: String,
    /// File holding the bearer token (re-read at every connect, so rotation needs no restart).
    pub token_file: Option<PathBuf>,
    /// CA that signed the host agent's certificate (PEM); the OS trust store otherwise.
    pub ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    pub client_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    pub client_key: Option<PathBuf>,
    /// How long a unary call (CheckPod, ApplyPod, DeletePod) may take: past it the call ends with
    /// DEADLINE_EXCEEDED here, and the host agent, which gets it as `grpc-timeout`, stops its work
    /// (a host API server that hangs would otherwise hold the Pod, and the shard behind it, until
    /// the host agent's own client gives up, minutes later).
    pub call_timeout: Duration,
    /// Where the next connect starts in the endpoint list (shared by clones).
    rotation: Arc<AtomicUsize>,
    /// When set, calls go out only while it allows (leader fencing).
    fence: Option<Fence>,
}

/// Adds the tenant's credentials to every call.
#[derive(Clone)]
pub struct Credentials {
    authorization: Option<MetadataValue<tonic::metadata::Ascii>>,
    tenant: MetadataValue<tonic::metadata::Ascii>,
    fence: Option<Fence>,
}

impl Interceptor for Credentials {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if self.fence.as_ref().is_some_and(|f| !f.allows()) {
            return Err(tonic::Status::failed_precondition(
                "not sent: this replica does not hold the leader lease",
            ));
        }
        if let Some(auth) = &self.authorization {
            request.metadata_mut().insert("authorization", auth.clone());
        }
        request
            .metadata_mut()
            .insert("x-rcsync-tenant", self.tenant.clone());
        Ok(request)
    }
}

/// A RuntimeClassSync client with credentials.
pub type ClassClient = RuntimeClassSyncClient<InterceptedService<Channel, Credentials>>;
/// A PodSync client with credentials.
/// Its requests each go out whole (every PodSync method takes one message).
pub type PodClient = PodSyncClient<InterceptedService<WholeRequests<Channel>, Credentials>>;

impl HostAgentTarget {
    /// A target with these URLs and tenant, no token and no TLS files.
    pub fn new(urls: Vec<String>, tenant: String) -> Self {
        Self {
            urls,
            tenant,
            token_file: None,
            ca_cert: None,
            client_cert: None,
            client_key: None,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            rotation: Arc::default(),
            fence: None,
        }
    }

    /// The same target, whose calls go out only while `fence` allows.
    pub fn fenced(&self, fence: Fence) -> Self {
        Self {
            fence: Some(fence),
            ..self.clone()
        }
    }

    /// Checks the target's files and flags without connecting.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.urls.is_empty(), "--host-agent names no URL");
        let tls = self.urls[0].starts_with("https://");
        for url in &self.urls {
            anyhow::ensure!(
                url.starts_with("http://") || url.starts_with("https://"),
                "--host-agent must be an http:// or https:// URL, got {url:?}"
            );
            anyhow::ensure!(
                url.starts_with("https://") == tls,
                "--host-agent mixes http:// and https:// URLs ({:?} and {url:?}); use one scheme",
                self.urls[0]
            );
            let uri: http::Uri = url
                .parse()
                .with_context(|| format!("invalid --host-agent URL {url:?}"))?;
            anyhow::ensure!(uri.host().is_some(), "--host-agent URL {url:?} names no host");
        }
        anyhow::ensure!(
            self.client_cert.is_some() == self.client_key.is_some(),
            "--client-cert and --client-key must be given together"
        );
        if !tls && (self.ca_cert.is_some() || self.client_cert.is_some()) {
            anyhow::bail!("TLS files were given but --host-agent is http://; use https://");
        }
        self.credentials()?;
        Ok(())
    }

    fn credentials(&self) -> anyhow::Result<Credentials> {
        let authorization = match &self.token_file {
            Some(path) => {
                let token = rcsync_core::token_file::read_token_file(path, "token file")?;
                Some(
                    format!("Bearer {token}")
                        .parse()
                        .context("the token is not valid header text")?,
                )
            }
            None => None,
        };
        let tenant = self.tenant.parse().context("--tenant is not valid header text")?;
        Ok(Credentials {
            authorization,
            tenant,
            fence: self.fence.clone(),
        })
    }

    /// The URLs as one line for logs and `/status`.
    pub fn display(&self) -> String {
        self.urls.join(",")
    }

    /// Whether the host agent is reached over TLS.
    pub fn is_tls(&self) -> bool {
        self.urls.first().is_some_and(|u| u.starts_with("https://"))
    }

    /// Every address to try: each URL's host resolved now (so DNS changes are followed at the
    /// next connect), with the name kept for TLS verification.
    async fn addresses(&self) -> Vec<(String, SocketAddr, String)> {
        let mut out = Vec::new();
        for url in &self.urls {
            let Ok(uri) = url.parse::<http::Uri>() else {
                continue;
            };
            let Some(host) = uri.host() else { continue };
            let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
            let port = uri.port_u16().unwrap_or(if self.is_tls() { 443 } else { 80 });
            match tokio::net::lookup_host((host.as_str(), port)).await {
                Ok(addrs) => out.extend(addrs.map(|a| (url.clone(), a, host.clone()))),
                Err(e) => tracing::warn!(url = %url, error = %e, "resolving the host agent's name failed"),
            }
        }
        // An address named by two URLs is tried once.
        let mut seen = std::collections::HashSet::new();
        out.retain(|(_, addr, _)| seen.insert(*addr));
        out
    }

    fn endpoint(&self, addr: SocketAddr, host: &str) -> anyhow::Result<Endpoint> {
        let scheme = if self.is_tls() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .with_context(|| format!("invalid host agent address {addr}"))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .tcp_keepalive(Some(Duration::from_secs(30)))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        if self.is_tls() {
            // The certificate is checked against the name in the URL, not the address dialled.
            let mut tls = ClientTlsConfig::new().with_enabled_roots().domain_name(host);
            if let Some(ca) = &self.ca_cert {
                let pem = std::fs::read(ca).with_context(|| format!("reading the CA {}", ca.display()))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
                let cert = std::fs::read(cert)
                    .with_context(|| format!("reading the client certificate {}", cert.display()))?;
                let key = std::fs::read(key)
                    .with_context(|| format!("reading the client key {}", key.display()))?;
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            endpoint = endpoint.tls_config(tls).context("configuring TLS")?;
        }
        Ok(endpoint)
    }

    /// Connects to one host agent replica and returns both clients over one channel. Each call
    /// starts one further along the resolved addresses, so streams and Pod shards spread over
    /// the replicas; an address that does not answer is skipped. TLS files and the token are
    /// read at every connect, so rotated files are used by the next connection.
    pub async fn connect(&self) -> anyhow::Result<(ClassClient, PodClient)> {
        let credentials = self.credentials()?;
        let addresses = self.addresses().await;
        anyhow::ensure!(
            !addresses.is_empty(),
            "no address found for the host agent ({})",
            self.display()
        );
        let start = self.rotation.fetch_add(1, Ordering::Relaxed);
        let mut errors = Vec::new();
        for i in 0..addresses.len() {
            let (url, addr, host) = &addresses[(start + i) % addresses.len()];
            match self.endpoint(*addr, host)?.connect().await {
                Ok(channel) => {
                    tracing::debug!(url = %url, address = %addr, "connected to the host agent");
                    return Ok((
                        RuntimeClassSyncClient::with_interceptor(channel.clone(), credentials.clone())
                            .max_decoding_message_size(rcsync_proto::MAX_SYNC_RESPONSE_BYTES),
                        PodSyncClient::with_interceptor(WholeRequests::new(channel), credentials),
                    ));
                }
                Err(e) => errors.push(format!("{url} ({addr}): {}", error_chain(&e))),
            }
        }
        anyhow::bail!("connecting to the host agent failed: {}", errors.join("; "))
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The connection the Pod shards share for their CheckPod and PodSync calls. HTTP/2 carries their
/// calls side by side, so a virtual agent holds one connection for its Pods, not one per shard (a
/// thousand tenants' agents with 16 shards each held 16,000 connections on the host agent). Made
/// on first use; a call's error that a new connection may cure drops it for every shard, once.
pub struct SharedClients {
    target: HostAgentTarget,
    /// The current connection, and how many were made (both only touched under the lock).
    current: tokio::sync::Mutex<(Option<Connection>, usize)>,
    /// Whether the shards' calls reach the host.
    host_path: HostPath,
}

/// One connection's clients, and which connection they are.
#[derive(Clone)]
pub struct Connection {
    /// Counts the connections made, so an error drops only the connection it happened on.
    pub generation: usize,
    /// RuntimeClassSync (CheckPod) over it.
    pub classes: ClassClient,
    /// PodSync over it.
    pub pods: PodClient,
}

impl SharedClients {
    /// Clients of `target`, not connected yet.
    pub fn new(target: HostAgentTarget) -> Self {
        Self {
            target,
            current: tokio::sync::Mutex::new((None, 0)),
            host_path: HostPath::default(),
        }
    }

    /// The host agent these clients call.
    pub fn target(&self) -> &HostAgentTarget {
        &self.target
    }

    /// Whether the shards' calls reach the host (see [`HostPath`]).
    pub fn host_path(&self) -> &HostPath {
        &self.host_path
    }

    /// `message` as a unary call that ends after the target's call timeout: the deadline is sent
    /// as `grpc-timeout`, and `call` is given up here when no answer came by then.
    pub async fn bounded<T, R, F>(
        &self,
        message: T,
        call: impl FnOnce(tonic::Request<T>) -> F,
    ) -> Result<R, tonic::Status>
    where
        F: std::future::Future<Output = Result<R, tonic::Status>>,
    {
        let timeout = self.target.call_timeout;
        let mut request = tonic::Request::new(message);
        request.set_timeout(timeout);
        let expired = || {
            Err(tonic::Status::deadline_exceeded(format!(
                "no answer within {timeout:?} (--host-call-timeout-seconds)"
            )))
        };
        let started = tokio::time::Instant::now();
        match tokio::time::timeout(timeout, call(request)).await {
            // tonic's channel enforces the request's `grpc-timeout` itself, and says CANCELLED.
            Ok(Err(status)) if status.code() == tonic::Code::Cancelled && started.elapsed() >= timeout => {
                expired()
            }
            Ok(answer) => answer,
            Err(_) => expired(),
        }
    }

    /// The current connection, made now if there is none (one shard connects, the others wait).
    pub async fn get(&self) -> anyhow::Result<Connection> {
        let mut guard = self.current.lock().await;
        let (current, made) = &mut *guard;
        if let Some(connection) = current.as_ref() {
            return Ok(connection.clone());
        }
        let (classes, pods) = self.target.connect().await?;
        let connection = Connection {
            generation: *made,
            classes,
            pods,
        };
        *made += 1;
        *current = Some(connection.clone());
        Ok(connection)
    }

    /// Drops connection `generation` if it is still the current one, so the next call connects
    /// anew.
    pub async fn drop_connection(&self, generation: usize) {
        let (current, _) = &mut *self.current.lock().await;
        if current.as_ref().is_some_and(|c| c.generation == generation) {
            *current = None;
        }
    }
}

/// Whether calls reach the host, as the Pod shards find out. A call that fails for want of the
/// host (the host agent unreachable, or the host API server behind it) marks the path failing.
/// The next time the host is reached while it is failing (a Pod applied or deleted, or a
/// WatchPodStatus relist complete; answers from the host agent's memory, such as CheckPod's,
/// prove nothing of the host API server) is a recovery: the shards hear of it and retry at once
/// the Pods that failed meanwhile, instead of each waiting out its own backoff (up to 5 s after
/// an outage). At most one recovery per [`HostPath::MIN_RECOVERY_INTERVAL`], so a Pod that keeps
/// failing on its own while others go through is retried a few times a second at most, not at
/// the pace of their successes.
pub struct HostPath {
    /// Whether the last call ended in a failure for want of the host, and when the last
    /// recovery was announced.
    state: std::sync::Mutex<(bool, Option<tokio::time::Instant>)>,
    recoveries: tokio::sync::watch::Sender<u64>,
}

impl Default for HostPath {
    fn default() -> Self {
        Self {
            state: std::sync::Mutex::new((false, None)),
            recoveries: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl HostPath {
    /// The shortest time between two recoveries.
    pub const MIN_RECOVERY_INTERVAL: Duration = Duration::from_millis(250);

    /// A call failed for want of the host.
    pub fn failed(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0 = true;
    }

    /// The host API server was reached through the host agent: a recovery when calls were
    /// failing (and the last recovery is at least [`Self::MIN_RECOVERY_INTERVAL`] ago; otherwise
    /// the path stays failing until then).
    pub fn reached(&self) {
        let now = tokio::time::Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (failing, last) = &mut *state;
        if !*failing || last.is_some_and(|at| now < at + Self::MIN_RECOVERY_INTERVAL) {
            return;
        }
        *failing = false;
        *last = Some(now);
        drop(state);
        self.recoveries.send_modify(|n| *n += 1);
    }

    /// Changes at each recovery.
    pub fn recoveries(&self) -> tokio::sync::watch::Receiver<u64> {
        self.recoveries.subscribe()
    }
}

/// Whether a call's error is one a new connection may cure: the host agent gone or restarted, or
/// a refused token (the token file is re-read at every connect, so a rotated token is picked up).
pub fn a_new_connection_may_cure(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Internal
            | tonic::Code::Unauthenticated
    )
}

/// The longest wait between reconnects to the host agent: short enough that the system is back
/// within seconds of the host agent (the chaos harness checks convergence within 10 s), long
/// enough not to hammer it (jittered).
pub const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// Jittered exponential backoff for reconnects and retries.
#[derive(Clone, Debug)]
pub struct Backoff {
    next: Duration,
    initial: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at `initial`, doubles up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            next: initial,
            initial,
            max,
        }
    }

    /// The next delay: the current step with ±25% jitter.
    pub fn next_delay(&mut self) -> Duration {
        use rand::Rng as _;
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter = rand::rng().random_range(0.75..1.25);
        base.mul_f64(jitter)
    }

    /// Caps the steps from now on at `max` (a later failure may deserve a longer or shorter
    /// wait than the first).
    pub fn up_to(&mut self, max: Duration) -> &mut Self {
        self.max = max;
        self.next = self.next.min(max);
        self
    }

    /// Back to the first step (after a success).
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_host_path_recovers_once_per_outage_and_at_most_once_per_interval() {
        let path = HostPath::default();
        let mut recoveries = path.recoveries();
        path.reached();
        assert!(!recoveries.has_changed().unwrap(), "no outage, no recovery");

        path.failed();
        path.failed();
        path.reached();
        assert!(
            recoveries.has_changed().unwrap(),
            "the host reached after failures"
        );
        recoveries.mark_unchanged();
        path.reached();
        assert!(!recoveries.has_changed().unwrap(), "one recovery per outage");

        // Failing again right away: the next recovery waits for the interval, and comes when the
        // host is first reached after it.
        path.failed();
        path.reached();
        assert!(!recoveries.has_changed().unwrap(), "within the interval");
        tokio::time::advance(HostPath::MIN_RECOVERY_INTERVAL).await;
        path.reached();
        assert!(recoveries.has_changed().unwrap(), "after the interval");
    }

    #[tokio::test]
    async fn every_address_of_the_urls_is_tried_once_in_url_order() {
        let target = HostAgentTarget::new(
            vec![
                "http://127.0.0.1:7001".into(),
                "http://[::1]:7002".into(),
                "http://127.0.0.1:7001".into(),
                "http://127.0.0.3:7003".into(),
            ],
            "team-a".into(),
        );
        let addresses: Vec<String> = target
            .addresses()
            .await
            .into_iter()
            .map(|(_, addr, host)| format!("{addr} {host}"))
            .collect();
        assert_eq!(
            addresses,
            [
                "127.0.0.1:7001 127.0.0.1",
                "[::1]:7002 ::1",
                "127.0.0.3:7003 127.0.0.3"
            ]
        );
    }
}
