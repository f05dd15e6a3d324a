//! Leader election on a `coordination.k8s.io/v1` Lease, so several replicas of the virtual agent
//! can run and exactly one writes.
//!
//! ```text
//!  watch Lease/<name> ──► observed record (holder, renewTime, transitions) + when it last changed
//!        │                                             │
//!        │   standby: record unchanged for a whole lease duration, or released ──► take it
//!        ▼                                             ▼
//!  Elector ──replace(resourceVersion)──► Lease   ──► Role (watch): Leading / Following(leader)
//!        │ leader: renew every retry period; valid until last renew start + renew deadline
//!        └ shutdown: release (holder cleared) so a standby takes over at once
//! ```
//!
//! The algorithm is client-go's (`tools/leaderelection`), written on kube's own `Api<Lease>`:
//! every write carries the resourceVersion it was based on, so of two candidates one wins and the
//! other gets 409 Conflict. Expiry is judged on the local monotonic clock from the moment a
//! replica saw the record change, never by comparing another node's wall-clock timestamps.
//!
//! Fencing: a leader counts itself leading only until the start of its last successful renew
//! plus the renew deadline (two thirds of the lease duration). A standby takes over no earlier
//! than a full lease duration after it saw that renew, which is later than the leader's own
//! deadline, so two replicas never lead at once, even when the leader is cut off from the API
//! server and cannot learn it lost.
//!
//! kube-lease-manager (the maintained crate on kube 5) was considered: on API errors its watch
//! loop keeps reporting the last state, so a partitioned leader would go on writing; it also
//! judges expiry by the Lease's wall-clock timestamps. Neither is acceptable for fencing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::runtime::watcher::{self, Event};
use rcsync_core::kube_client::RetryWithBackoff as _;
use tokio::sync::watch;
use tokio::time::Instant;

/// Name of the Lease the virtual agents of one virtual cluster elect their leader on.
pub const LEASE_NAME: &str = "rcsync-virtual-agent";

/// Who leads, as this replica knows it.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Role {
    /// The Lease was not read yet.
    #[default]
    Unknown,
    /// This replica leads and may write.
    Leading,
    /// Another replica leads (its identity), or nobody does (`None`): this replica must not write.
    Following(Option<String>),
}

impl Role {
    /// The identity of the leader, when known (`me` when this replica leads).
    pub fn leader<'a>(&'a self, me: &'a str) -> Option<&'a str> {
        match self {
            Role::Leading => Some(me),
            Role::Following(leader) => leader.as_deref(),
            Role::Unknown => None,
        }
    }
}

/// Whether this replica may write now: open until the leader's renew deadline, closed on standby.
/// Checked by the virtual cluster's kube client before every write and by the host agent client
/// before every call, so even a task that has not yet been stopped (a process resumed after a
/// pause, say) cannot write once the deadline has passed.
#[derive(Clone, Debug, Default)]
pub struct Fence(Arc<Mutex<Option<Instant>>>);

impl Fence {
    /// Whether writes may go out now.
    pub fn allows(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|until| Instant::now() < until)
    }

    fn open_until(&self, until: Instant) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(until);
    }

    fn close(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The fence as the kube client's write check.
    pub fn write_fence(&self) -> rcsync_core::kube_client::WriteFence {
        let fence = self.clone();
        Arc::new(move || fence.allows())
    }
}

/// How to elect: where the Lease is, who this replica is, and the timing.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    /// Namespace of the Lease.
    pub namespace: String,
    /// This replica's holder identity.
    pub identity: String,
    /// How long a lease is valid after its last renewal, as standbys measure it.
    pub duration: Duration,
}

impl LeaseSettings {
    /// How long a leader keeps leading without a successful renewal (two thirds of the duration,
    /// client-go's 10 s of 15 s).
    pub fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }

    /// How often a leader renews, and how soon a failed attempt is repeated (a sixth of the
    /// duration).
    pub fn retry_period(&self) -> Duration {
        self.duration / 6
    }

    /// The default holder identity: the host name (the Pod name in a cluster) and the process id.
    pub fn default_identity() -> String {
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
            })
            .unwrap_or_else(|| "unknown-host".to_string());
        format!("{host}_{}", std::process::id())
    }
}

