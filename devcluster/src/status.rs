//! API errors as `metav1.Status`, with kube-apiserver's codes, reasons and messages.

use serde_json::{Value, json};

use crate::resources::ResourceDef;

/// One field problem of an Invalid error.
#[derive(Clone, Debug)]
pub struct Cause {
    /// `FieldValueInvalid`, `FieldValueRequired`, `FieldValueForbidden`, `FieldValueNotSupported`, ...
    pub reason: &'static str,
    /// The field path, e.g. `metadata.name`.
    pub field: String,
    /// The message, e.g. `Invalid value: "X": ...`.
    pub message: String,
}

impl Cause {
    /// An invalid value.
    pub fn invalid(field: impl Into<String>, value: &Value, detail: impl std::fmt::Display) -> Self {
        let shown = match value {
            Value::String(s) => format!("{s:?}"),
            other => other.to_string(),
        };
        Self {
            reason: "FieldValueInvalid",
            field: field.into(),
            message: format!("Invalid value: {shown}: {detail}"),
        }
    }

    /// A value outside the ones the field takes, listed as upstream lists them.
    pub fn not_supported(field: impl Into<String>, value: &Value, supported: &[&str]) -> Self {
        let supported: Vec<String> = supported.iter().map(|s| format!("{s:?}")).collect();
        Self {
            reason: "FieldValueNotSupported",
            field: field.into(),
            message: format!(
                "Unsupported value: {value}: supported values: {}",
                supported.join(", ")
            ),
        }
    }

    /// A missing required value.
    pub fn required(field: impl Into<String>, detail: &str) -> Self {
        let message = if detail.is_empty() {
            "Required value".to_string()
        } else {
            format!("Required value: {detail}")
        };
        Self {
            reason: "FieldValueRequired",
            field: field.into(),
            message,
        }
    }

    /// An unknown field (strict field validation).
    pub fn unknown_field(field: impl Into<String>) -> Self {
        let field = field.into();
        Self {
            reason: "FieldValueInvalid",
            message: format!("unknown field {field:?}"),
            field,
        }
    }
}

/// An error answered as a `Status` object.
#[derive(Clone, Debug)]
pub struct ApiError {
    /// HTTP status code.
    pub code: u16,
    /// `metav1.StatusReason`.
    pub reason: &'static str,
    /// Human-readable message.
    pub message: String,
    /// `details`, when the error is about one object.
    pub details: Option<Value>,
}

