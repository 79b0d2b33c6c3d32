//! Usage metering and each key's live traffic state (API.md §6.2, §6.3): per-key counts by UTC
//! hour, `last_used_at`, the local rate limiter's state, quotas and their alert thresholds.
//!
//! Every key this node has seen has one [`KeyState`]: its GCRA theoretical arrival time, its uses
//! not yet flushed, its last use and its quota counter, behind one lock. The verify cache's
//! snapshot of a key holds its state, so the hot path reaches it with no lookup, and a request of
//! a cached key does its rate limit, quota and use count under that one lock. States live in a
//! registry by key id, outside the cache: a cache invalidation (any write in the org) must never
//! reset a key's rate limit or quota.
//!
//! Counts and last-used times are flushed to the store on an interval (one second by default), so
//! the hot path never writes to the database; a crash loses at most one interval of counts, never
//! a state change. A state with something to flush puts itself on the dirty list once per
//! interval, so a flush touches only the keys used since the last one. The usage endpoint adds
//! the counts not yet flushed, so this node's answers are current.
//!
//! Quotas are counted exactly. On a store only this node writes (SQLite), in memory: the first
//! use of a key in a period loads the count the store already has, and from then on every use
//! takes one unit under the key's lock, so N concurrent calls against a quota of Q succeed
//! exactly min(N, Q) times. On a store several nodes share (PostgreSQL), every use of a key with
//! a quota takes its unit in the store with one conditional increment, so the nodes together
//! admit exactly Q; that costs one round trip per use, and only for keys that have a quota.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Instant;

use keyward_core::clock::from_millis;
use keyward_core::gcra::{Decision, Gcra};
use keyward_core::model::{AuditEvent, Key, Outcome, QuotaPeriod, Timestamp, TraceContext};
use keyward_core::quota::{period_end, period_start};
use keyward_proto::ErrorCode;
use keyward_store::{Store, StoreResult, ThresholdAlert, UsageBucket, UsageDelta};
use serde_json::json;
use uuid::Uuid;

use crate::error::ApiError;

/// How a use of a key ended, for its counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Passed every traffic control (the request may still fail its endpoint's own checks).
    Allowed,
    Denied,
    RateLimited,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    allowed: u64,
    denied: u64,
    rate_limited: u64,
}

impl Counts {
    fn add(&mut self, outcome: Use) {
        match outcome {
            Use::Allowed => self.allowed += 1,
            Use::Denied => self.denied += 1,
            Use::RateLimited => self.rate_limited += 1,
        }
    }

    fn merge(&mut self, o: Counts) {
        self.allowed += o.allowed;
        self.denied += o.denied;
        self.rate_limited += o.rate_limited;
    }

    fn is_empty(&self) -> bool {
        *self == Counts::default()
    }
}

/// A key's quota counter for one period.
#[derive(Debug)]
struct QuotaCounter {
    /// The kind of period counted: a key whose quota changes to another kind of period starts
    /// again from the store's count for the new one.
    period: QuotaPeriod,
    /// Unix ms; cached so the hot path compares integers instead of doing calendar maths.
    period_start_ms: i64,
    period_end_ms: i64,
    used: u64,
    fired: BTreeSet<u8>,
}

/// What a key's lock guards.
#[derive(Debug, Default)]
struct Live {
    /// GCRA theoretical arrival time, ns (0: a full bucket). A derived key's requests are limited
    /// by its parent's state, so deriving sub-keys never multiplies what a key may do.
    tat_ns: i64,
    /// The UTC hour (Unix ms) that `counts` belong to.
    hour_ms: i64,
    counts: Counts,
    /// Counts of earlier hours not yet flushed (an hour began between two flushes). A boxed
    /// `Vec` is one pointer where a `Vec` is three: it is almost always empty, every key has a
    /// state, and those 16 bytes keep the state in the 128-byte size class.
    #[allow(clippy::box_collection)]
    earlier: Option<Box<Vec<(i64, Counts)>>>,
    /// The latest allowed use not yet flushed, Unix ms (0: none).
    last_used_ms: i64,
    /// On the dirty list (something to flush).
    queued: bool,
    /// The number of the last flush that took this state's counts (0: none yet). While that
    /// flush is the one in progress ([`Meter::flushing`]) it holds them; a change of it tells
    /// a reader of the store that a flush moved them while it read (see
    /// [`Meter::count_ungated`]).
    taken_by: u32,
    quota: Option<Box<QuotaCounter>>,
}

impl Live {
    fn count(&mut self, outcome: Use, now_ms: i64) {
        // The start of the UTC hour (integer maths: this runs per use).
        let hour = now_ms - now_ms.rem_euclid(3_600_000);
        if hour != self.hour_ms {
            if !self.counts.is_empty() {
                let old = std::mem::take(&mut self.counts);
                self.add_earlier(self.hour_ms, old);
            }
            self.hour_ms = hour;
        }
        self.counts.add(outcome);
        if outcome == Use::Allowed && now_ms > self.last_used_ms {
            self.last_used_ms = now_ms;
        }
    }

    fn add_earlier(&mut self, hour_ms: i64, counts: Counts) {
        let earlier = self.earlier.get_or_insert_with(Default::default);
        match earlier.iter_mut().find(|(h, _)| *h == hour_ms) {
            Some((_, c)) => c.merge(counts),
            None => earlier.push((hour_ms, counts)),
        }
    }

    fn earlier(&self) -> &[(i64, Counts)] {
        self.earlier.as_deref().map(Vec::as_slice).unwrap_or(&[])
    }

    fn has_pending(&self) -> bool {
        !self.counts.is_empty() || self.earlier.is_some() || self.last_used_ms != 0
    }

