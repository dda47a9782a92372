//! Operations and hardening over real HTTP: request ids (echoed, generated, on error answers
//! and on log lines), `/metrics`, `/readyz`, security headers, CORS, the request timeout and
//! graceful shutdown with a request in flight.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use allot_app::App;
use allot_app::audit::{AuditFilter, AuditPage, Outcome};
use allot_app::clock::ManualClock;
use allot_app::payments::{ChargeOutcome, ChargeRequest, PaymentProvider, ProviderError, RefundRequest, TestProvider};
use allot_app::store::Role;
use allot_core::booking::BookingStatus;
use allot_http::{HttpOptions, OpsOptions};
use common::{TestApp, TestStore};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore, oneshot};

/// A payment provider whose charges wait at a gate the test opens: a real slow request.
struct GatedProvider {
    entered: Notify,
    gate: Semaphore,
}

impl GatedProvider {
    fn new() -> Arc<Self> {
        Arc::new(Self { entered: Notify::new(), gate: Semaphore::new(0) })
    }

    fn open(&self) {
        self.gate.add_permits(1);
    }
}

#[async_trait::async_trait]
impl PaymentProvider for GatedProvider {
    fn name(&self) -> &'static str {
        "test"
    }

    async fn charge(&self, request: &ChargeRequest) -> Result<ChargeOutcome, ProviderError> {
        self.entered.notify_one();
        self.gate.acquire().await.unwrap().forget();
        TestProvider.charge(request).await
    }

    async fn refund(&self, request: &RefundRequest) -> Result<String, ProviderError> {
        TestProvider.refund(request).await
    }
}

/// A payment provider with a bug: every charge panics.
struct PanickingProvider;

#[async_trait::async_trait]
impl PaymentProvider for PanickingProvider {
    fn name(&self) -> &'static str {
        "test"
    }

    async fn charge(&self, _: &ChargeRequest) -> Result<ChargeOutcome, ProviderError> {
        panic!("a bug in the payment provider")
    }

    async fn refund(&self, request: &RefundRequest) -> Result<String, ProviderError> {
        TestProvider.refund(request).await
    }
}

