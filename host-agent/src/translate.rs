//! Virtual Pod → host Pod, with vCluster's naming and metadata, and the host's rules for what a
//! tenant's Pod may carry. The host agent is the policy point for the whole Pod it writes.
//!
//! | virtual                               | host                                                     |
//! |---------------------------------------|----------------------------------------------------------|
//! | name, namespace                       | `<name>-x-<namespace>-x-<tenant>` in the tenant's hostNamespace |
//! | labels                                | not copied under their keys (they could match host selectors); kept as JSON in `vcluster.loft.sh/labels` and under hashed keys `rcsync.io/label-<hash of key>` |
//! | pod (anti-)affinity terms, topologySpreadConstraints | label selectors rewritten to the hashed keys and scoped to the tenant's Pods of the namespaces they select in the virtual cluster (`vcluster.loft.sh/namespace`); the host term's own namespace scope is the tenant's host namespace |
//! | annotations                           | only those the tenant's `sync.toHost.pods.copyAnnotations` names (listed in `rcsync.io/copied-annotations`); never rcsync's or vCluster's own |
//! | —                                     | labels `vcluster.loft.sh/managed-by`, `vcluster.loft.sh/namespace` |
//! | —                                     | annotations `vcluster.loft.sh/object-{name,namespace,uid}` |
//! | spec.runtimeClassName                 | the host class's name (after reverse patches)            |
//! | ConfigMap / Secret references         | the translated copies (`<name>-x-<namespace>-x-<tenant>`), never a host object of the original name |
//! | fieldRef metadata.name/namespace/uid  | `metadata.annotations['vcluster.loft.sh/object-…']`      |
//! | fieldRef metadata.labels['k'] / metadata.annotations['k'] | `metadata.annotations['rcsync.io/label-<hash of k>']` (`annotation-…`), holding the virtual value |
//! | downwardAPI of all metadata.labels / annotations | refused: the host Pod does not carry them       |
//! | spec.nodeName                         | dropped: the host scheduler places Pods                  |
//! | spec.serviceAccountName / token mounts| dropped; `automountServiceAccountToken: false` (virtual credentials mean nothing on the host, and host ones must not leak in) |
//! | priorityClassName, priority, preemptionPolicy, overhead | dropped (host admission sets them)     |
//! | tolerations                           | control-plane / master ones dropped; `enforceTolerations` added |
//! | schedulerName                         | kept only when in `hybridScheduling.hostSchedulers`       |
//! | schedulingGates                       | one gate of rcsync's, `rcsync.io/virtual-gates`, while the virtual Pod has any; the tenant's names never reach the host (a tenant could otherwise lift a gate the host's own admission set) |
//! | ephemeralContainers (`kubectl debug`) | never on create (the API forbids it): those the host Pod lacks are added through its `ephemeralcontainers` subresource, references translated and checked by Pod Security like every container |
//! | status                                | not copied (the host owns it)                            |

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    ConfigMap, PersistentVolumeClaim, PersistentVolumeClaimSpec, Pod, PodAffinityTerm, PodSchedulingGate,
    PodSpec, Secret, Toleration, WeightedPodAffinityTerm,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::ObjectMeta;
use rcsync_core::naming::{
    ANNOTATION_OBJECT_NAME, ANNOTATION_OBJECT_NAMESPACE, ANNOTATION_OBJECT_UID, LABEL_MANAGED_BY,
    LABEL_NAMESPACE, host_label_key, host_object_name, host_pod_name,
};
use rcsync_core::pod_refs;
use rcsync_core::{AnnotationPattern, EnforcedToleration, PodPolicy, Tenant};

/// The scheduling gate a host Pod carries while its virtual Pod has scheduling gates (a queueing
/// controller of the tenant's has yet to release it). The tenant's own gate names stay in the
/// virtual cluster: named on the host, one could match a gate the host's admission sets, and
/// lifting it in the virtual cluster would lift the host's.
pub const VIRTUAL_GATES: &str = "rcsync.io/virtual-gates";

/// Annotation on host Pods holding the virtual Pod's labels (JSON), since they are not copied.
pub const ANNOTATION_VIRTUAL_LABELS: &str = "vcluster.loft.sh/labels";

/// Why a virtual Pod cannot be translated.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TranslateError {
    /// A required field is missing.
    #[error("the Pod has no {0}")]
    Missing(&'static str),
}

/// The identity of a virtual Pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtualPodRef {
    /// Namespace in the virtual cluster.
    pub namespace: String,
    /// Name in the virtual cluster.
    pub name: String,
    /// UID in the virtual cluster.
    pub uid: String,
}

/// Reads the identity of a virtual Pod.
pub fn virtual_ref(pod: &Pod) -> Result<VirtualPodRef, TranslateError> {
    let m = &pod.metadata;
    Ok(VirtualPodRef {
        namespace: m
            .namespace
            .clone()
            .filter(|s| !s.is_empty())
            .ok_or(TranslateError::Missing("metadata.namespace"))?,
        name: m
            .name
            .clone()
            .filter(|s| !s.is_empty())
            .ok_or(TranslateError::Missing("metadata.name"))?,
        uid: m
            .uid
            .clone()
            .filter(|s| !s.is_empty())
            .ok_or(TranslateError::Missing("metadata.uid"))?,
    })
}

/// Labels that select a tenant's host Pods.
pub fn managed_selector(tenant: &Tenant) -> String {
    format!("{LABEL_MANAGED_BY}={}", tenant.name)
}

/// Taint keys of control-plane nodes: tolerations for them never reach the host.
const CONTROL_PLANE_TAINTS: &[&str] = &[
    "node-role.kubernetes.io/control-plane",
    "node-role.kubernetes.io/master",
];

/// The host Pod for a virtual Pod of `tenant`, running `host_runtime_class` (empty: none).
pub fn host_pod(virtual_pod: &Pod, tenant: &Tenant, host_runtime_class: &str) -> Result<Pod, TranslateError> {
    let id = virtual_ref(virtual_pod)?;
    let mut spec = virtual_pod.spec.clone().ok_or(TranslateError::Missing("spec"))?;
    spec.node_name = None;
    spec.service_account_name = None;
    #[allow(deprecated)]
    {
        spec.service_account = None;
    }
    spec.automount_service_account_token = Some(false);
    spec.runtime_class_name = Some(host_runtime_class.to_string()).filter(|s| !s.is_empty());
    drop_token_volumes(&mut spec);
    // References resolve to the tenant's own translated copies, never to host objects.
    let tenant_name = tenant.name.as_str();
    pod_refs::rewrite(&mut spec, |_, name| {
        host_object_name(name, &id.namespace, tenant_name)
    });
    // So do claims, where the tenant's claims are made on the host (else they are refused below).
    if tenant.pods.claims {
        for claim in claim_volumes(&mut spec) {
            claim.claim_name = host_object_name(&claim.claim_name, &id.namespace, tenant_name);
        }
    }
    // The tenant's annotations the host allows first: rcsync's own (identity, fieldRef values)
    // are written over them, and the patterns never match those keys anyway.
    let mut annotations = copied_annotations(&virtual_pod.metadata, &tenant.pods.copy_annotations);
    annotations.extend(identity_annotations(&id.name, &id.namespace, Some(&id.uid)));
    rewrite_downward_api(&mut spec, &virtual_pod.metadata, &mut annotations);
    apply_scheduling_policy(&mut spec, &tenant.pods);
    scope_pod_selectors(&mut spec, &id.namespace, tenant_name);
    // Set by the host's own admission (priority from the class, overhead from the RuntimeClass);
    // values computed in the virtual cluster would be rejected or wrong there.
    spec.priority_class_name = None;
    spec.priority = None;
    spec.preemption_policy = None;
    spec.overhead = None;
    spec.scheduling_gates = spec
        .scheduling_gates
        .as_ref()
        .is_some_and(|gates| !gates.is_empty())
        .then(|| {
            vec![PodSchedulingGate {
                name: VIRTUAL_GATES.to_string(),
            }]
        });
    let mut labels = BTreeMap::from([
        (LABEL_MANAGED_BY.to_string(), tenant.name.to_string()),
        (LABEL_NAMESPACE.to_string(), id.namespace.clone()),
    ]);
    // Under hashed keys, for the selectors rewritten by `scope_pod_selectors`.
    for (key, value) in virtual_pod.metadata.labels.iter().flatten() {
        labels.insert(host_label_key(key), value.clone());
    }
    if let Some(virtual_labels) = virtual_pod.metadata.labels.as_ref().filter(|l| !l.is_empty()) {
        annotations.insert(
            ANNOTATION_VIRTUAL_LABELS.to_string(),
            serde_json::to_string(virtual_labels).expect("a string map serializes"),
        );
    }
    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(host_pod_name(&id.name, &id.namespace, tenant_name)),
            namespace: Some(tenant.host_namespace.clone()),
            labels: Some(labels),
            annotations: Some(annotations),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    })
}

/// Annotation on host Pods listing (comma-separated, sorted) the virtual annotations copied to it,
/// so that one the tenant removes is removed from the host Pod too, and nothing else is.
pub const ANNOTATION_COPIED: &str = "rcsync.io/copied-annotations";

