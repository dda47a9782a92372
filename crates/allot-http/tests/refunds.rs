//! Refunds owed and made later (`allot_app::refunds`), over real HTTP and the real store: a
//! cancellation's refund the provider failed to make, and a charge whose record failed and
//! that no retry recorded. The reconciler is run by hand (`App::settle_refunds`) with the
//! manual clock moved, so nothing here waits for its timer (the app's own sweep first runs 30 s
//! of real time after start, and would find only what is due at the manual clock's time).
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use allot_app::audit::Verdict;
use allot_app::breaker::PROVIDER_CALL_TIMEOUT_SECONDS;
use allot_app::payments::{
    ChargeOutcome, ChargeRequest, PaymentProvider, PaymentStatus, ProviderError, RefundRequest, TestProvider,
};
use allot_app::refunds::{PARKED_AT, REFUND_ATTEMPTS_MAX, REFUND_LEASE_SECONDS, RefundSweep};
use allot_app::store::{REFUND_GRACE_SECONDS, Role};
use allot_core::booking::BookingStatus;
use common::TestApp;
use common::faulty::{Faults, FaultyStore};
use jiff::SignedDuration;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore};

/// Charges as the test provider does, each waiting for `gate` while `charges_gated` is set;
/// refunds fail while `refunds_fail` is set, the next one waits for `gate` once
/// `next_refund_gated` is set, and every refund asked for is kept (made or not).
struct Provider {
    charges_gated: AtomicBool,
    charging: Notify,
    gate: Semaphore,
    next_refund_gated: AtomicBool,
    refunding: Notify,
    refunds_fail: AtomicBool,
    asked: Mutex<Vec<RefundRequest>>,
    /// What `payment_status` answers, by payment (pending when not set).
    statuses: Mutex<std::collections::HashMap<String, PaymentStatus>>,
    /// Payments `payment_status` cannot say anything of.
    unknown: Mutex<Vec<String>>,
    /// When set, each `payment_status` waits at it (two sweeps at once read before either
    /// writes).
    status_barrier: Mutex<Option<Arc<tokio::sync::Barrier>>>,
}

impl Default for Provider {
    fn default() -> Self {
        Provider {
            charges_gated: AtomicBool::new(false),
            charging: Notify::new(),
            gate: Semaphore::new(0),
            next_refund_gated: AtomicBool::new(false),
            refunding: Notify::new(),
            refunds_fail: AtomicBool::new(false),
            asked: Mutex::default(),
            statuses: Mutex::default(),
            unknown: Mutex::default(),
            status_barrier: Mutex::default(),
        }
    }
}

impl Provider {
    fn asked(&self) -> Vec<RefundRequest> {
        self.asked.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl PaymentProvider for Provider {
    fn name(&self) -> &'static str {
        "test"
    }

    async fn charge(&self, request: &ChargeRequest) -> Result<ChargeOutcome, ProviderError> {
        if self.charges_gated.load(Ordering::SeqCst) {
            self.charging.notify_one();
            self.gate.acquire().await.unwrap().forget();
        }
        TestProvider.charge(request).await
    }

    async fn refund(&self, request: &RefundRequest) -> Result<String, ProviderError> {
        self.asked.lock().unwrap().push(request.clone());
        if self.next_refund_gated.swap(false, Ordering::SeqCst) {
            self.refunding.notify_one();
            self.gate.acquire().await.unwrap().forget();
        }
        if self.refunds_fail.load(Ordering::SeqCst) {
            return Err(ProviderError::Unavailable("processing_error".into()));
        }
        TestProvider.refund(request).await
    }

    async fn payment_status(&self, reference: &str) -> Result<PaymentStatus, ProviderError> {
        let barrier = self.status_barrier.lock().unwrap().clone();
        if let Some(barrier) = barrier {
            barrier.wait().await;
        }
        if self.unknown.lock().unwrap().iter().any(|r| r == reference) {
            return Err(ProviderError::Rejected(format!("no such payment: {reference}")));
        }
        Ok(self.statuses.lock().unwrap().get(reference).copied().unwrap_or(PaymentStatus::Pending))
    }
}

/// The manager of the booking's venue.
const MANAGER: &str = "manager@test.allot";

struct Setup {
    t: TestApp,
    provider: Arc<Provider>,
    faults: Arc<Faults>,
    customer: String,
    booking: String,
}

/// The app over a store that fails on demand, and a customer's hold of one seat of a show two
/// days ahead (a cancellation then refunds all of it).
async fn setup() -> Setup {
    let provider = Arc::new(Provider::default());
    let faults = Arc::new(Faults::default());
    let wrap_faults = faults.clone();
    let t = TestApp::spawn_paying(
        allot_http::HttpOptions::default().with_rate_limits(allot_http::ratelimit::RateLimits::off()),
        move |inner| Arc::new(FaultyStore { inner, faults: wrap_faults }),
        provider.clone(),
    )
    .await;
    let manager = t.user_with_role(MANAGER, Role::Manager).await;
    let venue = t.venue(&manager, "cinema").await;
    let (seats, event) = t.seats_and_event(&manager, &venue, 1, 48).await;
    let customer = t.customer("refunds@test.allot").await;
    let (status, held) =
        t.post(Some(&customer), "/bookings", json!({"items": [{"resource_id": seats[0], "event_id": event}]})).await;
    assert_eq!(status, StatusCode::CREATED, "{held}");
    let booking = held["id"].as_str().unwrap().to_owned();
    Setup { t, provider, faults, customer, booking }
}

impl Setup {
    /// The customer's confirm of the booking with `tok_visa`, to send.
    fn confirm_request(&self) -> reqwest::RequestBuilder {
        let body = json!({"payment": {"method": "card", "token": "tok_visa"}});
        let url = self.t.url(&format!("/bookings/{}/confirm", self.booking));
        self.t.client.post(url).bearer_auth(&self.customer).json(&body)
    }

