//! Read-only inspection of a database from outside the server, for tools that check what a
//! run left behind (the load generator's "nothing oversold, every acknowledgement stored").
//!
//! It opens its own connection (read-only on SQLite), never the store's writer, so it can run
//! beside a live server. Ids are returned as the store keeps them (32 hex digits).

use std::str::FromStr;

use allot_app::StoreError;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Connection, PgConnection, SqliteConnection};

use crate::writer::db_error;

/// Rows fetched per query, so a venue with millions of bookings is read in bounded pieces.
const PAGE_ROWS_MAX: i64 = 50_000;

/// One claim as stored: it counts against `resource_id` over `block_start..block_end` until
/// `hold_expires_at` (never, once confirmed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRow {
    pub booking_id: String,
    pub resource_id: String,
    pub block_start: i64,
    pub block_end: i64,
    pub quantity: i64,
    pub hold_expires_at: Option<i64>,
}

/// Every booking (id, status) and every claim on a venue's resources.
#[derive(Debug, Default)]
pub struct VenueSnapshot {
    pub bookings: Vec<(String, String)>,
    pub claims: Vec<ClaimRow>,
}

/// Reads `venue_id`'s bookings and claims from the database at `url` (`sqlite://…` or
/// `postgres://…`).
pub async fn venue_snapshot(url: &str, venue_id: uuid::Uuid) -> Result<VenueSnapshot, StoreError> {
    let venue = venue_id.as_simple().to_string();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let mut conn = PgConnection::connect(url).await.map_err(db_error)?;
        snapshot_pg(&mut conn, &venue).await.map_err(db_error)
    } else {
        let path = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")).unwrap_or(url);
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{path}")).map_err(db_error)?.read_only(true);
        let mut conn = SqliteConnection::connect_with(&options).await.map_err(db_error)?;
        snapshot_sqlite(&mut conn, &venue).await.map_err(db_error)
    }
}

type ClaimTuple = (String, String, String, i64, i64, i64, Option<i64>);

fn claim_row((_, booking_id, resource_id, block_start, block_end, quantity, hold_expires_at): ClaimTuple) -> ClaimRow {
    ClaimRow { booking_id, resource_id, block_start, block_end, quantity, hold_expires_at }
}

// The two functions differ only in placeholders and the claims join (PostgreSQL keeps the
// venue on each claim); both page by primary key.
async fn snapshot_sqlite(conn: &mut SqliteConnection, venue: &str) -> Result<VenueSnapshot, sqlx::Error> {
    let mut out = VenueSnapshot::default();
    let mut after = String::new();
    loop {
        let page: Vec<(String, String)> =
            sqlx::query_as("SELECT id, status FROM bookings WHERE venue_id = ? AND id > ? ORDER BY id LIMIT ?")
                .bind(venue)
                .bind(&after)
                .bind(PAGE_ROWS_MAX)
                .fetch_all(&mut *conn)
                .await?;
        let Some(last) = page.last() else { break };
        after = last.0.clone();
        out.bookings.extend(page);
    }
    // SQLite keys claims by (booking_id, item_id) (migration 0008).
    let (mut after_booking, mut after_item) = (String::new(), String::new());
    loop {
        let page: Vec<ClaimTuple> = sqlx::query_as(
            "SELECT c.item_id, c.booking_id, c.resource_id, c.block_start, c.block_end, c.quantity, c.hold_expires_at
             FROM claims c JOIN resources r ON r.id = c.resource_id
             WHERE r.venue_id = ? AND (c.booking_id, c.item_id) > (?, ?) ORDER BY c.booking_id, c.item_id LIMIT ?",
        )
        .bind(venue)
        .bind(&after_booking)
        .bind(&after_item)
        .bind(PAGE_ROWS_MAX)
        .fetch_all(&mut *conn)
        .await?;
        let Some(last) = page.last() else { break };
        (after_item, after_booking) = (last.0.clone(), last.1.clone());
        out.claims.extend(page.into_iter().map(claim_row));
    }
    Ok(out)
}

async fn snapshot_pg(conn: &mut PgConnection, venue: &str) -> Result<VenueSnapshot, sqlx::Error> {
    let mut out = VenueSnapshot::default();
    let mut after = String::new();
    loop {
        let page: Vec<(String, String)> =
            sqlx::query_as("SELECT id, status FROM bookings WHERE venue_id = $1 AND id > $2 ORDER BY id LIMIT $3")
                .bind(venue)
                .bind(&after)
                .bind(PAGE_ROWS_MAX)
                .fetch_all(&mut *conn)
                .await?;
        let Some(last) = page.last() else { break };
        after = last.0.clone();
        out.bookings.extend(page);
    }
    let mut after = String::new();
    loop {
        let page: Vec<ClaimTuple> = sqlx::query_as(
            "SELECT item_id, booking_id, resource_id, block_start, block_end, quantity, hold_expires_at
             FROM claims WHERE venue_id = $1 AND item_id > $2 ORDER BY item_id LIMIT $3",
        )
        .bind(venue)
        .bind(&after)
        .bind(PAGE_ROWS_MAX)
        .fetch_all(&mut *conn)
        .await?;
        let Some(last) = page.last() else { break };
        after = last.0.clone();
        out.claims.extend(page.into_iter().map(claim_row));
    }
    Ok(out)
}
