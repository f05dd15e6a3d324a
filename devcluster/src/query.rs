//! What a list or watch asks for: label and field selectors, and pagination.

use std::collections::HashMap;

use rcsync_core::LabelSelector;
use serde_json::Value;

use crate::admission::labels_of;
use crate::resources::ResourceDef;
use crate::status::ApiError;

/// A parsed `fieldSelector`: `field=value`, `field==value`, `field!=value`, comma-separated.
pub(crate) struct FieldSelector(Vec<(String, String, bool)>);

impl FieldSelector {
    fn parse(def: &ResourceDef, raw: &str) -> Result<Self, ApiError> {
        let mut terms = Vec::new();
        for term in raw.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (field, value, equal) = if let Some((f, v)) = term.split_once("!=") {
                (f, v, false)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, v, true)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, v, true)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid field selector {raw:?}: {term:?} has no operator"
                )));
            };
            let field = field.trim();
            let path = match field {
                "metadata.name" | "metadata.namespace" => field.to_string(),
                _ => match def.fields.iter().find(|(f, _)| *f == field) {
                    Some((_, path)) => path.to_string(),
                    None => {
                        return Err(ApiError::bad_request(format!(
                            "field label not supported: {field}"
                        )));
                    }
                },
            };
            terms.push((path, value.trim().to_string(), equal));
        }
        Ok(Self(terms))
    }

    fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(path, value, equal)| {
            let pointer = format!("/{}", path.replace('.', "/"));
            let actual = match obj.pointer(&pointer) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Bool(b)) => b.to_string(),
                Some(Value::Number(n)) => n.to_string(),
                _ => String::new(),
            };
            (actual == *value) == *equal
        })
    }
}

pub(crate) struct Filter {
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    pub(crate) fn new(
        def: &ResourceDef,
        namespace: Option<String>,
        q: &HashMap<String, String>,
    ) -> Result<Self, ApiError> {
        let labels = match q.get("labelSelector") {
            Some(raw) => LabelSelector::parse(raw).map_err(ApiError::bad_request)?,
            None => LabelSelector::everything(),
        };
        let fields = match q.get("fieldSelector") {
            Some(raw) => FieldSelector::parse(def, raw)?,
            None => FieldSelector(Vec::new()),
        };
        Ok(Self {
            namespace,
            labels,
            fields,
        })
    }

    pub(crate) fn matches(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace
            && obj.pointer("/metadata/namespace").and_then(Value::as_str) != Some(ns)
        {
            return false;
        }
        self.labels.matches(&labels_of(obj)) && self.fields.matches(obj)
    }
}

pub(crate) fn object_key(obj: &Value) -> (String, String) {
    let text = |p: &str| obj.pointer(p).and_then(Value::as_str).unwrap_or("").to_string();
    (text("/metadata/namespace"), text("/metadata/name"))
}

/// `limit` and `continue` of a list. The continue token is the last key returned (base64 JSON);
/// the next page starts after it in the current state (devcluster keeps no snapshots).
pub(crate) struct Page {
    pub(crate) limit: Option<usize>,
    pub(crate) after: Option<(String, String)>,
}

impl Page {
    pub(crate) fn parse(q: &HashMap<String, String>) -> Result<Self, ApiError> {
        use base64::Engine as _;
        let limit = match q.get("limit").map(String::as_str) {
            None | Some("") | Some("0") => None,
            Some(raw) => Some(
                raw.parse()
                    .map_err(|_| ApiError::bad_request(format!("invalid limit {raw:?}")))?,
            ),
        };
        let after = match q.get("continue").filter(|c| !c.is_empty()) {
            None => None,
            Some(token) => {
                let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(token)
                    .map_err(|_| ApiError::bad_request("continue key is not valid"))?;
                Some(
                    serde_json::from_slice(&bytes)
                        .map_err(|_| ApiError::bad_request("continue key is not valid"))?,
                )
            }
        };
        Ok(Self { limit, after })
    }

    pub(crate) fn token(key: &(String, String)) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(key).expect("a key serializes"))
    }
}
