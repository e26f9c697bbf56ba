//! The world: the cluster of real nodes, and the faults applied to it.
//!
//! Partitions block every cross-group pair of nodes on both sides
//! (`net().block`), slow links delay every request to and from the slow
//! nodes (`net().set_link_delay`; gossip is not delayed). Both live in the
//! nodes' network tasks, so a node that restarts or joins while they are
//! in force gets them applied again. Fresh and restarted nodes dial
//! `mesh.degree` random running nodes, so they never depend on bootstrap
//! peers that have left.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::info;

use super::Error;
use super::consumers::Consumers;
use super::ledger::Ledger;
use super::live::Live;
use super::scenario::Scenario;
use super::schedule::{Action, Plan};
use super::watch::Watch;
use crate::cluster::{Cluster, SeededRng};
use crate::config::NodeConfig;
use crate::discovery::Registration;
use crate::identity::AgentId;
use crate::node::{Node, NodeHandle};
use crate::wire::Capability;

/// The cluster and everything the faults change.
pub struct World {
    /// The nodes.
    pub cluster: Cluster,
    /// Shared view of running nodes and agents.
    pub live: Arc<Live>,
    /// Per-node consumers.
    pub consumers: Consumers,
    /// Convergence probes and joiners.
    pub watch: Arc<Mutex<Watch>>,
    /// Every message.
    pub ledger: Arc<Ledger>,
    /// The scenario.
    pub scenario: Arc<Scenario>,
    /// The plan (who survives).
    pub plan: Arc<Plan>,
    /// Timeline zero.
    pub t0: Instant,
    /// Picks bootstrap peers of joiners and restarted nodes.
    pub rng: SeededRng,
    /// Groups in force: (number of groups, group of each planned slot).
    pub partition: Option<(usize, Vec<usize>)>,
    /// Slow nodes and their delay.
    pub slow: BTreeMap<usize, Duration>,
    /// Crashed nodes.
    pub crashed: BTreeSet<usize>,
    /// Nodes that left for good.
    pub departed: BTreeSet<usize>,
    /// Faults applied, by kind (nodes touched).
    pub faults: BTreeMap<String, u64>,
    /// `(timeline seconds, label)` of each applied action.
    pub markers: Vec<(f64, String)>,
    /// Graceful stops of departed nodes still under way (they run in the
    /// background so a leave does not hold up the timeline).
    pub leaving: Vec<tokio::task::JoinHandle<()>>,
}

/// Apply the scenario's timer overrides to a node configuration made by
/// the cluster (which keeps its data dir, listen and bootstrap addresses).
pub fn tweak(base: &NodeConfig, cfg: &mut NodeConfig) {
    cfg.discovery = base.discovery.clone();
    cfg.delivery = base.delivery.clone();
    cfg.network.idle_timeout = base.network.idle_timeout;
    cfg.network.kad_bootstrap_interval = base.network.kad_bootstrap_interval;
    cfg.network.min_peers = base.network.min_peers;
    cfg.network.memory_plaintext = base.network.memory_plaintext;
}

/// The registration of simulation agent `j` of node `slot`.
pub fn registration(s: &Scenario, slot: usize, j: usize) -> Registration {
    let g = slot * s.mesh.agents_per_node + j;
    Registration {
        handle: format!("n{slot}-a{j}"),
        description: format!("simulation agent {j} of node {slot}"),
        capabilities: vec![Capability {
            name: format!("sim/cap{}", g % s.mesh.capabilities),
            description: String::new(),
            tags: Vec::new(),
            version: None,
        }],
        metadata_json: String::new(),
    }
}

/// Register node `slot`'s simulation agents.
pub async fn register_agents(
    s: &Scenario,
    slot: usize,
    h: &NodeHandle,
) -> Result<Vec<AgentId>, Error> {
    let mut ids = Vec::with_capacity(s.mesh.agents_per_node);
    for j in 0..s.mesh.agents_per_node {
        let r = h
            .discovery()
            .register(registration(s, slot, j))
            .await
            .map_err(|e| Error::Failed(format!("registering agent {j} on node {slot}: {e}")))?;
        ids.push(r.agent_id);
    }
    Ok(ids)
}

