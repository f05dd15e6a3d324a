//! Pod Security Standards, evaluated by the host agent on every Pod it writes.
//!
//! The checks and their wording follow upstream's Pod Security admission at its latest version
//! (`k8s.io/pod-security-admission/policy`), so a refusal reads as kube-apiserver would word it:
//!
//! ```text
//!  violates PodSecurity "baseline:latest": hostPath volumes (volume "h"), privileged (container "app" must not set securityContext.privileged=true)
//! ```
//!
//! Checks run in upstream's order: the baseline checks sorted by ID, then the restricted ones;
//! a restricted check that supersedes a baseline one (volumes, capabilities, seccomp, procMount)
//! replaces it at the restricted level. Init, regular and ephemeral containers are all checked.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{
    ContainerPort, Lifecycle, LifecycleHandler, PodSpec, Probe, SecurityContext, Volume,
};
use rcsync_core::PodSecurityLevel;

/// One failed check: upstream's reason and detail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The check's short reason, e.g. `privileged`.
    pub reason: String,
    /// What exactly violates it, e.g. `container "app" must not set securityContext.privileged=true`.
    pub detail: String,
}

/// Every violation of a Pod at one level, in upstream's order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violations {
    /// The level that was enforced.
    pub level: PodSecurityLevel,
    /// What failed; empty when the Pod is allowed.
    pub failed: Vec<Violation>,
}

impl std::fmt::Display for Violations {
    /// `violates PodSecurity "baseline:latest": reason (detail), reason (detail)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "violates PodSecurity \"{}:latest\": ", self.level)?;
        for (i, v) in self.failed.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(&v.reason)?;
            if !v.detail.is_empty() {
                write!(f, " ({})", v.detail)?;
            }
        }
        Ok(())
    }
}

/// Evaluates a Pod (its annotations and spec) at `level`; `Ok` when it is allowed.
pub fn evaluate(
    level: PodSecurityLevel,
    annotations: Option<&std::collections::BTreeMap<String, String>>,
    spec: &PodSpec,
) -> Result<(), Violations> {
    let checks: &[Check] = match level {
        PodSecurityLevel::Privileged => return Ok(()),
        PodSecurityLevel::Baseline => BASELINE,
        PodSecurityLevel::Restricted => RESTRICTED,
    };
    let pod = PodView::new(annotations, spec);
    let failed: Vec<Violation> = checks.iter().filter_map(|check| check(&pod)).collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Violations { level, failed })
    }
}

type Check = fn(&PodView<'_>) -> Option<Violation>;

/// Baseline, in upstream's order (check IDs sorted).
const BASELINE: &[Check] = &[
    app_armor_profile,
    capabilities_baseline,
    host_namespaces,
    host_path_volumes,
    host_ports,
    host_probes_and_host_lifecycle,
    privileged,
    proc_mount_baseline,
    se_linux_options,
    seccomp_profile_baseline,
    sysctls,
    windows_host_process,
];

/// Restricted: baseline without the checks restricted ones supersede, then the restricted checks.
const RESTRICTED: &[Check] = &[
    app_armor_profile,
    host_namespaces,
    host_ports,
    host_probes_and_host_lifecycle,
    privileged,
    se_linux_options,
    sysctls,
    windows_host_process,
    allow_privilege_escalation,
    capabilities_restricted,
    proc_mount_restricted,
    restricted_volumes,
    run_as_non_root,
    run_as_user,
    seccomp_profile_restricted,
];

/// A container of any kind (init, regular, ephemeral), as the checks see it.
struct ContainerView<'a> {
    name: &'a str,
    security: Option<&'a SecurityContext>,
    ports: &'a [ContainerPort],
    probes: [Option<&'a Probe>; 3],
    lifecycle: Option<&'a Lifecycle>,
}

struct PodView<'a> {
    annotations: Option<&'a std::collections::BTreeMap<String, String>>,
    spec: &'a PodSpec,
    containers: Vec<ContainerView<'a>>,
}

impl<'a> PodView<'a> {
    fn new(annotations: Option<&'a std::collections::BTreeMap<String, String>>, spec: &'a PodSpec) -> Self {
        // Container and EphemeralContainer are different types with the same fields.
        macro_rules! view {
            ($c:expr) => {
                ContainerView {
                    name: &$c.name,
                    security: $c.security_context.as_ref(),
                    ports: $c.ports.as_deref().unwrap_or_default(),
                    probes: [
                        $c.liveness_probe.as_ref(),
                        $c.readiness_probe.as_ref(),
                        $c.startup_probe.as_ref(),
                    ],
                    lifecycle: $c.lifecycle.as_ref(),
                }
            };
        }
        let containers = spec
            .init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
            .map(|c| view!(c))
            .chain(spec.ephemeral_containers.iter().flatten().map(|c| view!(c)))
            .collect();
        Self {
            annotations,
            spec,
            containers,
        }
    }

