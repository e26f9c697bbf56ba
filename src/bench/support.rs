//! What every benchmark needs: machine facts, summaries of timings,
//! polling with a deadline, and a scratch directory removed afterwards.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::Error;

/// Print the facts a figure depends on: cores, async worker threads and
/// build profile. A debug
/// build is announced loudly: its figures mean nothing.
pub(crate) fn print_machine() {
    let cores = std::thread::available_parallelism()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "unknown".into());
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let workers = tokio::runtime::Handle::try_current()
        .map(|h| h.metrics().num_workers().to_string())
        .unwrap_or_else(|_| "no".into());
    println!(
        "machine: {cores} cores available; {workers} async worker threads; build profile: {profile}"
    );
    if cfg!(debug_assertions) {
        println!();
        println!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
        println!("!! WARNING: this is a DEBUG build. These figures are not benchmarks.   !!");
        println!("!! Run `cargo run --release -- bench ...` for numbers worth keeping.  !!");
        println!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
        println!();
    }
}

/// Milliseconds with one decimal.
pub(crate) fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// Order statistics of a set of timings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Summary {
    /// Fastest.
    pub min: Duration,
    /// Middle value (mean of the two middle ones for an even count).
    pub median: Duration,
    /// Nearest-rank 90th percentile (the maximum for fewer than 10 values).
    pub p90: Duration,
    /// Slowest.
    pub max: Duration,
}

impl Summary {
    /// Summarise `samples`; `None` when there are none.
    pub fn of(samples: &[Duration]) -> Option<Summary> {
        let mut s = samples.to_vec();
        s.sort();
        let n = s.len();
        let (first, last) = (*s.first()?, *s.last()?);
        let median = if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2
        };
        // Nearest rank: the smallest value with at least 90% of samples at or below it.
        let rank = (n * 9).div_ceil(10).max(1);
        Some(Summary {
            min: first,
            median,
            p90: s[rank - 1],
            max: last,
        })
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "min {} / median {} / p90 {} / max {} ms",
            ms(self.min),
            ms(self.median),
            ms(self.p90),
            ms(self.max)
        )
    }
}

/// Call `check` every `every` until it returns `Some`, or fail with
/// [`Error::Timeout`] after `timeout`; `what` names the goal, and
/// `progress` says how far it got.
pub(crate) async fn poll_until<T, F, Fut>(
    what: &str,
    every: Duration,
    timeout: Duration,
    mut check: F,
    progress: impl Fn() -> String,
) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout(format!(
                "{what} did not happen within {timeout:?} ({})",
                progress()
            )));
        }
        tokio::time::sleep(every).await;
    }
}

/// A fresh directory under the system temp dir, removed when dropped.
#[derive(Debug)]
pub(crate) struct ScratchDir(PathBuf);

impl ScratchDir {
    /// Create `$TMPDIR/agentmesh-bench-<name>-<pid>-<nanos>`.
    pub fn new(name: &str) -> Result<ScratchDir, Error> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "agentmesh-bench-{name}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path).map_err(|e| {
            Error::Failed(format!("cannot create scratch dir {}: {e}", path.display()))
        })?;
        Ok(ScratchDir(path))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(ms: &[u64]) -> Vec<Duration> {
        ms.iter().map(|m| Duration::from_millis(*m)).collect()
    }

    #[test]
    fn summary_order_statistics() {
        assert_eq!(Summary::of(&[]), None);
        let s = Summary::of(&d(&[7, 1, 5, 3, 9, 2, 4])).unwrap();
        assert_eq!(
            (s.min, s.median, s.p90, s.max),
            (
                Duration::from_millis(1),
                Duration::from_millis(4),
                Duration::from_millis(9),
                Duration::from_millis(9)
            )
        );
        let s = Summary::of(&d(&[10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120])).unwrap();
        assert_eq!(s.median, Duration::from_millis(65));
        assert_eq!(
            s.p90,
            Duration::from_millis(110),
            "rank ceil(0.9 * 12) = 11"
        );
        let s = Summary::of(&d(&[5])).unwrap();
        assert_eq!(
            (s.min, s.median, s.p90, s.max),
            (s.min, s.min, s.min, s.min)
        );
    }

    #[tokio::test]
    async fn poll_until_times_out_with_progress() {
        let e = poll_until(
            "the impossible",
            Duration::from_millis(1),
            Duration::from_millis(20),
            || async { None::<()> },
            || "0 of 1".into(),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("the impossible") && e.contains("0 of 1"), "{e}");
    }
}
