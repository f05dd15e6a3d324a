//! The client side of the admin port for `status` commands: an HTTP/1.0 GET, over TLS for an
//! `https://` admin port (no runtime), kubectl-style tables, and the JSON/YAML renderings.

use std::io::{Read, Write};
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

/// How a `status` command reaches an agent's admin port.
#[derive(Clone, Copy, Debug)]
pub struct AdminTarget<'a> {
    /// The admin port's URL (`http://` or `https://`).
    pub url: &'a str,
    /// The token file of an agent run with `--admin-token-file`.
    pub token_file: Option<&'a Path>,
    /// The CA that signed the certificate of an `https://` admin port.
    pub ca: Option<&'a Path>,
}

/// `GET base+path` over HTTP/1.0 (the admin port), over TLS for an `https://` base (verified
/// against the PEM CA file `ca`, which it then needs); the status code and body.
pub fn get(base: &str, path: &str, token: Option<&str>, ca: Option<&Path>) -> Result<(u16, String), String> {
    let (tls, authority) = match (base.strip_prefix("http://"), base.strip_prefix("https://")) {
        (Some(authority), _) => (false, authority),
        (_, Some(authority)) => (true, authority),
        _ => return Err(format!("--admin {base:?} must be an http:// or https:// URL")),
    };
    let authority = authority.trim_end_matches('/');
    let addr = authority
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority} resolves to no address"))?;
    let timeout = Duration::from_secs(3);
    let stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{base}: {e}"))?;
    stream.set_read_timeout(Some(timeout)).ok();
    stream.set_write_timeout(Some(timeout)).ok();
    let authorization = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    let request = format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\n{authorization}\r\n");
    let raw = if tls {
        let ca = ca.ok_or_else(|| {
            format!("--admin {base} is served over TLS: pass --admin-ca, the CA that signed its certificate")
        })?;
        let host = authority
            .rsplit_once(':')
            .map_or(authority, |(host, _)| host)
            .trim_start_matches('[')
            .trim_end_matches(']');
        exchange(&mut tls_stream(stream, host, ca)?, &request, base, true)?
    } else {
        let mut stream = stream;
        exchange(&mut stream, &request, base, false)?
    };
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

/// Writes `request` and reads the answer to its end. Over TLS a server that closes without
/// `close_notify` ends the answer as well (the response is complete once the connection closes).
fn exchange(
    stream: &mut (impl Read + Write),
    request: &str,
    base: &str,
    tls: bool,
) -> Result<String, String> {
    stream
        .write_all(request.as_bytes())
        .and_then(|()| stream.flush())
        .map_err(|e| format!("{base}: {e}"))?;
    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw) {
        Ok(_) => {}
        Err(e) if tls && e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(format!("{base}: {e}")),
    }
    String::from_utf8(raw).map_err(|_| format!("{base}: the answer is not UTF-8"))
}

/// A TLS client over `stream` verifying `host` against the PEM CA file `ca`.
fn tls_stream(
    stream: TcpStream,
    host: &str,
    ca: &Path,
) -> Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>, String> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, ServerName};
    let pem = std::fs::read(ca).map_err(|e| format!("reading the admin CA {}: {e}", ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("parsing the admin CA {}: {e}", ca.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("using the admin CA {}: {e}", ca.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("the admin CA {} holds no PEM certificate", ca.display()));
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from(host.to_string()).map_err(|e| format!("{host}: {e}"))?;
    let connection = rustls::ClientConnection::new(std::sync::Arc::new(config), name)
        .map_err(|e| format!("TLS to {host}: {e}"))?;
    Ok(rustls::StreamOwned::new(connection, stream))
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
/// (exit 2). `agent` names it in messages ("host agent").
pub fn fetch(target: &AdminTarget<'_>, path: &str, agent: &str) -> Result<(bool, String, Value), Report> {
    let AdminTarget {
        url: admin,
        token_file,
        ca,
    } = *target;
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
    let (ready, report) = match get(admin, "/readyz", None, ca) {
        Ok((code, body)) => (code == 200, body),
        Err(e) => return Err(unreachable(e)),
    };
    let doc = match get(admin, path, token.as_deref(), ca) {
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
