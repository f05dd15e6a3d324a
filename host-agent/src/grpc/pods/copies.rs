//! The ConfigMaps and Secrets a Pod references, copied into the tenant's host namespace: each
//! sent object checked to be one the Pod references from its namespace, its host name checked
//! to be free (or already the tenant's copy of it), and written owned by the host Pods that use it
//! (the host's garbage collector removes it with the last of them).

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, PostParams, Preconditions};
use kube::{Api, ResourceExt as _};
use rcsync_core::Tenant;
use rcsync_core::pod_refs::{self, RefKind};
use rcsync_proto::v1::{ApplyPodRequest, PodRefusal};
use tonic::Status;

use super::{PodSyncService, kube_status, name_in_use};
use crate::grpc::lost_copies::RecordedCopy;
use crate::index::ViewSource;
use crate::translate::{VirtualPodRef, host_config_map, host_secret, recorded_holder};

/// A referenced object to copy: its virtual name and its host form.
pub(super) enum HostCopy {
    ConfigMap { virtual_name: String, host: ConfigMap },
    Secret { virtual_name: String, host: Secret },
}

impl HostCopy {
    fn kind(&self) -> RefKind {
        match self {
            Self::ConfigMap { .. } => RefKind::ConfigMap,
            Self::Secret { .. } => RefKind::Secret,
        }
    }

    fn virtual_name(&self) -> &str {
        match self {
            Self::ConfigMap { virtual_name, .. } | Self::Secret { virtual_name, .. } => virtual_name,
        }
    }

    /// The copy as its host Pod records it (`rcsync.io/copies`).
    pub(super) fn recorded(&self) -> RecordedCopy {
        let host_name = match self {
            Self::ConfigMap { host, .. } => host.metadata.name.clone(),
            Self::Secret { host, .. } => host.metadata.name.clone(),
        };
        RecordedCopy {
            kind: self.kind(),
            virtual_name: self.virtual_name().to_string(),
            host_name: host_name.unwrap_or_default(),
        }
    }
}

/// The objects sent with a Pod, each checked to be one the Pod references, from its namespace.
pub(super) fn accepted_copies(
    pod: &Pod,
    id: &VirtualPodRef,
    tenant: &Tenant,
    request: &ApplyPodRequest,
) -> Result<Vec<HostCopy>, Status> {
    let references = pod.spec.as_ref().map(pod_refs::references).unwrap_or_default();
    let mut copies = Vec::new();
    let check = |kind: RefKind, meta: &kube::api::ObjectMeta| -> Result<String, Status> {
        let name = meta.name.clone().unwrap_or_default();
        let namespace = meta.namespace.clone().unwrap_or_default();
        if namespace != id.namespace {
            return Err(Status::invalid_argument(format!(
                "{kind} {namespace}/{name} is not in the pod's namespace {:?}",
                id.namespace
            )));
        }
        if !references.contains_key(&(kind, name.clone())) {
            return Err(Status::invalid_argument(format!(
                "{kind} {namespace}/{name} is not referenced by pod {}/{}",
                id.namespace, id.name
            )));
        }
        Ok(name)
    };
    let invalid = |kind: RefKind, e: &dyn std::fmt::Display| {
        Status::invalid_argument(format!("a sent {kind} is not valid: {e}"))
    };
    for json in &request.config_maps_json {
        let cm: ConfigMap = serde_json::from_slice(json).map_err(|e| invalid(RefKind::ConfigMap, &e))?;
        let virtual_name = check(RefKind::ConfigMap, &cm.metadata)?;
        let host = host_config_map(&cm, tenant).map_err(|e| invalid(RefKind::ConfigMap, &e))?;
        copies.push(HostCopy::ConfigMap { virtual_name, host });
    }
    for json in &request.secrets_json {
        let secret: Secret = serde_json::from_slice(json).map_err(|e| invalid(RefKind::Secret, &e))?;
        let virtual_name = check(RefKind::Secret, &secret.metadata)?;
        let host = host_secret(&secret, tenant).map_err(|e| invalid(RefKind::Secret, &e))?;
        copies.push(HostCopy::Secret { virtual_name, host });
    }
    Ok(copies)
}

