//! The writer with group commit, shared by both backends.
//!
//! Requests queue on a bounded channel. The writer takes everything queued (up to
//! [`BATCH_SIZE_MAX`]), runs each request inside its own SAVEPOINT of one transaction (so a
//! refused request undoes only its own changes), commits once, and only then answers each
//! request. One fsync serves the whole batch; no answer precedes durability.
//!
//! With several writers on one database (PostgreSQL, many nodes) each request names the
//! resources it decides on; a batch locks all of them first, in one global order, through its
//! [`Backend`]. Batches of different nodes therefore serialize per resource and never deadlock
//! over resources (the few other locks a job may take, on users, venues and refresh-token
//! families, are taken job by job; a job that loses a deadlock over those runs again in a
//! later batch: [`Writer::write_locked_retrying`]), and the batch clock starts no earlier
//! than the last `now` any node used on those resources.
//! On PostgreSQL one node's writer has several lanes ([`Writer::start_lanes`]), a thread, a
//! connection and a batch loop each, related to each other as nodes are; SQLite has one writer
//! thread.
//!
//! Holds are the hot path and queue as [`HoldJob`]s: the batch decides all of its holds in one
//! pass ([`Backend::holds`]), each seeing the claims of those before it, so a database reached
//! over the network is asked a few statements per batch instead of a few per hold.
//!
//! Idempotency keys are taken and answered as [`KeyBegin`]s and [`KeyCompletion`]s, for the
//! same reason: each batch begins all of its keys first and stores all of its answers last
//! ([`Backend::begin_keys`], [`Backend::complete_keys`]), a statement or two per batch on
//! PostgreSQL instead of two round trips per key.
//!
//! The audit trail rides along: a request that runs inside an [`AuditScope`] and whose write
//! is kept contributes its audit event, and the batch appends all of them to the hash chain
//! just before COMMIT — in the transaction of the changes they record (I6).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use allot_app::StoreError;
use allot_app::audit::{AuditEvent, AuditScope};
use allot_app::store::{
    HoldCommand, HoldKey, HoldRefused, IdempotencyBegin, IdempotencyKey, IdempotencyMark, KeyedHoldOutcome,
    StoredAnswer,
};
use allot_app::telemetry;
use allot_core::booking::Booking;
use futures::FutureExt;
use futures::future::BoxFuture;
use jiff::Timestamp;
use tokio::sync::{mpsc, oneshot};

pub const BATCH_SIZE_MAX: usize = 512;
/// Requests queued per lane before new ones are refused as overloaded.
pub const QUEUE_DEPTH_MAX: usize = 16_384;
/// Lanes of one writer ([`Writer::start_lanes`]).
pub const LANES_MAX: usize = 8;

/// What the writer needs from a database beyond running a request's own statements.
pub trait Backend: Send + Sync + 'static {
    type Conn: Send + 'static;
    /// What the connection fails with.
    type Error: std::fmt::Display + Send + 'static;

    /// A failure as the app sees it (transient ones as [`StoreError::Busy`]).
    fn error(e: Self::Error) -> StoreError;

    /// Starts the batch transaction.
    fn begin<'c>(&'c self, conn: &'c mut Self::Conn) -> BoxFuture<'c, Result<(), Self::Error>>;

    /// Whether transaction `txn`, whose COMMIT failed, committed after all: `Some(true)` when
    /// it did (the answer was lost with the connection), `Some(false)` when it did not, `None`
    /// when that cannot be learned. May replace `conn`, which a lost answer usually leaves dead.
    fn commit_outcome<'c>(&'c self, _conn: &'c mut Self::Conn, _txn: TxnRef) -> BoxFuture<'c, Option<bool>> {
        Box::pin(async { None })
    }

    /// Runs statements without results (savepoints, commit, rollback); `sql` may hold several,
    /// `;`-separated.
    fn execute<'c>(&'c self, conn: &'c mut Self::Conn, sql: &'static str) -> BoxFuture<'c, Result<(), Self::Error>>;

    /// Locks `keys` (sorted, distinct resource ids) until the batch ends and returns the latest
    /// `now` an earlier transaction decided on them with. A single-writer database needs neither.
    fn lock<'c>(
        &'c self,
        _conn: &'c mut Self::Conn,
        _keys: &'c [String],
    ) -> BoxFuture<'c, Result<Option<Timestamp>, Self::Error>> {
        Box::pin(async { Ok(None) })
    }

    /// Seals the batch just before COMMIT: records `now` as the latest time it decided on
    /// `keys` with (a single-writer database needs no clock), writes the idempotency `marks`,
    /// and appends `events` to the audit hash chain, after its current head (with several
    /// writers the head must be locked first, so chains never fork, and last: a mark locks its
    /// key's row, which another batch may hold until it appends its own events). Any may be
    /// empty; a mark comes with an event. Returns what [`Backend::commit_outcome`] needs to
    /// learn later whether the transaction committed, where the database can tell, or
    /// [`marks_fenced`]'s error when a mark found its key held by another attempt: the batch
    /// is then rolled back.
    fn seal<'c>(
        &'c self,
        conn: &'c mut Self::Conn,
        keys: &'c [String],
        now: Timestamp,
        events: &'c mut [AuditEvent],
        marks: &'c [IdempotencyMark],
    ) -> BoxFuture<'c, Outcome<Option<TxnRef>, StoreError, Self::Error>>;

    /// Decides and writes `holds` in the batch transaction, in this order, each as if it ran
    /// alone after those before it (so it sees their claims). A refused hold writes nothing. An
    /// `Err` leaves the transaction in an unknown state: the whole batch is rolled back.
    fn holds<'c>(
        &'c self,
        ctx: &'c mut WriteCtx<Self::Conn>,
        holds: Vec<HoldCommand>,
    ) -> BoxFuture<'c, Result<HoldResults, Self::Error>>;

    /// Takes or reads the keys of `begins` in the batch transaction, before its other requests,
    /// each as if it ran alone after those before it (the same key twice: the second finds it
    /// taken): an answer per begin, in their order, which may be an error of that begin alone.
    /// An `Err` fails the whole batch.
    fn begin_keys<'c>(
        &'c self,
        ctx: &'c mut WriteCtx<Self::Conn>,
        begins: Vec<KeyBegin>,
    ) -> BoxFuture<'c, Result<KeyBegun, Self::Error>>;

    /// Stores the answers of `completions` in the batch transaction, after its other requests,
    /// each only where its attempt still holds the key. An `Err` fails the whole batch.
    fn complete_keys<'c>(
        &'c self,
        conn: &'c mut Self::Conn,
        completions: Vec<KeyCompletion>,
    ) -> BoxFuture<'c, Result<(), Self::Error>>;

    /// Whether requests may keep catalogue documents in [`WriteCtx::memo`] across batches: only
    /// where this writer makes every change to the database (SQLite), and every change drops
    /// what it touches.
    fn memo(&self) -> bool {
        false
    }

    /// A new connection to replace one that failed; `None` keeps the old one.
    fn reconnect(&self) -> BoxFuture<'_, Option<Self::Conn>> {
        Box::pin(async { None })
    }
}

