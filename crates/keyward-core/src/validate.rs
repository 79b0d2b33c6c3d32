//! Validation of the small user-supplied values the API accepts (names, request IDs, idempotency
//! keys) and generation of request IDs (API.md §0).
//!
//! The rules are written by hand rather than with regular expressions: they are short, and this
//! keeps the crate free of a regex engine and its worst cases on hostile input.

use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

/// A value that failed validation, with the request field it came from so the API can put the
/// field in the error's `details`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

impl ValidationError {
    /// Builds an error for `field` with a human-readable `message`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> ValidationError {
        ValidationError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The longest agent name, in characters (all of them ASCII).
const MAX_AGENT_NAME_LEN: usize = 63;
/// The longest organisation name, in characters.
const MAX_ORG_NAME_LEN: usize = 128;
/// The longest caller-supplied request ID that is echoed back.
const MAX_REQUEST_ID_LEN: usize = 64;
/// The longest idempotency key.
const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;
/// Crockford's base32 alphabet: digits and upper-case letters without I, L, O and U, which are
/// easily confused with 1, 1, 0 and V (or spell words).
const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// Checks an agent name: `^[a-z0-9][a-z0-9_-]{0,62}$`, so names are safe in URLs, logs and shell
/// commands without quoting.
pub fn agent_name(s: &str) -> Result<(), ValidationError> {
    let err = |m: &str| Err(ValidationError::new("name", m));
    let bytes = s.as_bytes();
    let Some(first) = bytes.first() else {
        return err("agent name must not be empty");
    };
    if bytes.len() > MAX_AGENT_NAME_LEN {
        return err("agent name must be at most 63 characters");
    }
    if !matches!(first, b'a'..=b'z' | b'0'..=b'9') {
        return err("agent name must start with a lowercase letter or a digit");
    }
    if !bytes
        .iter()
        .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'))
    {
        return err("agent name may contain only lowercase letters, digits, `_` and `-`");
    }
    Ok(())
}

/// Checks an organisation name: 1 to 128 characters, no control characters, not only whitespace.
/// Anything else (spaces, punctuation, any script) is allowed, since it is a display name.
pub fn org_name(s: &str) -> Result<(), ValidationError> {
    let err = |m: &str| Err(ValidationError::new("name", m));
    let count = s.chars().count();
    if count == 0 {
        return err("organization name must not be empty");
    }
    if count > MAX_ORG_NAME_LEN {
        return err("organization name must be at most 128 characters");
    }
    if s.chars().any(char::is_control) {
        return err("organization name must not contain control characters");
    }
    if s.chars().all(char::is_whitespace) {
        return err("organization name must not be only whitespace");
    }
    Ok(())
}

/// Whether a caller-supplied `X-Request-Id` may be echoed: `[A-Za-z0-9_-]{1,64}`.
pub fn request_id(s: &str) -> bool {
    (1..=MAX_REQUEST_ID_LEN).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Whether an `Idempotency-Key` is acceptable: 1 to 255 printable ASCII characters (0x20..=0x7e).
pub fn idempotency_key(s: &str) -> bool {
    (1..=MAX_IDEMPOTENCY_KEY_LEN).contains(&s.len())
        && s.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

/// Generates a request ID: `req_` followed by 26 Crockford base32 characters encoding a 48-bit
/// millisecond timestamp and then 80 random bits, like a ULID, so IDs sort roughly by time.
pub fn new_request_id() -> String {
    use crate::clock::Clock;
    let millis = crate::clock::SystemClock.now_ms();
    // Times before 1970 cannot come from a working clock; clamping keeps the encoding well-defined.
    let millis = u64::try_from(millis).unwrap_or(0) & ((1 << 48) - 1);
    let mut id = String::with_capacity(30);
    id.push_str("req_");
    encode_ulid_into(millis, fast_80_bits(), &mut id);
    id
}

/// Encodes 48 bits of time and 80 bits of randomness as 26 Crockford base32 characters, most
/// significant first (the first character carries only the top 3 of 130 bits, which are zero).
fn encode_ulid_into(millis: u64, random: u128, out: &mut String) {
    let value = (u128::from(millis) << 80) | (random & ((1u128 << 80) - 1));
    out.extend(
        (0..26)
            .rev()
            .map(|i| char::from(CROCKFORD[((value >> (i * 5)) & 0x1f) as usize])),
    );
}

#[cfg(test)]
fn encode_ulid(millis: u64, random: u128) -> String {
    let mut s = String::new();
    encode_ulid_into(millis, random, &mut s);
    s
}

thread_local! {
    /// A SplitMix64 state per thread, seeded from the OS generator.
    static SPLITMIX: std::cell::Cell<u64> = std::cell::Cell::new({
        let seed = random_80_bits();
        (seed as u64) ^ ((seed >> 64) as u64).rotate_left(32)
    });
}

/// 80 bits of output from a per-thread SplitMix64 (64 bits of state) seeded by the OS CSPRNG.
/// Request IDs must be unique, not unpredictable, and a `getrandom` call per request cost 0.5 us
/// here (a system call on every request, in a VM). One thread's generator never repeats within
/// 2^64 IDs; two threads' sequences, from independent 64-bit seeds, overlap with probability
/// about n^2 / 2^64 over n IDs.
fn fast_80_bits() -> u128 {
    SPLITMIX.with(|s| {
        let next = || {
            let z = s.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
            s.set(z);
            let z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        (u128::from(next()) << 64) | u128::from(next())
    })
}

/// Counts request IDs generated without OS randomness, so that even then no two are equal.
static FALLBACK_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Draws 80 random bits from the OS CSPRNG (the seed of each thread's request-ID generator).
///
/// Request IDs only need to be unique, not secret, and generating one must not fail a request. So
/// if the OS generator fails, the bits come from a hash of the current time, the process ID and a
/// counter instead of an error.
fn random_80_bits() -> u128 {
    let mut buf = [0u8; 16];
    if getrandom::getrandom(&mut buf[6..]).is_err() {
        let mut h = Sha256::new();
        h.update(
            chrono::Utc::now()
                .timestamp_nanos_opt()
                .unwrap_or(0)
                .to_le_bytes(),
        );
        h.update(std::process::id().to_le_bytes());
        h.update(
            FALLBACK_COUNTER
                .fetch_add(1, Ordering::Relaxed)
                .to_le_bytes(),
        );
        buf[6..].copy_from_slice(&h.finalize()[..10]);
    }
    u128::from_be_bytes(buf)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn good_agent_names_are_accepted() {
        for s in ["a", "0", "support-bot", "agent_7", "a-", &"a".repeat(63)] {
            assert!(agent_name(s).is_ok(), "{s:?}");
        }
    }

    #[test]
    fn bad_agent_names_are_rejected() {
        for s in [
            "",
            "-a",
            "_a",
            "Agent",
            "a b",
            "a.b",
            "é",
            "a\n",
            &"a".repeat(64),
        ] {
            let e = agent_name(s).unwrap_err();
            assert_eq!(e.field, "name", "{s:?}");
        }
    }

    #[test]
    fn agent_name_errors_explain_the_rule() {
        assert_eq!(
            agent_name("Agent").unwrap_err().to_string(),
            "agent name must start with a lowercase letter or a digit"
        );
        assert_eq!(
            agent_name("a.b").unwrap_err().to_string(),
            "agent name may contain only lowercase letters, digits, `_` and `-`"
        );
    }

    #[test]
    fn org_names_allow_any_printable_text() {
        for s in [
            "Acme",
            "Acme, Inc.",
            "  padded  ",
            "株式会社",
            &"é".repeat(128),
        ] {
            assert!(org_name(s).is_ok(), "{s:?}");
        }
    }

    #[test]
    fn bad_org_names_are_rejected() {
        for s in [
            "",
            " ",
            "\u{3000}\t ",
            "a\nb",
            "a\u{7f}",
            "a\0",
            &"a".repeat(129),
        ] {
            assert!(org_name(s).is_err(), "{s:?}");
        }
    }

    #[test]
    fn request_ids_follow_the_contract() {
        assert!(request_id("abc-DEF_123"));
        assert!(request_id(&"a".repeat(64)));
        assert!(!request_id(""));
        assert!(!request_id(&"a".repeat(65)));
        assert!(!request_id("a b"));
        assert!(!request_id("a.b"));
        assert!(!request_id("é"));
    }

    #[test]
    fn idempotency_keys_are_printable_ascii() {
        assert!(idempotency_key("order 42: {\"x\"}~"));
        assert!(idempotency_key(&"k".repeat(255)));
        assert!(!idempotency_key(""));
        assert!(!idempotency_key(&"k".repeat(256)));
        assert!(!idempotency_key("a\tb"));
        assert!(!idempotency_key("a\u{7f}"));
        assert!(!idempotency_key("ключ"));
    }

    #[test]
    fn generated_request_ids_have_the_documented_shape() {
        let id = new_request_id();
        assert!(id.starts_with("req_"));
        assert_eq!(id.len(), 30);
        assert!(id[4..].bytes().all(|b| CROCKFORD.contains(&b)));
        assert!(request_id(&id), "our own IDs are echoable");
    }

    #[test]
    fn generated_request_ids_are_unique() {
        let ids: HashSet<String> = (0..1000).map(|_| new_request_id()).collect();
        assert_eq!(ids.len(), 1000);
    }

    #[test]
    fn ulid_encoding_puts_time_first() {
        assert_eq!(encode_ulid(0, 0), "0".repeat(26));
        assert_eq!(encode_ulid(0, 31), format!("{}Z", "0".repeat(25)));
        // 1 ms is bit 80, i.e. bit 0 of the 16th 5-bit group from the right.
        assert_eq!(
            encode_ulid(1, 0),
            format!("{}1{}", "0".repeat(9), "0".repeat(16))
        );
        assert_eq!(
            encode_ulid((1 << 48) - 1, (1 << 80) - 1),
            format!("7{}", "Z".repeat(25))
        );
        assert!(encode_ulid(1000, u128::MAX) < encode_ulid(1001, 0));
    }

    proptest! {
        #[test]
        fn names_from_the_grammar_are_accepted(s in "[a-z0-9][a-z0-9_-]{0,62}") {
            prop_assert!(agent_name(&s).is_ok());
        }

        #[test]
        fn validators_never_panic(s in any::<String>()) {
            let _ = agent_name(&s);
            let _ = org_name(&s);
            let _ = request_id(&s);
            let _ = idempotency_key(&s);
        }

        #[test]
        fn agent_names_are_always_echoable_request_ids(s in "[a-z0-9][a-z0-9_-]{0,62}") {
            prop_assert!(request_id(&s));
        }
    }
}
