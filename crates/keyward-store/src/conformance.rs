//! The backend-agnostic conformance suite: what every `Store` backend must do, written only
//! against the trait so the SQLite backend and any later one (PostgreSQL) run the same checks.
//!
//! Each check is a public async function that takes the store, sets up what it needs in an org of
//! its own (with a unique name) and panics with a message naming the broken rule. Because every
//! check stays inside its own org, all of them can share one store: `run_all` runs them one after
//! the other on a single store. A backend's test file calls each check from a test of the same
//! name (so a failure is named after the rule it broke) and also calls `run_all`.
//!
//! Records are built with the builders below (`org`, `agent`, `key`, `derived`, `event`,
//! `idempotency`); every timestamp is truncated to milliseconds, the precision the store keeps.

// This module is test support compiled into the library so every backend's tests can reach it:
// like assertions in a test, its checks report a violated rule by panicking, so the workspace's
// bans on `unwrap`/`expect`/`panic` in library code do not apply here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{Duration, Utc};
use keyward_core::clock::truncate_to_millis;
use keyward_core::model::{
    Agent, AgentStatus, AgentType, AuditEvent, AuditFilter, IdempotencyRecord, JsonObject, Key,
    KeyFilter, OneOrMany, Org, OrgPolicy, Outcome, Page, Quota, QuotaPeriod, RateLimit,
    RateLimitSpec, Rule, RuleBody, Timestamp, TraceContext,
};
use keyward_core::scope::{ProviderScopes, Scope};
use keyward_core::token::{Environment, TokenDigest, TokenKind};
use serde_json::{json, Value};
use tokio::sync::Barrier;
use uuid::Uuid;

use crate::{
    Signal, Store, StoreError, StoreResult, ThresholdAlert, UsageBucket, UsageDelta,
    IDEMPOTENCY_TTL_MS,
};

// ---------------------------------------------------------------------------------------------
// Builders
// ---------------------------------------------------------------------------------------------

/// The current time at the store's precision (milliseconds).
pub fn now() -> Timestamp {
    truncate_to_millis(Utc::now())
}

/// A name no other check (and no earlier run on the same database) uses.
pub fn unique(label: &str) -> String {
    format!("conf-{label}-{}", Uuid::now_v7().simple())
}

/// An org with the default policy, created now.
pub fn org(name: &str) -> Org {
    Org {
        id: Uuid::now_v7(),
        name: name.to_string(),
        policy: OrgPolicy::default(),
        created_at: now(),
    }
}

/// An active agent at version 1 with empty scopes, metadata and policy, created now.
pub fn agent(org_id: Uuid, name: &str) -> Agent {
    let t = now();
    Agent {
        id: Uuid::now_v7(),
        org_id,
        name: name.to_string(),
        display_name: None,
        agent_type: AgentType::Agent,
        status: AgentStatus::Active,
        scopes: ProviderScopes::new(),
        metadata: JsonObject::new(),
        policy: JsonObject::new(),
        capabilities: Vec::new(),
        did: None,
        owner_user_id: None,
        parent_agent_id: None,
        version: 1,
        created_at: t,
        updated_at: t,
        revoked_at: None,
    }
}

/// A live, non-revoked key of `kind` with a freshly generated token's digest and start. Root keys
/// get the scope `*`, others `keys:derive`.
pub fn key(org_id: Uuid, agent_id: Option<Uuid>, kind: TokenKind) -> Key {
    let scope = if kind == TokenKind::Root {
        Scope::all()
    } else {
        Scope::parse("keys:derive").expect("a valid scope")
    };
    Key::mint(
        org_id,
        agent_id,
        kind,
        Environment::Live,
        vec![scope],
        now(),
    )
    .expect("minting a key")
    .0
}

/// A derived key of `parent`: same org and agent, `parent_key_id` set, expiring in an hour.
pub fn derived(parent: &Key) -> Key {
    let mut k = key(parent.org_id, parent.agent_id, TokenKind::Derived);
    k.parent_key_id = Some(parent.id);
    k.expires_at = Some(now() + Duration::hours(1));
    k
}

/// A successful audit event of `action`, occurring now, with no actor, target or trace.
pub fn event(org_id: Uuid, action: &str) -> AuditEvent {
    AuditEvent {
        id: Uuid::now_v7(),
        org_id,
        occurred_at: now(),
        action: action.to_string(),
        outcome: Outcome::Success,
        error_code: None,
        actor_key_id: None,
        actor_agent_id: None,
        target_type: None,
        target_id: None,
        client_ip: None,
        request_id: None,
        trace: TraceContext::default(),
        details: json!({}),
    }
}

/// An idempotency record for `key` in `org_id`, created now.
pub fn idempotency(org_id: Uuid, key: &str, agent_id: Option<Uuid>) -> IdempotencyRecord {
    IdempotencyRecord {
        org_id,
        key: key.to_string(),
        request_hash: [7u8; 32],
        status: 201,
        response: json!({ "agent": { "id": agent_id }, "api_key": null }),
        agent_id,
        created_at: now(),
    }
}

/// A JSON object from a `json!` literal.
fn obj(v: Value) -> JsonObject {
    match v {
        Value::Object(m) => m,
        other => panic!("not a JSON object: {other}"),
    }
}

fn ms(n: i64) -> Duration {
    Duration::milliseconds(n)
}

fn page(limit: u32, offset: u64) -> Page {
    Page { limit, offset }
}

/// A page large enough for everything a check creates.
fn all() -> Page {
    page(1000, 0)
}

/// An org policy with every part set to something other than the default.
fn rich_policy() -> OrgPolicy {
    let mut policy = OrgPolicy {
        max_key_ttl_s: 3600,
        ..OrgPolicy::default()
    };
    policy.rate_limit_tiers.insert(
        "gold".to_string(),
        RateLimitSpec {
            limit: 5000,
            period_s: 60,
            burst: 500,
        },
    );
    policy.default_rate_limit = Some(RateLimit::Tier {
        tier: "gold".to_string(),
    });
    let mut when = BTreeMap::new();
    when.insert("method".to_string(), OneOrMany::One("DELETE".to_string()));
    when.insert(
        "environment".to_string(),
        OneOrMany::Many(vec!["live".to_string(), "test".to_string()]),
    );
    policy.rules = vec![Rule {
        rule_type: "json_match".to_string(),
        rule_body: RuleBody {
            when,
            effect: "deny".to_string(),
        },
    }];
    policy
}

/// A key with every optional field set, so a round trip covers every column.
fn rich_key(org_id: Uuid, agent_id: Option<Uuid>, kind: TokenKind) -> Key {
    let t = now();
    let mut k = key(org_id, agent_id, kind);
    k.environment = Environment::Test;
    k.name = Some("ci runner".to_string());
    k.scopes = vec![
        Scope::parse("slack:chat:write").expect("scope"),
        Scope::parse("github:*").expect("scope"),
        Scope::parse("keys:derive").expect("scope"),
    ]
    .into();
    k.cidr_allowlist = keyward_core::cidr::parse_allowlist(&[
        "10.0.0.0/8".to_string(),
        "203.0.113.7/32".to_string(),
        "2001:db8::/32".to_string(),
    ])
    .expect("allowlist");
    k.rate_limit = Some(RateLimit::Custom(RateLimitSpec {
        limit: 120,
        period_s: 60,
        burst: 20,
    }));
    k.quota = Some(Quota {
        limit: 10_000,
        period: QuotaPeriod::Month,
    });
    k.alert_thresholds = vec![50, 80, 100];
    k.requires_signature = true;
    k.signing_secret_enc = Some((0u8..=60).collect());
    k.expires_at = Some(t + Duration::days(30));
    k.deprecated_at = Some(t - Duration::days(1));
    k.last_used_at = Some(t - Duration::hours(2));
    k.created_at = t - Duration::days(2);
    k.metadata = obj(json!({ "team": "search", "n": 3, "tags": ["a", "b"], "x": null }));
    k
}

/// An event with every optional field set.
fn rich_event(org_id: Uuid, action: &str, at: Timestamp) -> AuditEvent {
    let mut meta = BTreeMap::new();
    meta.insert("step".to_string(), "4".to_string());
    meta.insert("tool".to_string(), "search".to_string());
    AuditEvent {
        id: Uuid::now_v7(),
        org_id,
        occurred_at: at,
        action: action.to_string(),
        outcome: Outcome::Failure,
        error_code: Some("rate_limited".to_string()),
        actor_key_id: Some(Uuid::now_v7()),
        actor_agent_id: Some(Uuid::now_v7()),
        target_type: Some("key".to_string()),
        target_id: Some(Uuid::now_v7()),
        client_ip: Some("203.0.113.7".to_string()),
        request_id: Some("req-0123456789".to_string()),
        trace: TraceContext {
            run_id: Some("run-9".to_string()),
            thread_id: Some("thread-3".to_string()),
            parent_agent: Some("planner".to_string()),
            traceparent: Some(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_string(),
            ),
            meta,
        },
        details: json!({ "force": true, "count": 3, "nested": { "a": [1, "b", null] } }),
    }
}

// ---------------------------------------------------------------------------------------------
// Fixtures and assertion helpers
// ---------------------------------------------------------------------------------------------

/// Fails unless `$res` is `Err` matching `$pat`; the message names the operation.
macro_rules! assert_err {
    ($res:expr, $pat:pat, $($ctx:tt)+) => {
        match $res {
            Err($pat) => {}
            other => panic!(
                "{}: expected Err({}), got {:?}",
                format!($($ctx)+),
                stringify!($pat),
                other
            ),
        }
    };
}

/// Creates an org (with a unique name built from `label`) and its root key.
async fn new_org(store: &dyn Store, label: &str) -> (Org, Key) {
    let o = org(&unique(label));
    let root = key(o.id, None, TokenKind::Root);
    store
        .create_org(&o, &root, &event(o.id, "org.create"))
        .await
        .unwrap_or_else(|e| panic!("create_org {}: {e:?}", o.name));
    (o, root)
}

/// Creates an agent with its first key.
async fn new_agent(store: &dyn Store, org_id: Uuid, name: &str) -> (Agent, Key) {
    let a = agent(org_id, name);
    let k = key(org_id, Some(a.id), TokenKind::Agent);
    create_agent(store, &a, &k).await;
    (a, k)
}

async fn create_agent(store: &dyn Store, a: &Agent, k: &Key) {
    store
        .create_agent(a, k, &[event(a.org_id, "agent.create")], None)
        .await
        .unwrap_or_else(|e| panic!("create_agent {}: {e:?}", a.name));
}

/// Inserts a key (agent, root or derived).
async fn add_key(store: &dyn Store, k: &Key) {
    store
        .insert_key(k, &event(k.org_id, "key.create"), None)
        .await
        .unwrap_or_else(|e| panic!("insert_key {:?} ({:?}): {e:?}", k.id, k.kind));
}

/// Moves an agent to `status` through `update_agent` and returns what is now stored.
async fn set_status(store: &dyn Store, a: &Agent, status: AgentStatus) -> Agent {
    let mut next = a.clone();
    next.status = status;
    next.version = a.version + 1;
    next.updated_at = a.updated_at + ms(1);
    if status == AgentStatus::Revoked {
        next.revoked_at = Some(next.updated_at);
    }
    store
        .update_agent(&next, a.version, &event(a.org_id, "agent.update"))
        .await
        .unwrap_or_else(|e| panic!("update_agent {} to {status:?}: {e:?}", a.name));
    next
}

async fn revoke(store: &dyn Store, k: &Key, at: Timestamp, force: bool) -> crate::Revoked {
    store
        .revoke_key(k.id, at, force, &event(k.org_id, "key.revoke"))
        .await
        .unwrap_or_else(|e| panic!("revoke_key {} (force {force}): {e:?}", k.id))
}

async fn stored_key(store: &dyn Store, id: Uuid) -> Key {
    store
        .get_key(id)
        .await
        .expect("get_key")
        .unwrap_or_else(|| panic!("key {id} should exist"))
}

async fn stored_agent(store: &dyn Store, org_id: Uuid, id: Uuid) -> Agent {
    store
        .get_agent(org_id, id)
        .await
        .expect("get_agent")
        .unwrap_or_else(|| panic!("agent {id} should exist"))
}

async fn audit_of(store: &dyn Store, org_id: Uuid) -> Vec<AuditEvent> {
    store
        .list_audit(org_id, &AuditFilter::default(), all())
        .await
        .expect("list_audit")
}

async fn keys_of(store: &dyn Store, org_id: Uuid, filter: KeyFilter, p: Page) -> Vec<Key> {
    store
        .list_keys(org_id, &filter, p)
        .await
        .expect("list_keys")
}

fn agent_ids(v: &[Agent]) -> Vec<Uuid> {
    v.iter().map(|a| a.id).collect()
}

fn key_ids(v: &[Key]) -> Vec<Uuid> {
    v.iter().map(|k| k.id).collect()
}

fn event_ids(v: &[AuditEvent]) -> Vec<Uuid> {
    v.iter().map(|e| e.id).collect()
}

fn sorted(mut v: Vec<Uuid>) -> Vec<Uuid> {
    v.sort();
    v
}

