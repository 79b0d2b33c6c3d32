//! Keyward's HTTP server: the axum app, the credential middleware, one module per resource, and
//! the OpenAPI document. Its one seam is [`serve`]: give it a config, a store, a bound listener
//! and a shutdown signal.

use std::future::Future;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::{middleware, Router};
use keyward_core::clock::Clock;
use keyward_store::Store;
use tokio::net::TcpListener;
use tower_http::catch_panic::CatchPanicLayer;

pub mod agents;
pub mod audit;
pub mod auth;
pub mod bootstrap;
pub mod cache;
pub mod coherence;
pub mod crypto;
pub mod decisions;
pub mod error;
pub mod extract;
pub mod front;
pub mod idempotency;
pub mod keys;
pub mod limiter;
pub mod me;
pub mod openapi;
pub mod ops;
pub mod orgs;
pub mod page;
pub mod redis_limiter;
pub mod render;
pub mod request_id;
pub mod signing;
pub mod stats;
pub mod usage;
pub mod usage_api;
pub mod verify;

pub use crypto::MasterKey;

/// The largest request body accepted: 1 MiB.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// What the server needs beyond its store.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Peers whose `X-Forwarded-For` is believed (API.md §6.1). Empty: the header is ignored.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Encrypts signing secrets at rest.
    pub master_key: MasterKey,
    /// The time source; tests inject a manual clock.
    pub clock: Arc<dyn Clock>,
    /// Sizes and lifetimes of the verify cache.
    pub cache: cache::CacheSettings,
    /// How often usage counts and last-used times are written to the store (API.md §6.3 asks
    /// that they be visible within 2 seconds).
    pub usage_flush_interval: std::time::Duration,
    /// Failed authentications allowed per client IP (`limit` per `period_s`, `burst` at once)
    /// before that address is refused for a while; `None` turns the throttle off.
    pub failed_auth_limit: Option<keyward_core::model::RateLimitSpec>,
    /// Where per-key rate-limit state lives.
    pub rate_limit_backend: RateLimitBackend,
}

/// Where per-key rate-limit state lives (API.md §6.2).
#[derive(Debug, Clone, Default)]
pub enum RateLimitBackend {
    /// In this node's memory: each node enforces each key's limit on its own.
    #[default]
    Local,
    /// In Redis, shared by every node (falls back to the local limiter while Redis is down).
    Redis(Arc<redis_limiter::RedisLimiter>),
}

/// The default failed-auth throttle: 100 failures at once, then 10 per second. Generous for a
/// misconfigured client, slow enough that guessing keys from one address (an IPv6 /64, with
/// wider budgets over its /56 and /48: see `limiter::AuthThrottle`) is pointless.
pub const DEFAULT_FAILED_AUTH_LIMIT: keyward_core::model::RateLimitSpec =
    keyward_core::model::RateLimitSpec {
        limit: 600,
        period_s: 60,
        burst: 100,
    };

/// Shared state of every handler: one `Arc`, so the clones axum makes for each middleware and
/// handler of every request cost one atomic increment (ten separate `Arc`s measured 5-7% of the
/// server's CPU under load in clone and drop alone).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] shares.
pub struct Shared {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub config: ServerConfig,
    /// Signatures seen within the signing window (API.md §6.5).
    pub replay: signing::ReplayCache,
    /// Prepared key snapshots by digest.
    pub cache: cache::VerifyCache,
    /// Each key's live traffic state: rate-limit bucket, quota counter, uses not yet flushed.
    pub meter: usage::Meter,
    /// Aggregated access decisions (`auth.denied`, failed `key.verify`) not yet written.
    pub decisions: decisions::DecisionLog,
    /// Failed authentications per client address (`config.failed_auth_limit`; off when none).
    pub auth_throttle: limiter::AuthThrottle,
    /// Work a request hands off so that it finishes even if the request is dropped (see
    /// [`AppState::detach`]); a graceful shutdown waits for it before its final flush.
    pub detached: tokio_util::task::TaskTracker,
    /// Permits for handed-off admissions through the store or Redis ([`DETACHED_MAX`]).
    pub detached_admissions: Arc<tokio::sync::Semaphore>,
    /// Permits for handed-off lookups of tokens whose requests were dropped ([`DETACHED_MAX`]),
    /// apart from the admissions' so that clients without a valid key cannot use those up.
    pub detached_lookups: Arc<tokio::sync::Semaphore>,
}

