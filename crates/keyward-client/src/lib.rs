//! The Rust SDK for Keyward.
//!
//! [`App`] is the operator client (a root key or any key with the right scopes): agents, keys,
//! verify and audit. [`AgentClient`] is the workload client (an agent key): `me()`, deriving
//! narrower keys, [`AgentClient::trace`] scopes and [`AgentClient::with_constraints`]. Both are
//! typed wrappers over the HTTP API in `../shared/API.md`, and every failure comes back as one
//! [`Error`] whose `Api` variant carries the contract's error code.
//!
//! What the SDK does for you:
//! - every creating call carries an `Idempotency-Key`, the same on each retry;
//! - calls that are safe to repeat are retried on `429` (after the server's `retry_after`),
//!   `503` and connection failures, with exponential backoff ([`RetryPolicy`]);
//! - with a signing secret, every request is signed (`X-Timestamp`, `X-Signature`);
//! - a deprecated key is flagged on every [`Response`] and logged as a `tracing` warning.
//!
//! ```no_run
//! # async fn demo() -> Result<(), keyward_client::Error> {
//! use keyward_client::{App, proto};
//! let app = App::new("http://127.0.0.1:8470", "kw_rk_...", "01a2...".parse().unwrap())?;
//! let created = app.agents().create(&proto::CreateAgentRequest {
//!     name: "support-bot".into(),
//!     ..Default::default()
//! }).await?;
//! println!("{} got key {}", created.agent.name, created.key.start);
//! # Ok(()) }
//! ```

use std::time::Duration;

use reqwest::Method;

mod constraints;
mod trace;

pub use constraints::Constraints;
use serde::de::DeserializeOwned;
use serde::Serialize;
pub use trace::TraceContext;
use uuid::Uuid;

pub use keyward_proto as proto;
use keyward_proto::{ErrorBody, ErrorCode};

/// Everything that can go wrong in a call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API answered with an error in the contract's shape.
    #[error("{code} ({status}): {message}")]
    Api {
        code: ErrorCode,
        message: String,
        status: u16,
        request_id: String,
        details: serde_json::Value,
        retry_after: Option<u64>,
    },
    /// The request did not complete (connection refused, timeout, TLS ...).
    #[error("transport error: {0}")]
    Transport(#[from] reqwest::Error),
    /// The answer was not what the contract promises.
    #[error("could not decode the response ({status}): {message}")]
    Decode { status: u16, message: String },
    /// The client was configured wrongly (missing URL or key, bad org id).
    #[error("configuration error: {0}")]
    Config(String),
}

impl Error {
    /// The API error code, when the server answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Api { code, .. } => Some(*code),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// An API key held by the client. Its `Debug` never prints it.
#[derive(Clone)]
struct ApiKey(String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[REDACTED]")
    }
}

/// How calls that are safe to repeat are retried: on `429` (after the server's `retry_after`),
/// `503` and connection failures, with exponential backoff.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Retries after the first attempt (0 turns retrying off).
    pub max_retries: u32,
    /// The first backoff; doubled for each further retry.
    pub base_delay: Duration,
    /// The longest single wait, whatever `retry_after` says.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 3,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(10),
        }
    }
}

/// Whether a call may be repeated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Creates something: carries an `Idempotency-Key`, the same on every retry.
    Create,
    /// Safe to repeat as it is (reads, pause/resume, delete).
    Idempotent,
    /// Not repeated automatically (revocations, updates).
    Once,
}

/// The HTTP transport shared by [`App`] and [`AgentClient`].
#[derive(Debug, Clone)]
struct Transport {
    http: reqwest::Client,
    base: String,
    key: ApiKey,
    /// Signs every request when the key requires signatures (API.md §6.5).
    signing_secret: Option<ApiKey>,
    /// `Keyward-Constraints` for every request, when set.
    constraints: Option<String>,
    retry: RetryPolicy,
    /// This client's agent id, recorded as the parent by traces opened inside its own.
    agent_id: Option<String>,
    /// The last timestamp signed for each identical request. A signature covers method, path,
    /// timestamp and body only, so two identical requests in one second would sign the same and
    /// the server would refuse the second as a replay; each repeat takes the next free second
    /// instead (the server accepts 300 s either way).
    signed_at: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<u64, i64>>>,
}

