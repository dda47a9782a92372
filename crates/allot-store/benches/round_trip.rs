//! What one statement costs the SQLite writer: through sqlx, a round trip to its worker thread
//! for each call, against the same statements sent 100 to a call (where SQLite's own work
//! dominates); and on a synchronous rusqlite connection in the calling thread, with the
//! statement prepared once — what the writer does now (docs/benchmarks.md).
#![allow(clippy::unwrap_used)]

use criterion::{Criterion, criterion_group, criterion_main};
use sqlx::{Connection, SqliteConnection};

fn round_trip(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = std::env::temp_dir().join(format!("allot-round-trip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}/bench.db?mode=rwc", dir.display());
    let mut conn = runtime.block_on(SqliteConnection::connect(&url)).unwrap();
    // Inside one open transaction, as in the writer's batch: no commit (no fsync) is measured.
    let setup =
        "CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v INTEGER); INSERT OR IGNORE INTO t VALUES (1, 0); BEGIN";
    runtime.block_on(sqlx::raw_sql(setup).execute(&mut conn)).unwrap();
    let one = "UPDATE t SET v = v + 1 WHERE k = 1";
    let hundred = vec![one; 100].join("; ");
    let mut group = c.benchmark_group("sqlite_statement");
    group.bench_function("one_per_call", |b| {
        b.iter(|| runtime.block_on(sqlx::raw_sql(one).execute(&mut conn)).unwrap());
    });
    group.bench_function("hundred_per_call_per_statement", |b| {
        b.iter_custom(|iters| {
            let started = std::time::Instant::now();
            for _ in 0..iters {
                runtime.block_on(sqlx::raw_sql(sqlx::AssertSqlSafe(hundred.clone())).execute(&mut conn)).unwrap();
            }
            started.elapsed() / 100
        });
    });
    // The sqlx transaction holds the write lock: end it (one commit, not measured) first.
    runtime.block_on(sqlx::raw_sql("COMMIT").execute(&mut conn)).unwrap();
    let sync = rusqlite::Connection::open(dir.join("bench.db")).unwrap();
    sync.execute_batch("BEGIN").unwrap();
    group.bench_function("rusqlite_prepared_in_thread", |b| {
        b.iter(|| sync.prepare_cached(one).unwrap().execute([]).unwrap());
    });
    group.finish();
    drop(sync);
    let _ = std::fs::remove_dir_all(dir);
}

criterion_group!(benches, round_trip);
criterion_main!(benches);
