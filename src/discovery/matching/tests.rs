use super::*;

fn cap(name: &str, description: &str, tags: &[&str], version: Option<&str>) -> Capability {
    Capability {
        name: name.to_owned(),
        description: description.to_owned(),
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        version: version.map(str::to_owned),
    }
}

fn pattern(s: &str) -> NamePattern {
    NamePattern::parse(s).expect("valid pattern")
}

#[test]
fn exact_prefix_and_star_patterns() {
    let exact = pattern("translate/fr-en");
    assert_eq!(exact, NamePattern::Exact("translate/fr-en".into()));
    assert!(exact.matches("translate/fr-en"));
    assert!(!exact.matches("translate/fr-en/x") && !exact.matches("translate"));

    let prefix = pattern("translate/*");
    assert_eq!(prefix, NamePattern::Prefix("translate/".into()));
    assert!(prefix.matches("translate/fr-en") && prefix.matches("translate/x/y"));
    assert!(!prefix.matches("translate") && !prefix.matches("translatex/fr"));

    let star = pattern("*");
    assert!(star.matches("summarize") && star.matches("code/review/rust"));
    for text in ["*", "translate/*", "code/review/rust"] {
        assert_eq!(pattern(text).to_string(), text);
        assert_eq!(text.parse::<NamePattern>(), Ok(pattern(text)));
    }
}

#[test]
fn malformed_patterns_are_rejected_with_the_culprit() {
    for (input, at) in [
        ("tr*ns", 2),
        ("a/*/b", 2),
        ("*/x", 0),
        ("translate*", 9),
        ("a/**", 2),
    ] {
        let err = NamePattern::parse(input).expect_err(input);
        assert_eq!(
            err,
            Error::MisplacedWildcard {
                pattern: input.into(),
                position: at
            }
        );
        assert!(err.to_string().contains(&format!("{input:?}")), "{err}");
    }
    for input in ["/a", "a/", "a//b", "/*", "a//*"] {
        let err = NamePattern::parse(input).expect_err(input);
        assert_eq!(
            err,
            Error::EmptySegment {
                pattern: input.into()
            }
        );
    }
    for (input, ch, position) in [("Translate", 'T', 0), ("code/ré", 'é', 6), ("a b", ' ', 1)] {
        let err = NamePattern::parse(input).expect_err(input);
        assert_eq!(
            err,
            Error::InvalidCharacter {
                pattern: input.into(),
                ch,
                position
            }
        );
    }
    assert_eq!(NamePattern::parse(""), Err(Error::EmptyPattern));
    let long = "a".repeat(MAX_PATTERN_LEN + 1);
    assert_eq!(
        NamePattern::parse(&long),
        Err(Error::PatternTooLong { len: 257, max: 256 })
    );
}

fn with_tags(tags: &[&str]) -> Filter {
    Filter {
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        ..Filter::default()
    }
}

#[test]
fn tags_must_all_match_on_the_same_capability_ignoring_case() {
    let caps = [
        cap("translate/fr-en", "", &["french", "text"], None),
        cap("translate/de-en", "", &["german", "Realtime"], None),
        cap("summarize", "", &["text"], None),
    ];
    assert_eq!(
        with_tags(&["FRENCH", "Text"]).matching(&caps),
        vec![&caps[0]]
    );
    assert_eq!(with_tags(&["realtime"]).matching(&caps), vec![&caps[1]]);
    // Both tags exist on the agent, but never on one capability.
    assert!(!with_tags(&["french", "realtime"]).matches(&caps));
    assert_eq!(with_tags(&[]).matching(&caps).len(), 3);
    assert!(!Filter::default().matches(&[]));

    let named = Filter {
        name: Some(pattern("translate/*")),
        ..with_tags(&["text"])
    };
    assert_eq!(named.matching(&caps), vec![&caps[0]]);
}

#[test]
fn version_requirements() {
    let caps = [
        cap("summarize", "", &[], Some("1.4.2")),
        cap("summarize", "", &[], Some("2.0.0")),
        cap("summarize", "", &[], None),
        cap("summarize", "", &[], Some("latest")),
        cap("summarize", "", &[], Some("v1.5.0")),
    ];
    let req = |text: &str| Filter {
        version: Some(parse_version_req(text).expect(text)),
        ..Filter::default()
    };
    assert_eq!(req(" ^1.2 ").matching(&caps), vec![&caps[0], &caps[4]]);
    assert_eq!(req(">=2").matching(&caps), vec![&caps[1]]);
    assert!(
        !req("*").matches(&caps[2..4]),
        "missing or unparseable versions fail"
    );
    let err = parse_version_req(">=banana").expect_err("invalid");
    assert!(matches!(&err, Error::InvalidVersionReq { input, .. } if input == ">=banana"));
    assert!(err.to_string().contains("\">=banana\""), "{err}");
}

