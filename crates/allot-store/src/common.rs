//! What both backends share beyond SQL: documents as JSON, whole-second times, cursor pages,
//! and the decisions taken on rows once read (seat states, expiry, token rotation, keys).

use allot_app::StoreError;
use allot_app::audit::{AuditEvent, AuditFilter, AuditPage, AuditScope, Outcome};
use allot_app::store::{
    Decide, IdempotencyBegin, Page, PageRequest, RefundDue, RefundKind, Role, RotateOutcome, SeatStates, UpdateRefused,
    User,
};
use allot_core::booking::{Booking, BookingStatus, Transition};
use allot_core::capacity::{Claim, Span};
use allot_core::ids::BookingId;
use jiff::Timestamp;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::QueryBuilder;

use crate::writer::Outcome as WriteOutcome;

pub fn to_json<T: Serialize>(value: &T) -> Result<String, sqlx::Error> {
    serde_json::to_string(value).map_err(|e| sqlx::Error::Encode(Box::new(e)))
}

pub fn from_json<T: DeserializeOwned>(doc: &str) -> Result<T, StoreError> {
    serde_json::from_str(doc).map_err(|e| StoreError::Corrupt(e.to_string()))
}

pub fn from_json_db<T: DeserializeOwned>(doc: &str) -> Result<T, sqlx::Error> {
    serde_json::from_str(doc).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

/// Whether every migration `migrator` embeds is recorded as applied, successfully and with the
/// same checksum, in `applied` (`version, checksum, success` rows of `_sqlx_migrations`): a node
/// must not serve a database its code does not match.
pub fn migrations_applied(
    migrator: &sqlx::migrate::Migrator,
    applied: &[(i64, Vec<u8>, bool)],
) -> Result<(), StoreError> {
    let missing = migrator.iter().filter(|m| !m.migration_type.is_down_migration()).find(|m| {
        !applied.iter().any(|(version, checksum, success)| {
            *version == m.version && *success && checksum.as_slice() == m.checksum.as_ref()
        })
    });
    match missing {
        Some(m) => Err(StoreError::Database(format!("migration {} ({}) is not applied", m.version, m.description))),
        None => Ok(()),
    }
}

/// Stored seconds back to a timestamp (out-of-range values cannot have been written by us).
pub fn ts(seconds: i64) -> Timestamp {
    Timestamp::from_second(seconds).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// Cuts `limit + 1` rows (id, value) to a page: the extra row only says there is more.
pub fn page_of<T>(mut rows: Vec<(String, T)>, limit: u32) -> Page<T> {
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let next_after = if more { rows.last().and_then(|(id, _)| uuid::Uuid::parse_str(id).ok()) } else { None };
    Page { items: rows.into_iter().map(|(_, v)| v).collect(), next_after }
}

/// The id rows must sort after (ids are stored as simple hex UUIDv7: by creation time).
pub fn after_key(page: &PageRequest) -> String {
    page.after.map(|u| u.as_simple().to_string()).unwrap_or_default()
}

/// The expiry stored beside a booking: only while its status expires.
pub fn hold_expiry(b: &Booking) -> Option<i64> {
    b.status.expires().then(|| b.expires_at.map(|t| t.as_second())).flatten()
}

pub fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error().is_some_and(|d| d.is_unique_violation())
}

/// Where a catalogue document lives, for each backend's compare-and-set `replace_doc`: a
/// statement reading the live document (on PostgreSQL locking its row, so a concurrent replace
/// on another node waits and then sees this one's write), and one writing it.
pub struct DocTable {
    pub select: &'static str,
    pub update: &'static str,
    pub what: &'static str,
}

/// Why a venue cannot be deleted yet.
pub const VENUE_IN_USE: &str = "the venue has current or future bookings; cancel them first";

/// Decodes `(id, doc)` rows (`limit + 1` of them) into a page.
pub fn docs_to_page<T: DeserializeOwned>(rows: Vec<(String, String)>, limit: u32) -> Result<Page<T>, StoreError> {
    let rows = rows.into_iter().map(|(id, doc)| Ok((id, from_json(&doc)?))).collect::<Result<Vec<_>, StoreError>>()?;
    Ok(page_of(rows, limit))
}

/// `(block_start, block_end, quantity)` rows as claims (rows that cannot be claims are skipped).
pub fn claims_from_rows(rows: Vec<(i64, i64, i64)>) -> Vec<Claim> {
    rows.into_iter().filter_map(|(s, e, q)| claim_of_row(s, e, q)).collect()
}

/// The claim a `(block_start, block_end, quantity)` row stands for; `None` for an empty one.
pub fn claim_of_row(start: i64, end: i64, quantity: i64) -> Option<Claim> {
    (start < end && quantity > 0)
        .then(|| Claim { span: Span::new(start, end), quantity: u32::try_from(quantity).unwrap_or(u32::MAX) })
}

/// Adds `(resource_id, booking status)` rows of live claims to a seat map: booked wins over held.
pub fn add_seat_states(states: &mut SeatStates, rows: Vec<(String, String, Option<i64>)>) {
    for (resource, status, hold_expires_at) in rows {
        if let Ok(id) = resource.parse() {
            states.add(id, status == BookingStatus::Confirmed.as_str(), hold_expires_at.map(ts));
        }
    }
}

/// The booking `before` becomes when its hold lapses at `now`, if it does.
pub fn expired(before: &Booking, now: Timestamp) -> Option<Booking> {
    let status = before.next_status(Transition::Expire, now).ok()?;
    let mut after = before.clone();
    after.status = status;
    after.updated_at = now;
    Some(after)
}

/// Applies a use case's decision to the stored booking.
pub fn decided(before: &Booking, decide: Decide, now: Timestamp) -> Result<Booking, UpdateRefused> {
    let mut after = decide(before, now).map_err(UpdateRefused::Rejected)?;
    assert_eq!(after.id, before.id, "a decision cannot change the booking's id");
    after.updated_at = now;
    Ok(after)
}

/// A stored refresh token: user_id, family_id, expires_at, used_at, revoked_at.
pub type TokenRow = (String, String, i64, Option<i64>, Option<i64>);

/// What presenting a refresh token at `now` does.
pub enum Rotation {
    Invalid,
    /// Reuse of a rotated token: someone else has a copy. The whole family must end.
    RevokeFamily(String),
    /// Mark it used and issue its successor in `family` for `user_id`.
    Rotate {
        user_id: String,
        family: String,
    },
}

/// How a live refresh token gets its successor. Either way it is marked used, so that
/// presented again it revokes its family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Succession {
    /// Its holder presents it (`Store::rotate_refresh_token`); a used one coming back is a
    /// copy someone else has, and ends its family.
    Rotate,
    /// Its secret should never have reached anyone (`Store::reissue_refresh_token`: the
    /// answer carrying it was lost). One already used did reach someone: it is not reissued,
    /// and nothing else changes.
    Reissue,
}

