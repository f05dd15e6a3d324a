//! Properties of the Pod path's policy point, over generated hostile Pods: whatever a tenant puts
//! in a virtual Pod, the host agent either refuses it or writes a host Pod that names only the
//! tenant's own translated copies, carries only rcsync's identity for it, and meets the tenant's
//! Pod Security level. The references are found by a walk of the Pod's JSON written here, not by
//! `pod_refs`, so the property does not take the code under test as its own oracle.

use std::collections::BTreeSet;

use proptest::prelude::*;
use rcsync_core::naming::{
    ANNOTATION_OBJECT_NAME, ANNOTATION_OBJECT_NAMESPACE, ANNOTATION_OBJECT_UID, LABEL_MANAGED_BY,
    LABEL_NAMESPACE, host_object_name,
};
use serde_json::{Value, json};

use super::*;

const NAMESPACE: &str = "team";

/// Keys whose object names a ConfigMap or Secret of the Pod's own namespace (`name` under them).
const NAME_HOLDERS: [&str; 7] = [
    "configMap",
    "secret",
    "configMapKeyRef",
    "secretKeyRef",
    "configMapRef",
    "secretRef",
    "nodePublishSecretRef",
];

/// Keys that, in an admitted host Pod, would name a host object the tenant does not own, or
/// give the Pod host identity or placement.
const NEVER_ON_HOST: [&str; 11] = [
    "claimName",
    "volumeName",
    "selector",
    "dataSource",
    "dataSourceRef",
    "clusterTrustBundle",
    "serviceAccountName",
    "serviceAccount",
    "nodeName",
    "resourceClaimName",
    "priorityClassName",
];

/// The volume sources (and `name`) a host Pod below the privileged level may have when the
/// tenant's policy grants no inline volumes or CSI drivers: those holding the tenant's own data,
/// or storage the host provisions for it. Written out here, not taken from the code under test.
const OWNED_VOLUME_SOURCES: [&str; 9] = [
    "name",
    "configMap",
    "secret",
    "projected",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "image",
];

/// The capabilities the baseline level lets a container add, as upstream lists them (written out
/// here, not taken from `pod_security`, so the oracle is independent of the code under test).
const BASELINE_CAPABILITIES: [&str; 13] = [
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];

/// Every object name in `pod` that resolves in the Pod's namespace, by a walk of its JSON.
fn names_in(pod: &Value) -> BTreeSet<String> {
    fn walk(value: &Value, parent: Option<&str>, found: &mut BTreeSet<String>) {
        match value {
            Value::Object(map) => {
                for (key, child) in map {
                    let holder = parent.is_some_and(|p| NAME_HOLDERS.contains(&p));
                    if ((key == "name" && holder) || key == "secretName")
                        && let Some(name) = child.as_str()
                    {
                        found.insert(name.to_string());
                    }
                    walk(child, Some(key), found);
                }
            }
            Value::Array(items) => {
                for item in items {
                    if parent == Some("imagePullSecrets")
                        && let Some(name) = item.get("name").and_then(Value::as_str)
                    {
                        found.insert(name.to_string());
                    }
                    walk(item, parent, found);
                }
            }
            _ => {}
        }
    }
    let mut found = BTreeSet::new();
    walk(pod, None, &mut found);
    found
}

/// Whether `key` appears anywhere in `value`.
fn has_key(value: &Value, key: &str) -> bool {
    match value {
        Value::Object(map) => map.iter().any(|(k, v)| k == key || has_key(v, key)),
        Value::Array(items) => items.iter().any(|v| has_key(v, key)),
        _ => false,
    }
}

fn object_name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z][a-z0-9-]{0,12}",
        Just("default-token".to_string()),
        Just("vc-my-vcluster".to_string()),
        Just("kube-root-ca.crt".to_string()),
        Just("a-x-team-x-t".to_string()),
        "[a-z]{60,70}",
    ]
}

