//! devcluster: an in-memory Kubernetes API server for development and tests.
//!
//! It is **not** a Kubernetes distribution: of the controllers only what rcsync's tests need runs
//! (simulated nodes with a scheduler and a kubelet stand-in when asked for, `nodes`; ResourceQuota
//! status, `quota`). It exists because rcsync's agents must be tested through the real Kubernetes
//! client stack (kube-rs watchers, kubectl) on machines where no kube-apiserver can run. What it
//! does, it does as kube-apiserver does: resourceVersions, watches (bookmarks, watch-list, 410
//! Gone), label and field selectors, pagination, optimistic concurrency, JSON/merge/strategic
//! patches, server-side apply with managedFields and conflicts, schema-driven field validation,
//! deletion with finalizers and owner references, Status errors, Tables, discovery and OpenAPI v3
//! (`kubectl explain`), protobuf request bodies for kubectl's imperative creates, an optional
//! state file, the admission the spec relies on (RuntimeClass for Pods, immutable `handler`;
//! LimitRange for containers, `limit_range`; ResourceQuota for Pods: their count and compute
//! resources, `quota`; DefaultStorageClass for PersistentVolumeClaims, and with simulated nodes a
//! provisioner binding them, `claims`), and
//! CustomResourceDefinitions whose kinds are then served like the built-in ones (`crd`).
//!
//! ```text
//!  kubectl / kube-rs ──HTTPS (h1/h2, bearer token)──► server ──► api (routing, verbs, Tables)
//!                                                                  │ query (selectors, pages), patch,
//!                                                                  │ managed (field ownership, apply),
//!                                                                  │ admission (defaults, validation,
//!                                                                  │   RuntimeClass, LimitRange and
//!                                                                  │   quota admission),
//!                                                                  │ deletion (finalizers, owners)
//!                                                                  ▼
//!                                                      store (one versioned map + change history)
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admission;
pub mod affinity;
pub mod api;
pub mod auth;
pub mod claims;
pub mod crd;
pub mod deletion;
mod discovery;
pub mod disruption;
pub mod ephemeral;
pub mod events;
pub mod limit_range;
pub mod managed;
pub mod nodes;
pub mod openapi;
pub mod patch;
pub mod pki;
pub mod protobuf;
pub mod quantity;
mod query;
pub mod quota;
pub mod resize;
pub mod resources;
pub mod server;
pub mod status;
pub mod store;
pub mod table;
pub mod up;

pub use server::{DevCluster, ServerOptions};
