//! Wiring of `host-agent` (run mode): config, kube client, index, gRPC, admin, reload, shutdown.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use prometheus_client::registry::Registry;
use rcsync_core::TenantsFile;
use rcsync_core::admin::{AdminAccess, AdminServing, Readiness, serve_admin};
use rcsync_core::config::{ConfigError, Problem};
use rcsync_core::patches::TenantPatches;
use rcsync_core::script::ScriptLimits;
use rcsync_core::telemetry::termination_signal;
use rcsync_proto::v1::pod_sync_server::PodSyncServer;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::grpc::TlsFiles;
use crate::grpc::auth::{Authenticated, Authenticator};
use crate::grpc::body_budget::{BodyBudget, Budgeting};
use crate::grpc::framing::SyncFraming;
use crate::grpc::pods::PodSyncService;
use crate::grpc::sync::{RetryPolicy, RuntimeClassSyncService};
use crate::index::{ClassIndex, TenantsState, Views};
use crate::metrics::Metrics;
use crate::tenants::TenantTokens;
use rcsync_core::tls::{ServingTls, TlsFlags, is_read};

/// The readiness check that passes once the host's RuntimeClasses were listed.
pub const LISTED: &str = "host-runtimeclasses-listed";

/// Everything `host-agent` needs to run.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Kubeconfig of the host cluster; in-cluster (or $KUBECONFIG) when absent.
    pub kubeconfig: Option<PathBuf>,
    /// The tenants file.
    pub config: PathBuf,
    /// gRPC address.
    pub grpc_listen: SocketAddr,
    /// Admin HTTP address.
    pub admin_listen: SocketAddr,
    /// Plaintext address serving only `grpc.health.v1` (for kubelet's native gRPC probe, which
    /// cannot speak TLS); off when `None`.
    pub grpc_health_listen: Option<SocketAddr>,
    /// TLS files.
    pub tls: TlsFiles,
    /// Serve tenants without a token, named by `x-rcsync-tenant`.
    pub allow_unauthenticated: bool,
    /// How long to wait for streams and requests to end after SIGTERM.
    pub shutdown_grace: Duration,
    /// How dead gRPC peers are found.
    pub keepalive: crate::grpc::serve::Keepalive,
    /// How many gRPC connections may be open at once (the gRPC port and the health port together).
    pub max_connections: std::num::NonZeroUsize,
    /// How many bytes of ApplyPod/DeletePod requests the agent holds at once, over all tenants.
    pub max_pod_sync_bytes: usize,
    /// How long an ApplyPod/DeletePod message may take to arrive after its headers.
    pub pod_sync_read_timeout: Duration,
    /// How long an ApplyPod/DeletePod may work once its message arrived.
    pub pod_sync_timeout: Duration,
    /// The bearer token file guarding the admin port's `/metrics` and `/tenants`.
    pub admin_token_file: Option<PathBuf>,
    /// The admin port's TLS files (no client CA): HTTPS when set.
    pub admin_tls: TlsFiles,
    /// How many connections the admin port keeps open at once.
    pub admin_max_connections: std::num::NonZeroUsize,
}

/// Loads the tenants file, its token files, and compiles every tenant's patches (a syntax error is
/// a config error naming the patch).
pub fn load_tenants(path: &Path) -> Result<TenantsState, ConfigError> {
    let file = TenantsFile::load(path)?;
    let mut problems: Vec<Problem> = Vec::new();
    let mut patches = HashMap::new();
    for (i, tenant) in file.tenants().iter().enumerate() {
        let specs = &tenant.runtime_classes.patches;
        if specs.is_empty() {
            continue;
        }
        match TenantPatches::compile(
            tenant.name.as_str(),
            &tenant.host_namespace,
            specs,
            ScriptLimits::default(),
        ) {
            Ok(compiled) => {
                patches.insert(tenant.name.clone(), Arc::new(compiled));
            }
            Err(errors) => problems.extend(errors.into_iter().map(|(j, field, message)| Problem {
                at: format!("tenants[{i}].sync.fromHost.runtimeClasses.patches[{j}].{field}"),
                message,
            })),
        }
    }
    if !problems.is_empty() {
        return Err(ConfigError {
            file: path.to_path_buf(),
            problems,
        });
    }
    let tokens = TenantTokens::load(path, &file)?;
    Ok(TenantsState {
        file,
        tokens,
        patches,
    })
}