/// At most this many handed-off admissions, and apart from them this many handed-off lookups,
/// run at once: each waits on the store, and while the store stalls, clients that give up and
/// ask again would otherwise pile them up without bound. Beyond it an admission is refused and
/// a lookup is not made (see their callers). Key writes and usage flushes, which clients cannot
/// start at will, are not limited.
pub const DETACHED_MAX: usize = 4096;

impl AppState {
    /// The state of a server over `store` (no background tasks; `serve` starts those).
    pub fn new(config: ServerConfig, store: Arc<dyn Store>) -> AppState {
        let shared = store.is_shared();
        // The first reading of the system clock's fast path calibrates it: before any request.
        config.clock.now_ms();
        let failed_auth_gcra = config
            .failed_auth_limit
            .and_then(|l| keyward_core::gcra::Gcra::new(l.limit, l.period_s, l.burst));
        AppState(Arc::new(Shared {
            auth_throttle: limiter::AuthThrottle::new(failed_auth_gcra),
            store,
            clock: config.clock.clone(),
            cache: cache::VerifyCache::new(config.cache, shared),
            config,
            replay: signing::ReplayCache::default(),
            meter: usage::Meter::default(),
            decisions: decisions::DecisionLog::default(),
            detached: tokio_util::task::TaskTracker::new(),
            detached_admissions: Arc::new(tokio::sync::Semaphore::new(DETACHED_MAX)),
            detached_lookups: Arc::new(tokio::sync::Semaphore::new(DETACHED_MAX)),
        }))
    }

    /// Runs `work` in a task of its own, in the current span, tracked by [`Shared::detached`].
    /// For work a request starts that must not stop halfway when the request is dropped, as it
    /// is when its client goes away (a store write and its invalidation, a quota unit taken and
    /// counted): the task finishes it whatever happens to the request.
    pub fn detach<F>(&self, work: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        use tracing::Instrument;
        self.detached.spawn(work.in_current_span())
    }

