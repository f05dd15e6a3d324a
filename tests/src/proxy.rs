//! A TCP proxy on loopback between a client (a virtual agent, or an agent and its API server) and
//! its server that a test or the chaos harness can make misbehave: cut every connection (drop),
//! stall them (blackhole: bytes are held, sockets stay open), or delay every chunk.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, watch};

/// What the proxy does with traffic now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward at once.
    Pass,
    /// Hold every byte until the mode changes (a blackhole that heals).
    Stall,
    /// Forward each chunk after this delay.
    Delay(Duration),
}

/// A faulty proxy: listens on `addr`, forwards to the target.
pub struct FaultyProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
    cut: broadcast::Sender<()>,
}

impl FaultyProxy {
    /// Listens on a free loopback port and forwards to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (mode, mode_rx) = watch::channel(Mode::Pass);
        let (cut, _) = broadcast::channel(4);
        let cut_tx = cut.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let mode = mode_rx.clone();
                let cut = cut_tx.subscribe();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    relay(client, server, mode, cut).await;
                });
            }
        });
        Ok(Self { addr, mode, cut })
    }

    /// Drops every open connection (new ones are accepted).
    pub fn cut(&self) {
        let _ = self.cut.send(());
    }

    /// Sets how traffic is treated from now on.
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }
}

async fn relay(
    client: TcpStream,
    server: TcpStream,
    mode: watch::Receiver<Mode>,
    mut cut: broadcast::Receiver<()>,
) {
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    tokio::select! {
        _ = pump(cr, sw, mode.clone()) => {}
        _ = pump(sr, cw, mode) => {}
        _ = cut.recv() => {}
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        loop {
            let current = *mode.borrow_and_update();
            match current {
                Mode::Pass => break,
                Mode::Delay(d) => {
                    tokio::time::sleep(d).await;
                    break;
                }
                Mode::Stall => {
                    if mode.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Points the kubeconfig at `path` to its API server through a new [`FaultyProxy`] (its server
/// URL names the proxy; TLS still checks the API server's own name, `tls-server-name`), and
/// returns the proxy.
pub async fn reroute_kubeconfig(path: &std::path::Path) -> FaultyProxy {
    let mut kubeconfig = kube::config::Kubeconfig::read_from(path).unwrap();
    let mut proxy = None;
    for named in &mut kubeconfig.clusters {
        let Some(cluster) = named.cluster.as_mut() else {
            continue;
        };
        let server = cluster.server.clone().expect("a server URL");
        let authority = server.trim_start_matches("https://").trim_end_matches('/');
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => (host.trim_matches(['[', ']']).to_string(), port.parse().unwrap()),
            None => (authority.to_string(), 443),
        };
        let target = tokio::net::lookup_host((host.as_str(), port))
            .await
            .unwrap()
            .next()
            .expect("the API server's address");
        let started = FaultyProxy::start(target).await.unwrap();
        cluster.server = Some(format!("https://{}", started.addr));
        cluster.tls_server_name.get_or_insert(host);
        proxy = Some(started);
    }
    std::fs::write(path, yaml_serde::to_string(&kubeconfig).unwrap()).unwrap();
    proxy.expect("a cluster in the kubeconfig")
}
