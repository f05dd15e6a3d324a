//! `rcsync.v1.RuntimeClassSync`: the delta stream of a tenant's RuntimeClasses, and CheckPod.
//!
//! ```text
//!  client ──SyncRequest (initial_resource_versions)──► session: holds = empty view + declared exceptions
//!         ◄──SyncResponse (diff(view, holds), initial_state_complete)──
//!         ──ACK nonce──► holds = the view sent    ──NACK──► holds = view sent, failed ones as before;
//!                                                           retried after backoff
//!  diffs after the first follow the index's change log: work per response ∝ classes changed.
//!  View changes while a response is outstanding are coalesced into the next one.
//! ```

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::{FutureExt, Stream, StreamExt};
use prost::Message;
use rcsync_core::TenantName;
use rcsync_proto::v1::runtime_class_sync_server::RuntimeClassSync;
use rcsync_proto::v1::{
    CheckPodReason, CheckPodRequest, CheckPodResponse, Resource, SyncRequest, SyncResponse,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::grpc::auth::{Authenticator, Caller};
use crate::grpc::limits::{StreamKind, StreamSlot, TenantLimiter};
use crate::index::ViewSource;
use crate::metrics::{DecisionLabels, Metrics, StreamSeries};
use crate::view::TenantView;

/// How NACKed resources are retried.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// First delay after a NACK.
    pub initial: Duration,
    /// Largest delay.
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
        }
    }
}

/// The last NACK of each tenant, for operators.
pub type LastErrors = Arc<Mutex<HashMap<TenantName, Activity>>>;

/// What operators want to know of a tenant's streams: its last NACK and its last ACK.
#[derive(Clone, Debug, Default)]
pub struct Activity {
    /// The message of the last NACK.
    pub last_nack: Option<String>,
    /// When a response was last acknowledged.
    pub last_ack: Option<std::time::SystemTime>,
}

/// The RuntimeClassSync service over a view source.
pub struct RuntimeClassSyncService<V> {
    views: Arc<V>,
    auth: Authenticator,
    metrics: Metrics,
    retry: RetryPolicy,
    shutdown: watch::Receiver<bool>,
    last_errors: LastErrors,
    limiter: TenantLimiter,
    whole_states: Arc<Semaphore>,
    streams: Option<tokio::runtime::Handle>,
}

/// Whole-view responses of more classes than this wait for one of [`WHOLE_STATES_IN_FLIGHT`]
/// places, held until their ACK: a thousand clients reconnecting at once then cost the memory
/// of a few large responses at a time, not of all of them.
const LARGE_RESPONSE: usize = 256;
/// Large whole-view responses built and in flight at once.
const WHOLE_STATES_IN_FLIGHT: usize = 4;

impl<V: ViewSource> RuntimeClassSyncService<V> {
    /// Builds the service. Streams end when `shutdown` becomes true.
    pub fn new(
        views: Arc<V>,
        auth: Authenticator,
        metrics: Metrics,
        retry: RetryPolicy,
        shutdown: watch::Receiver<bool>,
        last_errors: LastErrors,
        limiter: TenantLimiter,
    ) -> Self {
        Self {
            views,
            auth,
            metrics,
            retry,
            shutdown,
            last_errors,
            limiter,
            whole_states: Arc::new(Semaphore::new(WHOLE_STATES_IN_FLIGHT)),
            streams: None,
        }
    }

    /// Runs the streams' work (diffs, responses) on `runtime`, apart from the runtime that
    /// serves connections and unary calls, so a fan-out to every stream does not queue ahead of
    /// CheckPod.
    pub fn with_stream_runtime(mut self, runtime: tokio::runtime::Handle) -> Self {
        self.streams = Some(runtime);
        self
    }

    /// The caller and its tenant's view; UNAVAILABLE until the host's classes were listed.
    fn view_of<T>(&self, request: &Request<T>) -> Result<(Caller, watch::Receiver<Arc<TenantView>>), Status> {
        let caller = self.auth.caller_ready(request, self.views.as_ref())?;
        let view = self
            .views
            .subscribe(&caller.tenant)
            .ok_or_else(|| Status::permission_denied("unknown tenant"))?;
        Ok((caller, view))
    }
}