    fn quota_current(&self, period: QuotaPeriod, now_ms: i64) -> bool {
        self.quota.as_ref().is_some_and(|c| {
            c.period == period && c.period_start_ms <= now_ms && now_ms < c.period_end_ms
        })
    }

    fn gcra(&mut self, gcra: &Gcra, now_ns: i64) -> Decision {
        let d = gcra.check(self.tat_ns, now_ns);
        if d.allowed {
            self.tat_ns = d.tat_ns;
        }
        d
    }
}

/// One key's live traffic state on this node.
#[derive(Debug)]
pub struct KeyState {
    pub key_id: Uuid,
    pub org_id: Uuid,
    live: Mutex<Live>,
}

impl KeyState {
    fn lock(&self) -> MutexGuard<'_, Live> {
        // A poisoned lock only means a panic elsewhere while it was held; the counters are
        // plain numbers and stay usable.
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The units of a quota of `period` used so far in the period of `now_ms`, as this node's
    /// counter has them; `None` when it has no counter for that period loaded (always on a
    /// shared store, whose counter lives in the store).
    pub fn quota_used(&self, period: QuotaPeriod, now_ms: i64) -> Option<u64> {
        let live = self.lock();
        if live.quota_current(period, now_ms) {
            live.quota.as_ref().map(|c| c.used)
        } else {
            None
        }
    }

    /// This state's local rate-limit bucket at `now_ns`, without a request.
    pub fn peek(&self, gcra: &Gcra, now_ns: i64) -> Decision {
        gcra.peek(self.lock().tat_ns, now_ns)
    }

    /// Decides one request against this state's local rate limit (recording it when allowed).
    pub fn gcra(&self, gcra: &Gcra, now_ns: i64) -> Decision {
        self.lock().gcra(gcra, now_ns)
    }
}

/// The answer of a quota check.
#[derive(Debug, Clone, Copy)]
pub struct QuotaUse {
    pub limit: u64,
    pub used: u64,
    /// Unix ms when the period ends (a calendar date is only built to render it).
    pub resets_at_ms: i64,
}

impl QuotaUse {
    /// When the quota resets.
    pub fn resets_at(&self) -> Timestamp {
        from_millis(self.resets_at_ms)
    }
}

/// A quota with no unit left this period (becomes `429 QUOTA_EXCEEDED`; kept small because the
/// hot path passes it around).
#[derive(Debug, Clone, Copy)]
struct Exhausted {
    limit: u64,
    end_ms: i64,
    now_ms: i64,
}

impl From<Exhausted> for ApiError {
    fn from(e: Exhausted) -> ApiError {
        exceeded(e.limit, e.end_ms, e.now_ms)
    }
}

/// The traffic controls' answer for one request: the rate-limit decision (when the key has a
/// limit) and the quota's (not reached when the rate limit refused).
#[derive(Debug)]
pub struct Admission {
    pub rate: Option<Decision>,
    /// The refusal boxed: an admission is returned through every request, and an unboxed
    /// error would triple its size.
    pub quota: Result<Option<QuotaUse>, Box<ApiError>>,
}

impl Admission {
    /// No decision: the store (or the task that would have asked it) could not answer.
    pub fn unavailable() -> Admission {
        Admission {
            rate: None,
            quota: Err(Box::new(ApiError::new(ErrorCode::StoreUnavailable))),
        }
    }
}

/// What a flush took from one state: its counts by hour and its last use (0: none).
type Taken<'a> = (&'a Arc<KeyState>, Vec<(i64, Counts)>, i64);

/// The store's rows for what a flush took: one per key and hour.
fn deltas_of(taken: &[Taken<'_>]) -> Vec<UsageDelta> {
    taken
        .iter()
        .flat_map(|(state, hours, _)| {
            hours.iter().map(|(hour_ms, c)| UsageDelta {
                key_id: state.key_id,
                org_id: state.org_id,
                hour: from_millis(*hour_ms),
                allowed: c.allowed,
                denied: c.denied,
                rate_limited: c.rate_limited,
            })
        })
        .collect()
}

/// Starts (or restarts, for a new period or a changed quota) the key's quota counter at `used`
/// allowed uses so far, unless another request started it first, and takes one unit from it.
#[allow(clippy::too_many_arguments)]
fn start_counter(
    live: &mut Live,
    key: &Key,
    q: keyward_core::model::Quota,
    start: Timestamp,
    end: Timestamp,
    used: u64,
    now_ms: i64,
    alerts: &mut Vec<ThresholdAlert>,
) -> Result<QuotaUse, Exhausted> {
    let (s, e) = (start.timestamp_millis(), end.timestamp_millis());
    let c = live.quota.get_or_insert_with(|| {
        Box::new(QuotaCounter {
            period: q.period,
            period_start_ms: s,
            period_end_ms: e,
            used: 0,
            fired: BTreeSet::new(),
        })
    });
    if c.period != q.period || c.period_start_ms != s {
        **c = QuotaCounter {
            period: q.period,
            period_start_ms: s,
            period_end_ms: e,
            used,
            fired: BTreeSet::new(),
        };
    } else if c.used == 0 {
        c.used = used;
    }
    take(c, key, q.limit, now_ms, alerts)
}

/// Flush number `n`'s first step: takes every count and last use from `queued`, marking each
/// state as taken by it (held until the flush ends: [`Meter::end_flush`]).
fn take_counts(queued: &[Arc<KeyState>], n: u32) -> Vec<Taken<'_>> {
    queued
        .iter()
        .map(|state| {
            let mut live = state.lock();
            live.queued = false;
            live.taken_by = n;
            let current = (live.hour_ms, std::mem::take(&mut live.counts));
            let hours: Vec<(i64, Counts)> = live
                .earlier
                .take()
                .map(|b| *b)
                .unwrap_or_default()
                .into_iter()
                .chain(std::iter::once(current))
                .filter(|(_, c)| !c.is_empty())
                .collect();
            let last = std::mem::take(&mut live.last_used_ms);
            (state, hours, last)
        })
        .collect()
}

