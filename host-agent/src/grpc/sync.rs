//! `rcsync.v1.RuntimeClassSync`: the delta stream of a tenant's RuntimeClasses, and CheckPod.
//!
//! ```text
//!  client ──SyncRequest (initial_resource_versions)──► session: acked = declared versions
//!         ◄──SyncResponse (diff(view, acked), initial_state_complete)──
//!         ──ACK nonce──► acked += sent           ──NACK──► acked += sent − failed, retry after backoff
//!  view changes while a response is outstanding are coalesced into the next one.
//! ```

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::Stream;
use rcsync_core::TenantName;
use rcsync_proto::v1::runtime_class_sync_server::RuntimeClassSync;
use rcsync_proto::v1::{CheckPodReason, CheckPodRequest, CheckPodResponse, SyncRequest, SyncResponse};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::grpc::auth::Authenticator;
use crate::index::ViewSource;
use crate::metrics::{DecisionLabels, Metrics};
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
pub type LastErrors = Arc<Mutex<HashMap<TenantName, String>>>;

/// The RuntimeClassSync service over a view source.
pub struct RuntimeClassSyncService<V> {
    views: Arc<V>,
    auth: Authenticator,
    metrics: Metrics,
    retry: RetryPolicy,
    shutdown: watch::Receiver<bool>,
    last_errors: LastErrors,
}

impl<V: ViewSource> RuntimeClassSyncService<V> {
    /// Builds the service. Streams end when `shutdown` becomes true.
    pub fn new(
        views: Arc<V>,
        auth: Authenticator,
        metrics: Metrics,
        retry: RetryPolicy,
        shutdown: watch::Receiver<bool>,
        last_errors: LastErrors,
    ) -> Self {
        Self {
            views,
            auth,
            metrics,
            retry,
            shutdown,
            last_errors,
        }
    }

    /// The caller's tenant and its view; UNAVAILABLE until the host's classes were listed.
    fn view_of<T>(
        &self,
        request: &Request<T>,
    ) -> Result<(TenantName, watch::Receiver<Arc<TenantView>>), Status> {
        let tenant = self.auth.identify_ready(request, self.views.as_ref())?;
        let view = self
            .views
            .subscribe(&tenant)
            .ok_or_else(|| Status::permission_denied("unknown tenant"))?;
        Ok((tenant, view))
    }
}

const SYNC: &str = "/rcsync.v1.RuntimeClassSync/Sync";
const CHECK_POD: &str = "/rcsync.v1.RuntimeClassSync/CheckPod";

/// The short name of a reason, e.g. `MATCHES`.
pub fn reason_name(reason: CheckPodReason) -> &'static str {
    reason.as_str_name().trim_start_matches("CHECK_POD_REASON_")
}

#[tonic::async_trait]
impl<V: ViewSource> RuntimeClassSync for RuntimeClassSyncService<V> {
    type SyncStream = Pin<Box<dyn Stream<Item = Result<SyncResponse, Status>> + Send>>;

