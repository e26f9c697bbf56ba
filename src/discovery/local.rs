//! Agents registered on this node: their keys and what they advertise,
//! persisted so they survive restarts.

use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};

use crate::identity::{AgentId, IdMap};
use crate::store::{self, Store, tables::LOCAL_AGENTS};
use crate::wire::{self, Capability};

/// A local agent as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LocalAgent {
    /// Secret key seed; never leaves the node.
    pub secret: [u8; 32],
    /// Handle, unique on this node.
    pub handle: String,
    /// Description.
    pub description: String,
    /// Capabilities.
    pub capabilities: Vec<Capability>,
    /// Registration metadata as JSON text.
    pub metadata_json: String,
    /// Last sequence number issued.
    pub seq: u64,
    /// First registration, ms since the epoch.
    pub registered_at_ms: u64,
}

impl LocalAgent {
    /// The signing key.
    pub fn key(&self) -> SigningKey {
        SigningKey::from_bytes(&self.secret)
    }

    /// The agent's id.
    pub fn id(&self) -> AgentId {
        super::ad::agent_id_of(&self.key())
    }
}

/// Load every local agent.
pub fn load(store: &Store) -> Result<IdMap<LocalAgent>, store::Error> {
    let r = store.read()?;
    let t = r.open_table(LOCAL_AGENTS)?;
    let mut out = IdMap::default();
    for item in t.iter()? {
        let (_, v) = item?;
        let a: LocalAgent =
            wire::decode(v.value(), wire::MAX_FRAME_BYTES).map_err(|e| store::Error::Corrupt {
                table: "local_agents",
                reason: e.to_string(),
            })?;
        out.insert(a.id(), a);
    }
    Ok(out)
}

/// Write (insert or replace) a local agent inside a transaction.
pub fn put(txn: &store::Tx<'_>, a: &LocalAgent) -> Result<(), store::Error> {
    txn.open_table(LOCAL_AGENTS)?
        .insert(a.id().as_str(), wire::encode(a).as_slice())?;
    Ok(())
}

/// Remove a local agent inside a transaction.
pub fn remove(txn: &store::Tx<'_>, id: &AgentId) -> Result<(), store::Error> {
    txn.open_table(LOCAL_AGENTS)?.remove(id.as_str())?;
    Ok(())
}
