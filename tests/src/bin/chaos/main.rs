//! `chaos`: a seeded, repeatable chaos run of the whole rcsync system.
//!
//! ```text
//!  churn (host classes, host events about host Pods, drains evicting them, ─┐
//!         tenants file, virtual Pods, budgets and claims, tenant-made       │
//!         classes)                                                          │
//!  faults (kills, SIGTERMs, API server restarts, cut/stalled connections,    ├─► real processes
//!          token and client CA rotation, config edits) at seeded moments     ┘
//!  invariants: continuously (harness watches, logs, memory) and at every quiet window
//!              (ground truth from the API servers, within a convergence deadline)
//! ```
//!
//! `cargo run --release -p rcsync-tests --bin chaos -- --seed S --duration 90s` exits 0 only when
//! every invariant held; any failure prints the seed and the command that replays it. The last
//! stdout line counts the faults: `faults: agent-kill=N agent-term=N ...`. `--self-test` breaks
//! each invariant on purpose and exits 1 naming every one, proving the checks can fail.
#![forbid(unsafe_code)]

mod checks;
mod timeline;
mod world;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::Parser;
use k8s_openapi::api::core::v1::{Event as CoreEvent, PersistentVolumeClaim, Pod};
use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::json;
use tokio::sync::{Mutex, watch};
use tokio::time::Instant;

use crate::checks::Violations;
use crate::timeline::{TenantConfig, Timeline};
use crate::world::{TENANTS, TOKEN_TENANTS, World};
use rcsync_tests::proxy::Mode;

/// Chaos and soak for rcsync: churn and faults against real processes, invariants checked
/// throughout.
#[derive(Parser, Debug)]
#[command(name = "chaos")]
struct Cli {
    /// Seed of every random choice (what churns, which fault, when).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How long to churn and inject faults, e.g. 90s or 10m.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// A quiet window (no churn, no faults, convergence checked) this often.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    quiet_every: Duration,
    /// How long the system may take to converge in a quiet window.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    converge_within: Duration,
    /// Break every invariant on purpose; exits 1 naming each (0 would mean a check cannot fail).
    #[arg(long)]
    self_test: bool,
    /// Keep the run directory (logs, state files) even when the run passes.
    #[arg(long)]
    keep: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s or 10m"))?;
    match unit {
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?}: the unit must be s, m or h")),
    }
}

/// The fault kinds, in the order the final line prints them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    AgentKill,
    AgentTerm,
    ApiserverRestart,
    ConnCut,
    ConnStall,
    TokenRotation,
    ClientCaRotation,
    ConfigEdit,
}

const FAULTS: [Fault; 8] = [
    Fault::AgentKill,
    Fault::AgentTerm,
    Fault::ApiserverRestart,
    Fault::ConnCut,
    Fault::ConnStall,
    Fault::TokenRotation,
    Fault::ClientCaRotation,
    Fault::ConfigEdit,
];

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::AgentKill => "agent-kill",
            Fault::AgentTerm => "agent-term",
            Fault::ApiserverRestart => "apiserver-restart",
            Fault::ConnCut => "conn-cut",
            Fault::ConnStall => "conn-stall",
            Fault::TokenRotation => "token-rotation",
            Fault::ClientCaRotation => "client-ca-rotation",
            Fault::ConfigEdit => "config-edit",
        }
    }
}

/// Host class names the churn uses.
const CLASSES: [&str; 6] = ["c0", "c1", "c2", "c3", "c4", "c5"];
const HANDLERS: [&str; 3] = ["runc", "runsc", "kata"];

fn initial_tenants() -> Vec<TenantConfig> {
    vec![
        TenantConfig {
            name: "a".into(),
            enabled: true,
            selector: BTreeMap::from([("env".into(), "dev".into())]),
        },
        TenantConfig {
            name: "b".into(),
            enabled: true,
            selector: BTreeMap::from([("env".into(), "prod".into())]),
        },
    ]
}

/// Operations the churn performed.
static OPERATIONS: AtomicU64 = AtomicU64::new(0);

fn class_object(name: &str, handler: &str, env: &str, tier: &str) -> RuntimeClass {
    serde_json::from_value(json!({
        "apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
        "metadata": {"name": name, "labels": {"env": env, "tier": tier}},
        "handler": handler,
    }))
    .expect("a valid RuntimeClass")
}