/// Counts the results of concurrent calls: (successes, errors matching `want`, the rest).
fn tally<T: std::fmt::Debug>(
    results: &[StoreResult<T>],
    want: fn(&StoreError) -> bool,
) -> (usize, usize, Vec<String>) {
    let mut ok = 0;
    let mut wanted = 0;
    let mut other = Vec::new();
    for r in results {
        match r {
            Ok(_) => ok += 1,
            Err(e) if want(e) => wanted += 1,
            Err(e) => other.push(format!("{e:?}")),
        }
    }
    (ok, wanted, other)
}

// ---------------------------------------------------------------------------------------------
// Orgs
// ---------------------------------------------------------------------------------------------

/// An org reads back exactly as created (and as updated) through `get_org`, and `first_org`
/// answers the org with the earliest `created_at`, whatever the insertion order or ids.
pub async fn org_round_trips_through_create_get_and_first_org(store: &dyn Store) {
    store
        .ping()
        .await
        .expect("ping must succeed on an open store");
    let before = store.first_org().await.expect("first_org");

    let mut o = org(&unique("org-round-trip"));
    o.policy = rich_policy();
    let root = rich_key(o.id, None, TokenKind::Root);
    store
        .create_org(&o, &root, &event(o.id, "org.create"))
        .await
        .expect("create_org");
    assert_eq!(
        store.get_org(o.id).await.expect("get_org"),
        Some(o.clone()),
        "get_org must return the org exactly as created (all fields, millisecond timestamps)"
    );
    assert_eq!(
        stored_key(store, root.id).await,
        root,
        "create_org must store the root key exactly as given"
    );
    assert_eq!(
        store.get_org(Uuid::now_v7()).await.expect("get_org"),
        None,
        "get_org of an unknown id must be None"
    );

    let first = store.first_org().await.expect("first_org");
    match &before {
        None => assert_eq!(
            first,
            Some(o.clone()),
            "first_org of a store holding one org must be that org, exactly"
        ),
        Some(b) if b.created_at < o.created_at => assert_eq!(
            first.as_ref(),
            Some(b),
            "an org created later must not replace the first org"
        ),
        Some(_) => {}
    }

    // An org created afterwards but dated earlier than every other (and with a larger id, since
    // ids are time-ordered) must become the first: the answer goes by `created_at`.
    let earliest_existing = match &before {
        Some(b) if b.created_at < o.created_at => b.created_at,
        _ => o.created_at,
    };
    let mut early = org(&unique("org-first"));
    early.created_at = earliest_existing - Duration::days(1);
    store
        .create_org(
            &early,
            &key(early.id, None, TokenKind::Root),
            &event(early.id, "org.create"),
        )
        .await
        .expect("create_org (backdated)");
    assert_eq!(
        store.first_org().await.expect("first_org"),
        Some(early.clone()),
        "first_org must answer the org with the earliest created_at"
    );

    // update_org writes the name and the policy.
    let mut renamed = o.clone();
    renamed.name = unique("org-renamed");
    renamed.policy = OrgPolicy::default();
    store
        .update_org(&renamed, &event(o.id, "org.update"))
        .await
        .expect("update_org");
    assert_eq!(
        store.get_org(o.id).await.expect("get_org"),
        Some(renamed),
        "update_org must write the new name and policy"
    );
    let ghost = org(&unique("org-ghost"));
    assert_err!(
        store
            .update_org(&ghost, &event(ghost.id, "org.update"))
            .await,
        StoreError::NotFound,
        "update_org of an unknown org"
    );
}

/// Org names are unique across the store, on create and on rename (`OrgNameExists`).
pub async fn org_names_are_unique(store: &dyn Store) {
    let (a, _) = new_org(store, "org-unique").await;
    let mut b = org(&a.name);
    let b_root = key(b.id, None, TokenKind::Root);
    assert_err!(
        store
            .create_org(&b, &b_root, &event(b.id, "org.create"))
            .await,
        StoreError::OrgNameExists,
        "create_org with an existing name"
    );
    assert_eq!(
        store.get_org(b.id).await.expect("get_org"),
        None,
        "a refused org must not be stored"
    );
    assert_eq!(
        store.get_key(b_root.id).await.expect("get_key"),
        None,
        "the root key of a refused org must not be stored"
    );

    b.name = unique("org-unique-other");
    store
        .create_org(&b, &b_root, &event(b.id, "org.create"))
        .await
        .expect("create_org with a fresh name");
    let mut clash = b.clone();
    clash.name = a.name.clone();
    assert_err!(
        store.update_org(&clash, &event(b.id, "org.update")).await,
        StoreError::OrgNameExists,
        "update_org renaming to an existing org's name"
    );
    assert_eq!(
        store.get_org(b.id).await.expect("get_org"),
        Some(b),
        "a refused rename must leave the org unchanged"
    );
}

// ---------------------------------------------------------------------------------------------
// Agents
// ---------------------------------------------------------------------------------------------

/// An agent (with every field set) and its first key read back exactly through `get_agent`,
/// `get_agent_by_name`, `list_agents`, `get_key` and `find_key_by_digest`.
pub async fn agent_round_trips_through_create_get_get_by_name_and_list(store: &dyn Store) {
    let (o, _) = new_org(store, "agent-round-trip").await;
    let (parent, _) = new_agent(store, o.id, "planner").await;

    let t = now();
    let mut scopes = ProviderScopes::new();
    scopes.insert(
        "slack".to_string(),
        vec!["chat:write".to_string(), "channels:*".to_string()],
    );
    scopes.insert("github".to_string(), vec!["*".to_string()]);
    let a = Agent {
        display_name: Some("Research Bot".to_string()),
        agent_type: AgentType::Service,
        scopes,
        metadata: obj(json!({ "team": "search", "cost_center": 42, "nested": { "x": [1, 2] } })),
        policy: obj(json!({ "note": "kept as given", "max_parallel": 4 })),
        capabilities: vec!["search".to_string(), "code".to_string()],
        did: Some("did:example:123456789abcdefghi".to_string()),
        owner_user_id: Some(Uuid::now_v7()),
        parent_agent_id: Some(parent.id),
        version: 1,
        created_at: t + ms(1),
        updated_at: t + ms(5),
        ..agent(o.id, "research-bot")
    };
    let k = rich_key(o.id, Some(a.id), TokenKind::Agent);
    create_agent(store, &a, &k).await;

    assert_eq!(
        stored_agent(store, o.id, a.id).await,
        a,
        "get_agent must return the agent exactly as created"
    );
    assert_eq!(
        store
            .get_agent(Uuid::now_v7(), a.id)
            .await
            .expect("get_agent"),
        None,
        "get_agent must not find an agent through another org's id"
    );
    assert_eq!(
        store
            .get_agent(o.id, Uuid::now_v7())
            .await
            .expect("get_agent"),
        None,
        "get_agent of an unknown id must be None"
    );
    assert_eq!(
        store
            .get_agent_by_name(o.id, "research-bot")
            .await
            .expect("get_agent_by_name"),
        Some(a.clone()),
        "get_agent_by_name must return the agent exactly as created"
    );
    assert_eq!(
        store
            .get_agent_by_name(o.id, "Research-Bot")
            .await
            .expect("get_agent_by_name"),
        None,
        "get_agent_by_name matches the exact (case-sensitive) name"
    );
    assert_eq!(
        store
            .get_agent_by_name(o.id, "nobody")
            .await
            .expect("get_agent_by_name"),
        None,
        "get_agent_by_name of an unknown name must be None"
    );
    let listed = store
        .list_agents(o.id, false, all())
        .await
        .expect("list_agents");
    assert_eq!(
        listed,
        vec![parent, a.clone()],
        "list_agents must return the org's agents exactly, by created_at"
    );
    assert_eq!(
        stored_key(store, k.id).await,
        k,
        "create_agent must store the key exactly as given"
    );
    let found = store
        .find_key_by_digest(&k.digest)
        .await
        .expect("find_key_by_digest")
        .expect("the agent's key must be found by its digest");
    assert_eq!(
        found.key, k,
        "find_key_by_digest must return the key exactly"
    );
    assert_eq!(found.agent_status, Some(AgentStatus::Active));
}

/// Agent names are unique among an org's active and paused agents (`AgentNameExists`), per org,
/// and a revoked agent's name can be taken again.
pub async fn agent_names_are_unique_among_live_agents_and_reusable_after_revocation(
    store: &dyn Store,
) {
    let (o, _) = new_org(store, "agent-names").await;
    let (first, _) = new_agent(store, o.id, "worker").await;

    let dup = agent(o.id, "worker");
    let dup_key = key(o.id, Some(dup.id), TokenKind::Agent);
    assert_err!(
        store
            .create_agent(&dup, &dup_key, &[event(o.id, "agent.create")], None)
            .await,
        StoreError::AgentNameExists,
        "create_agent with the name of an active agent"
    );
    assert_eq!(
        store.get_agent(o.id, dup.id).await.expect("get_agent"),
        None,
        "a refused agent must not be stored"
    );
    assert_eq!(
        store.get_key(dup_key.id).await.expect("get_key"),
        None,
        "the key of a refused agent must not be stored"
    );

    // The same name in another org is fine.
    let (other_org, _) = new_org(store, "agent-names-other").await;
    new_agent(store, other_org.id, "worker").await;

    let first = set_status(store, &first, AgentStatus::Revoked).await;
    assert_eq!(
        store
            .get_agent_by_name(o.id, "worker")
            .await
            .expect("get_agent_by_name"),
        None,
        "get_agent_by_name must not answer a revoked agent"
    );
    let (second, _) = new_agent(store, o.id, "worker").await;
    assert_eq!(
        store
            .get_agent_by_name(o.id, "worker")
            .await
            .expect("get_agent_by_name")
            .map(|a| a.id),
        Some(second.id),
        "the name of a revoked agent must be reusable, and then answer the new agent"
    );
    assert_eq!(
        stored_agent(store, o.id, first.id).await,
        first,
        "the revoked agent must stay as a tombstone"
    );

    // A paused agent still holds its name.
    let second = set_status(store, &second, AgentStatus::Paused).await;
    let third = agent(o.id, "worker");
    assert_err!(
        store
            .create_agent(
                &third,
                &key(o.id, Some(third.id), TokenKind::Agent),
                &[event(o.id, "agent.create")],
                None
            )
            .await,
        StoreError::AgentNameExists,
        "create_agent with the name of a paused agent"
    );
    assert_eq!(
        store
            .get_agent_by_name(o.id, "worker")
            .await
            .expect("get_agent_by_name"),
        Some(second),
        "get_agent_by_name must answer a paused agent"
    );
}

/// `list_agents` orders by `created_at` (not insertion order), returns up to `limit + 1` rows
/// from `offset`, and shows revoked agents only with `include_revoked`.
pub async fn list_agents_pages_by_created_at_and_filters_revoked(store: &dyn Store) {
    let (o, _) = new_org(store, "list-agents").await;
    let t0 = now() - Duration::minutes(5);
    let agents: Vec<Agent> = (0..5i64)
        .map(|i| {
            let mut a = agent(o.id, &format!("agent-{i}"));
            a.created_at = t0 + ms(10 * i);
            a.updated_at = a.created_at;
            a
        })
        .collect();
    for i in [3usize, 0, 4, 1, 2] {
        let k = key(o.id, Some(agents[i].id), TokenKind::Agent);
        create_agent(store, &agents[i], &k).await;
    }
    // Another org's agent never shows.
    let (other, _) = new_org(store, "list-agents-other").await;
    new_agent(store, other.id, "agent-0").await;

    let id = |i: usize| agents[i].id;
    let list = |include_revoked: bool, p: Page| async move {
        store
            .list_agents(o.id, include_revoked, p)
            .await
            .expect("list_agents")
    };
    assert_eq!(
        list(false, all()).await,
        agents,
        "list_agents must return every agent, exactly, ordered by created_at"
    );
    assert_eq!(
        agent_ids(&list(false, page(2, 0)).await),
        vec![id(0), id(1), id(2)],
        "list_agents must return limit + 1 rows when more exist"
    );
    assert_eq!(
        agent_ids(&list(false, page(2, 2)).await),
        vec![id(2), id(3), id(4)],
        "list_agents must start at the offset"
    );
    assert_eq!(
        agent_ids(&list(false, page(2, 4)).await),
        vec![id(4)],
        "the last page holds what is left"
    );
    assert_eq!(
        agent_ids(&list(false, page(5, 0)).await),
        (0..5).map(id).collect::<Vec<_>>(),
        "list_agents must return exactly the rows there are when they fit in the limit"
    );
    assert!(
        list(false, page(2, 10)).await.is_empty(),
        "an offset past the end must return nothing"
    );

    let revoked = set_status(store, &agents[1], AgentStatus::Revoked).await;
    assert_eq!(
        agent_ids(&list(false, all()).await),
        vec![id(0), id(2), id(3), id(4)],
        "list_agents without include_revoked must leave revoked agents out"
    );
    let with_revoked = list(true, all()).await;
    assert_eq!(
        agent_ids(&with_revoked),
        (0..5).map(id).collect::<Vec<_>>(),
        "list_agents with include_revoked must include revoked agents in created_at order"
    );
    assert_eq!(
        with_revoked[1], revoked,
        "the revoked agent must be listed as stored"
    );
    assert_eq!(
        agent_ids(&list(true, page(1, 1)).await),
        vec![id(1), id(2)],
        "pagination must count revoked agents when they are included"
    );
}

