//! Copies deleted under the Pods that use them: the ConfigMaps and Secrets ApplyPod writes into a
//! tenant's host namespace are watched (their metadata only), and one that goes while a host Pod
//! it was written for is still reported names that Pod, so the virtual side applies the Pod again
//! and the copy is written anew.
//!
//! ```text
//!  metadata watch of ConfigMaps ─┐
//!                                ├─► LostCopies ── copy gone (deleted, or missing from a relist) ──► its owning host Pods
//!  metadata watch of Secrets ────┘
//! ```
//!
//! The host's garbage collector deletes a copy only once its last owning Pod is gone from the API,
//! so a copy it removes names no Pod the status stream still reports: only copies deleted under a
//! running Pod (by hand, by a cleanup job, by a namespace tool) bring anything back; one of a
//! Pod that ended (`Succeeded`, `Failed`: its containers never start again) is left deleted.
//!
//! A copy deleted while no status stream was open (the host agent down, the virtual agent away)
//! left no watch event behind: ApplyPod records the copies it writes for a host Pod in the Pod's
//! `rcsync.io/copies` annotation ([`RecordedCopy`]), and once a listing of copies completes, a
//! copy a reported Pod records but the listing lacks counts as lost too
//! ([`LostCopies::missing`]). A Pod listed between its create and its copies' writes may see its
//! copies reported lost once; applying it again writes what it already has.

use std::collections::HashMap;
use std::pin::Pin;

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::watcher::{self, Event};
use rcsync_core::kube_client::RetryWithBackoff as _;
use rcsync_core::naming::ANNOTATION_OBJECT_NAME;
use rcsync_core::pod_refs::RefKind;

use crate::metrics::Metrics;
use crate::translate::managed_selector;

/// A watch of the tenant's copies' metadata, both kinds in one stream.
pub type CopyWatch = Pin<Box<dyn Stream<Item = (RefKind, Result<Event<ObjectMeta>, watcher::Error>)> + Send>>;

/// Watches the metadata of `tenant`'s copies (labelled as rcsync's) in its host namespace.
pub fn watch(client: &kube::Client, tenant: &rcsync_core::Tenant, metrics: &Metrics) -> CopyWatch {
    let config = watcher::Config::default().labels(&managed_selector(tenant));
    let config_maps = metrics
        .watches
        .follow(
            "configmaps".into(),
            watcher::watcher(
                Api::<PartialObjectMeta<ConfigMap>>::namespaced(client.clone(), &tenant.host_namespace),
                config.clone(),
            )
            .retry_with_backoff(),
        )
        .map(|event| (RefKind::ConfigMap, event.map(metadata_of)));
    let secrets = metrics
        .watches
        .follow(
            "secrets".into(),
            watcher::watcher(
                Api::<PartialObjectMeta<Secret>>::namespaced(client.clone(), &tenant.host_namespace),
                config,
            )
            .retry_with_backoff(),
        )
        .map(|event| (RefKind::Secret, event.map(metadata_of)));
    futures::stream::select(config_maps, secrets).boxed()
}

/// A watch event of copies as their metadata.
fn metadata_of<K>(event: Event<PartialObjectMeta<K>>) -> Event<ObjectMeta> {
    match event {
        Event::Apply(object) => Event::Apply(object.metadata),
        Event::Delete(object) => Event::Delete(object.metadata),
        Event::Init => Event::Init,
        Event::InitApply(object) => Event::InitApply(object.metadata),
        Event::InitDone => Event::InitDone,
    }
}

/// The annotation on a host Pod that lists the copies ApplyPod wrote for it (see
/// [`RecordedCopy::annotation`]); rcsync's own, never copied from a tenant's Pod.
pub const ANNOTATION_COPIES: &str = "rcsync.io/copies";

/// A copy as a host Pod's [`ANNOTATION_COPIES`] records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedCopy {
    /// ConfigMap or Secret.
    pub kind: RefKind,
    /// The virtual object's name.
    pub virtual_name: String,
    /// The copy's name in the host namespace.
    pub host_name: String,
}

impl RecordedCopy {
    /// The annotation's value for `copies`: `configmap/<virtual name>=<host name>,secret/…`
    /// (object names hold none of `,`, `/` or `=`), readable with `kubectl get -o yaml`.
    pub fn annotation(copies: &[RecordedCopy]) -> String {
        copies
            .iter()
            .map(|c| format!("{}/{}={}", c.kind, c.virtual_name, c.host_name))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The copies an annotation value lists; an error names the first entry that is not
    /// `<kind>/<virtual name>=<host name>`.
    pub fn parse(value: &str) -> Result<Vec<RecordedCopy>, String> {
        value
            .split(',')
            .filter(|entry| !entry.is_empty())
            .map(|entry| {
                let parsed = entry.split_once('/').and_then(|(kind, rest)| {
                    let kind = match kind {
                        "configmap" => RefKind::ConfigMap,
                        "secret" => RefKind::Secret,
                        _ => return None,
                    };
                    let (virtual_name, host_name) = rest.split_once('=')?;
                    (!virtual_name.is_empty() && !host_name.is_empty()).then(|| RecordedCopy {
                        kind,
                        virtual_name: virtual_name.to_string(),
                        host_name: host_name.to_string(),
                    })
                });
                parsed
                    .ok_or_else(|| format!("{entry:?} is not <configmap|secret>/<virtual name>=<host name>"))
            })
            .collect()
    }
}

/// A copy that went, and the host Pods it was written for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LostCopy {
    /// ConfigMap or Secret.
    pub kind: RefKind,
    /// The virtual object's name (what the tenant calls it).
    pub virtual_name: String,
    /// The host Pods that own it: name and uid.
    pub owners: Vec<(String, String)>,
}

