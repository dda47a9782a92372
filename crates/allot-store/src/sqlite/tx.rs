//! Every write statement of the SQLite store, run by the writer on its own thread over a
//! synchronous connection (rusqlite), inside the batch transaction.
//!
//! Why not sqlx here as for reads: sqlx sends each SQLite statement to a worker thread and
//! waits for the answer, a round trip of ~100 µs on these machines against a few µs of SQLite
//! work (`cargo bench -p allot-store --bench round_trip`). The writer runs every write of the
//! process one after another, so that round trip bounded the whole write path. Here a
//! statement is a call on the writer's own thread, and its prepared form is cached.

use std::path::Path;
use std::time::Duration;

use allot_app::StoreError;
use allot_app::access::{ApiKey, LAST_ADMIN, RoleGrant, RoleRevoke};
use allot_app::audit::AuditEvent;
use allot_app::store::{
    Decide, HoldCommand, HoldRefused, IdempotencyBegin, IdempotencyKey, IdempotencyMark, RefundKind, Role,
    RotateOutcome,
};
use allot_core::booking::{Booking, BookingStatus};
use allot_core::capacity::{self, Claim, Span};
use allot_core::ids::{ApiKeyId, BookingId, ResourceId, UserId};
use allot_core::inventory::{Event, Resource, Venue};
use futures::future::BoxFuture;
use jiff::Timestamp;
use rusqlite::types::Value;
use rusqlite::{Connection, ErrorCode, OptionalExtension, params, params_from_iter};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::access::{
    IS_ADMIN, NOT_A_MANAGER, RevokeStep, all_managers, parse_roles, revoke_step, roles_text, scopes_text, with, without,
};
use crate::cache::{self, INVALIDATE_ALL};
use crate::common::{
    ABANDON_CHANGED_SQL, ABANDON_UNCHANGED_SQL, AUDIT_COLUMNS, AUDIT_HEAD_SQL, DocTable, KeyFound, RefundRow, Rotation,
    Succession, VENUE_IN_USE, chain, claims_from_rows, decided, existing_key, hold_expiry, refund_queued, rotation,
};
use crate::writer::{Backend, HoldResults, KeyBegin, KeyBegun, KeyCompletion, TxnRef, WriteCtx, marks_fenced};

pub(crate) type Ctx = WriteCtx<Connection>;
pub(crate) type Outcome<T, E> = crate::writer::Outcome<T, E, rusqlite::Error>;
type Result<T> = std::result::Result<T, rusqlite::Error>;

/// Prepared statements kept per connection: the hold's claim insert has one shape per item
/// count, the rest are a few dozen fixed statements.
const STATEMENT_CACHE_CAPACITY: usize = 128;

/// Opens the writer's connection (the schema is already migrated): WAL, and `synchronous=FULL`
/// so a commit is on disk before the writer answers; a 2xx survives kill -9 and power loss
/// alike (I5).
pub(crate) fn open(path: &Path, busy_timeout: Duration) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(busy_timeout)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Savepoint journals in memory (else a batch's savepoints spill to temporary files); only a
    // rollback within the transaction reads them, durability is the WAL's.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    size_page_cache(&conn)?;
    // Checkpoints run on their own thread (`checkpoint`); this threshold is the backstop should
    // it fall behind, and what starts the WAL over under sustained writes (`checkpoint`'s header).
    conn.pragma_update(None, "wal_autocheckpoint", super::checkpoint::WRITER_AUTOCHECKPOINT_PAGES)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
    Ok(conn)
}

/// The writer's page cache while the database is small: 4 MiB (of 4 KiB pages).
const WRITER_CACHE_PAGES_SMALL: i64 = 1_024;
/// The writer's page cache once the database is large: 64 MiB, the hot indexes in memory.
const WRITER_CACHE_PAGES_LARGE: i64 = 16_384;
/// Batches between two looks at the database's size (one `PRAGMA page_count`).
const CACHE_CHECK_BATCHES: u32 = 1_024;

/// The writer's page cache for a database of `page_count` pages of `page_size` bytes.
///
/// When a B-tree split puts its pages in order, SQLite re-keys one of them for a moment to the
/// page of the pending byte (1 GiB in), and each COMMIT then truncates the page cache to the
/// database's size: while the database is smaller than 1 GiB less the cache's hash table, that
/// walks every bucket and every cached page, at nearly every commit under load (8 % of the
/// writer's samples with 64 MiB; docs/benchmarks-history.md). A small cache makes the walk short, a
/// large one saves reads once the walk is gone.
fn writer_cache_pages(page_count: i64, page_size: i64) -> i64 {
    const PENDING_BYTE: i64 = 0x4000_0000;
    let pending_page = PENDING_BYTE / page_size.max(512) + 1;
    if page_count + WRITER_CACHE_PAGES_LARGE >= pending_page {
        WRITER_CACHE_PAGES_LARGE
    } else {
        WRITER_CACHE_PAGES_SMALL
    }
}

/// Sets the writer's page cache for the database's size now ([`writer_cache_pages`]).
fn size_page_cache(conn: &Connection) -> Result<()> {
    let page_count: i64 = conn.pragma_query_value(None, "page_count", |r| r.get(0))?;
    let page_size: i64 = conn.pragma_query_value(None, "page_size", |r| r.get(0))?;
    let pages = writer_cache_pages(page_count, page_size);
    let current: i64 = conn.pragma_query_value(None, "cache_size", |r| r.get(0))?;
    if current != pages {
        conn.pragma_update(None, "cache_size", pages)?;
    }
    Ok(())
}

/// SQLite under the writer: `BEGIN IMMEDIATE` takes the database's write lock, so there is
/// nothing to lock per resource.
#[derive(Default)]
pub(crate) struct SqliteBackend {
    /// Batches begun, to look at the database's size every [`CACHE_CHECK_BATCHES`].
    batches: std::sync::atomic::AtomicU32,
}

impl Backend for SqliteBackend {
    type Conn = Connection;
    type Error = rusqlite::Error;

    fn error(e: rusqlite::Error) -> StoreError {
        match e.sqlite_error_code() {
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => StoreError::Busy(e.to_string()),
            _ => StoreError::Database(e.to_string()),
        }
    }

    fn begin<'c>(&'c self, conn: &'c mut Connection) -> BoxFuture<'c, Result<()>> {
        let batch = self.batches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if batch % CACHE_CHECK_BATCHES == CACHE_CHECK_BATCHES - 1
            && let Err(e) = size_page_cache(conn)
        {
            return Box::pin(std::future::ready(Err(e)));
        }
        self.execute(conn, "BEGIN IMMEDIATE")
    }

    fn execute<'c>(&'c self, conn: &'c mut Connection, sql: &'static str) -> BoxFuture<'c, Result<()>> {
        Box::pin(std::future::ready(execute_each(conn, sql)))
    }

    fn memo(&self) -> bool {
        true // This writer makes every change; each catalogue change drops what it touches.
    }

    fn seal<'c>(
        &'c self,
        conn: &'c mut Connection,
        _keys: &'c [String],
        _now: Timestamp,
        events: &'c mut [AuditEvent],
        marks: &'c [IdempotencyMark],
    ) -> BoxFuture<'c, Outcome<Option<TxnRef>, StoreError>> {
        // One writer: no clock to stamp. No `TxnRef`: the database is a local file, so a
        // COMMIT's answer cannot be lost on the way, and one that failed did not commit.
        Box::pin(std::future::ready(seal(conn, events, marks).map(|sealed| sealed.map(|()| None))))
    }

    fn holds<'c>(&'c self, ctx: &'c mut Ctx, holds: Vec<HoldCommand>) -> BoxFuture<'c, Result<HoldResults>> {
        // Statements here are calls, not round trips: each hold runs on its own, without a
        // savepoint, since a refused one has written nothing (an error fails the batch).
        Box::pin(async move { holds.into_iter().map(|command| hold(ctx, command)).collect() })
    }

    fn begin_keys<'c>(&'c self, ctx: &'c mut Ctx, begins: Vec<KeyBegin>) -> BoxFuture<'c, Result<KeyBegun>> {
        // One writer: no other batch holds a key's row, so a begin fails only with its batch.
        Box::pin(async move { begins.into_iter().map(|begin| idempotency_begin(ctx, begin).map(Ok)).collect() })
    }

    fn complete_keys<'c>(
        &'c self,
        conn: &'c mut Connection,
        completions: Vec<KeyCompletion>,
    ) -> BoxFuture<'c, Result<()>> {
        Box::pin(async move { idempotency_complete(conn, &completions) })
    }
}

