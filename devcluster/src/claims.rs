//! PersistentVolumeClaims and the PersistentVolumes that satisfy them, as a cluster whose default
//! StorageClass has a provisioner binding each claim at once (`volumeBindingMode: Immediate`).
//!
//! ```text
//!  create claim ─► admission: no storageClassName? the default StorageClass's ─► validation
//!  update claim ─► spec immutable but resources.requests (grow only), volumeName once, and
//!                  volumeAttributesClassName
//!  store changes (claims, StorageClasses) ─► each Pending claim of the namespace:
//!      its class served by devcluster's provisioner? ─► PersistentVolume pvc-<uid> made,
//!          claim bound: spec.volumeName, status {phase: Bound, accessModes, capacity}
//!        (a WaitForFirstConsumer class: only once the scheduler placed a Pod that mounts it,
//!         `volume.kubernetes.io/selected-node`; until then a WaitForFirstConsumer event, once)
//!      class missing ─► ProvisioningFailed event (once)
//!      bound claim asking for more (class allows expansion) ─► volume and claim grown
//!  claim deleted ─► its dynamically provisioned volume deleted (reclaimPolicy Delete)
//! ```
//!
//! With `serve --nodes N` (the simulated data plane) devcluster runs the provisioner and makes
//! the default StorageClass `standard`; without, claims stay Pending, as in a cluster without
//! storage (a virtual cluster's claims are bound by the host, and their status copied back).
//!
//! Always, as upstream's StorageObjectInUseProtection admission and pvc-protection controller:
//!
//! ```text
//!  create claim ─► finalizer kubernetes.io/pvc-protection
//!  claim deleted ─► Terminating while a Pod of its namespace that has not ended mounts it
//!  (changes of claims and Pods) ─► a Terminating claim no such Pod mounts ─► finalizer removed, gone
//!  Pod with an ephemeral volume ─► claim <pod>-<volume> from its template, owned by the Pod
//!      (admitted as a claim created through the API is, quota aside; it goes with the Pod)
//! ```
//!
//! Not simulated: volumes made by hand binding to claims.

use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::watch;

use crate::status::Cause;
use crate::store::{Outcome, Reader, Store};

/// The storage of PersistentVolumeClaims.
pub const CLAIMS: &str = "persistentvolumeclaims";
/// The storage of PersistentVolumes.
pub const VOLUMES: &str = "persistentvolumes";
/// The storage of StorageClasses.
pub const CLASSES: &str = "storageclasses";
/// The provisioner devcluster serves.
pub const PROVISIONER: &str = "devcluster.local/hostpath";
/// The storage of Pods (which mount claims).
const PODS: &str = "pods";
/// The finalizer that keeps a claim a Pod mounts until no Pod does (upstream's name).
pub const PROTECTION: &str = "kubernetes.io/pvc-protection";
/// The annotation that makes a StorageClass the default.
const DEFAULT_CLASS: &str = "storageclass.kubernetes.io/is-default-class";
/// The annotation the scheduler sets on a claim of a WaitForFirstConsumer class: the node of the
/// first Pod placed that mounts it, where its volume is to be made.
pub const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";

/// Whether `class` binds its claims only once a Pod that mounts one is placed.
fn waits_for_consumer(class: &Value) -> bool {
    class["volumeBindingMode"] == "WaitForFirstConsumer"
}

/// The StorageClass of `claim`, if there is one.
fn class_of(store: &Store, claim: &Value) -> Option<Arc<Value>> {
    let name = claim["spec"]["storageClassName"].as_str().unwrap_or_default();
    store.get(CLASSES, "", name)
}

const ACCESS_MODES: [&str; 4] = [
    "ReadWriteOnce",
    "ReadOnlyMany",
    "ReadWriteMany",
    "ReadWriteOncePod",
];

/// The StorageClass devcluster makes when it simulates nodes: the default, served by its
/// provisioner, binding at once, volumes deleted with their claims, expandable.
pub fn default_class() -> Value {
    json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {
            "name": "standard", "uid": uuid::Uuid::new_v4().to_string(),
            "creationTimestamp": crate::admission::now(),
            "annotations": {DEFAULT_CLASS: "true"},
        },
        "provisioner": PROVISIONER,
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "Immediate",
        "allowVolumeExpansion": true,
    })
}

