//! The claim syncer: makes the virtual cluster's PersistentVolumeClaims on the host, so the Pods
//! that mount them (a StatefulSet's, say) run there with host storage, and writes each host
//! claim's status (`Bound`, its capacity) back on the virtual claim.
//!
//! ```text
//!  watch virtual PersistentVolumeClaims ──► due queue (by namespace/name)
//!     ──► ApplyClaim ──applied──► made (grown when the virtual claim asks for more)
//!                    └─refused─► SyncError event on the claim (once per message); tried again
//!                                later, and at once when the tenant's policy version changes
//!     deleted ──► DeleteClaim (UID-checked by the host agent)
//!  each relist ──► ListClaims ──► host claims whose virtual claim is gone ──► deleted
//!  WatchClaimStatus ──► UPDATED ──► status patched on the virtual claim of that uid
//!                   ├─► DELETED while the virtual claim stays (deleted on the host by hand)
//!                   │    ──► made again; and every refused claim asked again at once (the
//!                   │    host's quota may have room now)
//!                   └─► HOST_EVENT (ProvisioningFailed, ...) ──► event about the virtual claim
//!                        of that uid (`host_events`, as for Pods; `--host-events` says which)
//!  failures ──► retried per claim with backoff; over the tenant's rate ──► after the delay asked
//!  (nothing is sent before the status stream's first INITIAL_STATE_COMPLETE: the host agent is
//!   ready and reachable then)
//! ```
//!
//! Whether the host makes a tenant's claims is the host's call
//! (`sync.toHost.persistentVolumeClaims.enabled` in the host agent's tenants file): where it does
//! not, each claim carries a `SyncError` event saying so, and Pods mounting one are refused.

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::Recorder;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource as _, ResourceExt as _};
use rcsync_core::kube_client::RetryWithBackoff as _;
use rcsync_proto::v1::{
    ApplyClaimRequest, ClaimStatusEvent, ClaimStatusEventType, DeleteClaimRequest, HostEvents,
    ListClaimsRequest, PodRefusalReason, WatchClaimStatusRequest,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::classes::SyncState;
use crate::connect::SharedClients;
use crate::host_calls::{self, Feed, Held, HostListing, ObjectBoard, Outcome, Schedule};
use crate::host_events::{HostEventCopy, HostEventQueue, host_event_writer};
use crate::metrics::Metrics;
use crate::pods::{GaugedMap, Key, digest_of};

/// The component that reports claim sync events.
pub const CLAIM_REPORTER: &str = "pvc-syncer";

/// Syncs PersistentVolumeClaims while this replica leads (see the module docs).
pub struct ClaimSyncer {
    client: Client,
    connection: Arc<SharedClients>,
    recorder: Recorder,
    metrics: Metrics,
    sync_state: watch::Receiver<SyncState>,
    board: ObjectBoard,
    /// Which host events about the host claims are copied onto the virtual claims.
    host_events: HostEvents,
}

/// Host events about claims that came before the virtual claims were listed, at most this many.
const EARLY_HOST_EVENTS_MAX: usize = 256;

/// The syncer's state between events.
pub(crate) struct Books {
    /// The virtual claims, as last watched.
    claims: HashMap<Key, Arc<PersistentVolumeClaim>>,
    /// What the host holds (or refused), by virtual claim; those held are
    /// `rcsync_persistent_volume_claims_synced`.
    held: GaugedMap<Held>,
    /// The host agent's refusals (an event was recorded for each), by virtual claim:
    /// `rcsync_persistent_volume_claims_refused`.
    refusals: GaugedMap<String>,
    /// Host statuses not yet written on their virtual claim (by virtual claim: its uid, the status).
    statuses: HashMap<Key, (String, serde_json::Value)>,
    /// When each claim (and the collection) is looked at next.
    schedule: Schedule,
    /// Where each claim stands, as `/status` shows it (cleared when the books go).
    board: ObjectBoard,
}

impl Books {
    fn new(metrics: &Metrics, board: ObjectBoard) -> Self {
        Self {
            claims: HashMap::new(),
            held: GaugedMap::new(metrics.claims_synced.clone(), |h| h.refused.is_none()),
            refusals: GaugedMap::new(metrics.claims_refused.clone(), |_| true),
            statuses: HashMap::new(),
            schedule: Schedule::default(),
            board,
        }
    }

    /// Shows where claim `key` stands after an attempt (`failed`: why that attempt failed).
    fn post(&self, key: &Key, failed: Option<&str>) {
        let standing = match (self.claims.contains_key(key), failed, self.refusals.get(key)) {
            (false, ..) => None,
            (true, Some(why), _) => Some(("failing", why.to_string())),
            (true, None, Some(why)) => Some(("refused", why.clone())),
            (true, None, None) => Some(("made", String::new())),
        };
        host_calls::post(&self.board, key, standing);
    }

    /// Forgets what the host holds for `key`.
    fn forget(&mut self, key: &Key) {
        self.held.remove(key);
        self.refusals.remove(key);
    }
}

impl Drop for Books {
    /// A standby shows no claims: what it would make is the leader's to say.
    fn drop(&mut self) {
        host_calls::clear(&self.board);
    }
}

impl ClaimSyncer {
    /// A syncer for the virtual cluster behind `client`, calling the host agent over `connection`.
    pub fn new(
        client: Client,
        connection: Arc<SharedClients>,
        recorder: Recorder,
        metrics: Metrics,
        sync_state: watch::Receiver<SyncState>,
        board: ObjectBoard,
    ) -> Self {
        Self {
            client,
            connection,
            recorder,
            metrics,
            sync_state,
            board,
            host_events: HostEvents::All,
        }
    }

    /// Copies the host events `host_events` says onto the virtual claims (all by default).
    pub fn with_host_events(mut self, host_events: HostEvents) -> Self {
        self.host_events = host_events;
        self
    }

    /// Runs until `shutdown`.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let api: Api<PersistentVolumeClaim> = Api::all(self.client.clone());
        let mut events = self
            .metrics
            .watches
            .follow(
                "persistentvolumeclaims".into(),
                watcher::watcher(api, watcher::Config::default()).retry_with_backoff(),
            )
            .boxed();
        // The status stream: a task of its own (see FeedTask), ended with this one.
        let (status_tx, mut statuses) = mpsc::channel(64);
        let host_events = self.host_events as i32;
        let _feed = host_calls::FeedTask::spawn(
            self.connection.clone(),
            "WatchClaimStatus",
            move |mut pods| async move {
                pods.watch_claim_status(WatchClaimStatusRequest { host_events })
                    .await
            },
            status_tx,
            shutdown.clone(),
        );
        let mut copier = HostEventCopier::new(shutdown.clone());
        let mut host_listing = HostListing::default();
        let mut books = Books::new(&self.metrics, self.board.clone());
        let mut relist: Option<HashMap<Key, Arc<PersistentVolumeClaim>>> = None;
        let mut listed = false;
        // Nothing is sent before the host agent listed the host claims once: it answers then.
        let mut host_listed = false;
        let mut policy = self.sync_state.borrow().pod_policy.clone();
        loop {
            let wake = books.schedule.next_wake();
            tokio::select! {
                _ = shutdown.changed() => break,
                event = events.next() => match event {
                    None => break,
                    Some(Err(e)) => tracing::warn!(error = %e, "watching PersistentVolumeClaims failed; retrying with backoff"),
                    Some(Ok(Event::Init)) => relist = Some(HashMap::new()),
                    Some(Ok(Event::InitApply(claim))) => {
                        if let Some(r) = &mut relist {
                            r.insert(key_of(&claim), Arc::new(claim));
                        }
                    }
                    Some(Ok(Event::InitDone)) => {
                        let claims = relist.take().unwrap_or_default();
                        let now = Instant::now();
                        for key in books.claims.keys().chain(claims.keys()) {
                            books.schedule.due.insert(key.clone(), now);
                        }
                        books.claims = claims;
                        books.schedule.collect_now();
                        listed = true;
                        for event in std::mem::take(&mut copier.early) {
                            copier.copy(&self.client, &self.metrics, &books, event);
                        }
                    }
                    Some(Ok(Event::Apply(claim))) => {
                        let key = key_of(&claim);
                        books.claims.insert(key.clone(), Arc::new(claim));
                        books.schedule.now(key);
                    }
                    Some(Ok(Event::Delete(claim))) => {
                        let key = key_of(&claim);
                        books.claims.remove(&key);
                        books.schedule.now(key);
                    }
                },
                Some(feed) = statuses.recv() => match feed {
                    Feed::Opened => host_listing.opened(),
                    Feed::Message(event) => match event.r#type() {
                        ClaimStatusEventType::HostEvent if !listed => copier.park(&self.metrics, event),
                        ClaimStatusEventType::HostEvent => {
                            copier.copy(&self.client, &self.metrics, &books, event);
                        }
                        _ => host_listed |= on_status(&mut books, &mut host_listing, event),
                    },
                },
                () = host_calls::sleep_until(wake) => {}
                changed = self.sync_state.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let now = self.sync_state.borrow_and_update().pod_policy.clone();
                    // The tenant's policy changed on the host (the switch among it): every claim
                    // is worth applying again.
                    if now != policy {
                        policy = now;
                        let at = Instant::now();
                        for key in books.claims.keys() {
                            books.schedule.due.insert(key.clone(), at);
                        }
                        let held: Vec<(Key, Held)> =
                            books.held.iter().map(|(k, h)| (k.clone(), h.clone())).collect();
                        for (key, held) in held {
                            books.held.insert(key, Held { sent: 0, ..held });
                        }
                    }
                }
            }
            if listed && host_listed {
                host_calls::work(&mut self, &mut books).await;
            }
        }
    }

    /// Writes the host status waiting for the virtual claim `claim` (of the uid it was made for).
    async fn write_status(
        &mut self,
        books: &mut Books,
        key: &Key,
        claim: &PersistentVolumeClaim,
    ) -> Result<(), tonic::Status> {
        let Some((uid, status)) = books.statuses.get(key) else {
            return Ok(());
        };
        if claim.uid().as_deref() != Some(uid.as_str()) {
            books.statuses.remove(key);
            return Ok(());
        }
        let current = serde_json::to_value(&claim.status).unwrap_or_default();
        if current == *status {
            books.statuses.remove(key);
            return Ok(());
        }
        // Fields the host status no longer has go too.
        let mut patch = status.clone();
        if let (Some(now), Some(was)) = (patch.as_object_mut(), current.as_object()) {
            for field in was.keys() {
                now.entry(field.clone()).or_insert(serde_json::Value::Null);
            }
        }
        let api: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), &key.0);
        api.patch_status(
            &key.1,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"uid": uid}, "status": patch})),
        )
        .await
        .map_err(|e| {
            tonic::Status::unavailable(format!("writing the host status on the claim failed: {e}"))
        })?;
        books.statuses.remove(key);
        Ok(())
    }

    /// The PodSync client of the current connection (made now if there is none).
    async fn pods(&self) -> Result<crate::connect::PodClient, tonic::Status> {
        host_calls::pod_client(&self.connection).await
    }
}

