//! What kube-apiserver does to an object between decoding and storage: metadata management,
//! defaulting, validation, immutability, and the admission the spec relies on (RuntimeClass for
//! Pods), plus ResourceQuota for Pods (their count and compute resources, as [`crate::quota`]
//! counts them), so a namespace at its quota refuses a Pod create, even one whose name is taken:
//! admission comes before storage, as upstream. The quotas' status is kept by [`crate::quota`].

use std::collections::BTreeMap;

use chrono::{SecondsFormat, Utc};
use rand::Rng;
use rcsync_core::labels::{
    validate_dns1123_label, validate_dns1123_subdomain, validate_label_key, validate_label_value,
};
use serde_json::{Map, Value, json};

use crate::resources::{ResourceDef, runtime_classes};
use crate::status::{ApiError, Cause};
use crate::store::Reader;

/// Admission plugins that can be turned off, as kube-apiserver's `--disable-admission-plugins`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdmissionPlugins {
    /// `RuntimeClass`: Pods must name an existing RuntimeClass; its overhead and scheduling are
    /// merged in. On by default, as upstream.
    pub runtime_class: bool,
}

impl Default for AdmissionPlugins {
    fn default() -> Self {
        Self { runtime_class: true }
    }
}

impl AdmissionPlugins {
    /// Parses kube-apiserver's `--disable-admission-plugins` list (only RuntimeClass is known).
    pub fn disabling(list: &[String]) -> Result<Self, String> {
        let mut plugins = Self::default();
        for name in list {
            match name.as_str() {
                "RuntimeClass" => plugins.runtime_class = false,
                other => {
                    return Err(format!(
                        "unknown admission plugin {other:?}: devcluster knows \"RuntimeClass\""
                    ));
                }
            }
        }
        Ok(plugins)
    }
}

/// The time as Kubernetes writes it (`2026-01-02T03:04:05Z`).
pub fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The name in an object's metadata, or "".
pub fn name_of(obj: &Value) -> &str {
    obj.pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// How unknown fields are treated (`?fieldValidation=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldValidation {
    /// Reject unknown fields.
    Strict,
    /// Accept them (and drop them), with a warning.
    Warn,
    /// Accept and drop them silently.
    Ignore,
}

impl FieldValidation {
    /// Parses the query parameter; absent means Warn, as upstream.
    pub fn parse(raw: Option<&str>) -> Result<Self, ApiError> {
        match raw {
            None | Some("") | Some("Warn") => Ok(Self::Warn),
            Some("Strict") => Ok(Self::Strict),
            Some("Ignore") => Ok(Self::Ignore),
            Some(other) => Err(ApiError::bad_request(format!(
                "fieldValidation: Unsupported value: {other:?}: supported values: \"Ignore\", \"Strict\", \"Warn\""
            ))),
        }
    }
}

/// Checks the top level and `metadata` for unknown fields; drops them unless Strict (then errors).
/// Returns warnings for Warn.
pub fn check_unknown_fields(
    def: &ResourceDef,
    obj: &mut Value,
    mode: FieldValidation,
) -> Result<Vec<String>, ApiError> {
    if mode == FieldValidation::Ignore {
        crate::openapi::unknown_fields(def, obj, true);
        return Ok(Vec::new());
    }
    let unknown = crate::openapi::unknown_fields(def, obj, mode != FieldValidation::Strict);
    if unknown.is_empty() {
        return Ok(Vec::new());
    }
    let list: Vec<String> = unknown.iter().map(|f| format!("unknown field {f:?}")).collect();
    if mode == FieldValidation::Strict {
        return Err(ApiError::bad_request(format!(
            "strict decoding error: {}",
            list.join(", ")
        )));
    }
    Ok(list)
}

/// Upstream's `ValidatePathSegmentName`: anything but `.`, `..`, and names with `/` or `%`.
fn validate_path_segment(name: &str) -> Result<(), String> {
    if name == "." || name == ".." {
        return Err(format!("may not be '{name}'"));
    }
    if let Some(c) = ['/', '%'].into_iter().find(|c| name.contains(*c)) {
        return Err(format!("may not contain '{c}'"));
    }
    Ok(())
}

