//! `host-agent check-config` as a new user meets it: every bad config gets a clear error naming the
//! file and the path inside it, a non-zero exit, and never a panic.

use std::path::Path;
use std::process::Command;

fn check(dir: &Path, name: &str, text: Option<&str>) -> (bool, String) {
    let path = dir.join(name);
    if let Some(text) = text {
        std::fs::write(&path, text).unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_host-agent"))
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "{name}: {stderr}");
    (
        out.status.success(),
        format!("{}{stderr}", String::from_utf8_lossy(&out.stdout)),
    )
}

fn tenant_with(block: &str) -> String {
    format!(
        "tenants:\n  - name: team-a\n    hostNamespace: vcluster-team-a\n    sync:\n      fromHost:\n        runtimeClasses:\n          enabled: true\n{}",
        block
            .lines()
            .map(|l| format!("          {l}\n"))
            .collect::<String>()
    )
}

#[test]
fn bad_configs_give_clear_errors_with_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let rc = "tenants[0].sync.fromHost.runtimeClasses";
    let cases: Vec<(&str, Option<String>, String)> = vec![
        (
            "wrong-operator.yaml",
            Some(tenant_with(
                "selector:\n  matchExpressions:\n    - {key: env, operator: Equals, values: [a]}",
            )),
            format!("{rc}.selector.matchExpressions[0].operator: unknown operator \"Equals\""),
        ),
        (
            "in-without-values.yaml",
            Some(tenant_with(
                "selector:\n  matchExpressions:\n    - {key: env, operator: In}",
            )),
            format!("{rc}.selector.matchExpressions[0].values: must be specified"),
        ),
        (
            "exists-with-values.yaml",
            Some(tenant_with(
                "selector:\n  matchExpressions:\n    - {key: env, operator: Exists, values: [a]}",
            )),
            format!("{rc}.selector.matchExpressions[0].values: may not be specified"),
        ),
        (
            "bad-label-key.yaml",
            Some(tenant_with("selector:\n  matchLabels:\n    \"bad key\": x")),
            format!("{rc}.selector.matchLabels.bad key: invalid label key"),
        ),
        (
            "unknown-field.yaml",
            Some(tenant_with("selectr: {}")),
            format!("{rc}.selectr: unknown field \"selectr\""),
        ),
        (
            "wrong-type.yaml",
            Some(tenant_with("patches: {}")),
            format!("{rc}.patches: expected a list"),
        ),
        (
            "unknown-pod-security-level.yaml",
            Some(
                "tenants:\n  - name: team-a\n    hostNamespace: vc-a\n    policies: {podSecurityStandard: strict}\n"
                    .into(),
            ),
            "tenants[0].policies.podSecurityStandard: unknown level \"strict\", expected one of \"privileged\", \"baseline\", \"restricted\"".to_string(),
        ),
        (
            "bad-enforced-toleration.yaml",
            Some(
                "tenants:\n  - name: team-a\n    hostNamespace: vc-a\n    sync: {toHost: {pods: {enforceTolerations: [\"k=v:Always\"]}}}\n"
                    .into(),
            ),
            "tenants[0].sync.toHost.pods.enforceTolerations[0]: invalid effect \"Always\"".to_string(),
        ),
        (
            "missing.yaml",
            None,
            "missing.yaml: file: cannot read".to_string(),
        ),
        (
            "empty.yaml",
            Some(String::new()),
            "empty.yaml: (top level): the file is empty".to_string(),
        ),
        (
            "syntax.yaml",
            Some("tenants: [\n".into()),
            "syntax.yaml: line ".to_string(),
        ),
    ];
    for (name, text, want) in cases {
        let (ok, output) = check(dir.path(), name, text.as_deref());
        assert!(!ok, "{name} should fail");
        assert!(output.contains(&want), "{name}: wanted {want:?} in:\n{output}");
    }
}

#[test]
fn the_example_tenants_file_is_valid() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/tenants.example.yaml");
    let out = Command::new(env!("CARGO_BIN_EXE_host-agent"))
        .arg("check-config")
        .arg(&example)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("team-a → namespace vcluster-team-a, enabled, selector"),
        "{stdout}"
    );
}

#[test]
fn the_limits_and_inline_volumes_a_tenant_sets_are_printed() {
    let dir = tempfile::tempdir().unwrap();
    let text = "tenants:\n  - {name: a, hostNamespace: ns-a, limits: {podSyncQps: 50, podSyncBytes: 64Mi}, policies: {inlineVolumes: [nfs, iscsi], inlineCsiDrivers: [secrets-store.csi.k8s.io]}}\n  - {name: b, hostNamespace: ns-b}\n";
    let (ok, output) = check(dir.path(), "t.yaml", Some(text));
    assert!(ok, "{output}");
    assert!(
        output.contains("pod security baseline, inline volumes iscsi nfs, inline CSI drivers secrets-store.csi.k8s.io, no token"),
        "{output}"
    );
    assert!(
        output.contains(
            "no token (mTLS or --allow-unauthenticated), limits podSyncQps 50, podSyncBytes 64Mi\n"
        ),
        "{output}"
    );
    assert!(
        output.contains("  - b → namespace ns-b, runtime class sync disabled, pod security baseline, no token (mTLS or --allow-unauthenticated)\n"),
        "{output}"
    );
}

#[test]
fn unreadable_token_files_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let text = "tenants:\n  - {name: a, hostNamespace: ns-a, tokenFile: a.token}\n  - {name: b, hostNamespace: ns-b, tokenFile: b.token}\n";
    std::fs::write(dir.path().join("a.token"), "same\n").unwrap();
    std::fs::write(dir.path().join("b.token"), "  same ").unwrap();
    let (ok, output) = check(dir.path(), "t.yaml", Some(text));
    assert!(!ok);
    assert!(
        output.contains("tenants[1].tokenFile: line 1 of ")
            && output.contains("b.token: tenants[0] has the same token"),
        "{output}"
    );
    // Two lines are two tokens of the tenant (a rotation), each accepted.
    std::fs::write(dir.path().join("b.token"), "b-old\nb-new\n").unwrap();
    let (ok, output) = check(dir.path(), "t.yaml", None);
    assert!(ok, "{output}");
    assert!(
        output.contains("2 tokens (a rotation: each is accepted)"),
        "{output}"
    );
    std::fs::remove_file(dir.path().join("b.token")).unwrap();
    let (ok, output) = check(dir.path(), "t.yaml", None);
    assert!(!ok);
    assert!(output.contains("tenants[1].tokenFile: cannot read"), "{output}");
}
