//! Configuration: the `sync.fromHost.runtimeClasses` block of a vcluster.yaml, and the host agent's
//! tenants file.
//!
//! ```text
//!  file ──yaml──► Value ──walk (collects every problem, each with its path)──► TenantsFile / RuntimeClassSync
//! ```
//!
//! Parsing does not stop at the first problem: every problem of a file is reported at once, each
//! naming the file and the path inside it (`tenants[0].sync.fromHost.runtimeClasses.selector.matchExpressions[1].operator`),
//! or the line and column for YAML syntax errors. What comes out is valid by construction: selectors
//! are [`LabelSelector`]s, names are checked, patch modes are exclusive.
//!
//! Unknown keys inside the blocks rcsync implements are errors. Other sections of a full
//! vcluster.yaml are accepted and ignored, but only under the names vCluster knows, so a typo such as
//! `fromhost` is reported rather than silently ignored.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use yaml_serde::Value;

use crate::labels::validate_dns1123_label;
use crate::selector::{LabelSelector, MatchExpression};

/// Config path of the selector, as vCluster names it in its messages.
pub const SELECTOR_CONFIG_PATH: &str = "sync.fromHost.runtimeClasses.selector";

/// One problem found in a config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Where: a config path such as `tenants[0].name`, or `line 3, column 5` for syntax errors.
    pub at: String,
    /// What is wrong.
    pub message: String,
}

/// Every problem of one config file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The file, as given.
    pub file: PathBuf,
    /// All problems found, in document order.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.file.display();
        match self.problems.as_slice() {
            [one] => write!(f, "{file}: {}: {}", one.at, one.message),
            many => {
                write!(f, "{file}: {} problems:", many.len())?;
                for p in many {
                    write!(f, "\n  - {}: {}", p.at, p.message)?;
                }
                Ok(())
            }
        }
    }
}

/// The name of a tenant (its virtual cluster): a DNS-1123 label, used in host Pod names.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TenantName(String);

impl TenantName {
    /// Validates a tenant name.
    pub fn new(name: &str) -> Result<Self, String> {
        validate_dns1123_label(name).map_err(|e| format!("invalid tenant name {name:?}: {e}"))?;
        Ok(Self(name.to_string()))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The `sync.fromHost.runtimeClasses` block.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuntimeClassSync {
    /// `enabled` (default false).
    pub enabled: bool,
    /// `selector`; `None` when absent or empty (then every class syncs and Pods are not gated).
    pub selector: Option<LabelSelector>,
    /// `patches`, in order.
    pub patches: Vec<PatchSpec>,
}

/// One entry of `patches`: a path and exactly one mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PatchSpec {
    /// `path`: the field the patch targets.
    pub path: String,
    /// What the patch does.
    pub mode: PatchMode,
}

/// What a patch does with the value at its path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PatchMode {
    /// `expression` (host → virtual), with an optional `reverseExpression` (virtual → host).
    Expression {
        /// JavaScript run on the host → virtual copy.
        expression: String,
        /// JavaScript run on what flows back from virtual to host.
        reverse_expression: Option<String>,
    },
    /// `labels: {}`: the value is a label selector or label map whose keys are translated.
    Labels,
    /// `reference`: the value names another object, whose name is translated.
    Reference(ReferenceSpec),
}

/// The `reference` block of a patch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReferenceSpec {
    /// `apiVersion` of the referenced object.
    pub api_version: String,
    /// `apiVersionPath`: relative path to read the apiVersion from, falling back to `api_version`.
    pub api_version_path: Option<String>,
    /// `kind` of the referenced object.
    pub kind: String,
    /// `kindPath`: relative path to read the kind from, falling back to `kind`.
    pub kind_path: Option<String>,
    /// `namePath`: relative path of the name inside the value.
    pub name_path: Option<String>,
    /// `namespacePath`: relative path of the namespace; defaults to the object's metadata.namespace.
    pub namespace_path: Option<String>,
}

/// A Pod Security Standards level (`policies.podSecurityStandard`, vcluster.yaml's key).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PodSecurityLevel {
    /// No restrictions.
    Privileged,
    /// Prevents known privilege escalations (the default).
    #[default]
    Baseline,
    /// Current Pod hardening best practices.
    Restricted,
}

impl PodSecurityLevel {
    /// The level's name as Kubernetes spells it (`privileged`, `baseline`, `restricted`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Privileged => "privileged",
            Self::Baseline => "baseline",
            Self::Restricted => "restricted",
        }
    }

    /// Parses a level name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "privileged" => Some(Self::Privileged),
            "baseline" => Some(Self::Baseline),
            "restricted" => Some(Self::Restricted),
            _ => None,
        }
    }
}

impl fmt::Display for PodSecurityLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An in-tree volume type that names its storage directly in the Pod (a cloud disk by its id, an
/// NFS export by its address, an iSCSI or Fibre Channel target, a Ceph image) and reaches it with
/// the host node's or cluster's access, not through a claim the tenant owns. A tenant's Pods may
/// use one only where `policies.inlineVolumes` lists it (or at `podSecurityStandard: privileged`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct InlineVolumeType(&'static str);

impl InlineVolumeType {
    /// Every such type, as the Pod API names its field. (`azureFile` and `scaleIO` always name a
    /// Secret and are refused for that.)
    pub const ALL: [&'static str; 17] = [
        "awsElasticBlockStore",
        "azureDisk",
        "cephfs",
        "cinder",
        "fc",
        "flexVolume",
        "flocker",
        "gcePersistentDisk",
        "glusterfs",
        "iscsi",
        "nfs",
        "photonPersistentDisk",
        "portworxVolume",
        "quobyte",
        "rbd",
        "storageos",
        "vsphereVolume",
    ];

    /// The type of that name, if it is one.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| *t == name).map(Self)
    }

    /// The type's name, as the Pod API spells its field.
    pub fn as_str(self) -> &'static str {
        self.0
    }
}

impl fmt::Display for InlineVolumeType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// The name of a CSI driver whose inline volumes (`csi` in a Pod's volumes) a tenant's Pods may
/// use (`policies.inlineCsiDrivers`): a valid DNS subdomain, as upstream's CSIDriver names are.
/// What an inline volume reaches is the driver's to resolve from its attributes (an NFS export by
/// its address, a certificate from a host issuer), so none is allowed unless listed.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct CsiDriverName(String);

impl CsiDriverName {
    /// The name, if it is a valid driver name.
    pub fn parse(name: &str) -> Result<Self, String> {
        crate::labels::validate_dns1123_subdomain(name)?;
        Ok(Self(name.to_string()))
    }

    /// The driver's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The effect of a taint a toleration matches (absent: every effect).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum TaintEffect {
    /// `NoSchedule`.
    NoSchedule,
    /// `PreferNoSchedule`.
    PreferNoSchedule,
    /// `NoExecute`.
    NoExecute,
}

impl TaintEffect {
    /// The effect as Kubernetes spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoSchedule => "NoSchedule",
            Self::PreferNoSchedule => "PreferNoSchedule",
            Self::NoExecute => "NoExecute",
        }
    }
}

/// One toleration added to every host Pod of a tenant (`sync.toHost.pods.enforceTolerations`),
/// written as vCluster does: `key=value:Effect`, `key:Effect` (operator Exists), `key=value` or
/// `key` (every effect).
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct EnforcedToleration {
    /// The taint key.
    pub key: String,
    /// `Some(value)`: operator Equal; `None`: operator Exists.
    pub value: Option<String>,
    /// The effect; `None` matches every effect.
    pub effect: Option<TaintEffect>,
}

impl EnforcedToleration {
    /// Parses vCluster's string form.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (rest, effect) = match text.rsplit_once(':') {
            Some((rest, effect)) => {
                let effect = match effect {
                    "NoSchedule" => TaintEffect::NoSchedule,
                    "PreferNoSchedule" => TaintEffect::PreferNoSchedule,
                    "NoExecute" => TaintEffect::NoExecute,
                    other => {
                        return Err(format!(
                            "invalid effect {other:?}: expected NoSchedule, PreferNoSchedule or NoExecute"
                        ));
                    }
                };
                (rest, Some(effect))
            }
            None => (text, None),
        };
        let (key, value) = match rest.split_once('=') {
            Some((key, value)) => (key, Some(value.to_string())),
            None => (rest, None),
        };
        crate::labels::validate_label_key(key).map_err(|e| format!("invalid key {key:?}: {e}"))?;
        if let Some(value) = &value {
            crate::labels::validate_label_value(value)
                .map_err(|e| format!("invalid value {value:?}: {e}"))?;
        }
        Ok(Self {
            key: key.to_string(),
            value,
            effect,
        })
    }
}

