//! rcsync core: the rules of RuntimeClass sync, free of gRPC servers and Kubernetes watches.
//!
//! ```text
//!   tenants.yaml / vcluster.yaml ──config──► Tenant { name, hostNamespace, RuntimeClassSync }
//!                                                         │ selector (selector::LabelSelector)
//!   host RuntimeClass labels ─────────────────────────────┴──► selected? ──► content version (version)
//!   virtual Pod (name, ns) ──naming──► host Pod name + vcluster.loft.sh labels/annotations
//!   agents ──admin──► /livez /readyz /metrics (tls: HTTPS, rotating files)   telemetry: logging, signals
//!   agents ──kube_client──► api_transport ──► API server (HTTP/2, watches sharing connections)
//! ```
//!
//! Everything here is pure and unit-tested; the agents wire it to kube-rs and tonic.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
#[cfg(feature = "kube")]
pub mod api_transport;
pub mod config;
#[cfg(feature = "kube")]
pub mod gates;
#[cfg(feature = "kube")]
pub mod kube_client;
pub mod labels;
pub mod naming;
pub mod patches;
#[cfg(feature = "kube")]
pub mod pod_refs;
pub mod script;
pub mod selector;
pub mod status_client;
pub mod telemetry;
pub mod tls;
pub mod token_file;
pub mod version;

pub use config::{
    AnnotationPattern, ConfigError, CsiDriverName, EnforcedToleration, InlineVolumeType, PodPolicy,
    PodSecurityLevel, RuntimeClassSync, TaintEffect, Tenant, TenantLimits, TenantName, TenantsFile,
};
pub use selector::LabelSelector;
