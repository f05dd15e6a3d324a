//! One shard of the Pod syncer: its Pods, one at a time, from the virtual cluster through the host
//! agent's decision to the host and back (the parent module's diagram), each Pod's state kept in a
//! [`Record`] and failed work retried with the Pod's backoff.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::{Client, Resource as _, ResourceExt as _};
use prost::Message as _;
use rcsync_core::pod_refs;
use rcsync_proto::v1::{
    ApplyPodRequest, CheckPodRequest, CheckPodResponse, DeletePodRequest, PodRefusal, PodRefusalReason,
    PodStatusEvent,
};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tonic_types::StatusExt as _;

use super::tokens::{IssuedTokens, PodApiServer, token_secret_name, tokens_for, wants_tokens, with_tokens};
use super::{
    Failing, Key, ObjectKey, ObjectStores, POD_REFUSED_RETRY_MAX, POD_RETRY_MAX, PodBoard, Record, Records,
    ShardInput, State, StatusFeed, apply_body, changed_for_the_host, digest_of, fingerprint, key_of,
    kind_index, reason_of, retryable,
};
use crate::classes::SyncState;
use crate::connect::{Backoff, ClassClient, PodClient, SharedClients};
use crate::host_events::HostEventQueue;
use crate::metrics::Metrics;

mod host_status;

use host_status::VirtualDelete;

#[cfg(test)]
pub(super) use host_status::keep_gate_conditions;

/// Host events a shard keeps while its virtual Pods are not listed yet, at most (past it they are
/// counted as not written).
const EARLY_HOST_EVENTS_MAX: usize = 4096;

/// One shard's state and loop.
pub(super) struct Shard {
    client: Client,
    /// The classes held from the host: a Pod with Secrets whose class is not among them asks
    /// CheckPod before its Secrets leave the virtual cluster.
    sync_state: watch::Receiver<SyncState>,
    recorder: Recorder,
    metrics: Metrics,
    pods: HashMap<Key, Arc<Pod>>,
    records: Records,
    /// Host Pods by virtual key → virtual uid they were made for.
    host: HashMap<Key, String>,
    /// Host Pods seen since the status stream (re)opened, until its initial state completes.
    host_staging: Option<HashMap<Key, String>>,
    pods_listed: bool,
    host_listed: bool,
    /// Whether ConfigMaps and Secrets were listed: `[config maps, secrets]`.
    objects_listed: [bool; 2],
    objects: ObjectStores,
    /// Referenced object → the shard's Pods that reference it.
    referrers: HashMap<ObjectKey, HashSet<Key>>,
    /// Pod → the objects it references (to keep `referrers` current).
    references_of: HashMap<Key, Vec<ObjectKey>>,
    /// Pods refused because a host name was in use: retried when a host Pod goes.
    name_waiters: HashSet<Key>,
    /// Over the tenant's Pod sync rate: nothing is sent before this instant.
    paused_until: Option<Instant>,
    board: PodBoard,
    queue: VecDeque<Key>,
    queued: HashSet<Key>,
    retries: BTreeMap<Key, (Instant, Backoff)>,
    /// The last host refusal reported by an event, per Pod (reported once per message).
    refusals: HashMap<Key, String>,
    /// Host statuses whose copy into the virtual cluster failed, by Pod: written again when the
    /// Pod's retry comes up (a newer status replaces the pending one).
    unsent_status: HashMap<Key, PodStatusEvent>,
    /// The connection every shard of the agent uses for its calls.
    connection: Arc<SharedClients>,
    /// Which connection this shard's last call went over (an error drops that one only).
    generation: Option<usize>,
    /// Whether the Pod being processed failed for want of the host.
    host_failed: bool,
    /// Pods whose last try failed for want of the host: retried at once when the host path
    /// recovers.
    unreachable: HashSet<Key>,
    /// Whether the Pod being processed was refused for the host namespace's quota.
    host_full: bool,
    /// Whether the host refused the Pod being processed as it stands (`HOST_POD_REFUSED`): its
    /// retries back off to [`POD_REFUSED_RETRY_MAX`], and a change of the Pod retries it afresh.
    host_refused: bool,
    /// Pods the host's quota refused, since when: as each host Pod goes or ends, the one waiting
    /// longest is retried at once (one per host Pod: the room it made fits one), the others on
    /// their backoff.
    quota_waiters: HashMap<Key, Instant>,
    /// Tells the dispatcher that a host Pod of this shard ended, making room under the host
    /// namespace's quota for a Pod of any shard.
    room_made: Option<mpsc::UnboundedSender<()>>,
    /// Why the Pod being processed failed, when it did (see [`Shard::failed`]).
    failure: Option<String>,
    /// Pods whose last try failed, and why: `failing` on the board until a try succeeds, so a
    /// Pod the host keeps refusing (its namespace's quota, say) shows in `virtual-agent status`.
    failing: Failing,
    /// Where host events about this shard's Pods go to be written (`None`: not copied).
    pub(super) host_events: Option<HostEventQueue>,
    /// Host events that came before the virtual Pods were listed (looked at once they are).
    early_host_events: Vec<PodStatusEvent>,
    /// Where Pods on the host reach the virtual API server (`--pod-api-server`): Pods with
    /// service account token volumes get tokens of the virtual cluster (`None`: dropped).
    pub(super) pod_api_server: Option<PodApiServer>,
    /// The tokens issued for each Pod that has token volumes.
    tokens: HashMap<Key, IssuedTokens>,
    /// When each Pod's tokens are due to be requested again (and the Pod applied with them).
    token_refreshes: BTreeSet<(Instant, Key)>,
    /// Synced Pods a copy of whose ConfigMaps or Secrets was deleted on the host: applied again
    /// even though nothing of theirs changed, which writes the copy anew.
    copies_lost: HashSet<Key>,
}