/// The path of the Sync method.
pub(crate) const SYNC: &str = "/rcsync.v1.RuntimeClassSync/Sync";
pub(crate) const CHECK_POD: &str = "/rcsync.v1.RuntimeClassSync/CheckPod";

/// The short name of a reason, e.g. `MATCHES`.
pub fn reason_name(reason: CheckPodReason) -> &'static str {
    reason.as_str_name().trim_start_matches("CHECK_POD_REASON_")
}

impl<V: ViewSource> RuntimeClassSyncService<V> {
    /// Opens a Sync stream: its responses share their resources with the tenant's view (see
    /// [`SharedSyncResponse`]); [`crate::grpc::framing`] encodes them without copies.
    pub async fn open_sync(
        &self,
        request: Request<Streaming<SyncRequest>>,
    ) -> Result<Response<SyncResponses>, Status> {
        let started = Instant::now();
        let opened = self.view_of(&request).and_then(|(caller, view)| {
            let slot = self.limiter.open(&caller.tenant, StreamKind::Sync)?;
            Ok((caller, view, slot))
        });
        self.metrics.record(SYNC, started, &opened);
        let (caller, view, slot) = opened?;
        let tenant = caller.tenant.clone();
        let (tx, rx) = mpsc::channel(4);
        let session = Session {
            tenant: tenant.clone(),
            revoked: self.auth.revoked(caller).boxed(),
            inbound: request.into_inner(),
            view,
            views: self.views.clone(),
            tx,
            base: Arc::new(TenantView::default()),
            exceptions: HashMap::new(),
            pending: None,
            sent_policy: None,
            nonce: 0,
            retry: self.retry,
            backoff: self.retry.initial,
            series: self.metrics.stream_series(tenant.as_str()),
            shutdown: self.shutdown.clone(),
            last_errors: self.last_errors.clone(),
            _slot: slot,
            whole_states: self.whole_states.clone(),
            whole_state_permit: None,
        };
        let span = tracing::info_span!("sync", tenant = %tenant);
        let task = tracing::Instrument::instrument(session.run(), span);
        match &self.streams {
            Some(runtime) => drop(runtime.spawn(task)),
            None => drop(tokio::spawn(task)),
        }
        Ok(Response::new(ReceiverStream::new(rx).map(unbox)))
    }
}

/// A Sync stream's responses as the session sends them. Each travels boxed: a channel allocates
/// its slots 32 at a time, and at a thousand streams slots the size of a response were about
/// 11 KiB per stream, for a channel that holds at most 4.
pub type SyncResponses = futures::stream::Map<
    ReceiverStream<SessionMessage>,
    fn(SessionMessage) -> Result<SharedSyncResponse, Status>,
>;

/// What a session sends to its stream.
pub type SessionMessage = Box<Result<SharedSyncResponse, Status>>;

// The box is what the channel carries (see `SyncResponses`); this is where it ends.
#[allow(clippy::boxed_local)]
fn unbox(message: SessionMessage) -> Result<SharedSyncResponse, Status> {
    *message
}

/// A SyncResponse whose resources are the view's own (`Arc`s, not copies): a response to each of
/// a thousand streams costs pointers until it is encoded straight into its frame.
#[derive(Debug)]
pub struct SharedSyncResponse {
    /// Every field but `resources`.
    pub head: SyncResponse,
    /// `resources`, shared with the view.
    pub resources: Vec<Arc<Resource>>,
}

/// Field number of `SyncResponse.resources`.
const RESOURCES_FIELD: u32 = 2;

impl SharedSyncResponse {
    /// Length of the protobuf encoding.
    pub fn encoded_len(&self) -> usize {
        self.head.encoded_len()
            + self
                .resources
                .iter()
                .map(|r| prost::encoding::message::encoded_len(RESOURCES_FIELD, r.as_ref()))
                .sum::<usize>()
    }

    /// The protobuf encoding of the SyncResponse it stands for (fields may come in any order
    /// on the wire, and repeated ones accumulate: the head, then each resource).
    pub fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
        self.head.encode_raw(buf);
        for resource in &self.resources {
            prost::encoding::message::encode(RESOURCES_FIELD, resource.as_ref(), buf);
        }
    }

    /// The SyncResponse itself, its resources copied.
    pub fn into_message(self) -> SyncResponse {
        SyncResponse {
            resources: self.resources.iter().map(|r| (**r).clone()).collect(),
            ..self.head
        }
    }
}

