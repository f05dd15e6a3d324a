//! `host-agent status`: what a running host agent offers each tenant, as `kubectl get` prints
//! tables, read from its admin port (`/readyz`, `/tenants`). It exits non-zero when the agent is
//! unreachable (2) or not ready (1), so it works as a script check.
//!
//! ```text
//!  host-agent status [--admin URL] [--admin-token-file F] [--admin-ca F] [--tenant T] [-o table|json|yaml]
//!     GET URL/readyz ──► ready?      GET URL/tenants ──► table per tenant | classes of one tenant
//! ```

pub use rcsync_core::status_client::Output;
use rcsync_core::status_client::{AdminTarget, Report, age, fetch, finish, render, table, text};

use serde_json::Value;

/// Reads the agent at `admin` and reports its tenants (or one tenant's classes).
pub fn status(admin: &AdminTarget<'_>, tenant: Option<&str>, output: Output) -> Report {
    let (ready, readiness, doc) = match fetch(admin, "/tenants", "host agent") {
        Ok(fetched) => fetched,
        Err(report) => return report,
    };
    let tenants = doc["tenants"].as_array().cloned().unwrap_or_default();
    let stdout = match tenant {
        None => match output {
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
        },
        Some(name) => {
            let Some(t) = tenants.iter().find(|t| t["name"] == name) else {
                return Report {
                    stdout: String::new(),
                    stderr: format!("error: the host agent has no tenant {name:?}\n"),
                    code: 1,
                };
            };
            match output {
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
            }
        }
    };
    finish(stdout, ready, &readiness, "host agent")
}
