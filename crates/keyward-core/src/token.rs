//! The API token format (API.md §1): generating, parsing and hashing tokens, plus signing secrets
//! and request signatures (API.md §6.5).
//!
//! A token is `<prefix>_<kind>_<body>`: the prefix names the environment (`kw` live, `kwt` test),
//! the kind code names what the token is (`rk`, `ak`, `dk`, `uk`, `st`), and the 36-character base62
//! body is 30 random characters followed by a 6-character base62 CRC-32 of everything before it.
//! The checksum lets the server reject typos and garbage without touching the store, and lets
//! secret scanners recognise real tokens with few false positives.

use std::fmt;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::secret::{ct_eq, Secret};

/// The base62 alphabet: digits, then upper-case letters, then lower-case letters, so that the
/// digit value of each character is its index here.
pub const BASE62_ALPHABET: &[u8; 62] =
    b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// How many random base62 characters a token body carries (30 × log2(62) ≈ 178.6 bits).
const RANDOM_LEN: usize = 30;
/// How many base62 characters encode the CRC-32; 62^6 > 2^32, so six always suffice.
const CHECKSUM_LEN: usize = 6;
/// The body length: the random part followed by the checksum.
const BODY_LEN: usize = RANDOM_LEN + CHECKSUM_LEN;
/// The longest string that could be a token (`kwt_xx_` plus the body is 43), with a little slack.
/// Checking it first bounds the work done on hostile input.
pub const MAX_TOKEN_LEN: usize = 45;
/// How many random base62 characters follow `kwss_` in a signing secret (≈ 256 bits).
const SIGNING_SECRET_RANDOM_LEN: usize = 43;
/// Random bytes at or above this value are rejected, because 248 is the largest multiple of 62
/// that fits in a byte; taking `% 62` of the rest is then exactly uniform.
const REJECTION_BOUND: u8 = 248;

/// Why a token could not be generated or parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The string does not have the shape `<kw|kwt>_<kind>_<36 base62 characters>`.
    #[error("malformed API token")]
    Malformed,
    /// The string has the right shape but its checksum does not match, which usually means a typo
    /// or a truncated copy-paste.
    #[error("API token checksum does not match")]
    BadChecksum,
    /// The operating system's random number generator failed; the text is its error message.
    #[error("the OS random number generator failed: {0}")]
    Rng(String),
}

/// The environment a token belongs to, encoded in its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    /// Production traffic; tokens start with `kw_`.
    Live,
    /// Sandbox traffic; tokens start with `kwt_`.
    Test,
}

impl Environment {
    /// All environments, for exhaustive tests and listings.
    pub const ALL: [Environment; 2] = [Environment::Live, Environment::Test];

    /// The name used in JSON and configuration: `live` or `test`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Environment::Live => "live",
            Environment::Test => "test",
        }
    }

    /// The token prefix of this environment: `kw` or `kwt`.
    pub fn prefix(&self) -> &'static str {
        match self {
            Environment::Live => "kw",
            Environment::Test => "kwt",
        }
    }

    /// Parses `live` or `test` (exactly, case-sensitive).
    pub fn parse(s: &str) -> Option<Environment> {
        match s {
            "live" => Some(Environment::Live),
            "test" => Some(Environment::Test),
            _ => None,
        }
    }

    /// Maps a token prefix (`kw` or `kwt`) back to its environment.
    fn from_prefix(s: &str) -> Option<Environment> {
        match s {
            "kw" => Some(Environment::Live),
            "kwt" => Some(Environment::Test),
            _ => None,
        }
    }
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a token is, encoded as the two-letter code after the prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    /// An org's root (operator) key: `rk`.
    Root,
    /// An agent's key: `ak`.
    Agent,
    /// A key derived from another key: `dk`.
    Derived,
    /// A user API token: `uk`.
    User,
    /// A session token: `st`.
    Session,
}

