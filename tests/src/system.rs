//! The whole system for end-to-end tests: a host and a virtual API server, the real `host-agent`
//! and `virtual-agent` binaries between them, and helpers that read like the spec.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Event as CoreEvent, Namespace, Pod};
use k8s_openapi::api::node::v1::RuntimeClass;
use kube::api::{ListParams, PostParams};
use kube::{Api, ResourceExt as _};
use serde_json::json;

use crate::proxy::FaultyProxy;
use crate::{Cluster, Process, binary, eventually, http_get, spawn_listening};

/// One tenant of the system.
#[derive(Clone, Debug)]
pub struct TenantSpec {
    /// Tenant (virtual cluster) name.
    pub name: String,
    /// Its `sync.fromHost.runtimeClasses` block as YAML flow (e.g. `{enabled: true}`).
    pub runtime_classes: String,
    /// Its `policies.podSecurityStandard`, when set.
    pub pod_security: Option<String>,
    /// More `policies` entries as YAML flow (e.g. `inlineVolumes: [nfs]`).
    pub policies: Vec<String>,
    /// Its `limits` block as YAML flow, when set.
    pub limits: Option<String>,
    /// Its `sync.toHost.pods` block as YAML flow, when set.
    pub host_pods: Option<String>,
    /// Its `sync.toHost.podDisruptionBudgets.enabled`.
    pub disruption_budgets: bool,
    /// Its `sync.toHost.persistentVolumeClaims.enabled`.
    pub claims: bool,
}

impl TenantSpec {
    /// A tenant with a `runtimeClasses` block.
    pub fn new(name: &str, runtime_classes: &str) -> Self {
        Self {
            name: name.into(),
            runtime_classes: runtime_classes.into(),
            pod_security: None,
            policies: Vec::new(),
            limits: None,
            host_pods: None,
            disruption_budgets: false,
            claims: false,
        }
    }

    /// The same tenant with `sync.toHost.persistentVolumeClaims.enabled` set to `enabled`.
    pub fn claims(mut self, enabled: bool) -> Self {
        self.claims = enabled;
        self
    }

    /// The same tenant with `sync.toHost.podDisruptionBudgets.enabled` set to `enabled`.
    pub fn disruption_budgets(mut self, enabled: bool) -> Self {
        self.disruption_budgets = enabled;
        self
    }

    /// The same tenant with a `limits` block (YAML flow, e.g. `{podSyncQps: 5}`).
    pub fn limits(mut self, limits: &str) -> Self {
        self.limits = Some(limits.into());
        self
    }

    /// The same tenant with a `sync.toHost.pods` block (YAML flow, e.g.
    /// `{copyAnnotations: ["prometheus.io/*"]}`).
    pub fn host_pods(mut self, block: &str) -> Self {
        self.host_pods = Some(block.into());
        self
    }

    /// The same tenant with `policies.podSecurityStandard: level`.
    pub fn pod_security(mut self, level: &str) -> Self {
        self.pod_security = Some(level.into());
        self
    }

    /// The same tenant with the `policies` entry `entry` (YAML flow, e.g. `inlineVolumes: [nfs]`).
    pub fn policy(mut self, entry: &str) -> Self {
        self.policies.push(entry.into());
        self
    }

    /// The host namespace of the tenant's Pods.
    pub fn host_namespace(&self) -> String {
        format!("vcluster-{}", self.name)
    }
}

/// A virtual cluster with its agent.
pub struct VirtualSide {
    /// The tenant.
    pub tenant: TenantSpec,
    /// Its API server.
    pub cluster: Cluster,
    /// Its agent.
    pub agent: Process,
    /// The agent's admin address.
    pub admin: String,
    args: Vec<String>,
    dir: PathBuf,
}

/// How the agents talk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Plain HTTP/2 (tokens only).
    Plaintext,
    /// TLS with client certificates (CN = tenant), plus tokens.
    MutualTls,
}

