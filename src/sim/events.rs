//! The `[[events]]` timeline of a scenario: one flat table per event,
//! whose `kind` says which other keys it takes. A key another kind uses is
//! an error naming the event and the key, as is a key no kind uses.

use std::time::Duration;

use serde::Deserialize;

use super::scenario::Dur;

/// How many nodes an event touches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Count {
    /// Exactly this many (capped by what is available).
    Nodes(usize),
    /// This fraction of the nodes eligible at that moment (at least one).
    Fraction(f64),
}

impl Count {
    /// How many of `n` eligible nodes.
    pub fn of(self, n: usize) -> usize {
        match self {
            Count::Nodes(k) => k.min(n),
            Count::Fraction(f) => ((f * n as f64).round() as usize).clamp(1, n.max(1)).min(n),
        }
    }
}

/// One fault event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Timeline time.
    pub at: Duration,
    /// What happens.
    pub kind: EventKind,
}

/// What an event does.
#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    /// From `at` until `until`, every `every`: stop random running nodes
    /// gracefully for good and start as many fresh ones, so that
    /// `rate_per_min` × `mesh.nodes` nodes are replaced per minute.
    Churn {
        /// Fraction of `mesh.nodes` replaced per minute.
        rate_per_min: f64,
        /// Step of the replacement.
        every: Duration,
        /// End (exclusive) of the churn.
        until: Duration,
    },
    /// Kill random running nodes abruptly (their databases stay).
    Crash {
        /// How many.
        count: Count,
        /// Restart the same nodes this long after.
        restart_after: Option<Duration>,
    },
    /// Restart crashed nodes (all of them when no count is given).
    Restart {
        /// How many.
        count: Option<Count>,
    },
    /// Split every node into groups (random, by these weights) that cannot
    /// reach each other; a partition in force is healed first.
    Partition {
        /// Relative sizes of the groups.
        weights: Vec<f64>,
    },
    /// Remove the partition.
    Heal,
    /// Delay every request to and from random running nodes.
    SlowLink {
        /// How many nodes.
        count: Count,
        /// One-way delay added to each request.
        delay: Duration,
        /// Remove the delay after this long (else it stays until the drain).
        duration: Option<Duration>,
    },
    /// Start fresh nodes, which must catch up with the registry.
    LateJoin {
        /// How many.
        nodes: usize,
    },
}

/// An event as written; the `kind` decides which keys may be present.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEvent {
    at: Dur,
    kind: String,
    nodes: Option<usize>,
    fraction: Option<f64>,
    restart_after: Option<Dur>,
    groups: Option<Vec<f64>>,
    delay: Option<Dur>,
    duration: Option<Dur>,
    rate_per_min: Option<f64>,
    every: Option<Dur>,
    until: Option<Dur>,
}

/// The kinds and the keys (besides `at` and `kind`) each accepts.
const KINDS: [(&str, &[&str]); 7] = [
    ("churn", &["rate_per_min", "every", "until"]),
    ("crash", &["nodes", "fraction", "restart_after"]),
    ("restart", &["nodes", "fraction"]),
    ("partition", &["groups"]),
    ("heal", &[]),
    ("slow_link", &["nodes", "fraction", "delay", "duration"]),
    ("late_join", &["nodes"]),
];

impl RawEvent {
    fn present(&self) -> Vec<&'static str> {
        [
            ("nodes", self.nodes.is_some()),
            ("fraction", self.fraction.is_some()),
            ("restart_after", self.restart_after.is_some()),
            ("groups", self.groups.is_some()),
            ("delay", self.delay.is_some()),
            ("duration", self.duration.is_some()),
            ("rate_per_min", self.rate_per_min.is_some()),
            ("every", self.every.is_some()),
            ("until", self.until.is_some()),
        ]
        .into_iter()
        .filter_map(|(k, p)| p.then_some(k))
        .collect()
    }

    /// `nodes` or `fraction`, at most one of them.
    fn count(&self, what: &str) -> Result<Option<Count>, String> {
        match (self.nodes, self.fraction) {
            (Some(_), Some(_)) => Err(format!("{what}: give nodes or fraction, not both")),
            (Some(0), None) => Err(format!("{what}.nodes must be at least 1")),
            (Some(n), None) => Ok(Some(Count::Nodes(n))),
            (None, Some(f)) if f > 0.0 && f <= 1.0 => Ok(Some(Count::Fraction(f))),
            (None, Some(f)) => Err(format!("{what}.fraction is {f}; it must be in (0, 1]")),
            (None, None) => Ok(None),
        }
    }
}

