//! Patches (`sync.fromHost.runtimeClasses.patches`): paths into an object, and what each mode does
//! to the value there.
//!
//! ```text
//!  PatchSpec ──compile (once per config)──► TenantPatches { engine, [CompiledPatch] }
//!  host object ──to_virtual──► for each patch: resolve path ──► expression / labels / reference
//!                                                           └─► the virtual copy (or a PatchError)
//! ```
//!
//! Paths: `handler`, `metadata.labels.team`, `scheduling.nodeSelector["kubernetes.io/arch"]`,
//! `scheduling.tolerations[*].key`, `scheduling.tolerations[0]`. A path whose parent does not
//! exist is not applied; a missing leaf under an existing parent runs the expression with
//! `valueExists = false`, and the expression may create it. `null`/`undefined` removes the field.
//!
//! Modes, for runtime classes (host → virtual):
//! * `expression`: JavaScript (see [`crate::script`]) mapping the host value to the virtual one.
//!   `reverseExpression` is compiled and syntax-checked; runtime class names that flow back (a
//!   Pod's `runtimeClassName`) are translated through the forward mapping the host agent holds,
//!   which is exact and runs no script per request.
//! * `labels`: the value is a label map or a label selector; runtime class labels are synced
//!   unchanged, so its keys are kept as they are (validated as label keys).
//! * `reference`: the value names another object; a namespaced object's name is translated with
//!   the host naming rule, a cluster-scoped one is kept.

use std::fmt;

use serde_json::{Map, Value, json};

use crate::config::{PatchMode, PatchSpec, ReferenceSpec};
use crate::labels::validate_label_key;
use crate::naming::host_pod_name;
use crate::script::{Script, ScriptEngine, ScriptError, ScriptLimits};

/// One step of a patch path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    /// An object field (`a.b`, `a["b.c"]`).
    Field(String),
    /// An array element (`a[0]`).
    Index(usize),
    /// Every array element (`a[*]`).
    Wildcard,
}

/// A parsed patch path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PatchPath {
    segments: Vec<Segment>,
    text: String,
}

impl fmt::Display for PatchPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl PatchPath {
    /// Parses `a.b["c.d"][0][*].e`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut segments = Vec::new();
        let chars: Vec<char> = text.chars().collect();
        let mut i = 0;
        let mut field = String::new();
        let flush = |field: &mut String, segments: &mut Vec<Segment>| {
            if !field.is_empty() {
                segments.push(Segment::Field(std::mem::take(field)));
            }
        };
        while i < chars.len() {
            match chars[i] {
                '.' => {
                    let after_bracket = i > 0 && chars[i - 1] == ']';
                    if field.is_empty() && !after_bracket {
                        return Err(format!("invalid path {text:?}: empty field name at position {i}"));
                    }
                    flush(&mut field, &mut segments);
                    i += 1;
                    if i == chars.len() {
                        return Err(format!("invalid path {text:?}: it ends with '.'"));
                    }
                }
                '[' => {
                    flush(&mut field, &mut segments);
                    let close = chars[i..]
                        .iter()
                        .position(|c| *c == ']')
                        .map(|p| p + i)
                        .ok_or_else(|| format!("invalid path {text:?}: '[' at position {i} is not closed"))?;
                    let inner: String = chars[i + 1..close].iter().collect();
                    let segment = if inner == "*" {
                        Segment::Wildcard
                    } else if let Some(key) = inner
                        .strip_prefix('"')
                        .and_then(|s| s.strip_suffix('"'))
                        .or_else(|| inner.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')))
                    {
                        Segment::Field(key.to_string())
                    } else if let Ok(n) = inner.parse::<usize>() {
                        Segment::Index(n)
                    } else {
                        return Err(format!(
                            "invalid path {text:?}: [{inner}] must be [*], a number, or a quoted key like [\"a.b\"]"
                        ));
                    };
                    segments.push(segment);
                    i = close + 1;
                }
                c => {
                    field.push(c);
                    i += 1;
                }
            }
        }
        flush(&mut field, &mut segments);
        if segments.is_empty() {
            return Err("the path is empty".into());
        }
        Ok(Self {
            segments,
            text: text.to_string(),
        })
    }