pub fn rotation(row: Option<TokenRow>, now: i64, succession: Succession) -> Rotation {
    match row {
        None => Rotation::Invalid,
        Some((_, _, expires_at, _, revoked_at)) if revoked_at.is_some() || expires_at <= now => Rotation::Invalid,
        Some((_, _, _, Some(_), _)) if succession == Succession::Reissue => Rotation::Invalid,
        Some((_, family, _, Some(_), _)) => Rotation::RevokeFamily(family),
        Some((user_id, family, _, None, _)) => Rotation::Rotate { user_id, family },
    }
}

/// A stored idempotency key: request_hash, status, body, locked_until, committed_target.
pub type KeyRow = (String, Option<i64>, Option<Vec<u8>>, Option<i64>, Option<String>);
/// Selects a key's [`KeyRow`] (parameters: principal, key).
macro_rules! key_row_sql {
    () => {
        "SELECT request_hash, status, body, locked_until, committed_target FROM idempotency_keys
         WHERE principal = $1 AND key = $2"
    };
}
pub(crate) use key_row_sql;

/// `Store::idempotency_abandon` (parameters: principal, key, owner), two statements whose rows
/// exclude each other: a key whose holder changed nothing is deleted; one whose holder changed
/// something is unlocked, for the next retry to recover.
pub const ABANDON_UNCHANGED_SQL: &str = "DELETE FROM idempotency_keys
     WHERE principal = $1 AND key = $2 AND owner = $3 AND status IS NULL AND committed_target IS NULL";
