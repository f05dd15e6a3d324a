//! A tenant's PersistentVolumeClaims made on the host (`sync.toHost.persistentVolumeClaims`), so
//! its Pods (a StatefulSet's, say) can mount storage the host provisions.
//!
//! ```text
//!  ApplyClaim(claim) ──auth, rate──► enabled for the tenant? ──no──► refusal DISABLED
//!     ──► translate (name; volumeName, selector, foreign data sources refused: UNSUPPORTED)
//!     ──► a clone's source claim is the tenant's own host copy? ──no──► refusal NAME_IN_USE
//!     ──► host name held by another object? ──► refusal NAME_IN_USE
//!     ──► held by an earlier virtual claim of the name? ──► deleted, then made afresh
//!     ──► create, or grow its storage request ──► the host API server refuses? ──► refusal HOST_REFUSED
//!  DeleteClaim(ns, name, uid) ──► the host claim of that uid only ──► delete (UID precondition)
//!  ListClaims ──► the tenant's host claims (labelled managed-by=<tenant>) ──► virtual identities
//!  ApplyPod ──► each claim a Pod mounts: the tenant's host copy of that claim? ──► mounted under its
//!     host name; not there yet ──► FAILED_PRECONDITION (retried); another's ──► refusal NAME_IN_USE
//! ```

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use rcsync_core::Tenant;
use rcsync_core::naming::host_object_name;
use rcsync_proto::v1::{
    ApplyClaimRequest, ApplyClaimResponse, DeleteClaimRequest, DeleteClaimResponse, ListClaimsRequest,
    ListClaimsResponse, PodRefusal, PodRefusalReason,
};
use serde_json::json;
use tonic::{Request, Status};

use super::budgets::{delete_held, list_held, other_holder, refused_as_it_stands};
use super::{PodSyncService, kube_status, name_in_use};
use crate::index::ViewSource;
use crate::translate::{ClaimProblem, VirtualPodRef, host_claim, recorded_ref};

/// The kind, as refusals name it.
const CLAIM: &str = "PersistentVolumeClaim";

/// How often an apply reads and writes again when the host claim changes under it.
const APPLY_ATTEMPTS: usize = 3;

/// Where the host copy of one of the tenant's claims stands.
enum Held {
    /// The tenant's copy of that virtual claim is there.
    Ours,
    /// Nothing holds the host name.
    Missing,
    /// Another object holds the host name: who, in words.
    Other(String),
}

impl<V: ViewSource> PodSyncService<V> {
    fn claims(&self, tenant: &Tenant) -> Api<PersistentVolumeClaim> {
        Api::namespaced(self.client.clone(), &tenant.host_namespace)
    }

    /// Whether the host name of the virtual claim `namespace/name` holds the tenant's copy of it.
    async fn held(&self, tenant: &Tenant, namespace: &str, name: &str) -> Result<Held, Status> {
        let host_name = host_object_name(name, namespace, tenant.name.as_str());
        let meta = self
            .claims(tenant)
            .get_metadata_opt(&host_name)
            .await
            .map_err(|e| kube_status(&e, tenant))?;
        Ok(match meta {
            None => Held::Missing,
            Some(meta) => match other_holder(&meta.metadata, tenant, namespace, name, CLAIM) {
                None => Held::Ours,
                Some(holder) => Held::Other(holder),
            },
        })
    }

    /// ApplyPod's check of the claims `pod` mounts (where the tenant's claims are made on the host):
    /// each must be the tenant's host copy of that claim. One not there yet fails the call
    /// (FAILED_PRECONDITION: retried, as its claim is made); one held by another object is a
    /// refusal.
    pub(super) async fn claims_refusal(
        &self,
        tenant: &Tenant,
        id: &VirtualPodRef,
        pod: &Pod,
    ) -> Result<Option<PodRefusal>, Status> {
        if !tenant.pods.claims {
            return Ok(None);
        }
        let claims = pod.spec.iter().flat_map(|s| s.volumes.iter().flatten());
        for claim in claims.filter_map(|v| v.persistent_volume_claim.as_ref()) {
            let host_name = host_object_name(&claim.claim_name, &id.namespace, tenant.name.as_str());
            match self.held(tenant, &id.namespace, &claim.claim_name).await? {
                Held::Ours => {}
                Held::Missing => {
                    return Err(Status::failed_precondition(format!(
                        "the pod's PersistentVolumeClaim {:?} is not on the host yet (as {host_name:?} in {:?})",
                        claim.claim_name, tenant.host_namespace
                    )));
                }
                Held::Other(holder) => return Ok(Some(name_in_use(&host_name, holder))),
            }
        }
        Ok(None)
    }

