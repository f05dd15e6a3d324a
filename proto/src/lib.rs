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

/// The `google.rpc.ErrorInfo` domain of the reasons rcsync's errors carry.
pub const ERROR_DOMAIN: &str = "rcsync.io";

/// The `google.rpc.ErrorInfo` reason of an ApplyPod the host API server refused for the host
/// namespace's ResourceQuota (FAILED_PRECONDITION): room is made when one of the tenant's host
/// Pods goes.
pub const HOST_QUOTA_EXCEEDED: &str = "HOST_QUOTA_EXCEEDED";

/// The `google.rpc.ErrorInfo` reason of an ApplyPod the host API server refused for the Pod as it
/// stands (FAILED_PRECONDITION): invalid there, denied by an admission webhook or the host's Pod
/// Security, or wanting what a quota requires (`must specify requests.cpu`). The same Pod gets the
/// same answer until the Pod, or the host's policy, changes: worth retrying rarely, and at once
/// when the Pod changes. Refusals the host may cure any moment (the Pod's RuntimeClass missing
/// there, the host agent's own permissions, the host namespace being deleted) carry no reason.
pub const HOST_POD_REFUSED: &str = "HOST_POD_REFUSED";

/// The largest request message the host agent decodes (Sync ACKs and NACKs, CheckPod, PodSync
/// calls): gRPC's usual 4 MiB. An `ApplyPodRequest` carries the Pod and every ConfigMap and Secret
/// it references, so a virtual agent checks a request's size against this before sending it.
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// The largest Sync response a virtual agent decodes. The first response carries the tenant's
/// whole state in one message, which passes 4 MiB at a few thousand classes with many labels; the
/// host agent is trusted, so the bound is only against a runaway message.
pub const MAX_SYNC_RESPONSE_BYTES: usize = 256 * 1024 * 1024;
