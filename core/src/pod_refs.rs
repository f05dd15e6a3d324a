//! The ConfigMaps and Secrets a Pod references, found and rewritten in one place so both agents
//! agree on what "referenced" means.
//!
//! ```text
//!  PodSpec ──visit──► volumes[].configMap.name, volumes[].secret.secretName,
//!                     volumes[].projected.sources[].{configMap,secret}.name,
//!                     {init,ephemeral,}containers[].env[].valueFrom.{configMapKeyRef,secretKeyRef}.name,
//!                     {init,ephemeral,}containers[].envFrom[].{configMapRef,secretRef}.name,
//!                     imagePullSecrets[].name
//!  virtual agent: references() ──► which objects to send with ApplyPod, which to wait for
//!  host agent:    references() ──► which objects it accepts;  rewrite() ──► translated names
//! ```

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{EnvFromSource, EnvVar, PodSpec};

/// The kind of a referenced object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RefKind {
    /// A `v1` ConfigMap.
    ConfigMap,
    /// A `v1` Secret.
    Secret,
}

impl RefKind {
    /// The kind in lower case, as kubectl prints it (`configmap`, `secret`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ConfigMap => "configmap",
            Self::Secret => "secret",
        }
    }
}

impl fmt::Display for RefKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every object a Pod references: `(kind, name)` → whether the Pod needs it to start (some use of
/// it is not `optional: true`). `imagePullSecrets` count as optional: a Pod starts without them
/// when its images need no credentials.
pub type References = BTreeMap<(RefKind, String), bool>;

/// The objects `spec` references.
pub fn references(spec: &PodSpec) -> References {
    let mut found = References::new();
    // The visitor rewrites in place; reading goes through a copy so both share one walk.
    let mut copy = spec.clone();
    visit(&mut copy, &mut |kind, name, optional| {
        if name.is_empty() {
            return;
        }
        let required = found.entry((kind, name.clone())).or_insert(false);
        *required |= !optional;
    });
    found
}

/// Renames every reference of `spec` with `rename(kind, name)`.
pub fn rewrite(spec: &mut PodSpec, rename: impl Fn(RefKind, &str) -> String) {
    visit(spec, &mut |kind, name, _| {
        if !name.is_empty() {
            *name = rename(kind, name);
        }
    });
}

/// Calls `f(kind, name, optional)` on every ConfigMap and Secret reference of a Pod spec.
fn visit(spec: &mut PodSpec, f: &mut dyn FnMut(RefKind, &mut String, bool)) {
    for volume in spec.volumes.iter_mut().flatten() {
        if let Some(cm) = &mut volume.config_map {
            f(RefKind::ConfigMap, &mut cm.name, cm.optional == Some(true));
        }
        if let Some(secret) = &mut volume.secret
            && let Some(name) = &mut secret.secret_name
        {
            f(RefKind::Secret, name, secret.optional == Some(true));
        }
        if let Some(projected) = &mut volume.projected {
            for source in projected.sources.iter_mut().flatten() {
                if let Some(cm) = &mut source.config_map {
                    f(RefKind::ConfigMap, &mut cm.name, cm.optional == Some(true));
                }
                if let Some(secret) = &mut source.secret {
                    f(RefKind::Secret, &mut secret.name, secret.optional == Some(true));
                }
            }
        }
    }
    for container in spec
        .containers
        .iter_mut()
        .chain(spec.init_containers.iter_mut().flatten())
    {
        visit_env(container.env.as_mut(), container.env_from.as_mut(), f);
    }
    for container in spec.ephemeral_containers.iter_mut().flatten() {
        visit_env(container.env.as_mut(), container.env_from.as_mut(), f);
    }
    for pull in spec.image_pull_secrets.iter_mut().flatten() {
        f(RefKind::Secret, &mut pull.name, true);
    }
}

fn visit_env(
    env: Option<&mut Vec<EnvVar>>,
    env_from: Option<&mut Vec<EnvFromSource>>,
    f: &mut dyn FnMut(RefKind, &mut String, bool),
) {
    for var in env.into_iter().flatten() {
        let Some(from) = &mut var.value_from else {
            continue;
        };
        if let Some(key) = &mut from.config_map_key_ref {
            f(RefKind::ConfigMap, &mut key.name, key.optional == Some(true));
        }
        if let Some(key) = &mut from.secret_key_ref {
            f(RefKind::Secret, &mut key.name, key.optional == Some(true));
        }
    }
    for source in env_from.into_iter().flatten() {
        if let Some(cm) = &mut source.config_map_ref {
            f(RefKind::ConfigMap, &mut cm.name, cm.optional == Some(true));
        }
        if let Some(secret) = &mut source.secret_ref {
            f(RefKind::Secret, &mut secret.name, secret.optional == Some(true));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Pod spec that uses `cfg` and `creds` in every reference form.
    pub fn every_form() -> PodSpec {
        serde_json::from_value(serde_json::json!({
            "containers": [{
                "name": "app",
                "env": [
                    {"name": "A", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "a"}}},
                    {"name": "B", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "b"}}},
                    {"name": "C", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "D", "value": "plain"}
                ],
                "envFrom": [{"configMapRef": {"name": "env-cm"}}, {"secretRef": {"name": "env-secret", "optional": true}}]
            }],
            "initContainers": [{"name": "init", "env": [{"name": "E", "valueFrom": {"secretKeyRef": {"name": "init-secret", "key": "e"}}}]}],
            "volumes": [
                {"name": "v1", "configMap": {"name": "cfg"}},
                {"name": "v2", "secret": {"secretName": "creds"}},
                {"name": "v3", "projected": {"sources": [
                    {"configMap": {"name": "proj-cm", "optional": true}},
                    {"secret": {"name": "proj-secret"}},
                    {"downwardAPI": {"items": [{"path": "n", "fieldRef": {"fieldPath": "metadata.name"}}]}}
                ]}},
                {"name": "v4", "emptyDir": {}}
            ],
            "imagePullSecrets": [{"name": "registry"}]
        }))
        .unwrap()
    }

    #[test]
    fn finds_every_reference_form_once_with_whether_it_is_required() {
        let refs = references(&every_form());
        let got: Vec<(RefKind, &str, bool)> = refs
            .iter()
            .map(|((k, n), required)| (*k, n.as_str(), *required))
            .collect();
        assert_eq!(
            got,
            [
                (RefKind::ConfigMap, "cfg", true),
                (RefKind::ConfigMap, "env-cm", true),
                (RefKind::ConfigMap, "proj-cm", false),
                (RefKind::Secret, "creds", true),
                (RefKind::Secret, "env-secret", false),
                (RefKind::Secret, "init-secret", true),
                (RefKind::Secret, "proj-secret", true),
                (RefKind::Secret, "registry", false),
            ]
        );
    }

    #[test]
    fn rewrite_renames_every_reference_and_nothing_else() {
        let mut spec = every_form();
        rewrite(&mut spec, |kind, name| format!("{name}-{kind}"));
        let refs = references(&spec);
        assert!(
            refs.keys()
                .all(|(kind, name)| name.ends_with(&format!("-{kind}")))
        );
        assert_eq!(refs.len(), 8);
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(
            json["volumes"][3]["name"], "v4",
            "volume names are not references"
        );
        assert_eq!(json["containers"][0]["env"][3]["value"], "plain");
    }
}
