//! `meta.k8s.io/v1` Table output, so `kubectl get` prints the columns it prints on a real cluster.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::resources::ResourceDef;

/// What a Table row's `object` holds (`?includeObject=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IncludeObject {
    /// Nothing.
    None,
    /// A PartialObjectMetadata (the default).
    Metadata,
    /// The whole object.
    Object,
}

impl IncludeObject {
    /// Parses the query parameter (absent: Metadata).
    pub fn parse(raw: Option<&str>) -> Self {
        match raw {
            Some("None") => Self::None,
            Some("Object") => Self::Object,
            _ => Self::Metadata,
        }
    }
}

/// Kubernetes' `duration.HumanDuration`, as kubectl prints AGE.
pub fn human_duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".into();
    }
    let s = seconds.max(0);
    if s < 120 {
        return format!("{s}s");
    }
    let m = s / 60;
    if m < 10 {
        return if s % 60 == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{}s", s % 60)
        };
    }
    if m < 180 {
        return format!("{m}m");
    }
    let h = m / 60;
    if h < 8 {
        return if m % 60 == 0 {
            format!("{h}h")
        } else {
            format!("{h}h{}m", m % 60)
        };
    }
    if h < 48 {
        return format!("{h}h");
    }
    if h < 24 * 8 {
        return if h % 24 == 0 {
            format!("{}d", h / 24)
        } else {
            format!("{}d{}h", h / 24, h % 24)
        };
    }
    if h < 24 * 365 * 2 {
        return format!("{}d", h / 24);
    }
    if h < 24 * 365 * 8 {
        return format!("{}y{}d", h / 24 / 365, (h / 24) % 365);
    }
    format!("{}y", h / 24 / 365)
}

fn age(obj: &Value, field: &str) -> String {
    let ts = obj.pointer(field).and_then(Value::as_str);
    match ts.and_then(|t| DateTime::parse_from_rfc3339(t).ok()) {
        Some(t) => human_duration((Utc::now() - t.with_timezone(&Utc)).num_seconds()),
        None => "<unknown>".into(),
    }
}

fn s(obj: &Value, pointer: &str) -> Value {
    obj.pointer(pointer)
        .filter(|v| !v.is_null())
        .cloned()
        .unwrap_or(Value::String("<none>".into()))
}

fn count(obj: &Value, pointer: &str) -> Value {
    let n = match obj.pointer(pointer) {
        Some(Value::Object(m)) => m.len(),
        Some(Value::Array(a)) => a.len(),
        _ => 0,
    };
    json!(n)
}

fn column(name: &str, ty: &str, priority: u8, description: &str) -> Value {
    let format = if name == "Name" { "name" } else { "" };
    json!({"name": name, "type": ty, "format": format, "description": description, "priority": priority})
}

/// The column definitions of a kind.
pub fn columns(def: &ResourceDef) -> Vec<Value> {
    let name = column("Name", "string", 0, "Name must be unique within a namespace.");
    let age = column(
        "Age",
        "string",
        0,
        "CreationTimestamp is a timestamp representing the server time when this object was created.",
    );
    match def.kind {
        "Pod" => vec![
            name,
            column(
                "Ready",
                "string",
                0,
                "The aggregate readiness state of this pod for accepting traffic.",
            ),
            column(
                "Status",
                "string",
                0,
                "The aggregate status of the containers in this pod.",
            ),
            column(
                "Restarts",
                "string",
                0,
                "The number of times the containers in this pod have been restarted and when the last container in this pod has restarted.",
            ),
            age,
            column("IP", "string", 1, "IP address allocated to the pod."),
            column("Node", "string", 1, "Name of the node this pod is scheduled on."),
            column(
                "Nominated Node",
                "string",
                1,
                "Name of the node this pod is nominated to.",
            ),
            column("Readiness Gates", "string", 1, "Readiness gates of the pod."),
        ],
        "RuntimeClass" => vec![
            name,
            column(
                "Handler",
                "string",
                0,
                "Handler is the name of the underlying runtime and configuration.",
            ),
            age,
        ],
        "Namespace" => vec![
            name,
            column("Status", "string", 0, "The status of the namespace"),
            age,
        ],
        "ConfigMap" => vec![name, column("Data", "string", 0, "Number of data entries."), age],
        "Secret" => vec![
            name,
            column("Type", "string", 0, "The type of the secret"),
            column("Data", "string", 0, "Number of data entries."),
            age,
        ],
        "ServiceAccount" => vec![name, column("Secrets", "string", 0, "Number of secrets."), age],
        "Lease" => vec![
            name,
            column("Holder", "string", 0, "The holder of the lease."),
            age,
        ],
        "PersistentVolumeClaim" => vec![
            name,
            column("Status", "string", 0, "Phase of the claim."),
            column("Volume", "string", 0, "The volume bound to the claim."),
            column("Capacity", "string", 0, "The capacity the claim has."),
            column("Access Modes", "string", 0, "The access modes the claim has."),
            column(
                "StorageClass",
                "string",
                0,
                "The storage class the claim asks for.",
            ),
            column(
                "VolumeAttributesClass",
                "string",
                0,
                "The volume attributes class.",
            ),
            age,
        ],
        "PodDisruptionBudget" => vec![
            name,
            column(
                "Min Available",
                "string",
                0,
                "The minimum number of pods that must be available.",
            ),
            column(
                "Max Unavailable",
                "string",
                0,
                "The maximum number of pods that may be unavailable.",
            ),
            column(
                "Allowed Disruptions",
                "integer",
                0,
                "Calculated number of pods that may be disrupted at this time.",
            ),
            age,
        ],
        "ResourceQuota" => vec![
            name,
            age,
            column("Request", "string", 0, "Request"),
            column("Limit", "string", 0, "Limit"),
        ],
        "Event" => vec![
            column("Last Seen", "string", 0, "Time the event was last observed."),
            column("Type", "string", 0, "Type of this event (Normal, Warning)."),
            column("Reason", "string", 0, "Why the action was taken."),
            column("Object", "string", 0, "The object this event is about."),
            column(
                "Message",
                "string",
                0,
                "A human-readable description of the status of this operation.",
            ),
        ],
        _ => vec![name, age],
    }
}

