//! `GET /audit`: the audit trail, newest first, with filters and a cursor (admins see all;
//! managers the events of their venues).

use std::sync::Arc;

use allot_app::App;
use allot_app::audit::{AuditEvent, AuditFilter, AuditPage, Outcome};
use allot_app::store::{PAGE_LIMIT_DEFAULT, PAGE_LIMIT_MAX};
use allot_core::FieldErrors;
use axum::extract::State;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{ApiError, ApiResult};
use crate::extract::{Auth, Query};

#[derive(Debug, Deserialize)]
pub struct AuditQuery {
    actor_id: Option<String>,
    action: Option<String>,
    outcome: Option<String>,
    target_id: Option<String>,
    venue_id: Option<String>,
    from: Option<String>,
    to: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

/// Longest free-text filter value accepted.
const FILTER_BYTES_MAX: usize = 200;

pub async fn list(
    State(app): State<Arc<App>>,
    Auth(principal): Auth,
    Query(q): Query<AuditQuery>,
) -> ApiResult<impl IntoResponse> {
    let (filter, page) = parse(&q)?;
    let events = app.audit_list(&principal, filter, page).await?;
    let next_cursor = (events.len() == page.limit as usize).then(|| events.last().map(|e| e.seq.to_string())).flatten();
    let data: Vec<Value> = events.iter().map(event_json).collect();
    Ok(axum::Json(json!({ "data": data, "next_cursor": next_cursor })))
}

fn parse(q: &AuditQuery) -> Result<(AuditFilter, AuditPage), ApiError> {
    let mut errors = FieldErrors::new();
    let mut text = |field: &str, value: &Option<String>| {
        let value = value.as_deref().filter(|v| !v.is_empty())?;
        if value.len() > FILTER_BYTES_MAX {
            errors.add(field, format!("at most {FILTER_BYTES_MAX} bytes"));
            return None;
        }
        Some(value.to_owned())
    };
    let mut filter = AuditFilter {
        actor_id: text("actor_id", &q.actor_id),
        action: text("action", &q.action),
        target_id: text("target_id", &q.target_id),
        ..AuditFilter::default()
    };
    filter.outcome = parsed(&mut errors, "outcome", &q.outcome, "success or failure", Outcome::parse);
    filter.from = parsed(&mut errors, "from", &q.from, "an RFC 3339 time", |s| s.parse().ok());
    filter.to = parsed(&mut errors, "to", &q.to, "an RFC 3339 time", |s| s.parse().ok());
    filter.venue_ids = parsed(&mut errors, "venue_id", &q.venue_id, "a venue id", |s| s.parse().ok()).map(|v| vec![v]);
    let limit = parsed(&mut errors, "limit", &q.limit, &format!("an integer from 1 to {PAGE_LIMIT_MAX}"), |s| {
        s.parse::<u32>().ok().filter(|n| (1..=PAGE_LIMIT_MAX).contains(n))
    });
    let before = parsed(&mut errors, "cursor", &q.cursor, "a cursor from a previous page", |s| s.parse::<u64>().ok());
    if !errors.is_empty() {
        return Err(ApiError::bad_request(errors));
    }
    Ok((filter, AuditPage { before, limit: limit.unwrap_or(PAGE_LIMIT_DEFAULT) }))
}

/// Parses an optional query value; a value that does not parse is a field error.
fn parsed<T>(
    errors: &mut FieldErrors,
    field: &str,
    raw: &Option<String>,
    expected: &str,
    parse: impl FnOnce(&str) -> Option<T>,
) -> Option<T> {
    let raw = raw.as_deref().filter(|s| !s.is_empty())?;
    let value = parse(raw);
    if value.is_none() {
        errors.add(field, format!("must be {expected}"));
    }
    value
}

pub fn event_json(e: &AuditEvent) -> Value {
    json!({
        "seq": e.seq, "id": e.id, "at": e.at.to_string(),
        "actor_id": e.actor_id, "actor_role": e.actor_role, "ip": e.ip, "request_id": e.request_id,
        "action": e.action, "target_id": e.target_id, "venue_id": e.venue_id.map(|v| v.to_string()),
        "outcome": e.outcome.as_str(), "reason": e.reason, "details": e.details,
        "prev_hash": e.prev_hash, "hash": e.hash,
    })
}
