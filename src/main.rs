//! The `agentmesh` command line: parses arguments, builds the config, and
//! calls the library. Nothing here is needed by the library itself.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

mod cli;
use std::process::ExitCode;

use agentmesh::config::{self, FileConfig, NodeConfig};
use agentmesh::{Node, identity};
use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use libp2p::Multiaddr;

/// mimalloc instead of glibc malloc: the message path allocates and frees
/// many short-lived buffers across threads, and glibc's arena bookkeeping
/// (`malloc_consolidate`, `unlink_chunk`) was a tenth of all CPU in the
/// delivery benchmark's profile.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc 3's `mi_option_e` (libmimalloc-sys
/// names no constant for it; a test checks the index).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// `mi_option_allow_thp` in the same enum.
const MI_OPTION_ALLOW_THP: libmimalloc_sys::mi_option_t = 43;

/// `1` keeps transparent huge pages, `0` turns them off (see [`keep_huge_pages`]).
const HUGE_PAGES_ENV: &str = "AGENTMESH_HUGE_PAGES";

/// Two allocator settings, made in `main` before any other thread exists
/// (mimalloc's option setters are not thread-safe).
///
/// Purge delay: mimalloc gives freed memory back to the OS one second
/// after it is freed. A busy node frees a whole memtable at every
/// checkpoint (every second or two) and fills the next one at once, so the
/// memory went back and came again as page faults, each a page the kernel
/// must clear: ten times the page faults in the delivery benchmark (7,817
/// against 772 in one run). Ten seconds keeps what a steady load reuses
/// and still returns a burst's.
///
/// No transparent huge pages: mimalloc asks for them on its arenas
/// (`MADV_HUGEPAGE`), so the first touch of any 64 KiB allocator page
/// faulted in and cleared a whole 2 MiB page. Clearing huge pages was an
/// eighth of the delivery benchmark's CPU time; an idle node held 35 MiB
/// instead of 19 MiB (`bench footprint`), and a 2,000-message delivery
/// benchmark peaked at 105 MB instead of 52 MB. The process-wide switch
/// (`prctl`) also covers the arena mimalloc reserved before `main`, which
/// the option alone would not.
///
/// A simulation keeps them (see [`keep_huge_pages`]).
fn tune_allocator(keep_huge: bool) {
    // SAFETY: a plain option store; no other thread runs yet.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 10_000) }
    if keep_huge {
        return;
    }
    // SAFETY: as above.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ALLOW_THP, 0) }
    if let Err(e) = disable_huge_pages() {
        // Only slower and larger, not wrong: say so and go on.
        eprintln!("agentmesh: warning: cannot turn off transparent huge pages: {e}");
    }
}

/// Whether to keep transparent huge pages: `AGENTMESH_HUGE_PAGES` (`1`
/// or `0`) decides; unset, only a simulation keeps them. Hundreds of nodes
/// in one process hold gigabytes, and there huge pages' fewer TLB misses
/// are worth their memory: `churn-300` (390 nodes) ran at message latency
/// p50 2.7-3.0 s and peaked at 9.2-9.5 GB with them, at p50 5.8-5.9 s and
/// 6.1-6.9 GB without (BENCHMARKS.md, stop 17). Another value is an
/// error, named in the message.
fn keep_huge_pages(setting: Option<&str>, simulation: bool) -> Result<bool, String> {
    match setting {
        None => Ok(simulation),
        Some("1") => Ok(true),
        Some("0") => Ok(false),
        Some(other) => Err(format!(
            "{HUGE_PAGES_ENV} must be 1 (keep transparent huge pages) or 0 (turn them off), not {other:?}"
        )),
    }
}

