//! Usage metering (API.md §6.3): per-key counts by UTC hour, `last_used_at`, quotas and their
//! alert thresholds.
//!
//! Counts and last-used times are kept in memory and flushed to the store on an interval (one
//! second by default), so the hot path never writes to the database; a crash loses at most one
//! interval of counts, never a state change. The usage endpoint adds the counts not yet flushed,
//! so this node's answers are current.
//!
//! Quotas are counted exactly. On a store only this node writes (SQLite), in memory: the first
//! use of a key in a period loads the count the store already has, and from then on every use
//! takes one unit under a lock, so N concurrent calls against a quota of Q succeed exactly
//! min(N, Q) times. On a store several nodes share (PostgreSQL), every use of a key with a quota
//! takes its unit in the store with one conditional increment, so the nodes together admit
//! exactly Q; that costs one round trip per use, and only for keys that have a quota.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Instant;

use keyward_core::model::{AuditEvent, Key, Outcome, Timestamp, TraceContext};
use keyward_core::quota::{period_end, period_start};
use keyward_proto::ErrorCode;
use keyward_store::{Store, StoreResult, ThresholdAlert, UsageBucket, UsageDelta};
use rustc_hash::FxHashMap as HashMap;
use serde_json::json;
use uuid::Uuid;

use crate::error::ApiError;

/// How a use of a key ended, for its counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    Allowed,
    Denied,
    RateLimited,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    allowed: u64,
    denied: u64,
    rate_limited: u64,
}

#[derive(Debug, Default)]
struct Pending {
    /// (key, hour start in ms) -> (org, counts)
    counts: HashMap<(Uuid, i64), (Uuid, Counts)>,
    last_used: HashMap<Uuid, Timestamp>,
    alerts: Vec<ThresholdAlert>,
}

#[derive(Debug)]
struct QuotaCounter {
    period_start: Timestamp,
    /// Cached so the hot path compares instants instead of doing calendar maths.
    period_end: Timestamp,
    used: u64,
    fired: BTreeSet<u8>,
}

/// The answer of a quota check.
#[derive(Debug, Clone, Copy)]
pub struct QuotaUse {
    pub limit: u64,
    pub used: u64,
    pub resets_at: Timestamp,
}

/// Shards of the pending counts: every use of every key lands here, so one lock would be the
/// hottest in the server.
const SHARDS: usize = 16;

/// The in-memory meter of this node.
#[derive(Debug)]
pub struct Meter {
    pending: Vec<Mutex<Pending>>,
    quotas: Mutex<HashMap<Uuid, QuotaCounter>>,
    /// Held for writing by a flush from the moment it takes the pending counts until the store
    /// has them (or they are put back); readers that add pending counts to stored ones hold it
    /// for reading, so counts in flight are never missing from (nor doubled in) their sum.
    flush_gate: tokio::sync::RwLock<()>,
}

impl Default for Meter {
    fn default() -> Self {
        Meter {
            pending: (0..SHARDS)
                .map(|_| Mutex::new(Pending::default()))
                .collect(),
            quotas: Mutex::default(),
            flush_gate: tokio::sync::RwLock::new(()),
        }
    }
}

/// The start of the UTC hour of `t`, in Unix milliseconds (integer maths: this runs per use).
fn hour_ms(t: Timestamp) -> i64 {
    let ms = t.timestamp_millis();
    ms - ms.rem_euclid(3_600_000)
}

impl Meter {
    /// Counts one use of `key` at `now`.
    pub fn record(&self, key: &Key, outcome: Use, now: Timestamp) {
        let mut p = self.shard(key.id).lock().unwrap_or_else(|e| e.into_inner());
        let entry = p
            .counts
            .entry((key.id, hour_ms(now)))
            .or_insert((key.org_id, Counts::default()));
        match outcome {
            Use::Allowed => entry.1.allowed += 1,
            Use::Denied => entry.1.denied += 1,
            Use::RateLimited => entry.1.rate_limited += 1,
        }
        if outcome == Use::Allowed {
            let last = p.last_used.entry(key.id).or_insert(now);
            if *last < now {
                *last = now;
            }
        }
    }

