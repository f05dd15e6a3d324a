//! Deletion as kube-apiserver does it: DeleteOptions (preconditions, grace period, propagation
//! policy), finalizers and `deletionTimestamp`, owner references.

use std::collections::HashMap;

use serde_json::Value;

use crate::resources::ResourceDef;
use crate::status::ApiError;
use crate::store::Outcome;

/// The finalizer an owner carries while its dependents are deleted in the foreground.
pub const FOREGROUND_FINALIZER: &str = "foregroundDeletion";

/// What happens to an owner's dependents.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Propagation {
    /// The owner goes at once; dependents are deleted after it (the default).
    #[default]
    Background,
    /// The owner stays (Terminating) until its dependents are gone.
    Foreground,
    /// Dependents stay and lose their owner reference.
    Orphan,
}

/// Parsed `DeleteOptions` (from the body, or the query as kubectl sends them).
#[derive(Clone, Debug, Default)]
pub struct DeleteOptions {
    /// `preconditions.uid`.
    pub uid: Option<String>,
    /// `preconditions.resourceVersion`.
    pub resource_version: Option<String>,
    /// `gracePeriodSeconds`.
    pub grace_period_seconds: Option<i64>,
    /// `propagationPolicy` (or the deprecated `orphanDependents`).
    pub propagation: Propagation,
    /// `dryRun=All`.
    pub dry_run: bool,
}

impl DeleteOptions {
    /// Reads the body's DeleteOptions, falling back to query parameters.
    pub fn parse(body: &Value, query: &HashMap<String, String>, dry_run: bool) -> Result<Self, ApiError> {
        let text = |pointer: &str| body.pointer(pointer).and_then(Value::as_str).map(str::to_string);
        let grace = match body.get("gracePeriodSeconds").and_then(Value::as_i64) {
            Some(g) => Some(g),
            None => match query.get("gracePeriodSeconds") {
                Some(raw) => Some(
                    raw.parse()
                        .map_err(|_| ApiError::bad_request(format!("invalid gracePeriodSeconds {raw:?}")))?,
                ),
                None => None,
            },
        };
        let policy = text("/propagationPolicy").or_else(|| query.get("propagationPolicy").cloned());
        let propagation = match policy.as_deref() {
            None | Some("") => {
                if body.get("orphanDependents").and_then(Value::as_bool) == Some(true) {
                    Propagation::Orphan
                } else {
                    Propagation::Background
                }
            }
            Some("Background") => Propagation::Background,
            Some("Foreground") => Propagation::Foreground,
            Some("Orphan") => Propagation::Orphan,
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "propagationPolicy: Unsupported value: {other:?}: supported values: \"Background\", \"Foreground\", \"Orphan\""
                )));
            }
        };
        Ok(Self {
            uid: text("/preconditions/uid"),
            resource_version: text("/preconditions/resourceVersion"),
            grace_period_seconds: grace,
            propagation,
            dry_run: dry_run
                || body
                    .get("dryRun")
                    .and_then(Value::as_array)
                    .is_some_and(|d| !d.is_empty()),
        })
    }

    /// 409 Conflict when a precondition does not hold.
    pub fn check_preconditions(
        &self,
        def: &ResourceDef,
        name: &str,
        current: &Value,
    ) -> Result<(), ApiError> {
        for (wanted, pointer, label) in [
            (&self.uid, "/metadata/uid", "UID"),
            (
                &self.resource_version,
                "/metadata/resourceVersion",
                "ResourceVersion",
            ),
        ] {
            let Some(wanted) = wanted else { continue };
            let actual = current.pointer(pointer).and_then(Value::as_str).unwrap_or("");
            if actual != wanted {
                return Err(ApiError::conflict(
                    def,
                    name,
                    &format!(
                        "Precondition failed: {label} in precondition: {wanted}, {label} in object meta: {actual}"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The grace period a Pod gets when it is scheduled (has a nodeName): it stays Terminating that
/// long, as it would while a kubelet stops it. `None`: deleted at once (unscheduled Pods, grace 0,
/// other kinds), as upstream.
pub fn pod_grace(def: &ResourceDef, pod: &Value, requested: Option<i64>) -> Option<i64> {
    if def.kind != "Pod"
        || pod
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
    {
        return None;
    }
    let default = pod
        .pointer("/spec/terminationGracePeriodSeconds")
        .and_then(Value::as_i64)
        .unwrap_or(30);
    let grace = requested.unwrap_or(default);
    (grace > 0).then_some(grace)
}

/// Whether an object lists `owner_uid` among its ownerReferences.
pub fn owned_by(obj: &Value, owner_uid: &str) -> bool {
    obj.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .is_some_and(|refs| {
            refs.iter()
                .any(|r| r.get("uid").and_then(Value::as_str) == Some(owner_uid))
        })
}

/// Whether an object carries a finalizer.
pub fn has_finalizer(obj: &Value, finalizer: &str) -> bool {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| f.iter().any(|x| x.as_str() == Some(finalizer)))
}

/// The outcome of removing a finalizer: the object goes when it was terminating and none remain.
pub fn without_finalizer(obj: &Value, finalizer: &str) -> Outcome {
    let mut next = obj.clone();
    if let Some(Value::Array(list)) = next.pointer_mut("/metadata/finalizers") {
        list.retain(|f| f.as_str() != Some(finalizer));
    }
    finalized(next)
}

/// An updated object that is terminating and has no finalizer left is removed.
pub fn finalized(next: Value) -> Outcome {
    let terminating = next
        .pointer("/metadata/deletionTimestamp")
        .is_some_and(|v| !v.is_null());
    let remaining = next
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty());
    if terminating && !remaining {
        Outcome::Delete
    } else {
        Outcome::Put(next)
    }
}
