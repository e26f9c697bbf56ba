//! Fixtures the delivery tests share: a real node on a data dir, local
//! agents on it, a database written before the node starts, row counts.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use redb::{Key, TableDefinition, Value};

use crate::identity::AgentId;
use crate::store::{Store, Tx};
use crate::{Node, NodeConfig, NodeHandle};

/// A node on loopback with its data in `dir` and its HTTP API off.
pub(crate) async fn start_node(dir: &Path) -> Node {
    let mut cfg = NodeConfig::local_test(dir);
    cfg.api.enabled = false;
    Node::start(cfg).await.unwrap()
}

/// Register a local agent per handle, in order; their ids.
pub(crate) async fn register<const N: usize>(h: &NodeHandle, handles: [&str; N]) -> [AgentId; N] {
    let mut ids = Vec::with_capacity(N);
    for handle in handles {
        let reg = crate::discovery::Registration {
            handle: handle.into(),
            ..Default::default()
        };
        ids.push(h.discovery().register(reg).await.unwrap().agent_id);
    }
    ids.try_into().expect("one id per handle")
}

/// Write into the database in `dir` before any node opens it (a
/// database an older build left, say), then close it.
pub(crate) async fn write_before_start(
    dir: &Path,
    f: impl FnOnce(&Tx<'_>) -> Result<(), crate::store::Error> + Send + 'static,
) {
    let (store, w) = Store::open(dir).unwrap();
    store.write(f).await.unwrap();
    drop(store);
    w.join();
}

/// Rows in a table of `h`'s database now.
pub(crate) fn rows<K, V>(h: &NodeHandle, table: TableDefinition<'static, K, V>) -> u64
where
    K: Key + Send + Sync + 'static,
    V: Value + Send + Sync + 'static,
{
    h.store()
        .read()
        .unwrap()
        .open_table(table)
        .unwrap()
        .len()
        .unwrap()
}

/// `check` every 20 ms until it gives `Some` (its value), failing the test
/// after `secs` with `what` and `progress` (the bench's `poll_until`).
pub(crate) async fn wait_until<T, Fut: Future<Output = Option<T>>>(
    what: &str,
    secs: u64,
    check: impl FnMut() -> Fut,
    progress: impl Fn() -> String,
) -> T {
    crate::bench::support::poll_until(
        what,
        Duration::from_millis(20),
        Duration::from_secs(secs),
        check,
        progress,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}
