//! Client configuration from arguments or the environment: `KEYWARD_BASE_URL`,
//! `KEYWARD_API_KEY`, `KEYWARD_ORG_ID`, `KEYWARD_AGENT_ID` and `KEYWARD_SIGNING_SECRET`.

use std::time::Duration;

use uuid::Uuid;

use crate::transport::Secret;
use crate::{Error, Result, RetryPolicy};

/// The base URL used when none is configured: `keyward serve`'s default listen address.
pub const DEFAULT_BASE_URL: &str = "http://127.0.0.1:8470";

/// How long one HTTP exchange may take when nothing else is configured.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything a client needs to be built, from arguments ([`ClientConfig::new`] and the `with_`
/// methods) or from the environment ([`ClientConfig::from_env`]). Its `Debug` hides the secrets.
///
/// ```
/// use keyward_client::ClientConfig;
/// let env = [("KEYWARD_API_KEY", "kw_ak_..."), ("KEYWARD_BASE_URL", "http://keyward:8470")];
/// let config = ClientConfig::from_lookup(|name| {
///     env.iter().find(|(n, _)| *n == name).map(|(_, v)| v.to_string())
/// })?;
/// assert_eq!(config.base_url, "http://keyward:8470");
/// assert!(config.org_id.is_none());
/// # Ok::<(), keyward_client::Error>(())
/// ```
#[derive(Clone)]
pub struct ClientConfig {
    /// Where Keyward listens, e.g. `http://127.0.0.1:8470`.
    pub base_url: String,
    api_key: Option<Secret>,
    /// The org an [`crate::App`] acts on (required for it; an agent client does not need it).
    pub org_id: Option<Uuid>,
    /// The agent an [`crate::AgentClient`] speaks for; traces opened inside its own record it as
    /// their parent.
    pub agent_id: Option<String>,
    signing_secret: Option<Secret>,
    /// The retry policy of calls that are safe to repeat.
    pub retry: RetryPolicy,
    /// How long one HTTP exchange may take.
    pub timeout: Duration,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key)
            .field("org_id", &self.org_id)
            .field("agent_id", &self.agent_id)
            .field("signing_secret", &self.signing_secret)
            .field("retry", &self.retry)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl ClientConfig {
    /// A configuration with this base URL and API key, and defaults for the rest.
    pub fn new(base_url: impl Into<String>, api_key: impl Into<String>) -> ClientConfig {
        ClientConfig {
            base_url: base_url.into(),
            api_key: Some(Secret(api_key.into())),
            org_id: None,
            agent_id: None,
            signing_secret: None,
            retry: RetryPolicy::default(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Reads the environment: `KEYWARD_BASE_URL` (default [`DEFAULT_BASE_URL`]),
    /// `KEYWARD_API_KEY`, `KEYWARD_ORG_ID` (a UUID), `KEYWARD_AGENT_ID` and
    /// `KEYWARD_SIGNING_SECRET` (for keys that require signed requests). Empty values count as
    /// unset. A malformed org id is an error; a missing key is reported when a client is built.
    pub fn from_env() -> Result<ClientConfig> {
        ClientConfig::from_lookup(|name| std::env::var(name).ok())
    }

    /// As [`ClientConfig::from_env`], reading variables through `lookup` (for tests, or another
    /// source of settings).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<ClientConfig> {
        let var = |name: &str| {
            lookup(name)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let org_id = match var("KEYWARD_ORG_ID") {
            Some(org) => Some(
                org.parse()
                    .map_err(|_| Error::Config(format!("KEYWARD_ORG_ID `{org}` is not a UUID")))?,
            ),
            None => None,
        };
        Ok(ClientConfig {
            base_url: var("KEYWARD_BASE_URL").unwrap_or_else(|| DEFAULT_BASE_URL.to_string()),
            api_key: var("KEYWARD_API_KEY").map(Secret),
            org_id,
            agent_id: var("KEYWARD_AGENT_ID"),
            signing_secret: var("KEYWARD_SIGNING_SECRET").map(Secret),
            retry: RetryPolicy::default(),
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// Sets the API key.
    pub fn with_api_key(mut self, api_key: impl Into<String>) -> ClientConfig {
        self.api_key = Some(Secret(api_key.into()));
        self
    }

    /// Sets the org id.
    pub fn with_org_id(mut self, org_id: Uuid) -> ClientConfig {
        self.org_id = Some(org_id);
        self
    }

    /// Sets the signing secret (for a key created with `requires_signature`).
    pub fn with_signing_secret(mut self, secret: impl Into<String>) -> ClientConfig {
        self.signing_secret = Some(Secret(secret.into()));
        self
    }

    /// The API key, if one is configured.
    pub fn api_key(&self) -> Option<&str> {
        self.api_key.as_ref().map(|s| s.0.as_str())
    }

    /// The signing secret, if one is configured.
    pub fn signing_secret(&self) -> Option<&str> {
        self.signing_secret.as_ref().map(|s| s.0.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn every_variable_is_read_and_empty_ones_count_as_unset() {
        let c = ClientConfig::from_lookup(lookup(&[
            ("KEYWARD_BASE_URL", "http://kw:1"),
            ("KEYWARD_API_KEY", " kw_ak_x "),
            ("KEYWARD_ORG_ID", "0190f3a4-1111-7000-8000-000000000001"),
            ("KEYWARD_AGENT_ID", "agent-7"),
            ("KEYWARD_SIGNING_SECRET", ""),
        ]))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.base_url, "http://kw:1");
        assert_eq!(c.api_key(), Some("kw_ak_x"));
        assert!(c.org_id.is_some());
        assert_eq!(c.agent_id.as_deref(), Some("agent-7"));
        assert_eq!(c.signing_secret(), None);
        assert!(!format!("{c:?}").contains("kw_ak_x"), "Debug hides the key");
    }

    #[test]
    fn defaults_apply_and_a_bad_org_id_is_an_error() {
        let c = ClientConfig::from_lookup(lookup(&[])).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.base_url, DEFAULT_BASE_URL);
        assert_eq!(c.api_key(), None);
        assert!(matches!(
            ClientConfig::from_lookup(lookup(&[("KEYWARD_ORG_ID", "acme")])),
            Err(Error::Config(_))
        ));
    }
}
