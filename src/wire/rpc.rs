//! Requests and responses of our one request-response protocol. Each
//! top-level frame is a versioned `Request` or `Response` (see `wire`).

use serde::{Deserialize, Serialize};

use super::ad::SignedAd;
use crate::identity::AgentId;

/// Most ads in one response or push.
pub const MAX_ADS_PER_FRAME: usize = 512;

/// A request to a peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Anti-entropy, step 1: "this is my registry digest".
    SyncDigest {
        /// Hash of the sender's sorted `(agent_id, seq)` pairs.
        digest: [u8; 32],
        /// Entries behind the digest.
        count: u32,
    },
    /// Ask for these ads.
    FetchAds {
        /// Agents wanted.
        ids: Vec<AgentId>,
    },
    /// Offer ads the receiver lacks (it verifies each).
    PushAds {
        /// The ads.
        ads: Vec<SignedAd>,
    },
    /// DHT fallback: ads of the receiver's local agents behind a provider key.
    FindAds {
        /// The DHT key (e.g. `cap/translate/fr-en`).
        key: String,
    },
    /// A batch of messages: `payload` is an encoded `DeliverPayload`,
    /// `sig` the sending node's signature over `digest_signing_bytes("deliver.b3", payload)` (BLAKE3 digest).
    Deliver {
        /// Encoded `DeliverPayload`.
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
        /// Node signature.
        #[serde(with = "serde_bytes")]
        sig: Vec<u8>,
    },
    /// A batch of receipts: `payload` is an encoded `ReceiptPayload`.
    Receipts {
        /// Encoded `ReceiptPayload`.
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
        /// Node signature over `digest_signing_bytes("receipts.b3", payload)`.
        #[serde(with = "serde_bytes")]
        sig: Vec<u8>,
    },
}

/// A response to a `Request`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// Answer to `SyncDigest`: `None` when the digests match, else the
    /// responder's `(agent_id, seq)` summary.
    Summary(Option<Vec<(AgentId, u64)>>),
    /// Ads.
    Ads(Vec<SignedAd>),
    /// Done.
    Ack,
    /// Per-message outcomes of a `Deliver`, in the batch's order.
    Delivered(Vec<super::envelope::Outcome>),
    /// The request was refused.
    Error {
        /// What went wrong.
        message: String,
    },
}

/// Which signed batch request [`encode_signed`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batch {
    /// `Request::Deliver`.
    Deliver,
    /// `Request::Receipts`.
    Receipts,
}

/// A signed batch request, encoded in one pass: the same bytes as
/// `encode(&Request::Deliver { payload: encode(payload), sig })` (or
/// `Receipts`), with `sig = sign(encoded payload)`. The payload is encoded
/// straight into the request instead of into a buffer of its own that the
/// request then copies: a delivery batch is hundreds of KiB of envelopes.
pub fn encode_signed<T: Serialize>(
    batch: Batch,
    payload: &T,
    sign: impl FnOnce(&[u8]) -> [u8; 64],
) -> Vec<u8> {
    let head = head_of(batch);
    let mut size = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(payload, &mut size, super::config())
        .expect("wire types are bincode-encodable");
    let payload_len = 2 + size.bytes_written;
    // Two length prefixes of at most 9 bytes each, and the signature.
    let mut out = Vec::with_capacity(head.len() + 9 + payload_len + 9 + 64);
    out.extend_from_slice(head);
    put_len(&mut out, payload_len);
    let start = out.len();
    super::encode_into(&mut out, payload);
    debug_assert_eq!(out.len() - start, payload_len);
    let sig = sign(&out[start..]);
    put_len(&mut out, sig.len());
    out.extend_from_slice(&sig);
    out
}

/// Where a signed batch request's fields lie in its frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedParts {
    /// Which request.
    pub batch: Batch,
    /// The encoded payload.
    pub payload: std::ops::Range<usize>,
    /// The signature.
    pub sig: std::ops::Range<usize>,
}

/// The two fields of a signed batch request, borrowed.
#[derive(Deserialize)]
struct SignedFields<'a> {
    #[serde(borrow, with = "serde_bytes")]
    payload: &'a [u8],
    #[serde(borrow, with = "serde_bytes")]
    sig: &'a [u8],
}

