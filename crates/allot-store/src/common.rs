//! What both backends share beyond SQL: documents as JSON, whole-second times, cursor pages,
//! and the decisions taken on rows once read (seat states, expiry, token rotation, keys).

use std::collections::HashMap;

use allot_app::StoreError;
use allot_app::store::{Decide, IdempotencyBegin, Page, PageRequest, Role, SeatState, UpdateRefused, User};
use allot_core::booking::{Booking, BookingStatus, Transition};
use allot_core::capacity::{Claim, Span};
use allot_core::ids::ResourceId;
use jiff::Timestamp;
use serde::Serialize;
use serde::de::DeserializeOwned;

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

/// Why a venue cannot be deleted yet.
pub const VENUE_IN_USE: &str = "the venue has current or future bookings; cancel them first";

/// Decodes `(id, doc)` rows (`limit + 1` of them) into a page.
pub fn docs_to_page<T: DeserializeOwned>(rows: Vec<(String, String)>, limit: u32) -> Result<Page<T>, StoreError> {
    let rows = rows.into_iter().map(|(id, doc)| Ok((id, from_json(&doc)?))).collect::<Result<Vec<_>, StoreError>>()?;
    Ok(page_of(rows, limit))
}

/// `(block_start, block_end, quantity)` rows as claims (rows that cannot be claims are skipped).
pub fn claims_from_rows(rows: Vec<(i64, i64, i64)>) -> Vec<Claim> {
    rows.into_iter()
        .filter(|(s, e, q)| s < e && *q > 0)
        .map(|(s, e, q)| Claim { span: Span::new(s, e), quantity: u32::try_from(q).unwrap_or(u32::MAX) })
        .collect()
}

/// Adds `(resource_id, booking status)` rows of live claims to a seat map: booked wins over held.
pub fn add_seat_states(states: &mut HashMap<ResourceId, SeatState>, rows: Vec<(String, String)>) {
    for (resource, status) in rows {
        let state = if status == BookingStatus::Confirmed.as_str() { SeatState::Booked } else { SeatState::Held };
        if let Ok(id) = resource.parse() {
            let entry = states.entry(id).or_insert(state);
            if state == SeatState::Booked {
                *entry = SeatState::Booked;
            }
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

pub fn rotation(row: Option<TokenRow>, now: i64) -> Rotation {
    match row {
        None => Rotation::Invalid,
        Some((_, _, expires_at, _, revoked_at)) if revoked_at.is_some() || expires_at <= now => Rotation::Invalid,
        Some((_, family, _, Some(_), _)) => Rotation::RevokeFamily(family),
        Some((user_id, family, _, None, _)) => Rotation::Rotate { user_id, family },
    }
}

/// A stored idempotency key: request_hash, status, body, locked_until.
pub type KeyRow = (String, Option<i64>, Option<Vec<u8>>, Option<i64>);

/// What a request finds under an existing key at `now`; `None`: the key is free to (re)start.
pub fn existing_key(row: Option<KeyRow>, now: i64) -> Option<IdempotencyBegin> {
    match row? {
        (hash, Some(status), body, _) => Some(IdempotencyBegin::Completed {
            request_hash: hash,
            status: u16::try_from(status).unwrap_or(500),
            body: body.unwrap_or_default(),
        }),
        (_, None, _, Some(until)) if until > now => Some(IdempotencyBegin::InProgress),
        // The request that locked it died without finishing: take it over.
        _ => None,
    }
}

/// A stored user: id, email, name, password_hash, roles, created_at.
pub type UserRow = (String, String, String, String, String, i64);
/// The columns of [`UserRow`], in order.
pub const USER_COLUMNS: &str = "id, email, name, password_hash, roles, created_at";

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
