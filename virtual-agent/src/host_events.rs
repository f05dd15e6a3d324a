//! Host events in the virtual cluster: what the host's scheduler, kubelet and controllers record
//! about a synced Pod's host Pod (FailedScheduling, BackOff, Started, ...), and its provisioner
//! about a claim's host claim (ProvisioningFailed, ...), written as core/v1 Events about the
//! virtual object, where `kubectl describe` and `kubectl get events` show them.
//!
//! ```text
//!  WatchPodStatus / WatchClaimStatus HOST_EVENT ──► syncer: the virtual object of that uid?
//!     ──► queue (a repeat of a queued event replaces it) ──► writer, one at a time: create
//!     <name>.<id>, or patch its count, last time and message when it exists ──► transient
//!     failures retried (5 tries), others reported
//! ```
//!
//! The copy is named after the host event's id, so a repeat updates it instead of adding a second
//! one. The writer remembers what it wrote (and, at start, lists the copies already there by their
//! label), so a reopened stream or a new leader, which get every host event again, write nothing
//! that is already in place; it forgets a copy after the hour Kubernetes keeps events.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use k8s_openapi::api::core::v1::Event as CoreEvent;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use rcsync_core::naming::{LABEL_HOST_EVENT_COPY, virtual_event_name};
use rcsync_proto::v1::HostEvent;
use serde_json::json;
use tokio::sync::{mpsc, watch};

use crate::connect::Backoff;
use crate::metrics::Metrics;

/// Host events waiting to be written, at most this many (past it a new one is dropped and counted).
const QUEUED_MAX: usize = 4096;

/// Tries of one write before it is reported failed.
const TRIES: u32 = 5;

/// How long the writer remembers a copy it wrote: the time an API server keeps an event
/// (`--event-ttl`, one hour by default).
const REMEMBERED_FOR: Duration = Duration::from_secs(3600);

/// A host event to write about the virtual object of `kind` `namespace/name` of uid `uid`.
#[derive(Clone, Debug)]
pub(crate) struct HostEventCopy {
    /// The virtual object's kind (`Pod`, `PersistentVolumeClaim`; both core/v1).
    pub(crate) kind: &'static str,
    /// The virtual object's namespace.
    pub(crate) namespace: String,
    /// The virtual object's name.
    pub(crate) name: String,
    /// The virtual object's uid (the copy is about this one, not a later object of the name).
    pub(crate) uid: String,
    /// The event, in the virtual object's names.
    pub(crate) event: HostEvent,
}

impl HostEventCopy {
    fn name(&self) -> String {
        virtual_event_name(&self.name, &self.event.id)
    }

    /// The core/v1 Event the virtual cluster gets.
    fn object(&self) -> Result<CoreEvent, serde_json::Error> {
        let e = &self.event;
        let text = |s: &str| (!s.is_empty()).then(|| s.to_string());
        let mut involved = json!({
            "apiVersion": "v1", "kind": self.kind,
            "namespace": self.namespace, "name": self.name, "uid": self.uid,
        });
        if let Some(path) = text(&e.field_path) {
            involved["fieldPath"] = json!(path);
        }
        serde_json::from_value(json!({
            "metadata": {"name": self.name(), "namespace": self.namespace, "labels": {LABEL_HOST_EVENT_COPY: "true"}},
            "involvedObject": involved,
            "type": text(&e.r#type),
            "reason": text(&e.reason),
            "message": text(&e.message),
            "action": text(&e.action),
            "source": {"component": text(&e.reporting_controller), "host": text(&e.reporting_instance)},
            "reportingComponent": e.reporting_controller,
            "reportingInstance": e.reporting_instance,
            "count": e.count.max(1),
            "firstTimestamp": text(&e.first_time),
            "lastTimestamp": text(&e.last_time),
        }))
    }
}

/// Where the Pod shards and the claim syncer hand host events to the writer.
#[derive(Clone)]
pub(crate) struct HostEventQueue {
    tx: mpsc::UnboundedSender<HostEventCopy>,
    metrics: Metrics,
}

impl HostEventQueue {
    /// Queues `copy` for the writer.
    pub(crate) fn send(&self, copy: HostEventCopy) {
        if self.tx.send(copy).is_err() {
            // The writer stopped: the agent is shutting down.
            self.metrics.host_events_failed_total.inc();
        }
    }
}

/// A queue and the writer that empties it into the virtual cluster behind `client` (run it as a
/// task; it ends at `shutdown` or when every queue handle is gone).
pub(crate) fn host_event_writer(
    client: Client,
    metrics: Metrics,
    shutdown: watch::Receiver<bool>,
) -> (HostEventQueue, impl std::future::Future<Output = ()> + Send) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queue = HostEventQueue {
        tx,
        metrics: metrics.clone(),
    };
    (queue, write_all(client, rx, metrics, shutdown))
}

