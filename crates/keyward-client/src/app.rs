//! The operator client, [`App`], and the namespaces shared with the workload client: agents,
//! keys and audit (API.md §4, §5, §7).

use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::Method;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::pages::{Pages, MAX_PAGE};
use crate::transport::{Kind, Secret, Transport};
use crate::{proto, ClientConfig, Error, Result, RetryPolicy};

/// The operator client: a root key (or any key with the scopes the calls need) acting on one org.
#[derive(Debug, Clone)]
pub struct App {
    pub(crate) t: Transport,
    org_id: Uuid,
}

impl App {
    /// A client for `org_id` at `base_url` (e.g. `http://127.0.0.1:8470`) using `api_key`.
    pub fn new(base_url: &str, api_key: &str, org_id: Uuid) -> Result<App> {
        Ok(App {
            t: Transport::new(base_url, api_key, crate::config::DEFAULT_TIMEOUT)?,
            org_id,
        })
    }

    /// A client from a [`ClientConfig`]; the org id is required.
    pub fn from_config(config: &ClientConfig) -> Result<App> {
        let org_id = config
            .org_id
            .ok_or_else(|| Error::Config("no org id (set KEYWARD_ORG_ID)".into()))?;
        let key = config
            .api_key()
            .ok_or_else(|| Error::Config("no API key (set KEYWARD_API_KEY)".into()))?;
        let mut t = Transport::new(&config.base_url, key, config.timeout)?;
        t.retry = config.retry;
        t.signing_secret = config.signing_secret().map(|s| Secret(s.to_string()));
        Ok(App { t, org_id })
    }

    /// Configured from the environment: `KEYWARD_BASE_URL` (default `http://127.0.0.1:8470`),
    /// `KEYWARD_API_KEY` and `KEYWARD_ORG_ID` (see [`ClientConfig::from_env`]).
    pub fn from_env() -> Result<App> {
        App::from_config(&ClientConfig::from_env()?)
    }

    /// The org this client acts on.
    pub fn org_id(&self) -> Uuid {
        self.org_id
    }

    /// Signs every request with this secret (for a key created with `requires_signature`).
    pub fn with_signing_secret(mut self, secret: &str) -> App {
        self.t.signing_secret = Some(Secret(secret.to_string()));
        self
    }

    /// Replaces the retry policy of calls that are safe to repeat.
    pub fn with_retry(mut self, retry: RetryPolicy) -> App {
        self.t.retry = retry;
        self
    }

    /// Agents of the org: create, list, get, update, pause, resume, delete, and their keys.
    pub fn agents(&self) -> Agents<'_> {
        Agents { app: self }
    }

    /// Keys: derive, rotate, revoke, get, update, usage, verify, and the org's key list.
    pub fn keys(&self) -> Keys<'_> {
        Keys {
            t: &self.t,
            org: Some(self.org_id),
        }
    }

    /// The org's audit log.
    pub fn audit(&self) -> Audit<'_> {
        Audit { app: self }
    }

    /// The org this client is for (`GET /v1/orgs/{org}`).
    pub async fn org(&self) -> Result<proto::Org> {
        self.get(&self.org_path("")).await
    }

    /// Changes the org's name and/or policy (`PATCH /v1/orgs/{org}`, scope `org:admin`).
    pub async fn update_org(&self, req: &proto::UpdateOrgRequest) -> Result<proto::Org> {
        Ok(self
            .t
            .call(Method::PATCH, &self.org_path(""), Some(req), Kind::Once)
            .await?
            .body)
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        get(&self.t, path).await
    }

    fn org_path(&self, suffix: &str) -> String {
        format!("/v1/orgs/{}{}", self.org_id, suffix)
    }
}

async fn get<T: DeserializeOwned>(t: &Transport, path: &str) -> Result<T> {
    Ok(t.call::<(), T>(Method::GET, path, None, Kind::Idempotent)
        .await?
        .body)
}

/// Percent-encodes a query value.
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

