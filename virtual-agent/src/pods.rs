//! The Pod syncer: gates every virtual Pod on the host agent's decision, places admitted Pods on
//! the host, records `SyncWarning` events on denied ones, copies host status back, and keeps
//! orphans alone.
//!
//! ```text
//!  watch virtual Pods ──► queue ──► referenced ConfigMaps/Secrets all there?
//!     yes ──► ApplyPod(pod, objects): the host re-checks the class ──applied──► Synced
//!                                                                 ├─refused─► Blocked + SyncError event
//!                                                                 └─denied──┐
//!     no ──► CheckPod ──allowed──► Waiting + event (re-queued when an object appears)
//!                     └─denied─────────────────────────────────────────────┴► host Pod of this uid exists?
//!                                                   yes ─► Orphaned (left alone)   no ─► Blocked + SyncWarning event
//!  SyncState.synced or .pod_policy changes ──► re-queue Blocked, Waiting and Orphaned Pods
//!  watch ConfigMaps, Secrets ──► change ──► re-queue the Pods referencing it (copies stay current)
//!  WatchPodStatus ──► host status ──► virtual Pod status (a failed write is retried with the Pod's backoff)
//!                   host Pod gone ──► event + delete virtual Pod
//!  virtual Pod deleted ──► DeletePod (UID-checked by the host agent)
//! ```
//!
//! Nothing is decided before both the virtual Pods and the host Pods were listed, and nothing syncs
//! while the host agent is unreachable (fail closed); failed work is retried with backoff.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource as _, ResourceExt as _};
use prometheus_client::metrics::gauge::Gauge;
use prost::Message as _;
use rcsync_core::admin::Readiness;
use rcsync_core::kube_client::RetryWithBackoff as _;
use rcsync_core::pod_refs::{self, RefKind};
use rcsync_proto::v1::{
    ApplyPodRequest, CheckPodReason, CheckPodRequest, CheckPodResponse, DeletePodRequest, PodRefusal,
    PodRefusalReason, PodStatusEvent, PodStatusEventType, WatchPodStatusRequest,
};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::classes::SyncState;
use crate::connect::{Backoff, HostAgentTarget, PodClient};
use crate::metrics::Metrics;

/// Readiness check: the virtual cluster's Pods were listed.
pub const PODS_LISTED: &str = "virtual-pods-listed";
/// The component that reports Pod sync events, as vCluster's syncer names it.
pub const REPORTER: &str = "pod-syncer";

/// `(namespace, name)` of a virtual Pod.
pub type Key = (String, String);

/// Where each virtual Pod stands, for `/status`: `(state, why)` by Pod, kept by the shards.
pub type PodBoard = Arc<std::sync::Mutex<BTreeMap<Key, (&'static str, String)>>>;

#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    /// Written to the host from content with this fingerprint.
    Synced(u64),
    /// Denied with this message (event recorded).
    Blocked(String),
    /// Was synced; its class stopped being synced: left alone in both clusters.
    Orphaned,
    /// Allowed, but an object it needs is missing in the virtual cluster (event recorded).
    Waiting(String),
}

/// A referenced object: kind, namespace, name.
type ObjectKey = (RefKind, String, String);

/// The virtual cluster's ConfigMaps and Secrets, kept by watches and shared by every shard.
#[derive(Clone)]
struct ObjectStores {
    config_maps: Store<ConfigMap>,
    secrets: Store<Secret>,
}

/// What a Pod sends along: the JSON of each referenced object that exists, what is missing, and
/// a fingerprint of the objects' versions.
#[derive(Default)]
struct Referenced {
    config_maps: Vec<Vec<u8>>,
    secrets: Vec<Vec<u8>>,
    missing: Vec<String>,
    versions: Vec<String>,
}

