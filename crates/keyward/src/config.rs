//! The binary's configuration: one typed struct.
//!
//! Precedence, lowest to highest: built-in defaults < the TOML file named by `--config`
//! (`KEYWARD_CONFIG`) < `KEYWARD_*` environment variables < command-line flags. Clap reads a
//! flag or its env var (flag first); the file fills in what neither gave. A config file the user
//! named but that is missing or malformed is an error, never silently ignored.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Args;
use serde::Deserialize;

/// Options shared by every operator command.
#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// TOML configuration file.
    #[arg(long, global = true, env = "KEYWARD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where the embedded database, the master key and the root key live.
    #[arg(long, global = true, env = "KEYWARD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// `postgres://...` selects PostgreSQL instead of the embedded SQLite store.
    #[arg(long, global = true, env = "KEYWARD_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `keyward=debug`.
    #[arg(long, global = true, env = "KEYWARD_LOG")]
    pub log: Option<String>,
}

/// Options of `keyward serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "KEYWARD_LISTEN")]
    pub listen: Option<String>,
    /// Comma-separated CIDRs of proxies whose `X-Forwarded-For` is trusted.
    #[arg(long, env = "KEYWARD_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Option<Vec<String>>,
    /// Most key snapshots the verify cache holds.
    #[arg(long, env = "KEYWARD_CACHE_CAPACITY")]
    pub cache_capacity: Option<u64>,
    /// Seconds a cached snapshot may be served without a store read (the staleness bound for
    /// writes made by another process).
    #[arg(long, env = "KEYWARD_CACHE_TTL_S")]
    pub cache_ttl_s: Option<u64>,
    /// Most unknown tokens remembered.
    #[arg(long, env = "KEYWARD_NEGATIVE_CACHE_CAPACITY")]
    pub negative_cache_capacity: Option<u64>,
    /// Seconds an unknown token is remembered.
    #[arg(long, env = "KEYWARD_NEGATIVE_CACHE_TTL_S")]
    pub negative_cache_ttl_s: Option<u64>,
    /// Milliseconds between writes of usage counts and decision audit events.
    #[arg(long, env = "KEYWARD_USAGE_FLUSH_MS")]
    pub usage_flush_ms: Option<u64>,
    /// Failed authentications allowed per client IP per minute (0 turns the throttle off).
    #[arg(long, env = "KEYWARD_FAILED_AUTH_PER_MINUTE")]
    pub failed_auth_per_minute: Option<u64>,
    /// Failed authentications allowed at once per client IP.
    #[arg(long, env = "KEYWARD_FAILED_AUTH_BURST")]
    pub failed_auth_burst: Option<u64>,
    /// On PostgreSQL: milliseconds a node keeps answering from its cache after losing sight of
    /// the other nodes' writes (its change watch is down); past it, every verification reads
    /// the store, or fails with 503 when the store cannot answer.
    #[arg(long, env = "KEYWARD_MAX_STALENESS_MS")]
    pub max_staleness_ms: Option<u64>,
    /// Where per-key rate-limit state lives: `local` (each node on its own) or `redis` (shared
    /// by every node; needs --redis-url).
    #[arg(long, env = "KEYWARD_RATE_LIMIT_BACKEND")]
    pub rate_limit_backend: Option<String>,
    /// `redis://host:port/db` for the redis rate-limit backend.
    #[arg(long, env = "KEYWARD_REDIS_URL")]
    pub redis_url: Option<String>,
}

/// The TOML file's shape.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    pub database_url: Option<String>,
    pub log: Option<String>,
    pub trusted_proxies: Option<Vec<String>>,
    pub cache_capacity: Option<u64>,
    pub cache_ttl_s: Option<u64>,
    pub negative_cache_capacity: Option<u64>,
    pub negative_cache_ttl_s: Option<u64>,
    pub usage_flush_ms: Option<u64>,
    pub failed_auth_per_minute: Option<u64>,
    pub failed_auth_burst: Option<u64>,
    pub max_staleness_ms: Option<u64>,
    pub rate_limit_backend: Option<String>,
    pub redis_url: Option<String>,
}

/// Where rate-limit state lives, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateLimitBackend {
    Local,
    /// The Redis URL (it may carry a password: never printed).
    Redis(String),
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub database_url: Option<String>,
    pub log: String,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub cache: keyward_server::cache::CacheSettings,
    pub usage_flush: std::time::Duration,
    pub failed_auth_limit: Option<keyward_core::model::RateLimitSpec>,
    pub rate_limit_backend: RateLimitBackend,
}

/// The smallest staleness bound accepted.
pub const MIN_STALENESS_MS: u64 = 200;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8470";
pub const DEFAULT_DATA_DIR: &str = "./keyward-data";

fn read_file(path: &Path) -> Result<FileConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("invalid config file {}: {e}", path.display()))
}

