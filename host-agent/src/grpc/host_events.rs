//! The host events `WatchPodStatus` and `WatchClaimStatus` carry: what the host's scheduler,
//! kubelet and controllers record about a tenant's host Pods (and its provisioner about its host
//! claims), addressed to the virtual objects they were made for.
//!
//! ```text
//!  watch core/v1 Events in <hostNamespace>, involvedObject.kind=<kind> (and type=Warning if asked)
//!     ├─ about a host object the stream reported (name and uid) ──► addressed to its virtual
//!     │     object, host names rewritten (unless its count, message and times are what was last
//!     │     sent for it)
//!     ├─ about an object not reported yet (the two watches race; or a new object under a
//!     │     reported name, its report not here yet) ──► parked, sent once it is
//!     └─ about anything else in the namespace ───────────────────► dropped when parked ones overflow
//! ```
//!
//! Only objects of the stream's own tenant are ever reported (their watch selects them by label),
//! so an event reaches a tenant only when it names one of its objects by name and uid.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash as _, Hasher as _};

use k8s_openapi::api::core::v1::Event as CoreEvent;
use kube::runtime::watcher::Event;
use rcsync_core::naming::host_event_id;
use rcsync_proto::v1::{HostEvent, HostEvents};

/// Events about objects not reported yet, at most this many (the oldest go first).
const PARKED_MAX: usize = 256;

/// The field selector of the host events about objects of `kind` a stream asks for; `None`: none.
pub fn field_selector(kind: &str, asked: HostEvents) -> Option<String> {
    match asked {
        HostEvents::Unspecified => None,
        HostEvents::Warnings => Some(format!("involvedObject.kind={kind},type=Warning")),
        HostEvents::All => Some(format!("involvedObject.kind={kind}")),
    }
}

/// A host object the stream reported, as the events about it need it.
pub struct ReportedObject<'a> {
    /// The host object's uid.
    pub host_uid: &'a str,
    /// The virtual object it was made for: namespace, name, uid.
    pub virtual_object: (&'a str, &'a str, &'a str),
}

/// A host event, as the virtual object it is about gets it.
#[derive(Clone, Debug, PartialEq)]
pub struct Addressed {
    /// The virtual object's namespace.
    pub namespace: String,
    /// The virtual object's name.
    pub name: String,
    /// The virtual object's uid.
    pub uid: String,
    /// The event, in the virtual object's names.
    pub event: HostEvent,
}

/// One stream's host events: what was sent per host event, and events waiting for their object.
pub struct HostEventFeed {
    host_namespace: String,
    /// Digest of a host event's uid → digest of what was last sent for it (16 bytes an event,
    /// whatever the length of uids).
    sent: HashMap<u64, u64>,
    /// Host event uids seen since a relist began (to forget those gone meanwhile).
    relisted: Option<HashSet<u64>>,
    parked: Parked,
}

/// Host events waiting for the object they are about, by its host name (a report looks at its
/// object's only); past [`PARKED_MAX`] the oldest go first.
#[derive(Default)]
struct Parked {
    /// Host name → its events, each with the sequence number it was parked under.
    by_name: HashMap<String, Vec<(u64, CoreEvent)>>,
    /// The order events were parked in (entries of events taken since are skipped, and dropped
    /// when the order grows past twice the bound).
    order: VecDeque<(u64, String)>,
    next: u64,
    len: usize,
}

impl Parked {
    #[cfg(test)]
    fn len(&self) -> usize {
        self.len
    }

    /// Parks `event` (the oldest parked one goes when the bound is reached).
    fn push(&mut self, event: CoreEvent) {
        if self.len == PARKED_MAX {
            self.drop_oldest();
        }
        let name = event.involved_object.name.clone().unwrap_or_default();
        let seq = self.next;
        self.next += 1;
        self.order.push_back((seq, name.clone()));
        self.by_name.entry(name).or_default().push((seq, event));
        self.len += 1;
        if self.order.len() > 2 * PARKED_MAX {
            // Forget the entries of events taken since.
            let by_name = &self.by_name;
            self.order.retain(|(seq, name)| {
                by_name
                    .get(name)
                    .is_some_and(|events| events.iter().any(|(s, _)| s == seq))
            });
        }
    }

