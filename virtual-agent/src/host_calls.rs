//! What the object syncers (PodDisruptionBudgets, `budgets`; PersistentVolumeClaims, `claims`)
//! share in calling the host agent: the client, what a failed call means, the event a refusal
//! records, and the wait for the next due object.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::runtime::events::{Event as KubeEvent, EventType};
use prometheus_client::metrics::counter::Counter;
use rcsync_proto::v1::PodRefusalReason;
use tokio::time::Instant;
use tonic_types::StatusExt as _;

use crate::connect::{PodClient, SharedClients};
use crate::pods::Key;

/// Where each virtual object a syncer takes to the host stands, for `/status`: a state word
/// (`held`, `made`, `refused`, `waiting`, `failing`) and why (empty while this replica does not
/// lead).
pub type ObjectBoard = Arc<Mutex<BTreeMap<Key, (&'static str, String)>>>;

/// Shows `standing` for `key` on `board` (`None`: the object is gone).
pub(crate) fn post(board: &ObjectBoard, key: &Key, standing: Option<(&'static str, String)>) {
    let mut board = board.lock().unwrap_or_else(|e| e.into_inner());
    match standing {
        Some(standing) => board.insert(key.clone(), standing),
        None => board.remove(key),
    };
}

/// Clears `board` (a term ends: what it would hold is the next leader's to say).
pub(crate) fn clear(board: &ObjectBoard) {
    board.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// The PodSync client of `connection`'s current connection (made now if there is none).
pub(crate) async fn pod_client(connection: &SharedClients) -> Result<PodClient, tonic::Status> {
    let current = connection
        .get()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    Ok(current.pods)
}

/// Notes a call that failed with `status` (trying to `attempt`). Over the tenant's rate limit it
/// returns the instant before which nothing is to be sent (the delay the host agent asked for,
/// one second without); any other failure is counted in `errors`, and drops the connection when
/// a new one may cure it.
pub(crate) async fn call_failed(
    connection: &SharedClients,
    errors: &Counter,
    status: &tonic::Status,
    attempt: &str,
) -> Option<Instant> {
    if status.code() == tonic::Code::ResourceExhausted {
        let delay = status
            .get_details_retry_info()
            .and_then(|info| info.retry_delay)
            .unwrap_or(Duration::from_secs(1));
        return Some(Instant::now() + delay);
    }
    errors.inc();
    tracing::debug!(code = ?status.code(), "the host agent did not {attempt}: {}", status.message());
    if crate::connect::a_new_connection_may_cure(status.code())
        && let Ok(current) = connection.get().await
    {
        connection.drop_connection(current.generation).await;
    }
    None
}

/// The `SyncError` event that shows a host agent's refusal on the virtual object.
pub(crate) fn refusal_event(reason: PodRefusalReason, message: String) -> KubeEvent {
    KubeEvent {
        type_: EventType::Warning,
        reason: "SyncError".into(),
        note: Some(message),
        action: format!(
            "Sync/{}",
            reason
                .as_str_name()
                .trim_start_matches("POD_REFUSAL_REASON_")
                .to_lowercase()
        ),
        secondary: None,
    }
}

/// Resolves at `at`; never without one.
pub(crate) async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