fn pod_cells(obj: &Value) -> Vec<Value> {
    let statuses = obj
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let total = obj
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let ready = statuses
        .iter()
        .filter(|c| c.get("ready") == Some(&Value::Bool(true)))
        .count();
    let restarts: i64 = statuses
        .iter()
        .filter_map(|c| c.get("restartCount").and_then(Value::as_i64))
        .sum();
    let mut status = obj
        .pointer("/status/reason")
        .or_else(|| obj.pointer("/status/phase"))
        .and_then(Value::as_str)
        .unwrap_or("Pending")
        .to_string();
    for c in &statuses {
        if let Some(reason) = c.pointer("/state/waiting/reason").and_then(Value::as_str) {
            status = reason.to_string();
        }
    }
    if obj
        .pointer("/metadata/deletionTimestamp")
        .is_some_and(|v| !v.is_null())
    {
        status = "Terminating".into();
    }
    vec![
        json!(obj.pointer("/metadata/name")),
        json!(format!("{ready}/{total}")),
        json!(status),
        json!(restarts.to_string()),
        json!(age(obj, "/metadata/creationTimestamp")),
        s(obj, "/status/podIP"),
        s(obj, "/spec/nodeName"),
        s(obj, "/status/nominatedNodeName"),
        json!("<none>"),
    ]
}

fn event_cells(obj: &Value) -> Vec<Value> {
    let last_seen = [
        "/series/lastObservedTime",
        "/lastTimestamp",
        "/eventTime",
        "/metadata/creationTimestamp",
    ]
    .iter()
    .find(|p| obj.pointer(p).is_some_and(|v| v.is_string()))
    .map_or("<unknown>".to_string(), |p| age(obj, p));
    let object = format!(
        "{}/{}",
        obj.pointer("/involvedObject/kind")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_lowercase(),
        obj.pointer("/involvedObject/name")
            .and_then(Value::as_str)
            .unwrap_or("")
    );
    vec![
        json!(last_seen),
        s(obj, "/type"),
        s(obj, "/reason"),
        json!(object),
        s(obj, "/message"),
    ]
}

