//! Authentication and RBAC authorization, as kube-apiserver does them.
//!
//! ```text
//!  bearer token ──► admin token of the kubeconfig ──► devcluster-admin (group system:masters)
//!               └─► service account token (a JWT this server signed, TokenRequest API):
//!                   signature, expiry, and the ServiceAccount still there with the same uid
//!  Impersonate-User / -Group ──► allowed by the `impersonate` verb ──► act as that user
//!  request ──► Attributes (verb, group, resource/subresource, namespace, name | path)
//!          ──► RBAC: ClusterRoleBindings, then RoleBindings of the namespace, their rules
//!          ──► 403 with upstream's message, or on to the API
//! ```
//!
//! Group `system:masters` is allowed everything, as upstream. Tokens are HMAC-SHA256 signed with a
//! key made at start (upstream signs with RSA keys): they verify only on the server that issued
//! them, and not after it restarts. RBAC's escalation checks (granting what you do not hold) and
//! role aggregation are not implemented.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::{Value, json};

use crate::store::Store;

/// Group whose members may do everything.
pub const MASTERS: &str = "system:masters";
/// Every authenticated user is in this group.
pub const AUTHENTICATED: &str = "system:authenticated";

/// Who is making a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserInfo {
    /// User name, e.g. `system:serviceaccount:rcsync-system:host-agent`.
    pub username: String,
    /// UID (service accounts: the ServiceAccount's).
    pub uid: String,
    /// Groups.
    pub groups: Vec<String>,
}

impl UserInfo {
    /// The kubeconfig's admin: everything allowed.
    pub fn admin() -> Self {
        Self {
            username: "devcluster-admin".into(),
            uid: String::new(),
            groups: vec![MASTERS.into(), AUTHENTICATED.into()],
        }
    }

    /// A service account's identity.
    pub fn service_account(namespace: &str, name: &str, uid: &str) -> Self {
        Self {
            username: format!("system:serviceaccount:{namespace}:{name}"),
            uid: uid.into(),
            groups: service_account_groups(namespace),
        }
    }

    /// Whether RBAC is bypassed.
    pub fn is_master(&self) -> bool {
        self.groups.iter().any(|g| g == MASTERS)
    }

    /// As `SelfSubjectReview.status.userInfo`.
    pub fn to_json(&self) -> Value {
        let mut out = json!({"username": self.username, "groups": self.groups});
        if !self.uid.is_empty() {
            out["uid"] = json!(self.uid);
        }
        out
    }
}

/// The groups of a service account of `namespace`.
pub fn service_account_groups(namespace: &str) -> Vec<String> {
    vec![
        "system:serviceaccounts".into(),
        format!("system:serviceaccounts:{namespace}"),
        AUTHENTICATED.into(),
    ]
}

/// `(namespace, name)` of a service account user name.
pub fn parse_service_account(username: &str) -> Option<(&str, &str)> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (ns, name) = rest.split_once(':')?;
    (!ns.is_empty() && !name.is_empty()).then_some((ns, name))
}

/// What a request asks to do, as RBAC sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attributes {
    /// get, list, watch, create, update, patch, delete, deletecollection, impersonate; for paths
    /// the lower-case HTTP method.
    pub verb: String,
    /// API group (empty: core).
    pub group: String,
    /// Resource (plural); empty for a non-resource path.
    pub resource: String,
    /// Subresource, e.g. `status`.
    pub subresource: String,
    /// Namespace; empty at the cluster scope.
    pub namespace: String,
    /// Object name, when the request names one.
    pub name: String,
    /// Non-resource path, e.g. `/version`.
    pub path: String,
}

impl Attributes {
    /// Whether this is a non-resource request.
    pub fn is_path(&self) -> bool {
        self.resource.is_empty()
    }
}