/// Builds `?a=1&b=2` from the parameters that are set (or "" when none is).
fn query(params: &[(&str, Option<String>)]) -> String {
    let parts: Vec<String> = params
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", enc(v))))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

fn ts(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Options of [`Agents::list`].
#[derive(Debug, Clone, Default)]
pub struct ListAgents {
    /// Include revoked agents (tombstones).
    pub include_revoked: bool,
    /// Page size, 1..=1000 (server default 100).
    pub limit: Option<u32>,
    /// Items to skip (default 0).
    pub offset: Option<u64>,
}

/// `app.agents()`: the org's agents and their keys.
#[derive(Debug, Clone, Copy)]
pub struct Agents<'a> {
    app: &'a App,
}

impl<'a> Agents<'a> {
    /// Creates an agent and its first key; the plaintext key is in `api_key`, once.
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

    /// One page of agents, ordered by creation.
    pub async fn list(&self, opts: &ListAgents) -> Result<proto::AgentList> {
        let q = query(&[
            ("include_revoked", Some(opts.include_revoked.to_string())),
            ("limit", opts.limit.map(|l| l.to_string())),
            ("offset", opts.offset.map(|o| o.to_string())),
        ]);
        self.app
            .get(&self.app.org_path(&format!("/agents{q}")))
            .await
    }

    /// Every page of agents from `opts.offset` on (`opts.limit` per page, default 1000).
    pub fn pages(&self, opts: ListAgents) -> Pages<'a, proto::Agent> {
        let agents = *self;
        let limit = opts.limit.unwrap_or(MAX_PAGE);
        Pages::new(opts.offset.unwrap_or(0), limit, move |offset, limit| {
            let opts = ListAgents {
                include_revoked: opts.include_revoked,
                limit: Some(limit),
                offset: Some(offset),
            };
            Box::pin(async move {
                let page = agents.list(&opts).await?;
                Ok((page.agents, page.has_more))
            })
        })
    }

    /// Every agent, walking all pages.
    pub async fn list_all(&self, include_revoked: bool) -> Result<Vec<proto::Agent>> {
        self.pages(ListAgents {
            include_revoked,
            ..Default::default()
        })
        .all()
        .await
    }

    /// One agent (revoked ones too, with `status: revoked`).
    pub async fn get(&self, id: Uuid) -> Result<proto::Agent> {
        self.app
            .get(&self.app.org_path(&format!("/agents/{id}")))
            .await
    }

    /// The active or paused agent with this name, or `None`.
    pub async fn get_by_name(&self, name: &str) -> Result<Option<proto::Agent>> {
        match self
            .app
            .get(&self.app.org_path(&format!("/agents/by-name/{}", enc(name))))
            .await
        {
            Ok(a) => Ok(Some(a)),
            Err(Error::AgentNotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Changes display name, metadata, policy or scopes. Scopes may only broaden: dropping one
    /// fails with [`Error::ScopeNarrowingNotSupported`].
    pub async fn update(&self, id: Uuid, req: &proto::UpdateAgentRequest) -> Result<proto::Agent> {
        let path = self.app.org_path(&format!("/agents/{id}"));
        Ok(self
            .app
            .t
            .call(Method::PATCH, &path, Some(req), Kind::Once)
            .await?
            .body)
    }

    /// Pauses the agent: its keys are refused with `AGENT_PAUSED` (but `me()` still answers).
    pub async fn pause(&self, id: Uuid) -> Result<proto::Agent> {
        self.post_empty(&format!("/agents/{id}/pause"), Kind::Idempotent)
            .await
    }

    /// Resumes a paused agent.
    pub async fn resume(&self, id: Uuid) -> Result<proto::Agent> {
        self.post_empty(&format!("/agents/{id}/resume"), Kind::Idempotent)
            .await
    }

    /// Tombstones the agent: every key of it, and every key derived from them, stops working at
    /// once. Answers the tombstone; repeating it answers the same.
    pub async fn delete(&self, id: Uuid) -> Result<proto::Agent> {
        let path = self.app.org_path(&format!("/agents/{id}"));
        Ok(self
            .app
            .t
            .call::<(), _>(Method::DELETE, &path, None, Kind::Idempotent)
            .await?
            .body)
    }

    /// Mints another key for the agent; the plaintext is in `api_key`, once.
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

    /// Every key of the agent (revoked and derived ones too), oldest first.
    pub async fn list_keys(&self, agent_id: Uuid) -> Result<proto::KeyList> {
        self.app
            .get(
                &self
                    .app
                    .org_path(&format!("/agents/{agent_id}/keys?limit={MAX_PAGE}")),
            )
            .await
    }

    /// Marks a key deprecated: it still works, but every answer to it says it is time to rotate.
    pub async fn deprecate_key(&self, agent_id: Uuid, key_id: Uuid) -> Result<proto::Key> {
        self.post_empty(
            &format!("/agents/{agent_id}/keys/{key_id}/deprecate"),
            Kind::Idempotent,
        )
        .await
    }

    /// Clears a key's deprecation.
    pub async fn undeprecate_key(&self, agent_id: Uuid, key_id: Uuid) -> Result<proto::Key> {
        self.post_empty(
            &format!("/agents/{agent_id}/keys/{key_id}/undeprecate"),
            Kind::Idempotent,
        )
        .await
    }

    /// Revokes a key of the agent (and the keys derived from it). Revoking the agent's last
    /// active key fails with [`Error::LastActiveKey`] unless `force` is set.
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

/// Options of [`Keys::list`] (the org's keys).
#[derive(Debug, Clone, Default)]
pub struct ListKeys {
    /// Only keys of this agent.
    pub agent_id: Option<Uuid>,
    /// Only keys of this kind: `root`, `agent` or `derived`.
    pub kind: Option<String>,
    /// Include revoked keys.
    pub include_revoked: bool,
    /// Page size, 1..=1000 (server default 100).
    pub limit: Option<u32>,
    /// Items to skip (default 0).
    pub offset: Option<u64>,
}

/// The bucket size of [`Keys::usage`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Granularity {
    /// One bucket per hour (the server's default).
    #[default]
    Hour,
    /// One bucket per day.
    Day,
}

/// Options of [`Keys::usage`].
#[derive(Debug, Clone, Default)]
pub struct UsageQuery {
    /// Hourly or daily buckets (server default: hourly).
    pub granularity: Option<Granularity>,
    /// The first instant counted.
    pub since: Option<DateTime<Utc>>,
    /// The instant counting stops.
    pub until: Option<DateTime<Utc>>,
}

/// Key operations, from [`App::keys`] or [`crate::AgentClient::keys`]: each acts with the
/// client's own key, so an agent key can derive but (without the scopes) not revoke.
#[derive(Debug, Clone, Copy)]
pub struct Keys<'a> {
    pub(crate) t: &'a Transport,
    /// The org, for the org-level calls ([`Keys::list`], [`Keys::create_root`]); `None` on an
    /// agent client, which does not know its org until it asks `me()`.
    pub(crate) org: Option<Uuid>,
}

impl<'a> Keys<'a> {
    /// Derives a short-lived key narrower than the calling key (scope `keys:derive`).
    pub async fn derive(&self, req: &proto::DeriveKeyRequest) -> Result<proto::CreateKeyResponse> {
        Ok(self
            .t
            .call(Method::POST, "/v1/keys/derive", Some(req), Kind::Create)
            .await?
            .body)
    }

    /// Rotates a key: a successor is minted and the old key keeps working for `overlap_days`
    /// (0..=30, default 7), deprecated.
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

    /// Revokes a key and the keys derived from it. The agent's last active key needs `force`.
    pub async fn revoke(&self, key_id: Uuid, force: bool) -> Result<proto::Key> {
        let path = format!("/v1/keys/{key_id}/revoke?force={force}");
        Ok(self
            .t
            .call::<(), _>(Method::POST, &path, None, Kind::Once)
            .await?
            .body)
    }

    /// One key of the caller's org.
    pub async fn get(&self, key_id: Uuid) -> Result<proto::Key> {
        get(self.t, &format!("/v1/keys/{key_id}")).await
    }

    /// Changes a key's name, allowlist, rate limit, quota, alert thresholds or metadata.
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

    /// A key's usage: totals, hourly or daily buckets, and its quota state.
    pub async fn usage(&self, key_id: Uuid, q: &UsageQuery) -> Result<proto::UsageResponse> {
        let qs = query(&[
            (
                "granularity",
                q.granularity.map(|g| {
                    match g {
                        Granularity::Hour => "hour",
                        Granularity::Day => "day",
                    }
                    .to_string()
                }),
            ),
            ("since", q.since.as_ref().map(ts)),
            ("until", q.until.as_ref().map(ts)),
        ]);
        get(self.t, &format!("/v1/keys/{key_id}/usage{qs}")).await
    }

    /// Checks a key your service received (scope `keys:verify`). Always `Ok` for a well-formed
    /// request, even when the key fails: look at `valid` and `code`.
    pub async fn verify(&self, req: &proto::VerifyRequest) -> Result<proto::VerifyResponse> {
        Ok(self
            .t
            .call(Method::POST, "/v1/keys/verify", Some(req), Kind::Idempotent)
            .await?
            .body)
    }

    fn org(&self) -> Result<Uuid> {
        self.org.ok_or_else(|| {
            Error::Config("listing or creating org keys needs an App (it knows its org)".into())
        })
    }

    /// One page of the org's keys (scope `keys:read`).
    pub async fn list(&self, opts: &ListKeys) -> Result<proto::KeyList> {
        let org = self.org()?;
        let q = query(&[
            ("agent_id", opts.agent_id.map(|a| a.to_string())),
            ("kind", opts.kind.clone()),
            ("include_revoked", Some(opts.include_revoked.to_string())),
            ("limit", opts.limit.map(|l| l.to_string())),
            ("offset", opts.offset.map(|o| o.to_string())),
        ]);
        get(self.t, &format!("/v1/orgs/{org}/keys{q}")).await
    }

    /// Every page of the org's keys from `opts.offset` on.
    pub fn pages(&self, opts: ListKeys) -> Pages<'a, proto::Key> {
        let keys = *self;
        let limit = opts.limit.unwrap_or(MAX_PAGE);
        Pages::new(opts.offset.unwrap_or(0), limit, move |offset, limit| {
            let opts = ListKeys {
                limit: Some(limit),
                offset: Some(offset),
                ..opts.clone()
            };
            Box::pin(async move {
                let page = keys.list(&opts).await?;
                Ok((page.keys, page.has_more))
            })
        })
    }

    /// Creates another root key for the org (scope `org:admin`); the plaintext is in `api_key`.
    pub async fn create_root(
        &self,
        req: &proto::CreateKeyRequest,
    ) -> Result<proto::CreateKeyResponse> {
        let org = self.org()?;
        Ok(self
            .t
            .call(
                Method::POST,
                &format!("/v1/orgs/{org}/keys"),
                Some(req),
                Kind::Create,
            )
            .await?
            .body)
    }
}

/// Filters of [`Audit::list`]; every one that is set must match.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// e.g. `agent.create`, `key.revoke`, `auth.denied`.
    pub action: Option<String>,
    /// Events whose actor or target is this agent.
    pub agent_id: Option<Uuid>,
    /// Events whose actor or target is this key.
    pub key_id: Option<Uuid>,
    /// The trace run id (`Keyward-Run-Id`).
    pub run_id: Option<String>,
    /// The trace thread id (`Keyward-Thread-Id`).
    pub thread_id: Option<String>,
    /// `success`, `denied` or `failure`.
    pub outcome: Option<String>,
    /// Events at or after this instant.
    pub since: Option<DateTime<Utc>>,
    /// Events before this instant.
    pub until: Option<DateTime<Utc>>,
    /// Page size, 1..=1000 (server default 100).
    pub limit: Option<u32>,
    /// Items to skip (default 0).
    pub offset: Option<u64>,
}

