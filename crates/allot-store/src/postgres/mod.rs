//! The PostgreSQL implementation of the Store port, for many stateless nodes over one database.
//!
//! Reads go to a small pool; every write goes through this node's group-commit [`Writer`].
//! Across nodes, I1 is decided by the database: a batch locks the `resource_clocks` rows of
//! every resource its requests decide on, in resource-id order, before running them (so
//! batches of different nodes serialize per resource and cannot deadlock), and decides at a
//! `now` no earlier than any node's earlier decision on those resources. Claims on capacity-one
//! resources are also guarded by an exclusion constraint. Catalogue documents are cached per
//! node and invalidated through `LISTEN`/`NOTIFY` ([`crate::cache`]).

use std::collections::BTreeSet;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use allot_app::StoreError;
use allot_app::access::{ApiKey, RoleGrant, RoleRevoke};
use allot_app::audit::{AuditEvent, AuditFilter, AuditPage};
use allot_app::store::{
    BookingFilter, Decide, HoldCommand, HoldKey, HoldRefused, IdempotencyBegin, IdempotencyKey, IdempotencyMark,
    KeyedHoldOutcome, Page, PageRequest, RefreshToken, RefundDue, RefundKind, Role, RotateOutcome, SeatStates, Store,
    UpdateRefused, User,
};
use allot_core::booking::Booking;
use allot_core::capacity::{Claim, Span};
use allot_core::ids::{ApiKeyId, BookingId, EventId, ResourceId, UserId, VenueId};
use allot_core::inventory::{Event, Resource, Venue};
use async_trait::async_trait;
use futures::future::BoxFuture;
use jiff::Timestamp;
use serde::de::DeserializeOwned;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{Connection, PgConnection, Postgres, QueryBuilder};

use crate::access::{self, NOT_A_MANAGER, all_managers};
use crate::cache::{self, Cache, INVALIDATE_ALL};
use crate::common::{ABANDON_CHANGED_SQL, ABANDON_UNCHANGED_SQL, DocTable, KeyFound, venue_inserted};
use crate::common::{
    AUDIT_COLUMNS, AUDIT_HEAD_SQL, AuditRow, KeyRow, RefundRow, Rotation, Succession, TokenRow, USER_COLUMNS,
    UserVenuesRow, VENUE_IN_USE, add_seat_states, after_key, audit_events_of, audit_head_of, audit_range_query,
    audit_rotation, audit_select, booking_ids, chain, claims_from_rows, decided, docs_to_page, existing_key, expired,
    from_json, from_json_db, hold_expiry, is_unique_violation, pending_payments_query, refund_due_of, refund_queued,
    refunds_due_query, refunds_of_payment_query, rotation, to_json, ts, user_of_venues_row,
};
use crate::writer::{
    Backend, HoldResults, KeyBegin, KeyBegun, KeyCompletion, Outcome, TxnRef, WriteCtx, Writer, db_error, marks_fenced,
};

mod holds;

pub const READ_POOL_CONNECTIONS_MAX: u32 = 8;
pub const CONNECT_TIMEOUT_SECONDS: u64 = 10;
/// The channel catalogue changes are announced on; the payload is a [`cache::key`].
pub const CATALOG_CHANNEL: &str = "allot_catalog";
pub const LISTENER_RETRY_SECONDS: u64 = 1;
/// Write connections of one node, each with its own batches (`Writer::start_lanes`).
pub const WRITE_LANES: usize = 2;
/// Longest a batch waits for a row another node has locked. Batches hold their locks for
/// milliseconds; a longer wait means the holder is stuck, and this node's whole write queue
/// is waiting behind it. The batch then fails as busy (503, retry) instead of waiting forever.
pub const WRITE_LOCK_WAIT_MILLISECONDS_MAX: u64 = 3000;
/// A write session idle inside a transaction this long (its node partitioned or frozen
/// mid-batch) is ended by the server, which releases the locks it held for the other nodes.
pub const WRITE_IDLE_IN_TRANSACTION_SECONDS_MAX: u64 = 10;
/// Longest one statement of a write may run.
pub const WRITE_STATEMENT_SECONDS_MAX: u64 = 30;
/// Longest a lane waits to learn whether a COMMIT whose answer was lost committed
/// ([`Backend::commit_outcome`]); its other requests wait behind it meanwhile.
pub const COMMIT_OUTCOME_WAIT_MILLISECONDS_MAX: u64 = 5000;
/// Pause between two asks of that outcome.
const COMMIT_OUTCOME_POLL_MILLISECONDS: u64 = 20;
/// Ends the session that ran transaction `$2` (process `$1`), if it still runs it. The xid
/// check keeps a process id the server has since given to another session safe.
const END_TXN_SESSION_SQL: &str = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
     WHERE pid = $1 AND backend_xid::text = ($2 % 4294967296)::text";
/// Ids per `= ANY($1)` array in one read.
const IDS_PER_QUERY_MAX: usize = 1000;

/// Locks a batch's `resource_clocks` rows and reads the latest `now` decided on them. One index
/// probe per key, in the keys' order (sorted by the writer: one global order for every node, so
/// batches cannot deadlock). As `resource_id = ANY($1)` the planner scanned the whole (small)
/// table comparing every row with every key, a tenth of the write sessions' time under load.
const LOCK_CLOCKS_SQL: &str = "SELECT max(c.last_now) FROM unnest($1::text[]) AS k(id)
     CROSS JOIN LATERAL (SELECT last_now FROM resource_clocks WHERE resource_id = k.id FOR UPDATE) c";

/// The batch transaction's name ([`TxnRef`]: its id and the session's process id), selected
/// by the statements that seal a batch. Naming it at BEGIN instead (a second statement there,
/// and the id assigned before the batch's first write) cost ~14 % of the holds per second.
macro_rules! txn_ref_columns {
    () => {
        "pg_current_xact_id()::text::bigint, pg_backend_pid()"
    };
}
/// Stamps the batch clock `$2` on its resources `$1`: rows found by index probe (as in
/// [`LOCK_CLOCKS_SQL`]) and updated through a join on `ctid` (a TID lookup each), which cannot
/// change meanwhile, the batch holding their locks. `ctid = ANY(…)` was planned as a scan too.
macro_rules! stamp_clocks_sql {
    () => {
        "UPDATE resource_clocks t SET last_now = $2
         FROM (SELECT c.ctid AS tid FROM unnest($1::text[]) AS k(id)
               CROSS JOIN LATERAL (
                 SELECT ctid FROM resource_clocks WHERE resource_id = k.id AND last_now < $2 OFFSET 0) c) x
         WHERE t.ctid = x.tid"
    };
}
/// [`STAMP_CLOCKS_SQL`] returning the [`TxnRef`].
const STAMP_CLOCKS_SQL: &str = concat!("WITH stamped AS (", stamp_clocks_sql!(), ") SELECT ", txn_ref_columns!());
/// Locks the audit chain's head and reads it, with the [`TxnRef`] and how many idempotency
/// marks were written (none here).
macro_rules! lock_head_sql {
    () => {
        concat!("SELECT seq, hash, ", txn_ref_columns!(), ", 0::int8 FROM audit_head WHERE id = 1 FOR UPDATE")
    };
}
const LOCK_HEAD_SQL: &str = lock_head_sql!();
/// [`STAMP_CLOCKS_SQL`] and [`LOCK_HEAD_SQL`] in one statement.
const STAMP_CLOCKS_LOCK_HEAD_SQL: &str = concat!("WITH stamped AS (", stamp_clocks_sql!(), ") ", lock_head_sql!());
/// Writes a batch's idempotency marks (arrays of principals, keys, owners and targets at the
/// four parameters given), each only where its attempt still holds the key, as a CTE `marked`.
macro_rules! mark_keys_sql {
    ($principals:literal, $keys:literal, $owners:literal, $targets:literal) => {
        concat!(
            "marked AS (UPDATE idempotency_keys k SET committed_target = m.target
               FROM unnest(",
            $principals,
            "::text[], ",
            $keys,
            "::text[], ",
            $owners,
            "::text[], ",
            $targets,
            "::text[])
                 AS m(principal, key, owner, target)
               WHERE k.principal = m.principal AND k.key = m.key AND k.owner = m.owner AND k.status IS NULL
               RETURNING 1) "
        )
    };
}
/// [`LOCK_HEAD_SQL`] after `marked` has run to the end (its count, a one-time filter, is
/// evaluated before the head is scanned): key rows are locked before the head, never after
/// (see `Backend::seal`); the last column is how many marks were written. In the same
/// statement, not one of their own: a round trip less per batch with keyed requests
/// (docs/benchmarks-history.md, sessions of 2026-12-06, fourth, and 2026-12-07).
macro_rules! lock_head_after_marks_sql {
    () => {
        concat!(
            "SELECT seq, hash, ",
            txn_ref_columns!(),
            ", (SELECT count(*) FROM marked) FROM audit_head WHERE id = 1 AND (SELECT count(*) FROM marked) >= 0
             FOR UPDATE"
        )
    };
}
/// Whether the statements that join a batch's keys to `idempotency_keys` are kept prepared.
/// They are not: a kept statement's plan is made for the table as it was then, and one made
/// while it was nearly empty (a new database) hashes the batch's keys and scans the whole
/// table, milliseconds per batch once it holds a few thousand keys, until an `ANALYZE`
/// happens to replan it (seen under load: `docs/benchmarks-history.md`). Planned afresh each time
/// they probe its key (a round trip more, to parse).
const KEY_JOINS_PERSISTENT: bool = false;
/// [`LOCK_HEAD_SQL`] with the batch's marks written first.
const MARK_LOCK_HEAD_SQL: &str = concat!("WITH ", mark_keys_sql!("$1", "$2", "$3", "$4"), lock_head_after_marks_sql!());
/// [`STAMP_CLOCKS_LOCK_HEAD_SQL`] with the batch's marks written before the head's lock.
const STAMP_CLOCKS_MARK_LOCK_HEAD_SQL: &str = concat!(
    "WITH stamped AS (",
    stamp_clocks_sql!(),
    "), ",
    mark_keys_sql!("$3", "$4", "$5", "$6"),
    lock_head_after_marks_sql!()
);

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

type Ctx = WriteCtx<PgConnection>;

/// Chained events inserted and the chain's head moved, in one statement (`Backend::seal`); the
/// arrays are `AuditColumns`' fields, in `AUDIT_COLUMNS` order.
static AUDIT_APPEND_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH appended AS (
           INSERT INTO audit_events ({AUDIT_COLUMNS})
           SELECT * FROM unnest($1::int8[], $2::text[], $3::int8[], $4::text[], $5::text[], $6::text[], $7::text[],
                                $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[],
                                $14::text[], $15::text[]))
         UPDATE audit_head SET seq = $16, hash = $17 WHERE id = 1"
    )
});