impl TokenKind {
    /// All kinds, for exhaustive tests and listings.
    pub const ALL: [TokenKind; 5] = [
        TokenKind::Root,
        TokenKind::Agent,
        TokenKind::Derived,
        TokenKind::User,
        TokenKind::Session,
    ];

    /// The two-letter code that appears in the token.
    pub fn code(&self) -> &'static str {
        match self {
            TokenKind::Root => "rk",
            TokenKind::Agent => "ak",
            TokenKind::Derived => "dk",
            TokenKind::User => "uk",
            TokenKind::Session => "st",
        }
    }

    /// The name used in JSON: `root`, `agent`, `derived`, `user` or `session`.
    pub fn as_str(&self) -> &'static str {
        match self {
            TokenKind::Root => "root",
            TokenKind::Agent => "agent",
            TokenKind::Derived => "derived",
            TokenKind::User => "user",
            TokenKind::Session => "session",
        }
    }

    /// Parses one of the JSON names returned by `as_str` (exactly, case-sensitive).
    pub fn parse(s: &str) -> Option<TokenKind> {
        TokenKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Maps a two-letter token code back to its kind.
    fn from_code(s: &str) -> Option<TokenKind> {
        TokenKind::ALL.into_iter().find(|k| k.code() == s)
    }
}

impl fmt::Display for TokenKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a syntactically valid token says about itself. Whether it exists is the store's business.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ParsedToken {
    pub environment: Environment,
    pub kind: TokenKind,
}

/// Encodes `v` in base62, most significant digit first, left-padded with `0` to at least `width`
/// characters (a value needing more digits than `width` is not truncated).
pub fn base62_encode_u32_padded(v: u32, width: usize) -> String {
    // Collect digits least significant first, then reverse; u32 needs at most six base62 digits.
    let mut digits = Vec::with_capacity(width.max(CHECKSUM_LEN));
    let mut rest = v;
    loop {
        digits.push(BASE62_ALPHABET[(rest % 62) as usize]);
        rest /= 62;
        if rest == 0 {
            break;
        }
    }
    while digits.len() < width {
        digits.push(b'0');
    }
    digits.iter().rev().map(|&b| char::from(b)).collect()
}

/// Draws `n` base62 characters from the OS CSPRNG, each uniformly distributed.
///
/// Bytes of 248 or more are thrown away (rejection sampling), because reducing a full byte modulo
/// 62 would make the first eight characters of the alphabet slightly more likely.
pub fn random_base62(n: usize) -> Result<String, TokenError> {
    let mut out = String::with_capacity(n);
    // About 3% of bytes are rejected, so a buffer a little larger than `n` usually suffices in one
    // call; the loop draws again for whatever is still missing.
    let mut buf = vec![0u8; n + n / 8 + 8];
    while out.len() < n {
        getrandom::getrandom(&mut buf).map_err(|e| TokenError::Rng(e.to_string()))?;
        for &b in buf.iter().filter(|&&b| b < REJECTION_BOUND) {
            if out.len() == n {
                break;
            }
            out.push(char::from(BASE62_ALPHABET[usize::from(b % 62)]));
        }
    }
    Ok(out)
}

/// The 6-character base62 CRC-32 (IEEE) of the token text before the checksum.
fn checksum(head: &str) -> String {
    base62_encode_u32_padded(crc32fast::hash(head.as_bytes()), CHECKSUM_LEN)
}

/// Generates a fresh token of the given environment and kind.
pub fn generate(env: Environment, kind: TokenKind) -> Result<Secret, TokenError> {
    let mut token = format!(
        "{}_{}_{}",
        env.prefix(),
        kind.code(),
        random_base62(RANDOM_LEN)?
    );
    let sum = checksum(&token);
    token.push_str(&sum);
    Ok(Secret::new(token))
}

