//! LimitRange, as upstream's LimitRanger admission plugin applies it to Pods of its namespace:
//! a Container item's `defaultRequest` and `default` fill in the requests and limits a container
//! leaves out (recorded in the Pod's `kubernetes.io/limit-ranger` annotation), and its `min` and
//! `max` refuse a container outside them, with upstream's words.
//!
//! ```text
//!  Pod create ──► defaults (limits → requests) ──► LimitRanger: fill in, then min/max ──► quota
//! ```
//!
//! The object is defaulted as upstream's API does (`default` from `max`, `defaultRequest` from
//! `default`, then from `min`). What devcluster does not enforce (Pod and PersistentVolumeClaim
//! items, `maxLimitRequestRatio`) is refused at the LimitRange's create, never stored unenforced.

use serde_json::{Map, Value, json};

use crate::quantity::{format_millis, parse_millis};
use crate::quota::is_bytes;
use crate::status::Cause;

/// The annotation upstream's plugin writes on a Pod it filled in.
pub const ANNOTATION: &str = "kubernetes.io/limit-ranger";

/// Upstream's API defaulting of a LimitRange's Container items.
pub fn default_limit_range(obj: &mut Value) {
    let Some(items) = obj.pointer_mut("/spec/limits").and_then(Value::as_array_mut) else {
        return;
    };
    for item in items.iter_mut().filter(|i| i["type"] == "Container") {
        let fill = |item: &mut Value, into: &str, from: &str| {
            let source = item[from].as_object().cloned().unwrap_or_default();
            if !item[into].is_object() {
                item[into] = json!({});
            }
            for (key, value) in source {
                item[into]
                    .as_object_mut()
                    .expect("just made an object")
                    .entry(key)
                    .or_insert(value);
            }
        };
        fill(item, "default", "max");
        fill(item, "defaultRequest", "default");
        fill(item, "defaultRequest", "min");
        for field in ["default", "defaultRequest"] {
            if item[field].as_object().is_some_and(Map::is_empty) {
                item.as_object_mut().expect("an item").remove(field);
            }
        }
    }
}

/// Validates a LimitRange: every amount a quantity, items of a type devcluster enforces, and a
/// Container item's `min` ≤ `defaultRequest` ≤ `default` ≤ `max` per resource.
pub fn validate_limit_range(obj: &Value, causes: &mut Vec<Cause>) {
    let items = obj.pointer("/spec/limits").and_then(Value::as_array);
    for (i, item) in items.into_iter().flatten().enumerate() {
        let path = format!("spec.limits[{i}]");
        match item["type"].as_str() {
            Some("Container") => {}
            Some(kind @ ("Pod" | "PersistentVolumeClaim")) => causes.push(Cause::invalid(
                format!("{path}.type"),
                &json!(kind),
                "devcluster enforces Container limits only",
            )),
            _ => causes.push(Cause::not_supported(
                format!("{path}.type"),
                &item["type"],
                &["Container", "Pod", "PersistentVolumeClaim"],
            )),
        }
        if item.get("maxLimitRequestRatio").is_some_and(|r| !r.is_null()) {
            causes.push(Cause::invalid(
                format!("{path}.maxLimitRequestRatio"),
                &item["maxLimitRequestRatio"],
                "devcluster does not enforce a limit to request ratio",
            ));
        }
        let mut amounts = Vec::new();
        for field in ["min", "defaultRequest", "default", "max"] {
            let mut read = Map::new();
            for (key, value) in item[field].as_object().into_iter().flatten() {
                match amount(value) {
                    Ok(millis) => {
                        read.insert(key.clone(), json!(millis));
                    }
                    Err(why) => causes.push(Cause::invalid(format!("{path}.{field}[{key}]"), value, why)),
                }
            }
            amounts.push((field, read));
        }
        // Each pair in order: upstream's words for each.
        for (low, high) in [(0, 3), (0, 1), (1, 2), (2, 3)] {
            let ((low_name, lows), (high_name, highs)) = (&amounts[low], &amounts[high]);
            for (key, low_value) in lows {
                if let Some(high_value) = highs.get(key)
                    && low_value.as_i64() > high_value.as_i64()
                {
                    causes.push(Cause::invalid(
                        format!("{path}.{low_name}[{key}]"),
                        &item[*low_name][key],
                        format!(
                            "{low_name} value {} is greater than {high_name} value {}",
                            printed(&item[*low_name][key]),
                            printed(&item[*high_name][key])
                        ),
                    ));
                }
            }
        }
    }
}

