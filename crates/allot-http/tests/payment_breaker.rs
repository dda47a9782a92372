//! The circuit breaker around the payment provider (`allot_app::breaker`), over real HTTP: a
//! provider failing again and again is left alone for a while (confirms answer 503 at once,
//! without asking it), then tried once; declined cards never open the circuit.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use allot_app::breaker::{BREAKER_FAILURES_MAX, BREAKER_OPEN_SECONDS};
use allot_app::payments::{ChargeOutcome, ChargeRequest, PaymentProvider, ProviderError, RefundRequest, TestProvider};
use allot_app::refunds::RefundSweep;
use allot_app::store::{REFUND_GRACE_SECONDS, Role};
use common::TestApp;
use jiff::SignedDuration;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// The test provider, counting the charges and refunds it is asked for.
#[derive(Default)]
struct Counting {
    charges: AtomicU32,
    refunds: AtomicU32,
}

#[async_trait::async_trait]
impl PaymentProvider for Counting {
    fn name(&self) -> &'static str {
        "test"
    }

    async fn charge(&self, request: &ChargeRequest) -> Result<ChargeOutcome, ProviderError> {
        self.charges.fetch_add(1, Ordering::SeqCst);
        TestProvider.charge(request).await
    }

    async fn refund(&self, request: &RefundRequest) -> Result<String, ProviderError> {
        self.refunds.fetch_add(1, Ordering::SeqCst);
        TestProvider.refund(request).await
    }
}

struct World {
    t: TestApp,
    provider: Arc<Counting>,
    customer: String,
    seats: Vec<String>,
    event: String,
}

async fn world() -> World {
    let provider = Arc::new(Counting::default());
    let options = allot_http::HttpOptions::default().with_rate_limits(allot_http::ratelimit::RateLimits::off());
    let t = TestApp::spawn_paying(options, |store| store, provider.clone()).await;
    let manager = t.user_with_role("manager@test.allot", Role::Manager).await;
    let venue = t.venue(&manager, "cinema").await;
    let (seats, event) = t.seats_and_event(&manager, &venue, 8, 48).await;
    let customer = t.customer("breaker@test.allot").await;
    World { t, provider, customer, seats, event }
}

impl World {
    async fn hold(&self, seat: usize) -> String {
        let body = json!({"items": [{"resource_id": self.seats[seat], "event_id": self.event}]});
        let (status, held) = self.t.post(Some(&self.customer), "/bookings", body).await;
        assert_eq!(status, StatusCode::CREATED, "{held}");
        held["id"].as_str().unwrap().to_owned()
    }

    async fn confirm(&self, booking: &str, token: &str) -> (StatusCode, Value) {
        let body = json!({"payment": {"method": "card", "token": token}});
        self.t.post(Some(&self.customer), &format!("/bookings/{booking}/confirm"), body).await
    }

    fn charges(&self) -> u32 {
        self.provider.charges.load(Ordering::SeqCst)
    }

    /// Opens the circuit: charges of `BREAKER_FAILURES_MAX` bookings (of seats from `first`)
    /// failing at the provider.
    async fn fail_charges(&self, first: usize, bookings: u32) {
        for seat in first..first + bookings as usize {
            let booking = self.hold(seat).await;
            let (status, failed) = self.confirm(&booking, "tok_processing_error").await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{failed}");
        }
    }
}

#[tokio::test]
async fn a_provider_that_keeps_failing_is_left_alone_then_tried_again() {
    let w = world().await;
    w.fail_charges(0, BREAKER_FAILURES_MAX).await;
    let asked = w.charges();
    assert_eq!(asked, 3 * (BREAKER_FAILURES_MAX - 1) + 1, "each charge tried 3 times, the last cut short");

    let victim = w.hold(5).await;
    let (status, refused) = w.confirm(&victim, "tok_visa").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{refused}");
    assert_eq!(refused["error"]["code"], "payment_provider_unavailable");
    assert_eq!(w.charges(), asked, "the provider is not asked while the circuit is open");
    let metrics = w.t.client.get(format!("http://{}/metrics", w.t.addr)).send().await.unwrap().text().await.unwrap();
    let opened = metrics.lines().find_map(|l| l.strip_prefix("allot_payment_circuit_opened_total "));
    assert!(opened.and_then(|n| n.parse::<f64>().ok()) >= Some(1.0), "counted for an alert: {metrics}");

    w.t.clock.advance(SignedDuration::from_secs(BREAKER_OPEN_SECONDS));
    let (status, confirmed) = w.confirm(&victim, "tok_visa").await;
    assert_eq!((status, confirmed["status"].as_str()), (StatusCode::OK, Some("confirmed")), "the trial: {confirmed}");
    let other = w.hold(6).await;
    let (status, confirmed) = w.confirm(&other, "tok_visa").await;
    assert_eq!(status, StatusCode::OK, "closed again: {confirmed}");
    assert_eq!(w.charges(), asked + 2);
}

