//! Keys and ids for nodes and agents, and the signing helpers every signed
//! wire type uses.
//!
//! All keys are ed25519. A node's libp2p identity and its signing key come
//! from the same 32-byte seed, so the `PeerId` names the key that signs the
//! node's statements. An `AgentId` is `agt_` + base58 of the agent's public
//! key: anyone can verify an agent's signature from its id alone.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};

/// File name of the node key inside the data dir.
pub const NODE_KEY_FILE: &str = "node.key";
const AGENT_PREFIX: &str = "agt_";

/// Identity errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The OS random source failed.
    #[error("cannot get random bytes from the OS: {0}")]
    Random(String),
    /// Reading or writing a key file failed.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A key file does not hold a key.
    #[error("key file {path} is corrupt: {reason}")]
    CorruptKey {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An id string is malformed.
    #[error(
        "invalid agent id {0:?}: expected agt_ followed by the base58 of a 32-byte ed25519 key"
    )]
    BadAgentId(String),
    /// A signature does not verify.
    #[error("signature does not verify")]
    BadSignature,
    /// Bytes are not an ed25519 public key.
    #[error("not an ed25519 public key")]
    BadPublicKey,
}

/// 32 random bytes from the OS.
pub fn random_seed() -> Result<[u8; 32], Error> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| Error::Random(e.to_string()))?;
    Ok(seed)
}

/// A fresh ed25519 signing key.
pub fn generate_key() -> Result<SigningKey, Error> {
    Ok(SigningKey::from_bytes(&random_seed()?))
}

/// Sign `msg`.
pub fn sign(key: &SigningKey, msg: &[u8]) -> [u8; 64] {
    key.sign(msg).to_bytes()
}

/// Verify `sig` over `msg` by the 32-byte public key `public`.
pub fn verify(public: &[u8; 32], msg: &[u8], sig: &[u8; 64]) -> Result<(), Error> {
    let pk = VerifyingKey::from_bytes(public).map_err(|_| Error::BadPublicKey)?;
    pk.verify(msg, &Signature::from_bytes(sig))
        .map_err(|_| Error::BadSignature)
}

/// The node's key: libp2p identity and signing key from one seed.
#[derive(Clone)]
pub struct NodeKey {
    signing: SigningKey,
    keypair: libp2p::identity::Keypair,
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeKey")
            .field("peer_id", &self.peer_id())
            .finish()
    }
}

impl NodeKey {
    /// Build from a 32-byte seed.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let mut copy = seed;
        let keypair = libp2p::identity::Keypair::ed25519_from_bytes(&mut copy)
            .expect("any 32 bytes are a valid ed25519 secret key");
        NodeKey {
            signing: SigningKey::from_bytes(&seed),
            keypair,
        }
    }

    /// A new random key.
    pub fn generate() -> Result<Self, Error> {
        Ok(Self::from_seed(random_seed()?))
    }

    /// Load `<data_dir>/node.key`, creating it (mode 0600) on first start.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, Error> {
        let path = data_dir.join(NODE_KEY_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Self::from_seed(parse_hex_seed(&path, &text)?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = Self::generate()?;
                write_secret_file(
                    &path,
                    format!("{}\n", hex(&key.signing.to_bytes())).as_bytes(),
                )?;
                Ok(key)
            }
            Err(source) => Err(Error::Io { path, source }),
        }
    }

    /// The libp2p keypair.
    pub fn keypair(&self) -> &libp2p::identity::Keypair {
        &self.keypair
    }

    /// The node id.
    pub fn peer_id(&self) -> PeerId {
        self.keypair.public().to_peer_id()
    }

    /// Raw public key bytes.
    pub fn public_bytes(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    /// Sign as this node.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        sign(&self.signing, msg)
    }
}

