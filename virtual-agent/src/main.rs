//! `virtual-agent`: see the crate docs of the `virtual_agent` library.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use rcsync_core::telemetry::{LogFormat, init_logging};
use virtual_agent::connect::HostAgentTarget;
use virtual_agent::leader::LeaseSettings;
use virtual_agent::run::Settings;

/// rcsync virtual agent: applies the host's RuntimeClasses to a virtual cluster, deletes the ones
/// tenants create, and syncs Pods to the host only when the host agent allows it.
#[derive(Parser, Debug)]
#[command(name = "virtual-agent", version, about, long_about = None, subcommand_negates_reqs = true, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Kubeconfig of the virtual cluster (in-cluster config, or $KUBECONFIG, when absent).
    #[arg(long, env = "VIRTUAL_AGENT_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// URL of the host agent's gRPC server (https:// for TLS). Several replicas: comma-separated
    /// or the flag repeated; a name resolving to several addresses counts as several. Calls are
    /// spread over them and fail over between them.
    #[arg(
        long,
        env = "VIRTUAL_AGENT_HOST_AGENT",
        required = true,
        value_delimiter = ','
    )]
    host_agent: Vec<String>,
    /// This virtual cluster's tenant name, as in the host agent's tenants file.
    #[arg(long, env = "VIRTUAL_AGENT_TENANT", required = true)]
    tenant: Option<String>,
    /// File with the tenant's bearer token (re-read at every reconnect).
    #[arg(long, env = "VIRTUAL_AGENT_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// CA (PEM) that signed the host agent's certificate; the OS trust store otherwise.
    #[arg(long, env = "VIRTUAL_AGENT_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; its subject CN must be the tenant name.
    #[arg(long, env = "VIRTUAL_AGENT_CLIENT_CERT")]
    client_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[arg(long, env = "VIRTUAL_AGENT_CLIENT_KEY")]
    client_key: Option<PathBuf>,
    /// Address of the admin HTTP server (/livez, /readyz, /metrics).
    #[arg(long, env = "VIRTUAL_AGENT_ADMIN_LISTEN", default_value = "0.0.0.0:9091")]
    admin_listen: SocketAddr,
    /// A file holding the bearer token that /metrics and /status on the admin port require (re-read
    /// at each request, so a rotated Secret applies at once); /livez and /readyz stay open. Without
    /// it the admin port answers anyone who reaches it.
    #[arg(long, env = "VIRTUAL_AGENT_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// Serving certificate (PEM) of the admin port; with --admin-tls-key it serves HTTPS only
    /// (reloaded when the files change; kubelet probes then need `scheme: HTTPS`).
    #[arg(long, env = "VIRTUAL_AGENT_ADMIN_TLS_CERT")]
    admin_tls_cert: Option<PathBuf>,
    /// Serving key (PEM) of the admin port.
    #[arg(long, env = "VIRTUAL_AGENT_ADMIN_TLS_KEY")]
    admin_tls_key: Option<PathBuf>,
    /// How many connections the admin port keeps open at once; past it a new one is closed at
    /// once (kubelet's probes and a Prometheus scrape need a few).
    #[arg(long, env = "VIRTUAL_AGENT_ADMIN_MAX_CONNECTIONS", default_value = "128")]
    admin_max_connections: std::num::NonZeroUsize,
    /// Pods synced in parallel (each Pod's own operations stay in order). Keep it within the
    /// tenant's `limits.podSyncInFlight` on the host agent (64 by default): calls past it are
    /// refused and retried after a pause.
    #[arg(long, env = "VIRTUAL_AGENT_POD_WORKERS", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=256))]
    pod_workers: u16,
    /// HOST:PORT where Pods on the host reach this virtual cluster's API server (its Service in the
    /// host cluster, say). Set, a Pod's service account token volumes carry tokens of the virtual
    /// cluster (bound to the Pod, renewed at 80% of their lifetime) and its containers get
    /// KUBERNETES_SERVICE_HOST/PORT, so in-cluster clients talk to the virtual cluster; unset, token
    /// volumes are dropped on the host.
    #[arg(long, env = "VIRTUAL_AGENT_POD_API_SERVER")]
    pod_api_server: Option<virtual_agent::pods::tokens::PodApiServer>,
    /// Which events the host records about a synced Pod's host Pod (FailedScheduling, BackOff,
    /// Started, ...) or a claim's host claim (ProvisioningFailed, ...) to copy to the virtual
    /// object, where `kubectl describe` shows them.
    #[arg(long, env = "VIRTUAL_AGENT_HOST_EVENTS", value_enum, default_value = "all")]
    host_events: HostEventsArg,
    /// Namespace of the leader Lease `rcsync-virtual-agent` (default: the agent's own namespace
    /// in a cluster, kube-system with --kubeconfig).
    #[arg(long, env = "VIRTUAL_AGENT_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Lease duration in seconds: a standby takes over this long after the leader's last renewal;
    /// the leader stops writing after two thirds of it without a renewal, and renews every sixth.
    #[arg(long, env = "VIRTUAL_AGENT_LEASE_DURATION_SECONDS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=3600))]
    lease_duration_seconds: u64,
    /// This replica's identity in the leader Lease (default: host name and process id).
    #[arg(long, env = "VIRTUAL_AGENT_IDENTITY")]
    identity: Option<String>,
    /// How long a call to the host agent for one Pod (CheckPod, ApplyPod, DeletePod) may take, in
    /// seconds: past it the Pod is retried, and the host agent stops the call's work (a hung host
    /// API server does not hold the Pod, and the Pods behind it, for minutes).
    #[arg(long, env = "VIRTUAL_AGENT_HOST_CALL_TIMEOUT_SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    host_call_timeout_seconds: u64,
    /// How long to let work in flight finish after SIGTERM, in seconds.
    #[arg(long, env = "VIRTUAL_AGENT_SHUTDOWN_GRACE_SECONDS", default_value_t = 5)]
    shutdown_grace_seconds: u64,
    /// Log format.
    #[arg(long, env = "VIRTUAL_AGENT_LOG_FORMAT", value_enum, default_value = "plain")]
    log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "VIRTUAL_AGENT_LOG_LEVEL", default_value = "info")]
    log_level: String,
}