/// `update_agent` writes the new state when the version matches, refuses a stale (or future)
/// expected version with `Conflict`, a revoked agent with `AgentRevoked`, and an unknown agent
/// with `NotFound`.
pub async fn update_agent_refuses_stale_versions_and_revoked_agents(store: &dyn Store) {
    let (o, _) = new_org(store, "update-agent").await;
    let (a, _) = new_agent(store, o.id, "updatable").await;

    let mut next = a.clone();
    next.display_name = Some("Updatable".to_string());
    next.scopes
        .insert("jira".to_string(), vec!["issues:read".to_string()]);
    next.metadata = obj(json!({ "v": 2 }));
    next.policy = obj(json!({ "p": true }));
    next.capabilities = vec!["triage".to_string()];
    next.did = Some("did:example:next".to_string());
    next.status = AgentStatus::Paused;
    next.version = 2;
    next.updated_at = a.updated_at + ms(10);
    store
        .update_agent(&next, 1, &event(o.id, "agent.update"))
        .await
        .expect("update_agent with the current version");
    assert_eq!(
        stored_agent(store, o.id, a.id).await,
        next,
        "update_agent must write every mutable field and the new version"
    );

    let mut stale = next.clone();
    stale.display_name = Some("stale write".to_string());
    stale.version = 2;
    assert_err!(
        store
            .update_agent(&stale, 1, &event(o.id, "agent.update"))
            .await,
        StoreError::Conflict,
        "update_agent with a stale expected version"
    );
    stale.version = 4;
    assert_err!(
        store
            .update_agent(&stale, 3, &event(o.id, "agent.update"))
            .await,
        StoreError::Conflict,
        "update_agent with an expected version ahead of the stored one"
    );
    assert_eq!(
        stored_agent(store, o.id, a.id).await,
        next,
        "a refused update must leave the agent unchanged"
    );

    let revoked = set_status(store, &next, AgentStatus::Revoked).await;
    let mut after = revoked.clone();
    after.status = AgentStatus::Active;
    after.revoked_at = None;
    after.version = revoked.version + 1;
    assert_err!(
        store
            .update_agent(&after, revoked.version, &event(o.id, "agent.update"))
            .await,
        StoreError::AgentRevoked,
        "update_agent of a revoked agent"
    );
    assert_eq!(
        stored_agent(store, o.id, a.id).await,
        revoked,
        "a revoked agent must stay revoked"
    );

    let ghost = agent(o.id, "ghost");
    assert_err!(
        store
            .update_agent(&ghost, 1, &event(o.id, "agent.update"))
            .await,
        StoreError::NotFound,
        "update_agent of an unknown agent"
    );
}

// ---------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------

/// `insert_key` stores keys for live agents, refuses a key for a revoked agent
/// (`AgentRevoked`) and a derived key of a revoked parent (`KeyAlreadyRevoked`).
pub async fn insert_key_refuses_keys_for_revoked_agents(store: &dyn Store) {
    let (o, _) = new_org(store, "insert-key").await;
    let (a, _) = new_agent(store, o.id, "holder").await;
    let k2 = rich_key(o.id, Some(a.id), TokenKind::Agent);
    add_key(store, &k2).await;
    assert_eq!(
        stored_key(store, k2.id).await,
        k2,
        "insert_key must store the key exactly as given"
    );

    set_status(store, &a, AgentStatus::Revoked).await;
    let k3 = key(o.id, Some(a.id), TokenKind::Agent);
    assert_err!(
        store
            .insert_key(&k3, &event(o.id, "key.create"), None)
            .await,
        StoreError::AgentRevoked,
        "insert_key for a revoked agent"
    );
    assert_eq!(
        store.get_key(k3.id).await.expect("get_key"),
        None,
        "a refused key must not be stored"
    );
    assert!(
        store
            .find_key_by_digest(&k3.digest)
            .await
            .expect("find_key_by_digest")
            .is_none(),
        "a refused key must not be found by its digest"
    );

    let (b, b1) = new_agent(store, o.id, "deriver").await;
    let b2 = key(o.id, Some(b.id), TokenKind::Agent);
    add_key(store, &b2).await;
    revoke(store, &b1, now(), false).await;
    let child = derived(&b1);
    assert_err!(
        store
            .insert_key(&child, &event(o.id, "key.derive"), None)
            .await,
        StoreError::KeyAlreadyRevoked,
        "insert_key of a derived key whose parent is revoked"
    );
    assert_eq!(
        store.get_key(child.id).await.expect("get_key"),
        None,
        "a refused derived key must not be stored"
    );
}

/// `find_key_by_digest` returns the key with its agent's current status (`None` for keys
/// without an agent, such as root keys), still finds revoked keys, and answers `None` for an
/// unknown digest.
pub async fn find_key_by_digest_returns_the_key_and_its_agent_status(store: &dyn Store) {
    let (o, root) = new_org(store, "find-key").await;
    let (a, k) = new_agent(store, o.id, "finder").await;

    let status_of = |d: TokenDigest| async move {
        store
            .find_key_by_digest(&d)
            .await
            .expect("find_key_by_digest")
            .expect("the key must be found by its digest")
    };
    let found = status_of(k.digest).await;
    assert_eq!(
        found.key, k,
        "find_key_by_digest must return the key exactly"
    );
    assert_eq!(
        found.agent_status,
        Some(AgentStatus::Active),
        "an active agent's key must carry agent_status Active"
    );

    let found = status_of(root.digest).await;
    assert_eq!(found.key, root, "find_key_by_digest must return root keys");
    assert_eq!(
        found.agent_status, None,
        "a root key has no agent, so agent_status must be None"
    );

    let a = set_status(store, &a, AgentStatus::Paused).await;
    assert_eq!(
        status_of(k.digest).await.agent_status,
        Some(AgentStatus::Paused),
        "agent_status must follow the agent's current status (paused)"
    );
    set_status(store, &a, AgentStatus::Revoked).await;
    assert_eq!(
        status_of(k.digest).await.agent_status,
        Some(AgentStatus::Revoked),
        "agent_status must follow the agent's current status (revoked)"
    );

    let (_, k2) = new_agent(store, o.id, "revoked-key").await;
    let at = now();
    revoke(store, &k2, at, true).await;
    let found = status_of(k2.digest).await;
    assert_eq!(
        found.key.revoked_at,
        Some(at),
        "a revoked key must still be found, with its revoked_at, so the caller can tell why it \
         fails"
    );

    assert!(
        store
            .find_key_by_digest(&TokenDigest::of("kw_ak_not-a-stored-token"))
            .await
            .expect("find_key_by_digest")
            .is_none(),
        "an unknown digest must answer None"
    );
}

/// `list_keys` orders by `created_at`, filters by agent, kind and revocation, pages with
/// `limit + 1` rows and never shows another org's keys.
pub async fn list_keys_filters_by_agent_kind_and_revocation(store: &dyn Store) {
    let t0 = now() - Duration::minutes(5);
    let mut o = org(&unique("list-keys"));
    o.created_at = t0;
    let mut root = key(o.id, None, TokenKind::Root);
    root.created_at = t0;
    store
        .create_org(&o, &root, &event(o.id, "org.create"))
        .await
        .expect("create_org");
    let mut a = agent(o.id, "alpha");
    a.created_at = t0;
    let mut a1 = key(o.id, Some(a.id), TokenKind::Agent);
    a1.created_at = t0 + ms(1);
    create_agent(store, &a, &a1).await;
    let mut b = agent(o.id, "beta");
    b.created_at = t0;
    let mut b1 = key(o.id, Some(b.id), TokenKind::Agent);
    b1.created_at = t0 + ms(2);
    create_agent(store, &b, &b1).await;
    // Inserted out of created_at order: d1 is inserted before a2 but created after it.
    let mut d1 = derived(&a1);
    d1.created_at = t0 + ms(4);
    add_key(store, &d1).await;
    let mut a2 = key(o.id, Some(a.id), TokenKind::Agent);
    a2.created_at = t0 + ms(3);
    add_key(store, &a2).await;
    let at = now();
    revoke(store, &a2, at, false).await;
    let mut a2_revoked = a2.clone();
    a2_revoked.revoked_at = Some(at);

    let (other, _) = new_org(store, "list-keys-other").await;
    new_agent(store, other.id, "alpha").await;

    let f = |agent_id: Option<Uuid>, kind: Option<TokenKind>, include_revoked: bool| KeyFilter {
        agent_id,
        kind,
        include_revoked,
    };
    assert_eq!(
        keys_of(store, o.id, f(None, None, false), all()).await,
        vec![root.clone(), a1.clone(), b1.clone(), d1.clone()],
        "list_keys must return the org's live keys exactly, ordered by created_at"
    );
    assert_eq!(
        keys_of(store, o.id, f(None, None, true), all()).await,
        vec![
            root.clone(),
            a1.clone(),
            b1.clone(),
            a2_revoked.clone(),
            d1.clone()
        ],
        "list_keys with include_revoked must add revoked keys in created_at order"
    );
    assert_eq!(
        key_ids(&keys_of(store, o.id, f(Some(a.id), None, false), all()).await),
        vec![a1.id, d1.id],
        "list_keys by agent_id must return that agent's live keys, derived ones included"
    );
    assert_eq!(
        key_ids(&keys_of(store, o.id, f(Some(a.id), None, true), all()).await),
        vec![a1.id, a2.id, d1.id],
        "list_keys by agent_id with include_revoked"
    );
    assert_eq!(
        key_ids(&keys_of(store, o.id, f(None, Some(TokenKind::Derived), false), all()).await),
        vec![d1.id],
        "list_keys by kind derived"
    );
    assert_eq!(
        key_ids(&keys_of(store, o.id, f(None, Some(TokenKind::Root), false), all()).await),
        vec![root.id],
        "list_keys by kind root"
    );
    assert_eq!(
        key_ids(&keys_of(store, o.id, f(None, Some(TokenKind::Agent), true), all()).await),
        vec![a1.id, b1.id, a2.id],
        "list_keys by kind agent with include_revoked"
    );
    assert_eq!(
        key_ids(
            &keys_of(
                store,
                o.id,
                f(Some(a.id), Some(TokenKind::Agent), false),
                all()
            )
            .await
        ),
        vec![a1.id],
        "list_keys by agent_id and kind together"
    );
    assert!(
        keys_of(store, o.id, f(Some(Uuid::now_v7()), None, true), all())
            .await
            .is_empty(),
        "list_keys by an unknown agent must return nothing"
    );
    assert_eq!(
        key_ids(&keys_of(store, o.id, f(None, None, true), page(2, 0)).await),
        vec![root.id, a1.id, b1.id],
        "list_keys must return limit + 1 rows when more exist"
    );
    assert_eq!(
        key_ids(&keys_of(store, o.id, f(None, None, true), page(2, 3)).await),
        vec![a2.id, d1.id],
        "list_keys must start at the offset and return only what is left"
    );
}

/// `update_key` writes a live key's mutable fields, refuses a revoked key with
/// `KeyAlreadyRevoked` and an unknown key with `NotFound`.
pub async fn update_key_writes_mutable_fields_and_refuses_revoked_keys(store: &dyn Store) {
    let (o, _) = new_org(store, "update-key").await;
    let (a, k1) = new_agent(store, o.id, "keyholder").await;
    let k2 = key(o.id, Some(a.id), TokenKind::Agent);
    add_key(store, &k2).await;

    let mut next = k1.clone();
    next.name = Some("renamed".to_string());
    next.cidr_allowlist =
        keyward_core::cidr::parse_allowlist(&["192.168.0.0/16".to_string(), "::1".to_string()])
            .expect("allowlist");
    next.rate_limit = Some(RateLimit::Tier {
        tier: "pro".to_string(),
    });
    next.quota = Some(Quota {
        limit: 500,
        period: QuotaPeriod::Day,
    });
    next.alert_thresholds = vec![75, 90];
    next.metadata = obj(json!({ "owner": "ops" }));
    next.deprecated_at = Some(now());
    store
        .update_key(&next, &event(o.id, "key.update"))
        .await
        .expect("update_key of a live key");
    assert_eq!(
        stored_key(store, k1.id).await,
        next,
        "update_key must write name, allowlist, limits, thresholds, metadata and deprecation"
    );

    // Clearing the optional fields is a write too.
    let mut cleared = next.clone();
    cleared.name = None;
    cleared.cidr_allowlist = Vec::new();
    cleared.rate_limit = None;
    cleared.quota = None;
    cleared.alert_thresholds = Vec::new();
    cleared.metadata = JsonObject::new();
    cleared.deprecated_at = None;
    store
        .update_key(&cleared, &event(o.id, "key.update"))
        .await
        .expect("update_key clearing fields");
    assert_eq!(
        stored_key(store, k1.id).await,
        cleared,
        "update_key must clear fields set to None or empty"
    );

    let at = now();
    revoke(store, &k2, at, false).await;
    let mut late = k2.clone();
    late.name = Some("too late".to_string());
    assert_err!(
        store.update_key(&late, &event(o.id, "key.update")).await,
        StoreError::KeyAlreadyRevoked,
        "update_key of a revoked key"
    );
    let mut expected = k2.clone();
    expected.revoked_at = Some(at);
    assert_eq!(
        stored_key(store, k2.id).await,
        expected,
        "a refused update must leave the revoked key unchanged"
    );

    let ghost = key(o.id, Some(a.id), TokenKind::Agent);
    assert_err!(
        store.update_key(&ghost, &event(o.id, "key.update")).await,
        StoreError::NotFound,
        "update_key of an unknown key"
    );
}

