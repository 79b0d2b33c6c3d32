//! The HTTP transport shared by [`crate::App`] and [`crate::AgentClient`]: one place that adds
//! the credential, the trace headers, the constraints header, the request signature and the
//! `Idempotency-Key`, retries what is safe to retry, and turns answers into typed results.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::header::{HeaderName, HeaderValue};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;
use uuid::Uuid;

use crate::error::{self, Error};
use crate::{trace, Result};

/// A secret held by the client (an API key or a signing secret). Its `Debug` never prints it.
#[derive(Clone)]
pub(crate) struct Secret(pub(crate) String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[REDACTED]")
    }
}

/// How calls that are safe to repeat are retried: on `429` (after the server's `retry_after`),
/// `503` and connection failures, with exponential backoff.
///
/// A `429` whose `Retry-After` is longer than `max_delay` (an exhausted quota, typically) is not
/// waited for: the call fails at once with [`Error::RateLimited`] or [`Error::QuotaExceeded`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (0 turns retrying off).
    pub max_retries: u32,
    /// The first backoff; doubled for each further retry.
    pub base_delay: Duration,
    /// The longest single wait.
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
pub(crate) enum Kind {
    /// Creates something: carries an `Idempotency-Key`, the same on every retry.
    Create,
    /// Safe to repeat as it is (reads, pause/resume, delete, deprecate).
    Idempotent,
    /// Not repeated automatically (revocations, updates, arbitrary requests).
    Once,
}

/// A decoded success together with the response facts callers may care about.
#[derive(Debug, Clone)]
pub struct Response<T> {
    /// The decoded body.
    pub body: T,
    /// `true` when the key used is deprecated (`Keyward-Key-Deprecated: true`): time to rotate.
    pub key_deprecated: bool,
    /// `true` when this answer is an idempotent replay (plaintext secrets are then `null`).
    pub replayed: bool,
    /// The request id the server answered with (`X-Request-Id`).
    pub request_id: Option<String>,
}

/// The shared transport: one `reqwest::Client` (connection pool) and the client's settings.
#[derive(Debug, Clone)]
pub(crate) struct Transport {
    pub(crate) http: reqwest::Client,
    pub(crate) base: reqwest::Url,
    pub(crate) key: Secret,
    /// Signs every request when the key requires signatures (API.md §6.5).
    pub(crate) signing_secret: Option<Secret>,
    /// `Keyward-Constraints` for every request, when set.
    pub(crate) constraints: Option<String>,
    pub(crate) retry: RetryPolicy,
    /// This client's agent id, recorded as the parent by traces opened inside its own.
    pub(crate) agent_id: Option<String>,
    /// The last timestamp signed for each identical request. A signature covers method, path,
    /// timestamp and body only, so two identical requests in one second would sign the same and
    /// the server would refuse the second as a replay; each repeat takes the next free second
    /// instead (the server accepts 300 s either way).
    signed_at: Arc<Mutex<HashMap<u64, i64>>>,
}

/// One request, before the transport adds what every request carries.
pub(crate) struct Outgoing<'a> {
    pub(crate) method: Method,
    pub(crate) url: reqwest::Url,
    pub(crate) body: Option<Vec<u8>>,
    pub(crate) content_type: Option<&'a str>,
    pub(crate) headers: &'a [(HeaderName, HeaderValue)],
    pub(crate) kind: Kind,
}

impl Transport {
    pub(crate) fn new(base_url: &str, api_key: &str, timeout: Duration) -> Result<Transport> {
        let trimmed = base_url.trim().trim_end_matches('/');
        if !(trimmed.starts_with("http://") || trimmed.starts_with("https://")) {
            return Err(Error::Config(format!(
                "base URL `{trimmed}` must start with http:// or https://"
            )));
        }
        let base = reqwest::Url::parse(&format!("{trimmed}/"))
            .map_err(|e| Error::Config(format!("base URL `{trimmed}` is not a URL: {e}")))?;
        if api_key.trim().is_empty() {
            return Err(Error::Config("the API key is empty".into()));
        }
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .user_agent(concat!("keyward-client/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Transport {
            http,
            base,
            key: Secret(api_key.trim().to_string()),
            signing_secret: None,
            constraints: None,
            retry: RetryPolicy::default(),
            agent_id: None,
            signed_at: Default::default(),
        })
    }

