//! The SQLite implementation of the Store port: reads on a small pool of read-only
//! connections, every write through the group-commit [`Writer`].

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use allot_app::StoreError;
use allot_app::access::{ApiKey, RoleGrant, RoleRevoke};
use allot_app::audit::{AuditEvent, AuditFilter, AuditPage};
use allot_app::store::{
    BookingFilter, Decide, HoldCommand, HoldRefused, IdempotencyBegin, IdempotencyKey, Page, PageRequest, RefreshToken,
    RotateOutcome, SeatState, Store, UpdateRefused, User,
};
use allot_core::booking::Booking;
use allot_core::capacity::{self, CLAIM_SECONDS_MAX, Claim, Span};
use allot_core::ids::{ApiKeyId, BookingId, EventId, ResourceId, UserId, VenueId};
use allot_core::inventory::{Event, Resource, Venue};
use async_trait::async_trait;
use futures::future::BoxFuture;
use jiff::Timestamp;
use serde::de::DeserializeOwned;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, QueryBuilder, Sqlite, SqliteConnection};

use crate::access;
use crate::cache::{self, Cache, INVALIDATE_ALL};
use crate::common::venue_inserted;
use crate::common::{
    AUDIT_HEAD_SQL, AuditRow, KeyRow, Rotation, TokenRow, USER_COLUMNS, UserVenuesRow, VENUE_IN_USE, add_seat_states,
    after_key, audit_events_of, audit_head_of, audit_insert, audit_range_query, audit_rotation, audit_select, chain,
    claims_from_rows, decided, docs_to_page, existing_key, expired, from_json, from_json_db, hold_expiry,
    is_unique_violation, rotation, to_json, ts, user_of_venues_row,
};
use crate::writer::{Backend, Outcome, WriteCtx, Writer, db_error};

type Ctx = WriteCtx<SqliteConnection>;

/// SQLite under the writer: one connection, `BEGIN IMMEDIATE` takes the database's write lock,
/// so there is nothing to lock per resource.
pub(crate) struct SqliteBackend;

impl Backend for SqliteBackend {
    type Conn = SqliteConnection;

    fn begin<'c>(&'c self, conn: &'c mut SqliteConnection) -> BoxFuture<'c, Result<(), sqlx::Error>> {
        self.execute(conn, "BEGIN IMMEDIATE")
    }

    fn execute<'c>(
        &'c self,
        conn: &'c mut SqliteConnection,
        sql: &'static str,
    ) -> BoxFuture<'c, Result<(), sqlx::Error>> {
        Box::pin(async move { sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(conn).await.map(|_| ()) })
    }

    fn memo(&self) -> bool {
        true // This writer makes every change; each catalogue change drops what it touches.
    }

    fn append_audit<'c>(
        &'c self,
        conn: &'c mut SqliteConnection,
        events: &'c mut [AuditEvent],
    ) -> BoxFuture<'c, Result<(), sqlx::Error>> {
        Box::pin(async move {
            // The one writer holds the database lock (BEGIN IMMEDIATE): the head cannot move.
            let (seq, hash): (i64, String) = sqlx::query_as(AUDIT_HEAD_SQL).fetch_one(&mut *conn).await?;
            let (seq, hash) = chain(events, u64::try_from(seq).unwrap_or(0), hash);
            audit_insert::<Sqlite>(events)?.build().execute(&mut *conn).await?;
            sqlx::query("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1")
                .bind(i64::try_from(seq).unwrap_or(i64::MAX))
                .bind(hash)
                .execute(conn)
                .await
                .map(|_| ())
        })
    }
}

pub const READ_POOL_CONNECTIONS_MAX: u32 = 8;
pub const BUSY_TIMEOUT_SECONDS: u64 = 10;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Rotates a refresh token in the writer's transaction (see [`rotation`]).
async fn rotate_in_tx(
    ctx: &mut Ctx,
    old_hash: String,
    new_hash: String,
    new_expires_at: Timestamp,
    now: Timestamp,
) -> Outcome<RotateOutcome, StoreError> {
    let now = ctx.now(now).as_second();
    let row: Option<TokenRow> = sqlx::query_as(
        "SELECT user_id, family_id, expires_at, used_at, revoked_at FROM refresh_tokens WHERE token_hash = ?",
    )
    .bind(&old_hash)
    .fetch_optional(&mut ctx.conn)
    .await?;
    let (user_id, family) = match rotation(row, now) {
        Rotation::Invalid => return Ok(Ok(RotateOutcome::Invalid)),
        Rotation::RevokeFamily(family) => {
            sqlx::query("UPDATE refresh_tokens SET revoked_at = ? WHERE family_id = ? AND revoked_at IS NULL")
                .bind(now)
                .bind(&family)
                .execute(&mut ctx.conn)
                .await?;
            return Ok(Ok(RotateOutcome::Reused));
        }
        Rotation::Rotate { user_id, family } => (user_id, family),
    };
    sqlx::query("UPDATE refresh_tokens SET used_at = ? WHERE token_hash = ?")
        .bind(now)
        .bind(&old_hash)
        .execute(&mut ctx.conn)
        .await?;
    sqlx::query("INSERT INTO refresh_tokens (token_hash, user_id, family_id, expires_at) VALUES (?, ?, ?, ?)")
        .bind(&new_hash)
        .bind(&user_id)
        .bind(&family)
        .bind(new_expires_at.as_second())
        .execute(&mut ctx.conn)
        .await?;
    let user_id = user_id.parse().map_err(|_| sqlx::Error::Protocol("bad user id".into()))?;
    Ok(Ok(RotateOutcome::Rotated { user_id }))
}

