//! Protobuf request bodies (`application/vnd.kubernetes.protobuf`), as kubectl's imperative
//! commands send them (`kubectl create namespace`, `create configmap`, `create secret generic`,
//! `create serviceaccount`). The envelope is the `k8s\0` magic and a `runtime.Unknown` whose `raw`
//! holds the object; it is decoded with k8s-pb's generated types and turned into the JSON form the
//! rest of devcluster works on. Other kinds are answered 415, never mis-decoded.

use base64::Engine as _;
use k8s_pb::api::core::v1::{ConfigMap, Namespace, Secret, ServiceAccount};
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
        _ => {
            return Err(ApiError::unsupported_media_type(&format!(
                "{PROTOBUF} for {api_version}/{kind} (devcluster decodes protobuf only for Namespace, ConfigMap, Secret and ServiceAccount)"
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
