//! Protobuf request bodies (`application/vnd.kubernetes.protobuf`), as kubectl's imperative
//! commands send them (`kubectl create namespace`, `create configmap`, `create secret generic`,
//! `create serviceaccount`, `create quota`). The envelope is the `k8s\0` magic and a `runtime.Unknown` whose `raw`
//! holds the object; it is decoded with k8s-pb's generated types and turned into the JSON form the
//! rest of devcluster works on. Besides those, RBAC objects (`kubectl create role|clusterrole|
//! rolebinding|clusterrolebinding`), TokenRequest (`kubectl create token`) and the reviews
//! (`kubectl auth can-i|whoami`). Other kinds are answered 415, never mis-decoded.

use base64::Engine as _;
use k8s_pb::api::core::v1::{ConfigMap, Namespace, ResourceQuota, Secret, ServiceAccount};
use k8s_pb::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_pb::apimachinery::pkg::runtime::Unknown;
use prost::Message;
use serde_json::{Map, Value, json};

use crate::status::ApiError;

/// The media type of protobuf bodies.
pub const PROTOBUF: &str = "application/vnd.kubernetes.protobuf";
const MAGIC: &[u8] = b"k8s\0";

fn metadata(meta: Option<ObjectMeta>) -> Value {
    let meta = meta.unwrap_or_default();
    let mut out = Map::new();
    for (key, value) in [
        ("name", meta.name),
        ("generateName", meta.generate_name),
        ("namespace", meta.namespace),
    ] {
        if let Some(v) = value.filter(|v| !v.is_empty()) {
            out.insert(key.into(), json!(v));
        }
    }
    if !meta.labels.is_empty() {
        out.insert("labels".into(), json!(meta.labels));
    }
    if !meta.annotations.is_empty() {
        out.insert("annotations".into(), json!(meta.annotations));
    }
    if !meta.finalizers.is_empty() {
        out.insert("finalizers".into(), json!(meta.finalizers));
    }
    Value::Object(out)
}

/// An `intstr.IntOrString` as JSON: a number (type 0) or a string (type 1).
fn int_or_string(value: k8s_pb::apimachinery::pkg::util::intstr::IntOrString) -> Value {
    match value.r#type {
        Some(1) => json!(value.str_val.unwrap_or_default()),
        _ => json!(value.int_val.unwrap_or_default()),
    }
}

/// A `metav1.LabelSelector` as JSON.
fn label_selector(selector: k8s_pb::apimachinery::pkg::apis::meta::v1::LabelSelector) -> Value {
    let mut out = json!({});
    if !selector.match_labels.is_empty() {
        out["matchLabels"] = json!(selector.match_labels);
    }
    if !selector.match_expressions.is_empty() {
        out["matchExpressions"] = selector
            .match_expressions
            .into_iter()
            .map(|e| {
                let mut requirement =
                    json!({"key": e.key.unwrap_or_default(), "operator": e.operator.unwrap_or_default()});
                if !e.values.is_empty() {
                    requirement["values"] = json!(e.values);
                }
                requirement
            })
            .collect();
    }
    out
}

fn b64(map: &std::collections::BTreeMap<String, Vec<u8>>) -> Value {
    map.iter()
        .map(|(k, v)| {
            (
                k.clone(),
                json!(base64::engine::general_purpose::STANDARD.encode(v)),
            )
        })
        .collect::<Map<_, _>>()
        .into()
}

fn rules(rules: Vec<k8s_pb::api::rbac::v1::PolicyRule>) -> Value {
    rules
        .into_iter()
        .map(|r| {
            let mut out = Map::new();
            for (key, list) in [
                ("verbs", r.verbs),
                ("apiGroups", r.api_groups),
                ("resources", r.resources),
                ("resourceNames", r.resource_names),
                ("nonResourceURLs", r.non_resource_ur_ls),
            ] {
                if !list.is_empty() || key == "verbs" {
                    out.insert(key.into(), json!(list));
                }
            }
            Value::Object(out)
        })
        .collect()
}

