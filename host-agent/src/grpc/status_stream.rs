//! The loop the status streams run (`WatchPodStatus`, `WatchClaimStatus`,
//! `WatchDisruptionBudgets`): a watch of the tenant's host objects turned into messages by a
//! [`Reporting`], and, when the client asked for them, the host events about those objects
//! ([`HostEventFeed`]); for Pods, the copies written for them that are deleted under them, or
//! missing from a listing while a Pod records them ([`LostCopies`]).
//!
//! ```text
//!  watch of the tenant's host objects ──► Reporting::events_for ──► messages ──► client
//!                                                        │ (once the initial state was sent)
//!  watch of host events about them ──► HostEventFeed ──► Reporting::host_event ──┤
//!  watch of their copies ──► LostCopies ──► Reporting::copy_lost ────────────────┘
//! ```
//!
//! The events watch is read only once the objects' initial state was sent, so an event finds the
//! object it is about; an event that comes before its object is parked until the object is
//! reported (a report looks at its own object's parked events only; a relist's end at all).

use std::collections::HashMap;
use std::pin::Pin;

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::Event as CoreEvent;
use kube::ResourceExt as _;
use kube::runtime::watcher::{self, Event};
use tokio::sync::{mpsc, watch};
use tonic::Status;

use crate::grpc::host_events::{Addressed, HostEventFeed, ReportedObject};
use crate::grpc::lost_copies::{CopyWatch, LostCopies, LostCopy, RecordedCopy};

/// A watch of host objects of kind `K`.
pub type ObjectWatch<K> = Pin<Box<dyn Stream<Item = Result<Event<K>, watcher::Error>> + Send>>;

/// A watch of the host events about objects of the tenant's host namespace.
pub type EventWatch = ObjectWatch<CoreEvent>;

/// What one status stream reports: how a watch event of its host objects becomes messages, and how
/// a host event about one is sent.
pub trait Reporting {
    /// The host object watched.
    type Object: kube::Resource + Send;
    /// What the stream remembers of a host object it reported (by host name).
    type Reported: Send;
    /// The stream's message.
    type Message: Send;
    /// The objects watched, as logs name them (`host pods`).
    const WATCHED: &'static str;

    /// The messages for one watch event, updating what was reported: `known` holds the objects
    /// the client knows about; `relisted` those seen since a relist began (to report the ones it
    /// no longer has).
    fn events_for(
        event: Event<Self::Object>,
        known: &mut HashMap<String, Self::Reported>,
        relisted: &mut Option<HashMap<String, Self::Reported>>,
    ) -> Vec<Self::Message>;

    /// Whether `message` says every host object was reported.
    fn listed(message: &Self::Message) -> bool;

    /// A reported object, as the host events about it need it.
    fn reported(reported: &Self::Reported) -> ReportedObject<'_>;

    /// The message that carries a host event; `None` where the stream carries none.
    fn host_event(_addressed: Addressed) -> Option<Self::Message> {
        None
    }

    /// The message that tells the client `copy`, written for the reported object, was deleted;
    /// `None` where the stream's objects own no copies.
    fn copy_lost(_reported: &Self::Reported, _copy: &LostCopy) -> Option<Self::Message> {
        None
    }

    /// The copies written for a reported object, as it records them; a listing of copies that
    /// lacks one reports it lost.
    fn recorded_copies(_reported: &Self::Reported) -> &[RecordedCopy] {
        &[]
    }
}

/// Where a status stream's loop puts the messages its client reads.
pub type Outbox<M> = mpsc::Sender<Box<Result<M, Status>>>;

/// The messages a status stream's client reads.
pub type Inbox<M> = Pin<Box<dyn Stream<Item = Result<M, Status>> + Send>>;

/// A status stream's [`Outbox`] and the response stream it feeds. Messages travel boxed: a
/// channel allocates its slots 32 at a time, and 32 unboxed `PodStatusEvent` results took 12 KiB
/// per open stream (12 MiB at 1,000 tenants) before the first message.
pub fn outbox<M: Send + 'static>() -> (Outbox<M>, Inbox<M>) {
    let (tx, rx) = mpsc::channel(64);
    (
        tx,
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx).map(|message| *message)),
    )
}

