//! `host-agent`: see the crate docs of the `host_agent` library.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use host_agent::grpc::TlsFiles;
use host_agent::run::Settings;
use rcsync_core::telemetry::{LogFormat, init_logging};

/// rcsync host agent: offers host RuntimeClasses to virtual clusters, per tenant, over gRPC, and
/// decides which of their Pods may sync.
#[derive(Parser, Debug)]
#[command(name = "host-agent", version, about, long_about = None, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate a tenants file (or a vcluster.yaml) and print what it configures; exits non-zero
    /// with every problem, each naming its path in the file.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Show what a running host agent offers each tenant (from its admin port); exits 1 when it
    /// is not ready, 2 when it is unreachable.
    Status {
        /// The agent's admin URL.
        #[arg(
            long,
            env = "HOST_AGENT_STATUS_ADMIN",
            default_value = "http://127.0.0.1:9090"
        )]
        admin: String,
        /// The token of an agent run with --admin-token-file.
        #[arg(long, env = "HOST_AGENT_STATUS_ADMIN_TOKEN_FILE")]
        admin_token_file: Option<PathBuf>,
        /// The CA (PEM) that signed the admin port's certificate, for an https:// --admin (an
        /// agent run with --admin-tls-cert).
        #[arg(long, env = "HOST_AGENT_STATUS_ADMIN_CA")]
        admin_ca: Option<PathBuf>,
        /// Show one tenant: each host class, offered or not and why.
        #[arg(long)]
        tenant: Option<String>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: host_agent::status_cmd::Output,
    },
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Kubeconfig of the host cluster (in-cluster config, or $KUBECONFIG, when absent).
    #[arg(long, env = "HOST_AGENT_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// The tenants file (re-read on SIGHUP).
    #[arg(long, env = "HOST_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Address of the gRPC server.
    #[arg(long, env = "HOST_AGENT_GRPC_LISTEN", default_value = "0.0.0.0:9443")]
    grpc_listen: SocketAddr,
    /// Address of the admin HTTP server (/livez, /readyz, /metrics).
    #[arg(long, env = "HOST_AGENT_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    admin_listen: SocketAddr,
    /// Plaintext address serving only gRPC health, for kubelet's native gRPC probe (which cannot
    /// speak TLS). Off unless set.
    #[arg(long, env = "HOST_AGENT_GRPC_HEALTH_LISTEN")]
    grpc_health_listen: Option<SocketAddr>,
    /// Serving certificate (PEM); with --tls-key, gRPC is served over TLS.
    #[arg(long, env = "HOST_AGENT_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// Serving key (PEM).
    #[arg(long, env = "HOST_AGENT_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// CA (PEM) that client certificates must chain to: requires mutual TLS. A client
    /// certificate's subject common name identifies its tenant.
    #[arg(long, env = "HOST_AGENT_CLIENT_CA")]
    client_ca: Option<PathBuf>,
    /// Let tenants configured without a token connect without credentials (they name themselves
    /// with the x-rcsync-tenant header). For development only.
    #[arg(long, env = "HOST_AGENT_ALLOW_UNAUTHENTICATED")]
    allow_unauthenticated: bool,
    /// How long to let streams and requests end after SIGTERM.
    #[arg(long, env = "HOST_AGENT_SHUTDOWN_GRACE", default_value = "5s", value_parser = parse_duration)]
    shutdown_grace: Duration,
    /// How long a gRPC connection may stay quiet before the agent pings it (HTTP/2 PING), so a
    /// client that vanished without closing (a node lost, a partition) is found and its streams end.
    #[arg(long, env = "HOST_AGENT_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = parse_positive_duration)]
    keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is closed.
    #[arg(long, env = "HOST_AGENT_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    keepalive_timeout: Duration,
    /// A file holding the bearer token that /metrics and /tenants on the admin port require (re-read
    /// at each request, so a rotated Secret applies at once); /livez and /readyz stay open. Without
    /// it the admin port answers anyone who reaches it.
    #[arg(long, env = "HOST_AGENT_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// Serving certificate (PEM) of the admin port; with --admin-tls-key it serves HTTPS only
    /// (reloaded when the files change; kubelet probes then need `scheme: HTTPS`).
    #[arg(long, env = "HOST_AGENT_ADMIN_TLS_CERT")]
    admin_tls_cert: Option<PathBuf>,
    /// Serving key (PEM) of the admin port.
    #[arg(long, env = "HOST_AGENT_ADMIN_TLS_KEY")]
    admin_tls_key: Option<PathBuf>,
    /// How many connections the admin port keeps open at once; past it a new one is closed at
    /// once (kubelet's probes and a Prometheus scrape need a few).
    #[arg(long, env = "HOST_AGENT_ADMIN_MAX_CONNECTIONS", default_value = "128")]
    admin_max_connections: std::num::NonZeroUsize,
    /// How many connections the gRPC ports keep open at once (--grpc-listen and
    /// --grpc-health-listen together); past it a new connection is closed
    /// at once (before any TLS handshake) and counted in rcsync_grpc_connections_refused_total.
    /// A virtual agent holds up to three; each open connection costs about 20–40 KiB.
    #[arg(long, env = "HOST_AGENT_MAX_CONNECTIONS", default_value = "4096")]
    max_connections: std::num::NonZeroUsize,
    /// How many bytes of ApplyPod/DeletePod requests (Pods with their ConfigMaps and Secrets) the
    /// agent holds at once, over all tenants, from the first byte read to the answer: a bytes
    /// count or a quantity such as 512Mi or 1Gi. Past it a call is refused with
    /// RESOURCE_EXHAUSTED and retry info (the virtual agent retries), counted in
    /// rcsync_pod_sync_budget_refusals_total. Size it to the agent's memory limit: a request's
    /// bytes are held several times over (read, decoded, parsed, translated), beside the agent's own use
    /// (deploy/ sets 48Mi under a 256Mi limit). No tenant holds more than its share of it, its
    /// limits.podSyncBytes or else a quarter (past that its calls are refused the same way), so
    /// one busy tenant leaves the others room; hence at least 16Mi, so that a quarter holds the
    /// largest Pod sync (4 MiB).
    #[arg(long, env = "HOST_AGENT_MAX_POD_SYNC_BYTES", default_value = "512Mi", value_parser = parse_bytes)]
    max_pod_sync_bytes: usize,
    /// How long an ApplyPod/DeletePod message may take to arrive after the call's headers; past
    /// it the call ends with DEADLINE_EXCEEDED (the virtual agent retries), so a caller cannot
    /// hold bytes of --max-pod-sync-bytes, or its tenant's podSyncInFlight places, by sending part
    /// of a message and then nothing. A 4 MiB message needs about 3 Mbit/s at the default.
    #[arg(long, env = "HOST_AGENT_POD_SYNC_READ_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    pod_sync_read_timeout: Duration,
    /// How long the agent works on one ApplyPod/DeletePod (its host API calls) once its message
    /// arrived; past it the call ends with DEADLINE_EXCEEDED (the virtual agent retries), so a host
    /// API server that hangs does not hold the call, its tenant's podSyncInFlight place and its
    /// bytes for minutes. A caller's shorter grpc-timeout ends it sooner.
    #[arg(long, env = "HOST_AGENT_POD_SYNC_TIMEOUT", default_value = "60s", value_parser = parse_positive_duration)]
    pod_sync_timeout: Duration,
    /// Log format.
    #[arg(long, env = "HOST_AGENT_LOG_FORMAT", value_enum, default_value = "plain")]
    log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax, e.g. `info` or `host_agent=debug,kube=warn`).
    #[arg(long, env = "HOST_AGENT_LOG_LEVEL", default_value = "info")]
    log_level: String,
}

