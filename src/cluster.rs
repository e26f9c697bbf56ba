//! Many real nodes in one process (benchmarks and simulations).
//!
//! A [`Cluster`] starts nodes with data dirs `root/node{i}`, joined to each
//! other by a [`Topology`], on loopback TCP or libp2p's in-memory transport.
//! Each node is a full [`Node`]: keys, database, network, discovery.
//!
//! The cluster owns the [`Node`]s and nothing else: it never keeps a
//! [`NodeHandle`], because a node's database only closes when the last
//! handle drops (see [`Node::shutdown`]). Callers take handles with
//! [`Cluster::handle`] and drop them before stopping or restarting a node.
//!
//! On TCP a node keeps its addresses across [`Cluster::restart`] (its
//! first start's ports are pinned), so the bootstrap addresses other nodes
//! were given stay valid, as they would for a real host that comes back.
//! On the memory transport it cannot (see [`Cluster::restart`]); it dials
//! the nodes that bootstrap to it instead.

use std::path::{Path, PathBuf};

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use tracing::warn;

use crate::config::{self, NodeConfig, TransportKind};
use crate::net;
use crate::node::{Node, NodeHandle, StartError};

/// How long a restart waits for a failed start's database to close.
const DB_RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How the nodes of a cluster are joined: whom each new node bootstraps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// Node `i` bootstraps to node `i - 1`.
    Chain,
    /// Every node bootstraps to node 0.
    Star,
    /// Each new node bootstraps to `degree` distinct earlier nodes (all of
    /// them when there are fewer), chosen by an RNG seeded with `seed`: the
    /// same seed and order of additions give the same graph.
    Random {
        /// Bootstrap peers per node (0 is taken as 1).
        degree: usize,
        /// RNG seed.
        seed: u64,
    },
}

/// How a cluster's nodes are built.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Loopback TCP (`/ip4/127.0.0.1/tcp/0`) or the memory transport (`/memory/0`).
    pub transport: TransportKind,
    /// How nodes are joined.
    pub topology: Topology,
    /// Data dirs are `root/node{i}`; the caller owns (and removes) `root`.
    pub root: PathBuf,
}

impl ClusterOptions {
    /// TCP nodes in a chain under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ClusterOptions {
            transport: TransportKind::Tcp,
            topology: Topology::Chain,
            root: root.into(),
        }
    }

    /// The base configuration of a node with data dir `dir`:
    /// [`NodeConfig::local_test`] on this transport, API disabled.
    pub fn node_config(&self, dir: impl Into<PathBuf>) -> NodeConfig {
        let mut cfg = NodeConfig::local_test(dir);
        cfg.api.enabled = false;
        if self.transport == TransportKind::Memory {
            cfg.network.transport = TransportKind::Memory;
            cfg.network.listen = vec![Multiaddr::empty().with(Protocol::Memory(0))];
        }
        cfg
    }
}

/// One node slot: its configuration and, while it runs, the node.
struct Slot {
    /// Configuration as first built (listen addresses with port 0).
    config: NodeConfig,
    /// The addresses the last start got; TCP restarts listen on them again.
    pinned: Vec<Multiaddr>,
    /// The running node, `None` while stopped.
    node: Option<Node>,
    /// Stable across restarts (the key lives in the data dir); `None`
    /// while the slot is reserved and its node not yet started.
    node_id: Option<PeerId>,
    /// Where others dial it (first listen address + `/p2p/<id>`).
    dial_addr: Option<Multiaddr>,
}

/// Real nodes in this process, joined by a topology.
pub struct Cluster {
    /// How nodes are built and joined.
    opts: ClusterOptions,
    /// Node `i` is `slots[i]`; slots are never removed, so indices stay valid.
    slots: Vec<Slot>,
    /// Picks bootstrap peers for [`Topology::Random`].
    rng: SeededRng,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("opts", &self.opts)
            .field("nodes", &self.slots.len())
            .field("running", &self.running())
            .finish()
    }
}

impl Cluster {
    /// Start `n` nodes one after the other, each joining per the topology.
    /// `tweak(i, cfg)` adjusts node `i`'s configuration last (it may enable
    /// the API or change the bootstrap list). If a node fails to start, the
    /// ones already started are shut down and the error returned.
    pub async fn start(
        n: usize,
        opts: ClusterOptions,
        tweak: impl Fn(usize, &mut NodeConfig),
    ) -> Result<Cluster, StartError> {
        let seed = match opts.topology {
            Topology::Random { seed, .. } => seed,
            _ => 0,
        };
        let mut cluster = Cluster {
            opts,
            slots: Vec::with_capacity(n),
            rng: SeededRng::new(seed),
        };
        for _ in 0..n {
            if let Err(e) = cluster.add_node(&tweak).await {
                cluster.shutdown().await;
                return Err(e);
            }
        }
        Ok(cluster)
    }

