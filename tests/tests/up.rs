//! `devcluster up`, as the README tells a newcomer to run it: the guide's kubectl commands behave
//! as printed, and Ctrl-C stops everything.

use std::process::{Command, Stdio};

use rcsync_tests::{Process, binary, eventually};

fn kubectl_available() -> bool {
    Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs one guide command with bash (H and V exported as the guide says).
fn sh(env: &str, command: &str) -> (bool, String) {
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("{env}\n{command}"))
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn devcluster_up_runs_the_system_and_its_guide_works_as_printed() {
    assert!(
        kubectl_available(),
        "kubectl is not installed: this test needs the kubectl of the machine image"
    );
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let args = vec!["up".to_string(), "--dir".to_string(), state.display().to_string()];
    let mut up = Process::spawn("devcluster-up", &binary("devcluster"), &args, dir.path());
    let log = up.log_path().to_path_buf();
    let guide = eventually("the guide to be printed", || async {
        let text = std::fs::read_to_string(&log).ok()?;
        text.contains("Press Ctrl-C to stop everything.").then_some(text)
    })
    .await;
    let commands: Vec<String> = guide
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("kubectl ") || l.starts_with("export "))
        .map(String::from)
        .collect();
    let env = commands
        .iter()
        .find(|c| c.starts_with("export "))
        .expect("the guide exports H and V")
        .clone();
    let step = |prefix: &str| {
        commands
            .iter()
            .filter(|c| c.starts_with(prefix))
            .cloned()
            .collect::<Vec<_>>()
    };
    let run = |command: &str| {
        let (ok, out) = sh(&env, command);
        assert!(ok, "`{command}` failed:\n{out}");
        out
    };

    // 1. Four classes on the host, the two the selector allows in the virtual cluster.
    let host = run(&step("kubectl $H get runtimeclass")[0]);
    for class in ["gvisor", "youki", "kata", "runc-debug"] {
        assert!(host.contains(class), "{host}");
    }
    eventually("gvisor and youki in the virtual cluster", || async {
        let out = sh(&env, "kubectl $V get runtimeclass -o name").1;
        (out.trim() == "runtimeclass.node.k8s.io/gvisor\nruntimeclass.node.k8s.io/youki").then_some(())
    })
    .await;

    // 2. The allowed Pod lands in the host namespace.
    run(step("kubectl $V apply")
        .iter()
        .find(|c| c.contains("allowed-pod"))
        .unwrap());
    eventually("the host Pod, Running on the host's node", || async {
        let out = sh(&env, &step("kubectl $H get pods -n vcluster-team-a")[0]).1;
        out.lines()
            .any(|l| {
                l.starts_with("sandboxed-x-default-x-team-a")
                    && l.contains("Running")
                    && l.contains("devcluster-node-0")
            })
            .then_some(())
    })
    .await;
    eventually(
        "the virtual Pod Running through the status copied back",
        || async {
            sh(&env, &step("kubectl $V get pod sandboxed")[0])
                .1
                .lines()
                .any(|l| l.starts_with("sandboxed") && l.contains("Running"))
                .then_some(())
        },
    )
    .await;

    // 3. The denied Pod gets the SyncWarning event, exactly as the spec prints it.
    run(step("kubectl $V apply")
        .iter()
        .find(|c| c.contains("denied-pod"))
        .unwrap());
    let describe = step("kubectl $V describe pod my-pod")[0].clone();
    eventually("the SyncWarning event in kubectl describe", || async {
        let out = sh(&env, &describe).1;
        out.lines()
            .any(|l| {
                l.contains("Warning")
                    && l.contains("SyncWarning")
                    && l.contains("pod-syncer")
                    && l.contains("did not sync pod \"my-pod\" to host because it does not match the selector under 'sync.fromHost.runtimeClasses.selector'")
            })
            .then_some(())
    })
    .await;

    // 4. A class created in the virtual cluster is deleted.
    run(step("kubectl $V create").first().expect("step 4 creates a class"));
    eventually("the tenant's class to be deleted", || async {
        (!sh(&env, "kubectl $V get runtimeclass -o name")
            .1
            .contains("/mine"))
        .then_some(())
    })
    .await;

    // 5. The Pod with a Secret and a ConfigMap runs on the host against translated copies.
    run(step("kubectl $V apply")
        .iter()
        .find(|c| c.contains("secret-pod"))
        .unwrap());
    let listing = step("kubectl $H get pods,configmaps,secrets")[0].clone();
    eventually("the host Pod and its copies", || async {
        let out = sh(&env, &listing).1;
        (out.contains("pod/with-secret-x-default-x-team-a")
            && out.contains("configmap/app-settings-x-default-x-team-a")
            && out.contains("secret/app-credentials-x-default-x-team-a"))
        .then_some(())
    })
    .await;

    // 6. The privileged Pod is refused with the Pod Security violation.
    run(step("kubectl $V apply")
        .iter()
        .find(|c| c.contains("refused-pod"))
        .unwrap());
    let describe = step("kubectl $V describe pod privileged")[0].clone();
    eventually("the SyncError event in kubectl describe", || async {
        let out = sh(&env, &describe).1;
        out.lines()
            .any(|l| {
                l.contains("Warning")
                    && l.contains("SyncError")
                    && l.contains(r#"violates PodSecurity "baseline:latest": privileged (container "app" must not set securityContext.privileged=true)"#)
            })
            .then_some(())
    })
    .await;
    assert!(
        !sh(&env, "kubectl $H get pods -n vcluster-team-a -o name")
            .1
            .contains("privileged"),
        "the refused Pod is not on the host"
    );

    // 7. Relabelling a host class out of the selector removes it.
    run(&step("kubectl $H label")[0]);
    eventually("youki to vanish from the virtual cluster", || async {
        (sh(&env, "kubectl $V get runtimeclass -o name").1.trim() == "runtimeclass.node.k8s.io/gvisor")
            .then_some(())
    })
    .await;

    // Ctrl-C stops every child and exits.
    up.signal("INT");
    let status = up.wait_exit().await;
    assert!(status.success(), "devcluster up exited with {status}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("stopped"), "{text}");
    assert_nothing_left_running(&state);
}

#[tokio::test]
async fn devcluster_up_ha_runs_two_replicas_of_each_agent_and_shows_the_leader() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let args = vec![
        "up".to_string(),
        "--ha".to_string(),
        "--dir".to_string(),
        state.display().to_string(),
    ];
    let mut up = Process::spawn("devcluster-up-ha", &binary("devcluster"), &args, dir.path());
    let log = up.log_path().to_path_buf();
    // One virtual agent leads and syncs, the other stands by; both host agents serve.
    eventually("status lines with a leader and a standby", || async {
        let text = std::fs::read_to_string(&log).ok()?;
        let status_of = |name: &str| {
            text.lines()
                .rev()
                .find(|l| l.split_whitespace().next() == Some(name))
                .map(str::to_string)
        };
        let (a, b) = (status_of("virtual-agent")?, status_of("virtual-agent-2")?);
        let leaders = [&a, &b]
            .iter()
            .filter(|l| l.contains(" leader ") && l.contains("classes synced 2"))
            .count();
        let standbys = [&a, &b].iter().filter(|l| l.contains("standby")).count();
        let hosts = status_of("host-agent")?.contains("host classes 4")
            && status_of("host-agent-2")?.contains("host classes 4");
        (leaders == 1 && standbys == 1 && hosts).then_some(())
    })
    .await;
    let kubeconfig = state.join("virtual.kubeconfig");
    let lease = Command::new("kubectl")
        .args(["--kubeconfig", &kubeconfig.display().to_string()])
        .args(["get", "lease", "-n", "rcsync-system", "rcsync-virtual-agent"])
        .args(["-o", "jsonpath={.spec.holderIdentity}"])
        .output()
        .unwrap();
    let holder = String::from_utf8_lossy(&lease.stdout).to_string();
    assert!(
        holder == "virtual-agent" || holder == "virtual-agent-2",
        "{holder:?}"
    );
    up.signal("INT");
    let status = up.wait_exit().await;
    assert!(status.success(), "devcluster up --ha exited with {status}");
    assert_nothing_left_running(&state);
}

/// No process started by `devcluster up` (they all name its state directory) outlives it.
fn assert_nothing_left_running(state: &std::path::Path) {
    let pids = Command::new("pgrep")
        .args(["-f", &state.display().to_string()])
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&pids.stdout).trim().is_empty(),
        "agents still running after devcluster up stopped: {}",
        String::from_utf8_lossy(&pids.stdout)
    );
}
