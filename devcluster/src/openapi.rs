//! OpenAPI v3 per group/version: the paths and operations of the served kinds with the query
//! parameters they accept (kubectl learns from them that the server validates fields itself), and
//! the schemas of the served kinds, generated from k8s-openapi's types, with
//! `x-kubernetes-group-version-kind` (what `kubectl explain` reads). The same schemas drive strict
//! field validation.

use std::sync::OnceLock;

use schemars::generate::SchemaSettings;
use serde_json::{Map, Value, json};

use crate::api::KUBERNETES_VERSION;
use crate::resources::{RESOURCES, Registry, ResourceDef, Schema};

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// Every served kind's schema and the schemas they reference, by name.
struct Schemas {
    components: Map<String, Value>,
    /// Schema name of each built-in definition, in `RESOURCES` order.
    names: Vec<String>,
}

/// The name of a custom kind's schema, as upstream names them (`com.coreos.monitoring.v1.PrometheusRule`).
fn custom_schema_name(def: &ResourceDef) -> String {
    let mut parts: Vec<&str> = def.group.split('.').collect();
    parts.reverse();
    format!("{}.{}.{}", parts.join("."), def.version, def.kind)
}

/// A custom kind's schema as served: apiVersion, kind and metadata are always declared (upstream
/// adds them), metadata as the built-in ObjectMeta.
fn custom_schema(def: &ResourceDef, schema: &Value) -> Value {
    let mut schema = schema.clone();
    if !schema.is_object() {
        schema = json!({"type": "object"});
    }
    let object_meta = schemas()
        .components
        .keys()
        .find(|k| k.ends_with("apimachinery.pkg.apis.meta.v1.ObjectMeta"))
        .cloned()
        .unwrap_or_default();
    if schema.get("properties").is_some() {
        schema["properties"]["apiVersion"] = json!({"type": "string"});
        schema["properties"]["kind"] = json!({"type": "string"});
        schema["properties"]["metadata"] = json!({"$ref": format!("#/components/schemas/{object_meta}")});
    }
    schema["x-kubernetes-group-version-kind"] =
        json!([{"group": def.group, "version": def.version, "kind": def.kind}]);
    schema
}

fn schemas() -> &'static Schemas {
    static SCHEMAS: OnceLock<Schemas> = OnceLock::new();
    SCHEMAS.get_or_init(|| {
        let mut generator = SchemaSettings::openapi3().into_generator();
        let names: Vec<String> = RESOURCES
            .iter()
            .map(|def| match def.schema {
                Schema::Typed(register) => register(&mut generator),
                Schema::Custom(_) => unreachable!("built-in kinds have typed schemas"),
            })
            .collect();
        let mut components = generator.take_definitions(true);
        // Strategic merge patch metadata, as upstream publishes it: kubectl reads the merge keys of
        // list fields from these to compute its patches.
        for schema in components.values_mut() {
            let Some(properties) = schema.get_mut("properties").and_then(Value::as_object_mut) else {
                continue;
            };
            for (field, property) in properties.iter_mut() {
                let Some(property) = property.as_object_mut() else {
                    continue;
                };
                if let Some(key) = crate::patch::merge_key(field) {
                    property.insert("x-kubernetes-patch-strategy".into(), json!("merge"));
                    property.insert("x-kubernetes-patch-merge-key".into(), json!(key));
                } else if crate::patch::is_merged_primitive_list(field) {
                    property.insert("x-kubernetes-patch-strategy".into(), json!("merge"));
                }
            }
        }
        for (def, name) in RESOURCES.iter().zip(&names) {
            if let Some(Value::Object(schema)) = components.get_mut(name) {
                schema.insert(
                    "x-kubernetes-group-version-kind".into(),
                    json!([{"group": def.group, "version": def.version, "kind": def.kind}]),
                );
            }
        }
        Schemas { components, names }
    })
}

fn schema_name(def: &ResourceDef) -> String {
    match RESOURCES.iter().position(|d| std::ptr::eq(d, def)) {
        Some(index) => schemas().names[index].clone(),
        None => custom_schema_name(def),
    }
}

fn resolve(schema: &Value) -> &Value {
    let components = &schemas().components;
    let mut schema = schema;
    for _ in 0..16 {
        if let Some(target) = schema.get("$ref").and_then(Value::as_str) {
            match target
                .strip_prefix("#/components/schemas/")
                .and_then(|n| components.get(n))
            {
                Some(next) => schema = next,
                None => return schema,
            }
        } else if let Some(Value::Array(all)) = schema.get("allOf")
            && all.len() == 1
        {
            schema = &all[0];
        } else {
            break;
        }
    }
    schema
}

