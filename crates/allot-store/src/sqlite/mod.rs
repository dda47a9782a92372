//! The SQLite implementation of the Store port: reads on a small pool of read-only
//! connections (sqlx), every write through the group-commit [`Writer`] on a thread of its own
//! over a synchronous connection ([`tx`]).

mod checkpoint;
mod tx;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use allot_app::StoreError;
use allot_app::access::{ApiKey, RoleGrant, RoleRevoke};
use allot_app::audit::{AuditEvent, AuditFilter, AuditPage};
use allot_app::store::{
    BookingFilter, Decide, HoldCommand, HoldKey, HoldRefused, IdempotencyBegin, IdempotencyKey, KeyedHoldOutcome, Page,
    PageRequest, RefreshToken, RefundDue, RefundKind, RotateOutcome, SeatStates, SeatVersion, Store, UpdateRefused,
    User,
};
use allot_core::booking::{Booking, BookingStatus};
use allot_core::capacity::{Claim, Span};
use allot_core::ids::{ApiKeyId, BookingId, EventId, ResourceId, UserId, VenueId};
use allot_core::inventory::{Event, Resource, Venue};
use async_trait::async_trait;
use jiff::Timestamp;
use serde::de::DeserializeOwned;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, QueryBuilder, Sqlite, SqliteConnection};

use crate::access;
use crate::cache::{self, Cache, INVALIDATE_ALL, ResourceVersions};
use crate::common::{
    AUDIT_HEAD_SQL, AuditRow, RefundRow, Succession, USER_COLUMNS, UserVenuesRow, after_key, audit_events_of,
    audit_head_of, audit_range_query, audit_rotation, audit_select, booking_ids, claims_from_rows, docs_to_page,
    from_json, page_of, pending_payments_query, refund_due_of, refunds_due_query, refunds_of_payment_query, ts,
    user_of_venues_row,
};
use crate::writer::{Backend, KeyBegin, KeyCompletion, Writer, db_error};
use tx::Ctx;
pub(crate) use tx::SqliteBackend;

pub const READ_POOL_CONNECTIONS_MAX: u32 = 8;
pub const BUSY_TIMEOUT_SECONDS: u64 = 10;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// A booking by id as [`stored_booking`] takes it: status, `updated_at`, document.
const BOOKING_BY_ID: &str = "SELECT b.status, b.updated_at, d.doc FROM bookings AS b
     JOIN booking_docs AS d ON d.seq = b.doc_seq WHERE b.id = ?";

/// A booking as stored: its document with the row's status and `updated_at`, which the
/// document's copies may be older than (a release writes only the row: migration 0010).
fn stored_booking(status: &str, updated_at: &str, doc: &str) -> Result<Booking, String> {
    let mut booking: Booking = serde_json::from_str(doc).map_err(|e| e.to_string())?;
    booking.status = BookingStatus::parse(status).ok_or_else(|| format!("booking status {status:?}"))?;
    booking.updated_at = updated_at.parse().map_err(|e| format!("booking updated_at {updated_at:?}: {e}"))?;
    Ok(booking)
}

