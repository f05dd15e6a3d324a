//! The monitoring in `deploy/monitoring/` cannot rot: every PromQL expression of the alert rules
//! and the dashboard parses, every metric it reads is exported by the running agents (scraped
//! from `/metrics` of real processes after some traffic), every label it matches or groups by is
//! on that metric (or is one Prometheus adds at scrape time), and every alert's runbook link
//! points at a section of the README.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use promql_parser::label::Matchers;
use promql_parser::parser::{self, Expr, LabelModifier};
use rcsync_proto::v1::CheckPodRequest;
use rcsync_proto::v1::runtime_class_sync_client::RuntimeClassSyncClient;
use rcsync_tests::eventually;
use rcsync_tests::system::{System, TenantSpec, pod, runtime_class};
use serde_json::Value;

/// Labels Prometheus attaches to every scraped series (target labels), never exported by agents.
const TARGET_LABELS: &[&str] = &[
    "job",
    "namespace",
    "pod",
    "instance",
    "service",
    "container",
    "endpoint",
    "le",
];

fn deploy(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/monitoring")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Metric name → the label names seen on its samples, from Prometheus/OpenMetrics text.
fn exported(text: &str, into: &mut BTreeMap<String, BTreeSet<String>>) {
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let names: Vec<String> = match kind {
                "counter" => vec![format!("{name}_total"), format!("{name}_created")],
                "histogram" => ["_bucket", "_sum", "_count"]
                    .iter()
                    .map(|s| format!("{name}{s}"))
                    .collect(),
                _ => vec![name.to_string()],
            };
            for n in names {
                into.entry(n).or_default();
            }
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        let labels = into.entry(name.to_string()).or_default();
        if let Some(body) = line[name_end..].strip_prefix('{') {
            let body = &body[..body.find('}').unwrap_or(body.len())];
            for pair in body.split(',') {
                if let Some((label, _)) = pair.split_once('=') {
                    labels.insert(label.trim().to_string());
                }
            }
        }
    }
}

/// Every selector's metric and matched labels, and every grouping label, of an expression.
#[derive(Default, Debug)]
struct Uses {
    selectors: Vec<(String, BTreeSet<String>)>,
    grouping: BTreeSet<String>,
}

fn matcher_labels(matchers: &Matchers) -> BTreeSet<String> {
    matchers
        .matchers
        .iter()
        .chain(matchers.or_matchers.iter().flatten())
        .map(|m| m.name.clone())
        .filter(|n| n != "__name__")
        .collect()
}

