//! Creating an org with its first root key: used by `keyward serve` on an empty store, by
//! `keyward init` and by `keyward orgs create`.

use keyward_core::clock::Clock;
use keyward_core::model::{AuditEvent, Key, Org, OrgPolicy, Outcome, TraceContext};
use keyward_core::scope::Scope;
use keyward_core::secret::Secret;
use keyward_core::token::{Environment, TokenKind};
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
    let (mut key, plaintext) = Key::mint(
        org.id,
        None,
        TokenKind::Root,
        Environment::Live,
        vec![Scope::all()],
        now,
    )
    .map_err(|e| BootstrapError::Rng(e.to_string()))?;
    key.name = Some("bootstrap".to_string());
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
