//! The scope algebra (API.md §2): parsing scopes, implication between scope sets, and agents'
//! per-provider scope allowlists.
//!
//! A scope is `*`, or `:`-joined segments of `[a-z0-9_.-]+` whose last segment may be `*`. A set
//! implies a scope when it holds `*`, the scope itself, or a wildcard `x:*` whose prefix `x:` starts
//! the scope. Every "may this key do that" and "is this narrower than that" question in Keyward
//! reduces to `implies` and `is_subset`, which is why they are property-tested below.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize, Serializer};

/// The longest scope accepted, in bytes (all valid scopes are ASCII, so also in characters).
pub const MAX_SCOPE_LEN: usize = 256;
/// The most providers an agent's allowlist may name.
pub const MAX_PROVIDERS: usize = 64;
/// The most scopes an agent's allowlist may list for one provider.
pub const MAX_SCOPES_PER_PROVIDER: usize = 256;
/// How much of an offending value an error message quotes, so that a huge value cannot bloat
/// error responses and logs.
const MAX_QUOTED_LEN: usize = 64;

/// Why a scope, a scope list or a provider allowlist was rejected. Each message names the offending
/// value so the caller can find it in their request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    /// A scope string does not follow the grammar.
    #[error("invalid scope `{value}`: {reason}")]
    Invalid { value: String, reason: &'static str },
    /// A provider name in an allowlist is not a single segment.
    #[error("invalid provider `{provider}`: {reason}")]
    InvalidProvider {
        provider: String,
        reason: &'static str,
    },
    /// An allowlist names too many providers.
    #[error("too many providers: {count} (at most {max})")]
    TooManyProviders { count: usize, max: usize },
    /// An allowlist lists too many scopes for one provider.
    #[error("too many scopes for provider `{provider}`: {count} (at most {max})")]
    TooManyScopes {
        provider: String,
        count: usize,
        max: usize,
    },
}

/// Quotes at most `MAX_QUOTED_LEN` characters of a value for an error message.
fn quote(value: &str) -> String {
    if value.chars().count() <= MAX_QUOTED_LEN {
        value.to_owned()
    } else {
        let mut q: String = value.chars().take(MAX_QUOTED_LEN).collect();
        q.push('…');
        q
    }
}

/// Whether `s` is one non-wildcard segment: `[a-z0-9_.-]+`.
fn is_segment(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-'))
}

/// A validated scope such as `keys:derive`, `slack:*` or `*`. The text is shared (`Arc<str>`):
/// cloning a scope never copies it, and the server's key cache keeps one copy of each scope
/// text for all the keys that hold it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct Scope(std::sync::Arc<str>);

impl Scope {
    /// Validates a scope string.
    pub fn parse(s: &str) -> Result<Scope, ScopeError> {
        let invalid = |reason| ScopeError::Invalid {
            value: quote(s),
            reason,
        };
        if s.is_empty() {
            return Err(invalid("a scope must not be empty"));
        }
        if s.len() > MAX_SCOPE_LEN {
            return Err(invalid("a scope is at most 256 characters"));
        }
        if s == "*" {
            return Ok(Scope(s.into()));
        }
        let segments: Vec<&str> = s.split(':').collect();
        let last = segments.len() - 1;
        for (i, seg) in segments.iter().enumerate() {
            if *seg == "*" {
                if i != last {
                    return Err(invalid("only the last segment may be `*`"));
                }
            } else if !is_segment(seg) {
                return Err(invalid("segments must match [a-z0-9_.-]+"));
            }
        }
        Ok(Scope(s.into()))
    }

    /// The scope `*`, which implies every scope (root keys default to it).
    pub fn all() -> Scope {
        Scope("*".into())
    }

    /// The scope text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this scope is `*` or ends in `:*`.
    pub fn is_wildcard(&self) -> bool {
        self.0.ends_with('*')
    }