/// Which of a virtual Pod's annotations its host Pod carries (`sync.toHost.pods.copyAnnotations`):
/// one key (`cluster-autoscaler.kubernetes.io/safe-to-evict`), or every key with a prefix,
/// written with a trailing `*` (`prometheus.io/*`; `*` alone: every key). rcsync's and vCluster's
/// own annotations are never copied, whatever the pattern (see [`is_reserved_annotation`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum AnnotationPattern {
    /// Exactly this key.
    Key(String),
    /// Every key starting with this.
    Prefix(String),
}

impl AnnotationPattern {
    /// Parses a key, or a prefix followed by `*`. A pattern that could only match reserved keys
    /// is an error (it would copy nothing).
    pub fn parse(text: &str) -> Result<Self, String> {
        let pattern = match text.strip_suffix('*') {
            Some(prefix) => {
                if prefix.contains('*') {
                    return Err(format!("invalid pattern {text:?}: `*` may only end it"));
                }
                if let Some(bad) = prefix
                    .chars()
                    .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')))
                {
                    return Err(format!(
                        "invalid pattern {text:?}: {bad:?} cannot appear in an annotation key"
                    ));
                }
                Self::Prefix(prefix.to_string())
            }
            None => {
                crate::labels::validate_label_key(text)
                    .map_err(|e| e.replace("invalid label key", "invalid annotation key"))?;
                Self::Key(text.to_string())
            }
        };
        let only_reserved = match &pattern {
            Self::Key(key) => is_reserved_annotation(key),
            Self::Prefix(prefix) => RESERVED_ANNOTATION_PREFIXES
                .iter()
                .any(|reserved| prefix.starts_with(reserved)),
        };
        if only_reserved {
            return Err(format!(
                "{text:?} copies nothing: annotations under {} are rcsync's and vCluster's own and never copied",
                RESERVED_ANNOTATION_PREFIXES.join(" and ")
            ));
        }
        Ok(pattern)
    }

    /// Whether `key` matches (reserved keys match no pattern).
    pub fn matches(&self, key: &str) -> bool {
        !is_reserved_annotation(key)
            && match self {
                Self::Key(k) => k == key,
                Self::Prefix(prefix) => key.starts_with(prefix.as_str()),
            }
    }
}

impl std::fmt::Display for AnnotationPattern {
    /// As written in the tenants file.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Key(key) => f.write_str(key),
            Self::Prefix(prefix) => write!(f, "{prefix}*"),
        }
    }
}

/// Prefixes of the annotations rcsync and vCluster write on host Pods (a Pod's identity, the
/// values its fieldRefs read): a tenant's annotation never stands in for one.
const RESERVED_ANNOTATION_PREFIXES: &[&str] = &["vcluster.loft.sh/", "rcsync.io/"];

/// Whether `key` is never copied to the host: rcsync's and vCluster's own annotations, and
/// kubectl's last-applied-configuration (the virtual object's, meaningless on the host).
pub fn is_reserved_annotation(key: &str) -> bool {
    RESERVED_ANNOTATION_PREFIXES.iter().any(|p| key.starts_with(p))
        || key == "kubectl.kubernetes.io/last-applied-configuration"
}

/// What a tenant's Pods may carry to the host besides their runtime class.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub struct PodPolicy {
    /// `policies.podSecurityStandard` (default `baseline`), enforced by the host agent.
    pub pod_security: PodSecurityLevel,
    /// `policies.alwaysPullImages` (default false): every container of the tenant's host Pods pulls
    /// its image (`imagePullPolicy: Always`, with the Pod's pull secrets), as upstream's
    /// AlwaysPullImages admission does, so an image another tenant pulled onto a node with its
    /// credentials does not run for this one from the node's cache.
    pub always_pull_images: bool,
    /// `policies.inlineVolumes` (default none): the [`InlineVolumeType`]s the tenant's Pods may use.
    pub inline_volumes: BTreeSet<InlineVolumeType>,
    /// `policies.inlineCsiDrivers` (default none): the CSI drivers whose inline volumes the
    /// tenant's Pods may use.
    pub inline_csi_drivers: BTreeSet<CsiDriverName>,
    /// `sync.toHost.pods.enforceTolerations`: added to every host Pod.
    pub enforce_tolerations: Vec<EnforcedToleration>,
    /// `sync.toHost.pods.enforceNodeSelector`: node labels every host Pod's node selector requires
    /// (a tenant's own pool of nodes); a Pod selecting another value of one of them is refused.
    pub enforce_node_selector: BTreeMap<String, String>,
    /// `sync.toHost.pods.hybridScheduling.hostSchedulers` (when `enabled`): scheduler names a Pod
    /// may keep on the host. Any other `schedulerName` is dropped.
    pub host_schedulers: Vec<String>,
    /// `sync.toHost.pods.copyAnnotations`: the virtual annotations its host Pods carry (none by
    /// default: an annotation can mean something to the host's controllers).
    pub copy_annotations: Vec<AnnotationPattern>,
    /// `sync.toHost.podDisruptionBudgets.enabled` (default false, as in vCluster): the tenant's
    /// PodDisruptionBudgets are held on the host too, so host node drains (evictions) respect
    /// them. Off unless the host's operator allows it: a budget can hold a drain up.
    pub disruption_budgets: bool,
    /// `sync.toHost.persistentVolumeClaims.enabled` (default false; vCluster's is true): the
    /// tenant's PersistentVolumeClaims are made on the host, and its Pods may mount them. Off
    /// unless the host's operator allows it: a claim provisions host storage.
    pub claims: bool,
}

impl PodPolicy {
    /// Whether the tenant's Pods may use a volume of `volume_type` (the Pod API's name of its
    /// field) that names its storage directly: where `policies.inlineVolumes` lists it, or at
    /// `podSecurityStandard: privileged` (which allows `hostPath` too). Other types pass.
    pub fn allows_inline_volume(&self, volume_type: &str) -> bool {
        InlineVolumeType::parse(volume_type).is_none_or(|kind| {
            self.pod_security == PodSecurityLevel::Privileged || self.inline_volumes.contains(&kind)
        })
    }

    /// Whether the tenant's Pods may use inline volumes of CSI driver `driver`: where
    /// `policies.inlineCsiDrivers` lists it, or at `podSecurityStandard: privileged`.
    pub fn allows_inline_csi_driver(&self, driver: &str) -> bool {
        self.pod_security == PodSecurityLevel::Privileged
            || self.inline_csi_drivers.iter().any(|d| d.as_str() == driver)
    }
}

/// One tenant of the host agent: a virtual cluster and where its Pods live on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tenant {
    /// `name`: the virtual cluster's name, used in host Pod names.
    pub name: TenantName,
    /// `hostNamespace`: the host namespace its Pods are written to.
    pub host_namespace: String,
    /// `tokenFile`, resolved against the tenants file's directory. When set, callers must present
    /// the token; when absent the tenant is reachable only with `--allow-unauthenticated` or mTLS.
    pub token_file: Option<PathBuf>,
    /// `sync.fromHost.runtimeClasses`.
    pub runtime_classes: RuntimeClassSync,
    /// `policies` and `sync.toHost.pods`: what the host agent lets the tenant's Pods carry.
    pub pods: PodPolicy,
    /// `limits`: what one tenant may take of the host agent.
    pub limits: TenantLimits,
}

/// Per-tenant limits (`limits` in the tenants file), so one tenant cannot starve the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TenantLimits {
    /// `syncStreams`: concurrent RuntimeClassSync.Sync streams.
    pub sync_streams: u32,
    /// `podStatusStreams`: concurrent PodSync status streams (WatchPodStatus, WatchClaimStatus,
    /// WatchDisruptionBudgets; a virtual agent opens one of each).
    pub pod_status_streams: u32,
    /// `podSyncQps`: sustained ApplyPod/DeletePod calls per second (a token bucket's rate).
    pub pod_sync_qps: u32,
    /// `podSyncBurst`: the token bucket's size.
    pub pod_sync_burst: u32,
    /// `podSyncInFlight`: ApplyPod/DeletePod calls open at once (each holds up to a 4 MiB request
    /// while it is read), counted from their headers, before their bodies are read.
    pub pod_sync_in_flight: u32,
    /// `podSyncBytes`: the most of the host agent's `--max-pod-sync-bytes` the tenant's open
    /// ApplyPod/DeletePod calls may hold at once (`None`: a quarter of it).
    pub pod_sync_bytes: Option<u64>,
}

