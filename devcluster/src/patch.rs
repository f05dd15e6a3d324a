//! Patch formats: JSON merge patch (RFC 7386), JSON patch (RFC 6902), and strategic merge patch as
//! kubectl sends it for the served kinds.

use serde_json::{Map, Value};

/// RFC 7386: objects merge recursively, `null` deletes, everything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let target = target.as_object_mut().expect("just made an object");
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

fn split_pointer(path: &str) -> Result<Vec<String>, String> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(format!("invalid JSON pointer {path:?}: must start with '/'"));
    };
    Ok(rest.split('/').map(unescape).collect())
}

fn parent_and_last<'a>(doc: &'a mut Value, path: &str) -> Result<(&'a mut Value, String), String> {
    let mut tokens = split_pointer(path)?;
    let last = tokens
        .pop()
        .ok_or_else(|| "the root cannot be targeted".to_string())?;
    let mut cur = doc;
    for t in tokens {
        cur = match cur {
            Value::Object(m) => m
                .get_mut(&t)
                .ok_or_else(|| format!("path {path:?} does not exist"))?,
            Value::Array(a) => {
                let i: usize = t
                    .parse()
                    .map_err(|_| format!("invalid array index {t:?} in {path:?}"))?;
                a.get_mut(i)
                    .ok_or_else(|| format!("index {i} out of range in {path:?}"))?
            }
            _ => return Err(format!("path {path:?} does not exist")),
        };
    }
    Ok((cur, last))
}

fn pointer_get(doc: &Value, path: &str) -> Result<Value, String> {
    doc.pointer(path)
        .cloned()
        .ok_or_else(|| format!("path {path:?} does not exist"))
}

fn remove_at(doc: &mut Value, path: &str) -> Result<Value, String> {
    let (parent, last) = parent_and_last(doc, path)?;
    match parent {
        Value::Object(m) => m
            .remove(&last)
            .ok_or_else(|| format!("path {path:?} does not exist")),
        Value::Array(a) => {
            let i: usize = last
                .parse()
                .map_err(|_| format!("invalid array index {last:?}"))?;
            if i >= a.len() {
                return Err(format!("index {i} out of range in {path:?}"));
            }
            Ok(a.remove(i))
        }
        _ => Err(format!("path {path:?} does not exist")),
    }
}

fn add_at(doc: &mut Value, path: &str, value: Value, replace: bool) -> Result<(), String> {
    if path.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (parent, last) = parent_and_last(doc, path)?;
    match parent {
        Value::Object(m) => {
            if replace && !m.contains_key(&last) {
                return Err(format!("path {path:?} does not exist"));
            }
            m.insert(last, value);
            Ok(())
        }
        Value::Array(a) => {
            if last == "-" && !replace {
                a.push(value);
                return Ok(());
            }
            let i: usize = last
                .parse()
                .map_err(|_| format!("invalid array index {last:?}"))?;
            if replace {
                *a.get_mut(i)
                    .ok_or_else(|| format!("index {i} out of range in {path:?}"))? = value;
            } else {
                if i > a.len() {
                    return Err(format!("index {i} out of range in {path:?}"));
                }
                a.insert(i, value);
            }
            Ok(())
        }
        _ => Err(format!("path {path:?} does not exist")),
    }
}

/// RFC 6902. The whole patch applies or nothing does.
pub fn json_patch(target: &mut Value, patch: &Value) -> Result<(), String> {
    let Value::Array(ops) = patch else {
        return Err("a JSON patch must be a list of operations".into());
    };
    let mut doc = target.clone();
    for (i, op) in ops.iter().enumerate() {
        let field = |name: &str| -> Result<&str, String> {
            op.get(name)
                .and_then(Value::as_str)
                .ok_or_else(|| format!("operation {i}: missing {name:?}"))
        };
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| format!("operation {i}: missing \"value\""))
        };
        let path = field("path")?;
        match field("op")? {
            "add" => add_at(&mut doc, path, value()?, false),
            "remove" => remove_at(&mut doc, path).map(|_| ()),
            "replace" => add_at(&mut doc, path, value()?, true),
            "move" => {
                let v = remove_at(&mut doc, field("from")?)?;
                add_at(&mut doc, path, v, false)
            }
            "copy" => {
                let v = pointer_get(&doc, field("from")?)?;
                add_at(&mut doc, path, v, false)
            }
            "test" => {
                if pointer_get(&doc, path)? == value()? {
                    Ok(())
                } else {
                    Err(format!("test failed at {path:?}"))
                }
            }
            other => Err(format!("unknown operation {other:?}")),
        }
        .map_err(|e| format!("operation {i}: {e}"))?;
    }
    *target = doc;
    Ok(())
}

