//! Client commands of the `agentmesh` binary (not part of the library):
//! each talks to a running node over its local HTTP API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use agentmesh::client::Client;
use agentmesh::config;
use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};

/// How to reach the node.
#[derive(Args, Debug)]
pub struct ClientArgs {
    /// API address of the node (default: read from the data dir, else 127.0.0.1:7700).
    #[arg(long, value_name = "ADDR")]
    pub api: Option<SocketAddr>,
    /// Bearer token (default: <data_dir>/api-token).
    #[arg(long, env = "AGENTMESH_TOKEN")]
    pub token: Option<String>,
    /// Data directory of the node (to find its token and address).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

/// `agentmesh agents`.
#[derive(Args, Debug)]
pub struct AgentsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Capability name, or a prefix like `translate/*`.
    #[arg(long)]
    pub capability: Option<String>,
    /// Required tag; repeatable (all must match).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Free text, ranked by relevance.
    #[arg(long)]
    pub q: Option<String>,
    /// Exact handle.
    #[arg(long)]
    pub handle: Option<String>,
    /// Version requirement, e.g. `^1.2`.
    #[arg(long)]
    pub version: Option<String>,
    /// Most results.
    #[arg(long)]
    pub limit: Option<usize>,
}

/// `agentmesh register`.
#[derive(Args, Debug)]
pub struct RegisterArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Handle, `[a-z0-9][a-z0-9_-]{0,62}`.
    #[arg(long)]
    pub handle: String,
    /// What the agent is.
    #[arg(long, default_value = "")]
    pub description: String,
    /// A capability as `name` or `name:tag1,tag2`; repeatable.
    #[arg(long = "capability")]
    pub capabilities: Vec<String>,
}

/// `agentmesh send`.
#[derive(Args, Debug)]
pub struct SendArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Sending agent: a handle registered on this node, or its agent id.
    #[arg(long)]
    pub from: String,
    /// Recipient: `@handle`, `@handle#idprefix` or an agent id. Omit it to
    /// address by `--capability`.
    #[arg(long, required_unless_present = "capability")]
    pub to: Option<String>,
    /// Address any agent with this capability (or `prefix/*`).
    #[arg(long, conflicts_with = "to")]
    pub capability: Option<String>,
    /// Tag the capability must carry; repeatable.
    #[arg(long = "tag", requires = "capability")]
    pub tags: Vec<String>,
    /// Fan out to every provider of the capability (default: one).
    #[arg(long, requires = "capability")]
    pub all: bool,
    /// Subject line.
    #[arg(long)]
    pub subject: Option<String>,
    /// Id of the message this answers.
    #[arg(long)]
    pub reply_to: Option<String>,
    /// Time to live in seconds.
    #[arg(long)]
    pub ttl: Option<u64>,
    /// Idempotency key: the same key from the same agent sends once.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// The body, as JSON (quote text: '"hello"').
    pub body: String,
}

/// `agentmesh status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Message id.
    pub id: String,
}

/// `agentmesh inbox`.
#[derive(Args, Debug)]
pub struct InboxArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The agent: a handle registered on this node, or its agent id.
    pub agent: String,
    /// Acknowledge each message after printing it.
    #[arg(long)]
    pub ack: bool,
    /// Seconds to wait for messages.
    #[arg(long, default_value_t = 0)]
    pub wait: u64,
    /// Most messages.
    #[arg(long, default_value_t = 100)]
    pub max: usize,
}

/// A JSON value as display text.
fn s(v: &Value) -> String {
    v.as_str()
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string())
}

fn print_value(v: &Value, json: bool, human: impl Fn(&Value) -> String) {
    if json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        println!("{}", human(v));
    }
}

/// The data dir given, else the default one.
pub fn data_dir_or_default(d: Option<PathBuf>) -> Result<PathBuf> {
    match d {
        Some(d) => Ok(d),
        None => Ok(config::default_data_dir()?),
    }
}

fn client(c: &ClientArgs) -> Result<Client> {
    let dir = data_dir_or_default(c.data_dir.clone())?;
    Ok(Client::for_data_dir(&dir, c.api, c.token.clone())?)
}

