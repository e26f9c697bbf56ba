//! Agent advertisements as they travel: the signed body and its two
//! signatures (the agent's and its node's).

use serde::{Deserialize, Serialize};

use crate::identity::AgentId;

/// Largest encoded advertisement accepted.
pub const MAX_AD_BYTES: usize = 32 * 1024;

/// One capability an agent offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capability {
    /// `/`-separated name, e.g. `translate/fr-en`.
    pub name: String,
    /// What it does, in words (searched by free-text queries).
    pub description: String,
    /// Short labels; queries may require all of some tags.
    pub tags: Vec<String>,
    /// Semver version, when the agent states one.
    pub version: Option<String>,
}

/// Lifecycle of an advertisement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdState {
    /// The agent is registered and reachable through its node.
    Active,
    /// The node shut down gracefully; the agent is expected back and
    /// messages addressed to it directly are queued.
    Offline,
    /// The agent was deleted: a signed tombstone.
    Withdrawn,
}

/// The signed part of an advertisement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdBody {
    /// The agent (its public key).
    pub agent_id: AgentId,
    /// Human-friendly handle, unique per node.
    pub handle: String,
    /// PeerId (string form) of the node hosting the agent.
    pub node_id: String,
    /// The node's ed25519 public key; must hash to `node_id`.
    pub node_key: [u8; 32],
    /// Where the node can be dialled.
    pub node_addrs: Vec<String>,
    /// What the agent is, in words.
    pub description: String,
    /// What it offers.
    pub capabilities: Vec<Capability>,
    /// Opaque JSON metadata supplied at registration.
    pub metadata_json: String,
    /// Higher wins; monotonic per agent across restarts.
    pub seq: u64,
    /// Issue time at the origin, ms since the epoch.
    pub issued_at_ms: u64,
    /// Lifetime from `issued_at_ms`.
    pub ttl_secs: u32,
    /// Active, offline or withdrawn.
    pub state: AdState,
}

/// An advertisement with its signatures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedAd {
    /// The content.
    pub body: AdBody,
    /// Agent's signature over `signing_bytes("ad/agent", body)`.
    #[serde(with = "serde_bytes")]
    pub agent_sig: Vec<u8>,
    /// Node's signature over `signing_bytes("ad/node", body)`.
    #[serde(with = "serde_bytes")]
    pub node_sig: Vec<u8>,
}

impl SignedAd {
    /// When this ad stops being valid, ms since the epoch.
    pub fn expires_at_ms(&self) -> u64 {
        self.body
            .issued_at_ms
            .saturating_add(u64::from(self.body.ttl_secs) * 1000)
    }
}