    /// The segments.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Every concrete location the path names in `doc` whose parent exists, as JSON pointers
    /// (wildcards expanded). A location's leaf may be missing.
    pub fn locations(&self, doc: &Value) -> Vec<Vec<Segment>> {
        let mut out = Vec::new();
        walk(doc, &self.segments, &mut Vec::new(), &mut out);
        out
    }
}

fn walk(node: &Value, rest: &[Segment], at: &mut Vec<Segment>, out: &mut Vec<Vec<Segment>>) {
    let Some((first, tail)) = rest.split_first() else {
        return;
    };
    let last = tail.is_empty();
    match (first, node) {
        (Segment::Field(name), Value::Object(map)) => {
            at.push(first.clone());
            match map.get(name) {
                Some(child) if !last => walk(child, tail, at, out),
                None if !last => {}
                _ => out.push(at.clone()),
            }
            at.pop();
        }
        (Segment::Index(i), Value::Array(items)) if *i < items.len() => {
            at.push(first.clone());
            if last {
                out.push(at.clone());
            } else {
                walk(&items[*i], tail, at, out);
            }
            at.pop();
        }
        (Segment::Wildcard, Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                at.push(Segment::Index(i));
                if last {
                    out.push(at.clone());
                } else {
                    walk(item, tail, at, out);
                }
                at.pop();
            }
        }
        _ => {}
    }
}

fn get<'a>(doc: &'a Value, at: &[Segment]) -> Option<&'a Value> {
    at.iter().try_fold(doc, |node, seg| match seg {
        Segment::Field(f) => node.get(f),
        Segment::Index(i) => node.get(*i),
        Segment::Wildcard => None,
    })
}

fn set(doc: &mut Value, at: &[Segment], value: Option<Value>) {
    let Some((last, parents)) = at.split_last() else {
        return;
    };
    let mut node = doc;
    for seg in parents {
        node = match seg {
            Segment::Field(f) => match node.get_mut(f) {
                Some(n) => n,
                None => return,
            },
            Segment::Index(i) => match node.get_mut(*i) {
                Some(n) => n,
                None => return,
            },
            Segment::Wildcard => return,
        };
    }
    match (last, node, value) {
        (Segment::Field(f), Value::Object(map), Some(v)) => {
            map.insert(f.clone(), v);
        }
        (Segment::Field(f), Value::Object(map), None) => {
            map.remove(f);
        }
        (Segment::Index(i), Value::Array(items), Some(v)) if *i < items.len() => items[*i] = v,
        (Segment::Index(i), Value::Array(items), None) if *i < items.len() => {
            items.remove(*i);
        }
        _ => {}
    }
}

/// Why a patch could not be applied to an object.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("patch {path}: {message}")]
pub struct PatchError {
    /// The patch's path, as configured.
    pub path: String,
    /// What went wrong.
    pub message: String,
}

enum CompiledMode {
    Expression { forward: Script },
    Labels,
    Reference(ReferenceSpec),
}

struct CompiledPatch {
    path: PatchPath,
    mode: CompiledMode,
}

/// A tenant's patches, compiled once, with the engine that runs them.
pub struct TenantPatches {
    patches: Vec<CompiledPatch>,
    engine: Option<ScriptEngine>,
    vcluster: Value,
}

impl fmt::Debug for TenantPatches {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let paths: Vec<String> = self.patches.iter().map(|p| p.path.to_string()).collect();
        f.debug_struct("TenantPatches").field("paths", &paths).finish()
    }
}