/// Host, host agent, and one virtual side per tenant.
pub struct System {
    /// The host API server.
    pub host: Cluster,
    /// The host agent.
    pub host_agent: Process,
    /// The host agent's gRPC address.
    pub grpc: String,
    /// The host agent's admin address.
    pub host_admin: String,
    /// The virtual sides, in tenant order.
    pub virtuals: Vec<VirtualSide>,
    host_args: Vec<String>,
    /// Scratch directory (config, tokens, logs); declared last so it outlives the processes,
    /// whose logs are printed on drop when a test fails.
    pub dir: tempfile::TempDir,
}

/// Namespace of the virtual agents' leader Lease in each virtual cluster: the one `deploy/`'s RBAC
/// grants.
pub const LEASE_NAMESPACE: &str = "rcsync-system";

/// Creates a namespace unless it exists.
pub async fn create_namespace(cluster: &Cluster, name: &str) {
    let namespaces: Api<Namespace> = Api::all(cluster.client().await);
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    match namespaces.create(&PostParams::default(), &ns).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("creating namespace {name}: {e}"),
    }
}

/// Label on every object the suite creates, so a run against real clusters can clean up after
/// an earlier one.
pub const E2E_LABEL: &str = "rcsync.io/e2e";

/// A host RuntimeClass with labels.
pub fn runtime_class(name: &str, handler: &str, labels: &[(&str, &str)]) -> RuntimeClass {
    let mut all: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    all.insert(E2E_LABEL.into(), "true".into());
    serde_json::from_value(json!({"metadata": {"name": name, "labels": all}, "handler": handler})).unwrap()
}

/// A Pod with one container and an optional runtimeClassName.
pub fn pod(name: &str, runtime_class: Option<&str>) -> Pod {
    let mut spec = json!({"containers": [{"name": "app", "image": "registry.example/app:1.0"}]});
    if let Some(rc) = runtime_class {
        spec["runtimeClassName"] = json!(rc);
    }
    serde_json::from_value(json!({"metadata": {"name": name, "labels": {"app": name}}, "spec": spec}))
        .unwrap()
}

/// The host agent's tenants file for `tenants`.
fn tenants_yaml(tenants: &[TenantSpec]) -> String {
    let mut config = String::from("tenants:\n");
    for t in tenants {
        let mut to_host = Vec::new();
        if let Some(pods) = &t.host_pods {
            to_host.push(format!("pods: {pods}"));
        }
        if t.disruption_budgets {
            to_host.push("podDisruptionBudgets: {enabled: true}".to_string());
        }
        if t.claims {
            to_host.push("persistentVolumeClaims: {enabled: true}".to_string());
        }
        config.push_str(&format!(
            "  - name: {}\n    hostNamespace: {}\n    tokenFile: {}.token\n    sync: {{fromHost: {{runtimeClasses: {}}}{}}}\n",
            t.name,
            t.host_namespace(),
            t.name,
            t.runtime_classes,
            if to_host.is_empty() {
                String::new()
            } else {
                format!(", toHost: {{{}}}", to_host.join(", "))
            }
        ));
        let policies: Vec<String> = t
            .pod_security
            .as_ref()
            .map(|level| format!("podSecurityStandard: {level}"))
            .into_iter()
            .chain(t.policies.iter().cloned())
            .collect();
        if !policies.is_empty() {
            config.push_str(&format!("    policies: {{{}}}\n", policies.join(", ")));
        }
        if let Some(limits) = &t.limits {
            config.push_str(&format!("    limits: {limits}\n"));
        }
    }
    config
}

impl System {
    /// Rewrites the host agent's tenants file (it reloads on change).
    pub fn rewrite_tenants(&self, tenants: &[TenantSpec]) {
        let path = self.dir.path().join("tenants.yaml");
        let next = path.with_extension("yaml.next");
        std::fs::write(&next, tenants_yaml(tenants)).unwrap();
        std::fs::rename(next, path).unwrap();
    }

    /// Starts everything: host classes are created before the agents start.
    pub async fn start(tenants: &[TenantSpec], host_classes: &[RuntimeClass]) -> Self {
        Self::start_with(tenants, host_classes, Transport::Plaintext).await
    }