/// The virtual Pod's annotations that `patterns` let through, with [`ANNOTATION_COPIED`] naming
/// them (nothing when none is).
fn copied_annotations(virtual_meta: &ObjectMeta, patterns: &[AnnotationPattern]) -> BTreeMap<String, String> {
    let mut copied: BTreeMap<String, String> = virtual_meta
        .annotations
        .iter()
        .flatten()
        .filter(|(key, _)| patterns.iter().any(|p| p.matches(key)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !copied.is_empty() {
        let keys: Vec<&str> = copied.keys().map(String::as_str).collect();
        let keys = keys.join(",");
        copied.insert(ANNOTATION_COPIED.to_string(), keys);
    }
    copied
}

/// The keys [`ANNOTATION_COPIED`] lists on a host Pod.
pub fn copied_keys(host_meta: &ObjectMeta) -> BTreeSet<&str> {
    host_meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_COPIED))
        .map(|keys| keys.split(',').filter(|k| !k.is_empty()).collect())
        .unwrap_or_default()
}

fn identity_annotations(name: &str, namespace: &str, uid: Option<&str>) -> BTreeMap<String, String> {
    let mut annotations = BTreeMap::from([
        (ANNOTATION_OBJECT_NAME.to_string(), name.to_string()),
        (ANNOTATION_OBJECT_NAMESPACE.to_string(), namespace.to_string()),
    ]);
    if let Some(uid) = uid {
        annotations.insert(ANNOTATION_OBJECT_UID.to_string(), uid.to_string());
    }
    annotations
}

/// Drops projected service-account token volumes (kube-api-access-*) and their mounts.
fn drop_token_volumes(spec: &mut PodSpec) {
    let dropped: BTreeSet<String> = spec
        .volumes
        .iter()
        .flatten()
        .filter(|v| {
            v.projected.as_ref().is_some_and(|p| {
                p.sources
                    .iter()
                    .flatten()
                    .any(|s| s.service_account_token.is_some())
            })
        })
        .map(|v| v.name.clone())
        .collect();
    if let Some(volumes) = &mut spec.volumes {
        volumes.retain(|v| !dropped.contains(&v.name));
    }
    for container in spec
        .containers
        .iter_mut()
        .chain(spec.init_containers.iter_mut().flatten())
    {
        if let Some(mounts) = &mut container.volume_mounts {
            mounts.retain(|m| !dropped.contains(&m.name));
        }
    }
}

/// Prefix of host Pod annotations holding the value of one virtual label a fieldRef reads.
pub const ANNOTATION_LABEL_PREFIX: &str = "rcsync.io/label-";
/// Prefix of host Pod annotations holding the value of one virtual annotation a fieldRef reads.
pub const ANNOTATION_ANNOTATION_PREFIX: &str = "rcsync.io/annotation-";

/// The host field a downward-API `fieldPath` of the virtual Pod reads from, when it differs, and
/// the annotation (key, virtual value) the host Pod must carry for it. The virtual Pod's identity
/// is in vCluster's annotations; one label or annotation (`metadata.labels['k']`) is copied into
/// an annotation of its own, named by a hash of `k` (label keys may hold characters annotation
/// names may not). Whole maps stay as they are and are refused by [`unsupported`].
fn host_field_path(path: &str, virtual_meta: &ObjectMeta) -> Option<(String, Option<(String, String)>)> {
    let identity = match path {
        "metadata.name" => Some(ANNOTATION_OBJECT_NAME),
        "metadata.namespace" => Some(ANNOTATION_OBJECT_NAMESPACE),
        "metadata.uid" => Some(ANNOTATION_OBJECT_UID),
        _ => None,
    };
    if let Some(annotation) = identity {
        return Some((format!("metadata.annotations['{annotation}']"), None));
    }
    let (map, key, prefix) = if let Some(key) = subscript(path, "metadata.labels") {
        (virtual_meta.labels.as_ref(), key, ANNOTATION_LABEL_PREFIX)
    } else if let Some(key) = subscript(path, "metadata.annotations") {
        (
            virtual_meta.annotations.as_ref(),
            key,
            ANNOTATION_ANNOTATION_PREFIX,
        )
    } else {
        return None;
    };
    let annotation = format!("{prefix}{}", rcsync_core::version::content_version(key));
    // A key the virtual Pod lacks reads as "" there, and so does a missing annotation here.
    let value = map
        .and_then(|m| m.get(key))
        .map(|v| (annotation.clone(), v.clone()));
    Some((format!("metadata.annotations['{annotation}']"), value))
}

/// `k` of `field['k']`, the downward API's subscript form.
fn subscript<'a>(path: &'a str, field: &str) -> Option<&'a str> {
    path.strip_prefix(field)?.strip_prefix("['")?.strip_suffix("']")
}

/// Points the Pod's downward-API `fieldRef`s (env and downwardAPI volumes, projected ones too) at
/// what the host Pod holds for them (see [`host_field_path`]), adding the annotations they read.
fn rewrite_downward_api(
    spec: &mut PodSpec,
    virtual_meta: &ObjectMeta,
    annotations: &mut BTreeMap<String, String>,
) {
    let mut fix = |field: &mut Option<k8s_openapi::api::core::v1::ObjectFieldSelector>| {
        if let Some(field) = field
            && let Some((path, annotation)) = host_field_path(&field.field_path, virtual_meta)
        {
            field.field_path = path;
            annotations.extend(annotation);
        }
    };
    for c in spec
        .containers
        .iter_mut()
        .chain(spec.init_containers.iter_mut().flatten())
    {
        for var in c.env.iter_mut().flatten() {
            if let Some(from) = &mut var.value_from {
                fix(&mut from.field_ref);
            }
        }
    }
    for c in spec.ephemeral_containers.iter_mut().flatten() {
        for var in c.env.iter_mut().flatten() {
            if let Some(from) = &mut var.value_from {
                fix(&mut from.field_ref);
            }
        }
    }
    for volume in spec.volumes.iter_mut().flatten() {
        for file in downward_api_files(volume) {
            fix(&mut file.field_ref);
        }
    }
}

/// The downward-API items of a volume, projected ones too.
fn downward_api_files(
    volume: &mut k8s_openapi::api::core::v1::Volume,
) -> Vec<&mut k8s_openapi::api::core::v1::DownwardAPIVolumeFile> {
    let mut files = Vec::new();
    if let Some(d) = &mut volume.downward_api {
        files.extend(d.items.iter_mut().flatten());
    }
    if let Some(p) = &mut volume.projected {
        for source in p.sources.iter_mut().flatten() {
            if let Some(d) = &mut source.downward_api {
                files.extend(d.items.iter_mut().flatten());
            }
        }
    }
    files
}

/// Tolerations, scheduler name: what the tenant may ask of the host's scheduler.
fn apply_scheduling_policy(spec: &mut PodSpec, policy: &PodPolicy) {
    let mut tolerations: Vec<Toleration> = spec
        .tolerations
        .take()
        .unwrap_or_default()
        .into_iter()
        .filter(|t| {
            // An empty key with Exists tolerates every taint, control-plane ones included.
            let key = t.key.as_deref().unwrap_or_default();
            let wildcard = key.is_empty() && t.operator.as_deref() == Some("Exists");
            !wildcard && !CONTROL_PLANE_TAINTS.contains(&key)
        })
        .collect();
    for enforced in &policy.enforce_tolerations {
        let toleration = enforced_toleration(enforced);
        if !tolerations.contains(&toleration) {
            tolerations.push(toleration);
        }
    }
    spec.tolerations = Some(tolerations).filter(|t| !t.is_empty());
    // The tenant's pool of nodes: a different value the tenant chose stays, for
    // `node_selector_conflicts` to refuse (never silently moved to another node).
    if !policy.enforce_node_selector.is_empty() {
        let selector = spec.node_selector.get_or_insert_with(BTreeMap::new);
        for (key, value) in &policy.enforce_node_selector {
            selector.entry(key.clone()).or_insert_with(|| value.clone());
        }
    }
    if policy.always_pull_images {
        for container in spec
            .containers
            .iter_mut()
            .chain(spec.init_containers.iter_mut().flatten())
        {
            container.image_pull_policy = Some("Always".to_string());
        }
        for container in spec.ephemeral_containers.iter_mut().flatten() {
            container.image_pull_policy = Some("Always".to_string());
        }
    }
    if spec
        .scheduler_name
        .as_ref()
        .is_some_and(|name| !policy.host_schedulers.contains(name))
    {
        spec.scheduler_name = None;
    }
}

