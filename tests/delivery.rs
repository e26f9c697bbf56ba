//! Delivery between real nodes: volume, fan-out, tracking, leases, dead
//! letters, expiry, idempotency, replies and bad input.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use agentmesh::NodeConfig;
use common::*;
use serde_json::{Value, json};

async fn register(n: &TestNode, handle: &str, caps: &[&str]) -> String {
    let caps: Vec<Value> = caps.iter().map(|c| json!({"name": c})).collect();
    let v = n
        .client
        .post(
            "/v1/agents",
            &json!({"handle": handle, "capabilities": caps}),
        )
        .await
        .expect("register");
    v["agent_id"].as_str().unwrap().to_string()
}

async fn wait_visible(n: &TestNode, handle: &str) {
    wait_until(
        &format!("@{handle} visible"),
        Duration::from_secs(15),
        || async {
            n.client
                .get(&format!("/v1/agents?handle={handle}"))
                .await
                .map(|v| v.as_array().is_some_and(|a| !a.is_empty()))
                .unwrap_or(false)
        },
    )
    .await;
}

async fn send(n: &TestNode, from: &str, to: Value, body: Value) -> Value {
    n.client
        .post(
            "/v1/messages",
            &json!({"from": from, "to": to, "body": body}),
        )
        .await
        .expect("send")
}

