//! Offset pagination (API.md §0): `limit` 1..=1000 (default 100), `offset` default 0.

use keyward_core::model::Page;
use keyward_proto::PageQuery;

use crate::error::ApiError;

pub fn parse(q: &PageQuery) -> Result<Page, ApiError> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::validation("limit", "must be between 1 and 1000"));
    }
    let offset = q.offset.unwrap_or(0);
    if offset > i64::MAX as u64 {
        return Err(ApiError::validation("offset", "is too large"));
    }
    Ok(Page { limit, offset })
}

/// Stores fetch one row more than asked; this drops it and says whether there was one.
pub fn trim<T>(rows: &mut Vec<T>, p: Page) -> bool {
    let more = rows.len() > p.limit as usize;
    rows.truncate(p.limit as usize);
    more
}
