//! devcluster driven by the installed kubectl, as a person would use it. Every command must
//! succeed without error lines.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use devcluster::{DevCluster, ServerOptions};
use k8s_openapi::api::events::v1::Event as EventV1;
use kube::api::PostParams;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

struct Kubectl {
    kubeconfig: PathBuf,
    cache: PathBuf,
}

impl Kubectl {
    fn new(cluster: &DevCluster, dir: &Path) -> Self {
        if which("kubectl").is_none() {
            panic!("kubectl is not installed: these tests need the kubectl of the machine image on PATH");
        }
        let kubeconfig = dir.join("kubeconfig");
        cluster.write_kubeconfig(&kubeconfig, "devcluster").unwrap();
        Self {
            kubeconfig,
            cache: dir.join("cache"),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("kubectl");
        cmd.args(args)
            .arg("--cache-dir")
            .arg(&self.cache)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Runs kubectl; fails the test on a non-zero exit or any stderr output.
    async fn run(&self, args: &[&str]) -> String {
        self.run_with_input(args, None).await
    }

    async fn run_with_input(&self, args: &[&str], input: Option<&str>) -> String {
        let (ok, stdout, stderr) = self.exec(args, input).await;
        assert!(ok, "kubectl {args:?} failed:\n{stdout}\n{stderr}");
        assert!(
            stderr.trim().is_empty(),
            "kubectl {args:?} printed errors:\n{stderr}"
        );
        stdout
    }

    /// Runs kubectl expecting failure; returns stderr.
    async fn fail(&self, args: &[&str], input: Option<&str>) -> String {
        let (ok, _, stderr) = self.exec(args, input).await;
        assert!(!ok, "kubectl {args:?} should fail");
        stderr
    }

    /// Runs kubectl with optional stdin: (success, stdout, stderr).
    async fn exec(&self, args: &[&str], input: Option<&str>) -> (bool, String, String) {
        use tokio::io::AsyncWriteExt;
        let mut child = self.command(args).spawn().expect("kubectl starts");
        let mut stdin = child.stdin.take().unwrap();
        if let Some(input) = input {
            stdin.write_all(input.as_bytes()).await.unwrap();
        }
        drop(stdin);
        let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .expect("kubectl finishes")
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

const GVISOR_V1: &str = r#"
apiVersion: node.k8s.io/v1
kind: RuntimeClass
metadata:
  name: gvisor
  labels:
    env: dev
    k: a
handler: runsc
"#;

#[tokio::test]
async fn kubectl_workflow_has_no_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = DevCluster::start(ServerOptions::default()).await.unwrap();
    let kubectl = Kubectl::new(&cluster, dir.path());

    // apply: create, then change.
    let out = kubectl
        .run_with_input(&["apply", "-f", "-"], Some(GVISOR_V1))
        .await;
    assert_eq!(out.trim(), "runtimeclass.node.k8s.io/gvisor created");
    let out = kubectl
        .run_with_input(&["apply", "-f", "-"], Some(&GVISOR_V1.replace("k: a", "k: b")))
        .await;
    assert_eq!(out.trim(), "runtimeclass.node.k8s.io/gvisor configured");
    let youki = GVISOR_V1
        .replace("gvisor", "youki")
        .replace("runsc", "youki")
        .replace("k: a", "k: c");
    kubectl.run_with_input(&["apply", "-f", "-"], Some(&youki)).await;

    // get with a set-based selector; Table columns as on a real cluster.
    let out = kubectl
        .run(&["get", "runtimeclass", "-l", "env=dev,k in (a,b)"])
        .await;
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].split_whitespace().eq(["NAME", "HANDLER", "AGE"]),
        "{out}"
    );
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[1].starts_with("gvisor") && lines[1].contains("runsc"),
        "{out}"
    );

    // get -o yaml.
    let out = kubectl
        .run(&["get", "runtimeclass", "gvisor", "-o", "yaml"])
        .await;
    assert!(
        out.contains("handler: runsc") && out.contains("k: b") && out.contains("resourceVersion:"),
        "{out}"
    );