fn binding(
    subjects: Vec<k8s_pb::api::rbac::v1::Subject>,
    role_ref: Option<k8s_pb::api::rbac::v1::RoleRef>,
) -> (Value, Value) {
    let subjects = subjects
        .into_iter()
        .map(|s| {
            let mut out = json!({"kind": s.kind, "name": s.name});
            if let Some(g) = s.api_group.filter(|g| !g.is_empty()) {
                out["apiGroup"] = json!(g);
            }
            if let Some(ns) = s.namespace.filter(|n| !n.is_empty()) {
                out["namespace"] = json!(ns);
            }
            out
        })
        .collect();
    let role_ref = role_ref.unwrap_or_default();
    (
        subjects,
        json!({"apiGroup": role_ref.api_group, "kind": role_ref.kind, "name": role_ref.name}),
    )
}

fn resource_attributes(a: k8s_pb::api::authorization::v1::ResourceAttributes) -> Value {
    json!({
        "namespace": a.namespace.unwrap_or_default(), "verb": a.verb.unwrap_or_default(),
        "group": a.group.unwrap_or_default(), "version": a.version.unwrap_or_default(),
        "resource": a.resource.unwrap_or_default(), "subresource": a.subresource.unwrap_or_default(),
        "name": a.name.unwrap_or_default(),
    })
}

fn access_spec(
    resource: Option<k8s_pb::api::authorization::v1::ResourceAttributes>,
    non_resource: Option<k8s_pb::api::authorization::v1::NonResourceAttributes>,
) -> Value {
    let mut spec = Map::new();
    if let Some(r) = resource {
        spec.insert("resourceAttributes".into(), resource_attributes(r));
    }
    if let Some(n) = non_resource {
        spec.insert(
            "nonResourceAttributes".into(),
            json!({"path": n.path.unwrap_or_default(), "verb": n.verb.unwrap_or_default()}),
        );
    }
    Value::Object(spec)
}

fn bad(kind: &str, e: prost::DecodeError) -> ApiError {
    ApiError::bad_request(format!("the protobuf body is not a valid {kind}: {e}"))
}