    fn drop_oldest(&mut self) {
        while let Some((seq, name)) = self.order.pop_front() {
            let Some(events) = self.by_name.get_mut(&name) else {
                continue;
            };
            let Some(i) = events.iter().position(|(s, _)| *s == seq) else {
                continue;
            };
            events.remove(i);
            if events.is_empty() {
                self.by_name.remove(&name);
            }
            self.len -= 1;
            return;
        }
    }

    /// Takes the events parked for the object named `name`.
    fn take(&mut self, name: &str) -> Vec<(u64, CoreEvent)> {
        let taken = self.by_name.remove(name).unwrap_or_default();
        self.len -= taken.len();
        taken
    }

    /// Puts back events [`Parked::take`] took (in their place in the order).
    fn put_back(&mut self, name: String, events: Vec<(u64, CoreEvent)>) {
        if !events.is_empty() {
            self.len += events.len();
            self.by_name.insert(name, events);
        }
    }
}

impl HostEventFeed {
    /// Host events of the objects in `host_namespace`.
    pub fn new(host_namespace: String) -> Self {
        Self {
            host_namespace,
            sent: HashMap::new(),
            relisted: None,
            parked: Parked::default(),
        }
    }

    /// The events to send for one event of the host events' watch; `object` finds a reported
    /// host object by name.
    pub fn on_watch_event<'a>(
        &mut self,
        event: Event<CoreEvent>,
        object: impl Fn(&str) -> Option<ReportedObject<'a>>,
    ) -> Vec<Addressed> {
        match event {
            Event::Init => {
                self.relisted = Some(HashSet::new());
                Vec::new()
            }
            Event::InitDone => {
                if let Some(fresh) = self.relisted.take() {
                    self.sent.retain(|uid, _| fresh.contains(uid));
                }
                Vec::new()
            }
            Event::InitApply(event) | Event::Apply(event) => {
                if let (Some(relisted), Some(uid)) = (&mut self.relisted, &event.metadata.uid) {
                    relisted.insert(uid_key(uid));
                }
                let name = event.involved_object.name.as_deref().unwrap_or_default();
                // An event about another uid under a reported name is parked too: it may be
                // about the object that comes back under the name (a StatefulSet's Pod), whose
                // report the two watches' race has not brought yet.
                match object(name).filter(|reported| is_about(&event, reported)) {
                    Some(reported) => self.message(&event, &reported).into_iter().collect(),
                    None => {
                        self.parked.push(event);
                        Vec::new()
                    }
                }
            }
            Event::Delete(event) => {
                if let Some(uid) = &event.metadata.uid {
                    self.sent.remove(&uid_key(uid));
                }
                Vec::new()
            }
        }
    }

    /// The events to send of the parked ones whose object `object` now finds (call after an
    /// object was reported): those about the object named `name`, or, with `None` (a relist
    /// complete), about any.
    pub fn on_reported<'a>(
        &mut self,
        name: Option<&str>,
        object: impl Fn(&str) -> Option<ReportedObject<'a>>,
    ) -> Vec<Addressed> {
        let names: Vec<String> = match name {
            Some(name) => vec![name.to_string()],
            None => self.parked.by_name.keys().cloned().collect(),
        };
        let mut out = Vec::new();
        for name in names {
            let Some(reported) = object(&name) else {
                continue;
            };
            let mut waiting = Vec::new();
            for (seq, event) in self.parked.take(&name) {
                if is_about(&event, &reported) {
                    out.extend(self.message(&event, &reported));
                } else {
                    waiting.push((seq, event));
                }
            }
            self.parked.put_back(name, waiting);
        }
        out
    }

    /// `event` about `object` (see [`is_about`]), addressed; `None` when it was sent as it stands.
    fn message(&mut self, event: &CoreEvent, object: &ReportedObject<'_>) -> Option<Addressed> {
        let uid = event.metadata.uid.as_deref()?;
        let (namespace, name, virtual_uid) = object.virtual_object;
        let host_name = event.involved_object.name.as_deref().unwrap_or_default();
        let host_event = host_event(event, &self.host_namespace, host_name, namespace, name);
        let mut hasher = DefaultHasher::new();
        (
            virtual_uid,
            &host_event.message,
            host_event.count,
            &host_event.last_time,
        )
            .hash(&mut hasher);
        let digest = hasher.finish();
        if self.sent.insert(uid_key(uid), digest) == Some(digest) {
            return None;
        }
        Some(Addressed {
            namespace: namespace.to_string(),
            name: name.to_string(),
            uid: virtual_uid.to_string(),
            event: host_event,
        })
    }
}