/// Turn off transparent huge pages for this process (and its children).
#[cfg(target_os = "linux")]
fn disable_huge_pages() -> std::io::Result<()> {
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments and touches no memory of ours.
    let r = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn disable_huge_pages() -> std::io::Result<()> {
    Ok(())
}

#[derive(Parser, Debug)]
#[command(
    name = "agentmesh",
    version,
    about = "A peer-to-peer mesh for AI agents: discovery, routing and durable delivery with no central broker"
)]
struct Cli {
    /// Log output format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Threads of the async runtime (default: one per core less one, left
    /// to the storage threads, and at least one; `simulate`: one per core).
    #[arg(long, global = true, env = "AGENTMESH_WORKER_THREADS", value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    worker_threads: Option<u16>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a sidecar node in the foreground (works with no flags at all).
    Node(NodeArgs),
    /// Create the node key and a commented config file in the data dir.
    Init {
        /// Data directory (default: $AGENTMESH_DATA or ~/.agentmesh).
        #[arg(long, env = "AGENTMESH_DATA")]
        data_dir: Option<PathBuf>,
        /// Mesh name written into the config.
        #[arg(long, default_value = config::DEFAULT_MESH)]
        mesh: String,
        /// Overwrite an existing config file.
        #[arg(long)]
        force: bool,
    },
    /// Show the running node's identity and status.
    Info(cli::ClientArgs),
    /// List the peers the running node knows.
    Peers(cli::ClientArgs),
    /// Find agents mesh-wide by capability, tag, handle or free text.
    Agents(cli::AgentsArgs),
    /// Register an agent on the running node.
    Register(cli::RegisterArgs),
    /// Send a message from a local agent.
    Send(cli::SendArgs),
    /// Show a sent message's status and history.
    Status(cli::StatusArgs),
    /// Receive messages for a local agent (and optionally acknowledge them).
    Inbox(cli::InboxArgs),
    /// Run a benchmark (release builds) and print its figures.
    Bench(agentmesh::bench::Args),
    /// Run a simulation scenario (many nodes in this process, with faults).
    Simulate(agentmesh::sim::Args),
}

#[derive(Args, Debug)]
struct NodeArgs {
    /// TOML config file (default: <data_dir>/config.toml when it exists).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory (default: $AGENTMESH_DATA or ~/.agentmesh).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// libp2p listen address; repeatable (default: TCP and QUIC on port 7710).
    #[arg(long = "listen", value_name = "MULTIADDR", value_parser = parse_multiaddr)]
    listen: Vec<Multiaddr>,
    /// Bootstrap peer; repeatable.
    #[arg(long = "bootstrap", value_name = "MULTIADDR", value_parser = parse_multiaddr)]
    bootstrap: Vec<Multiaddr>,
    /// Local API address (default: 127.0.0.1:7700).
    #[arg(long, value_name = "ADDR")]
    api: Option<SocketAddr>,
    /// Mesh name (default: "default").
    #[arg(long)]
    mesh: Option<String>,
    /// Turn off mDNS discovery on the LAN.
    #[arg(long)]
    no_mdns: bool,
}