/// A batch's audit events as column arrays for `unnest` (`AUDIT_APPEND_SQL`).
#[derive(Default)]
struct AuditColumns {
    seq: Vec<i64>,
    id: Vec<String>,
    at: Vec<i64>,
    actor_id: Vec<Option<String>>,
    actor_role: Vec<String>,
    ip: Vec<Option<String>>,
    request_id: Vec<Option<String>>,
    action: Vec<String>,
    target_id: Vec<Option<String>>,
    venue_id: Vec<Option<String>>,
    outcome: Vec<String>,
    reason: Vec<Option<String>>,
    details: Vec<String>,
    prev_hash: Vec<String>,
    hash: Vec<String>,
}

impl AuditColumns {
    fn of(events: &[AuditEvent]) -> Result<AuditColumns, sqlx::Error> {
        let mut c = AuditColumns::default();
        for e in events {
            let (seq, at, details) = crate::common::audit_values(e)?;
            c.seq.push(seq);
            c.id.push(e.id.clone());
            c.at.push(at);
            c.actor_id.push(e.actor_id.clone());
            c.actor_role.push(e.actor_role.clone());
            c.ip.push(e.ip.clone());
            c.request_id.push(e.request_id.clone());
            c.action.push(e.action.clone());
            c.target_id.push(e.target_id.clone());
            c.venue_id.push(e.venue_id.map(|v| v.to_string()));
            c.outcome.push(e.outcome.as_str().to_owned());
            c.reason.push(e.reason.clone());
            c.details.push(details);
            c.prev_hash.push(e.prev_hash.clone());
            c.hash.push(e.hash.clone());
        }
        Ok(c)
    }
}

/// PostgreSQL under the writer: per-resource row locks and clocks, and a reconnect when the
/// write connection dies.
#[derive(Clone)]
pub(crate) struct PgBackend {
    options: PgConnectOptions,
}

impl PgBackend {
    /// A new write session ([`write_session`]'s settings), for a lane starting or replacing its
    /// connection.
    fn connect(&self) -> BoxFuture<'_, Result<PgConnection, sqlx::Error>> {
        Box::pin(PgConnection::connect_with(&self.options))
    }
}

impl Backend for PgBackend {
    type Conn = PgConnection;
    type Error = sqlx::Error;

    fn error(e: sqlx::Error) -> StoreError {
        db_error(e)
    }

    fn begin<'c>(&'c self, conn: &'c mut PgConnection) -> BoxFuture<'c, Result<(), sqlx::Error>> {
        self.execute(conn, "BEGIN")
    }

    fn commit_outcome<'c>(&'c self, conn: &'c mut PgConnection, txn: TxnRef) -> BoxFuture<'c, Option<bool>> {
        Box::pin(commit_outcome(self, conn, txn))
    }

    fn execute<'c>(&'c self, conn: &'c mut PgConnection, sql: &'static str) -> BoxFuture<'c, Result<(), sqlx::Error>> {
        Box::pin(execute_raw(conn, sql))
    }

    fn lock<'c>(
        &'c self,
        conn: &'c mut PgConnection,
        keys: &'c [String],
    ) -> BoxFuture<'c, Result<Option<Timestamp>, sqlx::Error>> {
        Box::pin(async move {
            let last: Option<i64> = sqlx::query_scalar(LOCK_CLOCKS_SQL).bind(keys).fetch_one(conn).await?;
            Ok(last.map(ts))
        })
    }

    fn seal<'c>(
        &'c self,
        conn: &'c mut PgConnection,
        keys: &'c [String],
        now: Timestamp,
        events: &'c mut [AuditEvent],
        marks: &'c [IdempotencyMark],
    ) -> BoxFuture<'c, Outcome<Option<TxnRef>, StoreError, sqlx::Error>> {
        Box::pin(async move {
            if events.is_empty() {
                // Nothing to append, so nothing marked either (a mark comes with its event).
                let (id, session) =
                    sqlx::query_as(STAMP_CLOCKS_SQL).bind(keys).bind(now.as_second()).fetch_one(conn).await?;
                return Ok(Ok(Some(TxnRef { id, session })));
            }
            // The head is locked last, after the batch's resources and the key rows its marks
            // write, and held only until COMMIT: every node's batches append one after another,
            // so the chain never forks. The clocks are stamped and the marks written by the same
            // statement, one round trip less each.
            let (principals, keys_marked, owners, targets) = mark_columns(marks);
            let head: (i64, String, i64, i32, i64) = match (keys.is_empty(), marks.is_empty()) {
                (true, true) => sqlx::query_as(LOCK_HEAD_SQL).fetch_one(&mut *conn).await?,
                (true, false) => {
                    let query = sqlx::query_as(MARK_LOCK_HEAD_SQL)
                        .persistent(KEY_JOINS_PERSISTENT)
                        .bind(principals)
                        .bind(keys_marked)
                        .bind(owners)
                        .bind(targets);
                    query.fetch_one(&mut *conn).await?
                }
                (false, true) => {
                    let query = sqlx::query_as(STAMP_CLOCKS_LOCK_HEAD_SQL).bind(keys).bind(now.as_second());
                    query.fetch_one(&mut *conn).await?
                }
                (false, false) => {
                    let query = sqlx::query_as(STAMP_CLOCKS_MARK_LOCK_HEAD_SQL)
                        .persistent(KEY_JOINS_PERSISTENT)
                        .bind(keys)
                        .bind(now.as_second())
                        .bind(principals)
                        .bind(keys_marked)
                        .bind(owners)
                        .bind(targets);
                    query.fetch_one(&mut *conn).await?
                }
            };
            let (seq, hash, id, session, marked) = head;
            if let Err(taken_over) = marks_fenced(marks, u64::try_from(marked).unwrap_or(0)) {
                return Ok(Err(taken_over));
            }
            let (seq, hash) = chain(events, u64::try_from(seq).unwrap_or(0), hash);
            // The rows and the new head in one statement: one round trip less while the
            // head, which every lane and node appends behind, is locked.
            let c = AuditColumns::of(events)?;
            sqlx::query(AUDIT_APPEND_SQL.as_str())
                .bind(c.seq)
                .bind(c.id)
                .bind(c.at)
                .bind(c.actor_id)
                .bind(c.actor_role)
                .bind(c.ip)
                .bind(c.request_id)
                .bind(c.action)
                .bind(c.target_id)
                .bind(c.venue_id)
                .bind(c.outcome)
                .bind(c.reason)
                .bind(c.details)
                .bind(c.prev_hash)
                .bind(c.hash)
                .bind(i64::try_from(seq).unwrap_or(i64::MAX))
                .bind(hash)
                .execute(conn)
                .await?;
            Ok(Ok(Some(TxnRef { id, session })))
        })
    }

    fn holds<'c>(
        &'c self,
        ctx: &'c mut Ctx,
        holds: Vec<HoldCommand>,
    ) -> BoxFuture<'c, Result<HoldResults, sqlx::Error>> {
        Box::pin(holds::holds_in_tx(ctx, holds))
    }

    fn begin_keys<'c>(
        &'c self,
        ctx: &'c mut Ctx,
        begins: Vec<KeyBegin>,
    ) -> BoxFuture<'c, Result<KeyBegun, sqlx::Error>> {
        Box::pin(idempotency_begin_in_tx(ctx, begins))
    }

    fn complete_keys<'c>(
        &'c self,
        conn: &'c mut PgConnection,
        completions: Vec<KeyCompletion>,
    ) -> BoxFuture<'c, Result<(), sqlx::Error>> {
        Box::pin(idempotency_complete_in_tx(conn, completions))
    }

    fn reconnect(&self) -> BoxFuture<'_, Option<PgConnection>> {
        Box::pin(async move {
            match self.connect().await {
                Ok(conn) => Some(conn),
                Err(e) => {
                    tracing::error!(error = %e, "reconnecting the write connection failed");
                    None
                }
            }
        })
    }
}

/// Whether `txn` committed, asked until the server knows ([`Backend::commit_outcome`]). While
/// it is in progress its session has either not read the COMMIT (waiting on a client that is
/// gone, until `idle_in_transaction_session_timeout`) or is still committing: that session is
/// ended, which settles it (a commit under way completes first). A dead `conn` is replaced.
async fn commit_outcome(backend: &PgBackend, conn: &mut PgConnection, txn: TxnRef) -> Option<bool> {
    let deadline = std::time::Instant::now() + Duration::from_millis(COMMIT_OUTCOME_WAIT_MILLISECONDS_MAX);
    let mut ended = false;
    loop {
        let status: Result<Option<String>, sqlx::Error> = sqlx::query_scalar("SELECT pg_xact_status($1::text::xid8)")
            .bind(txn.id.to_string())
            .fetch_one(&mut *conn)
            .await;
        match status.as_ref().map(Option::as_deref) {
            Ok(Some("committed")) => return Some(true),
            Ok(Some("aborted")) => return Some(false),
            // Too old for the server to remember, or a question it refuses: no retry helps.
            Ok(None) | Err(sqlx::Error::Database(_)) => return None,
            Ok(Some(_in_progress)) if !ended => {
                ended =
                    sqlx::query(END_TXN_SESSION_SQL).bind(txn.session).bind(txn.id).execute(&mut *conn).await.is_ok();
            }
            Ok(Some(_in_progress)) => {}
            Err(e) => match backend.connect().await {
                Ok(fresh) => {
                    tracing::warn!(error = %e, "write connection replaced to learn a COMMIT's outcome");
                    *conn = fresh;
                }
                Err(e) => tracing::warn!(error = %e, "no connection to learn a COMMIT's outcome"),
            },
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(COMMIT_OUTCOME_POLL_MILLISECONDS)).await;
    }
}

pub struct PgStore {
    read: PgPool,
    writer: Writer<PgBackend>,
    cache: Arc<Cache>,
    listener: tokio::task::JoinHandle<()>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// A bind parameter of [`PgStore::exec_one`].
#[derive(Clone)]
enum Arg {
    Text(String),
    Int(i64),
    /// `NULL` when `None`.
    OptInt(Option<i64>),
}

impl PgStore {
    /// Connects to `url` (`postgres://…`), applies migrations (under sqlx's advisory lock, so
    /// nodes starting together are safe), starts the writer ([`WRITE_LANES`] lanes) and the
    /// cache listener.
    pub async fn open(url: &str) -> Result<PgStore, StoreError> {
        PgStore::open_with_lanes(url, WRITE_LANES).await
    }