    /// Names of the containers for which `bad` holds.
    fn containers_where(&self, bad: impl Fn(&ContainerView<'a>) -> bool) -> Vec<&'a str> {
        self.containers
            .iter()
            .filter(|c| bad(c))
            .map(|c| c.name)
            .collect()
    }

    fn is_windows(&self) -> bool {
        self.spec.os.as_ref().is_some_and(|os| os.name == "windows")
    }

    /// A Pod in its own user namespace (`hostUsers: false`) gets some checks relaxed.
    fn in_user_namespace(&self) -> bool {
        self.spec.host_users == Some(false)
    }

    fn pod_security(&self) -> Option<&'a k8s_openapi::api::core::v1::PodSecurityContext> {
        self.spec.security_context.as_ref()
    }
}

fn violation(reason: impl Into<String>, detail: impl Into<String>) -> Option<Violation> {
    Some(Violation {
        reason: reason.into(),
        detail: detail.into(),
    })
}

fn join_quote<S: AsRef<str>>(items: &[S]) -> String {
    items
        .iter()
        .map(|s| format!("\"{}\"", s.as_ref()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn pluralize<'s>(singular: &'s str, plural: &'s str, count: usize) -> &'s str {
    if count == 1 { singular } else { plural }
}

/// `container "a"` / `containers "a", "b"`.
fn containers_phrase(names: &[&str]) -> String {
    format!(
        "{} {}",
        pluralize("container", "containers", names.len()),
        join_quote(names)
    )
}

fn app_armor_profile(pod: &PodView<'_>) -> Option<Violation> {
    let allowed = |t: &str| t == "RuntimeDefault" || t == "Localhost";
    let mut setters = Vec::new();
    let mut values = BTreeSet::new();
    if let Some(profile) = pod.pod_security().and_then(|s| s.app_armor_profile.as_ref())
        && !allowed(&profile.type_)
    {
        setters.push("pod".to_string());
        values.insert(profile.type_.clone());
    }
    let bad = pod.containers_where(|c| {
        c.security
            .and_then(|s| s.app_armor_profile.as_ref())
            .is_some_and(|p| !allowed(&p.type_))
    });
    for c in &pod.containers {
        if let Some(p) = c.security.and_then(|s| s.app_armor_profile.as_ref())
            && !allowed(&p.type_)
        {
            values.insert(p.type_.clone());
        }
    }
    if !bad.is_empty() {
        setters.push(containers_phrase(&bad));
    }
    let mut annotations: Vec<String> = pod
        .annotations
        .into_iter()
        .flatten()
        .filter(|(k, v)| {
            k.starts_with("container.apparmor.security.beta.kubernetes.io/")
                && !(v.is_empty() || *v == "runtime/default" || v.starts_with("localhost/"))
        })
        .map(|(k, v)| format!("{k}={v:?}"))
        .collect();
    annotations.sort();
    let mut listed: Vec<String> = values.into_iter().collect();
    if !annotations.is_empty() {
        setters.push(pluralize("annotation", "annotations", annotations.len()).to_string());
        listed.extend(annotations);
    }
    if setters.is_empty() {
        return None;
    }
    violation(
        pluralize(
            "forbidden AppArmor profile",
            "forbidden AppArmor profiles",
            listed.len(),
        ),
        format!(
            "{} must not set AppArmor profile type to {}",
            setters.join(" and "),
            join_quote(&listed)
        ),
    )
}

/// Capabilities a baseline container may add.
const BASELINE_CAPABILITIES: &[&str] = &[
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

fn added_capabilities<'a>(c: &ContainerView<'a>) -> &'a [String] {
    c.security
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|caps| caps.add.as_deref())
        .unwrap_or_default()
}

fn capabilities_baseline(pod: &PodView<'_>) -> Option<Violation> {
    let mut forbidden = BTreeSet::new();
    let bad = pod.containers_where(|c| {
        added_capabilities(c)
            .iter()
            .any(|cap| !BASELINE_CAPABILITIES.contains(&cap.as_str()))
    });
    for c in &pod.containers {
        for cap in added_capabilities(c) {
            if !BASELINE_CAPABILITIES.contains(&cap.as_str()) {
                forbidden.insert(cap.clone());
            }
        }
    }
    if bad.is_empty() {
        return None;
    }
    violation(
        "non-default capabilities",
        format!(
            "{} must not include {} in securityContext.capabilities.add",
            containers_phrase(&bad),
            join_quote(&forbidden.into_iter().collect::<Vec<_>>())
        ),
    )
}

fn host_namespaces(pod: &PodView<'_>) -> Option<Violation> {
    let spec = pod.spec;
    let set: Vec<&str> = [
        (spec.host_network, "hostNetwork=true"),
        (spec.host_pid, "hostPID=true"),
        (spec.host_ipc, "hostIPC=true"),
    ]
    .into_iter()
    .filter(|(on, _)| *on == Some(true))
    .map(|(_, text)| text)
    .collect();
    if set.is_empty() {
        return None;
    }
    violation("host namespaces", set.join(", "))
}

fn volumes<'a>(pod: &PodView<'a>) -> impl Iterator<Item = &'a Volume> {
    pod.spec.volumes.iter().flatten()
}