/// Checks a token's shape and checksum and reports its environment and kind.
///
/// It never panics, whatever the input: the length is checked before anything else, and all
/// slicing happens only after the string is known to be ASCII.
pub fn parse(token: &str) -> Result<ParsedToken, TokenError> {
    if token.len() > MAX_TOKEN_LEN || !token.is_ascii() {
        return Err(TokenError::Malformed);
    }
    let mut parts = token.splitn(3, '_');
    let (Some(prefix), Some(code), Some(body)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(TokenError::Malformed);
    };
    let environment = Environment::from_prefix(prefix).ok_or(TokenError::Malformed)?;
    let kind = TokenKind::from_code(code).ok_or(TokenError::Malformed)?;
    if body.len() != BODY_LEN || !body.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(TokenError::Malformed);
    }
    // The string is ASCII, so byte offsets are character boundaries and this split cannot panic.
    let (head, sum) = token.split_at(token.len() - CHECKSUM_LEN);
    // Decoding the six characters and comparing integers avoids formatting a string on every
    // request. The checksum is a CRC of the token's own characters, not a secret, so a plain
    // comparison leaks nothing.
    if base62_decode(sum.as_bytes()) != Some(u64::from(crc32fast::hash(head.as_bytes()))) {
        return Err(TokenError::BadChecksum);
    }
    Ok(ParsedToken { environment, kind })
}

/// The value of a base62 numeral (most significant digit first); `None` for a non-base62 byte.
fn base62_decode(digits: &[u8]) -> Option<u64> {
    digits.iter().try_fold(0u64, |acc, &b| {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'A'..=b'Z' => b - b'A' + 10,
            b'a'..=b'z' => b - b'a' + 36,
            _ => return None,
        };
        acc.checked_mul(62)?.checked_add(u64::from(d))
    })
}

/// The SHA-256 of a whole token: what the store keeps and looks tokens up by. Equality is
/// constant-time (see [`TokenDigest::ct_eq`]), so every compare of digests is, the verify
/// cache's probes included. (Which shard and bucket a probe visits depends on the digest's bytes:
/// the hash of the token the caller presented, which it knows already.)
#[derive(Clone, Copy)]
pub struct TokenDigest(pub [u8; 32]);

// Written out because equality is: equal digests are equal bytes, so hashing the bytes agrees.
impl std::hash::Hash for TokenDigest {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state)
    }
}

impl PartialEq for TokenDigest {
    fn eq(&self, other: &TokenDigest) -> bool {
        self.ct_eq(other)
    }
}

impl Eq for TokenDigest {}

impl TokenDigest {
    /// Hashes the whole token string.
    pub fn of(token: &str) -> TokenDigest {
        TokenDigest(Sha256::digest(token.as_bytes()).into())
    }

    /// The 32 digest bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Compares two digests in constant time, a 64-bit word at a time (four XORs where
    /// [`crate::secret::ct_eq`], written for secrets of any length, compares byte by byte):
    /// this runs on every probe of the verify cache.
    pub fn ct_eq(&self, other: &TokenDigest) -> bool {
        use subtle::ConstantTimeEq;
        let word = |d: &TokenDigest, i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&d.0[i * 8..i * 8 + 8]);
            u64::from_ne_bytes(w)
        };
        let diff = (0..4).fold(0u64, |acc, i| acc | (word(self, i) ^ word(other, i)));
        diff.ct_eq(&0).into()
    }

    /// Rebuilds a digest from stored bytes; `None` unless there are exactly 32.
    pub fn from_slice(bytes: &[u8]) -> Option<TokenDigest> {
        <[u8; 32]>::try_from(bytes).ok().map(TokenDigest)
    }
}

impl fmt::Debug for TokenDigest {
    // A digest is not secret (the token cannot be recovered from it), so printing it as hex is fine
    // and makes logs and test failures readable.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenDigest({})", hex::encode(self.0))
    }
}