pub struct SqliteStore {
    read: SqlitePool,
    writer: Writer<SqliteBackend>,
    /// Catalogue documents; this process makes every change, and drops an entry once its
    /// change has committed.
    cache: Cache,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `url` (`sqlite://path`), applies migrations
    /// and starts the writer.
    pub async fn open(url: &str) -> Result<SqliteStore, StoreError> {
        let path = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")).unwrap_or(url);
        if let Some(dir) = std::path::Path::new(path).parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Database(format!("creating {}: {e}", dir.display())))?;
        }
        let base = SqliteConnectOptions::from_str(&format!("sqlite://{path}"))
            .map_err(db_error)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit is on disk before the writer answers, so a 2xx survives kill -9
            // and power loss alike (I5).
            .synchronous(SqliteSynchronous::Full)
            // Savepoint (statement) journals in memory: a batch's savepoints spill to temporary
            // files otherwise, a write and a close per batch. Only rollback within a
            // transaction reads them; durability is the WAL's.
            .pragma("temp_store", "memory")
            // 64 MiB of page cache per connection (default 2 MiB): the hot indexes stay in memory.
            .pragma("cache_size", "-65536")
            .busy_timeout(Duration::from_secs(BUSY_TIMEOUT_SECONDS))
            .foreign_keys(true);
        let mut conn = SqliteConnection::connect_with(&base).await.map_err(db_error)?;
        MIGRATOR.run(&mut conn).await.map_err(|e| StoreError::Database(format!("migrations: {e}")))?;
        let read = SqlitePoolOptions::new()
            .max_connections(READ_POOL_CONNECTIONS_MAX)
            .connect_with(base.read_only(true))
            .await
            .map_err(db_error)?;
        let cache = Cache::default();
        cache.set_enabled(true);
        Ok(SqliteStore { read, writer: Writer::start(conn, SqliteBackend), cache })
    }

    /// `(transactions, requests)` the writer has committed or attempted since start.
    pub fn write_stats(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering;
        (self.writer.stats.transactions.load(Ordering::Relaxed), self.writer.stats.requests.load(Ordering::Relaxed))
    }

    /// Counts rows of a table; for tests and diagnostics.
    pub async fn count(&self, table: &str, where_clause: &str) -> Result<i64, StoreError> {
        let sql = format!("SELECT COUNT(*) FROM {table} WHERE {where_clause}");
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_one(&self.read).await.map_err(db_error)
    }
}

/// Claims on a resource that count at `now`, overlapping `span`: summed per block and expiry
/// (`claim_totals`), which is all the capacity rule needs and stays small on a hot resource.
async fn live_claims<'e, E>(
    executor: E,
    resource: ResourceId,
    span: Span,
    now: Timestamp,
) -> Result<Vec<Claim>, sqlx::Error>
where
    E: sqlx::Executor<'e, Database = Sqlite>,
{
    let rows: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT block_start, block_end, quantity FROM claim_totals
         WHERE resource_id = ? AND block_start < ? AND block_start > ? AND block_end > ? AND expires_at > ?",
    )
    .bind(resource.to_string())
    .bind(span.end)
    .bind(span.start - CLAIM_SECONDS_MAX)
    .bind(span.start)
    .bind(now.as_second())
    .fetch_all(executor)
    .await?;
    Ok(claims_from_rows(rows))
}

async fn load_booking(conn: &mut SqliteConnection, id: &str) -> Result<Option<Booking>, sqlx::Error> {
    let doc: Option<String> =
        sqlx::query_scalar("SELECT doc FROM bookings WHERE id = ?").bind(id).fetch_optional(conn).await?;
    doc.map(|d| from_json_db(&d)).transpose()
}

/// Writes a status change and keeps the claims table in step with it.
async fn apply_change(
    conn: &mut SqliteConnection,
    before: &Booking,
    after: &Booking,
    now: Timestamp,
) -> Result<(), sqlx::Error> {
    apply_changes(conn, &[(before.clone(), after.clone())], now).await
}

/// Bookings whose status changes are written together: at most four statements for all of
/// them (each statement is a round trip to SQLite's worker thread), 4 variables per booking
/// in the largest, far below `SQLITE_MAX_VARIABLE_NUMBER`.
const CHANGES_PER_CALL_MAX: usize = 1_000;

/// [`apply_change`] for many bookings, as set-based statements: bookings updated from a
/// `VALUES` list, released claims deleted, kept claims re-stamped, one outbox row per changed
/// status.
async fn apply_changes(
    conn: &mut SqliteConnection,
    changes: &[(Booking, Booking)],
    now: Timestamp,
) -> Result<(), sqlx::Error> {
    for chunk in changes.chunks(CHANGES_PER_CALL_MAX) {
        // Only the one-booking shapes repeat often enough to keep prepared.
        let single = chunk.len() == 1;
        let rows: Vec<(String, &Booking, String)> = chunk
            .iter()
            .map(|(_, after)| Ok((after.id.to_string(), after, to_json(after)?)))
            .collect::<Result<_, sqlx::Error>>()?;
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new("WITH v(id, status, expires_at, doc) AS (");
        qb.push_values(&rows, |mut row, (id, after, doc)| {
            row.push_bind(id).push_bind(after.status.as_str()).push_bind(hold_expiry(after)).push_bind(doc);
        });
        qb.push(") UPDATE bookings SET status = v.status, expires_at = v.expires_at, doc = v.doc FROM v WHERE bookings.id = v.id");
        qb.build().persistent(single).execute(&mut *conn).await?;

        let released: Vec<&str> = chunk
            .iter()
            .zip(&rows)
            .filter(|((before, after), _)| before.status.claims_capacity() && !after.status.claims_capacity())
            .map(|(_, (id, _, _))| id.as_str())
            .collect();
        if !released.is_empty() {
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new("DELETE FROM claims WHERE booking_id IN (");
            let mut ids = qb.separated(", ");
            for id in &released {
                ids.push_bind(*id);
            }
            qb.push(")");
            qb.build().persistent(single).execute(&mut *conn).await?;
        }
        let kept: Vec<(&str, Option<i64>)> = rows
            .iter()
            .filter(|(_, after, _)| after.status.claims_capacity())
            .map(|(id, after, _)| (id.as_str(), hold_expiry(after)))
            .collect();
        if !kept.is_empty() {
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new("WITH v(id, expires_at) AS (");
            qb.push_values(&kept, |mut row, (id, expiry)| {
                row.push_bind(*id).push_bind(*expiry);
            });
            qb.push(") UPDATE claims SET hold_expires_at = v.expires_at FROM v WHERE claims.booking_id = v.id");
            qb.build().persistent(single).execute(&mut *conn).await?;
        }
        let events: Vec<(String, &str, &str)> = chunk
            .iter()
            .zip(&rows)
            .filter(|((before, after), _)| before.status != after.status)
            .map(|((_, after), (id, _, doc))| (format!("booking.{}", after.status.as_str()), id.as_str(), doc.as_str()))
            .collect();
        if !events.is_empty() {
            let mut qb: QueryBuilder<Sqlite> =
                QueryBuilder::new("INSERT INTO outbox (topic, aggregate_id, payload, created_at) ");
            qb.push_values(&events, |mut row, (topic, id, doc)| {
                row.push_bind(topic.as_str()).push_bind(*id).push_bind(*doc).push_bind(now.as_second());
            });
            qb.build().persistent(single).execute(&mut *conn).await?;
        }
    }
    Ok(())
}

