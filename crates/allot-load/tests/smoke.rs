//! A short run of the load generator against the real HTTP app over loopback, with its
//! database check: the same code path the benchmarks use, small enough for the test command.
//! (The benchmarks themselves are `bench/run.sh`; nothing here is timed.)
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use allot_app::App;
use allot_app::clock::SystemClock;
use allot_app::payments::TestProvider;
use allot_app::store::{Role, Store};
use allot_load::{Config, Op, Report, parse_mix, scenario};
use allot_store::{PgStore, SqliteStore};

const ADMIN_EMAIL: &str = "admin@load.test";
const ADMIN_PASSWORD: &str = "password-123";

/// Serves the app over `store` on a loopback port; returns its URL.
async fn serve(store: Arc<dyn Store>) -> String {
    let app = App::start(store, Arc::new(SystemClock), Arc::new(TestProvider)).await.unwrap();
    app.create_user(ADMIN_EMAIL, ADMIN_PASSWORD, "Admin", vec![Role::Admin]).await.unwrap();
    let listener = allot_http::listen("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let options = allot_http::HttpOptions::default().with_rate_limits(allot_http::ratelimit::RateLimits::off());
    tokio::spawn(async move { allot_http::serve(listener, app, &options, std::future::pending()).await });
    url
}

async fn sqlite() -> (Arc<dyn Store>, String) {
    let dir = std::env::temp_dir().join(format!("allot-load-{}", uuid::Uuid::now_v7().as_simple()));
    let db = format!("sqlite://{}/allot.db", dir.display());
    (Arc::new(SqliteStore::open(&db).await.unwrap()), db)
}

fn config(url: String, db: String, scenario_name: &str, clients: usize) -> Config {
    let (mix, flash_sale) = scenario(scenario_name).unwrap();
    Config {
        url,
        clients,
        duration: Duration::from_secs(3),
        requests: None,
        rate: None,
        mix: parse_mix(mix).unwrap(),
        flash_sale,
        connect_first: flash_sale,
        seats: 40,
        shows: 10,
        hot_seats: 20,
        rooms: 4,
        doctors: 4,
        chargers: 4,
        customers: 2,
        admin_email: ADMIN_EMAIL.into(),
        admin_password: ADMIN_PASSWORD.into(),
        idempotency_keys: true,
        database_url: Some(db),
        seed: 7,
    }
}

/// Every operation of the mix ran, nothing failed on the server's side, and the database
/// holds exactly what was acknowledged with nothing oversold.
fn assert_clean(report: &Report) {
    let v = report.verification.as_ref().unwrap();
    assert!(v.ok, "database check failed: {v:?}");
    assert!(v.acknowledged_bookings > 0 && v.live_claims > 0, "{v:?}");
    assert_eq!(v.stored_unacknowledged, 0, "{v:?}");
    for (name, op) in &report.ops {
        let bad: u64 = op.statuses.iter().filter(|(s, _)| *s == "0" || s.starts_with('5')).map(|(_, n)| n).sum();
        assert_eq!(bad, 0, "{name}: {:?}", op.statuses);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_run_on_sqlite_stores_exactly_what_it_acknowledged() {
    let (store, db) = sqlite().await;
    let url = serve(store).await;
    let report = allot_load::run(config(url, db, "mixed", 16)).await.unwrap();
    assert_clean(&report);
    for op in [Op::HoldSeat, Op::HoldNight, Op::HoldSlot, Op::HoldCharger, Op::Confirm, Op::SeatMap, Op::Availability] {
        assert!(report.ops.get(op.name()).is_some_and(|o| o.ok > 0), "no {} succeeded: {:?}", op.name(), report.ops);
    }
    assert!(report.holds_per_second > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flash_sale_sells_every_seat_once_and_stops_when_sold_out() {
    let (store, db) = sqlite().await;
    let url = serve(store).await;
    let mut config = config(url, db, "flash-sale", 60);
    config.duration = Duration::from_secs(60);
    let report = allot_load::run(config).await.unwrap();
    assert_clean(&report);
    let hot = &report.ops[Op::HoldHot.name()];
    assert_eq!(hot.ok, 20, "{:?}", hot.statuses);
    assert_eq!(report.verification.as_ref().unwrap().hot_seats_taken, Some(20));
    assert!(report.seconds < 60.0, "the run ends when the show is sold out, not at the deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_run_on_postgres_stores_exactly_what_it_acknowledged() {
    let Some(db) = allot_store::testing::fresh_postgres_database().await else { return };
    let store: Arc<dyn Store> = Arc::new(PgStore::open(&db).await.unwrap());
    let url = serve(store).await;
    let report = allot_load::run(config(url, db, "mixed", 16)).await.unwrap();
    assert_clean(&report);
}

/// The check itself can fail: an acknowledgement the database does not hold is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_check_reports_a_lost_acknowledgement() {
    let (_store, db) = sqlite().await;
    let world = allot_load::setup::World { venue_id: uuid::Uuid::now_v7().to_string(), ..Default::default() };
    let mut acks = std::collections::HashMap::new();
    acks.insert(uuid::Uuid::now_v7().as_simple().to_string(), allot_load::verify::Ack::Held);
    let v = allot_load::verify::verify(&db, &world, &acks).await.unwrap();
    assert!(!v.ok);
    assert_eq!((v.lost_or_wrong, v.stored_bookings, v.failures.len()), (1, 0, 1), "{v:?}");
}
