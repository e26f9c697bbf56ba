//! Part 2 of the discovery benchmark: many agents across the mesh, then
//! fresh nodes that must catch up with all of them.

use std::path::Path;
use std::time::{Duration, Instant};

use super::super::Error;
use super::super::support::{Summary, ms, poll_until};
use super::agents::{agent, capabilities, registration};
use super::{Opts, POLL};
use crate::cluster::{Cluster, SeededRng};
use crate::node::{Node, NodeHandle};
use crate::wire;

/// Poll period while many agents spread (scanning every node's registry).
const BULK_POLL: Duration = Duration::from_millis(10);
/// How long the bulk registrations may take to reach every node.
const BULK_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a late joiner may take to hold every agent.
const JOIN_TIMEOUT: Duration = Duration::from_secs(120);
/// Handles of the bulk agents start with this.
const BULK_PREFIX: &str = "bulk-";
/// Coverage marks reported while the bulk agents spread, in percent.
const MARKS: [usize; 3] = [50, 90, 99];

/// Register `opts.agents` agents over the mesh, wait until every node sees
/// them all, then time `opts.joins` fresh nodes catching up, one at a time.
pub(super) async fn run(
    cluster: &Cluster,
    nodes: &[NodeHandle],
    opts: &Opts,
    root: &Path,
    rng: &mut SeededRng,
) -> Result<(), Error> {
    let a = opts.agents;
    println!();
    println!(
        "== late joiner: {a} agents spread over {} nodes; then a fresh node bootstraps to one of them ==",
        nodes.len()
    );
    register_all(nodes, a).await?;
    let mut times = Vec::with_capacity(opts.joins);
    for j in 0..opts.joins {
        let k = rng.below(cluster.len());
        let (connected, full) = join(cluster, k, &root.join(format!("joiner{j}")), a).await?;
        println!(
            "join {}: bootstrapped to node {k}; identified a peer after {} ms; held all {a} agents after {} ms",
            j + 1,
            connected.map(ms).unwrap_or_else(|| "?".into()),
            ms(full)
        );
        times.push(full);
    }
    if let Some(s) = Summary::of(&times) {
        let each: Vec<String> = times.iter().map(|t| ms(*t)).collect();
        println!(
            "late joiner held all {a} agents after: {} ms; median {} ms",
            each.join(", "),
            ms(s.median)
        );
    }
    Ok(())
}

/// Register `a` agents round-robin over the nodes (each node registering
/// its share in sequence, all nodes at once) and report how the
/// (node, agent) pairs fill up until every node sees every agent.
async fn register_all(nodes: &[NodeHandle], a: usize) -> Result<(), Error> {
    let total = a * nodes.len();
    let covered = || nodes.iter().map(bulk_count).sum::<usize>();
    let t0 = Instant::now();
    let registrations = async {
        let per_node = nodes.iter().enumerate().map(|(k, h)| async move {
            for i in (k..a).step_by(nodes.len()) {
                h.discovery()
                    .register(agent(&format!("{BULK_PREFIX}{i:05}"), i))
                    .await
                    .map_err(registration)?;
            }
            Ok::<(), Error>(())
        });
        for r in futures::future::join_all(per_node).await {
            r?;
        }
        Ok::<_, Error>((t0.elapsed(), covered()))
    };
    let mut reached: [Option<Duration>; MARKS.len()] = [None; MARKS.len()];
    let watch = poll_until(
        "every node to see every agent",
        BULK_POLL,
        BULK_TIMEOUT,
        || {
            let counts: Vec<usize> = nodes.iter().map(bulk_count).collect();
            let (c, now) = (counts.iter().sum::<usize>(), t0.elapsed());
            for (m, r) in MARKS.iter().zip(reached.iter_mut()) {
                if r.is_none() && c * 100 >= m * total {
                    *r = Some(now);
                }
            }
            std::future::ready(counts.iter().all(|n| *n >= a).then_some(now))
        },
        || {
            let least = nodes.iter().map(bulk_count).min().unwrap_or(0);
            format!("the node seeing fewest sees {least} of {a}")
        },
    );
    let ((registered, covered_then), converged) = tokio::try_join!(registrations, watch)?;
    let ad_bytes = nodes.first().map_or(0, |h| {
        h.discovery().with_registry(|r| {
            r.active()
                .find(|e| e.ad.body.handle.starts_with(BULK_PREFIX))
                .map_or(0, |e| wire::encode(&e.ad).len())
        })
    });
    println!(
        "registered {a} agents ({} capabilities each, {ad_bytes} bytes per signed ad) in {} ms; \
         nodes then knew {:.1}% of the {total} (node, agent) pairs",
        capabilities(0).len(),
        ms(registered),
        percent(covered_then, total)
    );
    let marks: Vec<String> = MARKS
        .iter()
        .zip(reached)
        .map(|(m, r)| format!("{m}% at {} ms", r.map(ms).unwrap_or_else(|| "?".into())))
        .collect();
    println!(
        "(node, agent) pairs known: {}; all (every node saw all {a} agents) at {} ms",
        marks.join(", "),
        ms(converged)
    );
    Ok(())
}

/// Start a fresh node in `dir` bootstrapped to node `k`, and time from
/// `Node::start` returning until it has an identified peer and until its
/// registry holds all `a` bulk agents. The node is stopped and its dir
/// removed afterwards.
async fn join(
    cluster: &Cluster,
    k: usize,
    dir: &Path,
    a: usize,
) -> Result<(Option<Duration>, Duration), Error> {
    let mut cfg = cluster.options().node_config(dir);
    cfg.network.bootstrap = cluster.dial_addr(k).into_iter().collect();
    let node = Node::start(cfg).await?;
    let t0 = Instant::now();
    let h = node.handle();
    let mut connected = None;
    let full = poll_until(
        "the late joiner to hold every agent",
        POLL,
        JOIN_TIMEOUT,
        || {
            if connected.is_none() && !h.discovery().connected_peers().is_empty() {
                connected = Some(t0.elapsed());
            }
            std::future::ready((bulk_count(&h) >= a).then(|| t0.elapsed()))
        },
        || format!("it holds {} of {a}", bulk_count(&h)),
    )
    .await;
    drop(h);
    node.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
    Ok((connected, full?))
}

/// Active bulk agents in a node's registry.
fn bulk_count(h: &NodeHandle) -> usize {
    h.discovery().with_registry(|r| {
        r.active()
            .filter(|e| e.ad.body.handle.starts_with(BULK_PREFIX))
            .count()
    })
}

fn percent(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        100.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}