fn walk_unknown(schema: &Value, value: &mut Value, path: &str, remove: bool, out: &mut Vec<String>) {
    let schema = resolve(schema);
    if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
        return;
    }
    match value {
        Value::Object(map) => {
            let properties = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            let mut unknown = Vec::new();
            for (key, child) in map.iter_mut() {
                let child_path = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match (properties.and_then(|p| p.get(key)), additional) {
                    (Some(s), _) | (None, Some(s)) => walk_unknown(s, child, &child_path, remove, out),
                    (None, None) if properties.is_some() => unknown.push((key.clone(), child_path)),
                    (None, None) => {}
                }
            }
            for (key, child_path) in unknown {
                out.push(child_path);
                if remove {
                    map.remove(&key);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    walk_unknown(item_schema, item, &format!("{path}[{i}]"), remove, out);
                }
            }
        }
        _ => {}
    }
}

/// The fields of `obj` its kind's schema does not declare (`spec.containers[0].colour`);
/// removed from `obj` when `remove`.
pub fn unknown_fields(def: &ResourceDef, obj: &mut Value, remove: bool) -> Vec<String> {
    let mut out = Vec::new();
    let root = match &def.schema {
        Schema::Typed(_) => json!({"$ref": format!("#/components/schemas/{}", schema_name(def))}),
        Schema::Custom(schema) => custom_schema(def, schema),
    };
    walk_unknown(&root, obj, "", remove, &mut out);
    out
}

/// `GET /openapi/v3`: the index of per-group/version documents.
pub fn index(registry: &Registry) -> Value {
    let mut paths = Map::new();
    for (g, v) in registry.group_versions() {
        let path = gv_path(g, v);
        paths.insert(
            path.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{path}")}),
        );
    }
    json!({"paths": paths})
}

fn param(name: &str) -> Value {
    json!({"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": true}})
}

fn operation(def: &ResourceDef, action: &str, params: &[&str]) -> Value {
    let mut op = json!({
        "operationId": format!("{action}{}", def.kind),
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": {"group": def.group, "version": def.version, "kind": def.kind},
        "parameters": params.iter().map(|p| param(p)).collect::<Vec<_>>(),
        "responses": {"200": {"description": "OK"}},
    });
    if action == "patch" {
        // The patch types accepted: strategic merge for built-in kinds only, as upstream (kubectl
        // computes strategic merge patches only where the PATCH operation lists it).
        let mut content = serde_json::Map::new();
        let mut types = vec![
            "application/json-patch+json",
            "application/merge-patch+json",
            "application/apply-patch+yaml",
        ];
        if matches!(def.schema, Schema::Typed(_)) {
            types.push("application/strategic-merge-patch+json");
        }
        for t in types {
            content.insert(t.into(), json!({"schema": {"type": "object"}}));
        }
        op["requestBody"] = json!({"content": content, "required": true});
    }
    op
}

/// `GET /openapi/v3/<api/v1 | apis/group/version>`: the paths of one group/version.
pub fn group_version(registry: &Registry, path: &str) -> Option<Value> {
    let (group, version) = registry
        .group_versions()
        .into_iter()
        .find(|(g, v)| gv_path(g, v) == path)?;
    let write = ["dryRun", "fieldManager", "fieldValidation", "pretty"];
    let patch = ["dryRun", "fieldManager", "fieldValidation", "force", "pretty"];
    let read = [
        "labelSelector",
        "fieldSelector",
        "limit",
        "continue",
        "resourceVersion",
        "timeoutSeconds",
        "watch",
        "allowWatchBookmarks",
    ];
    let mut paths = Map::new();
    let mut components = schemas().components.clone();
    for def in registry
        .all()
        .into_iter()
        .filter(|d| d.group == group && d.version == version)
    {
        if let Schema::Custom(schema) = &def.schema {
            components.insert(custom_schema_name(def), custom_schema(def, schema));
        }
        let base = if def.namespaced {
            format!(
                "/{}/namespaces/{{namespace}}/{}",
                gv_path(group, version),
                def.plural
            )
        } else {
            format!("/{}/{}", gv_path(group, version), def.plural)
        };
        paths.insert(
            base.clone(),
            json!({
                "get": operation(def, "list", &read),
                "post": operation(def, "post", &write),
                "delete": operation(def, "deletecollection", &["dryRun", "labelSelector", "fieldSelector"]),
            }),
        );
        paths.insert(
            format!("{base}/{{name}}"),
            json!({
                "get": operation(def, "get", &["pretty"]),
                "put": operation(def, "put", &write),
                "patch": operation(def, "patch", &patch),
                "delete": operation(def, "delete", &["dryRun", "gracePeriodSeconds", "propagationPolicy"]),
            }),
        );
        if def.has_status {
            paths.insert(
                format!("{base}/{{name}}/status"),
                json!({
                    "get": operation(def, "get", &["pretty"]),
                    "put": operation(def, "put", &write),
                    "patch": operation(def, "patch", &patch),
                }),
            );
        }
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes (devcluster)", "version": KUBERNETES_VERSION},
        "paths": paths,
        "components": {"schemas": components},
    }))
}