#[tonic::async_trait]
impl<V: ViewSource> RuntimeClassSync for RuntimeClassSyncService<V> {
    type SyncStream = Pin<Box<dyn Stream<Item = Result<SyncResponse, Status>> + Send>>;

    /// The stream through tonic's own encoding (each response's resources copied); the host
    /// agent serves Sync through [`crate::grpc::framing::SyncFraming`] instead.
    async fn sync(
        &self,
        request: Request<Streaming<SyncRequest>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let responses = self.open_sync(request).await?.into_inner();
        Ok(Response::new(Box::pin(
            responses.map(|r| r.map(SharedSyncResponse::into_message)),
        )))
    }

    async fn check_pod(
        &self,
        request: Request<CheckPodRequest>,
    ) -> Result<Response<CheckPodResponse>, Status> {
        let started = Instant::now();
        let result = (|| {
            let tenant = self.auth.identify_ready(&request, self.views.as_ref())?;
            let req = request.get_ref();
            let decision = self
                .views
                .check_pod(&tenant, &req.pod_name, &req.runtime_class_name)
                .ok_or_else(|| Status::permission_denied("unknown tenant"))?;
            let reason = CheckPodReason::try_from(decision.reason).unwrap_or(CheckPodReason::Unspecified);
            self.metrics
                .decisions_total
                .get_or_create(&DecisionLabels {
                    tenant: tenant.to_string(),
                    reason: reason_name(reason).into(),
                })
                .inc();
            Ok(decision)
        })();
        self.metrics.record(CHECK_POD, started, &result);
        result.map(Response::new)
    }
}

/// A response that waits for its ACK.
struct Pending {
    nonce: String,
    /// The view it was computed from: what the client holds once it ACKs.
    view: Arc<TenantView>,
    /// Each name sent, with what the client held before (restored for resources it NACKs).
    sent: Vec<(String, Option<String>)>,
}

/// One Sync stream. What the client holds is a view snapshot it acknowledged (`base`) plus the
/// few names where it differs (`exceptions`: its declared state before the first ACK, NACKed
/// resources after), so a stream costs a few pointers however many classes it holds, and a change
/// costs work for the classes that changed, found in the index's change log.
struct Session<V> {
    tenant: TenantName,
    /// Resolves once a reload no longer accepts the stream's caller (see [`Authenticator::revoked`]).
    revoked: BoxFuture<'static, Status>,
    inbound: Streaming<SyncRequest>,
    view: watch::Receiver<Arc<TenantView>>,
    views: Arc<V>,
    tx: mpsc::Sender<SessionMessage>,
    base: Arc<TenantView>,
    exceptions: HashMap<String, Option<String>>,
    pending: Option<Pending>,
    /// The sync switch and the Pod policy version last sent: a change of either is sent even
    /// when no class changes (turned off, the tenant's Pods are no longer gated).
    sent_policy: Option<(bool, String)>,
    nonce: u64,
    retry: RetryPolicy,
    backoff: Duration,
    series: StreamSeries,
    shutdown: watch::Receiver<bool>,
    last_errors: LastErrors,
    /// This stream's place under the tenant's `limits.syncStreams`.
    _slot: StreamSlot,
    whole_states: Arc<Semaphore>,
    /// Held from sending a large whole-view response until its ACK.
    whole_state_permit: Option<OwnedSemaphorePermit>,
}

/// What one response carries.
#[derive(Default)]
struct Diff {
    upserts: Vec<Arc<Resource>>,
    removed: Vec<String>,
    sent: Vec<(String, Option<String>)>,
}

impl Diff {
    fn upsert(&mut self, resource: &Arc<Resource>, held: Option<String>) {
        self.sent.push((resource.name.clone(), held));
        self.upserts.push(resource.clone());
    }

    fn remove(&mut self, name: String, held: Option<String>) {
        self.sent.push((name.clone(), held));
        self.removed.push(name);
    }

    fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removed.is_empty()
    }
}

impl<V: ViewSource> Session<V> {
    async fn run(mut self) {
        self.series.open.inc();
        self.serve().await;
        self.series.open.dec();
    }