    /// Number of nodes, running or stopped.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the cluster has no nodes.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Number of running nodes.
    pub fn running(&self) -> usize {
        self.slots.iter().filter(|s| s.node.is_some()).count()
    }

    /// The options the cluster was started with.
    pub fn options(&self) -> &ClusterOptions {
        &self.opts
    }

    /// A handle to node `i` while it runs. Drop it before stopping or
    /// restarting that node, or its database stays open.
    pub fn handle(&self, i: usize) -> Option<NodeHandle> {
        self.slots.get(i)?.node.as_ref().map(Node::handle)
    }

    /// Handles to every running node, in index order.
    pub fn handles(&self) -> Vec<NodeHandle> {
        self.slots
            .iter()
            .filter_map(|s| s.node.as_ref().map(Node::handle))
            .collect()
    }

    /// Whether node `i` is running.
    pub fn is_running(&self, i: usize) -> bool {
        self.slots.get(i).is_some_and(|s| s.node.is_some())
    }

    /// Node `i`'s id (stable across restarts).
    pub fn node_id(&self, i: usize) -> Option<PeerId> {
        self.slots.get(i).and_then(|s| s.node_id)
    }

    /// Where node `i` can be dialled (its last address while it is stopped).
    pub fn dial_addr(&self, i: usize) -> Option<Multiaddr> {
        self.slots.get(i)?.dial_addr.clone()
    }

    /// Node `i`'s data dir.
    pub fn data_dir(&self, i: usize) -> Option<&Path> {
        self.slots.get(i).map(|s| s.config.data_dir.as_path())
    }

    /// Start one more node, joined per the topology; returns its index.
    pub async fn add_node(
        &mut self,
        tweak: impl Fn(usize, &mut NodeConfig),
    ) -> Result<usize, StartError> {
        let (i, config) = self.reserve(tweak);
        match Node::start(config).await {
            Ok(node) => {
                self.attach(i, node);
                Ok(i)
            }
            Err(e) => {
                self.unreserve(i);
                Err(e)
            }
        }
    }

    /// Reserve the next slot for a node joined per the topology and return
    /// its index and configuration, without starting it: callers start
    /// several reserved nodes concurrently with [`Node::start`], then
    /// [`attach`](Self::attach) each (or [`unreserve`](Self::unreserve) the
    /// last on failure). `tweak(i, cfg)` adjusts the configuration last.
    pub fn reserve(&mut self, tweak: impl Fn(usize, &mut NodeConfig)) -> (usize, NodeConfig) {
        let i = self.slots.len();
        let mut config = self
            .opts
            .node_config(self.opts.root.join(format!("node{i}")));
        config.network.bootstrap = bootstrap_peers(self.opts.topology, i, &mut self.rng)
            .into_iter()
            .filter_map(|j| self.dial_addr(j))
            .collect();
        tweak(i, &mut config);
        self.slots.push(Slot {
            config: config.clone(),
            pinned: Vec::new(),
            node: None,
            node_id: None,
            dial_addr: None,
        });
        (i, config)
    }

    /// Give reserved (or stopped) slot `i` its running node.
    pub fn attach(&mut self, i: usize, node: Node) {
        let handle = node.handle();
        let (node_id, dial_addr) = (handle.node_id(), handle.dial_addr());
        let pinned = handle.listen_addrs().to_vec();
        drop(handle);
        if let Some(slot) = self.slots.get_mut(i) {
            slot.node_id = Some(node_id);
            slot.dial_addr = dial_addr;
            slot.pinned = pinned;
            slot.node = Some(node);
        }
    }

    /// Give back the last reserved slot if its node never started.
    pub fn unreserve(&mut self, i: usize) {
        if i + 1 == self.slots.len() && self.slots[i].node_id.is_none() {
            self.slots.pop();
        }
    }

    /// Take running node `i` out of the cluster (the slot stays, stopped),
    /// for the caller to stop it (concurrently with others, or in the
    /// background) with [`Node::shutdown`] or [`Node::crash`].
    pub fn detach(&mut self, i: usize) -> Option<Node> {
        self.slots.get_mut(i).and_then(|s| s.node.take())
    }

    /// Stop node `i` gracefully (its agents are announced offline). A
    /// stopped or unknown node is left alone.
    pub async fn stop(&mut self, i: usize) {
        if let Some(node) = self.detach(i) {
            node.shutdown().await;
        }
    }

    /// Stop node `i` abruptly, as a crash would. A stopped or unknown node
    /// is left alone.
    pub async fn crash(&mut self, i: usize) {
        if let Some(node) = self.detach(i) {
            node.crash().await;
        }
    }