    /// [`PgStore::open`] with a writer of `lanes` lanes (1..=[`crate::writer::LANES_MAX`]): one
    /// lane puts requests queued together into one batch, in their order (tests that stage
    /// interleavings between nodes rely on it).
    pub async fn open_with_lanes(url: &str, lanes: usize) -> Result<PgStore, StoreError> {
        let options = PgConnectOptions::from_str(url).map_err(db_error)?.application_name("allot");
        let read = PgPoolOptions::new()
            .max_connections(READ_POOL_CONNECTIONS_MAX)
            .acquire_timeout(Duration::from_secs(CONNECT_TIMEOUT_SECONDS))
            .connect_with(options.clone())
            .await
            .map_err(db_error)?;
        // Through the pool (one connection of it holds the lock): `&mut PgConnection` would
        // make this future unusable with `tokio::spawn` (rust-lang/rust#100013).
        MIGRATOR.run(&read).await.map_err(|e| StoreError::Database(format!("migrations: {e}")))?;
        let options = write_session(options);
        let writer = Writer::start_lanes(PgBackend { options: options.clone() }, lanes, PgBackend::connect).await?;
        let cache = Arc::new(Cache::default());
        let listen_pool = PgPoolOptions::new().max_connections(1).connect_lazy_with(options.clone());
        let listener = connect_listener(&listen_pool).await.map_err(db_error)?;
        cache.set_enabled(true);
        let listener = tokio::spawn(listen(listen_pool, listener, cache.clone()));
        Ok(PgStore { read, writer, cache, listener })
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

    /// The one user whose `column` equals `value`.
    async fn user_where(&self, column: &'static str, value: String) -> Result<Option<User>, StoreError> {
        let sql = format!(
            "SELECT {USER_COLUMNS}, (SELECT string_agg(venue_id, ',') FROM venue_managers WHERE user_id = users.id)
             FROM users WHERE {column} = $1"
        );
        let row: Option<UserVenuesRow> =
            sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(value).fetch_optional(&self.read).await.map_err(db_error)?;
        row.map(user_of_venues_row).transpose()
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
            .exec_retrying(move |ctx: &mut Ctx| -> BoxFuture<'_, Outcome<RotateOutcome, StoreError>> {
                Box::pin(async move {
                    let outcome =
                        succeed_in_tx(ctx, succession, old_hash, new_hash.clone(), new_expires_at, now).await?;
                    audit_rotation(audit.as_ref(), succession, &new_hash, &outcome);
                    Ok(outcome)
                })
            })
            .await
    }

    /// Writes one statement through the writer, mapping a unique violation to `Conflict`.
    async fn exec_one(&self, sql: &'static str, args: Vec<Arg>, conflict: &'static str) -> Result<u64, StoreError> {
        self.writer
            .exec(move |ctx: &mut Ctx| -> BoxFuture<'_, Outcome<u64, StoreError>> {
                Box::pin(statement(&mut ctx.conn, sql, args, conflict))
            })
            .await
    }

    /// Runs a catalogue change with `locks` held; when it succeeds, `keys` are announced to every
    /// node in the same transaction and dropped from this node's cache at once.
    async fn change_catalog<T, F>(&self, locks: Vec<String>, keys: Vec<String>, change: F) -> Result<T, StoreError>
    where
        F: for<'c> FnOnce(&'c mut Ctx) -> BoxFuture<'c, Outcome<T, StoreError>> + Clone + Send + 'static,
        T: Send + 'static,
    {
        let announced = keys.clone();
        let result = self
            .writer
            .write_locked_retrying(locks, move |ctx: &mut Ctx| -> BoxFuture<'_, Outcome<T, StoreError>> {
                Box::pin(async move {
                    let outcome = change(&mut *ctx).await?;
                    if outcome.is_ok() {
                        for key in &announced {
                            announce(&mut ctx.conn, key).await?;
                        }
                    }
                    Ok(outcome)
                })
            })
            .await?;
        for key in &keys {
            self.cache.invalidate(key);
        }
        result
    }

    /// Resource ids a booking's items use (items never change), to lock before deciding on it.
    async fn booking_keys(&self, id: BookingId) -> Result<Vec<String>, StoreError> {
        let booking = self.booking(id).await?;
        Ok(resource_keys(booking.iter().flat_map(|b| b.items.iter().map(|i| i.resource_id))))
    }
}

/// The write connection's limits: no wait on another session and no stall of its own lasts
/// long enough to stop the other nodes' writers.
fn write_session(options: PgConnectOptions) -> PgConnectOptions {
    options.options([
        ("lock_timeout", format!("{WRITE_LOCK_WAIT_MILLISECONDS_MAX}ms")),
        ("idle_in_transaction_session_timeout", format!("{WRITE_IDLE_IN_TRANSACTION_SECONDS_MAX}s")),
        ("statement_timeout", format!("{WRITE_STATEMENT_SECONDS_MAX}s")),
    ])
}

fn resource_keys(ids: impl IntoIterator<Item = ResourceId>) -> Vec<String> {
    ids.into_iter().map(|id| id.to_string()).collect::<BTreeSet<_>>().into_iter().collect()
}

async fn connect_listener(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CATALOG_CHANNEL).await?;
    Ok(listener)
}

/// Applies other nodes' (and this node's) catalogue notifications to the cache. Whenever the
/// listening connection is lost, changes may have been missed: the cache is emptied and stays
/// off until listening again. The lost listener is dropped before reconnecting, returning its
/// connection to the one-connection pool the new one needs.
async fn listen(pool: PgPool, listener: PgListener, cache: Arc<Cache>) {
    let mut listener = Some(listener);
    loop {
        let Some(mut connected) = listener.take() else {
            tokio::time::sleep(Duration::from_secs(LISTENER_RETRY_SECONDS)).await;
            listener = connect_listener(&pool).await.ok();
            if listener.is_some() {
                cache.set_enabled(true);
            }
            continue;
        };
        match connected.try_recv().await {
            Ok(Some(notification)) => {
                cache.invalidate(notification.payload());
                listener = Some(connected);
            }
            // `Ok(None)`: the connection was lost (the next call would reconnect, but without
            // telling when); `Err`: it could not be used. Either way, listen afresh.
            lost => {
                cache.set_enabled(false);
                tracing::warn!(error = ?lost.err(), "catalogue listener lost; cache off until it reconnects");
            }
        }
    }
}

const VENUE_DOCS: DocTable = DocTable {
    // Not `FOR UPDATE`: edits must not wait for (or deadlock with) the resources and events
    // being created under the venue, which hold its row `FOR KEY SHARE` (`hold_live_venue`).
    select: "SELECT doc::text FROM venues WHERE id = $1 AND deleted_at IS NULL FOR NO KEY UPDATE",
    update: "UPDATE venues SET doc = $1::json WHERE id = $2",
    what: "venue",
};

const RESOURCE_DOCS: DocTable = DocTable {
    select: "SELECT doc::text FROM resources WHERE id = $1 AND deleted_at IS NULL FOR UPDATE",
    update: "UPDATE resources SET doc = $1::json WHERE id = $2",
    what: "resource",
};

/// Writes `after` over the live document `id` if the stored one still equals `before`
/// (compared as parsed, so a document an older version wrote compares by what it says).
async fn replace_doc<T: serde::de::DeserializeOwned + PartialEq>(
    conn: &mut PgConnection,
    table: &DocTable,
    id: &str,
    before: &T,
    after: &str,
) -> Outcome<(), StoreError> {
    let stored: Option<String> = sqlx::query_scalar(table.select).bind(id).fetch_optional(&mut *conn).await?;
    let Some(stored) = stored else { return Ok(Err(StoreError::NotFound(table.what))) };
    if from_json_db::<T>(&stored)? != *before {
        return Ok(Err(StoreError::Changed(table.what)));
    }
    sqlx::query(table.update).bind(after).bind(id).execute(&mut *conn).await?;
    Ok(Ok(()))
}

async fn statement(
    conn: &mut PgConnection,
    sql: &'static str,
    args: Vec<Arg>,
    conflict: &'static str,
) -> Outcome<u64, StoreError> {
    let mut q = sqlx::query(sql);
    for arg in args {
        q = match arg {
            Arg::Text(s) => q.bind(s),
            Arg::Int(i) => q.bind(i),
            Arg::OptInt(i) => q.bind(i),
        };
    }
    match q.execute(conn).await {
        Ok(r) => Ok(Ok(r.rows_affected())),
        Err(e) if is_unique_violation(&e) => Ok(Err(StoreError::Conflict(conflict.to_owned()))),
        Err(e) => Err(e),
    }
}

/// Runs `sql` with the simple protocol: it may hold several statements (savepoints, commit).
async fn execute_raw(conn: &mut PgConnection, sql: &'static str) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(conn).await.map(|_| ())
}

/// Tells every node's listener (this one's too) to drop `key`, when this transaction commits.
pub(crate) async fn announce(conn: &mut PgConnection, key: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, $2)").bind(CATALOG_CHANNEL).bind(key).execute(conn).await.map(|_| ())
}

async fn outbox(
    conn: &mut PgConnection,
    topic: &str,
    aggregate: &str,
    payload: &str,
    now: Timestamp,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO outbox (topic, aggregate_id, payload, created_at) VALUES ($1, $2, $3::json, $4)")
        .bind(topic)
        .bind(aggregate)
        .bind(payload)
        .bind(now.as_second())
        .execute(conn)
        .await
        .map(|_| ())
}

/// Claims on a resource that count at `now`, overlapping `span`: summed per block and expiry
/// (`claim_totals`), which is all the capacity rule needs and stays small on a hot resource.
/// The range starts at `span start - the longest claim the resource ever had` (`claim_longest`).
async fn live_claims<'e, E>(
    executor: E,
    resource: ResourceId,
    span: Span,
    now: Timestamp,
) -> Result<Vec<Claim>, sqlx::Error>
where
    E: sqlx::Executor<'e, Database = Postgres>,
{
    let rows: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT block_start, block_end, quantity FROM claim_totals
         WHERE resource_id = $1 AND block_start < $2
           AND block_start > $3 - COALESCE((SELECT seconds FROM claim_longest WHERE resource_id = $1), 0)
           AND block_end > $3 AND expires_at > $4",
    )
    .bind(resource.to_string())
    .bind(span.end)
    .bind(span.start)
    .bind(now.as_second())
    .fetch_all(executor)
    .await?;
    Ok(claims_from_rows(rows))
}