fn details(def: &ResourceDef, name: &str) -> Value {
    json!({"name": name, "group": def.group, "kind": def.plural})
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    /// 404 for an object.
    pub fn not_found(def: &ResourceDef, name: &str) -> Self {
        Self {
            details: Some(details(def, name)),
            ..Self::new(404, "NotFound", format!("{} {name:?} not found", def.qualified()))
        }
    }

    /// 404 for a URL that names nothing served.
    pub fn not_found_path(path: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        )
    }

    /// 409 AlreadyExists.
    pub fn already_exists(def: &ResourceDef, name: &str) -> Self {
        Self {
            details: Some(details(def, name)),
            ..Self::new(
                409,
                "AlreadyExists",
                format!("{} {name:?} already exists", def.qualified()),
            )
        }
    }

    /// 409 Conflict on a stale resourceVersion or a failed precondition.
    pub fn conflict(def: &ResourceDef, name: &str, why: &str) -> Self {
        Self {
            details: Some(details(def, name)),
            ..Self::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} {name:?}: {why}",
                    def.qualified()
                ),
            )
        }
    }

    /// The standard stale-resourceVersion conflict.
    pub fn stale(def: &ResourceDef, name: &str) -> Self {
        Self::conflict(
            def,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    /// 409 Conflict of a server-side apply with other field managers.
    pub fn apply_conflict(def: &ResourceDef, name: &str, conflicts: &[crate::managed::Conflict]) -> Self {
        let (message, causes) = crate::managed::conflict_message(conflicts);
        let causes: Vec<Value> = causes
            .into_iter()
            .map(|(field, message)| json!({"reason": "FieldManagerConflict", "message": message, "field": field}))
            .collect();
        Self {
            details: Some(json!({"name": name, "group": def.group, "kind": def.plural, "causes": causes})),
            ..Self::new(409, "Conflict", message)
        }
    }

    /// 422 Invalid with field causes.
    pub fn invalid(def: &ResourceDef, name: &str, causes: Vec<Cause>) -> Self {
        let summary = causes
            .iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect::<Vec<_>>();
        let summary = if summary.len() == 1 {
            summary[0].clone()
        } else {
            format!("[{}]", summary.join(", "))
        };
        let causes_json: Vec<Value> = causes
            .iter()
            .map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field}))
            .collect();
        Self {
            details: Some(json!({"name": name, "group": def.group, "kind": def.kind, "causes": causes_json})),
            ..Self::new(
                422,
                "Invalid",
                format!("{} {name:?} is invalid: {summary}", def.qualified_kind()),
            )
        }
    }

    /// 410 Gone for a compacted resourceVersion.
    pub fn gone(requested: u64, oldest: u64) -> Self {
        Self::new(
            410,
            "Expired",
            format!("too old resource version: {requested} ({oldest})"),
        )
    }

    /// 403 Forbidden by admission.
    pub fn forbidden(def: &ResourceDef, name: &str, why: &str) -> Self {
        Self {
            details: Some(details(def, name)),
            ..Self::new(
                403,
                "Forbidden",
                format!("{} {name:?} is forbidden: {why}", def.qualified()),
            )
        }
    }

    /// 403 from RBAC, with upstream's message (`pods "x" is forbidden: User "u" cannot get ...`).
    pub fn forbidden_by_rbac(def: &ResourceDef, name: &str, why: &str) -> Self {
        let subject = if name.is_empty() {
            def.qualified()
        } else {
            format!("{} {name:?}", def.qualified())
        };
        Self {
            details: Some(details(def, name)),
            ..Self::new(403, "Forbidden", format!("{subject} is forbidden: {why}"))
        }
    }

    /// 403 for a non-resource path.
    pub fn forbidden_path(why: &str) -> Self {
        Self::new(403, "Forbidden", why.to_string())
    }

    /// 401.
    pub fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized")
    }

    /// 400 BadRequest.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// 422 for a request (not an object) that is invalid, e.g. a watch with conflicting options.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(422, "Invalid", message)
    }

    /// 405.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({method} {path})"),
        )
    }

    /// 406: only formats we cannot produce were acceptable.
    pub fn not_acceptable(accept: &str) -> Self {
        Self::new(
            406,
            "NotAcceptable",
            format!(
                "only the following media types are accepted: application/json, application/yaml (asked for {accept})"
            ),
        )
    }

    /// 413.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            413,
            "RequestEntityTooLarge",
            format!("Request entity too large: limit is {limit}"),
        )
    }

    /// 415.
    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml, application/vnd.kubernetes.protobuf (Namespace, ConfigMap, Secret, ServiceAccount), application/merge-patch+json, application/json-patch+json, application/strategic-merge-patch+json, application/apply-patch+yaml (got {content_type})"
            ),
        )
    }

    /// 429 for an eviction a PodDisruptionBudget does not allow, with upstream's cause.
    pub fn disruption_budget(pod: &str, budget: &str, desired_healthy: i64, current_healthy: i64) -> Self {
        Self {
            details: Some(json!({
                "name": pod, "group": "", "kind": "pods",
                "causes": [{
                    "reason": "DisruptionBudget",
                    "message": format!(
                        "The disruption budget {budget} needs {desired_healthy} healthy pods and has {current_healthy} currently"
                    ),
                }],
            })),
            ..Self::new(
                429,
                "TooManyRequests",
                "Cannot evict pod as it would violate the pod's disruption budget.",
            )
        }
    }

    /// 503: the server is shutting down and takes no more writes.
    pub fn shutting_down() -> Self {
        Self::new(503, "ServiceUnavailable", "apiserver is shutting down")
    }

    /// 500.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", message)
    }

    /// The `Status` object.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}
