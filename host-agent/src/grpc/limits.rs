//! Per-tenant limits, so one tenant cannot take the host agent (or the host API server behind
//! it) from the others: concurrent Sync and WatchPodStatus streams, and a token bucket on the
//! PodSync calls that write to the host. CheckPod is never limited: it is answered from memory.
//!
//! ```text
//!  Sync / WatchPodStatus ──open_stream──► slot (released on drop) | RESOURCE_EXHAUSTED naming the limit
//!  ApplyPod / DeletePod  ──open_stream──► slot from its headers, before its body is read (podSyncInFlight)
//!                        ──take_pod_sync──► token (refills at podSyncQps up to podSyncBurst)
//!                                           | RESOURCE_EXHAUSTED with google.rpc.RetryInfo
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcsync_core::{TenantLimits, TenantName};
use tokio::sync::watch;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

use crate::index::TenantsState;
use crate::metrics::{LimitLabels, Metrics};

/// The kinds of calls (HTTP/2 streams) a tenant may hold a limited number of at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    /// `RuntimeClassSync.Sync`.
    Sync,
    /// `PodSync.WatchPodStatus`.
    PodStatus,
    /// `PodSync.ApplyPod` and `PodSync.DeletePod`, from their headers to their answers.
    PodSyncCall,
}

impl StreamKind {
    fn limit_name(self) -> &'static str {
        match self {
            Self::Sync => "syncStreams",
            Self::PodStatus => "podStatusStreams",
            Self::PodSyncCall => "podSyncInFlight",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Sync => "Sync streams",
            Self::PodStatus => "WatchPodStatus streams",
            Self::PodSyncCall => "ApplyPod/DeletePod calls",
        }
    }

    fn limit(self, limits: &TenantLimits) -> u32 {
        match self {
            Self::Sync => limits.sync_streams,
            Self::PodStatus => limits.pod_status_streams,
            Self::PodSyncCall => limits.pod_sync_in_flight,
        }
    }
}

#[derive(Debug)]
struct Usage {
    sync_streams: u32,
    status_streams: u32,
    pod_sync_calls: u32,
    tokens: f64,
    refilled: Instant,
}

/// Tracks what each tenant uses against the limits of its current config. Cheap to clone.
#[derive(Clone)]
pub struct TenantLimiter {
    usage: Arc<Mutex<HashMap<TenantName, Usage>>>,
    tenants: watch::Receiver<Arc<TenantsState>>,
    metrics: Metrics,
}

/// An open stream's place; dropping it frees the place.
pub struct StreamSlot {
    limiter: TenantLimiter,
    tenant: TenantName,
    kind: StreamKind,
}

impl Usage {
    /// Whether the tenant holds nothing open.
    fn is_idle(&self) -> bool {
        self.sync_streams == 0 && self.status_streams == 0 && self.pod_sync_calls == 0
    }

    /// The count of open calls of `kind`.
    fn open(&mut self, kind: StreamKind) -> &mut u32 {
        match kind {
            StreamKind::Sync => &mut self.sync_streams,
            StreamKind::PodStatus => &mut self.status_streams,
            StreamKind::PodSyncCall => &mut self.pod_sync_calls,
        }
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut usage = self.limiter.lock();
        let Some(u) = usage.get_mut(&self.tenant) else {
            return;
        };
        let open = u.open(self.kind);
        *open = open.saturating_sub(1);
        if u.is_idle() && !self.limiter.is_configured(&self.tenant) {
            // The last call of a removed tenant: its usage goes, and the series it recorded
            // after the reload dropped the tenant's (a refusal, a decision) go too.
            usage.remove(&self.tenant);
            drop(usage);
            self.limiter.metrics.forget_tenant(self.tenant.as_str());
        }
    }
}

impl TenantLimiter {
    /// A limiter for the tenants as currently configured, counting rejections in `metrics`.
    pub fn new(tenants: watch::Receiver<Arc<TenantsState>>, metrics: Metrics) -> Self {
        Self {
            usage: Arc::default(),
            tenants,
            metrics,
        }
    }

    /// Follows reloads of the tenants file, dropping the usage of each tenant no longer
    /// configured that holds nothing open (one that does goes when its last call ends), so the
    /// limiter holds only tenants of the config. Ends when the config is no longer reloaded.
    pub async fn forget_removed_tenants(self) {
        let mut tenants = self.tenants.clone();
        while tenants.changed().await.is_ok() {
            let state = tenants.borrow_and_update().clone();
            self.lock()
                .retain(|name, usage| !usage.is_idle() || state.file.tenant(name.as_str()).is_some());
        }
    }

