//! Creating an org with its first root key: used by `keyward serve` on an empty store, by
//! `keyward init` and by `keyward orgs create`.

use keyward_core::clock::Clock;
use keyward_core::model::{AuditEvent, Key, Org, OrgPolicy, Outcome, TraceContext};
use keyward_core::scope::Scope;
use keyward_core::secret::Secret;
use keyward_core::token::{self, Environment, TokenDigest, TokenKind};
use keyward_store::{Store, StoreError};
use serde_json::json;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("invalid org name: {0}")]
    InvalidName(String),
    #[error("an org named `{0}` already exists")]
    NameTaken(String),
    #[error("could not draw random bytes: {0}")]
    Rng(String),
    #[error(transparent)]
    Store(StoreError),
}

/// Creates org `name` with a root key (scopes `*`), returning the org and the key's plaintext.
pub async fn create_org(
    store: &dyn Store,
    clock: &dyn Clock,
    name: &str,
) -> Result<(Org, Secret), BootstrapError> {
    keyward_core::validate::org_name(name).map_err(|e| BootstrapError::InvalidName(e.message))?;
    let now = keyward_core::clock::truncate_to_millis(clock.now());
    let org = Org {
        id: Uuid::now_v7(),
        name: name.to_string(),
        policy: OrgPolicy::default(),
        created_at: now,
    };
    let plaintext = token::generate(Environment::Live, TokenKind::Root)
        .map_err(|e| BootstrapError::Rng(e.to_string()))?;
    let all = Scope::parse("*").map_err(|e| BootstrapError::InvalidName(e.to_string()))?;
    let key = Key {
        id: Uuid::now_v7(),
        org_id: org.id,
        agent_id: None,
        parent_key_id: None,
        kind: TokenKind::Root,
        environment: Environment::Live,
        name: Some("bootstrap".to_string()),
        start: token::display_start(plaintext.expose()),
        digest: TokenDigest::of(plaintext.expose()),
        scopes: vec![all],
        cidr_allowlist: Vec::new(),
        rate_limit: None,
        quota: None,
        alert_thresholds: Vec::new(),
        requires_signature: false,
        signing_secret_enc: None,
        expires_at: None,
        deprecated_at: None,
        revoked_at: None,
        successor_key_id: None,
        last_used_at: None,
        created_at: now,
        metadata: Default::default(),
    };
    let audit = AuditEvent {
        id: Uuid::now_v7(),
        org_id: org.id,
        occurred_at: now,
        action: "org.create".to_string(),
        outcome: Outcome::Success,
        error_code: None,
        actor_key_id: None,
        actor_agent_id: None,
        target_type: Some("org".to_string()),
        target_id: Some(org.id),
        client_ip: None,
        request_id: None,
        trace: TraceContext::default(),
        details: json!({ "name": name, "root_key_id": key.id, "via": "operator" }),
    };
    match store.create_org(&org, &key, &audit).await {
        Ok(()) => Ok((org, plaintext)),
        Err(StoreError::OrgNameExists) => Err(BootstrapError::NameTaken(name.to_string())),
        Err(e) => Err(BootstrapError::Store(e)),
    }
}
