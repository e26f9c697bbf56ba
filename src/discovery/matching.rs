//! Capability matching and free-text ranking for agent discovery.
//!
//! Two independent tools live here:
//!
//! * [`Filter`] answers "which capabilities of this agent satisfy a structured
//!   query?" using a [`NamePattern`], required tags and a semver requirement.
//! * [`rank`] orders agents by relevance to a free-text query with BM25 over
//!   one document per agent, using a small tokeniser and a light stemmer.
//!
//! Everything is pure, synchronous and panic-free on any input.

use semver::{Version, VersionReq};
use thiserror::Error;

use super::Capability;

/// Longest accepted capability name pattern, in bytes.
pub const MAX_PATTERN_LEN: usize = 256;

/// Errors produced while parsing discovery queries.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Error {
    /// The name pattern was the empty string.
    #[error("capability name pattern is empty")]
    EmptyPattern,
    /// The name pattern exceeds [`MAX_PATTERN_LEN`] bytes.
    #[error("capability name pattern is {len} bytes long; the maximum is {max}")]
    PatternTooLong {
        /// Length of the rejected pattern in bytes.
        len: usize,
        /// The maximum allowed length.
        max: usize,
    },
    /// A `*` appeared somewhere other than alone or as the whole last segment.
    #[error(
        "misplaced `*` at byte {position} of capability name pattern {pattern:?}: \
         a wildcard may only stand alone (`*`) or as the whole last segment (`translate/*`)"
    )]
    MisplacedWildcard {
        /// The rejected pattern.
        pattern: String,
        /// Byte offset of the offending `*`.
        position: usize,
    },
    /// The pattern has a leading, trailing or doubled `/`.
    #[error(
        "capability name pattern {pattern:?} has an empty segment (leading, trailing or doubled `/`)"
    )]
    EmptySegment {
        /// The rejected pattern.
        pattern: String,
    },
    /// The pattern contains a character outside `[a-z0-9._-/]`.
    #[error(
        "invalid character {ch:?} at byte {position} of capability name pattern {pattern:?}: \
         only lowercase a-z, 0-9, `.`, `_`, `-` and `/` are allowed"
    )]
    InvalidCharacter {
        /// The rejected pattern.
        pattern: String,
        /// The offending character.
        ch: char,
        /// Byte offset of the offending character.
        position: usize,
    },
    /// The version requirement is not valid semver requirement syntax.
    #[error("invalid version requirement {input:?}: {reason}")]
    InvalidVersionReq {
        /// The rejected requirement text.
        input: String,
        /// What the semver parser objected to (its error message).
        reason: String,
    },
}

// ----- Structured matching -----

/// A pattern over capability names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NamePattern {
    /// Matches exactly one name.
    Exact(String),
    /// Matches every name starting with this prefix. Parsed from `segment/*`
    /// (the prefix then ends with `/`) or from a bare `*` (empty prefix,
    /// matching everything).
    Prefix(String),
}

impl NamePattern {
    /// Parses `name`, `name/*` or `*`.
    ///
    /// `translate/*` matches `translate/fr-en` and `translate/x/y` but neither
    /// `translate` nor `translateX`. Names are lowercase `/`-separated
    /// segments of `[a-z0-9._-]`.
    ///
    /// # Errors
    ///
    /// Returns an [`Error`](enum@Error) naming the pattern and, where relevant, the
    /// offending character and its byte offset, when the pattern is empty,
    /// longer than [`MAX_PATTERN_LEN`], has an empty segment, a misplaced `*`
    /// or a character outside `[a-z0-9._-/]`.
    pub fn parse(input: &str) -> Result<Self, Error> {
        if input.is_empty() {
            return Err(Error::EmptyPattern);
        }
        if input.len() > MAX_PATTERN_LEN {
            return Err(Error::PatternTooLong {
                len: input.len(),
                max: MAX_PATTERN_LEN,
            });
        }
        if input == "*" {
            return Ok(Self::Prefix(String::new()));
        }
        if let Some(body) = input.strip_suffix("/*") {
            check_name(input, body)?;
            Ok(Self::Prefix(format!("{body}/")))
        } else {
            check_name(input, input)?;
            Ok(Self::Exact(input.to_owned()))
        }
    }

    /// Whether the capability name `name` matches this pattern.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Self::Exact(exact) => exact == name,
            Self::Prefix(prefix) => name.starts_with(prefix.as_str()),
        }
    }
}

impl std::str::FromStr for NamePattern {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl std::fmt::Display for NamePattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exact(name) => f.write_str(name),
            Self::Prefix(prefix) => write!(f, "{prefix}*"),
        }
    }
}

