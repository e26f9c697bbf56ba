//! Keeping the database bounded: expire pending inbox entries nobody
//! polled, drop inbox tombstones once their message can no longer arrive,
//! forget spent idempotency keys, and drop tracking of finished messages
//! after the retention period.
//!
//! A pass walks each table in chunks of `CHUNK` rows, one write
//! transaction per chunk, so the writer (and every send, store and ack
//! queued behind it) never waits for more than one chunk, however many
//! rows the node keeps.

use std::ops::Bound;

use tracing::{debug, warn};

use super::ending::{InboxTables, ReceiptRow};
use super::records::{self, InboxRecord, InboxState, Progress};
use super::{Delivery, Stats};
use crate::store::Tx;
use crate::store::tables::{IDEMPOTENCY, OUT_MESSAGES, OUT_STATUS, REPLIES};
use crate::time::now_ms;
use crate::wire::ReceiptKind;

/// Rows looked at per write transaction.
pub(super) const CHUNK: usize = 2048;

/// Rows removed or expired by one pass.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GcReport {
    /// Pending inbox entries that expired unread.
    pub expired: usize,
    /// Inbox tombstones removed.
    pub tombstones: usize,
    /// Idempotency records removed.
    pub idempotency: usize,
    /// Finished messages whose tracking was dropped.
    pub tracking: usize,
}

impl GcReport {
    fn add(&mut self, o: GcReport) {
        self.expired += o.expired;
        self.tombstones += o.tombstones;
        self.idempotency += o.idempotency;
        self.tracking += o.tracking;
    }
}

/// Where a pass stands: the table being walked and the last key done.
#[derive(Debug, Clone)]
enum Cursor {
    Inbox(Option<(String, String)>),
    Idempotency(Option<(String, String)>),
    Tracking(Option<String>),
    Done,
}

/// What an inbox chunk ended: `(agent, message id)` of the entries that
/// expired, and the rows of their receipts.
type Due = (Vec<(String, String)>, Vec<ReceiptRow>);
/// Rows of a two-part-key table: key and encoded value.
pub(super) type PairRows = Vec<((String, String), Vec<u8>)>;

/// The rows of a two-part-key table after `after`, at most `CHUNK` of them.
pub(super) fn pair_rows(
    table: &crate::store::View<'_, (&'static str, &'static str), &'static [u8]>,
    after: &Option<(String, String)>,
) -> Result<PairRows, crate::store::Error> {
    let start = match after {
        Some((a, b)) => Bound::Excluded((a.as_str(), b.as_str())),
        None => Bound::Unbounded,
    };
    let mut out = Vec::new();
    for row in table
        .range::<(&str, &str)>((start, Bound::Unbounded))?
        .take(CHUNK)
    {
        let (k, v) = row?;
        let (a, b) = k.value();
        out.push(((a.to_string(), b.to_string()), v.value().to_vec()));
    }
    Ok(out)
}

/// Next cursor: the last key seen, or the next table once a chunk came up short.
fn advance<K: Clone>(rows: &[(K, Vec<u8>)], same: impl Fn(K) -> Cursor, next: Cursor) -> Cursor {
    match rows.last() {
        Some((k, _)) if rows.len() == CHUNK => same(k.clone()),
        _ => next,
    }
}

fn inbox_chunk(
    txn: &Tx<'_>,
    after: &Option<(String, String)>,
    now: u64,
    key: &str,
) -> Result<(GcReport, Due, Cursor), crate::store::Error> {
    let mut report = GcReport::default();
    let mut ended = Vec::new();
    let mut t = InboxTables::open(txn)?;
    let rows = pair_rows(&t.inbox, after)?;
    for ((agent, id), v) in &rows {
        let rec: InboxRecord = records::decode("inbox", v)?;
        if rec.expires_at_ms > now {
            continue;
        }
        match rec.state {
            // Leased ones are left to their lease: the agent may still ack.
            InboxState::Pending if rec.lease_until_ms > now => {}
            InboxState::Pending => {
                t.finish(
                    agent,
                    id,
                    rec,
                    InboxState::Expired,
                    ReceiptKind::Expired,
                    now,
                )?;
                ended.push((agent.clone(), id.clone()));
                report.expired += 1;
            }
            _ => {
                t.inbox.remove((agent.as_str(), id.as_str()))?;
                report.tombstones += 1;
            }
        }
    }
    let next = advance(&rows, |k| Cursor::Inbox(Some(k)), Cursor::Idempotency(None));
    let receipts = t.write_receipts(key)?;
    Ok((report, (ended, receipts), next))
}

fn idempotency_chunk(
    txn: &Tx<'_>,
    after: &Option<(String, String)>,
    now: u64,
) -> Result<(GcReport, Cursor), crate::store::Error> {
    let mut report = GcReport::default();
    let mut idem = txn.open_table(IDEMPOTENCY)?;
    let rows = pair_rows(&idem, after)?;
    for ((a, key), v) in &rows {
        let rec: records::IdemRecord = records::decode("idempotency", v)?;
        if rec.expires_at_ms <= now {
            idem.remove((a.as_str(), key.as_str()))?;
            report.idempotency += 1;
        }
    }
    let next = advance(
        &rows,
        |k| Cursor::Idempotency(Some(k)),
        Cursor::Tracking(None),
    );
    Ok((report, next))
}

