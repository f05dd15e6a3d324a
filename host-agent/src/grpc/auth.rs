//! Tenant identity from the transport: a bearer token, or a client certificate's common name.
//!
//! | credentials                  | result                                                       |
//! |------------------------------|--------------------------------------------------------------|
//! | `authorization: Bearer T`    | the tenant whose token is T; unknown token → UNAUTHENTICATED |
//! | client certificate (mTLS)    | the tenant named by the subject CN; unknown → PERMISSION_DENIED |
//! | nothing                      | only with `--allow-unauthenticated`: the tenant named by `x-rcsync-tenant`, if it has no token |
//!
//! When `x-rcsync-tenant` is sent, it must name the identified tenant (PERMISSION_DENIED otherwise).
//!
//! A stream (Sync, WatchPodStatus) is authenticated when it opens and again whenever a reload of
//! the tenants file changes its tenant ([`Authenticator::revoked`]): it ends once its tenant is
//! removed (PERMISSION_DENIED), its bearer token is no longer the tenant's (a rotated `tokenFile`:
//! UNAUTHENTICATED), or its tenant, reached without credentials, now has a token. A revoked token
//! reads nothing more, however long its streams were open. A client certificate that expires or
//! that a reloaded client CA refuses ends the streams and calls of every caller over its
//! connections, whatever identified the caller, and the connections themselves (through
//! [`PeerCheck`], implemented here for mutual-TLS connections, which also reads each connection's
//! certificate once for all its requests). A reload wakes only the streams of the tenants it
//! changed:
//!
//! ```text
//!  tenants watch ──(one task per agent)──► per-tenant changes (the tenants whose entry or tokens differ)
//!                                            └─► that tenant's streams check their caller again
//! ```
//!
//! ```text
//!  h2 request ──► Authenticated (headers, peer certificate; no body read yet)
//!                   ├─ unknown caller ──► UNAUTHENTICATED / PERMISSION_DENIED at once
//!                   ├─ ApplyPod/DeletePod past the tenant's podSyncInFlight ──► RESOURCE_EXHAUSTED
//!                   └─► the service: tonic decodes the body; the handler identifies the caller again
//! ```

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{Either, Ready};
use rcsync_core::tls::ClientCertificates;

use rcsync_core::TenantName;
use tokio::sync::watch;
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Request, Status};

use crate::grpc::METHODS;
use crate::grpc::limits::{StreamKind, StreamSlot, TenantLimiter};
use crate::grpc::peer::{CertificateChecks, PeerCertificate};
use crate::grpc::pods::POD_SYNC_CALLS;
use crate::grpc::serve::{PeerCheck, Revoked};
use crate::index::{TenantsState, ViewSource};
use crate::metrics::Metrics;

/// Metadata key naming the tenant a caller means.
pub const TENANT_HEADER: &str = "x-rcsync-tenant";

/// Identifies the tenant of each request.
#[derive(Clone)]
pub struct Authenticator {
    tenants: watch::Receiver<Arc<TenantsState>>,
    allow_unauthenticated: bool,
    changes: TenantChanges,
    /// With mutual TLS: the client CA in use, to check connections' certificates again.
    certificates: Option<CertificateChecks>,
}

/// A wake-up per tenant with open streams, sent when a reload changes that tenant: its entry in
/// the tenants file or its tokens.
#[derive(Clone, Default)]
struct TenantChanges(Arc<std::sync::Mutex<Wakes>>);

#[derive(Default)]
struct Wakes {
    /// Whether the task that sends them runs (started by the first stream).
    following: bool,
    by_tenant: HashMap<TenantName, watch::Sender<()>>,
}

impl TenantChanges {
    fn lock(&self) -> std::sync::MutexGuard<'_, Wakes> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes when a reload of `tenants` changes `tenant`. The first call starts the task that
    /// follows the reloads, on the current Tokio runtime.
    fn subscribe(
        &self,
        tenant: &TenantName,
        tenants: &watch::Receiver<Arc<TenantsState>>,
    ) -> watch::Receiver<()> {
        let mut wakes = self.lock();
        if !std::mem::replace(&mut wakes.following, true) {
            tokio::spawn(self.clone().follow(tenants.clone()));
        }
        wakes
            .by_tenant
            .entry(tenant.clone())
            .or_insert_with(|| watch::channel(()).0)
            .subscribe()
    }