    /// The end of a graceful shutdown, once no request is left and the usage flusher has
    /// stopped: waits for the work requests handed off (a quota unit being taken for a client
    /// that left, a write), for at most `within`, so that what it counts is in the final flush;
    /// then writes the last usage counts and access decisions, each for at most `within` too (a
    /// store that hangs must not hang shutdown; what a flush given up on had taken is lost).
    pub async fn finish(&self, within: std::time::Duration) {
        self.detached.close();
        if tokio::time::timeout(within, self.detached.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                tasks = self.detached.len(),
                "handed-off request work still running at shutdown; not waiting for it"
            );
        }
        match tokio::time::timeout(within, self.meter.flush(self.store.as_ref())).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "final usage flush failed"),
            Err(_) => tracing::error!("final usage flush still running at shutdown; given up"),
        }
        if tokio::time::timeout(within, self.decisions.flush(self.store.as_ref()))
            .await
            .is_err()
        {
            tracing::error!("final decisions flush still running at shutdown; given up");
        }
    }

    /// The current time at the API's precision (milliseconds), so that what a handler holds in
    /// memory equals what the store gives back.
    pub fn now(&self) -> keyward_core::model::Timestamp {
        keyward_core::clock::truncate_to_millis(self.clock.now())
    }

    /// The current time as Unix milliseconds, for the hot path (no calendar date is built).
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Writes this node's pending usage now, in a task of its own, and waits for it. A flush
    /// dropped halfway loses the counts it took (they are neither pending nor written), so a
    /// caller that may be dropped, as a request handler is when its client goes away, must not
    /// run one in its own future: the task finishes the flush whatever happens to the caller.
    pub async fn flush_usage(&self) -> keyward_store::StoreResult<()> {
        let state = self.clone();
        self.detach(async move { state.meter.flush(state.store.as_ref()).await })
            .await
            .map_err(|e| keyward_store::StoreError::Internal(format!("usage flush task: {e}")))?
    }

    /// Runs a store write that changes what a key may do (or creates one) in a task of its own,
    /// then drops the verify cache (whether or not the write reported success), and waits for
    /// both. A request handler is dropped when its
    /// client goes away, and the store may commit a write after the future that asked for it is
    /// gone (SQLite's worker thread finishes a commit it was handed): run in the handler's own
    /// future, a revocation could commit and never reach `on_key_change`, and the revoked key
    /// would be answered from the cache until its snapshot expired.
    pub async fn key_write<T, F, Fut>(&self, write: F) -> keyward_store::StoreResult<T>
    where
        F: FnOnce(Arc<dyn Store>) -> Fut,
        Fut: Future<Output = keyward_store::StoreResult<T>> + Send + 'static,
        T: Send + 'static,
    {
        let state = self.clone();
        let written = write(self.store.clone());
        self.detach(async move {
            let r = written.await;
            // Whatever the answer: a write may have committed though the store reported an
            // error (a lost commit acknowledgement), and a needless invalidation costs O(1).
            state.on_key_change();
            r
        })
        .await
        .map_err(|e| keyward_store::StoreError::Internal(format!("key write task: {e}")))?
    }

    /// Deletes the idempotency records past their 24 hours (never honoured again, API.md §0),
    /// a batch at a time; how many went. `idempotency_sweeper` runs it every hour.
    pub async fn sweep_idempotency(&self) -> keyward_store::StoreResult<u64> {
        /// Records per statement: small enough that the SQLite writer is not held for long.
        const BATCH: u32 = 1_000;
        let before = self.now() - chrono::Duration::milliseconds(keyward_store::IDEMPOTENCY_TTL_MS);
        let mut swept = 0;
        loop {
            let n = self.store.prune_idempotency(before, BATCH).await?;
            swept += n;
            if n < u64::from(BATCH) {
                return Ok(swept);
            }
        }
    }

    /// Called after every write that changes what a key may do (or creates one): drops the
    /// verify cache on this node at once. Handlers reach it through [`AppState::key_write`].
    pub fn on_key_change(&self) {
        metrics::counter!("keyward_key_changes_total").increment(1);
        self.cache.invalidate_all();
    }
}

/// Builds the whole application router.
pub fn app(state: AppState) -> Router {
    let v1 = Router::new()
        .route(
            "/v1/orgs/{org_id}",
            get(orgs::get_org).patch(orgs::patch_org),
        )
        .route(
            "/v1/orgs/{org_id}/agents",
            post(agents::create).get(agents::list),
        )
        .route(
            "/v1/orgs/{org_id}/agents/by-name/{name}",
            get(agents::get_by_name),
        )
        .route(
            "/v1/orgs/{org_id}/agents/{agent_id}",
            get(agents::get)
                .patch(agents::update)
                .delete(agents::delete),
        )
        .route(
            "/v1/orgs/{org_id}/agents/{agent_id}/pause",
            post(agents::pause),
        )
        .route(
            "/v1/orgs/{org_id}/agents/{agent_id}/resume",
            post(agents::resume),
        )
        .route(
            "/v1/orgs/{org_id}/agents/{agent_id}/keys",
            post(keys::mint_agent_key).get(keys::list_agent_keys),
        )
        .route(
            "/v1/orgs/{org_id}/agents/{agent_id}/keys/{key_id}/deprecate",
            post(keys::deprecate),
        )
        .route(
            "/v1/orgs/{org_id}/agents/{agent_id}/keys/{key_id}/undeprecate",
            post(keys::undeprecate),
        )
        .route(
            "/v1/orgs/{org_id}/agents/{agent_id}/keys/{key_id}/revoke",
            post(keys::revoke_agent_key),
        )
        .route(
            "/v1/orgs/{org_id}/keys",
            post(keys::create_root_key).get(keys::list_org_keys),
        )
        .route("/v1/orgs/{org_id}/audit", get(audit::list))
        .route("/v1/keys/derive", post(keys::derive))
        .route("/v1/keys/verify", post(verify::verify))
        .route(
            "/v1/keys/{key_id}",
            get(keys::get_key).patch(keys::patch_key),
        )
        .route("/v1/keys/{key_id}/rotate", post(keys::rotate))
        .route("/v1/keys/{key_id}/revoke", post(keys::revoke_key))
        .route("/v1/keys/{key_id}/usage", get(usage_api::usage))
        .route("/v1/me", get(me::me))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::middleware,
        ));

    Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(ops::openapi_json))
        .route("/docs", get(ops::docs))
        .merge(v1)
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| panic_response(),
        ))
        .layer(middleware::from_fn(request_id::middleware))
        .with_state(state)
}

