//! Everything that crosses the network is encoded and decoded here.
//!
//! Format: a 2-byte little-endian wire version, then the bincode (v2,
//! standard config, serde) encoding of the value. Decoding checks the size
//! before touching the bytes, rejects unknown versions, and gives bincode a
//! hard allocation limit so a hostile length prefix cannot exhaust memory.
//! Signed structures are signed over `signing_bytes`: a domain tag plus the
//! canonical encoding of the unsigned part, so a signature for one kind of
//! statement can never be replayed as another.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub mod ad;
pub mod envelope;
pub mod owned;
pub mod rpc;

pub use ad::{AdBody, AdState, Capability, SignedAd};
pub use envelope::{Envelope, Outcome, Receipt, ReceiptKind, Rejection};
pub use rpc::{Request, Response};

/// The wire version this build speaks.
pub const WIRE_VERSION: u16 = 1;
/// Largest frame accepted from a peer (request or response).
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;
/// Largest message body a node may be configured to accept.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// Wire encoding errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The frame is larger than allowed.
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Actual size.
        size: usize,
        /// Limit.
        limit: usize,
    },
    /// The frame is shorter than its version header.
    #[error("frame too short to hold a version header")]
    Truncated,
    /// The peer speaks a version we do not.
    #[error("unsupported wire version {got} (this node speaks {WIRE_VERSION})")]
    UnsupportedVersion {
        /// The version found.
        got: u16,
    },
    /// The bytes are not a valid encoding of the expected type.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// Trailing bytes after the value.
    #[error("malformed frame: {0} trailing bytes")]
    Trailing(usize),
}

fn config() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_FRAME_BYTES>,
> {
    bincode::config::standard().with_limit::<MAX_FRAME_BYTES>()
}

/// Append a value's encoding, version header first, to `out` (a buffer
/// that is reused, such as the write-ahead log's: no allocation of its own).
pub fn encode_into<T: Serialize>(out: &mut Vec<u8>, value: &T) {
    out.extend_from_slice(&WIRE_VERSION.to_le_bytes());
    // Writing into a Vec cannot fail.
    bincode::serde::encode_into_std_write(value, out, config())
        .expect("wire types are bincode-encodable");
}

/// Encode a value with the version header.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Encoding only fails for types serde cannot represent in bincode
    // (`deserialize_any` types are not used on the wire): a programming
    // error caught by tests. A sizing pass first lets the bytes go straight
    // into one allocation of the right size (growing a Vec while encoding a
    // 1 KiB message reallocated and copied it about eight times).
    let mut size = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(value, &mut size, config())
        .expect("wire types are bincode-encodable");
    let mut out = Vec::with_capacity(2 + size.bytes_written);
    out.extend_from_slice(&WIRE_VERSION.to_le_bytes());
    // Writing into a Vec with room reserved cannot fail or reallocate.
    bincode::serde::encode_into_std_write(value, &mut out, config())
        .expect("wire types are bincode-encodable");
    out
}

/// Decode a value, enforcing `limit` bytes, the version and full consumption.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], limit: usize) -> Result<T, Error> {
    decode_borrowed(bytes, limit)
}

/// Like [`decode`], for types that borrow strings and byte slices from
/// `bytes` instead of copying them.
pub fn decode_borrowed<'a, T: Deserialize<'a>>(bytes: &'a [u8], limit: usize) -> Result<T, Error> {
    if bytes.len() > limit {
        return Err(Error::TooLarge {
            size: bytes.len(),
            limit,
        });
    }
    let (head, body) = bytes.split_at_checked(2).ok_or(Error::Truncated)?;
    let version = u16::from_le_bytes([head[0], head[1]]);
    if version != WIRE_VERSION {
        return Err(Error::UnsupportedVersion { got: version });
    }
    let (value, used) = bincode::serde::borrow_decode_from_slice(body, config())
        .map_err(|e| Error::Malformed(e.to_string()))?;
    if used != body.len() {
        return Err(Error::Trailing(body.len() - used));
    }
    Ok(value)
}

/// The bytes a signature covers: a domain tag, then the canonical encoding.
pub fn signing_bytes<T: Serialize>(domain: &str, value: &T) -> Vec<u8> {
    signing_bytes_raw(domain, &encode(value))
}

/// What a batch signature covers: the domain and the BLAKE3 digest of the
/// encoded payload. Signing the digest hashes the (large) payload once
/// instead of twice with ed25519's SHA-512. BLAKE3 rather than SHA-256:
/// every delivered message is hashed once on each node, and on this
/// project's 2-core benchmark machine BLAKE3 ran at 6.3 GB/s against
/// SHA-256's 1.8 GB/s with the CPU's SHA extensions (BENCHMARKS.md, stop
/// 16). The domain names the digest (`deliver.b3`), so a node that
/// hashed otherwise fails the check instead of misreading it.
pub fn digest_signing_bytes(domain: &str, payload: &[u8]) -> Vec<u8> {
    signing_bytes_raw(domain, blake3::hash(payload).as_bytes())
}