impl Config {
    /// Resolves flags, env, file and defaults.
    pub fn resolve(g: &GlobalArgs, s: Option<&ServeArgs>) -> Result<Config, String> {
        let file = match &g.config {
            Some(p) => read_file(p)?,
            None => FileConfig::default(),
        };
        let data_dir = g
            .data_dir
            .clone()
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let listen_text = s
            .and_then(|s| s.listen.clone())
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen = listen_text.parse::<SocketAddr>().map_err(|_| {
            format!(
                "invalid listen address `{listen_text}` (expected host:port, e.g. 127.0.0.1:8470)"
            )
        })?;
        let proxies = s
            .and_then(|s| s.trusted_proxies.clone())
            .or(file.trusted_proxies)
            .unwrap_or_default();
        let proxies: Vec<String> = proxies
            .into_iter()
            .filter(|p| !p.trim().is_empty())
            .collect();
        let trusted_proxies = keyward_core::cidr::parse_allowlist(&proxies)
            .map_err(|e| format!("invalid trusted_proxies: {e}"))?;
        let pick = |flag: Option<u64>, file: Option<u64>| flag.or(file);
        let defaults = keyward_server::cache::CacheSettings::default();
        let positive = |name: &str, v: Option<u64>| -> Result<Option<u64>, String> {
            match v {
                Some(0) => Err(format!("{name} must be greater than 0")),
                other => Ok(other),
            }
        };
        let cache = keyward_server::cache::CacheSettings {
            capacity: positive(
                "cache_capacity",
                pick(s.and_then(|s| s.cache_capacity), file.cache_capacity),
            )?
            .unwrap_or(defaults.capacity),
            ttl: positive(
                "cache_ttl_s",
                pick(s.and_then(|s| s.cache_ttl_s), file.cache_ttl_s),
            )?
            .map(std::time::Duration::from_secs)
            .unwrap_or(defaults.ttl),
            negative_capacity: positive(
                "negative_cache_capacity",
                pick(
                    s.and_then(|s| s.negative_cache_capacity),
                    file.negative_cache_capacity,
                ),
            )?
            .unwrap_or(defaults.negative_capacity),
            negative_ttl: positive(
                "negative_cache_ttl_s",
                pick(
                    s.and_then(|s| s.negative_cache_ttl_s),
                    file.negative_cache_ttl_s,
                ),
            )?
            .map(std::time::Duration::from_secs)
            .unwrap_or(defaults.negative_ttl),
            max_staleness: match pick(s.and_then(|s| s.max_staleness_ms), file.max_staleness_ms) {
                // The watch proves itself every max_staleness / 4 (at least every 50 ms); below
                // this a healthy node would flap between ready and not ready.
                Some(ms) if ms < MIN_STALENESS_MS => {
                    return Err(format!(
                        "max_staleness_ms must be at least {MIN_STALENESS_MS} (got {ms})"
                    ))
                }
                Some(ms) => std::time::Duration::from_millis(ms),
                None => defaults.max_staleness,
            },
        };
        let redis_url = s.and_then(|s| s.redis_url.clone()).or(file.redis_url);
        let backend = s
            .and_then(|s| s.rate_limit_backend.clone())
            .or(file.rate_limit_backend);
        let rate_limit_backend = match (backend.as_deref(), redis_url) {
            (None | Some("local"), None) => RateLimitBackend::Local,
            (None | Some("redis"), Some(url)) => {
                if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                    return Err("invalid redis_url (expected redis://host:port/db)".to_string());
                }
                RateLimitBackend::Redis(url)
            }
            (Some("redis"), None) => {
                return Err("rate_limit_backend redis needs redis_url (--redis-url)".to_string())
            }
            (Some("local"), Some(_)) => {
                return Err(
                    "redis_url is set but rate_limit_backend is local; drop one of them"
                        .to_string(),
                )
            }
            (Some(other), _) => {
                return Err(format!(
                    "invalid rate_limit_backend `{other}` (expected local or redis)"
                ))
            }
        };
        let usage_flush = positive(
            "usage_flush_ms",
            pick(s.and_then(|s| s.usage_flush_ms), file.usage_flush_ms),
        )?
        .map(std::time::Duration::from_millis)
        .unwrap_or(std::time::Duration::from_secs(1));
        let per_minute = pick(
            s.and_then(|s| s.failed_auth_per_minute),
            file.failed_auth_per_minute,
        );
        let burst = pick(s.and_then(|s| s.failed_auth_burst), file.failed_auth_burst);
        let d = keyward_server::DEFAULT_FAILED_AUTH_LIMIT;
        let failed_auth_limit = match per_minute {
            Some(0) => None,
            other => {
                let spec = keyward_core::model::RateLimitSpec {
                    limit: other.unwrap_or(d.limit),
                    period_s: 60,
                    burst: burst.unwrap_or(d.burst),
                };
                spec.validate("failed_auth").map_err(|e| e.message)?;
                Some(spec)
            }
        };
        Ok(Config {
            rate_limit_backend,
            cache,
            usage_flush,
            failed_auth_limit,
            data_dir,
            listen,
            database_url: g.database_url.clone().or(file.database_url),
            log: g
                .log
                .clone()
                .or(file.log)
                .unwrap_or_else(|| "info".to_string()),
            trusted_proxies,
        })
    }
}
