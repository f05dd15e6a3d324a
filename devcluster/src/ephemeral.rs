//! Ephemeral containers (`kubectl debug`): the `pods/ephemeralcontainers` subresource, through
//! which containers are added to a running Pod, and the kubelet's part of it.
//!
//! ```text
//!  PATCH|PUT pods/x/ephemeralcontainers ──► prepare(): takes only spec.ephemeralContainers; the
//!                                           rest of the write is dropped, as upstream's strategy
//!                                           drops it
//!                                           validation: none removed or changed, new ones named
//!                                           uniquely in the Pod, with an image, without the fields
//!                                           an ephemeral container may not have (upstream's words)
//!  kubelet stand-in ─────────────────────► start(): each new one running in
//!                                           status.ephemeralContainerStatuses
//! ```
//!
//! A Pod is never created with ephemeral containers, and a plain update may not change them.

use serde_json::{Value, json};

use crate::resources::ResourceDef;
use crate::status::{ApiError, Cause};

/// Fields an ephemeral container may not set: it runs once, beside the Pod's resources.
const FORBIDDEN: [(&str, &str); 6] = [
    ("ports", "ports"),
    ("livenessProbe", "livenessProbe"),
    ("readinessProbe", "readinessProbe"),
    ("startupProbe", "startupProbe"),
    ("lifecycle", "lifecycle"),
    ("resources", "resources"),
];