/// Shards of the registry: looked up on cache fills, not per request.
const SHARDS: usize = 64;

/// A registry slot: a state, found by its key id (stored once, in the state).
#[derive(Debug)]
struct ById(Arc<KeyState>);

impl std::hash::Hash for ById {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.key_id.hash(state)
    }
}

impl PartialEq for ById {
    fn eq(&self, other: &Self) -> bool {
        self.0.key_id == other.0.key_id
    }
}

impl Eq for ById {}

impl std::borrow::Borrow<Uuid> for ById {
    fn borrow(&self) -> &Uuid {
        &self.0.key_id
    }
}

type Registry = std::collections::HashSet<ById, rustc_hash::FxBuildHasher>;

/// The in-memory meter of this node.
#[derive(Debug)]
pub struct Meter {
    states: Vec<RwLock<Registry>>,
    /// States with something to flush.
    dirty: Mutex<Vec<Arc<KeyState>>>,
    alerts: Mutex<Vec<ThresholdAlert>>,
    /// Held for writing by a flush from the moment it takes the pending counts until the store
    /// has them (or they are put back); readers that add pending counts to stored ones hold it
    /// for reading, so counts in flight are never missing from (nor doubled in) their sum. They
    /// all go through [`Meter::stored_plus_pending`] (a quota's first use of a period, the
    /// quota state, the usage endpoint), which holds it only when a flush held or took the
    /// key's counts (see [`Meter::count_ungated`]).
    flush_gate: tokio::sync::RwLock<()>,
    /// The number of the flush in progress, 0 when none is: a flush lets go of every state it
    /// took by setting this back to 0, one store instead of a second pass over the states.
    flushing: AtomicU32,
    /// The number of the last flush begun (flushes run one at a time, under `flush_gate`).
    last_flush: AtomicU32,
}

