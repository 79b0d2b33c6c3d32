//! The verify cache (DESIGN.md "The hot path"): prepared snapshots keyed by token digest, with
//! everything the checks need pre-parsed (key, agent status, org and agent deny rules, the
//! resolved rate limit), so a hit does no JSON work and no store access.
//!
//! Unknown digests are cached too, in a separate, smaller map with a shorter TTL, so a flood of
//! guessed tokens reaches the store at most once per distinct token per negative TTL and cannot
//! evict the snapshots of real keys. Concurrent misses for one digest are coalesced into one store
//! read.
//!
//! Invalidation: every write that changes what a key may do calls `invalidate_all` (through
//! `AppState::on_key_change`), which bumps a generation counter: O(1), whatever the size. Entries
//! stamped with an older generation are misses from then on. A read that raced the write (it
//! started before the bump and finished after) notices the generation moved and reads the store
//! again rather than answering from what it read before.
//!
//! Why not moka (DESIGN.md's pick for caches): a moka hit measured 185 ns here, more than twice
//! the SHA-256 of the token, and verification is what Keyward exists for. This map is a sharded
//! `RwLock<hashbrown::HashTable>` whose entries hold part of the digest (the tag) beside the
//! snapshot and the key's live state, hashed by the tag itself (a SHA-256 output is already
//! uniform), with random eviction when a shard is full: small, and a hit costs a read lock, one
//! probe and an `Arc` clone. Finding the entry reads only the table, so the snapshot and the live
//! state are then fetched together rather than one after the other.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use keyward_core::gcra::Gcra;
use keyward_core::model::{AgentStatus, Key, OrgPolicy, RateLimit, Rule};
use keyward_core::scope::{Scope, Scopes};
use keyward_core::token::TokenDigest;
use keyward_store::{KeyWithAgent, Store, StoreError};

use crate::stats::{stats, Hot};
use crate::usage::{KeyState, Meter};

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
    /// On a store several nodes share: how long cached answers are still served after the
    /// change watch went down (see `coherence`). Past it, every lookup reads the store.
    pub max_staleness: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            capacity: 2_000_000,
            // Every write through this server invalidates at once, and no operator command changes
            // an existing key, so on one node the TTL only bounds what it never sees; it is long
            // so that a large, evenly used key set stays cached.
            ttl: Duration::from_secs(600),
            negative_capacity: 100_000,
            negative_ttl: Duration::from_secs(10),
            max_staleness: Duration::from_secs(5),
        }
    }
}

/// What the hot path knows about a key, prepared once per cache fill.
///
/// Laid out in this order (`repr(C)`), as [`Key`] is: the cache's stamp and what the traffic
/// controls and the answer read first, the key (its hot fields first) after them. With 10,000
/// keys verified in turn each snapshot is a cache miss per line a verification touches; in the
/// compiler's order those were all eight lines of its 512-byte allocation, in this one the
/// first six.
#[derive(Debug, Clone)]
#[repr(C)]
pub struct Prepared {
    /// When this snapshot was taken, for the cache (kept here rather than in the map's entry,
    /// which stays 32 bytes: the snapshot is read on every hit anyway).
    pub stamp: Stamp,
    pub agent_status: Option<AgentStatus>,
    /// The key's live traffic state (use counts, quota, its own rate-limit bucket).
    pub live: Arc<KeyState>,
    /// For a derived key, its parent's state: the bucket its requests are limited by.
    pub bucket: Option<Arc<KeyState>>,
    /// The key's effective rate limit (its own, its tier's, or the org default), if any.
    pub rate: Option<Gcra>,
    /// Org rules, then the agent's.
    pub rules: Box<[Rule]>,
    /// Shared with the agent's other keys (see [`Texts`]); an `Arc<str>` and a boxed slice
    /// rather than `String` and `Vec` here: with them the snapshot and its `Arc` just fit
    /// mimalloc's 512-byte size class instead of taking 640 (128 MiB at a million keys).
    pub agent_name: Option<Arc<str>>,
    pub key: Key,
}

/// The cache generation a snapshot was filled in, and when it expires. Packed to 4-byte
/// alignment so its twelve bytes share the snapshot's padding.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, packed(4))]
pub struct Stamp {
    /// The low 32 bits of the generation: wrapping needs four billion invalidations within one
    /// TTL, far beyond any write rate.
    generation: u32,
    /// Unix milliseconds, on the server's clock (the caller's `now`: reading the clock again here
    /// would cost as much as the rest of a hit).
    expires_ms: i64,
}