/// Whether `event` is about `object`: it names the object's uid (or none, as some writers leave
/// it out), not an earlier or later object under the name.
fn is_about(event: &CoreEvent, object: &ReportedObject<'_>) -> bool {
    event
        .involved_object
        .uid
        .as_deref()
        .is_none_or(|u| u.is_empty() || u == object.host_uid)
}

/// The key of a host event's uid in [`HostEventFeed`]'s maps.
fn uid_key(uid: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    uid.hash(&mut hasher);
    hasher.finish()
}

/// `event` as the virtual side gets it: the host's names of the object replaced by the virtual ones,
/// the fields core/v1 and events.k8s.io/v1 writers fill in differently read either way.
fn host_event(
    event: &CoreEvent,
    host_namespace: &str,
    host_name: &str,
    namespace: &str,
    name: &str,
) -> HostEvent {
    let text = |s: &Option<String>| s.clone().unwrap_or_default();
    let source = event.source.as_ref();
    let first_time = event
        .first_timestamp
        .as_ref()
        .map(|t| t.0.to_string())
        .or_else(|| event.event_time.as_ref().map(|t| t.0.to_string()))
        .or_else(|| {
            event
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string())
        })
        .unwrap_or_default();
    let series = event.series.as_ref();
    let last_time = series
        .and_then(|s| s.last_observed_time.as_ref())
        .map(|t| t.0.to_string())
        .or_else(|| event.last_timestamp.as_ref().map(|t| t.0.to_string()))
        .unwrap_or_else(|| first_time.clone());
    let count = series.and_then(|s| s.count).or(event.count).unwrap_or(1).max(1);
    HostEvent {
        id: host_event_id(event.metadata.uid.as_deref().unwrap_or_default()),
        r#type: text(&event.type_),
        reason: text(&event.reason),
        message: virtual_message(
            event.message.as_deref().unwrap_or_default(),
            host_namespace,
            host_name,
            namespace,
            name,
        ),
        reporting_controller: event
            .reporting_component
            .clone()
            .filter(|c| !c.is_empty())
            .or_else(|| source.and_then(|s| s.component.clone()))
            .unwrap_or_default(),
        reporting_instance: event
            .reporting_instance
            .clone()
            .filter(|i| !i.is_empty())
            .or_else(|| source.and_then(|s| s.host.clone()))
            .unwrap_or_default(),
        action: text(&event.action),
        field_path: text(&event.involved_object.field_path),
        count,
        first_time,
        last_time,
    }
}