/// The smallest `podSyncBytes`: the largest PodSync request (4 MiB), which must fit.
pub const MIN_TENANT_POD_SYNC_BYTES: u64 = 4 << 20;

/// A byte count as written in configs and flags: digits, optionally with a binary suffix (`Ki`,
/// `Mi`, `Gi`) as Kubernetes quantities write memory. The error says what was expected.
pub fn parse_byte_size(raw: &str) -> Result<u64, String> {
    let invalid = || format!("invalid size {raw:?}: expected a number of bytes or e.g. 512Mi or 1Gi");
    let (number, unit) = raw.split_at(raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len()));
    let n: u64 = number.parse().map_err(|_| invalid())?;
    let scale: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => return Err(invalid()),
    };
    n.checked_mul(scale).ok_or_else(invalid)
}

impl Default for TenantLimits {
    fn default() -> Self {
        Self {
            sync_streams: 8,
            pod_status_streams: 8,
            pod_sync_qps: 500,
            pod_sync_burst: 1000,
            pod_sync_in_flight: 64,
            pod_sync_bytes: None,
        }
    }
}

/// The host agent's tenants file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TenantsFile {
    /// The tenants, in file order; names and host namespaces are unique.
    tenants: Vec<Tenant>,
    /// Each tenant's place in `tenants`, by name: a request looks its tenant up, it does not
    /// scan them all.
    by_name: HashMap<String, usize>,
}

/// The keys of vCluster's `sync` block.
const VCLUSTER_SYNC_KEYS: &[&str] = &["toHost", "fromHost"];
/// The keys of vCluster's `sync.fromHost` block.
const VCLUSTER_FROM_HOST_KEYS: &[&str] = &[
    "configMaps",
    "csiDrivers",
    "csiNodes",
    "csiStorageCapacities",
    "customResources",
    "events",
    "ingressClasses",
    "nodes",
    "priorityClasses",
    "runtimeClasses",
    "secrets",
    "storageClasses",
    "volumeSnapshotClasses",
];

fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        problems: vec![Problem {
            at: "file".into(),
            message: format!("cannot read: {e}"),
        }],
    })
}

fn parse_yaml(file: &Path, text: &str) -> Result<Value, ConfigError> {
    yaml_serde::from_str::<Value>(text).map_err(|e| {
        let at = match e.location() {
            Some(loc) => format!("line {}, column {}", loc.line(), loc.column()),
            None => "document".into(),
        };
        let message = e.to_string();
        // The library appends " at line L column C"; the location is already in `at`.
        let message = message.split(" at line ").next().unwrap_or(&message).to_string();
        ConfigError {
            file: file.to_path_buf(),
            problems: vec![Problem { at, message }],
        }
    })
}

impl TenantsFile {
    /// Reads and parses a tenants file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::parse(path, &read_file(path)?)
    }

    /// Parses a tenants file's text; `file` names it in errors and resolves relative `tokenFile`s.
    pub fn parse(file: &Path, text: &str) -> Result<Self, ConfigError> {
        let doc = parse_yaml(file, text)?;
        let mut w = Walker::default();
        let tenants = w.tenants_file(&doc, file.parent().unwrap_or(Path::new("")));
        w.finish(file, tenants)
    }

    fn new(tenants: Vec<Tenant>) -> Self {
        let by_name = tenants
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.as_str().to_string(), i))
            .collect();
        Self { tenants, by_name }
    }

    /// The tenants, in file order.
    pub fn tenants(&self) -> &[Tenant] {
        &self.tenants
    }

    /// Looks a tenant up by name.
    pub fn tenant(&self, name: &str) -> Option<&Tenant> {
        self.by_name.get(name).and_then(|&i| self.tenants.get(i))
    }
}

impl RuntimeClassSync {
    /// Reads the `sync.fromHost.runtimeClasses` block of a vcluster.yaml; every other section is
    /// ignored. A file without the block gives the defaults (disabled).
    pub fn load_vcluster_yaml(path: &Path) -> Result<Self, ConfigError> {
        Self::parse_vcluster_yaml(path, &read_file(path)?)
    }

    /// Parses a vcluster.yaml's text; `file` names it in errors.
    pub fn parse_vcluster_yaml(file: &Path, text: &str) -> Result<Self, ConfigError> {
        let doc = parse_yaml(file, text)?;
        let mut w = Walker::default();
        let block = match &doc {
            Value::Null => RuntimeClassSync::default(),
            doc => match w.mapping(doc, "", None) {
                Some(top) => match top.get("sync") {
                    Some(sync) => w.sync_block(sync, "sync"),
                    None => RuntimeClassSync::default(),
                },
                None => RuntimeClassSync::default(),
            },
        };
        w.finish(file, block)
    }

    /// Whether Pods are gated on their runtime class (sync enabled and a non-empty selector).
    pub fn gates_pods(&self) -> bool {
        self.enabled && self.selector.is_some()
    }

    /// Whether a host RuntimeClass with these labels is synced to the tenant.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.enabled && self.selector.as_ref().is_none_or(|s| s.matches(labels))
    }
}

/// A YAML mapping whose keys were checked to be strings.
struct Fields<'a>(Vec<(&'a str, &'a Value)>);

impl<'a> Fields<'a> {
    /// The string-keyed entries of a mapping, without reporting anything (for a second look at a
    /// block another step already checked).
    fn quiet(v: &'a Value) -> Self {
        match v {
            Value::Mapping(map) => Fields(map.iter().filter_map(|(k, v)| Some((k.as_str()?, v))).collect()),
            _ => Fields(Vec::new()),
        }
    }

