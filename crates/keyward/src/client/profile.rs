//! The client's settings file, written by `keyward setup` and read by every client command:
//! base URL, API key and org id, in TOML, mode 0600.
//!
//! Where it lives: `--client-config` / `KEYWARD_CLIENT_CONFIG`, else
//! `$XDG_CONFIG_HOME/keyward/config.toml`, else `$HOME/.config/keyward/config.toml`. (Not
//! `KEYWARD_CONFIG`: that names the server's TOML file, whose shape is different.)
//!
//! Precedence for each setting, lowest to highest: the file < `KEYWARD_*` environment variables
//! < command-line flags, the same order as the server's configuration.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The file's shape.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org_id: Option<String>,
}

/// The settings file's path, from the flag or env var, else the XDG location.
pub fn path(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let non_empty = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = non_empty("XDG_CONFIG_HOME") {
        return Ok(PathBuf::from(dir).join("keyward").join("config.toml"));
    }
    if let Some(home) = non_empty("HOME") {
        return Ok(PathBuf::from(home)
            .join(".config")
            .join("keyward")
            .join("config.toml"));
    }
    Err("cannot locate the client settings file: set KEYWARD_CLIENT_CONFIG, XDG_CONFIG_HOME or HOME".into())
}

/// Reads the file; a missing file is an empty profile (nothing set up yet), a malformed one an
/// error.
pub fn load(path: &Path) -> Result<Profile, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text)
            .map_err(|e| format!("invalid client settings file {}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Profile::default()),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Writes the file readable by its owner only (0600, set before any byte is written; an
/// existing file's mode is tightened too), creating its directory (0700) if needed.
pub fn save(path: &Path, profile: &Profile) -> Result<(), String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
            }
        }
    }
    let text = toml::to_string(profile).map_err(|e| format!("cannot encode settings: {e}"))?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("cannot restrict {}: {e}", path.display()))?;
    }
    f.write_all(
        format!("# Written by `keyward setup`. Holds an API key: keep it private.\n{text}")
            .as_bytes(),
    )
    .and_then(|_| f.sync_all())
    .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// A secret shortened for display: its first 12 characters (the key's non-secret `start`) and
/// an ellipsis.
pub fn mask(secret: &str) -> String {
    let start: String = secret.chars().take(12).collect();
    format!("{start}…")
}
