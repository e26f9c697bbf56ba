//! Metrics math over the ledger: what became of each accepted message,
//! latency percentiles, CDFs and per-second series. Pure functions.

use std::collections::BTreeSet;

use serde::Serialize;

use super::ledger::{Book, LIST_IDS};

/// What became of the accepted messages.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Outcomes {
    /// Messages `send` accepted (one per recipient of a fan-out).
    pub accepted: u64,
    /// Of those, handed to a consumer of their recipient at least once.
    pub delivered: u64,
    /// Not delivered, and the recipient's node left the mesh for good.
    pub recipient_left: u64,
    /// Not delivered, and the sending node left the mesh for good (its
    /// outbox left with it).
    pub sender_left: u64,
    /// Not delivered, and its TTL ran out.
    pub expired: u64,
    /// Not delivered, for no reason above: lost or stuck. Must be 0.
    pub missing: u64,
    /// Some missing ids.
    pub missing_ids: Vec<String>,
    /// Handed to a consumer but never accepted by `send` (must be 0).
    pub unknown_received: u64,
    /// delivered / (delivered + missing): the share of the messages that
    /// had to arrive which did.
    pub delivery_ratio: f64,
    /// delivered / accepted, every message counted.
    pub raw_delivery_ratio: f64,
}

/// Classify every message. `departed` holds the nodes that left for good;
/// a message whose expiry is more than `margin_ms` before `now_ms` counts
/// as expired.
pub fn classify(book: &Book, departed: &BTreeSet<usize>, now_ms: u64, margin_ms: u64) -> Outcomes {
    let mut o = Outcomes::default();
    let mut missing = Vec::new();
    for (id, m) in &book.msgs {
        let Some(s) = &m.send else {
            o.unknown_received += 1;
            continue;
        };
        o.accepted += 1;
        if m.received_s.is_some() {
            o.delivered += 1;
        } else if s.to_slot.is_some_and(|t| departed.contains(&t)) {
            o.recipient_left += 1;
        } else if departed.contains(&s.from_slot) {
            o.sender_left += 1;
        } else if s.expires_ms.saturating_add(margin_ms) <= now_ms {
            o.expired += 1;
        } else {
            o.missing += 1;
            missing.push(id.clone());
        }
    }
    missing.sort();
    missing.truncate(LIST_IDS);
    o.missing_ids = missing;
    o.delivery_ratio = ratio(o.delivered, o.delivered + o.missing);
    o.raw_delivery_ratio = ratio(o.delivered, o.accepted);
    o
}

/// `part / whole`, 1.0 when there is nothing to count.
pub fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        1.0
    } else {
        part as f64 / whole as f64
    }
}

/// Send→consumer latencies in milliseconds, sorted.
pub fn latencies_ms(book: &Book) -> Vec<f64> {
    let mut v: Vec<f64> = book
        .msgs
        .values()
        .filter_map(|m| Some((m.received_s? - m.send.as_ref()?.sent_s).max(0.0) * 1000.0))
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

/// Nearest-rank percentile of sorted values (`p` in 0..=100).
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Latency percentiles.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: usize,
    /// Median.
    pub p50_ms: Option<f64>,
    /// 90th.
    pub p90_ms: Option<f64>,
    /// 99th.
    pub p99_ms: Option<f64>,
    /// Largest.
    pub max_ms: Option<f64>,
}

impl Percentiles {
    /// Of sorted values.
    pub fn of(sorted: &[f64]) -> Percentiles {
        Percentiles {
            count: sorted.len(),
            p50_ms: percentile(sorted, 50.0),
            p90_ms: percentile(sorted, 90.0),
            p99_ms: percentile(sorted, 99.0),
            max_ms: sorted.last().copied(),
        }
    }
}

/// Points of the empirical CDF of sorted values, at most `max_points`
/// (always including the last).
pub fn cdf(sorted: &[f64], max_points: usize) -> Vec<(f64, f64)> {
    let n = sorted.len();
    if n == 0 || max_points == 0 {
        return Vec::new();
    }
    let step = n.div_ceil(max_points).max(1);
    let mut pts: Vec<(f64, f64)> = (0..n)
        .step_by(step)
        .map(|i| (sorted[i], (i + 1) as f64 / n as f64))
        .collect();
    if pts.last().is_some_and(|p| p.1 < 1.0) {
        pts.push((sorted[n - 1], 1.0));
    }
    pts
}

