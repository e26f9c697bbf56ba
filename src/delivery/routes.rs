//! Routes: the part of a sent message's summary that every message from
//! one agent to another shares (both agents' ids and handles, and the
//! recipient's node), stored once per route in `OUT_ROUTES` instead of in
//! every status row.
//!
//! A status row of this layout (`TAG` first) holds the route's id, a
//! 64-bit prefix of the BLAKE3 hash of the route's encoding, and the rest
//! of the summary. A route row is written in the transaction of the first
//! status row that refers to it, and again into every later memtable that
//! does not hold it yet, so it is always committed with (or before) the
//! rows that refer to it, whatever batch is rolled back. Route rows are
//! never removed.
//!
//! Reading needs no table: the ids are content hashes, so one map of
//! every route seen in this process (loaded from each database as it
//! opens, [`load`]) resolves them. Two routes whose hashes collide would
//! share an id: the second one's rows are written in the old layout, with
//! the whole summary.
//!
//! Why: a processed message's status row with its whole summary is 269
//! bytes, 118 with its route's id instead (the route row is 163 bytes,
//! once). Every byte goes through the log, the memtable and, at a
//! checkpoint, redb, and stays for the tracking retention (7 days).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

use serde::{Deserialize, Serialize};

use super::records::{self, HistoryEntry, Progress, Status, Summary};
use crate::identity::AgentId;
use crate::store::{self, Table};
use crate::wire;

/// First byte of a status row in this layout. No older layout starts
/// with it: their first byte is the wire format's version (1).
pub(crate) const TAG: u8 = 0xA6;

/// What a route row holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Route {
    from: AgentId,
    #[serde(deserialize_with = "crate::wire::owned::string")]
    from_handle: String,
    to: AgentId,
    #[serde(deserialize_with = "crate::wire::owned::string")]
    to_handle: String,
    #[serde(deserialize_with = "crate::wire::owned::string")]
    to_node: String,
}

#[derive(Serialize)]
struct RouteRef<'a> {
    from: &'a str,
    from_handle: &'a str,
    to: &'a str,
    to_handle: &'a str,
    to_node: &'a str,
}

impl<'a> RouteRef<'a> {
    fn of(s: &'a Summary) -> Self {
        RouteRef {
            from: s.from.as_str(),
            from_handle: &s.from_handle,
            to: s.to.as_str(),
            to_handle: &s.to_handle,
            to_node: &s.to_node,
        }
    }
}

impl Route {
    fn same(&self, s: &Summary) -> bool {
        self.from == s.from
            && self.to == s.to
            && self.to_node == s.to_node
            && self.from_handle == s.from_handle
            && self.to_handle == s.to_handle
    }

    fn of(s: &Summary) -> Self {
        Route {
            from: s.from.clone(),
            from_handle: s.from_handle.clone(),
            to: s.to.clone(),
            to_handle: s.to_handle.clone(),
            to_node: s.to_node.clone(),
        }
    }
}

/// Every route seen in this process, by id.
fn known() -> &'static RwLock<HashMap<u64, Arc<Route>>> {
    static KNOWN: OnceLock<RwLock<HashMap<u64, Arc<Route>>>> = OnceLock::new();
    KNOWN.get_or_init(Default::default)
}

