//! Helpers both backends share: documents as JSON, whole-second times, cursor pages.

use allot_app::StoreError;
use allot_app::store::{Page, PageRequest};
use allot_core::booking::Booking;
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