impl Shard {
    /// A shard over the virtual cluster behind `client`, with nothing listed yet.
    pub(super) fn new(
        client: Client,
        connection: Arc<SharedClients>,
        sync_state: watch::Receiver<SyncState>,
        metrics: Metrics,
        recorder: Recorder,
        objects: ObjectStores,
        board: PodBoard,
    ) -> Self {
        Self {
            sync_state,
            board,
            recorder,
            client,
            records: Records::with_orphans(metrics.pods_orphaned.clone()),
            failing: Failing::with_failing(metrics.pods_failing.clone()),
            metrics,
            pods: HashMap::new(),
            host: HashMap::new(),
            host_staging: None,
            pods_listed: false,
            host_listed: false,
            host_events: None,
            early_host_events: Vec::new(),
            pod_api_server: None,
            tokens: HashMap::new(),
            token_refreshes: BTreeSet::new(),
            copies_lost: HashSet::new(),
            objects_listed: [false; 2],
            objects,
            referrers: HashMap::new(),
            references_of: HashMap::new(),
            name_waiters: HashSet::new(),
            paused_until: None,
            queue: VecDeque::new(),
            queued: HashSet::new(),
            retries: BTreeMap::new(),
            refusals: HashMap::new(),
            unsent_status: HashMap::new(),
            connection,
            generation: None,
            host_failed: false,
            unreachable: HashSet::new(),
            host_full: false,
            host_refused: false,
            quota_waiters: HashMap::new(),
            room_made: None,
            failure: None,
        }
    }

    /// Notes why the Pod being processed failed (it is retried): reported as `failing`.
    fn failed(&mut self, why: impl Into<String>) {
        self.failure = Some(why.into());
    }

    fn enqueue(&mut self, key: Key) {
        if self.queued.insert(key.clone()) {
            self.queue.push_back(key);
        }
    }

    fn retry_later(&mut self, key: Key) {
        let entry = self.retries.entry(key.clone()).or_insert_with(|| {
            (
                Instant::now(),
                Backoff::new(Duration::from_millis(200), POD_RETRY_MAX),
            )
        });
        let cap = if self.host_refused {
            POD_REFUSED_RETRY_MAX
        } else {
            POD_RETRY_MAX
        };
        let delay = entry.1.up_to(cap).next_delay();
        tracing::debug!(namespace = %key.0, pod = %key.1, retry_in_ms = delay.as_millis() as u64, "retrying the Pod later");
        let at = Instant::now() + delay;
        // Over the tenant's rate limit: nothing is lost, the Pod waits at least as long as asked.
        entry.0 = match self.paused_until {
            Some(until) => at.max(until),
            None => at,
        };
        self.metrics.pod_errors_total.inc();
    }

    /// Notes a RESOURCE_EXHAUSTED answer: the shard sends nothing until the delay the host agent
    /// asked for (its RetryInfo; one second without one) has passed.
    fn note_rate_limited(&mut self, status: &tonic::Status) -> bool {
        if status.code() != tonic::Code::ResourceExhausted {
            return false;
        }
        let delay = status
            .get_details_retry_info()
            .and_then(|info| info.retry_delay)
            .unwrap_or(Duration::from_secs(1));
        tracing::debug!(?delay, %status, "over the tenant's Pod sync rate: pausing");
        self.metrics.pods_rate_limited_total.inc();
        self.paused_until = Some(Instant::now() + delay);
        true
    }

    /// A host Pod went or ended: retries at once the Pod the host's quota has refused the
    /// longest, of those not already due.
    fn retry_a_quota_waiter(&mut self) {
        let now = Instant::now();
        let longest = self
            .quota_waiters
            .iter()
            .filter(|(key, _)| self.retries.get(*key).is_some_and(|(at, _)| *at > now))
            .min_by_key(|(_, since)| **since)
            .map(|(key, _)| key.clone());
        let Some(key) = longest else {
            return;
        };
        tracing::info!(namespace = %key.0, pod = %key.1, "a host Pod went or ended: retrying the Pod the host's quota refused the longest");
        // Over the tenant's rate limit, it still waits that out.
        let at = self.paused_until.unwrap_or(now).max(now);
        if let Some(entry) = self.retries.get_mut(&key) {
            entry.0 = entry.0.min(at);
        }
    }

    fn next_retry(&self) -> Option<Instant> {
        self.retries.values().map(|(at, _)| *at).min()
    }