async fn status(n: &TestNode, id: &str) -> String {
    n.client
        .get(&format!("/v1/messages/{id}"))
        .await
        .expect("status")["status"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn poll(n: &TestNode, agent: &str, wait: u64, max: usize) -> Vec<Value> {
    n.client
        .get(&format!(
            "/v1/agents/{agent}/inbox?wait_secs={wait}&max={max}"
        ))
        .await
        .expect("poll")
        .as_array()
        .unwrap()
        .clone()
}

async fn ack(n: &TestNode, agent: &str, id: &str, result: Option<Value>) {
    let body = match result {
        Some(r) => json!({"result": r}),
        None => json!({}),
    };
    n.client
        .post(&format!("/v1/agents/{agent}/inbox/{id}/ack"), &body)
        .await
        .expect("ack");
}

fn pair_config(c: &mut NodeConfig) {
    c.discovery.anti_entropy_interval = Duration::from_secs(2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_messages_are_processed_once_with_bodies_intact() {
    init_tracing();
    let nodes = chain(2, pair_config).await;
    let alice = register(&nodes[0], "alice", &[]).await;
    let bob = register(&nodes[1], "bob", &[]).await;
    wait_visible(&nodes[0], "bob").await;

    let n = 1000;
    let mut sent: HashMap<String, Value> = HashMap::new();
    let sends = (0..n).map(|i| {
        let body =
            json!({"seq": i, "text": format!("message number {i}"), "pad": "x".repeat(i % 200)});
        let c = nodes[0].client.clone();
        let alice = alice.clone();
        async move {
            let v = c
                .post(
                    "/v1/messages",
                    &json!({"from": alice, "to": "@bob", "body": body.clone()}),
                )
                .await
                .expect("send");
            (v["message_id"].as_str().unwrap().to_string(), body)
        }
    });
    for (id, body) in futures::future::join_all(sends).await {
        sent.insert(id, body);
    }
    assert_eq!(sent.len(), n);

    let mut seen: HashSet<String> = HashSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {n} messages arrived",
            seen.len()
        );
        for m in poll(&nodes[1], &bob, 1, 200).await {
            let id = m["message_id"].as_str().unwrap().to_string();
            assert!(
                seen.insert(id.clone()),
                "message {id} offered again after its ack"
            );
            assert_eq!(m["body"], sent[&id], "body intact");
            assert_eq!(m["from"], alice.as_str());
            assert_eq!(m["from_handle"], "alice");
            assert_eq!(m["delivery_count"], 1);
            ack(&nodes[1], &bob, &id, Some(json!({"ok": id}))).await;
        }
    }
    wait_until(
        "every message to be processed",
        Duration::from_secs(30),
        || async {
            let mut all = true;
            for id in sent.keys().take(50) {
                all &= status(&nodes[0], id).await == "processed";
            }
            all && metric(&nodes[0].client, "agentmesh_receipts_applied_total")
                .await
                .unwrap_or(0.0)
                >= n as f64
        },
    )
    .await;
    let (id, _) = sent.iter().next().unwrap();
    let v = nodes[0]
        .client
        .get(&format!("/v1/messages/{id}"))
        .await
        .unwrap();
    assert_eq!(v["result"], json!({"ok": id}));
    let steps: Vec<&str> = v["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["status"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["queued", "sent", "delivered", "processed"]);
    assert!(
        poll(&nodes[1], &bob, 0, 100).await.is_empty(),
        "nothing left, nothing offered twice"
    );
}

fn code_of(e: agentmesh::client::Error) -> (u16, String) {
    match e {
        agentmesh::client::Error::Api { status, code, .. } => (status.as_u16(), code),
        other => panic!("expected an API error, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_reaches_every_provider_once() {
    init_tracing();
    let nodes = chain(4, pair_config).await;
    let sender = register(&nodes[0], "dispatcher", &[]).await;
    let mut providers = Vec::new();
    for (i, n) in nodes.iter().enumerate().skip(1) {
        providers.push((
            i,
            register(n, &format!("reviewer-{i}"), &["code/review"]).await,
        ));
    }
    for i in 1..4 {
        wait_visible(&nodes[0], &format!("reviewer-{i}")).await;
    }
    let v = send(
        &nodes[0],
        &sender,
        json!({"capability": "code/*", "strategy": "all"}),
        json!({"pr": 7}),
    )
    .await;
    let msgs = v["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 3, "{v}");
    let targets: HashSet<&str> = msgs.iter().map(|m| m["to"].as_str().unwrap()).collect();
    assert_eq!(targets.len(), 3);
    for (i, agent) in &providers {
        let got = wait_for("the provider's copy", Duration::from_secs(15), || async {
            let m = poll(&nodes[*i], agent, 1, 10).await;
            (!m.is_empty()).then_some(m)
        })
        .await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["body"], json!({"pr": 7}));
        ack(
            &nodes[*i],
            agent,
            got[0]["message_id"].as_str().unwrap(),
            None,
        )
        .await;
    }
    for m in msgs {
        let id = m["message_id"].as_str().unwrap();
        wait_until("processed", Duration::from_secs(15), || async {
            status(&nodes[0], id).await == "processed"
        })
        .await;
    }
    // strategy "one" picks a single provider.
    let v = send(
        &nodes[0],
        &sender,
        json!({"capability": "code/review"}),
        json!({"pr": 8}),
    )
    .await;
    assert_eq!(v["recipients"].as_array().unwrap().len(), 1, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_on_one_node_talk_and_replies_are_linked() {
    init_tracing();
    let n = TestNode::start(|_| {}).await;
    let alice = register(&n, "alice", &[]).await;
    let bob = register(&n, "bob", &[]).await;
    let v = send(&n, &alice, json!("@bob"), json!({"q": "ping"})).await;
    let id = v["message_id"].as_str().unwrap().to_string();
    let got = poll(&n, &bob, 5, 10).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["body"], json!({"q": "ping"}));
    let reply = n
        .client
        .post(
            "/v1/messages",
            &json!({"from": bob, "to": alice, "body": {"a": "pong"}, "reply_to": id, "subject": "re: ping"}),
        )
        .await
        .unwrap();
    ack(&n, &bob, &id, Some(json!("done"))).await;
    let reply_id = reply["message_id"].as_str().unwrap();
    let got = poll(&n, &alice, 5, 10).await;
    assert_eq!(got[0]["reply_to"], id.as_str());
    assert_eq!(got[0]["subject"], "re: ping");
    wait_until("processed", Duration::from_secs(10), || async {
        status(&n, &id).await == "processed"
    })
    .await;
    let v = n.client.get(&format!("/v1/messages/{id}")).await.unwrap();
    assert_eq!(v["replies"], json!([reply_id]));
    assert_eq!(v["result"], json!("done"));
    // Processed: the sender dropped the envelope, the summary still shows.
    assert_eq!(
        (&v["from"], &v["from_handle"], &v["to"], &v["to_handle"]),
        (&json!(alice), &json!("alice"), &json!(bob), &json!("bob"))
    );
    assert_eq!(v["trace_id"], id.as_str(), "trace id defaults to the id");
    wait_until("the reply delivered", Duration::from_secs(10), || async {
        status(&n, reply_id).await == "delivered"
    })
    .await;
    let r = n
        .client
        .get(&format!("/v1/messages/{reply_id}"))
        .await
        .unwrap();
    assert_eq!(
        (&r["subject"], &r["reply_to"]),
        (&json!("re: ping"), &json!(id))
    );
    assert_eq!(r["trace_id"], reply_id);
    // Every durable write above went through the write-ahead log.
    let syncs = metric(&n.client, "agentmesh_store_wal_syncs_total").await;
    assert!(syncs.is_some_and(|s| s >= 1.0), "wal syncs: {syncs:?}");
    let bytes = metric(&n.client, "agentmesh_store_wal_bytes_total").await;
    assert!(bytes.is_some_and(|b| b > 0.0), "wal bytes: {bytes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_documented_errors() {
    init_tracing();
    let nodes = chain(2, |c| {
        pair_config(c);
        c.delivery.max_body_bytes = 4096;
        c.api.max_body_bytes = 64 * 1024;
    })
    .await;
    let alice = register(&nodes[0], "alice", &[]).await;
    let remote = register(&nodes[1], "remote", &[]).await;
    wait_visible(&nodes[0], "remote").await;
    let client = nodes[0].client.clone();
    let post = move |body: Value| {
        let c = client.clone();
        async move { c.post("/v1/messages", &body).await }
    };

    let (s, c) = code_of(
        post(json!({"from": alice, "to": "@nobody", "body": 1}))
            .await
            .unwrap_err(),
    );
    assert_eq!((s, c.as_str()), (404, "recipient_not_found"));
    let err = post(json!({"from": alice, "to": "@nobody", "body": 1}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("@nobody"), "{err}");
    let (s, c) = code_of(
        post(json!({"from": alice, "to": {"capability": "none/*"}, "body": 1}))
            .await
            .unwrap_err(),
    );
    assert_eq!((s, c.as_str()), (404, "recipient_not_found"));

    let (s, c) = code_of(
        post(json!({"from": remote, "to": "@alice", "body": 1}))
            .await
            .unwrap_err(),
    );
    assert_eq!((s, c.as_str()), (403, "sender_not_local"));

    let big = "x".repeat(5000);
    let (s, c) = code_of(
        post(json!({"from": alice, "to": "@remote", "body": big}))
            .await
            .unwrap_err(),
    );
    assert_eq!((s, c.as_str()), (413, "body_too_large"));
    let huge = "x".repeat(100 * 1024);
    let (s, c) = code_of(
        post(json!({"from": alice, "to": "@remote", "body": huge}))
            .await
            .unwrap_err(),
    );
    assert_eq!((s, c.as_str()), (413, "body_too_large"));

    let (s, c) = code_of(
        nodes[0]
            .client
            .post_bytes("/v1/messages", b"{\"from\": ".to_vec())
            .await
            .unwrap_err(),
    );
    assert_eq!((s, c.as_str()), (400, "malformed_json"));
    let (s, _) = code_of(
        post(json!({"from": alice, "to": "@remote"}))
            .await
            .unwrap_err(),
    );
    assert_eq!(s, 400, "missing body");
    let (s, c) = code_of(
        post(json!({"from": "agt_bad", "to": "@remote", "body": 1}))
            .await
            .unwrap_err(),
    );
    assert_eq!((s, c.as_str()), (400, "invalid_agent_id"));
    let (s, c) = code_of(
        post(json!({"from": alice, "to": "remote", "body": 1}))
            .await
            .unwrap_err(),
    );
    assert_eq!((s, c.as_str()), (400, "invalid_recipient"));
    let (s, _) = code_of(
        post(json!({"from": alice, "to": "@remote", "body": 1, "ttl_secs": 0}))
            .await
            .unwrap_err(),
    );
    assert_eq!(s, 400);
    let (s, _) = code_of(
        nodes[0]
            .client
            .get("/v1/messages/01ARZ3NDEKTSV4RRFFQ69G5FAV")
            .await
            .unwrap_err(),
    );
    assert_eq!(s, 404);
    let (s, c) = code_of(
        nodes[1]
            .client
            .post(
                &format!("/v1/agents/{remote}/inbox/01ARZ3NDEKTSV4RRFFQ69G5FAV/ack"),
                &json!({}),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!((s, c.as_str()), (404, "message_not_found"));
    let (s, _) = code_of(
        nodes[0]
            .client
            .get(&format!("/v1/agents/{remote}/inbox"))
            .await
            .unwrap_err(),
    );
    assert_eq!(s, 404, "inbox of a remote agent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_to_a_node_that_stays_down_expires() {
    init_tracing();
    let mut nodes = chain(2, pair_config).await;
    let alice = register(&nodes[0], "alice", &[]).await;
    register(&nodes[1], "bob", &[]).await;
    wait_visible(&nodes[0], "bob").await;
    nodes[1].crash().await;
    let v = nodes[0]
        .client
        .post(
            "/v1/messages",
            &json!({"from": alice, "to": "@bob", "body": {"x": 1}, "ttl_secs": 2}),
        )
        .await
        .unwrap();
    let id = v["message_id"].as_str().unwrap().to_string();
    wait_until("the message to expire", Duration::from_secs(15), || async {
        status(&nodes[0], &id).await == "expired"
    })
    .await;
    let v = nodes[0]
        .client
        .get(&format!("/v1/messages/{id}"))
        .await
        .unwrap();
    let last = v["history"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["status"], "expired");
    assert!(last["detail"].as_str().unwrap().contains("TTL"), "{last}");
    assert!(v["attempts"].as_u64().unwrap() >= 1, "it was tried: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_messages_come_back_then_dead_letter() {
    init_tracing();
    let nodes = chain(2, |c| {
        pair_config(c);
        c.delivery.lease = Duration::from_secs(1);
        c.delivery.max_deliveries = 3;
    })
    .await;
    let alice = register(&nodes[0], "alice", &[]).await;
    let bob = register(&nodes[1], "bob", &[]).await;
    wait_visible(&nodes[0], "bob").await;
    let v = send(&nodes[0], &alice, json!("@bob"), json!("work")).await;
    let id = v["message_id"].as_str().unwrap().to_string();
    for expected in 1..=3 {
        let got = wait_for("an offer", Duration::from_secs(10), || async {
            let m = poll(&nodes[1], &bob, 3, 10).await;
            (!m.is_empty()).then_some(m)
        })
        .await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["delivery_count"], expected);
        // Leased: not offered again while the lease holds.
        assert!(poll(&nodes[1], &bob, 0, 10).await.is_empty());
    }
    // The fourth offer would exceed max_deliveries: dead letter instead.
    assert!(poll(&nodes[1], &bob, 3, 10).await.is_empty());
    wait_until(
        "the sender to see dead_letter",
        Duration::from_secs(15),
        || async { status(&nodes[0], &id).await == "dead_letter" },
    )
    .await;
    let (s, c) = code_of(
        nodes[1]
            .client
            .post(&format!("/v1/agents/{bob}/inbox/{id}/ack"), &json!({}))
            .await
            .unwrap_err(),
    );
    assert_eq!((s, c.as_str()), (409, "not_pending"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_sends_once_even_across_a_restart() {
    init_tracing();
    let mut nodes = chain(2, pair_config).await;
    let alice = register(&nodes[0], "alice", &[]).await;
    let bob = register(&nodes[1], "bob", &[]).await;
    wait_visible(&nodes[0], "bob").await;
    let body = json!({"from": alice, "to": "@bob", "body": "once", "idempotency_key": "order-42"});
    let first = nodes[0].client.post("/v1/messages", &body).await.unwrap();
    let again = nodes[0].client.post("/v1/messages", &body).await.unwrap();
    assert_eq!(first["message_id"], again["message_id"]);
    assert_eq!(again["idempotent_replay"], true);
    nodes[0].restart().await;
    let after = nodes[0].client.post("/v1/messages", &body).await.unwrap();
    assert_eq!(first["message_id"], after["message_id"]);
    let got = wait_for("the message", Duration::from_secs(15), || async {
        let m = poll(&nodes[1], &bob, 1, 10).await;
        (!m.is_empty()).then_some(m)
    })
    .await;
    assert_eq!(got.len(), 1);
    ack(
        &nodes[1],
        &bob,
        got[0]["message_id"].as_str().unwrap(),
        None,
    )
    .await;
    assert!(
        poll(&nodes[1], &bob, 2, 10).await.is_empty(),
        "sent exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_push_messages() {
    init_tracing();
    let n = TestNode::start(|_| {}).await;
    let alice = register(&n, "alice", &[]).await;
    let bob = register(&n, "bob", &[]).await;
    let mut stream = n
        .client
        .stream(&format!("/v1/agents/{bob}/events"))
        .await
        .unwrap();
    send(&n, &alice, json!("@bob"), json!({"push": true})).await;
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !text.contains("\n\n") || !text.contains("event: message") {
        let chunk = tokio::time::timeout_at(deadline, stream.chunk())
            .await
            .expect("event in time")
            .unwrap()
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let data = text.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
    let v: Value = serde_json::from_str(data).unwrap();
    assert_eq!(v["body"], json!({"push": true}));
    assert_eq!(v["from_handle"], "alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_acks_in_one_call() {
    init_tracing();
    let n = TestNode::start(|_| {}).await;
    let alice = register(&n, "alice", &[]).await;
    let bob = register(&n, "bob", &[]).await;
    for i in 0..5 {
        send(&n, &alice, json!("@bob"), json!(i)).await;
    }
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while got.len() < 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "messages did not arrive"
        );
        got.extend(poll(&n, &bob, 1, 10).await);
    }
    let mut acks: Vec<Value> = got
        .iter()
        .map(|m| json!({"message_id": m["message_id"], "result": m["body"]}))
        .collect();
    acks.push(json!({"message_id": "01ARZ3NDEKTSV4RRFFQ69G5FAV"}));
    let v = n
        .client
        .post(
            &format!("/v1/agents/{bob}/inbox/ack"),
            &json!({"acks": acks}),
        )
        .await
        .unwrap();
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 6);
    assert!(results[..5].iter().all(|r| r["ok"] == true), "{v}");
    assert_eq!(results[5]["error"]["code"], "message_not_found");
    assert!(poll(&n, &bob, 0, 10).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_messages_expire_and_finished_state_is_collected() {
    init_tracing();
    let n = TestNode::start(|c| c.delivery.tracking_retention = Duration::from_secs(1)).await;
    let alice = register(&n, "alice", &[]).await;
    let bob = register(&n, "bob", &[]).await;
    let v = n
        .client
        .post(
            "/v1/messages",
            &json!({"from": alice, "to": "@bob", "body": 1, "ttl_secs": 1}),
        )
        .await
        .unwrap();
    let id = v["message_id"].as_str().unwrap().to_string();
    wait_until("delivered", Duration::from_secs(10), || async {
        status(&n, &id).await == "delivered"
    })
    .await;
    let d = n.handle().delivery().clone();
    // Bob never polls; after the TTL a collection pass expires it.
    wait_until(
        "the unread message to expire",
        Duration::from_secs(10),
        || async {
            d.gc().await;
            status(&n, &id).await == "expired"
        },
    )
    .await;
    assert!(poll(&n, &bob, 0, 10).await.is_empty());
    // After the retention period the finished message's tracking goes too.
    wait_until(
        "tracking to be collected",
        Duration::from_secs(10),
        || async {
            d.gc().await;
            n.client.get(&format!("/v1/messages/{id}")).await.is_err()
        },
    )
    .await;
}
