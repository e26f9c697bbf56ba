//! What delivery keeps on disk: tracking of sent messages, inbox entries,
//! idempotency records; and the status state machine.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::identity::AgentId;
use crate::store;
use crate::wire::{self, Envelope};

pub(crate) use super::routes::StatusTables;

/// Most history entries kept per message (the first and the latest win).
const MAX_HISTORY: usize = 32;

/// Where a sent message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Status {
    /// Committed to the outbox.
    Queued,
    /// Handed to the network.
    Sent,
    /// Committed to the recipient's inbox.
    Delivered,
    /// The recipient acknowledged it.
    Processed,
    /// Refused by the recipient's node; not retried.
    Failed,
    /// Its TTL ran out before it was processed.
    Expired,
    /// A policy refused it.
    Denied,
    /// Offered too many times without an ack.
    DeadLetter,
}

impl Status {
    /// The API name.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Sent => "sent",
            Status::Delivered => "delivered",
            Status::Processed => "processed",
            Status::Failed => "failed",
            Status::Expired => "expired",
            Status::Denied => "denied",
            Status::DeadLetter => "dead_letter",
        }
    }

    /// No further change is possible.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Status::Processed
                | Status::Failed
                | Status::Expired
                | Status::Denied
                | Status::DeadLetter
        )
    }

    fn rank(self) -> u8 {
        match self {
            Status::Queued => 0,
            Status::Sent => 1,
            Status::Delivered => 2,
            _ => 3,
        }
    }
}

/// One step of a message's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The status entered.
    pub status: Status,
    /// When, ms since the epoch.
    pub at_ms: u64,
    /// Why, when it matters.
    pub detail: Option<String>,
}

/// Sender-side tracking of one message, as queries show it: where it went
/// (its [`Summary`]) and how far it got (its `Progress`). Also schema 1's
/// `OUT_STATUS` value (`store::migrate`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tracking {
    /// Recipient agent.
    pub to: AgentId,
    /// Its handle when sent.
    pub to_handle: String,
    /// Its node.
    pub to_node: String,
    /// Current status.
    pub status: Status,
    /// Send attempts so far.
    pub attempts: u32,
    /// Created, ms.
    pub created_at_ms: u64,
    /// Last change, ms.
    pub updated_at_ms: u64,
    /// Expiry, ms.
    pub expires_at_ms: u64,
    /// Steps so far.
    pub history: Vec<HistoryEntry>,
    /// Latest send error while retrying.
    pub last_error: Option<String>,
    /// The recipient's `result`, as JSON text.
    pub result_json: Option<String>,
}

impl Tracking {
    /// Put together the stored parts of a sent message.
    pub fn from_parts(sent: &Summary, progress: Option<Progress>) -> Self {
        let p = progress.unwrap_or_else(|| Progress::queued(sent.created_at_ms));
        Tracking {
            to: sent.to.clone(),
            to_handle: sent.to_handle.clone(),
            to_node: sent.to_node.clone(),
            status: p.status,
            attempts: p.attempts,
            created_at_ms: sent.created_at_ms,
            updated_at_ms: p.updated_at_ms,
            expires_at_ms: sent.expires_at_ms,
            history: p.history,
            last_error: p.last_error,
            result_json: p.result_json,
        }
    }
}

/// What the sender keeps of a message once its envelope is gone: what
/// status queries show. A message's `OUT_MESSAGES` row (head + envelope)
/// lives only until the recipient's node has the message or it reaches a
/// final state; then its `Progress` takes this summary over. So the
/// envelope of a message delivered within a checkpoint interval never
/// reaches a B-tree (it was 80% of the bytes the flusher wrote).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Sending agent.
    pub from: AgentId,
    /// Its handle.
    #[serde(deserialize_with = "crate::wire::owned::string")]
    pub from_handle: String,
    /// Recipient agent.
    pub to: AgentId,
    /// Its handle when sent.
    #[serde(deserialize_with = "crate::wire::owned::string")]
    pub to_handle: String,
    /// Its node.
    #[serde(deserialize_with = "crate::wire::owned::string")]
    pub to_node: String,
    /// Subject line.
    #[serde(default, deserialize_with = "crate::wire::owned::opt_string")]
    pub subject: Option<String>,
    /// The message this one answers.
    #[serde(default, deserialize_with = "crate::wire::owned::opt_string")]
    pub reply_to: Option<String>,
    /// Trace id.
    #[serde(deserialize_with = "crate::wire::owned::string")]
    pub trace_id: String,
    /// Created, ms.
    pub created_at_ms: u64,
    /// Expiry, ms.
    pub expires_at_ms: u64,
}

