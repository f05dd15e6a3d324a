//! Names and metadata of Pods a virtual cluster places on the host, as vCluster writes them.
//!
//! A virtual Pod `NAME` in namespace `NS` of virtual cluster `VC` becomes the host Pod
//! `NAME-x-NS-x-VC` in the tenant's host namespace. Names longer than 63 characters are cut to their
//! first 52 characters, then `-` and the first 10 hex digits of the SHA-256 of the full name, and
//! `.-` is replaced by `-` so the result stays a valid name.

use sha2::{Digest, Sha256};

/// Label on host Pods naming the tenant (virtual cluster) that owns them.
pub const LABEL_MANAGED_BY: &str = "vcluster.loft.sh/managed-by";
/// Label on host Pods naming the virtual namespace they come from.
pub const LABEL_NAMESPACE: &str = "vcluster.loft.sh/namespace";
/// Annotation on host Pods: the virtual object's name.
pub const ANNOTATION_OBJECT_NAME: &str = "vcluster.loft.sh/object-name";
/// Annotation on host Pods: the virtual object's namespace.
pub const ANNOTATION_OBJECT_NAMESPACE: &str = "vcluster.loft.sh/object-namespace";
/// Annotation on host Pods: the virtual object's UID.
pub const ANNOTATION_OBJECT_UID: &str = "vcluster.loft.sh/object-uid";

/// Label on the virtual cluster's copies of host events (value: `true`): the virtual agent lists
/// them at start, so what is already there is not written again.
pub const LABEL_HOST_EVENT_COPY: &str = "rcsync.io/host-event";

/// Label on RuntimeClasses in the virtual cluster that rcsync manages (value: `rcsync`).
pub const LABEL_RCSYNC_MANAGED: &str = "rcsync.io/managed";
/// Annotation on managed RuntimeClasses: the content version they were applied from.
pub const ANNOTATION_SOURCE_VERSION: &str = "rcsync.io/source-version";
/// Annotation on managed RuntimeClasses: the host RuntimeClass they were derived from.
pub const ANNOTATION_HOST_NAME: &str = "rcsync.io/host-name";

/// Maximum length of names translated by [`safe_concat_name`].
const MAX_NAME: usize = 63;

/// Joins parts with `-`, shortening the result as vCluster's `SafeConcatName` does when it is longer
/// than 63 characters.
pub fn safe_concat_name(parts: &[&str]) -> String {
    let full = parts.join("-");
    if full.len() <= MAX_NAME {
        return full;
    }
    let digest = hex::encode(Sha256::digest(full.as_bytes()));
    // Object names are ASCII, but never split a UTF-8 character of arbitrary input.
    let mut cut = 52;
    while !full.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}-{}", &full[..cut], &digest[..10]).replace(".-", "-")
}

/// The host name of a virtual Pod: `NAME-x-NAMESPACE-x-VCLUSTER`, shortened beyond 63 characters.
pub fn host_pod_name(name: &str, namespace: &str, vcluster: &str) -> String {
    safe_concat_name(&[name, "x", namespace, "x", vcluster])
}

/// The host name of any namespaced virtual object (ConfigMaps and Secrets a Pod references): the
/// same translation as for Pods, so a copy is found by name alone.
pub fn host_object_name(name: &str, namespace: &str, vcluster: &str) -> String {
    host_pod_name(name, namespace, vcluster)
}

/// The prefix of the host label keys that carry a virtual Pod's labels (see [`host_label_key`]).
pub const HOST_LABEL_PREFIX: &str = "rcsync.io/label-";

/// The key under which a host Pod carries its virtual Pod's label `key`: `rcsync.io/label-` and
/// the first 16 hex digits of the key's SHA-256. The tenant's labels never reach the host under
/// their own keys (a host Service, NetworkPolicy or controller selecting `app=db` would select
/// them); under these keys only selectors rcsync rewrote from the tenant's own (its Pods'
/// affinity and topology spread) match them.
pub fn host_label_key(key: &str) -> String {
    format!(
        "{HOST_LABEL_PREFIX}{}",
        hex::encode(&Sha256::digest(key.as_bytes())[..8])
    )
}

/// The id of a host event as the virtual side sees it: the first 16 hex digits of the SHA-256 of
/// its uid (stable across the event's repeats and the agents' restarts; the uid stays on the host).
pub fn host_event_id(host_uid: &str) -> String {
    hex::encode(&Sha256::digest(host_uid.as_bytes())[..8])
}

/// The name of the virtual cluster's copy of a host event about virtual Pod `pod_name`:
/// `POD.ID` (as Kubernetes names a Pod's events), the Pod's part cut so the name stays within 253
/// characters.
pub fn virtual_event_name(pod_name: &str, id: &str) -> String {
    let mut cut = pod_name.len().min(253 - 1 - id.len());
    while !pod_name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}.{id}", &pod_name[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_are_joined() {
        assert_eq!(
            host_pod_name("my-pod", "default", "team-a"),
            "my-pod-x-default-x-team-a"
        );
    }

    #[test]
    fn long_names_are_cut_and_hashed() {
        let name = "a-very-long-pod-name-that-goes-on-and-on-and-on-and-on";
        let full = format!("{name}-x-default-x-team-a");
        assert!(full.len() > 63);
        let got = host_pod_name(name, "default", "team-a");
        let digest = hex::encode(Sha256::digest(full.as_bytes()));
        assert_eq!(got, format!("{}-{}", &full[..52], &digest[..10]));
        assert_eq!(got.len(), 63);
    }

    #[test]
    fn dot_before_the_hash_is_dropped() {
        // 51 characters then a '.', so the cut ends in '.' and '.-' becomes '-'.
        let name = format!("{}.tail", "p".repeat(51));
        let got = host_pod_name(&name, "default", "vc");
        assert!(!got.contains(".-"), "{got}");
        assert_eq!(got.len(), 62);
        assert!(got.starts_with(&"p".repeat(51)));
    }

    #[test]
    fn a_host_events_copy_is_named_after_its_pod_and_a_digest_of_its_uid() {
        let id = host_event_id("0d6e4d6b-6c1a-4c8e-9a55-1f3a0d1c2b3a");
        assert_eq!(id.len(), 16);
        assert_eq!(id, host_event_id("0d6e4d6b-6c1a-4c8e-9a55-1f3a0d1c2b3a"));
        assert_ne!(id, host_event_id("another-uid"));
        assert_eq!(virtual_event_name("web", &id), format!("web.{id}"));
        let long = virtual_event_name(&"p".repeat(253), &id);
        assert_eq!(long.len(), 253);
        assert!(long.ends_with(&format!(".{id}")));
    }

    #[test]
    fn exactly_63_is_kept() {
        let name = "p".repeat(63 - "-x-ns-x-vc".len());
        assert_eq!(host_pod_name(&name, "ns", "vc").len(), 63);
        assert!(host_pod_name(&name, "ns", "vc").ends_with("-x-ns-x-vc"));
    }
}