    /// Whether this single scope, on its own, implies `other`.
    fn implies_one(&self, other: &Scope) -> bool {
        if &*self.0 == "*" || self.0 == other.0 {
            return true;
        }
        // `x:*` covers exactly the scopes that start with `x:`, which includes the narrower
        // wildcards `x:y:*` but neither `x` itself nor anything outside `x:`.
        match self.0.strip_suffix('*') {
            Some(prefix) => other.0.starts_with(prefix),
            None => false,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Scope {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl FromStr for Scope {
    type Err = ScopeError;

    fn from_str(s: &str) -> Result<Scope, ScopeError> {
        Scope::parse(s)
    }
}

impl TryFrom<String> for Scope {
    type Error = ScopeError;

    fn try_from(s: String) -> Result<Scope, ScopeError> {
        Scope::parse(&s)
    }
}

impl From<Scope> for String {
    fn from(s: Scope) -> String {
        s.0.to_string()
    }
}

impl Serialize for Scope {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

/// A key's scope list: shared and immutable (`Arc<[Scope]>`), read as a `[Scope]`. Keys that
/// hold the same list can hold one copy of it (the server's key cache does): with many keys
/// verified in turn, a list of its own was a cache miss of its own on every verification.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Scopes(std::sync::Arc<[Scope]>);

impl std::ops::Deref for Scopes {
    type Target = [Scope];
    fn deref(&self) -> &[Scope] {
        &self.0
    }
}

impl From<Vec<Scope>> for Scopes {
    fn from(v: Vec<Scope>) -> Scopes {
        Scopes(v.into())
    }
}

impl FromIterator<Scope> for Scopes {
    fn from_iter<I: IntoIterator<Item = Scope>>(iter: I) -> Scopes {
        Scopes(iter.into_iter().collect())
    }
}

/// Whether the scope set `set` implies the scope `s`: `set` holds `*`, `s` itself, or a wildcard
/// `x:*` such that `s` starts with `x:`. A wildcard is therefore implied only by an equal or wider
/// wildcard.
pub fn implies(set: &[Scope], s: &Scope) -> bool {
    set.iter().any(|p| p.implies_one(s))
}

/// Whether `a ⊆ b` in the scope sense: every member of `a` is implied by `b`.
pub fn is_subset(a: &[Scope], b: &[Scope]) -> bool {
    a.iter().all(|s| implies(b, s))
}

/// Parses a list of scope strings into a sorted, de-duplicated list, failing on the first invalid
/// one.
pub fn parse_list(items: &[String]) -> Result<Vec<Scope>, ScopeError> {
    let set = items
        .iter()
        .map(|s| Scope::parse(s))
        .collect::<Result<BTreeSet<Scope>, ScopeError>>()?;
    Ok(set.into_iter().collect())
}

/// An agent's per-provider scope allowlist, e.g. `{"slack": ["channels:read", "chat:write"]}`.
pub type ProviderScopes = BTreeMap<String, Vec<String>>;

/// Validates an agent's allowlist: each provider is one segment, each `provider:scope` is a valid
/// scope, and the counts stay within `MAX_PROVIDERS` and `MAX_SCOPES_PER_PROVIDER`.
pub fn validate_provider_scopes(p: &ProviderScopes) -> Result<(), ScopeError> {
    if p.len() > MAX_PROVIDERS {
        return Err(ScopeError::TooManyProviders {
            count: p.len(),
            max: MAX_PROVIDERS,
        });
    }
    for (provider, scopes) in p {
        if !is_segment(provider) {
            return Err(ScopeError::InvalidProvider {
                provider: quote(provider),
                reason: "a provider must be one segment matching [a-z0-9_.-]+",
            });
        }
        if scopes.len() > MAX_SCOPES_PER_PROVIDER {
            return Err(ScopeError::TooManyScopes {
                provider: provider.clone(),
                count: scopes.len(),
                max: MAX_SCOPES_PER_PROVIDER,
            });
        }
        for s in scopes {
            Scope::parse(&format!("{provider}:{s}"))?;
        }
    }
    Ok(())
}

/// The flat form of an allowlist: `provider:scope` for each listed scope, sorted and
/// de-duplicated.
///
/// Entries that do not form a valid scope are skipped rather than reported; callers validate with
/// `validate_provider_scopes` first, and skipping can only make the result narrower, never wider.
pub fn flatten(p: &ProviderScopes) -> Vec<Scope> {
    let set: BTreeSet<Scope> = p
        .iter()
        .filter(|(provider, _)| is_segment(provider))
        .flat_map(|(provider, scopes)| {
            scopes
                .iter()
                .filter_map(move |s| Scope::parse(&format!("{provider}:{s}")).ok())
        })
        .collect();
    set.into_iter().collect()
}

/// Whether replacing the allowlist `old` by `new` drops nothing: every provider of `old` is still
/// in `new`, and every scope `old` lists is still implied by the flat form of `new`.
///
/// An entry of `old` that is not a valid scope counts as dropped, so a corrupt old value is never
/// mistaken for a harmless widening.
pub fn is_broadening(old: &ProviderScopes, new: &ProviderScopes) -> bool {
    let new_flat = flatten(new);
    old.iter().all(|(provider, scopes)| {
        new.contains_key(provider)
            && scopes.iter().all(|s| {
                Scope::parse(&format!("{provider}:{s}"))
                    .map(|scope| implies(&new_flat, &scope))
                    .unwrap_or(false)
            })
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sc(s: &str) -> Scope {
        Scope::parse(s).unwrap()
    }

    fn set(items: &[&str]) -> Vec<Scope> {
        items.iter().map(|s| sc(s)).collect()
    }

    fn providers(items: &[(&str, &[&str])]) -> ProviderScopes {
        items
            .iter()
            .map(|(p, s)| (p.to_string(), s.iter().map(|x| x.to_string()).collect()))
            .collect()
    }

    #[test]
    fn valid_scopes_parse() {
        for s in [
            "*",
            "read",
            "keys:derive",
            "slack:chat:write",
            "slack:*",
            "a.b-c_d:0",
            "x:y:z:*",
        ] {
            assert_eq!(Scope::parse(s).unwrap().as_str(), s);
        }
        assert!(Scope::parse(&"a".repeat(256)).is_ok());
    }

    #[test]
    fn invalid_scopes_are_rejected() {
        for s in [
            "",
            "Slack",
            "slack:",
            ":slack",
            "slack::x",
            "*:x",
            "slack:*:x",
            "slack*",
            "sl ack",
            "slack:**",
            "**",
            "é",
            "a\n",
        ] {
            assert!(Scope::parse(s).is_err(), "{s:?} should be invalid");
        }
        assert!(Scope::parse(&"a".repeat(257)).is_err());
    }

    #[test]
    fn errors_name_the_offending_value() {
        assert_eq!(
            Scope::parse("Slack").unwrap_err().to_string(),
            "invalid scope `Slack`: segments must match [a-z0-9_.-]+"
        );
        assert_eq!(
            Scope::parse("a:*:b").unwrap_err().to_string(),
            "invalid scope `a:*:b`: only the last segment may be `*`"
        );
        let long = Scope::parse(&"A".repeat(10_000)).unwrap_err().to_string();
        assert!(long.len() < 200, "long values are quoted only in part");
    }

    #[test]
    fn examples_from_the_contract_hold() {
        let slack = set(&["slack:*"]);
        assert!(implies(&slack, &sc("slack:chat:write")));
        assert!(implies(&slack, &sc("slack:files:*")));
        assert!(implies(&slack, &sc("slack:*")));
        assert!(!implies(&set(&["slack:files:*"]), &sc("slack:*")));
        assert!(!implies(&slack, &sc("slack")));
        assert!(!implies(&slack, &sc("slackware:x")));
        assert!(!implies(&slack, &sc("*")));
        assert!(implies(&set(&["*"]), &sc("anything:at:all")));
        assert!(implies(&set(&["*"]), &sc("*")));
        assert!(!implies(&set(&["slack:chat:write"]), &sc("slack:chat:*")));
        assert!(!implies(&[], &sc("read")));
    }

    #[test]
    fn subset_requires_every_member_to_be_implied() {
        let parent = set(&["slack:*", "keys:read"]);
        assert!(is_subset(&set(&["slack:chat:write", "keys:read"]), &parent));
        assert!(!is_subset(
            &set(&["slack:chat:write", "keys:write"]),
            &parent
        ));
        assert!(is_subset(&[], &parent));
        assert!(is_subset(&[], &[]));
        assert!(!is_subset(&set(&["read"]), &[]));
    }

    #[test]
    fn parse_list_sorts_and_dedups() {
        let items: Vec<String> = ["b", "a", "b", "*"].iter().map(|s| s.to_string()).collect();
        let parsed = parse_list(&items).unwrap();
        assert_eq!(parsed, set(&["*", "a", "b"]));
        let bad: Vec<String> = vec!["a".into(), "B".into()];
        assert!(parse_list(&bad).unwrap_err().to_string().contains("`B`"));
    }

    #[test]
    fn scopes_serialize_as_plain_strings_and_deserialize_with_validation() {
        let s = sc("slack:*");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"slack:*\"");
        let back: Scope = serde_json::from_str("\"slack:*\"").unwrap();
        assert_eq!(back, s);
        assert!(serde_json::from_str::<Scope>("\"Slack\"").is_err());
        let list: Vec<Scope> = serde_json::from_str("[\"a\",\"b:*\"]").unwrap();
        assert_eq!(list, set(&["a", "b:*"]));
    }

    #[test]
    fn provider_allowlists_flatten_and_validate() {
        let p = providers(&[
            ("slack", &["channels:read", "chat:write"]),
            ("github", &["*"]),
        ]);
        validate_provider_scopes(&p).unwrap();
        assert_eq!(
            flatten(&p),
            set(&["github:*", "slack:channels:read", "slack:chat:write"])
        );
        assert!(flatten(&ProviderScopes::new()).is_empty());
    }

    #[test]
    fn invalid_provider_allowlists_are_rejected() {
        let bad_provider = providers(&[("Slack", &["x"])]);
        assert!(validate_provider_scopes(&bad_provider)
            .unwrap_err()
            .to_string()
            .contains("`Slack`"));
        assert!(validate_provider_scopes(&providers(&[("a:b", &["x"])])).is_err());
        assert!(validate_provider_scopes(&providers(&[("*", &["x"])])).is_err());
        assert!(validate_provider_scopes(&providers(&[("", &["x"])])).is_err());
        let bad_scope = providers(&[("slack", &["Chat"])]);
        assert_eq!(
            validate_provider_scopes(&bad_scope)
                .unwrap_err()
                .to_string(),
            "invalid scope `slack:Chat`: segments must match [a-z0-9_.-]+"
        );
        assert!(validate_provider_scopes(&providers(&[("slack", &[""])])).is_err());
        assert!(validate_provider_scopes(&providers(&[("slack", &["*:x"])])).is_err());
    }

    #[test]
    fn provider_allowlist_sizes_are_capped() {
        let many: ProviderScopes = (0..=MAX_PROVIDERS)
            .map(|i| (format!("p{i}"), vec!["x".to_owned()]))
            .collect();
        assert!(matches!(
            validate_provider_scopes(&many),
            Err(ScopeError::TooManyProviders { count: 65, .. })
        ));
        let enough: ProviderScopes = many.into_iter().take(MAX_PROVIDERS).collect();
        assert!(validate_provider_scopes(&enough).is_ok());
        let scopes: Vec<String> = (0..=MAX_SCOPES_PER_PROVIDER)
            .map(|i| format!("s{i}"))
            .collect();
        let mut p = ProviderScopes::new();
        p.insert("slack".into(), scopes.clone());
        assert!(matches!(
            validate_provider_scopes(&p),
            Err(ScopeError::TooManyScopes { .. })
        ));
        p.insert("slack".into(), scopes[..MAX_SCOPES_PER_PROVIDER].to_vec());
        assert!(validate_provider_scopes(&p).is_ok());
    }

    #[test]
    fn broadening_keeps_everything_the_old_allowlist_had() {
        let old = providers(&[("slack", &["chat:write", "files:read"])]);
        assert!(is_broadening(&old, &old));
        assert!(is_broadening(
            &old,
            &providers(&[("slack", &["chat:write", "files:read", "x"])])
        ));
        assert!(is_broadening(&old, &providers(&[("slack", &["*"])])));
        assert!(is_broadening(
            &old,
            &providers(&[("slack", &["chat:write", "files:*"]), ("github", &["*"])])
        ));
        assert!(!is_broadening(
            &old,
            &providers(&[("slack", &["chat:write"])])
        ));
        assert!(!is_broadening(&old, &providers(&[("github", &["*"])])));
        assert!(!is_broadening(
            &providers(&[("slack", &[])]),
            &ProviderScopes::new()
        ));
        assert!(is_broadening(&ProviderScopes::new(), &old));
        assert!(!is_broadening(&providers(&[("slack", &["Bad"])]), &old));
        // A wildcard is kept only by an equal or wider wildcard, not by a specialisation.
        assert!(!is_broadening(
            &providers(&[("slack", &["files:*"])]),
            &providers(&[("slack", &["files:read"])])
        ));
    }

    /// Valid scopes over a tiny alphabet so that equal and overlapping scopes come up often.
    fn scope_strategy() -> impl Strategy<Value = Scope> {
        let plain = prop::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 1..=3);
        prop_oneof![
            1 => Just(Scope::all()),
            6 => (plain, any::<bool>()).prop_map(|(segs, wild)| {
                let mut s = segs.join(":");
                if wild {
                    s.push_str(":*");
                }
                Scope::parse(&s).unwrap()
            }),
        ]
    }

    fn set_strategy() -> impl Strategy<Value = Vec<Scope>> {
        prop::collection::vec(scope_strategy(), 0..5)
    }

    /// A set derived from `parent`: a sub-selection of its members plus specialisations `x:y` and
    /// `x:y:*` of its wildcards `x:*` (and of `*`).
    fn derive(parent: &[Scope], picks: &[(usize, bool, u8)]) -> Vec<Scope> {
        let mut out = Vec::new();
        if parent.is_empty() {
            return out;
        }
        for &(i, specialise, seg) in picks {
            let p = &parent[i % parent.len()];
            if specialise && p.is_wildcard() {
                let prefix = p.as_str().trim_end_matches('*');
                let seg = ["a", "b", "c"][usize::from(seg % 3)];
                let s = if seg == "c" {
                    format!("{prefix}{seg}:*")
                } else {
                    format!("{prefix}{seg}")
                };
                out.push(Scope::parse(&s).unwrap());
            } else {
                out.push(p.clone());
            }
        }
        out
    }

    fn picks_strategy() -> impl Strategy<Value = Vec<(usize, bool, u8)>> {
        prop::collection::vec((any::<usize>(), any::<bool>(), any::<u8>()), 0..6)
    }

    proptest! {
        #[test]
        fn implication_is_reflexive(s in scope_strategy()) {
            prop_assert!(implies(std::slice::from_ref(&s), &s));
        }

        #[test]
        fn every_set_is_a_subset_of_itself(a in set_strategy()) {
            prop_assert!(is_subset(&a, &a));
        }

        #[test]
        fn subset_is_transitive_for_random_sets(a in set_strategy(), b in set_strategy(), c in set_strategy()) {
            if is_subset(&a, &b) && is_subset(&b, &c) {
                prop_assert!(is_subset(&a, &c));
            }
        }

        #[test]
        fn subset_is_transitive_along_derivation_chains(
            c in set_strategy(), p1 in picks_strategy(), p2 in picks_strategy(),
        ) {
            let b = derive(&c, &p1);
            let a = derive(&b, &p2);
            prop_assert!(is_subset(&b, &c));
            prop_assert!(is_subset(&a, &b));
            prop_assert!(is_subset(&a, &c));
        }

        #[test]
        fn a_derived_set_is_implied_by_its_parent(parent in set_strategy(), picks in picks_strategy()) {
            let child = derive(&parent, &picks);
            prop_assert!(is_subset(&child, &parent));
        }

        #[test]
        fn a_wildcard_is_implied_only_by_an_equal_or_wider_wildcard(set in set_strategy(), w in scope_strategy()) {
            prop_assume!(w.is_wildcard());
            let expected = set.iter().any(|m| {
                m.as_str() == "*"
                    || m == &w
                    || (m.is_wildcard() && w.as_str().starts_with(m.as_str().trim_end_matches('*')))
            });
            prop_assert_eq!(implies(&set, &w), expected);
            // In particular plain (non-wildcard) scopes never imply a wildcard.
            let plain: Vec<Scope> = set.iter().filter(|m| !m.is_wildcard()).cloned().collect();
            prop_assert!(!implies(&plain, &w));
        }

        #[test]
        fn implying_a_wildcard_implies_everything_under_it(set in set_strategy(), w in scope_strategy(), seg in "[abc]") {
            prop_assume!(w.is_wildcard() && w.as_str() != "*");
            if implies(&set, &w) {
                let prefix = w.as_str().trim_end_matches('*');
                let plain = sc(&format!("{prefix}{seg}"));
                let wider = sc(&format!("{prefix}{seg}:*"));
                prop_assert!(implies(&set, &plain));
                prop_assert!(implies(&set, &wider));
            }
        }

        #[test]
        fn parse_never_panics_and_round_trips(s in any::<String>()) {
            if let Ok(scope) = Scope::parse(&s) {
                prop_assert_eq!(scope.as_str(), s.as_str());
                prop_assert_eq!(scope.to_string(), s);
            }
        }

        #[test]
        fn generated_scopes_round_trip_through_json(s in scope_strategy()) {
            let json = serde_json::to_string(&s).unwrap();
            let back: Scope = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(back, s);
        }
    }
}
