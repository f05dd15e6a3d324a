//! The cap on open gRPC connections (`--max-connections`).
//!
//! ```text
//!   TCP accept ──► ConnectionLimit::admit ──► a place free: MovableTcp holding it ──► (TLS) ──► serve
//!                          │                                  place freed when the socket closes
//!                          └─ all places taken: closed at once, counted, warned about
//! ```
//!
//! Every open connection costs the agent a task and HTTP/2's buffers (and TLS's), whether or not
//! its peer ever authenticates: credentials are per request, so a connection is open before
//! anything about its caller is known. Without a cap, anyone who can reach the port can hold
//! connections until the agent runs out of memory or file descriptors. The place is taken right
//! after the TCP accept, before any TLS handshake, and held by the socket itself
//! ([`MovableTcp`]), so it is freed however the connection ends. A connection past the cap is
//! closed at once rather than left in the listen backlog: its client sees the refusal and
//! retries with its backoff instead of waiting for a handshake that never comes.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::grpc::serve::MovableTcp;

/// How often a refusal is logged at most (every refusal is counted in
/// `rcsync_grpc_connections_refused_total`).
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The places for open gRPC connections, shared by every listener of the gRPC port.
#[derive(Clone, Debug)]
pub struct ConnectionLimit {
    places: Arc<Semaphore>,
    max: NonZeroUsize,
    refused: Counter,
    last_warned: Arc<Mutex<Option<Instant>>>,
}

impl ConnectionLimit {
    /// `max` places; refusals are counted in `refused`.
    pub fn new(max: NonZeroUsize, refused: Counter) -> Self {
        Self {
            places: Arc::new(Semaphore::new(max.get())),
            max,
            refused,
            last_warned: Arc::new(Mutex::new(None)),
        }
    }

    /// The accepted connection, holding a place until it closes; `None` (the connection closed)
    /// when every place is taken.
    pub fn admit(&self, stream: TcpStream) -> Option<MovableTcp> {
        match self.places.clone().try_acquire_owned() {
            Ok(place) => Some(MovableTcp::holding(stream, place)),
            Err(_) => {
                self.refused.inc();
                let peer = stream
                    .peer_addr()
                    .map_or_else(|_| "unknown".to_string(), |addr| addr.to_string());
                drop(stream);
                let mut last = self
                    .last_warned
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                if last.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                    *last = Some(Instant::now());
                    tracing::warn!(
                        %peer,
                        max_connections = self.max.get(),
                        refused_total = self.refused.get(),
                        "refusing gRPC connections: --max-connections are open"
                    );
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;

    async fn connected(listener: &tokio::net::TcpListener) -> (TcpStream, TcpStream) {
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (accepted, client) = tokio::join!(listener.accept(), client);
        (accepted.unwrap().0, client.unwrap())
    }

    #[tokio::test]
    async fn a_connection_past_the_cap_is_closed_and_a_closed_one_frees_its_place() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let refused = Counter::default();
        let limit = ConnectionLimit::new(NonZeroUsize::new(2).unwrap(), refused.clone());

        let (first, _first_client) = connected(&listener).await;
        let first = limit.admit(first).expect("a place is free");
        let (second, _second_client) = connected(&listener).await;
        let _second = limit.admit(second).expect("a place is free");

        let (third, mut third_client) = connected(&listener).await;
        assert!(limit.admit(third).is_none(), "both places are taken");
        assert_eq!(refused.get(), 1);
        let mut buf = [0u8; 1];
        assert_eq!(
            third_client.read(&mut buf).await.unwrap(),
            0,
            "the refused connection is closed, not left open"
        );

        drop(first);
        let (fourth, _fourth_client) = connected(&listener).await;
        assert!(
            limit.admit(fourth).is_some(),
            "the closed connection's place is free again"
        );
        assert_eq!(refused.get(), 1);
    }
}
