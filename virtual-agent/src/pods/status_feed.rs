//! The WatchPodStatus stream from the host agent, kept open and fed to the shards.

use std::time::Duration;

use rcsync_proto::v1::{HostEvents, WatchPodStatusRequest};
use tokio::sync::{mpsc, watch};

use super::StatusFeed;
use crate::connect::{Backoff, HostAgentTarget};

/// Keeps a WatchPodStatus stream open (asking for `host_events`), reconnecting with backoff, and
/// forwards its events.
pub(super) async fn status_feed(
    target: HostAgentTarget,
    host_events: HostEvents,
    tx: mpsc::Sender<StatusFeed>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(250), crate::connect::RECONNECT_MAX);
    loop {
        let session = async {
            let (_, mut pods) = target.connect().await?;
            let mut stream = pods
                .watch_pod_status(WatchPodStatusRequest {
                    host_events: host_events as i32,
                })
                .await?
                .into_inner();
            tx.send(StatusFeed::Reset).await?;
            while let Some(event) = stream.message().await? {
                backoff.reset();
                tx.send(StatusFeed::Event(Box::new(event))).await?;
            }
            anyhow::Ok(())
        };
        tokio::select! {
            _ = shutdown.changed() => return,
            result = session => {
                if let Err(e) = result {
                    tracing::warn!(error = format!("{e:#}"), "WatchPodStatus stream failed");
                }
            }
        }
        if tx.is_closed() {
            return;
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}
