//! The budget syncer: holds the virtual cluster's PodDisruptionBudgets on the host too, so the
//! host's evictions (node drains, the cluster autoscaler) respect them.
//!
//! ```text
//!  watch virtual PodDisruptionBudgets ──► due queue (by namespace/name)
//!     ──► stated as maxUnavailable or a percentage, and the virtual disruption controller has not
//!         computed status.desiredHealthy for this spec yet? ──► wait for its status write
//!     ──► ApplyDisruptionBudget ──applied──► synced
//!                               └─refused─► SyncError event on the budget (once per change);
//!                                           tried again when the tenant's policy version changes,
//!                                           and, when the host may cure it (the name held by
//!                                           another budget), after a backoff of up to a minute
//!     deleted ──► DeleteDisruptionBudget (UID-checked by the host agent)
//!  each relist ──► ListDisruptionBudgets ──► host budgets whose virtual budget is gone ──► deleted
//!  WatchDisruptionBudgets ──► a held budget's host budget deleted on the host ──► applied again
//!  failures ──► retried per budget with backoff; over the tenant's rate ──► after the delay asked
//! ```
//!
//! Whether the host holds a tenant's budgets is the host's call
//! (`sync.toHost.podDisruptionBudgets.enabled` in the host agent's tenants file): where it does
//! not, each budget carries a `SyncError` event saying so.

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt as _;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::runtime::events::Recorder;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource as _, ResourceExt as _};
use rcsync_core::kube_client::RetryWithBackoff as _;
use rcsync_proto::v1::{
    ApplyDisruptionBudgetRequest, DeleteDisruptionBudgetRequest, DisruptionBudgetEvent,
    DisruptionBudgetEventType, ListDisruptionBudgetsRequest, PodRefusalReason, WatchDisruptionBudgetsRequest,
};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::classes::SyncState;
use crate::connect::SharedClients;
use crate::host_calls::{self, Feed, Held, HostListing, ObjectBoard, Outcome, Schedule};
use crate::metrics::Metrics;
use crate::pods::{GaugedMap, Key, digest_of};

/// The component that reports budget sync events.
pub const BUDGET_REPORTER: &str = "pdb-syncer";

/// Syncs PodDisruptionBudgets while this replica leads (see the module docs).
pub struct BudgetSyncer {
    client: Client,
    connection: Arc<SharedClients>,
    recorder: Recorder,
    metrics: Metrics,
    sync_state: watch::Receiver<SyncState>,
    board: ObjectBoard,
}

/// The syncer's state between events.
pub(crate) struct Books {
    /// The virtual budgets, as last watched.
    budgets: HashMap<Key, Arc<PodDisruptionBudget>>,
    /// What the host holds (or refused), by virtual budget; those held are
    /// `rcsync_disruption_budgets_synced`.
    held: GaugedMap<Held>,
    /// The host agent's refusals (an event was recorded for each), by virtual budget:
    /// `rcsync_disruption_budgets_refused`.
    refusals: GaugedMap<String>,
    /// When each budget (and the collection) is looked at next.
    schedule: Schedule,
    /// Where each budget stands, as `/status` shows it (cleared when the books go).
    board: ObjectBoard,
}

impl Books {
    fn new(metrics: &Metrics, board: ObjectBoard) -> Self {
        Self {
            budgets: HashMap::new(),
            held: GaugedMap::new(metrics.budgets_synced.clone(), |h| h.refused.is_none()),
            refusals: GaugedMap::new(metrics.budgets_refused.clone(), |_| true),
            schedule: Schedule::default(),
            board,
        }
    }

    /// Forgets what the host holds for `key`.
    fn forget(&mut self, key: &Key) {
        self.held.remove(key);
        self.refusals.remove(key);
    }