/// `app.audit()`: the org's audit log.
#[derive(Debug, Clone, Copy)]
pub struct Audit<'a> {
    app: &'a App,
}

impl<'a> Audit<'a> {
    /// One page of audit events, newest first.
    pub async fn list(&self, q: &AuditQuery) -> Result<proto::AuditList> {
        let qs = query(&[
            ("action", q.action.clone()),
            ("agent_id", q.agent_id.map(|u| u.to_string())),
            ("key_id", q.key_id.map(|u| u.to_string())),
            ("run_id", q.run_id.clone()),
            ("thread_id", q.thread_id.clone()),
            ("outcome", q.outcome.clone()),
            ("since", q.since.as_ref().map(ts)),
            ("until", q.until.as_ref().map(ts)),
            ("limit", q.limit.map(|l| l.to_string())),
            ("offset", q.offset.map(|o| o.to_string())),
        ]);
        self.app
            .get(&self.app.org_path(&format!("/audit{qs}")))
            .await
    }

    /// Every page of matching events, newest first.
    pub fn pages(&self, q: AuditQuery) -> Pages<'a, proto::AuditEvent> {
        let audit = *self;
        let limit = q.limit.unwrap_or(MAX_PAGE);
        Pages::new(q.offset.unwrap_or(0), limit, move |offset, limit| {
            let q = AuditQuery {
                limit: Some(limit),
                offset: Some(offset),
                ..q.clone()
            };
            Box::pin(async move {
                let page = audit.list(&q).await?;
                Ok((page.events, page.has_more))
            })
        })
    }
}
