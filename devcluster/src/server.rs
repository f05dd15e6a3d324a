//! The HTTP side: TLS (HTTP/1.1 and HTTP/2 via ALPN) or plain HTTP, bearer-token authentication,
//! body limits, and the kubeconfig clients use.
//!
//! ```text
//!  TCP ──(TLS)──► hyper auto (h1/h2) ──► auth ──► ApiRequest ──► Api::handle ──► Reply ──► HTTP
//! ```

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::body::Body;
use base64::Engine as _;
use bytes::Bytes;
use futures::StreamExt as _;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

use crate::api::{Api, ApiRequest, Reply};
use crate::auth::UserInfo;
use crate::pki::Pki;
use crate::status::ApiError;
use crate::store::Store;

/// Largest request body accepted (kube-apiserver's limit is 3 MiB).
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

/// How to run one API server.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Where to listen (`127.0.0.1:0` picks a free port).
    pub listen: SocketAddr,
    /// Serve plain HTTP without authentication instead of TLS with a bearer token.
    pub insecure_http: bool,
    /// The bearer token to require over TLS; a random one when `None`.
    pub token: Option<String>,
    /// How many changes the store keeps for watches to resume from.
    pub history: usize,
    /// How often watches that allow bookmarks get one.
    pub bookmark_interval: Duration,
    /// Admission plugins in effect.
    pub admission: crate::admission::AdmissionPlugins,
    /// State file: objects and resourceVersions are loaded from it at start and saved to it
    /// (shortly after each change, and at shutdown).
    pub state: Option<std::path::PathBuf>,
    /// Simulated nodes, scheduler and kubelet (none by default: Pods stay Pending).
    pub nodes: crate::nodes::NodeOptions,
    /// Whether Pods have the `resize` subresource (Kubernetes 1.33 and later; on by default).
    pub pod_resize: bool,
    /// Whether TLS offers HTTP/2 (ALPN `h2`), as kube-apiserver does; off: HTTP/1.1 only, as
    /// behind a proxy that does not speak HTTP/2.
    pub http2: bool,
    /// Concurrent streams one HTTP/2 connection may carry (kube-apiserver's
    /// `--http2-max-streams-per-connection`, 100 by default there and here). A request past it
    /// waits for a stream to end.
    pub http2_max_streams: u32,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            insecure_http: false,
            token: None,
            history: 10_000,
            bookmark_interval: Duration::from_secs(10),
            admission: Default::default(),
            state: None,
            nodes: Default::default(),
            pod_resize: true,
            http2: true,
            http2_max_streams: 100,
        }
    }
}

struct App {
    api: Api,
    token: Option<String>,
}

