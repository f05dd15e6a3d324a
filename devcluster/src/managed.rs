//! Field management, as kube-apiserver's structured-merge-diff does it for the served kinds:
//! `metadata.managedFields` in the upstream `FieldsV1` format, ownership by field manager,
//! server-side apply with conflicts (409 naming the managers and fields) and `force`.
//!
//! ```text
//!  write by manager M (create / update / patch) ──► M's Update entry gains the fields it changed,
//!                                                    other managers lose them
//!  apply by manager M ──► conflicts: fields M sets to a different value that others own ──► 409
//!                    └──► (force) take them; drop fields M applied before and no longer applies
//! ```
//!
//! Paths use FieldsV1 elements: `f:<field>`, `k:<merge key JSON>` for list items with a merge
//! key, `v:<value JSON>` for set-like lists; other lists are atomic (owned as a whole).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

use crate::admission::now;
use crate::patch::strategic_merge_patch;

/// One owned field, as FieldsV1 path elements.
pub type FieldPath = Vec<String>;
/// The fields a manager owns.
pub type FieldSet = BTreeSet<FieldPath>;

/// Metadata fields that are the server's, never a manager's.
const SERVER_METADATA: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

/// The merge key of list items, by field name (as the strategic merge patch uses).
fn merge_key(field: &str) -> Option<&'static str> {
    crate::patch::merge_key(field)
}

fn set_like(field: &str) -> bool {
    field == "finalizers"
}

/// The fields an object sets (`status` excluded unless `with_status`).
pub fn field_set(obj: &Value, with_status: bool) -> FieldSet {
    let mut out = FieldSet::new();
    if let Value::Object(map) = obj {
        for (key, value) in map {
            match key.as_str() {
                "apiVersion" | "kind" => {}
                "status" if !with_status => {}
                "metadata" => {
                    if let Value::Object(meta) = value {
                        for (k, v) in meta {
                            if !SERVER_METADATA.contains(&k.as_str()) {
                                collect(v, k, &mut vec!["f:metadata".into(), format!("f:{k}")], &mut out);
                            }
                        }
                    }
                }
                _ => collect(value, key, &mut vec![format!("f:{key}")], &mut out),
            }
        }
    }
    out
}

fn collect(value: &Value, field: &str, at: &mut FieldPath, out: &mut FieldSet) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                at.push(format!("f:{k}"));
                collect(v, k, at, out);
                at.pop();
            }
        }
        Value::Array(items)
            if merge_key(field).is_some()
                && items
                    .iter()
                    .all(|i| i.get(merge_key(field).unwrap_or("")).is_some()) =>
        {
            let key = merge_key(field).unwrap_or("");
            for item in items {
                at.push(format!("k:{}", json!({key: item[key]})));
                out.insert(at.clone());
                if let Value::Object(fields) = item {
                    for (k, v) in fields {
                        at.push(format!("f:{k}"));
                        collect(v, k, at, out);
                        at.pop();
                    }
                }
                at.pop();
            }
        }
        Value::Array(items) if set_like(field) => {
            for item in items {
                at.push(format!("v:{item}"));
                out.insert(at.clone());
                at.pop();
            }
        }
        _ => {
            out.insert(at.clone());
        }
    }
}

/// The value at a field path.
pub fn value_at<'a>(obj: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut node = obj;
    for element in path {
        node = step(node, element)?;
    }
    Some(node)
}

fn step<'a>(node: &'a Value, element: &str) -> Option<&'a Value> {
    if let Some(field) = element.strip_prefix("f:") {
        node.get(field)
    } else if let Some(key) = element.strip_prefix("k:") {
        let key: Map<String, Value> = serde_json::from_str(key).ok()?;
        node.as_array()?
            .iter()
            .find(|item| key.iter().all(|(k, v)| item.get(k) == Some(v)))
    } else if let Some(value) = element.strip_prefix("v:") {
        let value: Value = serde_json::from_str(value).ok()?;
        node.as_array()?.iter().find(|item| **item == value)
    } else {
        None
    }
}

/// Removes the field at a path (and list items named by `k:`/`v:`).
pub fn remove_at(obj: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut node = obj;
    for element in parents {
        let next = if let Some(field) = element.strip_prefix("f:") {
            node.get_mut(field)
        } else {
            let found = step(node, element).cloned();
            node.as_array_mut()
                .and_then(|items| items.iter_mut().find(|i| Some(&**i) == found.as_ref()))
        };
        match next {
            Some(n) => node = n,
            None => return,
        }
    }
    if let Some(field) = last.strip_prefix("f:") {
        if let Some(map) = node.as_object_mut() {
            map.remove(field);
        }
    } else if let Some(found) = step(node, last).cloned()
        && let Some(items) = node.as_array_mut()
    {
        items.retain(|i| *i != found);
    }
}

