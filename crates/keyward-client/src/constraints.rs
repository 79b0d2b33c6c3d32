//! Per-request attenuation (API.md §6.4): a client made with `with_constraints` sends
//! `Keyward-Constraints` on every request, so the server narrows the key's scopes or adds a deny
//! rule for each of them. Constraints can only narrow; the server refuses anything wider.

use base64::Engine;
use serde::Serialize;

use crate::Error;

/// What to narrow: scopes (a subset of the key's), a deny rule, or both.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Constraints {
    /// Scopes for the request, implied by the key's; they replace the key's scopes for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    /// A rule as in API.md §6.4: `{"rule_type": "json_match", "rule_body": {"when": {...},
    /// "effect": "deny"}}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<serde_json::Value>,
}

impl Constraints {
    /// The header value: base64url (no padding) of the JSON.
    pub(crate) fn header(&self) -> Result<String, Error> {
        if self.scopes.is_none() && self.rule.is_none() {
            return Err(Error::Config(
                "constraints need scopes, a rule or both".into(),
            ));
        }
        let json = serde_json::to_vec(self).map_err(|e| Error::Config(e.to_string()))?;
        Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json))
    }
}