    /// Starts everything, with the agents talking over `transport`.
    pub async fn start_with(
        tenants: &[TenantSpec],
        host_classes: &[RuntimeClass],
        transport: Transport,
    ) -> Self {
        Self::start_with_nodes(tenants, host_classes, transport, 0).await
    }

    /// Starts everything with `host_nodes` simulated nodes in the host cluster (devcluster's
    /// `--nodes`): host Pods are scheduled and run, and their status flows back.
    pub async fn start_with_nodes(
        tenants: &[TenantSpec],
        host_classes: &[RuntimeClass],
        transport: Transport,
        host_nodes: usize,
    ) -> Self {
        let options = devcluster::ServerOptions {
            nodes: devcluster::nodes::NodeOptions {
                count: host_nodes,
                handlers: None,
            },
            ..Default::default()
        };
        Self::start_with_host(tenants, host_classes, transport, options).await
    }

    /// Starts everything with a host devcluster run with `options` (e.g. one that serves the API
    /// of an older Kubernetes).
    pub async fn start_with_host(
        tenants: &[TenantSpec],
        host_classes: &[RuntimeClass],
        transport: Transport,
        options: devcluster::ServerOptions,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let host = Cluster::start_with("host", "RCSYNC_HOST_KUBECONFIG", dir.path(), options).await;
        let host_client = host.client().await;
        let classes: Api<RuntimeClass> = Api::all(host_client.clone());
        if host.dev.is_none() {
            clean_real_cluster(&host, tenants).await;
        }
        for rc in host_classes {
            classes.create(&PostParams::default(), rc).await.unwrap();
        }
        let namespaces: Api<Namespace> = Api::all(host_client);
        for t in tenants {
            let ns: Namespace =
                serde_json::from_value(json!({"metadata": {"name": t.host_namespace()}})).unwrap();
            match namespaces.create(&PostParams::default(), &ns).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 409 && host.dev.is_none() => {}
                Err(e) => panic!("creating namespace {}: {e}", t.host_namespace()),
            }
            std::fs::write(
                dir.path().join(format!("{}.token", t.name)),
                format!("secret-of-{}\n", t.name),
            )
            .unwrap();
        }
        std::fs::write(dir.path().join("tenants.yaml"), tenants_yaml(tenants)).unwrap();
        // The host agent runs as deploy/'s service account, with exactly deploy/'s RBAC.
        let host_manifest = crate::rbac::deploy_manifest("host-agent.yaml");
        let host_namespaces: Vec<String> = tenants.iter().map(TenantSpec::host_namespace).collect();
        let admin = host.client().await;
        crate::rbac::apply(
            &admin,
            &crate::rbac::host_agent_objects(&host_manifest, &host_namespaces),
        )
        .await;
        let (sa_ns, sa_name) = crate::rbac::service_account_of(&host_manifest);
        let host_agent_kubeconfig = crate::rbac::service_account_kubeconfig(
            &admin,
            &host.kubeconfig,
            &sa_ns,
            &sa_name,
            dir.path().join("host-agent.kubeconfig"),
        )
        .await;
        let pki =
            (transport == Transport::MutualTls).then(|| devcluster::pki::Pki::new("rcsync-e2e-ca").unwrap());
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path.display().to_string()
        };
        let mut tls_args: Vec<String> = Vec::new();
        if let Some(pki) = &pki {
            let serving = pki.server(&["127.0.0.1", "localhost"]).unwrap();
            tls_args = vec![
                "--tls-cert".to_string(),
                write("host-agent.crt", &serving.cert_pem),
                "--tls-key".to_string(),
                write("host-agent.key", &serving.key_pem),
                "--client-ca".to_string(),
                write("ca.crt", &pki.ca_pem()),
            ];
        }
        let (host_agent, addrs, host_args) = spawn_listening(
            "host-agent",
            &binary("host-agent"),
            dir.path(),
            2,
            "listening",
            |addrs| {
                let mut args: Vec<String> = [
                    "--kubeconfig",
                    &host_agent_kubeconfig.display().to_string(),
                    "--config",
                    &dir.path().join("tenants.yaml").display().to_string(),
                    "--grpc-listen",
                    &addrs[0],
                    "--admin-listen",
                    &addrs[1],
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                args.extend(tls_args.iter().cloned());
                args
            },
        )
        .await;
        let (grpc, host_admin) = (addrs[0].clone(), addrs[1].clone());
        let scheme = if pki.is_some() { "https" } else { "http" };
        let mut virtuals = Vec::new();
        for t in tenants {
            let cluster = Cluster::start(
                &format!("virtual-{}", t.name),
                "RCSYNC_VIRTUAL_KUBECONFIG",
                dir.path(),
            )
            .await;
            create_namespace(&cluster, LEASE_NAMESPACE).await;
            // The virtual agent runs as deploy/'s service account, with exactly deploy/'s RBAC.
            let virtual_manifest = crate::rbac::deploy_manifest("virtual-agent.yaml");
            let virtual_admin = cluster.client().await;
            crate::rbac::apply(
                &virtual_admin,
                &crate::rbac::virtual_agent_objects(&virtual_manifest),
            )
            .await;
            let (sa_ns, sa_name) = crate::rbac::service_account_of(&virtual_manifest);
            let agent_kubeconfig = crate::rbac::service_account_kubeconfig(
                &virtual_admin,
                &cluster.kubeconfig,
                &sa_ns,
                &sa_name,
                dir.path().join(format!("virtual-agent-{}.kubeconfig", t.name)),
            )
            .await;
            let mut tls_args: Vec<String> = Vec::new();
            if let Some(pki) = &pki {
                let client = pki.client(&t.name).unwrap();
                tls_args = vec![
                    "--ca-cert".to_string(),
                    dir.path().join("ca.crt").display().to_string(),
                    "--client-cert".to_string(),
                    write(&format!("{}.crt", t.name), &client.cert_pem),
                    "--client-key".to_string(),
                    write(&format!("{}.key", t.name), &client.key_pem),
                ];
            }
            let name = format!("virtual-agent-{}", t.name);
            let (agent, addrs, args) = spawn_listening(
                &name,
                &binary("virtual-agent"),
                dir.path(),
                1,
                "starting",
                |addrs| {
                    let mut args: Vec<String> = [
                        "--kubeconfig",
                        &agent_kubeconfig.display().to_string(),
                        "--host-agent",
                        &format!("{scheme}://{grpc}"),
                        "--tenant",
                        &t.name,
                        "--token-file",
                        &dir.path().join(format!("{}.token", t.name)).display().to_string(),
                        "--admin-listen",
                        &addrs[0],
                        "--lease-namespace",
                        LEASE_NAMESPACE,
                        "--identity",
                        &format!("virtual-agent-{}", t.name),
                        "--log-level",
                        "info,virtual_agent=debug",
                    ]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
                    args.extend(tls_args.iter().cloned());
                    args
                },
            )
            .await;
            let admin = addrs[0].clone();
            virtuals.push(VirtualSide {
                tenant: t.clone(),
                cluster,
                agent,
                admin,
                args,
                dir: dir.path().to_path_buf(),
            });
        }
        let system = Self {
            dir,
            host,
            host_agent,
            grpc,
            host_admin,
            virtuals,
            host_args,
        };
        system.wait_ready().await;
        system
    }

    /// Waits until every agent answers `/readyz` with 200.
    pub async fn wait_ready(&self) {
        wait_ready_at(&self.host_admin, "host-agent").await;
        for v in &self.virtuals {
            wait_ready_at(&v.admin, "virtual-agent").await;
        }
    }

    /// The first (often only) virtual side.
    pub fn virtual_side(&self) -> &VirtualSide {
        &self.virtuals[0]
    }

    /// Host RuntimeClasses.
    pub async fn host_classes(&self) -> Api<RuntimeClass> {
        Api::all(self.host.client().await)
    }

    /// Creates a host RuntimeClass.
    pub async fn create_host_class(&self, class: &RuntimeClass) -> RuntimeClass {
        self.host_classes()
            .await
            .create(&PostParams::default(), class)
            .await
            .unwrap()
    }

    /// Host Pods of a tenant.
    pub async fn host_pods(&self, tenant: &TenantSpec) -> Api<Pod> {
        Api::namespaced(self.host.client().await, &tenant.host_namespace())
    }

    /// Waits until the first tenant has exactly `count` host Pods not being deleted.
    pub async fn wait_host_pod_count(&self, count: usize) {
        let host = self.host_pods(&self.virtual_side().tenant).await;
        eventually(&format!("{count} Pods on the host"), || {
            let host = host.clone();
            async move {
                let pods = host.list(&Default::default()).await.ok()?.items;
                let live = pods
                    .iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_none())
                    .count();
                (live == count).then_some(())
            }
        })
        .await;
    }

    /// Restarts the host agent with its API server reached through a [`FaultyProxy`] (see
    /// [`crate::proxy::reroute_kubeconfig`]), and returns the proxy.
    pub async fn reroute_host_agent(&mut self) -> FaultyProxy {
        let proxy = crate::proxy::reroute_kubeconfig(&self.dir.path().join("host-agent.kubeconfig")).await;
        self.restart_host_agent().await;
        proxy
    }

    /// Kills the host agent (SIGKILL) unless it is down already, and starts it again.
    pub async fn restart_host_agent(&mut self) {
        if !self.host_agent.has_exited() {
            self.host_agent.signal("KILL");
            self.host_agent.wait_exit().await;
        }
        self.host_agent = Process::spawn(
            "host-agent-restarted",
            &binary("host-agent"),
            &self.host_args,
            self.dir.path(),
        );
        wait_ready_at(&self.host_admin, "host-agent").await;
    }
}

