//! The verify cache (DESIGN.md "The hot path"): prepared snapshots keyed by token digest, with
//! everything the checks need pre-parsed (key, agent status, org and agent deny rules, the
//! resolved rate limit), so a hit does no JSON work and no store access.
//!
//! Unknown digests are cached too, in a separate, smaller cache with a shorter TTL, so a flood of
//! guessed tokens reaches the store at most once per distinct token per negative TTL and cannot
//! evict the snapshots of real keys. Concurrent misses for one digest are coalesced into one store
//! read.
//!
//! Invalidation: every write that changes what a key may do calls `invalidate_all` (through
//! `AppState::on_key_change`). A generation counter closes the race where a read that started
//! before the write would put its stale answer back into the cache after the invalidation: such a
//! read notices the generation moved, drops its entry and reads the store again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keyward_core::gcra::Gcra;
use keyward_core::model::{AgentStatus, Key, OrgPolicy, RateLimit, Rule};
use keyward_core::token::TokenDigest;
use keyward_store::{KeyWithAgent, Store, StoreError};

/// Sizes and lifetimes of the cache.
#[derive(Debug, Clone, Copy)]
pub struct CacheSettings {
    /// Most snapshots of real keys kept.
    pub capacity: u64,
    /// How long a snapshot may be served without a store read (bounds staleness for writes made
    /// by another process; writes through this server invalidate at once).
    pub ttl: Duration,
    /// Most unknown digests remembered.
    pub negative_capacity: u64,
    /// How long an unknown digest is remembered.
    pub negative_ttl: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            capacity: 2_000_000,
            ttl: Duration::from_secs(30),
            negative_capacity: 100_000,
            negative_ttl: Duration::from_secs(10),
        }
    }
}

/// What the hot path knows about a key, prepared once per cache fill.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub key: Key,
    pub agent_status: Option<AgentStatus>,
    pub agent_name: Option<String>,
    /// Org rules, then the agent's.
    pub rules: Vec<Rule>,
    /// The key's effective rate limit (its own, its tier's, or the org default), if any.
    pub rate: Option<Gcra>,
}

/// Resolves a key's rate limit: its own setting, else the org's default; tiers by name.
pub fn resolve_rate(key: &Key, policy: &OrgPolicy) -> Option<Gcra> {
    let limit = key
        .rate_limit
        .as_ref()
        .or(policy.default_rate_limit.as_ref())?;
    let spec = match limit {
        RateLimit::Custom(spec) => *spec,
        RateLimit::Tier { tier } => *policy.rate_limit_tiers.get(tier)?,
    };
    Gcra::new(spec.limit, spec.period_s, spec.burst)
}

impl Prepared {
    pub fn from_store(found: KeyWithAgent) -> Prepared {
        let mut rules = found.org_policy.rules.clone();
        if let Some(p) = &found.agent_policy {
            // Agent policies are validated on write; a rule that no longer parses is skipped
            // rather than failing every request of the agent.
            rules.extend(
                keyward_core::model::validate_policy_rules("policy", p).unwrap_or_default(),
            );
        }
        Prepared {
            rate: resolve_rate(&found.key, &found.org_policy),
            key: found.key,
            agent_status: found.agent_status,
            agent_name: found.agent_name,
            rules,
        }
    }
}

#[derive(Debug, Clone)]
enum Miss {
    NotFound,
    Store(String, bool),
}

/// The cache itself.
pub struct VerifyCache {
    found: moka::future::Cache<TokenDigest, Arc<Prepared>>,
    missing: moka::future::Cache<TokenDigest, ()>,
    generation: AtomicU64,
}

impl std::fmt::Debug for VerifyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyCache")
            .field("entries", &self.found.entry_count())
            .finish()
    }
}

impl VerifyCache {
    pub fn new(s: CacheSettings) -> VerifyCache {
        let evicted = |_k: Arc<TokenDigest>, _v, cause: moka::notification::RemovalCause| {
            if cause == moka::notification::RemovalCause::Size {
                metrics::counter!("keyward_verify_cache_evictions_total").increment(1);
            }
        };
        VerifyCache {
            found: moka::future::Cache::builder()
                .max_capacity(s.capacity)
                .time_to_live(s.ttl)
                .eviction_listener(evicted)
                .build(),
            missing: moka::future::Cache::builder()
                .max_capacity(s.negative_capacity)
                .time_to_live(s.negative_ttl)
                .build(),
            generation: AtomicU64::new(0),
        }
    }

    /// Drops every entry; reads in flight will not re-insert what they read before this call.
    pub fn invalidate_all(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.found.invalidate_all();
        self.missing.invalidate_all();
    }

    /// The prepared snapshot of a digest, or `None` for an unknown token.
    pub async fn lookup(
        &self,
        store: &dyn Store,
        digest: TokenDigest,
    ) -> Result<Option<Arc<Prepared>>, StoreError> {
        let generation = self.generation.load(Ordering::Acquire);
        if self.missing.contains_key(&digest) {
            metrics::counter!("keyward_verify_cache_total", "result" => "negative_hit")
                .increment(1);
            return Ok(None);
        }
        let loaded = AtomicBool::new(false);
        let got = self
            .found
            .try_get_with(digest, async {
                loaded.store(true, Ordering::Relaxed);
                match store.find_key_by_digest(&digest).await {
                    Ok(Some(k)) => Ok(Arc::new(Prepared::from_store(k))),
                    Ok(None) => Err(Miss::NotFound),
                    Err(e) => {
                        let unavailable = matches!(e, StoreError::Unavailable(_));
                        Err(Miss::Store(e.to_string(), unavailable))
                    }
                }
            })
            .await;
        let result = if loaded.load(Ordering::Relaxed) {
            "miss"
        } else {
            "hit"
        };
        metrics::counter!("keyward_verify_cache_total", "result" => result).increment(1);
        let answer = match got {
            Ok(p) => Some(p),
            Err(e) => match &*e {
                Miss::NotFound => {
                    self.missing.insert(digest, ()).await;
                    None
                }
                Miss::Store(msg, true) => return Err(StoreError::Unavailable(msg.clone())),
                Miss::Store(msg, false) => return Err(StoreError::Internal(msg.clone())),
            },
        };
        if self.generation.load(Ordering::Acquire) != generation {
            // A write landed while this read was in flight: what we hold (and may have cached)
            // could predate it. Drop it and read the store directly.
            self.found.invalidate(&digest).await;
            self.missing.invalidate(&digest).await;
            return Ok(store
                .find_key_by_digest(&digest)
                .await?
                .map(|k| Arc::new(Prepared::from_store(k))));
        }
        Ok(answer)
    }

    /// Entries currently held (for metrics and tests).
    pub fn len(&self) -> u64 {
        self.found.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
