//! Simulations: many real nodes in one process with churn, crashes,
//! partitions and slow links, driven by a scenario file.

use clap::Args as ClapArgs;
use std::path::PathBuf;

/// Errors of a simulation run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
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

/// Run a scenario.
pub async fn run(args: Args) -> Result<(), Error> {
    Err(Error::Failed(format!(
        "the simulator is being built; cannot run {}",
        args.scenario.display()
    )))
}
