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
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub database_url: Option<String>,
    pub log: String,
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

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
        Ok(Config {
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
