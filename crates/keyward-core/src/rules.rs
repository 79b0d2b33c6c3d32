//! Deny rules and per-request constraints (API.md §6.4): matching a rule against the facts of a
//! request, and parsing the `Keyward-Constraints` header. Rules can only deny; a constraint's
//! scopes can only narrow.

use std::net::IpAddr;

use base64::Engine;
use serde::Deserialize;

use crate::model::{OneOrMany, Rule};
use crate::scope::{self, Scope};
use crate::validate::ValidationError;

/// What is known about a request, for rule matching. Absent facts are `None`.
#[derive(Debug, Clone, Default)]
pub struct RequestFacts {
    pub method: Option<String>,
    pub provider_id: Option<String>,
    pub app_id: Option<String>,
    pub agent_id: Option<String>,
    pub api_key_id: Option<String>,
    pub environment: Option<String>,
    pub client_ip: Option<IpAddr>,
    pub resource_kind: Option<String>,
}

fn values(v: &OneOrMany) -> Vec<&str> {
    match v {
        OneOrMany::One(s) => vec![s.as_str()],
        OneOrMany::Many(list) => list.iter().map(String::as_str).collect(),
    }
}

fn ip_matches(pattern: &str, ip: IpAddr) -> bool {
    crate::cidr::parse_allowlist(&[pattern.to_string()])
        .map(|nets| !nets.is_empty() && crate::cidr::allows(&nets, ip))
        .unwrap_or(false)
}

/// Whether every attribute the rule names matches the request. An attribute the request does not
/// carry matches for `method` only (so a method-less rule check cannot slip past a method rule),
/// and does not match for the rest.
pub fn matches(rule: &Rule, facts: &RequestFacts) -> bool {
    rule.rule_body.when.iter().all(|(attr, v)| {
        let vals = values(v);
        match attr.as_str() {
            "method" => match &facts.method {
                None => true,
                Some(m) => vals.iter().any(|x| x.eq_ignore_ascii_case(m)),
            },
            "client_ip" => match facts.client_ip {
                None => false,
                Some(ip) => vals.iter().any(|p| ip_matches(p, ip)),
            },
            other => {
                let fact = match other {
                    "provider_id" => &facts.provider_id,
                    "app_id" => &facts.app_id,
                    "agent_id" => &facts.agent_id,
                    "api_key_id" => &facts.api_key_id,
                    "environment" => &facts.environment,
                    "resource_kind" => &facts.resource_kind,
                    _ => return false,
                };
                match fact {
                    None => false,
                    Some(f) => vals.iter().any(|x| x == f),
                }
            }
        }
    })
}

/// The first rule of `rules` that denies the request, if any.
pub fn first_denial<'a>(rules: &'a [Rule], facts: &RequestFacts) -> Option<&'a Rule> {
    rules.iter().find(|r| matches(r, facts))
}

/// A parsed `Keyward-Constraints` header.
#[derive(Debug, Clone, PartialEq)]
pub struct Constraints {
    pub scopes: Option<Vec<Scope>>,
    pub rule: Option<Rule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConstraints {
    scopes: Option<Vec<String>>,
    rule: Option<Rule>,
}

/// Why a constraints value was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum ConstraintError {
    /// Not base64url JSON of the right shape: a validation error.
    Invalid(ValidationError),
    /// Scopes not within the key's: `CONSTRAINT_NOT_NARROWING`.
    NotNarrowing,
}

/// Parses a constraints object (already decoded JSON) against the key's scopes.
pub fn parse_constraints_json(
    json: &serde_json::Value,
    key_scopes: &[Scope],
) -> Result<Constraints, ConstraintError> {
    let invalid =
        |m: String| ConstraintError::Invalid(ValidationError::new("Keyward-Constraints", m));
    let raw: RawConstraints = serde_json::from_value(json.clone())
        .map_err(|e| invalid(format!("invalid constraints: {e}")))?;
    if raw.scopes.is_none() && raw.rule.is_none() {
        return Err(invalid(
            "constraints need `scopes`, `rule` or both".to_string(),
        ));
    }
    let scopes = match raw.scopes {
        None => None,
        Some(list) => {
            let parsed = scope::parse_list(&list).map_err(|e| invalid(e.to_string()))?;
            if !scope::is_subset(&parsed, key_scopes) {
                return Err(ConstraintError::NotNarrowing);
            }
            Some(parsed)
        }
    };
    if let Some(r) = &raw.rule {
        r.validate("Keyward-Constraints.rule")
            .map_err(ConstraintError::Invalid)?;
    }
    Ok(Constraints {
        scopes,
        rule: raw.rule,
    })
}