/// Validates the non-wildcard part `body` of `pattern`.
fn check_name(pattern: &str, body: &str) -> Result<(), Error> {
    let pattern = || pattern.to_owned();
    if let Some((position, ch)) = body.char_indices().find(|&(_, ch)| !is_name_char(ch)) {
        return Err(match ch {
            '*' => Error::MisplacedWildcard {
                pattern: pattern(),
                position,
            },
            _ => Error::InvalidCharacter {
                pattern: pattern(),
                ch,
                position,
            },
        });
    }
    if body.split('/').any(str::is_empty) {
        return Err(Error::EmptySegment { pattern: pattern() });
    }
    Ok(())
}

fn is_name_char(ch: char) -> bool {
    matches!(ch, 'a'..='z' | '0'..='9' | '.' | '_' | '-' | '/')
}

/// Parses a semver requirement such as `>=1.2, <2` or `^1.4`.
///
/// Surrounding whitespace is ignored.
///
/// # Errors
///
/// [`Error::InvalidVersionReq`], carrying the input and the parser's reason.
pub fn parse_version_req(input: &str) -> Result<VersionReq, Error> {
    VersionReq::parse(input.trim()).map_err(|err| Error::InvalidVersionReq {
        input: input.to_owned(),
        reason: err.to_string(),
    })
}

/// A structured query over one agent's capabilities. Every criterion must
/// hold on the *same* capability; unset criteria accept anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Required name pattern, if any.
    pub name: Option<NamePattern>,
    /// Tags that must all be present (compared case-insensitively).
    pub tags: Vec<String>,
    /// Version requirement; capabilities without a parseable version fail it.
    pub version: Option<VersionReq>,
}

impl Filter {
    /// Whether a single capability satisfies every criterion.
    pub fn accepts(&self, cap: &Capability) -> bool {
        self.name_ok(cap) && self.tags_ok(cap) && self.version_ok(cap)
    }

    /// The capabilities in `caps` that satisfy the filter, in input order.
    pub fn matching<'a>(&self, caps: &'a [Capability]) -> Vec<&'a Capability> {
        caps.iter().filter(|cap| self.accepts(cap)).collect()
    }

    /// Whether at least one capability in `caps` satisfies the filter
    /// (so an agent with no capabilities never matches).
    pub fn matches(&self, caps: &[Capability]) -> bool {
        caps.iter().any(|cap| self.accepts(cap))
    }

    fn name_ok(&self, cap: &Capability) -> bool {
        self.name
            .as_ref()
            .is_none_or(|pattern| pattern.matches(&cap.name))
    }

    fn tags_ok(&self, cap: &Capability) -> bool {
        self.tags
            .iter()
            .all(|wanted| cap.tags.iter().any(|have| eq_ignore_case(wanted, have)))
    }

    fn version_ok(&self, cap: &Capability) -> bool {
        match &self.version {
            None => true,
            Some(req) => capability_version(cap).is_some_and(|v| req.matches(&v)),
        }
    }
}

/// Parses a capability's advertised version, tolerating whitespace and a
/// leading `v` (`v1.2.0`).
fn capability_version(cap: &Capability) -> Option<Version> {
    let raw = cap.version.as_deref()?.trim();
    Version::parse(raw.strip_prefix('v').unwrap_or(raw)).ok()
}

/// Unicode-aware case-insensitive equality without allocating.
fn eq_ignore_case(a: &str, b: &str) -> bool {
    a.chars()
        .flat_map(char::to_lowercase)
        .eq(b.chars().flat_map(char::to_lowercase))
}

// ----- Free-text ranking -----

/// BM25 term-frequency saturation.
const K1: f64 = 1.2;
/// BM25 document-length normalisation.
const B: f64 = 0.75;
/// Field weights: each term occurrence counts this many times.
const NAME_WEIGHT: f64 = 3.0;
const TAG_WEIGHT: f64 = 2.0;
const HANDLE_WEIGHT: f64 = 2.0;
const TEXT_WEIGHT: f64 = 1.0;

/// What the ranker sees of one agent.
#[derive(Debug, Clone, Copy)]
pub struct Document<'a> {
    /// The agent's handle, e.g. `summarizer-bot`.
    pub handle: &'a str,
    /// The agent's own description.
    pub description: &'a str,
    /// The capabilities the agent advertises.
    pub capabilities: &'a [Capability],
}