/// Revoking a key revokes its derived children and grandchildren at the same instant, reports
/// exactly the ids it revoked in `cascaded`, and leaves unrelated keys alone.
pub async fn revoke_key_cascades_to_derived_descendants(store: &dyn Store) {
    let (o, _) = new_org(store, "cascade").await;
    let (a, parent) = new_agent(store, o.id, "cascader").await;
    let other = key(o.id, Some(a.id), TokenKind::Agent);
    add_key(store, &other).await;
    let child = derived(&parent);
    add_key(store, &child).await;
    let grandchild = derived(&child);
    add_key(store, &grandchild).await;
    let sibling_tree = derived(&other);
    add_key(store, &sibling_tree).await;

    let at = now();
    let revoked = store
        .revoke_key(parent.id, at, false, &event(o.id, "key.revoke"))
        .await
        .expect("revoke_key of a key whose agent keeps another key");
    let mut expected = parent.clone();
    expected.revoked_at = Some(at);
    assert_eq!(
        revoked.key, expected,
        "revoke_key must return the key as now stored, with revoked_at = now"
    );
    assert_eq!(
        sorted(revoked.cascaded.clone()),
        sorted(vec![child.id, grandchild.id]),
        "cascaded must list exactly the derived descendants (child and grandchild)"
    );
    for (k, what) in [
        (&parent, "the key"),
        (&child, "the child"),
        (&grandchild, "the grandchild"),
    ] {
        assert_eq!(
            stored_key(store, k.id).await.revoked_at,
            Some(at),
            "{what} must be revoked at the revocation's instant"
        );
    }
    for (k, what) in [
        (&other, "another key"),
        (&sibling_tree, "another key's child"),
    ] {
        assert_eq!(
            stored_key(store, k.id).await.revoked_at,
            None,
            "{what} must not be revoked by the cascade"
        );
    }

    // Descendants revoked earlier keep their revocation time and are not reported again.
    let (_, p) = new_agent(store, o.id, "cascader-2").await;
    let q = derived(&p);
    add_key(store, &q).await;
    let r = derived(&p);
    add_key(store, &r).await;
    let q1 = derived(&q);
    add_key(store, &q1).await;
    let early = now() - Duration::seconds(10);
    let first = revoke(store, &q, early, false).await;
    assert_eq!(
        first.cascaded,
        vec![q1.id],
        "revoking a derived key cascades to its own child"
    );
    let later = now();
    let second = revoke(store, &p, later, true).await;
    assert_eq!(
        second.cascaded,
        vec![r.id],
        "cascaded must list only the keys this revocation revoked, not earlier-revoked ones"
    );
    assert_eq!(
        stored_key(store, q.id).await.revoked_at,
        Some(early),
        "an earlier-revoked descendant must keep its revocation time"
    );
    assert_eq!(
        stored_key(store, q1.id).await.revoked_at,
        Some(early),
        "an earlier-revoked grandchild must keep its revocation time"
    );
    assert_eq!(stored_key(store, r.id).await.revoked_at, Some(later));
}

/// Revoking a revoked key fails with `KeyAlreadyRevoked` (with or without force) and changes
/// nothing; revoking an unknown key fails with `NotFound`.
pub async fn revoking_twice_fails_with_key_already_revoked(store: &dyn Store) {
    let (o, _) = new_org(store, "revoke-twice").await;
    let (a, k1) = new_agent(store, o.id, "twice").await;
    let k2 = key(o.id, Some(a.id), TokenKind::Agent);
    add_key(store, &k2).await;
    let at = now() - Duration::seconds(1);
    revoke(store, &k2, at, false).await;
    for force in [false, true] {
        assert_err!(
            store
                .revoke_key(k2.id, now(), force, &event(o.id, "key.revoke"))
                .await,
            StoreError::KeyAlreadyRevoked,
            "revoking a revoked key (force {force})"
        );
    }
    assert_eq!(
        stored_key(store, k2.id).await.revoked_at,
        Some(at),
        "a second revocation must not move revoked_at"
    );
    assert_eq!(stored_key(store, k1.id).await.revoked_at, None);
    assert_err!(
        store
            .revoke_key(Uuid::now_v7(), now(), true, &event(o.id, "key.revoke"))
            .await,
        StoreError::NotFound,
        "revoking an unknown key"
    );
}

/// Without force, an agent's only non-revoked key cannot be revoked (`LastActiveKey`), also
/// while the agent is paused; with force it can.
pub async fn last_active_key_guard_protects_an_agents_only_key(store: &dyn Store) {
    let (o, _) = new_org(store, "last-key").await;
    let (a, k) = new_agent(store, o.id, "lonely").await;
    assert_err!(
        store
            .revoke_key(k.id, now(), false, &event(o.id, "key.revoke"))
            .await,
        StoreError::LastActiveKey,
        "revoking an agent's only key without force"
    );
    assert_eq!(
        stored_key(store, k.id).await.revoked_at,
        None,
        "a refused revocation must leave the key live"
    );
    set_status(store, &a, AgentStatus::Paused).await;
    assert_err!(
        store
            .revoke_key(k.id, now(), false, &event(o.id, "key.revoke"))
            .await,
        StoreError::LastActiveKey,
        "revoking a paused agent's only key without force"
    );
    let at = now();
    let r = revoke(store, &k, at, true).await;
    assert_eq!(
        r.key.revoked_at,
        Some(at),
        "with force the last key must be revoked"
    );
    assert!(r.cascaded.is_empty());

    // Once another live key exists, the first can go without force.
    let (b, b1) = new_agent(store, o.id, "pair").await;
    let b2 = key(o.id, Some(b.id), TokenKind::Agent);
    add_key(store, &b2).await;
    revoke(store, &b1, now(), false).await;
    assert_err!(
        store
            .revoke_key(b2.id, now(), false, &event(o.id, "key.revoke"))
            .await,
        StoreError::LastActiveKey,
        "revoking the key that is left"
    );
}

/// The guard counts the cascade: with key A and key B derived from A, revoking A would leave
/// nothing (`LastActiveKey`), while revoking B leaves A.
pub async fn last_active_key_guard_counts_the_cascade(store: &dyn Store) {
    let (o, _) = new_org(store, "last-key-cascade").await;
    let (_, a) = new_agent(store, o.id, "tree").await;
    let b = derived(&a);
    add_key(store, &b).await;
    assert_err!(
        store
            .revoke_key(a.id, now(), false, &event(o.id, "key.revoke"))
            .await,
        StoreError::LastActiveKey,
        "revoking a key whose cascade takes the agent's every other key"
    );
    assert_eq!(stored_key(store, a.id).await.revoked_at, None);
    assert_eq!(
        stored_key(store, b.id).await.revoked_at,
        None,
        "a refused revocation must not cascade"
    );
    let r = revoke(store, &b, now(), false).await;
    assert!(r.cascaded.is_empty());
    assert_err!(
        store
            .revoke_key(a.id, now(), false, &event(o.id, "key.revoke"))
            .await,
        StoreError::LastActiveKey,
        "revoking the agent's last key after its derived key went"
    );
    revoke(store, &a, now(), true).await;
}

/// Without force, the org's last non-revoked root key cannot be revoked (`LastActiveKey`);
/// derived keys of a root key do not count as root keys.
pub async fn last_active_key_guard_protects_the_orgs_last_root_key(store: &dyn Store) {
    let (o, r1) = new_org(store, "last-root").await;
    assert_err!(
        store
            .revoke_key(r1.id, now(), false, &event(o.id, "key.revoke"))
            .await,
        StoreError::LastActiveKey,
        "revoking the org's only root key without force"
    );
    assert_eq!(stored_key(store, r1.id).await.revoked_at, None);

    let r2 = key(o.id, None, TokenKind::Root);
    add_key(store, &r2).await;
    revoke(store, &r1, now(), false).await;

    let d = derived(&r2);
    add_key(store, &d).await;
    assert_err!(
        store
            .revoke_key(r2.id, now(), false, &event(o.id, "key.revoke"))
            .await,
        StoreError::LastActiveKey,
        "revoking the last root key while only a key derived from it remains"
    );
    // Another org's root key does not count either.
    new_org(store, "last-root-other").await;
    assert_err!(
        store
            .revoke_key(r2.id, now(), false, &event(o.id, "key.revoke"))
            .await,
        StoreError::LastActiveKey,
        "another org's root key must not count for this org"
    );
    let r = revoke(store, &r2, now(), true).await;
    assert_eq!(r.cascaded, vec![d.id], "a forced root revocation cascades");
}

/// Two concurrent non-forced revocations of an agent's last two keys: exactly one succeeds and
/// the other fails with `LastActiveKey`, leaving one live key.
pub async fn concurrent_revocations_of_an_agents_last_two_keys_leave_one(store: Arc<dyn Store>) {
    let (o, _) = new_org(&*store, "concurrent-revoke").await;
    for round in 0..4 {
        let (a, k1) = new_agent(&*store, o.id, &format!("racer-{round}")).await;
        let k2 = key(o.id, Some(a.id), TokenKind::Agent);
        add_key(&*store, &k2).await;
        let barrier = Arc::new(Barrier::new(2));
        let tasks: Vec<_> = [k1.id, k2.id]
            .into_iter()
            .map(|id| {
                let store = Arc::clone(&store);
                let barrier = Arc::clone(&barrier);
                let ev = event(o.id, "key.revoke");
                tokio::spawn(async move {
                    barrier.wait().await;
                    store.revoke_key(id, now(), false, &ev).await
                })
            })
            .collect();
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.expect("revocation task panicked"));
        }
        let (ok, last, other) = tally(&results, |e| matches!(e, StoreError::LastActiveKey));
        assert!(
            ok == 1 && last == 1 && other.is_empty(),
            "round {round}: concurrent revocations of the last two keys must give one Ok and one \
             LastActiveKey; got {ok} Ok, {last} LastActiveKey, others {other:?}"
        );
        let live = keys_of(
            &*store,
            o.id,
            KeyFilter {
                agent_id: Some(a.id),
                ..KeyFilter::default()
            },
            all(),
        )
        .await;
        assert_eq!(
            live.len(),
            1,
            "round {round}: exactly one key must stay live"
        );
    }
}

/// Eight concurrent `create_agent` calls with one name: exactly one succeeds, seven fail with
/// `AgentNameExists`, and only the winner's agent, key and audit event are stored.
pub async fn concurrent_creates_of_one_agent_name_admit_exactly_one(store: Arc<dyn Store>) {
    let (o, _) = new_org(&*store, "concurrent-name").await;
    let barrier = Arc::new(Barrier::new(8));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let store = Arc::clone(&store);
            let barrier = Arc::clone(&barrier);
            let a = agent(o.id, "contested");
            let k = key(o.id, Some(a.id), TokenKind::Agent);
            let ev = event(o.id, "agent.create");
            tokio::spawn(async move {
                barrier.wait().await;
                let r = store.create_agent(&a, &k, &[ev], None).await;
                (a.id, r)
            })
        })
        .collect();
    let mut winners = Vec::new();
    let mut results = Vec::new();
    for t in tasks {
        let (id, r) = t.await.expect("create task panicked");
        if r.is_ok() {
            winners.push(id);
        }
        results.push(r);
    }
    let (ok, taken, other) = tally(&results, |e| matches!(e, StoreError::AgentNameExists));
    assert!(
        ok == 1 && taken == 7 && other.is_empty(),
        "8 concurrent creates of one name must give 1 Ok and 7 AgentNameExists; got {ok} Ok, \
         {taken} AgentNameExists, others {other:?}"
    );
    let listed = store
        .list_agents(o.id, true, all())
        .await
        .expect("list_agents");
    assert_eq!(
        agent_ids(&listed),
        winners,
        "only the winning agent must be stored"
    );
    let agent_keys = keys_of(
        &*store,
        o.id,
        KeyFilter {
            kind: Some(TokenKind::Agent),
            include_revoked: true,
            ..KeyFilter::default()
        },
        all(),
    )
    .await;
    assert_eq!(agent_keys.len(), 1, "only the winner's key must be stored");
    let creates = store
        .list_audit(
            o.id,
            &AuditFilter {
                action: Some("agent.create".to_string()),
                ..AuditFilter::default()
            },
            all(),
        )
        .await
        .expect("list_audit");
    assert_eq!(
        creates.len(),
        1,
        "only the winner's audit event must be stored"
    );
}

// ---------------------------------------------------------------------------------------------
// Idempotency
// ---------------------------------------------------------------------------------------------