    async fn confirm(&self) -> (StatusCode, Value) {
        common::read(self.confirm_request().send().await.unwrap()).await
    }

    async fn cancel(&self) -> (StatusCode, Value) {
        self.t.post(Some(&self.customer), &format!("/bookings/{}/cancel", self.booking), json!({})).await
    }

    /// Confirms the booking, then cancels it while the provider fails every refund: the
    /// cancellation stands, owing its refund. Its answer.
    async fn cancel_confirmed_while_refunds_fail(&self) -> Value {
        let (status, confirmed) = self.confirm().await;
        assert_eq!(status, StatusCode::OK, "{confirmed}");
        self.provider.refunds_fail.store(true, Ordering::SeqCst);
        let (status, cancelled) = self.cancel().await;
        assert_eq!(status, StatusCode::OK, "the cancellation stands: {cancelled}");
        cancelled
    }

    /// A confirm whose card is being charged while the hold lapses (released by expiry): it
    /// goes on, with the charge made, once the provider's gate opens.
    async fn confirm_as_the_hold_lapses(&self) -> tokio::task::JoinHandle<reqwest::Result<reqwest::Response>> {
        self.provider.charges_gated.store(true, Ordering::SeqCst);
        let confirming = tokio::spawn(self.confirm_request().send());
        self.provider.charging.notified().await;
        self.t.clock.advance(SignedDuration::from_secs(600));
        self.t.app.expire_due().await.unwrap();
        confirming
    }

