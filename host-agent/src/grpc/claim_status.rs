//! `WatchClaimStatus`'s feed: the status of a tenant's host PersistentVolumeClaims, by the virtual
//! claim each was made for, so the virtual claims show `Bound` and their capacity.
//!
//! ```text
//!  watch host claims labelled managed-by=<tenant> ──►
//!     ├─ new claim, or a status other than the last one sent ──► UPDATED
//!     ├─ deleted, or missing from a relist ───────────────────► DELETED
//!     └─ relist complete ─────────────────────────────────────► INITIAL_STATE_COMPLETE
//!  then, when asked for: watch host events about claims ──► HOST_EVENT (see `host_events`)
//! ```

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash as _, Hasher as _};

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::runtime::watcher::Event;
use rcsync_proto::v1::{ClaimStatusEvent, ClaimStatusEventType, VirtualObject};

use crate::grpc::host_events::{Addressed, ReportedObject};
use crate::grpc::status_stream::Reporting;
use crate::translate::recorded_ref;

/// What the feed remembers of a host claim it reported.
pub struct ReportedClaim {
    /// The virtual claim it was made for.
    claim: VirtualObject,
    /// Digest of the virtual uid and the status last sent.
    digest: u64,
    /// The host claim's uid (host events name their claim by it).
    host_uid: String,
}

/// What `WatchClaimStatus` reports: the tenant's host claims (see the module docs).
pub struct ClaimReporting;

impl Reporting for ClaimReporting {
    type Object = PersistentVolumeClaim;
    type Reported = ReportedClaim;
    type Message = ClaimStatusEvent;
    const WATCHED: &'static str = "host claims";

    fn events_for(
        event: Event<PersistentVolumeClaim>,
        known: &mut HashMap<String, ReportedClaim>,
        relisted: &mut Option<HashMap<String, ReportedClaim>>,
    ) -> Vec<ClaimStatusEvent> {
        // The claim's event when it is new or changed since it was last sent; remembered in `into`.
        fn seen(
            claim: &PersistentVolumeClaim,
            known: &HashMap<String, ReportedClaim>,
            into: &mut HashMap<String, ReportedClaim>,
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

    fn listed(message: &ClaimStatusEvent) -> bool {
        message.r#type() == ClaimStatusEventType::InitialStateComplete
    }

    fn reported(reported: &ReportedClaim) -> ReportedObject<'_> {
        let claim = &reported.claim;
        ReportedObject {
            host_uid: &reported.host_uid,
            virtual_object: (&claim.namespace, &claim.name, &claim.uid),
        }
    }

    fn host_event(addressed: Addressed) -> Option<ClaimStatusEvent> {
        Some(ClaimStatusEvent {
            r#type: ClaimStatusEventType::HostEvent as i32,
            claim: Some(VirtualObject {
                namespace: addressed.namespace,
                name: addressed.name,
                uid: addressed.uid,
            }),
            host_event: Some(addressed.event),
            ..Default::default()
        })
    }
}

/// The `UPDATED` event for a host claim and what to remember of it; `None` for a claim without a
/// recorded virtual identity (not one rcsync wrote).
fn updated(claim: &PersistentVolumeClaim) -> Option<(ClaimStatusEvent, ReportedClaim)> {
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
        host_event: None,
    };
    Some((
        event,
        ReportedClaim {
            claim: virtual_claim,
            digest: hasher.finish(),
            host_uid: claim.metadata.uid.clone().unwrap_or_default(),
        },
    ))
}

fn deleted(claim: VirtualObject) -> ClaimStatusEvent {
    ClaimStatusEvent {
        r#type: ClaimStatusEventType::Deleted as i32,
        claim: Some(claim),
        status_json: Vec::new(),
        host_event: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn host_claim(name: &str, uid: &str, phase: &str) -> PersistentVolumeClaim {
        serde_json::from_value(json!({
            "metadata": {"name": format!("{name}-x-default-x-team-a"), "uid": format!("host-{uid}"), "annotations": {
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
        let mut feed = |event| ClaimReporting::events_for(event, &mut known, &mut relisted);
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
        let mut feed = |event| ClaimReporting::events_for(event, &mut known, &mut relisted);
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

    #[test]
    fn a_host_event_about_a_reported_claim_goes_to_its_virtual_claim() {
        let (mut known, mut relisted) = (HashMap::new(), None);
        ClaimReporting::events_for(
            Event::Apply(host_claim("data", "u1", "Pending")),
            &mut known,
            &mut relisted,
        );
        let mut feed = crate::grpc::host_events::HostEventFeed::new("vc-team-a".into());
        let event = |uid: &str, about_uid: &str| {
            serde_json::from_value(json!({
                "metadata": {"name": format!("e.{uid}"), "namespace": "vc-team-a", "uid": uid},
                "involvedObject": {"kind": "PersistentVolumeClaim", "namespace": "vc-team-a",
                                   "name": "data-x-default-x-team-a", "uid": about_uid},
                "reason": "ProvisioningFailed", "type": "Warning",
                "message": "storageclass.storage.k8s.io \"fast\" not found",
                "source": {"component": "persistentvolume-controller"}, "count": 1,
            }))
            .unwrap()
        };
        let out = feed.on_watch_event(Event::Apply(event("e1", "host-u1")), |name| {
            known.get(name).map(ClaimReporting::reported)
        });
        let messages: Vec<ClaimStatusEvent> =
            out.into_iter().filter_map(ClaimReporting::host_event).collect();
        assert_eq!(
            kinds(&messages),
            [(ClaimStatusEventType::HostEvent, "data".to_string())]
        );
        assert_eq!(messages[0].claim.as_ref().unwrap().uid, "u1");
        let host_event = messages[0].host_event.as_ref().unwrap();
        assert_eq!(host_event.reason, "ProvisioningFailed");
        // An event about an earlier claim of the name (another host uid) is not the virtual
        // claim's.
        let out = feed.on_watch_event(Event::Apply(event("e2", "host-u0")), |name| {
            known.get(name).map(ClaimReporting::reported)
        });
        assert!(out.is_empty());
    }
}