fn host_path_volumes(pod: &PodView<'_>) -> Option<Violation> {
    let bad: Vec<&str> = volumes(pod)
        .filter(|v| v.host_path.is_some())
        .map(|v| v.name.as_str())
        .collect();
    if bad.is_empty() {
        return None;
    }
    violation(
        "hostPath volumes",
        format!(
            "{} {}",
            pluralize("volume", "volumes", bad.len()),
            join_quote(&bad)
        ),
    )
}

fn host_ports(pod: &PodView<'_>) -> Option<Violation> {
    let bad = pod.containers_where(|c| c.ports.iter().any(|p| p.host_port.unwrap_or(0) != 0));
    if bad.is_empty() {
        return None;
    }
    // Upstream lists the ports as a sorted set of strings.
    let ports: BTreeSet<String> = pod
        .containers
        .iter()
        .flat_map(|c| c.ports)
        .filter_map(|p| p.host_port.filter(|h| *h != 0))
        .map(|h| h.to_string())
        .collect();
    violation(
        "hostPort",
        format!(
            "{} {} {} {}",
            containers_phrase(&bad),
            pluralize("uses", "use", bad.len()),
            pluralize("hostPort", "hostPorts", ports.len()),
            ports.into_iter().collect::<Vec<_>>().join(", ")
        ),
    )
}

/// The hosts a container's probes and lifecycle handlers name (HTTP GET and TCP socket).
fn forbidden_hosts(c: &ContainerView<'_>) -> Vec<String> {
    let probes = c
        .probes
        .iter()
        .flatten()
        .map(|p| (p.http_get.as_ref(), p.tcp_socket.as_ref()));
    let handlers = [
        c.lifecycle.and_then(|l| l.post_start.as_ref()),
        c.lifecycle.and_then(|l| l.pre_stop.as_ref()),
    ]
    .into_iter()
    .flatten()
    .map(|h: &LifecycleHandler| (h.http_get.as_ref(), h.tcp_socket.as_ref()));
    probes
        .chain(handlers)
        .flat_map(|(http, tcp)| {
            [
                http.and_then(|g| g.host.clone()),
                tcp.and_then(|t| t.host.clone()),
            ]
        })
        .flatten()
        .filter(|h| !h.is_empty())
        .collect()
}

fn host_probes_and_host_lifecycle(pod: &PodView<'_>) -> Option<Violation> {
    let mut bad = BTreeSet::new();
    let mut hosts = BTreeSet::new();
    for c in &pod.containers {
        let found = forbidden_hosts(c);
        if !found.is_empty() {
            bad.insert(c.name);
            hosts.extend(found);
        }
    }
    if bad.is_empty() {
        return None;
    }
    let bad: Vec<&str> = bad.into_iter().collect();
    let hosts: Vec<String> = hosts.into_iter().collect();
    violation(
        "probe or lifecycle host",
        format!(
            "{} {} {} {}",
            containers_phrase(&bad),
            pluralize("uses", "use", bad.len()),
            pluralize("probe or lifecycle host", "probe or lifecycle hosts", hosts.len()),
            join_quote(&hosts)
        ),
    )
}

fn privileged(pod: &PodView<'_>) -> Option<Violation> {
    let bad = pod.containers_where(|c| c.security.and_then(|s| s.privileged) == Some(true));
    if bad.is_empty() {
        return None;
    }
    violation(
        "privileged",
        format!(
            "{} must not set securityContext.privileged=true",
            containers_phrase(&bad)
        ),
    )
}

fn proc_mount(pod: &PodView<'_>) -> Option<Violation> {
    let mount = |c: &ContainerView<'_>| c.security.and_then(|s| s.proc_mount.clone());
    let bad = pod.containers_where(|c| mount(c).is_some_and(|m| m != "Default"));
    if bad.is_empty() {
        return None;
    }
    let types: BTreeSet<String> = pod
        .containers
        .iter()
        .filter_map(mount)
        .filter(|m| m != "Default")
        .collect();
    violation(
        "procMount",
        format!(
            "{} must not set securityContext.procMount to {}",
            containers_phrase(&bad),
            join_quote(&types.into_iter().collect::<Vec<_>>())
        ),
    )
}

fn proc_mount_baseline(pod: &PodView<'_>) -> Option<Violation> {
    if pod.in_user_namespace() {
        return None;
    }
    proc_mount(pod)
}

