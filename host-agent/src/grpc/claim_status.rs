//! `WatchClaimStatus`'s feed: the status of a tenant's host PersistentVolumeClaims, by the virtual
//! claim each was made for, so the virtual claims show `Bound` and their capacity.
//!
//! ```text
//!  watch host claims labelled managed-by=<tenant> ──►
//!     ├─ new claim, or a status other than the last one sent ──► UPDATED
//!     ├─ deleted, or missing from a relist ───────────────────► DELETED
//!     └─ relist complete ─────────────────────────────────────► INITIAL_STATE_COMPLETE
//! ```

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash as _, Hasher as _};
use std::pin::Pin;

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::runtime::watcher::{self, Event};
use rcsync_proto::v1::{ClaimStatusEvent, ClaimStatusEventType, VirtualObject};
use tokio::sync::{mpsc, watch};
use tonic::Status;

use crate::translate::recorded_ref;

/// A watch of host claims.
pub type ClaimWatch =
    Pin<Box<dyn Stream<Item = Result<Event<PersistentVolumeClaim>, watcher::Error>> + Send>>;

/// What the feed remembers of a host claim it reported: the virtual claim and a digest of its uid
/// and the status last sent.
struct Reported {
    claim: VirtualObject,
    digest: u64,
}

/// The `UPDATED` event for a host claim and what to remember of it; `None` for a claim without a
/// recorded virtual identity (not one rcsync wrote).
fn updated(claim: &PersistentVolumeClaim) -> Option<(ClaimStatusEvent, Reported)> {
    let id = recorded_ref(&claim.metadata)?;
    let status_json = serde_json::to_vec(&claim.status).unwrap_or_default();
    let mut hasher = DefaultHasher::new();
    id.uid.hash(&mut hasher);
    status_json.hash(&mut hasher);
    let virtual_claim = VirtualObject {
        namespace: id.namespace,
        name: id.name,
        uid: id.uid,
    };
    let event = ClaimStatusEvent {
        r#type: ClaimStatusEventType::Updated as i32,
        claim: Some(virtual_claim.clone()),
        status_json,
    };
    Some((
        event,
        Reported {
            claim: virtual_claim,
            digest: hasher.finish(),
        },
    ))
}

fn deleted(claim: VirtualObject) -> ClaimStatusEvent {
    ClaimStatusEvent {
        r#type: ClaimStatusEventType::Deleted as i32,
        claim: Some(claim),
        status_json: Vec::new(),
    }
}

/// The events for one watch event, updating what was reported (`known`, by host name) and, during
/// a relist, what it found (`relisted`).
fn events_for(
    event: Event<PersistentVolumeClaim>,
    known: &mut HashMap<String, Reported>,
    relisted: &mut Option<HashMap<String, Reported>>,
) -> Vec<ClaimStatusEvent> {
    // The claim's event when it is new or changed since it was last sent; remembered in `into`.
    fn seen(
        claim: &PersistentVolumeClaim,
        known: &HashMap<String, Reported>,
        into: &mut HashMap<String, Reported>,
    ) -> Option<ClaimStatusEvent> {
        let name = claim.metadata.name.clone().unwrap_or_default();
        let (event, reported) = updated(claim)?;
        let changed = known.get(&name).is_none_or(|k| k.digest != reported.digest);
        into.insert(name, reported);
        changed.then_some(event)
    }
    match event {
        Event::Init => {
            *relisted = Some(HashMap::new());
            Vec::new()
        }
        Event::InitApply(claim) => match relisted {
            Some(r) => seen(&claim, known, r).into_iter().collect(),
            None => Vec::new(),
        },
        Event::Apply(claim) => {
            let mut into = HashMap::new();
            let out = seen(&claim, known, &mut into).into_iter().collect();
            known.extend(into);
            out
        }
        Event::Delete(claim) => {
            let name = claim.metadata.name.clone().unwrap_or_default();
            known
                .remove(&name)
                .map(|r| deleted(r.claim))
                .into_iter()
                .collect()
        }
        Event::InitDone => {
            let fresh = relisted.take().unwrap_or_default();
            let mut out: Vec<ClaimStatusEvent> = known
                .drain()
                .filter(|(name, _)| !fresh.contains_key(name))
                .map(|(_, reported)| deleted(reported.claim))
                .collect();
            *known = fresh;
            out.push(ClaimStatusEvent {
                r#type: ClaimStatusEventType::InitialStateComplete as i32,
                ..Default::default()
            });
            out
        }
    }
}

