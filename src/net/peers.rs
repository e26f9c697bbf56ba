//! Peer bookkeeping and the bootstrap redial schedule: plain data, no I/O,
//! driven by the event loop and unit-tested here.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

use super::PeerInfo;

/// Addresses remembered per peer.
const MAX_ADDRS: usize = 8;
/// How long a peer of another mesh is ignored after we met it.
const FOREIGN_QUARANTINE: Duration = Duration::from_secs(600);
/// First bootstrap redial delay.
const BOOT_BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Largest bootstrap redial delay.
const BOOT_BACKOFF_MAX: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
struct Entry {
    addrs: Vec<Multiaddr>,
    connections: u32,
    identified: bool,
    rtt: Option<Duration>,
}

/// What identification of a peer means for the node.
#[derive(Debug, PartialEq, Eq)]
pub enum Identified {
    /// First identification of this connection session: announce the peer.
    New,
    /// Already announced.
    Known,
    /// The peer belongs to another mesh: disconnect and ignore it.
    Foreign,
}

/// Connected and recently known peers.
#[derive(Debug, Default)]
pub struct PeerTable {
    peers: HashMap<PeerId, Entry>,
    foreign: HashMap<PeerId, Instant>,
}

impl PeerTable {
    /// A connection was established.
    pub fn connected(&mut self, peer: PeerId) {
        self.peers.entry(peer).or_default().connections += 1;
    }

    /// A connection closed; returns true when it was the last one of an
    /// identified peer (the peer is now gone).
    pub fn disconnected(&mut self, peer: &PeerId, remaining: u32) -> bool {
        let Some(e) = self.peers.get_mut(peer) else {
            return false;
        };
        e.connections = remaining;
        if remaining == 0 && e.identified {
            e.identified = false;
            return true;
        }
        false
    }

    /// Identify told us the peer's mesh and addresses.
    pub fn identified(
        &mut self,
        peer: PeerId,
        same_mesh: bool,
        addrs: &[Multiaddr],
        now: Instant,
    ) -> Identified {
        if !same_mesh {
            self.peers.remove(&peer);
            self.foreign.insert(peer, now + FOREIGN_QUARANTINE);
            return Identified::Foreign;
        }
        self.foreign.remove(&peer);
        let e = self.peers.entry(peer).or_default();
        for a in addrs {
            remember(&mut e.addrs, a.clone());
        }
        if e.identified {
            Identified::Known
        } else {
            e.identified = true;
            Identified::New
        }
    }

    /// Whether a peer is one of another mesh that we ignore for now.
    pub fn is_foreign(&mut self, peer: &PeerId, now: Instant) -> bool {
        match self.foreign.get(peer) {
            Some(until) if *until > now => true,
            Some(_) => {
                self.foreign.remove(peer);
                false
            }
            None => false,
        }
    }

    /// Add an address for a peer.
    pub fn add_addr(&mut self, peer: PeerId, addr: Multiaddr) {
        remember(&mut self.peers.entry(peer).or_default().addrs, addr);
    }

    /// Record a ping.
    pub fn set_rtt(&mut self, peer: &PeerId, rtt: Duration) {
        if let Some(e) = self.peers.get_mut(peer) {
            e.rtt = Some(rtt);
        }
    }

    /// Snapshot for `/v1/peers`: our identified peers plus DHT routing
    /// entries (`routing`), sorted by peer id.
    pub fn snapshot(
        &self,
        routing: impl IntoIterator<Item = (PeerId, Vec<Multiaddr>)>,
    ) -> Vec<PeerInfo> {
        let mut out: HashMap<PeerId, PeerInfo> = HashMap::new();
        for (peer, e) in &self.peers {
            if !e.identified && e.connections == 0 {
                continue;
            }
            if !e.identified {
                // Connected but not (yet) confirmed to be of our mesh.
                continue;
            }
            out.insert(
                *peer,
                PeerInfo {
                    peer_id: *peer,
                    addrs: e.addrs.clone(),
                    connected: e.connections > 0,
                    rtt: e.rtt,
                },
            );
        }
        for (peer, addrs) in routing {
            if self.foreign.contains_key(&peer) {
                continue;
            }
            let info = out.entry(peer).or_insert_with(|| PeerInfo {
                peer_id: peer,
                addrs: Vec::new(),
                connected: false,
                rtt: None,
            });
            for a in addrs {
                let a = strip_p2p(a);
                if !info.addrs.contains(&a) {
                    info.addrs.push(a);
                }
            }
        }
        let mut v: Vec<PeerInfo> = out.into_values().collect();
        v.sort_by_key(|p| p.peer_id.to_string());
        v
    }
}

fn remember(list: &mut Vec<Multiaddr>, addr: Multiaddr) {
    let addr = strip_p2p(addr);
    if let Some(pos) = list.iter().position(|a| *a == addr) {
        list.remove(pos);
    }
    list.insert(0, addr);
    list.truncate(MAX_ADDRS);
}

/// The address without a trailing `/p2p/<peer>`.
pub fn strip_p2p(mut addr: Multiaddr) -> Multiaddr {
    if matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
        addr.pop();
    }
    addr
}

/// The peer id in a trailing `/p2p/<peer>`, if any.
pub fn p2p_of(addr: &Multiaddr) -> Option<PeerId> {
    match addr.iter().last() {
        Some(Protocol::P2p(p)) => Some(p),
        _ => None,
    }
}

#[derive(Debug, Clone, PartialEq)]
enum BootState {
    /// Waiting to dial at the given time.
    Waiting(Instant),
    /// A dial is under way.
    Dialing,
    /// Connected to this peer.
    Up(PeerId),
}