/// (outcome, reason) of each audit event of `action`, waiting up to 5 s for one to appear
/// (events of requests that did not finish are appended by a task of their own).
async fn audit_outcomes_of(t: &TestApp, action: &str) -> Vec<(Outcome, Option<String>)> {
    let filter = AuditFilter { action: Some(action.into()), ..AuditFilter::default() };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let events = t.store.audit_events(&filter, AuditPage { before: None, limit: 10 }).await.unwrap();
        if !events.is_empty() || std::time::Instant::now() > deadline {
            return events.iter().map(|e| (e.outcome, e.reason.clone())).collect();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Like `TestApp::spawn`, with options, a payment provider and a shutdown trigger.
async fn spawn_with(
    options: HttpOptions,
    payments: Arc<dyn PaymentProvider>,
) -> (TestApp, oneshot::Sender<()>, tokio::task::JoinHandle<std::io::Result<()>>) {
    let dir = std::env::temp_dir().join(format!("allot-test-{}", uuid::Uuid::now_v7().as_simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let db_url = common::fresh_database_url(&dir).await;
    let store = TestStore::open(&db_url).await;
    let clock = Arc::new(ManualClock::new(common::test_now()));
    let app = App::start(store.port(), clock.clone(), payments).await.unwrap();
    let listener = allot_http::listen("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let served = app.clone();
    let server = tokio::spawn(async move {
        allot_http::serve(listener, served, &options, async {
            let _ = stopped.await;
        })
        .await
    });
    let client = reqwest::Client::new();
    (TestApp { addr, app, clock, store, client, dir, db_url }, stop, server)
}

// `..default()` keeps this right when `HttpOptions` gains fields (rate limits, …).
#[allow(clippy::needless_update)]
fn with_ops(ops: OpsOptions) -> HttpOptions {
    HttpOptions { ops, ..HttpOptions::default() }
}

impl TestApp {
    fn root(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A held seat: (customer token, booking id).
    async fn held_seat(&self) -> (String, String) {
        let manager = self.user_with_role("manager@test.allot", Role::Manager).await;
        let venue = self.venue(&manager, "cinema").await;
        let (seats, event) = self.seats_and_event(&manager, &venue, 1, 48).await;
        let customer = self.customer("ops@test.allot").await;
        let (status, booking) = self
            .post(Some(&customer), "/bookings", json!({"items": [{"resource_id": seats[0], "event_id": event}]}))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{booking}");
        (customer, booking["id"].as_str().unwrap().to_owned())
    }

    fn confirm(&self, customer: &str, booking: &str, token: &str) -> reqwest::RequestBuilder {
        self.client
            .post(self.url(&format!("/bookings/{booking}/confirm")))
            .bearer_auth(customer)
            .json(&json!({"payment": {"method": "card", "token": token}}))
    }
}

fn request_id(response: &reqwest::Response) -> String {
    response.headers().get("x-request-id").expect("x-request-id on every response").to_str().unwrap().to_owned()
}

fn is_uuid_v7(id: &str) -> bool {
    uuid::Uuid::parse_str(id).is_ok_and(|u| u.get_version_num() == 7)
}

#[tokio::test]
async fn request_id_is_echoed_or_generated_on_every_answer() {
    let t = TestApp::spawn().await;
    let echoed = t.client.get(t.root("/healthz")).header("x-request-id", "client-id_42").send().await.unwrap();
    assert_eq!(request_id(&echoed), "client-id_42");

    let generated = t.client.get(t.root("/healthz")).send().await.unwrap();
    assert!(is_uuid_v7(&request_id(&generated)), "{}", request_id(&generated));

    for bad in ["x".repeat(129), "with space".to_owned(), String::new()] {
        let replaced = t.client.get(t.root("/healthz")).header("x-request-id", &bad).send().await.unwrap();
        assert!(is_uuid_v7(&request_id(&replaced)), "{bad:?} must be replaced by a fresh id");
    }
    let longest = "y".repeat(128);
    let kept = t.client.get(t.root("/healthz")).header("x-request-id", &longest).send().await.unwrap();
    assert_eq!(request_id(&kept), longest);

    let missing = t.client.get(t.root("/no/such/route")).header("x-request-id", "r-404").send().await.unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(request_id(&missing), "r-404");
    let refused = t.client.get(t.url("/me")).send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    assert!(is_uuid_v7(&request_id(&refused)));
    let (status, body) = common::read(refused).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("unauthenticated")));
}

/// Collects what the JSON log formatter writes.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuffer {
    fn lines(&self) -> Vec<Value> {
        let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }
}

/// The binary's JSON log format, captured for the whole test process. Global, not a
/// thread-local default: spans' callsites are shared with the tests running beside this one.
fn captured_logs() -> &'static LogBuffer {
    static LOGS: OnceLock<LogBuffer> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = LogBuffer::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt().json().with_writer(move || writer.clone()).finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
        logs
    })
}

/// A log line written deep inside a handler (the confirm use case, when the payment provider
/// fails) carries the request's id.
#[tokio::test]
async fn log_lines_of_a_request_carry_its_request_id() {
    let logs = captured_logs();
    let t = TestApp::spawn().await;
    let (customer, booking) = t.held_seat().await;
    let response =
        t.confirm(&customer, &booking, "tok_processing_error").header("x-request-id", "trace-me-1").send().await;
    let response = response.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(request_id(&response), "trace-me-1");

    let lines = logs.lines();
    let failure = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "payment provider unavailable")
        .find(|l| l["fields"]["booking_id"] == booking.as_str())
        .unwrap_or_else(|| panic!("the use case logs the failure: {lines:?}"));
    let spans = failure["spans"].as_array().unwrap_or_else(|| panic!("logged inside the request span: {failure}"));
    assert!(spans.iter().any(|s| s["request_id"] == "trace-me-1"), "{failure}");
}

