//! Requests and responses of our one request-response protocol. Each
//! top-level frame is a versioned `Request` or `Response` (see `wire`).

use serde::{Deserialize, Serialize};

use super::ad::SignedAd;
use crate::identity::AgentId;

/// Most ads in one response or push.
pub const MAX_ADS_PER_FRAME: usize = 512;

/// A request to a peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Anti-entropy, step 1: "this is my registry digest".
    SyncDigest {
        /// Hash of the sender's sorted `(agent_id, seq)` pairs.
        digest: [u8; 32],
        /// Entries behind the digest.
        count: u32,
    },
    /// Ask for these ads.
    FetchAds {
        /// Agents wanted.
        ids: Vec<AgentId>,
    },
    /// Offer ads the receiver lacks (it verifies each).
    PushAds {
        /// The ads.
        ads: Vec<SignedAd>,
    },
    /// DHT fallback: ads of the receiver's local agents behind a provider key.
    FindAds {
        /// The DHT key (e.g. `cap/translate/fr-en`).
        key: String,
    },
    /// A batch of messages: `payload` is an encoded `DeliverPayload`,
    /// `sig` the sending node's signature over `digest_signing_bytes("deliver.b3", payload)` (BLAKE3 digest).
    Deliver {
        /// Encoded `DeliverPayload`.
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
        /// Node signature.
        #[serde(with = "serde_bytes")]
        sig: Vec<u8>,
    },
    /// A batch of receipts: `payload` is an encoded `ReceiptPayload`.
    Receipts {
        /// Encoded `ReceiptPayload`.
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
        /// Node signature over `digest_signing_bytes("receipts.b3", payload)`.
        #[serde(with = "serde_bytes")]
        sig: Vec<u8>,
    },
}

/// A response to a `Request`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// Answer to `SyncDigest`: `None` when the digests match, else the
    /// responder's `(agent_id, seq)` summary.
    Summary(Option<Vec<(AgentId, u64)>>),
    /// Ads.
    Ads(Vec<SignedAd>),
    /// Done.
    Ack,
    /// Per-message outcomes of a `Deliver`, in the batch's order.
    Delivered(Vec<super::envelope::Outcome>),
    /// The request was refused.
    Error {
        /// What went wrong.
        message: String,
    },
}