/// Parses the header value: base64url (padding optional) of the constraints JSON.
pub fn parse_constraints_header(
    value: &str,
    key_scopes: &[Scope],
) -> Result<Constraints, ConstraintError> {
    let invalid =
        |m: &str| ConstraintError::Invalid(ValidationError::new("Keyward-Constraints", m));
    if value.len() > 16 * 1024 {
        return Err(invalid("the header is larger than 16 KiB"));
    }
    let trimmed = value.trim().trim_end_matches('=');
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(trimmed)
        .map_err(|_| invalid("must be base64url-encoded JSON"))?;
    let json: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| invalid("must be base64url-encoded JSON"))?;
    parse_constraints_json(&json, key_scopes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn rule(when: serde_json::Value) -> Rule {
        serde_json::from_value(
            json!({"rule_type": "json_match", "rule_body": {"when": when, "effect": "deny"}}),
        )
        .unwrap()
    }

    #[test]
    fn all_listed_attributes_must_match() {
        let r = rule(json!({"method": "DELETE", "provider_id": "github"}));
        let mut f = RequestFacts {
            method: Some("DELETE".into()),
            provider_id: Some("github".into()),
            ..Default::default()
        };
        assert!(matches(&r, &f));
        f.provider_id = Some("slack".into());
        assert!(!matches(&r, &f));
    }

    #[test]
    fn a_list_matches_any_member_and_method_is_case_insensitive() {
        let r = rule(json!({"method": ["put", "DELETE"]}));
        let f = RequestFacts {
            method: Some("PUT".into()),
            ..Default::default()
        };
        assert!(matches(&r, &f));
    }

    #[test]
    fn a_missing_method_matches_but_other_missing_attributes_do_not() {
        assert!(matches(
            &rule(json!({"method": "GET"})),
            &RequestFacts::default()
        ));
        assert!(!matches(
            &rule(json!({"provider_id": "x"})),
            &RequestFacts::default()
        ));
        assert!(!matches(
            &rule(json!({"client_ip": "10.0.0.0/8"})),
            &RequestFacts::default()
        ));
    }

    #[test]
    fn client_ip_matches_addresses_and_cidrs() {
        let f = RequestFacts {
            client_ip: Some("10.1.2.3".parse().unwrap()),
            ..Default::default()
        };
        assert!(matches(&rule(json!({"client_ip": "10.0.0.0/8"})), &f));
        assert!(matches(&rule(json!({"client_ip": "10.1.2.3"})), &f));
        assert!(!matches(&rule(json!({"client_ip": "192.168.0.0/16"})), &f));
    }

    #[test]
    fn constraints_scopes_must_narrow() {
        let key = scope::parse_list(&["slack:*".to_string()]).unwrap();
        let ok = parse_constraints_json(&json!({"scopes": ["slack:chat:write"]}), &key).unwrap();
        assert_eq!(ok.scopes.unwrap().len(), 1);
        assert_eq!(
            parse_constraints_json(&json!({"scopes": ["github:repo"]}), &key),
            Err(ConstraintError::NotNarrowing)
        );
        assert!(matches!(
            parse_constraints_json(&json!({}), &key),
            Err(ConstraintError::Invalid(_))
        ));
    }

    #[test]
    fn the_header_is_base64url_with_optional_padding() {
        let key = scope::parse_list(&["*".to_string()]).unwrap();
        let json = br#"{"scopes":["read"]}"#;
        let unpadded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json);
        let padded = base64::engine::general_purpose::URL_SAFE.encode(json);
        assert!(parse_constraints_header(&unpadded, &key).is_ok());
        assert!(parse_constraints_header(&padded, &key).is_ok());
        assert!(matches!(
            parse_constraints_header("!!!", &key),
            Err(ConstraintError::Invalid(_))
        ));
    }

    proptest! {
        /// Adding an attribute to a rule can only make it match fewer requests.
        #[test]
        fn more_conditions_never_match_more(
            method in proptest::option::of(prop_oneof!["GET", "POST"]),
            provider in proptest::option::of(prop_oneof!["a", "b"]),
            app in proptest::option::of(prop_oneof!["x", "y"]),
        ) {
            let f = RequestFacts { method, provider_id: provider, app_id: app, ..Default::default() };
            let narrow = rule(json!({"provider_id": "a"}));
            let narrower = rule(json!({"provider_id": "a", "app_id": "x"}));
            prop_assert!(!matches(&narrower, &f) || matches(&narrow, &f));
        }
    }
}
