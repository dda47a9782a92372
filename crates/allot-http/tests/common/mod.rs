//! Test helper: spawns the real HTTP app on a loopback port over a fresh database, with a
//! manual clock, and offers small fixtures (users, venues, seats, rooms) through the API.
//!
//! The database is a fresh SQLite file, or a fresh PostgreSQL database when
//! `ALLOT_TEST_BACKEND=postgres` (CI runs every suite both ways).
#![allow(dead_code, clippy::unwrap_used)]

pub mod fake_stripe;
pub mod faulty;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use allot_app::App;
use allot_app::clock::ManualClock;
use allot_app::payments::{PaymentProvider, TestProvider};
use allot_app::store::Role;
use allot_app::store::Store;
use allot_store::{PgStore, SqliteStore};
use jiff::Timestamp;
use reqwest::StatusCode;
use serde_json::{Value, json};

pub struct TestApp {
    pub addr: SocketAddr,
    pub app: Arc<App>,
    pub clock: Arc<ManualClock>,
    pub store: TestStore,
    pub client: reqwest::Client,
    pub dir: PathBuf,
    pub db_url: String,
}

/// The store under test, whichever backend it is.
#[derive(Clone)]
pub enum TestStore {
    Sqlite(Arc<SqliteStore>),
    Postgres(Arc<PgStore>),
}

impl TestStore {
    /// Opens `url` with the backend it names.
    pub async fn open(url: &str) -> TestStore {
        if url.starts_with("postgres") {
            TestStore::Postgres(Arc::new(PgStore::open(url).await.expect("open PostgreSQL store")))
        } else {
            TestStore::Sqlite(Arc::new(SqliteStore::open(url).await.expect("open SQLite store")))
        }
    }

    pub fn port(&self) -> Arc<dyn Store> {
        match self {
            TestStore::Sqlite(s) => s.clone(),
            TestStore::Postgres(s) => s.clone(),
        }
    }

    pub async fn count(&self, table: &str, where_clause: &str) -> Result<i64, allot_app::StoreError> {
        match self {
            TestStore::Sqlite(s) => s.count(table, where_clause).await,
            TestStore::Postgres(s) => s.count(table, where_clause).await,
        }
    }
}

impl TestStore {
    /// The writer's (transactions, requests) since the store opened.
    pub fn write_stats(&self) -> (u64, u64) {
        match self {
            TestStore::Sqlite(s) => s.write_stats(),
            TestStore::Postgres(s) => s.write_stats(),
        }
    }
}

impl std::ops::Deref for TestStore {
    type Target = dyn Store;
    fn deref(&self) -> &Self::Target {
        match self {
            TestStore::Sqlite(s) => s.as_ref(),
            TestStore::Postgres(s) => s.as_ref(),
        }
    }
}

/// A fresh database URL for the backend `ALLOT_TEST_BACKEND` names (SQLite by default).
pub async fn fresh_database_url(dir: &std::path::Path) -> String {
    match std::env::var("ALLOT_TEST_BACKEND").as_deref() {
        Ok("postgres") => allot_store::testing::fresh_postgres_database()
            .await
            .expect("ALLOT_TEST_BACKEND=postgres but PostgreSQL is not reachable"),
        _ => format!("sqlite://{}/allot.db", dir.display()),
    }
}

/// A fixed "now" for tests: Monday 2026-11-23 08:00 UTC (09:00 in Berlin).
pub fn test_now() -> Timestamp {
    "2026-11-23T08:00:00Z".parse().unwrap()
}

impl TestApp {
    /// The app with rate limits off: suites send thousands of requests from one address.
    pub async fn spawn() -> TestApp {
        let off = allot_http::ratelimit::RateLimits::off();
        TestApp::spawn_with(allot_http::HttpOptions::default().with_rate_limits(off)).await
    }

    pub async fn spawn_with(options: allot_http::HttpOptions) -> TestApp {
        TestApp::spawn_wrapped(options, |store| store).await
    }

    /// [`TestApp::spawn_with`], the app's store wrapped by `wrap` (to fail on demand:
    /// [`faulty::FaultyStore`]); `store` stays the unwrapped one, for the test's checks.
    pub async fn spawn_wrapped(
        options: allot_http::HttpOptions,
        wrap: impl FnOnce(Arc<dyn Store>) -> Arc<dyn Store>,
    ) -> TestApp {
        TestApp::spawn_paying(options, wrap, Arc::new(TestProvider)).await
    }

