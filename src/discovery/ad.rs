//! Building, signing and verifying advertisements, and the limits that keep
//! them small. Verification runs on every ad received, before it is stored
//! or forwarded.

use ed25519_dalek::SigningKey;

use crate::identity::{self, AgentId, NodeKey};
use crate::wire::{self, AdBody, Capability, SignedAd};

/// Most capabilities per agent.
pub const MAX_CAPABILITIES: usize = 64;
/// Most tags per capability.
pub const MAX_TAGS: usize = 32;
/// Longest capability name.
pub const MAX_NAME_LEN: usize = 128;
/// Longest tag.
pub const MAX_TAG_LEN: usize = 64;
/// Longest description (agent or capability).
pub const MAX_DESCRIPTION_LEN: usize = 2048;
/// Largest metadata JSON.
pub const MAX_METADATA_LEN: usize = 8 * 1024;
/// Most node addresses carried.
pub const MAX_ADDRS: usize = 8;
/// How far in the future an ad's issue time may be (clock skew).
pub const MAX_CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;
/// Longest accepted TTL.
pub const MAX_TTL_SECS: u32 = 7 * 24 * 3600;

/// Why an ad or a registration is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdError {
    /// Handle syntax.
    #[error("invalid handle {0:?}: must match [a-z0-9][a-z0-9_-]{{0,62}}")]
    BadHandle(String),
    /// A capability field is invalid.
    #[error("invalid capability: {0}")]
    BadCapability(String),
    /// A size limit was exceeded.
    #[error("{0}")]
    TooLarge(String),
    /// The node key does not match the node id.
    #[error("node key does not belong to node {0}")]
    NodeMismatch(String),
    /// The agent's signature is wrong.
    #[error("agent signature does not verify")]
    BadAgentSignature,
    /// The node's signature is wrong.
    #[error("node signature does not verify")]
    BadNodeSignature,
    /// Past its TTL.
    #[error("advertisement expired")]
    Expired,
    /// Issued too far in the future.
    #[error("advertisement issued in the future (clock skew over {MAX_CLOCK_SKEW_MS} ms)")]
    FromTheFuture,
}

/// Check a handle: `[a-z0-9][a-z0-9_-]{0,62}`.
pub fn validate_handle(h: &str) -> Result<(), AdError> {
    let b = h.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-');
    if ok {
        Ok(())
    } else {
        Err(AdError::BadHandle(h.chars().take(80).collect()))
    }
}

/// Check a capability name: `/`-separated segments of `[a-z0-9._-]`.
pub fn validate_capability_name(name: &str) -> Result<(), AdError> {
    let bad = |why: &str| {
        AdError::BadCapability(format!(
            "name {:?} {why}",
            name.chars().take(80).collect::<String>()
        ))
    };
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(bad(&format!("must be 1 to {MAX_NAME_LEN} characters")));
    }
    for seg in name.split('/') {
        if seg.is_empty() {
            return Err(bad("has an empty segment"));
        }
        if !seg.bytes().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-')
        }) {
            return Err(bad("may only use a-z, 0-9, '.', '_', '-' and '/'"));
        }
    }
    Ok(())
}

