//! Which idle connections to close: plain data, no I/O.
//!
//! libp2p's idle timeout cannot do this job here. Gossipsub holds a stream
//! open on every connection to a peer that speaks it, and the swarm counts
//! open streams as activity, so a connection between two nodes never idles
//! out once it exists. Deliveries to random recipients, DHT queries and
//! anti-entropy touch ever more pairs, and a mesh of n nodes drifts to n²
//! connections (measured: 146 of 149 peers connected on average at 150
//! nodes), each polled, pinged and gossiped to.
//!
//! [`Activity`] remembers when each connected peer last exchanged a request
//! or response with us. [`Activity::idle_peers`] names the ones to close:
//! connections we opened (the dialer closes, the listener never does: a
//! connection is not torn down from both ends at once, and a peer's
//! bootstrap link to us is its to keep), idle longer than the timeout, not
//! kept for another reason (gossipsub mesh, our bootstrap peers, requests
//! in flight), oldest first, and never so many that fewer than `floor`
//! peers stay connected: gossipsub grafts replacements for lost mesh
//! neighbours only from connected peers.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;

#[derive(Debug, Clone, Copy)]
struct Seen {
    /// Last request or response exchanged (or the connection's start).
    at: Instant,
    /// We dialled at least one of the connections to this peer.
    dialer: bool,
}

/// Last activity of each connected peer.
#[derive(Debug, Default)]
pub struct Activity {
    peers: HashMap<PeerId, Seen>,
}

impl Activity {
    /// A connection to `peer` was established (`dialer`: we dialled it).
    pub fn connected(&mut self, peer: PeerId, dialer: bool, now: Instant) {
        let e = self.peers.entry(peer).or_insert(Seen { at: now, dialer });
        e.at = now;
        e.dialer |= dialer;
    }

    /// The last connection to `peer` closed.
    pub fn disconnected(&mut self, peer: &PeerId) {
        self.peers.remove(peer);
    }

    /// A request or response to or from `peer`.
    pub fn touch(&mut self, peer: &PeerId, now: Instant) {
        if let Some(e) = self.peers.get_mut(peer) {
            e.at = now;
        }
    }

    /// Peers whose connections should close now, oldest activity first.
    /// `keep(peer)` exempts a peer whatever its idleness.
    pub fn idle_peers(
        &self,
        now: Instant,
        timeout: Duration,
        floor: usize,
        keep: impl Fn(&PeerId) -> bool,
    ) -> Vec<PeerId> {
        let budget = self.peers.len().saturating_sub(floor);
        if budget == 0 {
            return Vec::new();
        }
        let mut idle: Vec<(Instant, PeerId)> = self
            .peers
            .iter()
            .filter(|(_, s)| s.dialer && now.saturating_duration_since(s.at) >= timeout)
            .filter(|(p, _)| !keep(p))
            .map(|(p, s)| (s.at, *p))
            .collect();
        idle.sort_unstable();
        idle.truncate(budget);
        idle.into_iter().map(|(_, p)| p).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(60);

    fn peers(n: usize) -> Vec<PeerId> {
        (0..n).map(|_| PeerId::random()).collect()
    }

    #[test]
    fn only_peers_idle_past_the_timeout_are_named_oldest_first() {
        let t0 = Instant::now();
        let p = peers(3);
        let mut a = Activity::default();
        a.connected(p[0], true, t0);
        a.connected(p[1], true, t0 + Duration::from_secs(10));
        a.connected(p[2], true, t0 + Duration::from_secs(5));
        assert!(a.idle_peers(t0 + T, T, 0, |_| false).len() == 1);
        assert_eq!(
            a.idle_peers(t0 + T + Duration::from_secs(10), T, 0, |_| false),
            vec![p[0], p[2], p[1]]
        );
    }

    #[test]
    fn activity_postpones_closing() {
        let t0 = Instant::now();
        let p = peers(1);
        let mut a = Activity::default();
        a.connected(p[0], true, t0);
        a.touch(&p[0], t0 + Duration::from_secs(50));
        assert!(a.idle_peers(t0 + T, T, 0, |_| false).is_empty());
        assert_eq!(
            a.idle_peers(t0 + Duration::from_secs(110), T, 0, |_| false),
            p
        );
    }

    #[test]
    fn connections_peers_opened_are_theirs_to_close() {
        let t0 = Instant::now();
        let p = peers(2);
        let mut a = Activity::default();
        a.connected(p[0], false, t0);
        a.connected(p[1], true, t0);
        assert_eq!(a.idle_peers(t0 + 10 * T, T, 0, |_| false), vec![p[1]]);
        // A second connection that we dialled makes us a dialer.
        a.connected(p[0], true, t0);
        assert_eq!(a.idle_peers(t0 + T, T, 0, |_| false).len(), 2);
    }

    #[test]
    fn the_floor_and_keep_are_respected() {
        let t0 = Instant::now();
        let p = peers(5);
        let mut a = Activity::default();
        for (i, peer) in p.iter().enumerate() {
            a.connected(*peer, true, t0 + Duration::from_secs(i as u64));
        }
        let late = t0 + 3 * T;
        // Five connected, floor three: at most two close, the oldest.
        assert_eq!(a.idle_peers(late, T, 3, |_| false), vec![p[0], p[1]]);
        // Kept peers are skipped, the next oldest go instead.
        assert_eq!(a.idle_peers(late, T, 3, |q| *q == p[0]), vec![p[1], p[2]]);
        assert!(a.idle_peers(late, T, 5, |_| false).is_empty());
        a.disconnected(&p[0]);
        assert_eq!(a.idle_peers(late, T, 3, |_| false), vec![p[1]]);
    }

    #[test]
    fn unknown_peers_are_ignored() {
        let t0 = Instant::now();
        let mut a = Activity::default();
        a.touch(&PeerId::random(), t0);
        a.disconnected(&PeerId::random());
        assert!(a.idle_peers(t0 + 3 * T, T, 0, |_| false).is_empty());
    }
}