fn proc_mount_restricted(pod: &PodView<'_>) -> Option<Violation> {
    proc_mount(pod)
}

fn se_linux_options(pod: &PodView<'_>) -> Option<Violation> {
    const ALLOWED_TYPES: &[&str] = &[
        "",
        "container_t",
        "container_init_t",
        "container_kvm_t",
        "container_engine_t",
    ];
    let mut bad_types = BTreeSet::new();
    let (mut set_user, mut set_role) = (false, false);
    let mut valid = |opts: &k8s_openapi::api::core::v1::SELinuxOptions| {
        let mut ok = true;
        let t = opts.type_.clone().unwrap_or_default();
        if !ALLOWED_TYPES.contains(&t.as_str()) {
            ok = false;
            bad_types.insert(t);
        }
        if opts.user.as_deref().is_some_and(|u| !u.is_empty()) {
            ok = false;
            set_user = true;
        }
        if opts.role.as_deref().is_some_and(|r| !r.is_empty()) {
            ok = false;
            set_role = true;
        }
        ok
    };
    let mut setters = Vec::new();
    if let Some(opts) = pod.pod_security().and_then(|s| s.se_linux_options.as_ref())
        && !valid(opts)
    {
        setters.push("pod".to_string());
    }
    let mut bad = Vec::new();
    for c in &pod.containers {
        if let Some(opts) = c.security.and_then(|s| s.se_linux_options.as_ref())
            && !valid(opts)
        {
            bad.push(c.name);
        }
    }
    if !bad.is_empty() {
        setters.push(containers_phrase(&bad));
    }
    if setters.is_empty() {
        return None;
    }
    let mut data = Vec::new();
    if !bad_types.is_empty() {
        data.push(format!(
            "{} {}",
            pluralize("type", "types", bad_types.len()),
            join_quote(&bad_types.into_iter().collect::<Vec<_>>())
        ));
    }
    if set_user {
        data.push("user may not be set".to_string());
    }
    if set_role {
        data.push("role may not be set".to_string());
    }
    violation(
        "seLinuxOptions",
        format!(
            "{} set forbidden securityContext.seLinuxOptions: {}",
            setters.join(" and "),
            data.join("; ")
        ),
    )
}

fn valid_seccomp(t: &str) -> bool {
    t == "Localhost" || t == "RuntimeDefault"
}

/// Explicitly bad seccomp settings: setters (`pod`, `containers "a"`) and the bad types; and the
/// containers that set none while the Pod sets none either.
fn seccomp_settings(pod: &PodView<'_>) -> (Vec<String>, BTreeSet<String>, Vec<String>) {
    let mut setters = Vec::new();
    let mut values = BTreeSet::new();
    let mut pod_set = false;
    if let Some(profile) = pod.pod_security().and_then(|s| s.seccomp_profile.as_ref()) {
        if valid_seccomp(&profile.type_) {
            pod_set = true;
        } else {
            setters.push("pod".to_string());
            values.insert(profile.type_.clone());
        }
    }
    let mut explicit = Vec::new();
    let mut implicit = Vec::new();
    for c in &pod.containers {
        match c.security.and_then(|s| s.seccomp_profile.as_ref()) {
            Some(p) if !valid_seccomp(&p.type_) => {
                explicit.push(c.name);
                values.insert(p.type_.clone());
            }
            Some(_) => {}
            None if !pod_set => implicit.push(c.name.to_string()),
            None => {}
        }
    }
    if !explicit.is_empty() {
        setters.push(containers_phrase(&explicit));
    }
    (setters, values, implicit)
}

fn seccomp_profile_baseline(pod: &PodView<'_>) -> Option<Violation> {
    let (setters, values, _) = seccomp_settings(pod);
    if setters.is_empty() {
        return None;
    }
    violation(
        "seccompProfile",
        format!(
            "{} must not set securityContext.seccompProfile.type to {}",
            setters.join(" and "),
            join_quote(&values.into_iter().collect::<Vec<_>>())
        ),
    )
}

fn seccomp_profile_restricted(pod: &PodView<'_>) -> Option<Violation> {
    if pod.is_windows() {
        return None;
    }
    let (setters, values, implicit) = seccomp_settings(pod);
    if !setters.is_empty() {
        return violation(
            "seccompProfile",
            format!(
                "{} must not set securityContext.seccompProfile.type to {}",
                setters.join(" and "),
                join_quote(&values.into_iter().collect::<Vec<_>>())
            ),
        );
    }
    if !implicit.is_empty() {
        return violation(
            "seccompProfile",
            format!(
                "pod or {} {} must set securityContext.seccompProfile.type to \"RuntimeDefault\" or \"Localhost\"",
                pluralize("container", "containers", implicit.len()),
                join_quote(&implicit)
            ),
        );
    }
    None
}