impl LostCopy {
    /// How logs and the virtual side name what was lost: `configmap app-config`.
    pub fn describe(&self) -> String {
        format!("{} {}", self.kind, self.virtual_name)
    }
}

/// What a copy is, as its loss needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Copy {
    virtual_name: String,
    owners: Vec<(String, String)>,
}

impl Copy {
    fn of(meta: &ObjectMeta) -> Self {
        let owners = meta
            .owner_references
            .iter()
            .flatten()
            .filter(|o| o.kind == "Pod" && o.api_version == "v1")
            .map(|o| (o.name.clone(), o.uid.clone()))
            .collect();
        let virtual_name = meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_OBJECT_NAME))
            .cloned()
            .unwrap_or_else(|| meta.name.clone().unwrap_or_default());
        Self { virtual_name, owners }
    }
}

/// The copies the watch has shown, per kind and host name; what a relist no longer has counts as
/// lost, as a deletion does.
#[derive(Default)]
pub struct LostCopies {
    known: HashMap<(RefKind, String), Copy>,
    /// Per kind, the copies seen since its relist began.
    relisting: HashMap<RefKind, HashMap<String, Copy>>,
}

impl LostCopies {
    /// Applies one watch event of `kind`; returns the copies it shows lost.
    pub fn on_event(&mut self, kind: RefKind, event: Event<ObjectMeta>) -> Vec<LostCopy> {
        let lost = |copy: Copy| LostCopy {
            kind,
            virtual_name: copy.virtual_name,
            owners: copy.owners,
        };
        match event {
            Event::Init => {
                self.relisting.insert(kind, HashMap::new());
                Vec::new()
            }
            Event::InitApply(meta) => {
                let name = meta.name.clone().unwrap_or_default();
                self.relisting
                    .entry(kind)
                    .or_default()
                    .insert(name, Copy::of(&meta));
                Vec::new()
            }
            Event::InitDone => {
                let fresh = self.relisting.remove(&kind).unwrap_or_default();
                let gone: Vec<LostCopy> = self
                    .known
                    .extract_if(|(k, name), _| *k == kind && !fresh.contains_key(name))
                    .map(|(_, copy)| lost(copy))
                    .collect();
                self.known
                    .extend(fresh.into_iter().map(|(name, copy)| ((kind, name), copy)));
                gone
            }
            Event::Apply(meta) => {
                let name = meta.name.clone().unwrap_or_default();
                self.known.insert((kind, name), Copy::of(&meta));
                Vec::new()
            }
            Event::Delete(meta) => {
                let name = meta.name.clone().unwrap_or_default();
                self.known.remove(&(kind, name));
                vec![lost(Copy::of(&meta))]
            }
        }
    }