/// An idempotency key is claimed with the state change: the record reads back exactly, a second
/// claim of the same (org, key) by `create_agent`, `insert_key` or `rotate_key` fails with
/// `IdempotencyKeyTaken` and changes nothing, another org may use the same key, and a claim
/// whose state change fails is not kept.
pub async fn idempotency_key_is_claimed_once_with_its_state_change(store: &dyn Store) {
    let (o, _) = new_org(store, "idem").await;
    let a = agent(o.id, "idem-agent");
    let k = key(o.id, Some(a.id), TokenKind::Agent);
    let rec = idempotency(o.id, "idem-key-1", Some(a.id));
    store
        .create_agent(&a, &k, &[event(o.id, "agent.create")], Some(&rec))
        .await
        .expect("create_agent with an idempotency record");
    assert_eq!(
        store
            .get_idempotency(o.id, "idem-key-1")
            .await
            .expect("get_idempotency"),
        Some(rec.clone()),
        "get_idempotency must return the stored record exactly"
    );
    let audit_before = audit_of(store, o.id).await;

    let a2 = agent(o.id, "idem-agent-2");
    let k2 = key(o.id, Some(a2.id), TokenKind::Agent);
    let mut rec2 = idempotency(o.id, "idem-key-1", Some(a2.id));
    rec2.request_hash = [9u8; 32];
    rec2.status = 200;
    assert_err!(
        store
            .create_agent(&a2, &k2, &[event(o.id, "agent.create")], Some(&rec2))
            .await,
        StoreError::IdempotencyKeyTaken,
        "create_agent claiming a taken idempotency key"
    );
    assert_eq!(
        store.get_agent(o.id, a2.id).await.expect("get_agent"),
        None,
        "a refused claim must not create the agent"
    );
    assert_eq!(
        store
            .get_agent_by_name(o.id, "idem-agent-2")
            .await
            .expect("get_agent_by_name"),
        None,
        "a refused claim must not create the agent (by name)"
    );
    assert!(
        store
            .find_key_by_digest(&k2.digest)
            .await
            .expect("find_key_by_digest")
            .is_none(),
        "a refused claim must not create the key"
    );

    let k3 = key(o.id, Some(a.id), TokenKind::Agent);
    assert_err!(
        store
            .insert_key(&k3, &event(o.id, "key.create"), Some(&rec2))
            .await,
        StoreError::IdempotencyKeyTaken,
        "insert_key claiming a taken idempotency key"
    );
    assert_eq!(store.get_key(k3.id).await.expect("get_key"), None);

    let successor = key(o.id, Some(a.id), TokenKind::Agent);
    let mut old = k.clone();
    old.deprecated_at = Some(now());
    old.successor_key_id = Some(successor.id);
    assert_err!(
        store
            .rotate_key(&old, &successor, &event(o.id, "key.rotate"), Some(&rec2))
            .await,
        StoreError::IdempotencyKeyTaken,
        "rotate_key claiming a taken idempotency key"
    );
    assert_eq!(store.get_key(successor.id).await.expect("get_key"), None);
    assert_eq!(
        stored_key(store, k.id).await,
        k,
        "a refused rotation must leave the old key unchanged"
    );

    assert_eq!(
        store
            .get_idempotency(o.id, "idem-key-1")
            .await
            .expect("get_idempotency"),
        Some(rec.clone()),
        "refused claims must leave the first record in place"
    );
    assert_eq!(
        audit_of(store, o.id).await,
        audit_before,
        "refused claims must write no audit event"
    );
    assert_eq!(
        store
            .get_idempotency(o.id, "never-claimed")
            .await
            .expect("get_idempotency"),
        None,
        "an unclaimed key must answer None"
    );

    // Keys are scoped by org.
    let (o2, _) = new_org(store, "idem-other").await;
    assert_eq!(
        store
            .get_idempotency(o2.id, "idem-key-1")
            .await
            .expect("get_idempotency"),
        None,
        "another org's idempotency record must not be visible"
    );
    let b = agent(o2.id, "idem-agent");
    let rec_b = idempotency(o2.id, "idem-key-1", Some(b.id));
    store
        .create_agent(
            &b,
            &key(o2.id, Some(b.id), TokenKind::Agent),
            &[event(o2.id, "agent.create")],
            Some(&rec_b),
        )
        .await
        .expect("the same idempotency key in another org must be free");

    // A claim whose state change fails is rolled back with it.
    let clash = agent(o.id, "idem-agent");
    let rec_clash = idempotency(o.id, "idem-key-2", Some(clash.id));
    assert_err!(
        store
            .create_agent(
                &clash,
                &key(o.id, Some(clash.id), TokenKind::Agent),
                &[event(o.id, "agent.create")],
                Some(&rec_clash)
            )
            .await,
        StoreError::AgentNameExists,
        "create_agent with a taken name and a fresh idempotency key"
    );
    assert_eq!(
        store
            .get_idempotency(o.id, "idem-key-2")
            .await
            .expect("get_idempotency"),
        None,
        "the claim of a failed state change must not be kept"
    );
}

/// A record older than `IDEMPOTENCY_TTL_MS` is replaced by the next claim of its key; a younger
/// one still refuses it.
pub async fn expired_idempotency_record_is_replaced_on_the_next_claim(store: &dyn Store) {
    let (o, _) = new_org(store, "idem-expiry").await;
    let t = now();
    let ttl = Duration::milliseconds(IDEMPOTENCY_TTL_MS);

    // Almost 24 hours old: still live.
    let (a, _) = new_agent(store, o.id, "young-holder").await;
    let mut young = idempotency(o.id, "young", Some(a.id));
    young.created_at = t - ttl + Duration::minutes(1);
    add_key_claiming(store, &key(o.id, Some(a.id), TokenKind::Agent), &young)
        .await
        .expect("first claim");
    let k = key(o.id, Some(a.id), TokenKind::Agent);
    let mut retry = idempotency(o.id, "young", Some(a.id));
    retry.created_at = t;
    assert_err!(
        add_key_claiming(store, &k, &retry).await,
        StoreError::IdempotencyKeyTaken,
        "a claim of a key whose record is younger than 24 hours"
    );
    assert_eq!(store.get_key(k.id).await.expect("get_key"), None);
    assert_eq!(
        store
            .get_idempotency(o.id, "young")
            .await
            .expect("get_idempotency"),
        Some(young),
        "a live record must stay in place"
    );

    // More than 24 hours old: replaced.
    let old_agent = agent(o.id, "old-holder");
    let mut old = idempotency(o.id, "old", Some(old_agent.id));
    old.created_at = t - ttl - Duration::hours(1);
    store
        .create_agent(
            &old_agent,
            &key(o.id, Some(old_agent.id), TokenKind::Agent),
            &[event(o.id, "agent.create")],
            Some(&old),
        )
        .await
        .expect("claim with an old record");
    let fresh_agent = agent(o.id, "fresh-holder");
    let mut fresh = idempotency(o.id, "old", Some(fresh_agent.id));
    fresh.created_at = t;
    fresh.request_hash = [3u8; 32];
    fresh.response = json!({ "replaced": true });
    store
        .create_agent(
            &fresh_agent,
            &key(o.id, Some(fresh_agent.id), TokenKind::Agent),
            &[event(o.id, "agent.create")],
            Some(&fresh),
        )
        .await
        .expect("a claim of a key whose record is older than 24 hours must succeed");
    assert_eq!(
        store
            .get_idempotency(o.id, "old")
            .await
            .expect("get_idempotency"),
        Some(fresh),
        "the expired record must be replaced by the new claim"
    );
    assert!(
        store
            .get_agent(o.id, fresh_agent.id)
            .await
            .expect("get_agent")
            .is_some(),
        "the state change of the replacing claim must be stored"
    );
}

/// Records past their 24 hours are deleted by the sweep, in batches of at most `limit`; live
/// ones stay.
pub async fn expired_idempotency_records_are_pruned_in_batches(store: &dyn Store) {
    let (o, _) = new_org(store, "idem-prune").await;
    let t = now();
    let ttl = Duration::milliseconds(IDEMPOTENCY_TTL_MS);
    for (i, age) in [
        ttl + Duration::hours(2),
        ttl + Duration::hours(1),
        ttl + Duration::minutes(1),
    ]
    .into_iter()
    .enumerate()
    {
        let mut rec = idempotency(o.id, &format!("stale-{i}"), None);
        rec.created_at = t - age;
        add_key_claiming(store, &key(o.id, None, TokenKind::Root), &rec)
            .await
            .expect("claim");
    }
    let mut live = idempotency(o.id, "live", None);
    live.created_at = t - ttl + Duration::minutes(1);
    add_key_claiming(store, &key(o.id, None, TokenKind::Root), &live)
        .await
        .expect("claim");
    let cutoff = t - ttl;
    // Batches of two until one comes back short. On a store other checks share, their expired
    // records go too: the assertions below look at this org's records only.
    for batch in 0.. {
        assert!(batch < 10_000, "the sweep does not end");
        let n = store
            .prune_idempotency(cutoff, 2)
            .await
            .expect("prune_idempotency");
        assert!(n <= 2, "a batch deletes at most its limit, deleted {n}");
        if n < 2 {
            break;
        }
    }
    for i in 0..3 {
        assert_eq!(
            store
                .get_idempotency(o.id, &format!("stale-{i}"))
                .await
                .expect("get_idempotency"),
            None,
            "a record past its 24 hours is pruned"
        );
    }
    assert_eq!(
        store
            .get_idempotency(o.id, "live")
            .await
            .expect("get_idempotency"),
        Some(live),
        "a live record stays"
    );
}

async fn add_key_claiming(store: &dyn Store, k: &Key, rec: &IdempotencyRecord) -> StoreResult<()> {
    store
        .insert_key(k, &event(k.org_id, "key.create"), Some(rec))
        .await
}

/// Eight concurrent `create_agent` calls (each a different agent) claiming one idempotency key:
/// exactly one succeeds, the rest fail with `IdempotencyKeyTaken`, and only the winner's agent
/// and record are stored.
pub async fn concurrent_claims_of_one_idempotency_key_admit_exactly_one(store: Arc<dyn Store>) {
    let (o, _) = new_org(&*store, "idem-race").await;
    let barrier = Arc::new(Barrier::new(8));
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let store = Arc::clone(&store);
            let barrier = Arc::clone(&barrier);
            let a = agent(o.id, &format!("claimant-{i}"));
            let k = key(o.id, Some(a.id), TokenKind::Agent);
            let rec = idempotency(o.id, "raced", Some(a.id));
            let ev = event(o.id, "agent.create");
            tokio::spawn(async move {
                barrier.wait().await;
                let r = store.create_agent(&a, &k, &[ev], Some(&rec)).await;
                (a.id, r)
            })
        })
        .collect();
    let mut winners = Vec::new();
    let mut results = Vec::new();
    for t in tasks {
        let (id, r) = t.await.expect("claim task panicked");
        if r.is_ok() {
            winners.push(id);
        }
        results.push(r);
    }
    let (ok, taken, other) = tally(&results, |e| matches!(e, StoreError::IdempotencyKeyTaken));
    assert!(
        ok == 1 && taken == 7 && other.is_empty(),
        "8 concurrent claims of one idempotency key must give 1 Ok and 7 IdempotencyKeyTaken; \
         got {ok} Ok, {taken} IdempotencyKeyTaken, others {other:?}"
    );
    let listed = store
        .list_agents(o.id, true, all())
        .await
        .expect("list_agents");
    assert_eq!(
        agent_ids(&listed),
        winners,
        "only the winning claim's agent must be stored"
    );
    let stored = store
        .get_idempotency(o.id, "raced")
        .await
        .expect("get_idempotency")
        .expect("the winning claim's record must be stored");
    assert_eq!(
        stored.agent_id,
        winners.first().copied(),
        "the stored record must be the winner's"
    );
}

// ---------------------------------------------------------------------------------------------
// Rotation
// ---------------------------------------------------------------------------------------------

/// `rotate_key` inserts the successor exactly and writes the old key's `deprecated_at`,
/// `expires_at` and `successor_key_id`, claiming an idempotency record with it.
pub async fn rotate_key_inserts_the_successor_and_deprecates_the_old_key(store: &dyn Store) {
    let (o, _) = new_org(store, "rotate").await;
    let a = agent(o.id, "rotator");
    let mut old = rich_key(o.id, Some(a.id), TokenKind::Agent);
    old.deprecated_at = None;
    create_agent(store, &a, &old).await;

    let t = now();
    let fresh = key(o.id, Some(a.id), TokenKind::Agent);
    let successor = Key {
        id: fresh.id,
        start: fresh.start.clone(),
        digest: fresh.digest,
        signing_secret_enc: Some(vec![1, 2, 3, 4]),
        expires_at: Some(t + Duration::days(30)),
        deprecated_at: None,
        revoked_at: None,
        successor_key_id: None,
        last_used_at: None,
        created_at: t,
        ..old.clone()
    };
    let mut next = old.clone();
    next.deprecated_at = Some(t);
    next.expires_at = Some(t + Duration::days(7));
    next.successor_key_id = Some(successor.id);
    let rec = idempotency(o.id, "rotate-1", Some(a.id));
    store
        .rotate_key(&next, &successor, &event(o.id, "key.rotate"), Some(&rec))
        .await
        .expect("rotate_key of a live key");
    assert_eq!(
        stored_key(store, successor.id).await,
        successor,
        "rotate_key must insert the successor exactly"
    );
    assert_eq!(
        stored_key(store, old.id).await,
        next,
        "rotate_key must write the old key's deprecated_at, expires_at and successor_key_id"
    );
    let found = store
        .find_key_by_digest(&successor.digest)
        .await
        .expect("find_key_by_digest")
        .expect("the successor must be found by its digest");
    assert_eq!(found.key.id, successor.id);
    assert_eq!(
        store
            .get_idempotency(o.id, "rotate-1")
            .await
            .expect("get_idempotency"),
        Some(rec),
        "rotate_key must store its idempotency record"
    );
}