impl host_calls::ObjectSync for ClaimSyncer {
    type Books = Books;
    const KIND: &'static str = "PersistentVolumeClaim";

    fn connection(&self) -> &SharedClients {
        &self.connection
    }

    fn errors(&self) -> &prometheus_client::metrics::counter::Counter {
        &self.metrics.claim_errors_total
    }

    fn schedule(books: &mut Books) -> &mut Schedule {
        &mut books.schedule
    }

    fn post(books: &Books, key: &Key, failed: Option<&str>) {
        books.post(key, failed);
    }

    /// Brings the host's copy of one claim, and the virtual claim's status, in line.
    async fn reconcile(&mut self, books: &mut Books, key: &Key) -> Result<Outcome, tonic::Status> {
        let Some(claim) = books.claims.get(key).cloned() else {
            books.statuses.remove(key);
            let Some(held) = books.held.get(key).cloned() else {
                return Ok(Outcome::Done);
            };
            let request = DeleteClaimRequest {
                namespace: key.0.clone(),
                name: key.1.clone(),
                uid: held.uid,
            };
            let mut pods = self.pods().await?;
            self.connection.bounded(request, |r| pods.delete_claim(r)).await?;
            tracing::info!(namespace = %key.0, claim = %key.1, "deleted the host's copy of a deleted PersistentVolumeClaim");
            books.forget(key);
            return Ok(Outcome::Done);
        };
        let uid = claim.uid().unwrap_or_default();
        self.write_status(books, key, &claim).await?;
        let body = apply_body(&claim);
        let sent = digest_of(&body);
        // Sent as it stands and made, or refused until it or the policy changes: nothing to do. A
        // refusal the host may cure is asked again (its retry brought it here).
        if books.held.get(key).is_some_and(|h| h.stands(&uid, sent)) {
            return Ok(Outcome::Done);
        }
        let mut pods = self.pods().await?;
        let answer = self
            .connection
            .bounded(
                ApplyClaimRequest {
                    claim_json: serde_json::to_vec(&body).expect("JSON values serialize"),
                },
                |r| pods.apply_claim(r),
            )
            .await?
            .into_inner();
        let refused = answer.refusal.map(|refusal| {
            let reason = PodRefusalReason::try_from(refusal.reason).unwrap_or(PodRefusalReason::Unspecified);
            (reason, refusal.message)
        });
        let said = books.held.get(key).is_some_and(|h| h.uid == uid)
            && books.refusals.get(key).map(String::as_str) == refused.as_ref().map(|(_, m)| m.as_str());
        let was_made = books
            .held
            .get(key)
            .is_some_and(|h| h.uid == uid && h.refused.is_none());
        books.held.insert(
            key.clone(),
            Held {
                uid,
                sent,
                refused: refused.as_ref().map(|(reason, _)| *reason),
            },
        );
        let Some((reason, message)) = refused else {
            books.refusals.remove(key);
            // Made and then grown: a line for debugging.
            if was_made {
                tracing::debug!(namespace = %key.0, claim = %key.1, host = %answer.host_name, "PersistentVolumeClaim made on the host");
            } else {
                tracing::info!(namespace = %key.0, claim = %key.1, host = %answer.host_name, "PersistentVolumeClaim made on the host");
            }
            return Ok(Outcome::Done);
        };
        books.refusals.insert(key.clone(), message.clone());
        if !said {
            tracing::info!(namespace = %key.0, claim = %key.1, reason = reason.as_str_name(), "the host agent refused a PersistentVolumeClaim: {message}");
            let event = host_calls::refusal_event(reason, message);
            if let Err(e) = self.recorder.publish(&event, &claim.object_ref(&())).await {
                // Recorded at the next attempt.
                books.forget(key);
                return Err(tonic::Status::unavailable(format!(
                    "recording an event about the claim failed: {e}"
                )));
            }
        }
        // The spec is immutable: a refusal the host may cure (quota room, a name freed) is tried
        // again later, and a policy change tries it at once.
        Ok(Outcome::after_refusal(reason))
    }