/// The non-secret display prefix of a token (its first 12 characters), so people can tell keys
/// apart. It holds at most the prefix, the kind and a few random characters.
pub fn display_start(token: &str) -> String {
    token.chars().take(12).collect()
}

/// Generates a request-signing secret: `kwss_` followed by 43 random base62 characters.
pub fn generate_signing_secret() -> Result<Secret, TokenError> {
    Ok(Secret::new(format!(
        "kwss_{}",
        random_base62(SIGNING_SECRET_RANDOM_LEN)?
    )))
}

/// Computes `X-Signature`: the lowercase hex HMAC-SHA256 under `secret` of
/// `METHOD\nPATH\nTIMESTAMP\nBODY`, where PATH includes the query string as sent.
///
/// The method is upper-cased first, so a client that passes `post` signs the same message the
/// server sees as `POST`.
pub fn sign_request(secret: &str, method: &str, path: &str, timestamp: i64, body: &[u8]) -> String {
    let head = format!("{}\n{}\n{}\n", method.to_ascii_uppercase(), path, timestamp);
    let mut message = Vec::with_capacity(head.len() + body.len());
    message.extend_from_slice(head.as_bytes());
    message.extend_from_slice(body);
    hex::encode(hmac_sha256(secret.as_bytes(), &message))
}

/// Checks a provided `X-Signature` against the expected one in constant time. Upper-case hex is
/// not accepted, since the contract specifies lowercase.
pub fn verify_request_signature(
    secret: &str,
    method: &str,
    path: &str,
    timestamp: i64,
    body: &[u8],
    provided: &str,
) -> bool {
    let expected = sign_request(secret, method, path, timestamp, body);
    ct_eq(expected.as_bytes(), provided.as_bytes())
}