impl ObjectStores {
    /// Collects the objects a Pod in `namespace` references.
    fn collect(&self, namespace: &str, references: &pod_refs::References) -> Referenced {
        let mut out = Referenced::default();
        for ((kind, name), required) in references {
            let found = match kind {
                RefKind::ConfigMap => {
                    self.config_maps
                        .get(&ObjectRef::new(name).within(namespace))
                        .map(|cm| {
                            let mut cm = (*cm).clone();
                            cm.metadata.managed_fields = None;
                            (cm.metadata.resource_version.clone(), serde_json::to_vec(&cm))
                        })
                }
                RefKind::Secret => self
                    .secrets
                    .get(&ObjectRef::new(name).within(namespace))
                    .map(|secret| {
                        let mut secret = (*secret).clone();
                        secret.metadata.managed_fields = None;
                        (
                            secret.metadata.resource_version.clone(),
                            serde_json::to_vec(&secret),
                        )
                    }),
            };
            match found {
                Some((version, Ok(json))) => {
                    out.versions
                        .push(format!("{kind}/{name}@{}", version.unwrap_or_default()));
                    match kind {
                        RefKind::ConfigMap => out.config_maps.push(json),
                        RefKind::Secret => out.secrets.push(json),
                    }
                }
                Some((_, Err(e))) => out
                    .missing
                    .push(format!("{kind} {name:?} could not be serialized: {e}")),
                None if *required => out.missing.push(format!("{kind} {name:?}")),
                None => {}
            }
        }
        out
    }
}

#[derive(Clone, Debug)]
struct Record {
    uid: String,
    state: State,
}

/// Where each of a shard's Pods stands, keeping the shard's share of the orphan gauge in step with
/// every change (constant work per change, not a count over all Pods).
struct Records {
    by_key: HashMap<Key, Record>,
    orphans: Gauge,
}

impl Records {
    fn new(orphans: Gauge) -> Self {
        Self {
            by_key: HashMap::new(),
            orphans,
        }
    }

    fn get(&self, key: &Key) -> Option<&Record> {
        self.by_key.get(key)
    }

    fn iter(&self) -> impl Iterator<Item = (&Key, &Record)> {
        self.by_key.iter()
    }

    fn insert(&mut self, key: Key, record: Record) {
        let now_orphan = record.state == State::Orphaned;
        let was_orphan = self
            .by_key
            .insert(key, record)
            .is_some_and(|old| old.state == State::Orphaned);
        self.orphans.inc_by(i64::from(now_orphan) - i64::from(was_orphan));
    }

    fn remove(&mut self, key: &Key) -> Option<Record> {
        let old = self.by_key.remove(key);
        if old.as_ref().is_some_and(|r| r.state == State::Orphaned) {
            self.orphans.dec();
        }
        old
    }
}

/// What the status feed reports.
#[derive(Clone)]
enum StatusFeed {
    /// A new stream opened: a full initial state follows.
    Reset,
    /// One event.
    Event(PodStatusEvent),
}

fn key_of(pod: &Pod) -> Key {
    (pod.namespace().unwrap_or_default(), pod.name_any())
}

/// Fingerprint of what a Pod sync carries (labels, annotations, spec), so status writes and
/// unrelated updates do not cause host writes.
fn fingerprint(pod: &Pod) -> u64 {
    digest_of(&(&pod.metadata.labels, &pod.metadata.annotations, &pod.spec))
}