/// `rotate_key` of a revoked old key fails with `KeyAlreadyRevoked` and inserts no successor;
/// a rotation for a revoked agent fails with `AgentRevoked`.
pub async fn rotate_key_refuses_a_revoked_old_key(store: &dyn Store) {
    let (o, _) = new_org(store, "rotate-revoked").await;
    let (a, old) = new_agent(store, o.id, "rotator").await;
    let keep = key(o.id, Some(a.id), TokenKind::Agent);
    add_key(store, &keep).await;
    let at = now();
    revoke(store, &old, at, false).await;

    let successor = key(o.id, Some(a.id), TokenKind::Agent);
    let mut next = old.clone();
    next.deprecated_at = Some(now());
    next.expires_at = Some(now() + Duration::days(7));
    next.successor_key_id = Some(successor.id);
    assert_err!(
        store
            .rotate_key(&next, &successor, &event(o.id, "key.rotate"), None)
            .await,
        StoreError::KeyAlreadyRevoked,
        "rotate_key of a revoked key"
    );
    assert_eq!(
        store.get_key(successor.id).await.expect("get_key"),
        None,
        "a refused rotation must not insert the successor"
    );
    let mut expected = old.clone();
    expected.revoked_at = Some(at);
    assert_eq!(
        stored_key(store, old.id).await,
        expected,
        "a refused rotation must leave the old key unchanged"
    );

    // A revoked agent gets no new key through rotation either.
    set_status(store, &a, AgentStatus::Revoked).await;
    let successor = key(o.id, Some(a.id), TokenKind::Agent);
    let mut next = keep.clone();
    next.deprecated_at = Some(now());
    next.successor_key_id = Some(successor.id);
    assert_err!(
        store
            .rotate_key(&next, &successor, &event(o.id, "key.rotate"), None)
            .await,
        StoreError::AgentRevoked,
        "rotate_key of a revoked agent's key"
    );
    assert_eq!(store.get_key(successor.id).await.expect("get_key"), None);
    assert_eq!(stored_key(store, keep.id).await, keep);
}

// ---------------------------------------------------------------------------------------------
// Audit
// ---------------------------------------------------------------------------------------------

/// Every state change commits the audit event(s) it was given, and `list_audit` returns them
/// exactly, newest first; `append_audit` adds events of its own.
pub async fn state_changes_write_their_audit_events(store: &dyn Store) {
    let t0 = now() - Duration::minutes(5);
    let at = |i: i64| t0 + ms(i);
    let ev = |org_id: Uuid, action: &str, i: i64| {
        let mut e = event(org_id, action);
        e.occurred_at = at(i);
        e
    };
    let mut o = org(&unique("audit-changes"));
    o.created_at = t0;
    let root = key(o.id, None, TokenKind::Root);
    let mut expected = Vec::new();

    let e = ev(o.id, "org.create", 0);
    store.create_org(&o, &root, &e).await.expect("create_org");
    expected.push(e);

    let a = agent(o.id, "audited");
    let k1 = key(o.id, Some(a.id), TokenKind::Agent);
    let (e1, e2) = (
        ev(o.id, "agent.create", 1),
        rich_event(o.id, "key.create", at(2)),
    );
    store
        .create_agent(&a, &k1, &[e1.clone(), e2.clone()], None)
        .await
        .expect("create_agent");
    expected.extend([e1, e2]);

    let k2 = key(o.id, Some(a.id), TokenKind::Agent);
    let e = ev(o.id, "key.create", 3);
    store.insert_key(&k2, &e, None).await.expect("insert_key");
    expected.push(e);

    let mut a2 = a.clone();
    a2.display_name = Some("Audited".to_string());
    a2.version = 2;
    let e = ev(o.id, "agent.update", 4);
    store.update_agent(&a2, 1, &e).await.expect("update_agent");
    expected.push(e);

    let mut k1b = k1.clone();
    k1b.name = Some("named".to_string());
    let e = ev(o.id, "key.update", 5);
    store.update_key(&k1b, &e).await.expect("update_key");
    expected.push(e);

    let successor = key(o.id, Some(a.id), TokenKind::Agent);
    let mut k1c = k1b.clone();
    k1c.deprecated_at = Some(at(6));
    k1c.successor_key_id = Some(successor.id);
    let e = ev(o.id, "key.rotate", 6);
    store
        .rotate_key(&k1c, &successor, &e, None)
        .await
        .expect("rotate_key");
    expected.push(e);

    let e = ev(o.id, "key.revoke", 7);
    store
        .revoke_key(k2.id, at(7), false, &e)
        .await
        .expect("revoke_key");
    expected.push(e);

    let mut o2 = o.clone();
    o2.name = unique("audit-changes-renamed");
    let e = ev(o.id, "org.update", 8);
    store.update_org(&o2, &e).await.expect("update_org");
    expected.push(e);

    let (e1, e2) = (ev(o.id, "key.verify", 9), ev(o.id, "key.verify", 10));
    store
        .append_audit(&[e1.clone(), e2.clone()])
        .await
        .expect("append_audit");
    expected.extend([e1, e2]);
    store
        .append_audit(&[])
        .await
        .expect("append_audit of no events");

    expected.reverse();
    let listed = audit_of(store, o.id).await;
    assert_eq!(
        event_ids(&listed),
        event_ids(&expected),
        "list_audit must return every state change's event, newest first"
    );
    assert_eq!(
        listed, expected,
        "list_audit must return each event exactly as written (all fields)"
    );
}

/// `list_audit` filters by action, agent (actor or target), key (actor or target), run, thread,
/// outcome, `since` (inclusive) and `until` (exclusive), orders newest first whatever the
/// insertion order, pages with `limit + 1` rows, and never shows another org's events.
pub async fn list_audit_filters_and_pages(store: &dyn Store) {
    let (o, root) = new_org(store, "audit-filters").await;
    let (a, ka) = new_agent(store, o.id, "audit-a").await;
    let (b, kb) = new_agent(store, o.id, "audit-b").await;
    // Events of the setup above are older than this window and filtered out by `since`.
    let t0 = now() + Duration::seconds(1);
    let at = |i: i64| t0 + Duration::seconds(i);
    let mk = |i: i64, action: &str, outcome: Outcome| {
        let mut e = event(o.id, action);
        e.occurred_at = at(i);
        e.outcome = outcome;
        e
    };
    let mut e0 = mk(0, "key.verify", Outcome::Denied);
    e0.actor_key_id = Some(ka.id);
    e0.actor_agent_id = Some(a.id);
    e0.trace.run_id = Some("run-1".to_string());
    e0.trace.thread_id = Some("th-1".to_string());
    e0.error_code = Some("insufficient_scope".to_string());
    let mut e1 = mk(1, "agent.update", Outcome::Success);
    e1.actor_key_id = Some(root.id);
    e1.target_type = Some("agent".to_string());
    e1.target_id = Some(a.id);
    e1.trace.run_id = Some("run-1".to_string());
    e1.trace.thread_id = Some("th-2".to_string());
    let mut e2 = mk(2, "key.revoke", Outcome::Success);
    e2.actor_key_id = Some(root.id);
    e2.target_type = Some("key".to_string());
    e2.target_id = Some(ka.id);
    e2.trace.run_id = Some("run-2".to_string());
    let mut e3 = mk(3, "key.verify", Outcome::Failure);
    e3.actor_key_id = Some(kb.id);
    e3.actor_agent_id = Some(b.id);
    e3.trace.thread_id = Some("th-1".to_string());
    let mut e4 = mk(4, "agent.update", Outcome::Success);
    e4.target_type = Some("agent".to_string());
    e4.target_id = Some(b.id);
    let mut e5 = mk(5, "key.verify", Outcome::Success);
    e5.actor_key_id = Some(ka.id);
    e5.actor_agent_id = Some(a.id);
    e5.trace.run_id = Some("run-2".to_string());

    // Appended out of time order, in two batches.
    store
        .append_audit(&[e3.clone(), e0.clone(), e5.clone()])
        .await
        .expect("append_audit");
    store
        .append_audit(&[e1.clone(), e4.clone(), e2.clone()])
        .await
        .expect("append_audit");
    // Another org's event with the same attributes never shows.
    let (other, _) = new_org(store, "audit-filters-other").await;
    let mut foreign = e5.clone();
    foreign.id = Uuid::now_v7();
    foreign.org_id = other.id;
    store.append_audit(&[foreign]).await.expect("append_audit");

    let window = |f: AuditFilter| AuditFilter {
        since: f.since.or(Some(t0)),
        ..f
    };
    let list = |f: AuditFilter, p: Page| async move {
        event_ids(
            &store
                .list_audit(o.id, &window(f), p)
                .await
                .expect("list_audit"),
        )
    };
    let d = AuditFilter::default;
    let all_events = [&e5, &e4, &e3, &e2, &e1, &e0];
    let full = store
        .list_audit(o.id, &window(d()), all())
        .await
        .expect("list_audit");
    assert_eq!(
        full,
        all_events.iter().map(|e| (*e).clone()).collect::<Vec<_>>(),
        "list_audit must return the events exactly, newest first"
    );

    let cases: Vec<(&str, AuditFilter, Vec<&AuditEvent>)> = vec![
        (
            "action",
            AuditFilter {
                action: Some("key.verify".to_string()),
                ..d()
            },
            vec![&e5, &e3, &e0],
        ),
        (
            "agent_id (actor or target)",
            AuditFilter {
                agent_id: Some(a.id),
                ..d()
            },
            vec![&e5, &e1, &e0],
        ),
        (
            "key_id (actor or target)",
            AuditFilter {
                key_id: Some(ka.id),
                ..d()
            },
            vec![&e5, &e2, &e0],
        ),
        (
            "run_id",
            AuditFilter {
                run_id: Some("run-1".to_string()),
                ..d()
            },
            vec![&e1, &e0],
        ),
        (
            "thread_id",
            AuditFilter {
                thread_id: Some("th-1".to_string()),
                ..d()
            },
            vec![&e3, &e0],
        ),
        (
            "outcome denied",
            AuditFilter {
                outcome: Some(Outcome::Denied),
                ..d()
            },
            vec![&e0],
        ),
        (
            "outcome success",
            AuditFilter {
                outcome: Some(Outcome::Success),
                ..d()
            },
            vec![&e5, &e4, &e2, &e1],
        ),
        (
            "since (inclusive)",
            AuditFilter {
                since: Some(at(2)),
                ..d()
            },
            vec![&e5, &e4, &e3, &e2],
        ),
        (
            "until (exclusive)",
            AuditFilter {
                until: Some(at(2)),
                ..d()
            },
            vec![&e1, &e0],
        ),
        (
            "since and until",
            AuditFilter {
                since: Some(at(1)),
                until: Some(at(4)),
                ..d()
            },
            vec![&e3, &e2, &e1],
        ),
        (
            "action and agent_id",
            AuditFilter {
                action: Some("key.verify".to_string()),
                agent_id: Some(a.id),
                ..d()
            },
            vec![&e5, &e0],
        ),
        (
            "unknown action",
            AuditFilter {
                action: Some("nothing.happened".to_string()),
                ..d()
            },
            vec![],
        ),
    ];
    for (what, filter, want) in cases {
        assert_eq!(
            list(filter, all()).await,
            want.iter().map(|e| e.id).collect::<Vec<_>>(),
            "list_audit filtered by {what}"
        );
    }

    let ids = |v: &[&AuditEvent]| v.iter().map(|e| e.id).collect::<Vec<_>>();
    assert_eq!(
        list(d(), page(2, 0)).await,
        ids(&all_events[0..3]),
        "list_audit must return limit + 1 rows when more exist"
    );
    assert_eq!(
        list(d(), page(2, 2)).await,
        ids(&all_events[2..5]),
        "list_audit must start at the offset"
    );
    assert_eq!(
        list(d(), page(2, 4)).await,
        ids(&all_events[4..6]),
        "the last page holds what is left"
    );
    assert!(
        list(d(), page(2, 6)).await.is_empty(),
        "an offset past the end must return nothing"
    );
    assert_eq!(
        list(
            AuditFilter {
                action: Some("key.verify".to_string()),
                ..d()
            },
            page(1, 1)
        )
        .await,
        vec![e3.id, e0.id],
        "pagination applies after filtering"
    );
}

