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
//! ```text
//!  h2 request ──► Authenticated (headers, peer certificate; no body read yet)
//!                   ├─ unknown caller ──► UNAUTHENTICATED / PERMISSION_DENIED at once
//!                   ├─ ApplyPod/DeletePod past the tenant's podSyncInFlight ──► RESOURCE_EXHAUSTED
//!                   └─► the service: tonic decodes the body; the handler identifies the caller again
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{Either, Ready};

use rcsync_core::TenantName;
use tokio::sync::watch;
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Request, Status};

use crate::grpc::METHODS;
use crate::grpc::limits::{StreamKind, StreamSlot, TenantLimiter};
use crate::grpc::pods::{APPLY_POD, DELETE_POD};
use crate::index::{TenantsState, ViewSource};
use crate::metrics::Metrics;

/// Metadata key naming the tenant a caller means.
pub const TENANT_HEADER: &str = "x-rcsync-tenant";

/// Identifies the tenant of each request.
#[derive(Clone)]
pub struct Authenticator {
    tenants: watch::Receiver<Arc<TenantsState>>,
    allow_unauthenticated: bool,
}

impl Authenticator {
    /// An authenticator over the current tenants.
    pub fn new(tenants: watch::Receiver<Arc<TenantsState>>, allow_unauthenticated: bool) -> Self {
        Self {
            tenants,
            allow_unauthenticated,
        }
    }

    /// The tenant a request acts for, once the host's RuntimeClasses were listed: before that every
    /// call is UNAVAILABLE, since no decision could be complete.
    pub fn identify_ready<T>(
        &self,
        request: &Request<T>,
        views: &impl ViewSource,
    ) -> Result<TenantName, Status> {
        let tenant = self.identify(request)?;
        if !views.is_synced() {
            return Err(Status::unavailable(
                "the host agent has not listed the host's RuntimeClasses yet",
            ));
        }
        Ok(tenant)
    }

    /// The tenant a request acts for, or the gRPC error to answer.
    pub fn identify<T>(&self, request: &Request<T>) -> Result<TenantName, Status> {
        self.identify_caller(request.metadata().as_ref(), request.extensions())
    }

    /// The tenant of a call from its headers and connection (its peer certificate), before any of
    /// its body is read.
    fn identify_caller(
        &self,
        meta: &http::HeaderMap,
        connection: &http::Extensions,
    ) -> Result<TenantName, Status> {
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
                Some(token.trim().to_string())
            }
            None => None,
        };
        let tenant = if let Some(token) = bearer {
            state
                .tokens
                .tenant_of(&token)
                .cloned()
                .ok_or_else(|| Status::unauthenticated("invalid bearer token"))?
        } else if let Some(cn) = peer_common_name(connection) {
            let name = TenantName::new(&cn).map_err(|_| {
                Status::permission_denied(format!("client certificate names no tenant ({cn:?})"))
            })?;
            if state.file.tenant(name.as_str()).is_none() {
                return Err(Status::permission_denied(format!("unknown tenant {cn:?}")));
            }
            name
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
            name
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
        Ok(tenant)
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
            Ok(tenant) => tenant,
            Err(status) => return refuse(status),
        };
        let slot = match &self.pod_syncs {
            Some(limiter) if [APPLY_POD, DELETE_POD].contains(&method) => {
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
        if [APPLY_POD, DELETE_POD].contains(&method) {
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

/// The subject common name of the client's certificate, when the connection is mutual TLS.
fn peer_common_name(connection: &http::Extensions) -> Option<String> {
    let certs = connection.get::<TlsConnectInfo<TcpConnectInfo>>()?.peer_certs()?;
    let leaf = certs.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    cert.subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()
        .map(str::to_string)
}