fn volume() -> impl Strategy<Value = Value> {
    let n = object_name;
    // Mostly what every level allows, so that many Pods are admitted and checked.
    prop_oneof![
        4 => n().prop_map(|c| json!({"configMap": {"name": c}})),
        4 => n().prop_map(|s| json!({"secret": {"secretName": s}})),
        4 => (n(), n()).prop_map(|(c, s)| json!({"projected": {"sources": [
            {"configMap": {"name": c}}, {"secret": {"name": s}},
            {"serviceAccountToken": {"path": "token"}},
            {"downwardAPI": {"items": [{"path": "l", "fieldRef": {"fieldPath": "metadata.labels['app']"}}]}}
        ]}})),
        1 => n().prop_map(|n| json!({"projected": {"sources": [{"clusterTrustBundle": {"name": n, "path": "b"}}]}})),
        1 => Just(json!({"downwardAPI": {"items": [{"path": "all", "fieldRef": {"fieldPath": "metadata.labels"}}]}})),
        4 => Just(json!({"emptyDir": {}})),
        1 => Just(json!({"hostPath": {"path": "/var/run/docker.sock"}})),
        1 => n().prop_map(|s| json!({"csi": {"driver": "d", "nodePublishSecretRef": {"name": s}}})),
        2 => Just(json!({"csi": {"driver": "d"}})),
        1 => n().prop_map(|c| json!({"persistentVolumeClaim": {"claimName": c}})),
        1 => n().prop_map(|c| json!({"ephemeral": {"volumeClaimTemplate": {"spec": {
            "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}},
            "dataSource": {"kind": "PersistentVolumeClaim", "name": c}}}}})),
        1 => n().prop_map(|pv| json!({"ephemeral": {"volumeClaimTemplate": {"spec": {
            "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}},
            "volumeName": pv}}}})),
        1 => n().prop_map(|team| json!({"ephemeral": {"volumeClaimTemplate": {"spec": {
            "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}},
            "selector": {"matchLabels": {"team": team}}}}}})),
        2 => n().prop_map(|key| json!({"ephemeral": {"volumeClaimTemplate": {
            "metadata": {"labels": {key.clone(): "x"}, "annotations": {"volume.kubernetes.io/selected-node": key}},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}}})),
        1 => n().prop_map(|s| json!({"cephfs": {"monitors": ["m"], "secretRef": {"name": s}}})),
        1 => n().prop_map(|s| json!({"rbd": {"monitors": ["m"], "image": "i", "secretRef": {"name": s}}})),
        1 => n().prop_map(|s| json!({"iscsi": {"targetPortal": "p", "iqn": "q", "lun": 0, "secretRef": {"name": s}}})),
        1 => n().prop_map(|s| json!({"flexVolume": {"driver": "d", "secretRef": {"name": s}}})),
        1 => n().prop_map(|s| json!({"azureFile": {"secretName": s, "shareName": "x"}})),
        1 => n().prop_map(|s| json!({"scaleIO": {"gateway": "g", "system": "s", "secretRef": {"name": s}}})),
        1 => n().prop_map(|s| json!({"storageos": {"secretRef": {"name": s}}})),
        1 => n().prop_map(|s| json!({"cinder": {"volumeID": "v", "secretRef": {"name": s}}})),
        1 => Just(json!({"gitRepo": {"repository": "r"}})),
        1 => Just(json!({"nfs": {"server": "s", "path": "/p"}})),
        1 => n().prop_map(|disk| json!({"gcePersistentDisk": {"pdName": disk}})),
        1 => Just(json!({"iscsi": {"targetPortal": "p", "iqn": "q", "lun": 0}})),
    ]
}