/// A state change that fails writes no audit event and changes nothing: each refusal below
/// leaves the org's audit log exactly as it was.
pub async fn failed_state_changes_write_no_audit_event(store: &dyn Store) {
    let (o, root) = new_org(store, "atomic").await;
    let (a, k) = new_agent(store, o.id, "taken").await;
    let (r, rk) = new_agent(store, o.id, "revoked").await;
    let r = set_status(store, &r, AgentStatus::Revoked).await;
    let (_, spare) = new_agent(store, o.id, "spare").await;
    let spare2 = key(o.id, spare.agent_id, TokenKind::Agent);
    add_key(store, &spare2).await;
    revoke(store, &spare2, now(), false).await;
    new_agent(store, o.id, "idem-holder").await;
    let held = agent(o.id, "idem-holder-2");
    store
        .create_agent(
            &held,
            &key(o.id, Some(held.id), TokenKind::Agent),
            &[event(o.id, "agent.create")],
            Some(&idempotency(o.id, "atomic-idem", Some(held.id))),
        )
        .await
        .expect("create_agent with an idempotency record");

    let before = audit_of(store, o.id).await;
    let fail = |what: &str| event(o.id, &format!("fail.{what}"));

    let dup = agent(o.id, "taken");
    let dup_key = key(o.id, Some(dup.id), TokenKind::Agent);
    assert_err!(
        store
            .create_agent(&dup, &dup_key, &[fail("agent.create")], None)
            .await,
        StoreError::AgentNameExists,
        "create_agent with a taken name"
    );
    assert_eq!(store.get_key(dup_key.id).await.expect("get_key"), None);

    let same_name = org(&o.name);
    assert_err!(
        store
            .create_org(
                &same_name,
                &key(same_name.id, None, TokenKind::Root),
                &event(same_name.id, "fail.org.create")
            )
            .await,
        StoreError::OrgNameExists,
        "create_org with a taken name"
    );
    assert!(
        audit_of(store, same_name.id).await.is_empty(),
        "a refused create_org must write no audit event"
    );

    let mut stale = a.clone();
    stale.version = 5;
    assert_err!(
        store
            .update_agent(&stale, 4, &fail("agent.update.stale"))
            .await,
        StoreError::Conflict,
        "update_agent with a stale version"
    );
    let mut dead = r.clone();
    dead.version = r.version + 1;
    assert_err!(
        store
            .update_agent(&dead, r.version, &fail("agent.update.revoked"))
            .await,
        StoreError::AgentRevoked,
        "update_agent of a revoked agent"
    );
    assert_err!(
        store
            .insert_key(
                &key(o.id, Some(r.id), TokenKind::Agent),
                &fail("key.create"),
                None
            )
            .await,
        StoreError::AgentRevoked,
        "insert_key for a revoked agent"
    );
    assert_err!(
        store
            .revoke_key(k.id, now(), false, &fail("key.revoke.last"))
            .await,
        StoreError::LastActiveKey,
        "revoke_key of the last key"
    );
    assert_err!(
        store
            .revoke_key(root.id, now(), false, &fail("key.revoke.root"))
            .await,
        StoreError::LastActiveKey,
        "revoke_key of the last root key"
    );
    assert_err!(
        store
            .revoke_key(spare2.id, now(), true, &fail("key.revoke.twice"))
            .await,
        StoreError::KeyAlreadyRevoked,
        "revoke_key of a revoked key"
    );
    assert_err!(
        store.update_key(&spare2, &fail("key.update")).await,
        StoreError::KeyAlreadyRevoked,
        "update_key of a revoked key"
    );
    let successor = key(o.id, spare.agent_id, TokenKind::Agent);
    assert_err!(
        store
            .rotate_key(&spare2, &successor, &fail("key.rotate"), None)
            .await,
        StoreError::KeyAlreadyRevoked,
        "rotate_key of a revoked key"
    );
    let successor = key(o.id, Some(r.id), TokenKind::Agent);
    assert_err!(
        store
            .rotate_key(&rk, &successor, &fail("key.rotate.revoked-agent"), None)
            .await,
        StoreError::AgentRevoked,
        "rotate_key for a revoked agent"
    );
    let other = agent(o.id, "idem-loser");
    assert_err!(
        store
            .create_agent(
                &other,
                &key(o.id, Some(other.id), TokenKind::Agent),
                &[fail("agent.create.idem")],
                Some(&idempotency(o.id, "atomic-idem", Some(other.id)))
            )
            .await,
        StoreError::IdempotencyKeyTaken,
        "create_agent with a taken idempotency key"
    );

    let after = audit_of(store, o.id).await;
    let leaked: Vec<&str> = after
        .iter()
        .filter(|e| e.action.starts_with("fail."))
        .map(|e| e.action.as_str())
        .collect();
    assert!(
        leaked.is_empty(),
        "failed state changes must write no audit event; found {leaked:?}"
    );
    assert_eq!(
        after, before,
        "failed state changes must leave the audit log unchanged"
    );
}

// ---------------------------------------------------------------------------------------------
// Everything
// ---------------------------------------------------------------------------------------------

/// Runs every check, one after the other, on one shared store.
pub async fn run_all(store: Arc<dyn Store>) {
    let s = &*store;
    org_round_trips_through_create_get_and_first_org(s).await;
    org_names_are_unique(s).await;
    agent_round_trips_through_create_get_get_by_name_and_list(s).await;
    agent_names_are_unique_among_live_agents_and_reusable_after_revocation(s).await;
    list_agents_pages_by_created_at_and_filters_revoked(s).await;
    update_agent_refuses_stale_versions_and_revoked_agents(s).await;
    insert_key_refuses_keys_for_revoked_agents(s).await;
    find_key_by_digest_returns_the_key_and_its_agent_status(s).await;
    list_keys_filters_by_agent_kind_and_revocation(s).await;
    update_key_writes_mutable_fields_and_refuses_revoked_keys(s).await;
    revoke_key_cascades_to_derived_descendants(s).await;
    revoking_twice_fails_with_key_already_revoked(s).await;
    last_active_key_guard_protects_an_agents_only_key(s).await;
    last_active_key_guard_counts_the_cascade(s).await;
    last_active_key_guard_protects_the_orgs_last_root_key(s).await;
    concurrent_revocations_of_an_agents_last_two_keys_leave_one(Arc::clone(&store)).await;
    concurrent_creates_of_one_agent_name_admit_exactly_one(Arc::clone(&store)).await;
    idempotency_key_is_claimed_once_with_its_state_change(s).await;
    expired_idempotency_record_is_replaced_on_the_next_claim(s).await;
    expired_idempotency_records_are_pruned_in_batches(s).await;
    concurrent_claims_of_one_idempotency_key_admit_exactly_one(Arc::clone(&store)).await;
    rotate_key_inserts_the_successor_and_deprecates_the_old_key(s).await;
    rotate_key_refuses_a_revoked_old_key(s).await;
    state_changes_write_their_audit_events(s).await;
    list_audit_filters_and_pages(s).await;
    failed_state_changes_write_no_audit_event(s).await;
    usage_counts_add_up_and_read_back_by_hour(s).await;
    last_used_at_only_moves_forward(s).await;
    last_used_at_holds_through_hours_of_refusals(s).await;
    a_large_usage_flush_writes_every_row(s).await;
    a_quota_threshold_is_announced_once_per_period(s).await;
    import_keys_inserts_all_or_nothing(s).await;
    concurrent_quota_takes_admit_exactly_the_limit(Arc::clone(&store)).await;
    a_change_watch_hears_every_change_to_existing_keys(s).await;
    a_shared_store_admits_each_signature_once(s).await;
}

/// A store other processes write admits each signature once until it expires; a store only this
/// process writes leaves replays to the process (it admits every claim).
pub async fn a_shared_store_admits_each_signature_once(store: &dyn Store) {
    let id: [u8; 32] = *Uuid::now_v7().as_bytes().repeat(2).first_chunk().unwrap();
    let other: [u8; 32] = *Uuid::now_v7().as_bytes().repeat(2).first_chunk().unwrap();
    assert!(store.claim_signature(&id, 1300, 1000).await.unwrap());
    let again = store.claim_signature(&id, 1300, 1100).await.unwrap();
    assert_eq!(
        again,
        !store.is_shared(),
        "a shared store refuses a second claim within the window"
    );
    assert!(store.claim_signature(&other, 1300, 1100).await.unwrap());
    assert!(
        store.claim_signature(&id, 1700, 1400).await.unwrap(),
        "an expired claim may be taken again"
    );
}

/// 64 concurrent takes against a limit of 25 succeed exactly 25 times, each seeing a distinct
/// count; another period of the same key counts from zero.
pub async fn concurrent_quota_takes_admit_exactly_the_limit(store: Arc<dyn Store>) {
    let key_id = Uuid::now_v7();
    let period = hour_of(now());
    let end = period + Duration::hours(1);
    let barrier = Arc::new(Barrier::new(64));
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let store = Arc::clone(&store);
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                barrier.wait().await;
                store
                    .take_quota_unit(key_id, period, end, 25)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut counts = Vec::new();
    for t in tasks {
        if let Some(n) = t.await.unwrap() {
            counts.push(n);
        }
    }
    counts.sort_unstable();
    assert_eq!(
        counts,
        (1..=25).collect::<Vec<u64>>(),
        "exactly the limit is taken, each unit once"
    );
    assert_eq!(store.quota_units(key_id, period).await.unwrap(), 25);
    assert_eq!(
        store
            .take_quota_unit(key_id, period, end, 26)
            .await
            .unwrap(),
        Some(26),
        "a larger limit (the quota was raised) admits more"
    );
    let next = end;
    let next_end = next + Duration::hours(1);
    assert_eq!(store.quota_units(key_id, next).await.unwrap(), 0);
    assert_eq!(
        store
            .take_quota_unit(key_id, next, next_end, 25)
            .await
            .unwrap(),
        Some(1)
    );
    assert_eq!(
        store
            .take_quota_unit(key_id, next, next_end, 0)
            .await
            .unwrap(),
        None,
        "a limit of zero admits nothing"
    );

    // The first take of a period starts from the allowed uses already counted for it (a quota
    // set on a key that was in use); uses outside the period do not count.
    let used_key = Uuid::now_v7();
    let delta = |hour, allowed| UsageDelta {
        key_id: used_key,
        org_id: Uuid::now_v7(),
        hour,
        allowed,
        denied: 3,
        rate_limited: 0,
    };
    store
        .record_usage(
            &[delta(period, 7), delta(period - Duration::hours(1), 50)],
            &[],
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        store
            .take_quota_unit(used_key, period, end, 10)
            .await
            .unwrap(),
        Some(8),
        "7 allowed uses already counted in the period, then this one"
    );
    let full_key = Uuid::now_v7();
    store
        .record_usage(
            &[UsageDelta {
                key_id: full_key,
                ..delta(period, 10)
            }],
            &[],
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        store
            .take_quota_unit(full_key, period, end, 10)
            .await
            .unwrap(),
        None,
        "a quota already used up by counted uses admits nothing"
    );
}

/// A shared store's watch answers `Resumed` when it connects, `Quiet` while nothing changes
/// (creating keys changes no existing key), and `Changed` after a key update, a revocation, an
/// agent update, a rotation and an org policy change. A store only this process writes has no
/// watch.
pub async fn a_change_watch_hears_every_change_to_existing_keys(store: &dyn Store) {
    let Some(mut watch) = store.watch_changes().await.unwrap() else {
        assert!(
            !store.is_shared(),
            "a store other processes write must offer a change watch"
        );
        return;
    };
    let wait = std::time::Duration::from_millis(300);
    let long = std::time::Duration::from_secs(5);
    assert_eq!(watch.next(long).await.unwrap(), Signal::Resumed);
    let (mut o, _) = new_org(store, "watch").await;
    let (a, k1) = new_agent(store, o.id, "watched").await;
    let k2 = key(o.id, Some(a.id), TokenKind::Agent);
    add_key(store, &k2).await;
    assert_eq!(
        watch.next(wait).await.unwrap(),
        Signal::Quiet,
        "creations are not changes to existing keys"
    );

    let mut changed = stored_key(store, k1.id).await;
    changed.name = Some("renamed".into());
    store
        .update_key(&changed, &event(o.id, "key.update"))
        .await
        .unwrap();
    assert_eq!(
        watch.next(long).await.unwrap(),
        Signal::Changed,
        "key update"
    );

    revoke(store, &k2, now(), false).await;
    assert_eq!(
        watch.next(long).await.unwrap(),
        Signal::Changed,
        "revocation"
    );

    set_status(store, &a, AgentStatus::Paused).await;
    assert_eq!(
        watch.next(long).await.unwrap(),
        Signal::Changed,
        "agent update"
    );

    let successor = key(o.id, Some(a.id), TokenKind::Agent);
    let mut old = stored_key(store, k1.id).await;
    old.deprecated_at = Some(now());
    old.expires_at = Some(now() + Duration::days(1));
    old.successor_key_id = Some(successor.id);
    store
        .rotate_key(&old, &successor, &event(o.id, "key.rotate"), None)
        .await
        .unwrap();
    assert_eq!(watch.next(long).await.unwrap(), Signal::Changed, "rotation");

    o.policy.rules = Vec::new();
    o.name = unique("watch-renamed");
    store
        .update_org(&o, &event(o.id, "org.update"))
        .await
        .unwrap();
    assert_eq!(
        watch.next(long).await.unwrap(),
        Signal::Changed,
        "org update"
    );
    assert_eq!(watch.next(wait).await.unwrap(), Signal::Quiet);
}

