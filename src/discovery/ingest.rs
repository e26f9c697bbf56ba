//! Ads from peers (gossip, anti-entropy, DHT fallback): skip what the
//! registry already holds, verify the rest, apply and persist them.

use std::sync::atomic::Ordering;

use libp2p::PeerId;
use tracing::{debug, warn};

use super::{Applied, Discovery, GossipAd, ad};
use crate::net::{MessageAcceptance, MessageId};
use crate::store::tables::REGISTRY;
use crate::time::now_ms;
use crate::wire::{self, SignedAd};

impl Discovery {
    /// Persist ads (lazily: the registry is a cache that anti-entropy refills).
    pub(super) async fn persist(&self, ads: Vec<SignedAd>) {
        if ads.is_empty() {
            return;
        }
        let r = self
            .inner
            .store
            .write_lazy(move |txn| {
                let mut t = txn.open_table(REGISTRY)?;
                for ad in &ads {
                    t.insert(ad.body.agent_id.as_str(), wire::encode(ad).as_slice())?;
                }
                Ok(())
            })
            .await;
        if let Err(e) = r {
            warn!(error = %e, "cannot persist registry entries");
        }
    }

    /// Verify and apply ads from a peer; returns how many were new or newer.
    /// Ads no newer than what the registry holds are skipped unverified.
    pub(crate) async fn ingest(&self, ads: Vec<SignedAd>) -> usize {
        let now = now_ms();
        let mut verified = Vec::with_capacity(ads.len());
        for ad in ads {
            if self.is_stale(&ad) {
                continue;
            }
            if let Err(e) = ad::verify(&ad, now) {
                self.inner
                    .stats
                    .ads_rejected
                    .fetch_add(1, Ordering::Relaxed);
                debug!(error = %e, agent = %ad.body.agent_id, "rejected an advertisement");
                continue;
            }
            verified.push(ad);
        }
        self.apply_verified(verified, now).await
    }

    pub(super) fn is_stale(&self, ad: &SignedAd) -> bool {
        self.read_registry()
            .is_stale(&ad.body.agent_id, ad.body.seq)
    }

    /// Apply ads whose signatures were checked; persist the new ones.
    async fn apply_verified(&self, ads: Vec<SignedAd>, now: u64) -> usize {
        let mut fresh = Vec::new();
        for ad in ads {
            if self.read_local().contains_key(&ad.body.agent_id) {
                // Our own agent: only this node issues its ads.
                continue;
            }
            if self.write_registry().apply(ad.clone(), now, false) != Applied::Stale {
                fresh.push(ad);
            }
        }
        let n = fresh.len();
        self.inner
            .stats
            .ads_applied
            .fetch_add(n as u64, Ordering::Relaxed);
        self.persist(fresh).await;
        n
    }

    /// A gossip message on the ads topic.
    pub async fn on_gossip(
        &self,
        data: Vec<u8>,
        message_id: MessageId,
        propagation_source: PeerId,
    ) {
        let verdict = match wire::decode::<GossipAd>(&data, wire::ad::MAX_AD_BYTES + 64) {
            Err(e) => {
                self.inner
                    .stats
                    .ads_rejected
                    .fetch_add(1, Ordering::Relaxed);
                debug!(error = %e, peer = %propagation_source, "undecodable ad");
                MessageAcceptance::Reject
            }
            // Already known (a duplicate, or our own ad coming back):
            // nothing to check or forward.
            Ok(GossipAd::V1(ad)) if self.is_stale(&ad) => MessageAcceptance::Ignore,
            Ok(GossipAd::V1(ad)) => {
                let now = now_ms();
                match ad::verify(&ad, now) {
                    Err(e) => {
                        self.inner
                            .stats
                            .ads_rejected
                            .fetch_add(1, Ordering::Relaxed);
                        warn!(error = %e, peer = %propagation_source, agent = %ad.body.agent_id, "rejected a gossiped ad");
                        MessageAcceptance::Reject
                    }
                    Ok(()) => {
                        if self.apply_verified(vec![ad], now).await > 0 {
                            MessageAcceptance::Accept
                        } else {
                            MessageAcceptance::Ignore
                        }
                    }
                }
            }
        };
        let _ = self
            .inner
            .net
            .report_validation(message_id, propagation_source, verdict)
            .await;
    }
}