/// Check everything an agent states about itself.
pub fn validate_agent_fields(
    description: &str,
    capabilities: &[Capability],
    metadata_json: &str,
) -> Result<(), AdError> {
    if description.len() > MAX_DESCRIPTION_LEN {
        return Err(AdError::TooLarge(format!(
            "description is {} bytes; the limit is {MAX_DESCRIPTION_LEN}",
            description.len()
        )));
    }
    if metadata_json.len() > MAX_METADATA_LEN {
        return Err(AdError::TooLarge(format!(
            "metadata is {} bytes; the limit is {MAX_METADATA_LEN}",
            metadata_json.len()
        )));
    }
    if capabilities.len() > MAX_CAPABILITIES {
        return Err(AdError::TooLarge(format!(
            "{} capabilities; the limit is {MAX_CAPABILITIES}",
            capabilities.len()
        )));
    }
    for c in capabilities {
        validate_capability_name(&c.name)?;
        if c.description.len() > MAX_DESCRIPTION_LEN {
            return Err(AdError::TooLarge(format!(
                "description of capability {} exceeds {MAX_DESCRIPTION_LEN} bytes",
                c.name
            )));
        }
        if c.tags.len() > MAX_TAGS {
            return Err(AdError::TooLarge(format!(
                "capability {} has over {MAX_TAGS} tags",
                c.name
            )));
        }
        for t in &c.tags {
            if t.is_empty()
                || t.len() > MAX_TAG_LEN
                || t.chars().any(|ch| ch.is_whitespace() || ch.is_control())
            {
                return Err(AdError::BadCapability(format!(
                    "tag {t:?} of {} must be 1 to {MAX_TAG_LEN} characters without spaces",
                    c.name
                )));
            }
        }
        if let Some(v) = &c.version
            && semver::Version::parse(v).is_err()
        {
            return Err(AdError::BadCapability(format!(
                "version {v:?} of {} is not a semver version like 1.2.0",
                c.name
            )));
        }
    }
    Ok(())
}

/// Sign a body with the agent's and the node's keys.
pub fn sign(body: AdBody, agent: &SigningKey, node: &NodeKey) -> SignedAd {
    let agent_sig = identity::sign(agent, &wire::signing_bytes("ad/agent", &body)).to_vec();
    let node_sig = node.sign(&wire::signing_bytes("ad/node", &body)).to_vec();
    SignedAd {
        body,
        agent_sig,
        node_sig,
    }
}

/// Verify an ad received from anywhere, at time `now_ms`.
pub fn verify(ad: &SignedAd, now_ms: u64) -> Result<(), AdError> {
    let b = &ad.body;
    validate_handle(&b.handle)?;
    validate_agent_fields(&b.description, &b.capabilities, &b.metadata_json)?;
    if b.node_addrs.len() > MAX_ADDRS {
        return Err(AdError::TooLarge(format!(
            "over {MAX_ADDRS} node addresses"
        )));
    }
    if b.ttl_secs == 0 || b.ttl_secs > MAX_TTL_SECS {
        return Err(AdError::TooLarge(format!(
            "ttl {} outside 1..={MAX_TTL_SECS}",
            b.ttl_secs
        )));
    }
    // Cheap checks first: an expired or future ad costs no signature check.
    if b.issued_at_ms > now_ms.saturating_add(MAX_CLOCK_SKEW_MS) {
        return Err(AdError::FromTheFuture);
    }
    if ad.expires_at_ms() <= now_ms {
        return Err(AdError::Expired);
    }
    let node_peer =
        identity::peer_id_of(&b.node_key).map_err(|_| AdError::NodeMismatch(b.node_id.clone()))?;
    if node_peer.to_string() != b.node_id {
        return Err(AdError::NodeMismatch(b.node_id.clone()));
    }
    let sig = |v: &[u8]| <[u8; 64]>::try_from(v).ok();
    let agent_sig = sig(&ad.agent_sig).ok_or(AdError::BadAgentSignature)?;
    identity::verify(
        &b.agent_id
            .public_key()
            .map_err(|_| AdError::BadAgentSignature)?,
        &wire::signing_bytes("ad/agent", b),
        &agent_sig,
    )
    .map_err(|_| AdError::BadAgentSignature)?;
    let node_sig = sig(&ad.node_sig).ok_or(AdError::BadNodeSignature)?;
    identity::verify(&b.node_key, &wire::signing_bytes("ad/node", b), &node_sig)
        .map_err(|_| AdError::BadNodeSignature)?;
    let size = wire::encode(ad).len();
    if size > wire::ad::MAX_AD_BYTES {
        return Err(AdError::TooLarge(format!(
            "ad is {size} bytes; the limit is {}",
            wire::ad::MAX_AD_BYTES
        )));
    }
    Ok(())
}

