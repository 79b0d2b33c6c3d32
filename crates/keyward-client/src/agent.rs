//! The workload client, [`AgentClient`]: an agent calling with its own key. It can see itself
//! (`me()`), derive narrower keys, open trace scopes, narrow itself with constraints, and send
//! authenticated requests to your own services ([`AgentClient::request`]).

use reqwest::header::{HeaderName, HeaderValue};
use reqwest::Method;
use serde::Serialize;

use crate::app::Keys;
use crate::transport::{self, Kind, Outgoing, Secret, Transport};
use crate::{config::DEFAULT_TIMEOUT, TraceContext};
use crate::{proto, trace, ClientConfig, Constraints, Error, Response, Result, RetryPolicy};

/// The workload client: an agent calling Keyward (or your services) with its own key.
#[derive(Debug, Clone)]
pub struct AgentClient {
    t: Transport,
}

impl AgentClient {
    /// A client at `base_url` (e.g. `http://127.0.0.1:8470`) using the agent key `api_key`.
    pub fn new(base_url: &str, api_key: &str) -> Result<AgentClient> {
        Ok(AgentClient {
            t: Transport::new(base_url, api_key, DEFAULT_TIMEOUT)?,
        })
    }

    /// A client from a [`ClientConfig`] (its org id is not needed).
    pub fn from_config(config: &ClientConfig) -> Result<AgentClient> {
        let key = config
            .api_key()
            .ok_or_else(|| Error::Config("no API key (set KEYWARD_API_KEY)".into()))?;
        let mut t = Transport::new(&config.base_url, key, config.timeout)?;
        t.retry = config.retry;
        t.agent_id = config.agent_id.clone();
        t.signing_secret = config.signing_secret().map(|s| Secret(s.to_string()));
        Ok(AgentClient { t })
    }

    /// Configured from the environment: `KEYWARD_BASE_URL` (default `http://127.0.0.1:8470`),
    /// `KEYWARD_API_KEY` and, optionally, `KEYWARD_AGENT_ID` and `KEYWARD_SIGNING_SECRET`.
    pub fn from_env() -> Result<AgentClient> {
        AgentClient::from_config(&ClientConfig::from_env()?)
    }

    /// Records this client's agent id, so traces opened inside its own name it as their parent.
    pub fn with_agent_id(mut self, agent_id: impl Into<String>) -> AgentClient {
        self.t.agent_id = Some(agent_id.into());
        self
    }

    /// Signs every request with this secret (for a key created with `requires_signature`).
    pub fn with_signing_secret(mut self, secret: &str) -> AgentClient {
        self.t.signing_secret = Some(Secret(secret.to_string()));
        self
    }

    /// Replaces the retry policy of calls that are safe to repeat.
    pub fn with_retry(mut self, retry: RetryPolicy) -> AgentClient {
        self.t.retry = retry;
        self
    }

    /// A client whose every request carries these constraints (`Keyward-Constraints`): its key
    /// can only do less through it. Constraints need scopes, a rule or both; constraining a
    /// constrained client is refused (narrow once, from the original client).
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
    /// as its parent. Reserved or malformed metadata names fail here, before any call.
    pub async fn trace<F: std::future::Future>(
        &self,
        ctx: TraceContext,
        f: F,
    ) -> Result<F::Output> {
        trace::scope(ctx, self.t.agent_id.clone(), f).await
    }

    /// The calling agent and key. Works while the agent is paused or revoked (self-diagnosis),
    /// never for a revoked key; a root key gets [`Error::MeRequiresAgentKey`].
    pub async fn me(&self) -> Result<Response<proto::MeResponse>> {
        self.t
            .call::<(), _>(Method::GET, "/v1/me", None, Kind::Idempotent)
            .await
    }