fn validate_metadata(def: &ResourceDef, obj: &Value, causes: &mut Vec<Cause>) {
    let name = name_of(obj);
    let name_check = if def.plural == "namespaces" {
        validate_dns1123_label(name)
    } else if def.group == "rbac.authorization.k8s.io" {
        // RBAC names are path segments upstream (`system:basic-user`).
        validate_path_segment(name)
    } else {
        validate_dns1123_subdomain(name)
    };
    if let Err(e) = name_check {
        causes.push(Cause::invalid("metadata.name", &json!(name), e));
    }
    for (field, is_label) in [("labels", true), ("annotations", false)] {
        let Some(map) = obj.pointer(&format!("/metadata/{field}")) else {
            continue;
        };
        if map.is_null() {
            continue;
        }
        let Some(map) = map.as_object() else {
            causes.push(Cause::invalid(
                format!("metadata.{field}"),
                map,
                "must be a map of strings",
            ));
            continue;
        };
        for (k, v) in map {
            if let Err(e) = validate_label_key(k) {
                causes.push(Cause::invalid(format!("metadata.{field}"), &json!(k), e));
            }
            match v.as_str() {
                Some(v) if is_label => {
                    if let Err(e) = validate_label_value(v) {
                        causes.push(Cause::invalid(format!("metadata.labels.{k}"), &json!(v), e));
                    }
                }
                Some(_) => {}
                None => causes.push(Cause::invalid(
                    format!("metadata.{field}.{k}"),
                    v,
                    "must be a string",
                )),
            }
        }
    }
}

fn validate_kind(def: &ResourceDef, obj: &Value, causes: &mut Vec<Cause>) {
    match def.kind {
        "RuntimeClass" => match obj.get("handler").and_then(Value::as_str) {
            None | Some("") => causes.push(Cause::required("handler", "")),
            Some(h) => {
                if let Err(e) = validate_dns1123_label(h) {
                    causes.push(Cause::invalid("handler", &json!(h), e));
                }
            }
        },
        "Pod" => {
            if let Some(deadline) = obj.pointer("/spec/activeDeadlineSeconds")
                && !deadline
                    .as_i64()
                    .is_some_and(|d| (1..=i64::from(i32::MAX)).contains(&d))
            {
                causes.push(Cause::invalid(
                    "spec.activeDeadlineSeconds",
                    deadline,
                    format!("must be between 1 and {}, inclusive", i32::MAX),
                ));
            }
            let containers = obj.pointer("/spec/containers").and_then(Value::as_array);
            match containers {
                None => causes.push(Cause::required("spec.containers", "")),
                Some(list) if list.is_empty() => causes.push(Cause::required("spec.containers", "")),
                Some(list) => {
                    for (i, c) in list.iter().enumerate() {
                        if c.get("name").and_then(Value::as_str).is_none_or(str::is_empty) {
                            causes.push(Cause::required(format!("spec.containers[{i}].name"), ""));
                        }
                        if c.get("image").and_then(Value::as_str).is_none_or(str::is_empty) {
                            causes.push(Cause::required(format!("spec.containers[{i}].image"), ""));
                        }
                    }
                }
            }
            for field in ["containers", "initContainers"] {
                let containers = obj.pointer(&format!("/spec/{field}")).and_then(Value::as_array);
                for (i, c) in containers.into_iter().flatten().enumerate() {
                    validate_resources(&format!("spec.{field}[{i}].resources"), c, causes);
                }
            }
            if let Some(rc) = obj.pointer("/spec/runtimeClassName").and_then(Value::as_str)
                && let Err(e) = validate_dns1123_subdomain(rc)
            {
                causes.push(Cause::invalid("spec.runtimeClassName", &json!(rc), e));
            }
        }
        "LimitRange" => crate::limit_range::validate_limit_range(obj, causes),
        "PodDisruptionBudget" => crate::disruption::validate_budget(obj, causes),
        "PersistentVolumeClaim" => crate::claims::validate_claim(obj, causes),
        "ResourceQuota" => {
            for field in ["scopes", "scopeSelector"] {
                if let Some(value) = obj.pointer(&format!("/spec/{field}"))
                    && !matches!(value, Value::Null)
                    && value.as_array().is_none_or(|scopes| !scopes.is_empty())
                {
                    causes.push(Cause::invalid(
                        format!("spec.{field}"),
                        value,
                        "devcluster counts every Pod of the namespace: scoped quotas are not supported",
                    ));
                }
            }
            let hard = obj.pointer("/spec/hard").and_then(Value::as_object);
            for (key, value) in hard.into_iter().flatten() {
                if let Some(why) = crate::quota::validate_hard(key, value) {
                    causes.push(Cause::invalid(format!("spec.hard[{key}]"), value, why));
                }
            }
        }
        _ => {}
    }
}