    /// Takes one unit of the key's quota, or refuses with `429 QUOTA_EXCEEDED`. Keys without a
    /// quota answer `Ok(None)`.
    pub async fn take_quota(
        &self,
        store: &dyn Store,
        key: &Key,
        now: Timestamp,
    ) -> Result<Option<QuotaUse>, ApiError> {
        let Some(q) = key.quota else { return Ok(None) };
        if store.is_shared() {
            return self.take_shared(store, key, q.limit, q.period, now).await;
        }
        let current = |c: &QuotaCounter| c.period_start <= now && now < c.period_end;
        // The common case: the counter of this period is here; one lock takes the unit.
        let mut alerts = Vec::new();
        let taken = {
            let mut g = self.quotas.lock().unwrap_or_else(|e| e.into_inner());
            match g.get_mut(&key.id) {
                Some(c) if current(c) => Some(take(c, key, q.limit, now, &mut alerts)),
                _ => None,
            }
        };
        if let Some(result) = taken {
            self.push_alerts(alerts);
            return result.map(Some);
        }
        // First use of the period on this node: start from what the store has. Read outside the
        // lock; if another request loaded the counter meanwhile, its counter wins.
        let start = period_start(q.period, now);
        let end = period_end(q.period, now);
        let (stored, pending) = {
            let _gate = self.flush_gate.read().await;
            (
                store.allowed_between(key.id, start, end).await?,
                self.pending_allowed(key.id, start, end),
            )
        };
        let result = {
            let mut g = self.quotas.lock().unwrap_or_else(|e| e.into_inner());
            let c = g.entry(key.id).or_insert_with(|| QuotaCounter {
                period_start: start,
                period_end: end,
                used: 0,
                fired: BTreeSet::new(),
            });
            if c.period_start != start {
                *c = QuotaCounter {
                    period_start: start,
                    period_end: end,
                    used: stored + pending,
                    fired: BTreeSet::new(),
                };
            } else if c.used == 0 {
                c.used = stored + pending;
            }
            take(c, key, q.limit, now, &mut alerts)
        };
        self.push_alerts(alerts);
        result.map(Some)
    }

    /// Takes the unit in a store shared by several nodes; the node whose take crosses a
    /// threshold is the one that announces it.
    async fn take_shared(
        &self,
        store: &dyn Store,
        key: &Key,
        limit: u64,
        period: keyward_core::model::QuotaPeriod,
        now: Timestamp,
    ) -> Result<Option<QuotaUse>, ApiError> {
        let start = period_start(period, now);
        let end = period_end(period, now);
        let Some(used) = store.take_quota_unit(key.id, start, end, limit).await? else {
            return Err(exceeded(limit, end, now));
        };
        let alerts: Vec<ThresholdAlert> = key
            .alert_thresholds
            .iter()
            .filter(|t| {
                let reached = |n: u64| n as u128 * 100 >= **t as u128 * limit as u128;
                reached(used) && !reached(used - 1)
            })
            .map(|t| alert(key, start, *t, used, limit, now))
            .collect();
        self.push_alerts(alerts);
        Ok(Some(QuotaUse {
            limit,
            used,
            resets_at: end,
        }))
    }

    fn push_alerts(&self, alerts: Vec<ThresholdAlert>) {
        if let Some(a) = alerts.first() {
            let mut p = self
                .shard(a.key_id)
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            p.alerts.extend(alerts);
        }
    }

    fn shard(&self, key_id: Uuid) -> &Mutex<Pending> {
        // UUIDv7's last bits are random.
        &self.pending[(key_id.as_u128() as usize) % SHARDS]
    }

    /// The quota state of a key without taking from it (for the usage endpoint).
    pub async fn quota_state(
        &self,
        store: &dyn Store,
        key: &Key,
        now: Timestamp,
    ) -> StoreResult<Option<QuotaUse>> {
        let Some(q) = key.quota else { return Ok(None) };
        let start = period_start(q.period, now);
        let end = period_end(q.period, now);
        if store.is_shared() {
            // The shared counter, or before the period's first take, the uses counted so far.
            let used = store
                .quota_units(key.id, start)
                .await?
                .max(store.allowed_between(key.id, start, end).await?);
            return Ok(Some(QuotaUse {
                limit: q.limit,
                used: used.min(q.limit),
                resets_at: end,
            }));
        }
        let in_memory = {
            let g = self.quotas.lock().unwrap_or_else(|e| e.into_inner());
            g.get(&key.id)
                .filter(|c| c.period_start == start)
                .map(|c| c.used)
        };
        let used = match in_memory {
            Some(u) => u,
            None => {
                let _gate = self.flush_gate.read().await;
                store.allowed_between(key.id, start, end).await?
                    + self.pending_allowed(key.id, start, end)
            }
        };
        Ok(Some(QuotaUse {
            limit: q.limit,
            used: used.min(q.limit),
            resets_at: end,
        }))
    }

    fn pending_allowed(&self, key_id: Uuid, start: Timestamp, end: Timestamp) -> u64 {
        let p = self.shard(key_id).lock().unwrap_or_else(|e| e.into_inner());
        let (s, e) = (start.timestamp_millis(), end.timestamp_millis());
        p.counts
            .iter()
            .filter(|((k, h), _)| *k == key_id && *h >= s && *h < e)
            .map(|(_, (_, c))| c.allowed)
            .sum()
    }

    /// Holds flushes off while a reader adds stored and pending counts (see `flush_gate`).
    pub async fn read_gate(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.flush_gate.read().await
    }

