//! What the object syncers (PodDisruptionBudgets, `budgets`; PersistentVolumeClaims, `claims`)
//! share in calling the host agent: the client, what a failed call means, the event a refusal
//! records, what the host holds for each object, the schedule of due objects, and the work loop
//! over it (`work`, each syncer an `ObjectSync`: its kind's collection and reconcile).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::runtime::events::{Event as KubeEvent, EventType};
use prometheus_client::metrics::counter::Counter;
use rcsync_proto::v1::PodRefusalReason;
use tokio::time::Instant;
use tonic_types::StatusExt as _;

use crate::connect::{Backoff, PodClient, SharedClients};
use crate::pods::Key;

/// Where each virtual object a syncer takes to the host stands, for `/status`: a state word
/// (`held`, `made`, `refused`, `waiting`, `failing`) and why (empty while this replica does not
/// lead).
pub type ObjectBoard = Arc<Mutex<BTreeMap<Key, (&'static str, String)>>>;

/// Shows `standing` for `key` on `board` (`None`: the object is gone).
pub(crate) fn post(board: &ObjectBoard, key: &Key, standing: Option<(&'static str, String)>) {
    let mut board = board.lock().unwrap_or_else(|e| e.into_inner());
    match standing {
        Some(standing) => board.insert(key.clone(), standing),
        None => board.remove(key),
    };
}

/// Clears `board` (a term ends: what it would hold is the next leader's to say).
pub(crate) fn clear(board: &ObjectBoard) {
    board.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// The PodSync client of `connection`'s current connection (made now if there is none).
pub(crate) async fn pod_client(connection: &SharedClients) -> Result<PodClient, tonic::Status> {
    let current = connection
        .get()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    Ok(current.pods)
}

/// Notes a call that failed with `status` (trying to `attempt`). Over the tenant's rate limit it
/// returns the instant before which nothing is to be sent (the delay the host agent asked for,
/// one second without); any other failure is counted in `errors`, and drops the connection when
/// a new one may cure it.
pub(crate) async fn call_failed(
    connection: &SharedClients,
    errors: &Counter,
    status: &tonic::Status,
    attempt: &str,
) -> Option<Instant> {
    if status.code() == tonic::Code::ResourceExhausted {
        let delay = status
            .get_details_retry_info()
            .and_then(|info| info.retry_delay)
            .unwrap_or(Duration::from_secs(1));
        return Some(Instant::now() + delay);
    }
    errors.inc();
    tracing::debug!(code = ?status.code(), "the host agent did not {attempt}: {}", status.message());
    if crate::connect::a_new_connection_may_cure(status.code())
        && let Ok(current) = connection.get().await
    {
        connection.drop_connection(current.generation).await;
    }
    None
}

/// The `SyncError` event that shows a host agent's refusal on the virtual object.
pub(crate) fn refusal_event(reason: PodRefusalReason, message: String) -> KubeEvent {
    KubeEvent {
        type_: EventType::Warning,
        reason: "SyncError".into(),
        note: Some(message),
        action: format!(
            "Sync/{}",
            reason
                .as_str_name()
                .trim_start_matches("POD_REFUSAL_REASON_")
                .to_lowercase()
        ),
        secondary: None,
    }
}

/// Resolves at `at`; never without one.
pub(crate) async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What the host holds for a virtual object (or refused to), as its syncer last applied it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Held {
    /// The virtual object's uid.
    pub(crate) uid: String,
    /// A digest of what was sent (0: nothing that stands, send it again).
    pub(crate) sent: u64,
    /// Why the host agent refused it, if it did (the message is in the syncer's refusals).
    pub(crate) refused: Option<PodRefusalReason>,
}

impl Held {
    /// Whether what was sent for the object of `uid` whose body digests to `sent` stands: held,
    /// or refused for a reason only a change of the object or of the tenant's policy cures.
    pub(crate) fn stands(&self, uid: &str, sent: u64) -> bool {
        self.uid == uid
            && self.sent == sent
            && self
                .refused
                .is_none_or(|reason| Outcome::after_refusal(reason) == Outcome::Done)
    }
}

/// The longest a failed operation on an object (or the collection) waits before its next try.
pub(crate) const RETRY_MAX: Duration = Duration::from_secs(30);

/// The longest an object refused for a reason the host may cure (its host name held by another
/// object, the host namespace's quota full) waits before it is asked again.
pub(crate) const REFUSED_RETRY_MAX: Duration = Duration::from_secs(60);

/// What one look at an object came to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Nothing left to do until the object or the tenant's policy changes.
    Done,
    /// Refused in a way the host may cure (a name another object holds, the host API server's
    /// quota): tried again later.
    Refused,
}

impl Outcome {
    /// What a refusal for `reason` leaves to do: one only the tenant's policy (`DISABLED`) or an
    /// edit of the object (`UNSUPPORTED`) cures waits for that change; any other depends on the
    /// host's objects, and is asked again.
    pub(crate) fn after_refusal(reason: PodRefusalReason) -> Self {
        match reason {
            PodRefusalReason::Unsupported | PodRefusalReason::Disabled => Outcome::Done,
            _ => Outcome::Refused,
        }
    }
}

/// When a syncer looks at each virtual object next, when it compares the host's list with the
/// virtual objects (after each relist), and the backoffs and the rate-limit pause that set both.
#[derive(Default)]
pub(crate) struct Schedule {
    /// Objects to look at, and when.
    pub(crate) due: BTreeMap<Key, Instant>,
    /// Each failing (or refused) object's backoff.
    backoffs: HashMap<Key, Backoff>,
    /// When to compare the host's objects with the virtual ones.
    collect_at: Option<Instant>,
    collect_backoff: Option<Backoff>,
    /// Nothing is sent over the tenant's rate limit before this.
    paused_until: Option<Instant>,
}

impl Schedule {
    /// Looks at `key` at the next pass.
    pub(crate) fn now(&mut self, key: Key) {
        self.due.insert(key, Instant::now());
    }

    /// Compares the host's list with the virtual objects at the next pass.
    pub(crate) fn collect_now(&mut self) {
        self.collect_at = Some(Instant::now());
    }

    /// Sends nothing before `until` (the tenant's rate limit).
    pub(crate) fn pause_until(&mut self, until: Instant) {
        self.paused_until = Some(until);
    }

    /// Whether the tenant's rate limit holds every call back now.
    pub(crate) fn paused(&self) -> bool {
        self.paused_until.is_some_and(|until| Instant::now() < until)
    }

    /// Whether the collection is due at `now`.
    pub(crate) fn collect_due(&self, now: Instant) -> bool {
        self.collect_at.is_some_and(|at| at <= now)
    }

    /// Records how the collection went: done, or tried again after its backoff (up to `cap`).
    pub(crate) fn collected(&mut self, ok: bool, cap: Duration) {
        if ok {
            self.collect_at = None;
            self.collect_backoff = None;
        } else {
            let delay = self
                .collect_backoff
                .get_or_insert_with(|| Backoff::new(Duration::from_millis(200), cap))
                .next_delay();
            self.collect_at = Some(Instant::now() + delay);
        }
    }

    /// The objects due at `now` (each taken off the schedule with [`Schedule::take`] as it is
    /// looked at, so a pause leaves the rest due).
    pub(crate) fn due_at(&self, now: Instant) -> Vec<Key> {
        self.due
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(key, _)| key.clone())
            .collect()
    }

    /// Takes `key` off the schedule: it is being looked at.
    pub(crate) fn take(&mut self, key: &Key) {
        self.due.remove(key);
    }

    /// `key` is as it should be: its backoff starts afresh next time.
    pub(crate) fn settled(&mut self, key: &Key) {
        self.backoffs.remove(key);
    }

    /// Looks at `key` again after its backoff (up to `cap`); the delay.
    pub(crate) fn later(&mut self, key: Key, cap: Duration) -> Duration {
        let delay = self
            .backoffs
            .entry(key.clone())
            .or_insert_with(|| Backoff::new(Duration::from_millis(200), cap))
            .up_to(cap)
            .next_delay();
        self.due.insert(key, Instant::now() + delay);
        delay
    }

    /// When the syncer has work next: the earliest due object or collection, not before a pause
    /// ends.
    pub(crate) fn next_wake(&self) -> Option<Instant> {
        let next = self.due.values().copied().chain(self.collect_at).min()?;
        Some(self.paused_until.map_or(next, |until| next.max(until)))
    }
}

/// What an object syncer (budgets, claims) does for [`work`]: its calls to the host agent, and
/// its books (the schedule and the board).
pub(crate) trait ObjectSync {
    /// The syncer's state between events.
    type Books;
    /// The kind synced, as messages name it (`PodDisruptionBudget`).
    const KIND: &'static str;

    /// The connection the calls go over.
    fn connection(&self) -> &SharedClients;
    /// The counter of failed calls (`rcsync_…_errors_total`).
    fn errors(&self) -> &Counter;
    /// The books' schedule.
    fn schedule(books: &mut Self::Books) -> &mut Schedule;
    /// Shows where object `key` stands after an attempt (`failed`: why it failed).
    fn post(books: &Self::Books, key: &Key, failed: Option<&str>);
    /// Deletes the host's objects whose virtual object is gone (after a relist).
    async fn collect(&mut self, books: &mut Self::Books) -> Result<(), tonic::Status>;
    /// Brings the host's copy of object `key` in line with the virtual cluster.
    async fn reconcile(&mut self, books: &mut Self::Books, key: &Key) -> Result<Outcome, tonic::Status>;
}

/// Does what is due for `syncer`: the collection after a relist, then each due object; a failure
/// is tried again after its backoff, a refusal the host may cure after [`REFUSED_RETRY_MAX`] at
/// most, and over the tenant's rate nothing is sent before the delay the host agent asked for.
pub(crate) async fn work<S: ObjectSync>(syncer: &mut S, books: &mut S::Books) {
    let now = Instant::now();
    if S::schedule(books).paused() {
        return;
    }
    if S::schedule(books).collect_due(now) {
        let collected = syncer.collect(books).await;
        if let Err(status) = &collected {
            failed(syncer, books, status, &format!("list the host's {}s", S::KIND)).await;
        }
        S::schedule(books).collected(collected.is_ok(), RETRY_MAX);
    }
    for key in S::schedule(books).due_at(now) {
        if S::schedule(books).paused() {
            break;
        }
        S::schedule(books).take(&key);
        let result = syncer.reconcile(books, &key).await;
        match &result {
            // Over the tenant's rate: it stands as it stood until its turn comes.
            Err(status) if status.code() == tonic::Code::ResourceExhausted => {}
            Err(status) => S::post(books, &key, Some(status.message())),
            Ok(_) => S::post(books, &key, None),
        }
        match result {
            Ok(Outcome::Done) => S::schedule(books).settled(&key),
            Ok(Outcome::Refused) => {
                S::schedule(books).later(key, REFUSED_RETRY_MAX);
            }
            Err(status) => {
                failed(syncer, books, &status, &format!("sync the {}", S::KIND)).await;
                let delay = S::schedule(books).later(key.clone(), RETRY_MAX);
                tracing::warn!(
                    namespace = %key.0, name = %key.1, error = %status.message(), ?delay,
                    "syncing a {} failed; retrying", S::KIND
                );
            }
        }
    }
}

/// Notes a failed call of `syncer` (see [`call_failed`]); over the tenant's rate limit, pauses
/// every call for the delay asked.
async fn failed<S: ObjectSync>(syncer: &S, books: &mut S::Books, status: &tonic::Status, attempt: &str) {
    if let Some(until) = call_failed(syncer.connection(), syncer.errors(), status, attempt).await {
        S::schedule(books).pause_until(until);
    }
}

/// The host objects a status stream reported since it last (re)opened, until its listing is
/// complete: a held object it did not list went while no stream was open (deleted on the host
/// meanwhile, or while the host agent restarted), which no `DELETED` will say.
#[derive(Default)]
pub(crate) struct HostListing(Option<std::collections::HashSet<Key>>);

impl HostListing {
    /// The stream (re)opened: a listing begins.
    pub(crate) fn opened(&mut self) {
        self.0 = Some(std::collections::HashSet::new());
    }

    /// The host holds `key`.
    pub(crate) fn present(&mut self, key: Key) {
        if let Some(listed) = &mut self.0 {
            listed.insert(key);
        }
    }

    /// The listing is complete: of `held`, those it did not report (none when no listing since an
    /// opening was under way, as after a relist within the stream, which reports what went).
    pub(crate) fn missing<'a>(&mut self, held: impl Iterator<Item = &'a Key>) -> Vec<Key> {
        match self.0.take() {
            Some(listed) => held.filter(|key| !listed.contains(*key)).cloned().collect(),
            None => Vec::new(),
        }
    }
}