/// A local agent's id from a handle (or an id given as is).
async fn local_agent(client: &Client, who: &str) -> Result<String> {
    if who.starts_with("agt_") {
        return Ok(who.to_string());
    }
    let handle = who.trim_start_matches('@');
    let qs = serde_urlencoded::to_string([("handle", handle)])?;
    let found = client.get(&format!("/v1/agents?{qs}")).await?;
    found
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["local"].as_bool() == Some(true))
        .and_then(|a| a["agent_id"].as_str().map(str::to_string))
        .with_context(|| format!("no agent with handle {handle:?} is registered on this node"))
}

pub async fn info(c: &ClientArgs) -> Result<()> {
    let v = client(c)?.get("/v1/node").await?;
    print_value(&v, c.json, |v| {
        format!(
            "node_id  {}\nmesh     {}\nversion  {}\npeers    {}\nagents   {}\nuptime   {}s\nlisten   {}",
            s(&v["node_id"]),
            s(&v["mesh"]),
            s(&v["version"]),
            v["peers_connected"],
            v["agents_local"],
            v["uptime_secs"],
            v["listen_addrs"]
                .as_array()
                .map(|a| a.iter().map(s).collect::<Vec<_>>().join(" "))
                .unwrap_or_default()
        )
    });
    Ok(())
}

pub async fn peers(c: &ClientArgs) -> Result<()> {
    let v = client(c)?.get("/v1/peers").await?;
    print_value(&v, c.json, |v| {
        let rows: Vec<String> = v
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                format!(
                    "{}  {}  {}",
                    s(&p["node_id"]),
                    if p["connected"].as_bool() == Some(true) {
                        "connected"
                    } else {
                        "known"
                    },
                    p["addrs"]
                        .as_array()
                        .map(|a| a.iter().map(s).collect::<Vec<_>>().join(" "))
                        .unwrap_or_default()
                )
            })
            .collect();
        if rows.is_empty() {
            "no peers".into()
        } else {
            rows.join("\n")
        }
    });
    Ok(())
}

pub async fn agents(a: &AgentsArgs) -> Result<()> {
    let mut pairs: Vec<(&str, String)> = Vec::new();
    if let Some(c) = &a.capability {
        pairs.push(("capability", c.clone()));
    }
    for t in &a.tags {
        pairs.push(("tag", t.clone()));
    }
    if let Some(q) = &a.q {
        pairs.push(("q", q.clone()));
    }
    if let Some(h) = &a.handle {
        pairs.push(("handle", h.clone()));
    }
    if let Some(v) = &a.version {
        pairs.push(("version", v.clone()));
    }
    if let Some(l) = a.limit {
        pairs.push(("limit", l.to_string()));
    }
    let qs = serde_urlencoded::to_string(&pairs).context("encoding the query")?;
    let v = client(&a.client)?.get(&format!("/v1/agents?{qs}")).await?;
    print_value(&v, a.client.json, |v| {
        let rows: Vec<String> = v
            .as_array()
            .into_iter()
            .flatten()
            .map(|ag| {
                let caps: Vec<String> = ag["capabilities"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|c| s(&c["name"]))
                    .collect();
                format!(
                    "@{:<20} {}  node {}{}\n    {}",
                    s(&ag["handle"]),
                    s(&ag["agent_id"]),
                    s(&ag["node_id"]),
                    if ag["local"].as_bool() == Some(true) {
                        " (local)"
                    } else {
                        ""
                    },
                    caps.join(", ")
                )
            })
            .collect();
        if rows.is_empty() {
            "no agents found".into()
        } else {
            rows.join("\n")
        }
    });
    Ok(())
}

