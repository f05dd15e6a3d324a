//! The table of served kinds. Adding a kind is an entry here: storage, discovery, Table columns and
//! field selectors are all driven by it.

/// How one served resource behaves.
#[derive(Debug)]
pub struct ResourceDef {
    /// API group; empty for the core group.
    pub group: &'static str,
    /// API version within the group.
    pub version: &'static str,
    /// Plural resource name used in URLs.
    pub plural: &'static str,
    /// Singular name (discovery).
    pub singular: &'static str,
    /// Kind of the objects.
    pub kind: &'static str,
    /// Whether objects live in namespaces.
    pub namespaced: bool,
    /// Short names for kubectl (discovery).
    pub short_names: &'static [&'static str],
    /// Whether a `status` subresource exists (then main writes keep status and status writes
    /// change only status).
    pub has_status: bool,
    /// Storage identity: two definitions with the same storage share objects (core/v1 and
    /// events.k8s.io/v1 Events). Objects are stored in the form of the definition whose
    /// `storage` equals its own `plural` in its group.
    pub storage: &'static str,
    /// Fields accepted in `fieldSelector`, besides metadata.name and metadata.namespace. Each maps the
    /// selector's field name to a dotted path inside the stored object.
    pub fields: &'static [(&'static str, &'static str)],
    /// Categories for discovery (`kubectl get all`).
    pub categories: &'static [&'static str],
    /// Whether the kind is only ever created and never stored (reviews: the answer is computed
    /// and returned, as SelfSubjectAccessReview).
    pub create_only: bool,
    /// The kind's OpenAPI schema: the source of `/openapi/v3`, `kubectl explain`, and strict field
    /// validation.
    pub schema: Schema,
}

/// Where a kind's OpenAPI schema comes from.
#[derive(Debug)]
pub enum Schema {
    /// k8s-openapi's type: registers its schema and returns its name.
    Typed(fn(&mut schemars::SchemaGenerator) -> String),
    /// A CustomResourceDefinition version's `openAPIV3Schema`.
    Custom(serde_json::Value),
}

impl ResourceDef {
    /// `group/version`, or `version` for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The resource name as Kubernetes prints it in messages: `pods`, `runtimeclasses.node.k8s.io`.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// The kind as Kubernetes prints it in Invalid messages: `Pod`, `RuntimeClass.node.k8s.io`.
    pub fn qualified_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.to_string()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }

    /// Whether this definition is the storage form (its objects are stored as-is).
    pub fn is_storage_form(&self) -> bool {
        self.storage != STORAGE_EVENTS || self.group.is_empty()
    }
}

/// Registers `T`'s schema and returns its name.
fn schema_of<T: schemars::JsonSchema>(generator: &mut schemars::SchemaGenerator) -> String {
    generator.subschema_for::<T>();
    T::schema_name().into_owned()
}

/// Storage identity of Events (shared by core/v1 and events.k8s.io/v1).
pub const STORAGE_EVENTS: &str = "events";

const META_FIELDS: &[(&str, &str)] = &[];

const EVENT_FIELDS: &[(&str, &str)] = &[
    ("involvedObject.kind", "involvedObject.kind"),
    ("involvedObject.namespace", "involvedObject.namespace"),
    ("involvedObject.name", "involvedObject.name"),
    ("involvedObject.uid", "involvedObject.uid"),
    ("involvedObject.apiVersion", "involvedObject.apiVersion"),
    ("involvedObject.resourceVersion", "involvedObject.resourceVersion"),
    ("involvedObject.fieldPath", "involvedObject.fieldPath"),
    ("reason", "reason"),
    ("reportingComponent", "reportingComponent"),
    ("source", "source.component"),
    ("type", "type"),
    // events.k8s.io/v1 names of the same fields.
    ("regarding.kind", "involvedObject.kind"),
    ("regarding.namespace", "involvedObject.namespace"),
    ("regarding.name", "involvedObject.name"),
    ("regarding.uid", "involvedObject.uid"),
    ("reportingController", "reportingComponent"),
];