/// The smallest Pod sync budget: a tenant's share of it must hold the largest Pod sync.
const MIN_POD_SYNC_BYTES: usize =
    rcsync_proto::MAX_REQUEST_BYTES * host_agent::grpc::body_budget::TENANT_SHARE;

/// A byte count: digits, optionally with a binary suffix (`Ki`, `Mi`, `Gi`), as Kubernetes
/// quantities write memory; at least [`MIN_POD_SYNC_BYTES`].
fn parse_bytes(raw: &str) -> Result<usize, String> {
    let bytes = rcsync_core::config::parse_byte_size(raw)
        .and_then(|b| usize::try_from(b).map_err(|_| format!("invalid size {raw:?}: too large")))?;
    if bytes < MIN_POD_SYNC_BYTES {
        return Err(format!(
            "size {raw:?} is below {}Mi: a tenant's quarter of it must hold the largest Pod sync ({} MiB)",
            MIN_POD_SYNC_BYTES >> 20,
            rcsync_proto::MAX_REQUEST_BYTES >> 20
        ));
    }
    Ok(bytes)
}

fn parse_duration(raw: &str) -> Result<Duration, String> {
    let (number, unit) = raw.split_at(raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len()));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("invalid duration {raw:?}: expected e.g. 5s or 500ms"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("invalid duration {raw:?}: the unit must be ms, s or m")),
    }
}