fn id_of(encoded: &[u8]) -> u64 {
    let h = blake3::hash(encoded);
    let mut first = [0u8; 8];
    first.copy_from_slice(&h.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

thread_local! {
    /// The routes this thread wrote last, with their ids: hashing a route
    /// per status row would cost more than it saves.
    static RECENT: RefCell<Vec<(Arc<Route>, u64)>> = const { RefCell::new(Vec::new()) };
}
const RECENT_MAX: usize = 16;

/// The id of `s`'s route and its encoding when it is new to this
/// process; `None` when its id is taken by another route (a collision).
fn route_of(s: &Summary) -> Option<(u64, Option<Vec<u8>>)> {
    let hit = RECENT.with_borrow(|r| r.iter().find(|(route, _)| route.same(s)).map(|(_, id)| *id));
    if let Some(id) = hit {
        return Some((id, None));
    }
    let encoded = wire::encode(&RouteRef::of(s));
    let id = id_of(&encoded);
    let route = {
        let mut map = known().write().unwrap_or_else(|p| p.into_inner());
        let r = map.entry(id).or_insert_with(|| Arc::new(Route::of(s)));
        if !r.same(s) {
            return None;
        }
        r.clone()
    };
    RECENT.with_borrow_mut(|r| {
        if r.len() >= RECENT_MAX {
            r.remove(0);
        }
        r.push((route, id));
    });
    Some((id, Some(encoded)))
}

/// Load the routes of a database into this process's map; returns how
/// many there are. A row that does not decode is skipped, named in an
/// error log.
pub(crate) fn load(store: &store::Store) -> Result<usize, store::Error> {
    let r = store.read()?;
    let t = r.open_table(crate::store::tables::OUT_ROUTES)?;
    let mut map = known().write().unwrap_or_else(|p| p.into_inner());
    let mut n = 0;
    for row in t.iter()? {
        let (k, v) = row?;
        let id = k.value();
        let route: Route = match records::decode("out_routes", v.value()) {
            Ok(r) => r,
            Err(e) => {
                // Only the status rows naming it cannot be read (each
                // query says so); the node itself can start.
                tracing::error!(route = format!("{id:016x}"), error = %e, "a stored route does not decode; skipped");
                continue;
            }
        };
        let kept = map.entry(id).or_insert_with(|| Arc::new(route.clone()));
        if **kept != route {
            // Another database of this process has a different route under
            // the same 64-bit id (a hash collision): rows naming it would
            // read the other route's agents. Written rows avoid this (see
            // the module doc); two databases in one process cannot.
            tracing::error!(
                route = format!("{id:016x}"),
                "two databases in this process hold different routes with the same id; status queries of their messages may name the wrong agents"
            );
        }
        n += 1;
    }
    Ok(n)
}

/// The tables a status row with a route is written to.
pub(crate) struct StatusTables<'t> {
    pub status: Table<'t, &'static str, &'static [u8]>,
    pub routes: Table<'t, u64, &'static [u8]>,
}

impl<'t> StatusTables<'t> {
    pub fn open(txn: &crate::store::Tx<'t>) -> Result<Self, store::Error> {
        Ok(StatusTables {
            status: txn.open_table(crate::store::tables::OUT_STATUS)?,
            routes: txn.open_table(crate::store::tables::OUT_ROUTES)?,
        })
    }

    /// Write `p` as message `id`'s status row, with `summary` (which
    /// overrides `p.summary`) by its route.
    pub fn put<S>(
        &mut self,
        id: &str,
        p: &Progress<S>,
        summary: Option<&Summary>,
    ) -> Result<(), store::Error> {
        let Some(s) = summary else {
            return self.status.insert_with(id, |b| encode(b, p, None));
        };
        let Some((route, encoded)) = route_of(s) else {
            // Collision: the whole summary, in the old layout.
            return self.status.insert_with(id, |b| {
                wire::encode_into(b, &records::ProgressRef::of(p, Some(s)))
            });
        };
        if !self.routes.in_memtable(route) {
            let bytes = encoded.unwrap_or_else(|| wire::encode(&RouteRef::of(s)));
            self.routes.insert(route, bytes.as_slice())?;
        }
        self.status
            .insert_with(id, |b| encode(b, p, Some((route, s))))
    }
}

#[derive(Serialize)]
struct SummaryRef<'a> {
    route: u64,
    subject: &'a Option<String>,
    reply_to: &'a Option<String>,
    trace_id: &'a str,
    created_at_ms: u64,
    expires_at_ms: u64,
}

fn encode<S>(b: &mut Vec<u8>, p: &Progress<S>, summary: Option<(u64, &Summary)>) {
    b.push(TAG);
    let summary = summary.map(|(route, s)| SummaryRef {
        route,
        subject: &s.subject,
        reply_to: &s.reply_to,
        trace_id: &s.trace_id,
        created_at_ms: s.created_at_ms,
        expires_at_ms: s.expires_at_ms,
    });
    wire::encode_into(b, &records::ProgressRef::of(p, summary));
}

#[derive(Deserialize)]
struct Stored {
    status: Status,
    attempts: u32,
    updated_at_ms: u64,
    history: Vec<HistoryEntry>,
    #[serde(deserialize_with = "crate::wire::owned::opt_string")]
    last_error: Option<String>,
    #[serde(deserialize_with = "crate::wire::owned::opt_string")]
    result_json: Option<String>,
    summary: Option<StoredSummary>,
}

#[derive(Deserialize)]
struct StoredSummary {
    route: u64,
    #[serde(deserialize_with = "crate::wire::owned::opt_string")]
    subject: Option<String>,
    #[serde(deserialize_with = "crate::wire::owned::opt_string")]
    reply_to: Option<String>,
    #[serde(deserialize_with = "crate::wire::owned::string")]
    trace_id: String,
    created_at_ms: u64,
    expires_at_ms: u64,
}

/// The status and last change of a status row of this layout (without
/// its `TAG`), its route not looked up (garbage collection needs no more).
pub(crate) fn decode_status(bytes: &[u8]) -> Result<(Status, u64), store::Error> {
    let s: Stored = records::decode("out_status", bytes)?;
    Ok((s.status, s.updated_at_ms))
}

