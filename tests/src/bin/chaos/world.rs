//! The system under chaos, as real processes: a host and two virtual API servers (`devcluster
//! serve --state`, so a restart keeps objects and watches see 410 Gone), the host agent, one
//! virtual agent per tenant behind a faulty proxy. Every process can be killed, stopped and
//! started again on the same ports; each incarnation logs to its own file.
//!
//! The gRPC port is mutual TLS, as in production: every virtual agent presents a client
//! certificate from the client CA (kept in a directory updated the way the kubelet updates a
//! Secret volume), tenant `a` is identified by its bearer token, tenant `b` by its certificate.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::api::PostParams;
use rcsync_tests::{Process, http_get, reserved_port};

use crate::timeline::TenantConfig;
use rcsync_tests::proxy::FaultyProxy;

/// The tenants of every chaos run.
pub const TENANTS: [&str; 2] = ["a", "b"];

/// The tenants identified by a bearer token (sent over mutual TLS); the others are identified by
/// their client certificate's common name.
pub const TOKEN_TENANTS: [&str; 1] = ["a"];

/// The host namespace of a tenant.
pub fn host_namespace(tenant: &str) -> String {
    format!("vcluster-{tenant}")
}

/// A process that can be restarted with the same arguments.
pub struct Restartable {
    /// Name (log files are `<name>-<incarnation>.log`).
    pub name: String,
    program: PathBuf,
    args: Vec<String>,
    /// The running incarnation, if any.
    pub process: Option<Process>,
    incarnation: u32,
    /// Every log file this process wrote.
    pub logs: Vec<PathBuf>,
    /// What it logs once it serves (devcluster), or `None` to wait on `/readyz` at `admin`.
    ready_line: Option<&'static str>,
    /// Admin address for `/readyz` (agents).
    pub admin: Option<String>,
}

impl Restartable {
    fn new(
        name: &str,
        program: PathBuf,
        args: Vec<String>,
        ready_line: Option<&'static str>,
        admin: Option<String>,
    ) -> Self {
        Self {
            name: name.to_string(),
            program,
            args,
            process: None,
            incarnation: 0,
            logs: Vec::new(),
            ready_line,
            admin,
        }
    }

    /// Starts a new incarnation and waits until it serves (at most 60 s).
    pub async fn start(&mut self, dir: &Path) -> anyhow::Result<()> {
        self.incarnation += 1;
        let log_name = format!("{}-{}", self.name, self.incarnation);
        let process = Process::spawn(&log_name, &self.program, &self.args, dir);
        self.logs.push(process.log_path().to_path_buf());
        self.process = Some(process);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let serving = match (self.ready_line, &self.admin) {
                (Some(line), _) => self.process.as_ref().is_some_and(|p| p.logs().contains(line)),
                (None, Some(admin)) => http_get(admin, "/readyz")
                    .await
                    .is_some_and(|(code, _)| code == 200),
                (None, None) => true,
            };
            if serving {
                return Ok(());
            }
            if let Some(p) = self.process.as_mut()
                && p.has_exited()
            {
                anyhow::bail!("{} exited while starting:\n{}", self.name, p.logs());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{} did not become ready within 60 s",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends `signal` and waits for the exit.
    pub async fn stop(&mut self, signal: &str) {
        if let Some(mut p) = self.process.take() {
            if !p.has_exited() {
                p.signal(signal);
            }
            p.wait_exit().await;
        }
    }

    /// The process id of the running incarnation.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Process::pid)
    }
}

/// Everything the run starts.
pub struct World {
    /// Scratch directory: kubeconfigs, state files, tokens, logs.
    pub dir: PathBuf,
    /// The host API server.
    pub host_server: Restartable,
    /// The virtual API servers, in [`TENANTS`] order.
    pub virtual_servers: Vec<Restartable>,
    /// The host agent.
    pub host_agent: Restartable,
    /// The virtual agents, in [`TENANTS`] order.
    pub virtual_agents: Vec<Restartable>,
    /// The proxies in front of the host agent, in [`TENANTS`] order.
    pub proxies: Vec<FaultyProxy>,
    /// The tenants config now in effect.
    pub tenants: Vec<TenantConfig>,
    /// The client CA the host agent trusts and the virtual agents' certificates come from.
    pub client_ca: ClientCa,
    host_kubeconfig: PathBuf,
    virtual_kubeconfigs: Vec<PathBuf>,
}

/// An address for a server that is restarted on it: its port stays free while it is down.
fn loopback() -> String {
    format!("127.0.0.1:{}", reserved_port())
}

fn server(name: &str, dir: &Path, bin: &Path, kubeconfig: &Path, extra: &[&str]) -> Restartable {
    let mut args: Vec<String> = vec![
        "serve".into(),
        "--listen".into(),
        loopback(),
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
        "--name".into(),
        name.into(),
        "--insecure-http".into(),
        "--state".into(),
        dir.join(format!("{name}.state.json")).display().to_string(),
        "--log-level".into(),
        "warn".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Restartable::new(
        name,
        bin.join("devcluster"),
        args,
        Some("devcluster listening on"),
        None,
    )
}

/// The tenants file for `tenants`.
pub fn tenants_yaml(tenants: &[TenantConfig]) -> String {
    let mut out = String::from("tenants:\n");
    for t in tenants {
        let selector = t
            .selector
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ");
        let token_file = if TOKEN_TENANTS.contains(&t.name.as_str()) {
            format!("    tokenFile: tokens/{}.token\n", t.name)
        } else {
            String::new()
        };
        out.push_str(&format!(
            "  - name: {name}\n    hostNamespace: {ns}\n{token_file}    sync: {{fromHost: {{runtimeClasses: {{enabled: {enabled}, selector: {{matchLabels: {{{selector}}}}}}}}}, toHost: {{podDisruptionBudgets: {{enabled: true}}, persistentVolumeClaims: {{enabled: true}}}}}}\n    limits: {{podSyncQps: 1000, podSyncBurst: 2000}}\n",
            name = t.name,
            ns = host_namespace(&t.name),
            enabled = t.enabled,
        ));
    }
    out
}

/// Writes `files` into the Secret-volume-like directory `dir` all at once, as the kubelet does:
/// each file is a link through `..data`, which is swapped for a link to a new directory in one
/// rename, so a reader never sees a new certificate beside an old key.
pub fn replace_secret_volume(dir: &Path, files: &[(&str, &str)]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let version = format!(
        "..{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    );
    let new = dir.join(&version);
    std::fs::create_dir(&new).with_context(|| format!("creating {}", new.display()))?;
    for (name, text) in files {
        std::fs::write(new.join(name), text)
            .with_context(|| format!("writing {name} in {}", new.display()))?;
        let link = dir.join(name);
        if link.symlink_metadata().is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(name), &link)
                .with_context(|| format!("linking {}", link.display()))?;
        }
    }
    let old = std::fs::read_link(dir.join("..data")).ok();
    let next = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&next);
    std::os::unix::fs::symlink(&version, &next).with_context(|| format!("linking {}", next.display()))?;
    std::fs::rename(&next, dir.join("..data"))
        .with_context(|| format!("swapping {}/..data", dir.display()))?;
    if let Some(old) = old {
        let _ = std::fs::remove_dir_all(dir.join(old));
    }
    Ok(())
}

