//! A tenant's PodDisruptionBudgets held on the host (`sync.toHost.podDisruptionBudgets`), so the
//! host's evictions (node drains, the cluster autoscaler) respect them.
//!
//! ```text
//!  ApplyDisruptionBudget(budget) ──auth, rate──► enabled for the tenant? ──no──► refusal DISABLED
//!     ──► translate (name, selector scoped to the tenant's Pods of its namespace, whole minAvailable)
//!     ──► host name held by another object? ──► refusal NAME_IN_USE
//!     ──► create, or replace when it differs ──► the host API server refuses? ──► refusal HOST_REFUSED
//!  DeleteDisruptionBudget(ns, name, uid) ──► the host budget of that uid only ──► delete (UID precondition)
//!  ListDisruptionBudgets ──► the tenant's host budgets (labelled managed-by=<tenant>) ──► virtual identities
//! ```

use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, ListParams, PostParams, Preconditions};
use rcsync_core::Tenant;
use rcsync_core::naming::host_object_name;
use rcsync_proto::v1::{
    ApplyDisruptionBudgetRequest, ApplyDisruptionBudgetResponse, DeleteDisruptionBudgetRequest,
    DeleteDisruptionBudgetResponse, ListDisruptionBudgetsRequest, ListDisruptionBudgetsResponse, PodRefusal,
    PodRefusalReason, VirtualObject,
};
use tonic::{Request, Status};

use super::{PodSyncService, follows_the_host, kube_status};
use crate::index::ViewSource;
use crate::translate::{
    BudgetProblem, host_disruption_budget, managed_selector, recorded_holder, recorded_ref,
};

/// How often an apply reads and writes again when the host budget changes under it.
const APPLY_ATTEMPTS: usize = 3;

impl<V: ViewSource> PodSyncService<V> {
    fn budgets(&self, tenant: &Tenant) -> Api<PodDisruptionBudget> {
        Api::namespaced(self.client.clone(), &tenant.host_namespace)
    }

    /// ApplyDisruptionBudget: see `pod_sync.proto`.
    pub(super) async fn apply_budget(
        &self,
        request: Request<ApplyDisruptionBudgetRequest>,
    ) -> Result<ApplyDisruptionBudgetResponse, Status> {
        let (caller, tenant) = self.caller(&request)?;
        self.limiter.take(&caller.tenant)?;
        let budget: PodDisruptionBudget =
            serde_json::from_slice(&request.get_ref().budget_json).map_err(|e| {
                Status::invalid_argument(format!("budget_json is not a policy/v1 PodDisruptionBudget: {e}"))
            })?;
        let name = budget.metadata.name.clone().unwrap_or_default();
        let namespace = budget.metadata.namespace.clone().unwrap_or_default();
        let host_name = host_object_name(&name, &namespace, tenant.name.as_str());
        let mut response = ApplyDisruptionBudgetResponse {
            applied: false,
            host_namespace: tenant.host_namespace.clone(),
            host_name: host_name.clone(),
            refusal: None,
        };
        let refuse =
            |mut response: ApplyDisruptionBudgetResponse, reason: PodRefusalReason, message: String| {
                tracing::info!(
                    tenant = %tenant.name, %namespace, budget = %name, reason = reason.as_str_name(),
                    "refused PodDisruptionBudget: {message}"
                );
                response.refusal = Some(PodRefusal {
                    reason: reason.into(),
                    message,
                });
                Ok(response)
            };
        if !tenant.pods.disruption_budgets {
            // Switched off: what the host held for this budget goes too.
            delete_held(
                &self.budgets(&tenant),
                &tenant,
                &host_name,
                &namespace,
                &name,
                None,
            )
            .await?;
            let message = format!(
                "the host does not hold PodDisruptionBudgets of tenant {} (sync.toHost.podDisruptionBudgets.enabled \
                 is not true in the host agent's tenants file), so host node drains do not respect this one",
                tenant.name
            );
            return refuse(response, PodRefusalReason::Disabled, message);
        }
        let desired = match host_disruption_budget(&budget, &tenant) {
            Ok(desired) => desired,
            Err(BudgetProblem::Invalid(message)) => return Err(Status::invalid_argument(message)),
            Err(BudgetProblem::Unsupported(message)) => {
                return refuse(response, PodRefusalReason::Unsupported, message);
            }
        };
        let api = self.budgets(&tenant);
        for _ in 0..APPLY_ATTEMPTS {
            let current = api
                .get_opt(&host_name)
                .await
                .map_err(|e| kube_status(&e, &tenant))?;
            let written = match current {
                None => api.create(&PostParams::default(), &desired).await,
                Some(current) => {
                    let kind = "PodDisruptionBudget";
                    if let Some(holder) = other_holder(&current.metadata, &tenant, &namespace, &name, kind) {
                        let message = format!("the host name {host_name:?} is held by {holder}");
                        return refuse(response, PodRefusalReason::NameInUse, message);
                    }
                    let same = current.spec == desired.spec
                        && current.metadata.annotations == desired.metadata.annotations
                        && current.metadata.labels == desired.metadata.labels;
                    if same {
                        response.applied = true;
                        return Ok(response);
                    }
                    let mut next = desired.clone();
                    next.metadata.resource_version = current.metadata.resource_version.clone();
                    api.replace(&host_name, &PostParams::default(), &next).await
                }
            };
            match written {
                Ok(_) => {
                    response.applied = true;
                    return Ok(response);
                }
                // Created or changed meanwhile: read it again.
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(kube::Error::Api(e)) if refused_as_it_stands(e.code, &e.message) => {
                    let message = format!(
                        "the host API server refused the PodDisruptionBudget: {}",
                        e.message
                    );
                    return refuse(response, PodRefusalReason::HostRefused, message);
                }
                Err(e) => return Err(kube_status(&e, &tenant)),
            }
        }
        Err(Status::aborted(format!(
            "the host PodDisruptionBudget {host_name:?} kept changing while it was written; try again"
        )))
    }

