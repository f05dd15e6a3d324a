//! TLS for the agents' servers (the host agent's gRPC port, either agent's admin port) from
//! certificate files that rotate without a restart.
//!
//! ```text
//!  accept ──► handshake (ServingTls::current()) ──► TLS stream ──► the server
//!                          ▲
//!                          └── reload ◄── inotify on the files' directories
//!  new connections use the newest files; open connections keep theirs
//! ```
//!
//! With a client CA, [`ServingTls::client_certificates`] verifies a client's certificate against
//! the CA loaded now and says when it changes: the host agent ends what was opened with a
//! certificate the new CA no longer accepts.
//!
//! cert-manager (or any Secret volume) replaces the certificate, key and CA with Kubernetes'
//! atomic writer; the directories are watched, the files are read again, and a set that does not
//! load (a key that does not match, a half-written file) is reported and the previous one kept.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use tokio::sync::watch;

/// How long a client may take to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The files a TLS server is configured from.
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    /// Serving certificate chain (PEM).
    pub cert: Option<PathBuf>,
    /// Serving key (PEM).
    pub key: Option<PathBuf>,
    /// CA that client certificates must chain to; enables mutual TLS.
    pub client_ca: Option<PathBuf>,
}

/// The flags a server's [`TlsFiles`] come from, so errors name what the user set.
#[derive(Clone, Copy, Debug)]
pub struct TlsFlags {
    /// The certificate's flag.
    pub cert: &'static str,
    /// The key's flag.
    pub key: &'static str,
    /// The client CA's flag; `None` where mutual TLS is not offered (the admin port: kubelet's
    /// probes carry no client certificate).
    pub client_ca: Option<&'static str>,
}

impl TlsFlags {
    /// The host agent's gRPC port.
    pub const GRPC: Self = Self {
        cert: "--tls-cert",
        key: "--tls-key",
        client_ca: Some("--client-ca"),
    };
    /// Either agent's admin port.
    pub const ADMIN: Self = Self {
        cert: "--admin-tls-cert",
        key: "--admin-tls-key",
        client_ca: None,
    };
}

/// `rcsync_tls_reloads_total{result}`: reloads of TLS files after they changed on disk, by result
/// (`applied`, `failed`); both series exist from the start, so `increase()` sees the first failure.
#[derive(Clone, Debug, Default)]
pub struct TlsReloads(Family<ReloadResult, Counter>);

/// Label set of [`TlsReloads`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadResult {
    /// `applied` or `failed`.
    pub result: String,
}

impl TlsReloads {
    /// Registers the counter (as `tls_reloads` under the registry's prefix) with `help`.
    pub fn register(registry: &mut Registry, help: &str) -> Self {
        let reloads = Self::default();
        registry.register("tls_reloads", help, reloads.0.clone());
        for result in ["applied", "failed"] {
            let _ = reloads.0.get_or_create(&ReloadResult {
                result: result.to_string(),
            });
        }
        reloads
    }