impl Summary {
    /// The summary of `env`, sent as `head` says.
    pub fn of(env: &Envelope, head: &OutHead) -> Self {
        Summary {
            from: env.from.clone(),
            from_handle: env.from_handle.clone(),
            to: env.to.clone(),
            to_handle: head.to_handle.clone(),
            to_node: head.to_node.clone(),
            subject: env.subject.clone(),
            reply_to: env.reply_to.clone(),
            trace_id: env.trace_id.clone(),
            created_at_ms: env.created_at_ms,
            expires_at_ms: env.expires_at_ms,
        }
    }
}

/// How far a sent message got (`OUT_STATUS`). A message without one is
/// queued: `send` writes none, so the hot path commits one record less per
/// message; the first step past `queued` writes it.
///
/// Generic over the summary only so that a stored record can be read with
/// its summary borrowed ([`SummaryRef`]) and written back unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress<S = Summary> {
    /// Current status.
    pub status: Status,
    /// Send attempts so far.
    pub attempts: u32,
    /// Last change, ms.
    pub updated_at_ms: u64,
    /// Steps so far.
    pub history: Vec<HistoryEntry>,
    /// Latest send error while retrying.
    pub last_error: Option<String>,
    /// The recipient's `result`, as JSON text.
    pub result_json: Option<String>,
    /// Set when the message leaves `OUT_MESSAGES` (see [`Summary`]).
    pub summary: Option<S>,
}

/// A [`Summary`] borrowed from a stored `Progress` (encoded the same way:
/// an agent id is its string).
#[derive(Debug, Serialize, Deserialize)]
pub struct SummaryRef<'a> {
    /// Sending agent.
    pub from: &'a str,
    /// Its handle.
    pub from_handle: &'a str,
    /// Recipient agent.
    pub to: &'a str,
    /// Its handle when sent.
    pub to_handle: &'a str,
    /// Its node.
    pub to_node: &'a str,
    /// Subject line.
    #[serde(borrow, default)]
    pub subject: Option<&'a str>,
    /// The message this one answers.
    #[serde(borrow, default)]
    pub reply_to: Option<&'a str>,
    /// Trace id.
    pub trace_id: &'a str,
    /// Created, ms.
    pub created_at_ms: u64,
    /// Expiry, ms.
    pub expires_at_ms: u64,
}

impl<'a> Progress<SummaryRef<'a>> {
    /// A stored `Progress` in this schema's layout that holds a summary,
    /// decoded with the summary's strings borrowed from `bytes` (`None`
    /// for any other record: decode it with [`Progress::decode`]).
    pub fn borrowed(bytes: &'a [u8]) -> Option<Self> {
        wire::decode_borrowed::<Self>(bytes, wire::MAX_FRAME_BYTES)
            .ok()
            .filter(|p| p.summary.is_some())
    }
}

/// `Progress` as schema 2 stored it (no summary); still read, since such
/// rows stay until garbage collection and the log may replay them.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct ProgressV2 {
    status: Status,
    attempts: u32,
    updated_at_ms: u64,
    history: Vec<HistoryEntry>,
    last_error: Option<String>,
    result_json: Option<String>,
}

impl Progress {
    /// A message queued at `created_at_ms` and not yet tried.
    pub fn queued(created_at_ms: u64) -> Self {
        Progress {
            status: Status::Queued,
            attempts: 0,
            updated_at_ms: created_at_ms,
            history: vec![HistoryEntry {
                status: Status::Queued,
                at_ms: created_at_ms,
                detail: None,
            }],
            last_error: None,
            result_json: None,
            summary: None,
        }
    }

    /// Decode an `OUT_STATUS` value, in this schema's layout or schema 2's.
    pub fn decode(bytes: &[u8]) -> Result<Self, store::Error> {
        if let Some((&super::routes::TAG, rest)) = bytes.split_first() {
            return super::routes::decode(rest);
        }
        match decode("out_status", bytes) {
            Ok(p) => Ok(p),
            Err(e) => match wire::decode::<ProgressV2>(bytes, wire::MAX_FRAME_BYTES) {
                Ok(v) => Ok(Progress {
                    status: v.status,
                    attempts: v.attempts,
                    updated_at_ms: v.updated_at_ms,
                    history: v.history,
                    last_error: v.last_error,
                    result_json: v.result_json,
                    summary: None,
                }),
                Err(_) => Err(e),
            },
        }
    }

