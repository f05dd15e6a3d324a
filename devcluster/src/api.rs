//! The Kubernetes REST API over the store: routing, discovery, get/list/watch, create, update,
//! patch, delete, Table output and the two views of Events. Transport-free: [`crate::server`]
//! turns HTTP into [`ApiRequest`]s and [`Reply`]s back into HTTP.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use crate::admission::{
    AdmissionPlugins, FieldValidation, Part, check_type, check_unknown_fields, name_of, prepare_create,
    prepare_update, random_suffix,
};
use crate::auth::{Attributes, TokenIssuer, UserInfo};
use crate::deletion::{self, DeleteOptions, Propagation};
use crate::discovery::{discovery_groups, discovery_resources};
use crate::events::{to_core_v1, to_events_v1};
use crate::managed;
use crate::patch::{json_patch, merge_patch, strategic_merge_patch};
use crate::query::{Filter, Page, object_key};
use crate::resources::{self, RESOURCES, Registry, ResourceDef};
use crate::status::ApiError;
use crate::store::{Change, ChangeKind, Outcome, Store, WatchStart};
use crate::table::{IncludeObject, table};

/// The Kubernetes version devcluster reports (kubectl picks its release from it).
pub const KUBERNETES_VERSION: &str = "v1.33.0";

/// A request, decoded from HTTP.
#[derive(Debug)]
pub struct ApiRequest {
    /// HTTP method.
    pub method: Method,
    /// URL path.
    pub path: String,
    /// Decoded query parameters.
    pub query: HashMap<String, String>,
    /// `Content-Type`, if any.
    pub content_type: Option<String>,
    /// `Accept`, or empty.
    pub accept: String,
    /// `User-Agent`, or empty (the default field manager is its part before the first `/`).
    pub user_agent: String,
    /// The body.
    pub body: Bytes,
    /// Who asks (authenticated, impersonation applied); `None` for devcluster itself (admin).
    pub user: Option<UserInfo>,
}

/// An answer.
pub enum Reply {
    /// A JSON document (object, list, Table or Status) with warnings for the `Warning` header.
    Json {
        /// HTTP status.
        code: u16,
        /// The document.
        body: Value,
        /// Warnings (e.g. unknown fields dropped).
        warnings: Vec<String>,
    },
    /// A watch: newline-delimited JSON events.
    Stream(mpsc::Receiver<Bytes>),
    /// Plain text (health endpoints).
    Text(u16, String),
}

impl Reply {
    fn ok(body: Value) -> Self {
        Reply::Json {
            code: 200,
            body,
            warnings: Vec::new(),
        }
    }
}

impl From<ApiError> for Reply {
    fn from(e: ApiError) -> Self {
        Reply::Json {
            code: e.code,
            body: e.to_status(),
            warnings: Vec::new(),
        }
    }
}

/// The API over one store.
pub struct Api {
    store: Arc<Store>,
    registry: Registry,
    /// Signs and verifies service account tokens (TokenRequest).
    pub issuer: TokenIssuer,
    /// How often watches that allow bookmarks get one.
    pub bookmark_interval: Duration,
    /// Admission plugins in effect.
    pub admission: AdmissionPlugins,
    /// Whether Pods have the `resize` subresource (Kubernetes 1.33 and later); without it the
    /// route is not found, as on older API servers.
    pub pod_resize: bool,
    /// Held while an eviction decides and deletes, so two never take the same allowed
    /// disruption of a PodDisruptionBudget.
    evictions: std::sync::Mutex<()>,
}

enum Route {
    Version,
    Health,
    CoreVersions,
    Groups,
    Group(String),
    ResourceList(String, String),
    OpenApiIndex,
    OpenApiGroupVersion(String),
    Resource {
        def: &'static ResourceDef,
        namespace: Option<String>,
        name: Option<String>,
        sub: Option<String>,
    },
}

fn route(registry: &Registry, path: &str) -> Result<Route, ApiError> {
    let segs: Vec<&str> = path
        .trim_end_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let (group, version, rest) = match segs.as_slice() {
        ["version"] => return Ok(Route::Version),
        ["livez"] | ["livez", ..] => return Ok(Route::Health),
        ["readyz"] | ["readyz", ..] => return Ok(Route::Health),
        ["healthz"] | ["healthz", ..] => return Ok(Route::Health),
        ["api"] => return Ok(Route::CoreVersions),
        ["openapi", "v3"] => return Ok(Route::OpenApiIndex),
        ["openapi", "v3", rest @ ..] => return Ok(Route::OpenApiGroupVersion(rest.join("/"))),
        ["apis"] => return Ok(Route::Groups),
        ["apis", g] => return Ok(Route::Group(g.to_string())),
        ["api", v] => return Ok(Route::ResourceList(String::new(), v.to_string())),
        ["apis", g, v] => return Ok(Route::ResourceList(g.to_string(), v.to_string())),
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(ApiError::not_found_path(path)),
    };
    let find = |plural: &str| {
        registry
            .find(group, version, plural)
            .ok_or_else(|| ApiError::not_found_path(path))
    };
    let is_resource = |plural: &str| {
        registry
            .find(group, version, plural)
            .is_some_and(|d| d.namespaced)
    };
    let owned = |s: &&str| Some(s.to_string());
    let (def, namespace, tail) = match rest {
        ["namespaces", ns, plural, tail @ ..] if is_resource(plural) => (find(plural)?, owned(ns), tail),
        [plural, tail @ ..] => {
            let def = find(plural)?;
            if def.namespaced && !tail.is_empty() {
                return Err(ApiError::not_found_path(path));
            }
            (def, None, tail)
        }
        [] => return Err(ApiError::not_found_path(path)),
    };
    let (name, sub) = match tail {
        [] => (None, None),
        [name] => (owned(name), None),
        [name, sub] => (owned(name), owned(sub)),
        _ => return Err(ApiError::not_found_path(path)),
    };
    Ok(Route::Resource {
        def,
        namespace,
        name,
        sub,
    })
}

/// Whether the client asks for a Table first (kubectl lists the Table types before plain JSON).
fn wants_table(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=Table"))
}

/// Whether the client asks for metadata only (`as=PartialObjectMetadata` for an object or a watch,
/// `as=PartialObjectMetadataList` for a list), as kube-rs's metadata calls and the garbage
/// collector do: upstream then answers `meta.k8s.io/v1` PartialObjectMetadata, which carries no
/// `data`, `spec` or `status`.
fn wants_metadata(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=PartialObjectMetadata"))
}

/// An object as a metadata-only request gets it.
fn metadata_only(obj: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata").cloned().unwrap_or(Value::Null),
    })
}

