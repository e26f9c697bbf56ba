//! The node's view of every known agent: pure data, no I/O. Newer `seq`
//! wins; entries leave when their TTL (counted from the origin's issue
//! time, so re-gossiping never extends a life) runs out.

use std::collections::{BTreeSet, HashMap};

use sha2::{Digest, Sha256};

use crate::identity::{AgentId, IdMap};
use crate::wire::{AdState, SignedAd};

/// One known agent.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Its latest verified ad.
    pub ad: SignedAd,
    /// When this node received that ad, ms since the epoch.
    pub received_at_ms: u64,
    /// Registered on this node.
    pub local: bool,
    /// The hosting node's id, parsed once (the ad carries it as text).
    pub node: Option<libp2p::PeerId>,
    /// The hosting node's addresses, parsed once.
    pub addrs: Vec<libp2p::Multiaddr>,
}

impl Entry {
    /// Whether the agent is registered and reachable (not offline or withdrawn).
    pub fn is_active(&self) -> bool {
        self.ad.body.state == AdState::Active
    }
}

/// What applying an ad did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// A new agent.
    New,
    /// A newer ad of a known agent.
    Updated,
    /// Not newer than what we have: ignored.
    Stale,
}

/// All known agents.
#[derive(Debug, Default)]
pub struct Registry {
    by_id: IdMap<Entry>,
    by_handle: HashMap<String, BTreeSet<AgentId>>,
    /// XOR of [`entry_hash`] over all entries, kept up to date on every
    /// change: anti-entropy compares it on each round, and recomputing it
    /// (clone, sort and hash every id) was a visible cost at 300 nodes.
    digest: [u8; 32],
}

impl Registry {
    /// Whether an ad of `id` with `seq` would be ignored (we hold one at
    /// least as new): such ads need no signature check at all.
    pub fn is_stale(&self, id: &AgentId, seq: u64) -> bool {
        self.by_id.get(id).is_some_and(|e| e.ad.body.seq >= seq)
    }

    /// Apply a verified ad.
    pub fn apply(&mut self, ad: SignedAd, now_ms: u64, local: bool) -> Applied {
        let id = ad.body.agent_id.clone();
        let outcome = match self.by_id.get(&id) {
            Some(e) if e.ad.body.seq >= ad.body.seq => return Applied::Stale,
            Some(_) => Applied::Updated,
            None => Applied::New,
        };
        if let Some(old) = self.by_id.get(&id)
            && old.ad.body.handle != ad.body.handle
        {
            let h = old.ad.body.handle.clone();
            self.unindex(&h, &id);
        }
        self.by_handle
            .entry(ad.body.handle.clone())
            .or_default()
            .insert(id.clone());
        if let Some(old) = self.by_id.get(&id) {
            xor_into(&mut self.digest, &entry_hash(&id, old.ad.body.seq));
        }
        xor_into(&mut self.digest, &entry_hash(&id, ad.body.seq));
        let local = local || self.by_id.get(&id).is_some_and(|e| e.local);
        let node = ad.body.node_id.parse().ok();
        let addrs = ad
            .body
            .node_addrs
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        self.by_id.insert(
            id,
            Entry {
                ad,
                received_at_ms: now_ms,
                local,
                node,
                addrs,
            },
        );
        outcome
    }

    fn unindex(&mut self, handle: &str, id: &AgentId) {
        if let Some(set) = self.by_handle.get_mut(handle) {
            set.remove(id);
            if set.is_empty() {
                self.by_handle.remove(handle);
            }
        }
    }

    /// Forget an agent.
    pub fn remove(&mut self, id: &AgentId) -> Option<Entry> {
        let e = self.by_id.remove(id)?;
        xor_into(&mut self.digest, &entry_hash(id, e.ad.body.seq));
        let h = e.ad.body.handle.clone();
        self.unindex(&h, id);
        Some(e)
    }

