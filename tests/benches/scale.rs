//! The host agent at fleet scale, black-box: the real `host-agent` binary against a devcluster,
//! tenants' Sync streams opened by an in-process tonic client (not by agents), every figure next
//! to a floor measured in the same run.
//!
//! ```text
//!  devcluster (in process) ◄──watch── host-agent (release binary) ◄──N Sync streams, CheckPod── this bench
//! ```
//!
//! Figures: host-agent RSS (VmRSS about 1 s after the streams received their initial state), start
//! to ready, one change reaching every stream (p50/p99 over rounds), CheckPod while changes fan out
//! against idle (a paced probe; then again with the agent's serving threads and the probe's first
//! for a CPU, where `chrt` is allowed), intake of a burst of classes
//! created while running, the pause a one-tenant reload causes (CheckPod and /livez, against the
//! same probes as long without one), view
//! rebuilds on an unchanged reload, CheckPod against a gRPC health check (closed loop, 4
//! connections × 16 streams), and Pods reaching the host against creating them there directly
//! (with the CPU every process spent per Pod, and the agents' write system calls per Pod), and the
//! host agent's RSS and sockets with every tenant's WatchPodStatus stream open (host events
//! included, so each holds four watches of the API server).
//!
//! Run: `cargo bench -p rcsync-tests --bench scale` (every shape), or with
//! `-- --shape 10000x100 --intake 9000` / `-- --shape 50x1000 [--connections 1000]` /
//! `-- --only pods` / `-- --only status [--tenants N]` (1,000), and
//! `--host-agent PATH` to measure another build of the agent, `--pods N` for another Pod count,
//! `--trials N` for another number of Pod rounds (5).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::node::v1::RuntimeClass;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use rcsync_proto::v1::runtime_class_sync_client::RuntimeClassSyncClient;
use rcsync_proto::v1::{CheckPodRequest, SyncRequest, SyncResponse};
use rcsync_tests::system::{System, TenantSpec};
use rcsync_tests::{Cluster, Process, binary, http_get, spawn_listening};
use serde_json::json;
use tokio::sync::mpsc;
use tonic::Request;
use tonic::transport::Channel;

/// What each stream reports: (stream, when, class names in the response).
type Seen = (usize, Instant, Vec<String>);

struct Shape {
    classes: usize,
    tenants: usize,
    streams: usize,
    /// Classes created while running (0: skip the intake figure).
    intake: usize,
    /// gRPC connections the streams are spread over (a fleet has one per virtual agent).
    connections: usize,
}

impl Shape {
    /// `classes` × `tenants` with a stream per tenant.
    fn new(classes: usize, tenants: usize, intake: usize, connections: usize) -> Self {
        Self {
            classes,
            tenants,
            streams: tenants,
            intake,
            connections,
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let only = arg("--only");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let shapes: Vec<Shape> = match arg("--shape") {
            Some(shape) => {
                let (classes, tenants) = shape.split_once('x').expect("--shape CLASSESxTENANTS");
                let tenants: usize = tenants.parse().unwrap();
                vec![Shape {
                    classes: classes.parse().unwrap(),
                    tenants,
                    streams: arg("--streams").map_or(tenants, |s| s.parse().unwrap()),
                    intake: arg("--intake").map_or(0, |s| s.parse().unwrap()),
                    connections: arg("--connections").map_or(8, |s| s.parse().unwrap()),
                }]
            }
            None => vec![
                Shape::new(1_000, 100, 0, 8),
                Shape::new(10_000, 100, 9_000, 8),
                Shape::new(50, 1_000, 0, 8),
                // The fleet as it connects: one connection per virtual agent.
                Shape::new(50, 1_000, 0, 1_000),
            ],
        };
        let agent = arg("--host-agent").map_or_else(|| binary("host-agent"), std::path::PathBuf::from);
        if only.is_none() {
            for shape in &shapes {
                fleet(shape, &agent).await;
            }
        }
        if only.is_none() || only.as_deref() == Some("status") {
            let tenants = arg("--tenants").map_or(1_000, |n| n.parse().expect("--tenants N"));
            status_streams(tenants, &agent, true).await;
            status_streams(tenants, &agent, false).await;
        }
        if only.is_none() || only.as_deref() == Some("pods") {
            let n = arg("--pods").map_or(300, |n| n.parse().expect("--pods N"));
            let trials = arg("--trials").map_or(5, |n| n.parse().expect("--trials N"));
            pods(n, 1, trials).await;
            pods(n, 16, trials).await;
        }
    });
}

/// Sockets a process holds open (listening ones included).
fn sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.filter_map(Result::ok)
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .filter(|target| target.to_string_lossy().starts_with("socket:"))
                .count()
        })
        .unwrap_or(0)
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// CPU time a process has used so far, summed over its threads (`None`: this process).
fn cpu_time(pid: Option<u32>) -> Duration {
    let dir = pid.map_or_else(|| "/proc/self/task".to_string(), |p| format!("/proc/{p}/task"));
    let Ok(threads) = std::fs::read_dir(&dir) else {
        return Duration::ZERO;
    };
    // The first field of a thread's schedstat: nanoseconds it ran.
    let ns: u64 = threads
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
        .sum();
    Duration::from_nanos(ns)
}

