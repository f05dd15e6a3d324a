//! High availability, with the real binaries: several replicas of each agent. The virtual agent
//! elects one writer on a Lease and a standby takes over when it dies; host agents are
//! active-active, so a virtual agent fails over between them and they answer alike.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::StreamExt as _;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::runtime::watcher::{self, Event};
use rcsync_proto::v1::CheckPodRequest;
use rcsync_proto::v1::runtime_class_sync_client::RuntimeClassSyncClient;
use rcsync_tests::system::{
    HostAgentReplica, LEASE_NAMESPACE, System, TenantSpec, pod, runtime_class, wait_ready_at,
};
use rcsync_tests::{Process, eventually, http_get};
use serde_json::Value;

const TENANT: &str = "team-a";

/// One tenant that may use every class, and the host class gvisor.
async fn gvisor_system() -> System {
    System::start(
        &[TenantSpec::new(TENANT, "{enabled: true}")],
        &[runtime_class("gvisor", "runsc", &[])],
    )
    .await
}

/// The agent's `/metrics` text (empty when unreachable).
async fn metrics_of(admin: &str) -> String {
    http_get(admin, "/metrics")
        .await
        .map(|(_, b)| b)
        .unwrap_or_default()
}

/// The sum of the samples on lines `keep` selects.
fn sum_samples(metrics: &str, keep: impl Fn(&str) -> bool) -> i64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && keep(l))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as i64)
        .sum()
}

/// Every UID each host Pod name ever had, and how many host Pods were deleted, from a watch that
/// runs for the whole test.
#[derive(Default)]
struct HostPodHistory {
    uids: BTreeMap<String, BTreeSet<String>>,
    deleted: usize,
}

fn record_host_pods(api: Api<Pod>) -> Arc<Mutex<HostPodHistory>> {
    let history = Arc::new(Mutex::new(HostPodHistory::default()));
    let out = history.clone();
    tokio::spawn(async move {
        let mut events = watcher::watcher(api, watcher::Config::default()).boxed();
        while let Some(event) = events.next().await {
            let mut h = out.lock().unwrap();
            match event {
                Ok(Event::Apply(p) | Event::InitApply(p)) => {
                    let name = p.metadata.name.clone().unwrap_or_default();
                    let uid = p.metadata.uid.clone().unwrap_or_default();
                    h.uids.entry(name).or_default().insert(uid);
                }
                Ok(Event::Delete(_)) => h.deleted += 1,
                _ => {}
            }
        }
    });
    history
}

/// Every version of the leader Lease: (holder, acquireTime, renewTime).
type LeaseHistory = Arc<Mutex<Vec<(String, Option<Timestamp>, Option<Timestamp>)>>>;

fn record_lease(api: Api<Lease>) -> LeaseHistory {
    let history: LeaseHistory = Arc::default();
    let out = history.clone();
    tokio::spawn(async move {
        let config = watcher::Config::default().fields("metadata.name=rcsync-virtual-agent");
        let mut events = watcher::watcher(api, config).boxed();
        while let Some(event) = events.next().await {
            if let Ok(Event::Apply(l) | Event::InitApply(l)) = event {
                let spec = l.spec.unwrap_or_default();
                out.lock().unwrap().push((
                    spec.holder_identity.unwrap_or_default(),
                    spec.acquire_time.map(|t| t.0),
                    spec.renew_time.map(|t| t.0),
                ));
            }
        }
    });
    history
}

async fn status_of(admin: &str) -> Option<Value> {
    let (code, body) = http_get(admin, "/status").await?;
    (code == 200).then(|| serde_json::from_str(&body).ok()).flatten()
}

