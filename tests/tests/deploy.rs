//! The deploy manifests are valid Kubernetes objects of the expected kinds, their RBAC grants
//! exactly what the agents use, their flags and config are what the binaries accept, and tenants'
//! Pods reach no more of the host agent than its gRPC ports.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPort};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use rcsync_tests::rbac::{deploy_manifest as deploy, documents};
use serde::de::DeserializeOwned;
use serde_json::Value;

fn strip_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, v| !v.is_null());
            m.values_mut().for_each(strip_nulls);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

/// Decodes a document as a typed object; every field must survive the round trip (a typo'd field
/// would be dropped by the typed decoder).
fn typed<T: DeserializeOwned + serde::Serialize>(doc: &Value) -> T {
    let obj: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{e}: {doc}"));
    let mut back = serde_json::to_value(&obj).unwrap();
    strip_nulls(&mut back);
    let mut original = doc.clone();
    strip_nulls(&mut original);
    // stringData is write-only in the typed Secret; compare what remains.
    if let (Some(o), Some(b)) = (original.as_object_mut(), back.as_object_mut())
        && o.contains_key("stringData")
    {
        b.insert("stringData".into(), o["stringData"].clone());
    }
    assert_eq!(back, original, "fields were lost decoding this object (a typo?)");
    obj
}

fn check_kinds(text: &str) -> Vec<Value> {
    let docs = documents(text);
    for doc in &docs {
        let kind = doc["kind"].as_str().unwrap_or_default();
        match (doc["apiVersion"].as_str().unwrap_or_default(), kind) {
            ("v1", "Namespace") => drop(typed::<Namespace>(doc)),
            ("v1", "ServiceAccount") => drop(typed::<ServiceAccount>(doc)),
            ("v1", "ConfigMap") => drop(typed::<ConfigMap>(doc)),
            ("v1", "Service") => drop(typed::<Service>(doc)),
            ("v1", "Secret") => drop(typed::<Secret>(doc)),
            ("apps/v1", "Deployment") => drop(typed::<Deployment>(doc)),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => drop(typed::<ClusterRole>(doc)),
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => drop(typed::<ClusterRoleBinding>(doc)),
            ("rbac.authorization.k8s.io/v1", "Role") => drop(typed::<Role>(doc)),
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => drop(typed::<RoleBinding>(doc)),
            ("policy/v1", "PodDisruptionBudget") => drop(typed::<PodDisruptionBudget>(doc)),
            ("networking.k8s.io/v1", "NetworkPolicy") => drop(typed::<NetworkPolicy>(doc)),
            other => panic!("unexpected object {other:?}"),
        }
    }
    docs
}

fn rules_of(docs: &[Value], kind: &str) -> BTreeSet<(String, String, Vec<String>)> {
    let mut out = BTreeSet::new();
    for doc in docs.iter().filter(|d| d["kind"] == kind) {
        let rules: Vec<PolicyRule> = serde_json::from_value(doc["rules"].clone()).unwrap();
        for rule in rules {
            for group in rule.api_groups.clone().unwrap_or_default() {
                for resource in rule.resources.clone().unwrap_or_default() {
                    let mut verbs = rule.verbs.clone();
                    verbs.sort();
                    out.insert((group.clone(), resource, verbs));
                }
            }
        }
    }
    out
}

fn required(list: &[(&str, &str, &[&str])]) -> BTreeSet<(String, String, Vec<String>)> {
    list.iter()
        .map(|(g, r, v)| {
            let mut verbs: Vec<String> = v.iter().map(|s| s.to_string()).collect();
            verbs.sort();
            (g.to_string(), r.to_string(), verbs)
        })
        .collect()
}

/// Every `--flag` of the Deployment's container args appears in the binary's --help.
fn check_flags(docs: &[Value], binary: &str) {
    let help = Command::new(rcsync_tests::binary(binary))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).to_string();
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    for arg in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
    {
        let flag = arg.as_str().unwrap().split('=').next().unwrap();
        assert!(help.contains(flag), "{binary} has no flag {flag}");
    }
}