impl Document<'_> {
    /// Calls `f(text, weight)` for every text field of the document.
    fn for_each_field(&self, mut f: impl FnMut(&str, f64)) {
        f(self.handle, HANDLE_WEIGHT);
        f(self.description, TEXT_WEIGHT);
        for cap in self.capabilities {
            f(&cap.name, NAME_WEIGHT);
            f(&cap.description, TEXT_WEIGHT);
            for tag in &cap.tags {
                f(tag, TAG_WEIGHT);
            }
        }
    }
}

/// Ranks `docs` against a free-text `query` with BM25.
///
/// Text is split on non-alphanumeric characters, lowercased and stemmed with
/// [`stem`]; stop words are dropped from the query. Capability names count
/// three times, tags and handles twice, descriptions once, both for term
/// frequency and for document length.
///
/// Returns `(index into docs, score)` for every document with a positive
/// score, best first; equal scores are ordered by index. A query made only of
/// stop words, or an empty `docs`, yields an empty result.
pub fn rank(query: &str, docs: &[Document<'_>]) -> Vec<(usize, f64)> {
    let query = QueryTerms::parse(query);
    if query.terms.is_empty() || docs.is_empty() {
        return Vec::new();
    }
    let scores = CorpusStats::collect(&query, docs).scores();
    let mut ranked: Vec<(usize, f64)> = scores
        .into_iter()
        .enumerate()
        .filter(|&(_, score)| score > 0.0)
        .collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    ranked
}

/// The distinct stemmed query terms, plus their prefix keys so that most
/// document words can be rejected without being copied or stemmed.
struct QueryTerms {
    /// Sorted, deduplicated stems.
    terms: Vec<String>,
    /// Bitmap over [`prefix_key`]s: bit `k` is set if some term has key `k`.
    keys: Vec<u64>,
}

impl QueryTerms {
    fn parse(query: &str) -> Self {
        let (mut terms, mut buf) = (Vec::new(), String::new());
        for_each_word(query, |word| {
            if normalize_into(&mut buf, word) {
                stem_in_place(&mut buf);
                terms.push(buf.clone());
            }
        });
        terms.sort_unstable();
        terms.dedup();
        let mut keys = vec![0u64; (usize::from(u16::MAX) + 1) / 64];
        for key in terms.iter().filter_map(|t| prefix_key(t)) {
            if let Some(bits) = keys.get_mut(usize::from(key / 64)) {
                *bits |= 1 << (key % 64);
            }
        }
        Self { terms, keys }
    }

    /// Cheap pre-check on a raw (not yet lowercased) document word: false
    /// only if it certainly cannot stem to a query term.
    fn may_match(&self, word: &str) -> bool {
        prefix_key(word).is_none_or(|key| {
            let bits = self.keys.get(usize::from(key / 64)).copied().unwrap_or(0);
            bits >> (key % 64) & 1 == 1
        })
    }

    /// Index of the term equal to the already-lowercased `token` once stemmed.
    fn find(&self, token: &mut String) -> Option<usize> {
        stem_in_place(token);
        self.terms.binary_search_by(|t| t.as_str().cmp(token)).ok()
    }
}

/// The ASCII-lowercased first two bytes of a word (the second is 0 for a
/// one-byte word; words never contain NUL), or `None` if they are not ASCII
/// and so might change when lowercased. Lowercasing keeps ASCII bytes ASCII
/// and stemming never changes them, so a document word can only stem to a
/// query term with the same key.
fn prefix_key(word: &str) -> Option<u16> {
    let (a, b) = match *word.as_bytes() {
        [a] => (a, 0),
        [a, b, ..] => (a, b),
        [] => return Some(0),
    };
    (a.is_ascii() && b.is_ascii())
        .then(|| u16::from(a.to_ascii_lowercase()) << 8 | u16::from(b.to_ascii_lowercase()))
}

/// The statistics BM25 needs, restricted to the query terms.
struct CorpusStats {
    /// Per query term: `(document index, weighted term frequency)`.
    postings: Vec<Vec<(usize, f64)>>,
    /// Weighted length of every document.
    doc_len: Vec<f64>,
}

impl CorpusStats {
    /// Tokenises every document once, counting only the query terms.
    fn collect(query: &QueryTerms, docs: &[Document<'_>]) -> Self {
        let mut buf = String::new();
        let mut postings: Vec<Vec<(usize, f64)>> = vec![Vec::new(); query.terms.len()];
        let mut doc_len = Vec::with_capacity(docs.len());
        for (doc_idx, doc) in docs.iter().enumerate() {
            let mut len = 0.0;
            doc.for_each_field(|text, weight| {
                for_each_word(text, |word| {
                    // Every word counts towards the length; only plausible
                    // ones are copied, lowercased and stemmed.
                    len += weight;
                    if query.may_match(word)
                        && normalize_into(&mut buf, word)
                        && let Some(t) = query.find(&mut buf)
                    {
                        add_occurrence(&mut postings[t], doc_idx, weight);
                    }
                });
            });
            doc_len.push(len);
        }
        Self { postings, doc_len }
    }

    /// BM25 score of every document.
    fn scores(&self) -> Vec<f64> {
        let n = self.doc_len.len();
        let mut scores = vec![0.0; n];
        let avg_len = self.doc_len.iter().sum::<f64>() / n.max(1) as f64;
        if avg_len <= 0.0 {
            return scores;
        }
        for list in &self.postings {
            let idf = idf(n, list.len());
            for &(doc, tf) in list {
                let norm = 1.0 - B + B * self.doc_len[doc] / avg_len;
                scores[doc] += idf * tf * (K1 + 1.0) / (tf + K1 * norm);
            }
        }
        scores
    }
}

/// Adds `weight` to `doc`'s frequency, appending a posting on first sight.
fn add_occurrence(list: &mut Vec<(usize, f64)>, doc: usize, weight: f64) {
    match list.last_mut() {
        Some((last, tf)) if *last == doc => *tf += weight,
        _ => list.push((doc, weight)),
    }
}

/// Non-negative BM25 inverse document frequency.
fn idf(n: usize, df: usize) -> f64 {
    let (n, df) = (n as f64, df as f64);
    ((n - df + 0.5) / (df + 0.5) + 1.0).ln()
}

/// Calls `f` with every maximal run of alphanumeric characters in `text`, as
/// written. ASCII separators are found byte by byte; runs containing other
/// scripts are split again on Unicode separators.
fn for_each_word(text: &str, mut f: impl FnMut(&str)) {
    let mut emit = |start: usize, end: usize| {
        // Both ends sit on ASCII bytes or the ends of `text`: always `Some`.
        let Some(run) = text.get(start..end).filter(|run| !run.is_empty()) else {
            return;
        };
        if run.is_ascii() {
            f(run);
        } else {
            run.split(|c: char| !c.is_alphanumeric())
                .filter(|w| !w.is_empty())
                .for_each(&mut f);
        }
    };
    let mut start = 0;
    for (i, byte) in text.bytes().enumerate() {
        if IS_SEPARATOR[usize::from(byte)] {
            emit(start, i);
            start = i + 1;
        }
    }
    emit(start, text.len());
}

/// Per byte: whether it is ASCII but not a letter or digit.
const IS_SEPARATOR: [bool; 256] = {
    let mut table = [false; 256];
    let mut b: u8 = 0;
    while b < 0x80 {
        table[b as usize] = !b.is_ascii_alphanumeric();
        b += 1;
    }
    table
};

/// Lowercases `word` into `buf`; returns false if it is a stop word.
fn normalize_into(buf: &mut String, word: &str) -> bool {
    buf.clear();
    if word.is_ascii() {
        buf.push_str(word);
        buf.make_ascii_lowercase();
    } else {
        buf.extend(word.chars().flat_map(char::to_lowercase));
    }
    !is_stop_word(buf)
}

/// A small list of English function words ignored in queries and never
/// matched in documents.
#[rustfmt::skip]
fn is_stop_word(word: &str) -> bool {
    matches!(
        word,
        "a" | "about" | "all" | "an" | "and" | "any" | "are" | "as" | "at" | "be" | "been" | "but"
        | "by" | "can" | "could" | "do" | "does" | "for" | "from" | "has" | "have" | "how" | "i"
        | "if" | "in" | "into" | "is" | "it" | "its" | "me" | "my" | "of" | "on" | "or" | "our"
        | "please" | "should" | "so" | "some" | "that" | "the" | "their" | "them" | "then"
        | "there" | "these" | "they" | "this" | "those" | "to" | "us" | "was" | "we" | "were"
        | "what" | "when" | "which" | "who" | "will" | "with" | "would" | "you" | "your"
    )
}

/// Words the suffix rules would mangle; returned unchanged.
const STEM_EXCEPTIONS: &[&str] = &["always", "embed", "news", "series", "species"];

/// Reduces an English word to a crude stem so that inflected and derived
/// forms meet: `documents` → `document`, `summarization` / `summaries` /
/// `summarize` → `summar`, `shorten` → `short`, `translating` → `transl`.
///
/// Only lowercase ASCII words longer than three letters are touched; anything
/// else (digits, other scripts) is returned as is.
pub fn stem(word: &str) -> String {
    let mut word = word.to_owned();
    stem_in_place(&mut word);
    word
}

fn stem_in_place(w: &mut String) {
    if w.len() <= 3 || !w.bytes().all(|b| b.is_ascii_lowercase()) {
        return;
    }
    if STEM_EXCEPTIONS.contains(&w.as_str()) {
        return;
    }
    strip_plural(w);
    strip_inflection(w);
    strip_derivation(w);
    strip_final(w);
}

fn is_vowel(b: u8) -> bool {
    matches!(b, b'a' | b'e' | b'i' | b'o' | b'u' | b'y')
}

fn has_vowel(s: &str) -> bool {
    s.bytes().any(is_vowel)
}

fn last_byte(s: &str) -> Option<u8> {
    s.as_bytes().last().copied()
}

/// `-sses` → `-ss`, `-ies` → `-y`, and a final `-s` is dropped unless it
/// follows `s`, `u` or `i` (`class`, `status`, `analysis`).
fn strip_plural(w: &mut String) {
    if w.ends_with("sses") {
        w.truncate(w.len() - 2);
    } else if w.len() > 4 && w.ends_with("ies") {
        w.truncate(w.len() - 3);
        w.push('y');
    } else if let [.., prev, b's'] = w.as_bytes()
        && !matches!(prev, b's' | b'u' | b'i')
    {
        w.pop();
    }
}

/// `-ied` → `-y`, `-ed` / `-ing` (with Porter-style repair), `-ly`.
fn strip_inflection(w: &mut String) {
    if w.len() > 4 && w.ends_with("ied") {
        w.truncate(w.len() - 3);
        w.push('y');
    } else if w.ends_with("eed") {
        // agreed, speed: leave alone.
    } else if let Some(stem) = w.strip_suffix("ed").or_else(|| w.strip_suffix("ing")) {
        if stem.len() >= 3 && has_vowel(stem) {
            w.truncate(stem.len());
            repair_after_inflection(w);
        }
    } else if let Some(stem) = w.strip_suffix("ly")
        && stem.len() >= 4
        && !matches!(last_byte(stem), Some(b'i' | b'p' | b'b'))
    {
        w.truncate(stem.len());
    }
}

/// Restores a dropped `e` (`translat` → `translate`, `summariz` →
/// `summarize`) or undoubles a final consonant (`runn` → `run`).
fn repair_after_inflection(w: &mut String) {
    if w.ends_with("at") || w.ends_with("iz") || w.ends_with("is") {
        w.push('e');
        return;
    }
    let bytes = w.as_bytes();
    if let [.., a, b] = bytes
        && a == b
        && !is_vowel(*b)
        && !matches!(b, b'l' | b's' | b'z')
        && bytes.len() > 3
    {
        w.pop();
    }
}

/// Derivational suffixes, longest first: `(suffix, replacement, minimum stem
/// length)`. Only the first matching rule applies.
#[rustfmt::skip]
const DERIVATIONS: &[(&str, &str, usize)] = &[
    ("ification", "if", 3), ("ization", "", 3), ("isation", "", 3), ("ation", "", 3),
    ("ative", "", 3), ("ifier", "if", 3), ("ator", "", 3), ("izer", "", 3), ("iser", "", 3),
    ("ness", "", 3), ("tion", "t", 3), ("sion", "s", 3), ("tor", "t", 3), ("ful", "", 3),
    ("ize", "", 3), ("ise", "", 4), ("ate", "", 3),
];

/// Applies the first matching derivational rule, then `-en` / `-er`.
fn strip_derivation(w: &mut String) {
    for &(suffix, replacement, min_stem) in DERIVATIONS {
        if let Some(stem) = w.strip_suffix(suffix) {
            if stem.len() >= min_stem {
                w.truncate(stem.len());
                w.push_str(replacement);
            }
            return;
        }
    }
    strip_agentive(w);
}

/// `-en` after a consonant (`shorten` → `short`) and `-er` (`reviewer` →
/// `review`), each only when enough of the word remains.
fn strip_agentive(w: &mut String) {
    let (stem, min_stem) = match (w.strip_suffix("en"), w.strip_suffix("er")) {
        (Some(stem), _) => (stem, 4),
        (_, Some(stem)) => (stem, 3),
        _ => return,
    };
    if stem.len() >= min_stem && last_byte(stem).is_some_and(|b| !is_vowel(b)) {
        w.truncate(stem.len());
    }
}

/// Drops a final `e` (`translate` → `translat`) or a final `y` after a
/// consonant (`summary` → `summar`).
fn strip_final(w: &mut String) {
    let bytes = w.as_bytes();
    match bytes {
        [.., b'e'] if bytes.len() > 3 => {
            w.pop();
        }
        [.., c, b'y'] if bytes.len() > 4 && !is_vowel(*c) => {
            w.pop();
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests;
