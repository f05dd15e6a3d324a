//! The gRPC servers of the host agent: RuntimeClassSync, PodSync, gRPC health and reflection (v1 and
//! v1alpha), over TLS or mutual TLS when configured.

pub mod auth;
pub mod body_budget;
pub mod budget_status;
pub mod claim_status;
pub mod connection_limit;
pub mod framing;
pub mod host_events;
pub mod limits;
pub mod lost_copies;
pub mod peer;
pub mod pod_status;
pub mod pods;
pub mod serve;
pub mod status_stream;
pub mod sync;
pub mod tls;

use rcsync_core::admin::Readiness;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// The rcsync methods' paths, as `rcsync_grpc_requests_total` labels them.
pub(crate) const METHODS: [&str; 13] = [
    sync::SYNC,
    sync::CHECK_POD,
    pods::APPLY_POD,
    pods::DELETE_POD,
    pods::WATCH,
    pods::APPLY_BUDGET,
    pods::DELETE_BUDGET,
    pods::LIST_BUDGETS,
    pods::APPLY_CLAIM,
    pods::DELETE_CLAIM,
    pods::LIST_CLAIMS,
    pods::WATCH_CLAIMS,
    pods::WATCH_BUDGETS,
];

/// TLS files of the gRPC server.
pub use rcsync_core::tls::TlsFiles;

/// Keeps gRPC health (`""` and every rcsync service) in step with readiness: NOT_SERVING until
/// ready, and again from the moment shutdown begins.
pub async fn follow_readiness(reporter: HealthReporter, readiness: Readiness, services: &[&str]) {
    let mut ready = readiness.subscribe();
    loop {
        let status = if *ready.borrow_and_update() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for service in std::iter::once(&"").chain(services) {
            reporter.set_service_status(*service, status).await;
        }
        if ready.changed().await.is_err() {
            return;
        }
    }
}