    /// Follows reloads from `tenants`, waking the streams of each tenant whose entry or tokens
    /// changed (and forgetting tenants no stream follows any more). Ends when the config is no
    /// longer reloaded.
    async fn follow(self, mut tenants: watch::Receiver<Arc<TenantsState>>) {
        let mut before = tenants.borrow_and_update().clone();
        while tenants.changed().await.is_ok() {
            let now = tenants.borrow_and_update().clone();
            self.lock().by_tenant.retain(|tenant, wake| {
                let changed = before.file.tenant(tenant.as_str()) != now.file.tenant(tenant.as_str())
                    || before.tokens.tokens_of(tenant) != now.tokens.tokens_of(tenant);
                if changed {
                    wake.send_replace(());
                }
                wake.receiver_count() > 0
            });
            before = now;
        }
    }
}

impl Authenticator {
    /// An authenticator over the current tenants.
    pub fn new(tenants: watch::Receiver<Arc<TenantsState>>, allow_unauthenticated: bool) -> Self {
        Self {
            tenants,
            allow_unauthenticated,
            changes: TenantChanges::default(),
            certificates: None,
        }
    }

    /// The same, ending a stream opened with a client certificate once the client CA reloaded
    /// from its file no longer accepts it, or once it expires (see [`Authenticator::revoked`]).
    pub fn verifying_client_certificates(self, certificates: ClientCertificates) -> Self {
        Self {
            certificates: Some(CertificateChecks::new(certificates)),
            ..self
        }
    }

    /// The tenant a request acts for, once the host's RuntimeClasses were listed: before that every
    /// call is UNAVAILABLE, since no decision could be complete.
    pub fn identify_ready<T>(
        &self,
        request: &Request<T>,
        views: &impl ViewSource,
    ) -> Result<TenantName, Status> {
        self.caller_ready(request, views).map(|caller| caller.tenant)
    }

    /// The caller of a request (for a stream: to [`Authenticator::revoked`] later), once the
    /// host's RuntimeClasses were listed.
    pub fn caller_ready<T>(&self, request: &Request<T>, views: &impl ViewSource) -> Result<Caller, Status> {
        let caller = self.identify(request)?;
        if !views.is_synced() {
            return Err(Status::unavailable(
                "the host agent has not listed the host's RuntimeClasses yet",
            ));
        }
        Ok(caller)
    }