/// The `PeerId` that a 32-byte ed25519 public key belongs to.
pub fn peer_id_of(public: &[u8; 32]) -> Result<PeerId, Error> {
    let pk = libp2p::identity::ed25519::PublicKey::try_from_bytes(public)
        .map_err(|_| Error::BadPublicKey)?;
    Ok(libp2p::identity::PublicKey::from(pk).to_peer_id())
}

/// The ed25519 public key a `PeerId` embeds (ed25519 peer ids are the
/// key itself, "identity"-hashed), so a node's signature can be checked
/// from its id alone.
pub fn public_key_of(peer: &PeerId) -> Result<[u8; 32], Error> {
    let mh = peer.as_ref();
    if mh.code() != 0 {
        return Err(Error::BadPublicKey);
    }
    let pk = libp2p::identity::PublicKey::try_decode_protobuf(mh.digest())
        .map_err(|_| Error::BadPublicKey)?;
    let ed = pk.try_into_ed25519().map_err(|_| Error::BadPublicKey)?;
    Ok(ed.to_bytes())
}

/// A map keyed by agent id, hashed with foldhash (seeded per map):
/// these maps are read for every message, and SipHash showed in profiles.
pub type IdMap<V> = std::collections::HashMap<AgentId, V, foldhash::fast::RandomState>;

/// An agent's id: `agt_` + base58(public key).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentId(String);

/// Decoded from a borrowed `&str` where the format lends one
/// (`wire::owned`), then checked like `TryFrom<String>`.
impl<'de> Deserialize<'de> for AgentId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        AgentId::try_from(crate::wire::owned::string(d)?).map_err(serde::de::Error::custom)
    }
}

/// Serialized as the plain string, without the copy `into = "String"` makes.
impl Serialize for AgentId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl AgentId {
    /// The id of a public key.
    pub fn from_public(public: &[u8; 32]) -> Self {
        AgentId(format!(
            "{AGENT_PREFIX}{}",
            bs58::encode(public).into_string()
        ))
    }

    /// The public key this id names. Ids decoded from the wire or the
    /// database are only checked for shape (decoding every id fully would
    /// dominate the message path), so this can fail; signature checks
    /// reject such ids.
    pub fn public_key(&self) -> Result<[u8; 32], Error> {
        decode_agent_key(&self.0)
            .ok_or_else(|| Error::BadAgentId(self.0.chars().take(80).collect()))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// An id decoded without a copy (a borrowed wire field), checked for
    /// shape like every decoded id.
    pub fn from_wire(s: &str) -> Result<Self, Error> {
        Self::try_from(s.to_string())
    }

    /// Whether `s` has the shape of an id (what decoding checks).
    pub fn is_well_formed(s: &str) -> bool {
        looks_like_agent_id(s)
    }
}

/// Maps keyed by id can be searched with a `&str` (the derived `Hash`,
/// `Eq` and `Ord` are those of the string).
impl std::borrow::Borrow<str> for AgentId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

fn decode_agent_key(s: &str) -> Option<[u8; 32]> {
    let rest = s.strip_prefix(AGENT_PREFIX)?;
    let mut key = [0u8; 32];
    match bs58::decode(rest).onto(&mut key[..]) {
        Ok(32) => Some(key),
        _ => None,
    }
}

/// Cheap shape check: `agt_` and 32 to 44 base58 characters.
fn looks_like_agent_id(s: &str) -> bool {
    // Base58: digits and letters without 0, O, I and l. One table lookup
    // per byte: ids are checked on every decode.
    const BASE58: [bool; 256] = {
        let mut t = [false; 256];
        let mut b = 0;
        while b < 256 {
            t[b] = matches!(b as u8, b'1'..=b'9' | b'A'..=b'H' | b'J'..=b'N' | b'P'..=b'Z' | b'a'..=b'k' | b'm'..=b'z');
            b += 1;
        }
        t
    };
    s.strip_prefix(AGENT_PREFIX).is_some_and(|rest| {
        (32..=44).contains(&rest.len()) && rest.bytes().all(|b| BASE58[b as usize])
    })
}

/// Parsing user input is strict: the id must name a valid ed25519 key.
impl std::str::FromStr for AgentId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match decode_agent_key(s) {
            Some(k) if VerifyingKey::from_bytes(&k).is_ok() => Ok(AgentId(s.to_string())),
            _ => Err(Error::BadAgentId(s.chars().take(80).collect())),
        }
    }
}

