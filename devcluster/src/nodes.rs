//! Simulated nodes (`serve --nodes N`), as kwok does: Nodes with capacity, labels, a Ready
//! condition and heartbeats through Leases in `kube-node-lease`; a scheduler that binds Pods; a
//! kubelet stand-in that runs them. Without `--nodes` none of this runs and Pods stay Pending.
//!
//! ```text
//!  store changes (Pods, Nodes, RuntimeClasses, ─┬─► scheduler: bound claims (crate::claims),
//!                 PersistentVolumeClaims)       │   nodeSelector, taints/tolerations,
//!  1 s ticker (and 10 s heartbeats) ────────────┘   the RuntimeClass's scheduling, inter-pod
//!                                                   affinity (crate::affinity) ─► spec.nodeName,
//!                                                   PodScheduled, or Unschedulable + FailedScheduling
//!                  bound Pods ─► kubelet: claims bound? handler served? ─► Running (IP, start time, ready)
//!                                                   or ContainerCreating + FailedCreatePodSandBox
//!                running Pods ─► kubelet: deadline, ephemeral containers (crate::ephemeral),
//!                                readiness gates, resizes (crate::resize)
//!  deleted Pods: terminated within their grace period and removed (api::schedule_pod_removal)
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::watch;

use crate::admission::now;
use crate::store::{Outcome, Store};

/// What the simulated nodes are.
#[derive(Clone, Debug, Default)]
pub struct NodeOptions {
    /// How many nodes (0: none, Pods are never scheduled).
    pub count: usize,
    /// RuntimeClass handlers the nodes run; `None`: every handler.
    pub handlers: Option<Vec<String>>,
}

fn node_name(i: usize) -> String {
    format!("devcluster-node-{i}")
}

fn node_object(i: usize) -> Value {
    let name = node_name(i);
    let now = now();
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": name, "uid": uuid::Uuid::new_v4().to_string(), "creationTimestamp": now,
            "labels": {
                "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                "node.kubernetes.io/instance-type": "devcluster",
            },
        },
        "spec": {},
        "status": {
            "capacity": {"cpu": "8", "memory": "32Gi", "pods": "110", "ephemeral-storage": "100Gi"},
            "allocatable": {"cpu": "8", "memory": "32Gi", "pods": "110", "ephemeral-storage": "100Gi"},
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "kubelet is posting ready status",
                "lastHeartbeatTime": now, "lastTransitionTime": now,
            }],
            "addresses": [
                {"type": "InternalIP", "address": format!("10.0.0.{}", i + 10)},
                {"type": "Hostname", "address": name},
            ],
            "nodeInfo": {
                "kubeletVersion": crate::api::KUBERNETES_VERSION, "containerRuntimeVersion": "devcluster://1",
                "operatingSystem": "linux", "architecture": "amd64", "osImage": "devcluster",
                "kernelVersion": "", "kubeProxyVersion": "", "machineID": "", "systemUUID": "", "bootID": "",
            },
        },
    })
}

fn put(
    store: &Store,
    storage: &'static str,
    namespace: &str,
    name: &str,
    edit: impl FnOnce(Option<&Value>) -> Option<Value>,
) {
    let _ = store.transact(
        storage,
        (namespace.to_string(), name.to_string()),
        |_, current| {
            Ok(match edit(current) {
                Some(obj) => Outcome::Put(obj),
                None => Outcome::Unchanged,
            })
        },
    );
}

/// Renews each node's Lease (and its Ready heartbeat less often), as a kubelet does.
fn heartbeat(store: &Store, options: &NodeOptions, with_status: bool) {
    let micro = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    for i in 0..options.count {
        let name = node_name(i);
        put(store, "leases", "kube-node-lease", &name, |current| {
            let mut lease = current.cloned().unwrap_or_else(|| {
                json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                       "metadata": {"name": name, "namespace": "kube-node-lease",
                                    "uid": uuid::Uuid::new_v4().to_string(), "creationTimestamp": now()},
                       "spec": {"holderIdentity": name, "leaseDurationSeconds": 40}})
            });
            lease["spec"]["renewTime"] = json!(micro);
            Some(lease)
        });
        if with_status {
            put(store, "nodes", "", &name, |current| {
                let mut node = current.cloned().unwrap_or_else(|| node_object(i));
                node["status"]["conditions"][0]["lastHeartbeatTime"] = json!(now());
                Some(node)
            });
        }
    }
}