/// A container's `resources` (at `path`): every request and limit a quantity, and no request
/// above its limit, with upstream's messages.
fn validate_resources(path: &str, container: &Value, causes: &mut Vec<Cause>) {
    let read = |what: &str, causes: &mut Vec<Cause>| -> BTreeMap<String, (i128, Value)> {
        let mut amounts = BTreeMap::new();
        let entries = container
            .pointer(&format!("/resources/{what}"))
            .and_then(Value::as_object);
        for (name, value) in entries.into_iter().flatten() {
            let parsed = match value {
                Value::String(text) => crate::quantity::parse_millis(text),
                Value::Number(n) => n
                    .as_u64()
                    .map(|n| i128::from(n) * 1000)
                    .ok_or_else(|| "must be greater than or equal to 0".to_string()),
                _ => Err("must be a quantity".to_string()),
            };
            match parsed {
                Ok(millis) => {
                    amounts.insert(name.clone(), (millis, value.clone()));
                }
                Err(why) => causes.push(Cause::invalid(format!("{path}.{what}[{name}]"), value, why)),
            }
        }
        amounts
    };
    let requests = read("requests", causes);
    let limits = read("limits", causes);
    for (name, (request, value)) in &requests {
        if let Some((limit, limit_value)) = limits.get(name)
            && request > limit
        {
            let limit_text = limit_value
                .as_str()
                .map_or_else(|| limit_value.to_string(), str::to_string);
            causes.push(Cause::invalid(
                format!("{path}.requests"),
                value,
                format!("must be less than or equal to {name} limit of {limit_text}"),
            ));
        }
    }
}

fn validate(def: &ResourceDef, obj: &Value) -> Result<(), ApiError> {
    let mut causes = Vec::new();
    validate_metadata(def, obj, &mut causes);
    validate_kind(def, obj, &mut causes);
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(def, name_of(obj), causes))
    }
}

fn default_pod(obj: &mut Value) {
    let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    for (k, v) in [
        ("restartPolicy", json!("Always")),
        ("dnsPolicy", json!("ClusterFirst")),
        ("schedulerName", json!("default-scheduler")),
        ("terminationGracePeriodSeconds", json!(30)),
        ("securityContext", json!({})),
        ("enableServiceLinks", json!(true)),
    ] {
        spec.entry(k).or_insert(v);
    }
    if let Some(Value::Array(containers)) = spec.get_mut("containers") {
        for c in containers.iter_mut().filter_map(Value::as_object_mut) {
            let image = c.get("image").and_then(Value::as_str).unwrap_or("").to_string();
            let tag = image
                .rsplit('/')
                .next()
                .and_then(|last| last.split_once(':'))
                .map(|(_, t)| t.to_string());
            let pull = if tag.is_none() || tag.as_deref() == Some("latest") {
                "Always"
            } else {
                "IfNotPresent"
            };
            c.entry("imagePullPolicy").or_insert(json!(pull));
            c.entry("terminationMessagePath")
                .or_insert(json!("/dev/termination-log"));
            c.entry("terminationMessagePolicy").or_insert(json!("File"));
            c.entry("resources").or_insert(json!({}));
        }
    }
}

fn default_object(def: &ResourceDef, obj: &mut Value) {
    match def.kind {
        "Pod" => default_pod(obj),
        "LimitRange" => crate::limit_range::default_limit_range(obj),
        "Secret" => {
            if let Some(map) = obj.as_object_mut() {
                map.entry("type").or_insert(json!("Opaque"));
                // stringData is write-only: merged into data, base64-encoded.
                if let Some(Value::Object(string_data)) = map.remove("stringData") {
                    use base64::Engine;
                    let data = map.entry("data").or_insert(json!({}));
                    for (k, v) in string_data {
                        let raw = v.as_str().unwrap_or_default();
                        data[k] = json!(base64::engine::general_purpose::STANDARD.encode(raw));
                    }
                }
            }
        }
        _ => {}
    }
}

