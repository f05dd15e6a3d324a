//! `host-agent check-config FILE`: validates a tenants file (or a vcluster.yaml) the way the agent
//! would load it, and prints what it understood.

use std::fmt::Write as _;
use std::path::Path;

use rcsync_core::config::{ConfigError, Problem};
use rcsync_core::{RuntimeClassSync, TenantLimits, TenantsFile};

/// Checks a config file. A file with a top-level `tenants` key is a tenants file; anything else is
/// read as a vcluster.yaml. Returns a summary on success, every problem on failure.
pub fn check_config(path: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        problems: vec![Problem {
            at: "file".into(),
            message: format!("cannot read: {e}"),
        }],
    })?;
    // An empty file is never what anyone meant: report it as a tenants file would.
    let is_empty = text
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'));
    let looks_like_tenants = is_empty || text.lines().any(|l| l.starts_with("tenants:"));
    let mut out = String::new();
    if looks_like_tenants {
        TenantsFile::parse(path, &text)?;
        let state = crate::run::load_tenants(path)?;
        let (file, tokens) = (state.file, state.tokens);
        let _ = writeln!(out, "{}: ok, {} tenant(s)", path.display(), file.tenants().len());
        for t in file.tenants() {
            let auth = match tokens.count_of(&t.name) {
                0 => "no token (mTLS or --allow-unauthenticated)".to_string(),
                1 => "token".to_string(),
                n => format!("{n} tokens (a rotation: each is accepted)"),
            };
            let copies = if t.pods.copy_annotations.is_empty() {
                String::new()
            } else {
                let patterns: Vec<String> = t.pods.copy_annotations.iter().map(ToString::to_string).collect();
                format!(", copies annotations {}", patterns.join(" "))
            };
            let inline = if t.pods.inline_volumes.is_empty() {
                String::new()
            } else {
                let types: Vec<&str> = t.pods.inline_volumes.iter().map(|t| t.as_str()).collect();
                format!(", inline volumes {}", types.join(" "))
            };
            let inline = if t.pods.inline_csi_drivers.is_empty() {
                inline
            } else {
                let drivers: Vec<&str> = t.pods.inline_csi_drivers.iter().map(|d| d.as_str()).collect();
                format!("{inline}, inline CSI drivers {}", drivers.join(" "))
            };
            let _ = writeln!(
                out,
                "  - {} → namespace {}, {}, pod security {}{inline}{copies}, {}{}",
                t.name,
                t.host_namespace,
                describe(&t.runtime_classes),
                t.pods.pod_security,
                auth,
                describe_limits(&t.limits)
            );
        }
    } else {
        let rc = RuntimeClassSync::parse_vcluster_yaml(path, &text)?;
        let _ = writeln!(out, "{}: ok (vcluster.yaml), {}", path.display(), describe(&rc));
    }
    Ok(out)
}

/// The limits that differ from the defaults (`, limits podSyncQps 50, podSyncBytes 64Mi`), or
/// nothing.
fn describe_limits(limits: &TenantLimits) -> String {
    let defaults = TenantLimits::default();
    let mut set: Vec<String> = [
        ("syncStreams", limits.sync_streams, defaults.sync_streams),
        (
            "podStatusStreams",
            limits.pod_status_streams,
            defaults.pod_status_streams,
        ),
        ("podSyncQps", limits.pod_sync_qps, defaults.pod_sync_qps),
        ("podSyncBurst", limits.pod_sync_burst, defaults.pod_sync_burst),
        (
            "podSyncInFlight",
            limits.pod_sync_in_flight,
            defaults.pod_sync_in_flight,
        ),
    ]
    .into_iter()
    .filter(|(_, value, default)| value != default)
    .map(|(key, value, _)| format!("{key} {value}"))
    .collect();
    if let Some(bytes) = limits.pod_sync_bytes {
        let size = match bytes {
            b if b % (1 << 30) == 0 => format!("{}Gi", b >> 30),
            b if b % (1 << 20) == 0 => format!("{}Mi", b >> 20),
            b if b % (1 << 10) == 0 => format!("{}Ki", b >> 10),
            b => b.to_string(),
        };
        set.push(format!("podSyncBytes {size}"));
    }
    if set.is_empty() {
        String::new()
    } else {
        format!(", limits {}", set.join(", "))
    }
}

fn describe(rc: &RuntimeClassSync) -> String {
    if !rc.enabled {
        return "runtime class sync disabled".into();
    }
    let selector = match &rc.selector {
        Some(s) => format!("selector {s:?}", s = s.to_string()),
        None => "no selector (all classes, Pods not gated)".into(),
    };
    match rc.patches.len() {
        0 => format!("enabled, {selector}"),
        n => format!("enabled, {selector}, {n} patch(es)"),
    }
}
