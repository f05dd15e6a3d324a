//! `devcluster`: see the library docs.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use devcluster::{DevCluster, ServerOptions};
use rcsync_core::telemetry::{LogFormat, init_logging, termination_signal};

/// An in-memory Kubernetes API server for development and tests (not for production: no
/// persistence, no scheduler, no kubelet).
#[derive(Parser, Debug)]
#[command(name = "devcluster", version, about)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        env = "DEVCLUSTER_LOG_FORMAT",
        value_enum,
        default_value = "plain",
        global = true
    )]
    log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "DEVCLUSTER_LOG_LEVEL", default_value = "info", global = true)]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start one API server, print its address and write a kubeconfig for it.
    Serve {
        /// Address to listen on; port 0 picks a free port.
        #[arg(long, env = "DEVCLUSTER_LISTEN", default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Where to write the kubeconfig.
        #[arg(long, env = "DEVCLUSTER_KUBECONFIG", default_value = "devcluster.kubeconfig")]
        kubeconfig: PathBuf,
        /// Name of the cluster, user and context in the kubeconfig.
        #[arg(long, env = "DEVCLUSTER_NAME", default_value = "devcluster")]
        name: String,
        /// Serve plain HTTP without authentication (kubectl sends no token over plain HTTP).
        #[arg(long, env = "DEVCLUSTER_INSECURE_HTTP")]
        insecure_http: bool,
        /// Bearer token to require over TLS (random when absent).
        #[arg(long, env = "DEVCLUSTER_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Changes kept for watches to resume from; older resourceVersions get 410 Gone.
        #[arg(long, env = "DEVCLUSTER_HISTORY", default_value_t = 10_000)]
        history: usize,
        /// State file: objects and resourceVersions survive a restart (watches from before it get
        /// 410 Gone, as after an API server restart).
        #[arg(long, env = "DEVCLUSTER_STATE")]
        state: Option<PathBuf>,
        /// Admission plugins to turn off, as kube-apiserver's flag (known: RuntimeClass).
        #[arg(long, env = "DEVCLUSTER_DISABLE_ADMISSION_PLUGINS", value_delimiter = ',')]
        disable_admission_plugins: Vec<String>,
        /// Simulated nodes: Pods are scheduled on them and run (0: Pods stay Pending).
        #[arg(long, env = "DEVCLUSTER_NODES", default_value_t = 0)]
        nodes: usize,
        /// RuntimeClass handlers the nodes run (comma-separated); every handler when absent. A Pod
        /// whose class names another stays ContainerCreating, with the kubelet's event.
        #[arg(long, env = "DEVCLUSTER_HANDLERS", value_delimiter = ',')]
        handlers: Option<Vec<String>>,
        /// Serve Pods without their `resize` subresource, as API servers before Kubernetes 1.33
        /// do (a resize there is a 404).
        #[arg(long, env = "DEVCLUSTER_NO_POD_RESIZE")]
        no_pod_resize: bool,
        /// Offer HTTP/1.1 only over TLS (no ALPN `h2`), as behind a proxy without HTTP/2.
        #[arg(long, env = "DEVCLUSTER_NO_HTTP2")]
        no_http2: bool,
        /// Concurrent streams one HTTP/2 connection may carry, as kube-apiserver's flag.
        #[arg(
            long,
            env = "DEVCLUSTER_HTTP2_MAX_STREAMS_PER_CONNECTION",
            default_value_t = 100
        )]
        http2_max_streams_per_connection: u32,
    },
    /// Run the whole rcsync system on loopback: a host and a virtual API server, host-agent and
    /// virtual-agent (found next to this executable, else on PATH), and a guide to try it with
    /// kubectl. Stops everything on Ctrl-C or SIGTERM.
    Up {
        /// State directory: kubeconfigs, tenants file, example manifests, agent logs.
        #[arg(long, env = "DEVCLUSTER_DIR", default_value = ".devcluster")]
        dir: PathBuf,
        /// Run two replicas of each agent: host agents active-active, virtual agents with one
        /// leader on a Lease (the status lines show which).
        #[arg(long, env = "DEVCLUSTER_HA")]
        ha: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // `up` prints a guide and a live status on stdout; keep devcluster's own logs quiet there.
    let level = if matches!(cli.command, Command::Up { .. }) && cli.log_level == "info" {
        "warn"
    } else {
        &cli.log_level
    };
    init_logging(cli.log_format, level)?;
    match cli.command {
        Command::Up { dir, ha } => devcluster::up::up(devcluster::up::UpOptions { dir, ha }).await,
        Command::Serve {
            listen,
            kubeconfig,
            name,
            insecure_http,
            token,
            history,
            state,
            disable_admission_plugins,
            nodes,
            handlers,
            no_pod_resize,
            no_http2,
            http2_max_streams_per_connection,
        } => {
            let admission = devcluster::admission::AdmissionPlugins::disabling(&disable_admission_plugins)
                .map_err(|e| anyhow::anyhow!("--disable-admission-plugins: {e}"))?;
            let options = ServerOptions {
                listen,
                insecure_http,
                token,
                state,
                history,
                admission,
                nodes: devcluster::nodes::NodeOptions {
                    count: nodes,
                    handlers,
                },
                pod_resize: !no_pod_resize,
                http2: !no_http2,
                http2_max_streams: http2_max_streams_per_connection,
                ..ServerOptions::default()
            };
            let signal = termination_signal();
            let cluster = DevCluster::start(options).await?;
            cluster
                .write_kubeconfig(&kubeconfig, &name)
                .context("writing the kubeconfig")?;
            println!(
                "devcluster listening on {} (kubeconfig: {})",
                cluster.url(),
                kubeconfig.display()
            );
            if insecure_http {
                tracing::warn!("serving plain HTTP without authentication");
            }
            let signal = signal.await;
            tracing::info!(signal, "shutting down");
            cluster.shutdown().await;
            Ok(())
        }
    }
}