fn parse_multiaddr(s: &str) -> Result<Multiaddr, String> {
    s.parse::<Multiaddr>().map_err(|e| {
        format!("{s:?} is not a multiaddr ({e}); expected e.g. /ip4/127.0.0.1/tcp/7710")
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Still before any other thread exists.
    // A value that is not UTF-8 is refused like any other wrong one.
    let setting = std::env::var_os(HUGE_PAGES_ENV).map(|v| v.to_string_lossy().into_owned());
    match keep_huge_pages(
        setting.as_deref(),
        matches!(cli.command, Command::Simulate(_)),
    ) {
        Ok(keep) => tune_allocator(keep),
        Err(e) => {
            eprintln!("agentmesh: error: {e}");
            return ExitCode::from(2);
        }
    }
    // Benchmarks and simulations run many nodes: only warnings by default.
    // A simulation kills and partitions nodes on purpose, so the dial
    // failures and broken connections that follow are expected: those
    // only at error level.
    let default = match cli.command {
        Command::Simulate(_) => {
            "warn,agentmesh::net=error,libp2p_kad=error,libp2p_gossipsub=error,yamux=error"
        }
        Command::Bench(_) => "warn,libp2p_kad=error,libp2p_gossipsub=error",
        _ => "info,libp2p_swarm=warn,libp2p_mdns=warn,libp2p_kad=error",
    };
    init_logging(cli.log_format, default);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads(&cli))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<config::Error>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Async worker threads: `--worker-threads`, else one per core less
/// one. Each node's storage threads (writer, flusher, syncer) do about 45%
/// of its work per message; with one core left to them, and no worker
/// waking or stealing from another, `bench delivery` on 2 cores took
/// 12–18% less CPU per message with one worker than with two, and moved
/// 4–8% more messages (BENCHMARKS.md, stop 21; stops 16 to 19 had seen the
/// CPU saving without the throughput). A simulation runs hundreds of nodes
/// in one process, whose async work dominates: one worker per core.
fn worker_threads(cli: &Cli) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cli.worker_threads
        .map_or_else(|| default_workers(&cli.command, cores), usize::from)
}

/// [`worker_threads`] when `--worker-threads` is not given.
fn default_workers(command: &Command, cores: usize) -> usize {
    match command {
        Command::Simulate(_) => cores,
        _ => cores.saturating_sub(1).max(1),
    }
}

fn init_logging(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Node(args) => run_node(args).await,
        Command::Init {
            data_dir,
            mesh,
            force,
        } => init(data_dir, &mesh, force),
        Command::Info(c) => cli::info(&c).await,
        Command::Peers(c) => cli::peers(&c).await,
        Command::Agents(a) => cli::agents(&a).await,
        Command::Register(r) => cli::register(&r).await,
        Command::Send(a) => cli::send(&a).await,
        Command::Status(a) => cli::status(&a).await,
        Command::Inbox(a) => cli::inbox(&a).await,
        Command::Bench(b) => Ok(agentmesh::bench::run(b).await?),
        Command::Simulate(s) => Ok(agentmesh::sim::run(s).await?),
    }
}

/// Defaults, then the config file, then flags.
fn build_config(args: &NodeArgs) -> Result<NodeConfig> {
    let flag_dir = args.data_dir.clone();
    let mut dir = match &flag_dir {
        Some(d) => d.clone(),
        None => config::default_data_dir()?,
    };
    let file_path = match &args.config {
        Some(p) => Some(p.clone()),
        None => Some(dir.join(config::CONFIG_FILE_NAME)).filter(|p| p.exists()),
    };
    let file = match &file_path {
        Some(p) => Some(FileConfig::load(p)?),
        None => None,
    };
    if flag_dir.is_none()
        && let Some(d) = file.as_ref().and_then(|f| f.data_dir.clone())
    {
        dir = d;
    }
    let mut cfg = NodeConfig::with_data_dir(&dir);
    if let Some(f) = file {
        cfg.apply_file(f)?;
    }
    cfg.data_dir = dir;
    if !args.listen.is_empty() {
        cfg.network.listen = args.listen.clone();
        cfg.network.listen_is_default = false;
    }
    cfg.network.bootstrap.extend(args.bootstrap.iter().cloned());
    if let Some(a) = args.api {
        cfg.api.listen = a;
        cfg.api.listen_is_default = false;
    }
    if let Some(m) = &args.mesh {
        cfg.mesh = m.clone();
    }
    if args.no_mdns {
        cfg.network.mdns = false;
    }
    cfg.validate()?;
    Ok(cfg)
}