/// Upstream's message for a refused request.
pub fn forbidden_message(user: &UserInfo, attrs: &Attributes) -> String {
    let who = &user.username;
    if attrs.is_path() {
        return format!(
            "forbidden: User {who:?} cannot {} path {:?}",
            attrs.verb, attrs.path
        );
    }
    let resource = if attrs.subresource.is_empty() {
        attrs.resource.clone()
    } else {
        format!("{}/{}", attrs.resource, attrs.subresource)
    };
    let scope = if attrs.namespace.is_empty() {
        "at the cluster scope".to_string()
    } else {
        format!("in the namespace {:?}", attrs.namespace)
    };
    format!(
        "User {who:?} cannot {} resource {resource:?} in API group {:?} {scope}",
        attrs.verb, attrs.group
    )
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn subject_matches(subject: &Value, user: &UserInfo, binding_namespace: &str) -> bool {
    let name = subject["name"].as_str().unwrap_or_default();
    match subject["kind"].as_str() {
        Some("User") => user.username == name,
        Some("Group") => user.groups.iter().any(|g| g == name),
        Some("ServiceAccount") => {
            let ns = subject["namespace"]
                .as_str()
                .filter(|n| !n.is_empty())
                .unwrap_or(binding_namespace);
            user.username == format!("system:serviceaccount:{ns}:{name}")
        }
        _ => false,
    }
}

/// One rule matches the attributes.
pub fn rule_allows(rule: &Value, attrs: &Attributes) -> bool {
    let verbs = strings(&rule["verbs"]);
    if !verbs.iter().any(|v| *v == "*" || *v == attrs.verb) {
        return false;
    }
    if attrs.is_path() {
        return strings(&rule["nonResourceURLs"]).iter().any(|u| {
            *u == "*"
                || *u == attrs.path
                || u.strip_suffix('*')
                    .is_some_and(|prefix| attrs.path.starts_with(prefix))
        });
    }
    if !strings(&rule["apiGroups"])
        .iter()
        .any(|g| *g == "*" || *g == attrs.group)
    {
        return false;
    }
    let wanted = if attrs.subresource.is_empty() {
        attrs.resource.clone()
    } else {
        format!("{}/{}", attrs.resource, attrs.subresource)
    };
    let resource_ok = strings(&rule["resources"]).iter().any(|r| {
        *r == "*"
            || *r == wanted
            || (!attrs.subresource.is_empty() && *r == format!("*/{}", attrs.subresource))
    });
    if !resource_ok {
        return false;
    }
    let names = strings(&rule["resourceNames"]);
    names.is_empty() || (!attrs.name.is_empty() && names.contains(&attrs.name.as_str()))
}

/// The rules `user` holds in `namespace` (cluster-wide ones included); `namespace` empty for the
/// cluster scope only.
pub fn rules_of(store: &Store, user: &UserInfo, namespace: &str) -> Vec<Value> {
    let role = |storage: &str, ns: &str, name: &str| store.get(storage, ns, name);
    let mut rules = Vec::new();
    let (bindings, _) = store.list("clusterrolebindings", None);
    for binding in bindings {
        if binding["roleRef"]["kind"] != "ClusterRole"
            || !strings_of(&binding["subjects"]).any(|s| subject_matches(s, user, ""))
        {
            continue;
        }
        if let Some(r) = role(
            "clusterroles",
            "",
            binding["roleRef"]["name"].as_str().unwrap_or_default(),
        ) {
            rules.extend(r["rules"].as_array().cloned().unwrap_or_default());
        }
    }
    if !namespace.is_empty() {
        let (bindings, _) = store.list("rolebindings", Some(namespace));
        for binding in bindings {
            if !strings_of(&binding["subjects"]).any(|s| subject_matches(s, user, namespace)) {
                continue;
            }
            let name = binding["roleRef"]["name"].as_str().unwrap_or_default();
            let found = match binding["roleRef"]["kind"].as_str() {
                Some("Role") => role("roles", namespace, name),
                Some("ClusterRole") => role("clusterroles", "", name),
                _ => None,
            };
            if let Some(r) = found {
                rules.extend(r["rules"].as_array().cloned().unwrap_or_default());
            }
        }
    }
    rules
}

fn strings_of(v: &Value) -> impl Iterator<Item = &Value> {
    v.as_array().into_iter().flatten()
}

/// Whether `user` may do what `attrs` say.
pub fn authorize(store: &Store, user: &UserInfo, attrs: &Attributes) -> bool {
    user.is_master()
        || rules_of(store, user, &attrs.namespace)
            .iter()
            .any(|rule| rule_allows(rule, attrs))
}

/// Signs and verifies service account tokens.
pub struct TokenIssuer {
    key: ring::hmac::Key,
}

impl Default for TokenIssuer {
    fn default() -> Self {
        Self::with_secret(&Self::new_secret())
    }
}

impl TokenIssuer {
    /// A new random signing secret.
    pub fn new_secret() -> [u8; 32] {
        use rand::Rng as _;
        rand::rng().random()
    }

    /// An issuer signing with `secret` (kept across restarts, as upstream keeps its
    /// `--service-account-signing-key-file`, so tokens issued before a restart stay valid).
    pub fn with_secret(secret: &[u8]) -> Self {
        Self {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret),
        }
    }
}