    /// Once a listing of `kind` completed: the copies of that kind `pods` (each its host name,
    /// uid and recorded copies) record that the listing lacks, but for those `gone` (what the
    /// listing's end reported) already names for the same Pod.
    pub fn missing<'a>(
        &self,
        kind: RefKind,
        pods: impl IntoIterator<Item = (&'a str, &'a str, &'a [RecordedCopy])>,
        gone: &[LostCopy],
    ) -> Vec<LostCopy> {
        let mut missing = Vec::new();
        for (pod, uid, recorded) in pods {
            for copy in recorded.iter().filter(|c| c.kind == kind) {
                let listed = self.known.contains_key(&(kind, copy.host_name.clone()));
                let reported = gone.iter().any(|g| {
                    g.kind == kind
                        && g.virtual_name == copy.virtual_name
                        && g.owners.iter().any(|(p, _)| p == pod)
                });
                if !listed && !reported {
                    missing.push(LostCopy {
                        kind,
                        virtual_name: copy.virtual_name.clone(),
                        owners: vec![(pod.to_string(), uid.to_string())],
                    });
                }
            }
        }
        missing
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    use super::*;

    fn copy(name: &str, virtual_name: &str, owners: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            annotations: Some([(ANNOTATION_OBJECT_NAME.to_string(), virtual_name.to_string())].into()),
            owner_references: Some(
                owners
                    .iter()
                    .map(|(name, uid)| OwnerReference {
                        api_version: "v1".into(),
                        kind: "Pod".into(),
                        name: (*name).into(),
                        uid: (*uid).into(),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn a_deleted_copy_names_the_host_pods_that_own_it() {
        let mut copies = LostCopies::default();
        let meta = copy(
            "app-x-default-x-team-a",
            "app",
            &[("web-x-default-x-team-a", "u1")],
        );
        assert!(
            copies
                .on_event(RefKind::ConfigMap, Event::Apply(meta.clone()))
                .is_empty()
        );
        assert_eq!(
            copies.on_event(RefKind::ConfigMap, Event::Delete(meta)),
            vec![LostCopy {
                kind: RefKind::ConfigMap,
                virtual_name: "app".into(),
                owners: vec![("web-x-default-x-team-a".into(), "u1".into())],
            }]
        );
    }

    #[test]
    fn a_copy_missing_from_a_relist_is_lost_and_the_other_kind_is_not_touched() {
        let mut copies = LostCopies::default();
        let kept = copy("kept", "kept", &[("p", "u1")]);
        let gone = copy("gone", "gone", &[("p", "u1")]);
        let secret = copy("gone", "token", &[("p", "u1")]);
        for (kind, meta) in [
            (RefKind::ConfigMap, kept.clone()),
            (RefKind::ConfigMap, gone),
            (RefKind::Secret, secret),
        ] {
            copies.on_event(kind, Event::Apply(meta));
        }
        copies.on_event(RefKind::ConfigMap, Event::Init);
        copies.on_event(RefKind::ConfigMap, Event::InitApply(kept));
        let lost = copies.on_event(RefKind::ConfigMap, Event::InitDone);
        assert_eq!(lost.len(), 1);
        assert_eq!(lost[0].describe(), "configmap gone");
        // The Secret of the same host name is still known: its own relist does not lose it.
        copies.on_event(RefKind::Secret, Event::Init);
        copies.on_event(
            RefKind::Secret,
            Event::InitApply(copy("gone", "token", &[("p", "u1")])),
        );
        assert!(copies.on_event(RefKind::Secret, Event::InitDone).is_empty());
    }

    #[test]
    fn the_first_list_loses_nothing() {
        let mut copies = LostCopies::default();
        copies.on_event(RefKind::Secret, Event::Init);
        copies.on_event(RefKind::Secret, Event::InitApply(copy("a", "a", &[])));
        assert!(copies.on_event(RefKind::Secret, Event::InitDone).is_empty());
    }

    fn recorded(kind: RefKind, virtual_name: &str, host_name: &str) -> RecordedCopy {
        RecordedCopy {
            kind,
            virtual_name: virtual_name.into(),
            host_name: host_name.into(),
        }
    }

    #[test]
    fn a_recorded_copy_the_first_list_lacks_is_lost_for_its_pod_once() {
        let mut copies = LostCopies::default();
        copies.on_event(RefKind::ConfigMap, Event::Init);
        copies.on_event(
            RefKind::ConfigMap,
            Event::InitApply(copy("kept-h", "kept", &[("p", "u1")])),
        );
        let gone = copies.on_event(RefKind::ConfigMap, Event::InitDone);
        let records = [
            recorded(RefKind::ConfigMap, "kept", "kept-h"),
            recorded(RefKind::ConfigMap, "gone", "gone-h"),
            recorded(RefKind::Secret, "token", "token-h"),
        ];
        let missing = copies.missing(RefKind::ConfigMap, [("p", "u1", &records[..])], &gone);
        assert_eq!(
            missing,
            vec![LostCopy {
                kind: RefKind::ConfigMap,
                virtual_name: "gone".into(),
                owners: vec![("p".into(), "u1".into())],
            }],
            "the Secret waits for its own listing"
        );
        // A relist's end that already reports a copy gone does not report it twice.
        copies.on_event(RefKind::ConfigMap, Event::Init);
        let gone = copies.on_event(RefKind::ConfigMap, Event::InitDone);
        assert_eq!(gone.len(), 1);
        let missing = copies.missing(RefKind::ConfigMap, [("p", "u1", &records[..])], &gone);
        assert_eq!(missing.len(), 1);
        assert_eq!(missing[0].virtual_name, "gone");
    }

    #[test]
    fn recorded_copies_read_back_from_their_annotation_and_a_bad_entry_is_named() {
        let records = vec![
            recorded(RefKind::ConfigMap, "settings", "settings-x-default-x-team-a"),
            recorded(RefKind::Secret, "creds", "creds-x-default-x-team-a"),
        ];
        let value = RecordedCopy::annotation(&records);
        assert_eq!(
            value,
            "configmap/settings=settings-x-default-x-team-a,secret/creds=creds-x-default-x-team-a"
        );
        assert_eq!(RecordedCopy::parse(&value), Ok(records));
        assert_eq!(RecordedCopy::parse(""), Ok(Vec::new()));
        let error = RecordedCopy::parse("configmap/a=b,service/c=d").unwrap_err();
        assert!(error.contains("\"service/c=d\""), "{error}");
    }
}