/// Makes [`default_class`] unless a class of its name is there (restored from a state file).
pub fn make_default_class(store: &Store) {
    let _ = store.transact(CLASSES, (String::new(), "standard".into()), |_, current| {
        Ok(match current {
            Some(_) => Outcome::Unchanged,
            None => Outcome::Put(default_class()),
        })
    });
}

/// Upstream's admission of a new claim: StorageObjectInUseProtection's finalizer, and
/// DefaultStorageClass's class for a claim that names none (the newest default, when several say
/// they are), if there is one.
pub fn admit_claim(obj: &mut Value, reader: &Reader<'_>) {
    if !crate::deletion::has_finalizer(obj, PROTECTION) {
        match obj["metadata"]["finalizers"].as_array_mut() {
            Some(finalizers) => finalizers.push(json!(PROTECTION)),
            None => obj["metadata"]["finalizers"] = json!([PROTECTION]),
        }
    }
    if obj
        .pointer("/spec/storageClassName")
        .is_some_and(|c| !c.is_null())
    {
        return;
    }
    let default = reader
        .list(CLASSES, "")
        .filter(|c| {
            c.pointer(&format!(
                "/metadata/annotations/{}",
                DEFAULT_CLASS.replace('/', "~1")
            )) == Some(&json!("true"))
        })
        .max_by_key(|c| {
            c["metadata"]["creationTimestamp"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        });
    if let Some(class) = default {
        obj["spec"]["storageClassName"] = class["metadata"]["name"].clone();
    }
}

/// Upstream's validation of a claim: at least one known access mode, a storage request, a known
/// volume mode.
pub fn validate_claim(obj: &Value, causes: &mut Vec<Cause>) {
    let spec = &obj["spec"];
    match spec["accessModes"].as_array() {
        Some(modes) if !modes.is_empty() => {
            for (i, mode) in modes.iter().enumerate() {
                if !mode.as_str().is_some_and(|m| ACCESS_MODES.contains(&m)) {
                    causes.push(Cause::not_supported(
                        format!("spec.accessModes[{i}]"),
                        mode,
                        &ACCESS_MODES,
                    ));
                }
            }
        }
        _ => causes.push(Cause::required(
            "spec.accessModes",
            "at least 1 access mode is required",
        )),
    }
    match spec.pointer("/resources/requests/storage") {
        None | Some(Value::Null) => causes.push(Cause::required("spec.resources[storage]", "")),
        Some(quantity) => {
            if storage_bytes(quantity).is_none_or(|b| b <= 0) {
                causes.push(Cause::invalid(
                    "spec.resources[storage]",
                    quantity,
                    "must be greater than zero",
                ));
            }
        }
    }
    if let Some(mode) = spec.get("volumeMode").filter(|m| !m.is_null())
        && !matches!(mode.as_str(), Some("Filesystem" | "Block"))
    {
        causes.push(Cause::not_supported(
            "spec.volumeMode",
            mode,
            &["Block", "Filesystem"],
        ));
    }
}

/// Upstream's rule for a claim's update: its spec is immutable but for a larger storage request,
/// the volume it is bound to (set once) and its volume attributes class; `None` when it holds.
pub fn update_forbidden(old: &Value, new: &Value) -> Option<Cause> {
    let mutable = |claim: &Value| {
        let mut spec = claim["spec"].clone();
        if let Some(spec) = spec.as_object_mut() {
            spec.remove("volumeAttributesClassName");
            if let Some(requests) = spec
                .get_mut("resources")
                .and_then(|r| r.get_mut("requests"))
                .and_then(Value::as_object_mut)
            {
                requests.remove("storage");
            }
            if old["spec"]["volumeName"].as_str().is_none_or(str::is_empty) {
                spec.remove("volumeName");
            }
        }
        spec
    };
    if mutable(old) != mutable(new) {
        return Some(Cause {
            reason: "FieldValueForbidden",
            field: "spec".into(),
            message: "Forbidden: spec is immutable after creation except resources.requests and volumeAttributesClassName for bound claims".into(),
        });
    }
    let request = |claim: &Value| {
        claim
            .pointer("/spec/resources/requests/storage")
            .and_then(storage_bytes)
    };
    let bound = old["status"]["phase"] == "Bound";
    if let (Some(was), Some(now)) = (request(old), request(new))
        && now < was
    {
        return Some(Cause {
            reason: "FieldValueForbidden",
            field: "spec.resources.requests.storage".into(),
            message: "Forbidden: field can not be less than previous value".into(),
        });
    }
    if !bound && request(old) != request(new) {
        return Some(Cause {
            reason: "FieldValueForbidden",
            field: "spec".into(),
            message: "Forbidden: spec is immutable after creation except resources.requests and volumeAttributesClassName for bound claims".into(),
        });
    }
    None
}

/// A storage quantity in thousandths of a byte.
fn storage_bytes(quantity: &Value) -> Option<i128> {
    crate::quantity::parse_millis(quantity.as_str()?).ok()
}

/// Keeps claims bound and volumes provisioned until `stop` (see the module docs).
pub async fn run(store: Arc<Store>, stop: watch::Receiver<bool>) {
    crate::store::reconcile_namespaces(store, &[CLAIMS, CLASSES], CLAIMS, reconcile, stop).await;
}

/// Lets claims go once no Pod mounts them, and makes the claims of Pods' ephemeral volumes, until
/// `stop` (see the module docs).
pub async fn claim_controllers(store: Arc<Store>, stop: watch::Receiver<bool>) {
    let ephemeral = tokio::spawn(make_ephemeral_claims(store.clone(), stop.clone()));
    crate::store::reconcile_namespaces(store, &[CLAIMS, PODS], CLAIMS, release_unused, stop).await;
    ephemeral.abort();
}

/// Upstream's ephemeral-volume controller: each Pod's ephemeral volume gets its claim
/// `<pod>-<volume>` from the volume's template, owned by the Pod (the garbage collector removes it
/// with the Pod). A claim of that name that exists already is left as it is. Each Pod change is
/// looked at alone (its own volumes); after missed changes, every Pod.
async fn make_ephemeral_claims(store: Arc<Store>, mut stop: watch::Receiver<bool>) {
    let mut changes = store.changes();
    let all = |store: &Store| {
        for pod in store.list(PODS, None).0 {
            ephemeral_claims_of(store, &pod);
        }
    };
    all(&store);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            change = changes.recv() => match change {
                Ok(change) if change.storage == PODS && change.old.is_none() => {
                    ephemeral_claims_of(&store, &change.new);
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => all(&store),
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

/// Makes the missing claims of `pod`'s ephemeral volumes.
fn ephemeral_claims_of(store: &Store, pod: &Value) {
    let meta = &pod["metadata"];
    if meta.get("deletionTimestamp").is_some_and(|t| !t.is_null()) {
        return;
    }
    let (Some(namespace), Some(pod_name), Some(pod_uid)) = (
        meta["namespace"].as_str(),
        meta["name"].as_str(),
        meta["uid"].as_str(),
    ) else {
        return;
    };
    for volume in pod["spec"]["volumes"].as_array().into_iter().flatten() {
        let template = &volume["ephemeral"]["volumeClaimTemplate"];
        let Some(volume_name) = volume["name"].as_str().filter(|_| template.is_object()) else {
            continue;
        };
        let name = format!("{pod_name}-{volume_name}");
        let _ = store.transact(CLAIMS, (namespace.to_string(), name.clone()), |reader, current| {
            if current.is_some() {
                return Ok(Outcome::Unchanged);
            }
            let mut claim = json!({
                "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {
                    "name": name, "namespace": namespace,
                    "uid": uuid::Uuid::new_v4().to_string(),
                    "creationTimestamp": crate::admission::now(),
                    "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": pod_name, "uid": pod_uid,
                                         "controller": true, "blockOwnerDeletion": true}],
                },
                "spec": template["spec"],
                "status": {"phase": "Pending"},
            });
            for field in ["labels", "annotations"] {
                if let Some(map) = template["metadata"].get(field).filter(|m| m.is_object()) {
                    claim["metadata"][field] = map.clone();
                }
            }
            admit_claim(&mut claim, reader);
            Ok(Outcome::Put(claim))
        });
    }
}

/// Removes [`PROTECTION`] from each Terminating claim of `namespace` that no Pod of it mounts,
/// but Pods that ended (Succeeded or Failed), as upstream's pvc-protection controller does.
fn release_unused(store: &Store, namespace: &str) {
    if namespace.is_empty() {
        return;
    }
    let (claims, _) = store.list(CLAIMS, Some(namespace));
    let terminating: Vec<&Arc<Value>> = claims
        .iter()
        .filter(|c| {
            c.pointer("/metadata/deletionTimestamp")
                .is_some_and(|t| !t.is_null())
        })
        .filter(|c| crate::deletion::has_finalizer(c, PROTECTION))
        .collect();
    if terminating.is_empty() {
        return;
    }
    let (pods, _) = store.list(PODS, Some(namespace));
    let mounted: std::collections::BTreeSet<String> = pods
        .iter()
        .filter(|p| !matches!(p["status"]["phase"].as_str(), Some("Succeeded" | "Failed")))
        .flat_map(|p| mounted_claims(p))
        .collect();
    for claim in terminating {
        let name = claim["metadata"]["name"].as_str().unwrap_or_default();
        if mounted.contains(name) {
            continue;
        }
        let uid = claim["metadata"]["uid"].clone();
        let _ = store.transact(CLAIMS, (namespace.to_string(), name.to_string()), |_, current| {
            Ok(match current {
                Some(current) if current["metadata"]["uid"] == uid => {
                    crate::deletion::without_finalizer(current, PROTECTION)
                }
                _ => Outcome::Unchanged,
            })
        });
    }
}

/// The names of the claims `pod` mounts: those it names, and those its ephemeral volumes make
/// (`<pod>-<volume>`).
fn mounted_claims(pod: &Value) -> Vec<String> {
    let pod_name = pod["metadata"]["name"].as_str().unwrap_or_default();
    let ephemeral = pod["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v.get("ephemeral").is_some())
        .filter_map(|v| v["name"].as_str())
        .map(|volume| format!("{pod_name}-{volume}"));
    claims_of(pod).map(str::to_string).chain(ephemeral).collect()
}

/// Binds, grows and cleans up after the claims of `namespace` (a StorageClass change, whose
/// namespace is empty, looks at every namespace's Pending claims).
fn reconcile(store: &Store, namespace: &str) {
    let (claims, _) = if namespace.is_empty() {
        store.list(CLAIMS, None)
    } else {
        store.list(CLAIMS, Some(namespace))
    };
    for claim in &claims {
        if claim
            .pointer("/metadata/deletionTimestamp")
            .is_some_and(|t| !t.is_null())
        {
            continue;
        }
        let class_name = claim["spec"]["storageClassName"].as_str().unwrap_or_default();
        let class = store.get(CLASSES, "", class_name);
        match claim["status"]["phase"].as_str() {
            Some("Bound") => grow(store, claim, class.as_deref()),
            _ => match class {
                Some(class)
                    if waits_for_consumer(&class)
                        && claim["metadata"]["annotations"][SELECTED_NODE].as_str().is_none() =>
                {
                    event_once(
                        store,
                        claim,
                        "Normal",
                        "WaitForFirstConsumer",
                        "waiting for first consumer to be created before binding",
                        "persistentvolume-controller",
                    );
                }
                Some(class) if class["provisioner"] == PROVISIONER => provision(store, claim),
                Some(_) => {}
                None if class_name.is_empty() => {}
                None => {
                    let message = format!("storageclass.storage.k8s.io {class_name:?} not found");
                    event_once(
                        store,
                        claim,
                        "Warning",
                        "ProvisioningFailed",
                        &message,
                        "persistentvolume-controller",
                    );
                }
            },
        }
    }
    // Volumes whose claim is gone go with it (reclaimPolicy Delete).
    let (volumes, _) = store.list(VOLUMES, None);
    for volume in volumes {
        let claim_ref = &volume["spec"]["claimRef"];
        let Some(claim_namespace) = claim_ref["namespace"].as_str() else {
            continue;
        };
        if !namespace.is_empty() && claim_namespace != namespace {
            continue;
        }
        if volume["spec"]["persistentVolumeReclaimPolicy"] != "Delete" {
            continue;
        }
        let claim = store.get(
            CLAIMS,
            claim_namespace,
            claim_ref["name"].as_str().unwrap_or_default(),
        );
        if claim.is_none_or(|c| c["metadata"]["uid"] != claim_ref["uid"]) {
            let name = volume["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let _ = store.transact(VOLUMES, (String::new(), name), |_, _| Ok(Outcome::Delete));
        }
    }
}

/// Makes the volume of a Pending claim and binds the claim to it.
fn provision(store: &Store, claim: &Value) {
    let uid = claim["metadata"]["uid"].as_str().unwrap_or_default();
    let namespace = claim["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = claim["metadata"]["name"].as_str().unwrap_or_default();
    let volume_name = format!("pvc-{uid}");
    let request = claim
        .pointer("/spec/resources/requests/storage")
        .cloned()
        .unwrap_or(json!("0"));
    let modes = claim["spec"]["accessModes"].clone();
    let volume = json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {
            "name": volume_name, "uid": uuid::Uuid::new_v4().to_string(),
            "creationTimestamp": crate::admission::now(),
            "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER},
            "finalizers": ["kubernetes.io/pv-protection"],
        },
        "spec": {
            "capacity": {"storage": request},
            "accessModes": modes,
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": claim["spec"]["storageClassName"],
            "volumeMode": claim["spec"]["volumeMode"].as_str().unwrap_or("Filesystem"),
            "hostPath": {"path": format!("/var/lib/devcluster/volumes/{volume_name}")},
            "claimRef": {"kind": "PersistentVolumeClaim", "apiVersion": "v1", "namespace": namespace, "name": name, "uid": uid},
        },
        "status": {"phase": "Bound"},
    });
    let made = store.transact(VOLUMES, (String::new(), volume_name.clone()), |_, current| {
        Ok(if current.is_some() {
            Outcome::Unchanged
        } else {
            Outcome::Put(volume)
        })
    });
    if made.is_err() {
        return;
    }
    let _ = store.transact(CLAIMS, (namespace.to_string(), name.to_string()), |_, current| {
        let Some(current) = current.filter(|c| c["metadata"]["uid"] == uid) else {
            return Ok(Outcome::Unchanged);
        };
        let mut next = current.clone();
        next["spec"]["volumeName"] = json!(volume_name);
        next["metadata"]["annotations"]["pv.kubernetes.io/bind-completed"] = json!("yes");
        next["metadata"]["annotations"]["pv.kubernetes.io/bound-by-controller"] = json!("yes");
        next["metadata"]["annotations"]["volume.kubernetes.io/storage-provisioner"] = json!(PROVISIONER);
        next["status"] = json!({
            "phase": "Bound",
            "accessModes": current["spec"]["accessModes"],
            "capacity": {"storage": request},
        });
        Ok(Outcome::Put(next))
    });
    let bound = format!("Successfully provisioned volume {volume_name}");
    event_once(
        store,
        claim,
        "Normal",
        "ProvisioningSucceeded",
        &bound,
        PROVISIONER,
    );
}

/// Records an event about `claim` unless one with the same reason and message is there already.
fn event_once(store: &Store, claim: &Value, kind: &str, reason: &str, message: &str, component: &str) {
    let namespace = claim["metadata"]["namespace"].as_str().unwrap_or_default();
    let (events, _) = store.list(crate::resources::STORAGE_EVENTS, Some(namespace));
    let said = events.iter().any(|e| {
        e["involvedObject"]["uid"] == claim["metadata"]["uid"]
            && e["reason"] == reason
            && e["message"] == message
    });
    if !said {
        crate::nodes::event(store, claim, kind, reason, message, component, None);
    }
}

/// Grows the volume of a bound claim that asks for more than it has, when its class allows it.
fn grow(store: &Store, claim: &Value, class: Option<&Value>) {
    let wanted = claim.pointer("/spec/resources/requests/storage");
    let has = claim.pointer("/status/capacity/storage");
    let (Some(wanted), Some(has)) = (wanted, has) else {
        return;
    };
    if storage_bytes(wanted) <= storage_bytes(has) || class.is_none_or(|c| c["allowVolumeExpansion"] != true)
    {
        return;
    }
    let volume_name = claim["spec"]["volumeName"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let _ = store.transact(VOLUMES, (String::new(), volume_name), |_, current| {
        let Some(current) = current else {
            return Ok(Outcome::Unchanged);
        };
        let mut next = current.clone();
        next["spec"]["capacity"]["storage"] = wanted.clone();
        Ok(Outcome::Put(next))
    });
    let namespace = claim["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let name = claim["metadata"]["name"].as_str().unwrap_or_default().to_string();
    let uid = claim["metadata"]["uid"].clone();
    let _ = store.transact(CLAIMS, (namespace, name), |_, current| {
        let Some(current) = current.filter(|c| c["metadata"]["uid"] == uid) else {
            return Ok(Outcome::Unchanged);
        };
        let mut next = current.clone();
        next["status"]["capacity"]["storage"] = wanted.clone();
        Ok(Outcome::Put(next))
    });
}

/// Why the scheduler cannot place `pod` for its claims (upstream's words), if it cannot: a claim
/// it names is missing, being deleted, or not bound yet (but one of a WaitForFirstConsumer class,
/// which waits for this Pod).
pub fn unschedulable(store: &Store, pod: &Value) -> Option<String> {
    let namespace = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let mut unbound = false;
    for claim_name in claims_of(pod) {
        match store.get(CLAIMS, namespace, claim_name) {
            None => return Some(format!("persistentvolumeclaim {claim_name:?} not found")),
            Some(claim)
                if claim
                    .pointer("/metadata/deletionTimestamp")
                    .is_some_and(|t| !t.is_null()) =>
            {
                return Some(format!("persistentvolumeclaim {claim_name:?} is being deleted"));
            }
            Some(claim)
                if claim["status"]["phase"] != "Bound"
                    && !class_of(store, &claim).is_some_and(|c| waits_for_consumer(&c)) =>
            {
                unbound = true;
            }
            Some(_) => {}
        }
    }
    unbound.then(|| "pod has unbound immediate PersistentVolumeClaims".to_string())
}

/// The claims `pod` mounts.
fn claims_of(pod: &Value) -> impl Iterator<Item = &str> {
    pod["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| {
            v.pointer("/persistentVolumeClaim/claimName")
                .and_then(Value::as_str)
        })
}

/// The scheduler placed `pod` on `node`: each claim it mounts of a WaitForFirstConsumer class
/// that has no node yet is to be provisioned there.
pub fn select_node(store: &Store, pod: &Value, node: &str) {
    let namespace = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    for claim_name in claims_of(pod) {
        let waits = store
            .get(CLAIMS, namespace, claim_name)
            .and_then(|claim| class_of(store, &claim))
            .is_some_and(|class| waits_for_consumer(&class));
        if !waits {
            continue;
        }
        let _ = store.transact(
            CLAIMS,
            (namespace.to_string(), claim_name.to_string()),
            |_, current| {
                let Some(current) = current else {
                    return Ok(Outcome::Unchanged);
                };
                if current["status"]["phase"] == "Bound"
                    || current["metadata"]["annotations"][SELECTED_NODE]
                        .as_str()
                        .is_some()
                {
                    return Ok(Outcome::Unchanged);
                }
                let mut next = current.clone();
                next["metadata"]["annotations"][SELECTED_NODE] = json!(node);
                Ok(Outcome::Put(next))
            },
        );
    }
}

/// Whether every claim `pod` mounts is bound (the kubelet mounts them before it starts the Pod).
pub fn mounted(store: &Store, pod: &Value) -> bool {
    let namespace = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    claims_of(pod).all(|name| {
        store
            .get(CLAIMS, namespace, name)
            .is_some_and(|c| c["status"]["phase"] == "Bound")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(spec: Value) -> Value {
        json!({"metadata": {"name": "data", "namespace": "ns"}, "spec": spec})
    }

    #[test]
    fn a_claim_needs_an_access_mode_and_a_storage_request() {
        let mut causes = Vec::new();
        validate_claim(&claim(json!({})), &mut causes);
        let fields: Vec<&str> = causes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(fields, ["spec.accessModes", "spec.resources[storage]"]);
        causes.clear();
        validate_claim(
            &claim(
                json!({"accessModes": ["ReadWriteSometimes"], "resources": {"requests": {"storage": "1Gi"}}, "volumeMode": "Tape"}),
            ),
            &mut causes,
        );
        let fields: Vec<&str> = causes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(fields, ["spec.accessModes[0]", "spec.volumeMode"]);
        causes.clear();
        validate_claim(
            &claim(json!({"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}})),
            &mut causes,
        );
        assert!(causes.is_empty(), "{causes:?}");
    }

    #[test]
    fn a_bound_claim_may_only_grow() {
        let spec = json!({"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}, "storageClassName": "standard"});
        let mut old = claim(spec.clone());
        old["spec"]["volumeName"] = json!("pvc-1");
        old["status"] = json!({"phase": "Bound"});
        let mut grown = old.clone();
        grown["spec"]["resources"]["requests"]["storage"] = json!("2Gi");
        assert!(update_forbidden(&old, &grown).is_none());
        let mut shrunk = old.clone();
        shrunk["spec"]["resources"]["requests"]["storage"] = json!("512Mi");
        assert_eq!(
            update_forbidden(&old, &shrunk).unwrap().field,
            "spec.resources.requests.storage"
        );
        let mut moved = old.clone();
        moved["spec"]["storageClassName"] = json!("fast");
        assert_eq!(update_forbidden(&old, &moved).unwrap().field, "spec");
        let mut rebound = old.clone();
        rebound["spec"]["volumeName"] = json!("pvc-2");
        assert!(update_forbidden(&old, &rebound).is_some(), "bound once");
        // Pending: the binder sets the volume; nobody grows it yet.
        let pending = claim(spec);
        let mut binding = pending.clone();
        binding["spec"]["volumeName"] = json!("pvc-1");
        assert!(update_forbidden(&pending, &binding).is_none());
        let mut early = pending.clone();
        early["spec"]["resources"]["requests"]["storage"] = json!("2Gi");
        assert!(update_forbidden(&pending, &early).is_some());
    }

    #[test]
    fn a_pending_claim_is_bound_to_a_volume_made_for_it_and_the_volume_goes_with_it() {
        let store = Store::new(100);
        let class = default_class();
        store
            .transact(CLASSES, (String::new(), "standard".into()), |_, _| {
                Ok(Outcome::Put(class))
            })
            .unwrap();
        let mut made = claim(
            json!({"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}, "storageClassName": "standard"}),
        );
        made["metadata"]["uid"] = json!("u1");
        store
            .transact(CLAIMS, ("ns".into(), "data".into()), |_, _| {
                Ok(Outcome::Put(made))
            })
            .unwrap();
        let pod = json!({"metadata": {"namespace": "ns"}, "spec": {"volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "data"}}]}});
        assert_eq!(
            unschedulable(&store, &pod).as_deref(),
            Some("pod has unbound immediate PersistentVolumeClaims")
        );
        reconcile(&store, "ns");
        let bound = store.get(CLAIMS, "ns", "data").unwrap();
        assert_eq!(bound["status"]["phase"], "Bound");
        assert_eq!(bound["spec"]["volumeName"], "pvc-u1");
        assert_eq!(bound["status"]["capacity"]["storage"], "1Gi");
        let volume = store.get(VOLUMES, "", "pvc-u1").unwrap();
        assert_eq!(volume["spec"]["claimRef"]["uid"], "u1");
        assert_eq!(unschedulable(&store, &pod), None);

        // Grown: the volume and the claim's capacity follow.
        store
            .transact(CLAIMS, ("ns".into(), "data".into()), |_, c| {
                let mut next = c.unwrap().clone();
                next["spec"]["resources"]["requests"]["storage"] = json!("2Gi");
                Ok(Outcome::Put(next))
            })
            .unwrap();
        reconcile(&store, "ns");
        assert_eq!(
            store.get(CLAIMS, "ns", "data").unwrap()["status"]["capacity"]["storage"],
            "2Gi"
        );
        assert_eq!(
            store.get(VOLUMES, "", "pvc-u1").unwrap()["spec"]["capacity"]["storage"],
            "2Gi"
        );

        store
            .transact(CLAIMS, ("ns".into(), "data".into()), |_, _| Ok(Outcome::Delete))
            .unwrap();
        reconcile(&store, "ns");
        assert!(store.get(VOLUMES, "", "pvc-u1").is_none());
        let missing = json!({"metadata": {"namespace": "ns"}, "spec": {"volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "gone"}}]}});
        assert_eq!(
            unschedulable(&store, &missing).as_deref(),
            Some("persistentvolumeclaim \"gone\" not found")
        );
    }
}