    /// Counts one reload with its result; what [`ServingTls::reload_on_change`] calls.
    pub fn count(&self) -> impl Fn(&'static str) + Send + 'static + use<> {
        let family = self.0.clone();
        move |result| {
            family
                .get_or_create(&ReloadResult {
                    result: result.to_string(),
                })
                .inc();
        }
    }
}

/// A server's TLS configuration, swapped when its files change.
#[derive(Clone)]
pub struct ServingTls {
    files: Arc<TlsFiles>,
    flags: TlsFlags,
    alpn: Arc<Vec<Vec<u8>>>,
    current: Arc<RwLock<Loaded>>,
    /// Counts the applied reloads that changed the client CA (a new serving certificate alone
    /// does not).
    client_ca_changes: Arc<watch::Sender<u64>>,
}

/// What the files loaded into.
struct Loaded {
    config: Arc<rustls::ServerConfig>,
    /// How client certificates are verified, with a client CA.
    client_verifier: Option<Arc<dyn ClientCertVerifier>>,
    /// The client CA's certificates, to tell whether a reload changed them.
    client_ca: Vec<CertificateDer<'static>>,
}

/// Client certificates checked against the client CA a server uses now (see
/// [`ServingTls::client_certificates`]). Cheap to clone.
#[derive(Clone)]
pub struct ClientCertificates {
    current: Arc<RwLock<Loaded>>,
    reloads: watch::Receiver<u64>,
}

impl ClientCertificates {
    /// Whether the client CA loaded now accepts `chain` (the client's certificate first), at
    /// this moment; the reason when it does not.
    pub fn verify(&self, chain: &[CertificateDer<'_>]) -> Result<(), String> {
        let verifier = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .client_verifier
            .clone();
        let (Some(verifier), Some((end_entity, intermediates))) = (verifier, chain.split_first()) else {
            return Err("no client CA is configured, or the client sent no certificate".into());
        };
        verifier
            .verify_client_cert(end_entity, intermediates, UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Changes at each applied reload that changed the client CA.
    pub fn reloaded(&self) -> watch::Receiver<u64> {
        self.reloads.clone()
    }

    /// How many applied reloads changed the client CA: 0 while it is the one every connection's
    /// handshake was verified against.
    pub fn generation(&self) -> u64 {
        *self.reloads.borrow()
    }
}

impl ServingTls {
    /// Loads the files, offering `alpn` (e.g. `h2`); `Ok(None)` when none is set (plaintext).
    /// Half-configured TLS is an error naming the flags.
    pub fn load(files: &TlsFiles, flags: TlsFlags, alpn: &[&[u8]]) -> anyhow::Result<Option<Self>> {
        match (files.client_ca.is_some(), flags.client_ca) {
            (true, None) => anyhow::bail!("{} takes no client CA", flags.cert),
            (true, Some(ca)) if files.cert.is_none() && files.key.is_none() => {
                anyhow::bail!("{ca} needs {} and {}", flags.cert, flags.key)
            }
            _ => {}
        }
        match (&files.cert, &files.key) {
            (None, None) => Ok(None),
            (Some(_), Some(_)) => {
                let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
                let loaded = server_config(files, flags, &alpn)?;
                Ok(Some(Self {
                    files: Arc::new(files.clone()),
                    flags,
                    alpn: Arc::new(alpn),
                    current: Arc::new(RwLock::new(loaded)),
                    client_ca_changes: Arc::new(watch::channel(0).0),
                }))
            }
            _ => anyhow::bail!("{} and {} must be given together", flags.cert, flags.key),
        }
    }

    /// The configuration new connections get.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .config
            .clone()
    }

    /// Verifies client certificates against the client CA loaded now, and follows its reloads.
    pub fn client_certificates(&self) -> ClientCertificates {
        ClientCertificates {
            current: self.current.clone(),
            reloads: self.client_ca_changes.subscribe(),
        }
    }

    /// Reads the files again; on success new connections use them, on failure the previous set
    /// stays and the error (naming the file) is returned.
    pub fn reload(&self) -> anyhow::Result<()> {
        let loaded = server_config(&self.files, self.flags, &self.alpn)?;
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        let client_ca_changed = current.client_ca != loaded.client_ca;
        *current = loaded;
        drop(current);
        if client_ca_changed {
            self.client_ca_changes.send_modify(|n| *n += 1);
        }
        Ok(())
    }

    /// Reloads when a file changes on disk (their directories are watched, so Kubernetes' atomic
    /// Secret updates are seen), calling `on_result` with `"applied"` or `"failed"` each time.
    pub async fn reload_on_change(self, on_result: impl Fn(&'static str) + Send + 'static) {
        let paths: Vec<PathBuf> = [&self.files.cert, &self.files.key, &self.files.client_ca]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        let names: HashSet<OsString> = paths
            .iter()
            .filter_map(|p| p.file_name().map(ToOwned::to_owned))
            .collect();
        let (tx, mut changed) = tokio::sync::mpsc::channel::<()>(1);
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            if matches!(event.kind, notify::EventKind::Access(_)) {
                return;
            }
            if event.paths.iter().any(|p| is_read(&names, p)) {
                let _ = tx.try_send(());
            }
        });
        let mut watcher = match watcher {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(cert = self.flags.cert, error = %e, "cannot watch the TLS files; rotating them needs a restart");
                return;
            }
        };
        watch_dirs(&mut watcher, paths.iter().map(PathBuf::as_path), "TLS");
        while changed.recv().await.is_some() {
            // Let the files of one rotation all land, then read them once.
            tokio::time::sleep(Duration::from_millis(200)).await;
            while changed.try_recv().is_ok() {}
            let result = match self.reload() {
                Ok(()) => {
                    tracing::info!(
                        cert = self.flags.cert,
                        "reloaded the TLS certificate, key and client CA; new connections use them"
                    );
                    "applied"
                }
                Err(e) => {
                    tracing::error!(cert = self.flags.cert, error = %format!("{e:#}"), "TLS files changed but do not load; keeping the previous ones");
                    "failed"
                }
            };
            on_result(result);
        }
    }
}

/// Watches the directories of `files` (not the files: Kubernetes swaps a mounted ConfigMap's or
/// Secret's files in by renaming a directory entry), each once; one that cannot be watched is
/// logged, naming `what` the files are.
pub fn watch_dirs<'a>(
    watcher: &mut impl notify::Watcher,
    files: impl IntoIterator<Item = &'a Path>,
    what: &str,
) {
    let mut dirs: Vec<&Path> = files
        .into_iter()
        .map(|file| match file.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    for dir in dirs {
        if let Err(e) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch a {what} directory");
        }
    }
}