    /// The caller of a request, or the gRPC error to answer.
    pub fn identify<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        self.identify_caller(request.metadata().as_ref(), request.extensions())
    }

    /// Resolves, with the status to end `caller`'s stream with, once a reload of the tenants file
    /// no longer accepts it (see [`Authenticator::accepts`]), or, for a caller identified by its
    /// client certificate, once that certificate expires or a reload of the client CA no longer
    /// accepts it; never while all still do.
    pub fn revoked(&self, caller: Caller) -> impl Future<Output = Status> + Send + use<> {
        self.stream_ended(caller, |_, _| Ok(()))
    }

    /// [`Authenticator::revoked`], or the status `also` returns for the tenants as reloaded
    /// (what else ends the stream, e.g. its tenant moved to another host namespace). The
    /// tenants are checked now and again whenever a reload changes the caller's tenant, not at
    /// other reloads. Called on a Tokio runtime.
    pub fn stream_ended<C>(&self, caller: Caller, also: C) -> impl Future<Output = Status> + Send + use<C>
    where
        C: Fn(&TenantsState, &Caller) -> Result<(), Status> + Send + 'static,
    {
        // Boxed, and only over mutual TLS: its timer is most of its size, which each stream
        // opened without a certificate would otherwise carry too.
        let mut certificate = match (&caller.certificate, &self.certificates) {
            (Some(peer), Some(certificates)) => {
                let revoked = certificates.revoked(peer.clone());
                Some(Box::pin(async move {
                    Status::unauthenticated(format!(
                        "the client certificate this stream was opened with {}: open it again with a current one",
                        revoked.await
                    ))
                }))
            }
            _ => None,
        };
        // Subscribed before the first check: a reload between the two is seen by one of them.
        let mut changes = self.changes.subscribe(&caller.tenant, &self.tenants);
        let tenants = self.tenants.clone();
        async move {
            let mut following = true;
            let status = loop {
                let checked = {
                    let state = tenants.borrow();
                    Self::accepts(&state, &caller).and_then(|()| also(&state, &caller))
                };
                if let Err(status) = checked {
                    break status;
                }
                let certificate = async {
                    match certificate.as_mut() {
                        Some(certificate) => certificate.await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    // Closed when the config is no longer reloaded (the agent is stopping):
                    // shutdown ends the stream.
                    changed = changes.changed(), if following => following = changed.is_ok(),
                    status = certificate => break status,
                }
            };
            tracing::info!(tenant = %caller.tenant, %status, "ending a stream");
            status
        }
    }

    /// Whether `state` accepts `caller`, identified under an earlier state, as it did then: its
    /// tenant is still configured (PERMISSION_DENIED otherwise), its bearer token is still that
    /// tenant's, and a tenant reached without credentials still has no token (UNAUTHENTICATED).
    pub fn accepts(state: &TenantsState, caller: &Caller) -> Result<(), Status> {
        if state.file.tenant(caller.tenant.as_str()).is_none() {
            return Err(Status::permission_denied(
                "the tenant was removed from the host agent's config",
            ));
        }
        match &caller.credential {
            Credential::Bearer(token) if state.tokens.tenant_of(token) != Some(&caller.tenant) => {
                Err(Status::unauthenticated(
                    "the bearer token this stream was opened with is no longer the tenant's (its tokenFile changed): open it again with the current token",
                ))
            }
            Credential::Anonymous if state.tokens.has_token(&caller.tenant) => Err(Status::unauthenticated(
                "the tenant now requires its bearer token: open the stream again with it",
            )),
            Credential::Bearer(_) | Credential::Certificate | Credential::Anonymous => Ok(()),
        }
    }

    /// The caller of a call from its headers and connection (its peer certificate), before any
    /// of its body is read.
    fn identify_caller(
        &self,
        meta: &http::HeaderMap,
        connection: &http::Extensions,
    ) -> Result<Caller, Status> {
        let state = self.tenants.borrow().clone();
        let claimed = match meta.get(TENANT_HEADER) {
            Some(v) => Some(
                v.to_str()
                    .map_err(|_| Status::invalid_argument(format!("{TENANT_HEADER} is not ASCII")))?
                    .to_string(),
            ),
            None => None,
        };
        let bearer = match meta.get("authorization") {
            Some(v) => {
                let v = v
                    .to_str()
                    .map_err(|_| Status::unauthenticated("malformed authorization header"))?;
                let token = v.strip_prefix("Bearer ").ok_or_else(|| {
                    Status::unauthenticated("the authorization header must be `Bearer <token>`")
                })?;
                Some(token.trim())
            }
            None => None,
        };
        // Whatever identifies the caller, a connection's client certificate must still be good.
        let certificate = PeerCertificate::of_request(connection);
        if let (Some(peer), Some(certificates)) = (&certificate, &self.certificates) {
            certificates.check(peer)?;
        }
        let (tenant, credential) = if let Some(token) = bearer {
            let (token, tenant) = state
                .tokens
                .entry_of(token)
                .ok_or_else(|| Status::unauthenticated("invalid bearer token"))?;
            (tenant.clone(), Credential::Bearer(token.clone()))
        } else if let Some(cn) = certificate.as_ref().and_then(|peer| peer.common_name()) {
            let name = TenantName::new(cn).map_err(|_| {
                Status::permission_denied(format!("client certificate names no tenant ({cn:?})"))
            })?;
            if state.file.tenant(name.as_str()).is_none() {
                return Err(Status::permission_denied(format!("unknown tenant {cn:?}")));
            }
            (name, Credential::Certificate)
        } else {
            if !self.allow_unauthenticated {
                return Err(Status::unauthenticated(
                    "missing credentials: send `authorization: Bearer <token>` or a client certificate",
                ));
            }
            let claimed = claimed.as_deref().ok_or_else(|| {
                Status::unauthenticated(format!(
                    "missing credentials: name the tenant with {TENANT_HEADER}"
                ))
            })?;
            let name = TenantName::new(claimed)
                .map_err(|_| Status::permission_denied(format!("unknown tenant {claimed:?}")))?;
            if state.file.tenant(name.as_str()).is_none() {
                return Err(Status::permission_denied(format!("unknown tenant {claimed:?}")));
            }
            if state.tokens.has_token(&name) {
                return Err(Status::unauthenticated(format!(
                    "tenant {claimed:?} requires its bearer token"
                )));
            }
            (name, Credential::Anonymous)
        };
        if let Some(claimed) = claimed
            && claimed != tenant.as_str()
        {
            return Err(Status::permission_denied(format!(
                "{TENANT_HEADER} {claimed:?} does not match the caller's identity"
            )));
        }
        if state.file.tenant(tenant.as_str()).is_none() {
            return Err(Status::permission_denied(format!(
                "unknown tenant {:?}",
                tenant.as_str()
            )));
        }
        Ok(Caller {
            tenant,
            credential,
            certificate,
        })
    }
}