    /// Deletes the host claims whose virtual claim is gone (deleted while no leader watched).
    async fn collect(&mut self, books: &mut Books) -> Result<(), tonic::Status> {
        let mut pods = self.pods().await?;
        let listed = self
            .connection
            .bounded(ListClaimsRequest {}, |r| pods.list_claims(r))
            .await?
            .into_inner();
        let now = Instant::now();
        for host in listed.claims {
            let key = (host.namespace.clone(), host.name.clone());
            if books.claims.contains_key(&key) {
                continue;
            }
            // Deleted by the next pass over the due claims (with its retries).
            books.held.insert(
                key.clone(),
                Held {
                    uid: host.uid,
                    sent: 0,
                    refused: None,
                },
            );
            books.schedule.due.insert(key, now);
        }
        Ok(())
    }
}

/// Copies host events about claims onto the virtual claims, through a writer started at the first
/// one (it ends with the syncer's task, which owns it).
struct HostEventCopier {
    writer: Option<HostEventQueue>,
    children: JoinSet<()>,
    shutdown: watch::Receiver<bool>,
    /// Host events that came before the virtual claims were listed.
    early: Vec<ClaimStatusEvent>,
}

impl HostEventCopier {
    fn new(shutdown: watch::Receiver<bool>) -> Self {
        Self {
            writer: None,
            children: JoinSet::new(),
            shutdown,
            early: Vec::new(),
        }
    }