/// A runtime with one worker thread of its own, for work kept apart from the main runtime's
/// (which serves unary calls, the admin port and the watches' I/O):
/// - `rcsync-index`: change handling, one decision per tenant per host change;
/// - `rcsync-streams`: the fan-out, the Sync streams' work and the gRPC connections that carry
///   Sync streams (see `grpc::serve`).
///
/// So a change reaching every tenant never queues ahead of a CheckPod, and the index keeps up
/// with a burst of changes while the streams send them. Dropped without blocking (a runtime
/// dropped inside async code panics), also when `run` returns early with an error such as a port
/// in use.
struct SideRuntime(Option<tokio::runtime::Runtime>);

impl SideRuntime {
    fn start(name: &str) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(name)
            .enable_all()
            .build()
            .with_context(|| format!("starting the {name} runtime"))?;
        Ok(Self(Some(runtime)))
    }

    fn handle(&self) -> tokio::runtime::Handle {
        self.0.as_ref().expect("present until dropped").handle().clone()
    }
}

impl Drop for SideRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Runs the host agent until SIGTERM or SIGINT.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let signal = termination_signal();
    let tenants = load_tenants(&settings.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    tracing::info!(tenants = tenants.file.tenants().len(), config = %settings.config.display(), "loaded tenants");
    let tls = ServingTls::load(&settings.tls, TlsFlags::GRPC, &[b"h2"])?;
    let admin_tls = ServingTls::load(&settings.admin_tls, TlsFlags::ADMIN, &[b"h2", b"http/1.1"])?;
    let admin_access = match &settings.admin_token_file {
        Some(path) => AdminAccess::token_file(path.clone())?,
        None => AdminAccess::open(),
    };
    let api_metrics = rcsync_core::api_transport::ApiTransportMetrics::default();
    let client = rcsync_core::kube_client::kube_client(settings.kubeconfig.as_deref(), &api_metrics).await?;

    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    api_metrics.register(&mut registry);
    let readiness = Readiness::new(&[LISTED]);
    rcsync_core::admin::register_ready_gauge(&mut registry, &readiness);
    let registry = Arc::new(registry);
    let (tenants_tx, tenants_rx) = watch::channel(Arc::new(tenants));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let streams_runtime = SideRuntime::start("rcsync-streams")?;
    let index_runtime = SideRuntime::start("rcsync-index")?;
    let views = Views::default();
    let index = ClassIndex::new(tenants_rx.borrow().clone(), views.clone(), metrics.clone());
    let index_task = {
        let readiness = readiness.clone();
        index_runtime.handle().spawn(crate::index::run(
            client.clone(),
            index,
            tenants_rx.clone(),
            move || readiness.set(LISTED, true),
            shutdown_rx.clone(),
        ))
    };

    let (reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(crate::grpc::follow_readiness(
        reporter,
        readiness.clone(),
        &[
            rcsync_proto::RUNTIME_CLASS_SYNC_SERVICE,
            rcsync_proto::POD_SYNC_SERVICE,
        ],
    ));
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(rcsync_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(rcsync_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let mut auth = Authenticator::new(tenants_rx.clone(), settings.allow_unauthenticated);
    if let Some(tls) = &tls
        && settings.tls.client_ca.is_some()
    {
        auth = auth.verifying_client_certificates(tls.client_certificates());
    }
    let last_errors = crate::grpc::sync::LastErrors::default();
    let limiter = crate::grpc::limits::TenantLimiter::new(tenants_rx.clone(), metrics.clone());
    tokio::spawn(limiter.clone().forget_removed_tenants());
    let sync = RuntimeClassSyncService::new(
        Arc::new(views.clone()),
        auth.clone(),
        metrics.clone(),
        RetryPolicy::default(),
        shutdown_rx.clone(),
        last_errors.clone(),
        limiter.clone(),
    )
    .with_stream_runtime(streams_runtime.handle());
    let pods = PodSyncService::new(
        Arc::new(views.clone()),
        tenants_rx.clone(),
        auth.clone(),
        client.clone(),
        metrics.clone(),
        shutdown_rx.clone(),
        limiter.clone(),
    )
    .with_call_timeout(settings.pod_sync_timeout);

    let grpc_listener = TcpListener::bind(settings.grpc_listen)
        .await
        .with_context(|| format!("binding the gRPC address {}", settings.grpc_listen))?;
    let admin_listener = TcpListener::bind(settings.admin_listen)
        .await
        .with_context(|| format!("binding the admin address {}", settings.admin_listen))?;
    if tls.is_some() {
        tracing::info!(
            mtls = settings.tls.client_ca.is_some(),
            "serving gRPC over TLS (certificates reloaded when their files change)"
        );
    } else {
        tracing::warn!(
            "serving gRPC in plaintext: tokens and data cross the network unencrypted; set --tls-cert and --tls-key"
        );
    }
    if settings.allow_unauthenticated {
        tracing::warn!(
            "--allow-unauthenticated: tenants without a token are reachable by anyone who can connect"
        );
    }
    tracing::info!(grpc = %grpc_listener.local_addr()?, admin = %admin_listener.local_addr()?, "listening");
    // One budget for both gRPC ports: a flood on either is bounded the same way.
    let limit = crate::grpc::connection_limit::ConnectionLimit::new(
        settings.max_connections,
        metrics.grpc_connections_refused_total.clone(),
    );
    let health_task = match settings.grpc_health_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the gRPC health address {addr}"))?;
            tracing::info!(grpc_health = %listener.local_addr()?, "serving plaintext gRPC health for probes");
            let mut rx = shutdown_rx.clone();
            Some(tokio::spawn(
                tonic::transport::Server::builder()
                    .http2_keepalive_interval(Some(settings.keepalive.interval))
                    .http2_keepalive_timeout(Some(settings.keepalive.timeout))
                    .max_concurrent_streams(crate::grpc::serve::MAX_STREAMS_PER_CONNECTION)
                    .add_service(health.clone())
                    .serve_with_incoming_shutdown(paced(admitted(listener, limit.clone())), async move {
                        let _ = rx.wait_for(|stop| *stop).await;
                    }),
            ))
        }
        None => None,
    };
    let routes = tonic::service::Routes::new(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(Authenticated::new(
            SyncFraming::new(sync),
            auth.clone(),
            metrics.clone(),
        ))
        .add_service(
            Authenticated::new(
                Budgeting::new(
                    PodSyncServer::new(pods).max_decoding_message_size(rcsync_proto::MAX_REQUEST_BYTES),
                    BodyBudget::new(
                        settings.max_pod_sync_bytes,
                        settings.pod_sync_read_timeout,
                        tenants_rx.clone(),
                        metrics.clone(),
                    ),
                ),
                auth.clone(),
                metrics.clone(),
            )
            .limiting_pod_syncs(limiter),
        )
        .prepare();
    let streams = streams_runtime.handle();
    let connection_metrics = crate::grpc::serve::ConnectionMetrics {
        open: metrics.grpc_connections.clone(),
        revoked: metrics.grpc_connections_revoked_total.clone(),
    };
    let grpc_task = match tls {
        Some(tls) => {
            tokio::spawn(tls.clone().reload_on_change(metrics.tls_reloads.count()));
            tokio::spawn(crate::grpc::serve::serve(
                routes,
                crate::grpc::tls::incoming(&tls, grpc_listener, limit, shutdown_rx.clone()),
                streams,
                settings.keepalive,
                connection_metrics.clone(),
                // A connection ends when its client certificate is revoked.
                auth,
                shutdown_rx.clone(),
            ))
        }
        None => tokio::spawn(crate::grpc::serve::serve(
            routes,
            admitted(grpc_listener, limit),
            streams,
            settings.keepalive,
            connection_metrics,
            (),
            shutdown_rx.clone(),
        )),
    };
    let admin_shutdown = {
        let mut rx = shutdown_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let status = crate::status::router(views.clone(), tenants_rx.clone(), last_errors, metrics.clone());
    if let Some(admin_tls) = &admin_tls {
        tokio::spawn(admin_tls.clone().reload_on_change(metrics.tls_reloads.count()));
    }
    let admin_task = tokio::spawn(serve_admin(
        admin_listener,
        readiness.clone(),
        registry,
        Some(status),
        AdminServing {
            access: admin_access,
            tls: admin_tls,
            max_connections: settings.admin_max_connections,
        },
        admin_shutdown,
    ));
    tokio::spawn(reload_on_change(
        settings.config.clone(),
        tenants_tx,
        metrics.clone(),
    ));

    let signal = signal.await;
    tracing::info!(signal, "shutting down: not ready, ending streams");
    readiness.shutting_down();
    let _ = shutdown_tx.send(true);
    let drained = tokio::time::timeout(settings.shutdown_grace, async {
        let _ = grpc_task.await;
        let _ = admin_task.await;
        let _ = index_task.await;
        if let Some(task) = health_task {
            let _ = task.await;
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(grace = ?settings.shutdown_grace, "shutdown grace period over; exiting with work in flight");
    }
    drop(streams_runtime);
    drop(index_runtime);
    tracing::info!("stopped");
    Ok(())
}

/// Accepted connections with TCP_NODELAY set (tonic's own `tcp_nodelay` applies only to the
/// listeners it binds itself): small gRPC frames such as CheckPod answers go out at once. A failed
/// accept is passed on at once: [`serve`](crate::grpc::serve::serve) pauses after it, and the
/// health port, served by tonic, through [`paced`].
fn no_delay(listener: TcpListener) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| {
            let _ = stream.set_nodelay(true);
            stream
        });
        Some((accepted, listener))
    })
}

/// `incoming` with a pause after each failed accept (out of file descriptors: every one fails
/// until one is freed), for tonic's server, which would otherwise ask again at once, in a busy
/// loop.
fn paced<T>(
    incoming: impl futures::Stream<Item = std::io::Result<T>>,
) -> impl futures::Stream<Item = std::io::Result<T>> {
    futures::StreamExt::then(incoming, |accepted| async move {
        if accepted.is_err() {
            tokio::time::sleep(crate::grpc::serve::ACCEPT_ERROR_PAUSE).await;
        }
        accepted
    })
}

/// The connections accepted on `listener` (TCP_NODELAY set) that get a place under `limit`; the
/// others are closed at once.
fn admitted(
    listener: TcpListener,
    limit: crate::grpc::connection_limit::ConnectionLimit,
) -> impl futures::Stream<Item = std::io::Result<crate::grpc::serve::MovableTcp>> {
    futures::StreamExt::filter_map(no_delay(listener), move |accepted| {
        std::future::ready(match accepted {
            Ok(stream) => limit.admit(stream).map(Ok),
            Err(e) => Some(Err(e)),
        })
    })
}

/// The names of the files the agent reads: the tenants file and every token file.
fn file_names(path: &std::path::Path, state: &TenantsState) -> std::collections::HashSet<std::ffi::OsString> {
    std::iter::once(path)
        .chain(
            state
                .file
                .tenants()
                .iter()
                .filter_map(|t| t.token_file.as_deref()),
        )
        .filter_map(|p| p.file_name().map(ToOwned::to_owned))
        .collect()
}

/// Re-reads the tenants file on SIGHUP, and when it or a token file changes on disk (watched with
/// inotify, directories included, so Kubernetes' atomic ConfigMap/Secret updates are seen). Other
/// files in those directories are ignored, and a re-read that finds nothing changed changes
/// nothing. A bad file is reported with every problem and the running config is kept.
async fn reload_on_change(path: PathBuf, tenants: watch::Sender<Arc<TenantsState>>, metrics: Metrics) {
    let count = |result: &str| {
        metrics
            .config_reloads_total
            .get_or_create(&crate::metrics::ResultLabel {
                result: result.to_string(),
            })
            .inc();
    };
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(hup) => Some(hup),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP");
            None
        }
    };
    let (tx, mut changed) = tokio::sync::mpsc::channel::<()>(1);
    // Only the files the agent reads count: the tenants file, the token files, and Kubernetes'
    // atomic-writer entries (`..data` and its timestamped targets) that swap them in.
    let read_names = Arc::new(std::sync::Mutex::new(file_names(&path, &tenants.borrow())));
    let names = read_names.clone();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if matches!(event.kind, notify::EventKind::Access(_)) {
            return;
        }
        let names = names.lock().unwrap_or_else(|e| e.into_inner());
        if event.paths.iter().any(|p| is_read(&names, p)) {
            let _ = tx.try_send(());
        }
    });
    let mut watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the tenants file; reload with SIGHUP");
            None
        }
    };
    let watch_dirs = |watcher: &mut Option<notify::RecommendedWatcher>, state: &TenantsState| {
        let Some(watcher) = watcher else { return };
        let files = std::iter::once(path.as_path()).chain(
            state
                .file
                .tenants()
                .iter()
                .filter_map(|t| t.token_file.as_deref()),
        );
        rcsync_core::tls::watch_dirs(watcher, files, "config");
    };
    watch_dirs(&mut watcher, &tenants.borrow());
    loop {
        let why = tokio::select! {
            Some(()) = changed.recv() => {
                // Let a burst of writes (editors, atomic swaps) settle, then reload once.
                tokio::time::sleep(Duration::from_millis(200)).await;
                while changed.try_recv().is_ok() {}
                "file change"
            }
            Some(_) = async { match &mut hup { Some(h) => h.recv().await, None => std::future::pending().await } } => "SIGHUP",
            else => return,
        };
        // Reading every token file and compiling patches is blocking work: off the workers that
        // answer CheckPod.
        let loaded = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || load_tenants(&path)).await
        };
        let loaded = match loaded {
            Ok(loaded) => loaded,
            Err(e) => {
                tracing::error!(error = %e, "reloading tenants panicked; keeping the running config");
                continue;
            }
        };
        match loaded {
            Ok(state) => {
                let same = {
                    let current = tenants.borrow();
                    state.file == current.file && state.tokens == current.tokens
                };
                if same {
                    tracing::info!(trigger = why, "tenants file re-read: nothing changed");
                    count("unchanged");
                    continue;
                }
                count("applied");
                tracing::info!(
                    tenants = state.file.tenants().len(),
                    trigger = why,
                    "reloaded tenants"
                );
                watch_dirs(&mut watcher, &state);
                *read_names.lock().unwrap_or_else(|e| e.into_inner()) = file_names(&path, &state);
                tenants.send_replace(Arc::new(state));
            }
            Err(e) => {
                count("failed");
                tracing::error!(error = %e, trigger = why, "reloading tenants failed; keeping the running config")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_files_the_agent_reads_trigger_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("tenants.yaml");
        std::fs::write(dir.path().join("a.token"), "t").unwrap();
        std::fs::write(
            &config,
            "tenants:\n  - {name: a, hostNamespace: ns-a, tokenFile: a.token}\n",
        )
        .unwrap();
        let names = file_names(&config, &load_tenants(&config).unwrap());
        assert!(is_read(&names, &config));
        assert!(is_read(&names, &dir.path().join("a.token")));
        assert!(
            is_read(&names, &dir.path().join("..data")),
            "a ConfigMap volume's swap"
        );
        assert!(is_read(&names, &dir.path().join("..2026_11_26_05_00_00.123")));
        assert!(!is_read(&names, &dir.path().join("host-agent.log")));
        assert!(!is_read(&names, &dir.path().join("notes.txt")));
    }
}
