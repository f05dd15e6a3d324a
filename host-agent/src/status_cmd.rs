//! `host-agent status`: what a running host agent offers each tenant, as `kubectl get` prints
//! tables, read from its admin port (`/readyz`, `/tenants`). It exits non-zero when the agent is
//! unreachable (2) or not ready (1), so it works as a script check.
//!
//! ```text
//!  host-agent status [--admin URL] [--tenant T] [-o table|json|yaml]
//!     GET URL/readyz ──► ready?      GET URL/tenants ──► table per tenant | classes of one tenant
//! ```

use std::io::{Read as _, Write as _};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use serde_json::Value;

/// How `status` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Columns, as `kubectl get` prints them.
    Table,
    /// The admin port's JSON.
    Json,
    /// The same as YAML.
    Yaml,
}

/// What `status` prints and how it exits.
#[derive(Debug)]
pub struct Report {
    /// Standard output.
    pub stdout: String,
    /// Standard error (why it is not ready or unreachable).
    pub stderr: String,
    /// 0 ready, 1 not ready (or no such tenant), 2 unreachable.
    pub code: u8,
}

/// `GET url` over plain HTTP/1.0 (the admin port); the status code and body.
fn get(base: &str, path: &str) -> Result<(u16, String), String> {
    let authority = base
        .strip_prefix("http://")
        .ok_or_else(|| format!("--admin {base:?} must be an http:// URL (the admin port serves plain HTTP)"))?
        .trim_end_matches('/');
    let addr = authority
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority} resolves to no address"))?;
    let timeout = Duration::from_secs(3);
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{base}: {e}"))?;
    stream.set_read_timeout(Some(timeout)).ok();
    stream.set_write_timeout(Some(timeout)).ok();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n").map_err(|e| format!("{base}: {e}"))?;
    let mut raw = String::new();
    stream
        .read_to_string(&mut raw)
        .map_err(|e| format!("{base}: {e}"))?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{base}{path}: not an HTTP response"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{base}{path}: not an HTTP response"))?;
    Ok((code, body.to_string()))
}

/// Columns padded as kubectl pads them (three spaces between columns).
fn table(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("   ").trim_end());
        out.push('\n');
    }
    out
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "<none>".into(),
        Value::String(s) if s.is_empty() => "<none>".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn age(v: &Value) -> String {
    match v.as_u64() {
        None => "<never>".into(),
        Some(s) if s < 120 => format!("{s}s"),
        Some(s) if s < 7200 => format!("{}m", s / 60),
        Some(s) => format!("{}h", s / 3600),
    }
}

fn render(value: &Value, output: Output) -> String {
    match output {
        Output::Json => format!("{}\n", serde_json::to_string_pretty(value).expect("JSON")),
        Output::Yaml => yaml_serde::to_string(value).expect("YAML"),
        Output::Table => unreachable!("tables are rendered per view"),
    }
}

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