/// The database's names for a batch's open transaction and for the session running it: with
/// them [`Backend::commit_outcome`] can learn whether a COMMIT whose answer was lost committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnRef {
    pub id: i64,
    pub session: i32,
}

/// Per hold of a batch, in its order: the booking kept or why it was refused.
pub type HoldResults = Vec<Result<Booking, HoldRefused>>;

/// Per begin of a batch, in its order: its answer, or why that begin alone failed.
pub type KeyBegun = Vec<Result<IdempotencyBegin, StoreError>>;

/// Attempt `key` asking for its key at `now`, to hold it for `lock_seconds` ([`Writer::begin_key`]).
#[derive(Debug, Clone)]
pub struct KeyBegin {
    pub key: IdempotencyKey,
    pub now: Timestamp,
    pub lock_seconds: u32,
}

/// Attempt `key`'s answer, to store for replay ([`Writer::complete_key`]).
#[derive(Debug, Clone)]
pub struct KeyCompletion {
    pub key: IdempotencyKey,
    pub status: u16,
    pub body: Vec<u8>,
}

/// What a write request sees: the connection (inside the batch transaction) and the batch clock.
pub struct WriteCtx<C> {
    pub conn: C,
    last_now: Timestamp,
    /// Set when a savepoint could not be taken, undone or released: the transaction's state is
    /// unknown (SQLite may even have rolled it back itself), so the whole batch must fail.
    poisoned: bool,
    /// Audit events of the batch's kept requests, appended before COMMIT.
    audit: Vec<AuditEvent>,
    /// Idempotency marks of the batch's kept keyed requests, written before COMMIT.
    marks: Vec<IdempotencyMark>,
    /// Whether savepoint `op` is open for the next request. On PostgreSQL each statement is a
    /// round trip, so a kept request releases its savepoint and opens the next one in one call,
    /// and a refused one rolls back to it and leaves it open.
    savepoint_open: bool,
    /// Catalogue documents the backend may keep between requests (see [`Backend::memo`]);
    /// emptied whenever a batch is rolled back, since it may hold what that batch wrote.
    pub memo: crate::cache::Cache,
    /// The batch transaction, where the backend names it ([`Backend::seal`]).
    txn: Option<TxnRef>,
}

impl<C> WriteCtx<C> {
    /// The request's `now`, never earlier than that of any request applied before it. Without
    /// this, a confirm stamped just before a hold's expiry could be applied after another
    /// customer already re-took the seat.
    pub fn now(&mut self, requested: Timestamp) -> Timestamp {
        self.last_now = self.last_now.max(requested);
        self.last_now
    }

    /// A kept write of `scope`'s request: its event (the first time only, at `at`) and, for a
    /// keyed request that succeeded, its idempotency mark, both written when the batch seals.
    fn claim(&mut self, scope: &AuditScope, at: Timestamp) {
        if let Some(event) = scope.claim(at) {
            self.audit.push(event);
            self.marks.extend(scope.mark());
        }
    }
}

type Reply = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

trait Job<B: Backend>: Send {
    /// The resources this request decides on, locked before the batch runs.
    fn keys(&self) -> &[String];
    fn run<'c>(self: Box<Self>, backend: &'c B, ctx: &'c mut WriteCtx<B::Conn>) -> BoxFuture<'c, Reply>;
    fn fail(self: Box<Self>, error: StoreError);
}

/// The outcome of one request: `Ok(Ok)` is kept, `Ok(Err)` (a business refusal) and `Err` are
/// rolled back to the request's savepoint.
pub type Outcome<T, E, D = sqlx::Error> = Result<Result<T, E>, D>;

struct Op<F, T, E> {
    f: F,
    keys: Vec<String>,
    /// The audit scope of the request that queued this write, if any.
    audit: Option<AuditScope>,
    tx: oneshot::Sender<Result<Result<T, E>, StoreError>>,
}

impl<B, F, T, E> Job<B> for Op<F, T, E>
where
    B: Backend,
    F: for<'c> FnOnce(&'c mut WriteCtx<B::Conn>) -> BoxFuture<'c, Outcome<T, E, B::Error>> + Send + 'static,
    T: Send + 'static,
    E: Send + 'static,
{
    fn keys(&self) -> &[String] {
        &self.keys
    }

    fn run<'c>(self: Box<Self>, backend: &'c B, ctx: &'c mut WriteCtx<B::Conn>) -> BoxFuture<'c, Reply> {
        Box::pin(async move {
            let Op { f, tx, audit, .. } = *self;
            if !ctx.savepoint_open {
                if let Err(e) = backend.execute(&mut ctx.conn, "SAVEPOINT op").await {
                    ctx.poisoned = true;
                    let _ = tx.send(Err(B::error(e)));
                    return Box::new(|_| {}) as Reply;
                }
                ctx.savepoint_open = true;
            }
            let outcome = f(ctx).await;
            let keep = matches!(outcome, Ok(Ok(_)));
            // Either way savepoint `op` is open again afterwards, for the next request.
            let end = if keep { "RELEASE op; SAVEPOINT op" } else { "ROLLBACK TO op" };
            let failure = backend.execute(&mut ctx.conn, end).await.err();
            if failure.is_some() {
                ctx.poisoned = true;
                ctx.savepoint_open = false;
            }
            let claimed = audit.filter(|_| keep && failure.is_none());
            if let Some(scope) = &claimed {
                ctx.claim(scope, ctx.last_now);
            }
            Box::new(move |commit: Result<(), StoreError>| {
                if let Some(scope) = claimed {
                    scope.settle(commit.is_ok());
                }
                let result = match (outcome, commit, failure) {
                    (_, _, Some(e)) => Err(B::error(e)),
                    (Err(e), _, None) => Err(B::error(e)),
                    (Ok(Err(refused)), _, None) => Ok(Err(refused)),
                    (Ok(Ok(value)), Ok(()), None) => Ok(Ok(value)),
                    (Ok(Ok(_)), Err(e), None) => Err(e),
                };
                let _ = tx.send(result);
            }) as Reply
        })
    }

    fn fail(self: Box<Self>, error: StoreError) {
        let _ = self.tx.send(Err(error));
    }
}