/// Queued copies in order; a newer copy of a queued event takes its place.
#[derive(Default)]
struct Pending {
    order: VecDeque<String>,
    copies: HashMap<String, HostEventCopy>,
}

impl Pending {
    /// Queues `copy`; false when the queue is full.
    fn push(&mut self, copy: HostEventCopy) -> bool {
        let name = format!("{}/{}", copy.namespace, copy.name());
        if let Some(queued) = self.copies.get_mut(&name) {
            *queued = copy;
            return true;
        }
        if self.order.len() >= QUEUED_MAX {
            return false;
        }
        self.order.push_back(name.clone());
        self.copies.insert(name, copy);
        true
    }

    fn pop(&mut self) -> Option<HostEventCopy> {
        let name = self.order.pop_front()?;
        self.copies.remove(&name)
    }
}

/// What the writer knows is in the virtual cluster: copy (`namespace/name`) → digest of what it
/// holds, and when it was last written or listed.
#[derive(Default)]
struct Written {
    copies: HashMap<String, (u64, tokio::time::Instant)>,
    pruned: Option<tokio::time::Instant>,
}

impl Written {
    fn holds(&self, key: &str, digest: u64) -> bool {
        self.copies.get(key).is_some_and(|(d, _)| *d == digest)
    }

    fn insert(&mut self, key: String, digest: u64) {
        let now = tokio::time::Instant::now();
        self.copies.insert(key, (digest, now));
        // Forget what the API server has dropped by now (at most once a minute).
        if self.pruned.is_none_or(|at| now - at > Duration::from_secs(60)) {
            self.pruned = Some(now);
            self.copies.retain(|_, (_, at)| now - *at < REMEMBERED_FOR);
        }
    }
}

/// What a copy holds that a repeat changes (and what it is about).
fn digest(event: &CoreEvent) -> u64 {
    crate::pods::digest_of(&(
        &event.involved_object.uid,
        event.count,
        event.last_timestamp.as_ref().map(|t| t.0.as_second()),
        &event.message,
        &event.type_,
        &event.reason,
    ))
}

fn key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// The copies already in the virtual cluster (an empty list when it cannot be read: every copy is
/// then written once more).
async fn copies_in_place(client: &Client) -> Written {
    let api: Api<CoreEvent> = Api::all(client.clone());
    let mut written = Written::default();
    match api
        .list(&ListParams::default().labels(&format!("{LABEL_HOST_EVENT_COPY}=true")))
        .await
    {
        Ok(list) => {
            for event in list.items {
                let (Some(namespace), Some(name)) = (&event.metadata.namespace, &event.metadata.name) else {
                    continue;
                };
                written.insert(key(namespace, name), digest(&event));
            }
        }
        Err(e) => tracing::warn!(error = %e, "listing the copies of host events failed; writing each again"),
    }
    written
}

async fn write_all(
    client: Client,
    mut rx: mpsc::UnboundedReceiver<HostEventCopy>,
    metrics: Metrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut written = tokio::select! {
        _ = shutdown.changed() => return,
        written = copies_in_place(&client) => written,
    };
    let mut pending = Pending::default();
    loop {
        let take = |pending: &mut Pending, copy: HostEventCopy| {
            if !pending.push(copy) {
                metrics.host_events_failed_total.inc();
                tracing::warn!("more than {QUEUED_MAX} host events wait to be written: dropping one");
            }
        };
        while let Ok(copy) = rx.try_recv() {
            take(&mut pending, copy);
        }
        let Some(copy) = pending.pop() else {
            tokio::select! {
                _ = shutdown.changed() => return,
                copy = rx.recv() => match copy {
                    Some(copy) => take(&mut pending, copy),
                    None => return,
                },
            }
            continue;
        };
        tokio::select! {
            _ = shutdown.changed() => return,
            () = write(&client, &copy, &metrics, &mut written) => {}
        }
    }
}

