//! Anti-entropy with one peer, and answers to the discovery requests peers
//! send us.
//!
//! Initiator: send our digest; if the peer's differs it answers with its
//! `(agent_id, seq)` summary; we fetch what we lack or hold older, and push
//! what it lacks. Both sides of a new connection run this, so a node that
//! joins late or restarts sees the whole mesh within one round trip or two.

use std::sync::atomic::Ordering;

use libp2p::PeerId;
use tracing::debug;

use super::{Discovery, dht};
use crate::wire::{self, Request, Response, rpc::MAX_ADS_PER_FRAME};

impl Discovery {
    async fn call(&self, peer: PeerId, req: &Request) -> Option<Response> {
        match self.inner.net.request(peer, wire::encode(req)).await {
            Ok(bytes) => match wire::decode::<Response>(&bytes, wire::MAX_FRAME_BYTES) {
                Ok(Response::Error { message }) => {
                    debug!(%peer, %message, "peer refused a discovery request");
                    None
                }
                Ok(r) => Some(r),
                Err(e) => {
                    debug!(%peer, error = %e, "undecodable discovery response");
                    None
                }
            },
            Err(e) => {
                debug!(%peer, error = %e, "discovery request failed");
                None
            }
        }
    }

    /// One anti-entropy round with `peer`.
    pub(crate) async fn sync_with(&self, peer: PeerId) {
        let (digest, count) = {
            let reg = self.read_registry();
            (reg.digest(), reg.len() as u32)
        };
        let Some(Response::Summary(theirs)) = self
            .call(peer, &Request::SyncDigest { digest, count })
            .await
        else {
            return;
        };
        self.inner.stats.sync_rounds.fetch_add(1, Ordering::Relaxed);
        let Some(theirs) = theirs else {
            self.synced_now();
            return;
        };
        let wanted = self.read_registry().wanted(&theirs);
        let offered: Vec<wire::SignedAd> = self
            .read_registry()
            .offered(&theirs)
            .into_iter()
            .cloned()
            .collect();
        let mut pulled = 0;
        let mut complete = true;
        for chunk in wanted.chunks(MAX_ADS_PER_FRAME) {
            if let Some(Response::Ads(ads)) = self
                .call(
                    peer,
                    &Request::FetchAds {
                        ids: chunk.to_vec(),
                    },
                )
                .await
            {
                pulled += self.ingest(ads).await;
            } else {
                complete = false;
            }
        }
        // Only a round that brought the whole difference counts: a node
        // whose first pull failed keeps syncing on its next connections.
        if complete {
            self.synced_now();
        }
        for chunk in offered.chunks(MAX_ADS_PER_FRAME) {
            self.call(
                peer,
                &Request::PushAds {
                    ads: chunk.to_vec(),
                },
            )
            .await;
        }
        debug!(%peer, pulled, pushed = offered.len(), "anti-entropy round done");
    }

    /// Note that a round got the peer's whole view (see `on_peer_connected`).
    fn synced_now(&self) {
        *self
            .inner
            .last_sync
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
    }

    /// Answer a discovery request from `peer`.
    pub async fn handle_request(&self, peer: PeerId, req: Request) -> Response {
        match req {
            Request::SyncDigest { digest, .. } => {
                let reg = self.read_registry();
                if reg.digest() == digest {
                    Response::Summary(None)
                } else {
                    Response::Summary(Some(reg.summary()))
                }
            }
            Request::FetchAds { ids } => {
                let reg = self.read_registry();
                Response::Ads(
                    ids.iter()
                        .take(MAX_ADS_PER_FRAME)
                        .filter_map(|id| reg.get(id).map(|e| e.ad.clone()))
                        .collect(),
                )
            }
            Request::PushAds { ads } => {
                if ads.len() > MAX_ADS_PER_FRAME {
                    return Response::Error {
                        message: format!("at most {MAX_ADS_PER_FRAME} ads per push"),
                    };
                }
                let n = self.ingest(ads).await;
                debug!(%peer, applied = n, "ads pushed to us");
                Response::Ack
            }
            Request::FindAds { key } => {
                let local = self.read_local();
                let reg = self.read_registry();
                Response::Ads(
                    local
                        .iter()
                        .filter(|(id, a)| {
                            dht::keys_for(id.as_str(), &a.handle, &a.capabilities).contains(&key)
                        })
                        .filter_map(|(id, _)| reg.get(id).map(|e| e.ad.clone()))
                        .take(MAX_ADS_PER_FRAME)
                        .collect(),
                )
            }
            Request::Deliver { .. } | Request::Receipts { .. } => Response::Error {
                message: "not a discovery request".into(),
            },
        }
    }
}