pub const ABANDON_CHANGED_SQL: &str = "UPDATE idempotency_keys SET locked_until = NULL
     WHERE principal = $1 AND key = $2 AND owner = $3 AND status IS NULL AND committed_target IS NOT NULL";

/// What a request with `request_hash` finds under a key at `now`.
#[derive(Debug, PartialEq, Eq)]
pub enum KeyFound {
    /// The answer, with nothing to write.
    Answer(IdempotencyBegin),
    /// The key is new, or its holder died: take it over (new owner, new lease), then answer.
    TakeOver(IdempotencyBegin),
}

pub fn existing_key(row: Option<KeyRow>, request_hash: &str, now: i64) -> KeyFound {
    let Some((hash, status, body, locked_until, committed)) = row else {
        return KeyFound::TakeOver(IdempotencyBegin::Started);
    };
    if let Some(status) = status {
        let status = u16::try_from(status).unwrap_or(500);
        return KeyFound::Answer(IdempotencyBegin::Completed {
            request_hash: hash,
            status,
            body: body.unwrap_or_default(),
        });
    }
    if locked_until.is_some_and(|until| until > now) {
        return KeyFound::Answer(IdempotencyBegin::InProgress);
    }
    match committed {
        // Its holder changed something and died before answering: the change is this key's.
        Some(_) if hash != request_hash => KeyFound::Answer(IdempotencyBegin::Mismatch),
        Some(target) => KeyFound::TakeOver(IdempotencyBegin::Recover { request_hash: hash, target }),
        // Its holder died having changed nothing: any request may run under it now.
        None => KeyFound::TakeOver(IdempotencyBegin::Started),
    }
}

/// A stored user: id, email, name, password_hash, roles, created_at.
pub type UserRow = (String, String, String, String, String, i64);
/// The columns of [`UserRow`], in order.
pub const USER_COLUMNS: &str = "id, email, name, password_hash, roles, created_at";

/// A user row and the ids of the venues they manage, comma-separated (`NULL` for none): one
/// statement per authenticated request instead of two.
pub type UserVenuesRow = (String, String, String, String, String, i64, Option<String>);

pub fn user_of_venues_row(row: UserVenuesRow) -> Result<User, StoreError> {
    let (id, email, name, password_hash, roles, created_at, venues) = row;
    let mut venues: Vec<String> = venues.iter().flat_map(|v| v.split(',')).map(str::to_owned).collect();
    venues.sort_unstable();
    user_of((id, email, name, password_hash, roles, created_at), venues)
}

/// A user from its row and the venues it manages.
pub fn user_of(row: UserRow, venues: Vec<String>) -> Result<User, StoreError> {
    let (id, email, name, password_hash, roles, created_at) = row;
    Ok(User {
        id: id.parse().map_err(|_| StoreError::Corrupt(format!("user id {id}")))?,
        email,
        name,
        password_hash,
        roles: roles.split(',').filter_map(Role::parse).collect(),
        venues: venues.into_iter().filter_map(|v| v.parse().ok()).collect(),
        created_at: ts(created_at),
    })
}

