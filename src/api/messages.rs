//! `/v1/messages` and the agent inbox: send, track, long-poll, ack, SSE.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::agents::{parse_agent_id, route_error};
use super::{ApiError, ApiJson, ApiQuery};
use crate::delivery::{self, InboxMessage, SendRequest, ids};
use crate::node::NodeHandle;
use crate::routing;
use crate::time::rfc3339;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendIn {
    from: String,
    to: Value,
    body: Box<RawValue>,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    reply_to: Option<String>,
    #[serde(default)]
    ttl_secs: Option<u64>,
    #[serde(default)]
    idempotency_key: Option<String>,
    #[serde(default)]
    delegation: Option<Box<RawValue>>,
    #[serde(default)]
    trace_id: Option<String>,
}

fn delivery_error(e: delivery::Error) -> ApiError {
    use delivery::Error as E;
    match e {
        E::SenderNotLocal(_) => {
            ApiError::new(StatusCode::FORBIDDEN, "sender_not_local", e.to_string())
        }
        E::AgentNotLocal(_) => ApiError::not_found("agent_not_local", e.to_string()),
        E::Route(r) => route_error(r),
        E::BodyTooLarge { .. } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            e.to_string(),
        ),
        E::Invalid(m) => ApiError::bad_request("invalid_message", m),
        E::UnknownMessage(_) => ApiError::not_found("message_not_found", e.to_string()),
        E::NotPending { .. } => ApiError::conflict("not_pending", e.to_string()),
        E::Store(s) => s.into(),
        E::Stopped => ApiError::unavailable("the node is shutting down"),
    }
}

pub async fn send(
    State(node): State<NodeHandle>,
    ApiJson(b): ApiJson<SendIn>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let from = parse_agent_id(&b.from)?;
    let to = routing::parse_address(&b.to).map_err(route_error)?;
    let fan_out = matches!(
        to,
        routing::Address::Capability {
            strategy: routing::Strategy::All,
            ..
        }
    );
    let req = SendRequest {
        from,
        to,
        body_json: b.body.get().to_string(),
        subject: b.subject,
        reply_to: b.reply_to,
        ttl: b.ttl_secs.map(Duration::from_secs),
        idempotency_key: b.idempotency_key,
        delegation_json: b.delegation.map(|d| d.get().to_string()),
        trace_id: b.trace_id,
    };
    let sent = node.delivery().send(req).await.map_err(delivery_error)?;
    let body = if fan_out || sent.fan_out {
        json!({
            "status": "queued",
            "messages": sent.messages.iter().map(|(id, to)| json!({"message_id": id, "to": to})).collect::<Vec<_>>(),
            "idempotent_replay": sent.replayed,
        })
    } else {
        let (id, _) = sent
            .messages
            .first()
            .cloned()
            .ok_or_else(|| ApiError::internal("send returned no message"))?;
        json!({
            "message_id": id,
            "status": "queued",
            "recipients": sent.messages.iter().map(|(_, to)| to).collect::<Vec<_>>(),
            "idempotent_replay": sent.replayed,
        })
    };
    Ok((StatusCode::ACCEPTED, Json(body)))
}