    /// [`TestApp::spawn_wrapped`] with `payments` as the payment provider.
    pub async fn spawn_paying(
        options: allot_http::HttpOptions,
        wrap: impl FnOnce(Arc<dyn Store>) -> Arc<dyn Store>,
        payments: Arc<dyn PaymentProvider>,
    ) -> TestApp {
        let dir = std::env::temp_dir().join(format!("allot-test-{}", uuid::Uuid::now_v7().as_simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let db_url = fresh_database_url(&dir).await;
        let store = TestStore::open(&db_url).await;
        let clock = Arc::new(ManualClock::new(test_now()));
        let app = App::start(wrap(store.port()), clock.clone(), payments).await.expect("start app");
        let listener = allot_http::listen("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = app.clone();
        tokio::spawn(async move { allot_http::serve(listener, served, &options, std::future::pending()).await });
        let client = reqwest::Client::builder().pool_max_idle_per_host(256).build().unwrap();
        TestApp { addr, app, clock, store, client, dir, db_url }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}/api/v1{path}", self.addr)
    }

    pub async fn get(&self, token: Option<&str>, path: &str) -> (StatusCode, Value) {
        let mut req = self.client.get(self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        read(req.send().await.unwrap()).await
    }

    pub async fn post(&self, token: Option<&str>, path: &str, body: Value) -> (StatusCode, Value) {
        let mut req = self.client.post(self.url(path)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        read(req.send().await.unwrap()).await
    }

    pub async fn patch(&self, token: Option<&str>, path: &str, body: Value) -> (StatusCode, Value) {
        let mut req = self.client.patch(self.url(path)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        read(req.send().await.unwrap()).await
    }

    pub async fn delete(&self, token: Option<&str>, path: &str) -> (StatusCode, Value) {
        let mut req = self.client.delete(self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        read(req.send().await.unwrap()).await
    }

    /// Registers a customer through the API and returns its access token.
    pub async fn customer(&self, email: &str) -> String {
        let (status, body) = self
            .post(None, "/auth/register", json!({"email": email, "password": "password-123", "name": "Test"}))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        self.login(email).await
    }

    pub async fn login(&self, email: &str) -> String {
        let (status, body) = self.post(None, "/auth/login", json!({"email": email, "password": "password-123"})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["access_token"].as_str().unwrap().to_owned()
    }

    /// Creates a user with the given role directly through the use case and logs in.
    pub async fn user_with_role(&self, email: &str, role: Role) -> String {
        self.app.create_user(email, "password-123", "Staff", vec![role]).await.unwrap();
        self.login(email).await
    }

    pub async fn admin(&self) -> String {
        self.user_with_role("admin@test.allot", Role::Admin).await
    }

    /// A venue created by `token` (a manager becomes its manager).
    pub async fn venue(&self, token: &str, category: &str) -> String {
        let (status, body) = self
            .post(
                Some(token),
                "/venues",
                json!({"name": format!("Test {category}"), "category": category, "location": {"lat": 52.52, "lon": 13.40},
                       "timezone": "Europe/Berlin", "currency": "EUR", "policies": {"hold_ttl_seconds": 600}}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["id"].as_str().unwrap().to_owned()
    }

    pub async fn resource(&self, token: &str, venue: &str, body: Value) -> String {
        let (status, created) = self.post(Some(token), &format!("/venues/{venue}/resources"), body).await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        created["id"].as_str().unwrap().to_owned()
    }

    /// `n` seats and one event over them starting `hours_ahead` hours after the test clock.
    pub async fn seats_and_event(&self, token: &str, venue: &str, n: usize, hours_ahead: i64) -> (Vec<String>, String) {
        let mut seats = Vec::new();
        for i in 0..n {
            let category = if i % 2 == 0 { "standard" } else { "premium" };
            seats.push(
                self.resource(
                    token,
                    venue,
                    json!({"name": format!("A{}", i + 1), "capacity": 1, "unit_price": 1000,
                           "attributes": {"row": "A", "number": i + 1, "category": category},
                           "time_model": {"kind": "events"}}),
                )
                .await,
            );
        }
        let start = self.clock_now().checked_add(jiff::SignedDuration::from_hours(hours_ahead)).unwrap();
        let end = start.checked_add(jiff::SignedDuration::from_hours(2)).unwrap();
        let (status, event) = self
            .post(
                Some(token),
                &format!("/venues/{venue}/events"),
                json!({"name": "Show", "start": start.to_string(), "end": end.to_string(), "seat_ids": seats,
                       "price_categories": {"standard": 1200, "premium": 1800}}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{event}");
        (seats, event["id"].as_str().unwrap().to_owned())
    }

    /// A room type (nights) with `capacity` rooms and `overbooking_percent`.
    pub async fn room_type(&self, token: &str, venue: &str, capacity: u32, overbooking_percent: u32) -> String {
        self.resource(
            token,
            venue,
            json!({"name": "Double", "capacity": capacity, "unit_price": 10000,
                   "time_model": {"kind": "nights"}, "rules": {"overbooking_percent": overbooking_percent}}),
        )
        .await
    }

    /// Sends `POST /api/v1{path}` with `body` and `headers` over a connection of its own, then
    /// hangs up after `after` without reading the answer.
    pub async fn post_and_hang_up(
        &self,
        token: &str,
        path: &str,
        body: &Value,
        headers: &[(&str, &str)],
        after: std::time::Duration,
    ) {
        use tokio::io::AsyncWriteExt;
        let body = body.to_string();
        let extra: String = headers.iter().map(|(name, value)| format!("{name}: {value}\r\n")).collect();
        let request = format!(
            "POST /api/v1{path} HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {token}\r\n\
             content-type: application/json\r\n{extra}content-length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        let mut stream = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        tokio::time::sleep(after).await;
        drop(stream);
    }

    /// Runs `sql` on the test's database behind the store's back, over a connection of its
    /// own, as someone with database access (or a node that died mid-way) could leave it.
    pub async fn raw_sql(&self, sql: &str) {
        use sqlx::Connection;
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        if self.db_url.starts_with("postgres") {
            let mut conn = sqlx::PgConnection::connect(&self.db_url).await.unwrap();
            sqlx::raw_sql(sql).execute(&mut conn).await.unwrap();
        } else {
            let mut conn = sqlx::SqliteConnection::connect(&self.db_url).await.unwrap();
            sqlx::raw_sql(sql).execute(&mut conn).await.unwrap();
        }
    }

    pub fn clock_now(&self) -> Timestamp {
        use allot_app::clock::Clock;
        self.clock.now()
    }
}

pub async fn read(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let bytes = response.bytes().await.unwrap();
    let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
    (status, body)
}
