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
//!  SyncState.synced or the sync switch changes ──► re-queue Blocked, Waiting and Orphaned Pods
//!  SyncState.pod_policy changes ──► re-queue every Pod: what the host writes (copied annotations,
//!     tolerations) follows the policy, so synced Pods are applied again too
//!  watch ConfigMaps, Secrets ──► change ──► re-queue the Pods referencing it (copies stay current)
//!  WatchPodStatus ──► host status ──► virtual Pod status (a failed write is retried with the Pod's backoff)
//!                   host Pod gone ──► event + delete virtual Pod
//!                   host event about the Pod ──► event about the virtual Pod (`host_events`)
//!  --pod-api-server: token volumes ──► tokens of the virtual cluster in a Secret sent with the Pod,
//!                   renewed at 80% of their lifetime (`tokens`)
//!  virtual Pod deleted ──► DeletePod (UID-checked by the host agent)
//! ```
//!
//! Nothing is decided before both the virtual Pods and the host Pods were listed, and nothing syncs
//! while the host agent is unreachable (fail closed); failed work is retried with backoff.
//!
//! Here: the [`PodSyncer`], which watches and dispatches by Pod to its shards, and what they share.
//! `shard`: one shard's Pods and the decisions above (`shard/host_status`: what the host says
//! about them); `tokens`: service account tokens for Pods on the host. The WatchPodStatus stream
//! is kept open by `crate::host_calls::stream_feed`, on a connection of its own. The host's events about synced Pods are written by `crate::host_events`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt as _};
use prometheus_client::metrics::gauge::Gauge;
use rcsync_core::admin::Readiness;
use rcsync_core::gates;
use rcsync_core::kube_client::RetryWithBackoff as _;
use rcsync_core::pod_refs::{self, RefKind};
use rcsync_proto::v1::{
    CheckPodReason, CheckPodResponse, HostEvents, PodStatusEvent, PodStatusEventType, WatchPodStatusRequest,
};
use tokio::sync::{mpsc, watch};

use crate::classes::SyncState;
use crate::connect::{HostAgentTarget, SharedClients};
use crate::metrics::Metrics;

mod shard;
pub mod tokens;

use crate::host_calls::{self, Feed};
use crate::host_events::host_event_writer;
use shard::Shard;

/// Readiness check: the virtual cluster's Pods were listed.
pub const PODS_LISTED: &str = "virtual-pods-listed";
/// The component that reports Pod sync events, as vCluster's syncer names it.
pub const REPORTER: &str = "pod-syncer";

/// `(namespace, name)` of a virtual object (a Pod, a PodDisruptionBudget).
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
    /// Was synced; its host Pod terminates or went (evicted by a drain, deleted on the host): the
    /// virtual Pod is deleted too, as vCluster does, so its controller makes a new one. Never
    /// applied again.
    HostGone,
}

/// A referenced object: kind, namespace, name.
type ObjectKey = (RefKind, String, String);

/// The virtual cluster's ConfigMaps and Secrets, kept by watches and shared by every shard.
#[derive(Clone)]
struct ObjectStores {
    config_maps: Store<ConfigMap>,
    secrets: Store<Secret>,
}

