//! The discovery background task: re-issues local ads before they expire,
//! sweeps expired entries, and runs periodic anti-entropy with a few
//! connected peers.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Discovery;

/// Peers reconciled per anti-entropy tick.
const SYNC_FANOUT: usize = 3;
/// Expiry sweep period.
const EXPIRY_TICK: Duration = Duration::from_millis(500);

impl Discovery {
    /// Run until `cancel`; on cancellation announce local agents offline.
    pub async fn run(self, cancel: CancellationToken) {
        let cfg = self.inner.cfg.clone();
        let mut refresh = tokio::time::interval_at(
            tokio::time::Instant::now() + cfg.refresh_interval,
            cfg.refresh_interval,
        );
        let mut sweep = tokio::time::interval(EXPIRY_TICK);
        let mut anti_entropy = tokio::time::interval_at(
            tokio::time::Instant::now() + cfg.anti_entropy_interval,
            cfg.anti_entropy_interval,
        );
        for t in [&mut refresh, &mut sweep, &mut anti_entropy] {
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        let mut turn: usize = 0;
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                _ = refresh.tick() => self.refresh_all().await,
                _ = sweep.tick() => { self.expire().await; }
                _ = anti_entropy.tick(), if cfg.anti_entropy => {
                    let mut peers: Vec<_> = self.connected_peers().into_iter().collect();
                    tracing::debug!(peers = peers.len(), "anti-entropy tick");
                    peers.sort();
                    if !peers.is_empty() {
                        // Rotate through peers so every one is reconciled in turn.
                        for i in 0..SYNC_FANOUT.min(peers.len()) {
                            let peer = peers[(turn + i) % peers.len()];
                            let d = self.clone();
                            tokio::spawn(async move { d.sync_with(peer).await });
                        }
                        turn = turn.wrapping_add(SYNC_FANOUT);
                    }
                }
            }
        }
    }
}