/// A further host agent replica: same cluster, same tenants file, its own ports.
pub struct HostAgentReplica {
    /// Its process.
    pub process: Process,
    /// Its gRPC address.
    pub grpc: String,
    /// Its admin address.
    pub admin: String,
    args: Vec<String>,
}

impl HostAgentReplica {
    /// Stops it with SIGTERM (waiting for the exit) and starts it again on the same ports.
    pub async fn roll(&mut self, dir: &Path) {
        self.process.terminate().await;
        self.process = Process::spawn(
            "host-agent-replica-rolled",
            &binary("host-agent"),
            &self.args,
            dir,
        );
        wait_ready_at(&self.admin, "host-agent replica").await;
    }
}

impl System {
    /// Stops the first host agent with SIGTERM (waiting for the exit) and starts it again on the
    /// same ports, as a rolling update does.
    pub async fn roll_host_agent(&mut self) {
        self.host_agent.terminate().await;
        self.host_agent = Process::spawn(
            "host-agent-rolled",
            &binary("host-agent"),
            &self.host_args,
            self.dir.path(),
        );
        wait_ready_at(&self.host_admin, "host-agent").await;
    }

    /// Starts another host agent with the first one's flags on its own ports, and waits until it
    /// is ready.
    pub async fn spawn_host_agent_replica(&self, name: &str) -> HostAgentReplica {
        let base = self.host_args.clone();
        let (process, addrs, args) = spawn_listening(
            name,
            &binary("host-agent"),
            self.dir.path(),
            2,
            "listening",
            |addrs| {
                let mut args = base.clone();
                set_flag(&mut args, "--grpc-listen", &addrs[0]);
                set_flag(&mut args, "--admin-listen", &addrs[1]);
                args
            },
        )
        .await;
        wait_ready_at(&addrs[1], name).await;
        HostAgentReplica {
            process,
            grpc: addrs[0].clone(),
            admin: addrs[1].clone(),
            args,
        }
    }
}