/// The id of an agent key.
pub fn agent_id_of(key: &SigningKey) -> AgentId {
    AgentId::from_public(&key.verifying_key().to_bytes())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::identity::generate_key;
    use crate::wire::AdState;

    pub(crate) fn sample(
        agent: &SigningKey,
        node: &NodeKey,
        handle: &str,
        seq: u64,
        now: u64,
    ) -> SignedAd {
        let body = AdBody {
            agent_id: agent_id_of(agent),
            handle: handle.into(),
            node_id: node.peer_id().to_string(),
            node_key: node.public_bytes(),
            node_addrs: vec!["/ip4/127.0.0.1/tcp/1".into()],
            description: "test agent".into(),
            capabilities: vec![Capability {
                name: "summarize".into(),
                description: "condenses text".into(),
                tags: vec!["en".into()],
                version: Some("1.0.0".into()),
            }],
            metadata_json: "{}".into(),
            seq,
            issued_at_ms: now,
            ttl_secs: 60,
            state: AdState::Active,
        };
        sign(body, agent, node)
    }

    #[test]
    fn signed_ad_verifies() {
        let (a, n) = (generate_key().unwrap(), NodeKey::generate().unwrap());
        verify(&sample(&a, &n, "bob", 1, 1000), 1000).unwrap();
    }

    #[test]
    fn tampering_is_detected() {
        let (a, n) = (generate_key().unwrap(), NodeKey::generate().unwrap());
        let mut ad = sample(&a, &n, "bob", 1, 1000);
        ad.body.description = "evil".into();
        assert_eq!(verify(&ad, 1000), Err(AdError::BadAgentSignature));
    }

    #[test]
    fn another_nodes_agent_cannot_be_claimed() {
        let (a, n, thief) = (
            generate_key().unwrap(),
            NodeKey::generate().unwrap(),
            NodeKey::generate().unwrap(),
        );
        // The thief re-signs the agent's body with itself as the node: the
        // agent's signature no longer covers it.
        let mut ad = sample(&a, &n, "bob", 1, 1000);
        ad.body.node_id = thief.peer_id().to_string();
        ad.body.node_key = thief.public_bytes();
        ad.node_sig = thief
            .sign(&wire::signing_bytes("ad/node", &ad.body))
            .to_vec();
        assert_eq!(verify(&ad, 1000), Err(AdError::BadAgentSignature));
        // A node claiming its own agent lives on another node: node key mismatch
        // or a node signature it cannot make.
        let own = generate_key().unwrap();
        let mut ad = sample(&own, &thief, "mallory", 1, 1000);
        ad.body.node_id = n.peer_id().to_string();
        let ad = sign(ad.body, &own, &thief);
        assert!(matches!(verify(&ad, 1000), Err(AdError::NodeMismatch(_))));
        let mut body = ad.body.clone();
        body.node_key = n.public_bytes();
        let ad = sign(body, &own, &thief);
        assert_eq!(verify(&ad, 1000), Err(AdError::BadNodeSignature));
    }

    #[test]
    fn expiry_and_skew() {
        let (a, n) = (generate_key().unwrap(), NodeKey::generate().unwrap());
        let ad = sample(&a, &n, "bob", 1, 1000);
        assert_eq!(verify(&ad, 1000 + 60_000), Err(AdError::Expired));
        let ad = sample(&a, &n, "bob", 1, 10_000_000);
        assert_eq!(verify(&ad, 1000), Err(AdError::FromTheFuture));
    }

    #[test]
    fn handles_and_names() {
        for ok in ["bob", "a", "r2-d2_x", "0day"] {
            validate_handle(ok).unwrap();
        }
        for bad in ["", "Bob", "-x", "_x", "a b", &"x".repeat(64), "é"] {
            assert!(validate_handle(bad).is_err(), "{bad}");
        }
        validate_capability_name("translate/fr-en").unwrap();
        validate_capability_name("code/review/rust1.2").unwrap();
        for bad in ["", "a//b", "/a", "a/", "A", "a b", "tr*"] {
            assert!(validate_capability_name(bad).is_err(), "{bad}");
        }
    }
}