/// Validate event `i` of a timeline of length `duration`.
pub(crate) fn build(i: usize, e: RawEvent, duration: Duration) -> Result<Event, String> {
    let what = format!("events[{i}]");
    let Some((_, allowed)) = KINDS.iter().find(|(k, _)| *k == e.kind) else {
        let kinds: Vec<&str> = KINDS.iter().map(|(k, _)| *k).collect();
        return Err(format!(
            "events[{i}].kind: unknown kind {:?}; expected one of {}",
            e.kind,
            kinds.join(", ")
        ));
    };
    if let Some(key) = e.present().into_iter().find(|k| !allowed.contains(k)) {
        return Err(format!(
            "{what}: key {key} does not apply to kind {:?} (it takes {})",
            e.kind,
            if allowed.is_empty() {
                "only at and kind".to_string()
            } else {
                format!("at, kind, {}", allowed.join(", "))
            }
        ));
    }
    let at = e.at.0;
    if at > duration {
        return Err(format!(
            "{what}.at is {at:?}, after the end of the timeline (duration = {duration:?})"
        ));
    }
    let need = |key: &str| format!("{what}: {key} is required");
    let kind = match e.kind.as_str() {
        "churn" => {
            let rate_per_min = e.rate_per_min.ok_or_else(|| need("rate_per_min"))?;
            if !(rate_per_min > 0.0 && rate_per_min <= 1.0) {
                return Err(format!(
                    "{what}.rate_per_min is {rate_per_min}; it must be in (0, 1]"
                ));
            }
            let every = e.every.map_or(Duration::from_secs(10), |d| d.0);
            let until = e.until.map_or(duration, |d| d.0);
            if every.is_zero() {
                return Err(format!("{what}.every must be positive"));
            }
            if until <= at || until > duration {
                return Err(format!(
                    "{what}.until ({until:?}) must be after at and not after duration"
                ));
            }
            EventKind::Churn {
                rate_per_min,
                every,
                until,
            }
        }
        "crash" => EventKind::Crash {
            count: e.count(&what)?.ok_or_else(|| need("nodes or fraction"))?,
            restart_after: match e.restart_after {
                Some(d) if d.0.is_zero() => {
                    return Err(format!("{what}.restart_after must be positive"));
                }
                d => d.map(|d| d.0),
            },
        },
        "restart" => EventKind::Restart {
            count: e.count(&what)?,
        },
        "partition" => {
            let weights = e.groups.clone().unwrap_or_else(|| vec![1.0, 1.0]);
            if weights.len() < 2 || weights.iter().any(|w| !(w.is_finite() && *w > 0.0)) {
                return Err(format!(
                    "{what}.groups must list at least 2 positive weights, e.g. [0.5, 0.5]"
                ));
            }
            EventKind::Partition { weights }
        }
        "heal" => EventKind::Heal,
        "slow_link" => {
            let delay = e.delay.ok_or_else(|| need("delay"))?.0;
            if delay.is_zero() {
                return Err(format!("{what}.delay must be positive"));
            }
            EventKind::SlowLink {
                count: e.count(&what)?.ok_or_else(|| need("nodes or fraction"))?,
                delay,
                duration: match e.duration {
                    Some(d) if d.0.is_zero() => {
                        return Err(format!("{what}.duration must be positive"));
                    }
                    d => d.map(|d| d.0),
                },
            }
        }
        _ => EventKind::LateJoin {
            nodes: match e.count(&what)? {
                Some(Count::Nodes(n)) => n,
                _ => return Err(need("nodes")),
            },
        },
    };
    Ok(Event { at, kind })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(text: &str) -> Result<Event, String> {
        let raw: RawEvent = toml::from_str(text).map_err(|e| e.to_string())?;
        build(3, raw, Duration::from_secs(100))
    }

    #[test]
    fn each_kind_parses() {
        let e = event("at = \"10s\"\nkind = \"crash\"\nnodes = 3\nrestart_after = \"5s\"").unwrap();
        assert_eq!(
            e.kind,
            EventKind::Crash {
                count: Count::Nodes(3),
                restart_after: Some(Duration::from_secs(5))
            }
        );
        let e = event("at = \"10s\"\nkind = \"churn\"\nrate_per_min = 0.1").unwrap();
        assert_eq!(
            e.kind,
            EventKind::Churn {
                rate_per_min: 0.1,
                every: Duration::from_secs(10),
                until: Duration::from_secs(100)
            }
        );
        let e = event("at = \"1s\"\nkind = \"partition\"").unwrap();
        assert_eq!(
            e.kind,
            EventKind::Partition {
                weights: vec![1.0, 1.0]
            }
        );
        assert_eq!(
            event("at = \"1s\"\nkind = \"heal\"").unwrap().kind,
            EventKind::Heal
        );
        let e =
            event("at = \"1s\"\nkind = \"slow_link\"\nfraction = 0.1\ndelay = \"200ms\"").unwrap();
        assert_eq!(
            e.kind,
            EventKind::SlowLink {
                count: Count::Fraction(0.1),
                delay: Duration::from_millis(200),
                duration: None
            }
        );
        let e = event("at = \"1s\"\nkind = \"late_join\"\nnodes = 2").unwrap();
        assert_eq!(e.kind, EventKind::LateJoin { nodes: 2 });
        let e = event("at = \"1s\"\nkind = \"restart\"").unwrap();
        assert_eq!(e.kind, EventKind::Restart { count: None });
    }

    #[test]
    fn errors_name_the_event_and_key() {
        for (text, needles) in [
            (
                "at = \"1s\"\nkind = \"heal\"\nnodes = 2",
                &["events[3]", "nodes"][..],
            ),
            (
                "at = \"1s\"\nkind = \"explode\"",
                &["events[3].kind", "explode"],
            ),
            (
                "at = \"1s\"\nkind = \"crash\"",
                &["events[3]", "nodes or fraction"],
            ),
            (
                "at = \"1s\"\nkind = \"crash\"\nnodes = 1\nfraction = 0.5",
                &["not both"],
            ),
            (
                "at = \"1s\"\nkind = \"crash\"\nfraction = 1.5",
                &["fraction"],
            ),
            ("at = \"200s\"\nkind = \"heal\"", &["events[3].at"]),
            ("at = \"1s\"\nkind = \"churn\"", &["rate_per_min"]),
            ("at = \"1s\"\nkind = \"slow_link\"\nnodes = 1", &["delay"]),
            (
                "at = \"1s\"\nkind = \"partition\"\ngroups = [1.0]",
                &["groups"],
            ),
            (
                "at = \"1s\"\nkind = \"late_join\"\nfraction = 0.5",
                &["nodes"],
            ),
            ("at = \"1s\"\nkind = \"heal\"\nbogus = 1", &["bogus"]),
        ] {
            let e = event(text).unwrap_err();
            for n in needles {
                assert!(e.contains(n), "{n}: {e}");
            }
        }
    }

    #[test]
    fn counts() {
        assert_eq!(Count::Nodes(5).of(3), 3);
        assert_eq!(Count::Fraction(0.1).of(300), 30);
        assert_eq!(Count::Fraction(0.01).of(10), 1, "at least one");
        assert_eq!(Count::Fraction(0.5).of(0), 0);
    }
}