/// A decoded success together with the response facts callers may care about.
#[derive(Debug, Clone)]
pub struct Response<T> {
    pub body: T,
    /// `true` when the key used is deprecated (`Keyward-Key-Deprecated: true`): time to rotate.
    pub key_deprecated: bool,
    /// `true` when this answer is an idempotent replay (plaintext secrets are then `null`).
    pub replayed: bool,
    pub request_id: Option<String>,
}

impl Transport {
    fn new(base_url: &str, api_key: &str) -> Result<Transport> {
        let base = base_url.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(Error::Config(format!(
                "base URL `{base}` must start with http:// or https://"
            )));
        }
        if api_key.trim().is_empty() {
            return Err(Error::Config("the API key is empty".into()));
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .user_agent(concat!("keyward-client/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Transport {
            http,
            base,
            key: ApiKey(api_key.trim().to_string()),
            signing_secret: None,
            constraints: None,
            retry: RetryPolicy::default(),
            agent_id: None,
            signed_at: Default::default(),
        })
    }

    /// The timestamp to sign an identical request with: `now`, or the second after the last one
    /// used for it.
    fn signing_second(&self, method: &str, path: &str, body: &[u8], now: i64) -> i64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (method, path, body).hash(&mut h);
        let id = h.finish();
        let mut used = self.signed_at.lock().unwrap_or_else(|e| e.into_inner());
        if used.len() > 10_000 {
            used.retain(|_, t| *t >= now - 300);
        }
        let ts = match used.get(&id) {
            Some(last) if *last >= now => last + 1,
            _ => now,
        };
        used.insert(id, ts);
        ts
    }

    /// Sends one API call, retrying it when `kind` allows, and decodes the answer.
    async fn call<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        kind: Kind,
    ) -> Result<Response<T>> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| Error::Config(format!("cannot encode the request body: {e}")))?;
        // Every creating call carries an Idempotency-Key, reused on each retry, so a retry after
        // a lost answer can never create the resource twice.
        let idempotency_key = (kind == Kind::Create).then(|| Uuid::now_v7().to_string());
        let mut attempt = 0u32;
        loop {
            let mut rb = self
                .http
                .request(method.clone(), format!("{}{}", self.base, path))
                .bearer_auth(&self.key.0);
            if let Some(k) = &idempotency_key {
                rb = rb.header("Idempotency-Key", k);
            }
            if let Some(c) = &self.constraints {
                rb = rb.header("Keyward-Constraints", c);
            }
            for (name, value) in trace::headers() {
                rb = rb.header(name, value);
            }
            let bytes = body.clone().unwrap_or_default();
            if let Some(secret) = &self.signing_secret {
                // A fresh signature per attempt: the server refuses a signature seen before.
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0);
                let ts = self.signing_second(method.as_str(), path, &bytes, now);
                let sig =
                    keyward_core::token::sign_request(&secret.0, method.as_str(), path, ts, &bytes);
                rb = rb
                    .header("X-Timestamp", ts.to_string())
                    .header("X-Signature", sig);
            }
            if body.is_some() {
                rb = rb
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(bytes);
            }
            let may_retry = kind != Kind::Once && attempt < self.retry.max_retries;
            let backoff = self
                .retry
                .base_delay
                .saturating_mul(2u32.saturating_pow(attempt))
                .min(self.retry.max_delay);
            match rb.send().await {
                Err(e) if may_retry && (e.is_connect() || e.is_timeout()) => {
                    tokio::time::sleep(backoff).await;
                }
                Err(e) => return Err(e.into()),
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    if may_retry && (status == 429 || status == 503) {
                        let told = resp
                            .headers()
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse::<u64>().ok())
                            .map(Duration::from_secs);
                        let wait = told.unwrap_or(backoff).min(self.retry.max_delay);
                        tracing::debug!(status, ?wait, attempt, path, "retrying");
                        tokio::time::sleep(wait).await;
                    } else {
                        return decode(resp).await;
                    }
                }
            }
            attempt += 1;
        }
    }
}

