//! What an existing host Pod takes from its virtual Pod when the virtual Pod changes: the
//! patches, computed from the two Pods alone (no I/O), that bring the host Pod's mutable parts to
//! the desired state and leave what the host added alone.
//!
//! ```text
//!  current host Pod + desired host Pod ──► update_patch: labels, copied annotations, images,
//!                                          tolerations added, deadline, (gated) placement, gate lifted
//!                                     ──► resize_patch: containers' cpu and memory (pods/resize)
//!                                     ──► ephemeral_patch: debug containers added (pods/ephemeralcontainers)
//! ```

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::ResourceExt as _;
use rcsync_core::gates;
use rcsync_core::naming::HOST_LABEL_PREFIX;
use serde_json::json;

use crate::grpc::lost_copies::ANNOTATION_COPIES;
use crate::translate::VIRTUAL_GATES;

/// The strategic merge patch that brings a host Pod's mutable parts (labels, annotations,
/// container images, added tolerations, a deadline set or lowered; while it is gated, its node selector and node affinity,
/// and rcsync's gate once the virtual Pod has none) to the desired state; `None` when nothing
/// differs. Of the annotations already there, only copies of virtual ones the tenant has since
/// removed, and a record of copies the Pod no longer has, are removed: host controllers' own
/// annotations stay.
pub(super) fn update_patch(current: &Pod, desired: &Pod) -> Option<serde_json::Value> {
    let mut changed = false;
    let mut patch = json!({"metadata": {}});
    let still_copied = crate::translate::copied_keys(&desired.metadata);
    let uncopied: Vec<&str> = crate::translate::copied_keys(&current.metadata)
        .into_iter()
        .filter(|k| !still_copied.contains(k))
        .collect();
    if !uncopied.is_empty() {
        for key in uncopied {
            patch["metadata"]["annotations"][key] = serde_json::Value::Null;
        }
        changed = true;
    }
    // The copies recorded for the Pod are those of its latest apply.
    let recorded = |pod: &Pod| pod.annotations().contains_key(ANNOTATION_COPIES);
    if recorded(current) && !recorded(desired) {
        patch["metadata"]["annotations"][ANNOTATION_COPIES] = serde_json::Value::Null;
        changed = true;
    }
    for (field, want, have) in [
        (
            "labels",
            desired.metadata.labels.as_ref(),
            current.metadata.labels.as_ref(),
        ),
        (
            "annotations",
            desired.metadata.annotations.as_ref(),
            current.metadata.annotations.as_ref(),
        ),
    ] {
        let want = want.cloned().unwrap_or_default();
        if want.iter().any(|(k, v)| have.and_then(|h| h.get(k)) != Some(v)) {
            for (k, v) in want {
                patch["metadata"][field][k] = json!(v);
            }
            changed = true;
        }
    }
    // A label the tenant removed goes from under its hashed key too, so the tenant's affinity and
    // spread selectors no longer match it; the host's own labels stay.
    let stale: Vec<&String> = current
        .metadata
        .labels
        .iter()
        .flatten()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with(HOST_LABEL_PREFIX))
        .filter(|k| {
            desired
                .metadata
                .labels
                .as_ref()
                .is_none_or(|l| !l.contains_key(*k))
        })
        .collect();
    for key in stale {
        patch["metadata"]["labels"][key] = serde_json::Value::Null;
        changed = true;
    }
    let images = |pod: &Pod, init: bool| -> Vec<(String, Option<String>)> {
        let spec = pod.spec.as_ref();
        let list = if init {
            spec.and_then(|s| s.init_containers.as_ref())
        } else {
            spec.map(|s| &s.containers)
        };
        list.into_iter()
            .flatten()
            .map(|c| (c.name.clone(), c.image.clone()))
            .collect()
    };
    // Tolerations: a running Pod takes additions only (the API refuses any other change), so the
    // ones it has stay, from admission (its RuntimeClass's) or from before, and the missing
    // desired ones are added (a toleration the tenant or its enforceTolerations added since).
    let tolerations = |pod: &Pod| {
        pod.spec
            .as_ref()
            .and_then(|s| s.tolerations.clone())
            .unwrap_or_default()
    };
    let have = tolerations(current);
    let added: Vec<_> = tolerations(desired)
        .into_iter()
        .filter(|t| !have.contains(t))
        .collect();
    if !added.is_empty() {
        patch["spec"]["tolerations"] = json!(have.into_iter().chain(added).collect::<Vec<_>>());
        changed = true;
    }
    // Images, container by container (a strategic merge keys the lists by name): containers the
    // host's admission added (a webhook's sidecar) are not the tenant's, so they neither count as
    // a difference nor are touched.
    for (init, field) in [(false, "containers"), (true, "initContainers")] {
        let have = images(current, init);
        let items: Vec<_> = images(desired, init)
            .into_iter()
            .filter(|wanted| !have.contains(wanted))
            .map(|(name, image)| json!({"name": name, "image": image}))
            .collect();
        if !items.is_empty() {
            patch["spec"][field] = json!(items);
            changed = true;
        }
    }
    // A deadline set or lowered (the API allows no other change of it).
    let deadline = |pod: &Pod| pod.spec.as_ref().and_then(|s| s.active_deadline_seconds);
    if let Some(want) = deadline(desired)
        && deadline(current) != Some(want)
    {
        patch["spec"]["activeDeadlineSeconds"] = json!(want);
        changed = true;
    }
    if let Some(serde_json::Value::Object(gated)) = gated_patch(current, desired) {
        for (field, value) in gated {
            patch["spec"][field] = value;
        }
        changed = true;
    }
    changed.then_some(patch)
}

