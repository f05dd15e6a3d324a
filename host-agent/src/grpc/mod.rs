//! The gRPC servers of the host agent: RuntimeClassSync, PodSync, gRPC health and reflection (v1 and
//! v1alpha), over TLS or mutual TLS when configured.

pub mod auth;
pub mod limits;
pub mod pods;
pub mod sync;

use std::path::PathBuf;

use anyhow::Context as _;
use rcsync_core::admin::Readiness;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// TLS files of the gRPC server.
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    /// Serving certificate (PEM).
    pub cert: Option<PathBuf>,
    /// Serving key (PEM).
    pub key: Option<PathBuf>,
    /// CA that client certificates must chain to; enables mutual TLS.
    pub client_ca: Option<PathBuf>,
}

fn read(path: &PathBuf, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading the {what} {}", path.display()))
}

impl TlsFiles {
    /// The server TLS config, `None` for plaintext. Half-configured TLS is an error.
    pub fn server_config(&self) -> anyhow::Result<Option<ServerTlsConfig>> {
        match (&self.cert, &self.key) {
            (None, None) => {
                anyhow::ensure!(
                    self.client_ca.is_none(),
                    "--client-ca needs --tls-cert and --tls-key"
                );
                Ok(None)
            }
            (Some(cert), Some(key)) => {
                let identity = Identity::from_pem(read(cert, "TLS certificate")?, read(key, "TLS key")?);
                let mut config = ServerTlsConfig::new().identity(identity);
                if let Some(ca) = &self.client_ca {
                    config = config.client_ca_root(Certificate::from_pem(read(ca, "client CA")?));
                }
                Ok(Some(config))
            }
            _ => anyhow::bail!("--tls-cert and --tls-key must be given together"),
        }
    }
}

/// Keeps gRPC health (`""` and every rcsync service) in step with readiness: NOT_SERVING until
/// ready, and again from the moment shutdown begins.
pub async fn follow_readiness(reporter: HealthReporter, readiness: Readiness, services: &[&str]) {
    let mut ready = readiness.subscribe();
    loop {
        let status = if *ready.borrow_and_update() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for service in std::iter::once(&"").chain(services) {
            reporter.set_service_status(*service, status).await;
        }
        if ready.changed().await.is_err() {
            return;
        }
    }
}