/// A batch's marks, then its audit events; a mark whose key another attempt took over fails
/// the batch ([`marks_fenced`]).
fn seal(conn: &mut Connection, events: &mut [AuditEvent], marks: &[IdempotencyMark]) -> Outcome<(), StoreError> {
    if let Err(taken_over) = marks_fenced(marks, mark_idempotency_keys(conn, marks)?) {
        return Ok(Err(taken_over));
    }
    if !events.is_empty() {
        append_audit(conn, events)?;
    }
    Ok(Ok(()))
}

/// Runs `;`-separated statements, each prepared once per connection: a savepoint's end and the
/// next one's start run for every request, and parsing them each time was a visible share of
/// the writer's time.
fn execute_each(conn: &Connection, sql: &str) -> Result<()> {
    for statement in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        conn.prepare_cached(statement)?.execute([])?;
    }
    Ok(())
}

/// Row counts of the audit INSERTs kept prepared: a batch's events go in as statements of
/// these sizes, largest first. One statement per batch size was parsed afresh for every batch
/// (~4% of the writer's time under load), and one statement per row costs more than that.
const AUDIT_ROWS_PER_INSERT: [usize; 3] = [64, 8, 1];

/// The row counts of the INSERTs that write `events` audit rows: kept shapes, largest first.
fn audit_insert_rows(events: usize) -> impl Iterator<Item = usize> {
    let mut rest = events;
    std::iter::from_fn(move || {
        let rows = *AUDIT_ROWS_PER_INSERT.iter().find(|&&rows| rows <= rest)?;
        rest -= rows;
        Some(rows)
    })
}

/// One event's values for `INSERT INTO audit_events (AUDIT_COLUMNS)`, in column order.
fn audit_row(e: &AuditEvent) -> Result<[Value; 15]> {
    let text = |v: &Option<String>| v.clone().map_or(Value::Null, Value::Text);
    Ok([
        Value::Integer(i64::try_from(e.seq).map_err(encode_error)?),
        Value::Text(e.id.clone()),
        Value::Integer(e.at.as_second()),
        text(&e.actor_id),
        Value::Text(e.actor_role.clone()),
        text(&e.ip),
        text(&e.request_id),
        Value::Text(e.action.clone()),
        text(&e.target_id),
        text(&e.venue_id.map(|v| v.to_string())),
        Value::Text(e.outcome.as_str().to_owned()),
        text(&e.reason),
        Value::Text(to_json(&e.details)?),
        Value::Text(e.prev_hash.clone()),
        Value::Text(e.hash.clone()),
    ])
}

fn append_audit(conn: &mut Connection, events: &mut [AuditEvent]) -> Result<()> {
    // The one writer holds the database lock (BEGIN IMMEDIATE): the head cannot move.
    let (seq, hash): (i64, String) =
        conn.prepare_cached(AUDIT_HEAD_SQL)?.query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let (seq, hash) = chain(events, u64::try_from(seq).unwrap_or(0), hash);
    let mut rest: &[AuditEvent] = events;
    for rows in audit_insert_rows(events.len()) {
        let (now, later) = rest.split_at(rows);
        let mut values: Vec<Value> = Vec::with_capacity(rows * 15);
        for e in now {
            values.extend(audit_row(e)?);
        }
        // OR ROLLBACK: a statement that writes several rows and may abort gets a statement
        // journal (a copy of every page it is the first to touch); an error here fails the
        // commit anyway, so ending the transaction at once loses nothing.
        let sql = format!("INSERT OR ROLLBACK INTO audit_events ({AUDIT_COLUMNS}) VALUES {}", rows_of(15, rows));
        conn.prepare_cached(&sql)?.execute(params_from_iter(values))?;
        rest = later;
    }
    conn.prepare_cached("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1")?
        .execute(params![i64::try_from(seq).unwrap_or(i64::MAX), hash])?;
    Ok(())
}

/// Runs `sql`, prepared once and kept if `keep` (a shape that repeats), else prepared for this
/// call only: shapes that vary with a batch's size would push the hot statements out of the
/// connection's cache.
fn execute(conn: &Connection, sql: &str, keep: bool, values: Vec<Value>) -> Result<usize> {
    with_statement(conn, sql, keep, |stmt| stmt.execute(params_from_iter(values)))
}

/// Runs `run` on `sql` prepared as [`execute`] prepares it.
fn with_statement<T>(
    conn: &Connection,
    sql: &str,
    keep: bool,
    run: impl FnOnce(&mut rusqlite::Statement<'_>) -> Result<T>,
) -> Result<T> {
    if keep { run(&mut *conn.prepare_cached(sql)?) } else { run(&mut conn.prepare(sql)?) }
}

/// `(?, …, ?), …` for `rows` rows of `columns` placeholders.
fn rows_of(columns: usize, rows: usize) -> String {
    let row = format!("({})", vec!["?"; columns].join(", "));
    vec![row; rows].join(", ")
}

fn encode_error(e: impl std::error::Error + Send + Sync + 'static) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(Box::new(e))
}

pub(crate) fn to_json<T: Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(encode_error)
}

pub(crate) fn from_json<T: DeserializeOwned>(doc: &str) -> Result<T> {
    serde_json::from_str(doc).map_err(stored_error)
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
            || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY)
}

/// A write whose unique violation is the `conflict` refusal, not a database failure.
fn refusing_duplicates<T>(written: Result<T>, conflict: &str) -> Outcome<T, StoreError> {
    match written {
        Ok(value) => Ok(Ok(value)),
        Err(e) if is_unique_violation(&e) => Ok(Err(StoreError::Conflict(conflict.to_owned()))),
        Err(e) => Err(e),
    }
}

/// One statement with text parameters (`CAST` in the SQL where a column wants a number); a
/// unique violation is the `conflict` refusal.
pub(crate) fn exec(ctx: &mut Ctx, sql: &str, binds: &[Option<String>], conflict: &str) -> Outcome<u64, StoreError> {
    let written = ctx.conn.prepare_cached(sql)?.execute(params_from_iter(binds));
    refusing_duplicates(written.map(|n| n as u64), conflict)
}

pub(crate) const VENUE_DOCS: DocTable = DocTable {
    select: "SELECT doc FROM venues WHERE id = ? AND deleted_at IS NULL",
    update: "UPDATE venues SET doc = ? WHERE id = ?",
    what: "venue",
};

pub(crate) const RESOURCE_DOCS: DocTable = DocTable {
    select: "SELECT doc FROM resources WHERE id = ? AND deleted_at IS NULL",
    update: "UPDATE resources SET doc = ? WHERE id = ?",
    what: "resource",
};