fn walk(expr: &Expr, uses: &mut Uses) {
    let modifier_labels = |m: &Option<LabelModifier>, uses: &mut Uses| {
        if let Some(m) = m {
            uses.grouping.extend(m.labels().labels.iter().cloned());
        }
    };
    match expr {
        Expr::Aggregate(a) => {
            modifier_labels(&a.modifier, uses);
            walk(&a.expr, uses);
            if let Some(p) = &a.param {
                walk(p, uses);
            }
        }
        Expr::Unary(u) => walk(&u.expr, uses),
        Expr::Binary(b) => {
            if let Some(m) = &b.modifier {
                modifier_labels(&m.matching, uses);
            }
            walk(&b.lhs, uses);
            walk(&b.rhs, uses);
        }
        Expr::Paren(p) => walk(&p.expr, uses),
        Expr::Subquery(s) => walk(&s.expr, uses),
        Expr::VectorSelector(v) => uses.selectors.push((
            v.name.clone().expect("selectors name their metric"),
            matcher_labels(&v.matchers),
        )),
        Expr::MatrixSelector(m) => uses.selectors.push((
            m.vs.name.clone().expect("selectors name their metric"),
            matcher_labels(&m.vs.matchers),
        )),
        Expr::Call(c) => c.args.args.iter().for_each(|a| walk(a, uses)),
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

/// Problems of one expression against what the agents export.
fn check(what: &str, expr: &str, metrics: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let parsed = match parser::parse(expr) {
        Ok(parsed) => parsed,
        Err(e) => return vec![format!("{what}: does not parse: {e}\n  {expr}")],
    };
    let mut uses = Uses::default();
    walk(&parsed, &mut uses);
    let mut problems = Vec::new();
    let mut available: BTreeSet<String> = TARGET_LABELS.iter().map(|s| s.to_string()).collect();
    for (metric, labels) in &uses.selectors {
        let Some(exported) = metrics.get(metric) else {
            problems.push(format!("{what}: metric {metric} is not exported by any agent"));
            continue;
        };
        available.extend(exported.iter().cloned());
        for label in labels {
            if !TARGET_LABELS.contains(&label.as_str()) && !exported.contains(label) {
                problems.push(format!(
                    "{what}: {metric} has no label {label:?} (it has {exported:?})"
                ));
            }
        }
    }
    for label in &uses.grouping {
        if !available.contains(label) {
            problems.push(format!(
                "{what}: groups by {label:?}, which none of its metrics has"
            ));
        }
    }
    problems
}

/// The anchors GitHub gives the README's headings.
fn readme_anchors() -> BTreeSet<String> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    readme
        .lines()
        .filter_map(|l| l.strip_prefix('#').map(|h| h.trim_start_matches('#').trim()))
        .map(|heading| {
            heading
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn every_alert_and_panel_reads_metrics_the_agents_export() {
    // Traffic, so that labelled families have samples: a tenant with a selector, classes, an
    // allowed and a denied Pod, a CheckPod, a reload.
    let system = System::start(
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
    let v = system.virtual_side();
    v.wait_classes(&["gvisor"]).await;
    v.create_pod(&pod("allowed", Some("gvisor"))).await;
    let token = std::fs::read_to_string(system.dir.path().join("team-a.token")).unwrap();
    let mut client = RuntimeClassSyncClient::connect(format!("http://{}", system.grpc))
        .await
        .unwrap();
    let mut request = tonic::Request::new(CheckPodRequest {
        pod_namespace: "default".into(),
        pod_name: "p".into(),
        runtime_class_name: "kata".into(),
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", token.trim()).parse().unwrap(),
    );
    client.check_pod(request).await.unwrap();
    system.host_agent.signal("HUP");
    let metrics = eventually("both agents to export their Pod and reload metrics", || async {
        let host = rcsync_tests::http_get(&system.host_admin, "/metrics").await?.1;
        let virt = v.metrics().await;
        let ready = host.contains("rcsync_pods_applied_total{")
            && host.contains("rcsync_config_reloads_total{")
            && virt.contains("rcsync_pods_synced_total 1");
        ready.then_some((host, virt))
    })
    .await;
    let mut exported_metrics = BTreeMap::new();
    exported(&metrics.0, &mut exported_metrics);
    exported(&metrics.1, &mut exported_metrics);

    let mut problems = Vec::new();
    let mut alerts = 0;
    // Alert rules (prometheus-operator's PrometheusRule).
    let rules: Value = yaml_serde::from_str(&deploy("prometheus-rules.yaml")).unwrap();
    assert_eq!(rules["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(rules["kind"], "PrometheusRule");
    let anchors = readme_anchors();
    for group in rules["spec"]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let name = rule["alert"].as_str().unwrap();
            alerts += 1;
            problems.extend(check(name, rule["expr"].as_str().unwrap(), &exported_metrics));
            let url = rule["annotations"]["runbook_url"].as_str().unwrap_or_default();
            match url.split_once('#') {
                Some((_, anchor)) if anchors.contains(anchor) => {}
                _ => problems.push(format!("{name}: runbook_url {url:?} names no README section")),
            }
        }
    }
    // The dashboard: every panel query, and the tenant variable's label_values().
    let config_map: Value = yaml_serde::from_str(&deploy("grafana-dashboard.yaml")).unwrap();
    assert_eq!(
        (config_map["apiVersion"].as_str(), config_map["kind"].as_str()),
        (Some("v1"), Some("ConfigMap"))
    );
    let dashboard: Value = serde_json::from_str(config_map["data"]["rcsync.json"].as_str().unwrap()).unwrap();
    let mut panels = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            panels += 1;
            let expr = target["expr"].as_str().unwrap().replace("$tenant", ".*");
            let title = format!("panel {:?}", panel["title"].as_str().unwrap());
            problems.extend(check(&title, &expr, &exported_metrics));
        }
    }
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        let Some(query) = var["query"]
            .as_str()
            .and_then(|q| q.strip_prefix("label_values("))
        else {
            continue;
        };
        let (metric, label) = query.trim_end_matches(')').split_once(',').unwrap();
        match exported_metrics.get(metric.trim()) {
            Some(labels) if labels.contains(label.trim()) => {}
            _ => problems.push(format!("variable {}: {metric} has no label {label}", var["name"])),
        }
    }
    assert!(alerts >= 8 && panels >= 10, "{alerts} alerts, {panels} queries");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_checks_catch_a_metric_or_label_that_does_not_exist() {
    let mut metrics = BTreeMap::new();
    exported(
        "# TYPE rcsync_sync_acks counter\nrcsync_sync_acks_total{tenant=\"a\"} 1\n",
        &mut metrics,
    );
    assert!(
        check(
            "ok",
            "sum by (tenant) (rate(rcsync_sync_acks_total[5m]))",
            &metrics
        )
        .is_empty()
    );
    let wrong = check("typo", "rate(rcsync_sync_ack_total[5m])", &metrics);
    assert!(wrong[0].contains("is not exported"), "{wrong:?}");
    let wrong = check("label", "rcsync_sync_acks_total{reason=\"x\"}", &metrics);
    assert!(wrong[0].contains("has no label \"reason\""), "{wrong:?}");
    let wrong = check("grouping", "sum by (method) (rcsync_sync_acks_total)", &metrics);
    assert!(wrong[0].contains("groups by \"method\""), "{wrong:?}");
    assert!(check("syntax", "sum by (", &metrics)[0].contains("does not parse"));
}

/// Runs kubectl against `kubeconfig` with its own discovery cache; returns (success, output).
fn kubectl(kubeconfig: &Path, cache: &Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(cache)
        .args(args)
        .output()
        .expect("kubectl runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `kubectl apply --dry-run` accepts every file of deploy/monitoring/ once prometheus-operator's
/// kinds are served (the CRDs are applied first, as on a cluster that runs the operator), and the
/// server refuses a misspelt field, so the check has teeth.
// kubectl runs synchronously here while the in-process API server answers on the other worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_dry_run_accepts_the_monitoring_manifests() {
    let cluster = devcluster::server::DevCluster::start(devcluster::server::ServerOptions::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    cluster.write_kubeconfig(&kubeconfig, "monitoring").unwrap();
    let cache = dir.path().join("cache");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let crds = root.join("tests/fixtures/prometheus-operator-crds.yaml");
    let monitoring = root.join("deploy/monitoring");
    let run = |args: &[&str]| kubectl(&kubeconfig, &cache, args);

    let (ok, out) = run(&["apply", "-f", crds.to_str().unwrap()]);
    assert!(ok, "{out}");
    let (ok, out) = run(&[
        "wait",
        "--for",
        "condition=established",
        "crd/prometheusrules.monitoring.coreos.com",
        "crd/servicemonitors.monitoring.coreos.com",
    ]);
    assert!(ok, "{out}");

    let (ok, out) = run(&["apply", "--dry-run=client", "-f", monitoring.to_str().unwrap()]);
    assert!(ok, "{out}");
    for object in [
        "prometheusrule.monitoring.coreos.com/rcsync created (dry run)",
        "servicemonitor.monitoring.coreos.com/rcsync-host-agent created (dry run)",
        "servicemonitor.monitoring.coreos.com/rcsync-virtual-agent created (dry run)",
        "service/host-agent-metrics created (dry run)",
        "configmap/",
    ] {
        assert!(out.contains(object), "{object} missing in:\n{out}");
    }
    let (ok, out) = run(&["create", "namespace", "rcsync-system"]);
    assert!(ok, "{out}");
    let (ok, out) = run(&["apply", "--dry-run=server", "-f", monitoring.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(
        out.contains("prometheusrule.monitoring.coreos.com/rcsync created (server dry run)"),
        "{out}"
    );
    let (ok, out) = run(&["get", "prometheusrules", "-A", "-o", "name"]);
    assert!(ok && out.trim().is_empty(), "a dry run stored something: {out}");

    // A misspelt field is refused by the server's schema check.
    let typo = dir.path().join("typo.yaml");
    std::fs::write(
        &typo,
        "apiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\nmetadata: {name: typo, namespace: rcsync-system}\nspec:\n  groups:\n    - name: g\n      rulez: []\n",
    )
    .unwrap();
    let (ok, out) = run(&["apply", "--dry-run=server", "-f", typo.to_str().unwrap()]);
    assert!(
        !ok && out.contains("unknown field \"spec.groups[0].rulez\""),
        "{out}"
    );
}