    // label and merge patch.
    let out = kubectl.run(&["label", "runtimeclass", "gvisor", "team=a"]).await;
    assert_eq!(out.trim(), "runtimeclass.node.k8s.io/gvisor labeled");
    let out = kubectl
        .run(&[
            "patch",
            "runtimeclass",
            "gvisor",
            "--type=merge",
            "-p",
            r#"{"metadata":{"labels":{"k":"z"}}}"#,
        ])
        .await;
    assert_eq!(out.trim(), "runtimeclass.node.k8s.io/gvisor patched");
    let out = kubectl
        .run(&[
            "get",
            "runtimeclass",
            "gvisor",
            "-o",
            "jsonpath={.metadata.labels}",
        ])
        .await;
    assert!(
        out.contains(r#""k":"z""#) && out.contains(r#""team":"a""#),
        "{out}"
    );

    // A Pod, its status subresource, and events written through events.k8s.io/v1.
    let pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: my-pod\nspec:\n  runtimeClassName: youki\n  containers:\n  - name: c\n    image: busybox\n";
    kubectl.run_with_input(&["apply", "-f", "-"], Some(pod)).await;
    let out = kubectl
        .run(&[
            "patch",
            "pod",
            "my-pod",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"phase":"Running"}}"#,
        ])
        .await;
    assert_eq!(out.trim(), "pod/my-pod patched");
    let out = kubectl.run(&["get", "pod", "my-pod"]).await;
    assert!(out.lines().nth(1).unwrap().contains("Running"), "{out}");

    let kubeconfig = kube::config::Kubeconfig::from_yaml(&cluster.kubeconfig("t")).unwrap();
    let client = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .unwrap(),
    )
    .unwrap();
    let uid = kubectl
        .run(&["get", "pod", "my-pod", "-o", "jsonpath={.metadata.uid}"])
        .await;
    let event: EventV1 = serde_json::from_value(json!({
        "metadata": {"name": "my-pod.1", "namespace": "default"},
        "eventTime": "2026-01-01T00:00:00.000000Z",
        "reason": "SyncWarning", "type": "Warning", "action": "Sync",
        "note": "did not sync pod \"my-pod\" to host because it does not match the selector under 'sync.fromHost.runtimeClasses.selector'",
        "reportingController": "pod-syncer", "reportingInstance": "pod-syncer",
        "regarding": {"apiVersion": "v1", "kind": "Pod", "name": "my-pod", "namespace": "default", "uid": uid},
    }))
    .unwrap();
    kube::Api::<EventV1>::namespaced(client, "default")
        .create(&PostParams::default(), &event)
        .await
        .unwrap();
    let out = kubectl.run(&["describe", "pod", "my-pod"]).await;
    let event_line = out
        .lines()
        .find(|l| l.contains("SyncWarning"))
        .unwrap_or_else(|| panic!("no event in:\n{out}"));
    assert!(
        event_line.contains("Warning") && event_line.contains("pod-syncer"),
        "{event_line}"
    );
    assert!(
        event_line.contains("did not sync pod \"my-pod\" to host because it does not match the selector"),
        "{event_line}"
    );
    assert!(out.contains("Runtime Class Name:  youki"), "{out}");

    // A quota (protobuf, as `kubectl create quota` sends it) and its use as `kubectl get quota`
    // prints it, once the quota controller has counted my-pod.
    let out = kubectl
        .run(&["create", "quota", "compute", "--hard=pods=3,limits.memory=1Gi"])
        .await;
    assert_eq!(out.trim(), "resourcequota/compute created");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let row = loop {
        let out = kubectl.run(&["get", "quota", "compute"]).await;
        let lines: Vec<&str> = out.lines().collect();
        assert!(
            lines[0]
                .split_whitespace()
                .eq(["NAME", "AGE", "REQUEST", "LIMIT"]),
            "{out}"
        );
        if lines[1].contains("pods: 1/3") {
            break lines[1].to_string();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the quota never counted my-pod:\n{out}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(row.ends_with("limits.memory: 0/1Gi"), "{row}");
    let err = kubectl
        .fail(
            &[
                "create",
                "quota",
                "scoped",
                "--hard=pods=1",
                "--scopes=BestEffort",
            ],
            None,
        )
        .await;
    assert!(
        err.contains("spec.scopes: Invalid value") && err.contains("scoped quotas are not supported"),
        "{err}"
    );

    // get --watch prints the change.
    let mut watch = kubectl
        .command(&["get", "runtimeclass", "--watch"])
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let header = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        header.split_whitespace().eq(["NAME", "HANDLER", "AGE"]),
        "{header}"
    );
    let mut seen = Vec::new();
    while seen.len() < 2 {
        seen.push(
            tokio::time::timeout(Duration::from_secs(30), lines.next_line())
                .await
                .unwrap()
                .unwrap()
                .unwrap(),
        );
    }
    kubectl
        .run(&["label", "runtimeclass", "youki", "watched=yes"])
        .await;
    let changed = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(changed.starts_with("youki"), "{changed}");
    watch.kill().await.unwrap();
    let mut stderr = String::new();
    use tokio::io::AsyncReadExt;
    watch
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
    assert!(
        stderr.trim().is_empty(),
        "kubectl get --watch printed errors:\n{stderr}"
    );

    // delete (kubectl waits until the object is gone).
    let out = kubectl.run(&["delete", "runtimeclass", "gvisor"]).await;
    assert_eq!(out.trim(), "runtimeclass.node.k8s.io \"gvisor\" deleted");
    let out = kubectl.run(&["get", "runtimeclass", "-o", "name"]).await;
    assert_eq!(out.trim(), "runtimeclass.node.k8s.io/youki");

    // What a real API server refuses, devcluster refuses the same way.
    let err = kubectl
        .fail(
            &["apply", "-f", "-"],
            Some(&pod.replace("my-pod", "other").replace("youki", "missing")),
        )
        .await;
    assert!(
        err.contains("pods \"other\" is forbidden: pod rejected: RuntimeClass \"missing\" not found"),
        "{err}"
    );
    let err = kubectl
        .fail(
            &[
                "patch",
                "runtimeclass",
                "youki",
                "--type=merge",
                "-p",
                r#"{"handler":"other"}"#,
            ],
            None,
        )
        .await;
    assert!(
        err.contains("handler: Invalid value: \"other\": field is immutable"),
        "{err}"
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn kubectl_pagination_cascading_delete_and_reapply() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = DevCluster::start(ServerOptions::default()).await.unwrap();
    let kubectl = Kubectl::new(&cluster, dir.path());

    // explain reads the OpenAPI v3 schemas.
    let out = kubectl.run(&["explain", "runtimeclass.handler"]).await;
    assert!(
        out.contains("KIND:       RuntimeClass") && out.contains("FIELD: handler <string>"),
        "{out}"
    );
    assert!(out.contains("handler specifies the underlying runtime"), "{out}");

    // Strict field validation names nested unknown fields.
    let typo = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: typo\nspec:\n  containers:\n  - name: c\n    image: busybox\n    colour: red\n";
    let err = kubectl.fail(&["apply", "-f", "-"], Some(typo)).await;
    assert!(
        err.contains("unknown field \"spec.containers[0].colour\""),
        "{err}"
    );

    // Imperative creates send protobuf bodies.
    let out = kubectl.run(&["create", "namespace", "team-x"]).await;
    assert_eq!(out.trim(), "namespace/team-x created");
    let out = kubectl
        .run(&[
            "create",
            "configmap",
            "literal",
            "--from-literal=a=b",
            "-n",
            "team-x",
        ])
        .await;
    assert_eq!(out.trim(), "configmap/literal created");
    let out = kubectl
        .run(&[
            "get",
            "configmap",
            "literal",
            "-n",
            "team-x",
            "-o",
            "jsonpath={.data.a}",
        ])
        .await;
    assert_eq!(out.trim(), "b");
    let out = kubectl
        .run(&[
            "create",
            "secret",
            "generic",
            "creds",
            "--from-literal=password=hunter2",
        ])
        .await;
    assert_eq!(out.trim(), "secret/creds created");
    let out = kubectl
        .run(&["get", "secret", "creds", "-o", "jsonpath={.data.password}"])
        .await;
    assert_eq!(out.trim(), "aHVudGVyMg==");

    // apply twice, the second time without a field: the field goes away.
    let with_label = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  labels:\n    tier: gold\ndata:\n  a: \"1\"\n  b: \"2\"\n";
    kubectl
        .run_with_input(&["apply", "-f", "-"], Some(with_label))
        .await;
    let without = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n  a: \"1\"\n";
    let out = kubectl.run_with_input(&["apply", "-f", "-"], Some(without)).await;
    assert_eq!(out.trim(), "configmap/settings configured");
    let out = kubectl
        .run(&[
            "get",
            "configmap",
            "settings",
            "-o",
            "jsonpath={.data} {.metadata.labels}",
        ])
        .await;
    assert_eq!(out.trim(), r#"{"a":"1"}"#, "the removed key and label are gone");

    // Server-side apply: a field another manager owns is a conflict, unless forced.
    let changed = with_label.replace("a: \"1\"", "a: \"changed\"");
    kubectl
        .run_with_input(&["apply", "-f", "-"], Some(with_label))
        .await;
    let err = kubectl
        .fail(&["apply", "--server-side", "-f", "-"], Some(&changed))
        .await;
    assert!(
        err.contains("Apply failed with 1 conflict")
            && err.contains("kubectl-client-side-apply")
            && err.contains(".data.a"),
        "{err}"
    );
    let out = kubectl
        .run_with_input(
            &["apply", "--server-side", "--force-conflicts", "-f", "-"],
            Some(&changed),
        )
        .await;
    assert_eq!(out.trim(), "configmap/settings serverside-applied");
    let out = kubectl
        .run(&["get", "configmap", "settings", "-o", "jsonpath={.data.a}"])
        .await;
    assert_eq!(out.trim(), "changed");
    let out = kubectl
        .run(&[
            "get",
            "configmap",
            "settings",
            "-o",
            "yaml",
            "--show-managed-fields",
        ])
        .await;
    assert!(
        out.contains("manager: kubectl\n") && out.contains("operation: Apply") && out.contains("f:a: {}"),
        "{out}"
    );

    // get --chunk-size=2 pages through every object.
    for i in 0..5 {
        kubectl
            .run_with_input(
                &["apply", "-f", "-"],
                Some(&format!(
                    "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: chunk-{i}\ndata: {{}}\n"
                )),
            )
            .await;
    }
    let out = kubectl
        .run(&["get", "configmaps", "--chunk-size=2", "-o", "name"])
        .await;
    let names: Vec<&str> = out.lines().filter(|l| l.contains("chunk-")).collect();
    assert_eq!(names.len(), 5, "{out}");

    // delete --cascade=foreground of an owner with dependents.
    let uid = kubectl
        .run(&["get", "configmap", "chunk-0", "-o", "jsonpath={.metadata.uid}"])
        .await;
    for i in 1..3 {
        let dependent = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: chunk-{i}\n  ownerReferences:\n  - apiVersion: v1\n    kind: ConfigMap\n    name: chunk-0\n    uid: {uid}\ndata: {{}}\n"
        );
        kubectl
            .run_with_input(&["apply", "-f", "-"], Some(&dependent))
            .await;
    }
    let out = kubectl
        .run(&["delete", "configmap", "chunk-0", "--cascade=foreground"])
        .await;
    assert_eq!(out.trim(), "configmap \"chunk-0\" deleted");
    let out = kubectl.run(&["get", "configmaps", "-o", "name"]).await;
    for gone in ["chunk-0", "chunk-1", "chunk-2"] {
        assert!(
            !out.contains(&format!("/{gone}\n")) && !out.ends_with(&format!("/{gone}")),
            "{gone} still there:\n{out}"
        );
    }
    assert!(
        out.contains("configmap/chunk-3") && out.contains("configmap/chunk-4"),
        "{out}"
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn kubectl_diff_and_server_dry_runs_show_what_would_be_stored() {
    let cluster = DevCluster::start(ServerOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubectl = Kubectl::new(&cluster, dir.path());
    let class = |v: &str| {
        format!(
            "apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata:\n  name: diffed\n  labels:\n    v: \"{v}\"\nhandler: runc\n"
        )
    };
    kubectl
        .run_with_input(&["apply", "-f", "-"], Some(&class("1")))
        .await;
    // A changed label: the diff shows it and exits 1.
    let (same, stdout, stderr) = kubectl.exec(&["diff", "-f", "-"], Some(&class("2"))).await;
    assert!(!same, "kubectl diff exits 1 when something differs");
    assert!(stderr.trim().is_empty(), "{stderr}");
    assert!(
        stdout.contains("-    v: \"1\"") && stdout.contains("+    v: \"2\""),
        "{stdout}"
    );
    // Nothing after apply.
    let (same, stdout, _) = kubectl.exec(&["diff", "-f", "-"], Some(&class("1"))).await;
    assert!(same && stdout.trim().is_empty(), "{stdout}");
    // A server-side dry run prints the would-be object and stores nothing.
    let would = kubectl
        .run_with_input(
            &["apply", "--dry-run=server", "-o", "yaml", "-f", "-"],
            Some(&class("3")),
        )
        .await;
    assert!(would.contains("v: \"3\""), "{would}");
    let stored = kubectl
        .run(&[
            "get",
            "runtimeclass",
            "diffed",
            "-o",
            "jsonpath={.metadata.labels.v}",
        ])
        .await;
    assert_eq!(stored, "1");
    let deleted = kubectl
        .run(&["delete", "runtimeclass", "diffed", "--dry-run=server"])
        .await;
    assert!(deleted.contains("server dry run"), "{deleted}");
    kubectl.run(&["get", "runtimeclass", "diffed"]).await;
}

/// RBAC as kubectl sees it: typed creates of service accounts, roles and bindings; `auth can-i` as
/// the admin, impersonating an account and as the account itself; `auth whoami`; `create token`
/// giving a token that works, is refused with upstream's 403 where RBAC says no, stops working
/// when the account is deleted, and expires.
#[tokio::test]
async fn kubectl_auth_rbac_and_service_account_tokens() {
    let cluster = DevCluster::start(ServerOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let k = Kubectl::new(&cluster, dir.path());
    k.run(&["create", "namespace", "team"]).await;
    k.run(&["create", "serviceaccount", "reader", "-n", "team"]).await;
    k.run(&[
        "create",
        "role",
        "pod-reader",
        "--verb=get,list,watch",
        "--resource=pods",
        "-n",
        "team",
    ])
    .await;
    k.run(&[
        "create",
        "rolebinding",
        "reader",
        "--role=pod-reader",
        "--serviceaccount=team:reader",
        "-n",
        "team",
    ])
    .await;
    k.run(&[
        "create",
        "clusterrole",
        "class-reader",
        "--verb=get",
        "--resource=runtimeclasses.node.k8s.io",
    ])
    .await;
    k.run(&[
        "create",
        "clusterrolebinding",
        "reader",
        "--clusterrole=class-reader",
        "--serviceaccount=team:reader",
    ])
    .await;

    // The admin may do anything.
    assert_eq!(k.run(&["auth", "can-i", "*", "*"]).await.trim(), "yes");
    let whoami = k
        .run(&["auth", "whoami", "-o", "jsonpath={.status.userInfo.username}"])
        .await;
    assert_eq!(whoami, "devcluster-admin");
    // Impersonating the account: exactly what its bindings give.
    let sa = "--as=system:serviceaccount:team:reader";
    assert_eq!(
        k.run(&["auth", "can-i", "list", "pods", "-n", "team", sa])
            .await
            .trim(),
        "yes"
    );
    // (kubectl warns that the class is not namespaced: it asks in the default namespace.)
    let (ok, out, _) = k
        .exec(&["auth", "can-i", "get", "runtimeclasses.node.k8s.io", sa], None)
        .await;
    assert!(ok && out.trim() == "yes", "{out}");
    let (ok, out, _) = k
        .exec(&["auth", "can-i", "delete", "pods", "-n", "team", sa], None)
        .await;
    assert!(!ok && out.trim() == "no", "{out}");
    let (ok, out, _) = k
        .exec(&["auth", "can-i", "list", "pods", "-n", "default", sa], None)
        .await;
    assert!(!ok && out.trim() == "no", "{out}");
    let rules = k.run(&["auth", "can-i", "--list", "-n", "team", sa]).await;
    assert!(
        rules
            .lines()
            .any(|l| l.starts_with("pods ") && l.contains("[get list watch]")),
        "{rules}"
    );
    let whoami = k
        .run(&["auth", "whoami", sa, "-o", "jsonpath={.status.userInfo.groups}"])
        .await;
    assert!(whoami.contains("system:serviceaccounts:team"), "{whoami}");

    // A token of the account works as the account.
    let token = k
        .run(&["create", "token", "reader", "-n", "team", "--duration=10m"])
        .await;
    let token = token.trim();
    let as_token = |args: &[&str]| {
        let mut all = vec!["--token", token];
        all.extend_from_slice(args);
        all.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let run_as = |args: Vec<String>| {
        let k = &k;
        async move {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            k.exec(&refs, None).await
        }
    };
    let (ok, _, err) = run_as(as_token(&["get", "pods", "-n", "team"])).await;
    assert!(ok, "{err}");
    let (ok, _, err) = run_as(as_token(&["get", "secrets", "-n", "team"])).await;
    assert!(!ok, "secrets must be refused");
    assert!(
        err.contains(r#"secrets is forbidden: User "system:serviceaccount:team:reader" cannot list resource "secrets" in API group "" in the namespace "team""#),
        "{err}"
    );
    let (ok, out, err) = run_as(as_token(&[
        "auth",
        "whoami",
        "-o",
        "jsonpath={.status.userInfo.username}",
    ]))
    .await;
    assert!(ok && out == "system:serviceaccount:team:reader", "{out}{err}");

    // A lifetime beyond 48 hours is refused, naming the field.
    let err = k
        .fail(
            &["create", "token", "reader", "-n", "team", "--duration=72h"],
            None,
        )
        .await;
    assert!(
        err.contains("spec.expirationSeconds: Invalid value: 259200: must be between 1 second and 48 hours"),
        "{err}"
    );

    // A short-lived token expires.
    let short = k
        .run(&["create", "token", "reader", "-n", "team", "--duration=2s"])
        .await;
    let short = short.trim().to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, _, err) = k
            .exec(&["--token", &short, "get", "pods", "-n", "team"], None)
            .await;
        if !ok {
            assert!(err.contains("Unauthorized"), "{err}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the 2 s token still works"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Tokens are bound to the account: deleting it revokes them.
    k.run(&["delete", "serviceaccount", "reader", "-n", "team"]).await;
    let (ok, _, err) = run_as(as_token(&["get", "pods", "-n", "team"])).await;
    assert!(!ok && err.contains("Unauthorized"), "{err}");
}

/// kubectl finds strategic merge patch support and the merge keys of list fields in OpenAPI v3
/// (it used to log "OpenAPI V3 path does not support strategic merge patch" and fall back to its
/// compiled-in types), and custom resources get JSON merge patches, as upstream.
#[tokio::test]
async fn kubectl_apply_reads_strategic_merge_metadata_from_openapi_v3() {
    let cluster = DevCluster::start(ServerOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let k = Kubectl::new(&cluster, dir.path());
    let pod = |image: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\nspec:\n  containers: [{{name: app, image: {image}}}]\n"
        )
    };
    k.run_with_input(&["apply", "-f", "-"], Some(&pod("nginx:1")))
        .await;
    let (ok, _, log) = k.exec(&["apply", "-f", "-", "-v=8"], Some(&pod("nginx:2"))).await;
    assert!(ok, "{log}");
    assert!(!log.contains("does not support strategic merge patch"), "{log}");
    assert!(log.contains("application/strategic-merge-patch+json"), "{log}");
    assert!(
        log.contains("$setElementOrder/containers"),
        "the merge key of containers was not used:\n{log}"
    );
    let image = k
        .run(&["get", "pod", "p", "-o", "jsonpath={.spec.containers[0].image}"])
        .await;
    assert_eq!(image, "nginx:2");
}

/// `kubectl debug` adds an ephemeral container to a running Pod through its subresource, and
/// the kubelet stand-in starts it; `kubectl debug` of a Pod's existing ephemeral container name
/// is refused in upstream's words.
#[tokio::test]
async fn kubectl_debug_adds_a_running_ephemeral_container() {
    let cluster = with_a_node().await;
    let dir = tempfile::tempdir().unwrap();
    let k = Kubectl::new(&cluster, dir.path());
    k.run(&["run", "web", "--image=registry.example/app:1"]).await;
    k.run(&["wait", "--for=condition=Ready", "pod/web", "--timeout=20s"])
        .await;
    k.run(&[
        "debug",
        "web",
        "--image=busybox:1.36",
        "-c",
        "debugger",
        "--profile=general",
    ])
    .await;
    let state = eventually_output(
        &k,
        &[
            "get",
            "pod",
            "web",
            "-o",
            "jsonpath={.status.ephemeralContainerStatuses[0].state}",
        ],
        |out| out.contains("running"),
    )
    .await;
    assert!(state.contains("startedAt"), "{state}");
    let again = k
        .fail(
            &[
                "debug",
                "web",
                "--image=busybox:1.37",
                "-c",
                "debugger",
                "--profile=general",
            ],
            None,
        )
        .await;
    assert!(
        again.contains(r#"existing ephemeral containers "debugger" may not be changed"#),
        "{again}"
    );
}

/// Runs `args` until its output satisfies `done` (20 s at most); the last output.
async fn eventually_output(k: &Kubectl, args: &[&str], done: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let out = k.run(args).await;
        if done(&out) {
            return out;
        }
        assert!(tokio::time::Instant::now() < deadline, "kubectl {args:?}: {out}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `kubectl create pdb` (a protobuf body) makes a budget whose status `kubectl get pdb` shows,
/// and `kubectl drain` evicts what the budget allows and is refused the rest with upstream's
/// words, retrying until its timeout; an invalid budget is refused as upstream refuses it.
#[tokio::test]
async fn kubectl_drain_evicts_only_what_a_disruption_budget_allows() {
    let cluster = with_a_node().await;
    let dir = tempfile::tempdir().unwrap();
    let k = Kubectl::new(&cluster, dir.path());
    for name in ["web-0", "web-1"] {
        k.run(&["run", name, "--image=registry.example/app:1", "--labels=app=web"])
            .await;
        k.run(&[
            "wait",
            "--for=condition=Ready",
            &format!("pod/{name}"),
            "--timeout=20s",
        ])
        .await;
    }
    k.run(&[
        "create",
        "pdb",
        "web",
        "--selector=app=web",
        "--max-unavailable=50%",
    ])
    .await;
    let table = eventually_output(&k, &["get", "pdb", "web"], |out| {
        out.lines()
            .nth(1)
            .is_some_and(|l| l.split_whitespace().nth(3) == Some("1"))
    })
    .await;
    assert!(
        table.starts_with("NAME   MIN AVAILABLE   MAX UNAVAILABLE   ALLOWED DISRUPTIONS"),
        "{table}"
    );
    let refused = k
        .fail(
            &[
                "create",
                "pdb",
                "bad",
                "--selector=app=web",
                "--min-available=120%",
            ],
            None,
        )
        .await;
    assert!(
        refused.contains("spec.minAvailable: Invalid value: \"120%\": must not be greater than 100%"),
        "{refused}"
    );

    let drained = k
        .fail(
            &[
                "drain",
                "devcluster-node-0",
                "--force",
                "--pod-selector=app=web",
                "--timeout=4s",
            ],
            None,
        )
        .await;
    assert!(
        drained.contains("Cannot evict pod as it would violate the pod's disruption budget."),
        "{drained}"
    );
    let terminating = k
        .run(&[
            "get",
            "pods",
            "-o",
            "jsonpath={.items[*].metadata.deletionTimestamp}",
        ])
        .await;
    assert_eq!(
        terminating.split_whitespace().count(),
        1,
        "one Pod evicted: {terminating}"
    );
}

/// With simulated nodes, a claim gets the default StorageClass and is bound to a volume made for
/// it; a Pod naming a claim that is not there is not scheduled, in the scheduler's words, and
/// runs once the claim is bound; a claim's spec is immutable but for growing.
#[tokio::test]
async fn kubectl_claims_are_provisioned_and_hold_back_the_pods_that_need_them() {
    let cluster = with_a_node().await;
    let dir = tempfile::tempdir().unwrap();
    let k = Kubectl::new(&cluster, dir.path());
    let pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: db\nspec:\n  containers:\n  - name: db\n    image: registry.example/db:1\n  volumes:\n  - name: data\n    persistentVolumeClaim:\n      claimName: data\n";
    k.run_with_input(&["apply", "-f", "-"], Some(pod)).await;
    let waiting = eventually_output(
        &k,
        &["get", "events", "--field-selector=reason=FailedScheduling"],
        |out| out.contains("persistentvolumeclaim \"data\" not found"),
    )
    .await;
    assert!(
        waiting.contains("0/1 nodes are available: persistentvolumeclaim \"data\" not found."),
        "{waiting}"
    );
    let claim = "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: data\nspec:\n  accessModes: [ReadWriteOnce]\n  resources:\n    requests:\n      storage: 1Gi\n";
    k.run_with_input(&["apply", "-f", "-"], Some(claim)).await;
    let table = eventually_output(&k, &["get", "pvc", "data"], |out| out.contains("Bound")).await;
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "STATUS",
            "VOLUME",
            "CAPACITY",
            "ACCESS",
            "MODES",
            "STORAGECLASS",
            "VOLUMEATTRIBUTESCLASS",
            "AGE"
        ],
        "{table}"
    );
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(&row[..2], ["data", "Bound"], "{table}");
    assert!(row[2].starts_with("pvc-"), "{table}");
    assert_eq!(&row[3..6], ["1Gi", "RWO", "standard"], "{table}");
    k.run(&["wait", "--for=condition=Ready", "pod/db", "--timeout=20s"])
        .await;

    // Grown in place; moved to another class: refused.
    k.run(&[
        "patch",
        "pvc",
        "data",
        "-p",
        r#"{"spec":{"resources":{"requests":{"storage":"2Gi"}}}}"#,
    ])
    .await;
    eventually_output(&k, &["get", "pvc", "data"], |out| out.contains("2Gi")).await;
    let refused = k
        .fail(
            &[
                "patch",
                "pvc",
                "data",
                "-p",
                r#"{"spec":{"storageClassName":"fast"}}"#,
            ],
            None,
        )
        .await;
    assert!(
        refused.contains("spec is immutable after creation except resources.requests"),
        "{refused}"
    );
    let refused = k
        .fail(
            &[
                "patch",
                "pvc",
                "data",
                "-p",
                r#"{"spec":{"resources":{"requests":{"storage":"1Gi"}}}}"#,
            ],
            None,
        )
        .await;
    assert!(
        refused.contains("field can not be less than previous value"),
        "{refused}"
    );

    // Its volume goes with it.
    let volume = k
        .run(&["get", "pvc", "data", "-o", "jsonpath={.spec.volumeName}"])
        .await;
    k.run(&["delete", "pod", "db", "--wait=false"]).await;
    k.run(&["delete", "pvc", "data"]).await;
    eventually_output(
        &k,
        &["get", "pv", "-o", "jsonpath={.items[*].metadata.name}"],
        |out| !out.contains(volume.trim()),
    )
    .await;

    // A namespace's quota counts claims and the storage they request.
    k.run(&[
        "create",
        "quota",
        "storage",
        "--hard=persistentvolumeclaims=1,requests.storage=1Gi",
    ])
    .await;
    let big = claim.replace("name: data", "name: big").replace("1Gi", "2Gi");
    let refused = k.fail(&["apply", "-f", "-"], Some(&big)).await;
    assert!(
        refused.contains("exceeded quota: storage, requested: requests.storage=2Gi, used: requests.storage=0, limited: requests.storage=1Gi"),
        "{refused}"
    );
    k.run_with_input(&["apply", "-f", "-"], Some(claim)).await;
    eventually_output(
        &k,
        &["get", "quota", "storage", "-o", "jsonpath={.status.used}"],
        |out| out.contains(r#""persistentvolumeclaims":"1""#) && out.contains(r#""requests.storage":"1Gi""#),
    )
    .await;
}

#[tokio::test]
async fn kubectl_a_wait_for_first_consumer_claim_is_provisioned_where_its_first_pod_is_placed() {
    let cluster = with_a_node().await;
    let dir = tempfile::tempdir().unwrap();
    let k = Kubectl::new(&cluster, dir.path());
    let class = "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata:\n  name: local\nprovisioner: devcluster.local/hostpath\nvolumeBindingMode: WaitForFirstConsumer\n";
    let claim = "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: data\nspec:\n  storageClassName: local\n  accessModes: [ReadWriteOnce]\n  resources:\n    requests:\n      storage: 1Gi\n";
    k.run_with_input(&["apply", "-f", "-"], Some(class)).await;
    k.run_with_input(&["apply", "-f", "-"], Some(claim)).await;
    // No Pod mounts it yet: it waits, and says so, as upstream's volume controller does.
    let waiting = eventually_output(
        &k,
        &[
            "get",
            "events",
            "--field-selector=involvedObject.kind=PersistentVolumeClaim",
        ],
        |out| out.contains("WaitForFirstConsumer"),
    )
    .await;
    assert!(
        waiting.contains("waiting for first consumer to be created before binding"),
        "{waiting}"
    );
    let phase = k
        .run(&["get", "pvc", "data", "-o", "jsonpath={.status.phase}"])
        .await;
    assert_eq!(phase.trim(), "Pending");
    // The first Pod that mounts it is placed (the unbound claim does not hold it back), its node
    // selected for the claim, the claim provisioned there, and the Pod started once it is bound.
    let pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: db\nspec:\n  containers:\n  - name: db\n    image: registry.example/db:1\n  volumes:\n  - name: data\n    persistentVolumeClaim:\n      claimName: data\n";
    k.run_with_input(&["apply", "-f", "-"], Some(pod)).await;
    k.run(&["wait", "--for=condition=Ready", "pod/db", "--timeout=20s"])
        .await;
    let claim = k
        .run(&[
            "get",
            "pvc",
            "data",
            "-o",
            r#"jsonpath={.status.phase} {.metadata.annotations.volume\.kubernetes\.io/selected-node}"#,
        ])
        .await;
    assert_eq!(claim.trim(), "Bound devcluster-node-0");
}

#[tokio::test]
async fn kubectl_a_claim_a_pod_mounts_is_terminating_until_no_pod_mounts_it() {
    let cluster = with_a_node().await;
    let dir = tempfile::tempdir().unwrap();
    let k = Kubectl::new(&cluster, dir.path());
    let claim = |name: &str| {
        format!(
            "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: {name}\nspec:\n  accessModes: [ReadWriteOnce]\n  resources:\n    requests:\n      storage: 1Gi\n"
        )
    };
    let pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: db\nspec:\n  containers:\n  - name: db\n    image: registry.example/db:1\n  volumes:\n  - name: data\n    persistentVolumeClaim:\n      claimName: data\n";
    k.run_with_input(&["apply", "-f", "-"], Some(&claim("data")))
        .await;
    k.run_with_input(&["apply", "-f", "-"], Some(&claim("spare")))
        .await;
    k.run_with_input(&["apply", "-f", "-"], Some(pod)).await;
    k.run(&["wait", "--for=condition=Ready", "pod/db", "--timeout=20s"])
        .await;
    let finalizers = k
        .run(&["get", "pvc", "data", "-o", "jsonpath={.metadata.finalizers}"])
        .await;
    assert_eq!(finalizers.trim(), r#"["kubernetes.io/pvc-protection"]"#);

    // Deleted while the Pod mounts it: Terminating. A claim no Pod mounts goes at once; the
    // controller takes changes in order, so once that one is gone it has seen the first.
    k.run(&["delete", "pvc", "data", "--wait=false"]).await;
    k.run(&["delete", "pvc", "spare"]).await;
    let table = k.run(&["get", "pvc", "data", "--no-headers"]).await;
    assert_eq!(table.split_whitespace().nth(1), Some("Terminating"), "{table}");
    // The Pod gone, so is the claim (and its volume).
    k.run(&["delete", "pod", "db", "--wait=false", "--grace-period=1"])
        .await;
    eventually_output(
        &k,
        &["get", "pvc", "-o", "jsonpath={.items[*].metadata.name}"],
        |out| out.trim().is_empty(),
    )
    .await;
}

#[tokio::test]
async fn kubectl_an_ephemeral_volume_gets_a_claim_of_its_pod_that_goes_with_the_pod() {
    let cluster = with_a_node().await;
    let dir = tempfile::tempdir().unwrap();
    let k = Kubectl::new(&cluster, dir.path());
    let pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: job\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: job\n    image: registry.example/job:1\n  volumes:\n  - name: scratch\n    ephemeral:\n      volumeClaimTemplate:\n        metadata:\n          labels: {type: scratch}\n        spec:\n          accessModes: [ReadWriteOnce]\n          resources:\n            requests:\n              storage: 1Gi\n";
    k.run_with_input(&["apply", "-f", "-"], Some(pod)).await;
    let claim = eventually_output(
        &k,
        &[
            "get",
            "pvc",
            "-o",
            "jsonpath={.items[*].metadata.name} {.items[*].metadata.ownerReferences[0].name} {.items[*].metadata.labels.type} {.items[*].status.phase}",
        ],
        |out| out.contains("Bound"),
    )
    .await;
    assert_eq!(claim.trim(), "job-scratch job scratch Bound");
    k.run(&["wait", "--for=condition=Ready", "pod/job", "--timeout=20s"])
        .await;
    k.run(&["delete", "pod", "job"]).await;
    eventually_output(
        &k,
        &["get", "pvc", "-o", "jsonpath={.items[*].metadata.name}"],
        |out| out.trim().is_empty(),
    )
    .await;
}

/// A devcluster with one simulated node (its scheduler and kubelet run Pods).
async fn with_a_node() -> DevCluster {
    DevCluster::start(ServerOptions {
        nodes: devcluster::nodes::NodeOptions {
            count: 1,
            handlers: None,
        },
        ..ServerOptions::default()
    })
    .await
    .unwrap()
}
