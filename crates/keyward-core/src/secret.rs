//! Plaintext secrets that never print, and constant-time comparison of secret bytes.
//!
//! A `Secret` wraps an API key or signing secret between the moment it is generated and the moment
//! it is handed to the caller once. Its `Debug` and `Display` output is always `[REDACTED]`, and it
//! deliberately does not implement `Serialize`, so a secret cannot leak into logs or JSON by
//! accident; code that really means to reveal it has to call `expose()`.

use std::fmt;

use subtle::ConstantTimeEq;

/// The text printed in place of a secret by `Debug` and `Display`.
const REDACTED: &str = "[REDACTED]";

/// A plaintext secret (an API key, a signing secret) that redacts itself when formatted.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// Wraps a plaintext secret.
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    /// Returns the plaintext. Every call site is a place where the secret deliberately leaves the
    /// wrapper, which makes such places easy to audit with a search.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl PartialEq for Secret {
    /// Compares in constant time so that comparing a guess against a secret does not reveal, through
    /// timing, how many leading bytes of the guess were right.
    fn eq(&self, other: &Secret) -> bool {
        ct_eq(self.0.as_bytes(), other.0.as_bytes())
    }
}

impl Eq for Secret {}

/// Compares two byte strings in time that depends only on their lengths, never on their contents.
///
/// Slices of different lengths are unequal; the lengths of secrets of one kind are public anyway
/// (they are fixed by the token format), so returning early on a length mismatch leaks nothing.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_plaintext() {
        let s = Secret::new("kw_ak_supersecret".to_owned());
        assert_eq!(format!("{s:?}"), "[REDACTED]");
        assert_eq!(format!("{s}"), "[REDACTED]");
        assert_eq!(format!("{:?}", Some(s.clone())), "Some([REDACTED])");
    }

    #[test]
    fn expose_returns_the_plaintext() {
        let s = Secret::new("abc".to_owned());
        assert_eq!(s.expose(), "abc");
        assert_eq!(s.clone().expose(), "abc");
    }

    #[test]
    fn equal_secrets_compare_equal_and_different_ones_do_not() {
        assert_eq!(Secret::new("abc".into()), Secret::new("abc".into()));
        assert_ne!(Secret::new("abc".into()), Secret::new("abd".into()));
        assert_ne!(Secret::new("abc".into()), Secret::new("abcd".into()));
        assert_ne!(Secret::new("".into()), Secret::new("a".into()));
    }

    #[test]
    fn ct_eq_handles_lengths_and_contents() {
        assert!(ct_eq(b"", b""));
        assert!(ct_eq(b"hello", b"hello"));
        assert!(!ct_eq(b"hello", b"hellO"));
        assert!(!ct_eq(b"hello", b"hello!"));
        assert!(!ct_eq(b"", b"x"));
    }
}