    /// Start node `i` again on its data dir (stopping it gracefully first
    /// if it runs). An unknown index is a [`config::Error::Invalid`].
    ///
    /// On TCP the node listens on its previous ports again, so the
    /// bootstrap addresses others hold stay valid; if a port was taken
    /// meanwhile it falls back to fresh ones, with a warning. On the memory
    /// transport it always gets a fresh port: libp2p never frees a memory
    /// port once a swarm listened on it (its `Listener` has no `Drop`). When
    /// the address changed, the node also dials the running nodes that
    /// bootstrap to it, so the topology's edges come back either way.
    pub async fn restart(&mut self, i: usize) -> Result<(), StartError> {
        self.stop(i).await;
        let Some(slot) = self.slots.get(i) else {
            return Err(StartError::Config(config::Error::Invalid(format!(
                "the cluster has no node {i}"
            ))));
        };
        let old_addr = slot.dial_addr.clone();
        let mut fresh = slot.config.clone();
        // Whoever bootstraps to us would redial a dead address: dial them.
        fresh.network.bootstrap.extend(
            self.slots
                .iter()
                .filter(|s| s.node.is_some())
                .filter(|s| {
                    old_addr
                        .as_ref()
                        .is_some_and(|a| s.config.network.bootstrap.contains(a))
                })
                .filter_map(|s| s.dial_addr.clone()),
        );
        let pin = fresh.network.transport == TransportKind::Tcp && !slot.pinned.is_empty();
        let node = if pin {
            let mut pinned = slot.config.clone();
            pinned.network.listen = slot.pinned.clone();
            match Node::start(pinned).await {
                Ok(node) => node,
                Err(StartError::Net(net::StartError::Listen { addr, reason })) => {
                    warn!(node = i, %addr, %reason, "previous address taken; restarting on fresh ports");
                    start_when_closed(fresh).await?
                }
                Err(e) => return Err(e),
            }
        } else {
            Node::start(fresh).await?
        };
        self.attach(i, node);
        Ok(())
    }

    /// Stop every running node abruptly (concurrently), as a crash would,
    /// and consume the cluster: for tearing down a large simulation whose
    /// results are read, where a graceful stop would have every node
    /// announce its agents offline to all the others.
    pub async fn crash_all(mut self) {
        futures::future::join_all(self.take_running().into_iter().map(Node::crash)).await;
    }

    /// Stop every running node gracefully (concurrently) and consume the cluster.
    pub async fn shutdown(mut self) {
        futures::future::join_all(self.take_running().into_iter().map(Node::shutdown)).await;
    }

    /// Detach every running node.
    fn take_running(&mut self) -> Vec<Node> {
        self.slots
            .iter_mut()
            .filter_map(|s| s.node.take())
            .collect()
    }
}

/// Indices of the earlier nodes node `i` bootstraps to.
fn bootstrap_peers(topology: Topology, i: usize, rng: &mut SeededRng) -> Vec<usize> {
    if i == 0 {
        return Vec::new();
    }
    match topology {
        Topology::Chain => vec![i - 1],
        Topology::Star => vec![0],
        Topology::Random { degree, .. } => {
            let k = degree.max(1).min(i);
            // Partial Fisher-Yates over 0..i: k distinct picks.
            let mut pool: Vec<usize> = (0..i).collect();
            for s in 0..k {
                let j = s + rng.below(i - s);
                pool.swap(s, j);
            }
            pool.truncate(k);
            pool
        }
    }
}

