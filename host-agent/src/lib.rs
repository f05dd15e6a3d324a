//! The host agent: the policy decision point of rcsync, next to the host cluster.
//!
//! ```text
//!  host API server ──watch RuntimeClasses──► index (per-tenant views) ──► grpc: Sync / CheckPod
//!  tenants.yaml ──config──► tenants (selector, patches, tokens) ─┘          PodSync ──► host Pods
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod check;
pub mod tenants;