/// The write-family system calls process `pid` has made (`syscw` of `/proc/<pid>/io`: write,
/// writev…; socket sends and wakeups of other threads alike): the work behind a figure counted
/// exactly, where its CPU time moves with the machine. (`syscr` misses `recvfrom`, so reads are
/// not counted.)
fn writes(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    io.lines()
        .find_map(|l| l.strip_prefix("syscw:")?.trim().parse().ok())
        .unwrap_or(0)
}

/// Context switches of a process so far (voluntary and not, summed over its live threads): each
/// is a thread parked and woken again, what a Pod's trip costs beyond its own work.
fn switches(pid: u32) -> u64 {
    let Ok(threads) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    threads
        .flatten()
        .map(|t| {
            let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            status
                .lines()
                .filter_map(|l| {
                    l.strip_prefix("voluntary_ctxt_switches:")
                        .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
                })
                .filter_map(|v| v.trim().parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn class(name: &str, round: usize) -> RuntimeClass {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"environment": "bench", "round": round.to_string()}},
        "handler": "runsc"
    }))
    .unwrap()
}

/// Creates classes `from..to` with 32 requests in flight; returns when the last was accepted.
async fn create_classes(api: &Api<RuntimeClass>, prefix: &str, from: usize, to: usize) -> Instant {
    futures::stream::iter(from..to)
        .map(|i| {
            let api = api.clone();
            let name = format!("{prefix}-{i}");
            async move {
                api.create(&PostParams::default(), &class(&name, 0))
                    .await
                    .unwrap();
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    Instant::now()
}

fn tenants_yaml(tenants: usize, dir: &Path, selector_on_first: bool) -> String {
    let mut yaml = String::from("tenants:\n");
    for t in 0..tenants {
        let name = format!("t{t}");
        std::fs::write(dir.join(format!("{name}.token")), format!("token-{t}\n")).unwrap();
        let rc = if selector_on_first && t == 0 {
            "{enabled: true, selector: {matchLabels: {environment: other}}}"
        } else {
            "{enabled: true}"
        };
        yaml.push_str(&format!(
            "  - name: {name}\n    hostNamespace: ns-{name}\n    tokenFile: {name}.token\n    sync: {{fromHost: {{runtimeClasses: {rc}}}}}\n"
        ));
    }
    yaml
}

fn with_token<T>(message: T, tenant: usize) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer token-{tenant}").parse().unwrap());
    request
}

/// Opens one Sync stream that ACKs every response and reports what each carried.
async fn open_stream(channel: Channel, id: usize, tenant: usize, seen: mpsc::UnboundedSender<Seen>) {
    let (tx, rx) = mpsc::channel(4);
    tx.send(SyncRequest::default()).await.unwrap();
    let mut client = RuntimeClassSyncClient::new(channel);
    let mut responses = client
        .sync(with_token(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            tenant,
        ))
        .await
        .expect("opening a Sync stream")
        .into_inner();
    tokio::spawn(async move {
        while let Ok(Some(response)) = responses.message().await {
            let at = Instant::now();
            let names = names_of(&response);
            let _ = tx
                .send(SyncRequest {
                    response_nonce: response.nonce.clone(),
                    ..Default::default()
                })
                .await;
            if seen.send((id, at, names)).is_err() {
                return;
            }
        }
    });
}

/// What a series of fan-out rounds measured (each list sorted).
struct Rounds {
    /// From the API server accepting a change to the last stream receiving it, per round.
    to_all: Vec<Duration>,
    /// … to the first stream receiving it.
    to_first: Vec<Duration>,
    /// CheckPods made while changes fanned out.
    check_during: Vec<Duration>,
}

/// Rounds of one change per fan-out measurement: enough that p99 is not simply the slowest round
/// (with 200, the third slowest).
const FAN_OUT_ROUNDS: usize = 200;

/// [`FAN_OUT_ROUNDS`] rounds of one class relabelled (`round` counted from `first_round`) and its wait for every
/// stream, with a paced CheckPod probe running until the last stream has it.
async fn fan_out_rounds(
    classes: &Api<RuntimeClass>,
    shape: &Shape,
    probe: &CheckPodProbe,
    seen: &mut mpsc::UnboundedReceiver<Seen>,
    first_round: usize,
    fleet: &SimulatedFleet,
) -> Rounds {
    let mut rounds = Rounds {
        to_all: Vec::new(),
        to_first: Vec::new(),
        check_during: Vec::new(),
    };
    let tenant = 1 % shape.tenants;
    for round in first_round..first_round + FAN_OUT_ROUNDS {
        let name = format!("class-{}", round % shape.classes);
        let patch = json!({"metadata": {"labels": {"round": round.to_string()}}});
        classes
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
        let written = Instant::now();
        let fanning_out = Arc::new(AtomicBool::new(true));
        let checks = tokio::spawn({
            let (probe, name, fanning_out) = (probe.clone(), name.clone(), fanning_out.clone());
            async move {
                let mut took = Vec::new();
                let mut every = probe_interval();
                loop {
                    every.tick().await;
                    if !fanning_out.load(Ordering::Acquire) {
                        return took;
                    }
                    took.push(probe.check(&name, tenant).await);
                }
            }
        });
        // Counted where the streams run (see SimulatedFleet), not on this runtime, whose threads
        // would compete with the probe's for a CPU.
        let receiver = std::mem::replace(seen, mpsc::unbounded_channel().1);
        let streams = shape.streams;
        let (receiver, first, last) = fleet
            .spawn(async move {
                let mut seen = receiver;
                let mut got: HashSet<usize> = HashSet::new();
                let (mut first, mut last) = (None, None);
                while got.len() < streams {
                    let (id, at, names) = tokio::time::timeout(Duration::from_secs(60), seen.recv())
                        .await
                        .expect("every stream gets the change within 60 s")
                        .unwrap();
                    if names.contains(&name) && got.insert(id) {
                        first.get_or_insert(at);
                        last = Some(at);
                    }
                }
                (seen, first.unwrap(), last.unwrap())
            })
            .await
            .unwrap();
        *seen = receiver;
        rounds.to_all.push(last.saturating_duration_since(written));
        rounds.to_first.push(first.saturating_duration_since(written));
        fanning_out.store(false, Ordering::Release);
        rounds.check_during.extend(checks.await.unwrap());
    }
    rounds.to_all.sort();
    rounds.to_first.sort();
    rounds.check_during.sort();
    rounds
}

/// `n` (at least 1,000) CheckPods by `tenant` at the probe's pace with nothing else going on,
/// sorted.
async fn idle_checks(probe: &CheckPodProbe, n: usize, tenant: usize) -> Vec<Duration> {
    let mut took = Vec::new();
    let mut every = probe_interval();
    for _ in 0..n.max(1_000) {
        every.tick().await;
        took.push(probe.check("class-1", tenant).await);
    }
    took.sort();
    took
}

fn p50_p99(sorted: &[Duration]) -> String {
    format!(
        "p50 {}, p99 {}",
        ms(percentile(sorted, 0.5)),
        ms(percentile(sorted, 0.99))
    )
}

/// The IDs of the threads of process `pid` whose name passes `keep`.
fn thread_ids(pid: u32, keep: impl Fn(&str) -> bool) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| t.ok())
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|name| keep(name.trim())))
        .map(|t| t.file_name().to_string_lossy().into_owned())
        .collect()
}