impl SqliteStore {
    /// The one user whose `column` equals `value`.
    async fn user_where(&self, column: &'static str, value: String) -> Result<Option<User>, StoreError> {
        let sql = format!(
            "SELECT {USER_COLUMNS}, (SELECT group_concat(venue_id, ',') FROM venue_managers WHERE user_id = users.id)
             FROM users WHERE {column} = ?"
        );
        let row: Option<UserVenuesRow> =
            sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(value).fetch_optional(&self.read).await.map_err(db_error)?;
        row.map(user_of_venues_row).transpose()
    }

    /// The document `sql` (taking the id) selects, through the cache.
    async fn cached_doc<T>(&self, kind: &str, sql: &'static str, id: String) -> Result<Option<T>, StoreError>
    where
        T: DeserializeOwned + Clone + Send + Sync + 'static,
    {
        let load = async {
            let doc: Option<String> =
                sqlx::query_scalar(sql).bind(id.clone()).fetch_optional(&self.read).await.map_err(db_error)?;
            doc.map(|d| from_json::<T>(&d)).transpose()
        };
        self.cache.get_or_load(cache::key(kind, &id), load).await
    }

    /// Passes `result` on after dropping `key` from the cache (the change it reports, if any,
    /// has committed).
    fn invalidating<T>(&self, key: &str, result: T) -> T {
        self.cache.invalidate(key);
        result
    }

    async fn docs_page<T: DeserializeOwned>(
        &self,
        sql: &'static str,
        venue: Option<VenueId>,
        page: PageRequest,
    ) -> Result<Page<T>, StoreError> {
        let mut q = sqlx::query_as::<_, (String, String)>(sql);
        if let Some(v) = venue {
            q = q.bind(v.to_string());
        }
        let rows =
            q.bind(after_key(&page)).bind(i64::from(page.limit) + 1).fetch_all(&self.read).await.map_err(db_error)?;
        docs_to_page(rows, page.limit)
    }

    /// Writes one statement through the writer, mapping a unique violation to `Conflict`.
    async fn exec_one(
        &self,
        sql: &'static str,
        binds: Vec<Option<String>>,
        conflict: &'static str,
    ) -> Result<u64, StoreError> {
        self.exec_dropping(sql, binds, conflict, None).await
    }

    /// Like [`SqliteStore::exec_one`] for a catalogue change: drops `memo_key` (a
    /// [`cache::key`] or [`INVALIDATE_ALL`]) from the writer's memo in the same request.
    async fn exec_dropping(
        &self,
        sql: &'static str,
        binds: Vec<Option<String>>,
        conflict: &'static str,
        memo_key: Option<String>,
    ) -> Result<u64, StoreError> {
        let result = self
            .writer
            .exec(move |ctx: &mut Ctx| -> BoxFuture<'_, Outcome<u64, StoreError>> {
                Box::pin(async move {
                    if let Some(key) = memo_key {
                        ctx.memo.invalidate(&key);
                    }
                    let mut q = sqlx::query(sql);
                    for b in binds {
                        q = q.bind(b);
                    }
                    match q.execute(&mut ctx.conn).await {
                        Ok(r) => Ok(Ok(r.rows_affected())),
                        Err(e) if is_unique_violation(&e) => Ok(Err(StoreError::Conflict(conflict.to_owned()))),
                        Err(e) => Err(e),
                    }
                })
            })
            .await?;
        Ok(result)
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn ready(&self) -> Result<(), StoreError> {
        let applied: Vec<(i64, Vec<u8>, bool)> =
            sqlx::query_as("SELECT version, checksum, success FROM _sqlx_migrations")
                .fetch_all(&self.read)
                .await
                .map_err(db_error)?;
        crate::common::migrations_applied(&MIGRATOR, &applied)
    }

    async fn insert_user(&self, user: &User) -> Result<(), StoreError> {
        let roles: Vec<&str> = user.roles.iter().map(|r| r.as_str()).collect();
        self.exec_one(
            "INSERT INTO users (id, email, name, password_hash, roles, created_at) VALUES (?, ?, ?, ?, ?, CAST(? AS INTEGER))",
            vec![
                Some(user.id.to_string()),
                Some(user.email.clone()),
                Some(user.name.clone()),
                Some(user.password_hash.clone()),
                Some(roles.join(",")),
                Some(user.created_at.as_second().to_string()),
            ],
            "an account with this e-mail already exists",
        )
        .await
        .map(|_| ())
    }

    async fn user_by_email(&self, email: &str) -> Result<Option<User>, StoreError> {
        self.user_where("email", email.to_owned()).await
    }

    async fn user_by_id(&self, id: UserId) -> Result<Option<User>, StoreError> {
        self.user_where("id", id.to_string()).await
    }

    async fn set_manager(&self, venue_id: VenueId, user_id: UserId) -> Result<(), StoreError> {
        self.exec_one(
            "INSERT OR IGNORE INTO venue_managers (venue_id, user_id) VALUES (?, ?)",
            vec![Some(venue_id.to_string()), Some(user_id.to_string())],
            "already a manager",
        )
        .await
        .map(|_| ())
    }

    async fn insert_refresh_token(&self, token: &RefreshToken) -> Result<(), StoreError> {
        self.exec_one(
            "INSERT INTO refresh_tokens (token_hash, user_id, family_id, expires_at) VALUES (?, ?, ?, CAST(? AS INTEGER))",
            vec![
                Some(token.token_hash.clone()),
                Some(token.user_id.to_string()),
                Some(token.family_id.clone()),
                Some(token.expires_at.as_second().to_string()),
            ],
            "duplicate token",
        )
        .await
        .map(|_| ())
    }

    async fn rotate_refresh_token(
        &self,
        old_hash: &str,
        new_hash: &str,
        new_expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<RotateOutcome, StoreError> {
        let (old_hash, new_hash) = (old_hash.to_owned(), new_hash.to_owned());
        let audit = allot_app::audit::current();
        self.writer
            .exec(move |ctx: &mut Ctx| -> BoxFuture<'_, Outcome<RotateOutcome, StoreError>> {
                Box::pin(async move {
                    let outcome = rotate_in_tx(ctx, old_hash, new_hash, new_expires_at, now).await?;
                    audit_rotation(audit.as_ref(), &outcome);
                    Ok(outcome)
                })
            })
            .await
    }

    async fn revoke_refresh_token(&self, token_hash: &str, now: Timestamp) -> Result<(), StoreError> {
        // Logout ends the token's whole family: no rotated descendant stays valid.
        self.exec_one(
            "UPDATE refresh_tokens SET revoked_at = CAST(? AS INTEGER)
             WHERE revoked_at IS NULL AND family_id = (SELECT family_id FROM refresh_tokens WHERE token_hash = ?)",
            vec![Some(now.as_second().to_string()), Some(token_hash.to_owned())],
            "",
        )
        .await
        .map(|_| ())
    }

    async fn setting_or_insert(&self, key: &str, value: &str) -> Result<String, StoreError> {
        self.exec_one(
            "INSERT OR IGNORE INTO settings (key, value) VALUES (?, ?)",
            vec![Some(key.to_owned()), Some(value.to_owned())],
            "",
        )
        .await?;
        sqlx::query_scalar("SELECT value FROM settings WHERE key = ?")
            .bind(key)
            .fetch_one(&self.read)
            .await
            .map_err(db_error)
    }

    async fn set_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.exec_one(
            "INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            vec![Some(key.to_owned()), Some(value.to_owned())],
            "",
        )
        .await
        .map(|_| ())
    }