fn env() -> impl Strategy<Value = Value> {
    let n = object_name;
    prop_oneof![
        Just(json!({"name": "PLAIN", "value": "v"})),
        n().prop_map(|c| json!({"name": "C", "valueFrom": {"configMapKeyRef": {"name": c, "key": "k"}}})),
        n().prop_map(
            |s| json!({"name": "S", "valueFrom": {"secretKeyRef": {"name": s, "key": "k", "optional": true}}})
        ),
        prop_oneof![
            Just("metadata.name"),
            Just("metadata.labels['app']"),
            Just("metadata.annotations['note']"),
            Just("spec.serviceAccountName"),
            Just("status.podIP"),
        ]
        .prop_map(|path| json!({"name": "F", "valueFrom": {"fieldRef": {"fieldPath": path}}})),
    ]
}

fn security_context() -> impl Strategy<Value = Value> {
    prop_oneof![
        // What the restricted level asks of a container.
        2 => prop::sample::subsequence(vec!["NET_BIND_SERVICE"], 0..=1).prop_map(|add| json!({
            "allowPrivilegeEscalation": false, "runAsNonRoot": true,
            "capabilities": {"drop": ["ALL"], "add": add},
            "seccompProfile": {"type": "RuntimeDefault"},
        })),
        1 => any_security_context(),
    ]
}

fn any_security_context() -> impl Strategy<Value = Value> {
    (
        any::<Option<bool>>(),
        any::<Option<bool>>(),
        prop::sample::subsequence(vec!["NET_ADMIN", "SYS_ADMIN", "CHOWN", "NET_BIND_SERVICE"], 0..3),
        any::<bool>(),
        any::<Option<bool>>(),
    )
        .prop_map(|(privileged, non_root, add, drop_all, escalation)| {
            let mut context = json!({"capabilities": {"add": add}});
            if drop_all {
                context["capabilities"]["drop"] = json!(["ALL"]);
                context["seccompProfile"] = json!({"type": "RuntimeDefault"});
            }
            for (key, value) in [
                ("privileged", privileged),
                ("runAsNonRoot", non_root),
                ("allowPrivilegeEscalation", escalation),
            ] {
                if let Some(value) = value {
                    context[key] = json!(value);
                }
            }
            context
        })
}

fn container(name: &'static str) -> impl Strategy<Value = Value> {
    (
        prop::collection::vec(env(), 0..3),
        prop::collection::vec(
            (object_name(), any::<bool>()).prop_map(|(n, secret)| {
                if secret {
                    json!({"secretRef": {"name": n}})
                } else {
                    json!({"configMapRef": {"name": n}})
                }
            }),
            0..2,
        ),
        prop::option::weighted(0.8, security_context()),
        prop::option::weighted(0.1, 1..65535_i32),
    )
        .prop_map(move |(env, env_from, security, host_port)| {
            let mut c =
                json!({"name": name, "image": "registry.example/app:1", "env": env, "envFrom": env_from});
            if let Some(security) = security {
                c["securityContext"] = security;
            }
            if let Some(port) = host_port {
                c["ports"] = json!([{"containerPort": 80, "hostPort": port}]);
            }
            c
        })
}

