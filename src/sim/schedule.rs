//! The schedule: a scenario's timeline turned, with a seeded RNG, into
//! concrete actions on node indices. Pure (no I/O, no clock): the same
//! scenario and seed give the same plan, so a failing seed reproduces.
//!
//! Node indices are the [`Cluster`](crate::cluster::Cluster)'s slots:
//! `0..mesh.nodes` at the start, then one more per joining node, in order.
//! The planner tracks which slots are up, crashed or gone, so every choice
//! is valid when it is made (a crash picks running nodes, a restart picks
//! crashed ones), and it knows in advance which slots leave for good.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use super::events::{Count, EventKind};
use super::scenario::Scenario;
use crate::cluster::SeededRng;

/// Nodes a crash or a departure always leaves running.
const MIN_UP: usize = 2;

/// What happens at one moment.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Kill these nodes abruptly.
    Crash(Vec<usize>),
    /// Start these crashed nodes again on their data dirs.
    Restart(Vec<usize>),
    /// Stop these nodes gracefully, for good.
    Leave(Vec<usize>),
    /// Start fresh nodes in these (new) slots.
    Join {
        /// Their slots.
        nodes: Vec<usize>,
        /// A `late_join` event (rather than churn).
        late: bool,
    },
    /// Split the nodes into groups; slots past `group_of` (nodes that join
    /// later) go to group `slot % groups`.
    Partition {
        /// Number of groups.
        groups: usize,
        /// Group of each slot that exists at that moment.
        group_of: Vec<usize>,
    },
    /// Remove the partition.
    Heal,
    /// Delay requests to and from these nodes.
    Slow {
        /// The nodes.
        nodes: Vec<usize>,
        /// One-way delay.
        delay: Duration,
    },
    /// Remove the delay of these nodes.
    Unslow(Vec<usize>),
    /// Register convergence probe `n` on this node.
    Probe {
        /// Node (it runs at that moment, as planned).
        node: usize,
        /// Probe number.
        n: usize,
    },
}

impl Action {
    /// A short label for plots and logs.
    pub fn label(&self) -> String {
        match self {
            Action::Crash(n) => format!("crash {}", n.len()),
            Action::Restart(n) => format!("restart {}", n.len()),
            Action::Leave(n) => format!("leave {}", n.len()),
            Action::Join { nodes, late: true } => format!("late join {}", nodes.len()),
            Action::Join { nodes, .. } => format!("join {}", nodes.len()),
            Action::Partition { groups, .. } => format!("partition {groups}"),
            Action::Heal => "heal".into(),
            Action::Slow { nodes, .. } => format!("slow {}", nodes.len()),
            Action::Unslow(n) => format!("unslow {}", n.len()),
            Action::Probe { n, .. } => format!("probe {n}"),
        }
    }
}

/// One action at a timeline time.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Timeline time.
    pub at: Duration,
    /// What.
    pub action: Action,
}

/// The whole schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Nodes at the start.
    pub initial: usize,
    /// Slots by the end (initial plus joiners).
    pub slots: usize,
    /// Actions in time order.
    pub steps: Vec<Step>,
    /// Slots that leave for good (never running at the end).
    pub departed: BTreeSet<usize>,
}

impl Plan {
    /// Whether slot `i` is never removed for good.
    pub fn survives(&self, i: usize) -> bool {
        !self.departed.contains(&i)
    }
}

/// A timeline entry before choices are made.
#[derive(Debug, Clone)]
enum Item {
    Crash {
        id: usize,
        count: Count,
    },
    RestartOf {
        id: usize,
    },
    Restart {
        count: Option<Count>,
    },
    Replace {
        k: usize,
    },
    Partition {
        weights: Vec<f64>,
    },
    Heal,
    Slow {
        id: usize,
        count: Count,
        delay: Duration,
    },
    UnslowOf {
        id: usize,
    },
    LateJoin {
        nodes: usize,
    },
    Probe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Up,
    Crashed,
    Gone,
}