/// Sysctls a baseline Pod may set (upstream's list at its latest version).
const ALLOWED_SYSCTLS: &[&str] = &[
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
    "net.ipv4.tcp_rmem",
    "net.ipv4.tcp_wmem",
    "net.ipv4.tcp_slow_start_after_idle",
    "net.ipv4.tcp_notsent_lowat",
];

fn sysctls(pod: &PodView<'_>) -> Option<Violation> {
    let bad: Vec<&str> = pod
        .pod_security()
        .and_then(|s| s.sysctls.as_deref())
        .unwrap_or_default()
        .iter()
        .filter(|s| !ALLOWED_SYSCTLS.contains(&s.name.as_str()))
        .map(|s| s.name.as_str())
        .collect();
    if bad.is_empty() {
        return None;
    }
    violation("forbidden sysctls", bad.join(", "))
}

fn windows_host_process(pod: &PodView<'_>) -> Option<Violation> {
    let mut setters = Vec::new();
    if pod
        .pod_security()
        .and_then(|s| s.windows_options.as_ref())
        .and_then(|w| w.host_process)
        == Some(true)
    {
        setters.push("pod".to_string());
    }
    let bad = pod.containers_where(|c| {
        c.security
            .and_then(|s| s.windows_options.as_ref())
            .and_then(|w| w.host_process)
            == Some(true)
    });
    if !bad.is_empty() {
        setters.push(containers_phrase(&bad));
    }
    if setters.is_empty() {
        return None;
    }
    violation(
        "hostProcess",
        format!(
            "{} must not set securityContext.windowsOptions.hostProcess=true",
            setters.join(" and ")
        ),
    )
}

fn allow_privilege_escalation(pod: &PodView<'_>) -> Option<Violation> {
    if pod.is_windows() {
        return None;
    }
    let bad = pod.containers_where(|c| c.security.and_then(|s| s.allow_privilege_escalation) != Some(false));
    if bad.is_empty() {
        return None;
    }
    violation(
        "allowPrivilegeEscalation != false",
        format!(
            "{} must set securityContext.allowPrivilegeEscalation=false",
            containers_phrase(&bad)
        ),
    )
}

fn capabilities_restricted(pod: &PodView<'_>) -> Option<Violation> {
    if pod.is_windows() {
        return None;
    }
    let mut missing_drop_all = Vec::new();
    let mut adding = Vec::new();
    let mut forbidden = BTreeSet::new();
    for c in &pod.containers {
        let caps = c.security.and_then(|s| s.capabilities.as_ref());
        let dropped_all = caps
            .and_then(|caps| caps.drop.as_deref())
            .unwrap_or_default()
            .iter()
            .any(|d| d == "ALL");
        if !dropped_all {
            missing_drop_all.push(c.name);
        }
        let mut added_forbidden = false;
        for cap in added_capabilities(c) {
            if cap != "NET_BIND_SERVICE" {
                added_forbidden = true;
                forbidden.insert(cap.clone());
            }
        }
        if added_forbidden {
            adding.push(c.name);
        }
    }
    let mut details = Vec::new();
    if !missing_drop_all.is_empty() {
        details.push(format!(
            "{} must set securityContext.capabilities.drop=[\"ALL\"]",
            containers_phrase(&missing_drop_all)
        ));
    }
    if !adding.is_empty() {
        details.push(format!(
            "{} must not include {} in securityContext.capabilities.add",
            containers_phrase(&adding),
            join_quote(&forbidden.into_iter().collect::<Vec<_>>())
        ));
    }
    if details.is_empty() {
        return None;
    }
    violation("unrestricted capabilities", details.join("; "))
}

fn restricted_volumes(pod: &PodView<'_>) -> Option<Violation> {
    let mut bad = Vec::new();
    let mut types = BTreeSet::new();
    for v in volumes(pod) {
        if v.config_map.is_some()
            || v.csi.is_some()
            || v.downward_api.is_some()
            || v.empty_dir.is_some()
            || v.ephemeral.is_some()
            || v.image.is_some()
            || v.persistent_volume_claim.is_some()
            || v.projected.is_some()
            || v.secret.is_some()
        {
            continue;
        }
        bad.push(v.name.as_str());
        types.insert(volume_type(v));
    }
    if bad.is_empty() {
        return None;
    }
    violation(
        "restricted volume types",
        format!(
            "{} {} {} {} {}",
            pluralize("volume", "volumes", bad.len()),
            join_quote(&bad),
            pluralize("uses", "use", bad.len()),
            pluralize("restricted volume type", "restricted volume types", types.len()),
            join_quote(&types.into_iter().collect::<Vec<_>>())
        ),
    )
}

