//! The host agent: the policy decision point of rcsync, next to the host cluster.
//!
//! ```text
//!  host API server ──watch RuntimeClasses──► index::ClassIndex ──per-tenant TenantView──► Views
//!  tenants.yaml (SIGHUP reload) ──► TenantsState (selectors, tokens) ─┘                    │
//!                                                                                          ▼ ViewSource
//!  virtual agents ──gRPC (TLS, bearer/mTLS)──► grpc::auth ──► grpc::sync: Sync stream, CheckPod
//!                                                           └─► grpc::pods: ApplyPod (re-checked,
//!                                                               translate) / DeletePod / WatchPodStatus
//!                                                               (host Pods' status, and their events)
//!  operators ──HTTP──► /livez /readyz /metrics (rcsync_core::admin), /tenants (status)
//! ```
//!
//! CheckPod is answered from the tenant's in-memory view; nothing on a request path calls the API
//! server.
//!
//! Three runtimes keep it that fast while changes fan out: the main runtime serves unary calls
//! (CheckPod, PodSync), the admin port and the watches' I/O; the index runtime handles each host
//! change; the streams runtime its fan-out, the Sync streams and the connections that carry them
//! (`grpc::serve` moves a connection there, socket included, at its first Sync request). A change
//! reaching a thousand tenants never queues ahead of a CheckPod.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod check;
pub mod grpc;
pub mod index;
pub mod metrics;
pub mod pod_security;
pub mod rbac;
pub mod run;
pub mod status;
pub mod status_cmd;
pub mod tenants;
pub mod translate;
pub mod view;