async fn run_node(args: NodeArgs) -> Result<()> {
    let cfg = build_config(&args)?;
    let data_dir = cfg.data_dir.clone();
    let node = Node::start(cfg)
        .await
        .with_context(|| format!("cannot start the node (data dir {})", data_dir.display()))?;
    let h = node.handle();
    eprintln!(
        "agentmesh node {} (mesh {:?})\n  p2p: {}\n  api: http://{} (token in {})",
        h.node_id(),
        h.config().mesh,
        h.listen_addrs()
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(" "),
        h.api_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "disabled".into()),
        data_dir.join(agentmesh::node::TOKEN_FILE).display()
    );
    let store = h.store().clone();
    drop(h);
    // A failed log write or fsync leaves the store refusing every write
    // until a restart replays the log: stop, so a supervisor restarts us.
    let failure = tokio::select! {
        () = wait_for_signal() => None,
        e = store.failed() => Some(e),
    };
    drop(store);
    match &failure {
        None => tracing::info!("shutting down"),
        Some(e) => tracing::error!(error = %e, "storage failure: stopping the node"),
    }
    node.shutdown().await;
    match failure {
        None => Ok(()),
        Some(e) => Err(anyhow::anyhow!(
            "the node stopped after a storage failure ({e}); start it again: it replays its write-ahead log"
        )),
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn init(data_dir: Option<PathBuf>, mesh: &str, force: bool) -> Result<()> {
    config::validate_mesh_name(mesh)?;
    let dir = cli::data_dir_or_default(data_dir)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let key = identity::NodeKey::load_or_create(&dir)?;
    let cfg_path = dir.join(config::CONFIG_FILE_NAME);
    write_config(&cfg_path, mesh, force)?;
    println!("node id:     {}", key.peer_id());
    println!(
        "node key:    {}",
        dir.join(identity::NODE_KEY_FILE).display()
    );
    println!("config file: {}", cfg_path.display());
    println!("start with:  agentmesh node --data-dir {}", dir.display());
    Ok(())
}

fn write_config(path: &Path, mesh: &str, force: bool) -> Result<()> {
    if path.exists() && !force {
        bail!(
            "{} already exists (use --force to overwrite)",
            path.display()
        );
    }
    std::fs::write(path, config::commented_template(mesh))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_core_is_left_to_the_storage_threads_except_in_simulations() {
        let cmd = |args: &[&str]| {
            Cli::try_parse_from([&["agentmesh"], args].concat())
                .unwrap()
                .command
        };
        let node = cmd(&["node"]);
        let bench = cmd(&["bench", "delivery"]);
        let sim = cmd(&["simulate", "simulations/steady-100.toml"]);
        for (cores, workers) in [(1, 1), (2, 1), (4, 3), (16, 15)] {
            assert_eq!(default_workers(&node, cores), workers, "{cores} cores");
            assert_eq!(default_workers(&bench, cores), workers, "{cores} cores");
            assert_eq!(default_workers(&sim, cores), cores, "{cores} cores");
        }
        // The flag wins, whatever the command.
        let cli = Cli::try_parse_from(["agentmesh", "--worker-threads", "3", "node"]).unwrap();
        assert_eq!(worker_threads(&cli), 3);
    }

    #[test]
    fn the_purge_delay_option_is_the_one_tuned() {
        // mimalloc's documented default for the purge delay is 1000 ms; a
        // different value at this index would mean the enum moved.
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            let got = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
            assert_eq!(got, 1000);
        }
    }

    #[test]
    fn the_huge_page_option_is_the_one_tuned() {
        // mimalloc's default for allow_thp is 1 on Linux.
        if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
            let got = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_ALLOW_THP) };
            assert_eq!(got, 1);
        }
    }

    #[test]
    fn only_a_simulation_keeps_huge_pages_unless_the_environment_says() {
        assert_eq!(keep_huge_pages(None, false), Ok(false));
        assert_eq!(keep_huge_pages(None, true), Ok(true));
        assert_eq!(keep_huge_pages(Some("1"), false), Ok(true));
        assert_eq!(keep_huge_pages(Some("0"), true), Ok(false));
        let e = keep_huge_pages(Some("yes"), false).unwrap_err();
        assert!(
            e.contains("AGENTMESH_HUGE_PAGES") && e.contains("\"yes\""),
            "{e}"
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn huge_pages_are_turned_off_for_the_process() {
        disable_huge_pages().expect("prctl(PR_SET_THP_DISABLE)");
        let now = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        assert_eq!(now, 1);
    }
}