/// The lease record as last seen, and when (locally) it last changed.
#[derive(Debug)]
struct Observed {
    lease: Option<Lease>,
    changed_at: Instant,
}

impl Observed {
    fn holder(&self) -> Option<&str> {
        self.lease
            .as_ref()
            .and_then(|l| l.spec.as_ref())
            .and_then(|s| s.holder_identity.as_deref())
            .filter(|h| !h.is_empty())
    }

    /// What a renewal or takeover changes; a standby restarts its expiry clock when it changes.
    fn record(lease: &Lease) -> impl PartialEq + use<> {
        let spec = lease.spec.clone().unwrap_or_default();
        (
            spec.holder_identity,
            spec.renew_time,
            spec.acquire_time,
            spec.lease_transitions,
        )
    }
}

/// Resolves once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Elects on the Lease and publishes this replica's [`Role`].
pub struct Elector {
    api: Api<Lease>,
    settings: LeaseSettings,
    observed: Observed,
    /// While leading: the resourceVersion of our last write, and the instant leadership ends
    /// unless renewed.
    leading: Option<(String, Instant)>,
    role: watch::Sender<Role>,
    fence: Fence,
}

/// Why a write to the Lease did not take.
enum WriteError {
    /// Somebody else wrote first (409) or the Lease appeared meanwhile.
    Conflict,
    /// Anything else (network, 5xx, permissions): logged, retried.
    Other(kube::Error),
}

impl Elector {
    /// An elector on `api` (the Lease's namespace) publishing to `role` and keeping `fence` open
    /// exactly while this replica leads. `api` must not be fenced itself.
    pub fn new(api: Api<Lease>, settings: LeaseSettings, role: watch::Sender<Role>, fence: Fence) -> Self {
        Self {
            api,
            settings,
            observed: Observed {
                lease: None,
                changed_at: Instant::now(),
            },
            leading: None,
            role,
            fence,
        }
    }

