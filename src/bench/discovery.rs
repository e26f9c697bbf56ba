//! `agentmesh bench discovery`: how fast an agent's ad reaches every node
//! of a mesh, and how fast a node that joins late holds the whole registry.
//!
//! 1. Ad convergence: once the mesh has formed (every node has an
//!    identified peer, and a warm-up ad has reached every node), register
//!    one agent on a seeded-random node and poll every node's
//!    `discovery().search` for its handle until all find it.
//! 2. Late joiner: register many agents across the mesh, wait until every
//!    node sees them all, then start a fresh node bootstrapped to one
//!    existing node and time how long its registry takes to hold them all.
//! 3. Cold DHT lookup: in a second mesh with gossip and anti-entropy off,
//!    time a capability lookup by a node that has never seen the agent, so
//!    it must go through the Kademlia provider records.
//!
//! # Layout
//! - `agents`: the registrations (realistic sizes).
//! - `late`: part 2.
//! - `cold`: part 3.

use std::path::Path;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};

use super::Error;
use super::support::{ScratchDir, Summary, ms, poll_until, print_machine};
use crate::cluster::{Cluster, ClusterOptions, SeededRng, Topology};
use crate::config::TransportKind;
use crate::discovery::Query;
use crate::node::NodeHandle;

mod agents;
mod cold;
mod late;

use agents::{agent, registration};

/// Poll period when timing a single ad or a single joiner.
pub(super) const POLL: Duration = Duration::from_millis(2);
/// Poll period while waiting for the mesh to form.
pub(super) const READY_POLL: Duration = Duration::from_millis(10);
/// How long the mesh may take to form.
pub(super) const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one ad may take to reach every node.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Transport of the benchmark mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TransportArg {
    /// Loopback TCP.
    Tcp,
    /// libp2p's in-process memory transport.
    Memory,
}

/// How the benchmark mesh is joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TopologyArg {
    /// Node i bootstraps to node i-1.
    Chain,
    /// Everyone bootstraps to node 0.
    Star,
    /// Each node bootstraps to `--degree` random earlier nodes.
    Random,
}

/// `agentmesh bench discovery` options.
#[derive(Args, Debug, Clone)]
pub struct Opts {
    /// Nodes in the mesh (at least 2).
    #[arg(long, default_value_t = 20)]
    pub nodes: usize,
    /// Ad-convergence repetitions, each with a new agent (0 skips them).
    #[arg(long, default_value_t = 7)]
    pub runs: usize,
    /// Agents registered across the mesh before the late joiners come.
    #[arg(long, default_value_t = 1000)]
    pub agents: usize,
    /// Late joiners, one after the other (0 skips the late-joiner part).
    #[arg(long, default_value_t = 3)]
    pub joins: usize,
    /// Cold capability lookups through the DHT, in a second mesh of
    /// `--nodes` nodes with gossip and anti-entropy off (0 skips them).
    #[arg(long, default_value_t = 20)]
    pub dht_lookups: usize,
    /// Transport.
    #[arg(long, value_enum, default_value_t = TransportArg::Tcp)]
    pub transport: TransportArg,
    /// How nodes bootstrap to each other.
    #[arg(long, value_enum, default_value_t = TopologyArg::Random)]
    pub topology: TopologyArg,
    /// Bootstrap peers per node with `--topology random`.
    #[arg(long, default_value_t = 3)]
    pub degree: usize,
    /// Seed of the topology and of the choice of nodes.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

impl Opts {
    fn check(&self) -> Result<(), Error> {
        if self.nodes < 2 {
            return Err(Error::Failed("--nodes must be at least 2".into()));
        }
        if self.dht_lookups > 0 && self.nodes < 3 {
            return Err(Error::Failed(
                "cold DHT lookups need at least 3 nodes (provider, witness, asker): \
                 give --nodes 3 or more, or --dht-lookups 0"
                    .into(),
            ));
        }
        if self.joins > 0 && self.agents == 0 {
            return Err(Error::Failed(
                "late joiners need agents to catch up with: give --agents 1 or more, or --joins 0"
                    .into(),
            ));
        }
        Ok(())
    }

    fn cluster_options(&self, root: &Path) -> ClusterOptions {
        ClusterOptions {
            transport: match self.transport {
                TransportArg::Tcp => TransportKind::Tcp,
                TransportArg::Memory => TransportKind::Memory,
            },
            topology: match self.topology {
                TopologyArg::Chain => Topology::Chain,
                TopologyArg::Star => Topology::Star,
                TopologyArg::Random => Topology::Random {
                    degree: self.degree,
                    seed: self.seed,
                },
            },
            root: root.to_path_buf(),
        }
    }
}

/// Run the benchmark and print its figures.
pub async fn run(opts: Opts) -> Result<(), Error> {
    opts.check()?;
    let scratch = ScratchDir::new("discovery")?;
    let copts = opts.cluster_options(scratch.path());
    let d = copts.node_config(scratch.path()).discovery;
    println!("agentmesh bench discovery");
    print_machine();
    println!(
        "mesh: {} nodes, {} transport, {} topology (degree {}, seed {}), data under {}",
        opts.nodes,
        name(opts.transport),
        name(opts.topology),
        opts.degree,
        opts.seed,
        scratch.path().display()
    );
    println!(
        "discovery config (defaults): ad ttl {} s, refresh every {} s, anti-entropy every {} s, gossip {}, anti-entropy {}",
        d.ad_ttl.as_secs(),
        d.refresh_interval.as_secs(),
        d.anti_entropy_interval.as_secs(),
        on_off(d.gossip),
        on_off(d.anti_entropy)
    );
    if opts.runs > 0 || opts.joins > 0 {
        let t0 = Instant::now();
        let cluster = Cluster::start(opts.nodes, copts, |_, _| {}).await?;
        println!("started {} nodes in {} ms", cluster.len(), ms(t0.elapsed()));
        let result = measure(&cluster, &opts, scratch.path()).await;
        cluster.shutdown().await;
        result?;
    }
    if opts.dht_lookups > 0 {
        cold::run(&opts, &scratch.path().join("cold")).await?;
    }
    Ok(())
}

/// The command-line spelling of an option value.
/// Wait until every node has an identified peer; returns how long it took.
async fn wait_all_peered(nodes: &[NodeHandle]) -> Result<Duration, Error> {
    let t0 = Instant::now();
    poll_until(
        "every node to have an identified peer",
        READY_POLL,
        READY_TIMEOUT,
        || std::future::ready(nodes.iter().all(has_peer).then_some(())),
        || {
            format!(
                "{} of {} nodes have one",
                nodes.iter().filter(|h| has_peer(h)).count(),
                nodes.len()
            )
        },
    )
    .await?;
    Ok(t0.elapsed())
}

fn name(v: impl ValueEnum) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_string())
        .unwrap_or_default()
}