/// What a [`FeedTask`] passes on: each (re)opening of its stream, then the stream's messages.
#[derive(Debug)]
pub(crate) enum Feed<T> {
    /// The stream was opened (again): what follows is the host agent's state anew.
    Opened,
    /// One message of the stream.
    Message(T),
}

/// A [`stream_feed`] running as a task of its own, aborted when this handle is dropped (with the
/// syncer that holds it, when a term is lost).
///
/// Its own task, not a future the syncer polls in its loop: connecting, the feed holds the shared
/// connection's lock ([`SharedClients::get`]) across an await; polled in the loop, it was not
/// polled while the loop awaited a call, and that call waited for the lock: every call of every
/// syncer and Pod shard over the shared connection then waited for ever (found by the chaos run of
/// seed 1128).
pub(crate) struct FeedTask(tokio::task::JoinHandle<()>);

impl FeedTask {
    /// Spawns [`stream_feed`] with these arguments, on the connection the syncers' calls use.
    pub(crate) fn spawn<T, F, Fut>(
        connection: Arc<SharedClients>,
        what: &'static str,
        open: F,
        tx: tokio::sync::mpsc::Sender<Feed<T>>,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Self
    where
        T: Send + 'static,
        F: Fn(PodClient) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>>
            + Send
            + 'static,
    {
        let connect = move || {
            let connection = connection.clone();
            async move { Ok(connection.get().await?.pods) }
        };
        Self(tokio::spawn(stream_feed(connect, what, open, tx, shutdown)))
    }
}

impl Drop for FeedTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keeps a server stream of the host agent (`what`, for logs) open, reconnecting with backoff, and
/// forwards each opening and its messages to `tx` until `shutdown` or the receiver goes: `connect`
/// gives the PodSync client to open it on (the connection the syncers' calls use, or one of its
/// own), `open` starts it there.
pub(crate) async fn stream_feed<T, C, CFut, F, Fut>(
    connect: C,
    what: &'static str,
    open: F,
    tx: tokio::sync::mpsc::Sender<Feed<T>>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) where
    C: Fn() -> CFut,
    CFut: std::future::Future<Output = anyhow::Result<PodClient>>,
    F: Fn(PodClient) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(250), crate::connect::RECONNECT_MAX);
    loop {
        let session = async {
            let pods = connect().await?;
            let mut stream = open(pods).await?.into_inner();
            if tx.send(Feed::Opened).await.is_err() {
                return anyhow::Ok(());
            }
            while let Some(message) = stream.message().await? {
                backoff.reset();
                if tx.send(Feed::Message(message)).await.is_err() {
                    break;
                }
            }
            anyhow::Ok(())
        };
        tokio::select! {
            _ = shutdown.changed() => return,
            result = session => {
                if let Err(e) = result {
                    tracing::warn!(error = format!("{e:#}"), "{what} stream failed");
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

    fn held(refused: Option<PodRefusalReason>) -> Held {
        Held {
            uid: "u".into(),
            sent: 7,
            refused,
        }
    }

    #[test]
    fn a_refusal_the_host_may_cure_is_asked_again_and_one_only_an_edit_cures_is_not() {
        assert!(held(None).stands("u", 7));
        assert!(!held(None).stands("u", 8), "an edit is sent");
        assert!(!held(None).stands("v", 7), "a new object of the name is sent");
        for reason in [PodRefusalReason::Unsupported, PodRefusalReason::Disabled] {
            assert!(
                held(Some(reason)).stands("u", 7),
                "{reason:?} waits for an edit or the policy"
            );
            assert_eq!(Outcome::after_refusal(reason), Outcome::Done);
        }
        for reason in [PodRefusalReason::NameInUse, PodRefusalReason::HostRefused] {
            assert!(!held(Some(reason)).stands("u", 7), "{reason:?} is asked again");
            assert_eq!(Outcome::after_refusal(reason), Outcome::Refused);
        }
    }
}