    /// ApplyClaim: see `pod_sync.proto`.
    pub(super) async fn apply_host_claim(
        &self,
        request: Request<ApplyClaimRequest>,
    ) -> Result<ApplyClaimResponse, Status> {
        let (caller, tenant) = self.caller(&request)?;
        self.limiter.take(&caller.tenant)?;
        let claim: PersistentVolumeClaim =
            serde_json::from_slice(&request.get_ref().claim_json).map_err(|e| {
                Status::invalid_argument(format!("claim_json is not a v1 PersistentVolumeClaim: {e}"))
            })?;
        let name = claim.metadata.name.clone().unwrap_or_default();
        let namespace = claim.metadata.namespace.clone().unwrap_or_default();
        let uid = claim.metadata.uid.clone().unwrap_or_default();
        let host_name = host_object_name(&name, &namespace, tenant.name.as_str());
        let response = ApplyClaimResponse {
            applied: false,
            host_namespace: tenant.host_namespace.clone(),
            host_name: host_name.clone(),
            refusal: None,
        };
        let refuse = |mut response: ApplyClaimResponse, reason: PodRefusalReason, message: String| {
            tracing::info!(
                tenant = %tenant.name, %namespace, claim = %name, reason = reason.as_str_name(),
                "refused PersistentVolumeClaim: {message}"
            );
            response.refusal = Some(PodRefusal {
                reason: reason.into(),
                message,
            });
            Ok(response)
        };
        if !tenant.pods.claims {
            let message = format!(
                "the host does not make PersistentVolumeClaims of tenant {} (sync.toHost.persistentVolumeClaims.enabled \
                 is not true in the host agent's tenants file), so pods cannot mount this one",
                tenant.name
            );
            return refuse(response, PodRefusalReason::Disabled, message);
        }
        let (desired, source) = match host_claim(&claim, &tenant) {
            Ok(translated) => translated,
            Err(ClaimProblem::Invalid(message)) => return Err(Status::invalid_argument(message)),
            Err(ClaimProblem::Unsupported(message)) => {
                return refuse(response, PodRefusalReason::Unsupported, message);
            }
        };
        if let Some(source) = source {
            match self.held(&tenant, &namespace, &source).await? {
                Held::Ours => {}
                Held::Missing => {
                    return Err(Status::failed_precondition(format!(
                        "the claim it clones, {source:?}, is not on the host yet"
                    )));
                }
                Held::Other(holder) => {
                    let source_host = host_object_name(&source, &namespace, tenant.name.as_str());
                    let message =
                        format!("the host name {source_host:?} of the claim it clones is held by {holder}");
                    return refuse(response, PodRefusalReason::NameInUse, message);
                }
            }
        }
        let api = self.claims(&tenant);
        for _ in 0..APPLY_ATTEMPTS {
            let current = api
                .get_opt(&host_name)
                .await
                .map_err(|e| kube_status(&e, &tenant))?;
            let written = match current {
                None => api.create(&PostParams::default(), &desired).await.map(|_| ()),
                Some(current) => {
                    if let Some(holder) = other_holder(&current.metadata, &tenant, &namespace, &name, CLAIM) {
                        let message = format!("the host name {host_name:?} is held by {holder}");
                        return refuse(response, PodRefusalReason::NameInUse, message);
                    }
                    if recorded_ref(&current.metadata).is_some_and(|r| r.uid != uid) {
                        // The copy of an earlier virtual claim of this name, deleted since: its
                        // storage goes with it, as the tenant asked; this one is made afresh.
                        let params = DeleteParams {
                            preconditions: Some(Preconditions {
                                uid: current.metadata.uid.clone(),
                                resource_version: None,
                            }),
                            ..Default::default()
                        };
                        api.delete(&host_name, &params)
                            .await
                            .map_err(|e| kube_status(&e, &tenant))?;
                        return Err(Status::aborted(format!(
                            "host claim {host_name} belonged to an earlier virtual claim of the same name; it is being \
                             deleted: retry"
                        )));
                    }
                    match grown_request(&current, &desired) {
                        None => {
                            return Ok(ApplyClaimResponse {
                                applied: true,
                                ..response
                            });
                        }
                        Some(storage) => {
                            let patch = json!({"spec": {"resources": {"requests": {"storage": storage}}}});
                            api.patch(&host_name, &PatchParams::default(), &Patch::Merge(patch))
                                .await
                                .map(|_| ())
                        }
                    }
                }
            };
            match written {
                Ok(()) => {
                    return Ok(ApplyClaimResponse {
                        applied: true,
                        ..response
                    });
                }
                // Created or changed meanwhile: read it again.
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                // A claim past the host namespace's storage quota is the tenant's to see, as a
                // refusal (the virtual side tries it again later).
                Err(kube::Error::Api(e))
                    if refused_as_it_stands(e.code, &e.message) || e.message.contains("exceeded quota") =>
                {
                    let message = format!(
                        "the host API server refused the PersistentVolumeClaim: {}",
                        e.message
                    );
                    return refuse(response, PodRefusalReason::HostRefused, message);
                }
                Err(e) => return Err(kube_status(&e, &tenant)),
            }
        }
        Err(Status::aborted(format!(
            "the host PersistentVolumeClaim {host_name:?} kept changing while it was written; try again"
        )))
    }