    /// Runs until `stop` turns true, then releases the Lease if this replica holds it (so a
    /// standby takes over at once) and returns. Stop only after the leader's work has stopped.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let config = watcher::Config::default().fields(&format!("metadata.name={LEASE_NAME}"));
        let mut events = watcher::watcher(self.api.clone(), config)
            .retry_with_backoff()
            .boxed();
        let mut relist: Option<Option<Lease>> = None;
        let mut listed = false;
        // Renewals and takeovers alike: at most one write per retry period, also when a write
        // fails at once (an API server that is down would otherwise be asked in a busy loop).
        let mut next_attempt = Instant::now();
        loop {
            let wake = next_wake(
                self.leading.as_ref().map(|(_, until)| *until),
                listed.then(|| self.takeover_at()),
                next_attempt,
            );
            tokio::select! {
                () = stopped(&mut stop) => break,
                event = events.next() => match event {
                    None => break,
                    Some(Err(e)) => tracing::warn!(error = %e, lease = LEASE_NAME, namespace = %self.settings.namespace, "watching the leader Lease failed; retrying with backoff"),
                    Some(Ok(Event::Init)) => relist = Some(None),
                    Some(Ok(Event::InitApply(lease))) => relist = Some(Some(lease)),
                    Some(Ok(Event::InitDone)) => {
                        listed = true;
                        self.observe(relist.take().flatten());
                    }
                    Some(Ok(Event::Apply(lease))) => self.observe(Some(lease)),
                    Some(Ok(Event::Delete(_))) => self.observe(None),
                },
                _ = tokio::time::sleep_until(wake) => {
                    if self.leading.is_some() {
                        self.renew().await;
                    } else {
                        self.try_acquire().await;
                    }
                    next_attempt = Instant::now() + self.settings.retry_period();
                }
            }
        }
        self.release().await;
    }

    /// When a standby may take the Lease: now if nobody holds it or it names this replica's
    /// identity (a restarted process with a stable identity, as client-go does), else a whole
    /// lease duration (as the holder declared it) after the record last changed.
    fn takeover_at(&self) -> Instant {
        let holder = self.observed.holder();
        if holder.is_none() || holder == Some(self.settings.identity.as_str()) {
            return Instant::now();
        }
        let declared = self
            .observed
            .lease
            .as_ref()
            .and_then(|l| l.spec.as_ref())
            .and_then(|s| s.lease_duration_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .filter(|s| *s > 0)
            .map_or(self.settings.duration, Duration::from_secs);
        self.observed.changed_at + declared
    }

    /// Takes in a record seen on the watch.
    fn observe(&mut self, lease: Option<Lease>) {
        let changed = match (&self.observed.lease, &lease) {
            (Some(old), Some(new)) => Observed::record(old) != Observed::record(new),
            (None, None) => false,
            _ => true,
        };
        if changed {
            self.observed.changed_at = Instant::now();
        }
        self.observed.lease = lease;
        let holder = self.observed.holder().map(str::to_string);
        if self.leading.is_some() {
            if holder.as_deref() != Some(self.settings.identity.as_str()) && changed {
                // Only a write after our lease expired can do this; we are not leading.
                self.lose(holder.clone(), "the Lease names another holder");
            }
        } else {
            self.publish(Role::Following(holder));
        }
    }

    fn publish(&self, role: Role) {
        self.role.send_if_modified(|r| {
            if *r == role {
                false
            } else {
                *r = role;
                true
            }
        });
    }

    fn lose(&mut self, leader: Option<String>, why: &str) {
        self.fence.close();
        if self.leading.take().is_some() {
            tracing::warn!(identity = %self.settings.identity, reason = why, "stopped leading");
        }
        self.publish(Role::Following(leader));
    }

    /// The spec this replica writes when it takes or renews the Lease.
    fn spec(&self, now: MicroTime, taking: bool) -> LeaseSpec {
        let old = self
            .observed
            .lease
            .as_ref()
            .and_then(|l| l.spec.clone())
            .unwrap_or_default();
        let seconds = i32::try_from(self.settings.duration.as_secs().max(1)).unwrap_or(i32::MAX);
        LeaseSpec {
            holder_identity: Some(self.settings.identity.clone()),
            lease_duration_seconds: Some(seconds),
            acquire_time: if taking {
                Some(now.clone())
            } else {
                old.acquire_time
            },
            renew_time: Some(now),
            lease_transitions: Some(
                old.lease_transitions.unwrap_or(0)
                    + i32::from(taking && old.holder_identity.as_deref().is_some_and(|h| !h.is_empty())),
            ),
            ..Default::default()
        }
    }

    async fn write(&self, spec: LeaseSpec) -> Result<Lease, WriteError> {
        let result = match &self.observed.lease {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(LEASE_NAME.to_string()),
                        namespace: Some(self.settings.namespace.clone()),
                        ..Default::default()
                    },
                    spec: Some(spec),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            Some(current) => {
                let mut lease = current.clone();
                if let Some((rv, _)) = &self.leading {
                    lease.metadata.resource_version = Some(rv.clone());
                }
                lease.spec = Some(spec);
                self.api.replace(LEASE_NAME, &PostParams::default(), &lease).await
            }
        };
        result.map_err(|e| match e {
            kube::Error::Api(ref s) if s.code == 409 => WriteError::Conflict,
            other => WriteError::Other(other),
        })
    }

    async fn try_acquire(&mut self) {
        let started = Instant::now();
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let previous = self.observed.holder().map(str::to_string);
        match self.write(self.spec(now, true)).await {
            Ok(lease) => {
                let rv = lease.metadata.resource_version.clone().unwrap_or_default();
                let transitions = lease.spec.as_ref().and_then(|s| s.lease_transitions);
                self.observed.lease = Some(lease);
                self.observed.changed_at = Instant::now();
                let until = started + self.settings.renew_deadline();
                self.fence.open_until(until);
                self.leading = Some((rv, until));
                tracing::info!(
                    identity = %self.settings.identity,
                    previous = previous.as_deref().unwrap_or("<none>"),
                    transitions,
                    lease = LEASE_NAME,
                    namespace = %self.settings.namespace,
                    "started leading"
                );
                self.publish(Role::Leading);
            }
            // Somebody else was faster, or our copy is stale: the watch shows the current record;
            // try again after a retry period unless it shows a new holder meanwhile.
            Err(WriteError::Conflict) => {
                let wait = self
                    .settings
                    .duration
                    .saturating_sub(self.settings.retry_period());
                self.observed.changed_at = Instant::now().checked_sub(wait).unwrap_or_else(Instant::now);
            }
            Err(WriteError::Other(e)) => {
                tracing::warn!(error = %e, lease = LEASE_NAME, namespace = %self.settings.namespace, "taking the leader Lease failed; retrying")
            }
        }
    }

    async fn renew(&mut self) {
        let Some((_, until)) = &self.leading else { return };
        if Instant::now() >= *until {
            let deadline = self.settings.renew_deadline();
            self.lose(
                None,
                &format!("not renewed within the renew deadline of {deadline:?}"),
            );
            return;
        }
        let started = Instant::now();
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        match self.write(self.spec(now, false)).await {
            Ok(lease) => {
                let rv = lease.metadata.resource_version.clone().unwrap_or_default();
                let until = started + self.settings.renew_deadline();
                // A renew that took longer than the deadline is already stale.
                if Instant::now() < until {
                    self.fence.open_until(until);
                    self.leading = Some((rv, until));
                    self.observed.lease = Some(lease);
                    self.observed.changed_at = Instant::now();
                } else {
                    self.lose(None, "the renewal came back after the renew deadline");
                }
            }
            Err(WriteError::Conflict) => match self.api.get_opt(LEASE_NAME).await {
                Ok(current) => {
                    let holder = current
                        .as_ref()
                        .and_then(|l| l.spec.as_ref())
                        .and_then(|s| s.holder_identity.clone());
                    if holder.as_deref() == Some(self.settings.identity.as_str()) {
                        // Our own record with a newer version (e.g. a retried write that took).
                        if let (Some((rv, _)), Some(l)) = (&mut self.leading, &current) {
                            *rv = l.metadata.resource_version.clone().unwrap_or_default();
                        }
                        self.observed.lease = current;
                    } else {
                        self.observed.lease = current;
                        self.observed.changed_at = Instant::now();
                        self.lose(holder, "the Lease was taken over");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading the leader Lease after a conflict failed; retrying")
                }
            },
            Err(WriteError::Other(e)) => {
                tracing::warn!(error = %e, lease = LEASE_NAME, namespace = %self.settings.namespace, "renewing the leader Lease failed; retrying until the renew deadline")
            }
        }
    }

    /// Gives the Lease up (holder cleared) if this replica holds it.
    async fn release(&mut self) {
        if self.leading.is_none() {
            return;
        }
        self.fence.close();
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let mut spec = self.spec(now, false);
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        match self.write(spec).await {
            Ok(_) => tracing::info!(identity = %self.settings.identity, "released the leader Lease"),
            Err(WriteError::Conflict) => tracing::info!("the leader Lease had moved on; nothing to release"),
            Err(WriteError::Other(e)) => {
                tracing::warn!(error = %e, "releasing the leader Lease failed; a standby takes over when it expires")
            }
        }
        self.leading = None;
        self.publish(Role::Following(None));
    }
}

