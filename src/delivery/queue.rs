//! Per-peer send queues with one batch in flight, exponential backoff with
//! jitter, and expiry: plain data, no I/O, driven by the courier task and
//! unit-tested here.
//!
//! One batch in flight per peer keeps each sender's messages in order on
//! the wire; while it is out, new messages accumulate and leave together
//! in the next batch, which is where group commit on both ends gets its
//! batches from.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use libp2p::PeerId;

use super::records::{OutHead, Summary};
use crate::wire::Envelope;

/// One queued item (a message or a receipt) by reference: its body is on
/// disk, and a freshly sent message may carry it in memory too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// Message id.
    pub id: String,
    /// Expiry, ms since the epoch (`u64::MAX`: never).
    pub expires_at_ms: u64,
    /// Approximate encoded size, to bound batches.
    pub size: u64,
    /// The message, when `send` could keep it in memory (within a byte
    /// budget) so the courier need not read it back from disk.
    pub env: Option<Cached>,
}

/// A message on its way out: what the courier needs to know about it, and
/// its envelope encoded once, at `send`, exactly as it goes on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    /// Message id.
    pub id: String,
    /// Where it goes and what status queries show of it.
    pub summary: Summary,
    /// Body length, bytes.
    pub body_len: usize,
    /// The wire encoding of the envelope.
    pub bytes: Vec<u8>,
    /// The store's memtable when `send` wrote it (`Tx::generation`): no
    /// `OUT_STATUS` row of it can be older. `None` when read back from
    /// disk.
    pub since: Option<u64>,
}

impl Outbound {
    /// `env`, sent as `head` says, and its wire encoding.
    pub fn new(env: &Envelope, head: &OutHead, bytes: Vec<u8>) -> Self {
        Outbound {
            id: env.id.clone(),
            summary: Summary::of(env, head),
            body_len: env.body_json.len(),
            bytes,
            since: None,
        }
    }

    /// Like [`Outbound::new`], taking the envelope's strings instead of
    /// copying them (`send` has no further use for the envelope).
    pub fn from_parts(env: Envelope, head: OutHead, bytes: Vec<u8>) -> Self {
        Outbound {
            body_len: env.body_json.len(),
            summary: Summary {
                from: env.from,
                from_handle: env.from_handle,
                to: env.to,
                to_handle: head.to_handle,
                to_node: head.to_node,
                subject: env.subject,
                reply_to: env.reply_to,
                trace_id: env.trace_id,
                created_at_ms: env.created_at_ms,
                expires_at_ms: env.expires_at_ms,
            },
            id: env.id,
            bytes,
            since: None,
        }
    }
}

/// A message held in memory between its durable commit and its
/// transmission. Every `Cached` alive counts against a shared byte budget;
/// dropping the last clone gives its bytes back.
#[derive(Clone)]
pub struct Cached(Arc<CachedInner>);

struct CachedInner {
    out: Arc<Outbound>,
    bytes: usize,
    budget: Arc<AtomicUsize>,
}

impl Drop for CachedInner {
    fn drop(&mut self) {
        self.budget.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl Cached {
    /// Keep `out` in memory if `budget` (bytes in use) stays within `limit`.
    pub fn try_new(out: Arc<Outbound>, budget: &Arc<AtomicUsize>, limit: usize) -> Option<Cached> {
        let bytes = out.bytes.len() + 256;
        let before = budget.fetch_add(bytes, Ordering::Relaxed);
        if before + bytes > limit {
            budget.fetch_sub(bytes, Ordering::Relaxed);
            return None;
        }
        Some(Cached(Arc::new(CachedInner {
            out,
            bytes,
            budget: budget.clone(),
        })))
    }

    /// The message.
    pub fn outbound(&self) -> &Arc<Outbound> {
        &self.0.out
    }
}

impl std::fmt::Debug for Cached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Cached").field(&self.0.out.id).finish()
    }
}

impl PartialEq for Cached {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Cached {}

/// Backoff parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// First delay after a failure.
    pub initial: Duration,
    /// Largest delay.
    pub max: Duration,
}

impl Backoff {
    /// Delay after `failures` consecutive failures (1-based), before jitter.
    pub fn delay(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(20);
        self.initial.saturating_mul(1 << exp).min(self.max)
    }
}