/// Rewrites the label selectors of a Pod's pod affinity and anti-affinity terms and topology
/// spread constraints so they select on the host what they select in the virtual cluster, and
/// nothing else: their keys become the hashed keys the host Pods carry the tenant's labels under
/// ([`host_label_key`]), and they are narrowed to the tenant's Pods (`vcluster.loft.sh/managed-by`)
/// of the virtual namespaces they select (`vcluster.loft.sh/namespace`: the Pod's own by default,
/// those of `namespaces`, all of the tenant's for an empty `namespaceSelector`). The host term
/// names no namespace, so it selects in the tenant's host namespace only: a tenant can neither
/// place its Pods by another tenant's Pods nor learn where those run. A term selecting namespaces
/// by their labels keeps its `namespaceSelector`, which [`unsupported`] refuses (the host cannot
/// see the virtual namespaces' labels). A null label selector selects no Pod and stays null.
fn scope_pod_selectors(spec: &mut PodSpec, namespace: &str, tenant: &str) {
    if let Some(affinity) = spec.affinity.as_mut() {
        let mut terms: Vec<&mut PodAffinityTerm> = Vec::new();
        if let Some(a) = affinity.pod_affinity.as_mut() {
            terms.extend(terms_mut(
                &mut a.required_during_scheduling_ignored_during_execution,
                &mut a.preferred_during_scheduling_ignored_during_execution,
            ));
        }
        if let Some(a) = affinity.pod_anti_affinity.as_mut() {
            terms.extend(terms_mut(
                &mut a.required_during_scheduling_ignored_during_execution,
                &mut a.preferred_during_scheduling_ignored_during_execution,
            ));
        }
        for term in terms {
            let by_labels = term
                .namespace_selector
                .as_ref()
                .is_some_and(|s| !selects_everything(s));
            if by_labels {
                continue;
            }
            let namespaces = if term.namespace_selector.take().is_some() {
                None
            } else {
                match term.namespaces.take().unwrap_or_default() {
                    listed if listed.is_empty() => Some(vec![namespace.to_string()]),
                    listed => Some(listed),
                }
            };
            term.namespaces = None;
            if let Some(selector) = term.label_selector.as_mut() {
                scope_selector(selector, tenant, namespaces);
            }
            term.match_label_keys =
                host_label_keys(term.match_label_keys.take(), term.label_selector.as_ref());
            term.mismatch_label_keys =
                host_label_keys(term.mismatch_label_keys.take(), term.label_selector.as_ref());
        }
    }
    for constraint in spec.topology_spread_constraints.iter_mut().flatten() {
        // Skew is counted over the Pod's own namespace, as upstream counts it.
        if let Some(selector) = constraint.label_selector.as_mut() {
            scope_selector(selector, tenant, Some(vec![namespace.to_string()]));
        }
        constraint.match_label_keys = host_label_keys(
            constraint.match_label_keys.take(),
            constraint.label_selector.as_ref(),
        );
    }
}

/// The terms of a pod affinity or anti-affinity: the required ones, then those of the preferred.
fn terms_mut<'a>(
    required: &'a mut Option<Vec<PodAffinityTerm>>,
    preferred: &'a mut Option<Vec<WeightedPodAffinityTerm>>,
) -> impl Iterator<Item = &'a mut PodAffinityTerm> {
    required
        .iter_mut()
        .flatten()
        .chain(preferred.iter_mut().flatten().map(|w| &mut w.pod_affinity_term))
}

/// Whether a label selector selects everything (no requirement at all).
fn selects_everything(selector: &LabelSelector) -> bool {
    selector.match_labels.as_ref().is_none_or(BTreeMap::is_empty)
        && selector.match_expressions.as_ref().is_none_or(Vec::is_empty)
}

/// A tenant's selector with its keys hashed, narrowed to the tenant's Pods of `namespaces`
/// (virtual names; `None`: all of them).
fn scope_selector(selector: &mut LabelSelector, tenant: &str, namespaces: Option<Vec<String>>) {
    let labels = selector.match_labels.take().unwrap_or_default();
    let mut labels: BTreeMap<String, String> = labels
        .into_iter()
        .map(|(key, value)| (host_label_key(&key), value))
        .collect();
    labels.insert(LABEL_MANAGED_BY.to_string(), tenant.to_string());
    selector.match_labels = Some(labels);
    let mut expressions = selector.match_expressions.take().unwrap_or_default();
    for expression in expressions.iter_mut() {
        expression.key = host_label_key(&expression.key);
    }
    if let Some(namespaces) = namespaces {
        expressions.push(LabelSelectorRequirement {
            key: LABEL_NAMESPACE.to_string(),
            operator: "In".to_string(),
            values: Some(namespaces),
        });
    }
    selector.match_expressions = (!expressions.is_empty()).then_some(expressions);
}

/// `matchLabelKeys` / `mismatchLabelKeys` as the host Pod carries those labels; keys the virtual
/// API server already merged into `selector` (as it does on create) are left out, so the host's
/// does not merge them twice.
fn host_label_keys(keys: Option<Vec<String>>, selector: Option<&LabelSelector>) -> Option<Vec<String>> {
    let merged: BTreeSet<&str> = selector
        .and_then(|s| s.match_expressions.as_ref())
        .into_iter()
        .flatten()
        .map(|e| e.key.as_str())
        .collect();
    let keys: Vec<String> = keys?
        .iter()
        .map(|k| host_label_key(k))
        .filter(|k| !merged.contains(k.as_str()))
        .collect();
    (!keys.is_empty()).then_some(keys)
}

/// The entries of a host Pod's node selector that contradict the node selector the host enforces
/// for its tenant (`sync.toHost.pods.enforceNodeSelector`), each as `key=tenant's value (the host
/// enforces key=value)`.
pub fn node_selector_conflicts(spec: &PodSpec, policy: &PodPolicy) -> Vec<String> {
    let selector = spec.node_selector.as_ref();
    policy
        .enforce_node_selector
        .iter()
        .filter_map(|(key, value)| {
            let chosen = selector?.get(key)?;
            (chosen != value)
                .then(|| format!("nodeSelector {key}={chosen} (the host enforces {key}={value})"))
        })
        .collect()
}

fn enforced_toleration(t: &EnforcedToleration) -> Toleration {
    Toleration {
        key: Some(t.key.clone()),
        operator: Some(if t.value.is_some() { "Equal" } else { "Exists" }.to_string()),
        value: t.value.clone(),
        effect: t.effect.map(|e| e.as_str().to_string()),
        toleration_seconds: None,
    }
}

/// The `persistentVolumeClaim` sources of a Pod's volumes.
pub fn claim_volumes(
    spec: &mut PodSpec,
) -> impl Iterator<Item = &mut k8s_openapi::api::core::v1::PersistentVolumeClaimVolumeSource> {
    spec.volumes
        .iter_mut()
        .flatten()
        .filter_map(|v| v.persistent_volume_claim.as_mut())
}

/// What in a host Pod the host cannot honour under the tenant's `policy`; each entry names the
/// field and why. Checked on the host form (service-account token volumes already dropped),
/// before Pod Security.
pub fn unsupported(spec: &PodSpec, policy: &PodPolicy) -> Vec<String> {
    let mut problems = Vec::new();
    for v in spec.volumes.iter().flatten() {
        let name = &v.name;
        let why = if v.persistent_volume_claim.is_some() {
            (!policy.claims).then(|| {
                "persistentVolumeClaim volumes are not synced to the host (sync.toHost.persistentVolumeClaims.enabled \
                 is not true in the host agent's tenants file)"
                    .to_string()
            })
        } else if let Some(e) = &v.ephemeral {
            let template = e.volume_claim_template.as_ref().map(|t| &t.spec);
            (template.is_some_and(|s| s.data_source.is_some() || s.data_source_ref.is_some()))
                .then(|| "an ephemeral volume's dataSource would name a host object".to_string())
        } else if v
            .csi
            .as_ref()
            .is_some_and(|c| c.node_publish_secret_ref.is_some())
            || v.cephfs.as_ref().is_some_and(|c| c.secret_ref.is_some())
            || v.rbd.as_ref().is_some_and(|c| c.secret_ref.is_some())
            || v.iscsi.as_ref().is_some_and(|c| c.secret_ref.is_some())
            || v.flex_volume.as_ref().is_some_and(|c| c.secret_ref.is_some())
            || v.scale_io.is_some()
            || v.storageos.as_ref().is_some_and(|c| c.secret_ref.is_some())
            || v.azure_file.is_some()
            || v.cinder.as_ref().is_some_and(|c| c.secret_ref.is_some())
        {
            Some(format!(
                "{} volumes name a Secret that would resolve on the host",
                crate::pod_security::volume_type(v)
            ))
        } else if v.git_repo.is_some() {
            Some("gitRepo volumes are deprecated and disabled upstream".to_string())
        } else if let Some(p) = &v.projected {
            p.sources.iter().flatten().find_map(|s| {
                if s.cluster_trust_bundle.is_some() {
                    Some("projected clusterTrustBundle sources read host objects".to_string())
                } else if s.pod_certificate.is_some() {
                    Some("projected podCertificate sources are issued by the host".to_string())
                } else {
                    None
                }
            })
        } else if crate::pod_security::volume_type(v) == "unknown" {
            Some("its volume type is not known to rcsync".to_string())
        } else {
            None
        };
        if let Some(why) = why {
            problems.push(format!("volume {name:?}: {why}"));
        }
    }
    for v in spec.volumes.iter().flatten() {
        let projected = v.projected.iter().flat_map(|p| p.sources.iter().flatten());
        let files = v
            .downward_api
            .iter()
            .flat_map(|d| d.items.iter().flatten())
            .chain(
                projected
                    .filter_map(|s| s.downward_api.as_ref())
                    .flat_map(|d| d.items.iter().flatten()),
            );
        for file in files {
            let path = file.field_ref.as_ref().map(|f| f.field_path.as_str());
            if let Some(whole @ ("metadata.labels" | "metadata.annotations")) = path {
                problems.push(format!(
                    "volume {:?}: downwardAPI item {:?} reads all of {whole}, which the host Pod does not carry (single keys, {whole}['key'], are mapped)",
                    v.name, file.path
                ));
            }
        }
    }
    if spec.resource_claims.as_ref().is_some_and(|c| !c.is_empty()) {
        problems.push("resourceClaims: resource claims are not synced to the host".to_string());
    }
    if spec.scheduling_group.is_some() {
        problems.push("schedulingGroup: scheduling groups are not synced to the host".to_string());
    }
    // What `scope_pod_selectors` left as it was: a term selecting namespaces by their labels.
    let affinity = spec.affinity.as_ref();
    let kinds = [
        (
            "podAffinity",
            affinity.and_then(|a| a.pod_affinity.as_ref()).map(|a| {
                (
                    &a.required_during_scheduling_ignored_during_execution,
                    &a.preferred_during_scheduling_ignored_during_execution,
                )
            }),
        ),
        (
            "podAntiAffinity",
            affinity.and_then(|a| a.pod_anti_affinity.as_ref()).map(|a| {
                (
                    &a.required_during_scheduling_ignored_during_execution,
                    &a.preferred_during_scheduling_ignored_during_execution,
                )
            }),
        ),
    ];
    for (kind, terms) in kinds {
        let Some((required, preferred)) = terms else {
            continue;
        };
        let named = required
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, t)| (format!("requiredDuringSchedulingIgnoredDuringExecution[{i}]"), t))
            .chain(preferred.iter().flatten().enumerate().map(|(i, w)| {
                (
                    format!("preferredDuringSchedulingIgnoredDuringExecution[{i}].podAffinityTerm"),
                    &w.pod_affinity_term,
                )
            }));
        for (field, term) in named {
            if term.namespace_selector.is_some() {
                problems.push(format!(
                    "affinity.{kind}.{field}.namespaceSelector: namespaces selected by their labels cannot be resolved on the host (list them in namespaces, or select all with an empty namespaceSelector)"
                ));
            }
        }
    }
    problems
}