/// Timestamps of the log lines of `logs` containing `text` (plain format: RFC 3339 first).
fn times_of(logs: &str, text: &str) -> Vec<Timestamp> {
    logs.lines()
        .filter(|l| l.contains(text))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

async fn create_pods(system: &System, names: impl Iterator<Item = String>) {
    let v = system.virtual_side();
    for name in names {
        v.create_pod(&pod(&name, Some("gvisor"))).await;
    }
}

#[tokio::test]
async fn the_standby_takes_over_within_the_lease_duration_when_the_leader_is_killed() {
    let mut system = gvisor_system().await;
    let lease_seconds = 3;
    let v = &mut system.virtuals[0];
    v.set_agent_flag("--lease-duration-seconds", &lease_seconds.to_string());
    // The first replica keeps the harness's identity, so it takes the Lease over at once.
    v.restart_agent().await;
    let (standby, standby_admin) = v
        .spawn_replica("virtual-agent-standby", &[("--identity", "standby")])
        .await;
    wait_ready_at(&standby_admin, "the standby").await;
    let standby_status = status_of(&standby_admin).await.unwrap();
    assert_eq!(standby_status["leading"], false, "{standby_status}");
    assert_eq!(
        standby_status["leader"], "virtual-agent-team-a",
        "{standby_status}"
    );
    let readyz = http_get(&standby_admin, "/readyz").await.unwrap().1;
    assert!(
        readyz.contains("standby, leader is virtual-agent-team-a"),
        "{readyz}"
    );
    assert!(metrics_of(&standby_admin).await.contains("rcsync_leader 0"));

    let host_pods = record_host_pods(system.host_pods(&system.virtual_side().tenant).await);
    let leases = record_lease(Api::namespaced(
        system.virtual_side().cluster.client().await,
        LEASE_NAMESPACE,
    ));
    create_pods(&system, (0..8).map(|i| format!("before-{i}"))).await;
    system.wait_host_pod_count(8).await;

    // Kill the leader while Pods are being created. The agent logs a write after the API server
    // answered it, so the log line of the last Pod seen on the host may trail the test's view of
    // it: the leader's log is bounded by the moment `kill` returned, not by when it was called.
    let killed_at = Timestamp::now();
    let kill_instant = tokio::time::Instant::now();
    system.virtuals[0].agent.signal("KILL");
    let dead_by = Timestamp::now();
    create_pods(&system, (0..8).map(|i| format!("during-{i}"))).await;
    let takeover_deadline = Duration::from_secs(lease_seconds + 2);
    loop {
        if status_of(&standby_admin)
            .await
            .is_some_and(|s| s["leading"] == true)
            && http_get(&standby_admin, "/readyz")
                .await
                .is_some_and(|r| r.0 == 200)
        {
            break;
        }
        assert!(
            kill_instant.elapsed() < takeover_deadline,
            "the standby did not take over within {takeover_deadline:?} of the leader's death"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    create_pods(&system, (0..8).map(|i| format!("after-{i}"))).await;
    system.wait_host_pod_count(24).await;
    system.virtuals[0].agent.wait_exit().await;

    // No Pod synced twice, none lost: each host Pod was created once and never replaced.
    {
        let h = host_pods.lock().unwrap();
        assert_eq!(h.uids.len(), 24, "{:?}", h.uids.keys());
        assert!(
            h.uids.values().all(|u| u.len() == 1),
            "a host Pod was recreated: {:?}",
            h.uids
        );
        assert_eq!(h.deleted, 0);
    }
    // The Lease's history: the killed leader, then the standby, which took it only after the kill.
    let history = leases.lock().unwrap().clone();
    let holders: Vec<&str> = history.iter().map(|(h, _, _)| h.as_str()).collect();
    let first_standby = holders
        .iter()
        .position(|h| *h == "standby")
        .expect("the standby took the Lease");
    assert!(
        holders[..first_standby]
            .iter()
            .all(|h| *h == "virtual-agent-team-a"),
        "{holders:?}"
    );
    assert!(
        holders[first_standby..].iter().all(|h| *h == "standby"),
        "{holders:?}"
    );
    let acquired = history[first_standby].1.expect("acquireTime");
    let last_renew = history[..first_standby]
        .iter()
        .filter_map(|(_, _, r)| *r)
        .max()
        .unwrap();
    assert!(acquired > killed_at && acquired > last_renew, "{history:?}");
    // And from the agents' logs: every write of the killed leader came before the standby led,
    // every write of the standby after it started leading.
    let old_logs = system.virtuals[0].agent.logs();
    let new_logs = standby.logs();
    let started = times_of(&new_logs, "started leading");
    assert_eq!(started.len(), 1, "{new_logs}");
    let old_writes = times_of(&old_logs, "synced Pod to the host");
    let new_writes = times_of(&new_logs, "synced Pod to the host");
    assert!(!old_writes.is_empty() && !new_writes.is_empty());
    assert!(
        old_writes.iter().all(|t| *t < dead_by),
        "the killed leader wrote after SIGKILL ({dead_by}): {old_writes:?}"
    );
    assert!(
        old_writes.iter().all(|t| *t < started[0]),
        "the killed leader wrote after the standby led ({}): {old_writes:?}",
        started[0]
    );
    assert!(
        new_writes.iter().all(|t| *t > started[0]),
        "the standby wrote before it led ({}): {new_writes:?}",
        started[0]
    );
    assert!(metrics_of(&standby_admin).await.contains("rcsync_leader 1"));
}

#[tokio::test]
async fn a_leader_that_cannot_renew_stops_writing_before_a_standby_takes_over() {
    let mut system = gvisor_system().await;
    let v = &mut system.virtuals[0];
    v.set_agent_flag("--lease-duration-seconds", "3");
    v.restart_agent().await;
    let (standby, standby_admin) = v
        .spawn_replica("virtual-agent-standby", &[("--identity", "standby")])
        .await;
    wait_ready_at(&standby_admin, "the standby").await;
    // Freeze the leader: it can neither renew nor learn that it lost. When it resumes, its
    // renew deadline has passed, so nothing it had in flight may be written.
    v.agent.signal("STOP");
    let paused_at = Timestamp::now();
    eventually("the standby to lead", || async {
        status_of(&standby_admin).await.filter(|s| s["leading"] == true)
    })
    .await;
    system
        .virtual_side()
        .create_pod(&pod("while-frozen", Some("gvisor")))
        .await;
    system.wait_host_pod_count(1).await;
    system.virtuals[0].agent.signal("CONT");
    let old_admin = system.virtuals[0].admin.clone();
    eventually("the resumed replica to stand by", || async {
        status_of(&old_admin)
            .await
            .filter(|s| s["leading"] == false && s["leader"] == "standby")
    })
    .await;
    // Its term's gauges go with the term (once its tasks have stopped): the new leader reports
    // the classes and Pods now.
    eventually("the old leader's term gauges back to 0", || async {
        let metrics = metrics_of(&old_admin).await;
        [
            "rcsync_leader 0",
            "rcsync_host_connected 0",
            "rcsync_synced_runtime_classes 0",
            "rcsync_pods_orphaned 0",
            "rcsync_pods_failing 0",
        ]
        .iter()
        .all(|series| metrics.contains(&format!("\n{series}\n")))
        .then_some(())
    })
    .await;
    let old_logs = system.virtuals[0].agent.logs();
    assert!(old_logs.contains("stopped leading"), "{old_logs}");
    let late_writes: Vec<_> = times_of(&old_logs, "synced Pod to the host")
        .into_iter()
        .filter(|t| *t > paused_at)
        .collect();
    assert!(
        late_writes.is_empty(),
        "the old leader wrote after its lease: {late_writes:?}"
    );
    assert!(!standby.logs().is_empty());
}

/// Host agents are active-active: the same tenants give the same answers on every replica.
#[tokio::test]
async fn two_host_agents_answer_every_check_pod_identically() {
    let system = System::start(
        &[
            TenantSpec::new(TENANT, "{enabled: true, selector: {matchLabels: {env: dev}}}"),
            TenantSpec::new("team-b", "{enabled: false}"),
        ],
        &[
            runtime_class("gvisor", "runsc", &[("env", "dev")]),
            runtime_class("kata", "kata", &[("env", "prod")]),
        ],
    )
    .await;
    let replica = system.spawn_host_agent_replica("host-agent-2").await;
    let cases = [
        (TENANT, "gvisor"),
        (TENANT, "kata"),
        (TENANT, "missing"),
        (TENANT, ""),
        ("team-b", "gvisor"),
        ("team-b", ""),
    ];
    for grpc in [&system.grpc, &replica.grpc] {
        assert!(!grpc.is_empty());
    }
    for (tenant, class) in cases {
        let mut answers = Vec::new();
        for grpc in [&system.grpc, &replica.grpc] {
            let token = std::fs::read_to_string(system.dir.path().join(format!("{tenant}.token"))).unwrap();
            let mut client = RuntimeClassSyncClient::connect(format!("http://{grpc}"))
                .await
                .unwrap();
            let mut request = tonic::Request::new(CheckPodRequest {
                pod_namespace: "default".into(),
                pod_name: "p".into(),
                runtime_class_name: class.into(),
            });
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer {}", token.trim()).parse().unwrap(),
            );
            request
                .metadata_mut()
                .insert("x-rcsync-tenant", tenant.parse().unwrap());
            answers.push(
                client
                    .check_pod(request)
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|s| s.code()),
            );
        }
        assert_eq!(answers[0], answers[1], "{tenant} / {class:?}");
    }
}

/// Starts a virtual agent talking to both host agents, kills the one it streams from, and checks
/// that it keeps its readiness and its classes and Pods keep syncing.
#[tokio::test]
async fn killing_one_of_two_host_agents_keeps_pods_syncing_through_the_other() {
    let mut system = gvisor_system().await;
    let HostAgentReplica {
        process: second,
        grpc: second_grpc,
        admin: second_admin,
        ..
    } = system.spawn_host_agent_replica("host-agent-2").await;
    let both = format!("http://{},http://{second_grpc}", system.grpc);
    system.virtuals[0].set_agent_flag("--host-agent", &both);
    system.virtuals[0].restart_agent().await;
    system.virtual_side().wait_classes(&["gvisor"]).await;
    let host_pods = record_host_pods(system.host_pods(&system.virtual_side().tenant).await);

    // Readiness of the virtual agent, sampled for the whole test.
    let admin = system.virtual_side().admin.clone();
    let not_ready = Arc::new(Mutex::new(Vec::new()));
    let sampler = {
        let not_ready = not_ready.clone();
        tokio::spawn(async move {
            loop {
                match http_get(&admin, "/readyz").await {
                    Some((200, _)) => {}
                    other => not_ready
                        .lock()
                        .unwrap()
                        .push(format!("{:?} {other:?}", SystemTime::now())),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let applied_before = applied_classes(&system.virtual_side().metrics().await);
    create_pods(&system, (0..6).map(|i| format!("before-{i}"))).await;
    system.wait_host_pod_count(6).await;

    // Kill whichever replica holds the Sync stream (the first connect goes to the first URL).
    let stream_holder_is_first = open_streams(&system.host_admin).await > 0;
    if stream_holder_is_first {
        system.host_agent.signal("KILL");
    } else {
        second.signal("KILL");
    }
    create_pods(&system, (0..6).map(|i| format!("after-{i}"))).await;
    system.wait_host_pod_count(12).await;
    let survivor = if stream_holder_is_first {
        &second_admin
    } else {
        &system.host_admin
    };
    eventually("the Sync stream on the surviving replica", || async {
        (open_streams(survivor).await > 0).then_some(())
    })
    .await;
    // A class added now reaches the virtual cluster through the survivor.
    system
        .create_host_class(&runtime_class("youki", "youki", &[]))
        .await;
    system.virtual_side().wait_classes(&["gvisor", "youki"]).await;
    sampler.abort();
    assert!(
        not_ready.lock().unwrap().is_empty(),
        "the virtual agent lost readiness: {:?}",
        not_ready.lock().unwrap()
    );
    // The move resumed with the delta: the class the virtual cluster already held was not
    // written again, only the new one.
    // The class is seen in the virtual cluster before the agent counts its write: wait for the
    // count, then check that it is the only write.
    let metrics = eventually("the virtual agent to count the new class's write", || async {
        let metrics = system.virtual_side().metrics().await;
        (applied_classes(&metrics) > applied_before).then_some(metrics)
    })
    .await;
    let applied_after = applied_classes(&metrics);
    assert_eq!(
        applied_after - applied_before,
        1,
        "classes written again after the failover ({applied_before} before): {metrics}\n{}",
        system.virtual_side().agent.logs()
    );
    let h = host_pods.lock().unwrap();
    assert_eq!(h.uids.len(), 12);
    assert!(
        h.uids.values().all(|u| u.len() == 1),
        "a host Pod flapped: {:?}",
        h.uids
    );
    assert_eq!(h.deleted, 0);
}

/// RuntimeClass writes (created, updated or recreated) the virtual agent made.
fn applied_classes(metrics: &str) -> i64 {
    sum_samples(metrics, |l| {
        l.starts_with("rcsync_runtime_class_applies_total{")
            && ["created", "updated", "recreated"]
                .iter()
                .any(|r| l.contains(&format!("result=\"{r}\"")))
    })
}

async fn open_streams(admin: &str) -> i64 {
    sum_samples(&metrics_of(admin).await, |l| {
        l.starts_with("rcsync_sync_streams_open")
    })
}

/// Writes `text` to `path` as Kubernetes' Secret volumes do: a new file renamed over the old one.
fn replace_file(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// CheckPod over a fresh mutual-TLS connection with the given CA and client certificate.
async fn check_pod_over_tls(grpc: &str, ca: &str, cert: &str, key: &str, token: &str) -> Result<(), String> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(format!("https://{grpc}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    let mut client = RuntimeClassSyncClient::new(channel);
    let mut request = tonic::Request::new(CheckPodRequest {
        pod_namespace: "default".into(),
        pod_name: "p".into(),
        runtime_class_name: "gvisor".into(),
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", token.trim()).parse().unwrap(),
    );
    client
        .check_pod(request)
        .await
        .map(|_| ())
        .map_err(|s| format!("{s:?}"))
}

#[tokio::test]
async fn certificates_rotate_without_a_restart_and_open_streams_last_while_the_old_ca_is_trusted() {
    let mut system = System::start_with(
        &[TenantSpec::new(TENANT, "{enabled: true}")],
        &[runtime_class("gvisor", "runsc", &[])],
        rcsync_tests::system::Transport::MutualTls,
    )
    .await;
    system.virtual_side().wait_classes(&["gvisor"]).await;
    let dir = system.dir.path().to_path_buf();
    let token = std::fs::read_to_string(dir.join(format!("{TENANT}.token"))).unwrap();
    let old_ca = std::fs::read_to_string(dir.join("ca.crt")).unwrap();
    let old_cert = std::fs::read_to_string(dir.join(format!("{TENANT}.crt"))).unwrap();
    let old_key = std::fs::read_to_string(dir.join(format!("{TENANT}.key"))).unwrap();
    check_pod_over_tls(&system.grpc, &old_ca, &old_cert, &old_key, &token)
        .await
        .unwrap();

    // Rotate everything to a new CA, trusted beside the old one for a while (the CA file serves
    // both sides): the serving pair, the client CA, the tenant's client pair.
    let pki = devcluster::pki::Pki::new("rcsync-e2e-rotated-ca").unwrap();
    let serving = pki.server(&["127.0.0.1", "localhost"]).unwrap();
    let client = pki.client(TENANT).unwrap();
    let both = format!("{old_ca}{}", pki.ca_pem());
    replace_file(&dir.join("host-agent.key"), &serving.key_pem);
    replace_file(&dir.join("host-agent.crt"), &serving.cert_pem);
    replace_file(&dir.join("ca.crt"), &both);
    replace_file(&dir.join(format!("{TENANT}.crt")), &client.cert_pem);
    replace_file(&dir.join(format!("{TENANT}.key")), &client.key_pem);

    // The next connection gets the new certificate and takes a client certificate of the new
    // CA, without a restart.
    let grpc = system.grpc.clone();
    let new_ca = pki.ca_pem();
    let over_tls = |cert: String, key: String| {
        let (grpc, ca, token) = (grpc.clone(), new_ca.clone(), token.clone());
        async move { check_pod_over_tls(&grpc, &ca, &cert, &key, &token).await }
    };
    eventually(
        "a new connection to be served with the rotated certificate",
        || {
            let call = over_tls(client.cert_pem.clone(), client.key_pem.clone());
            async move { call.await.ok() }
        },
    )
    .await;
    assert!(!system.host_agent.has_exited());
    let metrics = http_get(&system.host_admin, "/metrics").await.unwrap().1;
    assert!(
        metrics.contains("rcsync_tls_reloads_total{result=\"applied\"}"),
        "{metrics}"
    );

    // The Sync stream opened before the rotation still delivers while the old CA is trusted.
    system
        .create_host_class(&runtime_class("youki", "youki", &[]))
        .await;
    system.virtual_side().wait_classes(&["gvisor", "youki"]).await;
    let opened = || {
        system
            .virtual_side()
            .agent
            .logs()
            .matches("Sync stream open")
            .count()
    };
    assert_eq!(opened(), 1, "the stream was reopened");

    // Without the old CA the old client certificate is refused, and the stream opened with it
    // ends: the virtual agent opens it again with its rotated files, and it delivers.
    replace_file(&dir.join("ca.crt"), &pki.ca_pem());
    eventually("the old client certificate to be refused", || {
        let call = over_tls(old_cert.clone(), old_key.clone());
        async move { call.await.is_err().then_some(()) }
    })
    .await;
    eventually("the Sync stream to be opened again", || async {
        (opened() == 2).then_some(())
    })
    .await;
    system
        .create_host_class(&runtime_class("kata", "kata", &[]))
        .await;
    system
        .virtual_side()
        .wait_classes(&["gvisor", "kata", "youki"])
        .await;

    // After a host agent restart it reconnects with the new CA and client certificate too.
    system.restart_host_agent().await;
    system
        .create_host_class(&runtime_class("wasm", "wasmtime", &[]))
        .await;
    system
        .virtual_side()
        .wait_classes(&["gvisor", "kata", "wasm", "youki"])
        .await;
}

/// Events of type Warning on any virtual Pod (SyncWarning, SyncError).
async fn pod_warnings(system: &System) -> Vec<String> {
    let events: Api<k8s_openapi::api::core::v1::Event> =
        Api::all(system.virtual_side().cluster.client().await);
    events
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.type_.as_deref() == Some("Warning"))
        .map(|e| format!("{:?} {:?}: {:?}", e.involved_object.name, e.reason, e.message))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_replica_under_churn_ends_converged_without_errors() {
    let mut system = gvisor_system().await;
    let mut second = system.spawn_host_agent_replica("host-agent-2").await;
    let both = format!("http://{},http://{}", system.grpc, second.grpc);
    system.virtuals[0].set_agent_flag("--host-agent", &both);
    system.virtuals[0].restart_agent().await;
    let (mut standby, standby_admin, standby_args) = system.virtuals[0]
        .spawn_replica_with_args("virtual-agent-b", &[("--identity", "replica-b")])
        .await;
    wait_ready_at(&standby_admin, "the standby").await;
    let host_pods = record_host_pods(system.host_pods(&system.virtual_side().tenant).await);

    // Churn: Pods created the whole time; each step below waits until more were created.
    let pods_api = system.virtual_side().pods().await;
    let created = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let churn = {
        let created = created.clone();
        tokio::spawn(async move {
            for attempt in 0.. {
                let name = format!("churn-{attempt}");
                if pods_api
                    .create(&Default::default(), &pod(&name, Some("gvisor")))
                    .await
                    .is_ok()
                {
                    created.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let more_churn = || {
        let created = created.clone();
        let from = created.load(std::sync::atomic::Ordering::SeqCst);
        async move {
            eventually("more Pods to be created", || {
                let n = created.load(std::sync::atomic::Ordering::SeqCst);
                async move { (n >= from + 3).then_some(()) }
            })
            .await
        }
    };
    more_churn().await;

    // Roll the host agents one at a time: a virtual agent's streams move to the other one.
    system.roll_host_agent().await;
    more_churn().await;
    second.roll(system.dir.path()).await;
    more_churn().await;
    // Each host agent's SIGTERM moved the leader's Sync stream at most once.
    let leader_logs = system.virtual_side().agent.logs();
    let opened = leader_logs.matches("Sync stream open").count();
    assert!(
        (1..=3).contains(&opened),
        "{opened} Sync streams for two host agent restarts:\n{leader_logs}"
    );
    // Roll the virtual agents: the leader hands the Lease over on SIGTERM, so the standby leads
    // at once, long before the 15 s lease would have expired.
    let handover = tokio::time::Instant::now();
    system.virtuals[0].agent.signal("TERM");
    eventually("the standby to lead after the leader's SIGTERM", || async {
        status_of(&standby_admin).await.filter(|s| s["leading"] == true)
    })
    .await;
    assert!(
        handover.elapsed() < Duration::from_secs(10),
        "the Lease was not handed over on SIGTERM"
    );
    system.virtuals[0].agent.wait_exit().await;
    more_churn().await;
    system.virtuals[0].start_agent().await;
    standby.terminate().await;
    let admin = system.virtual_side().admin.clone();
    eventually("the first replica to lead again", || async {
        status_of(&admin).await.filter(|s| s["leading"] == true)
    })
    .await;
    standby = Process::spawn(
        "virtual-agent-b-rolled",
        &rcsync_tests::binary("virtual-agent"),
        &standby_args,
        system.dir.path(),
    );
    wait_ready_at(&standby_admin, "the rolled standby").await;
    more_churn().await;
    churn.abort();

    // Converged: every virtual Pod has exactly one host Pod, made once; no Pod got an error.
    let virtual_pods: BTreeSet<String> = system
        .virtual_side()
        .pods()
        .await
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    assert!(virtual_pods.len() >= 15, "too little churn: {virtual_pods:?}");
    system.wait_host_pod_count(virtual_pods.len()).await;
    {
        let h = host_pods.lock().unwrap();
        assert!(
            h.uids.values().all(|u| u.len() == 1),
            "a host Pod was recreated: {:?}",
            h.uids
        );
        assert_eq!(h.deleted, 0);
    }
    assert_eq!(pod_warnings(&system).await, Vec::<String>::new());
    assert!(!standby.has_exited());
}

/// ApplyPod from two host agents at once for the same virtual Pod: every call succeeds, one host
/// Pod exists, created once, and an update through either replica lands on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_host_agents_writing_the_same_pod_give_one_host_pod() {
    use rcsync_proto::v1::ApplyPodRequest;
    use rcsync_proto::v1::pod_sync_client::PodSyncClient;
    let system = gvisor_system().await;
    let replica = system.spawn_host_agent_replica("host-agent-2").await;
    let token = std::fs::read_to_string(system.dir.path().join(format!("{TENANT}.token"))).unwrap();
    let host_pods = system.host_pods(&system.virtual_side().tenant).await;
    let apply_everywhere = |label: &'static str| {
        let grpcs = [system.grpc.clone(), replica.grpc.clone()];
        let token = token.clone();
        async move {
            let pod = serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "shared", "namespace": "default", "uid": "0b5e3c1e-1111-4d2e-9a6b-5d1c2f3a4b5c", "labels": {"rev": label}},
                "spec": {"runtimeClassName": "gvisor", "containers": [{"name": "app", "image": "registry.example/app:1.0"}]},
            });
            let calls = (0..8).map(|i| {
                let grpc = grpcs[i % 2].clone();
                let token = token.clone();
                let pod_json = serde_json::to_vec(&pod).unwrap();
                tokio::spawn(async move {
                    let mut client = PodSyncClient::connect(format!("http://{grpc}")).await.unwrap();
                    let mut request = tonic::Request::new(ApplyPodRequest {
                        pod_json,
                        ..Default::default()
                    });
                    request.metadata_mut().insert(
                        "authorization",
                        format!("Bearer {}", token.trim()).parse().unwrap(),
                    );
                    client.apply_pod(request).await.map(|r| r.into_inner())
                })
            });
            let mut created = 0;
            for call in futures::future::join_all(calls).await {
                let answer = call.unwrap().unwrap_or_else(|s| panic!("ApplyPod failed: {s:?}"));
                assert!(answer.applied && answer.refusal.is_none(), "{answer:?}");
                created += usize::from(answer.created);
            }
            created
        }
    };
    assert_eq!(
        apply_everywhere("1").await,
        1,
        "the host Pod was created more than once"
    );
    let first = host_pods.list(&Default::default()).await.unwrap().items;
    assert_eq!(first.len(), 1);
    assert_eq!(apply_everywhere("2").await, 0);
    let second = host_pods.list(&Default::default()).await.unwrap().items;
    assert_eq!(second.len(), 1);
    assert_eq!(
        first[0].metadata.uid, second[0].metadata.uid,
        "the host Pod was replaced"
    );
    // Virtual labels travel as JSON in an annotation (they could match host selectors).
    let labels = &second[0].metadata.annotations.as_ref().unwrap()["vcluster.loft.sh/labels"];
    assert_eq!(labels, r#"{"rev":"2"}"#);
}
