//! The gRPC contract of rcsync, package `rcsync.v1`.
//!
//! ```text
//!  proto/rcsync/v1/*.proto ──protox (build.rs)──► FileDescriptorSet ──► tonic/prost codegen
//!                                                        └──────────► FILE_DESCRIPTOR_SET (reflection)
//! ```
//!
//! * [`v1::runtime_class_sync_server`] / [`v1::runtime_class_sync_client`]: `Sync` (delta stream of a
//!   tenant's RuntimeClasses) and `CheckPod` (may this Pod sync?).
//! * [`v1::pod_sync_server`] / [`v1::pod_sync_client`]: `ApplyPod`, `DeletePod`, `WatchPodStatus`.
//!
//! Every message and field is documented in the `.proto` files, which are the API other services call.
#![forbid(unsafe_code)]

/// Generated types and services of package `rcsync.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("rcsync.v1");
}

/// Conversions between the typed messages and k8s-openapi types.
#[cfg(feature = "k8s")]
pub mod convert;

/// The encoded `FileDescriptorSet` of all rcsync protos (with imports), for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/rcsync_descriptor.bin"));

/// Fully-qualified gRPC service name of `RuntimeClassSync`, as health checks and reflection name it.
pub const RUNTIME_CLASS_SYNC_SERVICE: &str = "rcsync.v1.RuntimeClassSync";

/// Fully-qualified gRPC service name of `PodSync`.
pub const POD_SYNC_SERVICE: &str = "rcsync.v1.PodSync";