    /// The counts of a key not yet flushed, by hour.
    pub fn pending_hours(&self, key_id: Uuid) -> Vec<UsageBucket> {
        let p = self.shard(key_id).lock().unwrap_or_else(|e| e.into_inner());
        p.counts
            .iter()
            .filter(|((k, _), _)| *k == key_id)
            .filter_map(|((_, h), (_, c))| {
                Some(UsageBucket {
                    start: chrono::DateTime::from_timestamp_millis(*h)?,
                    allowed: c.allowed,
                    denied: c.denied,
                    rate_limited: c.rate_limited,
                })
            })
            .collect()
    }

    /// Writes everything pending to the store. On failure the counts are put back to be retried
    /// with the next flush, so a store outage delays counts rather than losing them.
    pub async fn flush(&self, store: &dyn Store) -> StoreResult<()> {
        let _gate = self.flush_gate.write().await;
        let mut taken = Pending::default();
        for shard in &self.pending {
            let part = std::mem::take(&mut *shard.lock().unwrap_or_else(|e| e.into_inner()));
            taken.counts.extend(part.counts);
            taken.last_used.extend(part.last_used);
            taken.alerts.extend(part.alerts);
        }
        if taken.counts.is_empty() && taken.last_used.is_empty() && taken.alerts.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let deltas: Vec<UsageDelta> = taken
            .counts
            .iter()
            .filter_map(|((key_id, h), (org_id, c))| {
                Some(UsageDelta {
                    key_id: *key_id,
                    org_id: *org_id,
                    hour: chrono::DateTime::from_timestamp_millis(*h)?,
                    allowed: c.allowed,
                    denied: c.denied,
                    rate_limited: c.rate_limited,
                })
            })
            .collect();
        let last_used: Vec<(Uuid, Timestamp)> =
            taken.last_used.iter().map(|(k, t)| (*k, *t)).collect();
        match store.record_usage(&deltas, &last_used, &taken.alerts).await {
            Ok(()) => {
                metrics::histogram!("keyward_usage_flush_duration_seconds")
                    .record(started.elapsed().as_secs_f64());
                Ok(())
            }
            Err(e) => {
                // Put everything back, each count in its key's shard, to go with the next flush.
                for ((key_id, h), (org, c)) in taken.counts {
                    let mut p = self.shard(key_id).lock().unwrap_or_else(|e| e.into_inner());
                    let entry = p
                        .counts
                        .entry((key_id, h))
                        .or_insert((org, Counts::default()));
                    entry.1.allowed += c.allowed;
                    entry.1.denied += c.denied;
                    entry.1.rate_limited += c.rate_limited;
                }
                for (key_id, t) in taken.last_used {
                    let mut p = self.shard(key_id).lock().unwrap_or_else(|e| e.into_inner());
                    let last = p.last_used.entry(key_id).or_insert(t);
                    if *last < t {
                        *last = t;
                    }
                }
                self.push_alerts(taken.alerts);
                Err(e)
            }
        }
    }
}

/// Takes one unit from a current counter, or refuses; collects thresholds crossed.
fn take(
    c: &mut QuotaCounter,
    key: &Key,
    limit: u64,
    now: Timestamp,
    alerts: &mut Vec<ThresholdAlert>,
) -> Result<QuotaUse, ApiError> {
    let end = c.period_end;
    if c.used >= limit {
        return Err(exceeded(limit, end, now));
    }
    c.used += 1;
    for t in &key.alert_thresholds {
        let crossed = c.used as u128 * 100 >= *t as u128 * limit as u128;
        if crossed && c.fired.insert(*t) {
            alerts.push(alert(key, c.period_start, *t, c.used, limit, now));
        }
    }
    Ok(QuotaUse {
        limit,
        used: c.used,
        resets_at: end,
    })
}

/// `429 QUOTA_EXCEEDED`, retryable when the period ends.
fn exceeded(limit: u64, end: Timestamp, now: Timestamp) -> ApiError {
    let secs = (end - now).num_seconds().max(1) as u64;
    let mut e = ApiError::new(ErrorCode::QuotaExceeded).details(json!({
        "limit": limit,
        "resets_at": keyward_proto::ts::format(&end),
    }));
    e.retry_after = Some(secs);
    e
}

fn alert(
    key: &Key,
    period_start: Timestamp,
    threshold: u8,
    used: u64,
    limit: u64,
    now: Timestamp,
) -> ThresholdAlert {
    ThresholdAlert {
        key_id: key.id,
        period_start,
        threshold,
        event: AuditEvent {
            id: Uuid::now_v7(),
            org_id: key.org_id,
            occurred_at: now,
            action: "key.usage_threshold".to_string(),
            outcome: Outcome::Success,
            error_code: None,
            actor_key_id: Some(key.id),
            actor_agent_id: key.agent_id,
            target_type: Some("key".to_string()),
            target_id: Some(key.id),
            client_ip: None,
            request_id: None,
            trace: TraceContext::default(),
            details: json!({
                "threshold": threshold,
                "used": used,
                "limit": limit,
                "period_start": keyward_proto::ts::format(&period_start),
            }),
        },
    }
}