/// The volume source a volume uses, by its field name (`unknown` when none is known).
pub fn volume_type(v: &Volume) -> &'static str {
    let kinds: [(bool, &'static str); 30] = [
        (v.host_path.is_some(), "hostPath"),
        (v.gce_persistent_disk.is_some(), "gcePersistentDisk"),
        (v.aws_elastic_block_store.is_some(), "awsElasticBlockStore"),
        (v.git_repo.is_some(), "gitRepo"),
        (v.nfs.is_some(), "nfs"),
        (v.iscsi.is_some(), "iscsi"),
        (v.glusterfs.is_some(), "glusterfs"),
        (v.rbd.is_some(), "rbd"),
        (v.flex_volume.is_some(), "flexVolume"),
        (v.cinder.is_some(), "cinder"),
        (v.cephfs.is_some(), "cephfs"),
        (v.flocker.is_some(), "flocker"),
        (v.fc.is_some(), "fc"),
        (v.azure_file.is_some(), "azureFile"),
        (v.vsphere_volume.is_some(), "vsphereVolume"),
        (v.quobyte.is_some(), "quobyte"),
        (v.azure_disk.is_some(), "azureDisk"),
        (v.photon_persistent_disk.is_some(), "photonPersistentDisk"),
        (v.portworx_volume.is_some(), "portworxVolume"),
        (v.scale_io.is_some(), "scaleIO"),
        (v.storageos.is_some(), "storageos"),
        (v.config_map.is_some(), "configMap"),
        (v.csi.is_some(), "csi"),
        (v.downward_api.is_some(), "downwardAPI"),
        (v.empty_dir.is_some(), "emptyDir"),
        (v.ephemeral.is_some(), "ephemeral"),
        (v.image.is_some(), "image"),
        (v.persistent_volume_claim.is_some(), "persistentVolumeClaim"),
        (v.projected.is_some(), "projected"),
        (v.secret.is_some(), "secret"),
    ];
    kinds
        .into_iter()
        .find(|(set, _)| *set)
        .map_or("unknown", |(_, name)| name)
}

fn run_as_non_root(pod: &PodView<'_>) -> Option<Violation> {
    if pod.in_user_namespace() {
        return None;
    }
    let mut setters = Vec::new();
    let mut pod_non_root = false;
    match pod.pod_security().and_then(|s| s.run_as_non_root) {
        Some(false) => setters.push("pod".to_string()),
        Some(true) => pod_non_root = true,
        None => {}
    }
    let mut explicit = Vec::new();
    let mut implicit = Vec::new();
    for c in &pod.containers {
        match c.security.and_then(|s| s.run_as_non_root) {
            Some(false) => explicit.push(c.name),
            Some(true) => {}
            None if !pod_non_root => implicit.push(c.name),
            None => {}
        }
    }
    if !explicit.is_empty() {
        setters.push(containers_phrase(&explicit));
    }
    if !setters.is_empty() {
        return violation(
            "runAsNonRoot != true",
            format!(
                "{} must not set securityContext.runAsNonRoot=false",
                setters.join(" and ")
            ),
        );
    }
    if !implicit.is_empty() {
        return violation(
            "runAsNonRoot != true",
            format!(
                "pod or {} must set securityContext.runAsNonRoot=true",
                containers_phrase(&implicit)
            ),
        );
    }
    None
}

