//! `host-agent status`: what a running host agent offers each tenant, as `kubectl get` prints
//! tables, read from its admin port (`/readyz`, `/tenants`). It exits non-zero when the agent is
//! unreachable (2) or not ready (1), so it works as a script check.
//!
//! ```text
//!  host-agent status [--admin URL] [--tenant T] [-o table|json|yaml]
//!     GET URL/readyz ──► ready?      GET URL/tenants ──► table per tenant | classes of one tenant
//! ```

pub use rcsync_core::status_client::Output;
use rcsync_core::status_client::{Report, age, get, render, table, text};
use serde_json::Value;

/// Reads the agent at `admin` and reports its tenants (or one tenant's classes).
pub fn status(admin: &str, tenant: Option<&str>, output: Output) -> Report {
    let unreachable = |e: String| Report {
        stdout: String::new(),
        stderr: format!("error: the host agent's admin port is unreachable: {e}\n"),
        code: 2,
    };
    let ready = match get(admin, "/readyz") {
        Ok((code, body)) => (code == 200, body),
        Err(e) => return unreachable(e),
    };
    let doc: Value = match get(admin, "/tenants") {
        Ok((200, body)) => match serde_json::from_str(&body) {
            Ok(doc) => doc,
            Err(e) => return unreachable(format!("{admin}/tenants is not JSON: {e}")),
        },
        Ok((code, _)) => return unreachable(format!("{admin}/tenants answered {code}")),
        Err(e) => return unreachable(e),
    };
    let tenants = doc["tenants"].as_array().cloned().unwrap_or_default();
    let mut report = Report {
        stdout: String::new(),
        stderr: String::new(),
        code: 0,
    };
    match tenant {
        None => {
            report.stdout = match output {
                Output::Table => {
                    let mut rows = vec![
                        [
                            "TENANT",
                            "SYNC",
                            "SELECTOR",
                            "OFFERED",
                            "FILTERED",
                            "STREAMS",
                            "LAST-ACK",
                            "LAST-NACK",
                        ]
                        .map(String::from)
                        .to_vec(),
                    ];
                    for t in &tenants {
                        let count = |key: &str| t[key].as_object().map_or(0, |m| m.len()).to_string();
                        rows.push(vec![
                            text(&t["name"]),
                            if t["syncEnabled"] == Value::Bool(true) {
                                "enabled"
                            } else {
                                "disabled"
                            }
                            .into(),
                            text(&t["selector"]),
                            count("offered"),
                            count("notOffered"),
                            text(&t["streams"]),
                            age(&t["lastAckSecondsAgo"]),
                            text(&t["lastError"]),
                        ]);
                    }
                    table(&rows)
                }
                other => render(&doc, other),
            };
        }
        Some(name) => {
            let Some(t) = tenants.iter().find(|t| t["name"] == name) else {
                report.stderr = format!("error: the host agent has no tenant {name:?}\n");
                report.code = 1;
                return report;
            };
            report.stdout = match output {
                Output::Table => {
                    let mut classes: Vec<(String, String, String)> = Vec::new();
                    for (host, virtual_name) in t["offered"].as_object().into_iter().flatten() {
                        classes.push((
                            host.clone(),
                            "offered".into(),
                            format!("as {}", text(virtual_name)),
                        ));
                    }
                    for (host, why) in t["notOffered"].as_object().into_iter().flatten() {
                        classes.push((host.clone(), "not offered".into(), text(why)));
                    }
                    classes.sort();
                    let mut rows = vec![["CLASS", "STATE", "WHY"].map(String::from).to_vec()];
                    rows.extend(classes.into_iter().map(|(a, b, c)| vec![a, b, c]));
                    table(&rows)
                }
                other => render(t, other),
            };
        }
    }
    if !ready.0 {
        report.stderr = format!("the host agent is not ready:\n{}", ready.1);
        report.code = 1;
    }
    report
}
