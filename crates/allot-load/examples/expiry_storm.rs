//! Expiry storm: N holds that all lapse in the same second, released while customers keep
//! holding. Runs the real HTTP app in-process over a fresh SQLite file with a manual clock, so
//! "the same second" is exact: the clock stands still while the holds are made, then jumps past
//! their expiry.
//!
//! ```sh
//! cargo run --release -p allot-load --example expiry_storm -- 100000
//! ```
//! Prints the time from the jump until no lapsed hold is left held, and the hold latency
//! percentiles of the same load before and during the storm.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use allot_app::App;
use allot_app::clock::{Clock, ManualClock};
use allot_app::payments::TestProvider;
use allot_app::store::Role;
use allot_load::{Config, Report, parse_mix};
use allot_store::SqliteStore;

/// The allocator the `allot` binary serves with (SQLite's allocations included): the storm
/// measures the server as it runs, and glibc's malloc was ~11% of the writer's CPU here.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ADMIN_EMAIL: &str = "admin@storm.test";
const ADMIN_PASSWORD: &str = "password-123";
/// Holds of the load runs last this long (the load generator's venues use it).
const HOLD_TTL_SECONDS: i64 = 24 * 3600;

fn config(url: &str, mix: &str, requests: Option<u64>, seconds: u64) -> Config {
    Config {
        url: url.into(),
        clients: 64,
        duration: Duration::from_secs(seconds),
        requests,
        rate: None,
        mix: parse_mix(mix).unwrap(),
        flash_sale: false,
        connect_first: false,
        seats: 300,
        shows: 200,
        hot_seats: 1,
        rooms: 1,
        doctors: 1,
        chargers: 1,
        customers: 4,
        admin_email: ADMIN_EMAIL.into(),
        admin_password: ADMIN_PASSWORD.into(),
        idempotency_keys: false,
        database_url: None,
        seed: 3,
    }
}

fn p99(r: &Report) -> f64 {
    r.holds.latency_ms.p99
}

#[tokio::main]
async fn main() {
    let n: u64 = std::env::args().nth(1).map_or(100_000, |a| a.parse().expect("N holds"));
    let dir = std::env::temp_dir().join(format!("allot-storm-{}", uuid::Uuid::now_v7().as_simple()));
    let db = format!("sqlite://{}/allot.db", dir.display());
    let store = Arc::new(SqliteStore::open(&db).await.unwrap());
    let clock = Arc::new(ManualClock::new(jiff::Timestamp::now()));
    let app = App::start(store.clone(), clock.clone(), Arc::new(TestProvider)).await.unwrap();
    app.create_user(ADMIN_EMAIL, ADMIN_PASSWORD, "Admin", vec![Role::Admin]).await.unwrap();
    let listener = allot_http::listen("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let options = allot_http::HttpOptions::default().with_rate_limits(allot_http::ratelimit::RateLimits::off());
    let served = app.clone();
    tokio::spawn(async move { allot_http::serve(listener, served, &options, std::future::pending()).await });

    let started = Instant::now();
    let made = allot_load::run(config(&url, "hold-ga", Some(n), 600)).await.unwrap();
    println!(
        "made {} holds in {:.1} s, all expiring at the same second",
        made.holds.ok,
        started.elapsed().as_secs_f64()
    );
    let lapse_at = clock.now().as_second() + HOLD_TTL_SECONDS;
    // The holds made from here on lapse a second later: the storm is exactly the N above.
    clock.advance(jiff::SignedDuration::from_secs(1));
    let before = allot_load::run(config(&url, "hold-seat", None, 5)).await.unwrap();
    // Built before the jump: the load during the storm is holds, not its own set-up (a venue,
    // 200 shows and four customers' password hashes). Only its sessions are renewed after.
    let mut during = allot_load::prepare(config(&url, "hold-seat", None, 5)).await.unwrap();

    clock.advance(jiff::SignedDuration::from_secs(HOLD_TTL_SECONDS));
    let jumped = Instant::now();
    eprintln!("clock moved past their expiry");
    during.refresh_sessions().await.unwrap();
    let during = tokio::spawn(during.run());
    // `status IN (…)` is the predicate of the expiry index (`bookings_expiry`): with
    // `status = 'held'` alone SQLite cannot use it and scans the table, and those scans (every
    // 20 ms, while the released rows pile up in front of the held ones) took more than a core
    // of this two-core machine from the storm they were timing.
    let held = format!("status IN ('held', 'pending_payment') AND status = 'held' AND expires_at <= {lapse_at}");
    // Polled for one row every 20 ms (counting them all would itself load the machine), and
    // counted once a second for the progress line.
    let any_held = format!("rowid IN (SELECT rowid FROM bookings WHERE {held} LIMIT 1)");
    let mut reported = 0;
    let released_after = loop {
        if store.count("bookings", &any_held).await.unwrap() == 0 {
            break jumped.elapsed();
        }
        if jumped.elapsed().as_secs() > reported {
            reported = jumped.elapsed().as_secs();
            let left = store.count("bookings", &held).await.unwrap();
            eprintln!("{reported} s: {left} lapsed holds still held");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let during = during.await.unwrap().unwrap();
    println!("{} lapsed holds released {:.2} s after their expiry", made.holds.ok, released_after.as_secs_f64());
    println!(
        "hold p99 before {:.2} ms ({:.0} holds/s), during the storm {:.2} ms ({:.0} holds/s): {:.2}x",
        p99(&before),
        before.holds_per_second,
        p99(&during),
        during.holds_per_second,
        p99(&during) / p99(&before)
    );
    let json = serde_json::json!({
        "holds_expiring": made.holds.ok,
        "released_seconds": released_after.as_secs_f64(),
        "hold_p99_ms_before": p99(&before),
        "hold_p99_ms_during": p99(&during),
        "holds_per_second_before": before.holds_per_second,
        "holds_per_second_during": during.holds_per_second,
    });
    if let Some(path) = std::env::args().nth(2) {
        std::fs::write(path, json.to_string()).unwrap();
    }
    let _ = std::fs::remove_dir_all(dir);
}