pub struct SqliteStore {
    read: SqlitePool,
    writer: Writer<SqliteBackend>,
    /// Catalogue documents; this process makes every change, and drops an entry once its
    /// change has committed.
    cache: Cache,
    /// Users by id, for the principal every authenticated request re-reads: dropped once a
    /// change to the user's roles or venues commits, before it is acknowledged, so the next
    /// request sees it.
    users: Cache,
    /// Bumped for a booking's resources once a write to its claims commits, before it is
    /// acknowledged: with the catalogue's generation, the [`Store::seat_version`].
    versions: ResourceVersions,
    /// Checkpoints the WAL off the writer's thread; stops with the store.
    _checkpointer: checkpoint::Checkpointer,
    /// How long one expiry job may keep the writer ([`tx::EXPIRY_JOB_MILLIS_MAX`] unless set).
    expiry_job_budget: Duration,
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
            // For the migrations and the read pool; the writer's own connection gets the same
            // settings, and why, in `tx::open`.
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .pragma("temp_store", "memory")
            .pragma("cache_size", "-65536")
            .busy_timeout(Duration::from_secs(BUSY_TIMEOUT_SECONDS))
            .foreign_keys(true);
        let mut conn = SqliteConnection::connect_with(&base).await.map_err(db_error)?;
        MIGRATOR.run(&mut conn).await.map_err(|e| StoreError::Database(format!("migrations: {e}")))?;
        conn.close().await.map_err(db_error)?;
        let write = tx::open(std::path::Path::new(path), Duration::from_secs(BUSY_TIMEOUT_SECONDS))
            .map_err(SqliteBackend::error)?;
        let writer = Writer::start_thread(write, SqliteBackend::default(), "allot-sqlite-writer")
            .map_err(|e| StoreError::Database(format!("starting the writer thread: {e}")))?;
        let checkpointer =
            checkpoint::Checkpointer::start(std::path::Path::new(path), Duration::from_secs(BUSY_TIMEOUT_SECONDS))
                .map_err(|e| StoreError::Database(format!("starting the checkpoint thread: {e}")))?;
        let read = SqlitePoolOptions::new()
            .max_connections(READ_POOL_CONNECTIONS_MAX)
            .connect_with(base.read_only(true))
            .await
            .map_err(db_error)?;
        let cache = Cache::default();
        cache.set_enabled(true);
        let users = Cache::default();
        users.set_enabled(true);
        Ok(SqliteStore {
            read,
            writer,
            cache,
            users,
            versions: ResourceVersions::default(),
            _checkpointer: checkpointer,
            expiry_job_budget: Duration::from_millis(tx::EXPIRY_JOB_MILLIS_MAX),
        })
    }

    /// How long one expiry job may keep the writer before it stops with what it released (the
    /// app asks again while any were). For tests: the default keeps hold latency bounded.
    pub fn set_expiry_job_budget(&mut self, budget: Duration) {
        self.expiry_job_budget = budget;
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

/// `claim_totals.expires_at` of claims that never lapse (a confirmed booking's): the
/// triggers' `COALESCE(hold_expires_at, 9223372036854775807)`.
const NEVER_LAPSES: i64 = i64::MAX;

/// Seats per seat-map query: each is bound twice, far below SQLite's variable limit.
const SEATS_PER_QUERY_MAX: usize = 500;

/// `(?, ?, …)` with `ids` bound.
fn push_ids(qb: &mut QueryBuilder<Sqlite>, ids: &[ResourceId]) {
    qb.push("(");
    let mut sep = qb.separated(", ");
    for id in ids {
        sep.push_bind(id.to_string());
    }
    qb.push(")");
}

/// Claims on a resource that count at `now`, overlapping `span` ([`tx::LIVE_CLAIMS_SQL`]).
async fn live_claims(
    read: &SqlitePool,
    resource: ResourceId,
    span: Span,
    now: Timestamp,
) -> Result<Vec<Claim>, sqlx::Error> {
    let rows: Vec<(i64, i64, i64)> = sqlx::query_as(tx::LIVE_CLAIMS_SQL)
        .bind(resource.to_string())
        .bind(span.end)
        .bind(span.start)
        .bind(now.as_second())
        .fetch_all(read)
        .await?;
    Ok(claims_from_rows(rows))
}

impl SqliteStore {
    /// Drops the cached user `id`: a write that may have changed its roles or venues is over
    /// (committed or not) and not yet acknowledged.
    fn user_changed(&self, id: UserId) {
        self.users.invalidate(&cache::key("user", id));
    }

    /// Passes `booking` on after bumping the versions of its resources (its write committed).
    fn bumped(&self, booking: Booking) -> Booking {
        self.versions.bump(booking.items.iter().map(|item| item.resource_id));
        booking
    }

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
    async fn cached_doc<T>(&self, kind: &str, sql: &'static str, id: String) -> Result<Option<Arc<T>>, StoreError>
    where
        T: DeserializeOwned + Send + Sync + 'static,
    {
        let load = async {
            let doc: Option<String> =
                sqlx::query_scalar(sql).bind(id.clone()).fetch_optional(&self.read).await.map_err(db_error)?;
            doc.map(|d| from_json::<T>(&d).map(Arc::new)).transpose()
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

    /// `Store::rotate_refresh_token` and `Store::reissue_refresh_token`.
    async fn succeed_refresh_token(
        &self,
        succession: Succession,
        old_hash: &str,
        new_hash: &str,
        new_expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<RotateOutcome, StoreError> {
        let (old_hash, new_hash) = (old_hash.to_owned(), new_hash.to_owned());
        let audit = allot_app::audit::current();
        self.writer
            .exec_now(move |ctx: &mut Ctx| {
                let outcome = tx::succeed_refresh_token(ctx, succession, &old_hash, &new_hash, new_expires_at, now)?;
                audit_rotation(audit.as_ref(), succession, &new_hash, &outcome);
                Ok(outcome)
            })
            .await
    }

    /// Writes one statement through the writer, mapping a unique violation to `Conflict`.
    async fn exec_one(
        &self,
        sql: &'static str,
        binds: Vec<Option<String>>,
        conflict: &'static str,
    ) -> Result<u64, StoreError> {
        self.writer.exec_now(move |ctx: &mut Ctx| tx::exec(ctx, sql, &binds, conflict)).await
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
        self.users.get_or_load(cache::key("user", id), self.user_where("id", id.to_string())).await
    }

    async fn set_manager(&self, venue_id: VenueId, user_id: UserId) -> Result<(), StoreError> {
        let result = self
            .exec_one(
                "INSERT OR IGNORE INTO venue_managers (venue_id, user_id) VALUES (?, ?)",
                vec![Some(venue_id.to_string()), Some(user_id.to_string())],
                "already a manager",
            )
            .await;
        self.user_changed(user_id);
        result.map(|_| ())
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
        self.succeed_refresh_token(Succession::Rotate, old_hash, new_hash, new_expires_at, now).await
    }

    async fn reissue_refresh_token(
        &self,
        lost_hash: &str,
        new_hash: &str,
        new_expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<RotateOutcome, StoreError> {
        self.succeed_refresh_token(Succession::Reissue, lost_hash, new_hash, new_expires_at, now).await
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

    async fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        sqlx::query_scalar("SELECT value FROM settings WHERE key = ?")
            .bind(key)
            .fetch_optional(&self.read)
            .await
            .map_err(db_error)
    }

    async fn insert_venue(&self, venue: &Venue) -> Result<(), StoreError> {
        let doc = serde_json::to_string(venue).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let (id, managers) = (venue.id.to_string(), venue.managers.iter().map(ToString::to_string).collect::<Vec<_>>());
        let result = self.writer.exec_now(move |ctx: &mut Ctx| tx::insert_venue(ctx, &id, &doc, &managers)).await;
        for user in &venue.managers {
            self.user_changed(*user);
        }
        result
    }

    async fn update_venue(&self, before: &Venue, after: &Venue) -> Result<(), StoreError> {
        assert_eq!(before.id, after.id, "an update keeps the id");
        let doc = serde_json::to_string(after).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let (id, before) = (after.id.to_string(), before.clone());
        let result = self
            .writer
            .exec_now(move |ctx: &mut Ctx| {
                // A venue's zone is memoised with each of its resources: drop them all.
                ctx.memo.invalidate(INVALIDATE_ALL);
                tx::replace_doc(ctx, &tx::VENUE_DOCS, &id, &before, &doc)
            })
            .await;
        // Dropped whatever the outcome: after `Changed` the caller reads the venue again.
        self.invalidating(&cache::key("venue", after.id), result)
    }

    async fn delete_venue(&self, id: VenueId, now: Timestamp) -> Result<(), StoreError> {
        let key = INVALIDATE_ALL.to_owned();
        let id = id.to_string();
        let result = self.writer.exec_now(move |ctx: &mut Ctx| tx::delete_venue(ctx, &id, now)).await;
        self.invalidating(&key, result)
    }

    async fn venue(&self, id: VenueId) -> Result<Option<Arc<Venue>>, StoreError> {
        self.cached_doc("venue", "SELECT doc FROM venues WHERE id = ? AND deleted_at IS NULL", id.to_string()).await
    }

    async fn venues(&self, page: PageRequest) -> Result<Page<Venue>, StoreError> {
        self.docs_page("SELECT id, doc FROM venues WHERE deleted_at IS NULL AND id > ? ORDER BY id LIMIT ?", None, page)
            .await
    }

    async fn insert_resource(&self, r: &Resource) -> Result<(), StoreError> {
        let doc = serde_json::to_string(r).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let (id, venue) = (r.id.to_string(), r.venue_id.to_string());
        self.writer.exec_now(move |ctx: &mut Ctx| tx::insert_resource(ctx, &id, &venue, &doc)).await
    }

    async fn update_resource(&self, before: &Resource, after: &Resource) -> Result<(), StoreError> {
        assert_eq!(before.id, after.id, "an update keeps the id");
        let doc = serde_json::to_string(after).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let key = cache::key("resource", after.id);
        let (id, before, memo_key) = (after.id.to_string(), before.clone(), key.clone());
        let result = self
            .writer
            .exec_now(move |ctx: &mut Ctx| {
                ctx.memo.invalidate(&memo_key);
                tx::replace_doc(ctx, &tx::RESOURCE_DOCS, &id, &before, &doc)
            })
            .await;
        self.invalidating(&key, result)
    }

    async fn delete_resource(&self, id: ResourceId, now: Timestamp) -> Result<(), StoreError> {
        let key = cache::key("resource", id);
        let id = id.to_string();
        let result = self.writer.exec_now(move |ctx: &mut Ctx| tx::delete_resource(ctx, &id, now)).await;
        self.invalidating(&key, result)
    }

    async fn resource(&self, id: ResourceId) -> Result<Option<Arc<Resource>>, StoreError> {
        self.cached_doc("resource", "SELECT doc FROM resources WHERE id = ? AND deleted_at IS NULL", id.to_string())
            .await
    }

    async fn resources_by_ids(&self, ids: &[ResourceId]) -> Result<Vec<Resource>, StoreError> {
        // Cached as `Arc<Resource>`, the type `resource` caches under the same key.
        let (hits, missing) = self.cache.get_many::<Arc<Resource>, _>(ids, |id| cache::key("resource", id));
        let mut out: Vec<Resource> = hits.iter().map(|r| Resource::clone(r)).collect();
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
                self.cache.put(generation, cache::key("resource", r.id), Arc::new(r.clone()));
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
        self.writer.exec_now(move |ctx: &mut Ctx| tx::insert_event(ctx, &event)).await
    }

    async fn event(&self, id: EventId) -> Result<Option<Arc<Event>>, StoreError> {
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

    fn seat_version(&self, seats: &[ResourceId]) -> Option<SeatVersion> {
        Some((self.cache.generation(), self.versions.max(seats)))
    }

    async fn seat_states(&self, event: &Event, now: Timestamp) -> Result<SeatStates, StoreError> {
        let mut states = SeatStates::default();
        for chunk in event.seat_ids.chunks(SEATS_PER_QUERY_MAX) {
            // From the per-resource totals the capacity rule reads (one row per block and
            // expiry, no join): among live claims only a confirmed booking's never lapses
            // (`expires_at` = `NEVER_LAPSES`), so that row is a booked seat and any other a hold.
            let mut qb: QueryBuilder<Sqlite> =
                QueryBuilder::new("SELECT resource_id, expires_at FROM claim_totals WHERE block_start < ");
            qb.push_bind(event.end.as_second());
            qb.push(" AND block_end > ").push_bind(event.start.as_second());
            qb.push(" AND expires_at > ").push_bind(now.as_second());
            qb.push(" AND resource_id IN ");
            push_ids(&mut qb, chunk);
            // The index range starts at the longest claim any of these seats ever had before the
            // event: a seat sold for every earlier performance is not read back to the first.
            qb.push(" AND block_start > ").push_bind(event.start.as_second());
            qb.push(" - COALESCE((SELECT MAX(seconds) FROM claim_longest WHERE resource_id IN ");
            push_ids(&mut qb, chunk);
            qb.push("), 0)");
            let totals: Vec<(String, i64)> = qb.build_query_as().fetch_all(&self.read).await.map_err(db_error)?;
            for (resource, expires_at) in totals {
                let Ok(seat) = resource.parse() else { continue };
                let confirmed = expires_at == NEVER_LAPSES;
                states.add(seat, confirmed, (!confirmed).then(|| ts(expires_at)));
            }
        }
        Ok(states)
    }

    async fn hold(&self, command: HoldCommand) -> Result<Booking, HoldRefused> {
        assert_eq!(command.booking.items.len(), command.claims.len(), "one claim per item");
        self.writer.hold(Vec::new(), command).await.map(|b| self.bumped(b))
    }

    async fn hold_keyed(&self, command: HoldCommand, key: HoldKey) -> Result<KeyedHoldOutcome, StoreError> {
        assert_eq!(command.booking.items.len(), command.claims.len(), "one claim per item");
        Ok(match self.writer.hold_keyed(Vec::new(), command, key).await? {
            KeyedHoldOutcome::Ran { result, answer } => {
                KeyedHoldOutcome::Ran { result: result.map(|b| self.bumped(b)), answer }
            }
            not_run @ KeyedHoldOutcome::NotRun(_) => not_run,
        })
    }

    async fn update_booking(&self, id: BookingId, now: Timestamp, decide: Decide) -> Result<Booking, UpdateRefused> {
        let result = self.writer.write_now(move |ctx: &mut Ctx| tx::update_booking(ctx, id, now, decide)).await;
        match result {
            Ok(Ok(b)) => Ok(self.bumped(b)),
            Ok(Err(refused)) => Err(refused),
            Err(e) => Err(UpdateRefused::Store(e)),
        }
    }

    async fn booking(&self, id: BookingId) -> Result<Option<Booking>, StoreError> {
        let row: Option<(String, String, String)> =
            sqlx::query_as(BOOKING_BY_ID).bind(id.to_string()).fetch_optional(&self.read).await.map_err(db_error)?;
        row.map(|(status, updated_at, doc)| stored_booking(&status, &updated_at, &doc).map_err(StoreError::Corrupt))
            .transpose()
    }

    async fn bookings(&self, filter: &BookingFilter, page: PageRequest) -> Result<Page<Booking>, StoreError> {
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
            "SELECT b.id, b.status, b.updated_at, d.doc FROM bookings AS b JOIN booking_docs AS d ON d.seq = b.doc_seq
             WHERE b.id > ",
        );
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
        qb.push(" ORDER BY b.id LIMIT ").push_bind(i64::from(page.limit) + 1);
        let rows: Vec<(String, String, String, String)> =
            qb.build_query_as().fetch_all(&self.read).await.map_err(db_error)?;
        let rows = rows
            .into_iter()
            .map(|(id, status, updated_at, doc)| Ok((id, stored_booking(&status, &updated_at, &doc)?)))
            .collect::<Result<Vec<_>, String>>()
            .map_err(StoreError::Corrupt)?;
        Ok(page_of(rows, page.limit))
    }

    async fn expire_due(&self, now: Timestamp, limit: u32) -> Result<Vec<BookingId>, StoreError> {
        let budget = self.expiry_job_budget;
        self.writer.exec_now(move |ctx: &mut Ctx| tx::expire_due(ctx, now, limit, budget)).await
    }

    async fn purge_released_claims(&self, now: Timestamp, limit: u32) -> Result<usize, StoreError> {
        let budget = self.expiry_job_budget;
        self.writer.exec_now(move |ctx: &mut Ctx| tx::purge_released_claims(ctx, now, limit, budget)).await
    }

    async fn pending_payments(&self, limit: u32) -> Result<Vec<BookingId>, StoreError> {
        let mut query = pending_payments_query::<Sqlite>(limit);
        let ids: Vec<String> = query.build_query_scalar().fetch_all(&self.read).await.map_err(db_error)?;
        booking_ids(&ids)
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
        self.writer.begin_key(KeyBegin { key: key.clone(), now, lock_seconds }).await
    }

    async fn idempotency_complete(&self, key: &IdempotencyKey, status: u16, body: &[u8]) -> Result<(), StoreError> {
        self.writer.complete_key(KeyCompletion { key: key.clone(), status, body: body.to_vec() }).await
    }

    async fn idempotency_abandon(&self, key: &IdempotencyKey) -> Result<(), StoreError> {
        let key = key.clone();
        self.writer.exec_now(move |ctx: &mut Ctx| tx::idempotency_abandon(ctx, &key)).await
    }

    async fn idempotency_renew(&self, key: &IdempotencyKey, locked_until: Timestamp) -> Result<bool, StoreError> {
        let key = key.clone();
        self.writer.exec_now(move |ctx: &mut Ctx| tx::idempotency_renew(ctx, &key, locked_until)).await
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

    async fn queue_refund(&self, due: &RefundDue) -> Result<(), StoreError> {
        self.exec_one(
            "INSERT INTO refunds_due (payment_reference, kind, booking_id, amount, attempts, next_at)
             VALUES (?, ?, ?, CAST(? AS INTEGER), CAST(? AS INTEGER), CAST(? AS INTEGER)) ON CONFLICT DO NOTHING",
            vec![
                Some(due.payment_reference.clone()),
                Some(due.kind.as_str().to_owned()),
                Some(due.booking_id.to_string()),
                Some(due.amount.to_string()),
                Some(due.attempts.to_string()),
                Some(due.next_at.as_second().to_string()),
            ],
            "",
        )
        .await
        .map(|_| ())
    }

    async fn refunds_due(&self, now: Timestamp, attempts_max: u32, limit: u32) -> Result<Vec<RefundDue>, StoreError> {
        let mut query = refunds_due_query::<Sqlite>(now, attempts_max, limit);
        let rows: Vec<RefundRow> = query.build_query_as().fetch_all(&self.read).await.map_err(db_error)?;
        rows.into_iter().map(refund_due_of).collect()
    }

    async fn refunds_of_payment(&self, payment_reference: &str) -> Result<Vec<RefundDue>, StoreError> {
        let mut query = refunds_of_payment_query::<Sqlite>(payment_reference);
        let rows: Vec<RefundRow> = query.build_query_as().fetch_all(&self.read).await.map_err(db_error)?;
        rows.into_iter().map(refund_due_of).collect()
    }

    async fn claim_refunds_due(
        &self,
        now: Timestamp,
        lease_until: Timestamp,
        attempts_max: u32,
        limit: u32,
    ) -> Result<Vec<RefundDue>, StoreError> {
        let rows = self
            .writer
            .exec_now(move |ctx: &mut Ctx| tx::claim_refunds_due(ctx, now, lease_until, attempts_max, limit))
            .await?;
        rows.into_iter().map(refund_due_of).collect()
    }

    async fn reschedule_refund(
        &self,
        kind: RefundKind,
        payment_reference: &str,
        attempts: u32,
        next_at: Timestamp,
        leased_until: Option<Timestamp>,
    ) -> Result<(), StoreError> {
        self.exec_one(
            "UPDATE refunds_due SET attempts = CAST(? AS INTEGER), next_at = CAST(? AS INTEGER)
             WHERE payment_reference = ? AND kind = ? AND next_at = COALESCE(CAST(? AS INTEGER), next_at)",
            vec![
                Some(attempts.to_string()),
                Some(next_at.as_second().to_string()),
                Some(payment_reference.to_owned()),
                Some(kind.as_str().to_owned()),
                leased_until.map(|t| t.as_second().to_string()),
            ],
            "",
        )
        .await
        .map(|_| ())
    }

    async fn drop_refund(&self, kind: RefundKind, payment_reference: &str) -> Result<(), StoreError> {
        self.exec_one(
            "DELETE FROM refunds_due WHERE payment_reference = ? AND kind = ?",
            vec![Some(payment_reference.to_owned()), Some(kind.as_str().to_owned())],
            "",
        )
        .await
        .map(|_| ())
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
        let result = self.writer.exec_now(move |ctx: &mut Ctx| tx::grant_role(ctx, user_id, grant)).await;
        self.user_changed(user_id);
        result?;
        self.user_by_id(user_id).await?.ok_or(StoreError::NotFound("user"))
    }

    async fn revoke_role(&self, user_id: UserId, revoke: RoleRevoke) -> Result<User, StoreError> {
        let result = self.writer.exec_now(move |ctx: &mut Ctx| tx::revoke_role(ctx, user_id, revoke)).await;
        self.user_changed(user_id);
        result?;
        self.user_by_id(user_id).await?.ok_or(StoreError::NotFound("user"))
    }

    async fn insert_api_key(&self, key: &ApiKey) -> Result<(), StoreError> {
        let key = key.clone();
        self.writer.exec_now(move |ctx: &mut Ctx| tx::insert_api_key(ctx, &key)).await
    }

    async fn api_key_by_hash(&self, key_hash: &str) -> Result<Option<ApiKey>, StoreError> {
        access::sqlite::api_key_by_hash(&self.read, key_hash).await
    }

    async fn api_keys(&self, page: PageRequest) -> Result<Page<ApiKey>, StoreError> {
        access::sqlite::api_keys(&self.read, page).await
    }

    async fn revoke_api_key(&self, id: ApiKeyId, now: Timestamp) -> Result<(), StoreError> {
        self.writer.exec_now(move |ctx: &mut Ctx| tx::revoke_api_key(ctx, id, now)).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A request whose batch is rolled back because another request of it broke (a panic, a
    /// failed savepoint) did nothing wrong: it fails as busy, which clients and the audit
    /// trail's own appends retry, not as a database error (500, and an audit event dropped).
    #[tokio::test]
    async fn a_request_in_a_batch_another_request_broke_fails_as_busy() {
        let path = std::env::temp_dir().join(format!("allot-broken-batch-{}.db", uuid::Uuid::now_v7().as_simple()));
        let store = SqliteStore::open(&format!("sqlite://{}", path.display())).await.unwrap();
        let writer = store.writer.clone();
        // The writer waits inside a batch until the next two requests are queued behind it,
        // so that they share the next one.
        let (entered_tx, entered_rx) = tokio::sync::oneshot::channel::<()>();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let w = writer.clone();
        let blocker = tokio::spawn(async move {
            w.write_now(move |_| {
                entered_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                Ok(Ok::<(), ()>(()))
            })
            .await
        });
        entered_rx.await.unwrap();
        let w = writer.clone();
        let broken = tokio::spawn(async move {
            w.write_now(|_| -> crate::writer::Outcome<(), (), rusqlite::Error> { panic!("a bug") }).await
        });
        let w = writer.clone();
        let sibling = tokio::spawn(async move { w.write_now(|_| Ok(Ok::<(), ()>(()))).await });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        go_tx.send(()).unwrap();
        assert!(matches!(blocker.await.unwrap(), Ok(Ok(()))));
        assert!(broken.await.unwrap().is_err());
        let sibling = sibling.await.unwrap();
        assert!(matches!(sibling, Err(StoreError::Busy(_))), "{sibling:?}");
        drop(store);
        let _ = std::fs::remove_file(&path);
    }

    type TotalRow = (String, i64, i64, i64, i64);
    type ClaimRowDb = (String, String, String, i64, i64, i64, Option<i64>);

    fn migrate(conn: &rusqlite::Connection, versions: std::ops::RangeInclusive<i64>) {
        for m in MIGRATOR.iter().filter(|m| versions.contains(&m.version)) {
            conn.execute_batch(m.sql.as_str()).unwrap();
        }
    }

    fn rows<T>(
        conn: &rusqlite::Connection,
        sql: &str,
        row: impl Fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Vec<T> {
        conn.prepare(sql).unwrap().query_map([], row).unwrap().collect::<rusqlite::Result<_>>().unwrap()
    }

    fn totals(conn: &rusqlite::Connection) -> Vec<TotalRow> {
        let sql =
            "SELECT resource_id, block_start, block_end, expires_at, quantity FROM claim_totals ORDER BY 1, 2, 3, 4";
        rows(conn, sql, |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
    }

    fn claims(conn: &rusqlite::Connection) -> Vec<ClaimRowDb> {
        let sql = "SELECT item_id, booking_id, resource_id, block_start, block_end, quantity, hold_expires_at
                   FROM claims ORDER BY item_id";
        rows(conn, sql, |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)))
    }

    /// Migration 0008 rebuilds `claims` keyed by booking: the rows and the totals they made
    /// stay as they were, and the totals and longest-claim triggers follow every later change.
    #[test]
    fn claims_rekeyed_by_booking_keep_their_rows_and_their_triggers() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        migrate(&conn, 1..=7);
        conn.execute_batch(
            "INSERT INTO claims (item_id, booking_id, resource_id, block_start, block_end, quantity, hold_expires_at)
             VALUES ('i1', 'b1', 'r1', 100, 200, 2, 500), ('i2', 'b1', 'r2', 100, 300, 1, NULL),
                    ('i3', 'b2', 'r1', 100, 200, 1, 500)",
        )
        .unwrap();
        let (claims_before, totals_before) = (claims(&conn), totals(&conn));
        assert_eq!(totals_before.len(), 2, "r1 lapsing at 500 (3 units), r2 never lapsing");

        migrate(&conn, 8..=8);
        let indexes = rows(&conn, "SELECT name FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'claims'", |r| {
            r.get::<_, String>(0)
        });
        assert!(indexes.is_empty(), "the key is the only b-tree: {indexes:?}");
        assert!(conn.prepare("SELECT rowid FROM claims").is_err(), "no rowid table beside the key");
        assert_eq!(claims(&conn), claims_before);
        assert_eq!(totals(&conn), totals_before);

        conn.execute_batch("DELETE FROM claims WHERE booking_id = 'b1'").unwrap();
        assert_eq!(totals(&conn), vec![("r1".to_owned(), 100, 200, 500, 1)]);
        conn.execute_batch("UPDATE claims SET hold_expires_at = NULL WHERE booking_id = 'b2'").unwrap();
        assert_eq!(totals(&conn), vec![("r1".to_owned(), 100, 200, NEVER_LAPSES, 1)]);
        conn.execute_batch(
            "INSERT INTO claims (item_id, booking_id, resource_id, block_start, block_end, quantity, hold_expires_at)
             VALUES ('i4', 'b3', 'r1', 0, 1000, 1, 700)",
        )
        .unwrap();
        assert_eq!(totals(&conn).len(), 2);
        let longest: i64 =
            conn.query_row("SELECT seconds FROM claim_longest WHERE resource_id = 'r1'", [], |r| r.get(0)).unwrap();
        assert_eq!(longest, 1000);
        let again = conn.execute_batch(
            "INSERT INTO claims (item_id, booking_id, resource_id, block_start, block_end, quantity)
             VALUES ('i4', 'b3', 'r2', 0, 10, 1)",
        );
        assert!(again.is_err(), "an item is claimed once per booking");
    }

    /// Migration 0010 moves the documents out of the booking rows: every booking reads back
    /// as it was, the indexes are rebuilt, and an event without a payload still shows it.
    #[test]
    fn bookings_split_from_their_documents_read_back_as_they_were() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        migrate(&conn, 1..=9);
        let doc = |id: &str, status: &str| {
            format!(r#"{{"id":"{id}","status":"{status}","updated_at":"2026-11-30T12:00:00.5Z","note":"é \"q\""}}"#)
        };
        conn.execute(
            "INSERT INTO bookings (id, customer_id, venue_id, status, expires_at, doc)
             VALUES ('b1', 'c1', 'v1', 'held', 500, ?1), ('b2', 'c1', 'v2', 'expired', NULL, ?2)",
            [doc("b1", "held"), doc("b2", "expired")],
        )
        .unwrap();
        conn.execute_batch(
            "INSERT INTO outbox (topic, aggregate_id, payload, created_at) VALUES ('booking.expired', 'b2', NULL, 1)",
        )
        .unwrap();

        // With 0011 too: the documents are read through the row's `doc_seq` since.
        migrate(&conn, 10..=11);
        let booked =
            rows(&conn, "SELECT id, customer_id, venue_id, status, expires_at FROM bookings ORDER BY seq", |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            });
        let want: Vec<(String, String, String, String, Option<i64>)> = vec![
            ("b1".into(), "c1".into(), "v1".into(), "held".into(), Some(500)),
            ("b2".into(), "c1".into(), "v2".into(), "expired".into(), None),
        ];
        assert_eq!(booked, want);
        for (id, status) in [("b1", "held"), ("b2", "expired")] {
            let (s, updated_at, d): (String, String, String) =
                conn.query_row(BOOKING_BY_ID, [id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap();
            assert_eq!((s.as_str(), updated_at.as_str(), d), (status, "2026-11-30T12:00:00.5Z", doc(id, status)));
        }
        let indexes =
            rows(&conn, "SELECT name FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'bookings'", |r| {
                r.get::<_, String>(0)
            });
        for index in ["bookings_customer", "bookings_venue", "bookings_expiry"] {
            assert!(indexes.iter().any(|i| i == index), "{index} in {indexes:?}");
        }
        let payload: String = conn.query_row("SELECT payload FROM outbox_events", [], |r| r.get(0)).unwrap();
        let payload: serde_json::Value = serde_json::from_str(&payload).unwrap();
        assert_eq!(payload, serde_json::from_str::<serde_json::Value>(&doc("b2", "expired")).unwrap());
    }

    /// Migration 0013 queues the refunds that cancellations before it owe (nothing made them
    /// later), parked for an operator: those of money paid, not yet made, of more than nothing.
    #[test]
    fn refunds_owed_before_the_reconciler_are_queued_for_it() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        migrate(&conn, 1..=12);
        let (bookings, owed) = crate::common::refund_backfill_cases();
        for (seq, (id, status, doc)) in (1_i64..).zip(bookings) {
            conn.execute("INSERT INTO booking_docs (seq, doc) VALUES (?, ?)", rusqlite::params![seq, doc]).unwrap();
            conn.execute(
                "INSERT INTO bookings (seq, id, customer_id, venue_id, status, updated_at, doc_seq)
                 VALUES (?1, ?2, 'c', 'v', ?3, 'u', ?1)",
                rusqlite::params![seq, id, status],
            )
            .unwrap();
        }
        migrate(&conn, 13..=13);
        let sql = "SELECT kind, payment_reference, booking_id, amount, attempts, next_at FROM refunds_due";
        let queued = rows(&conn, sql, |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)));
        assert_eq!(queued, vec![owed]);
    }

    /// Migration 0011 makes documents versions: the documents already stored stay each
    /// booking's current one, events written before it keep their own payloads, and a
    /// payload-less event of a final status still shows the booking as it is.
    #[test]
    fn document_versions_keep_what_was_stored_and_events_read_the_version_they_name() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        migrate(&conn, 1..=10);
        let doc = |id: &str, status: &str| format!(r#"{{"id":"{id}","status":"{status}","updated_at":"u0"}}"#);
        conn.execute_batch(&format!(
            "INSERT INTO bookings (seq, id, customer_id, venue_id, status, expires_at, updated_at)
             VALUES (7, 'b1', 'c1', 'v1', 'held', 500, 'u0'), (9, 'b2', 'c1', 'v1', 'expired', NULL, 'u1');
             INSERT INTO booking_docs (seq, doc) VALUES (7, '{}'), (9, '{}');
             INSERT INTO outbox (topic, aggregate_id, payload, created_at)
             VALUES ('booking.held', 'b1', '{}', 1), ('booking.expired', 'b2', NULL, 2);",
            doc("b1", "held"),
            doc("b2", "held"),
            doc("b1", "held"),
        ))
        .unwrap();

        migrate(&conn, 11..=11);
        let current = |id: &str| -> String { conn.query_row(BOOKING_BY_ID, [id], |r| r.get(2)).unwrap() };
        assert_eq!(current("b1"), doc("b1", "held"));
        assert_eq!(current("b2"), doc("b2", "held"), "the document as stored; the row's status is read over it");
        // A version appended later (as a change does) gets a number no booking's document had.
        conn.execute_batch(&format!(
            "INSERT INTO booking_docs (doc) VALUES ('{}');
             UPDATE bookings SET status = 'confirmed', doc_seq = last_insert_rowid() WHERE id = 'b1';
             INSERT INTO outbox (topic, aggregate_id, doc_seq, created_at)
             SELECT 'booking.confirmed', 'b1', doc_seq, 3 FROM bookings WHERE id = 'b1';",
            doc("b1", "confirmed"),
        ))
        .unwrap();
        let seq: i64 = conn.query_row("SELECT doc_seq FROM bookings WHERE id = 'b1'", [], |r| r.get(0)).unwrap();
        assert_eq!(seq, 10);
        assert_eq!(current("b1"), doc("b1", "confirmed"));
        let events = rows(&conn, "SELECT topic, payload FROM outbox_events ORDER BY seq", |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        });
        let expired: serde_json::Value = serde_json::from_str(&events[1].1).unwrap();
        assert_eq!(expired["status"], "expired");
        assert_eq!(expired["updated_at"], "u1");
        assert_eq!(
            [(&events[0].0, &events[0].1), (&events[2].0, &events[2].1)],
            [
                (&"booking.held".to_owned(), &doc("b1", "held")),
                (&"booking.confirmed".to_owned(), &doc("b1", "confirmed"))
            ]
        );
    }
}