/// The host copy of a virtual ConfigMap a Pod of `tenant` references.
pub fn host_config_map(virtual_cm: &ConfigMap, tenant: &Tenant) -> Result<ConfigMap, TranslateError> {
    let (name, namespace) = object_identity(&virtual_cm.metadata)?;
    Ok(ConfigMap {
        metadata: copy_metadata(&name, &namespace, tenant),
        data: virtual_cm.data.clone(),
        binary_data: virtual_cm.binary_data.clone(),
        immutable: None,
    })
}

/// The host copy of a virtual Secret a Pod of `tenant` references. A service-account token Secret
/// becomes `Opaque`: on the host its type would make the token controller fill in a host token.
pub fn host_secret(virtual_secret: &Secret, tenant: &Tenant) -> Result<Secret, TranslateError> {
    let (name, namespace) = object_identity(&virtual_secret.metadata)?;
    let type_ = match virtual_secret.type_.as_deref() {
        Some("kubernetes.io/service-account-token") | None => Some("Opaque".to_string()),
        other => other.map(str::to_string),
    };
    Ok(Secret {
        metadata: copy_metadata(&name, &namespace, tenant),
        data: virtual_secret.data.clone(),
        // stringData is write-only in the API; fold it in as the API server would.
        string_data: virtual_secret.string_data.clone(),
        type_,
        immutable: None,
    })
}

fn object_identity(meta: &ObjectMeta) -> Result<(String, String), TranslateError> {
    let name = meta
        .name
        .clone()
        .filter(|s| !s.is_empty())
        .ok_or(TranslateError::Missing("metadata.name"))?;
    let namespace = meta
        .namespace
        .clone()
        .filter(|s| !s.is_empty())
        .ok_or(TranslateError::Missing("metadata.namespace"))?;
    Ok((name, namespace))
}

/// Metadata of a host copy: translated name, the tenant's labels, the virtual identity; nothing
/// of the virtual object's own labels and annotations.
fn copy_metadata(name: &str, namespace: &str, tenant: &Tenant) -> ObjectMeta {
    ObjectMeta {
        name: Some(host_object_name(name, namespace, tenant.name.as_str())),
        namespace: Some(tenant.host_namespace.clone()),
        labels: Some(BTreeMap::from([
            (LABEL_MANAGED_BY.to_string(), tenant.name.to_string()),
            (LABEL_NAMESPACE.to_string(), namespace.to_string()),
        ])),
        annotations: Some(identity_annotations(name, namespace, None)),
        ..Default::default()
    }
}

/// Why a virtual PodDisruptionBudget has no host budget.
#[derive(Debug, PartialEq, Eq)]
pub enum BudgetProblem {
    /// The request is malformed (no name, namespace or uid): the caller's bug.
    Invalid(String),
    /// The budget cannot be held on the host as it stands: a refusal the tenant sees.
    Unsupported(String),
}

/// The host PodDisruptionBudget of a virtual one of `tenant`: named, labelled and annotated as
/// the tenant's other host objects; its selector rewritten to the keys the host Pods carry the
/// virtual labels under ([`host_label_key`]) and narrowed to the tenant's host Pods of the
/// budget's own virtual namespace (an empty selector, all of that namespace's Pods; a null one,
/// none, as upstream). The host's disruption controller counts the replicas a `maxUnavailable` or
/// a percentage is taken of from the Pods' controllers, which live in the virtual cluster (host
/// Pods have none), so such a budget asks the host for the whole number of healthy Pods the
/// virtual cluster's disruption controller computed (`status.desiredHealthy`, once its
/// `observedGeneration` caught up with the spec); a whole `minAvailable` is sent as it is.
pub fn host_disruption_budget(
    virtual_budget: &PodDisruptionBudget,
    tenant: &Tenant,
) -> Result<PodDisruptionBudget, BudgetProblem> {
    let meta = &virtual_budget.metadata;
    let (name, namespace) = object_identity(meta)
        .map_err(|e| BudgetProblem::Invalid(format!("the PodDisruptionBudget has no {}", missing(&e))))?;
    let uid = meta
        .uid
        .as_deref()
        .filter(|u| !u.is_empty())
        .ok_or_else(|| BudgetProblem::Invalid("the PodDisruptionBudget has no metadata.uid".into()))?;
    let spec = virtual_budget.spec.clone().unwrap_or_default();
    let whole = |v: &IntOrString| matches!(v, IntOrString::Int(_));
    let (min_available, max_unavailable) = match (&spec.min_available, &spec.max_unavailable) {
        (Some(min), None) if whole(min) => (Some(min.clone()), None),
        (None, None) => (None, None),
        (min, max) => {
            let stated = match (min, max) {
                (Some(IntOrString::String(p)), _) => format!("minAvailable: {p}"),
                (_, Some(IntOrString::Int(n))) => format!("maxUnavailable: {n}"),
                (_, Some(IntOrString::String(p))) => format!("maxUnavailable: {p}"),
                _ => "its spec".to_string(),
            };
            let desired_healthy = virtual_budget
                .status
                .as_ref()
                .filter(|s| s.observed_generation.is_some() && s.observed_generation >= meta.generation)
                .and_then(|s| s.desired_healthy);
            match desired_healthy {
                Some(healthy) => (Some(IntOrString::Int(healthy)), None),
                None => {
                    return Err(BudgetProblem::Unsupported(format!(
                        "{stated} is counted on the host as the healthy Pods the virtual cluster's disruption \
                         controller wants (status.desiredHealthy), which it has not computed for this spec yet"
                    )));
                }
            }
        }
    };
    let selector = spec.selector.map(|mut selector| {
        scope_selector(&mut selector, tenant.name.as_str(), Some(vec![namespace.clone()]));
        selector
    });
    let mut metadata = copy_metadata(&name, &namespace, tenant);
    metadata.annotations = Some(identity_annotations(&name, &namespace, Some(uid)));
    Ok(PodDisruptionBudget {
        metadata,
        spec: Some(PodDisruptionBudgetSpec {
            min_available,
            max_unavailable,
            selector,
            unhealthy_pod_eviction_policy: spec.unhealthy_pod_eviction_policy,
        }),
        status: None,
    })
}

/// Why a virtual PersistentVolumeClaim has no host claim.
#[derive(Debug, PartialEq, Eq)]
pub enum ClaimProblem {
    /// The request is malformed (no name, namespace or uid): the caller's bug.
    Invalid(String),
    /// The claim cannot be made on the host as it stands: a refusal the tenant sees.
    Unsupported(String),
}