impl Stamp {
    fn new(generation: u64, now_ms: i64, ttl_ms: i64) -> Stamp {
        Stamp {
            generation: generation as u32,
            expires_ms: now_ms.saturating_add(ttl_ms),
        }
    }

    fn current(&self, generation: u64, now_ms: i64) -> bool {
        let (g, e) = (self.generation, self.expires_ms);
        g == generation as u32 && e > now_ms
    }
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

/// One copy of each scope list, scope text and agent name the cache's snapshots hold. An
/// agent's keys usually share their scopes and always their agent's name; kept once, those stay
/// in the processor's cache while verifications of different keys read them (a key's own list
/// was a cache miss of its own on every verification, and 16 bytes or more of memory per key).
/// Bounded: past `MAX` texts, or `MAX` scopes in the kept lists together, the table starts again
/// (snapshots keep what they hold).
#[derive(Default)]
pub struct Texts {
    scopes: Mutex<ScopeTexts>,
    names: Mutex<std::collections::HashSet<Arc<str>>>,
}

/// The scope lists [`Texts`] keeps, and the scope texts they are made of.
#[derive(Default)]
struct ScopeTexts {
    lists: std::collections::HashSet<Scopes>,
    texts: std::collections::HashSet<Scope>,
    /// The scopes of all the kept lists together: the bound is on these, not on the number of
    /// lists (a key may hold hundreds of scopes).
    listed: usize,
}

impl Texts {
    const MAX: usize = 100_000;

    /// One shared copy of a scope list (and of each scope text in it, for lists that differ).
    fn scopes(&self, list: &Scopes) -> Scopes {
        let mut g = self.scopes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(kept) = g.lists.get(list) {
            return kept.clone();
        }
        if g.listed + list.len() > Self::MAX || g.texts.len() >= Self::MAX {
            g.lists.clear();
            g.texts.clear();
            g.listed = 0;
        }
        g.listed += list.len();
        let texts = &mut g.texts;
        let shared: Scopes = list
            .iter()
            .map(|s| match texts.get(s) {
                Some(kept) => kept.clone(),
                None => {
                    texts.insert(s.clone());
                    s.clone()
                }
            })
            .collect();
        g.lists.insert(shared.clone());
        shared
    }

    fn name(&self, n: &str) -> Arc<str> {
        let mut g = self.names.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(kept) = g.get(n) {
            return kept.clone();
        }
        if g.len() >= Self::MAX {
            g.clear();
        }
        let n: Arc<str> = n.into();
        g.insert(n.clone());
        n
    }
}

impl Prepared {
    /// Prepares a key read from the store, with its live state from `meter` and its texts
    /// shared through `texts`.
    pub fn from_store(
        mut found: KeyWithAgent,
        meter: &Meter,
        texts: &Texts,
        stamp: Stamp,
    ) -> Prepared {
        found.key.scopes = texts.scopes(&found.key.scopes);
        let mut rules = found.org_policy.rules.clone();
        if let Some(p) = &found.agent_policy {
            // Agent policies are validated on write; a rule that no longer parses is skipped
            // rather than failing every request of the agent.
            rules.extend(
                keyward_core::model::validate_policy_rules("policy", p).unwrap_or_default(),
            );
        }
        let live = meter.state(found.key.id, found.key.org_id);
        let bucket = found
            .key
            .parent_key_id
            .map(|parent| meter.state(parent, found.key.org_id));
        Prepared {
            rate: resolve_rate(&found.key, &found.org_policy),
            live,
            bucket,
            key: found.key,
            agent_status: found.agent_status,
            agent_name: found.agent_name.as_deref().map(|n| texts.name(n)),
            rules: rules.into_boxed_slice(),
            stamp,
        }
    }
}

impl Prepared {
    /// Starts loading, all at once, the memory a verification of this key will read: its live
    /// state (`live`, this snapshot's, passed from beside it in the cache's table so that its
    /// load need not wait for this snapshot's), its scopes and its agent's name are separate
    /// allocations that each cost a cache miss, and reading them one after another as the checks
    /// reach them serialised those misses (with 10,000 keys verified at random, 0.8 us of a
    /// verification's CPU time was memory stalls). Reading one byte of each here lets the
    /// processor fetch them in parallel.
    #[inline]
    fn warm(&self, live: &KeyState) {
        let touched = live.key_id.as_bytes()[0]
            ^ self
                .key
                .scopes
                .first()
                .and_then(|s| s.as_str().as_bytes().first().copied())
                .unwrap_or(0)
            ^ self
                .agent_name
                .as_deref()
                .and_then(|n| n.as_bytes().first().copied())
                .unwrap_or(0)
            // The snapshot's own lines that the lookup did not read (it read the stamp's and the
            // digest's): the expiry's and the quota's.
            ^ u8::from(self.key.expires_at.is_some())
            ^ u8::from(self.key.quota.is_some());
        std::hint::black_box(touched);
    }
}

/// Prepares what the store found for `digest`. The store was asked by digest; the compare is
/// belt and braces against one that answered with another key (treated as unknown).
fn prepare(
    found: Option<KeyWithAgent>,
    digest: &TokenDigest,
    meter: &Meter,
    texts: &Texts,
    stamp: Stamp,
) -> Option<Arc<Prepared>> {
    found
        .filter(|k| k.key.digest == *digest)
        .map(|k| Arc::new(Prepared::from_store(k, meter, texts, stamp)))
}

/// A digest's place in a shard's table: its bytes 16..32, the tag. The table hashes by the
/// tag's first half (a SHA-256 output is uniform already) and finds an entry by comparing the
/// whole tag, which the entry holds inline: finding a key reads only the table, and the key's
/// own allocations are then all asked for at once (see [`Cached::warm`]). Byte 8 picks the
/// shard, so shard and hash are independent.
fn tag_of(d: &TokenDigest) -> [u64; 2] {
    let half = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&d.0[at..at + 8]);
        u64::from_le_bytes(b)
    };
    [half(16), half(24)]
}

