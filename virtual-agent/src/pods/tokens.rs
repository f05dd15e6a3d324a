//! Service account tokens of the virtual cluster for Pods on the host (`--pod-api-server`): a Pod
//! that talks to its Kubernetes API (an operator, a controller, anything using in-cluster
//! config) reaches the virtual cluster's API server as its own ServiceAccount.
//!
//! ```text
//!  virtual Pod with a projected serviceAccountToken source (kube-api-access-*, as the virtual
//!  API server's admission adds it)
//!     ──► TokenRequest for its ServiceAccount, bound to the Pod (name and uid), the source's
//!         audience and lifetime ──► Secret `<pod>.rcsync-token` (one key per source), sent with
//!         the Pod; each source becomes that Secret's item; every container gets
//!         KUBERNETES_SERVICE_HOST/PORT of --pod-api-server
//!     ──► the host agent copies the Secret like any the Pod references (translated name, owned by
//!         the host Pod) ──► the token is requested again at 80% of its lifetime, and the Pod
//!         applied again with it (the kubelet updates the mounted file)
//! ```
//!
//! Without `--pod-api-server` nothing changes: the host agent drops token volumes, and no virtual
//! or host credential reaches the Pod. The host agent is not asked to trust anything new: the
//! Secret and the environment are what a tenant could write into its Pod itself.

use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{EnvVar, KeyToPath, Pod, Secret, SecretProjection, ServiceAccount};
use kube::api::PostParams;
use kube::{Api, Client, ResourceExt as _};
use tokio::time::Instant;

/// The lifetime asked for when a source states none (the kubelet's default for projected tokens).
const DEFAULT_LIFETIME_SECONDS: i64 = 3607;

/// Where Pods on the host reach the virtual cluster's API server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodApiServer {
    /// Host name or IP address (`KUBERNETES_SERVICE_HOST`).
    pub host: String,
    /// Port (`KUBERNETES_SERVICE_PORT`).
    pub port: u16,
}

impl std::fmt::Display for PodApiServer {
    /// `HOST:PORT`, `[IPv6]:PORT` for an IPv6 address (what `--pod-api-server` takes).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl std::str::FromStr for PodApiServer {
    type Err = String;

    /// `HOST:PORT` (`[IPv6]:PORT` for an IPv6 address).
    fn from_str(s: &str) -> Result<Self, String> {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?} is not HOST:PORT"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{s:?} has no host"));
        }
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{s:?}: the port must be a number from 1 to 65535"))?;
        Ok(Self {
            host: host.to_string(),
            port,
        })
    }
}

/// Tokens issued for one Pod, and when to ask again.
#[derive(Clone, Debug)]
pub(super) struct IssuedTokens {
    /// What they were issued for (the Pod's uid, its ServiceAccount, each source's audience and
    /// lifetime): another Pod or another source asks again.
    issued_for: String,
    /// One token per source, in the order of [`token_sources`].
    tokens: Vec<String>,
    /// When to ask again (80% of the shortest lifetime).
    pub(super) refresh_at: Instant,
}

impl IssuedTokens {
    /// How many tokens (one per token source).
    pub(super) fn count(&self) -> u64 {
        self.tokens.len() as u64
    }

    /// A digest of the tokens: a new one on every request.
    pub(super) fn version(&self) -> u64 {
        super::digest_of(&self.tokens)
    }
}

/// A projected `serviceAccountToken` source: (volume, source) positions, audience, lifetime.
struct TokenSource {
    volume: usize,
    source: usize,
    path: String,
    audience: Option<String>,
    lifetime: i64,
}

fn token_sources(pod: &Pod) -> Vec<TokenSource> {
    let mut out = Vec::new();
    for (v, volume) in pod
        .spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .enumerate()
    {
        for (s, source) in volume
            .projected
            .iter()
            .flat_map(|p| p.sources.iter().flatten())
            .enumerate()
        {
            if let Some(token) = &source.service_account_token {
                out.push(TokenSource {
                    volume: v,
                    source: s,
                    path: token.path.clone(),
                    audience: token.audience.clone().filter(|a| !a.is_empty()),
                    lifetime: token.expiration_seconds.unwrap_or(DEFAULT_LIFETIME_SECONDS),
                });
            }
        }
    }
    out
}