async fn decode<T: DeserializeOwned>(resp: reqwest::Response) -> Result<Response<T>> {
    let status = resp.status();
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let key_deprecated = header("keyward-key-deprecated").as_deref() == Some("true");
    if key_deprecated {
        tracing::warn!("the API key in use is deprecated; rotate it");
    }
    let replayed = header("idempotent-replayed").as_deref() == Some("true");
    let request_id = header("x-request-id");
    let bytes = resp.bytes().await?;
    if status.is_success() {
        let body = serde_json::from_slice(&bytes).map_err(|e| Error::Decode {
            status: status.as_u16(),
            message: e.to_string(),
        })?;
        return Ok(Response {
            body,
            key_deprecated,
            replayed,
            request_id,
        });
    }
    match serde_json::from_slice::<ErrorBody>(&bytes) {
        Ok(e) => Err(Error::Api {
            code: e.error.code,
            message: e.error.message,
            status: e.error.status,
            request_id: e.error.request_id,
            details: e.error.details,
            retry_after: e.error.retry_after,
        }),
        Err(_) => Err(Error::Decode {
            status: status.as_u16(),
            message: String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned(),
        }),
    }
}

/// The operator client.
#[derive(Debug, Clone)]
pub struct App {
    t: Transport,
    org_id: Uuid,
}

impl App {
    /// A client for `org_id` at `base_url` using `api_key`.
    pub fn new(base_url: &str, api_key: &str, org_id: Uuid) -> Result<App> {
        Ok(App {
            t: Transport::new(base_url, api_key)?,
            org_id,
        })
    }

    /// Configured from `KEYWARD_BASE_URL` (default `http://127.0.0.1:8470`), `KEYWARD_API_KEY`
    /// and `KEYWARD_ORG_ID`.
    pub fn from_env() -> Result<App> {
        let base =
            std::env::var("KEYWARD_BASE_URL").unwrap_or_else(|_| "http://127.0.0.1:8470".into());
        let key = std::env::var("KEYWARD_API_KEY")
            .map_err(|_| Error::Config("KEYWARD_API_KEY is not set".into()))?;
        let org = std::env::var("KEYWARD_ORG_ID")
            .map_err(|_| Error::Config("KEYWARD_ORG_ID is not set".into()))?;
        let org_id = org
            .parse()
            .map_err(|_| Error::Config(format!("KEYWARD_ORG_ID `{org}` is not a UUID")))?;
        App::new(&base, &key, org_id)
    }

    pub fn org_id(&self) -> Uuid {
        self.org_id
    }

    /// Signs every request with this secret (for a key created with `requires_signature`).
    pub fn with_signing_secret(mut self, secret: &str) -> App {
        self.t.signing_secret = Some(ApiKey(secret.to_string()));
        self
    }

    /// Replaces the retry policy of calls that are safe to repeat.
    pub fn with_retry(mut self, retry: RetryPolicy) -> App {
        self.t.retry = retry;
        self
    }

    pub fn agents(&self) -> Agents<'_> {
        Agents { app: self }
    }

    pub fn keys(&self) -> Keys<'_> {
        Keys { t: &self.t }
    }

    pub fn audit(&self) -> Audit<'_> {
        Audit { app: self }
    }

    /// The org this client is for.
    pub async fn org(&self) -> Result<proto::Org> {
        self.get(&format!("/v1/orgs/{}", self.org_id)).await
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        Ok(self
            .t
            .call::<(), T>(Method::GET, path, None, Kind::Idempotent)
            .await?
            .body)
    }

    fn org_path(&self, suffix: &str) -> String {
        format!("/v1/orgs/{}{}", self.org_id, suffix)
    }
}

/// Options of [`Agents::list`].
#[derive(Debug, Clone, Default)]
pub struct ListAgents {
    pub include_revoked: bool,
    pub limit: Option<u32>,
    pub offset: Option<u64>,
}