impl<V: ViewSource> PodSyncService<V> {
    /// A refusal when the host name of a copy is held by another virtual object or by a host
    /// object rcsync did not write for this tenant.
    pub(super) async fn names_in_use(
        &self,
        tenant: &Tenant,
        id: &VirtualPodRef,
        copies: &[HostCopy],
    ) -> Result<Option<PodRefusal>, Status> {
        for copy in copies {
            let meta = match copy {
                HostCopy::ConfigMap { host, .. } => self
                    .config_maps(tenant)
                    .get_metadata_opt(&host.name_any())
                    .await
                    .map_err(|e| kube_status(&e, tenant))?
                    .map(|m| m.metadata),
                HostCopy::Secret { host, .. } => self
                    .secrets(tenant)
                    .get_metadata_opt(&host.name_any())
                    .await
                    .map_err(|e| kube_status(&e, tenant))?
                    .map(|m| m.metadata),
            };
            let Some(meta) = meta else { continue };
            let kind = copy.kind();
            let holder = match recorded_holder(&meta, tenant) {
                Some((ns, name)) if ns == id.namespace && name == copy.virtual_name() => continue,
                Some((ns, name)) => format!("{kind} {ns}/{name}"),
                None => format!("a {kind} rcsync does not manage"),
            };
            return Ok(Some(name_in_use(&meta.name.unwrap_or_default(), holder)));
        }
        Ok(None)
    }

    /// Creates or updates one copy so it holds the virtual data and lists `owner` among its owners.
    pub(super) async fn write_copy(
        &self,
        tenant: &Tenant,
        copy: &HostCopy,
        owner: &OwnerReference,
    ) -> Result<(), Status> {
        match copy {
            HostCopy::ConfigMap { host, .. } => {
                write_owned(&self.config_maps(tenant), host.clone(), owner, tenant, |a, b| {
                    a.data == b.data && a.binary_data == b.binary_data
                })
                .await
            }
            HostCopy::Secret { host, .. } => {
                write_owned(&self.secrets(tenant), host.clone(), owner, tenant, |a, b| {
                    a.data == b.data && a.type_ == b.type_
                })
                .await
            }
        }
    }

    fn config_maps(&self, tenant: &Tenant) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), &tenant.host_namespace)
    }

    fn secrets(&self, tenant: &Tenant) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &tenant.host_namespace)
    }
}

/// Creates `desired` owned by `owner`, or updates the existing copy: its data and its owners
/// (the host Pods using it; the host's garbage collector removes it with the last of them).
/// Optimistic concurrency: a conflict is returned as ABORTED and the caller retries.
async fn write_owned<K>(
    api: &Api<K>,
    mut desired: K,
    owner: &OwnerReference,
    tenant: &Tenant,
    same_content: impl Fn(&K, &K) -> bool,
) -> Result<(), Status>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let name = desired.name_any();
    let Some(current) = api.get_opt(&name).await.map_err(|e| kube_status(&e, tenant))? else {
        desired.meta_mut().owner_references = Some(vec![owner.clone()]);
        return match api.create(&PostParams::default(), &desired).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Err(Status::aborted(format!(
                "copy {name} was created concurrently: retry"
            ))),
            Err(e) => Err(kube_status(&e, tenant)),
        };
    };
    let mut owners = current.meta().owner_references.clone().unwrap_or_default();
    let owned = owners.iter().any(|o| o.uid == owner.uid);
    if owned && same_content(&current, &desired) {
        return Ok(());
    }
    if !owned {
        owners.push(owner.clone());
    }
    let meta = desired.meta_mut();
    meta.owner_references = Some(owners);
    meta.resource_version = current.meta().resource_version.clone();
    match api.replace(&name, &PostParams::default(), &desired).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Err(Status::aborted(format!(
            "copy {name} changed concurrently: retry"
        ))),
        // A Secret's type cannot change: replace the copy (its owners come back on the retry).
        Err(kube::Error::Api(e)) if e.code == 422 && e.message.contains("type") => {
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: current.meta().uid.clone(),
                    resource_version: None,
                }),
                ..Default::default()
            };
            api.delete(&name, &params)
                .await
                .map_err(|e| kube_status(&e, tenant))?;
            Err(Status::aborted(format!(
                "copy {name} changed its type and is being replaced: retry"
            )))
        }
        Err(e) => Err(kube_status(&e, tenant)),
    }
}