    /// A status row's status and last change, in any layout, without
    /// resolving its summary.
    pub fn status_of(bytes: &[u8]) -> Result<(Status, u64), store::Error> {
        if let Some((&super::routes::TAG, rest)) = bytes.split_first() {
            return super::routes::decode_status(rest);
        }
        Progress::decode(bytes).map(|p| (p.status, p.updated_at_ms))
    }

    /// The stored progress of message `id` (queued at `created_at_ms`
    /// when none is stored yet).
    pub fn load(
        table: &store::View<'_, &'static str, &'static [u8]>,
        id: &str,
        created_at_ms: u64,
    ) -> Result<Self, store::Error> {
        Progress::load_since(table, id, created_at_ms, None)
    }

    /// [`Progress::load`] of a message whose `OUT_STATUS` row, if any, was
    /// written into memtable `since` or a newer one
    /// (`store::View::get_written_since`): a message still in flight has
    /// none, and searching redb for it was a B-tree lookup per message.
    pub fn load_since(
        table: &store::View<'_, &'static str, &'static [u8]>,
        id: &str,
        created_at_ms: u64,
        since: Option<u64>,
    ) -> Result<Self, store::Error> {
        match table.get_written_since(id, since)? {
            Some(v) => Progress::decode(v.value()),
            None => Ok(Progress::queued(created_at_ms)),
        }
    }
}

impl<S> Progress<S> {
    /// Move to `status`; returns false (and changes nothing) when the move
    /// is not forward: final states stay final, and a late "delivered"
    /// never overwrites "processed".
    pub fn advance(&mut self, status: Status, at_ms: u64, detail: Option<String>) -> bool {
        if self.status.is_final() || status.rank() < self.status.rank() || status == self.status {
            return false;
        }
        self.status = status;
        self.updated_at_ms = self.updated_at_ms.max(at_ms);
        if self.history.len() >= MAX_HISTORY {
            self.history.remove(1);
        }
        self.history.push(HistoryEntry {
            status,
            at_ms,
            detail,
        });
        true
    }
}

/// Where a sent message went, stored in front of its envelope in
/// `OUT_MESSAGES` so that checks (whose receipt is this?) read it without
/// decoding the envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutHead {
    /// The recipient's handle when sent.
    pub to_handle: String,
    /// The recipient's node.
    pub to_node: String,
}

/// An `OUT_MESSAGES` value: a 4-byte little-endian length, the encoded
/// `OutHead`, then the envelope exactly as it goes on the wire. The row
/// lives until the message is handed over or final (see [`Summary`]).
pub fn encode_outgoing(head: &OutHead, envelope: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    write_outgoing(&mut out, &wire::encode(head), envelope);
    out
}

/// Append an `OUT_MESSAGES` value to `out` (straight into a log record),
/// given the encoded `OutHead`.
pub fn write_outgoing(out: &mut Vec<u8>, head: &[u8], envelope: &[u8]) {
    out.reserve(4 + head.len() + envelope.len());
    out.extend_from_slice(&(head.len() as u32).to_le_bytes());
    out.extend_from_slice(head);
    out.extend_from_slice(envelope);
}

/// Split an `OUT_MESSAGES` value into its head and the encoded envelope.
pub fn split_outgoing(value: &[u8]) -> Result<(OutHead, &[u8]), store::Error> {
    let corrupt = |reason: String| store::Error::Corrupt {
        table: "out_messages",
        reason,
    };
    let len = value
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(|| corrupt("record shorter than its length prefix".into()))?;
    let head = value
        .get(4..4 + len)
        .ok_or_else(|| corrupt(format!("head of {len} bytes runs past the record")))?;
    Ok((decode("out_messages", head)?, &value[4 + len..]))
}

/// Split an `OUT_MESSAGES` value and decode its envelope too.
pub fn decode_outgoing(value: &[u8]) -> Result<(OutHead, Envelope), store::Error> {
    let (head, env) = split_outgoing(value)?;
    Ok((head, decode("out_messages", env)?))
}