impl Default for Meter {
    fn default() -> Self {
        Meter {
            states: (0..SHARDS).map(|_| RwLock::default()).collect(),
            dirty: Mutex::default(),
            alerts: Mutex::default(),
            flush_gate: tokio::sync::RwLock::new(()),
            flushing: AtomicU32::new(0),
            last_flush: AtomicU32::new(0),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Meter {
    fn shard(&self, key_id: Uuid) -> &RwLock<Registry> {
        // UUIDv7's last bits are random.
        &self.states[(key_id.as_u128() as usize) % SHARDS]
    }

    /// The live state of a key, created on first sight.
    pub fn state(&self, key_id: Uuid, org_id: Uuid) -> Arc<KeyState> {
        let shard = self.shard(key_id);
        if let Some(s) = shard.read().unwrap_or_else(|e| e.into_inner()).get(&key_id) {
            return s.0.clone();
        }
        let mut g = shard.write().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = g.get(&key_id) {
            return s.0.clone();
        }
        let state = Arc::new(KeyState {
            key_id,
            org_id,
            live: Mutex::default(),
        });
        g.insert(ById(state.clone()));
        state
    }

    fn find(&self, key_id: Uuid) -> Option<Arc<KeyState>> {
        self.shard(key_id)
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key_id)
            .map(|s| s.0.clone())
    }

    /// Keys with a live state on this node (the `keyward_key_states` gauge).
    pub fn states(&self) -> usize {
        self.states
            .iter()
            .map(|s| s.read().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    /// Puts a state that now has something to flush on the dirty list (once per interval).
    fn queue(&self, state: &Arc<KeyState>, live: &mut Live) {
        if !live.queued {
            live.queued = true;
            lock(&self.dirty).push(state.clone());
        }
    }

    /// Counts one use of a key at `now_ms`.
    pub fn record(&self, state: &Arc<KeyState>, outcome: Use, now_ms: i64) {
        let mut live = state.lock();
        live.count(outcome, now_ms);
        self.queue(state, &mut live);
    }

    /// The traffic controls of one request of a cached key, decided in memory: the local rate
    /// limit (on `bucket`, the parent's state for a derived key), the quota when its counter for
    /// this period is loaded, and the use count, all under the key's one lock. A use that passes
    /// is counted as allowed. `None`, with nothing taken or counted, when this
    /// cannot be decided here: the key has a quota and the store is shared or its counter must be
    /// loaded first.
    #[allow(clippy::too_many_arguments)]
    pub fn try_admit(
        &self,
        state: &Arc<KeyState>,
        bucket: Option<&KeyState>,
        key: &Key,
        rate: Option<&Gcra>,
        shared_store: bool,
        now_ms: i64,
    ) -> Option<Admission> {
        let mut live = state.lock();
        match key.quota {
            Some(q) if shared_store || !live.quota_current(q.period, now_ms) => return None,
            // A quota removed: its counter would be stale if one is set again this period (the
            // uses in between are counted in the store, which a new counter starts from).
            None if live.quota.is_some() => live.quota = None,
            _ => {}
        }
        let now_ns = now_ms.saturating_mul(1_000_000);
        // Lock order: a key's own state, then its bucket (a parent never takes a child's).
        let decision = rate.map(|g| match bucket {
            Some(b) => b.gcra(g, now_ns),
            None => live.gcra(g, now_ns),
        });
        if decision.is_some_and(|d| !d.allowed) {
            live.count(Use::RateLimited, now_ms);
            self.queue(state, &mut live);
            return Some(Admission {
                rate: decision,
                quota: Ok(None),
            });
        }
        let mut alerts = Vec::new();
        let quota = match (key.quota, live.quota.as_deref_mut()) {
            (Some(q), Some(c)) => take(c, key, q.limit, now_ms, &mut alerts).map(Some),
            _ => Ok(None),
        };
        live.count(
            if quota.is_ok() {
                Use::Allowed
            } else {
                Use::RateLimited
            },
            now_ms,
        );
        self.queue(state, &mut live);
        drop(live);
        self.push_alerts(alerts);
        Some(Admission {
            rate: decision,
            quota: quota.map_err(|e| Box::new(ApiError::from(e))),
        })
    }

    /// Takes one unit of the key's quota, or refuses with `429 QUOTA_EXCEEDED`, reading the
    /// store when it must (a shared store, or the first use of the period on this node). Keys
    /// without a quota answer `Ok(None)`. Counts nothing: the caller records the use.
    pub async fn take_quota(
        &self,
        store: &dyn Store,
        state: &KeyState,
        key: &Key,
        now_ms: i64,
    ) -> Result<Option<QuotaUse>, ApiError> {
        let Some(q) = key.quota else {
            // The Redis path comes here without `try_admit`: forget a removed quota's counter
            // here too.
            state.lock().quota = None;
            return Ok(None);
        };
        if store.is_shared() {
            return self
                .take_shared(store, key, q.limit, q.period, now_ms)
                .await;
        }
        let mut alerts = Vec::new();
        // The common case: the counter of this period is here; the key's lock takes the unit.
        let taken = {
            let mut live = state.lock();
            let current = live.quota_current(q.period, now_ms);
            match live.quota.as_deref_mut() {
                Some(c) if current => Some(take(c, key, q.limit, now_ms, &mut alerts)),
                _ => None,
            }
        };
        if let Some(result) = taken {
            self.push_alerts(alerts);
            return result.map(Some).map_err(ApiError::from);
        }
        // First use of the period on this node: start from what the store has. Read outside the
        // lock; if another request loaded the counter meanwhile, its counter wins.
        let now = from_millis(now_ms);
        let start = period_start(q.period, now);
        let end = period_end(q.period, now);
        // The counter starts from the stored and pending uses under the same lock that reads
        // the pending ones, so no use counted in between is missed.
        let result = self
            .stored_plus_pending(
                state,
                || store.allowed_between(key.id, start, end),
                |stored, live| {
                    let used = stored + pending_allowed(live, start, end);
                    start_counter(live, key, q, start, end, used, now_ms, &mut alerts)
                },
            )
            .await?;
        self.push_alerts(alerts);
        result.map(Some).map_err(ApiError::from)
    }

    /// Reads what the store has of a key's counts (`read`), then hands it to `then` with the
    /// key's state locked, to add the counts still pending here: the sum misses no count and has
    /// none twice. Every reader of stored plus pending counts goes through here (a quota's first
    /// use of a period, the quota state and the usage endpoint).
    ///
    /// A flush in progress is waited for only when it holds or took this key's counts (see
    /// [`Meter::count_ungated`]); then the store is read again under `flush_gate`.
    async fn stored_plus_pending<T, F, R>(
        &self,
        state: &KeyState,
        read: impl Fn() -> F,
        then: impl FnOnce(T, &mut Live) -> R,
    ) -> StoreResult<R>
    where
        F: std::future::Future<Output = StoreResult<T>>,
    {
        if let Some((stored, mut live)) = self.count_ungated(state, read()).await? {
            return Ok(then(stored, &mut live));
        }
        let _gate = self.flush_gate.read().await;
        let stored = read().await?;
        let mut live = state.lock();
        Ok(then(stored, &mut live))
    }

    /// [`Meter::stored_plus_pending`] for a key that may have no state here (`None`): then
    /// nothing is pending, and no flush holds a use made before the read (a state with counts
    /// pending or in flight is never pruned), so the store's answer is the whole sum.
    async fn stored_plus_pending_if<T, F, R>(
        &self,
        state: Option<&KeyState>,
        read: impl Fn() -> F,
        then: impl FnOnce(T, Option<&mut Live>) -> R,
    ) -> StoreResult<R>
    where
        F: std::future::Future<Output = StoreResult<T>>,
    {
        match state {
            None => Ok(then(read().await?, None)),
            Some(s) => {
                self.stored_plus_pending(s, read, |t, live| then(t, Some(live)))
                    .await
            }
        }
    }

    /// Reads what the store has of a key's counts (`read`) without waiting for a flush in
    /// progress, and answers it with the key's state locked (to add the pending ones); `None`
    /// when a flush held or took this key's counts meanwhile (they may be in neither place: ask
    /// again under `flush_gate`). `read` is not started when a flush holds the key's counts
    /// already.
    ///
    /// Why: a flush holds the gate while it writes every used key's counts (tens of
    /// milliseconds with thousands of keys), and a key's first use of a period read its count
    /// under the gate, so a first use that met a flush waited for all of it (at 60,000 keys with
    /// a quota each, the first pass's misses had a p99 of 7.3-14.3 ms over 4 runs, against
    /// 1.3-1.7 ms without quotas). A flush is only a hazard for the keys whose counts it took:
    /// this key's counts are in the store or pending if no flush held them when the read began
    /// (a flush ends only once its write is committed or the counts are put back, so the read
    /// sees that write) and none took them before the read ended (`taken_by` is unchanged: a
    /// whole flush may take, write and end while the read runs).
    async fn count_ungated<'s, T>(
        &self,
        state: &'s KeyState,
        read: impl std::future::Future<Output = StoreResult<T>>,
    ) -> StoreResult<Option<(T, MutexGuard<'s, Live>)>> {
        let before = {
            let live = state.lock();
            if live.taken_by != 0 && live.taken_by == self.flushing.load(Ordering::SeqCst) {
                return Ok(None);
            }
            live.taken_by
        };
        let stored = read.await?;
        let live = state.lock();
        // Unchanged, it is not the flush in progress either: flush numbers only grow (they
        // would wrap after four billion flushes, over a century at one a second).
        if live.taken_by != before {
            return Ok(None);
        }
        Ok(Some((stored, live)))
    }

    /// Takes the unit in a store shared by several nodes; the node whose take crosses a
    /// threshold is the one that announces it.
    async fn take_shared(
        &self,
        store: &dyn Store,
        key: &Key,
        limit: u64,
        period: QuotaPeriod,
        now_ms: i64,
    ) -> Result<Option<QuotaUse>, ApiError> {
        let now = from_millis(now_ms);
        let start = period_start(period, now);
        let end = period_end(period, now);
        let Some(used) = store.take_quota_unit(key.id, start, end, limit).await? else {
            return Err(exceeded(limit, end.timestamp_millis(), now_ms));
        };
        let alerts: Vec<ThresholdAlert> = key
            .alert_thresholds
            .iter()
            .filter(|t| {
                let reached = |n: u64| n as u128 * 100 >= **t as u128 * limit as u128;
                reached(used) && !reached(used - 1)
            })
            .map(|t| alert(key, start.timestamp_millis(), *t, used, limit, now_ms))
            .collect();
        self.push_alerts(alerts);
        Ok(Some(QuotaUse {
            limit,
            used,
            resets_at_ms: end.timestamp_millis(),
        }))
    }

    fn push_alerts(&self, alerts: Vec<ThresholdAlert>) {
        if !alerts.is_empty() {
            lock(&self.alerts).extend(alerts);
        }
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
                resets_at_ms: end.timestamp_millis(),
            }));
        }
        let state = self.find(key.id);
        let in_memory = state
            .as_ref()
            .and_then(|s| s.quota_used(q.period, now.timestamp_millis()));
        let used = match in_memory {
            Some(u) => u,
            None => {
                self.stored_plus_pending_if(
                    state.as_deref(),
                    || store.allowed_between(key.id, start, end),
                    |stored, live| stored + live.map_or(0, |l| pending_allowed(l, start, end)),
                )
                .await?
            }
        };
        Ok(Some(QuotaUse {
            limit: q.limit,
            used: used.min(q.limit),
            resets_at_ms: end.timestamp_millis(),
        }))
    }

    /// A key's counts by hour: the store's buckets from `since` to `until`, then every one still
    /// pending here, whatever its hour (an hour may be in both; the caller adds them up and
    /// keeps its range).
    pub async fn usage_hours(
        &self,
        store: &dyn Store,
        key_id: Uuid,
        since: Timestamp,
        until: Timestamp,
    ) -> StoreResult<Vec<UsageBucket>> {
        // The pending buckets are copied under the key's lock (which verifications take too),
        // and joined to the stored ones after it.
        let (mut stored, pending) = self
            .stored_plus_pending_if(
                self.find(key_id).as_deref(),
                || store.usage_hours(key_id, since, until),
                |stored, live| (stored, live.map(|l| pending_hours(l).collect::<Vec<_>>())),
            )
            .await?;
        let pending = pending.unwrap_or_default();
        stored.extend(pending);
        Ok(stored)
    }

    /// Writes everything pending to the store. On failure the counts are put back to be retried
    /// with the next flush, so a store outage delays counts rather than losing them.
    ///
    /// Not cancel-safe: dropped while it writes, it loses the counts it took. Only the flusher
    /// task and shutdown run it directly; anything that may be dropped uses
    /// [`crate::AppState::flush_usage`].
    pub async fn flush(&self, store: &dyn Store) -> StoreResult<()> {
        let _gate = self.flush_gate.write().await;
        let queued = std::mem::take(&mut *lock(&self.dirty));
        let alerts = std::mem::take(&mut *lock(&self.alerts));
        if queued.is_empty() && alerts.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        // What each state gave up, to put back if the store refuses it.
        let taken = take_counts(&queued, self.begin_flush());
        let deltas = deltas_of(&taken);
        let last_used: Vec<(Uuid, Timestamp)> = taken
            .iter()
            .filter(|(_, _, last)| *last != 0)
            .map(|(state, _, last)| (state.key_id, from_millis(*last)))
            .collect();
        match store.record_usage(&deltas, &last_used, &alerts).await {
            Ok(()) => {
                // Committed: readers of the store see these counts from now on.
                self.end_flush();
                metrics::histogram!("keyward_usage_flush_duration_seconds")
                    .record(started.elapsed().as_secs_f64());
                Ok(())
            }
            Err(e) => {
                // Put everything back, each count in its key's state, to go with the next flush.
                for (state, hours, last) in taken {
                    let mut live = state.lock();
                    for (hour_ms, c) in hours {
                        if hour_ms == live.hour_ms {
                            live.counts.merge(c);
                        } else {
                            live.add_earlier(hour_ms, c);
                        }
                    }
                    live.last_used_ms = live.last_used_ms.max(last);
                    if live.has_pending() {
                        self.queue(state, &mut live);
                    }
                }
                lock(&self.alerts).extend(alerts);
                self.end_flush();
                Err(e)
            }
        }
    }

    /// Numbers a new flush and marks it in progress (never 0, which means none).
    fn begin_flush(&self) -> u32 {
        let mut n = self.last_flush.load(Ordering::SeqCst).wrapping_add(1);
        if n == 0 {
            n = 1;
        }
        self.last_flush.store(n, Ordering::SeqCst);
        self.flushing.store(n, Ordering::SeqCst);
        n
    }

    /// The flush in progress has written or put back everything it took.
    fn end_flush(&self) {
        self.flushing.store(0, Ordering::SeqCst);
    }

    /// Forgets the states nothing else holds (no cached snapshot, no request in flight) that
    /// have nothing to flush and a full rate-limit bucket: a fresh state is the same. A quota
    /// counter forgotten this way is reloaded from the store, which has every flushed use.
    pub fn prune(&self, now_ms: i64) {
        let now_ns = now_ms.saturating_mul(1_000_000);
        for shard in &self.states {
            shard
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|ById(s)| {
                    // Under the shard's write lock a count of one means no one else can reach
                    // this state, so it cannot change while it is judged.
                    if Arc::strong_count(s) > 1 {
                        return true;
                    }
                    let live = s.lock();
                    live.queued || live.has_pending() || live.tat_ns > now_ns
                });
        }
    }
}