/// The columns of `audit_events`, in the order of [`AuditRow`].
pub const AUDIT_COLUMNS: &str = "seq, id, at, actor_id, actor_role, ip, request_id, action, target_id, venue_id, \
     outcome, reason, details, prev_hash, hash";

/// An `audit_events` row as stored.
#[derive(sqlx::FromRow)]
pub struct AuditRow {
    seq: i64,
    id: String,
    at: i64,
    actor_id: Option<String>,
    actor_role: String,
    ip: Option<String>,
    request_id: Option<String>,
    action: String,
    target_id: Option<String>,
    venue_id: Option<String>,
    outcome: String,
    reason: Option<String>,
    details: String,
    prev_hash: String,
    hash: String,
}

/// A stored row back to an event. Nothing is repaired: a row that does not decode is corrupt,
/// and one that decodes but was edited fails the chain check.
pub fn audit_event_of(row: AuditRow) -> Result<AuditEvent, StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("audit event {}: bad {what}", row.seq));
    Ok(AuditEvent {
        seq: u64::try_from(row.seq).map_err(|_| corrupt("seq"))?,
        at: Timestamp::from_second(row.at).map_err(|_| corrupt("time"))?,
        venue_id: row.venue_id.as_deref().map(str::parse).transpose().map_err(|_| corrupt("venue id"))?,
        outcome: Outcome::parse(&row.outcome).ok_or_else(|| corrupt("outcome"))?,
        details: serde_json::from_str(&row.details).map_err(|_| corrupt("details"))?,
        id: row.id,
        actor_id: row.actor_id,
        actor_role: row.actor_role,
        ip: row.ip,
        request_id: row.request_id,
        action: row.action,
        target_id: row.target_id,
        reason: row.reason,
        prev_hash: row.prev_hash,
        hash: row.hash,
    })
}

pub fn audit_events_of(rows: Vec<AuditRow>) -> Result<Vec<AuditEvent>, StoreError> {
    rows.into_iter().map(audit_event_of).collect()
}

/// Chains `events` after `(seq, hash)` and returns the new head.
pub fn chain(events: &mut [AuditEvent], mut seq: u64, mut hash: String) -> (u64, String) {
    for event in events.iter_mut() {
        (seq, hash) = event.chain_after(seq, &hash);
    }
    (seq, hash)
}

/// The values of one event for `INSERT INTO audit_events (AUDIT_COLUMNS)`, in column order.
pub fn audit_values(e: &AuditEvent) -> Result<(i64, i64, String), sqlx::Error> {
    let seq = i64::try_from(e.seq).map_err(|err| sqlx::Error::Encode(Box::new(err)))?;
    Ok((seq, e.at.as_second(), to_json(&e.details)?))
}

/// The chain's last link, as `audit_head_of` reads it.
pub const AUDIT_HEAD_SQL: &str = "SELECT seq, hash FROM audit_head WHERE id = 1";

pub fn audit_head_of((seq, hash): (i64, String)) -> Result<(u64, String), StoreError> {
    Ok((u64::try_from(seq).map_err(|_| StoreError::Corrupt("audit head".into()))?, hash))
}

/// Events with `seq > after`, oldest first, at most `limit`: the chain in order. From the
/// very first row when `after` is 0, whatever its `seq`, so a forged row numbered 0 or below
/// is seen by `verify` too.
pub fn audit_range_query<DB: sqlx::Database>(after: u64, limit: u32) -> QueryBuilder<DB>
where
    i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    let mut qb = QueryBuilder::new(format!("SELECT {AUDIT_COLUMNS} FROM audit_events WHERE seq > "));
    let after = if after == 0 { i64::MIN } else { i64::try_from(after).unwrap_or(i64::MAX) };
    qb.push_bind(after).push(" ORDER BY seq LIMIT ").push_bind(i64::from(limit));
    qb
}