/// A running API server. Dropping it does not stop it: call [`DevCluster::shutdown`].
pub struct DevCluster {
    addr: SocketAddr,
    tls: bool,
    token: Option<String>,
    ca_pem: Option<String>,
    app: Arc<App>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl DevCluster {
    /// Starts an API server with `default`, `kube-system`, `kube-public` and `kube-node-lease`.
    pub async fn start(options: ServerOptions) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(options.listen)
            .await
            .with_context(|| format!("listening on {}", options.listen))?;
        let addr = listener.local_addr()?;
        let store = Arc::new(Store::new(options.history));
        let mut api = Api::new(store);
        api.bookmark_interval = options.bookmark_interval;
        api.admission = options.admission;
        api.pod_resize = options.pod_resize;
        if let Some(path) = &options.state
            && path.exists()
        {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the state file {}", path.display()))?;
            let snapshot: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("the state file {} is not JSON", path.display()))?;
            // Custom kinds first: their objects are stored under the kinds' own storages.
            let crds: Vec<&serde_json::Value> = snapshot
                .get("objects")
                .and_then(serde_json::Value::as_array)
                .into_iter()
                .flatten()
                .filter(|e| {
                    e.get("storage").and_then(serde_json::Value::as_str) == Some("customresourcedefinitions")
                })
                .filter_map(|e| e.get("object"))
                .collect();
            let kinds: Vec<_> = crds.iter().flat_map(|crd| crate::crd::kinds_of(crd)).collect();
            api.registry().set_custom(&kinds);
            let storages: Vec<&'static str> = api.registry().all().iter().map(|r| r.storage).collect();
            let n = api
                .store()
                .restore(&snapshot, &storages)
                .map_err(|e| anyhow::anyhow!("the state file {}: {e}", path.display()))?;
            tracing::info!(objects = n, state = %path.display(), "restored state");
        }
        if let Some(path) = &options.state {
            api.issuer = crate::auth::TokenIssuer::with_secret(&signing_secret(path)?);
        }
        api.bootstrap();
        let (tls, token, ca_pem) = if options.insecure_http {
            (None, None, None)
        } else {
            let pki = Pki::new("devcluster-ca")?;
            let host = addr.ip().to_string();
            let serving = pki.server(&[&host, "localhost"])?;
            let token = options.token.clone().unwrap_or_else(random_token);
            (
                Some(tls_acceptor(&serving.cert_pem, &serving.key_pem, options.http2)?),
                Some(token),
                Some(pki.ca_pem()),
            )
        };
        let app = Arc::new(App {
            api,
            token: token.clone(),
        });
        let (stop, stopped) = watch::channel(false);
        let saver = options
            .state
            .clone()
            .map(|path| tokio::spawn(save_state(app.api.store().clone(), path, stop.subscribe())));
        tokio::spawn(crate::quota::run(app.api.store().clone(), stop.subscribe()));
        tokio::spawn(crate::disruption::run(app.api.store().clone(), stop.subscribe()));
        tokio::spawn(crate::claims::claim_controllers(
            app.api.store().clone(),
            stop.subscribe(),
        ));
        if options.nodes.count > 0 {
            crate::claims::make_default_class(app.api.store());
            tokio::spawn(crate::claims::run(app.api.store().clone(), stop.subscribe()));
            tokio::spawn(crate::nodes::run(
                app.api.store().clone(),
                options.nodes.clone(),
                stop.subscribe(),
            ));
        }
        let serving = tokio::spawn(accept_loop(
            listener,
            tls,
            options.http2_max_streams,
            app.clone(),
            stopped,
        ));
        let task = tokio::spawn(async move {
            let _ = serving.await;
            if let Some(saver) = saver {
                let _ = saver.await;
            }
        });
        Ok(Self {
            addr,
            tls: ca_pem.is_some(),
            token,
            ca_pem,
            app,
            stop,
            task,
        })
    }

    /// The address served.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL (`https://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        format!("{}://{}", if self.tls { "https" } else { "http" }, self.addr)
    }

    /// The bearer token clients must send (TLS only).
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// The CA certificate (PEM) that signed the serving certificate (TLS only).
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// The store, for tests that need to reach below the API (e.g. compaction).
    pub fn store(&self) -> &Arc<Store> {
        self.app.api.store()
    }

    /// The API, to serve requests in-process (bootstrapping objects without a client).
    pub fn api(&self) -> &Api {
        &self.app.api
    }

    /// A kubeconfig for this server, with one cluster, user and context named `name`.
    pub fn kubeconfig(&self, name: &str) -> String {
        self.kubeconfig_with_token(name, self.token.as_deref())
    }

    /// Writes a kubeconfig whose user is the service account `namespace/account`, with a token
    /// this server issues for it (valid `seconds`), mode 0600.
    pub fn write_service_account_kubeconfig(
        &self,
        path: &Path,
        name: &str,
        namespace: &str,
        account: &str,
        seconds: i64,
    ) -> anyhow::Result<()> {
        let sa = self
            .store()
            .get("serviceaccounts", namespace, account)
            .with_context(|| format!("no ServiceAccount {namespace}/{account}"))?;
        let uid = sa
            .pointer("/metadata/uid")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default();
        let (token, _) = self.app.api.issuer.issue(
            namespace,
            account,
            uid,
            &[crate::auth::AUDIENCE.to_string()],
            seconds,
        );
        write_private(path, &self.kubeconfig_with_token(name, Some(&token)))
    }

    fn kubeconfig_with_token(&self, name: &str, token: Option<&str>) -> String {
        let mut cluster = format!("    server: {}\n", self.url());
        if let Some(ca) = &self.ca_pem {
            let ca = base64::engine::general_purpose::STANDARD.encode(ca);
            cluster.push_str(&format!("    certificate-authority-data: {ca}\n"));
        }
        let user_block = match token {
            Some(token) => format!("  user:\n    token: {token}\n"),
            None => "  user: {}\n".to_string(),
        };
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: {name}\n  cluster:\n{cluster}users:\n- name: {name}\n{user_block}contexts:\n- name: {name}\n  context:\n    cluster: {name}\n    user: {name}\n    namespace: default\ncurrent-context: {name}\npreferences: {{}}\n"
        )
    }

    /// Writes [`DevCluster::kubeconfig`] to `path` (mode 0600: it holds a credential).
    pub fn write_kubeconfig(&self, path: &Path, name: &str) -> anyhow::Result<()> {
        write_private(path, &self.kubeconfig(name))
    }

    /// Stops accepting, ends open connections (watches included) and waits for the server task.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// The service account token signing secret kept beside the state file `state` (`<state>.sa-key`,