/// One customer retrying one card that fails at the provider is one failing charge (its
/// retries share its idempotency key): it does not open the circuit for everyone.
#[tokio::test]
async fn retries_of_one_failing_charge_do_not_open_the_circuit() {
    let w = world().await;
    let booking = w.hold(0).await;
    for _ in 0..2 * BREAKER_FAILURES_MAX {
        let (status, failed) = w.confirm(&booking, "tok_processing_error").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{failed}");
    }
    assert_eq!(w.charges(), 3 * 2 * BREAKER_FAILURES_MAX, "every try reached the provider");
    let other = w.hold(1).await;
    let (status, confirmed) = w.confirm(&other, "tok_visa").await;
    assert_eq!(status, StatusCode::OK, "another customer's card: {confirmed}");
}

#[tokio::test]
async fn declined_cards_are_the_provider_answering_and_never_open_the_circuit() {
    let w = world().await;
    for seat in 0..3 {
        let booking = w.hold(seat).await;
        for _ in 0..2 {
            let (status, declined) = w.confirm(&booking, "tok_chargeDeclined").await;
            assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{declined}");
        }
    }
    assert!(w.charges() > BREAKER_FAILURES_MAX);
    let booking = w.hold(3).await;
    let (status, confirmed) = w.confirm(&booking, "tok_visa").await;
    assert_eq!(status, StatusCode::OK, "{confirmed}");
}

/// A refund owed while the circuit is open is not attempted and costs no attempt: it waits for
/// the circuit, and is made by the first sweep after it.
#[tokio::test]
async fn a_refund_owed_while_the_circuit_is_open_waits_for_it_without_losing_an_attempt() {
    let w = world().await;
    let paid = w.hold(7).await;
    assert_eq!(w.confirm(&paid, "tok_visa").await.0, StatusCode::OK);
    w.fail_charges(0, BREAKER_FAILURES_MAX).await;
    let (status, cancelled) = w.t.post(Some(&w.customer), &format!("/bookings/{paid}/cancel"), json!({})).await;
    assert_eq!((status, cancelled["refund"]["reference"].clone()), (StatusCode::OK, Value::Null), "{cancelled}");
    assert_eq!(w.provider.refunds.load(Ordering::SeqCst), 0, "not asked: the circuit is open");

    // Due after the grace; by then the circuit let a trial through, which failed: open again.
    w.t.clock.advance(SignedDuration::from_secs(REFUND_GRACE_SECONDS));
    w.fail_charges(5, 1).await;
    let sweep = w.t.app.settle_refunds().await.unwrap();
    assert_eq!(sweep, RefundSweep { waiting: 1, ..RefundSweep::default() }, "left for the circuit");
    let queued = w.t.app.store.refunds_due(jiff::Timestamp::MAX, u32::MAX, 10).await.unwrap();
    assert_eq!(queued.iter().map(|r| r.attempts).collect::<Vec<_>>(), [0], "no attempt counted");
    assert_eq!(w.provider.refunds.load(Ordering::SeqCst), 0);
    let admin = w.t.admin().await;
    let (_, audit) = w.t.get(Some(&admin), "/audit?action=booking.refund").await;
    assert_eq!(audit["data"].as_array().unwrap().len(), 0, "no attempt audited: {audit}");

    w.t.clock.advance(SignedDuration::from_secs(BREAKER_OPEN_SECONDS));
    let sweep = w.t.app.settle_refunds().await.unwrap();
    assert_eq!(sweep, RefundSweep { refunded: 1, ..RefundSweep::default() }, "the trial, made");
    assert_eq!(w.provider.refunds.load(Ordering::SeqCst), 1);
}