impl TenantPatches {
    /// Compiles patches. Errors are `(index in the list, field, message)`, e.g. a syntax error in
    /// `patches[1].expression`.
    pub fn compile(
        vcluster_name: &str,
        vcluster_namespace: &str,
        specs: &[PatchSpec],
        limits: ScriptLimits,
    ) -> Result<Self, Vec<(usize, &'static str, String)>> {
        let needs_engine = specs
            .iter()
            .any(|s| matches!(s.mode, PatchMode::Expression { .. }));
        let engine = if needs_engine {
            Some(ScriptEngine::new(limits).map_err(|e| vec![(0, "expression", e.to_string())])?)
        } else {
            None
        };
        let mut errors = Vec::new();
        let mut patches = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let path = match PatchPath::parse(&spec.path) {
                Ok(p) => p,
                Err(e) => {
                    errors.push((i, "path", e));
                    continue;
                }
            };
            let mode = match &spec.mode {
                PatchMode::Expression {
                    expression,
                    reverse_expression,
                } => {
                    let engine = engine.as_ref().expect("an engine exists when expressions do");
                    if let Some(reverse) = reverse_expression
                        && let Err(e) = engine.compile(reverse)
                    {
                        errors.push((i, "reverseExpression", e.to_string()));
                    }
                    match engine.compile(expression) {
                        Ok(forward) => CompiledMode::Expression { forward },
                        Err(e) => {
                            errors.push((i, "expression", e.to_string()));
                            continue;
                        }
                    }
                }
                PatchMode::Labels => CompiledMode::Labels,
                PatchMode::Reference(r) => CompiledMode::Reference(r.clone()),
            };
            patches.push(CompiledPatch { path, mode });
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            patches,
            engine,
            vcluster: json!({"name": vcluster_name, "namespace": vcluster_namespace}),
        })
    }

    /// Whether there is nothing to apply.
    pub fn is_empty(&self) -> bool {
        self.patches.is_empty()
    }

    /// The virtual copy of a host object (given as JSON): every patch applied in order.
    pub fn to_virtual(&self, host: &Value) -> Result<Value, PatchError> {
        let mut doc = host.clone();
        let host_json = host.to_string();
        let vcluster_json = self.vcluster.to_string();
        for patch in &self.patches {
            // The expressions' context, built once per patch: `virtualObject` is the copy as the
            // earlier patches left it.
            let mut context_json = None;
            let err = |message: String| PatchError {
                path: patch.path.to_string(),
                message,
            };
            for at in patch.path.locations(&doc) {
                let current = get(&doc, &at).cloned();
                let next = match &patch.mode {
                    CompiledMode::Expression { forward } => {
                        let context: &str = if !forward.uses_context() {
                            ""
                        } else {
                            context_json.get_or_insert_with(|| {
                            format!(
                                r#"{{"path":{},"vcluster":{vcluster_json},"hostObject":{host_json},"virtualObject":{}}}"#,
                                Value::String(patch.path.to_string()),
                                doc
                            )
                            })
                        };
                        let engine = self
                            .engine
                            .as_ref()
                            .expect("an engine exists when expressions do");
                        engine
                            .eval(forward, current.as_ref(), context)
                            .map_err(|e: ScriptError| err(e.to_string()))?
                    }
                    CompiledMode::Labels => match current {
                        None => continue,
                        Some(value) => Some(check_labels(&value).map_err(err)?),
                    },
                    CompiledMode::Reference(reference) => match current {
                        None => continue,
                        Some(value) => Some(self.translate_reference(&doc, &value, reference).map_err(err)?),
                    },
                };
                set(&mut doc, &at, next);
            }
        }
        Ok(doc)
    }

    fn translate_reference(
        &self,
        doc: &Value,
        value: &Value,
        reference: &ReferenceSpec,
    ) -> Result<Value, String> {
        let lookup = |path: &Option<String>| -> Option<String> {
            let path = PatchPath::parse(path.as_deref()?).ok()?;
            let at = path.locations(value).into_iter().next()?;
            get(value, &at)?.as_str().map(str::to_string)
        };
        let api_version =
            lookup(&reference.api_version_path).unwrap_or_else(|| reference.api_version.clone());
        let kind = lookup(&reference.kind_path).unwrap_or_else(|| reference.kind.clone());
        let namespaced = !CLUSTER_SCOPED.contains(&(group_of(&api_version), kind.as_str()));
        let (name, name_at) = match &reference.name_path {
            Some(p) => {
                let path = PatchPath::parse(p)?;
                let at = path
                    .locations(value)
                    .into_iter()
                    .next()
                    .ok_or_else(|| format!("no name at {p}"))?;
                (
                    get(value, &at).and_then(Value::as_str).map(str::to_string),
                    Some(at),
                )
            }
            None => (value.as_str().map(str::to_string), None),
        };
        let Some(name) = name else {
            return Err("the reference has no name (a string)".into());
        };
        if !namespaced {
            return Ok(value.clone());
        }
        let namespace = lookup(&reference.namespace_path)
            .or_else(|| {
                doc.pointer("/metadata/namespace")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "default".into());
        let tenant = self.vcluster["name"].as_str().unwrap_or_default();
        let translated = Value::String(host_pod_name(&name, &namespace, tenant));
        Ok(match name_at {
            Some(at) => {
                let mut out = value.clone();
                set(&mut out, &at, Some(translated));
                out
            }
            None => translated,
        })
    }
}