/// A hold waiting for its batch; [`Backend::holds`] decides all of a batch's holds at once.
struct HoldJob {
    command: HoldCommand,
    keys: Vec<String>,
    audit: Option<AuditScope>,
    waiter: HoldWaiter,
}

/// Who waits for a hold's answer, and how.
enum HoldWaiter {
    Plain(oneshot::Sender<Result<Booking, HoldRefused>>),
    /// A hold under an idempotency key ([`Writer::hold_keyed`]): the batch takes its key with
    /// the other begins, decides it only if the key was free, and stores its answer with the
    /// other completions.
    Keyed(Box<HoldKey>, KeyedTx),
}

impl HoldJob {
    /// Whether nobody waits for the answer any more (the request was dropped).
    fn abandoned(&self) -> bool {
        match &self.waiter {
            HoldWaiter::Plain(tx) => tx.is_closed(),
            HoldWaiter::Keyed(_, tx) => tx.is_closed(),
        }
    }

    fn keyed(&self) -> bool {
        matches!(self.waiter, HoldWaiter::Keyed(..))
    }

    /// The begin of a keyed hold's key.
    fn key_begin(&self) -> Option<KeyBegin> {
        let HoldWaiter::Keyed(key, _) = &self.waiter else { return None };
        Some(KeyBegin { key: key.key.clone(), now: key.now, lock_seconds: key.lock_seconds })
    }

    fn fail(self, error: StoreError) {
        self.waiter.fail(error);
    }
}

impl HoldWaiter {
    fn fail(self, error: StoreError) {
        match self {
            HoldWaiter::Plain(tx) => {
                let _ = tx.send(Err(HoldRefused::Store(error)));
            }
            HoldWaiter::Keyed(_, tx) => {
                let _ = tx.send(Err(error));
            }
        }
    }
}

/// A key's begin or completion waiting for its batch, which runs all of them together.
struct KeyJob<T, A> {
    request: T,
    tx: oneshot::Sender<Result<A, StoreError>>,
}

/// What waits on the writer's queue.
enum Queued<B: Backend> {
    Job(Box<dyn Job<B>>),
    Hold(Box<HoldJob>),
    Begin(Box<KeyJob<KeyBegin, IdempotencyBegin>>),
    Complete(Box<KeyJob<KeyCompletion, ()>>),
}

impl<B: Backend> Queued<B> {
    fn keys(&self) -> &[String] {
        match self {
            Queued::Job(job) => job.keys(),
            Queued::Hold(hold) => &hold.keys,
            Queued::Begin(_) | Queued::Complete(_) => &[],
        }
    }

    fn fail(self, error: StoreError) {
        match self {
            Queued::Job(job) => job.fail(error),
            Queued::Hold(hold) => hold.fail(error),
            Queued::Begin(begin) => {
                let _ = begin.tx.send(Err(error));
            }
            Queued::Complete(complete) => {
                let _ = complete.tx.send(Err(error));
            }
        }
    }
}

/// SQLSTATEs of a transient clash with another session: a lock wait that timed out, a
/// deadlock victim, a serialization failure, a cancelled statement. The request may be retried.
const TRANSIENT_SQLSTATES: [&str; 4] = ["55P03", "40P01", "40001", "57014"];

/// SQLSTATE of a deadlock victim, and what starts its [`StoreError::Busy`] ([`is_deadlock`]).
const DEADLOCK_SQLSTATE: &str = "40P01";
const DEADLOCK_PREFIX: &str = "deadlock with another session";

/// Attempts at a write whose job lost a deadlock ([`Writer::write_locked_retrying`]).
pub const DEADLOCK_ATTEMPTS_MAX: u32 = 3;

/// Whether `e` is a job's loss of a deadlock: rolled back to its savepoint, nothing of it kept.
pub fn is_deadlock(e: &StoreError) -> bool {
    matches!(e, StoreError::Busy(why) if why.starts_with(DEADLOCK_PREFIX))
}

pub fn db_error(e: sqlx::Error) -> StoreError {
    let code = e.as_database_error().and_then(|d| d.code());
    let code = code.as_deref();
    if code.is_some_and(|c| TRANSIENT_SQLSTATES.contains(&c)) {
        tracing::warn!(error = %e, "transient database conflict; the request may be retried");
        if code == Some(DEADLOCK_SQLSTATE) {
            return StoreError::Busy(format!("{DEADLOCK_PREFIX}: {e}"));
        }
        return StoreError::Busy(e.to_string());
    }
    StoreError::Database(e.to_string())
}

/// Counters of the writer since start: how well group commit is batching.
#[derive(Debug, Default)]
pub struct WriteStats {
    pub transactions: AtomicU64,
    pub requests: AtomicU64,
}

/// Handle to the writer: one queue per lane (a connection with its batch loop). Cloning
/// shares the queues.
pub struct Writer<B: Backend> {
    lanes: Arc<[Lane<B>]>,
    pub stats: Arc<WriteStats>,
}

impl<B: Backend> Clone for Writer<B> {
    fn clone(&self) -> Self {
        Self { lanes: self.lanes.clone(), stats: self.stats.clone() }
    }
}

/// One lane's queue and how many requests it has queued or in its batch.
struct Lane<B: Backend> {
    queue: mpsc::Sender<Queued<B>>,
    /// Raised when a request is queued, lowered just before its batch's answers go out.
    load: Arc<AtomicUsize>,
}

impl<B: Backend> Writer<B> {
    /// Starts `lanes` (at most [`LANES_MAX`]) batch loops, for connections whose statements are
    /// awaited (PostgreSQL), each on a thread of its own with a single-threaded runtime and a
    /// connection made there by `connect`. Each lane has its own queue and batches; a request
    /// that names resources goes to the lane of its first one (so two lanes never wait on each
    /// other's locks for the same resource), others to the lane with the fewest requests queued
    /// or in its batch. Lanes are to each other what the writers of several nodes are: the
    /// database serializes them per resource ([`Backend::lock`]) and at the audit chain's head,
    /// so one lane's batch runs its statements while another's waits on a round trip or its
    /// commit.
    ///
    /// Why threads: a batch is about ten round trips, and a lane on the shared runtime, woken by
    /// its connection's answer, waited for a worker behind the request tasks (~150 µs per round
    /// trip under load). A thread of its own is run by the OS as soon as the answer arrives.
    pub async fn start_lanes(backend: B, lanes: usize, connect: Connect<B>) -> Result<Writer<B>, StoreError>
    where
        B: Clone,
    {
        assert!((1..=LANES_MAX).contains(&lanes), "1..={LANES_MAX} write lanes");
        let stats = Arc::new(WriteStats::default());
        let mut started = Vec::with_capacity(lanes);
        for index in 0..lanes {
            let (tx, rx) = oneshot::channel();
            let (backend, stats) = (backend.clone(), stats.clone());
            std::thread::Builder::new()
                .name(format!("allot-write-lane-{index}"))
                .spawn(move || run_lane_thread(backend, stats, connect, tx))
                .map_err(|e| StoreError::Database(format!("starting write lane {index}: {e}")))?;
            started.push(rx.await.map_err(|_| StoreError::Closed)??);
        }
        Ok(Self::over(started, stats))
    }

