//! Messages between agents and the receipts that flow back, as they cross
//! the wire between nodes.
//!
//! Messages travel in batches. A batch is signed once by the sending node
//! (covering the receiving node's id, so it cannot be replayed elsewhere)
//! and carries the signed ads of the sending agents, so the receiver can
//! check that each `from` agent really lives on the sending node. One
//! signature per batch instead of per message keeps ed25519 off the hot
//! path (see the delivery benchmark).

use serde::{Deserialize, Serialize};

use super::ad::SignedAd;
use crate::identity::AgentId;

/// Most messages in one delivery batch.
pub const MAX_BATCH_MESSAGES: usize = 1024;
/// Largest encoded batch payload.
pub const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;

/// One message from an agent to an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Sortable unique id, minted by the sending node.
    #[serde(deserialize_with = "crate::wire::owned::string")]
    pub id: String,
    /// Sending agent.
    pub from: AgentId,
    /// Its handle (for display at the recipient).
    #[serde(deserialize_with = "crate::wire::owned::string")]
    pub from_handle: String,
    /// Receiving agent.
    pub to: AgentId,
    /// Optional subject line.
    #[serde(default, deserialize_with = "crate::wire::owned::opt_string")]
    pub subject: Option<String>,
    /// Body, as JSON text.
    #[serde(deserialize_with = "crate::wire::owned::string")]
    pub body_json: String,
    /// Id of the message this one answers.
    #[serde(default, deserialize_with = "crate::wire::owned::opt_string")]
    pub reply_to: Option<String>,
    /// Creation time at the sender, ms since the epoch.
    pub created_at_ms: u64,
    /// After this the message is not delivered but expires.
    pub expires_at_ms: u64,
    /// Trace id shared by every message of one task (defaults to the id of
    /// the message that started it).
    #[serde(deserialize_with = "crate::wire::owned::string")]
    pub trace_id: String,
    /// Delegation chain, as JSON text, carried for governance checks.
    #[serde(default, deserialize_with = "crate::wire::owned::opt_string")]
    pub delegation_json: Option<String>,
}

/// An [`Envelope`] decoded without copying its strings, borrowing the bytes
/// it was decoded from (`wire::decode_borrowed`): the receiver checks each
/// message of a batch and stores its bytes as they came, so it never needs
/// owned strings. The fields and their order are `Envelope`'s, so it
/// decodes the same bytes; ids are checked for shape like
/// `AgentId`'s decoder does (`EnvelopeRef::ids_well_formed`).
#[derive(Debug, Deserialize)]
pub struct EnvelopeRef<'a> {
    /// See `Envelope::id`.
    pub id: &'a str,
    /// See `Envelope::from`.
    pub from: &'a str,
    /// See `Envelope::from_handle`.
    pub from_handle: &'a str,
    /// See `Envelope::to`.
    pub to: &'a str,
    /// See `Envelope::subject`.
    #[serde(borrow)]
    pub subject: Option<&'a str>,
    /// See `Envelope::body_json`.
    pub body_json: &'a str,
    /// See `Envelope::reply_to`.
    #[serde(borrow)]
    pub reply_to: Option<&'a str>,
    /// See `Envelope::created_at_ms`.
    pub created_at_ms: u64,
    /// See `Envelope::expires_at_ms`.
    pub expires_at_ms: u64,
    /// See `Envelope::trace_id`.
    pub trace_id: &'a str,
    /// See `Envelope::delegation_json`.
    #[serde(borrow)]
    pub delegation_json: Option<&'a str>,
}

impl EnvelopeRef<'_> {
    /// Whether `from` and `to` have the shape of agent ids (what decoding
    /// an `Envelope` checks).
    pub fn ids_well_formed(&self) -> bool {
        AgentId::is_well_formed(self.from) && AgentId::is_well_formed(self.to)
    }
}

/// The signed content of a delivery batch, as the receiver decodes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliverPayload {
    /// The receiving node (PeerId string): a batch is only valid there.
    pub to_node: String,
    /// Current ads of the agents that sent these messages.
    pub sender_ads: Vec<SignedAd>,
    /// The messages, in send order: each the wire encoding of an
    /// `Envelope`, as the sender committed it (the receiver stores these
    /// bytes as they are, after decoding and checking them).
    pub messages: Vec<serde_bytes::ByteBuf>,
}

/// The same payload as the sender encodes it, borrowing what it sends:
/// encodes byte for byte like `DeliverPayload`.
#[derive(Debug, Serialize)]
pub struct DeliverPayloadRef<'a> {
    /// See `DeliverPayload::to_node`.
    pub to_node: &'a str,
    /// See `DeliverPayload::sender_ads`.
    pub sender_ads: &'a [SignedAd],
    /// See `DeliverPayload::messages`.
    pub messages: Vec<&'a serde_bytes::Bytes>,
}

/// A `DeliverPayload` decoded borrowing its strings and messages from the
/// request frame, as the receiver reads it: no message is copied before it
/// is stored.
#[derive(Debug, Deserialize)]
pub struct DeliverPayloadIn<'a> {
    /// See `DeliverPayload::to_node`.
    #[serde(borrow)]
    pub to_node: &'a str,
    /// See `DeliverPayload::sender_ads`.
    pub sender_ads: Vec<SignedAd>,
    /// See `DeliverPayload::messages`.
    #[serde(borrow)]
    pub messages: Vec<&'a serde_bytes::Bytes>,
}

/// What the receiver did with one message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Committed to the recipient's inbox now.
    Stored,
    /// Already in the inbox (a retry): not stored twice.
    Duplicate,
    /// Refused; retrying will not help.
    Rejected(Rejection),
}

/// Why a message was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rejection {
    /// The recipient is not registered on the receiving node.
    UnknownRecipient,
    /// The message had expired on arrival.
    Expired,
    /// The message is invalid (the detail says how).
    Invalid(String),
    /// A policy refused it (the detail says which).
    Denied(String),
}

/// A receipt from the recipient's node to the sender's node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The message.
    #[serde(deserialize_with = "crate::wire::owned::string")]
    pub message_id: String,
    /// What happened.
    pub kind: ReceiptKind,
    /// When, ms since the epoch.
    pub at_ms: u64,
}

/// Final fates reported back to the sender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReceiptKind {
    /// The agent acknowledged it, optionally with a result (JSON text).
    Processed {
        /// The ack's `result`.
        result_json: Option<String>,
    },
    /// Offered `max_deliveries` times without an ack.
    DeadLetter {
        /// Offers made.
        deliveries: u32,
    },
    /// Expired in the inbox before it was acknowledged.
    Expired,
}

/// The signed content of a receipt batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptPayload {
    /// The node the receipts are for.
    pub to_node: String,
    /// The receipts.
    pub receipts: Vec<Receipt>,
}
