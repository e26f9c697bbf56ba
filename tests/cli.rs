//! The real binary: defaults, restart, and bad input exits with a message.

mod common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use agentmesh::client::Client;
use common::wait_for;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_agentmesh"));
    c.env_remove("RUST_LOG");
    c
}

fn run(args: &[&str], data: &Path) -> Output {
    bin()
        .args(args)
        .env("AGENTMESH_DATA", data)
        .env("HOME", data)
        .output()
        .expect("run agentmesh")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn bad_listen_flag_exits_2_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(&["node", "--listen", "not-an-addr"], dir.path());
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("not-an-addr"), "{}", stderr(&o));
}

#[test]
fn unreadable_config_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let o = run(&["node", "--config", missing.to_str().unwrap()], dir.path());
    assert!(!o.status.success());
    assert!(stderr(&o).contains("nope.toml"), "{}", stderr(&o));
}

#[test]
fn bad_toml_names_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "mesh = \"x\"\n[network\nlisten = 3\n").unwrap();
    let o = run(&["node", "--config", cfg.to_str().unwrap()], dir.path());
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("bad.toml") && e.contains("line"), "{e}");

    std::fs::write(&cfg, "[api]\nlisten_port = 3\n").unwrap();
    let o = run(&["node", "--config", cfg.to_str().unwrap()], dir.path());
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("listen_port"), "{}", stderr(&o));

    std::fs::write(&cfg, "mesh = \"Bad Mesh\"\n").unwrap();
    let o = run(&["node", "--config", cfg.to_str().unwrap()], dir.path());
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("mesh name"), "{}", stderr(&o));
}

#[test]
fn corrupt_database_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("agentmesh.redb"), vec![0xA5u8; 64 * 1024]).unwrap();
    let o = run(
        &[
            "node",
            "--no-mdns",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--api",
            "127.0.0.1:0",
        ],
        dir.path(),
    );
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("agentmesh.redb") && e.contains("refusing to start"),
        "{e}"
    );
    // The file is left alone for the operator.
    assert_eq!(
        std::fs::read(dir.path().join("agentmesh.redb"))
            .unwrap()
            .len(),
        64 * 1024
    );
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_default(data: &Path) -> Running {
    // A stale address from an earlier run must not be mistaken for this one.
    let _ = std::fs::remove_file(data.join("api-addr"));
    // Deliberately no flags at all: built-in defaults (ports fall back if taken).
    Running(
        bin()
            .arg("node")
            .env("AGENTMESH_DATA", data)
            .env("HOME", data)
            .stdout(Stdio::null())
            .stderr(node_log(data))
            .spawn()
            .expect("spawn node"),
    )
}

/// The node's stderr goes to a file in its data dir, shown when a wait
/// for it times out.
fn node_log(data: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data.join("node-stderr.log"))
        .expect("node log file")
}

async fn node_id_of(data: &Path) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut last = String::from("no API address written yet");
    while std::time::Instant::now() < deadline {
        match Client::for_data_dir(data, None, None) {
            Err(e) => last = e.to_string(),
            Ok(client) => match client.get("/healthz").await {
                Err(e) => last = format!("/healthz: {e}"),
                Ok(health) => {
                    assert_eq!(health["status"], "ok", "{health}");
                    match client.get("/v1/node").await {
                        Ok(v) => {
                            if let Some(id) = v["node_id"].as_str() {
                                return id.to_string();
                            }
                            last = format!("/v1/node answered {v}");
                        }
                        Err(e) => last = format!("/v1/node: {e}"),
                    }
                }
            },
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = std::fs::read_to_string(data.join("node-stderr.log")).unwrap_or_default();
    panic!("the node never answered /v1/node within 30 s (last: {last}); its stderr:\n{log}");
}

fn sigterm(child: &Child) {
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

#[tokio::test]
async fn node_runs_on_defaults_and_keeps_its_id() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = start_default(dir.path());
    let id1 = node_id_of(dir.path()).await;
    sigterm(&first.0);
    let status = first.0.wait().unwrap();
    assert!(status.success(), "graceful shutdown exits 0, got {status}");

    let _second = start_default(dir.path());
    let id2 = node_id_of(dir.path()).await;
    assert_eq!(id1, id2);
    let token = std::fs::read_to_string(dir.path().join("api-token")).unwrap();
    assert!(token.trim().len() >= 16);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for f in ["api-token", "node.key"] {
            let mode = std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{f} must be private");
        }
    }
}

#[test]
fn init_writes_a_config_the_node_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(&["init", "--mesh", "lab"], dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(dir.path().join("config.toml")).unwrap();
    assert!(text.contains("mesh = \"lab\""));
    let again = run(&["init"], dir.path());
    assert!(
        !again.status.success(),
        "init must not overwrite without --force"
    );
    assert!(stderr(&again).contains("already exists"));
}

#[tokio::test]
async fn cli_registers_sends_receives_and_tracks() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let mut node = Running(
        bin()
            .args([
                "node",
                "--no-mdns",
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--api",
                "127.0.0.1:0",
            ])
            .env("AGENTMESH_DATA", data)
            .env("HOME", data)
            .stdout(Stdio::null())
            .stderr(node_log(data))
            .spawn()
            .unwrap(),
    );
    node_id_of(data).await;
    let cli = |args: &[&str]| {
        let o = run(args, data);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    cli(&["register", "--handle", "alice"]);
    cli(&["register", "--handle", "bob", "--capability", "echo:test"]);
    let out = cli(&["agents", "--capability", "echo"]);
    assert!(out.contains("@bob"), "{out}");
    let out = cli(&[
        "send",
        "--from",
        "alice",
        "--to",
        "@bob",
        "--subject",
        "hi",
        r#"{"n": 1}"#,
    ]);
    let id = out.split_whitespace().nth(1).unwrap().to_string();
    let out = cli(&["inbox", "bob", "--ack", "--wait", "5"]);
    assert!(out.contains(&id) && out.contains(r#"{"n":1}"#), "{out}");
    let client = Client::for_data_dir(data, None, None).unwrap();
    wait_for("processed", Duration::from_secs(10), || async {
        (client.get(&format!("/v1/messages/{id}")).await.ok()?["status"] == "processed")
            .then_some(())
    })
    .await;
    let out = cli(&["status", &id]);
    assert!(
        out.contains("processed") && out.contains("delivered"),
        "{out}"
    );
    let bad = run(
        &["send", "--from", "alice", "--to", "@bob", "not json"],
        data,
    );
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("not valid JSON"), "{}", stderr(&bad));
    let _ = node.0.kill();
}