/// The name of the Secret that carries a Pod's tokens.
pub(super) fn token_secret_name(pod_name: &str) -> String {
    format!("{pod_name}.rcsync-token")
}

fn service_account(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".to_string())
}

/// Whether `pod` has token sources (and so needs tokens with `--pod-api-server`).
pub(super) fn wants_tokens(pod: &Pod) -> bool {
    !token_sources(pod).is_empty()
}

/// The Pod's tokens: `cached` when issued for this Pod and these sources and not due, else new
/// ones from the virtual cluster's TokenRequest API.
pub(super) async fn tokens_for(
    client: &Client,
    pod: &Pod,
    cached: Option<&IssuedTokens>,
) -> Result<IssuedTokens, String> {
    let sources = token_sources(pod);
    let account = service_account(pod);
    let issued_for = format!(
        "{}/{account}/{}",
        pod.uid().unwrap_or_default(),
        sources
            .iter()
            .map(|s| format!("{}@{}", s.audience.as_deref().unwrap_or(""), s.lifetime))
            .collect::<Vec<_>>()
            .join(",")
    );
    if let Some(cached) = cached
        && cached.issued_for == issued_for
        && Instant::now() < cached.refresh_at
    {
        return Ok(cached.clone());
    }
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
    let mut tokens = Vec::with_capacity(sources.len());
    let mut shortest = i64::MAX;
    for source in &sources {
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: source.audience.clone().map(|a| vec![a]),
                expiration_seconds: Some(source.lifetime),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: pod.metadata.name.clone(),
                    uid: pod.metadata.uid.clone(),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let issued = api
            .create_token_request(&account, &PostParams::default(), &request)
            .await
            .map_err(|e| format!("TokenRequest for service account {account:?}: {e}"))?;
        let status = issued.status.unwrap_or_default();
        // The lifetime granted, when shorter than asked (an API server may shorten it; a later
        // expiry, or one a skewed clock moves later, is not counted on).
        let lifetime = status
            .expiration_timestamp
            .map(|at| at.0.duration_since(k8s_openapi::jiff::Timestamp::now()).as_secs())
            .unwrap_or(source.lifetime)
            .clamp(1, source.lifetime.max(1));
        shortest = shortest.min(lifetime);
        let token = status
            .token
            .filter(|t| !t.is_empty())
            .ok_or_else(|| format!("TokenRequest for service account {account:?} returned no token"))?;
        tokens.push(token);
    }
    // 80% of the lifetime, as the kubelet refreshes projected tokens.
    let refresh_in = Duration::from_secs(u64::try_from(shortest).unwrap_or(1)).mul_f64(0.8);
    Ok(IssuedTokens {
        issued_for,
        tokens,
        refresh_at: Instant::now() + refresh_in,
    })
}