/// Admission of Pods naming a RuntimeClass, as upstream's RuntimeClass admission plugin: the class
/// must exist; its overhead is set on the Pod; its scheduling node selector and tolerations are
/// merged in.
fn admit_runtime_class(def: &ResourceDef, obj: &mut Value, reader: &Reader<'_>) -> Result<(), ApiError> {
    let Some(class_name) = obj
        .pointer("/spec/runtimeClassName")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
    else {
        return Ok(());
    };
    let class_name = class_name.to_string();
    let pod_name = name_of(obj).to_string();
    let Some(class) = reader.get(runtime_classes().storage, "", &class_name) else {
        return Err(ApiError::forbidden(
            def,
            &pod_name,
            &format!("pod rejected: RuntimeClass {class_name:?} not found"),
        ));
    };
    let spec = obj
        .get_mut("spec")
        .and_then(Value::as_object_mut)
        .expect("pods have a spec (validated)");
    if let Some(overhead) = class.pointer("/overhead/podFixed").filter(|v| !v.is_null()) {
        match spec.get("overhead") {
            Some(existing) if existing != overhead => {
                return Err(ApiError::forbidden(
                    def,
                    &pod_name,
                    "pod rejected: Pod's Overhead doesn't match RuntimeClass's defined Overhead",
                ));
            }
            _ => {
                spec.insert("overhead".into(), overhead.clone());
            }
        }
    }
    if let Some(Value::Object(selector)) = class.pointer("/scheduling/nodeSelector") {
        let pod_selector = spec.entry("nodeSelector").or_insert(json!({}));
        for (k, v) in selector {
            match pod_selector.get(k) {
                Some(existing) if existing != v => {
                    return Err(ApiError::forbidden(
                        def,
                        &pod_name,
                        &format!(
                            "pod rejected: conflict: runtimeClass.scheduling.nodeSelector[{k}] = {v}; pod.spec.nodeSelector[{k}] = {existing}"
                        ),
                    ));
                }
                _ => pod_selector[k] = v.clone(),
            }
        }
    }
    if let Some(Value::Array(tolerations)) = class.pointer("/scheduling/tolerations") {
        let pod_tolerations = spec.entry("tolerations").or_insert(json!([]));
        if let Value::Array(list) = pod_tolerations {
            for t in tolerations {
                if !list.contains(t) {
                    list.push(t.clone());
                }
            }
        }
    }
    Ok(())
}

/// Five random characters, as upstream appends to `generateName`.
pub fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Checks the body's apiVersion/kind against the URL, fills them in when absent.
pub fn check_type(def: &ResourceDef, obj: &mut Value) -> Result<(), ApiError> {
    let Some(map) = obj.as_object_mut() else {
        return Err(ApiError::bad_request("the request body must be a JSON object"));
    };
    let expected_version = def.api_version();
    match map.get("apiVersion").and_then(Value::as_str) {
        Some(v) if v != expected_version => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({expected_version})"
            )));
        }
        _ => {}
    }
    match map.get("kind").and_then(Value::as_str) {
        Some(k) if k != def.kind => {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                def.kind
            )));
        }
        _ => {}
    }
    map.insert("apiVersion".into(), json!(expected_version));
    map.insert("kind".into(), json!(def.kind));
    if !map.get("metadata").is_some_and(Value::is_object) {
        map.insert("metadata".into(), Value::Object(Map::new()));
    }
    Ok(())
}