/// The host PersistentVolumeClaim of a virtual one of `tenant`: named, labelled and annotated as
/// the tenant's other host objects, with the access modes, storage request, class, volume mode
/// and volume attributes class it asks for. A claim binding host storage the tenant does not own
/// is refused: one naming a volume (`volumeName`), selecting volumes by their labels
/// (`selector`), or cloned from anything but another claim of its own namespace, whose host
/// claim (the tenant's own copy) is the host clone's source. Returns the host claim and the
/// virtual name of the claim it clones, if any (the caller checks that host claim is the
/// tenant's).
pub fn host_claim(
    virtual_claim: &PersistentVolumeClaim,
    tenant: &Tenant,
) -> Result<(PersistentVolumeClaim, Option<String>), ClaimProblem> {
    let meta = &virtual_claim.metadata;
    let (name, namespace) = object_identity(meta)
        .map_err(|e| ClaimProblem::Invalid(format!("the PersistentVolumeClaim has no {}", missing(&e))))?;
    let uid = meta
        .uid
        .as_deref()
        .filter(|u| !u.is_empty())
        .ok_or_else(|| ClaimProblem::Invalid("the PersistentVolumeClaim has no metadata.uid".into()))?;
    let spec = virtual_claim.spec.clone().unwrap_or_default();
    if spec.volume_name.as_deref().is_some_and(|v| !v.is_empty()) {
        return Err(ClaimProblem::Unsupported(
            "spec.volumeName names a host PersistentVolume, which the tenant does not own: the host provisions the \
             claim's volume"
                .into(),
        ));
    }
    if spec.selector.is_some() {
        return Err(ClaimProblem::Unsupported(
            "spec.selector selects host PersistentVolumes by their labels, which the tenant does not own: the host \
             provisions the claim's volume"
                .into(),
        ));
    }
    // A clone of another claim of the same namespace only (dataSource, or dataSourceRef without a
    // namespace): its source becomes that claim's host copy.
    let mut source = None;
    let data_source = match (&spec.data_source, &spec.data_source_ref) {
        (None, None) => None,
        (from, from_ref) => {
            let (kind, group, source_name, source_namespace) = match (from, from_ref) {
                (_, Some(r)) => (&r.kind, &r.api_group, &r.name, r.namespace.as_deref()),
                (Some(d), None) => (&d.kind, &d.api_group, &d.name, None),
                (None, None) => unreachable!("matched above"),
            };
            let core = group.as_deref().is_none_or(str::is_empty);
            if kind != "PersistentVolumeClaim" || !core || source_namespace.is_some_and(|ns| ns != namespace)
            {
                return Err(ClaimProblem::Unsupported(format!(
                    "its data source ({kind} {source_name}) would name a host object: only a clone of another \
                     PersistentVolumeClaim of its namespace is synced"
                )));
            }
            source = Some(source_name.clone());
            Some(k8s_openapi::api::core::v1::TypedLocalObjectReference {
                api_group: None,
                kind: kind.clone(),
                name: host_object_name(source_name, &namespace, tenant.name.as_str()),
            })
        }
    };
    let mut metadata = copy_metadata(&name, &namespace, tenant);
    metadata.annotations = Some(identity_annotations(&name, &namespace, Some(uid)));
    let claim = PersistentVolumeClaim {
        metadata,
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: spec.access_modes,
            resources: spec.resources,
            storage_class_name: spec.storage_class_name,
            volume_mode: spec.volume_mode,
            volume_attributes_class_name: spec.volume_attributes_class_name,
            data_source,
            ..Default::default()
        }),
        status: None,
    };
    Ok((claim, source))
}

fn missing(error: &TranslateError) -> &'static str {
    match error {
        TranslateError::Missing(field) => field,
    }
}

/// Who holds a host object's name: the virtual `namespace/name` recorded on it, when it is a copy
/// of `tenant`'s; `None` for objects rcsync did not write for that tenant.
pub fn recorded_holder(meta: &ObjectMeta, tenant: &Tenant) -> Option<(String, String)> {
    let managed = meta.labels.as_ref()?.get(LABEL_MANAGED_BY)? == tenant.name.as_str();
    let a = meta.annotations.as_ref()?;
    managed.then(|| {
        Some((
            a.get(ANNOTATION_OBJECT_NAMESPACE)?.clone(),
            a.get(ANNOTATION_OBJECT_NAME)?.clone(),
        ))
    })?
}