/// Cluster-scoped kinds a reference may name (their names are not translated).
const CLUSTER_SCOPED: &[(&str, &str)] = &[
    ("", "Namespace"),
    ("", "Node"),
    ("", "PersistentVolume"),
    ("node.k8s.io", "RuntimeClass"),
    ("storage.k8s.io", "StorageClass"),
    ("scheduling.k8s.io", "PriorityClass"),
    ("networking.k8s.io", "IngressClass"),
    ("rbac.authorization.k8s.io", "ClusterRole"),
];

fn group_of(api_version: &str) -> &str {
    api_version.rsplit_once('/').map_or("", |(g, _)| g)
}

/// A label map or label selector whose keys must be valid label keys.
fn check_labels(value: &Value) -> Result<Value, String> {
    let check_map = |m: &Map<String, Value>| -> Result<(), String> {
        for k in m.keys() {
            validate_label_key(k)?;
        }
        Ok(())
    };
    match value {
        Value::Object(m) if m.contains_key("matchLabels") || m.contains_key("matchExpressions") => {
            if let Some(Value::Object(labels)) = m.get("matchLabels") {
                check_map(labels)?;
            }
            for expr in m
                .get("matchExpressions")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(key) = expr.get("key").and_then(Value::as_str) {
                    validate_label_key(key)?;
                }
            }
            Ok(value.clone())
        }
        Value::Object(m) => check_map(m).map(|()| value.clone()),
        other => Err(format!("labels: expected a label map or selector, got {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn patches(yaml: &str) -> TenantPatches {
        let rc = crate::RuntimeClassSync::parse_vcluster_yaml(
            Path::new("v.yaml"),
            &format!("sync: {{fromHost: {{runtimeClasses: {{enabled: true, patches: {yaml}}}}}}}"),
        )
        .unwrap();
        TenantPatches::compile("team-a", "vcluster-team-a", &rc.patches, ScriptLimits::default()).unwrap()
    }

    fn class() -> Value {
        json!({
            "metadata": {"name": "gvisor", "labels": {"team": "a", "environment": "development"}},
            "handler": "runsc",
            "scheduling": {"nodeSelector": {"kubernetes.io/arch": "amd64"}, "tolerations": [{"key": "a"}, {"key": "b"}]}
        })
    }

    #[test]
    fn paths_parse_and_resolve() {
        let table: &[(&str, &[&str])] = &[
            ("handler", &["/handler"]),
            ("metadata.labels.team", &["/metadata/labels/team"]),
            ("metadata.labels.missing", &["/metadata/labels/missing"]),
            (
                "scheduling.nodeSelector[\"kubernetes.io/arch\"]",
                &["/scheduling/nodeSelector/kubernetes.io~1arch"],
            ),
            (
                "scheduling.tolerations[*].key",
                &["/scheduling/tolerations/0/key", "/scheduling/tolerations/1/key"],
            ),
            ("scheduling.tolerations[1]", &["/scheduling/tolerations/1"]),
            ("overhead.podFixed.cpu", &[]),
            ("scheduling.tolerations[7].key", &[]),
        ];
        for (path, want) in table {
            let p = PatchPath::parse(path).unwrap();
            let got: Vec<String> = p
                .locations(&class())
                .iter()
                .map(|at| {
                    at.iter()
                        .map(|s| match s {
                            Segment::Field(f) => format!("/{}", f.replace('~', "~0").replace('/', "~1")),
                            Segment::Index(i) => format!("/{i}"),
                            Segment::Wildcard => "/*".into(),
                        })
                        .collect()
                })
                .collect();
            assert_eq!(got, *want, "{path}");
        }
        for bad in ["", "a..b", "a[", "a[x]", ".a", "a."] {
            assert!(PatchPath::parse(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn expressions_rename_rewrite_create_and_remove() {
        let p = patches(
            r#"[
            {path: metadata.name, expression: 'value === "gvisor" ? "sandboxed" : value', reverseExpression: 'value === "sandboxed" ? "gvisor" : value'},
            {path: metadata.labels.team, expression: '"tenant-" + value'},
            {path: metadata.labels.owner, expression: 'valueExists ? value : context.vcluster.name'},
            {path: metadata.labels.environment, expression: 'null'},
            {path: 'scheduling.tolerations[*].key', expression: 'value.toUpperCase()'},
            {path: overhead.podFixed.cpu, expression: '"1"'}
        ]"#,
        );
        let out = p.to_virtual(&class()).unwrap();
        assert_eq!(out["metadata"]["name"], "sandboxed");
        assert_eq!(
            out["metadata"]["labels"],
            json!({"team": "tenant-a", "owner": "team-a"})
        );
        assert_eq!(
            out["scheduling"]["tolerations"],
            json!([{"key": "A"}, {"key": "B"}])
        );
        assert!(
            out.get("overhead").is_none(),
            "a path whose parent does not exist is not applied"
        );
        assert_eq!(out["handler"], "runsc");
    }

    #[test]
    fn errors_name_the_patch() {
        let p = patches("[{path: handler, expression: 'value.nope.deeper'}]");
        let err = p.to_virtual(&class()).unwrap_err();
        assert_eq!(err.path, "handler");
        assert!(err.message.contains("threw"), "{err}");
        let rc = crate::RuntimeClassSync::parse_vcluster_yaml(
            Path::new("v.yaml"),
            "sync: {fromHost: {runtimeClasses: {patches: [{path: handler, expression: 'value +'}, {path: 'a[', labels: {}}]}}}",
        )
        .unwrap();
        let errors = TenantPatches::compile("t", "ns", &rc.patches, ScriptLimits::default()).unwrap_err();
        assert_eq!(
            errors.iter().map(|(i, f, _)| (*i, *f)).collect::<Vec<_>>(),
            [(0, "expression"), (1, "path")]
        );
    }

    #[test]
    fn timeouts_and_memory_exhaustion_fail_the_object_only() {
        let rc = crate::RuntimeClassSync::parse_vcluster_yaml(
            Path::new("v.yaml"),
            "sync: {fromHost: {runtimeClasses: {patches: [{path: handler, expression: '(() => { if (value === \"loop\") { while (true) {} } if (value === \"hog\") { var a = []; while (true) a.push(\"x\".repeat(65536)); } return value + \"-ok\"; })()'}]}}}",
        )
        .unwrap();
        let limits = ScriptLimits {
            timeout: std::time::Duration::from_millis(30),
            ..Default::default()
        };
        let p = TenantPatches::compile("t", "ns", &rc.patches, limits).unwrap();
        let with = |h: &str| json!({"metadata": {"name": "x"}, "handler": h});
        assert!(
            p.to_virtual(&with("loop"))
                .unwrap_err()
                .message
                .contains("was stopped")
        );
        assert!(p.to_virtual(&with("hog")).is_err());
        assert_eq!(p.to_virtual(&with("runsc")).unwrap()["handler"], "runsc-ok");
    }

    #[test]
    fn labels_and_references() {
        let p = patches(
            "[{path: metadata.labels, labels: {}}, {path: spec.secretRef, reference: {apiVersion: v1, kind: Secret, namePath: name}}, {path: spec.class, reference: {apiVersion: node.k8s.io/v1, kind: RuntimeClass}}]",
        );
        let obj = json!({
            "metadata": {"name": "x", "namespace": "apps", "labels": {"a": "b"}},
            "spec": {"secretRef": {"name": "creds"}, "class": "gvisor"}
        });
        let out = p.to_virtual(&obj).unwrap();
        assert_eq!(out["metadata"]["labels"], json!({"a": "b"}));
        assert_eq!(out["spec"]["secretRef"]["name"], "creds-x-apps-x-team-a");
        assert_eq!(
            out["spec"]["class"], "gvisor",
            "cluster-scoped references are kept"
        );
        let bad = patches("[{path: metadata.labels, labels: {}}]");
        assert!(
            bad.to_virtual(&json!({"metadata": {"labels": {"bad key": "x"}}}))
                .is_err()
        );
    }
}