    /// Key operations made with this client's key (`derive` above all).
    pub fn keys(&self) -> Keys<'_> {
        Keys {
            t: &self.t,
            org: None,
        }
    }

    /// A request to `url` carrying everything this client's calls carry: the key
    /// (`Authorization: Bearer`), the current trace headers, the constraints header and, with a
    /// signing secret, `X-Timestamp` / `X-Signature` computed over the request as sent.
    ///
    /// `url` is either a path (`/v1/...`, joined to the base URL: any Keyward endpoint the SDK
    /// has no method for) or an absolute `http(s)://` URL: one of your own services that checks
    /// the key it receives with `POST /v1/keys/verify` (passing the constraints and signature
    /// on, see [`crate::Keys::verify`]). Keyward has no gateway endpoint yet (API.md mentions
    /// one only as later work), so nothing is proxied: the request goes straight to `url`, and
    /// the key goes with it, so only send it to services you trust with the key.
    ///
    /// `GET`, `HEAD` and `OPTIONS` requests are retried like the SDK's own reads (429 with a
    /// short `Retry-After`, 503, connection failures); other methods are sent once.
    pub fn request(&self, method: Method, url: &str) -> AgentRequest {
        let url = if url.starts_with('/') {
            self.t.url(url)
        } else if url.starts_with("http://") || url.starts_with("https://") {
            reqwest::Url::parse(url).map_err(|e| Error::Config(format!("bad URL `{url}`: {e}")))
        } else {
            Err(Error::Config(format!(
                "`{url}` is neither a path (/...) nor an http(s):// URL"
            )))
        };
        AgentRequest {
            t: self.t.clone(),
            method,
            url,
            headers: Vec::new(),
            body: None,
            content_type: None,
        }
    }
}

/// A request being built by [`AgentClient::request`]; [`AgentRequest::send`] sends it.
#[derive(Debug)]
pub struct AgentRequest {
    t: Transport,
    method: Method,
    url: Result<reqwest::Url>,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Option<Vec<u8>>,
    content_type: Option<String>,
}

impl AgentRequest {
    /// Adds a header. An invalid name or value makes [`AgentRequest::send`] fail with
    /// [`Error::Config`] without sending anything.
    pub fn header(mut self, name: &str, value: &str) -> AgentRequest {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(n), Ok(v)) => self.headers.push((n, v)),
            _ => {
                self.url = Err(Error::Config(format!("invalid header `{name}`")));
            }
        }
        self
    }

    /// Sets a JSON body (and `Content-Type: application/json`).
    pub fn json<T: Serialize + ?Sized>(mut self, body: &T) -> AgentRequest {
        match serde_json::to_vec(body) {
            Ok(b) => {
                self.body = Some(b);
                self.content_type = Some("application/json".into());
            }
            Err(e) => self.url = Err(Error::Config(format!("cannot encode the body: {e}"))),
        }
        self
    }

    /// Sets a raw body with its content type.
    pub fn body(mut self, content_type: &str, body: impl Into<Vec<u8>>) -> AgentRequest {
        self.body = Some(body.into());
        self.content_type = Some(content_type.to_string());
        self
    }

    /// Sends the request and answers the response as it came, whatever its status (a service's
    /// answers need not be in Keyward's error shape). Fails only when the request could not be
    /// built or sent. A deprecated key is logged as a `tracing` warning, as for every call.
    pub async fn send(self) -> Result<reqwest::Response> {
        let resp = self.send_raw().await?;
        transport::key_deprecated(&resp);
        Ok(resp)
    }

    /// Sends the request and decodes a Keyward-shaped answer: the JSON body on success, the
    /// typed [`Error`] otherwise. For Keyward endpoints the SDK has no method for.
    pub async fn send_json<T: serde::de::DeserializeOwned>(self) -> Result<Response<T>> {
        transport::decode(self.send_raw().await?).await
    }

    async fn send_raw(self) -> Result<reqwest::Response> {
        let url = self.url?;
        let kind = if matches!(self.method, Method::GET | Method::HEAD | Method::OPTIONS) {
            Kind::Idempotent
        } else {
            Kind::Once
        };
        self.t
            .send(Outgoing {
                method: self.method,
                url,
                body: self.body,
                content_type: self.content_type.as_deref(),
                headers: &self.headers,
                kind,
            })
            .await
    }
}