/// Prepares a new object for storage: name, namespace, uid, timestamps,
/// defaults, validation and admission. `namespace` is the URL's.
pub fn prepare_create(
    def: &ResourceDef,
    namespace: &str,
    mut obj: Value,
    reader: &Reader<'_>,
    plugins: &AdmissionPlugins,
) -> Result<Value, ApiError> {
    let meta = obj["metadata"]
        .as_object_mut()
        .expect("check_type made metadata an object");
    if def.namespaced {
        match meta.get("namespace").and_then(Value::as_str) {
            Some(ns) if !ns.is_empty() && ns != namespace => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            _ => {
                meta.insert("namespace".into(), json!(namespace));
            }
        }
    } else {
        meta.remove("namespace");
    }
    if meta.get("name").and_then(Value::as_str).is_none_or(str::is_empty) {
        return Err(ApiError::invalid(
            def,
            "",
            vec![Cause::required(
                "metadata.name",
                "name or generateName is required",
            )],
        ));
    }
    meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
    meta.insert("creationTimestamp".into(), json!(now()));
    meta.insert("generation".into(), json!(1));
    meta.remove("deletionTimestamp");
    meta.remove("resourceVersion");
    meta.remove("selfLink");
    match def.kind {
        "Pod" => {
            // Ephemeral containers join a running Pod through their subresource only.
            if obj
                .pointer("/spec/ephemeralContainers")
                .and_then(Value::as_array)
                .is_some_and(|l| !l.is_empty())
            {
                return Err(ApiError::invalid(
                    def,
                    name_of(&obj),
                    vec![Cause {
                        reason: "FieldValueForbidden",
                        field: "spec.ephemeralContainers".into(),
                        message: "Forbidden: cannot be set on create".into(),
                    }],
                ));
            }
            obj["status"] = json!({"phase": "Pending", "qosClass": crate::resize::qos_class(&obj)});
        }
        "CustomResourceDefinition" => {
            crate::crd::validate(def, &obj)?;
            obj["status"] = crate::crd::established_status(&obj);
        }
        "PersistentVolumeClaim" => {
            crate::claims::admit_claim(&mut obj, reader);
            obj["status"] = json!({"phase": "Pending"});
        }
        "Namespace" => {
            obj["status"] = json!({"phase": "Active"});
            let name = name_of(&obj).to_string();
            obj["metadata"]["labels"]["kubernetes.io/metadata.name"] = json!(name);
            obj["spec"] = json!({"finalizers": ["kubernetes"]});
        }
        _ => {}
    }
    default_object(def, &mut obj);
    validate(def, &obj)?;
    if def.kind == "Pod" && plugins.runtime_class {
        admit_runtime_class(def, &mut obj, reader)?;
    }
    if def.kind == "Pod" {
        admit_limit_ranges(def, &mut obj, reader)?;
    }
    if matches!(def.kind, "Pod" | "PersistentVolumeClaim") {
        admit_quota(def, &obj, None, reader)?;
    }
    Ok(obj)
}

/// ResourceQuota admission for a resize of `old` into `new` (upstream's quota evaluates Pod
/// updates since in-place resize): what the resize adds, on top of what the namespace uses now
/// (the Pod as it was included); a resize that adds nothing is never refused.
pub fn admit_pod_resize(
    def: &ResourceDef,
    old: &Value,
    new: &Value,
    reader: &Reader<'_>,
) -> Result<(), ApiError> {
    admit_quota(def, new, Some(old), reader)
}

/// LimitRanger admission for a Pod create (before quota, as upstream orders them): the
/// namespace's LimitRanges, by name, fill in the requests and limits its containers leave out and
/// refuse a container outside their bounds (403, upstream's words).
fn admit_limit_ranges(def: &ResourceDef, obj: &mut Value, reader: &Reader<'_>) -> Result<(), ApiError> {
    let namespace = obj
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let mut ranges: Vec<&Value> = reader.list("limitranges", &namespace).collect();
    if ranges.is_empty() {
        return Ok(());
    }
    ranges.sort_by(|a, b| name_of(a).cmp(name_of(b)));
    crate::limit_range::admit_pod(obj, &ranges).map_err(|why| ApiError::forbidden(def, name_of(obj), &why))
}