    /// Whether `tenant` is in the current config.
    fn is_configured(&self, tenant: &TenantName) -> bool {
        self.tenants.borrow().file.tenant(tenant.as_str()).is_some()
    }

    /// A tenant's limits now (defaults for a tenant no longer configured).
    fn limits_of(&self, tenant: &TenantName) -> TenantLimits {
        self.tenants
            .borrow()
            .file
            .tenant(tenant.as_str())
            .map(|t| t.limits)
            .unwrap_or_default()
    }

    /// Takes a place for a new stream of `tenant`, or RESOURCE_EXHAUSTED naming the limit.
    pub fn open(&self, tenant: &TenantName, kind: StreamKind) -> Result<StreamSlot, Status> {
        self.open_stream(tenant, kind, &self.limits_of(tenant))
    }

    /// Takes one PodSync token of `tenant`, or RESOURCE_EXHAUSTED with RetryInfo.
    pub fn take(&self, tenant: &TenantName) -> Result<(), Status> {
        self.take_pod_sync(tenant, &self.limits_of(tenant))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TenantName, Usage>> {
        self.usage.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn rejected(&self, tenant: &TenantName, limit: &str) {
        self.metrics
            .limit_rejections_total
            .get_or_create(&LimitLabels {
                tenant: tenant.to_string(),
                limit: limit.to_string(),
            })
            .inc();
    }

    fn usage<'a>(
        usage: &'a mut HashMap<TenantName, Usage>,
        tenant: &TenantName,
        limits: &TenantLimits,
    ) -> &'a mut Usage {
        usage.entry(tenant.clone()).or_insert_with(|| Usage {
            sync_streams: 0,
            status_streams: 0,
            pod_sync_calls: 0,
            tokens: f64::from(limits.pod_sync_burst),
            refilled: Instant::now(),
        })
    }

    /// Takes a place for a new stream, or RESOURCE_EXHAUSTED naming the limit.
    pub fn open_stream(
        &self,
        tenant: &TenantName,
        kind: StreamKind,
        limits: &TenantLimits,
    ) -> Result<StreamSlot, Status> {
        let max = kind.limit(limits);
        {
            let mut usage = self.lock();
            let open = Self::usage(&mut usage, tenant, limits).open(kind);
            if *open >= max {
                drop(usage);
                self.rejected(tenant, kind.limit_name());
                return Err(Status::resource_exhausted(format!(
                    "tenant {tenant} already has {max} {} open (limits.{}: {max})",
                    kind.describe(),
                    kind.limit_name()
                )));
            }
            *open += 1;
        }
        Ok(StreamSlot {
            limiter: self.clone(),
            tenant: tenant.clone(),
            kind,
        })
    }

    /// Takes one PodSync token, or RESOURCE_EXHAUSTED with the delay after which one is free.
    pub fn take_pod_sync(&self, tenant: &TenantName, limits: &TenantLimits) -> Result<(), Status> {
        let rate = f64::from(limits.pod_sync_qps);
        let burst = f64::from(limits.pod_sync_burst);
        let wait = {
            let mut usage = self.lock();
            let u = Self::usage(&mut usage, tenant, limits);
            let now = Instant::now();
            let elapsed = now.duration_since(u.refilled).as_secs_f64();
            u.tokens = (u.tokens + elapsed * rate).min(burst);
            u.refilled = now;
            if u.tokens >= 1.0 {
                u.tokens -= 1.0;
                return Ok(());
            }
            Duration::from_secs_f64((1.0 - u.tokens) / rate)
        };
        self.rejected(tenant, "podSyncQps");
        Err(Status::with_error_details(
            Code::ResourceExhausted,
            format!(
                "tenant {tenant} is over its Pod sync rate (limits.podSyncQps: {}, podSyncBurst: {}): retry in {} ms",
                limits.pod_sync_qps,
                limits.pod_sync_burst,
                wait.as_millis().max(1)
            ),
            ErrorDetails::with_retry_info(Some(wait)),
        ))
    }
}

