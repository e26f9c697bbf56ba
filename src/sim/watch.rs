//! Watching discovery: how fast a new ad reaches every running node
//! (probes), and how fast a fresh node holds the ads of every running
//! node's agents (joiners). Sampled from the nodes' registries.

use serde::Serialize;

use super::live::Live;
use crate::discovery::Registry;
use crate::identity::AgentId;
use crate::node::NodeHandle;

/// Points kept per probe curve.
const MAX_CURVE: usize = 400;

/// One probe agent's spread.
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    /// Probe number.
    pub n: usize,
    /// Node it was registered on.
    pub node: usize,
    /// Timeline time of the register call, seconds.
    pub start_s: f64,
    /// `(seconds since start, fraction of running nodes that see it)`, on change.
    pub curve: Vec<(f64, f64)>,
    /// Seconds until half of the running nodes saw it.
    pub half_s: Option<f64>,
    /// Seconds until 90% did.
    pub p90_s: Option<f64>,
    /// Seconds until all did.
    pub all_s: Option<f64>,
    /// Its agent.
    #[serde(skip)]
    pub agent: Option<AgentId>,
}

/// One fresh node catching up.
#[derive(Debug, Clone, Serialize)]
pub struct Joiner {
    /// Its slot.
    pub node: usize,
    /// A `late_join` event (else churn).
    pub late: bool,
    /// Timeline time its start returned, seconds.
    pub start_s: f64,
    /// Agents it had to learn (those of nodes running when it joined).
    pub target: usize,
    /// Seconds until it had an identified peer.
    pub first_peer_s: Option<f64>,
    /// Seconds until its registry held every target agent still running as active.
    pub synced_s: Option<f64>,
    /// Target agents still unknown at the last sample.
    pub missing: usize,
    /// The agents, with their nodes.
    #[serde(skip)]
    pub agents: Vec<(AgentId, usize)>,
}

/// Probes and joiners being watched.
#[derive(Debug, Default)]
pub struct Watch {
    /// Every probe.
    pub probes: Vec<Probe>,
    /// Every joiner.
    pub joiners: Vec<Joiner>,
    /// How long each is watched, seconds.
    pub timeout_s: f64,
}

/// Whether `r` holds `agent` as active.
fn active(r: &Registry, agent: &AgentId) -> bool {
    r.get(agent).is_some_and(|e| e.is_active())
}

fn sees(h: &NodeHandle, agent: &AgentId) -> bool {
    h.discovery().with_registry(|r| active(r, agent))
}

impl Watch {
    /// Watch a probe from `start_s`.
    pub fn add_probe(&mut self, n: usize, node: usize, agent: AgentId, start_s: f64) {
        self.probes.push(Probe {
            n,
            node,
            start_s,
            curve: Vec::new(),
            half_s: None,
            p90_s: None,
            all_s: None,
            agent: Some(agent),
        });
    }

    /// Watch a joiner from `start_s`; it must learn `agents`.
    pub fn add_joiner(
        &mut self,
        node: usize,
        late: bool,
        agents: Vec<(AgentId, usize)>,
        start_s: f64,
    ) {
        self.joiners.push(Joiner {
            node,
            late,
            start_s,
            target: agents.len(),
            first_peer_s: None,
            synced_s: None,
            missing: agents.len(),
            agents,
        });
    }

    /// Whether something is still watched at `now_s`.
    pub fn busy(&self, now_s: f64) -> bool {
        let open = |start: f64, done: bool| !done && now_s - start <= self.timeout_s;
        self.probes
            .iter()
            .any(|p| open(p.start_s, p.all_s.is_some()))
            || self
                .joiners
                .iter()
                .any(|j| open(j.start_s, j.synced_s.is_some()))
    }