#[derive(Debug, Default)]
struct Peer {
    items: VecDeque<Item>,
    in_flight: usize,
    failures: u32,
    retry_at: Option<Instant>,
}

/// Queues for every peer.
#[derive(Debug)]
pub struct Queues {
    peers: HashMap<PeerId, Peer, foldhash::fast::RandomState>,
    backoff: Backoff,
    total: usize,
}

impl Queues {
    /// Empty queues.
    pub fn new(backoff: Backoff) -> Self {
        Queues {
            peers: HashMap::default(),
            backoff,
            total: 0,
        }
    }

    /// Append an item for `peer`.
    pub fn push(&mut self, peer: PeerId, item: Item) {
        self.peers.entry(peer).or_default().items.push_back(item);
        self.total += 1;
    }

    /// Items queued (in flight included).
    pub fn len(&self) -> usize {
        self.total
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Items queued for one peer.
    pub fn len_for(&self, peer: &PeerId) -> usize {
        self.peers.get(peer).map_or(0, |p| p.items.len())
    }

    /// Peers with items, nothing in flight, and no pending backoff.
    pub fn ready(&self, now: Instant) -> Vec<PeerId> {
        self.peers
            .iter()
            .filter(|(_, p)| {
                !p.items.is_empty() && p.in_flight == 0 && p.retry_at.is_none_or(|t| t <= now)
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// Take the next batch for `peer` (marks it in flight), if ready: at
    /// most `max` items and `max_bytes` (but always at least one item).
    pub fn take_batch(
        &mut self,
        peer: &PeerId,
        now: Instant,
        max: usize,
        max_bytes: u64,
    ) -> Option<Vec<Item>> {
        let p = self.peers.get_mut(peer)?;
        if p.items.is_empty() || p.in_flight > 0 || p.retry_at.is_some_and(|t| t > now) {
            return None;
        }
        let mut n = 0;
        let mut bytes = 0u64;
        for item in p.items.iter().take(max.max(1)) {
            if n > 0 && bytes + item.size > max_bytes {
                break;
            }
            bytes += item.size;
            n += 1;
        }
        p.in_flight = n;
        Some(p.items.iter().take(n).cloned().collect())
    }

    /// The batch in flight got answers: drop the answered items, keep the
    /// rest for the next batch, forget any backoff.
    pub fn complete(&mut self, peer: &PeerId, answered: &[String]) {
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        let answered: std::collections::HashSet<&str, foldhash::fast::RandomState> =
            answered.iter().map(String::as_str).collect();
        let flight: Vec<Item> = p.items.drain(..p.in_flight.min(p.items.len())).collect();
        for item in flight.into_iter().rev() {
            if answered.contains(item.id.as_str()) {
                self.total -= 1;
            } else {
                p.items.push_front(item);
            }
        }
        p.in_flight = 0;
        p.failures = 0;
        p.retry_at = None;
        if p.items.is_empty() {
            self.peers.remove(peer);
        }
    }

    /// The batch in flight failed: back off. `jitter` in `[0, 1)` stretches
    /// the delay by up to 50%. Returns the delay chosen.
    pub fn fail(&mut self, peer: &PeerId, now: Instant, jitter: f64) -> Duration {
        let Some(p) = self.peers.get_mut(peer) else {
            return Duration::ZERO;
        };
        p.in_flight = 0;
        p.failures = p.failures.saturating_add(1);
        let d = self
            .backoff
            .delay(p.failures)
            .mul_f64(1.0 + 0.5 * jitter.clamp(0.0, 1.0));
        p.retry_at = Some(now + d);
        d
    }

    /// Consecutive failures of a peer.
    pub fn failures(&self, peer: &PeerId) -> u32 {
        self.peers.get(peer).map_or(0, |p| p.failures)
    }

    /// The peer is reachable again: retry it now.
    pub fn wake(&mut self, peer: &PeerId) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.retry_at = None;
            p.failures = 0;
        }
    }

    /// Remove and return items expired at `now_ms` that are not in flight.
    pub fn take_expired(&mut self, now_ms: u64) -> Vec<(PeerId, Item)> {
        let mut out = Vec::new();
        for (peer, p) in self.peers.iter_mut() {
            let skip = p.in_flight;
            let mut i = skip;
            while i < p.items.len() {
                if p.items[i].expires_at_ms <= now_ms {
                    if let Some(item) = p.items.remove(i) {
                        out.push((*peer, item));
                    }
                } else {
                    i += 1;
                }
            }
        }
        self.total -= out.len();
        self.peers.retain(|_, p| !p.items.is_empty());
        out
    }

    /// Earliest pending retry.
    pub fn next_retry(&self) -> Option<Instant> {
        self.peers
            .values()
            .filter(|p| !p.items.is_empty() && p.in_flight == 0)
            .filter_map(|p| p.retry_at)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str) -> Item {
        Item {
            id: id.into(),
            expires_at_ms: u64::MAX,
            size: 10,
            env: None,
        }
    }

    fn q() -> Queues {
        Queues::new(Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        })
    }

    #[test]
    fn one_batch_in_flight_and_order_kept() {
        let mut q = q();
        let p = PeerId::random();
        let now = Instant::now();
        for i in 0..5 {
            q.push(p, item(&i.to_string()));
        }
        let b = q.take_batch(&p, now, 2, 1_000).unwrap();
        assert_eq!(
            b.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
            ["0", "1"]
        );
        assert!(
            q.take_batch(&p, now, 2, 1_000).is_none(),
            "one batch in flight"
        );
        assert!(q.ready(now).is_empty());
        // Only "0" was answered: "1" goes out again first.
        q.complete(&p, &["0".to_string()]);
        let b = q.take_batch(&p, now, 10, 1_000).unwrap();
        assert_eq!(
            b.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
            ["1", "2", "3", "4"]
        );
        q.complete(&p, &b.iter().map(|i| i.id.clone()).collect::<Vec<_>>());
        assert!(q.is_empty());
    }

    #[test]
    fn failures_back_off_exponentially_until_woken() {
        let mut q = q();
        let p = PeerId::random();
        let now = Instant::now();
        q.push(p, item("a"));
        q.take_batch(&p, now, 10, 1_000).unwrap();
        assert_eq!(q.fail(&p, now, 0.0), Duration::from_millis(100));
        assert!(q.take_batch(&p, now, 10, 1_000).is_none());
        q.take_batch(&p, now + Duration::from_millis(100), 10, 1_000)
            .unwrap();
        assert_eq!(q.fail(&p, now, 0.0), Duration::from_millis(200));
        for _ in 0..10 {
            q.take_batch(&p, now + Duration::from_secs(100), 10, 1_000)
                .unwrap();
            q.fail(&p, now, 0.0);
        }
        assert_eq!(
            q.backoff.delay(q.failures(&p)),
            Duration::from_secs(1),
            "capped"
        );
        q.wake(&p);
        assert_eq!(q.ready(now), vec![p]);
    }

    #[test]
    fn batches_are_bounded_by_bytes_but_never_empty() {
        let mut q = q();
        let p = PeerId::random();
        let now = Instant::now();
        for i in 0..4 {
            q.push(
                p,
                Item {
                    id: i.to_string(),
                    expires_at_ms: u64::MAX,
                    size: 400,
                    env: None,
                },
            );
        }
        assert_eq!(q.take_batch(&p, now, 10, 1_000).unwrap().len(), 2);
        q.complete(&p, &["0".to_string(), "1".to_string()]);
        assert_eq!(
            q.take_batch(&p, now, 10, 100).unwrap().len(),
            1,
            "one oversized item still goes"
        );
    }

    #[test]
    fn expiry_skips_items_in_flight() {
        let mut q = q();
        let p = PeerId::random();
        let now = Instant::now();
        q.push(
            p,
            Item {
                id: "a".into(),
                expires_at_ms: 10,
                size: 1,
                env: None,
            },
        );
        q.push(
            p,
            Item {
                id: "b".into(),
                expires_at_ms: 10,
                size: 1,
                env: None,
            },
        );
        q.push(
            p,
            Item {
                id: "c".into(),
                expires_at_ms: 100,
                size: 1,
                env: None,
            },
        );
        q.take_batch(&p, now, 1, 100).unwrap();
        let gone = q.take_expired(50);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].1.id, "b");
        assert_eq!(q.len(), 2);
    }
}