const SHARDS: usize = 64;

/// What a cache entry holds: found by its digest, current while its stamp is.
trait Cached: Clone {
    /// What a hit hands out.
    type Out;
    fn digest(&self) -> &TokenDigest;
    fn stamp(&self) -> Stamp;
    /// Starts loading what a hit reads next. Called as soon as the entry is found, before the
    /// digest and stamp are read, so every allocation a hit reads is fetched at once.
    #[inline]
    fn warm(&self) {}
    fn out(&self) -> Self::Out;
}

/// A cached key: its snapshot, and its live state beside it (also reachable through the
/// snapshot) so the two load together rather than one after the other.
#[derive(Clone)]
struct Found {
    snap: Arc<Prepared>,
    live: Arc<KeyState>,
}

impl Cached for Found {
    type Out = Arc<Prepared>;
    fn digest(&self) -> &TokenDigest {
        &self.snap.key.digest
    }
    fn stamp(&self) -> Stamp {
        self.snap.stamp
    }
    #[inline]
    fn warm(&self) {
        self.snap.warm(&self.live)
    }
    fn out(&self) -> Arc<Prepared> {
        self.snap.clone()
    }
}

/// A digest known not to name a key.
#[derive(Clone)]
struct Unknown {
    digest: TokenDigest,
    stamp: Stamp,
}

impl Cached for Unknown {
    type Out = ();
    fn digest(&self) -> &TokenDigest {
        &self.digest
    }
    fn stamp(&self) -> Stamp {
        self.stamp
    }
    fn out(&self) {}
}

/// An entry of a shard's table.
struct Entry<V> {
    tag: [u64; 2],
    value: V,
}

impl<V> Entry<V> {
    /// Whether this entry has `tag`, without branching on where the two differ (tags are part
    /// of a digest, and digests are always compared in constant time).
    #[inline]
    fn is(&self, tag: &[u64; 2]) -> bool {
        ((self.tag[0] ^ tag[0]) | (self.tag[1] ^ tag[1])) == 0
    }

    fn hash(&self) -> u64 {
        self.tag[0]
    }
}

type Table<V> = hashbrown::HashTable<Entry<V>>;

/// One sharded, bounded map from digest to value, with TTL and generation stamps.
struct Map<V> {
    shards: Vec<RwLock<Table<V>>>,
    per_shard: usize,
    ttl_ms: i64,
}

impl<V: Cached> Map<V> {
    fn new(capacity: u64, ttl: Duration) -> Map<V> {
        Map {
            shards: (0..SHARDS).map(|_| RwLock::new(Table::new())).collect(),
            per_shard: ((capacity as usize) / SHARDS).max(1),
            ttl_ms: ttl.as_millis().min(i64::MAX as u128) as i64,
        }
    }