/// ResourceQuota admission for a Pod (or PersistentVolumeClaim) create, quota by quota (by name),
/// as upstream: a Pod whose
/// containers do not state the cpu and memory a quota limits is refused (`failed quota: ...`),
/// and one whose usage, added to what the namespace's Pods use now, would pass a quota's limit on
/// anything it uses (`exceeded quota: ...`, naming only those resources).
fn admit_quota(
    def: &ResourceDef,
    obj: &Value,
    replacing: Option<&Value>,
    reader: &Reader<'_>,
) -> Result<(), ApiError> {
    let namespace = obj
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("");
    let mut quotas: Vec<(String, BTreeMap<&'static str, i128>)> = reader
        .list("resourcequotas", namespace)
        .map(|quota| (name_of(quota).to_string(), crate::quota::hard_of(quota)))
        .filter(|(_, hard)| !hard.is_empty())
        .collect();
    if quotas.is_empty() {
        return Ok(());
    }
    quotas.sort_by(|a, b| a.0.cmp(&b.0));
    // A resize is checked on what it adds (upstream's delta usage): the resources whose use grows,
    // by how much; the namespace's use still counts the Pod as it was.
    let usage = |obj: &Value| crate::quota::usage_of(def.kind, obj).unwrap_or_default();
    let requested: crate::quota::Usage = match replacing {
        None => usage(obj),
        Some(old) => {
            let before = usage(old);
            usage(obj)
                .into_iter()
                .map(|(key, amount)| (key, amount - before.get(key).copied().unwrap_or_default()))
                .filter(|(_, added)| *added > 0)
                .collect()
        }
    };
    let mut used: Option<crate::quota::Usage> = None;
    for (quota, hard) in quotas {
        if let Some(missing) = crate::quota::missing_resources(obj, &hard).filter(|_| def.kind == "Pod") {
            return Err(ApiError::forbidden(
                def,
                name_of(obj),
                &format!("failed quota: {quota}: {missing}"),
            ));
        }
        let keys: Vec<&str> = requested
            .keys()
            .copied()
            .filter(|k| hard.contains_key(k))
            .collect();
        if keys.is_empty() {
            continue;
        }
        // What the namespace's Pods use now, counted in the create's own transaction: a quota's
        // status lagging by one store event never lets a Pod past it.
        let used = used.get_or_insert_with(|| {
            let mut used = crate::quota::Usage::new();
            for existing in reader.list(def.storage, namespace) {
                for (key, amount) in usage(existing) {
                    *used.entry(key).or_default() += amount;
                }
            }
            used
        });
        let exceeded: Vec<&str> = keys
            .into_iter()
            .filter(|k| used.get(k).copied().unwrap_or_default() + requested[k] > hard[k])
            .collect();
        if !exceeded.is_empty() {
            return Err(ApiError::forbidden(
                def,
                name_of(obj),
                &format!(
                    "exceeded quota: {quota}, requested: {}, used: {}, limited: {}",
                    crate::quota::print_amounts(&requested, &exceeded),
                    crate::quota::print_amounts(used, &exceeded),
                    crate::quota::print_amounts(&hard, &exceeded),
                ),
            ));
        }
    }
    Ok(())
}

/// Which part of an object a write may change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// The main resource: everything but status (for kinds with a status subresource).
    Main,
    /// The status subresource: only status.
    Status,
    /// A Pod's `resize` subresource: only its containers' resources (see [`crate::resize`]).
    Resize,
    /// A Pod's `ephemeralcontainers` subresource: only its ephemeral containers, added (see
    /// [`crate::ephemeral`]).
    EphemeralContainers,
}

impl Part {
    /// The subresource's name, as managed fields record it (empty for the main resource).
    pub fn subresource(self) -> &'static str {
        match self {
            Part::Main => "",
            Part::Status => "status",
            Part::Resize => "resize",
            Part::EphemeralContainers => "ephemeralcontainers",
        }
    }
}

fn spec_changed(old: &Value, new: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(m) = v.as_object_mut() {
            m.remove("metadata");
            m.remove("status");
        }
        v
    };
    strip(old) != strip(new)
}

