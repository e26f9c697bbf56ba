//! `/healthz`, `/v1/node`, `/v1/peers`, `/metrics`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Serialize;
use serde_json::{Value, json};

use super::ApiError;
use crate::node::NodeHandle;

/// `200 {"status":"ok"}`, or `503 {"status":"failing","error":…}` once the
/// store refuses writes (a failed write-ahead log write or fsync): the node
/// must be restarted.
pub async fn healthz(State(node): State<NodeHandle>) -> (StatusCode, Json<Value>) {
    match node.store().failure() {
        None => (StatusCode::OK, Json(json!({"status": "ok"}))),
        Some(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "failing", "error": e.to_string()})),
        ),
    }
}

#[derive(Serialize)]
pub struct NodeView {
    node_id: String,
    mesh: String,
    version: &'static str,
    listen_addrs: Vec<String>,
    api: Option<String>,
    peers_connected: usize,
    agents_local: usize,
    uptime_secs: u64,
}

pub async fn info(State(node): State<NodeHandle>) -> Result<Json<NodeView>, ApiError> {
    let i = node.info().await?;
    Ok(Json(NodeView {
        node_id: i.node_id.to_string(),
        mesh: i.mesh,
        version: env!("CARGO_PKG_VERSION"),
        listen_addrs: i.listen_addrs.iter().map(|a| a.to_string()).collect(),
        api: i.api.map(|a| a.to_string()),
        peers_connected: i.peers_connected,
        agents_local: i.agents_local,
        uptime_secs: i.uptime_secs,
    }))
}

#[derive(Serialize)]
pub struct PeerView {
    node_id: String,
    addrs: Vec<String>,
    connected: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    rtt_ms: Option<f64>,
}

pub async fn peers(State(node): State<NodeHandle>) -> Result<Json<Vec<PeerView>>, ApiError> {
    let peers = node.peers().await?;
    Ok(Json(
        peers
            .into_iter()
            .map(|p| PeerView {
                node_id: p.peer_id.to_string(),
                addrs: p.addrs.iter().map(|a| a.to_string()).collect(),
                connected: p.connected,
                rtt_ms: p
                    .rtt
                    .map(|d| (d.as_secs_f64() * 1000.0 * 100.0).round() / 100.0),
            })
            .collect(),
    ))
}

pub async fn metrics(State(node): State<NodeHandle>) -> Result<impl IntoResponse, ApiError> {
    let i = node.info().await?;
    let stats = node.store().stats();
    let net = node.net().stats().await?;
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, kind: &str, v: u64| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
        ));
    };
    gauge(
        "agentmesh_peers_connected",
        "Identified peers connected now.",
        "gauge",
        i.peers_connected as u64,
    );
    gauge(
        "agentmesh_agents_local",
        "Agents registered on this node.",
        "gauge",
        i.agents_local as u64,
    );
    gauge(
        "agentmesh_uptime_seconds",
        "Seconds since the node started.",
        "gauge",
        i.uptime_secs,
    );
    gauge(
        "agentmesh_store_commits_total",
        "Write transactions committed.",
        "counter",
        stats.commits.load(std::sync::atomic::Ordering::Relaxed),
    );
    gauge(
        "agentmesh_store_writes_total",
        "Writes applied (several per commit under load).",
        "counter",
        stats.writes.load(std::sync::atomic::Ordering::Relaxed),
    );
    for (name, help, v) in [
        (
            "agentmesh_store_wal_syncs_total",
            "fsyncs of the write-ahead log (each makes every commit before it durable).",
            &stats.wal_syncs,
        ),
        (
            "agentmesh_store_wal_bytes_total",
            "Bytes appended to the write-ahead log.",
            &stats.wal_bytes,
        ),
        (
            "agentmesh_store_checkpoints_total",
            "Durable redb commits after which the write-ahead log starts again.",
            &stats.checkpoints,
        ),
    ] {
        gauge(
            name,
            help,
            "counter",
            v.load(std::sync::atomic::Ordering::Relaxed),
        );
    }
    gauge(
        "agentmesh_foreign_peers_rejected_total",
        "Peers of another mesh identified and turned away.",
        "counter",
        net.foreign_rejected,
    );
    gauge(
        "agentmesh_net_events_shed_total",
        "Inbound network events dropped because the node was not keeping up.",
        "counter",
        net.events_shed,
    );
    gauge(
        "agentmesh_idle_connections_closed_total",
        "Connections closed because no request crossed them for network.idle_timeout_secs.",
        "counter",
        net.idle_closed,
    );
    let d = node.discovery().stats();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    gauge(
        "agentmesh_ads_rejected_total",
        "Advertisements that failed verification and were dropped.",
        "counter",
        load(&d.ads_rejected),
    );
    gauge(
        "agentmesh_ads_applied_total",
        "Advertisements applied (new or newer).",
        "counter",
        load(&d.ads_applied),
    );
    gauge(
        "agentmesh_sync_rounds_total",
        "Anti-entropy rounds run with peers.",
        "counter",
        load(&d.sync_rounds),
    );
    gauge(
        "agentmesh_dht_lookups_total",
        "DHT fallback lookups.",
        "counter",
        load(&d.dht_lookups),
    );
    let ds = node.delivery().stats();
    for (name, help, v) in [
        (
            "agentmesh_messages_queued_total",
            "Messages accepted from local agents.",
            &ds.queued,
        ),
        (
            "agentmesh_messages_delivered_total",
            "Messages confirmed stored by the recipient's node.",
            &ds.delivered,
        ),
        (
            "agentmesh_batches_sent_total",
            "Delivery batches sent.",
            &ds.batches_sent,
        ),
        (
            "agentmesh_batches_failed_total",
            "Delivery batches that failed and were retried.",
            &ds.batches_failed,
        ),
        (
            "agentmesh_inbox_stored_total",
            "Messages stored in local inboxes.",
            &ds.inbox_stored,
        ),
        (
            "agentmesh_inbox_duplicates_total",
            "Duplicate deliveries recognised and not stored again.",
            &ds.inbox_duplicates,
        ),
        (
            "agentmesh_inbox_rejected_total",
            "Messages refused on arrival.",
            &ds.inbox_rejected,
        ),
        ("agentmesh_acks_total", "Acks from local agents.", &ds.acked),
        (
            "agentmesh_receipts_applied_total",
            "Receipts applied to tracking.",
            &ds.receipts_applied,
        ),
        (
            "agentmesh_messages_expired_total",
            "Messages that expired here.",
            &ds.expired,
        ),
        (
            "agentmesh_dead_letters_total",
            "Messages dead-lettered here.",
            &ds.dead_lettered,
        ),
    ] {
        gauge(name, help, "counter", load(v));
    }
    gauge(
        "agentmesh_registry_agents",
        "Agents in this node's registry (tombstones included).",
        "gauge",
        node.discovery().with_registry(|r| r.len()) as u64,
    );
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    ))
}