    async fn stored(&self) -> Value {
        let (status, body) = self.t.get(Some(&self.customer), &format!("/bookings/{}", self.booking)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// The reconciler's refund attempts in the audit trail as the venue's manager reads them,
    /// oldest first: `(outcome, reason, details)`, each checked to be the server's own attempt
    /// on the booking. The chain is checked intact too.
    async fn refund_attempts(&self) -> Vec<(String, Option<String>, Value)> {
        // Logged in afresh: the clock may have moved past any earlier token's life.
        let manager = self.t.login(MANAGER).await;
        let (status, page) = self.t.get(Some(&manager), "/audit?action=booking.refund&limit=100").await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let mut events = page["data"].as_array().unwrap().clone();
        events.reverse();
        let attempts = events.iter().map(|e| {
            assert_eq!((e["actor_role"].as_str(), e["actor_id"].as_str()), (Some("system"), None), "{e}");
            assert_eq!(e["target_id"].as_str(), Some(self.booking.as_str()), "{e}");
            let reason = e["reason"].as_str().map(str::to_owned);
            (e["outcome"].as_str().unwrap().to_owned(), reason, e["details"].clone())
        });
        let attempts = attempts.collect();
        assert!(matches!(self.t.app.audit_verify().await.unwrap(), Verdict::Intact { .. }));
        attempts
    }

    /// Sends the provider's signed event reporting `object` (a refund's) with type `kind`.
    async fn refund_event(&self, kind: &str, object: Value) -> (StatusCode, Value) {
        let body = json!({"id": "evt_refund", "type": kind, "data": {"object": object}}).to_string();
        let signature = allot_app::webhooks::sign(self.t.app.webhook_secret().as_bytes(), body.as_bytes(), {
            use allot_app::clock::Clock;
            self.t.clock.now()
        });
        let url = self.t.url("/payments/webhooks/test");
        let sent = self.t.client.post(url).header("Stripe-Signature", signature).body(body);
        common::read(sent.send().await.unwrap()).await
    }

    async fn settle_after(&self, seconds: i64) -> RefundSweep {
        self.t.clock.advance(SignedDuration::from_secs(seconds));
        self.t.app.settle_refunds().await.unwrap()
    }
}

#[tokio::test]
async fn a_cancellations_refund_the_provider_failed_to_make_is_made_later_once() {
    let s = setup().await;
    let cancelled = s.cancel_confirmed_while_refunds_fail().await;
    let payment = cancelled["payment"]["reference"].as_str().unwrap().to_owned();
    assert_eq!(cancelled["refund"], json!({"amount": 1200, "reference": null, "failure": null}), "owed, not made");
    assert_eq!(s.t.store.count("refunds_due", "kind = 'cancellation'").await.unwrap(), 1, "queued with the cancel");

    assert_eq!(s.settle_after(0).await, RefundSweep::default(), "the request's own attempt is given its time");
    assert_eq!(s.settle_after(REFUND_GRACE_SECONDS).await, RefundSweep { failed: 1, ..RefundSweep::default() });
    assert_eq!(s.settle_after(REFUND_GRACE_SECONDS).await, RefundSweep::default(), "backs off: twice the wait");

    s.provider.refunds_fail.store(false, Ordering::SeqCst);
    assert_eq!(s.settle_after(REFUND_GRACE_SECONDS).await, RefundSweep { refunded: 1, ..RefundSweep::default() });
    let refund = s.stored().await["refund"].clone();
    assert_eq!(refund, json!({"amount": 1200, "reference": format!("re_{payment}"), "failure": null}), "recorded made");
    assert_eq!(s.t.store.count("refunds_due", "1=1").await.unwrap(), 0, "dropped with the record");
    assert_eq!(s.settle_after(24 * 3600).await, RefundSweep::default(), "made once");

    let failed = json!({"kind": "cancellation", "payment": payment, "amount": "1200", "attempt": "1"});
    let made = json!({"kind": "cancellation", "payment": payment, "amount": "1200", "attempt": "2",
        "refund": format!("re_{payment}")});
    assert_eq!(
        s.refund_attempts().await,
        vec![
            ("failure".to_owned(), Some("payment_provider_unavailable".to_owned()), failed),
            ("success".to_owned(), None, made)
        ],
        "each attempt audited (I6), the money moved with the refund's reference"
    );
    let asked = s.provider.asked();
    assert_eq!(asked.len(), 3, "the cancel's, the failed retry, the one made: {asked:?}");
    for request in &asked {
        assert_eq!((request.amount, request.payment_reference.as_str()), (1200, payment.as_str()));
        assert_eq!(
            request.idempotency_key,
            format!("refund_{payment}"),
            "one refund at the provider, however often asked"
        );
    }
}

/// Two reconcilers (two nodes) sweep at once: the refund is leased to the first, and the
/// second finds nothing to do. If the lease runs out while the first is still waiting on the
/// provider, a later sweep takes the refund too: the provider is asked with one idempotency key
/// (one refund), the first to record it wins, and the other finds it recorded and neither fails
/// nor retries it.
#[tokio::test]
async fn reconcilers_sweeping_at_once_make_one_refund_and_neither_fails() {
    let s = setup().await;
    s.cancel_confirmed_while_refunds_fail().await;
    s.provider.refunds_fail.store(false, Ordering::SeqCst);
    s.t.clock.advance(SignedDuration::from_secs(REFUND_GRACE_SECONDS));

    s.provider.next_refund_gated.store(true, Ordering::SeqCst);
    let first = tokio::spawn({
        let app = s.t.app.clone();
        async move { app.settle_refunds().await.unwrap() }
    });
    s.provider.refunding.notified().await;
    // On PostgreSQL the other sweeps are another node's: an app of its own over the same
    // database (SQLite has one process, and its app's sweeps race each other).
    let other = other_node(&s).await;
    assert_eq!(other.settle_refunds().await.unwrap(), RefundSweep::default(), "leased to the first sweep");
    assert_eq!(s.provider.asked().len(), 2, "the cancel's and the first sweep's");

    s.t.clock.advance(SignedDuration::from_secs(REFUND_LEASE_SECONDS));
    let late = other.settle_refunds().await.unwrap();
    assert_eq!(late, RefundSweep { refunded: 1, ..RefundSweep::default() }, "taken once the lease ran out");
    s.provider.gate.add_permits(1);
    assert_eq!(first.await.unwrap(), RefundSweep { refunded: 1, ..RefundSweep::default() }, "found it recorded");

    let asked = s.provider.asked();
    assert_eq!(asked.len(), 3, "the cancel's, then one per sweep that held the lease: {asked:?}");
    assert!(asked.iter().all(|r| *r == asked[0]), "one idempotency key: one refund at the provider");
    assert!(s.stored().await["refund"]["reference"].is_string());
    assert_eq!(s.t.store.count("refunds_due", "1=1").await.unwrap(), 0);
    assert_eq!(s.settle_after(24 * 3600).await, RefundSweep::default());
}

/// Another node of `s`'s app: on PostgreSQL an app of its own over the same database, with the
/// same provider and clock; on SQLite (one process) the app itself.
async fn other_node(s: &Setup) -> Arc<allot_app::App> {
    if !s.t.db_url.starts_with("postgres") {
        return s.t.app.clone();
    }
    let store = common::TestStore::open(&s.t.db_url).await.port();
    allot_app::App::start(store, s.t.clock.clone(), s.provider.clone()).await.expect("another node")
}

#[tokio::test]
async fn a_charge_whose_record_failed_and_no_retry_recorded_is_refunded_once_its_hold_ends() {
    let s = setup().await;
    s.faults.fail_booking_updates(1);
    let (status, busy) = s.confirm().await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "the payment's record failed: {busy}");
    assert_eq!(s.stored().await["payment"], Value::Null);
    assert_eq!(s.t.store.count("refunds_due", "kind = 'unrecorded'").await.unwrap(), 1);

    let sweep = s.settle_after(REFUND_GRACE_SECONDS).await;
    assert_eq!(sweep, RefundSweep { waiting: 1, ..RefundSweep::default() }, "a retried confirm may still record it");
    assert!(s.provider.asked().is_empty());

    // The customer never retries: the hold (10 minutes) lapses.
    s.t.clock.advance(SignedDuration::from_secs(600));
    s.t.app.expire_due().await.unwrap();
    assert_eq!(s.stored().await["status"], "expired");
    assert_eq!(s.settle_after(REFUND_GRACE_SECONDS).await, RefundSweep { refunded: 1, ..RefundSweep::default() });
    let asked = s.provider.asked();
    let charge = format!("pi_test_{}_0", s.booking);
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!((asked[0].payment_reference.as_str(), asked[0].amount), (charge.as_str(), 1200), "the whole charge");
    assert_eq!(asked[0].idempotency_key, format!("refund_{charge}"));
    assert_eq!(s.t.store.count("refunds_due", "1=1").await.unwrap(), 0);
    assert_eq!(s.settle_after(24 * 3600).await, RefundSweep::default(), "refunded once");
    let made = json!({"kind": "unrecorded", "payment": charge, "amount": "1200", "attempt": "1",
        "refund": format!("re_{charge}")});
    assert_eq!(s.refund_attempts().await, vec![("success".to_owned(), None, made)], "audited, once");
}

/// The refund is made but the write recording it fails: the attempt is audited as failed (the
/// booking does not say it was made), and the next one, by the same idempotency key, records it.
#[tokio::test]
async fn a_refund_made_whose_record_failed_is_audited_as_failed_and_recorded_by_the_next_attempt() {
    let s = setup().await;
    s.cancel_confirmed_while_refunds_fail().await;
    s.provider.refunds_fail.store(false, Ordering::SeqCst);
    s.faults.fail_booking_updates(1);
    assert_eq!(s.settle_after(REFUND_GRACE_SECONDS).await, RefundSweep { failed: 1, ..RefundSweep::default() });
    assert_eq!(s.stored().await["refund"]["reference"], Value::Null);
    assert_eq!(s.settle_after(2 * REFUND_GRACE_SECONDS).await, RefundSweep { refunded: 1, ..RefundSweep::default() });
    assert!(s.stored().await["refund"]["reference"].is_string());
    let outcomes: Vec<_> =
        s.refund_attempts().await.into_iter().map(|(outcome, reason, _)| (outcome, reason)).collect();
    assert_eq!(outcomes, vec![("failure".into(), Some("internal".into())), ("success".into(), None)]);
    let asked = s.provider.asked();
    assert!(asked.iter().all(|r| r.idempotency_key == asked[0].idempotency_key), "one refund: {asked:?}");
}

#[tokio::test]
async fn a_charge_made_as_its_hold_ended_is_refunded_later_when_the_provider_failed_to_then() {
    let s = setup().await;
    let confirming = s.confirm_as_the_hold_lapses().await;
    s.provider.refunds_fail.store(true, Ordering::SeqCst);
    s.provider.gate.add_permits(1);
    let (status, body) = common::read(confirming.await.unwrap().unwrap()).await;
    assert_eq!(status, StatusCode::GONE, "{body}");
    let charge = format!("pi_test_{}_0", s.booking);
    assert_eq!(s.provider.asked().len(), 1, "refunded at once, and that failed");
    assert_eq!(s.t.store.count("refunds_due", &format!("payment_reference = '{charge}'")).await.unwrap(), 1);

    s.provider.refunds_fail.store(false, Ordering::SeqCst);
    assert_eq!(s.settle_after(REFUND_GRACE_SECONDS).await, RefundSweep { refunded: 1, ..RefundSweep::default() });
    let asked = s.provider.asked();
    assert_eq!(asked.len(), 2, "{asked:?}");
    assert_eq!(asked[0], asked[1], "the same refund, by the same idempotency key");
    assert_eq!((asked[1].payment_reference.as_str(), asked[1].amount), (charge.as_str(), 1200));
    assert_eq!(s.t.store.count("refunds_due", "1=1").await.unwrap(), 0);
}

/// The same, but the booking cannot be read when the confirm finds its hold ended: the charge
/// is not refunded blind (a concurrent confirm may have recorded it), it is queued, and the
/// reconciler refunds it on the booking as stored.
#[tokio::test]
async fn a_charge_made_as_its_hold_ended_whose_booking_cannot_be_read_then_is_left_to_the_reconciler() {
    let s = setup().await;
    let confirming = s.confirm_as_the_hold_lapses().await;
    s.faults.fail_booking_reads(1);
    s.provider.gate.add_permits(1);
    let (status, body) = common::read(confirming.await.unwrap().unwrap()).await;
    assert_eq!(status, StatusCode::GONE, "{body}");
    assert!(s.provider.asked().is_empty(), "not refunded without reading the booking");
    assert_eq!(s.t.store.count("refunds_due", "kind = 'unrecorded'").await.unwrap(), 1);

    assert_eq!(s.settle_after(REFUND_GRACE_SECONDS).await, RefundSweep { refunded: 1, ..RefundSweep::default() });
    let charge = format!("pi_test_{}_0", s.booking);
    assert_eq!(s.provider.asked().iter().map(|r| r.payment_reference.clone()).collect::<Vec<_>>(), vec![charge]);
}

#[tokio::test]
async fn a_charge_whose_record_failed_and_a_retry_recorded_is_kept() {
    let s = setup().await;
    s.faults.fail_booking_updates(1);
    assert_eq!(s.confirm().await.0, StatusCode::SERVICE_UNAVAILABLE);
    let (status, confirmed) = s.confirm().await;
    assert_eq!(status, StatusCode::OK, "the retry records the same charge: {confirmed}");
    assert_eq!(confirmed["payment"]["reference"], format!("pi_test_{}_0", s.booking));

    let sweep = s.settle_after(REFUND_GRACE_SECONDS).await;
    assert_eq!(sweep, RefundSweep { not_owed: 1, ..RefundSweep::default() });
    assert!(s.provider.asked().is_empty(), "the recorded payment is never refunded");
    assert_eq!(s.t.store.count("refunds_due", "1=1").await.unwrap(), 0);
    assert_eq!(s.stored().await["status"], "confirmed");
}

/// The queued refund is not the keyed request's change: a retry with the same key runs the
/// confirm again (and records the same charge), instead of answering from the queue's write.
#[tokio::test]
async fn a_keyed_confirm_whose_record_failed_runs_again_on_retry_and_keeps_its_charge() {
    let s = setup().await;
    let keyed = || s.confirm_request().header("Idempotency-Key", "pay-1");
    s.faults.fail_booking_updates(1);
    let (status, busy) = common::read(keyed().send().await.unwrap()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{busy}");
    assert_eq!(s.t.store.count("refunds_due", "kind = 'unrecorded'").await.unwrap(), 1);

    let (status, confirmed) = common::read(keyed().send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{confirmed}");
    assert_eq!(confirmed["status"], "confirmed");
    assert_eq!(confirmed["payment"]["reference"], format!("pi_test_{}_0", s.booking), "the same charge, recorded");
    assert_eq!(s.settle_after(REFUND_GRACE_SECONDS).await, RefundSweep { not_owed: 1, ..RefundSweep::default() });
    assert!(s.provider.asked().is_empty(), "the recorded charge is kept");
}

#[tokio::test]
async fn a_refund_that_fails_every_attempt_is_left_to_an_operator() {
    let s = setup().await;
    s.cancel_confirmed_while_refunds_fail().await;
    let mut failed = 0;
    for _ in 0..REFUND_ATTEMPTS_MAX + 3 {
        failed += s.settle_after(7 * 3600).await.failed;
    }
    assert_eq!(failed, REFUND_ATTEMPTS_MAX, "retried a bounded number of times");
    assert_eq!(s.t.store.count("refunds_due", "1=1").await.unwrap(), 1, "kept, for an operator to see");
    let parked = format!("next_at = {}", PARKED_AT.as_second());
    assert_eq!(s.t.store.count("refunds_due", &parked).await.unwrap(), 1, "parked past every sweep's scan");
    let metrics = s.t.client.get(format!("http://{}/metrics", s.t.addr)).send().await.unwrap().text().await.unwrap();
    let abandoned = metrics.lines().find_map(|l| l.strip_prefix("allot_refunds_abandoned_total "));
    assert!(abandoned.and_then(|n| n.parse::<f64>().ok()) >= Some(1.0), "counted for an alert: {metrics}");
    let stored = s.t.store.booking(s.booking.parse().unwrap()).await.unwrap().unwrap();
    assert_eq!((stored.status, stored.refund.unwrap().reference), (BookingStatus::Cancelled, None));
}

/// Two confirms of one booking race at the provider; the `tok_async` one records its pending
/// payment first. The other's outcome lands on a booking that waits for that payment: refused
/// (409), whether its card was charged or declined, the booking unchanged (no attempt counted,
/// the pending payment kept for its provider's event to settle).
#[tokio::test]
async fn a_card_confirm_landing_after_an_async_payment_was_recorded_changes_nothing() {
    for token in ["tok_visa", "tok_chargeDeclined"] {
        let s = setup().await;
        s.provider.charges_gated.store(true, Ordering::SeqCst);
        let confirm = |token: &str| {
            let body = json!({"payment": {"method": "card", "token": token}});
            let url = s.t.url(&format!("/bookings/{}/confirm", s.booking));
            s.t.client.post(url).bearer_auth(&s.customer).json(&body).send()
        };
        let asynchronous = tokio::spawn(confirm("tok_async"));
        s.provider.charging.notified().await;
        let card = tokio::spawn(confirm(token));
        s.provider.charging.notified().await;
        s.provider.gate.add_permits(1);
        let (status, pending) = common::read(asynchronous.await.unwrap().unwrap()).await;
        assert_eq!((status, pending["status"].as_str()), (StatusCode::OK, Some("pending_payment")), "{pending}");
        s.provider.gate.add_permits(1);
        let (status, refused) = common::read(card.await.unwrap().unwrap()).await;
        assert_eq!(status, StatusCode::CONFLICT, "{token}: {refused}");
        let stored = s.stored().await;
        assert_eq!(stored["status"], "pending_payment", "{token}");
        assert_eq!(stored["payment"], pending["payment"], "{token}: the pending payment kept");
        assert_eq!(stored["payment_attempts"], pending["payment_attempts"], "{token}: no attempt counted");
        // Both confirms asked with the attempt's one idempotency key: at the provider they are
        // one payment (the pending one), so nothing is given back.
        assert_eq!(stored["payment"]["reference"], format!("pi_test_{}_0", s.booking));
        assert!(s.provider.asked().is_empty(), "{token}: {:?}", s.provider.asked());
    }
}

/// A provider that never answers a refund: the attempt fails after
/// `PROVIDER_CALL_TIMEOUT_SECONDS` (real time: this test waits that long), is rescheduled under
/// its lease, and the next attempt, answered, makes it.
#[tokio::test]
async fn a_refund_the_provider_never_answers_fails_after_the_timeout_and_is_made_later() {
    let s = setup().await;
    s.cancel_confirmed_while_refunds_fail().await;
    s.provider.refunds_fail.store(false, Ordering::SeqCst);
    s.provider.next_refund_gated.store(true, Ordering::SeqCst);
    let started = std::time::Instant::now();
    assert_eq!(s.settle_after(REFUND_GRACE_SECONDS).await, RefundSweep { failed: 1, ..RefundSweep::default() });
    assert!(started.elapsed() >= std::time::Duration::from_secs(PROVIDER_CALL_TIMEOUT_SECONDS), "waited for it");
    assert_eq!(s.settle_after(2 * REFUND_GRACE_SECONDS).await, RefundSweep { refunded: 1, ..RefundSweep::default() });
    let outcomes: Vec<_> =
        s.refund_attempts().await.into_iter().map(|(outcome, reason, _)| (outcome, reason)).collect();
    assert_eq!(outcomes, [("failure".into(), Some("payment_provider_unavailable".into())), ("success".into(), None)]);
}

/// A sweep out of time gives the refunds it took and did not reach back to the queue: due at
/// once (not when its lease would end), their attempts as they were, nothing audited; the next
/// sweep makes them.
#[tokio::test]
async fn a_sweep_out_of_time_gives_back_what_it_did_not_reach() {
    let s = setup().await;
    s.cancel_confirmed_while_refunds_fail().await;
    s.provider.refunds_fail.store(false, Ordering::SeqCst);
    s.t.clock.advance(SignedDuration::from_secs(REFUND_GRACE_SECONDS));
    let sweep = s.t.app.settle_refunds_within(std::time::Duration::ZERO).await.unwrap();
    assert_eq!(sweep, RefundSweep::default(), "none reached");
    let queued = s.t.store.refunds_due(s.t.clock_now(), REFUND_ATTEMPTS_MAX, 10).await.unwrap();
    assert_eq!(queued.iter().map(|r| (r.attempts, r.next_at)).collect::<Vec<_>>(), [(0, s.t.clock_now())]);
    assert_eq!(s.provider.asked().len(), 1, "only the cancel's own attempt");
    assert!(s.refund_attempts().await.is_empty(), "nothing audited");
    assert_eq!(s.t.app.settle_refunds().await.unwrap(), RefundSweep { refunded: 1, ..RefundSweep::default() });
}

/// A refund made, and reported failed by the provider afterwards (the card closed since): the
/// booking records the failure, announces it, and owes the refund again, parked for an
/// operator; an operator's retry makes it anew under a key of its own (the first refund's key
/// would be answered with the failed refund) and records it made.
#[tokio::test]
async fn a_refund_the_provider_reports_failed_is_owed_again_and_made_anew_when_an_operator_retries() {
    let s = setup().await;
    let (status, _) = s.confirm().await;
    assert_eq!(status, StatusCode::OK);
    let (status, cancelled) = s.cancel().await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    let payment = cancelled["payment"]["reference"].as_str().unwrap().to_owned();
    let made = cancelled["refund"]["reference"].as_str().unwrap().to_owned();
    let object = |refund: &str, status: &str| {
        json!({"id": refund, "object": "refund", "payment_intent": payment, "status": status,
            "failure_reason": "expired_or_canceled_card", "metadata": {"booking_id": s.booking}})
    };

    let (status, ack) = s.refund_event("refund.updated", object(&made, "pending")).await;
    assert_eq!((status, ack["outcome"].as_str()), (StatusCode::OK, Some("ignored")), "not a failure: {ack}");
    let (status, ack) = s.refund_event("refund.failed", object("re_other", "failed")).await;
    assert_eq!((status, ack["outcome"].as_str()), (StatusCode::OK, Some("ignored")), "not its refund: {ack}");
    let foreign = json!({"id": "re_theirs", "object": "refund", "payment_intent": null, "status": "failed"});
    let (status, ack) = s.refund_event("charge.refund.updated", foreign).await;
    assert_eq!((status, ack["outcome"].as_str()), (StatusCode::OK, Some("ignored")), "not ours: {ack}");
    let malformed = json!({"object": "refund", "status": "succeeded", "metadata": {"booking_id": s.booking}});
    let (status, ack) = s.refund_event("refund.failed", malformed).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{ack}");
    let fields = &ack["error"]["details"]["fields"];
    for field in ["data.object.id", "data.object.payment_intent", "data.object.status"] {
        assert!(fields[field].is_string(), "{field}: {ack}");
    }
    assert_eq!(s.stored().await["refund"]["failure"], Value::Null, "nothing changed");

    // Recorded, but the record's answer lost: 503, so the provider sends it again (below).
    s.faults.lose_booking_update_answers(1);
    let (status, ack) = s.refund_event("refund.failed", object(&made, "failed")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{ack}");
    for kind in ["refund.failed", "charge.refund.updated"] {
        let (status, ack) = s.refund_event(kind, object(&made, "failed")).await;
        assert_eq!((status, ack["outcome"].as_str()), (StatusCode::OK, Some("refund_failed")), "{kind}: {ack}");
        let refund = &ack["booking"]["refund"];
        assert_eq!(refund["failure"], "expired_or_canceled_card", "{ack}");
        assert_eq!(refund["reference"].as_str(), Some(made.as_str()), "the refund that failed");
    }
    assert_eq!(s.t.store.count("outbox_events", "topic = 'booking.refund_failed'").await.unwrap(), 1, "once");
    let queued = s.t.app.store.refunds_of_payment(&payment).await.unwrap();
    assert_eq!(queued.iter().map(|r| (r.attempts, r.next_at)).collect::<Vec<_>>(), [(REFUND_ATTEMPTS_MAX, PARKED_AT)]);
    assert_eq!(s.settle_after(REFUND_GRACE_SECONDS).await, RefundSweep::default(), "left to an operator");
    assert_eq!(s.provider.asked().len(), 1, "not tried again on its own");

    let now = {
        use allot_app::clock::Clock;
        s.t.clock.now()
    };
    assert_eq!(allot_app::refunds::rearm(s.t.app.store.as_ref(), &payment, now).await.unwrap(), 1);
    assert_eq!(s.settle_after(0).await, RefundSweep { refunded: 1, ..RefundSweep::default() });
    let asked = s.provider.asked();
    let (first, again) = (&asked[0], &asked[1]);
    assert_eq!((again.amount, again.payment_reference.as_str()), (first.amount, payment.as_str()));
    assert_eq!(again.idempotency_key, format!("{}_after_{made}", first.idempotency_key), "a key of its own");
    assert_eq!(again.booking_id.to_string(), s.booking, "named for its events");
    let stored = s.stored().await;
    let refund = &stored["refund"];
    assert_eq!(refund["failure"], Value::Null, "{stored}");
    assert!(refund["reference"].as_str().is_some_and(|r| r != made), "made anew: {stored}");
    assert_eq!(s.t.store.count("refunds_due", "1=1").await.unwrap(), 0);
    assert_eq!(s.t.store.count("outbox_events", "topic = 'booking.refunded'").await.unwrap(), 2);
    let (status, ack) = s.refund_event("refund.failed", object(&made, "failed")).await;
    assert_eq!((status, ack["outcome"].as_str()), (StatusCode::OK, Some("ignored")), "superseded: {ack}");
}

/// The confirm's write records the charge and commits, but its answer is lost: the request
/// answers 503 and queues the charge as possibly unrecorded; the booking as stored records it,
/// so the reconciler drops it and the money is kept; the client's retry finds it confirmed.
#[tokio::test]
async fn a_charge_whose_record_committed_but_whose_answer_was_lost_is_kept() {
    let s = setup().await;
    s.faults.lose_booking_update_answers(1);
    let (status, busy) = s.confirm().await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{busy}");
    let stored = s.stored().await;
    assert_eq!(
        (stored["status"].as_str(), &stored["payment"]["reference"]),
        (Some("confirmed"), &json!(format!("pi_test_{}_0", s.booking)))
    );
    assert_eq!(s.t.store.count("refunds_due", "kind = 'unrecorded'").await.unwrap(), 1, "queued all the same");
    let sweep = s.settle_after(REFUND_GRACE_SECONDS).await;
    assert_eq!(sweep, RefundSweep { not_owed: 1, ..RefundSweep::default() }, "recorded: not owed");
    assert!(s.provider.asked().is_empty(), "the recorded charge is never refunded");
    let (status, again) = s.confirm().await;
    assert_eq!(status, StatusCode::CONFLICT, "confirmed already: {again}");
    assert_eq!(s.stored().await["status"], "confirmed");
}

/// A cancellation's refund is made and its reference recorded, but the record's answer is
/// lost: the cancel still answers the cancellation, the refund queued with it was dropped in
/// the record's commit, and no sweep refunds again.
#[tokio::test]
async fn a_refund_whose_record_committed_but_whose_answer_was_lost_is_made_once() {
    let s = setup().await;
    assert_eq!(s.confirm().await.0, StatusCode::OK);
    // The cancellation's own write answers; the refund's record, the next, does not.
    s.faults.lose_booking_update_answers_after(1, 1);
    let cancelled = s.cancel().await;
    assert_eq!(cancelled.0, StatusCode::OK, "{}", cancelled.1);
    let stored = s.stored().await;
    assert!(stored["refund"]["reference"].is_string(), "recorded: {stored}");
    assert_eq!(s.t.store.count("refunds_due", "1=1").await.unwrap(), 0, "dropped in the record's commit");
    assert_eq!(s.settle_after(24 * 3600).await, RefundSweep::default());
    assert_eq!(s.provider.asked().len(), 1, "refunded once");
}

/// A payment left pending whose event never comes: once it has waited a minute, the provider is
/// asked, and what it says settles the booking as its event would (paid: confirmed; failed:
/// held again for another attempt), audited as the server's own; a payment still pending waits.
#[tokio::test]
async fn a_payment_left_pending_is_settled_by_asking_the_provider() {
    use allot_app::pending::{PENDING_CHECK_AFTER_SECONDS, PendingSweep};
    let s = setup().await;
    let body = json!({"payment": {"method": "card", "token": "tok_async"}});
    let (status, pending) = s.t.post(Some(&s.customer), &format!("/bookings/{}/confirm", s.booking), body).await;
    assert_eq!((status, pending["status"].as_str()), (StatusCode::OK, Some("pending_payment")), "{pending}");
    let payment = pending["payment"]["reference"].as_str().unwrap().to_owned();
    let sweep = |seconds: i64| {
        let t = &s.t;
        async move {
            t.clock.advance(SignedDuration::from_secs(seconds));
            t.app.settle_pending_payments().await.unwrap()
        }
    };
    assert_eq!(sweep(0).await, PendingSweep { waiting: 1, ..PendingSweep::default() }, "its event has time yet");
    assert_eq!(sweep(PENDING_CHECK_AFTER_SECONDS).await, PendingSweep { waiting: 1, ..PendingSweep::default() });
    assert_eq!(s.stored().await["status"], "pending_payment", "pending at the provider too");

    // The provider's failure came before the confirm recorded the payment (ignored then), say:
    // asked, the provider says failed, and the booking is held again for another attempt.
    s.provider.statuses.lock().unwrap().insert(payment.clone(), PaymentStatus::Failed);
    assert_eq!(sweep(0).await, PendingSweep { failed: 1, ..PendingSweep::default() });
    let held = s.stored().await;
    assert_eq!((held["status"].as_str(), held["payment_attempts"].as_i64()), (Some("held"), Some(1)), "{held}");
    assert_eq!(sweep(0).await, PendingSweep::default(), "nothing pending any more");

    let body = json!({"payment": {"method": "card", "token": "tok_async"}});
    let (_, again) = s.t.post(Some(&s.customer), &format!("/bookings/{}/confirm", s.booking), body).await;
    let second = again["payment"]["reference"].as_str().unwrap().to_owned();
    assert_ne!(second, payment, "another attempt, another payment");
    let received = allot_app::webhooks::Received {
        amount: again["total"].as_i64().unwrap(),
        currency: allot_core::inventory::Currency::try_from(again["currency"].as_str().unwrap().to_owned()).unwrap(),
    };
    s.provider.statuses.lock().unwrap().insert(second.clone(), PaymentStatus::Succeeded(received));
    assert_eq!(sweep(PENDING_CHECK_AFTER_SECONDS).await, PendingSweep { paid: 1, ..PendingSweep::default() });
    let confirmed = s.stored().await;
    assert_eq!(
        (confirmed["status"].as_str(), confirmed["payment"]["status"].as_str()),
        (Some("confirmed"), Some("succeeded"))
    );
    assert_eq!(sweep(PENDING_CHECK_AFTER_SECONDS).await, PendingSweep::default(), "settled once");

    let manager = s.t.login(MANAGER).await;
    let (status, page) = s.t.get(Some(&manager), "/audit?action=payment.reconcile&limit=10").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let events = page["data"].as_array().unwrap();
    assert_eq!(events.len(), 2, "{page}");
    for event in events {
        assert_eq!(
            (event["actor_role"].as_str(), event["outcome"].as_str()),
            (Some("system"), Some("success")),
            "{event}"
        );
        assert_eq!(event["target_id"].as_str(), Some(s.booking.as_str()));
    }
    assert!(s.provider.asked().is_empty(), "nothing refunded");
}

/// A refund's failure reported before the refund's reference is recorded (its record failed,
/// and is retried): refused (409), so the provider sends it again; sent again once the refund
/// is recorded, it is applied, instead of the refund being recorded made after it.
#[tokio::test]
async fn a_refund_failure_reported_before_the_refund_is_recorded_is_refused_until_it_is() {
    let s = setup().await;
    assert_eq!(s.confirm().await.0, StatusCode::OK);
    // The cancel's write goes through; the refund is made, and its record fails.
    s.faults.fail_booking_updates_after(1, 1);
    let cancelled = s.cancel().await.1;
    assert_eq!(s.stored().await["refund"]["reference"], Value::Null, "made, not recorded: {cancelled}");
    let payment = cancelled["payment"]["reference"].as_str().unwrap().to_owned();
    let made = format!("re_{payment}");
    let object = json!({"id": made, "object": "refund", "payment_intent": payment, "status": "failed",
        "failure_reason": "expired_or_canceled_card", "metadata": {"booking_id": s.booking}});
    let (status, ack) = s.refund_event("refund.failed", object.clone()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{ack}");
    assert_eq!(s.settle_after(REFUND_GRACE_SECONDS).await, RefundSweep { refunded: 1, ..RefundSweep::default() });
    assert_eq!(s.stored().await["refund"]["reference"].as_str(), Some(made.as_str()), "recorded by the reconciler");
    let (status, ack) = s.refund_event("refund.failed", object).await;
    assert_eq!((status, ack["outcome"].as_str()), (StatusCode::OK, Some("refund_failed")), "{ack}");
    let queued = s.t.app.store.refunds_of_payment(&payment).await.unwrap();
    assert_eq!(queued.iter().map(|r| r.next_at).collect::<Vec<_>>(), [PARKED_AT], "owed again, left to an operator");
}

/// A payment the provider cannot say anything of (not its own, say) is passed over: the
/// payments behind it in the sweep are still settled.
#[tokio::test]
async fn a_payment_the_provider_cannot_say_anything_of_does_not_stop_the_others() {
    use allot_app::pending::{PENDING_CHECK_AFTER_SECONDS, PendingSweep};
    let s = setup().await;
    let manager = s.t.login(MANAGER).await;
    let venue = s.stored().await["venue_id"].as_str().unwrap().to_owned();
    let (seats, event) = s.t.seats_and_event(&manager, &venue, 1, 48).await;
    // Held a second later: its hold lapses later, so the sweep comes to it after the other.
    s.t.clock.advance(SignedDuration::from_secs(1));
    let (_, held) =
        s.t.post(Some(&s.customer), "/bookings", json!({"items": [{"resource_id": seats[0], "event_id": event}]}))
            .await;
    let mut pending = Vec::new();
    for booking in [s.booking.clone(), held["id"].as_str().unwrap().to_owned()] {
        let body = json!({"payment": {"method": "card", "token": "tok_async"}});
        let (status, answer) = s.t.post(Some(&s.customer), &format!("/bookings/{booking}/confirm"), body).await;
        assert_eq!((status, answer["status"].as_str()), (StatusCode::OK, Some("pending_payment")), "{answer}");
        pending.push(answer);
    }
    let reference = |b: &Value| b["payment"]["reference"].as_str().unwrap().to_owned();
    s.provider.unknown.lock().unwrap().push(reference(&pending[0]));
    let received = allot_app::webhooks::Received {
        amount: pending[1]["total"].as_i64().unwrap(),
        currency: allot_core::inventory::Currency::try_from(pending[1]["currency"].as_str().unwrap().to_owned())
            .unwrap(),
    };
    s.provider.statuses.lock().unwrap().insert(reference(&pending[1]), PaymentStatus::Succeeded(received));
    s.t.clock.advance(SignedDuration::from_secs(PENDING_CHECK_AFTER_SECONDS));
    let sweep = s.t.app.settle_pending_payments().await.unwrap();
    assert_eq!(sweep, PendingSweep { paid: 1, ..PendingSweep::default() }, "the unknown one passed over");
    let (_, second) = s.t.get(Some(&s.customer), &format!("/bookings/{}", pending[1]["id"].as_str().unwrap())).await;
    assert_eq!(second["status"], "confirmed", "{second}");
    assert_eq!(s.stored().await["status"], "pending_payment", "left to its event");
}

/// Two nodes settle one pending payment at once: one confirms the booking and audits it; the
/// other finds it settled meanwhile, and neither audits nor counts it again.
#[tokio::test]
async fn two_sweeps_settling_one_pending_payment_at_once_audit_it_once() {
    use allot_app::pending::PENDING_CHECK_AFTER_SECONDS;
    let s = setup().await;
    let body = json!({"payment": {"method": "card", "token": "tok_async"}});
    let (_, pending) = s.t.post(Some(&s.customer), &format!("/bookings/{}/confirm", s.booking), body).await;
    let received = allot_app::webhooks::Received {
        amount: pending["total"].as_i64().unwrap(),
        currency: allot_core::inventory::Currency::try_from(pending["currency"].as_str().unwrap().to_owned()).unwrap(),
    };
    let payment = pending["payment"]["reference"].as_str().unwrap().to_owned();
    s.provider.statuses.lock().unwrap().insert(payment, PaymentStatus::Succeeded(received));
    s.t.clock.advance(SignedDuration::from_secs(PENDING_CHECK_AFTER_SECONDS));
    *s.provider.status_barrier.lock().unwrap() = Some(Arc::new(tokio::sync::Barrier::new(2)));
    let other = other_node(&s).await;
    let (a, b) = tokio::join!(s.t.app.settle_pending_payments(), other.settle_pending_payments());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(s.stored().await["status"], "confirmed");
    assert_eq!((a.paid + b.paid, a.settled_meanwhile + b.settled_meanwhile), (1, 1), "{a:?} {b:?}");
    let manager = s.t.login(MANAGER).await;
    let (_, page) = s.t.get(Some(&manager), "/audit?action=payment.reconcile&limit=10").await;
    assert_eq!(page["data"].as_array().unwrap().len(), 1, "{page}");
}