    /// Keeps `event`, which came before the virtual claims were listed, for then (past
    /// [`EARLY_HOST_EVENTS_MAX`] it is dropped and counted).
    fn park(&mut self, metrics: &Metrics, event: ClaimStatusEvent) {
        if self.early.len() < EARLY_HOST_EVENTS_MAX {
            self.early.push(event);
        } else {
            metrics.host_events_failed_total.inc();
        }
    }

    /// Queues the host event `event` for the virtual claim it is about, if that claim (that uid)
    /// is in `books`.
    fn copy(&mut self, client: &Client, metrics: &Metrics, books: &Books, event: ClaimStatusEvent) {
        let (Some(claim), Some(host_event)) = (event.claim, event.host_event) else {
            return;
        };
        let key = (claim.namespace, claim.name);
        if books.claims.get(&key).and_then(|c| c.uid()).as_deref() != Some(claim.uid.as_str()) {
            return;
        }
        let queue = self.writer.get_or_insert_with(|| {
            let (queue, write) = host_event_writer(client.clone(), metrics.clone(), self.shutdown.clone());
            self.children.spawn(write);
            queue
        });
        queue.send(HostEventCopy {
            kind: "PersistentVolumeClaim",
            namespace: key.0,
            name: key.1,
            uid: claim.uid,
            event: host_event,
        });
    }
}