    async fn serve(&mut self) {
        let first = tokio::select! {
            first = self.inbound.message() => first,
            _ = self.shutdown.changed() => return,
        };
        match first {
            Ok(Some(first)) => {
                self.exceptions = first
                    .initial_resource_versions
                    .into_iter()
                    .map(|(name, version)| (name, Some(version)))
                    .collect();
            }
            Ok(None) => return,
            Err(status) => {
                tracing::debug!(%status, "stream failed before its first request");
                return;
            }
        }
        tracing::info!(declared = self.exceptions.len(), "sync stream opened");
        let mut first_sent = false;
        let mut dirty = true;
        let mut retry_at: Option<tokio::time::Instant> = None;
        loop {
            if self.pending.is_none() && dirty && retry_at.is_none() {
                dirty = false;
                let whole = {
                    let view = self.view.borrow();
                    (!first_sent || view.epoch != self.base.epoch) && view.offered_count() > LARGE_RESPONSE
                };
                if whole {
                    let permit = tokio::select! {
                        permit = self.whole_states.clone().acquire_owned() => permit.ok(),
                        _ = self.shutdown.changed() => return,
                    };
                    self.whole_state_permit = permit;
                }
                if !self.send_diff(!first_sent).await {
                    return;
                }
                first_sent = true;
            }
            let retry_sleep = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                message = self.inbound.message() => match message {
                    Ok(Some(request)) => {
                        if let Some(delay) = self.handle_reply(request) {
                            retry_at = Some(tokio::time::Instant::now() + delay);
                        }
                    }
                    Ok(None) => {
                        tracing::info!("sync stream closed by the client");
                        return;
                    }
                    Err(status) => {
                        tracing::info!(%status, "sync stream ended");
                        return;
                    }
                },
                status = &mut self.revoked => {
                    let _ = self.tx.send(Box::new(Err(status))).await;
                    return;
                }
                changed = self.view.changed() => {
                    if changed.is_err() {
                        let _ = self.tx.send(Box::new(Err(Status::permission_denied("the tenant was removed from the host agent's config")))).await;
                        return;
                    }
                    dirty = true;
                }
                _ = retry_sleep => {
                    retry_at = None;
                    dirty = true;
                }
                _ = self.shutdown.changed() => {
                    tracing::info!("host agent shutting down: ending sync stream");
                    return;
                }
            }
        }
    }

    /// What the client holds and `view` does not: the whole view on the first response, after
    /// a config change or relist (new epoch) or when the change log no longer reaches back;
    /// otherwise only the classes changed since the acknowledged view, and the exceptions.
    fn diff(&self, view: &TenantView, first: bool) -> Diff {
        let changed = if first || view.epoch != self.base.epoch {
            None
        } else {
            self.views
                .changed_between(self.base.generation(), view.generation())
        };
        let mut diff = Diff::default();
        match changed {
            None => {
                let mut held: HashMap<&str, Option<&str>> = self
                    .base
                    .iter_offered()
                    .map(|(_, r)| (r.name.as_str(), Some(r.version.as_str())))
                    .collect();
                for (name, version) in &self.exceptions {
                    held.insert(name, version.as_deref());
                }
                let mut wanted: HashSet<&str> = HashSet::new();
                for (_, resource) in view.iter_offered() {
                    wanted.insert(&resource.name);
                    let had = held.get(resource.name.as_str()).copied().flatten();
                    if had != Some(resource.version.as_str()) {
                        diff.upsert(resource, had.map(str::to_string));
                    }
                }
                let mut gone: Vec<(&str, &str)> = held
                    .iter()
                    .filter(|(name, _)| !wanted.contains(*name))
                    .filter_map(|(name, v)| Some((*name, (*v)?)))
                    .collect();
                gone.sort();
                for (name, version) in gone {
                    diff.remove(name.to_string(), Some(version.to_string()));
                }
            }
            Some(ids) => {
                let mut now: HashMap<&str, &Arc<Resource>> = HashMap::new();
                let mut before: HashMap<&str, &str> = HashMap::new();
                for id in ids {
                    if let Some(r) = view.offered(id) {
                        now.insert(&r.name, r);
                    }
                    if let Some(r) = self.base.offered(id) {
                        before.insert(&r.name, &r.version);
                    }
                }
                // Exceptions may name classes that did not change: look them up in the view.
                let everything: Option<HashMap<&str, &Arc<Resource>>> = self
                    .exceptions
                    .keys()
                    .any(|n| !now.contains_key(n.as_str()))
                    .then(|| view.iter_offered().map(|(_, r)| (r.name.as_str(), r)).collect());
                let mut names: Vec<&str> = now
                    .keys()
                    .chain(before.keys())
                    .copied()
                    .chain(self.exceptions.keys().map(String::as_str))
                    .collect();
                names.sort_unstable();
                names.dedup();
                for name in names {
                    let had: Option<&str> = match self.exceptions.get(name) {
                        Some(v) => v.as_deref(),
                        None => before.get(name).copied(),
                    };
                    let want = now
                        .get(name)
                        .copied()
                        .or_else(|| everything.as_ref()?.get(name).copied());
                    match want {
                        Some(r) if had != Some(r.version.as_str()) => diff.upsert(r, had.map(str::to_string)),
                        None if had.is_some() => diff.remove(name.to_string(), had.map(str::to_string)),
                        _ => {}
                    }
                }
            }
        }
        diff
    }

    /// Sends the difference between the view and what the client holds (always when `first`).
    /// False when the client is gone.
    async fn send_diff(&mut self, first: bool) -> bool {
        let view = self.view.borrow_and_update().clone();
        let diff = self.diff(&view, first);
        let policy_changed = self.sent_policy.as_ref().is_none_or(|(enabled, version)| {
            (*enabled, version.as_str()) != (view.sync_enabled, view.pod_policy_version.as_str())
        });
        if !first && diff.is_empty() && !policy_changed {
            // The client already holds this view.
            self.base = view;
            self.exceptions.clear();
            return true;
        }
        self.sent_policy = Some((view.sync_enabled, view.pod_policy_version.clone()));
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        let response = SharedSyncResponse {
            head: SyncResponse {
                nonce: nonce.clone(),
                resources: Vec::new(),
                removed_resources: diff.removed,
                initial_state_complete: first,
                sync_enabled: view.sync_enabled,
                system_version_info: view.digest(),
                pod_policy_version: view.pod_policy_version.clone(),
                sent_at: Some(std::time::SystemTime::now().into()),
            },
            resources: diff.upserts,
        };
        tracing::debug!(
            nonce,
            upserts = response.resources.len(),
            removed = response.head.removed_resources.len(),
            first,
            "sending"
        );
        self.pending = Some(Pending {
            nonce,
            view,
            sent: diff.sent,
        });
        self.series.responses_total.inc();
        self.tx.send(Box::new(Ok(response))).await.is_ok()
    }

    /// Handles an ACK or NACK; returns the retry delay after a NACK.
    fn handle_reply(&mut self, request: SyncRequest) -> Option<Duration> {
        let Some(pending) = self.pending.take_if(|p| p.nonce == request.response_nonce) else {
            // (A stale nonce keeps any whole-view place: its response is still unanswered.)
            tracing::debug!(
                nonce = request.response_nonce,
                "ignoring a reply to a stale nonce"
            );
            return None;
        };
        let failed = request
            .error_detail
            .as_ref()
            .map(|e| e.resource_errors.clone())
            .unwrap_or_default();
        self.whole_state_permit = None;
        // Every exception was either sent or already equal to the view: the client now holds
        // the view, except what it failed to apply, which it holds as before.
        self.base = pending.view;
        self.exceptions = pending
            .sent
            .into_iter()
            .filter(|(name, _)| failed.contains_key(name))
            .collect();
        match request.error_detail {
            None => {
                self.series.acks_total.inc();
                self.backoff = self.retry.initial;
                self.last_errors
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(self.tenant.clone())
                    .or_default()
                    .last_ack = Some(std::time::SystemTime::now());
                None
            }
            Some(detail) => {
                self.series.nacks_total.inc();
                let delay = self.backoff;
                self.backoff = (self.backoff * 2).min(self.retry.max);
                tracing::warn!(
                    nonce = pending.nonce,
                    error = %detail.message,
                    failed = ?detail.resource_errors,
                    retry_in = ?delay,
                    "the virtual side could not apply a response"
                );
                self.last_errors
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(self.tenant.clone())
                    .or_default()
                    .last_nack = Some(detail.message);
                Some(delay)
            }
        }
    }
}