/// Marks `pod` unschedulable on the `n` nodes for `why` (upstream's words), with its
/// `FailedScheduling` event, unless it says so already.
fn mark_unschedulable(store: &Store, pod: &Value, why: &str, n: usize) {
    let message = format!(
        "0/{n} nodes are available: {why}. preemption: 0/{n} nodes are available: {n} Preemption is not helpful for scheduling."
    );
    let already = pod["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "PodScheduled" && c["message"] == message.as_str())
    });
    if already {
        return;
    }
    let ns = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = pod["metadata"]["name"].as_str().unwrap_or_default();
    let uid = &pod["metadata"]["uid"];
    let mut marked = None;
    put(store, "pods", ns, name, |current| {
        let mut p = current.filter(|c| c["metadata"]["uid"] == *uid)?.clone();
        p["status"]["conditions"] = merged_conditions(
            &p["status"]["conditions"],
            vec![json!({
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": message, "lastTransitionTime": now(),
            })],
        );
        marked = Some(p.clone());
        Some(p)
    });
    if let Some(p) = marked {
        event(
            store,
            &p,
            "Warning",
            "FailedScheduling",
            &message,
            "default-scheduler",
            None,
        );
    }
}

/// Records an Event about a Pod, as the scheduler or kubelet would (or about any namespaced
/// object, its kind and apiVersion named in the event).
pub(crate) fn event(
    store: &Store,
    pod: &Value,
    kind: &str,
    reason: &str,
    message: &str,
    component: &str,
    host: Option<&str>,
) {
    let ns = pod["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let pod_name = pod["metadata"]["name"].as_str().unwrap_or_default();
    let name = format!("{pod_name}.{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
    let now = now();
    let mut source = json!({"component": component});
    if let Some(host) = host {
        source["host"] = json!(host);
    }
    let obj = json!({
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": name, "namespace": ns, "uid": uuid::Uuid::new_v4().to_string(), "creationTimestamp": now},
        "involvedObject": {"apiVersion": pod.get("apiVersion").cloned().unwrap_or(json!("v1")),
                           "kind": pod.get("kind").cloned().unwrap_or(json!("Pod")), "namespace": ns, "name": pod_name,
                           "uid": pod["metadata"]["uid"], "resourceVersion": pod["metadata"]["resourceVersion"]},
        "reason": reason, "message": message, "type": kind, "source": source,
        "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        "reportingComponent": component, "reportingInstance": host.unwrap_or(component),
    });
    put(store, crate::resources::STORAGE_EVENTS, &ns, &name, |_| Some(obj));
}

fn strings(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `tolerations` tolerate `taint` (key, value, effect; `Exists` and empty keys as upstream).
fn tolerates(tolerations: &[Value], taint: &Value) -> bool {
    tolerations.iter().any(|t| {
        let effect_ok = t["effect"]
            .as_str()
            .is_none_or(|e| e.is_empty() || Some(e) == taint["effect"].as_str());
        let key = t["key"].as_str().unwrap_or_default();
        let key_ok = key.is_empty() || Some(key) == taint["key"].as_str();
        let value_ok = match t["operator"].as_str() {
            Some("Exists") => true,
            _ => t["value"].as_str().unwrap_or_default() == taint["value"].as_str().unwrap_or_default(),
        };
        effect_ok && key_ok && (value_ok || key.is_empty())
    })
}

/// The scheduler's and kubelet's pass over every Pod.
fn reconcile(store: &Store, options: &NodeOptions, next_ip: &mut u32) {
    let (nodes, _) = store.list("nodes", None);
    let ours: Vec<&Arc<Value>> = nodes
        .iter()
        .filter(|n| {
            n["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("devcluster-node-"))
        })
        .collect();
    let (pods, _) = store.list("pods", None);
    let node_labels = |name: &str| {
        ours.iter()
            .find(|n| n["metadata"]["name"] == name)
            .map(|n| strings(&n["metadata"]["labels"]))
    };
    // The Pods on the nodes, for inter-pod affinity; each binding of this pass joins them.
    let mut placed: Vec<crate::affinity::Placed> = pods
        .iter()
        .filter(|p| p.pointer("/metadata/deletionTimestamp").is_none())
        .filter(|p| !matches!(p["status"]["phase"].as_str(), Some("Succeeded" | "Failed")))
        .filter_map(|p| {
            let node_labels = node_labels(p.pointer("/spec/nodeName")?.as_str()?)?;
            Some(crate::affinity::Placed::new(p, node_labels))
        })
        .collect();
    for pod in pods {
        if pod.pointer("/metadata/deletionTimestamp").is_some() {
            continue;
        }
        let ns = pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = pod["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let uid = pod["metadata"]["uid"].as_str().unwrap_or_default().to_string();
        let class = pod
            .pointer("/spec/runtimeClassName")
            .and_then(Value::as_str)
            .and_then(|c| store.get("runtimeclasses", "", c));
        match pod.pointer("/spec/nodeName").and_then(Value::as_str) {
            None | Some("") => {
                if pod
                    .pointer("/spec/schedulingGates")
                    .and_then(Value::as_array)
                    .is_some_and(|g| !g.is_empty())
                {
                    continue;
                }
                // The Pod's claims first, as upstream's VolumeBinding prefilter: no node helps.
                if let Some(why) = crate::claims::unschedulable(store, &pod) {
                    if !ours.is_empty() {
                        mark_unschedulable(store, &pod, &why, ours.len());
                    }
                    continue;
                }
                let mut selector = strings(&pod["spec"]["nodeSelector"]);
                let mut tolerations = pod["spec"]["tolerations"].as_array().cloned().unwrap_or_default();
                if let Some(rc) = &class {
                    selector.extend(strings(&rc["scheduling"]["nodeSelector"]));
                    tolerations.extend(
                        rc["scheduling"]["tolerations"]
                            .as_array()
                            .cloned()
                            .unwrap_or_default(),
                    );
                }
                // Why a node does not take the Pod (upstream's words), `None` when it does.
                let misfit = |node: &Value| -> Option<&'static str> {
                    let labels = strings(&node["metadata"]["labels"]);
                    let placeable = selector.iter().all(|(k, v)| labels.get(k) == Some(v))
                        && node["spec"]["taints"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .all(|taint| {
                                !matches!(taint["effect"].as_str(), Some("NoSchedule" | "NoExecute"))
                                    || tolerates(&tolerations, taint)
                            });
                    if !placeable {
                        return Some("node(s) didn't match Pod's node affinity/selector");
                    }
                    crate::affinity::mismatch(store, &pod, &labels, &placed)
                };
                let misfits: Vec<Option<&'static str>> = ours.iter().map(|n| misfit(n)).collect();
                match ours
                    .iter()
                    .zip(&misfits)
                    .find(|(_, why)| why.is_none())
                    .map(|(n, _)| n)
                {
                    Some(node) => {
                        let node_name = node["metadata"]["name"].as_str().unwrap_or_default().to_string();
                        let mut bound = None;
                        put(store, "pods", &ns, &name, |current| {
                            let mut p = current.filter(|c| c["metadata"]["uid"] == uid.as_str())?.clone();
                            p["spec"]["nodeName"] = json!(node_name);
                            p["status"]["conditions"] = merged_conditions(
                                &p["status"]["conditions"],
                                vec![
                                    json!({"type": "PodScheduled", "status": "True", "lastTransitionTime": now()}),
                                ],
                            );
                            bound = Some(p.clone());
                            Some(p)
                        });
                        if let Some(p) = bound {
                            crate::claims::select_node(store, &p, &node_name);
                            placed.push(crate::affinity::Placed::new(
                                &p,
                                strings(&node["metadata"]["labels"]),
                            ));
                            let message = format!("Successfully assigned {ns}/{name} to {node_name}");
                            event(
                                store,
                                &p,
                                "Normal",
                                "Scheduled",
                                &message,
                                "default-scheduler",
                                None,
                            );
                        }
                    }
                    None => {
                        let n = ours.len();
                        // Upstream counts the nodes per reason and lists the reasons sorted.
                        let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
                        for why in misfits.iter().flatten() {
                            *reasons.entry(why).or_default() += 1;
                        }
                        let reasons: Vec<String> = reasons
                            .iter()
                            .map(|(why, count)| format!("{count} {why}"))
                            .collect();
                        if n > 0 {
                            mark_unschedulable(store, &pod, &reasons.join(", "), n);
                        }
                    }
                }
            }
            Some(node) if node.starts_with("devcluster-node-") && pod["status"]["phase"] == "Pending" => {
                // The kubelet mounts the Pod's claims before it starts it: one of a
                // WaitForFirstConsumer class is provisioned once the Pod was placed.
                if !crate::claims::mounted(store, &pod) {
                    continue;
                }
                let node = node.to_string();
                let handler = class
                    .as_ref()
                    .and_then(|rc| rc["handler"].as_str().map(String::from));
                let served = match (&handler, &options.handlers) {
                    (Some(h), Some(list)) => list.contains(h),
                    _ => true,
                };
                let containers: Vec<Value> =
                    pod["spec"]["containers"].as_array().cloned().unwrap_or_default();
                if !served {
                    let handler = handler.unwrap_or_default();
                    let waiting = pod["status"]["containerStatuses"]
                        .as_array()
                        .is_some_and(|s| !s.is_empty());
                    if waiting {
                        continue;
                    }
                    let message = format!(
                        "Failed to create pod sandbox: rpc error: code = Unknown desc = failed to get sandbox runtime: no runtime for \"{handler}\" is configured"
                    );
                    let mut updated = None;
                    put(store, "pods", &ns, &name, |current| {
                        let mut p = current.filter(|c| c["metadata"]["uid"] == uid.as_str())?.clone();
                        p["status"]["containerStatuses"] = containers
                            .iter()
                            .map(|c| json!({"name": c["name"], "image": c["image"], "imageID": "", "ready": false, "restartCount": 0,
                                            "started": false, "state": {"waiting": {"reason": "ContainerCreating"}}}))
                            .collect();
                        updated = Some(p.clone());
                        Some(p)
                    });
                    if let Some(p) = updated {
                        event(
                            store,
                            &p,
                            "Warning",
                            "FailedCreatePodSandBox",
                            &message,
                            "kubelet",
                            Some(&node),
                        );
                    }
                    continue;
                }
                *next_ip += 1;
                let ip = format!("10.244.{}.{}", (*next_ip / 250) % 250, *next_ip % 250 + 2);
                let host_ip = ours
                    .iter()
                    .find(|n| n["metadata"]["name"] == node.as_str())
                    .and_then(|n| n["status"]["addresses"][0]["address"].as_str())
                    .unwrap_or("10.0.0.10")
                    .to_string();
                let mut started = None;
                put(store, "pods", &ns, &name, |current| {
                    let mut p = current.filter(|c| c["metadata"]["uid"] == uid.as_str())?.clone();
                    let now = now();
                    let condition =
                        |kind: &str| json!({"type": kind, "status": "True", "lastTransitionTime": now});
                    let conditions = merged_conditions(
                        &p["status"]["conditions"],
                        vec![
                            condition("PodReadyToStartContainers"),
                            condition("Initialized"),
                            ready_condition(&p, &now),
                            condition("ContainersReady"),
                            condition("PodScheduled"),
                        ],
                    );
                    let qos = crate::resize::qos_class(&p);
                    p["status"] = json!({
                        "phase": "Running",
                        "conditions": conditions,
                        "hostIP": host_ip, "hostIPs": [{"ip": host_ip}],
                        "podIP": ip, "podIPs": [{"ip": ip}],
                        "startTime": now, "qosClass": qos,
                        "containerStatuses": containers.iter().map(|c| {
                            let mut status = json!({
                                "name": c["name"], "image": c["image"], "imageID": format!("{}@sha256:devcluster", c["image"].as_str().unwrap_or_default()),
                                "containerID": format!("devcluster://{}", uuid::Uuid::new_v4().simple()),
                                "ready": true, "started": true, "restartCount": 0, "state": {"running": {"startedAt": now}},
                            });
                            crate::resize::started(c, &mut status);
                            status
                        }).collect::<Vec<_>>(),
                    });
                    started = Some(p.clone());
                    Some(p)
                });
                if let Some(p) = started {
                    for c in &containers {
                        let message = format!("Started container {}", c["name"].as_str().unwrap_or_default());
                        event(store, &p, "Normal", "Started", &message, "kubelet", Some(&node));
                    }
                }
            }
            // A running Pod's readiness follows its readiness gates' conditions, which its
            // controllers set (through the status subresource) at any time.
            Some(node) if node.starts_with("devcluster-node-") && pod["status"]["phase"] == "Running" => {
                if past_deadline(&pod) {
                    let mut failed = None;
                    put(store, "pods", &ns, &name, |current| {
                        let mut p = current.filter(|c| c["metadata"]["uid"] == uid.as_str())?.clone();
                        if !past_deadline(&p) || p["status"]["phase"] != "Running" {
                            return None;
                        }
                        fail_for_deadline(&mut p, &now());
                        failed = Some(p.clone());
                        Some(p)
                    });
                    if let Some(p) = failed {
                        event(
                            store,
                            &p,
                            "Normal",
                            "DeadlineExceeded",
                            DEADLINE_MESSAGE,
                            "kubelet",
                            Some(node),
                        );
                    }
                    continue;
                }
                // Ephemeral containers (`kubectl debug`) added since the last pass start.
                if crate::ephemeral::unstarted(&pod) {
                    let mut started = None;
                    put(store, "pods", &ns, &name, |current| {
                        let mut p = current.filter(|c| c["metadata"]["uid"] == uid.as_str())?.clone();
                        let names = crate::ephemeral::start(&mut p, &now());
                        (!names.is_empty()).then(|| {
                            started = Some((p.clone(), names));
                            p
                        })
                    });
                    if let Some((p, names)) = started {
                        for name in names {
                            let message = format!("Started container {name}");
                            event(store, &p, "Normal", "Started", &message, "kubelet", Some(node));
                        }
                    }
                }
                // A resize (`pods/resize`) the containers do not run with yet.
                if crate::resize::pending(&pod) {
                    let allocatable = ours
                        .iter()
                        .find(|n| n["metadata"]["name"] == node)
                        .map(|n| n["status"]["allocatable"].clone())
                        .unwrap_or_default();
                    let mut infeasible = None;
                    put(store, "pods", &ns, &name, |current| {
                        let mut p = current.filter(|c| c["metadata"]["uid"] == uid.as_str())?.clone();
                        if !crate::resize::pending(&p) {
                            return None;
                        }
                        let message = crate::resize::actuate(&mut p, &allocatable, &now());
                        // An infeasible resize is reported once, not at every pass.
                        let reported = message.as_deref().is_some_and(|message| {
                            current.is_some_and(|c| {
                                c["status"]["conditions"].as_array().is_some_and(|l| {
                                    l.iter().any(|c| {
                                        c["type"] == "PodResizePending"
                                            && c["message"].as_str() == Some(message)
                                    })
                                })
                            })
                        });
                        if reported {
                            return None;
                        }
                        infeasible = message.map(|m| (p.clone(), m));
                        Some(p)
                    });
                    if let Some((p, message)) = infeasible {
                        event(
                            store,
                            &p,
                            "Warning",
                            "ResizeInfeasible",
                            &message,
                            "kubelet",
                            Some(node),
                        );
                    }
                }
                // Most Pods have no readiness gate: their Ready condition is the kubelet's own.
                if pod["spec"]["readinessGates"].as_array().is_none_or(Vec::is_empty) {
                    continue;
                }
                let current = pod["status"]["conditions"]
                    .as_array()
                    .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
                    .map(|c| (c["status"].clone(), c["message"].clone()));
                let want = ready_condition(&pod, &now());
                if current == Some((want["status"].clone(), want["message"].clone())) {
                    continue;
                }
                put(store, "pods", &ns, &name, |current| {
                    let mut p = current.filter(|c| c["metadata"]["uid"] == uid.as_str())?.clone();
                    let ready = ready_condition(&p, &now());
                    p["status"]["conditions"] = merged_conditions(&p["status"]["conditions"], vec![ready]);
                    Some(p)
                });
            }
            Some(_) => {}
        }
    }
}

/// The kubelet's words for a Pod that outlived its `activeDeadlineSeconds`.
const DEADLINE_MESSAGE: &str = "Pod was active on the node longer than the specified deadline";

/// Whether a running Pod has been active longer than its `activeDeadlineSeconds` allow.
fn past_deadline(pod: &Value) -> bool {
    let Some(deadline) = pod["spec"]["activeDeadlineSeconds"].as_i64() else {
        return false;
    };
    let Some(started) = pod["status"]["startTime"]
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
    else {
        return false;
    };
    chrono::Utc::now()
        .signed_duration_since(started)
        .num_milliseconds()
        >= deadline.saturating_mul(1000)
}

/// Ends a Pod as the kubelet does when its deadline passes: its containers killed, the Pod Failed
/// with reason `DeadlineExceeded`.
fn fail_for_deadline(pod: &mut Value, now: &str) {
    let status = &mut pod["status"];
    status["phase"] = json!("Failed");
    status["reason"] = json!("DeadlineExceeded");
    status["message"] = json!(DEADLINE_MESSAGE);
    let not_ready = |kind: &str| json!({"type": kind, "status": "False", "reason": "PodFailed", "lastTransitionTime": now});
    status["conditions"] = merged_conditions(
        &status["conditions"],
        vec![not_ready("Ready"), not_ready("ContainersReady")],
    );
    if let Some(containers) = status["containerStatuses"].as_array_mut() {
        for c in containers {
            let started = c["state"]["running"]["startedAt"].clone();
            c["ready"] = json!(false);
            c["started"] = json!(false);
            c["state"] = json!({"terminated": {"exitCode": 137, "reason": "Error", "startedAt": started, "finishedAt": now}});
        }
    }
}

/// `fresh` conditions, and those of `old` of other types (a readiness gate's, set by a
/// controller), as the kubelet keeps them.
fn merged_conditions(old: &Value, fresh: Vec<Value>) -> Value {
    let mut merged = fresh;
    for condition in old.as_array().into_iter().flatten() {
        if !merged.iter().any(|c| c["type"] == condition["type"]) {
            merged.push(condition.clone());
        }
    }
    Value::Array(merged)
}

/// A running Pod's Ready condition: True once every readiness gate's condition is True, else
/// False with the kubelet's words for the first gates that are not.
fn ready_condition(pod: &Value, now: &str) -> Value {
    let conditions = pod["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let unready: Vec<String> = pod["spec"]["readinessGates"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|gate| {
            let kind = gate["conditionType"].as_str()?;
            match conditions.iter().find(|c| c["type"] == kind) {
                None => Some(format!(
                    "corresponding condition of pod readiness gate {kind:?} does not exist."
                )),
                Some(c) if c["status"] != "True" => Some(format!(
                    "the status of pod readiness gate {kind:?} is not \"True\", but {}",
                    c["status"].as_str().unwrap_or_default()
                )),
                Some(_) => None,
            }
        })
        .collect();
    if unready.is_empty() {
        json!({"type": "Ready", "status": "True", "lastTransitionTime": now})
    } else {
        json!({"type": "Ready", "status": "False", "reason": "ReadinessGatesNotReady",
               "message": unready.join(", "), "lastTransitionTime": now})
    }
}

/// Registers the nodes and runs the scheduler and kubelet until `stop`.
pub async fn run(store: Arc<Store>, options: NodeOptions, mut stop: watch::Receiver<bool>) {
    for i in 0..options.count {
        let node = node_object(i);
        put(&store, "nodes", "", &node_name(i), |current| {
            current.is_none().then_some(node)
        });
    }
    heartbeat(&store, &options, false);
    let mut changes = store.changes();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut ticks: u64 = 0;
    let mut next_ip = 0;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            change = changes.recv() => {
                let relevant = match &change {
                    Ok(c) => matches!(c.storage, "pods" | "nodes" | "runtimeclasses" | crate::claims::CLAIMS),
                    Err(_) => true,
                };
                if !relevant {
                    continue;
                }
            }
            _ = ticker.tick() => {
                ticks += 1;
                if ticks.is_multiple_of(10) {
                    heartbeat(&store, &options, ticks.is_multiple_of(40));
                }
            }
        }
        reconcile(&store, &options, &mut next_ip);
    }
}