/// The in-place resize (`pods/resize`, strategic merge) that gives a host Pod's containers the cpu
/// and memory the tenant's ask for now: for each of the tenant's containers (and sidecar init
/// containers, the only init containers a resize may change) whose cpu or memory request or limit
/// differs, those the tenant states; `None` when none differs. What the host's admission added (a
/// LimitRange's defaults, a webhook's sidecar) is neither a difference nor touched.
pub(super) fn resize_patch(current: &Pod, desired: &Pod) -> Option<serde_json::Value> {
    use k8s_openapi::api::core::v1::Container;
    const RESIZABLE: [&str; 2] = ["cpu", "memory"];
    let stated = |c: &Container, what: &str| -> BTreeMap<&'static str, Quantity> {
        let resources = c.resources.as_ref();
        let map = match what {
            "requests" => resources.and_then(|r| r.requests.as_ref()),
            _ => resources.and_then(|r| r.limits.as_ref()),
        };
        RESIZABLE
            .into_iter()
            .filter_map(|name| Some((name, map?.get(name)?.clone())))
            .collect()
    };
    let mut patch = json!({});
    for (field, sidecars_only) in [("containers", false), ("initContainers", true)] {
        let list = |pod: &'_ Pod| -> Vec<Container> {
            let spec = pod.spec.as_ref();
            match field {
                "containers" => spec.map(|s| s.containers.clone()),
                _ => spec.and_then(|s| s.init_containers.clone()),
            }
            .unwrap_or_default()
        };
        let have = list(current);
        let items: Vec<serde_json::Value> = list(desired)
            .iter()
            .filter(|c| !sidecars_only || c.restart_policy.as_deref() == Some("Always"))
            .filter_map(|want| {
                let running = have.iter().find(|c| c.name == want.name)?;
                let differs = ["requests", "limits"].into_iter().any(|what| {
                    let had = stated(running, what);
                    stated(want, what)
                        .iter()
                        .any(|(name, q)| had.get(name) != Some(q))
                });
                differs.then(|| {
                    json!({"name": want.name, "resources": {
                        "requests": stated(want, "requests"),
                        "limits": stated(want, "limits"),
                    }})
                })
            })
            .collect();
        if !items.is_empty() {
            patch["spec"][field] = json!(items);
        }
    }
    (patch != json!({})).then_some(patch)
}