/// HMAC-SHA256 with a key of any length.
///
/// `Hmac::new_from_slice` returns a `Result` even though HMAC accepts every key length, and the
/// workspace forbids `unwrap`. Instead the key is brought to the block size here exactly as RFC 2104
/// prescribes (hashed when longer than a block, then zero-padded), which makes the constructor
/// infallible without changing the result.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut block = [0u8; BLOCK];
    if key.len() > BLOCK {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut mac = <Hmac<Sha256> as hmac::digest::KeyInit>::new(&block.into());
    mac.update(message);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Replaces the character at `i` with a different base62 character.
    fn change_char(token: &str, i: usize) -> String {
        let mut bytes = token.as_bytes().to_vec();
        bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
        String::from_utf8(bytes).unwrap()
    }

    /// Builds a token with a correct checksum around a chosen random part.
    fn token_with(prefix: &str, code: &str, random: &str) -> String {
        let head = format!("{prefix}_{code}_{random}");
        let sum = checksum(&head);
        format!("{head}{sum}")
    }

    #[test]
    fn digests_compare_equal_only_when_every_byte_is_equal() {
        let a = TokenDigest::of("kw_ak_one");
        assert!(a.ct_eq(&a));
        for i in 0..32 {
            let mut b = a;
            b.0[i] ^= 0x01;
            assert!(!a.ct_eq(&b), "byte {i}");
        }
        assert!(!a.ct_eq(&TokenDigest::of("kw_ak_two")));
    }

    #[test]
    fn alphabet_is_digits_then_upper_then_lower() {
        let expected: Vec<u8> = (b'0'..=b'9')
            .chain(b'A'..=b'Z')
            .chain(b'a'..=b'z')
            .collect();
        assert_eq!(BASE62_ALPHABET.to_vec(), expected);
    }

    #[test]
    fn base62_encoding_matches_hand_computed_values() {
        assert_eq!(base62_encode_u32_padded(0, 6), "000000");
        assert_eq!(base62_encode_u32_padded(9, 6), "000009");
        assert_eq!(base62_encode_u32_padded(10, 6), "00000A");
        assert_eq!(base62_encode_u32_padded(36, 6), "00000a");
        assert_eq!(base62_encode_u32_padded(61, 6), "00000z");
        assert_eq!(base62_encode_u32_padded(62, 6), "000010");
        assert_eq!(base62_encode_u32_padded(62 * 62 + 1, 6), "000101");
        // 2^32 - 1 = 4 * 62^5 + 42 * 62^4 + 41 * 62^3 + 15 * 62^2 + 12 * 62 + 3.
        assert_eq!(base62_encode_u32_padded(u32::MAX, 6), "4gfFC3");
        assert_eq!(base62_encode_u32_padded(61, 0), "z");
        assert_eq!(base62_encode_u32_padded(u32::MAX, 2), "4gfFC3");
    }

    #[test]
    fn checksum_is_base62_of_the_crc32_of_the_head() {
        // "123456789" is the standard CRC-32 check input; its IEEE CRC is 0xCBF43926 = 3421780262.
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
        // 3421780262 = 3*62^5 + 45*62^4 + 35*62^3 + 27*62^2 + 22*62 + 14 → "3jZRME".
        assert_eq!(checksum("123456789"), "3jZRME");
        let head = "kw_ak_000000000000000000000000000000";
        let expected = base62_encode_u32_padded(crc32fast::hash(head.as_bytes()), 6);
        assert_eq!(checksum(head), expected);
        let token = format!("{head}{expected}");
        assert_eq!(
            parse(&token).unwrap(),
            ParsedToken {
                environment: Environment::Live,
                kind: TokenKind::Agent
            }
        );
    }

    #[test]
    fn generated_tokens_parse_back_for_every_environment_and_kind() {
        for env in Environment::ALL {
            for kind in TokenKind::ALL {
                let token = generate(env, kind).unwrap();
                let t = token.expose();
                assert!(t.starts_with(&format!("{}_{}_", env.prefix(), kind.code())));
                assert_eq!(t.len(), env.prefix().len() + 4 + BODY_LEN);
                let parsed = parse(t).unwrap();
                assert_eq!(parsed.environment, env);
                assert_eq!(parsed.kind, kind);
            }
        }
    }

    #[test]
    fn two_generated_tokens_differ() {
        let a = generate(Environment::Live, TokenKind::Agent).unwrap();
        let b = generate(Environment::Live, TokenKind::Agent).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn wrong_checksum_is_rejected() {
        let token = generate(Environment::Live, TokenKind::Root).unwrap();
        let t = token.expose();
        // Changing any single character of the random part or the checksum breaks the checksum.
        for i in 6..t.len() {
            assert_eq!(
                parse(&change_char(t, i)),
                Err(TokenError::BadChecksum),
                "position {i}"
            );
        }
    }

    #[test]
    fn wrong_prefix_is_rejected() {
        let random = "a".repeat(RANDOM_LEN);
        for prefix in ["kx", "KW", "kwtt", "k", "", "kws", "kwss"] {
            assert_eq!(
                parse(&token_with(prefix, "ak", &random)),
                Err(TokenError::Malformed),
                "{prefix}"
            );
        }
    }

    #[test]
    fn wrong_kind_is_rejected() {
        let random = "a".repeat(RANDOM_LEN);
        for code in ["xx", "AK", "a", "akk", "", "root"] {
            assert_eq!(
                parse(&token_with("kw", code, &random)),
                Err(TokenError::Malformed),
                "{code}"
            );
        }
    }

    #[test]
    fn wrong_length_is_rejected() {
        for n in [0, 1, 29, 31, 40] {
            let t = token_with("kw", "ak", &"a".repeat(n));
            assert_eq!(parse(&t), Err(TokenError::Malformed), "random length {n}");
        }
        assert_eq!(parse(""), Err(TokenError::Malformed));
        assert_eq!(parse("kw_ak_"), Err(TokenError::Malformed));
        assert_eq!(parse(&"a".repeat(10_000)), Err(TokenError::Malformed));
    }

    #[test]
    fn non_base62_bodies_are_rejected() {
        let t = token_with("kw", "ak", &format!("{}_", "a".repeat(RANDOM_LEN - 1)));
        assert_eq!(parse(&t), Err(TokenError::Malformed));
        let t = token_with("kw", "ak", &format!("{}-", "a".repeat(RANDOM_LEN - 1)));
        assert_eq!(parse(&t), Err(TokenError::Malformed));
        let t = token_with("kw", "ak", &format!("{}é", "a".repeat(RANDOM_LEN - 2)));
        assert_eq!(parse(&t), Err(TokenError::Malformed));
        let good = generate(Environment::Test, TokenKind::Agent).unwrap();
        assert_eq!(
            parse(&format!(" {}", good.expose())),
            Err(TokenError::Malformed)
        );
        assert_eq!(
            parse(&format!("{}\n", good.expose())),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn random_base62_has_the_requested_length_and_alphabet() {
        for n in [0, 1, 30, 43, 1000] {
            let s = random_base62(n).unwrap();
            assert_eq!(s.len(), n);
            assert!(s.bytes().all(|b| BASE62_ALPHABET.contains(&b)));
        }
    }

    #[test]
    fn random_base62_uses_the_whole_alphabet() {
        // With 62,000 draws every character is expected about 1,000 times; missing one entirely
        // would mean the sampling is broken, not unlucky.
        let s = random_base62(62_000).unwrap();
        for &c in BASE62_ALPHABET {
            let count = s.bytes().filter(|&b| b == c).count();
            assert!(
                (700..1300).contains(&count),
                "{} seen {count} times",
                c as char
            );
        }
    }

    #[test]
    fn environment_and_kind_names_round_trip() {
        for env in Environment::ALL {
            assert_eq!(Environment::parse(env.as_str()), Some(env));
            assert_eq!(
                serde_json::to_string(&env).unwrap(),
                format!("\"{}\"", env.as_str())
            );
            let back: Environment = serde_json::from_str(&format!("\"{}\"", env.as_str())).unwrap();
            assert_eq!(back, env);
        }
        for kind in TokenKind::ALL {
            assert_eq!(TokenKind::parse(kind.as_str()), Some(kind));
            assert_eq!(
                serde_json::to_string(&kind).unwrap(),
                format!("\"{}\"", kind.as_str())
            );
            let back: TokenKind = serde_json::from_str(&format!("\"{}\"", kind.as_str())).unwrap();
            assert_eq!(back, kind);
        }
        assert_eq!(Environment::parse("Live"), None);
        assert_eq!(TokenKind::parse("ak"), None);
        assert_eq!(Environment::Test.prefix(), "kwt");
        assert_eq!(TokenKind::Session.code(), "st");
    }

    #[test]
    fn digest_is_the_sha256_of_the_whole_token() {
        let d = TokenDigest::of("abc");
        assert_eq!(
            hex::encode(d.as_bytes()),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(TokenDigest::from_slice(d.as_bytes()), Some(d));
        assert_eq!(TokenDigest::from_slice(&[0u8; 31]), None);
        assert_eq!(TokenDigest::from_slice(&[0u8; 33]), None);
        assert!(format!("{d:?}").contains("ba7816bf"));
    }

    #[test]
    fn display_start_is_the_first_twelve_characters() {
        assert_eq!(
            display_start("kw_ak_abcdefghijklmnopqrstuvwxyz"),
            "kw_ak_abcdef"
        );
        assert_eq!(display_start("short"), "short");
        assert_eq!(display_start("ééééééééééééééé").chars().count(), 12);
    }

    #[test]
    fn signing_secrets_have_the_documented_shape() {
        let s = generate_signing_secret().unwrap();
        let t = s.expose();
        assert!(t.starts_with("kwss_"));
        assert_eq!(t.len(), 5 + 43);
        assert!(t[5..].bytes().all(|b| b.is_ascii_alphanumeric()));
    }

    #[test]
    fn hmac_matches_rfc_4231_vectors() {
        // Test case 2: a short key.
        assert_eq!(
            hex::encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block, which must be hashed first.
        assert_eq!(
            hex::encode(hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn request_signature_covers_method_path_timestamp_and_body() {
        let secret = "kwss_test";
        let sig = sign_request(
            secret,
            "POST",
            "/v1/things?x=1",
            1_700_000_000,
            b"{\"a\":1}",
        );
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(b"POST\n/v1/things?x=1\n1700000000\n{\"a\":1}");
        assert_eq!(sig, hex::encode(mac.finalize().into_bytes()));
        assert_eq!(sig.len(), 64);
        assert!(sig
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_eq!(
            sign_request(
                secret,
                "post",
                "/v1/things?x=1",
                1_700_000_000,
                b"{\"a\":1}"
            ),
            sig
        );
        assert_ne!(
            sign_request(secret, "GET", "/v1/things?x=1", 1_700_000_000, b"{\"a\":1}"),
            sig
        );
        assert_ne!(
            sign_request(secret, "POST", "/v1/things", 1_700_000_000, b"{\"a\":1}"),
            sig
        );
        assert_ne!(
            sign_request(
                secret,
                "POST",
                "/v1/things?x=1",
                1_700_000_001,
                b"{\"a\":1}"
            ),
            sig
        );
        assert_ne!(
            sign_request(
                secret,
                "POST",
                "/v1/things?x=1",
                1_700_000_000,
                b"{\"a\":2}"
            ),
            sig
        );
        assert_ne!(
            sign_request(
                "other",
                "POST",
                "/v1/things?x=1",
                1_700_000_000,
                b"{\"a\":1}"
            ),
            sig
        );
        assert!(verify_request_signature(
            secret,
            "POST",
            "/v1/things?x=1",
            1_700_000_000,
            b"{\"a\":1}",
            &sig
        ));
        assert!(!verify_request_signature(
            secret,
            "POST",
            "/v1/things?x=1",
            1_700_000_000,
            b"{\"a\":1}",
            &sig.to_ascii_uppercase()
        ));
        assert!(!verify_request_signature(
            secret,
            "POST",
            "/v1/things?x=1",
            1_700_000_000,
            b"{\"a\":1}",
            ""
        ));
    }

    fn any_env() -> impl Strategy<Value = Environment> {
        prop::sample::select(Environment::ALL.to_vec())
    }

    fn any_kind() -> impl Strategy<Value = TokenKind> {
        prop::sample::select(TokenKind::ALL.to_vec())
    }

    proptest! {
        #[test]
        fn parse_never_panics_on_arbitrary_strings(s in any::<String>()) {
            let _ = parse(&s);
        }

        #[test]
        fn parse_never_panics_on_near_tokens(s in "kwt?_(rk|ak|dk|uk|st|xx)_[0-9A-Za-z_é-]{0,44}") {
            let _ = parse(&s);
        }

        #[test]
        fn parse_never_panics_on_arbitrary_bytes(b in prop::collection::vec(any::<u8>(), 0..64)) {
            let s = String::from_utf8_lossy(&b);
            let _ = parse(&s);
        }

        #[test]
        fn generated_tokens_always_parse(env in any_env(), kind in any_kind()) {
            let token = generate(env, kind).unwrap();
            prop_assert_eq!(parse(token.expose()), Ok(ParsedToken { environment: env, kind }));
        }

        #[test]
        fn a_single_changed_character_never_parses(env in any_env(), kind in any_kind(), i in 0usize..43) {
            let token = generate(env, kind).unwrap();
            let t = token.expose();
            let i = i % t.len();
            let changed = change_char(t, i);
            prop_assume!(changed != t);
            prop_assert!(parse(&changed).is_err());
        }
    }
}
