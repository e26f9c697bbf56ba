//! The local HTTP API (see `API.md`): axum router, bearer-token auth, JSON
//! errors, body limits.
//!
//! `router(node)` builds the whole app without binding a socket, so tests
//! can drive it directly; `Node::start` serves it.

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};

use crate::node::NodeHandle;

mod agents;
mod error;
mod extract;
mod messages;
mod node;

pub use error::ApiError;
pub use extract::{ApiJson, ApiQuery};

/// Build the API router for a node.
pub fn router(node: NodeHandle) -> Router {
    let limit = node.config().api.max_body_bytes;
    let v1 = Router::new()
        .route("/node", get(node::info))
        .route("/peers", get(node::peers))
        .route("/agents", post(agents::register).get(agents::list))
        .route(
            "/agents/{id}",
            get(agents::get_one).delete(agents::withdraw),
        )
        .route("/resolve", post(agents::resolve))
        .route("/messages", post(messages::send))
        .route("/messages/{id}", get(messages::status))
        .route("/agents/{id}/inbox", get(messages::inbox))
        .route("/agents/{id}/inbox/ack", post(messages::ack_many))
        .route("/agents/{id}/inbox/{message_id}/ack", post(messages::ack))
        .route("/agents/{id}/events", get(messages::events))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(node.clone(), require_token));
    let metrics = if node.config().api.metrics_need_token {
        Router::new()
            .route("/metrics", get(node::metrics))
            .layer(middleware::from_fn_with_state(node.clone(), require_token))
    } else {
        Router::new().route("/metrics", get(node::metrics))
    };
    Router::new()
        .route("/healthz", get(node::healthz))
        .nest("/v1", v1)
        .merge(metrics)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(node)
}

async fn not_found() -> ApiError {
    ApiError::not_found("not_found", "no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this endpoint",
    )
}

/// Constant-time comparison, so the token cannot be guessed byte by byte.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(
    State(node): State<NodeHandle>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if same(t.trim().as_bytes(), node.api_token().as_bytes()) => {
            Ok(next.run(req).await)
        }
        Some(_) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "wrong bearer token",
        )),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing 'Authorization: Bearer <token>' header (the token is in <data_dir>/api-token)",
        )),
    }
}