fn virtual_pod() -> impl Strategy<Value = Value> {
    (
        prop::collection::vec(volume(), 0..4),
        prop::collection::vec(container("app"), 1..2),
        prop::collection::vec(container("init"), 0..2),
        (prop::bool::weighted(0.1), prop::bool::weighted(0.1), prop::bool::weighted(0.1)),
        prop::collection::vec(object_name(), 0..2),
        prop::option::weighted(0.1, object_name()),
        prop::collection::btree_map(
            prop_oneof![
                1 => Just("vcluster.loft.sh/object-name".to_string()),
                1 => Just("vcluster.loft.sh/managed-by".to_string()),
                1 => Just("rcsync.io/copied-annotations".to_string()),
                1 => Just("container.apparmor.security.beta.kubernetes.io/app".to_string()),
                4 => "[a-z]{1,8}(\\.example)?/[a-z]{1,8}",
    ],
            "[a-z:/-]{0,12}",
            0..4,
        ),
    )
        .prop_map(|(volumes, containers, init, (net, pid, ipc), pull, claim, annotations)| {
            let volumes: Vec<Value> = volumes
                .into_iter()
                .enumerate()
                .map(|(i, mut v)| {
                    v["name"] = json!(format!("v{i}"));
                    v
                })
                .collect();
            json!({
                "metadata": {
                    "name": "web", "namespace": NAMESPACE, "uid": "u-1",
                    "labels": {"app": "web", "vcluster.loft.sh/managed-by": "other-tenant"},
                    "annotations": annotations,
                },
                "spec": {
                    "volumes": volumes, "containers": containers, "initContainers": init,
                    "hostNetwork": net, "hostPID": pid, "hostIPC": ipc,
                    "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
                    "imagePullSecrets": pull.into_iter().map(|n| json!({"name": n})).collect::<Vec<_>>(),
                    "nodeName": "virtual-node", "serviceAccountName": "builder",
                    "automountServiceAccountToken": true,
                    "priorityClassName": "system-node-critical",
                    "resourceClaims": claim.into_iter().map(|c| json!({"name": "gpu", "resourceClaimName": c})).collect::<Vec<_>>(),
                    "tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}],
                },
            })
        })
}