/// Takes in one event of the host claims' status stream; true when it says the host agent listed
/// the host claims.
fn on_status(books: &mut Books, listing: &mut HostListing, event: ClaimStatusEvent) -> bool {
    if event.r#type() == ClaimStatusEventType::InitialStateComplete {
        // Held claims the host did not list when the stream opened again went meanwhile: made
        // again (a refused one is its refusal's to retry).
        let held: Vec<Key> = books
            .held
            .iter()
            .filter(|(_, h)| h.refused.is_none())
            .map(|(k, _)| k.clone())
            .collect();
        let now = Instant::now();
        for key in listing.missing(held.iter()) {
            books.forget(&key);
            books.schedule.due.insert(key, now);
        }
        return true;
    }
    let Some(claim) = event.claim.clone() else {
        return false;
    };
    let key = (claim.namespace, claim.name);
    match event.r#type() {
        ClaimStatusEventType::Updated => {
            let Ok(status) = serde_json::from_slice(&event.status_json) else {
                return false;
            };
            listing.present(key.clone());
            books.statuses.insert(key.clone(), (claim.uid, status));
            books.schedule.now(key);
        }
        ClaimStatusEventType::Deleted => {
            let now = Instant::now();
            // Deleted on the host while its virtual claim stays: made again.
            if books.held.get(&key).is_some_and(|h| h.uid == claim.uid) {
                books.forget(&key);
                books.schedule.due.insert(key, now);
            }
            // Room made under the host namespace's quota (or a name freed): the refused claims
            // are asked again now, not at the end of their backoff.
            let refused: Vec<Key> = books.refusals.iter().map(|(k, _)| k.clone()).collect();
            for key in refused {
                books.schedule.due.insert(key, now);
            }
        }
        // Host events are the syncer's to copy (they need the writer).
        ClaimStatusEventType::InitialStateComplete
        | ClaimStatusEventType::HostEvent
        | ClaimStatusEventType::Unspecified => {}
    }
    false
}

fn key_of(claim: &PersistentVolumeClaim) -> Key {
    (claim.namespace().unwrap_or_default(), claim.name_any())
}

