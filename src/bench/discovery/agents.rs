//! The agents the discovery benchmark registers: realistic sizes, with
//! capabilities, tags, versions and metadata like real ones.

use super::super::Error;
use crate::discovery::Registration;
use crate::wire::Capability;

pub(super) fn registration(e: crate::discovery::Error) -> Error {
    Error::Failed(format!("registering an agent failed: {e}"))
}

/// A registration of realistic size: a description, three capabilities
/// with descriptions, tags and versions, and a little metadata.
pub(super) fn agent(handle: &str, i: usize) -> Registration {
    Registration {
        handle: handle.to_string(),
        description: format!(
            "Benchmark agent {i}: answers requests in its specialities, keeps a short \
             memory of recent conversations and reports progress while it works."
        ),
        capabilities: capabilities(i),
        metadata_json: format!(r#"{{"owner":"bench","index":{i},"region":"local"}}"#),
    }
}

/// Capabilities of agent `i`: three of a fixed catalogue, varied by `i`.
pub(super) fn capabilities(i: usize) -> Vec<Capability> {
    const CATALOGUE: [(&str, &str, &[&str]); 8] = [
        (
            "summarize",
            "condenses long documents into short, faithful summaries",
            &["text", "en"],
        ),
        (
            "translate/fr-en",
            "translates French text into fluent English",
            &["text", "fr", "en"],
        ),
        (
            "translate/de-en",
            "translates German text into fluent English",
            &["text", "de", "en"],
        ),
        (
            "code/review/rust",
            "reviews Rust pull requests for bugs, style and safety",
            &["code", "rust"],
        ),
        (
            "code/generate/python",
            "writes Python functions from a specification",
            &["code", "python"],
        ),
        (
            "search/web",
            "searches the web and returns cited findings",
            &["web", "research"],
        ),
        (
            "data/sql",
            "answers questions by writing and running SQL queries",
            &["data", "sql"],
        ),
        (
            "image/describe",
            "describes the content of images in plain words",
            &["vision", "en"],
        ),
    ];
    (0..3)
        .map(|c| {
            let (name, description, tags) = CATALOGUE[(i + c * 3) % CATALOGUE.len()];
            Capability {
                name: name.to_string(),
                description: description.to_string(),
                tags: tags.iter().map(|t| t.to_string()).collect(),
                version: Some(format!("1.{}.0", i % 5)),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::ad;

    #[test]
    fn bench_agents_are_valid_and_distinct() {
        for i in 0..16 {
            let r = agent(&format!("bulk-{i:05}"), i);
            ad::validate_handle(&r.handle).unwrap();
            ad::validate_agent_fields(&r.description, &r.capabilities, &r.metadata_json).unwrap();
            let mut names: Vec<&str> = r.capabilities.iter().map(|c| c.name.as_str()).collect();
            names.sort();
            names.dedup();
            assert_eq!(names.len(), 3, "three different capabilities: {names:?}");
        }
    }
}