/// Plan a scenario's timeline with this seed.
pub fn plan(s: &Scenario, seed: u64) -> Plan {
    let mut items: Vec<(Duration, usize, usize, Item)> = Vec::new();
    for (id, e) in s.events.iter().enumerate() {
        let mut push = |at: Duration, sub: usize, item: Item| items.push((at, id, sub, item));
        match &e.kind {
            EventKind::Churn {
                rate_per_min,
                every,
                until,
            } => {
                let per_step = s.mesh.nodes as f64 * rate_per_min * every.as_secs_f64() / 60.0;
                let (mut acc, mut t, mut sub) = (0.0f64, e.at, 0);
                while t < *until {
                    acc += per_step;
                    let k = (acc + 1e-9).floor();
                    acc -= k;
                    if k >= 1.0 {
                        push(t, sub, Item::Replace { k: k as usize });
                    }
                    t += *every;
                    sub += 1;
                }
            }
            EventKind::Crash {
                count,
                restart_after,
            } => {
                push(e.at, 0, Item::Crash { id, count: *count });
                if let Some(d) = restart_after {
                    push(e.at + *d, 1, Item::RestartOf { id });
                }
            }
            EventKind::Restart { count } => push(e.at, 0, Item::Restart { count: *count }),
            EventKind::Partition { weights } => push(
                e.at,
                0,
                Item::Partition {
                    weights: weights.clone(),
                },
            ),
            EventKind::Heal => push(e.at, 0, Item::Heal),
            EventKind::SlowLink {
                count,
                delay,
                duration,
            } => {
                push(
                    e.at,
                    0,
                    Item::Slow {
                        id,
                        count: *count,
                        delay: *delay,
                    },
                );
                if let Some(d) = duration {
                    push(e.at + *d, 1, Item::UnslowOf { id });
                }
            }
            EventKind::LateJoin { nodes } => push(e.at, 0, Item::LateJoin { nodes: *nodes }),
        }
    }
    if let Some(every) = s.convergence.probe_every {
        let mut t = every;
        while t < s.duration {
            items.push((t, usize::MAX, 0, Item::Probe));
            t += every;
        }
    }
    items.sort_by_key(|(at, id, sub, _)| (*at, *id, *sub));

    let mut rng = SeededRng::new(seed ^ 0x5CED_0000_0000_0001);
    let mut st = vec![St::Up; s.mesh.nodes];
    let mut crashed_by: HashMap<usize, Vec<usize>> = HashMap::new();
    let mut slowed_by: HashMap<usize, Vec<usize>> = HashMap::new();
    let (mut steps, mut probes) = (Vec::new(), 0usize);
    let mut partitioned = false;
    for (at, _, _, item) in items {
        let up: Vec<usize> = with(&st, St::Up);
        let mut step = |action: Action| steps.push(Step { at, action });
        match item {
            Item::Crash { id, count } => {
                let k = count.of(up.len()).min(up.len().saturating_sub(MIN_UP));
                let chosen = pick(&mut rng, &up, k);
                for &i in &chosen {
                    st[i] = St::Crashed;
                }
                crashed_by.insert(id, chosen.clone());
                if !chosen.is_empty() {
                    step(Action::Crash(chosen));
                }
            }
            Item::RestartOf { id } => {
                let back: Vec<usize> = crashed_by
                    .remove(&id)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|&i| st[i] == St::Crashed)
                    .collect();
                for &i in &back {
                    st[i] = St::Up;
                }
                if !back.is_empty() {
                    step(Action::Restart(back));
                }
            }
            Item::Restart { count } => {
                let down = with(&st, St::Crashed);
                let k = count.map_or(down.len(), |c| c.of(down.len()));
                let back = pick(&mut rng, &down, k);
                for &i in &back {
                    st[i] = St::Up;
                }
                if !back.is_empty() {
                    step(Action::Restart(back));
                }
            }
            Item::Replace { k } => {
                let k = k.min(up.len().saturating_sub(MIN_UP));
                let gone = pick(&mut rng, &up, k);
                for &i in &gone {
                    st[i] = St::Gone;
                }
                let fresh: Vec<usize> = (st.len()..st.len() + gone.len()).collect();
                st.extend(fresh.iter().map(|_| St::Up));
                if !gone.is_empty() {
                    step(Action::Leave(gone));
                    step(Action::Join {
                        nodes: fresh,
                        late: false,
                    });
                }
            }
            Item::Partition { weights } => {
                if partitioned {
                    step(Action::Heal);
                }
                partitioned = true;
                step(Action::Partition {
                    groups: weights.len(),
                    group_of: split(&mut rng, st.len(), &weights),
                });
            }
            Item::Heal => {
                if partitioned {
                    partitioned = false;
                    step(Action::Heal);
                }
            }
            Item::Slow { id, count, delay } => {
                let chosen = pick(&mut rng, &up, count.of(up.len()));
                slowed_by.insert(id, chosen.clone());
                if !chosen.is_empty() {
                    step(Action::Slow {
                        nodes: chosen,
                        delay,
                    });
                }
            }
            Item::UnslowOf { id } => {
                let nodes = slowed_by.remove(&id).unwrap_or_default();
                if !nodes.is_empty() {
                    step(Action::Unslow(nodes));
                }
            }
            Item::LateJoin { nodes } => {
                let fresh: Vec<usize> = (st.len()..st.len() + nodes).collect();
                st.extend(fresh.iter().map(|_| St::Up));
                step(Action::Join {
                    nodes: fresh,
                    late: true,
                });
            }
            Item::Probe => {
                if !up.is_empty() {
                    let node = up[rng.below(up.len())];
                    step(Action::Probe { node, n: probes });
                    probes += 1;
                }
            }
        }
    }
    Plan {
        initial: s.mesh.nodes,
        slots: st.len(),
        departed: with(&st, St::Gone).into_iter().collect(),
        steps,
    }
}