    /// Starts the writer on a thread of its own: for a synchronous connection, whose
    /// statements block (SQLite). Its jobs' futures are ready at once; the thread sleeps only
    /// while the queue is empty, and ends when the last [`Writer`] handle is dropped.
    pub fn start_thread(conn: B::Conn, backend: B, name: &str) -> std::io::Result<Writer<B>> {
        let stats = Arc::new(WriteStats::default());
        let (lane, run) = Self::lane(conn, backend, stats.clone());
        std::thread::Builder::new().name(name.to_owned()).spawn(move || futures::executor::block_on(run))?;
        Ok(Self::over([lane], stats))
    }

    fn over(lanes: impl Into<Arc<[Lane<B>]>>, stats: Arc<WriteStats>) -> Writer<B> {
        Writer { lanes: lanes.into(), stats }
    }

    fn lane(conn: B::Conn, backend: B, stats: Arc<WriteStats>) -> (Lane<B>, impl Future<Output = ()> + Send + 'static) {
        let (queue, rx) = mpsc::channel(QUEUE_DEPTH_MAX);
        let load = Arc::new(AtomicUsize::new(0));
        let memo = crate::cache::Cache::default();
        memo.set_enabled(backend.memo());
        let ctx = WriteCtx {
            conn,
            last_now: Timestamp::UNIX_EPOCH,
            poisoned: false,
            audit: Vec::new(),
            marks: Vec::new(),
            savepoint_open: false,
            memo,
            txn: None,
        };
        (Lane { queue, load: load.clone() }, run(backend, ctx, rx, stats, load))
    }

    /// [`Writer::write`] for a request that runs without awaiting (a synchronous connection).
    pub async fn write_now<T, E, F>(&self, f: F) -> Result<Result<T, E>, StoreError>
    where
        F: FnOnce(&mut WriteCtx<B::Conn>) -> Outcome<T, E, B::Error> + Send + 'static,
        T: Send + 'static,
        E: Send + 'static,
    {
        self.write(move |ctx: &mut WriteCtx<B::Conn>| -> BoxFuture<'_, Outcome<T, E, B::Error>> {
            Box::pin(std::future::ready(f(ctx)))
        })
        .await
    }

    /// [`Writer::exec`] for a request that runs without awaiting.
    pub async fn exec_now<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&mut WriteCtx<B::Conn>) -> Outcome<T, StoreError, B::Error> + Send + 'static,
        T: Send + 'static,
    {
        self.write_now(f).await?
    }

    /// Runs `f` in the next batch and returns once that batch is durably committed.
    pub async fn write<T, E, F>(&self, f: F) -> Result<Result<T, E>, StoreError>
    where
        F: for<'c> FnOnce(&'c mut WriteCtx<B::Conn>) -> BoxFuture<'c, Outcome<T, E, B::Error>> + Send + 'static,
        T: Send + 'static,
        E: Send + 'static,
    {
        self.write_locked(Vec::new(), f).await
    }

    /// Like [`Writer::write`], with `keys` (resource ids) locked for the whole batch first.
    pub async fn write_locked<T, E, F>(&self, keys: Vec<String>, f: F) -> Result<Result<T, E>, StoreError>
    where
        F: for<'c> FnOnce(&'c mut WriteCtx<B::Conn>) -> BoxFuture<'c, Outcome<T, E, B::Error>> + Send + 'static,
        T: Send + 'static,
        E: Send + 'static,
    {
        self.submit(keys, allot_app::audit::current(), f).await
    }

    /// [`Writer::write_locked`] for a job that takes row locks of its own, one job at a time
    /// (users, venues, refresh-token families: ARCHITECTURE.md, Invariants), and so can lose a
    /// deadlock to another node's batch that took the same ones in the other order. Its
    /// savepoint was rolled back, nothing of it kept: it runs again in a later batch, up to
    /// [`DEADLOCK_ATTEMPTS_MAX`] times, instead of failing as busy.
    pub async fn write_locked_retrying<T, E, F>(&self, keys: Vec<String>, f: F) -> Result<Result<T, E>, StoreError>
    where
        F: for<'c> FnOnce(&'c mut WriteCtx<B::Conn>) -> BoxFuture<'c, Outcome<T, E, B::Error>> + Clone + Send + 'static,
        T: Send + 'static,
        E: Send + 'static,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.write_locked(keys.clone(), f.clone()).await {
                Err(e) if is_deadlock(&e) && attempt < DEADLOCK_ATTEMPTS_MAX => {
                    tracing::info!(attempt, "a write lost a deadlock; running it again");
                }
                written => return written,
            }
        }
    }

    /// [`Writer::exec`] through [`Writer::write_locked_retrying`].
    pub async fn exec_retrying<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: for<'c> FnOnce(&'c mut WriteCtx<B::Conn>) -> BoxFuture<'c, Outcome<T, StoreError, B::Error>>
            + Clone
            + Send
            + 'static,
        T: Send + 'static,
    {
        self.write_locked_retrying(Vec::new(), f).await?
    }

    /// Appends an audit event on its own: an attempt that changed nothing.
    pub async fn append_audit(&self, event: AuditEvent) -> Result<(), StoreError> {
        self.submit(
            Vec::new(),
            None,
            move |ctx: &mut WriteCtx<B::Conn>| -> BoxFuture<'_, Outcome<(), StoreError, B::Error>> {
                ctx.audit.push(event);
                Box::pin(async { Ok(Ok(())) })
            },
        )
        .await?
    }

    async fn submit<T, E, F>(
        &self,
        keys: Vec<String>,
        audit: Option<AuditScope>,
        f: F,
    ) -> Result<Result<T, E>, StoreError>
    where
        F: for<'c> FnOnce(&'c mut WriteCtx<B::Conn>) -> BoxFuture<'c, Outcome<T, E, B::Error>> + Send + 'static,
        T: Send + 'static,
        E: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.enqueue(Queued::Job(Box::new(Op { f, keys, audit, tx })))?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Queues a hold, with `keys` (its resources) locked for the batch, and returns once its
    /// batch is durably committed. Holds are decided together per batch ([`Backend::holds`]).
    /// A hold whose caller has stopped waiting (its request dropped: the client hung up, the
    /// request timed out) before its batch decides it is not made: nobody would learn of it,
    /// and it would keep the capacity from other customers until it lapsed.
    pub async fn hold(&self, keys: Vec<String>, command: HoldCommand) -> Result<Booking, HoldRefused> {
        let (tx, rx) = oneshot::channel();
        let audit = allot_app::audit::current();
        let waiter = HoldWaiter::Plain(tx);
        self.enqueue(Queued::Hold(Box::new(HoldJob { command, keys, audit, waiter }))).map_err(HoldRefused::Store)?;
        rx.await.unwrap_or(Err(HoldRefused::Store(StoreError::Closed)))
    }

    /// [`Writer::hold`] under an idempotency key, taken, decided on and answered in one batch
    /// ([`HoldKey`]). Once its key is taken the hold is made even if its caller stops waiting:
    /// its answer is stored, and a retry is answered with it.
    pub async fn hold_keyed(
        &self,
        keys: Vec<String>,
        command: HoldCommand,
        key: HoldKey,
    ) -> Result<KeyedHoldOutcome, StoreError> {
        let (tx, rx) = oneshot::channel();
        let audit = allot_app::audit::current();
        let waiter = HoldWaiter::Keyed(Box::new(key), tx);
        self.enqueue(Queued::Hold(Box::new(HoldJob { command, keys, audit, waiter })))?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Queues attempt `begin.key`'s ask for its key and returns the answer once its batch is
    /// durably committed: the key is taken only then ([`Backend::begin_keys`]).
    pub async fn begin_key(&self, begin: KeyBegin) -> Result<IdempotencyBegin, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.enqueue(Queued::Begin(Box::new(KeyJob { request: begin, tx })))?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Queues an attempt's answer for replay and returns once its batch is durably committed
    /// ([`Backend::complete_keys`]).
    pub async fn complete_key(&self, completion: KeyCompletion) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.enqueue(Queued::Complete(Box::new(KeyJob { request: completion, tx })))?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    fn enqueue(&self, entry: Queued<B>) -> Result<(), StoreError> {
        let lane = match (self.lanes.len(), entry.keys().first()) {
            (1, _) => &self.lanes[0],
            // A resource's requests keep to one lane: lanes deciding on the same resource
            // would wait on each other's row locks (`Backend::lock`) instead of overlapping.
            (n, Some(key)) => &self.lanes[lane_of(key, n)],
            // The least loaded lane, so that a lane stuck on a lock (another node's, for up to
            // the lock timeout) does not hold up writes that need no resource.
            (_, None) => {
                self.lanes.iter().min_by_key(|lane| lane.load.load(Ordering::Relaxed)).unwrap_or(&self.lanes[0])
            }
        };
        lane.load.fetch_add(1, Ordering::Relaxed);
        lane.queue.try_send(entry).map_err(|e| {
            lane.load.fetch_sub(1, Ordering::Relaxed);
            match e {
                mpsc::error::TrySendError::Full(_) => StoreError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => StoreError::Closed,
            }
        })
    }

    /// Like [`Writer::write`] for requests that cannot be refused, only fail.
    pub async fn exec<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: for<'c> FnOnce(&'c mut WriteCtx<B::Conn>) -> BoxFuture<'c, Outcome<T, StoreError, B::Error>>
            + Send
            + 'static,
        T: Send + 'static,
    {
        self.write(f).await?
    }
}