    fn stamp(&self, generation: u64, now_ms: i64) -> Stamp {
        Stamp::new(generation, now_ms, self.ttl_ms)
    }

    fn shard(&self, d: &TokenDigest) -> &RwLock<Table<V>> {
        &self.shards[d.0[8] as usize % SHARDS]
    }

    fn get(&self, d: &TokenDigest, generation: u64, now: i64) -> Option<V::Out> {
        let tag = tag_of(d);
        let g = self.shard(d).read().unwrap_or_else(|e| e.into_inner());
        let e = g.find(tag[0], |e| e.is(&tag))?;
        e.value.warm();
        // The whole digest: two digests sharing a tag are a SHA-256 near-collision, but an
        // entry answers only for its own.
        (e.value.digest() == d && e.value.stamp().current(generation, now)).then(|| e.value.out())
    }

    fn insert(&self, value: V, generation: u64, now: i64) {
        let tag = tag_of(value.digest());
        let mut g = self
            .shard(value.digest())
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(e) = g.find_mut(tag[0], |e| e.is(&tag)) {
            e.value = value;
            return;
        }
        if g.len() >= self.per_shard {
            // Full: drop what is stale first, then an arbitrary eighth (digests are random, so
            // the table's order is too: this is random eviction).
            let before = g.len();
            g.retain(|e| e.value.stamp().current(generation, now));
            if g.len() >= self.per_shard {
                let mut drop = (self.per_shard / 8).max(1);
                g.retain(|_| {
                    let keep = drop == 0;
                    drop = drop.saturating_sub(1);
                    keep
                });
            }
            metrics::counter!("keyward_verify_cache_evictions_total")
                .increment((before - g.len()) as u64);
        }
        g.insert_unique(tag[0], Entry { tag, value }, Entry::hash);
    }

    fn remove(&self, d: &TokenDigest) {
        let tag = tag_of(d);
        let mut g = self.shard(d).write().unwrap_or_else(|e| e.into_inner());
        if let Ok(e) = g.find_entry(tag[0], |e| e.is(&tag)) {
            e.remove();
        }
    }

    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }
}

/// The outcome of one store read, shared by every request that waited for it.
type Loaded = Result<Option<Arc<Prepared>>, (String, bool)>;

/// One store read in flight.
type Inflight = tokio::sync::OnceCell<Loaded>;

/// Store reads in flight, by digest and the generation they started in.
type InflightMap = Mutex<rustc_hash::FxHashMap<(TokenDigest, u64), Arc<Inflight>>>;

/// A request's part in a store read in flight. Dropped when the request is done with the read,
/// or when the request itself is dropped midway (its client went away while the store was being
/// read): the read's entry then leaves the map once the read has finished, or once nobody else
/// waits for it. Without the second case, every abandoned read of a distinct token left its
/// entry behind for good.
struct Joined<'a> {
    inflight: &'a InflightMap,
    at: (TokenDigest, u64),
    /// `None` only while being dropped.
    cell: Option<Arc<Inflight>>,
}

impl<'a> Joined<'a> {
    /// Joins the read of `at`, starting one when none is in flight.
    fn join(inflight: &'a InflightMap, at: (TokenDigest, u64)) -> Joined<'a> {
        let cell = inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(at)
            .or_default()
            .clone();
        Joined {
            inflight,
            at,
            cell: Some(cell),
        }
    }

    fn cell(&self) -> &Inflight {
        // Set from `join` until `drop`.
        self.cell.as_deref().unwrap_or_else(|| unreachable!())
    }
}

impl Drop for Joined<'_> {
    fn drop(&mut self) {
        let mut g = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        let Some(cell) = self.cell.take() else { return };
        let (ours, done) = (Arc::as_ptr(&cell), cell.initialized());
        // Released under the lock, as every holder's is (and every new holder's clone is taken
        // under it): the last holder to leave sees a count of one, the map's.
        drop(cell);
        if g.get(&self.at)
            .is_some_and(|c| Arc::as_ptr(c) == ours && (done || Arc::strong_count(c) == 1))
        {
            g.remove(&self.at);
        }
    }
}

