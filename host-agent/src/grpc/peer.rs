//! The client certificate of a mutual-TLS connection: read once, when the connection is accepted
//! ([`PeerCertificate`], carried by each of its requests), verified again at each call once the
//! client CA was reloaded ([`CertificateChecks::check`]), and followed while the connection and
//! its streams are open ([`CertificateChecks::revoked`]).
//!
//! ```text
//!  TLS handshake ──► serve: PeerCheck::peer, once ──► Arc<PeerCertificate> in each request's extensions
//!                      └─► PeerCheck::revoked ──► GOAWAY once it expires or a reloaded client CA refuses it
//!  each call   ──► CertificateChecks::check   (after a reload: verified once per certificate)
//!  each stream ──► CertificateChecks::revoked ──► UNAUTHENTICATED at expiry or refusal
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rcsync_core::tls::ClientCertificates;
use rustls::pki_types::CertificateDer;
use tonic::Status;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::grpc::serve::Revoked;

/// The client certificate of a mutual-TLS connection, read once per connection (see
/// [`PeerCheck`](crate::grpc::serve::PeerCheck)) and carried by each of its requests.
pub struct PeerCertificate {
    /// Its subject common name, when it has one.
    cn: Option<String>,
    /// The chain the client sent, its certificate first.
    chain: Arc<Vec<CertificateDer<'static>>>,
    /// When it expires (`None`: a date before 1970, which the handshake would not accept).
    not_after: Option<SystemTime>,
    /// Where the connection comes from.
    remote: Option<SocketAddr>,
}

impl PeerCertificate {
    /// The certificate a connection's client sent at its handshake, if any.
    pub fn of(connection: &TlsConnectInfo<TcpConnectInfo>) -> Option<Self> {
        let chain = connection.peer_certs()?;
        let (_, cert) = x509_parser::parse_x509_certificate(chain.first()?.as_ref()).ok()?;
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string);
        let not_after = u64::try_from(cert.validity().not_after.timestamp())
            .ok()
            .map(|secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
        Some(Self {
            cn,
            chain,
            not_after,
            remote: connection.get_ref().remote_addr(),
        })
    }

    /// A request's client certificate: the one its connection read when it was accepted, or, for
    /// a request served otherwise, read from its connect info now.
    pub fn of_request(request: &http::Extensions) -> Option<Arc<Self>> {
        match request.get::<Arc<Self>>() {
            Some(peer) => Some(peer.clone()),
            None => Self::of(request.get::<TlsConnectInfo<TcpConnectInfo>>()?).map(Arc::new),
        }
    }

    /// Its subject common name, when it has one.
    pub fn common_name(&self) -> Option<&str> {
        self.cn.as_deref()
    }
}

impl std::fmt::Debug for PeerCertificate {
    // The subject and dates, not the chain's bytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerCertificate")
            .field("cn", &self.cn)
            .field("not_after", &self.not_after)
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

/// How many verified client certificates are remembered per client CA reload (then forgotten,
/// and verified again as they call).
const VERIFIED_CERTIFICATES: usize = 4096;

/// The client certificates verified since the last reload of the client CA: leaf DER → result.
#[derive(Default)]
struct VerifiedCertificates {
    generation: u64,
    results: HashMap<Vec<u8>, Result<(), String>>,
}

/// Client certificates checked against the client CA as it is reloaded. Cheap to clone.
#[derive(Clone)]
pub struct CertificateChecks {
    certificates: ClientCertificates,
    verified: Arc<Mutex<VerifiedCertificates>>,
}

impl CertificateChecks {
    /// Checks against `certificates`, the client CA the gRPC port serves with.
    pub fn new(certificates: ClientCertificates) -> Self {
        Self {
            certificates,
            verified: Arc::default(),
        }
    }

    /// Whether the client certificate of a call's connection is still good: not expired, and,
    /// once the client CA was reloaded, accepted by the CA loaded now (the handshake may have
    /// been verified by an earlier one). Each certificate is verified once per reload.
    pub fn check(&self, peer: &PeerCertificate) -> Result<(), Status> {
        if peer.not_after.is_some_and(|t| t <= SystemTime::now()) {
            return Err(Status::unauthenticated("the client certificate has expired"));
        }
        let generation = self.certificates.generation();
        if generation == 0 {
            return Ok(());
        }
        let Some(leaf) = peer.chain.first() else {
            return Err(Status::unauthenticated(
                "the connection carries no client certificate",
            ));
        };
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if verified.generation != generation || verified.results.len() >= VERIFIED_CERTIFICATES {
            verified.generation = generation;
            verified.results.clear();
        }
        let result = match verified.results.get(leaf.as_ref()) {
            Some(result) => result.clone(),
            None => {
                let result = self.certificates.verify(&peer.chain);
                verified.results.insert(leaf.as_ref().to_vec(), result.clone());
                result
            }
        };
        result.map_err(|why| {
            Status::unauthenticated(format!(
                "the client certificate is no longer accepted by the client CA (--client-ca was reloaded): {why}"
            ))
        })
    }