/// `chrt POLICY... TID` for every thread; false when any of them is refused.
fn set_scheduling(threads: &[String], policy: &[&str]) -> bool {
    threads.iter().all(|tid| {
        Command::new("chrt")
            .args(policy)
            .arg(tid)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// The pace of the CheckPod probe, during a fan-out and idle alike: one call per millisecond
/// (a call late by more is sent at once, not in a burst to catch up).
fn probe_interval() -> tokio::time::Interval {
    let mut every = tokio::time::interval(Duration::from_millis(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every
}

/// The calling thread's ID.
fn this_thread_id() -> String {
    let thread = std::fs::read_link("/proc/thread-self").expect("/proc/thread-self");
    thread
        .file_name()
        .expect("a thread ID")
        .to_string_lossy()
        .into_owned()
}

/// The runtime of the simulated fleet: the bench's hundreds of Sync clients, decoding and ACKing
/// every response. In a fleet they run on the virtual clusters' machines; here they share the two
/// cores with the host agent and the API server, so their threads run as SCHED_IDLE, last in line
/// for a CPU: the host agent's own work, not its load generator's, decides how long a request
/// waits. Without it, CheckPod during a 1,000-stream fan-out measured the bench's decoding. Nice 19
/// was not enough: on an EEVDF kernel (Linux 6.6+) nice sets a thread's share, not how soon a
/// waking thread gets the CPU from it (CheckPod p99 during the fan-out over 8 connections: 2.4–3.0
/// ms with the fleet at nice 19, 1.0–1.3 ms at SCHED_IDLE, 0.35 ms idle). The rounds' bookkeeping
/// (a thousand arrivals per round) runs here too, for the same reason.
struct SimulatedFleet {
    runtime: Option<tokio::runtime::Runtime>,
}

impl SimulatedFleet {
    fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("simulated-fleet")
            .on_thread_start(|| {
                // sched_setscheduler(2) on a thread ID applies to that thread alone.
                let tid = this_thread_id();
                let idle = Command::new("chrt")
                    .args(["--idle", "--pid", "0", &tid])
                    .status()
                    .expect("running chrt");
                assert!(idle.success(), "chrt --idle --pid 0 {tid}");
            })
            .enable_all()
            .build()
            .unwrap();
        Self {
            runtime: Some(runtime),
        }
    }

    fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtime.as_ref().expect("running").spawn(task)
    }
}

impl Drop for SimulatedFleet {
    fn drop(&mut self) {
        // Dropped inside the bench's async code: shutting down must not block.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// CheckPod calls from a thread and runtime of their own. This process also plays a fleet of
/// virtual agents (hundreds of streams decoding and ACKing); a probe on the same runtime would
/// measure its own queue behind them, not the host agent, whose callers in a fleet run elsewhere.
#[derive(Clone)]
struct CheckPodProbe {
    calls: mpsc::UnboundedSender<(String, usize, tokio::sync::oneshot::Sender<Duration>)>,
    /// The probe thread's ID (for its CPU scheduling).
    thread_id: String,
}

impl CheckPodProbe {
    fn start(grpc: &str) -> Self {
        let (calls, mut asked) =
            mpsc::unbounded_channel::<(String, usize, tokio::sync::oneshot::Sender<Duration>)>();
        let url = format!("http://{grpc}");
        let thread = std::thread::Builder::new().name("checkpod-probe".into());
        let (id_tx, id_rx) = std::sync::mpsc::channel();
        thread
            .spawn(move || {
                let _ = id_tx.send(this_thread_id());
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
                    while let Some((class, tenant, took)) = asked.recv().await {
                        let mut client = RuntimeClassSyncClient::new(channel.clone());
                        let started = Instant::now();
                        client
                            .check_pod(with_token(
                                CheckPodRequest {
                                    pod_name: "p".into(),
                                    runtime_class_name: class,
                                    ..Default::default()
                                },
                                tenant,
                            ))
                            .await
                            .expect("CheckPod");
                        let _ = took.send(started.elapsed());
                    }
                });
            })
            .expect("starting the CheckPod probe thread");
        let thread_id = id_rx.recv().expect("the probe thread starts");
        Self { calls, thread_id }
    }

    /// One CheckPod for `class` as `tenant`; how long it took.
    async fn check(&self, class: &str, tenant: usize) -> Duration {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.calls.send((class.to_string(), tenant, tx)).unwrap();
        rx.await.expect("the probe thread answers")
    }
}

/// Starts the host agent `agent_binary` against `cluster` with the tenants file in `dir`: its
/// process, gRPC address and admin address.
async fn spawn_host_agent(agent_binary: &Path, cluster: &Cluster, dir: &Path) -> (Process, String, String) {
    let (agent, addrs, _) = spawn_listening("host-agent", agent_binary, dir, 2, "listening", |a| {
        vec![
            "--kubeconfig".into(),
            cluster.kubeconfig.display().to_string(),
            "--config".into(),
            dir.join("tenants.yaml").display().to_string(),
            "--grpc-listen".into(),
            a[0].clone(),
            "--admin-listen".into(),
            a[1].clone(),
            "--log-level".into(),
            "warn,host_agent::run=info".into(),
        ]
    })
    .await;
    (agent, addrs[0].clone(), addrs[1].clone())
}

/// `n` (at least one) gRPC connections to `grpc`.
async fn connect(grpc: &str, n: usize) -> Vec<Channel> {
    let mut channels = Vec::new();
    for _ in 0..n.max(1) {
        let channel = Channel::from_shared(format!("http://{grpc}")).unwrap();
        channels.push(channel.connect().await.unwrap());
    }
    channels
}

/// Waits until the agent with the admin port `admin` is ready (at most 300 s).
async fn until_ready(admin: &str) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while http_get(admin, "/readyz").await.is_none_or(|(c, _)| c != 200) {
        assert!(Instant::now() < deadline, "not ready after 300 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn names_of(response: &SyncResponse) -> Vec<String> {
    response
        .resources
        .iter()
        .map(|r| r.name.clone())
        .chain(response.removed_resources.iter().cloned())
        .collect()
}

async fn fleet(shape: &Shape, agent_binary: &Path) {
    println!(
        "\n== {} host RuntimeClasses × {} tenants, {} Sync streams over {} connections ==",
        shape.classes, shape.tenants, shape.streams, shape.connections
    );
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start("host", "RCSYNC_BENCH_UNUSED", dir.path()).await;
    let client = cluster.client().await;
    let classes: Api<RuntimeClass> = Api::all(client.clone());
    let started = Instant::now();
    create_classes(&classes, "class", 0, shape.classes).await;
    println!(
        "setup: {} classes created in {:.1} s",
        shape.classes,
        started.elapsed().as_secs_f64()
    );
    std::fs::write(
        dir.path().join("tenants.yaml"),
        tenants_yaml(shape.tenants, dir.path(), false),
    )
    .unwrap();

    // Start to ready.
    let spawned = Instant::now();
    let (agent, grpc, admin) = spawn_host_agent(agent_binary, &cluster, dir.path()).await;
    until_ready(&admin).await;
    let ready = spawned.elapsed();
    println!(
        "start to ready: {:.2} s (RSS then {:.1} MiB)",
        ready.as_secs_f64(),
        rss_mib(agent.pid())
    );

    // Streams: one per tenant (round robin when there are more), over the shape's connections, on the
    // simulated fleet's runtime (see SimulatedFleet).
    let fleet = SimulatedFleet::start();
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<Seen>();
    let opened = Instant::now();
    fleet
        .spawn({
            let (grpc, streams, tenants, connections) =
                (grpc.clone(), shape.streams, shape.tenants, shape.connections);
            async move {
                let channels = connect(&grpc, connections).await;
                for id in 0..streams {
                    open_stream(
                        channels[id % channels.len()].clone(),
                        id,
                        id % tenants,
                        seen_tx.clone(),
                    )
                    .await;
                }
            }
        })
        .await
        .unwrap();
    let mut initial = 0;
    while initial < shape.streams {
        let (_, _, names) = seen.recv().await.unwrap();
        assert_eq!(names.len(), shape.classes, "an initial state holds every class");
        initial += 1;
    }
    println!(
        "initial state on all {} streams: {:.2} s",
        shape.streams,
        opened.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss = rss_mib(agent.pid());
    println!("host-agent RSS: {rss:.1} MiB");

    // One change, every stream: relabel one class per round, with CheckPods from their own
    // connection (as a virtual agent's shares its connection with one stream, not with the
    // bench's hundreds) and their own thread (see CheckPodProbe).
    let probe = CheckPodProbe::start(&grpc);
    let plain = fan_out_rounds(&classes, shape, &probe, &mut seen, 1, &fleet).await;
    println!(
        "one change on every stream: p50 {}, p99 {}, slowest {} (first stream p50 {}); {} rounds",
        ms(percentile(&plain.to_all, 0.5)),
        ms(percentile(&plain.to_all, 0.99)),
        ms(percentile(&plain.to_all, 1.0)),
        ms(percentile(&plain.to_first, 0.5)),
        plain.to_all.len(),
    );
    let idle = idle_checks(&probe, plain.check_during.len(), 1 % shape.tenants).await;
    println!(
        "CheckPod while a change fans out: {} ({} calls; idle: {}, {} calls)",
        p50_p99(&plain.check_during),
        plain.check_during.len(),
        p50_p99(&idle),
        idle.len(),
    );
    // The same with the agent's serving threads and the probe's first in line for a CPU, as when
    // the fleet and the API server run on machines of their own: what is left is the agent's.
    let serving: Vec<String> = thread_ids(agent.pid(), |name| !name.starts_with("rcsync-"))
        .into_iter()
        .chain([probe.thread_id.clone()])
        .collect();
    if set_scheduling(&serving, &["-f", "-p", "10"]) {
        let first = fan_out_rounds(&classes, shape, &probe, &mut seen, 1_000, &fleet).await;
        let idle = idle_checks(&probe, first.check_during.len(), 1 % shape.tenants).await;
        set_scheduling(&serving, &["-o", "-p", "0"]);
        println!(
            "… with the agent's serving threads and the probe's first for a CPU (SCHED_FIFO): {} ({} calls; idle: {})",
            p50_p99(&first.check_during),
            first.check_during.len(),
            p50_p99(&idle),
        );
    } else {
        println!("… with the agent's serving threads first for a CPU: skipped (chrt needs CAP_SYS_NICE)");
    }

    // Intake: a burst of classes created while running.
    if shape.intake > 0 {
        let burst_started = Instant::now();
        let collector = tokio::spawn({
            let streams = shape.streams;
            let want = shape.intake;
            async move {
                let mut counts: HashMap<usize, usize> = HashMap::new();
                let mut complete = 0;
                loop {
                    let (id, at, names) = seen.recv().await.unwrap();
                    let n = counts.entry(id).or_default();
                    let before = *n;
                    *n += names.iter().filter(|n| n.starts_with("burst-")).count();
                    if before < want && *n >= want {
                        complete += 1;
                        if complete == streams {
                            return (at, seen);
                        }
                    }
                }
            }
        });
        let accepted = create_classes(&classes, "burst", 0, shape.intake).await;
        let api_took = accepted - burst_started;
        let (done, rest) = tokio::time::timeout(Duration::from_secs(600), collector)
            .await
            .expect("the burst reaches every stream within 600 s")
            .unwrap();
        seen = rest;
        println!(
            "intake: {} classes accepted by the API server in {:.2} s; on every stream {:.2} s after the last was accepted ({:.0} classes/s end to end)",
            shape.intake,
            api_took.as_secs_f64(),
            done.saturating_duration_since(accepted).as_secs_f64(),
            shape.intake as f64 / done.saturating_duration_since(burst_started).as_secs_f64()
        );
    }

    // Reloads: unchanged (nothing may be rebuilt), then one tenant changed (pause).
    let rebuilds = |metrics: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with("rcsync_view_rebuilds_total"))
            .and_then(|l| l.split_whitespace().last()?.parse::<u64>().ok())
    };
    let before = rebuilds(&http_get(&admin, "/metrics").await.unwrap().1);
    agent.signal("HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rebuilds(&http_get(&admin, "/metrics").await.unwrap().1);
    match (before, after) {
        (Some(b), Some(a)) => println!("unchanged reload (SIGHUP): {} view rebuilds", a - b),
        _ => println!("unchanged reload (SIGHUP): the agent exports no rcsync_view_rebuilds_total"),
    }
    // The same probes, back to back, first with nothing going on (the floor: what this machine's
    // scheduling alone costs a request over that long), then across a one-tenant reload.
    let pause = |what: &'static str, mut stop: tokio::sync::watch::Receiver<bool>| {
        let probe = probe.clone();
        let admin = admin.clone();
        let tenants = shape.tenants;
        tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            while !*stop.borrow_and_update() {
                let took = if what == "CheckPod" {
                    probe.check("class-1", 1 % tenants).await
                } else {
                    let asked = Instant::now();
                    let _ = http_get(&admin, "/livez").await;
                    asked.elapsed()
                };
                worst = worst.max(took);
            }
            worst
        })
    };
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let check_pause = pause("CheckPod", stop.clone());
    let livez_pause = pause("livez", stop);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let next = dir.path().join("tenants.yaml.next");
    std::fs::write(&next, tenants_yaml(shape.tenants, dir.path(), true)).unwrap();
    std::fs::rename(&next, dir.path().join("tenants.yaml")).unwrap();
    // Tenant t0's stream sees its classes removed once the reload is applied.
    let reloaded = Instant::now();
    loop {
        let (id, _, names) = tokio::time::timeout(Duration::from_secs(120), seen.recv())
            .await
            .expect("the reload reaches tenant t0 within 120 s")
            .unwrap();
        if id == 0 && !names.is_empty() {
            break;
        }
    }
    let applied = reloaded.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = stop_tx.send(true);
    let (check_worst, livez_worst) = (check_pause.await.unwrap(), livez_pause.await.unwrap());
    let window = reloaded.elapsed() + Duration::from_millis(300);
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let check_floor = pause("CheckPod", stop.clone());
    let livez_floor = pause("livez", stop);
    tokio::time::sleep(window).await;
    let _ = stop_tx.send(true);
    println!(
        "one-tenant reload: applied in {} ; longest CheckPod meanwhile {}, longest /livez {} \
         (floor, the same probes as long without a reload: {} / {})",
        ms(applied),
        ms(check_worst),
        ms(livez_worst),
        ms(check_floor.await.unwrap()),
        ms(livez_floor.await.unwrap()),
    );

    closed_loop(&grpc, shape.tenants).await;
    let logs = agent.logs();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for line in logs.lines() {
        let message: String = line
            .split_whitespace()
            .skip(2)
            .take(8)
            .collect::<Vec<_>>()
            .join(" ");
        *kinds.entry(message).or_default() += 1;
    }
    let mut kinds: Vec<(usize, String)> = kinds.into_iter().map(|(k, n)| (n, k)).collect();
    kinds.sort_by(|a, b| b.cmp(a));
    println!(
        "host-agent log lines: {} (most frequent: {:?})",
        logs.lines().count(),
        kinds.first()
    );
    drop(agent);
}

/// CheckPod against gRPC health on the same server: a closed loop of 4 connections × 16 streams.
async fn closed_loop(grpc: &str, tenants: usize) {
    async fn run(grpc: &str, tenants: usize, check_pod: bool) -> (Vec<Duration>, f64) {
        let window = Duration::from_secs(2);
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let channel = Channel::from_shared(format!("http://{grpc}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            for _ in 0..16 {
                let channel = channel.clone();
                tasks.push(tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    let started = Instant::now();
                    let mut classes = RuntimeClassSyncClient::new(channel.clone());
                    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
                    while started.elapsed() < window {
                        let asked = Instant::now();
                        if check_pod {
                            classes
                                .check_pod(with_token(
                                    CheckPodRequest {
                                        pod_name: "p".into(),
                                        runtime_class_name: "class-1".into(),
                                        ..Default::default()
                                    },
                                    1 % tenants,
                                ))
                                .await
                                .unwrap();
                        } else {
                            health
                                .check(tonic_health::pb::HealthCheckRequest {
                                    service: String::new(),
                                })
                                .await
                                .unwrap();
                        }
                        latencies.push(asked.elapsed());
                    }
                    latencies
                }));
            }
        }
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.unwrap());
        }
        all.sort();
        let rate = all.len() as f64 / window.as_secs_f64();
        (all, rate)
    }
    let (health, health_rate) = run(grpc, tenants, false).await;
    let (check, check_rate) = run(grpc, tenants, true).await;
    let mean = |v: &[Duration]| v.iter().sum::<Duration>() / v.len().max(1) as u32;
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    println!(
        "CheckPod vs health (4 connections × 16 streams): mean {} vs {} ({:.2}×), p50 {} vs {} ({:.2}×), p99 {} vs {} ({:.2}×); {:.0} vs {:.0} req/s",
        ms(mean(&check)),
        ms(mean(&health)),
        ratio(mean(&check), mean(&health)),
        ms(percentile(&check, 0.5)),
        ms(percentile(&health, 0.5)),
        ratio(percentile(&check, 0.5), percentile(&health, 0.5)),
        ms(percentile(&check, 0.99)),
        ms(percentile(&health, 0.99)),
        ratio(percentile(&check, 0.99), percentile(&health, 0.99)),
        check_rate,
        health_rate,
    );
}