/// Makes a write lane's connection, on the lane's own runtime ([`Writer::start_lanes`]).
pub type Connect<B> = for<'b> fn(&'b B) -> BoxFuture<'b, Result<<B as Backend>::Conn, <B as Backend>::Error>>;

/// The body of a lane's thread: a runtime, the connection, then the batch loop until the last
/// [`Writer`] handle is dropped. The lane (or why there is none) is sent back on `started`.
fn run_lane_thread<B: Backend>(
    backend: B,
    stats: Arc<WriteStats>,
    connect: Connect<B>,
    started: oneshot::Sender<Result<Lane<B>, StoreError>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = started.send(Err(StoreError::Database(format!("write lane runtime: {e}"))));
            return;
        }
    };
    runtime.block_on(async move {
        let conn = match connect(&backend).await {
            Ok(conn) => conn,
            Err(e) => {
                let _ = started.send(Err(B::error(e)));
                return;
            }
        };
        let (lane, run) = Writer::lane(conn, backend, stats);
        if started.send(Ok(lane)).is_ok() {
            run.await;
        }
    });
}

async fn run<B: Backend>(
    backend: B,
    mut ctx: WriteCtx<B::Conn>,
    mut rx: mpsc::Receiver<Queued<B>>,
    stats: Arc<WriteStats>,
    load: Arc<AtomicUsize>,
) {
    let mut batch: Vec<Queued<B>> = Vec::with_capacity(BATCH_SIZE_MAX);
    while rx.recv_many(&mut batch, BATCH_SIZE_MAX).await > 0 {
        assert!(batch.len() <= BATCH_SIZE_MAX, "recv_many respects the batch limit");
        let size = batch.len();
        stats.transactions.fetch_add(1, Ordering::Relaxed);
        stats.requests.fetch_add(size as u64, Ordering::Relaxed);
        metrics::histogram!(telemetry::STORE_BATCH_SIZE).record(size as f64);
        apply_batch(&backend, &mut ctx, &mut batch, &load).await;
        batch.clear();
    }
}

/// The lane of the requests that decide on resource `key`, of `lanes`.
fn lane_of(key: &str, lanes: usize) -> usize {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut hasher);
    (hasher.finish() % lanes as u64) as usize
}

/// Begins the batch transaction, replacing the connection once if it has failed.
async fn begin<B: Backend>(backend: &B, ctx: &mut WriteCtx<B::Conn>) -> Result<(), B::Error> {
    let Err(first) = backend.begin(&mut ctx.conn).await else { return Ok(()) };
    let Some(conn) = backend.reconnect().await else { return Err(first) };
    tracing::warn!(error = %first, "write connection replaced");
    ctx.conn = conn;
    backend.begin(&mut ctx.conn).await
}

/// Fails every request of `batch`, lowering the lane's `load` first (as `apply_batch` does
/// before any answer).
fn fail_all<B: Backend>(batch: &mut Vec<Queued<B>>, load: &AtomicUsize, error: &StoreError) {
    load.fetch_sub(batch.len(), Ordering::Relaxed);
    for entry in batch.drain(..) {
        entry.fail(error.clone());
    }
}

