//! A small typed client of the local HTTP API, used by the CLI, the tests
//! and the benchmarks. It speaks JSON values so it stays a thin layer over
//! the documented contract rather than a second definition of it.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde_json::Value;

use crate::node::{API_ADDR_FILE, TOKEN_FILE};

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The node answered with an error.
    #[error("{status}: {code}: {message}")]
    Api {
        /// HTTP status.
        status: StatusCode,
        /// Error code from the body.
        code: String,
        /// Message from the body.
        message: String,
    },
    /// The node could not be reached or answered garbage.
    #[error("cannot talk to the node at {addr}: {source}")]
    Transport {
        /// API address.
        addr: String,
        /// Cause.
        source: reqwest::Error,
    },
    /// Local setup problem (no token, bad address).
    #[error("{0}")]
    Setup(String),
}

impl Error {
    /// HTTP status of an API error.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Error::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// API client bound to one node.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    /// Client for `addr` with `token`.
    pub fn new(addr: SocketAddr, token: impl Into<String>) -> Self {
        Client {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .pool_max_idle_per_host(64)
                .build()
                .unwrap_or_default(),
            base: format!("http://{addr}"),
            token: token.into(),
        }
    }

    /// Client for the node whose data dir is `dir`: the address and token
    /// are read from the files the node writes there, unless given.
    pub fn for_data_dir(
        dir: &Path,
        addr: Option<SocketAddr>,
        token: Option<String>,
    ) -> Result<Self, Error> {
        let addr = match addr {
            Some(a) => a,
            None => match std::fs::read_to_string(dir.join(API_ADDR_FILE)) {
                Ok(s) => s.trim().parse().map_err(|e| {
                    Error::Setup(format!(
                        "{}: bad address: {e}",
                        dir.join(API_ADDR_FILE).display()
                    ))
                })?,
                Err(_) => crate::config::DEFAULT_API_ADDR
                    .parse()
                    .map_err(|e| Error::Setup(format!("default API address: {e}")))?,
            },
        };
        let token = match token {
            Some(t) => t,
            None => std::fs::read_to_string(dir.join(TOKEN_FILE))
                .map(|t| t.trim().to_string())
                .map_err(|e| {
                    Error::Setup(format!(
                        "no API token: cannot read {} ({e}); pass --token or --data-dir",
                        dir.join(TOKEN_FILE).display()
                    ))
                })?,
        };
        Ok(Self::new(addr, token))
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Send a request; `Ok(None)` for 204, the JSON body otherwise.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<Option<Value>, Error> {
        let mut req = self
            .http
            .request(method, format!("{}{}", self.base, path))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let transport = |source| Error::Transport {
            addr: self.base.clone(),
            source,
        };
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        if status == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        let bytes = resp.bytes().await.map_err(transport)?;
        let value: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        if status.is_success() {
            return Ok(Some(value));
        }
        let code = value["error"]["code"]
            .as_str()
            .unwrap_or("unknown")
            .to_string();
        let message = value["error"]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| value.to_string());
        Err(Error::Api {
            status,
            code,
            message,
        })
    }

    /// POST raw bytes as `application/json` (for testing malformed input).
    pub async fn post_bytes(&self, path: &str, body: Vec<u8>) -> Result<Value, Error> {
        let transport = |source| Error::Transport {
            addr: self.base.clone(),
            source,
        };
        let resp = self
            .http
            .post(format!("{}{}", self.base, path))
            .bearer_auth(&self.token)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(transport)?;
        let status = resp.status();
        let value: Value = resp.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(value);
        }
        Err(Error::Api {
            status,
            code: value["error"]["code"]
                .as_str()
                .unwrap_or("unknown")
                .to_string(),
            message: value["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        })
    }

    /// Open a streaming GET (Server-Sent Events); read it with `chunk()`.
    pub async fn stream(&self, path: &str) -> Result<reqwest::Response, Error> {
        let resp = self
            .http
            .get(format!("{}{}", self.base, path))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(3600))
            .send()
            .await
            .map_err(|source| Error::Transport {
                addr: self.base.clone(),
                source,
            })?;
        if !resp.status().is_success() {
            let status = resp.status();
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            return Err(Error::Api {
                status,
                code: v["error"]["code"].as_str().unwrap_or("unknown").to_string(),
                message: v["error"]["message"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            });
        }
        Ok(resp)
    }

    /// GET a JSON document.
    pub async fn get(&self, path: &str) -> Result<Value, Error> {
        Ok(self
            .call(Method::GET, path, None::<&Value>)
            .await?
            .unwrap_or(Value::Null))
    }

    /// POST a JSON body.
    pub async fn post(&self, path: &str, body: &impl Serialize) -> Result<Value, Error> {
        Ok(self
            .call(Method::POST, path, Some(body))
            .await?
            .unwrap_or(Value::Null))
    }

    /// DELETE.
    pub async fn delete(&self, path: &str) -> Result<(), Error> {
        self.call(Method::DELETE, path, None::<&Value>)
            .await
            .map(|_| ())
    }
}