/// hex, owner-only), made on first use: a server restarted from its state accepts the tokens it
/// issued before, as upstream does with its signing key file.
fn signing_secret(state: &Path) -> anyhow::Result<Vec<u8>> {
    let mut name = state.as_os_str().to_owned();
    name.push(".sa-key");
    let path = std::path::PathBuf::from(name);
    if path.exists() {
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        return hex::decode(text.trim()).with_context(|| format!("{} is not hex", path.display()));
    }
    let secret = crate::auth::TokenIssuer::new_secret();
    write_private(&path, &hex::encode(secret))?;
    Ok(secret.to_vec())
}

/// Saves the store to `path` shortly after changes (coalescing bursts) and once more at shutdown.
async fn save_state(store: Arc<Store>, path: std::path::PathBuf, mut stop: watch::Receiver<bool>) {
    let mut changes = store.changes();
    let write = |snapshot: serde_json::Value| {
        let tmp = path.with_extension("tmp");
        let text = serde_json::to_vec(&snapshot).expect("JSON values serialize");
        if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &path)) {
            tracing::error!(state = %path.display(), error = %e, "saving the state failed");
        }
    };
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            change = changes.recv() => {
                if matches!(change, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                while changes.try_recv().is_ok() {}
                write(store.snapshot());
            }
        }
    }
    // Requests still being answered get a 503 from here on, not an answer the file lacks.
    write(store.seal());
}

/// Writes a kubeconfig readable only by its owner (it holds a credential).
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

fn random_token() -> String {
    use rand::Rng as _;
    let bytes: [u8; 24] = rand::rng().random();
    hex_string(&bytes)
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn tls_acceptor(cert_pem: &str, key_pem: &str, http2: bool) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::pem::PemObject as _;
    let certs = rustls_pemfile_certs(cert_pem)?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("parsing the serving key: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = if http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

fn rustls_pemfile_certs(pem: &str) -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject as _;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("parsing the serving certificate: {e}"))
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    http2_max_streams: u32,
    app: Arc<App>,
    mut stopped: watch::Receiver<bool>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stopped.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    // Watch events are small writes: send each at once, not after Nagle's delay.
                    let _ = a.0.set_nodelay(true);
                    a
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
        };
        let app = app.clone();
        let tls = tls.clone();
        let service = hyper::service::service_fn(move |req| serve(app.clone(), req));
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder.http2().max_concurrent_streams(http2_max_streams);
        match tls {
            Some(acceptor) => {
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let stream =
                        match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => return,
                        };
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    if let Err(e) = watcher.watch(conn.into_owned()).await {
                        tracing::debug!(%peer, error = %e, "connection ended");
                    }
                });
            }
            None => {
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                let conn = graceful.watch(conn.into_owned());
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, error = %e, "connection ended");
                    }
                });
            }
        }
    }
    // Watches never finish on their own: give requests a moment, then drop the rest.
    let _ = tokio::time::timeout(Duration::from_millis(500), graceful.shutdown()).await;
}