/// Runs one batch and answers each of its requests; `load` (the lane's count of requests
/// queued or in a batch) drops by the batch's size just before the answers go out, so a
/// request sent on an answer already sees this lane as free.
async fn apply_batch<B: Backend>(
    backend: &B,
    ctx: &mut WriteCtx<B::Conn>,
    batch: &mut Vec<Queued<B>>,
    load: &AtomicUsize,
) {
    let size = batch.len();
    if let Err(e) = begin(backend, ctx).await {
        let error = B::error(e);
        tracing::error!(%error, "could not begin a write transaction");
        fail_all(batch, load, &error);
        return;
    }
    let mut keys: Vec<String> = batch.iter().flat_map(|entry| entry.keys().iter().cloned()).collect();
    keys.sort_unstable();
    keys.dedup();
    if !keys.is_empty() {
        match backend.lock(&mut ctx.conn, &keys).await {
            Ok(floor) => ctx.last_now = ctx.last_now.max(floor.unwrap_or(Timestamp::UNIX_EPOCH)),
            Err(e) => {
                let _ = backend.execute(&mut ctx.conn, "ROLLBACK").await;
                let error = B::error(e);
                tracing::error!(%error, "could not lock the batch's resources");
                fail_all(batch, load, &error);
                return;
            }
        }
    }
    // All of the batch's holds run together where the first one stood, its keys' begins before
    // everything and their completions after. Nothing in a batch is answered before it
    // commits, so any order of its requests is one they could have had.
    let jobs_before_holds = batch
        .iter()
        .take_while(|entry| !matches!(entry, Queued::Hold(_)))
        .filter(|entry| matches!(entry, Queued::Job(_)))
        .count();
    let mut jobs = Vec::with_capacity(batch.len());
    let (mut holds, mut begins, mut completions) = (Vec::new(), Vec::new(), Vec::new());
    for entry in batch.drain(..) {
        match entry {
            Queued::Job(job) => jobs.push(job),
            // A hold whose caller left is not made, nor its key taken.
            Queued::Hold(hold) if hold.abandoned() => {}
            Queued::Hold(hold) => holds.push(*hold),
            Queued::Begin(begin) => begins.push(*begin),
            Queued::Complete(completion) => completions.push(*completion),
        }
    }
    let mut replies: Vec<Reply> = Vec::with_capacity(size);
    let mut jobs = jobs.into_iter();
    ctx.poisoned = false;
    ctx.savepoint_open = false;
    ctx.audit.clear();
    ctx.marks.clear();
    let mut aborted = run_begins(backend, ctx, std::mem::take(&mut begins), &mut holds, &mut replies).await;
    if !aborted {
        aborted = run_jobs(backend, ctx, jobs.by_ref().take(jobs_before_holds), &mut replies).await;
    }
    let mut answered = Vec::new();
    if !aborted && !holds.is_empty() {
        aborted = run_holds(backend, ctx, std::mem::take(&mut holds), &mut answered, &mut replies).await;
    }
    if !aborted {
        aborted = run_jobs(backend, ctx, jobs.by_ref(), &mut replies).await;
    }
    if !aborted && (!completions.is_empty() || !answered.is_empty()) {
        aborted = run_completions(backend, ctx, std::mem::take(&mut completions), answered, &mut replies).await;
    }
    let commit = if aborted { Err(write_aborted()) } else { finish(backend, ctx, &keys).await };
    if commit.is_err() {
        let _ = backend.execute(&mut ctx.conn, "ROLLBACK").await;
        ctx.memo.invalidate(crate::cache::INVALIDATE_ALL);
    }
    load.fetch_sub(size, Ordering::Relaxed);
    let not_run = jobs
        .map(Queued::Job)
        .chain(holds.into_iter().map(|hold| Queued::Hold(Box::new(hold))))
        .chain(begins.into_iter().map(|begin| Queued::Begin(Box::new(begin))))
        .chain(completions.into_iter().map(|completion| Queued::Complete(Box::new(completion))));
    for entry in not_run {
        entry.fail(write_aborted());
    }
    for reply in replies {
        reply(commit.clone());
    }
}

/// What a request of a batch that was rolled back as a whole fails with. Another request broke
/// the batch (a panic, a failed savepoint, the holds' statements): this one did nothing wrong,
/// so it fails as busy, which clients (503) and the audit trail's own appends retry.
fn write_aborted() -> StoreError {
    StoreError::Busy("write aborted: its batch was rolled back".into())
}

/// Whether all of a batch's `marks` were written (`marked` of them): each only where its
/// attempt still holds the key ([`IdempotencyMark`]). One that was not belongs to an attempt
/// whose key was taken over: its change must not commit, and a batch's changes cannot be
/// undone one by one after they ran (its holds have no savepoints), so the batch is rolled
/// back and each of its requests fails as busy: retried, the stale attempt's is answered as
/// the attempt that took over answered, the others run again. Only an attempt stalled past
/// its lease (60 s without a renewal) is ever taken over, so this is rare.
pub fn marks_fenced(marks: &[IdempotencyMark], marked: u64) -> Result<(), StoreError> {
    assert!(marked <= marks.len() as u64, "a mark writes at most its own key's row");
    if marked == marks.len() as u64 {
        return Ok(());
    }
    tracing::warn!(marks = marks.len(), marked, "an idempotency key of this batch was taken over; rolling it back");
    Err(StoreError::Busy("write aborted: an attempt in its batch no longer holds its idempotency key".into()))
}

/// Runs `jobs` one after another, each in its own savepoint; true when the batch must be
/// rolled back (a job panicked or a savepoint failed). Jobs after that one are left in `jobs`.
async fn run_jobs<B: Backend>(
    backend: &B,
    ctx: &mut WriteCtx<B::Conn>,
    jobs: impl Iterator<Item = Box<dyn Job<B>>>,
    replies: &mut Vec<Reply>,
) -> bool {
    for job in jobs {
        match AssertUnwindSafe(job.run(backend, ctx)).catch_unwind().await {
            Ok(reply) => replies.push(reply),
            Err(_) => {
                tracing::error!("a write request panicked; rolling back its batch");
                return true;
            }
        }
        if ctx.poisoned {
            tracing::error!("a savepoint failed; rolling back its batch");
            return true;
        }
    }
    false
}