/// Fills in a Pod's containers from the namespace's LimitRanges (by name) and checks them against
/// each; the refusal upstream words (`maximum cpu usage per Container is 1, but limit is 2`, one
/// or several in brackets) when a container is outside one.
pub fn admit_pod(pod: &mut Value, ranges: &[&Value]) -> Result<(), String> {
    let mut set = Vec::new();
    for range in ranges {
        for item in container_items(range) {
            for (list, prefix) in [("containers", "container"), ("initContainers", "init container")] {
                let Some(containers) = pod["spec"][list].as_array_mut() else {
                    continue;
                };
                for container in containers {
                    let name = container["name"].as_str().unwrap_or_default().to_string();
                    let mut filled = |field: &str, from: &str| -> Vec<String> {
                        let defaults = item[from].as_object().cloned().unwrap_or_default();
                        let resources = &mut container["resources"];
                        if !resources[field].is_object() {
                            resources[field] = json!({});
                        }
                        let have = resources[field].as_object_mut().expect("just made an object");
                        let mut added = Vec::new();
                        for (key, value) in defaults {
                            if !have.contains_key(&key) {
                                have.insert(key.clone(), value);
                                added.push(key);
                            }
                        }
                        added
                    };
                    let requests = filled("requests", "defaultRequest");
                    let limits = filled("limits", "default");
                    if !requests.is_empty() {
                        set.push(format!("{} request for {prefix} {name}", requests.join(", ")));
                    }
                    if !limits.is_empty() {
                        set.push(format!("{} limit for {prefix} {name}", limits.join(", ")));
                    }
                    for field in ["requests", "limits"] {
                        if container["resources"][field]
                            .as_object()
                            .is_some_and(Map::is_empty)
                        {
                            container["resources"]
                                .as_object_mut()
                                .expect("an object")
                                .remove(field);
                        }
                    }
                    if container["resources"].as_object().is_some_and(Map::is_empty) {
                        container
                            .as_object_mut()
                            .expect("a container")
                            .remove("resources");
                    }
                }
            }
        }
    }
    if !set.is_empty() {
        pod["metadata"]["annotations"][ANNOTATION] =
            json!(format!("LimitRanger plugin set: {}", set.join("; ")));
    }
    let mut refusals = Vec::new();
    for range in ranges {
        for item in container_items(range) {
            for list in ["initContainers", "containers"] {
                for container in pod["spec"][list].as_array().into_iter().flatten() {
                    refusals.extend(outside(item, &container["resources"]));
                }
            }
        }
    }
    match refusals.len() {
        0 => Ok(()),
        1 => Err(refusals.remove(0)),
        _ => Err(format!("[{}]", refusals.join(", "))),
    }
}

/// A LimitRange's Container items.
fn container_items(range: &Value) -> impl Iterator<Item = &Value> {
    range
        .pointer("/spec/limits")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|item| item["type"] == "Container")
}

/// How a container's resources stand outside an item's `min` and `max`, as upstream says it.
fn outside(item: &Value, resources: &Value) -> Vec<String> {
    let mut refusals = Vec::new();
    let read = |field: &str, key: &str| {
        let value = &resources[field][key];
        (!value.is_null()).then(|| (amount(value).unwrap_or_default(), printed(value)))
    };
    for (key, min) in item["min"].as_object().into_iter().flatten() {
        let enforced = amount(min).unwrap_or_default();
        let shown = canonical(key, enforced);
        match (read("requests", key), read("limits", key)) {
            (None, _) => refusals.push(format!(
                "minimum {key} usage per Container is {shown}.  No request is specified"
            )),
            (Some((request, text)), _) if request < enforced => refusals.push(format!(
                "minimum {key} usage per Container is {shown}, but request is {text}"
            )),
            (_, Some((limit, text))) if limit < enforced => refusals.push(format!(
                "minimum {key} usage per Container is {shown}, but limit is {text}"
            )),
            _ => {}
        }
    }
    for (key, max) in item["max"].as_object().into_iter().flatten() {
        let enforced = amount(max).unwrap_or_default();
        let shown = canonical(key, enforced);
        match (read("requests", key), read("limits", key)) {
            (_, None) => refusals.push(format!(
                "maximum {key} usage per Container is {shown}.  No limit is specified"
            )),
            (_, Some((limit, text))) if limit > enforced => refusals.push(format!(
                "maximum {key} usage per Container is {shown}, but limit is {text}"
            )),
            (Some((request, text)), _) if request > enforced => refusals.push(format!(
                "maximum {key} usage per Container is {shown}, but request is {text}"
            )),
            _ => {}
        }
    }
    refusals
}