/// Writes `after` over the live document `id` if the stored one still equals `before`
/// (compared as parsed, so a document an older version wrote compares by what it says).
pub(crate) fn replace_doc<T: DeserializeOwned + PartialEq>(
    ctx: &mut Ctx,
    table: &DocTable,
    id: &str,
    before: &T,
    after: &str,
) -> Outcome<(), StoreError> {
    let stored: Option<String> = ctx.conn.prepare_cached(table.select)?.query_row([id], |r| r.get(0)).optional()?;
    let Some(stored) = stored else { return Ok(Err(StoreError::NotFound(table.what))) };
    if from_json::<T>(&stored)? != *before {
        return Ok(Err(StoreError::Changed(table.what)));
    }
    ctx.conn.prepare_cached(table.update)?.execute([after, id])?;
    Ok(Ok(()))
}

/// Rotates or reissues a refresh token (see [`rotation`]).
pub(crate) fn succeed_refresh_token(
    ctx: &mut Ctx,
    succession: Succession,
    old_hash: &str,
    new_hash: &str,
    new_expires_at: Timestamp,
    now: Timestamp,
) -> Outcome<RotateOutcome, StoreError> {
    let now = ctx.now(now).as_second();
    let conn = &ctx.conn;
    let row = conn
        .prepare_cached(
            "SELECT user_id, family_id, expires_at, used_at, revoked_at FROM refresh_tokens WHERE token_hash = ?",
        )?
        .query_row([old_hash], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
        .optional()?;
    let (user_id, family) = match rotation(row, now, succession) {
        Rotation::Invalid => return Ok(Ok(RotateOutcome::Invalid)),
        Rotation::RevokeFamily(family) => {
            conn.prepare_cached("UPDATE refresh_tokens SET revoked_at = ? WHERE family_id = ? AND revoked_at IS NULL")?
                .execute(params![now, family])?;
            return Ok(Ok(RotateOutcome::Reused));
        }
        Rotation::Rotate { user_id, family } => (user_id, family),
    };
    conn.prepare_cached("UPDATE refresh_tokens SET used_at = ? WHERE token_hash = ?")?
        .execute(params![now, old_hash])?;
    conn.prepare_cached("INSERT INTO refresh_tokens (token_hash, user_id, family_id, expires_at) VALUES (?, ?, ?, ?)")?
        .execute(params![new_hash, user_id, family, new_expires_at.as_second()])?;
    let user_id = user_id.parse().map_err(encode_error)?;
    Ok(Ok(RotateOutcome::Rotated { user_id }))
}

pub(crate) fn insert_venue(ctx: &mut Ctx, id: &str, doc: &str, managers: &[String]) -> Outcome<(), StoreError> {
    let inserted = ctx.conn.prepare_cached("INSERT INTO venues (id, doc) VALUES (?, ?)")?.execute([id, doc]);
    if let Err(refused) = refusing_duplicates(inserted, "venue exists")? {
        return Ok(Err(refused));
    }
    // After the insert, as on PostgreSQL (whose check follows its managers' lock).
    let mut roles = Vec::with_capacity(managers.len());
    for user in managers.iter().collect::<std::collections::BTreeSet<_>>() {
        roles.extend(roles_of(&ctx.conn, user)?);
    }
    if !all_managers(managers, &roles) {
        return Ok(Err(StoreError::Forbidden(NOT_A_MANAGER)));
    }
    let mut manage =
        ctx.conn.prepare_cached("INSERT OR IGNORE INTO venue_managers (venue_id, user_id) VALUES (?, ?)")?;
    for user in managers {
        manage.execute([id, user.as_str()])?;
    }
    Ok(Ok(()))
}

pub(crate) fn delete_venue(ctx: &mut Ctx, id: &str, now: Timestamp) -> Outcome<(), StoreError> {
    ctx.memo.invalidate(INVALIDATE_ALL);
    let at = ctx.now(now).as_second();
    // Bookings in the past do not keep a venue alive, nor lapsed holds; current and future
    // bookings do.
    let active: Option<i64> = ctx
        .conn
        .prepare_cached(
            "SELECT 1 FROM claim_totals c JOIN resources r ON r.id = c.resource_id
             WHERE r.venue_id = ?1 AND c.block_end > ?2 AND c.expires_at > ?2 LIMIT 1",
        )?
        .query_row(params![id, at], |r| r.get(0))
        .optional()?;
    if active.is_some() {
        return Ok(Err(StoreError::Conflict(VENUE_IN_USE.into())));
    }
    for sql in [
        "UPDATE venues SET deleted_at = ? WHERE id = ? AND deleted_at IS NULL",
        "UPDATE resources SET deleted_at = ? WHERE venue_id = ? AND deleted_at IS NULL",
        "UPDATE events SET deleted_at = ? WHERE venue_id = ? AND deleted_at IS NULL",
    ] {
        ctx.conn.prepare_cached(sql)?.execute(params![at, id])?;
    }
    Ok(Ok(()))
}

pub(crate) fn delete_resource(ctx: &mut Ctx, id: &str, now: Timestamp) -> Outcome<(), StoreError> {
    ctx.memo.invalidate(&cache::key("resource", id));
    let at = ctx.now(now).as_second();
    let active: Option<i64> = ctx
        .conn
        .prepare_cached(
            "SELECT 1 FROM claim_totals WHERE resource_id = ?1 AND block_end > ?2 AND expires_at > ?2 LIMIT 1",
        )?
        .query_row(params![id, at], |r| r.get(0))
        .optional()?;
    if active.is_some() {
        return Ok(Err(StoreError::Conflict("the resource has current or future bookings".into())));
    }
    let n = ctx
        .conn
        .prepare_cached("UPDATE resources SET deleted_at = ? WHERE id = ? AND deleted_at IS NULL")?
        .execute(params![at, id])?;
    Ok(if n == 0 { Err(StoreError::NotFound("resource")) } else { Ok(()) })
}

/// Whether venue `id` is live: nothing is created under a deleted one, whatever the request
/// read before its write.
fn venue_is_live(conn: &Connection, id: &str) -> Result<bool> {
    conn.prepare_cached("SELECT 1 FROM venues WHERE id = ? AND deleted_at IS NULL")?.exists([id])
}

pub(crate) fn insert_resource(ctx: &mut Ctx, id: &str, venue: &str, doc: &str) -> Outcome<(), StoreError> {
    if !venue_is_live(&ctx.conn, venue)? {
        return Ok(Err(StoreError::NotFound("venue")));
    }
    let inserted = ctx
        .conn
        .prepare_cached("INSERT INTO resources (id, venue_id, doc) VALUES (?, ?, ?)")?
        .execute(params![id, venue, doc]);
    refusing_duplicates(inserted.map(|_| ()), "resource exists")
}

pub(crate) fn insert_event(ctx: &mut Ctx, event: &Event) -> Outcome<(), StoreError> {
    if !venue_is_live(&ctx.conn, &event.venue_id.to_string())? {
        return Ok(Err(StoreError::NotFound("venue")));
    }
    let id = event.id.to_string();
    let (start, end) = (event.start.as_second(), event.end.as_second());
    ctx.conn
        .prepare_cached("INSERT INTO events (id, venue_id, start_at, end_at, doc) VALUES (?, ?, ?, ?, ?)")?
        .execute(params![id, event.venue_id.to_string(), start, end, to_json(event)?])?;
    let mut seat = ctx
        .conn
        .prepare_cached("INSERT INTO event_seats (resource_id, start_at, event_id, end_at) VALUES (?, ?, ?, ?)")?;
    for resource in &event.seat_ids {
        seat.execute(params![resource.to_string(), start, id, end])?;
    }
    Ok(Ok(()))
}

/// The statement [`live_claims`] runs; the read pool runs the same one (`claims`).
/// Binds: resource, span end, span start, now. The range starts at `span start - the longest
/// claim the resource ever had` (`claim_longest`): no claim starting earlier can reach the span.
pub(crate) const LIVE_CLAIMS_SQL: &str = "SELECT block_start, block_end, quantity FROM claim_totals
     WHERE resource_id = ?1 AND block_start < ?2
       AND block_start > ?3 - COALESCE((SELECT seconds FROM claim_longest WHERE resource_id = ?1), 0)
       AND block_end > ?3 AND expires_at > ?4";

/// Claims on a resource that count at `now`, overlapping `span`: summed per block and expiry
/// (`claim_totals`), which is all the capacity rule needs and stays small on a hot resource.
fn live_claims(conn: &Connection, resource: ResourceId, span: Span, now: Timestamp) -> Result<Vec<Claim>> {
    let mut stmt = conn.prepare_cached(LIVE_CLAIMS_SQL)?;
    let rows = stmt
        .query_map(params![resource.to_string(), span.end, span.start, now.as_second()], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?
        .collect::<Result<Vec<(i64, i64, i64)>>>()?;
    Ok(claims_from_rows(rows))
}

/// A live resource and its venue's zone as this transaction sees them: from the writer's memo
/// (every change to either drops it there), else read in one statement.
fn resource_in_tx(ctx: &mut Ctx, id: ResourceId) -> Result<Option<(Resource, jiff::tz::TimeZone)>> {
    let key = cache::key("resource", id);
    if let Some(hit) = ctx.memo.get::<(Resource, jiff::tz::TimeZone)>(&key) {
        return Ok(Some(hit));
    }
    let docs: Option<(String, String)> = ctx
        .conn
        .prepare_cached(
            "SELECT r.doc, v.doc FROM resources r JOIN venues v ON v.id = r.venue_id AND v.deleted_at IS NULL
             WHERE r.id = ? AND r.deleted_at IS NULL",
        )?
        .query_row([id.to_string()], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((resource_doc, venue_doc)) = docs else { return Ok(None) };
    let found = (from_json::<Resource>(&resource_doc)?, from_json::<Venue>(&venue_doc)?.tz());
    ctx.memo.put(ctx.memo.generation(), key, found.clone());
    Ok(Some(found))
}

/// The hold transaction: for each item, read the live claims of its resource and let the core
/// decide (I1); only when every item fits are the claims written (I3), so a refusal has
/// written nothing and needs no savepoint.
pub(crate) fn hold(ctx: &mut Ctx, command: HoldCommand) -> Outcome<Booking, HoldRefused> {
    let now = ctx.now(command.now);
    let mut booking = command.booking;
    // Claims this booking takes, inserted together at the end: an item on a resource an
    // earlier item also uses is checked against that item's claim as well.
    let mut taken: Vec<(ResourceId, Claim)> = Vec::with_capacity(booking.items.len());
    for (i, (item, claim)) in booking.items.iter().zip(&command.claims).enumerate() {
        let Some((resource, tz)) = resource_in_tx(ctx, item.resource_id)? else {
            return Ok(Err(HoldRefused::Stale { item_index: i }));
        };
        if resource.venue_id != booking.venue_id {
            return Ok(Err(HoldRefused::Stale { item_index: i }));
        }
        let mut existing = live_claims(&ctx.conn, item.resource_id, claim.span, now)?;
        existing.extend(taken.iter().filter(|(r, _)| *r == item.resource_id).map(|(_, c)| *c));
        if let Err(shortfall) = capacity::check_claim(&resource.capacity_rules(&tz), &existing, *claim) {
            return Ok(Err(HoldRefused::Unavailable { item_index: i, remaining: shortfall.remaining }));
        }
        taken.push((item.resource_id, *claim));
    }
    booking.decided_at(command.now, now);
    insert_hold(&ctx.conn, &booking, &taken, now)?;
    Ok(Ok(booking))
}

/// The claims, booking and outbox row of a new hold.
fn insert_hold(conn: &Connection, booking: &Booking, taken: &[(ResourceId, Claim)], now: Timestamp) -> Result<()> {
    let booking_id = booking.id.to_string();
    let hold_expires_at = booking.expires_at.map(|t| t.as_second());
    let doc = to_json(booking)?;
    let mut values: Vec<Value> = Vec::with_capacity(taken.len() * 7);
    for (item, (resource_id, claim)) in booking.items.iter().zip(taken) {
        values.extend([
            Value::Text(item.id.to_string()),
            Value::Text(booking_id.clone()),
            Value::Text(resource_id.to_string()),
            Value::Integer(claim.span.start),
            Value::Integer(claim.span.end),
            Value::Integer(i64::from(claim.quantity)),
            hold_expires_at.map_or(Value::Null, Value::Integer),
        ]);
    }
    let sql = format!(
        "INSERT INTO claims (item_id, booking_id, resource_id, block_start, block_end, quantity, hold_expires_at)
         VALUES {}",
        rows_of(7, taken.len())
    );
    conn.prepare_cached(&sql)?.execute(params_from_iter(values))?;
    // The document once: the booking row and the `booking.held` event both name this version.
    let doc_seq = insert_doc(conn, &doc)?;
    conn.prepare_cached(
        "INSERT INTO bookings (id, customer_id, venue_id, status, expires_at, updated_at, doc_seq)
         VALUES (?, ?, ?, ?, ?, ?, ?)",
    )?
    .execute(params![
        booking_id,
        booking.customer_id.to_string(),
        booking.venue_id.to_string(),
        booking.status.as_str(),
        hold_expires_at,
        booking.updated_at.to_string(),
        doc_seq
    ])?;
    conn.prepare_cached(
        "INSERT INTO outbox (topic, aggregate_id, doc_seq, created_at) VALUES ('booking.held', ?, ?, ?)",
    )?
    .execute(params![booking_id, doc_seq, now.as_second()])?;
    Ok(())
}

/// Appends a version of a booking's document: its `seq`. Versions are never changed or
/// deleted, so an event naming one keeps the booking as it was (migration 0011).
fn insert_doc(conn: &Connection, doc: &str) -> Result<i64> {
    conn.prepare_cached("INSERT INTO booking_docs (doc) VALUES (?)")?.execute([doc])?;
    Ok(conn.last_insert_rowid())
}

/// A status change decided by `decide` on the booking as this transaction sees it.
pub(crate) fn update_booking(
    ctx: &mut Ctx,
    id: BookingId,
    now: Timestamp,
    decide: Decide,
) -> Outcome<Booking, allot_app::store::UpdateRefused> {
    let now = ctx.now(now);
    let row: Option<(String, String, String)> = ctx
        .conn
        .prepare_cached(super::BOOKING_BY_ID)?
        .query_row([id.to_string()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let Some((status, updated_at, doc)) = row else {
        return Ok(Err(allot_app::store::UpdateRefused::NotFound));
    };
    let before = super::stored_booking(&status, &updated_at, &doc).map_err(stored_error)?;
    let after = match decided(&before, decide, now) {
        Ok(after) => after,
        Err(refused) => return Ok(Err(refused)),
    };
    apply_change(&ctx.conn, &before, &after, now)?;
    Ok(Ok(after))
}

/// Lapsed holds read and released by one group of statements.
const EXPIRY_CHUNK_ROWS: u32 = 100;
/// How long one expiry job may keep the writer: every request of its batch and every one
/// queued behind it waits for it, so a storm of lapsed holds is released in slices that keep
/// hold latency bounded. The app keeps two jobs queued, so every batch of a storm has one
/// slice: its length trades release time for hold p99 (`docs/benchmarks-history.md`, expiry).
pub(crate) const EXPIRY_JOB_MILLIS_MAX: u64 = 2;

/// Releases up to `limit` holds whose time ran out by `now`, in chunks, stopping early once
/// `budget` ([`EXPIRY_JOB_MILLIS_MAX`] but in tests) is spent (the caller asks again while any
/// were released): their ids. No resource's claims change here, so no seat version moves: a
/// lapsed claim stopped counting at its expiry, before the release, and every seat map that
/// showed it was kept only until then.
pub(crate) fn expire_due(
    ctx: &mut Ctx,
    now: Timestamp,
    limit: u32,
    budget: std::time::Duration,
) -> Outcome<Vec<BookingId>, StoreError> {
    let now = ctx.now(now);
    let mut ids = Vec::new();
    in_chunks(limit, budget, |chunk| {
        let released_before = ids.len();
        let read = expire_chunk(&ctx.conn, now, chunk, &mut ids)?;
        let released = ids.len() - released_before;
        // No more lapsed rows, or only rows that cannot lapse (read again, they would loop).
        Ok((released, read == chunk as usize && released > 0))
    })?;
    Ok(Ok(ids))
}

/// Runs `step` over chunks of at most [`EXPIRY_CHUNK_ROWS`] rows until `limit` are done, a
/// step says none may be left, or `budget` is spent: how many were done. `step` gets the
/// chunk's size and returns how many it did and whether more may be left.
fn in_chunks(
    limit: u32,
    budget: std::time::Duration,
    mut step: impl FnMut(u32) -> Result<(usize, bool)>,
) -> Result<usize> {
    let started = std::time::Instant::now();
    let mut done = 0;
    while done < limit as usize {
        let (did, more) = step(EXPIRY_CHUNK_ROWS.min(limit - done as u32))?;
        done += did;
        if !more || started.elapsed() >= budget {
            break;
        }
    }
    Ok(done)
}

/// Releases up to `chunk` lapsed holds, adding their ids to `ids`: how many rows were read.
/// The core decides each from the status and expiry columns; the statements then change the
/// rows, write the outbox rows and queue the claims for a purge, so no document is read or
/// written (parsing and re-writing each one was 13 % of the writer's time in a storm of
/// lapsed holds, and writing them back most of its WAL: `docs/benchmarks-history.md`).
fn expire_chunk(conn: &Connection, now: Timestamp, chunk: u32, ids: &mut Vec<BookingId>) -> Result<usize> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, status, expires_at FROM bookings
         WHERE status IN ('held', 'pending_payment') AND expires_at <= ? ORDER BY expires_at LIMIT ?",
    )?;
    type Row = (String, String, Option<i64>);
    let rows = stmt
        .query_map(params![now.as_second(), i64::from(chunk)], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<Vec<Row>>>()?;
    drop(stmt);
    let mut released = Vec::with_capacity(rows.len());
    for (id, status, expires_at) in &rows {
        let status = BookingStatus::parse(status).ok_or_else(|| stored_error(format!("status {status:?}")))?;
        let expires_at = expires_at.map(Timestamp::from_second).transpose().map_err(stored_error)?;
        let Some(after) = status.on_expiry(expires_at, now) else { continue };
        // The statements below end the hold: no expiry left, its claims queued for a purge.
        assert!(!after.claims_capacity() && !after.expires(), "an expired booking holds nothing");
        ids.push(id.parse().map_err(stored_error)?);
        released.push((after, Value::Text(id.clone())));
    }
    // One status for all in practice (`Expired`), so one group of statements.
    released.sort_by_key(|(after, _)| after.as_str());
    for group in released.chunk_by(|a, b| a.0 == b.0) {
        let ids: Vec<Value> = group.iter().map(|(_, id)| id.clone()).collect();
        release(conn, group[0].0, ids, now)?;
    }
    Ok(rows.len())
}

/// Writes the bookings `ids` released to `status`: their rows (not their documents: the row's
/// status and `updated_at` are read over the document's), one outbox row each, and the
/// bookings queued for [`purge_released_claims`] (their claims, lapsed, stay until then).
fn release(conn: &Connection, status: BookingStatus, ids: Vec<Value>, now: Timestamp) -> Result<()> {
    // The outbox row's payload is the booking as stored only because no transition leaves it.
    assert!(status.is_final(), "a released booking never changes again");
    let keep = repeats(ids.len());
    let placeholders = vec!["?"; ids.len()].join(", ");
    // Not an `UPDATE … FROM (VALUES …)`: that form materializes every new row in a temporary
    // b-tree first.
    let sql =
        format!("UPDATE bookings SET status = ?1, expires_at = NULL, updated_at = ?2 WHERE id IN ({placeholders})");
    let head = [Value::Text(status.as_str().to_owned()), Value::Text(now.to_string())];
    execute(conn, &sql, keep, head.into_iter().chain(ids.iter().cloned()).collect())?;
    let sql = format!(
        "INSERT INTO outbox (topic, aggregate_id, payload, created_at)
         SELECT 'booking.' || status, id, NULL, ? FROM bookings WHERE id IN ({placeholders})"
    );
    let head = Value::Integer(now.as_second());
    execute(conn, &sql, keep, std::iter::once(head).chain(ids.iter().cloned()).collect())?;
    let values = vec!["(?)"; ids.len()].join(", ");
    execute(conn, &format!("INSERT INTO released_claims (booking_id) VALUES {values}"), keep, ids)?;
    Ok(())
}

/// Deletes the claims of up to `limit` released bookings, in chunks, stopping early once
/// `budget` is spent: how many bookings' claims it deleted. Their totals rows go whole (every
/// claim summed into one has lapsed: the row's `expires_at` is theirs, and it is past), so the
/// per-claim totals trigger skips these claims.
pub(crate) fn purge_released_claims(
    ctx: &mut Ctx,
    now: Timestamp,
    limit: u32,
    budget: std::time::Duration,
) -> Outcome<usize, StoreError> {
    let now = ctx.now(now);
    let purged = in_chunks(limit, budget, |chunk| {
        let done = purge_chunk(&ctx.conn, now, chunk)?;
        Ok((done, done == chunk as usize))
    })?;
    Ok(Ok(purged))
}

fn purge_chunk(conn: &Connection, now: Timestamp, chunk: u32) -> Result<usize> {
    let ids: Vec<Value> = conn
        .prepare_cached("SELECT booking_id FROM released_claims ORDER BY booking_id LIMIT ?")?
        .query_map([i64::from(chunk)], |r| r.get::<_, String>(0).map(Value::Text))?
        .collect::<Result<_>>()?;
    if ids.is_empty() {
        return Ok(0);
    }
    let keep = repeats(ids.len());
    let placeholders = vec!["?"; ids.len()].join(", ");
    let sql = format!(
        "DELETE FROM claim_totals WHERE (resource_id, block_start, block_end, expires_at) IN
           (SELECT resource_id, block_start, block_end, hold_expires_at FROM claims
            WHERE booking_id IN ({placeholders}) AND hold_expires_at <= ?)"
    );
    let lapsed_by = Value::Integer(now.as_second());
    execute(conn, &sql, keep, ids.iter().cloned().chain(std::iter::once(lapsed_by)).collect())?;
    // Checked as they go: a claim that has not lapsed would leave its total counting. The
    // error rolls the whole job back.
    let sql = format!("DELETE FROM claims WHERE booking_id IN ({placeholders}) RETURNING hold_expires_at");
    with_statement(conn, &sql, keep, |stmt| delete_lapsed(stmt, &ids, now))?;
    let n = ids.len();
    execute(conn, &format!("DELETE FROM released_claims WHERE booking_id IN ({placeholders})"), keep, ids)?;
    Ok(n)
}

/// Runs a claims `DELETE … RETURNING hold_expires_at` over `ids`, failing if any deleted claim
/// had not lapsed by `now`.
fn delete_lapsed(stmt: &mut rusqlite::Statement<'_>, ids: &[Value], now: Timestamp) -> Result<()> {
    let mut expiries = stmt.query(params_from_iter(ids.iter()))?;
    while let Some(row) = expiries.next()? {
        if row.get::<_, Option<i64>>(0)?.is_none_or(|at| at > now.as_second()) {
            return Err(stored_error("a released booking's claim has not lapsed"));
        }
    }
    Ok(())
}

/// A stored value (document, status, id) that does not parse as what it should be.
fn stored_error(e: impl std::fmt::Display) -> rusqlite::Error {
    let message = format!("a stored value does not parse: {e}");
    rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, message.into())
}

/// Writes one booking's status change and keeps the claims table in step: the booking row,
/// its claims deleted (released) or re-stamped (kept), an outbox row for the event it
/// announces (`Booking::event_topic`).
fn apply_change(conn: &Connection, before: &Booking, after: &Booking, now: Timestamp) -> Result<()> {
    // A `booking.expired` event's payload is the booking as stored (`release`).
    assert!(
        !before.status.is_final() || after == before || before.settles_refund(after) || before.fails_refund(after),
        "a booking in a final status does not change but for its refund's reference or failure"
    );
    let id = after.id.to_string();
    let expiry = hold_expiry(after);
    // A new version, not the old one rewritten: an earlier event may name the old one.
    let doc_seq = insert_doc(conn, &to_json(after)?)?;
    // `RETURNING` so that a missing row fails the change (no rows), as before versions.
    conn.prepare_cached(
        "UPDATE bookings SET status = ?, expires_at = ?, updated_at = ?, doc_seq = ? WHERE id = ? RETURNING seq",
    )?
    .query_row(params![after.status.as_str(), expiry, after.updated_at.to_string(), doc_seq, id], |_| Ok(()))?;
    if after.status.claims_capacity() {
        conn.prepare_cached("UPDATE claims SET hold_expires_at = ? WHERE booking_id = ?")?
            .execute(params![expiry, id])?;
    } else if before.status.claims_capacity() {
        conn.prepare_cached("DELETE FROM claims WHERE booking_id = ?")?.execute([&id])?;
    }
    if let Some(topic) = before.event_topic(after) {
        conn.prepare_cached("INSERT INTO outbox (topic, aggregate_id, doc_seq, created_at) VALUES (?, ?, ?, ?)")?
            .execute(params![topic, id, doc_seq, now.as_second()])?;
    }
    queue_refund_owed(conn, before, after, now)
}

/// Keeps a cancellation's refund queued exactly while the booking owes it
/// (`RefundKind::Cancellation`): from the change that owes it to the one that records it made.
fn queue_refund_owed(conn: &Connection, before: &Booking, after: &Booking, now: Timestamp) -> Result<()> {
    let kind = RefundKind::Cancellation.as_str();
    match (before.refund_owed(), after.refund_owed()) {
        (None, Some((reference, amount))) => {
            let (attempts, next_at) = refund_queued(after, now);
            conn.prepare_cached(
                "INSERT INTO refunds_due (payment_reference, kind, booking_id, amount, attempts, next_at)
                 VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            )?
            .execute(params![reference, kind, after.id.to_string(), amount, attempts, next_at])?;
        }
        (Some((reference, _)), None) => {
            conn.prepare_cached("DELETE FROM refunds_due WHERE payment_reference = ? AND kind = ?")?
                .execute(params![reference, kind])?;
        }
        _ => {}
    }
    Ok(())
}

/// `Store::claim_refunds_due`: the due rows, read and leased in one transaction of the one
/// writer, so no other sweep can take them in between.
pub(crate) fn claim_refunds_due(
    ctx: &mut Ctx,
    now: Timestamp,
    lease_until: Timestamp,
    attempts_max: u32,
    limit: u32,
) -> Outcome<Vec<RefundRow>, StoreError> {
    let mut rows: Vec<RefundRow> = ctx
        .conn
        .prepare_cached(
            "SELECT kind, payment_reference, booking_id, amount, attempts, next_at FROM refunds_due
             WHERE next_at <= ? AND attempts < ? ORDER BY next_at LIMIT ?",
        )?
        .query_map(params![now.as_second(), attempts_max, limit], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut lease =
        ctx.conn.prepare_cached("UPDATE refunds_due SET next_at = ? WHERE payment_reference = ? AND kind = ?")?;
    for (kind, reference, _, _, _, next_at) in &mut rows {
        lease.execute(params![lease_until.as_second(), &*reference, &*kind])?;
        *next_at = lease_until.as_second();
    }
    Ok(Ok(rows))
}

/// Whether a statement of `rows` rows repeats often enough to keep prepared: one booking's, and
/// an expiry job's full chunk (parsing those afresh was ~10% of the writer's time in a storm of
/// lapsed holds; one statement per row instead costs more than the parsing, measured).
fn repeats(rows: usize) -> bool {
    rows == 1 || rows == EXPIRY_CHUNK_ROWS as usize
}

/// Takes or reads attempt `begin.key`'s key ([`Backend::begin_keys`]).
fn idempotency_begin(ctx: &mut Ctx, begin: KeyBegin) -> Result<IdempotencyBegin> {
    let KeyBegin { key, now, lock_seconds } = begin;
    let now = ctx.now(now).as_second();
    let row = ctx
        .conn
        .prepare_cached(crate::common::key_row_sql!())?
        .query_row([&key.principal, &key.key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
        .optional()?;
    let begun = match existing_key(row, &key.request_hash, now) {
        KeyFound::Answer(found) => return Ok(found),
        KeyFound::TakeOver(begun) => begun,
    };
    ctx.conn
        .prepare_cached(
            "INSERT INTO idempotency_keys (principal, key, request_hash, created_at, locked_until, owner)
             VALUES (?, ?, ?, ?, ?, ?)
             ON CONFLICT (principal, key) DO UPDATE SET request_hash = excluded.request_hash,
               locked_until = excluded.locked_until, created_at = excluded.created_at, owner = excluded.owner",
        )?
        .execute(params![key.principal, key.key, key.request_hash, now, now + i64::from(lock_seconds), key.owner])?;
    Ok(begun)
}

/// Stores the answers of `completions` ([`Backend::complete_keys`]).
fn idempotency_complete(conn: &Connection, completions: &[KeyCompletion]) -> Result<()> {
    let mut statement = conn.prepare_cached(
        "UPDATE idempotency_keys SET status = ?, body = ?, locked_until = NULL
         WHERE principal = ? AND key = ? AND owner = ? AND status IS NULL",
    )?;
    for KeyCompletion { key, status, body } in completions {
        statement.execute(params![i64::from(*status), body, key.principal, key.key, key.owner])?;
    }
    Ok(())
}

pub(crate) fn idempotency_abandon(ctx: &mut Ctx, key: &IdempotencyKey) -> Outcome<(), StoreError> {
    let args = params![key.principal, key.key, key.owner];
    for sql in [ABANDON_UNCHANGED_SQL, ABANDON_CHANGED_SQL] {
        ctx.conn.prepare_cached(sql)?.execute(args)?;
    }
    Ok(Ok(()))
}

pub(crate) fn idempotency_renew(
    ctx: &mut Ctx,
    key: &IdempotencyKey,
    locked_until: Timestamp,
) -> Outcome<bool, StoreError> {
    let renewed = ctx
        .conn
        .prepare_cached(
            "UPDATE idempotency_keys SET locked_until = ?
             WHERE principal = ? AND key = ? AND owner = ? AND status IS NULL",
        )?
        .execute(params![locked_until.as_second(), key.principal, key.key, key.owner])?;
    Ok(Ok(renewed == 1))
}

/// Writes a batch's idempotency marks, in the transaction of the changes they stand for, each
/// only where its attempt still holds the key: how many were written.
pub(crate) fn mark_idempotency_keys(conn: &Connection, marks: &[IdempotencyMark]) -> Result<u64> {
    if marks.is_empty() {
        return Ok(0);
    }
    let mut statement = conn.prepare_cached(
        "UPDATE idempotency_keys SET committed_target = ?
         WHERE principal = ? AND key = ? AND owner = ? AND status IS NULL",
    )?;
    let mut marked = 0;
    for mark in marks {
        marked += statement.execute(params![mark.target, mark.principal, mark.key, mark.owner])? as u64;
    }
    Ok(marked)
}

fn roles_of(conn: &Connection, user: &str) -> Result<Option<Vec<Role>>> {
    let roles: Option<String> =
        conn.prepare_cached("SELECT roles FROM users WHERE id = ?")?.query_row([user], |r| r.get(0)).optional()?;
    Ok(roles.as_deref().map(parse_roles))
}

fn set_roles(conn: &Connection, user: &str, roles: &[Role]) -> Result<()> {
    conn.prepare_cached("UPDATE users SET roles = ? WHERE id = ?")?.execute([roles_text(roles).as_str(), user])?;
    Ok(())
}

/// Role changes read the user's roles and write them back in the writer's transaction, which
/// already serializes every write: two changes of one user cannot lose each other.
pub(crate) fn grant_role(ctx: &mut Ctx, user: UserId, grant: RoleGrant) -> Outcome<(), StoreError> {
    let user = user.to_string();
    let Some(roles) = roles_of(&ctx.conn, &user)? else {
        return Ok(Err(StoreError::NotFound("user")));
    };
    let role = match grant {
        RoleGrant::Customer => Role::Customer,
        RoleGrant::Admin => Role::Admin,
        RoleGrant::Manager(venue) => {
            ctx.conn
                .prepare_cached("INSERT OR IGNORE INTO venue_managers (venue_id, user_id) VALUES (?, ?)")?
                .execute([venue.to_string(), user.clone()])?;
            Role::Manager
        }
    };
    set_roles(&ctx.conn, &user, &with(roles, role))?;
    Ok(Ok(()))
}

pub(crate) fn revoke_role(ctx: &mut Ctx, user: UserId, revoke: RoleRevoke) -> Outcome<(), StoreError> {
    let user = user.to_string();
    let conn = &ctx.conn;
    let Some(roles) = roles_of(conn, &user)? else {
        return Ok(Err(StoreError::NotFound("user")));
    };
    let roles = match revoke_step(roles.clone(), revoke) {
        RevokeStep::Roles(r) => r,
        RevokeStep::LastAdminCheck(r) => {
            let sql = format!("SELECT COUNT(*) FROM users WHERE {IS_ADMIN}");
            let admins: i64 = conn.prepare_cached(&sql)?.query_row([], |r| r.get(0))?;
            if admins <= 1 {
                return Ok(Err(StoreError::Conflict(LAST_ADMIN.to_owned())));
            }
            r
        }
        RevokeStep::Venue(venue) => {
            let deleted = conn
                .prepare_cached("DELETE FROM venue_managers WHERE user_id = ? AND venue_id = ?")?
                .execute([&user, &venue])?;
            let left: i64 = conn
                .prepare_cached("SELECT COUNT(*) FROM venue_managers WHERE user_id = ?")?
                .query_row([&user], |r| r.get(0))?;
            if deleted > 0 && left == 0 { without(roles, Role::Manager) } else { roles }
        }
        RevokeStep::AllVenues(r) => {
            conn.prepare_cached("DELETE FROM venue_managers WHERE user_id = ?")?.execute([&user])?;
            r
        }
    };
    set_roles(conn, &user, &roles)?;
    Ok(Ok(()))
}

pub(crate) fn insert_api_key(ctx: &mut Ctx, key: &ApiKey) -> Outcome<(), StoreError> {
    let inserted = ctx
        .conn
        .prepare_cached(
            "INSERT INTO api_keys (id, name, key_hash, scopes, created_by, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        )?
        .execute(params![
            key.id.to_string(),
            key.name,
            key.key_hash,
            scopes_text(&key.scopes),
            key.created_by.to_string(),
            key.created_at.as_second()
        ]);
    Ok(refusing_duplicates(inserted, "API key exists")?.map(|_| ()))
}

pub(crate) fn revoke_api_key(ctx: &mut Ctx, id: ApiKeyId, now: Timestamp) -> Outcome<(), StoreError> {
    let now = ctx.now(now).as_second();
    let changed = ctx
        .conn
        .prepare_cached("UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?")?
        .execute(params![now, id.to_string()])?;
    Ok(if changed == 0 { Err(StoreError::NotFound("API key")) } else { Ok(()) })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use allot_core::booking::{BookingItem, Payment};
    use allot_core::ids::{ItemId, UserId, VenueId};
    use allot_core::inventory::Currency;
    use jiff::SignedDuration;

    use super::*;
    use crate::common::expired;

    fn migrated() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        for m in super::super::MIGRATOR.iter() {
            conn.execute_batch(m.sql.as_str()).unwrap();
        }
        conn
    }

    /// A hold whose document has everything serde may write in more than one way: escapes,
    /// non-ASCII text, a timestamp with nanoseconds, nulls, nested objects.
    fn awkward_hold(now: Timestamp) -> Booking {
        let item = |hours: i64| BookingItem {
            id: ItemId::new(),
            resource_id: ResourceId::new(),
            event_id: None,
            start: now + SignedDuration::from_hours(hours),
            end: now + SignedDuration::from_hours(hours + 2),
            quantity: 2,
            unit_price: 1_250,
            price: 2_500,
        };
        let currency = Currency::try_from("EUR".to_owned()).unwrap();
        let expires_at = now + SignedDuration::from_secs(60);
        let items = vec![item(24), item(48)];
        let mut hold = Booking::new_hold(UserId::new(), VenueId::new(), currency, items, now, expires_at);
        hold.payment = Some(Payment {
            provider: "fake\\pay".into(),
            reference: "réf \"№ 7\" \u{1F600}\n\t/".into(),
            amount: 2_500,
            status: "requires_action".into(),
        });
        hold
    }

    /// 4 KiB pages put the pending byte on page 262 145: below it by more than the large
    /// cache's hash table, a commit would walk that table, so the cache stays small.
    #[test]
    fn the_writer_cache_is_small_until_the_database_nears_the_pending_byte_page() {
        let walk_free = 262_145 - WRITER_CACHE_PAGES_LARGE;
        assert_eq!(writer_cache_pages(0, 4_096), WRITER_CACHE_PAGES_SMALL);
        assert_eq!(writer_cache_pages(walk_free - 1, 4_096), WRITER_CACHE_PAGES_SMALL);
        assert_eq!(writer_cache_pages(walk_free, 4_096), WRITER_CACHE_PAGES_LARGE);
        assert_eq!(writer_cache_pages(2_000_000, 4_096), WRITER_CACHE_PAGES_LARGE);
        // 1 KiB pages: the pending byte's page is 1 048 577.
        assert_eq!(writer_cache_pages(500_000, 1_024), WRITER_CACHE_PAGES_SMALL);
        assert_eq!(writer_cache_pages(1_048_577 - WRITER_CACHE_PAGES_LARGE, 1_024), WRITER_CACHE_PAGES_LARGE);

        let dir = std::env::temp_dir().join(format!("allot-cache-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let conn = open(&dir.join("fresh.db"), std::time::Duration::from_secs(1)).unwrap();
        let pages: i64 = conn.pragma_query_value(None, "cache_size", |r| r.get(0)).unwrap();
        assert_eq!(pages, WRITER_CACHE_PAGES_SMALL, "a fresh database starts with the small cache");
        drop(conn);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A hold's document is stored once, and its `booking.held` event names it; a change
    /// appends a version, so that event still announces the booking as it was held.
    #[test]
    fn a_changed_booking_keeps_its_earlier_events_payloads() {
        let conn = migrated();
        let made = Timestamp::from_second(1_800_000_000).unwrap();
        let hold = awkward_hold(made);
        let claim = |i: &BookingItem| Claim { span: Span::new(i.start.as_second(), i.end.as_second()), quantity: 2 };
        let taken: Vec<_> = hold.items.iter().map(|i| (i.resource_id, claim(i))).collect();
        insert_hold(&conn, &hold, &taken, made).unwrap();
        assert_eq!(count(&conn, "booking_docs"), 1, "one document for the booking and its event");
        let payload: Option<String> = conn.query_row("SELECT payload FROM outbox", [], |r| r.get(0)).unwrap();
        assert_eq!(payload, None, "the event names the document instead of copying it");

        let later = made + SignedDuration::from_secs(30);
        let mut confirmed = hold.clone();
        confirmed.status = BookingStatus::Confirmed;
        confirmed.expires_at = None;
        confirmed.updated_at = later;
        apply_change(&conn, &hold, &confirmed, later).unwrap();

        let (status, updated_at, doc): (String, String, String) = conn
            .query_row(super::super::BOOKING_BY_ID, [hold.id.to_string()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap();
        assert_eq!(super::super::stored_booking(&status, &updated_at, &doc).unwrap(), confirmed);
        let mut stmt = conn.prepare("SELECT topic, payload FROM outbox_events ORDER BY seq").unwrap();
        let events: Vec<(String, String)> =
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().collect::<Result<_>>().unwrap();
        let events: Vec<(&str, Booking)> =
            events.iter().map(|(t, p)| (t.as_str(), from_json::<Booking>(p).unwrap())).collect();
        assert_eq!(events, vec![("booking.held", hold), ("booking.confirmed", confirmed)]);
    }

    /// The expiry job writes the rows, not the documents: the booking read back, and the
    /// event announcing it, must be what the domain's transition makes of the hold.
    #[test]
    fn a_released_hold_reads_and_is_announced_as_the_expired_booking() {
        let conn = migrated();
        let made = Timestamp::from_second(1_800_000_000).unwrap() + SignedDuration::from_nanos(123_456_789);
        let hold = awkward_hold(made);
        let claim = |i: &BookingItem| Claim { span: Span::new(i.start.as_second(), i.end.as_second()), quantity: 2 };
        let taken: Vec<_> = hold.items.iter().map(|i| (i.resource_id, claim(i))).collect();
        insert_hold(&conn, &hold, &taken, made).unwrap();

        let now = made + SignedDuration::new(61, 987_654_321);
        let mut ids = Vec::new();
        assert_eq!(expire_chunk(&conn, now, 100, &mut ids).unwrap(), 1);
        assert_eq!(ids, vec![hold.id]);

        let want = expired(&hold, now).unwrap();
        let (status, expiry): (String, Option<i64>) =
            conn.query_row("SELECT status, expires_at FROM bookings", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        assert_eq!((status.as_str(), expiry), ("expired", None));
        let (status, updated_at, doc): (String, String, String) = conn
            .query_row(super::super::BOOKING_BY_ID, [hold.id.to_string()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap();
        assert_eq!(super::super::stored_booking(&status, &updated_at, &doc).unwrap(), want);
        let (topic, payload): (String, String) = conn
            .query_row("SELECT topic, payload FROM outbox_events WHERE topic = 'booking.expired'", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!(topic, "booking.expired");
        assert_eq!(from_json::<Booking>(&payload).unwrap(), want);
        assert_eq!(expire_chunk(&conn, now, 100, &mut Vec::new()).unwrap(), 0);

        assert_eq!(count(&conn, "claims"), 2, "the lapsed claims stay until purged");
        assert_eq!(purge_chunk(&conn, now, 100).unwrap(), 1);
        let left = count(&conn, "claims") + count(&conn, "claim_totals") + count(&conn, "released_claims");
        assert_eq!(left, 0, "the claims, their totals and the queue entry are gone");
        assert_eq!(purge_chunk(&conn, now, 100).unwrap(), 0);
    }

    fn count(conn: &Connection, table: &str) -> i64 {
        conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0)).unwrap()
    }

    /// A booking with one claim of `quantity` on resource `r`, block 0..60, lapsing at
    /// `expires_at`.
    fn claim(conn: &Connection, booking: &str, quantity: i64, expires_at: i64) {
        conn.execute(
            "INSERT INTO bookings (id, customer_id, venue_id, status, expires_at, updated_at)
             VALUES (?1, 'u', 'v', 'held', ?2, '2026-01-01T00:00:00Z')",
            params![booking, expires_at],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO claims (item_id, booking_id, resource_id, block_start, block_end, quantity, hold_expires_at)
             VALUES (?1 || '-item', ?1, 'r', 0, 60, ?2, ?3)",
            params![booking, quantity, expires_at],
        )
        .unwrap();
    }

    fn totals(conn: &Connection) -> Vec<(i64, i64)> {
        let mut stmt = conn.prepare("SELECT expires_at, quantity FROM claim_totals ORDER BY 1").unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().collect::<Result<_>>().unwrap()
    }

    /// A purge deletes the totals rows of the claims it purges whole: rows of lapsed claims
    /// only, so another booking's lapsed claim in the same row loses nothing that counts, and
    /// a live row on the same resource and block is left as it was.
    #[test]
    fn a_purge_drops_only_lapsed_totals_and_later_deletes_find_them_gone() {
        let conn = migrated();
        claim(&conn, "a", 2, 100);
        claim(&conn, "b", 3, 100);
        claim(&conn, "live", 4, 500);
        assert_eq!(totals(&conn), vec![(100, 5), (500, 4)]);
        release(&conn, BookingStatus::Expired, vec![Value::Text("a".into())], at(200)).unwrap();
        assert_eq!(purge_chunk(&conn, at(200), 100).unwrap(), 1);
        assert_eq!(totals(&conn), vec![(500, 4)], "the lapsed row went whole, the live one is untouched");

        // `b` lapsed in the same row: its release and purge, or a cancel's delete through the
        // trigger, find the row gone and leave the live one alone.
        conn.execute("DELETE FROM claims WHERE booking_id = 'b'", []).unwrap();
        assert_eq!(totals(&conn), vec![(500, 4)]);
        conn.execute("DELETE FROM claims WHERE booking_id = 'live'", []).unwrap();
        assert_eq!(totals(&conn), vec![], "a claim not queued for a purge still counts down through the trigger");
    }

    /// A purge refuses a released booking whose claims have not lapsed, leaving its totals:
    /// it would otherwise take back capacity that still counts.
    #[test]
    fn a_purge_refuses_a_claim_that_has_not_lapsed() {
        let conn = migrated();
        claim(&conn, "early", 1, 500);
        conn.execute("INSERT INTO released_claims (booking_id) VALUES ('early')", []).unwrap();
        conn.execute_batch("SAVEPOINT op").unwrap();
        assert!(purge_chunk(&conn, at(200), 100).is_err());
        conn.execute_batch("ROLLBACK TO op").unwrap();
        assert_eq!(totals(&conn), vec![(500, 1)]);
        assert_eq!(count(&conn, "claims"), 1);
    }

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).unwrap()
    }

    #[test]
    fn audit_rows_go_in_as_few_kept_shapes_adding_up_to_the_batch() {
        for events in 0..=1_100 {
            let shapes: Vec<usize> = audit_insert_rows(events).collect();
            assert_eq!(shapes.iter().sum::<usize>(), events, "every event written once ({events})");
            assert!(shapes.iter().all(|rows| AUDIT_ROWS_PER_INSERT.contains(rows)));
            assert!(shapes.is_sorted_by(|a, b| a >= b), "largest first");
            assert!(shapes.len() <= events / 64 + 7 + 7, "{events} events took {} statements", shapes.len());
        }
    }
}