/// Writes a status change and keeps the claims table in step with it, with an outbox row for
/// the event it announces (`Booking::event_topic`).
async fn apply_change(
    conn: &mut PgConnection,
    before: &Booking,
    after: &Booking,
    now: Timestamp,
) -> Result<(), sqlx::Error> {
    let id = after.id.to_string();
    sqlx::query("UPDATE bookings SET status = $1, expires_at = $2, doc = $3::json WHERE id = $4")
        .bind(after.status.as_str())
        .bind(hold_expiry(after))
        .bind(to_json(after)?)
        .bind(&id)
        .execute(&mut *conn)
        .await?;
    if before.status.claims_capacity() && !after.status.claims_capacity() {
        sqlx::query("DELETE FROM claims WHERE booking_id = $1").bind(&id).execute(&mut *conn).await?;
    } else if after.status.claims_capacity() {
        sqlx::query("UPDATE claims SET hold_expires_at = $1 WHERE booking_id = $2")
            .bind(hold_expiry(after))
            .bind(&id)
            .execute(&mut *conn)
            .await?;
    }
    if let Some(topic) = before.event_topic(after) {
        outbox(conn, topic, &id, &to_json(after)?, now).await?;
    }
    queue_refund_owed(conn, before, after, now).await
}

/// Keeps a cancellation's refund queued exactly while the booking owes it
/// (`RefundKind::Cancellation`): from the change that owes it to the one that records it made.
async fn queue_refund_owed(
    conn: &mut PgConnection,
    before: &Booking,
    after: &Booking,
    now: Timestamp,
) -> Result<(), sqlx::Error> {
    let kind = RefundKind::Cancellation.as_str();
    match (before.refund_owed(), after.refund_owed()) {
        (None, Some((reference, amount))) => {
            let (attempts, next_at) = refund_queued(after, now);
            sqlx::query(
                "INSERT INTO refunds_due (payment_reference, kind, booking_id, amount, attempts, next_at)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            )
            .bind(reference)
            .bind(kind)
            .bind(after.id.to_string())
            .bind(amount)
            .bind(attempts)
            .bind(next_at)
            .execute(&mut *conn)
            .await?;
        }
        (Some((reference, _)), None) => {
            sqlx::query("DELETE FROM refunds_due WHERE payment_reference = $1 AND kind = $2")
                .bind(reference)
                .bind(kind)
                .execute(&mut *conn)
                .await?;
        }
        _ => {}
    }
    Ok(())
}

/// Expires one booking if it is still due at `now`. A booking another transaction has locked
/// is skipped (that one is changing it; a later sweep sees the outcome), so this never waits
/// and never expires a booking twice.
async fn expire_one(conn: &mut PgConnection, id: &str, now: Timestamp) -> Result<bool, sqlx::Error> {
    let doc: Option<String> = sqlx::query_scalar(
        "SELECT doc::text FROM bookings WHERE id = $1 AND status IN ('held', 'pending_payment')
         FOR UPDATE SKIP LOCKED",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(doc) = doc else { return Ok(false) };
    let before: Booking = from_json_db(&doc)?;
    let Some(after) = expired(&before, now) else { return Ok(false) };
    apply_change(conn, &before, &after, now).await?;
    Ok(true)
}

async fn succeed_in_tx(
    ctx: &mut Ctx,
    succession: Succession,
    old_hash: String,
    new_hash: String,
    new_expires_at: Timestamp,
    now: Timestamp,
) -> Outcome<RotateOutcome, StoreError> {
    let now = ctx.now(now).as_second();
    lock_family_of(&mut ctx.conn, &old_hash).await?;
    let row: Option<TokenRow> = sqlx::query_as(
        "SELECT user_id, family_id, expires_at, used_at, revoked_at FROM refresh_tokens WHERE token_hash = $1 FOR UPDATE",
    )
    .bind(&old_hash)
    .fetch_optional(&mut ctx.conn)
    .await?;
    let (user_id, family) = match rotation(row, now, succession) {
        Rotation::Invalid => return Ok(Ok(RotateOutcome::Invalid)),
        Rotation::RevokeFamily(family) => {
            revoke_family(&mut ctx.conn, &family, now).await?;
            return Ok(Ok(RotateOutcome::Reused));
        }
        Rotation::Rotate { user_id, family } => (user_id, family),
    };
    sqlx::query("UPDATE refresh_tokens SET used_at = $1 WHERE token_hash = $2")
        .bind(now)
        .bind(&old_hash)
        .execute(&mut ctx.conn)
        .await?;
    sqlx::query("INSERT INTO refresh_tokens (token_hash, user_id, family_id, expires_at) VALUES ($1, $2, $3, $4)")
        .bind(&new_hash)
        .bind(&user_id)
        .bind(&family)
        .bind(new_expires_at.as_second())
        .execute(&mut ctx.conn)
        .await?;
    let user_id = user_id.parse().map_err(|_| sqlx::Error::Protocol("bad user id".into()))?;
    Ok(Ok(RotateOutcome::Rotated { user_id }))
}

/// Logout ends the token's whole family: no rotated descendant stays valid, the successor of
/// a rotation still uncommitted on another node included ([`lock_family_of`]).
async fn revoke_in_tx(ctx: &mut Ctx, token_hash: String, now: Timestamp) -> Outcome<(), StoreError> {
    let now = ctx.now(now).as_second();
    let Some(family) = lock_family_of(&mut ctx.conn, &token_hash).await? else { return Ok(Ok(())) };
    revoke_family(&mut ctx.conn, &family, now).await?;
    Ok(Ok(()))
}

/// Whether venue `id` is live, holding its row (`FOR KEY SHARE`) until the transaction ends
/// if so: what a resource or event created under it takes, so that a deletion of the venue
/// waits for the creation and then sees what it created (`delete_venue_in_tx`).
async fn hold_live_venue(conn: &mut PgConnection, id: &str) -> Result<bool, sqlx::Error> {
    let live: Option<i32> =
        sqlx::query_scalar("SELECT 1 FROM venues WHERE id = $1 AND deleted_at IS NULL FOR KEY SHARE")
            .bind(id)
            .fetch_optional(conn)
            .await?;
    Ok(live.is_some())
}

/// Attempts at deleting a venue whose resources keep changing under it (`delete_venue_in_tx`).
const VENUE_DELETE_ATTEMPTS_MAX: u32 = 3;

/// Deletes venue `id` (its resources and events with it) unless a current or future claim
/// keeps it, in a batch that locked the clocks of the resources `locked` names: the ones it had
/// when the deletion was queued. `Changed` if it has another since (created on any node
/// before this batch took the venue's row): the caller starts over with it, so that a hold on
/// it is waited for and seen.
async fn delete_venue_in_tx(
    ctx: &mut Ctx,
    id: String,
    locked: BTreeSet<String>,
    now: Timestamp,
) -> Outcome<(), StoreError> {
    let at = ctx.now(now).as_second();
    // Resource and event creations hold the venue's row (`FOR KEY SHARE`) until they commit:
    // this waits for those under way, and none starts until this commits.
    sqlx::query("SELECT 1 FROM venues WHERE id = $1 FOR UPDATE").bind(&id).fetch_optional(&mut ctx.conn).await?;
    let resources: Vec<String> = sqlx::query_scalar("SELECT resource_id FROM resource_clocks WHERE venue_id = $1")
        .bind(&id)
        .fetch_all(&mut ctx.conn)
        .await?;
    if resources.iter().any(|r| !locked.contains(r)) {
        return Ok(Err(StoreError::Changed("venue")));
    }
    // Bookings in the past do not keep a venue alive, nor lapsed holds; current and future
    // bookings do. Through its resources' totals (by index), not a scan of every claim.
    let active: Option<i32> = sqlx::query_scalar(
        "SELECT 1 FROM claim_totals c JOIN resources r ON r.id = c.resource_id
         WHERE r.venue_id = $1 AND c.block_end > $2 AND c.expires_at > $2 LIMIT 1",
    )
    .bind(&id)
    .bind(at)
    .fetch_optional(&mut ctx.conn)
    .await?;
    if active.is_some() {
        return Ok(Err(StoreError::Conflict(VENUE_IN_USE.into())));
    }
    for sql in [
        "UPDATE venues SET deleted_at = $1 WHERE id = $2 AND deleted_at IS NULL",
        "UPDATE resources SET deleted_at = $1 WHERE venue_id = $2 AND deleted_at IS NULL",
        "UPDATE events SET deleted_at = $1 WHERE venue_id = $2 AND deleted_at IS NULL",
    ] {
        sqlx::query(sql).bind(at).bind(&id).execute(&mut ctx.conn).await?;
    }
    Ok(Ok(()))
}

/// Locks the rows of users about to manage a venue, as a change of their roles does, and
/// returns the roles of those that exist: a revocation of a manager's last venue, which drops
/// the role, must count the venue being assigned (a row its count cannot see until it
/// commits), or wait for it; a revocation of the role that came first is seen.
async fn lock_managers(conn: &mut PgConnection, managers: &[String]) -> Result<Vec<Vec<Role>>, sqlx::Error> {
    let roles: Vec<String> = sqlx::query_scalar("SELECT roles FROM users WHERE id = ANY($1) ORDER BY id FOR UPDATE")
        .bind(managers)
        .fetch_all(conn)
        .await?;
    Ok(roles.iter().map(|r| access::parse_roles(r)).collect())
}

/// Locks the family of refresh token `token_hash` until the transaction ends, and names it
/// (`None` for an unknown token). Every change to a family's tokens takes it first: a
/// revocation (a logout, a stolen copy presented) must see the successor that a rotation on
/// another node inserts, and a lock on the token it came through cannot give that (a logout
/// may come through an older token than the one being rotated, and the successor is a new
/// row, outside the revoking statement's snapshot). Family first, then rows: no two of these
/// changes wait on each other in opposite orders.
async fn lock_family_of(conn: &mut PgConnection, token_hash: &str) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT family_id FROM (SELECT family_id, pg_advisory_xact_lock(hashtextextended('refresh-family:' || family_id, 0))
         FROM refresh_tokens WHERE token_hash = $1) AS locked",
    )
    .bind(token_hash)
    .fetch_optional(conn)
    .await
}

async fn revoke_family(conn: &mut PgConnection, family: &str, now: i64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE refresh_tokens SET revoked_at = $1 WHERE family_id = $2 AND revoked_at IS NULL")
        .bind(now)
        .bind(family)
        .execute(conn)
        .await
        .map(|_| ())
}