/// Decoding (wire, database) checks the shape only; see `public_key`.
impl TryFrom<String> for AgentId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        if looks_like_agent_id(&s) {
            Ok(AgentId(s))
        } else {
            Err(Error::BadAgentId(s.chars().take(80).collect()))
        }
    }
}

impl From<AgentId> for String {
    fn from(a: AgentId) -> String {
        a.0
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Write a secret to `path` with mode 0600, atomically (temp file + rename).
pub fn write_secret_file(path: &Path, contents: &[u8]) -> Result<(), Error> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp).map_err(io)?;
    f.write_all(contents).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex_seed(path: &Path, text: &str) -> Result<[u8; 32], Error> {
    let corrupt = |reason: &str| Error::CorruptKey {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let t = text.trim();
    if t.len() != 64 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(corrupt("expected 64 hex characters"));
    }
    let mut seed = [0u8; 32];
    for (i, chunk) in t.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(chunk).map_err(|_| corrupt("not ASCII"))?;
        seed[i] = u8::from_str_radix(s, 16).map_err(|_| corrupt("bad hex digit"))?;
    }
    Ok(seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_key_persists_and_matches_peer_id() {
        let dir = tempfile::tempdir().unwrap();
        let a = NodeKey::load_or_create(dir.path()).unwrap();
        let b = NodeKey::load_or_create(dir.path()).unwrap();
        assert_eq!(a.peer_id(), b.peer_id());
        assert_eq!(peer_id_of(&a.public_bytes()).unwrap(), a.peer_id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(NODE_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn public_key_is_recovered_from_peer_id() {
        let k = NodeKey::generate().unwrap();
        assert_eq!(public_key_of(&k.peer_id()).unwrap(), k.public_bytes());
        let sig = k.sign(b"m");
        verify(&public_key_of(&k.peer_id()).unwrap(), b"m", &sig).unwrap();
    }

    #[test]
    fn corrupt_node_key_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(NODE_KEY_FILE), "garbage").unwrap();
        let err = NodeKey::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, Error::CorruptKey { .. }), "{err}");
    }

    #[test]
    fn agent_id_roundtrip_and_signature() {
        let key = generate_key().unwrap();
        let id = AgentId::from_public(&key.verifying_key().to_bytes());
        let parsed: AgentId = id.as_str().parse().unwrap();
        assert_eq!(parsed, id);
        let sig = sign(&key, b"hello");
        verify(&id.public_key().unwrap(), b"hello", &sig).unwrap();
        assert!(verify(&id.public_key().unwrap(), b"hellO", &sig).is_err());
    }

    #[test]
    fn bad_agent_ids_rejected() {
        for s in [
            "",
            "agt_",
            "agt_0OIl",
            "abc",
            "agt_3mJr7AoUXx2Wqd",
            "agent_xyz",
        ] {
            assert!(s.parse::<AgentId>().is_err(), "{s}");
        }
    }

    #[test]
    fn decoding_checks_the_base58_shape() {
        let good = AgentId::from_public(&generate_key().unwrap().verifying_key().to_bytes());
        assert!(AgentId::try_from(good.as_str().to_string()).is_ok());
        // Every character outside the bitcoin alphabet is refused.
        let alphabet = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
        for b in 0u8..=255 {
            let c = b as char;
            let mut s = good.as_str().to_string();
            s.pop();
            s.push(c);
            let ok = AgentId::try_from(s).is_ok();
            assert_eq!(ok, alphabet.contains(c), "character {b:#x}");
        }
    }
}