/// Sets `flag` to `value` in an argument list (`--flag value` form), adding it when absent.
pub fn set_flag(args: &mut Vec<String>, flag: &str, value: &str) {
    match args.iter().position(|a| a == flag) {
        Some(i) if i + 1 < args.len() => args[i + 1] = value.to_string(),
        _ => {
            args.push(flag.to_string());
            args.push(value.to_string());
        }
    }
}

/// Removes what an earlier run against a real cluster left: the suite's RuntimeClasses and Pods.
async fn clean_real_cluster(cluster: &Cluster, tenants: &[TenantSpec]) {
    use kube::api::DeleteParams;
    let client = cluster.client().await;
    let selector = ListParams::default().labels(&format!("{E2E_LABEL}=true"));
    let classes: Api<RuntimeClass> = Api::all(client.clone());
    let _ = classes
        .delete_collection(&DeleteParams::default(), &selector)
        .await;
    let managed = ListParams::default().labels("rcsync.io/managed=true");
    let _ = classes
        .delete_collection(&DeleteParams::default(), &managed)
        .await;
    let mut namespaces = vec!["default".to_string()];
    namespaces.extend(tenants.iter().map(TenantSpec::host_namespace));
    for ns in namespaces {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let _ = pods
            .delete_collection(
                &DeleteParams {
                    grace_period_seconds: Some(0),
                    ..Default::default()
                },
                &ListParams::default(),
            )
            .await;
        eventually(&format!("pods in {ns} to be gone"), || {
            let pods = pods.clone();
            async move {
                pods.list(&ListParams::default())
                    .await
                    .ok()?
                    .items
                    .is_empty()
                    .then_some(())
            }
        })
        .await;
    }
}