/// `tenants` virtual agents' WatchPodStatus streams (host events included, as virtual agents ask
/// by default) open on one host agent: its RSS and sockets once every stream listed, against the
/// same agent before the streams; with an API server offering HTTP/2 (`http2`), or HTTP/1.1
/// only, where each watch holds a connection of its own.
async fn status_streams(tenants: usize, agent_binary: &Path, http2: bool) {
    use rcsync_proto::v1::pod_sync_client::PodSyncClient;
    use rcsync_proto::v1::{HostEvents, PodStatusEventType, WatchPodStatusRequest};
    println!(
        "\n== {tenants} tenants, a WatchPodStatus stream each (host events: all) over 8 connections; the API server offers {} ==",
        if http2 { "HTTP/2" } else { "HTTP/1.1 only" }
    );
    let dir = tempfile::tempdir().unwrap();
    let options = devcluster::server::ServerOptions {
        http2,
        ..Default::default()
    };
    let cluster = Cluster::start_with("host", "RCSYNC_BENCH_UNUSED", dir.path(), options).await;
    std::fs::write(
        dir.path().join("tenants.yaml"),
        tenants_yaml(tenants, dir.path(), false),
    )
    .unwrap();
    let (agent, grpc, admin) = spawn_host_agent(agent_binary, &cluster, dir.path()).await;
    until_ready(&admin).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss_before, sockets_before) = (rss_mib(agent.pid()), sockets(agent.pid()));
    let fleet = SimulatedFleet::start();
    let (listed_tx, mut listed) = mpsc::unbounded_channel::<usize>();
    let opened = Instant::now();
    fleet
        .spawn(async move {
            let channels = connect(&grpc, 8).await;
            for tenant in 0..tenants {
                let mut client = PodSyncClient::new(channels[tenant % channels.len()].clone());
                let request = WatchPodStatusRequest {
                    host_events: HostEvents::All as i32,
                };
                let mut events = client
                    .watch_pod_status(with_token(request, tenant))
                    .await
                    .expect("opening a WatchPodStatus stream")
                    .into_inner();
                let listed_tx = listed_tx.clone();
                tokio::spawn(async move {
                    while let Ok(Some(event)) = events.message().await {
                        if event.r#type == PodStatusEventType::InitialStateComplete as i32 {
                            let _ = listed_tx.send(tenant);
                        }
                    }
                });
            }
        })
        .await
        .unwrap();
    let mut seen = HashSet::new();
    while seen.len() < tenants {
        seen.insert(listed.recv().await.unwrap());
    }
    println!(
        "every stream listed its host Pods: {:.2} s after the first opened",
        opened.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss, open) = (rss_mib(agent.pid()), sockets(agent.pid()));
    println!(
        "host-agent RSS: {rss:.1} MiB ({rss_before:.1} MiB before the streams, {:.1} KiB per stream); \
         sockets: {open} ({sockets_before} before, {:.1} per stream)",
        (rss - rss_before) * 1024.0 / tenants as f64,
        (open - sockets_before) as f64 / tenants as f64,
    );
    drop(fleet);
}