/// Start a node right after a failed start on the same data dir. A failed
/// `Node::start` returns before its database writer has let go of the
/// file, so retry briefly while the database reports itself in use.
async fn start_when_closed(config: NodeConfig) -> Result<Node, StartError> {
    let deadline = std::time::Instant::now() + DB_RELEASE_WAIT;
    loop {
        match Node::start(config.clone()).await {
            Err(StartError::Store(crate::store::OpenError::InUse(_)))
                if std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

/// A small seeded RNG (SplitMix64): fast, and a seed reproduces a run
/// exactly. Not for anything that must be unpredictable.
#[derive(Debug, Clone)]
pub struct SeededRng(u64);

impl SeededRng {
    /// An RNG whose sequence is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        SeededRng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0); the modulo bias is negligible
    /// for the small `n` used here.
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        (self.next_u64() % n as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    /// Poll `f` until it holds; panic naming `what` after `secs`.
    async fn wait_until<F, Fut>(what: &str, secs: u64, mut f: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let check = || {
            let held = f();
            async move { held.await.then_some(()) }
        };
        crate::delivery::testing::wait_until(what, secs, check, String::new).await
    }

    /// Peer ids node `i` lists (connected or in its routing table).
    async fn listed(c: &Cluster, i: usize) -> HashSet<PeerId> {
        let Some(h) = c.handle(i) else {
            return HashSet::new();
        };
        h.peers()
            .await
            .map(|ps| ps.into_iter().map(|p| p.peer_id).collect())
            .unwrap_or_default()
    }

    fn memory(root: &Path, topology: Topology) -> ClusterOptions {
        ClusterOptions {
            transport: TransportKind::Memory,
            topology,
            root: root.to_path_buf(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn four_memory_nodes_in_a_chain_all_see_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cluster::start(4, memory(dir.path(), Topology::Chain), |_, _| {})
            .await
            .unwrap();
        assert_eq!(c.len(), 4);
        for i in 0..4 {
            let addr = c.dial_addr(i).unwrap();
            assert!(
                matches!(addr.iter().next(), Some(Protocol::Memory(p)) if p != 0),
                "node {i} listens on the memory transport: {addr}"
            );
            assert!(c.data_dir(i).unwrap().ends_with(format!("node{i}")));
        }
        for i in 0..4 {
            let me = c.node_id(i).unwrap();
            let others: HashSet<PeerId> = (0..4)
                .filter(|j| *j != i)
                .filter_map(|j| c.node_id(j))
                .collect();
            wait_until(&format!("node {i} to list the 3 others"), 30, || async {
                others.is_subset(&listed(&c, i).await)
            })
            .await;
            assert!(
                !listed(&c, i).await.contains(&me),
                "a node never lists itself"
            );
        }
        c.shutdown().await;
    }

    /// Crash node 0 of a star (the hub, which has no bootstrap peers of its
    /// own) and restart it: same id, and node 1 connects to it again.
    async fn hub_crashes_and_rejoins(transport: TransportKind) {
        let dir = tempfile::tempdir().unwrap();
        let opts = ClusterOptions {
            transport,
            topology: Topology::Star,
            root: dir.path().to_path_buf(),
        };
        let mut c = Cluster::start(3, opts, |_, _| {}).await.unwrap();
        let (id0, addr0) = (c.node_id(0).unwrap(), c.dial_addr(0).unwrap());
        let connected_to_0 = |c: &Cluster, i: usize| {
            let h = c.handle(i);
            async move {
                let Some(h) = h else { return false };
                h.peers()
                    .await
                    .is_ok_and(|ps| ps.iter().any(|p| p.peer_id == id0 && p.connected))
            }
        };
        let long = 30;
        wait_until("node 1 to connect to node 0", long, || {
            connected_to_0(&c, 1)
        })
        .await;

        c.crash(0).await;
        assert!(!c.is_running(0) && c.handle(0).is_none());
        assert_eq!(c.running(), 2);
        wait_until("node 1 to notice node 0 is gone", long, || async {
            !connected_to_0(&c, 1).await
        })
        .await;

        c.restart(0).await.unwrap();
        assert!(c.is_running(0));
        assert_eq!(c.node_id(0), Some(id0), "the id survives a restart");
        if transport == TransportKind::Tcp {
            assert_eq!(c.dial_addr(0), Some(addr0), "so does a TCP address");
        }
        wait_until("node 1 and node 0 to reconnect", long, || {
            connected_to_0(&c, 1)
        })
        .await;
        assert!(c.restart(7).await.is_err(), "unknown index is an error");
        c.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn crashed_memory_node_restarts_and_rejoins() {
        hub_crashes_and_rejoins(TransportKind::Memory).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn crashed_tcp_node_restarts_on_its_address_and_rejoins() {
        hub_crashes_and_rejoins(TransportKind::Tcp).await;
    }

    #[test]
    fn topologies_pick_earlier_nodes() {
        let mut rng = SeededRng::new(1);
        assert!(bootstrap_peers(Topology::Chain, 0, &mut rng).is_empty());
        assert_eq!(bootstrap_peers(Topology::Chain, 5, &mut rng), vec![4]);
        assert_eq!(bootstrap_peers(Topology::Star, 5, &mut rng), vec![0]);
        let random = Topology::Random { degree: 3, seed: 9 };
        let picks = |seed| {
            let mut rng = SeededRng::new(seed);
            (0..30)
                .map(|i| bootstrap_peers(random, i, &mut rng))
                .collect::<Vec<_>>()
        };
        let a = picks(9);
        assert_eq!(a, picks(9), "same seed, same graph");
        assert_ne!(a, picks(10), "another seed, another graph");
        for (i, p) in a.iter().enumerate() {
            assert_eq!(p.len(), 3.min(i), "node {i}: {p:?}");
            assert!(
                p.iter().all(|j| *j < i),
                "node {i} picks earlier nodes: {p:?}"
            );
            assert_eq!(p.iter().collect::<HashSet<_>>().len(), p.len(), "distinct");
        }
    }
}