/// Like `signing_bytes`, over bytes that are already encoded.
pub fn signing_bytes_raw(domain: &str, encoded: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded.len() + domain.len() + 16);
    out.extend_from_slice(b"agentmesh-sig:");
    out.extend_from_slice(domain.as_bytes());
    out.push(0);
    out.extend_from_slice(encoded);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        a: u64,
        b: String,
        c: Vec<u8>,
    }

    #[test]
    fn roundtrip() {
        let s = Sample {
            a: 7,
            b: "x".into(),
            c: vec![1, 2, 3],
        };
        let bytes = encode(&s);
        assert_eq!(decode::<Sample>(&bytes, 1024).unwrap(), s);
    }

    #[test]
    fn rejects_bad_frames() {
        let s = Sample {
            a: 7,
            b: "x".into(),
            c: vec![],
        };
        let mut bytes = encode(&s);
        assert!(matches!(
            decode::<Sample>(&bytes, 3),
            Err(Error::TooLarge { .. })
        ));
        assert!(matches!(
            decode::<Sample>(&bytes[..1], 100),
            Err(Error::Truncated)
        ));
        assert!(matches!(
            decode::<Sample>(&bytes[..4], 100),
            Err(Error::Malformed(_))
        ));
        bytes.push(0);
        assert!(matches!(
            decode::<Sample>(&bytes, 100),
            Err(Error::Trailing(1))
        ));
        bytes[0] = 9;
        assert!(matches!(
            decode::<Sample>(&bytes, 100),
            Err(Error::UnsupportedVersion { got: 9 })
        ));
    }

    #[test]
    fn hostile_length_prefix_does_not_allocate() {
        // A vec length of u64::MAX must fail cleanly, not abort on allocation.
        let mut bytes = WIRE_VERSION.to_le_bytes().to_vec();
        bytes.push(7); // a
        bytes.push(0); // b: empty string
        bytes.push(253); // varint u64 marker
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode::<Sample>(&bytes, 100).is_err());
    }

    #[test]
    fn a_borrowed_envelope_reads_what_an_envelope_writes() {
        use crate::identity::AgentId;
        let env = envelope::Envelope {
            id: "01KB0000000000000000000000".into(),
            from: AgentId::from_public(&[1; 32]),
            from_handle: "alice".into(),
            to: AgentId::from_public(&[2; 32]),
            subject: Some("hi".into()),
            body_json: r#"{"n":1}"#.into(),
            reply_to: None,
            created_at_ms: 5,
            expires_at_ms: 6,
            trace_id: "t".into(),
            delegation_json: Some("[]".into()),
        };
        let bytes = encode(&env);
        let r: envelope::EnvelopeRef<'_> = decode_borrowed(&bytes, MAX_FRAME_BYTES).unwrap();
        assert_eq!(r.id, env.id);
        assert_eq!((r.from, r.to), (env.from.as_str(), env.to.as_str()));
        assert_eq!((r.from_handle, r.subject), ("alice", Some("hi")));
        assert_eq!((r.body_json, r.reply_to), (r#"{"n":1}"#, None));
        assert_eq!((r.created_at_ms, r.expires_at_ms), (5, 6));
        assert_eq!((r.trace_id, r.delegation_json), ("t", Some("[]")));
        assert!(r.ids_well_formed());
        // The shape check the owned decoder applies to agent ids.
        let bad = envelope::EnvelopeRef {
            to: "agt_0OIl",
            ..r
        };
        assert!(!bad.ids_well_formed());
        // Trailing bytes are refused as for owned decoding.
        let mut long = bytes.clone();
        long.push(0);
        assert!(decode_borrowed::<envelope::EnvelopeRef<'_>>(&long, MAX_FRAME_BYTES).is_err());
    }

    #[test]
    fn domains_separate_signatures() {
        assert_ne!(signing_bytes("ad", &1u8), signing_bytes("receipt", &1u8));
    }

    #[test]
    fn byte_fields_keep_their_encoding() {
        // `serde_bytes` fields write one length and the raw bytes, which is
        // byte for byte what a plain `Vec<u8>` wrote (a length, then each
        // byte): peers on builds from before the change still understand.
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Raw {
            #[serde(with = "serde_bytes")]
            c: Vec<u8>,
        }
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Plain {
            c: Vec<u8>,
        }
        let c: Vec<u8> = (0..=255u8).chain(0..=255u8).collect();
        let raw = encode(&Raw { c: c.clone() });
        assert_eq!(raw, encode(&Plain { c: c.clone() }));
        assert_eq!(decode::<Plain>(&raw, 4096).unwrap().c, c);
        assert_eq!(decode::<Raw>(&raw, 4096).unwrap().c, c);
    }
}