/// Whether every toleration of `old` is in `new` (its `tolerationSeconds` may change): a running
/// Pod takes additions only, as upstream's `validateOnlyAddedTolerations`.
fn only_added_tolerations(old: &Value, new: &Value) -> bool {
    let list = |spec: &Value| {
        spec.get("tolerations")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let without_seconds = |t: &Value| {
        let mut t = t.clone();
        if let Some(m) = t.as_object_mut() {
            m.remove("tolerationSeconds");
        }
        t
    };
    let new: Vec<Value> = list(new).iter().map(without_seconds).collect();
    list(old).iter().all(|t| new.contains(&without_seconds(t)))
}

/// Whether a Pod spec has scheduling gates (it is not yet considered for scheduling).
fn gated(spec: &Value) -> bool {
    spec["schedulingGates"].as_array().is_some_and(|g| !g.is_empty())
}

/// Upstream's rule for `activeDeadlineSeconds` on update: it may be set, or lowered, never raised
/// or removed.
fn deadline_change(old: &Value, new: &Value) -> Option<Cause> {
    let field = "spec.activeDeadlineSeconds";
    match (
        old["activeDeadlineSeconds"].as_i64(),
        new.get("activeDeadlineSeconds"),
    ) {
        (Some(_), None | Some(Value::Null)) => Some(Cause::invalid(
            field,
            &Value::Null,
            "must not update from a positive integer to nil value",
        )),
        (Some(before), Some(after)) if after.as_i64().is_some_and(|a| a > before) => Some(Cause::invalid(
            field,
            after,
            "must be less than or equal to previous value",
        )),
        _ => None,
    }
}

/// Upstream's rule for scheduling gates on update: they can only be removed.
fn gate_changes(old: &Value, new: &Value) -> Vec<Cause> {
    let names = |spec: &Value| -> Vec<String> {
        spec["schedulingGates"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|g| g["name"].as_str().map(str::to_string))
            .collect()
    };
    let before = names(old);
    names(new)
        .into_iter()
        .enumerate()
        .filter(|(_, name)| !before.contains(name))
        .map(|(i, name)| Cause {
            reason: "FieldValueForbidden",
            field: format!("spec.schedulingGates[{i}].name"),
            message: format!("Forbidden: only deletion is allowed, but found new scheduling gate '{name}'"),
        })
        .collect()
}

/// Upstream's relaxation for a gated Pod: its node selector may gain entries and each term of its
/// required node affinity may gain requirements (an affinity without required terms may be set);
/// nothing it has may change or go.
fn narrowed_placement(old: &Value, new: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let selector = |spec: &Value| spec["nodeSelector"].as_object().cloned().unwrap_or_default();
    let (was, is) = (selector(old), selector(new));
    if was.iter().any(|(k, v)| is.get(k) != Some(v)) {
        causes.push(Cause::invalid(
            "spec.nodeSelector",
            &new["nodeSelector"],
            "only additions to spec.nodeSelector are allowed (no mutations or deletions)",
        ));
    }
    let path = "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms";
    let terms = |spec: &Value| {
        spec.pointer(
            "/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution/nodeSelectorTerms",
        )
        .and_then(Value::as_array)
        .cloned()
    };
    let Some(was) = terms(old) else {
        return causes;
    };
    let is = terms(new).unwrap_or_default();
    if was.len() != is.len() {
        causes.push(Cause::invalid(
            path,
            &Value::Array(is),
            "number of NodeSelectorTerms cannot change",
        ));
        return causes;
    }
    let list = |term: &Value, field: &str| term[field].as_array().cloned().unwrap_or_default();
    for (i, (before, after)) in was.iter().zip(&is).enumerate() {
        let kept = ["matchExpressions", "matchFields"].iter().all(|field| {
            let after = list(after, field);
            list(before, field).iter().all(|r| after.contains(r))
        });
        let empty_grew = list(before, "matchExpressions").is_empty()
            && list(before, "matchFields").is_empty()
            && before != after;
        if !kept || empty_grew {
            causes.push(Cause::invalid(
                format!("{path}[{i}]"),
                after,
                "only additions are allowed (no mutations or deletions)",
            ));
        }
    }
    causes
}

/// Pod spec fields an update may change, as upstream's validation allows.
fn check_pod_update(def: &ResourceDef, old: &Value, new: &Value) -> Result<(), ApiError> {
    if !only_added_tolerations(&old["spec"], &new["spec"]) {
        return Err(ApiError::invalid(
            def,
            name_of(new),
            vec![Cause {
                reason: "FieldValueForbidden",
                field: "spec.tolerations".into(),
                message: "Forbidden: existing toleration can not be modified except its tolerationSeconds"
                    .into(),
            }],
        ));
    }
    let mut causes = gate_changes(&old["spec"], &new["spec"]);
    causes.extend(deadline_change(&old["spec"], &new["spec"]));
    let mut allowed = old["spec"].clone();
    let new_spec = &new["spec"];
    if gated(&old["spec"]) {
        // A gated Pod's placement may still be narrowed (as a queueing controller does before
        // it lifts its gate): node selector entries and required node affinity added. The rest
        // of its affinity stays as it was.
        causes.extend(narrowed_placement(&old["spec"], new_spec));
        let mut affinity = old["spec"]["affinity"].as_object().cloned().unwrap_or_default();
        match new_spec.pointer("/affinity/nodeAffinity") {
            Some(node) => affinity.insert("nodeAffinity".to_string(), node.clone()),
            None => affinity.remove("nodeAffinity"),
        };
        if let Some(m) = allowed.as_object_mut() {
            match new_spec.get("nodeSelector") {
                Some(v) => m.insert("nodeSelector".to_string(), v.clone()),
                None => m.remove("nodeSelector"),
            };
            if affinity.is_empty() && new_spec.get("affinity").is_none() {
                m.remove("affinity");
            } else {
                m.insert("affinity".to_string(), Value::Object(affinity));
            }
        }
    }
    if !causes.is_empty() {
        return Err(ApiError::invalid(def, name_of(new), causes));
    }
    for list in ["containers", "initContainers"] {
        if let (Some(Value::Array(a)), Some(Value::Array(b))) = (allowed.get_mut(list), new_spec.get(list))
            && a.len() == b.len()
        {
            for (x, y) in a.iter_mut().zip(b) {
                if let Some(image) = y.get("image") {
                    x["image"] = image.clone();
                }
            }
        }
    }
    for field in [
        "activeDeadlineSeconds",
        "tolerations",
        "terminationGracePeriodSeconds",
        "schedulingGates",
    ] {
        match new_spec.get(field) {
            Some(v) => allowed[field] = v.clone(),
            None => {
                if let Some(m) = allowed.as_object_mut() {
                    m.remove(field);
                }
            }
        }
    }
    if &allowed != new_spec {
        return Err(ApiError::invalid(
            def,
            name_of(new),
            vec![Cause {
                reason: "FieldValueForbidden",
                field: "spec".into(),
                message: "Forbidden: pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)".into(),
            }],
        ));
    }
    Ok(())
}

/// Prepares a replacement of `old`. Enforces the resourceVersion precondition (when the new object
/// carries one), keeps identity and server-owned metadata, applies the part rule, checks
/// immutable fields, bumps generation on spec changes, validates.
pub fn prepare_update(def: &ResourceDef, old: &Value, mut new: Value, part: Part) -> Result<Value, ApiError> {
    if def.kind == "CustomResourceDefinition" && part == Part::Main {
        crate::crd::validate(def, &new)?;
    }
    let name = name_of(old).to_string();
    if name_of(&new) != name && !name_of(&new).is_empty() {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({}) does not match the name on the URL ({name})",
            name_of(&new)
        )));
    }
    if let Some(rv) = new
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        && Some(rv) != old.pointer("/metadata/resourceVersion").and_then(Value::as_str)
    {
        return Err(ApiError::stale(def, &name));
    }
    if let Some(uid) = new
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        && Some(uid) != old.pointer("/metadata/uid").and_then(Value::as_str)
    {
        return Err(ApiError::conflict(
            def,
            &name,
            &format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                old.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or("")
            ),
        ));
    }
    if part == Part::Status {
        let mut out = old.clone();
        out["status"] = new.get("status").cloned().unwrap_or(Value::Null);
        if out["status"].is_null()
            && let Some(m) = out.as_object_mut()
        {
            m.remove("status");
        }
        return Ok(out);
    }
    if part == Part::Resize {
        let mut out = crate::resize::prepare(def, old, &new)?;
        bump_generation(old, &mut out);
        validate(def, &out)?;
        return Ok(out);
    }
    if part == Part::EphemeralContainers {
        let mut out = crate::ephemeral::prepare(def, old, &new)?;
        bump_generation(old, &mut out);
        validate(def, &out)?;
        return Ok(out);
    }
    {
        let meta = new["metadata"]
            .as_object_mut()
            .expect("check_type made metadata an object");
        for key in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "generation",
            "deletionTimestamp",
        ] {
            match old["metadata"].get(key) {
                Some(v) => {
                    meta.insert(key.into(), v.clone());
                }
                None => {
                    meta.remove(key);
                }
            }
        }
    }
    if def.has_status {
        match old.get("status") {
            Some(s) => new["status"] = s.clone(),
            None => {
                if let Some(m) = new.as_object_mut() {
                    m.remove("status");
                }
            }
        }
    }
    default_object(def, &mut new);
    match def.kind {
        "RuntimeClass" if new.get("handler") != old.get("handler") => {
            return Err(ApiError::invalid(
                def,
                &name,
                vec![Cause::invalid(
                    "handler",
                    new.get("handler").unwrap_or(&Value::Null),
                    "field is immutable",
                )],
            ));
        }
        "Pod" => check_pod_update(def, old, &new)?,
        "PersistentVolumeClaim" => {
            if let Some(cause) = crate::claims::update_forbidden(old, &new) {
                return Err(ApiError::invalid(def, &name, vec![cause]));
            }
        }
        _ => {}
    }
    bump_generation(old, &mut new);
    validate(def, &new)?;
    Ok(new)
}

/// `new` one generation past `old` when its spec (anything but metadata and status) changed.
fn bump_generation(old: &Value, new: &mut Value) {
    if spec_changed(old, new) {
        let generation = old
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        new["metadata"]["generation"] = json!(generation + 1);
    }
}

/// Labels of an object as a map (non-string values are ignored).
pub fn labels_of(obj: &Value) -> BTreeMap<String, String> {
    obj.pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}
