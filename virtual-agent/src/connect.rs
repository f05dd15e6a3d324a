//! The connection to the host agent: endpoint, TLS/mTLS, and the credentials every call carries
//! (`authorization: Bearer <token>` and `x-rcsync-tenant`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use rcsync_proto::v1::pod_sync_client::PodSyncClient;
use rcsync_proto::v1::runtime_class_sync_client::RuntimeClassSyncClient;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// How to reach and authenticate to the host agent.
#[derive(Clone, Debug)]
pub struct HostAgentTarget {
    /// `http://host:port` or `https://host:port`.
    pub url: String,
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
}

/// Adds the tenant's credentials to every call.
#[derive(Clone)]
pub struct Credentials {
    authorization: Option<MetadataValue<tonic::metadata::Ascii>>,
    tenant: MetadataValue<tonic::metadata::Ascii>,
}

impl Interceptor for Credentials {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
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
pub type PodClient = PodSyncClient<InterceptedService<Channel, Credentials>>;

impl HostAgentTarget {
    /// Checks the target's files and flags without connecting.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.url.starts_with("http://") || self.url.starts_with("https://"),
            "--host-agent must be an http:// or https:// URL, got {:?}",
            self.url
        );
        anyhow::ensure!(
            self.client_cert.is_some() == self.client_key.is_some(),
            "--client-cert and --client-key must be given together"
        );
        if self.url.starts_with("http://") && (self.ca_cert.is_some() || self.client_cert.is_some()) {
            anyhow::bail!("TLS files were given but --host-agent is http://; use https://");
        }
        self.credentials()?;
        Ok(())
    }

    fn credentials(&self) -> anyhow::Result<Credentials> {
        let authorization = match &self.token_file {
            Some(path) => {
                let token = std::fs::read_to_string(path)
                    .with_context(|| format!("reading the token file {}", path.display()))?;
                let token = token.trim();
                anyhow::ensure!(!token.is_empty(), "the token file {} is empty", path.display());
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
        })
    }

    fn endpoint(&self) -> anyhow::Result<Endpoint> {
        let mut endpoint = Endpoint::from_shared(self.url.clone())
            .with_context(|| format!("invalid --host-agent URL {:?}", self.url))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .tcp_keepalive(Some(Duration::from_secs(30)))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        if self.url.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_enabled_roots();
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

    /// Connects (once) and returns both clients over one channel.
    pub async fn connect(&self) -> anyhow::Result<(ClassClient, PodClient)> {
        let credentials = self.credentials()?;
        let channel = self
            .endpoint()?
            .connect()
            .await
            .with_context(|| format!("connecting to {}", self.url))?;
        Ok((
            RuntimeClassSyncClient::with_interceptor(channel.clone(), credentials.clone()),
            PodSyncClient::with_interceptor(channel, credentials),
        ))
    }
}

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

    /// Back to the first step (after a success).
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}