/// Issuer of the tokens (the `iss` claim).
pub const ISSUER: &str = "https://devcluster.local";
/// Default audience, as upstream's API server audience.
pub const AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// The claims of a verified service account token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccountClaims {
    /// Namespace of the service account.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its uid when the token was issued.
    pub uid: String,
    /// Expiry (Unix seconds).
    pub expires: i64,
}

impl TokenIssuer {
    /// A token for the service account, valid `seconds`; returns it and its expiry (Unix seconds).
    pub fn issue(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
        audiences: &[String],
        seconds: i64,
    ) -> (String, i64) {
        let now = now_unix();
        let expires = now + seconds;
        let header = json!({"alg": "HS256", "typ": "JWT", "kid": "devcluster"});
        let claims = json!({
            "iss": ISSUER,
            "sub": format!("system:serviceaccount:{namespace}:{name}"),
            "aud": audiences,
            "iat": now,
            "nbf": now,
            "exp": expires,
            "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": name, "uid": uid}},
        });
        let signing_input = format!(
            "{}.{}",
            b64url(&serde_json::to_vec(&header).expect("JSON")),
            b64url(&serde_json::to_vec(&claims).expect("JSON"))
        );
        let signature = ring::hmac::sign(&self.key, signing_input.as_bytes());
        (format!("{signing_input}.{}", b64url(signature.as_ref())), expires)
    }

    /// The claims of `token` when this server signed it and it has not expired.
    pub fn verify(&self, token: &str) -> Option<ServiceAccountClaims> {
        let (signing_input, signature) = token.rsplit_once('.')?;
        let signature = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(signature)
            .ok()?;
        ring::hmac::verify(&self.key, signing_input.as_bytes(), &signature).ok()?;
        let (_, claims) = signing_input.split_once('.')?;
        let claims: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(claims)
                .ok()?,
        )
        .ok()?;
        let now = now_unix();
        let expires = claims["exp"].as_i64()?;
        if expires <= now || claims["nbf"].as_i64().is_some_and(|nbf| nbf > now) {
            return None;
        }
        let k8s = &claims["kubernetes.io"];
        Some(ServiceAccountClaims {
            namespace: k8s["namespace"].as_str()?.to_string(),
            name: k8s["serviceaccount"]["name"].as_str()?.to_string(),
            uid: k8s["serviceaccount"]["uid"].as_str()?.to_string(),
            expires,
        })
    }
}

/// The ClusterRoles and ClusterRoleBindings every cluster starts with (upstream's bootstrap
/// policy, the part that matters here): cluster-admin for `system:masters`, discovery and
/// self-reviews for every authenticated user.
pub fn bootstrap_policy() -> Vec<(&'static str, Value)> {
    let role = |name: &str, rules: Value| {
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
               "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
               "rules": rules})
    };
    let binding = |name: &str, group: &str| {
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
               "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": group}]})
    };
    vec![
        (
            "clusterroles",
            role(
                "cluster-admin",
                json!([{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}, {"nonResourceURLs": ["*"], "verbs": ["*"]}]),
            ),
        ),
        ("clusterrolebindings", binding("cluster-admin", MASTERS)),
        (
            "clusterroles",
            role(
                "system:discovery",
                json!([{"nonResourceURLs": ["/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez", "/readyz",
                                            "/openapi", "/openapi/*", "/version", "/version/"], "verbs": ["get"]}]),
            ),
        ),
        ("clusterrolebindings", binding("system:discovery", AUTHENTICATED)),
        (
            "clusterroles",
            role(
                "system:basic-user",
                json!([
                    {"apiGroups": ["authorization.k8s.io"], "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"], "verbs": ["create"]},
                    {"apiGroups": ["authentication.k8s.io"], "resources": ["selfsubjectreviews"], "verbs": ["create"]}
                ]),
            ),
        ),
        ("clusterrolebindings", binding("system:basic-user", AUTHENTICATED)),
    ]
}