/// A JSON quantity (a string, or a bare number) in milli-units.
fn amount(value: &Value) -> Result<i128, String> {
    match value {
        Value::String(text) => parse_millis(text),
        Value::Number(n) => parse_millis(&n.to_string()),
        _ => Err("must be a quantity".into()),
    }
}

/// A quantity as written.
fn printed(value: &Value) -> String {
    value.as_str().map_or_else(|| value.to_string(), str::to_string)
}

/// A quantity in its canonical form, as upstream prints an enforced amount.
fn canonical(key: &str, millis: i128) -> String {
    format_millis(millis, is_bytes(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(item: Value) -> Value {
        json!({"metadata": {"name": "limits"}, "spec": {"limits": [item]}})
    }

    #[test]
    fn a_limit_range_is_defaulted_as_upstreams_api_defaults_it() {
        let mut obj = range(json!({"type": "Container", "max": {"cpu": "2"}, "min": {"memory": "64Mi"}}));
        default_limit_range(&mut obj);
        assert_eq!(
            obj["spec"]["limits"][0],
            json!({"type": "Container", "max": {"cpu": "2"}, "min": {"memory": "64Mi"},
                   "default": {"cpu": "2"}, "defaultRequest": {"cpu": "2", "memory": "64Mi"}})
        );
    }

    #[test]
    fn a_limit_range_out_of_order_or_unenforced_is_refused_naming_the_field() {
        let mut causes = Vec::new();
        let obj = range(json!({"type": "Container", "min": {"cpu": "2"}, "max": {"cpu": "1"}}));
        validate_limit_range(&obj, &mut causes);
        assert_eq!(causes.len(), 1, "{causes:?}");
        assert_eq!(causes[0].field, "spec.limits[0].min[cpu]");
        assert!(
            causes[0]
                .message
                .contains("min value 2 is greater than max value 1"),
            "{causes:?}"
        );
        let mut causes = Vec::new();
        validate_limit_range(&range(json!({"type": "Pod", "max": {"cpu": "1"}})), &mut causes);
        validate_limit_range(
            &range(json!({"type": "Container", "maxLimitRequestRatio": {"cpu": "2"}, "max": {"cpu": "x"}})),
            &mut causes,
        );
        let fields: Vec<&str> = causes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.limits[0].type",
                "spec.limits[0].maxLimitRequestRatio",
                "spec.limits[0].max[cpu]"
            ]
        );
    }

    #[test]
    fn a_pods_containers_are_filled_in_and_checked_as_upstreams_plugin_does() {
        let mut limits = range(json!({"type": "Container", "default": {"cpu": "500m"},
                                      "defaultRequest": {"cpu": "250m"}, "max": {"cpu": "1"}}));
        default_limit_range(&mut limits);
        let mut pod = json!({"metadata": {"name": "p"}, "spec": {
            "initContainers": [{"name": "setup", "resources": {"requests": {"cpu": "100m"}}}],
            "containers": [{"name": "app"}]}});
        admit_pod(&mut pod, &[&limits]).unwrap();
        assert_eq!(
            pod["spec"]["containers"][0]["resources"],
            json!({"requests": {"cpu": "250m"}, "limits": {"cpu": "500m"}})
        );
        assert_eq!(
            pod["spec"]["initContainers"][0]["resources"],
            json!({"requests": {"cpu": "100m"}, "limits": {"cpu": "500m"}})
        );
        assert_eq!(
            pod["metadata"]["annotations"][ANNOTATION],
            "LimitRanger plugin set: cpu request for container app; cpu limit for container app; cpu limit for init container setup"
        );
        let mut big = json!({"metadata": {"name": "p"}, "spec": {"containers": [
            {"name": "app", "resources": {"limits": {"cpu": "2"}, "requests": {"cpu": "2"}}}]}});
        assert_eq!(
            admit_pod(&mut big, &[&limits]).unwrap_err(),
            "maximum cpu usage per Container is 1, but limit is 2"
        );
        let floor = range(json!({"type": "Container", "min": {"memory": "1Gi", "cpu": "1"}}));
        let mut bare = json!({"metadata": {"name": "p"}, "spec": {"containers": [
            {"name": "app", "resources": {"requests": {"cpu": "500m"}}}]}});
        assert_eq!(
            admit_pod(&mut bare, &[&floor]).unwrap_err(),
            "[minimum cpu usage per Container is 1, but request is 500m, minimum memory usage per Container is 1Gi.  No request is specified]"
        );
    }
}