/// `import_keys` inserts every key with one event, or none when one of them cannot go in.
pub async fn import_keys_inserts_all_or_nothing(store: &dyn Store) {
    let (o, _) = new_org(store, "import").await;
    let (a, _) = new_agent(store, o.id, "importer").await;
    let batch: Vec<Key> = (0..50)
        .map(|_| key(o.id, Some(a.id), TokenKind::Agent))
        .collect();
    store
        .import_keys(&batch, &event(o.id, "key.import"))
        .await
        .unwrap();
    for k in &batch {
        let found = store.find_key_by_digest(&k.digest).await.unwrap();
        assert_eq!(
            found.map(|f| f.key.id),
            Some(k.id),
            "every imported key is found by digest"
        );
    }
    // A batch with a duplicate digest fails whole: neither key nor event is written.
    let fresh = key(o.id, Some(a.id), TokenKind::Agent);
    let dup = Key {
        id: Uuid::now_v7(),
        ..batch[0].clone()
    };
    assert!(store
        .import_keys(&[fresh.clone(), dup], &event(o.id, "key.import"))
        .await
        .is_err());
    assert!(store
        .find_key_by_digest(&fresh.digest)
        .await
        .unwrap()
        .is_none());
    let events = store
        .list_audit(
            o.id,
            &AuditFilter {
                action: Some("key.import".into()),
                ..Default::default()
            },
            all(),
        )
        .await
        .unwrap();
    assert_eq!(
        events.len(),
        1,
        "one event for the successful import, none for the failed one"
    );
}

/// The start of the UTC hour of `t`.
fn hour_of(t: Timestamp) -> Timestamp {
    keyward_core::quota::period_start(QuotaPeriod::Hour, t)
}

/// Usage counts from several flushes add up per (key, hour) and read back by range.
pub async fn usage_counts_add_up_and_read_back_by_hour(store: &dyn Store) {
    let (o, _) = new_org(store, "usage").await;
    let (_, k) = new_agent(store, o.id, "usage-agent").await;
    let h0 = hour_of(now());
    let h1 = h0 + Duration::hours(1);
    let d = |hour, allowed, denied, rate_limited| UsageDelta {
        key_id: k.id,
        org_id: o.id,
        hour,
        allowed,
        denied,
        rate_limited,
    };
    store
        .record_usage(&[d(h0, 3, 1, 0), d(h1, 5, 0, 2)], &[], &[])
        .await
        .unwrap();
    store
        .record_usage(&[d(h0, 4, 0, 1)], &[], &[])
        .await
        .unwrap();
    let all_hours = store
        .usage_hours(k.id, h0, h1 + Duration::hours(1))
        .await
        .unwrap();
    assert_eq!(
        all_hours,
        vec![
            UsageBucket {
                start: h0,
                allowed: 7,
                denied: 1,
                rate_limited: 1
            },
            UsageBucket {
                start: h1,
                allowed: 5,
                denied: 0,
                rate_limited: 2
            },
        ],
        "deltas of one hour must add up, hours read back oldest first"
    );
    assert_eq!(
        store
            .usage_hours(k.id, h1, h1 + Duration::hours(1))
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(store.allowed_between(k.id, h0, h1).await.unwrap(), 7);
    assert_eq!(
        store
            .allowed_between(k.id, h0, h1 + Duration::hours(1))
            .await
            .unwrap(),
        12
    );
    assert_eq!(
        store.allowed_between(Uuid::now_v7(), h0, h1).await.unwrap(),
        0
    );
}

/// `last_used_at` is moved forward by a flush, never back by a late one.
pub async fn last_used_at_only_moves_forward(store: &dyn Store) {
    let (o, _) = new_org(store, "last-used").await;
    let (_, k) = new_agent(store, o.id, "lu-agent").await;
    let t1 = now();
    let t0 = t1 - Duration::minutes(5);
    store.record_usage(&[], &[(k.id, t1)], &[]).await.unwrap();
    store.record_usage(&[], &[(k.id, t0)], &[]).await.unwrap();
    let got = store.get_key(k.id).await.unwrap().unwrap();
    assert_eq!(
        got.last_used_at,
        Some(t1),
        "a late, older flush must not move last_used_at back"
    );
}

/// A key's last use holds through later flushes that count it only as refused (no use of it
/// succeeded since), and a later use moves it on even when its flush carries no counts for that
/// hour. (Older uses arriving late and a key named twice in one flush are
/// `last_used_at_only_moves_forward`'s and `a_large_usage_flush_writes_every_row`'s.)
pub async fn last_used_at_holds_through_hours_of_refusals(store: &dyn Store) {
    let (o, _) = new_org(store, "last-used-refused").await;
    let (_, k) = new_agent(store, o.id, "lur-agent").await;
    let t = now() - Duration::hours(3);
    let h0 = hour_of(t);
    let delta = |hour, allowed, denied| UsageDelta {
        key_id: k.id,
        org_id: o.id,
        hour,
        allowed,
        denied,
        rate_limited: 0,
    };
    // The use and its hour's count in one flush, then two hours of denials only.
    store
        .record_usage(&[delta(h0, 1, 0)], &[(k.id, t)], &[])
        .await
        .unwrap();
    for h in [h0 + Duration::hours(1), h0 + Duration::hours(2)] {
        store
            .record_usage(&[delta(h, 0, 4)], &[], &[])
            .await
            .unwrap();
    }
    let got = || async { store.get_key(k.id).await.unwrap().unwrap().last_used_at };
    assert_eq!(
        got().await,
        Some(t),
        "hours of refusals do not hide the last use"
    );
    // A later use in an hour this flush counts nothing for (the counts went with another).
    let later = t + Duration::minutes(150);
    store
        .record_usage(&[], &[(k.id, later)], &[])
        .await
        .unwrap();
    assert_eq!(got().await, Some(later));
}

/// One flush may carry tens of thousands of rows (every key used in the last second), more than
/// one statement takes, and may name a (key, hour) or a key's last use twice: every count lands,
/// twice-named counts add up, and the latest use wins.
pub async fn a_large_usage_flush_writes_every_row(store: &dyn Store) {
    let (o, _) = new_org(store, "big-flush").await;
    let (agent, k1) = new_agent(store, o.id, "big-flush-agent").await;
    let k2 = key(o.id, Some(agent.id), TokenKind::Agent);
    add_key(store, &k2).await;
    let h0 = hour_of(now());
    let h1 = h0 + Duration::hours(1);
    let d = |key_id, hour, allowed| UsageDelta {
        key_id,
        org_id: o.id,
        hour,
        allowed,
        denied: 1,
        rate_limited: 0,
    };
    // 25,000 counts of keys the store need not know (usage rows carry no foreign key), then the
    // real keys' counts, one of them twice.
    let others: Vec<Uuid> = (0..12_500).map(|_| Uuid::now_v7()).collect();
    let mut deltas: Vec<UsageDelta> = others
        .iter()
        .flat_map(|id| [d(*id, h0, 2), d(*id, h1, 3)])
        .collect();
    deltas.push(d(k1.id, h0, 5));
    deltas.push(d(k2.id, h0, 7));
    deltas.push(d(k1.id, h0, 11));
    let t1 = now();
    let t0 = t1 - Duration::minutes(1);
    store
        .record_usage(&deltas, &[(k1.id, t0), (k2.id, t0), (k1.id, t1)], &[])
        .await
        .unwrap();
    let end = h1 + Duration::hours(1);
    assert_eq!(store.allowed_between(k1.id, h0, end).await.unwrap(), 16);
    assert_eq!(store.allowed_between(k2.id, h0, end).await.unwrap(), 7);
    for id in [others[0], others[6_000], others[12_499]] {
        assert_eq!(
            store.allowed_between(id, h0, end).await.unwrap(),
            5,
            "every row of a large flush must land"
        );
    }
    let hours = store.usage_hours(k1.id, h0, end).await.unwrap();
    assert_eq!(hours.len(), 1);
    assert_eq!(
        (hours[0].allowed, hours[0].denied),
        (16, 2),
        "a (key, hour) named twice in one flush adds both counts"
    );
    let got = |k: Uuid| async move { store.get_key(k).await.unwrap().unwrap().last_used_at };
    assert_eq!(got(k1.id).await, Some(t1), "the latest use of a key wins");
    assert_eq!(got(k2.id).await, Some(t0));
}

/// A threshold's event is written the first time only, per key and period.
pub async fn a_quota_threshold_is_announced_once_per_period(store: &dyn Store) {
    let (o, _) = new_org(store, "alerts").await;
    let (_, k) = new_agent(store, o.id, "alert-agent").await;
    let period = hour_of(now());
    let alert = |period_start, threshold| ThresholdAlert {
        key_id: k.id,
        period_start,
        threshold,
        event: AuditEvent {
            target_id: Some(k.id),
            ..event(o.id, "key.usage_threshold")
        },
    };
    store
        .record_usage(&[], &[], &[alert(period, 80)])
        .await
        .unwrap();
    store
        .record_usage(&[], &[], &[alert(period, 80), alert(period, 100)])
        .await
        .unwrap();
    store
        .record_usage(&[], &[], &[alert(period + Duration::hours(1), 80)])
        .await
        .unwrap();
    let events = store
        .list_audit(
            o.id,
            &AuditFilter {
                action: Some("key.usage_threshold".into()),
                ..Default::default()
            },
            all(),
        )
        .await
        .unwrap();
    assert_eq!(
        events.len(),
        3,
        "80 once, 100 once in the first period, 80 again in the next"
    );
}

/// What a backend's conformance tests need: a fresh store, and its cleanup.
#[async_trait::async_trait]
pub trait Harness: Send + Sized {
    /// The store under test.
    fn store(&self) -> Arc<dyn Store>;
    /// Closes the store and removes what the test made (best effort).
    async fn finish(self);
}

/// Generates one `#[tokio::test]` per conformance check (so a failure is named after the rule
/// it broke) plus one running every check on a single shared store. `$open` is an async fn
/// returning `Option<impl Harness>`; `None` skips the test (a backend that is not available on
/// this machine). The list of checks lives only here.
#[macro_export]
macro_rules! conformance_tests {
    ($open:path) => {
        $crate::conformance_tests!(@single $open;
            org_round_trips_through_create_get_and_first_org,
            org_names_are_unique,
            agent_round_trips_through_create_get_get_by_name_and_list,
            agent_names_are_unique_among_live_agents_and_reusable_after_revocation,
            list_agents_pages_by_created_at_and_filters_revoked,
            update_agent_refuses_stale_versions_and_revoked_agents,
            insert_key_refuses_keys_for_revoked_agents,
            find_key_by_digest_returns_the_key_and_its_agent_status,
            list_keys_filters_by_agent_kind_and_revocation,
            update_key_writes_mutable_fields_and_refuses_revoked_keys,
            revoke_key_cascades_to_derived_descendants,
            revoking_twice_fails_with_key_already_revoked,
            last_active_key_guard_protects_an_agents_only_key,
            last_active_key_guard_counts_the_cascade,
            last_active_key_guard_protects_the_orgs_last_root_key,
            idempotency_key_is_claimed_once_with_its_state_change,
            expired_idempotency_record_is_replaced_on_the_next_claim,
            expired_idempotency_records_are_pruned_in_batches,
            rotate_key_inserts_the_successor_and_deprecates_the_old_key,
            rotate_key_refuses_a_revoked_old_key,
            state_changes_write_their_audit_events,
            list_audit_filters_and_pages,
            failed_state_changes_write_no_audit_event,
            usage_counts_add_up_and_read_back_by_hour,
            last_used_at_only_moves_forward,
            last_used_at_holds_through_hours_of_refusals,
            a_large_usage_flush_writes_every_row,
            a_quota_threshold_is_announced_once_per_period,
            import_keys_inserts_all_or_nothing,
            a_change_watch_hears_every_change_to_existing_keys,
            a_shared_store_admits_each_signature_once,
        );
        $crate::conformance_tests!(@concurrent $open;
            concurrent_quota_takes_admit_exactly_the_limit,
            concurrent_revocations_of_an_agents_last_two_keys_leave_one,
            concurrent_creates_of_one_agent_name_admit_exactly_one,
            concurrent_claims_of_one_idempotency_key_admit_exactly_one,
        );

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn run_all_checks_on_one_shared_store() {
            use $crate::conformance::Harness as _;
            let Some(h) = $open().await else { return };
            $crate::conformance::run_all(h.store()).await;
            h.finish().await;
        }
    };
    (@single $open:path; $($name:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $name() {
            use $crate::conformance::Harness as _;
            let Some(h) = $open().await else { return };
            $crate::conformance::$name(&*h.store()).await;
            h.finish().await;
        }
    )*};
    (@concurrent $open:path; $($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $name() {
            use $crate::conformance::Harness as _;
            let Some(h) = $open().await else { return };
            $crate::conformance::$name(h.store()).await;
            h.finish().await;
        }
    )*};
}