/// Every served resource.
pub static RESOURCES: &[ResourceDef] = &[
    ResourceDef {
        group: "",
        version: "v1",
        plural: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        namespaced: false,
        short_names: &["ns"],
        has_status: true,
        storage: "namespaces",
        fields: &[("status.phase", "status.phase")],
        categories: &[],
        create_only: false,
        schema: Schema::Typed(schema_of::<k8s_openapi::api::core::v1::Namespace>),
    },
    ResourceDef {
        group: "",
        version: "v1",
        plural: "pods",
        singular: "pod",
        kind: "Pod",
        namespaced: true,
        short_names: &["po"],
        has_status: true,
        storage: "pods",
        fields: &[
            ("spec.nodeName", "spec.nodeName"),
            ("spec.restartPolicy", "spec.restartPolicy"),
            ("spec.schedulerName", "spec.schedulerName"),
            ("spec.serviceAccountName", "spec.serviceAccountName"),
            ("spec.hostNetwork", "spec.hostNetwork"),
            ("status.phase", "status.phase"),
            ("status.podIP", "status.podIP"),
            ("status.nominatedNodeName", "status.nominatedNodeName"),
        ],
        categories: &["all"],
        create_only: false,
        schema: Schema::Typed(schema_of::<k8s_openapi::api::core::v1::Pod>),
    },
    ResourceDef {
        group: "",
        version: "v1",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        short_names: &["ev"],
        has_status: false,
        storage: STORAGE_EVENTS,
        fields: EVENT_FIELDS,
        categories: &[],
        create_only: false,
        schema: Schema::Typed(schema_of::<k8s_openapi::api::core::v1::Event>),
    },
    ResourceDef {
        group: "",
        version: "v1",
        plural: "configmaps",
        singular: "configmap",
        kind: "ConfigMap",
        namespaced: true,
        short_names: &["cm"],
        has_status: false,
        storage: "configmaps",
        fields: META_FIELDS,
        categories: &[],
        create_only: false,
        schema: Schema::Typed(schema_of::<k8s_openapi::api::core::v1::ConfigMap>),
    },
    ResourceDef {
        group: "",
        version: "v1",
        plural: "secrets",
        singular: "secret",
        kind: "Secret",
        namespaced: true,
        short_names: &[],
        has_status: false,
        storage: "secrets",
        fields: &[("type", "type")],
        categories: &[],
        create_only: false,
        schema: Schema::Typed(schema_of::<k8s_openapi::api::core::v1::Secret>),
    },
    ResourceDef {
        group: "",
        version: "v1",
        plural: "limitranges",
        singular: "limitrange",
        kind: "LimitRange",
        namespaced: true,
        short_names: &["limits"],
        has_status: false,
        storage: "limitranges",
        fields: META_FIELDS,
        categories: &[],
        create_only: false,
        schema: Schema::Typed(schema_of::<k8s_openapi::api::core::v1::LimitRange>),
    },
    ResourceDef {
        group: "",
        version: "v1",
        plural: "resourcequotas",
        singular: "resourcequota",
        kind: "ResourceQuota",
        namespaced: true,
        short_names: &["quota"],
        has_status: true,
        storage: "resourcequotas",
        fields: META_FIELDS,
        categories: &[],
        create_only: false,
        schema: Schema::Typed(schema_of::<k8s_openapi::api::core::v1::ResourceQuota>),
    },
    ResourceDef {
        group: "",
        version: "v1",
        plural: "serviceaccounts",
        singular: "serviceaccount",
        kind: "ServiceAccount",
        namespaced: true,
        short_names: &["sa"],
        has_status: false,
        storage: "serviceaccounts",
        fields: META_FIELDS,
        categories: &[],
        create_only: false,
        schema: Schema::Typed(schema_of::<k8s_openapi::api::core::v1::ServiceAccount>),
    },
    ResourceDef {
        group: "",
        version: "v1",
        plural: "nodes",
        singular: "node",
        kind: "Node",
        namespaced: false,
        short_names: &["no"],
        has_status: true,
        storage: "nodes",
        fields: META_FIELDS,
        categories: &[],
        create_only: false,
        schema: Schema::Typed(schema_of::<k8s_openapi::api::core::v1::Node>),
    },
    ResourceDef {
        group: "",
        version: "v1",
        plural: "services",
        singular: "service",
        kind: "Service",
        namespaced: true,
        short_names: &["svc"],
        has_status: true,
        storage: "services",
        fields: META_FIELDS,
        categories: &["all"],
        create_only: false,
        schema: Schema::Typed(schema_of::<k8s_openapi::api::core::v1::Service>),
    },
    ResourceDef {
        group: "",
        version: "v1",
        plural: "persistentvolumeclaims",
        singular: "persistentvolumeclaim",
        kind: "PersistentVolumeClaim",
        namespaced: true,
        short_names: &["pvc"],
        has_status: true,
        storage: crate::claims::CLAIMS,
        fields: META_FIELDS,
        categories: &[],
        create_only: false,
        schema: Schema::Typed(schema_of::<k8s_openapi::api::core::v1::PersistentVolumeClaim>),
    },
    ResourceDef {
        group: "",
        version: "v1",
        plural: "persistentvolumes",
        singular: "persistentvolume",
        kind: "PersistentVolume",
        namespaced: false,
        short_names: &["pv"],
        has_status: true,
        storage: crate::claims::VOLUMES,
        fields: META_FIELDS,
        categories: &[],
        create_only: false,
        schema: Schema::Typed(schema_of::<k8s_openapi::api::core::v1::PersistentVolume>),
    },
    ResourceDef {
        group: "storage.k8s.io",
        version: "v1",
        plural: "storageclasses",
        singular: "storageclass",
        kind: "StorageClass",
        namespaced: false,
        short_names: &["sc"],
        has_status: false,
        storage: crate::claims::CLASSES,
        fields: META_FIELDS,
        categories: &[],
        create_only: false,
        schema: Schema::Typed(schema_of::<k8s_openapi::api::storage::v1::StorageClass>),
    },
    ResourceDef {
        group: "node.k8s.io",
        version: "v1",
        plural: "runtimeclasses",
        singular: "runtimeclass",
        kind: "RuntimeClass",
        namespaced: false,
        short_names: &[],
        has_status: false,
        storage: "runtimeclasses",
        fields: META_FIELDS,
        categories: &[],
        create_only: false,
        schema: Schema::Typed(schema_of::<k8s_openapi::api::node::v1::RuntimeClass>),
    },
    ResourceDef {
        group: "events.k8s.io",
        version: "v1",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        short_names: &["ev"],
        has_status: false,
        storage: STORAGE_EVENTS,
        fields: EVENT_FIELDS,
        categories: &[],
        create_only: false,
        schema: Schema::Typed(schema_of::<k8s_openapi::api::events::v1::Event>),
    },
    ResourceDef {
        group: "policy",
        version: "v1",
        plural: "poddisruptionbudgets",
        singular: "poddisruptionbudget",
        kind: "PodDisruptionBudget",
        namespaced: true,
        short_names: &["pdb"],
        has_status: true,
        storage: "poddisruptionbudgets",
        fields: META_FIELDS,
        categories: &[],
        create_only: false,
        schema: Schema::Typed(schema_of::<k8s_openapi::api::policy::v1::PodDisruptionBudget>),
    },
    ResourceDef {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        singular: "lease",
        kind: "Lease",
        namespaced: true,
        short_names: &[],
        has_status: false,
        storage: "leases",
        fields: META_FIELDS,
        categories: &[],
        create_only: false,
        schema: Schema::Typed(schema_of::<k8s_openapi::api::coordination::v1::Lease>),
    },
    ResourceDef {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "roles",
        singular: "role",
        kind: "Role",
        namespaced: true,
        short_names: &[],
        has_status: false,
        storage: "roles",
        fields: META_FIELDS,
        categories: &[],
        create_only: false,
        schema: Schema::Typed(schema_of::<k8s_openapi::api::rbac::v1::Role>),
    },
    ResourceDef {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "clusterroles",
        singular: "clusterrole",
        kind: "ClusterRole",
        namespaced: false,
        short_names: &[],
        has_status: false,
        storage: "clusterroles",
        fields: META_FIELDS,
        categories: &[],
        create_only: false,
        schema: Schema::Typed(schema_of::<k8s_openapi::api::rbac::v1::ClusterRole>),
    },
    ResourceDef {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "rolebindings",
        singular: "rolebinding",
        kind: "RoleBinding",
        namespaced: true,
        short_names: &[],
        has_status: false,
        storage: "rolebindings",
        fields: META_FIELDS,
        categories: &[],
        create_only: false,
        schema: Schema::Typed(schema_of::<k8s_openapi::api::rbac::v1::RoleBinding>),
    },
    ResourceDef {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "clusterrolebindings",
        singular: "clusterrolebinding",
        kind: "ClusterRoleBinding",
        namespaced: false,
        short_names: &[],
        has_status: false,
        storage: "clusterrolebindings",
        fields: META_FIELDS,
        categories: &[],
        create_only: false,
        schema: Schema::Typed(schema_of::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>),
    },
    ResourceDef {
        group: "authorization.k8s.io",
        version: "v1",
        plural: "selfsubjectaccessreviews",
        singular: "",
        kind: "SelfSubjectAccessReview",
        namespaced: false,
        short_names: &[],
        has_status: false,
        storage: "selfsubjectaccessreviews",
        fields: META_FIELDS,
        categories: &[],
        create_only: true,
        schema: Schema::Typed(schema_of::<k8s_openapi::api::authorization::v1::SelfSubjectAccessReview>),
    },
    ResourceDef {
        group: "authorization.k8s.io",
        version: "v1",
        plural: "selfsubjectrulesreviews",
        singular: "",
        kind: "SelfSubjectRulesReview",
        namespaced: false,
        short_names: &[],
        has_status: false,
        storage: "selfsubjectrulesreviews",
        fields: META_FIELDS,
        categories: &[],
        create_only: true,
        schema: Schema::Typed(schema_of::<k8s_openapi::api::authorization::v1::SelfSubjectRulesReview>),
    },
    ResourceDef {
        group: "authorization.k8s.io",
        version: "v1",
        plural: "subjectaccessreviews",
        singular: "",
        kind: "SubjectAccessReview",
        namespaced: false,
        short_names: &[],
        has_status: false,
        storage: "subjectaccessreviews",
        fields: META_FIELDS,
        categories: &[],
        create_only: true,
        schema: Schema::Typed(schema_of::<k8s_openapi::api::authorization::v1::SubjectAccessReview>),
    },
    ResourceDef {
        group: "authentication.k8s.io",
        version: "v1",
        plural: "selfsubjectreviews",
        singular: "",
        kind: "SelfSubjectReview",
        namespaced: false,
        short_names: &[],
        has_status: false,
        storage: "selfsubjectreviews",
        fields: META_FIELDS,
        categories: &[],
        create_only: true,
        schema: Schema::Typed(schema_of::<k8s_openapi::api::authentication::v1::SelfSubjectReview>),
    },
    ResourceDef {
        group: "apiextensions.k8s.io",
        version: "v1",
        plural: "customresourcedefinitions",
        singular: "customresourcedefinition",
        kind: "CustomResourceDefinition",
        namespaced: false,
        short_names: &["crd", "crds"],
        has_status: true,
        storage: "customresourcedefinitions",
        fields: META_FIELDS,
        categories: &["api-extensions"],
        create_only: false,
        schema: Schema::Typed(
            schema_of::<
                k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
            >,
        ),
    },
];