    /// Syncs the shard's Pods as the dispatcher reports them, until `shutdown`.
    /// Syncs the shard's Pods from what `inbox` brings until `shutdown`, telling `room_made`
    /// when a host Pod of the shard ends.
    pub(super) async fn run(
        mut self,
        mut inbox: mpsc::Receiver<ShardInput>,
        room_made: mpsc::UnboundedSender<()>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        self.room_made = Some(room_made);
        let mut recoveries = self.connection.host_path().recoveries();
        loop {
            if self.paused_until.is_some_and(|until| until <= Instant::now()) {
                self.paused_until = None;
            }
            let paused = self.paused_until;
            let ready = self.pods_listed
                && self.host_listed
                && self.objects_listed == [true; 2]
                && paused.is_none()
                && !self.queue.is_empty();
            let retry_at = self.next_retry();
            let refresh_at = self.token_refreshes.first().map(|(at, _)| *at);
            tokio::select! {
                _ = shutdown.changed() => return,
                input = inbox.recv() => match input {
                    None => return,
                    Some(ShardInput::Relisted(fresh)) => {
                        let gone: Vec<Key> = self.pods.keys().filter(|k| !fresh.contains_key(*k)).cloned().collect();
                        self.pods = fresh;
                        self.tokens.retain(|key, _| self.pods.contains_key(key));
                        for key in &gone {
                            self.index_references(key);
                        }
                        let keys: Vec<Key> = self.pods.keys().cloned().collect();
                        for key in &keys {
                            self.index_references(key);
                        }
                        let all: Vec<Key> = self.pods.keys().cloned().chain(gone).collect();
                        for key in all {
                            self.enqueue(key);
                        }
                        if !self.pods_listed {
                            self.pods_listed = true;
                            self.collect_garbage();
                            for event in std::mem::take(&mut self.early_host_events) {
                                let key = (event.pod_namespace.clone(), event.pod_name.clone());
                                self.copy_host_event(key, event);
                            }
                        }
                        if self.unlisted().is_some() {
                            let keys: Vec<Key> = self.pods.keys().cloned().collect();
                            for key in &keys {
                                self.report(key);
                            }
                        }
                    }
                    Some(ShardInput::Upsert(pod)) => {
                        let key = key_of(&pod);
                        if self.pods.get(&key).is_some_and(|old| changed_for_the_host(old, &pod)) {
                            // A new Pod under an old name, or one edited (a Pod the host refused
                            // as it stood may pass now), does not inherit the old backoff.
                            self.retries.remove(&key);
                        }
                        self.pods.insert(key.clone(), pod);
                        self.index_references(&key);
                        if self.unlisted().is_some() {
                            self.report(&key);
                        }
                        self.enqueue(key);
                    }
                    Some(ShardInput::Removed(key)) => {
                        self.pods.remove(&key);
                        self.tokens.remove(&key);
                        self.copies_lost.remove(&key);
                        self.index_references(&key);
                        self.enqueue(key);
                    }
                    Some(ShardInput::ObjectChanged(object)) => {
                        let referrers: Vec<Key> = self.referrers.get(&object).into_iter().flatten().cloned().collect();
                        for key in referrers {
                            self.enqueue(key);
                        }
                    }
                    Some(ShardInput::ObjectsListed(kind)) => {
                        self.objects_listed[kind_index(kind)] = true;
                        let referring: Vec<Key> = self.references_of.keys().cloned().collect();
                        for key in referring {
                            self.enqueue(key);
                        }
                    }
                    Some(ShardInput::NamesFreed) => {
                        let waiting: Vec<Key> = self.name_waiters.iter().cloned().collect();
                        for key in waiting {
                            self.enqueue(key);
                        }
                        self.retry_a_quota_waiter();
                    }
                    Some(ShardInput::QuotaRoomMade) => self.retry_a_quota_waiter(),
                    Some(ShardInput::Status(StatusFeed::Reset)) => self.host_staging = Some(HashMap::new()),
                    Some(ShardInput::Status(StatusFeed::Event(event))) => {
                        let key = (event.pod_namespace.clone(), event.pod_name.clone());
                        self.on_status(*event).await;
                        self.report(&key);
                    }
                    Some(ShardInput::PodPolicyChanged) => {
                        // Every Pod's fingerprint includes the policy: synced Pods are applied
                        // again (the host patches what differs), refused ones are tried again.
                        let all: HashSet<Key> = self.pods.keys().chain(self.records.iter().map(|(k, _)| k)).cloned().collect();
                        tracing::debug!(pods = all.len(), "applying the shard's Pods again");
                        for key in all {
                            self.enqueue(key);
                        }
                    }
                    Some(ShardInput::ClassesChanged) => {
                        let waiting: Vec<Key> = self
                            .records
                            .iter()
                            .filter(|(_, r)| !matches!(r.state, State::Synced(_)))
                            .map(|(k, _)| k.clone())
                            .collect();
                        tracing::debug!(pods = waiting.len(), "synced RuntimeClasses or the sync switch changed: re-evaluating blocked and orphaned Pods");
                        for key in waiting {
                            self.enqueue(key);
                        }
                    }
                },
                _ = async { tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)).await }, if retry_at.is_some() => {
                    let now = Instant::now();
                    let due: Vec<Key> = self.retries.iter().filter(|(_, (at, _))| *at <= now).map(|(k, _)| k.clone()).collect();
                    for key in due {
                        // Keep the backoff state until the key succeeds.
                        if let Some(entry) = self.retries.get_mut(&key) {
                            entry.0 = now + Duration::from_secs(3600);
                        }
                        self.enqueue(key);
                    }
                }
                _ = async { tokio::time::sleep_until(refresh_at.unwrap_or_else(Instant::now)).await }, if refresh_at.is_some() => {
                    // Tokens at 80% of their lifetime: the Pods are applied again with new ones.
                    let now = Instant::now();
                    while let Some((at, key)) = self.token_refreshes.first().cloned() {
                        if at > now {
                            break;
                        }
                        self.token_refreshes.pop_first();
                        if self.pods.contains_key(&key) && self.tokens.get(&key).is_some_and(|t| t.refresh_at == at) {
                            self.enqueue(key);
                        }
                    }
                }
                _ = recoveries.changed() => {
                    // The host answers again: what failed for want of it goes now.
                    let now = self.paused_until.unwrap_or_else(Instant::now);
                    let hastened: Vec<Key> = self.unreachable.drain().collect();
                    tracing::debug!(pods = hastened.len(), "the host answers again: retrying the Pods that failed meanwhile");
                    for key in hastened {
                        if let Some(entry) = self.retries.get_mut(&key) {
                            entry.0 = entry.0.min(now);
                        }
                    }
                }
                _ = async { tokio::time::sleep_until(paused.unwrap_or_else(Instant::now)).await }, if paused.is_some() => {}
                _ = std::future::ready(()), if ready => {
                    if let Some(key) = self.queue.pop_front() {
                        self.queued.remove(&key);
                        self.host_failed = false;
                        self.host_full = false;
                        self.host_refused = false;
                        self.failure = None;
                        let ok = self.process(&key).await;
                        match self.failure.take() {
                            _ if ok => {
                                self.failing.remove(&key);
                            }
                            Some(why) => {
                                self.failing.insert(key.clone(), why);
                            }
                            // Waiting out the tenant's rate: as it stood.
                            None => {}
                        }
                        self.report(&key);
                        if ok || !self.host_failed {
                            self.unreachable.remove(&key);
                        } else {
                            self.unreachable.insert(key.clone());
                        }
                        if ok || !self.host_full {
                            self.quota_waiters.remove(&key);
                        } else {
                            self.quota_waiters.entry(key.clone()).or_insert_with(Instant::now);
                        }
                        if ok {
                            self.retries.remove(&key);
                        } else {
                            self.retry_later(key);
                        }
                    }
                }
            }
        }
    }

    /// Publishes where a Pod stands to the board behind `/status`.
    fn report(&self, key: &Key) {
        let mut board = self.board.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(why) = self.failing.get(key) {
            board.insert(key.clone(), ("failing", why.clone()));
            return;
        }
        match self.records.get(key).map(|r| &r.state) {
            Some(State::Synced(_)) => board.insert(key.clone(), ("synced", String::new())),
            Some(State::Blocked(why)) => board.insert(key.clone(), ("blocked", why.clone())),
            Some(State::Waiting(why)) => board.insert(key.clone(), ("waiting", why.clone())),
            Some(State::Orphaned) => board.insert(
                key.clone(),
                ("orphaned", "its runtime class is no longer synced".to_string()),
            ),
            Some(State::HostGone) => board.insert(
                key.clone(),
                (
                    "waiting",
                    "its host pod was deleted; deleting the virtual pod".to_string(),
                ),
            ),
            // Not tried yet: nothing is synced before the shard knows what is on the host.
            None if self.pods.contains_key(key) && self.unlisted().is_some() => {
                let why = self.unlisted().unwrap_or_default();
                board.insert(key.clone(), ("waiting", why.to_string()))
            }
            None => board.remove(key),
        };
    }

    /// What the shard waits for before it syncs any Pod, if anything: the host agent's list of the
    /// tenant's host Pods (without it a Pod could be created twice), and the virtual cluster's
    /// ConfigMaps and Secrets (sent with the Pods that reference them).
    fn unlisted(&self) -> Option<&'static str> {
        if !self.host_listed {
            Some(
                "the host agent has not listed the tenant's host Pods yet (the host API server may be unreachable from it)",
            )
        } else if self.objects_listed != [true; 2] {
            Some("the virtual cluster's ConfigMaps and Secrets are not listed yet")
        } else {
            None
        }
    }

    /// Brings the reverse index of referenced objects up to date for one Pod (present or gone).
    fn index_references(&mut self, key: &Key) {
        for object in self.references_of.remove(key).unwrap_or_default() {
            if let Some(set) = self.referrers.get_mut(&object) {
                set.remove(key);
                if set.is_empty() {
                    self.referrers.remove(&object);
                }
            }
        }
        let Some(pod) = self.pods.get(key) else {
            return;
        };
        let Some(spec) = pod.spec.as_ref() else {
            return;
        };
        let mut objects: Vec<ObjectKey> = pod_refs::references(spec)
            .into_keys()
            .map(|(kind, name)| (kind, key.0.clone(), name))
            .collect();
        // The name its token Secret takes: a Secret of the namespace under it holds the Pod back
        // (see `on_virtual`) until it goes.
        if self.pod_api_server.is_some() && wants_tokens(pod) {
            objects.push((
                pod_refs::RefKind::Secret,
                key.0.clone(),
                token_secret_name(&key.1),
            ));
        }
        if objects.is_empty() {
            return;
        }
        for object in &objects {
            self.referrers
                .entry(object.clone())
                .or_default()
                .insert(key.clone());
        }
        self.references_of.insert(key.clone(), objects);
    }

    async fn clients(&mut self) -> Option<(ClassClient, PodClient)> {
        match self.connection.get().await {
            Ok(connection) => {
                self.generation = Some(connection.generation);
                Some((connection.classes, connection.pods))
            }
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "host agent unreachable: Pods are not synced meanwhile"
                );
                self.failed(format!("the host agent is unreachable: {e:#}"));
                self.host_failed = true;
                self.connection.host_path().failed();
                None
            }
        }
    }

    /// Notes a failed call (`attempt`: what it was to do) for the board, and drops the connection
    /// after errors a new one may cure: the host agent gone or restarted, and a refused token (the
    /// token file is re-read at every connect, so a rotated token is picked up).
    async fn call_failed(&mut self, status: &tonic::Status, attempt: &str) {
        match status.code() {
            // Over the tenant's rate: the Pod waits, nothing failed.
            tonic::Code::ResourceExhausted => {}
            // The host's own refusal, said by the host agent.
            tonic::Code::FailedPrecondition => {
                self.failed(status.message());
                let reason = status
                    .get_details_error_info()
                    .filter(|info| info.domain == rcsync_proto::ERROR_DOMAIN)
                    .map(|info| info.reason);
                self.host_full = reason.as_deref() == Some(rcsync_proto::HOST_QUOTA_EXCEEDED);
                self.host_refused = reason.as_deref() == Some(rcsync_proto::HOST_POD_REFUSED);
            }
            code => self.failed(format!(
                "the host agent did not {attempt} ({code:?}): {}",
                status.message()
            )),
        }
        if matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded
        ) {
            // The host agent, or the host API server behind it, did not answer.
            self.host_failed = true;
            self.connection.host_path().failed();
        }
        if crate::connect::a_new_connection_may_cure(status.code())
            && let Some(generation) = self.generation.take()
        {
            self.connection.drop_connection(generation).await;
        }
    }

    /// Processes one Pod; false when it must be retried.
    async fn process(&mut self, key: &Key) -> bool {
        let synced = match self.pods.get(key).cloned() {
            None => self.on_virtual_gone(key).await,
            Some(pod) => self.on_virtual(key, &pod).await,
        };
        let status_copied = match self.unsent_status.remove(key) {
            None => true,
            Some(event) => {
                let copied = self.copy_status(key, &event).await;
                if !copied {
                    self.unsent_status.insert(key.clone(), event);
                }
                copied
            }
        };
        synced && status_copied
    }

    async fn delete_on_host(&mut self, key: &Key, uid: &str, grace: Option<i64>) -> bool {
        let Some((_, mut pods)) = self.clients().await else {
            return false;
        };
        let request = DeletePodRequest {
            pod_namespace: key.0.clone(),
            pod_name: key.1.clone(),
            pod_uid: uid.to_string(),
            grace_period_seconds: grace,
        };
        match self.connection.bounded(request, |r| pods.delete_pod(r)).await {
            Ok(answer) => {
                self.connection.host_path().reached();
                tracing::info!(namespace = %key.0, pod = %key.1, deleted = answer.into_inner().deleted, "deleted host Pod of a deleted virtual Pod");
                true
            }
            Err(status) => {
                if !self.note_rate_limited(&status) {
                    tracing::warn!(namespace = %key.0, pod = %key.1, %status, "DeletePod failed");
                }
                self.call_failed(&status, "delete the host pod").await;
                // A refusal that would only repeat is reported (above) and not retried.
                !retryable(&status)
            }
        }
    }

    async fn on_virtual_gone(&mut self, key: &Key) -> bool {
        self.refusals.remove(key);
        self.name_waiters.remove(key);
        let record = self.records.remove(key);
        let uid = self.host.get(key).cloned().or_else(|| {
            record
                .filter(|r| matches!(r.state, State::Synced(_) | State::Orphaned))
                .map(|r| r.uid)
        });
        match uid {
            Some(uid) => {
                if self.delete_on_host(key, &uid, None).await {
                    true
                } else {
                    // Keep what we need to retry.
                    self.records.insert(
                        key.clone(),
                        Record {
                            uid,
                            state: State::Orphaned,
                        },
                    );
                    false
                }
            }
            None => true,
        }
    }

    async fn on_virtual(&mut self, key: &Key, pod: &Pod) -> bool {
        let uid = pod.uid().unwrap_or_default();
        if self.records.get(key).is_some_and(|r| r.uid != uid) {
            // A new Pod under an old name: forget the old one.
            self.records.remove(key);
        }
        // The host Pod of an earlier virtual Pod of this name (deleted while this agent was away
        // or could not reach the host) goes whatever this Pod's fate: it may never sync, and then
        // no ApplyPod would replace it.
        if let Some(old) = self.host.get(key).filter(|h| **h != uid).cloned()
            && !self.delete_on_host(key, &old, None).await
        {
            return false;
        }
        let host_has_it = self.host.get(key) == Some(&uid);
        if pod.metadata.deletion_timestamp.is_none()
            && self.records.get(key).is_some_and(|r| r.state == State::HostGone)
        {
            // Never applied again (which would bring the host Pod back): the delete is retried.
            return self.delete_virtual(key, pod, VirtualDelete::HostGone).await;
        }
        if pod.metadata.deletion_timestamp.is_some() {
            if host_has_it {
                return self
                    .delete_on_host(key, &uid, pod.metadata.deletion_grace_period_seconds)
                    .await;
            }
            return self.delete_virtual(key, pod, VirtualDelete::Finish).await;
        }
        let references = pod.spec.as_ref().map(pod_refs::references).unwrap_or_default();
        let mut referenced = self.objects.collect(&key.0, &references);
        // With --pod-api-server, token volumes carry tokens of the virtual cluster in a Secret.
        let mut sent = std::borrow::Cow::Borrowed(pod);
        if let Some(api_server) = &self.pod_api_server
            && wants_tokens(pod)
        {
            // The Secret that carries the tokens must not stand in for one of the tenant's.
            let token_secret = token_secret_name(&key.1);
            if self.objects.secret_exists(&key.0, &token_secret) {
                let refusal = PodRefusal {
                    reason: PodRefusalReason::NameInUse as i32,
                    message: format!(
                        "the Secret {token_secret:?} that carries the pod's service account token is taken by a \
                         Secret of namespace {:?}: rename that Secret, or run the pod without a token volume",
                        key.0
                    ),
                };
                return self.on_refused(key, pod, &uid, refusal).await;
            }
            let issued = match tokens_for(&self.client, pod, self.tokens.get(key)).await {
                Ok(issued) => issued,
                Err(e) => {
                    tracing::warn!(namespace = %key.0, pod = %key.1, error = %e, "requesting a token for the Pod's service account failed; retrying");
                    self.failed(format!(
                        "requesting a token for the pod's service account failed: {e}"
                    ));
                    return false;
                }
            };
            let (with, secret) = with_tokens(pod, &issued, api_server);
            match serde_json::to_vec(&secret) {
                Ok(json) => referenced.secrets.push(json),
                Err(e) => referenced
                    .missing
                    .push(format!("the token Secret could not be serialized: {e}")),
            }
            // A new token is a new version of the Secret: the Pod is applied again with it.
            referenced.versions.push(format!("token@{:x}", issued.version()));
            if self
                .tokens
                .get(key)
                .is_none_or(|t| t.refresh_at != issued.refresh_at)
            {
                self.token_refreshes.insert((issued.refresh_at, key.clone()));
                self.metrics.pod_tokens_issued_total.inc_by(issued.count());
            }
            self.tokens.insert(key.clone(), issued);
            sent = std::borrow::Cow::Owned(with);
        }
        // What the host writes follows the Pod, the objects it references and the tenant's Pod
        // policy: a change of any of them applies the Pod again.
        let fingerprint = digest_of(&(
            fingerprint(pod),
            &referenced.versions,
            &self.sync_state.borrow().pod_policy,
        ));
        if let Some(record) = self.records.get(key)
            && record.state == State::Synced(fingerprint)
            && host_has_it
            && !self.copies_lost.contains(key)
        {
            return true;
        }
        let Some((mut classes, mut pods)) = self.clients().await else {
            return false;
        };
        // ApplyPod decides on the host (it re-checks the class and returns the decision), so a
        // Pod with everything it references goes there in one call. Only a Pod that would wait
        // asks CheckPod first, so a denied class is reported rather than the missing objects. A
        // Pod already running on the host never waits: an object deleted under it keeps its last
        // copy there (it goes with the last Pod using it), and the Pod keeps receiving updates.
        // A Pod with Secrets whose class is not one the host syncs asks first too, so Secrets of a
        // Pod the host would deny never leave the virtual cluster.
        let runtime_class = pod
            .spec
            .as_ref()
            .and_then(|s| s.runtime_class_name.clone())
            .unwrap_or_default();
        let would_wait = !referenced.missing.is_empty();
        let secrets_at_stake = !referenced.secrets.is_empty() && self.may_be_denied(&runtime_class);
        let checked = if host_has_it || !(would_wait || secrets_at_stake) {
            None
        } else {
            let request = CheckPodRequest {
                pod_namespace: key.0.clone(),
                pod_name: key.1.clone(),
                runtime_class_name: runtime_class,
            };
            match self.connection.bounded(request, |r| classes.check_pod(r)).await {
                Ok(answer) => Some(answer.into_inner()),
                Err(status) => {
                    tracing::warn!(namespace = %key.0, pod = %key.1, %status, "CheckPod failed: not syncing (fail closed)");
                    self.call_failed(&status, "check the pod").await;
                    return false;
                }
            }
        };
        if would_wait && checked.as_ref().is_some_and(|d| d.allowed) {
            return self.on_waiting(key, pod, &uid, &referenced.missing).await;
        }
        let decision = if let Some(denied) = checked.filter(|d| !d.allowed) {
            denied
        } else {
            let request = ApplyPodRequest {
                pod_json: apply_body(&sent),
                config_maps_json: referenced.config_maps,
                secrets_json: referenced.secrets,
                on_host: host_has_it,
            };
            let size = request.encoded_len();
            if size > rcsync_proto::MAX_REQUEST_BYTES {
                // The host agent would refuse the call, and again at every retry: say so on the
                // Pod, once; it is looked at again when it or an object it references changes.
                let refusal = PodRefusal {
                    reason: PodRefusalReason::Unsupported as i32,
                    message: format!(
                        "the Pod and the {} ConfigMaps and {} Secrets it references take {size} bytes, \
                         more than a Pod sync may carry ({} bytes)",
                        request.config_maps_json.len(),
                        request.secrets_json.len(),
                        rcsync_proto::MAX_REQUEST_BYTES,
                    ),
                };
                return self.on_refused(key, pod, &uid, refusal).await;
            }
            match self.connection.bounded(request, |r| pods.apply_pod(r)).await {
                Ok(answer) => {
                    let answer = answer.into_inner();
                    if let Some(refusal) = answer.refusal {
                        return self.on_refused(key, pod, &uid, refusal).await;
                    }
                    if answer.applied {
                        self.connection.host_path().reached();
                        let was_orphan = self.records.get(key).is_some_and(|r| r.state == State::Orphaned);
                        let was_synced = self
                            .records
                            .get(key)
                            .is_some_and(|r| r.uid == uid && matches!(r.state, State::Synced(_)));
                        self.records.insert(
                            key.clone(),
                            Record {
                                uid: uid.clone(),
                                state: State::Synced(fingerprint),
                            },
                        );
                        self.refusals.remove(key);
                        self.name_waiters.remove(key);
                        self.copies_lost.remove(key);
                        self.metrics.pods_synced_total.inc();
                        // A Pod that was synced and is again (an update) is a line for debugging, not
                        // for every fleet's log.
                        if was_synced {
                            tracing::debug!(namespace = %key.0, pod = %key.1, host = %answer.host_name, "synced Pod to the host");
                        } else {
                            tracing::info!(
                                namespace = %key.0, pod = %key.1, host = %answer.host_name, created = answer.created,
                                resumed = was_orphan, "synced Pod to the host"
                            );
                        }
                        return true;
                    }
                    match answer.decision {
                        Some(decision) if !decision.allowed => decision,
                        other => {
                            tracing::warn!(namespace = %key.0, pod = %key.1, decision = ?other, "ApplyPod neither applied nor refused the Pod; retrying");
                            self.failed("the host agent neither synced nor refused the pod");
                            return false;
                        }
                    }
                }
                Err(status) => {
                    if self.note_rate_limited(&status) {
                        return false;
                    }
                    tracing::warn!(namespace = %key.0, pod = %key.1, %status, "ApplyPod failed");
                    self.call_failed(&status, "sync the pod to the host").await;
                    if status.code() == tonic::Code::FailedPrecondition
                        && self.refusals.get(key).map(String::as_str) != Some(status.message())
                    {
                        // The host refused the Pod (e.g. its namespace or class is missing there):
                        // tell the user where they look, once per reason; keep retrying.
                        let note = format!("did not sync pod {:?} to host: {}", key.1, status.message());
                        if self
                            .publish(pod, EventType::Warning, "SyncError", "Sync/host-refused", note)
                            .await
                        {
                            self.refusals.insert(key.clone(), status.message().to_string());
                        }
                    }
                    return false;
                }
            }
        };
        self.on_denied(key, pod, &uid, host_has_it, decision).await
    }

    /// Whether the host may deny `runtime_class` for this tenant: the class is named and the
    /// virtual cluster does not hold it from the host, or what it holds is not known yet (before
    /// the first complete Sync state). False when the tenant's sync is off (Pods are not gated).
    /// Only a reason to ask first; the host decides.
    fn may_be_denied(&self, runtime_class: &str) -> bool {
        let state = self.sync_state.borrow();
        let held = state.initial_applied && state.synced.contains(runtime_class);
        !runtime_class.is_empty() && state.enabled != Some(false) && !held
    }

    /// Records `state` for a Pod; false when it was in that state already (nothing to report).
    fn enter(&mut self, key: &Key, uid: &str, state: State) -> bool {
        if self.records.get(key).is_some_and(|r| r.state == state) {
            return false;
        }
        let record = Record {
            uid: uid.to_string(),
            state,
        };
        self.records.insert(key.clone(), record);
        true
    }

    /// An allowed Pod whose referenced objects are not all there: it waits (with one event per
    /// change of what is missing) and is re-queued when one of them appears.
    async fn on_waiting(&mut self, key: &Key, pod: &Pod, uid: &str, missing: &[String]) -> bool {
        let message = format!(
            "did not sync pod {:?} to host yet: it references {} which {} not exist in namespace {:?}; it syncs once {} created",
            key.1,
            missing.join(", "),
            if missing.len() == 1 { "does" } else { "do" },
            key.0,
            if missing.len() == 1 { "it is" } else { "they are" },
        );
        if !self.enter(key, uid, State::Waiting(message.clone())) {
            return true;
        }
        tracing::info!(namespace = %key.0, pod = %key.1, "{message}");
        self.publish(pod, EventType::Warning, "SyncWarning", "Sync/waiting", message)
            .await
    }

    /// The host agent refused the Pod (Pod Security, unsupported fields, a name in use): a
    /// `SyncError` event once per message; retried when the tenant's policy changes, or, for a
    /// name in use, when a host Pod goes.
    async fn on_refused(&mut self, key: &Key, pod: &Pod, uid: &str, refusal: PodRefusal) -> bool {
        let reason = PodRefusalReason::try_from(refusal.reason).unwrap_or(PodRefusalReason::Unspecified);
        if reason == PodRefusalReason::NameInUse {
            self.name_waiters.insert(key.clone());
        } else {
            self.name_waiters.remove(key);
        }
        let message = if self.host.get(key).is_some_and(|h| h == uid) {
            // Like a Pod Security level tightened on a namespace: what runs keeps running.
            format!(
                "pod {:?} keeps running on the host, but its changes are not synced: {}",
                key.1, refusal.message
            )
        } else {
            format!("did not sync pod {:?} to host: {}", key.1, refusal.message)
        };
        if !self.enter(key, uid, State::Blocked(message.clone())) {
            return true;
        }
        self.metrics.pods_refused_total.inc();
        tracing::info!(namespace = %key.0, pod = %key.1, reason = reason.as_str_name(), "{message}");
        let action = format!(
            "Sync/{}",
            reason
                .as_str_name()
                .trim_start_matches("POD_REFUSAL_REASON_")
                .to_lowercase()
        );
        self.publish(pod, EventType::Warning, "SyncError", &action, message)
            .await
    }

    async fn on_denied(
        &mut self,
        key: &Key,
        pod: &Pod,
        uid: &str,
        host_has_it: bool,
        decision: CheckPodResponse,
    ) -> bool {
        let was_synced = self
            .records
            .get(key)
            .is_some_and(|r| matches!(r.state, State::Synced(_) | State::Orphaned));
        if host_has_it || was_synced {
            if self.records.get(key).map(|r| &r.state) != Some(&State::Orphaned) {
                tracing::info!(
                    namespace = %key.0, pod = %key.1, reason = %decision.message,
                    "Pod orphaned: its runtime class is no longer synced; it stays in both clusters and receives no updates"
                );
            }
            self.records.insert(
                key.clone(),
                Record {
                    uid: uid.to_string(),
                    state: State::Orphaned,
                },
            );
            return true;
        }
        let already = self
            .records
            .get(key)
            .is_some_and(|r| r.state == State::Blocked(decision.message.clone()));
        self.records.insert(
            key.clone(),
            Record {
                uid: uid.to_string(),
                state: State::Blocked(decision.message.clone()),
            },
        );
        if already {
            return true;
        }
        self.metrics.pods_denied_total.inc();
        tracing::info!(namespace = %key.0, pod = %key.1, reason = ?reason_of(&decision), "{}", decision.message);
        let reason_name = reason_of(&decision)
            .as_str_name()
            .trim_start_matches("CHECK_POD_REASON_")
            .to_lowercase();
        let action = format!("Sync/{reason_name}");
        self.publish(pod, EventType::Warning, "SyncWarning", &action, decision.message)
            .await
    }

    async fn publish(
        &mut self,
        pod: &Pod,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) -> bool {
        let event = KubeEvent {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        match self.recorder.publish(&event, &pod.object_ref(&())).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(pod = %pod.name_any(), error = %e, "recording an event failed; retrying");
                self.failed(format!("recording an event about the pod failed: {e}"));
                // Forget the Blocked state so the retry records the event again.
                self.records.remove(&key_of(pod));
                false
            }
        }
    }

    /// Host Pods whose virtual Pod no longer exists (deleted while the agent was away).
    fn collect_garbage(&mut self) {
        if !(self.pods_listed && self.host_listed) {
            return;
        }
        let live: HashMap<&Key, String> = self
            .pods
            .iter()
            .map(|(k, p)| (k, p.uid().unwrap_or_default()))
            .collect();
        let stale: Vec<Key> = self
            .host
            .iter()
            .filter(|(k, uid)| live.get(k) != Some(*uid))
            .map(|(k, _)| k.clone())
            .collect();
        for key in stale {
            tracing::info!(namespace = %key.0, pod = %key.1, "host Pod without its virtual Pod: deleting it");
            self.enqueue(key);
        }
    }
}
