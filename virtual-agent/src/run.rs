//! Wiring of `virtual-agent`: kube client, leader election, and per leadership term the class
//! sync, enforcer and Pod syncer; admin, shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::node::v1::RuntimeClass;
use kube::Api;
use kube::runtime::events::{Recorder, Reporter};
use prometheus_client::registry::Registry;
use rcsync_core::admin::{AdminAccess, AdminServing, Readiness, serve_admin};
use rcsync_core::telemetry::termination_signal;
use tokio::net::TcpListener;
use tokio::sync::watch;

use k8s_openapi::api::coordination::v1::Lease;
use tokio::task::JoinSet;

use crate::budgets::{BUDGET_REPORTER, BudgetSyncer};
use crate::claims::{CLAIM_REPORTER, ClaimSyncer};
use crate::classes::{Applier, CLASSES_LISTED, INITIAL_STATE_APPLIED, SyncState, run_enforcer, run_sync};
use crate::connect::{HostAgentTarget, SharedClients};
use crate::leader::{Elector, Fence, LEASE_NAME, LeaseSettings, Role};
use crate::metrics::Metrics;
use crate::pods::{PODS_LISTED, PodSyncer};
use crate::status::Boards;

/// Everything `virtual-agent` needs to run.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Kubeconfig of the virtual cluster; in-cluster (or $KUBECONFIG) when absent.
    pub kubeconfig: Option<PathBuf>,
    /// The host agent and this tenant's credentials.
    pub target: HostAgentTarget,
    /// Admin HTTP address.
    pub admin_listen: SocketAddr,
    /// The bearer token file guarding the admin port's `/metrics` and `/status`.
    pub admin_token_file: Option<PathBuf>,
    /// The admin port's TLS files (no client CA): HTTPS when set.
    pub admin_tls: rcsync_core::tls::TlsFiles,
    /// How many connections the admin port keeps open at once.
    pub admin_max_connections: std::num::NonZeroUsize,
    /// How long to wait for work in flight after SIGTERM.
    pub shutdown_grace: Duration,
    /// Pods synced in parallel (each Pod's operations stay in order).
    pub pod_workers: usize,
    /// Which host events about synced Pods to copy to the virtual Pods.
    pub host_events: rcsync_proto::v1::HostEvents,
    /// Where Pods on the host reach the virtual API server (tokens for service account volumes).
    pub pod_api_server: Option<crate::pods::tokens::PodApiServer>,
    /// Leader election: only the replica holding the Lease writes.
    pub lease: LeaseSettings,
}

/// Readiness check of the leader election: passes once the Lease was read; its detail says who
/// leads.
pub const LEADER_ELECTION: &str = "leader-election";

/// The checks that apply only while this replica leads (a standby does no work to check).
const LEADER_CHECKS: &[&str] = &[CLASSES_LISTED, PODS_LISTED, INITIAL_STATE_APPLIED];

/// What every leadership term shares with the admin server.
struct Shared {
    client: kube::Client,
    settings: Settings,
    metrics: Metrics,
    readiness: Readiness,
    state: watch::Sender<SyncState>,
    /// What the term's tasks publish for `/status`.
    boards: Boards,
}

