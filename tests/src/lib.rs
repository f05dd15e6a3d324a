//! Test harness for rcsync's process-level tests: API servers (devcluster, or real clusters from
//! `RCSYNC_HOST_KUBECONFIG` / `RCSYNC_VIRTUAL_KUBECONFIG`), agent processes whose logs are dumped
//! when a test fails, and waiting on conditions with deadlines (never fixed sleeps).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod proxy;
pub mod rbac;
pub mod system;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use devcluster::{DevCluster, ServerOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long any condition may take before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Waits until `check` returns `Some`, polling briefly, or panics naming `what` after the deadline.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {DEADLINE:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The retry delays a virtual agent logged for a Pod (milliseconds), in order, from its log
/// (`retrying the Pod later`, at debug level).
pub fn retry_delays(logs: &str, pod: &str) -> Vec<u64> {
    logs.lines()
        .filter(|l| l.contains("retrying the Pod later") && l.contains(&format!("pod={pod} ")))
        .filter_map(|l| {
            l.split("retry_in_ms=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// A free TCP port on loopback (bound and released; the OS does not hand it out again at once).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free TCP port on loopback that stays free for a later bind: below the kernel's ephemeral
/// range (`net.ipv4.ip_local_port_range`), which `free_port` and every outgoing connection draw
/// from, so no other test's port or connection takes it meanwhile. For an address that must be
/// known before its server starts (an agent pointed at an API server that comes later, a server
/// restarted on its port).
pub fn reserved_port() -> u16 {
    use rand::Rng as _;
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let floor = 10_000.min(low.saturating_sub(1_000));
    for _ in 0..1_000 {
        let port = rand::rng().random_range(floor..low);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between {floor} and {low}");
}

/// A `cargo` command run from a process that cargo started (a test, a bench, `cargo run`),
/// without the variables cargo set for that process: they would change build fingerprints (ring's
/// build script tracks `CARGO_MANIFEST_DIR`), so this build and the next one from a shell would
/// each rebuild ring and everything above it (rustls, kube, tonic: minutes in release).
pub fn cargo_command(cargo: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(cargo);
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let per_crate = [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
            "CARGO_PRIMARY_",
            "CARGO_TARGET_TMPDIR",
        ];
        if per_crate.iter().any(|p| key.starts_with(p)) || key == "OUT_DIR" {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Path of a workspace binary next to the running test executable. The first call brings the
/// workspace's binaries up to date with the cargo that runs the tests (`cargo test --workspace
/// --no-run`: the same feature set as the suite, so a no-op under `cargo test --workspace`), so
/// `cargo test -p rcsync-tests` never runs stale binaries.
pub fn binary(name: &str) -> PathBuf {
    static BUILD: std::sync::Once = std::sync::Once::new();
    let exe = std::env::current_exe().expect("the test executable has a path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("tests run from target/<profile>/deps");
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO")
            .ok()
            .or(option_env!("CARGO").map(String::from));
        let Some(cargo) = cargo else { return };
        let mut cmd = cargo_command(cargo);
        if dir.file_name().is_some_and(|p| p == "release") {
            // Benchmarks: only the binaries, optimised.
            cmd.args(["build", "--workspace", "--bins", "--release", "--quiet"]);
        } else {
            cmd.args(["test", "--workspace", "--no-run", "--quiet"]);
        }
        let status = cmd.status().expect("running cargo build for the agent binaries");
        assert!(status.success(), "building the agent binaries failed");
    });
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build it first (cargo test --workspace builds every binary)",
        path.display()
    );
    path
}

/// A running agent (or any) process. Its stderr and stdout go to a log file that is printed when
/// the test panics; it is killed on drop.
pub struct Process {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Process {
    /// Starts `program` with `args`, logging to `dir/logs/<name>.log`: a folder of its own, so
    /// log lines do not wake the host agent's watch of the folder its tenants file is in.
    pub fn spawn(name: &str, program: &Path, args: &[String], dir: &Path) -> Self {
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs).unwrap();
        let log = logs.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(program)
            .args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
        Self {
            name: name.to_string(),
            child,
            log,
        }
    }

    /// The file the process logs to.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the process has logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits (up to the deadline) for the exit status.
    pub async fn terminate(&mut self) -> ExitStatus {
        self.signal("TERM");
        self.wait_exit().await
    }

    /// Whether the process has exited (reaping it if so).
    pub fn has_exited(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_some()
    }

    /// Sends a signal by name (`TERM`, `HUP`, `KILL`).
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(ok.success(), "kill -{signal} {}", self.pid());
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let name = self.name.clone();
        eventually(&format!("{name} to exit"), || {
            let status = self.child.try_wait().unwrap();
            async move { status }
        })
        .await
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- {} log -----\n{}\n----- end of {} log -----",
                self.name,
                self.logs(),
                self.name
            );
        }
        // What it started goes too (devcluster up's agents): a failed test leaves nothing running.
        let children = children_of(self.pid());
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !children.is_empty() {
            let _ = Command::new("kill")
                .arg("-KILL")
                .args(children.iter().map(u32::to_string))
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The processes `pid` started and that still run, from `/proc`.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let child: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // "pid (comm) state ppid …": comm may hold spaces and parentheses.
            let ppid: u32 = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == pid).then_some(child)
        })
        .collect()
}

/// Starts a process that listens on loopback ports picked for it, retrying with fresh ports when
/// one was taken in the meantime (ports are picked by binding and releasing them, which races with
/// everything else on the machine). `args` builds the arguments from the `127.0.0.1:PORT`
/// addresses; `listening` is a log text the process prints once it has bound them all.
pub async fn spawn_listening(
    name: &str,
    program: &Path,
    dir: &Path,
    ports: usize,
    listening: &str,
    args: impl Fn(&[String]) -> Vec<String>,
) -> (Process, Vec<String>, Vec<String>) {
    for _ in 0..5 {
        // Below the ephemeral range: a process restarted on its ports finds them free.
        let addrs: Vec<String> = (0..ports)
            .map(|_| format!("127.0.0.1:{}", reserved_port()))
            .collect();
        let argv = args(&addrs);
        let mut process = Process::spawn(name, program, &argv, dir);
        let outcome = eventually(&format!("{name} to listen or exit"), || {
            let logs = process.logs();
            let exited = process.has_exited();
            async move {
                if logs.contains(listening) {
                    Some(true)
                } else if exited {
                    Some(false)
                } else {
                    None
                }
            }
        })
        .await;
        if outcome {
            return (process, addrs, argv);
        }
        let logs = process.logs();
        assert!(
            logs.contains("Address already in use"),
            "{name} exited before listening:\n{logs}"
        );
    }
    panic!("{name}: no free ports after 5 attempts");
}

/// A Kubernetes API server for a test: a fresh devcluster, or a real cluster from an environment
/// variable naming its kubeconfig.
pub struct Cluster {
    /// The devcluster, when one was started.
    pub dev: Option<DevCluster>,
    /// Path of a kubeconfig for it.
    pub kubeconfig: PathBuf,
}

impl Cluster {
    /// A devcluster (TLS + token), or the real cluster of `$env_var` when set.
    pub async fn start(name: &str, env_var: &str, dir: &Path) -> Self {
        Self::start_with(name, env_var, dir, ServerOptions::default()).await
    }

    /// Like [`Cluster::start`], a devcluster with `options` (e.g. simulated nodes).
    pub async fn start_with(name: &str, env_var: &str, dir: &Path, options: ServerOptions) -> Self {
        if let Ok(path) = std::env::var(env_var) {
            return Self {
                dev: None,
                kubeconfig: PathBuf::from(path),
            };
        }
        let dev = DevCluster::start(options).await.expect("devcluster starts");
        let kubeconfig = dir.join(format!("{name}.kubeconfig"));
        dev.write_kubeconfig(&kubeconfig, name).unwrap();
        Self {
            dev: Some(dev),
            kubeconfig,
        }
    }

    /// A kube-rs client for it.
    pub async fn client(&self) -> kube::Client {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap();
        kube::Client::try_from(config).unwrap()
    }
}

/// `GET base + path` through the `status` commands' client (`http://` or `https://` with `ca`,
/// a bearer `token`), off the async runtime; the status code and body, or the client's error.
pub async fn admin_get(
    base: &str,
    path: &str,
    token: Option<&str>,
    ca: Option<&Path>,
) -> Result<(u16, String), String> {
    let (base, path) = (base.to_string(), path.to_string());
    let (token, ca) = (token.map(str::to_string), ca.map(Path::to_path_buf));
    tokio::task::spawn_blocking(move || {
        rcsync_core::status_client::get(&base, &path, token.as_deref(), ca.as_deref())
    })
    .await
    .expect("the request's thread")
}

/// `GET http://addr/path` with plain HTTP/1.0; returns the status code and body.
pub async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropping_a_process_stops_what_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let script = "sleep 600 & echo started $!; wait";
        let process = Process::spawn(
            "parent",
            Path::new("/bin/sh"),
            &["-c".to_string(), script.to_string()],
            dir.path(),
        );
        let started = std::time::Instant::now();
        let child: u32 = loop {
            if let Some(pid) = process
                .logs()
                .strip_prefix("started ")
                .and_then(|l| l.trim().parse().ok())
            {
                break pid;
            }
            assert!(started.elapsed() < DEADLINE, "the shell did not start its child");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(Path::new(&format!("/proc/{child}")).exists());
        drop(process);
        // Killed and, reparented, reaped by init: gone, or a zombie on its way out.
        let gone = || {
            std::fs::read_to_string(format!("/proc/{child}/stat")).map_or(true, |stat| {
                stat.rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
            })
        };
        let waited = std::time::Instant::now();
        while !gone() {
            assert!(waited.elapsed() < DEADLINE, "the child {child} still runs");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