    /// DeleteClaim: see `pod_sync.proto`.
    pub(super) async fn delete_host_claim(
        &self,
        request: Request<DeleteClaimRequest>,
    ) -> Result<DeleteClaimResponse, Status> {
        let (caller, tenant) = self.caller(&request)?;
        self.limiter.take(&caller.tenant)?;
        let req = request.into_inner();
        let host_name = host_object_name(&req.name, &req.namespace, tenant.name.as_str());
        let deleted = delete_held(
            &self.claims(&tenant),
            &tenant,
            &host_name,
            &req.namespace,
            &req.name,
            Some(&req.uid),
        )
        .await?;
        Ok(DeleteClaimResponse { deleted })
    }

    /// ListClaims: see `pod_sync.proto`.
    pub(super) async fn list_host_claims(
        &self,
        request: Request<ListClaimsRequest>,
    ) -> Result<ListClaimsResponse, Status> {
        let (caller, tenant) = self.caller(&request)?;
        self.limiter.take(&caller.tenant)?;
        let claims = list_held(&self.claims(&tenant), &tenant).await?;
        Ok(ListClaimsResponse { claims })
    }
}

/// The storage request to patch onto the host claim `current` when the virtual claim asks for
/// more than it does (a claim only grows; the rest of its spec is immutable).
fn grown_request(current: &PersistentVolumeClaim, desired: &PersistentVolumeClaim) -> Option<Quantity> {
    let request = |claim: &PersistentVolumeClaim| {
        claim
            .spec
            .as_ref()?
            .resources
            .as_ref()?
            .requests
            .as_ref()?
            .get("storage")
            .cloned()
    };
    let (has, wants) = (request(current), request(desired)?);
    match has {
        Some(has) if quantity_value(&wants.0)? <= quantity_value(&has.0)? => None,
        _ => Some(wants),
    }
}

/// The value of a Kubernetes quantity (`10Gi`, `500M`, `1e3`, `1.5`), `None` when it is not one.
fn quantity_value(text: &str) -> Option<f64> {
    const SUFFIXES: [(&str, f64); 13] = [
        ("Ki", 1024.0),
        ("Mi", 1_048_576.0),
        ("Gi", 1_073_741_824.0),
        ("Ti", 1_099_511_627_776.0),
        ("Pi", 1_125_899_906_842_624.0),
        ("Ei", 1_152_921_504_606_846_976.0),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    let text = text.trim();
    let (number, scale) = SUFFIXES
        .iter()
        .find_map(|(suffix, scale)| Some((text.strip_suffix(suffix)?, *scale)))
        .unwrap_or((text, 1.0));
    let value: f64 = number.parse().ok()?;
    value.is_finite().then_some(value * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(storage: Option<&str>) -> PersistentVolumeClaim {
        let requests = storage.map(|s| json!({"storage": s}));
        serde_json::from_value(json!({"spec": {"resources": {"requests": requests}}})).unwrap()
    }

    #[test]
    fn a_host_claim_is_patched_only_to_grow() {
        assert_eq!(grown_request(&claim(Some("1Gi")), &claim(Some("1Gi"))), None);
        assert_eq!(
            grown_request(&claim(Some("1Gi")), &claim(Some("1024Mi"))),
            None,
            "the same size"
        );
        assert_eq!(
            grown_request(&claim(Some("2Gi")), &claim(Some("1Gi"))),
            None,
            "never shrunk"
        );
        assert_eq!(
            grown_request(&claim(Some("1Gi")), &claim(Some("1.5Gi"))),
            Some(Quantity("1.5Gi".into()))
        );
        assert_eq!(
            grown_request(&claim(Some("1G")), &claim(Some("1Gi"))).map(|q| q.0),
            Some("1Gi".into())
        );
        assert_eq!(grown_request(&claim(Some("1Gi")), &claim(None)), None);
    }

    #[test]
    fn quantities_read_as_kubernetes_writes_them() {
        assert_eq!(quantity_value("10Gi"), Some(10.0 * 1_073_741_824.0));
        assert_eq!(quantity_value("500M"), Some(5e8));
        assert_eq!(quantity_value("1e3"), Some(1000.0));
        assert_eq!(quantity_value("250m"), Some(0.25));
        assert_eq!(quantity_value("lots"), None);
    }
}