/// `n` Pods created in the virtual cluster (`in_flight` creates at a time) reach the host,
/// against creating them on the host the same way: `trials` rounds of floor then rcsync on the
/// same clusters, so both see the same machine; the median ratio is the figure.
async fn pods(n: usize, in_flight: usize, trials: usize) {
    println!("\n== {n} Pods: virtual cluster → host, {in_flight} creates in flight, {trials} trials ==");
    // The pipeline is measured, not the tenant's rate limit (its defaults pace bursts past 1,000).
    let tenant =
        TenantSpec::new("team-a", "{enabled: true}").limits("{podSyncQps: 1000000, podSyncBurst: 1000000}");
    let system = System::start(&[tenant], &[]).await;
    let tenant = &system.virtual_side().tenant;
    let host_client = system.host.client().await;
    let host_pods: Api<Pod> = Api::namespaced(host_client.clone(), &tenant.host_namespace());
    let virtual_pods = system.virtual_side().pods().await;
    let agents = [system.host_agent.pid(), system.virtual_side().agent.pid()];
    let mut ratios = Vec::new();
    for trial in 0..trials {
        // Floor: the same Pods created directly in a host namespace of their own.
        let floor_namespace = format!("floor-{trial}");
        Api::<Namespace>::all(host_client.clone())
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": floor_namespace}})).unwrap(),
            )
            .await
            .unwrap();
        let floor_pods: Api<Pod> = Api::namespaced(host_client.clone(), &floor_namespace);
        let prefix = format!("direct-{trial}-");
        settle(&agents).await;
        let watching = seen_all(floor_pods.clone(), prefix.clone(), n).await;
        let cpu_before = cpu_time(None);
        let started = Instant::now();
        create_pods(&floor_pods, &prefix, n, in_flight).await;
        let floor = watching.await.unwrap() - started;
        let floor_cpu = cpu_time(None) - cpu_before;
        // Through rcsync: created in the virtual cluster, counted when the host holds them all.
        let prefix = format!("synced-{trial}-");
        let watching = seen_all(host_pods.clone(), prefix.clone(), n).await;
        settle(&agents).await;
        let cpu_before = [
            cpu_time(None),
            cpu_time(Some(agents[0])),
            cpu_time(Some(agents[1])),
        ];
        let writes_before = agents.map(writes);
        let switches_before = agents.map(switches);
        let started = Instant::now();
        create_pods(&virtual_pods, &prefix, n, in_flight).await;
        let created = started.elapsed();
        let through = watching.await.unwrap() - started;
        let cpu = [
            cpu_time(None) - cpu_before[0],
            cpu_time(Some(agents[0])) - cpu_before[1],
            cpu_time(Some(agents[1])) - cpu_before[2],
        ];
        // Counted once the agents are done with the round (its last status events included).
        settle(&agents).await;
        let per_pod_count = |count: fn(u32) -> u64, before: [u64; 2]| -> Vec<String> {
            agents
                .iter()
                .zip(before)
                .map(|(pid, before)| format!("{:.1}", count(*pid).saturating_sub(before) as f64 / n as f64))
                .collect()
        };
        let written = per_pod_count(writes, writes_before);
        let switched = per_pod_count(switches, switches_before);
        let ratio = through.as_secs_f64() / floor.as_secs_f64();
        ratios.push(ratio);
        let per_pod = |d: Duration| format!("{:.0}", d.as_secs_f64() * 1e6 / n as f64);
        println!(
            "trial {trial}: {:.3} s through rcsync vs {:.3} s created directly ({ratio:.2}×; the virtual creates alone {:.3} s); \
             CPU µs per Pod: direct {} (API server + bench), through rcsync {} (API servers + bench) + host agent {} + virtual agent {}; \
             system call writes per Pod: host agent {}, virtual agent {}; context switches per Pod: host agent {}, virtual agent {}",
            through.as_secs_f64(),
            floor.as_secs_f64(),
            created.as_secs_f64(),
            per_pod(floor_cpu),
            per_pod(cpu[0]),
            per_pod(cpu[1]),
            per_pod(cpu[2]),
            written[0],
            written[1],
            switched[0],
            switched[1],
        );
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "{n} Pods on the host, {in_flight} in flight: median {:.2}× the direct-create floor (range {:.2}–{:.2}× over {trials} trials)",
        ratios[ratios.len() / 2],
        ratios[0],
        ratios[ratios.len() - 1],
    );
}

