//! `WatchDisruptionBudgets`'s feed: which of a tenant's PodDisruptionBudgets the host holds, by
//! the virtual budget each was made for, so the virtual side makes again one deleted on the host
//! while its virtual budget stays (a drain would otherwise evict the tenant's replicas unguarded).
//!
//! ```text
//!  metadata watch of host budgets labelled managed-by=<tenant> ──►
//!     ├─ new budget, or made for another virtual uid ──► PRESENT
//!     ├─ deleted, or missing from a relist ────────────► DELETED
//!     └─ relist complete ──────────────────────────────► INITIAL_STATE_COMPLETE
//! ```

use std::collections::HashMap;

use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::core::PartialObjectMeta;
use kube::runtime::watcher::Event;
use rcsync_proto::v1::{DisruptionBudgetEvent, DisruptionBudgetEventType, VirtualObject};

use crate::grpc::host_events::ReportedObject;
use crate::grpc::status_stream::Reporting;
use crate::translate::recorded_ref;

/// A host budget as the feed reads it: its metadata (the virtual identity is in its annotations).
pub type HostBudget = PartialObjectMeta<PodDisruptionBudget>;

/// What the feed remembers of a host budget it reported.
pub struct ReportedBudget {
    /// The virtual budget it was made for.
    budget: VirtualObject,
    /// The host budget's uid.
    host_uid: String,
}

/// What `WatchDisruptionBudgets` reports: the tenant's host budgets (see the module docs).
pub struct BudgetReporting;

impl Reporting for BudgetReporting {
    type Object = HostBudget;
    type Reported = ReportedBudget;
    type Message = DisruptionBudgetEvent;
    const WATCHED: &'static str = "host budgets";

    fn events_for(
        event: Event<HostBudget>,
        known: &mut HashMap<String, ReportedBudget>,
        relisted: &mut Option<HashMap<String, ReportedBudget>>,
    ) -> Vec<DisruptionBudgetEvent> {
        // The budget's PRESENT when it is new to the client; remembered in `into`.
        fn seen(
            budget: &HostBudget,
            known: &HashMap<String, ReportedBudget>,
            into: &mut HashMap<String, ReportedBudget>,
        ) -> Option<DisruptionBudgetEvent> {
            let name = budget.metadata.name.clone().unwrap_or_default();
            let id = recorded_ref(&budget.metadata)?;
            let reported = ReportedBudget {
                budget: VirtualObject {
                    namespace: id.namespace,
                    name: id.name,
                    uid: id.uid,
                },
                host_uid: budget.metadata.uid.clone().unwrap_or_default(),
            };
            let new = known
                .get(&name)
                .is_none_or(|k| k.budget.uid != reported.budget.uid);
            let event = new.then(|| message(DisruptionBudgetEventType::Present, &reported.budget));
            into.insert(name, reported);
            event
        }
        match event {
            Event::Init => {
                *relisted = Some(HashMap::new());
                Vec::new()
            }
            Event::InitApply(budget) => match relisted {
                Some(r) => seen(&budget, known, r).into_iter().collect(),
                None => Vec::new(),
            },
            Event::Apply(budget) => {
                let mut into = HashMap::new();
                let out = seen(&budget, known, &mut into).into_iter().collect();
                known.extend(into);
                out
            }
            Event::Delete(budget) => {
                let name = budget.metadata.name.clone().unwrap_or_default();
                known
                    .remove(&name)
                    .map(|r| message(DisruptionBudgetEventType::Deleted, &r.budget))
                    .into_iter()
                    .collect()
            }
            Event::InitDone => {
                let fresh = relisted.take().unwrap_or_default();
                let mut out: Vec<DisruptionBudgetEvent> = known
                    .drain()
                    .filter(|(name, _)| !fresh.contains_key(name))
                    .map(|(_, r)| message(DisruptionBudgetEventType::Deleted, &r.budget))
                    .collect();
                *known = fresh;
                out.push(DisruptionBudgetEvent {
                    r#type: DisruptionBudgetEventType::InitialStateComplete as i32,
                    budget: None,
                });
                out
            }
        }
    }

    fn listed(message: &DisruptionBudgetEvent) -> bool {
        message.r#type() == DisruptionBudgetEventType::InitialStateComplete
    }

    fn reported(reported: &ReportedBudget) -> ReportedObject<'_> {
        let budget = &reported.budget;
        ReportedObject {
            host_uid: &reported.host_uid,
            virtual_object: (&budget.namespace, &budget.name, &budget.uid),
        }
    }
}

fn message(kind: DisruptionBudgetEventType, budget: &VirtualObject) -> DisruptionBudgetEvent {
    DisruptionBudgetEvent {
        r#type: kind as i32,
        budget: Some(budget.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn host_budget(name: &str, uid: &str) -> HostBudget {
        serde_json::from_value(json!({
            "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
            "metadata": {"name": format!("{name}-x-default-x-team-a"), "uid": format!("host-{uid}"), "annotations": {
                "vcluster.loft.sh/object-namespace": "default",
                "vcluster.loft.sh/object-name": name,
                "vcluster.loft.sh/object-uid": uid,
            }},
        }))
        .unwrap()
    }

    fn kinds(events: &[DisruptionBudgetEvent]) -> Vec<(DisruptionBudgetEventType, String)> {
        events
            .iter()
            .map(|e| {
                (
                    e.r#type(),
                    e.budget.as_ref().map(|b| b.uid.clone()).unwrap_or_default(),
                )
            })
            .collect()
    }

    #[test]
    fn a_host_budget_is_reported_when_it_appears_and_when_it_goes() {
        let (mut known, mut relisted) = (HashMap::new(), None);
        let mut feed = |event| BudgetReporting::events_for(event, &mut known, &mut relisted);
        use DisruptionBudgetEventType::{Deleted, InitialStateComplete, Present};
        assert_eq!(
            kinds(&feed(Event::Apply(host_budget("web", "u1")))),
            [(Present, "u1".into())]
        );
        // A change of the host budget (its spec, its status) is no news to the client.
        assert!(feed(Event::Apply(host_budget("web", "u1"))).is_empty());
        // The name made again for a new virtual budget is.
        assert_eq!(
            kinds(&feed(Event::Apply(host_budget("web", "u2")))),
            [(Present, "u2".into())]
        );
        assert_eq!(
            kinds(&feed(Event::Delete(host_budget("web", "u2")))),
            [(Deleted, "u2".into())]
        );
        // A relist that no longer has a budget reports it gone.
        feed(Event::Apply(host_budget("db", "u3")));
        feed(Event::Init);
        assert!(feed(Event::InitApply(host_budget("api", "u4"))).len() == 1);
        assert_eq!(
            kinds(&feed(Event::InitDone)),
            [(Deleted, "u3".into()), (InitialStateComplete, String::new())]
        );
    }
}
