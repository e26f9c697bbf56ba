//! Accepting a message from a local agent: checks, routing, idempotency,
//! and the durable commit that precedes the answer.

use std::sync::Arc;
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};

use super::queue::{Cached, Item, Outbound};

/// Most bytes of envelopes held in memory between their commit and their
/// first transmission (beyond it the courier reads them from disk).
const CACHED_BYTES_LIMIT: usize = 16 * 1024 * 1024;
use super::records::{self, IdemRecord, OutHead};
use super::{Delivery, Error, MAX_TTL_SECS, Stats, courier, ids};
use crate::identity::AgentId;
use crate::routing::{Address, Recipient};
use crate::store::tables::{IDEMPOTENCY, OUT_MESSAGES, REPLIES};
use crate::time::now_ms;
use crate::wire::{self, Envelope};

/// Longest idempotency key.
const MAX_IDEMPOTENCY_KEY: usize = 256;
/// Longest subject.
const MAX_SUBJECT: usize = 1024;

/// A message to send.
#[derive(Debug, Clone)]
pub struct SendRequest {
    /// Local sending agent.
    pub from: AgentId,
    /// Where it goes.
    pub to: Address,
    /// Body, as JSON text.
    pub body_json: String,
    /// Subject.
    pub subject: Option<String>,
    /// Message being answered.
    pub reply_to: Option<String>,
    /// Lifetime; the node default when `None`.
    pub ttl: Option<Duration>,
    /// Same key from the same agent within the TTL: same result, nothing resent.
    pub idempotency_key: Option<String>,
    /// Delegation chain (JSON text), carried for governance.
    pub delegation_json: Option<String>,
    /// Trace id to continue (defaults to the reply's original trace or a new one).
    pub trace_id: Option<String>,
}

impl SendRequest {
    /// A message from `from` to `to` with `body_json`, every option at
    /// its default.
    pub fn new(from: AgentId, to: Address, body_json: impl Into<String>) -> Self {
        SendRequest {
            from,
            to,
            body_json: body_json.into(),
            subject: None,
            reply_to: None,
            ttl: None,
            idempotency_key: None,
            delegation_json: None,
            trace_id: None,
        }
    }
}

/// What was queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// `(message id, recipient)` per recipient.
    pub messages: Vec<(String, AgentId)>,
    /// The address fanned out (`strategy: all`).
    pub fan_out: bool,
    /// An earlier send with the same idempotency key answered this.
    pub replayed: bool,
}