fn is_public(path: &str) -> bool {
    matches!(path, "/version" | "/livez" | "/readyz" | "/healthz")
}

async fn serve(app: Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let response = handle(app, req).await;
    tracing::debug!(%method, %path, status = response.status().as_u16(), "request");
    Ok(response)
}

/// Who sends `req`: the admin token, a service account token this server issued, or (plain HTTP
/// without a token) the admin; then impersonation, when allowed. `Err` is the 401/403 to answer.
fn authenticate(app: &App, headers: &http::HeaderMap) -> Result<UserInfo, ApiError> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let user = match (presented, &app.token) {
        (Some(t), Some(admin)) if t == admin => UserInfo::admin(),
        (Some(t), _) => app
            .api
            .authenticate_service_account(t)
            .ok_or_else(ApiError::unauthorized)?,
        // Plain HTTP serves without authentication: everyone is the admin.
        (None, None) => UserInfo::admin(),
        (None, Some(_)) => return Err(ApiError::unauthorized()),
    };
    let Some(target) = headers.get("impersonate-user").and_then(|v| v.to_str().ok()) else {
        return Ok(user);
    };
    let mut groups: Vec<String> = headers
        .get_all("impersonate-group")
        .iter()
        .filter_map(|v| v.to_str().ok().map(String::from))
        .collect();
    if groups.is_empty()
        && let Some((ns, _)) = crate::auth::parse_service_account(target)
    {
        groups = crate::auth::service_account_groups(ns);
    }
    if !groups.iter().any(|g| g == crate::auth::AUTHENTICATED) {
        groups.push(crate::auth::AUTHENTICATED.into());
    }
    let impersonated = UserInfo {
        username: target.to_string(),
        uid: String::new(),
        groups,
    };
    if !app.api.may_impersonate(&user, &impersonated) {
        return Err(ApiError::forbidden_path(&format!(
            "users {target:?} is forbidden: User {:?} cannot impersonate resource \"users\" in API group \"\" at the cluster scope",
            user.username
        )));
    }
    Ok(impersonated)
}

async fn handle(app: Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let user = if is_public(req.uri().path()) {
        None
    } else {
        match authenticate(&app, req.headers()) {
            Ok(user) => Some(user),
            Err(e) => return reply(e.into()),
        }
    };
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            return reply(ApiError::too_large(MAX_BODY_BYTES).into());
        }
        Err(e) => return reply(ApiError::bad_request(format!("reading the request body: {e}")).into()),
    };
    let query: HashMap<String, String> = parts
        .uri
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let header_str = |name: header::HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let request = ApiRequest {
        method: parts.method.clone(),
        path: parts.uri.path().to_string(),
        query,
        content_type: header_str(header::CONTENT_TYPE),
        accept: header_str(header::ACCEPT).unwrap_or_default(),
        user_agent: header_str(header::USER_AGENT).unwrap_or_default(),
        body,
        user,
    };
    reply(app.api.handle(request))
}

fn reply(reply: Reply) -> Response<Body> {
    match reply {
        Reply::Json { code, body, warnings } => {
            let mut response = Response::new(Body::from(
                serde_json::to_vec(&body).expect("JSON values serialize"),
            ));
            *response.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            for w in warnings {
                if let Ok(v) = HeaderValue::from_str(&format!("299 - {w:?}")) {
                    response.headers_mut().append(header::WARNING, v);
                }
            }
            response
        }
        Reply::Stream(rx) => {
            let stream = ReceiverStream::new(rx).map(Ok::<Bytes, Infallible>);
            let mut response = Response::new(Body::from_stream(stream));
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response.headers_mut().insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("no-cache, private"),
            );
            response
        }
        Reply::Text(code, text) => {
            let mut response = Response::new(Body::from(text));
            *response.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            response
        }
    }
}