/// Takes the new keys of `begins` in one statement, then reads each key that was already there
/// (a replay, a retry while in flight, a take-over) on its own ([`Backend::begin_keys`]).
async fn idempotency_begin_in_tx(ctx: &mut Ctx, begins: Vec<KeyBegin>) -> Result<KeyBegun, sqlx::Error> {
    let leases: Vec<(i64, i64)> = begins
        .iter()
        .map(|begin| {
            let now = ctx.now(begin.now).as_second();
            (now, now + i64::from(begin.lock_seconds))
        })
        .collect();
    // Inserted and then read in the keys' order, one order for every lane and node: two
    // batches taking the same two keys cannot each wait for the other's.
    let mut order: Vec<usize> = (0..begins.len()).collect();
    order.sort_by_key(|&i| (&begins[i].key.principal, &begins[i].key.key));
    let mut rows = KeyRows::default();
    for &i in &order {
        rows.push(&begins[i].key, leases[i]);
    }
    // Another node inserting the same key makes this wait for its commit, then skip it; the
    // same key twice here inserts the first one.
    let mut inserted: std::collections::HashSet<(String, String)> = sqlx::query_as(
        "INSERT INTO idempotency_keys (principal, key, request_hash, created_at, locked_until, owner)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[], $6::text[])
         ON CONFLICT DO NOTHING RETURNING principal, key",
    )
    .bind(&rows.principal)
    .bind(&rows.key)
    .bind(&rows.request_hash)
    .bind(&rows.created_at)
    .bind(&rows.locked_until)
    .bind(&rows.owner)
    .fetch_all(&mut ctx.conn)
    .await?
    .into_iter()
    .collect();
    // Of one key's begins, the first in the insertion order was inserted.
    let mut answers: KeyBegun = vec![Ok(IdempotencyBegin::Started); begins.len()];
    for i in order {
        let key = &begins[i].key;
        if !inserted.remove(&(key.principal.clone(), key.key.clone())) {
            let (now, lock_until) = leases[i];
            answers[i] = begin_existing_alone(ctx, key, now, lock_until).await?;
        }
    }
    Ok(answers)
}

/// [`begin_existing`] in a savepoint of its own: waiting on another batch's lock on the key
/// (a retry racing its own first attempt on another node) fails this begin only, not the
/// batch it shares. An `Err` is a savepoint that failed: the batch must be rolled back.
async fn begin_existing_alone(
    ctx: &mut Ctx,
    key: &IdempotencyKey,
    now: i64,
    lock_until: i64,
) -> Result<Result<IdempotencyBegin, StoreError>, sqlx::Error> {
    execute_raw(&mut ctx.conn, "SAVEPOINT key_begin").await?;
    let begun = begin_existing(ctx, key, now, lock_until).await;
    let end = if begun.is_ok() { "RELEASE key_begin" } else { "ROLLBACK TO key_begin; RELEASE key_begin" };
    execute_raw(&mut ctx.conn, end).await?;
    Ok(begun.map_err(db_error))
}

/// New key rows as column arrays for `unnest`.
#[derive(Default)]
struct KeyRows<'k> {
    principal: Vec<&'k str>,
    key: Vec<&'k str>,
    request_hash: Vec<&'k str>,
    created_at: Vec<i64>,
    locked_until: Vec<i64>,
    owner: Vec<&'k str>,
}

impl<'k> KeyRows<'k> {
    fn push(&mut self, key: &'k IdempotencyKey, (now, lock_until): (i64, i64)) {
        self.principal.push(&key.principal);
        self.key.push(&key.key);
        self.request_hash.push(&key.request_hash);
        self.created_at.push(now);
        self.locked_until.push(lock_until);
        self.owner.push(&key.owner);
    }
}

/// Attempt `key`'s answer when its key already existed: locked, read, and taken over if its
/// holder died.
async fn begin_existing(
    ctx: &mut Ctx,
    key: &IdempotencyKey,
    now: i64,
    lock_until: i64,
) -> Result<IdempotencyBegin, sqlx::Error> {
    let row: Option<KeyRow> = sqlx::query_as(concat!(crate::common::key_row_sql!(), " FOR UPDATE"))
        .bind(&key.principal)
        .bind(&key.key)
        .fetch_optional(&mut ctx.conn)
        .await?;
    let begun = match existing_key(row, &key.request_hash, now) {
        KeyFound::Answer(found) => return Ok(found),
        KeyFound::TakeOver(begun) => begun,
    };
    // The request that locked it died (or the key was just deleted): take over.
    sqlx::query(
        "INSERT INTO idempotency_keys (principal, key, request_hash, created_at, locked_until, owner)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (principal, key) DO UPDATE
         SET request_hash = excluded.request_hash, locked_until = excluded.locked_until,
             created_at = excluded.created_at, owner = excluded.owner",
    )
    .bind(&key.principal)
    .bind(&key.key)
    .bind(&key.request_hash)
    .bind(now)
    .bind(lock_until)
    .bind(&key.owner)
    .execute(&mut ctx.conn)
    .await?;
    Ok(begun)
}

/// Stores the answers of `completions` in one statement ([`Backend::complete_keys`]).
async fn idempotency_complete_in_tx(
    conn: &mut PgConnection,
    completions: Vec<KeyCompletion>,
) -> Result<(), sqlx::Error> {
    let column = |field: fn(&KeyCompletion) -> &str| completions.iter().map(field).collect::<Vec<_>>();
    let statuses: Vec<i64> = completions.iter().map(|c| i64::from(c.status)).collect();
    let bodies: Vec<&[u8]> = completions.iter().map(|c| c.body.as_slice()).collect();
    sqlx::query(
        "UPDATE idempotency_keys k SET status = c.status, body = c.body, locked_until = NULL
         FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::bytea[]) AS c(principal, key, owner, status, body)
         WHERE k.principal = c.principal AND k.key = c.key AND k.owner = c.owner AND k.status IS NULL",
    )
    .persistent(KEY_JOINS_PERSISTENT)
    .bind(column(|c| &c.key.principal))
    .bind(column(|c| &c.key.key))
    .bind(column(|c| &c.key.owner))
    .bind(statuses)
    .bind(bodies)
    .execute(conn)
    .await?;
    Ok(())
}

/// A batch's idempotency marks as column arrays for `unnest` ([`MARK_LOCK_HEAD_SQL`]).
fn mark_columns(marks: &[IdempotencyMark]) -> (Vec<&str>, Vec<&str>, Vec<&str>, Vec<&str>) {
    let column = |field: fn(&IdempotencyMark) -> &str| marks.iter().map(field).collect();
    (column(|m| &m.principal), column(|m| &m.key), column(|m| &m.owner), column(|m| &m.target))
}