    /// The value of a key; an explicit `null` counts as absent.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.0
            .iter()
            .find(|(k, v)| *k == key && !v.is_null())
            .map(|(_, v)| *v)
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// A short description of a scalar for messages (`0`, `-3`, `"fast"`), or its kind.
fn describe_value(v: &Value) -> String {
    match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Bool(b) => b.to_string(),
        other => kind_of(other).to_string(),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// Walks a YAML document, collecting every problem with its path.
#[derive(Default)]
struct Walker {
    problems: Vec<Problem>,
}

impl Walker {
    fn problem(&mut self, at: &str, message: impl Into<String>) {
        let at = if at.is_empty() {
            "(top level)".to_string()
        } else {
            at.to_string()
        };
        self.problems.push(Problem {
            at,
            message: message.into(),
        });
    }

    fn finish<T>(self, file: &Path, value: T) -> Result<T, ConfigError> {
        if self.problems.is_empty() {
            Ok(value)
        } else {
            Err(ConfigError {
                file: file.to_path_buf(),
                problems: self.problems,
            })
        }
    }

    /// A mapping with string keys. `known`: the allowed keys (`None`: any).
    fn mapping<'a>(&mut self, v: &'a Value, path: &str, known: Option<&[&str]>) -> Option<Fields<'a>> {
        let Value::Mapping(map) = v else {
            self.problem(path, format!("expected a mapping, got {}", kind_of(v)));
            return None;
        };
        let mut fields = Vec::with_capacity(map.len());
        for (k, v) in map {
            let Some(key) = k.as_str() else {
                self.problem(path, format!("keys must be strings, got {}", kind_of(k)));
                continue;
            };
            if let Some(known) = known
                && !known.contains(&key)
            {
                let expected = known
                    .iter()
                    .map(|k| format!("{k:?}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                self.problem(
                    &join(path, key),
                    format!("unknown field {key:?}, expected one of {expected}"),
                );
                continue;
            }
            fields.push((key, v));
        }
        Some(Fields(fields))
    }

    fn string(&mut self, v: &Value, path: &str) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            other => {
                self.problem(path, format!("expected a string, got {}", kind_of(other)));
                None
            }
        }
    }

    fn non_empty_string(&mut self, v: &Value, path: &str) -> Option<String> {
        let s = self.string(v, path)?;
        if s.trim().is_empty() {
            self.problem(path, "must not be empty");
            return None;
        }
        Some(s)
    }

    fn bool(&mut self, v: &Value, path: &str) -> Option<bool> {
        match v {
            Value::Bool(b) => Some(*b),
            other => {
                self.problem(
                    path,
                    format!("expected a boolean (true or false), got {}", kind_of(other)),
                );
                None
            }
        }
    }

    fn list<'a>(&mut self, v: &'a Value, path: &str) -> Option<&'a [Value]> {
        match v {
            Value::Sequence(items) => Some(items),
            other => {
                self.problem(path, format!("expected a list, got {}", kind_of(other)));
                None
            }
        }
    }

    fn string_map(&mut self, v: &Value, path: &str) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        if let Some(fields) = self.mapping(v, path, None) {
            for (k, v) in fields.0 {
                let item = join(path, k);
                match v {
                    Value::String(s) => {
                        out.insert(k.to_string(), s.clone());
                    }
                    Value::Null => {
                        out.insert(k.to_string(), String::new());
                    }
                    other => self.problem(
                        &item,
                        format!("expected a string, got {} (quote it: \"...\")", kind_of(other)),
                    ),
                }
            }
        }
        out
    }

    fn tenants_file(&mut self, doc: &Value, base_dir: &Path) -> TenantsFile {
        if doc.is_null() {
            self.problem("", "the file is empty: expected a `tenants:` list");
            return TenantsFile::default();
        }
        let Some(top) = self.mapping(doc, "", Some(&["tenants"])) else {
            return TenantsFile::default();
        };
        let Some(list) = top.get("tenants") else {
            self.problem("tenants", "required field is missing");
            return TenantsFile::default();
        };
        let Some(items) = self.list(list, "tenants") else {
            return TenantsFile::default();
        };
        let mut tenants = Vec::new();
        let mut names: BTreeMap<String, usize> = BTreeMap::new();
        let mut namespaces: BTreeMap<String, usize> = BTreeMap::new();
        for (i, item) in items.iter().enumerate() {
            let path = format!("tenants[{i}]");
            let Some(tenant) = self.tenant(item, &path, base_dir) else {
                continue;
            };
            if let Some(first) = names.insert(tenant.name.0.clone(), i) {
                self.problem(
                    &format!("{path}.name"),
                    format!("duplicate tenant {:?} (also tenants[{first}])", tenant.name.0),
                );
                continue;
            }
            if let Some(first) = namespaces.insert(tenant.host_namespace.clone(), i) {
                self.problem(
                    &format!("{path}.hostNamespace"),
                    format!(
                        "host namespace {:?} is already used by tenants[{first}]: tenants must not share a namespace",
                        tenant.host_namespace
                    ),
                );
                continue;
            }
            tenants.push(tenant);
        }
        TenantsFile::new(tenants)
    }

    fn tenant(&mut self, v: &Value, path: &str, base_dir: &Path) -> Option<Tenant> {
        let fields = self.mapping(
            v,
            path,
            Some(&["name", "hostNamespace", "tokenFile", "sync", "policies", "limits"]),
        )?;
        let before = self.problems.len();
        let name = match fields.get("name") {
            Some(v) => self
                .string(v, &join(path, "name"))
                .and_then(|n| match TenantName::new(&n) {
                    Ok(n) => Some(n),
                    Err(e) => {
                        self.problem(&join(path, "name"), e);
                        None
                    }
                }),
            None => {
                self.problem(&join(path, "name"), "required field is missing");
                None
            }
        };
        let host_namespace =
            match fields.get("hostNamespace") {
                Some(v) => self.string(v, &join(path, "hostNamespace")).and_then(|ns| {
                    match validate_dns1123_label(&ns) {
                        Ok(()) => Some(ns),
                        Err(e) => {
                            self.problem(
                                &join(path, "hostNamespace"),
                                format!("invalid namespace {ns:?}: {e}"),
                            );
                            None
                        }
                    }
                }),
                None => {
                    self.problem(&join(path, "hostNamespace"), "required field is missing");
                    None
                }
            };
        let token_file = fields
            .get("tokenFile")
            .and_then(|v| self.non_empty_string(v, &join(path, "tokenFile")))
            .map(|f| base_dir.join(f));
        let runtime_classes = match fields.get("sync") {
            Some(sync) => self.sync_block(sync, &join(path, "sync")),
            None => RuntimeClassSync::default(),
        };
        let mut pods = match fields.get("sync") {
            Some(sync) => self.host_pod_policy(sync, &join(path, "sync")),
            None => PodPolicy::default(),
        };
        if let Some(policies) = fields.get("policies") {
            self.policies(policies, &join(path, "policies"), &mut pods);
        }
        let limits = match fields.get("limits") {
            Some(limits) => self.limits(limits, &join(path, "limits")),
            None => TenantLimits::default(),
        };
        if self.problems.len() > before {
            return None;
        }
        Some(Tenant {
            name: name?,
            host_namespace: host_namespace?,
            token_file,
            runtime_classes,
            pods,
            limits,
        })
    }

    /// The `limits` block of a tenant: positive whole numbers, defaults for absent keys.
    fn limits(&mut self, v: &Value, path: &str) -> TenantLimits {
        let mut limits = TenantLimits::default();
        let Some(fields) = self.mapping(
            v,
            path,
            Some(&[
                "syncStreams",
                "podStatusStreams",
                "podSyncQps",
                "podSyncBurst",
                "podSyncInFlight",
                "podSyncBytes",
            ]),
        ) else {
            return limits;
        };
        if let Some(value) = fields.get("podSyncBytes") {
            let parsed = match value {
                Value::Number(n) => n
                    .as_u64()
                    .ok_or_else(|| "expected a number of bytes or e.g. 64Mi".to_string()),
                Value::String(s) => parse_byte_size(s),
                other => Err(format!(
                    "expected a number of bytes or e.g. 64Mi, got {}",
                    describe_value(other)
                )),
            };
            match parsed {
                Ok(bytes) if bytes >= MIN_TENANT_POD_SYNC_BYTES => limits.pod_sync_bytes = Some(bytes),
                Ok(bytes) => self.problem(
                    &join(path, "podSyncBytes"),
                    format!(
                        "{bytes} bytes is below 4Mi, the largest Pod sync, which must fit in a tenant's share"
                    ),
                ),
                Err(why) => self.problem(&join(path, "podSyncBytes"), why),
            }
        }
        for (key, slot) in [
            ("syncStreams", &mut limits.sync_streams),
            ("podStatusStreams", &mut limits.pod_status_streams),
            ("podSyncQps", &mut limits.pod_sync_qps),
            ("podSyncBurst", &mut limits.pod_sync_burst),
            ("podSyncInFlight", &mut limits.pod_sync_in_flight),
        ] {
            let Some(value) = fields.get(key) else { continue };
            let at = join(path, key);
            match value
                .as_u64()
                .filter(|n| *n > 0)
                .and_then(|n| u32::try_from(n).ok())
            {
                Some(n) => *slot = n,
                None => self.problem(
                    &at,
                    format!(
                        "expected a whole number from 1 to {}, got {}",
                        u32::MAX,
                        describe_value(value)
                    ),
                ),
            }
        }
        limits
    }

    /// The `policies` block of a tenant: `podSecurityStandard`, `alwaysPullImages`,
    /// `inlineVolumes` and `inlineCsiDrivers`, into `pods`.
    fn policies(&mut self, v: &Value, path: &str, pods: &mut PodPolicy) {
        let known = [
            "podSecurityStandard",
            "alwaysPullImages",
            "inlineVolumes",
            "inlineCsiDrivers",
        ];
        let Some(fields) = self.mapping(v, path, Some(&known)) else {
            return;
        };
        if let Some(always_pull) = fields
            .get("alwaysPullImages")
            .and_then(|v| self.bool(v, &join(path, "alwaysPullImages")))
        {
            pods.always_pull_images = always_pull;
        }
        if let Some(list) = fields.get("inlineVolumes") {
            pods.inline_volumes = self.parsed_list(list, &join(path, "inlineVolumes"), |name| {
                InlineVolumeType::parse(name).ok_or_else(|| {
                    format!(
                        "{name:?} is not a volume type that names its storage directly, expected one of {}",
                        InlineVolumeType::ALL.join(", ")
                    )
                })
            });
        }
        if let Some(list) = fields.get("inlineCsiDrivers") {
            pods.inline_csi_drivers = self.parsed_list(list, &join(path, "inlineCsiDrivers"), |name| {
                CsiDriverName::parse(name).map_err(|why| format!("invalid CSI driver name {name:?}: {why}"))
            });
        }
        let Some(level) = fields.get("podSecurityStandard") else {
            return;
        };
        let at = join(path, "podSecurityStandard");
        let Some(name) = self.string(level, &at) else {
            return;
        };
        match PodSecurityLevel::parse(&name) {
            Some(level) => pods.pod_security = level,
            None => self.problem(
                &at,
                format!(
                    "unknown level {name:?}, expected one of \"privileged\", \"baseline\", \"restricted\""
                ),
            ),
        }
    }

    /// A list of strings at `path`, each parsed by `parse` (a problem at its index when it fails).
    fn parsed_list<T: Ord>(
        &mut self,
        list: &Value,
        path: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> BTreeSet<T> {
        let mut parsed = BTreeSet::new();
        for (i, item) in self.list(list, path).unwrap_or_default().iter().enumerate() {
            let item_path = format!("{path}[{i}]");
            let Some(name) = self.string(item, &item_path) else {
                continue;
            };
            match parse(&name) {
                Ok(value) => {
                    parsed.insert(value);
                }
                Err(why) => self.problem(&item_path, why),
            }
        }
        parsed
    }

    /// `<key>.enabled` of a `{enabled: bool}` block among `fields` (false when absent).
    fn enabled(&mut self, fields: &Fields<'_>, path: &str, key: &str) -> bool {
        let Some(block) = fields.get(key) else {
            return false;
        };
        let block_path = join(path, key);
        let Some(block) = self.mapping(block, &block_path, Some(&["enabled"])) else {
            return false;
        };
        block
            .get("enabled")
            .and_then(|v| self.bool(v, &join(&block_path, "enabled")))
            .unwrap_or(false)
    }

    /// `sync.toHost.pods` of a tenant (the sync block's shape was checked by `sync_block`).
    fn host_pod_policy(&mut self, v: &Value, path: &str) -> PodPolicy {
        let mut policy = PodPolicy::default();
        let Value::Mapping(_) = v else {
            return policy;
        };
        let Some(to_host) = Fields::quiet(v).get("toHost") else {
            return policy;
        };
        let to_host_path = join(path, "toHost");
        let Some(to_host) = self.mapping(
            to_host,
            &to_host_path,
            Some(&["pods", "podDisruptionBudgets", "persistentVolumeClaims"]),
        ) else {
            return policy;
        };
        policy.disruption_budgets = self.enabled(&to_host, &to_host_path, "podDisruptionBudgets");
        policy.claims = self.enabled(&to_host, &to_host_path, "persistentVolumeClaims");
        let Some(pods) = to_host.get("pods") else {
            return policy;
        };
        let pods_path = join(&to_host_path, "pods");
        let Some(pods) = self.mapping(
            pods,
            &pods_path,
            Some(&[
                "enforceTolerations",
                "enforceNodeSelector",
                "hybridScheduling",
                "copyAnnotations",
            ]),
        ) else {
            return policy;
        };
        if let Some(list) = pods.get("copyAnnotations") {
            let list_path = join(&pods_path, "copyAnnotations");
            for (i, item) in self.list(list, &list_path).unwrap_or_default().iter().enumerate() {
                let item_path = format!("{list_path}[{i}]");
                let Some(text) = self.string(item, &item_path) else {
                    continue;
                };
                match AnnotationPattern::parse(&text) {
                    Ok(pattern) => policy.copy_annotations.push(pattern),
                    Err(e) => self.problem(&item_path, e),
                }
            }
        }
        if let Some(list) = pods.get("enforceTolerations") {
            let list_path = join(&pods_path, "enforceTolerations");
            for (i, item) in self.list(list, &list_path).unwrap_or_default().iter().enumerate() {
                let item_path = format!("{list_path}[{i}]");
                let Some(text) = self.string(item, &item_path) else {
                    continue;
                };
                match EnforcedToleration::parse(&text) {
                    Ok(t) => policy.enforce_tolerations.push(t),
                    Err(e) => self.problem(&item_path, e),
                }
            }
        }
        if let Some(selector) = pods.get("enforceNodeSelector") {
            let selector_path = join(&pods_path, "enforceNodeSelector");
            for (key, value) in self.string_map(selector, &selector_path) {
                let item_path = join(&selector_path, &key);
                let valid = crate::labels::validate_label_key(&key)
                    .map_err(|e| format!("invalid node label key {key:?}: {e}"))
                    .and_then(|()| {
                        crate::labels::validate_label_value(&value)
                            .map_err(|e| format!("invalid node label value {value:?}: {e}"))
                    });
                match valid {
                    Ok(()) => {
                        policy.enforce_node_selector.insert(key, value);
                    }
                    Err(e) => self.problem(&item_path, e),
                }
            }
        }
        if let Some(hybrid) = pods.get("hybridScheduling") {
            let hybrid_path = join(&pods_path, "hybridScheduling");
            if let Some(fields) = self.mapping(hybrid, &hybrid_path, Some(&["enabled", "hostSchedulers"])) {
                let enabled = fields
                    .get("enabled")
                    .and_then(|v| self.bool(v, &join(&hybrid_path, "enabled")))
                    .unwrap_or(false);
                let mut schedulers = Vec::new();
                if let Some(list) = fields.get("hostSchedulers") {
                    let list_path = join(&hybrid_path, "hostSchedulers");
                    for (i, item) in self.list(list, &list_path).unwrap_or_default().iter().enumerate() {
                        let item_path = format!("{list_path}[{i}]");
                        if let Some(name) = self.non_empty_string(item, &item_path) {
                            schedulers.push(name);
                        }
                    }
                }
                if enabled {
                    policy.host_schedulers = schedulers;
                }
            }
        }
        policy
    }

    /// A vCluster `sync` block; returns its `fromHost.runtimeClasses`.
    fn sync_block(&mut self, v: &Value, path: &str) -> RuntimeClassSync {
        let Some(sync) = self.mapping(v, path, Some(VCLUSTER_SYNC_KEYS)) else {
            return RuntimeClassSync::default();
        };
        let Some(from_host) = sync.get("fromHost") else {
            return RuntimeClassSync::default();
        };
        let from_host_path = join(path, "fromHost");
        let Some(from_host) = self.mapping(from_host, &from_host_path, Some(VCLUSTER_FROM_HOST_KEYS)) else {
            return RuntimeClassSync::default();
        };
        match from_host.get("runtimeClasses") {
            Some(rc) => self.runtime_classes(rc, &join(&from_host_path, "runtimeClasses")),
            None => RuntimeClassSync::default(),
        }
    }

    fn runtime_classes(&mut self, v: &Value, path: &str) -> RuntimeClassSync {
        let Some(fields) = self.mapping(v, path, Some(&["enabled", "selector", "patches"])) else {
            return RuntimeClassSync::default();
        };
        let enabled = fields
            .get("enabled")
            .and_then(|v| self.bool(v, &join(path, "enabled")))
            .unwrap_or(false);
        let selector = fields
            .get("selector")
            .and_then(|v| self.selector(v, &join(path, "selector")))
            .filter(|s| !s.is_empty());
        let mut patches = Vec::new();
        if let Some(list) = fields.get("patches") {
            let list_path = join(path, "patches");
            if let Some(items) = self.list(list, &list_path) {
                let mut seen: BTreeMap<String, usize> = BTreeMap::new();
                for (i, item) in items.iter().enumerate() {
                    let item_path = format!("{list_path}[{i}]");
                    if let Some(patch) = self.patch(item, &item_path) {
                        if let Some(first) = seen.insert(patch.path.clone(), i) {
                            self.problem(
                                &join(&item_path, "path"),
                                format!(
                                    "{:?} is already patched by {list_path}[{first}]: one patch per path",
                                    patch.path
                                ),
                            );
                            continue;
                        }
                        patches.push(patch);
                    }
                }
            }
        }
        RuntimeClassSync {
            enabled,
            selector,
            patches,
        }
    }

    fn selector(&mut self, v: &Value, path: &str) -> Option<LabelSelector> {
        let fields = self.mapping(v, path, Some(&["matchLabels", "matchExpressions"]))?;
        let match_labels = fields
            .get("matchLabels")
            .map(|v| self.string_map(v, &join(path, "matchLabels")))
            .unwrap_or_default();
        let mut expressions = Vec::new();
        if let Some(list) = fields.get("matchExpressions") {
            let list_path = join(path, "matchExpressions");
            for (i, item) in self.list(list, &list_path).unwrap_or_default().iter().enumerate() {
                let item_path = format!("{list_path}[{i}]");
                if let Some(expr) = self.match_expression(item, &item_path) {
                    expressions.push((i, expr));
                }
            }
        }
        let before = self.problems.len();
        // Validate each expression on its own so paths keep the original index.
        let mut ok_exprs = Vec::new();
        for (i, expr) in &expressions {
            match expr.to_requirement() {
                Ok(_) => ok_exprs.push(expr.clone()),
                Err((field, e)) => self.problem(&format!("{path}.matchExpressions[{i}].{field}"), e),
            }
        }
        match LabelSelector::from_parts(&match_labels, &ok_exprs) {
            Ok(selector) if self.problems.len() == before => Some(selector),
            Ok(_) => None,
            Err(errors) => {
                for (at, e) in errors {
                    self.problem(&join(path, &at), e);
                }
                None
            }
        }
    }

    fn match_expression(&mut self, v: &Value, path: &str) -> Option<MatchExpression> {
        let fields = self.mapping(v, path, Some(&["key", "operator", "values"]))?;
        let before = self.problems.len();
        let key = match fields.get("key") {
            Some(v) => self.string(v, &join(path, "key")),
            None => {
                self.problem(&join(path, "key"), "required field is missing");
                None
            }
        };
        let operator = match fields.get("operator") {
            Some(v) => self.string(v, &join(path, "operator")),
            None => {
                self.problem(
                    &join(path, "operator"),
                    "required field is missing: one of \"In\", \"NotIn\", \"Exists\", \"DoesNotExist\"",
                );
                None
            }
        };
        let mut values = Vec::new();
        if let Some(list) = fields.get("values") {
            let list_path = join(path, "values");
            for (i, item) in self.list(list, &list_path).unwrap_or_default().iter().enumerate() {
                if let Some(s) = self.string(item, &format!("{list_path}[{i}]")) {
                    values.push(s);
                }
            }
        }
        if self.problems.len() > before {
            return None;
        }
        Some(MatchExpression {
            key: key?,
            operator: operator?,
            values,
        })
    }

    fn patch(&mut self, v: &Value, path: &str) -> Option<PatchSpec> {
        let fields = self.mapping(
            v,
            path,
            Some(&["path", "expression", "reverseExpression", "reference", "labels"]),
        )?;
        let before = self.problems.len();
        let target = match fields.get("path") {
            Some(v) => self.non_empty_string(v, &join(path, "path")),
            None => {
                self.problem(&join(path, "path"), "required field is missing");
                None
            }
        };
        let expression = fields
            .get("expression")
            .and_then(|v| self.non_empty_string(v, &join(path, "expression")));
        let reverse_expression = fields
            .get("reverseExpression")
            .and_then(|v| self.non_empty_string(v, &join(path, "reverseExpression")));
        let labels = fields.get("labels").map(|v| {
            self.mapping(v, &join(path, "labels"), Some(&[]));
        });
        let reference = fields
            .get("reference")
            .and_then(|v| self.reference(v, &join(path, "reference")));
        let modes: Vec<&str> = [
            (expression.is_some() || reverse_expression.is_some()).then_some("expression"),
            labels.is_some().then_some("labels"),
            fields.get("reference").is_some().then_some("reference"),
        ]
        .into_iter()
        .flatten()
        .collect();
        if self.problems.len() > before {
            return None;
        }
        let mode = match modes.as_slice() {
            ["expression"] => PatchMode::Expression {
                expression: match expression {
                    Some(e) => e,
                    None => {
                        self.problem(
                            &join(path, "expression"),
                            "required when reverseExpression is set (the host → virtual direction)",
                        );
                        return None;
                    }
                },
                reverse_expression,
            },
            ["labels"] => PatchMode::Labels,
            ["reference"] => PatchMode::Reference(reference?),
            [] => {
                self.problem(
                    path,
                    "a patch needs exactly one of expression, labels or reference; none is set",
                );
                return None;
            }
            many => {
                self.problem(
                    path,
                    format!(
                        "a patch needs exactly one of expression, labels or reference; {} are set",
                        many.join(" and ")
                    ),
                );
                return None;
            }
        };
        Some(PatchSpec { path: target?, mode })
    }

    fn reference(&mut self, v: &Value, path: &str) -> Option<ReferenceSpec> {
        let fields = self.mapping(
            v,
            path,
            Some(&[
                "apiVersion",
                "apiVersionPath",
                "kind",
                "kindPath",
                "namePath",
                "namespacePath",
            ]),
        )?;
        let before = self.problems.len();
        let opt = |w: &mut Self, key: &str| {
            fields
                .get(key)
                .and_then(|v| w.non_empty_string(v, &join(path, key)))
        };
        let api_version = opt(self, "apiVersion");
        let api_version_path = opt(self, "apiVersionPath");
        let kind = opt(self, "kind");
        let kind_path = opt(self, "kindPath");
        let name_path = opt(self, "namePath");
        let namespace_path = opt(self, "namespacePath");
        if api_version.is_none() && api_version_path.is_none() {
            self.problem(
                &join(path, "apiVersion"),
                "required field is missing (or set apiVersionPath)",
            );
        }
        if kind.is_none() && kind_path.is_none() {
            self.problem(&join(path, "kind"), "required field is missing (or set kindPath)");
        }
        if self.problems.len() > before {
            return None;
        }
        Some(ReferenceSpec {
            api_version: api_version.unwrap_or_default(),
            api_version_path,
            kind: kind.unwrap_or_default(),
            kind_path,
            name_path,
            namespace_path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenants(text: &str) -> Result<TenantsFile, ConfigError> {
        TenantsFile::parse(Path::new("conf/tenants.yaml"), text)
    }

    fn problems(text: &str) -> Vec<(String, String)> {
        tenants(text)
            .unwrap_err()
            .problems
            .into_iter()
            .map(|p| (p.at, p.message))
            .collect()
    }

    const VALID: &str = r#"
tenants:
  - name: team-a
    hostNamespace: vcluster-team-a
    tokenFile: tokens/team-a.token
    sync:
      fromHost:
        runtimeClasses:
          enabled: true
          selector:
            matchLabels:
              environment: development
            matchExpressions:
              - key: kubernetes.io/runtime.class
                operator: In
                values: [gvisor, youki]
  - name: team-b
    hostNamespace: vcluster-team-b
"#;

    #[test]
    fn pod_policy_defaults_to_baseline_and_parses_vcluster_keys() {
        let file = tenants(VALID).unwrap();
        assert_eq!(file.tenants[0].pods, PodPolicy::default());
        assert_eq!(file.tenants[0].pods.pod_security, PodSecurityLevel::Baseline);
        let file = tenants(
            r#"
tenants:
  - name: team-a
    hostNamespace: vc-a
    policies: {podSecurityStandard: restricted, inlineVolumes: [nfs, iscsi, nfs], inlineCsiDrivers: [secrets-store.csi.k8s.io]}
    sync:
      toHost:
        pods:
          enforceTolerations: ["dedicated=tenants:NoSchedule", "spot:NoExecute", "gpu"]
          hybridScheduling: {enabled: true, hostSchedulers: [batch]}
          copyAnnotations: ["prometheus.io/*", "cluster-autoscaler.kubernetes.io/safe-to-evict"]
        podDisruptionBudgets: {enabled: true}
        persistentVolumeClaims: {enabled: true}
"#,
        )
        .unwrap();
        let pods = &file.tenants[0].pods;
        assert!(pods.disruption_budgets);
        assert!(pods.claims);
        assert!(
            !PodPolicy::default().disruption_budgets && !PodPolicy::default().claims,
            "off unless the host allows it"
        );
        let got = problems(
            "tenants:\n  - name: a\n    hostNamespace: ns-a\n    sync: {toHost: {podDisruptionBudgets: {enabled: yes-please, max: 3}}}\n",
        );
        assert_eq!(
            got.iter().map(|(at, _)| at.as_str()).collect::<Vec<_>>(),
            [
                "tenants[0].sync.toHost.podDisruptionBudgets.max",
                "tenants[0].sync.toHost.podDisruptionBudgets.enabled"
            ],
            "{got:?}"
        );
        assert_eq!(
            pods.copy_annotations,
            [
                AnnotationPattern::Prefix("prometheus.io/".into()),
                AnnotationPattern::Key("cluster-autoscaler.kubernetes.io/safe-to-evict".into()),
            ]
        );
        assert_eq!(pods.pod_security, PodSecurityLevel::Restricted);
        assert_eq!(
            pods.inline_volumes.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
            ["iscsi", "nfs"]
        );
        assert!(pods.allows_inline_volume("nfs") && !pods.allows_inline_volume("gcePersistentDisk"));
        assert!(pods.allows_inline_csi_driver("secrets-store.csi.k8s.io"));
        assert!(!pods.allows_inline_csi_driver("csi.cert-manager.io"));
        assert!(
            pods.allows_inline_volume("emptyDir"),
            "only types naming storage directly are listed"
        );
        assert!(
            PodPolicy {
                pod_security: PodSecurityLevel::Privileged,
                ..PodPolicy::default()
            }
            .allows_inline_volume("gcePersistentDisk"),
            "privileged allows every type"
        );
        assert_eq!(
            pods.enforce_tolerations,
            [
                EnforcedToleration {
                    key: "dedicated".into(),
                    value: Some("tenants".into()),
                    effect: Some(TaintEffect::NoSchedule)
                },
                EnforcedToleration {
                    key: "spot".into(),
                    value: None,
                    effect: Some(TaintEffect::NoExecute)
                },
                EnforcedToleration {
                    key: "gpu".into(),
                    value: None,
                    effect: None
                },
            ]
        );
        assert_eq!(pods.host_schedulers, ["batch"]);
    }

    #[test]
    fn limits_default_and_are_checked() {
        let file = tenants(VALID).unwrap();
        assert_eq!(file.tenants[0].limits, TenantLimits::default());
        assert_eq!(TenantLimits::default().pod_sync_burst, 1000);
        let file = tenants(
            "tenants:\n  - name: a\n    hostNamespace: ns-a\n    limits: {syncStreams: 2, podSyncQps: 10}\n",
        )
        .unwrap();
        let limits = file.tenants[0].limits;
        assert_eq!((limits.sync_streams, limits.pod_sync_qps), (2, 10));
        assert_eq!(limits.pod_status_streams, 8, "absent keys keep their default");
        let got = problems(
            "tenants:\n  - name: a\n    hostNamespace: ns-a\n    limits: {syncStreams: 0, podSyncQps: fast, podSyncBurst: -1, streams: 3}\n",
        );
        assert_eq!(
            got,
            [
                (
                    "tenants[0].limits.streams".to_string(),
                    "unknown field \"streams\", expected one of \"syncStreams\", \"podStatusStreams\", \"podSyncQps\", \"podSyncBurst\", \"podSyncInFlight\", \"podSyncBytes\"".to_string()
                ),
                (
                    "tenants[0].limits.syncStreams".to_string(),
                    "expected a whole number from 1 to 4294967295, got 0".to_string()
                ),
                (
                    "tenants[0].limits.podSyncQps".to_string(),
                    "expected a whole number from 1 to 4294967295, got \"fast\"".to_string()
                ),
                (
                    "tenants[0].limits.podSyncBurst".to_string(),
                    "expected a whole number from 1 to 4294967295, got -1".to_string()
                ),
            ]
        );
    }

    #[test]
    fn a_tenants_pod_sync_bytes_is_a_size_that_holds_the_largest_pod_sync() {
        let file = tenants(
            "tenants:\n  - {name: a, hostNamespace: ns-a, limits: {podSyncBytes: 64Mi}}\n  - {name: b, hostNamespace: ns-b, limits: {podSyncBytes: 8388608}}\n",
        )
        .unwrap();
        assert_eq!(file.tenants[0].limits.pod_sync_bytes, Some(64 << 20));
        assert_eq!(file.tenants[1].limits.pod_sync_bytes, Some(8 << 20));
        assert_eq!(TenantLimits::default().pod_sync_bytes, None);
        let got = problems(
            "tenants:\n  - {name: a, hostNamespace: ns-a, limits: {podSyncBytes: 1Mi}}\n  - {name: b, hostNamespace: ns-b, limits: {podSyncBytes: 64MB}}\n",
        );
        assert_eq!(
            got,
            [
                (
                    "tenants[0].limits.podSyncBytes".to_string(),
                    "1048576 bytes is below 4Mi, the largest Pod sync, which must fit in a tenant's share"
                        .to_string()
                ),
                (
                    "tenants[1].limits.podSyncBytes".to_string(),
                    "invalid size \"64MB\": expected a number of bytes or e.g. 512Mi or 1Gi".to_string()
                ),
            ]
        );
    }

    #[test]
    fn bad_pod_policies_name_the_path() {
        let got = problems(
            r#"
tenants:
  - name: team-a
    hostNamespace: vc-a
    policies: {podSecurityStandard: strict, podSecurity: x, alwaysPullImages: sometimes, inlineVolumes: [nfs, hostPath, 3], inlineCsiDrivers: [Bad_Driver]}
    sync:
      toHost:
        services: {enabled: true}
        pods:
          enforceTolerations: ["bad key!:NoSchedule", "k=v:Sometimes", 3]
          enforceNodeSelector: {"bad key!": x, pool: "bad value!", zone: 3}
          hybridScheduling: {enabled: yes, hostSchedulers: [""]}
          copyAnnotations: ["ok/*", "a*b*", "bad key", "vcluster.loft.sh/*", "rcsync.io/label-x"]
"#,
        );
        let at: Vec<&str> = got.iter().map(|(at, _)| at.as_str()).collect();
        assert_eq!(
            at,
            [
                "tenants[0].sync.toHost.services",
                "tenants[0].sync.toHost.pods.copyAnnotations[1]",
                "tenants[0].sync.toHost.pods.copyAnnotations[2]",
                "tenants[0].sync.toHost.pods.copyAnnotations[3]",
                "tenants[0].sync.toHost.pods.copyAnnotations[4]",
                "tenants[0].sync.toHost.pods.enforceTolerations[0]",
                "tenants[0].sync.toHost.pods.enforceTolerations[1]",
                "tenants[0].sync.toHost.pods.enforceTolerations[2]",
                "tenants[0].sync.toHost.pods.enforceNodeSelector.zone",
                "tenants[0].sync.toHost.pods.enforceNodeSelector.bad key!",
                "tenants[0].sync.toHost.pods.enforceNodeSelector.pool",
                "tenants[0].sync.toHost.pods.hybridScheduling.enabled",
                "tenants[0].sync.toHost.pods.hybridScheduling.hostSchedulers[0]",
                "tenants[0].policies.podSecurity",
                "tenants[0].policies.alwaysPullImages",
                "tenants[0].policies.inlineVolumes[1]",
                "tenants[0].policies.inlineVolumes[2]",
                "tenants[0].policies.inlineCsiDrivers[0]",
                "tenants[0].policies.podSecurityStandard",
            ],
            "{got:#?}"
        );
        assert!(got[6].1.contains("invalid effect \"Sometimes\""), "{got:#?}");
        assert!(got[18].1.contains("unknown level \"strict\""), "{got:#?}");
        assert!(
            got[17].1.starts_with("invalid CSI driver name \"Bad_Driver\""),
            "{got:#?}"
        );
        assert!(
            got[15]
                .1
                .starts_with("\"hostPath\" is not a volume type that names its storage directly, expected one of awsElasticBlockStore, azureDisk,"),
            "{got:#?}"
        );
        assert!(got[1].1.contains("`*` may only end it"), "{got:#?}");
        assert!(
            got[2].1.contains("invalid annotation key \"bad key\""),
            "{got:#?}"
        );
        assert!(got[3].1.contains("copies nothing"), "{got:#?}");
        assert!(got[4].1.contains("copies nothing"), "{got:#?}");
    }

    #[test]
    fn parses_the_documented_example() {
        let file = tenants(VALID).unwrap();
        assert_eq!(file.tenants.len(), 2);
        let a = &file.tenants[0];
        assert_eq!(a.name.as_str(), "team-a");
        assert_eq!(a.host_namespace, "vcluster-team-a");
        assert_eq!(
            a.token_file.as_deref(),
            Some(Path::new("conf/tokens/team-a.token"))
        );
        assert!(a.runtime_classes.enabled);
        assert_eq!(
            a.runtime_classes.selector.as_ref().unwrap().to_string(),
            "environment=development,kubernetes.io/runtime.class in (gvisor,youki)"
        );
        let b = &file.tenants[1];
        assert!(!b.runtime_classes.enabled, "enabled defaults to false");
        assert_eq!(b.runtime_classes.selector, None);
        assert_eq!(b.token_file, None);
    }

    #[test]
    fn bad_configs_name_the_path() {
        let rc = "tenants[0].sync.fromHost.runtimeClasses";
        let wrap = |block: &str| {
            format!(
                "tenants:\n  - name: a\n    hostNamespace: ns-a\n    sync:\n      fromHost:\n        runtimeClasses:\n{}",
                block
                    .lines()
                    .map(|l| format!("          {l}\n"))
                    .collect::<String>()
            )
        };
        let cases: &[(&str, String, &str)] = &[
            (
                "selector:\n  matchExpressions:\n    - {key: a, operator: in, values: [x]}",
                format!("{rc}.selector.matchExpressions[0].operator"),
                "unknown operator \"in\"",
            ),
            (
                "selector:\n  matchExpressions:\n    - {key: a, operator: In}",
                format!("{rc}.selector.matchExpressions[0].values"),
                "must be specified",
            ),
            (
                "selector:\n  matchExpressions:\n    - {key: a, operator: Exists, values: [x]}",
                format!("{rc}.selector.matchExpressions[0].values"),
                "may not be specified",
            ),
            (
                "selector:\n  matchLabels:\n    -bad: x",
                format!("{rc}.selector.matchLabels.-bad"),
                "invalid label key",
            ),
            (
                "enabled: true\nfrobnicate: 1",
                format!("{rc}.frobnicate"),
                "unknown field \"frobnicate\"",
            ),
            ("enabled: \"yes\"", format!("{rc}.enabled"), "expected a boolean"),
            (
                "selector: [a]",
                format!("{rc}.selector"),
                "expected a mapping, got a list",
            ),
            (
                "selector:\n  matchLabels:\n    version: 1",
                format!("{rc}.selector.matchLabels.version"),
                "expected a string, got a number",
            ),
            (
                "patches:\n  - path: handler",
                format!("{rc}.patches[0]"),
                "exactly one of expression, labels or reference; none",
            ),
            (
                "patches:\n  - {path: handler, expression: x, labels: {}}",
                format!("{rc}.patches[0]"),
                "expression and labels are set",
            ),
            (
                "patches:\n  - {path: handler, expression: x}\n  - {path: handler, expression: y}",
                format!("{rc}.patches[1].path"),
                "already patched",
            ),
        ];
        for (block, path, needle) in cases {
            let text = wrap(block);
            let got = problems(&text);
            assert!(
                got.iter().any(|(at, msg)| at == path && msg.contains(needle)),
                "for\n{text}\nwanted {path}: ..{needle}.., got {got:?}"
            );
        }
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
tenants:
  - name: Bad_Name
    hostNamespace: ns
    colour: blue
    sync:
      fromhost: {}
  - name: b
    hostNamespace: ns-b
    sync:
      fromHost:
        runtimeClasses:
          selector:
            matchExpressions:
              - {key: a, operator: Foo}
              - {key: b, operator: In}
"#;
        let err = tenants(text).unwrap_err();
        let at: Vec<_> = err.problems.iter().map(|p| p.at.as_str()).collect();
        assert_eq!(
            at,
            [
                "tenants[0].colour",
                "tenants[0].name",
                "tenants[0].sync.fromhost",
                "tenants[1].sync.fromHost.runtimeClasses.selector.matchExpressions[0].operator",
                "tenants[1].sync.fromHost.runtimeClasses.selector.matchExpressions[1].values",
            ]
        );
        let shown = err.to_string();
        assert!(shown.starts_with("conf/tenants.yaml: 5 problems:"), "{shown}");
    }

    #[test]
    fn duplicates_are_rejected_naming_the_tenant() {
        let text = "tenants:\n  - {name: a, hostNamespace: ns-a}\n  - {name: a, hostNamespace: ns-b}\n  - {name: c, hostNamespace: ns-a}\n";
        let got = problems(text);
        assert_eq!(got[0].0, "tenants[1].name");
        assert!(got[0].1.contains("duplicate tenant \"a\""), "{got:?}");
        assert_eq!(got[1].0, "tenants[2].hostNamespace");
    }

    #[test]
    fn syntax_errors_give_line_and_column() {
        let err = tenants("tenants:\n  - name: a\n   bad: [\n").unwrap_err();
        assert_eq!(err.problems.len(), 1);
        assert!(err.problems[0].at.starts_with("line "), "{err}");
        assert!(err.problems[0].at.contains("column"), "{err}");
    }

    #[test]
    fn empty_and_missing_files() {
        let got = problems("");
        assert!(got[0].1.contains("empty"), "{got:?}");
        let got = problems("# only a comment\n");
        assert!(got[0].1.contains("empty"), "{got:?}");
        let err = TenantsFile::load(Path::new("/nonexistent/tenants.yaml")).unwrap_err();
        assert_eq!(err.problems[0].at, "file");
        assert!(
            err.to_string()
                .contains("/nonexistent/tenants.yaml: file: cannot read"),
            "{err}"
        );
        let got = problems("tenants: {}");
        assert_eq!(
            got[0],
            ("tenants".into(), "expected a list, got a mapping".into())
        );
    }

    #[test]
    fn vcluster_yaml_ignores_other_sections() {
        let text = r#"
controlPlane: {distro: {k8s: {enabled: true}}}
sync:
  toHost:
    pods: {enabled: true}
  fromHost:
    nodes: {enabled: true}
    runtimeClasses:
      enabled: true
      selector:
        matchLabels: {environment: development}
"#;
        let rc = RuntimeClassSync::parse_vcluster_yaml(Path::new("vcluster.yaml"), text).unwrap();
        assert!(rc.enabled);
        assert!(rc.gates_pods());
        let rc = RuntimeClassSync::parse_vcluster_yaml(Path::new("vcluster.yaml"), "").unwrap();
        assert_eq!(rc, RuntimeClassSync::default());
        let err = RuntimeClassSync::parse_vcluster_yaml(
            Path::new("v.yaml"),
            "sync: {fromHost: {runtimeclasses: {}}}",
        )
        .unwrap_err();
        assert_eq!(err.problems[0].at, "sync.fromHost.runtimeclasses");
    }

    #[test]
    fn empty_selector_selects_everything_and_does_not_gate() {
        let rc = RuntimeClassSync::parse_vcluster_yaml(
            Path::new("v.yaml"),
            "sync: {fromHost: {runtimeClasses: {enabled: true, selector: {}}}}",
        )
        .unwrap();
        assert!(rc.selects(&BTreeMap::new()));
        assert!(!rc.gates_pods());
    }

    #[test]
    fn patches_parse_each_mode() {
        let text = r#"
sync:
  fromHost:
    runtimeClasses:
      enabled: true
      patches:
        - path: metadata.name
          expression: 'value === "gvisor" ? "sandboxed" : value'
          reverseExpression: 'value === "sandboxed" ? "gvisor" : value'
        - path: metadata.labels
          labels: {}
        - path: spec.secretRef
          reference: {apiVersion: v1, kind: Secret, namePath: name}
"#;
        let rc = RuntimeClassSync::parse_vcluster_yaml(Path::new("v.yaml"), text).unwrap();
        assert_eq!(rc.patches.len(), 3);
        assert!(matches!(
            rc.patches[0].mode,
            PatchMode::Expression {
                reverse_expression: Some(_),
                ..
            }
        ));
        assert_eq!(rc.patches[1].mode, PatchMode::Labels);
        assert!(matches!(&rc.patches[2].mode, PatchMode::Reference(r) if r.kind == "Secret"));
    }
}
