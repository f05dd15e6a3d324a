//! `GET /tenants` on the admin port: what each tenant is offered and why the rest is not, and the
//! last error its virtual side reported (NACK). For operators; no secrets (tokens) are shown.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::grpc::sync::LastErrors;
use crate::index::{TenantsState, ViewSource, Views};
use crate::metrics::Metrics;
use crate::view::ClassState;

#[derive(Clone)]
struct StatusState {
    views: Views,
    tenants: watch::Receiver<Arc<TenantsState>>,
    last_errors: LastErrors,
    metrics: Metrics,
}

/// The `/tenants` route.
pub fn router(
    views: Views,
    tenants: watch::Receiver<Arc<TenantsState>>,
    last_errors: LastErrors,
    metrics: Metrics,
) -> Router {
    Router::new()
        .route("/tenants", get(tenants_status))
        .with_state(StatusState {
            views,
            tenants,
            last_errors,
            metrics,
        })
}

async fn tenants_status(State(state): State<StatusState>) -> axum::Json<Value> {
    let tenants = state.tenants.borrow().clone();
    let hosts = state.views.host_classes();
    let errors = state
        .last_errors
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let list: Vec<Value> = tenants
        .file
        .tenants()
        .iter()
        .map(|t| {
            let view = state.views.current(&t.name);
            let mut offered = serde_json::Map::new();
            let mut not_offered = serde_json::Map::new();
            let states = view
                .iter()
                .flat_map(|v| hosts.iter().map(|h| (h.name.to_string(), v.state_of(h))));
            for (host, class_state) in states {
                match &class_state {
                    ClassState::Offered(name) => {
                        offered.insert(host, json!(name));
                    }
                    ClassState::DoesNotMatch => {
                        not_offered.insert(host, json!("does not match the selector"));
                    }
                    ClassState::Terminating => {
                        not_offered.insert(host, json!("terminating on the host"));
                    }
                    ClassState::PatchFailed(why) => {
                        not_offered.insert(host, json!(format!("patch failed: {why}")));
                    }
                }
            }
            json!({
                "name": t.name.as_str(),
                "hostNamespace": t.host_namespace,
                "syncEnabled": t.runtime_classes.enabled,
                "selector": t.runtime_classes.selector.as_ref().map(ToString::to_string),
                "offered": offered,
                "notOffered": not_offered,
                "streams": state.metrics.streams_open.get_or_create(&Metrics::tenant(t.name.as_str())).get(),
                "lastAckSecondsAgo": errors
                    .get(&t.name)
                    .and_then(|a| a.last_ack)
                    .and_then(|at| at.elapsed().ok())
                    .map(|age| age.as_secs()),
                "lastError": errors.get(&t.name).and_then(|a| a.last_nack.clone()),
            })
        })
        .collect();
    axum::Json(json!({"synced": state.views.is_synced(), "tenants": list}))
}
