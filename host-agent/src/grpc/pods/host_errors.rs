//! What the host API server's answers mean to the caller of PodSync: each refusal or failure
//! mapped to the gRPC status the virtual side acts on (retried, refused as the Pod stands, or a
//! precondition of the host's), with rcsync's reason where one cures it.

use std::collections::HashMap;

use tonic::Status;
use tonic_types::{ErrorDetails, StatusExt as _};

use rcsync_core::Tenant;

/// Maps a host API error to the gRPC status the virtual side acts on: configuration problems are
/// FAILED_PRECONDITION (not retried blindly), the rest UNAVAILABLE (retried).
pub(super) fn kube_status(error: &kube::Error, tenant: &Tenant) -> Status {
    match error {
        kube::Error::Api(e) if e.code == 404 && e.message.contains("namespaces") => {
            Status::failed_precondition(format!(
                "the host namespace {:?} of tenant {} does not exist: {}",
                tenant.host_namespace, tenant.name, e.message
            ))
        }
        // Upstream's quota admission says so only in its message (`... is forbidden: exceeded
        // quota: <name>, requested: ..., used: ..., limited: ...`): a reason the caller can act on.
        kube::Error::Api(e) if e.code == 403 && e.message.contains("exceeded quota") => {
            refused(&e.message, Some(rcsync_proto::HOST_QUOTA_EXCEEDED))
        }
        // What the host may change any moment (a RuntimeClass created or fixed, the host agent's
        // RBAC granted): retried on the caller's usual backoff.
        kube::Error::Api(e) if e.code == 403 && follows_the_host(&e.message) => refused(&e.message, None),
        // The host refuses the Pod as it stands (validation, an admission webhook, a quota that
        // wants requests set, the host's own Pod Security): the same Pod gets the same answer
        // until it or the host's policy changes.
        kube::Error::Api(e) if matches!(e.code, 400 | 403 | 422) => {
            refused(&e.message, Some(rcsync_proto::HOST_POD_REFUSED))
        }
        other => Status::unavailable(format!("the host API server failed: {other}")),
    }
}

/// A Pod subresource the host agent writes that older API servers lack: what the host Pod cannot
/// do without it, and the Kubernetes release that serves it.
pub(super) struct Subresource {
    name: &'static str,
    what: &'static str,
    since: &'static str,
    otherwise: &'static str,
}

/// `pods/resize`: resources changed in place.
pub(super) const RESIZE: Subresource = Subresource {
    name: "pods/resize",
    what: "resize a running pod in place",
    since: "1.33",
    otherwise: "the host pod keeps its cpu and memory until the pod is recreated",
};

/// `pods/ephemeralcontainers`: debug containers added.
pub(super) const EPHEMERAL_CONTAINERS: Subresource = Subresource {
    name: "pods/ephemeralcontainers",
    what: "add debug containers to a running pod",
    since: "1.25",
    otherwise: "the host pod runs without them",
};

/// What a failed write of a host Pod's `subresource` tells the caller: as [`kube_status`], except
/// that a host API server without the subresource (the route itself is not found, where a Pod
/// gone since it was read would be named) refuses the Pod as it stands, saying so, rather than
/// failing as if it were down: the tenant sees why the host Pod does not follow.
pub(super) fn subresource_status(error: &kube::Error, tenant: &Tenant, subresource: Subresource) -> Status {
    match error {
        kube::Error::Api(e)
            if e.code == 404 && e.message.contains("could not find the requested resource") =>
        {
            let Subresource {
                name,
                what,
                since,
                otherwise,
            } = subresource;
            refused(
                &format!(
                    "it cannot {what} (no {name} subresource: Kubernetes {since} and later serve it); {otherwise}"
                ),
                Some(rcsync_proto::HOST_POD_REFUSED),
            )
        }
        other => kube_status(other, tenant),
    }
}

/// The host API server's refusal as FAILED_PRECONDITION, with a `google.rpc.ErrorInfo` of
/// `reason` (domain `rcsync.io`) when it has one.
pub(super) fn refused(message: &str, reason: Option<&str>) -> Status {
    let message = format!("the host API server refused the pod: {message}");
    match reason {
        Some(reason) => Status::with_error_details(
            tonic::Code::FailedPrecondition,
            message,
            ErrorDetails::with_error_info(reason, rcsync_proto::ERROR_DOMAIN, HashMap::new()),
        ),
        None => Status::failed_precondition(message),
    }
}