/// The cache itself.
pub struct VerifyCache {
    found: Map<Found>,
    missing: Map<Unknown>,
    /// Whole agent records by id, for `GET /v1/me` (shared by all of an agent's keys).
    agents: RwLock<rustc_hash::FxHashMap<uuid::Uuid, (u64, Arc<keyward_core::model::Agent>)>>,
    agent_capacity: usize,
    generation: AtomicU64,
    /// Whether answers may come from this cache at all (on a shared store, only while this node
    /// is in sync with the other nodes' writes).
    pub coherence: crate::coherence::Coherence,
    /// Store reads in flight, by digest and the generation they started in: a request that
    /// arrives after an invalidation never joins a read that started before it.
    inflight: InflightMap,
    /// Scope and agent-name texts shared by the snapshots.
    texts: Texts,
}

impl std::fmt::Debug for VerifyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyCache")
            .field("entries", &self.found.len())
            .finish()
    }
}

impl VerifyCache {
    /// A cache over a store; `shared` when other nodes write to it too.
    pub fn new(s: CacheSettings, shared: bool) -> VerifyCache {
        VerifyCache {
            coherence: crate::coherence::Coherence::new(shared, s.max_staleness),
            found: Map::new(s.capacity, s.ttl),
            missing: Map::new(s.negative_capacity, s.negative_ttl),
            agents: RwLock::new(Default::default()),
            agent_capacity: (s.capacity as usize).clamp(1, 1_000_000),
            generation: AtomicU64::new(0),
            inflight: Mutex::new(Default::default()),
            texts: Texts::default(),
        }
    }