fn run_as_user(pod: &PodView<'_>) -> Option<Violation> {
    if pod.in_user_namespace() {
        return None;
    }
    let mut setters = Vec::new();
    if pod.pod_security().and_then(|s| s.run_as_user) == Some(0) {
        setters.push("pod".to_string());
    }
    let bad = pod.containers_where(|c| c.security.and_then(|s| s.run_as_user) == Some(0));
    if !bad.is_empty() {
        setters.push(containers_phrase(&bad));
    }
    if setters.is_empty() {
        return None;
    }
    violation(
        "runAsUser=0",
        format!("{} must not set runAsUser=0", setters.join(" and ")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// A Pod that passes the restricted level; each case changes one thing.
    fn restricted_pod() -> Value {
        json!({
            "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "app",
                "image": "app",
                "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}
            }],
            "volumes": [{"name": "scratch", "emptyDir": {}}]
        })
    }

    fn with(patch: Value) -> Value {
        let mut pod = restricted_pod();
        merge(&mut pod, patch);
        pod
    }

    fn merge(target: &mut Value, patch: Value) {
        match (target, patch) {
            (Value::Object(t), Value::Object(p)) => {
                for (k, v) in p {
                    merge(t.entry(k).or_insert(Value::Null), v);
                }
            }
            (t, p) => *t = p,
        }
    }

    fn check(level: PodSecurityLevel, spec: &Value, annotations: &[(&str, &str)]) -> Result<(), String> {
        let spec: PodSpec = serde_json::from_value(spec.clone()).unwrap();
        let annotations = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        evaluate(level, Some(&annotations), &spec).map_err(|v| v.to_string())
    }

    fn container(security: Value) -> Value {
        json!({"containers": [{"name": "app", "image": "app", "securityContext": security}]})
    }

    #[test]
    fn the_restricted_reference_pod_passes_every_level() {
        for level in [
            PodSecurityLevel::Privileged,
            PodSecurityLevel::Baseline,
            PodSecurityLevel::Restricted,
        ] {
            assert_eq!(check(level, &restricted_pod(), &[]), Ok(()), "{level}");
        }
    }

    /// (rule, the change to the reference Pod, its annotations, the expected reason and detail)
    type Case = (
        &'static str,
        Value,
        &'static [(&'static str, &'static str)],
        &'static str,
    );

    #[test]
    fn baseline_rules() {
        // (rule, the change, expected message at baseline and restricted alike)
        let cases: Vec<Case> = vec![
            (
                "appArmorProfile",
                container(
                    json!({"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}, "appArmorProfile": {"type": "Unconfined"}}),
                ),
                &[],
                r#"forbidden AppArmor profile (container "app" must not set AppArmor profile type to "Unconfined")"#,
            ),
            (
                "appArmorProfile annotation",
                restricted_pod(),
                &[("container.apparmor.security.beta.kubernetes.io/app", "unconfined")],
                // Upstream quotes the value with %q inside joinQuote's quotes, unescaped.
                r#"forbidden AppArmor profile (annotation must not set AppArmor profile type to "container.apparmor.security.beta.kubernetes.io/app="unconfined"")"#,
            ),
            (
                "capabilities_baseline",
                container(
                    json!({"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "SYS_TIME"]}}),
                ),
                &[],
                r#"container "app" must not include "NET_ADMIN", "SYS_TIME" in securityContext.capabilities.add"#,
            ),
            (
                "hostNamespaces",
                json!({"hostNetwork": true, "hostPID": true, "hostIPC": true}),
                &[],
                "host namespaces (hostNetwork=true, hostPID=true, hostIPC=true)",
            ),
            (
                "hostPorts",
                json!({"containers": [{"name": "app", "image": "app",
                    "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}},
                    "ports": [{"containerPort": 80, "hostPort": 8080}]}]}),
                &[],
                r#"hostPort (container "app" uses hostPort 8080)"#,
            ),
            (
                "hostProbesAndHostLifecycle",
                json!({"containers": [{"name": "app", "image": "app",
                    "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}},
                    "livenessProbe": {"httpGet": {"host": "10.0.0.1", "port": 80}},
                    "lifecycle": {"preStop": {"tcpSocket": {"host": "metadata.internal", "port": 80}}}}]}),
                &[],
                r#"probe or lifecycle host (container "app" uses probe or lifecycle hosts "10.0.0.1", "metadata.internal")"#,
            ),
            (
                "privileged",
                container(
                    json!({"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}, "privileged": true}),
                ),
                &[],
                r#"privileged (container "app" must not set securityContext.privileged=true)"#,
            ),
            (
                "procMount",
                container(
                    json!({"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}, "procMount": "Unmasked"}),
                ),
                &[],
                r#"procMount (container "app" must not set securityContext.procMount to "Unmasked")"#,
            ),
            (
                "seLinuxOptions",
                json!({"securityContext": {"seLinuxOptions": {"type": "spc_t", "user": "root"}}}),
                &[],
                r#"seLinuxOptions (pod set forbidden securityContext.seLinuxOptions: type "spc_t"; user may not be set)"#,
            ),
            (
                "seccompProfile",
                json!({"securityContext": {"seccompProfile": {"type": "Unconfined"}}}),
                &[],
                r#"seccompProfile (pod must not set securityContext.seccompProfile.type to "Unconfined")"#,
            ),
            (
                "sysctls",
                json!({"securityContext": {"sysctls": [{"name": "kernel.msgmax", "value": "1"}, {"name": "net.ipv4.tcp_syncookies", "value": "1"}]}}),
                &[],
                "forbidden sysctls (kernel.msgmax)",
            ),
            (
                "windowsHostProcess",
                json!({"securityContext": {"windowsOptions": {"hostProcess": true}}}),
                &[],
                "hostProcess (pod must not set securityContext.windowsOptions.hostProcess=true)",
            ),
        ];
        for (rule, change, annotations, want) in cases {
            let spec = with(change);
            for level in [PodSecurityLevel::Baseline, PodSecurityLevel::Restricted] {
                let got = check(level, &spec, annotations).expect_err(rule);
                assert!(
                    got.starts_with(&format!("violates PodSecurity \"{level}:latest\": ")),
                    "{rule}: {got}"
                );
                assert!(got.contains(want), "{rule} at {level}: {got}\nwanted: {want}");
            }
            assert_eq!(
                check(PodSecurityLevel::Privileged, &spec, annotations),
                Ok(()),
                "{rule}"
            );
        }
    }

    #[test]
    fn host_path_is_baseline_and_a_restricted_volume_type() {
        let spec = with(
            json!({"volumes": [{"name": "h", "hostPath": {"path": "/"}}, {"name": "n", "nfs": {"server": "s", "path": "/"}}]}),
        );
        assert_eq!(
            check(PodSecurityLevel::Baseline, &spec, &[]).unwrap_err(),
            r#"violates PodSecurity "baseline:latest": hostPath volumes (volume "h")"#
        );
        assert_eq!(
            check(PodSecurityLevel::Restricted, &spec, &[]).unwrap_err(),
            r#"violates PodSecurity "restricted:latest": restricted volume types (volumes "h", "n" use restricted volume types "hostPath", "nfs")"#
        );
    }

    #[test]
    fn restricted_rules() {
        let cases: Vec<(&str, Value, &str)> = vec![
            (
                "allowPrivilegeEscalation",
                container(json!({"capabilities": {"drop": ["ALL"]}})),
                r#"allowPrivilegeEscalation != false (container "app" must set securityContext.allowPrivilegeEscalation=false)"#,
            ),
            (
                "capabilities_restricted drop",
                container(json!({"allowPrivilegeEscalation": false})),
                r#"unrestricted capabilities (container "app" must set securityContext.capabilities.drop=["ALL"])"#,
            ),
            (
                "capabilities_restricted add",
                container(
                    json!({"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE", "CHOWN"]}}),
                ),
                r#"unrestricted capabilities (container "app" must not include "CHOWN" in securityContext.capabilities.add)"#,
            ),
            (
                "restrictedVolumes",
                json!({"volumes": [{"name": "repo", "gitRepo": {"repository": "r"}}]}),
                r#"restricted volume types (volume "repo" uses restricted volume type "gitRepo")"#,
            ),
            (
                "runAsNonRoot implicit",
                json!({"securityContext": {"runAsNonRoot": null}}),
                r#"runAsNonRoot != true (pod or container "app" must set securityContext.runAsNonRoot=true)"#,
            ),
            (
                "runAsNonRoot explicit",
                json!({"securityContext": {"runAsNonRoot": false}}),
                r#"runAsNonRoot != true (pod must not set securityContext.runAsNonRoot=false)"#,
            ),
            (
                "runAsUser",
                json!({"securityContext": {"runAsUser": 0}}),
                r#"runAsUser=0 (pod must not set runAsUser=0)"#,
            ),
            (
                "seccompProfile_restricted",
                json!({"securityContext": {"seccompProfile": null}}),
                r#"seccompProfile (pod or container "app" must set securityContext.seccompProfile.type to "RuntimeDefault" or "Localhost")"#,
            ),
        ];
        for (rule, change, want) in cases {
            let spec = with(change);
            let got = check(PodSecurityLevel::Restricted, &spec, &[]).expect_err(rule);
            assert!(got.contains(want), "{rule}: {got}\nwanted: {want}");
            assert_eq!(
                check(PodSecurityLevel::Baseline, &spec, &[]),
                Ok(()),
                "{rule} is restricted only"
            );
        }
    }

    #[test]
    fn violations_are_listed_in_upstream_order_and_cover_every_container_kind() {
        let spec = json!({
            "hostPID": true,
            "initContainers": [{"name": "init", "image": "i", "securityContext": {"privileged": true}}],
            "containers": [{"name": "app", "image": "a", "securityContext": {"privileged": true}}],
            "ephemeralContainers": [{"name": "debug", "image": "d", "securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}}],
            "volumes": [{"name": "h", "hostPath": {"path": "/"}}]
        });
        assert_eq!(
            check(PodSecurityLevel::Baseline, &spec, &[]).unwrap_err(),
            concat!(
                r#"violates PodSecurity "baseline:latest": "#,
                r#"non-default capabilities (container "debug" must not include "SYS_ADMIN" in securityContext.capabilities.add), "#,
                r#"host namespaces (hostPID=true), hostPath volumes (volume "h"), "#,
                r#"privileged (containers "init", "app" must not set securityContext.privileged=true)"#
            )
        );
    }

    #[test]
    fn user_namespaces_relax_what_upstream_relaxes() {
        let spec =
            with(json!({"hostUsers": false, "securityContext": {"runAsNonRoot": null, "runAsUser": 0}}));
        assert_eq!(check(PodSecurityLevel::Restricted, &spec, &[]), Ok(()));
        let windows = json!({"os": {"name": "windows"}, "securityContext": {"runAsNonRoot": true},
            "containers": [{"name": "app", "image": "a"}]});
        assert_eq!(check(PodSecurityLevel::Restricted, &windows, &[]), Ok(()));
    }
}
