//! Message ids: 26-character, time-sortable, unique (ULID layout: 48-bit
//! milliseconds + 80 random bits, Crockford base32). Ids minted by one
//! node are strictly increasing, so sorting by id preserves each sender's
//! order even when the clock stalls or steps back.

use std::sync::Mutex;

const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// Length of an id.
pub const ID_LEN: usize = 26;

/// Mints increasing ids.
#[derive(Debug, Default)]
pub struct IdGen {
    state: Mutex<State>,
}

/// Random bytes are fetched from the OS in blocks: one `getrandom` call
/// per id was a syscall per message.
const POOL: usize = 10 * 256;

#[derive(Debug)]
struct State {
    last: u128,
    pool: Box<[u8; POOL]>,
    used: usize,
}

impl Default for State {
    fn default() -> Self {
        State {
            last: 0,
            pool: Box::new([0; POOL]),
            used: POOL,
        }
    }
}

impl IdGen {
    /// A new id at time `now_ms`.
    pub fn next(&self, now_ms: u64) -> String {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.used + 10 > POOL {
            // The OS RNG practically never fails; a zero random part still
            // yields unique ids because of the monotonic bump below.
            let _ = getrandom::fill(&mut st.pool[..]);
            st.used = 0;
        }
        let at = st.used;
        st.used += 10;
        let r = st.pool[at..at + 10]
            .iter()
            .fold(0u128, |r, &b| (r << 8) | u128::from(b));
        let candidate = (u128::from(now_ms & 0xFFFF_FFFF_FFFF) << 80) | r;
        let v = if candidate > st.last {
            candidate
        } else {
            st.last + 1
        };
        st.last = v;
        drop(st);
        encode(v)
    }
}

fn encode(mut v: u128) -> String {
    let mut out = [0u8; ID_LEN];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(v & 31) as usize];
        v >>= 5;
    }
    out.iter().map(|&b| b as char).collect()
}

/// Each byte's value in `ALPHABET`, or `NOT_A_DIGIT`: ids are checked and
/// decoded on every message, so a table lookup instead of a search.
const NOT_A_DIGIT: u8 = u8::MAX;
const DIGITS: [u8; 256] = {
    let mut t = [NOT_A_DIGIT; 256];
    let mut i = 0;
    while i < ALPHABET.len() {
        t[ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    t
};

/// Whether `s` looks like an id we mint.
pub fn is_valid(s: &str) -> bool {
    s.len() == ID_LEN
        && s.bytes().all(|b| DIGITS[b as usize] != NOT_A_DIGIT)
        && s.as_bytes()[0] <= b'7'
}

/// Milliseconds encoded in an id.
pub fn time_of(s: &str) -> Option<u64> {
    if !is_valid(s) {
        return None;
    }
    let mut v: u128 = 0;
    for b in s.bytes() {
        v = (v << 5) | DIGITS[b as usize] as u128;
    }
    Some((v >> 80) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_increase_even_when_the_clock_stalls_or_steps_back() {
        let g = IdGen::default();
        let mut prev = g.next(1_000);
        for now in [1_000, 1_000, 999, 5, 2_000, 2_000] {
            let id = g.next(now);
            assert!(id > prev, "{id} <= {prev}");
            assert!(is_valid(&id));
            prev = id;
        }
    }

    #[test]
    fn time_roundtrip_and_validation() {
        let g = IdGen::default();
        let id = g.next(1_764_000_000_000);
        assert_eq!(time_of(&id), Some(1_764_000_000_000));
        assert!(!is_valid("short"));
        assert!(!is_valid("01ARZ3NDEKTSV4RRFFQ69G5FAI")); // I is not in the alphabet
        assert!(!is_valid("81ARZ3NDEKTSV4RRFFQ69G5FAV")); // overflows 128 bits
    }

    #[test]
    fn random_parts_stay_random_across_pool_refills() {
        // Two generators at the same millisecond share no id, also after
        // their pools were refilled several times.
        let (a, b) = (IdGen::default(), IdGen::default());
        let ours: std::collections::HashSet<String> = (0..1000).map(|_| a.next(7)).collect();
        assert_eq!(ours.len(), 1000);
        let clashes = (0..1000).filter(|_| ours.contains(&b.next(7))).count();
        assert_eq!(clashes, 0);
    }
}