/// Decides and writes the batch's holds in one pass, and adds the answers of the keyed ones to
/// `answered`, to store with the batch's completions; true when the batch must be rolled back.
/// A keyed hold is made even if its caller left since its key was taken (a retry is answered
/// with it); another is not.
async fn run_holds<B: Backend>(
    backend: &B,
    ctx: &mut WriteCtx<B::Conn>,
    holds: Vec<HoldJob>,
    answered: &mut Vec<KeyCompletion>,
    replies: &mut Vec<Reply>,
) -> bool {
    let (commands, waiting): (Vec<_>, Vec<_>) =
        holds.into_iter().filter(|h| h.keyed() || !h.abandoned()).map(|h| (h.command, (h.audit, h.waiter))).unzip();
    let count = commands.len();
    if count == 0 {
        return false;
    }
    // The holds need no savepoint (a refused hold writes nothing, an error fails the batch),
    // and one left open by an earlier job would copy every page they touch first; a later job
    // that is refused opens its own.
    let decided = match release_savepoint(backend, ctx).await {
        Err(e) => Ok(Err(e)),
        // Called inside the caught future: a backend that does its work while building the
        // future (a synchronous connection) must not take the writer down with a panic either.
        Ok(()) => AssertUnwindSafe(async { backend.holds(ctx, commands).await }).catch_unwind().await,
    };
    let failure = match decided {
        Ok(Ok(results)) => {
            assert_eq!(results.len(), count, "one result per hold");
            let mut unanswerable = false;
            for ((audit, waiter), result) in waiting.into_iter().zip(results) {
                match hold_reply(ctx, audit, waiter, result, answered) {
                    Ok(reply) => replies.push(reply),
                    Err(tx) => {
                        // Answered with the others, once the rollback is done.
                        unanswerable = true;
                        replies.push(Box::new(move |_| {
                            let _ = tx.send(Err(write_aborted()));
                        }));
                    }
                }
            }
            // A keyed hold kept without its answer would be made again by a retry once its
            // key's lease lapsed: the batch is rolled back instead.
            return unanswerable;
        }
        Ok(Err(e)) => B::error(e),
        Err(_) => write_aborted(),
    };
    tracing::error!(error = %failure, "the batch's holds failed; rolling back its batch");
    for (_, waiter) in waiting {
        waiter.fail(failure.clone());
    }
    true
}

/// Takes or reads the batch's keys, before anything else runs: those of `begins` and of its
/// keyed `holds`. A keyed hold whose key was not free leaves `holds`, answered with what was
/// found instead; true when the batch must be rolled back. A begun attempt that no longer
/// waits is still begun (its answer is only known once the batch commits, and a key taken
/// for nobody lapses with its lease); a keyed hold whose caller left before its batch began
/// is neither begun nor made (`apply_batch`).
async fn run_begins<B: Backend>(
    backend: &B,
    ctx: &mut WriteCtx<B::Conn>,
    begins: Vec<KeyJob<KeyBegin, IdempotencyBegin>>,
    holds: &mut Vec<HoldJob>,
    replies: &mut Vec<Reply>,
) -> bool {
    let held: Vec<KeyBegin> = holds.iter().filter_map(HoldJob::key_begin).collect();
    if begins.is_empty() && held.is_empty() {
        return false;
    }
    let mut for_holds = Vec::new();
    let aborted = run_key_jobs::<B, _, _>(begins, replies, "begins", async |mut requests| {
        let plain = requests.len();
        requests.extend(held);
        let mut answers = backend.begin_keys(ctx, requests).await?;
        for_holds = answers.split_off(plain.min(answers.len()));
        Ok(answers)
    })
    .await;
    if aborted {
        return true;
    }
    let mut found = for_holds.into_iter();
    *holds = std::mem::take(holds)
        .into_iter()
        .filter_map(|hold| {
            if !hold.keyed() {
                return Some(hold);
            }
            match found.next().expect("one answer per keyed hold") {
                Ok(IdempotencyBegin::Started) => Some(hold),
                begun => {
                    replies.push(not_run_reply(hold.audit, hold.waiter, begun));
                    None
                }
            }
        })
        .collect();
    assert!(found.next().is_none(), "one answer per keyed hold");
    false
}

/// The answer to a keyed hold whose key was not free, sent once the batch's outcome is known:
/// the hold did not run, so its request records no event of its own (a replay is the attempt
/// that ran; a refusal of the key is recorded by the idempotency layer).
fn not_run_reply(audit: Option<AuditScope>, waiter: HoldWaiter, begun: Result<IdempotencyBegin, StoreError>) -> Reply {
    let HoldWaiter::Keyed(_, tx) = waiter else { unreachable!("only a keyed hold has a key to begin") };
    Box::new(move |commit: Result<(), StoreError>| {
        let outcome = commit.and(begun).map(KeyedHoldOutcome::NotRun);
        if let (Ok(_), Some(scope)) = (&outcome, audit) {
            scope.discard();
        }
        let _ = tx.send(outcome);
    })
}

/// Stores the batch's answers, after its other requests: those of `completions` and of its
/// keyed holds (`answered`, which nobody waits for apart); true when the batch must be rolled
/// back.
async fn run_completions<B: Backend>(
    backend: &B,
    ctx: &mut WriteCtx<B::Conn>,
    completions: Vec<KeyJob<KeyCompletion, ()>>,
    answered: Vec<KeyCompletion>,
    replies: &mut Vec<Reply>,
) -> bool {
    run_key_jobs::<B, _, _>(completions, replies, "answers", async |mut requests| {
        let stored = vec![Ok(()); requests.len()];
        requests.extend(answered);
        release_savepoint(backend, ctx).await?;
        backend.complete_keys(&mut ctx.conn, requests).await.map(|()| stored)
    })
    .await
}

/// Runs a batch's idempotency `jobs` (`what` they are) together through `run`, which answers
/// each in their order, and queues each answer to be sent once the batch's outcome is known;
/// true when the batch must be rolled back (`run` failed or panicked: every job fails with it).
async fn run_key_jobs<B: Backend, T, A: Send + 'static>(
    jobs: Vec<KeyJob<T, A>>,
    replies: &mut Vec<Reply>,
    what: &'static str,
    run: impl AsyncFnOnce(Vec<T>) -> Result<Vec<Result<A, StoreError>>, B::Error>,
) -> bool {
    let (requests, waiting): (Vec<_>, Vec<_>) = jobs.into_iter().map(|job| (job.request, job.tx)).unzip();
    let count = requests.len();
    // Called inside the caught future, as the holds are (`run_holds`).
    let failure = match AssertUnwindSafe(async { run(requests).await }).catch_unwind().await {
        Ok(Ok(answers)) => {
            assert_eq!(answers.len(), count, "one answer per request");
            for (tx, answer) in waiting.into_iter().zip(answers) {
                replies.push(Box::new(move |commit: Result<(), StoreError>| {
                    let _ = tx.send(commit.and(answer));
                }));
            }
            return false;
        }
        Ok(Err(e)) => B::error(e),
        Err(_) => write_aborted(),
    };
    tracing::error!(error = %failure, what, "the batch's idempotency keys failed; rolling back its batch");
    for tx in waiting {
        let _ = tx.send(Err(failure.clone()));
    }
    true
}

