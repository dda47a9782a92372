//! `GET /audit`: the audit trail, newest first, with filters and a cursor (admins see all;
//! managers the events of their venues).

use std::sync::Arc;

use allot_app::App;
use allot_app::audit::{AuditEvent, AuditFilter, AuditPage, Outcome};
use allot_app::store::{PAGE_LIMIT_DEFAULT, PAGE_LIMIT_MAX};
use allot_core::FieldErrors;
use axum::extract::State;
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::{IntoParams, ToSchema};

use crate::dto::PageView;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Auth, Query};
use crate::openapi::{BadRequest, Forbidden, Unauthenticated};

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Only events of this actor (a user or API key id).
    actor_id: Option<String>,
    /// Only this action, e.g. `booking.hold`, `auth.login`.
    action: Option<String>,
    /// Only successes or failures.
    #[param(value_type = Option<OutcomeJson>)]
    outcome: Option<String>,
    /// Only events about this target (booking, venue, resource, user … id).
    target_id: Option<String>,
    /// Only events of this venue (a manager must manage it).
    #[param(value_type = Option<uuid::Uuid>)]
    venue_id: Option<String>,
    /// Events at or after this time (RFC 3339).
    #[param(value_type = Option<String>, format = DateTime)]
    from: Option<String>,
    /// Events before this time (RFC 3339).
    #[param(value_type = Option<String>, format = DateTime)]
    to: Option<String>,
    /// Items per page, default 20.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100)]
    limit: Option<String>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = AuditOutcome)]
pub enum OutcomeJson {
    Success,
    Failure,
}

/// One audit event: who attempted what, on what, from where, and how it ended; linked to the
/// previous event by `prev_hash`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = AuditEvent)]
pub struct AuditEventView {
    /// Position in the hash chain, from 1.
    pub seq: u64,
    pub id: String,
    #[schema(format = DateTime)]
    pub at: String,
    #[schema(required = true)]
    pub actor_id: Option<String>,
    /// `anonymous`, `customer`, `manager`, `admin`, `partner`, `none`, or `system` (the
    /// server's own work: a refund owed, made later).
    pub actor_role: String,
    #[schema(required = true)]
    pub ip: Option<String>,
    #[schema(required = true)]
    pub request_id: Option<String>,
    pub action: String,
    #[schema(required = true)]
    pub target_id: Option<String>,
    #[schema(required = true)]
    pub venue_id: Option<String>,
    pub outcome: OutcomeJson,
    /// The error code of a failure.
    #[schema(required = true)]
    pub reason: Option<String>,
    pub details: BTreeMap<String, String>,
    pub prev_hash: String,
    pub hash: String,
}

/// Longest free-text filter value accepted.
const FILTER_BYTES_MAX: usize = 200;

/// The audit trail, newest first: admins see every event, managers the events of their venues.
#[utoipa::path(get, path = "/api/v1/audit", tag = "audit", security(("bearer" = [])), params(AuditQuery),
    responses((status = 200, description = "A page of audit events", body = PageView<AuditEventView>), BadRequest,
        Unauthenticated, Forbidden))]
pub async fn list(
    State(app): State<Arc<App>>,
    Auth(principal): Auth,
    Query(q): Query<AuditQuery>,
) -> ApiResult<impl IntoResponse> {
    let (filter, page) = parse(&q)?;
    let events = app.audit_list(&principal, filter, page).await?;
    let next_cursor = (events.len() == page.limit as usize).then(|| events.last().map(|e| e.seq.to_string())).flatten();
    Ok(axum::Json(PageView { data: events.iter().map(event_json).collect(), next_cursor }))
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

pub fn event_json(e: &AuditEvent) -> AuditEventView {
    AuditEventView {
        seq: e.seq,
        id: e.id.clone(),
        at: e.at.to_string(),
        actor_id: e.actor_id.clone(),
        actor_role: e.actor_role.clone(),
        ip: e.ip.clone(),
        request_id: e.request_id.clone(),
        action: e.action.clone(),
        target_id: e.target_id.clone(),
        venue_id: e.venue_id.map(|v| v.to_string()),
        outcome: match e.outcome {
            Outcome::Success => OutcomeJson::Success,
            Outcome::Failure => OutcomeJson::Failure,
        },
        reason: e.reason.clone(),
        details: e.details.clone(),
        prev_hash: e.prev_hash.clone(),
        hash: e.hash.clone(),
    }
}