fn check_accept(accept: &str) -> Result<(), ApiError> {
    if accept.is_empty() {
        return Ok(());
    }
    let ok = accept.split(',').any(|a| {
        let media = a.split(';').next().unwrap_or("").trim();
        matches!(
            media,
            "application/json" | "*/*" | "application/*" | "application/yaml" | ""
        )
    });
    if ok {
        Ok(())
    } else {
        Err(ApiError::not_acceptable(accept))
    }
}

fn parse_body(content_type: Option<&str>, body: &[u8]) -> Result<Value, ApiError> {
    let media = content_type
        .unwrap_or("application/json")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    match media.as_str() {
        "application/json"
        | "application/merge-patch+json"
        | "application/json-patch+json"
        | "application/strategic-merge-patch+json"
        | "" => serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}"))),
        "application/yaml" | "application/apply-patch+yaml" => {
            let text = std::str::from_utf8(body)
                .map_err(|_| ApiError::bad_request("the request body is not UTF-8"))?;
            yaml_serde::from_str(text)
                .map_err(|e| ApiError::bad_request(format!("the request body is not valid YAML: {e}")))
        }
        crate::protobuf::PROTOBUF => crate::protobuf::decode(body),
        other => Err(ApiError::unsupported_media_type(other)),
    }
}

/// Converts a stored object to the form a definition serves (Events through events.k8s.io/v1).
fn present(def: &ResourceDef, obj: &Value) -> Value {
    if def.is_storage_form() {
        obj.clone()
    } else {
        to_events_v1(obj)
    }
}

/// Converts a written object to the stored form.
fn to_storage(def: &ResourceDef, obj: Value) -> Value {
    if def.is_storage_form() {
        obj
    } else {
        to_core_v1(&obj)
    }
}

/// The definition objects of a storage are stored as.
fn storage_def(def: &'static ResourceDef) -> &'static ResourceDef {
    if def.is_storage_form() {
        def
    } else {
        RESOURCES
            .iter()
            .find(|r| r.storage == def.storage && r.is_storage_form())
            .unwrap_or(def)
    }
}

/// The field manager of a write: `?fieldManager=`, else the User-Agent up to its first `/`, as
/// upstream.
fn field_manager(req: &ApiRequest) -> String {
    match req.query.get("fieldManager").filter(|m| !m.is_empty()) {
        Some(m) => m.clone(),
        None => req
            .user_agent
            .split('/')
            .next()
            .filter(|s| !s.is_empty())
            .unwrap_or("unknown")
            .to_string(),
    }
}

/// Equal but for managedFields (whose timestamps change on every write).
fn same_content(a: &Value, b: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("managedFields");
        }
        v
    };
    strip(a) == strip(b)
}

fn query_flag(q: &HashMap<String, String>, key: &str) -> bool {
    q.get(key).is_some_and(|v| v == "true" || v == "1")
}

impl Api {
    /// An API over `store`.
    pub fn new(store: Arc<Store>) -> Self {
        Self {
            store,
            registry: Registry::default(),
            issuer: TokenIssuer::default(),
            bookmark_interval: Duration::from_secs(10),
            admission: AdmissionPlugins::default(),
            pod_resize: true,
            evictions: std::sync::Mutex::new(()),
        }
    }

    /// The store behind the API.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The kinds this server serves.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Serves the custom resources the stored CustomResourceDefinitions define, and no others;
    /// the objects of a kind no longer defined are deleted with it, as upstream does.
    pub fn serve_custom_resources(&self) {
        let (crds, _) = self.store.list("customresourcedefinitions", None);
        let kinds: Vec<_> = crds
            .iter()
            .filter(|crd| crd.pointer("/metadata/deletionTimestamp").is_none())
            .flat_map(|crd| crate::crd::kinds_of(crd))
            .collect();
        for storage in self.registry.set_custom(&kinds) {
            self.store.delete_all(storage);
        }
    }