/// The delay a RESOURCE_EXHAUSTED status asks for (its google.rpc.RetryInfo), if any.
pub fn retry_delay(status: &Status) -> Option<Duration> {
    status.get_details_retry_info()?.retry_delay
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter() -> TenantLimiter {
        let mut registry = prometheus_client::registry::Registry::default();
        let (_, tenants) = watch::channel(Arc::new(TenantsState::default()));
        TenantLimiter::new(tenants, Metrics::register(&mut registry))
    }

    #[test]
    fn streams_are_counted_per_tenant_and_freed_on_drop() {
        let limiter = limiter();
        let limits = TenantLimits {
            sync_streams: 2,
            ..Default::default()
        };
        let a = TenantName::new("a").unwrap();
        let b = TenantName::new("b").unwrap();
        let first = limiter.open_stream(&a, StreamKind::Sync, &limits).unwrap();
        let _second = limiter.open_stream(&a, StreamKind::Sync, &limits).unwrap();
        let refused = limiter.open_stream(&a, StreamKind::Sync, &limits).err().unwrap();
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert_eq!(
            refused.message(),
            "tenant a already has 2 Sync streams open (limits.syncStreams: 2)"
        );
        assert!(
            limiter.open_stream(&b, StreamKind::Sync, &limits).is_ok(),
            "other tenants are not affected"
        );
        assert!(
            limiter.open_stream(&a, StreamKind::PodStatus, &limits).is_ok(),
            "kinds are counted apart"
        );
        let limits = TenantLimits {
            pod_sync_in_flight: 1,
            ..limits
        };
        let call = limiter.open_stream(&a, StreamKind::PodSyncCall, &limits).unwrap();
        assert_eq!(
            limiter
                .open_stream(&a, StreamKind::PodSyncCall, &limits)
                .err()
                .unwrap()
                .message(),
            "tenant a already has 1 ApplyPod/DeletePod calls open (limits.podSyncInFlight: 1)"
        );
        drop(call);
        assert!(limiter.open_stream(&a, StreamKind::PodSyncCall, &limits).is_ok());
        drop(first);
        assert!(limiter.open_stream(&a, StreamKind::Sync, &limits).is_ok());
    }

    #[test]
    fn the_pod_sync_bucket_allows_a_burst_then_the_rate_and_says_when_to_retry() {
        let limiter = limiter();
        let limits = TenantLimits {
            pod_sync_qps: 10,
            pod_sync_burst: 5,
            ..Default::default()
        };
        let a = TenantName::new("a").unwrap();
        for _ in 0..5 {
            limiter.take_pod_sync(&a, &limits).unwrap();
        }
        let refused = limiter.take_pod_sync(&a, &limits).unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted);
        let delay = retry_delay(&refused).expect("RetryInfo");
        assert!(
            delay > Duration::ZERO && delay <= Duration::from_millis(100),
            "{delay:?}"
        );
        assert!(
            refused.message().contains("limits.podSyncQps: 10"),
            "{}",
            refused.message()
        );
    }

    #[tokio::test]
    async fn a_removed_tenant_is_forgotten_once_its_last_call_ends() {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Metrics::register(&mut registry);
        let state = |yaml: &str| {
            Arc::new(TenantsState {
                file: rcsync_core::TenantsFile::parse(std::path::Path::new("t.yaml"), yaml).unwrap(),
                ..Default::default()
            })
        };
        let (config, tenants) = watch::channel(state(
            "tenants:\n  - {name: a, hostNamespace: ns-a}\n  - {name: b, hostNamespace: ns-b}\n",
        ));
        let limiter = TenantLimiter::new(tenants, metrics.clone());
        let forgetting = tokio::spawn(limiter.clone().forget_removed_tenants());
        let (a, b) = (TenantName::new("a").unwrap(), TenantName::new("b").unwrap());
        let call = limiter.open(&a, StreamKind::PodSyncCall).unwrap();
        limiter.take(&b).unwrap();
        config.send_replace(state("tenants:\n  - {name: c, hostNamespace: ns-c}\n"));
        let remembered = || {
            let usage = limiter.lock();
            (usage.contains_key(&a), usage.contains_key(&b))
        };
        eventually_true(|| remembered() == (true, false)).await;
        // The call still running when a was removed refuses something after the reload dropped
        // a's series; when it ends, a is forgotten, series and all.
        limiter.rejected(&a, "podSyncQps");
        let text = |registry: &prometheus_client::registry::Registry| {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
            text
        };
        assert!(text(&registry).contains("tenant=\"a\""));
        drop(call);
        assert_eq!(remembered(), (false, false));
        assert!(!text(&registry).contains("tenant=\"a\""), "{}", text(&registry));
        drop(config);
        forgetting.await.unwrap();
    }

    /// Waits (yielding to the runtime) until `done`.
    async fn eventually_true(done: impl Fn() -> bool) {
        for _ in 0..1000 {
            if done() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("not done after 1,000 turns of the runtime");
    }
}