/// Waits until this process and `others` have been quiet (under 2 ms of CPU between them in 50
/// ms), so a round starts on a machine the one before it no longer loads; gives up after 10 s.
async fn settle(others: &[u32]) {
    let total = || cpu_time(None) + others.iter().map(|pid| cpu_time(Some(*pid))).sum::<Duration>();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut before = total();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = total();
        if now - before < Duration::from_millis(2) {
            return;
        }
        before = now;
    }
    println!("(the machine did not settle within 10 s)");
}

/// Creates `n` Pods named `prefix0…`, `in_flight` at a time.
async fn create_pods(api: &Api<Pod>, prefix: &str, n: usize, in_flight: usize) {
    futures::stream::iter(0..n)
        .map(|i| {
            let pod: Pod = serde_json::from_value(json!({"metadata": {"name": format!("{prefix}{i}")},
                "spec": {"containers": [{"name": "app", "image": "registry.example/app:1.0"}]}}))
            .unwrap();
            async move { api.create(&PostParams::default(), &pod).await.unwrap() }
        })
        .buffer_unordered(in_flight)
        .collect::<Vec<_>>()
        .await;
}

/// Starts watching `api` and returns, once the watch has listed, a task that ends when `n` Pods
/// named `prefix…` have been seen (the instant it saw the last one).
async fn seen_all(api: Api<Pod>, prefix: String, n: usize) -> tokio::task::JoinHandle<Instant> {
    let (listed_tx, listed) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut watch = kube::runtime::watcher(api, Default::default()).boxed();
        let mut listed_tx = Some(listed_tx);
        let mut seen: HashSet<String> = HashSet::new();
        while let Some(Ok(event)) = watch.next().await {
            match event {
                kube::runtime::watcher::Event::InitDone => {
                    if let Some(tx) = listed_tx.take() {
                        let _ = tx.send(());
                    }
                }
                kube::runtime::watcher::Event::Apply(p) | kube::runtime::watcher::Event::InitApply(p) => {
                    let name = p.metadata.name.unwrap_or_default();
                    if name.starts_with(&prefix) {
                        seen.insert(name);
                        if seen.len() >= n {
                            return Instant::now();
                        }
                    }
                }
                _ => {}
            }
        }
        panic!("the watch of host Pods ended before {n} Pods named {prefix}… arrived");
    });
    listed.await.expect("the watch of host Pods lists");
    task
}
