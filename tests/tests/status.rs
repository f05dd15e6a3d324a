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
        "FAILING",
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
    assert_eq!(
        doc["podExtras"],
        serde_json::json!({"hostEvents": "all", "podApiServer": null}),
        "what the Pod syncer copies and adds, as configured"
    );

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

#[tokio::test]
async fn with_an_admin_token_file_the_virtual_agents_metrics_and_status_need_the_token_and_its_probes_do_not()
{
    let mut system = System::start(
        &[TenantSpec::new("team-a", "{enabled: true}")],
        &[runtime_class("gvisor", "runsc", &[])],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, "virtual-s3cret\n").unwrap();
    let token_arg = token_file.display().to_string();
    system.virtuals[0].set_agent_flag("--admin-token-file", &token_arg);
    system.virtuals[0].roll_agent().await;
    let v = system.virtual_side();
    v.wait_classes(&["gvisor"]).await;
    let admin = format!("http://{}", v.admin);
    let get = |path: &'static str, token: Option<&'static str>| {
        let admin = admin.clone();
        async move { rcsync_tests::admin_get(&admin, path, token, None).await.unwrap() }
    };
    for path in ["/livez", "/readyz"] {
        assert_eq!(get(path, None).await.0, 200, "{path} stays open for the kubelet");
    }
    for path in ["/metrics", "/status"] {
        let (code, body) = get(path, None).await;
        assert_eq!(code, 401, "{path}: {body}");
        assert!(body.contains("--admin-token-file"), "{body}");
        assert_eq!(get(path, Some("virtual-s3cre")).await.0, 401, "{path}");
        let (code, body) = get(path, Some("virtual-s3cret")).await;
        assert_eq!(code, 200, "{path}: {body}");
    }

    let (code, _, stderr) = status(&["--admin", &admin]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("answered 401") && stderr.contains("--admin-token-file"),
        "{stderr}"
    );
    let (code, stdout, stderr) = status(&["--admin", &admin, "--admin-token-file", &token_arg]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("team-a"), "{stdout}");

    // A token file that is there but empty stops the agent at start, naming it.
    let empty = dir.path().join("empty-token");
    std::fs::write(&empty, "\n").unwrap();
    let out = std::process::Command::new(binary("virtual-agent"))
        .args(["--kubeconfig", &v.cluster.kubeconfig.display().to_string()])
        .args(["--host-agent", &format!("http://127.0.0.1:{}", free_port())])
        .args(["--tenant", "team-a", "--admin-listen", "127.0.0.1:0"])
        .args(["--admin-token-file", &empty.display().to_string()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&empty.display().to_string()), "{stderr}");
}

#[tokio::test]
async fn with_admin_tls_the_virtual_agents_status_is_read_over_https() {
    let system = System::start(
        &[TenantSpec::new("team-a", "{enabled: true}")],
        &[runtime_class("gvisor", "runsc", &[])],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let pki = devcluster::pki::Pki::new("rcsync-admin-ca").unwrap();
    let pair = pki.server(&["localhost", "127.0.0.1"]).unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let (cert, key, ca) = (
        write("admin.crt", &pair.cert_pem),
        write("admin.key", &pair.key_pem),
        write("ca.crt", &pki.ca_pem()),
    );
    // A second replica (a standby: ready, it names the leader) serving its admin port over TLS.
    let (_replica, admin) = system
        .virtual_side()
        .spawn_replica(
            "virtual-agent-admin-tls",
            &[
                ("--identity", "admin-tls"),
                ("--admin-tls-cert", &cert),
                ("--admin-tls-key", &key),
            ],
        )
        .await;
    let https = format!("https://{admin}");
    let (code, stdout, stderr) = eventually("the replica to be ready over HTTPS", || {
        let (https, ca) = (https.clone(), ca.clone());
        async move {
            let result = status(&["--admin", &https, "--admin-ca", &ca]);
            (result.0 == 0).then_some(result)
        }
    })
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("team-a"), "{stdout}");
    let (code, _, stderr) = status(&["--admin", &https]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--admin-ca"), "{stderr}");
    let (code, _, stderr) = status(&["--admin", &format!("http://{admin}")]);
    assert_eq!(code, 2, "plain HTTP gets no answer: {stderr}");
}
