//! Discovery across real nodes: capability, prefix, tag and free-text
//! queries from every node; late joiners; withdrawal; expiry; forgeries.

mod common;

use std::time::{Duration, Instant};

use agentmesh::NodeConfig;
use common::*;
use serde_json::{Value, json};

fn fast(c: &mut NodeConfig) {
    c.discovery.anti_entropy_interval = Duration::from_secs(2);
}

async fn register(n: &TestNode, body: Value) -> String {
    let v = n.client.post("/v1/agents", &body).await.expect("register");
    v["agent_id"].as_str().expect("agent_id").to_string()
}

async fn handles(n: &TestNode, query: &str) -> Vec<String> {
    let v = n
        .client
        .get(&format!("/v1/agents?{query}"))
        .await
        .expect("GET /v1/agents");
    v.as_array()
        .expect("array")
        .iter()
        .map(|a| a["handle"].as_str().unwrap().to_string())
        .collect()
}

fn summarizer() -> Value {
    json!({"handle": "summarizer", "description": "writing helper",
           "capabilities": [{"name": "summarize", "description": "condenses long documents into short summaries",
                             "tags": ["en", "text"], "version": "1.2.0"}]})
}

fn translator(handle: &str, pair: &str, tags: &[&str]) -> Value {
    json!({"handle": handle, "description": "translation agent",
           "capabilities": [{"name": format!("translate/{pair}"), "description": "translates text between languages", "tags": tags}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_nodes_answer_every_kind_of_query() {
    init_tracing();
    let nodes = chain(6, fast).await;
    register(&nodes[0], summarizer()).await;
    register(
        &nodes[2],
        translator("translator-fr", "fr-en", &["fr", "en"]),
    )
    .await;
    register(
        &nodes[4],
        translator("translator-de", "de-en", &["de", "en"]),
    )
    .await;
    register(
        &nodes[4],
        json!({"handle": "reviewer", "capabilities": [{"name": "code/review/rust", "description": "reviews rust pull requests", "tags": ["rust"]}]}),
    )
    .await;

    for (i, n) in nodes.iter().enumerate() {
        let what = format!("node {i} to answer all queries");
        wait_until(&what, Duration::from_secs(15), || async {
            handles(n, "capability=summarize").await == ["summarizer"]
                && handles(n, "capability=translate/*").await == ["translator-de", "translator-fr"]
                && handles(n, "capability=translate/*&tag=fr").await == ["translator-fr"]
                && handles(n, "tag=en&tag=de").await == ["translator-de"]
                && handles(n, "capability=code/*").await == ["reviewer"]
                && handles(n, "q=shorten%20a%20long%20document")
                    .await
                    .first()
                    .map(String::as_str)
                    == Some("summarizer")
        })
        .await;
        assert_eq!(
            handles(n, "capability=summarize&version=%5E1.0").await,
            ["summarizer"]
        );
        assert!(
            handles(n, "capability=summarize&version=%5E2")
                .await
                .is_empty()
        );
        assert!(
            handles(n, "capability=translate").await.is_empty(),
            "exact name, not prefix"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_joiner_and_restarted_node_catch_up_without_new_ads() {
    init_tracing();
    // Refresh far in the future: nothing is re-published during the test.
    let mut nodes = chain(3, |c| {
        c.discovery.refresh_interval = Duration::from_secs(300)
    })
    .await;
    register(&nodes[0], summarizer()).await;
    let gone = register(&nodes[1], translator("old-translator", "fr-en", &["fr"])).await;
    for i in 0..8 {
        register(
            &nodes[1 + i % 2],
            json!({"handle": format!("worker-{i}"), "capabilities": [{"name": "work"}]}),
        )
        .await;
    }
    wait_until(
        "node 2 to see all 10 agents",
        Duration::from_secs(10),
        || async { handles(&nodes[2], "limit=100").await.len() == 10 },
    )
    .await;

    // A node started after every ad was published.
    let boot = nodes[2].dial_addr.clone();
    let late = TestNode::start(|c| {
        c.network.bootstrap = vec![boot];
        c.discovery.refresh_interval = Duration::from_secs(300);
    })
    .await;
    let t = Instant::now();
    wait_until(
        "the late joiner to see all 10 agents",
        Duration::from_secs(5),
        || async { handles(&late, "limit=100").await.len() == 10 },
    )
    .await;
    eprintln!("late joiner synced 10 agents in {:?}", t.elapsed());

    // A node that misses updates while down.
    nodes[2].stop().await;
    nodes[1]
        .client
        .delete(&format!("/v1/agents/{gone}"))
        .await
        .unwrap();
    register(
        &nodes[0],
        json!({"handle": "newcomer", "capabilities": [{"name": "work"}]}),
    )
    .await;
    nodes[2].start_again().await;
    // It answers from its persisted registry at once...
    assert!(handles(&nodes[2], "capability=summarize").await == ["summarizer"]);
    let t = Instant::now();
    // ...then catches up with what it missed, via the bootstrap peer.
    wait_until(
        "the restarted node to see the newcomer and lose the withdrawn agent",
        Duration::from_secs(5),
        || async {
            let h = handles(&nodes[2], "limit=100").await;
            h.contains(&"newcomer".to_string()) && !h.contains(&"old-translator".to_string())
        },
    )
    .await;
    eprintln!("restarted node caught up in {:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdrawal_spreads_and_dead_nodes_agents_expire() {
    init_tracing();
    let mut nodes = chain(3, |c| {
        fast(c);
        c.discovery.ad_ttl = Duration::from_secs(3);
        c.discovery.refresh_interval = Duration::from_secs(1);
    })
    .await;
    let a = register(&nodes[0], summarizer()).await;
    register(&nodes[1], translator("doomed", "fr-en", &["fr"])).await;
    for n in &nodes {
        wait_until("both agents visible", Duration::from_secs(10), || async {
            handles(n, "").await == ["doomed", "summarizer"]
        })
        .await;
    }
    // Alive agents are refreshed and so outlive their TTL.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(handles(&nodes[2], "").await, ["doomed", "summarizer"]);

    nodes[0]
        .client
        .delete(&format!("/v1/agents/{a}"))
        .await
        .unwrap();
    for n in &nodes {
        wait_until(
            "the withdrawn agent to vanish",
            Duration::from_secs(10),
            || async { !handles(n, "").await.contains(&"summarizer".to_string()) },
        )
        .await;
    }
    let err = nodes[2]
        .client
        .get(&format!("/v1/agents/{a}"))
        .await
        .unwrap_err();
    assert_eq!(err.status().map(|s| s.as_u16()), Some(404));

    // The node hosting "doomed" dies without a word: the ad expires.
    nodes[1].crash().await;
    for i in [0, 2] {
        wait_until(
            "the dead node's agent to expire",
            Duration::from_secs(10),
            || async { handles(&nodes[i], "").await.is_empty() },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_ads_are_rejected_and_never_stored() {
    use agentmesh::discovery::{GossipAd, ad};
    use agentmesh::identity::{NodeKey, generate_key};
    use agentmesh::wire::{self, AdBody, AdState, Capability, Request};

    init_tracing();
    let nodes = chain(3, fast).await;
    let honest = register(&nodes[1], summarizer()).await;
    wait_until(
        "honest agent visible on node 2",
        Duration::from_secs(10),
        || async { handles(&nodes[2], "").await == ["summarizer"] },
    )
    .await;

    // The "attacker" is node 0, publishing forged ads through its own network handle.
    let attacker = nodes[0].handle();
    let victim_node: libp2p::PeerId = nodes[1].node_id.parse().unwrap();
    let now = agentmesh::time::now_ms();
    let body = |agent: &ed25519_dalek::SigningKey, node: &NodeKey, handle: &str| AdBody {
        agent_id: ad::agent_id_of(agent),
        handle: handle.into(),
        node_id: node.peer_id().to_string(),
        node_key: node.public_bytes(),
        node_addrs: vec![],
        description: "forged".into(),
        capabilities: vec![Capability {
            name: "steal".into(),
            description: "".into(),
            tags: vec![],
            version: None,
        }],
        metadata_json: "{}".into(),
        seq: now,
        issued_at_ms: now,
        ttl_secs: 60,
        state: AdState::Active,
    };
    let own_key = attacker.key().clone();
    // 1. A bad agent signature.
    let mut bad_sig = ad::sign(
        body(&generate_key().unwrap(), &own_key, "forged-sig"),
        &generate_key().unwrap(),
        &own_key,
    );
    bad_sig.agent_sig[0] ^= 1;
    // 2. An agent claimed to live on node 1, signed by node 0.
    let mut claim = body(&generate_key().unwrap(), &own_key, "forged-claim");
    claim.node_id = victim_node.to_string();
    let k = generate_key().unwrap();
    claim.agent_id = ad::agent_id_of(&k);
    let claim = ad::sign(claim, &k, &own_key);
    // 3. The honest agent's ad with a changed capability (hijack attempt).
    let mut hijack = nodes[2]
        .handle()
        .discovery()
        .with_registry(|r| r.get(&honest.parse().unwrap()).unwrap().ad.clone());
    hijack.body.capabilities[0].name = "steal".into();
    hijack.body.seq += 1_000_000;

    let topic = agentmesh::discovery::ads_topic("default");
    for forged in [&bad_sig, &claim, &hijack] {
        attacker
            .net()
            .publish(topic.clone(), wire::encode(&GossipAd::V1(forged.clone())))
            .await
            .expect("publish");
    }
    // Also push them directly, as anti-entropy would.
    let push = wire::encode(&Request::PushAds {
        ads: vec![bad_sig.clone(), claim.clone(), hijack.clone()],
    });
    let target: libp2p::PeerId = nodes[2].node_id.parse().unwrap();
    attacker
        .net()
        .add_addresses(target, vec![nodes[2].dial_addr.clone()])
        .await
        .unwrap();
    attacker
        .net()
        .request(target, push)
        .await
        .expect("push answered");

    wait_until(
        "node 1 and node 2 to reject the forgeries",
        Duration::from_secs(10),
        || async {
            metric(&nodes[1].client, "agentmesh_ads_rejected_total")
                .await
                .unwrap_or(0.0)
                >= 3.0
                && metric(&nodes[2].client, "agentmesh_ads_rejected_total")
                    .await
                    .unwrap_or(0.0)
                    >= 3.0
        },
    )
    .await;
    for n in &nodes[1..] {
        assert!(handles(n, "capability=steal").await.is_empty());
        assert_eq!(handles(n, "").await, ["summarizer"]);
        assert!(handles(n, "handle=forged-claim").await.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_api_validates_input() {
    init_tracing();
    let n = TestNode::start(|_| {}).await;
    let id = register(&n, summarizer()).await;
    // Re-registering the handle keeps the id and answers 200.
    let v = n
        .client
        .post("/v1/agents", &translator("summarizer", "fr-en", &[]))
        .await
        .unwrap();
    assert_eq!(v["agent_id"], id.as_str());
    assert_eq!(
        handles(&n, "capability=translate/fr-en").await,
        ["summarizer"]
    );

    for (body, code) in [
        (json!({"handle": "Bad Handle"}), "invalid_handle"),
        (
            json!({"handle": "ok", "capabilities": [{"name": "a//b"}]}),
            "invalid_agent",
        ),
        (
            json!({"handle": "ok", "capabilities": [{"name": "x", "version": "one"}]}),
            "invalid_agent",
        ),
        (json!({"handle": "ok", "colour": "red"}), "invalid_body"),
        (json!({"nohandle": 1}), "invalid_body"),
    ] {
        let err = n.client.post("/v1/agents", &body).await.unwrap_err();
        match err {
            agentmesh::client::Error::Api {
                status, code: c, ..
            } => {
                assert_eq!(status.as_u16(), 400, "{body}");
                assert_eq!(c, code, "{body}");
            }
            other => panic!("{other}"),
        }
    }
    let err = n
        .client
        .get("/v1/agents?capability=tr*x")
        .await
        .unwrap_err();
    assert_eq!(err.status().map(|s| s.as_u16()), Some(400));
    let err = n.client.get("/v1/agents/agt_nope").await.unwrap_err();
    assert_eq!(err.status().map(|s| s.as_u16()), Some(400));
    let err = n
        .client
        .delete("/v1/agents/agt_11111111111111111111111111111111")
        .await
        .unwrap_err();
    assert!(matches!(err.status().map(|s| s.as_u16()), Some(400 | 404)));

    // Local agents survive a restart with the same id.
    let mut n = n;
    n.restart().await;
    let v = n.client.get(&format!("/v1/agents/{id}")).await.unwrap();
    assert_eq!(v["handle"], "summarizer");
    assert_eq!(v["local"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dht_finds_agents_when_gossip_and_anti_entropy_are_off() {
    init_tracing();
    // Only the Kademlia provider records can carry ads between these nodes.
    let nodes = chain(4, |c| {
        c.discovery.gossip = false;
        c.discovery.anti_entropy = false;
    })
    .await;
    register(&nodes[0], summarizer()).await;
    register(&nodes[3], translator("translator-fr", "fr-en", &["fr"])).await;
    let who = &nodes[1];
    assert!(
        who.handle().discovery().with_registry(|r| r.is_empty()),
        "nothing arrived by other means"
    );
    wait_until(
        "node 1 to find both agents through the DHT",
        Duration::from_secs(20),
        || async {
            handles(who, "capability=summarize").await == ["summarizer"]
                && handles(who, "capability=translate/*").await == ["translator-fr"]
        },
    )
    .await;
    let id = nodes[3]
        .client
        .get("/v1/agents?handle=translator-fr")
        .await
        .unwrap()[0]["agent_id"]
        .as_str()
        .unwrap()
        .to_string();
    let v = nodes[2]
        .client
        .get(&format!("/v1/agents/{id}"))
        .await
        .unwrap();
    assert_eq!(v["handle"], "translator-fr");
    assert!(
        metric(&who.client, "agentmesh_dht_lookups_total")
            .await
            .unwrap()
            >= 1.0
    );
}

/// Ads in `n`'s registry (local view only: no DHT lookup involved).
fn known(n: &TestNode) -> usize {
    n.handle().discovery().with_registry(|r| r.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ad_published_before_any_peer_is_gossiped_once_one_arrives() {
    init_tracing();
    // No anti-entropy: only gossip can carry the ad.
    let first = TestNode::start(|c| c.discovery.anti_entropy = false).await;
    register(&first, summarizer()).await;
    assert_eq!(
        first.handle().discovery().unsent_ads(),
        1,
        "alone, the publish has no peer to go to"
    );
    let boot = first.dial_addr.clone();
    let second = TestNode::start(|c| {
        c.discovery.anti_entropy = false;
        c.network.bootstrap = vec![boot];
    })
    .await;
    wait_until(
        "the second node to receive the ad by gossip",
        Duration::from_secs(10),
        || async { known(&second) == 1 },
    )
    .await;
    assert_eq!(first.handle().discovery().unsent_ads(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_nodes_reconcile_early_not_once_per_interval() {
    init_tracing();
    // No gossip, and periodic anti-entropy far away: the two nodes reconcile
    // (with nothing to exchange) when they connect, then an agent registers.
    let nodes = chain(2, |c| {
        c.discovery.gossip = false;
        c.discovery.anti_entropy_interval = Duration::from_secs(300);
    })
    .await;
    wait_until(
        "the connect-time round",
        Duration::from_secs(10),
        || async {
            nodes[1]
                .handle()
                .discovery()
                .stats()
                .sync_rounds
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 1
        },
    )
    .await;
    register(&nodes[0], summarizer()).await;
    // The early rounds after start (1 s, then doubling) carry it, not the
    // 300 s interval.
    let t = Instant::now();
    wait_until(
        "the other node to learn the ad by anti-entropy",
        Duration::from_secs(20),
        || async { known(&nodes[1]) == 1 },
    )
    .await;
    eprintln!("reconciled in {:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_without_capabilities_are_listed() {
    let n = TestNode::start(|_| {}).await;
    register(&n, json!({"handle": "plain"})).await;
    assert_eq!(handles(&n, "").await, ["plain"]);
    assert_eq!(handles(&n, "handle=plain").await, ["plain"]);
    assert!(handles(&n, "capability=x").await.is_empty());
}