    async fn insert_venue(&self, venue: &Venue) -> Result<(), StoreError> {
        let doc = serde_json::to_string(venue).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let (id, managers) = (venue.id.to_string(), venue.managers.iter().map(ToString::to_string).collect::<Vec<_>>());
        self.writer
            .exec(move |ctx: &mut Ctx| -> BoxFuture<'_, Outcome<(), StoreError>> {
                Box::pin(async move {
                    let inserted = sqlx::query("INSERT INTO venues (id, doc) VALUES (?, ?)")
                        .bind(&id)
                        .bind(doc)
                        .execute(&mut ctx.conn)
                        .await;
                    if let Err(refused) = venue_inserted(inserted)? {
                        return Ok(Err(refused));
                    }
                    for user in managers {
                        sqlx::query("INSERT OR IGNORE INTO venue_managers (venue_id, user_id) VALUES (?, ?)")
                            .bind(&id)
                            .bind(user)
                            .execute(&mut ctx.conn)
                            .await?;
                    }
                    Ok(Ok(()))
                })
            })
            .await
    }

    async fn update_venue(&self, venue: &Venue) -> Result<(), StoreError> {
        let doc = serde_json::to_string(venue).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        // A venue's zone is memoised with each of its resources: drop them all.
        let n = self
            .exec_dropping(
                "UPDATE venues SET doc = ? WHERE id = ? AND deleted_at IS NULL",
                vec![Some(doc), Some(venue.id.to_string())],
                "",
                Some(INVALIDATE_ALL.to_owned()),
            )
            .await;
        let n = self.invalidating(&cache::key("venue", venue.id), n)?;
        if n == 0 { Err(StoreError::NotFound("venue")) } else { Ok(()) }
    }

    async fn delete_venue(&self, id: VenueId, now: Timestamp) -> Result<(), StoreError> {
        let key = INVALIDATE_ALL.to_owned();
        let id = id.to_string();
        let result = self
            .writer
            .exec(move |ctx: &mut Ctx| -> BoxFuture<'_, Outcome<(), StoreError>> {
                Box::pin(async move {
                    ctx.memo.invalidate(INVALIDATE_ALL);
                    let at = ctx.now(now).as_second();
                    // Bookings in the past do not keep a venue alive; current and future ones do.
                    let active: Option<i64> = sqlx::query_scalar(
                        "SELECT 1 FROM claims c JOIN resources r ON r.id = c.resource_id
                         WHERE r.venue_id = ? AND c.block_end > ? LIMIT 1",
                    )
                    .bind(&id)
                    .bind(at)
                    .fetch_optional(&mut ctx.conn)
                    .await?;
                    if active.is_some() {
                        return Ok(Err(StoreError::Conflict(VENUE_IN_USE.into())));
                    }
                    for sql in [
                        "UPDATE venues SET deleted_at = ? WHERE id = ? AND deleted_at IS NULL",
                        "UPDATE resources SET deleted_at = ? WHERE venue_id = ? AND deleted_at IS NULL",
                        "UPDATE events SET deleted_at = ? WHERE venue_id = ? AND deleted_at IS NULL",
                    ] {
                        sqlx::query(sql).bind(at).bind(&id).execute(&mut ctx.conn).await?;
                    }
                    Ok(Ok(()))
                })
            })
            .await;
        self.invalidating(&key, result)
    }

    async fn venue(&self, id: VenueId) -> Result<Option<Venue>, StoreError> {
        self.cached_doc("venue", "SELECT doc FROM venues WHERE id = ? AND deleted_at IS NULL", id.to_string()).await
    }

    async fn venues(&self, page: PageRequest) -> Result<Page<Venue>, StoreError> {
        self.docs_page("SELECT id, doc FROM venues WHERE deleted_at IS NULL AND id > ? ORDER BY id LIMIT ?", None, page)
            .await
    }

    async fn insert_resource(&self, r: &Resource) -> Result<(), StoreError> {
        let doc = serde_json::to_string(r).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.exec_one(
            "INSERT INTO resources (id, venue_id, doc) VALUES (?, ?, ?)",
            vec![Some(r.id.to_string()), Some(r.venue_id.to_string()), Some(doc)],
            "resource exists",
        )
        .await
        .map(|_| ())
    }

    async fn update_resource(&self, r: &Resource) -> Result<(), StoreError> {
        let doc = serde_json::to_string(r).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let n = self
            .exec_dropping(
                "UPDATE resources SET doc = ? WHERE id = ? AND deleted_at IS NULL",
                vec![Some(doc), Some(r.id.to_string())],
                "",
                Some(cache::key("resource", r.id)),
            )
            .await;
        let n = self.invalidating(&cache::key("resource", r.id), n)?;
        if n == 0 { Err(StoreError::NotFound("resource")) } else { Ok(()) }
    }

    async fn delete_resource(&self, id: ResourceId, now: Timestamp) -> Result<(), StoreError> {
        let key = cache::key("resource", id);
        let id = id.to_string();
        let result = self
            .writer
            .exec(move |ctx: &mut Ctx| -> BoxFuture<'_, Outcome<(), StoreError>> {
                Box::pin(async move {
                    ctx.memo.invalidate(&cache::key("resource", &id));
                    let at = ctx.now(now).as_second();
                    let active: Option<i64> =
                        sqlx::query_scalar("SELECT 1 FROM claims WHERE resource_id = ? AND block_end > ? LIMIT 1")
                            .bind(&id)
                            .bind(at)
                            .fetch_optional(&mut ctx.conn)
                            .await?;
                    if active.is_some() {
                        return Ok(Err(StoreError::Conflict("the resource has current or future bookings".into())));
                    }
                    let r = sqlx::query("UPDATE resources SET deleted_at = ? WHERE id = ? AND deleted_at IS NULL")
                        .bind(at)
                        .bind(&id)
                        .execute(&mut ctx.conn)
                        .await?;
                    if r.rows_affected() == 0 { Ok(Err(StoreError::NotFound("resource"))) } else { Ok(Ok(())) }
                })
            })
            .await;
        self.invalidating(&key, result)
    }

    async fn resource(&self, id: ResourceId) -> Result<Option<Resource>, StoreError> {
        self.cached_doc("resource", "SELECT doc FROM resources WHERE id = ? AND deleted_at IS NULL", id.to_string())
            .await
    }

    async fn resources_by_ids(&self, ids: &[ResourceId]) -> Result<Vec<Resource>, StoreError> {
        let (mut out, missing) = self.cache.get_many::<Resource, _>(ids, |id| cache::key("resource", id));
        for chunk in missing.chunks(500) {
            let generation = self.cache.generation();
            let mut qb: QueryBuilder<Sqlite> =
                QueryBuilder::new("SELECT doc FROM resources WHERE deleted_at IS NULL AND id IN (");
            let mut sep = qb.separated(", ");
            for id in chunk {
                sep.push_bind(id.to_string());
            }
            qb.push(")");
            let docs: Vec<(String,)> = qb.build_query_as().fetch_all(&self.read).await.map_err(db_error)?;
            for (doc,) in docs {
                let r: Resource = from_json(&doc)?;
                self.cache.put(generation, cache::key("resource", r.id), r.clone());
                out.push(r);
            }
        }
        Ok(out)
    }

    async fn resources(&self, venue_id: VenueId, page: PageRequest) -> Result<Page<Resource>, StoreError> {
        self.docs_page(
            "SELECT id, doc FROM resources WHERE venue_id = ? AND deleted_at IS NULL AND id > ? ORDER BY id LIMIT ?",
            Some(venue_id),
            page,
        )
        .await
    }

    async fn insert_event(&self, event: &Event) -> Result<(), StoreError> {
        let event = event.clone();
        self.writer
            .exec(move |ctx: &mut Ctx| -> BoxFuture<'_, Outcome<(), StoreError>> {
                Box::pin(async move {
                    let id = event.id.to_string();
                    let (start, end) = (event.start.as_second(), event.end.as_second());
                    sqlx::query("INSERT INTO events (id, venue_id, start_at, end_at, doc) VALUES (?, ?, ?, ?, ?)")
                        .bind(&id)
                        .bind(event.venue_id.to_string())
                        .bind(start)
                        .bind(end)
                        .bind(to_json(&event)?)
                        .execute(&mut ctx.conn)
                        .await?;
                    for seat in &event.seat_ids {
                        sqlx::query(
                            "INSERT INTO event_seats (resource_id, start_at, event_id, end_at) VALUES (?, ?, ?, ?)",
                        )
                        .bind(seat.to_string())
                        .bind(start)
                        .bind(&id)
                        .bind(end)
                        .execute(&mut ctx.conn)
                        .await?;
                    }
                    Ok(Ok(()))
                })
            })
            .await
    }

    async fn event(&self, id: EventId) -> Result<Option<Event>, StoreError> {
        self.cached_doc("event", "SELECT doc FROM events WHERE id = ? AND deleted_at IS NULL", id.to_string()).await
    }

    async fn events(&self, venue_id: VenueId, page: PageRequest) -> Result<Page<Event>, StoreError> {
        self.docs_page(
            "SELECT id, doc FROM events WHERE venue_id = ? AND deleted_at IS NULL AND id > ? ORDER BY id LIMIT ?",
            Some(venue_id),
            page,
        )
        .await
    }

    async fn events_of_seat(&self, seat: ResourceId, span: Span, limit: u32) -> Result<Vec<Event>, StoreError> {
        let docs: Vec<(String,)> = sqlx::query_as(
            "SELECT e.doc FROM event_seats s JOIN events e ON e.id = s.event_id
             WHERE s.resource_id = ? AND s.start_at < ? AND s.end_at > ? AND e.deleted_at IS NULL
             ORDER BY s.start_at LIMIT ?",
        )
        .bind(seat.to_string())
        .bind(span.end)
        .bind(span.start)
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await
        .map_err(db_error)?;
        docs.into_iter().map(|(d,)| from_json(&d)).collect()
    }

    async fn claims(&self, resource: ResourceId, span: Span, now: Timestamp) -> Result<Vec<Claim>, StoreError> {
        live_claims(&self.read, resource, span, now).await.map_err(db_error)
    }

    async fn seat_states(&self, event: &Event, now: Timestamp) -> Result<HashMap<ResourceId, SeatState>, StoreError> {
        let mut states = HashMap::new();
        for chunk in event.seat_ids.chunks(500) {
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
                "SELECT c.resource_id, b.status FROM claims c JOIN bookings b ON b.id = c.booking_id WHERE c.block_start < ",
            );
            qb.push_bind(event.end.as_second());
            qb.push(" AND c.block_end > ").push_bind(event.start.as_second());
            qb.push(" AND (c.hold_expires_at IS NULL OR c.hold_expires_at > ").push_bind(now.as_second());
            qb.push(") AND c.resource_id IN (");
            let mut sep = qb.separated(", ");
            for id in chunk {
                sep.push_bind(id.to_string());
            }
            qb.push(")");
            let rows: Vec<(String, String)> = qb.build_query_as().fetch_all(&self.read).await.map_err(db_error)?;
            add_seat_states(&mut states, rows);
        }
        Ok(states)
    }

    async fn hold(&self, command: HoldCommand) -> Result<Booking, HoldRefused> {
        assert_eq!(command.booking.items.len(), command.claims.len(), "one claim per item");
        let result = self
            .writer
            .write(move |ctx: &mut Ctx| -> BoxFuture<'_, Outcome<Booking, HoldRefused>> {
                Box::pin(hold_in_tx(ctx, command))
            })
            .await;
        match result {
            Ok(Ok(b)) => Ok(b),
            Ok(Err(refused)) => Err(refused),
            Err(e) => Err(HoldRefused::Store(e)),
        }
    }

    async fn update_booking(&self, id: BookingId, now: Timestamp, decide: Decide) -> Result<Booking, UpdateRefused> {
        let result = self
            .writer
            .write(move |ctx: &mut Ctx| -> BoxFuture<'_, Outcome<Booking, UpdateRefused>> {
                Box::pin(async move {
                    let now = ctx.now(now);
                    let Some(before) = load_booking(&mut ctx.conn, &id.to_string()).await? else {
                        return Ok(Err(UpdateRefused::NotFound));
                    };
                    let after = match decided(&before, decide, now) {
                        Ok(after) => after,
                        Err(refused) => return Ok(Err(refused)),
                    };
                    apply_change(&mut ctx.conn, &before, &after, now).await?;
                    Ok(Ok(after))
                })
            })
            .await;
        match result {
            Ok(Ok(b)) => Ok(b),
            Ok(Err(refused)) => Err(refused),
            Err(e) => Err(UpdateRefused::Store(e)),
        }
    }

    async fn booking(&self, id: BookingId) -> Result<Option<Booking>, StoreError> {
        let doc: Option<String> = sqlx::query_scalar("SELECT doc FROM bookings WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.read)
            .await
            .map_err(db_error)?;
        doc.map(|d| from_json(&d)).transpose()
    }

    async fn bookings(&self, filter: &BookingFilter, page: PageRequest) -> Result<Page<Booking>, StoreError> {
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new("SELECT id, doc FROM bookings WHERE id > ");
        qb.push_bind(after_key(&page));
        if let Some(c) = filter.customer_id {
            qb.push(" AND customer_id = ").push_bind(c.to_string());
        }
        if let Some(v) = filter.venue_id {
            qb.push(" AND venue_id = ").push_bind(v.to_string());
        }
        if let Some(s) = filter.status {
            qb.push(" AND status = ").push_bind(s.as_str());
        }
        if let Some(venues) = &filter.venue_ids {
            qb.push(" AND venue_id IN (");
            let mut sep = qb.separated(", ");
            sep.push_bind(String::new());
            for v in venues {
                sep.push_bind(v.to_string());
            }
            qb.push(")");
        }
        qb.push(" ORDER BY id LIMIT ").push_bind(i64::from(page.limit) + 1);
        let rows: Vec<(String, String)> = qb.build_query_as().fetch_all(&self.read).await.map_err(db_error)?;
        docs_to_page(rows, page.limit)
    }

    async fn expire_due(&self, now: Timestamp, limit: u32) -> Result<Vec<BookingId>, StoreError> {
        self.writer
            .exec(move |ctx: &mut Ctx| -> BoxFuture<'_, Outcome<Vec<BookingId>, StoreError>> {
                Box::pin(async move {
                    let now = ctx.now(now);
                    let docs: Vec<(String,)> = sqlx::query_as(
                        "SELECT doc FROM bookings WHERE status IN ('held', 'pending_payment') AND expires_at <= ?
                         ORDER BY expires_at LIMIT ?",
                    )
                    .bind(now.as_second())
                    .bind(i64::from(limit))
                    .fetch_all(&mut ctx.conn)
                    .await?;
                    let mut changes = Vec::with_capacity(docs.len());
                    for (doc,) in docs {
                        let before: Booking = from_json_db(&doc)?;
                        if let Some(after) = expired(&before, now) {
                            changes.push((before, after));
                        }
                    }
                    apply_changes(&mut ctx.conn, &changes, now).await?;
                    Ok(Ok(changes.into_iter().map(|(_, after)| after.id).collect()))
                })
            })
            .await
    }

    async fn upcoming_expiries(&self, limit: u32) -> Result<Vec<(BookingId, Timestamp)>, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT id, expires_at FROM bookings WHERE status IN ('held', 'pending_payment') AND expires_at IS NOT NULL
             ORDER BY expires_at LIMIT ?",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await
        .map_err(db_error)?;
        Ok(rows.into_iter().filter_map(|(id, at)| Some((id.parse().ok()?, ts(at)))).collect())
    }

    async fn idempotency_begin(
        &self,
        key: &IdempotencyKey,
        now: Timestamp,
        lock_seconds: u32,
    ) -> Result<IdempotencyBegin, StoreError> {
        let key = key.clone();
        self.writer
            .exec(move |ctx: &mut Ctx| -> BoxFuture<'_, Outcome<IdempotencyBegin, StoreError>> {
                Box::pin(async move {
                    let now = ctx.now(now).as_second();
                    let row: Option<KeyRow> = sqlx::query_as(
                        "SELECT request_hash, status, body, locked_until FROM idempotency_keys WHERE principal = ? AND key = ?",
                    )
                    .bind(&key.principal)
                    .bind(&key.key)
                    .fetch_optional(&mut ctx.conn)
                    .await?;
                    if let Some(found) = existing_key(row, now) {
                        return Ok(Ok(found));
                    }
                    sqlx::query(
                        "INSERT INTO idempotency_keys (principal, key, request_hash, created_at, locked_until)
                         VALUES (?, ?, ?, ?, ?)
                         ON CONFLICT (principal, key) DO UPDATE SET request_hash = excluded.request_hash,
                           locked_until = excluded.locked_until, created_at = excluded.created_at",
                    )
                    .bind(&key.principal)
                    .bind(&key.key)
                    .bind(&key.request_hash)
                    .bind(now)
                    .bind(now + i64::from(lock_seconds))
                    .execute(&mut ctx.conn)
                    .await?;
                    Ok(Ok(IdempotencyBegin::Started))
                })
            })
            .await
    }

    async fn idempotency_complete(&self, key: &IdempotencyKey, status: u16, body: &[u8]) -> Result<(), StoreError> {
        let (key, body) = (key.clone(), body.to_vec());
        self.writer
            .exec(move |ctx: &mut Ctx| -> BoxFuture<'_, Outcome<(), StoreError>> {
                Box::pin(async move {
                    sqlx::query(
                        "UPDATE idempotency_keys SET status = ?, body = ?, locked_until = NULL
                         WHERE principal = ? AND key = ? AND request_hash = ?",
                    )
                    .bind(i64::from(status))
                    .bind(body)
                    .bind(&key.principal)
                    .bind(&key.key)
                    .bind(&key.request_hash)
                    .execute(&mut ctx.conn)
                    .await?;
                    Ok(Ok(()))
                })
            })
            .await
    }

    async fn idempotency_abandon(&self, key: &IdempotencyKey) -> Result<(), StoreError> {
        self.exec_one(
            "DELETE FROM idempotency_keys WHERE principal = ? AND key = ? AND status IS NULL",
            vec![Some(key.principal.clone()), Some(key.key.clone())],
            "",
        )
        .await
        .map(|_| ())
    }

    async fn idempotency_cleanup(&self, before: Timestamp, limit: u32) -> Result<u64, StoreError> {
        self.exec_one(
            "DELETE FROM idempotency_keys WHERE rowid IN
               (SELECT rowid FROM idempotency_keys WHERE created_at < CAST(? AS INTEGER) LIMIT CAST(? AS INTEGER))",
            vec![Some(before.as_second().to_string()), Some(limit.to_string())],
            "",
        )
        .await
    }

    async fn append_audit(&self, event: AuditEvent) -> Result<(), StoreError> {
        self.writer.append_audit(event).await
    }

    async fn audit_range(&self, after: u64, limit: u32) -> Result<Vec<AuditEvent>, StoreError> {
        let mut query = audit_range_query::<Sqlite>(after, limit);
        audit_events_of(query.build_query_as().fetch_all(&self.read).await.map_err(db_error)?)
    }

    async fn audit_head(&self) -> Result<(u64, String), StoreError> {
        audit_head_of(sqlx::query_as(AUDIT_HEAD_SQL).fetch_one(&self.read).await.map_err(db_error)?)
    }

    async fn audit_events(&self, filter: &AuditFilter, page: AuditPage) -> Result<Vec<AuditEvent>, StoreError> {
        let rows: Vec<AuditRow> =
            audit_select::<Sqlite>(filter, page).build_query_as().fetch_all(&self.read).await.map_err(db_error)?;
        audit_events_of(rows)
    }

    async fn grant_role(&self, user_id: UserId, grant: RoleGrant) -> Result<User, StoreError> {
        access::sqlite::grant_role(&self.writer, user_id, grant).await?;
        self.user_by_id(user_id).await?.ok_or(StoreError::NotFound("user"))
    }

    async fn revoke_role(&self, user_id: UserId, revoke: RoleRevoke) -> Result<User, StoreError> {
        access::sqlite::revoke_role(&self.writer, user_id, revoke).await?;
        self.user_by_id(user_id).await?.ok_or(StoreError::NotFound("user"))
    }

    async fn insert_api_key(&self, key: &ApiKey) -> Result<(), StoreError> {
        access::sqlite::insert_api_key(&self.writer, key).await
    }

    async fn api_key_by_hash(&self, key_hash: &str) -> Result<Option<ApiKey>, StoreError> {
        access::sqlite::api_key_by_hash(&self.read, key_hash).await
    }

    async fn api_keys(&self, page: PageRequest) -> Result<Page<ApiKey>, StoreError> {
        access::sqlite::api_keys(&self.read, page).await
    }

    async fn revoke_api_key(&self, id: ApiKeyId, now: Timestamp) -> Result<(), StoreError> {
        access::sqlite::revoke_api_key(&self.writer, id, now).await
    }
}

