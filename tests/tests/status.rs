//! `virtual-agent status` against running agents: the table, the Pods not synced and why, and
//! the exit codes (ready, not ready, unreachable).

use rcsync_tests::system::{System, TenantSpec, pod, runtime_class};
use rcsync_tests::{binary, eventually, free_port, spawn_listening};

fn status(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(binary("virtual-agent"))
        .arg("status")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test]
async fn virtual_agent_status_shows_classes_pods_and_why_one_is_not_synced() {
    let mut system = System::start(
        &[TenantSpec::new(
            "team-a",
            "{enabled: true, selector: {matchLabels: {env: dev}}}",
        )],
        &[
            runtime_class("gvisor", "runsc", &[("env", "dev")]),
            runtime_class("kata", "kata", &[("env", "prod")]),
        ],
    )
    .await;
    system.virtual_side().wait_classes(&["gvisor"]).await;
    system
        .virtual_side()
        .create_pod(&pod("runs", Some("gvisor")))
        .await;
    // The virtual API server admits Pods only with a class it has: made by hand, as a tenant would.
    system.virtuals[0]
        .create_pod_with_homemade_class(&pod("blocked", Some("kata")), "kata")
        .await;
    let v = system.virtual_side();
    let admin = format!("http://{}", v.admin);
    eventually("both Pods in the status: one synced, one blocked", || {
        let admin = admin.clone();
        async move {
            let (_, json, _) = status(&["--admin", &admin, "-o", "json"]);
            let doc: serde_json::Value = serde_json::from_str(&json).ok()?;
            (doc["pods"]["synced"] == 1 && doc["pods"]["blocked"] == 1 && doc["connected"] == true)
                .then_some(())
        }
    })
    .await;
    let (code, stdout, stderr) = status(&["--admin", &admin]);
    assert!(stdout.contains("does not match the selector"), "{stdout}");
    assert_eq!(code, 0, "{stderr}");
    let mut lines = stdout.lines();
    let header = lines.next().unwrap();
    for column in [
        "HOST-AGENT",
        "TENANT",
        "LEADER",
        "CONNECTED",
        "SYNC",
        "CLASSES",
        "SYNCED",
        "BLOCKED",
        "WAITING",
        "ORPHANED",
    ] {
        assert!(header.contains(column), "{header}");
    }
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        &row[1..],
        [
            "team-a",
            "virtual-agent-team-a",
            "true",
            "enabled",
            "1",
            "1",
            "1",
            "0",
            "0"
        ],
        "{stdout}"
    );
    let blocked = stdout
        .lines()
        .find(|l| l.starts_with("default ") && l.contains(" blocked "))
        .unwrap();
    assert!(
        blocked.contains("did not sync pod \"blocked\" to host"),
        "{blocked}"
    );
    let (code, stdout, _) = status(&["--admin", &admin, "-o", "json"]);
    assert_eq!(code, 0);
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(doc["classes"], serde_json::json!(["gvisor"]));
    assert_eq!(doc["leading"], true);
    assert_eq!(doc["leader"], "virtual-agent-team-a");
    assert_eq!(doc["pods"]["notSynced"][0]["name"], "blocked");

    let (code, _, stderr) = status(&["--admin", &format!("http://127.0.0.1:{}", free_port())]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("unreachable"), "{stderr}");

    // A virtual agent whose host agent is away never gets its initial state: not ready, exit 1.
    let dir = tempfile::tempdir().unwrap();
    let (_agent, addrs, _) = spawn_listening(
        "lonely-virtual-agent",
        &binary("virtual-agent"),
        dir.path(),
        1,
        "starting",
        |addrs| {
            vec![
                "--kubeconfig".into(),
                v.cluster.kubeconfig.display().to_string(),
                "--host-agent".into(),
                format!("http://127.0.0.1:{}", free_port()),
                "--tenant".into(),
                "team-a".into(),
                "--admin-listen".into(),
                addrs[0].clone(),
            ]
        },
    )
    .await;
    let admin = format!("http://{}", addrs[0]);
    let (code, _, stderr) = eventually("the admin port to answer", || {
        let admin = admin.clone();
        async move {
            let result = status(&["--admin", &admin]);
            (result.0 != 2).then_some(result)
        }
    })
    .await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("not ready"), "{stderr}");
}