#[derive(Debug)]
struct BootEntry {
    addr: Multiaddr,
    state: BootState,
    backoff: Duration,
}

/// Bootstrap peers: dialled at start, redialled with exponential backoff
/// (and jitter) whenever we are not connected to them.
#[derive(Debug, Default)]
pub struct Bootstrap {
    entries: Vec<BootEntry>,
}

impl Bootstrap {
    /// Entries all due now.
    pub fn new(addrs: &[Multiaddr], now: Instant) -> Self {
        Bootstrap {
            entries: addrs
                .iter()
                .map(|a| BootEntry {
                    addr: a.clone(),
                    state: BootState::Waiting(now),
                    backoff: BOOT_BACKOFF_MIN,
                })
                .collect(),
        }
    }

    /// Entries whose dial is due: marked as dialling, returned with their index.
    pub fn due(&mut self, now: Instant) -> Vec<(usize, Multiaddr)> {
        let mut out = Vec::new();
        for (i, e) in self.entries.iter_mut().enumerate() {
            if matches!(e.state, BootState::Waiting(t) if t <= now) {
                e.state = BootState::Dialing;
                out.push((i, e.addr.clone()));
            }
        }
        out
    }

    /// A dial failed: wait `backoff * (1 + jitter)` and double the backoff.
    /// `jitter` is in `[0, 1)`.
    pub fn dial_failed(&mut self, idx: usize, now: Instant, jitter: f64) {
        if let Some(e) = self.entries.get_mut(idx) {
            let wait = e.backoff.mul_f64(1.0 + jitter.clamp(0.0, 1.0));
            e.state = BootState::Waiting(now + wait);
            e.backoff = (e.backoff * 2).min(BOOT_BACKOFF_MAX);
        }
    }

    /// A dial connected to `peer`.
    pub fn dial_succeeded(&mut self, idx: usize, peer: PeerId) {
        if let Some(e) = self.entries.get_mut(idx) {
            e.state = BootState::Up(peer);
            e.backoff = BOOT_BACKOFF_MIN;
        }
    }

    /// A peer went away: schedule redials of entries that pointed at it.
    pub fn peer_gone(&mut self, peer: &PeerId, now: Instant, jitter: f64) {
        for e in &mut self.entries {
            if e.state == BootState::Up(*peer) {
                let wait = e.backoff.mul_f64(1.0 + jitter.clamp(0.0, 1.0));
                e.state = BootState::Waiting(now + wait);
                e.backoff = (e.backoff * 2).min(BOOT_BACKOFF_MAX);
            }
        }
    }

    /// Peers we are connected to through a bootstrap entry.
    pub fn connected_peers(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.entries.iter().filter_map(|e| match e.state {
            BootState::Up(p) => Some(p),
            _ => None,
        })
    }

    /// Peer ids named in bootstrap addresses, with the address to use.
    pub fn named_peers(&self) -> Vec<(PeerId, Multiaddr)> {
        self.entries
            .iter()
            .filter_map(|e| p2p_of(&e.addr).map(|p| (p, strip_p2p(e.addr.clone()))))
            .collect()
    }

    /// Earliest time a dial is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.entries
            .iter()
            .filter_map(|e| match e.state {
                BootState::Waiting(t) => Some(t),
                _ => None,
            })
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerId {
        PeerId::random()
    }

    #[test]
    fn identify_announces_once_and_disconnect_once() {
        let mut t = PeerTable::default();
        let p = peer();
        let now = Instant::now();
        t.connected(p);
        assert_eq!(t.identified(p, true, &[], now), Identified::New);
        t.connected(p);
        assert_eq!(t.identified(p, true, &[], now), Identified::Known);
        assert!(!t.disconnected(&p, 1));
        assert!(t.disconnected(&p, 0));
        assert!(!t.disconnected(&p, 0));
    }

    #[test]
    fn foreign_peers_are_quarantined() {
        let mut t = PeerTable::default();
        let p = peer();
        let now = Instant::now();
        t.connected(p);
        assert_eq!(t.identified(p, false, &[], now), Identified::Foreign);
        assert!(t.is_foreign(&p, now));
        assert!(t.snapshot([(p, vec![])]).is_empty());
        assert!(!t.is_foreign(&p, now + FOREIGN_QUARANTINE + Duration::from_secs(1)));
    }

    #[test]
    fn bootstrap_backoff_doubles_and_resets() {
        let now = Instant::now();
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().unwrap();
        let mut b = Bootstrap::new(&[addr], now);
        assert_eq!(b.due(now).len(), 1);
        assert!(b.due(now).is_empty(), "dialling entries are not due again");
        b.dial_failed(0, now, 0.0);
        assert!(b.due(now).is_empty());
        assert_eq!(b.due(now + BOOT_BACKOFF_MIN).len(), 1);
        b.dial_failed(0, now, 0.0);
        assert!(b.due(now + BOOT_BACKOFF_MIN).is_empty());
        assert_eq!(b.due(now + BOOT_BACKOFF_MIN * 2).len(), 1);
        let p = peer();
        b.dial_succeeded(0, p);
        assert!(b.next_due().is_none());
        b.peer_gone(&p, now, 0.0);
        assert_eq!(b.due(now + BOOT_BACKOFF_MIN).len(), 1);
    }

    #[test]
    fn backoff_is_capped() {
        let now = Instant::now();
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().unwrap();
        let mut b = Bootstrap::new(&[addr], now);
        for _ in 0..20 {
            b.due(now + Duration::from_secs(10_000));
            b.dial_failed(0, now, 0.99);
        }
        let next = b.next_due().unwrap();
        assert!(next <= now + BOOT_BACKOFF_MAX * 2);
    }
}