/// A live resource and its venue's zone as this transaction sees them: from the writer's memo
/// (every change to either drops it there), else read in one statement (each statement is a
/// round trip to SQLite's worker thread).
async fn resource_in_tx(ctx: &mut Ctx, id: ResourceId) -> Result<Option<(Resource, jiff::tz::TimeZone)>, sqlx::Error> {
    let key = cache::key("resource", id);
    if let Some(hit) = ctx.memo.get::<(Resource, jiff::tz::TimeZone)>(&key) {
        return Ok(Some(hit));
    }
    let docs: Option<(String, String)> = sqlx::query_as(
        "SELECT r.doc, v.doc FROM resources r JOIN venues v ON v.id = r.venue_id AND v.deleted_at IS NULL
         WHERE r.id = ? AND r.deleted_at IS NULL",
    )
    .bind(id.to_string())
    .fetch_optional(&mut ctx.conn)
    .await?;
    let Some((resource_doc, venue_doc)) = docs else { return Ok(None) };
    let found = (from_json_db::<Resource>(&resource_doc)?, from_json_db::<Venue>(&venue_doc)?.tz());
    ctx.memo.put(ctx.memo.generation(), key, found.clone());
    Ok(Some(found))
}

/// The hold transaction: for each item, read the live claims of its resource, let the core
/// decide (I1), insert the claim; the first refusal rolls all of them back (I3).
async fn hold_in_tx(ctx: &mut Ctx, command: HoldCommand) -> Outcome<Booking, HoldRefused> {
    let now = ctx.now(command.now);
    let mut booking = command.booking;
    let booking_id = booking.id.to_string();
    let hold_expires_at = booking.expires_at.map(|t| t.as_second());
    // Claims this booking takes, inserted together at the end: an item on a resource an
    // earlier item also uses is checked against that item's claim as well.
    let mut taken: Vec<(ResourceId, Claim)> = Vec::with_capacity(booking.items.len());
    for (i, (item, claim)) in booking.items.iter().zip(&command.claims).enumerate() {
        let Some((resource, tz)) = resource_in_tx(ctx, item.resource_id).await? else {
            return Ok(Err(HoldRefused::Stale { item_index: i }));
        };
        if resource.venue_id != booking.venue_id {
            return Ok(Err(HoldRefused::Stale { item_index: i }));
        }
        let mut existing = live_claims(&mut ctx.conn, item.resource_id, claim.span, now).await?;
        existing.extend(taken.iter().filter(|(r, _)| *r == item.resource_id).map(|(_, c)| *c));
        if let Err(shortfall) = capacity::check_claim(&resource.capacity_rules(&tz), &existing, *claim) {
            return Ok(Err(HoldRefused::Unavailable { item_index: i, remaining: shortfall.remaining }));
        }
        taken.push((item.resource_id, *claim));
    }
    booking.created_at = now;
    booking.updated_at = now;
    let doc = to_json(&booking)?;
    // Claims, booking and outbox row in one call: one round trip to SQLite's worker thread.
    let mut sql = String::from(
        "INSERT INTO claims (item_id, booking_id, resource_id, block_start, block_end, quantity, hold_expires_at) VALUES ",
    );
    sql.push_str(&vec!["(?, ?, ?, ?, ?, ?, ?)"; taken.len()].join(", "));
    sql.push_str(
        "; INSERT INTO bookings (id, customer_id, venue_id, status, expires_at, doc) VALUES (?, ?, ?, ?, ?, ?)
         ; INSERT INTO outbox (topic, aggregate_id, payload, created_at) VALUES ('booking.held', ?, ?, ?)",
    );
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
    for (item, (resource_id, claim)) in booking.items.iter().zip(&taken) {
        q = q
            .bind(item.id.to_string())
            .bind(booking_id.clone())
            .bind(resource_id.to_string())
            .bind(claim.span.start)
            .bind(claim.span.end)
            .bind(i64::from(claim.quantity))
            .bind(hold_expires_at);
    }
    q.bind(booking_id.clone())
        .bind(booking.customer_id.to_string())
        .bind(booking.venue_id.to_string())
        .bind(booking.status.as_str())
        .bind(hold_expires_at)
        .bind(doc.clone())
        .bind(booking_id)
        .bind(doc)
        .bind(now.as_second())
        .execute(&mut ctx.conn)
        .await?;
    Ok(Ok(booking))
}
