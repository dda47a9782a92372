//! The single writer with group commit.
//!
//! Requests queue on a bounded channel. The writer takes everything queued (up to
//! [`BATCH_SIZE_MAX`]), runs each request inside its own SAVEPOINT of one transaction (so a
//! refused request undoes only its own changes), commits once, and only then answers each
//! request. One fsync serves the whole batch; no answer precedes durability.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use allot_app::StoreError;
use futures::FutureExt;
use futures::future::BoxFuture;
use jiff::Timestamp;
use sqlx::SqliteConnection;
use tokio::sync::{mpsc, oneshot};

pub const BATCH_SIZE_MAX: usize = 512;
pub const QUEUE_DEPTH_MAX: usize = 16_384;

/// What a write request sees: the connection (inside the batch transaction) and the batch clock.
pub struct WriteCtx {
    pub conn: SqliteConnection,
    last_now: Timestamp,
    /// Set when a savepoint could not be taken, undone or released: the transaction's state is
    /// unknown (SQLite may even have rolled it back itself), so the whole batch must fail.
    poisoned: bool,
}

impl WriteCtx {
    /// The request's `now`, never earlier than that of any request applied before it. Without
    /// this, a confirm stamped just before a hold's expiry could be applied after another
    /// customer already re-took the seat.
    pub fn now(&mut self, requested: Timestamp) -> Timestamp {
        self.last_now = self.last_now.max(requested);
        self.last_now
    }
}

type Reply = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

trait Job: Send {
    fn run<'c>(self: Box<Self>, ctx: &'c mut WriteCtx) -> BoxFuture<'c, Reply>;
    fn fail(self: Box<Self>, error: StoreError);
}

/// The outcome of one request: `Ok(Ok)` is kept, `Ok(Err)` (a business refusal) and `Err` are
/// rolled back to the request's savepoint.
pub type Outcome<T, E> = Result<Result<T, E>, sqlx::Error>;

struct Op<F, T, E> {
    f: F,
    tx: oneshot::Sender<Result<Result<T, E>, StoreError>>,
}

impl<F, T, E> Job for Op<F, T, E>
where
    F: for<'c> FnOnce(&'c mut WriteCtx) -> BoxFuture<'c, Outcome<T, E>> + Send + 'static,
    T: Send + 'static,
    E: Send + 'static,
{
    fn run<'c>(self: Box<Self>, ctx: &'c mut WriteCtx) -> BoxFuture<'c, Reply> {
        Box::pin(async move {
            let Op { f, tx } = *self;
            if let Err(e) = sqlx::query("SAVEPOINT op").execute(&mut ctx.conn).await {
                ctx.poisoned = true;
                let _ = tx.send(Err(db_error(e)));
                return Box::new(|_| {}) as Reply;
            }
            let outcome = f(ctx).await;
            let keep = matches!(outcome, Ok(Ok(_)));
            let undo = if keep { None } else { sqlx::query("ROLLBACK TO op").execute(&mut ctx.conn).await.err() };
            let release = sqlx::query("RELEASE op").execute(&mut ctx.conn).await.err();
            let failure = undo.or(release);
            if failure.is_some() {
                ctx.poisoned = true;
            }
            Box::new(move |commit: Result<(), StoreError>| {
                let result = match (outcome, commit, failure) {
                    (_, _, Some(e)) => Err(db_error(e)),
                    (Err(e), _, None) => Err(db_error(e)),
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

pub fn db_error(e: sqlx::Error) -> StoreError {
    StoreError::Database(e.to_string())
}

/// Counters of the writer since start: how well group commit is batching.
#[derive(Debug, Default)]
pub struct WriteStats {
    pub transactions: AtomicU64,
    pub requests: AtomicU64,
}

/// Handle to the writer task. Cloning shares the queue.
#[derive(Clone)]
pub struct Writer {
    queue: mpsc::Sender<Box<dyn Job>>,
    pub stats: Arc<WriteStats>,
}

impl Writer {
    pub fn start(conn: SqliteConnection) -> Writer {
        let (queue, rx) = mpsc::channel(QUEUE_DEPTH_MAX);
        let stats = Arc::new(WriteStats::default());
        tokio::spawn(run(WriteCtx { conn, last_now: Timestamp::UNIX_EPOCH, poisoned: false }, rx, stats.clone()));
        Writer { queue, stats }
    }

    /// Runs `f` in the next batch and returns once that batch is durably committed.
    pub async fn write<T, E, F>(&self, f: F) -> Result<Result<T, E>, StoreError>
    where
        F: for<'c> FnOnce(&'c mut WriteCtx) -> BoxFuture<'c, Outcome<T, E>> + Send + 'static,
        T: Send + 'static,
        E: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.queue.try_send(Box::new(Op { f, tx })).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => StoreError::Overloaded,
            mpsc::error::TrySendError::Closed(_) => StoreError::Closed,
        })?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Like [`Writer::write`] for requests that cannot be refused, only fail.
    pub async fn exec<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: for<'c> FnOnce(&'c mut WriteCtx) -> BoxFuture<'c, Outcome<T, StoreError>> + Send + 'static,
        T: Send + 'static,
    {
        self.write(f).await?
    }
}

async fn run(mut ctx: WriteCtx, mut rx: mpsc::Receiver<Box<dyn Job>>, stats: Arc<WriteStats>) {
    let mut batch: Vec<Box<dyn Job>> = Vec::with_capacity(BATCH_SIZE_MAX);
    while rx.recv_many(&mut batch, BATCH_SIZE_MAX).await > 0 {
        assert!(batch.len() <= BATCH_SIZE_MAX, "recv_many respects the batch limit");
        stats.transactions.fetch_add(1, Ordering::Relaxed);
        stats.requests.fetch_add(batch.len() as u64, Ordering::Relaxed);
        apply_batch(&mut ctx, &mut batch).await;
        batch.clear();
    }
}

async fn apply_batch(ctx: &mut WriteCtx, batch: &mut Vec<Box<dyn Job>>) {
    if let Err(e) = sqlx::query("BEGIN IMMEDIATE").execute(&mut ctx.conn).await {
        let error = db_error(e);
        tracing::error!(%error, "could not begin a write transaction");
        for job in batch.drain(..) {
            job.fail(StoreError::Database(error.to_string()));
        }
        return;
    }
    let mut replies: Vec<Reply> = Vec::with_capacity(batch.len());
    let mut jobs = batch.drain(..);
    let mut aborted = false;
    ctx.poisoned = false;
    for job in jobs.by_ref() {
        match AssertUnwindSafe(job.run(ctx)).catch_unwind().await {
            Ok(reply) => replies.push(reply),
            Err(_) => {
                tracing::error!("a write request panicked; rolling back its batch");
                aborted = true;
            }
        }
        if ctx.poisoned {
            tracing::error!("a savepoint failed; rolling back its batch");
            aborted = true;
        }
        if aborted {
            break;
        }
    }
    let commit = if aborted {
        let _ = sqlx::query("ROLLBACK").execute(&mut ctx.conn).await;
        Err(StoreError::Database("write aborted".into()))
    } else {
        match sqlx::query("COMMIT").execute(&mut ctx.conn).await {
            Ok(_) => Ok(()),
            Err(e) => {
                let _ = sqlx::query("ROLLBACK").execute(&mut ctx.conn).await;
                Err(db_error(e))
            }
        }
    };
    for job in jobs {
        job.fail(StoreError::Database("write aborted".into()));
    }
    for reply in replies {
        let commit = match &commit {
            Ok(()) => Ok(()),
            Err(e) => Err(StoreError::Database(e.to_string())),
        };
        reply(commit);
    }
}