    /// Resolves once `peer` expires or a reload of the client CA no longer accepts it, with what
    /// happened ("has expired", "is no longer accepted by the client CA ...").
    pub fn revoked(&self, peer: Arc<PeerCertificate>) -> impl Future<Output = String> + Send + use<> {
        let certificates = self.certificates.clone();
        async move {
            let not_after = peer.not_after;
            let mut reloads = certificates.reloaded();
            let mut reloading = true;
            loop {
                // Timers are kept within a day (tokio's reach is about two years); the loop
                // re-arms.
                let until_expiry = not_after.map(|t| {
                    t.duration_since(SystemTime::now())
                        .unwrap_or_default()
                        .min(Duration::from_secs(86_400))
                });
                tokio::select! {
                    _ = tokio::time::sleep(until_expiry.unwrap_or_default()), if until_expiry.is_some() => {
                        if not_after.is_some_and(|t| t <= SystemTime::now()) {
                            return "has expired".into();
                        }
                    }
                    changed = reloads.changed(), if reloading => {
                        if changed.is_err() {
                            // No more reloads (the agent is stopping): expiry alone is left.
                            reloading = false;
                        } else if let Err(why) = certificates.verify(&peer.chain) {
                            return format!(
                                "is no longer accepted by the client CA (--client-ca was reloaded): {why}"
                            );
                        }
                    }
                    else => return std::future::pending().await,
                }
            }
        }
    }

    /// [`CertificateChecks::revoked`] for a whole connection, its reason naming the certificate
    /// and where the connection comes from.
    pub fn connection_revoked(&self, peer: &Arc<PeerCertificate>) -> Revoked {
        let revoked = self.revoked(peer.clone());
        let peer = peer.clone();
        Box::pin(async move {
            let why = revoked.await;
            let remote = peer
                .remote
                .map_or_else(|| "an unknown address".to_string(), |a| a.to_string());
            format!(
                "the client certificate (CN {}) of the connection from {remote} {why}",
                peer.cn.as_deref().unwrap_or("none")
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// A server's TLS files in `dir`: a serving pair of `pki` and `ca` as the client CA.
    fn serving_tls(dir: &Path, pki: &devcluster::pki::Pki, ca: &str) -> rcsync_core::tls::ServingTls {
        let server = pki.server(&["localhost"]).unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            Some(path)
        };
        let files = rcsync_core::tls::TlsFiles {
            cert: write("tls.crt", &server.cert_pem),
            key: write("tls.key", &server.key_pem),
            client_ca: write("ca.crt", ca),
        };
        rcsync_core::tls::ServingTls::load(&files, rcsync_core::tls::TlsFlags::GRPC, &[b"h2"])
            .unwrap()
            .unwrap()
    }

    #[test]
    fn only_a_changed_client_ca_counts_and_it_verifies_certificates_against_the_new_one() {
        use rustls::pki_types::pem::PemObject as _;
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (
            devcluster::pki::Pki::new("rcsync-unit-old-ca").unwrap(),
            devcluster::pki::Pki::new("rcsync-unit-new-ca").unwrap(),
        );
        let tls = serving_tls(dir.path(), &old, &old.ca_pem());
        let certificates = tls.client_certificates();
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(old.client("a").unwrap().cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
        assert_eq!(
            (certificates.generation(), certificates.verify(&chain)),
            (0, Ok(()))
        );
        // A new serving certificate (cert-manager's renewal) leaves the client CA as it was.
        let renewed = old.server(&["localhost"]).unwrap();
        std::fs::write(dir.path().join("tls.crt"), &renewed.cert_pem).unwrap();
        std::fs::write(dir.path().join("tls.key"), &renewed.key_pem).unwrap();
        tls.reload().unwrap();
        assert_eq!(certificates.generation(), 0);
        // Both CAs, then the new one alone.
        std::fs::write(dir.path().join("ca.crt"), old.ca_pem() + &new.ca_pem()).unwrap();
        tls.reload().unwrap();
        assert_eq!(
            (certificates.generation(), certificates.verify(&chain)),
            (1, Ok(()))
        );
        std::fs::write(dir.path().join("ca.crt"), new.ca_pem()).unwrap();
        tls.reload().unwrap();
        assert_eq!(certificates.generation(), 2);
        assert!(certificates.verify(&chain).is_err());
    }

    #[tokio::test]
    async fn an_expired_client_certificate_is_revoked_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let pki = devcluster::pki::Pki::new("rcsync-unit-ca").unwrap();
        let tls = serving_tls(dir.path(), &pki, &pki.ca_pem());
        let expired = Some(SystemTime::now() - Duration::from_secs(1));
        let peer = Arc::new(PeerCertificate {
            cn: None,
            chain: Arc::default(),
            not_after: expired,
            remote: None,
        });
        let why = CertificateChecks::new(tls.client_certificates())
            .revoked(peer)
            .await;
        assert_eq!(why, "has expired");
    }
}