fn tenant(level: &str) -> Tenant {
    let yaml = format!(
        "tenants:\n  - name: t\n    hostNamespace: host-t\n    policies: {{podSecurityStandard: {level}}}\n    sync: {{toHost: {{pods: {{copyAnnotations: ['*']}}}}}}\n"
    );
    rcsync_core::TenantsFile::parse(std::path::Path::new("t.yaml"), &yaml)
        .unwrap_or_else(|e| panic!("{e}"))
        .tenants()[0]
        .clone()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn a_host_pod_names_only_the_tenants_copies_and_carries_only_its_identity(
        virtual_json in virtual_pod(),
        level in prop_oneof![Just("privileged"), Just("baseline"), Just("restricted")],
    ) {
        let tenant = tenant(level);
        let pod: Pod = serde_json::from_value(virtual_json.clone()).unwrap();
        let desired = host_pod(&pod, &tenant, "runsc").unwrap();
        if policy_refusal(&desired, &tenant).is_some() {
            // Refused: nothing is written.
            return Ok(());
        }
        let host = serde_json::to_value(&desired).unwrap();
        // In the tenant's host namespace, under its own name.
        prop_assert_eq!(host["metadata"]["namespace"].as_str(), Some("host-t"));
        prop_assert_eq!(host["metadata"]["name"].as_str(), Some("web-x-team-x-t"));
        // Every name that resolves there is one of the tenant's translated copies.
        let copies: BTreeSet<String> = names_in(&virtual_json)
            .iter()
            .map(|name| host_object_name(name, NAMESPACE, "t"))
            .collect();
        let named = names_in(&host);
        prop_assert!(named.is_subset(&copies), "{:?} names more than {:?}", named, copies);
        for key in NEVER_ON_HOST {
            prop_assert!(!has_key(&host["spec"], key), "{} on the host: {}", key, host);
        }
        prop_assert!(!has_key(&host["spec"], "serviceAccountToken"), "a token volume on the host");
        // An ephemeral volume's claim is made by the host: the template's labels and annotations
        // (which host selectors could match, or which set what host controllers set) stay virtual.
        for volume in host["spec"]["volumes"].as_array().into_iter().flatten() {
            let template = &volume["ephemeral"]["volumeClaimTemplate"];
            prop_assert!(template["metadata"].is_null(), "a claim template's metadata on the host: {}", volume);
        }
        prop_assert_eq!(&host["spec"]["automountServiceAccountToken"], &json!(false));
        prop_assert_eq!(&host["spec"]["runtimeClassName"], &json!("runsc"));
        // rcsync's labels, whatever the tenant set, and the tenant's own only under hashed keys.
        let mut labels = json!({LABEL_MANAGED_BY: "t", LABEL_NAMESPACE: NAMESPACE});
        for (key, value) in virtual_json["metadata"]["labels"].as_object().into_iter().flatten() {
            labels[rcsync_core::naming::host_label_key(key)] = value.clone();
        }
        prop_assert_eq!(&host["metadata"]["labels"], &labels);
        let annotations = &host["metadata"]["annotations"];
        prop_assert_eq!(&annotations[ANNOTATION_OBJECT_NAME], &json!("web"));
        prop_assert_eq!(&annotations[ANNOTATION_OBJECT_NAMESPACE], &json!(NAMESPACE));
        prop_assert_eq!(&annotations[ANNOTATION_OBJECT_UID], &json!("u-1"));
        prop_assert!(
            !has_key(&host["spec"], "tolerations")
                || !host["spec"]["tolerations"].to_string().contains("control-plane"),
            "a control-plane toleration on the host"
        );
        // What the host agent wrote keeps to the tenant's level, read off the host Pod itself.
        let spec = &host["spec"];
        let containers: Vec<&Value> = ["containers", "initContainers"]
            .iter()
            .flat_map(|field| spec[*field].as_array().into_iter().flatten())
            .collect();
        if level != "privileged" {
            prop_assert!(!has_key(spec, "hostPath"), "a hostPath volume: {}", spec);
            // No storage named directly (a disk by its id, an export by its address): only
            // sources holding the tenant's own data or storage the host provisions for it.
            for volume in spec["volumes"].as_array().into_iter().flatten() {
                for source in volume.as_object().into_iter().flatten().map(|(k, _)| k.as_str()) {
                    prop_assert!(OWNED_VOLUME_SOURCES.contains(&source), "a {} volume at {}: {}", source, level, volume);
                }
            }
            for namespace in ["hostNetwork", "hostPID", "hostIPC"] {
                prop_assert_ne!(&spec[namespace], &json!(true), "{}", namespace);
            }
            for c in &containers {
                prop_assert_ne!(&c["securityContext"]["privileged"], &json!(true), "{}", c);
                for port in c["ports"].as_array().into_iter().flatten() {
                    prop_assert!(port["hostPort"].as_i64().unwrap_or(0) == 0, "a host port: {}", c);
                }
                for added in c["securityContext"]["capabilities"]["add"].as_array().into_iter().flatten() {
                    let added = added.as_str().unwrap_or_default();
                    prop_assert!(
                        level == "baseline" && BASELINE_CAPABILITIES.contains(&added)
                            || level == "restricted" && added == "NET_BIND_SERVICE",
                        "{} added at {}", added, level
                    );
                }
            }
        }
        if level == "restricted" {
            for c in &containers {
                prop_assert_eq!(&c["securityContext"]["allowPrivilegeEscalation"], &json!(false), "{}", c);
                prop_assert_eq!(&c["securityContext"]["capabilities"]["drop"], &json!(["ALL"]), "{}", c);
            }
        }
    }
}

/// The walk finds what it is meant to, so the property above cannot pass by finding nothing.
#[test]
fn the_walk_finds_every_kind_of_reference() {
    let pod = json!({"spec": {
        "volumes": [
            {"name": "a", "configMap": {"name": "cm"}},
            {"name": "b", "secret": {"secretName": "s"}},
            {"name": "c", "projected": {"sources": [{"secret": {"name": "ps"}}]}},
            {"name": "d", "csi": {"driver": "x", "nodePublishSecretRef": {"name": "csi"}}},
        ],
        "containers": [{"name": "app", "envFrom": [{"configMapRef": {"name": "ef"}}],
            "env": [{"name": "E", "valueFrom": {"secretKeyRef": {"name": "sk", "key": "k"}}}]}],
        "imagePullSecrets": [{"name": "pull"}],
    }});
    assert_eq!(
        names_in(&pod),
        ["cm", "csi", "ef", "ps", "pull", "s", "sk"]
            .into_iter()
            .map(String::from)
            .collect::<BTreeSet<_>>()
    );
}