/// An identified caller: its tenant, and how it proved to be it.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The tenant the caller acts for.
    pub tenant: TenantName,
    credential: Credential,
    /// The client certificate of the caller's connection (mutual TLS), whatever identified the
    /// caller: when it is revoked, so is the caller.
    certificate: Option<Arc<PeerCertificate>>,
}

/// How a caller was identified: what [`Authenticator::accepts`] checks again at a reload.
#[derive(Clone)]
enum Credential {
    /// A bearer token: the tenants' own copy of it, shared, not copied per caller.
    Bearer(Arc<str>),
    /// The connection's client certificate, whose common name is the tenant's name.
    Certificate,
    /// No credentials (`--allow-unauthenticated`, a tenant without a token).
    Anonymous,
}

impl std::fmt::Debug for Credential {
    // Never the token itself, in logs or panics.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Bearer(_) => "Bearer(..)",
            Self::Certificate => "Certificate",
            Self::Anonymous => "Anonymous",
        })
    }
}

/// A gRPC service whose calls are authenticated from their headers before anything of their body
/// is read. tonic decodes a unary request (up to 4 MiB) before the handler runs, so a check in the
/// handler alone let a caller without credentials make the agent buffer a message per call: here
/// such a call costs its headers and is answered at once. The handlers still identify the caller
/// (from the same headers, at the cost of a map lookup), so they hold on their own too.
///
/// With [`Authenticated::limiting_pod_syncs`], ApplyPod and DeletePod calls also take one of the
/// tenant's `podSyncInFlight` places here, held until the call is answered: what a tenant's open
/// calls can make the agent buffer is bounded before any of it is read.
#[derive(Clone)]
pub struct Authenticated<S> {
    service: S,
    auth: Authenticator,
    metrics: Metrics,
    pod_syncs: Option<TenantLimiter>,
}

impl<S> Authenticated<S> {
    /// `service`, reachable only by callers `auth` identifies; the calls refused here are counted
    /// in `metrics` as the handlers count theirs.
    pub fn new(service: S, auth: Authenticator, metrics: Metrics) -> Self {
        Self {
            service,
            auth,
            metrics,
            pod_syncs: None,
        }
    }

    /// The same, with each tenant's ApplyPod and DeletePod calls limited to its `podSyncInFlight`.
    pub fn limiting_pod_syncs(self, limiter: TenantLimiter) -> Self {
        Self {
            pod_syncs: Some(limiter),
            ..self
        }
    }
}