/// `pod` as the host gets it, and the Secret that carries its tokens: each token source becomes
/// an item of the Secret at the same path, and every container that does not set them gets the
/// virtual API server's `KUBERNETES_SERVICE_HOST` and `KUBERNETES_SERVICE_PORT` (they win over the
/// host's, which its kubelet injects).
pub(super) fn with_tokens(pod: &Pod, issued: &IssuedTokens, api_server: &PodApiServer) -> (Pod, Secret) {
    let mut pod = pod.clone();
    let name = token_secret_name(&pod.name_any());
    let sources = token_sources(&pod);
    let mut secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.clone()),
            namespace: pod.metadata.namespace.clone(),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    let data = secret.data.get_or_insert_with(Default::default);
    if let Some(volumes) = pod.spec.as_mut().and_then(|s| s.volumes.as_mut()) {
        for (i, (source, token)) in sources.iter().zip(&issued.tokens).enumerate() {
            let key = format!("token-{i}");
            data.insert(key.clone(), ByteString(token.clone().into_bytes()));
            if let Some(projection) = volumes
                .get_mut(source.volume)
                .and_then(|v| v.projected.as_mut())
                .and_then(|p| p.sources.as_mut())
                .and_then(|s| s.get_mut(source.source))
            {
                projection.service_account_token = None;
                projection.secret = Some(SecretProjection {
                    name: name.clone(),
                    items: Some(vec![KeyToPath {
                        key,
                        path: source.path.clone(),
                        ..Default::default()
                    }]),
                    optional: None,
                });
            }
        }
    }
    if let Some(spec) = pod.spec.as_mut() {
        for container in spec
            .containers
            .iter_mut()
            .chain(spec.init_containers.iter_mut().flatten())
        {
            let env = container.env.get_or_insert_with(Vec::new);
            for (variable, value) in [
                ("KUBERNETES_SERVICE_HOST", api_server.host.clone()),
                ("KUBERNETES_SERVICE_PORT", api_server.port.to_string()),
            ] {
                if !env.iter().any(|e| e.name == variable) {
                    env.push(EnvVar {
                        name: variable.into(),
                        value: Some(value),
                        value_from: None,
                    });
                }
            }
        }
    }
    (pod, secret)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod_with_api_access() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "operator", "namespace": "default", "uid": "u1"},
            "spec": {
                "serviceAccountName": "operator",
                "containers": [{"name": "app", "image": "x", "env": [{"name": "KUBERNETES_SERVICE_PORT", "value": "6443"}],
                                "volumeMounts": [{"name": "kube-api-access-x", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}]}],
                "volumes": [{"name": "kube-api-access-x", "projected": {"sources": [
                    {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                    {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}},
                ]}}],
            },
        }))
        .unwrap()
    }

    #[test]
    fn an_api_server_address_parses_as_host_and_port() {
        let parsed: PodApiServer = "vcluster.team-a.svc:443".parse().unwrap();
        assert_eq!(
            parsed,
            PodApiServer {
                host: "vcluster.team-a.svc".into(),
                port: 443
            }
        );
        let v6 = "[fd00::1]:6443".parse::<PodApiServer>().unwrap();
        assert_eq!(v6.host, "fd00::1");
        assert_eq!(v6.to_string(), "[fd00::1]:6443");
        assert_eq!(parsed.to_string(), "vcluster.team-a.svc:443");
        for bad in ["vcluster", ":443", "host:0", "host:http"] {
            assert!(bad.parse::<PodApiServer>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_token_source_becomes_an_item_of_the_pods_token_secret_and_containers_find_the_api_server() {
        let pod = pod_with_api_access();
        assert!(wants_tokens(&pod));
        let issued = IssuedTokens {
            issued_for: String::new(),
            tokens: vec!["t0k3n".into()],
            refresh_at: Instant::now(),
        };
        let api_server = PodApiServer {
            host: "10.0.0.5".into(),
            port: 443,
        };
        let (host_bound, secret) = with_tokens(&pod, &issued, &api_server);
        assert!(
            !wants_tokens(&host_bound),
            "no token source is left for the host to drop"
        );
        let value = serde_json::to_value(&host_bound).unwrap();
        let sources = &value["spec"]["volumes"][0]["projected"]["sources"];
        assert_eq!(
            sources[0],
            json!({"secret": {"name": "operator.rcsync-token", "items": [{"key": "token-0", "path": "token"}]}})
        );
        assert_eq!(
            sources[1]["configMap"]["name"], "kube-root-ca.crt",
            "the rest of the volume stays"
        );
        assert_eq!(secret.metadata.name.as_deref(), Some("operator.rcsync-token"));
        assert_eq!(secret.data.unwrap()["token-0"].0, b"t0k3n");
        assert_eq!(
            value["spec"]["containers"][0]["env"],
            json!([{"name": "KUBERNETES_SERVICE_PORT", "value": "6443"},
                   {"name": "KUBERNETES_SERVICE_HOST", "value": "10.0.0.5"}]),
            "what the Pod sets itself wins"
        );
    }
}
