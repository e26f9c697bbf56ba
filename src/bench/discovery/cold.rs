//! Part 3 of the discovery benchmark: capability lookups through the DHT
//! on a cold cache.
//!
//! A mesh of its own, with gossip and anti-entropy off on every node, so
//! the Kademlia provider records are the only way an ad can travel (as in
//! the test `dht_finds_agents_when_gossip_and_anti_entropy_are_off`). Each
//! run registers a new agent with a capability no other agent has on a
//! seeded-random provider node. A witness node looks the capability up
//! until it finds it, which shows the provider records are in place. Then
//! a third node, whose registry has never held the agent, looks it up
//! once: that one `find` call is the figure. It includes the Kademlia
//! provider query, the `FindAds` request to the provider, verifying and
//! storing the ad, and the local search.

use std::path::Path;
use std::time::{Duration, Instant};

use super::super::Error;
use super::super::support::{Summary, ms, poll_until};
use super::Opts;
use super::agents::{agent, registration};
use crate::cluster::{Cluster, SeededRng};
use crate::discovery::{Filter, NamePattern, Query};
use crate::node::NodeHandle;
use crate::wire::Capability;

/// How long the witness may take to find a new agent through the DHT.
const WITNESS_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between the witness's lookups.
const WITNESS_POLL: Duration = Duration::from_millis(20);

/// Start the gossip-less mesh under `root`, time `opts.dht_lookups` cold
/// lookups, and shut the mesh down.
pub(super) async fn run(opts: &Opts, root: &Path) -> Result<(), Error> {
    let n = opts.nodes;
    if n < 3 {
        return Err(Error::Failed(
            "cold DHT lookups need at least 3 nodes (provider, witness, asker)".into(),
        ));
    }
    println!();
    println!(
        "== capability lookup through the DHT on a cold cache: a new mesh of {n} nodes, gossip off and anti-entropy off on every node =="
    );
    let copts = opts.cluster_options(root);
    let t0 = Instant::now();
    let cluster = Cluster::start(n, copts, |_, c| {
        c.discovery.gossip = false;
        c.discovery.anti_entropy = false;
    })
    .await?;
    println!("started {n} nodes in {} ms", ms(t0.elapsed()));
    let result = measure(&cluster, opts).await;
    cluster.shutdown().await;
    result
}

async fn measure(cluster: &Cluster, opts: &Opts) -> Result<(), Error> {
    let nodes = cluster.handles();
    let peered = super::wait_all_peered(&nodes).await?;
    println!("every node had an identified peer after {} ms", ms(peered));
    // Its own seed stream, so adding this part changes no earlier choice.
    let mut rng = SeededRng::new(opts.seed.wrapping_add(0x00c0_1d00));
    let mut hits = Vec::with_capacity(opts.dht_lookups);
    let mut misses = 0usize;
    for r in 0..opts.dht_lookups {
        let [p, w, q] = three_distinct(&mut rng, nodes.len());
        let cap = format!("bench/cold-{r}");
        let mut reg = agent(&format!("cold-{r}"), r);
        reg.capabilities.push(Capability {
            name: cap.clone(),
            description: "a capability only this agent has".into(),
            tags: vec!["cold".into()],
            version: Some("1.0.0".into()),
        });
        let registered = Instant::now();
        let id = nodes[p]
            .discovery()
            .register(reg)
            .await
            .map_err(registration)?
            .agent_id;
        let query = Query {
            filter: Filter {
                name: Some(NamePattern::Exact(cap.clone())),
                ..Filter::default()
            },
            ..Query::default()
        };
        let tries = std::cell::Cell::new(0usize);
        // A witness that never finds it is reported, not fatal: the cold
        // lookup is then measured all the same (and is likely to miss).
        let witness = poll_until(
            &format!("the witness (node {w}) to find {cap} through the DHT"),
            WITNESS_POLL,
            WITNESS_TIMEOUT,
            || {
                tries.set(tries.get() + 1);
                let (h, q) = (&nodes[w], &query);
                async move { (!h.discovery().find(q).await.is_empty()).then_some(()) }
            },
            || format!("{} lookups found nothing", tries.get()),
        )
        .await;
        if let Err(e) = &witness {
            println!("lookup {}: {e}", r + 1);
        }
        let witnessed = registered.elapsed();
        let asker = &nodes[q];
        if knows(asker, &id) {
            return Err(Error::Failed(format!(
                "node {q} already held agent {id} before its lookup: the cache is not cold \
                 (is gossip or anti-entropy still on?)"
            )));
        }
        let t = Instant::now();
        let found = asker.discovery().find(&query).await;
        let took = t.elapsed();
        let ok = found.iter().any(|e| e.ad.body.agent_id == id);
        println!(
            "lookup {}: provider node {p}; witness node {w} {} {} ms after register (lookup #{}); \
             node {q} cold lookup: {} ms, {}",
            r + 1,
            if witness.is_ok() {
                "found it"
            } else {
                "gave up"
            },
            ms(witnessed),
            tries.get(),
            ms(took),
            if ok { "found" } else { "NOT found" }
        );
        if ok {
            hits.push(took);
        } else {
            misses += 1;
        }
    }
    match Summary::of(&hits) {
        Some(s) => println!(
            "cold DHT capability lookup over {} lookups ({misses} missed): {s}",
            hits.len()
        ),
        None => println!("cold DHT capability lookup: all {misses} lookups missed"),
    }
    Ok(())
}

/// Whether the node's registry holds the agent in any state.
fn knows(h: &NodeHandle, id: &crate::identity::AgentId) -> bool {
    h.discovery().with_registry(|r| r.get(id).is_some())
}

/// Three distinct indices below `n` (`n` >= 3).
fn three_distinct(rng: &mut SeededRng, n: usize) -> [usize; 3] {
    let a = rng.below(n);
    let mut b = rng.below(n - 1);
    if b >= a {
        b += 1;
    }
    let (lo, hi) = (a.min(b), a.max(b));
    let mut c = rng.below(n - 2);
    if c >= lo {
        c += 1;
    }
    if c >= hi {
        c += 1;
    }
    [a, b, c]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_distinct_indices() {
        let mut rng = SeededRng::new(7);
        for n in 3..12 {
            for _ in 0..200 {
                let [a, b, c] = three_distinct(&mut rng, n);
                assert!(a < n && b < n && c < n);
                assert!(a != b && b != c && a != c, "{a} {b} {c}");
            }
        }
    }
}