/// Runs the virtual agent until SIGTERM or SIGINT.
///
/// ```text
///  Elector ──Role──► Following: no work; /readyz ok "standby, leader is X"; rcsync_leader 0
///                └─► Leading:   one term = class sync + enforcer + Pod syncer (a JoinSet)
///  lease lost ──► the term's tasks are aborted at once (fencing), back to standby
///  SIGTERM ──► the term drains (grace) ──► the Lease is released ──► exit
/// ```
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let signal = termination_signal();
    settings.target.validate()?;
    let admin_access = match &settings.admin_token_file {
        Some(path) => AdminAccess::token_file(path.clone())?,
        None => AdminAccess::open(),
    };
    let admin_tls = rcsync_core::tls::ServingTls::load(
        &settings.admin_tls,
        rcsync_core::tls::TlsFlags::ADMIN,
        &[b"h2", b"http/1.1"],
    )?;
    if !settings.target.is_tls() {
        tracing::warn!(url = %settings.target.display(), "connecting to the host agent in plaintext: the token crosses the network unencrypted");
    }
    // Two clients: the elector's, which must write the Lease while standing by, and the work's,
    // which writes only while the fence (the leader's renew deadline) allows.
    let fence = Fence::default();
    let api_metrics = rcsync_core::api_transport::ApiTransportMetrics::default();
    let lease_client =
        rcsync_core::kube_client::kube_client(settings.kubeconfig.as_deref(), &api_metrics).await?;
    let client = rcsync_core::kube_client::fenced_kube_client(
        settings.kubeconfig.as_deref(),
        fence.write_fence(),
        &api_metrics,
    )
    .await?;
    let mut settings = settings;
    settings.target = settings.target.fenced(fence.clone());
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    api_metrics.register(&mut registry);
    let readiness = Readiness::new(&[LEADER_ELECTION]);
    rcsync_core::admin::register_ready_gauge(&mut registry, &readiness);
    let registry = Arc::new(registry);
    let (state_tx, state_rx) = watch::channel(SyncState::default());
    let (role_tx, mut role_rx) = watch::channel(Role::Unknown);
    let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
    let (release_tx, release_rx) = watch::channel(false);
    let admin_listener = TcpListener::bind(settings.admin_listen)
        .await
        .with_context(|| format!("binding the admin address {}", settings.admin_listen))?;
    tracing::info!(
        admin = %admin_listener.local_addr()?,
        host_agent = %settings.target.display(),
        tenant = %settings.target.tenant,
        identity = %settings.lease.identity,
        lease_namespace = %settings.lease.namespace,
        "starting"
    );
    let leases: Api<Lease> = Api::namespaced(lease_client, &settings.lease.namespace);
    let elector = tokio::spawn(Elector::new(leases, settings.lease.clone(), role_tx, fence).run(release_rx));
    let boards = Boards::default();
    let status = crate::status::router(
        &settings.target.display(),
        crate::status::PodExtras {
            host_events: match settings.host_events {
                rcsync_proto::v1::HostEvents::All => "all",
                rcsync_proto::v1::HostEvents::Warnings => "warnings",
                rcsync_proto::v1::HostEvents::Unspecified => "none",
            },
            pod_api_server: settings.pod_api_server.as_ref().map(ToString::to_string),
        },
        &settings.target.tenant,
        &settings.lease.identity,
        state_rx,
        boards.clone(),
        role_rx.clone(),
    );
    let admin_shutdown = {
        let mut rx = admin_stop_rx;
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    if let Some(admin_tls) = &admin_tls {
        tokio::spawn(admin_tls.clone().reload_on_change(metrics.tls_reloads.count()));
    }
    let admin = tokio::spawn(serve_admin(
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
    let shared = Shared {
        client,
        settings,
        metrics,
        readiness: readiness.clone(),
        state: state_tx,
        boards,
    };

    tokio::pin!(signal);
    let mut term: Option<Term> = None;
    let signal = loop {
        let role = role_rx.borrow_and_update().clone();
        match (&role, term.is_some()) {
            (Role::Leading, false) => term = Some(shared.start_term()),
            (Role::Leading, true) => {}
            (_, true) => {
                if let Some(t) = term.take() {
                    shared.abort_term(t).await;
                }
            }
            (_, false) => {}
        }
        shared.show_role(&role);
        tokio::select! {
            signal = &mut signal => break signal,
            changed = role_rx.changed() => if changed.is_err() {
                anyhow::bail!("the leader election stopped");
            },
        }
    };
    tracing::info!(signal, "shutting down");
    readiness.shutting_down();
    if let Some(term) = term.take() {
        let _ = term.stop.send(true);
        let mut tasks = term.tasks;
        let drained = tokio::time::timeout(shared.settings.shutdown_grace, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(grace = ?shared.settings.shutdown_grace, "shutdown grace period over; stopping work in flight");
            tasks.shutdown().await;
        }
    }
    // Only now that nothing writes: hand the Lease over.
    let _ = release_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(2), elector).await;
    let _ = admin_stop_tx.send(true);
    let _ = admin.await;
    tracing::info!("stopped");
    Ok(())
}

/// One leadership term: the tasks that write, and their graceful stop.
struct Term {
    tasks: JoinSet<()>,
    stop: watch::Sender<bool>,
}

impl Shared {
    /// Starts the work of a leader.
    fn start_term(&self) -> Term {
        tracing::info!(identity = %self.settings.lease.identity, "leading: starting class sync, enforcer and Pod sync");
        self.metrics.leader.set(1);
        self.metrics.leader_terms_total.inc();
        for check in LEADER_CHECKS {
            self.readiness.set(check, false);
        }
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let classes: Api<RuntimeClass> = Api::all(self.client.clone());
        let resync = Arc::new(tokio::sync::Notify::new());
        tasks.spawn(run_sync(
            self.settings.target.clone(),
            Applier::new(classes.clone(), self.metrics.clone()),
            self.state.clone(),
            self.readiness.clone(),
            self.metrics.clone(),
            resync.clone(),
            stop_rx.clone(),
        ));
        tasks.spawn(run_enforcer(
            classes,
            self.state.subscribe(),
            self.readiness.clone(),
            self.metrics.clone(),
            resync,
            stop_rx.clone(),
        ));
        // One connection for the Pods', the budgets' and the claims' calls.
        let connection = Arc::new(SharedClients::new(self.settings.target.clone()));
        tasks.spawn(
            ClaimSyncer::new(
                self.client.clone(),
                connection.clone(),
                Recorder::new(
                    self.client.clone(),
                    Reporter {
                        controller: CLAIM_REPORTER.into(),
                        instance: Some(format!("{CLAIM_REPORTER}-{}", self.settings.target.tenant)),
                    },
                ),
                self.metrics.clone(),
                self.state.subscribe(),
                self.boards.claims.clone(),
            )
            .with_host_events(self.settings.host_events)
            .run(stop_rx.clone()),
        );
        tasks.spawn(
            BudgetSyncer::new(
                self.client.clone(),
                connection.clone(),
                Recorder::new(
                    self.client.clone(),
                    Reporter {
                        controller: BUDGET_REPORTER.into(),
                        instance: Some(format!("{BUDGET_REPORTER}-{}", self.settings.target.tenant)),
                    },
                ),
                self.metrics.clone(),
                self.state.subscribe(),
                self.boards.budgets.clone(),
            )
            .run(stop_rx.clone()),
        );
        let syncer = PodSyncer::new(
            self.client.clone(),
            connection,
            self.metrics.clone(),
            self.readiness.clone(),
            self.state.subscribe(),
            self.settings.pod_workers,
            self.boards.pods.clone(),
        )
        .with_host_events(self.settings.host_events)
        .with_pod_api_server(self.settings.pod_api_server.clone());
        tasks.spawn(syncer.run(stop_rx));
        Term { tasks, stop }
    }

    /// Ends a term whose lease is lost: every task is aborted at once (no write after this
    /// returns), and what the term published is cleared.
    async fn abort_term(&self, mut term: Term) {
        term.tasks.shutdown().await;
        tracing::warn!(identity = %self.settings.lease.identity, "not leading: all writes stopped");
        self.metrics.leader.set(0);
        self.metrics.host_connected.set(0);
        // What the term held is the next leader's to report (dashboards take the maximum).
        self.metrics.synced_classes.set(0);
        self.readiness.remove(LEADER_CHECKS);
        self.state.send_replace(SyncState::default());
        self.boards.pods.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Shows the role in `/readyz` and the gauge. A standby behind a leader is ready (rollouts
    /// proceed); a replica about to lead is not, until its term has done its initial work.
    fn show_role(&self, role: &Role) {
        let me = &self.settings.lease.identity;
        let (ok, detail) = match role {
            Role::Unknown => (
                false,
                format!("reading Lease {}/{LEASE_NAME}", self.settings.lease.namespace),
            ),
            Role::Leading => (true, format!("leading as {me}")),
            // About to take the Lease (again): not ready until its term has done its work.
            Role::Following(Some(leader)) if leader == me => (false, "taking the Lease back".to_string()),
            Role::Following(Some(leader)) => (true, format!("standby, leader is {leader}")),
            Role::Following(None) => (false, "no leader: taking the Lease".to_string()),
        };
        self.readiness.set_with_detail(LEADER_ELECTION, ok, detail);
        if *role != Role::Leading {
            self.metrics.leader.set(0);
        }
    }
}