/// `app.agents()`.
#[derive(Debug, Clone, Copy)]
pub struct Agents<'a> {
    app: &'a App,
}

impl Agents<'_> {
    /// Creates an agent and its first key (the plaintext is in `api_key`, once).
    pub async fn create(
        &self,
        req: &proto::CreateAgentRequest,
    ) -> Result<proto::CreateAgentResponse> {
        let path = self.app.org_path("/agents");
        Ok(self
            .app
            .t
            .call(Method::POST, &path, Some(req), Kind::Create)
            .await?
            .body)
    }

    /// One page of agents.
    pub async fn list(&self, opts: &ListAgents) -> Result<proto::AgentList> {
        let mut q = format!("?include_revoked={}", opts.include_revoked);
        if let Some(l) = opts.limit {
            q.push_str(&format!("&limit={l}"));
        }
        if let Some(o) = opts.offset {
            q.push_str(&format!("&offset={o}"));
        }
        self.app
            .get(&self.app.org_path(&format!("/agents{q}")))
            .await
    }

    /// Every agent, walking all pages.
    pub async fn list_all(&self, include_revoked: bool) -> Result<Vec<proto::Agent>> {
        let mut out = Vec::new();
        let mut offset = 0u64;
        loop {
            let page = self
                .list(&ListAgents {
                    include_revoked,
                    limit: Some(1000),
                    offset: Some(offset),
                })
                .await?;
            offset += page.agents.len() as u64;
            out.extend(page.agents);
            if !page.has_more {
                return Ok(out);
            }
        }
    }

    pub async fn get(&self, id: Uuid) -> Result<proto::Agent> {
        self.app
            .get(&self.app.org_path(&format!("/agents/{id}")))
            .await
    }

    /// The active or paused agent with this name, or `None`.
    pub async fn get_by_name(&self, name: &str) -> Result<Option<proto::Agent>> {
        match self
            .app
            .get(&self.app.org_path(&format!("/agents/by-name/{name}")))
            .await
        {
            Ok(a) => Ok(Some(a)),
            Err(Error::Api {
                code: ErrorCode::AgentNotFound,
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn update(&self, id: Uuid, req: &proto::UpdateAgentRequest) -> Result<proto::Agent> {
        let path = self.app.org_path(&format!("/agents/{id}"));
        Ok(self
            .app
            .t
            .call(Method::PATCH, &path, Some(req), Kind::Once)
            .await?
            .body)
    }

    pub async fn pause(&self, id: Uuid) -> Result<proto::Agent> {
        self.post_empty(&format!("/agents/{id}/pause"), Kind::Idempotent)
            .await
    }

    pub async fn resume(&self, id: Uuid) -> Result<proto::Agent> {
        self.post_empty(&format!("/agents/{id}/resume"), Kind::Idempotent)
            .await
    }

    /// Tombstones the agent: every key of it stops working at once.
    pub async fn delete(&self, id: Uuid) -> Result<proto::Agent> {
        let path = self.app.org_path(&format!("/agents/{id}"));
        Ok(self
            .app
            .t
            .call::<(), _>(Method::DELETE, &path, None, Kind::Idempotent)
            .await?
            .body)
    }

    pub async fn mint_key(
        &self,
        agent_id: Uuid,
        req: &proto::CreateKeyRequest,
    ) -> Result<proto::CreateKeyResponse> {
        let path = self.app.org_path(&format!("/agents/{agent_id}/keys"));
        Ok(self
            .app
            .t
            .call(Method::POST, &path, Some(req), Kind::Create)
            .await?
            .body)
    }

    pub async fn list_keys(&self, agent_id: Uuid) -> Result<proto::KeyList> {
        self.app
            .get(
                &self
                    .app
                    .org_path(&format!("/agents/{agent_id}/keys?limit=1000")),
            )
            .await
    }

    pub async fn deprecate_key(&self, agent_id: Uuid, key_id: Uuid) -> Result<proto::Key> {
        self.post_empty(
            &format!("/agents/{agent_id}/keys/{key_id}/deprecate"),
            Kind::Idempotent,
        )
        .await
    }

    pub async fn undeprecate_key(&self, agent_id: Uuid, key_id: Uuid) -> Result<proto::Key> {
        self.post_empty(
            &format!("/agents/{agent_id}/keys/{key_id}/undeprecate"),
            Kind::Idempotent,
        )
        .await
    }

    /// Revokes a key of the agent (and its derived keys); `force` allows revoking the last one.
    pub async fn revoke_key(
        &self,
        agent_id: Uuid,
        key_id: Uuid,
        force: bool,
    ) -> Result<proto::Key> {
        self.post_empty(
            &format!("/agents/{agent_id}/keys/{key_id}/revoke?force={force}"),
            Kind::Once,
        )
        .await
    }

    async fn post_empty<T: DeserializeOwned>(&self, suffix: &str, kind: Kind) -> Result<T> {
        let path = self.app.org_path(suffix);
        Ok(self
            .app
            .t
            .call::<(), T>(Method::POST, &path, None, kind)
            .await?
            .body)
    }
}

/// Key operations, shared by [`App::keys`] and [`AgentClient::keys`].
#[derive(Debug, Clone, Copy)]
pub struct Keys<'a> {
    t: &'a Transport,
}

impl Keys<'_> {
    /// Derives a short-lived key narrower than the calling key.
    pub async fn derive(&self, req: &proto::DeriveKeyRequest) -> Result<proto::CreateKeyResponse> {
        Ok(self
            .t
            .call(Method::POST, "/v1/keys/derive", Some(req), Kind::Create)
            .await?
            .body)
    }

    /// Rotates a key; the old one keeps working for `overlap_days` (default 7).
    pub async fn rotate(
        &self,
        key_id: Uuid,
        overlap_days: Option<u32>,
    ) -> Result<proto::CreateKeyResponse> {
        let body = proto::RotateKeyRequest { overlap_days };
        Ok(self
            .t
            .call(
                Method::POST,
                &format!("/v1/keys/{key_id}/rotate"),
                Some(&body),
                Kind::Create,
            )
            .await?
            .body)
    }

    pub async fn revoke(&self, key_id: Uuid, force: bool) -> Result<proto::Key> {
        let path = format!("/v1/keys/{key_id}/revoke?force={force}");
        Ok(self
            .t
            .call::<(), _>(Method::POST, &path, None, Kind::Once)
            .await?
            .body)
    }

    pub async fn get(&self, key_id: Uuid) -> Result<proto::Key> {
        Ok(self
            .t
            .call::<(), _>(
                Method::GET,
                &format!("/v1/keys/{key_id}"),
                None,
                Kind::Idempotent,
            )
            .await?
            .body)
    }

    pub async fn update(&self, key_id: Uuid, req: &proto::UpdateKeyRequest) -> Result<proto::Key> {
        Ok(self
            .t
            .call(
                Method::PATCH,
                &format!("/v1/keys/{key_id}"),
                Some(req),
                Kind::Once,
            )
            .await?
            .body)
    }

    /// Checks a key your service received. Always `Ok` for a well-formed request: look at
    /// `valid` and `code`.
    pub async fn verify(&self, req: &proto::VerifyRequest) -> Result<proto::VerifyResponse> {
        Ok(self
            .t
            .call(Method::POST, "/v1/keys/verify", Some(req), Kind::Idempotent)
            .await?
            .body)
    }
}

/// Filters of [`Audit::list`].
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub action: Option<String>,
    pub agent_id: Option<Uuid>,
    pub key_id: Option<Uuid>,
    pub run_id: Option<String>,
    pub thread_id: Option<String>,
    pub outcome: Option<String>,
    pub limit: Option<u32>,
    pub offset: Option<u64>,
}