/// The value of the one sample line with this name whose labels include every `labels` pair.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| labels.iter().all(|label| l.contains(label)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn metrics_count_requests_by_route_template_holds_and_store_batches() {
    let t = TestApp::spawn().await;
    let (customer, booking) = t.held_seat().await;
    let (status, _) = t.get(Some(&customer), &format!("/bookings/{booking}")).await;
    assert_eq!(status, StatusCode::OK);

    let response = t.client.get(t.root("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = response.text().await.unwrap();
    let route = r#"route="/api/v1/bookings/{id}""#;
    let requests = sample(&text, "allot_http_requests_total", &[route, r#"method="GET""#, r#"status="200""#]);
    assert!(requests >= Some(1.0), "{text}");
    assert!(!text.contains(&booking), "series are labelled by route template, never by raw path");
    let latency = sample(&text, "allot_http_request_duration_seconds_count", &[route]);
    assert!(latency >= Some(1.0), "latency histogram: {text}");
    assert!(text.contains("allot_http_request_duration_seconds_bucket{"), "histogram buckets, not a summary");
    assert!(sample(&text, "allot_holds_total", &[r#"outcome="ok""#]) >= Some(1.0), "{text}");
    assert!(sample(&text, "allot_store_batch_size_count", &[]) >= Some(1.0), "{text}");
    assert!(sample(&text, "allot_store_commit_duration_seconds_count", &[]) >= Some(1.0), "{text}");
    assert!(text.contains("# HELP allot_rate_limited_requests_total"), "described for the rate limiter: {text}");
    assert!(text.contains("# TYPE allot_holds_total counter"));
}

/// Each (route, method, status) series is registered once and its handle kept: every later
/// request must still count on it.
#[tokio::test]
async fn every_request_of_a_route_counts_not_only_the_first() {
    let t = TestApp::spawn().await;
    let (customer, booking) = t.held_seat().await;
    let labels = [r#"route="/api/v1/bookings/{id}""#, r#"method="GET""#, r#"status="200""#];
    let count = || async {
        let text = t.client.get(t.root("/metrics")).send().await.unwrap().text().await.unwrap();
        sample(&text, "allot_http_requests_total", &labels).unwrap_or(0.0)
    };
    let before = count().await;
    for _ in 0..3 {
        let (status, _) = t.get(Some(&customer), &format!("/bookings/{booking}")).await;
        assert_eq!(status, StatusCode::OK);
    }
    // Other tests of this process may count on the same series too, never fewer.
    assert!(count().await >= before + 3.0);
}

#[tokio::test]
async fn metrics_count_payments_and_unmatched_routes() {
    let t = TestApp::spawn().await;
    let (customer, booking) = t.held_seat().await;
    let declined = t.confirm(&customer, &booking, "tok_chargeDeclined").send().await.unwrap();
    assert_eq!(declined.status(), StatusCode::PAYMENT_REQUIRED);
    t.client.get(t.root("/no/such/route/123")).send().await.unwrap();
    let text = t.client.get(t.root("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(sample(&text, "allot_payments_total", &[r#"outcome="declined""#]) >= Some(1.0), "{text}");
    assert!(sample(&text, "allot_confirms_total", &[r#"outcome="payment_declined""#]) >= Some(1.0), "{text}");
    assert!(sample(&text, "allot_http_requests_total", &[r#"route="unmatched""#, r#"status="404""#]) >= Some(1.0));
    assert!(!text.contains("/no/such/route"), "raw paths never become labels");
}

#[tokio::test]
async fn readyz_needs_every_migration_applied() {
    let t = TestApp::spawn().await;
    let (status, body) = common::read(t.client.get(t.root("/readyz")).send().await.unwrap()).await;
    assert_eq!((status, &body), (StatusCode::OK, &json!({"status": "ready"})));

    // A database one migration behind this build (as when a node runs newer code than the
    // database it was pointed at) is not ready, though it answers queries.
    t.raw_sql("DELETE FROM _sqlx_migrations WHERE version = (SELECT MAX(version) FROM _sqlx_migrations)").await;
    let (status, body) = common::read(t.client.get(t.root("/readyz")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "not_ready");
    let live = t.client.get(t.root("/healthz")).send().await.unwrap();
    assert_eq!(live.status(), StatusCode::OK, "liveness does not depend on the database");
}

#[tokio::test]
async fn security_headers_on_every_response() {
    let t = TestApp::spawn().await;
    for path in ["/healthz", "/api/v1/me", "/nope", "/metrics"] {
        let response = t.client.get(t.root(path)).send().await.unwrap();
        let h = response.headers();
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(h["x-frame-options"], "DENY", "{path}");
        assert_eq!(h["referrer-policy"], "no-referrer", "{path}");
        assert_eq!(h["content-security-policy"], "default-src 'none'; frame-ancestors 'none'", "{path}");
        assert!(h.get("strict-transport-security").is_none(), "HSTS only when configured");
    }
    // Swagger UI must be able to load its own scripts and styles.
    let docs = t.client.get(t.root("/api-docs/")).send().await.unwrap();
    let csp = docs.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'") && csp.contains("style-src 'self'"), "{csp}");

    let ops = OpsOptions { hsts_max_age_seconds: Some(31_536_000), ..OpsOptions::default() };
    let (t, _stop, _server) = spawn_with(with_ops(ops), Arc::new(TestProvider)).await;
    let response = t.client.get(t.root("/healthz")).send().await.unwrap();
    assert_eq!(response.headers()["strict-transport-security"], "max-age=31536000");
}

fn preflight(t: &TestApp, origin: &str) -> reqwest::RequestBuilder {
    t.client
        .request(reqwest::Method::OPTIONS, t.url("/bookings"))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "authorization, content-type, idempotency-key")
}

#[tokio::test]
async fn cors_is_off_by_default_and_on_for_configured_origins() {
    let t = TestApp::spawn().await;
    let response = preflight(&t, "https://app.example").send().await.unwrap();
    assert!(response.headers().get("access-control-allow-origin").is_none(), "no CORS unless configured");
    let response = t.client.get(t.url("/venues")).header("origin", "https://app.example").send().await.unwrap();
    assert!(response.headers().get("access-control-allow-origin").is_none());

    let ops = OpsOptions { cors_origins: vec!["https://app.example".into()], ..OpsOptions::default() };
    let (t, _stop, _server) = spawn_with(with_ops(ops), Arc::new(TestProvider)).await;
    let response = preflight(&t, "https://app.example").send().await.unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    let h = response.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example");
    assert!(h["access-control-allow-methods"].to_str().unwrap().contains("POST"));
    assert!(h["access-control-allow-headers"].to_str().unwrap().contains("idempotency-key"));
    assert!(h.get("x-request-id").is_some(), "preflights get a request id too");
    let simple = t.client.get(t.url("/venues")).header("origin", "https://app.example").send().await.unwrap();
    assert_eq!(simple.headers()["access-control-allow-origin"], "https://app.example");
    assert!(simple.headers()["access-control-expose-headers"].to_str().unwrap().contains("x-request-id"));
    let other = preflight(&t, "https://evil.example").send().await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none(), "unlisted origin");

    let ops = OpsOptions { cors_origins: vec!["*".into()], ..OpsOptions::default() };
    let (t, _stop, _server) = spawn_with(with_ops(ops), Arc::new(TestProvider)).await;
    let response = preflight(&t, "https://anyone.example").send().await.unwrap();
    assert_eq!(response.headers()["access-control-allow-origin"], "*");
}

#[tokio::test]
async fn a_request_over_the_timeout_answers_503_in_the_error_format() {
    let payments = GatedProvider::new();
    let ops = OpsOptions { request_timeout_seconds: 1, ..OpsOptions::default() };
    let (t, _stop, _server) = spawn_with(with_ops(ops), payments.clone()).await;
    let (customer, booking) = t.held_seat().await;
    let started = std::time::Instant::now();
    let response = t.confirm(&customer, &booking, "tok_visa").send().await.unwrap();
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(response.headers().get("x-request-id").is_some());
    assert_eq!(response.headers()["x-content-type-options"], "nosniff");
    let (status, body) = common::read(response).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "timeout");
    assert!(body["error"]["message"].is_string() && body["error"]["details"].is_object(), "{body}");
    // The confirm was not cut off: once the provider answers, the charge is recorded and the
    // booking confirmed, and the audit trail has its real outcome (not a "timeout" failure).
    payments.open();
    let confirmed = wait_for_status(&t, &booking, BookingStatus::Confirmed).await;
    assert!(confirmed.payment.is_some());
    let outcomes = audit_outcomes_of(&t, "booking.confirm").await;
    assert_eq!(outcomes, vec![(Outcome::Success, None)]);
}

/// The stored booking `id` once it has `status`, waiting up to 5 s (a request that runs on
/// after its answer).
async fn wait_for_status(t: &TestApp, id: &str, status: BookingStatus) -> allot_core::booking::Booking {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let stored = t.store.booking(id.parse().unwrap()).await.unwrap().unwrap();
        if stored.status == status || std::time::Instant::now() > deadline {
            assert_eq!(stored.status, status, "{stored:?}");
            return stored;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A customer closes the tab while the card is being charged (a confirm without an
/// `Idempotency-Key`): the request is not cut off with the connection, so the charge is
/// recorded and the booking confirmed, not left held to lapse with the money taken.
#[tokio::test]
async fn a_confirm_whose_client_hangs_up_during_the_charge_still_confirms() {
    let payments = GatedProvider::new();
    let (t, _stop, _server) = spawn_with(HttpOptions::default(), payments.clone()).await;
    let (customer, booking) = t.held_seat().await;
    let client = tokio::spawn(t.confirm(&customer, &booking, "tok_visa").send());
    payments.entered.notified().await;
    client.abort(); // its connection closes with it
    assert!(client.await.unwrap_err().is_cancelled(), "the client gave up before any answer");
    tokio::time::sleep(Duration::from_millis(100)).await;
    payments.open();
    let confirmed = wait_for_status(&t, &booking, BookingStatus::Confirmed).await;
    assert!(confirmed.payment.is_some(), "the charge is recorded");
    let outcomes = audit_outcomes_of(&t, "booking.confirm").await;
    assert_eq!(outcomes, vec![(Outcome::Success, None)]);
}

/// A bug that panics inside a handler: 500 `internal` in the error format, with the request id
/// and security headers, the server keeps serving, and the attempt is one audit event.
#[tokio::test]
async fn a_panicking_handler_answers_500_and_is_audited() {
    let (t, _stop, _server) = spawn_with(HttpOptions::default(), Arc::new(PanickingProvider)).await;
    let (customer, booking) = t.held_seat().await;
    let response = t.confirm(&customer, &booking, "tok_visa").send().await.unwrap();
    assert!(response.headers().get("x-request-id").is_some());
    assert_eq!(response.headers()["x-content-type-options"], "nosniff");
    let (status, body) = common::read(response).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(body["error"]["code"], "internal");
    assert!(!body.to_string().contains("payment provider"), "nothing about the bug leaks: {body}");
    let reasons = audit_outcomes_of(&t, "booking.confirm").await;
    assert_eq!(reasons, vec![(Outcome::Failure, Some("internal".to_owned()))]);
    let (status, _) = t.get(None, "/venues").await;
    assert_eq!(status, StatusCode::OK, "still serving");
}

/// Shutdown while a confirm waits on the payment provider: no new connections are accepted,
/// and the confirm still completes with its normal answer before the server stops.
#[tokio::test]
async fn graceful_shutdown_finishes_the_request_in_flight() {
    let payments = GatedProvider::new();
    let (t, stop, server) = spawn_with(HttpOptions::default(), payments.clone()).await;
    let (customer, booking) = t.held_seat().await;
    let in_flight = tokio::spawn(t.confirm(&customer, &booking, "tok_visa").send());
    payments.entered.notified().await;

    stop.send(()).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(t.addr).await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "still accepting connections after shutdown began");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!server.is_finished(), "the server waits for the request in flight");

    payments.open();
    let (status, body) = common::read(in_flight.await.unwrap().unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "confirmed");
    tokio::time::timeout(Duration::from_secs(5), server).await.expect("server stops").unwrap().unwrap();
    assert!(tokio::net::TcpStream::connect(t.addr).await.is_err());
    let stored = t.store.booking(booking.parse().unwrap()).await.unwrap().unwrap();
    assert_eq!(stored.status, allot_core::booking::BookingStatus::Confirmed);
}

/// Shutdown while a confirm whose client has hung up waits on the payment provider: no
/// connection is left, but the server still waits for the confirm, which records its charge.
#[tokio::test]
async fn graceful_shutdown_waits_for_a_write_whose_client_is_gone() {
    let payments = GatedProvider::new();
    let (t, stop, server) = spawn_with(HttpOptions::default(), payments.clone()).await;
    let (customer, booking) = t.held_seat().await;
    let client = tokio::spawn(t.confirm(&customer, &booking, "tok_visa").send());
    payments.entered.notified().await;
    client.abort();
    stop.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!server.is_finished(), "the server waits for the confirm still running");
    payments.open();
    tokio::time::timeout(Duration::from_secs(5), server).await.expect("server stops").unwrap().unwrap();
    let stored = t.store.booking(booking.parse().unwrap()).await.unwrap().unwrap();
    assert_eq!(stored.status, BookingStatus::Confirmed);
}

/// A flash sale's customers connect at once: the kernel must complete every handshake while
/// the server is still accepting, or a dropped SYN waits a second to be retried.
#[tokio::test]
async fn a_burst_of_connections_beyond_the_default_backlog_completes_at_once() {
    let somaxconn: usize =
        std::fs::read_to_string("/proc/sys/net/core/somaxconn").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(128);
    // Well above std's 128, within what the kernel allows.
    let connections = somaxconn.min(1000) - 1;
    if connections <= 128 {
        eprintln!("skipped: net.core.somaxconn is {somaxconn}, too small to tell the backlog from std's");
        return;
    }
    let listener = allot_http::listen("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Nothing accepts: every connection waits in the backlog.
    let connects = (0..connections)
        .map(|_| tokio::time::timeout(Duration::from_millis(500), tokio::net::TcpStream::connect(addr)));
    let results = futures::future::join_all(connects).await;
    let completed = results.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
    assert_eq!(completed, connections, "handshakes completed within 500 ms without an accept");
    drop(listener);
}

/// Charges as the test provider does (a charge is replayed by its idempotency key, as Stripe
/// does) and keeps every payment reference it is asked to refund.
#[derive(Default)]
struct RefundLog {
    refunded: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl PaymentProvider for RefundLog {
    fn name(&self) -> &'static str {
        "test"
    }

    async fn charge(&self, request: &ChargeRequest) -> Result<ChargeOutcome, ProviderError> {
        TestProvider.charge(request).await
    }

    async fn refund(&self, request: &RefundRequest) -> Result<String, ProviderError> {
        self.refunded.lock().unwrap().push(request.payment_reference.clone());
        TestProvider.refund(request).await
    }
}

/// Another PostgreSQL session holding `booking`'s row: the writer's update of it gives up
/// after its lock timeout (3 s) and the request fails as busy.
struct RowLock(sqlx::PgConnection);

impl RowLock {
    async fn take(db_url: &str, booking: &str) -> RowLock {
        RowLock::of(db_url, "SELECT 1 FROM bookings WHERE id = $1 FOR UPDATE", booking).await
    }

    /// Another session holding the rows `select` (`… FOR UPDATE`, one parameter) locks.
    async fn of(db_url: &str, select: &'static str, param: &str) -> RowLock {
        use sqlx::Connection;
        let mut c = sqlx::PgConnection::connect(db_url).await.unwrap();
        sqlx::query("BEGIN").execute(&mut c).await.unwrap();
        sqlx::query(select).bind(param).execute(&mut c).await.unwrap();
        RowLock(c)
    }

    async fn release(mut self) {
        use sqlx::Connection;
        sqlx::query("ROLLBACK").execute(&mut self.0).await.unwrap();
        self.0.close().await.unwrap();
    }
}

/// A charge that succeeded but could not be recorded (the store busy) is not refunded: the
/// client's retry sends the same idempotency key, the provider replays that very charge, and
/// the retry records it. (Refunding it, as before, let the retry confirm the booking with its
/// money given back.) PostgreSQL only: there another session can make the write fail within a
/// request's time; SQLite's writer waits out a locked file for 10 s per batch, past the
/// request timeout. CI runs this suite over PostgreSQL too.
#[tokio::test]
async fn a_charge_the_store_could_not_record_is_kept_for_the_retry_not_refunded() {
    if std::env::var("ALLOT_TEST_BACKEND").as_deref() != Ok("postgres") {
        eprintln!("PostgreSQL only (ALLOT_TEST_BACKEND=postgres); see the test's comment");
        return;
    }
    let payments = Arc::new(RefundLog::default());
    let (t, _stop, _server) = spawn_with(HttpOptions::default(), payments.clone()).await;
    let (customer, booking) = t.held_seat().await;
    let block = RowLock::take(&t.db_url, &booking).await;
    let (status, body) = common::read(t.confirm(&customer, &booking, "tok_visa").send().await.unwrap()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "the store was busy: {body}");
    assert_eq!(body["error"]["code"], "overloaded", "{body}");
    block.release().await;
    assert_eq!(*payments.refunded.lock().unwrap(), Vec::<String>::new(), "nothing refunded");

    let (status, confirmed) = common::read(t.confirm(&customer, &booking, "tok_visa").send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{confirmed}");
    assert_eq!(confirmed["status"], "confirmed");
    let reference = confirmed["payment"]["reference"].as_str().unwrap().to_owned();
    assert_eq!(reference, format!("pi_test_{booking}_0"), "the first attempt's charge, replayed");
    assert!(!payments.refunded.lock().unwrap().contains(&reference), "the recorded payment was never refunded");
}

/// A keyed confirm whose write finds the store busy (another session holds the key's row,
/// which the write marks in its transaction, past the write's lock timeout) answers 503 having
/// recorded nothing, and releases its key: the retry with the same key runs, is charged the
/// same attempt again (the provider replays it), and confirms. PostgreSQL only, as the test
/// above.
#[tokio::test]
async fn a_keyed_confirm_the_store_was_too_busy_to_record_confirms_on_retry_with_its_one_charge() {
    if std::env::var("ALLOT_TEST_BACKEND").as_deref() != Ok("postgres") {
        eprintln!("PostgreSQL only (ALLOT_TEST_BACKEND=postgres); see the test's comment");
        return;
    }
    let payments = GatedProvider::new();
    let (t, _stop, _server) = spawn_with(HttpOptions::default(), payments.clone()).await;
    let (customer, booking) = t.held_seat().await;
    let keyed = || t.confirm(&customer, &booking, "tok_visa").header("Idempotency-Key", "pay-1");
    let first = tokio::spawn(keyed().send());
    payments.entered.notified().await;
    let lock = RowLock::of(&t.db_url, "SELECT 1 FROM idempotency_keys WHERE key = $1 FOR UPDATE", "pay-1").await;
    payments.open();
    let lock_wait = Duration::from_millis(allot_store::postgres::WRITE_LOCK_WAIT_MILLISECONDS_MAX);
    tokio::time::sleep(lock_wait + Duration::from_millis(300)).await;
    lock.release().await;
    let (status, busy) = common::read(first.await.unwrap().unwrap()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{busy}");
    assert_eq!(wait_for_status(&t, &booking, BookingStatus::Held).await.payment, None, "nothing recorded");

    payments.open();
    let again = keyed().send().await.unwrap();
    let (status, confirmed) = common::read(again).await;
    assert_eq!(status, StatusCode::OK, "{confirmed}");
    assert_eq!(confirmed["payment"]["reference"], format!("pi_test_{booking}_0"), "the first attempt's charge");
    let replay = keyed().send().await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(common::read(replay).await, (StatusCode::OK, confirmed));
}

/// A keyed confirm still running past its key's first lease (a slow payment provider) renews
/// the lease while it runs: a retry meanwhile is told the key is in use, never run a second
/// time alongside it.
#[tokio::test]
async fn a_keyed_request_still_running_keeps_its_key_past_its_first_lease() {
    let payments = GatedProvider::new();
    let (t, _stop, _server) = spawn_with(HttpOptions::default(), payments.clone()).await;
    let (customer, booking) = t.held_seat().await;
    let keyed = || t.confirm(&customer, &booking, "tok_visa").header("Idempotency-Key", "slow-1");
    let first = tokio::spawn(keyed().send());
    payments.entered.notified().await;
    // A third of the lease passes while the charge waits; the request checks its lease every
    // second and renews it. Then the first lease (from its start) runs out.
    t.clock.advance(jiff::SignedDuration::from_secs(30));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    t.clock.advance(jiff::SignedDuration::from_secs(31));
    // Run a second time, the retry would wait at the provider's closed gate too.
    let retry = tokio::time::timeout(Duration::from_secs(5), keyed().send()).await;
    let (status, body) = common::read(retry.expect("the retry is answered, not run").unwrap()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "idempotency_key_in_use");

    payments.open();
    let (status, confirmed) = common::read(first.await.unwrap().unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{confirmed}");
    let replay = keyed().send().await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(common::read(replay).await, (StatusCode::OK, confirmed));
}
