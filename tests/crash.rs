//! Process-level crash tests: the real binary, killed with SIGKILL.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentmesh::client::Client;
use common::{TOKEN, wait_for, wait_until};
use serde_json::{Value, json};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One node process with a fixed config (ports stay the same across restarts).
struct Proc {
    dir: PathBuf,
    config: PathBuf,
    child: Option<Child>,
    client: Client,
    node_id: String,
    p2p_port: u16,
}

impl Proc {
    fn new(root: &Path, name: &str, bootstrap: Option<String>) -> Proc {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let (p2p_port, api_port) = (free_port(), free_port());
        let boot = bootstrap
            .map(|b| format!("bootstrap = [\"{b}\"]\n"))
            .unwrap_or_default();
        let config = dir.join("node.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = \"{}\"\n[network]\nlisten = [\"/ip4/127.0.0.1/tcp/{p2p_port}\"]\nmdns = false\n{boot}\
                 [api]\nlisten = \"127.0.0.1:{api_port}\"\ntoken = \"{TOKEN}\"\n\
                 [discovery]\nanti_entropy_secs = 1\n[delivery]\nlease_secs = 2\n",
                dir.display()
            ),
        )
        .unwrap();
        Proc {
            dir,
            config,
            child: None,
            client: Client::new(format!("127.0.0.1:{api_port}").parse().unwrap(), TOKEN),
            node_id: String::new(),
            p2p_port,
        }
    }

    async fn start(&mut self) {
        assert!(self.child.is_none());
        let log = std::fs::File::create(self.dir.join(format!("node-{}.log", now()))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_agentmesh"))
            .args(["node", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn node");
        self.child = Some(child);
        let c = self.client.clone();
        self.node_id = wait_for("the node's API", Duration::from_secs(30), || async {
            c.get("/v1/node").await.ok()?["node_id"]
                .as_str()
                .map(str::to_string)
        })
        .await;
    }

    fn sigkill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("SIGKILL");
            c.wait().unwrap();
        }
    }

    fn dial_addr(&self) -> String {
        format!("/ip4/127.0.0.1/tcp/{}/p2p/{}", self.p2p_port, self.node_id)
    }

    async fn register(&self, handle: &str) -> String {
        self.client
            .post("/v1/agents", &json!({"handle": handle}))
            .await
            .unwrap()["agent_id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn poll(&self, agent: &str, max: usize) -> Vec<Value> {
        match self
            .client
            .get(&format!("/v1/agents/{agent}/inbox?wait_secs=1&max={max}"))
            .await
        {
            Ok(v) => v.as_array().unwrap().clone(),
            Err(_) => Vec::new(),
        }
    }

    async fn ack(&self, agent: &str, id: &str) {
        self.client
            .post(&format!("/v1/agents/{agent}/inbox/{id}/ack"), &json!({}))
            .await
            .unwrap();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.sigkill();
    }
}

fn now() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

async fn pair(root: &Path) -> (Proc, Proc, String, String) {
    let mut a = Proc::new(root, "a", None);
    a.start().await;
    let mut b = Proc::new(root, "b", Some(a.dial_addr()));
    b.start().await;
    let alice = a.register("alice").await;
    let bob = b.register("bob").await;
    wait_until("a to see bob", Duration::from_secs(20), || async {
        a.client
            .get("/v1/agents?handle=bob")
            .await
            .is_ok_and(|v| v.as_array().is_some_and(|x| x.len() == 1))
    })
    .await;
    (a, b, alice, bob)
}

/// Receive until `expected` distinct messages arrived; every message offered
/// after its ack is a failure. Returns id -> (body, delivery_count).
async fn drain(
    b: &Proc,
    bob: &str,
    expected: usize,
    acked: &mut HashSet<String>,
) -> HashMap<String, (Value, u64)> {
    let mut got: HashMap<String, (Value, u64)> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.len() < expected {
        assert!(
            Instant::now() < deadline,
            "only {} of {expected} arrived",
            got.len()
        );
        for m in b.poll(bob, 100).await {
            let id = m["message_id"].as_str().unwrap().to_string();
            assert!(
                !acked.contains(&id),
                "message {id} reached the agent again after its ack"
            );
            got.insert(
                id.clone(),
                (m["body"].clone(), m["delivery_count"].as_u64().unwrap()),
            );
            b.ack(bob, &id).await;
            acked.insert(id);
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_messages_survive_sigkill_of_sender_and_recipient() {
    let root = tempfile::tempdir().unwrap();
    let (mut a, mut b, alice, bob) = pair(root.path()).await;
    b.sigkill();
    let n = 60;
    let mut sent: HashMap<String, Value> = HashMap::new();
    for i in 0..n {
        let body = json!({"i": i, "payload": format!("crash-safe message {i}")});
        let v = a
            .client
            .post(
                "/v1/messages",
                &json!({"from": alice, "to": bob, "body": body}),
            )
            .await
            .expect("202 while the recipient is down");
        sent.insert(v["message_id"].as_str().unwrap().to_string(), body);
    }
    // The sender is killed while it retries the dead recipient.
    wait_until("a to have tried", Duration::from_secs(20), || async {
        let id = sent.keys().next().unwrap();
        a.client
            .get(&format!("/v1/messages/{id}"))
            .await
            .is_ok_and(|v| v["attempts"].as_u64() >= Some(1))
    })
    .await;
    a.sigkill();
    b.start().await;
    a.start().await;

    let mut acked = HashSet::new();
    let got = drain(&b, &bob, n, &mut acked).await;
    for (id, body) in &sent {
        assert_eq!(&got[id].0, body, "body of {id} intact");
    }
    assert_eq!(
        got.len(),
        n,
        "every acknowledged message arrived, nothing extra"
    );
    wait_until(
        "every message to be processed at the sender",
        Duration::from_secs(30),
        || async {
            let mut all = true;
            for id in sent.keys() {
                all &= a
                    .client
                    .get(&format!("/v1/messages/{id}"))
                    .await
                    .is_ok_and(|v| v["status"] == "processed");
            }
            all
        },
    )
    .await;
    assert!(
        b.poll(&bob, 100).await.is_empty(),
        "nothing reaches the agent twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leased_but_unacked_messages_come_back_after_recipient_sigkill() {
    let root = tempfile::tempdir().unwrap();
    let (a, mut b, alice, bob) = pair(root.path()).await;
    let n = 20;
    let mut ids = Vec::new();
    for i in 0..n {
        let v = a
            .client
            .post(
                "/v1/messages",
                &json!({"from": alice, "to": bob, "body": {"i": i}}),
            )
            .await
            .unwrap();
        ids.push(v["message_id"].as_str().unwrap().to_string());
    }
    // Lease 10, ack 5 of them, then the recipient's node dies.
    let mut leased: Vec<Value> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while leased.len() < 10 {
        assert!(Instant::now() < deadline, "messages did not arrive");
        leased.extend(b.poll(&bob, 10 - leased.len()).await);
    }
    let mut acked = HashSet::new();
    for m in &leased[..5] {
        let id = m["message_id"].as_str().unwrap();
        b.ack(&bob, id).await;
        acked.insert(id.to_string());
    }
    let unacked: HashSet<String> = leased[5..]
        .iter()
        .map(|m| m["message_id"].as_str().unwrap().to_string())
        .collect();
    b.sigkill();
    b.start().await;

    let got = drain(&b, &bob, n - 5, &mut acked).await;
    for id in &unacked {
        assert_eq!(
            got[id].1, 2,
            "leased before the crash: offered a second time"
        );
    }
    assert_eq!(got.len() + 5, n);
    for id in &ids {
        assert!(got.contains_key(id) || acked.contains(id));
    }
}
