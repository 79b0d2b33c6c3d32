//! `GET /v1/keys/{key_id}/usage` (API.md §4, §6.3): a key's counts by hour or day, their total,
//! and its quota state. Counts not yet flushed to the store are included.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::Json;
use chrono::Duration;
use keyward_core::model::{QuotaPeriod, Timestamp};
use keyward_core::quota::{period_end, period_start};
use keyward_proto as proto;
use serde::Deserialize;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::{query_time, ApiPath, ApiQuery};
use crate::keys::load_key;
use crate::AppState;

/// The most buckets one answer may hold.
const MAX_BUCKETS: i64 = 2000;

/// Query of the usage endpoint.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// `hour` (default) or `day`.
    pub granularity: Option<String>,
    /// RFC 3339, inclusive; default 24 hours (hourly) or 30 days (daily) before `until`.
    pub since: Option<String>,
    /// RFC 3339, exclusive; default the end of the current hour or day.
    pub until: Option<String>,
}

#[utoipa::path(get, path = "/v1/keys/{key_id}/usage", tag = "keys",
    params(("key_id" = Uuid, Path), UsageQuery),
    responses((status = 200, body = proto::UsageResponse), (status = "4XX", body = proto::ErrorBody)),
    security(("api_key" = [])))]
pub async fn usage(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(key_id): ApiPath<Uuid>,
    ApiQuery(q): ApiQuery<UsageQuery>,
) -> ApiResult<Json<proto::UsageResponse>> {
    caller.require(&["usage:read"])?;
    let key = load_key(&state, caller.org_id(), key_id).await?;
    let now = state.now();
    let (period, step) = match q.granularity.as_deref() {
        None | Some("hour") => (QuotaPeriod::Hour, Duration::hours(1)),
        Some("day") => (QuotaPeriod::Day, Duration::days(1)),
        Some(_) => {
            return Err(ApiError::validation(
                "granularity",
                "must be `hour` or `day`",
            ))
        }
    };
    // By default the range ends with the bucket that holds `now`, so current uses always show.
    let until = query_time("until", &q.until)?.unwrap_or_else(|| period_end(period, now));
    let default_span = if period == QuotaPeriod::Hour {
        Duration::hours(24)
    } else {
        Duration::days(30)
    };
    let since = query_time("since", &q.since)?.unwrap_or(until - default_span);
    if since >= until {
        return Err(ApiError::validation("since", "must be before `until`"));
    }
    // Buckets are whole hours or days: from the one containing `since` to the one containing
    // the last instant before `until`.
    let first = period_start(period, since);
    let span = (until - first).num_seconds() / step.num_seconds() + 1;
    if span > MAX_BUCKETS {
        return Err(ApiError::validation(
            "since",
            format!(
                "the range holds more than {MAX_BUCKETS} buckets; narrow it or use granularity=day"
            ),
        ));
    }
    let mut buckets: BTreeMap<Timestamp, proto::UsageBucket> = BTreeMap::new();
    let mut t = first;
    while t < until {
        buckets.insert(
            t,
            proto::UsageBucket {
                start: t,
                allowed: 0,
                denied: 0,
                rate_limited: 0,
            },
        );
        t += step;
    }
    // Stored and pending counts, so that nothing in flight is missed or counted twice.
    let hours = state
        .meter
        .usage_hours(state.store.as_ref(), key.id, first, until)
        .await?;
    for h in hours {
        if h.start < first || h.start >= until {
            continue;
        }
        if let Some(b) = buckets.get_mut(&period_start(period, h.start)) {
            b.allowed += h.allowed;
            b.denied += h.denied;
            b.rate_limited += h.rate_limited;
        }
    }
    let mut total = proto::UsageTotals {
        allowed: 0,
        denied: 0,
        rate_limited: 0,
    };
    for b in buckets.values() {
        total.allowed += b.allowed;
        total.denied += b.denied;
        total.rate_limited += b.rate_limited;
    }
    let quota = state
        .meter
        .quota_state(state.store.as_ref(), &key, now)
        .await?;
    Ok(Json(proto::UsageResponse {
        key_id: key.id,
        total,
        buckets: buckets.into_values().collect(),
        quota: quota.map(|q| proto::QuotaState {
            limit: q.limit,
            used: q.used,
            remaining: q.limit.saturating_sub(q.used),
            resets_at: q.resets_at(),
        }),
    }))
}