/// `message` with the host object's `namespace/name` and then its name alone replaced by the
/// virtual object's: the scheduler's "Successfully assigned vc-team-a/web-x-default-x-team-a to node-1"
/// reads "Successfully assigned default/web to node-1".
fn virtual_message(
    message: &str,
    host_namespace: &str,
    host_name: &str,
    namespace: &str,
    name: &str,
) -> String {
    if host_name.is_empty() {
        return message.to_string();
    }
    message
        .replace(
            &format!("{host_namespace}/{host_name}"),
            &format!("{namespace}/{name}"),
        )
        .replace(host_name, name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const HOST_POD: &str = "web-x-default-x-team-a";

    fn host_event_object(uid: &str, about: &str, about_uid: &str, message: &str, count: i32) -> CoreEvent {
        serde_json::from_value(json!({
            "metadata": {"name": format!("{about}.{uid}"), "namespace": "vc-team-a", "uid": uid},
            "involvedObject": {"kind": "Pod", "namespace": "vc-team-a", "name": about, "uid": about_uid,
                               "fieldPath": "spec.containers{app}"},
            "reason": "BackOff", "message": message, "type": "Warning",
            "source": {"component": "kubelet", "host": "node-1"},
            "firstTimestamp": "2026-11-27T10:00:00Z", "lastTimestamp": "2026-11-27T10:05:00Z",
            "count": count,
        }))
        .unwrap()
    }

    fn reported(name: &str) -> Option<ReportedObject<'static>> {
        (name == HOST_POD).then_some(ReportedObject {
            host_uid: "host-uid",
            virtual_object: ("default", "web", "virtual-uid"),
        })
    }

    #[test]
    fn an_event_about_a_reported_pod_goes_to_its_virtual_pod_with_the_virtual_names() {
        let mut events = HostEventFeed::new("vc-team-a".into());
        let message =
            format!("Back-off restarting failed container app in pod vc-team-a/{HOST_POD} ({HOST_POD})");
        let out = events.on_watch_event(
            Event::Apply(host_event_object("e1", HOST_POD, "host-uid", &message, 3)),
            reported,
        );
        assert_eq!(out.len(), 1);
        assert_eq!(
            (
                out[0].namespace.as_str(),
                out[0].name.as_str(),
                out[0].uid.as_str()
            ),
            ("default", "web", "virtual-uid")
        );
        let event = &out[0].event;
        assert_eq!(
            event.message,
            "Back-off restarting failed container app in pod default/web (web)"
        );
        assert_eq!(event.id, host_event_id("e1"));
        assert_eq!(
            (event.r#type.as_str(), event.reason.as_str()),
            ("Warning", "BackOff")
        );
        assert_eq!(
            (
                event.reporting_controller.as_str(),
                event.reporting_instance.as_str()
            ),
            ("kubelet", "node-1")
        );
        assert_eq!(event.field_path, "spec.containers{app}");
        assert_eq!(event.count, 3);
        assert_eq!(
            (event.first_time.as_str(), event.last_time.as_str()),
            ("2026-11-27T10:00:00Z", "2026-11-27T10:05:00Z")
        );
    }

    #[test]
    fn a_repeat_is_sent_once_per_change_and_again_after_a_relist_only_if_it_changed() {
        let mut events = HostEventFeed::new("vc-team-a".into());
        let mut feed = |event| events.on_watch_event(event, reported);
        assert_eq!(
            feed(Event::Apply(host_event_object(
                "e1", HOST_POD, "host-uid", "m", 1
            )))
            .len(),
            1
        );
        assert!(
            feed(Event::Apply(host_event_object(
                "e1", HOST_POD, "host-uid", "m", 1
            )))
            .is_empty()
        );
        assert_eq!(
            feed(Event::Apply(host_event_object(
                "e1", HOST_POD, "host-uid", "m", 2
            )))
            .len(),
            1
        );
        assert!(feed(Event::Init).is_empty());
        assert!(
            feed(Event::InitApply(host_event_object(
                "e1", HOST_POD, "host-uid", "m", 2
            )))
            .is_empty()
        );
        assert!(feed(Event::InitDone).is_empty());
    }

    #[test]
    fn an_event_about_another_pod_or_another_uid_under_the_name_is_not_sent() {
        let mut events = HostEventFeed::new("vc-team-a".into());
        assert!(
            events
                .on_watch_event(
                    Event::Apply(host_event_object("e1", HOST_POD, "an-earlier-pod", "m", 1)),
                    reported
                )
                .is_empty()
        );
        assert!(
            events
                .on_watch_event(
                    Event::Apply(host_event_object("e2", "someone-elses-pod", "u", "m", 1)),
                    reported
                )
                .is_empty()
        );
        assert!(
            events.on_reported(None, reported).is_empty(),
            "the other Pod's event stays parked"
        );
        for i in 0..PARKED_MAX + 10 {
            events.on_watch_event(
                Event::Apply(host_event_object(&format!("p{i}"), "nobody", "u", "m", 1)),
                reported,
            );
        }
        assert_eq!(events.parked.len(), PARKED_MAX, "parked events are bounded");
    }

    #[test]
    fn an_event_that_comes_before_its_pod_is_sent_once_the_pod_is_reported() {
        let mut events = HostEventFeed::new("vc-team-a".into());
        let nobody = |_: &str| None;
        assert!(
            events
                .on_watch_event(
                    Event::Apply(host_event_object("e1", HOST_POD, "host-uid", "m", 1)),
                    nobody
                )
                .is_empty()
        );
        let out = events.on_reported(None, reported);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].name, "web");
        assert!(events.on_reported(None, reported).is_empty());
    }

    #[test]
    fn an_event_about_a_pod_back_under_its_name_is_sent_once_the_new_pod_is_reported() {
        let mut events = HostEventFeed::new("vc-team-a".into());
        // The host Pod came back under its name (uid "host-uid-2"): its event is here before the
        // Pod watch reported it, while the earlier Pod is still the one reported.
        let out = events.on_watch_event(
            Event::Apply(host_event_object("e1", HOST_POD, "host-uid-2", "m", 1)),
            reported,
        );
        assert!(out.is_empty(), "not the reported Pod's");
        let back = |name: &str| {
            (name == HOST_POD).then_some(ReportedObject {
                host_uid: "host-uid-2",
                virtual_object: ("default", "web", "virtual-uid-2"),
            })
        };
        let out = events.on_reported(Some(HOST_POD), back);
        assert_eq!(out.len(), 1, "sent once the new Pod is reported");
        assert_eq!(out[0].uid, "virtual-uid-2");
    }

    #[test]
    fn a_report_looks_at_its_own_objects_parked_events_and_the_parked_ones_stay_bounded() {
        let mut events = HostEventFeed::new("vc-team-a".into());
        let nobody = |_: &str| None;
        for (uid, about) in [("e1", HOST_POD), ("e2", "other-x-default-x-team-a")] {
            events.on_watch_event(
                Event::Apply(host_event_object(uid, about, "host-uid", "m", 1)),
                nobody,
            );
        }
        // Reported: the Pod named, not the other, whose event stays parked.
        let everyone = |_: &str| {
            Some(ReportedObject {
                host_uid: "host-uid",
                virtual_object: ("default", "web", "virtual-uid"),
            })
        };
        let out = events.on_reported(Some(HOST_POD), everyone);
        assert_eq!(out.len(), 1);
        assert_eq!(events.parked.len(), 1);
        // Parked and taken over and over: the order kept does not grow without bound.
        for i in 0..3 * PARKED_MAX {
            let uid = format!("r{i}");
            events.on_watch_event(
                Event::Apply(host_event_object(&uid, HOST_POD, "host-uid", "m", 1)),
                nobody,
            );
            assert_eq!(events.on_reported(Some(HOST_POD), everyone).len(), 1);
        }
        assert!(events.parked.order.len() <= 2 * PARKED_MAX + 1);
        assert_eq!(events.parked.len(), 1, "the other Pod's event is still there");
    }

    #[test]
    fn warnings_only_or_all_or_none() {
        assert_eq!(field_selector("Pod", HostEvents::Unspecified), None);
        assert_eq!(
            field_selector("Pod", HostEvents::Warnings).as_deref(),
            Some("involvedObject.kind=Pod,type=Warning")
        );
        assert_eq!(
            field_selector("PersistentVolumeClaim", HostEvents::All).as_deref(),
            Some("involvedObject.kind=PersistentVolumeClaim")
        );
    }
}
