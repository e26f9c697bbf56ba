//! Simulations: many real nodes in one process with churn, crashes,
//! partitions and slow links, driven by a scenario file.
//!
//! `agentmesh simulate simulations/SCENARIO.toml [--seed N] [--out DIR]`
//! starts the scenario's nodes (the same node code as `agentmesh node`, on
//! the memory transport or loopback TCP), registers agents, lets the mesh
//! form, then runs a timeline: traffic through the library API
//! (`delivery().send`, consumers that `poll` and `ack_many`) and fault
//! events. After the timeline every fault is undone (partitions healed,
//! links made fast, crashed nodes restarted) and the run waits, bounded,
//! until every message that had to arrive did. Every message is tracked by
//! id; the summary (`summary.json`) and SVG plots go to the output
//! directory. The format of scenario files is in `simulations/README.md`.
//!
//! # Layout
//! - `scenario`, `events`: the TOML format and its validation.
//! - `schedule`: the seeded plan of faults on node indices (pure).
//! - `world`: the cluster and how each fault is applied.
//! - `live`: the shared view of running nodes and agents.
//! - `traffic`, `consumers`: the load, and the agents taking it.
//! - `ledger`, `metrics`: every message by id; outcome classification,
//!   percentiles, series (pure).
//! - `watch`: ad convergence probes and joiners catching up.
//! - `runner`, `collect`, `report`, `plots`: phases, figures, summary, SVGs.

use std::path::PathBuf;

use clap::Args as ClapArgs;

mod collect;
mod consumers;
pub mod events;
pub mod ledger;
mod live;
pub mod metrics;
mod plots;
pub mod report;
mod runner;
pub mod scenario;
pub mod schedule;
mod traffic;
mod watch;
mod world;

pub use report::Summary;
pub use scenario::{Scenario, ScenarioError};

/// Errors of a simulation run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The scenario file is unreadable or invalid.
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    /// A node failed to start (or restart).
    #[error("node {node} failed to start: {source}")]
    Start {
        /// Its index.
        node: usize,
        /// Why.
        source: crate::node::StartError,
    },
    /// A file or directory could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A plot could not be drawn.
    #[error("plot {path}: {message}")]
    Plot {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The run completed but a must-hold check failed (see the summary).
    #[error("the simulation failed its checks: {0}")]
    Checks(String),
    /// The scenario cannot run.
    #[error("{0}")]
    Failed(String),
}

/// `agentmesh simulate` arguments.
#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Scenario file (TOML).
    pub scenario: PathBuf,
    /// Seed of the schedule (same seed, same schedule).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Output directory for the summary and plots.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// How to run a scenario.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Overrides the scenario's seed.
    pub seed: Option<u64>,
    /// Where `summary.json` and the plots go.
    pub out: PathBuf,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

/// Run a scenario: write `summary.json` and the plots into `opts.out` and
/// return the summary (whether or not its checks passed).
pub async fn run_scenario(scenario: Scenario, opts: &RunOptions) -> Result<Summary, Error> {
    runner::run(scenario, opts).await
}

/// Run a scenario file, print the summary and where the plots are; fail
/// when a must-hold check failed.
pub async fn run(args: Args) -> Result<(), Error> {
    let scenario = Scenario::load(&args.scenario)?;
    let out = args
        .out
        .unwrap_or_else(|| PathBuf::from("simulations/results").join(&scenario.name));
    let opts = RunOptions {
        seed: args.seed,
        out: out.clone(),
        progress: true,
    };
    eprintln!(
        "simulating {} ({} nodes, timeline {:?}); results go to {}",
        scenario.name,
        scenario.mesh.nodes,
        scenario.duration,
        out.display()
    );
    let summary = run_scenario(scenario, &opts).await?;
    for line in summary.lines() {
        println!("{line}");
    }
    println!("summary: {}", out.join("summary.json").display());
    for p in &summary.plots {
        println!("plot: {}", p.display());
    }
    if summary.passed {
        Ok(())
    } else {
        Err(Error::Checks(summary.problems.join("; ")))
    }
}
