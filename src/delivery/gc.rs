//! Keeping the database bounded: expire pending inbox entries nobody
//! polled, drop inbox tombstones once their message can no longer arrive,
//! forget spent idempotency keys, and drop tracking of finished messages
//! after the retention period.

use redb::ReadableTable;
use tracing::{debug, warn};

use super::records::{self, InboxRecord, InboxState, Progress};
use super::{Delivery, Stats};
use crate::store::tables::{
    IDEMPOTENCY, INBOX, INBOX_MESSAGES, OUT_MESSAGES, OUT_STATUS, RECEIPTS_OUT, REPLIES,
};
use crate::time::now_ms;
use crate::wire::{self, Receipt, ReceiptKind};

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

impl Delivery {
    /// One garbage-collection pass at time `now`.
    pub async fn gc(&self) -> GcReport {
        let now = now_ms();
        let retention = self.inner.cfg.tracking_retention.as_millis() as u64;
        let r = self
            .inner
            .store
            .write(move |txn| {
                let mut report = GcReport::default();
                let mut receipts_due = Vec::new();
                {
                    let mut inbox = txn.open_table(INBOX)?;
                    let mut messages = txn.open_table(INBOX_MESSAGES)?;
                    let mut receipts = txn.open_table(RECEIPTS_OUT)?;
                    let mut expire = Vec::new();
                    let mut remove = Vec::new();
                    for row in inbox.iter()? {
                        let (k, v) = row?;
                        let (agent, id) = k.value();
                        let rec: InboxRecord = records::decode("inbox", v.value())?;
                        if rec.expires_at_ms > now {
                            continue;
                        }
                        match rec.state {
                            // Leased ones are left to their lease: the agent may still ack.
                            InboxState::Pending if rec.lease_until_ms <= now => {
                                expire.push((agent.to_string(), id.to_string(), rec))
                            }
                            InboxState::Pending => {}
                            _ => remove.push((agent.to_string(), id.to_string())),
                        }
                    }
                    for (agent, id, mut rec) in expire {
                        rec.state = InboxState::Expired;
                        inbox
                            .insert((agent.as_str(), id.as_str()), wire::encode(&rec).as_slice())?;
                        messages.remove((agent.as_str(), id.as_str()))?;
                        let receipt = Receipt {
                            message_id: id.clone(),
                            kind: ReceiptKind::Expired,
                            at_ms: now,
                        };
                        receipts.insert(
                            (rec.from_node.as_str(), id.as_str()),
                            wire::encode(&receipt).as_slice(),
                        )?;
                        receipts_due.push((agent, rec.from_node, id));
                        report.expired += 1;
                    }
                    for (agent, id) in &remove {
                        inbox.remove((agent.as_str(), id.as_str()))?;
                    }
                    report.tombstones = remove.len();
                }
                {
                    let mut idem = txn.open_table(IDEMPOTENCY)?;
                    let mut spent = Vec::new();
                    for row in idem.iter()? {
                        let (k, v) = row?;
                        let rec: records::IdemRecord = records::decode("idempotency", v.value())?;
                        if rec.expires_at_ms <= now {
                            let (a, key) = k.value();
                            spent.push((a.to_string(), key.to_string()));
                        }
                    }
                    for (a, key) in &spent {
                        idem.remove((a.as_str(), key.as_str()))?;
                    }
                    report.idempotency = spent.len();
                }
                {
                    let mut status = txn.open_table(OUT_STATUS)?;
                    let mut msgs = txn.open_table(OUT_MESSAGES)?;
                    let mut replies = txn.open_table(REPLIES)?;
                    let mut old = Vec::new();
                    for row in status.iter()? {
                        let (k, v) = row?;
                        let t: Progress = records::decode("out_status", v.value())?;
                        if t.status.is_final() && t.updated_at_ms.saturating_add(retention) <= now {
                            old.push(k.value().to_string());
                        }
                    }
                    for id in &old {
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
                    }
                    report.tracking = old.len();
                }
                Ok((report, receipts_due))
            })
            .await;
        match r {
            Ok((report, due)) => {
                if report != GcReport::default() {
                    debug!(?report, "garbage collection pass");
                }
                Stats::add(&self.inner.stats.expired, report.expired);
                for (agent, _, id) in &due {
                    if let Ok(a) = agent.parse() {
                        self.forget_pending(&a, std::slice::from_ref(id));
                    }
                }
                self.queue_receipts(due.into_iter().map(|(_, node, id)| (node, id)).collect())
                    .await;
                report
            }
            Err(e) => {
                warn!(error = %e, "garbage collection failed; will retry");
                GcReport::default()
            }
        }
    }
}