const FAMILIES: &[&str] = &[
    "document documents",
    "summarize summarizes summarized summarizing summarization summary summaries summarizer summarise",
    "short shorten shortened shortening",
    "translate translates translated translating translation translator",
    "condense condenses condensed condensation",
    "generate generates generated generating generator generation generative",
    "classify classifies classified classifier classification",
    "review reviews reviewer reviewing",
    "embed embedding embeddings embedded",
    "run running",
    "stop stopped",
    "query queries",
    "quick quickly",
    "process processes",
    "make making",
];

#[test]
fn stemmer_conflates_word_families() {
    for family in FAMILIES {
        let stems: Vec<String> = family.split_whitespace().map(stem).collect();
        assert!(
            stems.iter().all(|s| *s == stems[0]),
            "{family:?} -> {stems:?}"
        );
    }
    assert_eq!(stem("summaries"), "summar");
    assert_eq!(stem("documents"), "document");
}

#[test]
fn stemmer_keeps_distinct_and_foreign_words_apart() {
    let unchanged =
        "fr en run class status analysis speed agreed token string only français v2 日本語";
    for word in unchanged.split_whitespace() {
        assert_eq!(stem(word), word);
    }
    assert_ne!(stem("store"), stem("short"));
    assert_ne!(stem("storage"), stem("document"));
    assert_ne!(stem("general"), stem("generate"));
}

/// `QueryTerms::find` relies on stemming never touching a token's first
/// two bytes; check that over every short word on a suffix-heavy alphabet.
#[test]
fn stemming_preserves_prefix_key() {
    let alphabet = b"aeinorstdglyz";
    let mut words: Vec<String> = FAMILIES
        .iter()
        .flat_map(|f| f.split_whitespace())
        .map(str::to_owned)
        .collect();
    let mut frontier = vec![String::new()];
    for _ in 0..5 {
        frontier = frontier
            .iter()
            .flat_map(|w| alphabet.iter().map(move |&c| format!("{w}{}", c as char)))
            .collect();
        words.extend(frontier.iter().cloned());
    }
    for word in words {
        assert_eq!(prefix_key(&stem(&word)), prefix_key(&word), "{word}");
    }
}

/// handle | agent description | capability name | capability description | tags
const AGENTS: &str = "
    polyglot | Translation agent | translate/fr-en | Translates French text into English | translation french
    pixel | Image generator | image/generate | Generates long-exposure style images from a prompt | image
    brief | Reading assistant | summarize | Condenses long documents into short summaries | text nlp
    lint-lord | Code reviewer | code/review/rust | Reviews Rust code and suggests short fixes | code rust
    document-storage | Stores files | storage/files | Stores files | storage
    hispano | Translation agent | translate/es-en | Translates Spanish text into English | translation spanish";

type Agent = (&'static str, &'static str, Vec<Capability>);

fn agents() -> Vec<Agent> {
    let parse = |line: &'static str| {
        let f: Vec<&'static str> = line.split('|').map(str::trim).collect();
        let tags: Vec<&str> = f[4].split_whitespace().collect();
        (f[0], f[1], vec![cap(f[2], f[3], &tags, None)])
    };
    AGENTS
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(parse)
        .collect()
}

fn doc((handle, description, capabilities): &Agent) -> Document<'_> {
    Document {
        handle,
        description,
        capabilities,
    }
}

fn docs(agents: &[Agent]) -> Vec<Document<'_>> {
    agents.iter().map(doc).collect()
}

fn order(ranked: &[(usize, f64)]) -> Vec<usize> {
    ranked.iter().map(|r| r.0).collect()
}

#[test]
fn summarizer_wins_shorten_a_long_document() {
    let agents = agents();
    let ranked = order(&rank("shorten a long document", &docs(&agents)));
    assert_eq!(ranked.first(), Some(&2), "{ranked:?}");
    // The storage agent matches only through "document" in its handle.
    assert!(ranked.contains(&4), "{ranked:?}");
    assert!(
        !ranked.contains(&0) && !ranked.contains(&5),
        "translators share no terms: {ranked:?}"
    );
}