    /// Makes every entry a miss from now on; reads in flight will not answer from before it.
    pub fn invalidate_all(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// The prepared snapshot of a presented token at `now_ms` (the request's time), or `None`
    /// for an unknown or malformed token. While this node may have missed other nodes' writes
    /// for longer than it may be stale, the store is read whatever the cache holds.
    ///
    /// The token is hashed and looked up before it is parsed: a hit is the digest of a stored
    /// key, and every stored key's token is well formed, so parsing (the checksum) only runs on
    /// a miss, where it keeps malformed tokens away from the store.
    pub async fn lookup(
        &self,
        store: &dyn Store,
        meter: &Meter,
        token: &str,
        now_ms: i64,
    ) -> Result<Option<Arc<Prepared>>, StoreError> {
        let Some(digest) = VerifyCache::digest_of(token) else {
            return Ok(None);
        };
        self.lookup_digest(store, meter, token, digest, now_ms)
            .await
    }

    /// The digest to look `token` up by, or `None` for a string longer than any token (not
    /// worth hashing: a header can hold hundreds of kilobytes), which is never a key.
    pub fn digest_of(token: &str) -> Option<TokenDigest> {
        (token.len() <= keyward_core::token::MAX_TOKEN_LEN).then(|| TokenDigest::of(token))
    }

    /// [`VerifyCache::lookup`] for a token whose digest the caller has computed already.
    pub async fn lookup_digest(
        &self,
        store: &dyn Store,
        meter: &Meter,
        token: &str,
        digest: TokenDigest,
        now_ms: i64,
    ) -> Result<Option<Arc<Prepared>>, StoreError> {
        match self.cached(&digest, now_ms) {
            Some(hit) => Ok(hit),
            // Boxed so the store read's future does not enlarge every hit's.
            None => Box::pin(self.load(store, meter, token, digest, now_ms)).await,
        }
    }

    /// Whether a snapshot this cache handed out may still be answered from: this node is in
    /// sync, and the snapshot is of the current generation and not expired. (A connection keeps
    /// its caller's snapshot, and asks this instead of the map.)
    pub fn is_current(&self, p: &Prepared, now_ms: i64) -> bool {
        self.coherence.fresh()
            && p.stamp
                .current(self.generation.load(Ordering::Acquire), now_ms)
    }

    /// What this generation of the cache holds for a digest: `Some(Some(_))` for a key,
    /// `Some(None)` for a known unknown, `None` when the store must be asked. The map's probe
    /// compares digests in constant time.
    fn cached(&self, digest: &TokenDigest, now_ms: i64) -> Option<Option<Arc<Prepared>>> {
        if !self.coherence.fresh() {
            return None;
        }
        let generation = self.generation.load(Ordering::Acquire);
        if let Some(p) = self.found.get(digest, generation, now_ms) {
            stats().add(Hot::CacheHit);
            return Some(Some(p));
        }
        if self.missing.get(digest, generation, now_ms).is_some() {
            stats().add(Hot::CacheNegativeHit);
            return Some(None);
        }
        None
    }

    /// A miss: parse the token (malformed ones stop here), then read the store, one read per
    /// digest however many requests wait for it.
    async fn load(
        &self,
        store: &dyn Store,
        meter: &Meter,
        token: &str,
        digest: TokenDigest,
        now_ms: i64,
    ) -> Result<Option<Arc<Prepared>>, StoreError> {
        let generation = self.generation.load(Ordering::Acquire);
        if keyward_core::token::parse(token).is_err() {
            return Ok(None);
        }
        stats().add(Hot::CacheMiss);
        // Coalesce: the first request for this digest reads the store; the others wait for it.
        let joined = Joined::join(&self.inflight, (digest, generation));
        let loaded = joined
            .cell()
            .get_or_init(|| async {
                let r = match store.find_key_by_digest(&digest).await {
                    Ok(found) => Ok(prepare(
                        found,
                        &digest,
                        meter,
                        &self.texts,
                        self.found.stamp(generation, now_ms),
                    )),
                    Err(e) => Err((e.to_string(), matches!(e, StoreError::Unavailable(_)))),
                };
                if let Ok(v) = &r {
                    match v {
                        Some(p) => self.found.insert(
                            Found {
                                snap: p.clone(),
                                live: p.live.clone(),
                            },
                            generation,
                            now_ms,
                        ),
                        None => self.missing.insert(
                            Unknown {
                                digest,
                                stamp: self.missing.stamp(generation, now_ms),
                            },
                            generation,
                            now_ms,
                        ),
                    }
                }
                r
            })
            .await
            .clone();
        // The read is done: its entry goes, and a later request starts a read of its own.
        drop(joined);
        let answer = match loaded {
            Ok(v) => v,
            Err((msg, true)) => return Err(StoreError::Unavailable(msg)),
            Err((msg, false)) => return Err(StoreError::Internal(msg)),
        };
        let answer = if self.generation.load(Ordering::Acquire) != generation {
            // A write landed while this read was in flight: what we hold could predate it.
            self.found.remove(&digest);
            self.missing.remove(&digest);
            // Answered but not cached, so its stamp is never read.
            prepare(
                store.find_key_by_digest(&digest).await?,
                &digest,
                meter,
                &self.texts,
                Stamp::default(),
            )
        } else {
            answer
        };
        Ok(answer)
    }

    /// An agent's whole record, from the cache when this generation has it. Agents change only
    /// through writes that bump the generation, so a cached record is never older than the last
    /// write through this server.
    pub async fn agent(
        &self,
        store: &dyn Store,
        org_id: uuid::Uuid,
        agent_id: uuid::Uuid,
    ) -> Result<Option<Arc<keyward_core::model::Agent>>, StoreError> {
        let generation = self.generation.load(Ordering::Acquire);
        if let Some((g, a)) = self
            .agents
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&agent_id)
            .filter(|_| self.coherence.fresh())
        {
            if *g == generation && a.org_id == org_id {
                return Ok(Some(a.clone()));
            }
        }
        let Some(agent) = store.get_agent(org_id, agent_id).await? else {
            return Ok(None);
        };
        let agent = Arc::new(agent);
        if self.generation.load(Ordering::Acquire) == generation {
            let mut map = self.agents.write().unwrap_or_else(|e| e.into_inner());
            if map.len() >= self.agent_capacity {
                map.clear();
            }
            map.insert(agent_id, (generation, agent.clone()));
        }
        Ok(Some(agent))
    }

