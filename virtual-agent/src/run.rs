//! Wiring of `virtual-agent`: kube client, class sync, enforcer, Pod syncer, admin, shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::node::v1::RuntimeClass;
use kube::Api;
use prometheus_client::registry::Registry;
use rcsync_core::admin::{Readiness, serve_admin};
use rcsync_core::telemetry::termination_signal;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::classes::{Applier, CLASSES_LISTED, INITIAL_STATE_APPLIED, SyncState, run_enforcer, run_sync};
use crate::connect::HostAgentTarget;
use crate::metrics::Metrics;
use crate::pods::{PODS_LISTED, PodSyncer};

/// Everything `virtual-agent` needs to run.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Kubeconfig of the virtual cluster; in-cluster (or $KUBECONFIG) when absent.
    pub kubeconfig: Option<PathBuf>,
    /// The host agent and this tenant's credentials.
    pub target: HostAgentTarget,
    /// Admin HTTP address.
    pub admin_listen: SocketAddr,
    /// How long to wait for work in flight after SIGTERM.
    pub shutdown_grace: Duration,
    /// Pods synced in parallel (each Pod's operations stay in order).
    pub pod_workers: usize,
}

/// Runs the virtual agent until SIGTERM or SIGINT.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let signal = termination_signal();
    settings.target.validate()?;
    if settings.target.url.starts_with("http://") {
        tracing::warn!(url = %settings.target.url, "connecting to the host agent in plaintext: the token crosses the network unencrypted");
    }
    let client = rcsync_core::kube_client::kube_client(settings.kubeconfig.as_deref()).await?;
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let readiness = Readiness::new(&[CLASSES_LISTED, PODS_LISTED, INITIAL_STATE_APPLIED]);
    rcsync_core::admin::register_ready_gauge(&mut registry, &readiness);
    let registry = Arc::new(registry);
    let (state_tx, state_rx) = watch::channel(SyncState::default());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let admin_listener = TcpListener::bind(settings.admin_listen)
        .await
        .with_context(|| format!("binding the admin address {}", settings.admin_listen))?;
    tracing::info!(admin = %admin_listener.local_addr()?, host_agent = %settings.target.url, tenant = %settings.target.tenant, "starting");

    let classes: Api<RuntimeClass> = Api::all(client.clone());
    let resync = Arc::new(tokio::sync::Notify::new());
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(run_sync(
        settings.target.clone(),
        Applier::new(classes.clone(), metrics.clone()),
        state_tx,
        readiness.clone(),
        metrics.clone(),
        resync.clone(),
        shutdown_rx.clone(),
    )));
    tasks.push(tokio::spawn(run_enforcer(
        classes,
        state_rx.clone(),
        readiness.clone(),
        metrics.clone(),
        resync,
        shutdown_rx.clone(),
    )));
    let state_rx_for_status = state_rx.clone();
    let syncer = PodSyncer::new(
        client,
        settings.target.clone(),
        metrics,
        readiness.clone(),
        state_rx,
        settings.pod_workers,
    );
    let status = crate::status::router(
        &settings.target.url,
        &settings.target.tenant,
        state_rx_for_status,
        syncer.board(),
    );
    tasks.push(tokio::spawn(syncer.run(shutdown_rx.clone())));
    let admin_shutdown = {
        let mut rx = shutdown_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let admin = tokio::spawn(serve_admin(
        admin_listener,
        readiness.clone(),
        registry,
        Some(status),
        admin_shutdown,
    ));

    let signal = signal.await;
    tracing::info!(signal, "shutting down");
    readiness.shutting_down();
    let _ = shutdown_tx.send(true);
    let drained = tokio::time::timeout(settings.shutdown_grace, async {
        for task in tasks {
            let _ = task.await;
        }
        let _ = admin.await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(grace = ?settings.shutdown_grace, "shutdown grace period over; exiting with work in flight");
    }
    tracing::info!("stopped");
    Ok(())
}