/// Decodes a protobuf body into the JSON object it carries.
pub fn decode(body: &[u8]) -> Result<Value, ApiError> {
    let rest = body
        .strip_prefix(MAGIC)
        .ok_or_else(|| ApiError::bad_request("the protobuf body does not start with the k8s magic number"))?;
    let unknown = Unknown::decode(rest).map_err(|e| bad("runtime.Unknown envelope", e))?;
    let type_meta = unknown.type_meta.unwrap_or_default();
    let (api_version, kind) = (
        type_meta.api_version.unwrap_or_default(),
        type_meta.kind.unwrap_or_default(),
    );
    let raw = unknown.raw.unwrap_or_default();
    let mut obj = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => {
            let ns = Namespace::decode(raw.as_slice()).map_err(|e| bad("Namespace", e))?;
            json!({"metadata": metadata(ns.metadata)})
        }
        ("v1", "ConfigMap") => {
            let cm = ConfigMap::decode(raw.as_slice()).map_err(|e| bad("ConfigMap", e))?;
            let mut obj = json!({"metadata": metadata(cm.metadata), "data": cm.data});
            if !cm.binary_data.is_empty() {
                obj["binaryData"] = b64(&cm.binary_data);
            }
            if let Some(immutable) = cm.immutable {
                obj["immutable"] = json!(immutable);
            }
            obj
        }
        ("v1", "Secret") => {
            let secret = Secret::decode(raw.as_slice()).map_err(|e| bad("Secret", e))?;
            let mut obj = json!({"metadata": metadata(secret.metadata), "data": b64(&secret.data)});
            if !secret.string_data.is_empty() {
                obj["stringData"] = json!(secret.string_data);
            }
            if let Some(t) = secret.r#type.filter(|t| !t.is_empty()) {
                obj["type"] = json!(t);
            }
            obj
        }
        ("v1", "ServiceAccount") => {
            let sa = ServiceAccount::decode(raw.as_slice()).map_err(|e| bad("ServiceAccount", e))?;
            let mut obj = json!({"metadata": metadata(sa.metadata)});
            if let Some(auto) = sa.automount_service_account_token {
                obj["automountServiceAccountToken"] = json!(auto);
            }
            obj
        }
        ("v1", "ResourceQuota") => {
            let quota = ResourceQuota::decode(raw.as_slice()).map_err(|e| bad("ResourceQuota", e))?;
            let spec = quota.spec.unwrap_or_default();
            if spec.scope_selector.is_some() {
                return Err(ApiError::bad_request(
                    "ResourceQuota spec.scopeSelector is not decoded from protobuf by devcluster: send the quota as JSON or YAML",
                ));
            }
            let hard: Map<String, Value> = spec
                .hard
                .into_iter()
                .map(|(resource, quantity)| (resource, json!(quantity.string.unwrap_or_default())))
                .collect();
            let mut spec_json = json!({"hard": hard});
            if !spec.scopes.is_empty() {
                spec_json["scopes"] = json!(spec.scopes);
            }
            json!({"metadata": metadata(quota.metadata), "spec": spec_json})
        }
        ("policy/v1", "PodDisruptionBudget") => {
            let budget = k8s_pb::api::policy::v1::PodDisruptionBudget::decode(raw.as_slice())
                .map_err(|e| bad("PodDisruptionBudget", e))?;
            let spec = budget.spec.unwrap_or_default();
            let mut spec_json = json!({});
            for (key, value) in [
                ("minAvailable", spec.min_available),
                ("maxUnavailable", spec.max_unavailable),
            ] {
                if let Some(value) = value {
                    spec_json[key] = int_or_string(value);
                }
            }
            if let Some(selector) = spec.selector {
                spec_json["selector"] = label_selector(selector);
            }
            if let Some(policy) = spec.unhealthy_pod_eviction_policy.filter(|p| !p.is_empty()) {
                spec_json["unhealthyPodEvictionPolicy"] = json!(policy);
            }
            json!({"metadata": metadata(budget.metadata), "spec": spec_json})
        }
        ("rbac.authorization.k8s.io/v1", "Role") => {
            let r = k8s_pb::api::rbac::v1::Role::decode(raw.as_slice()).map_err(|e| bad("Role", e))?;
            json!({"metadata": metadata(r.metadata), "rules": rules(r.rules)})
        }
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
            let r = k8s_pb::api::rbac::v1::ClusterRole::decode(raw.as_slice())
                .map_err(|e| bad("ClusterRole", e))?;
            json!({"metadata": metadata(r.metadata), "rules": rules(r.rules)})
        }
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
            let b = k8s_pb::api::rbac::v1::RoleBinding::decode(raw.as_slice())
                .map_err(|e| bad("RoleBinding", e))?;
            let (subjects, role_ref) = binding(b.subjects, b.role_ref);
            json!({"metadata": metadata(b.metadata), "subjects": subjects, "roleRef": role_ref})
        }
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            let b = k8s_pb::api::rbac::v1::ClusterRoleBinding::decode(raw.as_slice())
                .map_err(|e| bad("ClusterRoleBinding", e))?;
            let (subjects, role_ref) = binding(b.subjects, b.role_ref);
            json!({"metadata": metadata(b.metadata), "subjects": subjects, "roleRef": role_ref})
        }
        ("authentication.k8s.io/v1", "TokenRequest") => {
            let t = k8s_pb::api::authentication::v1::TokenRequest::decode(raw.as_slice())
                .map_err(|e| bad("TokenRequest", e))?;
            let spec = t.spec.unwrap_or_default();
            let mut out = json!({"metadata": metadata(t.metadata), "spec": {"audiences": spec.audiences}});
            if let Some(seconds) = spec.expiration_seconds {
                out["spec"]["expirationSeconds"] = json!(seconds);
            }
            out
        }
        ("authentication.k8s.io/v1", "SelfSubjectReview") => {
            let r = k8s_pb::api::authentication::v1::SelfSubjectReview::decode(raw.as_slice())
                .map_err(|e| bad("SelfSubjectReview", e))?;
            json!({"metadata": metadata(r.metadata)})
        }
        ("authorization.k8s.io/v1", "SelfSubjectAccessReview") => {
            let r = k8s_pb::api::authorization::v1::SelfSubjectAccessReview::decode(raw.as_slice())
                .map_err(|e| bad("SelfSubjectAccessReview", e))?;
            let spec = r.spec.unwrap_or_default();
            json!({"metadata": metadata(r.metadata), "spec": access_spec(spec.resource_attributes, spec.non_resource_attributes)})
        }
        ("authorization.k8s.io/v1", "SelfSubjectRulesReview") => {
            let r = k8s_pb::api::authorization::v1::SelfSubjectRulesReview::decode(raw.as_slice())
                .map_err(|e| bad("SelfSubjectRulesReview", e))?;
            let ns = r.spec.unwrap_or_default().namespace.unwrap_or_default();
            json!({"metadata": metadata(r.metadata), "spec": {"namespace": ns}})
        }
        ("authorization.k8s.io/v1", "SubjectAccessReview") => {
            let r = k8s_pb::api::authorization::v1::SubjectAccessReview::decode(raw.as_slice())
                .map_err(|e| bad("SubjectAccessReview", e))?;
            let spec = r.spec.unwrap_or_default();
            let mut out = access_spec(spec.resource_attributes, spec.non_resource_attributes);
            out["user"] = json!(spec.user.unwrap_or_default());
            out["groups"] = json!(spec.groups);
            json!({"metadata": metadata(r.metadata), "spec": out})
        }
        _ => {
            return Err(ApiError::unsupported_media_type(&format!(
                "{PROTOBUF} for {api_version}/{kind} (devcluster decodes protobuf only for Namespace, ConfigMap, Secret, ServiceAccount, ResourceQuota, PodDisruptionBudget, RBAC objects, TokenRequest and the access reviews)"
            )));
        }
    };
    obj["apiVersion"] = json!(api_version);
    obj["kind"] = json!(kind);
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_pb::apimachinery::pkg::runtime::TypeMeta;

    fn envelope(kind: &str, raw: Vec<u8>) -> Vec<u8> {
        let unknown = Unknown {
            type_meta: Some(TypeMeta {
                api_version: Some("v1".into()),
                kind: Some(kind.into()),
            }),
            raw: Some(raw),
            content_encoding: Some(String::new()),
            content_type: Some(String::new()),
        };
        [MAGIC.to_vec(), unknown.encode_to_vec()].concat()
    }

    #[test]
    fn decodes_a_config_map() {
        let cm = ConfigMap {
            metadata: Some(ObjectMeta {
                name: Some("x".into()),
                ..Default::default()
            }),
            data: [("a".to_string(), "b".to_string())].into(),
            ..Default::default()
        };
        let obj = decode(&envelope("ConfigMap", cm.encode_to_vec())).unwrap();
        assert_eq!(
            obj,
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": "b"}})
        );
    }

    #[test]
    fn refuses_what_it_cannot_decode() {
        assert_eq!(decode(&envelope("Pod", vec![])).unwrap_err().code, 415);
        assert_eq!(decode(b"{}").unwrap_err().code, 400);
        assert_eq!(
            decode(&[MAGIC, &[0xff, 0xff][..]].concat()).unwrap_err().code,
            400
        );
    }
}