/// FieldsV1 JSON of a set.
pub fn to_fields_v1(set: &FieldSet) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut node = &mut root;
        for element in path {
            node = node
                .entry(element.clone())
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .expect("built as objects");
        }
        if path.last().is_some_and(|e| e.starts_with("k:")) {
            node.entry(".").or_insert_with(|| json!({}));
        }
    }
    Value::Object(root)
}

/// A set from FieldsV1 JSON.
pub fn from_fields_v1(fields: &Value) -> FieldSet {
    fn walk(node: &Value, at: &mut FieldPath, out: &mut FieldSet) {
        let Some(map) = node.as_object() else { return };
        let children: Vec<_> = map.iter().filter(|(k, _)| k.as_str() != ".").collect();
        if (children.is_empty() || map.contains_key(".")) && !at.is_empty() {
            out.insert(at.clone());
        }
        for (k, v) in children {
            at.push(k.clone());
            walk(v, at, out);
            at.pop();
        }
    }
    let mut out = FieldSet::new();
    walk(fields, &mut Vec::new(), &mut out);
    out
}

/// One `managedFields` entry.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// `manager`.
    pub manager: String,
    /// `Apply` or `Update`.
    pub operation: String,
    /// `apiVersion` the fields were written in.
    pub api_version: String,
    /// `subresource` (`status`), or empty.
    pub subresource: String,
    /// The owned fields.
    pub fields: FieldSet,
}

/// The entries of an object.
pub fn entries(obj: &Value) -> Vec<Entry> {
    obj.pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .map(|e| Entry {
                    manager: e.get("manager").and_then(Value::as_str).unwrap_or("").into(),
                    operation: e
                        .get("operation")
                        .and_then(Value::as_str)
                        .unwrap_or("Update")
                        .into(),
                    api_version: e.get("apiVersion").and_then(Value::as_str).unwrap_or("").into(),
                    subresource: e.get("subresource").and_then(Value::as_str).unwrap_or("").into(),
                    fields: e.get("fieldsV1").map(from_fields_v1).unwrap_or_default(),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn write_entries(obj: &mut Value, list: Vec<Entry>) {
    let time = now();
    let json: Vec<Value> = list
        .into_iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let mut v = json!({
                "manager": e.manager, "operation": e.operation, "apiVersion": e.api_version,
                "time": time, "fieldsType": "FieldsV1", "fieldsV1": to_fields_v1(&e.fields),
            });
            if !e.subresource.is_empty() {
                v["subresource"] = json!(e.subresource);
            }
            v
        })
        .collect();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if json.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(json));
        }
    }
}

/// After a non-apply write by `manager`: it owns the fields it set or changed; others lose them.
pub fn record_update(old: Option<&Value>, new: &mut Value, manager: &str, subresource: &str) {
    let with_status = subresource == "status";
    let mut list = old.map(entries).unwrap_or_default();
    let now_set = field_set(new, with_status);
    let changed: FieldSet = now_set
        .iter()
        .filter(|p| old.is_none_or(|o| value_at(o, p) != value_at(new, p)))
        .cloned()
        .collect();
    for entry in &mut list {
        entry
            .fields
            .retain(|p| !changed.contains(p) && value_at(new, p).is_some());
    }
    if !changed.is_empty() {
        let api_version = new
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        match list
            .iter_mut()
            .find(|e| e.manager == manager && e.operation == "Update" && e.subresource == subresource)
        {
            Some(entry) => entry.fields.extend(changed),
            None => list.push(Entry {
                manager: manager.into(),
                operation: "Update".into(),
                api_version,
                subresource: subresource.into(),
                fields: changed,
            }),
        }
    }
    write_entries(new, list);
}

/// A field another manager owns with a different value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// The owning manager.
    pub manager: String,
    /// The field, as upstream prints it (`.data.a`).
    pub field: String,
}

fn dotted(path: &[String]) -> String {
    path.iter()
        .map(|e| match e.strip_prefix("f:") {
            Some(f) => format!(".{f}"),
            None => format!("[{}]", &e[2..]),
        })
        .collect()
}