pub async fn register(r: &RegisterArgs) -> Result<()> {
    let caps: Vec<Value> = r
        .capabilities
        .iter()
        .map(|c| {
            let (name, tags) = c.split_once(':').unwrap_or((c.as_str(), ""));
            let tags: Vec<&str> = tags.split(',').filter(|t| !t.is_empty()).collect();
            json!({"name": name, "tags": tags})
        })
        .collect();
    let body = json!({"handle": r.handle, "description": r.description, "capabilities": caps});
    let v = client(&r.client)?.post("/v1/agents", &body).await?;
    print_value(&v, r.client.json, |v| {
        format!("registered @{} as {}", s(&v["handle"]), s(&v["agent_id"]))
    });
    Ok(())
}

pub async fn send(a: &SendArgs) -> Result<()> {
    let body: Value = serde_json::from_str(&a.body).with_context(|| {
        format!(
            "the body {:?} is not valid JSON (quote text: '\"hello\"')",
            a.body
        )
    })?;
    let c = client(&a.client)?;
    let from = local_agent(&c, &a.from).await?;
    let to = match (&a.to, &a.capability) {
        (Some(t), _) => json!(t),
        (None, Some(cap)) => {
            json!({"capability": cap, "tags": a.tags, "strategy": if a.all { "all" } else { "one" }})
        }
        (None, None) => bail!("give --to or --capability"),
    };
    let mut req = json!({"from": from, "to": to, "body": body});
    for (k, v) in [
        ("subject", a.subject.clone().map(Value::from)),
        ("reply_to", a.reply_to.clone().map(Value::from)),
        ("ttl_secs", a.ttl.map(Value::from)),
        (
            "idempotency_key",
            a.idempotency_key.clone().map(Value::from),
        ),
    ] {
        if let Some(v) = v {
            req[k] = v;
        }
    }
    let v = c.post("/v1/messages", &req).await?;
    print_value(&v, a.client.json, |v| match v["messages"].as_array() {
        Some(list) => list
            .iter()
            .map(|m| format!("queued {} -> {}", s(&m["message_id"]), s(&m["to"])))
            .collect::<Vec<_>>()
            .join("\n"),
        None => format!("queued {}", s(&v["message_id"])),
    });
    Ok(())
}

pub async fn status(a: &StatusArgs) -> Result<()> {
    let v = client(&a.client)?
        .get(&format!("/v1/messages/{}", a.id))
        .await?;
    print_value(&v, a.client.json, |v| {
        let mut out = format!(
            "{}  {}  @{} -> @{}  attempts {}\n",
            s(&v["message_id"]),
            s(&v["status"]),
            s(&v["from_handle"]),
            s(&v["to_handle"]),
            v["attempts"]
        );
        for h in v["history"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "  {}  {:<11} {}\n",
                s(&h["at"]),
                s(&h["status"]),
                h["detail"].as_str().unwrap_or("")
            ));
        }
        if !v["result"].is_null() {
            out.push_str(&format!("  result: {}\n", v["result"]));
        }
        if let Some(e) = v["last_error"].as_str() {
            out.push_str(&format!("  last error: {e}\n"));
        }
        out.trim_end().to_string()
    });
    Ok(())
}

pub async fn inbox(a: &InboxArgs) -> Result<()> {
    let c = client(&a.client)?;
    let agent = local_agent(&c, &a.agent).await?;
    let wait = Duration::from_secs(a.wait).as_secs();
    let v = c
        .get(&format!(
            "/v1/agents/{agent}/inbox?wait_secs={wait}&max={}",
            a.max
        ))
        .await?;
    print_value(&v, a.client.json, |v| {
        let rows: Vec<String> = v
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                format!(
                    "{}  from @{}{}  (delivery {})\n  {}",
                    s(&m["message_id"]),
                    s(&m["from_handle"]),
                    m["subject"]
                        .as_str()
                        .map(|x| format!("  subject {x:?}"))
                        .unwrap_or_default(),
                    m["delivery_count"],
                    m["body"]
                )
            })
            .collect();
        if rows.is_empty() {
            "no messages".into()
        } else {
            rows.join("\n")
        }
    });
    if a.ack {
        for m in v.as_array().into_iter().flatten() {
            let id = s(&m["message_id"]);
            c.post(&format!("/v1/agents/{agent}/inbox/{id}/ack"), &json!({}))
                .await?;
        }
    }
    Ok(())
}