    /// Shows where budget `key` stands after an attempt (`failed`: why that attempt failed).
    fn post(&self, key: &Key, failed: Option<&str>) {
        let standing = match (self.budgets.get(key), failed, self.refusals.get(key)) {
            (None, ..) => None,
            (Some(_), Some(why), _) => Some(("failing", why.to_string())),
            (Some(_), None, Some(why)) => Some(("refused", why.clone())),
            (Some(budget), None, None) if awaits_status(budget) => Some((
                "waiting",
                "the virtual cluster's disruption controller has not yet counted the healthy pods this \
                 budget asks for (status.desiredHealthy)"
                    .to_string(),
            )),
            (Some(_), None, None) => Some(("held", String::new())),
        };
        host_calls::post(&self.board, key, standing);
    }
}

impl Drop for Books {
    /// A standby shows no budgets: what it would hold is the leader's to say.
    fn drop(&mut self) {
        host_calls::clear(&self.board);
    }
}

impl BudgetSyncer {
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
        }
    }

    /// Runs until `shutdown`.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let api: Api<PodDisruptionBudget> = Api::all(self.client.clone());
        let mut events = self
            .metrics
            .watches
            .follow(
                "poddisruptionbudgets".into(),
                watcher::watcher(api, watcher::Config::default()).retry_with_backoff(),
            )
            .boxed();
        // Which host budgets exist, so one deleted on the host is made again: a task of its own
        // (see FeedTask), ended with this one.
        let (host_tx, mut host_budgets) = mpsc::channel(64);
        let _feed = host_calls::FeedTask::spawn(
            self.connection.clone(),
            "WatchDisruptionBudgets",
            |mut pods| async move {
                pods.watch_disruption_budgets(WatchDisruptionBudgetsRequest {})
                    .await
            },
            host_tx,
            shutdown.clone(),
        );
        let mut host_listing = HostListing::default();
        let mut books = Books::new(&self.metrics, self.board.clone());
        let mut relist: Option<HashMap<Key, Arc<PodDisruptionBudget>>> = None;
        let mut listed = false;
        let mut policy = self.sync_state.borrow().pod_policy.clone();
        loop {
            let wake = books.schedule.next_wake();
            tokio::select! {
                _ = shutdown.changed() => break,
                Some(feed) = host_budgets.recv() => match feed {
                    Feed::Opened => host_listing.opened(),
                    Feed::Message(event) => on_host_budget(&mut books, &mut host_listing, &event),
                },
                event = events.next() => match event {
                    None => break,
                    Some(Err(e)) => tracing::warn!(error = %e, "watching PodDisruptionBudgets failed; retrying with backoff"),
                    Some(Ok(Event::Init)) => relist = Some(HashMap::new()),
                    Some(Ok(Event::InitApply(budget))) => {
                        if let Some(r) = &mut relist {
                            r.insert(key_of(&budget), Arc::new(budget));
                        }
                    }
                    Some(Ok(Event::InitDone)) => {
                        let budgets = relist.take().unwrap_or_default();
                        let now = Instant::now();
                        for key in books.budgets.keys().chain(budgets.keys()) {
                            books.schedule.due.insert(key.clone(), now);
                        }
                        books.budgets = budgets;
                        books.schedule.collect_now();
                        listed = true;
                    }
                    Some(Ok(Event::Apply(budget))) => {
                        let key = key_of(&budget);
                        books.budgets.insert(key.clone(), Arc::new(budget));
                        books.schedule.now(key);
                    }
                    Some(Ok(Event::Delete(budget))) => {
                        // What the host holds for it (of the uid this process applied) goes; a
                        // budget this process never applied is the collection's to delete.
                        let key = key_of(&budget);
                        books.budgets.remove(&key);
                        books.schedule.now(key);
                    }
                },
                () = host_calls::sleep_until(wake) => {}
                changed = self.sync_state.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let now = self.sync_state.borrow_and_update().pod_policy.clone();
                    // The tenant's policy changed on the host (the switch among it): every
                    // budget is worth applying again.
                    if now != policy {
                        policy = now;
                        let at = Instant::now();
                        for key in books.budgets.keys() {
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
            if listed {
                host_calls::work(&mut self, &mut books).await;
            }
        }
    }

    /// The PodSync client of the current connection (made now if there is none).
    async fn pods(&self) -> Result<crate::connect::PodClient, tonic::Status> {
        host_calls::pod_client(&self.connection).await
    }
}

impl host_calls::ObjectSync for BudgetSyncer {
    type Books = Books;
    const KIND: &'static str = "PodDisruptionBudget";

    fn connection(&self) -> &SharedClients {
        &self.connection
    }

    fn errors(&self) -> &prometheus_client::metrics::counter::Counter {
        &self.metrics.budget_errors_total
    }

    fn schedule(books: &mut Books) -> &mut Schedule {
        &mut books.schedule
    }

    fn post(books: &Books, key: &Key, failed: Option<&str>) {
        books.post(key, failed);
    }

    /// Brings the host's copy of one budget in line with the virtual cluster.
    async fn reconcile(&mut self, books: &mut Books, key: &Key) -> Result<Outcome, tonic::Status> {
        let Some(budget) = books.budgets.get(key).cloned() else {
            let Some(held) = books.held.get(key).cloned() else {
                return Ok(Outcome::Done);
            };
            let request = DeleteDisruptionBudgetRequest {
                namespace: key.0.clone(),
                name: key.1.clone(),
                uid: held.uid,
            };
            let mut pods = self.pods().await?;
            self.connection
                .bounded(request, |r| pods.delete_disruption_budget(r))
                .await?;
            tracing::info!(namespace = %key.0, budget = %key.1, "deleted the host's copy of a deleted PodDisruptionBudget");
            books.forget(key);
            return Ok(Outcome::Done);
        };
        if awaits_status(&budget) {
            // The virtual disruption controller's status write brings it back.
            return Ok(Outcome::Done);
        }
        let uid = budget.uid().unwrap_or_default();
        let body = apply_body(&budget);
        let sent = digest_of(&body);
        if books.held.get(key).is_some_and(|h| h.stands(&uid, sent)) {
            return Ok(Outcome::Done);
        }
        let mut pods = self.pods().await?;
        let answer = self
            .connection
            .bounded(
                ApplyDisruptionBudgetRequest {
                    budget_json: serde_json::to_vec(&body).expect("JSON values serialize"),
                },
                |r| pods.apply_disruption_budget(r),
            )
            .await?
            .into_inner();
        let refused = answer.refusal.map(|refusal| {
            let reason = PodRefusalReason::try_from(refusal.reason).unwrap_or(PodRefusalReason::Unspecified);
            (reason, refusal.message)
        });
        let said = books.held.get(key).is_some_and(|h| h.uid == uid)
            && books.refusals.get(key).map(String::as_str) == refused.as_ref().map(|(_, m)| m.as_str());
        let was_held = books
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
        match refused {
            None => {
                books.refusals.remove(key);
                // Held again after a change (a new count of healthy Pods): a line for debugging.
                if was_held {
                    tracing::debug!(namespace = %key.0, budget = %key.1, host = %answer.host_name, "PodDisruptionBudget held on the host");
                } else {
                    tracing::info!(namespace = %key.0, budget = %key.1, host = %answer.host_name, "PodDisruptionBudget held on the host");
                }
            }
            Some((reason, message)) => {
                books.refusals.insert(key.clone(), message.clone());
                if !said {
                    tracing::info!(namespace = %key.0, budget = %key.1, reason = reason.as_str_name(), "the host agent refused a PodDisruptionBudget: {message}");
                    let event = host_calls::refusal_event(reason, message);
                    if let Err(e) = self.recorder.publish(&event, &budget.object_ref(&())).await {
                        // Recorded at the next attempt.
                        books.forget(key);
                        return Err(tonic::Status::unavailable(format!(
                            "recording an event about the budget failed: {e}"
                        )));
                    }
                }
                return Ok(Outcome::after_refusal(reason));
            }
        }
        Ok(Outcome::Done)
    }

    /// Deletes the host budgets whose virtual budget is gone (deleted while no leader watched).
    async fn collect(&mut self, books: &mut Books) -> Result<(), tonic::Status> {
        let mut pods = self.pods().await?;
        let listed = self
            .connection
            .bounded(ListDisruptionBudgetsRequest {}, |r| {
                pods.list_disruption_budgets(r)
            })
            .await?
            .into_inner();
        let now = Instant::now();
        for host in listed.budgets {
            let key = (host.namespace.clone(), host.name.clone());
            if books.budgets.contains_key(&key) {
                continue;
            }
            // Deleted by the next pass over the due budgets (with its retries).
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

/// Takes in one event of the host budgets' stream: a host budget gone (reported deleted, or not
/// listed when the stream opened again) while the virtual budget it was made for (that uid) stays
/// and is held is made again at once.
fn on_host_budget(books: &mut Books, listing: &mut HostListing, event: &DisruptionBudgetEvent) {
    let gone: Vec<(Key, String)> = match (event.r#type(), &event.budget) {
        (DisruptionBudgetEventType::Present, Some(budget)) => {
            listing.present((budget.namespace.clone(), budget.name.clone()));
            Vec::new()
        }
        (DisruptionBudgetEventType::Deleted, Some(budget)) => {
            vec![(
                (budget.namespace.clone(), budget.name.clone()),
                budget.uid.clone(),
            )]
        }
        (DisruptionBudgetEventType::InitialStateComplete, _) => {
            let held: Vec<(Key, String)> = books
                .held
                .iter()
                .map(|(k, h)| (k.clone(), h.uid.clone()))
                .collect();
            let missing = listing.missing(held.iter().map(|(k, _)| k));
            held.into_iter().filter(|(k, _)| missing.contains(k)).collect()
        }
        _ => Vec::new(),
    };
    for (key, uid) in gone {
        let still_wanted = books
            .budgets
            .get(&key)
            .is_some_and(|b| b.metadata.uid.as_deref() == Some(uid.as_str()));
        let held = books
            .held
            .get(&key)
            .is_some_and(|h| h.uid == uid && h.refused.is_none());
        if still_wanted && held {
            tracing::info!(namespace = %key.0, budget = %key.1, "the host budget of a PodDisruptionBudget is gone from the host; making it again");
            books.forget(&key);
            books.schedule.due.insert(key, Instant::now());
        }
    }
}

fn key_of(budget: &PodDisruptionBudget) -> Key {
    (budget.namespace().unwrap_or_default(), budget.name_any())
}

/// Whether the budget is stated as `maxUnavailable` or a percentage and its status does not yet
/// say how many healthy Pods that is for this spec (the host agent needs that number).
fn awaits_status(budget: &PodDisruptionBudget) -> bool {
    let Some(spec) = budget.spec.as_ref() else {
        return false;
    };
    let whole =
        matches!(spec.min_available, Some(IntOrString::Int(_)) | None) && spec.max_unavailable.is_none();
    if whole {
        return false;
    }
    let computed = budget.status.as_ref().is_some_and(|s| {
        s.desired_healthy.is_some()
            && s.observed_generation.is_some()
            && s.observed_generation >= budget.metadata.generation
    });
    !computed
}

/// What ApplyDisruptionBudget carries: identity, spec, and of the status what the host agent
/// uses (the Pods' health changing sends nothing).
fn apply_body(budget: &PodDisruptionBudget) -> serde_json::Value {
    let status = budget.status.as_ref();
    serde_json::json!({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {
            "name": budget.metadata.name,
            "namespace": budget.metadata.namespace,
            "uid": budget.metadata.uid,
            "generation": budget.metadata.generation,
        },
        "spec": budget.spec,
        // What the host agent reads of it; the counts of healthy Pods stay home, so their
        // comings and goings do not send the budget again.
        "status": {
            "observedGeneration": status.and_then(|s| s.observed_generation),
            "desiredHealthy": status.and_then(|s| s.desired_healthy),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(spec: serde_json::Value, status: serde_json::Value) -> PodDisruptionBudget {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": "u", "generation": 2},
            "spec": spec, "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn a_held_budget_gone_from_the_host_is_made_again_whether_deleted_or_missing_at_a_reopening() {
        let metrics = Metrics::register(&mut prometheus_client::registry::Registry::default());
        let mut books = Books::new(&metrics, ObjectBoard::default());
        let key = |name: &str| -> Key { ("shop".into(), name.into()) };
        for name in ["deleted", "missing", "listed", "refused"] {
            let mut virtual_budget = budget(serde_json::json!({"minAvailable": 1}), serde_json::Value::Null);
            virtual_budget.metadata.name = Some(name.into());
            virtual_budget.metadata.uid = Some(format!("uid-{name}"));
            books.budgets.insert(key(name), Arc::new(virtual_budget));
            books.held.insert(
                key(name),
                Held {
                    uid: format!("uid-{name}"),
                    sent: 7,
                    refused: (name == "refused").then_some(PodRefusalReason::NameInUse),
                },
            );
        }
        let event = |kind: DisruptionBudgetEventType, name: &str| DisruptionBudgetEvent {
            r#type: kind as i32,
            budget: (!name.is_empty()).then(|| rcsync_proto::v1::VirtualObject {
                namespace: "shop".into(),
                name: name.into(),
                uid: format!("uid-{name}"),
            }),
        };
        let mut listing = HostListing::default();
        on_host_budget(
            &mut books,
            &mut listing,
            &event(DisruptionBudgetEventType::Deleted, "deleted"),
        );
        assert!(books.held.get(&key("deleted")).is_none(), "forgotten: made again");
        assert!(books.schedule.due.contains_key(&key("deleted")));
        // The stream reopens; the host lists one of the others.
        listing.opened();
        on_host_budget(
            &mut books,
            &mut listing,
            &event(DisruptionBudgetEventType::Present, "listed"),
        );
        on_host_budget(
            &mut books,
            &mut listing,
            &event(DisruptionBudgetEventType::InitialStateComplete, ""),
        );
        assert!(
            books.held.get(&key("missing")).is_none(),
            "not listed: made again"
        );
        assert!(books.held.get(&key("listed")).is_some());
        assert!(
            books.held.get(&key("refused")).is_some(),
            "a refused budget is the refusal's to retry"
        );
    }

    #[test]
    fn a_budget_not_stated_in_whole_pods_waits_for_its_status_of_this_spec() {
        let computed = serde_json::json!({"observedGeneration": 2, "desiredHealthy": 2, "currentHealthy": 3,
                                          "disruptionsAllowed": 1, "expectedPods": 3});
        let stale = serde_json::json!({"observedGeneration": 1, "desiredHealthy": 2, "currentHealthy": 3,
                                       "disruptionsAllowed": 1, "expectedPods": 3});
        assert!(!awaits_status(&budget(
            serde_json::json!({"minAvailable": 2}),
            serde_json::Value::Null
        )));
        assert!(awaits_status(&budget(
            serde_json::json!({"maxUnavailable": 1}),
            serde_json::Value::Null
        )));
        assert!(awaits_status(&budget(
            serde_json::json!({"minAvailable": "50%"}),
            stale.clone()
        )));
        assert!(!awaits_status(&budget(
            serde_json::json!({"maxUnavailable": 1}),
            computed.clone()
        )));
        // The Pods' health moving sends nothing new.
        let mut moved = computed.clone();
        moved["currentHealthy"] = serde_json::json!(2);
        moved["disruptionsAllowed"] = serde_json::json!(0);
        let spec = serde_json::json!({"maxUnavailable": 1});
        assert_eq!(
            apply_body(&budget(spec.clone(), computed)),
            apply_body(&budget(spec, moved))
        );
    }
}
