//! In-place Pod resize (upstream's `InPlacePodVerticalScaling`, GA in Kubernetes 1.35): the
//! `pods/resize` subresource, through which the cpu and memory a running Pod's containers request
//! and are limited to change without a restart, and the kubelet's part of it.
//!
//! ```text
//!  PATCH|PUT pods/x/resize ──► prepare(): takes only the containers' resources and resizePolicy
//!                              (of containers and sidecar init containers); the rest of the write
//!                              is dropped, as upstream's resize strategy drops it
//!                              validation: only cpu and memory change, nothing is removed, the
//!                              Pod's QoS class stays (upstream's words)
//!                              quota: what the resize adds, against the namespace's quotas
//!  kubelet stand-in ─────────► actuate(): status.containerStatuses[].resources and
//!                              allocatedResources follow the spec, or the Pod gets
//!                              PodResizePending (Infeasible) when its node cannot hold it
//! ```
//!
//! A plain update of a Pod still may not change its resources (see `check_pod_update`).

use serde_json::{Value, json};

use crate::quantity::parse_millis;
use crate::resources::ResourceDef;
use crate::status::{ApiError, Cause};

/// The resources a resize may change.
const RESIZABLE: [&str; 2] = ["cpu", "memory"];

/// The container lists of a Pod spec, with whether a container of the list may be resized.
fn resizable(list: &str, container: &Value) -> bool {
    list == "containers" || container.get("restartPolicy").and_then(Value::as_str) == Some("Always")
}

/// A Pod's QoS class, as upstream computes it: `BestEffort` when no container requests or limits
/// cpu or memory, `Guaranteed` when every container limits both and requests what it limits
/// (a request left out is its limit), else `Burstable`.
pub fn qos_class(pod: &Value) -> &'static str {
    let containers: Vec<&Value> = ["containers", "initContainers"]
        .iter()
        .filter_map(|list| pod.pointer(&format!("/spec/{list}")).and_then(Value::as_array))
        .flatten()
        .collect();
    let amount = |c: &Value, what: &str, resource: &str| {
        c.pointer(&format!("/resources/{what}/{resource}"))
            .and_then(Value::as_str)
            .and_then(|q| parse_millis(q).ok())
            .filter(|m| *m != 0)
    };
    let any = containers.iter().any(|c| {
        RESIZABLE
            .iter()
            .any(|r| amount(c, "requests", r).is_some() || amount(c, "limits", r).is_some())
    });
    if !any {
        return "BestEffort";
    }
    let guaranteed = containers.iter().all(|c| {
        RESIZABLE.iter().all(|r| match amount(c, "limits", r) {
            Some(limit) => amount(c, "requests", r).is_none_or(|request| request == limit),
            None => false,
        })
    });
    if guaranteed { "Guaranteed" } else { "Burstable" }
}

/// The object a resize of `old` stores: `old` with each resizable container's `resources` and
/// `resizePolicy` taken from `new` (by container name), validated as upstream validates a resize.
/// The generation is the caller's to bump.
pub fn prepare(def: &ResourceDef, old: &Value, new: &Value) -> Result<Value, ApiError> {
    let name = old["metadata"]["name"].as_str().unwrap_or_default();
    let mut out = old.clone();
    let mut causes = Vec::new();
    for list in ["containers", "initContainers"] {
        let Some(containers) = out
            .pointer_mut(&format!("/spec/{list}"))
            .and_then(Value::as_array_mut)
        else {
            continue;
        };
        let wanted = new["spec"][list].as_array().cloned().unwrap_or_default();
        for (i, container) in containers.iter_mut().enumerate() {
            let Some(want) = wanted.iter().find(|w| w["name"] == container["name"]) else {
                continue;
            };
            let field = |key: &str| want.get(key).cloned().unwrap_or(Value::Null);
            if !resizable(list, container) {
                if field("resources") != container.get("resources").cloned().unwrap_or(Value::Null) {
                    causes.push(Cause {
                        reason: "FieldValueForbidden",
                        field: format!("spec.{list}[{i}].resources"),
                        message: "Forbidden: resources for non-sidecar init containers are immutable".into(),
                    });
                }
                continue;
            }
            let was = container.get("resources").cloned().unwrap_or(Value::Null);
            let is = field("resources");
            for what in ["requests", "limits"] {
                let gone = was[what]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .any(|(resource, _)| is[what].get(resource).is_none());
                if gone {
                    causes.push(Cause {
                        reason: "FieldValueForbidden",
                        field: format!("spec.{list}[{i}].resources.{what}"),
                        message: format!("Forbidden: resource {what} cannot be removed"),
                    });
                }
                let others_changed = [&was, &is].iter().any(|side| {
                    side[what].as_object().into_iter().flatten().any(|(resource, _)| {
                        !RESIZABLE.contains(&resource.as_str())
                            && was[what].get(resource) != is[what].get(resource)
                    })
                });
                if others_changed {
                    causes.push(Cause {
                        reason: "FieldValueForbidden",
                        field: "spec".into(),
                        message: "Forbidden: only cpu and memory resources are mutable".into(),
                    });
                }
            }
            let object = container.as_object_mut().expect("a container is an object");
            for key in ["resources", "resizePolicy"] {
                match want.get(key) {
                    Some(v) => object.insert(key.to_string(), v.clone()),
                    None => object.remove(key),
                };
            }
        }
    }
    let class = old
        .pointer("/status/qosClass")
        .and_then(Value::as_str)
        .unwrap_or_else(|| qos_class(old));
    if qos_class(&out) != class {
        causes.push(Cause::invalid(
            "spec",
            &json!(class),
            "Pod QOS Class may not change as a result of resizing",
        ));
    }
    if causes.is_empty() {
        Ok(out)
    } else {
        Err(ApiError::invalid(def, name, causes))
    }
}

