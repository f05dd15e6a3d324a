//! `devcluster up`: the whole rcsync system on loopback, for trying it with kubectl.
//!
//! ```text
//!  host devcluster ◄── host-agent ◄──gRPC── virtual-agent ──► virtual devcluster
//!  (RuntimeClasses of the spec's use cases)   (tenant team-a, the spec's example selector)
//! ```
//!
//! Everything a user needs is written to the state directory: kubeconfigs, the tenants file,
//! example manifests and the agents' logs. The agents are the real binaries, found next to this
//! executable or on PATH.

use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use serde_json::json;

use crate::api::{ApiRequest, Reply};
use crate::server::{DevCluster, ServerOptions};

/// The tenant `devcluster up` configures.
pub const TENANT: &str = "team-a";

/// The tenants file: the spec's combined example selector.
pub const TENANTS_YAML: &str = r#"# Written by `devcluster up`. Edit it and send the host agent SIGHUP to reload.
tenants:
  - name: team-a
    hostNamespace: vcluster-team-a
    tokenFile: team-a.token
    policies:
      podSecurityStandard: baseline
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
                values:
                  - gvisor
                  - youki
"#;

/// Host RuntimeClasses of the spec's use cases: (name, handler, environment, runtime.class).
pub const HOST_CLASSES: &[(&str, &str, &str, &str)] = &[
    ("gvisor", "runsc", "development", "gvisor"),
    ("youki", "youki", "development", "youki"),
    ("kata", "kata", "development", "kata"),
    ("runc-debug", "runc", "production", "gvisor"),
];

const ALLOWED_POD: &str = r#"# A Pod whose RuntimeClass is synced from the host: it runs on the host.
apiVersion: v1
kind: Pod
metadata:
  name: sandboxed
spec:
  runtimeClassName: gvisor
  containers:
    - name: app
      image: nginx:1.27
"#;

const SECRET_POD: &str = r#"# A Pod using a ConfigMap and a Secret of the virtual cluster (devcluster up created both): it
# runs on the host against translated copies (`<name>-x-default-x-team-a`), never against a host
# object of the original name. The copies go when the last Pod using them goes.
apiVersion: v1
kind: Pod
metadata:
  name: with-secret
spec:
  runtimeClassName: gvisor
  containers:
    - name: app
      image: nginx:1.27
      envFrom:
        - configMapRef:
            name: app-settings
      env:
        - name: DB_PASSWORD
          valueFrom:
            secretKeyRef:
              name: app-credentials
              key: password
"#;

const REFUSED_POD: &str = r#"# A privileged Pod: the tenant's Pod Security level is baseline, so the host agent refuses it
# and `kubectl describe pod privileged` shows a SyncError event naming the violation.
apiVersion: v1
kind: Pod
metadata:
  name: privileged
spec:
  runtimeClassName: gvisor
  containers:
    - name: app
      image: nginx:1.27
      securityContext:
        privileged: true
"#;

const DENIED_POD: &str = r#"# A Pod whose RuntimeClass "kata" exists on the host but does not match the tenant's selector:
# it is not synced, and `kubectl describe pod my-pod` shows the SyncWarning event.
# (devcluster up's virtual API server runs without RuntimeClass admission so that such a Pod can
# be created; a virtual cluster with admission refuses it up front.)
apiVersion: v1
kind: Pod
metadata:
  name: my-pod
spec:
  runtimeClassName: kata
  containers:
    - name: app
      image: nginx:1.27
"#;

/// Options of `devcluster up`.
#[derive(Clone, Debug)]
pub struct UpOptions {
    /// State directory.
    pub dir: PathBuf,
    /// Two replicas of each agent.
    pub ha: bool,
}

/// Namespace of the virtual agents' leader Lease in the virtual cluster (as in deploy/).
pub const LEASE_NAMESPACE: &str = "rcsync-system";

struct Agent {
    name: &'static str,
    child: Child,
    /// The addresses it listens on; the admin address is the last.
    addrs: Vec<String>,
    admin: String,
}