/// The message leaves `OUT_MESSAGES` (handed over to its recipient's node,
/// or final): `p` takes over its summary, from `known` when the caller has
/// it, else from the stored envelope. Write `p` in the same transaction.
pub fn hand_over(
    msgs: &mut store::Table<'_, &'static str, &'static [u8]>,
    id: &str,
    p: &mut Progress,
    known: Option<&Summary>,
) -> Result<(), store::Error> {
    if p.summary.is_some() {
        // Handed over before (the summary is only ever set here).
        return Ok(());
    }
    p.summary = match known {
        // The caller's queue item was read from the row, which only this
        // hand-over removes: no need to look it up again.
        Some(s) => Some(s.clone()),
        None => match msgs.get(id)? {
            Some(v) => {
                let (head, env) = decode_outgoing(v.value())?;
                Some(Summary::of(&env, &head))
            }
            None => return Ok(()),
        },
    };
    msgs.discard(id)
}

/// A [`Progress`] serialized with the summary given apart (borrowed, or
/// another layout's): the same bytes as a `Progress` holding it, without
/// cloning anything into one first.
#[derive(Serialize)]
pub(crate) struct ProgressRef<'a, T> {
    status: Status,
    attempts: u32,
    updated_at_ms: u64,
    history: &'a [HistoryEntry],
    last_error: &'a Option<String>,
    result_json: &'a Option<String>,
    summary: Option<T>,
}

impl<'a, T> ProgressRef<'a, T> {
    /// `p`'s fields with `summary` in place of its own.
    pub(crate) fn of<S>(p: &'a Progress<S>, summary: Option<T>) -> Self {
        ProgressRef {
            status: p.status,
            attempts: p.attempts,
            updated_at_ms: p.updated_at_ms,
            history: &p.history,
            last_error: &p.last_error,
            result_json: &p.result_json,
            summary,
        }
    }
}

/// [`hand_over`] with the summary the caller holds (its queue item, read
/// from the row), and write `p` to `OUT_STATUS` in the same go: the
/// summary is encoded from where it is, not cloned into `p`.
pub(crate) fn hand_over_and_write(
    t: &mut StatusTables<'_>,
    msgs: &mut store::Table<'_, &'static str, &'static [u8]>,
    id: &str,
    p: &Progress,
    known: &Summary,
) -> Result<(), store::Error> {
    if let Some(s) = &p.summary {
        // Handed over before.
        return t.put(id, p, Some(s));
    }
    t.put(id, p, Some(known))?;
    msgs.discard(id)
}

/// State of an inbox entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InboxState {
    /// Waiting for (another) offer to the agent.
    Pending,
    /// Acknowledged; the body is gone, the entry remains to recognise duplicates.
    Acked,
    /// Offered `max_deliveries` times without an ack.
    DeadLetter,
    /// Expired before it was acknowledged.
    Expired,
}

/// The state of a received message (its envelope is stored apart, in
/// `INBOX_MESSAGES`, until the message reaches a final state).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxRecord {
    /// Node that sent it (receipts go there).
    #[serde(deserialize_with = "crate::wire::owned::string")]
    pub from_node: String,
    /// Where it stands.
    pub state: InboxState,
    /// Arrival, ms.
    pub received_at_ms: u64,
    /// Offers so far.
    pub delivery_count: u32,
    /// Leased to the agent until, ms (0: not leased).
    pub lease_until_ms: u64,
    /// Expiry, ms (kept after the body is dropped, for clean-up).
    pub expires_at_ms: u64,
}

/// An idempotency record: what a `(sender, key)` produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdemRecord {
    /// `(message id, recipient)` in the order first answered.
    pub messages: Vec<(String, AgentId)>,
    /// Whether the first answer was a fan-out (`strategy: all`).
    pub fan_out: bool,
    /// After this the key may be reused.
    pub expires_at_ms: u64,
}

/// Decode a stored value, naming the table when it is corrupt.
pub fn decode<T: DeserializeOwned>(table: &'static str, bytes: &[u8]) -> Result<T, store::Error> {
    wire::decode(bytes, wire::MAX_FRAME_BYTES).map_err(|e| store::Error::Corrupt {
        table,
        reason: e.to_string(),
    })
}

#[cfg(test)]
pub(crate) mod tests;