    /// The base URL joined with an API path (`/v1/...`, query string included).
    pub(crate) fn url(&self, path: &str) -> Result<reqwest::Url> {
        self.base
            .join(path.trim_start_matches('/'))
            .map_err(|e| Error::Config(format!("bad path `{path}`: {e}")))
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

    /// Sends a request with the credential, trace, constraints, signature and (for creating
    /// calls) an `Idempotency-Key`, retrying when its kind allows. Answers the last response,
    /// whatever its status.
    pub(crate) async fn send(&self, out: Outgoing<'_>) -> Result<reqwest::Response> {
        // Every creating call carries an Idempotency-Key, reused on each retry, so a retry after
        // a lost answer can never create the resource twice.
        let idempotency_key = (out.kind == Kind::Create).then(|| Uuid::now_v7().to_string());
        // What is signed is the path as sent, query string included (API.md §6.5).
        let sign_path = match out.url.query() {
            Some(q) => format!("{}?{q}", out.url.path()),
            None => out.url.path().to_string(),
        };
        let bytes = out.body.clone().unwrap_or_default();
        let mut attempt = 0u32;
        loop {
            let mut rb = self
                .http
                .request(out.method.clone(), out.url.clone())
                .bearer_auth(&self.key.0);
            for (name, value) in out.headers {
                rb = rb.header(name, value);
            }
            if let Some(k) = &idempotency_key {
                rb = rb.header("Idempotency-Key", k);
            }
            if let Some(c) = &self.constraints {
                rb = rb.header("Keyward-Constraints", c);
            }
            for (name, value) in trace::headers() {
                rb = rb.header(name, value);
            }
            if let Some(secret) = &self.signing_secret {
                // A fresh signature per attempt: the server refuses a signature seen before.
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0);
                let ts = self.signing_second(out.method.as_str(), &sign_path, &bytes, now);
                let sig = keyward_core::token::sign_request(
                    &secret.0,
                    out.method.as_str(),
                    &sign_path,
                    ts,
                    &bytes,
                );
                rb = rb
                    .header("X-Timestamp", ts.to_string())
                    .header("X-Signature", sig);
            }
            if out.body.is_some() {
                if let Some(ct) = out.content_type {
                    rb = rb.header(reqwest::header::CONTENT_TYPE, ct);
                }
                rb = rb.body(bytes.clone());
            }
            let may_retry = out.kind != Kind::Once && attempt < self.retry.max_retries;
            let backoff = self
                .retry
                .base_delay
                .saturating_mul(2u32.saturating_pow(attempt))
                .min(self.retry.max_delay);
            match rb.send().await {
                Err(e) if may_retry && (e.is_connect() || e.is_timeout()) => {
                    tracing::debug!(error = %e, attempt, "retrying after a connection failure");
                    tokio::time::sleep(backoff).await;
                }
                Err(e) => return Err(e.into()),
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let told = retry_after(&resp).map(Duration::from_secs);
                    let wait = match status {
                        429 => told.or(Some(backoff)),
                        503 => Some(told.unwrap_or(backoff)),
                        _ => None,
                    };
                    match wait {
                        // A wait longer than the policy allows is not worth holding the caller
                        // for (an exhausted quota resets in hours): answer the 429 now.
                        Some(wait) if may_retry && wait <= self.retry.max_delay => {
                            tracing::debug!(status, ?wait, attempt, "retrying");
                            tokio::time::sleep(wait).await;
                        }
                        _ => return Ok(resp),
                    }
                }
            }
            attempt += 1;
        }
    }

    /// Sends one API call (a path under the base URL) and decodes the answer.
    pub(crate) async fn call<B: Serialize + ?Sized, T: DeserializeOwned>(
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
        let resp = self
            .send(Outgoing {
                method,
                url: self.url(path)?,
                body,
                content_type: Some("application/json"),
                headers: &[],
                kind,
            })
            .await?;
        decode(resp).await
    }
}

fn retry_after(resp: &reqwest::Response) -> Option<u64> {
    resp.headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// Whether a response says the key that made it is deprecated; logs a warning when it does.
pub(crate) fn key_deprecated(resp: &reqwest::Response) -> bool {
    let deprecated = resp
        .headers()
        .get("keyward-key-deprecated")
        .and_then(|v| v.to_str().ok())
        == Some("true");
    if deprecated {
        tracing::warn!("the API key in use is deprecated; rotate it");
    }
    deprecated
}

/// Decodes an API answer: the body on success, the matching [`Error`] otherwise.
pub(crate) async fn decode<T: DeserializeOwned>(resp: reqwest::Response) -> Result<Response<T>> {
    let status = resp.status();
    let key_deprecated = key_deprecated(&resp);
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let replayed = header("idempotent-replayed").as_deref() == Some("true");
    let request_id = header("x-request-id");
    let retry_after = retry_after(&resp);
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
    Err(error::from_response(status.as_u16(), &bytes, retry_after))
}
