//! Benchmarks run by `agentmesh bench ...` (use a release build). Each one
//! starts real nodes in this process and prints the figures it measured.
//!
//! # Layout
//! - `discovery`: ad convergence across a mesh, and late-joiner catch-up.
//! - `delivery`: durable node→node throughput, latency, outbox replay.
//! - `limits`: the machine's physical limits (disk fsync, ed25519, loopback
//!   TCP) to read the other figures against.
//! - `footprint`: memory and disk of one node in its own process, idle and
//!   with many messages queued.
//! - `support`: machine facts, timing summaries, polling with deadlines,
//!   scratch directories.

use clap::{Args as ClapArgs, Subcommand};

pub mod delivery;
pub mod discovery;
pub mod footprint;
pub mod limits;
pub(crate) mod support;

/// Errors of a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A node failed to start.
    #[error("node failed to start: {0}")]
    Start(#[from] crate::node::StartError),
    /// The benchmark did not reach its goal in time.
    #[error("benchmark timed out: {0}")]
    Timeout(String),
    /// Anything else that stopped the run.
    #[error("{0}")]
    Failed(String),
}

/// `agentmesh bench` arguments.
#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Which benchmark.
    #[command(subcommand)]
    pub which: Which,
}

/// The benchmarks.
#[derive(Subcommand, Debug)]
pub enum Which {
    /// How fast an agent ad reaches every node, and how fast a late
    /// joiner catches up with the whole registry.
    Discovery(discovery::Opts),
    /// Durable node→node delivery: throughput, latency at fixed rates,
    /// and outbox replay after a restart.
    Delivery(delivery::Opts),
    /// Memory and disk of a node in its own process: idle, and with many
    /// messages queued for an agent whose node is down.
    Footprint(footprint::Opts),
    /// The machine's physical limits: disk fsync rate, ed25519 sign and
    /// verify rate on one core, loopback TCP bandwidth and round trips.
    Limits(limits::Opts),
}

/// Run the chosen benchmark.
pub async fn run(args: Args) -> Result<(), Error> {
    match args.which {
        Which::Discovery(opts) => discovery::run(opts).await,
        Which::Delivery(opts) => delivery::run(opts).await,
        Which::Footprint(opts) => footprint::run(opts).await,
        Which::Limits(opts) => limits::run(opts).await,
    }
}