/// One host-side churn step: a class created, relabelled in or out of selectors, given another
/// handler (deleted and recreated: handlers are immutable), or deleted.
async fn host_churn_step(rng: &mut StdRng, client: &kube::Client, timeline: &Timeline) {
    let api: Api<RuntimeClass> = Api::all(client.clone());
    let name = CLASSES[rng.random_range(0..CLASSES.len())];
    let env = if rng.random_bool(0.5) { "dev" } else { "prod" };
    let tier = if rng.random_bool(0.5) { "a" } else { "b" };
    let handler = HANDLERS[rng.random_range(0..HANDLERS.len())];
    let labels_of = |rc: &RuntimeClass| rc.metadata.labels.clone().unwrap_or_default();
    let result = match rng.random_range(0..4) {
        0 => api
            .create(&PostParams::default(), &class_object(name, handler, env, tier))
            .await
            .map(|rc| Some(labels_of(&rc))),
        1 => api
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"env": env}}})),
            )
            .await
            .map(|rc| Some(labels_of(&rc))),
        2 => {
            if api.delete(name, &DeleteParams::default()).await.is_ok() {
                timeline.class_written(name, None);
            }
            api.create(&PostParams::default(), &class_object(name, handler, env, tier))
                .await
                .map(|rc| Some(labels_of(&rc)))
        }
        _ => api.delete(name, &DeleteParams::default()).await.map(|_| None),
    };
    if let Ok(labels) = result {
        timeline.class_written(name, labels);
        OPERATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

/// One host-side kubelet step: an event about a random host Pod of a random tenant recorded, or
/// an event already about it repeated (its count raised), as a kubelet backing off does.
async fn host_event_step(rng: &mut StdRng, client: &kube::Client) {
    let namespace = world::host_namespace(TENANTS[rng.random_range(0..TENANTS.len())]);
    let Ok(pods) = Api::<Pod>::namespaced(client.clone(), &namespace)
        .list(&ListParams::default())
        .await
    else {
        return;
    };
    if pods.items.is_empty() {
        return;
    }
    let pod = &pods.items[rng.random_range(0..pods.items.len())];
    let (Some(name), Some(uid)) = (pod.metadata.name.clone(), pod.metadata.uid.clone()) else {
        return;
    };
    let events: Api<CoreEvent> = Api::namespaced(client.clone(), &namespace);
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let about = ListParams::default().fields(&format!("involvedObject.name={name},involvedObject.uid={uid}"));
    let earlier = events.list(&about).await.map(|l| l.items).unwrap_or_default();
    let result = match earlier.first() {
        Some(event) if rng.random_bool(0.5) => {
            let count = event.count.unwrap_or(1) + 1;
            events
                .patch(
                    event.metadata.name.as_deref().unwrap_or_default(),
                    &PatchParams::default(),
                    &Patch::Merge(json!({"count": count, "lastTimestamp": now})),
                )
                .await
                .map(|_| ())
        }
        _ => {
            let event: CoreEvent = serde_json::from_value(json!({
                "metadata": {"name": format!("{name}.{:016x}", rng.random::<u64>())},
                "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": namespace, "name": name, "uid": uid},
                "reason": "BackOff", "type": "Warning",
                "message": format!("Back-off restarting failed container app in pod {namespace}/{name}"),
                "source": {"component": "kubelet", "host": "node-1"},
                "count": 1, "firstTimestamp": now, "lastTimestamp": now,
            }))
            .expect("a valid Event");
            events.create(&PostParams::default(), &event).await.map(|_| ())
        }
    };
    if result.is_ok() {
        OPERATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

/// One host-side drain step: a random host Pod of a random tenant evicted through
/// `pods/eviction`, as `kubectl drain` does (asked once: a budget's 429 is the drain's answer).
/// A Pod that goes takes its virtual Pod with it; the churn makes Pods of its names again.
async fn host_drain_step(rng: &mut StdRng, evictor: &kube::Client) {
    let namespace = world::host_namespace(TENANTS[rng.random_range(0..TENANTS.len())]);
    let api: Api<Pod> = Api::namespaced(evictor.clone(), &namespace);
    let Ok(pods) = api.list(&ListParams::default()).await else {
        return;
    };
    if pods.items.is_empty() {
        return;
    }
    let pod = &pods.items[rng.random_range(0..pods.items.len())];
    let Some(name) = pod.metadata.name.as_deref() else {
        return;
    };
    if api.evict(name, &Default::default()).await.is_ok() {
        OPERATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

/// One host-side cleanup step: a random object rcsync holds for a tenant deleted under it, as a
/// cleanup job or an operator might: a copy (a ConfigMap or Secret a tenant's Pods use, such as a
/// Pod's token Secret) or a host PodDisruptionBudget. The host agent sees it go and the virtual
/// agent makes it again.
async fn host_cleanup_step(rng: &mut StdRng, client: &kube::Client) {
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    let tenant = TENANTS[rng.random_range(0..TENANTS.len())];
    let namespace = world::host_namespace(tenant);
    let managed =
        ListParams::default().labels(&format!("{}={tenant}", rcsync_core::naming::LABEL_MANAGED_BY));
    async fn names<K>(api: &Api<K>, managed: &ListParams) -> Vec<String>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        api.list_metadata(managed)
            .await
            .map(|l| l.items.into_iter().filter_map(|m| m.metadata.name).collect())
            .unwrap_or_default()
    }
    async fn delete_one<K>(rng: &mut StdRng, api: &Api<K>, names: &[String]) -> bool
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        if names.is_empty() {
            return false;
        }
        let name = &names[rng.random_range(0..names.len())];
        api.delete(name, &DeleteParams::default()).await.is_ok()
    }
    let deleted = match rng.random_range(0..3) {
        0 => {
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
            delete_one(rng, &api, &names(&api, &managed).await).await
        }
        1 => {
            let api: Api<Secret> = Api::namespaced(client.clone(), &namespace);
            delete_one(rng, &api, &names(&api, &managed).await).await
        }
        _ => {
            let api: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &namespace);
            delete_one(rng, &api, &names(&api, &managed).await).await
        }
    };
    if deleted {
        OPERATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

/// The readiness gate every churned Pod has, which the churn's "controller" sets.
pub const READINESS_GATE: &str = "example.com/lb-ready";

/// One virtual-side churn step: a Pod created (with an allowed, a disallowed, a missing or no
/// class), relabelled, released from its gate, resized in place, debugged (an ephemeral
/// container added), its readiness gate marked or deleted; now and then a tenant-made RuntimeClass.
async fn virtual_churn_step(rng: &mut StdRng, client: &kube::Client, counter: &mut u64) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let name = format!("p{}", rng.random_range(0..10));
    let result = match rng.random_range(0..15) {
        0..=3 => {
            let class = match rng.random_range(0..8) {
                0 => None,
                1 => Some("missing".to_string()),
                n => Some(CLASSES[(n as usize) % CLASSES.len()].to_string()),
            };
            let mut spec = json!({"containers": [{"name": "app", "image": "registry.example/app:1",
                                                  "resources": {"requests": {"cpu": "100m"}, "limits": {"cpu": "1"}}}],
                                  "readinessGates": [{"conditionType": READINESS_GATE}]});
            // A third talk to their API: a token volume as the ServiceAccount admission adds it
            // (a 20 s token, renewed within the run; upstream asks for 600 s at least).
            if rng.random_bool(0.33) {
                spec["serviceAccountName"] = json!(world::TOKEN_SERVICE_ACCOUNT);
                spec["volumes"] = json!([{"name": "kube-api-access-x", "projected": {"sources": [
                    {"serviceAccountToken": {"path": "token", "expirationSeconds": 20}},
                    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                ]}}]);
                spec["containers"][0]["volumeMounts"] = json!([{"name": "kube-api-access-x", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}]);
            } else if rng.random_bool(0.5) {
                // Half the others read a ConfigMap: its host copy stays while they run (the host
                // churn deletes copies now and then; no token renewal brings this one back).
                spec["containers"][0]["envFrom"] = json!([{"configMapRef": {"name": "kube-root-ca.crt"}}]);
            }
            if let Some(class) = class {
                spec["runtimeClassName"] = json!(class);
            }
            // A third spread from their kind, some over every namespace: on the host, their terms
            // must select the tenant's own Pods only.
            if rng.random_bool(0.33) {
                let mut term = json!({"labelSelector": {"matchLabels": {"rev": "0"}}, "topologyKey": "kubernetes.io/hostname"});
                if rng.random_bool(0.5) {
                    term["namespaceSelector"] = json!({});
                }
                spec["affinity"] = json!({"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                    {"weight": 50, "podAffinityTerm": term}]}});
            }
            // Half wait for a queueing controller (see the release below).
            if rng.random_bool(0.5) {
                spec["schedulingGates"] = json!([{"name": "example.com/queue"}]);
            }
            let pod: Pod = serde_json::from_value(
                json!({"metadata": {"name": name, "labels": {"rev": "0"}}, "spec": spec}),
            )
            .expect("a valid Pod");
            pods.create(&PostParams::default(), &pod).await.map(|_| ())
        }
        4 => pods
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"rev": rng.random_range(0..100).to_string()}}})),
            )
            .await
            .map(|_| ()),
        // A queueing controller admits a gated Pod to a flavor: a node selector added and the
        // gate lifted in one write (refused for a Pod that is not gated: nothing happens).
        5 | 6 => pods
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {
                    "nodeSelector": {"flavor": format!("f{}", rng.random_range(0..3))},
                    "schedulingGates": null,
                }})),
            )
            .await
            .map(|_| ()),
        7 | 8 => pods
            .delete(
                &name,
                &DeleteParams {
                    grace_period_seconds: Some(0),
                    ..Default::default()
                },
            )
            .await
            .map(|_| ()),
        // A vertical autoscaler resizes the Pod in place (within its limit: the QoS class stays).
        11 => pods
            .patch_subresource(
                "resize",
                &name,
                &PatchParams::default(),
                &Patch::Strategic(json!({"spec": {"containers": [{"name": "app", "resources": {
                    "requests": {"cpu": format!("{}m", 100 * rng.random_range(1..10))},
                }}]}})),
            )
            .await
            .map(|_| ()),
        // An operator debugs the Pod (`kubectl debug`): an ephemeral container added; adding one
        // it has again changes nothing.
        12 => pods
            .patch_subresource(
                "ephemeralcontainers",
                &name,
                &PatchParams::default(),
                &Patch::Strategic(json!({"spec": {"ephemeralContainers": [{
                    "name": format!("debug-{}", rng.random_range(0..2)),
                    "image": "registry.example/debug:1",
                    "targetContainerName": "app",
                }]}})),
            )
            .await
            .map(|_| ()),
        // The tenant sets, changes or deletes a PodDisruptionBudget over its Pods (whole
        // numbers, maxUnavailable or percentages; the host must hold each as the virtual
        // cluster counts it).
        13 => {
            let budgets: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), "default");
            let name = format!("b{}", rng.random_range(0..3));
            let spec = match rng.random_range(0..4) {
                0 => json!({"minAvailable": rng.random_range(0..3)}),
                1 => json!({"maxUnavailable": rng.random_range(0..3)}),
                2 => json!({"minAvailable": format!("{}%", 25 * rng.random_range(0..5))}),
                _ => json!(null),
            };
            if spec.is_null() {
                budgets.delete(&name, &DeleteParams::default()).await.map(|_| ())
            } else {
                let mut spec = spec;
                spec["selector"] = json!({"matchLabels": {"rev": "0"}});
                let budget = json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                                    "metadata": {"name": name}, "spec": spec});
                budgets
                    .patch(&name, &PatchParams::apply("chaos").force(), &Patch::Apply(budget))
                    .await
                    .map(|_| ())
            }
        }
        // The tenant makes or deletes a PersistentVolumeClaim (the host must make each, with its
        // uid, and show its status on it).
        14 => {
            let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
            let name = format!("c{}", rng.random_range(0..3));
            if rng.random_bool(0.4) {
                claims.delete(&name, &DeleteParams::default()).await.map(|_| ())
            } else {
                let claim: PersistentVolumeClaim = serde_json::from_value(json!({
                    "metadata": {"name": name},
                    "spec": {"accessModes": ["ReadWriteOnce"],
                             "resources": {"requests": {"storage": format!("{}Gi", rng.random_range(1..4))}}},
                }))
                .expect("a valid PersistentVolumeClaim");
                claims.create(&PostParams::default(), &claim).await.map(|_| ())
            }
        }
        // The tenant's load balancer controller marks the Pod's readiness gate.
        10 => pods
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Strategic(json!({"status": {"conditions": [{
                    "type": READINESS_GATE,
                    "status": if rng.random_bool(0.5) { "True" } else { "False" },
                }]}})),
            )
            .await
            .map(|_| ()),
        _ => {
            *counter += 1;
            let classes: Api<RuntimeClass> = Api::all(client.clone());
            classes
                .create(
                    &PostParams::default(),
                    &class_object(&format!("homemade-{counter}"), "runc", "dev", "a"),
                )
                .await
                .map(|_| ())
        }
    };
    if result.is_ok() {
        OPERATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs churn until `stop`; pauses while `paused`.
fn spawn_churn(
    world: &World,
    seed: u64,
    timeline: &Timeline,
    paused: watch::Receiver<bool>,
    stop: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    let host_kubeconfig = world.dir.join("host.kubeconfig");
    let churner = |mut rng: StdRng, kubeconfig: PathBuf, host: bool| {
        let (mut paused, stop) = (paused.clone(), stop.clone());
        let timeline = timeline.clone();
        tokio::spawn(async move {
            let mut counter = 0;
            let mut client = None;
            let mut evictor = None;
            while !*stop.borrow() {
                if *paused.borrow() {
                    let _ = paused.changed().await;
                    continue;
                }
                if client.is_none() {
                    client = world::client(&kubeconfig).await.ok();
                }
                if host && evictor.is_none() {
                    evictor = world::client_asking_once(&kubeconfig).await.ok();
                }
                if let Some(c) = &client {
                    if host && rng.random_bool(0.3) {
                        host_event_step(&mut rng, c).await;
                    } else if let Some(evictor) = evictor.as_ref().filter(|_| host && rng.random_bool(0.1)) {
                        host_drain_step(&mut rng, evictor).await;
                    } else if host && rng.random_bool(0.1) {
                        host_cleanup_step(&mut rng, c).await;
                    } else if host {
                        host_churn_step(&mut rng, c, &timeline).await;
                    } else {
                        virtual_churn_step(&mut rng, c, &mut counter).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(rng.random_range(50..250))).await;
            }
        })
    };
    tasks.push(churner(
        StdRng::seed_from_u64(seed ^ 0x1000),
        host_kubeconfig,
        true,
    ));
    for (i, t) in TENANTS.iter().enumerate() {
        let kubeconfig = world.dir.join(format!("virtual-{t}.kubeconfig"));
        tasks.push(churner(
            StdRng::seed_from_u64(seed ^ (0x2000 + i as u64)),
            kubeconfig,
            false,
        ));
    }
    tasks
}

/// Injects one fault; returns what it did, for the log.
async fn inject(
    fault: Fault,
    rng: &mut StdRng,
    world: &mut World,
    timeline: &Timeline,
) -> anyhow::Result<String> {
    let dir = world.dir.clone();
    let tenant = rng.random_range(0..TENANTS.len());
    Ok(match fault {
        Fault::AgentKill => {
            let agent = if rng.random_bool(0.5) {
                &mut world.host_agent
            } else {
                &mut world.virtual_agents[tenant]
            };
            agent.stop("KILL").await;
            agent.start(&dir).await?;
            format!("SIGKILL {} and restart", agent.name)
        }
        Fault::AgentTerm => {
            // SIGTERM while Sync responses are in flight: a host class change fans out first.
            let host = world.host_client().await?;
            let api: Api<RuntimeClass> = Api::all(host);
            let _ = api
                .patch(
                    CLASSES[rng.random_range(0..CLASSES.len())],
                    &PatchParams::default(),
                    &Patch::Merge(
                        json!({"metadata": {"labels": {"churn": rng.random_range(0..1000).to_string()}}}),
                    ),
                )
                .await;
            let agent = if rng.random_bool(0.5) {
                &mut world.host_agent
            } else {
                &mut world.virtual_agents[tenant]
            };
            agent.stop("TERM").await;
            agent.start(&dir).await?;
            format!("SIGTERM {} during a Sync response, and restart", agent.name)
        }
        Fault::ApiserverRestart => {
            let server = if rng.random_bool(0.5) {
                &mut world.host_server
            } else {
                &mut world.virtual_servers[tenant]
            };
            server.stop("TERM").await;
            tokio::time::sleep(Duration::from_millis(rng.random_range(200..2000))).await;
            server.start(&dir).await?;
            format!("restart API server {}", server.name)
        }
        Fault::ConnCut => {
            world.proxies[tenant].cut();
            format!("cut tenant {}'s connections to the host agent", TENANTS[tenant])
        }
        Fault::ConnStall => {
            let stall = Duration::from_millis(rng.random_range(1000..5000));
            let mode = if rng.random_bool(0.5) {
                Mode::Stall
            } else {
                Mode::Delay(Duration::from_millis(rng.random_range(50..400)))
            };
            world.proxies[tenant].set(mode);
            tokio::time::sleep(stall).await;
            world.proxies[tenant].set(Mode::Pass);
            format!("{mode:?} tenant {}'s connections for {stall:?}", TENANTS[tenant])
        }
        Fault::TokenRotation => {
            let t = TOKEN_TENANTS[rng.random_range(0..TOKEN_TENANTS.len())];
            let token = format!("token-{t}-{}", rng.random::<u32>());
            // The virtual side first (read at its next connection), then the host (reloaded on
            // change), which ends the streams opened with the old token: the agent reopens them.
            world::replace_file(&dir.join("vtokens").join(format!("{t}.token")), &token)?;
            world::replace_file(&dir.join("tokens").join(format!("{t}.token")), &token)?;
            format!("rotate tenant {t}'s token")
        }
        Fault::ClientCaRotation => {
            let overlap = Duration::from_millis(rng.random_range(0..3000));
            let trusted = world.rotate_client_ca(overlap).await?;
            let trusted = trusted.map_or_else(|| "not within 10 s".to_string(), |t| format!("after {t:?}"));
            format!(
                "rotate the client CA (rotation {}; the host agent trusted both {trusted}; both trusted for {overlap:?} after the certificates moved)",
                world.client_ca.rotations
            )
        }
        Fault::ConfigEdit => {
            let mut tenants = world.tenants.clone();
            if rng.random_bool(0.5) {
                // Tenant a's selector: env=dev or tier=a.
                tenants[0].selector = if tenants[0].selector.contains_key("env") {
                    BTreeMap::from([("tier".into(), "a".into())])
                } else {
                    BTreeMap::from([("env".into(), "dev".into())])
                };
            } else {
                tenants[1].enabled = !tenants[1].enabled;
            }
            world.write_tenants(tenants.clone())?;
            timeline.set_tenants(tenants.clone());
            format!(
                "edit the tenants file: {:?}",
                tenants
                    .iter()
                    .map(|t| (&t.name, t.enabled, &t.selector))
                    .collect::<Vec<_>>()
            )
        }
    })
}

/// The fault schedule: every kind once at a random moment in the first three quarters, then more
/// at random, about one every 6 s; offsets from the start of the churn.
fn schedule(rng: &mut StdRng, duration: Duration) -> Vec<(Duration, Fault)> {
    let span = duration.as_secs_f64();
    let mut plan: Vec<(Duration, Fault)> = FAULTS
        .iter()
        .map(|f| (Duration::from_secs_f64(rng.random_range(0.05..0.75) * span), *f))
        .collect();
    let mut t = 0.05 * span;
    loop {
        t += rng.random_range(2.0..10.0);
        if t > 0.9 * span {
            break;
        }
        plan.push((
            Duration::from_secs_f64(t),
            FAULTS[rng.random_range(0..FAULTS.len())],
        ));
    }
    plan.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
    plan
}

/// Waits until the quiescence checks pass or the deadline; returns the time taken or what is unmet.
async fn converge(world: &World, within: Duration) -> Result<Duration, Vec<(String, String)>> {
    let started = Instant::now();
    let mut told = false;
    loop {
        let unmet = checks::quiescence(world).await;
        if unmet.is_empty() {
            return Ok(started.elapsed());
        }
        if started.elapsed() > within {
            return Err(unmet);
        }
        // A slow convergence says what it waits for (a fast one is the norm).
        if !told && started.elapsed() > Duration::from_secs(5) {
            told = true;
            for (invariant, detail) in unmet.iter().take(3) {
                println!("chaos:   still waiting after 5 s: {invariant}: {detail}");
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Finds the agent binaries next to this one, building them first when run by cargo (without the
/// variables `cargo run` set for this process, which would make that build and the next one from
/// a shell each rebuild ring and everything above it).
fn binaries() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| anyhow::anyhow!("no binary directory"))?;
    if let Ok(cargo) = std::env::var("CARGO") {
        let mut cmd = rcsync_tests::cargo_command(cargo);
        cmd.args([
            "build",
            "--quiet",
            "--bins",
            "-p",
            "host-agent",
            "-p",
            "virtual-agent",
            "-p",
            "devcluster",
        ]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        anyhow::ensure!(cmd.status()?.success(), "building the agents failed");
    }
    for name in ["devcluster", "host-agent", "virtual-agent"] {
        anyhow::ensure!(
            dir.join(name).is_file(),
            "{} is missing: build the workspace's binaries",
            dir.join(name).display()
        );
    }
    Ok(dir)
}

async fn run(cli: &Cli) -> anyhow::Result<bool> {
    let bin = binaries()?;
    let run_dir = tempfile::Builder::new().prefix("rcsync-chaos-").tempdir()?;
    let dir = run_dir.path().to_path_buf();
    println!(
        "chaos: seed {} duration {:?}, logs in {}",
        cli.seed,
        cli.duration,
        dir.join("logs").display()
    );
    let timeline = Timeline::default();
    timeline.set_tenants(initial_tenants());
    let mut world = World::start(&dir, &bin, initial_tenants()).await?;
    let violations = Violations::default();
    checks::follow_host_classes(world.host_client().await?, timeline.clone());
    checks::watch_host_pods(world.host_client().await?, timeline.clone(), violations.clone());
    for (i, t) in TENANTS.iter().enumerate() {
        checks::watch_virtual_classes(
            t,
            world.virtual_client(i).await?,
            timeline.clone(),
            violations.clone(),
        );
    }

    if cli.self_test {
        return self_test(&mut world, &violations).await;
    }

    let mut rng = StdRng::seed_from_u64(cli.seed);
    let plan = schedule(&mut rng, cli.duration);
    let (pause_tx, pause_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let churn = spawn_churn(&world, cli.seed, &timeline, pause_rx, stop_rx);
    let world = Arc::new(Mutex::new(world));
    let scanner = {
        let world = world.clone();
        let violations = violations.clone();
        tokio::spawn(async move {
            let mut reported = BTreeSet::new();
            let mut peak = BTreeMap::new();
            loop {
                checks::scan_processes(&*world.lock().await, &violations, &mut reported, &mut peak);
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        })
    };

    let started = Instant::now();
    let mut counts: BTreeMap<Fault, u32> = FAULTS.iter().map(|f| (*f, 0)).collect();
    let mut convergence = Vec::new();
    let mut quiet_windows = 0;
    let mut next_quiet = cli.quiet_every;
    let mut failed = false;
    for (at, fault) in plan {
        if at >= next_quiet && next_quiet < cli.duration {
            quiet_windows += 1;
            failed |= !quiet_window(&world, &pause_tx, cli, &mut convergence, quiet_windows).await;
            next_quiet += cli.quiet_every;
        }
        tokio::time::sleep_until(started + at).await;
        let mut w = world.lock().await;
        match inject(fault, &mut rng, &mut w, &timeline).await {
            Ok(what) => {
                *counts.get_mut(&fault).expect("every kind is counted") += 1;
                println!(
                    "chaos: {:>6.1}s {}: {what}",
                    started.elapsed().as_secs_f64(),
                    fault.name()
                );
            }
            Err(e) => {
                println!(
                    "chaos: {:>6.1}s {}: FAILED to inject: {e:#}",
                    started.elapsed().as_secs_f64(),
                    fault.name()
                );
                failed = true;
            }
        }
    }
    tokio::time::sleep_until(started + cli.duration).await;
    let _ = stop_tx.send(true);
    for task in churn {
        let _ = task.await;
    }
    quiet_windows += 1;
    failed |= !quiet_window(&world, &pause_tx, cli, &mut convergence, quiet_windows).await;
    scanner.abort();
    // Observations made just now are checked after the timeline had time to catch up.
    tokio::time::sleep(checks::LAG + Duration::from_millis(500)).await;
    {
        let w = world.lock().await;
        checks::scan_processes(&w, &violations, &mut BTreeSet::new(), &mut BTreeMap::new());
    }

    let found = violations.all();
    for (invariant, detail) in &found {
        println!("chaos: VIOLATION {invariant}: {detail}");
    }
    failed |= !found.is_empty();
    convergence.sort();
    println!(
        "chaos: {} operations, {} faults, {} quiet windows, convergence after the last fault p50 {:.2}s p99 {:.2}s max {:.2}s",
        OPERATIONS.load(Ordering::Relaxed),
        counts.values().sum::<u32>(),
        quiet_windows,
        percentile(&convergence, 0.5).as_secs_f64(),
        percentile(&convergence, 0.99).as_secs_f64(),
        convergence.last().copied().unwrap_or_default().as_secs_f64(),
    );
    if failed {
        println!(
            "chaos: FAILED with seed {seed}; replay: cargo run --release -p rcsync-tests --bin chaos -- --seed {seed} --duration {}s (logs kept in {})",
            cli.duration.as_secs(),
            dir.join("logs").display(),
            seed = cli.seed
        );
        let _ = run_dir.keep();
    } else if cli.keep {
        let _ = run_dir.keep();
    }
    println!(
        "faults: {}",
        FAULTS
            .iter()
            .map(|f| format!("{}={}", f.name(), counts[f]))
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(!failed)
}

/// Pauses churn, waits for the last fault's effects to settle and the system to converge, checks
/// the quiescence invariants, resumes. Returns whether it converged in time.
async fn quiet_window(
    world: &Arc<Mutex<World>>,
    pause: &watch::Sender<bool>,
    cli: &Cli,
    convergence: &mut Vec<Duration>,
    n: u32,
) -> bool {
    let _ = pause.send(true);
    let w = world.lock().await;
    let result = converge(&w, cli.converge_within).await;
    drop(w);
    let _ = pause.send(false);
    match result {
        Ok(took) => {
            println!("chaos: quiet window {n}: converged in {:.2}s", took.as_secs_f64());
            convergence.push(took);
            true
        }
        Err(unmet) => {
            println!(
                "chaos: quiet window {n}: NOT converged within {:?}:",
                cli.converge_within
            );
            for (invariant, detail) in unmet {
                println!("chaos: VIOLATION {invariant}: {detail}");
            }
            false
        }
    }
}

/// Breaks every invariant through the API servers (and one log line), with tenant a's virtual
/// agent stopped so nothing repairs it; the checks must name each.
async fn self_test(world: &mut World, violations: &Violations) -> anyhow::Result<bool> {
    let host = world.host_client().await?;
    let classes: Api<RuntimeClass> = Api::all(host.clone());
    classes
        .create(
            &PostParams::default(),
            &class_object("dev-class", "runsc", "dev", "a"),
        )
        .await?;
    classes
        .create(
            &PostParams::default(),
            &class_object("prod-class", "kata", "prod", "b"),
        )
        .await?;
    // A Pod synced before the violations, for host-events-copied and pod-tokens-valid.
    let witness: Pod = serde_json::from_value(json!({"metadata": {"name": "witness"}, "spec": {
        "serviceAccountName": world::TOKEN_SERVICE_ACCOUNT,
        "volumes": [{"name": "kube-api-access-x", "projected": {"sources": [
            {"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}}]}}],
        "containers": [{"name": "app", "image": "x"}],
    }}))?;
    Api::<Pod>::namespaced(world.virtual_client(0).await?, "default")
        .create(&PostParams::default(), &witness)
        .await?;
    match converge(world, Duration::from_secs(30)).await {
        Ok(_) => println!("chaos: self-test: the system converged before the violations"),
        Err(unmet) => anyhow::bail!("the self-test system did not converge: {unmet:?}"),
    }
    world.virtual_agents[0].stop("KILL").await;
    let virt = world.virtual_client(0).await?;
    // class-allowed-at-placement and tenant-isolation: a host Pod with a class tenant a never had,
    // labelled as tenant b's, in a's namespace.
    let host_pods: Api<Pod> = Api::namespaced(host.clone(), &world::host_namespace("a"));
    let rogue: Pod = serde_json::from_value(json!({
        "metadata": {"name": "rogue-x-default-x-a", "labels": {rcsync_core::naming::LABEL_MANAGED_BY: "b"},
                     "annotations": {rcsync_core::naming::ANNOTATION_OBJECT_UID: "no-such-uid"}},
        "spec": {"runtimeClassName": "prod-class", "containers": [{"name": "app", "image": "x"}],
                 "affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                     {"labelSelector": {"matchLabels": {"app": "db"}}, "namespaceSelector": {}, "topologyKey": "kubernetes.io/hostname"}]}}},
    }))?;
    host_pods.create(&PostParams::default(), &rogue).await?;
    // virtual-classes-match-host: a class the selector offers appears while nobody syncs it.
    classes
        .create(
            &PostParams::default(),
            &class_object("late-class", "runc", "dev", "a"),
        )
        .await?;
    // no-tenant-made-classes.
    let virtual_classes: Api<RuntimeClass> = Api::all(virt.clone());
    virtual_classes
        .create(
            &PostParams::default(),
            &class_object("homemade", "runc", "dev", "a"),
        )
        .await?;
    // allowed-pods-on-host and blocked-pods-warned: Pods nobody syncs or warns.
    let pods: Api<Pod> = Api::namespaced(virt.clone(), "default");
    for (name, class) in [("allowed", "dev-class"), ("blocked", "prod-class")] {
        let pod: Pod = serde_json::from_value(
            json!({"metadata": {"name": name}, "spec": {"runtimeClassName": class, "containers": [{"name": "app", "image": "x"}]}}),
        )?;
        pods.create(&PostParams::default(), &pod).await?;
    }
    // budgets-held-on-host: a budget nobody holds on the host.
    let budget: PodDisruptionBudget = serde_json::from_value(json!({
        "metadata": {"name": "unheld"}, "spec": {"minAvailable": 1, "selector": {"matchLabels": {"rev": "0"}}},
    }))?;
    Api::<PodDisruptionBudget>::namespaced(virt.clone(), "default")
        .create(&PostParams::default(), &budget)
        .await?;
    // claims-made-on-host: a claim nobody makes on the host.
    let claim: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "unmade"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }))?;
    Api::<PersistentVolumeClaim>::namespaced(virt.clone(), "default")
        .create(&PostParams::default(), &claim)
        .await?;
    // host-events-copied: the host records an event about the witness's host Pod while nobody
    // copies it.
    let witness_host = host_pods
        .get(&rcsync_core::naming::host_pod_name("witness", "default", "a"))
        .await?;
    let host_ns = world::host_namespace("a");
    // pod-tokens-valid: the witness's token on the host replaced by one nobody issued.
    let token_secret = rcsync_core::naming::host_object_name("witness.rcsync-token", "default", "a");
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(host.clone(), &host_ns)
        .patch(
            &token_secret,
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"token-0": "not-a-token"}})),
        )
        .await?;
    let event: CoreEvent = serde_json::from_value(json!({
        "metadata": {"name": "witness.self-test"},
        "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": host_ns,
                           "name": witness_host.metadata.name, "uid": witness_host.metadata.uid},
        "reason": "BackOff", "type": "Warning", "message": "self-test", "count": 1,
    }))?;
    Api::<CoreEvent>::namespaced(host.clone(), &host_ns)
        .create(&PostParams::default(), &event)
        .await?;
    // no-panic: a panic line in an agent's log.
    let log = world
        .host_agent
        .logs
        .last()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no host agent log"))?;
    let mut text = std::fs::read_to_string(&log)?;
    text.push_str("thread 'main' panicked at host-agent/src/run.rs:1:1: self-test\n");
    std::fs::write(&log, text)?;
    // bounded-memory: a ceiling below any agent's use.
    let mut found = BTreeSet::new();
    let mut reported = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        checks::scan_processes(world, violations, &mut reported, &mut BTreeMap::new());
        for (invariant, _) in violations.all() {
            found.insert(invariant);
        }
        for (invariant, _) in checks::quiescence(world).await {
            found.insert(invariant);
        }
        if found.len() >= checks::ALL.len() - 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if checks::memory_check_fails_below(world, 1) {
        found.insert(checks::BOUNDED_MEMORY.to_string());
    }
    for invariant in checks::ALL {
        if found.contains(invariant) {
            println!("chaos: self-test: VIOLATION {invariant} detected");
        } else {
            println!("chaos: self-test: {invariant} was broken but NOT detected");
        }
    }
    let all = checks::ALL.iter().all(|i| found.contains(*i));
    println!(
        "chaos: self-test: {}",
        if all {
            "every invariant's check fails when broken (exit 1)"
        } else {
            "a check did not fail: the harness is broken"
        }
    );
    // Exit 1 is the self-test's success: every violation was reported.
    if all {
        Ok(false)
    } else {
        anyhow::bail!("some invariants were not detected")
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn,kube_client=off,kube_runtime=off")
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    match runtime.block_on(run(&cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            println!("chaos: ERROR (seed {}): {e:#}", cli.seed);
            ExitCode::from(2)
        }
    }
}