/// The virtual identity recorded on a host Pod, if it is one of ours.
pub fn recorded_ref(host: &ObjectMeta) -> Option<VirtualPodRef> {
    let a = host.annotations.as_ref()?;
    Some(VirtualPodRef {
        namespace: a.get(ANNOTATION_OBJECT_NAMESPACE)?.clone(),
        name: a.get(ANNOTATION_OBJECT_NAME)?.clone(),
        uid: a.get(ANNOTATION_OBJECT_UID)?.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn tenant() -> Tenant {
        rcsync_core::TenantsFile::parse(
            Path::new("t.yaml"),
            "tenants:\n  - {name: team-a, hostNamespace: vc-team-a}\n",
        )
        .unwrap()
        .tenants()[0]
            .clone()
    }

    fn budget(spec: serde_json::Value, status: serde_json::Value) -> PodDisruptionBudget {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": "b-1", "generation": 2,
                         "labels": {"team": "x"}, "annotations": {"note": "virtual only"}},
            "spec": spec,
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn a_disruption_budget_selects_the_tenants_pods_of_its_namespace_and_asks_a_whole_number_of_them() {
        let host = host_disruption_budget(
            &budget(
                serde_json::json!({"minAvailable": 2, "unhealthyPodEvictionPolicy": "AlwaysAllow",
                                   "selector": {"matchLabels": {"app": "web"},
                                                "matchExpressions": [{"key": "tier", "operator": "Exists"}]}}),
                serde_json::Value::Null,
            ),
            &tenant(),
        )
        .unwrap();
        assert_eq!(host.metadata.name.as_deref(), Some("web-x-shop-x-team-a"));
        assert_eq!(host.metadata.namespace.as_deref(), Some("vc-team-a"));
        let annotations = host.metadata.annotations.clone().unwrap();
        assert_eq!(
            annotations.get(ANNOTATION_OBJECT_UID).map(String::as_str),
            Some("b-1")
        );
        assert!(
            !annotations.contains_key("note"),
            "the virtual metadata stays virtual"
        );
        assert!(!host.metadata.labels.clone().unwrap().contains_key("team"));
        let spec = host.spec.unwrap();
        assert_eq!(spec.min_available, Some(IntOrString::Int(2)));
        assert_eq!(spec.unhealthy_pod_eviction_policy.as_deref(), Some("AlwaysAllow"));
        let selector = spec.selector.unwrap();
        assert_eq!(
            selector.match_labels.unwrap(),
            BTreeMap::from([
                (host_label_key("app"), "web".to_string()),
                (LABEL_MANAGED_BY.to_string(), "team-a".to_string()),
            ])
        );
        let expressions = selector.match_expressions.unwrap();
        assert_eq!(expressions[0].key, host_label_key("tier"));
        assert_eq!(
            (expressions[1].key.as_str(), expressions[1].values.clone()),
            (LABEL_NAMESPACE, Some(vec!["shop".to_string()]))
        );

        // An empty selector: every Pod of the tenant's in that namespace; a null one: none.
        let everything = host_disruption_budget(
            &budget(
                serde_json::json!({"minAvailable": 1, "selector": {}}),
                serde_json::Value::Null,
            ),
            &tenant(),
        )
        .unwrap();
        let selector = everything.spec.unwrap().selector.unwrap();
        assert_eq!(selector.match_labels.unwrap().len(), 1);
        assert_eq!(selector.match_expressions.unwrap().len(), 1);
        let nothing = host_disruption_budget(
            &budget(serde_json::json!({"minAvailable": 1}), serde_json::Value::Null),
            &tenant(),
        )
        .unwrap();
        assert_eq!(nothing.spec.unwrap().selector, None);

        // maxUnavailable and percentages: the whole number the virtual cluster computed, once it
        // computed it for this spec.
        for spec in [
            serde_json::json!({"maxUnavailable": 1}),
            serde_json::json!({"minAvailable": "50%"}),
        ] {
            let current = serde_json::json!({"observedGeneration": 2, "desiredHealthy": 3, "currentHealthy": 4,
                                             "disruptionsAllowed": 1, "expectedPods": 4});
            let host = host_disruption_budget(&budget(spec.clone(), current), &tenant()).unwrap();
            let host_spec = host.spec.unwrap();
            assert_eq!(
                (host_spec.min_available, host_spec.max_unavailable),
                (Some(IntOrString::Int(3)), None)
            );
            let stale = serde_json::json!({"observedGeneration": 1, "desiredHealthy": 5, "currentHealthy": 4,
                                           "disruptionsAllowed": 0, "expectedPods": 4});
            let Err(BudgetProblem::Unsupported(message)) =
                host_disruption_budget(&budget(spec, stale), &tenant())
            else {
                panic!("a stale status is not used");
            };
            assert!(message.contains("status.desiredHealthy"), "{message}");
        }
        let mut anonymous = budget(serde_json::json!({"minAvailable": 1}), serde_json::Value::Null);
        anonymous.metadata.uid = None;
        assert_eq!(
            host_disruption_budget(&anonymous, &tenant()),
            Err(BudgetProblem::Invalid(
                "the PodDisruptionBudget has no metadata.uid".into()
            ))
        );
    }

    fn pod() -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "my-pod", "namespace": "default", "uid": "u-1", "labels": {"app": "web", "vcluster.loft.sh/managed-by": "team-b"}},
            "spec": {
                "nodeName": "virtual-node", "serviceAccountName": "builder", "runtimeClassName": "sandboxed",
                "containers": [{"name": "c", "image": "nginx", "volumeMounts": [
                    {"name": "kube-api-access-abc", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"},
                    {"name": "data", "mountPath": "/data"}]}],
                "volumes": [
                    {"name": "kube-api-access-abc", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}},
                    {"name": "data", "emptyDir": {}}]
            },
            "status": {"phase": "Running"}
        }))
        .unwrap()
    }

    fn with_spec(extra: serde_json::Value) -> Pod {
        let mut pod = serde_json::to_value(pod()).unwrap();
        for (k, v) in extra.as_object().unwrap() {
            pod["spec"][k] = v.clone();
        }
        serde_json::from_value(pod).unwrap()
    }

    #[test]
    fn affinity_and_spread_selectors_select_the_tenants_pods_of_the_namespaces_they_name_only() {
        let web = |extra: serde_json::Value| {
            let mut term = serde_json::json!({"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "kubernetes.io/hostname"});
            for (k, v) in extra.as_object().unwrap() {
                term[k] = v.clone();
            }
            term
        };
        let pod = with_spec(serde_json::json!({
            "affinity": {
                "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                    web(serde_json::json!({})),
                    web(serde_json::json!({"namespaces": ["shop", "db"]})),
                    web(serde_json::json!({"namespaceSelector": {}})),
                    {"topologyKey": "zone"},
                ]},
                "podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 10, "podAffinityTerm": {
                    "labelSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["cache"]}]},
                    "matchLabelKeys": ["version", "app"], "topologyKey": "zone"}}]},
            },
            "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule",
                "labelSelector": {"matchLabels": {"app": "web"}}}],
        }));
        let spec = host_pod(&pod, &tenant(), "").unwrap().spec.unwrap();
        let json = serde_json::to_value(&spec).unwrap();
        let scoped = |namespaces: Option<serde_json::Value>| {
            let mut selector = serde_json::json!({"matchLabels": {
                host_label_key("app"): "web", LABEL_MANAGED_BY: "team-a"}});
            if let Some(namespaces) = namespaces {
                selector["matchExpressions"] =
                    serde_json::json!([{"key": LABEL_NAMESPACE, "operator": "In", "values": namespaces}]);
            }
            serde_json::json!({"labelSelector": selector, "topologyKey": "kubernetes.io/hostname"})
        };
        let required = &json["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"];
        // The Pod's own namespace by default, the listed ones, all of the tenant's: never a host
        // namespace of anybody else (the host terms name none).
        assert_eq!(required[0], scoped(Some(serde_json::json!(["default"]))));
        assert_eq!(required[1], scoped(Some(serde_json::json!(["shop", "db"]))));
        assert_eq!(required[2], scoped(None));
        assert_eq!(
            required[3],
            serde_json::json!({"topologyKey": "zone"}),
            "a null selector selects nothing"
        );
        let preferred = &json["affinity"]["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
            [0]["podAffinityTerm"];
        assert_eq!(
            preferred["labelSelector"]["matchExpressions"][0]["key"],
            host_label_key("tier")
        );
        assert_eq!(
            preferred["matchLabelKeys"],
            serde_json::json!([host_label_key("version"), host_label_key("app")])
        );
        let spread = &json["topologySpreadConstraints"][0]["labelSelector"];
        assert_eq!(
            spread,
            &scoped(Some(serde_json::json!(["default"])))["labelSelector"]
        );
        assert!(unsupported(&spec, &PodPolicy::default()).is_empty());

        // Namespaces selected by their labels: the host cannot see them.
        let by_labels = with_spec(serde_json::json!({"affinity": {"podAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                web(serde_json::json!({"namespaceSelector": {"matchLabels": {"team": "x"}}}))]}}}));
        let spec = host_pod(&by_labels, &tenant(), "").unwrap().spec.unwrap();
        assert_eq!(
            unsupported(&spec, &PodPolicy::default()),
            [
                "affinity.podAffinity.requiredDuringSchedulingIgnoredDuringExecution[0].namespaceSelector: namespaces selected by their labels cannot be resolved on the host (list them in namespaces, or select all with an empty namespaceSelector)"
            ]
        );
    }

    #[test]
    fn with_always_pull_images_every_container_pulls_its_image() {
        let pod = with_spec(serde_json::json!({
            "containers": [{"name": "c", "image": "private.example/app:1", "imagePullPolicy": "IfNotPresent"}],
            "initContainers": [{"name": "i", "image": "private.example/init:1", "imagePullPolicy": "Never"}],
            "ephemeralContainers": [{"name": "e", "image": "private.example/debug:1", "imagePullPolicy": "IfNotPresent"}],
        }));
        let policies = |pull: bool| {
            let spec = host_pod(
                &pod,
                &tenant_with(&format!("    policies: {{alwaysPullImages: {pull}}}\n")),
                "",
            )
            .unwrap()
            .spec
            .unwrap();
            [
                spec.containers[0].image_pull_policy.clone(),
                spec.init_containers.unwrap()[0].image_pull_policy.clone(),
                spec.ephemeral_containers.unwrap()[0].image_pull_policy.clone(),
            ]
        };
        let all = |policy: &str| Some(policy.to_string());
        assert_eq!(policies(true), [all("Always"), all("Always"), all("Always")]);
        assert_eq!(
            policies(false),
            [all("IfNotPresent"), all("Never"), all("IfNotPresent")]
        );
    }

    #[test]
    fn the_enforced_node_selector_is_required_and_a_pod_choosing_otherwise_conflicts() {
        let tenant = tenant_with("    sync: {toHost: {pods: {enforceNodeSelector: {pool: team-a}}}}\n");
        let spec = host_pod(&pod(), &tenant, "").unwrap().spec.unwrap();
        assert_eq!(spec.node_selector.as_ref().unwrap()["pool"], "team-a");
        assert!(node_selector_conflicts(&spec, &tenant.pods).is_empty());
        let elsewhere = with_spec(serde_json::json!({"nodeSelector": {"pool": "team-b", "zone": "a"}}));
        let spec = host_pod(&elsewhere, &tenant, "").unwrap().spec.unwrap();
        assert_eq!(
            spec.node_selector.as_ref().unwrap()["pool"],
            "team-b",
            "never silently moved"
        );
        assert_eq!(
            node_selector_conflicts(&spec, &tenant.pods),
            ["nodeSelector pool=team-b (the host enforces pool=team-a)"]
        );
    }

    #[test]
    fn translates_names_metadata_and_safe_defaults() {
        let host = host_pod(&pod(), &tenant(), "gvisor").unwrap();
        assert_eq!(host.metadata.name.as_deref(), Some("my-pod-x-default-x-team-a"));
        assert_eq!(host.metadata.namespace.as_deref(), Some("vc-team-a"));
        let labels = host.metadata.labels.as_ref().unwrap();
        assert_eq!(
            labels[LABEL_MANAGED_BY], "team-a",
            "a tenant cannot claim another tenant's label"
        );
        assert_eq!(labels[LABEL_NAMESPACE], "default");
        assert!(!labels.contains_key("app"), "virtual labels are not copied");
        assert_eq!(
            labels[&host_label_key("app")],
            "web",
            "they are carried under hashed keys"
        );
        assert_eq!(labels[&host_label_key(LABEL_MANAGED_BY)], "team-b");
        let annotations = host.metadata.annotations.as_ref().unwrap();
        assert_eq!(annotations[ANNOTATION_OBJECT_UID], "u-1");
        assert!(annotations[ANNOTATION_VIRTUAL_LABELS].contains("\"app\":\"web\""));
        let spec = host.spec.unwrap();
        assert_eq!(spec.runtime_class_name.as_deref(), Some("gvisor"));
        assert_eq!(spec.node_name, None);
        assert_eq!(spec.service_account_name, None);
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(
            spec.volumes
                .unwrap()
                .iter()
                .map(|v| v.name.as_str())
                .collect::<Vec<_>>(),
            ["data"]
        );
        assert_eq!(spec.containers[0].volume_mounts.as_ref().unwrap().len(), 1);
        assert!(host.status.is_none());
        assert_eq!(
            recorded_ref(&host_pod(&pod(), &tenant(), "").unwrap().metadata)
                .unwrap()
                .name,
            "my-pod"
        );
    }

    fn tenant_with(extra: &str) -> Tenant {
        rcsync_core::TenantsFile::parse(
            Path::new("t.yaml"),
            &format!("tenants:\n  - name: team-a\n    hostNamespace: vc-team-a\n{extra}"),
        )
        .unwrap()
        .tenants()[0]
            .clone()
    }

    fn pod_with(spec: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": "u-9"},
            "spec": spec
        }))
        .unwrap()
    }

    #[test]
    fn references_resolve_to_translated_copies_only() {
        let pod = pod_with(serde_json::json!({
            "containers": [{"name": "c", "envFrom": [{"secretRef": {"name": "creds"}}],
                "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "x"}}}]}],
            "volumes": [{"name": "v", "configMap": {"name": "cfg"}}],
            "imagePullSecrets": [{"name": "pull"}]
        }));
        let host = host_pod(&pod, &tenant(), "").unwrap();
        let refs = pod_refs::references(host.spec.as_ref().unwrap());
        let names: Vec<&str> = refs.keys().map(|(_, n)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "cfg-x-shop-x-team-a",
                "creds-x-shop-x-team-a",
                "pull-x-shop-x-team-a"
            ]
        );
    }

    #[test]
    fn downward_api_identity_reads_the_virtual_identity_annotations() {
        let pod = pod_with(serde_json::json!({
            "containers": [{"name": "c", "env": [
                {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]}],
            "volumes": [
                {"name": "d", "downwardAPI": {"items": [{"path": "uid", "fieldRef": {"fieldPath": "metadata.uid"}}]}},
                {"name": "p", "projected": {"sources": [{"downwardAPI": {"items": [{"path": "n", "fieldRef": {"fieldPath": "metadata.name"}}]}}]}}
            ]
        }));
        let host = serde_json::to_value(host_pod(&pod, &tenant(), "").unwrap()).unwrap();
        let env = &host["spec"]["containers"][0]["env"];
        assert_eq!(
            env[0]["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.annotations['vcluster.loft.sh/object-name']"
        );
        assert_eq!(
            env[1]["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.annotations['vcluster.loft.sh/object-namespace']"
        );
        assert_eq!(env[2]["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP");
        assert_eq!(
            host["spec"]["volumes"][0]["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"],
            "metadata.annotations['vcluster.loft.sh/object-uid']"
        );
        assert_eq!(
            host["spec"]["volumes"][1]["projected"]["sources"][0]["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"],
            "metadata.annotations['vcluster.loft.sh/object-name']"
        );
        assert_eq!(host["metadata"]["annotations"][ANNOTATION_OBJECT_NAME], "web");
    }

    #[test]
    fn a_label_or_annotation_a_field_ref_reads_is_carried_in_an_annotation_of_its_own() {
        let mut pod = pod_with(serde_json::json!({
            "containers": [{"name": "c", "env": [
                {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app.kubernetes.io/name']"}}},
                {"name": "OWNER", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['owner']"}}},
                {"name": "NONE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['absent']"}}}]}],
            "volumes": [{"name": "d", "downwardAPI": {"items": [
                {"path": "app", "fieldRef": {"fieldPath": "metadata.labels['app.kubernetes.io/name']"}}]}}]
        }));
        pod.metadata.labels = Some(BTreeMap::from([("app.kubernetes.io/name".into(), "shop".into())]));
        pod.metadata.annotations = Some(BTreeMap::from([("owner".into(), "team-a@example.com".into())]));
        let host = host_pod(&pod, &tenant(), "").unwrap();
        let spec = serde_json::to_value(host.spec.as_ref().unwrap()).unwrap();
        let annotations = host.metadata.annotations.unwrap();
        let read = |path: &serde_json::Value| -> Option<String> {
            let path = path.as_str().unwrap();
            let key = path.strip_prefix("metadata.annotations['")?.strip_suffix("']")?;
            Some(annotations.get(key).cloned().unwrap_or_default())
        };
        let env = &spec["containers"][0]["env"];
        assert_eq!(
            read(&env[0]["valueFrom"]["fieldRef"]["fieldPath"]).as_deref(),
            Some("shop")
        );
        assert_eq!(
            read(&env[1]["valueFrom"]["fieldRef"]["fieldPath"]).as_deref(),
            Some("team-a@example.com")
        );
        // A key the virtual Pod lacks reads as empty on both sides.
        assert_eq!(
            read(&env[2]["valueFrom"]["fieldRef"]["fieldPath"]).as_deref(),
            Some("")
        );
        assert_eq!(
            spec["volumes"][0]["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"],
            env[0]["valueFrom"]["fieldRef"]["fieldPath"]
        );
        // Only what a fieldRef reads is copied.
        assert!(
            annotations.keys().filter(|k| k.starts_with("rcsync.io/")).count() == 2,
            "{annotations:?}"
        );
        assert!(unsupported(host.spec.as_ref().unwrap(), &PodPolicy::default()).is_empty());
    }

    #[test]
    fn a_downward_api_volume_of_all_labels_or_annotations_is_refused_with_the_item_named() {
        let pod = pod_with(serde_json::json!({
            "containers": [{"name": "c"}],
            "volumes": [
                {"name": "info", "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
                {"name": "p", "projected": {"sources": [{"downwardAPI": {"items": [
                    {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}]}}]}}]
        }));
        let host = host_pod(&pod, &tenant(), "").unwrap();
        assert_eq!(
            unsupported(host.spec.as_ref().unwrap(), &PodPolicy::default()),
            [
                "volume \"info\": downwardAPI item \"labels\" reads all of metadata.labels, which the host Pod does not carry (single keys, metadata.labels['key'], are mapped)",
                "volume \"p\": downwardAPI item \"annotations\" reads all of metadata.annotations, which the host Pod does not carry (single keys, metadata.annotations['key'], are mapped)",
            ]
        );
    }

    #[test]
    fn scheduling_fields_follow_the_tenant_policy() {
        let tenant = tenant_with(
            "    sync:\n      toHost:\n        pods:\n          enforceTolerations: [\"tenants=shared:NoSchedule\"]\n          hybridScheduling: {enabled: true, hostSchedulers: [batch]}\n",
        );
        let pod = |scheduler: &str| {
            pod_with(serde_json::json!({
                "containers": [{"name": "c"}],
                "priorityClassName": "system-node-critical", "priority": 2000001000,
                "preemptionPolicy": "PreemptLowerPriority", "overhead": {"cpu": "100m"},
                "schedulerName": scheduler,
                "tolerations": [
                    {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"},
                    {"key": "node-role.kubernetes.io/master", "operator": "Exists"},
                    {"operator": "Exists"},
                    {"key": "gpu", "operator": "Exists"}
                ]
            }))
        };
        let spec = host_pod(&pod("custom"), &tenant, "").unwrap().spec.unwrap();
        assert_eq!(spec.priority_class_name, None);
        assert_eq!(spec.priority, None);
        assert_eq!(spec.preemption_policy, None);
        assert_eq!(spec.overhead, None);
        assert_eq!(
            spec.scheduler_name, None,
            "a scheduler the tenant may not use is dropped"
        );
        let tolerations: Vec<(Option<String>, Option<String>)> = spec
            .tolerations
            .unwrap()
            .into_iter()
            .map(|t| (t.key, t.value))
            .collect();
        assert_eq!(
            tolerations,
            [
                (Some("gpu".into()), None),
                (Some("tenants".into()), Some("shared".into()))
            ]
        );
        let spec = host_pod(&pod("batch"), &tenant, "").unwrap().spec.unwrap();
        assert_eq!(
            spec.scheduler_name.as_deref(),
            Some("batch"),
            "a host scheduler is kept"
        );
    }

    #[test]
    fn the_tenants_scheduling_gates_are_one_gate_of_rcsyncs_on_the_host() {
        let tenant = tenant();
        let gated = pod_with(
            serde_json::json!({"containers": [{"name": "app", "image": "app:1"}],
            "schedulingGates": [{"name": "kueue.x-k8s.io/admission"}, {"name": "host.example/queue"}]}),
        );
        let host = host_pod(&gated, &tenant, "runsc").unwrap();
        let gates: Vec<_> = host
            .spec
            .unwrap()
            .scheduling_gates
            .unwrap()
            .into_iter()
            .map(|g| g.name)
            .collect();
        assert_eq!(gates, [VIRTUAL_GATES]);
        let released = pod_with(
            serde_json::json!({"containers": [{"name": "app", "image": "app:1"}], "schedulingGates": []}),
        );
        assert_eq!(
            host_pod(&released, &tenant, "runsc")
                .unwrap()
                .spec
                .unwrap()
                .scheduling_gates,
            None
        );
    }

    #[test]
    fn what_the_host_cannot_honour_is_named() {
        let pod = pod_with(serde_json::json!({
            "containers": [{"name": "c"}],
            "volumes": [
                {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
                {"name": "ceph", "cephfs": {"monitors": ["m"], "secretRef": {"name": "host-secret"}}},
                {"name": "csi", "csi": {"driver": "d", "nodePublishSecretRef": {"name": "s"}}},
                {"name": "clone", "ephemeral": {"volumeClaimTemplate": {"spec": {"dataSource": {"kind": "PersistentVolumeClaim", "name": "x"}}}}},
                {"name": "bundle", "projected": {"sources": [{"clusterTrustBundle": {"name": "b", "path": "p"}}]}},
                {"name": "fine", "emptyDir": {}},
                {"name": "mystery"}
            ],
            "resourceClaims": [{"name": "gpu", "resourceClaimName": "host-claim"}]
        }));
        let host = host_pod(&pod, &tenant(), "").unwrap();
        let problems = unsupported(host.spec.as_ref().unwrap(), &PodPolicy::default());
        let named: Vec<&str> = problems.iter().map(|p| p.split(':').next().unwrap()).collect();
        assert_eq!(
            named,
            [
                "volume \"data\"",
                "volume \"ceph\"",
                "volume \"csi\"",
                "volume \"clone\"",
                "volume \"bundle\"",
                "volume \"mystery\"",
                "resourceClaims"
            ],
            "{problems:#?}"
        );
        assert!(problems[0].contains("persistentVolumeClaim volumes are not synced"));
        assert!(problems[1].contains("cephfs volumes name a Secret"));
    }

    #[test]
    fn a_pods_claims_are_the_tenants_host_copies_where_claims_are_made_on_the_host() {
        let pod = pod_with(serde_json::json!({
            "containers": [{"name": "c"}],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data", "readOnly": true}}]
        }));
        let tenant = tenant_with("    sync: {toHost: {persistentVolumeClaims: {enabled: true}}}\n");
        let host = host_pod(&pod, &tenant, "").unwrap();
        let spec = host.spec.as_ref().unwrap();
        let claim = spec.volumes.as_ref().unwrap()[0]
            .persistent_volume_claim
            .as_ref()
            .unwrap();
        assert_eq!(claim.claim_name, "data-x-shop-x-team-a");
        assert_eq!(claim.read_only, Some(true));
        assert!(unsupported(spec, &tenant.pods).is_empty());
    }

    fn claim(spec: serde_json::Value) -> PersistentVolumeClaim {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "data", "namespace": "shop", "uid": "c-1", "labels": {"app": "db"}},
            "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn a_host_claim_asks_for_what_the_virtual_one_does_under_the_tenants_name() {
        let spec = serde_json::json!({
            "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}},
            "storageClassName": "fast", "volumeMode": "Filesystem",
        });
        let (host, source) = host_claim(&claim(spec), &tenant()).unwrap();
        assert_eq!(source, None);
        assert_eq!(host.metadata.name.as_deref(), Some("data-x-shop-x-team-a"));
        assert_eq!(host.metadata.namespace.as_deref(), Some("vc-team-a"));
        assert_eq!(host.metadata.labels.as_ref().unwrap()[LABEL_MANAGED_BY], "team-a");
        assert!(
            !host.metadata.labels.as_ref().unwrap().contains_key("app"),
            "virtual labels stay"
        );
        assert_eq!(
            host.metadata.annotations.as_ref().unwrap()[ANNOTATION_OBJECT_UID],
            "c-1"
        );
        let host_spec = host.spec.unwrap();
        assert_eq!(host_spec.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(host_spec.access_modes, Some(vec!["ReadWriteOnce".to_string()]));

        // A clone of another claim of its namespace: the source is that claim's host copy.
        let clone = serde_json::json!({
            "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}},
            "dataSourceRef": {"kind": "PersistentVolumeClaim", "name": "seed"},
        });
        let (host, source) = host_claim(&claim(clone), &tenant()).unwrap();
        assert_eq!(source.as_deref(), Some("seed"));
        let from = host.spec.unwrap().data_source.unwrap();
        assert_eq!(
            (from.kind.as_str(), from.name.as_str()),
            ("PersistentVolumeClaim", "seed-x-shop-x-team-a")
        );
    }

    #[test]
    fn a_claim_that_would_bind_host_storage_the_tenant_does_not_own_is_refused_naming_why() {
        let refused = |spec: serde_json::Value| match host_claim(&claim(spec), &tenant()) {
            Err(ClaimProblem::Unsupported(message)) => message,
            other => panic!("not refused: {other:?}"),
        };
        assert!(
            refused(serde_json::json!({"volumeName": "pv-of-team-b"}))
                .starts_with("spec.volumeName names a host")
        );
        assert!(
            refused(serde_json::json!({"selector": {"matchLabels": {"team": "b"}}}))
                .starts_with("spec.selector")
        );
        assert!(
            refused(serde_json::json!({"dataSource": {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "snap"}}))
                .contains("(VolumeSnapshot snap) would name a host object")
        );
        assert!(
            refused(serde_json::json!({"dataSourceRef": {"kind": "PersistentVolumeClaim", "name": "db", "namespace": "other"}}))
                .contains("only a clone of another PersistentVolumeClaim of its namespace")
        );
        let mut nameless = claim(serde_json::json!({}));
        nameless.metadata.uid = None;
        assert!(matches!(
            host_claim(&nameless, &tenant()),
            Err(ClaimProblem::Invalid(_))
        ));
    }

    #[test]
    fn copies_carry_the_data_and_the_identity_not_the_virtual_metadata() {
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "token", "namespace": "shop", "labels": {"app": "x"},
                "annotations": {"kubernetes.io/service-account.name": "default"}},
            "type": "kubernetes.io/service-account-token",
            "data": {"token": "dmlydHVhbA=="}
        }))
        .unwrap();
        let copy = host_secret(&secret, &tenant()).unwrap();
        assert_eq!(copy.metadata.name.as_deref(), Some("token-x-shop-x-team-a"));
        assert_eq!(copy.metadata.namespace.as_deref(), Some("vc-team-a"));
        assert_eq!(
            copy.type_.as_deref(),
            Some("Opaque"),
            "the host's token controller must never fill a copy with a host token"
        );
        let annotations = copy.metadata.annotations.clone().unwrap();
        assert!(!annotations.contains_key("kubernetes.io/service-account.name"));
        assert_eq!(copy.data, secret.data);
        assert_eq!(
            recorded_holder(&copy.metadata, &tenant()),
            Some(("shop".into(), "token".into()))
        );
        let other = tenant_with("").name.clone();
        assert_eq!(other.as_str(), "team-a");
        let mut foreign = copy.metadata.clone();
        foreign.labels = None;
        assert_eq!(
            recorded_holder(&foreign, &tenant()),
            None,
            "not written by rcsync for this tenant"
        );
        let cm: ConfigMap = serde_json::from_value(
            serde_json::json!({"metadata": {"name": "cfg", "namespace": "shop"}, "data": {"a": "1"}, "immutable": true}),
        )
        .unwrap();
        let copy = host_config_map(&cm, &tenant()).unwrap();
        assert_eq!(copy.data, cm.data);
        assert_eq!(copy.immutable, None, "copies stay updatable");
    }

    #[test]
    fn missing_identity_is_an_error() {
        let mut p = pod();
        p.metadata.uid = None;
        assert_eq!(
            host_pod(&p, &tenant(), "").unwrap_err(),
            TranslateError::Missing("metadata.uid")
        );
    }

    #[test]
    fn only_the_annotations_the_tenant_may_copy_reach_the_host_and_never_rcsyncs_own() {
        let mut tenant = tenant();
        tenant.pods.copy_annotations = vec![
            AnnotationPattern::parse("prometheus.io/*").unwrap(),
            AnnotationPattern::parse("cluster-autoscaler.kubernetes.io/safe-to-evict").unwrap(),
        ];
        let mut virtual_pod = pod();
        virtual_pod.metadata.annotations = Some(BTreeMap::from(
            [
                ("prometheus.io/scrape", "true"),
                ("cluster-autoscaler.kubernetes.io/safe-to-evict", "false"),
                ("iam.amazonaws.com/role", "host-admin"),
                ("vcluster.loft.sh/object-name", "someone-else"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string())),
        ));
        let host = host_pod(&virtual_pod, &tenant, "gvisor").unwrap();
        let annotations = host.metadata.annotations.as_ref().unwrap();
        assert_eq!(annotations["prometheus.io/scrape"], "true");
        assert_eq!(
            annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"],
            "false"
        );
        assert!(!annotations.contains_key("iam.amazonaws.com/role"));
        assert_eq!(annotations["vcluster.loft.sh/object-name"], "my-pod");
        assert_eq!(
            copied_keys(&host.metadata),
            BTreeSet::from([
                "cluster-autoscaler.kubernetes.io/safe-to-evict",
                "prometheus.io/scrape"
            ])
        );

        // `*` copies everything but rcsync's and vCluster's own.
        tenant.pods.copy_annotations = vec![AnnotationPattern::parse("*").unwrap()];
        let host = host_pod(&virtual_pod, &tenant, "gvisor").unwrap();
        let annotations = host.metadata.annotations.as_ref().unwrap();
        assert_eq!(annotations["iam.amazonaws.com/role"], "host-admin");
        assert_eq!(annotations["vcluster.loft.sh/object-name"], "my-pod");
        assert_eq!(copied_keys(&host.metadata).len(), 3);

        // By default nothing is copied.
        let host = host_pod(&virtual_pod, &self::tests::tenant(), "gvisor").unwrap();
        assert!(copied_keys(&host.metadata).is_empty());
        assert!(
            !host
                .metadata
                .annotations
                .unwrap()
                .contains_key("prometheus.io/scrape")
        );
    }
}
