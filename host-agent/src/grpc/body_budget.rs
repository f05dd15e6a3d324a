//! One budget for the PodSync request bytes the agent holds at once, over all tenants
//! (`--max-pod-sync-bytes`). Each tenant's `podSyncInFlight` bounds what its own open calls can
//! make the agent hold (64 calls of up to 4 MiB by default), but not the sum over many tenants:
//! without this, enough tenants sending large Pods (or their ConfigMaps and Secrets) at once could
//! take the agent past its memory limit, and every tenant with it. No tenant holds more than its
//! share of the budget, so one busy tenant leaves the others room: its `limits.podSyncBytes`, or,
//! by default, a [`TENANT_SHARE`] of the budget.
//!
//! ```text
//!  ApplyPod / DeletePod ──► Budgeting ──► body frames, each taken from the budget as it arrives ──► tonic decodes
//!                                           └─ budget spent ──► RESOURCE_EXHAUSTED with RetryInfo
//!                                              (the virtual agent pauses and retries: nothing is lost)
//!  call answered (or dropped) ──► its bytes go back to the budget
//! ```
//!
//! The bytes are held until the call is answered, not only while the body is read: the decoded
//! request lives as long as the handler runs. A call's message must arrive within
//! `--pod-sync-read-timeout` of its headers (DEADLINE_EXCEEDED otherwise): a caller cannot hold
//! bytes, or its tenant's places, by sending part of a message and then nothing.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Buf as _;
use http_body::{Body, Frame, SizeHint};
use prometheus_client::metrics::gauge::Gauge;
use rcsync_core::TenantName;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tonic::server::NamedService;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

use crate::grpc::pods::POD_SYNC_CALLS;
use crate::index::TenantsState;
use crate::metrics::{Metrics, PodSyncBudget};

/// How long a caller refused for want of budget is asked to wait: calls are answered in
/// milliseconds, so the budget is usually back well within it.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The most of the budget one tenant may hold unless its `limits.podSyncBytes` says otherwise: a
/// quarter.
pub const TENANT_SHARE: usize = 4;

// A tenant's smallest share, as the tenants file checks it, holds the largest Pod sync.
const _: () =
    assert!(rcsync_core::config::MIN_TENANT_POD_SYNC_BYTES == rcsync_proto::MAX_REQUEST_BYTES as u64);

/// The bytes of PodSync requests the agent may hold at once. Cheap to clone.
#[derive(Clone)]
pub struct BodyBudget {
    bytes: Arc<Semaphore>,
    total: usize,
    /// Bytes held per tenant (tenants holding none are not listed).
    by_tenant: Arc<Mutex<HashMap<TenantName, usize>>>,
    /// The tenants, for their `limits.podSyncBytes`.
    tenants: watch::Receiver<Arc<TenantsState>>,
    read_timeout: Duration,
    held: Gauge,
    metrics: Metrics,
}

impl BodyBudget {
    /// A budget of `total` bytes for messages that arrive within `read_timeout`, shared among
    /// `tenants` by their limits, its use reported in `metrics`.
    pub fn new(
        total: usize,
        read_timeout: Duration,
        tenants: watch::Receiver<Arc<TenantsState>>,
        metrics: Metrics,
    ) -> Self {
        let held = metrics.pod_sync_bytes_held.clone();
        Self {
            bytes: Arc::new(Semaphore::new(total.min(Semaphore::MAX_PERMITS))),
            total,
            by_tenant: Arc::default(),
            tenants,
            read_timeout,
            held,
            metrics,
        }
    }

    /// The most of the budget `tenant` may hold: its `limits.podSyncBytes` (at most the whole
    /// budget), else a [`TENANT_SHARE`] of it.
    fn share_of(&self, tenant: &TenantName) -> usize {
        let configured = self
            .tenants
            .borrow()
            .file
            .tenant(tenant.as_str())
            .and_then(|t| t.limits.pod_sync_bytes);
        match configured {
            Some(bytes) => usize::try_from(bytes).unwrap_or(usize::MAX).min(self.total),
            None => self.total / TENANT_SHARE,
        }
    }

    /// Changes what `tenant` holds by `delta` bytes; false (and nothing changed) when that
    /// would take it past its share.
    fn add_to_tenant(&self, tenant: &TenantName, delta: isize) -> bool {
        let share = if delta > 0 {
            self.share_of(tenant)
        } else {
            usize::MAX
        };
        let mut by_tenant = self.by_tenant.lock().unwrap_or_else(|e| e.into_inner());
        let held = by_tenant.get(tenant).copied().unwrap_or(0);
        let next = held.saturating_add_signed(delta);
        if delta > 0 && next > share {
            return false;
        }
        if next == 0 {
            by_tenant.remove(tenant);
        } else {
            by_tenant.insert(tenant.clone(), next);
        }
        true
    }

    fn report(&self) {
        let held = self.total.saturating_sub(self.bytes.available_permits());
        self.held.set(i64::try_from(held).unwrap_or(i64::MAX));
    }
}

/// What one call holds of the budget; shared by its body and its answer, released when both are
/// gone.
struct Charge {
    budget: BodyBudget,
    tenant: Option<TenantName>,
    /// What the call holds of the budget, and how many bytes that is.
    permit: Mutex<(Option<OwnedSemaphorePermit>, usize)>,
}

