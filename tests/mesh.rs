//! Multi-node tests of the foundation: real nodes on loopback.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_in_a_chain_all_see_each_other() {
    init_tracing();
    let nodes = chain(5, |_| {}).await;
    let ids: Vec<String> = nodes.iter().map(|n| n.node_id.clone()).collect();
    for n in &nodes {
        let others: Vec<&String> = ids.iter().filter(|id| **id != n.node_id).collect();
        wait_until(
            &format!("{} to know all 4 other nodes", n.node_id),
            Duration::from_secs(30),
            || async {
                let peers = n.peer_ids().await;
                others.iter().all(|o| peers.contains(o))
            },
        )
        .await;
        assert!(
            !n.peer_ids().await.contains(&n.node_id),
            "a node never lists itself"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_keeps_its_id_and_is_redialled() {
    init_tracing();
    let mut a = TestNode::start(|_| {}).await;
    let a_addr = a.dial_addr.clone();
    let b = TestNode::start(|c| c.network.bootstrap = vec![a_addr]).await;
    let before = a.client.get("/v1/node").await.unwrap()["node_id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_until("b to connect to a", Duration::from_secs(10), || async {
        a.peer_ids().await.contains(&b.node_id)
    })
    .await;

    // Restart a on the same data dir and the same port, so b's bootstrap
    // address is valid again and b's redial loop must find it.
    let port_addr = a.dial_addr.clone();
    a.stop().await;
    let mut cfg = a.config.clone();
    cfg.network.listen = vec![strip_p2p(&port_addr)];
    a.config = cfg;
    a.start_again().await;
    let after = a.client.get("/v1/node").await.unwrap()["node_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(before, after, "node id must survive a restart");
    wait_until(
        "b to redial the restarted a",
        Duration::from_secs(20),
        || async { a.peer_ids().await.contains(&b.node_id) },
    )
    .await;
}

fn strip_p2p(addr: &libp2p::Multiaddr) -> libp2p::Multiaddr {
    addr.iter()
        .filter(|p| !matches!(p, libp2p::multiaddr::Protocol::P2p(_)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_of_different_meshes_do_not_merge() {
    init_tracing();
    let alpha = TestNode::start(|c| c.mesh = "alpha".into()).await;
    let alpha_addr = alpha.dial_addr.clone();
    let beta = TestNode::start(|c| {
        c.mesh = "beta".into();
        c.network.bootstrap = vec![alpha_addr];
    })
    .await;
    // A third node of beta proves beta works while alpha stays apart.
    let beta_addr = beta.dial_addr.clone();
    let alpha_addr = alpha.dial_addr.clone();
    let beta2 = TestNode::start(|c| {
        c.mesh = "beta".into();
        c.network.bootstrap = vec![beta_addr, alpha_addr];
    })
    .await;
    // Both beta nodes dial alpha; each such connection is identified and
    // turned away by at least one side.
    wait_until(
        "the meshes to identify and turn each other away",
        Duration::from_secs(15),
        || async {
            let mut sum = 0.0;
            for n in [&alpha, &beta, &beta2] {
                sum += metric(&n.client, "agentmesh_foreign_peers_rejected_total")
                    .await
                    .unwrap_or(0.0);
            }
            sum >= 2.0
        },
    )
    .await;
    wait_until(
        "beta nodes to see each other",
        Duration::from_secs(15),
        || async {
            beta.peer_ids().await.contains(&beta2.node_id)
                && beta2.peer_ids().await.contains(&beta.node_id)
        },
    )
    .await;
    assert!(
        alpha.peer_ids().await.is_empty(),
        "alpha must not list beta nodes"
    );
    for b in [&beta, &beta2] {
        assert!(
            !b.peer_ids().await.contains(&alpha.node_id),
            "beta must not list alpha"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_leaves_the_database_free_for_a_retry() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    // The API port is taken, so the start fails after the database opened.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = test_config(dir.path());
    config.api.listen = taken.local_addr().unwrap();
    let err = agentmesh::node::Node::start(config.clone())
        .await
        .err()
        .expect("the API port is in use");
    assert!(
        err.to_string()
            .contains(&taken.local_addr().unwrap().to_string()),
        "the error names the address: {err}"
    );
    // An immediate retry on the same data dir must not find the database in use.
    config.api.listen = "127.0.0.1:0".parse().unwrap();
    let node = agentmesh::node::Node::start(config)
        .await
        .expect("retry after a failed start");
    node.shutdown().await;
}

/// Whether `from` has a connection to `to` now.
async fn connected(from: &TestNode, to: &TestNode) -> bool {
    from.handle()
        .net()
        .peers()
        .await
        .unwrap()
        .iter()
        .any(|p| p.connected && p.peer_id.to_string() == to.node_id)
}

/// Gossipsub holds a stream open on every connection, so libp2p's own idle
/// timeout never fires: the node closes connections no request crossed for
/// `idle_timeout`, but not while requests flow, and never its bootstrap
/// peers. Gossip is off so no gossip-mesh neighbour is exempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_close_busy_and_bootstrap_ones_stay() {
    init_tracing();
    let quiet = |c: &mut agentmesh::config::NodeConfig| {
        c.discovery.gossip = false;
        c.network.idle_timeout = Duration::from_secs(1);
        c.network.min_peers = 0;
    };
    let hub = TestNode::start(quiet).await;
    let hub_addr = hub.dial_addr.clone();
    let far = TestNode::start(quiet).await;
    let me = TestNode::start(|c| {
        quiet(c);
        c.network.bootstrap = vec![hub_addr.clone()];
    })
    .await;
    wait_until(
        "me to reach its bootstrap peer",
        Duration::from_secs(10),
        || connected(&me, &hub),
    )
    .await;

    let net = me.handle().net().clone();
    net.dial(far.dial_addr.clone()).await.unwrap();
    wait_until("me to identify far", Duration::from_secs(10), || {
        connected(&me, &far)
    })
    .await;
    // Requests every 200 ms for 3 s (three idle timeouts) keep it open.
    let far_id: libp2p::PeerId = far.node_id.parse().unwrap();
    for _ in 0..15 {
        // Any answer will do (this one is an error frame): it is traffic.
        let _ = net.request(far_id, b"ping".to_vec()).await;
        assert!(connected(&me, &far).await, "a busy connection was closed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_until(
        "the idle connection to be closed",
        Duration::from_secs(15),
        || async { !connected(&me, &far).await },
    )
    .await;
    assert!(net.stats().await.unwrap().idle_closed >= 1);
    assert!(
        connected(&me, &hub).await,
        "the bootstrap connection must stay"
    );
}