fn tracking_chunk(
    txn: &Tx<'_>,
    after: &Option<String>,
    now: u64,
    retention: u64,
) -> Result<(GcReport, Cursor), crate::store::Error> {
    let mut report = GcReport::default();
    let mut status = txn.open_table(OUT_STATUS)?;
    let mut msgs = txn.open_table(OUT_MESSAGES)?;
    let mut replies = txn.open_table(REPLIES)?;
    let start = match after {
        Some(k) => Bound::Excluded(k.as_str()),
        None => Bound::Unbounded,
    };
    let mut rows = Vec::new();
    for row in status.range::<&str>((start, Bound::Unbounded))?.take(CHUNK) {
        let (k, v) = row?;
        rows.push((k.value().to_string(), v.value().to_vec()));
    }
    for (id, v) in &rows {
        let (status_now, updated_at_ms) = Progress::status_of(v)?;
        if !status_now.is_final() || updated_at_ms.saturating_add(retention) > now {
            continue;
        }
        status.remove(id.as_str())?;
        msgs.remove(id.as_str())?;
        let linked: Vec<String> = replies
            .range((id.as_str(), "")..)?
            .map_while(|r| {
                r.ok().and_then(|(k, _)| {
                    let (o, reply) = k.value();
                    (o == id).then(|| reply.to_string())
                })
            })
            .collect();
        for reply in linked {
            replies.remove((id.as_str(), reply.as_str()))?;
        }
        report.tracking += 1;
    }
    let next = advance(&rows, |k| Cursor::Tracking(Some(k)), Cursor::Done);
    Ok((report, next))
}

impl Delivery {
    /// One garbage-collection pass over every table, at time `now`, in
    /// chunks (see the module doc).
    pub async fn gc(&self) -> GcReport {
        let now = now_ms();
        let retention = self.inner.cfg.tracking_retention.as_millis() as u64;
        let mut total = GcReport::default();
        let mut cursor = Cursor::Inbox(None);
        while !matches!(cursor, Cursor::Done) {
            let at = cursor.clone();
            let key = self.inner.ids.next(now);
            let step = self
                .inner
                .store
                .write(move |txn| match &at {
                    Cursor::Inbox(after) => inbox_chunk(txn, after, now, &key),
                    Cursor::Idempotency(after) => {
                        idempotency_chunk(txn, after, now).map(|(r, c)| (r, Due::default(), c))
                    }
                    Cursor::Tracking(after) => tracking_chunk(txn, after, now, retention)
                        .map(|(r, c)| (r, Due::default(), c)),
                    Cursor::Done => Ok((GcReport::default(), Due::default(), Cursor::Done)),
                })
                .await;
            let (report, (ended, receipts), next) = match step {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "garbage collection failed; will retry");
                    break;
                }
            };
            Stats::add(&self.inner.stats.expired, report.expired);
            for (agent, id) in &ended {
                if let Ok(a) = agent.parse() {
                    self.forget_pending(&a, std::slice::from_ref(id));
                }
            }
            self.queue_receipts(receipts).await;
            total.add(report);
            cursor = next;
        }
        if total != GcReport::default() {
            debug!(report = ?total, "garbage collection pass");
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::records::{IdemRecord, Status};
    use crate::store::Store;
    use crate::wire;

    /// Walk one table to the end, chunk by chunk, as `gc` does.
    async fn walk(
        store: &Store,
        mut cursor: Cursor,
        now: u64,
        retention: u64,
    ) -> (GcReport, usize) {
        let mut total = GcReport::default();
        let mut steps = 0;
        while !matches!(cursor, Cursor::Done) {
            let at = cursor.clone();
            let (r, next) = store
                .write(move |txn| match &at {
                    Cursor::Idempotency(a) => idempotency_chunk(txn, a, now),
                    Cursor::Tracking(a) => tracking_chunk(txn, a, now, retention),
                    _ => Ok((GcReport::default(), Cursor::Done)),
                })
                .await
                .unwrap();
            total.add(r);
            steps += 1;
            // The idempotency walk hands over to tracking: stop there.
            cursor = match next {
                Cursor::Tracking(None) if matches!(cursor, Cursor::Idempotency(_)) => Cursor::Done,
                n => n,
            };
        }
        (total, steps)
    }

    #[tokio::test]
    async fn a_pass_walks_every_row_in_bounded_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _w) = Store::open(dir.path()).unwrap();
        let n = 2 * CHUNK + 5;
        store
            .write(move |txn| {
                let mut idem = txn.open_table(IDEMPOTENCY)?;
                let mut status = txn.open_table(OUT_STATUS)?;
                for i in 0..n {
                    // Every third one is spent / finished long ago.
                    let old = i % 3 == 0;
                    let rec = IdemRecord {
                        messages: Vec::new(),
                        fan_out: false,
                        expires_at_ms: if old { 10 } else { 1_000_000 },
                    };
                    let key = format!("k{i:06}");
                    idem.insert(("agent", key.as_str()), wire::encode(&rec).as_slice())?;
                    let mut p = Progress::queued(1);
                    if old {
                        p.advance(Status::Processed, 5, None);
                    } else {
                        p.advance(Status::Delivered, 5, None);
                    }
                    status.insert(key.as_str(), wire::encode(&p).as_slice())?;
                }
                Ok(())
            })
            .await
            .unwrap();
        let spent = n.div_ceil(3);
        let (r, steps) = walk(&store, Cursor::Idempotency(None), 1_000, 100).await;
        assert_eq!((r.idempotency, steps), (spent, 3));
        let (r, steps) = walk(&store, Cursor::Tracking(None), 1_000, 100).await;
        assert_eq!((r.tracking, steps), (spent, 3));
        let read = store.read().unwrap();
        assert_eq!(
            read.open_table(IDEMPOTENCY).unwrap().len().unwrap() as usize,
            n - spent
        );
        assert_eq!(
            read.open_table(OUT_STATUS).unwrap().len().unwrap() as usize,
            n - spent
        );
    }
}