/// Find a `Deliver` or `Receipts` request's fields in its frame without
/// copying them (the payload of a delivery is hundreds of KiB): `None` for
/// any other request, which decodes as a [`Request`]; an error for a batch
/// request that does not decode as one.
pub fn signed_parts(frame: &[u8]) -> Result<Option<SignedParts>, super::Error> {
    for batch in [Batch::Deliver, Batch::Receipts] {
        let head = head_of(batch);
        let Some(rest) = frame.strip_prefix(head) else {
            continue;
        };
        let (f, used): (SignedFields<'_>, usize) =
            bincode::serde::borrow_decode_from_slice(rest, super::config())
                .map_err(|e| super::Error::Malformed(e.to_string()))?;
        if used != rest.len() {
            return Err(super::Error::Trailing(rest.len() - used));
        }
        let at = |s: &[u8]| {
            let start = s.as_ptr() as usize - frame.as_ptr() as usize;
            start..start + s.len()
        };
        return Ok(Some(SignedParts {
            batch,
            payload: at(f.payload),
            sig: at(f.sig),
        }));
    }
    Ok(None)
}

/// A batch request's head: version and variant, what an empty request of
/// this kind encodes to less its two empty fields (a zero length each).
fn head_of(batch: Batch) -> &'static [u8] {
    static HEADS: std::sync::OnceLock<[Vec<u8>; 2]> = std::sync::OnceLock::new();
    let heads = HEADS.get_or_init(|| {
        [
            Request::Deliver {
                payload: Vec::new(),
                sig: Vec::new(),
            },
            Request::Receipts {
                payload: Vec::new(),
                sig: Vec::new(),
            },
        ]
        .map(|empty| {
            let mut head = super::encode(&empty);
            head.truncate(head.len() - 2);
            head
        })
    });
    match batch {
        Batch::Deliver => &heads[0],
        Batch::Receipts => &heads[1],
    }
}

/// A byte string's length prefix, as the wire encodes it (a varint).
fn put_len(out: &mut Vec<u8>, len: usize) {
    bincode::serde::encode_into_std_write(len as u64, out, super::config())
        .expect("writing into a Vec cannot fail");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::envelope::DeliverPayloadRef;

    fn sig_of(bytes: &[u8]) -> [u8; 64] {
        let h = blake3::hash(bytes);
        let mut s = [0u8; 64];
        s[..32].copy_from_slice(h.as_bytes());
        s[32..].copy_from_slice(h.as_bytes());
        s
    }

    #[test]
    fn a_batch_encoded_in_place_is_the_request_encoded_in_two_steps() {
        // Payloads around the varint's steps (250, 2^16) and a large one.
        for n in [0usize, 1, 240, 260, 70_000, 600_000] {
            let bodies: Vec<Vec<u8>> = (0..(n / 1000).max(1))
                .map(|i| vec![i as u8; n.min(1000)])
                .collect();
            let payload = DeliverPayloadRef {
                to_node: "12D3KooWnode",
                sender_ads: &[],
                messages: bodies.iter().map(|b| serde_bytes::Bytes::new(b)).collect(),
            };
            let encoded = crate::wire::encode(&payload);
            // What the sender writes, the owned and the borrowed readers read.
            let owned: crate::wire::envelope::DeliverPayload =
                crate::wire::decode(&encoded, crate::wire::MAX_FRAME_BYTES).unwrap();
            let borrowed: crate::wire::envelope::DeliverPayloadIn<'_> =
                crate::wire::decode_borrowed(&encoded, crate::wire::MAX_FRAME_BYTES).unwrap();
            assert_eq!(owned.messages, bodies);
            assert_eq!(borrowed.to_node, owned.to_node);
            assert!(
                borrowed
                    .messages
                    .iter()
                    .map(|m| m.as_ref())
                    .eq(bodies.iter().map(Vec::as_slice))
            );
            let two_steps = crate::wire::encode(&Request::Deliver {
                sig: sig_of(&encoded).to_vec(),
                payload: encoded,
            });
            assert_eq!(
                encode_signed(Batch::Deliver, &payload, sig_of),
                two_steps,
                "{n}"
            );
        }
        let receipts = crate::wire::envelope::ReceiptPayload {
            to_node: "n".into(),
            receipts: Vec::new(),
        };
        let encoded = crate::wire::encode(&receipts);
        let two_steps = crate::wire::encode(&Request::Receipts {
            sig: sig_of(&encoded).to_vec(),
            payload: encoded,
        });
        assert_eq!(encode_signed(Batch::Receipts, &receipts, sig_of), two_steps);
    }

    #[test]
    fn signed_parts_point_at_the_fields_and_leave_other_requests_alone() {
        for batch in [Batch::Deliver, Batch::Receipts] {
            for n in [0usize, 3, 300, 70_000] {
                let payload = vec![7u8; n];
                let sig = vec![9u8; 64];
                let req = match batch {
                    Batch::Deliver => Request::Deliver {
                        payload: payload.clone(),
                        sig: sig.clone(),
                    },
                    Batch::Receipts => Request::Receipts {
                        payload: payload.clone(),
                        sig: sig.clone(),
                    },
                };
                let frame = crate::wire::encode(&req);
                let parts = signed_parts(&frame).unwrap().unwrap();
                assert_eq!(parts.batch, batch);
                assert_eq!(&frame[parts.payload], payload.as_slice());
                assert_eq!(&frame[parts.sig], sig.as_slice());
                // Cut short or with a byte too many: a clear error.
                assert!(signed_parts(&frame[..frame.len() - 1]).is_err());
                let mut longer = frame.clone();
                longer.push(0);
                assert!(matches!(
                    signed_parts(&longer),
                    Err(crate::wire::Error::Trailing(1))
                ));
            }
        }
        let other = crate::wire::encode(&Request::FindAds { key: "k".into() });
        assert_eq!(signed_parts(&other).unwrap(), None);
        assert_eq!(signed_parts(&[]).unwrap(), None);
    }
}