/// The built-in resource at `group/version/plural`.
pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static ResourceDef> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// A custom resource kind as one version of a CustomResourceDefinition declares it.
#[derive(Clone, Debug, PartialEq)]
pub struct CustomKind {
    /// API group.
    pub group: String,
    /// Version.
    pub version: String,
    /// Plural resource name.
    pub plural: String,
    /// Singular name.
    pub singular: String,
    /// Kind.
    pub kind: String,
    /// Namespaced (scope `Namespaced`) or cluster-wide.
    pub namespaced: bool,
    /// Short names.
    pub short_names: Vec<String>,
    /// Categories.
    pub categories: Vec<String>,
    /// Whether the version has the status subresource.
    pub has_status: bool,
    /// The version's `openAPIV3Schema`.
    pub schema: serde_json::Value,
}

fn leak(s: &str) -> &'static str {
    Box::leak(s.to_string().into_boxed_str())
}

/// The kinds one API server serves: the built-in table plus the custom resources its
/// CustomResourceDefinitions define. Definitions are `&'static` like the built-ins; each distinct
/// custom definition is allocated once (interned), so re-creating a CRD reuses it.
#[derive(Default)]
pub struct Registry {
    custom: std::sync::RwLock<Vec<&'static ResourceDef>>,
    interned: std::sync::Mutex<Vec<(CustomKind, &'static ResourceDef)>>,
}

impl Registry {
    /// Every served definition, built-ins first.
    pub fn all(&self) -> Vec<&'static ResourceDef> {
        let custom = self.custom.read().unwrap_or_else(|e| e.into_inner());
        RESOURCES.iter().chain(custom.iter().copied()).collect()
    }