/// Decode a status row of this layout (without its `TAG`).
pub(crate) fn decode(bytes: &[u8]) -> Result<Progress, store::Error> {
    let s: Stored = records::decode("out_status", bytes)?;
    let summary = match s.summary {
        None => None,
        Some(t) => {
            let route = known()
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&t.route)
                .cloned()
                .ok_or_else(|| store::Error::Corrupt {
                    table: "out_status",
                    reason: format!(
                        "a status row refers to route {:016x}, which is not stored",
                        t.route
                    ),
                })?;
            Some(Summary {
                from: route.from.clone(),
                from_handle: route.from_handle.clone(),
                to: route.to.clone(),
                to_handle: route.to_handle.clone(),
                to_node: route.to_node.clone(),
                subject: t.subject,
                reply_to: t.reply_to,
                trace_id: t.trace_id,
                created_at_ms: t.created_at_ms,
                expires_at_ms: t.expires_at_ms,
            })
        }
    };
    Ok(Progress {
        status: s.status,
        attempts: s.attempts,
        updated_at_ms: s.updated_at_ms,
        history: s.history,
        last_error: s.last_error,
        result_json: s.result_json,
        summary,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::Status;
    use crate::delivery::records::OutHead;
    use crate::delivery::testing::{start_node, write_before_start};
    use crate::store::tables::{OUT_ROUTES, OUT_STATUS};
    use crate::wire::Envelope;

    fn fresh_agent() -> AgentId {
        let k = crate::identity::generate_key().unwrap();
        AgentId::from_public(&k.verifying_key().to_bytes())
    }

    /// A summary between two agents made for this test, so no other test
    /// of this process has seen its route.
    fn summary() -> Summary {
        let env = Envelope {
            id: "01KB00000000000000000000R1".into(),
            trace_id: "trace-1".into(),
            from: fresh_agent(),
            from_handle: "alice".into(),
            to: fresh_agent(),
            subject: Some("hello".into()),
            body_json: "{}".into(),
            reply_to: None,
            created_at_ms: 10,
            expires_at_ms: 20,
            delegation_json: None,
        };
        let head = OutHead {
            to_handle: "bob".into(),
            to_node: "12D3KooWnode".into(),
        };
        Summary::of(&env, &head)
    }

    /// A database holding a status row that names its route, written
    /// without going through this process's map: a node started on it
    /// reads the route from the database and shows the whole summary.
    #[tokio::test]
    async fn a_restarted_node_reads_routes_from_its_database() {
        let dir = tempfile::tempdir().unwrap();
        let s = summary();
        let mut p = Progress::queued(10);
        p.advance(Status::Processed, 15, None);
        let route_bytes = wire::encode(&RouteRef::of(&s));
        let route = id_of(&route_bytes);
        assert!(
            !known().read().unwrap().contains_key(&route),
            "a route of fresh agents is not known yet"
        );
        let mut row = Vec::new();
        encode(&mut row, &p, Some((route, &s)));
        write_before_start(dir.path(), move |txn| {
            txn.open_table(OUT_ROUTES)?
                .insert(route, route_bytes.as_slice())?;
            txn.open_table(OUT_STATUS)?
                .insert("01KB00000000000000000000R1", row.as_slice())?;
            Ok(())
        })
        .await;
        let node = start_node(dir.path()).await;
        let h = node.handle();
        let view = h.delivery().message("01KB00000000000000000000R1").unwrap();
        assert_eq!(view.summary, s);
        assert_eq!(view.tracking.status, Status::Processed);
        drop(h);
        node.shutdown().await;
    }

    /// A route whose id another route already has (a hash collision)
    /// keeps its whole summary in the row.
    #[tokio::test]
    async fn a_colliding_route_keeps_the_whole_summary() {
        let dir = tempfile::tempdir().unwrap();
        let (store, w) = crate::store::Store::open(dir.path()).unwrap();
        let s = summary();
        let id = id_of(&wire::encode(&RouteRef::of(&s)));
        // Another route under that id.
        let other = summary();
        known()
            .write()
            .unwrap()
            .insert(id, Arc::new(Route::of(&other)));
        let mut p = Progress::queued(10);
        p.advance(Status::Delivered, 12, None);
        let (written, with) = (p.clone(), s.clone());
        store
            .write(move |txn| StatusTables::open(txn)?.put("m1", &written, Some(&with)))
            .await
            .unwrap();
        let r = store.read().unwrap();
        let v = r
            .open_table(OUT_STATUS)
            .unwrap()
            .get("m1")
            .unwrap()
            .unwrap();
        assert_ne!(v.value()[0], TAG);
        p.summary = Some(s);
        assert_eq!(Progress::decode(v.value()).unwrap(), p);
        assert_eq!(r.open_table(OUT_ROUTES).unwrap().len().unwrap(), 0);
        drop(r);
        drop(store);
        w.join();
    }

    #[test]
    fn a_row_naming_an_unknown_route_is_a_clear_error() {
        let s = summary();
        let mut row = Vec::new();
        encode(&mut row, &Progress::queued(1), Some((7, &s)));
        let err = Progress::decode(&row).unwrap_err().to_string();
        assert!(err.contains("route 0000000000000007"), "{err}");
    }
}