/// When the election loop next writes: a leader renews at `next_attempt` (or notices the renew
/// deadline `leading_until` passing); a follower that has listed the Lease tries at its takeover
/// time, but never before `next_attempt`; one that has not listed it waits for the watch.
fn next_wake(leading_until: Option<Instant>, takeover_at: Option<Instant>, next_attempt: Instant) -> Instant {
    match (leading_until, takeover_at) {
        (Some(until), _) => next_attempt.min(until),
        (None, Some(takeover)) => takeover.max(next_attempt),
        (None, None) => Instant::now() + Duration::from_secs(3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_takeover_is_retried_after_a_retry_period_not_at_once() {
        let now = Instant::now();
        let retry = now + Duration::from_secs(2);
        // The Lease is free (or names this replica): take it now, unless a try just failed.
        assert_eq!(next_wake(None, Some(now), now), now);
        assert_eq!(next_wake(None, Some(now), retry), retry);
        // Held by another: its expiry, or later.
        let expiry = now + Duration::from_secs(15);
        assert_eq!(next_wake(None, Some(expiry), retry), expiry);
        // Leading: renew at the next attempt, or sooner if the renew deadline comes first.
        assert_eq!(next_wake(Some(now + Duration::from_secs(10)), None, retry), retry);
        assert_eq!(
            next_wake(Some(now + Duration::from_secs(1)), None, retry),
            now + Duration::from_secs(1)
        );
        // Not listed yet: only the watch wakes it.
        assert!(next_wake(None, None, now) > now + Duration::from_secs(60));
    }
}