/// `--host-events`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum HostEventsArg {
    /// Normal and Warning events.
    All,
    /// Warning events only.
    Warnings,
    /// None.
    None,
}

impl From<HostEventsArg> for rcsync_proto::v1::HostEvents {
    fn from(arg: HostEventsArg) -> Self {
        match arg {
            HostEventsArg::All => Self::All,
            HostEventsArg::Warnings => Self::Warnings,
            HostEventsArg::None => Self::Unspecified,
        }
    }
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Show a running virtual agent's state (from its admin port): the host agent it talks to,
    /// the classes it applied, its Pods and why any is not synced; exits 1 when it is not ready,
    /// 2 when it is unreachable.
    Status {
        /// The agent's admin URL.
        #[arg(
            long,
            env = "VIRTUAL_AGENT_STATUS_ADMIN",
            default_value = "http://127.0.0.1:9091"
        )]
        admin: String,
        /// The token of an agent run with --admin-token-file.
        #[arg(long, env = "VIRTUAL_AGENT_STATUS_ADMIN_TOKEN_FILE")]
        admin_token_file: Option<PathBuf>,
        /// The CA (PEM) that signed the admin port's certificate, for an https:// --admin (an
        /// agent run with --admin-tls-cert).
        #[arg(long, env = "VIRTUAL_AGENT_STATUS_ADMIN_CA")]
        admin_ca: Option<PathBuf>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: rcsync_core::status_client::Output,
    },
}

/// The agent's own namespace when it runs in a cluster (its service account's), else kube-system.
fn default_lease_namespace(has_kubeconfig: bool) -> String {
    const OWN_NAMESPACE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";
    (!has_kubeconfig)
        .then(|| std::fs::read_to_string(OWN_NAMESPACE).ok())
        .flatten()
        .map(|ns| ns.trim().to_string())
        .filter(|ns| !ns.is_empty())
        .unwrap_or_else(|| "kube-system".to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Status {
        admin,
        admin_token_file,
        admin_ca,
        output,
    }) = &cli.command
    {
        let target = rcsync_core::status_client::AdminTarget {
            url: admin,
            token_file: admin_token_file.as_deref(),
            ca: admin_ca.as_deref(),
        };
        let report = virtual_agent::status::status(&target, *output);
        print!("{}", report.stdout);
        eprint!("{}", report.stderr);
        return ExitCode::from(report.code);
    }
    if let Err(e) = init_logging(cli.log_format, &cli.log_level) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let lease = LeaseSettings {
        namespace: cli
            .lease_namespace
            .unwrap_or_else(|| default_lease_namespace(cli.kubeconfig.is_some())),
        identity: cli.identity.unwrap_or_else(LeaseSettings::default_identity),
        duration: Duration::from_secs(cli.lease_duration_seconds),
    };
    // Required by clap whenever no subcommand is given.
    let mut target = HostAgentTarget::new(cli.host_agent, cli.tenant.unwrap_or_default());
    target.token_file = cli.token_file;
    target.ca_cert = cli.ca_cert;
    target.client_cert = cli.client_cert;
    target.client_key = cli.client_key;
    target.call_timeout = Duration::from_secs(cli.host_call_timeout_seconds);
    let settings = Settings {
        lease,
        kubeconfig: cli.kubeconfig,
        target,
        admin_listen: cli.admin_listen,
        admin_token_file: cli.admin_token_file,
        admin_tls: rcsync_core::tls::TlsFiles {
            cert: cli.admin_tls_cert,
            key: cli.admin_tls_key,
            client_ca: None,
        },
        admin_max_connections: cli.admin_max_connections,
        shutdown_grace: Duration::from_secs(cli.shutdown_grace_seconds),
        pod_workers: usize::from(cli.pod_workers),
        host_events: cli.host_events.into(),
        pod_api_server: cli.pod_api_server,
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(virtual_agent::run::run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