/// `app.audit()`.
#[derive(Debug, Clone, Copy)]
pub struct Audit<'a> {
    app: &'a App,
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Audit<'_> {
    /// Audit events, newest first.
    pub async fn list(&self, q: &AuditQuery) -> Result<proto::AuditList> {
        let mut parts = Vec::new();
        let mut push = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                parts.push(format!("{k}={}", enc(&v)));
            }
        };
        push("action", q.action.clone());
        push("agent_id", q.agent_id.map(|u| u.to_string()));
        push("key_id", q.key_id.map(|u| u.to_string()));
        push("run_id", q.run_id.clone());
        push("thread_id", q.thread_id.clone());
        push("outcome", q.outcome.clone());
        push("limit", q.limit.map(|l| l.to_string()));
        push("offset", q.offset.map(|o| o.to_string()));
        let qs = if parts.is_empty() {
            String::new()
        } else {
            format!("?{}", parts.join("&"))
        };
        self.app
            .get(&self.app.org_path(&format!("/audit{qs}")))
            .await
    }
}

/// The workload client: an agent calling Keyward with its own key.
#[derive(Debug, Clone)]
pub struct AgentClient {
    t: Transport,
}

impl AgentClient {
    pub fn new(base_url: &str, api_key: &str) -> Result<AgentClient> {
        Ok(AgentClient {
            t: Transport::new(base_url, api_key)?,
        })
    }