#[test]
fn host_agent_manifests_are_valid_and_least_privilege() {
    let docs = check_kinds(&deploy("host-agent.yaml"));
    let cluster: Vec<(&str, &str, &[&str])> = host_agent::rbac::REQUIRED
        .iter()
        .filter(|r| r.3 == "cluster")
        .map(|r| (r.0, r.1, r.2))
        .collect();
    let namespaced: Vec<(&str, &str, &[&str])> = host_agent::rbac::REQUIRED
        .iter()
        .filter(|r| r.3 == "tenant-namespace")
        .map(|r| (r.0, r.1, r.2))
        .collect();
    assert_eq!(rules_of(&docs, "ClusterRole"), required(&cluster));
    assert_eq!(rules_of(&docs, "Role"), required(&namespaced));
    check_flags(&docs, "host-agent");
    check_high_availability(&docs, "host-agent");
    // The tenants file in the ConfigMap is a valid tenants file.
    let config = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    rcsync_core::TenantsFile::parse(
        Path::new("configmap/tenants.yaml"),
        config["data"]["tenants.yaml"].as_str().unwrap(),
    )
    .unwrap();
    // Probes: HTTP liveness and readiness on the admin port, native gRPC on the health port.
    let container = &docs.iter().find(|d| d["kind"] == "Deployment").unwrap()["spec"]["template"]["spec"]["containers"]
        [0];
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/livez");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["startupProbe"]["grpc"]["port"], 9444);
    // Tenants' Pods share the cluster: they reach the gRPC ports, never the admin port.
    let policy: NetworkPolicy = typed(docs.iter().find(|d| d["kind"] == "NetworkPolicy").unwrap());
    let spec = policy.spec.unwrap();
    assert_eq!(spec.policy_types.as_deref(), Some(&["Ingress".to_string()][..]));
    assert_eq!(
        spec.pod_selector.unwrap().match_labels.unwrap()["app.kubernetes.io/name"],
        "host-agent"
    );
    let port_name = |p: &NetworkPolicyPort| match p.port.as_ref().unwrap() {
        IntOrString::String(name) => name.clone(),
        IntOrString::Int(n) => n.to_string(),
    };
    let mut open_to_all = BTreeSet::new();
    for rule in spec.ingress.unwrap() {
        let ports: Vec<String> = rule.ports.unwrap().iter().map(port_name).collect();
        match rule.from {
            None => open_to_all.extend(ports),
            Some(from) => {
                assert_eq!(ports, ["admin"]);
                assert!(
                    from.iter()
                        .all(|f| f.namespace_selector.is_some() && f.pod_selector.is_none())
                );
            }
        }
    }
    assert_eq!(
        open_to_all,
        BTreeSet::from(["grpc".to_string(), "grpc-health".to_string()])
    );
}

#[test]
fn virtual_agent_manifests_are_valid_and_least_privilege() {
    let docs = check_kinds(&deploy("virtual-agent.yaml"));
    assert_eq!(
        rules_of(&docs, "ClusterRole"),
        required(virtual_agent::rbac::REQUIRED)
    );
    // The leader Lease: a Role in the agent's namespace, limited to the one Lease by name.
    let mut lease_rules = BTreeSet::new();
    for doc in docs.iter().filter(|d| d["kind"] == "Role") {
        assert_eq!(doc["metadata"]["namespace"], "rcsync-system");
        let rules: Vec<PolicyRule> = serde_json::from_value(doc["rules"].clone()).unwrap();
        for rule in rules {
            let mut verbs = rule.verbs.clone();
            verbs.sort();
            for group in rule.api_groups.clone().unwrap_or_default() {
                for resource in rule.resources.clone().unwrap_or_default() {
                    lease_rules.insert((
                        group.clone(),
                        resource,
                        verbs.clone(),
                        rule.resource_names.clone().unwrap_or_default(),
                    ));
                }
            }
        }
    }
    let want: BTreeSet<_> = virtual_agent::rbac::LEASE
        .iter()
        .map(|(g, r, v, n)| {
            let mut verbs: Vec<String> = v.iter().map(|s| s.to_string()).collect();
            verbs.sort();
            (
                g.to_string(),
                r.to_string(),
                verbs,
                n.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            )
        })
        .collect();
    assert_eq!(lease_rules, want);
    check_flags(&docs, "virtual-agent");
    check_high_availability(&docs, "virtual-agent");
}

/// Two replicas, on different nodes, rolled one at a time, with a disruption budget.
fn check_high_availability(docs: &[Value], app: &str) {
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    assert_eq!(deployment["spec"]["replicas"], 2, "{app}: replicas");
    assert_eq!(
        deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0,
        "{app}: rolling update"
    );
    let anti = &deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"];
    assert_eq!(
        anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]["topologyKey"],
        "kubernetes.io/hostname",
        "{app}: anti-affinity"
    );
    let pdb = docs
        .iter()
        .find(|d| d["kind"] == "PodDisruptionBudget")
        .expect("a PodDisruptionBudget");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
        app
    );
}

#[test]
fn the_secrets_example_is_valid() {
    let docs = check_kinds(&deploy("secrets.example.yaml"));
    assert_eq!(docs.len(), 3);
}