    /// DeleteDisruptionBudget: see `pod_sync.proto`.
    pub(super) async fn delete_budget(
        &self,
        request: Request<DeleteDisruptionBudgetRequest>,
    ) -> Result<DeleteDisruptionBudgetResponse, Status> {
        let (caller, tenant) = self.caller(&request)?;
        self.limiter.take(&caller.tenant)?;
        let req = request.into_inner();
        let host_name = host_object_name(&req.name, &req.namespace, tenant.name.as_str());
        let deleted = delete_held(
            &self.budgets(&tenant),
            &tenant,
            &host_name,
            &req.namespace,
            &req.name,
            Some(&req.uid),
        )
        .await?;
        Ok(DeleteDisruptionBudgetResponse { deleted })
    }

    /// ListDisruptionBudgets: see `pod_sync.proto`.
    pub(super) async fn list_budgets(
        &self,
        request: Request<ListDisruptionBudgetsRequest>,
    ) -> Result<ListDisruptionBudgetsResponse, Status> {
        let (caller, tenant) = self.caller(&request)?;
        self.limiter.take(&caller.tenant)?;
        let budgets = list_held(&self.budgets(&tenant), &tenant).await?;
        Ok(ListDisruptionBudgetsResponse { budgets })
    }
}

/// Who, other than the tenant's copy of the virtual `kind` `namespace/name`, holds the host object
/// of `meta`, in words; `None` when that copy does.
pub(super) fn other_holder(
    meta: &kube::api::ObjectMeta,
    tenant: &Tenant,
    namespace: &str,
    name: &str,
    kind: &str,
) -> Option<String> {
    match recorded_holder(meta, tenant) {
        Some((ns, n)) if ns == namespace && n == name => None,
        Some((ns, n)) => Some(format!("{kind} {ns}/{n}")),
        None => Some(format!("a {kind} rcsync does not manage")),
    }
}

/// Deletes the host object `host_name` of `api` when it is the tenant's copy of the virtual
/// object `namespace/name` (of `uid`, when given); whether it did.
pub(super) async fn delete_held<K>(
    api: &Api<K>,
    tenant: &Tenant,
    host_name: &str,
    namespace: &str,
    name: &str,
    uid: Option<&str>,
) -> Result<bool, Status>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    let Some(current) = api
        .get_metadata_opt(host_name)
        .await
        .map_err(|e| kube_status(&e, tenant))?
    else {
        return Ok(false);
    };
    let recorded = recorded_ref(&current.metadata);
    let ours = recorded_holder(&current.metadata, tenant).is_some()
        && recorded.is_some_and(|r| {
            r.namespace == namespace && r.name == name && uid.is_none_or(|uid| r.uid == uid)
        });
    if !ours {
        return Ok(false);
    }
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: current.metadata.uid.clone(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(host_name, &params).await {
        Ok(_) => Ok(true),
        // Gone, or another object under the name now (the precondition held).
        Err(kube::Error::Api(e)) if matches!(e.code, 404 | 409) => Ok(false),
        Err(e) => Err(kube_status(&e, tenant)),
    }
}

/// The virtual identities of the tenant's host objects of `api` (those rcsync wrote for it).
pub(super) async fn list_held<K>(api: &Api<K>, tenant: &Tenant) -> Result<Vec<VirtualObject>, Status>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    let listed = api
        .list_metadata(&ListParams::default().labels(&managed_selector(tenant)))
        .await
        .map_err(|e| kube_status(&e, tenant))?;
    Ok(listed
        .items
        .iter()
        .filter(|o| recorded_holder(&o.metadata, tenant).is_some())
        .filter_map(|o| recorded_ref(&o.metadata))
        .map(|r| VirtualObject {
            namespace: r.namespace,
            name: r.name,
            uid: r.uid,
        })
        .collect())
}

/// Whether the host API server refused a write for the object as it stands (validation, an
/// admission webhook), rather than for something of the host's (its RBAC, a namespace being
/// deleted) that may change any moment.
pub(super) fn refused_as_it_stands(code: u16, message: &str) -> bool {
    matches!(code, 400 | 422)
        || (code == 403 && !follows_the_host(message) && !message.contains("exceeded quota"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_refusal_of_the_budget_itself_is_shown_to_the_tenant() {
        assert!(refused_as_it_stands(
            422,
            "PodDisruptionBudget.policy \"x\" is invalid"
        ));
        assert!(refused_as_it_stands(
            403,
            "admission webhook \"pdb.example.com\" denied the request"
        ));
        assert!(!refused_as_it_stands(
            403,
            "poddisruptionbudgets.policy is forbidden: User \"x\" cannot create resource \"poddisruptionbudgets\""
        ));
        assert!(!refused_as_it_stands(
            403,
            "unable to create new content in namespace vc-a because it is being terminated"
        ));
        assert!(!refused_as_it_stands(500, "etcd timeout"));
    }
}
