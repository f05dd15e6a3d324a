//! TLS for the gRPC server with certificates that rotate without a restart.
//!
//! ```text
//!  TcpListener ──accept──► handshake task (current ServerConfig) ──► TlsStream ──► tonic
//!        ▲                          ▲
//!        │                ServingTls::current()  ◄── reload ◄── inotify on the files' directories
//!  new connections use the newest files; open connections (and their streams) keep theirs
//! ```
//!
//! cert-manager (or any Secret volume) replaces the certificate, key and CA with Kubernetes'
//! atomic writer; the directory is watched, the three files are read again, and a set that does
//! not load (a key that does not match, a half-written file) is reported and the previous one
//! kept.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use futures::Stream;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;

use crate::grpc::TlsFiles;
use crate::grpc::connection_limit::ConnectionLimit;
use crate::grpc::serve::MovableTcp;
use crate::metrics::{Metrics, ResultLabel};

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The serving TLS configuration, swapped when its files change.
#[derive(Clone)]
pub struct ServingTls {
    files: Arc<TlsFiles>,
    current: Arc<RwLock<Arc<rustls::ServerConfig>>>,
}

impl ServingTls {
    /// Loads the files; `Ok(None)` for plaintext. Half-configured TLS is an error.
    pub fn load(files: &TlsFiles) -> anyhow::Result<Option<Self>> {
        match (&files.cert, &files.key) {
            (None, None) => {
                anyhow::ensure!(
                    files.client_ca.is_none(),
                    "--client-ca needs --tls-cert and --tls-key"
                );
                Ok(None)
            }
            (Some(_), Some(_)) => {
                let config = server_config(files)?;
                Ok(Some(Self {
                    files: Arc::new(files.clone()),
                    current: Arc::new(RwLock::new(config)),
                }))
            }
            _ => anyhow::bail!("--tls-cert and --tls-key must be given together"),
        }
    }

    /// The configuration new connections get.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads the files again; on success new connections use them, on failure the previous set
    /// stays and the error (naming the file) is returned.
    pub fn reload(&self) -> anyhow::Result<()> {
        let config = server_config(&self.files)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
        Ok(())
    }

    /// Accepted connections, TLS done, for [`serve`](super::serve::serve). Each handshake runs in its own
    /// task, so a slow client holds up nobody; each connection takes a place under `limit` first.
    pub fn incoming(
        &self,
        listener: TcpListener,
        limit: ConnectionLimit,
        mut shutdown: watch::Receiver<bool>,
    ) -> impl Stream<Item = std::io::Result<TlsStream<MovableTcp>>> + use<> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let tls = self.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => return,
                    accepted = listener.accept() => accepted,
                };
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a gRPC connection failed");
                        tokio::time::sleep(crate::grpc::serve::ACCEPT_ERROR_PAUSE).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                // The place is taken before the handshake, which costs the agent too.
                let Some(stream) = limit.admit(stream) else {
                    continue;
                };
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(Ok(stream)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }

    /// Reloads when a file changes on disk (their directories are watched, so Kubernetes' atomic
    /// Secret updates are seen); counts reloads by result in `rcsync_tls_reloads_total`.
    pub async fn reload_on_change(self, metrics: Metrics) {
        use notify::Watcher as _;
        let paths: Vec<PathBuf> = [&self.files.cert, &self.files.key, &self.files.client_ca]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        let names: std::collections::HashSet<_> = paths
            .iter()
            .filter_map(|p| p.file_name().map(ToOwned::to_owned))
            .collect();
        let (tx, mut changed) = tokio::sync::mpsc::channel::<()>(1);
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            if matches!(event.kind, notify::EventKind::Access(_)) {
                return;
            }
            if event.paths.iter().any(|p| crate::run::is_read(&names, p)) {
                let _ = tx.try_send(());
            }
        });
        let mut watcher = match watcher {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the TLS files; rotating them needs a restart");
                return;
            }
        };
        let mut dirs: Vec<&Path> = paths.iter().filter_map(|p| p.parent()).collect();
        dirs.sort();
        dirs.dedup();
        for dir in dirs {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            if let Err(e) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch a TLS directory");
            }
        }
        while changed.recv().await.is_some() {
            // Let the files of one rotation all land, then read them once.
            tokio::time::sleep(Duration::from_millis(200)).await;
            while changed.try_recv().is_ok() {}
            let result = match self.reload() {
                Ok(()) => {
                    tracing::info!("reloaded the TLS certificate and client CA; new connections use them");
                    "applied"
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "TLS files changed but do not load; keeping the previous ones");
                    "failed"
                }
            };
            metrics
                .tls_reloads_total
                .get_or_create(&ResultLabel {
                    result: result.to_string(),
                })
                .inc();
        }
    }
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading the {what} {}", path.display()))
}

fn certificates(path: &Path, what: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = read(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing the {what} {}", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "the {what} {} holds no PEM certificate",
        path.display()
    );
    Ok(certs)
}

/// The rustls server config of `files` (which must name a certificate and a key), speaking h2.
fn server_config(files: &TlsFiles) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let (Some(cert), Some(key)) = (&files.cert, &files.key) else {
        anyhow::bail!("--tls-cert and --tls-key must be given together");
    };
    let chain = certificates(cert, "TLS certificate")?;
    let key_pem = read(key, "TLS key")?;
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
        .with_context(|| format!("parsing the TLS key {}", key.display()))?;
    let builder = rustls::ServerConfig::builder();
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certificates(ca, "client CA")? {
                roots
                    .add(cert)
                    .with_context(|| format!("adding the client CA {}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .with_context(|| format!("using the client CA {}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key_der).with_context(|| {
        format!(
            "the TLS key {} does not fit the certificate {}",
            key.display(),
            cert.display()
        )
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}