/// The merge key of a list field in the served kinds (`None`: the list is replaced).
pub fn merge_key(field: &str) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets"
        | "resourceClaims"
        | "schedulingGates"
        | "readinessGates" => match field {
            "readinessGates" => "conditionType",
            _ => "name",
        },
        "ports" => "containerPort",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "conditions" => "type",
        "ownerReferences" => "uid",
        "hostAliases" => "ip",
        "topologySpreadConstraints" => "topologyKey",
        _ => return None,
    })
}

/// Lists of scalars merged as sets (patchStrategy merge on a primitive list).
pub fn is_merged_primitive_list(field: &str) -> bool {
    field == "finalizers"
}

/// Strategic merge patch for the served kinds: maps merge, `null` deletes, lists with a merge key
/// merge by key (`$patch: delete` removes an item, `$patch: replace` replaces the list),
/// `$setElementOrder/<list>` orders a merged list, `$deleteFromPrimitiveList/<list>` removes scalars,
/// `$retainKeys` keeps only the listed keys, other lists are replaced.
pub fn strategic_merge_patch(target: &mut Value, patch: &Value) -> Result<(), String> {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return Ok(());
    };
    if patch.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut replaced = patch.clone();
        replaced.remove("$patch");
        *target = Value::Object(replaced);
        return Ok(());
    }
    if patch.get("$patch").and_then(Value::as_str) == Some("delete") {
        *target = Value::Object(Map::new());
        return Ok(());
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let obj = target.as_object_mut().expect("just made an object");
    if let Some(Value::Array(keep)) = patch.get("$retainKeys") {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        obj.retain(|k, _| keep.contains(&k.as_str()));
    }
    let mut orders = Vec::new();
    for (key, value) in patch {
        if let Some(list) = key.strip_prefix("$setElementOrder/") {
            orders.push((list.to_string(), value.clone()));
            continue;
        }
        if let Some(list) = key.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(items)), Value::Array(remove)) = (obj.get_mut(list), value) {
                items.retain(|i| !remove.contains(i));
            }
            continue;
        }
        if key.starts_with('$') {
            continue;
        }
        if value.is_null() {
            obj.remove(key);
            continue;
        }
        match (value, merge_key(key)) {
            (Value::Array(items), Some(mk)) => {
                let current = obj.entry(key.clone()).or_insert_with(|| Value::Array(Vec::new()));
                merge_list(current, items, mk)?;
            }
            (Value::Array(items), None) if is_merged_primitive_list(key) => {
                let current = obj.entry(key.clone()).or_insert_with(|| Value::Array(Vec::new()));
                if let Value::Array(cur) = current {
                    for i in items {
                        if !cur.contains(i) {
                            cur.push(i.clone());
                        }
                    }
                } else {
                    *current = Value::Array(items.clone());
                }
            }
            (Value::Object(_), _) => {
                strategic_merge_patch(obj.entry(key.clone()).or_insert(Value::Null), value)?;
            }
            _ => {
                obj.insert(key.clone(), value.clone());
            }
        }
    }
    for (list, order) in orders {
        let (Some(Value::Array(items)), Value::Array(order)) = (obj.get_mut(&list), order) else {
            continue;
        };
        let Some(mk) = merge_key(&list) else { continue };
        let position = |item: &Value| {
            order
                .iter()
                .position(|o| o.get(mk) == item.get(mk))
                .unwrap_or(usize::MAX)
        };
        items.sort_by_key(position);
    }
    Ok(())
}