/// Waits until the agent at `admin` answers `/readyz` with 200.
pub async fn wait_ready_at(admin: &str, what: &str) {
    eventually(&format!("{what} at {admin} to be ready"), || async {
        http_get(admin, "/readyz").await.filter(|(code, _)| *code == 200)
    })
    .await;
}

impl VirtualSide {
    /// Virtual RuntimeClasses.
    pub async fn classes(&self) -> Api<RuntimeClass> {
        Api::all(self.cluster.client().await)
    }

    /// Creates a RuntimeClass in the virtual cluster (as the tenant would).
    pub async fn create_class(&self, class: &RuntimeClass) -> RuntimeClass {
        self.classes()
            .await
            .create(&PostParams::default(), class)
            .await
            .unwrap()
    }

    /// Virtual Pods in `default`.
    pub async fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.cluster.client().await, "default")
    }

    /// Names of the RuntimeClasses in the virtual cluster.
    pub async fn class_names(&self) -> BTreeSet<String> {
        self.classes()
            .await
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .map(|rc| rc.name_any())
            .collect()
    }

    /// Waits until the virtual cluster holds exactly these RuntimeClasses.
    pub async fn wait_classes(&self, want: &[&str]) {
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        let api = self.classes().await;
        eventually(&format!("virtual RuntimeClasses to be {want:?}"), || {
            let api = api.clone();
            let want = want.clone();
            async move {
                let have: BTreeSet<String> = api
                    .list(&ListParams::default())
                    .await
                    .ok()?
                    .items
                    .iter()
                    .map(|rc| rc.name_any())
                    .collect();
                (have == want).then_some(())
            }
        })
        .await;
    }

    /// Creates a Pod in `default`.
    pub async fn create_pod(&self, pod: &Pod) -> Pod {
        self.pods()
            .await
            .create(&PostParams::default(), pod)
            .await
            .unwrap()
    }

    /// Core/v1 events about a Pod in `default` (written through events.k8s.io, read as kubectl does).
    pub async fn events_of(&self, pod: &str) -> Vec<CoreEvent> {
        let events: Api<CoreEvent> = Api::namespaced(self.cluster.client().await, "default");
        let selector = format!("involvedObject.name={pod},involvedObject.kind=Pod");
        events
            .list(&ListParams::default().fields(&selector))
            .await
            .unwrap()
            .items
    }

    /// What `virtual-agent status` prints (its tables) once `wanted` holds of it.
    pub async fn status_table(&self, what: &str, wanted: impl Fn(&str) -> bool) -> String {
        let admin = format!("http://{}", self.admin);
        eventually(what, || async {
            let out = std::process::Command::new(binary("virtual-agent"))
                .args(["status", "--admin", &admin])
                .output()
                .ok()?;
            let table = String::from_utf8_lossy(&out.stdout).to_string();
            wanted(&table).then_some(table)
        })
        .await
    }

    /// Waits for a Warning event on a Pod whose message is exactly `message`.
    pub async fn wait_event(&self, pod: &str, message: &str) -> CoreEvent {
        eventually(&format!("an event on pod {pod:?} saying {message:?}"), || async {
            self.events_of(pod)
                .await
                .into_iter()
                .find(|e| e.message.as_deref() == Some(message))
        })
        .await
    }

    /// Sets a flag of this side's agent for its next start (and for replicas spawned later).
    pub fn set_agent_flag(&mut self, flag: &str, value: &str) {
        set_flag(&mut self.args, flag, value);
    }

    /// Starts another replica of this side's agent with its flags, `flags` set on top (give each
    /// replica its own `--identity`), on its own admin port; waits until it listens. Returns the
    /// process and its admin address.
    pub async fn spawn_replica(&self, name: &str, flags: &[(&str, &str)]) -> (Process, String) {
        let (process, admin, _) = self.spawn_replica_with_args(name, flags).await;
        (process, admin)
    }

    /// Like [`VirtualSide::spawn_replica`], also returning its arguments (to start it again).
    pub async fn spawn_replica_with_args(
        &self,
        name: &str,
        flags: &[(&str, &str)],
    ) -> (Process, String, Vec<String>) {
        let base = self.args.clone();
        let (process, addrs, args) = spawn_listening(
            name,
            &binary("virtual-agent"),
            &self.dir,
            1,
            "starting",
            |addrs| {
                let mut args = base.clone();
                set_flag(&mut args, "--admin-listen", &addrs[0]);
                for (flag, value) in flags {
                    set_flag(&mut args, flag, value);
                }
                args
            },
        )
        .await;
        (process, addrs[0].clone(), args)
    }

    /// Stops this side's agent with SIGTERM (waiting for the exit) and starts it again, as a
    /// rolling update does; waits until it listens (a standby is ready too).
    pub async fn roll_agent(&mut self) {
        self.agent.terminate().await;
        let name = format!("virtual-agent-{}-rolled", self.tenant.name);
        self.agent = Process::spawn(&name, &binary("virtual-agent"), &self.args, &self.dir);
        wait_ready_at(&self.admin, "virtual-agent").await;
    }

    /// Deletes a Pod in `default` with grace period 0.
    pub async fn delete_pod_now(&self, name: &str) {
        let now = kube::api::DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        };
        self.pods().await.delete(name, &now).await.unwrap();
    }

    /// Kills this virtual agent (SIGKILL).
    pub async fn stop_agent(&mut self) {
        self.agent.signal("KILL");
        self.agent.wait_exit().await;
    }

    /// Starts this virtual agent again (after [`VirtualSide::stop_agent`]) and waits until ready.
    pub async fn start_agent(&mut self) {
        self.spawn_agent();
        wait_ready_at(&self.admin, "virtual-agent").await;
    }

    /// Starts this virtual agent again (after [`VirtualSide::stop_agent`]) without waiting for it
    /// to be ready (it is not while the host agent is away).
    pub fn spawn_agent(&mut self) {
        let name = format!("virtual-agent-{}-restarted", self.tenant.name);
        self.agent = Process::spawn(&name, &binary("virtual-agent"), &self.args, &self.dir);
    }

    /// Kills this virtual agent (SIGKILL) and starts it again.
    pub async fn restart_agent(&mut self) {
        self.stop_agent().await;
        self.start_agent().await;
    }

    /// Creates a Pod naming a RuntimeClass the host does not offer. The virtual API server admits
    /// Pods only with an existing class, so, as a tenant would, it creates that class by hand first
    /// while the agent is stopped; the agent deletes the class when it comes back, the Pod stays.
    pub async fn create_pod_with_homemade_class(&mut self, pod: &Pod, class: &str) -> Pod {
        self.stop_agent().await;
        self.create_class(&runtime_class(class, "runc", &[])).await;
        let created = self.create_pod(pod).await;
        self.start_agent().await;
        created
    }

    /// The agent's `/metrics` text.
    pub async fn metrics(&self) -> String {
        http_get(&self.admin, "/metrics")
            .await
            .map(|(_, body)| body)
            .unwrap_or_default()
    }
}
