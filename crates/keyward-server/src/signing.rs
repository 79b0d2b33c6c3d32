//! Request signing (API.md §6.5): a key created with `requires_signature` must sign every request
//! with HMAC-SHA256 over `METHOD\nPATH\nTIMESTAMP\nBODY`. Timestamps more than 300 s from the
//! server's clock are refused, and a signature seen before within that window is a replay.
//!
//! The replay cache is in-process: every signature accepted is remembered until its timestamp
//! leaves the window (after which the timestamp check alone refuses it), so memory is bounded by
//! the signed request rate times ten minutes. On a store several nodes share, a signature is
//! also claimed in the store (one insert that only the first claim wins), so a request captured
//! in transit cannot be replayed to another node either.

use std::collections::HashMap;
use std::sync::Mutex;

use keyward_core::model::{Key, Timestamp};
use keyward_proto::ErrorCode;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::MasterKey;

/// How far a request's timestamp may be from the server's clock, in seconds.
pub const WINDOW_S: i64 = 300;

/// Signatures seen within the window.
#[derive(Debug, Default)]
pub struct ReplayCache {
    inner: Mutex<ReplayInner>,
}

#[derive(Debug, Default)]
struct ReplayInner {
    seen: HashMap<[u8; 32], i64>,
    next_prune: usize,
}

impl ReplayCache {
    /// Records a signature; false when it was already seen and has not yet left the window.
    pub fn first_use(&self, key_id: &uuid::Uuid, signature: &str, ts: i64, now_s: i64) -> bool {
        let id = replay_id(key_id, signature);
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.seen.len() >= g.next_prune {
            g.seen.retain(|_, exp| *exp >= now_s);
            g.next_prune = (g.seen.len() * 2).max(1024);
        }
        match g.seen.get(&id) {
            Some(exp) if *exp >= now_s => false,
            _ => {
                g.seen.insert(id, ts + WINDOW_S);
                true
            }
        }
    }

    /// Forgets a signature recorded by [`ReplayCache::first_use`] whose request did not get to
    /// use it.
    fn forget(&self, key_id: &uuid::Uuid, signature: &str) {
        let id = replay_id(key_id, signature);
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .seen
            .remove(&id);
    }
}

/// A signature this node has recorded for a request still being checked: forgotten again if
/// the check ends without a use of it, by an error of the shared store's claim or by the
/// request being dropped while the store was asked (its client went away). Kept, an honest
/// retry of that request would be refused as a replay for the rest of the window, though no
/// request ever used the signature. (A claim that had reached the store when its request was
/// dropped may still be written there; the store then refuses the retry itself, whatever this
/// node forgot.)
struct Recorded<'a> {
    replay: &'a ReplayCache,
    key_id: uuid::Uuid,
    signature: &'a str,
    used: bool,
}

impl Drop for Recorded<'_> {
    fn drop(&mut self) {
        if !self.used {
            self.replay.forget(&self.key_id, self.signature);
        }
    }
}

/// What identifies a use of a signature: the key and the signature, hashed.
fn replay_id(key_id: &uuid::Uuid, signature: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(key_id.as_bytes());
    h.update(signature.as_bytes());
    h.finalize().into()
}

/// The parts of a request a signature covers.
pub struct Signed<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub timestamp: Option<&'a str>,
    pub signature: Option<&'a str>,
    pub body: &'a [u8],
}

/// Checks a request's signature for `key`: `SIGNATURE_INVALID` when headers are missing or the
/// MAC does not match, `SIGNATURE_EXPIRED` outside the window, `SIGNATURE_REPLAYED` when seen.
pub async fn check(
    key: &Key,
    master_key: &MasterKey,
    replay: &ReplayCache,
    store: &dyn keyward_store::Store,
    now: Timestamp,
    req: &Signed<'_>,
) -> Result<(), ApiError> {
    let invalid = || ApiError::new(ErrorCode::SignatureInvalid);
    let (Some(ts), Some(sig)) = (req.timestamp, req.signature) else {
        return Err(invalid().msg("This key requires X-Timestamp and X-Signature headers"));
    };
    let ts: i64 = ts
        .trim()
        .parse()
        .map_err(|_| invalid().msg("X-Timestamp must be Unix seconds"))?;
    let now_s = now.timestamp();
    if (now_s - ts).abs() > WINDOW_S {
        return Err(ApiError::new(ErrorCode::SignatureExpired));
    }
    let blob = key
        .signing_secret_enc
        .as_deref()
        .ok_or_else(|| ApiError::internal("key requires a signature but has no secret"))?;
    let secret = master_key
        .open(blob)
        .map_err(|_| ApiError::internal("cannot decrypt a signing secret: wrong master key?"))?;
    let secret = String::from_utf8(secret).map_err(ApiError::internal)?;
    if !keyward_core::token::verify_request_signature(
        &secret, req.method, req.path, ts, req.body, sig,
    ) {
        return Err(invalid());
    }
    if !replay.first_use(&key.id, sig, ts, now_s) {
        return Err(ApiError::new(ErrorCode::SignatureReplayed));
    }
    if !store.is_shared() {
        return Ok(());
    }
    let mut recorded = Recorded {
        replay,
        key_id: key.id,
        signature: sig,
        used: false,
    };
    let claimed = store
        .claim_signature(&replay_id(&key.id, sig), ts + WINDOW_S, now_s)
        .await?;
    // Claimed here or by another node first: either way the signature has been used.
    recorded.used = true;
    if !claimed {
        return Err(ApiError::new(ErrorCode::SignatureReplayed));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_is_accepted_once_within_the_window() {
        let c = ReplayCache::default();
        let id = uuid::Uuid::now_v7();
        assert!(c.first_use(&id, "abc", 1000, 1000));
        assert!(!c.first_use(&id, "abc", 1000, 1100));
        // Another key's identical signature is a different entry.
        assert!(c.first_use(&uuid::Uuid::now_v7(), "abc", 1000, 1100));
        // Past the window the entry may be forgotten; the timestamp check refuses it anyway.
        assert!(c.first_use(&id, "abc", 1000, 1000 + WINDOW_S + 1));
    }

    /// A signature recorded for a check that ended without using it (the shared store's claim
    /// failed, or the request was dropped) is forgotten, so the request may be sent again; one
    /// that was used stays refused.
    #[test]
    fn a_signature_no_request_used_may_be_sent_again() {
        let c = ReplayCache::default();
        let id = uuid::Uuid::now_v7();
        assert!(c.first_use(&id, "abc", 1000, 1000));
        drop(Recorded {
            replay: &c,
            key_id: id,
            signature: "abc",
            used: false,
        });
        assert!(
            c.first_use(&id, "abc", 1000, 1001),
            "forgotten: a retry passes"
        );
        drop(Recorded {
            replay: &c,
            key_id: id,
            signature: "abc",
            used: true,
        });
        assert!(
            !c.first_use(&id, "abc", 1000, 1002),
            "used: a replay is refused"
        );
    }
}