/// Refunds queued (`refunds_due`) whose time has come by `now`, with fewer than `attempts_max`
/// attempts, soonest first, at most `limit`.
pub fn refunds_due_query<DB: sqlx::Database>(now: Timestamp, attempts_max: u32, limit: u32) -> QueryBuilder<DB>
where
    i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    let mut qb = QueryBuilder::new(
        "SELECT kind, payment_reference, booking_id, amount, attempts, next_at FROM refunds_due WHERE next_at <= ",
    );
    qb.push_bind(now.as_second()).push(" AND attempts < ").push_bind(i64::from(attempts_max));
    qb.push(" ORDER BY next_at LIMIT ").push_bind(i64::from(limit));
    qb
}

/// When a cancellation's refund owed since `now` by `booking` is first tried, and with how many
/// attempts counted: after the grace, or, for a refund the provider reported failed after it
/// was made, never until an operator retries it (parked, `refunds::PARKED_AT`): a card the
/// money could not go back to is not tried again on its own.
pub fn refund_queued(booking: &Booking, now: Timestamp) -> (i64, i64) {
    if booking.failed_refund().is_some() {
        (i64::from(allot_app::refunds::REFUND_ATTEMPTS_MAX), allot_app::refunds::PARKED_AT.as_second())
    } else {
        (0, now.as_second() + allot_app::store::REFUND_GRACE_SECONDS)
    }
}

/// Up to `limit` bookings waiting for an asynchronous payment, the soonest to lapse first
/// (`Store::pending_payments`, over the partial index `bookings_pending`).
pub fn pending_payments_query<DB: sqlx::Database>(limit: u32) -> QueryBuilder<DB>
where
    i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    let mut qb = QueryBuilder::new(
        "SELECT id FROM bookings WHERE status = 'pending_payment' AND expires_at IS NOT NULL ORDER BY expires_at LIMIT ",
    );
    qb.push_bind(i64::from(limit));
    qb
}

/// Booking ids as stored.
pub fn booking_ids(ids: &[String]) -> Result<Vec<BookingId>, StoreError> {
    ids.iter().map(|id| id.parse().map_err(|_| StoreError::Corrupt(format!("booking id {id}")))).collect()
}

/// The refunds queued for one payment (one per kind at most), wherever they are in the queue:
/// parked ones included, which [`refunds_due_query`] reads last.
pub fn refunds_of_payment_query<DB: sqlx::Database>(payment_reference: &str) -> QueryBuilder<DB>
where
    String: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    let mut qb = QueryBuilder::new(
        "SELECT kind, payment_reference, booking_id, amount, attempts, next_at FROM refunds_due WHERE payment_reference = ",
    );
    qb.push_bind(payment_reference.to_owned()).push(" ORDER BY kind");
    qb
}

/// A row of [`refunds_due_query`]: kind, payment reference, booking, amount, attempts, next.
pub type RefundRow = (String, String, String, i64, i64, i64);

pub fn refund_due_of(
    (kind, payment_reference, booking_id, amount, attempts, next_at): RefundRow,
) -> Result<RefundDue, StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("refunds_due of {payment_reference}: {what}"));
    Ok(RefundDue {
        kind: RefundKind::parse(&kind).ok_or_else(|| corrupt("kind"))?,
        booking_id: booking_id.parse().map_err(|_| corrupt("booking_id"))?,
        amount,
        attempts: u32::try_from(attempts).map_err(|_| corrupt("attempts"))?,
        next_at: ts(next_at),
        payment_reference,
    })
}

