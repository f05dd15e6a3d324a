//! The virtual agent: runs next to a virtual cluster and applies what the host agent decides.
//!
//! ```text
//!                     ┌──────────── Sync stream ◄──────────── host agent
//!  classes::run_sync ─┤ apply upserts/removals, ACK/NACK ──► virtual RuntimeClasses
//!                     └─► SyncState (watch) ──► classes::run_enforcer: delete tenant-made classes
//!                                         └──► pods::PodSyncer: CheckPod ─► ApplyPod / SyncWarning event
//!  WatchPodStatus ──► pods::PodSyncer ──► virtual Pod status; host Pod gone ──► virtual Pod deleted
//!                                     └──► host events ──► events about the virtual Pods
//!  virtual PodDisruptionBudgets ──► budgets::BudgetSyncer ──► Apply/DeleteDisruptionBudget (host drains respect them)
//!  operators ──HTTP──► /livez /readyz /metrics
//! ```
//!
//! The virtual agent holds no host credentials: everything on the host goes through the host
//! agent, which re-checks it.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod budgets;
pub mod claims;
pub mod classes;
pub mod connect;
pub mod host_calls;
pub mod host_events;
pub mod leader;
pub mod metrics;
pub mod pods;
pub mod rbac;
pub mod run;
pub mod status;
pub mod whole_request;