/// A container's cpu and memory as its status reports them (`resources`) and as the kubelet
/// allocated them (`allocatedResources`, the requests): what it runs with once a resize is done.
fn applied(container: &Value) -> (Value, Value) {
    let mut resources = json!({});
    for what in ["requests", "limits"] {
        for resource in RESIZABLE {
            if let Some(q) = container.pointer(&format!("/resources/{what}/{resource}")) {
                resources[what][resource] = q.clone();
            }
        }
    }
    let allocated = resources.get("requests").cloned().unwrap_or_else(|| json!({}));
    (resources, allocated)
}

/// The status of a container the kubelet starts: its `resources` and `allocatedResources` added to
/// `status`.
pub fn started(container: &Value, status: &mut Value) {
    let (resources, allocated) = applied(container);
    status["resources"] = resources;
    status["allocatedResources"] = allocated;
}

/// Whether a running Pod's spec asks for resources its containers do not run with yet.
pub fn pending(pod: &Value) -> bool {
    let statuses = pod["status"]["containerStatuses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| {
            statuses
                .iter()
                .find(|s| s["name"] == c["name"])
                .is_some_and(|s| s.get("resources").cloned().unwrap_or(json!({})) != applied(c).0)
        })
}

/// The kubelet's part of a resize of `pod` on a node with `allocatable`: the containers run with
/// what the spec asks (status updated, resize conditions cleared) when the Pod's requests fit the
/// node, else the Pod gets `PodResizePending` with reason `Infeasible` and the kubelet's words
/// (`Node didn't have enough capacity: cpu, requested: 16000, capacity: 8000`). Returns the
/// message when infeasible.
pub fn actuate(pod: &mut Value, allocatable: &Value, now: &str) -> Option<String> {
    let (requests, _) = crate::quota::pod_resources(pod);
    let short = RESIZABLE.iter().find_map(|resource| {
        let capacity = allocatable
            .get(*resource)
            .and_then(Value::as_str)
            .and_then(|q| parse_millis(q).ok())?;
        let requested = *requests.get(resource)?;
        // The kubelet prints milli-cpu and bytes.
        let unit = |m: i128| if *resource == "cpu" { m } else { m / 1000 };
        (requested > capacity).then(|| {
            format!(
                "Node didn't have enough capacity: {resource}, requested: {}, capacity: {}",
                unit(requested),
                unit(capacity)
            )
        })
    });
    let conditions: Vec<Value> = pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| {
            !matches!(
                c["type"].as_str(),
                Some("PodResizePending" | "PodResizeInProgress")
            )
        })
        .cloned()
        .collect();
    pod["status"]["conditions"] = Value::Array(conditions);
    if let Some(message) = short {
        if let Some(list) = pod["status"]["conditions"].as_array_mut() {
            list.push(
                json!({"type": "PodResizePending", "status": "True", "reason": "Infeasible",
                             "message": message, "lastTransitionTime": now}),
            );
        }
        return Some(message);
    }
    let containers = pod["spec"]["containers"].as_array().cloned().unwrap_or_default();
    if let Some(statuses) = pod["status"]["containerStatuses"].as_array_mut() {
        for status in statuses {
            if let Some(container) = containers.iter().find(|c| c["name"] == status["name"]) {
                started(container, status);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(resources: Value) -> Value {
        json!({"metadata": {"name": "web", "namespace": "default"},
               "spec": {"containers": [{"name": "app", "image": "app:1", "resources": resources}]}})
    }

    fn message(error: ApiError) -> String {
        error.to_status()["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    #[test]
    fn the_qos_class_follows_the_containers_requests_and_limits() {
        assert_eq!(qos_class(&pod(json!({}))), "BestEffort");
        assert_eq!(qos_class(&pod(json!({"requests": {"cpu": "100m"}}))), "Burstable");
        assert_eq!(
            qos_class(&pod(json!({"limits": {"cpu": "1", "memory": "1Gi"}}))),
            "Guaranteed"
        );
        assert_eq!(
            qos_class(&pod(
                json!({"requests": {"cpu": "1000m", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "1Gi"}})
            )),
            "Guaranteed"
        );
        assert_eq!(
            qos_class(&pod(
                json!({"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "1Gi"}})
            )),
            "Burstable"
        );
    }

    #[test]
    fn a_resize_takes_the_containers_resources_only_and_keeps_the_qos_class() {
        let def = crate::resources::pods();
        let old = pod(json!({"requests": {"cpu": "100m"}, "limits": {"cpu": "200m"}}));
        let mut new = pod(json!({"requests": {"cpu": "150m"}, "limits": {"cpu": "300m"}}));
        new["spec"]["containers"][0]["image"] = json!("app:2");
        new["spec"]["nodeName"] = json!("elsewhere");
        let out = prepare(def, &old, &new).expect("a resize within the QoS class");
        assert_eq!(
            out["spec"]["containers"][0]["resources"]["requests"]["cpu"],
            "150m"
        );
        assert_eq!(
            out["spec"]["containers"][0]["image"], "app:1",
            "other changes are dropped"
        );
        assert!(out["spec"].get("nodeName").is_none());

        let guaranteed = pod(json!({"requests": {"cpu": "200m", "memory": "1Gi"},
                                    "limits": {"cpu": "200m", "memory": "1Gi"}}));
        let error = message(prepare(def, &old, &guaranteed).unwrap_err());
        assert!(
            error.contains("Pod QOS Class may not change as a result of resizing"),
            "{error}"
        );

        let removed = pod(json!({"requests": {"cpu": "100m"}}));
        let error = message(prepare(def, &old, &removed).unwrap_err());
        assert!(error.contains("resource limits cannot be removed"), "{error}");

        let storage =
            pod(json!({"requests": {"cpu": "100m", "ephemeral-storage": "1Gi"}, "limits": {"cpu": "200m"}}));
        let error = message(prepare(def, &old, &storage).unwrap_err());
        assert!(
            error.contains("only cpu and memory resources are mutable"),
            "{error}"
        );
    }

    #[test]
    fn the_kubelet_applies_a_resize_that_fits_its_node_and_reports_one_that_cannot() {
        let mut running = pod(json!({"requests": {"cpu": "100m"}, "limits": {"cpu": "200m"}}));
        let mut status = json!({"name": "app"});
        started(&running["spec"]["containers"][0], &mut status);
        running["status"] = json!({"phase": "Running", "containerStatuses": [status]});
        assert!(!pending(&running));
        running["spec"]["containers"][0]["resources"]["requests"]["cpu"] = json!("150m");
        assert!(pending(&running));
        let node = json!({"cpu": "8", "memory": "32Gi"});
        assert_eq!(actuate(&mut running, &node, "now"), None);
        assert_eq!(
            running["status"]["containerStatuses"][0]["allocatedResources"]["cpu"],
            "150m"
        );
        assert!(!pending(&running));

        running["spec"]["containers"][0]["resources"] =
            json!({"requests": {"cpu": "16"}, "limits": {"cpu": "16"}});
        let message = actuate(&mut running, &node, "now").expect("more than the node has");
        assert_eq!(
            message,
            "Node didn't have enough capacity: cpu, requested: 16000, capacity: 8000"
        );
        assert_eq!(running["status"]["conditions"][0]["type"], "PodResizePending");
        assert!(pending(&running), "the containers still run with what they had");
    }
}
