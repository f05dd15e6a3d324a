//! Where the virtual agent stands, for operators: `GET /status` on the admin port (JSON), and
//! the `virtual-agent status` command that prints it as tables.
//!
//! ```text
//!  SyncState (classes) ───────────┐
//!  PodBoard (shards) ─────────────┤
//!  ObjectBoards (pdb, pvc syncers) ┴─► GET /status ──► virtual-agent status [--admin URL] [-o table|json|yaml]
//! ```

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use rcsync_core::status_client::{Output, Report, fetch, finish, render, table, text};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::classes::SyncState;
use crate::host_calls::ObjectBoard;
use crate::leader::Role;
use crate::pods::PodBoard;

#[derive(Clone)]
struct StatusState {
    host_agent: Arc<str>,
    /// What the Pod syncer copies and adds beyond the Pod (settings, shown as they are).
    pod_extras: Arc<Value>,
    tenant: Arc<str>,
    identity: Arc<str>,
    sync: watch::Receiver<SyncState>,
    pods: PodBoard,
    budgets: ObjectBoard,
    claims: ObjectBoard,
    role: watch::Receiver<Role>,
}

/// Which host events the agent copies and where Pods on the host reach the virtual API server
/// (`--host-events`, `--pod-api-server`), as `/status` shows them.
#[derive(Clone, Debug)]
pub struct PodExtras {
    /// `all`, `warnings` or `none`.
    pub host_events: &'static str,
    /// `HOST:PORT`, when Pods on the host get tokens of the virtual cluster.
    pub pod_api_server: Option<String>,
}

/// What the agent's tasks publish for `/status` while this replica leads.
#[derive(Clone, Default)]
pub struct Boards {
    /// Where each Pod stands (the Pod syncer's shards).
    pub pods: PodBoard,
    /// Where each PodDisruptionBudget stands (the budget syncer).
    pub budgets: ObjectBoard,
    /// Where each PersistentVolumeClaim stands (the claim syncer).
    pub claims: ObjectBoard,
}

/// The `/status` route. `identity` is this replica's holder identity in the leader Lease.
pub fn router(
    host_agent: &str,
    pod_extras: PodExtras,
    tenant: &str,
    identity: &str,
    sync: watch::Receiver<SyncState>,
    boards: Boards,
    role: watch::Receiver<Role>,
) -> Router {
    Router::new()
        .route("/status", get(status_json))
        .with_state(StatusState {
            host_agent: host_agent.into(),
            pod_extras: Arc::new(json!({
                "hostEvents": pod_extras.host_events,
                "podApiServer": pod_extras.pod_api_server,
            })),
            tenant: tenant.into(),
            identity: identity.into(),
            sync,
            pods: boards.pods,
            budgets: boards.budgets,
            claims: boards.claims,
            role,
        })
}

async fn status_json(State(state): State<StatusState>) -> axum::Json<Value> {
    let sync = state.sync.borrow().clone();
    let role = state.role.borrow().clone();
    let board = state.pods.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let count = |want: &str| board.values().filter(|(s, _)| *s == want).count();
    let not_synced: Vec<Value> = board
        .iter()
        .filter(|(_, (s, _))| *s != "synced")
        .map(|((ns, name), (s, why))| json!({"namespace": ns, "name": name, "state": s, "reason": why}))
        .collect();
    axum::Json(json!({
        "hostAgent": &*state.host_agent,
        "tenant": &*state.tenant,
        "identity": &*state.identity,
        "leading": role == Role::Leading,
        "leader": role.leader(&state.identity),
        "connected": sync.connected,
        "syncEnabled": sync.enabled,
        "classes": sync.synced,
        "pods": {
            "synced": count("synced"),
            "blocked": count("blocked"),
            "waiting": count("waiting"),
            "orphaned": count("orphaned"),
            "failing": count("failing"),
            "notSynced": not_synced,
        },
        "podExtras": &*state.pod_extras,
        "disruptionBudgets": standings(&state.budgets, "held", "notHeld"),
        "persistentVolumeClaims": standings(&state.claims, "made", "notMade"),
    }))
}