    async fn sync(
        &self,
        request: Request<Streaming<SyncRequest>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let started = Instant::now();
        let opened = self.view_of(&request);
        self.metrics.record(SYNC, started, &opened);
        let (tenant, view) = opened?;
        let (tx, rx) = mpsc::channel(4);
        let session = Session {
            tenant: tenant.clone(),
            inbound: request.into_inner(),
            view,
            tx,
            acked: HashMap::new(),
            pending: None,
            sent_policy: None,
            nonce: 0,
            retry: self.retry,
            backoff: self.retry.initial,
            metrics: self.metrics.clone(),
            shutdown: self.shutdown.clone(),
            last_errors: self.last_errors.clone(),
        };
        let span = tracing::info_span!("sync", tenant = %tenant);
        tokio::spawn(tracing::Instrument::instrument(session.run(), span));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn check_pod(
        &self,
        request: Request<CheckPodRequest>,
    ) -> Result<Response<CheckPodResponse>, Status> {
        let started = Instant::now();
        let result = (|| {
            let (tenant, view) = self.view_of(&request)?;
            let req = request.get_ref();
            let decision = view.borrow().check_pod(&req.pod_name, &req.runtime_class_name);
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
    upserts: Vec<(String, String)>,
    removed: Vec<String>,
}

/// One Sync stream.
struct Session {
    tenant: TenantName,
    inbound: Streaming<SyncRequest>,
    view: watch::Receiver<Arc<TenantView>>,
    tx: mpsc::Sender<Result<SyncResponse, Status>>,
    /// What the client holds, as far as it has acknowledged: name → version.
    acked: HashMap<String, String>,
    pending: Option<Pending>,
    /// The Pod policy version last sent.
    sent_policy: Option<String>,
    nonce: u64,
    retry: RetryPolicy,
    backoff: Duration,
    metrics: Metrics,
    shutdown: watch::Receiver<bool>,
    last_errors: LastErrors,
}

impl Session {
    async fn run(mut self) {
        let label = Metrics::tenant(self.tenant.as_str());
        self.metrics.streams_open.get_or_create(&label).inc();
        self.serve().await;
        self.metrics.streams_open.get_or_create(&label).dec();
    }

    async fn serve(&mut self) {
        let first = tokio::select! {
            first = self.inbound.message() => first,
            _ = self.shutdown.changed() => return,
        };
        match first {
            Ok(Some(first)) => self.acked = first.initial_resource_versions,
            Ok(None) => return,
            Err(status) => {
                tracing::debug!(%status, "stream failed before its first request");
                return;
            }
        }
        tracing::info!(declared = self.acked.len(), "sync stream opened");
        let mut first_sent = false;
        let mut dirty = true;
        let mut retry_at: Option<tokio::time::Instant> = None;
        loop {
            if self.pending.is_none() && dirty && retry_at.is_none() {
                dirty = false;
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
                changed = self.view.changed() => {
                    if changed.is_err() {
                        let _ = self.tx.send(Err(Status::permission_denied("the tenant was removed from the host agent's config"))).await;
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

    /// Sends the difference between the view and what the client holds (always when `first`).
    /// False when the client is gone.
    async fn send_diff(&mut self, first: bool) -> bool {
        let view = self.view.borrow_and_update().clone();
        let mut resources = Vec::new();
        for (name, resource) in &view.classes {
            if self.acked.get(name) != Some(&resource.version) {
                resources.push((**resource).clone());
            }
        }
        let mut removed: Vec<String> = self
            .acked
            .keys()
            .filter(|name| !view.classes.contains_key(*name))
            .cloned()
            .collect();
        removed.sort();
        let policy_changed = self.sent_policy.as_ref() != Some(&view.pod_policy_version);
        if !first && resources.is_empty() && removed.is_empty() && !policy_changed {
            return true;
        }
        self.sent_policy = Some(view.pod_policy_version.clone());
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        let versions: BTreeMap<&str, &str> = view
            .classes
            .values()
            .map(|r| (r.name.as_str(), r.version.as_str()))
            .collect();
        let response = SyncResponse {
            nonce: nonce.clone(),
            resources: resources.clone(),
            removed_resources: removed.clone(),
            initial_state_complete: first,
            sync_enabled: view.sync_enabled,
            system_version_info: rcsync_core::version::content_version(&versions),
            pod_policy_version: view.pod_policy_version.clone(),
        };
        tracing::debug!(
            nonce,
            upserts = resources.len(),
            removed = removed.len(),
            first,
            "sending"
        );
        self.pending = Some(Pending {
            nonce,
            upserts: resources
                .iter()
                .map(|r| (r.name.clone(), r.version.clone()))
                .collect(),
            removed,
        });
        self.metrics
            .responses_total
            .get_or_create(&Metrics::tenant(self.tenant.as_str()))
            .inc();
        self.tx.send(Ok(response)).await.is_ok()
    }

    /// Handles an ACK or NACK; returns the retry delay after a NACK.
    fn handle_reply(&mut self, request: SyncRequest) -> Option<Duration> {
        let Some(pending) = self.pending.take_if(|p| p.nonce == request.response_nonce) else {
            tracing::debug!(
                nonce = request.response_nonce,
                "ignoring a reply to a stale nonce"
            );
            return None;
        };
        let label = Metrics::tenant(self.tenant.as_str());
        let failed = request
            .error_detail
            .as_ref()
            .map(|e| e.resource_errors.clone())
            .unwrap_or_default();
        for (name, version) in pending.upserts {
            if !failed.contains_key(&name) {
                self.acked.insert(name, version);
            }
        }
        for name in pending.removed {
            if !failed.contains_key(&name) {
                self.acked.remove(&name);
            }
        }
        match request.error_detail {
            None => {
                self.metrics.acks_total.get_or_create(&label).inc();
                self.backoff = self.retry.initial;
                None
            }
            Some(detail) => {
                self.metrics.nacks_total.get_or_create(&label).inc();
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
                    .insert(self.tenant.clone(), detail.message);
                Some(delay)
            }
        }
    }
}