impl ObjectStores {
    /// Whether the virtual cluster holds the Secret `namespace/name`.
    fn secret_exists(&self, namespace: &str, name: &str) -> bool {
        self.secrets
            .get(&ObjectRef::new(name).within(namespace))
            .is_some()
    }
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
                RefKind::ConfigMap => self
                    .config_maps
                    .get(&ObjectRef::new(name).within(namespace))
                    .map(|cm| (cm.metadata.resource_version.clone(), serde_json::to_vec(&*cm))),
                RefKind::Secret => self
                    .secrets
                    .get(&ObjectRef::new(name).within(namespace))
                    .map(|secret| {
                        (
                            secret.metadata.resource_version.clone(),
                            serde_json::to_vec(&*secret),
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

/// A map from object (a shard's Pods, the budget syncer's budgets) to `V` whose entries that
/// `counts` are its share of a gauge, kept in step with every change (constant work per change,
/// not a count over all objects) and given back when the map goes: a term ends by dropping its
/// tasks, and a replica that leads again counts anew.
pub(crate) struct GaugedMap<V> {
    by_key: HashMap<Key, V>,
    gauge: Gauge,
    counts: fn(&V) -> bool,
}

impl<V> GaugedMap<V> {
    pub(crate) fn new(gauge: Gauge, counts: fn(&V) -> bool) -> Self {
        Self {
            by_key: HashMap::new(),
            gauge,
            counts,
        }
    }

    pub(crate) fn get(&self, key: &Key) -> Option<&V> {
        self.by_key.get(key)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&Key, &V)> {
        self.by_key.iter()
    }

    pub(crate) fn insert(&mut self, key: Key, value: V) {
        let now = (self.counts)(&value);
        let was = self
            .by_key
            .insert(key, value)
            .is_some_and(|old| (self.counts)(&old));
        self.gauge.inc_by(i64::from(now) - i64::from(was));
    }

    pub(crate) fn remove(&mut self, key: &Key) -> Option<V> {
        let old = self.by_key.remove(key);
        if old.as_ref().is_some_and(self.counts) {
            self.gauge.dec();
        }
        old
    }
}

impl<V> Drop for GaugedMap<V> {
    fn drop(&mut self) {
        let counted = self.by_key.values().filter(|v| (self.counts)(v)).count();
        self.gauge.dec_by(i64::try_from(counted).unwrap_or(i64::MAX));
    }
}

/// Where each of a shard's Pods stands; its orphans are its share of `rcsync_pods_orphaned`.
type Records = GaugedMap<Record>;

impl Records {
    fn with_orphans(orphans: Gauge) -> Self {
        Self::new(orphans, |record| record.state == State::Orphaned)
    }
}

/// The shard's Pods whose last try failed, and why; each is its share of `rcsync_pods_failing`.
type Failing = GaugedMap<String>;

impl Failing {
    fn with_failing(failing: Gauge) -> Self {
        Self::new(failing, |_| true)
    }
}

/// What the status feed (the WatchPodStatus stream, a [`host_calls::stream_feed`]) reports, as the
/// shards take it.
#[derive(Clone)]
enum StatusFeed {
    /// A new stream opened: a full initial state follows.
    Reset,
    /// One event.
    Event(Box<PodStatusEvent>),
}

fn key_of(pod: &Pod) -> Key {
    (pod.namespace().unwrap_or_default(), pod.name_any())
}

/// Fingerprint of what a Pod sync carries (labels, annotations, spec, the conditions of its
/// readiness gates), so status writes and unrelated updates do not cause host writes.
fn fingerprint(pod: &Pod) -> u64 {
    digest_of(&(
        &pod.metadata.labels,
        &pod.metadata.annotations,
        &pod.spec,
        gates::readiness_conditions(pod),
    ))
}

/// A hash of `value`'s JSON, taken as it is written: nothing is copied or allocated. Kept in this
/// process only; k8s-openapi types serialize deterministically (struct fields in order, maps
/// sorted), so equal values hash equal.
pub(crate) fn digest_of<T: serde::Serialize + ?Sized>(value: &T) -> u64 {
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

/// A Pod as ApplyPod carries it: no managed fields, and of its status only the conditions of its
/// readiness gates (the tenant's controllers set them; the host Pod needs them to be Ready);
/// written from the watched object as it is, not copied first (the watch has already dropped its
/// managed fields).
fn apply_body(pod: &Pod) -> Vec<u8> {
    use k8s_openapi::api::core::v1::PodCondition;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Sent<'a> {
        api_version: &'static str,
        kind: &'static str,
        metadata: std::borrow::Cow<'a, ObjectMeta>,
        #[serde(skip_serializing_if = "Option::is_none")]
        spec: Option<&'a k8s_openapi::api::core::v1::PodSpec>,
        #[serde(skip_serializing_if = "Option::is_none")]
        status: Option<GateStatus>,
    }
    #[derive(serde::Serialize)]
    struct GateStatus {
        conditions: Vec<PodCondition>,
    }
    let gates = gates::readiness_conditions(pod);
    let metadata = match pod.metadata.managed_fields {
        None => std::borrow::Cow::Borrowed(&pod.metadata),
        Some(_) => std::borrow::Cow::Owned(ObjectMeta {
            managed_fields: None,
            ..pod.metadata.clone()
        }),
    };
    serde_json::to_vec(&Sent {
        api_version: "v1",
        kind: "Pod",
        metadata,
        spec: pod.spec.as_ref(),
        status: (!gates.is_empty()).then_some(GateStatus { conditions: gates }),
    })
    .expect("a Pod serializes")
}

fn reason_of(decision: &CheckPodResponse) -> CheckPodReason {
    CheckPodReason::try_from(decision.reason).unwrap_or(CheckPodReason::Unspecified)
}

/// The longest a failed Pod operation waits before its next attempt (each Pod backs off on its
/// own; a new Pod under the same name starts afresh).
const POD_RETRY_MAX: Duration = Duration::from_secs(5);

/// The longest a Pod the host refused as it stands (`HOST_POD_REFUSED`: a webhook, validation, a
/// quota that wants requests set) waits before its next attempt. Retrying it every few seconds
/// would only load the host API server with refused creates; an edit of the Pod, a change of the
/// tenant's Pod policy or of an object the Pod references tries it again at once, and a change on
/// the host (a webhook reconfigured, a LimitRange added) is picked up within this.
const POD_REFUSED_RETRY_MAX: Duration = Duration::from_secs(60);

/// Whether a new version of a Pod may get a different answer from the host: another Pod under
/// the same name, or its spec, labels or annotations edited (not its status, which this agent
/// writes).
fn changed_for_the_host(old: &Pod, new: &Pod) -> bool {
    old.metadata.uid != new.metadata.uid
        || old.metadata.labels != new.metadata.labels
        || old.metadata.annotations != new.metadata.annotations
        || old.spec != new.spec
}

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
    /// The set of synced RuntimeClasses changed, or the sync was turned on or off.
    ClassesChanged,
    /// The tenant's Pod policy changed (not its first value).
    PodPolicyChanged,
    /// A ConfigMap or Secret was created, changed or deleted.
    ObjectChanged(ObjectKey),
    /// ConfigMaps or Secrets were (re)listed: Pods that reference any are re-evaluated.
    ObjectsListed(RefKind),
    /// A host Pod is gone: Pods refused because a host name was in use may now fit, and one the
    /// host's quota refused.
    NamesFreed,
    /// A host Pod ended: one Pod the host's quota refused may now fit.
    QuotaRoomMade,
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
    metrics: Metrics,
    host_events: HostEvents,
    pod_api_server: Option<tokens::PodApiServer>,
}

impl PodSyncer {
    /// A syncer for the virtual cluster behind `client`, with `workers` shards (at least one)
    /// calling the host agent over `connection`, publishing where each Pod stands to `board`.
    pub fn new(
        client: Client,
        connection: Arc<SharedClients>,
        metrics: Metrics,
        readiness: Readiness,
        sync_state: watch::Receiver<SyncState>,
        workers: usize,
        board: PodBoard,
    ) -> Self {
        let target = connection.target().clone();
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
                    connection.clone(),
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
            metrics,
            host_events: HostEvents::All,
            pod_api_server: None,
        }
    }

    /// Where Pods on the host reach the virtual cluster's API server: Pods with service account
    /// token volumes then get tokens of the virtual cluster (see [`tokens`]); without it the host
    /// agent drops those volumes.
    pub fn with_pod_api_server(mut self, api_server: Option<tokens::PodApiServer>) -> Self {
        self.pod_api_server = api_server;
        self
    }

    /// Which events the host records about synced Pods to copy to the virtual Pods (all unless
    /// told otherwise).
    pub fn with_host_events(mut self, host_events: HostEvents) -> Self {
        self.host_events = host_events;
        self
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
                watcher::watcher(api, watcher::Config::default())
                    .modify(without_managed_fields)
                    .retry_with_backoff(),
            )
            .boxed();
        let mut relist: Option<HashMap<Key, Arc<Pod>>> = None;
        let watches = &self.watches;
        let mut config_map_events = object_events(&self.client, self.config_map_writer, watches);
        let mut secret_events = object_events(&self.client, self.secret_writer, watches);

        let (status_tx, mut status_rx) = mpsc::channel(256);
        let (target, host_events) = (self.target.clone(), self.host_events as i32);
        children.spawn(host_calls::stream_feed(
            // A connection of its own: statuses read slowly (the shards busy) then hold back no
            // call's response within the shared connection's HTTP/2 window.
            move || {
                let target = target.clone();
                async move { Ok(target.connect().await?.1) }
            },
            "WatchPodStatus",
            move |mut pods| async move { pods.watch_pod_status(WatchPodStatusRequest { host_events }).await },
            status_tx,
            shutdown.clone(),
        ));
        let host_event_queue = (self.host_events != HostEvents::Unspecified).then(|| {
            let (queue, writer) =
                host_event_writer(self.client.clone(), self.metrics.clone(), shutdown.clone());
            children.spawn(writer);
            queue
        });
        // What the host offers: the sync's switch and the classes it holds. A change of either
        // changes which Pods may sync.
        let (mut offered, mut pod_policy) = {
            let state = self.sync_state.borrow();
            ((state.enabled, state.synced.clone()), state.pod_policy.clone())
        };
        let mut inboxes = Vec::new();
        let (room_tx, mut room_rx) = mpsc::unbounded_channel();
        for mut shard in std::mem::take(&mut self.shards) {
            shard.host_events = host_event_queue.clone();
            shard.pod_api_server = self.pod_api_server.clone();
            let (tx, rx) = mpsc::channel(1024);
            inboxes.push(tx);
            children.spawn(shard.run(rx, room_tx.clone(), shutdown.clone()));
        }
        drop(room_tx);
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
                Some(()) = room_rx.recv() => {
                    sends.extend((0..inboxes.len()).map(|i| (i, ShardInput::QuotaRoomMade)));
                }
                feed = status_rx.recv() => match feed.map(|feed| match feed {
                    Feed::Opened => StatusFeed::Reset,
                    Feed::Message(event) => StatusFeed::Event(Box::new(event)),
                }) {
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
                    let state = self.sync_state.borrow_and_update().clone();
                    // The switch alone counts: turned off with no class held (or on with none
                    // offered yet), the denied Pods may now sync (or not).
                    if (state.enabled, &state.synced) != (offered.0, &offered.1) {
                        offered = (state.enabled, state.synced);
                        sends.extend((0..inboxes.len()).map(|i| (i, ShardInput::ClassesChanged)));
                    }
                    if state.pod_policy != pod_policy {
                        // The first version (at start) changes nothing already written: every Pod
                        // is applied once at start anyway.
                        let first = pod_policy.is_empty();
                        pod_policy = state.pod_policy;
                        if !first {
                            tracing::info!("the tenant's Pod policy changed: applying every Pod again");
                            sends.extend((0..inboxes.len()).map(|i| (i, ShardInput::PodPolicyChanged)));
                        }
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

/// Drops an object's managed fields as its watch delivers it: nothing here reads them, and they
/// are often the largest part of an object's metadata (kept per Pod, ConfigMap and Secret, and
/// copied with each Pod sent to the host agent).
fn without_managed_fields<K: kube::Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
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
                watcher::watcher(Api::<K>::all(client.clone()), watcher::Config::default())
                    .modify(without_managed_fields),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> Key {
        ("default".to_string(), name.to_string())
    }

    #[test]
    fn a_shard_s_orphans_and_failing_pods_leave_their_gauges_when_the_shard_goes() {
        let (orphans, failing) = (Gauge::default(), Gauge::default());
        // Another shard's share stays.
        orphans.set(2);
        failing.set(1);
        {
            let mut records = Records::with_orphans(orphans.clone());
            let orphan = |uid: &str| Record {
                uid: uid.to_string(),
                state: State::Orphaned,
            };
            records.insert(key("a"), orphan("1"));
            records.insert(key("b"), orphan("2"));
            records.insert(
                key("b"),
                Record {
                    uid: "2".to_string(),
                    state: State::Synced(7),
                },
            );
            assert_eq!(orphans.get(), 3);
            let mut tracker = Failing::with_failing(failing.clone());
            tracker.insert(key("a"), "the host refused the pod".to_string());
            tracker.insert(key("a"), "again".to_string());
            tracker.insert(key("c"), "unreachable".to_string());
            tracker.remove(&key("c"));
            tracker.remove(&key("c"));
            tracker.insert(key("d"), "unreachable".to_string());
            assert_eq!(
                (failing.get(), tracker.get(&key("a")).map(String::as_str)),
                (3, Some("again"))
            );
        }
        // A term that ended (its shards dropped) no longer counts: the next one counts anew.
        assert_eq!((orphans.get(), failing.get()), (2, 1));
    }

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

    #[test]
    fn a_readiness_gates_condition_is_sent_and_counts_and_the_rest_of_the_status_does_not() {
        let pod = |gate_status: &str, phase: &str| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "web"},
                "spec": {"containers": [{"name": "app", "image": "i:1"}],
                         "readinessGates": [{"conditionType": "example.com/lb-ready"}]},
                "status": {"phase": phase, "conditions": [
                    {"type": "Ready", "status": "False"},
                    {"type": "example.com/lb-ready", "status": gate_status}]},
            }))
            .unwrap()
        };
        let sent: serde_json::Value = serde_json::from_slice(&apply_body(&pod("True", "Running"))).unwrap();
        assert_eq!(
            sent["status"],
            serde_json::json!({"conditions": [{"type": "example.com/lb-ready", "status": "True"}]})
        );
        assert_eq!(
            fingerprint(&pod("False", "Pending")),
            fingerprint(&pod("False", "Running"))
        );
        assert_ne!(
            fingerprint(&pod("False", "Running")),
            fingerprint(&pod("True", "Running"))
        );
        // A host status copied back keeps the virtual Pod's own gate condition.
        let mut host = serde_json::json!({"phase": "Running", "conditions": [
            {"type": "Ready", "status": "False"}, {"type": "example.com/lb-ready", "status": "False"}]});
        shard::keep_gate_conditions(&pod("True", "Running"), &mut host);
        assert_eq!(
            host["conditions"],
            serde_json::json!([{"type": "Ready", "status": "False"},
                               {"type": "example.com/lb-ready", "status": "True"}])
        );
    }
}
