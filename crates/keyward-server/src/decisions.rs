//! Audit of access decisions made on the hot path (API.md §7): authentication and authorization
//! failures (`auth.denied`) and failed verifications (`key.verify`; successful ones are counted
//! in the key's usage instead, so a busy service does not write an audit row per key per second).
//!
//! These are written off the hot path, in batches. Decisions are aggregated in memory by (org,
//! key, action, code, client IP) and written every flush interval as one event per group with a
//! `count`, so a flood of identical denials becomes one event per interval instead of being
//! dropped. The number of distinct groups held between flushes is bounded; a decision that finds
//! no room is counted in `keyward_audit_dropped_total` rather than growing memory without bound.
//! Failures with no known key (unknown or malformed tokens) have no org to be recorded in; they
//! are counted in `keyward_auth_failures_total` by code.

// std's keyed SipHash, not FxHash: a group's key includes the client's address, which an
// IPv6 client chooses 64 bits of (see `limiter::Limiter`). Denials only: not the hot path.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use keyward_core::model::{AuditEvent, Key, Outcome, Timestamp, TraceContext};
use keyward_store::Store;
use serde_json::json;
use uuid::Uuid;

/// Most distinct groups held between two flushes.
pub const MAX_GROUPS: usize = 50_000;

/// The most bytes of a request's method or path a group keeps. The count of groups is bounded;
/// this bounds each one, so what the log holds between flushes is bounded in bytes too (a path
/// comes from the request line, up to hyper's limit, or from a verify body).
pub const MAX_DETAIL_BYTES: usize = 512;

/// `s` cut to at most [`MAX_DETAIL_BYTES`] on a character boundary, marked with `…` when cut.
fn clip(s: Option<String>) -> Option<String> {
    let mut s = s?;
    if s.len() > MAX_DETAIL_BYTES {
        let mut end = MAX_DETAIL_BYTES - '…'.len_utf8();
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    Some(s)
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Group {
    org_id: Uuid,
    key_id: Uuid,
    action: &'static str,
    code: &'static str,
    client_ip: Option<IpAddr>,
}

#[derive(Debug)]
struct Pending {
    first: AuditEvent,
    count: u64,
    last_at: Timestamp,
}

/// One decision to record.
pub struct Decision<'a> {
    pub key: &'a Key,
    pub action: &'static str,
    /// `VALID` for a successful verification, else the error code.
    pub code: &'static str,
    pub client_ip: Option<IpAddr>,
    pub request_id: Option<String>,
    pub trace: TraceContext,
    pub method: Option<String>,
    pub path: Option<String>,
    pub at: Timestamp,
}

/// The aggregating recorder.
#[derive(Debug, Default)]
pub struct DecisionLog {
    pending: Mutex<HashMap<Group, Pending>>,
}

impl DecisionLog {
    /// Records one decision (cheap: a map update under a lock).
    pub fn record(&self, d: Decision<'_>) {
        let group = Group {
            org_id: d.key.org_id,
            key_id: d.key.id,
            action: d.action,
            code: d.code,
            client_ip: d.client_ip,
        };
        let mut g = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = g.get_mut(&group) {
            p.count += 1;
            p.last_at = p.last_at.max(d.at);
            return;
        }
        if g.len() >= MAX_GROUPS {
            metrics::counter!("keyward_audit_dropped_total").increment(1);
            return;
        }
        let valid = d.code == "VALID";
        let first = AuditEvent {
            id: Uuid::now_v7(),
            org_id: d.key.org_id,
            occurred_at: d.at,
            action: d.action.to_string(),
            outcome: if valid {
                Outcome::Success
            } else {
                Outcome::Denied
            },
            error_code: if valid {
                None
            } else {
                Some(d.code.to_string())
            },
            actor_key_id: Some(d.key.id),
            actor_agent_id: d.key.agent_id,
            target_type: Some("key".to_string()),
            target_id: Some(d.key.id),
            client_ip: d.client_ip.map(|ip| ip.to_string()),
            request_id: d.request_id,
            trace: d.trace,
            details: json!({ "method": clip(d.method), "path": clip(d.path) }),
        };
        g.insert(
            group,
            Pending {
                first,
                count: 1,
                last_at: d.at,
            },
        );
    }

    /// Writes every pending group as one event with its count. Failures are logged and counted;
    /// these events are best effort by design (the state changes they describe are not theirs).
    pub async fn flush(&self, store: &dyn Store) {
        let taken = {
            let mut g = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::take(&mut *g)
        };
        if taken.is_empty() {
            return;
        }
        let events: Vec<AuditEvent> = taken
            .into_values()
            .map(|p| {
                let mut e = p.first;
                if let Some(obj) = e.details.as_object_mut() {
                    obj.insert("count".into(), json!(p.count));
                    obj.insert(
                        "last_at".into(),
                        json!(keyward_proto::ts::format(&p.last_at)),
                    );
                }
                e
            })
            .collect();
        if let Err(e) = store.append_audit(&events).await {
            metrics::counter!("keyward_audit_dropped_total").increment(events.len() as u64);
            tracing::warn!(error = %e, events = events.len(), "could not write decision audit events");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn long_details_are_cut_on_a_character_boundary_and_marked() {
        assert_eq!(clip(None), None);
        assert_eq!(clip(Some("/v1/me".into())).as_deref(), Some("/v1/me"));
        let exact = "a".repeat(MAX_DETAIL_BYTES);
        assert_eq!(clip(Some(exact.clone())), Some(exact));
        // Three-byte characters: the cut cannot fall inside one.
        let long = "€".repeat(100_000);
        let cut = clip(Some(long)).unwrap();
        assert!(cut.len() <= MAX_DETAIL_BYTES, "{}", cut.len());
        assert!(cut.ends_with('…'));
        assert!(cut.trim_end_matches('…').chars().all(|c| c == '€'));
    }

    /// What a group keeps of a request is bounded whatever the request sent.
    #[test]
    fn a_group_keeps_at_most_max_detail_bytes_of_the_method_and_path() {
        let (key, _) = Key::mint(
            Uuid::now_v7(),
            Some(Uuid::now_v7()),
            keyward_core::token::TokenKind::Agent,
            keyward_core::token::Environment::Live,
            Vec::new(),
            chrono::Utc::now(),
        )
        .unwrap();
        let log = DecisionLog::default();
        log.record(Decision {
            key: &key,
            action: "key.verify",
            code: "INSUFFICIENT_SCOPE",
            client_ip: None,
            request_id: None,
            trace: TraceContext::default(),
            method: Some("M".repeat(1 << 20)),
            path: Some("/p".repeat(1 << 19)),
            at: chrono::Utc::now(),
        });
        let g = log.pending.lock().unwrap();
        let kept = &g.values().next().unwrap().first.details;
        for field in ["method", "path"] {
            let text = kept[field].as_str().unwrap();
            assert!(text.len() <= MAX_DETAIL_BYTES, "{field}: {}", text.len());
        }
    }
}
