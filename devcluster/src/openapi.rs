//! A minimal OpenAPI v3 document per group/version: the paths and operations of the served kinds,
//! with the query parameters they accept. kubectl reads it to learn that the server validates
//! fields itself (`fieldValidation`), so `kubectl apply` sends `fieldValidation=Strict` rather than
//! validating client-side. Schemas are not published (kubectl then computes strategic merge
//! patches for built-in kinds from its compiled-in types).

use serde_json::{Map, Value, json};

use crate::api::KUBERNETES_VERSION;
use crate::resources::{RESOURCES, ResourceDef, group_versions};

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// `GET /openapi/v3`: the index of per-group/version documents.
pub fn index() -> Value {
    let mut paths = Map::new();
    for (g, v) in group_versions() {
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
    json!({
        "operationId": format!("{action}{}", def.kind),
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": {"group": def.group, "version": def.version, "kind": def.kind},
        "parameters": params.iter().map(|p| param(p)).collect::<Vec<_>>(),
        "responses": {"200": {"description": "OK"}},
    })
}

/// `GET /openapi/v3/<api/v1 | apis/group/version>`: the paths of one group/version.
pub fn group_version(path: &str) -> Option<Value> {
    let (group, version) = group_versions()
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
    for def in RESOURCES
        .iter()
        .filter(|d| d.group == group && d.version == version)
    {
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
        "components": {"schemas": {}},
    }))
}
