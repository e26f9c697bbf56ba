//! `/v1/agents`: register, withdraw, list and look up agents, and
//! `/v1/resolve` to see where an address routes.

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{ApiError, ApiJson};
use crate::discovery::{self, Entry, Filter, NamePattern, Query, Registration, matching};
use crate::identity::AgentId;
use crate::node::NodeHandle;
use crate::routing::{self, RouteError};
use crate::time::rfc3339;
use crate::wire::{AdState, Capability};

/// Default and largest page of `GET /v1/agents`.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 10_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapabilityIn {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    version: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterIn {
    handle: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    capabilities: Vec<CapabilityIn>,
    #[serde(default)]
    metadata: Option<Value>,
}

#[derive(Serialize)]
pub struct Registered {
    agent_id: String,
    handle: String,
    node_id: String,
}

#[derive(Serialize)]
pub struct CapabilityView {
    name: String,
    description: String,
    tags: Vec<String>,
    version: Option<String>,
}

#[derive(Serialize)]
pub struct AgentView {
    agent_id: String,
    handle: String,
    node_id: String,
    description: String,
    capabilities: Vec<CapabilityView>,
    metadata: Value,
    last_seen: String,
    local: bool,
    state: &'static str,
}

pub fn view(e: &Entry) -> AgentView {
    let b = &e.ad.body;
    AgentView {
        agent_id: b.agent_id.to_string(),
        handle: b.handle.clone(),
        node_id: b.node_id.clone(),
        description: b.description.clone(),
        capabilities: b
            .capabilities
            .iter()
            .map(|c| CapabilityView {
                name: c.name.clone(),
                description: c.description.clone(),
                tags: c.tags.clone(),
                version: c.version.clone(),
            })
            .collect(),
        metadata: serde_json::from_str(&b.metadata_json).unwrap_or(Value::Null),
        last_seen: rfc3339(b.issued_at_ms),
        local: e.local,
        state: match b.state {
            AdState::Active => "active",
            AdState::Offline => "offline",
            AdState::Withdrawn => "withdrawn",
        },
    }
}

pub async fn register(
    State(node): State<NodeHandle>,
    ApiJson(body): ApiJson<RegisterIn>,
) -> Result<(StatusCode, Json<Registered>), ApiError> {
    let metadata_json = match body.metadata {
        None | Some(Value::Null) => "{}".to_string(),
        Some(v @ Value::Object(_)) => v.to_string(),
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_metadata",
                "metadata must be a JSON object",
            ));
        }
    };
    let reg = Registration {
        handle: body.handle.clone(),
        description: body.description,
        capabilities: body
            .capabilities
            .into_iter()
            .map(|c| Capability {
                name: c.name,
                description: c.description,
                tags: c.tags,
                version: c.version,
            })
            .collect(),
        metadata_json,
    };
    let r = node
        .discovery()
        .register(reg)
        .await
        .map_err(discovery_error)?;
    let status = if r.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(Registered {
            agent_id: r.agent_id.to_string(),
            handle: body.handle,
            node_id: node.node_id().to_string(),
        }),
    ))
}

fn discovery_error(e: discovery::Error) -> ApiError {
    match e {
        discovery::Error::Invalid(discovery::AdError::BadHandle(_)) => {
            ApiError::bad_request("invalid_handle", e.to_string())
        }
        discovery::Error::Invalid(inner) => {
            ApiError::bad_request("invalid_agent", inner.to_string())
        }
        discovery::Error::NotLocal(_) => ApiError::not_found("agent_not_local", e.to_string()),
        discovery::Error::Store(s) => s.into(),
        discovery::Error::Stopped => ApiError::unavailable("the node is shutting down"),
    }
}

pub fn parse_agent_id(s: &str) -> Result<AgentId, ApiError> {
    s.parse().map_err(|e: crate::identity::Error| {
        ApiError::bad_request("invalid_agent_id", e.to_string())
    })
}

pub async fn withdraw(
    State(node): State<NodeHandle>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_agent_id(&id)?;
    node.discovery()
        .withdraw(&id)
        .await
        .map_err(discovery_error)?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn get_one(
    State(node): State<NodeHandle>,
    Path(id): Path<String>,
) -> Result<Json<AgentView>, ApiError> {
    let id = parse_agent_id(&id)?;
    match node.discovery().get(&id).await {
        Some(e) if e.ad.body.state != AdState::Withdrawn => Ok(Json(view(&e))),
        _ => Err(ApiError::not_found(
            "agent_not_found",
            format!("no agent {id} is known in the mesh"),
        )),
    }
}

/// Parse `capability`, `tag` (repeatable, or comma-separated), `q`,
/// `handle`, `version` and `limit` from a raw query string.
pub fn parse_query(raw: Option<&str>) -> Result<Query, ApiError> {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(raw.unwrap_or("")).map_err(|e| {
            ApiError::bad_request(
                "invalid_query",
                format!("cannot parse the query string: {e}"),
            )
        })?;
    let mut q = Query {
        limit: Some(DEFAULT_LIMIT),
        ..Query::default()
    };
    let mut filter = Filter::default();
    for (k, v) in pairs {
        match k.as_str() {
            "capability" => {
                filter.name = Some(
                    NamePattern::parse(&v)
                        .map_err(|e| ApiError::bad_request("invalid_capability", e.to_string()))?,
                )
            }
            "tag" | "tags" => filter.tags.extend(
                v.split(',')
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(str::to_string),
            ),
            "q" => q.text = Some(v),
            "handle" => q.handle = Some(v.trim_start_matches('@').to_string()),
            "version" => {
                filter.version = Some(
                    matching::parse_version_req(&v)
                        .map_err(|e| ApiError::bad_request("invalid_version", e.to_string()))?,
                )
            }
            "limit" => {
                let n: usize = v.parse().map_err(|_| {
                    ApiError::bad_request("invalid_limit", format!("limit {v:?} is not a number"))
                })?;
                q.limit = Some(n.clamp(1, MAX_LIMIT));
            }
            other => {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!(
                        "unknown parameter {other:?} (expected capability, tag, q, handle, version, limit)"
                    ),
                ));
            }
        }
    }
    q.filter = filter;
    Ok(q)
}

pub async fn list(
    State(node): State<NodeHandle>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Vec<AgentView>>, ApiError> {
    let q = parse_query(raw.as_deref())?;
    let found = node.discovery().find(&q).await;
    Ok(Json(found.iter().map(view).collect()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolveIn {
    to: Value,
}

#[derive(Serialize)]
pub struct RecipientView {
    agent_id: String,
    handle: String,
    node_id: String,
}

pub fn route_error(e: RouteError) -> ApiError {
    match e {
        RouteError::Invalid(m) => ApiError::bad_request("invalid_recipient", m),
        RouteError::NotFound(_) => ApiError::not_found("recipient_not_found", e.to_string()),
        RouteError::Ambiguous { .. } => ApiError::conflict("ambiguous_recipient", e.to_string()),
    }
}

/// `POST /v1/resolve {to}`: where would a message to `to` go?
pub async fn resolve(
    State(node): State<NodeHandle>,
    ApiJson(body): ApiJson<ResolveIn>,
) -> Result<Json<Vec<RecipientView>>, ApiError> {
    let addr = routing::parse_address(&body.to).map_err(route_error)?;
    let rs = node.router().resolve(&addr).await.map_err(route_error)?;
    Ok(Json(
        rs.into_iter()
            .map(|r| RecipientView {
                agent_id: r.agent_id.to_string(),
                handle: r.handle,
                node_id: r.node_id.to_string(),
            })
            .collect(),
    ))
}