/// Writes one copy unless it is in place: created, or updated when it exists; retried while the
/// failure may pass.
async fn write(client: &Client, copy: &HostEventCopy, metrics: &Metrics, written: &mut Written) {
    let api: Api<CoreEvent> = Api::namespaced(client.clone(), &copy.namespace);
    let name = copy.name();
    let object = match copy.object() {
        Ok(object) => object,
        Err(e) => {
            metrics.host_events_failed_total.inc();
            tracing::warn!(namespace = %copy.namespace, kind = copy.kind, name = %copy.name, error = %e, "a host event the host agent sent is not a valid event; not written");
            return;
        }
    };
    let (key, digest) = (key(&copy.namespace, &name), digest(&object));
    if written.holds(&key, digest) {
        return;
    }
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut last_error = String::new();
    for _ in 0..TRIES {
        let result = match api.create(&PostParams::default(), &object).await {
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let repeat = json!({
                    "count": object.count,
                    "lastTimestamp": object.last_timestamp,
                    "message": object.message,
                });
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&repeat))
                    .await
                    .map(drop)
            }
            other => other.map(drop),
        };
        match result {
            Ok(()) => {
                metrics.host_events_copied_total.inc();
                written.insert(key, digest);
                return;
            }
            // Refused as it stands (invalid, forbidden, its namespace gone): trying again gives the
            // same answer.
            Err(kube::Error::Api(e)) if matches!(e.code, 400 | 403 | 404 | 422) => {
                last_error = e.to_string();
                break;
            }
            Err(e) => {
                last_error = e.to_string();
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
    metrics.host_events_failed_total.inc();
    tracing::warn!(namespace = %copy.namespace, kind = copy.kind, name = %copy.name, event = %name, error = %last_error, "writing a host event failed");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(id: &str, count: i32) -> HostEventCopy {
        HostEventCopy {
            kind: "Pod",
            namespace: "default".into(),
            name: "web".into(),
            uid: "virtual-uid".into(),
            event: HostEvent {
                id: id.into(),
                r#type: "Warning".into(),
                reason: "FailedScheduling".into(),
                message: "0/1 nodes are available".into(),
                reporting_controller: "default-scheduler".into(),
                reporting_instance: String::new(),
                action: String::new(),
                field_path: String::new(),
                count,
                first_time: "2026-11-27T10:00:00Z".into(),
                last_time: "2026-11-27T10:01:00Z".into(),
            },
        }
    }

    #[test]
    fn a_copy_is_an_event_about_the_virtual_pod_named_after_the_host_events_id() {
        let event = copy("0123456789abcdef", 2).object().unwrap();
        assert_eq!(event.metadata.name.as_deref(), Some("web.0123456789abcdef"));
        assert_eq!(event.metadata.namespace.as_deref(), Some("default"));
        let about = &event.involved_object;
        assert_eq!(
            (
                about.kind.as_deref(),
                about.name.as_deref(),
                about.uid.as_deref(),
                about.namespace.as_deref()
            ),
            (Some("Pod"), Some("web"), Some("virtual-uid"), Some("default"))
        );
        assert_eq!(about.field_path, None);
        assert_eq!(event.count, Some(2));
        assert_eq!(event.reason.as_deref(), Some("FailedScheduling"));
        assert_eq!(
            event.source.unwrap().component.as_deref(),
            Some("default-scheduler")
        );
        assert_eq!(event.action, None);
        assert_eq!(
            event.last_timestamp.unwrap().0.to_string(),
            "2026-11-27T10:01:00Z"
        );
    }

    #[test]
    fn a_repeat_of_a_queued_event_replaces_it_and_the_queue_is_bounded() {
        let mut pending = Pending::default();
        assert!(pending.push(copy("a", 1)));
        assert!(pending.push(copy("b", 1)));
        assert!(pending.push(copy("a", 2)));
        assert_eq!(
            pending.pop().map(|c| (c.event.id, c.event.count)),
            Some(("a".into(), 2))
        );
        assert_eq!(pending.pop().map(|c| c.event.id), Some("b".into()));
        assert!(pending.pop().is_none());
        for i in 0..QUEUED_MAX {
            assert!(pending.push(copy(&i.to_string(), 1)));
        }
        assert!(!pending.push(copy("one-too-many", 1)));
        assert!(
            pending.push(copy("0", 5)),
            "a repeat of a queued event still fits"
        );
    }
}