/// SelfSubjectRulesReview's status for `user` in `namespace`.
pub fn rules_review(store: &Store, user: &UserInfo, namespace: &str) -> Value {
    let rules = if user.is_master() {
        vec![
            json!({"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}),
            json!({"nonResourceURLs": ["*"], "verbs": ["*"]}),
        ]
    } else {
        rules_of(store, user, namespace)
    };
    let mut resource_rules = Vec::new();
    let mut non_resource_rules = Vec::new();
    for rule in rules {
        if rule
            .get("nonResourceURLs")
            .is_some_and(|u| u.as_array().is_some_and(|a| !a.is_empty()))
        {
            non_resource_rules
                .push(json!({"verbs": rule["verbs"], "nonResourceURLs": rule["nonResourceURLs"]}));
        } else {
            let mut r: BTreeMap<&str, Value> = BTreeMap::new();
            for key in ["verbs", "apiGroups", "resources", "resourceNames"] {
                if let Some(v) = rule.get(key).filter(|v| !v.is_null()) {
                    r.insert(key, v.clone());
                }
            }
            resource_rules.push(json!(r));
        }
    }
    json!({"resourceRules": resource_rules, "nonResourceRules": non_resource_rules, "incomplete": false})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(verb: &str, group: &str, resource: &str, ns: &str, name: &str) -> Attributes {
        Attributes {
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            namespace: ns.into(),
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn rules_match_as_upstream() {
        let rule =
            json!({"apiGroups": [""], "resources": ["pods", "pods/status"], "verbs": ["get", "patch"]});
        assert!(rule_allows(&rule, &attrs("get", "", "pods", "x", "p")));
        assert!(!rule_allows(&rule, &attrs("delete", "", "pods", "x", "p")));
        assert!(!rule_allows(&rule, &attrs("get", "apps", "pods", "x", "p")));
        let mut status = attrs("patch", "", "pods", "x", "p");
        status.subresource = "status".into();
        assert!(rule_allows(&rule, &status));
        status.subresource = "log".into();
        assert!(!rule_allows(&rule, &status));
        let named = json!({"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["l"], "verbs": ["get"]});
        assert!(rule_allows(
            &named,
            &attrs("get", "coordination.k8s.io", "leases", "x", "l")
        ));
        assert!(!rule_allows(
            &named,
            &attrs("get", "coordination.k8s.io", "leases", "x", "other")
        ));
        assert!(!rule_allows(
            &named,
            &attrs("get", "coordination.k8s.io", "leases", "x", "")
        ));
        let path = json!({"nonResourceURLs": ["/apis/*"], "verbs": ["get"]});
        let mut p = Attributes {
            verb: "get".into(),
            path: "/apis/node.k8s.io".into(),
            ..Default::default()
        };
        assert!(rule_allows(&path, &p));
        p.path = "/metrics".into();
        assert!(!rule_allows(&path, &p));
    }

    #[test]
    fn forbidden_messages_read_as_upstream() {
        let user = UserInfo::service_account("ns", "sa", "u");
        assert_eq!(
            forbidden_message(&user, &attrs("list", "", "pods", "x", "")),
            r#"User "system:serviceaccount:ns:sa" cannot list resource "pods" in API group "" in the namespace "x""#
        );
        assert_eq!(
            forbidden_message(&user, &attrs("watch", "node.k8s.io", "runtimeclasses", "", "")),
            r#"User "system:serviceaccount:ns:sa" cannot watch resource "runtimeclasses" in API group "node.k8s.io" at the cluster scope"#
        );
    }

    #[test]
    fn tokens_verify_only_untampered_and_unexpired() {
        let issuer = TokenIssuer::default();
        let (token, _) = issuer.issue("ns", "sa", "uid-1", &[AUDIENCE.into()], 60);
        let claims = issuer.verify(&token).unwrap();
        assert_eq!(
            (
                claims.namespace.as_str(),
                claims.name.as_str(),
                claims.uid.as_str()
            ),
            ("ns", "sa", "uid-1")
        );
        let mut forged = token.clone();
        forged.push('x');
        assert!(issuer.verify(&forged).is_none());
        assert!(
            TokenIssuer::default().verify(&token).is_none(),
            "another server's key"
        );
        let (expired, _) = issuer.issue("ns", "sa", "uid-1", &[], -1);
        assert!(issuer.verify(&expired).is_none());
    }
}