/// The answer to a request whose handler panicked: `500 INTERNAL`, nothing more.
pub(crate) fn panic_response() -> axum::response::Response {
    use axum::response::IntoResponse;
    tracing::error!("handler panicked");
    error::ApiError::new(keyward_proto::ErrorCode::Internal).into_response()
}

/// Makes each accepted connection's [`front::Front`] (which knows the peer's address).
#[derive(Clone)]
struct MakeFront {
    state: AppState,
    router: Router,
}

impl<'a> tower::Service<axum::serve::IncomingStream<'a, TcpListener>> for MakeFront {
    type Response = front::Front;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<front::Front, std::convert::Infallible>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, conn: axum::serve::IncomingStream<'a, TcpListener>) -> Self::Future {
        std::future::ready(Ok(front::Front::new(
            self.state.clone(),
            self.router.clone(),
            *conn.remote_addr(),
        )))
    }
}

/// Serves the API on `listener` until `shutdown` resolves, then drains in-flight requests.
pub async fn serve(
    config: ServerConfig,
    store: Arc<dyn Store>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    ops::prometheus();
    let state = AppState::new(config, store);
    let (stop_flusher, stopped) = tokio::sync::watch::channel(false);
    let flusher = tokio::spawn(usage_flusher(state.clone(), stopped));
    let watcher = tokio::spawn(coherence::run(state.clone()));
    let upkeep = tokio::spawn(ops::metrics_upkeep(ops::METRICS_UPKEEP_INTERVAL));
    let pruner = tokio::spawn(throttle_pruner(state.clone()));
    let sweeper = tokio::spawn(idempotency_sweeper(state.clone()));
    // Stopped in order below when serving ends; aborted if this future is dropped first.
    let _background = Background(vec![
        flusher.abort_handle(),
        watcher.abort_handle(),
        upkeep.abort_handle(),
        pruner.abort_handle(),
        sweeper.abort_handle(),
    ]);
    let make = MakeFront {
        router: app(state.clone()),
        state: state.clone(),
    };
    let served = axum::serve(listener, make)
        .with_graceful_shutdown(shutdown)
        .await;
    // Stopped, not aborted: a flush in flight finishes (an abort could drop counts it had
    // already taken from the keys), then the final flush below writes the rest.
    // A store that hangs must not hang shutdown with it: after a bound, the flush is given up.
    let _ = stop_flusher.send(true);
    let flusher_abort = flusher.abort_handle();
    if tokio::time::timeout(std::time::Duration::from_secs(10), flusher)
        .await
        .is_err()
    {
        tracing::warn!("usage flush still running after 10 s at shutdown; giving up on it");
        flusher_abort.abort();
    }
    watcher.abort();
    upkeep.abort();
    pruner.abort();
    sweeper.abort();
    state.finish(std::time::Duration::from_secs(10)).await;
    served
}

