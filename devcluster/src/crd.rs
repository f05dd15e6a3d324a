//! CustomResourceDefinitions: a stored CRD makes its kinds served (discovery, OpenAPI v3, storage,
//! watches) like the built-in ones, as `kubectl apply` of an operator's CRDs then its objects
//! expects.
//!
//! ```text
//!  POST/PUT/PATCH/DELETE customresourcedefinitions ──► validate, status Established
//!        └─► Api::serve_custom_resources ──► Registry::set_custom (kinds of every stored CRD)
//! ```
//!
//! What is checked of a custom object is what its schema declares as fields (unknown fields are
//! pruned, or refused under strict validation); value types and formats are not validated, and
//! only one version per kind is stored as written (no conversion).

use serde_json::{Value, json};

use crate::resources::{CustomKind, ResourceDef};
use crate::status::{ApiError, Cause};

/// The kinds a CRD object serves: one per served version.
pub fn kinds_of(crd: &Value) -> Vec<CustomKind> {
    let spec = &crd["spec"];
    let names = &spec["names"];
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let list = |v: &Value| {
        v.as_array()
            .map(|a| a.iter().filter_map(Value::as_str).map(String::from).collect())
            .unwrap_or_default()
    };
    let kind = text(&names["kind"]);
    let singular = match text(&names["singular"]) {
        s if s.is_empty() => kind.to_lowercase(),
        s => s,
    };
    spec["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["served"].as_bool().unwrap_or(true))
        .map(|v| CustomKind {
            group: text(&spec["group"]),
            version: text(&v["name"]),
            plural: text(&names["plural"]),
            singular: singular.clone(),
            kind: kind.clone(),
            namespaced: spec["scope"] != "Cluster",
            short_names: list(&names["shortNames"]),
            categories: list(&names["categories"]),
            has_status: v.pointer("/subresources/status").is_some(),
            schema: v
                .pointer("/schema/openAPIV3Schema")
                .cloned()
                .unwrap_or_else(|| json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})),
        })
        .filter(|k| {
            !k.group.is_empty() && !k.plural.is_empty() && !k.kind.is_empty() && !k.version.is_empty()
        })
        .collect()
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Upstream's checks of a CRD that decide whether its kinds can be served at all.
pub fn validate(def: &ResourceDef, crd: &Value) -> Result<(), ApiError> {
    let spec = &crd["spec"];
    let group = spec["group"].as_str().unwrap_or_default();
    let plural = spec
        .pointer("/names/plural")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let name = crd
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let mut causes = Vec::new();
    if group.split('.').count() < 2 || !group.split('.').all(is_dns_label) {
        causes.push(Cause::invalid(
            "spec.group",
            &json!(group),
            "should be a domain with at least one dot",
        ));
    }
    if !is_dns_label(plural) {
        causes.push(Cause::invalid(
            "spec.names.plural",
            &json!(plural),
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-'",
        ));
    }
    if spec
        .pointer("/names/kind")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        causes.push(Cause::required("spec.names.kind", "Required value"));
    }
    if name != format!("{plural}.{group}") {
        causes.push(Cause::invalid(
            "metadata.name",
            &json!(name),
            format!("must be spec.names.plural+\".\"+spec.group ({plural}.{group})"),
        ));
    }
    if !matches!(spec["scope"].as_str(), Some("Namespaced" | "Cluster")) {
        causes.push(Cause::invalid(
            "spec.scope",
            &spec["scope"],
            "supported values: \"Cluster\", \"Namespaced\"",
        ));
    }
    let versions = spec["versions"].as_array().cloned().unwrap_or_default();
    if versions.is_empty() {
        causes.push(Cause::required(
            "spec.versions",
            "must have exactly one version marked as storage version",
        ));
    } else if versions.iter().filter(|v| v["storage"] == true).count() != 1 {
        causes.push(Cause::invalid(
            "spec.versions",
            &spec["versions"],
            "must have exactly one version marked as storage version",
        ));
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(def, name, causes))
    }
}

/// The status a valid CRD gets at once: names accepted, established, its storage version.
pub fn established_status(crd: &Value) -> Value {
    let now = crate::admission::now();
    let stored: Vec<&Value> = crd["spec"]["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["storage"] == true)
        .map(|v| &v["name"])
        .collect();
    let condition = |kind: &str, reason: &str, message: &str| json!({"type": kind, "status": "True", "lastTransitionTime": now, "reason": reason, "message": message});
    json!({
        "acceptedNames": crd["spec"]["names"],
        "conditions": [
            condition("NamesAccepted", "NoConflicts", "no conflicts found"),
            condition("Established", "InitialNamesAccepted", "the initial names have been accepted"),
        ],
        "storedVersions": stored,
    })
}