impl Charge {
    /// Takes `bytes` more for this call, or says why not.
    fn take(&self, bytes: usize) -> Result<(), Status> {
        let tenant_name = self.tenant.as_ref().map_or("", TenantName::as_str);
        let refuse = |budget: PodSyncBudget, status: Status| {
            self.budget
                .metrics
                .pod_sync_budget_refusals(tenant_name, budget)
                .inc();
            tracing::debug!(
                tenant = tenant_name,
                budget = budget.label(),
                bytes,
                message = status.message(),
                "refusing a Pod sync"
            );
            Err(status)
        };
        let delta = isize::try_from(bytes).unwrap_or(isize::MAX);
        if let Some(tenant) = &self.tenant
            && !self.budget.add_to_tenant(tenant, delta)
        {
            let total = self.budget.total;
            return refuse(
                PodSyncBudget::Tenant,
                retry_later(format!(
                    "tenant {tenant} holds its share of the Pod sync bytes the host agent holds at \
                 once ({} of {total} bytes: limits.podSyncBytes, by default a quarter of \
                 --max-pod-sync-bytes): retry",
                    self.budget.share_of(tenant)
                )),
            );
        }
        let taken = u32::try_from(bytes)
            .ok()
            .and_then(|n| self.budget.bytes.clone().try_acquire_many_owned(n).ok());
        let Some(taken) = taken else {
            if let Some(tenant) = &self.tenant {
                self.budget.add_to_tenant(tenant, -delta);
            }
            return refuse(
                PodSyncBudget::Agent,
                retry_later(format!(
                    "the host agent holds as many Pod sync bytes as it may at once, over all tenants \
                 ({} bytes, --max-pod-sync-bytes): retry",
                    self.budget.total
                )),
            );
        };
        let mut permit = self.permit.lock().unwrap_or_else(|e| e.into_inner());
        match permit.0.as_mut() {
            Some(held) => held.merge(taken),
            None => permit.0 = Some(taken),
        }
        permit.1 += bytes;
        drop(permit);
        self.budget.report();
        Ok(())
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        let (permit, bytes) = std::mem::take(self.permit.get_mut().unwrap_or_else(|e| e.into_inner()));
        if let Some(tenant) = &self.tenant
            && bytes > 0
        {
            self.budget
                .add_to_tenant(tenant, -isize::try_from(bytes).unwrap_or(isize::MAX));
        }
        if permit.is_some() {
            drop(permit);
            self.budget.report();
        }
    }
}

/// RESOURCE_EXHAUSTED with `message` and a RetryInfo of [`RETRY_AFTER`].
fn retry_later(message: String) -> Status {
    let details = ErrorDetails::with_retry_info(Some(RETRY_AFTER));
    Status::with_error_details(Code::ResourceExhausted, message, details)
}

/// A request body whose data is taken from the budget as it arrives, by a deadline.
pub struct Budgeted<B> {
    inner: B,
    charge: Option<Arc<Charge>>,
    /// When the whole body must have arrived (charged calls only).
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> Body for Budgeted<B>
where
    B: Body + Unpin,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Data = B::Data;
    type Error = tonic::codegen::StdError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if polled.is_pending()
            && let (Some(deadline), Some(charge)) = (this.deadline.as_mut(), &this.charge)
        {
            ready!(deadline.as_mut().poll(cx));
            let timeout = charge.budget.read_timeout;
            tracing::debug!(
                ?timeout,
                "a Pod sync's message did not arrive in time: ending the call"
            );
            return Poll::Ready(Some(Err(Box::new(Status::deadline_exceeded(format!(
                "the request's message did not arrive within {timeout:?} of its headers \
                 (--pod-sync-read-timeout)"
            ))))));
        }
        let frame = match ready!(polled) {
            None => {
                this.deadline = None;
                return Poll::Ready(None);
            }
            Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
            Some(Ok(frame)) => frame,
        };
        if let (Some(charge), Some(data)) = (&this.charge, frame.data_ref())
            && let Err(status) = charge.take(data.remaining())
        {
            return Poll::Ready(Some(Err(Box::new(status))));
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A PodSync service whose ApplyPod and DeletePod requests are held to the [`BodyBudget`]. Sits
/// behind [`Authenticated`](super::auth::Authenticated), which names the caller's tenant in the
/// request's extensions (for the refusals metric).
#[derive(Clone)]
pub struct Budgeting<S> {
    service: S,
    budget: BodyBudget,
}

impl<S> Budgeting<S> {
    /// `service`, its ApplyPod and DeletePod requests held to `budget`.
    pub fn new(service: S, budget: BodyBudget) -> Self {
        Self { service, budget }
    }
}

impl<S: NamedService> NamedService for Budgeting<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<B>> for Budgeting<S>
where
    S: tower::Service<
            http::Request<Budgeted<B>>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        >,
    S::Future: Unpin,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Charged<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.service.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let charge = POD_SYNC_CALLS.contains(&request.uri().path()).then(|| {
            Arc::new(Charge {
                budget: self.budget.clone(),
                tenant: request.extensions().get::<TenantName>().cloned(),
                permit: Mutex::new((None, 0)),
            })
        });
        let deadline = charge
            .as_ref()
            .map(|_| Box::pin(tokio::time::sleep(self.budget.read_timeout)));
        let request = request.map(|inner| Budgeted {
            inner,
            charge: charge.clone(),
            deadline,
        });
        Charged {
            call: self.service.call(request),
            _charge: charge,
        }
    }
}

/// A call's answer, holding its bytes of the budget until it is answered.
pub struct Charged<F> {
    call: F,
    _charge: Option<Arc<Charge>>,
}

impl<F: Future + Unpin> Future for Charged<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        Pin::new(&mut self.call).poll(cx)
    }
}