/// Whether a change at `path` may change a file read by name from `names`: one of them, or an
/// entry of Kubernetes' atomic writer (`..data`, `..2026_11_26_...`) swapping them in.
pub fn is_read(names: &HashSet<OsString>, path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| names.contains(n) || n.to_string_lossy().starts_with(".."))
}

fn read(path: &Path, what: &str, flag: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading the {what} {} ({flag})", path.display()))
}

fn certificates(path: &Path, what: &str, flag: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = read(path, what, flag)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing the {what} {} ({flag})", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "the {what} {} ({flag}) holds no PEM certificate",
        path.display()
    );
    Ok(certs)
}

/// The rustls server config of `files` (which must name a certificate and a key).
fn server_config(files: &TlsFiles, flags: TlsFlags, alpn: &[Vec<u8>]) -> anyhow::Result<Loaded> {
    let (Some(cert), Some(key)) = (&files.cert, &files.key) else {
        anyhow::bail!("{} and {} must be given together", flags.cert, flags.key);
    };
    let chain = certificates(cert, "TLS certificate", flags.cert)?;
    let key_pem = read(key, "TLS key", flags.key)?;
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
        .with_context(|| format!("parsing the TLS key {} ({})", key.display(), flags.key))?;
    let builder = rustls::ServerConfig::builder();
    let mut client_verifier: Option<Arc<dyn ClientCertVerifier>> = None;
    let mut client_ca = Vec::new();
    let builder = match &files.client_ca {
        Some(ca) => {
            let flag = flags.client_ca.unwrap_or("client CA");
            let mut roots = rustls::RootCertStore::empty();
            client_ca = certificates(ca, "client CA", flag)?;
            for cert in client_ca.iter().cloned() {
                roots
                    .add(cert)
                    .with_context(|| format!("adding the client CA {} ({flag})", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .with_context(|| format!("using the client CA {} ({flag})", ca.display()))?;
            client_verifier = Some(verifier.clone());
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
    config.alpn_protocols = alpn.to_vec();
    Ok(Loaded {
        config: Arc::new(config),
        client_verifier,
        client_ca,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_error(files: TlsFiles, flags: TlsFlags) -> String {
        match ServingTls::load(&files, flags, &[b"h2"]) {
            Ok(_) => panic!("{files:?} loaded"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn no_files_is_plaintext_and_half_a_configuration_names_its_flags() {
        assert!(
            ServingTls::load(&TlsFiles::default(), TlsFlags::ADMIN, &[])
                .unwrap()
                .is_none()
        );
        let cert_only = TlsFiles {
            cert: Some("tls.crt".into()),
            ..Default::default()
        };
        assert_eq!(
            load_error(cert_only, TlsFlags::ADMIN),
            "--admin-tls-cert and --admin-tls-key must be given together"
        );
        let ca_only = TlsFiles {
            client_ca: Some("ca.crt".into()),
            ..Default::default()
        };
        assert_eq!(
            load_error(ca_only.clone(), TlsFlags::GRPC),
            "--client-ca needs --tls-cert and --tls-key"
        );
        assert_eq!(
            load_error(ca_only, TlsFlags::ADMIN),
            "--admin-tls-cert takes no client CA"
        );
    }

    #[test]
    fn an_unreadable_or_empty_file_is_named_with_its_flag() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("tls.crt");
        let key = dir.path().join("tls.key");
        let files = TlsFiles {
            cert: Some(cert.clone()),
            key: Some(key.clone()),
            client_ca: None,
        };
        let error = load_error(files.clone(), TlsFlags::ADMIN);
        assert!(
            error.starts_with(&format!(
                "reading the TLS certificate {} (--admin-tls-cert)",
                cert.display()
            )),
            "{error}"
        );
        std::fs::write(&cert, "not PEM\n").unwrap();
        let error = load_error(files, TlsFlags::GRPC);
        assert_eq!(
            error,
            format!(
                "the TLS certificate {} (--tls-cert) holds no PEM certificate",
                cert.display()
            )
        );
    }
}