/// The client CA in use and how many times it was rotated.
pub struct ClientCa {
    /// Issues the virtual agents' certificates now.
    pub pki: devcluster::pki::Pki,
    /// How many rotations happened.
    pub rotations: u32,
}

/// Writes a file by renaming a complete new one over it (as Kubernetes' volume updates do).
pub fn replace_file(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("next");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming over {}", path.display()))
}

impl World {
    /// Starts the API servers, the host agent, the proxies and the virtual agents.
    pub async fn start(dir: &Path, bin: &Path, tenants: Vec<TenantConfig>) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir.join("tokens"))?;
        std::fs::create_dir_all(dir.join("vtokens"))?;
        let tls = dir.join("tls");
        std::fs::create_dir_all(&tls)?;
        let server_ca = devcluster::pki::Pki::new("chaos-serving-ca")?;
        let serving = server_ca.server(&["127.0.0.1", "localhost"])?;
        std::fs::write(tls.join("tls.crt"), &serving.cert_pem)?;
        std::fs::write(tls.join("tls.key"), &serving.key_pem)?;
        std::fs::write(tls.join("serving-ca.crt"), server_ca.ca_pem())?;
        let client_ca = ClientCa {
            pki: devcluster::pki::Pki::new("chaos-client-ca-0")?,
            rotations: 0,
        };
        std::fs::write(tls.join("client-ca.crt"), client_ca.pki.ca_pem())?;
        for t in TENANTS {
            write_client_certificate(dir, t, &client_ca.pki)?;
        }
        let host_kubeconfig = dir.join("host.kubeconfig");
        let mut host_server = server("host", dir, bin, &host_kubeconfig, &[]);
        host_server.start(dir).await?;
        let host = client(&host_kubeconfig).await?;
        let mut virtual_servers = Vec::new();
        let mut virtual_kubeconfigs = Vec::new();
        for t in TENANTS {
            create_namespace(&host, &host_namespace(t)).await?;
            if TOKEN_TENANTS.contains(&t) {
                let token = format!("token-{t}-0");
                std::fs::write(dir.join("tokens").join(format!("{t}.token")), &token)?;
                std::fs::write(dir.join("vtokens").join(format!("{t}.token")), &token)?;
            }
            let kubeconfig = dir.join(format!("virtual-{t}.kubeconfig"));
            // Pods naming classes the virtual cluster lacks must be creatable (the SyncWarning path).
            let mut s = server(
                &format!("virtual-{t}"),
                dir,
                bin,
                &kubeconfig,
                &["--disable-admission-plugins", "RuntimeClass"],
            );
            s.start(dir).await?;
            let virt = client(&kubeconfig).await?;
            create_namespace(&virt, "rcsync-system").await?;
            create_token_prerequisites(&virt).await?;
            virtual_servers.push(s);
            virtual_kubeconfigs.push(kubeconfig);
        }
        std::fs::write(dir.join("tenants.yaml"), tenants_yaml(&tenants))?;
        let grpc: SocketAddr = loopback().parse()?;
        let host_admin = loopback();
        let mut host_agent = Restartable::new(
            "host-agent",
            bin.join("host-agent"),
            vec![
                "--kubeconfig".into(),
                host_kubeconfig.display().to_string(),
                "--config".into(),
                dir.join("tenants.yaml").display().to_string(),
                "--grpc-listen".into(),
                grpc.to_string(),
                "--admin-listen".into(),
                host_admin.clone(),
                "--tls-cert".into(),
                tls.join("tls.crt").display().to_string(),
                "--tls-key".into(),
                tls.join("tls.key").display().to_string(),
                "--client-ca".into(),
                tls.join("client-ca.crt").display().to_string(),
            ],
            None,
            Some(host_admin),
        );
        host_agent.start(dir).await?;
        let mut proxies = Vec::new();
        let mut virtual_agents = Vec::new();
        for (i, t) in TENANTS.iter().enumerate() {
            let proxy = FaultyProxy::start(grpc).await?;
            let admin = loopback();
            let certificate = dir.join("vtls").join(t);
            let mut args: Vec<String> = vec![
                "--kubeconfig".into(),
                virtual_kubeconfigs[i].display().to_string(),
                "--host-agent".into(),
                format!("https://{}", proxy.addr),
                "--tenant".into(),
                t.to_string(),
                "--ca-cert".into(),
                tls.join("serving-ca.crt").display().to_string(),
                "--client-cert".into(),
                certificate.join("tls.crt").display().to_string(),
                "--client-key".into(),
                certificate.join("tls.key").display().to_string(),
            ];
            if TOKEN_TENANTS.contains(t) {
                args.push("--token-file".into());
                args.push(
                    dir.join("vtokens")
                        .join(format!("{t}.token"))
                        .display()
                        .to_string(),
                );
            }
            let mut agent = Restartable::new(
                &format!("virtual-agent-{t}"),
                bin.join("virtual-agent"),
                [
                    args,
                    vec![
                        "--admin-listen".into(),
                        admin.clone(),
                        "--lease-namespace".into(),
                        "rcsync-system".into(),
                        "--identity".into(),
                        format!("virtual-agent-{t}"),
                        "--pod-workers".into(),
                        "4".into(),
                        // Pods with token volumes get tokens of their virtual cluster.
                        "--pod-api-server".into(),
                        api_server_of(&virtual_kubeconfigs[i])?,
                    ],
                ]
                .concat(),
                None,
                Some(admin),
            );
            agent.start(dir).await?;
            proxies.push(proxy);
            virtual_agents.push(agent);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            host_server,
            virtual_servers,
            host_agent,
            virtual_agents,
            proxies,
            tenants,
            client_ca,
            host_kubeconfig,
            virtual_kubeconfigs,
        })
    }

    /// The TLS reloads the running host agent applied (0 when it does not answer).
    async fn host_agent_tls_reloads(&self) -> u64 {
        let Some(admin) = &self.host_agent.admin else {
            return 0;
        };
        http_get(admin, "/metrics")
            .await
            .and_then(|(_, metrics)| {
                metrics.lines().find_map(|line| {
                    line.strip_prefix("rcsync_tls_reloads_total{result=\"applied\"} ")?
                        .parse()
                        .ok()
                })
            })
            .unwrap_or(0)
    }

    /// Rotates the client CA as an operator does without an outage: the new CA beside the old one
    /// on the host, every virtual agent's certificate reissued by the new one (their next
    /// connections use it), then, `overlap` later, the old CA removed, which closes the
    /// connections still opened with an old certificate (the virtual agents reconnect with the
    /// new one).
    /// Returns how long the host agent took to trust both CAs (`None`: not within 10 s).
    pub async fn rotate_client_ca(&mut self, overlap: Duration) -> anyhow::Result<Option<Duration>> {
        let next = devcluster::pki::Pki::new(&format!("chaos-client-ca-{}", self.client_ca.rotations + 1))?;
        let file = self.dir.join("tls").join("client-ca.crt");
        let reloads_before = self.host_agent_tls_reloads().await;
        replace_file(&file, &(self.client_ca.pki.ca_pem() + &next.ca_pem()))?;
        // The host agent reloads on change: the new certificates go out once it trusts both CAs
        // (after 10 s without that, they go anyway: one it refuses is refused and retried).
        let written = tokio::time::Instant::now();
        let mut trusted = None;
        while trusted.is_none() && written.elapsed() < Duration::from_secs(10) {
            if self.host_agent_tls_reloads().await > reloads_before {
                trusted = Some(written.elapsed());
            } else {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        for t in TENANTS {
            write_client_certificate(&self.dir, t, &next)?;
        }
        tokio::time::sleep(overlap).await;
        replace_file(&file, &next.ca_pem())?;
        self.client_ca = ClientCa {
            pki: next,
            rotations: self.client_ca.rotations + 1,
        };
        Ok(trusted)
    }

    /// A client of the host API server.
    pub async fn host_client(&self) -> anyhow::Result<kube::Client> {
        client(&self.host_kubeconfig).await
    }

    /// A client of a tenant's virtual API server.
    pub async fn virtual_client(&self, tenant: usize) -> anyhow::Result<kube::Client> {
        client(&self.virtual_kubeconfigs[tenant]).await
    }

    /// A client of tenant `tenant`'s virtual API server that authenticates with `token`.
    pub async fn virtual_client_with_token(
        &self,
        tenant: usize,
        token: &str,
    ) -> anyhow::Result<kube::Client> {
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.virtual_kubeconfigs[tenant])?;
        let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
        config.auth_info = kube::config::AuthInfo {
            token: Some(token.to_string().into()),
            ..Default::default()
        };
        Ok(kube::Client::try_from(config)?)
    }

    /// Writes a new tenants config (the host agent reloads it on change).
    pub fn write_tenants(&mut self, tenants: Vec<TenantConfig>) -> anyhow::Result<()> {
        replace_file(&self.dir.join("tenants.yaml"), &tenants_yaml(&tenants))?;
        self.tenants = tenants;
        Ok(())
    }

    /// Every process, for log scans and memory samples.
    pub fn processes(&self) -> Vec<&Restartable> {
        let mut all = vec![&self.host_server, &self.host_agent];
        all.extend(self.virtual_servers.iter());
        all.extend(self.virtual_agents.iter());
        all
    }
}