/// A board's objects as `/status` shows them: how many are `done`, and each other one (its state
/// and why) under `others`.
fn standings(board: &ObjectBoard, done: &str, others: &str) -> Value {
    let board = board.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let not_done: Vec<Value> = board
        .iter()
        .filter(|(_, (s, _))| *s != done)
        .map(|((ns, name), (s, why))| json!({"namespace": ns, "name": name, "state": s, "reason": why}))
        .collect();
    json!({done: board.values().filter(|(s, _)| *s == done).count(), others: not_done})
}

/// The table of a board's objects (`standings`) as `virtual-agent status` prints it: how many
/// are `done` (`what` they are), then the others, when there are any.
fn standings_table(doc: &Value, what: &str, kind_column: &str, done: &str, others: &str) -> String {
    let not_done = doc[others].as_array().cloned().unwrap_or_default();
    let mut out = String::new();
    if doc[done].as_u64().unwrap_or(0) > 0 || !not_done.is_empty() {
        out.push_str(&format!("\n{what}: {}\n", text(&doc[done])));
    }
    if !not_done.is_empty() {
        let mut rows = vec![
            ["NAMESPACE", kind_column, "STATE", "REASON"]
                .map(String::from)
                .to_vec(),
        ];
        for o in &not_done {
            rows.push(vec![
                text(&o["namespace"]),
                text(&o["name"]),
                text(&o["state"]),
                text(&o["reason"]),
            ]);
        }
        out.push_str(&table(&rows));
    }
    out
}

/// Reads the agent at `admin` and reports its state; exit 1 when not ready, 2 unreachable.
pub fn status(admin: &rcsync_core::status_client::AdminTarget<'_>, output: Output) -> Report {
    let (ready, readiness, doc) = match fetch(admin, "/status", "virtual agent") {
        Ok(fetched) => fetched,
        Err(report) => return report,
    };
    let stdout = match output {
        Output::Table => {
            let sync = match doc["syncEnabled"].as_bool() {
                Some(true) => "enabled",
                Some(false) => "disabled",
                None => "<unknown>",
            };
            let pods = &doc["pods"];
            let mut out = table(&[
                [
                    "HOST-AGENT",
                    "TENANT",
                    "LEADER",
                    "CONNECTED",
                    "SYNC",
                    "CLASSES",
                    "SYNCED",
                    "BLOCKED",
                    "WAITING",
                    "ORPHANED",
                    "FAILING",
                ]
                .map(String::from)
                .to_vec(),
                vec![
                    text(&doc["hostAgent"]),
                    text(&doc["tenant"]),
                    doc["leader"].as_str().unwrap_or("<none>").to_string(),
                    text(&doc["connected"]),
                    sync.to_string(),
                    doc["classes"].as_array().map_or(0, Vec::len).to_string(),
                    text(&pods["synced"]),
                    text(&pods["blocked"]),
                    text(&pods["waiting"]),
                    text(&pods["orphaned"]),
                    text(&pods["failing"]),
                ],
            ]);
            let not_synced = pods["notSynced"].as_array().cloned().unwrap_or_default();
            if !not_synced.is_empty() {
                let mut rows = vec![["NAMESPACE", "POD", "STATE", "REASON"].map(String::from).to_vec()];
                for p in &not_synced {
                    rows.push(vec![
                        text(&p["namespace"]),
                        text(&p["name"]),
                        text(&p["state"]),
                        text(&p["reason"]),
                    ]);
                }
                out.push('\n');
                out.push_str(&table(&rows));
            }
            out.push_str(&standings_table(
                &doc["disruptionBudgets"],
                "disruption budgets held on the host",
                "DISRUPTION-BUDGET",
                "held",
                "notHeld",
            ));
            out.push_str(&standings_table(
                &doc["persistentVolumeClaims"],
                "persistent volume claims made on the host",
                "PERSISTENT-VOLUME-CLAIM",
                "made",
                "notMade",
            ));
            out
        }
        other => render(&doc, other),
    };
    finish(stdout, ready, &readiness, "virtual agent")
}