/// A hash of `value`'s JSON, taken as it is written: nothing is copied or allocated. Kept in this
/// process only; k8s-openapi types serialize deterministically (struct fields in order, maps
/// sorted), so equal values hash equal.
fn digest_of<T: serde::Serialize + ?Sized>(value: &T) -> u64 {
    use std::hash::Hasher as _;
    struct Hashing(std::collections::hash_map::DefaultHasher);
    impl std::io::Write for Hashing {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.write(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut hashing = Hashing(Default::default());
    serde_json::to_writer(&mut hashing, value).expect("plain data serializes");
    hashing.0.finish()
}

/// A Pod as ApplyPod carries it: no status, no managed fields; the spec is written from the
/// watched object as it is, not copied first.
fn apply_body(pod: &Pod) -> Vec<u8> {
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Sent<'a> {
        api_version: &'static str,
        kind: &'static str,
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
        #[serde(skip_serializing_if = "Option::is_none")]
        spec: Option<&'a k8s_openapi::api::core::v1::PodSpec>,
    }
    let mut metadata = pod.metadata.clone();
    metadata.managed_fields = None;
    serde_json::to_vec(&Sent {
        api_version: "v1",
        kind: "Pod",
        metadata,
        spec: pod.spec.as_ref(),
    })
    .expect("a Pod serializes")
}

fn reason_of(decision: &CheckPodResponse) -> CheckPodReason {
    CheckPodReason::try_from(decision.reason).unwrap_or(CheckPodReason::Unspecified)
}

/// The longest a failed Pod operation waits before its next attempt (each Pod backs off on its
/// own; a new Pod under the same name starts afresh).
const POD_RETRY_MAX: Duration = Duration::from_secs(5);

/// Whether a failed call is worth retrying: not when the host agent refused the request itself
/// (it would refuse it again). UNAUTHENTICATED is retried: the connection is dropped on it, and
/// the next one reads the token file again, so a rotated token heals it.
fn retryable(status: &tonic::Status) -> bool {
    !matches!(
        status.code(),
        tonic::Code::InvalidArgument | tonic::Code::PermissionDenied
    )
}

/// What a shard learns from the dispatcher.
#[derive(Clone)]
enum ShardInput {
    /// The shard's Pods after a (re)list of every virtual Pod.
    Relisted(HashMap<Key, Arc<Pod>>),
    /// A Pod of the shard was created or changed.
    Upsert(Arc<Pod>),
    /// A Pod of the shard was deleted.
    Removed(Key),
    /// Host Pod status (events of the shard's Pods, and every Reset / initial-state marker).
    Status(StatusFeed),
    /// The set of synced RuntimeClasses, or the tenant's Pod policy, changed.
    ClassesChanged,
    /// A ConfigMap or Secret was created, changed or deleted.
    ObjectChanged(ObjectKey),
    /// ConfigMaps or Secrets were (re)listed: Pods that reference any are re-evaluated.
    ObjectsListed(RefKind),
    /// A host Pod is gone: Pods refused because a host name was in use may now fit.
    NamesFreed,
}

/// The Pod syncer: one watch of every virtual Pod and one status stream, dispatched by key to
/// shards that each sync their Pods one at a time, so one Pod's operations stay in order while
/// different Pods progress in parallel.
pub struct PodSyncer {
    client: Client,
    target: HostAgentTarget,
    readiness: Readiness,
    sync_state: watch::Receiver<SyncState>,
    shards: Vec<Shard>,
    config_map_writer: reflector::store::Writer<ConfigMap>,
    secret_writer: reflector::store::Writer<Secret>,
    board: PodBoard,
    watches: rcsync_core::admin::WatchHealth,
}

/// One shard's state and loop.
struct Shard {
    client: Client,
    target: HostAgentTarget,
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
    pod_client: Option<PodClient>,
    class_client: Option<crate::connect::ClassClient>,
}

impl PodSyncer {
    /// A syncer for the virtual cluster behind `client`, with `workers` shards (at least one),
    /// publishing where each Pod stands to `board`.
    pub fn new(
        client: Client,
        target: HostAgentTarget,
        metrics: Metrics,
        readiness: Readiness,
        sync_state: watch::Receiver<SyncState>,
        workers: usize,
        board: PodBoard,
    ) -> Self {
        let reporter = Reporter {
            controller: REPORTER.into(),
            instance: Some(format!("{REPORTER}-{}", target.tenant)),
        };
        let recorder = Recorder::new(client.clone(), reporter);
        let (config_maps, config_map_writer) = reflector::store();
        let (secrets, secret_writer) = reflector::store();
        let objects = ObjectStores { config_maps, secrets };
        let shards = (0..workers.max(1))
            .map(|_| {
                Shard::new(
                    client.clone(),
                    target.clone(),
                    sync_state.clone(),
                    metrics.clone(),
                    recorder.clone(),
                    objects.clone(),
                    board.clone(),
                )
            })
            .collect();
        Self {
            client,
            target,
            readiness,
            sync_state,
            shards,
            config_map_writer,
            secret_writer,
            board,
            watches: metrics.watches.clone(),
        }
    }

    /// Where each Pod stands (synced, blocked, waiting, orphaned, and why), kept current.
    pub fn board(&self) -> PodBoard {
        self.board.clone()
    }

    /// Runs until `shutdown`. Dropping the future (aborting its task) stops every task it
    /// started at once: the shards and the status feed live in its `JoinSet`.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let mut children = tokio::task::JoinSet::new();
        self.dispatch(&mut children, shutdown).await;
        // After shutdown the shards finish what they hold; wait for them.
        while children.join_next().await.is_some() {}
    }

    /// Watches Pods and referenced objects and feeds the shards (started into `children`).
    async fn dispatch(
        mut self,
        children: &mut tokio::task::JoinSet<()>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let api: Api<Pod> = Api::all(self.client.clone());
        let mut pod_events = self
            .watches
            .follow(
                "pods".into(),
                watcher::watcher(api, watcher::Config::default()).retry_with_backoff(),
            )
            .boxed();
        let mut relist: Option<HashMap<Key, Arc<Pod>>> = None;
        let watches = &self.watches;
        let mut config_map_events = object_events(&self.client, self.config_map_writer, watches);
        let mut secret_events = object_events(&self.client, self.secret_writer, watches);

        let (status_tx, mut status_rx) = mpsc::channel(256);
        children.spawn(status_feed(self.target.clone(), status_tx, shutdown.clone()));
        let policy_of = |s: &SyncState| (s.synced.clone(), s.pod_policy.clone());
        let mut synced_classes = policy_of(&self.sync_state.borrow());
        let mut inboxes = Vec::new();
        for shard in std::mem::take(&mut self.shards) {
            let (tx, rx) = mpsc::channel(1024);
            inboxes.push(tx);
            children.spawn(shard.run(rx, shutdown.clone()));
        }
        let shard_of = |key: &Key| {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            key.hash(&mut h);
            (h.finish() % inboxes.len() as u64) as usize
        };
        let mut pods_listed = false;
        loop {
            let mut sends: Vec<(usize, ShardInput)> = Vec::new();
            tokio::select! {
                _ = shutdown.changed() => return,
                event = pod_events.next() => match event {
                    None => return,
                    Some(Err(e)) => tracing::warn!(error = %e, "watching virtual Pods failed; retrying with backoff"),
                    Some(Ok(Event::Init)) => relist = Some(HashMap::new()),
                    Some(Ok(Event::InitApply(pod))) => {
                        if let Some(r) = &mut relist {
                            r.insert(key_of(&pod), Arc::new(pod));
                        }
                    }
                    Some(Ok(Event::InitDone)) => {
                        let mut parts: Vec<HashMap<Key, Arc<Pod>>> = vec![HashMap::new(); inboxes.len()];
                        for (key, pod) in relist.take().unwrap_or_default() {
                            parts[shard_of(&key)].insert(key, pod);
                        }
                        sends.extend(parts.into_iter().enumerate().map(|(i, part)| (i, ShardInput::Relisted(part))));
                        if !pods_listed {
                            pods_listed = true;
                            self.readiness.set(PODS_LISTED, true);
                        }
                    }
                    Some(Ok(Event::Apply(pod))) => sends.push((shard_of(&key_of(&pod)), ShardInput::Upsert(Arc::new(pod)))),
                    Some(Ok(Event::Delete(pod))) => {
                        let key = key_of(&pod);
                        sends.push((shard_of(&key), ShardInput::Removed(key)));
                    }
                },
                event = config_map_events.next() => {
                    let Some(event) = event else { return };
                    if let Some(change) = object_change(RefKind::ConfigMap, event) {
                        sends.extend((0..inboxes.len()).map(|i| (i, change.clone())));
                    }
                }
                event = secret_events.next() => {
                    let Some(event) = event else { return };
                    if let Some(change) = object_change(RefKind::Secret, event) {
                        sends.extend((0..inboxes.len()).map(|i| (i, change.clone())));
                    }
                }
                feed = status_rx.recv() => match feed {
                    None => return,
                    Some(StatusFeed::Event(event))
                        if PodStatusEventType::try_from(event.r#type) != Ok(PodStatusEventType::InitialStateComplete) =>
                    {
                        if PodStatusEventType::try_from(event.r#type) == Ok(PodStatusEventType::Deleted) {
                            sends.extend((0..inboxes.len()).map(|i| (i, ShardInput::NamesFreed)));
                        }
                        let key = (event.pod_namespace.clone(), event.pod_name.clone());
                        sends.push((shard_of(&key), ShardInput::Status(StatusFeed::Event(event))));
                    }
                    Some(feed) => sends.extend((0..inboxes.len()).map(|i| (i, ShardInput::Status(feed.clone())))),
                },
                changed = self.sync_state.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let now = policy_of(&self.sync_state.borrow_and_update());
                    if now != synced_classes {
                        synced_classes = now;
                        sends.extend((0..inboxes.len()).map(|i| (i, ShardInput::ClassesChanged)));
                    }
                }
            }
            for (i, input) in sends {
                if inboxes[i].send(input).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Every object of a kind in the virtual cluster, kept in `writer`'s store, as watch events.
fn object_events<K>(
    client: &Client,
    writer: reflector::store::Writer<K>,
    watches: &rcsync_core::admin::WatchHealth,
) -> futures::stream::BoxStream<'static, Result<Event<K>, watcher::Error>>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    watches
        .follow(
            K::plural(&()).into_owned(),
            reflector::reflector(
                writer,
                watcher::watcher(Api::<K>::all(client.clone()), watcher::Config::default()),
            )
            .retry_with_backoff(),
        )
        .boxed()
}

/// What a ConfigMap or Secret watch event means to the shards.
fn object_change<K: kube::Resource>(
    kind: RefKind,
    event: Result<Event<K>, watcher::Error>,
) -> Option<ShardInput> {
    match event {
        Err(e) => {
            tracing::warn!(error = %e, %kind, "watching virtual objects failed; retrying with backoff");
            None
        }
        Ok(Event::Apply(object) | Event::Delete(object)) => Some(ShardInput::ObjectChanged((
            kind,
            object.meta().namespace.clone().unwrap_or_default(),
            object.meta().name.clone().unwrap_or_default(),
        ))),
        Ok(Event::InitDone) => Some(ShardInput::ObjectsListed(kind)),
        Ok(Event::Init | Event::InitApply(_)) => None,
    }
}

fn kind_index(kind: RefKind) -> usize {
    match kind {
        RefKind::ConfigMap => 0,
        RefKind::Secret => 1,
    }
}

impl Shard {
    fn new(
        client: Client,
        target: HostAgentTarget,
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
            target,
            records: Records::new(metrics.pods_orphaned.clone()),
            metrics,
            pods: HashMap::new(),
            host: HashMap::new(),
            host_staging: None,
            pods_listed: false,
            host_listed: false,
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
            pod_client: None,
            class_client: None,
        }
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
        let delay = entry.1.next_delay();
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
        use tonic_types::StatusExt as _;
        let delay = status
            .get_details_retry_info()
            .and_then(|info| info.retry_delay)
            .unwrap_or(Duration::from_secs(1));
        tracing::debug!(?delay, %status, "over the tenant's Pod sync rate: pausing");
        self.metrics.pods_rate_limited_total.inc();
        self.paused_until = Some(Instant::now() + delay);
        true
    }

    fn next_retry(&self) -> Option<Instant> {
        self.retries.values().map(|(at, _)| *at).min()
    }

    /// Syncs the shard's Pods as the dispatcher reports them, until `shutdown`.
    async fn run(mut self, mut inbox: mpsc::Receiver<ShardInput>, mut shutdown: watch::Receiver<bool>) {
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
            tokio::select! {
                _ = shutdown.changed() => return,
                input = inbox.recv() => match input {
                    None => return,
                    Some(ShardInput::Relisted(fresh)) => {
                        let gone: Vec<Key> = self.pods.keys().filter(|k| !fresh.contains_key(*k)).cloned().collect();
                        self.pods = fresh;
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
                        }
                    }
                    Some(ShardInput::Upsert(pod)) => {
                        let key = key_of(&pod);
                        if self.pods.get(&key).is_some_and(|old| old.metadata.uid != pod.metadata.uid) {
                            // A new Pod under an old name does not inherit the old one's backoff.
                            self.retries.remove(&key);
                        }
                        self.pods.insert(key.clone(), pod);
                        self.index_references(&key);
                        self.enqueue(key);
                    }
                    Some(ShardInput::Removed(key)) => {
                        self.pods.remove(&key);
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
                    }
                    Some(ShardInput::Status(StatusFeed::Reset)) => self.host_staging = Some(HashMap::new()),
                    Some(ShardInput::Status(StatusFeed::Event(event))) => {
                        let key = (event.pod_namespace.clone(), event.pod_name.clone());
                        self.on_status(event).await;
                        self.report(&key);
                    }
                    Some(ShardInput::ClassesChanged) => {
                        let waiting: Vec<Key> = self
                            .records
                            .iter()
                            .filter(|(_, r)| !matches!(r.state, State::Synced(_)))
                            .map(|(k, _)| k.clone())
                            .collect();
                        tracing::debug!(pods = waiting.len(), "synced RuntimeClasses changed: re-evaluating blocked and orphaned Pods");
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
                _ = async { tokio::time::sleep_until(paused.unwrap_or_else(Instant::now)).await }, if paused.is_some() => {}
                _ = std::future::ready(()), if ready => {
                    if let Some(key) = self.queue.pop_front() {
                        self.queued.remove(&key);
                        let ok = self.process(&key).await;
                        self.report(&key);
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
        match self.records.get(key).map(|r| &r.state) {
            Some(State::Synced(_)) => board.insert(key.clone(), ("synced", String::new())),
            Some(State::Blocked(why)) => board.insert(key.clone(), ("blocked", why.clone())),
            Some(State::Waiting(why)) => board.insert(key.clone(), ("waiting", why.clone())),
            Some(State::Orphaned) => board.insert(
                key.clone(),
                ("orphaned", "its runtime class is no longer synced".to_string()),
            ),
            None => board.remove(key),
        };
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
        let Some(spec) = self.pods.get(key).and_then(|p| p.spec.as_ref()) else {
            return;
        };
        let objects: Vec<ObjectKey> = pod_refs::references(spec)
            .into_keys()
            .map(|(kind, name)| (kind, key.0.clone(), name))
            .collect();
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

    async fn clients(&mut self) -> Option<(crate::connect::ClassClient, PodClient)> {
        if self.pod_client.is_none() {
            match self.target.connect().await {
                Ok((classes, pods)) => {
                    self.class_client = Some(classes);
                    self.pod_client = Some(pods);
                }
                Err(e) => {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "host agent unreachable: Pods are not synced meanwhile"
                    );
                    return None;
                }
            }
        }
        Some((self.class_client.clone()?, self.pod_client.clone()?))
    }

    /// Drops the connection after errors a new one may cure: the host agent gone or restarted,
    /// and a refused token (the token file is re-read at every connect, so a rotated token is
    /// picked up).
    fn drop_clients_on(&mut self, status: &tonic::Status) {
        if matches!(
            status.code(),
            tonic::Code::Unavailable
                | tonic::Code::Unknown
                | tonic::Code::Internal
                | tonic::Code::Unauthenticated
        ) {
            self.pod_client = None;
            self.class_client = None;
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
        match pods.delete_pod(request).await {
            Ok(answer) => {
                tracing::info!(namespace = %key.0, pod = %key.1, deleted = answer.into_inner().deleted, "deleted host Pod of a deleted virtual Pod");
                true
            }
            Err(status) => {
                if !self.note_rate_limited(&status) {
                    tracing::warn!(namespace = %key.0, pod = %key.1, %status, "DeletePod failed");
                }
                self.drop_clients_on(&status);
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
        if pod.metadata.deletion_timestamp.is_some() {
            if host_has_it {
                return self
                    .delete_on_host(key, &uid, pod.metadata.deletion_grace_period_seconds)
                    .await;
            }
            return self.finalize_virtual(key, pod).await;
        }
        let references = pod.spec.as_ref().map(pod_refs::references).unwrap_or_default();
        let referenced = self.objects.collect(&key.0, &references);
        let fingerprint = if referenced.versions.is_empty() {
            fingerprint(pod)
        } else {
            digest_of(&(fingerprint(pod), &referenced.versions))
        };
        if let Some(record) = self.records.get(key)
            && record.state == State::Synced(fingerprint)
            && host_has_it
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
            match classes.check_pod(request).await {
                Ok(answer) => Some(answer.into_inner()),
                Err(status) => {
                    tracing::warn!(namespace = %key.0, pod = %key.1, %status, "CheckPod failed: not syncing (fail closed)");
                    self.drop_clients_on(&status);
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
                pod_json: apply_body(pod),
                config_maps_json: referenced.config_maps,
                secrets_json: referenced.secrets,
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
            match pods.apply_pod(request).await {
                Ok(answer) => {
                    let answer = answer.into_inner();
                    if let Some(refusal) = answer.refusal {
                        return self.on_refused(key, pod, &uid, refusal).await;
                    }
                    if answer.applied {
                        let was_orphan = self.records.get(key).is_some_and(|r| r.state == State::Orphaned);
                        self.records.insert(
                            key.clone(),
                            Record {
                                uid: uid.clone(),
                                state: State::Synced(fingerprint),
                            },
                        );
                        self.refusals.remove(key);
                        self.name_waiters.remove(key);
                        self.metrics.pods_synced_total.inc();
                        tracing::info!(
                            namespace = %key.0, pod = %key.1, host = %answer.host_name, created = answer.created,
                            resumed = was_orphan, "synced Pod to the host"
                        );
                        return true;
                    }
                    match answer.decision {
                        Some(decision) if !decision.allowed => decision,
                        other => {
                            tracing::warn!(namespace = %key.0, pod = %key.1, decision = ?other, "ApplyPod neither applied nor refused the Pod; retrying");
                            return false;
                        }
                    }
                }
                Err(status) => {
                    if self.note_rate_limited(&status) {
                        return false;
                    }
                    tracing::warn!(namespace = %key.0, pod = %key.1, %status, "ApplyPod failed");
                    self.drop_clients_on(&status);
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
        let message = format!("did not sync pod {:?} to host: {}", key.1, refusal.message);
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
                // Forget the Blocked state so the retry records the event again.
                self.records.remove(&key_of(pod));
                false
            }
        }
    }

    /// Completes the deletion of a virtual Pod whose host Pod is gone.
    async fn finalize_virtual(&mut self, key: &Key, pod: &Pod) -> bool {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &key.0);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: pod.uid(),
                resource_version: None,
            }),
            ..Default::default()
        };
        match api.delete(&key.1, &params).await {
            Ok(_) => true,
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => true,
            Err(e) => {
                tracing::warn!(namespace = %key.0, pod = %key.1, error = %e, "could not finish deleting the virtual Pod");
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

    async fn on_status(&mut self, event: PodStatusEvent) {
        let key = (event.pod_namespace.clone(), event.pod_name.clone());
        match PodStatusEventType::try_from(event.r#type).unwrap_or(PodStatusEventType::Unspecified) {
            PodStatusEventType::Updated => {
                self.host.insert(key.clone(), event.pod_uid.clone());
                if let Some(staging) = &mut self.host_staging {
                    staging.insert(key.clone(), event.pod_uid.clone());
                }
                if self.copy_status(&key, &event).await {
                    self.unsent_status.remove(&key);
                } else {
                    // Nothing is lost: the Pod is retried with backoff, and the retry writes the
                    // latest status the host sent.
                    self.unsent_status.insert(key.clone(), event);
                    self.retry_later(key);
                }
            }
            PodStatusEventType::Deleted => {
                self.unsent_status.remove(&key);
                self.host.remove(&key);
                self.on_host_gone(&key, &event.pod_uid).await;
            }
            PodStatusEventType::InitialStateComplete => {
                if let Some(staging) = self.host_staging.take() {
                    let vanished: Vec<(Key, String)> = self
                        .host
                        .iter()
                        .filter(|(k, _)| !staging.contains_key(*k))
                        .map(|(k, u)| (k.clone(), u.clone()))
                        .collect();
                    self.host = staging;
                    for (key, uid) in vanished {
                        self.on_host_gone(&key, &uid).await;
                    }
                }
                if !self.host_listed {
                    self.host_listed = true;
                    tracing::info!(host_pods = self.host.len(), "listed host Pods");
                }
                self.collect_garbage();
            }
            PodStatusEventType::Unspecified => {}
        }
    }

    /// Writes a host status into the virtual Pod it was made for; false when that write failed
    /// (true when there was nothing to write).
    async fn copy_status(&mut self, key: &Key, event: &PodStatusEvent) -> bool {
        let Some(pod) = self.pods.get(key).cloned() else {
            return true;
        };
        if pod.uid().as_deref() != Some(event.pod_uid.as_str()) || pod.metadata.deletion_timestamp.is_some() {
            return true;
        }
        if self.records.get(key).is_some_and(|r| r.state == State::Orphaned) {
            return true;
        }
        let Ok(status) = serde_json::from_slice::<serde_json::Value>(&event.status_json) else {
            tracing::warn!(namespace = %key.0, pod = %key.1, "the host agent sent a status that is not JSON");
            return true;
        };
        if status.is_null() || serde_json::to_value(&pod.status).ok().as_ref() == Some(&status) {
            return true;
        }
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &key.0);
        let patch = serde_json::json!({"status": status});
        match api
            .patch_status(&key.1, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                self.metrics.statuses_copied_total.inc();
                true
            }
            Err(e) => {
                tracing::warn!(namespace = %key.0, pod = %key.1, error = %e, "copying the host status failed; retrying");
                false
            }
        }
    }

    async fn on_host_gone(&mut self, key: &Key, uid: &str) {
        let Some(pod) = self.pods.get(key).cloned() else {
            return;
        };
        if pod.uid().as_deref() != Some(uid) {
            return;
        }
        if pod.metadata.deletion_timestamp.is_some() {
            self.finalize_virtual(key, &pod).await;
            return;
        }
        if !self
            .records
            .get(key)
            .is_some_and(|r| matches!(r.state, State::Synced(_)))
        {
            return;
        }
        let note = format!(
            "the host pod of {:?} was deleted; deleting the virtual pod",
            key.1
        );
        tracing::warn!(namespace = %key.0, pod = %key.1, "{note}");
        self.publish(&pod, EventType::Warning, "SyncWarning", "Delete", note)
            .await;
        self.records.remove(key);
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &key.0);
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: pod.uid(),
                resource_version: None,
            }),
            ..Default::default()
        };
        if let Err(e) = api.delete(&key.1, &params).await {
            tracing::warn!(namespace = %key.0, pod = %key.1, error = %e, "could not delete the virtual Pod of a deleted host Pod");
        }
    }
}

/// Keeps a WatchPodStatus stream open, reconnecting with backoff, and forwards its events.
async fn status_feed(
    target: HostAgentTarget,
    tx: mpsc::Sender<StatusFeed>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(250), crate::connect::RECONNECT_MAX);
    loop {
        let session = async {
            let (_, mut pods) = target.connect().await?;
            let mut stream = pods
                .watch_pod_status(WatchPodStatusRequest {})
                .await?
                .into_inner();
            tx.send(StatusFeed::Reset).await?;
            while let Some(event) = stream.message().await? {
                backoff.reset();
                tx.send(StatusFeed::Event(event)).await?;
            }
            anyhow::Ok(())
        };
        tokio::select! {
            _ = shutdown.changed() => return,
            result = session => {
                if let Err(e) = result {
                    tracing::warn!(error = format!("{e:#}"), "WatchPodStatus stream failed");
                }
            }
        }
        if tx.is_closed() {
            return;
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_pod_carries_the_pod_without_its_status_and_managed_fields() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "namespace": "default", "uid": "u-1", "labels": {"app": "web"},
                         "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
            "spec": {"containers": [{"name": "app", "image": "registry.example/app:1.0"}]},
            "status": {"phase": "Running"},
        }))
        .unwrap();
        let sent: Pod = serde_json::from_slice(&apply_body(&pod)).unwrap();
        let mut expected = pod.clone();
        expected.status = None;
        expected.metadata.managed_fields = None;
        assert_eq!(sent, expected);
    }

    #[test]
    fn a_pod_fingerprint_follows_labels_annotations_and_spec_not_status() {
        let pod = |labels: serde_json::Value, phase: &str, image: &str| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "web", "labels": labels, "resourceVersion": phase},
                "spec": {"containers": [{"name": "app", "image": image}]},
                "status": {"phase": phase},
            }))
            .unwrap()
        };
        let base = fingerprint(&pod(serde_json::json!({"a": "1", "b": "2"}), "Pending", "i:1"));
        // Map order in the source does not matter; status and resourceVersion do not count.
        assert_eq!(
            base,
            fingerprint(&pod(serde_json::json!({"b": "2", "a": "1"}), "Running", "i:1"))
        );
        assert_ne!(
            base,
            fingerprint(&pod(serde_json::json!({"a": "1", "b": "3"}), "Pending", "i:1"))
        );
        assert_ne!(
            base,
            fingerprint(&pod(serde_json::json!({"a": "1", "b": "2"}), "Pending", "i:2"))
        );
    }
}
