//! Gossiping our own ads, and gossiping again those that found no peer.
//!
//! Gossipsub drops a publish when no peer is known to subscribe to the
//! topic (a node that registers an agent in its first second, before any
//! subscription arrived) or when every peer's send queue is full. Such an
//! ad would then spread only by anti-entropy, one peer per round. So the
//! latest ad of each agent whose publish was dropped is kept here and
//! published again on the next expiry tick, until one publish goes out or
//! a newer ad of that agent replaces it.

use std::collections::HashMap;

use tracing::debug;

use super::{Discovery, GossipAd};
use crate::identity::AgentId;
use crate::net;
use crate::wire::{self, SignedAd};

/// Ads whose publish was dropped, newest per agent.
pub(super) type Unsent = std::sync::Mutex<HashMap<AgentId, SignedAd>>;

impl Discovery {
    /// Publish `ad` on the ads topic; keep it for a retry if it could not go
    /// out yet.
    pub(super) async fn gossip(&self, ad: &SignedAd) {
        if !self.inner.cfg.gossip {
            return;
        }
        let sent = self.publish_ad(ad).await;
        self.settle(ad, sent);
    }

    /// Publish again the ads that could not go out; returns how many did.
    pub(super) async fn regossip_unsent(&self) -> usize {
        let pending: Vec<SignedAd> = self.unsent().values().cloned().collect();
        let mut sent = 0;
        for ad in pending {
            if self.publish_ad(&ad).await {
                sent += 1;
                self.settle(&ad, true);
            } else {
                // The topic still has no reachable peer: the rest would fail too.
                break;
            }
        }
        if sent > 0 {
            debug!(sent, "gossiped ads that had found no peer");
        }
        sent
    }

    /// Record the outcome of publishing `ad`: once sent, it and any older
    /// unsent ad of its agent are done; if not, it waits unless a newer one
    /// already does.
    fn settle(&self, ad: &SignedAd, sent: bool) {
        let mut unsent = self.unsent();
        let held = unsent.get(&ad.body.agent_id).map(|u| u.body.seq);
        if sent {
            if held.is_some_and(|seq| seq <= ad.body.seq) {
                unsent.remove(&ad.body.agent_id);
            }
        } else if held.is_none_or(|seq| seq < ad.body.seq) {
            unsent.insert(ad.body.agent_id.clone(), ad.clone());
        }
    }

    /// How many of our ads wait for a peer to gossip to.
    pub fn unsent_ads(&self) -> usize {
        self.unsent().len()
    }

    /// One publish; false when it may succeed later (no subscribed peer
    /// yet, full queues). Other failures are logged and count as done:
    /// anti-entropy carries that ad.
    async fn publish_ad(&self, ad: &SignedAd) -> bool {
        let data = wire::encode(&GossipAd::V1(ad.clone()));
        match self.inner.net.publish(self.inner.topic.clone(), data).await {
            Ok(()) => true,
            Err(net::Error::Publish {
                retryable: true,
                reason,
                ..
            }) => {
                debug!(agent = %ad.body.agent_id, %reason, "ad not gossiped yet; will retry");
                false
            }
            Err(e) => {
                debug!(agent = %ad.body.agent_id, error = %e, "gossip of an ad failed; anti-entropy will carry it");
                true
            }
        }
    }

    fn unsent(&self) -> std::sync::MutexGuard<'_, HashMap<AgentId, SignedAd>> {
        self.inner.unsent.lock().unwrap_or_else(|p| p.into_inner())
    }
}