/// A duration that must not be zero (a keepalive of 0 would ping without pause).
fn parse_positive_duration(raw: &str) -> Result<Duration, String> {
    parse_duration(raw).and_then(|d| {
        if d.is_zero() {
            Err(format!("invalid duration {raw:?}: must be more than zero"))
        } else {
            Ok(d)
        }
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Status {
        admin,
        admin_token_file,
        admin_ca,
        tenant,
        output,
    }) = &cli.command
    {
        let target = rcsync_core::status_client::AdminTarget {
            url: admin,
            token_file: admin_token_file.as_deref(),
            ca: admin_ca.as_deref(),
        };
        let report = host_agent::status_cmd::status(&target, tenant.as_deref(), *output);
        print!("{}", report.stdout);
        eprint!("{}", report.stderr);
        return ExitCode::from(report.code);
    }
    if let Some(Command::CheckConfig { file }) = cli.command {
        return match host_agent::check::check_config(&file) {
            Ok(summary) => {
                print!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let args = cli.run;
    let Some(config) = args.config else {
        eprintln!(
            "error: --config (or HOST_AGENT_CONFIG) is required: the tenants file\n\nFor more information, try '--help'."
        );
        return ExitCode::from(2);
    };
    if let Err(e) = init_logging(args.log_format, &args.log_level) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    // One crypto provider for the whole process (kube and tonic both use rustls with ring).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let settings = Settings {
        kubeconfig: args.kubeconfig,
        config,
        grpc_listen: args.grpc_listen,
        admin_listen: args.admin_listen,
        grpc_health_listen: args.grpc_health_listen,
        tls: TlsFiles {
            cert: args.tls_cert,
            key: args.tls_key,
            client_ca: args.client_ca,
        },
        allow_unauthenticated: args.allow_unauthenticated,
        shutdown_grace: args.shutdown_grace,
        keepalive: host_agent::grpc::serve::Keepalive {
            interval: args.keepalive_interval,
            timeout: args.keepalive_timeout,
        },
        max_connections: args.max_connections,
        max_pod_sync_bytes: args.max_pod_sync_bytes,
        pod_sync_read_timeout: args.pod_sync_read_timeout,
        pod_sync_timeout: args.pod_sync_timeout,
        admin_token_file: args.admin_token_file,
        admin_tls: TlsFiles {
            cert: args.admin_tls_cert,
            key: args.admin_tls_key,
            client_ca: None,
        },
        admin_max_connections: args.admin_max_connections,
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(host_agent::run::run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "host agent failed");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_bytes_or_binary_quantities_and_a_bad_one_says_what_is_expected() {
        assert_eq!(parse_bytes("512Mi"), Ok(512 << 20));
        assert_eq!(parse_bytes("1Gi"), Ok(1 << 30));
        assert_eq!(parse_bytes("16384Ki"), Ok(16 << 20));
        assert_eq!(parse_bytes("16777216"), Ok(16 << 20));
        for bad in ["512MB", "Mi", "", "1.5Gi", "-1Mi", "99999999999999999999Gi"] {
            assert_eq!(
                parse_bytes(bad),
                Err(format!(
                    "invalid size {bad:?}: expected a number of bytes or e.g. 512Mi or 1Gi"
                )),
            );
        }
        assert_eq!(
            parse_bytes("8Mi"),
            Err(
                r#"size "8Mi" is below 16Mi: a tenant's quarter of it must hold the largest Pod sync (4 MiB)"#
                    .to_string()
            )
        );
    }
}