    /// Sample every open probe and joiner.
    pub fn sample(&mut self, live: &Live, now_s: f64) {
        if !self.busy(now_s) {
            return;
        }
        let running = live.running();
        if running.is_empty() {
            return;
        }
        let timeout = self.timeout_s;
        for p in &mut self.probes {
            let since = now_s - p.start_s;
            let Some(agent) = &p.agent else { continue };
            if p.all_s.is_some() || since > timeout {
                continue;
            }
            let seen = running.iter().filter(|(_, h)| sees(h, agent)).count();
            let f = seen as f64 / running.len() as f64;
            if p.curve.last().is_none_or(|l| l.1 != f) && p.curve.len() < MAX_CURVE {
                p.curve.push((since, f));
            }
            if f >= 0.5 && p.half_s.is_none() {
                p.half_s = Some(since);
            }
            if f >= 0.9 && p.p90_s.is_none() {
                p.p90_s = Some(since);
            }
            if seen == running.len() {
                p.all_s = Some(since);
            }
        }
        for j in &mut self.joiners {
            let since = now_s - j.start_s;
            if j.synced_s.is_some() || since > timeout {
                continue;
            }
            let Some((_, h)) = running.iter().find(|(i, _)| *i == j.node) else {
                continue;
            };
            if j.first_peer_s.is_none() && !h.discovery().connected_peers().is_empty() {
                j.first_peer_s = Some(since);
            }
            let missing = live.with(|v| {
                j.agents
                    .iter()
                    .filter(|(a, slot)| v.is_running(*slot) && !sees(h, a))
                    .count()
            });
            j.missing = missing;
            if missing == 0 {
                j.synced_s = Some(since);
            }
        }
    }
}

/// The running nodes, and the agents of running nodes (the warm-up target).
fn targets(live: &Live) -> (Vec<(usize, NodeHandle)>, Vec<AgentId>) {
    let agents = live.with(|v| {
        v.agent_slot
            .iter()
            .filter(|(_, s)| v.is_running(**s))
            .map(|(a, _)| a.clone())
            .collect()
    });
    (live.running(), agents)
}

/// Fraction of (running node, agent) pairs in which the node sees the
/// agent as active: 1.0 when every node knows every agent. One full pass.
pub fn coverage(live: &Live) -> f64 {
    let (running, agents) = targets(live);
    let total = running.len() * agents.len();
    if total == 0 {
        return 1.0;
    }
    let known: usize = running
        .iter()
        .map(|(_, h)| {
            h.discovery()
                .with_registry(|r| agents.iter().filter(|a| active(r, a)).count())
        })
        .sum();
    known as f64 / total as f64
}

/// [`coverage`] sampled over and over during the warm-up, looking up only
/// the pairs not seen yet. A full pass is n² registry lookups (a million at
/// 1,000 nodes, a fifth of the process's CPU when it ran every second);
/// this pays for that once, and for what is still missing after. It keeps
/// slots, not node handles: a handle kept here would hold a crashed node's
/// database open.
pub struct Coverage {
    /// Per running node slot: the agents it did not hold yet.
    missing: Vec<(usize, Vec<AgentId>)>,
    total: usize,
}

impl Coverage {
    /// Every running node must see every agent of a running node.
    pub fn new(live: &Live) -> Coverage {
        let (running, agents) = targets(live);
        Coverage {
            total: running.len() * agents.len(),
            missing: running
                .into_iter()
                .map(|(slot, _)| (slot, agents.clone()))
                .collect(),
        }
    }

    /// The share of pairs seen so far. Pairs seen once are not checked
    /// again until all are; then one full pass confirms it (an ad may have
    /// expired meanwhile), and if it does not, tracking starts over. So
    /// does a change in the set of running nodes.
    pub async fn sample(&mut self, live: &Live) -> f64 {
        let running = live.running();
        if running.len() != self.missing.len()
            || running
                .iter()
                .zip(&self.missing)
                .any(|((a, _), (b, _))| a != b)
        {
            *self = Coverage::new(live);
        }
        if self.total == 0 {
            return 1.0;
        }
        for (k, ((_, h), (_, missing))) in running.iter().zip(&mut self.missing).enumerate() {
            if !missing.is_empty() {
                h.discovery()
                    .with_registry(|r| missing.retain(|a| !active(r, a)));
            }
            // Let the nodes' tasks run between chunks of lookups.
            if k % 64 == 63 {
                tokio::task::yield_now().await;
            }
        }
        drop(running);
        let left: usize = self.missing.iter().map(|(_, m)| m.len()).sum();
        if left > 0 {
            return 1.0 - left as f64 / self.total as f64;
        }
        let full = coverage(live);
        if full < 1.0 {
            *self = Coverage::new(live);
        }
        full
    }
}
