//! Regression guard: the small simulation (`simulations/ci-small.toml`: 30
//! real nodes on the memory transport, one minute of traffic with a crash
//! and a partition) must deliver every message that had to arrive, once.

use std::path::Path;
use std::time::Duration;

use agentmesh::sim::{RunOptions, Scenario};

/// Upper bound of the whole run (warm-up at most 240 s, timeline 60 s plus
/// the time faults take to apply, drain at most 180 s, then settle and stop):
/// a hang fails the test instead of stalling CI. The phases end as soon as
/// their condition holds; in a debug build on a busy 2-core machine the run
/// took 340 s (warm-up 137 s, drain 89 s).
const DEADLINE: Duration = Duration::from_secs(660);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ci_small_delivers_everything_once() {
    // The runner logs each phase (`RUST_LOG` overrides).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error,agentmesh::sim=info".into()),
        )
        .with_test_writer()
        .try_init();
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("simulations/ci-small.toml");
    let scenario = Scenario::load(&file).expect("simulations/ci-small.toml is a valid scenario");
    let out = tempfile::tempdir().expect("a temporary directory");
    let opts = RunOptions {
        seed: None,
        out: out.path().to_path_buf(),
        progress: false,
    };
    let summary = tokio::time::timeout(DEADLINE, agentmesh::sim::run_scenario(scenario, &opts))
        .await
        .unwrap_or_else(|_| panic!("ci-small did not finish within {DEADLINE:?}"))
        .expect("ci-small ran");
    let report = summary.lines().join("\n");
    eprintln!("{report}");

    let m = &summary.messages;
    assert!(m.accepted > 0, "no message was sent:\n{report}");
    assert_eq!(
        m.missing, 0,
        "messages never reached their consumer: {:?}\n{report}",
        m.missing_ids
    );
    assert!(
        (m.delivery_ratio - 1.0).abs() < f64::EPSILON,
        "delivery ratio {} is not 100%:\n{report}",
        m.delivery_ratio
    );
    assert_eq!(
        summary.integrity.duplicates, 0,
        "messages handed over again after their ack: {:?}\n{report}",
        summary.integrity.duplicate_ids
    );
    assert_eq!(summary.integrity.misrouted, 0, "{report}");
    assert_eq!(m.unknown_received, 0, "{report}");
    assert!(summary.passed, "{report}");
    for p in &summary.plots {
        assert!(p.is_file(), "plot {} was not written", p.display());
    }
    assert!(out.path().join("summary.json").is_file());
}