/// The counts of a state not yet flushed, by hour.
fn pending_hours(live: &Live) -> impl Iterator<Item = UsageBucket> + '_ {
    std::iter::once((live.hour_ms, live.counts))
        .chain(live.earlier().iter().copied())
        .filter(|(_, c)| !c.is_empty())
        .filter_map(|(h, c)| {
            Some(UsageBucket {
                start: chrono::DateTime::from_timestamp_millis(h)?,
                allowed: c.allowed,
                denied: c.denied,
                rate_limited: c.rate_limited,
            })
        })
}

/// Uses counted in a state and not yet flushed, within [start, end).
fn pending_allowed(live: &Live, start: Timestamp, end: Timestamp) -> u64 {
    let (s, e) = (start.timestamp_millis(), end.timestamp_millis());
    std::iter::once((live.hour_ms, live.counts))
        .chain(live.earlier().iter().copied())
        .filter(|(h, _)| *h >= s && *h < e)
        .map(|(_, c)| c.allowed)
        .sum()
}

/// Takes one unit from a current counter, or refuses; collects thresholds crossed.
fn take(
    c: &mut QuotaCounter,
    key: &Key,
    limit: u64,
    now_ms: i64,
    alerts: &mut Vec<ThresholdAlert>,
) -> Result<QuotaUse, Exhausted> {
    let end = c.period_end_ms;
    if c.used >= limit {
        return Err(Exhausted {
            limit,
            end_ms: end,
            now_ms,
        });
    }
    c.used += 1;
    for t in &key.alert_thresholds {
        let crossed = c.used as u128 * 100 >= *t as u128 * limit as u128;
        if crossed && c.fired.insert(*t) {
            alerts.push(alert(key, c.period_start_ms, *t, c.used, limit, now_ms));
        }
    }
    Ok(QuotaUse {
        limit,
        used: c.used,
        resets_at_ms: end,
    })
}