impl<S: NamedService> NamedService for Authenticated<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<B>> for Authenticated<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>, Error = Infallible>,
    S::Future: Unpin,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Either<Ready<Result<Self::Response, Infallible>>, Holding<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.service.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let started = std::time::Instant::now();
        let path = request.uri().path();
        // Only the known methods name a series (any path under the service reaches here).
        let method = METHODS.into_iter().find(|m| *m == path).unwrap_or("other");
        let metrics = &self.metrics;
        let refuse = |status: Status| {
            metrics.observe(method, status.code(), started);
            Either::Left(futures::future::ready(Ok(status.into_http())))
        };
        let tenant = match self.auth.identify_caller(request.headers(), request.extensions()) {
            Ok(caller) => caller.tenant,
            Err(status) => return refuse(status),
        };
        let slot = match &self.pod_syncs {
            Some(limiter) if POD_SYNC_CALLS.contains(&method) => {
                match limiter.open(&tenant, StreamKind::PodSyncCall) {
                    Ok(slot) => Some(slot),
                    Err(status) => return refuse(status),
                }
            }
            _ => None,
        };
        // PodSync's budget names the caller in its metrics without identifying it again (other
        // calls, CheckPod among them, skip the copy).
        let mut request = request;
        if POD_SYNC_CALLS.contains(&method) {
            request.extensions_mut().insert(tenant);
        }
        Either::Right(Holding {
            call: self.service.call(request),
            _slot: slot,
        })
    }
}

/// A call's answer, holding the tenant's place for the call until it is answered.
pub struct Holding<F> {
    call: F,
    _slot: Option<StreamSlot>,
}

impl<F: Future + Unpin> Future for Holding<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        Pin::new(&mut self.call).poll(cx)
    }
}

/// A mutual-TLS connection's client certificate is read once, when it is accepted, and the
/// connection ends once the certificate expires or a reload of the client CA no longer accepts
/// it (the streams of every caller over it end then too, through [`Authenticator::stream_ended`]).
impl PeerCheck<TlsConnectInfo<TcpConnectInfo>> for Authenticator {
    type Peer = Arc<PeerCertificate>;

    fn peer(&self, connection: &TlsConnectInfo<TcpConnectInfo>) -> Option<Arc<PeerCertificate>> {
        PeerCertificate::of(connection).map(Arc::new)
    }