impl World {
    /// Timeline seconds now.
    pub fn now_s(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    fn count(&mut self, kind: &str, n: usize) {
        *self.faults.entry(kind.to_string()).or_default() += n as u64;
    }

    /// Apply one planned action.
    pub async fn apply(&mut self, action: &Action) -> Result<(), Error> {
        let label = action.label();
        match action {
            Action::Crash(nodes) => {
                for &i in nodes {
                    self.down(i).await;
                    self.cluster.crash(i).await;
                    self.crashed.insert(i);
                }
                self.count("crash", nodes.len());
            }
            Action::Restart(nodes) => {
                for &i in nodes {
                    self.restart(i).await?;
                }
                self.count("restart", nodes.len());
            }
            Action::Leave(nodes) => {
                for &i in nodes {
                    self.down(i).await;
                    self.departed.insert(i);
                    if let Some(node) = self.cluster.detach(i) {
                        let t = Instant::now();
                        self.leaving.push(tokio::spawn(async move {
                            node.shutdown().await;
                            info!(
                                node = i,
                                stop_s = t.elapsed().as_secs_f64(),
                                "sim: node left"
                            );
                        }));
                    }
                }
                self.leaving.retain(|h| !h.is_finished());
                self.count("leave", nodes.len());
            }
            Action::Join { nodes, late } => {
                self.join(nodes, *late).await?;
                self.count(if *late { "late_join" } else { "join" }, nodes.len());
            }
            Action::Partition { groups, group_of } => {
                self.partition = Some((*groups, group_of.clone()));
                let all: Vec<usize> = (0..self.cluster.len()).collect();
                self.set_blocks(&all, true).await;
                self.count("partition", 1);
            }
            Action::Heal => self.heal().await,
            Action::Slow { nodes, delay } => {
                for &i in nodes {
                    self.slow.insert(i, *delay);
                }
                self.set_delays(nodes, *delay).await;
                self.count("slow_link", nodes.len());
            }
            Action::Unslow(nodes) => {
                for i in nodes {
                    self.slow.remove(i);
                }
                self.set_delays(nodes, Duration::ZERO).await;
            }
            Action::Probe { node, n } => self.probe(*node, *n).await?,
        }
        let now = self.now_s();
        self.markers.push((now, label));
        Ok(())
    }

    /// Take node `i` out of the view and stop its consumers.
    async fn down(&mut self, i: usize) {
        self.live.set_handle(i, None);
        self.consumers.stop(i).await;
    }

    /// Start a crashed node again.
    pub async fn restart(&mut self, i: usize) -> Result<(), Error> {
        self.cluster
            .restart(i)
            .await
            .map_err(|source| Error::Start { node: i, source })?;
        self.crashed.remove(&i);
        self.up(i, true).await;
        Ok(())
    }

    /// Start fresh nodes in slots `nodes` (the next ones) concurrently,
    /// register their agents, and bring them into the view.
    async fn join(&mut self, nodes: &[usize], late: bool) -> Result<(), Error> {
        let t_start = Instant::now();
        let base = self.scenario.node.clone();
        let mut configs = Vec::with_capacity(nodes.len());
        for &i in nodes {
            if self.cluster.len() != i {
                return Err(Error::Failed(format!(
                    "the plan expected the next node to be {i}, the cluster has {}",
                    self.cluster.len()
                )));
            }
            let peers = self.pick_peers(None);
            let (got, cfg) = self.cluster.reserve(|_, cfg| {
                tweak(&base, cfg);
                cfg.network.bootstrap = peers.clone();
            });
            debug_assert_eq!(got, i);
            configs.push(cfg);
        }
        let started = futures::future::join_all(configs.into_iter().map(Node::start)).await;
        let mut failed = None;
        for (&i, r) in nodes.iter().zip(started) {
            match r {
                Ok(node) => self.cluster.attach(i, node),
                Err(source) => failed = failed.or(Some(Error::Start { node: i, source })),
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        let start_s = t_start.elapsed().as_secs_f64();
        let t_reg = Instant::now();
        let target: Vec<(AgentId, usize)> = self.live.with(|v| {
            v.agent_slot
                .iter()
                .filter(|(_, s)| v.is_running(**s))
                .map(|(a, s)| (a.clone(), *s))
                .collect()
        });
        let handles = nodes
            .iter()
            .map(|&i| self.handle(i))
            .collect::<Result<Vec<_>, _>>()?;
        let scenario = &self.scenario;
        let regs = futures::future::join_all(
            nodes
                .iter()
                .zip(&handles)
                .map(|(&i, h)| register_agents(scenario, i, h)),
        )
        .await;
        drop(handles);
        let register_s = t_reg.elapsed().as_secs_f64();
        for (&i, ids) in nodes.iter().zip(regs) {
            let ids = ids?;
            self.live.add_agents(i, &ids, self.plan.survives(i));
            let start = self.now_s();
            self.watch
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .add_joiner(i, late, target.clone(), start);
            self.up(i, false).await;
        }
        info!(
            nodes = nodes.len(),
            late, start_s, register_s, "sim: nodes joined"
        );
        Ok(())
    }

    fn handle(&self, i: usize) -> Result<NodeHandle, Error> {
        self.cluster
            .handle(i)
            .ok_or_else(|| Error::Failed(format!("node {i} is not running")))
    }

    /// A node (re)started: faults in force, peers, view, consumers.
    /// `dial` adds dials to random running nodes (a joiner got its peers
    /// as bootstrap addresses instead).
    async fn up(&mut self, i: usize, dial: bool) {
        let Some(h) = self.cluster.handle(i) else {
            return;
        };
        if self.partition.is_some() {
            self.set_blocks(&[i], true).await;
        }
        for (&s, &d) in &self.slow {
            if s != i {
                if let Some(id) = self.cluster.node_id(s) {
                    let _ = h.net().set_link_delay(id, d).await;
                }
            } else {
                self.set_delays(&[i], d).await;
            }
        }
        if dial {
            for addr in self.pick_peers(Some(i)) {
                let _ = h.net().dial(addr).await;
            }
        }
        let agents = self.live.agents_of(i);
        self.consumers.start(i, &h, &agents, &self.ledger, self.t0);
        self.live.set_handle(i, Some(h));
    }

    /// Dial addresses of `mesh.degree` random running nodes other than `me`.
    fn pick_peers(&mut self, me: Option<usize>) -> Vec<libp2p::Multiaddr> {
        let mut pool: Vec<usize> = (0..self.cluster.len())
            .filter(|&j| Some(j) != me && self.cluster.is_running(j))
            .collect();
        let k = self.scenario.mesh.degree.min(pool.len());
        for s in 0..k {
            let j = s + self.rng.below(pool.len() - s);
            pool.swap(s, j);
        }
        pool.truncate(k);
        pool.into_iter()
            .filter_map(|j| self.cluster.dial_addr(j))
            .collect()
    }

    fn group(&self, i: usize) -> Option<usize> {
        let (groups, of) = self.partition.as_ref()?;
        Some(of.get(i).copied().unwrap_or(i % groups))
    }

    /// Block (or unblock) every cross-group pair involving `nodes`, on both sides.
    async fn set_blocks(&self, nodes: &[usize], block: bool) {
        let member: BTreeSet<usize> = nodes.iter().copied().collect();
        for &i in nodes {
            for j in 0..self.cluster.len() {
                if i == j || self.group(i) == self.group(j) {
                    continue;
                }
                self.block_one(i, j, block).await;
                if !member.contains(&j) {
                    self.block_one(j, i, block).await;
                }
            }
        }
    }

    /// Node `a` blocks (or unblocks) node `b`, if `a` runs.
    async fn block_one(&self, a: usize, b: usize, block: bool) {
        let (Some(h), Some(peer)) = (self.cluster.handle(a), self.cluster.node_id(b)) else {
            return;
        };
        let _ = if block {
            h.net().block(peer).await
        } else {
            h.net().unblock(peer).await
        };
    }

    /// Remove the partition in force.
    pub async fn heal(&mut self) {
        if self.partition.is_none() {
            return;
        }
        let all: Vec<usize> = (0..self.cluster.len()).collect();
        self.set_blocks(&all, false).await;
        self.partition = None;
        self.count("heal", 1);
    }

    /// Set the delay of every request to and from `nodes`.
    async fn set_delays(&self, nodes: &[usize], d: Duration) {
        for &s in nodes {
            let Some(sid) = self.cluster.node_id(s) else {
                continue;
            };
            for j in 0..self.cluster.len() {
                if j == s {
                    continue;
                }
                if let Some(h) = self.cluster.handle(j) {
                    let _ = h.net().set_link_delay(sid, d).await;
                }
                if let (Some(h), Some(jid)) = (self.cluster.handle(s), self.cluster.node_id(j)) {
                    let _ = h.net().set_link_delay(jid, d).await;
                }
            }
        }
    }

    /// Remove every slow link.
    pub async fn unslow_all(&mut self) {
        let nodes: Vec<usize> = std::mem::take(&mut self.slow).into_keys().collect();
        self.set_delays(&nodes, Duration::ZERO).await;
    }

    /// Register probe `n` on `node`, or on the next running node if it is down.
    async fn probe(&mut self, node: usize, n: usize) -> Result<(), Error> {
        let len = self.cluster.len();
        let Some(k) = (0..len)
            .map(|d| (node + d) % len)
            .find(|&k| self.cluster.is_running(k))
        else {
            return Ok(());
        };
        let h = self.handle(k)?;
        let start = self.now_s();
        let r = h
            .discovery()
            .register(Registration {
                handle: format!("probe-{n}"),
                description: "convergence probe".into(),
                capabilities: Vec::new(),
                metadata_json: String::new(),
            })
            .await
            .map_err(|e| Error::Failed(format!("registering probe {n} on node {k}: {e}")))?;
        self.watch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add_probe(n, k, r.agent_id, start);
        Ok(())
    }
}