/// Starts an agent on loopback ports picked for it, retrying with fresh ports when one was taken
/// in the meantime (picking by bind-and-release races with everything else on the machine).
/// `listening`: a text the agent logs once it has bound its ports.
async fn start_agent(
    name: &'static str,
    program: &Path,
    dir: &Path,
    ports: usize,
    listening: &str,
    args: impl Fn(&[String]) -> Vec<String>,
) -> anyhow::Result<Agent> {
    // A folder of their own: the host agent watches the folder its tenants file is in.
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let log = logs.join(format!("{name}.log"));
    for _ in 0..5 {
        let addrs = (0..ports)
            .map(|_| free_addr())
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut child = spawn(name, program, &args(&addrs), &log)?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains(listening) {
                let admin = addrs.last().cloned().unwrap_or_default();
                return Ok(Agent {
                    name,
                    child,
                    addrs,
                    admin,
                });
            }
            if let Some(status) = child.try_wait()? {
                if text.contains("Address already in use") {
                    break;
                }
                anyhow::bail!(
                    "{name} exited ({status}) before listening; its log is {}",
                    log.display()
                );
            }
            if tokio::time::Instant::now() > deadline {
                let _ = child.kill();
                anyhow::bail!(
                    "{name} did not start listening within 30s; its log is {}",
                    log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    anyhow::bail!("{name}: no free loopback ports after 5 attempts")
}

/// Finds an agent binary next to the current executable, else on PATH.
pub fn find_binary(name: &str) -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file()))
        .with_context(|| {
            format!("{name} not found next to devcluster or on PATH: build it with `cargo build --workspace --bins`")
        })
}

fn free_addr() -> anyhow::Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.to_string())
}

fn create(cluster: &DevCluster, path: &str, body: serde_json::Value) -> anyhow::Result<()> {
    let reply = cluster.api().handle(ApiRequest {
        method: http::Method::POST,
        path: path.to_string(),
        query: Default::default(),
        content_type: Some("application/json".into()),
        accept: String::new(),
        user_agent: "devcluster-up".into(),
        body: serde_json::to_vec(&body)?.into(),
        user: None,
    });
    match reply {
        Reply::Json { code, .. } if code < 300 => Ok(()),
        Reply::Json { body, .. } => anyhow::bail!("creating {path}: {}", body["message"]),
        _ => anyhow::bail!("creating {path}: unexpected reply"),
    }
}

/// `deploy/host-agent.yaml`, read at build time.
const HOST_AGENT_MANIFEST: &str = include_str!("../../deploy/host-agent.yaml");
/// `deploy/virtual-agent.yaml`, read at build time.
const VIRTUAL_AGENT_MANIFEST: &str = include_str!("../../deploy/virtual-agent.yaml");