/// Cumulative count of `times` (seconds) at each whole second 0..=end.
pub fn cumulative_per_second(times: impl Iterator<Item = f64>, end_s: usize) -> Vec<u64> {
    let mut per = vec![0u64; end_s + 1];
    for t in times {
        let i = (t.max(0.0).ceil() as usize).min(end_s);
        per[i] += 1;
    }
    let mut acc = 0;
    for v in per.iter_mut() {
        acc += *v;
        *v = acc;
    }
    per
}

/// Min / median / max of some values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Spread {
    /// Smallest.
    pub min: f64,
    /// Middle (nearest rank).
    pub median: f64,
    /// Mean.
    pub mean: f64,
    /// Largest.
    pub max: f64,
}

impl Spread {
    /// Of any values; `None` when there are none.
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        Some(Spread {
            min: *v.first()?,
            median: percentile(&v, 50.0)?,
            mean: v.iter().sum::<f64>() / v.len() as f64,
            max: *v.last()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::AgentId;
    use crate::sim::ledger::SendSide;
    use crate::sim::scenario::Pattern;

    fn side(from: usize, to: usize, expires_ms: u64) -> SendSide {
        SendSide {
            sent_s: 1.0,
            from_slot: from,
            to_slot: Some(to),
            expires_ms,
            pattern: Pattern::RandomPairs,
        }
    }

    #[test]
    fn classification_separates_the_excused_from_the_missing() {
        let mut b = Book::default();
        let a = AgentId::from_public(&[1; 32]);
        let msg = |id: &str| (id.to_string(), a.clone(), None);
        for (id, from, to, exp) in [
            ("ok", 0, 1, u64::MAX),
            ("rl", 0, 5, u64::MAX),
            ("sl", 6, 1, u64::MAX),
            ("ex", 0, 1, 1_000),
            ("lost", 0, 1, u64::MAX),
        ] {
            let mut s = side(from, to, exp);
            s.to_slot = Some(to);
            b.accepted(vec![msg(id)], s.clone());
            b.msgs.get_mut(id).unwrap().send = Some(s);
        }
        b.msgs.get_mut("ok").unwrap().received_s = Some(1.2);
        b.msgs.insert("stray".into(), Default::default());
        let departed: BTreeSet<usize> = [5, 6].into();
        let o = classify(&b, &departed, 10_000, 1_000);
        assert_eq!(
            (
                o.accepted,
                o.delivered,
                o.recipient_left,
                o.sender_left,
                o.expired,
                o.missing
            ),
            (5, 1, 1, 1, 1, 1)
        );
        assert_eq!(o.missing_ids, vec!["lost".to_string()]);
        assert_eq!(o.unknown_received, 1);
        assert_eq!(o.delivery_ratio, 0.5);
        assert_eq!(o.raw_delivery_ratio, 0.2);
        // Within the margin, an expiry is not yet counted.
        assert_eq!(classify(&b, &departed, 1_500, 1_000).expired, 0);
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let p = Percentiles::of(&v);
        assert_eq!(
            (p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms),
            (Some(50.0), Some(90.0), Some(99.0), Some(100.0))
        );
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(Percentiles::of(&[]).p50_ms, None);
        assert_eq!(ratio(0, 0), 1.0);
    }

    #[test]
    fn cdf_is_monotone_and_ends_at_one() {
        let v: Vec<f64> = (0..1000).map(|i| i as f64).collect();
        let c = cdf(&v, 100);
        assert!(c.len() <= 101);
        assert!(c.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 < w[1].1));
        assert_eq!(c.last(), Some(&(999.0, 1.0)));
        assert!(cdf(&[], 10).is_empty());
    }

    #[test]
    fn cumulative_counts_by_second() {
        let c = cumulative_per_second([0.2, 0.9, 1.5, 7.0, 99.0].into_iter(), 3);
        assert_eq!(c, vec![0, 2, 3, 5]);
        let s = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.min, s.median, s.mean, s.max), (1.0, 2.0, 2.0, 3.0));
    }
}