    /// Drop entries whose TTL has run out; returns their ids.
    pub fn expire(&mut self, now_ms: u64) -> Vec<AgentId> {
        let gone: Vec<AgentId> = self
            .by_id
            .values()
            .filter(|e| e.ad.expires_at_ms() <= now_ms)
            .map(|e| e.ad.body.agent_id.clone())
            .collect();
        for id in &gone {
            self.remove(id);
        }
        gone
    }

    /// Earliest expiry, ms since the epoch.
    pub fn next_expiry(&self) -> Option<u64> {
        self.by_id.values().map(|e| e.ad.expires_at_ms()).min()
    }

    /// One agent, in any state.
    pub fn get(&self, id: &AgentId) -> Option<&Entry> {
        self.by_id.get(id)
    }

    /// [`Registry::get`] by the id's text (a borrowed wire field).
    pub fn get_str(&self, id: &str) -> Option<&Entry> {
        self.by_id.get(id)
    }

    /// Every entry, tombstones included.
    pub fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.by_id.values()
    }

    /// Entries of active agents.
    pub fn active(&self) -> impl Iterator<Item = &Entry> {
        self.by_id.values().filter(|e| e.is_active())
    }

    /// Entries with this handle, in any state, ordered by agent id.
    pub fn with_handle(&self, handle: &str) -> Vec<&Entry> {
        self.by_handle
            .get(handle)
            .map(|ids| ids.iter().filter_map(|id| self.by_id.get(id)).collect())
            .unwrap_or_default()
    }

    /// Number of entries (tombstones included).
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Sorted `(agent_id, seq)` of every entry.
    pub fn summary(&self) -> Vec<(AgentId, u64)> {
        let mut v: Vec<(AgentId, u64)> = self
            .by_id
            .values()
            .map(|e| (e.ad.body.agent_id.clone(), e.ad.body.seq))
            .collect();
        v.sort();
        v
    }

    /// Digest of the `(agent, seq)` set: equal digests mean equal views.
    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }

    /// Agents in `theirs` that are unknown here or newer there.
    pub fn wanted(&self, theirs: &[(AgentId, u64)]) -> Vec<AgentId> {
        theirs
            .iter()
            .filter(|(id, seq)| self.by_id.get(id).is_none_or(|e| e.ad.body.seq < *seq))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Our entries that `theirs` lacks or has older versions of.
    pub fn offered(&self, theirs: &[(AgentId, u64)]) -> Vec<&SignedAd> {
        let map: HashMap<&AgentId, u64> = theirs.iter().map(|(id, s)| (id, *s)).collect();
        self.by_id
            .values()
            .filter(|e| {
                map.get(&e.ad.body.agent_id)
                    .is_none_or(|s| *s < e.ad.body.seq)
            })
            .map(|e| &e.ad)
            .collect()
    }
}

/// Digest of a summary, as [`Registry::digest`] computes it: the XOR of
/// each entry's hash, so it can be updated entry by entry and does not
/// depend on order.
pub fn digest_of(summary: &[(AgentId, u64)]) -> [u8; 32] {
    let mut d = [0u8; 32];
    for (id, seq) in summary {
        xor_into(&mut d, &entry_hash(id, *seq));
    }
    d
}

/// Hash of one registry entry: SHA-256 over the id, a separator and the seq.
fn entry_hash(id: &AgentId, seq: u64) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(id.as_str().as_bytes());
    h.update([0u8]);
    h.update(seq.to_le_bytes());
    h.finalize().into()
}