    /// The served resource at `group/version/plural`.
    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<&'static ResourceDef> {
        // Every request routes through here: no list is built for it.
        find(group, version, plural).or_else(|| {
            let custom = self.custom.read().unwrap_or_else(|e| e.into_inner());
            custom
                .iter()
                .copied()
                .find(|r| r.group == group && r.version == version && r.plural == plural)
        })
    }

    /// The served group/versions, core first.
    pub fn group_versions(&self) -> Vec<(&'static str, &'static str)> {
        let mut out: Vec<(&str, &str)> = Vec::new();
        for r in self.all() {
            if !out.contains(&(r.group, r.version)) {
                out.push((r.group, r.version));
            }
        }
        out
    }

    /// The definition objects of `storage` are stored as.
    pub fn storage_form(&self, storage: &str) -> Option<&'static ResourceDef> {
        self.all()
            .into_iter()
            .find(|r| r.storage == storage && r.is_storage_form())
    }

    /// Serves exactly these custom kinds from now on; returns the storages of kinds no longer
    /// served (their objects are to be deleted, as upstream deletes a CRD's objects with it).
    pub fn set_custom(&self, kinds: &[CustomKind]) -> Vec<&'static str> {
        let mut interned = self.interned.lock().unwrap_or_else(|e| e.into_inner());
        let defs: Vec<&'static ResourceDef> = kinds
            .iter()
            .map(|k| {
                if let Some((_, def)) = interned.iter().find(|(known, _)| known == k) {
                    return *def;
                }
                let def: &'static ResourceDef = Box::leak(Box::new(ResourceDef {
                    group: leak(&k.group),
                    version: leak(&k.version),
                    plural: leak(&k.plural),
                    singular: leak(&k.singular),
                    kind: leak(&k.kind),
                    namespaced: k.namespaced,
                    short_names: Box::leak(
                        k.short_names
                            .iter()
                            .map(|s| leak(s))
                            .collect::<Vec<_>>()
                            .into_boxed_slice(),
                    ),
                    has_status: k.has_status,
                    storage: leak(&format!("{}.{}", k.plural, k.group)),
                    fields: META_FIELDS,
                    categories: Box::leak(
                        k.categories
                            .iter()
                            .map(|s| leak(s))
                            .collect::<Vec<_>>()
                            .into_boxed_slice(),
                    ),
                    create_only: false,
                    schema: Schema::Custom(k.schema.clone()),
                }));
                interned.push((k.clone(), def));
                def
            })
            .collect();
        let mut custom = self.custom.write().unwrap_or_else(|e| e.into_inner());
        let gone = custom
            .iter()
            .filter(|old| !defs.iter().any(|new| new.storage == old.storage))
            .map(|old| old.storage)
            .collect();
        *custom = defs;
        gone
    }
}

/// The resource definitions of the namespaces kind.
pub fn namespaces() -> &'static ResourceDef {
    find("", "v1", "namespaces").expect("namespaces are served")
}

/// The resource definition of Pods.
pub fn pods() -> &'static ResourceDef {
    find("", "v1", "pods").expect("pods are served")
}

/// The resource definition of RuntimeClasses.
pub fn runtime_classes() -> &'static ResourceDef {
    find("node.k8s.io", "v1", "runtimeclasses").expect("runtimeclasses are served")
}