#[test]
fn translator_wins_translate_french_to_english() {
    let agents = agents();
    let ranked = rank("translate french to english", &docs(&agents));
    assert_eq!(order(&ranked), vec![0, 5], "{ranked:?}");
    assert!(ranked[0].1 > ranked[1].1);
}

#[test]
fn capability_names_outweigh_descriptions() {
    let named = vec![cap("summarize", "", &[], None)];
    let described = vec![cap("text", "summarize, summarize", &[], None)];
    let docs = [
        Document {
            handle: "a",
            description: "",
            capabilities: &described,
        },
        Document {
            handle: "b",
            description: "",
            capabilities: &named,
        },
    ];
    assert_eq!(order(&rank("summarize", &docs)), vec![1, 0]);
}

#[test]
fn empty_inputs_rank_nothing() {
    let agents = agents();
    assert!(rank("the and of to a", &docs(&agents)).is_empty());
    assert!(rank("", &docs(&agents)).is_empty());
    assert!(rank("zebra", &docs(&agents)).is_empty());
    assert!(rank("summarize", &[]).is_empty());
}

#[test]
fn ties_are_broken_by_index_and_ranking_is_deterministic() {
    let caps = vec![cap("summarize", "Summaries", &[], None)];
    let doc = Document {
        handle: "twin",
        description: "",
        capabilities: &caps,
    };
    assert_eq!(order(&rank("summary", &[doc, doc, doc])), vec![0, 1, 2]);
    let agents = agents();
    let query = "short rust document translation";
    assert_eq!(rank(query, &docs(&agents)), rank(query, &docs(&agents)));
}

/// Random strings over letters, digits, separators and multi-byte
/// characters, from a fixed-seed generator.
fn random_strings(count: usize) -> Vec<String> {
    let palette: Vec<char> = "aeiouysdgnrtlzAEIYSZ019 -/_.*ßİﬁÅ日🦀\u{301}\u{200b}\u{212a}"
        .chars()
        .collect();
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move |bound: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        usize::try_from(state % bound as u64).unwrap_or(0)
    };
    (0..count)
        .map(|_| {
            (0..next(24))
                .map(|_| palette[next(palette.len())])
                .collect()
        })
        .collect()
}

#[test]
fn random_inputs_do_not_panic() {
    let words = random_strings(3000);
    let caps: Vec<Capability> = words
        .chunks(3)
        .map(|w| cap(&w[0], &w[1], &[w[2].as_str()], Some(&w[1])))
        .collect();
    let docs: Vec<Document<'_>> = caps
        .chunks(2)
        .zip(&words)
        .map(|(capabilities, text)| Document {
            handle: text,
            description: text,
            capabilities,
        })
        .collect();
    for word in &words {
        let _ = (
            stem(word),
            NamePattern::parse(word),
            parse_version_req(word),
        );
    }
    for tag in words.iter().take(100) {
        let _ = with_tags(&[tag]).matching(&caps);
    }
    for query in words.iter().take(40) {
        let ranked = rank(query, &docs);
        assert!(
            ranked
                .iter()
                .all(|&(i, score)| i < docs.len() && score.is_finite() && score > 0.0)
        );
        assert!(ranked.windows(2).all(|w| w[0].1 >= w[1].1));
    }
}

#[test]
fn hostile_inputs_do_not_panic() {
    let huge = "x".repeat(200_000) + " ünïcödé İstanbul ß ﬁ 日本語 🦀 \u{0} \u{200b}";
    let caps = vec![cap(&huge, &huge, &[huge.as_str(), ""], Some(&huge))];
    let doc = Document {
        handle: &huge,
        description: "🦀🦀",
        capabilities: &caps,
    };
    assert!(!rank(&huge, &[doc]).is_empty());
    assert_eq!(order(&rank("İSTANBUL", &[doc])), vec![0]);
    assert!(rank("🦀 ∑ \u{0}", &[doc]).is_empty());
    assert!(NamePattern::parse(&huge).is_err());
    assert!(parse_version_req(&huge).is_err());
    assert!(
        !Filter {
            version: Some(VersionReq::STAR),
            ..Filter::default()
        }
        .matches(&caps)
    );
    assert!(with_tags(&["İSTANBUL"]).matching(&caps).is_empty());
}