fn on_off(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

async fn measure(cluster: &Cluster, opts: &Opts, root: &Path) -> Result<(), Error> {
    let nodes = cluster.handles();
    let mut rng = SeededRng::new(opts.seed);
    let peered = wait_all_peered(&nodes).await?;
    let first = nodes
        .first()
        .ok_or_else(|| Error::Failed("the mesh has no nodes".into()))?;
    first
        .discovery()
        .register(agent("warmup", 0))
        .await
        .map_err(registration)?;
    let warm = spread(&nodes, "warmup", Instant::now()).await?;
    println!(
        "mesh formed: every node had an identified peer after {} ms; a warm-up ad then reached every node in {} ms",
        ms(peered),
        ms(warm.last().copied().unwrap_or_default())
    );

    if opts.runs > 0 {
        convergence(&nodes, opts.runs, &mut rng).await?;
    }
    if opts.joins > 0 {
        late::run(cluster, &nodes, opts, root, &mut rng).await?;
    }
    Ok(())
}

/// Part 1: one new agent at a time, time until every node finds it.
async fn convergence(nodes: &[NodeHandle], runs: usize, rng: &mut SeededRng) -> Result<(), Error> {
    println!();
    println!(
        "== ad convergence: register one agent; time from the register call until `search` finds it on all {} nodes (polled every {} ms) ==",
        nodes.len(),
        POLL.as_millis()
    );
    let mut all = Vec::with_capacity(runs);
    for r in 0..runs {
        let k = rng.below(nodes.len());
        let handle = format!("probe-{r}");
        let t0 = Instant::now();
        nodes[k]
            .discovery()
            .register(agent(&handle, r))
            .await
            .map_err(registration)?;
        let registered = t0.elapsed();
        let seen = spread(nodes, &handle, t0).await?;
        let last = seen.last().copied().unwrap_or_default();
        println!(
            "run {}: on node {k}: register returned after {} ms; every node found it after {} ms (half of them by {} ms)",
            r + 1,
            ms(registered),
            ms(last),
            ms(seen[seen.len() / 2])
        );
        all.push(last);
    }
    if let Some(s) = Summary::of(&all) {
        println!("ad convergence over {runs} runs: {s}");
    }
    Ok(())
}

/// Whether the node has an identified peer of the mesh.
pub(super) fn has_peer(h: &NodeHandle) -> bool {
    !h.discovery().connected_peers().is_empty()
}

/// Poll until every node's `search` finds `handle`; returns, sorted, the
/// time since `t0` at which each node first found it.
async fn spread(nodes: &[NodeHandle], handle: &str, t0: Instant) -> Result<Vec<Duration>, Error> {
    let q = Query {
        handle: Some(handle.to_string()),
        ..Query::default()
    };
    let finds = |h: &NodeHandle| !h.discovery().search(&q).is_empty();
    let mut seen: Vec<Option<Duration>> = vec![None; nodes.len()];
    let mut times = poll_until(
        &format!("every node to find @{handle}"),
        POLL,
        CONVERGE_TIMEOUT,
        || {
            for (s, h) in seen.iter_mut().zip(nodes) {
                if s.is_none() && finds(h) {
                    *s = Some(t0.elapsed());
                }
            }
            std::future::ready(seen.iter().copied().collect::<Option<Vec<Duration>>>())
        },
        || {
            format!(
                "{} of {} nodes find it",
                nodes.iter().filter(|h| finds(h)).count(),
                nodes.len()
            )
        },
    )
    .await?;
    times.sort();
    Ok(times)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_options_are_errors() {
        let mut o = Opts {
            nodes: 1,
            runs: 1,
            agents: 0,
            joins: 0,
            dht_lookups: 0,
            transport: TransportArg::Memory,
            topology: TopologyArg::Chain,
            degree: 3,
            seed: 1,
        };
        assert!(o.check().is_err(), "one node is not a mesh");
        o.nodes = 2;
        o.check().unwrap();
        o.joins = 1;
        assert!(o.check().is_err(), "a joiner needs agents");
        o.joins = 0;
        o.dht_lookups = 1;
        assert!(o.check().is_err(), "a cold lookup needs three nodes");
        o.nodes = 3;
        o.check().unwrap();
    }
}