    /// Creates `default`, `kube-system`, `kube-public` and `kube-node-lease`, as a fresh cluster has.
    pub fn bootstrap(&self) {
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
            // Creating a namespace that does not exist yet cannot fail.
            let _ = self.create(resources::namespaces(), "", obj, false, "devcluster");
        }
        for (plural, obj) in crate::auth::bootstrap_policy() {
            if let Some(def) = resources::find("rbac.authorization.k8s.io", "v1", plural) {
                // Already there after a restart from a state file.
                if let Err(e) = self.create(def, "", obj, false, "devcluster")
                    && e.code != 409
                {
                    tracing::error!(error = %e.message, "creating the bootstrap RBAC policy failed");
                }
            }
        }
    }

    /// What a request asks to do, for RBAC.
    fn attributes(req: &ApiRequest, route: &Route) -> Attributes {
        let method = req.method.as_str().to_ascii_lowercase();
        match route {
            Route::Resource {
                def,
                namespace,
                name,
                sub,
            } => {
                let verb = match (&req.method, name) {
                    (&Method::GET, Some(_)) | (&Method::HEAD, Some(_)) => "get",
                    (&Method::GET, None) if query_flag(&req.query, "watch") => "watch",
                    (&Method::GET, None) => "list",
                    (&Method::POST, _) => "create",
                    (&Method::PUT, _) => "update",
                    (&Method::PATCH, _) => "patch",
                    (&Method::DELETE, Some(_)) => "delete",
                    (&Method::DELETE, None) => "deletecollection",
                    _ => method.as_str(),
                };
                // A list or watch of one object by name is authorized against that name.
                let by_field = || {
                    req.query.get("fieldSelector").and_then(|f| {
                        f.split(',')
                            .find_map(|term| term.strip_prefix("metadata.name="))
                            .map(str::to_string)
                    })
                };
                Attributes {
                    verb: verb.to_string(),
                    group: def.group.to_string(),
                    resource: def.plural.to_string(),
                    subresource: sub.clone().unwrap_or_default(),
                    namespace: namespace.clone().unwrap_or_default(),
                    name: name.clone().or_else(by_field).unwrap_or_default(),
                    path: String::new(),
                }
            }
            _ => Attributes {
                verb: method,
                path: req.path.clone(),
                ..Default::default()
            },
        }
    }

    /// Serves one request.
    pub fn handle(&self, req: ApiRequest) -> Reply {
        match self.dispatch(req) {
            Ok(reply) => reply,
            Err(e) => e.into(),
        }
    }

    fn dispatch(&self, req: ApiRequest) -> Result<Reply, ApiError> {
        let route = route(&self.registry, &req.path)?;
        if let Some(user) = &req.user {
            let attrs = Self::attributes(&req, &route);
            if !crate::auth::authorize(&self.store, user, &attrs) {
                return Err(match &route {
                    Route::Resource { def, .. } => ApiError::forbidden_by_rbac(
                        def,
                        &attrs.name,
                        &crate::auth::forbidden_message(user, &attrs),
                    ),
                    _ => ApiError::forbidden_path(&crate::auth::forbidden_message(user, &attrs)),
                });
            }
        }
        let get_only = |reply: Reply| {
            if req.method == Method::GET {
                Ok(reply)
            } else {
                Err(ApiError::method_not_allowed(req.method.as_str(), &req.path))
            }
        };
        match route {
            Route::Version => get_only(Reply::ok(json!({
                "major": "1", "minor": "33", "gitVersion": KUBERNETES_VERSION,
                "gitCommit": "devcluster", "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
                "goVersion": "rust", "compiler": "rustc", "platform": "linux/amd64"
            }))),
            Route::Health => get_only(Reply::Text(200, "ok".into())),
            Route::CoreVersions => get_only(Reply::ok(json!({
                "kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]
            }))),
            Route::Groups => get_only(Reply::ok(discovery_groups(&self.registry))),
            Route::Group(g) => {
                let group = discovery_groups(&self.registry)["groups"]
                    .as_array()
                    .and_then(|gs| gs.iter().find(|x| x["name"] == g.as_str()).cloned())
                    .ok_or_else(|| ApiError::not_found_path(&req.path))?;
                let mut group = group;
                group["kind"] = json!("APIGroup");
                group["apiVersion"] = json!("v1");
                get_only(Reply::ok(group))
            }
            Route::ResourceList(g, v) => get_only(Reply::ok(
                discovery_resources(&self.registry, &g, &v, self.pod_resize)
                    .ok_or_else(|| ApiError::not_found_path(&req.path))?,
            )),
            Route::OpenApiIndex => get_only(Reply::ok(crate::openapi::index(&self.registry))),
            Route::OpenApiGroupVersion(gv) => get_only(Reply::ok(
                crate::openapi::group_version(&self.registry, &gv)
                    .ok_or_else(|| ApiError::not_found_path(&req.path))?,
            )),
            Route::Resource {
                def,
                namespace,
                name,
                sub,
            } => {
                let write = req.method != Method::GET;
                let reply = self.resource(&req, def, namespace, name, sub);
                if write && def.kind == "CustomResourceDefinition" {
                    self.serve_custom_resources();
                }
                reply
            }
        }
    }

    fn resource(
        &self,
        req: &ApiRequest,
        def: &'static ResourceDef,
        namespace: Option<String>,
        name: Option<String>,
        sub: Option<String>,
    ) -> Result<Reply, ApiError> {
        check_accept(&req.accept)?;
        if def.create_only {
            return self.review(req, def);
        }
        if def.plural == "serviceaccounts" && sub.as_deref() == Some("token") {
            return self.token_request(req, namespace.unwrap_or_default(), name.unwrap_or_default());
        }
        if def.kind == "Pod" && def.group.is_empty() && sub.as_deref() == Some("eviction") {
            return self.evict(req, namespace.unwrap_or_default(), name.unwrap_or_default());
        }
        let q = &req.query;
        let part = match sub.as_deref() {
            None => Part::Main,
            Some("status") if def.has_status => Part::Status,
            Some("resize") if self.pod_resize && def.kind == "Pod" && def.group.is_empty() => Part::Resize,
            Some("ephemeralcontainers") if def.kind == "Pod" && def.group.is_empty() => {
                Part::EphemeralContainers
            }
            Some(_) => return Err(ApiError::not_found_path(&req.path)),
        };
        let ns = namespace.clone().unwrap_or_default();
        if def.namespaced
            && let Some(ns) = &namespace
            && req.method != Method::GET
            && self.store.get("namespaces", "", ns).is_none()
        {
            return Err(ApiError::not_found(resources::namespaces(), ns));
        }
        let dry_run = q.get("dryRun").is_some_and(|v| v == "All");
        let validation = FieldValidation::parse(q.get("fieldValidation").map(String::as_str))?;
        match (&req.method, name) {
            (&Method::GET, None) if query_flag(q, "watch") => self.watch(def, namespace, q, &req.accept),
            (&Method::GET, None) => self.list(def, namespace, q, &req.accept),
            (&Method::GET, Some(name)) => {
                let obj = self
                    .store
                    .get(def.storage, &ns, &name)
                    .ok_or_else(|| ApiError::not_found(def, &name))?;
                let obj = present(def, &obj);
                if wants_table(&req.accept) {
                    let rv = obj
                        .pointer("/metadata/resourceVersion")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string();
                    return Ok(Reply::ok(table(
                        def,
                        &[obj],
                        &rv,
                        IncludeObject::parse(q.get("includeObject").map(String::as_str)),
                    )));
                }
                if wants_metadata(&req.accept) {
                    return Ok(Reply::ok(metadata_only(&obj)));
                }
                Ok(Reply::ok(obj))
            }
            (&Method::POST, None) => {
                let body = parse_body(req.content_type.as_deref(), &req.body)?;
                let (obj, warnings) =
                    self.create_reply(def, &ns, body, validation, dry_run, &field_manager(req))?;
                Ok(Reply::Json {
                    code: 201,
                    body: obj,
                    warnings,
                })
            }
            (&Method::PUT, Some(name)) => {
                let mut body = parse_body(req.content_type.as_deref(), &req.body)?;
                check_type(def, &mut body)?;
                let warnings = check_unknown_fields(def, &mut body, validation)?;
                let body = to_storage(def, body);
                let manager = field_manager(req);
                let (obj, change) = self.store.transact_with(
                    def.storage,
                    (ns.clone(), name.clone()),
                    dry_run,
                    |reader, current| {
                        let Some(current) = current else {
                            // PUT creates when the object does not exist (main resource only), as upstream.
                            if part != Part::Main {
                                return Err(ApiError::not_found(def, &name));
                            }
                            let mut body = body.clone();
                            body["metadata"]["name"] = json!(name);
                            let mut obj =
                                prepare_create(storage_def(def), &ns, body, reader, &self.admission)?;
                            managed::record_update(None, &mut obj, &manager, "");
                            return Ok(Outcome::Put(obj));
                        };
                        let mut obj = prepare_update(storage_def(def), current, body.clone(), part)?;
                        if same_content(&obj, current) {
                            return Ok(Outcome::Unchanged);
                        }
                        if part == Part::Resize {
                            crate::admission::admit_pod_resize(def, current, &obj, reader)?;
                        }
                        managed::record_update(Some(current), &mut obj, &manager, part.subresource());
                        Ok(deletion::finalized(obj))
                    },
                )?;
                let obj = obj.ok_or_else(|| ApiError::not_found(def, &name))?;
                self.after_update(change, &obj);
                Ok(Reply::Json {
                    code: 200,
                    body: present(def, &obj),
                    warnings,
                })
            }
            (&Method::PATCH, Some(name)) => self.patch(req, def, &ns, &name, part, validation, dry_run),
            (&Method::DELETE, Some(name)) => self.delete(req, def, &ns, &name, dry_run),
            (&Method::DELETE, None) => self.delete_collection(def, namespace, q, dry_run),
            (method, _) => Err(ApiError::method_not_allowed(method.as_str(), &req.path)),
        }
    }

    /// `POST pods/<name>/eviction`: the Pod is deleted (with the eviction's delete options) when
    /// the PodDisruptionBudget selecting it allows (see [`crate::disruption`]), else 429.
    fn evict(&self, req: &ApiRequest, ns: String, name: String) -> Result<Reply, ApiError> {
        if req.method != Method::POST {
            return Err(ApiError::method_not_allowed(req.method.as_str(), &req.path));
        }
        let body = parse_body(req.content_type.as_deref(), &req.body)?;
        // The kind and version may be left out (the route says them), as upstream decodes it.
        let kind = body["kind"].as_str().unwrap_or("Eviction");
        let api_version = body["apiVersion"].as_str().unwrap_or("policy/v1");
        if kind != "Eviction" || !matches!(api_version, "policy/v1" | "policy/v1beta1") {
            return Err(ApiError::bad_request(format!(
                "expected an Eviction of policy/v1 (or policy/v1beta1), got {kind} of {api_version}"
            )));
        }
        if body.pointer("/metadata/name").and_then(Value::as_str) != Some(name.as_str()) {
            return Err(ApiError::bad_request(
                "name in URL does not match name in Eviction object",
            ));
        }
        let dry_run = req.query.get("dryRun").is_some_and(|v| v == "All");
        let options = DeleteOptions::parse(&body["deleteOptions"], &req.query, dry_run)?;
        let _one_at_a_time = self.evictions.lock().unwrap_or_else(|e| e.into_inner());
        let pod = self
            .store
            .get("pods", &ns, &name)
            .ok_or_else(|| ApiError::not_found(resources::pods(), &name))?;
        let (pods, _) = self.store.list("pods", Some(&ns));
        let (budgets, _) = self.store.list("poddisruptionbudgets", Some(&ns));
        crate::disruption::eviction_allowed(&pod, &pods, &budgets)?;
        self.delete_object(storage_def(resources::pods()), &ns, &name, &options, 0)?;
        Ok(Reply::Json {
            code: 201,
            body: json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
            warnings: Vec::new(),
        })
    }

    /// Reviews: computed from the request and returned, never stored.
    fn review(&self, req: &ApiRequest, def: &'static ResourceDef) -> Result<Reply, ApiError> {
        if req.method != Method::POST {
            return Err(ApiError::method_not_allowed(req.method.as_str(), &req.path));
        }
        let mut body = parse_body(req.content_type.as_deref(), &req.body)?;
        check_type(def, &mut body)?;
        let admin = UserInfo::admin();
        let me = req.user.as_ref().unwrap_or(&admin);
        let attributes = |spec: &Value| -> Attributes {
            let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
            if let Some(r) = spec.get("resourceAttributes").filter(|v| v.is_object()) {
                Attributes {
                    verb: text(&r["verb"]),
                    group: text(&r["group"]),
                    resource: text(&r["resource"]),
                    subresource: text(&r["subresource"]),
                    namespace: text(&r["namespace"]),
                    name: text(&r["name"]),
                    path: String::new(),
                }
            } else {
                let n = &spec["nonResourceAttributes"];
                Attributes {
                    verb: text(&n["verb"]),
                    path: text(&n["path"]),
                    ..Default::default()
                }
            }
        };
        let access = |user: &UserInfo, spec: &Value| {
            let attrs = attributes(spec);
            let allowed = crate::auth::authorize(&self.store, user, &attrs);
            let mut status = json!({"allowed": allowed});
            if allowed {
                status["reason"] = json!("allowed by RBAC");
            }
            status
        };
        let status = match def.kind {
            "SelfSubjectAccessReview" => access(me, &body["spec"]),
            "SubjectAccessReview" => {
                let spec = &body["spec"];
                let username = spec["user"].as_str().unwrap_or_default().to_string();
                let mut groups: Vec<String> = spec["groups"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|g| g.as_str().map(String::from)).collect())
                    .unwrap_or_default();
                if let Some((ns, _)) = crate::auth::parse_service_account(&username)
                    && groups.is_empty()
                {
                    groups = crate::auth::service_account_groups(ns);
                }
                let subject = UserInfo {
                    username,
                    uid: spec["uid"].as_str().unwrap_or_default().to_string(),
                    groups,
                };
                access(&subject, spec)
            }
            "SelfSubjectRulesReview" => {
                let ns = body["spec"]["namespace"].as_str().unwrap_or_default().to_string();
                crate::auth::rules_review(&self.store, me, &ns)
            }
            "SelfSubjectReview" => json!({"userInfo": me.to_json()}),
            other => return Err(ApiError::internal(format!("no review for {other}"))),
        };
        body["status"] = status;
        body["metadata"]["creationTimestamp"] = json!(crate::admission::now());
        Ok(Reply::Json {
            code: 201,
            body,
            warnings: Vec::new(),
        })
    }

    /// `POST .../serviceaccounts/NAME/token` (TokenRequest): a signed, expiring token bound to the
    /// ServiceAccount (it stops working when the ServiceAccount is deleted).
    fn token_request(&self, req: &ApiRequest, namespace: String, name: String) -> Result<Reply, ApiError> {
        if req.method != Method::POST {
            return Err(ApiError::method_not_allowed(req.method.as_str(), &req.path));
        }
        let def = resources::find("", "v1", "serviceaccounts").expect("serviceaccounts are served");
        let sa = self
            .store
            .get("serviceaccounts", &namespace, &name)
            .ok_or_else(|| ApiError::not_found(def, &name))?;
        let uid = sa
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let body = parse_body(req.content_type.as_deref(), &req.body)?;
        let spec = &body["spec"];
        // Upstream's default is an hour; devcluster also accepts lifetimes below upstream's
        // 10-minute minimum, so tests can watch a token expire.
        let seconds = spec["expirationSeconds"].as_i64().unwrap_or(3600);
        if !(1..=48 * 3600).contains(&seconds) {
            return Err(ApiError::invalid_request(format!(
                "spec.expirationSeconds: Invalid value: {seconds}: must be between 1 second and 48 hours"
            )));
        }
        let audiences: Vec<String> = spec["audiences"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect())
            .filter(|a: &Vec<String>| !a.is_empty())
            .unwrap_or_else(|| vec![crate::auth::AUDIENCE.to_string()]);
        let (token, expires) = self.issuer.issue(&namespace, &name, &uid, &audiences, seconds);
        let expiration = chrono::DateTime::from_timestamp(expires, 0)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_default();
        Ok(Reply::Json {
            code: 201,
            body: json!({
                "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "metadata": {"name": name, "namespace": namespace, "creationTimestamp": crate::admission::now()},
                "spec": {"audiences": audiences, "expirationSeconds": seconds, "boundObjectRef": null},
                "status": {"token": token, "expirationTimestamp": expiration},
            }),
            warnings: Vec::new(),
        })
    }

    /// Authenticates a bearer token that is not the admin token: a service account token this
    /// server issued, whose ServiceAccount still exists with the uid it was issued for.
    pub fn authenticate_service_account(&self, token: &str) -> Option<UserInfo> {
        let claims = self.issuer.verify(token)?;
        let sa = self
            .store
            .get("serviceaccounts", &claims.namespace, &claims.name)?;
        (sa.pointer("/metadata/uid").and_then(Value::as_str) == Some(claims.uid.as_str()))
            .then(|| UserInfo::service_account(&claims.namespace, &claims.name, &claims.uid))
    }

    /// Whether `user` may act as `target` (and its groups), as upstream's impersonation filter
    /// checks: `impersonate` on users (or on the ServiceAccount) and on each group.
    pub fn may_impersonate(&self, user: &UserInfo, target: &UserInfo) -> bool {
        let allowed = |attrs: Attributes| crate::auth::authorize(&self.store, user, &attrs);
        let user_ok = match crate::auth::parse_service_account(&target.username) {
            Some((ns, name)) => allowed(Attributes {
                verb: "impersonate".into(),
                resource: "serviceaccounts".into(),
                namespace: ns.into(),
                name: name.into(),
                ..Default::default()
            }),
            None => allowed(Attributes {
                verb: "impersonate".into(),
                resource: "users".into(),
                name: target.username.clone(),
                ..Default::default()
            }),
        };
        user_ok
            && target
                .groups
                .iter()
                .filter(|g| *g != crate::auth::AUTHENTICATED)
                .all(|g| {
                    allowed(Attributes {
                        verb: "impersonate".into(),
                        resource: "groups".into(),
                        name: g.clone(),
                        ..Default::default()
                    })
                })
    }

    fn create_reply(
        &self,
        def: &'static ResourceDef,
        ns: &str,
        mut body: Value,
        validation: FieldValidation,
        dry_run: bool,
        manager: &str,
    ) -> Result<(Value, Vec<String>), ApiError> {
        check_type(def, &mut body)?;
        let warnings = check_unknown_fields(def, &mut body, validation)?;
        let obj = self.create(def, ns, body, dry_run, manager)?;
        Ok((present(def, &obj), warnings))
    }

    /// Creates an object (already type-checked), generating its name from `generateName` when it
    /// has none (retrying on the rare collision).
    fn create(
        &self,
        def: &'static ResourceDef,
        ns: &str,
        body: Value,
        dry_run: bool,
        manager: &str,
    ) -> Result<Value, ApiError> {
        let body = to_storage(def, body);
        let sdef = storage_def(def);
        let prefix = body
            .pointer("/metadata/generateName")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let generated = name_of(&body).is_empty() && !prefix.is_empty();
        for _ in 0..8 {
            let mut body = body.clone();
            if generated {
                body["metadata"]["name"] = json!(format!("{prefix}{}", random_suffix()));
            }
            let name = name_of(&body).to_string();
            let key = (
                if def.namespaced {
                    ns.to_string()
                } else {
                    String::new()
                },
                name.clone(),
            );
            let mut dry = None;
            let result = self.store.transact(sdef.storage, key, |reader, current| {
                // Validation and admission come first, storage's AlreadyExists last, as in
                // kube-apiserver: a create into a namespace at its quota is refused for the quota
                // even when the name is taken.
                let mut obj = prepare_create(sdef, ns, body, reader, &self.admission)?;
                if current.is_some() {
                    return Err(ApiError::already_exists(def, &name));
                }
                managed::record_update(None, &mut obj, manager, "");
                if dry_run {
                    dry = Some(obj);
                    return Ok(Outcome::Unchanged);
                }
                Ok(Outcome::Put(obj))
            });
            match result {
                Ok((Some(obj), Some(_))) => return Ok((*obj).clone()),
                Ok(_) => return dry.ok_or_else(|| ApiError::internal("dry run produced no object")),
                Err(e) if generated && e.reason == "AlreadyExists" => continue,
                Err(e) => return Err(e),
            }
        }
        Err(ApiError::internal(format!(
            "could not generate a unique name from generateName {prefix:?}"
        )))
    }

    fn list(
        &self,
        def: &'static ResourceDef,
        namespace: Option<String>,
        q: &HashMap<String, String>,
        accept: &str,
    ) -> Result<Reply, ApiError> {
        let filter = Filter::new(def, namespace.clone(), q)?;
        let (items, rv) = self.store.list(def.storage, namespace.as_deref());
        let page = Page::parse(q)?;
        let matching: Vec<&Arc<Value>> = items
            .iter()
            .filter(|o| filter.matches(o))
            .filter(|o| page.after.as_ref().is_none_or(|after| object_key(o) > *after))
            .collect();
        let (shown, rest) = match page.limit {
            Some(limit) if matching.len() > limit => matching.split_at(limit),
            _ => (matching.as_slice(), &[][..]),
        };
        let items: Vec<Value> = shown.iter().map(|o| present(def, o)).collect();
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        if let Some(last) = shown.last().filter(|_| !rest.is_empty()) {
            metadata["continue"] = json!(Page::token(&object_key(last)));
            metadata["remainingItemCount"] = json!(rest.len());
        }
        if wants_table(accept) {
            let mut t = table(
                def,
                &items,
                &rv.to_string(),
                IncludeObject::parse(q.get("includeObject").map(String::as_str)),
            );
            t["metadata"] = metadata;
            return Ok(Reply::ok(t));
        }
        if wants_metadata(accept) {
            return Ok(Reply::ok(json!({
                "kind": "PartialObjectMetadataList",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": metadata,
                "items": items.iter().map(metadata_only).collect::<Vec<_>>(),
            })));
        }
        Ok(Reply::ok(json!({
            "kind": format!("{}List", def.kind),
            "apiVersion": def.api_version(),
            "metadata": metadata,
            "items": items,
        })))
    }

    fn watch(
        &self,
        def: &'static ResourceDef,
        namespace: Option<String>,
        q: &HashMap<String, String>,
        accept: &str,
    ) -> Result<Reply, ApiError> {
        let filter = Filter::new(def, namespace, q)?;
        let start = match q.get("resourceVersion").map(String::as_str) {
            None | Some("") | Some("0") => WatchStart::Snapshot,
            Some(raw) => WatchStart::After(
                raw.parse()
                    .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {raw:?}")))?,
            ),
        };
        let timeout = q
            .get("timeoutSeconds")
            .and_then(|t| t.parse::<u64>().ok())
            .map_or(Duration::from_secs(1800), Duration::from_secs);
        let bookmarks = query_flag(q, "allowWatchBookmarks");
        // The watch-list protocol: every object as ADDED, then a bookmark marking the end of the
        // initial events.
        let initial_events = query_flag(q, "sendInitialEvents");
        if initial_events {
            if q.get("resourceVersionMatch").map(String::as_str) != Some("NotOlderThan") {
                return Err(ApiError::invalid_request(
                    "resourceVersionMatch: Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
                ));
            }
            if !bookmarks {
                return Err(ApiError::invalid_request(
                    "allowWatchBookmarks: Forbidden: sendInitialEvents requires setting allowWatchBookmarks to true",
                ));
            }
        }
        let start = if initial_events {
            WatchStart::Snapshot
        } else {
            start
        };
        let as_table =
            wants_table(accept).then(|| IncludeObject::parse(q.get("includeObject").map(String::as_str)));
        let as_metadata = wants_metadata(accept);
        let (tx, rx) = mpsc::channel::<Bytes>(64);
        let feed = match self.store.watch(def.storage, start) {
            Ok(feed) => feed,
            Err(gone) => {
                // A too-old resourceVersion is answered like upstream: one ERROR event, then the end.
                let _ = tx.try_send(event_line("ERROR", &gone.to_status()));
                return Ok(Reply::Stream(rx));
            }
        };
        let interval = self.bookmark_interval;
        tokio::spawn(async move {
            let mut stream = WatchStream {
                def,
                filter,
                as_table,
                as_metadata,
                sent_columns: false,
                last_rv: feed.rv,
                tx,
            };
            for change in &feed.backlog {
                if !stream.send(change).await {
                    return;
                }
            }
            if initial_events {
                let end = json!({
                    "kind": def.kind, "apiVersion": def.api_version(),
                    "metadata": {"resourceVersion": feed.rv.to_string(), "annotations": {"k8s.io/initial-events-end": "true"}}
                });
                if stream.tx.send(event_line("BOOKMARK", &end)).await.is_err() {
                    return;
                }
            }
            let mut live = feed.live;
            let mut ended = feed.ended;
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            let mut ticker = tokio::time::interval(interval);
            ticker.tick().await;
            loop {
                tokio::select! {
                    _ = &mut deadline => return,
                    _ = ended.changed() => return,
                    _ = stream.tx.closed() => return,
                    _ = ticker.tick(), if bookmarks => {
                        let bookmark = json!({
                            "kind": def.kind, "apiVersion": def.api_version(),
                            "metadata": {"resourceVersion": stream.last_rv.to_string()}
                        });
                        if stream.tx.send(event_line("BOOKMARK", &bookmark)).await.is_err() {
                            return;
                        }
                    }
                    change = live.recv() => match change {
                        Ok(change) => {
                            if change.storage == def.storage && !stream.send(&change).await {
                                return;
                            }
                        }
                        // Too slow to keep up: end the watch; the client resumes from its last
                        // resourceVersion (or relists after 410).
                        Err(broadcast::error::RecvError::Lagged(_)) | Err(broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        });
        Ok(Reply::Stream(rx))
    }

    #[allow(clippy::too_many_arguments)]
    fn patch(
        &self,
        req: &ApiRequest,
        def: &'static ResourceDef,
        ns: &str,
        name: &str,
        part: Part,
        validation: FieldValidation,
        dry_run: bool,
    ) -> Result<Reply, ApiError> {
        let content_type = req.content_type.clone().unwrap_or_default();
        let media = content_type.split(';').next().unwrap_or("").trim().to_string();
        let patch = parse_body(Some(&media), &req.body)?;
        let is_apply = media == "application/apply-patch+yaml";
        if is_apply && req.query.get("fieldManager").is_none_or(String::is_empty) {
            return Err(ApiError::bad_request(
                "PATCH: fieldManager is required for apply requests",
            ));
        }
        let manager = field_manager(req);
        let force = query_flag(&req.query, "force");
        let subresource = part.subresource();
        let mut warnings = Vec::new();
        let mut created = false;
        let (obj, change) = self.store.transact_with(
            def.storage,
            (ns.to_string(), name.to_string()),
            dry_run,
            |reader, current| {
                let applied = if is_apply {
                    let mut body = patch.clone();
                    check_type(def, &mut body)?;
                    warnings = check_unknown_fields(def, &mut body, validation)?;
                    body["metadata"]["name"] = json!(name);
                    Some(body)
                } else {
                    None
                };
                let Some(current) = current else {
                    let Some(applied) = applied.filter(|_| part == Part::Main) else {
                        return Err(ApiError::not_found(def, name));
                    };
                    // Server-side apply creates what does not exist.
                    let owned = managed::apply(None, &applied, &manager, force)
                        .map_err(|c| ApiError::apply_conflict(def, name, &c))?;
                    let obj = prepare_create(
                        storage_def(def),
                        ns,
                        to_storage(def, owned),
                        reader,
                        &self.admission,
                    )?;
                    created = true;
                    return Ok(Outcome::Put(obj));
                };
                let mut doc = present(def, current);
                match (media.as_str(), applied) {
                    (_, Some(applied)) => {
                        doc = managed::apply(Some(&doc), &applied, &manager, force)
                            .map_err(|c| ApiError::apply_conflict(def, name, &c))?;
                    }
                    ("application/merge-patch+json", None) => merge_patch(&mut doc, &patch),
                    ("application/json-patch+json", None) => json_patch(&mut doc, &patch).map_err(|e| {
                        ApiError::invalid(
                            def,
                            name,
                            vec![crate::status::Cause::invalid("patch", &Value::Null, e)],
                        )
                    })?,
                    ("application/strategic-merge-patch+json", None) => {
                        strategic_merge_patch(&mut doc, &patch).map_err(ApiError::bad_request)?
                    }
                    (other, None) => return Err(ApiError::unsupported_media_type(other)),
                }
                check_type(def, &mut doc)?;
                if !is_apply {
                    warnings = check_unknown_fields(def, &mut doc, validation)?;
                }
                // A patch that sets a resourceVersion is a precondition, as upstream.
                let mut doc = to_storage(def, doc);
                if patch.pointer("/metadata/resourceVersion").is_none()
                    && let Some(rv) = current.pointer("/metadata/resourceVersion")
                {
                    doc["metadata"]["resourceVersion"] = rv.clone();
                }
                let mut obj = prepare_update(storage_def(def), current, doc, part)?;
                if same_content(&obj, current) {
                    return Ok(Outcome::Unchanged);
                }
                if part == Part::Resize {
                    crate::admission::admit_pod_resize(def, current, &obj, reader)?;
                }
                if !is_apply {
                    managed::record_update(Some(current), &mut obj, &manager, subresource);
                }
                Ok(deletion::finalized(obj))
            },
        )?;
        let obj = obj.ok_or_else(|| ApiError::not_found(def, name))?;
        self.after_update(change, &obj);
        Ok(Reply::Json {
            code: if created { 201 } else { 200 },
            body: present(def, &obj),
            warnings,
        })
    }

    fn delete(
        &self,
        req: &ApiRequest,
        def: &'static ResourceDef,
        ns: &str,
        name: &str,
        dry_run: bool,
    ) -> Result<Reply, ApiError> {
        let body: Value = if req.body.is_empty() {
            Value::Null
        } else {
            parse_body(req.content_type.as_deref(), &req.body)?
        };
        let options = DeleteOptions::parse(&body, &req.query, dry_run)?;
        let obj = self.delete_object(storage_def(def), ns, name, &options, 0)?;
        Ok(Reply::ok(present(def, &obj)))
    }

    fn delete_collection(
        &self,
        def: &'static ResourceDef,
        namespace: Option<String>,
        q: &HashMap<String, String>,
        dry_run: bool,
    ) -> Result<Reply, ApiError> {
        let filter = Filter::new(def, namespace.clone(), q)?;
        let options = DeleteOptions::parse(&Value::Null, q, dry_run)?;
        let (items, _) = self.store.list(def.storage, namespace.as_deref());
        let mut deleted = Vec::new();
        for obj in items.iter().filter(|o| filter.matches(o)) {
            let ns = obj
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            // Objects that vanished meanwhile are simply not listed.
            if let Ok(gone) = self.delete_object(storage_def(def), &ns, name_of(obj), &options, 0) {
                deleted.push(present(def, &gone));
            }
        }
        let rv = self.store.current_rv();
        Ok(Reply::ok(json!({
            "kind": format!("{}List", def.kind),
            "apiVersion": def.api_version(),
            "metadata": {"resourceVersion": rv.to_string()},
            "items": deleted,
        })))
    }

    /// Deletes an object as kube-apiserver does: preconditions; objects with finalizers, owners
    /// deleted in the foreground and scheduled Pods with a grace period become Terminating
    /// (`deletionTimestamp`) instead of disappearing; dependents are deleted (Background,
    /// Foreground) or released (Orphan). Returns the object's last state.
    fn delete_object(
        &self,
        def: &'static ResourceDef,
        ns: &str,
        name: &str,
        options: &DeleteOptions,
        depth: usize,
    ) -> Result<Arc<Value>, ApiError> {
        let current = self
            .store
            .get(def.storage, ns, name)
            .ok_or_else(|| ApiError::not_found(def, name))?;
        let uid = current
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let has_dependents = !self.dependents(&uid).is_empty();
        let mut pod_grace = None;
        let (obj, change) =
            self.store
                .transact(def.storage, (ns.to_string(), name.to_string()), |_, current| {
                    let Some(current) = current else {
                        return Err(ApiError::not_found(def, name));
                    };
                    options.check_preconditions(def, name, current)?;
                    if options.dry_run {
                        return Ok(Outcome::Unchanged);
                    }
                    let mut next = current.clone();
                    let mut finalizers: Vec<Value> = current
                        .pointer("/metadata/finalizers")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default();
                    if options.propagation == Propagation::Foreground && has_dependents {
                        let f = json!(deletion::FOREGROUND_FINALIZER);
                        if !finalizers.contains(&f) {
                            finalizers.push(f);
                        }
                    }
                    let grace = deletion::pod_grace(def, current, options.grace_period_seconds);
                    if let Some(grace) = grace {
                        pod_grace = Some(grace);
                    }
                    if finalizers.is_empty() && grace.is_none() {
                        return Ok(Outcome::Delete);
                    }
                    if current
                        .pointer("/metadata/deletionTimestamp")
                        .is_some_and(|v| !v.is_null())
                    {
                        // Already terminating: only a shorter grace period or the new finalizer changes it.
                        if next["metadata"]["finalizers"] == json!(finalizers) {
                            return Ok(Outcome::Unchanged);
                        }
                    } else {
                        let at = chrono::Utc::now() + chrono::Duration::seconds(grace.unwrap_or(0));
                        next["metadata"]["deletionTimestamp"] =
                            json!(at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
                        next["metadata"]["deletionGracePeriodSeconds"] = json!(grace.unwrap_or(0));
                    }
                    if !finalizers.is_empty() {
                        next["metadata"]["finalizers"] = json!(finalizers);
                    }
                    Ok(Outcome::Put(next))
                })?;
        let obj = obj.ok_or_else(|| ApiError::not_found(def, name))?;
        if options.dry_run {
            return Ok(obj);
        }
        if let (Some(grace), Some(ChangeKind::Modified)) = (pod_grace, change) {
            self.schedule_pod_removal(def, ns, name, &uid, grace);
        }
        if def.plural == "namespaces" && change == Some(ChangeKind::Deleted) {
            self.store.delete_namespace_contents(name);
        }
        if depth < 16 {
            self.propagate(&uid, options.propagation, depth);
        }
        self.finish_foreground_owners();
        Ok(obj)
    }

    /// An update that removed a terminating object's last finalizer deleted it: collect its
    /// dependents and release waiting owners.
    fn after_update(&self, change: Option<ChangeKind>, obj: &Value) {
        if change == Some(ChangeKind::Deleted) {
            let uid = obj.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or("");
            self.propagate(uid, Propagation::Background, 0);
            self.finish_foreground_owners();
        }
    }

    /// Objects whose ownerReferences name `owner_uid`.
    fn dependents(&self, owner_uid: &str) -> Vec<(&'static ResourceDef, Arc<Value>)> {
        if owner_uid.is_empty() {
            return Vec::new();
        }
        self.store
            .all_objects()
            .into_iter()
            .filter(|(_, obj)| deletion::owned_by(obj, owner_uid))
            .filter_map(|(storage, obj)| {
                let def = self.registry.storage_form(storage)?;
                Some((def, obj))
            })
            .collect()
    }

    /// Deletes (Background, Foreground) or releases (Orphan) the dependents of a deleted owner.
    /// As upstream's garbage collector, a dependent that still has another owner that exists is
    /// not deleted: it only loses its reference to the deleted one.
    fn propagate(&self, owner_uid: &str, propagation: Propagation, depth: usize) {
        let dependents = self.dependents(owner_uid);
        if dependents.is_empty() {
            return;
        }
        let live: std::collections::HashSet<String> = self
            .store
            .all_objects()
            .iter()
            .filter_map(|(_, obj)| {
                obj.pointer("/metadata/uid")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .filter(|uid| uid != owner_uid)
            .collect();
        for (def, dependent) in dependents {
            let ns = dependent
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let name = name_of(&dependent).to_string();
            let other_owner_lives = dependent
                .pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
                .is_some_and(|refs| {
                    refs.iter().any(|r| {
                        r.get("uid")
                            .and_then(Value::as_str)
                            .is_some_and(|uid| uid != owner_uid && live.contains(uid))
                    })
                });
            let propagation = if other_owner_lives {
                Propagation::Orphan
            } else {
                propagation
            };
            match propagation {
                Propagation::Orphan => {
                    let _ = self.store.transact(def.storage, (ns, name), |_, current| {
                        let Some(current) = current else {
                            return Ok(Outcome::Unchanged);
                        };
                        let mut next = current.clone();
                        if let Some(Value::Array(refs)) = next.pointer_mut("/metadata/ownerReferences") {
                            refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(owner_uid));
                        }
                        Ok(Outcome::Put(next))
                    });
                }
                Propagation::Background | Propagation::Foreground => {
                    let options = DeleteOptions {
                        propagation,
                        ..DeleteOptions::default()
                    };
                    let _ = self.delete_object(def, &ns, &name, &options, depth + 1);
                }
            }
        }
    }

    /// Owners waiting in the foreground lose their finalizer once their dependents are gone.
    fn finish_foreground_owners(&self) {
        let waiting: Vec<(&'static str, Arc<Value>)> = self
            .store
            .all_objects()
            .into_iter()
            .filter(|(_, obj)| deletion::has_finalizer(obj, deletion::FOREGROUND_FINALIZER))
            .collect();
        for (storage, owner) in waiting {
            let uid = owner
                .pointer("/metadata/uid")
                .and_then(Value::as_str)
                .unwrap_or("");
            if !self.dependents(uid).is_empty() {
                continue;
            }
            let ns = owner
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let _ = self
                .store
                .transact(storage, (ns, name_of(&owner).to_string()), |_, current| {
                    let Some(current) = current else {
                        return Ok(Outcome::Unchanged);
                    };
                    Ok(deletion::without_finalizer(
                        current,
                        deletion::FOREGROUND_FINALIZER,
                    ))
                });
        }
    }

    /// Removes a terminating scheduled Pod once its grace period is over (there is no kubelet).
    fn schedule_pod_removal(&self, def: &'static ResourceDef, ns: &str, name: &str, uid: &str, grace: i64) {
        let store = self.store.clone();
        let (ns, name, uid) = (ns.to_string(), name.to_string(), uid.to_string());
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            tokio::time::sleep(Duration::from_secs(grace.max(0) as u64)).await;
            let _ = store.transact(def.storage, (ns, name), |_, current| {
                let Some(current) = current else {
                    return Ok(Outcome::Unchanged);
                };
                let same = current.pointer("/metadata/uid").and_then(Value::as_str) == Some(uid.as_str());
                let finalizers = current
                    .pointer("/metadata/finalizers")
                    .and_then(Value::as_array)
                    .is_some_and(|f| !f.is_empty());
                Ok(if same && !finalizers {
                    Outcome::Delete
                } else {
                    Outcome::Unchanged
                })
            });
        });
    }
}

/// One watch event as a line of JSON, `type` before `object` as the API server writes it: clients
/// that decode the event in one pass (kube-rs, client-go) need the type first, or they buffer the
/// whole object to decode it a second time.
fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut bytes = Vec::with_capacity(512);
    bytes.extend_from_slice(b"{\"type\":");
    serde_json::to_writer(&mut bytes, kind).expect("strings serialize");
    bytes.extend_from_slice(b",\"object\":");
    serde_json::to_writer(&mut bytes, object).expect("JSON values serialize");
    bytes.extend_from_slice(b"}\n");
    Bytes::from(bytes)
}

struct WatchStream {
    def: &'static ResourceDef,
    filter: Filter,
    as_table: Option<IncludeObject>,
    /// Objects sent as PartialObjectMetadata (see [`wants_metadata`]).
    as_metadata: bool,
    sent_columns: bool,
    last_rv: u64,
    tx: mpsc::Sender<Bytes>,
}

impl WatchStream {
    /// Sends a change if it concerns the watch; false when the client is gone.
    async fn send(&mut self, change: &Change) -> bool {
        self.last_rv = self.last_rv.max(change.rv);
        let now = self.filter.matches(&change.new);
        let before = change.old.as_ref().is_some_and(|o| self.filter.matches(o));
        let kind = match change.kind {
            ChangeKind::Added if now => "ADDED",
            ChangeKind::Modified if now && before => "MODIFIED",
            ChangeKind::Modified if now => "ADDED",
            ChangeKind::Modified if before => "DELETED",
            ChangeKind::Deleted if before || now => "DELETED",
            _ => return true,
        };
        let obj = present(self.def, &change.new);
        let object = match self.as_table {
            Some(include) => {
                let rv = obj
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                let mut t = table(self.def, &[obj], &rv, include);
                if self.sent_columns {
                    t["columnDefinitions"] = json!([]);
                }
                self.sent_columns = true;
                t
            }
            None if self.as_metadata => metadata_only(&obj),
            None => obj,
        };
        self.tx.send(event_line(kind, &object)).await.is_ok()
    }
}