/// The object a write to `old`'s `ephemeralcontainers` subresource stores: `old` with `new`'s
/// ephemeral containers, validated as upstream validates them. The generation is the caller's to
/// bump.
pub fn prepare(def: &ResourceDef, old: &Value, new: &Value) -> Result<Value, ApiError> {
    let name = old["metadata"]["name"].as_str().unwrap_or_default();
    let had = old["spec"]["ephemeralContainers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut wanted = new["spec"]["ephemeralContainers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for container in &mut wanted {
        default_container(container);
    }
    let mut causes = Vec::new();
    for (i, old_container) in had.iter().enumerate() {
        let old_name = old_container["name"].as_str().unwrap_or_default();
        match wanted.iter().find(|w| w["name"] == old_container["name"]) {
            None => causes.push(Cause {
                reason: "FieldValueForbidden",
                field: "spec".into(),
                message: format!("Forbidden: existing ephemeral containers {old_name:?} may not be removed"),
            }),
            Some(w) if w != old_container => causes.push(Cause {
                reason: "FieldValueForbidden",
                field: format!("spec.ephemeralContainers[{i}]"),
                message: format!("Forbidden: existing ephemeral containers {old_name:?} may not be changed"),
            }),
            Some(_) => {}
        }
    }
    let mut taken: Vec<String> = ["containers", "initContainers"]
        .iter()
        .flat_map(|list| old["spec"][list].as_array().cloned().unwrap_or_default())
        .filter_map(|c| c["name"].as_str().map(String::from))
        .collect();
    let regular: Vec<String> = taken.clone();
    for (i, container) in wanted.iter().enumerate() {
        let path = format!("spec.ephemeralContainers[{i}]");
        if had.iter().any(|h| h["name"] == container["name"]) {
            taken.push(container["name"].as_str().unwrap_or_default().to_string());
            continue;
        }
        match container["name"].as_str().filter(|n| !n.is_empty()) {
            None => causes.push(Cause {
                reason: "FieldValueRequired",
                field: format!("{path}.name"),
                message: "Required value".into(),
            }),
            Some(n) if taken.iter().any(|t| t == n) => causes.push(Cause {
                reason: "FieldValueDuplicate",
                field: format!("{path}.name"),
                message: format!("Duplicate value: {n:?}"),
            }),
            Some(n) => taken.push(n.to_string()),
        }
        if container["image"].as_str().is_none_or(str::is_empty) {
            causes.push(Cause {
                reason: "FieldValueRequired",
                field: format!("{path}.image"),
                message: "Required value".into(),
            });
        }
        for (key, shown) in FORBIDDEN {
            if container
                .get(key)
                .is_some_and(|v| !v.is_null() && v != &json!({}) && v != &json!([]))
            {
                causes.push(Cause {
                    reason: "FieldValueForbidden",
                    field: format!("{path}.{shown}"),
                    message: "Forbidden: cannot be set for an Ephemeral Container".into(),
                });
            }
        }
        if let Some(target) = container["targetContainerName"].as_str()
            && !regular.iter().any(|r| r == target)
        {
            causes.push(Cause {
                reason: "FieldValueNotFound",
                field: format!("{path}.targetContainerName"),
                message: format!("Not found: {target:?}"),
            });
        }
    }
    if !causes.is_empty() {
        return Err(ApiError::invalid(def, name, causes));
    }
    let mut out = old.clone();
    if wanted.is_empty() {
        if let Some(spec) = out["spec"].as_object_mut() {
            spec.remove("ephemeralContainers");
        }
    } else {
        out["spec"]["ephemeralContainers"] = Value::Array(wanted);
    }
    Ok(out)
}

/// The defaults upstream gives every container.
fn default_container(container: &mut Value) {
    let Some(c) = container.as_object_mut() else {
        return;
    };
    c.entry("terminationMessagePath")
        .or_insert_with(|| json!("/dev/termination-log"));
    c.entry("terminationMessagePolicy")
        .or_insert_with(|| json!("File"));
    let latest = c
        .get("image")
        .and_then(Value::as_str)
        .is_some_and(|image| !image.contains(':') || image.ends_with(":latest"));
    c.entry("imagePullPolicy")
        .or_insert_with(|| json!(if latest { "Always" } else { "IfNotPresent" }));
}

/// Starts, as the kubelet does, each ephemeral container of a running Pod that has no status
/// yet; the names of those started.
pub fn start(pod: &mut Value, now: &str) -> Vec<String> {
    let containers = pod["spec"]["ephemeralContainers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut statuses = pod["status"]["ephemeralContainerStatuses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut started = Vec::new();
    for c in &containers {
        if statuses.iter().any(|s| s["name"] == c["name"]) {
            continue;
        }
        let image = c["image"].as_str().unwrap_or_default();
        statuses.push(json!({
            "name": c["name"], "image": image, "imageID": format!("{image}@sha256:devcluster"),
            "containerID": format!("devcluster://{}", uuid::Uuid::new_v4().simple()),
            "ready": false, "restartCount": 0, "state": {"running": {"startedAt": now}},
        }));
        started.push(c["name"].as_str().unwrap_or_default().to_string());
    }
    if !started.is_empty() {
        pod["status"]["ephemeralContainerStatuses"] = Value::Array(statuses);
    }
    started
}

/// Whether a Pod has an ephemeral container the kubelet has not started.
pub fn unstarted(pod: &Value) -> bool {
    let statuses = pod["status"]["ephemeralContainerStatuses"].as_array();
    pod["spec"]["ephemeralContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| statuses.is_none_or(|s| !s.iter().any(|s| s["name"] == c["name"])))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods() -> &'static ResourceDef {
        crate::resources::pods()
    }

    fn pod(ephemeral: Value) -> Value {
        json!({"metadata": {"name": "web"}, "spec": {
            "containers": [{"name": "app", "image": "app:1"}],
            "ephemeralContainers": ephemeral}})
    }

    fn message(result: Result<Value, ApiError>) -> String {
        result.unwrap_err().to_status()["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    #[test]
    fn a_debug_container_is_added_with_the_defaults_and_nothing_else_changes() {
        let old = pod(json!(null));
        let mut new =
            pod(json!([{"name": "debugger", "image": "busybox:1.36", "targetContainerName": "app"}]));
        new["spec"]["containers"][0]["image"] = json!("app:2");
        let out = prepare(pods(), &old, &new).unwrap();
        assert_eq!(
            out["spec"]["containers"][0]["image"], "app:1",
            "the rest of the write is dropped"
        );
        let debugger = &out["spec"]["ephemeralContainers"][0];
        assert_eq!(debugger["imagePullPolicy"], "IfNotPresent");
        assert_eq!(debugger["terminationMessagePath"], "/dev/termination-log");
    }

    #[test]
    fn existing_ones_stay_as_they_are_and_new_ones_are_validated_in_upstream_s_words() {
        let old = prepare(
            pods(),
            &pod(json!(null)),
            &pod(json!([{"name": "debugger", "image": "busybox:1.36"}])),
        )
        .unwrap();
        let removed = message(prepare(pods(), &old, &pod(json!([]))));
        assert!(
            removed.contains(r#"existing ephemeral containers "debugger" may not be removed"#),
            "{removed}"
        );
        let changed = message(prepare(
            pods(),
            &old,
            &pod(json!([{"name": "debugger", "image": "busybox:1.37"}])),
        ));
        assert!(
            changed.contains(r#"existing ephemeral containers "debugger" may not be changed"#),
            "{changed}"
        );
        let invalid = message(prepare(
            pods(),
            &old,
            &pod(json!([
                {"name": "debugger", "image": "busybox:1.36", "imagePullPolicy": "IfNotPresent",
                 "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File"},
                {"name": "app", "image": "busybox:1.36"},
                {"name": "probe", "image": "busybox:1.36", "ports": [{"containerPort": 80}], "targetContainerName": "db"},
                {"name": "bare"},
            ])),
        ));
        for expected in [
            r#"spec.ephemeralContainers[1].name: Duplicate value: "app""#,
            "spec.ephemeralContainers[2].ports: Forbidden: cannot be set for an Ephemeral Container",
            r#"spec.ephemeralContainers[2].targetContainerName: Not found: "db""#,
            "spec.ephemeralContainers[3].image: Required value",
        ] {
            assert!(invalid.contains(expected), "{expected} in {invalid}");
        }
    }

    #[test]
    fn the_kubelet_starts_each_new_one_once() {
        let mut p = pod(json!([{"name": "debugger", "image": "busybox:1.36"}]));
        assert!(unstarted(&p));
        assert_eq!(start(&mut p, "2026-11-27T00:00:00Z"), vec!["debugger"]);
        assert!(!unstarted(&p));
        assert!(start(&mut p, "2026-11-27T00:00:01Z").is_empty());
        let status = &p["status"]["ephemeralContainerStatuses"][0];
        assert_eq!(status["state"]["running"]["startedAt"], "2026-11-27T00:00:00Z");
    }
}