/// Feeds `tx` from the watch of the tenant's host claims until the client goes, the watch ends,
/// `shutdown`, or `ended` says why the stream may not go on (then that status ends it).
pub async fn stream_claim_status(
    mut claims: ClaimWatch,
    tx: mpsc::Sender<Result<ClaimStatusEvent, Status>>,
    mut shutdown: watch::Receiver<bool>,
    ended: impl std::future::Future<Output = Status>,
) {
    let mut known = HashMap::new();
    let mut relisted = None;
    let mut ended = std::pin::pin!(ended);
    loop {
        let out = tokio::select! {
            _ = shutdown.changed() => return,
            _ = tx.closed() => return,
            status = &mut ended => {
                let _ = tx.send(Err(status)).await;
                return;
            }
            event = claims.next() => match event {
                None => return,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "watching host claims failed; retrying with backoff");
                    continue;
                }
                Some(Ok(event)) => events_for(event, &mut known, &mut relisted),
            },
        };
        for event in out {
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn host_claim(name: &str, uid: &str, phase: &str) -> PersistentVolumeClaim {
        serde_json::from_value(json!({
            "metadata": {"name": format!("{name}-x-default-x-team-a"), "annotations": {
                "vcluster.loft.sh/object-namespace": "default",
                "vcluster.loft.sh/object-name": name,
                "vcluster.loft.sh/object-uid": uid,
            }},
            "spec": {"accessModes": ["ReadWriteOnce"]},
            "status": {"phase": phase},
        }))
        .unwrap()
    }

    fn kinds(events: &[ClaimStatusEvent]) -> Vec<(ClaimStatusEventType, String)> {
        events
            .iter()
            .map(|e| {
                (
                    e.r#type(),
                    e.claim.as_ref().map(|c| c.name.clone()).unwrap_or_default(),
                )
            })
            .collect()
    }

    #[test]
    fn a_claims_status_is_sent_when_it_changes_and_its_deletion_when_it_goes() {
        let (mut known, mut relisted) = (HashMap::new(), None);
        let mut feed = |event| events_for(event, &mut known, &mut relisted);
        let out = feed(Event::Apply(host_claim("data", "u1", "Pending")));
        assert_eq!(kinds(&out), [(ClaimStatusEventType::Updated, "data".to_string())]);
        assert_eq!(out[0].claim.as_ref().unwrap().uid, "u1");
        assert!(
            feed(Event::Apply(host_claim("data", "u1", "Pending"))).is_empty(),
            "unchanged"
        );
        let bound = feed(Event::Apply(host_claim("data", "u1", "Bound")));
        let status: serde_json::Value = serde_json::from_slice(&bound[0].status_json).unwrap();
        assert_eq!(status, json!({"phase": "Bound"}));
        assert_eq!(
            kinds(&feed(Event::Delete(host_claim("data", "u1", "Bound")))),
            [(ClaimStatusEventType::Deleted, "data".to_string())]
        );
        let mut unmanaged = host_claim("other", "u2", "Bound");
        unmanaged.metadata.annotations = None;
        assert!(feed(Event::Apply(unmanaged)).is_empty(), "not one rcsync wrote");
    }

    #[test]
    fn a_relist_reports_claims_gone_meanwhile_and_only_changed_statuses() {
        let (mut known, mut relisted) = (HashMap::new(), None);
        let mut feed = |event| events_for(event, &mut known, &mut relisted);
        feed(Event::Apply(host_claim("a", "u1", "Bound")));
        feed(Event::Apply(host_claim("b", "u2", "Bound")));
        assert!(feed(Event::Init).is_empty());
        assert!(feed(Event::InitApply(host_claim("a", "u1", "Bound"))).is_empty());
        let out = feed(Event::InitDone);
        assert_eq!(
            kinds(&out),
            [
                (ClaimStatusEventType::Deleted, "b".to_string()),
                (ClaimStatusEventType::InitialStateComplete, String::new())
            ]
        );
    }
}