/// Server-side apply of `applied` by `manager` onto `current` (`None`: create).
pub fn apply(
    current: Option<&Value>,
    applied: &Value,
    manager: &str,
    force: bool,
) -> Result<Value, Vec<Conflict>> {
    let applied_set = field_set(applied, false);
    let mut list = current.map(entries).unwrap_or_default();
    let mut conflicts = Vec::new();
    if let Some(current) = current {
        for entry in list.iter().filter(|e| e.manager != manager) {
            for path in entry.fields.intersection(&applied_set) {
                if value_at(current, path) != value_at(applied, path) {
                    conflicts.push(Conflict {
                        manager: entry.manager.clone(),
                        field: dotted(path),
                    });
                }
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflicts);
    }
    let mut next = current.cloned().unwrap_or_else(|| json!({}));
    // Fields this manager applied before and no longer applies go, unless someone else owns them.
    let before: FieldSet = list
        .iter()
        .filter(|e| e.manager == manager && e.operation == "Apply")
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    let others: FieldSet = list
        .iter()
        .filter(|e| !(e.manager == manager && e.operation == "Apply"))
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    for path in before.difference(&applied_set) {
        if !others.contains(path) {
            remove_at(&mut next, path);
        }
    }
    let mut merged_applied = applied.clone();
    if let Some(meta) = merged_applied.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
    }
    if strategic_merge_patch(&mut next, &merged_applied).is_err() {
        next = merged_applied;
    }
    for entry in &mut list {
        if entry.manager != manager {
            entry.fields.retain(|p| !applied_set.contains(p));
        }
    }
    list.retain(|e| !(e.manager == manager && e.operation == "Apply"));
    let api_version = applied
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    list.push(Entry {
        manager: manager.into(),
        operation: "Apply".into(),
        api_version,
        subresource: String::new(),
        fields: applied_set,
    });
    write_entries(&mut next, list);
    Ok(next)
}

/// The 409 message and causes for conflicts, as upstream words them.
pub fn conflict_message(conflicts: &[Conflict]) -> (String, Vec<(String, String)>) {
    let mut by_manager: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for c in conflicts {
        by_manager.entry(&c.manager).or_default().push(&c.field);
    }
    let plural = if conflicts.len() == 1 {
        "conflict"
    } else {
        "conflicts"
    };
    let mut message = format!("Apply failed with {} {plural}:", conflicts.len());
    for (manager, fields) in &by_manager {
        message.push_str(&format!(" conflicts with {manager:?}:"));
        for f in fields {
            message.push_str(&format!("\n- {f}"));
        }
    }
    let causes = conflicts
        .iter()
        .map(|c| (c.field.clone(), format!("conflict with {:?}", c.manager)))
        .collect();
    (message, causes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_sets_round_trip_through_fields_v1() {
        let obj = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "labels": {"a": "b"}, "finalizers": ["x"]},
            "spec": {"containers": [{"name": "c", "image": "i"}], "tolerations": [{"key": "k"}]}
        });
        let set = field_set(&obj, false);
        assert!(set.contains(&vec!["f:metadata".to_string(), "f:labels".into(), "f:a".into()]));
        assert!(set.contains(&vec![
            "f:spec".to_string(),
            "f:containers".into(),
            "k:{\"name\":\"c\"}".into(),
            "f:image".into()
        ]));
        assert!(
            set.contains(&vec!["f:spec".to_string(), "f:tolerations".into()]),
            "lists without merge keys are atomic"
        );
        assert!(
            !set.iter()
                .any(|p| p.contains(&"f:name".to_string()) && p.len() == 2),
            "the name is the server's"
        );
        assert_eq!(from_fields_v1(&to_fields_v1(&set)), set);
    }

    #[test]
    fn apply_conflicts_and_force() {
        let created = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": "1", "b": "2"}});
        let mut current = created.clone();
        record_update(None, &mut current, "kubectl-client-side-apply", "");
        let applied = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": "changed"}});
        let conflicts = apply(Some(&current), &applied, "kubectl", false).unwrap_err();
        assert_eq!(
            conflicts,
            [Conflict {
                manager: "kubectl-client-side-apply".into(),
                field: ".data.a".into()
            }]
        );
        let forced = apply(Some(&current), &applied, "kubectl", true).unwrap();
        assert_eq!(forced["data"], json!({"a": "changed", "b": "2"}));
        let owners: Vec<String> = entries(&forced).iter().map(|e| e.manager.clone()).collect();
        assert_eq!(owners, ["kubectl-client-side-apply", "kubectl"]);
        // Applying without a field the manager owned alone removes it.
        let shrunk = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {}});
        let again = apply(Some(&forced), &shrunk, "kubectl", false).unwrap();
        assert_eq!(again["data"], json!({"b": "2"}));
        // Same value: no conflict.
        let same =
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"b": "2"}});
        assert!(apply(Some(&current), &same, "other", false).is_ok());
    }
}