/// The cells of one object's row.
pub fn cells(def: &ResourceDef, obj: &Value) -> Vec<Value> {
    let name = json!(obj.pointer("/metadata/name"));
    let created = json!(age(obj, "/metadata/creationTimestamp"));
    match def.kind {
        "Pod" => pod_cells(obj),
        "RuntimeClass" => vec![name, s(obj, "/handler"), created],
        "Namespace" => vec![
            name,
            json!(
                obj.pointer("/status/phase")
                    .and_then(Value::as_str)
                    .unwrap_or("Active")
            ),
            created,
        ],
        "ConfigMap" => {
            let n =
                count(obj, "/data").as_u64().unwrap_or(0) + count(obj, "/binaryData").as_u64().unwrap_or(0);
            vec![name, json!(n), created]
        }
        "Secret" => vec![name, s(obj, "/type"), count(obj, "/data"), created],
        "ServiceAccount" => vec![name, count(obj, "/secrets"), created],
        "Lease" => vec![name, s(obj, "/spec/holderIdentity"), created],
        "ResourceQuota" => {
            let (request, limit) = quota_usage(obj);
            vec![name, created, json!(request), json!(limit)]
        }
        "Event" => event_cells(obj),
        "PersistentVolumeClaim" => {
            let modes: Vec<&str> = obj
                .pointer("/status/accessModes")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|m| match m.as_str()? {
                    "ReadWriteOnce" => Some("RWO"),
                    "ReadOnlyMany" => Some("ROX"),
                    "ReadWriteMany" => Some("RWX"),
                    "ReadWriteOncePod" => Some("RWOP"),
                    _ => None,
                })
                .collect();
            let or_unset = |path: &str| json!(obj.pointer(path).and_then(Value::as_str).unwrap_or("<unset>"));
            // Upstream's printer: a claim being deleted (held by its protection finalizer while a
            // Pod mounts it) shows as Terminating.
            let status = if obj
                .pointer("/metadata/deletionTimestamp")
                .is_some_and(|t| !t.is_null())
            {
                json!("Terminating")
            } else {
                s(obj, "/status/phase")
            };
            vec![
                name,
                status,
                s(obj, "/spec/volumeName"),
                s(obj, "/status/capacity/storage"),
                json!(modes.join(",")),
                or_unset("/spec/storageClassName"),
                or_unset("/spec/volumeAttributesClassName"),
                created,
            ]
        }
        "PodDisruptionBudget" => {
            let stated = |path: &str| match obj.pointer(path) {
                Some(Value::Number(n)) => json!(n.to_string()),
                Some(Value::String(p)) => json!(p),
                _ => json!("N/A"),
            };
            vec![
                name,
                stated("/spec/minAvailable"),
                stated("/spec/maxUnavailable"),
                json!(
                    obj.pointer("/status/disruptionsAllowed")
                        .and_then(Value::as_i64)
                        .unwrap_or(0)
                ),
                created,
            ]
        }
        _ => vec![name, created],
    }
}

/// A quota's `resource: used/hard` pairs, sorted by resource, as kubectl prints them: `limits.*`
/// in the second column, the rest in the first. A resource without a `used` entry shows 0.
fn quota_usage(obj: &Value) -> (String, String) {
    let hard = obj.pointer("/status/hard").and_then(Value::as_object);
    let used = obj.pointer("/status/used");
    let mut resources: Vec<&String> = hard.into_iter().flat_map(|h| h.keys()).collect();
    resources.sort();
    let (mut request, mut limit) = (Vec::new(), Vec::new());
    for resource in resources {
        let quantity = |v: Option<&Value>| match v {
            Some(Value::String(q)) => q.clone(),
            Some(other) => other.to_string(),
            None => "0".to_string(),
        };
        let pair = format!(
            "{resource}: {}/{}",
            quantity(used.and_then(|u| u.get(resource))),
            quantity(hard.and_then(|h| h.get(resource)))
        );
        if resource.starts_with("limits.") {
            limit.push(pair);
        } else {
            request.push(pair);
        }
    }
    (request.join(", "), limit.join(", "))
}

fn row(def: &ResourceDef, obj: &Value, include: IncludeObject) -> Value {
    let object = match include {
        IncludeObject::None => Value::Null,
        IncludeObject::Metadata => json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": obj.get("metadata").cloned().unwrap_or(Value::Null),
        }),
        IncludeObject::Object => obj.clone(),
    };
    json!({"cells": cells(def, obj), "object": object})
}

/// A Table of objects.
pub fn table(def: &ResourceDef, objects: &[Value], resource_version: &str, include: IncludeObject) -> Value {
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": columns(def),
        "rows": objects.iter().map(|o| row(def, o, include)).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations_as_kubectl_prints_them() {
        for (secs, want) in [
            (5, "5s"),
            (119, "119s"),
            (150, "2m30s"),
            (600, "10m"),
            (3 * 3600 + 60, "3h1m"),
            (9 * 3600, "9h"),
            (50 * 3600, "2d2h"),
            (24 * 3600 * 10, "10d"),
        ] {
            assert_eq!(human_duration(secs), want, "{secs}");
        }
    }

    #[test]
    fn a_quota_row_pairs_used_and_hard_as_kubectl_prints_them() {
        let quota = json!({"status": {
            "hard": {"pods": "4", "limits.memory": "1Gi", "count/pods": "5", "requests.cpu": "2"},
            "used": {"pods": "3", "count/pods": "3"},
        }});
        assert_eq!(
            quota_usage(&quota),
            (
                "count/pods: 3/5, pods: 3/4, requests.cpu: 0/2".to_string(),
                "limits.memory: 0/1Gi".to_string()
            )
        );
        assert_eq!(quota_usage(&json!({})), (String::new(), String::new()));
    }
}
