//! `virtual-agent` as a user starts it: help, and clear errors for bad flags (never a panic).

use std::process::Command;

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_virtual-agent"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("panicked"), "{text}");
    (out.status.success(), text)
}

#[test]
fn help_documents_every_flag_with_its_env_var() {
    let (ok, text) = run(&["--help"]);
    assert!(ok, "{text}");
    for flag in [
        "--host-agent",
        "--tenant",
        "--token-file",
        "--ca-cert",
        "--client-cert",
        "--client-key",
        "--admin-listen",
        "--log-format",
    ] {
        assert!(text.contains(flag), "{flag} missing from --help:\n{text}");
    }
    assert!(text.contains("VIRTUAL_AGENT_HOST_AGENT"), "{text}");
}

#[test]
fn bad_flags_are_reported_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("missing.kubeconfig").display().to_string();
    let base = [
        "--kubeconfig",
        kubeconfig.as_str(),
        "--tenant",
        "team-a",
        "--admin-listen",
        "127.0.0.1:0",
    ];
    let cases: &[(&[&str], &str)] = &[
        (
            &["--host-agent", "grpc://x:1"],
            "must be an http:// or https:// URL",
        ),
        (
            &[
                "--host-agent",
                "http://127.0.0.1:1",
                "--token-file",
                "/nonexistent/token",
            ],
            "reading the token file /nonexistent/token",
        ),
        (
            &["--host-agent", "https://127.0.0.1:1", "--client-cert", "c.pem"],
            "--client-cert and --client-key must be given together",
        ),
        (&["--host-agent", "http://127.0.0.1:1"], "reading kubeconfig"),
        (
            &["--host-agent", "http://127.0.0.1:1", "--pod-workers", "0"],
            "--pod-workers",
        ),
    ];
    for (extra, want) in cases {
        let args: Vec<&str> = base.iter().chain(extra.iter()).copied().collect();
        let (ok, text) = run(&args);
        assert!(!ok, "{args:?} should fail");
        assert!(text.contains(want), "{args:?}: wanted {want:?} in:\n{text}");
    }
}