/// The audit list: `filter` and `page` as one `SELECT`, newest first.
pub fn audit_select<DB: sqlx::Database>(filter: &AuditFilter, page: AuditPage) -> QueryBuilder<DB>
where
    String: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<String>: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    let mut qb = QueryBuilder::new(format!("SELECT {AUDIT_COLUMNS} FROM audit_events WHERE 1 = 1"));
    let text = [
        (" AND actor_id = ", &filter.actor_id),
        (" AND action = ", &filter.action),
        (" AND target_id = ", &filter.target_id),
    ];
    for (clause, value) in text {
        if let Some(v) = value {
            qb.push(clause).push_bind(v.clone());
        }
    }
    if let Some(o) = filter.outcome {
        qb.push(" AND outcome = ").push_bind(o.as_str().to_owned());
    }
    if let Some(from) = filter.from {
        qb.push(" AND at >= ").push_bind(from.as_second());
    }
    if let Some(to) = filter.to {
        qb.push(" AND at < ").push_bind(to.as_second());
    }
    if let Some(before) = page.before {
        qb.push(" AND seq < ").push_bind(i64::try_from(before).unwrap_or(i64::MAX));
    }
    if let Some(venues) = &filter.venue_ids {
        // No venues: an empty `IN ()` is not SQL, and the answer is nothing.
        qb.push(" AND venue_id IN (");
        let mut list = qb.separated(", ");
        list.push_bind(String::new());
        for v in venues {
            list.push_bind(v.to_string());
        }
        qb.push(")");
    }
    qb.push(" ORDER BY seq DESC LIMIT ").push_bind(i64::from(page.limit));
    qb
}

/// A refused rotation is a failed attempt, although its transaction is kept (a reused token
/// revokes its family): the request's audit event must say so before the writer takes it.
/// A successful one names the token it issued (`new_hash`) as its target, so that a keyed
/// request's mark points a retry at it if the answer carrying its secret is lost.
pub fn audit_rotation(
    scope: Option<&AuditScope>,
    succession: Succession,
    new_hash: &str,
    outcome: &Result<RotateOutcome, StoreError>,
) {
    let Some(scope) = scope else { return };
    let (target, failure) = match outcome {
        Ok(RotateOutcome::Rotated { .. }) => (Some(new_hash), None),
        Ok(RotateOutcome::Invalid) if succession == Succession::Reissue => (None, Some("session_not_live")),
        Ok(RotateOutcome::Invalid) => (None, Some("unauthenticated")),
        Ok(RotateOutcome::Reused) => (None, Some("refresh_token_reused")),
        Err(_) => return,
    };
    allot_app::audit::decide_scope(scope, target, failure);
}

/// A venue `INSERT` whose id exists already is a conflict, not a database failure.
pub fn venue_inserted<T>(result: Result<T, sqlx::Error>) -> WriteOutcome<(), StoreError> {
    match result {
        Ok(_) => Ok(Ok(())),
        Err(e) if is_unique_violation(&e) => Ok(Err(StoreError::Conflict("venue exists".into()))),
        Err(e) => Err(e),
    }
}

/// The refund backfill's cases, for both backends' migration tests: bookings as the migration
/// reads them (id, status, document with only the payment and the refund), and the one row
/// of `refunds_due` they make (kind, reference, booking, amount, attempts, next), parked for
/// an operator.
#[cfg(test)]
pub fn refund_backfill_cases() -> (Vec<(&'static str, &'static str, String)>, RefundRow) {
    let doc = |payment: Option<&str>, refund: Option<(i64, Option<&str>)>| {
        let payment = payment.map(|p| serde_json::json!({"reference": p, "amount": 1200}));
        let refund = refund.map(|(amount, reference)| serde_json::json!({"amount": amount, "reference": reference}));
        serde_json::json!({"payment": payment, "refund": refund}).to_string()
    };
    let bookings = vec![
        ("b1", "cancelled", doc(Some("pi_1"), Some((600, None)))),
        ("b2", "cancelled", doc(Some("pi_2"), Some((600, Some("re_2"))))),
        ("b3", "cancelled", doc(Some("pi_3"), Some((0, None)))),
        ("b4", "cancelled", doc(None, None)),
        ("b5", "confirmed", doc(Some("pi_5"), None)),
    ];
    (bookings, ("cancellation".into(), "pi_1".into(), "b1".into(), 600, 1000, 0))
}
