//! The gRPC port's TLS: each accepted connection takes a place under the connection limit, then
//! completes its handshake with the newest certificate files (see [`rcsync_core::tls`], which
//! reloads them when they rotate).
//!
//! ```text
//!  TcpListener ──accept──► place under the limit? ──► handshake task (ServingTls::current()) ──► TlsStream ──► serve
//! ```

use futures::Stream;
use rcsync_core::tls::{HANDSHAKE_TIMEOUT, ServingTls};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;

use crate::grpc::connection_limit::ConnectionLimit;
use crate::grpc::serve::MovableTcp;

/// Accepted connections, TLS done, for [`serve`](super::serve::serve). Each handshake runs in its own
/// task, so a slow client holds up nobody; each connection takes a place under `limit` first.
pub fn incoming(
    tls: &ServingTls,
    listener: TcpListener,
    limit: ConnectionLimit,
    mut shutdown: watch::Receiver<bool>,
) -> impl Stream<Item = std::io::Result<TlsStream<MovableTcp>>> + use<> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let tls = tls.clone();
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a gRPC connection failed");
                    tokio::time::sleep(crate::grpc::serve::ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            // The place is taken before the handshake, which costs the agent too.
            let Some(stream) = limit.admit(stream) else {
                continue;
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