/// Feeds `tx` from the watch `objects` and, when asked for, the watch of host events
/// `host_events` and the watch of the objects' `copies`, until the client goes, a watch ends,
/// `shutdown`, or `ended` says why the stream may not go on (its tenant removed from the config,
/// moved to another host namespace, a switch turned): then that status ends it.
pub async fn stream<R: Reporting>(
    mut objects: ObjectWatch<R::Object>,
    host_events: Option<(EventWatch, HostEventFeed)>,
    mut copies: Option<CopyWatch>,
    tx: Outbox<R::Message>,
    mut shutdown: watch::Receiver<bool>,
    ended: impl std::future::Future<Output = Status>,
) {
    let mut known: HashMap<String, R::Reported> = HashMap::new();
    let mut relisted: Option<HashMap<String, R::Reported>> = None;
    let mut listed = false;
    let (mut event_watch, mut feed) =
        host_events.map_or((None, None), |(watch, feed)| (Some(watch), Some(feed)));
    let mut lost = LostCopies::default();
    let mut ended = std::pin::pin!(ended);
    loop {
        let out = tokio::select! {
            _ = shutdown.changed() => return,
            _ = tx.closed() => return,
            status = &mut ended => {
                let _ = tx.send(Box::new(Err(status))).await;
                return;
            }
            event = objects.next() => match event {
                None => return,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "watching {} failed; retrying with backoff", R::WATCHED);
                    continue;
                }
                Some(Ok(event)) => {
                    // Whose parked host events may now find their object: the one this event
                    // reports, or, once a relist is complete, any.
                    let reported = match &event {
                        Event::Apply(object) => Some(Some(object.name_any())),
                        Event::InitDone => Some(None),
                        _ => None,
                    };
                    let mut out = R::events_for(event, &mut known, &mut relisted);
                    listed |= out.iter().any(R::listed);
                    if let (Some(feed), Some(name)) = (&mut feed, reported) && !out.is_empty() {
                        let parked = feed.on_reported(name.as_deref(), |name| known.get(name).map(R::reported));
                        out.extend(parked.into_iter().filter_map(R::host_event));
                    }
                    out
                }
            },
            event = next_or_never(&mut event_watch), if listed => match (event, &mut feed) {
                (None, _) => return,
                (Some(Err(e)), _) => {
                    tracing::warn!(error = %e, "watching host events failed; retrying with backoff");
                    continue;
                }
                (Some(Ok(event)), Some(feed)) => feed
                    .on_watch_event(event, |name| known.get(name).map(R::reported))
                    .into_iter()
                    .filter_map(R::host_event)
                    .collect(),
                (Some(Ok(_)), None) => Vec::new(),
            },
            copy = next_or_never(&mut copies), if listed => match copy {
                None => return,
                Some((kind, Err(e))) => {
                    tracing::warn!(error = %e, "watching the {kind} copies failed; retrying with backoff");
                    continue;
                }
                Some((kind, Ok(event))) => {
                    let listing_done = matches!(event, Event::InitDone);
                    let mut gone = lost.on_event(kind, event);
                    if listing_done {
                        let pods = known
                            .iter()
                            .map(|(name, r)| (name.as_str(), R::reported(r).host_uid, R::recorded_copies(r)));
                        let missing = lost.missing(kind, pods, &gone);
                        gone.extend(missing);
                    }
                    gone.iter()
                    .flat_map(|copy| {
                        copy.owners
                            .iter()
                            .filter_map(|(name, uid)| known.get(name).filter(|r| R::reported(r).host_uid == uid))
                            .filter_map(|reported| R::copy_lost(reported, copy))
                            .collect::<Vec<_>>()
                    })
                    .collect()
                }
            },
        };
        for message in out {
            if tx.send(Box::new(Ok(message))).await.is_err() {
                return;
            }
        }
    }
}

/// The next item of `watch`; never resolves without one.
async fn next_or_never<S: Stream + Unpin>(watch: &mut Option<S>) -> Option<S::Item> {
    match watch {
        Some(watch) => watch.next().await,
        None => std::future::pending().await,
    }
}