impl Delivery {
    /// Queue a message durably and hand it to the courier.
    pub async fn send(&self, req: SendRequest) -> Result<Sent, Error> {
        let from_handle = self
            .inner
            .discovery
            .local_handle(&req.from)
            .ok_or_else(|| Error::SenderNotLocal(req.from.to_string()))?;
        let limit = self.inner.cfg.max_body_bytes;
        if req.body_json.len() > limit {
            return Err(Error::BodyTooLarge {
                size: req.body_json.len(),
                limit,
            });
        }
        if req.subject.as_ref().is_some_and(|s| s.len() > MAX_SUBJECT) {
            return Err(Error::Invalid(format!(
                "subject is over {MAX_SUBJECT} bytes"
            )));
        }
        if let Some(r) = &req.reply_to
            && !ids::is_valid(r)
        {
            return Err(Error::Invalid(format!(
                "reply_to {r:?} is not a message id"
            )));
        }
        if let Some(k) = &req.idempotency_key
            && (k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY)
        {
            return Err(Error::Invalid(format!(
                "idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY} bytes"
            )));
        }
        let ttl = req.ttl.unwrap_or(self.inner.cfg.default_ttl);
        if ttl.is_zero() || ttl.as_secs() > MAX_TTL_SECS {
            return Err(Error::Invalid(format!(
                "ttl_secs must be between 1 and {MAX_TTL_SECS}"
            )));
        }
        let now = now_ms();
        if let Some(key) = &req.idempotency_key
            && let Some(prev) = self.idempotent_answer(&req.from, key, now)?
        {
            return Ok(prev);
        }
        let fan_out = matches!(
            req.to,
            Address::Capability {
                strategy: crate::routing::Strategy::All,
                ..
            }
        );
        let recipients = self.inner.router.resolve(&req.to).await?;
        let expires = now + ttl.as_millis() as u64;
        let idempotency_key = req.idempotency_key.clone();
        let from_id = req.from.clone();
        // Each envelope is encoded once, here: the same bytes are committed
        // and sent, and the receiver stores them as they arrive. The last
        // (usually the only) recipient's envelope takes the request's
        // strings instead of copies.
        let n = recipients.len();
        let mut req = req;
        let mut from_handle = Some(from_handle);
        // Each outbound message with its encoded `OutHead`.
        let mut rows: Vec<(Outbound, Vec<u8>)> = Vec::with_capacity(n);
        let mut replies: Vec<(String, String)> = Vec::new();
        // Where each message goes: the recipient's node and its addresses.
        let mut routes: Vec<(PeerId, Vec<Multiaddr>)> = Vec::with_capacity(n);
        for (i, r) in recipients.into_iter().enumerate() {
            let Recipient {
                agent_id,
                handle,
                node_id,
                node_name,
                addrs,
            } = r;
            let last = i + 1 == n;
            let id = self.inner.ids.next(now);
            let env = Envelope {
                trace_id: give(last, &mut req.trace_id).unwrap_or_else(|| id.clone()),
                id,
                from: req.from.clone(),
                from_handle: give(last, &mut from_handle).unwrap_or_default(),
                to: agent_id,
                subject: give(last, &mut req.subject),
                body_json: if last {
                    std::mem::take(&mut req.body_json)
                } else {
                    req.body_json.clone()
                },
                reply_to: give(last, &mut req.reply_to),
                created_at_ms: now,
                expires_at_ms: expires,
                delegation_json: give(last, &mut req.delegation_json),
            };
            let head = OutHead {
                to_handle: handle,
                to_node: node_name,
            };
            let bytes = wire::encode(&env);
            // The row's value is written into the log record by the writer.
            let head_bytes = wire::encode(&head);
            if let Some(orig) = &env.reply_to {
                replies.push((orig.clone(), env.id.clone()));
            }
            rows.push((Outbound::from_parts(env, head, bytes), head_bytes));
            routes.push((node_id, addrs));
        }
        let idem = idempotency_key.map(|k| {
            (
                k,
                IdemRecord {
                    messages: rows
                        .iter()
                        .map(|(out, _)| (out.id.clone(), out.summary.to.clone()))
                        .collect(),
                    fan_out,
                    expires_at_ms: expires,
                },
            )
        });
        // The rows go into the writer and come back with its answer.
        let written = self
            .inner
            .store
            .write(move |txn| {
                if let Some((key, rec)) = &idem {
                    let mut t = txn.open_table(IDEMPOTENCY)?;
                    if let Some(v) = t.get((from_id.as_str(), key.as_str()))? {
                        let prev: IdemRecord = records::decode("idempotency", v.value())?;
                        if prev.expires_at_ms > now {
                            // Checked inside the writer: concurrent retries cannot both send.
                            return Ok(Err(prev));
                        }
                    }
                    t.insert(
                        (from_id.as_str(), key.as_str()),
                        wire::encode(rec).as_slice(),
                    )?;
                }
                // No `OUT_STATUS` row yet: a message without one is queued.
                // The ids are new, so the rows are too.
                let mut msgs = txn.open_table(OUT_MESSAGES)?;
                let since = Some(txn.generation());
                for (out, head) in &mut rows {
                    msgs.insert_new_with(out.id.as_str(), |b| {
                        records::write_outgoing(b, head, &out.bytes)
                    })?;
                    out.since = since;
                }
                if !replies.is_empty() {
                    let mut t = txn.open_table(REPLIES)?;
                    for (orig, id) in &replies {
                        t.insert((orig.as_str(), id.as_str()), ())?;
                    }
                }
                Ok(Ok(rows))
            })
            .await?;
        let rows = match written {
            Ok(rows) => rows,
            Err(prev) => {
                return Ok(Sent {
                    messages: prev.messages,
                    fan_out: prev.fan_out,
                    replayed: true,
                });
            }
        };
        Stats::add(&self.inner.stats.queued, rows.len());
        let mut items: Vec<(PeerId, Item)> = Vec::with_capacity(rows.len());
        let mut messages = Vec::with_capacity(rows.len());
        for ((out, _), (node_id, addrs)) in rows.into_iter().zip(routes) {
            if node_id != self.inner.node_id {
                self.teach_addresses(node_id, addrs).await;
            }
            messages.push((out.id.clone(), out.summary.to.clone()));
            let (id, expires_at_ms) = (out.id.clone(), out.summary.expires_at_ms);
            let size = out.bytes.len() as u64;
            let env = Cached::try_new(Arc::new(out), &self.inner.cached_bytes, CACHED_BYTES_LIMIT);
            items.push((
                node_id,
                Item {
                    id,
                    expires_at_ms,
                    size,
                    env,
                },
            ));
        }
        // The messages are on disk: if the courier is gone (shutdown), the
        // next start replays them from the outbox.
        let _ = self.inner.courier.send(courier::Cmd::Enqueue(items)).await;
        Ok(Sent {
            messages,
            fan_out,
            replayed: false,
        })
    }

    /// Tell the swarm where a recipient's node is, once per change of its
    /// advertised addresses (not once per message).
    async fn teach_addresses(&self, node: PeerId, addrs: Vec<Multiaddr>) {
        if addrs.is_empty() {
            return;
        }
        {
            let mut known = self.inner.taught.lock().unwrap_or_else(|p| p.into_inner());
            if known.get(&node) == Some(&addrs) {
                return;
            }
            known.insert(node, addrs.clone());
        }
        let _ = self.inner.net.add_addresses(node, addrs).await;
    }

    fn idempotent_answer(
        &self,
        from: &AgentId,
        key: &str,
        now: u64,
    ) -> Result<Option<Sent>, Error> {
        let r = self.inner.store.read()?;
        let t = r.open_table(IDEMPOTENCY)?;
        let Some(v) = t.get((from.as_str(), key))? else {
            return Ok(None);
        };
        let prev: IdemRecord = records::decode("idempotency", v.value())?;
        if prev.expires_at_ms <= now {
            return Ok(None);
        }
        Ok(Some(Sent {
            messages: prev.messages,
            fan_out: prev.fan_out,
            replayed: true,
        }))
    }
}

/// The value for one recipient's envelope: the last one takes it, the
/// others get a copy.
fn give<T: Clone>(last: bool, v: &mut Option<T>) -> Option<T> {
    if last { v.take() } else { v.clone() }
}
