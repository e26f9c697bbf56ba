//! The traffic generator: `rate` sends per second through the library API
//! (`delivery().send`), from random agents on running nodes, by the
//! scenario's pattern mix. Its choices come from a seeded RNG; which node
//! runs at a given instant depends on real time, so the exact sequence of
//! messages can differ between runs of the same seed (the fault schedule
//! cannot).
//!
//! Random-pair recipients are agents on nodes that never leave for good
//! (the plan knows them in advance), so every such message must arrive.
//! Capability addresses are resolved by the sending node and may name
//! agents of nodes that leave later; the ledger counts those apart.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::ledger::{Book, Ledger, SendSide};
use super::live::Live;
use super::scenario::{Pattern, Traffic};
use crate::cluster::SeededRng;
use crate::delivery::{Error as DeliveryError, SendRequest};
use crate::discovery::{Filter, NamePattern};
use crate::identity::AgentId;
use crate::routing::{Address, RouteError, Strategy};
use crate::time::now_ms;

/// Longest pause between two checks of what is due.
const MAX_TICK: Duration = Duration::from_millis(50);
/// Attempts to find a recipient other than the sender.
const RECIPIENT_TRIES: usize = 8;

/// Everything the generator needs.
pub struct Generator {
    /// What to send.
    pub traffic: Traffic,
    /// Message TTL.
    pub ttl: Duration,
    /// Capabilities `sim/cap{0..}` in use.
    pub capabilities: usize,
    /// Running nodes and agents.
    pub live: Arc<Live>,
    /// Where sends are recorded.
    pub ledger: Arc<Ledger>,
    /// Timeline zero.
    pub t0: Instant,
    /// Choices.
    pub rng: SeededRng,
}

/// One planned send.
struct Send {
    from_slot: usize,
    req: SendRequest,
    pattern: Pattern,
}

impl Generator {
    /// Send from `traffic.start` to `traffic.stop` (timeline time) or until
    /// `stop`; returns once every send in flight has finished.
    pub async fn run(mut self, stop: CancellationToken) {
        let rate = self.traffic.rate;
        let start = self.t0 + self.traffic.start;
        let end = self.t0 + self.traffic.stop;
        let tick = Duration::from_secs_f64(1.0 / rate).min(MAX_TICK);
        let body = format!("\"{}\"", "x".repeat(self.traffic.body_bytes - 2));
        let slots = self.traffic.max_in_flight;
        let sem = Arc::new(Semaphore::new(slots));
        tokio::select! {
            _ = tokio::time::sleep_until(start.into()) => {}
            _ = stop.cancelled() => return,
        }
        let mut made: u64 = 0;
        loop {
            let now = Instant::now().min(end);
            let due = (now.saturating_duration_since(start).as_secs_f64() * rate).floor() as u64;
            while made < due {
                made += 1;
                self.one(&body, &sem);
            }
            if now >= end || stop.is_cancelled() {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = stop.cancelled() => break,
            }
        }
        // Every send in flight holds a permit: taking them all waits for them.
        let _ = sem.acquire_many(slots as u32).await;
    }

    fn one(&mut self, body: &str, sem: &Arc<Semaphore>) {
        let Some(send) = self.plan(body) else {
            return;
        };
        let Ok(permit) = sem.clone().try_acquire_owned() else {
            self.ledger
                .with(|b| Book::bump(&mut b.skipped, "max_in_flight busy"));
            return;
        };
        let Some(h) = self.live.handle(send.from_slot) else {
            self.ledger
                .with(|b| Book::bump(&mut b.skipped, "sender stopped"));
            return;
        };
        let (live, ledger, t0, ttl) = (self.live.clone(), self.ledger.clone(), self.t0, self.ttl);
        tokio::spawn(async move {
            let sent_s = t0.elapsed().as_secs_f64();
            let expires_ms = now_ms() + ttl.as_millis() as u64;
            let r = h.delivery().send(send.req).await;
            drop(h);
            match r {
                Ok(sent) => {
                    let ids: Vec<(String, AgentId, Option<usize>)> = live.with(|v| {
                        sent.messages
                            .into_iter()
                            .map(|(id, to)| {
                                let slot = v.agent_slot.get(&to).copied();
                                (id, to, slot)
                            })
                            .collect()
                    });
                    let side = SendSide {
                        sent_s,
                        from_slot: send.from_slot,
                        to_slot: None,
                        expires_ms,
                        pattern: send.pattern,
                    };
                    ledger.with(|b| b.accepted(ids, side));
                }
                Err(e) => ledger.with(|b| Book::bump(&mut b.send_failed, failure(&e))),
            }
            drop(permit);
        });
    }

    /// Choose a pattern, a sender and an address.
    fn plan(&mut self, body: &str) -> Option<Send> {
        let pattern = self.pattern();
        let rng = &mut self.rng;
        let picked = self.live.with(|v| {
            let senders: Vec<usize> = (0..v.handles.len())
                .filter(|&i| v.is_running(i) && v.agents.get(i).is_some_and(|a| !a.is_empty()))
                .collect();
            if senders.is_empty() {
                return Err("no running sender");
            }
            let slot = senders[rng.below(senders.len())];
            let agents = &v.agents[slot];
            let from = agents[rng.below(agents.len())].clone();
            let to = match pattern {
                Pattern::RandomPairs => {
                    let to = (0..RECIPIENT_TRIES)
                        .filter_map(|_| v.recipients.get(rng.below(v.recipients.len())))
                        .find(|a| **a != from)
                        .ok_or("no recipient")?;
                    Address::Agent(to.clone())
                }
                Pattern::Fanout | Pattern::CapabilityOne => Address::Capability {
                    filter: Filter {
                        name: Some(NamePattern::Exact(format!(
                            "sim/cap{}",
                            rng.below(self.capabilities)
                        ))),
                        tags: Vec::new(),
                        version: None,
                    },
                    strategy: if pattern == Pattern::Fanout {
                        Strategy::All
                    } else {
                        Strategy::One
                    },
                },
            };
            Ok((slot, from, to))
        });
        let (from_slot, from, to) = match picked {
            Ok(p) => p,
            Err(why) => {
                self.ledger.with(|b| Book::bump(&mut b.skipped, why));
                return None;
            }
        };
        Some(Send {
            from_slot,
            pattern,
            req: SendRequest {
                ttl: Some(self.ttl),
                ..SendRequest::new(from, to, body)
            },
        })
    }

    fn pattern(&mut self) -> Pattern {
        let total: u32 = self.traffic.mix.iter().map(|(_, w)| w).sum();
        let mut x = self.rng.below(total.max(1) as usize) as u32;
        for (p, w) in &self.traffic.mix {
            if x < *w {
                return *p;
            }
            x -= w;
        }
        Pattern::RandomPairs
    }
}

/// A short name for why a send failed.
fn failure(e: &DeliveryError) -> &'static str {
    match e {
        DeliveryError::Route(RouteError::NotFound(_)) => "route: no recipient found",
        DeliveryError::Route(RouteError::Ambiguous { .. }) => "route: ambiguous",
        DeliveryError::Route(RouteError::Invalid(_)) => "route: invalid",
        DeliveryError::SenderNotLocal(_) => "sender not local",
        DeliveryError::Stopped => "node stopping",
        DeliveryError::Store(_) => "store error",
        _ => "other",
    }
}