/// The background tasks of one `serve`, aborted when it is dropped: a caller that stops serving
/// by dropping the future (a `select!`, an aborted task) would otherwise leave them running,
/// each holding the server's state and its store, for the life of the process.
struct Background(Vec<tokio::task::AbortHandle>);

impl Drop for Background {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Forgets failed-auth throttle state that has refilled, every second. A task of its own, not
/// a step of the usage flush: while the store hangs a flush does too, and addresses that fail
/// would pile up in the throttle meanwhile.
async fn throttle_pruner(state: AppState) {
    every(std::time::Duration::from_secs(1), || async {
        let now_ns = state.now().timestamp_nanos_opt().unwrap_or(i64::MAX);
        state.auth_throttle.prune(now_ns);
    })
    .await
}

/// Runs `chore` now and then every `period` (a late tick is not caught up on: the next waits a
/// whole period), until the task is aborted. The background tasks' shared loop.
pub(crate) async fn every<F, Fut>(period: std::time::Duration, mut chore: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        chore().await;
    }
}

/// Deletes expired idempotency records at start and then every hour: each creating request
/// with an `Idempotency-Key` leaves one, and nothing else ever removes it.
async fn idempotency_sweeper(state: AppState) {
    every(std::time::Duration::from_secs(3600), || async {
        match state.sweep_idempotency().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(records = n, "expired idempotency records deleted"),
            Err(e) => tracing::warn!(error = %e, "idempotency sweep failed; will retry"),
        }
    })
    .await
}

/// Writes usage and aggregated decisions to the store every `usage_flush_interval`;
/// `/metrics` shows the lag since the last successful flush.
async fn usage_flusher(state: AppState, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(state.config.usage_flush_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_ok = std::time::Instant::now();
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        ticks += 1;
        match state.meter.flush(state.store.as_ref()).await {
            Ok(()) => last_ok = std::time::Instant::now(),
            Err(e) => tracing::warn!(error = %e, "usage flush failed; will retry"),
        }
        state.decisions.flush(state.store.as_ref()).await;
        // Forgetting idle key states walks every state: not every tick.
        if ticks.is_multiple_of(30) {
            state.meter.prune(state.now_ms());
        }
        crate::stats::stats().publish();
        metrics::gauge!("keyward_verify_cache_entries").set(state.cache.entries() as f64);
        metrics::gauge!("keyward_key_states").set(state.meter.states() as f64);
        metrics::gauge!("keyward_usage_flush_lag_seconds").set(last_ok.elapsed().as_secs_f64());
        metrics::gauge!("keyward_cache_staleness_seconds")
            .set(state.cache.coherence.lag_ms() as f64 / 1000.0);
    }
}

/// The size of the future an `async fn` returns, without calling it: `future_size!(f, A, B)`
/// for an `f` taking an `A` and a `B`. For tests that keep the hot path's futures small.
#[cfg(test)]
pub(crate) mod future_size {
    pub trait ReturnSize<Args> {
        fn return_size(&self) -> usize;
    }
    macro_rules! impl_return_size {
        ($($t:ident),*) => {
            impl<F, R, $($t),*> ReturnSize<($($t,)*)> for F where F: Fn($($t),*) -> R {
                fn return_size(&self) -> usize {
                    std::mem::size_of::<R>()
                }
            }
        };
    }
    impl_return_size!(A);
    impl_return_size!(A, B);
    impl_return_size!(A, B, C);
    impl_return_size!(A, B, C, D);
    impl_return_size!(A, B, C, D, E);
    impl_return_size!(A, B, C, D, E, G);

    #[macro_export]
    #[doc(hidden)]
    macro_rules! future_size {
        ($f:expr, $($t:ty),*) => {
            $crate::future_size::ReturnSize::<($($t,)*)>::return_size(&$f)
        };
    }
}