/// Whether a 403 of the host API server is about something of the host's rather than the Pod:
/// the host agent's own RBAC (`... cannot create resource "pods" ...`), the host namespace being
/// deleted, or the Pod's RuntimeClass (upstream's RuntimeClass admission: `pod rejected:
/// RuntimeClass "x" not found`, an overhead or node selector at odds with the class), which an
/// operator or a class change cures.
pub(super) fn follows_the_host(message: &str) -> bool {
    (message.contains(" cannot ") && message.contains(" resource "))
        || message.contains("because it is being terminated")
        || (message.contains("pod rejected:") && message.to_ascii_lowercase().contains("runtimeclass"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_subresource_the_host_api_server_lacks_refuses_the_pod_saying_which_and_since_when() {
        let tenant = rcsync_core::TenantsFile::parse(
            std::path::Path::new("t.yaml"),
            "tenants:\n  - name: team-a\n    hostNamespace: team-a\n",
        )
        .unwrap()
        .tenant("team-a")
        .cloned()
        .unwrap();
        let not_found = |message: &str| {
            kube::Error::Api(Box::new(kube::core::Status {
                code: 404,
                message: message.into(),
                reason: "NotFound".into(),
                ..Default::default()
            }))
        };
        let route = not_found("the server could not find the requested resource");
        let status = subresource_status(&route, &tenant, EPHEMERAL_CONTAINERS);
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            status.message(),
            "the host API server refused the pod: it cannot add debug containers to a running pod \
             (no pods/ephemeralcontainers subresource: Kubernetes 1.25 and later serve it); the host pod runs without them"
        );
        assert_eq!(
            status.get_error_details().error_info().map(|i| i.reason.as_str()),
            Some(rcsync_proto::HOST_POD_REFUSED)
        );
        // The Pod itself gone since it was read: retried, as any other failure of the host.
        let pod_gone = not_found(r#"pods "web-x-default-x-team-a" not found"#);
        assert_eq!(
            subresource_status(&pod_gone, &tenant, RESIZE).code(),
            tonic::Code::Unavailable
        );
    }

    #[test]
    fn a_host_refusal_says_whether_room_a_change_of_the_pod_or_nothing_of_the_pod_cures_it() {
        let file = rcsync_core::TenantsFile::parse(
            std::path::Path::new("t.yaml"),
            "tenants:\n  - {name: a, hostNamespace: ns-a}\n",
        )
        .unwrap();
        let tenant = file.tenant("a").unwrap();
        let refused = |message: &str| {
            let status: kube::core::Status =
                serde_json::from_value(json!({"code": 403, "reason": "Forbidden", "message": message}))
                    .unwrap();
            kube_status(&kube::Error::Api(Box::new(status)), tenant)
        };
        let full = refused(
            "pods \"web-x-default-x-a\" is forbidden: exceeded quota: pods, requested: pods=1, used: pods=1, limited: pods=1",
        );
        assert_eq!(full.code(), tonic::Code::FailedPrecondition);
        assert!(full.message().contains("exceeded quota: pods"), "{full:?}");
        let info = full.get_details_error_info().expect("an ErrorInfo");
        assert_eq!(
            (info.reason.as_str(), info.domain.as_str()),
            (rcsync_proto::HOST_QUOTA_EXCEEDED, rcsync_proto::ERROR_DOMAIN)
        );
        let reason = |status: &Status| {
            assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
            status.get_details_error_info().map(|info| {
                assert_eq!(info.domain, rcsync_proto::ERROR_DOMAIN);
                info.reason
            })
        };
        // The Pod as it stands is refused: a webhook, a quota that wants requests, validation.
        for message in [
            "admission webhook \"policy.example\" denied the request: no",
            "pods \"web-x-default-x-a\" is forbidden: failed quota: compute: must specify requests.cpu for: app",
            "pods \"web-x-default-x-a\" is forbidden: violates PodSecurity \"restricted:latest\": runAsNonRoot != true",
        ] {
            assert_eq!(
                reason(&refused(message)).as_deref(),
                Some(rcsync_proto::HOST_POD_REFUSED),
                "{message}"
            );
        }
        let invalid: kube::core::Status = serde_json::from_value(json!({
            "code": 422, "reason": "Invalid",
            "message": "Pod \"web-x-default-x-a\" is invalid: spec.containers[0].resources.requests: Invalid value: \"2\": must be less than or equal to cpu limit of 1",
        }))
        .unwrap();
        let invalid = kube_status(&kube::Error::Api(Box::new(invalid)), tenant);
        assert_eq!(reason(&invalid).as_deref(), Some(rcsync_proto::HOST_POD_REFUSED));
        // What the host may cure any moment carries no reason: retried on the usual backoff.
        for message in [
            "pod rejected: RuntimeClass \"kata\" not found",
            "pod rejected: conflict: runtimeClass.scheduling.nodeSelector[pool] = kata; pod.spec.nodeSelector[pool] = gvisor",
            "pods \"web-x-default-x-a\" is forbidden: User \"system:serviceaccount:rcsync:host-agent\" cannot create resource \"pods\" in API group \"\" in the namespace \"ns-a\"",
            "pods \"web-x-default-x-a\" is forbidden: unable to create new content in namespace ns-a because it is being terminated",
        ] {
            assert_eq!(reason(&refused(message)), None, "{message}");
        }
    }
}
