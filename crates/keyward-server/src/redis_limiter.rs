//! Rate limits shared by every node (`--rate-limit-backend redis`): each key's GCRA state lives
//! in Redis and one Lua script reads, decides and writes it atomically, so N nodes together admit
//! what one would.
//!
//! The state is the theoretical arrival time in microseconds (Lua numbers are doubles: exact to
//! 2^53, which microseconds since 1970 stay under for centuries, while nanoseconds would not).
//! The node's own clock supplies "now", like every other time check; nodes are expected to keep
//! their clocks in sync (NTP), as for key expiry.
//!
//! When Redis cannot answer (down, unreachable, slower than `CALL_TIMEOUT`), the request is
//! decided by this node's local limiter instead, never waved through: a warning is logged once
//! per outage and `keyward_ratelimit_fallback_total` counts every such decision. After a failure
//! the node skips Redis for `RETRY_AFTER` so an outage does not add a timeout to every request;
//! then one request probes it again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keyward_core::gcra::{Decision, Gcra};
use redis::aio::ConnectionManager;
use uuid::Uuid;

/// The GCRA in one atomic step. KEYS[1]: the bucket. ARGV: now, emission interval and capacity
/// (emission x burst), all in microseconds. Returns {allowed (0/1), the TAT before this request}.
/// The bucket expires once it would be full again, so idle keys cost Redis nothing.
const SCRIPT: &str = r"
local now = tonumber(ARGV[1])
local t = tonumber(ARGV[2])
local cap = tonumber(ARGV[3])
local stored = tonumber(redis.call('GET', KEYS[1]) or '0')
local tat = stored
if tat < now then tat = now end
local new_tat = tat + t
local used = new_tat - now
if used <= cap then
  redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil(used / 1000) + 1000)
  return {1, string.format('%.0f', stored)}
end
return {0, string.format('%.0f', stored)}
";

/// The longest a rate-limit decision waits for Redis before the local limiter decides.
const CALL_TIMEOUT: Duration = Duration::from_millis(250);

/// How long the node decides locally after Redis failed before it tries Redis again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The Redis-backed limiter of one node.
pub struct RedisLimiter {
    conn: tokio::sync::OnceCell<ConnectionManager>,
    client: redis::Client,
    script: redis::Script,
    /// Milliseconds since `epoch` before which Redis is not tried (0: try it).
    skip_until_ms: AtomicU64,
    epoch: Instant,
    /// Whether the current outage was already logged.
    warned: AtomicBool,
}

impl std::fmt::Debug for RedisLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLimiter")
            .field("connected", &self.conn.initialized())
            .finish()
    }
}

/// Why Redis gave no decision.
#[derive(Debug)]
pub struct Unavailable(String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl RedisLimiter {
    /// A limiter over the Redis at `url` (`redis://host:port/db`). Connecting happens on first
    /// use, so a node starts even while Redis is down (deciding locally meanwhile).
    pub fn new(url: &str) -> Result<RedisLimiter, String> {
        let client = redis::Client::open(url).map_err(|e| format!("invalid Redis URL: {e}"))?;
        Ok(RedisLimiter {
            conn: tokio::sync::OnceCell::new(),
            client,
            script: redis::Script::new(SCRIPT),
            skip_until_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            warned: AtomicBool::new(false),
        })
    }

    /// Connects now (the server calls this at start to report a wrong address early).
    pub async fn connect(&self) -> Result<(), Unavailable> {
        self.conn().await.map(|_| ())
    }

    async fn conn(&self) -> Result<ConnectionManager, Unavailable> {
        self.conn
            .get_or_try_init(|| async {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(CALL_TIMEOUT)
                    .set_response_timeout(CALL_TIMEOUT)
                    .set_number_of_retries(1);
                ConnectionManager::new_with_config(self.client.clone(), config)
                    .await
                    .map_err(|e| Unavailable(format!("cannot connect to Redis: {e}")))
            })
            .await
            .cloned()
    }

    /// Decides one request for `bucket` at `now_ns` in Redis; `None` while Redis is being
    /// skipped after a failure.
    pub async fn check(
        &self,
        bucket: Uuid,
        gcra: &Gcra,
        now_ns: i64,
    ) -> Option<Result<Decision, Unavailable>> {
        let now_ms = self.epoch.elapsed().as_millis() as u64;
        if now_ms < self.skip_until_ms.load(Ordering::Relaxed) {
            return None;
        }
        let r = tokio::time::timeout(CALL_TIMEOUT, self.call(bucket, gcra, now_ns))
            .await
            .unwrap_or_else(|_| Err(Unavailable("Redis did not answer in time".into())));
        match &r {
            Ok(_) => {
                if self.warned.swap(false, Ordering::Relaxed) {
                    tracing::info!("Redis answers again; rate limits are shared across nodes");
                }
            }
            Err(e) => {
                self.skip_until_ms
                    .store(now_ms + RETRY_AFTER.as_millis() as u64, Ordering::Relaxed);
                if !self.warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        error = %e,
                        "Redis is unavailable; rate limits fall back to this node's local limiter"
                    );
                }
            }
        }
        Some(r)
    }

    async fn call(&self, bucket: Uuid, gcra: &Gcra, now_ns: i64) -> Result<Decision, Unavailable> {
        let mut conn = self.conn().await?;
        let now_us = now_ns / 1000;
        let emission_us = (gcra.emission_ns / 1000).max(1) as i64;
        let cap_us = emission_us.saturating_mul(gcra.burst.min(i64::MAX as u64) as i64);
        let (allowed, stored_us): (i64, i64) = self
            .script
            .key(format!("keyward:rl:{}", bucket.simple()))
            .arg(now_us)
            .arg(emission_us)
            .arg(cap_us)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| Unavailable(format!("Redis: {e}")))?;
        // The same arithmetic as the local limiter, from the state Redis held, for the headers;
        // the verdict is Redis's.
        let mut d = gcra.check(stored_us.saturating_mul(1000), now_ns);
        if d.allowed != (allowed == 1) {
            // Microsecond rounding at the very edge of the bucket: trust the atomic verdict.
            d.allowed = allowed == 1;
            if !d.allowed {
                d.remaining = 0;
                d.retry_after_ns = d.retry_after_ns.max(1_000);
            }
        }
        Ok(d)
    }
}
