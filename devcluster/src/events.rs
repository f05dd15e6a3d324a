//! Events are one store with two views, as upstream: objects are stored as core/v1 Events and read
//! or written through events.k8s.io/v1 with upstream's field conversion.
//!
//! | core/v1            | events.k8s.io/v1         |
//! |--------------------|--------------------------|
//! | message            | note                     |
//! | involvedObject     | regarding                |
//! | source             | deprecatedSource         |
//! | reportingComponent | reportingController      |
//! | firstTimestamp     | deprecatedFirstTimestamp |
//! | lastTimestamp      | deprecatedLastTimestamp  |
//! | count              | deprecatedCount          |
//! | series, eventTime, action, reason, type, related, reportingInstance: same names |

use serde_json::{Map, Value};

/// (core/v1 name, events.k8s.io/v1 name) of renamed fields.
const RENAMES: &[(&str, &str)] = &[
    ("message", "note"),
    ("involvedObject", "regarding"),
    ("source", "deprecatedSource"),
    ("reportingComponent", "reportingController"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("count", "deprecatedCount"),
];

/// Fields with the same name in both versions.
const SAME: &[&str] = &[
    "metadata",
    "series",
    "eventTime",
    "action",
    "reason",
    "type",
    "related",
    "reportingInstance",
];

fn convert(obj: &Value, api_version: &str, from_core: bool) -> Value {
    let mut out = Map::new();
    out.insert("kind".into(), Value::String("Event".into()));
    out.insert("apiVersion".into(), Value::String(api_version.into()));
    let Some(src) = obj.as_object() else {
        return Value::Object(out);
    };
    for key in SAME {
        if let Some(v) = src.get(*key) {
            out.insert((*key).into(), v.clone());
        }
    }
    for (core, v1) in RENAMES {
        let (from, to) = if from_core { (core, v1) } else { (v1, core) };
        if let Some(v) = src.get(*from)
            && !v.is_null()
        {
            out.insert((*to).into(), v.clone());
        }
    }
    Value::Object(out)
}

/// A stored core/v1 Event as an events.k8s.io/v1 Event.
pub fn to_events_v1(core: &Value) -> Value {
    convert(core, "events.k8s.io/v1", true)
}

/// An events.k8s.io/v1 Event as the core/v1 Event it is stored as.
pub fn to_core_v1(v1: &Value) -> Value {
    convert(v1, "v1", false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trip() {
        let v1 = json!({
            "kind": "Event", "apiVersion": "events.k8s.io/v1",
            "metadata": {"name": "p.1", "namespace": "default"},
            "note": "did not sync", "reason": "SyncWarning", "type": "Warning",
            "regarding": {"kind": "Pod", "name": "p", "namespace": "default"},
            "reportingController": "pod-syncer", "reportingInstance": "pod-syncer",
            "series": {"count": 2, "lastObservedTime": "2026-01-01T00:00:00.000000Z"},
            "eventTime": "2026-01-01T00:00:00.000000Z", "action": "Sync"
        });
        let core = to_core_v1(&v1);
        assert_eq!(core["message"], "did not sync");
        assert_eq!(core["involvedObject"]["name"], "p");
        assert_eq!(core["reportingComponent"], "pod-syncer");
        assert_eq!(core["apiVersion"], "v1");
        assert_eq!(to_events_v1(&core), v1);
    }
}