/// Releases savepoint `op` if a job left it open, keeping what that job wrote.
async fn release_savepoint<B: Backend>(backend: &B, ctx: &mut WriteCtx<B::Conn>) -> Result<(), B::Error> {
    if !ctx.savepoint_open {
        return Ok(());
    }
    ctx.savepoint_open = false;
    backend.execute(&mut ctx.conn, "RELEASE op").await
}

/// The answer to one decided hold, sent once the batch's outcome is known. Its audit event
/// joins the batch's: a kept hold's, and a refused one's as a failed attempt (so a 409 is not
/// held back by a second transaction for its event). A keyed hold's rendered answer joins
/// `answered`, stored in the same transaction; `Err` (its waiter) when it has none to store
/// ([`render`]): the batch must then be rolled back.
fn hold_reply<C>(
    ctx: &mut WriteCtx<C>,
    audit: Option<AuditScope>,
    waiter: HoldWaiter,
    result: Result<Booking, HoldRefused>,
    answered: &mut Vec<KeyCompletion>,
) -> Result<Reply, KeyedTx> {
    let keyed = match waiter {
        HoldWaiter::Plain(tx) => Err(tx),
        HoldWaiter::Keyed(key, tx) => match render(*key, &result) {
            Some((completion, answer)) => {
                answered.push(completion);
                Ok((answer, tx))
            }
            None => return Err(tx),
        },
    };
    let claimed = audit.filter(|_| result.as_ref().err().is_none_or(|refused| refused.audit_reason().is_some()));
    match (&claimed, &result) {
        (Some(scope), Ok(booking)) => ctx.claim(scope, booking.created_at),
        (Some(scope), Err(refused)) => {
            let failed = refused.audit_reason().and_then(|r| scope.claim_failure(ctx.last_now, r));
            ctx.audit.extend(failed);
        }
        (None, _) => {}
    }
    let settle = move |commit: &Result<(), StoreError>| {
        if let Some(scope) = claimed {
            scope.settle(commit.is_ok());
        }
    };
    Ok(match keyed {
        Err(tx) => Box::new(move |commit: Result<(), StoreError>| {
            settle(&commit);
            let answer = match (result, commit) {
                (Ok(_), Err(e)) => Err(HoldRefused::Store(e)),
                (result, _) => result,
            };
            let _ = tx.send(answer);
        }),
        Ok((answer, tx)) => Box::new(move |commit: Result<(), StoreError>| {
            settle(&commit);
            let _ = tx.send(commit.map(|()| KeyedHoldOutcome::Ran { result, answer }));
        }),
    })
}

/// Where a keyed hold's outcome goes.
type KeyedTx = oneshot::Sender<Result<KeyedHoldOutcome, StoreError>>;

/// A keyed hold's answer to `result`, rendered by its request's [`HoldKey::answer`], and its
/// completion; `None` when there is none to store: the rendering panicked or made a server
/// error, which is never stored (none is expected of a decided hold, kept or refused).
fn render(key: HoldKey, result: &Result<Booking, HoldRefused>) -> Option<(KeyCompletion, StoredAnswer)> {
    let HoldKey { key, answer, .. } = key;
    match std::panic::catch_unwind(AssertUnwindSafe(|| answer(result.as_ref()))) {
        Ok(answer) if answer.status < 500 => {
            Some((KeyCompletion { key, status: answer.status, body: answer.body.clone() }, answer))
        }
        Ok(answer) => {
            tracing::error!(status = answer.status, "a decided hold rendered a server error; rolling back its batch");
            None
        }
        Err(_) => {
            tracing::error!("rendering a decided hold's answer panicked; rolling back its batch");
            None
        }
    }
}

/// Stamps the batch clock on its resources, appends its audit events and commits.
async fn finish<B: Backend>(backend: &B, ctx: &mut WriteCtx<B::Conn>, keys: &[String]) -> Result<(), StoreError> {
    ctx.txn = None;
    assert!(ctx.marks.len() <= ctx.audit.len(), "every idempotency mark comes with its audit event");
    if !keys.is_empty() || !ctx.audit.is_empty() {
        let sealed = backend.seal(&mut ctx.conn, keys, ctx.last_now, &mut ctx.audit, &ctx.marks).await;
        ctx.txn = sealed.map_err(B::error)??;
    }
    let started = std::time::Instant::now();
    let committed = match backend.execute(&mut ctx.conn, "COMMIT").await {
        Ok(()) => Ok(()),
        Err(e) => settle_failed_commit(backend, ctx, B::error(e)).await,
    };
    metrics::histogram!(telemetry::STORE_COMMIT_DURATION).record(started.elapsed().as_secs_f64());
    committed
}

/// The outcome of a batch whose COMMIT failed. The answer may have been lost with the
/// connection after the database committed: failing the batch's requests then would have
/// clients retry what is done (a second hold, refused the seat the first one holds), so the
/// database is asked where it can tell.
async fn settle_failed_commit<B: Backend>(
    backend: &B,
    ctx: &mut WriteCtx<B::Conn>,
    error: StoreError,
) -> Result<(), StoreError> {
    let Some(txn) = ctx.txn.take() else { return Err(error) };
    match backend.commit_outcome(&mut ctx.conn, txn).await {
        Some(true) => {
            tracing::warn!(%error, txn = txn.id, "a COMMIT's answer was lost, but the batch committed");
            Ok(())
        }
        Some(false) => Err(error),
        None => {
            tracing::error!(%error, txn = txn.id, "a COMMIT failed and whether it committed is unknown");
            Err(error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::lane_of;

    #[test]
    fn a_resource_keeps_to_one_lane_and_resources_spread_over_all_lanes() {
        let keys: Vec<String> = (0..1_000).map(|i| format!("01a22f40c3df74f0aa628639feaa{i:04}")).collect();
        for lanes in 1..=4 {
            let mut per_lane = vec![0_usize; lanes];
            for key in &keys {
                let lane = lane_of(key, lanes);
                assert_eq!(lane, lane_of(key, lanes), "the same lane every time");
                per_lane[lane] += 1;
            }
            let fair = keys.len() / lanes;
            assert!(per_lane.iter().all(|&n| n > fair * 8 / 10 && n < fair * 12 / 10), "{lanes} lanes: {per_lane:?}");
        }
    }
}
