//! The agents run in the tests as they run in clusters: under the service accounts and RBAC of
//! `deploy/` (read from those files, never copied), with tokens from the TokenRequest API. A
//! permission missing from `deploy/` makes the tests fail with the API server's 403.
//!
//! ```text
//!  deploy/host-agent.yaml ──► Namespace, ServiceAccount, ClusterRole(Binding), and the
//!                             "tenant namespace" Role(Binding) once per tenant's host namespace
//!  deploy/virtual-agent.yaml ──► Namespace, ServiceAccount, ClusterRole(Binding), Role(Binding)
//!  TokenRequest ──► a kubeconfig with the account's token ──► --kubeconfig of the agent
//! ```

use std::path::{Path, PathBuf};

use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::{Value, json};

/// The `deploy/` manifest `name`.
pub fn deploy_manifest(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The YAML documents of a manifest.
pub fn documents(text: &str) -> Vec<Value> {
    yaml_serde::Deserializer::from_str(text)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("valid YAML"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// The identity objects of a manifest: namespace, service account and RBAC, nothing that runs.
fn identity_objects(docs: &[Value]) -> Vec<Value> {
    const KINDS: [&str; 6] = [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
    ];
    docs.iter()
        .filter(|d| KINDS.contains(&d["kind"].as_str().unwrap_or_default()))
        .cloned()
        .collect()
}

fn resource_of(obj: &Value) -> ApiResource {
    let (group, version) = match obj["apiVersion"].as_str().unwrap_or_default().split_once('/') {
        Some((g, v)) => (g.to_string(), v.to_string()),
        None => (
            String::new(),
            obj["apiVersion"].as_str().unwrap_or_default().to_string(),
        ),
    };
    let kind = obj["kind"].as_str().unwrap_or_default();
    let plural = match kind {
        "Namespace" => "namespaces",
        "ServiceAccount" => "serviceaccounts",
        "ClusterRole" => "clusterroles",
        "ClusterRoleBinding" => "clusterrolebindings",
        "Role" => "roles",
        "RoleBinding" => "rolebindings",
        other => panic!("no plural known for {other}"),
    };
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(&group, &version, kind), plural)
}

/// Applies the objects (server-side apply, so a second run, or a real cluster that has them,
/// converges to the files).
pub async fn apply(client: &kube::Client, objects: &[Value]) {
    let params = PatchParams::apply("rcsync-e2e").force();
    for obj in objects {
        let resource = resource_of(obj);
        let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let api: Api<DynamicObject> = match obj["metadata"]["namespace"].as_str() {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
            None => Api::all_with(client.clone(), &resource),
        };
        api.patch(&name, &params, &Patch::Apply(obj))
            .await
            .unwrap_or_else(|e| panic!("applying {} {name}: {e}", obj["kind"]));
    }
}

/// The host agent's identity objects, the tenant-namespace block once per host namespace.
pub fn host_agent_objects(manifest: &str, host_namespaces: &[String]) -> Vec<Value> {
    let docs = identity_objects(&documents(manifest));
    let template_ns = docs
        .iter()
        .find(|d| d["kind"] == "Role")
        .and_then(|d| d["metadata"]["namespace"].as_str())
        .expect("deploy/host-agent.yaml has the tenant-namespace Role")
        .to_string();
    let mut out = Vec::new();
    for doc in docs {
        let in_tenant_ns = doc["metadata"]["namespace"].as_str() == Some(template_ns.as_str());
        let is_tenant_ns = doc["kind"] == "Namespace" && doc["metadata"]["name"] == template_ns.as_str();
        if is_tenant_ns {
            continue;
        }
        if in_tenant_ns {
            for ns in host_namespaces {
                let mut copy = doc.clone();
                copy["metadata"]["namespace"] = json!(ns);
                out.push(copy);
            }
        } else {
            out.push(doc);
        }
    }
    out
}

/// The virtual agent's identity objects.
pub fn virtual_agent_objects(manifest: &str) -> Vec<Value> {
    identity_objects(&documents(manifest))
}

/// Writes a kubeconfig like `admin` whose user is the service account `namespace/name`, with a
/// token from the TokenRequest API (valid a day).
pub async fn service_account_kubeconfig(
    client: &kube::Client,
    admin: &Path,
    namespace: &str,
    name: &str,
    out: PathBuf,
) -> PathBuf {
    let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(client.clone(), namespace);
    let request: k8s_openapi::api::authentication::v1::TokenRequest =
        serde_json::from_value(json!({"spec": {"audiences": [], "expirationSeconds": 86400}})).unwrap();
    let answer = accounts
        .create_token_request(name, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("requesting a token for {namespace}/{name}: {e}"));
    let token: String = answer
        .status
        .and_then(|s| s.token)
        .expect("a TokenRequest answer carries a token");
    let mut kubeconfig = kube::config::Kubeconfig::read_from(admin).unwrap();
    for user in &mut kubeconfig.auth_infos {
        if let Some(info) = user.auth_info.as_mut() {
            *info = kube::config::AuthInfo {
                token: Some(token.as_str().into()),
                ..Default::default()
            };
        }
    }
    std::fs::write(&out, yaml_serde::to_string(&kubeconfig).unwrap()).unwrap();
    out
}

/// `(namespace, name)` of the (first) service account in a manifest.
pub fn service_account_of(manifest: &str) -> (String, String) {
    let docs = documents(manifest);
    let sa = docs
        .iter()
        .find(|d| d["kind"] == "ServiceAccount")
        .expect("the manifest has a ServiceAccount");
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    (text(&sa["metadata"]["namespace"]), text(&sa["metadata"]["name"]))
}
