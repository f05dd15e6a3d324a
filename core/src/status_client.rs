//! The client side of the admin port for `status` commands: a plain HTTP/1.0 GET (no runtime,
//! no TLS: the admin port serves plain HTTP on the agent's network), kubectl-style tables, and the
//! JSON/YAML renderings.

use std::io::{Read as _, Write as _};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
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

/// What a `status` command prints and how it exits.
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
pub fn get(base: &str, path: &str, token: Option<&str>) -> Result<(u16, String), String> {
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
    let authorization = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {authority}\r\n{authorization}\r\n"
    )
    .map_err(|e| format!("{base}: {e}"))?;
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
pub fn table(rows: &[Vec<String>]) -> String {
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

/// A JSON value as a table cell (`<none>` for null or empty).
pub fn text(v: &Value) -> String {
    match v {
        Value::Null => "<none>".into(),
        Value::String(s) if s.is_empty() => "<none>".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// An age in seconds as kubectl prints ages (`42s`, `5m`, `3h`; `<never>` for null).
pub fn age(v: &Value) -> String {
    match v.as_u64() {
        None => "<never>".into(),
        Some(s) if s < 120 => format!("{s}s"),
        Some(s) if s < 7200 => format!("{}m", s / 60),
        Some(s) => format!("{}h", s / 3600),
    }
}

/// Reads `/readyz` and the JSON document at `path` from an agent's admin port: whether it is
/// ready (and its readiness report), and the document; or the report of an unreachable agent
/// (exit 2). `agent` names it in messages ("host agent"); `token_file` holds the token of an
/// agent run with `--admin-token-file`.
pub fn fetch(
    admin: &str,
    token_file: Option<&Path>,
    path: &str,
    agent: &str,
) -> Result<(bool, String, Value), Report> {
    let unreachable = |e: String| Report {
        stdout: String::new(),
        stderr: format!("error: the {agent}'s admin port is unreachable: {e}\n"),
        code: 2,
    };
    let token = match token_file.map(crate::admin::read_token).transpose() {
        Ok(token) => token,
        Err(e) => {
            return Err(Report {
                stdout: String::new(),
                stderr: format!("error: {e}\n"),
                code: 2,
            });
        }
    };
    let (ready, report) = match get(admin, "/readyz", None) {
        Ok((code, body)) => (code == 200, body),
        Err(e) => return Err(unreachable(e)),
    };
    let doc = match get(admin, path, token.as_deref()) {
        Ok((200, body)) => {
            serde_json::from_str(&body).map_err(|e| unreachable(format!("{admin}{path} is not JSON: {e}")))?
        }
        Ok((401, _)) => {
            return Err(unreachable(format!(
                "{admin}{path} answered 401: the agent requires a token (pass its --admin-token-file)"
            )));
        }
        Ok((code, _)) => return Err(unreachable(format!("{admin}{path} answered {code}"))),
        Err(e) => return Err(unreachable(e)),
    };
    Ok((ready, report, doc))
}

/// The report of a status command that printed `stdout`: exit 1 with the readiness report when
/// the agent is not ready, 0 otherwise.
pub fn finish(stdout: String, ready: bool, readiness: &str, agent: &str) -> Report {
    if ready {
        Report {
            stdout,
            stderr: String::new(),
            code: 0,
        }
    } else {
        Report {
            stdout,
            stderr: format!("the {agent} is not ready:\n{readiness}"),
            code: 1,
        }
    }
}

/// `value` as pretty JSON or YAML (tables are built by each command).
pub fn render(value: &Value, output: Output) -> String {
    match output {
        Output::Json => format!("{}\n", serde_json::to_string_pretty(value).expect("JSON")),
        Output::Yaml => yaml_serde::to_string(value).expect("YAML"),
        Output::Table => unreachable!("tables are rendered per view"),
    }
}
