//! WAL checkpoints on a thread of their own.
//!
//! SQLite checkpoints in the connection that commits once the WAL passes its threshold: the
//! writer thread would copy the WAL's pages into the database file and fsync it inside a
//! commit, and every hold queued behind that batch would wait for it (an expiry storm writes
//! the WAL fast enough to make this the largest stall). Here a second connection runs
//! `PRAGMA wal_checkpoint(PASSIVE)` every few milliseconds instead; a passive checkpoint
//! takes no lock the writer needs. The writer keeps a far higher threshold of its own as a
//! backstop, should this thread fall behind or fail.
//!
//! That threshold is also what keeps the WAL file bounded under sustained writes. SQLite
//! starts the WAL over from its beginning only when a write transaction begins with every
//! frame already copied; this thread copies up to the last commit it saw while the writer,
//! in a batch nearly all the time, has already appended more, so on its own the WAL never
//! starts over (4 GB after 25 s of set-up and holds, the hold p99 half as long again). Past
//! the threshold the writer checkpoints after its commit, copying what this thread has not,
//! and its next batch starts the WAL over: about once a second at 19 000 holds/s with the
//! threshold at 256 MiB (docs/benchmarks-history.md, sessions of 2026-12-06 and 2026-12-07; the test
//! below).
//!
//! Durability is unchanged: a commit is durable once its WAL frames are synced
//! (`synchronous=FULL`), whenever they are checkpointed.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;

/// Pause between checkpoints.
const CHECKPOINT_INTERVAL_MILLIS: u64 = 20;
/// The writer's own threshold (pages of WAL, 4 KiB each: 256 MiB; SQLite's default is 1 000),
/// and what starts the WAL over under sustained writes (see the module header). Each start
/// over is a checkpoint inside one of the writer's commits, a stall every batch queued behind
/// it waits for: at 16 384 pages, twice a second at 19 000 holds/s, it was what set the hold
/// p99 (37 ms; 30 ms at this size, 28 ms at four times it; docs/benchmarks-history.md, session of
/// 2026-12-07). The WAL file stays near twice this at most (262 MiB measured under load).
pub(crate) const WRITER_AUTOCHECKPOINT_PAGES: i64 = 65_536;

/// Stops and joins its thread when dropped.
pub(crate) struct Checkpointer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    pub(crate) fn start(path: &Path, busy_timeout: Duration) -> std::io::Result<Checkpointer> {
        let conn = Connection::open(path).map_err(std::io::Error::other)?;
        conn.busy_timeout(busy_timeout).map_err(std::io::Error::other)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread =
            std::thread::Builder::new().name("allot-sqlite-checkpoint".into()).spawn(move || run(&conn, &stopped))?;
        Ok(Checkpointer { stop, thread: Some(thread) })
    }
}

fn run(conn: &Connection, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        std::thread::park_timeout(Duration::from_millis(CHECKPOINT_INTERVAL_MILLIS));
        // (busy, frames in the WAL, frames checkpointed); busy only means try again later.
        let checkpointed = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(0));
        if let Err(e) = checkpointed {
            tracing::warn!(error = %e, "WAL checkpoint failed; the writer's own threshold still applies");
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::{Checkpointer, WRITER_AUTOCHECKPOINT_PAGES};

    /// Rows rewritten per commit, each filling a 4 KiB page: ~64 WAL frames per commit.
    const ROWS_PER_COMMIT: i64 = 64;
    /// Bytes of one WAL frame: a 4 KiB page and its 24-byte header.
    const FRAME_BYTES: u64 = 4_096 + 24;

    /// Commits back to back, as the writer's batches under load, with the checkpoint thread
    /// running: the WAL starts over once it reaches the writer's threshold, so its file stays
    /// near that size however much is written (the module header; without the threshold it
    /// grew to 4 GB in 25 s of a load run's set-up and holds). At a quarter of the threshold
    /// the writer sets, which it checks, so as to write a quarter of the bytes.
    #[test]
    fn the_wal_file_stays_near_the_writers_threshold_under_sustained_commits() {
        let dir = std::env::temp_dir().join(format!("allot-wal-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("wal.db");
        let conn = super::super::tx::open(&path, Duration::from_secs(5)).unwrap();
        let threshold: i64 = conn.pragma_query_value(None, "wal_autocheckpoint", |r| r.get(0)).unwrap();
        assert_eq!(threshold, WRITER_AUTOCHECKPOINT_PAGES, "the writer's connection sets its threshold");
        let threshold = WRITER_AUTOCHECKPOINT_PAGES / 4;
        conn.pragma_update(None, "wal_autocheckpoint", threshold).unwrap();
        conn.execute_batch("CREATE TABLE filler (n INTEGER PRIMARY KEY, body BLOB NOT NULL)").unwrap();
        let _checkpointer = Checkpointer::start(&path, Duration::from_secs(5)).unwrap();
        let wal = dir.join("wal.db-wal");
        let commits = 3 * threshold / ROWS_PER_COMMIT;
        let mut largest = 0;
        for _ in 0..commits {
            conn.execute(
                "WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < ?1)
                 INSERT OR REPLACE INTO filler (n, body) SELECT n, randomblob(4000) FROM s",
                [ROWS_PER_COMMIT],
            )
            .unwrap();
            largest = largest.max(std::fs::metadata(&wal).unwrap().len());
        }
        let written = u64::try_from(commits * ROWS_PER_COMMIT).unwrap() * FRAME_BYTES;
        let bound = 2 * u64::try_from(threshold).unwrap() * FRAME_BYTES;
        assert!(largest < bound, "the WAL reached {largest} bytes of {written} written (bound {bound})");
        drop(conn);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
