//! The discovery background task: re-issues local ads before they expire,
//! sweeps expired entries, gossips again ads that found no peer, and runs
//! periodic anti-entropy with a few connected peers.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Discovery;

/// Peers reconciled per anti-entropy tick.
const SYNC_FANOUT: usize = 3;
/// Expiry sweep period (also the retry period of unsent gossip).
const EXPIRY_TICK: Duration = Duration::from_millis(500);
/// Delay of the first anti-entropy round after start. Later rounds double
/// it up to the configured interval. A node's round on its first
/// connection can run before that peer has itself pulled from its own
/// peers (the whole mesh starting at once), and ads pulled by anti-entropy
/// are not gossiped again: without these early rounds such a node would
/// miss them for a whole interval.
const CATCH_UP_FIRST: Duration = Duration::from_secs(1);

impl Discovery {
    /// Run until `cancel`; on cancellation announce local agents offline.
    pub async fn run(self, cancel: CancellationToken) {
        let cfg = self.inner.cfg.clone();
        let mut refresh = tokio::time::interval_at(
            tokio::time::Instant::now() + cfg.refresh_interval,
            cfg.refresh_interval,
        );
        let mut sweep = tokio::time::interval(EXPIRY_TICK);
        for t in [&mut refresh, &mut sweep] {
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        let mut gap = CATCH_UP_FIRST.min(cfg.anti_entropy_interval);
        let anti_entropy = tokio::time::sleep(gap);
        tokio::pin!(anti_entropy);
        let mut turn: usize = 0;
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                _ = refresh.tick() => self.refresh_all().await,
                _ = sweep.tick() => {
                    self.expire().await;
                    self.regossip_unsent().await;
                }
                _ = &mut anti_entropy, if cfg.anti_entropy => {
                    gap = (gap * 2).min(cfg.anti_entropy_interval);
                    anti_entropy.as_mut().reset(tokio::time::Instant::now() + gap);
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
