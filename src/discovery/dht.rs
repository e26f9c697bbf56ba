//! Kademlia provider keys: which keys a node announces for its agents, and
//! which key answers a query that missed the local registry.

use crate::wire::Capability;

/// Provider keys for an agent: its handle, its id, each capability name,
/// each name prefix (for `prefix/*` queries) and each tag.
pub fn keys_for(agent_id: &str, handle: &str, caps: &[Capability]) -> Vec<String> {
    let mut keys = vec![format!("handle/{handle}"), format!("agent/{agent_id}")];
    for c in caps {
        keys.push(format!("cap/{}", c.name));
        let segs: Vec<&str> = c.name.split('/').collect();
        for i in 1..segs.len() {
            keys.push(format!("capprefix/{}", segs[..i].join("/")));
        }
        for t in &c.tags {
            keys.push(format!("tag/{}", t.to_lowercase()));
        }
    }
    keys.sort();
    keys.dedup();
    keys
}

/// The one key to ask the DHT for, given what a query names.
pub fn key_for_query(
    handle: Option<&str>,
    agent_id: Option<&str>,
    capability: Option<&super::matching::NamePattern>,
    tags: &[String],
) -> Option<String> {
    use super::matching::NamePattern;
    if let Some(h) = handle {
        return Some(format!("handle/{h}"));
    }
    if let Some(a) = agent_id {
        return Some(format!("agent/{a}"));
    }
    match capability {
        Some(NamePattern::Exact(n)) => return Some(format!("cap/{n}")),
        Some(NamePattern::Prefix(p)) if !p.is_empty() => {
            return Some(format!("capprefix/{}", p.trim_end_matches('/')));
        }
        _ => {}
    }
    tags.first().map(|t| format!("tag/{}", t.to_lowercase()))
}

/// The DHT record key bytes of a key string (namespaced so meshes differ
/// even if they shared a DHT).
pub fn record_key(mesh: &str, key: &str) -> Vec<u8> {
    format!("agentmesh/{mesh}/{key}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cover_names_prefixes_and_tags() {
        let caps = vec![Capability {
            name: "code/review/rust".into(),
            description: String::new(),
            tags: vec!["Fast".into()],
            version: None,
        }];
        let keys = keys_for("agt_x", "bob", &caps);
        for k in [
            "handle/bob",
            "agent/agt_x",
            "cap/code/review/rust",
            "capprefix/code",
            "capprefix/code/review",
            "tag/fast",
        ] {
            assert!(keys.contains(&k.to_string()), "{k} missing from {keys:?}");
        }
    }
}