/// The ephemeral containers (`kubectl debug`) of the desired Pod that the host Pod lacks, as a
/// strategic merge patch of its `ephemeralcontainers` subresource; `None` when it has them all.
/// They can only be added: one the host Pod has stays as it is, even if the virtual Pod's
/// container of that name differs (the virtual API server does not let it change either).
pub(super) fn ephemeral_patch(current: &Pod, desired: &Pod) -> Option<serde_json::Value> {
    let have: Vec<&str> = current
        .spec
        .iter()
        .flat_map(|s| s.ephemeral_containers.iter().flatten())
        .map(|c| c.name.as_str())
        .collect();
    let added: Vec<_> = desired
        .spec
        .iter()
        .flat_map(|s| s.ephemeral_containers.iter().flatten())
        .filter(|c| !have.contains(&c.name.as_str()))
        .collect();
    (!added.is_empty()).then(|| json!({"spec": {"ephemeralContainers": added}}))
}

/// What a gated host Pod takes from its virtual Pod: the placement a queueing controller narrowed
/// while the virtual Pod was gated (node selector entries, node affinity: the only placement an
/// API server lets a gated Pod change, by additions), and the removal of rcsync's gate once the
/// virtual Pod has no gate left, in one patch, so the host schedules the Pod where the tenant's
/// controller decided. Gates the host's own admission set stay.
fn gated_patch(current: &Pod, desired: &Pod) -> Option<serde_json::Value> {
    let have = gates::scheduling_gates(current);
    if have.is_empty() {
        return None;
    }
    let mut patch = json!({});
    let (Some(spec), Some(wanted)) = (current.spec.as_ref(), desired.spec.as_ref()) else {
        return None;
    };
    // The host's admission may have added entries (a RuntimeClass's node selector): only those
    // of the tenant's that are missing or differ are sent; a differing one is refused by the
    // host, as it was allowed by no API server.
    let selector = spec.node_selector.clone().unwrap_or_default();
    for (key, value) in wanted.node_selector.iter().flatten() {
        if selector.get(key) != Some(value) {
            patch["nodeSelector"][key] = json!(value);
        }
    }
    let node_affinity =
        |s: &k8s_openapi::api::core::v1::PodSpec| s.affinity.as_ref().and_then(|a| a.node_affinity.clone());
    // Only when the tenant has one: a node affinity the host's admission set is left alone.
    if let Some(want) = node_affinity(wanted).filter(|want| Some(want) != node_affinity(spec).as_ref()) {
        patch["affinity"]["nodeAffinity"] = json!({
            "requiredDuringSchedulingIgnoredDuringExecution": want.required_during_scheduling_ignored_during_execution,
            "preferredDuringSchedulingIgnoredDuringExecution": want.preferred_during_scheduling_ignored_during_execution,
        });
    }
    if have.contains(&VIRTUAL_GATES) && !gates::scheduling_gates(desired).contains(&VIRTUAL_GATES) {
        patch["schedulingGates"] = json!([{"name": VIRTUAL_GATES, "$patch": "delete"}]);
    }
    (patch != json!({})).then_some(patch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_containers_the_host_pod_lacks_are_added_and_those_it_has_stay() {
        let pod = |ephemeral: serde_json::Value| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {
                "containers": [{"name": "app", "image": "app:1"}], "ephemeralContainers": ephemeral}}))
            .unwrap()
        };
        let first = json!({"name": "debugger", "image": "busybox:1.36"});
        let second = json!({"name": "tracer", "image": "tracer:2", "targetContainerName": "app"});
        let current = pod(json!([first]));
        // `debugger` differs in the virtual Pod: it stays as the host has it (it cannot change).
        let desired = pod(json!([{"name": "debugger", "image": "busybox:1.37"}, second]));
        let patch = ephemeral_patch(&current, &desired).expect("tracer is added");
        assert_eq!(patch, json!({"spec": {"ephemeralContainers": [second]}}));
        assert_eq!(ephemeral_patch(&desired, &desired), None);
        assert_eq!(ephemeral_patch(&pod(json!(null)), &pod(json!(null))), None);
    }

    /// A host Pod with `annotations`.
    fn annotated(annotations: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p", "annotations": annotations},
            "spec": {"containers": [{"name": "app", "image": "app:1"}]}}))
        .unwrap()
    }

    #[test]
    fn an_update_removes_only_the_copied_annotations_the_tenant_removed() {
        let pod = annotated;
        let current = pod(json!({
            "prometheus.io/scrape": "true", "prometheus.io/port": "8080",
            "rcsync.io/copied-annotations": "prometheus.io/port,prometheus.io/scrape",
            "host-controller.example/seen": "yes",
        }));
        let desired = pod(json!({
            "prometheus.io/scrape": "true",
            "rcsync.io/copied-annotations": "prometheus.io/scrape",
        }));
        let patch = update_patch(&current, &desired).expect("the port annotation goes");
        assert_eq!(
            patch["metadata"]["annotations"],
            json!({
                "prometheus.io/port": null,
                "prometheus.io/scrape": "true",
                "rcsync.io/copied-annotations": "prometheus.io/scrape",
            }),
            "the host controller's annotation is left alone"
        );
        assert_eq!(update_patch(&current, &current), None);
    }

    #[test]
    fn the_recorded_copies_follow_the_latest_apply() {
        let pod = annotated;
        let two = pod(json!({"rcsync.io/copies": "configmap/a=a-h,secret/b=b-h"}));
        let one = pod(json!({"rcsync.io/copies": "configmap/a=a-h"}));
        let none = pod(json!({}));
        let patch = update_patch(&two, &one).expect("the record changes");
        assert_eq!(
            patch["metadata"]["annotations"],
            json!({"rcsync.io/copies": "configmap/a=a-h"})
        );
        let patch = update_patch(&one, &none).expect("a record of copies the Pod no longer has goes");
        assert_eq!(
            patch["metadata"]["annotations"],
            json!({"rcsync.io/copies": null})
        );
        assert_eq!(update_patch(&one, &one), None);
    }

    #[test]
    fn an_update_adds_missing_tolerations_and_removes_none() {
        let pod = |tolerations: serde_json::Value| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": "p"},
                "spec": {"containers": [{"name": "app", "image": "app:1"}], "tolerations": tolerations}}))
            .unwrap()
        };
        // The host Pod has its RuntimeClass's toleration (set by admission); the desired one an
        // enforced toleration added since, and not the RuntimeClass's.
        let from_class = json!({"key": "sandbox", "operator": "Exists"});
        let enforced =
            json!({"key": "dedicated", "operator": "Equal", "value": "tenants", "effect": "NoExecute"});
        let current = pod(json!([from_class]));
        let desired = pod(json!([enforced]));
        let patch = update_patch(&current, &desired).expect("the enforced toleration is added");
        assert_eq!(patch["spec"]["tolerations"], json!([from_class, enforced]));
        assert_eq!(
            update_patch(&pod(json!([from_class, enforced])), &desired),
            None,
            "nothing missing, nothing removed"
        );
    }

    #[test]
    fn a_gated_host_pod_takes_the_narrowed_placement_and_loses_rcsyncs_gate_only() {
        let pod = |spec: serde_json::Value| -> Pod {
            let mut spec = spec;
            spec["containers"] = json!([{"name": "app", "image": "app:1"}]);
            serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": spec})).unwrap()
        };
        let zone = json!({"nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]});
        // On the host: rcsync's gate and one the host's admission set; the RuntimeClass's node
        // selector entry.
        let current = pod(json!({
            "schedulingGates": [{"name": VIRTUAL_GATES}, {"name": "host.example/queue"}],
            "nodeSelector": {"sandbox": "true"},
        }));
        // Still gated in the virtual cluster, its placement narrowed: the additions go.
        let narrowed = pod(json!({
            "schedulingGates": [{"name": VIRTUAL_GATES}],
            "nodeSelector": {"flavor": "spot"},
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": zone}},
        }));
        let patch = update_patch(&current, &narrowed).expect("the placement is narrowed");
        assert_eq!(patch["spec"]["nodeSelector"], json!({"flavor": "spot"}));
        assert_eq!(
            patch["spec"]["affinity"]["nodeAffinity"],
            json!({"requiredDuringSchedulingIgnoredDuringExecution": zone,
                   "preferredDuringSchedulingIgnoredDuringExecution": null})
        );
        assert!(patch["spec"].get("schedulingGates").is_none(), "{patch}");
        // Released: rcsync's gate goes, the host's stays.
        let released = pod(json!({"nodeSelector": {"flavor": "spot"}}));
        let patch = update_patch(&current, &released).expect("the gate goes");
        assert_eq!(
            patch["spec"]["schedulingGates"],
            json!([{"name": VIRTUAL_GATES, "$patch": "delete"}])
        );
        // A node affinity the host's admission set, the tenant having none, is left alone.
        let mut host_set = current.clone();
        host_set.spec.as_mut().unwrap().affinity = narrowed.spec.as_ref().unwrap().affinity.clone();
        let patch = update_patch(&host_set, &released).expect("the gate goes");
        assert!(patch["spec"].get("affinity").is_none(), "{patch}");
        // A Pod that is not gated on the host takes no placement change (none is allowed).
        let scheduled = pod(json!({"nodeSelector": {"sandbox": "true"}}));
        assert_eq!(update_patch(&scheduled, &released), None);
    }

    #[test]
    fn an_update_patches_the_tenants_changed_images_and_leaves_the_hosts_sidecars_alone() {
        let pod = |containers: serde_json::Value| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {"containers": containers}}))
                .unwrap()
        };
        let sidecar = json!({"name": "proxy", "image": "mesh.example/proxy:2"});
        // The host's admission added a sidecar: nothing of the tenant's differs.
        let current =
            pod(json!([{"name": "app", "image": "app:1"}, {"name": "log", "image": "log:1"}, sidecar]));
        let desired = pod(json!([{"name": "app", "image": "app:1"}, {"name": "log", "image": "log:1"}]));
        assert_eq!(update_patch(&current, &desired), None);
        // The tenant changed one image: only that container is in the patch.
        let desired = pod(json!([{"name": "app", "image": "app:2"}, {"name": "log", "image": "log:1"}]));
        let patch = update_patch(&current, &desired).expect("the new image");
        assert_eq!(
            patch["spec"]["containers"],
            json!([{"name": "app", "image": "app:2"}])
        );
    }

    #[test]
    fn a_resize_sends_the_cpu_and_memory_the_tenant_changed_and_leaves_the_hosts_defaults_alone() {
        let pod = |containers: serde_json::Value, init: serde_json::Value| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": "p"},
                "spec": {"containers": containers, "initContainers": init}}))
            .unwrap()
        };
        // On the host, a LimitRange added a memory limit and a webhook a sidecar.
        let current = pod(
            json!([{"name": "app", "resources": {"requests": {"cpu": "100m"}, "limits": {"cpu": "200m", "memory": "1Gi"}}},
                   {"name": "proxy", "resources": {"requests": {"cpu": "50m"}}}]),
            json!([{"name": "setup", "resources": {"requests": {"cpu": "1"}}},
                   {"name": "log", "restartPolicy": "Always", "resources": {"requests": {"cpu": "10m"}}}]),
        );
        let unchanged = pod(
            json!([{"name": "app", "resources": {"requests": {"cpu": "100m"}, "limits": {"cpu": "200m"}}}]),
            json!([{"name": "setup", "resources": {"requests": {"cpu": "1"}}},
                   {"name": "log", "restartPolicy": "Always", "resources": {"requests": {"cpu": "10m"}}}]),
        );
        assert_eq!(resize_patch(&current, &unchanged), None);
        let resized = pod(
            json!([{"name": "app", "resources": {"requests": {"cpu": "150m", "ephemeral-storage": "1Gi"}, "limits": {"cpu": "300m"}}}]),
            json!([{"name": "setup", "resources": {"requests": {"cpu": "2"}}},
                   {"name": "log", "restartPolicy": "Always", "resources": {"requests": {"cpu": "20m"}}}]),
        );
        assert_eq!(
            resize_patch(&current, &resized),
            Some(json!({"spec": {
                "containers": [{"name": "app", "resources": {"requests": {"cpu": "150m"}, "limits": {"cpu": "300m"}}}],
                "initContainers": [{"name": "log", "resources": {"requests": {"cpu": "20m"}, "limits": {}}}],
            }}))
        );
    }
}