fn with(st: &[St], want: St) -> Vec<usize> {
    (0..st.len()).filter(|&i| st[i] == want).collect()
}

/// `k` distinct members of `from` (partial Fisher-Yates), sorted.
fn pick(rng: &mut SeededRng, from: &[usize], k: usize) -> Vec<usize> {
    let mut pool = from.to_vec();
    let k = k.min(pool.len());
    for s in 0..k {
        let j = s + rng.below(pool.len() - s);
        pool.swap(s, j);
    }
    pool.truncate(k);
    pool.sort_unstable();
    pool
}

/// Assign `n` slots to groups of sizes proportional to `weights`, at random.
fn split(rng: &mut SeededRng, n: usize, weights: &[f64]) -> Vec<usize> {
    let all: Vec<usize> = (0..n).collect();
    let order = {
        let mut o = all.clone();
        for s in 0..n {
            let j = s + rng.below(n - s);
            o.swap(s, j);
        }
        o
    };
    let total: f64 = weights.iter().sum();
    let mut group_of = vec![0; n];
    let (mut start, mut acc) = (0usize, 0.0f64);
    for (g, w) in weights.iter().enumerate() {
        acc += w;
        let end = if g + 1 == weights.len() {
            n
        } else {
            ((acc / total * n as f64).round() as usize).clamp(start, n)
        };
        for &slot in &order[start..end] {
            group_of[slot] = g;
        }
        start = end;
    }
    group_of
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn scenario(events: &str) -> Scenario {
        let text = format!(
            "duration = \"120s\"\n[mesh]\nnodes = 30\n[convergence]\nprobe_every = \"25s\"\n{events}"
        );
        Scenario::parse(Path::new("t.toml"), &text).unwrap()
    }

    const MIXED: &str = r#"
[[events]]
at = "10s"
kind = "churn"
rate_per_min = 0.2
every = "10s"
until = "70s"
[[events]]
at = "20s"
kind = "crash"
nodes = 4
restart_after = "15s"
[[events]]
at = "30s"
kind = "partition"
groups = [2, 1]
[[events]]
at = "50s"
kind = "heal"
[[events]]
at = "40s"
kind = "slow_link"
fraction = 0.1
delay = "100ms"
duration = "20s"
[[events]]
at = "60s"
kind = "late_join"
nodes = 3
[[events]]
at = "80s"
kind = "crash"
fraction = 0.2
[[events]]
at = "100s"
kind = "restart"
"#;

    #[test]
    fn same_seed_same_plan_other_seed_other_plan() {
        let s = scenario(MIXED);
        assert_eq!(plan(&s, 7), plan(&s, 7));
        assert_ne!(plan(&s, 7), plan(&s, 8));
    }

    #[test]
    fn churn_replaces_the_configured_share_per_minute() {
        let p = plan(&scenario(MIXED), 1);
        // 30 nodes x 0.2 per minute x 60 s of churn = 6 left, 6 joined.
        let left: usize = p
            .steps
            .iter()
            .map(|s| match &s.action {
                Action::Leave(n) => n.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(left, 6);
        assert_eq!(p.departed.len(), 6);
        assert_eq!(p.slots, 30 + 6 + 3);
        assert!(p.departed.iter().all(|&i| !p.survives(i)));
    }

    #[test]
    fn choices_respect_node_states() {
        let p = plan(&scenario(MIXED), 3);
        let mut st = vec![St::Up; p.initial];
        let mut last = Duration::ZERO;
        let mut next_slot = p.initial;
        for s in &p.steps {
            assert!(s.at >= last, "steps are in time order");
            last = s.at;
            match &s.action {
                Action::Crash(n) => n.iter().for_each(|&i| {
                    assert_eq!(st[i], St::Up, "crash picks running nodes");
                    st[i] = St::Crashed;
                }),
                Action::Restart(n) => n.iter().for_each(|&i| {
                    assert_eq!(st[i], St::Crashed, "restart picks crashed nodes");
                    st[i] = St::Up;
                }),
                Action::Leave(n) => n.iter().for_each(|&i| {
                    assert_eq!(st[i], St::Up, "only running nodes leave");
                    st[i] = St::Gone;
                }),
                Action::Join { nodes, .. } => nodes.iter().for_each(|&i| {
                    assert_eq!(i, next_slot, "joiners take the next slots in order");
                    next_slot += 1;
                    st.push(St::Up);
                }),
                Action::Partition { group_of, groups } => {
                    assert_eq!(group_of.len(), st.len(), "every existing slot has a group");
                    assert_eq!(*groups, 2);
                    let big = group_of.iter().filter(|g| **g == 0).count();
                    assert_eq!(big, (st.len() as f64 * 2.0 / 3.0).round() as usize);
                }
                Action::Probe { node, .. } => assert_eq!(st[*node], St::Up),
                Action::Slow { nodes, .. } | Action::Unslow(nodes) => assert!(!nodes.is_empty()),
                Action::Heal => {}
            }
            assert!(with(&st, St::Up).len() >= MIN_UP);
        }
        assert!(
            with(&st, St::Crashed).is_empty(),
            "the final restart brings all back"
        );
        assert_eq!(next_slot, p.slots);
    }

    #[test]
    fn restart_after_brings_back_the_same_nodes() {
        let p = plan(
            &scenario(
                "[[events]]\nat = \"20s\"\nkind = \"crash\"\nnodes = 5\nrestart_after = \"10s\"\n",
            ),
            11,
        );
        let crashed = p.steps.iter().find_map(|s| match &s.action {
            Action::Crash(n) => Some((s.at, n.clone())),
            _ => None,
        });
        let restarted = p.steps.iter().find_map(|s| match &s.action {
            Action::Restart(n) => Some((s.at, n.clone())),
            _ => None,
        });
        let (c_at, c) = crashed.unwrap();
        let (r_at, r) = restarted.unwrap();
        assert_eq!(
            (c.len(), c_at, r_at),
            (5, Duration::from_secs(20), Duration::from_secs(30))
        );
        assert_eq!(c, r);
        let probes = p
            .steps
            .iter()
            .filter(|s| matches!(s.action, Action::Probe { .. }))
            .count();
        assert_eq!(probes, 4, "every 25 s before 120 s");
    }

    #[test]
    fn a_crash_never_takes_the_mesh_below_two_nodes() {
        let p = plan(
            &scenario("[[events]]\nat = \"1s\"\nkind = \"crash\"\nfraction = 1.0\n"),
            1,
        );
        match &p.steps[0].action {
            Action::Crash(n) => assert_eq!(n.len(), 28),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn split_sizes_follow_weights() {
        let mut rng = SeededRng::new(5);
        let g = split(&mut rng, 10, &[1.0, 1.0, 2.0]);
        let sizes: Vec<usize> = (0..3)
            .map(|k| g.iter().filter(|x| **x == k).count())
            .collect();
        assert_eq!(sizes, vec![3, 2, 5]);
    }
}