fn merge_list(current: &mut Value, patch_items: &[Value], mk: &str) -> Result<(), String> {
    if patch_items
        .iter()
        .any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        *current = Value::Array(
            patch_items
                .iter()
                .filter(|i| i.get("$patch").is_none())
                .cloned()
                .collect(),
        );
        return Ok(());
    }
    if !current.is_array() {
        *current = Value::Array(Vec::new());
    }
    let list = current.as_array_mut().expect("just made an array");
    for item in patch_items {
        let Some(key) = item.get(mk) else {
            return Err(format!("map in a list with merge key {mk:?} has no {mk:?}"));
        };
        let existing = list.iter().position(|i| i.get(mk) == Some(key));
        if item.get("$patch").and_then(Value::as_str) == Some("delete") {
            if let Some(pos) = existing {
                list.remove(pos);
            }
            continue;
        }
        match existing {
            Some(pos) => strategic_merge_patch(&mut list[pos], item)?,
            None => {
                let mut fresh = Value::Object(Map::new());
                strategic_merge_patch(&mut fresh, item)?;
                list.push(fresh);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_rfc7386() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
        merge_patch(&mut doc, &json!({"a": "z", "c": {"f": null}, "l": [3]}));
        assert_eq!(doc, json!({"a": "z", "c": {"d": "e"}, "l": [3]}));
    }

    #[test]
    fn json_patch_rfc6902() {
        let mut doc = json!({"metadata": {"labels": {"a": "1"}}, "l": [1, 2]});
        json_patch(
            &mut doc,
            &json!([
                {"op": "add", "path": "/metadata/labels/b~1c", "value": "2"},
                {"op": "remove", "path": "/metadata/labels/a"},
                {"op": "replace", "path": "/l/0", "value": 9},
                {"op": "add", "path": "/l/-", "value": 3},
                {"op": "test", "path": "/l/1", "value": 2},
                {"op": "copy", "from": "/l", "path": "/m"},
            ]),
        )
        .unwrap();
        assert_eq!(
            doc,
            json!({"metadata": {"labels": {"b/c": "2"}}, "l": [9, 2, 3], "m": [9, 2, 3]})
        );
        let before = doc.clone();
        assert!(
            json_patch(
                &mut doc,
                &json!([{"op": "add", "path": "/x", "value": 1}, {"op": "test", "path": "/x", "value": 2}])
            )
            .is_err()
        );
        assert_eq!(doc, before, "a failed patch applies nothing");
    }

    #[test]
    fn strategic_merge_by_key() {
        let mut pod = json!({"spec": {"containers": [{"name": "a", "image": "x"}, {"name": "b", "image": "y"}], "tolerations": [{"key": "t"}]}});
        strategic_merge_patch(
            &mut pod,
            &json!({"spec": {
                "$setElementOrder/containers": [{"name": "b"}, {"name": "a"}, {"name": "c"}],
                "containers": [{"name": "a", "image": "x2"}, {"name": "c", "image": "z"}],
                "tolerations": [{"key": "u"}]
            }}),
        )
        .unwrap();
        assert_eq!(
            pod,
            json!({"spec": {"containers": [{"name": "b", "image": "y"}, {"name": "a", "image": "x2"}, {"name": "c", "image": "z"}], "tolerations": [{"key": "u"}]}})
        );
        strategic_merge_patch(
            &mut pod,
            &json!({"spec": {"containers": [{"name": "b", "$patch": "delete"}]}}),
        )
        .unwrap();
        assert_eq!(pod["spec"]["containers"].as_array().unwrap().len(), 2);
        strategic_merge_patch(&mut pod, &json!({"metadata": {"finalizers": ["f1"]}})).unwrap();
        strategic_merge_patch(&mut pod, &json!({"metadata": {"finalizers": ["f2"]}})).unwrap();
        assert_eq!(pod["metadata"]["finalizers"], json!(["f1", "f2"]));
        strategic_merge_patch(
            &mut pod,
            &json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["f1"]}}),
        )
        .unwrap();
        assert_eq!(pod["metadata"]["finalizers"], json!(["f2"]));
    }
}