fn venue_doc(venue: &Venue) -> Result<String, StoreError> {
    serde_json::to_string(venue).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn resource_doc(resource: &Resource) -> Result<String, StoreError> {
    serde_json::to_string(resource).map_err(|e| StoreError::Corrupt(e.to_string()))
}

#[async_trait]
impl Store for PgStore {
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
            "INSERT INTO users (id, email, name, password_hash, roles, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
            vec![
                Arg::Text(user.id.to_string()),
                Arg::Text(user.email.clone()),
                Arg::Text(user.name.clone()),
                Arg::Text(user.password_hash.clone()),
                Arg::Text(roles.join(",")),
                Arg::Int(user.created_at.as_second()),
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
        // Every authenticated request reads its principal: cached like the catalogue, and
        // dropped by the same announcements when the user's roles or venues change.
        self.cache.get_or_load(cache::key("user", id), self.user_where("id", id.to_string())).await
    }

    async fn set_manager(&self, venue_id: VenueId, user_id: UserId) -> Result<(), StoreError> {
        let args = vec![Arg::Text(venue_id.to_string()), Arg::Text(user_id.to_string())];
        let manager = [user_id.to_string()];
        self.change_catalog(Vec::new(), vec![cache::key("user", user_id)], move |ctx: &mut Ctx| -> BoxFuture<'_, _> {
            Box::pin(async move {
                // Assigned by an admin: the role may come later.
                lock_managers(&mut ctx.conn, &manager).await?;
                statement(
                    &mut ctx.conn,
                    "INSERT INTO venue_managers (venue_id, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    args,
                    "already a manager",
                )
                .await
            })
        })
        .await
        .map(|_| ())
    }

    async fn insert_refresh_token(&self, token: &RefreshToken) -> Result<(), StoreError> {
        self.exec_one(
            "INSERT INTO refresh_tokens (token_hash, user_id, family_id, expires_at) VALUES ($1, $2, $3, $4)",
            vec![
                Arg::Text(token.token_hash.clone()),
                Arg::Text(token.user_id.to_string()),
                Arg::Text(token.family_id.clone()),
                Arg::Int(token.expires_at.as_second()),
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
        let token_hash = token_hash.to_owned();
        self.writer
            .exec_retrying(move |ctx: &mut Ctx| -> BoxFuture<'_, Outcome<(), StoreError>> {
                Box::pin(revoke_in_tx(ctx, token_hash, now))
            })
            .await
    }

    async fn setting_or_insert(&self, key: &str, value: &str) -> Result<String, StoreError> {
        self.exec_one(
            "INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            vec![Arg::Text(key.to_owned()), Arg::Text(value.to_owned())],
            "",
        )
        .await?;
        sqlx::query_scalar("SELECT value FROM settings WHERE key = $1")
            .bind(key)
            .fetch_one(&self.read)
            .await
            .map_err(db_error)
    }

    async fn set_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.exec_one(
            "INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            vec![Arg::Text(key.to_owned()), Arg::Text(value.to_owned())],
            "",
        )
        .await
        .map(|_| ())
    }

    async fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        sqlx::query_scalar("SELECT value FROM settings WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.read)
            .await
            .map_err(db_error)
    }

    async fn insert_venue(&self, venue: &Venue) -> Result<(), StoreError> {
        let doc = venue_doc(venue)?;
        let (id, managers) = (venue.id.to_string(), venue.managers.iter().map(ToString::to_string).collect::<Vec<_>>());
        // Its managers' users change too (their venues).
        let keys = std::iter::once(cache::key("venue", venue.id))
            .chain(venue.managers.iter().map(|user| cache::key("user", user)))
            .collect();
        self.change_catalog(Vec::new(), keys, move |ctx: &mut Ctx| -> BoxFuture<'_, _> {
            Box::pin(async move {
                let inserted = sqlx::query("INSERT INTO venues (id, doc) VALUES ($1, $2::json)")
                    .bind(&id)
                    .bind(doc)
                    .execute(&mut ctx.conn)
                    .await;
                if let Err(refused) = venue_inserted(inserted)? {
                    return Ok(Err(refused));
                }
                let roles = lock_managers(&mut ctx.conn, &managers).await?;
                if !all_managers(&managers, &roles) {
                    return Ok(Err(StoreError::Forbidden(NOT_A_MANAGER)));
                }
                sqlx::query(
                    "INSERT INTO venue_managers (venue_id, user_id) SELECT $1, unnest($2::text[]) ON CONFLICT DO NOTHING",
                )
                .bind(&id)
                .bind(&managers)
                .execute(&mut ctx.conn)
                .await?;
                Ok(Ok(()))
            })
        })
        .await
    }

    async fn update_venue(&self, before: &Venue, after: &Venue) -> Result<(), StoreError> {
        assert_eq!(before.id, after.id, "an update keeps the id");
        let (id, doc, before) = (after.id.to_string(), venue_doc(after)?, before.clone());
        self.change_catalog(Vec::new(), vec![cache::key("venue", after.id)], move |ctx: &mut Ctx| -> BoxFuture<'_, _> {
            Box::pin(async move { replace_doc(&mut ctx.conn, &VENUE_DOCS, &id, &before, &doc).await })
        })
        .await
    }

    async fn delete_venue(&self, id: VenueId, now: Timestamp) -> Result<(), StoreError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let keys: Vec<String> = sqlx::query_scalar("SELECT resource_id FROM resource_clocks WHERE venue_id = $1")
                .bind(id.to_string())
                .fetch_all(&self.read)
                .await
                .map_err(db_error)?;
            let locked: BTreeSet<String> = keys.iter().cloned().collect();
            let (venue, everything) = (id.to_string(), INVALIDATE_ALL.to_owned());
            let deleted = self
                .change_catalog(keys, vec![everything], move |ctx: &mut Ctx| -> BoxFuture<'_, _> {
                    Box::pin(delete_venue_in_tx(ctx, venue, locked, now))
                })
                .await;
            match deleted {
                Err(StoreError::Changed(_)) if attempt < VENUE_DELETE_ATTEMPTS_MAX => continue,
                other => return other,
            }
        }
    }

    async fn venue(&self, id: VenueId) -> Result<Option<Arc<Venue>>, StoreError> {
        self.cached_doc("venue", "SELECT doc::text FROM venues WHERE id = $1 AND deleted_at IS NULL", id.to_string())
            .await
    }

    async fn venues(&self, page: PageRequest) -> Result<Page<Venue>, StoreError> {
        self.docs_page(
            "SELECT id, doc::text FROM venues WHERE deleted_at IS NULL AND id > $1 ORDER BY id LIMIT $2",
            None,
            page,
        )
        .await
    }

    async fn insert_resource(&self, r: &Resource) -> Result<(), StoreError> {
        let (id, venue_id, doc) = (r.id.to_string(), r.venue_id.to_string(), resource_doc(r)?);
        let key = cache::key("resource", r.id);
        self.change_catalog(Vec::new(), vec![key], move |ctx: &mut Ctx| -> BoxFuture<'_, Outcome<(), StoreError>> {
            Box::pin(async move {
                if !hold_live_venue(&mut ctx.conn, &venue_id).await? {
                    return Ok(Err(StoreError::NotFound("venue")));
                }
                let inserted = sqlx::query("INSERT INTO resources (id, venue_id, doc) VALUES ($1, $2, $3::json)")
                    .bind(&id)
                    .bind(&venue_id)
                    .bind(&doc)
                    .execute(&mut ctx.conn)
                    .await;
                match inserted {
                    Ok(_) => {}
                    Err(e) if is_unique_violation(&e) => {
                        return Ok(Err(StoreError::Conflict("resource exists".into())));
                    }
                    Err(e) => return Err(e),
                }
                sqlx::query("INSERT INTO resource_clocks (resource_id, venue_id) VALUES ($1, $2)")
                    .bind(&id)
                    .bind(&venue_id)
                    .execute(&mut ctx.conn)
                    .await?;
                Ok(Ok(()))
            })
        })
        .await?;
        Ok(())
    }

    async fn update_resource(&self, before: &Resource, after: &Resource) -> Result<(), StoreError> {
        assert_eq!(before.id, after.id, "an update keeps the id");
        let (id, doc, before) = (after.id.to_string(), resource_doc(after)?, before.clone());
        let key = cache::key("resource", after.id);
        self.change_catalog(vec![id.clone()], vec![key], move |ctx: &mut Ctx| -> BoxFuture<'_, _> {
            Box::pin(async move { replace_doc(&mut ctx.conn, &RESOURCE_DOCS, &id, &before, &doc).await })
        })
        .await
    }

    async fn delete_resource(&self, id: ResourceId, now: Timestamp) -> Result<(), StoreError> {
        let key = cache::key("resource", id);
        let id = id.to_string();
        self.change_catalog(
            vec![id.clone()],
            vec![key],
            move |ctx: &mut Ctx| -> BoxFuture<'_, Outcome<(), StoreError>> {
                Box::pin(async move {
                    let at = ctx.now(now).as_second();
                    // Bookings in the past do not keep a resource, nor lapsed holds.
                    let active: Option<i32> = sqlx::query_scalar(
                        "SELECT 1 FROM claim_totals WHERE resource_id = $1 AND block_end > $2 AND expires_at > $2 LIMIT 1",
                    )
                    .bind(&id)
                    .bind(at)
                    .fetch_optional(&mut ctx.conn)
                    .await?;
                    if active.is_some() {
                        return Ok(Err(StoreError::Conflict("the resource has current or future bookings".into())));
                    }
                    let r = sqlx::query("UPDATE resources SET deleted_at = $1 WHERE id = $2 AND deleted_at IS NULL")
                        .bind(at)
                        .bind(&id)
                        .execute(&mut ctx.conn)
                        .await?;
                    if r.rows_affected() == 0 {
                        return Ok(Err(StoreError::NotFound("resource")));
                    }
                    Ok(Ok(()))
                })
            },
        )
        .await?;
        Ok(())
    }

    async fn resource(&self, id: ResourceId) -> Result<Option<Arc<Resource>>, StoreError> {
        self.cached_doc(
            "resource",
            "SELECT doc::text FROM resources WHERE id = $1 AND deleted_at IS NULL",
            id.to_string(),
        )
        .await
    }

    async fn resources_by_ids(&self, ids: &[ResourceId]) -> Result<Vec<Resource>, StoreError> {
        // Cached as `Arc<Resource>`, the type `resource` caches under the same key.
        let (hits, missing) = self.cache.get_many::<Arc<Resource>, _>(ids, |id| cache::key("resource", id));
        let mut out: Vec<Resource> = hits.iter().map(|r| Resource::clone(r)).collect();
        let missing: Vec<String> = missing.iter().map(ToString::to_string).collect();
        for chunk in missing.chunks(IDS_PER_QUERY_MAX) {
            let generation = self.cache.generation();
            let docs: Vec<String> =
                sqlx::query_scalar("SELECT doc::text FROM resources WHERE deleted_at IS NULL AND id = ANY($1)")
                    .bind(chunk)
                    .fetch_all(&self.read)
                    .await
                    .map_err(db_error)?;
            for doc in docs {
                let r: Resource = from_json(&doc)?;
                self.cache.put(generation, cache::key("resource", r.id), Arc::new(r.clone()));
                out.push(r);
            }
        }
        Ok(out)
    }

    async fn resources(&self, venue_id: VenueId, page: PageRequest) -> Result<Page<Resource>, StoreError> {
        self.docs_page(
            "SELECT id, doc::text FROM resources WHERE venue_id = $1 AND deleted_at IS NULL AND id > $2 ORDER BY id LIMIT $3",
            Some(venue_id),
            page,
        )
        .await
    }

    async fn insert_event(&self, event: &Event) -> Result<(), StoreError> {
        let event = event.clone();
        let key = cache::key("event", event.id);
        self.change_catalog(Vec::new(), vec![key], move |ctx: &mut Ctx| -> BoxFuture<'_, Outcome<(), StoreError>> {
            Box::pin(async move {
                let id = event.id.to_string();
                let (start, end) = (event.start.as_second(), event.end.as_second());
                if !hold_live_venue(&mut ctx.conn, &event.venue_id.to_string()).await? {
                    return Ok(Err(StoreError::NotFound("venue")));
                }
                sqlx::query(
                    "INSERT INTO events (id, venue_id, start_at, end_at, doc) VALUES ($1, $2, $3, $4, $5::json)",
                )
                .bind(&id)
                .bind(event.venue_id.to_string())
                .bind(start)
                .bind(end)
                .bind(to_json(&event)?)
                .execute(&mut ctx.conn)
                .await?;
                let seats: Vec<String> = event.seat_ids.iter().map(|s| s.to_string()).collect();
                sqlx::query(
                    "INSERT INTO event_seats (resource_id, start_at, event_id, end_at)
                         SELECT seat, $2, $3, $4 FROM unnest($1::text[]) AS seat",
                )
                .bind(&seats)
                .bind(start)
                .bind(&id)
                .bind(end)
                .execute(&mut ctx.conn)
                .await?;
                Ok(Ok(()))
            })
        })
        .await?;
        Ok(())
    }

    async fn event(&self, id: EventId) -> Result<Option<Arc<Event>>, StoreError> {
        self.cached_doc("event", "SELECT doc::text FROM events WHERE id = $1 AND deleted_at IS NULL", id.to_string())
            .await
    }

    async fn events(&self, venue_id: VenueId, page: PageRequest) -> Result<Page<Event>, StoreError> {
        self.docs_page(
            "SELECT id, doc::text FROM events WHERE venue_id = $1 AND deleted_at IS NULL AND id > $2 ORDER BY id LIMIT $3",
            Some(venue_id),
            page,
        )
        .await
    }

    async fn events_of_seat(&self, seat: ResourceId, span: Span, limit: u32) -> Result<Vec<Event>, StoreError> {
        let docs: Vec<String> = sqlx::query_scalar(
            "SELECT e.doc::text FROM event_seats s JOIN events e ON e.id = s.event_id
             WHERE s.resource_id = $1 AND s.start_at < $2 AND s.end_at > $3 AND e.deleted_at IS NULL
             ORDER BY s.start_at LIMIT $4",
        )
        .bind(seat.to_string())
        .bind(span.end)
        .bind(span.start)
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await
        .map_err(db_error)?;
        docs.iter().map(|d| from_json(d)).collect()
    }

    async fn claims(&self, resource: ResourceId, span: Span, now: Timestamp) -> Result<Vec<Claim>, StoreError> {
        live_claims(&self.read, resource, span, now).await.map_err(db_error)
    }

    async fn seat_states(&self, event: &Event, now: Timestamp) -> Result<SeatStates, StoreError> {
        let mut states = SeatStates::default();
        let seats: Vec<String> = event.seat_ids.iter().map(|s| s.to_string()).collect();
        for chunk in seats.chunks(IDS_PER_QUERY_MAX) {
            let rows: Vec<(String, String, Option<i64>)> = sqlx::query_as(
                "SELECT c.resource_id, b.status, c.hold_expires_at FROM claims c JOIN bookings b ON b.id = c.booking_id
                 WHERE c.resource_id = ANY($1) AND c.block_start < $2 AND c.block_end > $3
                   AND c.block_start > $3 - COALESCE((SELECT MAX(seconds) FROM claim_longest WHERE resource_id = ANY($1)), 0)
                   AND (c.hold_expires_at IS NULL OR c.hold_expires_at > $4)",
            )
            .bind(chunk)
            .bind(event.end.as_second())
            .bind(event.start.as_second())
            .bind(now.as_second())
            .fetch_all(&self.read)
            .await
            .map_err(db_error)?;
            add_seat_states(&mut states, rows);
        }
        Ok(states)
    }

    async fn hold(&self, command: HoldCommand) -> Result<Booking, HoldRefused> {
        assert_eq!(command.booking.items.len(), command.claims.len(), "one claim per item");
        let keys = resource_keys(command.booking.items.iter().map(|i| i.resource_id));
        self.writer.hold(keys, command).await
    }

    async fn hold_keyed(&self, command: HoldCommand, key: HoldKey) -> Result<KeyedHoldOutcome, StoreError> {
        assert_eq!(command.booking.items.len(), command.claims.len(), "one claim per item");
        let keys = resource_keys(command.booking.items.iter().map(|i| i.resource_id));
        self.writer.hold_keyed(keys, command, key).await
    }

    async fn update_booking(&self, id: BookingId, now: Timestamp, decide: Decide) -> Result<Booking, UpdateRefused> {
        let keys = self.booking_keys(id).await.map_err(UpdateRefused::Store)?;
        let result = self
            .writer
            .write_locked(keys, move |ctx: &mut Ctx| -> BoxFuture<'_, Outcome<Booking, UpdateRefused>> {
                Box::pin(async move {
                    let now = ctx.now(now);
                    let doc: Option<String> =
                        sqlx::query_scalar("SELECT doc::text FROM bookings WHERE id = $1 FOR UPDATE")
                            .bind(id.to_string())
                            .fetch_optional(&mut ctx.conn)
                            .await?;
                    let Some(before) = doc.map(|d| from_json_db::<Booking>(&d)).transpose()? else {
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
        let doc: Option<String> = sqlx::query_scalar("SELECT doc::text FROM bookings WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.read)
            .await
            .map_err(db_error)?;
        doc.map(|d| from_json(&d)).transpose()
    }

    async fn bookings(&self, filter: &BookingFilter, page: PageRequest) -> Result<Page<Booking>, StoreError> {
        let mut qb: QueryBuilder<Postgres> = QueryBuilder::new("SELECT id, doc::text FROM bookings WHERE id > ");
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
            let venues: Vec<String> = venues.iter().map(|v| v.to_string()).collect();
            qb.push(" AND venue_id = ANY(").push_bind(venues).push(")");
        }
        qb.push(" ORDER BY id LIMIT ").push_bind(i64::from(page.limit) + 1);
        let rows: Vec<(String, String)> = qb.build_query_as().fetch_all(&self.read).await.map_err(db_error)?;
        docs_to_page(rows, page.limit)
    }

    async fn expire_due(&self, now: Timestamp, limit: u32) -> Result<Vec<BookingId>, StoreError> {
        // Every node sweeps: candidates are read without locks, then the batch locks their
        // resources and re-checks each booking, so each is expired exactly once.
        let due: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM bookings WHERE status IN ('held', 'pending_payment') AND expires_at <= $1
             ORDER BY expires_at LIMIT $2",
        )
        .bind(now.as_second())
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await
        .map_err(db_error)?;
        if due.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> =
            sqlx::query_scalar("SELECT DISTINCT resource_id FROM claims WHERE booking_id = ANY($1) ORDER BY 1")
                .bind(&due)
                .fetch_all(&self.read)
                .await
                .map_err(db_error)?;
        self.writer
            .write_locked(keys, move |ctx: &mut Ctx| -> BoxFuture<'_, Outcome<Vec<BookingId>, StoreError>> {
                Box::pin(async move {
                    let now = ctx.now(now);
                    let mut expired = Vec::with_capacity(due.len());
                    for id in due {
                        if expire_one(&mut ctx.conn, &id, now).await? {
                            expired.extend(id.parse::<BookingId>().ok());
                        }
                    }
                    Ok(Ok(expired))
                })
            })
            .await?
    }

    async fn pending_payments(&self, limit: u32) -> Result<Vec<BookingId>, StoreError> {
        let mut query = pending_payments_query::<Postgres>(limit);
        let ids: Vec<String> = query.build_query_scalar().fetch_all(&self.read).await.map_err(db_error)?;
        booking_ids(&ids)
    }

    async fn upcoming_expiries(&self, limit: u32) -> Result<Vec<(BookingId, Timestamp)>, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT id, expires_at FROM bookings WHERE status IN ('held', 'pending_payment') AND expires_at IS NOT NULL
             ORDER BY expires_at LIMIT $1",
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
        self.writer
            .exec(move |ctx: &mut Ctx| -> BoxFuture<'_, Outcome<(), StoreError>> {
                Box::pin(async move {
                    for sql in [ABANDON_UNCHANGED_SQL, ABANDON_CHANGED_SQL] {
                        let query = sqlx::query(sql).bind(&key.principal).bind(&key.key).bind(&key.owner);
                        query.execute(&mut ctx.conn).await?;
                    }
                    Ok(Ok(()))
                })
            })
            .await
    }

    async fn idempotency_renew(&self, key: &IdempotencyKey, locked_until: Timestamp) -> Result<bool, StoreError> {
        let renewed = self
            .exec_one(
                "UPDATE idempotency_keys SET locked_until = $4
                 WHERE principal = $1 AND key = $2 AND owner = $3 AND status IS NULL",
                vec![
                    Arg::Text(key.principal.clone()),
                    Arg::Text(key.key.clone()),
                    Arg::Text(key.owner.clone()),
                    Arg::Int(locked_until.as_second()),
                ],
                "",
            )
            .await?;
        Ok(renewed == 1)
    }

    async fn idempotency_cleanup(&self, before: Timestamp, limit: u32) -> Result<u64, StoreError> {
        // SKIP LOCKED: nodes cleaning up at the same time take disjoint rows and never wait.
        self.exec_one(
            "DELETE FROM idempotency_keys WHERE ctid IN
               (SELECT ctid FROM idempotency_keys WHERE created_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
            vec![Arg::Int(before.as_second()), Arg::Int(i64::from(limit))],
            "",
        )
        .await
    }

    async fn queue_refund(&self, due: &RefundDue) -> Result<(), StoreError> {
        self.exec_one(
            "INSERT INTO refunds_due (payment_reference, kind, booking_id, amount, attempts, next_at)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            vec![
                Arg::Text(due.payment_reference.clone()),
                Arg::Text(due.kind.as_str().to_owned()),
                Arg::Text(due.booking_id.to_string()),
                Arg::Int(due.amount),
                Arg::Int(i64::from(due.attempts)),
                Arg::Int(due.next_at.as_second()),
            ],
            "",
        )
        .await
        .map(|_| ())
    }

    async fn refunds_due(&self, now: Timestamp, attempts_max: u32, limit: u32) -> Result<Vec<RefundDue>, StoreError> {
        let mut query = refunds_due_query::<Postgres>(now, attempts_max, limit);
        let rows: Vec<RefundRow> = query.build_query_as().fetch_all(&self.read).await.map_err(db_error)?;
        rows.into_iter().map(refund_due_of).collect()
    }

    async fn refunds_of_payment(&self, payment_reference: &str) -> Result<Vec<RefundDue>, StoreError> {
        let mut query = refunds_of_payment_query::<Postgres>(payment_reference);
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
        let claimed = self
            .writer
            .exec(move |ctx: &mut Ctx| -> BoxFuture<'_, Outcome<Vec<RefundRow>, StoreError>> {
                Box::pin(async move {
                    // `SKIP LOCKED`: rows another node is leasing in a batch not yet committed
                    // are left to it, not waited for.
                    let mut rows: Vec<RefundRow> = sqlx::query_as(
                        "WITH due AS (
                             SELECT payment_reference, kind, next_at FROM refunds_due
                             WHERE next_at <= $1 AND attempts < $2 ORDER BY next_at LIMIT $3
                             FOR UPDATE SKIP LOCKED)
                         UPDATE refunds_due AS r SET next_at = $4 FROM due
                         WHERE r.payment_reference = due.payment_reference AND r.kind = due.kind
                         RETURNING r.kind, r.payment_reference, r.booking_id, r.amount, r.attempts, due.next_at",
                    )
                    .bind(now.as_second())
                    .bind(i64::from(attempts_max))
                    .bind(i64::from(limit))
                    .bind(lease_until.as_second())
                    .fetch_all(&mut ctx.conn)
                    .await?;
                    rows.sort_by_key(|row| row.5);
                    for row in &mut rows {
                        row.5 = lease_until.as_second();
                    }
                    Ok(Ok(rows))
                })
            })
            .await?;
        claimed.into_iter().map(refund_due_of).collect()
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
            "UPDATE refunds_due SET attempts = $1, next_at = $2
             WHERE payment_reference = $3 AND kind = $4 AND next_at = COALESCE($5, next_at)",
            vec![
                Arg::Int(i64::from(attempts)),
                Arg::Int(next_at.as_second()),
                Arg::Text(payment_reference.to_owned()),
                Arg::Text(kind.as_str().to_owned()),
                Arg::OptInt(leased_until.map(|t| t.as_second())),
            ],
            "",
        )
        .await
        .map(|_| ())
    }

    async fn drop_refund(&self, kind: RefundKind, payment_reference: &str) -> Result<(), StoreError> {
        self.exec_one(
            "DELETE FROM refunds_due WHERE payment_reference = $1 AND kind = $2",
            vec![Arg::Text(payment_reference.to_owned()), Arg::Text(kind.as_str().to_owned())],
            "",
        )
        .await
        .map(|_| ())
    }

    async fn append_audit(&self, event: AuditEvent) -> Result<(), StoreError> {
        self.writer.append_audit(event).await
    }

    async fn audit_range(&self, after: u64, limit: u32) -> Result<Vec<AuditEvent>, StoreError> {
        let mut query = audit_range_query::<Postgres>(after, limit);
        audit_events_of(query.build_query_as().fetch_all(&self.read).await.map_err(db_error)?)
    }

    async fn audit_head(&self) -> Result<(u64, String), StoreError> {
        audit_head_of(sqlx::query_as(AUDIT_HEAD_SQL).fetch_one(&self.read).await.map_err(db_error)?)
    }

    async fn audit_events(&self, filter: &AuditFilter, page: AuditPage) -> Result<Vec<AuditEvent>, StoreError> {
        let rows: Vec<AuditRow> =
            audit_select::<Postgres>(filter, page).build_query_as().fetch_all(&self.read).await.map_err(db_error)?;
        audit_events_of(rows)
    }

    async fn grant_role(&self, user_id: UserId, grant: RoleGrant) -> Result<User, StoreError> {
        // The change announces the user to every node in its transaction; this node drops it now.
        let granted = access::postgres::grant_role(&self.writer, user_id, grant).await;
        self.cache.invalidate(&cache::key("user", user_id));
        granted?;
        self.user_by_id(user_id).await?.ok_or(StoreError::NotFound("user"))
    }

    async fn revoke_role(&self, user_id: UserId, revoke: RoleRevoke) -> Result<User, StoreError> {
        let revoked = access::postgres::revoke_role(&self.writer, user_id, revoke).await;
        self.cache.invalidate(&cache::key("user", user_id));
        revoked?;
        self.user_by_id(user_id).await?.ok_or(StoreError::NotFound("user"))
    }

    async fn insert_api_key(&self, key: &ApiKey) -> Result<(), StoreError> {
        access::postgres::insert_api_key(&self.writer, key).await
    }

    async fn api_key_by_hash(&self, key_hash: &str) -> Result<Option<ApiKey>, StoreError> {
        access::postgres::api_key_by_hash(&self.read, key_hash).await
    }

    async fn api_keys(&self, page: PageRequest) -> Result<Page<ApiKey>, StoreError> {
        access::postgres::api_keys(&self.read, page).await
    }

    async fn revoke_api_key(&self, id: ApiKeyId, now: Timestamp) -> Result<(), StoreError> {
        access::postgres::revoke_api_key(&self.writer, id, now).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::testing::{drop_postgres_database, fresh_postgres_database};

    async fn migrate(conn: &mut PgConnection, versions: std::ops::RangeInclusive<i64>) {
        for m in MIGRATOR.iter().filter(|m| versions.contains(&m.version)) {
            sqlx::raw_sql(sqlx::AssertSqlSafe(m.sql.as_str().to_owned())).execute(&mut *conn).await.unwrap();
        }
    }

    /// Migration 0012 queues the refunds that cancellations before it owe (nothing made them
    /// later), parked for an operator: those of money paid, not yet made, of more than nothing.
    #[tokio::test]
    async fn refunds_owed_before_the_reconciler_are_queued_for_it() {
        let Some(url) = fresh_postgres_database().await else { return };
        let mut conn = PgConnection::connect(&url).await.unwrap();
        migrate(&mut conn, 1..=11).await;
        let (bookings, owed) = crate::common::refund_backfill_cases();
        for (id, status, doc) in bookings {
            sqlx::query(
                "INSERT INTO bookings (id, customer_id, venue_id, status, doc) VALUES ($1, 'c', 'v', $2, $3::json)",
            )
            .bind(id)
            .bind(status)
            .bind(doc)
            .execute(&mut conn)
            .await
            .unwrap();
        }
        migrate(&mut conn, 12..=12).await;
        let queued: Vec<crate::common::RefundRow> =
            sqlx::query_as("SELECT kind, payment_reference, booking_id, amount, attempts, next_at FROM refunds_due")
                .fetch_all(&mut conn)
                .await
                .unwrap();
        assert_eq!(queued, vec![owed]);
        conn.close().await.unwrap();
        drop_postgres_database(&url).await;
    }

    /// Migration 0010 turns the documents into `json`: what was stored reads back the same,
    /// through the tables and the events' view alike.
    #[tokio::test]
    async fn documents_stored_as_jsonb_read_back_the_same_as_json() {
        let Some(url) = fresh_postgres_database().await else { return };
        let mut conn = PgConnection::connect(&url).await.unwrap();
        migrate(&mut conn, 1..=9).await;
        let doc = r#"{"id": "b1", "status": "held", "items": [{"seat": "A\"1", "price": 1200}], "note": "é ✓"}"#;
        sqlx::query(
            "INSERT INTO bookings (id, customer_id, venue_id, status, doc) VALUES ('b1', 'c', 'v', 'held', $1::jsonb)",
        )
        .bind(doc)
        .execute(&mut conn)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO outbox (topic, aggregate_id, payload, created_at) VALUES ('booking.held', 'b1', $1::jsonb, 1)",
        )
        .bind(doc)
        .execute(&mut conn)
        .await
        .unwrap();
        migrate(&mut conn, 10..=10).await;
        let read: (String, String) = sqlx::query_as(
            "SELECT b.doc::text, o.payload::text FROM bookings b JOIN outbox_events o ON o.aggregate_id = b.id",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        let expected: serde_json::Value = serde_json::from_str(doc).unwrap();
        assert_eq!(serde_json::from_str::<serde_json::Value>(&read.0).unwrap(), expected);
        assert_eq!(serde_json::from_str::<serde_json::Value>(&read.1).unwrap(), expected);
        let kind: String =
            sqlx::query_scalar("SELECT pg_typeof(doc)::text FROM bookings").fetch_one(&mut conn).await.unwrap();
        assert_eq!(kind, "json");
        conn.close().await.unwrap();
        drop_postgres_database(&url).await;
    }

    /// The batch's lock and stamp find `resource_clocks` rows by index whatever the table's
    /// statistics say: with fresh statistics of a table this small the planner scans it whole
    /// for `resource_id = ANY($1)` (as it did under load), comparing every row with every key.
    #[tokio::test]
    async fn the_batch_lock_and_stamp_probe_the_clocks_by_index() {
        let Some(url) = fresh_postgres_database().await else { return };
        let store = PgStore::open(&url).await.unwrap();
        let mut conn = PgConnection::connect(&url).await.unwrap();
        sqlx::query(
            "INSERT INTO resource_clocks (resource_id, venue_id)
             SELECT md5(i::text), 'venue' FROM generate_series(1, 1000) AS i",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        execute_raw(&mut conn, "ANALYZE resource_clocks").await.unwrap();
        let keys: Vec<String> =
            sqlx::query_scalar("SELECT resource_id FROM resource_clocks ORDER BY resource_id LIMIT 25")
                .fetch_all(&mut conn)
                .await
                .unwrap();
        for sql in [LOCK_CLOCKS_SQL, STAMP_CLOCKS_SQL, STAMP_CLOCKS_LOCK_HEAD_SQL] {
            let explain = format!("EXPLAIN {sql}");
            let mut query = sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(explain)).bind(&keys);
            if sql != LOCK_CLOCKS_SQL {
                query = query.bind(1_i64);
            }
            let plan = query.fetch_all(&mut conn).await.unwrap().join("\n");
            assert!(plan.contains("Index Scan using resource_clocks_pkey"), "{sql}\n{plan}");
            assert!(!plan.contains("Seq Scan on resource_clocks"), "{sql}\n{plan}");
        }
        drop(store);
        conn.close().await.unwrap();
        drop_postgres_database(&url).await;
    }

    /// A batch's marks and answers reach their key rows by index however small the table was
    /// when the session first ran them: a statement kept prepared from a new database went on
    /// scanning the whole table for every batch (milliseconds each under load).
    #[tokio::test]
    async fn key_marks_and_answers_probe_the_keys_by_index_as_the_table_grows() {
        let Some(url) = fresh_postgres_database().await else { return };
        let store = PgStore::open(&url).await.unwrap();
        let mut conn = PgConnection::connect(&url).await.unwrap();
        let backend = PgBackend { options: url.parse().unwrap() };
        let key = |i: usize| IdempotencyKey {
            principal: "user:1".into(),
            key: format!("key-{i}"),
            request_hash: "h".into(),
            owner: format!("owner-{i}"),
        };
        let seal = async |conn: &mut PgConnection, keys: &[IdempotencyKey]| {
            let mut events = vec![AuditEvent::new("booking.hold", "customer", Timestamp::UNIX_EPOCH)];
            let marks: Vec<IdempotencyMark> = keys
                .iter()
                .map(|k| IdempotencyMark {
                    principal: k.principal.clone(),
                    key: k.key.clone(),
                    owner: k.owner.clone(),
                    target: "booking".into(),
                })
                .collect();
            backend.seal(conn, &[], Timestamp::UNIX_EPOCH, &mut events, &marks).await.unwrap().unwrap();
        };
        let complete = |keys: &[IdempotencyKey]| {
            keys.iter().map(|k| KeyCompletion { key: k.clone(), status: 201, body: b"done".to_vec() }).collect()
        };
        // Run often enough on a table of one key for a kept statement to settle on one plan.
        sqlx::query(
            "INSERT INTO idempotency_keys (principal, key, request_hash, created_at, locked_until, owner)
             VALUES ('user:1', 'key-0', 'h', 0, 60, 'owner-0')",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        for _ in 0..8 {
            execute_raw(&mut conn, "BEGIN").await.unwrap();
            seal(&mut conn, &[key(0)]).await;
            idempotency_complete_in_tx(&mut conn, complete(&[key(0)])).await.unwrap();
            execute_raw(&mut conn, "ROLLBACK").await.unwrap();
        }
        sqlx::query(
            "INSERT INTO idempotency_keys (principal, key, request_hash, created_at, locked_until, owner)
             SELECT 'user:1', 'key-' || i, 'h', 0, 60, 'owner-' || i FROM generate_series(1, 20000) AS i",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        let keys: Vec<IdempotencyKey> = (1..=20).map(key).collect();
        let scans = async |conn: &mut PgConnection| -> (i64, i64) {
            let sql = "SELECT seq_scan, idx_scan FROM pg_stat_xact_user_tables WHERE relname = 'idempotency_keys'";
            sqlx::query_as(sql).fetch_one(conn).await.unwrap()
        };
        execute_raw(&mut conn, "BEGIN").await.unwrap();
        seal(&mut conn, &keys).await;
        let (seq_scans, marked_by_index) = scans(&mut conn).await;
        assert_eq!(seq_scans, 0, "a batch's marks probe its keys, never scan the table");
        idempotency_complete_in_tx(&mut conn, complete(&keys)).await.unwrap();
        let (seq_scans, answered_by_index) = scans(&mut conn).await;
        assert_eq!(seq_scans, 0, "a batch's answers probe its keys, never scan the table");
        assert!(answered_by_index > marked_by_index && marked_by_index > 0);
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM idempotency_keys WHERE committed_target = 'booking' AND status = 201",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert_eq!(done, 20);
        execute_raw(&mut conn, "ROLLBACK").await.unwrap();
        drop(store);
        conn.close().await.unwrap();
        drop_postgres_database(&url).await;
    }
}