    fn revoked(&self, peer: &Arc<PeerCertificate>) -> Option<Revoked> {
        Some(self.certificates.as_ref()?.connection_revoked(peer))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use futures::FutureExt as _;
    use rcsync_core::TenantsFile;

    use super::*;
    use crate::tenants::TenantTokens;

    /// The tenants `yaml` names, with the token files it names written in `dir` first.
    fn state(dir: &Path, yaml: &str, tokens: &[(&str, &str)]) -> Arc<TenantsState> {
        for (file, token) in tokens {
            std::fs::write(dir.join(file), token).unwrap();
        }
        let yaml = yaml.replace("DIR", &dir.display().to_string());
        let path = dir.join("tenants.yaml");
        let file = TenantsFile::parse(&path, &yaml).unwrap();
        Arc::new(TenantsState {
            tokens: TenantTokens::load(&path, &file).unwrap(),
            file,
            patches: Default::default(),
        })
    }

    fn request(headers: &[(&'static str, &str)]) -> Request<()> {
        let mut request = Request::new(());
        for (name, value) in headers {
            request.metadata_mut().insert(*name, value.parse().unwrap());
        }
        request
    }

    const TWO: &str = "tenants:\n  - {name: a, hostNamespace: ns-a, tokenFile: DIR/a.token}\n  - {name: b, hostNamespace: ns-b}\n";

    #[tokio::test]
    async fn a_stream_is_revoked_when_its_token_is_rotated_or_reassigned_not_on_other_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let (config, rx) = watch::channel(state(dir.path(), TWO, &[("a.token", "one\n")]));
        let auth = Authenticator::new(rx, false);
        let caller = auth
            .identify(&request(&[("authorization", "Bearer one")]))
            .unwrap();
        assert_eq!(caller.tenant.as_str(), "a");
        let mut revoked = Box::pin(auth.revoked(caller.clone()));
        assert!((&mut revoked).now_or_never().is_none(), "nothing changed");
        // Another tenant's change, and the same token read again, go on.
        config.send_replace(state(
            dir.path(),
            &TWO.replace("ns-b}", "ns-b2}"),
            &[("a.token", "  one  \n")],
        ));
        settle().await;
        assert!((&mut revoked).now_or_never().is_none(), "a's token is unchanged");
        // A rotated token ends the stream; so would the old token given to another tenant.
        config.send_replace(state(dir.path(), TWO, &[("a.token", "two")]));
        let status = revoked.await;
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        assert!(status.message().contains("no longer the tenant's"), "{status:?}");
        let swapped = "tenants:\n  - {name: a, hostNamespace: ns-a, tokenFile: DIR/a.token}\n  - {name: b, hostNamespace: ns-b, tokenFile: DIR/b.token}\n";
        config.send_replace(state(
            dir.path(),
            swapped,
            &[("a.token", "two"), ("b.token", "one")],
        ));
        let status = auth.revoked(caller.clone()).await;
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        // A removed tenant is denied, as its new calls are.
        config.send_replace(state(
            dir.path(),
            "tenants:\n  - {name: b, hostNamespace: ns-b}\n",
            &[],
        ));
        let status = auth.revoked(caller).await;
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    }

    #[tokio::test]
    async fn a_stream_without_credentials_is_revoked_once_its_tenant_has_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let (config, rx) = watch::channel(state(dir.path(), TWO, &[("a.token", "one")]));
        let auth = Authenticator::new(rx, true);
        let caller = auth.identify(&request(&[(TENANT_HEADER, "b")])).unwrap();
        assert_eq!(
            format!("{caller:?}"),
            "Caller { tenant: TenantName(\"b\"), credential: Anonymous, certificate: None }"
        );
        let mut revoked = Box::pin(auth.revoked(caller));
        config.send_replace(state(dir.path(), &TWO.replace("ns-a,", "ns-a2,"), &[]));
        settle().await;
        assert!((&mut revoked).now_or_never().is_none(), "b still has no token");
        config.send_replace(state(
            dir.path(),
            &TWO.replace("ns-b}", "ns-b, tokenFile: DIR/b.token}"),
            &[("b.token", "three")],
        ));
        let status = revoked.await;
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        assert!(
            status.message().contains("now requires its bearer token"),
            "{status:?}"
        );
    }

    /// Lets the runtime's other tasks (the reload follower) run (the tests' runtime has one
    /// thread: they run in turn).
    async fn settle() {
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_reload_wakes_only_the_streams_of_the_tenants_it_changed() {
        let dir = tempfile::tempdir().unwrap();
        let (config, rx) = watch::channel(state(dir.path(), TWO, &[("a.token", "one")]));
        let auth = Authenticator::new(rx, false);
        let checks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = checks.clone();
        let a = auth
            .identify(&request(&[("authorization", "Bearer one")]))
            .unwrap();
        let mut ended = Box::pin(auth.stream_ended(a, move |_, _| {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        }));
        let count = || checks.load(std::sync::atomic::Ordering::Relaxed);
        assert!((&mut ended).now_or_never().is_none());
        assert_eq!(count(), 1, "checked once when it starts");
        // b's entry changes, a's token file is read again unchanged: a is not woken.
        config.send_replace(state(
            dir.path(),
            &TWO.replace("ns-b}", "ns-b2}"),
            &[("a.token", "one")],
        ));
        settle().await;
        assert!((&mut ended).now_or_never().is_none());
        assert_eq!(
            count(),
            1,
            "a reload that leaves a as it is wakes none of a's streams"
        );
        // a's entry changes (its selector, here its namespace): checked again, goes on.
        config.send_replace(state(dir.path(), &TWO.replace("ns-a,", "ns-a2,"), &[]));
        settle().await;
        assert!((&mut ended).now_or_never().is_none());
        assert_eq!(count(), 2);
        // Its token changes: it ends.
        config.send_replace(state(
            dir.path(),
            &TWO.replace("ns-a,", "ns-a2,"),
            &[("a.token", "two")],
        ));
        assert_eq!(ended.await.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn a_callers_token_is_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let (_config, rx) = watch::channel(state(dir.path(), TWO, &[("a.token", "secret-token")]));
        let auth = Authenticator::new(rx, false);
        let caller = auth
            .identify(&request(&[("authorization", "Bearer secret-token")]))
            .unwrap();
        let printed = format!("{caller:?}");
        assert!(!printed.contains("secret-token"), "{printed}");
    }
}