    /// Configured from `KEYWARD_BASE_URL` (default `http://127.0.0.1:8470`), `KEYWARD_API_KEY`
    /// and, optionally, `KEYWARD_AGENT_ID`.
    pub fn from_env() -> Result<AgentClient> {
        let base =
            std::env::var("KEYWARD_BASE_URL").unwrap_or_else(|_| "http://127.0.0.1:8470".into());
        let key = std::env::var("KEYWARD_API_KEY")
            .map_err(|_| Error::Config("KEYWARD_API_KEY is not set".into()))?;
        let client = AgentClient::new(&base, &key)?;
        Ok(match std::env::var("KEYWARD_AGENT_ID") {
            Ok(id) if !id.trim().is_empty() => client.with_agent_id(id.trim()),
            _ => client,
        })
    }

    /// Records this client's agent id, so traces opened inside its own name it as their parent.
    /// `from_env` reads it from `KEYWARD_AGENT_ID`.
    pub fn with_agent_id(mut self, agent_id: impl Into<String>) -> AgentClient {
        self.t.agent_id = Some(agent_id.into());
        self
    }

    /// Signs every request with this secret (for a key created with `requires_signature`).
    pub fn with_signing_secret(mut self, secret: &str) -> AgentClient {
        self.t.signing_secret = Some(ApiKey(secret.to_string()));
        self
    }

    /// Replaces the retry policy of calls that are safe to repeat.
    pub fn with_retry(mut self, retry: RetryPolicy) -> AgentClient {
        self.t.retry = retry;
        self
    }

    /// A client whose every request carries these constraints: its key can only do less
    /// through it. Constraining a constrained client is refused (narrow once, explicitly).
    pub fn with_constraints(&self, c: Constraints) -> Result<AgentClient> {
        if self.t.constraints.is_some() {
            return Err(Error::Config(
                "this client is already constrained; build the narrower constraints from the original client".into(),
            ));
        }
        let mut t = self.t.clone();
        t.constraints = Some(c.header()?);
        Ok(AgentClient { t })
    }

    /// Runs `f` with every call made inside it (by any client) carrying this trace context.
    /// A trace opened inside another inherits its run and thread and records the outer agent
    /// as its parent.
    pub async fn trace<F: std::future::Future>(
        &self,
        ctx: TraceContext,
        f: F,
    ) -> Result<F::Output> {
        trace::scope(ctx, self.t.agent_id.clone(), f).await
    }

    /// The calling agent and key (works while the agent is paused, for self-diagnosis).
    pub async fn me(&self) -> Result<Response<proto::MeResponse>> {
        self.t
            .call::<(), _>(Method::GET, "/v1/me", None, Kind::Idempotent)
            .await
    }

    pub fn keys(&self) -> Keys<'_> {
        Keys { t: &self.t }
    }
}