#[derive(Serialize)]
struct HistoryView {
    status: &'static str,
    at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

pub async fn status(
    State(node): State<NodeHandle>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if !ids::is_valid(&id) {
        return Err(ApiError::bad_request(
            "invalid_message_id",
            format!("{id:?} is not a message id"),
        ));
    }
    let v = node.delivery().message(&id).map_err(delivery_error)?;
    let (s, t) = (&v.summary, &v.tracking);
    let history: Vec<HistoryView> = t
        .history
        .iter()
        .map(|h| HistoryView {
            status: h.status.as_str(),
            at: rfc3339(h.at_ms),
            detail: h.detail.clone(),
        })
        .collect();
    Ok(Json(json!({
        "message_id": v.id,
        "from": s.from,
        "from_handle": s.from_handle,
        "to": s.to,
        "to_handle": t.to_handle,
        "to_node": t.to_node,
        "subject": s.subject,
        "status": t.status.as_str(),
        "attempts": t.attempts,
        "created_at": rfc3339(t.created_at_ms),
        "updated_at": rfc3339(t.updated_at_ms),
        "expires_at": rfc3339(t.expires_at_ms),
        "history": history,
        "result": t.result_json.as_deref().and_then(|r| serde_json::from_str::<Value>(r).ok()),
        "last_error": t.last_error,
        "reply_to": s.reply_to,
        "replies": v.replies,
        "trace_id": s.trace_id,
    })))
}

/// The JSON an agent receives for one message.
pub fn inbox_json(m: &InboxMessage) -> Value {
    let e = &m.envelope;
    let raw = |s: &str| serde_json::from_str::<Value>(s).unwrap_or(Value::Null);
    json!({
        "message_id": e.id,
        "from": e.from,
        "from_handle": e.from_handle,
        "subject": e.subject,
        "body": raw(&e.body_json),
        "reply_to": e.reply_to,
        "delegation": e.delegation_json.as_deref().map(raw),
        "trace_id": e.trace_id,
        "received_at": rfc3339(m.received_at_ms),
        "expires_at": rfc3339(e.expires_at_ms),
        "delivery_count": m.delivery_count,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PollQuery {
    #[serde(default)]
    wait_secs: Option<u64>,
    #[serde(default)]
    max: Option<usize>,
}

pub async fn inbox(
    State(node): State<NodeHandle>,
    Path(agent): Path<String>,
    ApiQuery(q): ApiQuery<PollQuery>,
) -> Result<Json<Vec<Value>>, ApiError> {
    let agent = parse_agent_id(&agent)?;
    let wait = Duration::from_secs(q.wait_secs.unwrap_or(0).min(delivery::MAX_WAIT_SECS));
    let max = q.max.unwrap_or(100).clamp(1, delivery::MAX_POLL);
    let msgs = node
        .delivery()
        .poll(&agent, wait, max)
        .await
        .map_err(delivery_error)?;
    Ok(Json(msgs.iter().map(inbox_json).collect()))
}

pub async fn ack(
    State(node): State<NodeHandle>,
    Path((agent, id)): Path<(String, String)>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let agent = parse_agent_id(&agent)?;
    if !ids::is_valid(&id) {
        return Err(ApiError::bad_request(
            "invalid_message_id",
            format!("{id:?} is not a message id"),
        ));
    }
    let result = if body.iter().all(|b| b.is_ascii_whitespace()) {
        None
    } else {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct AckIn {
            #[serde(default)]
            result: Option<Box<RawValue>>,
        }
        let a: AckIn = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request("malformed_json", format!("ack body: {e}")))?;
        a.result.map(|r| r.get().to_string())
    };
    node.delivery()
        .ack(&agent, &id, result)
        .await
        .map_err(delivery_error)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AckItem {
    message_id: String,
    #[serde(default)]
    result: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AckManyIn {
    acks: Vec<AckItem>,
}

/// `POST /v1/agents/{id}/inbox/ack {"acks": [{message_id, result?}]}`: many
/// acks in one durable write; per-message results in order.
pub async fn ack_many(
    State(node): State<NodeHandle>,
    Path(agent): Path<String>,
    ApiJson(body): ApiJson<AckManyIn>,
) -> Result<Json<Value>, ApiError> {
    let agent = parse_agent_id(&agent)?;
    let ids: Vec<String> = body.acks.iter().map(|a| a.message_id.clone()).collect();
    let acks = body
        .acks
        .into_iter()
        .map(|a| (a.message_id, a.result.map(|r| r.get().to_string())))
        .collect();
    let results = node
        .delivery()
        .ack_many(&agent, acks)
        .await
        .map_err(delivery_error)?;
    let out: Vec<Value> = ids
        .iter()
        .zip(results)
        .map(|(id, r)| match r {
            Ok(()) => json!({"message_id": id, "ok": true}),
            Err(e) => {
                let e = delivery_error(e);
                json!({"message_id": id, "ok": false, "error": {"code": e.code, "message": e.message}})
            }
        })
        .collect();
    Ok(Json(json!({ "results": out })))
}

pub async fn events(
    State(node): State<NodeHandle>,
    Path(agent): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let agent = parse_agent_id(&agent)?;
    // Fail fast on an unknown agent instead of opening a stream.
    if !node.discovery().is_local(&agent) {
        return Err(delivery_error(delivery::Error::AgentNotLocal(agent)));
    }
    let stream = futures::stream::unfold((node, agent), |(node, agent)| async move {
        let batch = match node
            .delivery()
            .poll(&agent, Duration::from_secs(25), 16)
            .await
        {
            Ok(b) => b,
            Err(e) => {
                let ev = Event::default().event("error").data(e.to_string());
                return Some((vec![Ok(ev)], (node, agent)));
            }
        };
        let events: Vec<Result<Event, Infallible>> = batch
            .iter()
            .map(|m| {
                Ok(Event::default()
                    .event("message")
                    .id(m.envelope.id.clone())
                    .data(inbox_json(m).to_string()))
            })
            .collect();
        Some((events, (node, agent)))
    })
    .flat_map(futures::stream::iter);
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