/// Creates a manifest's namespaces, service accounts and RBAC objects; with `tenant_namespace`,
/// only the objects of that namespace among the namespaced ones outside `rcsync-system` (the
/// manifest's per-tenant block).
fn apply_identity(
    cluster: &DevCluster,
    manifest: &str,
    tenant_namespace: Option<&str>,
) -> anyhow::Result<()> {
    let docs: Vec<serde_json::Value> = yaml_serde::Deserializer::from_str(manifest)
        .map(|doc| serde::Deserialize::deserialize(doc).context("a deploy manifest is not YAML"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for doc in docs.into_iter().filter(|d| !d.is_null()) {
        let kind = doc["kind"].as_str().unwrap_or_default();
        let ns = doc["metadata"]["namespace"].as_str();
        let path = match (kind, ns) {
            ("Namespace", _) => {
                let name = doc["metadata"]["name"].as_str().unwrap_or_default();
                if Some(name) == tenant_namespace || cluster.store().get("namespaces", "", name).is_some() {
                    continue;
                }
                "/api/v1/namespaces".to_string()
            }
            ("ServiceAccount", Some(ns)) => format!("/api/v1/namespaces/{ns}/serviceaccounts"),
            ("ClusterRole", _) => "/apis/rbac.authorization.k8s.io/v1/clusterroles".into(),
            ("ClusterRoleBinding", _) => "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings".into(),
            ("Role", Some(ns)) => format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles"),
            ("RoleBinding", Some(ns)) => {
                format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings")
            }
            _ => continue,
        };
        create(cluster, &path, doc)?;
    }
    Ok(())
}

fn spawn(name: &'static str, program: &Path, args: &[String], log: &Path) -> anyhow::Result<Child> {
    let file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("starting {name} ({})", program.display()))
}

/// Runs the system until SIGINT or SIGTERM.
pub async fn up(options: UpOptions) -> anyhow::Result<()> {
    // Handlers first, so a Ctrl-C at any moment after the guide appears is honoured.
    let signal = rcsync_core::telemetry::termination_signal();
    let dir = &options.dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let host_agent_bin = find_binary("host-agent")?;
    let virtual_agent_bin = find_binary("virtual-agent")?;

    // The host has one simulated node: synced Pods run there, and their status flows back.
    let host = DevCluster::start(ServerOptions {
        nodes: crate::nodes::NodeOptions {
            count: 1,
            handlers: None,
        },
        ..ServerOptions::default()
    })
    .await?;
    // The virtual API server runs without RuntimeClass admission (kube-apiserver's
    // --disable-admission-plugins=RuntimeClass), so a Pod naming a class that is not synced can be
    // created and the SyncWarning path can be tried; with admission on, such a Pod is refused up
    // front unless it names a class that exists in the virtual cluster.
    let virtual_options = ServerOptions {
        admission: crate::admission::AdmissionPlugins { runtime_class: false },
        ..ServerOptions::default()
    };
    let virtual_cluster = DevCluster::start(virtual_options).await?;
    host.write_kubeconfig(&dir.join("host.kubeconfig"), "rcsync-host")?;
    virtual_cluster.write_kubeconfig(&dir.join("virtual.kubeconfig"), "rcsync-virtual")?;
    create(
        &host,
        "/api/v1/namespaces",
        json!({"metadata": {"name": "vcluster-team-a"}}),
    )?;
    for (name, handler, env, rc) in HOST_CLASSES {
        let class = json!({
            "apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
            "metadata": {"name": name, "labels": {"environment": env, "kubernetes.io/runtime.class": rc}},
            "handler": handler,
        });
        create(&host, "/apis/node.k8s.io/v1/runtimeclasses", class)?;
    }
    std::fs::write(dir.join("tenants.yaml"), TENANTS_YAML)?;
    write_secret(&dir.join("team-a.token"), &random_token())?;
    std::fs::write(dir.join("allowed-pod.yaml"), ALLOWED_POD)?;
    std::fs::write(dir.join("denied-pod.yaml"), DENIED_POD)?;
    std::fs::write(dir.join("secret-pod.yaml"), SECRET_POD)?;
    std::fs::write(dir.join("refused-pod.yaml"), REFUSED_POD)?;
    // What the example Pods reference exists in the virtual cluster.
    create(
        &virtual_cluster,
        "/api/v1/namespaces/default/configmaps",
        json!({"metadata": {"name": "app-settings"}, "data": {"LOG_LEVEL": "info"}}),
    )?;
    create(
        &virtual_cluster,
        "/api/v1/namespaces/default/secrets",
        json!({"metadata": {"name": "app-credentials"}, "stringData": {"password": "s3cr3t"}}),
    )?;

    create(
        &virtual_cluster,
        "/api/v1/namespaces",
        json!({"metadata": {"name": LEASE_NAMESPACE}}),
    )?;
    // The agents run as deploy/'s service accounts with exactly deploy/'s RBAC (the files are
    // read at build time), as in a cluster.
    apply_identity(&host, HOST_AGENT_MANIFEST, Some("vcluster-team-a"))?;
    apply_identity(&virtual_cluster, VIRTUAL_AGENT_MANIFEST, None)?;
    host.write_service_account_kubeconfig(
        &dir.join("host-agent.kubeconfig"),
        "rcsync-host",
        "rcsync-system",
        "host-agent",
        24 * 3600,
    )?;
    virtual_cluster.write_service_account_kubeconfig(
        &dir.join("virtual-agent.kubeconfig"),
        "rcsync-virtual",
        "rcsync-system",
        "virtual-agent",
        24 * 3600,
    )?;

    let s = |p: PathBuf| p.display().to_string();
    let replicas: &[(&'static str, &'static str)] = if options.ha {
        &[
            ("host-agent", "virtual-agent"),
            ("host-agent-2", "virtual-agent-2"),
        ]
    } else {
        &[("host-agent", "virtual-agent")]
    };
    let mut agents = Vec::new();
    let mut grpc_urls = Vec::new();
    for (host_name, _) in replicas {
        let host_agent = start_agent(host_name, &host_agent_bin, &dir, 2, "listening", |addrs| {
            vec![
                "--kubeconfig".into(),
                s(dir.join("host-agent.kubeconfig")),
                "--config".into(),
                s(dir.join("tenants.yaml")),
                "--grpc-listen".into(),
                addrs[0].clone(),
                "--admin-listen".into(),
                addrs[1].clone(),
            ]
        })
        .await?;
        grpc_urls.push(format!("http://{}", host_agent.addrs[0]));
        agents.push(host_agent);
    }
    for (_, virtual_name) in replicas {
        let virtual_agent = start_agent(virtual_name, &virtual_agent_bin, &dir, 1, "starting", |addrs| {
            vec![
                "--kubeconfig".into(),
                s(dir.join("virtual-agent.kubeconfig")),
                "--host-agent".into(),
                grpc_urls.join(","),
                "--tenant".into(),
                TENANT.into(),
                "--token-file".into(),
                s(dir.join("team-a.token")),
                "--admin-listen".into(),
                addrs[0].clone(),
                "--lease-namespace".into(),
                LEASE_NAMESPACE.into(),
                "--identity".into(),
                (*virtual_name).into(),
            ]
        })
        .await?;
        agents.push(virtual_agent);
    }

    print_guide(&dir, &host, &virtual_cluster, options.ha);
    let result = supervise(&mut agents, signal).await;
    println!("\nstopping: sending SIGTERM to the agents");
    for agent in &mut agents {
        stop_child(agent).await;
    }
    host.shutdown().await;
    virtual_cluster.shutdown().await;
    println!("stopped");
    result
}

fn random_token() -> String {
    use rand::Rng as _;
    let bytes: [u8; 24] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

fn print_guide(dir: &Path, host: &DevCluster, virtual_cluster: &DevCluster, ha: bool) {
    let d = dir.display();
    let logs = if ha {
        format!(
            "{d}/logs/: host-agent.log, host-agent-2.log, virtual-agent.log, virtual-agent-2.log\n  replicas            two of each: host agents active-active, virtual agents on Lease {LEASE_NAMESPACE}/rcsync-virtual-agent"
        )
    } else {
        format!("{d}/logs/host-agent.log, {d}/logs/virtual-agent.log")
    };
    println!(
        r#"rcsync is running on loopback.

  host API server     {host_url}   kubeconfig {d}/host.kubeconfig
  virtual API server  {virtual_url}   kubeconfig {d}/virtual.kubeconfig
  tenants file        {d}/tenants.yaml (selector: environment=development, runtime.class in (gvisor, youki);
                      pod security: baseline)
  logs                {logs}

Try it (in another terminal):
  export H="--kubeconfig {d}/host.kubeconfig" V="--kubeconfig {d}/virtual.kubeconfig"

  # 1. The host has four classes; the virtual cluster gets the two its selector allows.
  kubectl $H get runtimeclass --show-labels
  kubectl $V get runtimeclass

  # 2. A Pod with an allowed class is synced to the host namespace vcluster-team-a, runs on the
  #    host's (simulated) node, and the virtual Pod shows it Running, with the host's events.
  kubectl $V apply -f {d}/allowed-pod.yaml
  kubectl $H get pods -n vcluster-team-a -o wide
  kubectl $V get pod sandboxed
  kubectl $V describe pod sandboxed

  # 3. A Pod with a class the selector does not allow is not synced and gets a SyncWarning event.
  kubectl $V apply -f {d}/denied-pod.yaml
  kubectl $V describe pod my-pod

  # 4. RuntimeClasses created in the virtual cluster are deleted at once.
  kubectl $V create -f - <<<'{{"apiVersion":"node.k8s.io/v1","kind":"RuntimeClass","metadata":{{"name":"mine"}},"handler":"runc"}}'
  kubectl $V get runtimeclass

  # 5. A Pod using a Secret and a ConfigMap runs on the host against translated copies of them.
  kubectl $V apply -f {d}/secret-pod.yaml
  kubectl $H get pods,configmaps,secrets -n vcluster-team-a

  # 6. The host agent enforces the tenant's Pod Security level (baseline): a privileged Pod is
  #    refused, with a SyncError event that names the violation.
  kubectl $V apply -f {d}/refused-pod.yaml
  kubectl $V describe pod privileged

  # 7. Relabel a host class out of the selector and watch it vanish from the virtual cluster.
  kubectl $V get runtimeclass --watch &
  kubectl $H label runtimeclass youki environment=production --overwrite

Press Ctrl-C to stop everything.
"#,
        host_url = host.url(),
        virtual_url = virtual_cluster.url(),
    );
}

async fn metrics(admin: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(admin))
        .await
        .ok()?
        .ok()?;
    stream
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {admin}\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut raw = String::new();
    tokio::time::timeout(Duration::from_secs(1), stream.read_to_string(&mut raw))
        .await
        .ok()?
        .ok()?;
    Some(raw.split_once("\r\n\r\n")?.1.to_string())
}

/// The sum of a metric's samples whose line starts with `prefix` (name plus optional labels).
fn sample(text: &str, prefix: &str) -> i64 {
    text.lines()
        .filter(|l| l.starts_with(prefix) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as i64)
        .sum()
}

async fn status_line(agent: &Agent) -> String {
    let Some(m) = metrics(&agent.admin).await else {
        return format!("{:<14} starting…", agent.name);
    };
    match agent.name {
        name if name.starts_with("host-agent") => format!(
            "{:<14} host classes {}  offered to {TENANT} {}  filtered {}  streams {}  CheckPod {}",
            agent.name,
            sample(&m, "rcsync_host_runtime_classes"),
            sample(
                &m,
                &format!("rcsync_tenant_runtime_classes{{tenant=\"{TENANT}\"}}")
            ),
            sample(
                &m,
                &format!("rcsync_tenant_filtered_runtime_classes{{tenant=\"{TENANT}\"}}")
            ),
            sample(&m, "rcsync_sync_streams_open"),
            sample(&m, "rcsync_check_pod_decisions_total"),
        ),
        _ if sample(&m, "rcsync_leader") == 0 => format!(
            "{:<14} standby (another replica holds the Lease and writes)",
            agent.name
        ),
        _ => format!(
            "{:<14} leader  {}  classes synced {}  pods synced {}  denied {}  tenant classes deleted {}",
            agent.name,
            if sample(&m, "rcsync_host_connected") > 0 {
                "connected"
            } else {
                "DISCONNECTED"
            },
            sample(&m, "rcsync_synced_runtime_classes"),
            sample(&m, "rcsync_pods_synced_total"),
            sample(&m, "rcsync_pods_denied_total"),
            sample(&m, "rcsync_local_runtime_classes_deleted_total"),
        ),
    }
}

/// Shows the live status until a signal arrives or an agent exits.
async fn supervise(
    agents: &mut [Agent],
    signal: impl std::future::Future<Output = &'static str>,
) -> anyhow::Result<()> {
    tokio::pin!(signal);
    let tty = std::io::stdout().is_terminal();
    let mut last: Vec<String> = Vec::new();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = &mut signal => return Ok(()),
            _ = ticker.tick() => {}
        }
        for agent in agents.iter_mut() {
            if let Some(status) = agent.child.try_wait()? {
                anyhow::bail!(
                    "{} exited ({status}); see its log in the state directory",
                    agent.name
                );
            }
        }
        let mut lines = Vec::new();
        for agent in agents.iter() {
            lines.push(status_line(agent).await);
        }
        if lines == last {
            continue;
        }
        let mut out = std::io::stdout().lock();
        if tty && !last.is_empty() {
            // Move up over the previous status lines and redraw them.
            write!(out, "\x1b[{}A", last.len())?;
        }
        for line in &lines {
            if tty {
                writeln!(out, "\x1b[2K{line}")?;
            } else {
                writeln!(out, "{line}")?;
            }
        }
        out.flush()?;
        last = lines;
    }
}

async fn stop_child(agent: &mut Agent) {
    let pid = agent.child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match agent.child.try_wait() {
            Ok(Some(_)) | Err(_) => return,
            Ok(None) if tokio::time::Instant::now() > deadline => {
                eprintln!("{} did not stop within 10s of SIGTERM: killing it", agent.name);
                let _ = agent.child.kill();
                let _ = agent.child.wait();
                return;
            }
            Ok(None) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