/// What ApplyClaim carries: identity and spec (its status changing sends nothing).
fn apply_body(claim: &PersistentVolumeClaim) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": claim.metadata.name,
            "namespace": claim.metadata.namespace,
            "uid": claim.metadata.uid,
        },
        "spec": claim.spec,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_sent_follows_the_spec_not_the_status() {
        let claim = |phase: &str| -> PersistentVolumeClaim {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "data", "namespace": "shop", "uid": "u", "labels": {"app": "db"}},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
                "status": {"phase": phase},
            }))
            .unwrap()
        };
        assert_eq!(apply_body(&claim("Pending")), apply_body(&claim("Bound")));
        assert_eq!(apply_body(&claim("Bound"))["metadata"]["uid"], "u");
        assert!(apply_body(&claim("Bound"))["metadata"].get("labels").is_none());
    }

    #[test]
    fn a_host_claim_deleted_under_a_virtual_one_is_made_again_and_a_status_waits_to_be_written() {
        let metrics = Metrics::register(&mut prometheus_client::registry::Registry::default());
        let mut books = Books::new(&metrics, ObjectBoard::default());
        let key: Key = ("shop".into(), "data".into());
        books.held.insert(
            key.clone(),
            Held {
                uid: "u".into(),
                sent: 7,
                refused: None,
            },
        );
        let event = |kind: ClaimStatusEventType, uid: &str, status: &str| ClaimStatusEvent {
            r#type: kind as i32,
            claim: Some(rcsync_proto::v1::VirtualObject {
                namespace: "shop".into(),
                name: "data".into(),
                uid: uid.into(),
            }),
            status_json: status.as_bytes().to_vec(),
            host_event: None,
        };
        let mut listing = HostListing::default();
        on_status(
            &mut books,
            &mut listing,
            event(ClaimStatusEventType::Updated, "u", r#"{"phase":"Bound"}"#),
        );
        assert_eq!(
            books.statuses[&key],
            ("u".to_string(), serde_json::json!({"phase": "Bound"}))
        );
        assert!(books.schedule.due.contains_key(&key));
        books.schedule.due.clear();
        on_status(
            &mut books,
            &mut listing,
            event(ClaimStatusEventType::Deleted, "other", ""),
        );
        assert!(
            books.held.get(&key).is_some(),
            "another uid's host claim: nothing to redo"
        );
        on_status(
            &mut books,
            &mut listing,
            event(ClaimStatusEventType::Deleted, "u", ""),
        );
        assert!(
            books.held.get(&key).is_none(),
            "forgotten: the next look makes it again"
        );
        assert!(books.schedule.due.contains_key(&key));
    }

    #[test]
    fn a_held_claim_the_host_no_longer_lists_when_the_stream_reopens_is_made_again() {
        let metrics = Metrics::register(&mut prometheus_client::registry::Registry::default());
        let mut books = Books::new(&metrics, ObjectBoard::default());
        let held = |books: &mut Books, name: &str| {
            books.held.insert(
                ("shop".into(), name.into()),
                Held {
                    uid: format!("uid-{name}"),
                    sent: 7,
                    refused: None,
                },
            );
        };
        held(&mut books, "listed");
        held(&mut books, "gone");
        let event = |kind: ClaimStatusEventType, name: &str| ClaimStatusEvent {
            r#type: kind as i32,
            claim: (!name.is_empty()).then(|| rcsync_proto::v1::VirtualObject {
                namespace: "shop".into(),
                name: name.into(),
                uid: format!("uid-{name}"),
            }),
            status_json: br#"{"phase":"Bound"}"#.to_vec(),
            host_event: None,
        };
        let mut listing = HostListing::default();
        // A relist within the stream says what went itself: nothing is looked for.
        on_status(
            &mut books,
            &mut listing,
            event(ClaimStatusEventType::InitialStateComplete, ""),
        );
        assert!(books.held.get(&("shop".into(), "gone".into())).is_some());
        // Reopened: the host lists one of the two.
        listing.opened();
        on_status(
            &mut books,
            &mut listing,
            event(ClaimStatusEventType::Updated, "listed"),
        );
        on_status(
            &mut books,
            &mut listing,
            event(ClaimStatusEventType::InitialStateComplete, ""),
        );
        assert!(books.held.get(&("shop".into(), "listed".into())).is_some());
        assert!(
            books.held.get(&("shop".into(), "gone".into())).is_none(),
            "forgotten: the next look makes it again"
        );
        assert!(
            books
                .schedule
                .due
                .contains_key(&("shop".to_string(), "gone".to_string()))
        );
    }
}