    /// Snapshots currently held (the `keyward_verify_cache_entries` gauge).
    pub fn entries(&self) -> u64 {
        self.found.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::{InflightMap, Joined, Loaded, Map, Texts, Unknown, SHARDS};
    use keyward_core::token::TokenDigest;
    use std::time::Duration;

    fn at(n: u8) -> (TokenDigest, u64) {
        (TokenDigest([n; 32]), 0)
    }

    fn entries(m: &InflightMap) -> usize {
        m.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// A digest whose bytes 8 (the shard), 16..32 (the tag) and the rest are given.
    fn digest(shard: u8, tag: u8, rest: u8) -> TokenDigest {
        let mut d = [rest; 32];
        d[8] = shard;
        d[16..].fill(tag);
        TokenDigest(d)
    }

    fn unknown(m: &Map<Unknown>, d: TokenDigest, generation: u64, now: i64) -> Unknown {
        Unknown {
            digest: d,
            stamp: m.stamp(generation, now),
        }
    }

    /// The table finds entries by their tag alone; an entry still answers only for its own
    /// digest, and a digest that shares its tag replaces it rather than sitting beside it.
    #[test]
    fn an_entry_answers_only_for_its_own_digest() {
        let m: Map<Unknown> = Map::new(1000, Duration::from_secs(10));
        let (a, b) = (digest(1, 7, 1), digest(1, 7, 2));
        m.insert(unknown(&m, a, 0, 0), 0, 0);
        assert!(m.get(&a, 0, 0).is_some());
        assert!(m.get(&b, 0, 0).is_none(), "same tag, another digest");
        assert!(m.get(&digest(1, 8, 1), 0, 0).is_none(), "another tag");
        m.insert(unknown(&m, b, 0, 0), 0, 0);
        assert_eq!(m.len(), 1);
        assert!(m.get(&b, 0, 0).is_some());
        assert!(m.get(&a, 0, 0).is_none());
    }

    /// Stale entries (older generation, or past their TTL) are misses; inserting a digest again
    /// refreshes it in place; removing it removes it.
    #[test]
    fn stale_entries_miss_and_entries_refresh_in_place() {
        let m: Map<Unknown> = Map::new(1000, Duration::from_millis(100));
        let a = digest(3, 1, 1);
        m.insert(unknown(&m, a, 0, 0), 0, 0);
        assert!(m.get(&a, 0, 99).is_some());
        assert!(m.get(&a, 0, 100).is_none(), "expired");
        assert!(m.get(&a, 1, 50).is_none(), "invalidated");
        m.insert(unknown(&m, a, 1, 50), 1, 50);
        assert_eq!(m.len(), 1);
        assert!(m.get(&a, 1, 140).is_some());
        m.remove(&a);
        assert_eq!(m.len(), 0);
        assert!(m.get(&a, 1, 140).is_none());
    }

    /// A full shard drops its stale entries first, then an eighth of the rest; it never holds
    /// more than its share of the capacity, and the newest entry is always kept.
    #[test]
    fn a_full_shard_evicts_stale_entries_first_then_some_at_random() {
        let per_shard = 16;
        let m: Map<Unknown> = Map::new((per_shard * SHARDS) as u64, Duration::from_secs(10));
        // Half of the shard from generation 0, then the other half from generation 1.
        for n in 0..per_shard as u8 {
            let generation = u64::from(n >= 8);
            m.insert(unknown(&m, digest(5, n, n), generation, 0), generation, 0);
        }
        assert_eq!(m.len(), per_shard);
        let newest = digest(5, 100, 100);
        m.insert(unknown(&m, newest, 1, 0), 1, 0);
        assert_eq!(
            m.len(),
            9,
            "the 8 stale entries went, the 8 current ones stayed"
        );
        for n in 8..per_shard as u8 {
            assert!(m.get(&digest(5, n, n), 1, 0).is_some());
        }
        for n in 101..140u8 {
            m.insert(unknown(&m, digest(5, n, n), 1, 0), 1, 0);
            assert!(m.len() <= per_shard);
            assert!(
                m.get(&digest(5, n, n), 1, 0).is_some(),
                "the newest is kept"
            );
        }
        assert!(m.len() >= per_shard - per_shard / 8);
        // Other shards are untouched by this one's evictions.
        let elsewhere = digest(6, 1, 1);
        m.insert(unknown(&m, elsewhere, 1, 0), 1, 0);
        assert!(m.get(&elsewhere, 1, 0).is_some());
    }

    /// Equal scope lists share one copy with the same contents in the same order; the kept
    /// lists are bounded by their scopes together, not by their number.
    #[test]
    #[allow(clippy::unwrap_used)]
    fn scope_lists_are_shared_and_bounded_by_their_scopes() {
        use keyward_core::scope::{Scope, Scopes};
        let list =
            |names: &[&str]| -> Scopes { names.iter().map(|n| Scope::parse(n).unwrap()).collect() };
        let t = Texts::default();
        let a = t.scopes(&list(&["b:x", "a:y"]));
        let b = t.scopes(&list(&["b:x", "a:y"]));
        assert_eq!(a, list(&["b:x", "a:y"]));
        assert!(std::ptr::eq(a.as_ptr(), b.as_ptr()), "one copy");
        let other = t.scopes(&list(&["a:y", "b:x"]));
        assert!(!std::ptr::eq(a.as_ptr(), other.as_ptr()), "order is kept");
        assert_eq!(other[0].as_str(), "a:y");
        let long: Scopes = (0..Texts::MAX - 3)
            .map(|i| Scope::parse(&format!("s:{i}")).unwrap())
            .collect();
        t.scopes(&long);
        let g = t.scopes.lock().unwrap();
        assert_eq!(g.lists.len(), 1, "past the bound the table started again");
        assert_eq!(g.listed, Texts::MAX - 3);
    }

    /// A finished read leaves the map with its first reader, whoever else still holds it.
    #[test]
    fn a_finished_read_leaves_the_map() {
        let m = InflightMap::default();
        let (a, b) = (Joined::join(&m, at(1)), Joined::join(&m, at(1)));
        assert_eq!(entries(&m), 1, "one read for both");
        let _ = a.cell().set(Ok(None));
        drop(a);
        assert_eq!(entries(&m), 0);
        drop(b);
        assert_eq!(entries(&m), 0);
    }

    /// A read abandoned midway stays while someone still waits for it (that one carries it on)
    /// and goes with the last.
    #[test]
    fn an_abandoned_read_leaves_the_map_with_the_last_that_waited() {
        let m = InflightMap::default();
        let (a, b) = (Joined::join(&m, at(1)), Joined::join(&m, at(1)));
        let other = Joined::join(&m, at(2));
        drop(a);
        assert_eq!(entries(&m), 2);
        drop(b);
        assert_eq!(entries(&m), 1, "only the other digest's read is left");
        drop(other);
        assert_eq!(entries(&m), 0);
    }

    /// The case the guard is for: a request dropped while its store read is pending, as when
    /// its client disconnects, one distinct token after another.
    #[tokio::test(start_paused = true)]
    async fn requests_dropped_mid_read_leave_nothing_behind() {
        let m = InflightMap::default();
        for n in 0..100u8 {
            let request = async {
                let joined = Joined::join(&m, at(n));
                let pending: Loaded = joined
                    .cell()
                    .get_or_init(std::future::pending::<Loaded>)
                    .await
                    .clone();
                drop(joined);
                pending
            };
            let dropped = tokio::time::timeout(std::time::Duration::from_millis(1), request).await;
            assert!(dropped.is_err(), "the read never answers");
        }
        assert_eq!(entries(&m), 0);
    }

    /// A million keys are held as a million snapshots and states: their sizes, with the 16 bytes
    /// of an `Arc`'s counts, are kept within mimalloc's 512- and 128-byte size classes (the next
    /// classes up are 640 and 160 bytes).
    #[test]
    fn a_snapshot_and_a_key_state_fit_their_allocation_size_classes() {
        assert!(std::mem::size_of::<super::Prepared>() + 16 <= 512);
        assert!(std::mem::size_of::<crate::usage::KeyState>() + 16 <= 128);
    }

    /// What a verification of a cached key reads of its snapshot lies in the first 384 bytes of
    /// its allocation (the `Arc`'s 16 bytes of counts, then the snapshot): six cache lines of
    /// the eight (see `Prepared`'s layout), and the digest the lookup compares within one.
    #[test]
    fn what_a_verification_reads_lies_in_the_first_six_cache_lines() {
        use super::Prepared;
        use keyward_core::model::Key;
        use std::mem::offset_of;
        // The size of a field's type, named by a projection to it.
        fn size<T, F>(_: fn(&T) -> &F) -> usize {
            std::mem::size_of::<F>()
        }
        // Where each named field of `$t` ends in the allocation: the `Arc`'s 16 bytes, `$base`
        // (where `$t` starts in the snapshot), the field's offset and its size.
        macro_rules! ends {
            ($base:expr, $t:ty: $($f:ident),+) => {
                [$(16 + $base + offset_of!($t, $f) + size(|v: &$t| &v.$f)),+]
            };
        }
        let key = offset_of!(Prepared, key);
        let snapshot =
            ends!(0, Prepared: stamp, agent_status, live, bucket, rate, rules, agent_name);
        let of_key = ends!(key, Key: id, digest, org_id, agent_id, parent_key_id, kind, environment,
            requires_signature, expires_at, deprecated_at, revoked_at, scopes, cidr_allowlist, quota);
        let hot: Vec<usize> = snapshot.into_iter().chain(of_key).collect();
        assert!(hot.iter().all(|&e| e <= 6 * 64), "{hot:?}");
        let digest = 16 + key + offset_of!(Key, digest);
        assert_eq!(
            digest / 64,
            (digest + 31) / 64,
            "the digest straddles two lines"
        );
    }
}