fn xor_into(acc: &mut [u8; 32], x: &[u8; 32]) {
    for (a, b) in acc.iter_mut().zip(x) {
        *a ^= b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::ad::tests::sample;
    use crate::identity::{NodeKey, generate_key};

    #[test]
    fn newer_seq_wins_and_stale_is_ignored() {
        let (a, n) = (generate_key().unwrap(), NodeKey::generate().unwrap());
        let mut r = Registry::default();
        assert_eq!(
            r.apply(sample(&a, &n, "bob", 5, 1000), 1000, false),
            Applied::New
        );
        assert_eq!(
            r.apply(sample(&a, &n, "bob", 5, 1000), 1000, false),
            Applied::Stale
        );
        assert_eq!(
            r.apply(sample(&a, &n, "bob", 4, 1000), 1000, false),
            Applied::Stale
        );
        assert_eq!(
            r.apply(sample(&a, &n, "robert", 6, 1000), 1000, false),
            Applied::Updated
        );
        assert!(r.with_handle("bob").is_empty());
        assert_eq!(r.with_handle("robert").len(), 1);
    }

    #[test]
    fn expiry_counts_from_issue_time() {
        let (a, n) = (generate_key().unwrap(), NodeKey::generate().unwrap());
        let mut r = Registry::default();
        r.apply(sample(&a, &n, "bob", 1, 1000), 50_000, false);
        assert!(r.expire(60_999).is_empty());
        assert_eq!(r.expire(61_000).len(), 1);
        assert!(r.is_empty());
        assert!(r.with_handle("bob").is_empty());
    }

    #[test]
    fn the_kept_digest_matches_the_summary_through_every_change() {
        let n = NodeKey::generate().unwrap();
        let (a, b) = (generate_key().unwrap(), generate_key().unwrap());
        let mut r = Registry::default();
        let check = |r: &Registry| assert_eq!(r.digest(), digest_of(&r.summary()));
        check(&r);
        r.apply(sample(&a, &n, "a", 1, 1000), 1000, false);
        check(&r);
        let one = r.digest();
        r.apply(sample(&b, &n, "b", 1, 1000), 1000, false);
        check(&r);
        r.apply(sample(&a, &n, "a2", 2, 1000), 1000, false);
        check(&r);
        r.apply(sample(&a, &n, "a", 1, 1000), 1000, false); // stale: no change
        check(&r);
        let id_b = r.with_handle("b")[0].ad.body.agent_id.clone();
        r.remove(&id_b);
        check(&r);
        assert_ne!(r.digest(), one, "a's seq moved on");
        assert_eq!(r.expire(u64::MAX).len(), 1);
        assert_eq!(r.digest(), [0u8; 32], "the empty set");
    }

    #[test]
    fn anti_entropy_sets() {
        let n = NodeKey::generate().unwrap();
        let (a, b, c) = (
            generate_key().unwrap(),
            generate_key().unwrap(),
            generate_key().unwrap(),
        );
        let mut mine = Registry::default();
        let mut theirs = Registry::default();
        mine.apply(sample(&a, &n, "a", 1, 1000), 1000, false);
        mine.apply(sample(&b, &n, "b", 2, 1000), 1000, false);
        theirs.apply(sample(&b, &n, "b", 3, 1000), 1000, false);
        theirs.apply(sample(&c, &n, "c", 1, 1000), 1000, false);
        assert_ne!(mine.digest(), theirs.digest());
        let mut wanted = mine.wanted(&theirs.summary());
        wanted.sort();
        let mut expect = vec![theirs.summary()[0].0.clone(), theirs.summary()[1].0.clone()];
        expect.sort();
        assert_eq!(wanted, expect, "b is newer there and c is unknown here");
        let offered = mine.offered(&theirs.summary());
        assert_eq!(offered.len(), 1);
        assert_eq!(offered[0].body.handle, "a");
        for ad in theirs
            .offered(&mine.summary())
            .into_iter()
            .cloned()
            .collect::<Vec<_>>()
        {
            mine.apply(ad, 1000, false);
        }
        for ad in mine
            .offered(&theirs.summary())
            .into_iter()
            .cloned()
            .collect::<Vec<_>>()
        {
            theirs.apply(ad, 1000, false);
        }
        assert_eq!(mine.digest(), theirs.digest());
    }
}