/// Issues tenant `t`'s client certificate (its CN is the tenant's name) from `ca` into its
/// virtual agent's certificate directory.
fn write_client_certificate(dir: &Path, t: &str, ca: &devcluster::pki::Pki) -> anyhow::Result<()> {
    let pair = ca.client(t)?;
    replace_secret_volume(
        &dir.join("vtls").join(t),
        &[("tls.crt", &pair.cert_pem), ("tls.key", &pair.key_pem)],
    )
}

/// A kube client from a kubeconfig file.
pub async fn client(kubeconfig: &Path) -> anyhow::Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// A client whose requests are each asked once: kube's default client retries a 429 (an
/// eviction a budget refuses) by itself for minutes, where a drain takes the answer.
pub async fn client_asking_once(kubeconfig: &Path) -> anyhow::Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let mut config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    config.default_retry = false;
    Ok(kube::Client::try_from(config)?)
}

/// The ServiceAccount churned Pods with token volumes run as, in `default`.
pub const TOKEN_SERVICE_ACCOUNT: &str = "runner";

/// What Pods with token volumes need in a virtual cluster: their ServiceAccount, and the
/// `kube-root-ca.crt` ConfigMap the root CA publisher puts in every namespace.
async fn create_token_prerequisites(client: &kube::Client) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
    let account: ServiceAccount =
        serde_json::from_value(serde_json::json!({"metadata": {"name": TOKEN_SERVICE_ACCOUNT}}))?;
    Api::<ServiceAccount>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &account)
        .await?;
    let root_ca: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "kube-root-ca.crt"}, "data": {"ca.crt": "-----BEGIN CERTIFICATE-----"},
    }))?;
    Api::<ConfigMap>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &root_ca)
        .await?;
    Ok(())
}

/// HOST:PORT of the API server a kubeconfig names.
pub fn api_server_of(kubeconfig: &Path) -> anyhow::Result<String> {
    let config = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let server = config
        .clusters
        .first()
        .and_then(|c| c.cluster.as_ref())
        .and_then(|c| c.server.clone())
        .context("the kubeconfig names no server")?;
    let authority = server
        .split_once("://")
        .map_or(server.as_str(), |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or_default();
    anyhow::ensure!(authority.contains(':'), "the server {server:?} names no port");
    Ok(authority.to_string())
}

async fn create_namespace(client: &kube::Client, name: &str) -> anyhow::Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))?;
    match namespaces.create(&PostParams::default(), &ns).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating namespace {name}")),
    }
}