/// `429 QUOTA_EXCEEDED`, retryable when the period ends.
fn exceeded(limit: u64, end_ms: i64, now_ms: i64) -> ApiError {
    let secs = ((end_ms - now_ms) / 1000).max(1) as u64;
    let mut e = ApiError::new(ErrorCode::QuotaExceeded).details(json!({
        "limit": limit,
        "resets_at": keyward_proto::ts::format(&from_millis(end_ms)),
    }));
    e.retry_after = Some(secs);
    e
}

fn alert(
    key: &Key,
    period_start_ms: i64,
    threshold: u8,
    used: u64,
    limit: u64,
    now_ms: i64,
) -> ThresholdAlert {
    let period_start = from_millis(period_start_ms);
    ThresholdAlert {
        key_id: key.id,
        period_start,
        threshold,
        event: AuditEvent {
            id: Uuid::now_v7(),
            org_id: key.org_id,
            occurred_at: from_millis(now_ms),
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use keyward_core::model::Quota;
    use keyward_core::token::TokenKind;
    use keyward_store::conformance;
    use keyward_store::sqlite::SqliteStore;
    use std::time::Duration;

    /// A store with an org, an agent and its key, which has a daily quota of 100.
    async fn store_and_key(dir: &tempfile::TempDir) -> (Arc<SqliteStore>, Key) {
        let store = SqliteStore::open(&dir.path().join("k.db")).await.unwrap();
        let org = conformance::org("o");
        let root = conformance::key(org.id, None, TokenKind::Root);
        store
            .create_org(&org, &root, &conformance::event(org.id, "org.create"))
            .await
            .unwrap();
        let agent = conformance::agent(org.id, "a");
        let mut key = conformance::key(org.id, Some(agent.id), TokenKind::Agent);
        key.quota = Some(Quota {
            limit: 100,
            period: QuotaPeriod::Day,
        });
        store.create_agent(&agent, &key, &[], None).await.unwrap();
        (Arc::new(store), key)
    }

    /// [`store_and_key`], with a meter and the key's state in it.
    async fn metered_key() -> (
        tempfile::TempDir,
        Arc<SqliteStore>,
        Key,
        Meter,
        Arc<KeyState>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (store, key) = store_and_key(&dir).await;
        let meter = Meter::default();
        let state = meter.state(key.id, key.org_id);
        (dir, store, key, meter, state)
    }

    /// A flush's first steps on `meter`: its gate held, and the counts of every queued state
    /// taken (in neither memory nor the store until the caller writes `deltas` and ends it).
    async fn flush_begun(
        meter: &Meter,
    ) -> (tokio::sync::RwLockWriteGuard<'_, ()>, Vec<UsageDelta>) {
        let gate = meter.flush_gate.write().await;
        let queued = std::mem::take(&mut *lock(&meter.dirty));
        let deltas = deltas_of(&take_counts(&queued, meter.begin_flush()));
        (gate, deltas)
    }

    /// Polls `f` once, as the runtime would first poll it.
    async fn poll_once<F: std::future::Future + Unpin>(f: &mut F) -> std::task::Poll<F::Output> {
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(std::future::Future::poll(std::pin::Pin::new(&mut *f), cx))
        })
        .await
    }

    /// A flush in progress holds the gate while it writes the keys it took. A key it did not
    /// take reads its count without waiting for it (before, every first use of a period that met
    /// a flush waited for all of it).
    #[tokio::test]
    async fn a_first_use_does_not_wait_for_a_flush_of_other_keys() {
        let (_dir, store, key, meter, state) = metered_key().await;
        let _flush_in_progress = meter.flush_gate.write().await;
        let now_ms = conformance::now().timestamp_millis();
        // The bound only turns a hang (waiting for the gate held above) into a failure.
        let taken = tokio::time::timeout(
            Duration::from_secs(30),
            meter.take_quota(store.as_ref(), &state, &key, now_ms),
        )
        .await
        .expect("the first use waited for a flush that did not hold its key's counts")
        .unwrap()
        .unwrap();
        assert_eq!(taken.used, 1);
    }

    /// A flush that took this key's counts and has not written them yet: they are neither
    /// pending nor stored, so the first use waits for the flush and then counts them. Without
    /// timing: SQLite's read of the count is synchronous (`hot`), so a first use that did not
    /// wait would answer (1 use) on its first poll.
    #[tokio::test]
    async fn a_first_use_waits_for_a_flush_holding_its_keys_counts_and_counts_them() {
        let (_dir, store, key, meter, state) = metered_key().await;
        let now_ms = conformance::now().timestamp_millis();
        // Three uses made before the key had its quota (counted, but no quota counter).
        for _ in 0..3 {
            meter.record(&state, Use::Allowed, now_ms);
        }
        let (gate, deltas) = flush_begun(&meter).await;
        let mut first_use = Box::pin(meter.take_quota(store.as_ref(), &state, &key, now_ms));
        assert!(
            poll_once(&mut first_use).await.is_pending(),
            "answered while the counts were in flight"
        );
        assert_eq!(deltas.iter().map(|d| d.allowed).sum::<u64>(), 3);
        store.record_usage(&deltas, &[], &[]).await.unwrap();
        meter.end_flush();
        drop(gate);
        let used = first_use.await.unwrap().map(|q| q.used);
        assert_eq!(used, Some(4), "the three uses the flush held, and this one");
    }

    /// A state with one pending use, on the dirty list.
    fn used_once(meter: &Meter) -> Arc<KeyState> {
        let state = meter.state(Uuid::now_v7(), Uuid::now_v7());
        meter.record(&state, Use::Allowed, conformance::now().timestamp_millis());
        state
    }

    /// Its counts held by a flush: the store is not read at all without the gate.
    #[tokio::test]
    async fn a_key_a_flush_holds_is_not_read_without_the_gate() {
        let meter = Meter::default();
        let state = used_once(&meter);
        let _flush = flush_begun(&meter).await;
        let read = async { panic!("the store was read") };
        let counted = meter.count_ungated::<()>(&state, read).await.unwrap();
        assert!(counted.is_none());
    }

    /// A whole flush (take, write, end) during the read: no flush holds the key before or after
    /// it, but the counts moved, so the count is not trusted.
    #[tokio::test]
    async fn a_flush_that_takes_a_keys_counts_during_the_read_sends_it_to_the_gate() {
        let meter = Meter::default();
        let state = used_once(&meter);
        let queued = std::mem::take(&mut *lock(&meter.dirty));
        let read = async {
            let _taken = take_counts(&queued, meter.begin_flush());
            meter.end_flush();
            Ok(0)
        };
        let counted = meter.count_ungated(&state, read).await.unwrap();
        assert!(counted.is_none());
        // With nothing moving, the count is trusted and handed over with the pending uses.
        meter.record(&state, Use::Allowed, conformance::now().timestamp_millis());
        let counted = meter
            .count_ungated(&state, async { Ok(5) })
            .await
            .unwrap()
            .map(|(stored, live)| stored + live.counts.allowed);
        assert_eq!(counted, Some(6));
    }

    /// A flush lets go of the keys it took once their counts are written, and also when the
    /// store refuses them and they are put back.
    #[tokio::test]
    async fn a_flush_lets_go_of_its_keys_when_written_and_when_put_back() {
        let (_dir, store, _, meter, state) = metered_key().await;
        let now_ms = conformance::now().timestamp_millis();
        meter.record(&state, Use::Allowed, now_ms);
        meter.flush(store.as_ref()).await.unwrap();
        assert!(!state.lock().has_pending());
        assert!(not_held(&meter, &state).await, "written, not held");
        store.close().await;
        meter.record(&state, Use::Allowed, now_ms);
        assert!(meter.flush(store.as_ref()).await.is_err());
        assert_eq!(state.lock().counts.allowed, 1, "the count is back");
        assert!(not_held(&meter, &state).await, "put back, not held");
    }

    /// The usage endpoint's read, with a flush of other keys in progress: it does not wait, and
    /// it adds the store's counts and the pending ones (a key with no state here has none).
    #[tokio::test]
    async fn usage_is_read_without_waiting_for_a_flush_of_other_keys() {
        let (_dir, store, key, meter, state) = metered_key().await;
        let now = conformance::now();
        let now_ms = now.timestamp_millis();
        meter.record(&state, Use::Allowed, now_ms);
        meter.flush(store.as_ref()).await.unwrap();
        meter.record(&state, Use::Allowed, now_ms);
        meter.record(&state, Use::Denied, now_ms);
        let (since, until) = (
            now - chrono::Duration::hours(2),
            now + chrono::Duration::hours(1),
        );
        let _flush_in_progress = meter.flush_gate.write().await;
        let read = |key_id| {
            tokio::time::timeout(
                Duration::from_secs(30),
                meter.usage_hours(store.as_ref(), key_id, since, until),
            )
        };
        let hours = read(key.id)
            .await
            .expect("the usage read waited for a flush that did not hold its key's counts")
            .unwrap();
        let sum = |f: fn(&UsageBucket) -> u64| hours.iter().map(f).sum::<u64>();
        assert_eq!((sum(|h| h.allowed), sum(|h| h.denied)), (2, 1), "{hours:?}");
        let quota = tokio::time::timeout(
            Duration::from_secs(30),
            meter.quota_state(store.as_ref(), &key, now),
        )
        .await
        .expect("the quota read waited for a flush that did not hold its key's counts")
        .unwrap()
        .unwrap();
        assert_eq!(quota.used, 2);
        let unseen = read(Uuid::now_v7())
            .await
            .expect("no state, no wait")
            .unwrap();
        assert!(unseen.is_empty());
    }

    /// The usage endpoint's read of a key whose counts a flush holds: they are neither pending
    /// nor stored, so it waits for the flush and then counts them once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn usage_of_a_key_a_flush_holds_waits_for_it_and_counts_its_uses_once() {
        let dir = tempfile::tempdir().unwrap();
        let (store, key) = store_and_key(&dir).await;
        let meter = Arc::new(Meter::default());
        let state = meter.state(key.id, key.org_id);
        let now = conformance::now();
        for _ in 0..3 {
            meter.record(&state, Use::Allowed, now.timestamp_millis());
        }
        let (gate, deltas) = flush_begun(&meter).await;
        let reader = {
            let (meter, store) = (meter.clone(), store.clone());
            let (since, until) = (
                now - chrono::Duration::hours(2),
                now + chrono::Duration::hours(1),
            );
            tokio::spawn(async move {
                let hours = meter
                    .usage_hours(store.as_ref(), key.id, since, until)
                    .await;
                hours.map(|h| h.iter().map(|h| h.allowed).sum::<u64>())
            })
        };
        // The reader cannot finish while the flush holds the key's counts. (One that did not
        // wait would have answered 0 well within this: a local read takes a millisecond.)
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !reader.is_finished(),
            "answered while the counts were in flight"
        );
        store.record_usage(&deltas, &[], &[]).await.unwrap();
        meter.end_flush();
        drop(gate);
        assert_eq!(reader.await.unwrap().unwrap(), 3);
    }

    /// The rule every reader of stored plus pending counts goes through, without timing: while
    /// a flush holds the key's counts the store is not read at all; once the flush has written
    /// them, the read under the gate finds them there (and no longer pending).
    #[tokio::test]
    async fn stored_plus_pending_reads_a_held_key_only_after_its_flush() {
        use std::sync::atomic::AtomicU64;
        let meter = Meter::default();
        let state = used_once(&meter);
        let (reads, stored) = (AtomicU64::new(0), AtomicU64::new(0));
        let (gate, deltas) = flush_begun(&meter).await;
        let mut sum = Box::pin(meter.stored_plus_pending(
            &state,
            || async {
                reads.fetch_add(1, Ordering::SeqCst);
                Ok(stored.load(Ordering::SeqCst))
            },
            |stored, live| stored + live.counts.allowed,
        ));
        assert!(
            poll_once(&mut sum).await.is_pending(),
            "answered while the flush held the counts"
        );
        assert_eq!(
            reads.load(Ordering::SeqCst),
            0,
            "read while the counts were in flight"
        );
        // The flush writes what it took and ends.
        stored.store(deltas.iter().map(|d| d.allowed).sum(), Ordering::SeqCst);
        meter.end_flush();
        drop(gate);
        assert_eq!(sum.await.unwrap(), 1);
        assert_eq!(reads.load(Ordering::SeqCst), 1);
    }

    /// A key whose state was forgotten (nothing pending, nothing holding it) is read from the
    /// store alone, with every use it had.
    #[tokio::test]
    async fn usage_of_a_key_with_no_state_here_is_the_stores() {
        let (_dir, store, key, meter, state) = metered_key().await;
        let now = conformance::now();
        for _ in 0..2 {
            meter.record(&state, Use::Allowed, now.timestamp_millis());
        }
        meter.flush(store.as_ref()).await.unwrap();
        drop(state);
        meter.prune(now.timestamp_millis());
        assert!(meter.find(key.id).is_none(), "the state was forgotten");
        let (since, until) = (
            now - chrono::Duration::hours(2),
            now + chrono::Duration::hours(1),
        );
        let hours = meter
            .usage_hours(store.as_ref(), key.id, since, until)
            .await
            .unwrap();
        assert_eq!(hours.iter().map(|h| h.allowed).sum::<u64>(), 2);
        let quota = meter.quota_state(store.as_ref(), &key, now).await.unwrap();
        assert_eq!(quota.map(|q| q.used), Some(2));
    }

    /// Whether a first use may count this state without the gate.
    async fn not_held(meter: &Meter, state: &KeyState) -> bool {
        let read = async { Ok(0) };
        meter.count_ungated(state, read).await.unwrap().is_some()
    }
}
